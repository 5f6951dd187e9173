//! Calico's block IPAM (reference: calico-data-model.md §2), on the same keys and JSON as
//! Calico 2.x, made atomic with etcd transactions:
//!
//! * every allocation or release commits the block **and** its handle(s) in one transaction
//!   that compares their revisions, so a crash cannot leave a handle out of step;
//! * claiming a block creates the block and the host's affinity key in one transaction that
//!   requires both to be absent, so two hosts can never hold one block (Calico's #778);
//! * conflicts retry a bounded number of times with jitter; inconsistent data is reported as
//!   an error, never a process exit.
//!
//! An [`Ipam`] caches the blocks it has read or written, so the common allocation is a single
//! transaction; a stale cache costs one failed transaction, which returns the current value.

mod block;
mod check;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnetwork::IpNetwork;
use rand::{Rng, SeedableRng};
use tracing::{debug, warn};

pub use block::{
    BLOCK_PREFIX_V4, BLOCK_PREFIX_V6, BLOCK_SIZE, Owner, Released, address, block_of, blocks_in,
    empty_block, nth_block, ordinal,
};
pub use check::{CheckReport, Finding};

use crate::calico::{
    AllocationBlock, CalicoKey, CalicoValue, IpPool, IpamConfig, IpamHandle, decode,
};
use crate::store::{Compare, Datastore, KeyValue, Revision, StoreError, Txn, TxnOp, TxnOutcome};

/// How many times a conflicting transaction is retried before giving up.
pub const MAX_RETRIES: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{key}: inconsistent IPAM data: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("No configured Calico pools")]
    NoPools,
    #[error("The given pool ({0}) does not exist")]
    PoolNotFound(IpNetwork),
    #[error("{0} is not an IPv{1} pool")]
    WrongPoolVersion(IpNetwork, u8),
    #[error("The provided IP address {0} is not in a configured pool")]
    NotInPool(IpAddr),
    #[error("Address {0} is already assigned in block")]
    AlreadyAssigned(IpAddr),
    #[error("{0} is not assigned")]
    NotAssigned(IpAddr),
    #[error("IP {0} is not currently assigned in block")]
    NotAssignedInBlock(IpAddr),
    #[error("Block host affinity of {block} ({affinity}) does not match host {host}")]
    AffinityMismatch {
        block: IpNetwork,
        affinity: String,
        host: String,
    },
    #[error("The requested CIDR ({0}) is smaller than the minimum.")]
    CidrTooSmall(IpNetwork),
    #[error("The requested CIDR ({0}) is not within any configured pools.")]
    CidrNotInPool(IpNetwork),
    #[error("handle {0} does not exist")]
    HandleNotFound(String),
    #[error("Cannot change IPAM config while allocations exist")]
    ConfigInUse,
    #[error("Cannot disable 'StrictAffinity' and 'AutoAllocateBlocks' at the same time")]
    ConfigInvalid,
    #[error("a hostname must be specified")]
    NoHost,
    #[error("invalid pool {cidr}: {reason}")]
    InvalidPool { cidr: IpNetwork, reason: String },
    #[error("gave up on {key} after {MAX_RETRIES} conflicting attempts")]
    MaxRetries { key: String },
}

pub type IpamResult<T> = Result<T, IpamError>;

/// A request for automatically chosen addresses.
#[derive(Clone, Debug, Default)]
pub struct AutoAssignArgs {
    pub num_v4: usize,
    pub num_v6: usize,
    pub handle: Option<String>,
    pub attributes: BTreeMap<String, String>,
    pub host: String,
    /// Restrict to these pools (each must exist); `None` = every enabled pool.
    pub pools_v4: Option<Vec<IpNetwork>>,
    pub pools_v6: Option<Vec<IpNetwork>>,
}

/// A block as last seen, with its revision.
#[derive(Clone, Debug)]
struct Seen {
    block: AllocationBlock,
    revision: Revision,
}

/// A handle as last seen (`None`: absent).
type SeenHandle = Option<(IpamHandle, Revision)>;

pub fn block_key(cidr: &IpNetwork) -> String {
    CalicoKey::IpamBlock { cidr: *cidr }.path()
}

pub fn affinity_key(host: &str, cidr: &IpNetwork) -> String {
    CalicoKey::BlockAffinity {
        host: host.to_string(),
        cidr: *cidr,
    }
    .path()
}

pub fn handle_key(handle: &str) -> String {
    CalicoKey::IpamHandle {
        handle: handle.to_string(),
    }
    .path()
}

fn version_dir(v4: bool) -> &'static str {
    if v4 { "ipv4" } else { "ipv6" }
}

fn host_affinity_prefix(host: &str, v4: bool) -> String {
    format!("/calico/ipam/v2/host/{host}/{}/block/", version_dir(v4))
}

fn blocks_prefix(v4: bool) -> &'static str {
    if v4 {
        crate::calico::IPAM_BLOCKS_V4
    } else {
        crate::calico::IPAM_BLOCKS_V6
    }
}

