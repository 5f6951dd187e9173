//! `kind: bgpPeer` ↔ `/calico/bgp/v1/global/peer_v4/<ip>` or
//! `/calico/bgp/v1/host/<node>/peer_v4/<ip>` (§1.12, §4.3, §4.10).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::FieldError;
use super::rule::name_problem;
use crate::calico::{Asn, BgpPeer, BgpScope};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BgpPeerResource {
    pub kind: String,
    pub api_version: String,
    pub metadata: BgpPeerMetadata,
    pub spec: BgpPeerSpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BgpPeerMetadata {
    /// `global` or `node`.
    pub scope: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(rename = "peerIP")]
    pub peer_ip: IpAddr,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BgpPeerSpec {
    pub as_number: Asn,
}

impl BgpPeerResource {
    /// Where the peer is kept; `Err` is calicoctl's complaint about the scope.
    pub fn scope(&self) -> Result<BgpScope, String> {
        match (self.metadata.scope.as_str(), self.metadata.node.as_str()) {
            ("global", "") => Ok(BgpScope::Global),
            ("global", _) => Err("node should not be specified for a global peer".into()),
            ("node", "") => Err("insufficient identifiers, missing 'node'".into()),
            ("node", n) => Ok(BgpScope::Host(n.into())),
            (other, _) => Err(format!(
                "Unrecognized scope '{other}', must be one of: global, node"
            )),
        }
    }

    pub(super) fn problems(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        if let Err(reason) = self.scope() {
            out.push(FieldError {
                field: "Scope".into(),
                value: self.metadata.scope.clone(),
                reason,
            });
        }
        if !self.metadata.node.is_empty()
            && let Some(reason) = name_problem(&self.metadata.node, false)
        {
            out.push(FieldError {
                field: "Node".into(),
                value: self.metadata.node.clone(),
                reason,
            });
        }
        out
    }

    pub fn to_backend(&self) -> BgpPeer {
        BgpPeer {
            ip: self.metadata.peer_ip,
            as_num: self.spec.as_number,
        }
    }

    pub fn from_backend(scope: &BgpScope, p: &BgpPeer) -> Self {
        let (scope, node) = match scope {
            BgpScope::Global => ("global", String::new()),
            BgpScope::Host(h) => ("node", h.clone()),
        };
        BgpPeerResource {
            kind: "bgpPeer".into(),
            api_version: "v1".into(),
            metadata: BgpPeerMetadata {
                scope: scope.into(),
                node,
                peer_ip: p.ip,
            },
            spec: BgpPeerSpec {
                as_number: p.as_num,
            },
        }
    }

    pub(super) fn cell(&self, heading: &str) -> Option<String> {
        Some(match heading {
            "SCOPE" => self.metadata.scope.clone(),
            "PEERIP" => self.metadata.peer_ip.to_string(),
            "NODE" => self.metadata.node.clone(),
            "ASN" => self.spec.as_number.to_string(),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Resource;

    #[test]
    fn peers_check_scope_node_and_asn() {
        let parse = |meta: &str, asn: &str| {
            Resource::from_value(
                serde_saphyr::from_str(&format!(
                    "apiVersion: v1\nkind: bgpPeer\nmetadata: {meta}\nspec: {{asNumber: {asn}}}\n"
                ))
                .unwrap(),
            )
        };
        let ok = parse(
            "{scope: node, node: rack1-host1, peerIP: 192.168.1.1}",
            "63400",
        )
        .unwrap();
        ok.validate().unwrap();
        assert_eq!(
            ok.id().to_string(),
            "BGPPeer(node=rack1-host1, ip=192.168.1.1)"
        );
        for (meta, want) in [
            (
                "{scope: planet, peerIP: 10.0.0.1}",
                "Unrecognized scope 'planet', must be one of: global, node",
            ),
            (
                "{scope: global, node: n1, peerIP: 10.0.0.1}",
                "node should not be specified",
            ),
            (
                "{scope: node, peerIP: 10.0.0.1}",
                "insufficient identifiers, missing 'node'",
            ),
        ] {
            let e = parse(meta, "1")
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{meta}: {e}");
        }
        let e = parse("{scope: global, peerIP: 10.0.0.1}", "4294967296")
            .unwrap_err()
            .to_string();
        assert!(e.contains("AS number"), "{e}");
        let e = parse("{scope: global, peerIP: 10.0.0.300}", "1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("error parsing bgpPeer"), "{e}");
    }
}
