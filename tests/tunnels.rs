//! Tunnels between two lab hosts, proven by traffic: the user-space GRE datapath (ping, a
//! 100 MB transfer, tenant isolation, what the wire carries, restart, drops) and kernel VXLAN.

mod common;

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::{ip, tcp_transfer, wait_until};
use ipnetwork::Ipv4Network;
use tenet::net::tunnel::{
    BackendChoice, TunnelBackend, TunnelKind, TunnelSpec, UserspaceGre, backend,
    kernel_supports_gretap,
};
use tenet::net::{NetError, NewLink};
use tenet::testbed::{Fabric, Host, Workload};
use tenet::types::TunnelKey;

/// One tenant subnet on one host: a bridge, a tunnel to the peer host and a workload.
struct TenantEnd {
    workload: Workload,
}

async fn tenant_end(
    host: &Host,
    tunnels: &dyn TunnelBackend,
    tag: &str,
    key: u32,
    peer: Ipv4Addr,
    workload_ip: &str,
) -> TenantEnd {
    tenant_end_with_ttl(host, tunnels, tag, key, peer, workload_ip, None).await
}

async fn tenant_end_with_ttl(
    host: &Host,
    tunnels: &dyn TunnelBackend,
    tag: &str,
    key: u32,
    peer: Ipv4Addr,
    workload_ip: &str,
    ttl: Option<u8>,
) -> TenantEnd {
    let nl = host.netlink();
    let bridge = nl
        .create(&NewLink::bridge(format!("br-{tag}")).up())
        .await
        .unwrap();
    let mut spec = TunnelSpec::new(
        format!("tun-{tag}"),
        TunnelKey::new(key).unwrap(),
        host.ip(),
        peer,
    );
    spec.ttl = ttl;
    let tunnel = tunnels.create(&spec).await.unwrap();
    nl.enslave(tunnel.index, bridge.index).await.unwrap();
    let addr: Ipv4Network = format!("{workload_ip}/24").parse().unwrap();
    let workload = host
        .add_workload(
            &format!("wl{tag}"),
            &format!("v-{tag}"),
            bridge.index,
            addr,
            tunnel.mtu,
        )
        .await
        .unwrap();
    TenantEnd { workload }
}

async fn lab() -> (Fabric, Host, Host) {
    let fabric = Fabric::new().await.unwrap();
    let a = fabric.add_host("ha").await.unwrap();
    let b = fabric.add_host("hb").await.unwrap();
    (fabric, a, b)
}

/// The backend `choice` in `host`'s namespace.
async fn gre(host: &Host, choice: BackendChoice) -> Arc<dyn TunnelBackend> {
    backend(choice, host.netlink().clone(), Some(host.path()))
        .await
        .unwrap()
}

