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
    let nl = host.netlink();
    let bridge = nl
        .create(&NewLink::bridge(format!("br-{tag}")).up())
        .await
        .unwrap();
    let spec = TunnelSpec::new(
        format!("tun-{tag}"),
        TunnelKey::new(key).unwrap(),
        host.ip(),
        peer,
    );
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

async fn userspace(host: &Host) -> UserspaceGre {
    UserspaceGre::start(host.netlink().clone(), Some(host.path()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_gre_carries_two_isolated_tenants_with_the_same_subnet() {
    let (_fabric, a, b) = lab().await;
    let (ga, gb) = (userspace(&a).await, userspace(&b).await);
    // Tenant 1 and tenant 2 both use 10.1.0.0/24; only the tunnel key tells them apart.
    let t1a = tenant_end(&a, &ga, "t1", 1001, b.ip(), "10.1.0.2").await;
    let t1b = tenant_end(&b, &gb, "t1", 1001, a.ip(), "10.1.0.3").await;
    let t2a = tenant_end(&a, &ga, "t2", 1002, b.ip(), "10.1.0.4").await;
    let t2b = tenant_end(&b, &gb, "t2", 1002, a.ip(), "10.1.0.5").await;

    // The tunnel MTU is derived from the underlay: 1500 - 42.
    let tun = a.netlink().link_by_name("tun-t1").await.unwrap().unwrap();
    assert_eq!(tun.mtu, 1458);
    assert_eq!(tun.kind.as_deref(), Some("tun"));

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

    let stats = ga.stats();
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
    let (_fabric, a, b) = lab().await;
    let (ga, gb) = (userspace(&a).await, userspace(&b).await);
    let ta = tenant_end(&a, &ga, "w", 4268, b.ip(), "172.16.0.2").await;
    let _tb = tenant_end(&b, &gb, "w", 4268, a.ip(), "172.16.0.3").await;

    let mut dump = a
        .command("tcpdump")
        .args([
            "-i", "eth0", "-nn", "-e", "-v", "-l", "-c", "6", "proto", "gre",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for "listening on" so that no packet is sent before the capture starts.
    let mut err = BufReader::new(dump.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("listening on eth0"), "{line}");
    assert!(ta.workload.ping(ip("172.16.0.3"), 4));
    let out = dump.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
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
    // Creating the same tunnel again is a no-op that returns the adopted link.
    let again = ga
        .create(&TunnelSpec::new(
            "tun-r",
            TunnelKey::new(1001).unwrap(),
            a.ip(),
            b.ip(),
        ))
        .await
        .unwrap();
    assert_eq!(again.index, before.index);
    // Another identity under the same name is refused and the link is left alone.
    let err = ga
        .create(&TunnelSpec::new(
            "tun-r",
            TunnelKey::new(7).unwrap(),
            a.ip(),
            b.ip(),
        ))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("already exists and is not this tunnel"),
        "{err}"
    );
    assert!(ta.workload.ping(ip("10.1.0.3"), 1));
}

/// Sends one raw GRE packet (`gre` = GRE header + payload) from inside `host` to `dst`.
fn send_raw(host: &Host, dst: Ipv4Addr, gre: Vec<u8>) {
    host.enter(move || {
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(47)),
        )
        .map_err(|e| NetError::new("open", "raw socket", e))?;
        s.send_to(&gre, &std::net::SocketAddr::from((dst, 0)).into())
            .map_err(|e| NetError::new("send", "raw GRE", e))?;
        Ok(())
    })
    .unwrap();
}

fn frame() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[2, 0, 0, 0, 0, 9, 0x08, 0x06]);
    f.extend_from_slice(&[0; 28]);
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_keys_unknown_peers_and_garbage_are_counted_and_dropped() {
    let fabric = Fabric::new().await.unwrap();
    let a = fabric.add_host("ha").await.unwrap();
    let b = fabric.add_host("hb").await.unwrap();
    let intruder = fabric.add_host("hx").await.unwrap();
    let gb = userspace(&b).await;
    let _tb = tenant_end(&b, &gb, "d", 1001, a.ip(), "10.1.0.3").await;

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
        wait_until(Duration::from_secs(5), || want(&gb.stats())),
        "{:?}",
        gb.stats()
    );
    let t = &gb.stats().tunnels[0];
    assert_eq!(t.rx_packets, 0, "nothing reached the tenant");

    // A well-formed packet from the real peer does get through.
    send_raw(&a, b.ip(), keyed(1001));
    assert!(wait_until(Duration::from_secs(5), || gb.stats().tunnels[0]
        .rx_packets
        == 1));
}

#[tokio::test]
async fn auto_falls_back_to_userspace_on_a_kernel_without_gre() {
    let fabric = Fabric::new().await.unwrap();
    let a = fabric.add_host("ha").await.unwrap();
    assert!(!kernel_supports_gretap(a.netlink()).await.unwrap());
    let chosen = backend(BackendChoice::Auto, a.netlink().clone(), Some(a.path()))
        .await
        .unwrap();
    assert_eq!(chosen.kind(), TunnelKind::UserspaceGre);
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
        .output()
        .unwrap();
    let trace = String::from_utf8_lossy(&out.stderr);
    assert!(
        trace.contains("Unknown device type"),
        "iproute2 is refused too: {trace}"
    );
    let mut theirs = first_newlink_bytes(&trace);

    let spec = TunnelSpec::new(
        "gt0",
        TunnelKey::new(4268).unwrap(),
        ip("10.0.0.1"),
        ip("10.0.0.2"),
    );
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
