//! The datastore contract, run against both backends: the in-memory store and a real etcd
//! (Debian etcd-server) started per test on free ports with a temporary data directory —
//! and against the agents' timing decorator (`metrics::TimedStore`) over the memory store.

use std::sync::Arc;
use std::time::Duration;

use tenet::store::{
    Compare, Datastore, EventKind, MemoryStore, StoreError, Txn, TxnOp, TxnOutcome, WatchEvent,
};
use tenet::testbed::EtcdServer;

mod common;

type Store = Arc<dyn Datastore>;

/// Generates one test per backend for every contract function named.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(std::sync::Arc::new(tenet::store::MemoryStore::new())).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let server = tenet::testbed::EtcdServer::start().await.expect("start etcd");
                    super::$name(std::sync::Arc::new(server.store().await.unwrap())).await;
                }
            )*
        }
        // The agents' timing decorator (with metrics on) must keep the contract too.
        mod timed {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let inner = std::sync::Arc::new(tenet::store::MemoryStore::new());
                    let (store, _latency) = tenet::metrics::TimedStore::wrap(inner);
                    super::$name(store).await;
                }
            )*
        }
    };
}

/// The key cases again against an etcd that speaks only TLS and requires client
/// certificates: what TLS changes must not change the contract.
macro_rules! contract_over_tls {
    ($($name:ident),* $(,)?) => {
        mod etcd_tls {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let dir = tempfile::tempdir().unwrap();
                    let (server, _) = crate::common::tls::tls_etcd(dir.path()).await;
                    super::$name(std::sync::Arc::new(server.store().await.unwrap())).await;
                }
            )*
        }
    };
}

/// The key cases against a 3-member cluster, through a client that knows every member.
macro_rules! contract_on_cluster {
    ($($name:ident),* $(,)?) => {
        mod etcd_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let cluster = tenet::testbed::EtcdCluster::start(3).await.expect("start a cluster");
                    super::$name(std::sync::Arc::new(cluster.store().await.unwrap())).await;
                }
            )*
        }
    };
}

contract_on_cluster!(
    get_put_and_revisions,
    update_is_compare_and_swap,
    concurrent_cas_incrementers_lose_nothing,
    txn_is_all_or_nothing_under_a_conflicting_writer,
    watch_delivers_every_change_in_order,
    leases_expire_and_revoke,
);

contract_over_tls!(
    get_put_and_revisions,
    update_is_compare_and_swap,
    concurrent_cas_incrementers_lose_nothing,
    txn_is_all_or_nothing_under_a_conflicting_writer,
    watch_delivers_every_change_in_order,
    leases_expire_and_revoke,
);

contract!(
    get_put_and_revisions,
    create_only_if_absent,
    update_is_compare_and_swap,
    delete_plain_and_conditional,
    delete_prefix_spares_siblings,
    list_is_sorted_and_paginated,
    list_100k_keys,
    concurrent_cas_incrementers_lose_nothing,
    txn_is_all_or_nothing_under_a_conflicting_writer,
    txn_rejects_bad_requests,
    failed_txn_returns_current_values,
    watch_delivers_every_change_in_order,
    watch_replays_from_a_past_revision,
    compacted_start_revision_is_reported,
    leases_expire_and_revoke,
);

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

async fn get_put_and_revisions(s: Store) {
    assert_eq!(s.get("/t/a").await.unwrap(), None);
    let r1 = s.put("/t/a", b"1").await.unwrap();
    let r2 = s.put("/t/a", b"2").await.unwrap();
    assert!(r2 > r1, "revisions grow: {r1} then {r2}");
    let kv = s.get("/t/a").await.unwrap().expect("key exists");
    assert_eq!(kv.value, b"2");
    assert_eq!(kv.mod_revision, r2);
    assert_eq!(kv.create_revision, r1);
    assert_eq!(s.revision().await.unwrap(), r2);
}

async fn create_only_if_absent(s: Store) {
    let r = s.create("/t/c", b"first").await.unwrap();
    let err = s.create("/t/c", b"second").await.unwrap_err();
    assert_eq!(err, StoreError::AlreadyExists { key: "/t/c".into() });
    let kv = s.get("/t/c").await.unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.mod_revision), (&b"first"[..], r));
}

