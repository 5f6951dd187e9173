//! Routed mode proven by traffic: three hosts as namespaces on one L2 underlay, real etcd,
//! a real BIRD 2 per host whose configuration tenet renders from etcd, workloads routed by
//! /32 (/128) host routes and proxy ARP / NDP, and an independent BGP peer (GoBGP) as the
//! upstream router.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use tenet::bgp::{BgpSpeaker, BirdOptions, PeerType, SpeakerConfig};
use tenet::ipam::{AutoAssignArgs, Ipam};
use tenet::net::routed::{self, RoutedWorkloadSpec};
use tenet::net::sysctl;
use tenet::store::Datastore;
use tenet::testbed::{EtcdServer, Fabric, Host, Netns};

const POOL_V4: &str = "10.65.0.0/16";
const POOL_V6: &str = "fd10::/64";
/// Long enough for BIRD's 2 s scans and a session set-up; a failure here is a real one.
const CONVERGE: Duration = Duration::from_secs(30);

fn options() -> BirdOptions {
    BirdOptions {
        hold_time: Duration::from_secs(6),
        keepalive_time: Duration::from_secs(2),
        graceful_restart: None,
        connect_retry: Duration::from_secs(1),
        ..BirdOptions::default()
    }
}

fn v6_of(host: &Host) -> Ipv6Addr {
    format!("fd00:254::{}", host.ip().octets()[3])
        .parse()
        .unwrap()
}

struct Node {
    name: String,
    host: Host,
    speaker: Option<BgpSpeaker>,
    config: SpeakerConfig,
}

/// Kills every BIRD the test started if it fails halfway (a dropped speaker leaves BIRD
/// running on purpose, for the next agent to adopt).
struct Reaper(Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

async fn start_node(
    store: &Arc<dyn Datastore>,
    fabric: &Fabric,
    dir: &Path,
    name: &str,
    reaper: &mut Reaper,
) -> Node {
    let host = fabric.add_host(name).await.unwrap();
    sysctl::write_all(Some(&host.path()), &routed::host_sysctls()).unwrap();
    host.run(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{}/64", v6_of(&host)),
        "dev",
        "eth0",
        "nodad",
    ])
    .unwrap();
    let mut config = SpeakerConfig::new(name, host.ip(), dir.join(name));
    config.ip_v6 = Some(v6_of(&host));
    config.netns = Some(host.path());
    config.options = options();
    let speaker = BgpSpeaker::start(store.clone(), config.clone())
        .await
        .unwrap();
    reaper.0.extend(speaker.daemon().and_then(|d| d.pid()));
    Node {
        name: name.into(),
        host,
        speaker: Some(speaker),
        config,
    }
}

/// A workload namespace on `node`, routed, with the given addresses.
async fn workload(node: &Node, label: &str, addrs: &[IpAddr]) -> Netns {
    let ns = Netns::create(label).unwrap();
    let spec = RoutedWorkloadSpec {
        host_ifname: format!("tvr_{label}"),
        workload_ifname: "eth0".into(),
        addresses: addrs
            .iter()
            .map(|a| IpNetwork::new(*a, if a.is_ipv4() { 32 } else { 128 }).unwrap())
            .collect(),
        mtu: None,
    };
    routed::attach_workload(
        node.host.netlink(),
        Some(&node.host.path()),
        &ns.path(),
        &spec,
    )
    .await
    .unwrap();
    ns
}

fn ping(ns: &Netns, dst: IpAddr) -> bool {
    ns.command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "2", "-q"])
        .arg(dst.to_string())
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `ip route show proto bird` in the host: the routes BIRD put in its kernel.
fn bird_routes(host: &Host, v6: bool) -> String {
    let family = if v6 { "-6" } else { "-4" };
    host.run(&["ip", family, "route", "show", "proto", "bird"])
        .unwrap()
}

/// Polls `check` until it holds or `CONVERGE` has passed; returns how long it took.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < CONVERGE,
            "not within {CONVERGE:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

fn has_route(host: &Host, dst: &str, via: IpAddr) -> bool {
    let v6 = via.is_ipv6();
    bird_routes(host, v6)
        .lines()
        .any(|l| l.starts_with(&format!("{dst} ")) && l.contains(&format!("via {via} ")))
}

