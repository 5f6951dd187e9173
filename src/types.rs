//! Small values every layer shares, parsed once at the boundary: a [`MacAddr`], a tenant
//! subnet's [`TunnelKey`] and the gateway rule ([`gateway_of`]).
//!
//! They live here rather than in the layer that first needed them so that the kernel layer
//! (`net`), the keyspaces (`calico`, `state`) and the agents agree on one parser each.

use std::fmt;
use std::net::Ipv4Addr;
use std::num::NonZeroU32;
use std::str::FromStr;

use ipnetwork::Ipv4Network;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// A MAC address. Parses `aa:bb:cc:dd:ee:ff` (or `-`-separated, any case) and prints as Go's
/// `net.HardwareAddr` does: lower case, colon-separated, which is what Calico stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn octets(self) -> [u8; 6] {
        self.0
    }

    /// Neither multicast/broadcast (the I/G bit) nor all zeroes: an address a NIC can have.
    pub fn is_unicast(self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }

    /// Why this address cannot be given to an interface, if it cannot.
    pub fn check_unicast(self) -> Result<Self, String> {
        if self.0 == [0; 6] {
            Err(format!("{self} is not a usable address"))
        } else if self.0[0] & 1 != 0 {
            Err(format!("{self} is a multicast address"))
        } else {
            Ok(self)
        }
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(format!(
                "'{s}' is not a MAC address (want six hex octets, aa:bb:cc:dd:ee:ff)"
            ));
        }
        let mut mac = [0u8; 6];
        for (octet, part) in mac.iter_mut().zip(&parts) {
            if part.len() != 2 {
                return Err(format!("'{s}' is not a MAC address (octet '{part}')"));
            }
            *octet = u8::from_str_radix(part, 16)
                .map_err(|_| format!("'{s}' is not a MAC address (octet '{part}')"))?;
        }
        Ok(MacAddr(mac))
    }
}

impl From<[u8; 6]> for MacAddr {
    fn from(octets: [u8; 6]) -> Self {
        MacAddr(octets)
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// ciao's tunnel key for a tenant subnet: the subnet's network address read as a
/// little-endian u32 (172.16.0.0 → 4268). Never 0. The GRE key and the VXLAN VNI of every
/// tunnel of that subnet, on the compute node and the concentrator alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TunnelKey(NonZeroU32);

impl TunnelKey {
    pub fn new(key: u32) -> Option<Self> {
        NonZeroU32::new(key).map(TunnelKey)
    }

    /// 172.16.0.0/16 → 4268. Errors for a subnet at 0.0.0.0.
    pub fn from_subnet(subnet: &Ipv4Network) -> Result<Self, String> {
        Self::new(u32::from_le_bytes(subnet.network().octets()))
            .ok_or_else(|| format!("subnet {subnet} has tunnel key 0, which is invalid"))
    }

    pub fn get(self) -> u32 {
        self.0.get()
    }
}

impl fmt::Display for TunnelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The gateway of a tenant subnet: its first host address (network + 1), which the
/// concentrator's bridge holds and DHCP hands out as router and DNS server.
pub fn gateway_of(subnet: &Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()).wrapping_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_once_and_print_lower_case() {
        let mac: MacAddr = "EE:ee:0A:00:00:01".parse().unwrap();
        assert_eq!(mac.to_string(), "ee:ee:0a:00:00:01");
        assert_eq!("ee-ee-0a-00-00-01".parse::<MacAddr>().unwrap(), mac);
        assert!("ee:ee:ee".parse::<MacAddr>().is_err());
        assert!("gg:ee:ee:ee:ee:ee".parse::<MacAddr>().is_err());
        let zz = "02:00:zz:00:00:01".parse::<MacAddr>().unwrap_err();
        assert!(zz.contains("not a MAC address"), "{zz}");
        assert!(mac.is_unicast());
        let multicast: MacAddr = "01:00:5e:00:00:01".parse().unwrap();
        assert!(multicast.check_unicast().unwrap_err().contains("multicast"));
        assert!(MacAddr([0; 6]).check_unicast().is_err());
        assert_eq!(
            serde_json::to_string(&mac).unwrap(),
            r#""ee:ee:0a:00:00:01""#
        );
    }

    #[test]
    fn tunnel_key_is_the_little_endian_network_address() {
        let key = |s: &str| TunnelKey::from_subnet(&s.parse().unwrap());
        assert_eq!(key("172.16.0.0/16").unwrap().get(), 4268);
        assert_eq!(key("10.0.1.0/24").unwrap().get(), 0x0001_000a);
        assert!(key("0.0.0.0/0").is_err());
        assert!(TunnelKey::new(0).is_none());
    }

    #[test]
    fn gateway_is_network_plus_one() {
        assert_eq!(
            gateway_of(&"172.16.0.0/24".parse().unwrap()),
            Ipv4Addr::new(172, 16, 0, 1)
        );
        assert_eq!(
            gateway_of(&"10.1.2.128/25".parse().unwrap()),
            Ipv4Addr::new(10, 1, 2, 129)
        );
    }
}
