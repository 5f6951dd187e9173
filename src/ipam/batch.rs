//! Group commit: allocations (and releases, `release.rs`) from one block that arrive while
//! another is being committed wait, then share one transaction. Without it, concurrent allocations on a host's affine
//! block (a node starting 100 workloads at once) each compare the same block revision, and
//! all but one retry — the rate stays at or below one transaction per allocation.
//!
//! The first request for a block becomes its leader: a task of its own (so that a caller
//! that is dropped cannot abandon the others' batch) that takes up to [`MAX_BATCH`] waiting
//! requests, assigns them all in a copy of the block and commits the block and every handle
//! involved in one transaction comparing all their revisions — the guarantees of a single
//! allocation (no address twice, handles exact, nothing half-written) hold for the batch as
//! a whole. It repeats while requests wait, then steps down. A batch that fails for another
//! reason than a conflict (etcd unreachable, retries exhausted) hands each request back to
//! run alone, so its caller gets the error a single allocation would.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;

use ipnetwork::IpNetwork;
use tokio::sync::oneshot;
use tracing::debug;

use super::cache::{SeenHandle, parse_block, parse_handle_opt};
use super::{Ipam, IpamResult, MAX_RETRIES, Owner, ThenWrite, address, backoff, handle_ops, json};
use crate::store::{Compare, Txn, TxnOp, TxnOutcome};

/// Requests per transaction: each brings a handle compare and put (and maybe one
/// [`ThenWrite`] put: 121 puts at most), and etcd allows 128 operations of each kind per
/// transaction by default.
pub const MAX_BATCH: usize = 60;

/// Requests that may share a transaction: one block, one host, the same affinity rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct BatchKey {
    pub cidr: IpNetwork,
    pub host: String,
    pub check_affinity: bool,
}

pub(super) use crate::store::group::Queue;

/// Queues `request` for `key`; true when nobody leads that queue yet and the caller must
/// start a leader.
pub(super) fn enqueue<K: Eq + Hash, R>(
    queues: &Mutex<HashMap<K, Queue<R>>>,
    key: K,
    request: R,
) -> bool {
    let mut queues = queues.lock().unwrap_or_else(|p| p.into_inner());
    queues.entry(key).or_default().push(request)
}

/// The leader's next batch for `key` (at most [`MAX_BATCH`] requests, oldest first); `None`
/// when nothing waits, and the leader steps down.
pub(super) fn next_batch<K: Eq + Hash, R>(
    queues: &Mutex<HashMap<K, Queue<R>>>,
    key: &K,
) -> Option<Vec<R>> {
    let mut queues = queues.lock().unwrap_or_else(|p| p.into_inner());
    let mut taken = 0;
    let batch = queues.get_mut(key)?.take(|_| {
        taken += 1;
        taken <= MAX_BATCH
    });
    if batch.is_none() {
        queues.remove(key);
    }
    batch
}

#[derive(Debug)]
pub(super) struct Request {
    n: usize,
    owner: Owner,
    then: Option<ThenWrite>,
    reply: oneshot::Sender<Reply>,
}

#[derive(Debug)]
enum Reply {
    Assigned(Vec<IpAddr>),
    /// The batch failed as a whole; run this request alone for its own error.
    Alone,
}

impl Ipam {
    /// Assigns up to `n` addresses from `cidr` for `owner`, in a transaction shared with
    /// the requests for the same block that wait with it.
    pub(super) async fn assign_from_block(
        &self,
        cidr: IpNetwork,
        n: usize,
        host: &str,
        owner: &Owner,
        check_affinity: bool,
        then: Option<&ThenWrite>,
    ) -> IpamResult<Vec<IpAddr>> {
        if !self.group_commit {
            return self
                .assign_alone(cidr, n, host, owner, check_affinity, then)
                .await;
        }
        let key = BatchKey {
            cidr,
            host: host.to_string(),
            check_affinity,
        };
        let (reply, answer) = oneshot::channel();
        let request = Request {
            n,
            owner: owner.clone(),
            then: then.cloned(),
            reply,
        };
        if enqueue(&self.batches, key.clone(), request) {
            tokio::spawn(self.clone().lead(key));
        }
        match answer.await {
            Ok(Reply::Assigned(addresses)) => Ok(addresses),
            // The batch failed, or its leader died with the runtime: alone, for the error.
            Ok(Reply::Alone) | Err(_) => {
                self.assign_alone(cidr, n, host, owner, check_affinity, then)
                    .await
            }
        }
    }

