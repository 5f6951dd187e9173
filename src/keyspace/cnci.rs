//! A concentrator's desired edge state: its port forwards and floating IPs, under
//! `/tenet/v1/cnci/<id>/`, so that a restarted or replaced concentrator restores them (ciao
//! kept them in a BoltDB file inside the concentrator VM, lost with it).
//!
//! * `/tenet/v1/cnci/<id>/forward/<tcp|udp>-<port>` → [`PortForward`]
//! * `/tenet/v1/cnci/<id>/floating/<public ip>` → [`FloatingIp`]

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::TENET_ROOT;
use crate::calico::{escape_name, unescape_name};

/// A transport protocol a port forward carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(format!("unknown protocol '{s}' (want tcp or udp)")),
        }
    }
}

/// External port on the concentrator's uplink address → a workload's address and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    pub protocol: Protocol,
    pub external_port: u16,
    pub internal_ip: Ipv4Addr,
    pub internal_port: u16,
}

/// A public address on the uplink mapped 1:1 to a workload's private address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloatingIp {
    pub public_ip: Ipv4Addr,
    pub private_ip: Ipv4Addr,
}

/// Every key of one concentrator lives under this prefix.
pub fn prefix(cnci: &str) -> String {
    format!("{TENET_ROOT}cnci/{}/", escape_name(cnci))
}

pub fn forward_key(cnci: &str, protocol: Protocol, port: u16) -> String {
    format!("{}forward/{protocol}-{port}", prefix(cnci))
}

pub fn floating_key(cnci: &str, public: Ipv4Addr) -> String {
    format!("{}floating/{public}", prefix(cnci))
}

/// A key under `/tenet/v1/cnci/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CnciKey {
    Forward {
        cnci: String,
        protocol: Protocol,
        port: u16,
    },
    Floating {
        cnci: String,
        public: Ipv4Addr,
    },
}

impl CnciKey {
    /// Parses the part after `/tenet/v1/cnci/`.
    pub(super) fn parse(rest: &str) -> Result<Self, String> {
        match rest.split('/').collect::<Vec<_>>().as_slice() {
            [id, "forward", spec] if !id.is_empty() => {
                let (p, port) = spec
                    .split_once('-')
                    .ok_or_else(|| format!("forward key {spec} is not <protocol>-<port>"))?;
                Ok(CnciKey::Forward {
                    cnci: unescape_name(id),
                    protocol: p.parse()?,
                    port: port
                        .parse()
                        .map_err(|_| format!("'{port}' is not a port"))?,
                })
            }
            [id, "floating", ip] if !id.is_empty() => Ok(CnciKey::Floating {
                cnci: unescape_name(id),
                public: ip
                    .parse()
                    .map_err(|_| format!("'{ip}' is not an IPv4 address"))?,
            }),
            _ => Err("not a concentrator key".into()),
        }
    }
}

/// A decoded concentrator value, checked against its key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum CnciValue {
    Forward(PortForward),
    Floating(FloatingIp),
}

pub(super) fn decode(key: &CnciKey, raw: &[u8]) -> Result<CnciValue, String> {
    let bad = |e: serde_json::Error| format!("invalid JSON value: {e}");
    match key {
        CnciKey::Forward { protocol, port, .. } => {
            let v: PortForward = serde_json::from_slice(raw).map_err(bad)?;
            if v.protocol != *protocol || v.external_port != *port {
                return Err(format!(
                    "value is for {} {}, but stored at {protocol}-{port}",
                    v.protocol, v.external_port
                ));
            }
            Ok(CnciValue::Forward(v))
        }
        CnciKey::Floating { public, .. } => {
            let v: FloatingIp = serde_json::from_slice(raw).map_err(bad)?;
            if v.public_ip != *public {
                return Err(format!(
                    "value is for {}, but stored at {public}",
                    v.public_ip
                ));
            }
            Ok(CnciValue::Floating(v))
        }
    }
}
