//! In-process datastore with etcd's semantics: a global revision counter, per-key
//! mod/create revisions, an event history for watches from a past revision, compaction and
//! leases that expire on their own.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    Datastore, EventKind, KeyValue, LeaseId, Listing, Revision, StoreError, StoreResult, Txn,
    TxnOp, TxnOutcome, Watch, WatchEvent,
};

/// The in-memory backend. Cloning gives another handle on the same data.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("MemoryStore")
            .field("revision", &s.revision)
            .field("keys", &s.kvs.len())
            .finish()
    }
}

#[derive(Default)]
struct State {
    revision: Revision,
    /// History at or below this revision is gone.
    compacted: Revision,
    kvs: BTreeMap<String, KeyValue>,
    history: Vec<WatchEvent>,
    watchers: Vec<Watcher>,
    leases: HashMap<LeaseId, LeaseState>,
    next_lease: LeaseId,
}

struct Watcher {
    prefix: String,
    tx: mpsc::UnboundedSender<StoreResult<WatchEvent>>,
}

struct LeaseState {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way later
        // readers would misinterpret (each mutation completes before the next), so recover.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn_lease_reaper(&self, id: LeaseId) {
        let weak: Weak<Mutex<State>> = Arc::downgrade(&self.state);
        tokio::spawn(async move {
            loop {
                let deadline = {
                    let Some(state) = weak.upgrade() else { return };
                    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
                    let Some(lease) = s.leases.get(&id) else {
                        return;
                    };
                    if lease.deadline <= Instant::now() {
                        s.expire_lease(id);
                        return;
                    }
                    lease.deadline
                };
                tokio::time::sleep_until(deadline).await;
            }
        });
    }
}

impl State {
    fn current(&self, key: &str) -> Revision {
        self.kvs.get(key).map_or(0, |kv| kv.mod_revision)
    }

    /// Applies writes at one new revision and tells the watchers.
    fn apply(&mut self, ops: Vec<TxnOp>) -> Revision {
        self.revision += 1;
        let rev = self.revision;
        for op in ops {
            let event = match op {
                TxnOp::Put { key, value, lease } => {
                    let create_revision = match self.kvs.get(&key) {
                        Some(old) => {
                            if let Some(old_lease) = old.lease.filter(|l| Some(*l) != lease)
                                && let Some(l) = self.leases.get_mut(&old_lease)
                            {
                                l.keys.remove(&key);
                            }
                            old.create_revision
                        }
                        None => rev,
                    };
                    if let Some(l) = lease.and_then(|id| self.leases.get_mut(&id)) {
                        l.keys.insert(key.clone());
                    }
                    self.kvs.insert(
                        key.clone(),
                        KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                            mod_revision: rev,
                            create_revision,
                            lease,
                        },
                    );
                    WatchEvent {
                        kind: EventKind::Put,
                        key,
                        value,
                        revision: rev,
                    }
                }
                TxnOp::Delete { key } => {
                    let Some(old) = self.kvs.remove(&key) else {
                        continue;
                    };
                    if let Some(l) = old.lease.and_then(|id| self.leases.get_mut(&id)) {
                        l.keys.remove(&key);
                    }
                    WatchEvent {
                        kind: EventKind::Delete,
                        key,
                        value: Vec::new(),
                        revision: rev,
                    }
                }
            };
            self.watchers.retain(|w| {
                !event.key.starts_with(&w.prefix) || w.tx.send(Ok(event.clone())).is_ok()
            });
            self.history.push(event);
        }
        rev
    }

    fn check_lease(&self, id: LeaseId) -> StoreResult<()> {
        if self.leases.contains_key(&id) {
            Ok(())
        } else {
            Err(StoreError::NotFound {
                key: format!("lease {id:x}"),
            })
        }
    }

    fn expire_lease(&mut self, id: LeaseId) {
        if let Some(lease) = self.leases.remove(&id) {
            let ops: Vec<TxnOp> = lease.keys.into_iter().map(TxnOp::delete).collect();
            if !ops.is_empty() {
                self.apply(ops);
            }
        }
    }
}

