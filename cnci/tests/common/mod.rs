//! Shared by the concentrator tests and benchmark: compute nodes and concentrators on lab
//! hosts, workloads that get their address by DHCP (busybox udhcpc with a script of our own,
//! which never touches the machine's /etc/resolv.conf), and workload endpoints in etcd.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use tenet::calico::{CalicoKey, WorkloadEndpointId};
use tenet::net::tunnel::BackendChoice;
use tenet::store::{Datastore, Revision};
use tenet::testbed::{Host, Netns};
use tenet::types::MacAddr;
use tenet_cn::{CnConfig, ComputeNode, CreatedVnic, TunnelEvent, VnicConfig};
use tenet_cnci::endpoints::endpoint_value;
use tenet_cnci::{CnciConfig, Concentrator, RemoteSubnet};

pub const SUBNET: &str = "172.16.0.0/24";

pub fn subnet() -> Ipv4Network {
    SUBNET.parse().unwrap()
}

pub async fn cn_on(host: &Host, id: &str, tunnel: BackendChoice) -> ComputeNode {
    let mut config = CnConfig::new(id);
    config.netns = Some(host.path());
    config.tunnel = tunnel;
    ComputeNode::init(config).await.unwrap()
}

pub fn cnci_config(host: &Host, id: &str, tenant: &str, run_dir: &Path) -> CnciConfig {
    let mut c = CnciConfig::new(id, tenant);
    c.netns = Some(host.path());
    c.tunnel = BackendChoice::Userspace;
    c.run_dir = run_dir.to_path_buf();
    c
}

/// A concentrator that has taken over whatever its host holds.
pub async fn conc_on(config: CnciConfig, store: &Arc<dyn Datastore>) -> Concentrator {
    let c = Concentrator::init(config, Some(store.clone()))
        .await
        .unwrap();
    c.rebuild().await.unwrap();
    c
}

/// The TenantAdded/Removed a compute node's tunnel event stands for.
pub fn remote(e: &TunnelEvent) -> RemoteSubnet {
    RemoteSubnet {
        tenant: e.tenant_id.clone(),
        subnet: e.subnet,
        subnet_key: e.subnet_key.get(),
        cn_id: e.cn_id.clone(),
        cn_ip: e.cn_ip,
    }
}

/// A workload: a container VNIC on `cn`, its container end moved into a fresh namespace as
/// `eth0` (up, no address: DHCP gives it one).
pub struct Workload {
    pub ns: Netns,
    pub vnic: CreatedVnic,
    pub mac: MacAddr,
}

pub async fn workload(
    cn: &ComputeNode,
    cn_host: &Host,
    id: &str,
    tenant: &str,
    conc: (&str, Ipv4Addr),
    mac: &str,
) -> Workload {
    workload_in(cn, cn_host, id, tenant, subnet(), conc, mac).await
}

/// A workload in `net` (see [`workload`]).
pub async fn workload_in(
    cn: &ComputeNode,
    cn_host: &Host,
    id: &str,
    tenant: &str,
    net: Ipv4Network,
    conc: (&str, Ipv4Addr),
    mac: &str,
) -> Workload {
    let mac: MacAddr = mac.parse().unwrap();
    let config = VnicConfig::container(id, tenant, net, conc.0, conc.1, mac);
    let vnic = cn.create_vnic(&config, None).await.unwrap();
    let ns = Netns::create("wl").unwrap();
    let peer = vnic.vnic.peer.clone().unwrap();
    cn_host
        .run(&[
            "ip",
            "link",
            "set",
            &peer,
            "netns",
            ns.name(),
            "name",
            "eth0",
        ])
        .unwrap();
    ns.run(&["ip", "link", "set", "lo", "up"]).unwrap();
    ns.run(&["ip", "link", "set", "eth0", "up"]).unwrap();
    Workload { ns, vnic, mac }
}

/// Writes the workload endpoint of a VNIC, labelled with its tenant; returns its revision.
pub async fn put_endpoint(
    store: &Arc<dyn Datastore>,
    host: &str,
    vnic: &str,
    tenant: &str,
    mac: MacAddr,
    ip: Ipv4Addr,
) -> Revision {
    let key = CalicoKey::WorkloadEndpoint(WorkloadEndpointId {
        host: host.into(),
        orchestrator: "ciao".into(),
        workload: format!("vm-{vnic}"),
        endpoint: vnic.into(),
    })
    .path();
    store
        .put(
            &key,
            &endpoint_value(tenant, &format!("tvn_{vnic}"), mac, ip),
        )
        .await
        .unwrap()
}

