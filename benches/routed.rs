//! Routed-mode benchmark: `cargo bench --bench routed`.
//!
//! Two compute hosts (namespaces on one underlay, each with tenet's BGP speaker and a real
//! BIRD 2), real etcd; one table, every row measured in this run:
//! * an IPAM block claimed for host 1 → the route in host 2's kernel: p50/p99 over 50 claims
//!   (etcd watch → rendering → `bird -p` → `configure` → BGP update → host 2's kernel),
//!   next to BIRD's own convergence for a route added to host 1's kernel by hand (the floor:
//!   BIRD 2 hears of kernel routes by netlink notification as they change — its 2 s scan is
//!   only the periodic resync — then the same BGP path);
//! * TCP throughput between routed workloads on the two hosts, next to one routing hop
//!   between two namespaces (veth + plain routing, the floor) and next to GRE mode
//!   (bridged workloads over tenet's user-space GRE, this kernel having no ip_gre).
//!
//! `TENET_BENCH_SECONDS` sets the length of each iperf3 run (default 5);
//! `TENET_BENCH_CLAIMS` the number of block claims (default 50).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{gbps, iperf_tcp, net, tunnel_pair};
use ipnetwork::{IpNetwork, Ipv4Network};
use tenet::bgp::{BgpSpeaker, BirdOptions, SpeakerConfig};
use tenet::ipam::{AutoAssignArgs, Ipam};
use tenet::net::routed::{self, RoutedWorkloadSpec};
use tenet::net::tunnel::BackendChoice;
use tenet::net::{Netlink, NewLink, sysctl};
use tenet::store::Datastore;
use tenet::testbed::{EtcdServer, Fabric, Host, Netns, Workload};

const POOL: &str = "10.65.0.0/16";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let seconds = env_or("TENET_BENCH_SECONDS", 5);
    let claims = env_or("TENET_BENCH_CLAIMS", 50) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(run(seconds, claims));
    println!();
    println!("| measurement | result | compared with |");
    println!("|---|---|---|");
    for (what, value, note) in rows {
        println!("| {what} | {value} | {note} |");
    }
}

