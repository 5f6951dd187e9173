//! Calico 2.x's etcd keyspace (reference: calico-data-model.md §1): typed keys, value types
//! that serialise to the JSON Calico wrote, and a decoder that accepts the legacy shapes
//! older Calico versions left behind.

mod bgp;
mod endpoint;
mod escape;
mod felix;
mod ipam;
mod keys;
mod policy;
pub mod resource;
mod scalar;
pub mod vnic;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;
use serde::Serialize;

pub use crate::types::MacAddr;
pub use bgp::{BGP_LOG_LEVELS, BgpPeer, DEFAULT_AS_NUMBER, NodeMesh};
pub use endpoint::{
    EndpointState, EndpointStatus, HostEndpoint, IpNat, OrchestratorRef, WorkloadEndpoint,
};
pub use escape::{canonical, cidr_key, escape_name, parse_cidr_key, unescape_name};
pub use felix::FelixStatus;
pub use ipam::{AllocationAttribute, AllocationBlock, IpPool, IpamConfig, IpamHandle};
pub use keys::*;
pub use policy::{Policy, PolicyType, ProfileRules, Rule, RuleAction};
pub use scalar::{Asn, Port, Protocol};

use crate::store::{Datastore, StoreError, StoreResult};

/// A decoded value of the Calico keyspace. Raw-string values keep their text.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum CalicoValue {
    Ready(bool),
    /// Global or per-host Felix configuration (raw string).
    Config(String),
    HostMetadata(serde_json::Value),
    BirdIp(Ipv4Addr),
    OrchestratorRefs(Vec<OrchestratorRef>),
    WorkloadEndpoint(WorkloadEndpoint),
    HostEndpoint(HostEndpoint),
    ProfileTags(Option<Vec<String>>),
    ProfileRules(ProfileRules),
    ProfileLabels(Option<BTreeMap<String, String>>),
    Policy(Policy),
    IpPool(IpPool),
    IpamConfig(IpamConfig),
    IpamBlock(AllocationBlock),
    IpamHandle(IpamHandle),
    /// The marker's content is irrelevant (Go writes `{}`, Python wrote ``).
    BlockAffinity,
    AsNumber(Asn),
    NodeMesh(NodeMesh),
    LogLevel(String),
    BgpPeer(BgpPeer),
    CustomFilter(String),
    /// `ip_addr_v4` / `ip_addr_v6`: an address, or empty.
    BgpHostAddress(Option<IpAddr>),
    BgpHostNetwork(IpNetwork),
    FelixStatus(FelixStatus),
    EndpointStatus(EndpointStatus),
}

impl CalicoKey {
    /// The kind of object stored at this key, for listings.
    pub fn kind(&self) -> &'static str {
        use CalicoKey::*;
        match self {
            Ready => "Ready",
            GlobalConfig { .. } => "GlobalConfig",
            HostMetadata { .. } => "HostMetadata",
            HostBirdIp { .. } => "HostBirdIp",
            HostOrchestratorRefs { .. } => "HostOrchestratorRefs",
            HostConfig { .. } => "HostConfig",
            WorkloadEndpoint(_) => "WorkloadEndpoint",
            HostEndpoint { .. } => "HostEndpoint",
            ProfileTags { .. } => "ProfileTags",
            ProfileRules { .. } => "ProfileRules",
            ProfileLabels { .. } => "ProfileLabels",
            Policy { .. } => "Policy",
            IpPool { .. } => "IPPool",
            IpamConfig => "IPAMConfig",
            IpamBlock { .. } => "IPAMBlock",
            IpamHandle { .. } => "IPAMHandle",
            BlockAffinity { .. } => "BlockAffinity",
            BgpGlobalAsNum => "BGPGlobalASNumber",
            BgpGlobalNodeMesh => "BGPNodeMesh",
            BgpGlobalLogLevel => "BGPGlobalLogLevel",
            BgpPeer { .. } => "BGPPeer",
            BgpCustomFilter { .. } => "BGPCustomFilter",
            BgpHost { field, .. } => match field {
                BgpHostField::IpAddrV4 | BgpHostField::IpAddrV6 => "BGPHostAddress",
                BgpHostField::NetworkV4 | BgpHostField::NetworkV6 => "BGPHostNetwork",
                BgpHostField::AsNum => "BGPHostASNumber",
                BgpHostField::LogLevel => "BGPHostLogLevel",
            },
            FelixStatus { .. } => "FelixStatus",
            FelixLastReportedStatus { .. } => "FelixLastReportedStatus",
            WorkloadEndpointStatus(_) => "WorkloadEndpointStatus",
            HostEndpointStatus { .. } => "HostEndpointStatus",
        }
    }
}

