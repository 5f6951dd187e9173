//! Every key of Calico 2.x's etcd keyspace, as a typed value that prints to and parses from
//! its path (reference: calico-data-model.md §1.2).

use std::fmt;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::escape::{cidr_key, escape_name, ip_version, parse_cidr_key, unescape_name};

/// Identifies one workload endpoint (also the key of its Felix status).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadEndpointId {
    pub host: String,
    pub orchestrator: String,
    pub workload: String,
    pub endpoint: String,
}

impl WorkloadEndpointId {
    fn segments(&self) -> String {
        format!(
            "host/{}/workload/{}/{}/endpoint/{}",
            self.host,
            escape_name(&self.orchestrator),
            escape_name(&self.workload),
            escape_name(&self.endpoint)
        )
    }
}

/// Whose BGP peer: every node's, or one node's.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BgpScope {
    Global,
    Host(String),
}

/// The raw per-host BGP values under `/calico/bgp/v1/host/<h>/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BgpHostField {
    IpAddrV4,
    IpAddrV6,
    NetworkV4,
    NetworkV6,
    AsNum,
    LogLevel,
}

impl BgpHostField {
    const ALL: [BgpHostField; 6] = [
        BgpHostField::IpAddrV4,
        BgpHostField::IpAddrV6,
        BgpHostField::NetworkV4,
        BgpHostField::NetworkV6,
        BgpHostField::AsNum,
        BgpHostField::LogLevel,
    ];

    pub fn segment(self) -> &'static str {
        match self {
            BgpHostField::IpAddrV4 => "ip_addr_v4",
            BgpHostField::IpAddrV6 => "ip_addr_v6",
            BgpHostField::NetworkV4 => "network_v4",
            BgpHostField::NetworkV6 => "network_v6",
            BgpHostField::AsNum => "as_num",
            BgpHostField::LogLevel => "loglevel",
        }
    }
}

/// One key of the Calico keyspace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CalicoKey {
    Ready,
    GlobalConfig { name: String },
    HostMetadata { host: String },
    HostBirdIp { host: String },
    HostOrchestratorRefs { host: String },
    HostConfig { host: String, name: String },
    WorkloadEndpoint(WorkloadEndpointId),
    HostEndpoint { host: String, endpoint: String },
    ProfileTags { profile: String },
    ProfileRules { profile: String },
    ProfileLabels { profile: String },
    Policy { tier: String, name: String },
    IpPool { cidr: IpNetwork },
    IpamConfig,
    IpamBlock { cidr: IpNetwork },
    IpamHandle { handle: String },
    BlockAffinity { host: String, cidr: IpNetwork },
    BgpGlobalAsNum,
    BgpGlobalNodeMesh,
    BgpGlobalLogLevel,
    BgpPeer { scope: BgpScope, ip: IpAddr },
    BgpCustomFilter { version: u8, name: String },
    BgpHost { host: String, field: BgpHostField },
    FelixStatus { host: String },
    FelixLastReportedStatus { host: String },
    WorkloadEndpointStatus(WorkloadEndpointId),
    HostEndpointStatus { host: String, endpoint: String },
}

/// Prefixes worth listing: the whole Calico tree and its main subtrees.
pub const CALICO_ROOT: &str = "/calico";
pub const IPAM_BLOCKS_V4: &str = "/calico/ipam/v2/assignment/ipv4/block/";
pub const IPAM_BLOCKS_V6: &str = "/calico/ipam/v2/assignment/ipv6/block/";
pub const IPAM_HANDLES: &str = "/calico/ipam/v2/handle/";
pub const IPAM_HOSTS: &str = "/calico/ipam/v2/host/";
pub const IP_POOLS_V4: &str = "/calico/v1/ipam/v4/pool/";
pub const IP_POOLS_V6: &str = "/calico/v1/ipam/v6/pool/";
/// Every host's subtree (metadata, workload and host endpoints, config).
pub const HOSTS: &str = "/calico/v1/host/";

