//! Crash safety: a compute-node process is killed part-way through 200 creates (at each
//! fault point, and once from outside at a random moment), then a new `ComputeNode` rebuilds
//! from the kernel. Nothing may leak or be duplicated, the controller's re-sent creates must
//! complete the fleet, a second rebuild must change nothing, and `reset` must leave links
//! that are not the compute node's alone.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{Census, census, fleet};
use futures::StreamExt;
use tenet::net::NewLink;
use tenet::net::tunnel::BackendChoice;
use tenet::testbed::{Fabric, Host};
use tenet_cn::{CnConfig, ComputeNode, FaultHook, FaultPoint, Repair, VnicConfig};

const VNICS: usize = 200;
const SUBNETS: usize = 20;
const PARALLEL: usize = 8;
const CHILD_NETNS: &str = "TENET_CN_CRASH_NETNS";
const CHILD_FAULT: &str = "TENET_CN_CRASH_AT";
const CHILD_MODE: &str = "TENET_CN_CRASH_MODE";

fn conc_ip() -> Ipv4Addr {
    // Inside the lab fabric's underlay; no host answers there, which the test does not need.
    "10.254.0.200".parse().unwrap()
}

fn the_fleet() -> Vec<VnicConfig> {
    fleet(VNICS, SUBNETS, conc_ip(), 10)
}

fn config(netns: std::path::PathBuf, hook: Option<FaultHook>) -> CnConfig {
    let mut c = CnConfig::new("cn-crash");
    c.netns = Some(netns);
    c.tunnel = BackendChoice::Userspace;
    c.max_parallel = PARALLEL;
    c.fault_hook = hook;
    c
}

/// Creates every VNIC of `configs`, `PARALLEL` at a time; returns how many TunnelAdds came.
async fn create_all(cn: &Arc<ComputeNode>, configs: &[VnicConfig], announce: bool) -> usize {
    let results: Vec<_> = futures::stream::iter(configs.iter().cloned().map(|c| {
        let cn = cn.clone();
        async move {
            let made = cn.create_vnic(&c, None).await.unwrap();
            if announce {
                println!("created {}", c.vnic_id);
            }
            made.tunnel.is_some()
        }
    }))
    .buffer_unordered(PARALLEL)
    .collect()
    .await;
    results.into_iter().filter(|&add| add).count()
}

/// The child: a compute node that dies (SIGKILL) the n-th time it reaches a fault point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "started by crash_part_way_then_rebuild as a child process"]
async fn crash_child() {
    let netns = std::env::var(CHILD_NETNS).expect("run by crash_part_way_then_rebuild");
    let hook = std::env::var(CHILD_FAULT).ok().map(|spec| {
        let (point, n) = spec.split_once(':').expect("POINT:N");
        let point: FaultPoint = point.parse().unwrap();
        let n: usize = n.parse().unwrap();
        let seen = AtomicUsize::new(0);
        FaultHook::new(move |p| {
            if p == point && seen.fetch_add(1, Ordering::SeqCst) + 1 == n {
                let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            }
        })
    });
    let cn = Arc::new(ComputeNode::init(config(netns.into(), hook)).await.unwrap());
    cn.rebuild().await.unwrap();
    let configs = the_fleet();
    create_all(&cn, &configs, true).await;
    if std::env::var(CHILD_MODE).as_deref() == Ok("destroy") {
        // Subnet by subnet, two per batch, so that every batch empties two subnets.
        let mut by_subnet = configs.clone();
        by_subnet.sort_by_key(|c| c.tenant_id.clone());
        for batch in by_subnet.chunks(2 * VNICS / SUBNETS) {
            cn.destroy_vnics(batch, None).await.unwrap();
        }
    }
}

enum Death {
    /// SIGKILL from inside at the n-th pass of a fault point.
    At(FaultPoint, usize),
    /// SIGKILL from the test once this many VNICs were reported created.
    Outside(usize),
}

/// Runs the child against `host` until it dies as `death` says.
fn run_child(host: &Host, mode: &str, death: &Death) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "crash_child",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_NETNS, host.path())
    .env(CHILD_MODE, mode)
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if let Death::At(point, n) = death {
        cmd.env(CHILD_FAULT, format!("{point}:{n}"));
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut created = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        created += usize::from(line.starts_with("created "));
        if let Death::Outside(n) = death
            && created == *n
        {
            child.kill().unwrap();
            break;
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "the child should have been killed, but ended with {status} after {created} creates"
    );
}

async fn census_of(host: &Host) -> Census {
    census(&host.netlink().links().await.unwrap())
}

