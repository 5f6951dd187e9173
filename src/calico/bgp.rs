//! BGP values (§1.12).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::scalar::Asn;

/// A BGP peer, global or per node: `{"ip":"10.0.0.254","as_num":"64567"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BgpPeer {
    pub ip: IpAddr,
    pub as_num: Asn,
}

/// `/calico/bgp/v1/global/node_mesh`; an absent key means enabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMesh {
    pub enabled: bool,
}

/// The AS number used when `/calico/bgp/v1/global/as_num` is absent.
pub const DEFAULT_AS_NUMBER: Asn = Asn(64512);

/// Valid BIRD log levels as stored under `loglevel`.
pub const BGP_LOG_LEVELS: [&str; 3] = ["none", "debug", "info"];