async fn update_is_compare_and_swap(s: Store) {
    assert_eq!(
        s.update("/t/u", b"x", 1).await.unwrap_err(),
        StoreError::NotFound { key: "/t/u".into() }
    );
    let r1 = s.create("/t/u", b"1").await.unwrap();
    let r2 = s.update("/t/u", b"2", r1).await.unwrap();
    assert_eq!(
        s.update("/t/u", b"stale", r1).await.unwrap_err(),
        StoreError::Conflict { key: "/t/u".into() }
    );
    assert_eq!(s.get("/t/u").await.unwrap().unwrap().mod_revision, r2);
    assert!(matches!(
        s.update("/t/u", b"x", 0).await.unwrap_err(),
        StoreError::Invalid { .. }
    ));
}

async fn delete_plain_and_conditional(s: Store) {
    assert_eq!(
        s.delete("/t/d", None).await.unwrap_err(),
        StoreError::NotFound { key: "/t/d".into() }
    );
    let r1 = s.put("/t/d", b"1").await.unwrap();
    s.put("/t/d", b"2").await.unwrap();
    assert_eq!(
        s.delete("/t/d", Some(r1)).await.unwrap_err(),
        StoreError::Conflict { key: "/t/d".into() }
    );
    let cur = s.get("/t/d").await.unwrap().unwrap().mod_revision;
    s.delete("/t/d", Some(cur)).await.unwrap();
    assert_eq!(s.get("/t/d").await.unwrap(), None);
    s.put("/t/d", b"3").await.unwrap();
    s.delete("/t/d", None).await.unwrap();
    assert_eq!(s.get("/t/d").await.unwrap(), None);
}

async fn delete_prefix_spares_siblings(s: Store) {
    for k in ["/p/a/1", "/p/a/2", "/p/a/3/x", "/p/ab", "/p/b"] {
        s.put(k, b"v").await.unwrap();
    }
    assert_eq!(s.delete_prefix("/p/a/").await.unwrap(), 3);
    let left: Vec<String> = s
        .list("/p/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(left, ["/p/ab", "/p/b"]);
    assert_eq!(s.delete_prefix("/p/none/").await.unwrap(), 0);
}

async fn put_many(s: &Store, keys: impl Iterator<Item = String>) {
    let keys: Vec<String> = keys.collect();
    for chunk in keys.chunks(tenet::store::MAX_TXN_OPS) {
        let mut txn = Txn::new();
        for k in chunk {
            txn = txn.then(TxnOp::put(k.clone(), k.as_bytes()));
        }
        s.txn(txn).await.unwrap();
    }
}

async fn list_is_sorted_and_paginated(s: Store) {
    // More keys than one etcd page (2000), written in shuffled order.
    let mut ids: Vec<u32> = (0..4500).collect();
    ids.reverse();
    ids.swap(0, 2000);
    put_many(&s, ids.iter().map(|i| format!("/l/{i:05}"))).await;
    s.put("/l0", b"outside").await.unwrap();
    s.put("/k", b"outside").await.unwrap();
    let listing = s.list("/l/").await.unwrap();
    assert_eq!(listing.kvs.len(), 4500);
    assert!(
        listing.kvs.windows(2).all(|w| w[0].key < w[1].key),
        "sorted"
    );
    assert_eq!(listing.kvs[0].key, "/l/00000");
    assert_eq!(listing.kvs[4499].value, b"/l/04499");
    assert_eq!(listing.revision, s.revision().await.unwrap());
    assert!(s.list("/nothing/").await.unwrap().kvs.is_empty());
}

async fn list_100k_keys(s: Store) {
    put_many(&s, (0..100_000).map(|i| format!("/big/{i:06}"))).await;
    let listing = s.list("/big/").await.unwrap();
    assert_eq!(listing.kvs.len(), 100_000);
    assert_eq!(listing.kvs[99_999].key, "/big/099999");
    assert!(listing.kvs.windows(2).all(|w| w[0].key < w[1].key));
}

async fn concurrent_cas_incrementers_lose_nothing(s: Store) {
    const WORKERS: usize = 8;
    const EACH: usize = 40;
    s.create("/t/counter", b"0").await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0;
            for _ in 0..EACH {
                loop {
                    let kv = s.get("/t/counter").await.unwrap().unwrap();
                    let n: u64 = text(&kv.value).parse().unwrap();
                    match s
                        .update(
                            "/t/counter",
                            (n + 1).to_string().as_bytes(),
                            kv.mod_revision,
                        )
                        .await
                    {
                        Ok(_) => break,
                        Err(StoreError::Conflict { .. }) => conflicts += 1,
                        Err(e) => panic!("unexpected error: {e}"),
                    }
                }
            }
            conflicts
        }));
    }
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await.unwrap();
    }
    let kv = s.get("/t/counter").await.unwrap().unwrap();
    assert_eq!(
        text(&kv.value),
        (WORKERS * EACH).to_string(),
        "after {conflicts} conflicts"
    );
}

