//! Releasing addresses, by address or by handle, each block with its handles' counts in one
//! transaction — shared by the concurrent releases of the same block (group commit).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::batch::{enqueue, next_batch};

use super::cache::{parse_block, parse_handle, parse_handle_opt};
use super::{
    Ipam, IpamError, IpamResult, MAX_RETRIES, Released, Seen, address, backoff, block_of,
    handle_ops, json, ordinal,
};
use crate::store::{Compare, StoreError, Txn, TxnOp, TxnOutcome};

impl Ipam {
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
            .get(&self.hkey(handle))
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
        if let Some(kv) = self.store.get(&self.hkey(handle)).await? {
            match self.store.delete(&kv.key, Some(kv.mod_revision)).await {
                Ok(_) | Err(StoreError::NotFound { .. }) | Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(released)
    }

    /// Releases the selected addresses of one block, together with their handles' counts,
    /// in one transaction shared with the releases of the same block that wait with it
    /// (group commit, as for allocations: `batch.rs`). An empty block nobody is affine to is
    /// deleted.
    async fn release_from_block(
        &self,
        cidr: IpNetwork,
        selection: &Selection,
    ) -> IpamResult<Released> {
        if !self.group_commit {
            return self.release_alone(cidr, selection).await;
        }
        let (reply, answer) = oneshot::channel();
        let request = ReleaseRequest {
            selection: selection.clone(),
            reply,
        };
        if enqueue(&self.release_batches, cidr, request) {
            tokio::spawn(self.clone().lead_releases(cidr));
        }
        match answer.await {
            Ok(ReleaseReply::Released(r)) => Ok(r),
            // The batch failed, or its leader died with the runtime: alone, for the error.
            Ok(ReleaseReply::Alone) | Err(_) => self.release_alone(cidr, selection).await,
        }
    }

    async fn release_alone(&self, cidr: IpNetwork, selection: &Selection) -> IpamResult<Released> {
        let mut released = self
            .release_selections(cidr, std::slice::from_ref(selection))
            .await?;
        Ok(released.remove(0))
    }

    async fn lead_releases(self, cidr: IpNetwork) {
        while let Some(batch) = next_batch(&self.release_batches, &cidr) {
            let selections: Vec<Selection> = batch.iter().map(|r| r.selection.clone()).collect();
            match self.release_selections(cidr, &selections).await {
                Ok(released) => {
                    for (request, r) in batch.into_iter().zip(released) {
                        let _ = request.reply.send(ReleaseReply::Released(r));
                    }
                }
                Err(e) => {
                    debug!(%cidr, error = %e, "a release batch failed; its requests run alone");
                    for request in batch {
                        let _ = request.reply.send(ReleaseReply::Alone);
                    }
                }
            }
        }
    }

    /// Applies `selections` one after the other to a copy of the block and commits the
    /// block and every handle involved in one transaction (retried on conflicts); what each
    /// selection released, in order. An address selected twice is released by the first.
    async fn release_selections(
        &self,
        cidr: IpNetwork,
        selections: &[Selection],
    ) -> IpamResult<Vec<Released>> {
        let mut seen = match self.cached(&cidr) {
            Some(s) => Some(s),
            None => self.read(&cidr, None).await?.0,
        };
        for attempt in 0..MAX_RETRIES {
            let Some(current) = seen.clone() else {
                return Ok(selections
                    .iter()
                    .map(|selection| Released {
                        not_allocated: match selection {
                            Selection::Ordinals(o) => o.clone(),
                            Selection::Handle(_) => Vec::new(),
                        },
                        ..Released::default()
                    })
                    .collect());
            };
            let mut block = current.block.clone();
            let released: Vec<Released> = selections
                .iter()
                .map(|selection| {
                    let ordinals = match selection {
                        Selection::Ordinals(o) => o.clone(),
                        Selection::Handle(h) => block.ordinals_of(h),
                    };
                    block.release(&ordinals)
                })
                .collect();
            if released.iter().all(|r| r.ordinals.is_empty()) {
                return Ok(released);
            }
            let mut per_handle: BTreeMap<&str, u64> = BTreeMap::new();
            for r in &released {
                for (h, n) in &r.per_handle {
                    *per_handle.entry(h.as_str()).or_default() += n;
                }
            }
            let keys: Vec<String> = per_handle.keys().map(|h| self.hkey(h)).collect();
            let handle_values = self.store.get_many(&keys).await?;
            let key = self.bkey(&cidr);
            let mut txn = Txn::new().when(Compare::revision(key.clone(), current.revision));
            for ((&h, &count), kv) in per_handle.iter().zip(&handle_values) {
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
                let (cmp, op) = handle_ops(self.hkey(h), h, &seen_handle, &cidr, -(count as i64));
                txn = txn.when(cmp);
                txn.ops.extend(op);
            }
            let delete_block = block.is_empty() && block.affinity.is_none();
            txn = txn.then(if delete_block {
                TxnOp::delete(key)
            } else {
                TxnOp::put(key, json(&block))
            });
            match self.commit(txn).await? {
                TxnOutcome::Committed(revision) => {
                    let count: usize = released.iter().map(|r| r.ordinals.len()).sum();
                    self.stats
                        .released
                        .fetch_add(count as u64, std::sync::atomic::Ordering::Relaxed);
                    if selections.len() > 1 {
                        debug!(%cidr, requests = selections.len(), "released in one transaction");
                    }
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
            key: self.bkey(&cidr),
        })
    }
}

/// A release waiting for its block's next transaction.
#[derive(Debug)]
pub(super) struct ReleaseRequest {
    selection: Selection,
    reply: oneshot::Sender<ReleaseReply>,
}

#[derive(Debug)]
enum ReleaseReply {
    Released(Released),
    /// The batch failed as a whole; run this release alone for its own error.
    Alone,
}

/// Which addresses of a block to release.
#[derive(Debug, Clone)]
enum Selection {
    Ordinals(Vec<usize>),
    Handle(String),
}
