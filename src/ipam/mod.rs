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

mod affinity;
mod assign;
mod batch;
mod block;
mod cache;
mod check;
mod error;
mod pool;
mod release;
mod tenant;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnetwork::IpNetwork;
use rand::Rng;
use tracing::warn;

pub use assign::AutoAssignArgs;
pub use batch::MAX_BATCH;
pub use block::{
    BLOCK_PREFIX_V4, BLOCK_PREFIX_V6, BLOCK_SIZE, Owner, Released, address, block_of, blocks_in,
    empty_block, nth_block, ordinal,
};
pub use check::{CheckReport, Finding};
pub use error::{IpamError, IpamResult};
pub use tenant::{RESERVED_HANDLE_PREFIX, reserved_handle, tenants_with_ipam};

use crate::calico::CalicoKey;
use crate::store::{Compare, Datastore, TxnOp};
use cache::{Seen, SeenHandle};

/// How many times a conflicting transaction is retried before giving up.
pub const MAX_RETRIES: usize = 100;

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

/// Where Calico keeps its IPAM keys; a tenant scope mirrors the layout under its own root.
pub const CALICO_IPAM_ROOT: &str = "/calico/ipam/v2/";

/// Whose addresses an [`Ipam`] hands out, and so where it keeps its blocks, affinities and
/// handles.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpamScope {
    /// Calico's keys (`/calico/ipam/v2/…`) and Calico's pools: routed mode and the
    /// container runtimes, as Calico does.
    Calico,
    /// One tenant's own keys (`/tenet/v1/tenant/<tenant>/ipam/…`, Calico's layout), for the
    /// GRE/VXLAN overlays where tenants may use overlapping subnets. The pools are the
    /// subnets asked for ([`Ipam::assign_in_subnet`]).
    Tenant(String),
}

impl IpamScope {
    /// The prefix every key of this scope starts with.
    pub fn root(&self) -> String {
        match self {
            IpamScope::Calico => CALICO_IPAM_ROOT.to_string(),
            IpamScope::Tenant(t) => format!(
                "{}tenant/{}/ipam/",
                crate::keyspace::TENET_ROOT,
                crate::calico::escape_name(t)
            ),
        }
    }

    /// `calico_path` (a key under Calico's root) moved into this scope.
    pub(super) fn scoped(&self, calico_path: String) -> String {
        match self {
            IpamScope::Calico => calico_path,
            IpamScope::Tenant(_) => {
                format!("{}{}", self.root(), &calico_path[CALICO_IPAM_ROOT.len()..])
            }
        }
    }
}

/// A key of any scope written as Calico's, so that Calico's key parser reads it.
pub(super) fn as_calico_path(key: &str) -> std::borrow::Cow<'_, str> {
    let tenants = format!("{}tenant/", crate::keyspace::TENET_ROOT);
    if let Some(rest) = key.strip_prefix(&tenants)
        && let Some((_, tail)) = rest.split_once("/ipam/")
    {
        return format!("{CALICO_IPAM_ROOT}{tail}").into();
    }
    key.into()
}

pub(super) fn blocks_prefix(v4: bool) -> &'static str {
    if v4 {
        crate::calico::IPAM_BLOCKS_V4
    } else {
        crate::calico::IPAM_BLOCKS_V6
    }
}

pub(super) fn json(value: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("IPAM values serialise")
}

/// The ops that bring a handle from `seen` to `seen + delta` addresses in `block`
/// (negative deltas clamp at zero: Calico-era handles may be under-counted).
pub(super) fn handle_ops(
    key: String,
    handle: &str,
    seen: &SeenHandle,
    block: &IpNetwork,
    delta: i64,
) -> (Compare, Option<TxnOp>) {
    handle_ops_many(key, handle, seen, &[(*block, delta)])
}

/// [`handle_ops`] for changes in several blocks at once.
pub(super) fn handle_ops_many(
    key: String,
    handle: &str,
    seen: &SeenHandle,
    deltas: &[(IpNetwork, i64)],
) -> (Compare, Option<TxnOp>) {
    let (mut value, revision) = seen.clone().unwrap_or_default();
    for (block, delta) in deltas {
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
    }
    let compare = Compare::revision(key.clone(), revision);
    let op = if value.block.is_empty() {
        seen.is_some().then(|| TxnOp::delete(key))
    } else {
        Some(TxnOp::put(key, json(&value)))
    };
    (compare, op)
}

