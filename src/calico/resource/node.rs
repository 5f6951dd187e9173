//! `kind: node`: a composite of several keys (§1.10) — the host's `metadata` (its existence),
//! its BGP addresses, networks and AS number for confd, `bird_ip`, and orchestrator refs.

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use super::FieldError;
use super::rule::name_problem;
use crate::calico::{Asn, OrchestratorRef};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeResource {
    pub kind: String,
    pub api_version: String,
    pub metadata: NodeMetadata,
    #[serde(default)]
    pub spec: NodeSpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeMetadata {
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeSpec {
    /// Omitted: a policy-only node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<NodeBgp>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orch_refs: Vec<OrchestratorRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeBgp {
    /// Omitted: the global AS number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<Asn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<IpNetwork>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_address: Option<IpNetwork>,
}

impl NodeResource {
    pub(super) fn problems(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        if let Some(reason) = name_problem(&self.metadata.name, false) {
            out.push(FieldError {
                field: "Name".into(),
                value: self.metadata.name.clone(),
                reason,
            });
        }
        if let Some(bgp) = &self.spec.bgp {
            if bgp.ipv4_address.is_none() && bgp.ipv6_address.is_none() {
                out.push(FieldError {
                    field: "BGP".into(),
                    value: String::new(),
                    reason: "a BGP spec needs an ipv4Address or an ipv6Address".into(),
                });
            }
            for (addr, v4, name) in [
                (bgp.ipv4_address, true, "IPv4Address"),
                (bgp.ipv6_address, false, "IPv6Address"),
            ] {
                if let Some(a) = addr
                    && a.is_ipv4() != v4
                {
                    out.push(FieldError {
                        field: name.into(),
                        value: a.to_string(),
                        reason: format!("not an IPv{} address", if v4 { 4 } else { 6 }),
                    });
                }
            }
        }
        out
    }

    /// The keys a node is written as: (key, value) to put, and keys to delete.
    pub fn writes(&self) -> (Vec<(String, Vec<u8>)>, Vec<String>) {
        use crate::calico::{BgpHostField as F, CalicoKey as K};
        let h = self.metadata.name.clone();
        let bgp_key = |field| {
            K::BgpHost {
                host: h.clone(),
                field,
            }
            .path()
        };
        let mut put = vec![(K::HostMetadata { host: h.clone() }.path(), b"{}".to_vec())];
        let mut delete = Vec::new();
        let bgp = self.spec.bgp.clone().unwrap_or_default();
        // confd expects both addresses, empty when unset.
        put.push((
            bgp_key(F::IpAddrV4),
            bgp.ipv4_address
                .map(|a| a.ip().to_string())
                .unwrap_or_default()
                .into_bytes(),
        ));
        put.push((
            bgp_key(F::IpAddrV6),
            bgp.ipv6_address
                .map(|a| a.ip().to_string())
                .unwrap_or_default()
                .into_bytes(),
        ));
        let bird_ip = K::HostBirdIp { host: h.clone() }.path();
        match bgp.ipv4_address {
            Some(a) => put.push((bird_ip, a.ip().to_string().into_bytes())),
            None => delete.push(bird_ip),
        }
        let network = |a: IpNetwork| {
            IpNetwork::new(a.network(), a.prefix())
                .expect("same prefix")
                .to_string()
        };
        for (field, value) in [
            (F::NetworkV4, bgp.ipv4_address.map(network)),
            (F::NetworkV6, bgp.ipv6_address.map(network)),
            (F::AsNum, bgp.as_number.map(|a| a.0.to_string())),
        ] {
            match value {
                Some(v) => put.push((bgp_key(field), v.into_bytes())),
                None => delete.push(bgp_key(field)),
            }
        }
        let refs = K::HostOrchestratorRefs { host: h.clone() }.path();
        if self.spec.orch_refs.is_empty() {
            delete.push(refs);
        } else {
            put.push((
                refs,
                serde_json::to_vec(&self.spec.orch_refs).expect("refs serialise"),
            ));
        }
        (put, delete)
    }

    /// A node read back from its keys (`None` values: absent or empty).
    pub fn from_parts(
        name: &str,
        ip4: Option<std::net::IpAddr>,
        net4: Option<IpNetwork>,
        ip6: Option<std::net::IpAddr>,
        net6: Option<IpNetwork>,
        asn: Option<Asn>,
        orch_refs: Vec<OrchestratorRef>,
    ) -> Self {
        // An address without its network reads back as a single address.
        let with_prefix = |ip: std::net::IpAddr, net: Option<IpNetwork>| {
            let prefix = net.map_or(if ip.is_ipv4() { 32 } else { 128 }, |n| n.prefix());
            IpNetwork::new(ip, prefix).expect("a valid prefix")
        };
        let v4 = ip4.map(|ip| with_prefix(ip, net4));
        let v6 = ip6.map(|ip| with_prefix(ip, net6));
        NodeResource {
            kind: "node".into(),
            api_version: "v1".into(),
            metadata: NodeMetadata { name: name.into() },
            spec: NodeSpec {
                bgp: (v4.is_some() || v6.is_some()).then_some(NodeBgp {
                    as_number: asn,
                    ipv4_address: v4,
                    ipv6_address: v6,
                }),
                orch_refs,
            },
        }
    }

    /// `global_asn` fills calicoctl's `(64512)` for an inherited AS number.
    pub(super) fn cell(&self, heading: &str, global_asn: Option<Asn>) -> Option<String> {
        let bgp = self.spec.bgp.as_ref();
        Some(match heading {
            "NAME" => self.metadata.name.clone(),
            "ASN" => match bgp {
                None => String::new(),
                Some(b) => match b.as_number {
                    Some(a) => a.to_string(),
                    None => format!(
                        "({})",
                        global_asn.unwrap_or(crate::calico::DEFAULT_AS_NUMBER)
                    ),
                },
            },
            "IPV4" => bgp
                .and_then(|b| b.ipv4_address)
                .map(|a| a.to_string())
                .unwrap_or_default(),
            "IPV6" => bgp
                .and_then(|b| b.ipv6_address)
                .map(|a| a.to_string())
                .unwrap_or_default(),
            _ => return None,
        })
    }
}
