//! tenet against a real 3-member etcd cluster: IPAM keeps every acknowledged allocation and
//! hands no address out twice when the leader is killed mid-burst; a watch survives a
//! leader change and a member restart; with quorum lost, writes fail with `Unavailable`
//! (no hang) and succeed again once quorum returns. A write that failed after it was sent
//! has an unknown outcome (etcd may still commit it), so a careful caller re-reads before
//! retrying — as the IPAM burst here does with its handles.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tenet::calico::{AllocationBlock, IPAM_BLOCKS_V4};
use tenet::ipam::{AutoAssignArgs, Ipam, IpamError, handle_key};
use tenet::store::{Datastore, EtcdOptions, StoreError};
use tenet::testbed::EtcdCluster;

const TASKS: usize = 8;
const PER_TASK: usize = 25;

/// Every allocated address by handle, read from the blocks themselves.
async fn allocations(store: &dyn Datastore) -> BTreeMap<String, Vec<IpAddr>> {
    let mut by_handle: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for kv in store.list(IPAM_BLOCKS_V4).await.unwrap().kvs {
        let block: AllocationBlock = serde_json::from_slice(&kv.value).unwrap();
        let IpAddr::V4(base) = block.cidr.network() else {
            unreachable!()
        };
        for (ordinal, attr) in block.allocations.iter().enumerate() {
            let Some(attr) = attr else { continue };
            let handle = block.attributes[*attr]
                .handle_id
                .clone()
                .unwrap_or_default();
            let ip = IpAddr::V4((u32::from(base) + ordinal as u32).into());
            by_handle.entry(handle).or_default().push(ip);
        }
    }
    by_handle
}

/// One allocation as a careful client makes it: after an error that may hide a commit
/// (etcd unreachable mid-request), it looks for its handle before trying again.
async fn allocate(ipam: &Ipam, store: &dyn Datastore, handle: &str, host: &str) -> Option<IpAddr> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let result = ipam
            .auto_assign(&AutoAssignArgs {
                num_v4: 1,
                handle: Some(handle.to_string()),
                host: host.to_string(),
                ..AutoAssignArgs::default()
            })
            .await;
        match result {
            Ok((v4, _)) => return Some(v4[0]),
            Err(IpamError::Store(e)) if e.is_unavailable() => {
                // Did it commit before the error? Ask until etcd answers.
                loop {
                    assert!(
                        Instant::now() < deadline,
                        "{handle}: still unavailable: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    match store.get(&handle_key(handle)).await {
                        // Committed: acknowledged; the address is read back later.
                        Ok(Some(_)) => return None,
                        Ok(None) => break,
                        Err(_) => {}
                    }
                }
            }
            Err(e) => panic!("{handle}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ipam_burst_survives_killing_the_leader() {
    let mut cluster = EtcdCluster::start(3).await.unwrap();
    let store: Arc<dyn Datastore> = Arc::new(cluster.store().await.unwrap());
    let ipam = Arc::new(Ipam::new(store.clone()));
    ipam.create_pool("10.70.0.0/16".parse().unwrap(), false)
        .await
        .unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (ipam, store, done) = (ipam.clone(), store.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..PER_TASK {
                let handle = format!("h-{t}-{i}");
                let ip = allocate(&ipam, store.as_ref(), &handle, &format!("host-{}", t % 2)).await;
                acked.push((handle, ip));
                done.fetch_add(1, Ordering::SeqCst);
            }
            acked
        }));
    }
    // Kill the leader once the burst is well under way.
    while done.load(Ordering::SeqCst) < TASKS * PER_TASK / 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let leader = cluster.leader().expect("a leader");
    cluster.kill(leader);
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_eq!(acked.len(), TASKS * PER_TASK);

    // Every acknowledged allocation is there, under its handle, with one address; no
    // address is held twice; IPAM's own check is clean.
    let held = allocations(store.as_ref()).await;
    let mut seen = HashSet::new();
    for (handle, ip) in &acked {
        let ips = held
            .get(handle)
            .unwrap_or_else(|| panic!("acknowledged {handle} is missing"));
        assert_eq!(ips.len(), 1, "{handle} holds {ips:?}");
        if let Some(ip) = ip {
            assert_eq!(ips[0], *ip, "{handle}");
        }
        assert!(seen.insert(ips[0]), "{} handed out twice", ips[0]);
    }
    assert_eq!(held.len(), acked.len(), "no allocation nobody asked for");
    // IPAM's check: blocks, handles and affinities agree. (It also reports every address as
    // leaked, since no workload endpoint uses them in this test; those are not its point.)
    let report = ipam.check().await.unwrap();
    let structural: Vec<_> = report
        .findings
        .iter()
        .filter(|f| !matches!(f, tenet::ipam::Finding::LeakedAddress { .. }))
        .collect();
    assert!(structural.is_empty(), "{structural:?}");

    // The killed member comes back and catches up.
    cluster.restart(leader).unwrap();
    cluster.wait_quorum().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_survives_a_leader_change_and_a_member_restart() {
    let mut cluster = EtcdCluster::start(3).await.unwrap();
    let store = cluster.store().await.unwrap();
    let start = store.put("/w/0", b"0").await.unwrap();
    let mut watch = store.watch("/w/", start + 1).await.unwrap();
    let leader = cluster.leader().expect("a leader");
    cluster.kill(leader);
    // Writes resume once a new leader is elected; the same watch delivers them in order.
    let put = |key: &'static str| {
        let store = store.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match store.put(key, b"x").await {
                    Ok(r) => return r,
                    Err(e) if e.is_unavailable() && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Err(e) => panic!("{key}: {e}"),
                }
            }
        }
    };
    put("/w/1").await;
    // The old leader comes back as a follower and catches up.
    cluster.restart(leader).unwrap();
    cluster.wait_quorum().await.unwrap();
    put("/w/2").await;
    let mut keys = Vec::new();
    while keys.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(30), watch.next())
            .await
            .expect("the watch delivers")
            .expect("the watch goes on")
            .expect("no watch error");
        keys.push(event.key);
    }
    assert_eq!(keys, ["/w/1", "/w/2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_quorum_writes_fail_fast_and_resume() {
    let mut cluster = EtcdCluster::start(3).await.unwrap();
    let store = cluster
        .store_with(EtcdOptions {
            request_timeout: Duration::from_secs(2),
            ..EtcdOptions::default()
        })
        .await
        .unwrap();
    store.put("/q/before", b"1").await.unwrap();
    cluster.kill(0);
    cluster.kill(1);
    // Bounded by the request timeout: Unavailable, not a hang (the outer timeout is only
    // the test's guard).
    let err = tokio::time::timeout(Duration::from_secs(30), store.put("/q/during", b"2"))
        .await
        .expect("a write without quorum returns")
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Unavailable { .. }),
        "without quorum: {err}"
    );
    cluster.restart(0).unwrap();
    cluster.wait_quorum().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match store.put("/q/after", b"3").await {
            Ok(_) => break,
            Err(e) if e.is_unavailable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("after quorum returned: {e}"),
        }
    }
    // The write that timed out was sent: its outcome is unknown to the client (etcd may
    // commit it once quorum returns), which is why callers re-read before retrying.
    assert!(store.get("/q/before").await.unwrap().is_some());
    assert!(store.get("/q/after").await.unwrap().is_some());
}
