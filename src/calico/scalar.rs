//! Scalar value forms that Calico's Go code marshals in particular ways.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Serialises an `f64` the way Go's `encoding/json` does for the values Calico stores:
/// integral values without a fraction (`100`, not `100.0`).
pub fn go_float<S: Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        s.serialize_i64(*value as i64)
    } else {
        s.serialize_f64(*value)
    }
}

pub fn go_float_opt<S: Serializer>(value: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(v) => go_float(v, s),
        None => s.serialize_none(),
    }
}

/// A port or port range of a rule: a JSON number for one port, `"min:max"` for a range.
/// A single port given as a string (`"80"`) is accepted and written back as a number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Port {
    pub min: u16,
    pub max: u16,
}

impl Port {
    pub fn single(port: u16) -> Self {
        Port {
            min: port,
            max: port,
        }
    }

    pub fn range(min: u16, max: u16) -> Result<Self, String> {
        if min > max {
            return Err(format!("port range {min}:{max} has min > max"));
        }
        Ok(Port { min, max })
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}:{}", self.min, self.max)
        }
    }
}

impl FromStr for Port {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let num = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| format!("'{s}' is not a port or port range"))
        };
        match s.split_once(':') {
            Some((a, b)) => Port::range(num(a)?, num(b)?),
            None => Ok(Port::single(num(s)?)),
        }
    }
}

impl Serialize for Port {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.min == self.max {
            s.serialize_u16(self.min)
        } else {
            s.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PortVisitor;
        impl Visitor<'_> for PortVisitor {
            type Value = Port;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a \"min:max\" string")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Port, E> {
                u16::try_from(v)
                    .map(Port::single)
                    .map_err(|_| E::custom(format!("port {v} is out of range 0-65535")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Port, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("port {v} is negative")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Port, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(PortVisitor)
    }
}

/// A rule's protocol: a name Calico knows, or a number 1–255.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Named(String),
    Number(u8),
}

pub const PROTOCOL_NAMES: [&str; 6] = ["tcp", "udp", "icmp", "icmpv6", "sctp", "udplite"];

impl Protocol {
    /// The protocol number, for names too (tcp = 6, …).
    pub fn number(&self) -> u8 {
        match self {
            Protocol::Number(n) => *n,
            Protocol::Named(name) => match name.as_str() {
                "tcp" => 6,
                "udp" => 17,
                "icmp" => 1,
                "icmpv6" => 58,
                "sctp" => 132,
                _ => 136, // udplite
            },
        }
    }

    /// True for the protocols that have ports (tcp and udp, by name or number).
    pub fn has_ports(&self) -> bool {
        matches!(self.number(), 6 | 17)
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.to_ascii_lowercase();
        if PROTOCOL_NAMES.contains(&lower.as_str()) {
            return Ok(Protocol::Named(lower));
        }
        match s.parse::<u8>() {
            Ok(n) if n >= 1 => Ok(Protocol::Number(n)),
            _ => Err(format!(
                "'{s}' is not a protocol (want one of {} or 1-255)",
                PROTOCOL_NAMES.join(", ")
            )),
        }
    }
}

impl Serialize for Protocol {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Protocol::Named(n) => s.serialize_str(n),
            Protocol::Number(n) => s.serialize_u8(*n),
        }
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ProtoVisitor;
        impl Visitor<'_> for ProtoVisitor {
            type Value = Protocol;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a protocol name or number")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Protocol, E> {
                match u8::try_from(v) {
                    Ok(n) if n >= 1 => Ok(Protocol::Number(n)),
                    _ => Err(E::custom(format!("protocol {v} is out of range 1-255"))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Protocol, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("protocol {v} is negative")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Protocol, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(ProtoVisitor)
    }
}

/// A BGP AS number. Text forms: decimal `0..=4294967295` or dotted `X.Y` (X·65536 + Y).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Asn(pub u32);

impl fmt::Display for Asn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Asn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not an AS number");
        match s.split_once('.') {
            Some((hi, lo)) => {
                let hi: u16 = hi.parse().map_err(|_| bad())?;
                let lo: u16 = lo.parse().map_err(|_| bad())?;
                Ok(Asn(u32::from(hi) << 16 | u32::from(lo)))
            }
            None => s.parse().map(Asn).map_err(|_| bad()),
        }
    }
}

/// Go marshals the peer's AS number with the `,string` tag: as a JSON string.
impl Serialize for Asn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Accepts a JSON string (what Go writes) or a number.
impl<'de> Deserialize<'de> for Asn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct AsnVisitor;
        impl Visitor<'_> for AsnVisitor {
            type Value = Asn;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an AS number")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Asn, E> {
                u32::try_from(v)
                    .map(Asn)
                    .map_err(|_| E::custom(format!("AS number {v} is out of range")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Asn, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("AS number {v} is negative")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Asn, E> {
                // `asNumber: 1.10` in YAML is the float 1.1: the dotted form is lost.
                Err(E::custom(format!(
                    "{v} is a number with a fraction, not an AS number; write a dotted AS \
                     number as a quoted string ('1.10')"
                )))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Asn, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(AsnVisitor)
    }
}

/// Treats JSON `null` as the type's default (Go decodes `null` into an empty slice or map).
pub fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_numbers_or_ranges() {
        let ports: Vec<Port> = serde_json::from_str(r#"[80,"8080:8090","443"]"#).unwrap();
        assert_eq!(
            serde_json::to_string(&ports).unwrap(),
            r#"[80,"8080:8090",443]"#
        );
        assert!(serde_json::from_str::<Port>(r#""90:80""#).is_err());
        assert!(serde_json::from_str::<Port>("70000").is_err());
        assert!(serde_json::from_str::<Port>(r#""http""#).is_err());
    }

    #[test]
    fn protocols_by_name_or_number() {
        let p: Vec<Protocol> = serde_json::from_str(r#"["tcp",17,"UDPLite"]"#).unwrap();
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"["tcp",17,"udplite"]"#
        );
        assert!(p[0].has_ports() && p[1].has_ports() && !p[2].has_ports());
        assert!(serde_json::from_str::<Protocol>("0").is_err());
        assert!(serde_json::from_str::<Protocol>(r#""gre""#).is_err());
    }

    #[test]
    fn asn_forms() {
        assert_eq!("64512".parse::<Asn>().unwrap(), Asn(64512));
        assert_eq!("1.10".parse::<Asn>().unwrap(), Asn(65546));
        assert!("4294967296".parse::<Asn>().is_err());
        assert!("1.65536".parse::<Asn>().is_err());
        assert_eq!(serde_json::from_str::<Asn>("64567").unwrap(), Asn(64567));
        assert_eq!(serde_json::to_string(&Asn(64567)).unwrap(), r#""64567""#);
    }

    #[test]
    fn go_floats_drop_integral_fractions() {
        #[derive(Serialize)]
        struct F {
            #[serde(serialize_with = "go_float")]
            a: f64,
            #[serde(serialize_with = "go_float")]
            b: f64,
        }
        let text = serde_json::to_string(&F {
            a: 100.0,
            b: 3600.5,
        })
        .unwrap();
        assert_eq!(text, r#"{"a":100,"b":3600.5}"#);
    }
}
