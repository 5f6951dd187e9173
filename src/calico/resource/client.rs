//! create / replace / apply / delete / list over the datastore, safe under concurrency:
//! create is create-if-absent, replace a compare-and-swap on the revision it read, apply an
//! unconditional write; every write of one resource is one transaction.

use std::sync::Arc;

use ipnetwork::IpNetwork;

use std::collections::BTreeMap;

use super::{
    BgpPeerResource, HostEndpointResource, IpPoolResource, PolicyResource, ProfileResource,
    Resource, ResourceError, ResourceId, ResourceKind, WorkloadEndpointResource,
};
use crate::calico::{
    BgpScope, CalicoKey, HOSTS, IP_POOLS_V4, IP_POOLS_V6, IpPool, Policy, ProfileRules,
    WorkloadEndpoint,
};
use crate::ipam::{Ipam, IpamError};
use crate::store::{Compare, Datastore, StoreError, Txn, TxnOp};

/// Set when any IPIP pool is written (libcalico-go v1 did the same).
const IPIP_ENABLED_KEY: &str = "/calico/v1/config/IpInIpEnabled";

pub struct ResourceClient {
    store: Arc<dyn Datastore>,
}

/// How a write treats what is already there.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Create,
    Replace,
    /// Replace only if the resource is still at this revision.
    ReplaceAt(crate::store::Revision),
    Apply,
}

impl ResourceClient {
    pub fn new(store: Arc<dyn Datastore>) -> Self {
        ResourceClient { store }
    }

    /// Fails with "resource already exists" if it does.
    pub async fn create(&self, r: &Resource) -> Result<(), ResourceError> {
        self.write(r, Mode::Create).await
    }

    /// Fails with "resource does not exist" if it does not, and with "update conflict" if it
    /// changed between the read and the write.
    pub async fn replace(&self, r: &Resource) -> Result<(), ResourceError> {
        self.write(r, Mode::Replace).await
    }

    /// Replaces the resource only if it is still at `revision` (what a reader saw; see
    /// [`ResourceClient::revision`]): two writers that read the same revision cannot both
    /// win.
    pub async fn replace_at(
        &self,
        r: &Resource,
        revision: crate::store::Revision,
    ) -> Result<(), ResourceError> {
        self.write(r, Mode::ReplaceAt(revision)).await
    }

    /// The revision of the key that says `r` exists, if it does.
    pub async fn revision(
        &self,
        r: &Resource,
    ) -> Result<Option<crate::store::Revision>, ResourceError> {
        let key = writes_of(r)?.key;
        Ok(self.store.get(&key).await?.map(|kv| kv.mod_revision))
    }

    /// The global AS number (`/calico/bgp/v1/global/as_num`; 64512 when unset).
    pub async fn global_asn(&self) -> Result<crate::calico::Asn, ResourceError> {
        Ok(self
            .store
            .get(&CalicoKey::BgpGlobalAsNum.path())
            .await?
            .and_then(|kv| String::from_utf8_lossy(&kv.value).trim().parse().ok())
            .unwrap_or(crate::calico::DEFAULT_AS_NUMBER))
    }

    /// Creates or overwrites.
    pub async fn apply(&self, r: &Resource) -> Result<(), ResourceError> {
        self.write(r, Mode::Apply).await
    }

    async fn write(&self, r: &Resource, mode: Mode) -> Result<(), ResourceError> {
        r.validate()?;
        let Writes { key, puts, deletes } = writes_of(r)?;
        let mut txn = Txn::new();
        match mode {
            Mode::Create => txn = txn.when(Compare::absent(key.clone())),
            Mode::Replace => {
                let current = self
                    .store
                    .get(&key)
                    .await?
                    .ok_or_else(|| ResourceError::DoesNotExist(r.id()))?;
                txn = txn.when(Compare::revision(key.clone(), current.mod_revision));
            }
            Mode::ReplaceAt(revision) => {
                txn = txn.when(Compare::revision(key.clone(), revision));
            }
            Mode::Apply => {}
        }
        for (k, v) in puts {
            txn = txn.then(TxnOp::put(k, v));
        }
        for k in deletes {
            txn = txn.then(TxnOp::delete(k));
        }
        match self.store.txn(txn).await {
            Ok(_) => Ok(()),
            Err(StoreError::Conflict { .. }) if mode == Mode::Create => {
                Err(ResourceError::AlreadyExists(r.id()))
            }
            Err(StoreError::Conflict { .. }) => Err(ResourceError::UpdateConflict(key)),
            Err(e) => Err(e.into()),
        }
    }

