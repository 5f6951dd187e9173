//! Interface names the compute node gives its links: `<prefix>_<8 hex digits>`.
//!
//! The alias is written last, as the commit mark of a finished object, so a link with one of
//! these names and no alias is something a crashed call started: `rebuild` deletes it. The
//! container end of a veth (`tvp_`) is not listed: it always goes with its host end.

pub const BRIDGE: &str = "tbr";
pub const TUNNEL: &str = "tgt";
pub const VNIC: &str = "tvn";
pub const PEER: &str = "tvp";
pub const CNCI_VNIC: &str = "tvc";

/// A fresh random name `<prefix>_xxxxxxxx` (12 bytes, under IFNAMSIZ).
pub fn random(prefix: &str) -> String {
    format!("{prefix}_{:08x}", rand::random::<u32>())
}

/// The container end of VNIC `ifname` (same suffix).
pub fn peer_of(ifname: &str) -> String {
    match ifname.strip_prefix(VNIC) {
        Some(rest) => format!("{PEER}{rest}"),
        None => format!("{PEER}_{ifname}"),
    }
}

/// Whether `name` is one the compute node generates for a link it owns outright.
pub fn is_generated(name: &str) -> bool {
    let Some((prefix, suffix)) = name.split_once('_') else {
        return false;
    };
    [BRIDGE, TUNNEL, VNIC, CNCI_VNIC].contains(&prefix)
        && suffix.len() == 8
        && suffix
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `name` is a tunnel name the compute node generated.
pub fn is_tunnel(name: &str) -> bool {
    is_generated(name) && name.starts_with(TUNNEL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_are_recognised() {
        for p in [BRIDGE, TUNNEL, VNIC, CNCI_VNIC] {
            assert!(is_generated(&random(p)));
        }
        assert!(!is_generated(&random(PEER)), "peers go with their veth");
        for other in [
            "eth0",
            "tbr_1234567",
            "tbr_123456789",
            "tbr_ABCDEF01",
            "xbr_12345678",
        ] {
            assert!(!is_generated(other), "{other}");
        }
        assert_eq!(peer_of("tvn_0123abcd"), "tvp_0123abcd");
        assert!(is_tunnel("tgt_0123abcd") && !is_tunnel("tbr_0123abcd"));
    }
}
