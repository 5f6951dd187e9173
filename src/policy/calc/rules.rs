//! A datastore rule → the dataplane's rule: tags and selectors become IP-set ids (scoped to
//! a tenant in GRE mode), nets merged, the IP version inferred from ICMP, and Felix's stable
//! rule ids chained through SHA-224.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prost::Message;
use sha2::{Digest, Sha224};

use crate::calico::{self, Port, Protocol, RuleAction};
use crate::policy::proto;
use crate::policy::selector::Selector;

/// Narrows selectors to one tenant in GRE mode; `None` is Calico's single address space.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    pub label: String,
    pub value: String,
}

impl Scope {
    /// `sel` restricted to endpoints of this scope.
    pub fn narrow(&self, sel: Selector) -> Selector {
        sel.and(Selector::Eq(self.label.clone(), self.value.clone()))
    }
}

/// The selector an IP set of a rule stands for, narrowed to the scope.
pub fn set_selector(sel: Selector, scope: Option<&Scope>) -> Selector {
    match scope {
        Some(s) => s.narrow(sel),
        None => sel,
    }
}

/// Every selector a list of rules needs an IP set for.
pub fn rule_selectors(rule: &calico::Rule, scope: Option<&Scope>) -> Vec<Selector> {
    let mut out = Vec::new();
    for (tag, sel) in [
        (&rule.src_tag, &rule.src_selector),
        (&rule.dst_tag, &rule.dst_selector),
        (&rule.not_src_tag, &rule.not_src_selector),
        (&rule.not_dst_tag, &rule.not_dst_selector),
    ] {
        out.extend(sets_of(tag, sel, scope));
    }
    out
}

/// The tag's and the selector's sets, in that order (Felix ANDs them).
fn sets_of(tag: &str, sel: &str, scope: Option<&Scope>) -> Vec<Selector> {
    let mut out = Vec::new();
    if !tag.is_empty() {
        out.push(set_selector(Selector::tag(tag), scope));
    }
    if !sel.is_empty() {
        // Rules were validated on the way in; an unparsable one selects nothing.
        let parsed = Selector::parse(sel).unwrap_or(Selector::Not(Box::new(Selector::All)));
        out.push(set_selector(parsed, scope));
    }
    out
}

fn ids(sels: Vec<Selector>) -> Vec<String> {
    sels.iter().map(Selector::ip_set_id).collect()
}

fn protocol(p: &Protocol) -> proto::Protocol {
    use proto::protocol::NumberOrName;
    proto::Protocol {
        number_or_name: Some(match p {
            Protocol::Named(n) => NumberOrName::Name(n.clone()),
            Protocol::Number(n) => NumberOrName::Number(i32::from(*n)),
        }),
    }
}

fn ports(ps: &[Port]) -> Vec<proto::PortRange> {
    ps.iter()
        .map(|p| proto::PortRange {
            first: i32::from(p.min),
            last: i32::from(p.max),
        })
        .collect()
}

fn nets(nets: Vec<ipnetwork::IpNetwork>) -> Vec<String> {
    nets.iter().map(ToString::to_string).collect()
}

fn action(a: RuleAction) -> &'static str {
    match a {
        RuleAction::Unset | RuleAction::Allow => "allow",
        RuleAction::Deny => "deny",
        RuleAction::Log => "log",
        RuleAction::NextTier => "next-tier",
    }
}

/// One rule in the dataplane's form (without its id).
pub fn convert(rule: &calico::Rule, scope: Option<&Scope>) -> proto::Rule {
    let named =
        |p: &Option<Protocol>, name: &str| matches!(p, Some(Protocol::Named(n)) if n == name);
    let ip_version = match rule.ip_version {
        Some(4) => proto::IpVersion::Ipv4,
        Some(6) => proto::IpVersion::Ipv6,
        _ if named(&rule.protocol, "icmp") => proto::IpVersion::Ipv4,
        _ if named(&rule.protocol, "icmpv6") => proto::IpVersion::Ipv6,
        _ => proto::IpVersion::Any,
    };
    let icmp = rule.icmp_type.map(|t| match rule.icmp_code {
        Some(c) => proto::rule::Icmp::IcmpTypeCode(proto::IcmpTypeAndCode {
            r#type: i32::from(t),
            code: i32::from(c),
        }),
        None => proto::rule::Icmp::IcmpType(i32::from(t)),
    });
    let not_icmp = rule.not_icmp_type.map(|t| match rule.not_icmp_code {
        Some(c) => proto::rule::NotIcmp::NotIcmpTypeCode(proto::IcmpTypeAndCode {
            r#type: i32::from(t),
            code: i32::from(c),
        }),
        None => proto::rule::NotIcmp::NotIcmpType(i32::from(t)),
    });
    let not_src_nets = rule
        .not_src_nets
        .iter()
        .copied()
        .chain(rule.not_src_net)
        .collect();
    let not_dst_nets = rule
        .not_dst_nets
        .iter()
        .copied()
        .chain(rule.not_dst_net)
        .collect();
    proto::Rule {
        action: action(rule.action).into(),
        ip_version: ip_version as i32,
        protocol: rule.protocol.as_ref().map(protocol),
        src_net: nets(rule.all_src_nets()),
        src_ports: ports(&rule.src_ports),
        dst_net: nets(rule.all_dst_nets()),
        dst_ports: ports(&rule.dst_ports),
        icmp,
        src_ip_set_ids: ids(sets_of(&rule.src_tag, &rule.src_selector, scope)),
        dst_ip_set_ids: ids(sets_of(&rule.dst_tag, &rule.dst_selector, scope)),
        not_protocol: rule.not_protocol.as_ref().map(protocol),
        not_src_net: nets(not_src_nets),
        not_src_ports: ports(&rule.not_src_ports),
        not_dst_net: nets(not_dst_nets),
        not_dst_ports: ports(&rule.not_dst_ports),
        not_icmp,
        not_src_ip_set_ids: ids(sets_of(&rule.not_src_tag, &rule.not_src_selector, scope)),
        not_dst_ip_set_ids: ids(sets_of(&rule.not_dst_tag, &rule.not_dst_selector, scope)),
        rule_id: String::new(),
    }
}