async fn txn_is_all_or_nothing_under_a_conflicting_writer(s: Store) {
    s.put("/t/x", b"0").await.unwrap();
    s.put("/t/y", b"0").await.unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The writer bumps /t/y alone, racing the transactions that bump both keys.
    let writer = {
        let (s, stop) = (s.clone(), stop.clone());
        tokio::spawn(async move {
            let mut wins = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let kv = s.get("/t/y").await.unwrap().unwrap();
                let n: u64 = text(&kv.value).parse().unwrap();
                if s.update("/t/y", (n + 1).to_string().as_bytes(), kv.mod_revision)
                    .await
                    .is_ok()
                {
                    wins += 1;
                }
                tokio::task::yield_now().await;
            }
            wins
        })
    };
    let (mut committed, mut conflicts) = (0u64, 0u64);
    while committed < 60 {
        let x = s.get("/t/x").await.unwrap().unwrap();
        let y = s.get("/t/y").await.unwrap().unwrap();
        let xn: u64 = text(&x.value).parse().unwrap();
        let yn: u64 = text(&y.value).parse().unwrap();
        let txn = Txn::new()
            .when(Compare::revision("/t/x", x.mod_revision))
            .when(Compare::revision("/t/y", y.mod_revision))
            .then(TxnOp::put("/t/x", (xn + 1).to_string()))
            .then(TxnOp::put("/t/y", (yn + 1).to_string()));
        match s.txn(txn).await {
            Ok(rev) => {
                committed += 1;
                // Both writes carry the transaction's revision.
                let x2 = s.get("/t/x").await.unwrap().unwrap();
                assert_eq!(x2.mod_revision, rev);
            }
            Err(StoreError::Conflict { key }) => {
                assert_eq!(key, "/t/y", "only /t/y is contended");
                conflicts += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writer_wins = writer.await.unwrap();
    let x: u64 = text(&s.get("/t/x").await.unwrap().unwrap().value)
        .parse()
        .unwrap();
    let y: u64 = text(&s.get("/t/y").await.unwrap().unwrap().value)
        .parse()
        .unwrap();
    // A failed transaction wrote neither key: x counts exactly the committed ones.
    assert_eq!(
        x, committed,
        "{conflicts} conflicts must not have touched /t/x"
    );
    assert_eq!(y, committed + writer_wins);
}

async fn txn_rejects_bad_requests(s: Store) {
    let dup = Txn::new()
        .then(TxnOp::put("/t/k", "1"))
        .then(TxnOp::put("/t/k", "2"));
    assert!(
        matches!(s.txn(dup).await.unwrap_err(), StoreError::Invalid { key, .. } if key == "/t/k")
    );
    let mut big = Txn::new();
    for i in 0..=tenet::store::MAX_TXN_OPS {
        big = big.then(TxnOp::put(format!("/t/big/{i}"), "v"));
    }
    assert!(matches!(
        s.txn(big).await.unwrap_err(),
        StoreError::Invalid { .. }
    ));
    assert!(
        s.list("/t/").await.unwrap().kvs.is_empty(),
        "nothing written"
    );
    // A compare on an absent key with revision 0 holds: create-if-absent for several keys.
    let both = Txn::new()
        .when(Compare::absent("/t/m"))
        .when(Compare::absent("/t/n"))
        .then(TxnOp::put("/t/m", "1"))
        .then(TxnOp::put("/t/n", "1"));
    s.txn(both.clone()).await.unwrap();
    assert_eq!(
        s.txn(both).await.unwrap_err(),
        StoreError::Conflict { key: "/t/m".into() }
    );
}

async fn failed_txn_returns_current_values(s: Store) {
    let ra = s.put("/f/a", b"1").await.unwrap();
    let rb = s.put("/f/b", b"2").await.unwrap();
    let got = s
        .get_many(&["/f/a".into(), "/f/none".into(), "/f/b".into()])
        .await
        .unwrap();
    let revs: Vec<i64> = got
        .iter()
        .map(|kv| kv.as_ref().map_or(0, |kv| kv.mod_revision))
        .collect();
    assert_eq!(revs, [ra, 0, rb]);
    let txn = Txn::new()
        .when(Compare::revision("/f/a", ra))
        .when(Compare::absent("/f/b"))
        .then(TxnOp::put("/f/a", "changed"));
    match s.txn_or_read(txn).await.unwrap() {
        TxnOutcome::Failed { current } => {
            assert_eq!(current[0].as_ref().unwrap().value, b"1");
            assert_eq!(current[1].as_ref().unwrap().mod_revision, rb);
        }
        other => panic!("expected failure, got {other:?}"),
    }
    assert_eq!(
        s.get("/f/a").await.unwrap().unwrap().mod_revision,
        ra,
        "nothing written"
    );
}

async fn next_event(w: &mut tenet::store::Watch) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(20), w.next())
        .await
        .expect("watch event within 20 s")
        .expect("watch still open")
        .expect("watch event, not an error")
}