/// Waits until the concentrator's hosts files reflect etcd at `revision`.
pub async fn synced(conc: &Concentrator, revision: Revision) {
    let mut rx = conc.synced_revision();
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|r| *r >= revision))
        .await
        .expect("endpoints synced within 10 s")
        .unwrap();
}

/// What a DHCP client was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub router: Ipv4Addr,
    pub dns: String,
    pub mtu: Option<u32>,
}

/// The udhcpc script: configures the interface from the lease and records it in
/// `$TENET_LEASE_FILE`. It never touches /etc/resolv.conf.
const SCRIPT: &str = r#"#!/bin/sh
# tenet test DHCP script: configure the interface, record the lease, nothing else.
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$subnet" dev "$interface"
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    echo "ip=$ip router=$router dns=$dns mtu=$mtu" > "$TENET_LEASE_FILE"
    ;;
esac
exit 0
"#;

pub struct DhcpClient {
    dir: tempfile::TempDir,
}

impl DhcpClient {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("udhcpc.sh");
        std::fs::write(&script, SCRIPT).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        DhcpClient { dir }
    }

    fn script(&self) -> PathBuf {
        self.dir.path().join("udhcpc.sh")
    }

    /// One DHCP exchange on the workload's eth0 (`tries` discovers, 1 s apart): the lease,
    /// or `None` if no server answered.
    pub fn lease(&self, ns: &Netns, tries: u32) -> Option<Lease> {
        let file = self.dir.path().join(format!("lease-{}", ns.name()));
        let _ = std::fs::remove_file(&file);
        let out = ns
            .command("udhcpc")
            .args([
                "-i", "eth0", "-n", "-q", "-f", "-O", "mtu", "-T", "1", "-A", "1",
            ])
            .args(["-t", &tries.to_string()])
            .arg("-s")
            .arg(self.script())
            .env("TENET_LEASE_FILE", &file)
            .output()
            .unwrap();
        let text = std::fs::read_to_string(&file).ok()?;
        let field = |k: &str| {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .unwrap_or("")
                .to_string()
        };
        assert!(
            out.status.success(),
            "udhcpc: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Lease {
            ip: field("ip").parse().unwrap(),
            router: field("router").split(' ').next().unwrap().parse().unwrap(),
            dns: field("dns"),
            mtu: field("mtu").parse().ok(),
        })
    }
}