    /// Applies `resources` in order, batched into transactions (one round trip per batch
    /// rather than per key); returns how many were applied, and the error that stopped it.
    /// A batch is atomic, so on an error none of its resources was written.
    pub async fn apply_all(&self, resources: &[Resource]) -> (usize, Option<ResourceError>) {
        self.write_all(resources, false, false).await
    }

    /// Creates `resources` in order, batched as [`ResourceClient::apply_all`]; with
    /// `skip_exists` one that exists counts as done. A batch whose create-if-absent fails
    /// is done again one by one, so the count and the error are exactly calicoctl's.
    pub async fn create_all(
        &self,
        resources: &[Resource],
        skip_exists: bool,
    ) -> (usize, Option<ResourceError>) {
        self.write_all(resources, true, skip_exists).await
    }

    async fn write_all(
        &self,
        resources: &[Resource],
        create: bool,
        skip_exists: bool,
    ) -> (usize, Option<ResourceError>) {
        let mut prepared = Vec::new();
        let mut invalid = None;
        for batch in batches(resources) {
            match batch {
                Ok(b) => prepared.push(b),
                Err(e) => {
                    invalid = Some(e);
                    break;
                }
            }
        }
        // An apply whose batches share no key may run several transactions at once: their
        // order cannot change the result. A create stays in order, so that its count of
        // "the first n" is exact.
        let mut seen = std::collections::HashSet::new();
        let independent = !create
            && prepared
                .iter()
                .flatten()
                .all(|(_, w)| seen.insert(w.key.as_str()));
        let (done, error) = if independent {
            self.apply_concurrently(&prepared).await
        } else {
            self.write_in_order(&prepared, create, skip_exists).await
        };
        (done, error.or(invalid))
    }

    async fn write_in_order(
        &self,
        prepared: &[Vec<(&Resource, Writes)>],
        create: bool,
        skip_exists: bool,
    ) -> (usize, Option<ResourceError>) {
        let mut done = 0;
        for batch in prepared {
            match self.store.txn(batch_txn(batch, create)).await {
                Ok(_) => done += batch.len(),
                Err(StoreError::Conflict { .. }) if create => {
                    for (r, _) in batch {
                        match self.create(r).await {
                            Ok(()) => done += 1,
                            Err(ResourceError::AlreadyExists(_)) if skip_exists => done += 1,
                            Err(e) => return (done, Some(e)),
                        }
                    }
                }
                Err(e) => return (done, Some(e.into())),
            }
        }
        (done, None)
    }

    async fn apply_concurrently(
        &self,
        prepared: &[Vec<(&Resource, Writes)>],
    ) -> (usize, Option<ResourceError>) {
        use futures::StreamExt;
        let results: Vec<_> = futures::stream::iter(
            prepared
                .iter()
                .map(|batch| self.store.txn(batch_txn(batch, false))),
        )
        .buffered(TXN_WINDOW)
        .collect()
        .await;
        let mut done = 0;
        for (i, (batch, result)) in prepared.iter().zip(&results).enumerate() {
            match result {
                Ok(_) => done += batch.len(),
                Err(e) => {
                    // Batches after the failed one ran at the same time; say what they did.
                    let later: usize = prepared[i + 1..]
                        .iter()
                        .zip(&results[i + 1..])
                        .filter(|(_, r)| r.is_ok())
                        .map(|(b, _)| b.len())
                        .sum();
                    let error = if later == 0 {
                        ResourceError::Store(e.clone())
                    } else {
                        ResourceError::Invalid(format!(
                            "datastore: {e} ({later} resources after the failed batch were applied too)"
                        ))
                    };
                    return (done, Some(error));
                }
            }
        }
        (done, None)
    }

