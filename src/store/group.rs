//! Group commit for independent reads and writes: [`GroupedStore`] lets concurrent `get`s
//! share one read transaction and concurrent `put`s one write transaction.
//!
//! An agent starting ten instances at once reads ten endpoint keys and writes ten endpoints;
//! one at a time that is twenty etcd requests, each with its gRPC call, its raft proposal
//! (writes) or read index (reads), and for writes a WAL entry. etcd's CPU per request, not
//! its fsync, is then what bounds the agent on a small controller. Grouped, the same work is
//! a handful of transactions.
//!
//! The rule is the one of the IPAM's group commit (`ipam/batch.rs`): the first request finds
//! no leader and starts one — a task of its own, so a caller that is dropped cannot abandon
//! the others' batch. The leader takes what waits (at most [`MAX_TXN_OPS`] operations, and a
//! write batch never names a key twice, which etcd refuses), sends it, answers, and repeats
//! until nothing waits. A lone request goes as the plain call it would have been. When a batch
//! fails, each of its requests is sent again alone, so its caller gets its own answer.
//!
//! Each grouped call is still linearizable: its batch is sent after the call began and
//! answered before it returns. Writes to one key keep their order (a repeated key waits for
//! the next batch).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::oneshot;

use super::{
    Datastore, KeyValue, LeaseId, Listing, MAX_TXN_OPS, Revision, StoreResult, Txn, TxnOp,
    TxnOutcome, Watch,
};

/// Requests waiting for the next batch, and whether a leader serves them.
#[derive(Debug)]
pub(crate) struct Queue<R> {
    pending: VecDeque<R>,
    leading: bool,
}

impl<R> Default for Queue<R> {
    fn default() -> Self {
        Queue {
            pending: VecDeque::new(),
            leading: false,
        }
    }
}

impl<R> Queue<R> {
    /// Queues `request`; true when nobody leads the queue and the caller must start a leader.
    pub(crate) fn push(&mut self, request: R) -> bool {
        self.pending.push_back(request);
        !std::mem::replace(&mut self.leading, true)
    }

    /// The leader's next batch: the oldest requests for as long as `admit` takes them (the
    /// first always goes); `None` when nothing waits, and the leader steps down.
    pub(crate) fn take(&mut self, mut admit: impl FnMut(&R) -> bool) -> Option<Vec<R>> {
        let first = match self.pending.pop_front() {
            Some(first) => first,
            None => {
                self.leading = false;
                return None;
            }
        };
        admit(&first);
        let mut batch = vec![first];
        while let Some(next) = self.pending.front() {
            if !admit(next) {
                break;
            }
            batch.extend(self.pending.pop_front());
        }
        Some(batch)
    }
}

#[derive(Debug)]
struct Read {
    key: String,
    reply: oneshot::Sender<Option<StoreResult<Option<KeyValue>>>>,
}

#[derive(Debug)]
struct Write {
    key: String,
    value: Vec<u8>,
    reply: oneshot::Sender<Option<StoreResult<Revision>>>,
}

#[derive(Debug, Default)]
struct Queues {
    reads: Mutex<Queue<Read>>,
    writes: Mutex<Queue<Write>>,
}

/// A datastore whose `get` and `put` are grouped (see the module's text); every other call
/// goes straight to the store it wraps.
#[derive(Debug)]
pub struct GroupedStore {
    inner: Arc<dyn Datastore>,
    queues: Arc<Queues>,
}

