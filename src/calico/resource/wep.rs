//! `kind: workloadEndpoint` ↔ `/calico/v1/host/<node>/workload/<orch>/<workload>/endpoint/<name>`
//! (§1.3, §4.3, §4.10).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use super::FieldError;
use super::rule::{label_problems, name_problem};
use crate::calico::{IpNat, WorkloadEndpoint, WorkloadEndpointId};
use crate::types::MacAddr;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadEndpointResource {
    pub kind: String,
    pub api_version: String,
    pub metadata: WepMetadata,
    #[serde(default)]
    pub spec: WepSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WepMetadata {
    /// Given a random UUID on create when empty (calicoctl's rule).
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub workload: String,
    #[serde(default)]
    pub orchestrator: String,
    #[serde(default)]
    pub node: String,
    #[serde(
        default,
        rename = "activeInstanceID",
        skip_serializing_if = "String::is_empty"
    )]
    pub active_instance_id: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WepSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_networks: Vec<IpNetwork>,
    #[serde(default, rename = "ipNATs", skip_serializing_if = "Vec::is_empty")]
    pub ip_nats: Vec<ApiNat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub interface_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiNat {
    #[serde(rename = "internalIP")]
    pub internal_ip: IpAddr,
    #[serde(rename = "externalIP")]
    pub external_ip: IpAddr,
}