    /// Fails with "resource does not exist" if it does not. A pool is disabled and its
    /// blocks' affinities released before its key goes (libcalico-go v1's order), so no
    /// host allocates from it meanwhile.
    pub async fn delete(&self, id: &ResourceId) -> Result<(), ResourceError> {
        match id {
            ResourceId::IpPool(cidr) => {
                match Ipam::new(self.store.clone()).delete_pool(*cidr).await {
                    Ok(()) => Ok(()),
                    Err(IpamError::PoolNotFound(_)) => Err(ResourceError::DoesNotExist(id.clone())),
                    Err(IpamError::Store(e)) => Err(e.into()),
                    Err(e) => Err(ResourceError::Invalid(e.to_string())),
                }
            }
            ResourceId::Policy(_)
            | ResourceId::WorkloadEndpoint(_)
            | ResourceId::HostEndpoint { .. }
            | ResourceId::BgpPeer(..) => {
                let key = match id {
                    ResourceId::Policy(name) => policy_key(name),
                    ResourceId::WorkloadEndpoint(wep) => {
                        CalicoKey::WorkloadEndpoint(wep.clone()).path()
                    }
                    ResourceId::HostEndpoint { node, name } => CalicoKey::HostEndpoint {
                        host: node.clone(),
                        endpoint: name.clone(),
                    }
                    .path(),
                    ResourceId::BgpPeer(scope, ip) => CalicoKey::BgpPeer {
                        scope: scope.clone(),
                        ip: *ip,
                    }
                    .path(),
                    _ => unreachable!("matched above"),
                };
                match self.store.delete(&key, None).await {
                    Ok(_) => Ok(()),
                    Err(StoreError::NotFound { .. }) => {
                        Err(ResourceError::DoesNotExist(id.clone()))
                    }
                    Err(e) => Err(e.into()),
                }
            }
            ResourceId::Node(name) => {
                // libcalico-go's order: the node's endpoint addresses go back to IPAM, then
                // its IPAM host, its BGP keys, and its whole host tree.
                let host_dir = format!("{HOSTS}{}/", crate::calico::escape_name(name));
                let under = self.store.list(&host_dir).await?.kvs;
                if under.is_empty() {
                    return Err(ResourceError::DoesNotExist(id.clone()));
                }
                let mut ips = Vec::new();
                for kv in &under {
                    if let Ok(CalicoKey::WorkloadEndpoint(_)) = CalicoKey::parse(&kv.key)
                        && let Ok(e) = serde_json::from_slice::<WorkloadEndpoint>(&kv.value)
                    {
                        ips.extend(e.ipv4_nets.iter().chain(&e.ipv6_nets).map(|n| n.ip()));
                    }
                }
                let ipam = Ipam::new(self.store.clone());
                let to_err = |e: IpamError| match e {
                    IpamError::Store(e) => ResourceError::Store(e),
                    e => ResourceError::Invalid(e.to_string()),
                };
                if !ips.is_empty() {
                    ipam.release_ips(&ips).await.map_err(to_err)?;
                }
                ipam.remove_host(name).await.map_err(to_err)?;
                self.store
                    .delete_prefix(&format!(
                        "/calico/bgp/v1/host/{}/",
                        crate::calico::escape_name(name)
                    ))
                    .await?;
                self.store.delete_prefix(&host_dir).await?;
                Ok(())
            }
            ResourceId::Profile(name) => {
                // The tags key is the profile's existence; the whole directory goes.
                let tags = CalicoKey::ProfileTags {
                    profile: name.clone(),
                }
                .path();
                if self.store.get(&tags).await?.is_none() {
                    return Err(ResourceError::DoesNotExist(id.clone()));
                }
                let dir = tags.strip_suffix("tags").expect("a tags key");
                self.store.delete_prefix(dir).await?;
                Ok(())
            }
        }
    }

