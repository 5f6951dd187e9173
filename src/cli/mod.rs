//! Command-line parsing and the exit-status convention:
//! 0 success, 1 the command ran but found or hit a problem, 2 the datastore is unreachable
//! (or the command line is wrong, as clap reports it).

mod cert;
mod config;
mod control;
mod dump;
mod felix_driver;
mod ipam;
mod lab;
mod node;
mod resource;
mod status;
mod template;
mod topology;
mod tunnel;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tenet::store::config::DatastoreConfig;
use tenet::store::{EtcdStore, StoreError};

/// tenet: tenant networking for multi-tenant clouds.
///
/// The datastore is etcd, found from --config FILE (calicoctl's calicoApiConfig YAML with
/// etcdEndpoints), else the ETCD_ENDPOINTS environment variable, else http://127.0.0.1:2379.
#[derive(Debug, Parser)]
#[command(name = "tenet", version, propagate_version = true)]
struct Cli {
    /// calicoctl-style client configuration file (YAML or JSON, kind calicoApiConfig).
    #[arg(short = 'c', long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Log level for messages on stderr (error, warn, info, debug, trace); RUST_LOG also works.
    #[arg(
        short = 'l',
        long,
        global = true,
        value_name = "LEVEL",
        default_value = "warn"
    )]
    log_level: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make SSNTP certificates: a CA, and node certificates carrying roles.
    Cert(cert::CertArgs),
    /// List every key under a prefix with the kind of object it holds.
    ///
    /// Keys whose value does not decode are listed with the reason; the exit status is then 1.
    Dump(dump::DumpArgs),
    /// Calico IP address management: assign, release, show, check, pools.
    Ipam(ipam::IpamArgs),
    /// Run the whole multi-tenant cloud on this machine, in network namespaces: etcd, the
    /// scheduler, compute nodes, a concentrator per tenant and DHCP workloads of two
    /// overlapping tenants, checked by traffic; until Ctrl-C.
    Lab(lab::LabArgs),
    /// Every running agent (compute nodes, concentrators) with its subnets and tunnels, from
    /// the status keys they keep alive in etcd.
    Status(status::StatusArgs),
    /// Start or delete an instance's networking (controller; SSNTP START / DELETE).
    Instance(control::InstanceArgs),
    /// Assign or release a floating IP on a concentrator (controller; SSNTP).
    #[command(name = "public-ip")]
    PublicIp(control::PublicIpArgs),
    /// Concentrator commands (controller; SSNTP RefreshCNCI).
    Cnci(control::CnciArgs),
    /// Create resources from a file (calicoctl create): every calicoctl v1 kind.
    Create(resource::WriteArgs),
    /// Replace existing resources from a file (calicoctl replace).
    Replace(resource::WriteArgs),
    /// Create or overwrite resources from a file (calicoctl apply).
    Apply(resource::WriteArgs),
    /// Delete resources named in a file, or KIND NAME (calicoctl delete).
    Delete(resource::DeleteArgs),
    /// Show resources of a kind (calicoctl get): -o ps, wide, custom-columns=…, yaml, json.
    Get(resource::GetArgs),
    /// Cluster settings as calicoctl set them: logLevel, nodeToNodeMesh, asNumber, ipip.
    Config(config::ConfigArgs),
    /// Run as Felix's external dataplane driver: policy messages on fd 3, status on fd 4,
    /// rendered into Calico's iptables chains and IP sets.
    #[command(name = "felix-driver", after_help = felix_driver::AFTER_HELP)]
    FelixDriver(felix_driver::FelixDriverArgs),
    /// This host as a routed-mode node: `status` (BGP sessions from BIRD) and
    /// `checksystem` (kernel features and programs tenet needs).
    Node(node::NodeArgs),
    /// The tunnel datapath on this machine: `stats` (packets, errors, drops per tunnel).
    Tunnel(tunnel::TunnelArgs),
    /// Print the client version.
    Version,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tenet: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Cert(args) => cert::run(args),
            Command::Dump(args) => dump::run(&cli, args).await,
            Command::Ipam(args) => ipam::run(&cli, args).await,
            Command::Lab(args) => lab::run(args).await,
            Command::Node(args) => node::run(args).await,
            Command::Status(args) => status::run(&cli, args).await,
            Command::Instance(args) => control::instance(args).await,
            Command::PublicIp(args) => control::public_ip(args).await,
            Command::Cnci(args) => control::cnci(args).await,
            Command::Create(args) => resource::write(&cli, resource::Verb::Create, args).await,
            Command::Replace(args) => resource::write(&cli, resource::Verb::Replace, args).await,
            Command::Apply(args) => resource::write(&cli, resource::Verb::Apply, args).await,
            Command::Delete(args) => resource::delete(&cli, args).await,
            Command::Get(args) => resource::get(&cli, args).await,
            Command::Config(args) => config::run(&cli, args).await,
            Command::FelixDriver(args) => felix_driver::run(args).await,
            Command::Tunnel(args) => tunnel::run(args),
            Command::Version => {
                println!("Client Version:    {}", env!("CARGO_PKG_VERSION"));
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tenet: {e}");
            ExitCode::from(e.exit_status())
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// A failure that ends a command, with its exit status.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach etcd at {endpoints} ({source_of_config}): {reason}")]
    Unreachable {
        endpoints: String,
        source_of_config: String,
        reason: String,
    },
    /// Shown with its whole chain of causes ("what: why: deeper why").
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl CliError {
    fn exit_status(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } => 2,
            CliError::Other(_) => 1,
        }
    }
}

/// Resolves the datastore configuration and connects.
async fn connect(cli: &Cli) -> Result<(EtcdStore, DatastoreConfig), CliError> {
    let config = DatastoreConfig::resolve(cli.config.as_deref(), |k| std::env::var(k).ok())
        .map_err(anyhow::Error::from)?;
    let store = config
        .connect()
        .await
        .map_err(|e| store_error(&config, e))?;
    Ok((store, config))
}

/// Turns a datastore error into a CLI error: unreachable etcd gets its own exit status.
fn store_error(config: &DatastoreConfig, err: StoreError) -> CliError {
    match err {
        StoreError::Unavailable { reason, .. } => CliError::Unreachable {
            endpoints: config.endpoints.join(","),
            source_of_config: config.source.clone(),
            reason,
        },
        other => CliError::Other(other.into()),
    }
}
