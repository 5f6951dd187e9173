//! The lab benchmark (root; builds real labs with `tenet lab` and the release agents):
//! `cargo build --release --workspace && cargo bench --bench lab`.
//!
//! Prints two tables, every row measured in this run:
//! * instance start → DHCP lease → ping of the gateway, over 100 workloads at concurrency 1
//!   and 10 (the test is the controller: START through tenet-scheduler to a real tenet-cn,
//!   TenantAdded to a real tenet-cnci, busybox udhcpc inside the workload). Baseline: the
//!   same DHCP exchange and ping on a workload that is already started (the dataplane alone).
//! * `tenet lab` ready time (build + every check) for 2, 4 and 8 compute hosts; baseline: 2.
//!
//! `TENET_BENCH_WORKLOADS` changes the 100.

#[path = "../tests/common/lab.rs"]
#[allow(dead_code)]
mod lab;

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lab::{RunningLab, dhcp, in_netns, start_payload, str_of};
use serde_json::Value;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e3)
}

async fn controller(facts: &Value) -> ssntp::Client {
    let identity = ssntp::Identity::load(&ssntp::TlsFiles {
        cert: str_of(&facts["pki"], "controller_cert").into(),
        ca: str_of(&facts["pki"], "ca").into(),
    })
    .unwrap();
    let mut config = ssntp::ClientConfig::new(
        vec![str_of(&facts["scheduler"], "address").to_string()],
        identity,
        ssntp::Uuid::new_v4(),
    );
    config.role = Some(ssntp::Role::CONTROLLER);
    let (client, mut events) = ssntp::Client::start(config).unwrap();
    while let Some(e) = events.recv().await {
        if matches!(e, ssntp::ClientEvent::Connected(_)) {
            break;
        }
    }
    // Keep draining events so the client never blocks on a full channel; failures are
    // shown, since a failed START is a failed row.
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            if let ssntp::ClientEvent::Frame(f) = e
                && f.operation() == Some(ssntp::Operation::Error(ssntp::ErrorCode::StartFailure))
            {
                use ssntp::payload::{Payload, StartFailure};
                if let Ok(p) = StartFailure::from_yaml(&f.payload) {
                    eprintln!(
                        "START of {} failed: {:?}: {}",
                        p.instance_uuid, p.reason, p.detail
                    );
                }
            }
        }
    });
    client
}

/// Until the workload has a lease and its gateway answers. The DHCP client starts once the
/// compute node has finished the VNIC (its default route is there): a client that flushed
/// the interface while the node configured it would fail the START.
fn lease_and_ping(dir: &Path, ns: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let route = in_netns(ns, &["ip", "-4", "route", "show", "default"]);
        if route.stdout.is_empty() {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        if dhcp(dir, ns, 3).is_some() {
            return in_netns(ns, &["ping", "-c", "1", "-W", "1", "172.16.0.1"])
                .status
                .success();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

struct Run {
    what: String,
    latencies: Vec<Duration>,
    failed: usize,
    wall: Duration,
}

fn starts(
    rt: &tokio::runtime::Runtime,
    client: &ssntp::Client,
    facts: &Value,
    dir: &Path,
    n: usize,
    concurrency: usize,
) -> (Run, Vec<tenet::testbed::Netns>) {
    let namespaces: Vec<tenet::testbed::Netns> = (0..n)
        .map(|_| tenet::testbed::Netns::create("bench").unwrap())
        .collect();
    let latencies = Mutex::new(Vec::new());
    let failed = Mutex::new(0usize);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let began = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..concurrency {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let ns = &namespaces[i];
                    let tenant = if i.is_multiple_of(2) {
                        "acme"
                    } else {
                        "globex"
                    };
                    let instance = format!("bench-c{concurrency}-{i}");
                    let t0 = Instant::now();
                    rt.block_on(client.send_command(
                        ssntp::Command::Start,
                        start_payload(facts, tenant, &instance, &ns.path()),
                    ))
                    .unwrap();
                    if lease_and_ping(dir, ns.name()) {
                        latencies.lock().unwrap().push(t0.elapsed());
                    } else {
                        *failed.lock().unwrap() += 1;
                    }
                }
            });
        }
    });
    let mut latencies = latencies.into_inner().unwrap();
    latencies.sort();
    (
        Run {
            what: format!("concurrency {concurrency}: START → lease → gateway ping"),
            latencies,
            failed: failed.into_inner().unwrap(),
            wall: began.elapsed(),
        },
        namespaces,
    )
}