    /// Every resource of `kind`, or the one named (none if it does not exist).
    pub async fn list(
        &self,
        kind: ResourceKind,
        name: Option<&str>,
    ) -> Result<Vec<Resource>, ResourceError> {
        self.list_where(kind, name, &Identifiers::default()).await
    }

    /// As [`ResourceClient::list`], narrowed by the identifier flags (`--node`, …).
    pub async fn list_where(
        &self,
        kind: ResourceKind,
        name: Option<&str>,
        ids: &Identifiers,
    ) -> Result<Vec<Resource>, ResourceError> {
        match kind {
            ResourceKind::Node => {
                let mut names = std::collections::BTreeSet::new();
                let mut refs: BTreeMap<String, Vec<crate::calico::OrchestratorRef>> =
                    BTreeMap::new();
                for kv in self.store.list(HOSTS).await?.kvs {
                    if let Some(h) = kv.key[HOSTS.len()..].split('/').next() {
                        names.insert(crate::calico::unescape_name(h));
                    }
                    if let Ok(CalicoKey::HostOrchestratorRefs { host }) = CalicoKey::parse(&kv.key)
                    {
                        refs.insert(host, decode(&kv.key, &kv.value)?);
                    }
                }
                let mut bgp: BTreeMap<(String, crate::calico::BgpHostField), String> =
                    BTreeMap::new();
                for kv in self.store.list("/calico/bgp/v1/host/").await?.kvs {
                    if let Ok(CalicoKey::BgpHost { host, field }) = CalicoKey::parse(&kv.key) {
                        let v = String::from_utf8_lossy(&kv.value).trim().to_string();
                        if !v.is_empty() {
                            bgp.insert((host, field), v);
                        }
                    }
                }
                use crate::calico::BgpHostField as F;
                Ok(names
                    .into_iter()
                    .filter(|n| name.is_none_or(|want| want == n))
                    .map(|n| {
                        let get = |f| bgp.get(&(n.clone(), f));
                        Resource::Node(super::NodeResource::from_parts(
                            &n,
                            get(F::IpAddrV4).and_then(|v| v.parse().ok()),
                            get(F::NetworkV4).and_then(|v| v.parse().ok()),
                            get(F::IpAddrV6).and_then(|v| v.parse().ok()),
                            get(F::NetworkV6).and_then(|v| v.parse().ok()),
                            get(F::AsNum).and_then(|v| v.parse().ok()),
                            refs.remove(&n).unwrap_or_default(),
                        ))
                    })
                    .collect())
            }
            ResourceKind::HostEndpoint => {
                let prefix = match &ids.node {
                    Some(n) => format!("{HOSTS}{}/endpoint/", crate::calico::escape_name(n)),
                    None => HOSTS.to_string(),
                };
                let mut out = Vec::new();
                for kv in self.store.list(&prefix).await?.kvs {
                    let Ok(CalicoKey::HostEndpoint { host, endpoint }) = CalicoKey::parse(&kv.key)
                    else {
                        continue;
                    };
                    if name.is_none_or(|n| n == endpoint) {
                        let h: crate::calico::HostEndpoint = decode(&kv.key, &kv.value)?;
                        out.push(Resource::HostEndpoint(HostEndpointResource::from_backend(
                            &host, &endpoint, &h,
                        )));
                    }
                }
                Ok(out)
            }
            ResourceKind::BgpPeer => {
                let wanted_ip: Option<std::net::IpAddr> = match name {
                    Some(n) => Some(n.parse().map_err(|_| {
                        ResourceError::Invalid(format!("invalid peer IP address '{n}'"))
                    })?),
                    None => None,
                };
                let scope = match ids.scope.as_deref() {
                    None => None,
                    Some(s @ ("global" | "node")) => Some(s),
                    Some(other) => {
                        return Err(ResourceError::Invalid(format!(
                            "Unrecognized scope '{other}', must be one of: global, node"
                        )));
                    }
                };
                let mut out = Vec::new();
                for prefix in ["/calico/bgp/v1/global/", "/calico/bgp/v1/host/"] {
                    for kv in self.store.list(prefix).await?.kvs {
                        let Ok(CalicoKey::BgpPeer { scope: s, ip }) = CalicoKey::parse(&kv.key)
                        else {
                            continue;
                        };
                        let keep = match &s {
                            BgpScope::Global => {
                                ids.node.is_none() && scope.is_none_or(|sc| sc == "global")
                            }
                            BgpScope::Host(h) => {
                                scope.is_none_or(|sc| sc == "node")
                                    && ids.node.as_ref().is_none_or(|n| n == h)
                            }
                        };
                        if keep && wanted_ip.is_none_or(|w| w == ip) {
                            let p: crate::calico::BgpPeer = decode(&kv.key, &kv.value)?;
                            out.push(Resource::BgpPeer(BgpPeerResource::from_backend(&s, &p)));
                        }
                    }
                }
                Ok(out)
            }
            ResourceKind::WorkloadEndpoint => {
                let prefix = match &ids.node {
                    Some(n) => format!("{HOSTS}{}/workload/", crate::calico::escape_name(n)),
                    None => HOSTS.to_string(),
                };
                let mut out = Vec::new();
                for kv in self.store.list(&prefix).await?.kvs {
                    let Ok(CalicoKey::WorkloadEndpoint(id)) = CalicoKey::parse(&kv.key) else {
                        continue;
                    };
                    let keep = ids
                        .orchestrator
                        .as_ref()
                        .is_none_or(|o| *o == id.orchestrator)
                        && ids.workload.as_ref().is_none_or(|w| *w == id.workload)
                        && name.is_none_or(|n| n == id.endpoint);
                    if keep {
                        let e: WorkloadEndpoint = decode(&kv.key, &kv.value)?;
                        out.push(Resource::WorkloadEndpoint(
                            WorkloadEndpointResource::from_backend(&id, &e),
                        ));
                    }
                }
                Ok(out)
            }
            ResourceKind::IpPool => {
                let kvs = match name {
                    Some(n) => {
                        let cidr = parse_pool_name(n)?;
                        let key = CalicoKey::IpPool { cidr }.path();
                        self.store.get(&key).await?.into_iter().collect()
                    }
                    None => {
                        let mut kvs = self.store.list(IP_POOLS_V4).await?.kvs;
                        kvs.extend(self.store.list(IP_POOLS_V6).await?.kvs);
                        kvs
                    }
                };
                kvs.into_iter()
                    .map(|kv| {
                        let pool: IpPool = serde_json::from_slice(&kv.value).map_err(|e| {
                            ResourceError::Corrupt {
                                key: kv.key.clone(),
                                reason: e.to_string(),
                            }
                        })?;
                        Ok(Resource::IpPool(IpPoolResource::from_backend(&pool)))
                    })
                    .collect()
            }
            ResourceKind::Policy => {
                let kvs = match name {
                    Some(n) => self.store.get(&policy_key(n)).await?.into_iter().collect(),
                    None => self.store.list(&policy_prefix()).await?.kvs,
                };
                let mut out = Vec::new();
                for kv in kvs {
                    let Ok(CalicoKey::Policy { name, .. }) = CalicoKey::parse(&kv.key) else {
                        continue;
                    };
                    let p: Policy = decode(&kv.key, &kv.value)?;
                    out.push(Resource::Policy(PolicyResource::from_backend(&name, &p)));
                }
                Ok(out)
            }
            ResourceKind::Profile => {
                let prefix = match name {
                    Some(n) => {
                        let tags = CalicoKey::ProfileTags { profile: n.into() }.path();
                        tags.strip_suffix("tags").expect("a tags key").to_string()
                    }
                    None => PROFILES.to_string(),
                };
                let mut parts: BTreeMap<String, ProfileParts> = BTreeMap::new();
                for kv in self.store.list(&prefix).await?.kvs {
                    match CalicoKey::parse(&kv.key) {
                        Ok(CalicoKey::ProfileTags { profile }) => {
                            let tags: Option<Vec<String>> = decode(&kv.key, &kv.value)?;
                            parts.entry(profile).or_default().tags = Some(tags.unwrap_or_default());
                        }
                        Ok(CalicoKey::ProfileLabels { profile }) => {
                            parts.entry(profile).or_default().labels = decode(&kv.key, &kv.value)?;
                        }
                        Ok(CalicoKey::ProfileRules { profile }) => {
                            parts.entry(profile).or_default().rules = decode(&kv.key, &kv.value)?;
                        }
                        _ => {}
                    }
                }
                Ok(parts
                    .into_iter()
                    // Without tags there is no profile (libcalico-go read tags first).
                    .filter(|(n, p)| p.tags.is_some() && name.is_none_or(|want| want == n))
                    .map(|(n, p)| {
                        Resource::Profile(ProfileResource::from_backend(
                            &n, p.tags, p.labels, p.rules,
                        ))
                    })
                    .collect())
            }
        }
    }
}