impl WorkloadEndpointResource {
    /// The key's identifiers; `None` names the first one missing.
    pub fn id(&self) -> Result<WorkloadEndpointId, &'static str> {
        let m = &self.metadata;
        for (value, field) in [
            (&m.node, "node"),
            (&m.orchestrator, "orchestrator"),
            (&m.workload, "workload"),
            (&m.name, "name"),
        ] {
            if value.is_empty() {
                return Err(field);
            }
        }
        Ok(WorkloadEndpointId {
            host: m.node.clone(),
            orchestrator: m.orchestrator.clone(),
            workload: m.workload.clone(),
            endpoint: m.name.clone(),
        })
    }

    pub(super) fn problems(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        let mut field = |name: &str, value: String, reason: String| {
            out.push(FieldError {
                field: name.into(),
                value,
                reason,
            })
        };
        let m = &self.metadata;
        for (value, name) in [
            (&m.name, "Name"),
            (&m.workload, "Workload"),
            (&m.orchestrator, "Orchestrator"),
            (&m.node, "Node"),
        ] {
            if !value.is_empty()
                && let Some(reason) = name_problem(value, name != "Node")
            {
                field(name, value.clone(), reason);
            }
        }
        let iface = &self.spec.interface_name;
        if !iface.is_empty()
            && (iface.len() > 15
                || !iface
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
        {
            field(
                "InterfaceName",
                iface.clone(),
                "must be 1-15 characters of letters, digits, '_', '-'".into(),
            );
        }
        for n in &self.spec.ip_networks {
            if n.prefix() != if n.is_ipv4() { 32 } else { 128 } {
                field(
                    "IPNetworks",
                    n.to_string(),
                    "IP network contains multiple addresses".into(),
                );
            }
        }
        for nat in &self.spec.ip_nats {
            if nat.internal_ip.is_ipv4() != nat.external_ip.is_ipv4() {
                field(
                    "IPNATs",
                    format!("{}<>{}", nat.internal_ip, nat.external_ip),
                    "internal and external IP versions differ".into(),
                );
            }
            if !self
                .spec
                .ip_networks
                .iter()
                .any(|n| n.ip() == nat.internal_ip)
            {
                field(
                    "IPNATs",
                    nat.internal_ip.to_string(),
                    "NAT internal IP is not one of the endpoint's IP networks".into(),
                );
            }
        }
        if let Some(mac) = self.spec.mac
            && let Err(why) = mac.check_unicast()
        {
            field("MAC", mac.to_string(), why.to_string());
        }
        out.extend(label_problems(&m.labels, "Labels"));
        out
    }

    /// The value libcalico-go v1 wrote.
    pub fn to_backend(&self) -> WorkloadEndpoint {
        let (v4, v6): (Vec<IpNetwork>, Vec<IpNetwork>) =
            self.spec.ip_networks.iter().partition(|n| n.is_ipv4());
        let nat = |v4: bool| {
            self.spec
                .ip_nats
                .iter()
                .filter(|n| n.internal_ip.is_ipv4() == v4)
                .map(|n| IpNat {
                    int_ip: n.internal_ip,
                    ext_ip: n.external_ip,
                })
                .collect()
        };
        WorkloadEndpoint {
            state: "active".into(),
            name: self.spec.interface_name.clone(),
            active_instance_id: self.metadata.active_instance_id.clone(),
            mac: self.spec.mac,
            profile_ids: self.spec.profiles.clone(),
            ipv4_nets: v4,
            ipv6_nets: v6,
            ipv4_nat: nat(true),
            ipv6_nat: nat(false),
            labels: self.metadata.labels.clone(),
            ipv4_gateway: self.spec.ipv4_gateway,
            ipv6_gateway: self.spec.ipv6_gateway,
        }
    }

    pub fn from_backend(id: &WorkloadEndpointId, e: &WorkloadEndpoint) -> Self {
        WorkloadEndpointResource {
            kind: "workloadEndpoint".into(),
            api_version: "v1".into(),
            metadata: WepMetadata {
                name: id.endpoint.clone(),
                workload: id.workload.clone(),
                orchestrator: id.orchestrator.clone(),
                node: id.host.clone(),
                active_instance_id: e.active_instance_id.clone(),
                labels: e.labels.clone(),
            },
            spec: WepSpec {
                ip_networks: e.ipv4_nets.iter().chain(&e.ipv6_nets).copied().collect(),
                ip_nats: e
                    .ipv4_nat
                    .iter()
                    .chain(&e.ipv6_nat)
                    .map(|n| ApiNat {
                        internal_ip: n.int_ip,
                        external_ip: n.ext_ip,
                    })
                    .collect(),
                ipv4_gateway: e.ipv4_gateway,
                ipv6_gateway: e.ipv6_gateway,
                profiles: e.profile_ids.clone(),
                interface_name: e.name.clone(),
                mac: e.mac,
            },
        }
    }

    pub(super) fn cell(&self, heading: &str) -> Option<String> {
        let m = &self.metadata;
        let s = &self.spec;
        let join = |v: Vec<String>| v.join(",");
        Some(match heading {
            "NODE" => m.node.clone(),
            "ORCHESTRATOR" => m.orchestrator.clone(),
            "WORKLOAD" => m.workload.clone(),
            "NAME" => m.name.clone(),
            "NETWORKS" => join(s.ip_networks.iter().map(|n| n.to_string()).collect()),
            "NATS" => join(
                s.ip_nats
                    .iter()
                    .map(|n| format!("{}<>{}", n.internal_ip, n.external_ip))
                    .collect(),
            ),
            "INTERFACE" => s.interface_name.clone(),
            "PROFILES" => join(s.profiles.clone()),
            // calicoctl's quirk: IPV6GATEWAY shows the IPv4 gateway.
            "IPV4GATEWAY" | "IPV6GATEWAY" => {
                s.ipv4_gateway.map(|g| g.to_string()).unwrap_or_default()
            }
            "MAC" => s.mac.map(|m| m.to_string()).unwrap_or_default(),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Resource, ResourceError};

    fn parse(yaml: &str) -> Resource {
        Resource::from_value(serde_saphyr::from_str(yaml).unwrap()).unwrap()
    }

    #[test]
    fn an_endpoint_becomes_calicos_value() {
        // calico-data-model.md §7.2: default.nginx-1 on node1.
        let r = parse(
            "apiVersion: v1\nkind: workloadEndpoint\nmetadata:\n  name: eth0\n  workload: default.nginx-1\n  orchestrator: k8s\n  node: node1\n  activeInstanceID: 9f86d081884c\n  labels: {app: nginx}\nspec:\n  ipNetworks: [192.168.12.1/32]\n  profiles: [k8s_ns.default]\n  interfaceName: cali7a8b9c0d1e2\n  mac: ee:ee:ee:ee:ee:ee\n",
        );
        r.validate().unwrap();
        let Resource::WorkloadEndpoint(w) = &r else {
            panic!()
        };
        assert_eq!(
            serde_json::to_string(&w.to_backend()).unwrap(),
            r#"{"state":"active","name":"cali7a8b9c0d1e2","active_instance_id":"9f86d081884c","mac":"ee:ee:ee:ee:ee:ee","profile_ids":["k8s_ns.default"],"ipv4_nets":["192.168.12.1/32"],"ipv6_nets":[],"labels":{"app":"nginx"}}"#
        );
        assert_eq!(
            r.id().to_string(),
            "WorkloadEndpoint(node=node1, orchestrator=k8s, workload=default.nginx-1, name=eth0)"
        );
        let back = super::WorkloadEndpointResource::from_backend(&w.id().unwrap(), &w.to_backend());
        assert_eq!(&back, w);
    }

    #[test]
    fn endpoint_checks() {
        let mut r = parse(
            "apiVersion: v1\nkind: workloadEndpoint\nmetadata: {workload: w, orchestrator: o, node: node1}\n",
        );
        assert!(matches!(
            r.validate(),
            Err(ResourceError::InsufficientIdentifiers("name"))
        ));
        r.fill_for_create();
        r.validate().unwrap();
        let e = parse("apiVersion: v1\nkind: workloadEndpoint\nmetadata: {name: e, workload: w, orchestrator: o}\n")
            .validate()
            .unwrap_err()
            .to_string();
        assert_eq!(e, "insufficient identifiers, missing 'node'");
        for (spec, want) in [
            (
                "{ipNetworks: [10.0.0.0/24]}",
                "IP network contains multiple addresses",
            ),
            (
                "{ipNetworks: [10.0.0.1/32], ipNATs: [{internalIP: 10.0.0.2, externalIP: 1.2.3.4}]}",
                "NAT internal IP is not one of",
            ),
            ("{interfaceName: much-too-long-a-name}", "InterfaceName"),
        ] {
            let e = parse(&format!(
                "apiVersion: v1\nkind: workloadEndpoint\nmetadata: {{name: e, workload: w, orchestrator: o, node: node1}}\nspec: {spec}\n"
            ))
            .validate()
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{spec}: {e}");
        }
    }
}