/// The same DHCP exchange and ping on workloads that are already started.
fn baseline(dir: &Path, namespaces: &[tenet::testbed::Netns]) -> Run {
    let began = Instant::now();
    let mut latencies = Vec::new();
    let mut failed = 0;
    for ns in namespaces {
        let t0 = Instant::now();
        if lease_and_ping(dir, ns.name()) {
            latencies.push(t0.elapsed());
        } else {
            failed += 1;
        }
    }
    latencies.sort();
    Run {
        what: "baseline: lease → gateway ping on a started workload".into(),
        latencies,
        failed,
        wall: began.elapsed(),
    }
}

fn main() {
    let n: usize = std::env::var("TENET_BENCH_WORKLOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let tenet = Path::new(env!("CARGO_BIN_EXE_tenet"));
    for agent in ["tenet-cn", "tenet-cnci", "tenet-scheduler"] {
        let path = tenet.with_file_name(agent);
        assert!(
            path.exists(),
            "{} is missing: the lab runs the agents built next to {}; run \
             `cargo build --release --workspace` first",
            path.display(),
            tenet.display()
        );
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();

    // Lab build times first (each lab alone on the machine).
    let mut builds = Vec::new();
    for cns in [2, 4, 8] {
        let file = dir.path().join(format!("build-{cns}.json"));
        let t0 = Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenet"))
            .args([
                "lab",
                "--duration",
                "0",
                "--cns",
                &cns.to_string(),
                "--output",
            ])
            .arg(&file)
            .output()
            .unwrap();
        let wall = t0.elapsed();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let facts: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        builds.push((
            cns,
            facts["ready_seconds"].as_f64().unwrap(),
            facts["checks"].as_array().unwrap().len(),
            wall,
        ));
    }

    let file = dir.path().join("lab.json");
    let mut running = RunningLab::start(
        dir.path(),
        &["--duration", "3600", "--output", file.to_str().unwrap()],
    );
    let facts = running.facts(&file);
    let client = rt.block_on(controller(&facts));
    let (c1, ns1) = starts(&rt, &client, &facts, dir.path(), n, 1);
    let (c10, ns10) = starts(&rt, &client, &facts, dir.path(), n, 10);
    let base = baseline(dir.path(), &ns1);
    running.terminate();
    drop((ns1, ns10));

    println!(
        "\n{} workloads per run; 2 compute hosts, 2 tenants, {} tunnels",
        n,
        str_of(&facts, "tunnel")
    );
    println!(
        "| run | ok | failed | p50 ms | p99 ms | starts/s | p50 vs baseline |\n|---|---|---|---|---|---|---|"
    );
    let base_p50 = percentile(&base.latencies, 0.5).as_secs_f64().max(1e-9);
    for r in [&c1, &c10, &base] {
        let p50 = percentile(&r.latencies, 0.5);
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.2}× |",
            r.what,
            r.latencies.len(),
            r.failed,
            ms(p50),
            ms(percentile(&r.latencies, 0.99)),
            r.latencies.len() as f64 / r.wall.as_secs_f64(),
            p50.as_secs_f64() / base_p50
        );
    }
    println!(
        "\n| tenet lab --duration 0 | checks | ready s | whole run s (incl. teardown) | vs 2 hosts |\n|---|---|---|---|---|"
    );
    let base_ready = builds[0].1;
    for (cns, ready, checks, wall) in &builds {
        println!(
            "| --cns {cns} | {checks} | {ready:.1} | {:.1} | {:.2}× |",
            wall.as_secs_f64(),
            ready / base_ready
        );
    }
}
