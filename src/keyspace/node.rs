//! What a running agent says about itself, under `/tenet/v1/node/<uuid>`, attached to an etcd
//! lease the agent keeps alive: when the agent dies the key goes with the lease, so `tenet
//! status` never shows a dead node as up.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use super::TENET_ROOT;

/// Which agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    /// tenet-cn.
    ComputeNode,
    /// tenet-cnci.
    Concentrator,
}

impl std::fmt::Display for NodeRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NodeRole::ComputeNode => "compute node",
            NodeRole::Concentrator => "concentrator",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeStatus {
    /// The agent's SSNTP UUID.
    pub uuid: String,
    pub role: NodeRole,
    /// The Calico host name (compute nodes) or the concentrator's id.
    pub name: String,
    /// The tenant a concentrator serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Where its tunnels end.
    pub underlay_ip: Ipv4Addr,
    /// The agent's version.
    pub version: String,
    /// When the agent started, in seconds since the Unix epoch (uptime = now − this).
    pub started: u64,
    /// The tenant subnets it has tunnels for.
    #[serde(default)]
    pub subnets: Vec<Ipv4Network>,
    /// Tunnels it holds (compute nodes: one per subnet; concentrators: one per compute node
    /// and subnet).
    #[serde(default)]
    pub tunnels: usize,
}

/// `/tenet/v1/node/`
pub fn prefix() -> String {
    format!("{TENET_ROOT}node/")
}

/// `/tenet/v1/node/<uuid>`
pub fn key(uuid: &str) -> String {
    format!("{TENET_ROOT}node/{uuid}")
}

/// Decodes the value at `path` (under [`prefix`]), checking that it is stored under its UUID.
pub fn decode(path: &str, raw: &[u8]) -> Result<NodeStatus, String> {
    let uuid = path
        .strip_prefix(&prefix())
        .filter(|u| !u.is_empty() && !u.contains('/'))
        .ok_or_else(|| format!("{path} is not a node status key"))?;
    let status: NodeStatus =
        serde_json::from_slice(raw).map_err(|e| format!("invalid node status: {e}"))?;
    if status.uuid != uuid {
        return Err(format!("node status of {} stored at {path}", status.uuid));
    }
    Ok(status)
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip_and_misplaced_values() {
        let s = NodeStatus {
            uuid: "c1".into(),
            role: NodeRole::Concentrator,
            name: "c1".into(),
            tenant: Some("t1".into()),
            underlay_ip: "10.254.0.2".parse().unwrap(),
            version: "0.1.0".into(),
            started: 1,
            subnets: vec!["172.16.0.0/24".parse().unwrap()],
            tunnels: 2,
        };
        let raw = serde_json::to_vec(&s).unwrap();
        assert!(String::from_utf8_lossy(&raw).contains("\"role\":\"concentrator\""));
        assert_eq!(decode(&key("c1"), &raw).unwrap(), s);
        assert!(decode(&key("c2"), &raw).unwrap_err().contains("stored at"));
        assert!(decode("/tenet/v1/node/", &raw).is_err());
        assert!(decode(&key("c1"), b"{}").is_err());
    }
}
