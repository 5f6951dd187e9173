//! tenet's own keyspace in etcd, under `/tenet/v1/` next to Calico's keys (`calico::keys`).
//!
//! A tenant subnet lives at `/tenet/v1/tenant/<tenant>/subnet/<cidrkey>` and records which
//! concentrator serves it, its tunnel key and the networking mode. A concentrator's edge state
//! (port forwards, floating IPs) lives under `/tenet/v1/cnci/<id>/` ([`cnci`]); a running
//! agent's status under `/tenet/v1/node/<uuid>`, on a lease ([`node`]); Docker's networks under
//! `/tenet/v1/docker/network/<id>` ([`docker`]).

pub mod cnci;
pub mod docker;
pub mod node;

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnetwork::{IpNetwork, Ipv4Network};
use serde::{Deserialize, Serialize};

use crate::calico::{canonical, cidr_key, escape_name, parse_cidr_key, unescape_name};

pub const TENET_ROOT: &str = "/tenet/v1/";

/// How a tenant subnet reaches its concentrator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Overlay over GRE (default).
    #[default]
    Gre,
    /// The same overlay over VXLAN, for underlays that drop IP protocol 47.
    Vxlan,
    /// No overlay: per-workload routes distributed by BGP.
    Routed,
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NetworkMode::Gre => "gre",
            NetworkMode::Vxlan => "vxlan",
            NetworkMode::Routed => "routed",
        })
    }
}

impl FromStr for NetworkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "gre" => Ok(NetworkMode::Gre),
            "vxlan" => Ok(NetworkMode::Vxlan),
            "routed" => Ok(NetworkMode::Routed),
            _ => Err(format!("unknown mode '{s}' (want gre, vxlan or routed)")),
        }
    }
}

/// ciao's tunnel key for a subnet: the network address read as a little-endian u32
/// (172.16.0.0 → 4268). Key 0 (network 0.0.0.0) is invalid.
pub fn subnet_key(subnet: &Ipv4Network) -> Result<u32, String> {
    crate::types::TunnelKey::from_subnet(subnet).map(|k| k.get())
}

/// The key of one tenant subnet.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantSubnetKey {
    pub tenant: String,
    pub subnet: Ipv4Network,
}

impl TenantSubnetKey {
    pub fn path(&self) -> String {
        format!(
            "{TENET_ROOT}tenant/{}/subnet/{}",
            escape_name(&self.tenant),
            cidr_key(&IpNetwork::V4(self.subnet))
        )
    }

    /// Every subnet of one tenant lives under this prefix.
    pub fn tenant_prefix(tenant: &str) -> String {
        format!("{TENET_ROOT}tenant/{}/subnet/", escape_name(tenant))
    }

    pub fn parse(path: &str) -> Result<Self, String> {
        let rest = path
            .strip_prefix(TENET_ROOT)
            .ok_or_else(|| format!("not under {TENET_ROOT}"))?;
        match rest.split('/').collect::<Vec<_>>().as_slice() {
            ["tenant", tenant, "subnet", cidr] if !tenant.is_empty() => {
                let IpNetwork::V4(subnet) = parse_cidr_key(cidr)? else {
                    return Err(format!("tenant subnet {cidr} is not IPv4"));
                };
                Ok(TenantSubnetKey {
                    tenant: unescape_name(tenant),
                    subnet,
                })
            }
            _ => Err("not a tenet key".into()),
        }
    }
}

/// The value of a tenant subnet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSubnet {
    pub tenant: String,
    pub subnet: Ipv4Network,
    /// UUID of the concentrator (CNCI) serving the subnet.
    pub concentrator_id: String,
    /// The concentrator's underlay address: the far end of every tunnel of this subnet.
    pub concentrator_ip: IpAddr,
    pub subnet_key: u32,
    #[serde(default)]
    pub mode: NetworkMode,
}

impl TenantSubnet {
    pub fn key(&self) -> TenantSubnetKey {
        TenantSubnetKey {
            tenant: self.tenant.clone(),
            subnet: self.subnet,
        }
    }

    /// Checks the fields against each other and against the key it is stored at.
    pub fn validate(&self, key: Option<&TenantSubnetKey>) -> Result<(), String> {
        if self.tenant.is_empty() {
            return Err("tenant is empty".into());
        }
        if self.concentrator_id.is_empty() {
            return Err("concentrator_id is empty".into());
        }
        canonical(IpNetwork::V4(self.subnet))?;
        let want = subnet_key(&self.subnet)?;
        if self.subnet_key != want {
            return Err(format!(
                "subnet_key {} does not match subnet {} (want {want})",
                self.subnet_key, self.subnet
            ));
        }
        if let Some(key) = key
            && *key != self.key()
        {
            return Err(format!(
                "value is for tenant {} subnet {}, but stored at {}",
                self.tenant,
                self.subnet,
                key.path()
            ));
        }
        Ok(())
    }
}

/// A decoded value stored under `/tenet/v1/`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TenetValue {
    TenantSubnet(TenantSubnet),
    Cnci(cnci::CnciValue),
    Node(node::NodeStatus),
    DockerNetwork(docker::DockerNetwork),
}