/// calicoctl's identifier flags, which narrow a `get` and name what a `delete KIND NAME`
/// means for kinds whose key holds more than a name.
#[derive(Clone, Debug, Default)]
pub struct Identifiers {
    pub node: Option<String>,
    /// bgpPeer: `global` or `node`.
    pub scope: Option<String>,
    pub orchestrator: Option<String>,
    pub workload: Option<String>,
}

#[derive(Default)]
struct ProfileParts {
    tags: Option<Vec<String>>,
    labels: Option<BTreeMap<String, String>>,
    rules: Option<ProfileRules>,
}

const PROFILES: &str = "/calico/v1/policy/profile/";

fn policy_key(name: &str) -> String {
    CalicoKey::Policy {
        tier: "default".into(),
        name: name.into(),
    }
    .path()
}

fn policy_prefix() -> String {
    let key = policy_key("x");
    key[..key.len() - 1].to_string()
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, raw: &[u8]) -> Result<T, ResourceError> {
    serde_json::from_slice(raw).map_err(|e| ResourceError::Corrupt {
        key: key.into(),
        reason: e.to_string(),
    })
}

/// An ipPool's CLI name is its CIDR.
pub fn parse_pool_name(name: &str) -> Result<IpNetwork, ResourceError> {
    name.parse()
        .map_err(|_| ResourceError::Invalid(format!("invalid CIDR '{name}'")))
}