async fn userspace(host: &Host) -> UserspaceGre {
    UserspaceGre::start(host.netlink().clone(), Some(host.path()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_gre_carries_two_isolated_tenants_with_the_same_subnet() {
    two_isolated_tenants_with_the_same_subnet(BackendChoice::Userspace, "tun").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_gre_carries_two_isolated_tenants_with_the_same_subnet() {
    two_isolated_tenants_with_the_same_subnet(BackendChoice::Ebpf, "veth").await;
}

async fn two_isolated_tenants_with_the_same_subnet(choice: BackendChoice, port_kind: &str) {
    let (_fabric, a, b) = lab().await;
    let (ga, gb) = (gre(&a, choice).await, gre(&b, choice).await);
    // Tenant 1 and tenant 2 both use 10.1.0.0/24; only the tunnel key tells them apart.
    let t1a = tenant_end(&a, &*ga, "t1", 1001, b.ip(), "10.1.0.2").await;
    let t1b = tenant_end(&b, &*gb, "t1", 1001, a.ip(), "10.1.0.3").await;
    let t2a = tenant_end(&a, &*ga, "t2", 1002, b.ip(), "10.1.0.4").await;
    let t2b = tenant_end(&b, &*gb, "t2", 1002, a.ip(), "10.1.0.5").await;

    // The tunnel MTU is derived from the underlay: 1500 - 42.
    let tun = a.netlink().link_by_name("tun-t1").await.unwrap().unwrap();
    assert_eq!(tun.mtu, 1458);
    assert_eq!(tun.kind.as_deref(), Some(port_kind));

    assert!(t1a.workload.ping(ip("10.1.0.3"), 3), "tenant 1: a → b");
    assert!(t1b.workload.ping(ip("10.1.0.2"), 3), "tenant 1: b → a");
    assert!(t2a.workload.ping(ip("10.1.0.5"), 3), "tenant 2: a → b");
    assert!(t2b.workload.ping(ip("10.1.0.4"), 3), "tenant 2: b → a");
    // Isolation: tenant 2 cannot reach tenant 1's workloads across the tunnel, nor the reverse.
    assert!(
        !t2a.workload.ping(ip("10.1.0.3"), 2),
        "tenant 2 reached tenant 1"
    );
    assert!(
        !t1b.workload.ping(ip("10.1.0.4"), 2),
        "tenant 1 reached tenant 2"
    );

    // 100 MB over the tunnel, the same bytes at both ends.
    let (sent, received, len) = tcp_transfer(&t1a.workload, &t1b.workload, 100 << 20);
    assert_eq!(len, 100 << 20);
    assert_eq!(sent, received, "checksum differs");

    let stats = ga.stats().unwrap();
    let t1 = stats
        .tunnels
        .iter()
        .find(|t| t.endpoint.name == "tun-t1")
        .unwrap();
    assert!(t1.tx_bytes > 100 << 20, "{t1:?}");
    assert_eq!(stats.malformed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wire_carries_keyed_gre_with_ethernet_inside() {
    wire_carries_keyed_gre_with_ethernet_inside(BackendChoice::Userspace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ebpf_wire_carries_keyed_gre_with_ethernet_inside() {
    wire_carries_keyed_gre_with_ethernet_inside(BackendChoice::Ebpf).await;
}

async fn wire_carries_keyed_gre_with_ethernet_inside(choice: BackendChoice) {
    let (_fabric, a, b) = lab().await;
    let (ga, gb) = (gre(&a, choice).await, gre(&b, choice).await);
    let ta = tenant_end(&a, &*ga, "w", 4268, b.ip(), "172.16.0.2").await;
    let _tb = tenant_end(&b, &*gb, "w", 4268, a.ip(), "172.16.0.3").await;

    let cap = Capture::start(a.command("timeout"), "eth0", 6, &["proto", "gre"]);
    assert!(ta.workload.ping(ip("172.16.0.3"), 4));
    let text = cap.text();
    // 172.16.0.0 → key 4268 = 0x10ac, TEB carrying an Ethernet frame with IPv4/ICMP inside.
    assert!(text.contains("proto GRE (47)"), "{text}");
    assert!(
        text.contains("GREv0, Flags [key present], key=0x10ac"),
        "{text}"
    );
    assert!(text.contains("ethertype IPv4 (0x0800)"), "{text}");
    assert!(
        text.contains("172.16.0.2 > 172.16.0.3: ICMP echo request"),
        "{text}"
    );
    assert!(
        text.contains("172.16.0.3 > 172.16.0.2: ICMP echo reply"),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} > {}: GREv0", a.ip(), b.ip())),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vxlan_connects_and_isolates_the_same_way() {
    let (_fabric, a, b) = lab().await;
    let va = backend(BackendChoice::Vxlan, a.netlink().clone(), None)
        .await
        .unwrap();
    let vb = backend(BackendChoice::Vxlan, b.netlink().clone(), None)
        .await
        .unwrap();
    assert_eq!(va.kind(), TunnelKind::Vxlan);
    let t1a = tenant_end(&a, va.as_ref(), "x1", 1001, b.ip(), "10.1.0.2").await;
    let t1b = tenant_end(&b, vb.as_ref(), "x1", 1001, a.ip(), "10.1.0.3").await;
    let t2a = tenant_end(&a, va.as_ref(), "x2", 1002, b.ip(), "10.1.0.4").await;
    let _t2b = tenant_end(&b, vb.as_ref(), "x2", 1002, a.ip(), "10.1.0.5").await;
    let tun = a.netlink().link_by_name("tun-x1").await.unwrap().unwrap();
    assert_eq!((tun.kind.as_deref(), tun.mtu), (Some("vxlan"), 1450));
    let d = a.run(&["ip", "-d", "link", "show", "tun-x1"]).unwrap();
    assert!(
        d.contains(&format!("vxlan id 1001 remote {} local {}", b.ip(), a.ip())),
        "{d}"
    );

    assert!(t1a.workload.ping(ip("10.1.0.3"), 3));
    assert!(t1b.workload.ping(ip("10.1.0.2"), 3));
    assert!(t2a.workload.ping(ip("10.1.0.5"), 3));
    assert!(
        !t2a.workload.ping(ip("10.1.0.3"), 2),
        "VNI 1002 reached VNI 1001"
    );
    let (sent, received, len) = tcp_transfer(&t1a.workload, &t1b.workload, 100 << 20);
    assert_eq!((len, sent), (100 << 20, received));

    // Found again by alias, e.g. after an agent restart.
    let found = va.tunnels().await.unwrap();
    let mut names: Vec<_> = found.iter().map(|(s, _)| s.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["tun-x1", "tun-x2"]);
    va.delete("tun-x1").await.unwrap();
    va.delete("tun-x1").await.unwrap();
    assert!(a.netlink().link_by_name("tun-x1").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_engine_keeps_the_taps_and_traffic_resumes() {
    let (_fabric, a, b) = lab().await;
    let ga = userspace(&a).await;
    let gb = userspace(&b).await;
    let ta = tenant_end(&a, &ga, "r", 1001, b.ip(), "10.1.0.2").await;
    let _tb = tenant_end(&b, &gb, "r", 1001, a.ip(), "10.1.0.3").await;
    assert!(ta.workload.ping(ip("10.1.0.3"), 2));

    let before = a.netlink().link_by_name("tun-r").await.unwrap().unwrap();
    ga.stop();
    // The tap is still there, still enslaved, still carrying its identity.
    let after = a.netlink().link_by_name("tun-r").await.unwrap().unwrap();
    assert_eq!(
        (after.index, after.controller, &after.alias),
        (before.index, before.controller, &before.alias)
    );
    assert!(
        !ta.workload.ping(ip("10.1.0.3"), 2),
        "no engine, no traffic"
    );

    let ga = userspace(&a).await;
    assert_eq!(ga.engine().endpoints().len(), 1, "the tap was adopted");
    assert!(ta.workload.ping(ip("10.1.0.3"), 3), "traffic resumed");
    recreating_is_idempotent_and_another_identity_is_refused(&ga, &a, &b, before.index).await;
    assert!(ta.workload.ping(ip("10.1.0.3"), 1));
}

/// After adoption: creating tunnel `tun-r` again returns the adopted link; another identity
/// under the same name is refused and the link is left alone.
async fn recreating_is_idempotent_and_another_identity_is_refused(
    tunnels: &dyn TunnelBackend,
    a: &Host,
    b: &Host,
    index: u32,
) {
    let spec = |key| TunnelSpec::new("tun-r", TunnelKey::new(key).unwrap(), a.ip(), b.ip());
    assert_eq!(tunnels.create(&spec(1001)).await.unwrap().index, index);
    let err = tunnels.create(&spec(7)).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("already exists and is not this tunnel"),
        "{err}"
    );
    assert_eq!(
        a.netlink()
            .link_by_name("tun-r")
            .await
            .unwrap()
            .unwrap()
            .index,
        index
    );
}

/// Sends one raw GRE packet (`gre` = GRE header + payload) from inside `host` to `dst`.
fn send_raw(host: &Host, dst: Ipv4Addr, gre: Vec<u8>) {
    send_raw_with_tos(host, dst, gre, 0);
}

/// Sends one raw IP packet of `protocol` from inside `host` to `dst` with outer TOS `tos`.
fn send_ip(host: &Host, dst: Ipv4Addr, protocol: i32, payload: Vec<u8>, tos: u32) {
    host.enter(move || {
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(protocol)),
        )
        .map_err(|e| NetError::new("open", "raw socket", e))?;
        s.set_tos_v4(tos)
            .map_err(|e| NetError::new("set TOS of", "raw socket", e))?;
        s.send_to(&payload, &std::net::SocketAddr::from((dst, 0)).into())
            .map_err(|e| NetError::new("send", "raw IP", e))?;
        Ok(())
    })
    .unwrap();
}

fn send_raw_with_tos(host: &Host, dst: Ipv4Addr, gre: Vec<u8>, tos: u32) {
    send_ip(host, dst, 47, gre, tos);
}

/// A running `tcpdump -v -c count` (with a time limit), started only once it listens.
struct Capture(std::process::Child);

impl Capture {
    fn start(mut cmd: std::process::Command, iface: &str, count: u32, filter: &[&str]) -> Self {
        let mut child = cmd
            .args(["10", "tcpdump", "-i", iface, "-nn", "-e", "-v", "-l", "-c"])
            .arg(count.to_string())
            .args(filter)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        assert!(line.contains("listening on"), "{line}");
        Capture(child)
    }

    fn text(self) -> String {
        let out = self.0.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn frame() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[2, 0, 0, 0, 0, 9, 0x08, 0x06]);
    f.extend_from_slice(&[0; 28]);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_unknown_peers_and_garbage_are_counted_and_dropped() {
    bad_keys_unknown_peers_and_garbage(BackendChoice::Userspace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_counts_and_drops_bad_keys_unknown_peers_and_garbage() {
    bad_keys_unknown_peers_and_garbage(BackendChoice::Ebpf).await;
}

async fn bad_keys_unknown_peers_and_garbage(choice: BackendChoice) {
    let fabric = Fabric::new().await.unwrap();
    let a = fabric.add_host("ha").await.unwrap();
    let b = fabric.add_host("hb").await.unwrap();
    let intruder = fabric.add_host("hx").await.unwrap();
    let gb = gre(&b, choice).await;
    let _tb = tenant_end(&b, &*gb, "d", 1001, a.ip(), "10.1.0.3").await;

    let keyed = |key: u32| {
        let mut p = vec![0x20, 0, 0x65, 0x58];
        p.extend_from_slice(&key.to_be_bytes());
        p.extend_from_slice(&frame());
        p
    };
    for _ in 0..3 {
        send_raw(&a, b.ip(), keyed(999)); // known peer, wrong key
    }
    send_raw(&a, b.ip(), [&[0u8, 0, 0x65, 0x58][..], &frame()].concat()); // no key
    for _ in 0..2 {
        send_raw(&intruder, b.ip(), keyed(1001)); // right key, unknown peer
    }
    send_raw(
        &a,
        b.ip(),
        [&[0x20u8, 0, 0x08, 0x00, 0, 0, 3, 0xe9][..], &frame()].concat(),
    ); // not Ethernet
    send_raw(&a, b.ip(), vec![0x20, 0, 0x65, 0x58, 0, 0]); // truncated
    send_raw(
        &a,
        b.ip(),
        [&[0x00u8, 1, 0x65, 0x58][..], &frame()].concat(),
    ); // GRE version 1

    let want = |s: &tenet::net::tunnel::userspace::EngineStats| {
        (s.unknown_key, s.unknown_peer, s.malformed) == (4, 2, 3)
    };
    assert!(
        wait_until(Duration::from_secs(5), || want(&gb.stats().unwrap())),
        "{:?}",
        gb.stats()
    );
    let t = &gb.stats().unwrap().tunnels[0];
    assert_eq!(t.rx_packets, 0, "nothing reached the tenant");

    // A well-formed packet from the real peer does get through.
    send_raw(&a, b.ip(), keyed(1001));
    assert!(wait_until(Duration::from_secs(5), || gb
        .stats()
        .unwrap()
        .tunnels[0]
        .rx_packets
        == 1));
}

#[tokio::test]
async fn auto_falls_back_to_ebpf_on_a_kernel_without_gre() {
    let fabric = Fabric::new().await.unwrap();
    let a = fabric.add_host("ha").await.unwrap();
    assert!(!kernel_supports_gretap(a.netlink()).await.unwrap());
    let chosen = backend(BackendChoice::Auto, a.netlink().clone(), Some(a.path()))
        .await
        .unwrap();
    // This kernel has no ip_gre but runs tc BPF programs (and the setup installs clang, so
    // tenet carries them): the eBPF datapath.
    assert!(
        tenet::net::tunnel::ebpf_supported(),
        "built with clang, and this kernel loads the programs"
    );
    assert_eq!(chosen.kind(), TunnelKind::EbpfGre);
    // The probe left nothing behind.
    let links: Vec<_> = a
        .netlink()
        .links()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(links, ["lo", "eth0"]);

    // Asking for the kernel backend explicitly gives the kernel's answer, clearly.
    let kernel = backend(BackendChoice::Kernel, a.netlink().clone(), None)
        .await
        .unwrap();
    let spec = TunnelSpec::new(
        "gt1",
        TunnelKey::new(4268).unwrap(),
        a.ip(),
        ip("10.254.0.9"),
    );
    let err = kernel.create(&spec).await.unwrap_err();
    assert!(err.is_unsupported(), "{err}");
    assert!(err.to_string().starts_with("create gretap gt1: "), "{err}");
    assert!(a.netlink().link_by_name("gt1").await.unwrap().is_none());
    let _: Arc<dyn TunnelBackend> = kernel;
}

/// Extracts the bytes of the first RTM_NEWLINK `sendmsg` from `strace -e write=all` output.
fn first_newlink_bytes(trace: &str) -> Vec<u8> {
    let mut lines = trace
        .lines()
        .skip_while(|l| !(l.starts_with("sendmsg(") && l.contains("RTM_NEWLINK")));
    lines.next().expect("no RTM_NEWLINK sendmsg in the trace");
    let mut bytes = Vec::new();
    // " * 172 bytes in buffer 0", then the hex dump lines.
    let dump = lines
        .skip_while(|l| l.starts_with(" * "))
        .take_while(|l| l.starts_with(" | "));
    for l in dump {
        // " | 00000  ac 00 00 00 ...  ascii |": 16 hex bytes after the offset.
        let hex = &l[10..l.len().min(10 + 16 * 3 + 1)];
        bytes.extend(
            hex.split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).unwrap()),
        );
    }
    bytes
}

#[test]
fn kernel_gretap_request_matches_iproute2_attribute_by_attribute() {
    // The default (`ttl inherit`) and a fixed TTL.
    gretap_request_matches_iproute2(None);
    gretap_request_matches_iproute2(Some(17));
}

fn gretap_request_matches_iproute2(ttl: Option<u8>) {
    use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
    use rtnetlink::packet_route::RouteNetlinkMessage;
    use rtnetlink::packet_route::link::{LinkAttribute, LinkInfo};

    let ns = tenet::testbed::Netns::create("gre").unwrap();
    let out = ns
        .command("strace")
        .args([
            "-e",
            "trace=sendmsg",
            "-e",
            "write=all",
            "-o",
            "/dev/stderr",
        ])
        .args(["ip", "link", "add", "gt0", "type", "gretap"])
        .args([
            "local", "10.0.0.1", "remote", "10.0.0.2", "ikey", "4268", "okey", "4268",
        ])
        .args(
            ttl.map(|t| ["ttl".to_string(), t.to_string()])
                .iter()
                .flatten(),
        )
        .output()
        .unwrap();
    let trace = String::from_utf8_lossy(&out.stderr);
    assert!(
        trace.contains("Unknown device type"),
        "iproute2 is refused too: {trace}"
    );
    let mut theirs = first_newlink_bytes(&trace);

    let mut spec = TunnelSpec::new(
        "gt0",
        TunnelKey::new(4268).unwrap(),
        ip("10.0.0.1"),
        ip("10.0.0.2"),
    );
    spec.ttl = ttl;
    let req = tenet::net::new_link_request(&tenet::net::tunnel::gretap_link(&spec)).unwrap();
    let mut ours = vec![0u8; req.buffer_len()];
    req.serialize(&mut ours);

    let decode = |bytes: &[u8]| -> Vec<LinkAttribute> {
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes).unwrap();
        match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => l.attributes,
            other => panic!("not a NEWLINK: {other:?}"),
        }
    };
    let (a_ours, a_theirs) = (decode(&ours), decode(&theirs));
    let info = |attrs: &[LinkAttribute]| -> Vec<LinkInfo> {
        attrs
            .iter()
            .find_map(|a| match a {
                LinkAttribute::LinkInfo(i) => Some(i.clone()),
                _ => None,
            })
            .unwrap()
    };
    // IFLA_INFO_KIND and every IFLA_GRE_* attribute, in iproute2's order.
    assert_eq!(info(&a_ours), info(&a_theirs));
    assert_eq!(a_ours, a_theirs, "top-level attributes");
    // And the whole request byte for byte, once the sequence number is taken out, but for
    // one byte: netlink-packet-route sends IFLA_INFO_KIND "gretap" with its NUL (nla_len 11)
    // where iproute2 leaves the NUL out (nla_len 10); the padded size, and what the kernel's
    // nla_strcmp sees, are the same.
    assert_eq!(theirs.len(), ours.len());
    theirs[8..12].copy_from_slice(&ours[8..12]);
    let differ: Vec<(usize, u8, u8)> = (0..ours.len())
        .filter(|&i| ours[i] != theirs[i])
        .map(|i| (i, ours[i], theirs[i]))
        .collect();
    assert_eq!(
        differ,
        [(44, 11, 10)],
        "only the IFLA_INFO_KIND length may differ"
    );
    assert_eq!(&ours[48..54], b"gretap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outer_header_inherits_ttl_carries_ecn_and_keeps_df() {
    outer_header_inherits_ttl_carries_ecn_and_keeps_df(BackendChoice::Userspace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ebpf_outer_header_inherits_ttl_carries_ecn_and_keeps_df() {
    outer_header_inherits_ttl_carries_ecn_and_keeps_df(BackendChoice::Ebpf).await;
}

async fn outer_header_inherits_ttl_carries_ecn_and_keeps_df(choice: BackendChoice) {
    let (_fabric, a, b) = lab().await;
    let (ga, gb) = (gre(&a, choice).await, gre(&b, choice).await);
    let inherit = tenant_end(&a, &*ga, "i", 1001, b.ip(), "10.1.0.2").await;
    let _ib = tenant_end(&b, &*gb, "i", 1001, a.ip(), "10.1.0.3").await;
    let fixed = tenant_end_with_ttl(&a, &*ga, "f", 1002, b.ip(), "10.2.0.2", Some(99)).await;
    let _fb = tenant_end_with_ttl(&b, &*gb, "f", 1002, a.ip(), "10.2.0.3", Some(99)).await;
    // Neighbours first, so that the capture holds the pings only.
    assert!(inherit.workload.ping(ip("10.1.0.3"), 1));
    assert!(fixed.workload.ping(ip("10.2.0.3"), 1));

    // Outer from a, GRE, inner Ethernet carrying IPv4 (ip[40:2]) with ICMP (ip[51]): the
    // pings, not the workloads' IPv6 chatter.
    let filter = format!(
        "src host {} and proto gre and ip[40:2] = 0x0800 and ip[51] = 1",
        a.ip()
    );
    let cap = Capture::start(a.command("timeout"), "eth0", 3, &[&filter]);
    let ping = |w: &tenet::testbed::Workload, dst: &str, ttl: &str, tos: &str| {
        let ok =
            w.ns.command("ping")
                .args(["-c", "1", "-W", "2", "-t", ttl, "-Q", tos, dst])
                .output()
                .unwrap()
                .status
                .success();
        assert!(ok, "ping {dst} ttl {ttl} tos {tos}");
    };
    ping(&inherit.workload, "10.1.0.3", "17", "0x02"); // ECT(0)
    ping(&inherit.workload, "10.1.0.3", "33", "0x03"); // CE: ECT(0) outside
    ping(&fixed.workload, "10.2.0.3", "17", "0x01"); // fixed TTL 99, ECT(1)
    let text = cap.text();
    let outer: Vec<&str> = text.lines().filter(|l| l.contains("proto GRE")).collect();
    assert_eq!(outer.len(), 3, "{text}");
    // The TTL follows the inner packet, the ECN field too (CE becomes ECT(0)), DSCP stays 0
    // and every outer packet has DF, as kernel gretap's defaults (ttl inherit, pmtudisc).
    assert!(outer[0].contains("tos 0x2,ECT(0), ttl 17,"), "{text}");
    assert!(outer[1].contains("tos 0x2,ECT(0), ttl 33,"), "{text}");
    assert!(outer[2].contains("tos 0x1,ECT(1), ttl 99,"), "{text}");
    assert!(
        outer.iter().all(|l| l.contains("flags [DF]")),
        "DF on every outer packet: {text}"
    );
    // The alias records the fixed TTL, so that an adopting engine keeps it.
    let tun = a.netlink().link_by_name("tun-f").await.unwrap().unwrap();
    assert!(tun.alias.as_deref().unwrap().contains("ttl=99"), "{tun:?}");
    drop(ga);
    let ga = gre(&a, choice).await;
    let adopted = ga.stats().unwrap().tunnels;
    let f = adopted.iter().find(|t| t.endpoint.name == "tun-f").unwrap();
    assert_eq!(f.endpoint.ttl, Some(99));
}

/// An Ethernet frame with an IPv4/UDP packet (TOS `tos`) to `dst` port `port`.
fn udp_frame(dst: [u8; 4], tos: u8, port: u16) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[2, 0, 0, 0, 0, 9, 0x08, 0x00]);
    let mut ip = vec![0x45, tos, 0, 32, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 1, 0, 9];
    ip.extend_from_slice(&dst);
    let c = tenet::net::tunnel::userspace::wire::checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&5000u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&[0, 12, 0, 0]); // length 12, no checksum
    f.extend_from_slice(b"ecn!");
    f
}

fn keyed_gre(key: u32, frame: &[u8]) -> Vec<u8> {
    let mut p = vec![0x20, 0, 0x65, 0x58];
    p.extend_from_slice(&key.to_be_bytes());
    p.extend_from_slice(frame);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outer_congestion_mark_reaches_the_inner_packet_or_drops_it() {
    outer_congestion_mark(BackendChoice::Userspace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_passes_an_outer_congestion_mark_on_or_drops_the_packet() {
    outer_congestion_mark(BackendChoice::Ebpf).await;
}

async fn outer_congestion_mark(choice: BackendChoice) {
    let (_fabric, a, b) = lab().await;
    let ga = gre(&a, choice).await;
    let _ta = tenant_end(&a, &*ga, "n", 1001, b.ip(), "10.1.0.2").await;

    let cap = Capture::start(a.command("timeout"), "tun-n", 2, &["udp"]);
    let to = [10, 1, 0, 2];
    // ECT(0) inside, CE outside: delivered as CE.
    send_raw_with_tos(
        &b,
        a.ip(),
        keyed_gre(1001, &udp_frame(to, 0x02, 1111)),
        0x03,
    );
    // Not ECN-capable inside, CE outside: dropped (RFC 6040) and counted.
    send_raw_with_tos(
        &b,
        a.ip(),
        keyed_gre(1001, &udp_frame(to, 0x00, 2222)),
        0x03,
    );
    // Not ECN-capable inside, ECT(0) outside: delivered unchanged.
    send_raw_with_tos(
        &b,
        a.ip(),
        keyed_gre(1001, &udp_frame(to, 0x00, 3333)),
        0x02,
    );
    let text = cap.text();
    let lines: Vec<&str> = text.lines().collect();
    let line_of = |port: &str| lines.iter().position(|l| l.contains(port));
    let marked = line_of(".1111:").expect("the CE-marked packet arrived");
    assert!(lines[marked - 1].contains("tos 0x3,CE"), "{text}");
    let plain = line_of(".3333:").expect("the unmarked packet arrived");
    assert!(lines[plain - 1].contains("tos 0x0,"), "{text}");
    assert!(
        line_of(".2222:").is_none(),
        "the not-ECT packet was dropped: {text}"
    );

    let t = ga
        .stats()
        .unwrap()
        .tunnels
        .into_iter()
        .find(|t| t.endpoint.name == "tun-n")
        .unwrap();
    assert_eq!(
        (t.rx_packets, t.rx_ecn_marked, t.rx_ecn_dropped, t.rx_errors),
        (2, 1, 1, 1),
        "{t:?}"
    );

    // Operators see the same counters: `tenet tunnel stats` in the host's namespace, and
    // from outside it by namespace name (the eBPF datapath's are copied there every second).
    let tenet = env!("CARGO_BIN_EXE_tenet");
    let published = || {
        let out = a
            .command(tenet)
            .args(["tunnel", "stats", "-o", "json"])
            .output()
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        json[0]["tunnels"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["name"] == "tun-n").cloned())
            .is_some_and(|t| {
                (t["rx_ecn_dropped"].as_u64(), t["rx_packets"].as_u64()) == (Some(1), Some(2))
            })
    };
    assert!(wait_until(Duration::from_secs(5), published));
    let out = std::process::Command::new(tenet)
        .args(["tunnel", "stats", "--netns", a.netns().name()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(table.contains("ECN DROP"), "{table}");
    let row = table.lines().find(|l| l.contains("tun-n")).unwrap();
    assert!(row.contains(&b.ip().to_string()), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_too_big_for_the_path_is_answered_and_tcp_adapts() {
    frame_too_big_for_the_path(BackendChoice::Userspace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_answers_a_frame_too_big_for_the_path_and_tcp_adapts() {
    frame_too_big_for_the_path(BackendChoice::Ebpf).await;
}

async fn frame_too_big_for_the_path(choice: BackendChoice) {
    let (_fabric, a, b) = lab().await;
    let (ga, gb) = (gre(&a, choice).await, gre(&b, choice).await);
    let ta = tenant_end(&a, &*ga, "p", 1001, b.ip(), "10.1.0.2").await;
    let tb = tenant_end(&b, &*gb, "p", 1001, a.ip(), "10.1.0.3").await;
    assert!(ta.workload.ping(ip("10.1.0.3"), 1));

    // A router on the way reports that the path to b takes 1400 bytes: ICMP fragmentation
    // needed, quoting one of a's outer GRE packets (sent here from b's address).
    let mut quoted = vec![0x45, 0, 0x05, 0xbe, 0, 1, 0x40, 0, 64, 47, 0, 0];
    quoted.extend_from_slice(&a.ip().octets());
    quoted.extend_from_slice(&b.ip().octets());
    let c = tenet::net::tunnel::userspace::wire::checksum(&quoted);
    quoted[10..12].copy_from_slice(&c.to_be_bytes());
    quoted.extend_from_slice(&[0x20, 0, 0x65, 0x58, 0, 0, 0x03, 0xe9]);
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&1400u16.to_be_bytes());
    icmp.extend_from_slice(&quoted);
    let c = tenet::net::tunnel::userspace::wire::checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    send_ip(&b, a.ip(), 1, icmp, 0);
    assert!(
        wait_until(Duration::from_secs(5), || a
            .run(&["ip", "route", "get", &b.ip().to_string()])
            .is_ok_and(|r| r.contains("mtu 1400"))),
        "a's kernel learned the path MTU"
    );

    // A DF packet that no longer fits: its sender hears the tunnel MTU, 1400 - 42.
    let out = ta
        .workload
        .ns
        .command("ping")
        .args(["-c", "1", "-W", "2", "-M", "do", "-s", "1400", "10.1.0.3"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("mtu = 1358"), "{said}");
    let route = ta
        .workload
        .ns
        .run(&["ip", "route", "get", "10.1.0.3"])
        .unwrap();
    assert!(route.contains("mtu 1358"), "{route}");
    // What fits still goes through, and TCP works within the smaller MTU.
    assert!(
        ta.workload
            .ns
            .command("ping")
            .args(["-c", "1", "-W", "2", "-M", "do", "-s", "1300", "10.1.0.3"])
            .output()
            .unwrap()
            .status
            .success()
    );
    let (sent, received, len) = tcp_transfer(&ta.workload, &tb.workload, 8 << 20);
    assert_eq!((len, sent), (8 << 20, received), "digest differs");

    // IPv6 inside: packet too big, same MTU (link-local addresses, after DAD).
    let ll = tb
        .workload
        .ns
        .run(&[
            "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link",
        ])
        .unwrap();
    let ll = ll
        .split_whitespace()
        .nth(3)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let target = format!("{ll}%eth0");
    assert!(wait_until(Duration::from_secs(10), || ta
        .workload
        .ns
        .command("ping")
        .args(["-6", "-c", "1", "-W", "1", &target])
        .output()
        .is_ok_and(|o| o.status.success())));
    let out = ta
        .workload
        .ns
        .command("ping")
        .args([
            "-6", "-c", "1", "-W", "2", "-M", "do", "-s", "1400", &target,
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("Packet too big: mtu=1358"), "{said}");

    let t = &ga.stats().unwrap().tunnels[0];
    assert!(t.tx_too_big >= 2 && t.icmp_sent >= 2, "{t:?}");
}

/// One end eBPF, the other user space: the same wire format both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ebpf_end_talks_to_a_userspace_end() {
    let (_fabric, a, b) = lab().await;
    let ga = gre(&a, BackendChoice::Ebpf).await;
    let gb = gre(&b, BackendChoice::Userspace).await;
    let ta = tenant_end(&a, &*ga, "x", 4268, b.ip(), "172.16.0.2").await;
    let tb = tenant_end(&b, &*gb, "x", 4268, a.ip(), "172.16.0.3").await;
    assert!(ta.workload.ping(ip("172.16.0.3"), 3), "ebpf → userspace");
    assert!(tb.workload.ping(ip("172.16.0.2"), 3), "userspace → ebpf");
    for (from, to) in [(&ta, &tb), (&tb, &ta)] {
        let (sent, received, len) = tcp_transfer(&from.workload, &to.workload, 16 << 20);
        assert_eq!((len, sent), (16 << 20, received), "digest differs");
    }
    let (sa, sb) = (ga.stats().unwrap(), gb.stats().unwrap());
    assert_eq!((sa.malformed, sb.malformed), (0, 0));
    assert!(sa.tunnels[0].rx_bytes >= 16 << 20 && sb.tunnels[0].rx_bytes >= 16 << 20);
}

/// The eBPF datapath belongs to the kernel: traffic keeps flowing while no agent runs, and
/// a new one adopts the ports (replacing the programs, refilling the maps from the aliases).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_tunnels_outlive_their_agent_and_are_adopted() {
    let (_fabric, a, b) = lab().await;
    let ga = gre(&a, BackendChoice::Ebpf).await;
    let gb = gre(&b, BackendChoice::Ebpf).await;
    let ta = tenant_end(&a, &*ga, "r", 1001, b.ip(), "10.1.0.2").await;
    let _tb = tenant_end(&b, &*gb, "r", 1001, a.ip(), "10.1.0.3").await;
    assert!(ta.workload.ping(ip("10.1.0.3"), 2));
    let before = a.netlink().link_by_name("tun-r").await.unwrap().unwrap();

    drop(ga);
    assert!(
        ta.workload.ping(ip("10.1.0.3"), 2),
        "forwarding without an agent"
    );

    let ga = gre(&a, BackendChoice::Ebpf).await;
    let adopted = ga.stats().unwrap().tunnels;
    assert_eq!(adopted.len(), 1, "the port was adopted");
    assert!(
        ta.workload.ping(ip("10.1.0.3"), 2),
        "traffic through the new programs"
    );
    assert!(
        ga.stats().unwrap().tunnels[0].tx_packets >= 2,
        "counted by the new maps"
    );
    let filters = a
        .run(&["tc", "filter", "show", "dev", "tun-r", "egress"])
        .unwrap();
    assert_eq!(
        filters.lines().filter(|l| l.contains("handle")).count(),
        1,
        "replaced, not stacked: {filters}"
    );
    recreating_is_idempotent_and_another_identity_is_refused(&*ga, &a, &b, before.index).await;

    // Deleting the tunnel takes its port and the port's veth peer.
    ga.delete("tun-r").await.unwrap();
    ga.delete("tun-r").await.unwrap();
    let links = a.run(&["ip", "-o", "link"]).unwrap();
    assert!(
        !links.contains("tun-r") && !links.contains(&tenet::net::tunnel::ebpf::peer_name("tun-r")),
        "{links}"
    );
    assert!(ga.stats().unwrap().tunnels.is_empty());
    // With no tunnel left, the underlay carries no tenet filter.
    let filters = a
        .run(&["tc", "filter", "show", "dev", "eth0", "ingress"])
        .unwrap();
    assert!(!filters.contains("tenet_gre_decap"), "{filters}");
}

/// A concentrator's hub traffic: a frame decapsulated from one tunnel and bridged into
/// another is encapsulated again (the kernel keeps the first tunnel's state on it). Two
/// spokes talk through a hub, TCP included (GSO packets re-encapsulated whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ebpf_hub_bridges_between_its_tunnels() {
    let fabric = Fabric::new().await.unwrap();
    let hub = fabric.add_host("hh").await.unwrap();
    let a = fabric.add_host("ha").await.unwrap();
    let b = fabric.add_host("hb").await.unwrap();
    let (gh, ga, gb) = (
        gre(&hub, BackendChoice::Ebpf).await,
        gre(&a, BackendChoice::Ebpf).await,
        gre(&b, BackendChoice::Ebpf).await,
    );
    let br = hub
        .netlink()
        .create(&NewLink::bridge("br-hub").up())
        .await
        .unwrap();
    for (name, spoke) in [("tun-ha", &a), ("tun-hb", &b)] {
        let spec = TunnelSpec::new(name, TunnelKey::new(1001).unwrap(), hub.ip(), spoke.ip());
        let t = gh.create(&spec).await.unwrap();
        hub.netlink().enslave(t.index, br.index).await.unwrap();
    }
    let ta = tenant_end(&a, &*ga, "s", 1001, hub.ip(), "10.1.0.2").await;
    let tb = tenant_end(&b, &*gb, "s", 1001, hub.ip(), "10.1.0.3").await;
    assert!(ta.workload.ping(ip("10.1.0.3"), 3), "spoke a → spoke b");
    for (from, to) in [(&ta, &tb), (&tb, &ta)] {
        let (sent, received, len) = tcp_transfer(&from.workload, &to.workload, 32 << 20);
        assert_eq!((len, sent), (32 << 20, received), "digest differs");
    }
    let hub_stats = gh.stats().unwrap();
    assert!(
        hub_stats
            .tunnels
            .iter()
            .all(|t| t.tx_errors == 0 && t.tx_bytes >= 32 << 20),
        "{hub_stats:?}"
    );
}