impl TenetValue {
    /// What kind of value this is, for `tenet dump`.
    pub fn kind(&self) -> &'static str {
        match self {
            TenetValue::TenantSubnet(_) => "TenantSubnet",
            TenetValue::Cnci(cnci::CnciValue::Forward(_)) => "PortForward",
            TenetValue::Cnci(cnci::CnciValue::Floating(_)) => "FloatingIp",
            TenetValue::Cnci(cnci::CnciValue::Mesh(_)) => "Mesh",
            TenetValue::Cnci(cnci::CnciValue::Attach(_)) => "Attachment",
            TenetValue::Node(_) => "NodeStatus",
            TenetValue::DockerNetwork(_) => "DockerNetwork",
        }
    }
}

/// Decodes and validates a value stored under `/tenet/v1/`.
pub fn decode(path: &str, raw: &[u8]) -> Result<TenetValue, String> {
    if path.starts_with(&node::prefix()) {
        return node::decode(path, raw).map(TenetValue::Node);
    }
    if path.starts_with(&docker::network_prefix()) {
        return docker::decode(path, raw).map(TenetValue::DockerNetwork);
    }
    if let Some(rest) = path.strip_prefix(&format!("{TENET_ROOT}cnci/")) {
        let key = cnci::CnciKey::parse(rest)?;
        return cnci::decode(&key, raw).map(TenetValue::Cnci);
    }
    let key = TenantSubnetKey::parse(path)?;
    let subnet: TenantSubnet =
        serde_json::from_slice(raw).map_err(|e| format!("invalid JSON value: {e}"))?;
    subnet.validate(Some(&key))?;
    Ok(TenetValue::TenantSubnet(subnet))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn subnet_key_is_little_endian_network_address() {
        assert_eq!(subnet_key(&net("172.16.0.0/16")).unwrap(), 4268);
        assert_eq!(subnet_key(&net("10.0.1.0/24")).unwrap(), 0x0001_000a);
        assert!(subnet_key(&net("0.0.0.0/0")).is_err());
    }

    #[test]
    fn tenant_subnet_roundtrip_and_validation() {
        let value = TenantSubnet {
            tenant: "acme/eu".into(),
            subnet: net("172.16.0.0/24"),
            concentrator_id: "0f1e2d3c-0000-4000-8000-000000000001".into(),
            concentrator_ip: "10.99.0.2".parse().unwrap(),
            subnet_key: 4268,
            mode: NetworkMode::Gre,
        };
        let path = value.key().path();
        assert_eq!(path, "/tenet/v1/tenant/acme%2feu/subnet/172.16.0.0-24");
        let raw = serde_json::to_vec(&value).unwrap();
        assert_eq!(
            decode(&path, &raw).unwrap(),
            TenetValue::TenantSubnet(value.clone())
        );

        let wrong_key = TenantSubnet {
            subnet_key: 1,
            ..value.clone()
        };
        let err = decode(&path, &serde_json::to_vec(&wrong_key).unwrap()).unwrap_err();
        assert!(err.contains("does not match subnet"), "{err}");
        let moved = decode("/tenet/v1/tenant/other/subnet/172.16.0.0-24", &raw).unwrap_err();
        assert!(moved.contains("stored at"), "{moved}");
        assert!(
            decode(&path, b"{\"tenant\":1}")
                .unwrap_err()
                .contains("invalid JSON")
        );
        let mode: Result<NetworkMode, _> = "ipip".parse();
        assert!(mode.is_err());
    }

    #[test]
    fn concentrator_edge_state_round_trips_and_is_checked_against_its_key() {
        use cnci::{FloatingIp, PortForward, Protocol};
        let fwd = PortForward {
            protocol: Protocol::Udp,
            external_port: 5353,
            internal_ip: "172.16.0.5".parse().unwrap(),
            internal_port: 53,
        };
        let key = cnci::forward_key("c/1", Protocol::Udp, 5353);
        assert_eq!(key, "/tenet/v1/cnci/c%2f1/forward/udp-5353");
        let raw = serde_json::to_vec(&fwd).unwrap();
        let got = decode(&key, &raw).unwrap();
        assert_eq!(got.kind(), "PortForward");
        let moved = decode(&cnci::forward_key("c1", Protocol::Tcp, 5353), &raw).unwrap_err();
        assert!(moved.contains("stored at"), "{moved}");
        let fip = FloatingIp {
            public_ip: "192.0.2.50".parse().unwrap(),
            private_ip: "172.16.0.5".parse().unwrap(),
        };
        let key = cnci::floating_key("c1", fip.public_ip);
        assert_eq!(
            decode(&key, &serde_json::to_vec(&fip).unwrap())
                .unwrap()
                .kind(),
            "FloatingIp"
        );
        assert!(decode("/tenet/v1/cnci/c1/forward/sctp-1", b"{}").is_err());

        // Mesh addresses stay where they were; new concentrators take the free ones.
        let cidr: Ipv4Network = "10.99.0.0/29".parse().unwrap();
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a =
            cnci::assign_mesh_addresses(&cidr, &Default::default(), &ids(&["c1", "c2"])).unwrap();
        assert_eq!(a["c1"].to_string(), "10.99.0.1");
        let b = cnci::assign_mesh_addresses(&cidr, &a, &ids(&["c2", "c3"])).unwrap();
        assert_eq!(b["c2"], a["c2"]);
        assert_eq!(
            b["c3"].to_string(),
            "10.99.0.1",
            "c1's address is free again"
        );
        let full = ids(&["a", "b", "c", "d", "e", "f", "g"]);
        assert!(
            cnci::assign_mesh_addresses(&cidr, &Default::default(), &full)
                .unwrap_err()
                .contains("6 addresses")
        );
    }
}
