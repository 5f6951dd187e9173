//! The concentrator's ownership scheme (see `tenet::net::owned`): the prefixes of the names it
//! generates and the alias kind of its bridges. Tunnels carry the tunnel backends' alias; a
//! tunnel is the concentrator's when it has a `tct_` name or sits on one of its bridges.

use tenet::net::owned::Ownership;

pub const BRIDGE: &str = "tcb";
pub const TUNNEL: &str = "tct";

pub const BRIDGE_KIND: &str = "cnci-bridge";
pub const TUNNEL_KIND: &str = "tunnel";

pub const OWNERSHIP: Ownership = Ownership {
    component: "concentrator",
    prefixes: &[BRIDGE, TUNNEL],
    kinds: &[BRIDGE_KIND],
};

pub fn is_tunnel(name: &str) -> bool {
    OWNERSHIP.is_generated_as(name, TUNNEL)
}
