//! Finding the node's underlay: which addresses carry management traffic and which carry
//! tenant tunnels.

use std::net::Ipv4Addr;

use ipnetwork::{IpNetwork, Ipv4Network};
use tenet::net::Netlink;
use tenet::net::alias::ALIAS_PREFIX;

use crate::error::CnError;

/// An IPv4 address on a physical (underlay) link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnderlayAddr {
    pub link: String,
    pub index: u32,
    pub addr: Ipv4Network,
    pub mtu: u32,
}

#[derive(Debug, Clone, Default)]
pub struct UnderlayConfig {
    /// CIDRs management addresses are in; empty = any (if unambiguous).
    pub management_nets: Vec<Ipv4Network>,
    /// CIDRs compute (tunnel) addresses are in; empty = any (if unambiguous).
    pub compute_nets: Vec<Ipv4Network>,
    /// The tunnel's local address, chosen explicitly; wins over `compute_nets`.
    pub tunnel_local: Option<Ipv4Addr>,
}

#[derive(Debug, Clone)]
pub struct Underlay {
    pub management: UnderlayAddr,
    /// The first compute address: the tunnels' local address and the macvtap parent.
    pub compute: UnderlayAddr,
}

/// Links that can be the underlay: not loopback, not tenet's own, not a container engine's or
/// libvirt's bridge. veth counts, because test hosts and many VMs are cabled with one.
fn is_physical(kind: Option<&str>, name: &str, alias: Option<&str>) -> bool {
    if name == "lo" || alias.is_some_and(|a| a.starts_with(ALIAS_PREFIX)) {
        return false;
    }
    match kind {
        None | Some("bond" | "vlan" | "macvlan" | "veth") => true,
        Some("bridge") => !(name.starts_with("docker") || name.starts_with("virbr")),
        _ => false,
    }
}

fn pick(
    role: &str,
    candidates: &[UnderlayAddr],
    nets: &[Ipv4Network],
) -> Result<UnderlayAddr, CnError> {
    let matching: Vec<&UnderlayAddr> = candidates
        .iter()
        .filter(|a| nets.is_empty() || nets.iter().any(|n| n.contains(a.addr.ip())))
        .collect();
    match matching.as_slice() {
        [] if nets.is_empty() => Err(CnError::Discovery(format!(
            "no physical interface has an IPv4 address for the {role} network"
        ))),
        [] => Err(CnError::Discovery(format!(
            "no address in {} found for the {role} network (have: {})",
            nets.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            describe(candidates)
        ))),
        [one] => Ok((*one).clone()),
        [first, ..] if !nets.is_empty() => Ok((*first).clone()),
        _ => Err(CnError::Discovery(format!(
            "the {role} network is ambiguous: {}; configure its CIDR",
            describe(candidates)
        ))),
    }
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

/// Classifies the underlay addresses of the namespace `netlink` is bound to.
pub async fn discover(netlink: &Netlink, config: &UnderlayConfig) -> Result<Underlay, CnError> {
    let mut candidates = Vec::new();
    for link in netlink.links().await? {
        if !is_physical(link.kind.as_deref(), &link.name, link.alias.as_deref()) {
            continue;
        }
        for addr in netlink.addresses(link.index).await? {
            if let IpNetwork::V4(v4) = addr {
                candidates.push(UnderlayAddr {
                    link: link.name.clone(),
                    index: link.index,
                    addr: v4,
                    mtu: link.mtu,
                });
            }
        }
    }
    let compute = match config.tunnel_local {
        Some(ip) => candidates
            .iter()
            .find(|a| a.addr.ip() == ip)
            .cloned()
            .ok_or_else(|| {
                CnError::Discovery(format!(
                    "tunnel local address {ip} is not on a physical interface (have: {})",
                    describe(&candidates)
                ))
            })?,
        None => pick("compute", &candidates, &config.compute_nets)?,
    };
    let management = pick("management", &candidates, &config.management_nets)?;
    Ok(Underlay {
        management,
        compute,
    })
}
