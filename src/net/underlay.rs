//! Finding a host's underlay: the IPv4 addresses on its physical links, and which of them
//! plays which role (management, compute/tunnels, the concentrator's uplink), chosen by
//! configured CIDRs. Shared by the compute node and the concentrator.

use std::net::Ipv4Addr;

use ipnetwork::{IpNetwork, Ipv4Network};

use super::alias::ALIAS_PREFIX;
use super::owned;
use super::{NetResult, Netlink};

/// An IPv4 address on a physical (underlay) link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnderlayAddr {
    pub link: String,
    pub index: u32,
    pub addr: Ipv4Network,
    pub mtu: u32,
}

/// Links that can be the underlay: not loopback, not tenet's own, aliased or still unfinished
/// (tenet's bridges carry gateway addresses on a concentrator: ciao counted them, a bug),
/// not a container engine's
/// or libvirt's bridge. veth counts, because test hosts and many VMs are cabled with one.
fn is_physical(kind: Option<&str>, name: &str, alias: Option<&str>) -> bool {
    if name == "lo"
        || alias.is_some_and(|a| a.starts_with(ALIAS_PREFIX))
        || owned::looks_generated(name)
    {
        return false;
    }
    match kind {
        None | Some("bond" | "vlan" | "macvlan" | "veth") => true,
        Some("bridge") => !(name.starts_with("docker") || name.starts_with("virbr")),
        _ => false,
    }
}

/// Every IPv4 address on a physical link of the namespace `netlink` is bound to.
pub async fn candidates(netlink: &Netlink) -> NetResult<Vec<UnderlayAddr>> {
    let mut found = Vec::new();
    for link in netlink.links().await? {
        if !is_physical(link.kind.as_deref(), &link.name, link.alias.as_deref()) {
            continue;
        }
        for addr in netlink.addresses(link.index).await? {
            if let IpNetwork::V4(v4) = addr {
                found.push(UnderlayAddr {
                    link: link.name.clone(),
                    index: link.index,
                    addr: v4,
                    mtu: link.mtu,
                });
            }
        }
    }
    Ok(found)
}

/// The address for `role`: the one inside `nets` (the first, if several), or the only
/// candidate when `nets` is empty. The error says what was found and what to configure.
pub fn pick(
    role: &str,
    candidates: &[UnderlayAddr],
    nets: &[Ipv4Network],
) -> Result<UnderlayAddr, String> {
    let matching: Vec<&UnderlayAddr> = candidates
        .iter()
        .filter(|a| nets.is_empty() || nets.iter().any(|n| n.contains(a.addr.ip())))
        .collect();
    match matching.as_slice() {
        [] if nets.is_empty() => Err(format!(
            "no physical interface has an IPv4 address for the {role} network"
        )),
        [] => Err(format!(
            "no address in {} found for the {role} network (have: {})",
            nets.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            describe(candidates)
        )),
        [one] => Ok((*one).clone()),
        [first, ..] if !nets.is_empty() => Ok((*first).clone()),
        _ => Err(format!(
            "the {role} network is ambiguous: {}; configure its CIDR",
            describe(candidates)
        )),
    }
}

/// The candidate holding exactly `ip` (an explicit choice, which wins over CIDRs).
pub fn by_address(
    role: &str,
    candidates: &[UnderlayAddr],
    ip: Ipv4Addr,
) -> Result<UnderlayAddr, String> {
    candidates
        .iter()
        .find(|a| a.addr.ip() == ip)
        .cloned()
        .ok_or_else(|| {
            format!(
                "{role} address {ip} is not on a physical interface (have: {})",
                describe(candidates)
            )
        })
}

fn describe(addrs: &[UnderlayAddr]) -> String {
    if addrs.is_empty() {
        return "none".into();
    }
    addrs
        .iter()
        .map(|a| format!("{} on {}", a.addr, a.link))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(link: &str, a: &str) -> UnderlayAddr {
        UnderlayAddr {
            link: link.into(),
            index: 1,
            addr: a.parse().unwrap(),
            mtu: 1500,
        }
    }

    #[test]
    fn roles_are_picked_by_cidr_and_ambiguity_lists_the_candidates() {
        let c = [addr("eth0", "10.0.0.5/24"), addr("eth1", "192.0.2.7/24")];
        let compute = pick("compute", &c, &["10.0.0.0/8".parse().unwrap()]).unwrap();
        assert_eq!(compute.link, "eth0");
        let e = pick("uplink", &c, &[]).unwrap_err();
        assert!(
            e.contains("ambiguous") && e.contains("10.0.0.5/24 on eth0"),
            "{e}"
        );
        let e = pick("uplink", &c, &["198.51.100.0/24".parse().unwrap()]).unwrap_err();
        assert!(
            e.contains("198.51.100.0/24") && e.contains("192.0.2.7/24 on eth1"),
            "{e}"
        );
        assert_eq!(
            by_address("tunnel local", &c, "192.0.2.7".parse().unwrap())
                .unwrap()
                .link,
            "eth1"
        );
        assert!(is_physical(Some("veth"), "eth0", None));
        assert!(!is_physical(
            Some("bridge"),
            "tbr_1",
            Some("tenet:v1:cnci-bridge x=y")
        ));
        assert!(!is_physical(Some("bridge"), "docker0", None));
        assert!(
            !is_physical(Some("bridge"), "tcb_0123abcd", None),
            "an unfinished bridge"
        );
    }
}
