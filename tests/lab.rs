//! `tenet lab` end to end: the real binaries (etcd, tenet-scheduler, tenet-cn, tenet-cnci,
//! dnsmasq, udhcpc) built into a two-tenant cloud. The lab's own checks must all pass, and
//! this test checks independently, with traffic of its own, that a cross-tenant ping fails
//! (while the same ping within the tenant works) and that a workload's connection to the
//! external host succeeds through NAT. SIGTERM then tears everything down.

mod common;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::lab::*;
use serde_json::Value;
use tenet::net::NetError;
use tenet::net::netns::run_in;

#[test]
fn the_lab_builds_a_two_tenant_cloud_and_proves_it() {
    let dir = tempfile::tempdir().unwrap();
    let facts_file = dir.path().join("lab.json");
    let mut lab = RunningLab::start(
        dir.path(),
        &[
            "--duration",
            "600",
            "--output",
            facts_file.to_str().unwrap(),
        ],
    );
    let facts = lab.facts(&facts_file);

    // The lab's own checks.
    let checks = facts["checks"].as_array().unwrap();
    let failed: Vec<&Value> = checks.iter().filter(|c| c["ok"] != true).collect();
    assert!(
        failed.is_empty(),
        "failed checks: {failed:#?}\n{}",
        lab.printed()
    );
    assert_eq!(facts["passed"], true);
    for kind in [
        "lease",
        "gateway",
        "tenant",
        "internet",
        "floating_ip",
        "isolation",
    ] {
        assert!(
            checks.iter().any(|c| c["kind"] == kind),
            "no {kind} check was run"
        );
    }
    let workloads = facts["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 4, "2 tenants × 2 workloads");
    let of = |tenant: &str| -> Vec<&Value> {
        workloads.iter().filter(|w| w["tenant"] == tenant).collect()
    };
    let (acme, globex) = (of("acme"), of("globex"));
    assert_eq!((acme.len(), globex.len()), (2, 2));
    for tenant in [&acme, &globex] {
        assert_ne!(
            tenant[0]["host"], tenant[1]["host"],
            "a tenant's workloads are spread over the compute hosts"
        );
        assert!(tenant.iter().any(|w| w["floating_ip"].is_string()));
    }
    assert!(
        workloads.iter().all(|w| w["subnet"] == "172.16.0.0/24"),
        "both tenants use the same subnet"
    );
    assert_eq!(facts["compute_hosts"].as_array().unwrap().len(), 2);
    assert_eq!(facts["concentrators"].as_array().unwrap().len(), 2);

    // Independently: an address of this test's own on a globex workload is reached by the
    // other globex workload, and not by acme's, which share every other address.
    let (g0, g1) = (str_of(globex[0], "netns"), str_of(globex[1], "netns"));
    let a0 = str_of(acme[0], "netns");
    let mine = "172.16.0.240";
    assert!(
        in_netns(
            g0,
            &["ip", "addr", "add", &format!("{mine}/32"), "dev", "eth0"]
        )
        .status
        .success()
    );
    assert!(ping(g1, mine), "within globex, {mine} answers");
    assert!(!ping(a0, mine), "acme must not reach globex's {mine}");

    // Independently: a TCP connection from an acme workload without a floating IP to a
    // listener of this test's own on the external host, seen from the concentrator's uplink.
    let plain = acme
        .iter()
        .find(|w| w["floating_ip"].is_null())
        .expect("an acme workload without a floating IP");
    let external: Ipv4Addr = str_of(&facts["internet"], "external_ip").parse().unwrap();
    let listener = run_in(
        Some(&netns_path(str_of(&facts["internet"], "netns"))),
        || {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
                .map_err(|e| NetError::new("bind", "listener", e))
        },
    )
    .unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::thread::spawn(move || listener.accept().map(|(_, peer)| peer));
    let mut conn = run_in(Some(&netns_path(str_of(plain, "netns"))), move || {
        TcpStream::connect_timeout(&SocketAddr::from((external, port)), Duration::from_secs(5))
            .map_err(|e| NetError::new("connect", "external host", e))
    })
    .expect("the external host accepts a connection from the workload");
    let peer = accepted.join().unwrap().unwrap();
    let uplink = facts["concentrators"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["tenant"] == "acme")
        .map(|c| str_of(c, "uplink_ip").to_string())
        .unwrap();
    assert_eq!(
        peer.ip().to_string(),
        uplink,
        "NAT to the concentrator's uplink"
    );
    let _ = conn.read(&mut [0u8; 1]);

    // SIGTERM: a clean exit and nothing left.
    let status = lab.terminate();
    assert!(status.success(), "{status}\n{}", lab.printed());
    assert!(lab.printed().contains("lab: stopped"), "{}", lab.printed());
    let namespaces = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for w in workloads {
        assert!(!namespaces.contains(str_of(w, "netns")), "{namespaces}");
    }
    for c in facts["compute_hosts"].as_array().unwrap() {
        assert!(!namespaces.contains(str_of(c, "netns")), "{namespaces}");
        let pid = c["pid"].as_u64().unwrap();
        assert!(
            !tenet::process::procfs::alive(pid as u32),
            "tenet-cn {pid} still runs"
        );
    }
    let etcd_pid = facts["etcd"]["pid"].as_u64().unwrap() as u32;
    assert!(!tenet::process::procfs::alive(etcd_pid), "etcd still runs");
    assert!(!Path::new(str_of(&facts["etcd"], "data_dir")).exists());
    assert!(!Path::new(str_of(&facts["pki"], "dir")).exists());
}

/// The test as the lab's controller (the lab hands the role over once its checks ran).
struct Controller {
    client: ssntp::Client,
    events: tokio::sync::mpsc::Receiver<ssntp::ClientEvent>,
}

impl Controller {
    async fn connect(facts: &Value) -> Controller {
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
        config.backoff = ssntp::Backoff::scaled(Duration::from_millis(50));
        let (client, events) = ssntp::Client::start(config).unwrap();
        let mut c = Controller { client, events };
        c.next(|e| matches!(e, ssntp::ClientEvent::Connected(_)).then_some(()))
            .await;
        c
    }

    /// The first event `pick` accepts (within 30 s).
    async fn next<T>(&mut self, mut pick: impl FnMut(&ssntp::ClientEvent) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) => {
                    if let Some(t) = pick(&e) {
                        return t;
                    }
                }
                other => panic!("the controller's wait ended: {other:?}"),
            }
        }
    }

    /// START of a container workload in `netns` for `tenant` on its concentrator.
    async fn start(&self, facts: &Value, tenant: &str, instance: &str, netns: &Path) {
        self.client
            .send_command(
                ssntp::Command::Start,
                start_payload(facts, tenant, instance, netns),
            )
            .await
            .unwrap();
    }
}

