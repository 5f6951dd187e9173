//! Wire compatibility with a real kernel gretap: a Linux guest that has ip_gre (Debian's
//! cloud kernel, fetched by scripts/fetch-guest-kernel.sh) boots under qemu (TCG: this
//! machine has no usable KVM) with its NIC on a tap in a lab host. In the guest a gretap to
//! the host; on the host a tenet tunnel to the guest — the user-space datapath, then the eBPF
//! one — on a bridge with a workload. Proven by pings both ways, 8 MiB TCP each way with equal
//! SHA-256 digests, the outer TTL following the inner one on both sides, and zero errors.
//!
//! The guest's userland is busybox (static) plus iproute2's `ip` (busybox's cannot make a
//! gretap) with its libraries, in an initramfs this test writes (newc cpio).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ip, wait_until};
use ipnetwork::{IpNetwork, Ipv4Network};
use sha2::{Digest, Sha256};
use tenet::net::tunnel::{BackendChoice, TunnelSpec, backend};
use tenet::net::{NetError, NewLink};
use tenet::testbed::{Fabric, Host};
use tenet::types::TunnelKey;

const GUEST_KERNEL: &str = "/var/cache/tenet/guest-kernel";
const HOST_UNDERLAY: &str = "10.253.0.1";
const GUEST_UNDERLAY: &str = "10.253.0.2";
const HOST_WORKLOAD: &str = "172.16.0.2";
const GUEST_TENANT: &str = "172.16.0.3";
const KEY: u32 = 4268;
const TRANSFER: usize = 8 << 20;
const PATTERN: &[u8] = b"tenet-qemu-gre\n";
const READY: &str = "TENET-GUEST-READY";

/// The guest's /init: modules, the underlay address, a gretap like `ip link add … type gretap
/// local … remote … key 4268` (ttl inherit, the default), and two services for the digests.
fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/load-order); do insmod /modules/$m.ko || echo "insmod $m failed"; done
IP=/sbin/ip2
$IP link set lo up
$IP link set eth0 up
$IP addr add {GUEST_UNDERLAY}/24 dev eth0
$IP link add gt0 type gretap local {GUEST_UNDERLAY} remote {HOST_UNDERLAY} key {KEY}
$IP link set gt0 mtu 1458 up
$IP addr add {GUEST_TENANT}/24 dev gt0
nc -ll -p 5001 -e /recv.sh &
nc -ll -p 5002 -e /send.sh &
$IP -d link show gt0
echo {READY}
while true; do
    sleep 2
    echo "gt0 $(cat /sys/class/net/gt0/statistics/rx_errors) rx_errors $(cat /sys/class/net/gt0/statistics/tx_errors) tx_errors"
done
"#
    )
}

