//! `kind: hostEndpoint` ↔ `/calico/v1/host/<node>/endpoint/<name>` (§1.4, §4.3, §4.10).

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::FieldError;
use super::rule::{label_problems, name_problem};
use crate::calico::HostEndpoint;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostEndpointResource {
    pub kind: String,
    pub api_version: String,
    pub metadata: HepMetadata,
    #[serde(default)]
    pub spec: HepSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HepMetadata {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub node: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HepSpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub interface_name: String,
    #[serde(default, rename = "expectedIPs", skip_serializing_if = "Vec::is_empty")]
    pub expected_ips: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
}

impl HostEndpointResource {
    /// The first identifier missing, if any.
    pub fn missing(&self) -> Option<&'static str> {
        if self.metadata.node.is_empty() {
            Some("node")
        } else if self.metadata.name.is_empty() {
            Some("name")
        } else {
            None
        }
    }

    pub(super) fn problems(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        let m = &self.metadata;
        if let Some(reason) = name_problem(&m.name, true) {
            out.push(FieldError {
                field: "Name".into(),
                value: m.name.clone(),
                reason,
            });
        }
        if let Some(reason) = name_problem(&m.node, false) {
            out.push(FieldError {
                field: "Node".into(),
                value: m.node.clone(),
                reason,
            });
        }
        let iface = &self.spec.interface_name;
        if iface.is_empty() && self.spec.expected_ips.is_empty() {
            out.push(FieldError {
                field: "InterfaceName".into(),
                value: String::new(),
                reason: "a host endpoint needs an interfaceName or expectedIPs".into(),
            });
        }
        if !iface.is_empty()
            && (iface.len() > 15
                || !iface
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
        {
            out.push(FieldError {
                field: "InterfaceName".into(),
                value: iface.clone(),
                reason: "must be 1-15 characters of letters, digits, '_', '-'".into(),
            });
        }
        out.extend(label_problems(&m.labels, "Labels"));
        out
    }

    pub fn to_backend(&self) -> HostEndpoint {
        let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) =
            self.spec.expected_ips.iter().partition(|ip| ip.is_ipv4());
        HostEndpoint {
            name: (!self.spec.interface_name.is_empty()).then(|| self.spec.interface_name.clone()),
            expected_ipv4_addrs: v4,
            expected_ipv6_addrs: v6,
            labels: self.metadata.labels.clone(),
            profile_ids: self.spec.profiles.clone(),
        }
    }

    pub fn from_backend(node: &str, name: &str, h: &HostEndpoint) -> Self {
        HostEndpointResource {
            kind: "hostEndpoint".into(),
            api_version: "v1".into(),
            metadata: HepMetadata {
                name: name.into(),
                node: node.into(),
                labels: h.labels.clone(),
            },
            spec: HepSpec {
                interface_name: h.name.clone().unwrap_or_default(),
                expected_ips: h
                    .expected_ipv4_addrs
                    .iter()
                    .chain(&h.expected_ipv6_addrs)
                    .copied()
                    .collect(),
                profiles: h.profile_ids.clone(),
            },
        }
    }

    pub(super) fn cell(&self, heading: &str) -> Option<String> {
        Some(match heading {
            "NODE" => self.metadata.node.clone(),
            "NAME" => self.metadata.name.clone(),
            "INTERFACE" => self.spec.interface_name.clone(),
            "IPS" => self
                .spec
                .expected_ips
                .iter()
                .map(|ip| ip.to_string())
                .collect::<Vec<_>>()
                .join(","),
            "PROFILES" => self.spec.profiles.join(","),
            _ => return None,
        })
    }
}
