//! calicoctl's v1 API resources (reference: calico-data-model.md §4.3–4.5): the documents
//! operators write (`apiVersion: v1`, `kind`, `metadata`, `spec`), validated as calicoctl
//! validated them, mapped onto the same etcd keys and values libcalico-go v1 wrote, and the
//! create / replace / apply / delete / list semantics with calicoctl's error texts.
//!
//! Every v1 kind: ipPool, policy, profile, workloadEndpoint, hostEndpoint, bgpPeer and node,
//! each a module with the API type, its checks, and the mapping to and from the backend values.

mod bgppeer;
mod client;
mod hep;
mod ippool;
mod node;
mod policy;
mod profile;
mod rule;
mod wep;

pub use bgppeer::{BgpPeerResource, BgpPeerSpec};
pub use client::{Identifiers, ResourceClient, parse_pool_name};
pub use hep::{HepSpec, HostEndpointResource};
pub use ippool::{IpPoolResource, IpPoolSpec, IpipSpec};
pub use node::{NodeBgp, NodeResource, NodeSpec};
pub use policy::{PolicyResource, PolicySpec};
pub use profile::{ProfileResource, ProfileSpec};
pub use rule::{ApiRule, EntityRule, IcmpFields};
pub use wep::{ApiNat, WepMetadata, WepSpec, WorkloadEndpointResource};

use std::fmt;

use serde_json::Value;

/// The resource kinds, with calicoctl's names and CLI aliases.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    IpPool,
    Policy,
    Profile,
    WorkloadEndpoint,
    HostEndpoint,
    BgpPeer,
    Node,
}

impl ResourceKind {
    /// The `kind` written in files (case-sensitive there).
    pub fn name(self) -> &'static str {
        match self {
            ResourceKind::IpPool => "ipPool",
            ResourceKind::Policy => "policy",
            ResourceKind::Profile => "profile",
            ResourceKind::WorkloadEndpoint => "workloadEndpoint",
            ResourceKind::HostEndpoint => "hostEndpoint",
            ResourceKind::BgpPeer => "bgpPeer",
            ResourceKind::Node => "node",
        }
    }

    /// A CLI kind (`get`/`delete <KIND>`), case-insensitive, with calicoctl's aliases.
    pub fn from_alias(alias: &str) -> Option<Self> {
        match alias.to_ascii_lowercase().as_str() {
            "ippool" | "ippools" | "ipp" | "ipps" | "pool" | "pools" => Some(ResourceKind::IpPool),
            "policy" | "policies" | "pol" | "pols" => Some(ResourceKind::Policy),
            "profile" | "profiles" | "pro" | "pros" => Some(ResourceKind::Profile),
            "workloadendpoint" | "workloadendpoints" | "wep" | "weps" => {
                Some(ResourceKind::WorkloadEndpoint)
            }
            "hostendpoint" | "hostendpoints" | "hep" | "heps" => Some(ResourceKind::HostEndpoint),
            "bgppeer" | "bgppeers" | "bgpp" | "bgpps" | "bp" | "bps" => Some(ResourceKind::BgpPeer),
            "node" | "nodes" | "no" | "nos" => Some(ResourceKind::Node),
            _ => None,
        }
    }
}

/// One resource of any kind.
#[derive(Clone, Debug, PartialEq)]
pub enum Resource {
    IpPool(IpPoolResource),
    Policy(PolicyResource),
    Profile(ProfileResource),
    WorkloadEndpoint(WorkloadEndpointResource),
    HostEndpoint(HostEndpointResource),
    BgpPeer(BgpPeerResource),
    Node(NodeResource),
}

/// What names a resource: calicoctl's display form, e.g. `IPPool(cidr=10.0.0.0/16)`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ResourceId {
    IpPool(ipnetwork::IpNetwork),
    Policy(String),
    Profile(String),
    WorkloadEndpoint(crate::calico::WorkloadEndpointId),
    HostEndpoint { node: String, name: String },
    BgpPeer(crate::calico::BgpScope, std::net::IpAddr),
    Node(String),
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResourceId::IpPool(cidr) => write!(f, "IPPool(cidr={cidr})"),
            ResourceId::Policy(name) => write!(f, "Policy(name={name})"),
            ResourceId::Profile(name) => write!(f, "Profile(name={name})"),
            ResourceId::WorkloadEndpoint(id) => write!(
                f,
                "WorkloadEndpoint(node={}, orchestrator={}, workload={}, name={})",
                id.host, id.orchestrator, id.workload, id.endpoint
            ),
            ResourceId::HostEndpoint { node, name } => {
                write!(f, "HostEndpoint(node={node}, name={name})")
            }
            ResourceId::BgpPeer(crate::calico::BgpScope::Global, ip) => {
                write!(f, "BGPPeer(global, ip={ip})")
            }
            ResourceId::BgpPeer(crate::calico::BgpScope::Host(node), ip) => {
                write!(f, "BGPPeer(node={node}, ip={ip})")
            }
            ResourceId::Node(name) => write!(f, "Node(name={name})"),
        }
    }
}

