//! IPAM allocation rate against a real etcd, next to two baselines measured in the same run:
//!
//! * raw etcd transactions (compare one key's revision + put a block-sized value): the
//!   ceiling for "one transaction per allocation";
//! * a Calico-2.x-style allocator: get block, apply (unconditionally put) the handle,
//!   compare-and-swap the block: three round trips, retried on conflict.
//!
//! A second table times bursts — each host starting 100 allocations at once, as a node
//! starting 100 workloads does, then releasing them the same way — with group commit
//! (concurrent allocations, or releases, from one block share a transaction) and without
//! (one transaction each), next to the raw rate.
//!
//! Run with `cargo bench --bench ipam` (as root is not needed). Each row uses a fresh etcd.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use tenet::calico::{AllocationBlock, IpamHandle};
use tenet::ipam::{AutoAssignArgs, Ipam, Owner, block_key, empty_block, handle_key};
use tenet::store::{Compare, Datastore, EtcdStore, StoreError, Txn, TxnOp};
use tenet::testbed::EtcdServer;

const PER_HOST_1: usize = 2000;
const PER_HOST_8: usize = 400;
const BURST_ROUNDS: usize = 5;

async fn fresh() -> (EtcdServer, Arc<EtcdStore>) {
    let server = EtcdServer::start().await.expect("etcd");
    let store = Arc::new(server.store().await.unwrap());
    (server, store)
}

/// Runs `hosts` concurrent workers of `each` operations; returns operations per second.
async fn rate<F, Fut>(hosts: usize, each: usize, worker: F) -> f64
where
    F: Fn(usize, usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..hosts).map(|h| tokio::spawn(worker(h, each))).collect();
    for t in tasks {
        t.await.unwrap();
    }
    (hosts * each) as f64 / start.elapsed().as_secs_f64()
}

async fn raw_txn_rate(hosts: usize, each: usize) -> f64 {
    let (_etcd, store) = fresh().await;
    let value = serde_json::to_vec(&empty_block(
        "10.0.0.0/26".parse().unwrap(),
        Some("host-0"),
        false,
    ))
    .unwrap();
    rate(hosts, each, move |h, n| {
        let (store, value) = (store.clone(), value.clone());
        async move {
            let key = format!("/bench/raw/{h}");
            let mut rev = 0;
            for _ in 0..n {
                let txn = Txn::new()
                    .when(Compare::revision(key.clone(), rev))
                    .then(TxnOp::put(key.clone(), value.clone()));
                rev = store.txn(txn).await.unwrap();
            }
        }
    })
    .await
}

async fn tenet_rate(hosts: usize, each: usize) -> f64 {
    let (_etcd, store) = fresh().await;
    Ipam::new(store.clone())
        .create_pool("10.0.0.0/16".parse().unwrap(), false)
        .await
        .unwrap();
    rate(hosts, each, move |h, n| {
        let ipam = Ipam::new(store.clone());
        async move {
            for i in 0..n {
                let args = AutoAssignArgs {
                    num_v4: 1,
                    handle: Some(format!("h{h}-{i}")),
                    host: format!("host-{h}"),
                    ..Default::default()
                };
                assert_eq!(ipam.auto_assign(&args).await.unwrap().0.len(), 1);
            }
        }
    })
    .await
}