/// A host's whole IPAM subtree (its affinity keys).
pub fn ipam_host_prefix(host: &str) -> String {
    format!("{IPAM_HOSTS}{host}/")
}

/// The affinity keys of one host and IP version (4 or 6).
pub fn host_affinity_prefix(host: &str, version: u8) -> String {
    format!("{IPAM_HOSTS}{host}/{}/block/", ipv(version))
}

fn v(version: u8) -> &'static str {
    if version == 4 { "v4" } else { "v6" }
}

fn ipv(version: u8) -> &'static str {
    if version == 4 { "ipv4" } else { "ipv6" }
}

impl fmt::Display for CalicoKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use CalicoKey::*;
        match self {
            Ready => write!(f, "/calico/v1/Ready"),
            GlobalConfig { name } => write!(f, "/calico/v1/config/{name}"),
            HostMetadata { host } => write!(f, "/calico/v1/host/{host}/metadata"),
            HostBirdIp { host } => write!(f, "/calico/v1/host/{host}/bird_ip"),
            HostOrchestratorRefs { host } => {
                write!(f, "/calico/v1/host/{host}/orchestrator_refs")
            }
            HostConfig { host, name } => write!(f, "/calico/v1/host/{host}/config/{name}"),
            WorkloadEndpoint(id) => write!(f, "/calico/v1/{}", id.segments()),
            HostEndpoint { host, endpoint } => {
                write!(
                    f,
                    "/calico/v1/host/{host}/endpoint/{}",
                    escape_name(endpoint)
                )
            }
            ProfileTags { profile } => {
                write!(f, "/calico/v1/policy/profile/{}/tags", escape_name(profile))
            }
            ProfileRules { profile } => {
                write!(
                    f,
                    "/calico/v1/policy/profile/{}/rules",
                    escape_name(profile)
                )
            }
            ProfileLabels { profile } => {
                write!(
                    f,
                    "/calico/v1/policy/profile/{}/labels",
                    escape_name(profile)
                )
            }
            Policy { tier, name } => write!(
                f,
                "/calico/v1/policy/tier/{}/policy/{}",
                escape_name(tier),
                escape_name(name)
            ),
            IpPool { cidr } => write!(
                f,
                "/calico/v1/ipam/{}/pool/{}",
                v(ip_version(cidr.ip())),
                cidr_key(cidr)
            ),
            IpamConfig => write!(f, "/calico/ipam/v2/config"),
            IpamBlock { cidr } => write!(
                f,
                "/calico/ipam/v2/assignment/{}/block/{}",
                ipv(ip_version(cidr.ip())),
                cidr_key(cidr)
            ),
            IpamHandle { handle } => write!(f, "/calico/ipam/v2/handle/{handle}"),
            BlockAffinity { host, cidr } => write!(
                f,
                "/calico/ipam/v2/host/{host}/{}/block/{}",
                ipv(ip_version(cidr.ip())),
                cidr_key(cidr)
            ),
            BgpGlobalAsNum => write!(f, "/calico/bgp/v1/global/as_num"),
            BgpGlobalNodeMesh => write!(f, "/calico/bgp/v1/global/node_mesh"),
            BgpGlobalLogLevel => write!(f, "/calico/bgp/v1/global/loglevel"),
            BgpPeer { scope, ip } => {
                let peer = format!("peer_{}/{ip}", v(ip_version(*ip)));
                match scope {
                    BgpScope::Global => write!(f, "/calico/bgp/v1/global/{peer}"),
                    BgpScope::Host(h) => write!(f, "/calico/bgp/v1/host/{h}/{peer}"),
                }
            }
            BgpCustomFilter { version, name } => write!(
                f,
                "/calico/bgp/v1/global/custom_filters/{}/{name}",
                v(*version)
            ),
            BgpHost { host, field } => {
                write!(f, "/calico/bgp/v1/host/{host}/{}", field.segment())
            }
            FelixStatus { host } => write!(f, "/calico/felix/v1/host/{host}/status"),
            FelixLastReportedStatus { host } => {
                write!(f, "/calico/felix/v1/host/{host}/last_reported_status")
            }
            WorkloadEndpointStatus(id) => write!(f, "/calico/felix/v1/{}", id.segments()),
            HostEndpointStatus { host, endpoint } => write!(
                f,
                "/calico/felix/v1/host/{host}/endpoint/{}",
                escape_name(endpoint)
            ),
        }
    }
}

