//! Supervising a long-running foreground daemon.
//!
//! The daemon's stdout and stderr go to `<run_dir>/<name>.log`, which a task follows into
//! `tracing` (field `daemon = name`). A file rather than a pipe, so that the daemon outlives
//! its agent: a pipe would break when the agent dies, and the daemon with it. Its pid goes to
//! `<run_dir>/<name>.pid`; a new agent that finds that pid alive, with the same command line
//! and in the same namespace, adopts it instead of starting a second one.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncSeekExt, BufReader};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, info_span, warn};

use super::command::Command;
use super::{DEFAULT_RUN_DIR, ProcessError, procfs, tail};

/// When a daemon counts as started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// As soon as it has been spawned and runs its own program (its command line is there).
    Spawned,
    /// Once it has a UDP socket bound to this port (dnsmasq: 67).
    ListeningUdp(u16),
    /// Once it listens on this TCP port.
    ListeningTcp(u16),
}

/// Restart delays: `initial`, doubling up to `max`; back to `initial` after a run that lasted
/// longer than `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// What to run and how to look after it.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    /// Unique within `run_dir`: names the pid and log files and the log lines.
    pub name: String,
    pub program: String,
    pub args: Vec<String>,
    /// The network namespace to run in (`None`: the caller's).
    pub netns: Option<PathBuf>,
    pub run_dir: PathBuf,
    pub backoff: Backoff,
    /// How long SIGTERM has before SIGKILL.
    pub stop_grace: Duration,
    pub readiness: Readiness,
    /// How long a start may take to reach `readiness`.
    pub ready_timeout: Duration,
    /// Once ready (and after every restart), the daemon's route-netlink sockets leave
    /// their multicast groups: it hears of no address or route change (see
    /// [`super::netlink_groups`]). Readiness must come after the daemon opened them.
    pub deaf_to_netlink_events: bool,
}

impl DaemonSpec {
    pub fn new(name: impl Into<String>, program: impl Into<String>) -> Self {
        DaemonSpec {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            netns: None,
            run_dir: PathBuf::from(DEFAULT_RUN_DIR),
            backoff: Backoff::default(),
            stop_grace: Duration::from_secs(5),
            readiness: Readiness::Spawned,
            ready_timeout: Duration::from_secs(10),
            deaf_to_netlink_events: false,
        }
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn netns(mut self, path: Option<&Path>) -> Self {
        self.netns = path.map(Path::to_path_buf);
        self
    }

    pub fn run_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.run_dir = dir.into();
        self
    }

    pub fn readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }

    pub fn pid_file(&self) -> PathBuf {
        self.run_dir.join(format!("{}.pid", self.name))
    }

    pub fn log_file(&self) -> PathBuf {
        self.run_dir.join(format!("{}.log", self.name))
    }

    fn argv(&self) -> Vec<String> {
        std::iter::once(self.program.clone())
            .chain(self.args.iter().cloned())
            .collect()
    }
}

/// Where a supervised daemon is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonStatus {
    Running {
        pid: u32,
    },
    /// It died; the next start is due after the backoff.
    Restarting,
    Stopped,
}

/// A running, supervised daemon. [`Daemon::stop`] ends it; dropping the handle (or the agent
/// dying) leaves it running for the next agent to adopt.
pub struct Daemon {
    spec: Arc<DaemonSpec>,
    status: watch::Receiver<DaemonStatus>,
    restarts: Arc<std::sync::atomic::AtomicU32>,
    adopted: bool,
    stop: watch::Sender<bool>,
    supervisor: Option<JoinHandle<()>>,
    follower: Option<JoinHandle<()>>,
}

/// The process being watched: our child, or one a previous agent started.
enum Running {
    Child(tokio::process::Child),
    Adopted {
        pid: u32,
        exit: AsyncFd<std::os::fd::OwnedFd>,
    },
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Child(c) => c.id().unwrap_or(0),
            Running::Adopted { pid, .. } => *pid,
        }
    }

    /// Waits for the process to end; its exit status when it was our child.
    async fn exited(&mut self) -> String {
        match self {
            Running::Child(c) => match c.wait().await {
                Ok(status) => describe(status),
                Err(e) => format!("lost: {e}"),
            },
            Running::Adopted { exit, .. } => {
                // A pidfd turns readable when the process ends; its parent reaps it.
                let _readable = exit.readable().await;
                "exited (adopted: status unknown)".into()
            }
        }
    }

    /// Non-blocking: whether it has ended.
    fn has_exited(&mut self) -> Option<String> {
        match self {
            Running::Child(c) => match c.try_wait() {
                Ok(Some(status)) => Some(describe(status)),
                Ok(None) => None,
                Err(e) => Some(format!("lost: {e}")),
            },
            Running::Adopted { pid, .. } => {
                (!procfs::alive(*pid)).then(|| "exited (adopted: status unknown)".into())
            }
        }
    }
}

