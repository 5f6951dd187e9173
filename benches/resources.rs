//! `tenet apply` of a big file: `cargo bench --bench resources` (root: starts its own etcd).
//!
//! 10,000 policies and 10,000 workload endpoints in one file, applied by the real `tenet`
//! binary (parse, validate, batched transactions), timed with the etcd write requests it
//! made (from etcd's own metrics); next to the baseline measured in the same run: the same
//! 20,000 keys and values written one `put` at a time, as a script calling etcdctl per key
//! would. `TENET_BENCH_RESOURCES` changes the 10,000.

use std::time::Instant;

use tenet::store::Datastore;
use tenet::testbed::EtcdServer;

/// etcd's count of committed raft proposals (one per write request it served), from its
/// /metrics page on the client port.
async fn proposals(endpoint: &str) -> u64 {
    use std::io::{Read, Write};
    let addr = endpoint.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).unwrap();
    page.lines()
        .find_map(|l| l.strip_prefix("etcd_server_proposals_committed_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .expect("etcd reports etcd_server_proposals_committed_total")
}

fn file(n: usize) -> String {
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: policy\nmetadata: {{name: p{i}}}\nspec:\n  order: {i}\n  selector: app == 'a{i}'\n  ingress:\n  - action: allow\n    protocol: tcp\n    source: {{selector: role == 'frontend'}}\n    destination: {{ports: [80, '8080:8090']}}\n"
        ));
    }
    for i in 0..n {
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: workloadEndpoint\nmetadata: {{name: eth0, workload: w{i}, orchestrator: k8s, node: node{}, labels: {{app: a{i}}}}}\nspec:\n  ipNetworks: [10.{}.{}.{}/32]\n  profiles: [default]\n  interfaceName: cali{i:011}\n",
            i % 50,
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        ));
    }
    text
}

fn main() {
    let n: usize = std::env::var("TENET_BENCH_RESOURCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = rt.block_on(EtcdServer::start()).unwrap();
    let ep = etcd.endpoint();
    let store = rt.block_on(etcd.store()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resources.yaml");
    std::fs::write(&path, file(n)).unwrap();

    let before = rt.block_on(proposals(&ep));
    let t0 = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenet"))
        .args(["apply", "-f"])
        .arg(&path)
        .env("ETCD_ENDPOINTS", &ep)
        .output()
        .unwrap();
    let apply = t0.elapsed();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let apply_writes = rt.block_on(proposals(&ep)) - before;

    // The baseline: the same keys and values, one put each.
    let mut kvs = rt.block_on(store.list("/calico/v1/policy/")).unwrap().kvs;
    kvs.extend(rt.block_on(store.list("/calico/v1/host/")).unwrap().kvs);
    let keys = kvs.len();
    rt.block_on(store.delete_prefix("/calico/v1/policy/"))
        .unwrap();
    rt.block_on(store.delete_prefix("/calico/v1/host/"))
        .unwrap();
    let before = rt.block_on(proposals(&ep));
    let t0 = Instant::now();
    rt.block_on(async {
        for kv in &kvs {
            store.put(&kv.key, &kv.value).await.unwrap();
        }
    });
    let puts = t0.elapsed();
    let put_writes = rt.block_on(proposals(&ep)) - before;

    println!(
        "\n{n} policies + {n} workload endpoints ({keys} keys), one local etcd\n\n| run | keys | etcd write requests | seconds | keys/s | speed-up |\n|---|---|---|---|---|---|"
    );
    println!(
        "| baseline: one put per key | {keys} | {put_writes} | {:.2} | {:.0} | 1.00× |",
        puts.as_secs_f64(),
        keys as f64 / puts.as_secs_f64()
    );
    println!(
        "| tenet apply -f (parse, validate, batched transactions) | {keys} | {apply_writes} | {:.2} | {:.0} | {:.1}× |",
        apply.as_secs_f64(),
        keys as f64 / apply.as_secs_f64(),
        puts.as_secs_f64() / apply.as_secs_f64()
    );
}