/// newc cpio, as the kernel unpacks an initramfs.
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn new() -> Self {
        Cpio {
            out: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.ino += 1;
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    fn file(&mut self, name: &str, data: &[u8], exec: bool) {
        self.entry(name, if exec { 0o100755 } else { 0o100644 }, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// The shared libraries `binary` needs, from ldd: (path in the guest, contents).
fn libraries(binary: &str) -> Vec<(String, Vec<u8>)> {
    let out = Command::new("ldd").arg(binary).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        let path = match line.split("=>").nth(1) {
            Some(rest) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push((p.to_string(), std::fs::read(p).unwrap()));
        }
    }
    libs
}

fn initramfs(kernel: &Path) -> Vec<u8> {
    let mut c = Cpio::new();
    for d in [
        "bin", "sbin", "proc", "sys", "dev", "lib", "lib64", "modules", "usr",
    ] {
        c.dir(d);
    }
    c.dir("lib/x86_64-linux-gnu");
    c.file("bin/busybox", &std::fs::read("/bin/busybox").unwrap(), true);
    let ip2 = if Path::new("/sbin/ip").exists() {
        "/sbin/ip"
    } else {
        "/bin/ip"
    };
    c.file("sbin/ip2", &std::fs::read(ip2).unwrap(), true);
    for (path, data) in libraries(ip2) {
        c.file(path.trim_start_matches('/'), &data, true);
    }
    let modules = kernel.join("modules");
    let order = std::fs::read_to_string(modules.join("load-order")).unwrap();
    c.file("modules/load-order", order.as_bytes(), false);
    for m in order.split_whitespace() {
        let data = std::fs::read(modules.join(format!("{m}.ko"))).unwrap();
        c.file(&format!("modules/{m}.ko"), &data, false);
    }
    c.file("init", init_script().as_bytes(), true);
    c.file("recv.sh", b"#!/bin/sh\nsha256sum | cut -d' ' -f1\n", true);
    let send = format!("#!/bin/sh\nyes tenet-qemu-gre | head -c {TRANSFER}\n");
    c.file("send.sh", send.as_bytes(), true);
    c.finish()
}

/// qemu, killed when dropped.
struct Guest {
    child: Child,
    console: PathBuf,
}

impl Guest {
    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn boot(host: &Host, dir: &Path, kernel: &Path) -> Guest {
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, initramfs(kernel)).unwrap();
    let console = dir.join("console.log");
    let child = host
        .command("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "256", "-smp", "1", "-no-reboot"])
        .args(["-display", "none", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel.join("vmlinuz"))
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .args([
            "-netdev",
            "tap,id=n0,ifname=qtap0,script=no,downscript=no",
            "-device",
            "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64 (scripts/setup.sh installs qemu-system-x86)");
    Guest { child, console }
}

/// Sends `data` to the guest's port 5001 from inside the workload; the guest answers with
/// the SHA-256 of what it received.
fn digest_at_guest(w: &tenet::testbed::Workload, data: Vec<u8>) -> String {
    w.enter(move || {
        let addr = SocketAddr::from((ip(GUEST_TENANT), 5001));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| NetError::new("connect", "guest:5001", e))?;
        s.set_read_timeout(Some(Duration::from_secs(120))).ok();
        s.write_all(&data)
            .map_err(|e| NetError::new("send", "guest:5001", e))?;
        s.shutdown(Shutdown::Write).ok();
        let mut answer = String::new();
        s.read_to_string(&mut answer)
            .map_err(|e| NetError::new("read", "guest:5001", e))?;
        Ok(answer.trim().to_string())
    })
    .unwrap()
}

/// Reads the guest's port 5002 (TRANSFER bytes of PATTERN) from inside the workload.
fn read_from_guest(w: &tenet::testbed::Workload) -> Vec<u8> {
    w.enter(move || {
        let addr = SocketAddr::from((ip(GUEST_TENANT), 5002));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| NetError::new("connect", "guest:5002", e))?;
        s.set_read_timeout(Some(Duration::from_secs(120))).ok();
        let mut data = Vec::with_capacity(TRANSFER);
        s.read_to_end(&mut data)
            .map_err(|e| NetError::new("read", "guest:5002", e))?;
        Ok(data)
    })
    .unwrap()
}

fn pattern() -> Vec<u8> {
    PATTERN.iter().copied().cycle().take(TRANSFER).collect()
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Both ways over the tunnel `choice` makes: pings, digests, TTL on the wire, counters.
async fn exchange(host: &Host, guest: &Guest, choice: BackendChoice) {
    let what = format!("{choice}");
    let tunnels = backend(choice, host.netlink().clone(), Some(host.path()))
        .await
        .unwrap();
    let nl = host.netlink();
    let br = nl
        .create(&NewLink::bridge(format!("br-{what}")).up())
        .await
        .unwrap();
    let spec = TunnelSpec::new(
        format!("tq-{what}"),
        TunnelKey::new(KEY).unwrap(),
        ip(HOST_UNDERLAY),
        ip(GUEST_UNDERLAY),
    );
    let tun = tunnels.create(&spec).await.unwrap();
    nl.enslave(tun.index, br.index).await.unwrap();
    let addr: Ipv4Network = format!("{HOST_WORKLOAD}/24").parse().unwrap();
    let w = host
        .add_workload(
            &format!("qw{what}"),
            &format!("v-{what}"),
            br.index,
            addr,
            tun.mtu,
        )
        .await
        .unwrap();

    assert!(
        wait_until(Duration::from_secs(30), || w.ping(ip(GUEST_TENANT), 1)),
        "{what}: workload → guest\n{}",
        guest.console()
    );

    // The outer TTL follows the inner one on both sides: the workload pings with TTL 17 and
    // the guest's kernel answers with its own (64). Only ICMP inside is caught: the
    // workload's own IPv6 (an MLD report, hop limit 1) may cross the tunnel at any time.
    // Outer IPv4 header 20 bytes, GRE with a key 8, inner Ethernet 14: its type at 40, the
    // inner IPv4 protocol at 51.
    let mut dump = host
        .command("timeout")
        .args([
            "20",
            "tcpdump",
            "-i",
            "qtap0",
            "-nn",
            "-v",
            "-l",
            "-c",
            "2",
            "proto gre and ip[40:2] = 0x0800 and ip[51] = 1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(dump.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    assert!(line.contains("listening on"), "{line}");
    let pinged =
        w.ns.command("ping")
            .args(["-c", "1", "-W", "5", "-t", "17", GUEST_TENANT])
            .output()
            .unwrap();
    assert!(pinged.status.success(), "{what}: ping with TTL 17");
    let text = String::from_utf8_lossy(&dump.wait_with_output().unwrap().stdout).into_owned();
    let outer: Vec<&str> = text.lines().filter(|l| l.contains("proto GRE")).collect();
    assert_eq!(outer.len(), 2, "{what}: {text}");
    assert!(
        outer[0].contains("ttl 17,") && outer[0].contains("flags [DF]"),
        "{what}: tenet's outer header: {text}"
    );
    assert!(
        outer[1].contains("ttl 64,"),
        "{what}: the guest's outer header: {text}"
    );
    assert!(
        text.contains(&format!(
            "{HOST_UNDERLAY} > {GUEST_UNDERLAY}: GREv0, Flags [key present], key=0x10ac"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{GUEST_UNDERLAY} > {HOST_UNDERLAY}: GREv0, Flags [key present], key=0x10ac"
        )),
        "{text}"
    );

    let data = pattern();
    let expected = hex(&Sha256::digest(&data));
    let started = Instant::now();
    assert_eq!(
        digest_at_guest(&w, data),
        expected,
        "{what}: host → guest digest"
    );
    let received = read_from_guest(&w);
    assert_eq!(received.len(), TRANSFER, "{what}: guest → host length");
    assert_eq!(
        hex(&Sha256::digest(&received)),
        expected,
        "{what}: guest → host digest"
    );
    eprintln!(
        "{what}: 2 × 8 MiB over the gretap in {:?}",
        started.elapsed()
    );

    let stats = tunnels.stats().unwrap();
    let t = &stats.tunnels[0];
    assert_eq!((t.tx_errors, t.rx_errors), (0, 0), "{what}: {t:?}");
    assert!(
        t.rx_bytes >= TRANSFER as u64 && t.tx_bytes >= TRANSFER as u64,
        "{what}: {t:?}"
    );
    assert_eq!(
        (stats.malformed, stats.unknown_key, stats.unknown_peer),
        (0, 0, 0),
        "{what}"
    );

    tunnels.delete(&spec.name).await.unwrap();
    drop(w);
    nl.delete(br.index).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_kernel_gretap_talks_to_tenets_datapaths() {
    let kernel = PathBuf::from(std::env::var("TENET_GUEST_KERNEL").unwrap_or(GUEST_KERNEL.into()));
    assert!(
        kernel.join("vmlinuz").exists(),
        "no guest kernel in {}: run scripts/fetch-guest-kernel.sh (scripts/setup.sh does)",
        kernel.display()
    );
    let started = Instant::now();
    let fabric = Fabric::new().await.unwrap();
    let host = fabric.add_host("qh").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let guest = boot(&host, dir.path(), &kernel);

    // qemu makes the tap in the host's namespace; it carries the underlay to the guest.
    let nl = host.netlink();
    assert!(wait_until(Duration::from_secs(10), || {
        host.run(&["ip", "link", "show", "qtap0"]).is_ok()
    }));
    let tap = nl.index_of("qtap0").await.unwrap();
    nl.add_address(
        tap,
        IpNetwork::V4(format!("{HOST_UNDERLAY}/24").parse().unwrap()),
    )
    .await
    .unwrap();
    nl.set_up(tap).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(120), || guest.console().contains(READY)),
        "the guest did not come up:\n{}",
        guest.console()
    );
    eprintln!("guest up in {:?}", started.elapsed());
    let console = guest.console();
    assert!(
        console.contains("gretap"),
        "the guest made a gretap:\n{console}"
    );
    assert!(!console.contains("failed"), "{console}");

    exchange(&host, &guest, BackendChoice::Userspace).await;
    exchange(&host, &guest, BackendChoice::Ebpf).await;

    // The guest's gretap saw no errors either.
    let last = guest
        .console()
        .lines()
        .rev()
        .find(|l| l.starts_with("gt0 "))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(last.contains("gt0 0 rx_errors 0 tx_errors"), "{last}");
    eprintln!("the whole check took {:?}", started.elapsed());
}