impl GroupedStore {
    pub fn wrap(inner: Arc<dyn Datastore>) -> Arc<dyn Datastore> {
        Arc::new(GroupedStore {
            inner,
            queues: Arc::default(),
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn lead_reads(inner: Arc<dyn Datastore>, queues: Arc<Queues>) {
    loop {
        let mut n = 0;
        let Some(mut batch) = lock(&queues.reads).take(|_| {
            n += 1;
            n <= MAX_TXN_OPS
        }) else {
            return;
        };
        if batch.len() == 1 {
            let one = batch.pop().expect("one request");
            let got = inner.get(&one.key).await;
            let _ = one.reply.send(Some(got));
            continue;
        }
        let keys: Vec<String> = batch.iter().map(|r| r.key.clone()).collect();
        match inner.get_many(&keys).await {
            Ok(values) => {
                for (request, value) in batch.into_iter().zip(values) {
                    let _ = request.reply.send(Some(Ok(value)));
                }
            }
            Err(_) => {
                for request in batch {
                    let _ = request.reply.send(None);
                }
            }
        }
    }
}

async fn lead_writes(inner: Arc<dyn Datastore>, queues: Arc<Queues>) {
    loop {
        let mut keys = HashSet::new();
        let Some(mut batch) =
            lock(&queues.writes).take(|w| keys.len() < MAX_TXN_OPS && keys.insert(w.key.clone()))
        else {
            return;
        };
        if batch.len() == 1 {
            let one = batch.pop().expect("one request");
            let put = inner.put(&one.key, &one.value).await;
            let _ = one.reply.send(Some(put));
            continue;
        }
        let txn = batch.iter().fold(Txn::new(), |txn, w| {
            txn.then(TxnOp::put(w.key.clone(), w.value.clone()))
        });
        match inner.txn(txn).await {
            Ok(revision) => {
                for request in batch {
                    let _ = request.reply.send(Some(Ok(revision)));
                }
            }
            Err(_) => {
                for request in batch {
                    let _ = request.reply.send(None);
                }
            }
        }
    }
}

#[async_trait]
impl Datastore for GroupedStore {
    async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
        let (reply, answer) = oneshot::channel();
        let request = Read {
            key: key.to_string(),
            reply,
        };
        if lock(&self.queues.reads).push(request) {
            tokio::spawn(lead_reads(self.inner.clone(), self.queues.clone()));
        }
        match answer.await {
            Ok(Some(got)) => got,
            // The batch failed, or its leader went with the runtime: alone, for the answer.
            Ok(None) | Err(_) => self.inner.get(key).await,
        }
    }

    async fn put(&self, key: &str, value: &[u8]) -> StoreResult<Revision> {
        let (reply, answer) = oneshot::channel();
        let request = Write {
            key: key.to_string(),
            value: value.to_vec(),
            reply,
        };
        if lock(&self.queues.writes).push(request) {
            tokio::spawn(lead_writes(self.inner.clone(), self.queues.clone()));
        }
        match answer.await {
            Ok(Some(put)) => put,
            Ok(None) | Err(_) => self.inner.put(key, value).await,
        }
    }

    async fn list(&self, prefix: &str) -> StoreResult<Listing> {
        self.inner.list(prefix).await
    }
    async fn create(&self, key: &str, value: &[u8]) -> StoreResult<Revision> {
        self.inner.create(key, value).await
    }
    async fn update(&self, key: &str, value: &[u8], expected: Revision) -> StoreResult<Revision> {
        self.inner.update(key, value, expected).await
    }
    async fn put_with_lease(
        &self,
        key: &str,
        value: &[u8],
        lease: LeaseId,
    ) -> StoreResult<Revision> {
        self.inner.put_with_lease(key, value, lease).await
    }
    async fn delete(&self, key: &str, expected: Option<Revision>) -> StoreResult<Revision> {
        self.inner.delete(key, expected).await
    }
    async fn delete_prefix(&self, prefix: &str) -> StoreResult<u64> {
        self.inner.delete_prefix(prefix).await
    }
    async fn txn(&self, txn: Txn) -> StoreResult<Revision> {
        self.inner.txn(txn).await
    }
    async fn txn_or_read(&self, txn: Txn) -> StoreResult<TxnOutcome> {
        self.inner.txn_or_read(txn).await
    }
    async fn get_many(&self, keys: &[String]) -> StoreResult<Vec<Option<KeyValue>>> {
        self.inner.get_many(keys).await
    }
    async fn watch(&self, prefix: &str, start: Revision) -> StoreResult<Watch> {
        self.inner.watch(prefix, start).await
    }
    async fn grant_lease(&self, ttl: Duration) -> StoreResult<LeaseId> {
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> StoreResult<Duration> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: LeaseId) -> StoreResult<()> {
        self.inner.revoke_lease(lease).await
    }
    async fn compact(&self, revision: Revision) -> StoreResult<()> {
        self.inner.compact(revision).await
    }
    async fn revision(&self) -> StoreResult<Revision> {
        self.inner.revision().await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::store::{MemoryStore, StoreError};

    #[test]
    fn a_batch_takes_what_is_admitted_and_the_first_always() {
        let mut q = Queue::default();
        assert!(q.push(1), "the first request starts a leader");
        assert!(!q.push(2), "later ones join it");
        q.push(3);
        assert_eq!(q.take(|r| *r < 3), Some(vec![1, 2]));
        assert_eq!(q.take(|_| false), Some(vec![3]), "the first always goes");
        assert_eq!(
            q.take(|_| true),
            None,
            "nothing waits: the leader steps down"
        );
        assert!(q.push(4), "and the next request starts a new one");
    }

    /// A memory store that counts round trips and can refuse transactions.
    #[derive(Debug, Default)]
    struct Counted {
        inner: MemoryStore,
        trips: AtomicUsize,
        refuse_txn: AtomicBool,
    }

    impl Counted {
        fn trip(&self) {
            self.trips.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[async_trait]
    impl Datastore for Counted {
        async fn get(&self, key: &str) -> StoreResult<Option<KeyValue>> {
            self.trip();
            tokio::task::yield_now().await;
            self.inner.get(key).await
        }
        async fn put(&self, key: &str, value: &[u8]) -> StoreResult<Revision> {
            self.trip();
            tokio::task::yield_now().await;
            self.inner.put(key, value).await
        }
        async fn txn(&self, txn: Txn) -> StoreResult<Revision> {
            self.trip();
            if self.refuse_txn.load(Ordering::SeqCst) {
                return Err(StoreError::Invalid {
                    key: "txn".into(),
                    reason: "refused by the test".into(),
                });
            }
            tokio::task::yield_now().await;
            self.inner.txn(txn).await
        }
        async fn get_many(&self, keys: &[String]) -> StoreResult<Vec<Option<KeyValue>>> {
            self.trip();
            tokio::task::yield_now().await;
            self.inner.get_many(keys).await
        }
        async fn list(&self, prefix: &str) -> StoreResult<Listing> {
            self.inner.list(prefix).await
        }
        async fn create(&self, key: &str, value: &[u8]) -> StoreResult<Revision> {
            self.inner.create(key, value).await
        }
        async fn update(
            &self,
            key: &str,
            value: &[u8],
            expected: Revision,
        ) -> StoreResult<Revision> {
            self.inner.update(key, value, expected).await
        }
        async fn put_with_lease(
            &self,
            key: &str,
            value: &[u8],
            lease: LeaseId,
        ) -> StoreResult<Revision> {
            self.inner.put_with_lease(key, value, lease).await
        }
        async fn delete(&self, key: &str, expected: Option<Revision>) -> StoreResult<Revision> {
            self.inner.delete(key, expected).await
        }
        async fn delete_prefix(&self, prefix: &str) -> StoreResult<u64> {
            self.inner.delete_prefix(prefix).await
        }
        async fn txn_or_read(&self, txn: Txn) -> StoreResult<TxnOutcome> {
            self.inner.txn_or_read(txn).await
        }
        async fn watch(&self, prefix: &str, start: Revision) -> StoreResult<Watch> {
            self.inner.watch(prefix, start).await
        }
        async fn grant_lease(&self, ttl: Duration) -> StoreResult<LeaseId> {
            self.inner.grant_lease(ttl).await
        }
        async fn keep_alive(&self, lease: LeaseId) -> StoreResult<Duration> {
            self.inner.keep_alive(lease).await
        }
        async fn revoke_lease(&self, lease: LeaseId) -> StoreResult<()> {
            self.inner.revoke_lease(lease).await
        }
        async fn compact(&self, revision: Revision) -> StoreResult<()> {
            self.inner.compact(revision).await
        }
        async fn revision(&self) -> StoreResult<Revision> {
            self.inner.revision().await
        }
    }

    async fn burst(store: &Arc<dyn Datastore>, n: usize) {
        let puts = (0..n).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .put(&format!("/k/{i}"), format!("v{i}").as_bytes())
                    .await
            })
        });
        for put in futures::future::join_all(puts).await {
            put.unwrap().unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_gets_and_puts_share_round_trips_and_each_gets_its_own_answer() {
        let counted = Arc::new(Counted::default());
        let store = GroupedStore::wrap(counted.clone());
        burst(&store, 200).await;
        let written = counted.trips.swap(0, Ordering::SeqCst);
        assert!(written < 100, "200 puts took {written} round trips");
        let gets = (0..200).map(|i| {
            let store = store.clone();
            tokio::spawn(async move { (i, store.get(&format!("/k/{i}")).await) })
        });
        for got in futures::future::join_all(gets).await {
            let (i, got) = got.unwrap();
            assert_eq!(got.unwrap().unwrap().value, format!("v{i}").into_bytes());
        }
        let read = counted.trips.load(Ordering::SeqCst);
        assert!(read < 100, "200 gets took {read} round trips");
        assert_eq!(store.get("/absent").await.unwrap(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_to_one_key_keep_their_order() {
        let store = GroupedStore::wrap(Arc::new(Counted::default()));
        // Queued together: a batch may not name the key twice, so they go one after another.
        let puts = (0..50).map(|i| {
            let store = store.clone();
            async move { store.put("/same", format!("{i}").as_bytes()).await }
        });
        let revisions: Vec<Revision> = futures::future::join_all(puts)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
        assert_eq!(store.get("/same").await.unwrap().unwrap().value, b"49");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_batch_sends_each_write_again_alone() {
        let counted = Arc::new(Counted::default());
        counted.refuse_txn.store(true, Ordering::SeqCst);
        let store = GroupedStore::wrap(counted.clone());
        burst(&store, 50).await;
        for i in 0..50 {
            let got = counted.inner.get(&format!("/k/{i}")).await.unwrap();
            assert_eq!(got.unwrap().value, format!("v{i}").into_bytes());
        }
    }
}
