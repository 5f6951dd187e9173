//! dnsmasq, one per tenant subnet: its configuration and hosts file rendered from what the
//! concentrator knows (pure functions, checked against `dnsmasq --test` in the tests), and the
//! supervised process (`tenet::process::Daemon`).
//!
//! Files live in `<run_dir>/<subnet>/`: `dnsmasq.conf`, `hosts` (the MAC → IP bindings,
//! re-read on SIGHUP), `leases` (kept across dnsmasq restarts), and the daemon's pid file and
//! log. Only known hosts get a lease (`dhcp-ignore=tag:!known`).

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;
use tenet::process::{Daemon, DaemonSpec, Readiness};
use tenet::types::{MacAddr, gateway_of};
use tracing::info;

use crate::config::DhcpOptions;
use crate::error::CnciError;

/// One MAC → address binding a workload endpoint asks for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostBinding {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
    /// A DNS name dnsmasq answers for, when the workload's id is a valid DNS label.
    pub name: Option<String>,
}

/// The directory name of a subnet: `172.16.0.0-24`.
pub fn dir_name(subnet: &Ipv4Network) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix())
}

/// The subnet a directory name stands for.
pub fn parse_dir_name(name: &str) -> Option<Ipv4Network> {
    let (ip, prefix) = name.split_once('-')?;
    let net = Ipv4Network::new(ip.parse().ok()?, prefix.parse().ok()?).ok()?;
    (net.network() == net.ip()).then_some(net)
}

/// What the configuration of one subnet's dnsmasq depends on.
#[derive(Debug, Clone)]
pub struct DhcpSubnet<'a> {
    pub tenant: &'a str,
    pub subnet: Ipv4Network,
    pub bridge: &'a str,
    /// Option 26.
    pub mtu: u32,
    pub dir: &'a Path,
    pub options: &'a DhcpOptions,
}

/// The subnet's dnsmasq.conf.
pub fn render_config(s: &DhcpSubnet<'_>) -> String {
    let gw = gateway_of(&s.subnet);
    let hosts = host_count(&s.subnet);
    let mut c = String::new();
    let mut line = |text: String| {
        c.push_str(&text);
        c.push('\n');
    };
    line(format!(
        "# dnsmasq for tenant {} subnet {} on {}: written by tenet-cnci, do not edit",
        s.tenant, s.subnet, s.bridge
    ));
    // Only the tenant bridge, only the gateway address; never the host's own files.
    line(format!("interface={}", s.bridge));
    line("except-interface=lo".into());
    line("bind-interfaces".into());
    line(format!("listen-address={gw}"));
    // Empty: no pid file of dnsmasq's own (tenet's supervisor keeps one); the default would
    // be the host's /run/dnsmasq.pid.
    line("pid-file=".into());
    line("no-hosts".into());
    if s.options.upstream_dns.is_empty() {
        line("no-resolv".into());
    } else {
        line("no-resolv".into());
        for server in &s.options.upstream_dns {
            line(format!("server={server}"));
        }
    }
    line("domain-needed".into());
    line("bogus-priv".into());
    // Static: addresses come only from the hosts file, and only known hosts are answered.
    line(format!(
        "dhcp-range={},static,{},{}",
        s.subnet.network(),
        s.subnet.mask(),
        s.options.lease_time.as_secs()
    ));
    line(format!("dhcp-lease-max={hosts}"));
    line("dhcp-ignore=tag:!known".into());
    line("dhcp-authoritative".into());
    line(format!("dhcp-hostsfile={}", s.dir.join("hosts").display()));
    line(format!("dhcp-leasefile={}", s.dir.join("leases").display()));
    line(format!("dhcp-option=option:router,{gw}"));
    line(format!("dhcp-option=option:dns-server,{gw}"));
    line(format!("dhcp-option-force=option:mtu,{}", s.mtu));
    line("log-facility=-".into());
    line("log-dhcp".into());
    c
}

/// Usable host addresses of a subnet: all but the network, the gateway and the broadcast.
fn host_count(subnet: &Ipv4Network) -> u64 {
    (1u64 << (32 - subnet.prefix())).saturating_sub(3)
}

