//! The datastore: one trait, two backends.
//!
//! [`EtcdStore`] talks to a real etcd through the v3 API and is what agents run against;
//! [`MemoryStore`] keeps the same contract in-process (revisions, compare-and-swap, watch
//! history, compaction, leases) for unit tests and single-process tools. A single contract
//! suite (`tests/store_contract.rs`) runs against both, so code written against
//! [`Datastore`] behaves the same on either.
//!
//! Calico 2.x used etcd's v2 API; tenet stores the same keys and values through v3, where a
//! key's *revision* is its `mod_revision` and every compare-and-swap is a transaction that
//! compares it.

pub mod config;
mod error;
mod etcd;
pub mod group;
mod memory;
pub mod status;

use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use futures::Stream;

pub use config::{ConfigError, DatastoreConfig};
pub use error::{StoreError, StoreResult};
pub use etcd::{EtcdOptions, EtcdStore, EtcdTls};
pub use group::GroupedStore;
pub use memory::MemoryStore;
pub use status::LeasedKey;

/// A store revision (etcd `mod_revision`). Revisions are positive and grow with every write.
pub type Revision = i64;

/// Identifier of a lease; keys attached to it are deleted when it expires or is revoked.
pub type LeaseId = i64;

/// One key with its value and the revisions that describe it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the last write to this key; the value to pass back for compare-and-swap.
    pub mod_revision: Revision,
    /// Revision at which the key was (last) created.
    pub create_revision: Revision,
    /// The lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

impl KeyValue {
    /// The value as UTF-8 text (Calico values are JSON or raw strings).
    pub fn value_str(&self) -> Result<&str, StoreError> {
        std::str::from_utf8(&self.value).map_err(|e| StoreError::Invalid {
            key: self.key.clone(),
            reason: format!("value is not UTF-8: {e}"),
        })
    }
}

impl fmt::Debug for KeyValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyValue")
            .field("key", &self.key)
            .field("value", &String::from_utf8_lossy(&self.value))
            .field("mod_revision", &self.mod_revision)
            .field("create_revision", &self.create_revision)
            .field("lease", &self.lease)
            .finish()
    }
}

/// The result of listing a prefix: the keys (sorted) and the store revision they were read at.
///
/// Watching from `revision + 1` continues exactly where the listing left off.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub kvs: Vec<KeyValue>,
    pub revision: Revision,
}

/// A condition of a [`Txn`]. Every compare names one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key's `mod_revision` equals this revision; revision 0 means "the key is absent".
    ModRevision { key: String, revision: Revision },
}

impl Compare {
    pub fn revision(key: impl Into<String>, revision: Revision) -> Self {
        Compare::ModRevision {
            key: key.into(),
            revision,
        }
    }

    /// The key must not exist.
    pub fn absent(key: impl Into<String>) -> Self {
        Compare::ModRevision {
            key: key.into(),
            revision: 0,
        }
    }

    pub fn key(&self) -> &str {
        match self {
            Compare::ModRevision { key, .. } => key,
        }
    }

    /// Evaluates the compare against the key's current revision (0 when absent).
    fn holds(&self, current: Revision) -> bool {
        match self {
            Compare::ModRevision { revision, .. } => *revision == current,
        }
    }
}

/// A write inside a [`Txn`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    /// Deleting an absent key inside a transaction is not an error (as in etcd).
    Delete { key: String },
}

impl TxnOp {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        TxnOp::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }

    pub fn delete(key: impl Into<String>) -> Self {
        TxnOp::Delete { key: key.into() }
    }

    pub fn key(&self) -> &str {
        match self {
            TxnOp::Put { key, .. } | TxnOp::Delete { key } => key,
        }
    }
}

/// An all-or-nothing multi-key transaction: if every compare holds, every op is applied at
/// one new revision; otherwise nothing is written and the first failing compare is reported
/// as [`StoreError::Conflict`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub ops: Vec<TxnOp>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn when(mut self, compare: Compare) -> Self {
        self.compares.push(compare);
        self
    }

    pub fn then(mut self, op: TxnOp) -> Self {
        self.ops.push(op);
        self
    }

    /// etcd refuses a transaction that touches one key twice; so do we, on every backend.
    fn validate(&self) -> StoreResult<()> {
        let mut seen = std::collections::HashSet::new();
        for op in &self.ops {
            if !seen.insert(op.key()) {
                return Err(StoreError::Invalid {
                    key: op.key().to_string(),
                    reason: "a transaction may write a key only once".into(),
                });
            }
        }
        if self.ops.len() > MAX_TXN_OPS {
            return Err(StoreError::Invalid {
                key: self.ops[0].key().to_string(),
                reason: format!(
                    "transaction has {} operations; the limit is {MAX_TXN_OPS}",
                    self.ops.len()
                ),
            });
        }
        Ok(())
    }
}

/// The key of the first compare that `current` (the compared keys' values, in order)
/// breaks; the first compare's key if none seems to (a concurrent change undid it).
pub(crate) fn failed_compare(compares: &[Compare], current: &[Option<KeyValue>]) -> String {
    compares
        .iter()
        .zip(current)
        .find(|(c, kv)| !c.holds(kv.as_ref().map_or(0, |kv| kv.mod_revision)))
        .or(compares.first().zip(current.first()))
        .map(|(c, _)| c.key().to_string())
        .unwrap_or_default()
}