async fn watch_delivers_every_change_in_order(s: Store) {
    let start = s.revision().await.unwrap() + 1;
    let mut w = s.watch("/w/", start).await.unwrap();
    let mut expected = Vec::new();
    for i in 0..150u32 {
        let key = format!("/w/{}", i % 7);
        s.put("/other", b"ignored").await.unwrap();
        let rev = if i % 5 == 4 {
            match s.delete(&key, None).await {
                Ok(rev) => (EventKind::Delete, key, rev),
                Err(StoreError::NotFound { .. }) => continue,
                Err(e) => panic!("{e}"),
            }
        } else {
            (
                EventKind::Put,
                key.clone(),
                s.put(&key, i.to_string().as_bytes()).await.unwrap(),
            )
        };
        expected.push(rev);
    }
    // A transaction touching two watched keys yields two events at one revision.
    let trev = s
        .txn(
            Txn::new()
                .then(TxnOp::put("/w/t1", "a"))
                .then(TxnOp::put("/w/t2", "b")),
        )
        .await
        .unwrap();
    expected.push((EventKind::Put, "/w/t1".into(), trev));
    expected.push((EventKind::Put, "/w/t2".into(), trev));
    for (kind, key, rev) in expected {
        let e = next_event(&mut w).await;
        assert_eq!(
            (e.kind, e.key.as_str(), e.revision),
            (kind, key.as_str(), rev)
        );
    }
}

async fn watch_replays_from_a_past_revision(s: Store) {
    let r1 = s.put("/h/a", b"1").await.unwrap();
    let r2 = s.put("/h/b", b"2").await.unwrap();
    s.delete("/h/a", None).await.unwrap();
    let mut w = s.watch("/h/", r1 + 1).await.unwrap();
    let e = next_event(&mut w).await;
    assert_eq!(
        (e.key.as_str(), e.revision, e.value.as_slice()),
        ("/h/b", r2, &b"2"[..])
    );
    let e = next_event(&mut w).await;
    assert_eq!((e.kind, e.key.as_str()), (EventKind::Delete, "/h/a"));
    let r4 = s.put("/h/c", b"3").await.unwrap();
    assert_eq!(next_event(&mut w).await.revision, r4);
}

