//! `tenet-cnci`: the concentrator's command. Today: `show`, a read-only view of a live
//! concentrator (the agent comes with the SSNTP work).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tenet::store::config::DatastoreConfig;

/// tenet-cnci: the concentrator of one tenant (remote subnets, DHCP, NAT, floating IPs, mesh).
#[derive(Debug, Parser)]
#[command(name = "tenet-cnci", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show a live concentrator: its subnets with their bridges, compute nodes, dnsmasq and
    /// leases, its mesh tunnels and firewall rules (from the kernel), and its port forwards,
    /// floating IPs and mesh list (from etcd, with --id). Changes nothing.
    Show {
        /// The network namespace the concentrator runs in (default: this one).
        #[arg(long, value_name = "PATH")]
        netns: Option<PathBuf>,
        /// Its run directory.
        #[arg(long, value_name = "DIR", default_value = tenet_cnci::config::DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
        /// Its id: read its desired state from etcd too (ETCD_ENDPOINTS or --config).
        #[arg(long)]
        id: Option<String>,
        /// calicoctl-style datastore configuration (kind calicoApiConfig).
        #[arg(short = 'c', long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tenet-cnci: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, e)) => {
            eprintln!("tenet-cnci: {e:#}");
            ExitCode::from(code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), (u8, anyhow::Error)> {
    let Command::Show {
        netns,
        run_dir,
        id,
        config,
        output,
    } = cli.command;
    let store = match &id {
        Some(_) => {
            let ds = DatastoreConfig::resolve(config.as_deref(), |k| std::env::var(k).ok())
                .map_err(|e| (1, e.into()))?;
            Some(ds.connect().await.map_err(|e| {
                (
                    2,
                    anyhow::anyhow!(
                        "cannot reach etcd at {} ({}): {e}",
                        ds.endpoints.join(","),
                        ds.source
                    ),
                )
            })?)
        }
        None => None,
    };
    let view = tenet_cnci::show::inspect(
        netns.as_deref(),
        &run_dir,
        store
            .as_ref()
            .zip(id.as_deref())
            .map(|(s, i)| (s as &dyn tenet::store::Datastore, i)),
    )
    .await
    .map_err(|e| (1, e.into()))?;
    match output {
        Output::Table => print!("{}", tenet_cnci::show::render_table(&view)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&view).expect("the view serialises")
        ),
    }
    Ok(())
}
