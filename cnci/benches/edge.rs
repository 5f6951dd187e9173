//! Concentrator edge benchmark: `cargo bench -p tenet-cnci --bench edge` (root; real
//! iptables, etcd, iperf3 in lab namespaces).
//!
//! 1. Installing 65,536 port forwards (a /16 tenant subnet; 32,768 TCP + 32,768 UDP ports):
//!    tenet's one batch (with the desired state written to etcd) against ciao's way, one
//!    `iptables -C` and one `iptables -A` exec per rule, measured on a sample of 500 and
//!    extrapolated linearly (which flatters ciao: its execs get slower as the chain grows).
//! 2. One floating-IP assign and one release, p50/p99 over 200 each, with the 65,536
//!    forwards installed; as nftables map elements (the default with iptables-nft) and, as
//!    the baseline, as iptables rules on a second concentrator.
//! 3. TCP throughput from the external host to a workload through the concentrator (GRE +
//!    bridge + DNAT to a floating IP), next to the same path without NAT (routed to the
//!    private address).
//!
//! `TENET_BENCH_FORWARDS`, `TENET_BENCH_FLOATING` and `TENET_BENCH_SECONDS` change the
//! counts (defaults 65536, 200, 5).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ipnetwork::Ipv4Network;
use tenet::keyspace::cnci::{PortForward, Protocol};
use tenet::net::tunnel::BackendChoice;
use tenet::store::Datastore;
use tenet::testbed::{EtcdServer, Fabric, Netns};
use tenet::types::TunnelKey;
use tenet_cnci::RemoteSubnet;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

/// TCP throughput in Gbit/s from `client` to `server_ip` (iperf3 server in `server`).
fn iperf(client: &Netns, server: &Netns, server_ip: &str, bind: &str, seconds: usize) -> f64 {
    let mut srv = server
        .command("iperf3")
        .args(["-s", "-1", "-B", bind])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3");
    std::thread::sleep(Duration::from_millis(300));
    let out = client
        .command("iperf3")
        .args(["-c", server_ip, "-J", "-t", &seconds.to_string()])
        .output()
        .unwrap();
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9
}

/// Assigns and releases `n` floating IPs; returns the sorted latencies of each.
async fn floating_ips(conc: &tenet_cnci::Concentrator, n: usize) -> (Vec<Duration>, Vec<Duration>) {
    let (mut assign, mut release) = (Vec::new(), Vec::new());
    for i in 0..n {
        let public = Ipv4Addr::new(192, 0, 2, 100 + (i % 100) as u8);
        let t = Instant::now();
        conc.assign_floating_ip(public, "172.16.0.5".parse().unwrap())
            .await
            .unwrap();
        assign.push(t.elapsed());
        let t = Instant::now();
        conc.release_floating_ip(public).await.unwrap();
        release.push(t.elapsed());
    }
    assign.sort();
    release.sort();
    (assign, release)
}

