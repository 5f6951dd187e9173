//! Concentrator benchmark: `cargo bench -p tenet-cnci --bench attach` (root; real etcd,
//! dnsmasq and udhcpc in lab namespaces).
//!
//! 1. Attach 100 subnets × 4 compute nodes (400 user-space GRE tunnels, 100 dnsmasq): total
//!    time and per-attach p50/p99, first attaches of a subnet (bridge + dnsmasq) apart from
//!    the rest (a tunnel).
//! 2. Endpoint → lease over 100 hosts: a workload endpoint is written to etcd, the
//!    concentrator applies it to dnsmasq's hosts, and the workload's DHCP client (behind a
//!    compute node and a tunnel) gets its lease. Next to it, the floor: the same client's
//!    DHCP exchange with a dnsmasq on a plain veth, every host bound in advance, no tenet.
//!
//! `TENET_BENCH_SUBNETS` and `TENET_BENCH_HOSTS` change the counts (defaults 100 and 100).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ipnetwork::Ipv4Network;
use tenet::net::tunnel::BackendChoice;
use tenet::process::{Daemon, DaemonSpec, Readiness};
use tenet::store::Datastore;
use tenet::testbed::{EtcdServer, Fabric, Netns};
use tenet::types::TunnelKey;
use tenet_cnci::RemoteSubnet;

const CNS: u8 = 4;

