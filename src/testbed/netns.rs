use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::{TestbedResult, io_err, run};
use crate::net::Netlink;

/// Every namespace the testbed makes is named `tnt-<pid>-<label>-<n>`, so namespaces left by
/// a process that was killed outright can be recognised and swept by the next run.
const PREFIX: &str = "tnt-";
const NETNS_DIR: &str = "/var/run/netns";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace that is deleted when dropped, with every process still inside it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace with `lo` up. `label` (a few letters) says what it is for.
    pub fn create(label: &str) -> TestbedResult<Self> {
        sweep_stale();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{label}-{n}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        debug!(netns = %ns.name, "namespace created");
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, for `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// A command that will run `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `argv` inside the namespace; returns its stdout, or an error with its stderr.
    pub fn run(&self, argv: &[&str]) -> TestbedResult<String> {
        let (program, args) = argv.split_first().expect("run needs a program");
        let out = run(self.command(program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A netlink connection whose socket lives in this namespace. Needs a tokio runtime.
    pub fn netlink(&self) -> TestbedResult<Netlink> {
        Ok(Netlink::connect_in(&self.path())?)
    }

    /// Feeds `script` to one `ip -batch -` in the namespace and returns how long it took from
    /// the first byte written to its exit (benchmarks compare against it).
    pub fn time_ip_batch(&self, script: &str) -> TestbedResult<Duration> {
        let what = format!("ip -batch in {}", self.name);
        let mut child = self
            .command("ip")
            .args(["-batch", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .map_err(io_err(what.clone()))?;
        let mut stdin = child.stdin.take().expect("piped");
        let started = Instant::now();
        stdin
            .write_all(script.as_bytes())
            .map_err(io_err(what.clone()))?;
        drop(stdin);
        let status = child.wait().map_err(io_err(what.clone()))?;
        let took = started.elapsed();
        if !status.success() {
            return Err(io_err(what)(std::io::Error::other(format!(
                "exited with {status}"
            ))));
        }
        Ok(took)
    }

    /// The namespace file, open (for moving links here with `setns_by_fd`).
    pub fn open(&self) -> TestbedResult<std::fs::File> {
        std::fs::File::open(self.path())
            .map_err(io_err(format!("cannot open namespace {}", self.name)))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_netns(&self.name);
    }
}

/// Kills what runs inside the named namespace, then deletes it (also one this process did
/// not create: a lab's leftovers).
pub fn delete_netns(name: &str) {
    // Processes keep a namespace alive after `ip netns del`; end them first.
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    match Command::new("ip").args(["netns", "del", name]).output() {
        Ok(out) if out.status.success() => debug!(netns = name, "namespace deleted"),
        Ok(out) => warn!(
            netns = name,
            stderr = %String::from_utf8_lossy(&out.stderr).trim(),
            "cannot delete namespace"
        ),
        Err(e) => warn!(netns = name, error = %e, "cannot run ip netns del"),
    }
}

/// Deletes testbed namespaces whose creating process no longer exists.
fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !PathBuf::from(format!("/proc/{pid}")).exists() {
            warn!(netns = %name, pid, "deleting namespace left by a dead process");
            delete_netns(&name);
        }
    }
}