/// The result of [`Datastore::txn_or_read`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Every compare held; the ops were applied at this revision.
    Committed(Revision),
    /// Some compare failed; nothing was written. `current` holds, for each compare in
    /// order, the compared key as it is now, so the caller can retry without reading again.
    Failed { current: Vec<Option<KeyValue>> },
}

/// etcd's default `--max-txn-ops`; the memory backend enforces the same limit.
pub const MAX_TXN_OPS: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub key: String,
    /// The new value (empty for deletes).
    pub value: Vec<u8>,
    /// The revision of the change. Events arrive in revision order.
    pub revision: Revision,
}

type EventStream = Pin<Box<dyn Stream<Item = StoreResult<WatchEvent>> + Send>>;

/// A stream of changes under a prefix. Dropping it stops the watch.
///
/// A watch yields events in revision order. If its start revision has been compacted it
/// yields one [`StoreError::Compacted`] and ends: the caller must list again and watch from
/// the listing's revision.
pub struct Watch {
    events: EventStream,
}

impl Watch {
    fn new(events: EventStream) -> Self {
        Self { events }
    }

    /// The next event; `None` when the watch has ended.
    pub async fn next(&mut self) -> Option<StoreResult<WatchEvent>> {
        use futures::StreamExt;
        self.events.next().await
    }
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Watch")
    }
}

/// A key-value datastore with revisions, compare-and-swap, transactions, watches and leases.
#[async_trait]
pub trait Datastore: Send + Sync + fmt::Debug {
    /// The key's value and revision, or `None` when absent.
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>>;

    /// Every key under `prefix`, sorted, read at one revision (paginated internally).
    async fn list(&self, prefix: &str) -> StoreResult<Listing>;

    /// Writes the key only if it does not exist ([`StoreError::AlreadyExists`] otherwise).
    async fn create(&self, key: &str, value: &[u8]) -> StoreResult<Revision>;

    /// Writes the key only if its revision is still `expected`
    /// ([`StoreError::Conflict`] if it changed, [`StoreError::NotFound`] if it is gone).
    async fn update(&self, key: &str, value: &[u8], expected: Revision) -> StoreResult<Revision>;

    /// Unconditional write (create or overwrite).
    async fn put(&self, key: &str, value: &[u8]) -> StoreResult<Revision>;

    /// Unconditional write of a key attached to a lease: it goes when the lease does.
    async fn put_with_lease(
        &self,
        key: &str,
        value: &[u8],
        lease: LeaseId,
    ) -> StoreResult<Revision>;

    /// Deletes the key, optionally only if its revision is still `expected`.
    /// An absent key is [`StoreError::NotFound`].
    async fn delete(&self, key: &str, expected: Option<Revision>) -> StoreResult<Revision>;

    /// Deletes every key under `prefix`; returns how many were deleted.
    async fn delete_prefix(&self, prefix: &str) -> StoreResult<u64>;

    /// Applies a transaction; returns the revision it was committed at, or
    /// [`StoreError::Conflict`] naming the first compare that did not hold.
    async fn txn(&self, txn: Txn) -> StoreResult<Revision> {
        let compares = txn.compares.clone();
        match self.txn_or_read(txn).await? {
            TxnOutcome::Committed(rev) => Ok(rev),
            TxnOutcome::Failed { current } => Err(StoreError::Conflict {
                key: failed_compare(&compares, &current),
            }),
        }
    }

    /// Applies a transaction in one round trip; on failure returns the compared keys' current
    /// values instead of an error.
    async fn txn_or_read(&self, txn: Txn) -> StoreResult<TxnOutcome>;

    /// Reads several keys at one revision, in one round trip where the backend allows.
    async fn get_many(&self, keys: &[String]) -> StoreResult<Vec<Option<KeyValue>>>;

    /// Watches every key under `prefix`, starting at revision `start` (inclusive);
    /// `start == 0` means "changes from now on".
    async fn watch(&self, prefix: &str, start: Revision) -> StoreResult<Watch>;

    /// Grants a lease that lives `ttl` unless kept alive.
    async fn grant_lease(&self, ttl: Duration) -> StoreResult<LeaseId>;

    /// Refreshes a lease; returns its new time to live.
    async fn keep_alive(&self, lease: LeaseId) -> StoreResult<Duration>;

    /// Revokes a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> StoreResult<()>;

    /// Discards history up to `revision`; watches that start at or before it get
    /// [`StoreError::Compacted`].
    async fn compact(&self, revision: Revision) -> StoreResult<()>;

    /// The store's current revision.
    async fn revision(&self) -> StoreResult<Revision>;
}

/// The end of the key range covering every key that starts with `prefix` (etcd's rule:
/// increment the last byte that is not 0xff; an empty or all-0xff prefix means "to the end").
pub(crate) fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_range_end_increments_last_byte() {
        assert_eq!(prefix_range_end(b"/calico/"), b"/calico0".to_vec());
        assert_eq!(prefix_range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_range_end(b""), vec![0]);
    }

    #[test]
    fn txn_rejects_duplicate_keys() {
        let txn = Txn::new()
            .then(TxnOp::put("/a", "1"))
            .then(TxnOp::delete("/a"));
        let err = txn.validate().unwrap_err();
        assert!(
            matches!(err, StoreError::Invalid { ref key, .. } if key == "/a"),
            "{err}"
        );
    }
}
