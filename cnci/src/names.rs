//! The concentrator's ownership scheme (see `tenet::net::owned`): the prefixes of the names it
//! generates and the alias kinds of its bridges and (VXLAN mode) its VXLAN devices. Tunnels carry the tunnel backends' alias; a
//! tunnel is the concentrator's when it has a `tct_` name or sits on one of its bridges.

use tenet::net::owned::Ownership;

pub const BRIDGE: &str = "tcb";
pub const TUNNEL: &str = "tct";
/// A tunnel to another concentrator of the tenant (the mesh).
pub const MESH: &str = "tcm";
/// A subnet's one VXLAN device (VXLAN mode).
pub const VXLAN: &str = "tcx";

pub const BRIDGE_KIND: &str = "cnci-bridge";
pub const VXLAN_KIND: &str = "cnci-vxlan";
pub const TUNNEL_KIND: &str = "tunnel";

pub const OWNERSHIP: Ownership = Ownership {
    component: "concentrator",
    prefixes: &[BRIDGE, TUNNEL, VXLAN, MESH],
    kinds: &[BRIDGE_KIND, VXLAN_KIND],
};

pub fn is_tunnel(name: &str) -> bool {
    OWNERSHIP.is_generated_as(name, TUNNEL)
}

/// Whether `name` is one of the concentrator's mesh tunnels.
pub fn is_mesh(name: &str) -> bool {
    OWNERSHIP.is_generated_as(name, MESH)
}
