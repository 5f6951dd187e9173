use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tenet::calico::ensure_initialized;
use tenet::dump::dump;
use tenet::testbed::EtcdServer;

use super::CliError;

#[derive(Debug, Args)]
pub struct LabArgs {
    /// Stop after this many seconds instead of waiting for Ctrl-C (0: set up, check, stop).
    #[arg(long, value_name = "SECONDS")]
    duration: Option<u64>,
}

/// Starts a real etcd in a temporary directory, initialises the Calico keyspace, prints how
/// to point the CLI at it, and tears everything down on Ctrl-C (or after --duration).
pub async fn run(args: &LabArgs) -> Result<ExitCode, CliError> {
    let etcd = EtcdServer::start()
        .await
        .context("cannot start the lab's etcd")?;
    let store = etcd
        .store()
        .await
        .context("cannot connect to the lab's etcd")?;
    ensure_initialized(&store)
        .await
        .context("cannot initialise the Calico keyspace")?;
    let entries = dump(&store, "/calico")
        .await
        .context("cannot list the keyspace")?;
    println!(
        "lab: etcd {} (data in {})",
        etcd.endpoint(),
        etcd.data_dir().display()
    );
    println!("lab: Calico keyspace initialised ({} keys)", entries.len());
    println!("lab: try   ETCD_ENDPOINTS={} tenet dump", etcd.endpoint());
    match args.duration {
        Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
        None => {
            println!("lab: running; Ctrl-C stops it and removes everything");
            tokio::signal::ctrl_c()
                .await
                .context("cannot wait for Ctrl-C")?;
        }
    }
    drop(etcd);
    println!("lab: stopped, etcd and its data removed");
    Ok(ExitCode::SUCCESS)
}