/// A key and the value to put there.
type Put = (String, Vec<u8>);

/// What writing a resource puts: the key that says it exists first, then the rest.
struct Writes {
    key: String,
    puts: Vec<Put>,
    /// Keys the resource must not leave behind (a node's unset BGP fields).
    deletes: Vec<String>,
}

fn writes_of(r: &Resource) -> Result<Writes, ResourceError> {
    if let Resource::Node(n) = r {
        let (puts, deletes) = n.writes();
        return Ok(Writes {
            key: puts[0].0.clone(),
            puts,
            deletes,
        });
    }
    let (key, value, extra): (String, Vec<u8>, Vec<Put>) = match r {
        Resource::IpPool(p) => {
            let key = CalicoKey::IpPool {
                cidr: p.metadata.cidr,
            }
            .path();
            let value = serde_json::to_vec(&p.to_backend()).expect("pools serialise");
            let extra = p
                .ipip_enabled()
                .then(|| (IPIP_ENABLED_KEY.to_string(), b"true".to_vec()))
                .into_iter()
                .collect();
            (key, value, extra)
        }
        Resource::Policy(p) => (
            policy_key(&p.metadata.name),
            serde_json::to_vec(&p.to_backend()).expect("policies serialise"),
            Vec::new(),
        ),
        Resource::HostEndpoint(h) => (
            CalicoKey::HostEndpoint {
                host: h.metadata.node.clone(),
                endpoint: h.metadata.name.clone(),
            }
            .path(),
            serde_json::to_vec(&h.to_backend()).expect("endpoints serialise"),
            Vec::new(),
        ),
        Resource::BgpPeer(b) => (
            CalicoKey::BgpPeer {
                scope: b.scope().map_err(ResourceError::Invalid)?,
                ip: b.metadata.peer_ip,
            }
            .path(),
            serde_json::to_vec(&b.to_backend()).expect("peers serialise"),
            Vec::new(),
        ),
        Resource::Node(_) => unreachable!("nodes are handled above"),
        Resource::WorkloadEndpoint(w) => {
            let id = w.id().map_err(ResourceError::InsufficientIdentifiers)?;
            (
                CalicoKey::WorkloadEndpoint(id).path(),
                serde_json::to_vec(&w.to_backend()).expect("endpoints serialise"),
                Vec::new(),
            )
        }
        Resource::Profile(p) => {
            let name = &p.metadata.name;
            let values = p.to_backend();
            let labels = CalicoKey::ProfileLabels {
                profile: name.clone(),
            }
            .path();
            let rules = CalicoKey::ProfileRules {
                profile: name.clone(),
            }
            .path();
            (
                CalicoKey::ProfileTags {
                    profile: name.clone(),
                }
                .path(),
                values.tags,
                vec![(labels, values.labels), (rules, values.rules)],
            )
        }
    };
    let mut puts = vec![(key.clone(), value)];
    puts.extend(extra);
    Ok(Writes {
        key,
        puts,
        deletes: Vec::new(),
    })
}