/// Why a stored value is not valid for its key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct DecodeError {
    pub key: String,
    pub reason: String,
}

fn json<T: serde::de::DeserializeOwned>(raw: &str) -> Result<T, String> {
    serde_json::from_str(raw).map_err(|e| format!("invalid JSON value: {e}"))
}

fn check(problems: Vec<String>) -> Result<(), String> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn same<T: PartialEq + std::fmt::Display>(
    in_value: &T,
    in_key: &T,
    what: &str,
) -> Result<(), String> {
    if in_value != in_key {
        return Err(format!(
            "{what} {in_value} in the value does not match {in_key} in the key"
        ));
    }
    Ok(())
}

/// Decodes the value stored at `key`, checking it the way Calico's consumers would.
pub fn decode(key: &CalicoKey, raw: &[u8]) -> Result<CalicoValue, DecodeError> {
    decode_inner(key, raw).map_err(|reason| DecodeError {
        key: key.path(),
        reason,
    })
}

fn decode_inner(key: &CalicoKey, raw: &[u8]) -> Result<CalicoValue, String> {
    use CalicoKey as K;
    use CalicoValue as V;
    let text = std::str::from_utf8(raw).map_err(|e| format!("value is not UTF-8: {e}"))?;
    Ok(match key {
        K::Ready => match text {
            "true" => V::Ready(true),
            "false" => V::Ready(false),
            other => return Err(format!("Ready must be true or false, not '{other}'")),
        },
        K::GlobalConfig { .. } | K::HostConfig { .. } => V::Config(text.to_string()),
        K::HostMetadata { .. } => {
            let v: serde_json::Value = json(text)?;
            if !v.is_object() {
                return Err("host metadata must be a JSON object".into());
            }
            V::HostMetadata(v)
        }
        K::HostBirdIp { .. } => V::BirdIp(
            text.parse()
                .map_err(|_| format!("'{text}' is not an IPv4 address"))?,
        ),
        K::HostOrchestratorRefs { .. } => V::OrchestratorRefs(json(text)?),
        K::WorkloadEndpoint(_) => {
            let wep: WorkloadEndpoint = json(text)?;
            check(wep.problems())?;
            V::WorkloadEndpoint(wep)
        }
        K::HostEndpoint { .. } => {
            let hep: HostEndpoint = json(text)?;
            check(hep.problems())?;
            V::HostEndpoint(hep)
        }
        K::ProfileTags { .. } => V::ProfileTags(json(text)?),
        K::ProfileRules { .. } => {
            let rules: ProfileRules = json(text)?;
            check(rule_problems(
                rules.inbound_rules.iter().chain(&rules.outbound_rules),
            ))?;
            V::ProfileRules(rules)
        }
        K::ProfileLabels { .. } => V::ProfileLabels(json(text)?),
        K::Policy { .. } => {
            let policy: Policy = json(text)?;
            check(rule_problems(
                policy.inbound_rules.iter().chain(&policy.outbound_rules),
            ))?;
            V::Policy(policy)
        }
        K::IpPool { cidr } => {
            let pool: IpPool = json(text)?;
            same(&pool.cidr, cidr, "pool CIDR")?;
            if !matches!(pool.ipip_mode.as_str(), "" | "always" | "cross-subnet") {
                return Err(format!("unknown ipip_mode '{}'", pool.ipip_mode));
            }
            V::IpPool(pool)
        }
        K::IpamConfig => V::IpamConfig(json(text)?),
        K::IpamBlock { cidr } => {
            let block: AllocationBlock = json(text)?;
            same(&block.cidr, cidr, "block CIDR")?;
            check(block.problems())?;
            V::IpamBlock(block)
        }
        K::IpamHandle { .. } => V::IpamHandle(json(text)?),
        K::BlockAffinity { .. } => V::BlockAffinity,
        K::BgpGlobalAsNum => V::AsNumber(text.parse()?),
        K::BgpGlobalNodeMesh => V::NodeMesh(json(text)?),
        K::BgpGlobalLogLevel => V::LogLevel(log_level(text)?),
        K::BgpPeer { ip, .. } => {
            let peer: BgpPeer = json(text)?;
            same(&peer.ip, ip, "peer IP")?;
            V::BgpPeer(peer)
        }
        K::BgpCustomFilter { .. } => V::CustomFilter(text.to_string()),
        K::BgpHost { field, .. } => match field {
            BgpHostField::IpAddrV4 | BgpHostField::IpAddrV6 => {
                let want_v4 = *field == BgpHostField::IpAddrV4;
                if text.is_empty() {
                    V::BgpHostAddress(None)
                } else {
                    let ip: IpAddr = text
                        .parse()
                        .map_err(|_| format!("'{text}' is not an IP address"))?;
                    if ip.is_ipv4() != want_v4 {
                        return Err(format!("{ip} is in the wrong address family"));
                    }
                    V::BgpHostAddress(Some(ip))
                }
            }
            BgpHostField::NetworkV4 | BgpHostField::NetworkV6 => {
                let net: IpNetwork = text
                    .parse()
                    .map_err(|e| format!("'{text}' is not a CIDR: {e}"))?;
                V::BgpHostNetwork(canonical(net)?)
            }
            BgpHostField::AsNum => V::AsNumber(text.parse()?),
            BgpHostField::LogLevel => V::LogLevel(log_level(text)?),
        },
        K::FelixStatus { .. } | K::FelixLastReportedStatus { .. } => V::FelixStatus(json(text)?),
        K::WorkloadEndpointStatus(_) | K::HostEndpointStatus { .. } => {
            V::EndpointStatus(json(text)?)
        }
    })
}