/// calicoctl's library errors, worded as it worded them.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("resource already exists: {0}")]
    AlreadyExists(ResourceId),
    #[error("resource does not exist: {0}")]
    DoesNotExist(ResourceId),
    #[error("update conflict: '{0}'")]
    UpdateConflict(String),
    #[error("insufficient identifiers, missing '{0}'")]
    InsufficientIdentifiers(&'static str),
    /// One field: `error with field CIDR = '…' (reason)`.
    #[error("{}", validation_text(.0))]
    Validation(Vec<FieldError>),
    /// The document is not a resource this version reads.
    #[error("{0}")]
    Invalid(String),
    #[error("datastore: {0}")]
    Store(#[from] crate::store::StoreError),
    /// A value in etcd that does not decode.
    #[error("the value at {key} does not decode: {reason}")]
    Corrupt { key: String, reason: String },
}

/// A field that failed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub value: String,
    pub reason: String,
}

fn validation_text(errors: &[FieldError]) -> String {
    match errors {
        [one] => format!(
            "error with field {} = '{}' ({})",
            one.field, one.value, one.reason
        ),
        many => {
            let mut s = String::from("error with the following fields:");
            for e in many {
                s.push_str(&format!("\n-  {} = '{}' ({})", e.field, e.value, e.reason));
            }
            s
        }
    }
}

/// Serialises as the document itself (calicoctl's JSON field order).
impl serde::Serialize for Resource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Resource::IpPool(p) => p.serialize(s),
            Resource::Policy(p) => p.serialize(s),
            Resource::Profile(p) => p.serialize(s),
            Resource::WorkloadEndpoint(p) => p.serialize(s),
            Resource::HostEndpoint(p) => p.serialize(s),
            Resource::BgpPeer(p) => p.serialize(s),
            Resource::Node(p) => p.serialize(s),
        }
    }
}

impl Resource {
    /// What calicoctl's create filled in: a workload endpoint without a name gets a random
    /// UUID.
    pub fn fill_for_create(&mut self) {
        if let Resource::WorkloadEndpoint(w) = self
            && w.metadata.name.is_empty()
        {
            w.metadata.name = uuid::Uuid::new_v4().to_string();
        }
    }

    /// A document (already parsed from YAML or JSON) as a resource: `apiVersion: v1` and a
    /// known `kind` (case-sensitive, as in calicoctl files); unknown fields are refused.
    pub fn from_value(v: Value) -> Result<Resource, ResourceError> {
        let version = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        if version != "v1" {
            return Err(ResourceError::Invalid(format!(
                "unknown APIVersion '{version}'"
            )));
        }
        let kind = v
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let parse_error =
            |e: serde_json::Error| ResourceError::Invalid(format!("error parsing {kind}: {e}"));
        match kind.as_str() {
            "ipPool" => Ok(Resource::IpPool(
                serde_json::from_value(v).map_err(parse_error)?,
            )),
            "policy" => Ok(Resource::Policy(
                serde_json::from_value(v).map_err(parse_error)?,
            )),
            "profile" => Ok(Resource::Profile(
                serde_json::from_value(v).map_err(parse_error)?,
            )),
            "workloadEndpoint" => Ok(Resource::WorkloadEndpoint(
                serde_json::from_value(v).map_err(parse_error)?,
            )),
            "hostEndpoint" => Ok(Resource::HostEndpoint(
                serde_json::from_value(v).map_err(parse_error)?,
            )),
            "bgpPeer" => Ok(Resource::BgpPeer(
                serde_json::from_value(v).map_err(parse_error)?,
            )),
            "node" => Ok(Resource::Node(
                serde_json::from_value(v).map_err(parse_error)?,
            )),
            other => Err(ResourceError::Invalid(format!(
                "resource type '{other}' is not supported"
            ))),
        }
    }

    pub fn kind(&self) -> ResourceKind {
        match self {
            Resource::IpPool(_) => ResourceKind::IpPool,
            Resource::Policy(_) => ResourceKind::Policy,
            Resource::Profile(_) => ResourceKind::Profile,
            Resource::WorkloadEndpoint(_) => ResourceKind::WorkloadEndpoint,
            Resource::HostEndpoint(_) => ResourceKind::HostEndpoint,
            Resource::BgpPeer(_) => ResourceKind::BgpPeer,
            Resource::Node(_) => ResourceKind::Node,
        }
    }