/// Why a path is not a Calico key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct KeyError {
    pub key: String,
    pub reason: String,
}

impl CalicoKey {
    /// Parses a key path. Unknown paths and malformed segments (bad CIDR keys, an IPv6
    /// block under `ipv4`, empty names) are errors naming the key.
    pub fn parse(path: &str) -> Result<Self, KeyError> {
        parse(path).map_err(|reason| KeyError {
            key: path.to_string(),
            reason,
        })
    }

    /// The path, e.g. `/calico/v1/Ready`.
    pub fn path(&self) -> String {
        self.to_string()
    }
}

fn name(segment: &str, what: &str) -> Result<String, String> {
    if segment.is_empty() {
        return Err(format!("empty {what}"));
    }
    Ok(unescape_name(segment))
}

fn plain(segment: &str, what: &str) -> Result<String, String> {
    if segment.is_empty() {
        return Err(format!("empty {what}"));
    }
    Ok(segment.to_string())
}

fn version_of(segment: &str, with_ip_prefix: bool) -> Result<u8, String> {
    match (segment, with_ip_prefix) {
        ("v4", false) | ("ipv4", true) => Ok(4),
        ("v6", false) | ("ipv6", true) => Ok(6),
        _ => Err(format!("unknown IP version '{segment}'")),
    }
}

fn cidr_of(segment: &str, version: u8) -> Result<IpNetwork, String> {
    let cidr = parse_cidr_key(segment)?;
    if ip_version(cidr.ip()) != version {
        return Err(format!("{cidr} is not an IPv{version} CIDR"));
    }
    Ok(cidr)
}

fn peer_ip(segment: &str, version: u8) -> Result<IpAddr, String> {
    let ip: IpAddr = segment
        .parse()
        .map_err(|_| format!("'{segment}' is not an IP address"))?;
    if ip_version(ip) != version {
        return Err(format!("{ip} is not an IPv{version} address"));
    }
    Ok(ip)
}

