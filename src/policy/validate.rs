//! What the dataplane accepts from its messages. Names end up in chain and set names and
//! rule fields in `iptables-restore`/`ipset restore` lines; one bad value there would make
//! the kernel refuse the whole transaction, so every later change with it. A message that
//! fails these checks is refused on its own (its object treated as removed), with a reason.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::policy::proto;

/// A policy or profile name (Calico's `[a-zA-Z0-9_.-]`, plus `:` of tenet's tenant scope).
pub fn object_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ':'));
    ok.then_some(())
        .ok_or_else(|| format!("name {name:?} is not [A-Za-z0-9_.:-]{{1,253}}"))
}

/// A workload interface name: what the kernel takes, without characters the restore
/// formats would split on.
pub fn interface(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= crate::net::MAX_IFNAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '@'));
    ok.then_some(())
        .ok_or_else(|| format!("interface {name:?} is not a usable interface name"))
}

/// An IP-set id (selector ids are `s:` + base64url).
pub fn ip_set_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.'));
    ok.then_some(())
        .ok_or_else(|| format!("IP set id {id:?} is not [A-Za-z0-9_.:-]{{1,64}}"))
}

/// An IP-set member: an address.
pub fn member(m: &str) -> Result<(), String> {
    m.parse::<IpAddr>()
        .map(|_| ())
        .map_err(|_| format!("IP set member {m:?} is not an address"))
}

fn port_ranges(ports: &[proto::PortRange]) -> Result<(), String> {
    for p in ports {
        if !(0..=65535).contains(&p.first) || !(0..=65535).contains(&p.last) || p.first > p.last {
            return Err(format!(
                "port range {}:{} is not within 0..65535",
                p.first, p.last
            ));
        }
    }
    Ok(())
}

fn protocol(p: &Option<proto::Protocol>) -> Result<(), String> {
    use proto::protocol::NumberOrName;
    match p.as_ref().and_then(|p| p.number_or_name.as_ref()) {
        None => Ok(()),
        Some(NumberOrName::Number(n)) if (1..=255).contains(n) => Ok(()),
        Some(NumberOrName::Name(n))
            if !n.is_empty() && n.len() <= 16 && n.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            Ok(())
        }
        Some(other) => Err(format!("protocol {other:?} is not a name or 1..255")),
    }
}

fn icmp_value(t: i32, code: Option<i32>) -> Result<(), String> {
    let ok = (0..=255).contains(&t) && code.is_none_or(|c| (0..=255).contains(&c));
    ok.then_some(())
        .ok_or_else(|| format!("ICMP type {t} / code {code:?} is not within 0..255"))
}

/// One rule's fields.
pub fn rule(r: &proto::Rule) -> Result<(), String> {
    if !matches!(
        r.action.as_str(),
        "" | "allow" | "deny" | "log" | "next-tier" | "pass"
    ) {
        return Err(format!(
            "action {:?} is not allow, deny, log or next-tier",
            r.action
        ));
    }
    protocol(&r.protocol)?;
    protocol(&r.not_protocol)?;
    let id_ok = r.rule_id.len() <= 64
        && r.rule_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    if !id_ok {
        return Err(format!(
            "rule id {:?} is not [A-Za-z0-9_-]{{0,64}}",
            r.rule_id
        ));
    }
    for nets in [&r.src_net, &r.dst_net, &r.not_src_net, &r.not_dst_net] {
        for n in nets {
            n.parse::<IpNetwork>()
                .map_err(|_| format!("{n:?} is not a CIDR"))?;
        }
    }
    for ports in [
        &r.src_ports,
        &r.dst_ports,
        &r.not_src_ports,
        &r.not_dst_ports,
    ] {
        port_ranges(ports)?;
    }
    for ids in [
        &r.src_ip_set_ids,
        &r.dst_ip_set_ids,
        &r.not_src_ip_set_ids,
        &r.not_dst_ip_set_ids,
    ] {
        for id in ids {
            ip_set_id(id)?;
        }
    }
    match &r.icmp {
        Some(proto::rule::Icmp::IcmpType(t)) => icmp_value(*t, None)?,
        Some(proto::rule::Icmp::IcmpTypeCode(tc)) => icmp_value(tc.r#type, Some(tc.code))?,
        None => {}
    }
    match &r.not_icmp {
        Some(proto::rule::NotIcmp::NotIcmpType(t)) => icmp_value(*t, None)?,
        Some(proto::rule::NotIcmp::NotIcmpTypeCode(tc)) => icmp_value(tc.r#type, Some(tc.code))?,
        None => {}
    }
    Ok(())
}

/// Every rule of a list, naming the first bad one.
pub fn rules(rs: &[proto::Rule]) -> Result<(), String> {
    for (i, r) in rs.iter().enumerate() {
        rule(r).map_err(|e| format!("rule {i}: {e}"))?;
    }
    Ok(())
}

/// A policy or profile: its name and both rule lists.
pub fn rule_holder(
    name: &str,
    inbound: &[proto::Rule],
    outbound: &[proto::Rule],
) -> Result<(), String> {
    object_name(name)?;
    rules(inbound)?;
    rules(outbound)
}

/// A workload endpoint's interface and its policy and profile names.
pub fn workload(ep: &proto::WorkloadEndpoint) -> Result<(), String> {
    interface(&ep.name)?;
    for p in &ep.profile_ids {
        object_name(p)?;
    }
    for t in &ep.tiers {
        for p in t.ingress_policies.iter().chain(&t.egress_policies) {
            object_name(p)?;
        }
    }
    Ok(())
}

/// A host endpoint's interface (if it has one) and its policy and profile names.
pub fn host_endpoint(ep: &proto::HostEndpoint) -> Result<(), String> {
    if !ep.name.is_empty() {
        interface(&ep.name)?;
    }
    for p in &ep.profile_ids {
        object_name(p)?;
    }
    for t in ep
        .tiers
        .iter()
        .chain(&ep.untracked_tiers)
        .chain(&ep.pre_dnat_tiers)
    {
        for p in t.ingress_policies.iter().chain(&t.egress_policies) {
            object_name(p)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_would_break_a_restore_is_refused() {
        assert!(object_name("acme:web-1.x_y").is_ok());
        for bad in ["", "a b", "a\"b", "a\nb", "-A x"] {
            assert!(object_name(bad).is_err(), "{bad:?}");
        }
        assert!(interface("tvn_0000000a").is_ok());
        assert!(interface("x".repeat(16).as_str()).is_err());
        assert!(interface("a/b").is_err());
        assert!(member("10.0.0.1").is_ok() && member("10.0.0.1 -exist").is_err());
        let mut r = proto::Rule {
            action: "allow".into(),
            ..Default::default()
        };
        assert!(rule(&r).is_ok());
        r.dst_ports = vec![proto::PortRange {
            first: 90,
            last: 80,
        }];
        assert!(rule(&r).unwrap_err().contains("port range"));
        r.dst_ports.clear();
        r.protocol = Some(proto::Protocol {
            number_or_name: Some(proto::protocol::NumberOrName::Name("tcp -j ACCEPT".into())),
        });
        assert!(rule(&r).unwrap_err().contains("protocol"));
        r.protocol = None;
        r.src_net = vec!["10.0.0.0/33".into()];
        assert!(rule(&r).is_err());
        r.src_net.clear();
        r.rule_id = "x\n-A".into();
        assert!(rule(&r).unwrap_err().contains("rule id"));
        r.rule_id.clear();
        r.action = "accept".into();
        assert!(rule(&r).unwrap_err().contains("action"));
    }
}