/// ciao's pre-binding: `02:00:<ip bytes>` for an address.
pub fn ciao_mac(ip: Ipv4Addr) -> MacAddr {
    let o = ip.octets();
    MacAddr([0x02, 0x00, o[0], o[1], o[2], o[3]])
}

/// The hosts file: one `mac,id:*,ip[,name]` line per binding inside the subnet (the client
/// id is ignored, so a host is known by its MAC alone). A MAC or address bound twice keeps
/// its first binding in address order; `prebind` adds ciao's binding for every address no
/// endpoint claimed.
pub fn render_hosts(bindings: &[HostBinding], subnet: &Ipv4Network, prebind: bool) -> String {
    let gw = gateway_of(subnet);
    let mut sorted: Vec<&HostBinding> = bindings
        .iter()
        .filter(|b| usable(subnet, gw, b.ip))
        .collect();
    sorted.sort();
    let mut seen_ip = std::collections::HashSet::new();
    let mut seen_mac = std::collections::HashSet::new();
    let mut out = String::new();
    for b in sorted {
        if !seen_ip.insert(b.ip) || !seen_mac.insert(b.mac) {
            continue;
        }
        let _ = write!(out, "{},id:*,{}", b.mac, b.ip);
        if let Some(name) = &b.name {
            let _ = write!(out, ",{name}");
        }
        out.push('\n');
    }
    if prebind {
        let first = u32::from(subnet.network()) + 2;
        let last = u32::from(subnet.broadcast()) - 1;
        for ip in (first..=last).map(Ipv4Addr::from) {
            let mac = ciao_mac(ip);
            if seen_ip.insert(ip) && seen_mac.insert(mac) {
                let _ = writeln!(out, "{mac},id:*,{ip}");
            }
        }
    }
    out
}

fn usable(subnet: &Ipv4Network, gw: Ipv4Addr, ip: Ipv4Addr) -> bool {
    subnet.contains(ip) && ip != subnet.network() && ip != subnet.broadcast() && ip != gw
}

/// Whether `name` can be a DNS label (and so a host name dnsmasq hands out).
pub fn dns_label(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    ok.then(|| name.to_ascii_lowercase())
}

/// Writes `text` to `path` atomically (a reader sees the old or the new file, never half).
pub(crate) fn write_atomic(path: &Path, text: &str) -> Result<(), CnciError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| CnciError::file("writing", path, e))
}

/// The leases a subnet's dnsmasq holds, from its leases file in `dir` (one line each).
pub fn leases_in(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("leases"))
        .map(|text| text.lines().filter(|l| !l.trim().is_empty()).count())
        .unwrap_or(0)
}

/// The supervisor's description of a subnet's dnsmasq.
pub fn daemon_spec(subnet: &Ipv4Network, dir: &Path, netns: Option<&Path>) -> DaemonSpec {
    let mut spec = DaemonSpec::new(format!("dnsmasq-{}", dir_name(subnet)), "dnsmasq")
        .args([
            "--keep-in-foreground".to_string(),
            format!("--conf-file={}", dir.join("dnsmasq.conf").display()),
        ])
        .netns(netns)
        .run_dir(dir)
        // DNS on the gateway is its last socket, after the netlink one it is taken off.
        .readiness(Readiness::ListeningUdp(53));
    spec.stop_grace = std::time::Duration::from_secs(2);
    // One dnsmasq per subnet in one namespace: each would wake for every other subnet's
    // address and routes (`tenet::process::netlink_groups`).
    spec.deaf_to_netlink_events = true;
    spec
}

/// A subnet's running dnsmasq.
pub struct DhcpServer {
    subnet: Ipv4Network,
    dir: PathBuf,
    daemon: Daemon,
    hosts: String,
}

