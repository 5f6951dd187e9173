//! `tenet felix-driver`: tenet's policy dataplane as Felix's external driver.

use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::{Args, ValueEnum};
use tenet::policy::dataplane::PolicyDataplane;
use tenet::policy::driver;
use tenet::policy::render::WorkloadHook;

use super::CliError;

pub const AFTER_HELP: &str = "\
Felix starts its dataplane driver (UseInternalDataplaneDriver=false, DataplaneDriver=<path>)
with two pipes: fd 3 carries Felix's ToDataplane messages, fd 4 takes the driver's
FromDataplane answers, each an 8-byte little-endian length and a protobuf envelope.

Example (Felix's configuration):
  FELIX_USEINTERNALDATAPLANEDRIVER=false
  FELIX_DATAPLANEDRIVER=/usr/local/bin/tenet-felix-driver   # a script: exec tenet felix-driver
Bridged workloads (tenet's GRE mode, VNIC ports on bridges):
  tenet felix-driver --hook bridged --interface-prefix tvn_";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Hook {
    /// Workload interfaces are routed (`-i`/`-o`), as Felix's own driver does.
    Routed,
    /// Workload interfaces are bridge ports (`physdev` through br_netfilter).
    Bridged,
}

#[derive(Debug, Args)]
pub struct FelixDriverArgs {
    /// The network namespace whose firewall is programmed (default: this process's).
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// How workload traffic reaches the endpoint chains.
    #[arg(long, value_enum, default_value = "routed")]
    hook: Hook,
    /// Workload interface name prefixes (Felix's InterfacePrefix), comma-separated.
    #[arg(
        long = "interface-prefix",
        value_delimiter = ',',
        default_value = "cali"
    )]
    prefixes: Vec<String>,
    /// Seconds between ProcessStatusUpdate messages.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    status_interval: u64,
    /// The descriptor Felix writes to.
    #[arg(long, default_value_t = 3)]
    input_fd: RawFd,
    /// The descriptor Felix reads from.
    #[arg(long, default_value_t = 4)]
    output_fd: RawFd,
}

/// Takes ownership of an inherited descriptor, refusing one that is not open.
fn inherited(fd: RawFd, what: &str) -> anyhow::Result<tokio::fs::File> {
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(anyhow!(
            "fd {fd} ({what}) is not open: felix-driver is started by Felix with its pipes on \
             fd 3 and 4 (see --help)"
        ));
    }
    // SAFETY: the descriptor is open and nothing else in this process owns it.
    Ok(tokio::fs::File::from_std(unsafe {
        std::fs::File::from_raw_fd(fd)
    }))
}

pub async fn run(args: &FelixDriverArgs) -> Result<ExitCode, CliError> {
    let input = inherited(args.input_fd, "Felix → driver")?;
    let output = inherited(args.output_fd, "driver → Felix")?;
    let hook = match args.hook {
        Hook::Routed => WorkloadHook::Routed {
            prefixes: args.prefixes.clone(),
        },
        Hook::Bridged => WorkloadHook::Bridged {
            prefixes: args.prefixes.clone(),
        },
    };
    let dataplane = PolicyDataplane::new(args.netns.as_deref(), hook, None)
        .await
        .context("setting up the firewall")?;
    driver::run(
        input,
        output,
        dataplane,
        Duration::from_secs(args.status_interval.max(1)),
    )
    .await
    .context("felix driver")?;
    Ok(ExitCode::SUCCESS)
}