fn row(what: &str, mut lat: Vec<Duration>, total: Option<Duration>) {
    lat.sort();
    let total = total.map_or("–".to_string(), |t| format!("{:.2} s", t.as_secs_f64()));
    println!(
        "| {what} | {} | {total} | {} | {} | {} |",
        lat.len(),
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        ms(*lat.last().unwrap_or(&Duration::ZERO)),
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

fn mac_of(i: usize) -> String {
    format!("02:00:00:00:{:02x}:{:02x}", 2 + i / 256, i % 256)
}

fn ip_of(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 16, 0, 2 + (i % 250) as u8)
}

async fn run() {
    let subnets = env_count("TENET_BENCH_SUBNETS", 100);
    let hosts = env_count("TENET_BENCH_HOSTS", 100);
    let etcd = EtcdServer::start().await.unwrap();
    let store: Arc<dyn Datastore> = Arc::new(etcd.store().await.unwrap());
    let fabric = Fabric::new().await.unwrap();
    println!();
    println!("| run | count | total | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");

    // 1. Attach.
    {
        let host = fabric.add_host("cnbench").await.unwrap();
        let run = tempfile::tempdir().unwrap();
        let conc = conc_on(cnci_config(&host, "c1", "t1", run.path()), &store).await;
        let (mut first, mut later) = (Vec::new(), Vec::new());
        let started = Instant::now();
        for k in 0..subnets {
            let subnet: Ipv4Network = format!("10.{}.{}.0/24", 1 + k / 250, k % 250)
                .parse()
                .unwrap();
            for j in 0..CNS {
                let req = RemoteSubnet {
                    tenant: "t1".into(),
                    subnet,
                    subnet_key: TunnelKey::from_subnet(&subnet).unwrap().get(),
                    cn_id: format!("cn-{j}"),
                    cn_ip: Ipv4Addr::new(10, 254, 0, 100 + j),
                };
                let t = Instant::now();
                let a = conc.attach_remote_subnet(&req).await.unwrap();
                if a.new_subnet { &mut first } else { &mut later }.push(t.elapsed());
            }
        }
        let total = started.elapsed();
        let all: Vec<Duration> = first.iter().chain(&later).copied().collect();
        row(
            &format!("attach {subnets} subnets × {CNS} CNs: every attach"),
            all,
            Some(total),
        );
        row(
            "… first attach of a subnet (bridge, gateway, dnsmasq, tunnel)",
            first,
            None,
        );
        row("… later attaches (a tunnel)", later, None);
        let t = Instant::now();
        conc.reset().await.unwrap();
        println!(
            "| reset: {} links and {subnets} dnsmasq removed | – | {:.2} s | – | – | – |",
            subnets * (1 + usize::from(CNS)),
            t.elapsed().as_secs_f64()
        );
    }

    // 2. Endpoint → lease, through a compute node and a tunnel.
    let dhcp = DhcpClient::new();
    {
        let cn_host = fabric.add_host("cn").await.unwrap();
        let conc_host = fabric.add_host("conc").await.unwrap();
        let run = tempfile::tempdir().unwrap();
        let conc = conc_on(cnci_config(&conc_host, "c2", "t1", run.path()), &store).await;
        let cn = cn_on(&cn_host, "cn-bench", BackendChoice::Userspace).await;
        let w = workload(
            &cn,
            &cn_host,
            "v0",
            "t1",
            ("c2", conc_host.ip()),
            "02:00:00:00:01:00",
        )
        .await;
        conc.attach_remote_subnet(&remote(w.vnic.tunnel.as_ref().unwrap()))
            .await
            .unwrap();
        let (mut to_hosts, mut to_lease) = (Vec::new(), Vec::new());
        for i in 0..hosts {
            // One namespace, a new MAC per host: each is a new workload to dnsmasq.
            let mac = mac_of(i);
            w.ns.run(&["ip", "link", "set", "eth0", "address", &mac])
                .unwrap();
            let t = Instant::now();
            let rev = put_endpoint(
                &store,
                "cn-bench",
                &format!("v{i}"),
                "t1",
                mac.parse().unwrap(),
                ip_of(i),
            )
            .await;
            synced(&conc, rev).await;
            to_hosts.push(t.elapsed());
            let lease = dhcp.lease(&w.ns, 3).expect("a lease");
            to_lease.push(t.elapsed());
            assert_eq!(lease.ip, ip_of(i));
        }
        row(
            &format!("endpoint in etcd → dnsmasq hosts updated ({hosts} hosts)"),
            to_hosts,
            None,
        );
        row(
            &format!("endpoint in etcd → lease over the tunnel ({hosts} hosts)"),
            to_lease,
            None,
        );
        conc.reset().await.unwrap();
    }

    // The floor: dnsmasq on a static veth, every host bound in advance, no tenet.
    {
        let server = Netns::create("dhfloor").unwrap();
        let client = Netns::create("dhclient").unwrap();
        server
            .run(&[
                "ip",
                "link",
                "add",
                "s0",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                client.name(),
            ])
            .unwrap();
        server
            .run(&["ip", "addr", "add", "172.16.0.1/24", "dev", "s0"])
            .unwrap();
        server.run(&["ip", "link", "set", "s0", "up"]).unwrap();
        client.run(&["ip", "link", "set", "eth0", "up"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let hosts_file: String = (0..hosts)
            .map(|i| format!("{},id:*,{}\n", mac_of(i), ip_of(i)))
            .collect();
        std::fs::write(dir.path().join("hosts"), hosts_file).unwrap();
        let spec = DaemonSpec::new("dnsmasq-floor", "dnsmasq")
            .args([
                "--keep-in-foreground".to_string(),
                "--conf-file=/dev/null".into(),
                "--pid-file=".into(),
                "--port=0".into(),
                "--interface=s0".into(),
                "--bind-interfaces".into(),
                "--dhcp-range=172.16.0.0,static,255.255.255.0,3600".into(),
                "--dhcp-ignore=tag:!known".into(),
                "--dhcp-authoritative".into(),
                format!("--dhcp-hostsfile={}", dir.path().join("hosts").display()),
                format!("--dhcp-leasefile={}", dir.path().join("leases").display()),
            ])
            .netns(Some(&server.path()))
            .run_dir(dir.path())
            .readiness(Readiness::ListeningUdp(67));
        let daemon = Daemon::start(spec).await.unwrap();
        let mut exchange = Vec::new();
        for i in 0..hosts {
            client
                .run(&["ip", "link", "set", "eth0", "address", &mac_of(i)])
                .unwrap();
            let t = Instant::now();
            dhcp.lease(&client, 3)
                .expect("a lease from the floor dnsmasq");
            exchange.push(t.elapsed());
        }
        row(
            &format!("floor: udhcpc ↔ dnsmasq on a plain veth, pre-bound ({hosts} hosts)"),
            exchange,
            None,
        );
        daemon.stop().await;
    }
    println!();
}
