//! Compute-node churn benchmark: `cargo bench -p tenet-cn --bench vnics`.
//!
//! Creates then destroys 1000 container VNICs spread over 20 tenant subnets (each subnet a
//! bridge and a user-space GRE tunnel) at parallelism 1 and 8, each run in a fresh host
//! namespace of a lab fabric, and measures in the same run `ip -batch` making the same links:
//! 20 bridges and 1000 veth pairs with MTU, container-side MAC, bridge port and up, and the
//! same again with the aliases tenet writes. Prints one table.
//!
//! `TENET_BENCH_VNICS` changes the count (default 1000).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tenet::net::tunnel::BackendChoice;
use tenet::testbed::{Fabric, Host, Netns};
use tenet_cn::{CnConfig, ComputeNode, VnicConfig};

const SUBNETS: usize = 20;

struct Row {
    what: String,
    count: usize,
    total: Duration,
    /// Per-call latencies, when the run is made of calls.
    latencies: Vec<Duration>,
}

impl Row {
    fn rate(&self) -> f64 {
        self.count as f64 / self.total.as_secs_f64()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let count: usize = std::env::var("TENET_BENCH_VNICS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(run(count));
    let base = rows[0].rate();
    println!();
    println!("| run | VNICs | total | VNICs/s | p50 ms | p99 ms | rate vs `ip -batch` links |");
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        let (p50, p99) = if r.latencies.is_empty() {
            ("–".to_string(), "–".to_string())
        } else {
            let mut l = r.latencies.clone();
            l.sort();
            let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3);
            (ms(percentile(&l, 0.5)), ms(percentile(&l, 0.99)))
        };
        // Only creations are compared with `ip -batch` creating links.
        let ratio = if r.what.contains("destroy") {
            "–".to_string()
        } else {
            format!("{:.2}×", r.rate() / base)
        };
        println!(
            "| {} | {} | {:.0} ms | {:.0} | {p50} | {p99} | {ratio} |",
            r.what,
            r.count,
            r.total.as_secs_f64() * 1e3,
            r.rate(),
        );
    }
}

async fn compute_node(host: &Host, parallel: usize) -> Arc<ComputeNode> {
    let mut config = CnConfig::new("cn-bench");
    config.netns = Some(host.path());
    config.tunnel = BackendChoice::Userspace;
    config.max_parallel = parallel;
    Arc::new(ComputeNode::init(config).await.unwrap())
}

async fn run(count: usize) -> Vec<Row> {
    let fabric = Fabric::new().await.unwrap();
    let conc_ip: Ipv4Addr = "10.254.0.200".parse().unwrap();
    let configs = common::fleet(count, SUBNETS, conc_ip, 0);
    let mut rows = vec![
        ip_batch(&configs, false, "`ip -batch`: bridges + veths (baseline)"),
        ip_batch(&configs, true, "`ip -batch`: same + aliases"),
    ];
    for parallel in [1, 8] {
        let host = fabric.add_host(&format!("bv{parallel}")).await.unwrap();
        let cn = compute_node(&host, parallel).await;

        let t = Instant::now();
        let latencies: Vec<Duration> = futures::stream::iter(configs.iter().cloned().map(|c| {
            let cn = cn.clone();
            async move {
                let t = Instant::now();
                cn.create_vnic(&c, None).await.unwrap();
                t.elapsed()
            }
        }))
        .buffer_unordered(parallel)
        .collect()
        .await;
        rows.push(Row {
            what: format!("tenet-cn create_vnic, parallelism {parallel}"),
            count,
            total: t.elapsed(),
            latencies,
        });

        // Every VNIC in one call: the kernel deletes them as one link group.
        let t = Instant::now();
        let gone = cn.destroy_vnics(&configs, None).await.unwrap();
        let total = t.elapsed();
        assert_eq!(
            gone.iter().filter(|d| d.tunnel.is_some()).count(),
            SUBNETS,
            "a TunnelDel per subnet"
        );
        rows.push(Row {
            what: format!("tenet-cn destroy_vnics (one batch), after parallelism {parallel}"),
            count,
            total,
            latencies: vec![total],
        });
    }

    // Why destroys are batched: one destroy_vnic per VNIC, on a sample.
    let sample = count.min(100);
    let host = fabric.add_host("bvone").await.unwrap();
    let cn = compute_node(&host, 1).await;
    for c in &configs[..sample] {
        cn.create_vnic(c, None).await.unwrap();
    }
    let t = Instant::now();
    let mut latencies = Vec::new();
    for c in &configs[..sample] {
        let t = Instant::now();
        cn.destroy_vnic(c, None).await.unwrap();
        latencies.push(t.elapsed());
    }
    rows.push(Row {
        what: "tenet-cn destroy_vnic one by one (sample)".into(),
        count: sample,
        total: t.elapsed(),
        latencies,
    });
    rows
}

/// `ip -batch` making the fleet's links in a fresh namespace: the subnet bridges, then each
/// veth with MTU, container-side MTU and MAC, bridge port and up (one request each), and
/// with `aliases` a `link set alias` per link as tenet writes them.
fn ip_batch(configs: &[VnicConfig], aliases: bool, what: &str) -> Row {
    let ns = Netns::create("bvip").unwrap();
    let mut script = String::new();
    for k in 1..=SUBNETS {
        script.push_str(&format!("link add br{k} mtu 1458 up type bridge\n"));
        if aliases {
            script.push_str(&format!(
                "link set br{k} alias \"tenet:v1:cn-bridge tenant=t{k} subnet_id=10.{k}.0.0/24 \
                 subnet=10.{k}.0.0/24 conc=conc conc_ip=10.254.0.200\"\n"
            ));
        }
    }
    for (i, c) in configs.iter().enumerate() {
        let k = i % SUBNETS + 1;
        script.push_str(&format!(
            "link add v{i} mtu 1458 master br{k} up type veth peer name p{i} mtu 1458 address {}\n",
            c.mac.expect("containers have a MAC")
        ));
        if aliases {
            script.push_str(&format!(
                "link set v{i} alias \"tenet:v1:cn-vnic id={} role=container instance={}\"\n",
                c.vnic_id, c.instance_id
            ));
        }
    }
    let total = ns.time_ip_batch(&script).unwrap();
    Row {
        what: what.into(),
        count: configs.len(),
        total,
        latencies: Vec::new(),
    }
}