fn json(value: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("IPAM values serialise")
}

fn parse_block(kv: &KeyValue) -> IpamResult<Seen> {
    let key = CalicoKey::parse(&kv.key).map_err(|e| IpamError::Corrupt {
        key: kv.key.clone(),
        reason: e.reason,
    })?;
    match decode(&key, &kv.value) {
        Ok(CalicoValue::IpamBlock(block)) => Ok(Seen {
            block,
            revision: kv.mod_revision,
        }),
        Ok(_) => Err(IpamError::Corrupt {
            key: kv.key.clone(),
            reason: "not a block".into(),
        }),
        Err(e) => Err(IpamError::Corrupt {
            key: kv.key.clone(),
            reason: e.reason,
        }),
    }
}

fn parse_handle(kv: &KeyValue) -> IpamResult<(IpamHandle, Revision)> {
    serde_json::from_slice(&kv.value)
        .map(|h| (h, kv.mod_revision))
        .map_err(|e| IpamError::Corrupt {
            key: kv.key.clone(),
            reason: format!("invalid handle: {e}"),
        })
}

fn parse_handle_opt(kv: Option<&KeyValue>) -> IpamResult<SeenHandle> {
    kv.map(parse_handle).transpose()
}

/// The ops that bring a handle from `seen` to `seen + delta` addresses in `block`
/// (negative deltas clamp at zero: Calico-era handles may be under-counted).
fn handle_ops(
    handle: &str,
    seen: &SeenHandle,
    block: &IpNetwork,
    delta: i64,
) -> (Compare, Option<TxnOp>) {
    let key = handle_key(handle);
    let (mut value, revision) = seen.clone().unwrap_or_default();
    let cidr = block.to_string();
    let count = value.block.get(&cidr).copied().unwrap_or(0) as i64 + delta;
    if count < 0 {
        warn!(handle, block = %cidr, "handle count was lower than the addresses released; clamping");
    }
    if count <= 0 {
        value.block.remove(&cidr);
    } else {
        value.block.insert(cidr, count as u64);
    }
    let compare = Compare::revision(key.clone(), revision);
    let op = if value.block.is_empty() {
        seen.is_some().then(|| TxnOp::delete(key))
    } else {
        Some(TxnOp::put(key, json(&value)))
    };
    (compare, op)
}

/// FNV-1 (32-bit) of the hostname: Calico seeds each host's block walk with it, so hosts
/// start claiming at different places in a pool.
fn host_seed(host: &str) -> u64 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in host.bytes() {
        hash = hash.wrapping_mul(0x0100_0193);
        hash ^= u32::from(b);
    }
    u64::from(hash)
}

/// Block candidates of a pool in the host's random order: a random start, then forward with
/// wrap-around, each block once (at most `limit` blocks for huge IPv6 pools).
fn block_walk(
    pool: &IpNetwork,
    host: &str,
    limit: u128,
) -> impl Iterator<Item = IpNetwork> + use<> {
    let pool = *pool;
    let n = blocks_in(&pool);
    let start = if n == 0 {
        0
    } else {
        let mut rng = rand::rngs::StdRng::seed_from_u64(host_seed(host));
        rng.random_range(0..n)
    };
    (0..n.min(limit)).map(move |i| nth_block(&pool, (start + i) % n))
}

/// Most blocks tried when walking a pool for a free one.
const WALK_LIMIT: u128 = 1 << 20;

