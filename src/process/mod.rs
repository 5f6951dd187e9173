//! Running programs and supervising daemons. Every external program tenet uses (dnsmasq,
//! BIRD, iptables-restore, ipset, etcd) goes through here, so that each one runs in the right
//! network namespace and fails with an error naming the program, its arguments, its exit
//! status and the end of what it wrote.
//!
//! * [`Command`]: run a program to completion (optionally inside a namespace, with input on
//!   stdin) and get its output, or a [`ProcessError`] that says what went wrong.
//! * [`Daemon`]: keep a long-running foreground program alive: logs into `tracing`, restart
//!   with capped exponential backoff, SIGHUP to reload, SIGTERM then SIGKILL to stop, a pid
//!   file under a run directory, and adoption of a still-running daemon after the agent
//!   restarts instead of starting a second one.

mod command;
mod daemon;
pub mod netlink_groups;
pub mod procfs;

pub use command::{Command, Output};

/// Completes when the process is asked to stop (SIGTERM or SIGINT): the shutdown future
/// the agents run until.
pub fn terminated() -> std::io::Result<impl std::future::Future<Output = ()>> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
}
pub use daemon::{Backoff, Daemon, DaemonSpec, DaemonStatus, Readiness};

use std::path::PathBuf;

/// Where tenet keeps pid files, logs and generated configuration unless told otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/tenet";

/// Lines of a failed program's output quoted in its error.
const TAIL_LINES: usize = 12;

/// A program that could not be run, or that failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started (not installed, not executable, …).
    #[error("cannot run {program}: {source}{hint}")]
    Spawn {
        program: String,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// It ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}){}", stderr_suffix(.stderr))]
    Failed {
        command: String,
        status: String,
        /// The last lines of its stderr (or stdout when stderr was empty).
        stderr: String,
    },
    /// A daemon exited before it was ready.
    #[error("{name} exited while starting ({status}){}", stderr_suffix(.log))]
    StartFailed {
        name: String,
        status: String,
        log: String,
    },
    /// A daemon did not become ready in time.
    #[error("{name} was not ready after {seconds:.1}s{}", stderr_suffix(.log))]
    NotReady {
        name: String,
        seconds: f64,
        log: String,
    },
    /// The namespace to run in cannot be opened.
    #[error("network namespace {}: {source}", .path.display())]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file the supervisor keeps (pid file, log) cannot be written or read.
    #[error("{what} {}: {source}", .path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("signal {signal} to {name} (pid {pid}): {source}")]
    Signal {
        name: String,
        pid: u32,
        signal: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("{name} is stopped")]
    Stopped { name: String },
}

fn stderr_suffix(text: &str) -> String {
    if text.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", text.trim())
    }
}

/// The last `TAIL_LINES` lines of `text`.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// A command line as a person would type it (arguments with spaces quoted).
fn command_line(program: &str, args: &[String]) -> String {
    std::iter::once(program.to_string())
        .chain(args.iter().map(|a| {
            if a.is_empty() || a.contains([' ', '"', '\'']) {
                format!("{a:?}")
            } else {
                a.clone()
            }
        }))
        .collect::<Vec<_>>()
        .join(" ")
}