/// Retries `f` (each try is itself bounded) until it holds, for up to `secs`.
fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the lab's responder on the external host saw a connection from `ns` come from.
fn seen_by_external_host(ns: &str, external: Ipv4Addr) -> Option<String> {
    run_in(Some(&netns_path(ns)), move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::from((external, 7777)), Duration::from_secs(2))
                .map_err(|e| NetError::new("connect", "external host", e))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| NetError::new("read", "external host", e))?;
        let mut text = String::new();
        s.read_to_string(&mut text)
            .map_err(|e| NetError::new("read", "external host", e))?;
        Ok(text
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .to_string())
    })
    .ok()
}

/// Crashes and an outage under the running lab, each followed by proof in traffic: a
/// concentrator killed with SIGKILL comes back with its subnets, dnsmasq, NAT and floating
/// IPs; a restarted scheduler gets its agents back and STARTs work again; a 10 s etcd outage
/// costs the running workloads' traffic nothing, and the agents catch up.
#[test]
fn the_lab_survives_crashes_and_an_etcd_outage() {
    use nix::sys::signal::Signal;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lab.json");
    let mut lab = RunningLab::start(
        dir.path(),
        &["--duration", "900", "--output", file.to_str().unwrap()],
    );
    let facts = lab.facts(&file);
    assert_eq!(facts["passed"], true, "{}", lab.printed());
    let external: Ipv4Addr = str_of(&facts["internet"], "external_ip").parse().unwrap();
    let internet_ns = str_of(&facts["internet"], "netns").to_string();
    let workloads = facts["workloads"].as_array().unwrap().clone();
    let acme: Vec<&Value> = workloads.iter().filter(|w| w["tenant"] == "acme").collect();

    // 1. SIGKILL acme's concentrator agent; the lab restarts it (as systemd would).
    let conc = concentrator(&facts, "acme").clone();
    let old = conc["pid"].as_u64().unwrap();
    kill(old, Signal::SIGKILL);
    lab.facts_when(&file, "acme's tenet-cnci restarted", |f| {
        concentrator(f, "acme")["pid"]
            .as_u64()
            .is_some_and(|p| p != old)
    });
    let conc_ns = str_of(&conc, "netns");
    for w in &acme {
        let ns = str_of(w, "netns");
        assert!(
            eventually(30, || dhcp(dir.path(), ns, 3).as_deref()
                == Some(str_of(w, "ip"))),
            "{} leases {} again after the concentrator's restart\n{}",
            str_of(w, "name"),
            str_of(w, "ip"),
            lab.printed()
        );
        let expected = w["floating_ip"]
            .as_str()
            .unwrap_or(str_of(&conc, "uplink_ip"))
            .to_string();
        assert_eq!(
            seen_by_external_host(ns, external).as_deref(),
            Some(expected.as_str()),
            "{} reaches the external host through NAT again",
            str_of(w, "name")
        );
        if let Some(f) = w["floating_ip"].as_str() {
            assert!(ping(&internet_ns, f), "the floating IP {f} answers again");
        }
    }
    assert!(runs_in(conc_ns, "dnsmasq"), "dnsmasq serves the subnet");

    // 2. SIGKILL the scheduler; the lab restarts it on the same address. The agents come
    // back (NodeConnected for each compute node) and a START works end to end.
    let mut controller = rt.block_on(Controller::connect(&facts));
    let old = facts["scheduler"]["pid"].as_u64().unwrap();
    kill(old, Signal::SIGKILL);
    lab.facts_when(&file, "the scheduler restarted", |f| {
        f["scheduler"]["pid"].as_u64().is_some_and(|p| p != old)
    });
    let mut nodes: std::collections::HashSet<String> = facts["compute_hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| str_of(c, "uuid").to_string())
        .collect();
    rt.block_on(async {
        // Events from before the crash (the nodes announced to a new controller) come
        // first; what counts is what follows the controller's reconnection.
        controller
            .next(|e| matches!(e, ssntp::ClientEvent::Disconnected { .. }).then_some(()))
            .await;
        controller
            .next(|e| matches!(e, ssntp::ClientEvent::Connected(_)).then_some(()))
            .await;
        while !nodes.is_empty() {
            let uuid = controller
                .next(|e| match e {
                    ssntp::ClientEvent::Frame(f)
                        if f.operation()
                            == Some(ssntp::Operation::Event(ssntp::Event::NodeConnected)) =>
                    {
                        use ssntp::payload::{NodeConnected, Payload};
                        NodeConnected::from_yaml(&f.payload)
                            .ok()
                            .map(|n| n.node_connected.node_uuid)
                    }
                    _ => None,
                })
                .await;
            nodes.remove(&uuid);
        }
    });
    let fresh = tenet::testbed::Netns::create("wl").unwrap();
    rt.block_on(controller.start(&facts, "globex", "after-restart", &fresh.path()));
    let leased = eventually(30, || dhcp(dir.path(), fresh.name(), 3).is_some());
    assert!(
        leased,
        "a START after the scheduler's restart\n{}",
        lab.printed()
    );

    // 3. etcd frozen for 10 s (SIGSTOP: to its clients, a server that stopped answering).
    // A ping between acme's workloads on two hosts runs through it.
    let (a, b) = (str_of(acme[0], "netns"), str_of(acme[1], "ip"));
    let pinger = Command::new("ip")
        .args([
            "netns", "exec", a, "ping", "-c", "60", "-i", "0.2", "-W", "1", b,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let etcd = facts["etcd"]["pid"].as_u64().unwrap();
    kill(etcd, Signal::SIGSTOP);
    let during = tenet::testbed::Netns::create("wl").unwrap();
    rt.block_on(controller.start(&facts, "acme", "during-outage", &during.path()));
    // The outage's length is the fault itself, not a wait for an event.
    std::thread::sleep(Duration::from_secs(10));
    kill(etcd, Signal::SIGCONT);
    let out = pinger.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let received: u32 = text
        .split(',')
        .find_map(|p| {
            p.trim()
                .strip_suffix(" received")
                .map(|n| n.parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no ping summary: {text}"));
    // The dataplane does not depend on etcd; allow 2 of 60 for a loaded 2-core machine.
    assert!(
        received >= 58,
        "the ping lost {} of 60 through the outage:\n{text}",
        60 - received
    );
    // The START sent during the outage fails with a reason naming the datastore (the
    // compute node's etcd requests time out), leaving nothing behind in the workload; the
    // controller's retry after the outage works.
    let failure = rt.block_on(controller.next(|e| match e {
        ssntp::ClientEvent::Frame(f)
            if f.operation() == Some(ssntp::Operation::Error(ssntp::ErrorCode::StartFailure)) =>
        {
            use ssntp::payload::{Payload, StartFailure};
            StartFailure::from_yaml(&f.payload)
                .ok()
                .filter(|p| p.instance_uuid == "during-outage")
        }
        _ => None,
    }));
    assert!(
        failure.detail.contains("etcd") || failure.detail.contains("datastore"),
        "{failure:?}"
    );
    let links = in_netns(during.name(), &["ip", "-o", "link"]);
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("eth0"),
        "nothing half-made in the workload: {}",
        String::from_utf8_lossy(&links.stdout)
    );
    rt.block_on(controller.start(&facts, "acme", "during-outage", &during.path()));
    assert!(
        eventually(30, || dhcp(dir.path(), during.name(), 3).is_some()),
        "the START retried after the outage\n{}",
        lab.printed()
    );
    // The agents' status keys (on leases that may have expired meanwhile) come back.
    let status = || {
        let out = Command::new(env!("CARGO_BIN_EXE_tenet"))
            .args(["status", "-o", "json"])
            .env("ETCD_ENDPOINTS", str_of(&facts["etcd"], "endpoint"))
            .output()
            .unwrap();
        serde_json::from_slice::<Vec<Value>>(&out.stdout).map_or(0, |v| v.len())
    };
    assert!(
        eventually(30, || status() == 4),
        "all four agents report their status again"
    );

    drop(controller);
    let status = lab.terminate();
    assert!(status.success(), "{status}\n{}", lab.printed());
}

/// Every workload endpoint in etcd: instance → (host, address).
async fn endpoints(store: &tenet::store::EtcdStore) -> Vec<(String, String, String)> {
    use tenet::store::Datastore;
    let mut out = Vec::new();
    for kv in store.list(tenet::calico::HOSTS).await.unwrap().kvs {
        if let Ok(tenet::calico::CalicoKey::WorkloadEndpoint(id)) =
            tenet::calico::CalicoKey::parse(&kv.key)
        {
            let ep: tenet::calico::WorkloadEndpoint = serde_json::from_slice(&kv.value).unwrap();
            out.push((id.workload, id.host, ep.ipv4_nets[0].ip().to_string()));
        }
    }
    out
}

/// A compute node's agent killed with SIGKILL in the middle of a burst of 50 STARTs, then
/// restarted by the lab: the controller re-sends what never completed, and every workload
/// converges — one endpoint each, a VNIC and a DHCP lease for its address — with no leaked
/// link, address or endpoint (`tenet ipam check` is clean).
#[test]
fn a_compute_node_killed_mid_burst_converges() {
    use nix::sys::signal::Signal;
    const BURST: usize = 50;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lab.json");
    let mut lab = RunningLab::start(
        dir.path(),
        &[
            "--workloads",
            "1",
            "--duration",
            "900",
            "--output",
            file.to_str().unwrap(),
        ],
    );
    let facts = lab.facts(&file);
    assert_eq!(facts["passed"], true, "{}", lab.printed());
    let (etcd, store) = lab_store(&rt, &facts);
    let before = rt.block_on(endpoints(&store)).len();
    let mut controller = rt.block_on(Controller::connect(&facts));
    let victim = facts["compute_hosts"][0].clone();
    let old_pid = victim["pid"].as_u64().unwrap();

    let namespaces: Vec<tenet::testbed::Netns> = (0..BURST)
        .map(|_| tenet::testbed::Netns::create("burst").unwrap())
        .collect();
    let instance = |i: usize| format!("burst-{i}");
    for (i, ns) in namespaces.iter().enumerate() {
        rt.block_on(controller.start(&facts, "acme", &instance(i), &ns.path()));
    }
    // Kill the first compute node's agent once a few of the burst have landed.
    let started = std::time::Instant::now();
    while rt.block_on(endpoints(&store)).len() < before + 6 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the burst does not land"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    kill(old_pid, Signal::SIGKILL);
    lab.facts_when(&file, "the compute node's agent restarted", |f| {
        f["compute_hosts"][0]["pid"]
            .as_u64()
            .is_some_and(|p| p != old_pid)
    });

    // As a controller's START timeout would: wait until the burst settles (no new endpoint
    // for 2 s), so that nothing is re-sent while the surviving node still works on it.
    let mut last = (
        rt.block_on(endpoints(&store)).len(),
        std::time::Instant::now(),
    );
    while last.1.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(100));
        let n = rt.block_on(endpoints(&store)).len();
        if n != last.0 {
            last = (n, std::time::Instant::now());
        }
    }
    // The controller re-sends every START that has not shown its endpoint; a node that has
    // the instance answers instance_exists, which is as good.
    let mut rounds = 0;
    loop {
        let have: std::collections::HashSet<String> = rt
            .block_on(endpoints(&store))
            .into_iter()
            .map(|e| e.0)
            .collect();
        let missing: Vec<usize> = (0..BURST)
            .filter(|i| !have.contains(&instance(*i)))
            .collect();
        if missing.is_empty() {
            break;
        }
        rounds += 1;
        eprintln!(
            "round {rounds}: re-sending {} STARTs that never completed",
            missing.len()
        );
        assert!(
            rounds <= 10,
            "still missing after 10 rounds: {missing:?}\n{}",
            lab.printed()
        );
        for i in &missing {
            rt.block_on(controller.start(&facts, "acme", &instance(*i), &namespaces[*i].path()));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            let have: std::collections::HashSet<String> = rt
                .block_on(endpoints(&store))
                .into_iter()
                .map(|e| e.0)
                .collect();
            if missing.iter().all(|i| have.contains(&instance(*i))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Drain the failures of this round (instance_exists for STARTs that did land).
        rt.block_on(async {
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(50), controller.events.recv()).await
            {
            }
        });
    }

    // What the restarted agent found (orphan VNICs, leaked addresses), for the record.
    let log = std::fs::read_to_string(str_of(&victim, "log")).unwrap_or_default();
    for line in log.lines().filter(|l| l.contains("reconciled with etcd")) {
        eprintln!("{line}");
    }
    // One endpoint per instance, distinct addresses, each leased over the tunnel.
    let all = rt.block_on(endpoints(&store));
    let burst: Vec<&(String, String, String)> =
        all.iter().filter(|e| e.0.starts_with("burst-")).collect();
    assert_eq!(burst.len(), BURST, "one endpoint per instance: {burst:?}");
    let mut ips: Vec<&String> = burst.iter().map(|e| &e.2).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), BURST, "no address given twice");
    for (i, ns) in namespaces.iter().enumerate() {
        let want = &burst.iter().find(|e| e.0 == instance(i)).unwrap().2;
        let got = dhcp(dir.path(), ns.name(), 5);
        assert_eq!(
            got.as_ref(),
            Some(want),
            "{} leases its address",
            instance(i)
        );
    }
    // No leaked link: each compute host has exactly one tenant VNIC per endpoint it holds.
    for host in facts["compute_hosts"].as_array().unwrap() {
        let name = str_of(host, "name");
        let links = in_netns(str_of(host, "netns"), &["ip", "-o", "link"]);
        let vnics = String::from_utf8_lossy(&links.stdout)
            .lines()
            .filter(|l| l.contains(": tvn"))
            .count();
        let held = all.iter().filter(|e| e.1 == name).count();
        assert_eq!(vnics, held, "{name}: VNICs vs endpoints");
    }
    // No leaked address: IPAM agrees with the endpoints, every tenant's and Calico's.
    let check = Command::new(env!("CARGO_BIN_EXE_tenet"))
        .args(["ipam", "check"])
        .env("ETCD_ENDPOINTS", &etcd)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );

    drop(controller);
    let status = lab.terminate();
    assert!(status.success(), "{status}\n{}", lab.printed());
}

/// Whether a TCP connection from namespace `ns` to `ip:port` is established.
fn connects(ns: &str, ip: &str, port: u16) -> bool {
    let addr = SocketAddr::from((ip.parse::<Ipv4Addr>().unwrap(), port));
    run_in(Some(&netns_path(ns)), move || {
        Ok(TcpStream::connect_timeout(&addr, Duration::from_millis(1500)).is_ok())
    })
    .unwrap_or(false)
}

/// `tenet lab --policy`: every check passes with policy enforced on the compute nodes (the
/// tenants' default profiles allow all, DHCP is let through); then a policy written to etcd
/// bites across hosts, over the tunnel, on the receiving node, for one tenant only, and
/// deleting it restores the traffic — no agent restarted.
#[test]
fn policy_in_the_lab_follows_etcd_across_hosts() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lab.json");
    let mut lab = RunningLab::start(
        dir.path(),
        &[
            "--policy",
            "--duration",
            "600",
            "--output",
            file.to_str().unwrap(),
        ],
    );
    let facts = lab.facts(&file);
    assert_eq!(facts["passed"], true, "{}", lab.printed());
    let host_ns = str_of(&facts["compute_hosts"][1], "netns").to_string();
    let rules = in_netns(&host_ns, &["iptables-save"]);
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert!(
        rules.contains("-j cali-FORWARD"),
        "policy is not hooked:\n{rules}"
    );
    assert!(rules.contains("cali-pri-acme:tenant.acme"), "{rules}");
    // `tenet status` shows each compute node's policy in sync (its Felix status key).
    let status_table = || {
        let out = Command::new(env!("CARGO_BIN_EXE_tenet"))
            .arg("status")
            .env("ETCD_ENDPOINTS", str_of(&facts["etcd"], "endpoint"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        status_table().lines().next().unwrap().contains("POLICY"),
        "{}",
        status_table()
    );
    assert!(
        eventually(10, || status_table()
            .lines()
            .filter(|l| l.contains("in sync"))
            .count()
            == 2),
        "both compute nodes report their policy in sync:\n{}",
        status_table()
    );
    // And, the agents running on this machine, what their tunnels' datapath counted: the
    // workloads' DHCP and pings crossed every compute node's tunnels.
    let out = Command::new(env!("CARGO_BIN_EXE_tenet"))
        .args(["status", "-o", "json"])
        .env("ETCD_ENDPOINTS", str_of(&facts["etcd"], "endpoint"))
        .output()
        .unwrap();
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let counted: Vec<&Value> = rows
        .iter()
        .filter(|r| r["role"] == "compute_node")
        .filter_map(|r| r.get("datapath"))
        .collect();
    assert_eq!(counted.len(), 2, "{rows:?}");
    assert!(
        counted
            .iter()
            .all(|d| d["tx_packets"].as_u64() > Some(0) && d["rx_packets"].as_u64() > Some(0)),
        "{rows:?}"
    );

    let workload = |name: &str| {
        facts["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)
            .unwrap()
            .clone()
    };
    let (a1, a2, g1, g2) = (
        workload("acme-1"),
        workload("acme-2"),
        workload("globex-1"),
        workload("globex-2"),
    );
    assert_ne!(
        a1["host"], a2["host"],
        "the lab spreads a tenant over both hosts"
    );
    let ns = |w: &Value| str_of(w, "netns").to_string();
    let ip = |w: &Value| str_of(w, "ip").to_string();
    assert!(connects(&ns(&a1), &ip(&a2), 7777));

    let (_, store) = lab_store(&rt, &facts);
    use tenet::store::Datastore;
    let key = "/calico/v1/policy/tier/default/policy/no-7777";
    rt.block_on(store.put(
        key,
        br#"{"order":10,"selector":"tenet.tenant == 'acme'","types":["ingress"],
             "inbound_rules":[{"action":"deny","protocol":"tcp","dst_ports":[7777]},{"action":"allow"}]}"#,
    ))
    .unwrap();
    assert!(
        eventually(15, || !connects(&ns(&a1), &ip(&a2), 7777)),
        "the deny policy never took effect"
    );
    assert!(
        connects(&ns(&g1), &ip(&g2), 7777),
        "the other tenant is not selected"
    );
    assert!(
        ping(&ns(&a1), &ip(&a2)),
        "the policy's allow rule lets ICMP through"
    );
    rt.block_on(store.delete(key, None)).unwrap();
    assert!(
        eventually(15, || connects(&ns(&a1), &ip(&a2), 7777)),
        "deleting the policy did not restore the connection"
    );
    // Every compute node timed the changes it calculated and applied.
    for h in facts["compute_hosts"].as_array().unwrap() {
        let (_, scrape) = http_get(str_of(h, "metrics"), "/metrics");
        for phase in ["calculate", "apply"] {
            let count = sample(
                &scrape,
                &format!(r#"tenet_policy_duration_seconds_count{{phase="{phase}"}}"#),
            );
            assert!(count.unwrap_or(0.0) >= 1.0, "{phase}: {scrape}");
        }
    }
    assert!(lab.terminate().success(), "{}", lab.printed());
}

/// `tenet lab --mode routed`: three compute hosts, no concentrators; BIRD on each host
/// (configured by tenet-cn from etcd) meshes with the others. Checked independently: the
/// hosts' kernels hold each other's blocks as BGP routes, `tenet node status` shows the
/// mesh, and a compute node killed with SIGKILL comes back (the lab restarts it) adopting
/// its BIRD and its routed VNICs, while traffic keeps flowing. SIGTERM leaves no BIRD.
#[test]
fn the_routed_lab_meshes_its_hosts_by_bgp() {
    let dir = tempfile::tempdir().unwrap();
    let facts_file = dir.path().join("lab.json");
    let mut lab = RunningLab::start(
        dir.path(),
        &[
            "--mode",
            "routed",
            "--cns",
            "3",
            "--duration",
            "600",
            "--output",
            facts_file.to_str().unwrap(),
        ],
    );
    let facts = lab.facts(&facts_file);
    let checks = facts["checks"].as_array().unwrap();
    let failed: Vec<&Value> = checks.iter().filter(|c| c["ok"] != true).collect();
    assert!(
        failed.is_empty(),
        "failed checks: {failed:#?}\n{}",
        lab.printed()
    );
    for kind in ["address", "host", "tenant", "bgp"] {
        assert!(
            checks.iter().any(|c| c["kind"] == kind),
            "no {kind} check was run"
        );
    }
    assert_eq!(facts["mode"], "routed");
    assert!(facts["concentrators"].as_array().unwrap().is_empty());

    let hosts = facts["compute_hosts"].as_array().unwrap();
    let workloads = facts["workloads"].as_array().unwrap();
    // Each host's metrics count its two mesh sessions, Established.
    for h in hosts {
        let address = str_of(h, "metrics").to_string();
        assert!(
            eventually(30, || {
                let (_, scrape) = http_get(&address, "/metrics");
                sample(&scrape, "tenet_bgp_sessions_established") == Some(2.0)
                    && sample(&scrape, "tenet_bgp_sessions") == Some(2.0)
            }),
            "{}: {}",
            str_of(h, "name"),
            http_get(&address, "/metrics").1
        );
    }
    // Every host's kernel routes every other host's workloads' blocks by BGP.
    for h in hosts {
        let routes = in_netns(
            str_of(h, "netns"),
            &["ip", "-4", "route", "show", "proto", "bird"],
        );
        let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
        for w in workloads.iter().filter(|w| w["host"] != h["name"]) {
            let ip: Ipv4Addr = str_of(w, "ip").parse().unwrap();
            let owner = hosts.iter().find(|o| o["name"] == w["host"]).unwrap();
            let via = format!("via {} ", str_of(owner, "underlay_ip"));
            assert!(
                routes.lines().any(|l| l.contains(&via) && {
                    let net: ipnetwork::Ipv4Network =
                        l.split_whitespace().next().unwrap().parse().unwrap();
                    net.contains(ip)
                }),
                "{} has no BGP route to {ip} via {}:\n{routes}",
                str_of(h, "name"),
                str_of(owner, "underlay_ip")
            );
        }
    }
    // `tenet node status`, as an operator runs it.
    let first = &hosts[0];
    let status = Command::new(env!("CARGO_BIN_EXE_tenet"))
        .args(["node", "status", "--socket", str_of(first, "bird_socket")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    for other in &hosts[1..] {
        let ip = str_of(other, "underlay_ip");
        assert!(
            text.lines().any(|l| l.starts_with(&format!("| {ip} "))
                && l.contains("node-to-node mesh")
                && l.contains("Established")),
            "{ip} in\n{text}"
        );
    }

    // SIGKILL the compute node of a host with a workload; the lab restarts it. Its BIRD
    // (adopted, not restarted) keeps the sessions, and its workload stays reachable.
    let victim = workloads
        .iter()
        .find(|w| w["host"] != first["name"])
        .unwrap();
    let peer = workloads
        .iter()
        .find(|w| w["tenant"] == victim["tenant"] && w["name"] != victim["name"])
        .unwrap();
    let host = hosts.iter().find(|h| h["name"] == victim["host"]).unwrap();
    let bird_pid =
        std::fs::read_to_string(Path::new(str_of(host, "bird_socket")).with_file_name("bird.pid"))
            .unwrap();
    let pid = host["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let restarted = lab.facts_when(&facts_file, "the compute node restarted", |f| {
        f["compute_hosts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["name"] == host["name"] && h["pid"].as_u64() != Some(pid as u64))
    });
    assert!(restarted["passed"] == true);
    assert!(
        eventually(30, || ping(str_of(peer, "netns"), str_of(victim, "ip"))),
        "{} → {} after its compute node was killed",
        str_of(peer, "name"),
        str_of(victim, "name")
    );
    let bird_after =
        std::fs::read_to_string(Path::new(str_of(host, "bird_socket")).with_file_name("bird.pid"))
            .unwrap();
    assert_eq!(bird_pid, bird_after, "the restarted agent adopted its BIRD");

    let status = lab.terminate();
    assert!(status.success(), "{status}\n{}", lab.printed());
    // Live processes only: an adopted BIRD is not the agent's child, and its zombie waits
    // for the machine's init to reap it.
    let left = Command::new("pgrep")
        .args(["-x", "bird", "-r", "R,S,D,T"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "BIRD left running after the lab stopped"
    );
}

/// GET `path` from `address` (plain HTTP/1.1): the status code and the body.
fn http_get(address: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(address).unwrap();
    use std::io::Write;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample `name` (with its labels, as printed) in a scrape.
fn sample(scrape: &str, name: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        l.strip_prefix(name)
            .filter(|rest| rest.starts_with(' '))
            .and_then(|rest| rest.trim().parse().ok())
    })
}

/// Every agent of the lab serves /metrics, /healthz and /readyz; the counters follow what
/// happens: a container added through tenet-cn's local API is counted as a START and a VNIC,
/// its removal as a DELETE; the concentrator counts the frames it handled.
#[test]
fn the_lab_agents_serve_metrics_that_follow_operations() {
    let dir = tempfile::tempdir().unwrap();
    let (mut lab, facts, _) = RunningLab::up(dir.path(), &["--cns", "1", "--workloads", "1"]);
    let host = &facts["compute_hosts"][0];
    let cn = str_of(host, "metrics").to_string();
    for path in ["/healthz", "/readyz"] {
        let (status, body) = http_get(&cn, path);
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (status, before) = http_get(&cn, "/metrics");
    assert_eq!(status, 200);
    // Two workloads (one per tenant) on the one host, in two subnets.
    assert_eq!(sample(&before, "tenet_cn_vnics"), Some(2.0), "{before}");
    assert_eq!(sample(&before, "tenet_cn_subnets"), Some(2.0), "{before}");
    assert_eq!(
        sample(&before, "tenet_cn_scheduler_connected"),
        Some(1.0),
        "{before}"
    );
    let starts =
        |scrape: &str| sample(scrape, r#"tenet_cn_starts_total{result="ok"}"#).unwrap_or(0.0);
    let deletes =
        |scrape: &str| sample(scrape, r#"tenet_cn_deletes_total{result="ok"}"#).unwrap_or(0.0);

    let acme = concentrator(&facts, "acme");
    let ns = tenet::testbed::Netns::create("met").unwrap();
    let socket = str_of(host, "api_socket").to_string();
    let call = |line: &str| -> Value {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        writeln!(s, "{line}").unwrap();
        let mut answer = String::new();
        std::io::BufReader::new(s).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    };
    let create = serde_json::json!({"op": "create", "instance": "metrics-1", "vnic": "metrics-1",
        "tenant": "acme", "subnet": str_of(acme, "subnet"), "kind": "container",
        "concentrator": str_of(acme, "uuid"), "netns": ns.path()});
    let made = call(&create.to_string());
    assert_eq!(made["ok"], true, "{made}");
    let (_, after) = http_get(&cn, "/metrics");
    assert_eq!(starts(&after), starts(&before) + 1.0, "{after}");
    assert_eq!(sample(&after, "tenet_cn_vnics"), Some(3.0), "{after}");
    let assigned = |scrape: &str| sample(scrape, "tenet_ipam_assigned_total").unwrap_or(0.0);
    let released = |scrape: &str| sample(scrape, "tenet_ipam_released_total").unwrap_or(0.0);
    assert!(assigned(&after) >= assigned(&before) + 1.0, "{after}");
    let gone = call(r#"{"op":"destroy","instance":"metrics-1"}"#);
    assert_eq!(gone["ok"], true, "{gone}");
    let refused = call(r#"{"op":"destroy","instance":"metrics-1"}"#);
    assert_eq!(refused["ok"], false, "{refused}");
    let (_, last) = http_get(&cn, "/metrics");
    assert_eq!(deletes(&last), deletes(&after) + 1.0, "{last}");
    assert_eq!(
        sample(&last, r#"tenet_cn_deletes_total{result="no_instance"}"#),
        Some(1.0),
        "{last}"
    );
    assert_eq!(sample(&last, "tenet_cn_vnics"), Some(2.0), "{last}");
    assert_eq!(released(&last), released(&after) + 1.0, "{last}");
    assert!(sample(&last, "tenet_ipam_transactions_total").unwrap_or(0.0) > 0.0);
    // etcd round trips, timed by operation: the create's transactions are among them.
    let txns = sample(
        &last,
        r#"tenet_etcd_request_duration_seconds_count{operation="txn"}"#,
    )
    .unwrap_or(0.0);
    assert!(txns >= 1.0, "{last}");

    let conc = str_of(acme, "metrics").to_string();
    let (status, scrape) = http_get(&conc, "/metrics");
    assert_eq!(status, 200);
    assert!(
        sample(&scrape, "tenet_cnci_subnets").unwrap_or(0.0) >= 1.0,
        "{scrape}"
    );
    assert!(
        sample(
            &scrape,
            r#"tenet_cnci_frames_total{operation="Event(TenantAdded)"}"#
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{scrape}"
    );
    assert_eq!(http_get(&conc, "/readyz").0, 200);
    // acme's lab workload leased its address from the subnet's dnsmasq.
    assert!(
        eventually(15, || sample(
            &http_get(&conc, "/metrics").1,
            "tenet_cnci_dhcp_leases"
        )
        .unwrap_or(0.0)
            >= 1.0),
        "{}",
        http_get(&conc, "/metrics").1
    );
    assert_eq!(
        sample(&scrape, "tenet_cnci_dnsmasq_restarts_total"),
        Some(0.0),
        "{scrape}"
    );
    // The lease crossed the tunnel, and the datapath (user-space GRE here) counted it.
    let scrape = http_get(&conc, "/metrics").1;
    let received: f64 = scrape
        .lines()
        .filter(|l| l.starts_with("tenet_tunnel_packets_total{") && l.contains(r#"direction="rx""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(received >= 1.0, "{scrape}");
    assert_eq!(
        sample(&scrape, r#"tenet_tunnel_dropped_total{reason="malformed"}"#),
        Some(0.0),
        "{scrape}"
    );

    // The scheduler: its sessions by role and the frames it forwarded.
    let sched = str_of(&facts["scheduler"], "metrics").to_string();
    let (status, scrape) = http_get(&sched, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        sample(&scrape, r#"tenet_scheduler_sessions{role="agent"}"#),
        Some(1.0),
        "{scrape}"
    );
    assert_eq!(
        sample(&scrape, r#"tenet_scheduler_sessions{role="cnciagent"}"#),
        Some(2.0),
        "{scrape}"
    );
    assert!(
        sample(&scrape, "tenet_scheduler_frames_forwarded_total").unwrap_or(0.0) > 0.0,
        "{scrape}"
    );
    assert_eq!(http_get(&sched, "/readyz").0, 200);
    let status = lab.terminate();
    assert!(status.success(), "{status}\n{}", lab.printed());
}
