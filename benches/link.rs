//! Link-layer benchmark: `cargo bench --bench link`.
//!
//! Builds a two-host lab in namespaces and prints one table, every row measured in this run:
//! * TCP throughput (iperf3) over (a) veth + bridge with no tunnel, (b) kernel VXLAN,
//!   (c) the user-space GRE datapath, (d) the eBPF GRE datapath, with the machine's CPU time
//!   per GB received (all of /proc/stat's busy time during the run: iperf3, the kernel's
//!   softirqs in every namespace and the user-space datapath's threads alike);
//! * 64-byte UDP packets/s over (b), (c) and (d);
//!
//! The hosts' veth underlay gets GRO on, as a physical NIC has it (a veth is born without).
//! * creating then deleting 1000 veth pairs attached to a bridge with `tenet::net` against
//!   `ip -batch` for the same links, and batched (link group) against one-by-one deletion.
//!
//! `TENET_BENCH_SECONDS` sets the length of each iperf3 run (default 5).

mod common;

use std::time::{Duration, Instant};

use common::{gbps, iperf_tcp_cpu, iperf_udp64, net, set_gro, tunnel_pair};
use tenet::net::NewLink;
use tenet::net::tunnel::BackendChoice;
use tenet::testbed::{Fabric, Netns};

const PAIRS: usize = 1000;

struct Row {
    what: String,
    value: String,
    note: String,
}

fn main() {
    let seconds: u64 = std::env::var("TENET_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(run(seconds));
    println!();
    println!("| measurement | result | compared with |");
    println!("|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} |", r.what, r.value, r.note);
    }
}

async fn run(seconds: u64) -> Vec<Row> {
    let mut rows = Vec::new();
    let fabric = Fabric::new().await.unwrap();
    let a = fabric.add_host("ba").await.unwrap();
    let b = fabric.add_host("bb").await.unwrap();
    for h in [&a, &b] {
        set_gro(h, "eth0", true);
    }

    // (a) Two workloads on one bridge: the cost of veth + bridge alone.
    let br = a
        .netlink()
        .create(&NewLink::bridge("br-base").up())
        .await
        .unwrap();
    let w1 = a
        .add_workload("bw1", "v-b1", br.index, net("10.9.0.1/24"), 1500)
        .await
        .unwrap();
    let w2 = a
        .add_workload("bw2", "v-b2", br.index, net("10.9.0.2/24"), 1500)
        .await
        .unwrap();
    eprintln!("(a) veth + bridge ...");
    let (base, base_cpu) = iperf_tcp_cpu(&w1, &w2, seconds);

    // (b) kernel VXLAN between the hosts.
    let (vx1, vx2, _vx_backends) = tunnel_pair(&a, &b, BackendChoice::Vxlan, "vx", "10.1.0").await;
    eprintln!("(b) kernel VXLAN ...");
    let (vxlan, vxlan_cpu) = iperf_tcp_cpu(&vx1, &vx2, seconds);
    let vxlan_pps = iperf_udp64(&vx1, &vx2, seconds);

    // (c) user-space GRE between the hosts.
    let (ug1, ug2, _ug_backends) =
        tunnel_pair(&a, &b, BackendChoice::Userspace, "ug", "10.2.0").await;
    eprintln!("(c) user-space GRE ...");
    let (ugre, ugre_cpu) = iperf_tcp_cpu(&ug1, &ug2, seconds);
    let ugre_pps = iperf_udp64(&ug1, &ug2, seconds);

    // (d) eBPF GRE between the hosts.
    let (eg1, eg2, _eg_backends) = tunnel_pair(&a, &b, BackendChoice::Ebpf, "eg", "10.3.0").await;
    eprintln!("(d) eBPF GRE ...");
    let egre = iperf_tcp_cpu(&eg1, &eg2, seconds);
    let (egre, egre_cpu) = egre;
    let egre_pps = iperf_udp64(&eg1, &eg2, seconds);

    let cpu = |s: f64| format!("{s:.2} CPU s/GB");
    rows.push(Row {
        what: "TCP, veth + bridge, no tunnel (a)".into(),
        value: format!("{}, {}", gbps(base), cpu(base_cpu)),
        note: "baseline".into(),
    });
    rows.push(Row {
        what: "TCP, kernel VXLAN (b)".into(),
        value: format!("{}, {}", gbps(vxlan), cpu(vxlan_cpu)),
        note: format!("{:.0}% of (a)", 100.0 * vxlan / base),
    });
    rows.push(Row {
        what: "TCP, user-space GRE (c)".into(),
        value: format!("{}, {}", gbps(ugre), cpu(ugre_cpu)),
        note: format!("**{:.0}% of (b)** (goal ≥ 40%)", 100.0 * ugre / vxlan),
    });
    rows.push(Row {
        what: "TCP, eBPF GRE (d)".into(),
        value: format!("{}, {}", gbps(egre), cpu(egre_cpu)),
        note: format!("**{:.2}× (b)** (goal ≥ 0.95×)", egre / vxlan),
    });
    rows.push(Row {
        what: "UDP 64 B, kernel VXLAN (b)".into(),
        value: format!("{:.0} kpps received", vxlan_pps / 1e3),
        note: "baseline".into(),
    });
    rows.push(Row {
        what: "UDP 64 B, user-space GRE (c)".into(),
        value: format!("{:.0} kpps received", ugre_pps / 1e3),
        note: format!("{:.0}% of (b)", 100.0 * ugre_pps / vxlan_pps),
    });
    rows.push(Row {
        what: "UDP 64 B, eBPF GRE (d)".into(),
        value: format!("{:.0} kpps received", egre_pps / 1e3),
        note: format!("**{:.2}× (b)** (goal ≥ 1.0×)", egre_pps / vxlan_pps),
    });
    drop((vx1, vx2, ug1, ug2, eg1, eg2, w1, w2));

    eprintln!("link churn ...");
    rows.extend(churn().await);
    rows
}