/// Writes per transaction: etcd allows 128 operations in one by default.
const MAX_TXN_OPS: usize = 100;

/// Transactions of one apply in flight at once.
const TXN_WINDOW: usize = 8;

/// One batch as one transaction (create: each resource's key must be absent).
fn batch_txn(batch: &[(&Resource, Writes)], create: bool) -> Txn {
    let mut txn = Txn::new();
    let mut written = std::collections::HashSet::new();
    for (_, w) in batch {
        if create {
            txn = txn.when(Compare::absent(w.key.clone()));
        }
        for (k, v) in &w.puts {
            // One put per key per transaction (etcd refuses duplicates); the shared
            // IpInIpEnabled key is the only one that can repeat.
            if written.insert(k.clone()) {
                txn = txn.then(TxnOp::put(k.clone(), v.clone()));
            }
        }
        for k in &w.deletes {
            if written.insert(k.clone()) {
                txn = txn.then(TxnOp::delete(k.clone()));
            }
        }
    }
    txn
}

/// The resources with their writes, cut into batches that fit a transaction and hold each
/// resource key once (a file naming one resource twice gets two batches, in order).
fn batches(resources: &[Resource]) -> Vec<Result<Vec<(&Resource, Writes)>, ResourceError>> {
    let mut out = Vec::new();
    let mut batch: Vec<(&Resource, Writes)> = Vec::new();
    let mut ops = 0;
    let mut keys = std::collections::HashSet::new();
    for r in resources {
        let w = match r.validate().and_then(|()| writes_of(r)) {
            Ok(w) => w,
            Err(e) => {
                if !batch.is_empty() {
                    out.push(Ok(std::mem::take(&mut batch)));
                }
                out.push(Err(e));
                return out;
            }
        };
        let n = w.puts.len() + w.deletes.len();
        if !batch.is_empty() && (ops + n > MAX_TXN_OPS || keys.contains(&w.key)) {
            out.push(Ok(std::mem::take(&mut batch)));
            ops = 0;
            keys.clear();
        }
        ops += n;
        keys.insert(w.key.clone());
        batch.push((r, w));
    }
    if !batch.is_empty() {
        out.push(Ok(batch));
    }
    out
}
