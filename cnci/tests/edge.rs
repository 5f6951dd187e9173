//! The concentrator's edge in namespaces: a compute node, a concentrator with an uplink to an
//! "internet" namespace (the external host, 192.0.2.1; nothing routes to the machine's real
//! network), real iptables, conntrack and tcpdump. NAT out, port forwards (TCP, UDP, hairpin),
//! floating IPs with their gratuitous ARP, restart with repair, and removal that leaves
//! `iptables-save` as it was.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tenet::keyspace::cnci::{PortForward, Protocol};
use tenet::net::NetError;
use tenet::net::netns::run_in;
use tenet::net::tunnel::BackendChoice;
use tenet::store::Datastore;
use tenet::testbed::{EtcdServer, Fabric, Host, Netns};
use tenet_cnci::{CnciConfig, CnciError, Concentrator};

const UPLINK: &str = "192.0.2.2";
const EXTERNAL: &str = "192.0.2.1";

fn edge_config(host: &Host, run: &Path) -> CnciConfig {
    let mut c = cnci_config(host, "c1", "t1", run);
    c.compute_nets = vec!["10.254.0.0/16".parse().unwrap()];
    c
}

fn io(what: &str) -> impl Fn(std::io::Error) -> NetError + '_ {
    move |e| NetError::new("socket", what, e)
}

fn tcp_listen(ns: &Netns, addr: &str) -> TcpListener {
    let a: SocketAddr = addr.parse().unwrap();
    run_in(Some(&ns.path()), move || {
        TcpListener::bind(a).map_err(io("listen"))
    })
    .unwrap()
}

fn tcp_connect(ns: &Netns, addr: &str) -> std::io::Result<TcpStream> {
    let a: SocketAddr = addr.parse().unwrap();
    run_in(Some(&ns.path()), move || {
        TcpStream::connect_timeout(&a, Duration::from_secs(2)).map_err(io("connect"))
    })
    .map_err(|e| std::io::Error::other(e.to_string()))
}

fn udp_bind(ns: &Netns, addr: &str) -> UdpSocket {
    let a: SocketAddr = addr.parse().unwrap();
    run_in(Some(&ns.path()), move || {
        UdpSocket::bind(a).map_err(io("bind"))
    })
    .unwrap()
}

/// Connects from `from` to `to` and returns the peer address the listener saw (after a
/// round trip of bytes), or `None` if the connection failed.
fn tcp_peer(listener: &TcpListener, from: &Netns, to: &str) -> Option<std::net::IpAddr> {
    let mut client = tcp_connect(from, to).ok()?;
    listener.set_nonblocking(false).unwrap();
    let (mut server, peer) = listener.accept().ok()?;
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    Some(peer.ip())
}

fn saved(host: &Host) -> String {
    saved_by(host, "iptables-save")
}