fn parse(path: &str) -> Result<CalicoKey, String> {
    use CalicoKey::*;
    let Some(rest) = path.strip_prefix("/calico/") else {
        return Err("not under /calico/".into());
    };
    let segs: Vec<&str> = rest.split('/').collect();
    let key = match segs.as_slice() {
        ["v1", "Ready"] => Ready,
        ["v1", "config", n] => GlobalConfig {
            name: plain(n, "config name")?,
        },
        ["v1", "host", h, "metadata"] => HostMetadata {
            host: plain(h, "host")?,
        },
        ["v1", "host", h, "bird_ip"] => HostBirdIp {
            host: plain(h, "host")?,
        },
        ["v1", "host", h, "orchestrator_refs"] => HostOrchestratorRefs {
            host: plain(h, "host")?,
        },
        ["v1", "host", h, "config", n] => HostConfig {
            host: plain(h, "host")?,
            name: plain(n, "config name")?,
        },
        ["v1", "host", h, "workload", o, w, "endpoint", e] => WorkloadEndpoint(wep_id(h, o, w, e)?),
        ["v1", "host", h, "endpoint", e] => HostEndpoint {
            host: plain(h, "host")?,
            endpoint: name(e, "endpoint")?,
        },
        ["v1", "policy", "profile", p, "tags"] => ProfileTags {
            profile: name(p, "profile")?,
        },
        ["v1", "policy", "profile", p, "rules"] => ProfileRules {
            profile: name(p, "profile")?,
        },
        ["v1", "policy", "profile", p, "labels"] => ProfileLabels {
            profile: name(p, "profile")?,
        },
        ["v1", "policy", "tier", t, "policy", n] => Policy {
            tier: name(t, "tier")?,
            name: name(n, "policy")?,
        },
        ["v1", "ipam", ver, "pool", c] => IpPool {
            cidr: cidr_of(c, version_of(ver, false)?)?,
        },
        ["ipam", "v2", "config"] => IpamConfig,
        ["ipam", "v2", "assignment", ver, "block", c] => IpamBlock {
            cidr: cidr_of(c, version_of(ver, true)?)?,
        },
        // Handle IDs are not escaped, so one may span several segments.
        ["ipam", "v2", "handle", handle @ ..] if !handle.is_empty() => IpamHandle {
            handle: plain(&handle.join("/"), "handle")?,
        },
        ["ipam", "v2", "host", h, ver, "block", c] => BlockAffinity {
            host: plain(h, "host")?,
            cidr: cidr_of(c, version_of(ver, true)?)?,
        },
        ["bgp", "v1", "global", "as_num"] => BgpGlobalAsNum,
        ["bgp", "v1", "global", "node_mesh"] => BgpGlobalNodeMesh,
        ["bgp", "v1", "global", "loglevel"] => BgpGlobalLogLevel,
        ["bgp", "v1", "global", peer, ip] if peer.starts_with("peer_") => {
            let version = version_of(&peer["peer_".len()..], false)?;
            BgpPeer {
                scope: BgpScope::Global,
                ip: peer_ip(ip, version)?,
            }
        }
        ["bgp", "v1", "global", "custom_filters", ver, n] => BgpCustomFilter {
            version: version_of(ver, false)?,
            name: plain(n, "filter name")?,
        },
        ["bgp", "v1", "host", h, peer, ip] if peer.starts_with("peer_") => {
            let version = version_of(&peer["peer_".len()..], false)?;
            BgpPeer {
                scope: BgpScope::Host(plain(h, "host")?),
                ip: peer_ip(ip, version)?,
            }
        }
        ["bgp", "v1", "host", h, field] => {
            let field = BgpHostField::ALL
                .into_iter()
                .find(|f| f.segment() == *field)
                .ok_or_else(|| format!("unknown BGP host value '{field}'"))?;
            BgpHost {
                host: plain(h, "host")?,
                field,
            }
        }
        ["felix", "v1", "host", h, "status"] => FelixStatus {
            host: plain(h, "host")?,
        },
        ["felix", "v1", "host", h, "last_reported_status"] => FelixLastReportedStatus {
            host: plain(h, "host")?,
        },
        ["felix", "v1", "host", h, "workload", o, w, "endpoint", e] => {
            WorkloadEndpointStatus(wep_id(h, o, w, e)?)
        }
        ["felix", "v1", "host", h, "endpoint", e] => HostEndpointStatus {
            host: plain(h, "host")?,
            endpoint: name(e, "endpoint")?,
        },
        _ => return Err("not a key of the Calico data model".into()),
    };
    Ok(key)
}