fn rule_problems<'a>(rules: impl Iterator<Item = &'a Rule>) -> Vec<String> {
    rules
        .enumerate()
        .flat_map(|(i, r)| {
            r.problems()
                .into_iter()
                .map(move |p| format!("rule {i}: {p}"))
        })
        .collect()
}

fn log_level(text: &str) -> Result<String, String> {
    if BGP_LOG_LEVELS.contains(&text) {
        Ok(text.to_string())
    } else {
        Err(format!(
            "BGP log level '{text}' is not one of {}",
            BGP_LOG_LEVELS.join(", ")
        ))
    }
}

impl CalicoValue {
    /// The bytes Calico's Go code would store for this value.
    pub fn encode(&self) -> Vec<u8> {
        use CalicoValue as V;
        let to_json = |v: &dyn erased::Json| v.to_json_bytes();
        match self {
            V::Ready(b) => b.to_string().into_bytes(),
            V::Config(s) | V::LogLevel(s) | V::CustomFilter(s) => s.clone().into_bytes(),
            V::BirdIp(ip) => ip.to_string().into_bytes(),
            V::BlockAffinity => b"{}".to_vec(),
            V::AsNumber(asn) => asn.to_string().into_bytes(),
            V::BgpHostAddress(ip) => ip.map(|ip| ip.to_string()).unwrap_or_default().into_bytes(),
            V::BgpHostNetwork(net) => net.to_string().into_bytes(),
            V::HostMetadata(v) => to_json(v),
            V::OrchestratorRefs(v) => to_json(v),
            V::WorkloadEndpoint(v) => to_json(v),
            V::HostEndpoint(v) => to_json(v),
            V::ProfileTags(v) => to_json(v),
            V::ProfileRules(v) => to_json(v),
            V::ProfileLabels(v) => to_json(v),
            V::Policy(v) => to_json(v),
            V::IpPool(v) => to_json(v),
            V::IpamConfig(v) => to_json(v),
            V::IpamBlock(v) => to_json(v),
            V::IpamHandle(v) => to_json(v),
            V::NodeMesh(v) => to_json(v),
            V::BgpPeer(v) => to_json(v),
            V::FelixStatus(v) => to_json(v),
            V::EndpointStatus(v) => to_json(v),
        }
    }
}

mod erased {
    /// Object-safe "serialise to JSON bytes", so `encode` can treat every JSON kind alike.
    pub trait Json {
        fn to_json_bytes(&self) -> Vec<u8>;
    }

    impl<T: serde::Serialize> Json for T {
        fn to_json_bytes(&self) -> Vec<u8> {
            // Serialising these plain data types to a Vec cannot fail.
            serde_json::to_vec(self).expect("Calico values serialise to JSON")
        }
    }
}

/// What calico/node's `EnsureInitialized` does: `/calico/v1/Ready = true` and a random
/// 32-hex-digit `ClusterGUID`, each written only if absent (safe to run on every start).
pub async fn ensure_initialized(store: &dyn Datastore) -> StoreResult<()> {
    let ignore_exists = |r: StoreResult<i64>| match r {
        Ok(_) | Err(StoreError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e),
    };
    ignore_exists(store.create(&CalicoKey::Ready.path(), b"true").await)?;
    let guid: String = (0..16)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let guid_key = CalicoKey::GlobalConfig {
        name: "ClusterGUID".into(),
    };
    ignore_exists(store.create(&guid_key.path(), guid.as_bytes()).await)
}
