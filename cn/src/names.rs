//! The compute node's ownership scheme (see `tenet::net::owned`): the prefixes of the names
//! it generates and the alias kinds it writes. A link with one of these names and no alias is
//! something a crashed call started: `rebuild` deletes it. The container end of a veth
//! (`tvp_`) is not listed: it always goes with its host end.

use tenet::net::owned::Ownership;

pub const BRIDGE: &str = "tbr";
pub const TUNNEL: &str = "tgt";
pub const VNIC: &str = "tvn";
pub const PEER: &str = "tvp";
pub const CNCI_VNIC: &str = "tvc";

/// Alias kinds the compute node writes.
pub const BRIDGE_KIND: &str = "cn-bridge";
pub const VNIC_KIND: &str = "cn-vnic";
pub const CNCI_VNIC_KIND: &str = "cn-cncivnic";
/// The tunnel backends' alias kind, shared with other components: a tunnel is the compute
/// node's when it has a `tgt_` name or sits on one of its bridges.
pub const TUNNEL_KIND: &str = "tunnel";

pub const OWNERSHIP: Ownership = Ownership {
    component: "compute node",
    prefixes: &[BRIDGE, TUNNEL, VNIC, CNCI_VNIC],
    kinds: &[BRIDGE_KIND, VNIC_KIND, CNCI_VNIC_KIND],
};

/// The container end of VNIC `ifname` (same suffix).
pub fn peer_of(ifname: &str) -> String {
    match ifname.strip_prefix(VNIC) {
        Some(rest) => format!("{PEER}{rest}"),
        None => format!("{PEER}_{ifname}"),
    }
}

/// Whether `name` is a tunnel name the compute node generated.
pub fn is_tunnel(name: &str) -> bool {
    OWNERSHIP.is_generated_as(name, TUNNEL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_are_recognised() {
        for p in [BRIDGE, TUNNEL, VNIC, CNCI_VNIC] {
            assert!(OWNERSHIP.is_generated(&Ownership::random_name(p)));
        }
        assert!(
            !OWNERSHIP.is_generated(&Ownership::random_name(PEER)),
            "peers go with their veth"
        );
        for other in [
            "eth0",
            "tbr_1234567",
            "tbr_123456789",
            "tbr_ABCDEF01",
            "xbr_12345678",
        ] {
            assert!(!OWNERSHIP.is_generated(other), "{other}");
        }
        assert_eq!(peer_of("tvn_0123abcd"), "tvp_0123abcd");
        assert!(is_tunnel("tgt_0123abcd") && !is_tunnel("tbr_0123abcd"));
    }
}
