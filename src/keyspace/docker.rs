//! Docker's networks on tenet, under `/tenet/v1/docker/network/<network id>`: what
//! `docker network create -d tenet -o tenant=… -o concentrator=…` asked for, so that a
//! restarted agent (or another host's) still knows the network when Docker calls again.
//! Docker's endpoints are Calico workload endpoints like any other (kind `docker`), and its
//! addresses live in the tenant's IPAM.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use super::TENET_ROOT;

/// `/tenet/v1/docker/network/`
pub fn network_prefix() -> String {
    format!("{TENET_ROOT}docker/network/")
}

/// `/tenet/v1/docker/network/<id>`
pub fn network_key(id: &str) -> String {
    format!("{}{id}", network_prefix())
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerNetwork {
    /// Docker's network id.
    pub id: String,
    pub tenant: String,
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    /// The UUID of the concentrator serving the subnet.
    pub concentrator: String,
    /// Its underlay address, when given (else from its status, at each endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concentrator_ip: Option<Ipv4Addr>,
}

/// Decodes the value at `path` (under [`network_prefix`]), checking it is stored under its id.
pub fn decode(path: &str, raw: &[u8]) -> Result<DockerNetwork, String> {
    let id = path
        .strip_prefix(&network_prefix())
        .filter(|i| !i.is_empty() && !i.contains('/'))
        .ok_or_else(|| format!("{path} is not a Docker network key"))?;
    let network: DockerNetwork =
        serde_json::from_slice(raw).map_err(|e| format!("invalid Docker network: {e}"))?;
    if network.id != id {
        return Err(format!("Docker network {} stored at {path}", network.id));
    }
    Ok(network)
}