/// A list of rules with Felix's chained ids: h₀ = SHA-224(seed), hᵢ = SHA-224(hᵢ₋₁ ‖
/// protobuf(rule without id)), id = the first 16 characters of base64url(hᵢ).
pub fn convert_all(rules: &[calico::Rule], scope: Option<&Scope>, seed: &str) -> Vec<proto::Rule> {
    let mut hash = Sha224::digest(seed.as_bytes());
    rules
        .iter()
        .map(|r| {
            let mut out = convert(r, scope);
            let mut h = Sha224::new();
            h.update(hash);
            h.update(out.encode_to_vec());
            hash = h.finalize();
            out.rule_id = URL_SAFE_NO_PAD.encode(hash)[..16].to_string();
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> calico::Rule {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn rules_convert_as_felix_does() {
        let r = convert(
            &rule(
                r#"{"action":"allow","protocol":"tcp","src_selector":"role == 'frontend'","src_tag":"web","dst_ports":[80,"8080:8090"]}"#,
            ),
            None,
        );
        assert_eq!(r.action, "allow");
        assert_eq!(
            r.src_ip_set_ids,
            [
                Selector::tag("web").ip_set_id(),
                Selector::parse("role == \"frontend\"").unwrap().ip_set_id()
            ]
        );
        assert_eq!(
            r.dst_ports,
            [
                proto::PortRange {
                    first: 80,
                    last: 80
                },
                proto::PortRange {
                    first: 8080,
                    last: 8090
                }
            ]
        );
        let icmp = convert(&rule(r#"{"protocol":"icmp","icmp_type":8}"#), None);
        assert_eq!(icmp.action, "allow", "an unset action allows");
        assert_eq!(icmp.ip_version, proto::IpVersion::Ipv4 as i32);
        assert_eq!(icmp.icmp, Some(proto::rule::Icmp::IcmpType(8)));
        let nets = convert(
            &rule(
                r#"{"src_nets":["10.0.0.0/8"],"src_net":"192.168.0.0/16","!dst_net":"10.1.0.0/16"}"#,
            ),
            None,
        );
        assert_eq!(nets.src_net, ["10.0.0.0/8", "192.168.0.0/16"]);
        assert_eq!(nets.not_dst_net, ["10.1.0.0/16"]);
    }

    #[test]
    fn scoped_sets_are_narrowed_to_the_tenant() {
        let scope = Scope {
            label: "tenet.tenant".into(),
            value: "acme".into(),
        };
        let r = convert(&rule(r#"{"src_tag":"web"}"#), Some(&scope));
        assert_eq!(
            r.src_ip_set_ids,
            [Selector::parse("has(web) && tenet.tenant == 'acme'")
                .unwrap()
                .ip_set_id()]
        );
        assert_eq!(
            rule_selectors(
                &rule(r#"{"src_tag":"web","!dst_selector":"a == 'b'"}"#),
                Some(&scope)
            )
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
            [
                "(has(web) && tenet.tenant == \"acme\")",
                "(a == \"b\" && tenet.tenant == \"acme\")"
            ]
        );
    }

    #[test]
    fn rule_ids_are_stable_and_chained() {
        let rules = [rule(r#"{"action":"deny"}"#), rule(r#"{"action":"allow"}"#)];
        let a = convert_all(&rules, None, "pol-in-default/p");
        let b = convert_all(&rules, None, "pol-in-default/p");
        assert_eq!(a, b);
        assert_eq!(a[0].rule_id.len(), 16);
        assert_ne!(a[0].rule_id, a[1].rule_id);
        let other = convert_all(&rules, None, "pol-in-default/q");
        assert_ne!(a[0].rule_id, other[0].rule_id);
        // Changing the first rule changes every later id.
        let changed = convert_all(
            &[rule(r#"{"action":"log"}"#), rules[1].clone()],
            None,
            "pol-in-default/p",
        );
        assert_ne!(changed[1].rule_id, a[1].rule_id);
    }
}
