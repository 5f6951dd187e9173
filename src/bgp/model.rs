//! What BIRD needs to know, read from etcd: the keys confd watched for calico/node (§5) —
//! `/calico/bgp/v1` (AS numbers, mesh, log levels, peers, every host's address), the IP pools
//! and this host's block affinities.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;
use tracing::warn;

use crate::calico::{
    self, Asn, BgpHostField, BgpScope, CalicoKey, CalicoValue, DEFAULT_AS_NUMBER, IP_POOLS_V4,
    IP_POOLS_V6,
};
use crate::store::{Datastore, KeyValue, Revision, StoreResult};

/// Every key under it is BGP configuration.
pub const BGP_PREFIX: &str = "/calico/bgp/v1/";

/// One host's BGP values (`/calico/bgp/v1/host/<h>/…`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostBgp {
    pub ip_v4: Option<Ipv4Addr>,
    pub ip_v6: Option<Ipv6Addr>,
    pub as_num: Option<Asn>,
    pub log_level: Option<String>,
    pub peers: Vec<calico::BgpPeer>,
}

/// The BGP view of one host: everything its BIRD configuration is rendered from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpModel {
    /// The host BIRD runs on.
    pub host: String,
    pub global_as: Asn,
    pub global_log_level: Option<String>,
    /// Node-to-node mesh; an absent or unreadable key means on, as calicoctl reads it.
    pub mesh: bool,
    pub global_peers: Vec<calico::BgpPeer>,
    /// Every host that registered BGP values, this one included.
    pub hosts: BTreeMap<String, HostBgp>,
    /// Every configured pool: routes are exported only inside them.
    pub pools: Vec<IpNetwork>,
    /// The blocks affine to this host: exported as aggregates.
    pub blocks: Vec<IpNetwork>,
}

impl BgpModel {
    /// An empty model for `host`: Calico's defaults (AS 64512, mesh on).
    pub fn new(host: &str) -> Self {
        BgpModel {
            host: host.to_string(),
            global_as: DEFAULT_AS_NUMBER,
            global_log_level: None,
            mesh: true,
            global_peers: Vec::new(),
            hosts: BTreeMap::new(),
            pools: Vec::new(),
            blocks: Vec::new(),
        }
    }

    /// Builds the model from stored keys. Keys that are not BGP input are ignored; a value
    /// that does not decode is skipped with a warning (confd, too, rendered what it could).
    pub fn from_kvs<'a>(host: &str, kvs: impl IntoIterator<Item = &'a KeyValue>) -> Self {
        let mut model = BgpModel::new(host);
        let mut mesh_seen = false;
        for kv in kvs {
            let Ok(key) = CalicoKey::parse(&kv.key) else {
                continue;
            };
            if !is_input(&key, host) {
                continue;
            }
            let value = match calico::decode(&key, &kv.value) {
                Ok(v) => v,
                Err(e) => {
                    // An unreadable node_mesh reads as "off" (calicoctl's rule), not the default.
                    if key == CalicoKey::BgpGlobalNodeMesh {
                        model.mesh = false;
                        mesh_seen = true;
                    }
                    warn!(key = %kv.key, error = %e, "BGP input skipped: value does not decode");
                    continue;
                }
            };
            model.apply(key, value, &mut mesh_seen);
        }
        model.global_peers.sort_by_key(|p| p.ip);
        for h in model.hosts.values_mut() {
            h.peers.sort_by_key(|p| p.ip);
        }
        model
            .pools
            .sort_by_key(|n| (n.is_ipv6(), n.network(), n.prefix()));
        model.pools.dedup();
        model
            .blocks
            .sort_by_key(|n| (n.is_ipv6(), n.network(), n.prefix()));
        model
    }

    fn apply(&mut self, key: CalicoKey, value: CalicoValue, mesh_seen: &mut bool) {
        use CalicoValue as V;
        match (key, value) {
            (CalicoKey::BgpGlobalAsNum, V::AsNumber(a)) => self.global_as = a,
            (CalicoKey::BgpGlobalNodeMesh, V::NodeMesh(m)) => {
                self.mesh = m.enabled;
                *mesh_seen = true;
            }
            (CalicoKey::BgpGlobalLogLevel, V::LogLevel(l)) => self.global_log_level = Some(l),
            (CalicoKey::BgpPeer { scope, .. }, V::BgpPeer(peer)) => match scope {
                BgpScope::Global => self.global_peers.push(peer),
                BgpScope::Host(h) => self.hosts.entry(h).or_default().peers.push(peer),
            },
            (CalicoKey::BgpHost { host, field }, value) => {
                let entry = self.hosts.entry(host).or_default();
                match (field, value) {
                    (BgpHostField::IpAddrV4, V::BgpHostAddress(Some(IpAddr::V4(a)))) => {
                        entry.ip_v4 = Some(a)
                    }
                    (BgpHostField::IpAddrV6, V::BgpHostAddress(Some(IpAddr::V6(a)))) => {
                        entry.ip_v6 = Some(a)
                    }
                    (BgpHostField::AsNum, V::AsNumber(a)) => entry.as_num = Some(a),
                    (BgpHostField::LogLevel, V::LogLevel(l)) => entry.log_level = Some(l),
                    _ => {}
                }
            }
            (CalicoKey::IpPool { cidr }, V::IpPool(_)) => self.pools.push(cidr),
            (CalicoKey::BlockAffinity { cidr, .. }, _) => self.blocks.push(cidr),
            _ => {}
        }
    }

    /// Reads the model from the datastore: the BGP tree, the pools and this host's
    /// affinities. Returns it with a revision at or before every value read, so that a watch
    /// started after it misses nothing.
    pub async fn load(store: &dyn Datastore, host: &str) -> StoreResult<(BgpModel, Revision)> {
        let revision = store.revision().await?;
        let mut kvs = Vec::new();
        for prefix in input_prefixes(host) {
            kvs.extend(store.list(&prefix).await?.kvs);
        }
        Ok((BgpModel::from_kvs(host, &kvs), revision))
    }

    /// This host's values.
    pub fn own(&self) -> Option<&HostBgp> {
        self.hosts.get(&self.host)
    }

    /// The AS this host speaks from: its own, else the global one.
    pub fn local_as(&self) -> Asn {
        self.own().and_then(|h| h.as_num).unwrap_or(self.global_as)
    }

    /// BIRD's log level: the node's, else the global one.
    pub fn log_level(&self) -> Option<&str> {
        self.own()
            .and_then(|h| h.log_level.as_deref())
            .or(self.global_log_level.as_deref())
    }
}