/// Links of others, with tenet-looking and foreign aliases, that no reset may touch.
async fn add_foreign_links(host: &Host) -> Vec<(String, String)> {
    let others = [
        ("cncibr0", "tenet:v1:cnci-bridge subnet=10.9.0.0+24"),
        ("ext0", "owner=someone-else"),
    ];
    for (name, alias) in others {
        let l = host.netlink().create(&NewLink::bridge(name)).await.unwrap();
        host.netlink().set_alias(l.index, alias).await.unwrap();
    }
    others
        .iter()
        .map(|(n, a)| (n.to_string(), a.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_part_way_then_rebuild() {
    let fabric = Fabric::new().await.unwrap();
    let host = fabric.add_host("cncrash").await.unwrap();
    let foreign = add_foreign_links(&host).await;
    let configs = the_fleet();

    let scenarios = [
        ("create", Death::At(FaultPoint::BridgeCreated, 3)),
        ("create", Death::At(FaultPoint::TunnelCreated, 5)),
        ("create", Death::At(FaultPoint::TunnelEnslaved, 9)),
        ("create", Death::At(FaultPoint::SubnetReady, 14)),
        ("create", Death::At(FaultPoint::VnicLinkCreated, 57)),
        ("create", Death::At(FaultPoint::VnicReady, 150)),
        ("create", Death::Outside(100)),
        ("destroy", Death::At(FaultPoint::VnicsDeleted, 2)),
    ];
    for (mode, death) in &scenarios {
        let what = match death {
            Death::At(p, n) => format!("{mode}, killed at {p} #{n}"),
            Death::Outside(n) => format!("{mode}, killed from outside after {n} creates"),
        };
        run_child(&host, mode, death);

        let cn = Arc::new(ComputeNode::init(config(host.path(), None)).await.unwrap());
        let report = cn.rebuild().await.unwrap();
        let after = census_of(&host).await;
        eprintln!(
            "{what}: rebuilt {} subnets, {} VNICs; {} repairs",
            report.subnets,
            report.vnics,
            report.repairs.len()
        );
        assert_eq!(
            (after.bridges, after.vnics),
            (report.subnets, report.vnics),
            "{what}"
        );
        assert_eq!(after.tunnels, after.bridges, "{what}");
        assert_eq!(report.present.len(), report.subnets, "{what}");
        let has = |f: &dyn Fn(&Repair) -> bool| report.repairs.iter().any(f);
        match death {
            Death::At(FaultPoint::BridgeCreated | FaultPoint::TunnelEnslaved, _) => assert!(
                has(
                    &|r| matches!(r, Repair::RemovedUnfinished { ifname } if ifname.starts_with("tbr_"))
                ),
                "{what}: {:#?}",
                report.repairs
            ),
            Death::At(FaultPoint::TunnelCreated, _) => assert!(
                has(&|r| matches!(r, Repair::RemovedTunnelWithoutBridge { .. })),
                "{what}: {:#?}",
                report.repairs
            ),
            Death::At(FaultPoint::SubnetReady, _) => {
                assert!(
                    has(&|r| matches!(r, Repair::RemovedEmptyBridge { .. })),
                    "{what}"
                );
                // Every subnet whose first VNIC was still in flight goes, with a TunnelDel.
                let empty = report
                    .repairs
                    .iter()
                    .filter(|r| matches!(r, Repair::RemovedEmptyBridge { .. }))
                    .count();
                assert_eq!(
                    report.removed.len(),
                    empty,
                    "{what}: a TunnelDel per empty bridge"
                );
            }
            Death::At(FaultPoint::VnicLinkCreated, _) => assert!(
                has(
                    &|r| matches!(r, Repair::RemovedUnfinished { ifname } if ifname.starts_with("tvn_"))
                ),
                "{what}: {:#?}",
                report.repairs
            ),
            Death::At(FaultPoint::VnicsDeleted, _) => {
                assert_eq!(report.removed.len(), 2, "{what}: the two emptied subnets");
                assert_eq!(report.subnets, SUBNETS - 4, "{what}");
            }
            _ => {}
        }

        // A second rebuild finds nothing to do and changes nothing.
        let again = cn.rebuild().await.unwrap();
        assert!(again.repairs.is_empty(), "{what}: {:#?}", again.repairs);
        assert_eq!(census_of(&host).await, after, "{what}");

        // The controller sends its requests again; the fleet ends complete (or gone).
        if *mode == "create" {
            let adds = create_all(&cn, &configs, false).await;
            assert_eq!(
                adds,
                SUBNETS - report.subnets,
                "{what}: TunnelAdd per new subnet"
            );
            let full = census_of(&host).await;
            assert_eq!(
                (full.bridges, full.tunnels, full.vnics),
                (SUBNETS, SUBNETS, VNICS),
                "{what}"
            );
            let ids: HashSet<String> = cn.vnic_ids().into_iter().collect();
            assert_eq!(ids.len(), VNICS, "{what}");
        } else {
            let gone = cn.destroy_vnics(&configs, None).await.unwrap();
            let dels = gone.iter().filter(|d| d.tunnel.is_some()).count();
            assert_eq!(
                dels, report.subnets,
                "{what}: TunnelDel per remaining subnet"
            );
            assert_eq!(census_of(&host).await.vnics, 0, "{what}");
        }

        // Reset: every compute-node link goes, the others stay as they were.
        cn.reset().await.unwrap();
        let left = host.netlink().links().await.unwrap();
        let cn_left: Vec<_> = left
            .iter()
            .filter(|l| {
                ["tbr_", "tgt_", "tvn_", "tvp_", "tvc_"]
                    .iter()
                    .any(|p| l.name.starts_with(p))
            })
            .map(|l| l.name.clone())
            .collect();
        assert!(cn_left.is_empty(), "{what}: reset left {cn_left:?}");
        for (name, alias) in &foreign {
            let l = left
                .iter()
                .find(|l| &l.name == name)
                .expect("foreign link kept");
            assert_eq!(l.alias.as_deref(), Some(alias.as_str()), "{what}");
        }
        assert!(cn.subnets().is_empty() && cn.vnic_ids().is_empty());
    }
}
