//! The YAML payloads of SSNTP's networking messages, with ciao's keys (gopkg.in/yaml.v2 on the
//! Go side). Each message is a document with one top-level key (`tenant_added:` ...), except the
//! public-IP failure errors, which have none. Missing keys read as empty values, as yaml.v2
//! leaves Go fields at their zero value; unknown keys are ignored so that newer ciao fields do
//! not break us.
//!
//! UUIDs and addresses stay strings here: ciao itself sends non-UUID tenant ids (the fixtures
//! carry `67d86208-000-...`) and empty strings; the agents that act on a payload validate the
//! fields they use.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Payloads larger than this are refused before parsing; ciao's largest (a START) is a few KiB.
pub const MAX_PAYLOAD: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("{what} payload is {len} bytes; the limit is {MAX_PAYLOAD}")]
    TooLarge { what: &'static str, len: usize },
    #[error("{what} payload: {message}")]
    Yaml { what: &'static str, message: String },
}

/// A payload type and how it is named in errors.
pub trait Payload: Serialize + DeserializeOwned {
    const WHAT: &'static str;

    fn from_yaml(bytes: &[u8]) -> Result<Self, PayloadError> {
        if bytes.len() > MAX_PAYLOAD {
            return Err(PayloadError::TooLarge {
                what: Self::WHAT,
                len: bytes.len(),
            });
        }
        serde_saphyr::from_slice(bytes).map_err(|e| PayloadError::Yaml {
            what: Self::WHAT,
            message: e.to_string(),
        })
    }

    fn to_yaml(&self) -> Vec<u8> {
        serde_saphyr::to_string(self)
            .expect("payload types serialize to YAML")
            .into_bytes()
    }
}

/// Declares `$wrapper { $key: $inner }`: the one-key document ciao sends.
macro_rules! wrapped {
    ($(#[$doc:meta])* $wrapper:ident, $key:ident, $inner:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
        pub struct $wrapper {
            #[serde(default)]
            pub $key: $inner,
        }

        impl Payload for $wrapper {
            const WHAT: &'static str = stringify!($key);
        }

        impl From<$inner> for $wrapper {
            fn from($key: $inner) -> Self {
                $wrapper { $key }
            }
        }
    };
}

/// A tenant subnet appearing on (or leaving) a compute node: what the concentrator needs to
/// build the tunnel back to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct TenantSubnet {
    pub agent_uuid: String,
    /// The compute node's tunnel endpoint.
    pub agent_ip: String,
    pub tenant_uuid: String,
    pub tenant_subnet: String,
    pub concentrator_uuid: String,
    pub concentrator_ip: String,
    /// The subnet's address as a little-endian u32 (ciao's tunnel key). A Go `int` in ciao's
    /// payload, so read as i64: the scheduler forwards any value as ciao does, and the
    /// concentrator refuses one outside 0..=u32::MAX with an error naming it.
    pub subnet_key: i64,
}

wrapped!(
    /// EVENT TenantAdded, CN agent → scheduler → the CNCI named by `concentrator_uuid`.
    TenantAdded, tenant_added, TenantSubnet
);
wrapped!(
    /// EVENT TenantRemoved, routed like TenantAdded.
    TenantRemoved, tenant_removed, TenantSubnet
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ConcentratorInstance {
    pub instance_uuid: String,
    pub tenant_uuid: String,
    pub concentrator_ip: String,
    pub concentrator_mac: String,
}

wrapped!(
    /// EVENT ConcentratorInstanceAdded, CNCI → every controller.
    ConcentratorInstanceAdded, concentrator_instance_added, ConcentratorInstance
);

/// What a controller asks a concentrator to map or unmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PublicIpCommand {
    pub concentrator_uuid: String,
    pub tenant_uuid: String,
    pub instance_uuid: String,
    pub public_ip: String,
    pub private_ip: String,
    pub vnic_mac: String,
}

wrapped!(
    /// COMMAND AssignPublicIP, controller → the CNCI named by `concentrator_uuid`.
    AssignPublicIp, assign_public_ip, PublicIpCommand
);
wrapped!(
    /// COMMAND ReleasePublicIP, routed like AssignPublicIP.
    ReleasePublicIp, release_public_ip, PublicIpCommand
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PublicIpEvent {
    pub concentrator_uuid: String,
    pub instance_uuid: String,
    pub public_ip: String,
    pub private_ip: String,
}

wrapped!(
    /// EVENT PublicIPAssigned, CNCI → every controller.
    PublicIpAssigned, public_ip_assigned, PublicIpEvent
);
wrapped!(
    /// EVENT PublicIPUnassigned, CNCI → every controller.
    PublicIpUnassigned, public_ip_unassigned, PublicIpEvent
);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PublicIpFailureReason {
    NoInstance,
    #[default]
    InvalidPayload,
    InvalidData,
    AssignFailure,
    ReleaseFailure,
}

/// ERROR AssignPublicIPFailure / UnassignPublicIPFailure, CNCI → every controller. Unlike the
/// others this document has no top-level key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct PublicIpFailure {
    pub concentrator_uuid: String,
    pub tenant_uuid: String,
    pub instance_uuid: String,
    pub public_ip: String,
    pub private_ip: String,
    pub vnic_mac: String,
    pub reason: PublicIpFailureReason,
}

impl Payload for PublicIpFailure {
    const WHAT: &'static str = "public IP failure";
}

/// One concentrator in a RefreshCNCI command: where its subnet's tunnels end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct CnciPeer {
    pub physical_ip: String,
    pub subnet: String,
    pub tunnel_ip: String,
    pub tunnel_id: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct CnciRefreshCommand {
    pub cnci_uuid: String,
    pub cncis: Vec<CnciPeer>,
}

wrapped!(
    /// COMMAND RefreshCNCI, controller → the CNCI named by `cnci_uuid`.
    CnciRefresh, cnci_refresh, CnciRefreshCommand
);

/// The `networking` section of a START: the VNIC a compute node must create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct VnicNetworking {
    pub vnic_mac: String,
    pub vnic_uuid: String,
    pub concentrator_uuid: String,
    pub concentrator_ip: String,
    pub subnet: String,
    /// A string in ciao, and ignored there: the launcher recomputes it from `subnet`.
    pub subnet_key: String,
    pub subnet_uuid: String,
    pub private_ip: String,
    pub public_ip: bool,
    /// tenet extension: a container workload's network namespace (a path such as
    /// `/run/netns/<name>`); the VNIC's workload end is moved there and configured.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub netns: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct StartRequirements {
    pub network_node: bool,
    pub mem_mb: u64,
    pub vcpus: u32,
}