    pub fn id(&self) -> ResourceId {
        match self {
            Resource::IpPool(p) => ResourceId::IpPool(p.metadata.cidr),
            Resource::Policy(p) => ResourceId::Policy(p.metadata.name.clone()),
            Resource::Profile(p) => ResourceId::Profile(p.metadata.name.clone()),
            // Missing identifiers are refused by `validate` before any use of the id.
            Resource::WorkloadEndpoint(p) => {
                ResourceId::WorkloadEndpoint(p.id().unwrap_or_else(|_| {
                    crate::calico::WorkloadEndpointId {
                        host: p.metadata.node.clone(),
                        orchestrator: p.metadata.orchestrator.clone(),
                        workload: p.metadata.workload.clone(),
                        endpoint: p.metadata.name.clone(),
                    }
                }))
            }
            Resource::HostEndpoint(h) => ResourceId::HostEndpoint {
                node: h.metadata.node.clone(),
                name: h.metadata.name.clone(),
            },
            Resource::BgpPeer(b) => ResourceId::BgpPeer(
                b.scope().unwrap_or(crate::calico::BgpScope::Global),
                b.metadata.peer_ip,
            ),
            Resource::Node(n) => ResourceId::Node(n.metadata.name.clone()),
        }
    }

    /// calicoctl's validation (§4.10); every problem is named.
    pub fn validate(&self) -> Result<(), ResourceError> {
        let errors = match self {
            Resource::IpPool(p) => p.problems(),
            Resource::Policy(p) => p.problems(),
            Resource::Profile(p) => p.problems(),
            Resource::WorkloadEndpoint(p) => {
                if let Err(missing) = p.id() {
                    return Err(ResourceError::InsufficientIdentifiers(missing));
                }
                p.problems()
            }
            Resource::HostEndpoint(h) => {
                if let Some(missing) = h.missing() {
                    return Err(ResourceError::InsufficientIdentifiers(missing));
                }
                h.problems()
            }
            Resource::BgpPeer(b) => b.problems(),
            Resource::Node(n) => n.problems(),
        };
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ResourceError::Validation(errors))
        }
    }

    /// The cells of calicoctl's `ps`/`wide` table, by column heading.
    pub fn cell(&self, heading: &str) -> Option<String> {
        match self {
            Resource::IpPool(p) => p.cell(heading),
            Resource::Policy(p) => p.cell(heading),
            Resource::Profile(p) => p.cell(heading),
            Resource::WorkloadEndpoint(p) => p.cell(heading),
            Resource::HostEndpoint(p) => p.cell(heading),
            Resource::BgpPeer(p) => p.cell(heading),
            Resource::Node(p) => p.cell(heading, None),
        }
    }

    /// A table cell, given the global AS number a node without its own shows as `(64512)`.
    pub fn table_cell(
        &self,
        heading: &str,
        global_asn: Option<crate::calico::Asn>,
    ) -> Option<String> {
        match self {
            Resource::Node(n) => n.cell(heading, global_asn),
            other => other.cell(heading),
        }
    }
}

impl ResourceKind {
    /// calicoctl's `-o ps` columns.
    pub fn ps_columns(self) -> &'static [&'static str] {
        match self {
            ResourceKind::IpPool => &["CIDR"],
            ResourceKind::Policy | ResourceKind::Profile => &["NAME"],
            ResourceKind::WorkloadEndpoint => &["NODE", "ORCHESTRATOR", "WORKLOAD", "NAME"],
            ResourceKind::HostEndpoint => &["NODE", "NAME"],
            ResourceKind::BgpPeer => &["SCOPE", "PEERIP", "NODE", "ASN"],
            ResourceKind::Node => &["NAME"],
        }
    }

    /// calicoctl's `-o wide` columns (also every heading `custom-columns` accepts).
    pub fn wide_columns(self) -> &'static [&'static str] {
        match self {
            ResourceKind::IpPool => &["CIDR", "NAT", "IPIP"],
            ResourceKind::Policy => &["NAME", "ORDER", "SELECTOR"],
            ResourceKind::Profile => &["NAME", "TAGS"],
            ResourceKind::WorkloadEndpoint => &[
                "NODE",
                "ORCHESTRATOR",
                "WORKLOAD",
                "NAME",
                "NETWORKS",
                "NATS",
                "INTERFACE",
                "PROFILES",
            ],
            ResourceKind::HostEndpoint => &["NODE", "NAME", "INTERFACE", "IPS", "PROFILES"],
            ResourceKind::BgpPeer => &["SCOPE", "PEERIP", "NODE", "ASN"],
            ResourceKind::Node => &["NAME", "ASN", "IPV4", "IPV6"],
        }
    }

    /// Every heading `custom-columns` accepts: the wide ones and a few more.
    pub fn custom_columns(self) -> Vec<&'static str> {
        let mut all = self.wide_columns().to_vec();
        if self == ResourceKind::WorkloadEndpoint {
            all.extend(["IPV4GATEWAY", "IPV6GATEWAY", "MAC"]);
        }
        all
    }
}