async fn established(node: &Node) -> Vec<(PeerType, IpAddr, bool)> {
    let Some(speaker) = &node.speaker else {
        return Vec::new();
    };
    let mut control = speaker.control().await.unwrap();
    control
        .protocols()
        .await
        .unwrap()
        .iter()
        .filter_map(|p| p.peer().map(|(t, ip)| (t, ip, p.established())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_routed_hosts_exchange_blocks_by_bgp() {
    let etcd = EtcdServer::start().await.unwrap();
    let store: Arc<dyn Datastore> = Arc::new(etcd.store().await.unwrap());
    let ipam = Ipam::new(store.clone());
    ipam.create_pool(POOL_V4.parse().unwrap(), false)
        .await
        .unwrap();
    ipam.create_pool(POOL_V6.parse().unwrap(), false)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fabric = Fabric::new().await.unwrap();
    let mut reaper = Reaper(Vec::new());
    // The upstream router. The hosts' default route points at it, as a compute host's
    // would: proxy ARP answers for the workloads' gateway 169.254.1.1 only when the host
    // has a route to it.
    let router = fabric.add_host("rtr").await.unwrap();
    let mut nodes = Vec::new();
    for name in ["rt1", "rt2", "rt3"] {
        let node = start_node(&store, &fabric, dir.path(), name, &mut reaper).await;
        node.host
            .run(&[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &router.ip().to_string(),
            ])
            .unwrap();
        nodes.push(node);
    }

    // One dual-stack workload per host, addressed by IPAM: each host claims a block.
    let mut wls = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let (v4, v6) = ipam
            .auto_assign(&AutoAssignArgs {
                num_v4: 1,
                num_v6: 1,
                handle: Some(format!("w{i}")),
                host: node.name.clone(),
                ..AutoAssignArgs::default()
            })
            .await
            .unwrap();
        let ns = workload(node, &format!("w{i}"), &[v4[0], v6[0]]).await;
        wls.push((ns, v4[0], v6[0]));
    }
    let blocks: Vec<(String, String)> = {
        let mut b = Vec::new();
        for node in &nodes {
            let v4 = ipam.affine_blocks(&node.name, true).await.unwrap();
            let v6 = ipam.affine_blocks(&node.name, false).await.unwrap();
            assert_eq!(
                (v4.len(), v6.len()),
                (1, 1),
                "{} claimed one block each",
                node.name
            );
            b.push((v4[0].to_string(), v6[0].to_string()));
        }
        b
    };

    // Every host learns every other host's blocks, v4 and v6, next hop the owner.
    for (i, node) in nodes.iter().enumerate() {
        for (j, other) in nodes.iter().enumerate() {
            if i == j {
                continue;
            }
            let (b4, b6) = &blocks[j];
            eventually(
                &format!("{} learns {b4} from {}", node.name, other.name),
                || has_route(&node.host, b4, IpAddr::V4(other.host.ip())),
            )
            .await;
            eventually(
                &format!("{} learns {b6} from {}", node.name, other.name),
                || has_route(&node.host, b6, IpAddr::V6(v6_of(&other.host))),
            )
            .await;
        }
    }
    // The mesh as `node status` reads it: two v4 and two v6 mesh peers, all Established.
    for node in &nodes {
        let peers = established(node).await;
        assert_eq!(peers.len(), 4, "{}: {peers:?}", node.name);
        assert!(
            peers.iter().all(|(t, _, up)| *t == PeerType::Mesh && *up),
            "{}: {peers:?}",
            node.name
        );
    }
    // `tenet node status` prints the same sessions as calicoctl's table.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenet"))
        .args(["node", "status", "--socket"])
        .arg(nodes[0].config.control_socket())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("IPv4 BGP status") && text.contains("IPv6 BGP status"),
        "{text}"
    );
    for peer in ["10.254.0.3", "10.254.0.4", "fd00:254::3", "fd00:254::4"] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("| {peer} "))
                && l.contains("node-to-node mesh")
                && l.contains("Established")),
            "{peer} in\n{text}"
        );
    }

    // Traffic: each workload reaches the others over IPv4 and IPv6.
    for (i, (ns, _, _)) in wls.iter().enumerate() {
        for (j, (_, v4, v6)) in wls.iter().enumerate() {
            if i != j {
                assert!(ping(ns, *v4), "w{i} → w{j} {v4}");
                assert!(ping(ns, *v6), "w{i} → w{j} {v6}");
            }
        }
    }

    // Policy on routed interfaces (Felix's routed hook, `-i tvr_+`): w0 on host 1 admits
    // only w2; w1's ping must fail, w2's must succeed.
    policy_on_routed_interfaces(&store, &nodes[0], &wls).await;

    // A block claimed on host 1 appears on hosts 2 and 3 without restarting anything;
    // releasing it withdraws it.
    let extra: IpNetwork = "10.65.200.0/26".parse().unwrap();
    ipam.claim_affinity(extra, "rt1").await.unwrap();
    for node in &nodes[1..] {
        eventually(&format!("{} learns the new block", node.name), || {
            has_route(&node.host, "10.65.200.0/26", IpAddr::V4(nodes[0].host.ip()))
        })
        .await;
    }
    ipam.release_affinity(extra, "rt1").await.unwrap();
    for node in &nodes[1..] {
        eventually(&format!("{} forgets the released block", node.name), || {
            !bird_routes(&node.host, false).contains("10.65.200.0/26")
        })
        .await;
    }

    // A borrowed address: host 2 runs a workload with an address from host 1's block. Host 2
    // announces the /32; hosts 1 and 3 route it to host 2, past host 1's aggregate.
    let base: IpNetwork = blocks[0].0.parse().unwrap();
    let IpAddr::V4(first) = base.ip() else {
        unreachable!()
    };
    let borrowed = IpAddr::V4(Ipv4Addr::from(u32::from(first) + 40));
    ipam.assign_ip(borrowed, Some("borrowed"), Default::default(), "rt2")
        .await
        .unwrap();
    let lender = workload(&nodes[1], "wb", &[borrowed]).await;
    for k in [0, 2] {
        eventually(
            &format!("{} routes the borrowed {borrowed} to rt2", nodes[k].name),
            || {
                has_route(
                    &nodes[k].host,
                    &borrowed.to_string(),
                    IpAddr::V4(nodes[1].host.ip()),
                )
            },
        )
        .await;
    }
    assert!(
        ping(&wls[0].0, borrowed),
        "w0 (owner of the block) → borrowed"
    );
    assert!(ping(&lender, wls[2].1), "borrowed → w2");

    // An independent BGP speaker (GoBGP) as the upstream router, configured as a global
    // peer, learns exactly the pools' routes: the aggregates and the borrowed /32, not a
    // route of host 1 outside the pools.
    nodes[0]
        .host
        .run(&[
            "ip",
            "route",
            "add",
            "blackhole",
            "192.0.2.0/24",
            "proto",
            "boot",
        ])
        .unwrap();
    let gobgp = GoBgp::start(&router, dir.path(), &nodes);
    reaper.0.push(gobgp.pid());
    store
        .put(
            &format!("/calico/bgp/v1/global/peer_v4/{}", router.ip()),
            format!(r#"{{"ip":"{}","as_num":"65000"}}"#, router.ip()).as_bytes(),
        )
        .await
        .unwrap();
    let mut expected: Vec<String> = blocks.iter().map(|(b4, _)| b4.clone()).collect();
    expected.push(format!("{borrowed}/32"));
    expected.sort();
    let mut learned = Vec::new();
    eventually("GoBGP learns the pools' routes", || {
        learned = gobgp.prefixes(&router);
        learned == expected
    })
    .await;
    for node in &nodes {
        let want = (PeerType::Global, IpAddr::V4(router.ip()), true);
        let start = Instant::now();
        while !established(node).await.contains(&want) {
            assert!(
                start.elapsed() < CONVERGE,
                "{}: {:?}",
                node.name,
                established(node).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Host 3 goes down: its BIRD stops; the others withdraw its block. It comes back and
    // the routes return.
    let (b3, _) = blocks[2].clone();
    let via3 = IpAddr::V4(nodes[2].host.ip());
    nodes[2].speaker.take().unwrap().stop().await;
    for node in &nodes[..2] {
        eventually(&format!("{} withdraws rt3's block", node.name), || {
            !has_route(&node.host, &b3, via3)
        })
        .await;
    }
    let again = BgpSpeaker::start(store.clone(), nodes[2].config.clone())
        .await
        .unwrap();
    reaper.0.extend(again.daemon().and_then(|d| d.pid()));
    nodes[2].speaker = Some(again);
    for node in &nodes[..2] {
        eventually(&format!("{} relearns rt3's block", node.name), || {
            has_route(&node.host, &b3, via3)
        })
        .await;
    }
    // Host 3's link goes down: no notification this time; the hold timer (6 s) expires.
    nodes[2]
        .host
        .run(&["ip", "link", "set", "eth0", "down"])
        .unwrap();
    for node in &nodes[..2] {
        eventually(
            &format!("{} drops rt3's block on hold-timer expiry", node.name),
            || !has_route(&node.host, &b3, via3),
        )
        .await;
    }
    nodes[2]
        .host
        .run(&["ip", "link", "set", "eth0", "up"])
        .unwrap();
    for node in &nodes[..2] {
        eventually(
            &format!("{} relearns rt3's block after the link returns", node.name),
            || has_route(&node.host, &b3, via3),
        )
        .await;
    }
    assert!(ping(&wls[0].0, wls[2].1), "w0 → w2 after rt3 came back");

    gobgp.stop();
    for node in &mut nodes {
        if let Some(s) = node.speaker.take() {
            s.stop().await;
        }
    }
    reaper.0.clear();
}

#[tokio::test]
async fn checksystem_reports_what_this_kernel_offers() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenet"))
        .args(["node", "checksystem"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for feature in [
        "bridge",
        "veth",
        "tap (/dev/net/tun)",
        "proxy ARP (routed mode)",
        "iptables",
        "ipset",
    ] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(feature) && l.contains("OK")),
            "{feature} in\n{text}"
        );
    }
    // This kernel has no GRE module: that is a warning (the eBPF datapath takes over), not a
    // failure; and the eBPF datapath's programs load here.
    assert!(
        text.lines()
            .any(|l| l.contains("gretap") && (l.contains("OK") || l.contains("WARN")))
    );
    assert!(
        text.lines()
            .any(|l| l.contains("eBPF GRE datapath") && l.contains("OK")),
        "{text}"
    );
    assert!(text.contains("System meets minimum system requirements to run tenet!"));
}

async fn policy_on_routed_interfaces(
    store: &Arc<dyn Datastore>,
    node: &Node,
    wls: &[(Netns, IpAddr, IpAddr)],
) {
    use tenet::calico::{CalicoKey, WorkloadEndpoint, WorkloadEndpointId};
    use tenet::policy::calc::CalcConfig;
    use tenet::policy::render::WorkloadHook;
    use tenet::policy::sync::{self, PolicyConfig};

    let profile = "/calico/v1/policy/profile/only-w2";
    let (w0_v4, w2_v4) = (wls[0].1, wls[2].1);
    store
        .put(&format!("{profile}/labels"), b"{}")
        .await
        .unwrap();
    store
        .put(
            &format!("{profile}/rules"),
            format!(
                r#"{{"inbound_rules":[{{"action":"allow","src_net":"{w2_v4}/32"}}],"outbound_rules":[{{"action":"allow"}}]}}"#
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    store.put(&format!("{profile}/tags"), b"[]").await.unwrap();
    let endpoint = WorkloadEndpoint {
        state: "active".into(),
        name: "tvr_w0".into(),
        active_instance_id: String::new(),
        mac: None,
        profile_ids: vec!["only-w2".into()],
        ipv4_nets: vec![IpNetwork::new(w0_v4, 32).unwrap()],
        ipv6_nets: vec![],
        ipv4_nat: vec![],
        ipv6_nat: vec![],
        labels: Default::default(),
        ipv4_gateway: None,
        ipv6_gateway: None,
    };
    let key = CalicoKey::WorkloadEndpoint(WorkloadEndpointId {
        host: node.name.clone(),
        orchestrator: "test".into(),
        workload: "w0".into(),
        endpoint: "eth0".into(),
    })
    .path();
    let rev = store
        .put(&key, &serde_json::to_vec(&endpoint).unwrap())
        .await
        .unwrap();
    let mut policy = sync::spawn(
        store.clone(),
        PolicyConfig {
            calc: CalcConfig {
                hostname: node.name.clone(),
                scope_label: None,
            },
            hook: WorkloadHook::Routed {
                prefixes: vec!["tvr_".into()],
            },
            netns: Some(node.host.path()),
            iptables: None,
            resync: Duration::from_secs(30),
            report: Duration::from_secs(30),
            observe: None,
        },
    )
    .await
    .unwrap();
    policy.wait_applied(rev).await;
    assert!(ping(&wls[2].0, w0_v4), "w2 → w0 is allowed");
    assert!(!ping(&wls[1].0, w0_v4), "w1 → w0 is denied");
    policy.stop().await.unwrap();
    store.delete(&key, None).await.unwrap();
    assert!(
        ping(&wls[1].0, w0_v4),
        "w1 → w0 again once the rules are gone"
    );
}

/// GoBGP's daemon in the router namespace, peering with every host.
struct GoBgp {
    child: std::process::Child,
    api: String,
}

impl GoBgp {
    fn start(router: &Host, dir: &Path, nodes: &[Node]) -> GoBgp {
        let mut conf = format!(
            "[global.config]\n  as = 65000\n  router-id = \"{}\"\n",
            router.ip()
        );
        for node in nodes {
            conf.push_str(&format!(
                "\n[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{}\"\n    peer-as = 64512\n",
                node.host.ip()
            ));
        }
        let file = dir.join("gobgpd.toml");
        std::fs::write(&file, conf).unwrap();
        let api = "127.0.0.1:50051".to_string();
        let log = std::fs::File::create(dir.join("gobgpd.log")).unwrap();
        let child = router
            .netns()
            .command("gobgpd")
            .args(["-f", file.to_str().unwrap(), "--api-hosts", &api])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("gobgpd (Debian package gobgpd) runs");
        GoBgp { child, api }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The IPv4 prefixes in GoBGP's global RIB, sorted.
    fn prefixes(&self, router: &Host) -> Vec<String> {
        let (host, port) = self.api.split_once(':').unwrap();
        let Ok(out) = router.run(&[
            "gobgp", "-u", host, "-p", port, "global", "rib", "-a", "ipv4", "-j",
        ]) else {
            return Vec::new();
        };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&out) else {
            return Vec::new();
        };
        let mut prefixes: Vec<String> = json
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        prefixes.sort();
        prefixes
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