fn saved_by(host: &Host, program: &str) -> String {
    host.run(&[program])
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(" [").next().unwrap().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nat_forwards_and_floating_ips_at_the_edge() {
    let etcd = EtcdServer::start().await.unwrap();
    let store: Arc<dyn Datastore> = Arc::new(etcd.store().await.unwrap());
    let fabric = Fabric::new().await.unwrap();
    let cn_host = fabric.add_host("cn").await.unwrap();
    let conc_host = fabric.add_host("conc").await.unwrap();
    let inet = internet(&conc_host);
    let run = tempfile::tempdir().unwrap();
    // The operator's own rules, which tenet must leave as they are.
    conc_host
        .run(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "eth9",
            "-j",
            "MASQUERADE",
        ])
        .unwrap();
    conc_host
        .run(&[
            "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "DROP",
        ])
        .unwrap();
    let before = saved(&conc_host);
    let forwarding_before =
        tenet::net::sysctl::read(Some(&conc_host.path()), "net.ipv4.ip_forward").unwrap();

    let conc = conc_on(edge_config(&conc_host, run.path()), &store).await;
    assert_eq!(conc.uplink().unwrap().link, "up0");
    let cn = cn_on(&cn_host, "cn-1", BackendChoice::Userspace).await;
    let dhcp = DhcpClient::new();
    let at = ("c1", conc_host.ip());
    let w = workload(&cn, &cn_host, "v1", "t1", at, "02:00:00:00:00:05").await;
    let w2 = workload(&cn, &cn_host, "v2", "t1", at, "02:00:00:00:00:06").await;
    put_endpoint(
        &store,
        "cn-1",
        "v1",
        "t1",
        w.mac,
        "172.16.0.5".parse().unwrap(),
    )
    .await;
    let rev = put_endpoint(
        &store,
        "cn-1",
        "v2",
        "t1",
        w2.mac,
        "172.16.0.6".parse().unwrap(),
    )
    .await;
    conc.attach_remote_subnet(&remote(w.vnic.tunnel.as_ref().unwrap()))
        .await
        .unwrap();
    synced(&conc, rev).await;
    dhcp.lease(&w.ns, 3).expect("w leases");
    dhcp.lease(&w2.ns, 3).expect("w2 leases");

    // NAT out: the external host sees the uplink address.
    let outside = tcp_listen(&inet, &format!("{EXTERNAL}:8080"));
    assert_eq!(
        tcp_peer(&outside, &w.ns, &format!("{EXTERNAL}:8080")).map(|p| p.to_string()),
        Some(UPLINK.to_string()),
        "the workload reaches the external host, masqueraded"
    );
    assert!(ping(&w.ns, EXTERNAL.parse().unwrap()));

    // Port forwards: TCP 2222 → w:22, UDP 5353 → w:53; hairpin from w2.
    let ssh = tcp_listen(&w.ns, "0.0.0.0:22");
    let fwd = |protocol, external_port, internal_port| PortForward {
        protocol,
        external_port,
        internal_ip: "172.16.0.5".parse().unwrap(),
        internal_port,
    };
    assert!(
        conc.add_port_forward(&fwd(Protocol::Tcp, 2222, 22))
            .await
            .unwrap()
    );
    assert!(
        !conc
            .add_port_forward(&fwd(Protocol::Tcp, 2222, 22))
            .await
            .unwrap(),
        "idempotent"
    );
    let clash = conc.add_port_forward(&fwd(Protocol::Tcp, 2222, 23)).await;
    assert!(
        matches!(
            clash,
            Err(CnciError::Invalid {
                field: "external_port",
                ..
            })
        ),
        "{clash:?}"
    );
    conc.add_port_forward(&fwd(Protocol::Udp, 5353, 53))
        .await
        .unwrap();
    assert_eq!(
        tcp_peer(&ssh, &inet, &format!("{UPLINK}:2222")).map(|p| p.to_string()),
        Some(EXTERNAL.to_string()),
        "the external host reaches w:22 through the forward"
    );
    let dns = udp_bind(&w.ns, "0.0.0.0:53");
    dns.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let sender = udp_bind(&inet, &format!("{EXTERNAL}:0"));
    sender.send_to(b"query", format!("{UPLINK}:5353")).unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = dns.recv_from(&mut buf).expect("the UDP forward delivers");
    assert_eq!(&buf[..n], b"query");
    let hp = tcp_peer(&ssh, &w2.ns, &format!("{UPLINK}:2222"));
    assert_eq!(
        hp.map(|p| p.to_string()),
        Some("172.16.0.1".to_string()),
        "hairpin: w2 reaches w through the uplink address, answered via the gateway"
    );

    // Floating IP: gratuitous ARP on the uplink, reachable from outside, outbound as itself.
    let public = "192.0.2.50";
    let capture = inet
        .command("timeout")
        .args([
            "5", "tcpdump", "-i", "ext0", "-n", "-l", "-c", "1", "arp", "and", "host", public,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // tcpdump is listening once it says so on stderr.
    let mut capture = capture;
    let mut err = std::io::BufReader::new(capture.stderr.take().unwrap());
    let mut first = String::new();
    while !first.contains("listening") {
        first.clear();
        assert!(
            std::io::BufRead::read_line(&mut err, &mut first).unwrap() > 0,
            "tcpdump ended"
        );
    }
    assert!(
        conc.assign_floating_ip(public.parse().unwrap(), "172.16.0.5".parse().unwrap())
            .await
            .unwrap()
    );
    let garp = capture.wait_with_output().unwrap();
    let garp = String::from_utf8_lossy(&garp.stdout);
    assert!(
        garp.contains(&format!("Request who-has {public} tell {public}")),
        "a gratuitous ARP: {garp:?}"
    );
    let again = conc
        .assign_floating_ip(public.parse().unwrap(), "172.16.0.6".parse().unwrap())
        .await;
    assert!(
        matches!(
            again,
            Err(CnciError::Invalid {
                field: "public_ip",
                ..
            })
        ),
        "{again:?}"
    );
    assert_eq!(
        tcp_peer(&ssh, &inet, &format!("{public}:22")).map(|p| p.to_string()),
        Some(EXTERNAL.to_string())
    );
    assert_eq!(
        tcp_peer(&outside, &w.ns, &format!("{EXTERNAL}:8080")).map(|p| p.to_string()),
        Some(public.to_string()),
        "w's outbound traffic leaves with its public address"
    );
    assert!(
        conc.release_floating_ip(public.parse().unwrap())
            .await
            .unwrap()
    );
    assert!(
        !conc
            .release_floating_ip(public.parse().unwrap())
            .await
            .unwrap()
    );
    assert!(
        tcp_connect(&inet, &format!("{public}:22")).is_err(),
        "released: no answer"
    );
    assert!(!conc_host.run(&["iptables-save"]).unwrap().contains(public));
    assert!(
        !conc_host
            .run(&["ip", "addr", "show", "up0"])
            .unwrap()
            .contains(public)
    );

    // Restart: the agent dies, someone deletes a rule and adds one to tenet's chain.
    conc.assign_floating_ip("192.0.2.51".parse().unwrap(), "172.16.0.6".parse().unwrap())
        .await
        .unwrap();
    drop(conc);
    conc_host
        .run(&["iptables", "-t", "nat", "-D", "TENET-CNCI-PORTS", "1"])
        .unwrap();
    conc_host
        .run(&["iptables", "-A", "TENET-CNCI-FORWARD", "-j", "ACCEPT"])
        .unwrap();
    // With iptables-nft, floating IPs are elements of tenet's nftables map.
    conc_host
        .run(&["nft", "delete element ip tenet-cnci dnat_in { 192.0.2.51 }"])
        .unwrap();
    let conc = Concentrator::init(edge_config(&conc_host, run.path()), Some(store.clone()))
        .await
        .unwrap();
    let report = conc.rebuild().await.unwrap();
    assert_eq!(
        report.firewall.restored,
        [
            report.firewall.restored[0].clone(),
            "floating 192.0.2.51 -> 172.16.0.6".to_string()
        ],
        "the forward and the floating IP deleted by hand are back"
    );
    assert_eq!(report.firewall.removed.len(), 1, "{:?}", report.firewall);
    assert_eq!(
        conc.edge().await.forwards.len(),
        2,
        "forwards restored from etcd"
    );
    assert_eq!(
        tcp_peer(&ssh, &inet, &format!("{UPLINK}:2222")).map(|p| p.to_string()),
        Some(EXTERNAL.to_string())
    );
    let w2_ssh = tcp_listen(&w2.ns, "0.0.0.0:22");
    assert!(
        tcp_peer(&w2_ssh, &inet, "192.0.2.51:22").is_some(),
        "the floating IP works again"
    );
    assert!(
        conc.rebuild().await.unwrap().firewall.is_empty(),
        "a second rebuild repairs nothing"
    );

    // What an operator sees: the library view and the command.
    let view =
        tenet_cnci::show::inspect(Some(&conc_host.path()), run.path(), Some((&*store, "c1")))
            .await
            .unwrap();
    assert_eq!(view.subnets.len(), 1);
    assert_eq!(view.subnets[0].compute_nodes, [cn_host.ip()]);
    assert!(
        view.subnets[0].dnsmasq_pid.is_some() && view.subnets[0].leases >= 2,
        "{view:?}"
    );
    assert!(view.firewall_rules > 0);
    assert_eq!(view.nft_floating, Some(1));
    assert_eq!((view.forwards.len(), view.floating_ips.len()), (2, 1));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenet-cnci"))
        .args(["show", "--id", "c1", "--netns"])
        .arg(conc_host.path())
        .arg("--run-dir")
        .arg(run.path())
        .env("ETCD_ENDPOINTS", etcd.endpoint())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("172.16.0.0/24") && text.contains("floating 192.0.2.51 -> 172.16.0.6"),
        "{text}"
    );

    // Removal leaves the namespace's firewall as it was.
    conc.reset().await.unwrap();
    assert_eq!(saved(&conc_host), before);
    assert!(
        !conc_host
            .run(&["nft", "list", "tables"])
            .unwrap()
            .contains("tenet"),
        "no nftables table of tenet's is left"
    );
    assert_eq!(
        tenet::net::sysctl::read(Some(&conc_host.path()), "net.ipv4.ip_forward").unwrap(),
        forwarding_before
    );
    assert!(
        !conc_host
            .run(&["ip", "addr", "show", "up0"])
            .unwrap()
            .contains("192.0.2.51")
    );
}

/// The same edge with iptables-legacy: floating IPs are rules there (no nftables map), and
/// removal leaves `iptables-legacy-save` as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_works_with_iptables_legacy() {
    let etcd = EtcdServer::start().await.unwrap();
    let store: Arc<dyn Datastore> = Arc::new(etcd.store().await.unwrap());
    let fabric = Fabric::new().await.unwrap();
    let cn_host = fabric.add_host("cn").await.unwrap();
    let conc_host = fabric.add_host("conc").await.unwrap();
    let inet = internet(&conc_host);
    let run = tempfile::tempdir().unwrap();
    // The operator's rules; they also make the tables exist before, as they stay after
    // (a table, once used, stays until the namespace goes).
    conc_host
        .run(&[
            "iptables-legacy",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "eth9",
            "-j",
            "MASQUERADE",
        ])
        .unwrap();
    conc_host
        .run(&[
            "iptables-legacy",
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            "9",
            "-j",
            "DROP",
        ])
        .unwrap();
    let before = saved_by(&conc_host, "iptables-legacy-save");

    let mut config = edge_config(&conc_host, run.path());
    config.iptables = Some(tenet::net::firewall::IptablesVariant::Legacy);
    let conc = conc_on(config, &store).await;
    let cn = cn_on(&cn_host, "cn-1", BackendChoice::Userspace).await;
    let dhcp = DhcpClient::new();
    let w = workload(
        &cn,
        &cn_host,
        "v1",
        "t1",
        ("c1", conc_host.ip()),
        "02:00:00:00:00:05",
    )
    .await;
    let rev = put_endpoint(
        &store,
        "cn-1",
        "v1",
        "t1",
        w.mac,
        "172.16.0.5".parse().unwrap(),
    )
    .await;
    conc.attach_remote_subnet(&remote(w.vnic.tunnel.as_ref().unwrap()))
        .await
        .unwrap();
    synced(&conc, rev).await;
    dhcp.lease(&w.ns, 3).expect("w leases");

    let outside = tcp_listen(&inet, &format!("{EXTERNAL}:8080"));
    assert_eq!(
        tcp_peer(&outside, &w.ns, &format!("{EXTERNAL}:8080")).map(|p| p.to_string()),
        Some(UPLINK.to_string()),
        "NAT out"
    );
    let ssh = tcp_listen(&w.ns, "0.0.0.0:22");
    conc.add_port_forward(&PortForward {
        protocol: Protocol::Tcp,
        external_port: 2222,
        internal_ip: "172.16.0.5".parse().unwrap(),
        internal_port: 22,
    })
    .await
    .unwrap();
    assert!(
        tcp_peer(&ssh, &inet, &format!("{UPLINK}:2222")).is_some(),
        "the port forward"
    );
    let public = "192.0.2.50";
    conc.assign_floating_ip(public.parse().unwrap(), "172.16.0.5".parse().unwrap())
        .await
        .unwrap();
    let rules = saved_by(&conc_host, "iptables-legacy-save");
    assert!(
        rules.contains(&format!("TENET-CNCI: floating {public} -> 172.16.0.5")),
        "{rules}"
    );
    assert!(
        !conc_host
            .run(&["nft", "list", "tables"])
            .unwrap()
            .contains("tenet"),
        "no nftables map with iptables-legacy"
    );
    assert_eq!(
        tcp_peer(&ssh, &inet, &format!("{public}:22")).map(|p| p.to_string()),
        Some(EXTERNAL.to_string()),
        "the floating IP reaches w"
    );
    assert_eq!(
        tcp_peer(&outside, &w.ns, &format!("{EXTERNAL}:8080")).map(|p| p.to_string()),
        Some(public.to_string()),
        "w leaves with its public address"
    );
    conc.release_floating_ip(public.parse().unwrap())
        .await
        .unwrap();
    assert!(tcp_connect(&inet, &format!("{public}:22")).is_err());
    assert!(!saved_by(&conc_host, "iptables-legacy-save").contains(public));

    conc.reset().await.unwrap();
    assert_eq!(saved_by(&conc_host, "iptables-legacy-save"), before);
}