fn veth_names(i: usize) -> (String, String) {
    (format!("ch{i}a"), format!("ch{i}b"))
}

/// 1000 veth pairs attached to a bridge: created and deleted four ways, each in a fresh
/// namespace so that no run pays for another's leftovers.
async fn churn() -> Vec<Row> {
    // ip -batch: one process, one netlink socket, one request per line.
    let ip_batch = {
        let ns = Netns::create("chip").unwrap();
        ns.run(&["ip", "link", "add", "br0", "up", "type", "bridge"])
            .unwrap();
        let mut add = String::new();
        let mut del = String::new();
        for i in 0..PAIRS {
            let (x, y) = veth_names(i);
            add.push_str(&format!(
                "link add {x} master br0 up type veth peer name {y}\n"
            ));
            del.push_str(&format!("link del {x}\n"));
        }
        let create = ns.time_ip_batch(&add).unwrap();
        let delete = ns.time_ip_batch(&del).unwrap();
        (create, delete)
    };

    // tenet::net: pipelined creation, then batched (link group) deletion.
    let (t_create, t_delete_batch) = {
        let ns = Netns::create("chtn").unwrap();
        let nl = ns.netlink().unwrap();
        let br = nl.create(&NewLink::bridge("br0").up()).await.unwrap();
        let links: Vec<NewLink> = (0..PAIRS)
            .map(|i| {
                let (x, y) = veth_names(i);
                NewLink::veth(x, y).controller(br.index).up()
            })
            .collect();
        let t = Instant::now();
        nl.create_many(&links).await.unwrap();
        let create = t.elapsed();
        let indexes = indexes_of(&nl).await;
        assert_eq!(indexes.len(), 2 * PAIRS);
        let t = Instant::now();
        nl.delete_many(&indexes).await.unwrap();
        (create, t.elapsed())
    };

    // tenet::net one request at a time: create, then delete one by one.
    let (t_create_seq, t_delete_one) = {
        let ns = Netns::create("chsq").unwrap();
        let nl = ns.netlink().unwrap();
        let br = nl.create(&NewLink::bridge("br0").up()).await.unwrap();
        let t = Instant::now();
        for i in 0..PAIRS {
            let (x, y) = veth_names(i);
            nl.create_many(&[NewLink::veth(x, y).controller(br.index).up()])
                .await
                .unwrap();
        }
        let create = t.elapsed();
        let mut firsts = Vec::new();
        for l in nl.links().await.unwrap() {
            if l.name.ends_with('a') && l.name.starts_with("ch") {
                firsts.push(l.index);
            }
        }
        let t = Instant::now();
        for i in firsts {
            nl.delete(i).await.unwrap();
        }
        (create, t.elapsed())
    };

    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    let ratio = |x: Duration, base: Duration| x.as_secs_f64() / base.as_secs_f64();
    vec![
        Row {
            what: format!("create {PAIRS} veth pairs on a bridge, `ip -batch`"),
            value: ms(ip_batch.0),
            note: "baseline".into(),
        },
        Row {
            what: format!("create {PAIRS}, tenet::net create_many (64 in flight)"),
            value: ms(t_create),
            note: format!(
                "**{:.2}× `ip -batch`** (goal ≤ 1.5×)",
                ratio(t_create, ip_batch.0)
            ),
        },
        Row {
            what: format!("create {PAIRS}, tenet::net one request at a time"),
            value: ms(t_create_seq),
            note: format!("{:.2}× `ip -batch`", ratio(t_create_seq, ip_batch.0)),
        },
        Row {
            what: format!("delete {PAIRS}, `ip -batch` (`link del` each)"),
            value: ms(ip_batch.1),
            note: "baseline".into(),
        },
        Row {
            what: format!("delete {PAIRS}, tenet::net one by one"),
            value: ms(t_delete_one),
            note: format!("{:.2}× `ip -batch`", ratio(t_delete_one, ip_batch.1)),
        },
        Row {
            what: format!("delete {PAIRS}, tenet::net batched (link group)"),
            value: ms(t_delete_batch),
            note: format!(
                "{:.1}× faster than one by one",
                ratio(t_delete_one, t_delete_batch)
            ),
        },
    ]
}

async fn indexes_of(nl: &tenet::net::Netlink) -> Vec<u32> {
    nl.links()
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.name.starts_with("ch"))
        .map(|l| l.index)
        .collect()
}
