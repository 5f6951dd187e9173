//! A concentrator's desired edge state: its port forwards and floating IPs, under
//! `/tenet/v1/cnci/<id>/`, so that a restarted or replaced concentrator restores them (ciao
//! kept them in a BoltDB file inside the concentrator VM, lost with it).
//!
//! * `/tenet/v1/cnci/<id>/forward/<tcp|udp>-<port>` → [`PortForward`]
//! * `/tenet/v1/cnci/<id>/floating/<public ip>` → [`FloatingIp`]
//! * `/tenet/v1/cnci/<id>/mesh` → [`Mesh`] (the tenant's concentrators, ciao's RefreshCNCI)
//! * `/tenet/v1/cnci/<id>/attach/<subnet>/<cn ip>` → [`Attachment`] (a TenantAdded in force)

use std::fmt;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
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

/// A compute node's tunnel for a tenant subnet, as attached (TenantAdded's fields).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    pub tenant: String,
    pub subnet: Ipv4Network,
    pub subnet_key: u32,
    pub cn_id: String,
    pub cn_ip: Ipv4Addr,
}

pub fn attach_key(cnci: &str, subnet: &Ipv4Network, cn_ip: Ipv4Addr) -> String {
    format!("{}{cn_ip}", attach_subnet_prefix(cnci, subnet))
}

/// Every attachment of one subnet.
pub fn attach_subnet_prefix(cnci: &str, subnet: &Ipv4Network) -> String {
    format!(
        "{}attach/{}-{}/",
        prefix(cnci),
        subnet.network(),
        subnet.prefix()
    )
}

/// One concentrator of a tenant's mesh.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshPeer {
    /// The concentrator's id.
    pub id: String,
    /// Where its tunnels end.
    pub underlay_ip: Ipv4Addr,
    /// Its address inside the mesh (from the mesh CIDR).
    pub mesh_ip: Ipv4Addr,
    /// The tenant subnets it serves.
    pub subnets: Vec<Ipv4Network>,
}

/// A tenant's L3 mesh between its concentrators: every concentrator of the tenant, itself
/// included, and the CIDR their mesh addresses come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mesh {
    pub cidr: Ipv4Network,
    pub peers: Vec<MeshPeer>,
}

/// Mesh addresses for `ids`: an id keeps the address it had in `existing` (so a change of
/// the list does not renumber the others), a new one gets the lowest free host address of
/// `cidr`. Errors when `cidr` has too few.
pub fn assign_mesh_addresses(
    cidr: &Ipv4Network,
    existing: &std::collections::BTreeMap<String, Ipv4Addr>,
    ids: &[String],
) -> Result<std::collections::BTreeMap<String, Ipv4Addr>, String> {
    let hosts = (1u64 << (32 - cidr.prefix())).saturating_sub(2);
    if (ids.len() as u64) > hosts {
        return Err(format!(
            "mesh CIDR {cidr} has {hosts} addresses for {} concentrators",
            ids.len()
        ));
    }
    let mut out = std::collections::BTreeMap::new();
    for id in ids {
        if let Some(ip) = existing.get(id).filter(|ip| cidr.contains(**ip)) {
            out.insert(id.clone(), *ip);
        }
    }
    let first = u32::from(cidr.network()) + 1;
    for id in ids {
        if out.contains_key(id) {
            continue;
        }
        let free = (0..hosts as u32)
            .map(|i| Ipv4Addr::from(first + i))
            .find(|ip| !out.values().any(|v| v == ip))
            .ok_or_else(|| format!("mesh CIDR {cidr} is full"))?;
        out.insert(id.clone(), free);
    }
    Ok(out)
}

pub fn mesh_key(cnci: &str) -> String {
    format!("{}mesh", prefix(cnci))
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
    Mesh {
        cnci: String,
    },
    Attach {
        cnci: String,
        subnet: Ipv4Network,
        cn_ip: Ipv4Addr,
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
            [id, "attach", net, ip] if !id.is_empty() => {
                let (addr, len) = net
                    .split_once('-')
                    .ok_or_else(|| format!("'{net}' is not <network>-<prefix>"))?;
                let subnet = Ipv4Network::new(
                    addr.parse()
                        .map_err(|_| format!("'{addr}' is not an address"))?,
                    len.parse()
                        .map_err(|_| format!("'{len}' is not a prefix"))?,
                )
                .map_err(|e| e.to_string())?;
                Ok(CnciKey::Attach {
                    cnci: unescape_name(id),
                    subnet,
                    cn_ip: ip
                        .parse()
                        .map_err(|_| format!("'{ip}' is not an IPv4 address"))?,
                })
            }
            [id, "mesh"] if !id.is_empty() => Ok(CnciKey::Mesh {
                cnci: unescape_name(id),
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
    Mesh(Mesh),
    Attach(Attachment),
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
        CnciKey::Mesh { .. } => serde_json::from_slice(raw)
            .map(CnciValue::Mesh)
            .map_err(bad),
        CnciKey::Attach { subnet, cn_ip, .. } => {
            let v: Attachment = serde_json::from_slice(raw).map_err(bad)?;
            if v.subnet != *subnet || v.cn_ip != *cn_ip {
                return Err(format!(
                    "value is for {} from {}, but stored at {subnet} from {cn_ip}",
                    v.subnet, v.cn_ip
                ));
            }
            Ok(CnciValue::Attach(v))
        }
    }
}