/// A pidfd registered with the reactor: readable once `pid` has ended.
fn exit_watch(pid: u32) -> std::io::Result<AsyncFd<std::os::fd::OwnedFd>> {
    let fd = procfs::pidfd(pid)?;
    // SAFETY: an OwnedFd's descriptor stays open and unchanged until it is dropped, which
    // happens with the AsyncFd.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

fn describe(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        _ => status.to_string(),
    }
}

fn file_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ProcessError {
    let path = path.to_path_buf();
    move |source| ProcessError::File { what, path, source }
}

impl Daemon {
    /// Starts the daemon, or adopts the one a previous agent left running (same pid file,
    /// same command line, same namespace). Returns once it is ready (see [`Readiness`]); a
    /// daemon that exits or is not ready in time is an error quoting the end of its log,
    /// and is not left running.
    pub async fn start(spec: DaemonSpec) -> Result<Daemon, ProcessError> {
        let span = info_span!("daemon", name = %spec.name);
        async move {
            std::fs::create_dir_all(&spec.run_dir)
                .map_err(file_err("run directory", &spec.run_dir))?;
            let (running, adopted, log_from) = match adoptable(&spec) {
                Some(pid) => {
                    let exit = exit_watch(pid).map_err(file_err("pidfd of", &spec.pid_file()))?;
                    let log_from = std::fs::metadata(spec.log_file()).map_or(0, |m| m.len());
                    info!(pid, "adopted the running daemon");
                    // Done when it started, unless an older agent started it.
                    leave_netlink_groups(&spec, pid).await;
                    (Running::Adopted { pid, exit }, true, log_from)
                }
                None => {
                    let mut running = spawn(&spec, true).await?;
                    if let Err(e) = wait_ready(&spec, &mut running).await {
                        terminate(&spec, &mut running).await;
                        remove_pid_file(&spec);
                        return Err(e);
                    }
                    info!(pid = running.pid(), "started");
                    leave_netlink_groups(&spec, running.pid()).await;
                    (running, false, 0)
                }
            };
            let (status_tx, status) = watch::channel(DaemonStatus::Running { pid: running.pid() });
            let (stop, stop_rx) = watch::channel(false);
            let spec = Arc::new(spec);
            let restarts = Arc::new(std::sync::atomic::AtomicU32::new(0));
            let supervisor = tokio::spawn(
                supervise(
                    spec.clone(),
                    running,
                    status_tx,
                    stop_rx.clone(),
                    restarts.clone(),
                )
                .in_current_span(),
            );
            let follower =
                tokio::spawn(follow_log(spec.clone(), log_from, stop_rx).in_current_span());
            Ok(Daemon {
                spec,
                status,
                restarts,
                adopted,
                stop,
                supervisor: Some(supervisor),
                follower: Some(follower),
            })
        }
        .instrument(span)
        .await
    }