pub fn ping(ns: &Netns, dst: Ipv4Addr) -> bool {
    ns.command("ping")
        .args(["-c", "1", "-W", "1", &dst.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Who answers an IPv6 all-nodes ping on the workload's eth0 (after its own link-local
/// address has passed DAD): every host on the tenant's L2 segment with an IPv6 address.
pub fn ipv6_neighbours(ns: &Netns) -> std::collections::BTreeSet<String> {
    for _ in 0..50 {
        let tentative = ns.run(&["ip", "-6", "addr", "show", "dev", "eth0", "tentative"]);
        if tentative.is_ok_and(|t| t.trim().is_empty()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = ns
        .command("ping")
        .args(["-6", "-c", "3", "-i", "0.2", "-w", "2", "ff02::1%eth0"])
        .output()
        .expect("ping runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(" from ").map(|(_, rest)| rest))
        .map(|rest| rest.split_once(": ").map_or(rest, |(addr, _)| addr))
        .map(|addr| addr.split('%').next().unwrap_or(addr))
        .map(str::to_string)
        .collect()
}

/// The workload's own IPv6 link-local address.
pub fn own_link_local(ns: &Netns) -> String {
    let out = ns
        .run(&[
            "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link",
        ])
        .unwrap();
    let field = out
        .split_whitespace()
        .nth(3)
        .unwrap_or_else(|| panic!("no link-local address on eth0: {out:?}"));
    field.split('/').next().unwrap().to_string()
}

/// The MTU of the workload's eth0.
pub fn mtu_of(ns: &Netns) -> u32 {
    let out = ns.run(&["cat", "/sys/class/net/eth0/mtu"]).unwrap();
    out.trim().parse().unwrap()
}

/// The "internet": a namespace cabled to the concentrator host's uplink `up0`
/// (192.0.2.2/24); the external host is the namespace itself (192.0.2.1). Nothing routes to
/// the machine's real network.
pub fn internet(conc: &Host) -> Netns {
    let inet = Netns::create("inet").unwrap();
    conc.run(&[
        "ip",
        "link",
        "add",
        "up0",
        "type",
        "veth",
        "peer",
        "name",
        "ext0",
        "netns",
        inet.name(),
    ])
    .unwrap();
    conc.run(&["ip", "addr", "add", "192.0.2.2/24", "dev", "up0"])
        .unwrap();
    conc.run(&["ip", "link", "set", "up0", "up"]).unwrap();
    inet.run(&["ip", "addr", "add", "192.0.2.1/24", "dev", "ext0"])
        .unwrap();
    inet.run(&["ip", "link", "set", "ext0", "up"]).unwrap();
    inet.run(&["ip", "link", "set", "lo", "up"]).unwrap();
    inet
}

/// A count from the environment (benchmarks).
pub fn env_count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile of sorted latencies (benchmarks).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Milliseconds with one decimal (benchmarks).
pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

// SSNTP: a throw-away PKI, a scheduler, and peers the tests and benchmarks play.

use ssntp::cert::{self, CertRequest};
use ssntp::{
    Backoff, Client, ClientConfig, ClientEvent, Frame, Identity, Operation, Role, Server,
    ServerConfig, Uuid,
};
use std::net::{IpAddr, SocketAddr};
use tokio::sync::mpsc;

pub const WAIT: Duration = Duration::from_secs(20);

/// A throw-away CA; certificates for 127.0.0.1 written as files for the binary.
pub struct Pki {
    ca: cert::GeneratedCert,
    dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        Pki {
            ca: cert::generate_ca("tenet test CA", "tenet tests", 1).unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn issue(&self, roles: Role) -> cert::GeneratedCert {
        let req = CertRequest::new(
            roles,
            vec!["localhost".into()],
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        );
        cert::issue(&self.ca.cert_pem, &self.ca.key_pem, &req).unwrap()
    }

    pub fn identity(&self, roles: Role) -> Identity {
        let c = self.issue(roles);
        Identity::from_pem(
            c.bundle().as_bytes(),
            self.ca.cert_pem.as_bytes(),
            "node",
            "ca",
        )
        .unwrap()
    }

    /// (certificate file, CA file).
    pub fn files(&self, roles: Role, name: &str) -> (PathBuf, PathBuf) {
        let cert = self.dir.path().join(format!("{name}.pem"));
        std::fs::write(&cert, self.issue(roles).bundle()).unwrap();
        let ca = self.dir.path().join("ca.pem");
        std::fs::write(&ca, &self.ca.cert_pem).unwrap();
        (cert, ca)
    }
}

pub async fn scheduler(pki: &Pki) -> Server {
    let mut config = ServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        pki.identity(Role::SCHEDULER | Role::SERVER),
        Uuid::new_v4(),
    );
    config.role = Some(Role::SCHEDULER);
    let scheduler = ssntp::scheduler::Scheduler::new();
    Server::start(config, scheduler.rules(), scheduler)
        .await
        .unwrap()
}

/// An SSNTP peer the test plays (a controller, a compute node's agent).
pub struct Peer {
    pub client: Client,
    pub events: mpsc::Receiver<ClientEvent>,
}

impl Peer {
    pub async fn start(pki: &Pki, roles: Role, server: SocketAddr) -> Peer {
        let mut c = ClientConfig::new(
            vec![server.to_string()],
            pki.identity(roles),
            Uuid::new_v4(),
        );
        c.backoff = Backoff::scaled(Duration::from_millis(50));
        let (client, events) = Client::start(c).unwrap();
        let mut p = Peer { client, events };
        loop {
            match tokio::time::timeout(WAIT, p.events.recv()).await {
                Ok(Some(ClientEvent::Connected(_))) => return p,
                Ok(Some(_)) => {}
                other => panic!("no connection: {other:?}"),
            }
        }
    }

    /// The next frame with operation `op`, skipping others (node notifications, …).
    pub async fn expect(&mut self, op: Operation) -> Frame {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ClientEvent::Frame(f))) if f.operation() == Some(op) => return f,
                Ok(Some(_)) => {}
                other => panic!("waiting for {op:?}: {other:?}"),
            }
        }
    }
}
