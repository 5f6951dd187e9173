//! Releasing addresses, by address or by handle, each block with its handles' counts in one
//! transaction.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use tracing::warn;

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
            let keys: Vec<String> = handles.iter().map(|h| self.hkey(h)).collect();
            let handle_values = self.store.get_many(&keys).await?;
            let key = self.bkey(&cidr);
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
                let (cmp, op) = handle_ops(self.hkey(h), h, &seen_handle, &cidr, -count);
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
                    self.stats.released.fetch_add(
                        released.ordinals.len() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
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

/// Which addresses of a block to release.
enum Selection {
    Ordinals(Vec<usize>),
    Handle(String),
}