/// Calico 1.7.3's path for an allocation from an affine block: Get block, Apply handle,
/// CAS block (and on conflict, start again). Blocks are pre-claimed, as they would be
/// after the first allocation of each host.
async fn calico_style_rate(hosts: usize, each: usize) -> f64 {
    let (_etcd, store) = fresh().await;
    rate(hosts, each, move |h, n| {
        let store = store.clone();
        async move {
            let mut blocks: Vec<IpNetwork> = Vec::new();
            let mut current: Option<IpNetwork> = None;
            for i in 0..n {
                let handle = format!("h{h}-{i}");
                loop {
                    let cidr = match current {
                        Some(c) => c,
                        None => {
                            let c = tenet::ipam::nth_block(
                                &"10.0.0.0/16".parse().unwrap(),
                                (h * 64 + blocks.len()) as u128,
                            );
                            let b = empty_block(c, Some(&format!("host-{h}")), false);
                            store
                                .create(&block_key(&c), &serde_json::to_vec(&b).unwrap())
                                .await
                                .unwrap();
                            blocks.push(c);
                            current = Some(c);
                            c
                        }
                    };
                    // 1. get block
                    let kv = store.get(&block_key(&cidr)).await.unwrap().unwrap();
                    let mut block: AllocationBlock = serde_json::from_slice(&kv.value).unwrap();
                    let owner = Owner {
                        handle: Some(handle.clone()),
                        ..Default::default()
                    };
                    if block.assign(1, &owner).is_empty() {
                        current = None;
                        continue;
                    }
                    // 2. apply handle (unconditional)
                    let hv = IpamHandle {
                        block: [(cidr.to_string(), 1)].into(),
                    };
                    store
                        .put(&handle_key(&handle), &serde_json::to_vec(&hv).unwrap())
                        .await
                        .unwrap();
                    // 3. CAS block
                    match store
                        .update(
                            &block_key(&cidr),
                            &serde_json::to_vec(&block).unwrap(),
                            kv.mod_revision,
                        )
                        .await
                    {
                        Ok(_) => break,
                        Err(StoreError::Conflict { .. }) => continue,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }
    })
    .await
}

/// Runs `op` for `rounds` bursts of `concurrent` requests on every host at once (the
/// request of host h, number i, is `args(h, i)`); returns requests/s.
async fn bursts<F, Fut>(
    ipams: &[Arc<Ipam>],
    concurrent: usize,
    rounds: usize,
    args: impl Fn(usize, usize) -> AutoAssignArgs + Copy + Send + 'static,
    op: F,
) -> f64
where
    F: Fn(Arc<Ipam>, AutoAssignArgs) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let start = Instant::now();
    let hosts_done: Vec<_> = ipams
        .iter()
        .cloned()
        .enumerate()
        .map(|(h, ipam)| {
            tokio::spawn(async move {
                for r in 0..rounds {
                    let burst: Vec<_> = (0..concurrent)
                        .map(|i| tokio::spawn(op(ipam.clone(), args(h, r * concurrent + i))))
                        .collect();
                    for b in burst {
                        b.await.unwrap();
                    }
                }
            })
        })
        .collect();
    for h in hosts_done {
        h.await.unwrap();
    }
    (ipams.len() * concurrent * rounds) as f64 / start.elapsed().as_secs_f64()
}

/// Bursts: each host starts `concurrent` allocations at once, `rounds` times (a node
/// starting that many workloads together), with group commit on or off; then releases them
/// the same way (the workloads stopping together). (allocations/s, releases/s)
async fn burst_rate(
    hosts: usize,
    concurrent: usize,
    rounds: usize,
    group_commit: bool,
) -> (f64, f64) {
    let (_etcd, store) = fresh().await;
    Ipam::new(store.clone())
        .create_pool("10.0.0.0/14".parse().unwrap(), false)
        .await
        .unwrap();
    let one = |h: usize, i: usize| AutoAssignArgs {
        num_v4: 1,
        handle: Some(format!("h{h}-{i}")),
        host: format!("host-{h}"),
        ..Default::default()
    };
    // Each host holds a block before the clock starts, as a running node does.
    let ipams: Vec<Arc<Ipam>> = (0..hosts)
        .map(|_| Arc::new(Ipam::new(store.clone()).with_group_commit(group_commit)))
        .collect();
    for (h, ipam) in ipams.iter().enumerate() {
        ipam.auto_assign(&one(h, usize::MAX)).await.unwrap();
    }
    let assigned = bursts(&ipams, concurrent, rounds, one, |ipam, args| async move {
        assert_eq!(ipam.auto_assign(&args).await.unwrap().0.len(), 1);
    })
    .await;
    let released = bursts(&ipams, concurrent, rounds, one, |ipam, args| async move {
        let handle = args.handle.unwrap();
        assert_eq!(ipam.release_by_handle(&handle).await.unwrap(), 1);
    })
    .await;
    (assigned, released)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut rows = Vec::new();
        for (hosts, each) in [(1, PER_HOST_1), (8, PER_HOST_8)] {
            let raw = raw_txn_rate(hosts, each).await;
            let calico = calico_style_rate(hosts, each).await;
            let tenet = tenet_rate(hosts, each).await;
            rows.push((hosts, each, raw, calico, tenet));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut bursts = Vec::new();
        for hosts in [1, 8] {
            let raw = raw_txn_rate(hosts, 500).await;
            let alone = burst_rate(hosts, 100, BURST_ROUNDS, false).await;
            let grouped = burst_rate(hosts, 100, BURST_ROUNDS, true).await;
            bursts.push((hosts, raw, alone, grouped));
        }
        println!();
        println!("IPAM allocations/s against one local etcd {} (same run, fresh etcd per row)", etcd_version());
        println!();
        println!("| hosts | allocations | raw etcd txn/s | Calico-style alloc/s | tenet alloc/s | tenet / raw | tenet / Calico-style |");
        println!("|---:|---:|---:|---:|---:|---:|---:|");
        for (hosts, each, raw, calico, tenet) in rows {
            println!(
                "| {hosts} | {} | {raw:.0} | {calico:.0} | {tenet:.0} | {:.2}x | {:.2}x |",
                hosts * each,
                tenet / raw,
                tenet / calico
            );
        }
        println!();
        println!(
            "IPAM bursts: each host starts 100 allocations at once, {BURST_ROUNDS} times, then releases them the same way (operations/s)"
        );
        println!();
        println!("| hosts × concurrent | operations | raw etcd txn/s (one per operation) | one txn per operation | group commit | group / one each | group / raw |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for (hosts, raw, alone, grouped) in &bursts {
            for (what, a, g) in [("allocations", alone.0, grouped.0), ("releases", alone.1, grouped.1)] {
                println!(
                    "| {hosts} × 100 | {} {what} | {raw:.0} | {a:.0} | {g:.0} | {:.2}x | {:.2}x |",
                    hosts * 100 * BURST_ROUNDS,
                    g / a,
                    g / raw
                );
            }
        }
    });
}

fn etcd_version() -> String {
    std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default()
}