async fn backoff(attempt: usize) {
    let cap = 1u64 << attempt.min(6);
    let ms = rand::rng().random_range(0..=cap);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// The IPAM client. Cheap to share (`Arc`); its cache is per instance.
#[derive(Debug)]
pub struct Ipam {
    store: Arc<dyn Datastore>,
    blocks: Mutex<HashMap<IpNetwork, Seen>>,
    /// (host, is IPv4) → the blocks the host was last seen to hold affinity keys for.
    affine: Mutex<HashMap<(String, bool), Vec<IpNetwork>>>,
}

impl Ipam {
    pub fn new(store: Arc<dyn Datastore>) -> Self {
        Self {
            store,
            blocks: Mutex::new(HashMap::new()),
            affine: Mutex::new(HashMap::new()),
        }
    }

    fn cached_affine(&self, host: &str, v4: bool) -> Option<Vec<IpNetwork>> {
        let cache = self.affine.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(&(host.to_string(), v4)).cloned()
    }

    fn set_affine(&self, host: &str, v4: bool, blocks: Option<Vec<IpNetwork>>) {
        let mut cache = self.affine.lock().unwrap_or_else(|p| p.into_inner());
        match blocks {
            Some(b) => cache.insert((host.to_string(), v4), b),
            None => cache.remove(&(host.to_string(), v4)),
        };
    }

    pub fn store(&self) -> &Arc<dyn Datastore> {
        &self.store
    }

    fn cached(&self, cidr: &IpNetwork) -> Option<Seen> {
        self.blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(cidr)
            .cloned()
    }

    fn remember(&self, cidr: IpNetwork, seen: Option<Seen>) {
        let mut cache = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        match seen {
            Some(s) => cache.insert(cidr, s),
            None => cache.remove(&cidr),
        };
    }

    /// Reads a block and (optionally) a handle in one round trip.
    async fn read(
        &self,
        cidr: &IpNetwork,
        handle: Option<&str>,
    ) -> IpamResult<(Option<Seen>, SeenHandle)> {
        let mut keys = vec![block_key(cidr)];
        keys.extend(handle.map(handle_key));
        let got = self.store.get_many(&keys).await?;
        let seen = got[0].as_ref().map(parse_block).transpose()?;
        let handle = parse_handle_opt(got.get(1).and_then(Option::as_ref))?;
        self.remember(*cidr, seen.clone());
        Ok((seen, handle))
    }

    // ---------------------------------------------------------------- pools and config

    /// Every pool of one IP version.
    pub async fn pools(&self, v4: bool) -> IpamResult<Vec<IpPool>> {
        let prefix = if v4 {
            crate::calico::IP_POOLS_V4
        } else {
            crate::calico::IP_POOLS_V6
        };
        let listing = self.store.list(prefix).await?;
        let mut pools = Vec::new();
        for kv in &listing.kvs {
            let key = CalicoKey::parse(&kv.key).map_err(|e| IpamError::Corrupt {
                key: kv.key.clone(),
                reason: e.reason,
            })?;
            match decode(&key, &kv.value) {
                Ok(CalicoValue::IpPool(pool)) => pools.push(pool),
                Ok(_) => {}
                Err(e) => {
                    return Err(IpamError::Corrupt {
                        key: e.key,
                        reason: e.reason,
                    });
                }
            }
        }
        Ok(pools)
    }

    async fn enabled_pools(&self, v4: bool) -> IpamResult<Vec<IpNetwork>> {
        Ok(self
            .pools(v4)
            .await?
            .into_iter()
            .filter(|p| !p.disabled)
            .map(|p| p.cidr)
            .collect())
    }

    /// Creates a pool (IPAM enabled). It must hold at least one block.
    pub async fn create_pool(&self, cidr: IpNetwork, masquerade: bool) -> IpamResult<()> {
        let cidr = crate::calico::canonical(cidr)
            .map_err(|reason| IpamError::InvalidPool { cidr, reason })?;
        if blocks_in(&cidr) == 0 {
            return Err(IpamError::InvalidPool {
                cidr,
                reason: format!("smaller than one /{} block", block::block_prefix(cidr.ip())),
            });
        }
        let pool = IpPool {
            cidr,
            ipip: String::new(),
            ipip_mode: String::new(),
            masquerade,
            ipam: true,
            disabled: false,
        };
        self.store
            .create(&CalicoKey::IpPool { cidr }.path(), &json(&pool))
            .await?;
        Ok(())
    }

    /// Deletes a pool the safe way: disable it, release every host's affinity to its
    /// blocks, delete the pool key. Allocated addresses and non-empty blocks remain.
    pub async fn delete_pool(&self, cidr: IpNetwork) -> IpamResult<()> {
        let key = CalicoKey::IpPool { cidr }.path();
        let kv = self
            .store
            .get(&key)
            .await?
            .ok_or(IpamError::PoolNotFound(cidr))?;
        let mut pool: IpPool =
            serde_json::from_slice(&kv.value).map_err(|e| IpamError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            })?;
        pool.disabled = true;
        pool.ipam = false;
        self.store
            .update(&key, &json(&pool), kv.mod_revision)
            .await?;
        let affinities = self.store.list(crate::calico::IPAM_HOSTS).await?;
        for kv in affinities.kvs {
            if let Ok(CalicoKey::BlockAffinity { host, cidr: b }) = CalicoKey::parse(&kv.key)
                && cidr.contains(b.network())
            {
                self.release_block_affinity(&host, b).await?;
            }
        }
        self.store.delete(&key, None).await?;
        Ok(())
    }

    pub async fn config(&self) -> IpamResult<IpamConfig> {
        match self.store.get(&CalicoKey::IpamConfig.path()).await? {
            None => Ok(IpamConfig::default()),
            Some(kv) => serde_json::from_slice(&kv.value).map_err(|e| IpamError::Corrupt {
                key: kv.key,
                reason: e.to_string(),
            }),
        }
    }

    /// Changes the IPAM configuration; refused while any block exists.
    pub async fn set_config(&self, config: IpamConfig) -> IpamResult<()> {
        if !config.strict_affinity && !config.auto_allocate_blocks {
            return Err(IpamError::ConfigInvalid);
        }
        for v4 in [true, false] {
            if !self.store.list(blocks_prefix(v4)).await?.kvs.is_empty() {
                return Err(IpamError::ConfigInUse);
            }
        }
        self.store
            .put(&CalicoKey::IpamConfig.path(), &json(&config))
            .await?;
        Ok(())
    }

    // ---------------------------------------------------------------- allocation

    /// Assigns up to `num_v4` + `num_v6` addresses to `host`: from its affine blocks first,
    /// then by claiming new blocks, then (unless strict affinity) by borrowing from other
    /// hosts' blocks. Fewer than requested is not an error.
    pub async fn auto_assign(
        &self,
        args: &AutoAssignArgs,
    ) -> IpamResult<(Vec<IpAddr>, Vec<IpAddr>)> {
        if args.host.is_empty() {
            return Err(IpamError::NoHost);
        }
        let owner = Owner {
            handle: args.handle.clone(),
            attributes: args.attributes.clone(),
        };
        let v4 = self
            .assign_version(
                true,
                args.num_v4,
                args.pools_v4.as_deref(),
                &args.host,
                &owner,
            )
            .await?;
        let v6 = self
            .assign_version(
                false,
                args.num_v6,
                args.pools_v6.as_deref(),
                &args.host,
                &owner,
            )
            .await?;
        Ok((v4, v6))
    }

    async fn assign_version(
        &self,
        v4: bool,
        num: usize,
        requested: Option<&[IpNetwork]>,
        host: &str,
        owner: &Owner,
    ) -> IpamResult<Vec<IpAddr>> {
        let mut out = Vec::new();
        if num == 0 {
            return Ok(out);
        }
        if let Some(pools) = requested
            && let Some(bad) = pools.iter().find(|p| p.is_ipv4() != v4)
        {
            return Err(IpamError::WrongPoolVersion(*bad, if v4 { 4 } else { 6 }));
        }
        let in_requested = |cidr: &IpNetwork| {
            requested.is_none_or(|ps| ps.iter().any(|p| p.contains(cidr.network())))
        };

        // 1. The host's affine blocks. The list is cached per instance: a block used from it
        // is re-validated by the allocation's own transaction (revision compare) and must
        // still be affine to this host. On a miss, list afresh and read again the blocks that
        // looked full (someone may have released addresses) before claiming a new block.
        if let Some(cached) = self.cached_affine(host, v4) {
            let want = num - out.len();
            out.extend(
                self.fill_from(&cached, &in_requested, want, host, owner, false)
                    .await?,
            );
            if out.len() == num {
                return Ok(out);
            }
        }
        let affine = self.affine_blocks(host, v4).await?;
        self.set_affine(host, v4, Some(affine.clone()));
        let want = num - out.len();
        out.extend(
            self.fill_from(&affine, &in_requested, want, host, owner, true)
                .await?,
        );
        if out.len() == num {
            return Ok(out);
        }

        // 2. Claim new blocks.
        let config = self.config().await?;
        let pools = self.candidate_pools(v4, requested).await?;
        let mut existing: BTreeSet<IpNetwork> = self.existing_blocks(v4).await?;
        if config.auto_allocate_blocks {
            while out.len() < num {
                match self
                    .claim_and_assign(&pools, &mut existing, num - out.len(), host, owner, &config)
                    .await?
                {
                    Some(ips) => out.extend(ips),
                    None => break, // no free block left in the pools
                }
            }
        }

        // 3. Borrow from other hosts' blocks.
        if out.len() < num && !config.strict_affinity {
            'pools: for pool in &pools {
                for cidr in block_walk(pool, host, WALK_LIMIT) {
                    if out.len() == num {
                        break 'pools;
                    }
                    if !existing.contains(&cidr) {
                        continue;
                    }
                    out.extend(
                        self.assign_from_block(cidr, num - out.len(), host, owner, false)
                            .await?,
                    );
                }
            }
        }
        Ok(out)
    }

    /// Assigns up to `want` addresses from the host's affine `blocks`, in order. A block the
    /// cache says is full is skipped, or read again first when `reread_full`.
    async fn fill_from(
        &self,
        blocks: &[IpNetwork],
        in_requested: &(dyn Fn(&IpNetwork) -> bool + Sync),
        want: usize,
        host: &str,
        owner: &Owner,
        reread_full: bool,
    ) -> IpamResult<Vec<IpAddr>> {
        let mut out = Vec::new();
        for cidr in blocks.iter().filter(|c| in_requested(c)) {
            if out.len() == want {
                break;
            }
            if self.cached(cidr).is_some_and(|s| s.block.free() == 0) {
                if !reread_full {
                    continue;
                }
                self.read(cidr, None).await?;
            }
            let got = self
                .assign_from_block(*cidr, want - out.len(), host, owner, true)
                .await?;
            out.extend(got);
        }
        Ok(out)
    }

    async fn candidate_pools(
        &self,
        v4: bool,
        requested: Option<&[IpNetwork]>,
    ) -> IpamResult<Vec<IpNetwork>> {
        let enabled = self.enabled_pools(v4).await?;
        match requested {
            Some(req) => {
                for p in req {
                    if !enabled.contains(p) {
                        return Err(IpamError::PoolNotFound(*p));
                    }
                }
                Ok(req.to_vec())
            }
            None if enabled.is_empty() => Err(IpamError::NoPools),
            None => Ok(enabled),
        }
    }

    async fn existing_blocks(&self, v4: bool) -> IpamResult<BTreeSet<IpNetwork>> {
        let listing = self.store.list(blocks_prefix(v4)).await?;
        Ok(listing
            .kvs
            .iter()
            .filter_map(|kv| match CalicoKey::parse(&kv.key) {
                Ok(CalicoKey::IpamBlock { cidr }) => Some(cidr),
                _ => None,
            })
            .collect())
    }

    /// The blocks `host` holds an affinity key for.
    pub async fn affine_blocks(&self, host: &str, v4: bool) -> IpamResult<Vec<IpNetwork>> {
        let listing = self.store.list(&host_affinity_prefix(host, v4)).await?;
        Ok(listing
            .kvs
            .iter()
            .filter_map(|kv| match CalicoKey::parse(&kv.key) {
                Ok(CalicoKey::BlockAffinity { cidr, .. }) => Some(cidr),
                _ => None,
            })
            .collect())
    }

    /// Assigns up to `n` addresses from an existing block in one transaction (block + handle).
    async fn assign_from_block(
        &self,
        cidr: IpNetwork,
        n: usize,
        host: &str,
        owner: &Owner,
        check_affinity: bool,
    ) -> IpamResult<Vec<IpAddr>> {
        let handle = owner.handle.as_deref();
        let (mut seen, mut seen_handle) = match self.cached(&cidr) {
            Some(s) => (Some(s), None),
            None => self.read(&cidr, handle).await?,
        };
        for attempt in 0..MAX_RETRIES {
            let Some(current) = seen.clone() else {
                return Ok(Vec::new()); // the block went away
            };
            if check_affinity && current.block.affine_host() != Some(host) {
                // No longer ours (affinity released, e.g. by a pool deletion): stop using it.
                let v4 = cidr.is_ipv4();
                if let Some(mut affine) = self.cached_affine(host, v4) {
                    affine.retain(|c| *c != cidr);
                    self.set_affine(host, v4, Some(affine));
                }
                return Ok(Vec::new());
            }
            if !current.block.allows(host, check_affinity) {
                return Ok(Vec::new());
            }
            let mut block = current.block.clone();
            let ordinals = block.assign(n, owner);
            if ordinals.is_empty() {
                return Ok(Vec::new());
            }
            let key = block_key(&cidr);
            let mut txn = Txn::new().when(Compare::revision(key.clone(), current.revision));
            if let Some(h) = handle {
                let (cmp, op) = handle_ops(h, &seen_handle, &cidr, ordinals.len() as i64);
                txn = txn.when(cmp);
                txn.ops.extend(op);
            }
            txn = txn.then(TxnOp::put(key, json(&block)));
            match self.store.txn_or_read(txn).await? {
                TxnOutcome::Committed(revision) => {
                    self.remember(cidr, Some(Seen { block, revision }));
                    debug!(%cidr, host, n = ordinals.len(), "assigned");
                    return Ok(ordinals.iter().map(|&o| address(&cidr, o)).collect());
                }
                TxnOutcome::Failed { current } => {
                    seen = current[0].as_ref().map(parse_block).transpose()?;
                    self.remember(cidr, seen.clone());
                    seen_handle = parse_handle_opt(current.get(1).and_then(Option::as_ref))?;
                    backoff(attempt).await;
                }
            }
        }
        Err(IpamError::MaxRetries {
            key: block_key(&cidr),
        })
    }

    /// Claims the first free block of the host's walk through `pools` and assigns from it,
    /// all in one transaction. `None` when every block of the pools exists.
    async fn claim_and_assign(
        &self,
        pools: &[IpNetwork],
        existing: &mut BTreeSet<IpNetwork>,
        n: usize,
        host: &str,
        owner: &Owner,
        config: &IpamConfig,
    ) -> IpamResult<Option<Vec<IpAddr>>> {
        let handle = owner.handle.as_deref();
        let mut seen_handle: SeenHandle = None;
        let mut affinity_rev: Revision = 0;
        for attempt in 0..MAX_RETRIES {
            let Some(cidr) = pools
                .iter()
                .flat_map(|p| block_walk(p, host, WALK_LIMIT))
                .find(|c| !existing.contains(c))
            else {
                return Ok(None);
            };
            let mut block = empty_block(cidr, Some(host), config.strict_affinity);
            let ordinals = block.assign(n, owner);
            let bkey = block_key(&cidr);
            let akey = affinity_key(host, &cidr);
            let mut txn = Txn::new()
                .when(Compare::absent(bkey.clone()))
                .when(Compare::revision(akey.clone(), affinity_rev));
            if let Some(h) = handle {
                let (cmp, op) = handle_ops(h, &seen_handle, &cidr, ordinals.len() as i64);
                txn = txn.when(cmp);
                txn.ops.extend(op);
            }
            txn = txn
                .then(TxnOp::put(bkey, json(&block)))
                .then(TxnOp::put(akey, "{}"));
            match self.store.txn_or_read(txn).await? {
                TxnOutcome::Committed(revision) => {
                    existing.insert(cidr);
                    self.remember(cidr, Some(Seen { block, revision }));
                    let v4 = cidr.is_ipv4();
                    let mut affine = self.cached_affine(host, v4).unwrap_or_default();
                    affine.push(cidr);
                    self.set_affine(host, v4, Some(affine));
                    debug!(%cidr, host, "claimed block");
                    return Ok(Some(ordinals.iter().map(|&o| address(&cidr, o)).collect()));
                }
                TxnOutcome::Failed { current } => {
                    if current[0].is_some() {
                        // Someone else claimed it first: try the next block.
                        existing.insert(cidr);
                        affinity_rev = 0;
                    } else {
                        // A leftover affinity key of ours without a block: overwrite it.
                        affinity_rev = current[1].as_ref().map_or(0, |kv| kv.mod_revision);
                    }
                    seen_handle = parse_handle_opt(current.get(2).and_then(Option::as_ref))?;
                    if attempt > 0 {
                        backoff(attempt).await;
                    }
                }
            }
        }
        Err(IpamError::MaxRetries {
            key: blocks_prefix(pools.first().is_none_or(|p| p.is_ipv4())).to_string(),
        })
    }

    /// Assigns one specific address. Its block is claimed for `host` if nobody has it yet.
    pub async fn assign_ip(
        &self,
        ip: IpAddr,
        handle: Option<&str>,
        attributes: BTreeMap<String, String>,
        host: &str,
    ) -> IpamResult<()> {
        if host.is_empty() {
            return Err(IpamError::NoHost);
        }
        let pools = self.enabled_pools(ip.is_ipv4()).await?;
        if !pools.iter().any(|p| p.contains(ip)) {
            return Err(IpamError::NotInPool(ip));
        }
        let config = self.config().await?;
        let owner = Owner {
            handle: handle.map(str::to_string),
            attributes,
        };
        let cidr = block_of(ip);
        let ord = ordinal(&cidr, ip);
        let (mut seen, mut seen_handle) = self.read(&cidr, handle).await?;
        let mut affinity_rev = 0;
        for attempt in 0..MAX_RETRIES {
            let bkey = block_key(&cidr);
            let (mut block, mut txn) = match &seen {
                Some(s) => {
                    if s.block.strict_affinity && !s.block.allows(host, true) {
                        return Err(IpamError::AffinityMismatch {
                            block: cidr,
                            affinity: s.block.affinity.clone().unwrap_or_default(),
                            host: host.into(),
                        });
                    }
                    (
                        s.block.clone(),
                        Txn::new().when(Compare::revision(bkey.clone(), s.revision)),
                    )
                }
                None => {
                    let akey = affinity_key(host, &cidr);
                    let txn = Txn::new()
                        .when(Compare::absent(bkey.clone()))
                        .when(Compare::revision(akey.clone(), affinity_rev))
                        .then(TxnOp::put(akey, "{}"));
                    (empty_block(cidr, Some(host), config.strict_affinity), txn)
                }
            };
            if !block.assign_ordinal(ord, &owner) {
                return Err(IpamError::AlreadyAssigned(ip));
            }
            if let Some(h) = handle {
                let (cmp, op) = handle_ops(h, &seen_handle, &cidr, 1);
                txn = txn.when(cmp);
                txn.ops.extend(op);
            }
            let creating = seen.is_none();
            txn = txn.then(TxnOp::put(bkey, json(&block)));
            match self.store.txn_or_read(txn).await? {
                TxnOutcome::Committed(revision) => {
                    self.remember(cidr, Some(Seen { block, revision }));
                    return Ok(());
                }
                TxnOutcome::Failed { current } => {
                    seen = current[0].as_ref().map(parse_block).transpose()?;
                    let handle_at = if creating {
                        affinity_rev = current[1].as_ref().map_or(0, |kv| kv.mod_revision);
                        2
                    } else {
                        1
                    };
                    seen_handle =
                        parse_handle_opt(current.get(handle_at).and_then(Option::as_ref))?;
                    backoff(attempt).await;
                }
            }
        }
        Err(IpamError::MaxRetries {
            key: block_key(&cidr),
        })
    }

    // ---------------------------------------------------------------- release

    /// Releases addresses; returns those that were not allocated.
    pub async fn release_ips(&self, ips: &[IpAddr]) -> IpamResult<Vec<IpAddr>> {
        let mut by_block: BTreeMap<IpNetwork, Vec<usize>> = BTreeMap::new();
        for ip in ips {
            let cidr = block_of(*ip);
            by_block.entry(cidr).or_default().push(ordinal(&cidr, *ip));
        }
        let mut unallocated = Vec::new();
        for (cidr, ordinals) in by_block {
            let released = self
                .release_from_block(cidr, &Selection::Ordinals(ordinals))
                .await?;
            unallocated.extend(
                released
                    .not_allocated
                    .into_iter()
                    .map(|o| address(&cidr, o)),
            );
        }
        Ok(unallocated)
    }

    /// Releases every address of a handle; returns how many were released.
    pub async fn release_by_handle(&self, handle: &str) -> IpamResult<usize> {
        let kv = self
            .store
            .get(&handle_key(handle))
            .await?
            .ok_or_else(|| IpamError::HandleNotFound(handle.into()))?;
        let (value, _) = parse_handle(&kv)?;
        let mut released = 0;
        for cidr_text in value.block.keys() {
            let Ok(cidr) = cidr_text.parse::<IpNetwork>() else {
                warn!(handle, block = %cidr_text, "handle names a malformed block; skipping");
                continue;
            };
            let selection = Selection::Handle(handle.to_string());
            released += self
                .release_from_block(cidr, &selection)
                .await?
                .ordinals
                .len();
        }
        // Blocks that no longer hold the handle's addresses (Calico over-counted) leave the
        // handle behind: remove what is left so the handle does not leak.
        if let Some(kv) = self.store.get(&handle_key(handle)).await? {
            match self.store.delete(&kv.key, Some(kv.mod_revision)).await {
                Ok(_) | Err(StoreError::NotFound { .. }) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(released)
    }

    /// Releases the selected addresses of one block, together with their handles' counts,
    /// in one transaction. An empty block nobody is affine to is deleted.
    async fn release_from_block(
        &self,
        cidr: IpNetwork,
        selection: &Selection,
    ) -> IpamResult<Released> {
        let mut seen = match self.cached(&cidr) {
            Some(s) => Some(s),
            None => self.read(&cidr, None).await?.0,
        };
        for attempt in 0..MAX_RETRIES {
            let Some(current) = seen.clone() else {
                let not_allocated = match selection {
                    Selection::Ordinals(o) => o.clone(),
                    Selection::Handle(_) => Vec::new(),
                };
                return Ok(Released {
                    not_allocated,
                    ..Released::default()
                });
            };
            let mut block = current.block.clone();
            let ordinals = match selection {
                Selection::Ordinals(o) => o.clone(),
                Selection::Handle(h) => block.ordinals_of(h),
            };
            let released = block.release(&ordinals);
            if released.ordinals.is_empty() {
                return Ok(released);
            }
            let handles: Vec<String> = released.per_handle.keys().cloned().collect();
            let keys: Vec<String> = handles.iter().map(|h| handle_key(h)).collect();
            let handle_values = self.store.get_many(&keys).await?;
            let key = block_key(&cidr);
            let mut txn = Txn::new().when(Compare::revision(key.clone(), current.revision));
            for (h, kv) in handles.iter().zip(&handle_values) {
                let seen_handle = match parse_handle_opt(kv.as_ref()) {
                    Ok(v) => v,
                    Err(e) => {
                        // A corrupt handle must not block releasing addresses; check finds it.
                        warn!(handle = %h, error = %e, "ignoring unreadable handle");
                        continue;
                    }
                };
                if seen_handle.is_none() {
                    warn!(handle = %h, %cidr, "releasing addresses of a handle that does not exist");
                }
                let count = released.per_handle[h] as i64;
                let (cmp, op) = handle_ops(h, &seen_handle, &cidr, -count);
                txn = txn.when(cmp);
                txn.ops.extend(op);
            }
            let delete_block = block.is_empty() && block.affinity.is_none();
            txn = txn.then(if delete_block {
                TxnOp::delete(key)
            } else {
                TxnOp::put(key, json(&block))
            });
            match self.store.txn_or_read(txn).await? {
                TxnOutcome::Committed(revision) => {
                    let after = (!delete_block).then_some(Seen { block, revision });
                    self.remember(cidr, after);
                    return Ok(released);
                }
                TxnOutcome::Failed { current } => {
                    seen = current[0].as_ref().map(parse_block).transpose()?;
                    self.remember(cidr, seen.clone());
                    backoff(attempt).await;
                }
            }
        }
        Err(IpamError::MaxRetries {
            key: block_key(&cidr),
        })
    }

    // ---------------------------------------------------------------- affinity

    /// Claims every block of `cidr` for `host`; returns (claimed, claimed by someone else).
    pub async fn claim_affinity(
        &self,
        cidr: IpNetwork,
        host: &str,
    ) -> IpamResult<(Vec<IpNetwork>, Vec<IpNetwork>)> {
        if host.is_empty() {
            return Err(IpamError::NoHost);
        }
        let cidr = crate::calico::canonical(cidr)
            .map_err(|reason| IpamError::InvalidPool { cidr, reason })?;
        if cidr.prefix() > block::block_prefix(cidr.ip()) {
            return Err(IpamError::CidrTooSmall(cidr));
        }
        let pools = self.enabled_pools(cidr.is_ipv4()).await?;
        if !pools.iter().any(|p| p.contains(cidr.network())) {
            return Err(IpamError::CidrNotInPool(cidr));
        }
        let config = self.config().await?;
        let (mut claimed, mut failed) = (Vec::new(), Vec::new());
        for i in 0..blocks_in(&cidr) {
            let b = nth_block(&cidr, i);
            let bkey = block_key(&b);
            let akey = affinity_key(host, &b);
            let block = empty_block(b, Some(host), config.strict_affinity);
            let txn = Txn::new()
                .when(Compare::absent(bkey.clone()))
                .then(TxnOp::put(bkey, json(&block)))
                .then(TxnOp::put(akey.clone(), "{}"));
            match self.store.txn_or_read(txn).await? {
                TxnOutcome::Committed(revision) => {
                    self.remember(b, Some(Seen { block, revision }));
                    claimed.push(b);
                }
                TxnOutcome::Failed { current } => {
                    let existing = current[0].as_ref().map(parse_block).transpose()?;
                    match existing {
                        Some(s) if s.block.affine_host() == Some(host) => {
                            // Ours already; make sure the marker is there too.
                            self.store.put(&akey, b"{}").await?;
                            claimed.push(b);
                        }
                        _ => failed.push(b),
                    }
                }
            }
        }
        Ok((claimed, failed))
    }

    /// Releases `host`'s affinity to every block of `cidr` (blocks of other hosts are left).
    pub async fn release_affinity(&self, cidr: IpNetwork, host: &str) -> IpamResult<()> {
        for i in 0..blocks_in(&cidr) {
            self.release_block_affinity(host, nth_block(&cidr, i))
                .await?;
        }
        Ok(())
    }

    /// Drops `host`'s affinity to one block: an empty block is deleted, a non-empty one
    /// becomes unaffine (and goes when its last address is released). Atomic with the
    /// removal of the affinity key.
    async fn release_block_affinity(&self, host: &str, cidr: IpNetwork) -> IpamResult<()> {
        let akey = affinity_key(host, &cidr);
        let bkey = block_key(&cidr);
        for attempt in 0..MAX_RETRIES {
            let got = self.store.get_many(&[bkey.clone(), akey.clone()]).await?;
            let seen = got[0].as_ref().map(parse_block).transpose()?;
            let mut txn = Txn::new();
            match &seen {
                Some(s) if s.block.affine_host().is_some_and(|h| h != host) => {
                    // Not ours: only our stray marker (if any) goes.
                }
                Some(s) => {
                    txn = txn.when(Compare::revision(bkey.clone(), s.revision));
                    if s.block.is_empty() {
                        txn = txn.then(TxnOp::delete(bkey.clone()));
                    } else {
                        let mut block = s.block.clone();
                        block.affinity = None;
                        txn = txn.then(TxnOp::put(bkey.clone(), json(&block)));
                    }
                }
                None => {}
            }
            if let Some(a) = &got[1] {
                txn = txn
                    .when(Compare::revision(akey.clone(), a.mod_revision))
                    .then(TxnOp::delete(akey.clone()));
            }
            if txn.ops.is_empty() {
                return Ok(());
            }
            match self.store.txn_or_read(txn).await? {
                TxnOutcome::Committed(_) => {
                    self.remember(cidr, None);
                    self.set_affine(host, cidr.is_ipv4(), None);
                    return Ok(());
                }
                TxnOutcome::Failed { .. } => backoff(attempt).await,
            }
        }
        Err(IpamError::MaxRetries { key: akey })
    }

    /// Releases every affinity `host` holds (IPv4 and IPv6).
    pub async fn release_host_affinities(&self, host: &str) -> IpamResult<()> {
        for v4 in [true, false] {
            for cidr in self.affine_blocks(host, v4).await? {
                self.release_block_affinity(host, cidr).await?;
            }
        }
        Ok(())
    }

    /// Removes a host from IPAM: its affinities, then its whole IPAM tree. Addresses it still
    /// holds stay allocated (in now unaffine blocks).
    pub async fn remove_host(&self, host: &str) -> IpamResult<()> {
        if host.is_empty() {
            return Err(IpamError::NoHost);
        }
        self.release_host_affinities(host).await?;
        self.store
            .delete_prefix(&format!("/calico/ipam/v2/host/{host}/"))
            .await?;
        Ok(())
    }

    /// The handle and attributes recorded for an assigned address.
    pub async fn get_assignment_attributes(
        &self,
        ip: IpAddr,
    ) -> IpamResult<(Option<String>, BTreeMap<String, String>)> {
        let cidr = block_of(ip);
        let (seen, _) = self.read(&cidr, None).await?;
        let seen = seen.ok_or(IpamError::NotAssigned(ip))?;
        let index =
            seen.block.allocations[ordinal(&cidr, ip)].ok_or(IpamError::NotAssignedInBlock(ip))?;
        let attr = seen
            .block
            .attributes
            .get(index)
            .cloned()
            .unwrap_or_default();
        Ok((attr.handle_id, attr.secondary.unwrap_or_default()))
    }
}

/// Which addresses of a block to release.
enum Selection {
    Ordinals(Vec<usize>),
    Handle(String),
}
