//! Calico block IPAM against a real etcd: the reference scenarios (calico-data-model.md
//! §7.3), concurrency, strict affinity, legacy data and the consistency checker.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use tenet::calico::{AllocationBlock, IpamConfig, IpamHandle};
use tenet::ipam::{AutoAssignArgs, Finding, Ipam, IpamError, affinity_key, block_key, handle_key};
use tenet::store::{Datastore, EtcdStore};
use tenet::testbed::EtcdServer;

async fn setup() -> (EtcdServer, Arc<EtcdStore>) {
    let server = EtcdServer::start().await.expect("etcd");
    let store = Arc::new(server.store().await.unwrap());
    (server, store)
}

fn net(s: &str) -> IpNetwork {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn one(host: &str, handle: Option<&str>) -> AutoAssignArgs {
    AutoAssignArgs {
        num_v4: 1,
        handle: handle.map(str::to_string),
        host: host.into(),
        ..Default::default()
    }
}

async fn block(store: &EtcdStore, cidr: IpNetwork) -> Option<AllocationBlock> {
    let kv = store.get(&block_key(&cidr)).await.unwrap()?;
    Some(serde_json::from_slice(&kv.value).unwrap())
}

async fn handle(store: &EtcdStore, id: &str) -> Option<IpamHandle> {
    let kv = store.get(&handle_key(id)).await.unwrap()?;
    Some(serde_json::from_slice(&kv.value).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_assign_claims_a_block_then_reuses_it_and_release_goes_to_the_back() {
    let (_etcd, store) = setup().await;
    let ipam = Ipam::new(store.clone());
    ipam.create_pool(net("10.10.0.0/16"), true).await.unwrap();

    let (v4, v6) = ipam.auto_assign(&one("n1", Some("h1"))).await.unwrap();
    assert!(v6.is_empty());
    let base = v4[0];
    let b = tenet::ipam::block_of(base);
    assert_eq!(b.network(), base, "the first address is the block's base");
    assert!(store.get(&affinity_key("n1", &b)).await.unwrap().is_some());
    let blk = block(&store, b).await.unwrap();
    assert_eq!(blk.affinity.as_deref(), Some("host:n1"));
    assert_eq!(blk.allocations[0], Some(0));
    assert_eq!(blk.unallocated, (1..64).collect::<Vec<_>>());
    assert_eq!(blk.attributes[0].handle_id.as_deref(), Some("h1"));
    assert_eq!(
        handle(&store, "h1").await.unwrap().block,
        BTreeMap::from([(b.to_string(), 1)])
    );

    // Scenario 1, second call: the next address of the same block, no new affinity.
    let second = ipam.auto_assign(&one("n1", Some("h2"))).await.unwrap().0[0];
    assert_eq!(second, tenet::ipam::address(&b, 1));
    assert_eq!(ipam.affine_blocks("n1", true).await.unwrap(), [b]);

    // Scenario 2: release the base, then the next assignment is base+2 (freed goes last).
    assert!(ipam.release_ips(&[base]).await.unwrap().is_empty());
    assert!(
        handle(&store, "h1").await.is_none(),
        "an emptied handle is deleted"
    );
    let third = ipam.auto_assign(&one("n1", None)).await.unwrap().0[0];
    assert_eq!(third, tenet::ipam::address(&b, 2));
    // Releasing something not allocated reports it back.
    assert_eq!(ipam.release_ips(&[base]).await.unwrap(), [base]);
    assert!(
        ipam.check()
            .await
            .unwrap()
            .findings
            .iter()
            .all(|f| matches!(f, Finding::LeakedAddress { .. }))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_block_claims_another_then_borrows_when_the_pool_is_exhausted() {
    let (_etcd, store) = setup().await;
    let ipam = Ipam::new(store.clone());
    ipam.create_pool(net("10.20.0.0/25"), false).await.unwrap(); // two blocks
    let n2 = ipam.auto_assign(&one("n2", Some("n2-a"))).await.unwrap().0[0];
    let n2_block = tenet::ipam::block_of(n2);

    // n1 takes 64 (one whole block), then 1 more: no free block left → borrow from n2's.
    let args = AutoAssignArgs {
        num_v4: 64,
        handle: Some("bulk".into()),
        host: "n1".into(),
        ..Default::default()
    };
    let got = ipam.auto_assign(&args).await.unwrap().0;
    assert_eq!(got.len(), 64);
    let n1_block = tenet::ipam::block_of(got[0]);
    assert_ne!(n1_block, n2_block);
    assert!(got.iter().all(|a| n1_block.contains(*a)));
    let borrowed = ipam
        .auto_assign(&one("n1", Some("borrow")))
        .await
        .unwrap()
        .0;
    assert_eq!(borrowed.len(), 1);
    assert!(n2_block.contains(borrowed[0]), "borrowed from n2's block");
    assert_eq!(
        block(&store, n2_block).await.unwrap().affinity.as_deref(),
        Some("host:n2")
    );
    assert!(
        store
            .get(&affinity_key("n1", &n2_block))
            .await
            .unwrap()
            .is_none()
    );
    // The pool is now full but for n2's block: a multi-address request gets what is left.
    let args = AutoAssignArgs {
        num_v4: 100,
        host: "n3".into(),
        ..Default::default()
    };
    assert_eq!(ipam.auto_assign(&args).await.unwrap().0.len(), 62);
    assert_eq!(
        handle(&store, "bulk").await.unwrap().block[&n1_block.to_string()],
        64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_affinity_exhaustion_returns_fewer_without_error() {
    let (_etcd, store) = setup().await;
    let ipam = Ipam::new(store.clone());
    ipam.set_config(IpamConfig {
        strict_affinity: true,
        auto_allocate_blocks: true,
    })
    .await
    .unwrap();
    ipam.create_pool(net("10.30.0.0/26"), false).await.unwrap(); // one block
    ipam.auto_assign(&one("n1", None)).await.unwrap();
    let args = AutoAssignArgs {
        num_v4: 3,
        host: "n2".into(),
        ..Default::default()
    };
    assert_eq!(
        ipam.auto_assign(&args).await.unwrap().0.len(),
        0,
        "no borrowing under strict affinity"
    );
    let args = AutoAssignArgs {
        num_v4: 100,
        host: "n1".into(),
        ..Default::default()
    };
    assert_eq!(ipam.auto_assign(&args).await.unwrap().0.len(), 63);
    // Scenario 8: config changes are refused while blocks exist.
    let err = ipam.set_config(IpamConfig::default()).await.unwrap_err();
    assert!(matches!(err, IpamError::ConfigInUse), "{err}");
    assert_eq!(
        err.to_string(),
        "Cannot change IPAM config while allocations exist"
    );
    let both_off = IpamConfig {
        strict_affinity: false,
        auto_allocate_blocks: false,
    };
    assert!(matches!(
        ipam.set_config(both_off).await.unwrap_err(),
        IpamError::ConfigInvalid
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hosts_racing_for_one_block_never_share_its_affinity() {
    for round in 0..10 {
        let (_etcd, store) = setup().await;
        let pool = net("10.40.0.0/26");
        Ipam::new(store.clone())
            .create_pool(pool, false)
            .await
            .unwrap();
        let (a, b) = (Ipam::new(store.clone()), Ipam::new(store.clone()));
        let (args_a, args_b) = (one("n1", None), one("n2", None));
        let (ra, rb) = tokio::join!(a.auto_assign(&args_a), b.auto_assign(&args_b));
        let (ra, rb) = (ra.unwrap().0, rb.unwrap().0);
        assert_eq!(
            (ra.len(), rb.len()),
            (1, 1),
            "round {round}: the loser borrows"
        );
        assert_ne!(ra[0], rb[0]);
        let owners: Vec<String> = store
            .list("/calico/ipam/v2/host/")
            .await
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        assert_eq!(
            owners.len(),
            1,
            "round {round}: exactly one affinity key: {owners:?}"
        );
        let owner = block(&store, pool).await.unwrap().affinity.unwrap();
        assert!(owners[0].contains(owner.trim_start_matches("host:")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_affinity_keeps_allocations_and_the_last_release_deletes_the_block() {
    let (_etcd, store) = setup().await;
    let ipam = Ipam::new(store.clone());
    ipam.create_pool(net("10.50.0.0/24"), false).await.unwrap();
    let args = AutoAssignArgs {
        num_v4: 3,
        handle: Some("h".into()),
        host: "n1".into(),
        ..Default::default()
    };
    let ips = ipam.auto_assign(&args).await.unwrap().0;
    let b = tenet::ipam::block_of(ips[0]);
    ipam.release_affinity(b, "n1").await.unwrap();
    let blk = block(&store, b).await.unwrap();
    assert_eq!(blk.affinity, None);
    assert_eq!(blk.allocations.iter().flatten().count(), 3);
    assert!(store.get(&affinity_key("n1", &b)).await.unwrap().is_none());
    assert!(ipam.release_ips(&ips[..2]).await.unwrap().is_empty());
    assert!(block(&store, b).await.is_some());
    assert_eq!(ipam.release_by_handle("h").await.unwrap(), 1);
    assert!(
        block(&store, b).await.is_none(),
        "empty and unaffine: deleted"
    );
    assert!(handle(&store, "h").await.is_none());
    assert!(matches!(
        ipam.release_by_handle("h").await.unwrap_err(),
        IpamError::HandleNotFound(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_affinity_assign_ip_attributes_and_pool_deletion() {
    let (_etcd, store) = setup().await;
    let ipam = Ipam::new(store.clone());
    ipam.create_pool(net("10.10.0.0/16"), false).await.unwrap();
    // Scenario 7.
    let (claimed, failed) = ipam
        .claim_affinity(net("10.10.0.0/25"), "n1")
        .await
        .unwrap();
    assert_eq!(claimed, [net("10.10.0.0/26"), net("10.10.0.64/26")]);
    assert!(failed.is_empty());
    let (claimed, failed) = ipam
        .claim_affinity(net("10.10.0.0/25"), "n2")
        .await
        .unwrap();
    assert!(claimed.is_empty() && failed.len() == 2);
    let err = ipam
        .claim_affinity(net("10.10.0.0/27"), "n1")
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "The requested CIDR (10.10.0.0/27) is smaller than the minimum."
    );
    assert!(matches!(
        ipam.claim_affinity(net("10.99.0.0/26"), "n1")
            .await
            .unwrap_err(),
        IpamError::CidrNotInPool(_)
    ));

    // A specific address, with attributes; a second time is refused; outside pools too.
    let attrs = BTreeMap::from([("container".to_string(), "c1".to_string())]);
    ipam.assign_ip(ip("10.10.7.9"), Some("wep1"), attrs.clone(), "n3")
        .await
        .unwrap();
    let err = ipam
        .assign_ip(ip("10.10.7.9"), None, BTreeMap::new(), "n3")
        .await
        .unwrap_err();
    assert!(matches!(err, IpamError::AlreadyAssigned(_)), "{err}");
    assert!(matches!(
        ipam.assign_ip(ip("192.168.1.1"), None, BTreeMap::new(), "n3")
            .await
            .unwrap_err(),
        IpamError::NotInPool(_)
    ));
    assert_eq!(
        ipam.get_assignment_attributes(ip("10.10.7.9"))
            .await
            .unwrap(),
        (Some("wep1".into()), attrs)
    );
    let err = ipam
        .get_assignment_attributes(ip("10.10.7.10"))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "IP 10.10.7.10 is not currently assigned in block"
    );
    let err = ipam
        .get_assignment_attributes(ip("10.10.200.1"))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "10.10.200.1 is not assigned");

    // Pool deletion: disable, release affinities (empty blocks go), delete the key.
    ipam.delete_pool(net("10.10.0.0/16")).await.unwrap();
    assert!(ipam.pools(true).await.unwrap().is_empty());
    assert!(
        store
            .list("/calico/ipam/v2/host/")
            .await
            .unwrap()
            .kvs
            .is_empty()
    );
    assert!(
        block(&store, net("10.10.0.0/26")).await.is_none(),
        "empty claimed block deleted"
    );
    let kept = block(&store, net("10.10.7.0/26")).await.unwrap();
    assert_eq!(kept.affinity, None, "non-empty block stays, unaffine");
    assert!(matches!(
        ipam.auto_assign(&one("n1", None)).await.unwrap_err(),
        IpamError::NoPools
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_blocks_are_slash_122() {
    let (_etcd, store) = setup().await;
    let ipam = Ipam::new(store.clone());
    ipam.create_pool(net("fd80:24e2:f998:72d6::/64"), false)
        .await
        .unwrap();
    let args = AutoAssignArgs {
        num_v6: 2,
        handle: Some("v6".into()),
        host: "n1".into(),
        ..Default::default()
    };
    let (v4, v6) = ipam.auto_assign(&args).await.unwrap();
    assert!(v4.is_empty());
    assert_eq!(v6.len(), 2);
    let b = tenet::ipam::block_of(v6[0]);
    assert_eq!(b.prefix(), 122);
    assert!(store.get(&affinity_key("n1", &b)).await.unwrap().is_some());
    assert!(
        store
            .get(&format!(
                "/calico/ipam/v2/assignment/ipv6/block/{}",
                tenet::calico::cidr_key(&b)
            ))
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(ipam.release_by_handle("v6").await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_block_keeps_allocating_correctly() {
    let (_etcd, store) = setup().await;
    let ipam = Ipam::new(store.clone());
    ipam.create_pool(net("10.60.0.0/24"), false).await.unwrap();
    // Written by Python-era Calico: hostAffinity, "primary", no unallocated/strictAffinity.
    let allocations = format!("[0,0,null,1{}]", ",null".repeat(60));
    let legacy = format!(
        r#"{{"cidr":"10.60.0.0/26","hostAffinity":"old","allocations":{allocations},"attributes":[{{"primary":"p1","secondary":{{}}}},{{"primary":"p2"}}]}}"#
    );
    store
        .put(&block_key(&net("10.60.0.0/26")), legacy.as_bytes())
        .await
        .unwrap();
    store
        .put(&affinity_key("old", &net("10.60.0.0/26")), b"")
        .await
        .unwrap();
    store
        .put(
            &handle_key("p1"),
            br#"{"id":"p1","block":{"10.60.0.0/26":2}}"#,
        )
        .await
        .unwrap();
    let got = ipam
        .auto_assign(&AutoAssignArgs {
            num_v4: 2,
            host: "old".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .0;
    assert_eq!(
        got,
        [ip("10.60.0.2"), ip("10.60.0.4")],
        "free ordinals rebuilt from allocations, in order"
    );
    assert_eq!(ipam.release_by_handle("p1").await.unwrap(), 2);
    let blk = block(&store, net("10.60.0.0/26")).await.unwrap();
    assert_eq!(blk.affinity.as_deref(), Some("host:old"));
    assert!(blk.unallocated.ends_with(&[0, 1]));
    assert!(blk.problems().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_hosts_allocate_and_release_concurrently_without_duplicates_or_leaks() {
    const HOSTS: usize = 8;
    const EACH: usize = 250;
    let (_etcd, store) = setup().await;
    Ipam::new(store.clone())
        .create_pool(net("10.70.0.0/20"), false)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for h in 0..HOSTS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let ipam = Ipam::new(store);
            let host = format!("node{h}");
            let mut held: Vec<(IpAddr, String)> = Vec::new();
            let mut handed_out = Vec::new();
            for i in 0..EACH {
                let handle = format!("{host}-{i}");
                let got = ipam
                    .auto_assign(&one(&host, Some(&handle)))
                    .await
                    .unwrap()
                    .0;
                assert_eq!(got.len(), 1);
                held.push((got[0], handle));
                handed_out.push(got[0]);
                if i % 3 == 2 {
                    // Interleaved releases: by address and by handle, alternately.
                    let (addr, handle) = held.remove(i % held.len());
                    if i % 2 == 0 {
                        assert!(ipam.release_ips(&[addr]).await.unwrap().is_empty());
                    } else {
                        assert_eq!(ipam.release_by_handle(&handle).await.unwrap(), 1);
                    }
                }
            }
            (host, held)
        }));
    }
    let mut held_all = Vec::new();
    let mut hosts = Vec::new();
    for t in tasks {
        let (host, held) = t.await.unwrap();
        hosts.push(host);
        held_all.extend(held);
    }
    let unique: HashSet<IpAddr> = held_all.iter().map(|(a, _)| *a).collect();
    assert_eq!(unique.len(), held_all.len(), "no address is held twice");

    let ipam = Ipam::new(store.clone());
    let report = ipam.check().await.unwrap();
    assert_eq!(
        report.allocated,
        held_all.len(),
        "blocks hold exactly what the hosts hold"
    );
    let not_leaks: Vec<&Finding> = report
        .findings
        .iter()
        .filter(|f| !matches!(f, Finding::LeakedAddress { .. }))
        .collect();
    assert!(
        not_leaks.is_empty(),
        "handles and affinities in step: {not_leaks:?}"
    );
    // Every handle's count equals the addresses it holds (one each).
    for (_, h) in &held_all {
        let value = handle(&store, h).await.unwrap();
        assert_eq!(value.block.values().sum::<u64>(), 1, "handle {h}");
    }

    // Release everything, then the affinities: every block must go.
    let addrs: Vec<IpAddr> = held_all.iter().map(|(a, _)| *a).collect();
    assert!(ipam.release_ips(&addrs).await.unwrap().is_empty());
    for host in &hosts {
        ipam.release_host_affinities(host).await.unwrap();
    }
    for prefix in [
        "/calico/ipam/v2/assignment/",
        "/calico/ipam/v2/handle/",
        "/calico/ipam/v2/host/",
    ] {
        let left: BTreeSet<String> = store
            .list(prefix)
            .await
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        assert!(left.is_empty(), "{prefix} not empty: {left:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_and_repairs_calico_era_inconsistencies() {
    let (_etcd, store) = setup().await;
    let ipam = Ipam::new(store.clone());
    ipam.create_pool(net("10.80.0.0/24"), false).await.unwrap();
    let args = AutoAssignArgs {
        num_v4: 2,
        handle: Some("used".into()),
        host: "n1".into(),
        ..Default::default()
    };
    let used = ipam.auto_assign(&args).await.unwrap().0;
    ipam.auto_assign(&one("n1", Some("leak"))).await.unwrap();
    // A workload endpoint uses the first two addresses.
    let wep = format!(
        r#"{{"state":"active","name":"cali1","active_instance_id":"","mac":null,"profile_ids":[],"ipv4_nets":["{}/32","{}/32"],"ipv6_nets":[]}}"#,
        used[0], used[1]
    );
    store
        .put(
            "/calico/v1/host/n1/workload/k8s/pod1/endpoint/eth0",
            wep.as_bytes(),
        )
        .await
        .unwrap();
    // Calico-era damage: an over-counted handle, a stale affinity, a missing marker.
    let b = tenet::ipam::block_of(used[0]);
    let others: Vec<IpNetwork> = (0..4)
        .map(|i| tenet::ipam::nth_block(&net("10.80.0.0/24"), i))
        .filter(|o| *o != b)
        .collect();
    store
        .put(
            &handle_key("used"),
            format!(r#"{{"block":{{"{b}":5}}}}"#).as_bytes(),
        )
        .await
        .unwrap();
    store
        .put(&affinity_key("ghost", &others[0]), b"{}")
        .await
        .unwrap();
    ipam.claim_affinity(others[1], "n2").await.unwrap();
    store
        .delete(&affinity_key("n2", &others[1]), None)
        .await
        .unwrap();

    let report = ipam.check().await.unwrap();
    let text: Vec<String> = report.findings.iter().map(ToString::to_string).collect();
    assert_eq!(report.findings.len(), 4, "{text:#?}");
    let leaked = tenet::ipam::address(&b, 2);
    assert!(
        text.iter()
            .any(|t| t.starts_with(&format!("leaked address {leaked} (handle leak"))),
        "{text:#?}"
    );
    assert!(
        text.iter().any(|t| t.contains(&format!(
            "handle used records 5 address(es) in block {b}, the block holds 2"
        ))),
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains(&format!("affinity of host ghost to block {}", others[0])))
    );
    assert!(
        text.iter()
            .any(|t| t.contains(&format!("block {} is affine to host n2", others[1])))
    );

    let after = ipam.repair().await.unwrap();
    assert!(after.is_clean(), "{:?}", after.findings);
    assert_eq!(after.allocated, 2);
    assert_eq!(
        handle(&store, "used").await.unwrap().block[&b.to_string()],
        2
    );
    assert!(handle(&store, "leak").await.is_none());
}

/// Per-tenant IPAM: two tenants with the same subnet get the same addresses without
/// colliding, under their own keys (none of Calico's); the subnet's network, gateway and
/// broadcast addresses are never handed out nor freed by a workload's release.
#[tokio::test]
async fn tenants_with_overlapping_subnets_have_their_own_addresses() {
    let (_server, store) = setup().await;
    let ds: Arc<dyn Datastore> = store.clone();
    let a = Ipam::for_tenant(ds.clone(), "acme");
    let b = Ipam::for_tenant(ds.clone(), "beta/eu");
    let subnet: ipnetwork::Ipv4Network = "172.16.0.0/24".parse().unwrap();
    let none = Default::default;
    let a1 = a
        .assign_in_subnet(subnet, "cn-1", "vnic-a1", None, none())
        .await
        .unwrap();
    let b1 = b
        .assign_in_subnet(subnet, "cn-2", "vnic-b1", None, none())
        .await
        .unwrap();
    assert_eq!(
        a1, b1,
        "overlapping subnets: the same first address for both"
    );
    assert_eq!(
        a1.to_string(),
        "172.16.0.2",
        "network and gateway are reserved"
    );
    let a2 = a
        .assign_in_subnet(
            subnet,
            "cn-1",
            "vnic-a2",
            Some("172.16.0.200".parse().unwrap()),
            none(),
        )
        .await
        .unwrap();
    assert_eq!(a2.to_string(), "172.16.0.200");
    for bad in ["172.16.0.1", "172.16.0.255", "172.16.0.0"] {
        let e = a
            .assign_in_subnet(subnet, "cn-1", "x", Some(bad.parse().unwrap()), none())
            .await
            .unwrap_err();
        assert!(matches!(e, IpamError::Reserved(_)), "{bad}: {e}");
    }
    let e = a
        .assign_in_subnet(
            subnet,
            "cn-1",
            "x",
            Some("10.0.0.5".parse().unwrap()),
            none(),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, IpamError::NotInPool(_)), "{e}");
    let e = a
        .assign_in_subnet("10.9.0.0/28".parse().unwrap(), "cn-1", "x", None, none())
        .await
        .unwrap_err();
    assert!(matches!(e, IpamError::CidrTooSmall(_)), "{e}");

    let all = store.list("/").await.unwrap();
    assert!(
        all.kvs
            .iter()
            .all(|kv| !kv.key.starts_with("/calico/ipam/")),
        "no Calico IPAM key is written"
    );
    assert!(all.kvs.iter().any(|kv| {
        kv.key
            .starts_with("/tenet/v1/tenant/acme/ipam/assignment/ipv4/block/")
    }));
    assert!(all.kvs.iter().any(|kv| {
        kv.key
            .starts_with("/tenet/v1/tenant/beta%2feu/ipam/handle/vnic-b1")
    }));

    assert_eq!(a.release_by_handle("vnic-a1").await.unwrap(), 1);
    // Released, the address is free again (Calico hands it out last, not at once).
    let again = a
        .assign_in_subnet(subnet, "cn-1", "vnic-a3", Some(a1), none())
        .await
        .unwrap();
    assert_eq!(again, a1);
    // A fresh client (a restarted agent) knows the reserved addresses from etcd.
    let fresh = Ipam::for_tenant(ds, "acme");
    let next = fresh
        .assign_in_subnet(subnet, "cn-1", "vnic-a4", None, none())
        .await
        .unwrap();
    assert_eq!(next.to_string(), "172.16.0.3");
}

/// A burst of allocations into a subnet nobody used yet (a tenant launching ten instances):
/// the subnet's network, gateway and broadcast addresses are reserved once, in one
/// transaction per block, while the others wait — rather than every allocation racing the
/// others for the same three addresses, each losing compares and retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_into_a_new_subnet_reserves_its_edges_once() {
    const BURST: usize = 20;
    let (_etcd, store) = setup().await;
    let subnet: ipnetwork::Ipv4Network = "172.16.0.0/24".parse().unwrap();
    let ipam = Arc::new(Ipam::for_tenant(store.clone(), "fresh"));
    let tasks: Vec<_> = (0..BURST)
        .map(|i| {
            let ipam = ipam.clone();
            tokio::spawn(async move {
                ipam.assign_in_subnet(subnet, "node1", &format!("vnic-{i}"), None, BTreeMap::new())
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut got = HashSet::new();
    for t in tasks {
        got.insert(t.await.unwrap());
    }
    assert_eq!(got.len(), BURST, "no address twice");
    let edges = [subnet.network(), subnet.nth(1).unwrap(), subnet.broadcast()];
    assert!(got.iter().all(|ip| !edges.contains(ip)), "{got:?}");
    let reserved = tenet::ipam::IpamScope::Tenant("fresh".into()).root()
        + &handle_key(&tenet::ipam::reserved_handle(&subnet))["/calico/ipam/v2/".len()..];
    let value: IpamHandle =
        serde_json::from_slice(&store.get(&reserved).await.unwrap().unwrap().value).unwrap();
    assert_eq!(value.block.values().sum::<u64>(), 3, "{value:?}");
    // Racing for the edges, each allocation lost at least one compare (20 or more in all);
    // now the reservation loses none, and group commit leaves the odd stale block read.
    let conflicts = ipam
        .stats()
        .conflicts
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(conflicts < BURST as u64 / 4, "{conflicts} compares lost");
}

/// A new subnet's network, gateway and broadcast addresses span two blocks but share one
/// handle: reserved in one transaction, not one per block racing for that handle.
#[tokio::test]
async fn a_new_subnets_edges_are_reserved_in_one_transaction() {
    use std::sync::atomic::Ordering::Relaxed;
    let (_etcd, store) = setup().await;
    let subnet: ipnetwork::Ipv4Network = "172.16.4.0/24".parse().unwrap();
    let ipam = Ipam::for_tenant(store.clone(), "fresh");
    let ip = ipam
        .assign_in_subnet(subnet, "node1", "vnic-1", None, BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(
        ip,
        subnet.nth(2).unwrap(),
        "the first address after the gateway"
    );
    let stats = ipam.stats();
    assert_eq!(
        (
            stats.transactions.load(Relaxed),
            stats.conflicts.load(Relaxed)
        ),
        (2, 0),
        "one transaction for the edges (both blocks), one for the address; no compare lost"
    );
    let reserved = tenet::ipam::IpamScope::Tenant("fresh".into()).root()
        + &handle_key(&tenet::ipam::reserved_handle(&subnet))["/calico/ipam/v2/".len()..];
    let value: IpamHandle =
        serde_json::from_slice(&store.get(&reserved).await.unwrap().unwrap().value).unwrap();
    assert_eq!(
        value.block.into_iter().collect::<Vec<_>>(),
        [
            ("172.16.4.0/26".to_string(), 2),
            ("172.16.4.192/26".to_string(), 1)
        ],
        "network and gateway in the first block, broadcast in the last"
    );
    let again = ipam
        .assign_in_subnet(subnet, "node1", "vnic-2", None, BTreeMap::new())
        .await
        .unwrap();
    assert_eq!(again, subnet.nth(3).unwrap());
    assert_eq!(
        stats.transactions.load(Relaxed),
        3,
        "reserved once per subnet"
    );
}

/// `check` in a tenant's scope: an address no endpoint of that tenant uses is a leak, named
/// with its block's host — even when another tenant's endpoint has the same address — and
/// the subnet's reserved addresses are not; `repair` releases the leak.
#[tokio::test]
async fn a_tenant_scope_check_finds_its_own_leaks() {
    use tenet::calico::vnic::VnicRecord;
    use tenet::calico::{CalicoKey, WorkloadEndpointId};
    let (_server, store) = setup().await;
    let ds: Arc<dyn Datastore> = store.clone();
    let acme = Ipam::for_tenant(ds.clone(), "acme");
    let subnet: ipnetwork::Ipv4Network = "172.16.0.0/24".parse().unwrap();
    let used = acme
        .assign_in_subnet(subnet, "cn-1", "vnic-a1", None, Default::default())
        .await
        .unwrap();
    let leaked = acme
        .assign_in_subnet(subnet, "cn-1", "vnic-a2", None, Default::default())
        .await
        .unwrap();
    let endpoint = |tenant: &str, vnic: &str, ip| {
        let record = VnicRecord {
            tenant: tenant.into(),
            subnet,
            concentrator: "c".into(),
            concentrator_ip: "10.254.0.9".parse().unwrap(),
            kind: "container".into(),
            ifname: format!("tvn_{vnic}"),
            mac: "02:00:00:00:00:01".parse().unwrap(),
            ip,
        };
        let key = CalicoKey::WorkloadEndpoint(WorkloadEndpointId {
            host: "cn-1".into(),
            orchestrator: "ciao".into(),
            workload: format!("i-{vnic}"),
            endpoint: vnic.into(),
        })
        .path();
        (key, serde_json::to_vec(&record.to_endpoint()).unwrap())
    };
    let (k, v) = endpoint("acme", "vnic-a1", used);
    store.put(&k, &v).await.unwrap();
    // Another tenant's endpoint at the leaked address proves nothing for acme.
    let (k, v) = endpoint("globex", "vnic-g1", leaked);
    store.put(&k, &v).await.unwrap();

    assert_eq!(
        tenet::ipam::tenants_with_ipam(store.as_ref())
            .await
            .unwrap(),
        ["acme"]
    );
    let report = acme.check().await.unwrap();
    assert_eq!(
        report.findings,
        [Finding::LeakedAddress {
            ip: IpAddr::V4(leaked),
            handle: "vnic-a2".into(),
            host: Some("cn-1".into()),
        }],
        "only the leak; the reserved network, gateway and broadcast are held on purpose"
    );
    assert!(acme.repair().await.unwrap().is_clean());
    assert!(matches!(
        acme.release_by_handle("vnic-a2").await,
        Err(IpamError::HandleNotFound(_))
    ));
    // Calico's own scope sees none of it.
    let calico = Ipam::new(ds).check().await.unwrap();
    assert_eq!(calico.blocks, 0);
}

/// A node starting 100 workloads at once: the allocations from its affine block share
/// transactions (group commit) — far fewer etcd revisions than allocations — and every
/// guarantee holds: no address twice, each handle counting exactly its addresses (one
/// handle asked twice holds two), IPAM's check clean; then a concurrent burst of releases.
/// The same burst with group commit off takes at least one transaction per allocation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_on_one_host_shares_transactions_and_keeps_every_guarantee() {
    const BURST: usize = 100;
    let (_etcd, store) = setup().await;
    let subnet: ipnetwork::Ipv4Network = "172.16.0.0/24".parse().unwrap();
    for group_commit in [true, false] {
        let tenant = if group_commit { "grouped" } else { "alone" };
        let ipam =
            Arc::new(Ipam::for_tenant(store.clone(), tenant).with_group_commit(group_commit));
        // The subnet's edges are reserved once, before the burst.
        ipam.assign_in_subnet(subnet, "node1", "warm", None, BTreeMap::new())
            .await
            .unwrap();
        let before = store.revision().await.unwrap();
        let tasks: Vec<_> = (0..BURST)
            .map(|i| {
                let ipam = ipam.clone();
                // Requests 0 and 1 share a handle: it must count two addresses.
                let handle = format!("vnic-{}", i.max(1));
                tokio::spawn(async move {
                    let ip = ipam
                        .assign_in_subnet(subnet, "node1", &handle, None, BTreeMap::new())
                        .await
                        .unwrap();
                    (ip, handle)
                })
            })
            .collect();
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap());
        }
        let revisions = (store.revision().await.unwrap() - before) as usize;
        let unique: HashSet<_> = got.iter().map(|(ip, _)| *ip).collect();
        assert_eq!(unique.len(), BURST, "{tenant}: no address twice");
        if group_commit {
            assert!(
                revisions < BURST / 2,
                "grouped: {BURST} allocations in {revisions} transactions"
            );
        } else {
            assert!(revisions >= BURST, "alone: {revisions} transactions");
        }
        let scoped = |id: &str| {
            tenet::ipam::IpamScope::Tenant(tenant.into()).root()
                + &handle_key(id)["/calico/ipam/v2/".len()..]
        };
        for (_, h) in &got {
            let value: IpamHandle =
                serde_json::from_slice(&store.get(&scoped(h)).await.unwrap().unwrap().value)
                    .unwrap();
            let want = if h == "vnic-1" { 2 } else { 1 };
            assert_eq!(
                value.block.values().sum::<u64>(),
                want,
                "{tenant}: handle {h}"
            );
        }
        let report = ipam.check().await.unwrap();
        assert_eq!(
            report.allocated,
            BURST + 1 + 3,
            "{tenant}: the burst, warm and the edges"
        );
        let bad: Vec<&Finding> = report
            .findings
            .iter()
            .filter(|f| !matches!(f, Finding::LeakedAddress { .. }))
            .collect();
        assert!(bad.is_empty(), "{tenant}: {bad:?}");
        // Releases in a burst too: every address comes back, in shared transactions.
        let before = store.revision().await.unwrap();
        let releases: Vec<_> = got
            .iter()
            .map(|(_, h)| h.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(|h| {
                let ipam = ipam.clone();
                tokio::spawn(async move { ipam.release_by_handle(&h).await.unwrap() })
            })
            .collect();
        let mut released = 0;
        for r in releases {
            released += r.await.unwrap();
        }
        assert_eq!(released, BURST, "{tenant}");
        let revisions = (store.revision().await.unwrap() - before) as usize;
        let handles = BURST - 1;
        if group_commit {
            assert!(
                revisions < handles / 2,
                "grouped: {handles} releases in {revisions} transactions"
            );
        } else {
            assert!(revisions >= handles, "alone: {revisions} transactions");
        }
        // Every handle is gone, and only warm and the edges are left.
        for (_, h) in &got {
            assert!(
                store.get(&scoped(h)).await.unwrap().is_none(),
                "{tenant}: {h} left"
            );
        }
        let report = ipam.check().await.unwrap();
        assert_eq!(report.allocated, 1 + 3, "{tenant}: warm and the edges");
        assert!(
            report
                .findings
                .iter()
                .all(|f| matches!(f, Finding::LeakedAddress { .. })),
            "{tenant}: {:?}",
            report.findings
        );
    }
}

/// Writes that ride with an allocation (a workload endpoint naming its address) land in the
/// allocation's own transaction, each with its own address, also when a burst shares the
/// transactions; a chosen address is not assigned that way, and the caller is told so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_ride_with_the_allocation_that_names_their_address() {
    use std::sync::atomic::Ordering::Relaxed;
    use tenet::ipam::ThenWrite;
    use tenet::store::{Datastore, TxnOp};
    let (_etcd, store) = setup().await;
    let subnet: ipnetwork::Ipv4Network = "172.16.6.0/24".parse().unwrap();
    let ipam = Arc::new(Ipam::for_tenant(store.clone(), "riders"));
    let endpoint = |i: usize| format!("/bench/riders/endpoint-{i}");
    let then_for = |i: usize| {
        let key = endpoint(i);
        ThenWrite::new(move |ips: &[IpAddr]| vec![TxnOp::put(key.clone(), ips[0].to_string())])
    };
    // The subnet's edges reserved first, so that the burst counts only its own transactions.
    let first = then_for(0);
    let ip0 = ipam
        .assign_in_subnet_then(
            subnet,
            "node1",
            "vnic-0",
            None,
            BTreeMap::new(),
            Some(&first),
        )
        .await
        .unwrap();
    assert!(first.written());
    let before = ipam.stats().transactions.load(Relaxed);
    let burst = futures::future::join_all((1..=30).map(|i| {
        let (ipam, then) = (ipam.clone(), then_for(i));
        async move {
            let ip = ipam
                .assign_in_subnet_then(
                    subnet,
                    "node1",
                    &format!("vnic-{i}"),
                    None,
                    BTreeMap::new(),
                    Some(&then),
                )
                .await
                .unwrap();
            (ip, then.written())
        }
    }))
    .await;
    let mut seen = std::collections::BTreeSet::from([ip0]);
    for (i, (ip, written)) in burst.iter().enumerate() {
        assert!(written, "vnic-{}: written separately", i + 1);
        assert!(seen.insert(*ip), "{ip} twice");
        let kv = store.get(&endpoint(i + 1)).await.unwrap().expect("written");
        assert_eq!(String::from_utf8_lossy(&kv.value), ip.to_string());
    }
    let kv = store.get(&endpoint(0)).await.unwrap().unwrap();
    assert_eq!(String::from_utf8_lossy(&kv.value), ip0.to_string());
    let burst_txns = ipam.stats().transactions.load(Relaxed) - before;
    assert!(
        burst_txns < 30,
        "30 allocations shared their transactions: {burst_txns}"
    );
    // A chosen address: assigned, and the writes left to the caller.
    let chosen = then_for(99);
    let wanted: std::net::Ipv4Addr = "172.16.6.200".parse().unwrap();
    let ip = ipam
        .assign_in_subnet_then(
            subnet,
            "node1",
            "vnic-99",
            Some(wanted),
            BTreeMap::new(),
            Some(&chosen),
        )
        .await
        .unwrap();
    assert_eq!(ip, wanted);
    assert!(!chosen.written());
    assert!(store.get(&endpoint(99)).await.unwrap().is_none());
    // Blocks and handles agree (the check calls every address leaked: no workload endpoint
    // of Calico's names them here).
    let report = ipam.check().await.unwrap();
    assert_eq!((report.handles, report.allocated), (33, 35), "{report:?}");
    assert!(
        report
            .findings
            .iter()
            .all(|f| matches!(f, Finding::LeakedAddress { .. })),
        "{report:?}"
    );
}
