//! The lab's traffic: a DHCP client in a workload (busybox udhcpc with the lab's own script,
//! which never touches the machine's /etc/resolv.conf), pings, and TCP "who are you" probes
//! whose answer names the host that answered — so a check knows not only that a packet came
//! back, but from whom.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use tenet::net::netns::run_in;
use tenet::net::{NetError, NetResult};
use tokio::io::AsyncWriteExt;

/// The port every lab responder listens on.
pub const PROBE_PORT: u16 = 7777;

/// The udhcpc script: configures the interface from the lease and records it in
/// `$TENET_LEASE_FILE`; nothing else.
const SCRIPT: &str = r#"#!/bin/sh
# tenet lab DHCP script: configure the interface, record the lease, nothing else.
case "$1" in
  deconfig)
    ip addr flush dev "$interface"
    ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$subnet" dev "$interface"
    [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    echo "ip=$ip router=$router mtu=$mtu" > "$TENET_LEASE_FILE"
    ;;
esac
exit 0
"#;

/// What the DHCP server gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub router: Ipv4Addr,
    pub mtu: Option<u32>,
}

/// The lab's DHCP client script, written once into the lab's directory.
pub struct DhcpClient {
    script: PathBuf,
    dir: PathBuf,
}

impl DhcpClient {
    pub fn new(dir: &Path) -> anyhow::Result<DhcpClient> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        let script = dir.join("udhcpc.sh");
        std::fs::write(&script, SCRIPT)?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        Ok(DhcpClient {
            script,
            dir: dir.to_path_buf(),
        })
    }

    /// One DHCP exchange on `eth0` of namespace `ns` (up to `tries` discovers, a second
    /// apart); the interface holds the lease's address afterwards.
    pub async fn lease(&self, ns: &str, tries: u32) -> anyhow::Result<Lease> {
        let file = self.dir.join(format!("lease-{ns}"));
        let _ = std::fs::remove_file(&file);
        let out = tokio::process::Command::new("ip")
            .args([
                "netns", "exec", ns, "udhcpc", "-i", "eth0", "-n", "-q", "-f",
            ])
            .args(["-O", "mtu", "-T", "1", "-A", "1", "-t", &tries.to_string()])
            .arg("-s")
            .arg(&self.script)
            .env("TENET_LEASE_FILE", &file)
            .output()
            .await
            .context("cannot run udhcpc (busybox's; is the udhcpc package installed?)")?;
        let Ok(text) = std::fs::read_to_string(&file) else {
            bail!(
                "no DHCP answer after {tries} tries: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        };
        let field = |k: &str| {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .unwrap_or("")
                .to_string()
        };
        Ok(Lease {
            ip: field("ip").parse().context("the lease has no address")?,
            router: field("router").parse().context("the lease has no router")?,
            mtu: field("mtu").parse().ok(),
        })
    }
}

/// `ping -c count` from namespace `ns`; true when a reply came back.
pub async fn ping(ns: &str, dst: Ipv4Addr, count: u32) -> bool {
    tokio::process::Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-q", "-c", &count.to_string()])
        .args(["-i", "0.2", "-W", "1", &dst.to_string()])
        .output()
        .await
        .is_ok_and(|o| o.status.success())
}

/// Serves `PROBE_PORT` inside namespace `netns`: each connection gets `banner` (the
/// responder's name) and, after it, the address the connection came from — what NAT made
/// of the sender. Runs until the returned task is aborted.
pub fn responder(netns: &Path, banner: String) -> NetResult<tokio::task::JoinHandle<()>> {
    let listener = run_in(Some(netns), || {
        let l = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, PROBE_PORT))
            .map_err(|e| NetError::new("bind", format!("port {PROBE_PORT}"), e))?;
        l.set_nonblocking(true)
            .map_err(|e| NetError::new("set non-blocking", "listener", e))?;
        Ok(l)
    })?;
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|e| NetError::new("register", "listener", e))?;
    Ok(tokio::spawn(async move {
        while let Ok((mut conn, peer)) = listener.accept().await {
            let line = format!("{banner} {}\n", peer.ip());
            tokio::spawn(async move {
                let _ = conn.write_all(line.as_bytes()).await;
            });
        }
    }))
}

/// What a responder said: its name and the address it saw the probe come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub banner: String,
    pub seen_from: Ipv4Addr,
}

/// Connects from namespace `netns` to `dst:PROBE_PORT`; `None` when nothing answered within
/// `timeout` (refused, unreachable or silent).
pub async fn probe(netns: &Path, dst: Ipv4Addr, timeout: Duration) -> Option<Answer> {
    let netns = netns.to_path_buf();
    tokio::task::spawn_blocking(move || {
        run_in(Some(&netns), move || {
            let addr = SocketAddr::V4(SocketAddrV4::new(dst, PROBE_PORT));
            let io = |e| NetError::new("probe", addr.to_string(), e);
            let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
            s.set_read_timeout(Some(timeout)).map_err(io)?;
            let mut text = String::new();
            s.read_to_string(&mut text).map_err(io)?;
            let _ = s.flush();
            Ok(text)
        })
        .ok()
    })
    .await
    .ok()
    .flatten()
    .and_then(|text| {
        let (banner, seen) = text.trim().rsplit_once(' ')?;
        Some(Answer {
            banner: banner.to_string(),
            seen_from: seen.parse().ok()?,
        })
    })
}