    async fn lead(self, key: BatchKey) {
        while let Some(batch) = next_batch(&self.batches, &key) {
            match self.commit_batch(&key, &batch).await {
                Ok(assigned) => {
                    for (request, addresses) in batch.into_iter().zip(assigned) {
                        let _ = request.reply.send(Reply::Assigned(addresses));
                    }
                }
                Err(e) => {
                    debug!(cidr = %key.cidr, error = %e, "a batch failed; its requests run alone");
                    for request in batch {
                        let _ = request.reply.send(Reply::Alone);
                    }
                }
            }
        }
    }

    /// One transaction for every request of `batch` (retried on conflicts); the addresses
    /// each request got, in order (none when the block is full or no longer usable).
    async fn commit_batch(
        &self,
        key: &BatchKey,
        batch: &[Request],
    ) -> IpamResult<Vec<Vec<IpAddr>>> {
        let cidr = key.cidr;
        let nothing = || vec![Vec::new(); batch.len()];
        let mut seen = match self.cached(&cidr) {
            Some(s) => Some(s),
            None => self.read(&cidr, None).await?.0,
        };
        // Handles are assumed new until a failed compare says otherwise.
        let mut handles: HashMap<String, SeenHandle> = HashMap::new();
        for attempt in 0..MAX_RETRIES {
            let Some(current) = seen.clone() else {
                return Ok(nothing());
            };
            if !self.usable(cidr, &current, &key.host, key.check_affinity) {
                return Ok(nothing());
            }
            let mut block = current.block.clone();
            let ordinals: Vec<Vec<usize>> =
                batch.iter().map(|r| block.assign(r.n, &r.owner)).collect();
            if ordinals.iter().all(Vec::is_empty) {
                return Ok(nothing());
            }
            let mut deltas: BTreeMap<&str, i64> = BTreeMap::new();
            for (request, got) in batch.iter().zip(&ordinals) {
                if let (Some(h), false) = (request.owner.handle.as_deref(), got.is_empty()) {
                    *deltas.entry(h).or_default() += got.len() as i64;
                }
            }
            let bkey = self.bkey(&cidr);
            let mut txn = Txn::new().when(Compare::revision(bkey.clone(), current.revision));
            for (&h, &delta) in &deltas {
                let seen_handle = handles.get(h).cloned().flatten();
                let (cmp, op) = handle_ops(self.hkey(h), h, &seen_handle, &cidr, delta);
                txn = txn.when(cmp);
                txn.ops.extend(op);
            }
            txn = txn.then(TxnOp::put(bkey, json(&block)));
            let addresses: Vec<Vec<IpAddr>> = ordinals
                .iter()
                .map(|o| o.iter().map(|&i| address(&cidr, i)).collect())
                .collect();
            for (request, got) in batch.iter().zip(&addresses) {
                if let (Some(then), false) = (&request.then, got.is_empty()) {
                    txn.ops.extend(then.ops(got));
                }
            }
            match self.commit(txn).await? {
                TxnOutcome::Committed(revision) => {
                    self.remember(cidr, Some(super::cache::Seen { block, revision }));
                    self.count_assigned(ordinals.iter().map(Vec::len).sum());
                    for (request, got) in batch.iter().zip(&addresses) {
                        if let (Some(then), false) = (&request.then, got.is_empty()) {
                            then.mark_written();
                        }
                    }
                    debug!(%cidr, host = %key.host, requests = batch.len(), "assigned in one transaction");
                    return Ok(addresses);
                }
                TxnOutcome::Failed { current } => {
                    seen = current[0].as_ref().map(parse_block).transpose()?;
                    self.remember(cidr, seen.clone());
                    for (i, &h) in deltas.keys().enumerate() {
                        let value = parse_handle_opt(current.get(i + 1).and_then(Option::as_ref))?;
                        handles.insert(h.to_string(), value);
                    }
                    backoff(attempt).await;
                }
            }
        }
        Err(super::IpamError::MaxRetries {
            key: self.bkey(&cidr),
        })
    }
}