    /// Stops a daemon a previous agent left running (found by its pid file, as adoption
    /// finds it) without supervising it: SIGTERM, then SIGKILL after the grace period, pid
    /// file removed. Returns whether there was one.
    pub async fn stop_leftover(spec: &DaemonSpec) -> Result<bool, ProcessError> {
        let Some(pid) = adoptable(spec) else {
            remove_pid_file(spec);
            return Ok(false);
        };
        let exit = exit_watch(pid).map_err(file_err("pidfd of", &spec.pid_file()))?;
        let mut running = Running::Adopted { pid, exit };
        terminate(spec, &mut running).await;
        remove_pid_file(spec);
        info!(daemon = %spec.name, pid, "stopped a daemon left by a previous run");
        Ok(true)
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn spec(&self) -> &DaemonSpec {
        &self.spec
    }

    pub fn status(&self) -> DaemonStatus {
        *self.status.borrow()
    }

    /// The current pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        match self.status() {
            DaemonStatus::Running { pid } => Some(pid),
            _ => None,
        }
    }

    /// Status changes as they happen (for waiting on a restart without polling).
    pub fn watch(&self) -> watch::Receiver<DaemonStatus> {
        self.status.clone()
    }

    /// How often it has been restarted after dying.
    pub fn restarts(&self) -> u32 {
        self.restarts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether this handle adopted a daemon a previous agent started.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Asks the daemon to reload its configuration (SIGHUP).
    pub fn reload(&self) -> Result<(), ProcessError> {
        self.signal(Signal::SIGHUP, "SIGHUP")
    }

    fn signal(&self, signal: Signal, name: &'static str) -> Result<(), ProcessError> {
        let pid = self.pid().ok_or_else(|| ProcessError::Stopped {
            name: self.spec.name.clone(),
        })?;
        kill(Pid::from_raw(pid as i32), signal).map_err(|source| ProcessError::Signal {
            name: self.spec.name.clone(),
            pid,
            signal: name,
            source,
        })
    }

    /// Stops the daemon for good: SIGTERM, SIGKILL after the grace period, pid file removed.
    /// Returns once the process is gone.
    pub async fn stop(mut self) {
        self.stop.send_replace(true);
        for task in [self.supervisor.take(), self.follower.take()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = task.await {
                warn!(daemon = %self.spec.name, error = %e, "supervisor task failed");
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Without `stop`, the daemon stays running (adoptable); only the watching ends.
        for task in [self.supervisor.take(), self.follower.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }
}

/// The pid in the pid file, if that process is this daemon, alive.
fn adoptable(spec: &DaemonSpec) -> Option<u32> {
    let text = std::fs::read_to_string(spec.pid_file()).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    (procfs::alive(pid)
        && procfs::cmdline(pid).as_deref() == Some(spec.argv().as_slice())
        && procfs::in_netns(pid, spec.netns.as_deref()))
    .then_some(pid)
}

/// Spawns the program with its output appended to the log (truncated first on a fresh
/// start) and records its pid.
async fn spawn(spec: &DaemonSpec, fresh: bool) -> Result<Running, ProcessError> {
    let log_path = spec.log_file();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .truncate(false)
        .open(&log_path)
        .map_err(file_err("log", &log_path))?;
    if fresh {
        log.set_len(0).map_err(file_err("log", &log_path))?;
    }
    let err_log = log.try_clone().map_err(file_err("log", &log_path))?;
    let command = Command::new(&spec.program)
        .args(spec.args.iter().cloned())
        .netns(spec.netns.as_deref());
    let mut cmd = command.tokio_command();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err_log))
        // Its own process group: a Ctrl-C meant for the agent does not reach it.
        .process_group(0);
    let child = command.spawn(cmd)?;
    let pid = child.id().unwrap_or(0);
    let pid_file = spec.pid_file();
    let tmp = pid_file.with_extension("pid.tmp");
    std::fs::write(&tmp, format!("{pid}\n"))
        .and_then(|()| std::fs::rename(&tmp, &pid_file))
        .map_err(file_err("pid file", &pid_file))?;
    Ok(Running::Child(child))
}

/// Polls until the daemon is ready, has exited, or the timeout passes.
async fn wait_ready(spec: &DaemonSpec, running: &mut Running) -> Result<(), ProcessError> {
    let pid = running.pid();
    wait_ready_of(spec, pid, || running.has_exited()).await
}

/// [`wait_ready`] of process `pid`; `exited` says whether (and how) it has ended.
async fn wait_ready_of(
    spec: &DaemonSpec,
    pid: u32,
    mut exited: impl FnMut() -> Option<String>,
) -> Result<(), ProcessError> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(2);
    loop {
        if let Some(status) = exited() {
            return Err(ProcessError::StartFailed {
                name: spec.name.clone(),
                status,
                log: log_tail(spec),
            });
        }
        let ready = match spec.readiness {
            // Its own command line: exec has finished. The spawn returns as soon as the new
            // program replaces the old one, before its arguments are in place, and until
            // then a restarted agent would not recognise it (`adoptable`).
            Readiness::Spawned => procfs::cmdline(pid).is_some_and(|argv| !argv.is_empty()),
            Readiness::ListeningUdp(port) => procfs::listening(pid, "udp", port),
            Readiness::ListeningTcp(port) => procfs::listening(pid, "tcp", port),
        };
        if ready {
            return Ok(());
        }
        if started.elapsed() > spec.ready_timeout {
            return Err(ProcessError::NotReady {
                name: spec.name.clone(),
                seconds: spec.ready_timeout.as_secs_f64(),
                log: log_tail(spec),
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}

/// See [`DaemonSpec::deaf_to_netlink_events`]. A daemon may open its netlink socket a little
/// after it is ready (dnsmasq binds its DHCP port first): a few looks, until one finds a
/// group to leave. A failure costs only speed: logged.
async fn leave_netlink_groups(spec: &DaemonSpec, pid: u32) {
    if !spec.deaf_to_netlink_events {
        return;
    }
    let mut delay = Duration::from_millis(1);
    for _ in 0..8 {
        match super::netlink_groups::leave_multicast_groups(pid) {
            Ok(0) => {}
            Ok(groups) => {
                debug!(pid, groups, "left its netlink multicast groups");
                return;
            }
            Err(e) => {
                warn!(pid, error = %e, "could not take the daemon off netlink notifications");
                return;
            }
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
    debug!(pid, "no netlink multicast group to leave");
}

fn log_tail(spec: &DaemonSpec) -> String {
    tail(&std::fs::read_to_string(spec.log_file()).unwrap_or_default())
}

/// SIGTERM, then SIGKILL after the grace period; returns once the process is gone. The
/// signals go to the daemon's process group (it leads one), so helpers it forked go too.
async fn terminate(spec: &DaemonSpec, running: &mut Running) {
    let pid = Pid::from_raw(-(running.pid() as i32));
    if running.has_exited().is_some() {
        return;
    }
    if let Err(e) = kill(pid, Signal::SIGTERM) {
        warn!(error = %e, "SIGTERM");
    }
    if tokio::time::timeout(spec.stop_grace, running.exited())
        .await
        .is_err()
    {
        warn!(
            grace_s = spec.stop_grace.as_secs_f64(),
            "did not stop on SIGTERM; killing"
        );
        if let Err(e) = kill(pid, Signal::SIGKILL) {
            warn!(error = %e, "SIGKILL");
        }
        running.exited().await;
    }
}

fn remove_pid_file(spec: &DaemonSpec) {
    if let Err(e) = std::fs::remove_file(spec.pid_file())
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(error = %e, path = %spec.pid_file().display(), "removing pid file");
    }
}

async fn supervise(
    spec: Arc<DaemonSpec>,
    mut running: Running,
    status: watch::Sender<DaemonStatus>,
    mut stop: watch::Receiver<bool>,
    restarts: Arc<std::sync::atomic::AtomicU32>,
) {
    let mut delay = spec.backoff.initial;
    let mut since = Instant::now();
    loop {
        tokio::select! {
            how = running.exited() => {
                if since.elapsed() > spec.backoff.max {
                    delay = spec.backoff.initial;
                }
                warn!(pid = running.pid(), how = %how, restart_in_ms = delay.as_millis() as u64, "daemon died; restarting");
                status.send_replace(DaemonStatus::Restarting);
                // Keep trying until it spawns again or we are told to stop.
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.changed() => {
                            remove_pid_file(&spec);
                            status.send_replace(DaemonStatus::Stopped);
                            return;
                        }
                    }
                    delay = (delay * 2).min(spec.backoff.max);
                    match spawn(&spec, false).await {
                        Ok(r) => {
                            running = r;
                            break;
                        }
                        Err(e) => warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "restart failed"),
                    }
                }
                since = Instant::now();
                restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                info!(pid = running.pid(), "restarted");
                if spec.deaf_to_netlink_events {
                    // Beside the loop, which must stay free to see a death or a stop.
                    let (spec, pid) = (spec.clone(), running.pid());
                    let born = procfs::start_time(pid);
                    tokio::spawn(
                        async move {
                            let gone = || (procfs::start_time(pid) != born).then(String::new);
                            if wait_ready_of(&spec, pid, gone).await.is_ok() {
                                leave_netlink_groups(&spec, pid).await;
                            }
                        }
                        .in_current_span(),
                    );
                }
                status.send_replace(DaemonStatus::Running { pid: running.pid() });
            }
            changed = stop.changed() => {
                if changed.is_ok() && *stop.borrow() {
                    terminate(&spec, &mut running).await;
                    remove_pid_file(&spec);
                    info!("stopped");
                    status.send_replace(DaemonStatus::Stopped);
                }
                // Stopped, or the handle was dropped: the daemon stays for adoption.
                return;
            }
        }
    }
}

/// How soon a log follower looks again after finding nothing new: at first soon, then
/// less often while the daemon is quiet. A concentrator runs a dnsmasq per subnet: with 200
/// subnets, a look at every log each 200 ms kept an idle concentrator a tenth of a core busy
/// (under 3% with the pause growing).
const LOG_POLL_MIN: Duration = Duration::from_millis(200);
const LOG_POLL_MAX: Duration = Duration::from_secs(3);

/// Follows the log file from `offset` into tracing, one event per line.
async fn follow_log(spec: Arc<DaemonSpec>, offset: u64, mut stop: watch::Receiver<bool>) {
    let path = spec.log_file();
    let Ok(mut file) = tokio::fs::File::open(&path).await else {
        return;
    };
    if file.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        return;
    }
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    let mut pause = LOG_POLL_MIN;
    loop {
        line.clear();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => {
                // At the end: wait for more (or the stop), longer each time nothing came.
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {
                        drain(&mut reader, &spec.name).await;
                        return;
                    }
                }
                pause = (pause * 2).min(LOG_POLL_MAX);
            }
            Ok(_) => {
                info!(daemon = %spec.name, "{}", line.trim_end());
                pause = LOG_POLL_MIN;
            }
        }
    }
}

async fn drain(reader: &mut BufReader<tokio::fs::File>, name: &str) {
    let mut line = String::new();
    while reader.read_line(&mut line).await.is_ok_and(|n| n > 0) {
        info!(daemon = %name, "{}", line.trim_end());
        line.clear();
    }
}