/// The prefixes [`BgpModel::load`] lists.
pub fn input_prefixes(host: &str) -> [String; 4] {
    [
        BGP_PREFIX.to_string(),
        IP_POOLS_V4.to_string(),
        IP_POOLS_V6.to_string(),
        calico::ipam_host_prefix(host),
    ]
}

/// Whether a change at `key` can change `host`'s BIRD configuration.
pub fn is_input_key(path: &str, host: &str) -> bool {
    input_prefixes(host)
        .iter()
        .any(|p| path.starts_with(p.as_str()))
}

fn is_input(key: &CalicoKey, host: &str) -> bool {
    match key {
        CalicoKey::BgpGlobalAsNum
        | CalicoKey::BgpGlobalNodeMesh
        | CalicoKey::BgpGlobalLogLevel
        | CalicoKey::BgpPeer { .. }
        | CalicoKey::BgpHost { .. }
        | CalicoKey::IpPool { .. } => true,
        CalicoKey::BlockAffinity { host: h, .. } => h == host,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            create_revision: 1,
            mod_revision: 1,
            lease: None,
        }
    }

    #[test]
    fn reads_hosts_peers_pools_and_only_own_blocks() {
        let kvs = [
            kv("/calico/bgp/v1/global/as_num", "64513"),
            kv(
                "/calico/bgp/v1/global/peer_v4/10.0.0.254",
                r#"{"ip":"10.0.0.254","as_num":"65000"}"#,
            ),
            kv("/calico/bgp/v1/host/a/ip_addr_v4", "10.0.0.1"),
            kv("/calico/bgp/v1/host/a/ip_addr_v6", ""),
            kv("/calico/bgp/v1/host/a/as_num", "64600"),
            kv("/calico/bgp/v1/host/b/ip_addr_v4", "10.0.0.2"),
            kv("/calico/bgp/v1/host/b/ip_addr_v6", "fd00::2"),
            kv(
                "/calico/bgp/v1/host/a/peer_v4/10.0.0.9",
                r#"{"ip":"10.0.0.9","as_num":65009}"#,
            ),
            kv(
                "/calico/v1/ipam/v4/pool/10.65.0.0-16",
                r#"{"cidr":"10.65.0.0/16"}"#,
            ),
            kv("/calico/ipam/v2/host/a/ipv4/block/10.65.0.64-26", "{}"),
            kv("/calico/ipam/v2/host/b/ipv4/block/10.65.0.0-26", "{}"),
            kv("/calico/v1/host/a/metadata", "{}"),
        ];
        let m = BgpModel::from_kvs("a", &kvs);
        assert_eq!(m.global_as, Asn(64513));
        assert_eq!(m.local_as(), Asn(64600));
        assert!(m.mesh, "absent node_mesh means on");
        assert_eq!(m.global_peers.len(), 1);
        assert_eq!(m.own().unwrap().peers[0].as_num, Asn(65009));
        assert_eq!(m.hosts["b"].ip_v6, Some("fd00::2".parse().unwrap()));
        assert_eq!(m.own().unwrap().ip_v6, None);
        assert_eq!(m.pools, vec!["10.65.0.0/16".parse::<IpNetwork>().unwrap()]);
        assert_eq!(
            m.blocks,
            vec!["10.65.0.64/26".parse::<IpNetwork>().unwrap()]
        );
    }

    #[test]
    fn unreadable_mesh_is_off_and_bad_values_are_skipped() {
        let kvs = [
            kv("/calico/bgp/v1/global/node_mesh", "yes please"),
            kv("/calico/bgp/v1/host/a/ip_addr_v4", "not-an-ip"),
        ];
        let m = BgpModel::from_kvs("a", &kvs);
        assert!(!m.mesh);
        assert!(
            m.own().is_none(),
            "a host whose only value is bad is not registered"
        );
    }

    #[test]
    fn input_keys_are_recognised() {
        assert!(is_input_key("/calico/bgp/v1/host/x/ip_addr_v4", "a"));
        assert!(is_input_key(
            "/calico/ipam/v2/host/a/ipv4/block/10.0.0.0-26",
            "a"
        ));
        assert!(!is_input_key(
            "/calico/ipam/v2/host/b/ipv4/block/10.0.0.0-26",
            "a"
        ));
        assert!(!is_input_key(
            "/calico/v1/host/a/workload/x/y/endpoint/z",
            "a"
        ));
        assert!(is_input_key("/calico/v1/ipam/v6/pool/fd00::-64", "a"));
    }
}
