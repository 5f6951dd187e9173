//! CNI benchmark (root; builds a real lab with `tenet lab` and the release agents):
//! `cargo build --release --workspace && cargo bench --bench cni`.
//!
//! One table, every row measured in this run: ADD and DEL latency, p50/p99 over 100
//! containers (one at a time, each in its own network namespace) through CNI's reference
//! client `cnitool`, for tenet-cni on a tenant network (tenet's IPAM in etcd, the Calico
//! endpoint, the VNIC, the tunnel through tenet-cn's local API) next to Debian's own
//! reference plugins `bridge` + `host-local` driven the same way (the baseline). Both run
//! `cnitool` inside a host namespace of their own, so the bridge plugin's bridge is made
//! there and not on the machine.
//!
//! `TENET_BENCH_CONTAINERS` changes the 100.

#[path = "../tests/common/lab.rs"]
#[allow(dead_code)]
mod lab;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lab::{RunningLab, concentrator, str_of};
use serde_json::{Value, json};
use tenet::testbed::Netns;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// One cnitool run inside `host`, timed; panics on failure (a failed row is no row).
fn cnitool(host: &Netns, nets: &Path, cni_path: &str, op: &str, net: &str, ns: &Netns) -> Duration {
    let t0 = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", host.name(), "cnitool", op, net])
        .arg(ns.path())
        .env("NETCONFPATH", nets)
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = t0.elapsed();
    assert!(
        out.status.success(),
        "cnitool {op} {net}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

struct Row {
    plugin: &'static str,
    add: Vec<Duration>,
    del: Vec<Duration>,
}

fn run(
    plugin: &'static str,
    host: &Netns,
    nets: &Path,
    cni_path: &str,
    net: &str,
    n: usize,
) -> Row {
    let containers: Vec<Netns> = (0..n).map(|_| Netns::create("bcni").unwrap()).collect();
    let mut add: Vec<Duration> = containers
        .iter()
        .map(|c| cnitool(host, nets, cni_path, "add", net, c))
        .collect();
    let mut del: Vec<Duration> = containers
        .iter()
        .map(|c| cnitool(host, nets, cni_path, "del", net, c))
        .collect();
    add.sort();
    del.sort();
    Row { plugin, add, del }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: usize = std::env::var("TENET_BENCH_CONTAINERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lab.json");
    let mut running = RunningLab::start(
        dir.path(),
        &[
            "--cns",
            "1",
            "--workloads",
            "1",
            "--duration",
            "1800",
            "--output",
            file.to_str().unwrap(),
        ],
    );
    let facts: Value = running.facts(&file);
    assert_eq!(facts["passed"], true, "{}", running.printed());
    let acme = concentrator(&facts, "acme");
    let bin_dir: PathBuf = Path::new(env!("CARGO_BIN_EXE_tenet"))
        .parent()
        .unwrap()
        .into();
    let cni_path = format!("{}:/usr/lib/cni", bin_dir.display());
    let nets = dir.path().join("net.d");
    std::fs::create_dir_all(&nets).unwrap();
    let lists = [
        (
            "tenet",
            json!({"type": "tenet-cni", "tenant": "acme", "subnet": "172.16.64.0/18",
                "concentrator": str_of(acme, "uuid"),
                "socket": str_of(&facts["compute_hosts"][0], "api_socket")}),
        ),
        (
            "bridge",
            json!({"type": "bridge", "bridge": "cnibr0", "ipam": {"type": "host-local",
                "subnet": "10.99.0.0/16", "dataDir": dir.path().join("host-local")}}),
        ),
    ];
    for (name, plugin) in &lists {
        let list = json!({"cniVersion": "1.0.0", "name": name, "plugins": [plugin]});
        std::fs::write(nets.join(format!("{name}.conflist")), list.to_string()).unwrap();
    }
    let host = Netns::create("bcnh").unwrap();
    // Warm both paths once (page cache, the tenant subnet's bridge and tunnel).
    for (name, _) in &lists {
        let c = Netns::create("bcni").unwrap();
        cnitool(&host, &nets, &cni_path, "add", name, &c);
        cnitool(&host, &nets, &cni_path, "del", name, &c);
    }
    let rows = [
        run(
            "bridge + host-local (baseline)",
            &host,
            &nets,
            &cni_path,
            "bridge",
            n,
        ),
        run("tenet-cni", &host, &nets, &cni_path, "tenet", n),
    ];
    println!("\nCNI ADD and DEL through cnitool, {n} containers one at a time (ms)");
    println!(
        "{:<32} {:>9} {:>9} {:>9} {:>9}",
        "plugin", "ADD p50", "ADD p99", "DEL p50", "DEL p99"
    );
    for r in &rows {
        println!(
            "{:<32} {:>9} {:>9} {:>9} {:>9}",
            r.plugin,
            ms(percentile(&r.add, 0.5)),
            ms(percentile(&r.add, 0.99)),
            ms(percentile(&r.del, 0.5)),
            ms(percentile(&r.del, 0.99))
        );
    }
    let (base, tenet) = (&rows[0], &rows[1]);
    println!(
        "tenet-cni / baseline, p50: ADD {:.2}×, DEL {:.2}×",
        percentile(&tenet.add, 0.5).as_secs_f64() / percentile(&base.add, 0.5).as_secs_f64(),
        percentile(&tenet.del, 0.5).as_secs_f64() / percentile(&base.del, 0.5).as_secs_f64()
    );
    let status = running.terminate();
    assert!(status.success(), "{status}\n{}", running.printed());
}