#[async_trait]
impl Datastore for MemoryStore {
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        Ok(self.lock().kvs.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> StoreResult<Listing> {
        let s = self.lock();
        let kvs = s
            .kvs
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        Ok(Listing {
            kvs,
            revision: s.revision,
        })
    }

    async fn create(&self, key: &str, value: &[u8]) -> StoreResult<Revision> {
        let mut s = self.lock();
        if s.kvs.contains_key(key) {
            return Err(StoreError::AlreadyExists { key: key.into() });
        }
        Ok(s.apply(vec![TxnOp::put(key, value)]))
    }

    async fn update(&self, key: &str, value: &[u8], expected: Revision) -> StoreResult<Revision> {
        if expected <= 0 {
            return Err(StoreError::Invalid {
                key: key.into(),
                reason: format!("update needs the key's revision, got {expected}"),
            });
        }
        let mut s = self.lock();
        match s.current(key) {
            0 => Err(StoreError::NotFound { key: key.into() }),
            cur if cur != expected => Err(StoreError::Conflict { key: key.into() }),
            _ => {
                let lease = s.kvs.get(key).and_then(|kv| kv.lease);
                Ok(s.apply(vec![TxnOp::Put {
                    key: key.into(),
                    value: value.into(),
                    lease,
                }]))
            }
        }
    }

    async fn put(&self, key: &str, value: &[u8]) -> StoreResult<Revision> {
        Ok(self.lock().apply(vec![TxnOp::put(key, value)]))
    }

    async fn put_with_lease(
        &self,
        key: &str,
        value: &[u8],
        lease: LeaseId,
    ) -> StoreResult<Revision> {
        let mut s = self.lock();
        s.check_lease(lease)?;
        Ok(s.apply(vec![TxnOp::Put {
            key: key.into(),
            value: value.into(),
            lease: Some(lease),
        }]))
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> StoreResult<Revision> {
        let mut s = self.lock();
        match (s.current(key), expected) {
            (0, _) => Err(StoreError::NotFound { key: key.into() }),
            (cur, Some(exp)) if cur != exp => Err(StoreError::Conflict { key: key.into() }),
            _ => Ok(s.apply(vec![TxnOp::delete(key)])),
        }
    }

    async fn delete_prefix(&self, prefix: &str) -> StoreResult<u64> {
        let mut s = self.lock();
        let keys: Vec<String> = s
            .kvs
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect();
        let n = keys.len() as u64;
        if n > 0 {
            s.apply(keys.into_iter().map(TxnOp::delete).collect());
        }
        Ok(n)
    }

    async fn txn_or_read(&self, txn: Txn) -> StoreResult<TxnOutcome> {
        txn.validate()?;
        let mut s = self.lock();
        if txn.compares.iter().any(|c| !c.holds(s.current(c.key()))) {
            let current = txn
                .compares
                .iter()
                .map(|c| s.kvs.get(c.key()).cloned())
                .collect();
            return Ok(TxnOutcome::Failed { current });
        }
        for op in &txn.ops {
            if let TxnOp::Put {
                lease: Some(id), ..
            } = op
            {
                s.check_lease(*id)?;
            }
        }
        if txn.ops.is_empty() {
            return Ok(TxnOutcome::Committed(s.revision));
        }
        Ok(TxnOutcome::Committed(s.apply(txn.ops)))
    }

    async fn get_many(&self, keys: &[String]) -> StoreResult<Vec<Option<KeyValue>>> {
        let s = self.lock();
        Ok(keys.iter().map(|k| s.kvs.get(k).cloned()).collect())
    }

    async fn watch(&self, prefix: &str, start: Revision) -> StoreResult<Watch> {
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut s = self.lock();
            if start > 0 && start <= s.compacted {
                let _ = tx.send(Err(StoreError::Compacted {
                    key: prefix.into(),
                    requested: start,
                    compacted: s.compacted + 1,
                }));
            } else {
                if start > 0 {
                    // History is in revision order; replay what the caller has not seen.
                    let first = s.history.partition_point(|e| e.revision < start);
                    for e in &s.history[first..] {
                        if e.key.starts_with(prefix) {
                            let _ = tx.send(Ok(e.clone()));
                        }
                    }
                }
                s.watchers.push(Watcher {
                    prefix: prefix.into(),
                    tx,
                });
            }
        }
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|event| (event, rx))
        });
        Ok(Watch::new(Box::pin(stream)))
    }

    async fn grant_lease(&self, ttl: Duration) -> StoreResult<LeaseId> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid {
                key: "lease".into(),
                reason: "TTL must be at least one second".into(),
            });
        }
        let id = {
            let mut s = self.lock();
            s.next_lease += 1;
            let id = s.next_lease;
            s.leases.insert(
                id,
                LeaseState {
                    ttl,
                    deadline: Instant::now() + ttl,
                    keys: BTreeSet::new(),
                },
            );
            id
        };
        self.spawn_lease_reaper(id);
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> StoreResult<Duration> {
        let mut s = self.lock();
        let l = s
            .leases
            .get_mut(&lease)
            .ok_or_else(|| StoreError::NotFound {
                key: format!("lease {lease:x}"),
            })?;
        l.deadline = Instant::now() + l.ttl;
        Ok(l.ttl)
    }

    async fn revoke_lease(&self, lease: LeaseId) -> StoreResult<()> {
        let mut s = self.lock();
        s.check_lease(lease)?;
        s.expire_lease(lease);
        Ok(())
    }

    async fn compact(&self, revision: Revision) -> StoreResult<()> {
        let mut s = self.lock();
        if revision > s.revision {
            return Err(StoreError::Invalid {
                key: "compact".into(),
                reason: format!(
                    "revision {revision} is in the future (current {})",
                    s.revision
                ),
            });
        }
        if revision <= s.compacted {
            return Err(StoreError::Compacted {
                key: "compact".into(),
                requested: revision,
                compacted: s.compacted,
            });
        }
        s.compacted = revision;
        let keep_from = s.history.partition_point(|e| e.revision <= revision);
        s.history.drain(..keep_from);
        Ok(())
    }

    async fn revision(&self) -> StoreResult<Revision> {
        Ok(self.lock().revision)
    }
}