pub(super) async fn backoff(attempt: usize) {
    let cap = 1u64 << attempt.min(6);
    let ms = rand::rng().random_range(0..=cap);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// The writes for the addresses an allocation got.
type WritesFor = dyn Fn(&[std::net::IpAddr]) -> Vec<crate::store::TxnOp> + Send + Sync;

/// Writes that belong with an allocation (a workload endpoint naming its address): made in
/// the transaction that assigns the address, so that both land or neither, with one round
/// trip to etcd less. `ops` gets the addresses assigned. Paths other than a host's own
/// blocks (a new block claimed, another host's borrowed, a chosen address) do not take them:
/// [`ThenWrite::written`] tells the caller whether it must write them itself.
#[derive(Clone)]
pub struct ThenWrite {
    ops: Arc<WritesFor>,
    written: Arc<std::sync::atomic::AtomicBool>,
}

impl ThenWrite {
    pub fn new(
        ops: impl Fn(&[std::net::IpAddr]) -> Vec<crate::store::TxnOp> + Send + Sync + 'static,
    ) -> Self {
        ThenWrite {
            ops: Arc::new(ops),
            written: Default::default(),
        }
    }

    /// Whether the writes were committed with an allocation.
    pub fn written(&self) -> bool {
        self.written.load(std::sync::atomic::Ordering::Acquire)
    }

    pub(super) fn ops(&self, addresses: &[std::net::IpAddr]) -> Vec<crate::store::TxnOp> {
        (self.ops)(addresses)
    }

    pub(super) fn mark_written(&self) {
        self.written
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

impl std::fmt::Debug for ThenWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThenWrite")
            .field("written", &self.written())
            .finish_non_exhaustive()
    }
}

/// (host, is IPv4) → the host's affine blocks.
type AffineBlocks = HashMap<(String, bool), Vec<IpNetwork>>;

/// The IPAM client. Cheap to share (`Arc`, or `clone`, which shares the caches).
#[derive(Debug, Clone)]
pub struct Ipam {
    store: Arc<dyn Datastore>,
    scope: IpamScope,
    /// Tenant subnets whose network, gateway and broadcast addresses are reserved (the cell
    /// set) or being reserved: allocations arriving together in a new subnet wait for one
    /// reservation rather than each racing the others for the same three addresses.
    reserved: Arc<Mutex<HashMap<IpNetwork, Arc<tokio::sync::OnceCell<()>>>>>,
    blocks: Arc<Mutex<HashMap<IpNetwork, Seen>>>,
    /// (host, is IPv4) → the blocks the host was last seen to hold affinity keys for.
    affine: Arc<Mutex<AffineBlocks>>,
    /// Allocations waiting to share a block's next transaction (`batch`).
    batches: Arc<Mutex<HashMap<batch::BatchKey, batch::Queue<batch::Request>>>>,
    /// Releases waiting to share a block's next transaction (`release`).
    release_batches: Arc<Mutex<HashMap<IpNetwork, batch::Queue<release::ReleaseRequest>>>>,
    group_commit: bool,
    /// One allocation at a time takes the slow path (listing affinities, claiming blocks);
    /// the count of those that ended tells the waiting ones to look at the blocks again.
    slow_path: Arc<tokio::sync::Mutex<()>>,
    slow_paths: Arc<std::sync::atomic::AtomicU64>,
    stats: Arc<IpamStats>,
}

/// What an [`Ipam`] (and its clones) did, for metrics: read with [`Ipam::stats`].
#[derive(Debug, Default)]
pub struct IpamStats {
    /// Addresses assigned.
    pub assigned: std::sync::atomic::AtomicU64,
    /// Addresses released.
    pub released: std::sync::atomic::AtomicU64,
    /// Transactions committed.
    pub transactions: std::sync::atomic::AtomicU64,
    /// Transactions that failed a compare (someone else changed a block, handle or
    /// affinity first) and were retried.
    pub conflicts: std::sync::atomic::AtomicU64,
}

impl Ipam {
    /// An IPAM on Calico's keys and pools.
    pub fn new(store: Arc<dyn Datastore>) -> Self {
        Self::with_scope(store, IpamScope::Calico)
    }

    /// An IPAM on `tenant`'s own keys (see [`IpamScope::Tenant`]).
    pub fn for_tenant(store: Arc<dyn Datastore>, tenant: &str) -> Self {
        Self::with_scope(store, IpamScope::Tenant(tenant.to_string()))
    }

    pub fn with_scope(store: Arc<dyn Datastore>, scope: IpamScope) -> Self {
        Self {
            store,
            scope,
            reserved: Default::default(),
            blocks: Default::default(),
            affine: Default::default(),
            batches: Default::default(),
            release_batches: Default::default(),
            group_commit: true,
            slow_path: Default::default(),
            slow_paths: Default::default(),
            stats: Default::default(),
        }
    }

    /// Turns group commit (concurrent allocations, and concurrent releases, from one block
    /// share a transaction; on by default) off or on: every allocation and release then
    /// commits alone, as before (benchmarks compare the two).
    pub fn with_group_commit(mut self, on: bool) -> Self {
        self.group_commit = on;
        self
    }

    pub fn store(&self) -> &Arc<dyn Datastore> {
        &self.store
    }

    pub fn stats(&self) -> &IpamStats {
        &self.stats
    }

    /// A transaction, counted as committed or as a conflict.
    pub(super) async fn commit(
        &self,
        txn: crate::store::Txn,
    ) -> IpamResult<crate::store::TxnOutcome> {
        use std::sync::atomic::Ordering::Relaxed;
        let outcome = self.store.txn_or_read(txn).await?;
        match &outcome {
            crate::store::TxnOutcome::Committed(_) => self.stats.transactions.fetch_add(1, Relaxed),
            crate::store::TxnOutcome::Failed { .. } => self.stats.conflicts.fetch_add(1, Relaxed),
        };
        Ok(outcome)
    }

    pub(super) fn count_assigned(&self, n: usize) {
        self.stats
            .assigned
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn scope(&self) -> &IpamScope {
        &self.scope
    }

    pub(super) fn bkey(&self, cidr: &IpNetwork) -> String {
        self.scope.scoped(block_key(cidr))
    }

    pub(super) fn akey(&self, host: &str, cidr: &IpNetwork) -> String {
        self.scope.scoped(affinity_key(host, cidr))
    }

    pub(super) fn hkey(&self, handle: &str) -> String {
        self.scope.scoped(handle_key(handle))
    }

    pub(super) fn blocks_root(&self, v4: bool) -> String {
        self.scope.scoped(blocks_prefix(v4).to_string())
    }
}
