//! Crash safety: a concentrator process is killed part-way through attaching 8 subnets × 3
//! compute nodes (at each fault point, and once from outside), then a new `Concentrator`
//! rebuilds. No link or dnsmasq may leak or be duplicated, the workload attached before keeps
//! getting its lease, a second rebuild changes nothing, and the re-sent TenantAdded frames
//! complete the fleet.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use ipnetwork::Ipv4Network;
use tenet::net::Link;
use tenet::net::alias::Alias;
use tenet::net::tunnel::BackendChoice;
use tenet::store::{Datastore, EtcdOptions, EtcdStore};
use tenet::testbed::{EtcdServer, Fabric, Host};
use tenet::types::{TunnelKey, gateway_of};
use tenet_cnci::{Concentrator, FaultHook, FaultPoint, RemoteSubnet};

const SUBNETS: u8 = 8;
const CNS: u8 = 3;
const CHILD_NETNS: &str = "TENET_CNCI_CRASH_NETNS";
const CHILD_RUN: &str = "TENET_CNCI_CRASH_RUN";
const CHILD_ETCD: &str = "TENET_CNCI_CRASH_ETCD";
const CHILD_FAULT: &str = "TENET_CNCI_CRASH_AT";

/// The fleet the child attaches: subnet 10.K.0.0/24 from compute nodes 10.254.0.100+j (no
/// host answers there; the tunnels need only their addresses).
fn fleet() -> Vec<RemoteSubnet> {
    let mut v = Vec::new();
    for k in 1..=SUBNETS {
        for j in 0..CNS {
            let subnet: Ipv4Network = format!("10.{k}.0.0/24").parse().unwrap();
            v.push(RemoteSubnet {
                tenant: "t1".into(),
                subnet,
                subnet_key: TunnelKey::from_subnet(&subnet).unwrap().get(),
                cn_id: format!("cn-{j}"),
                cn_ip: Ipv4Addr::new(10, 254, 0, 100 + j),
            });
        }
    }
    v
}

/// The child: a concentrator that dies (SIGKILL) the n-th time it reaches a fault point.
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
    let store: Arc<dyn Datastore> = Arc::new(
        EtcdStore::connect(
            &[std::env::var(CHILD_ETCD).unwrap()],
            EtcdOptions::default(),
        )
        .await
        .unwrap(),
    );
    let mut config = tenet_cnci::CnciConfig::new("c1", "t1");
    config.netns = Some(netns.into());
    config.tunnel = BackendChoice::Userspace;
    config.run_dir = std::env::var(CHILD_RUN).unwrap().into();
    config.fault_hook = hook;
    let conc = conc_on(config, &store).await;
    for req in fleet() {
        conc.attach_remote_subnet(&req).await.unwrap();
        println!("attached {} {}", req.subnet, req.cn_ip);
    }
}

enum Death {
    At(FaultPoint, usize),
    /// SIGKILL from the test once this many attaches were reported.
    Outside(usize),
}

fn run_child(host: &Host, run: &Path, etcd: &str, death: &Death) -> usize {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "crash_child",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_NETNS, host.path())
    .env(CHILD_RUN, run)
    .env(CHILD_ETCD, etcd)
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    if let Death::At(point, n) = death {
        cmd.env(CHILD_FAULT, format!("{point}:{n}"));
    }
    let mut child = cmd.spawn().unwrap();
    let mut attached = 0;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        attached += usize::from(line.unwrap().starts_with("attached "));
        if let Death::Outside(n) = death
            && attached == *n
        {
            child.kill().unwrap();
            break;
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "the child should have been killed, but {status}"
    );
    attached
}

/// The concentrator's links, checked: no unfinished link, one bridge per subnet, every
/// tunnel on one of its bridges with no duplicate peer. Returns tunnels per subnet.
fn census(links: &[Link]) -> BTreeMap<String, usize> {
    let mut bridges = BTreeMap::new();
    let mut per_subnet = BTreeMap::new();
    for l in links {
        let alias = l.alias.as_deref().and_then(Alias::parse);
        let ours = l.name.starts_with("tcb_") || l.name.starts_with("tct_");
        assert!(
            !ours || alias.is_some(),
            "unfinished link left behind: {l:?}"
        );
        if let Some(a) = alias.filter(|a| a.kind == "cnci-bridge") {
            let subnet = a.get("subnet").unwrap().to_string();
            assert!(bridges.insert(l.index, subnet.clone()).is_none());
            assert!(
                per_subnet.insert(subnet.clone(), 0).is_none(),
                "two bridges for {subnet}"
            );
        }
    }
    let mut peers = HashSet::new();
    for l in links.iter().filter(|l| l.name.starts_with("tct_")) {
        let subnet = l
            .controller
            .and_then(|c| bridges.get(&c))
            .unwrap_or_else(|| panic!("tunnel on no bridge: {l:?}"));
        let a = Alias::parse(l.alias.as_deref().unwrap()).unwrap();
        assert!(
            peers.insert((subnet.clone(), a.get("remote").unwrap().to_string())),
            "duplicate tunnel {l:?}"
        );
        *per_subnet.get_mut(subnet).unwrap() += 1;
    }
    per_subnet
}