impl DhcpServer {
    /// Writes the configuration and hosts file and starts dnsmasq (or adopts the one a
    /// previous agent left running with the same configuration file). The leases file is
    /// kept. An error quotes dnsmasq's own message.
    pub async fn start(
        subnet: Ipv4Network,
        dir: &Path,
        netns: Option<&Path>,
        config: &str,
        hosts: String,
    ) -> Result<Self, CnciError> {
        std::fs::create_dir_all(dir).map_err(|e| CnciError::file("creating", dir, e))?;
        write_atomic(&dir.join("dnsmasq.conf"), config)?;
        write_atomic(&dir.join("hosts"), &hosts)?;
        let spec = daemon_spec(&subnet, dir, netns);
        let daemon = Daemon::start(spec).await.map_err(|cause| CnciError::Dhcp {
            subnet: subnet.to_string(),
            cause,
        })?;
        if daemon.adopted() {
            // It may have read an older hosts file: make it read this one.
            daemon.reload().map_err(|cause| CnciError::Dhcp {
                subnet: subnet.to_string(),
                cause,
            })?;
        }
        info!(%subnet, pid = ?daemon.pid(), adopted = daemon.adopted(), "dnsmasq running");
        Ok(DhcpServer {
            subnet,
            dir: dir.to_path_buf(),
            daemon,
            hosts,
        })
    }

    /// Rewrites the hosts file and signals dnsmasq, if the bindings changed. Returns whether
    /// they did.
    pub fn update_hosts(&mut self, hosts: String) -> Result<bool, CnciError> {
        if hosts == self.hosts {
            return Ok(false);
        }
        write_atomic(&self.dir.join("hosts"), &hosts)?;
        self.hosts = hosts;
        self.daemon.reload().map_err(|cause| CnciError::Dhcp {
            subnet: self.subnet.to_string(),
            cause,
        })?;
        Ok(true)
    }

    pub fn daemon(&self) -> &Daemon {
        &self.daemon
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The leases dnsmasq holds now (one line each in its leases file).
    pub fn leases(&self) -> usize {
        leases_in(&self.dir)
    }

    /// Stops dnsmasq; with `remove_files`, its directory (leases included) goes too.
    pub async fn stop(self, remove_files: bool) -> Result<(), CnciError> {
        self.daemon.stop().await;
        if remove_files {
            std::fs::remove_dir_all(&self.dir)
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| CnciError::file("removing", &self.dir, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(ip: &str, mac: &str, name: Option<&str>) -> HostBinding {
        HostBinding {
            ip: ip.parse().unwrap(),
            mac: mac.parse().unwrap(),
            name: name.map(str::to_string),
        }
    }

    #[test]
    fn hosts_keep_one_binding_per_mac_and_address_inside_the_subnet() {
        let net: Ipv4Network = "172.16.0.0/29".parse().unwrap();
        let text = render_hosts(
            &[
                b("172.16.0.3", "02:00:00:00:00:03", Some("vm-3")),
                b("172.16.0.2", "02:00:00:00:00:02", None),
                b("172.16.0.2", "02:00:00:00:00:09", None),
                b("172.16.0.4", "02:00:00:00:00:02", None),
                b("172.16.0.1", "02:00:00:00:00:01", None),
                b("172.16.1.5", "02:00:00:00:00:05", None),
            ],
            &net,
            false,
        );
        assert_eq!(
            text,
            "02:00:00:00:00:02,id:*,172.16.0.2\n02:00:00:00:00:03,id:*,172.16.0.3,vm-3\n"
        );
        let pre = render_hosts(&[b("172.16.0.3", "02:00:00:00:00:03", None)], &net, true);
        assert_eq!(
            pre.lines().collect::<Vec<_>>(),
            [
                "02:00:00:00:00:03,id:*,172.16.0.3",
                "02:00:ac:10:00:02,id:*,172.16.0.2",
                "02:00:ac:10:00:04,id:*,172.16.0.4",
                "02:00:ac:10:00:05,id:*,172.16.0.5",
                "02:00:ac:10:00:06,id:*,172.16.0.6",
            ]
        );
    }

    #[test]
    fn names_and_dirs() {
        let net: Ipv4Network = "10.1.128.0/17".parse().unwrap();
        assert_eq!(dir_name(&net), "10.1.128.0-17");
        assert_eq!(parse_dir_name("10.1.128.0-17"), Some(net));
        assert_eq!(parse_dir_name("10.1.128.1-17"), None);
        assert_eq!(parse_dir_name("junk"), None);
        assert_eq!(dns_label("Web-1").as_deref(), Some("web-1"));
        assert_eq!(dns_label("a_b"), None);
        assert_eq!(dns_label(&"x".repeat(64)), None);
    }
}
