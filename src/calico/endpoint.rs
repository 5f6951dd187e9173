//! Workload and host endpoint values, and the endpoint status Felix reports.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use super::scalar::null_as_default;
use crate::types::MacAddr;

/// `/calico/v1/host/<h>/workload/<o>/<w>/endpoint/<e>`. Field order is Go's struct order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "WorkloadEndpointWire")]
pub struct WorkloadEndpoint {
    /// `active` (admin up) or `inactive`.
    pub state: String,
    /// The host-side interface name; Felix treats an endpoint without one as deleted.
    pub name: String,
    /// Always written, possibly empty.
    pub active_instance_id: String,
    /// Written as `null` when unset.
    pub mac: Option<MacAddr>,
    pub profile_ids: Vec<String>,
    /// Written as `[]` when empty.
    pub ipv4_nets: Vec<IpNetwork>,
    pub ipv6_nets: Vec<IpNetwork>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ipv4_nat: Vec<IpNat>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ipv6_nat: Vec<IpNat>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv4_gateway: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6_gateway: Option<IpAddr>,
}

/// A 1:1 NAT of an endpoint address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpNat {
    pub int_ip: IpAddr,
    pub ext_ip: IpAddr,
}

/// What may be stored: Go's shape plus the Python era's single `profile_id`.
#[derive(Deserialize)]
struct WorkloadEndpointWire {
    #[serde(default)]
    state: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    active_instance_id: String,
    #[serde(default)]
    mac: Option<MacAddr>,
    #[serde(default, deserialize_with = "null_as_default")]
    profile_ids: Vec<String>,
    #[serde(default)]
    profile_id: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    ipv4_nets: Vec<IpNetwork>,
    #[serde(default, deserialize_with = "null_as_default")]
    ipv6_nets: Vec<IpNetwork>,
    #[serde(default, deserialize_with = "null_as_default")]
    ipv4_nat: Vec<IpNat>,
    #[serde(default, deserialize_with = "null_as_default")]
    ipv6_nat: Vec<IpNat>,
    #[serde(default, deserialize_with = "null_as_default")]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    ipv4_gateway: Option<IpAddr>,
    #[serde(default)]
    ipv6_gateway: Option<IpAddr>,
}

impl From<WorkloadEndpointWire> for WorkloadEndpoint {
    fn from(w: WorkloadEndpointWire) -> Self {
        let mut profile_ids = w.profile_ids;
        if profile_ids.is_empty() {
            profile_ids.extend(w.profile_id.filter(|p| !p.is_empty()));
        }
        WorkloadEndpoint {
            state: w.state,
            name: w.name,
            active_instance_id: w.active_instance_id,
            mac: w.mac,
            profile_ids,
            ipv4_nets: w.ipv4_nets,
            ipv6_nets: w.ipv6_nets,
            ipv4_nat: w.ipv4_nat,
            ipv6_nat: w.ipv6_nat,
            labels: w.labels,
            ipv4_gateway: w.ipv4_gateway,
            ipv6_gateway: w.ipv6_gateway,
        }
    }
}

impl WorkloadEndpoint {
    /// Problems Felix would trip over; an empty list means the value is usable.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.name.is_empty() {
            out.push("missing interface name (Felix treats the endpoint as deleted)".into());
        }
        if !matches!(self.state.as_str(), "active" | "inactive") {
            out.push(format!(
                "state '{}' is neither active nor inactive",
                self.state
            ));
        }
        for (nets, v4) in [(&self.ipv4_nets, true), (&self.ipv6_nets, false)] {
            for net in nets {
                if net.is_ipv4() != v4 {
                    out.push(format!("{net} is in the wrong address family list"));
                }
            }
        }
        for nat in self.ipv4_nat.iter().chain(&self.ipv6_nat) {
            let inside = self
                .ipv4_nets
                .iter()
                .chain(&self.ipv6_nets)
                .any(|n| n.contains(nat.int_ip));
            if !inside {
                out.push(format!(
                    "NAT internal IP {} is not one of the endpoint's nets",
                    nat.int_ip
                ));
            }
        }
        out
    }
}

/// `/calico/v1/host/<h>/endpoint/<e>`: every field optional (omitempty).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEndpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub expected_ipv4_addrs: Vec<IpAddr>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub expected_ipv6_addrs: Vec<IpAddr>,
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub labels: BTreeMap<String, String>,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub profile_ids: Vec<String>,
}

impl HostEndpoint {
    pub fn problems(&self) -> Vec<String> {
        let no_name = self.name.as_deref().is_none_or(str::is_empty);
        if no_name && self.expected_ipv4_addrs.is_empty() && self.expected_ipv6_addrs.is_empty() {
            vec!["neither an interface name nor an expected IP".into()]
        } else {
            Vec::new()
        }
    }
}

/// `{"status":"up"|"down"|"error"}` under `/calico/felix/v1/host/<h>/...`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    pub status: EndpointState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointState {
    Up,
    Down,
    Error,
}

/// One entry of `/calico/v1/host/<h>/orchestrator_refs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrchestratorRef {
    pub orchestrator: String,
    #[serde(rename = "nodeName", default, skip_serializing_if = "String::is_empty")]
    pub node_name: String,
}
