//! What the benchmarks share: iperf3 runs between workload namespaces and a tunnelled
//! workload pair across two hosts.
#![allow(dead_code)] // each benchmark uses its own subset

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use tenet::net::NewLink;
use tenet::net::tunnel::{BackendChoice, TunnelBackend, TunnelSpec, backend};
use tenet::testbed::{Host, Workload};
use tenet::types::TunnelKey;

pub fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

pub fn gbps(bits_per_second: f64) -> String {
    format!("{:.2} Gbit/s", bits_per_second / 1e9)
}

pub async fn tunnel_pair(
    a: &Host,
    b: &Host,
    choice: BackendChoice,
    tag: &str,
    subnet: &str,
) -> (Workload, Workload, Vec<Arc<dyn TunnelBackend>>) {
    let key = TunnelKey::from_subnet(&net(&format!("{subnet}.0/24"))).unwrap();
    let mut workloads = Vec::new();
    let mut backends = Vec::new();
    for (n, (host, peer)) in [(a, b.ip()), (b, a.ip())].into_iter().enumerate() {
        let tunnels = backend(choice, host.netlink().clone(), Some(host.path()))
            .await
            .unwrap();
        let nl = host.netlink();
        let br = nl
            .create(&NewLink::bridge(format!("br-{tag}")).up())
            .await
            .unwrap();
        let tun = tunnels
            .create(&TunnelSpec::new(format!("t-{tag}"), key, host.ip(), peer))
            .await
            .unwrap();
        nl.enslave(tun.index, br.index).await.unwrap();
        let addr = net(&format!("{subnet}.{}/24", n + 1));
        let wl = host
            .add_workload(
                &format!("{tag}{n}"),
                &format!("v-{tag}"),
                br.index,
                addr,
                tun.mtu,
            )
            .await
            .unwrap();
        workloads.push(wl);
        backends.push(tunnels);
    }
    let w2 = workloads.pop().unwrap();
    let w1 = workloads.pop().unwrap();
    assert!(w1.ping(w2.ip, 2), "{tag}: no connectivity");
    (w1, w2, backends)
}

pub struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn iperf_server(w: &Workload) -> Server {
    let child =
        w.ns.command("iperf3")
            .args(["-s", "-1", "-B", &w.ip.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 (apt-get install iperf3)");
    std::thread::sleep(Duration::from_millis(300));
    Server(child)
}

pub fn iperf_json(
    client: &Workload,
    server: &Workload,
    extra: &[&str],
    seconds: u64,
) -> serde_json::Value {
    let _srv = iperf_server(server);
    let out = client
        .ns
        .command("iperf3")
        .args([
            "-c",
            &server.ip.to_string(),
            "-J",
            "-t",
            &seconds.to_string(),
        ])
        .args(extra)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 output: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Received TCP bits per second.
pub fn iperf_tcp(client: &Workload, server: &Workload, seconds: u64) -> f64 {
    let v = iperf_json(client, server, &[], seconds);
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no TCP result: {v}"))
}

/// Received 64-byte UDP datagrams per second, sender unlimited.
pub fn iperf_udp64(client: &Workload, server: &Workload, seconds: u64) -> f64 {
    let v = iperf_json(client, server, &["-u", "-l", "64", "-b", "0"], seconds);
    let sum = &v["end"]["sum"];
    let packets = sum["packets"]
        .as_f64()
        .unwrap_or_else(|| panic!("no UDP result: {v}"));
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    let secs = sum["seconds"].as_f64().unwrap();
    (packets - lost) / secs
}

/// CPU time the whole machine spent (user, system, interrupts: every namespace's work,
/// the kernel's softirqs included), in seconds, from /proc/stat.
pub fn busy_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu = stat.lines().next().unwrap();
    // user nice system idle iowait irq softirq steal …
    let fields: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap())
        .collect();
    let busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    busy / hz
}

/// TCP throughput (bits/s) and the machine's CPU seconds per GB received during the run.
pub fn iperf_tcp_cpu(client: &Workload, server: &Workload, seconds: u64) -> (f64, f64) {
    let before = busy_cpu_seconds();
    let v = iperf_json(client, server, &[], seconds);
    let cpu = busy_cpu_seconds() - before;
    let received = &v["end"]["sum_received"];
    let bps = received["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no TCP result: {v}"));
    let bytes = received["bytes"].as_f64().unwrap_or(0.0);
    (bps, cpu / (bytes / 1e9).max(1e-9))
}

/// Turns generic receive offload on or off on `ifname` inside `host` (ETHTOOL_SGRO): a
/// veth has it off unless asked, physical NICs have it on.
pub fn set_gro(host: &Host, ifname: &str, on: bool) {
    let name = ifname.to_string();
    host.enter(move || {
        #[repr(C)]
        struct EthtoolValue {
            cmd: u32,
            data: u32,
        }
        const ETHTOOL_SGRO: u32 = 0x2c;
        let mut value = EthtoolValue {
            cmd: ETHTOOL_SGRO,
            data: u32::from(on),
        };
        // SAFETY: plain socket/ioctl calls on a zeroed ifreq whose data pointer refers to
        // `value`, alive for the call; the descriptor is closed below.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            let mut req: libc::ifreq = std::mem::zeroed();
            for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
                *d = s as libc::c_char;
            }
            req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
            let r = libc::ioctl(fd, 0x8946, &mut req);
            libc::close(fd);
            assert_eq!(
                r,
                0,
                "ETHTOOL_SGRO on {name}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    })
    .unwrap();
}