/// Live dnsmasq processes configured under `run`, by subnet directory.
fn dnsmasqs(run: &Path) -> Vec<String> {
    let needle = format!("--conf-file={}/", run.display());
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        let zombie = std::fs::read_to_string(entry.path().join("stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        });
        if argv.first().is_some_and(|a| a == "dnsmasq")
            && !zombie
            && let Some(conf) = argv.iter().find_map(|a| a.strip_prefix(&needle))
        {
            found.push(conf.split('/').next().unwrap().to_string());
        }
    }
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_part_way_then_rebuild() {
    let etcd = EtcdServer::start().await.unwrap();
    let store: Arc<dyn Datastore> = Arc::new(etcd.store().await.unwrap());
    let fabric = Fabric::new().await.unwrap();
    let cn_host = fabric.add_host("cn").await.unwrap();
    let host = fabric.add_host("cncicrash").await.unwrap();
    let run = tempfile::tempdir().unwrap();
    let config = cnci_config(&host, "c1", "t1", run.path());
    let dhcp = DhcpClient::new();

    // A real workload on 172.16.0.0/24, attached before any crash.
    let cn = cn_on(&cn_host, "cn-real", BackendChoice::Userspace).await;
    let w = workload(
        &cn,
        &cn_host,
        "v1",
        "t1",
        ("c1", host.ip()),
        "02:00:00:00:00:41",
    )
    .await;
    let ip: Ipv4Addr = "172.16.0.41".parse().unwrap();
    let rev = put_endpoint(&store, "cn-real", "v1", "t1", w.mac, ip).await;
    {
        let conc = conc_on(config.clone(), &store).await;
        conc.attach_remote_subnet(&remote(w.vnic.tunnel.as_ref().unwrap()))
            .await
            .unwrap();
        synced(&conc, rev).await;
        assert_eq!(dhcp.lease(&w.ns, 3).unwrap().ip, ip);
    }

    let scenarios = [
        Death::At(FaultPoint::BridgeCreated, 2),
        Death::At(FaultPoint::DhcpStarted, 3),
        Death::At(FaultPoint::SubnetReady, 4),
        Death::At(FaultPoint::TunnelCreated, 5),
        Death::At(FaultPoint::TunnelReady, 7),
        Death::Outside(10),
    ];
    for death in &scenarios {
        let what = match death {
            Death::At(p, n) => format!("{p} #{n}"),
            Death::Outside(n) => format!("from outside after {n} attaches"),
        };
        let attached = run_child(&host, run.path(), &etcd.endpoint(), death);

        let conc = Concentrator::init(config.clone(), Some(store.clone()))
            .await
            .unwrap();
        let report = conc.rebuild().await.unwrap();
        let links = host.netlink().links().await.unwrap();
        let per_subnet = census(&links);
        let daemons = dnsmasqs(run.path());
        let dirs: Vec<String> = per_subnet.keys().map(|s| s.replace('/', "-")).collect();
        assert_eq!(
            daemons, dirs,
            "{what}: one dnsmasq per subnet, none for others"
        );
        assert_eq!(report.subnets, per_subnet.len());
        println!(
            "killed at {what}: {attached} attaches reported; rebuilt {} subnets / {} tunnels; {} repairs, {} dnsmasq adopted",
            report.subnets,
            report.tunnels,
            report.repairs.len(),
            report.dhcp_adopted
        );
        for r in &report.repairs {
            println!("    {r}");
        }

        // The workload of before keeps its lease and its gateway.
        assert_eq!(
            dhcp.lease(&w.ns, 3).unwrap().ip,
            ip,
            "{what}: lease still answered"
        );
        assert!(ping(&w.ns, gateway_of(&subnet())));

        // A second rebuild changes nothing.
        let second = conc.rebuild().await.unwrap();
        assert!(second.repairs.is_empty(), "{what}: {:#?}", second.repairs);
        assert_eq!(second.dhcp_adopted, second.subnets);
        assert_eq!(census(&host.netlink().links().await.unwrap()), per_subnet);

        // The controller re-sends every TenantAdded: the fleet completes.
        for req in fleet() {
            conc.attach_remote_subnet(&req).await.unwrap();
        }
        let full = census(&host.netlink().links().await.unwrap());
        assert_eq!(full.len(), usize::from(SUBNETS) + 1, "{what}");
        assert!(
            full.iter().all(|(s, n)| *n
                == if s.starts_with("172.16") {
                    1
                } else {
                    usize::from(CNS)
                }),
            "{what}: {full:?}"
        );
        assert_eq!(dnsmasqs(run.path()).len(), full.len());

        // Back to the real subnet only, for the next crash.
        for k in 1..=SUBNETS {
            conc.remove_subnet(&format!("10.{k}.0.0/24").parse().unwrap())
                .await
                .unwrap();
        }
        assert_eq!(dnsmasqs(run.path()), ["172.16.0.0-24"]);
    }
    let conc = conc_on(config, &store).await;
    conc.reset().await.unwrap();
    assert!(dnsmasqs(run.path()).is_empty());
}
