//! Datastore benchmark: `cargo bench --bench store`.
//!
//! One table, every row measured in this run against real etcd (Debian etcd-server):
//! * single-key compare-and-swap updates/s and 2-key transactions/s through `tenet::store`,
//!   next to a raw `etcd-client` loop sending the same requests (the abstraction's cost);
//! * the same through `tenet::store` over TLS (client certificates) next to plaintext, and
//!   against a 3-member cluster next to one member (what TLS and consensus cost).
//!
//! Each figure is one client issuing requests back to back (latency-bound, as an agent's
//! control path is). `TENET_BENCH_OPS` sets the operations per row (default 2000).

#[path = "../tests/common/tls.rs"]
mod tls;

use std::time::Instant;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use tenet::store::{
    Compare as StoreCompare, Datastore, EtcdStore, Txn as StoreTxn, TxnOp as StoreOp,
};
use tenet::testbed::{EtcdCluster, EtcdServer};

fn main() {
    let ops: usize = std::env::var("TENET_BENCH_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(run(ops));
    println!();
    println!("| measurement ({ops} operations each) | result | compared with |");
    println!("|---|---|---|");
    for (what, value, note) in rows {
        println!("| {what} | {value} | {note} |");
    }
}

/// Operations per second of `n` sequential CAS updates of one key through the store.
async fn store_cas(store: &dyn Datastore, key: &str, n: usize) -> f64 {
    let mut rev = store.put(key, b"0").await.unwrap();
    let start = Instant::now();
    for i in 0..n {
        rev = store
            .update(key, i.to_string().as_bytes(), rev)
            .await
            .unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// Transactions per second: two keys compared on their revisions and both rewritten.
async fn store_txn2(store: &dyn Datastore, prefix: &str, n: usize) -> f64 {
    let (a, b) = (format!("{prefix}/a"), format!("{prefix}/b"));
    store.put(&a, b"0").await.unwrap();
    let mut rev = store.put(&b, b"0").await.unwrap();
    let (mut ra, mut rb) = (rev - 1, rev);
    let start = Instant::now();
    for i in 0..n {
        let v = i.to_string();
        let txn = StoreTxn::new()
            .when(StoreCompare::revision(a.clone(), ra))
            .when(StoreCompare::revision(b.clone(), rb))
            .then(StoreOp::put(a.clone(), v.clone()))
            .then(StoreOp::put(b.clone(), v));
        rev = store.txn(txn).await.unwrap();
        (ra, rb) = (rev, rev);
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn raw_cas(client: &mut Client, key: &str, n: usize) -> f64 {
    let mut rev = client
        .put(key, "0", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let start = Instant::now();
    for i in 0..n {
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(key, CompareOp::Equal, rev)])
            .and_then(vec![TxnOp::put(key, i.to_string(), None)]);
        let resp = client.txn(txn).await.unwrap();
        assert!(resp.succeeded());
        rev = resp.header().unwrap().revision();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn raw_txn2(client: &mut Client, prefix: &str, n: usize) -> f64 {
    let (a, b) = (format!("{prefix}/a"), format!("{prefix}/b"));
    client.put(a.as_str(), "0", None).await.unwrap();
    let rev = client
        .put(b.as_str(), "0", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let (mut ra, mut rb) = (rev - 1, rev);
    let start = Instant::now();
    for i in 0..n {
        let v = i.to_string();
        let txn = Txn::new()
            .when(vec![
                Compare::mod_revision(a.as_str(), CompareOp::Equal, ra),
                Compare::mod_revision(b.as_str(), CompareOp::Equal, rb),
            ])
            .and_then(vec![
                TxnOp::put(a.as_str(), v.clone(), None),
                TxnOp::put(b.as_str(), v, None),
            ]);
        let resp = client.txn(txn).await.unwrap();
        assert!(resp.succeeded());
        let rev = resp.header().unwrap().revision();
        (ra, rb) = (rev, rev);
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn rate(r: f64) -> String {
    format!("{r:.0}/s")
}

async fn run(n: usize) -> Vec<(String, String, String)> {
    let mut rows = Vec::new();
    eprintln!("one member, plaintext ...");
    let etcd = EtcdServer::start().await.unwrap();
    let store = etcd.store().await.unwrap();
    let mut raw = Client::connect([etcd.endpoint()], None).await.unwrap();
    // Warm both paths (connections, etcd's first writes).
    store_cas(&store, "/bench/warm", 50).await;
    raw_cas(&mut raw, "/bench/warm-raw", 50).await;
    // Interleaved rounds, so that neither side gets a quieter etcd (its WAL and fsyncs vary
    // over a run): the rate is the harmonic mean over the rounds.
    let rounds = 4;
    let per = (n / rounds).max(1);
    let (mut t_raw_cas, mut t_cas, mut t_raw_txn, mut t_txn) = (0.0, 0.0, 0.0, 0.0);
    for r in 0..rounds {
        t_raw_cas += per as f64 / raw_cas(&mut raw, &format!("/bench/raw-cas{r}"), per).await;
        t_cas += per as f64 / store_cas(&store, &format!("/bench/cas{r}"), per).await;
        t_raw_txn += per as f64 / raw_txn2(&mut raw, &format!("/bench/raw-txn{r}"), per).await;
        t_txn += per as f64 / store_txn2(&store, &format!("/bench/txn{r}"), per).await;
    }
    let total = (per * rounds) as f64;
    let (raw_cas_rate, cas, raw_txn_rate, txn) = (
        total / t_raw_cas,
        total / t_cas,
        total / t_raw_txn,
        total / t_txn,
    );
    rows.push((
        "CAS update, raw etcd-client".into(),
        rate(raw_cas_rate),
        "baseline".into(),
    ));
    rows.push((
        "CAS update, tenet::store".into(),
        rate(cas),
        format!("**{:.2}× raw** (goal ≥ 0.9)", cas / raw_cas_rate),
    ));
    rows.push((
        "2-key transaction, raw etcd-client".into(),
        rate(raw_txn_rate),
        "baseline".into(),
    ));
    rows.push((
        "2-key transaction, tenet::store".into(),
        rate(txn),
        format!("**{:.2}× raw** (goal ≥ 0.9)", txn / raw_txn_rate),
    ));
    drop((store, raw, etcd));

    eprintln!("one member, TLS with client certificates ...");
    let dir = tempfile::tempdir().unwrap();
    let (tls_etcd, _) = tls::tls_etcd(dir.path()).await;
    let tls_store: EtcdStore = tls_etcd.store().await.unwrap();
    store_cas(&tls_store, "/bench/warm", 50).await;
    let tls_cas = store_cas(&tls_store, "/bench/cas", n).await;
    let tls_txn = store_txn2(&tls_store, "/bench/txn", n).await;
    rows.push((
        "CAS update, tenet::store over TLS".into(),
        rate(tls_cas),
        format!("{:.2}× plaintext", tls_cas / cas),
    ));
    rows.push((
        "2-key transaction, tenet::store over TLS".into(),
        rate(tls_txn),
        format!("{:.2}× plaintext", tls_txn / txn),
    ));
    drop((tls_store, tls_etcd));

    eprintln!("3-member cluster ...");
    let cluster = EtcdCluster::start(3).await.unwrap();
    let c_store = cluster.store().await.unwrap();
    store_cas(&c_store, "/bench/warm", 50).await;
    let c_cas = store_cas(&c_store, "/bench/cas", n).await;
    let c_txn = store_txn2(&c_store, "/bench/txn", n).await;
    rows.push((
        "CAS update, tenet::store, 3-member cluster".into(),
        rate(c_cas),
        format!("{:.2}× one member", c_cas / cas),
    ));
    rows.push((
        "2-key transaction, tenet::store, 3-member cluster".into(),
        rate(c_txn),
        format!("{:.2}× one member", c_txn / txn),
    ));
    rows
}