async fn compacted_start_revision_is_reported(s: Store) {
    let r1 = s.put("/c/a", b"1").await.unwrap();
    s.put("/c/a", b"2").await.unwrap();
    let r3 = s.put("/c/a", b"3").await.unwrap();
    s.compact(r3).await.unwrap();
    let mut w = s.watch("/c/", r1).await.unwrap();
    let item = tokio::time::timeout(Duration::from_secs(20), w.next())
        .await
        .expect("answer within 20 s")
        .expect("one item");
    match item {
        Err(StoreError::Compacted {
            key,
            requested,
            compacted,
        }) => {
            assert_eq!(key, "/c/");
            assert_eq!(requested, r1);
            assert!(compacted >= r3, "compacted {compacted} >= {r3}");
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    // Resync: list, then watch from the listing revision.
    let listing = s.list("/c/").await.unwrap();
    let mut w = s.watch("/c/", listing.revision + 1).await.unwrap();
    let r4 = s.put("/c/b", b"4").await.unwrap();
    assert_eq!(next_event(&mut w).await.revision, r4);
}

async fn leases_expire_and_revoke(s: Store) {
    let lease = s.grant_lease(Duration::from_secs(2)).await.unwrap();
    s.put_with_lease("/ttl/a", b"x", lease).await.unwrap();
    assert_eq!(s.get("/ttl/a").await.unwrap().unwrap().lease, Some(lease));
    assert!(s.keep_alive(lease).await.unwrap() >= Duration::from_secs(1));
    let mut w = s.watch("/ttl/", 0).await.unwrap();
    // Not kept alive any more: the key must go, and the watch must say so.
    let e = tokio::time::timeout(Duration::from_secs(30), w.next())
        .await
        .expect("lease expiry within 30 s")
        .unwrap()
        .unwrap();
    assert_eq!((e.kind, e.key.as_str()), (EventKind::Delete, "/ttl/a"));
    assert_eq!(s.get("/ttl/a").await.unwrap(), None);
    let err = s.keep_alive(lease).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");

    let lease = s.grant_lease(Duration::from_secs(60)).await.unwrap();
    s.put_with_lease("/ttl/b", b"y", lease).await.unwrap();
    s.put("/ttl/c", b"no lease").await.unwrap();
    s.revoke_lease(lease).await.unwrap();
    assert_eq!(s.get("/ttl/b").await.unwrap(), None);
    assert!(s.get("/ttl/c").await.unwrap().is_some());
    assert!(matches!(
        s.put_with_lease("/ttl/d", b"z", lease).await.unwrap_err(),
        StoreError::NotFound { .. }
    ));
}

// ---- etcd-only behaviour: outages ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_watch_resumes_after_restart() {
    let mut server = EtcdServer::start().await.unwrap();
    let s: Store = Arc::new(server.store().await.unwrap());
    let mut w = s.watch("/r/", 0).await.unwrap();
    let mut revs = Vec::new();
    for i in 0..10 {
        revs.push(s.put(&format!("/r/{i}"), b"before").await.unwrap());
    }
    for rev in &revs[..5] {
        assert_eq!(next_event(&mut w).await.revision, *rev);
    }
    // Restart mid-stream: five events are still unread on the client side.
    server.stop();
    server.start_again().await.unwrap();
    for i in 10..20 {
        let key = format!("/r/{i}");
        revs.push(retry_unavailable(|| s.put(&key, b"after")).await);
    }
    for rev in &revs[5..] {
        assert_eq!(
            next_event(&mut w).await.revision,
            *rev,
            "no event lost or repeated"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn etcd_outage_is_unavailable_naming_the_key() {
    let mut server = EtcdServer::start().await.unwrap();
    let s = server.store().await.unwrap();
    s.put("/o/k", b"v").await.unwrap();
    server.stop();
    let err = s.get("/o/k").await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable { key, .. } if key == "/o/k"),
        "{err}"
    );
    server.start_again().await.unwrap();
    let kv = retry_unavailable(|| s.get("/o/k")).await.unwrap();
    assert_eq!(kv.value, b"v", "data survives the restart");
}

#[tokio::test]
async fn memory_store_clones_share_data() {
    let a = MemoryStore::new();
    let b = a.clone();
    a.put("/k", b"v").await.unwrap();
    assert_eq!(b.get("/k").await.unwrap().unwrap().value, b"v");
}

async fn retry_unavailable<T, F, Fut>(mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    for _ in 0..100 {
        match op().await {
            Ok(v) => return v,
            Err(e) if e.is_unavailable() => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("etcd did not come back within 20 s");
}