/// The parts of a START command that networking uses; the rest of ciao's START (images,
/// storage, firmware) is ignored when reading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct StartCommand {
    pub instance_uuid: String,
    pub tenant_uuid: String,
    /// `qemu` or `docker` in ciao: which VNIC role the instance needs.
    pub vm_type: String,
    pub requirements: StartRequirements,
    pub networking: VnicNetworking,
}

wrapped!(
    /// COMMAND START, controller → scheduler → a compute node.
    Start, start, StartCommand
);

/// Which instance to delete, and (for the scheduler's routing) on which node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct StopCommand {
    pub instance_uuid: String,
    pub workload_agent_uuid: String,
    /// Go's field has no yaml tag, so yaml.v2 spells it in lower case.
    pub migration: bool,
}

wrapped!(
    /// COMMAND DELETE, controller → scheduler → the node named by `workload_agent_uuid`.
    Delete, delete, StopCommand
);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum StartFailureReason {
    #[serde(rename = "full_cloud")]
    FullCloud,
    #[serde(rename = "full_cn")]
    FullComputeNode,
    #[serde(rename = "no_cn")]
    NoComputeNodes,
    #[serde(rename = "no_net_cn")]
    NoNetworkNodes,
    #[serde(rename = "invalid_payload")]
    InvalidPayload,
    #[default]
    #[serde(rename = "invalid_data")]
    InvalidData,
    #[serde(rename = "already_running")]
    AlreadyRunning,
    #[serde(rename = "instance_exists")]
    InstanceExists,
    #[serde(rename = "launch_failure")]
    LaunchFailure,
    #[serde(rename = "network_failure")]
    NetworkFailure,
}