/// Waits until `host`'s main table has a route to exactly `dst`; returns when it appeared.
async fn appears(netlink: &Netlink, dst: Ipv4Network, timeout: Duration) -> Option<Instant> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        let routes = netlink.routes().await.unwrap();
        if routes
            .iter()
            .any(|r| r.destination == dst && r.table == Some(254))
        {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

async fn run(seconds: u64, claims: usize) -> Vec<(String, String, String)> {
    let etcd = EtcdServer::start().await.unwrap();
    let store: Arc<dyn Datastore> = Arc::new(etcd.store().await.unwrap());
    let ipam = Ipam::new(store.clone());
    ipam.create_pool(POOL.parse().unwrap(), false)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fabric = Fabric::new().await.unwrap();
    let router = fabric.add_host("brtr").await.unwrap();
    let mut hosts: Vec<Host> = Vec::new();
    let mut speakers = Vec::new();
    for name in ["brt1", "brt2"] {
        let host = fabric.add_host(name).await.unwrap();
        sysctl::write_all(Some(&host.path()), &routed::host_sysctls()).unwrap();
        host.run(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &router.ip().to_string(),
        ])
        .unwrap();
        let mut config = SpeakerConfig::new(name, host.ip(), dir.path().join(name));
        config.netns = Some(host.path());
        config.options = BirdOptions {
            graceful_restart: None,
            ..BirdOptions::default()
        };
        speakers.push(BgpSpeaker::start(store.clone(), config).await.unwrap());
        hosts.push(host);
    }
    // Sessions up: a first block travels.
    let first: IpNetwork = "10.65.1.0/26".parse().unwrap();
    ipam.claim_affinity(first, "brt1").await.unwrap();
    let IpNetwork::V4(first4) = first else {
        unreachable!()
    };
    appears(hosts[1].netlink(), first4, Duration::from_secs(60))
        .await
        .expect("the BGP session comes up");

    eprintln!("block claims ({claims}) ...");
    let mut claim_times = Vec::new();
    for i in 0..claims {
        let block: Ipv4Network = format!("10.65.{}.0/26", 10 + i).parse().unwrap();
        let start = Instant::now();
        ipam.claim_affinity(IpNetwork::V4(block), "brt1")
            .await
            .unwrap();
        let at = appears(hosts[1].netlink(), block, Duration::from_secs(30))
            .await
            .expect("the claimed block reaches host 2");
        claim_times.push(at - start);
    }
    let floor_n = (claims / 2).max(5);
    eprintln!("hand-added routes ({floor_n}) ...");
    let mut floor_times = Vec::new();
    for i in 0..floor_n {
        let dst: Ipv4Network = format!("10.65.250.{}/32", i + 1).parse().unwrap();
        let start = Instant::now();
        hosts[0]
            .run(&[
                "ip",
                "route",
                "add",
                "blackhole",
                &dst.to_string(),
                "proto",
                "boot",
            ])
            .unwrap();
        let at = appears(hosts[1].netlink(), dst, Duration::from_secs(30))
            .await
            .expect("the hand-added route reaches host 2");
        floor_times.push(at - start);
    }

    eprintln!("throughput ...");
    // Routed workloads on the two hosts, addressed by IPAM.
    let mut routed_wls = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let (v4, _) = ipam
            .auto_assign(&AutoAssignArgs {
                num_v4: 1,
                handle: Some(format!("bw{i}")),
                host: format!("brt{}", i + 1),
                ..AutoAssignArgs::default()
            })
            .await
            .unwrap();
        let IpAddr::V4(ip) = v4[0] else {
            unreachable!()
        };
        let ns = Netns::create(&format!("brw{i}")).unwrap();
        routed::attach_workload(
            host.netlink(),
            Some(&host.path()),
            &ns.path(),
            &RoutedWorkloadSpec {
                host_ifname: format!("tvr_bw{i}"),
                workload_ifname: "eth0".into(),
                addresses: vec![IpNetwork::new(IpAddr::V4(ip), 32).unwrap()],
                mtu: None,
            },
        )
        .await
        .unwrap();
        routed_wls.push(Workload { ns, ip });
    }
    for (i, w) in routed_wls.iter().enumerate() {
        let other = &routed_wls[1 - i];
        let deadline = Instant::now() + Duration::from_secs(30);
        while !w.ping(other.ip, 1) {
            assert!(
                Instant::now() < deadline,
                "routed workloads cannot reach each other"
            );
        }
    }
    let routed_tcp = iperf_tcp(&routed_wls[0], &routed_wls[1], seconds);
    let floor_tcp = {
        let (a, b, _router) = one_hop().await;
        iperf_tcp(&a, &b, seconds)
    };
    let gre_tcp = {
        let (a, b, _backends) = tunnel_pair(
            &hosts[0],
            &hosts[1],
            BackendChoice::Userspace,
            "bg",
            "10.3.0",
        )
        .await;
        iperf_tcp(&a, &b, seconds)
    };

    for s in speakers {
        s.stop().await;
    }

    let (c50, c99) = (
        percentile(&mut claim_times, 0.5),
        percentile(&mut claim_times, 0.99),
    );
    let (f50, f99) = (
        percentile(&mut floor_times, 0.5),
        percentile(&mut floor_times, 0.99),
    );
    vec![
        (
            format!("block claim → route on the other host, p50 / p99 ({claims} claims)"),
            format!("{} / **{}**", ms(c50), ms(c99)),
            format!(
                "goal p99 < 3000 ms; {:.1}× the floor's p50",
                c50.as_secs_f64() / f50.as_secs_f64()
            ),
        ),
        (
            format!("route added by hand → other host, p50 / p99 ({floor_n} routes)"),
            format!("{} / {}", ms(f50), ms(f99)),
            "floor: BIRD learns the kernel route (netlink), then BGP".into(),
        ),
        (
            "TCP, one routing hop between two namespaces".into(),
            gbps(floor_tcp),
            "floor".into(),
        ),
        (
            "TCP, routed workloads on two hosts".into(),
            gbps(routed_tcp),
            format!("{:.0}% of the floor", 100.0 * routed_tcp / floor_tcp),
        ),
        (
            "TCP, GRE mode (user-space GRE) on two hosts".into(),
            gbps(gre_tcp),
            format!("routed is {:.1}× GRE mode", routed_tcp / gre_tcp),
        ),
    ]
}

/// Two workload namespaces joined through a router namespace by veths: plain routing, one
/// hop, nothing of tenet's.
async fn one_hop() -> (Workload, Workload, Netns) {
    let router = Netns::create("bhop").unwrap();
    sysctl::write_all(Some(&router.path()), &[("net.ipv4.ip_forward", "1")]).unwrap();
    let nl = router.netlink().unwrap();
    let mut ends = Vec::new();
    for (i, side) in ["a", "b"].into_iter().enumerate() {
        let ns = Netns::create(&format!("bhop{side}")).unwrap();
        nl.create(&NewLink::veth(
            format!("hop-{side}"),
            format!("hop-{side}p"),
        ))
        .await
        .unwrap();
        let peer = nl.index_of(&format!("hop-{side}p")).await.unwrap();
        let file = std::fs::File::open(ns.path()).unwrap();
        nl.move_to_netns(peer, std::os::fd::AsFd::as_fd(&file), Some("eth0"))
            .await
            .unwrap();
        let own = nl.index_of(&format!("hop-{side}")).await.unwrap();
        let gw = Ipv4Addr::new(10, 4, i as u8, 1);
        nl.add_address(own, IpNetwork::V4(net(&format!("{gw}/24"))))
            .await
            .unwrap();
        nl.set_up(own).await.unwrap();
        let inside = ns.netlink().unwrap();
        let eth0 = inside.index_of("eth0").await.unwrap();
        let ip = Ipv4Addr::new(10, 4, i as u8, 2);
        inside
            .add_address(eth0, IpNetwork::V4(net(&format!("{ip}/24"))))
            .await
            .unwrap();
        inside.set_up(eth0).await.unwrap();
        inside
            .add_default_route(IpAddr::V4(gw), eth0)
            .await
            .unwrap();
        ends.push(Workload { ns, ip });
    }
    let b = ends.pop().unwrap();
    let a = ends.pop().unwrap();
    assert!(a.ping(b.ip, 2), "the one-hop floor has no connectivity");
    (a, b, router)
}
