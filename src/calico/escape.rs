//! The two ways Calico turns values into key segments.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

/// Escapes a name for use as one key segment: `%` → `%25` first, then `/` → `%2f`.
/// Used for orchestrator, workload, endpoint, profile and policy names; hostnames, config
/// names and handle IDs are never escaped.
pub fn escape_name(name: &str) -> String {
    name.replace('%', "%25").replace('/', "%2f")
}

/// Reverses [`escape_name`] (`%2f` → `/`, then `%25` → `%`).
pub fn unescape_name(segment: &str) -> String {
    segment.replace("%2f", "/").replace("%25", "%")
}

/// The CIDR key form: the canonical CIDR with its first `/` replaced by `-`
/// (`192.168.0.0/16` → `192.168.0.0-16`).
pub fn cidr_key(cidr: &IpNetwork) -> String {
    format!("{}-{}", cidr.network(), cidr.prefix())
}

/// Parses the CIDR key form; the address must be the network address of the prefix.
pub fn parse_cidr_key(segment: &str) -> Result<IpNetwork, String> {
    if !segment.contains('-') {
        return Err(format!(
            "'{segment}' is not a CIDR key (want ADDRESS-PREFIX)"
        ));
    }
    let text = segment.replacen('-', "/", 1);
    let cidr: IpNetwork = text
        .parse()
        .map_err(|e| format!("'{segment}' is not a CIDR key: {e}"))?;
    canonical(cidr).map_err(|e| format!("'{segment}': {e}"))
}

/// Accepts `cidr` only if its address is its network address.
pub fn canonical(cidr: IpNetwork) -> Result<IpNetwork, String> {
    if cidr.ip() != cidr.network() {
        return Err(format!(
            "{cidr} is not a network address (did you mean {}/{}?)",
            cidr.network(),
            cidr.prefix()
        ));
    }
    Ok(cidr)
}

pub fn ip_version(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 4 } else { 6 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_escape_percent_first() {
        assert_eq!(escape_name("a/b"), "a%2fb");
        assert_eq!(escape_name("ep%2"), "ep%252");
        assert_eq!(escape_name("%2f"), "%252f");
        for name in ["a/b", "ep%2", "%2f", "plain", "/%/%25/"] {
            assert_eq!(unescape_name(&escape_name(name)), name);
        }
    }

    #[test]
    fn cidr_keys_replace_only_the_first_slash() {
        let v4: IpNetwork = "192.168.0.0/16".parse().unwrap();
        assert_eq!(cidr_key(&v4), "192.168.0.0-16");
        let v6: IpNetwork = "fd80:24e2:f998:72d6::/64".parse().unwrap();
        assert_eq!(cidr_key(&v6), "fd80:24e2:f998:72d6::-64");
        assert_eq!(parse_cidr_key("fd80:24e2:f998:72d6::-64").unwrap(), v6);
        assert_eq!(parse_cidr_key("192.168.0.0-16").unwrap(), v4);
        assert!(
            parse_cidr_key("192.168.0.1-16")
                .unwrap_err()
                .contains("not a network address")
        );
        assert!(parse_cidr_key("192.168.0.0").is_err());
        assert!(parse_cidr_key("10.0.0.0-33").is_err());
    }
}
