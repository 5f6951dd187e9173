//! Finding the node's underlay: which addresses carry management traffic and which carry
//! tenant tunnels.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use tenet::net::Netlink;
use tenet::net::underlay;

use crate::error::CnError;

pub use tenet::net::underlay::UnderlayAddr;

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

/// Classifies the underlay addresses of the namespace `netlink` is bound to.
pub async fn discover(netlink: &Netlink, config: &UnderlayConfig) -> Result<Underlay, CnError> {
    let candidates = underlay::candidates(netlink).await?;
    let compute = match config.tunnel_local {
        Some(ip) => underlay::by_address("tunnel local", &candidates, ip),
        None => underlay::pick("compute", &candidates, &config.compute_nets),
    }
    .map_err(CnError::Discovery)?;
    let management = underlay::pick("management", &candidates, &config.management_nets)
        .map_err(CnError::Discovery)?;
    Ok(Underlay {
        management,
        compute,
    })
}