fn wep_id(h: &str, o: &str, w: &str, e: &str) -> Result<WorkloadEndpointId, String> {
    Ok(WorkloadEndpointId {
        host: plain(h, "host")?,
        orchestrator: name(o, "orchestrator")?,
        workload: name(w, "workload")?,
        endpoint: name(e, "endpoint")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(path: &str) -> CalicoKey {
        let key = CalicoKey::parse(path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(key.path(), path);
        key
    }

    #[test]
    fn reference_example_keys_parse_and_print_back() {
        // calico-data-model.md §7.2
        for path in [
            "/calico/v1/Ready",
            "/calico/v1/config/ClusterGUID",
            "/calico/v1/config/IpInIpEnabled",
            "/calico/v1/host/node1/config/IpInIpTunnelAddr",
            "/calico/v1/host/node1/metadata",
            "/calico/v1/host/node1/bird_ip",
            "/calico/v1/host/node1/orchestrator_refs",
            "/calico/v1/host/node1/workload/k8s/default.nginx-1/endpoint/eth0",
            "/calico/v1/host/node1/endpoint/eth0-ep",
            "/calico/v1/policy/profile/k8s_ns.default/tags",
            "/calico/v1/policy/profile/k8s_ns.default/labels",
            "/calico/v1/policy/profile/k8s_ns.default/rules",
            "/calico/v1/policy/tier/default/policy/web",
            "/calico/v1/ipam/v4/pool/192.168.0.0-16",
            "/calico/v1/ipam/v6/pool/fd80:24e2:f998:72d6::-64",
            "/calico/ipam/v2/config",
            "/calico/ipam/v2/host/node1/ipv4/block/192.168.12.0-26",
            "/calico/ipam/v2/host/node1/ipv6/block/fd80:24e2:f998:72d6::-122",
            "/calico/ipam/v2/assignment/ipv4/block/192.168.12.0-26",
            "/calico/ipam/v2/assignment/ipv6/block/fd80:24e2:f998:72d6::-122",
            "/calico/ipam/v2/handle/9f86d081884c",
            "/calico/bgp/v1/global/as_num",
            "/calico/bgp/v1/global/node_mesh",
            "/calico/bgp/v1/global/loglevel",
            "/calico/bgp/v1/global/peer_v4/10.0.0.254",
            "/calico/bgp/v1/global/peer_v6/fd00::fe",
            "/calico/bgp/v1/global/custom_filters/v4/f1",
            "/calico/bgp/v1/host/node1/ip_addr_v4",
            "/calico/bgp/v1/host/node1/ip_addr_v6",
            "/calico/bgp/v1/host/node1/network_v4",
            "/calico/bgp/v1/host/node1/network_v6",
            "/calico/bgp/v1/host/node1/as_num",
            "/calico/bgp/v1/host/node1/loglevel",
            "/calico/bgp/v1/host/node1/peer_v4/10.0.0.9",
            "/calico/felix/v1/host/node1/status",
            "/calico/felix/v1/host/node1/last_reported_status",
            "/calico/felix/v1/host/node1/workload/k8s/default.nginx-1/endpoint/eth0",
            "/calico/felix/v1/host/node1/endpoint/eth0-ep",
        ] {
            roundtrip(path);
        }
    }

    #[test]
    fn escaped_names_are_decoded() {
        let key = roundtrip("/calico/v1/host/node1/workload/docker/a%2fb/endpoint/ep%252");
        let CalicoKey::WorkloadEndpoint(id) = key else {
            panic!("wrong kind")
        };
        assert_eq!(
            (id.workload.as_str(), id.endpoint.as_str()),
            ("a/b", "ep%2")
        );
        let key = CalicoKey::Policy {
            tier: "default".into(),
            name: "a/b%c".into(),
        };
        assert_eq!(
            key.path(),
            "/calico/v1/policy/tier/default/policy/a%2fb%25c"
        );
        assert_eq!(CalicoKey::parse(&key.path()).unwrap(), key);
    }

    #[test]
    fn handle_ids_are_not_escaped() {
        let key = roundtrip("/calico/ipam/v2/handle/k8s-pod-network.abc/def");
        assert_eq!(
            key,
            CalicoKey::IpamHandle {
                handle: "k8s-pod-network.abc/def".into()
            }
        );
    }

    #[test]
    fn malformed_keys_name_the_problem() {
        for (path, want) in [
            ("/calico/v1/ipam/v4/pool/fd00::-64", "not an IPv4 CIDR"),
            (
                "/calico/v1/ipam/v4/pool/10.0.0.1-8",
                "not a network address",
            ),
            (
                "/calico/ipam/v2/assignment/ipv5/block/10.0.0.0-26",
                "unknown IP version",
            ),
            (
                "/calico/bgp/v1/global/peer_v4/fd00::1",
                "not an IPv4 address",
            ),
            ("/calico/bgp/v1/host/n1/mystery", "unknown BGP host value"),
            ("/calico/v1/host//metadata", "empty host"),
            ("/calico/v1/nothing", "not a key"),
            ("/other/key", "not under /calico/"),
        ] {
            let err = CalicoKey::parse(path).unwrap_err();
            assert!(err.reason.contains(want), "{path}: {err}");
            assert_eq!(err.key, path);
        }
    }
}
