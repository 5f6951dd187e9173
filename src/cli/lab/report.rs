//! What the lab shows: a line per build step with its elapsed time (a spinner while it runs
//! on a terminal, plain lines otherwise), a line per check, the summary table, and the same
//! facts as JSON for scripts (`--output`).

use std::io::IsTerminal;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

/// Build steps as they happen.
pub struct Progress {
    started: Instant,
    tty: bool,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            started: Instant::now(),
            tty: std::io::stdout().is_terminal(),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// A step begins; say how it ended with [`Step::done`] (or drop it: it failed).
    pub fn step(&self, what: &str) -> Step {
        let bar = self.tty.then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
            bar.set_style(
                ProgressStyle::with_template("{spinner:.cyan} [{elapsed:>3}] {msg}")
                    .expect("a valid template"),
            );
            bar.set_message(what.to_string());
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Step {
            bar,
            what: what.to_string(),
            begun: Instant::now(),
            lab_started: self.started,
            finished: false,
        }
    }

    /// A line outside any step.
    pub fn say(&self, line: &str) {
        println!("{line}");
    }
}

pub struct Step {
    bar: Option<ProgressBar>,
    what: String,
    begun: Instant,
    lab_started: Instant,
    finished: bool,
}

impl Step {
    /// Updates the spinner's text (terminals only).
    pub fn update(&self, detail: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{}: {detail}", self.what));
        }
    }

    pub fn done(mut self, detail: &str) {
        self.finish(true, detail);
    }

    fn finish(&mut self, ok: bool, detail: &str) {
        self.finished = true;
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let mark = if ok { "✓" } else { "✗" };
        let sep = if detail.is_empty() { "" } else { ": " };
        println!(
            "[{:>5.1}s] {mark} {}{sep}{detail} ({:.1} s)",
            self.lab_started.elapsed().as_secs_f64(),
            self.what,
            self.begun.elapsed().as_secs_f64()
        );
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(false, "failed");
        }
    }
}

/// The lab as built, for people (the table) and for scripts (`--output` JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabReport {
    /// Whether every check passed.
    pub passed: bool,
    /// Seconds from start until every check had run.
    pub ready_seconds: f64,
    pub tunnel: String,
    /// `gre` or `routed`.
    #[serde(default)]
    pub mode: String,
    pub etcd: EtcdInfo,
    pub scheduler: SchedulerInfo,
    pub pki: PkiInfo,
    pub fabric: FabricInfo,
    pub internet: InternetInfo,
    pub compute_hosts: Vec<ComputeHostInfo>,
    pub concentrators: Vec<ConcentratorInfo>,
    pub workloads: Vec<WorkloadInfo>,
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EtcdInfo {
    pub endpoint: String,
    pub data_dir: PathBuf,
    pub pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchedulerInfo {
    pub address: String,
    pub pid: Option<u32>,
    pub log: PathBuf,
    /// Its /metrics, /healthz and /readyz.
    pub metrics: std::net::SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PkiInfo {
    pub dir: PathBuf,
    pub ca: PathBuf,
    /// A certificate with the controller role (for `tenet instance …` against the lab).
    pub controller_cert: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FabricInfo {
    pub netns: String,
    pub underlay: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InternetInfo {
    pub netns: String,
    pub network: String,
    /// The external host (it is the internet namespace itself).
    pub external_ip: Ipv4Addr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComputeHostInfo {
    /// The Calico host name (endpoint keys are under it).
    pub name: String,
    pub uuid: String,
    pub netns: String,
    pub underlay_ip: Ipv4Addr,
    pub pid: Option<u32>,
    pub log: PathBuf,
    /// Routed mode: its BIRD's control socket (`tenet node status --socket`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bird_socket: Option<PathBuf>,
    /// tenet-cn's local API (`tenet-cni`'s `socket`).
    pub api_socket: PathBuf,
    /// `--docker`: its Docker driver's socket; the driver's name is the file's stem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker_socket: Option<PathBuf>,
    /// Its /metrics, /healthz and /readyz.
    pub metrics: std::net::SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConcentratorInfo {
    pub tenant: String,
    /// The tenant's subnet.
    pub subnet: ipnetwork::Ipv4Network,
    pub uuid: String,
    pub netns: String,
    pub underlay_ip: Ipv4Addr,
    pub uplink_ip: Ipv4Addr,
    pub pid: Option<u32>,
    pub log: PathBuf,
    pub run_dir: PathBuf,
    /// Its /metrics, /healthz and /readyz.
    pub metrics: std::net::SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadInfo {
    pub name: String,
    pub tenant: String,
    pub instance: String,
    pub vnic: String,
    pub netns: String,
    /// The compute host the scheduler placed it on.
    pub host: String,
    pub subnet: String,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub mac: String,
    pub floating_ip: Option<Ipv4Addr>,
}

/// One check with real traffic.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub workload: String,
    /// `lease`, `gateway`, `tenant`, `internet`, `floating_ip` or `isolation`.
    pub kind: String,
    pub ok: bool,
    pub detail: String,
}

impl LabReport {
    fn mark(&self, workload: &str, kind: &str) -> &'static str {
        let mut rows = self
            .checks
            .iter()
            .filter(|c| c.workload == workload && c.kind == kind)
            .peekable();
        if rows.peek().is_none() {
            return "—";
        }
        if rows.all(|c| c.ok) { "✓" } else { "✗" }
    }

    /// The summary table.
    pub fn table(&self) -> String {
        let routed = self.mode == "routed";
        let mut out = format!(
            "{:<10} {:<8} {:<8} {:<16} {:<16} {:<8} {:<8} {:<20} {}\n",
            "WORKLOAD",
            "TENANT",
            "HOST",
            "IP",
            "GATEWAY",
            "PEERS",
            "INTERNET",
            "FLOATING IP",
            "ISOLATION"
        );
        for w in &self.workloads {
            let floating = match w.floating_ip {
                Some(ip) => format!("{} {ip}", self.mark(&w.name, "floating_ip")),
                None => "—".into(),
            };
            out.push_str(&format!(
                "{:<10} {:<8} {:<8} {:<16} {:<16} {:<8} {:<8} {:<20} {}\n",
                w.name,
                w.tenant,
                w.host,
                // Routed mode: the address is set, not leased; the gateway is proxy ARP on
                // the host, proven by reaching the host.
                format!(
                    "{} {}",
                    self.mark(&w.name, if routed { "address" } else { "lease" }),
                    w.ip
                ),
                format!(
                    "{} {}",
                    self.mark(&w.name, if routed { "host" } else { "gateway" }),
                    w.gateway
                ),
                self.mark(&w.name, "tenant"),
                self.mark(&w.name, "internet"),
                floating,
                self.mark(&w.name, "isolation"),
            ));
        }
        out
    }
}