/// ERROR StartFailure, node → every controller (no top-level key, as in ciao). tenet adds
/// `detail`, the reason in words, which ciao's controllers ignore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct StartFailure {
    pub node_uuid: String,
    pub instance_uuid: String,
    pub reason: StartFailureReason,
    pub restart: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl Payload for StartFailure {
    const WHAT: &'static str = "start failure";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeleteFailureReason {
    NoInstance,
    #[default]
    InvalidPayload,
    InvalidData,
}

/// ERROR DeleteFailure, node → every controller (no top-level key); `detail` as above.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct DeleteFailure {
    pub node_uuid: String,
    pub instance_uuid: String,
    pub reason: DeleteFailureReason,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl Payload for DeleteFailure {
    const WHAT: &'static str = "delete failure";
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct InstanceDeletedEvent {
    pub instance_uuid: String,
}

wrapped!(
    /// EVENT InstanceDeleted, node → every controller.
    InstanceDeleted, instance_deleted, InstanceDeletedEvent
);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NodeType {
    #[default]
    ComputeNode,
    NetworkNode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct NodeEvent {
    pub node_uuid: String,
    pub node_type: NodeType,
}

wrapped!(
    /// EVENT NodeConnected, scheduler → every controller, when an agent connects.
    NodeConnected, node_connected, NodeEvent
);
wrapped!(
    /// EVENT NodeDisconnected, scheduler → every controller, when an agent goes.
    NodeDisconnected, node_disconnected, NodeEvent
);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct SchedulerSection {
    pub storage_uri: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct LauncherSection {
    /// CIDRs whose addresses carry tenant tunnels.
    pub compute_net: Vec<String>,
    /// CIDRs whose addresses carry management traffic (SSNTP).
    pub mgmt_net: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ControllerSection {
    pub cnci_net: String,
    pub cnci_vcpus: u32,
    pub cnci_mem: u32,
    pub cnci_disk: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ClusterConfiguration {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerSection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<ControllerSection>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub launcher: Option<LauncherSection>,
}

wrapped!(
    /// The cluster configuration: the CONNECTED payload and COMMAND CONFIGURE.
    Configure, configure, ClusterConfiguration
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_added_round_trip_keeps_keys() {
        let p = TenantAdded::from(TenantSubnet {
            agent_uuid: "a".into(),
            agent_ip: "10.3.66.71".into(),
            tenant_uuid: "t".into(),
            tenant_subnet: "172.16.0.0/24".into(),
            concentrator_uuid: "c".into(),
            concentrator_ip: "192.168.0.110".into(),
            subnet_key: 4268,
        });
        let yaml = String::from_utf8(p.to_yaml()).unwrap();
        assert!(yaml.starts_with("tenant_added:\n"), "{yaml}");
        assert!(yaml.contains("subnet_key: 4268"), "{yaml}");
        assert_eq!(TenantAdded::from_yaml(yaml.as_bytes()).unwrap(), p);
    }

    #[test]
    fn errors_name_the_payload() {
        let e = TenantAdded::from_yaml(b"tenant_added:\n  subnet_key: lots\n").unwrap_err();
        assert!(e.to_string().starts_with("tenant_added payload:"), "{e}");
        let big = vec![b' '; MAX_PAYLOAD + 1];
        assert!(matches!(
            CnciRefresh::from_yaml(&big),
            Err(PayloadError::TooLarge { .. })
        ));
    }

    #[test]
    fn failure_reason_and_node_type_spelling() {
        let f = PublicIpFailure::from_yaml(b"reason: no_instance\npublic_ip: 10.1.2.3\n").unwrap();
        assert_eq!(f.reason, PublicIpFailureReason::NoInstance);
        let n = NodeConnected::from(NodeEvent {
            node_uuid: "n".into(),
            node_type: NodeType::NetworkNode,
        });
        let yaml = String::from_utf8(n.to_yaml()).unwrap();
        assert!(yaml.contains("node_type: network_node"), "{yaml}");
    }
}