async fn run() {
    let forwards = env_count("TENET_BENCH_FORWARDS", 65536);
    let floating = env_count("TENET_BENCH_FLOATING", 200);
    let seconds = env_count("TENET_BENCH_SECONDS", 5);
    let etcd = EtcdServer::start().await.unwrap();
    let store: Arc<dyn Datastore> = Arc::new(etcd.store().await.unwrap());
    let fabric = Fabric::new().await.unwrap();
    let cn_host = fabric.add_host("cn").await.unwrap();
    let conc_host = fabric.add_host("conc").await.unwrap();
    let inet = internet(&conc_host);
    let run = tempfile::tempdir().unwrap();
    let mut config = cnci_config(&conc_host, "c1", "t1", run.path());
    config.compute_nets = vec!["10.254.0.0/16".parse().unwrap()];
    let conc = conc_on(config, &store).await;

    // A /16 tenant subnet (from a compute node that need not exist) for the forwards.
    let wide: Ipv4Network = "10.20.0.0/16".parse().unwrap();
    conc.attach_remote_subnet(&RemoteSubnet {
        tenant: "t1".into(),
        subnet: wide,
        subnet_key: TunnelKey::from_subnet(&wide).unwrap().get(),
        cn_id: "cn-x".into(),
        cn_ip: Ipv4Addr::new(10, 254, 0, 200),
    })
    .await
    .unwrap();
    // A workload and its floating IPs, first without the forwards.
    let cn = cn_on(&cn_host, "cn-1", BackendChoice::Userspace).await;
    let w = workload(
        &cn,
        &cn_host,
        "v1",
        "t1",
        ("c1", conc_host.ip()),
        "02:00:00:00:00:05",
    )
    .await;
    let rev = put_endpoint(
        &store,
        "cn-1",
        "v1",
        "t1",
        w.mac,
        "172.16.0.5".parse().unwrap(),
    )
    .await;
    conc.attach_remote_subnet(&remote(w.vnic.tunnel.as_ref().unwrap()))
        .await
        .unwrap();
    synced(&conc, rev).await;
    DhcpClient::new().lease(&w.ns, 3).expect("a lease");
    let (assign0, release0) = floating_ips(&conc, floating).await;

    // The baseline: floating IPs as iptables rules, on a concentrator of its own.
    let rules_host = fabric.add_host("conc2").await.unwrap();
    let _rules_inet = internet(&rules_host);
    let rules_run = tempfile::tempdir().unwrap();
    let mut config = cnci_config(&rules_host, "c2", "t1", rules_run.path());
    config.compute_nets = vec!["10.254.0.0/16".parse().unwrap()];
    config.nft_floating = false;
    let rules_conc = conc_on(config, &store).await;
    rules_conc
        .attach_remote_subnet(&RemoteSubnet {
            tenant: "t1".into(),
            subnet: subnet(),
            subnet_key: TunnelKey::from_subnet(&subnet()).unwrap().get(),
            cn_id: "cn-x".into(),
            cn_ip: Ipv4Addr::new(10, 254, 0, 200),
        })
        .await
        .unwrap();
    let (assign_rules, release_rules) = floating_ips(&rules_conc, floating).await;
    rules_conc.reset().await.unwrap();

    let list: Vec<PortForward> = (0..forwards)
        .map(|i| PortForward {
            protocol: if i % 2 == 0 {
                Protocol::Tcp
            } else {
                Protocol::Udp
            },
            external_port: 1 + (i / 2) as u16,
            internal_ip: Ipv4Addr::from(u32::from(wide.network()) + 2 + i as u32 % 65000),
            internal_port: 22,
        })
        .collect();
    let t = Instant::now();
    let added = conc.add_port_forwards(&list).await.unwrap();
    let tenet_total = t.elapsed();
    assert_eq!(added, forwards);

    // ciao's way, on a sample, in a namespace of its own.
    let sample = 500.min(forwards);
    let ciao_ns = Netns::create("ciaofw").unwrap();
    let t = Instant::now();
    for f in list.iter().take(sample) {
        let rule = [
            "-t".to_string(),
            "nat".into(),
            "PREROUTING".into(),
            "-i".into(),
            "up0".into(),
            "-p".into(),
            f.protocol.to_string(),
            "--dport".into(),
            f.external_port.to_string(),
            "-j".into(),
            "DNAT".into(),
            "--to".into(),
            format!("{}:{}", f.internal_ip, f.internal_port),
        ];
        let mut check: Vec<String> = rule.to_vec();
        check.insert(2, "-C".into());
        let exists = ciao_ns
            .command("iptables")
            .args(&check)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        if !exists {
            let mut add: Vec<String> = rule.to_vec();
            add.insert(2, "-A".into());
            assert!(
                ciao_ns
                    .command("iptables")
                    .args(&add)
                    .status()
                    .unwrap()
                    .success()
            );
        }
    }
    let ciao_sample = t.elapsed();
    let ciao_per_rule = ciao_sample / sample as u32;
    let ciao_total = ciao_per_rule * forwards as u32;

    // Floating IPs again, with the forwards installed.
    let (assign, release) = floating_ips(&conc, floating).await;

    // Throughput: DNAT through a floating IP, and the same path routed without NAT.
    conc.assign_floating_ip("192.0.2.60".parse().unwrap(), "172.16.0.5".parse().unwrap())
        .await
        .unwrap();
    let nat = iperf(&inet, &w.ns, "192.0.2.60", "172.16.0.5", seconds);
    inet.run(&["ip", "route", "add", "172.16.0.0/24", "via", "192.0.2.2"])
        .unwrap();
    // The same path without the NAT: let the routed flow past tenet's chain.
    conc_host
        .run(&[
            "iptables",
            "-I",
            "FORWARD",
            "1",
            "-d",
            "172.16.0.5",
            "-j",
            "ACCEPT",
        ])
        .unwrap();
    conc_host
        .run(&[
            "iptables",
            "-I",
            "FORWARD",
            "1",
            "-s",
            "172.16.0.5",
            "-j",
            "ACCEPT",
        ])
        .unwrap();
    let routed = iperf(&inet, &w.ns, "172.16.0.5", "172.16.0.5", seconds);

    println!();
    println!("| run | count | total | per rule / call | ratio |");
    println!("|---|---|---|---|---|");
    println!(
        "| tenet: {forwards} port forwards, one iptables-restore batch (+ etcd) | {forwards} | {:.2} s | {:.1} µs | {:.0}× faster |",
        tenet_total.as_secs_f64(),
        tenet_total.as_secs_f64() * 1e6 / forwards as f64,
        ciao_total.as_secs_f64() / tenet_total.as_secs_f64()
    );
    println!(
        "| ciao: iptables -C + -A per rule, {sample} measured ({:.2} s), extrapolated | {forwards} | {:.0} s | {:.2} ms | 1× |",
        ciao_sample.as_secs_f64(),
        ciao_total.as_secs_f64(),
        ciao_per_rule.as_secs_f64() * 1e3
    );
    println!();
    println!("| floating IP | calls | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    for (what, lat) in [
        (
            "baseline: assign as iptables rules (address, DNAT+SNAT rules, gratuitous ARP, etcd)",
            &assign_rules,
        ),
        (
            "baseline: release as iptables rules (rules, address, conntrack flush, etcd)",
            &release_rules,
        ),
        (
            "assign (address, nftables map elements, gratuitous ARP, etcd)",
            &assign0,
        ),
        (
            "release (map elements, address, conntrack flush, etcd)",
            &release0,
        ),
        ("assign, with the port forwards installed", &assign),
        ("release, with the port forwards installed", &release),
    ] {
        println!(
            "| {what} | {} | {} | {} | {} |",
            lat.len(),
            ms(percentile(lat, 0.5)),
            ms(percentile(lat, 0.99)),
            ms(*lat.last().unwrap())
        );
    }
    println!();
    println!("| TCP external host → workload (iperf3, {seconds} s) | Gbit/s | vs routed |");
    println!("|---|---|---|");
    println!("| routed, no NAT (GRE + bridge) | {routed:.2} | 1.00× |");
    println!(
        "| floating IP, DNAT (GRE + bridge + NAT) | {nat:.2} | {:.2}× |",
        nat / routed
    );
    println!();
    conc.reset().await.unwrap();
}
