//! Real parts for tests, benchmarks and the lab: an etcd server in a temporary directory,
//! network namespaces that are always deleted, and netlink handles bound inside them.
//!
//! Every object here is a guard: dropping it (also while unwinding from a failed
//! assertion) stops the process or deletes the namespace it owns.

mod etcd;
mod etcd_cluster;
mod fabric;
mod netns;

pub use etcd::{EtcdServer, EtcdServerTls};
pub use etcd_cluster::EtcdCluster;
pub use fabric::{Fabric, Host, Workload};
pub use netns::{Netns, delete_netns};

use std::process::{Command, Output};

/// Errors from building or running test infrastructure.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error(transparent)]
    Net(#[from] crate::net::NetError),
    #[error("etcd at {endpoint} did not become ready within {seconds} s; last log lines:\n{log}")]
    EtcdNotReady {
        endpoint: String,
        seconds: u64,
        log: String,
    },
}

pub type TestbedResult<T> = Result<T, TestbedError>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestbedError {
    let what = what.into();
    move |source| TestbedError::Io { what, source }
}

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
pub fn run(cmd: &mut Command) -> TestbedResult<Output> {
    let text = describe(cmd);
    let out = cmd
        .output()
        .map_err(io_err(format!("cannot run `{text}`")))?;
    if !out.status.success() {
        return Err(TestbedError::Command {
            command: text,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}
