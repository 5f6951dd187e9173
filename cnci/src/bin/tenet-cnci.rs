//! `tenet-cnci`: the concentrator's command. `run` is the agent (SSNTP + etcd); `show` is a
//! read-only view of a live concentrator.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnetwork::Ipv4Network;
use serde::Deserialize;
use ssntp::{Identity, TlsFiles, Uuid};
use tenet::logging::LogFormat;
use tenet::net::tunnel::{BackendChoice, TunnelTtl};
use tenet::store::Datastore;
use tenet::store::config::DatastoreConfig;
use tenet_cnci::CnciConfig;
use tenet_cnci::agent::AgentConfig;

const RUN_HELP: &str = "\
Configuration comes from a YAML file (--config), the environment (TENET_CNCI_*) and flags;
flags win over the environment, which wins over the file. File keys are the flag names with
underscores: servers, cert, ca, uuid, tenant, netns, compute_nets, tunnel_local, uplink_nets,
uplink_addr, tunnel, tunnel_ttl, run_dir, mesh_cidr, datastore_config, status_ttl, metrics_address,
ciao_compat_certs, log_format.

The certificate must hold the cnciagent role. The datastore follows calicoctl: a
calicoApiConfig file (--datastore-config) or ETCD_ENDPOINTS.

Example:
  tenet cert issue --ca /etc/tenet/pki/CAkey-tenet.pem --role cnciagent --host cnci-a \\
      --out /etc/tenet/pki
  ETCD_ENDPOINTS=http://10.0.0.5:2379 tenet-cnci run \\
      --server 10.0.0.5:8888 --cert /etc/tenet/pki/cert-CNCIAgent-cnci-a.pem \\
      --ca /etc/tenet/pki/CAcert-tenet.pem --uuid 6f0a…-…  --tenant acme \\
      --compute-net 10.254.0.0/16 --uplink-net 192.0.2.0/24 --mesh-cidr 192.168.128.0/24";

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
    /// Run the concentrator agent: rebuild from the kernel and etcd, connect to the
    /// scheduler, and serve TenantAdded/Removed (in the order they arrive per subnet),
    /// AssignPublicIP/ReleasePublicIP and RefreshCNCI (each after everything received
    /// before it). Stops on SIGTERM or Ctrl-C, leaving the
    /// dataplane for the next start to take over.
    #[command(after_help = RUN_HELP)]
    Run(Box<RunArgs>),
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

#[derive(Debug, Args)]
struct RunArgs {
    /// YAML file with any of the settings below.
    #[arg(long, env = "TENET_CNCI_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Scheduler address host:port (repeat, or comma-separate, for fallbacks).
    #[arg(
        long = "server",
        env = "TENET_CNCI_SERVERS",
        value_delimiter = ',',
        value_name = "HOST:PORT"
    )]
    servers: Vec<String>,
    /// PEM file with this agent's certificate (cnciagent role) and key.
    #[arg(long, env = "TENET_CNCI_CERT", value_name = "FILE")]
    cert: Option<PathBuf>,
    /// PEM file with the CA certificate.
    #[arg(long, env = "TENET_CNCI_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// The SSNTP UUID the scheduler routes by (ciao's concentrator_uuid); also the
    /// concentrator's id in etcd and in its links' aliases.
    #[arg(long, env = "TENET_CNCI_UUID")]
    uuid: Option<Uuid>,
    /// The one tenant this concentrator serves.
    #[arg(long, env = "TENET_CNCI_TENANT")]
    tenant: Option<String>,
    /// Work in this network namespace (default: the agent's own).
    #[arg(long, env = "TENET_CNCI_NETNS", value_name = "PATH")]
    netns: Option<PathBuf>,
    /// CIDR the compute link (where tunnels arrive) is in (repeatable).
    #[arg(
        long = "compute-net",
        env = "TENET_CNCI_COMPUTE_NETS",
        value_delimiter = ','
    )]
    compute_nets: Vec<Ipv4Network>,
    /// The tunnels' local address (wins over --compute-net).
    #[arg(long, env = "TENET_CNCI_TUNNEL_LOCAL")]
    tunnel_local: Option<Ipv4Addr>,
    /// CIDR the uplink (external network) is in (repeatable).
    #[arg(
        long = "uplink-net",
        env = "TENET_CNCI_UPLINK_NETS",
        value_delimiter = ','
    )]
    uplink_nets: Vec<Ipv4Network>,
    /// The uplink address (wins over --uplink-net).
    #[arg(long, env = "TENET_CNCI_UPLINK_ADDR")]
    uplink_addr: Option<Ipv4Addr>,
    /// Tunnel backend: auto (kernel gretap, else eBPF GRE, else user-space GRE), kernel, ebpf,
    /// userspace or vxlan.
    #[arg(long, env = "TENET_CNCI_TUNNEL")]
    tunnel: Option<BackendChoice>,
    /// Outer TTL of GRE tunnels: inherit (the inner packet's, as gretap does; default) or 1-255.
    #[arg(long, env = "TENET_CNCI_TUNNEL_TTL", value_name = "TTL")]
    tunnel_ttl: Option<TunnelTtl>,
    /// Run directory (dnsmasq files, sysctl memo).
    #[arg(long, env = "TENET_CNCI_RUN_DIR", value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// CIDR for tenant-mesh addresses when RefreshCNCI does not carry them.
    #[arg(long, env = "TENET_CNCI_MESH_CIDR")]
    mesh_cidr: Option<Ipv4Network>,
    /// calicoctl-style datastore configuration (kind calicoApiConfig); default: ETCD_ENDPOINTS.
    #[arg(long, env = "TENET_CNCI_DATASTORE_CONFIG", value_name = "FILE")]
    datastore_config: Option<PathBuf>,
    /// Accept ciao-made certificates (the "any" extended key usage; the CA certificate as the
    /// scheduler's), still checking the chain, signatures and validity periods.
    #[arg(long, env = "TENET_CNCI_CIAO_COMPAT_CERTS")]
    ciao_compat_certs: bool,
    /// Seconds the status key outlives a dead agent.
    #[arg(long, env = "TENET_CNCI_STATUS_TTL")]
    status_ttl: Option<u64>,
    /// Serve /metrics (Prometheus), /healthz and /readyz (etcd answers, scheduler connected)
    /// on this address, e.g. 127.0.0.1:9102; off unless given. Not authenticated: use a
    /// loopback or management address.
    #[arg(long, env = "TENET_CNCI_METRICS_ADDRESS", value_name = "ADDR:PORT")]
    metrics_address: Option<std::net::SocketAddr>,
    /// Log as text (default) or as one JSON object per line (for log collectors).
    #[arg(long, env = "TENET_CNCI_LOG_FORMAT", value_name = "text|json")]
    log_format: Option<LogFormat>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    servers: Vec<String>,
    cert: Option<PathBuf>,
    ca: Option<PathBuf>,
    uuid: Option<Uuid>,
    tenant: Option<String>,
    netns: Option<PathBuf>,
    #[serde(default)]
    compute_nets: Vec<Ipv4Network>,
    tunnel_local: Option<Ipv4Addr>,
    #[serde(default)]
    uplink_nets: Vec<Ipv4Network>,
    uplink_addr: Option<Ipv4Addr>,
    tunnel: Option<String>,
    tunnel_ttl: Option<String>,
    run_dir: Option<PathBuf>,
    mesh_cidr: Option<Ipv4Network>,
    datastore_config: Option<PathBuf>,
    status_ttl: Option<u64>,
    #[serde(default)]
    ciao_compat_certs: bool,
    log_format: Option<String>,
    metrics_address: Option<std::net::SocketAddr>,
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
    let result = match cli.command {
        Command::Run(args) => runtime.block_on(run_agent(*args)).map_err(|e| (1, e)),
        Command::Show {
            netns,
            run_dir,
            id,
            config,
            output,
        } => runtime.block_on(show(netns, run_dir, id, config, output)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, e)) => {
            eprintln!("tenet-cnci: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn read_file_config(path: &Path) -> anyhow::Result<FileConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Flags (and the environment, which clap reads) win over the file.
fn agent_config(args: RunArgs) -> anyhow::Result<(AgentConfig, Option<PathBuf>)> {
    let file = match &args.config {
        Some(path) => read_file_config(path)?,
        None => FileConfig::default(),
    };
    let servers = if args.servers.is_empty() {
        file.servers
    } else {
        args.servers
    };
    if servers.is_empty() {
        bail!(
            "no scheduler: give --server HOST:PORT (or TENET_CNCI_SERVERS, or servers: in --config)"
        );
    }
    let (Some(cert), Some(ca)) = (args.cert.or(file.cert), args.ca.or(file.ca)) else {
        bail!("--cert and --ca are required (see --help for how to make them)");
    };
    let identity = Identity::load(&TlsFiles { cert, ca })?
        .with_ciao_compat(args.ciao_compat_certs || file.ciao_compat_certs);
    let uuid = args.uuid.or(file.uuid).ok_or_else(|| {
        anyhow!("--uuid is required: the UUID the scheduler routes this concentrator's frames by")
    })?;
    let tenant = args
        .tenant
        .or(file.tenant)
        .ok_or_else(|| anyhow!("--tenant is required: the tenant this concentrator serves"))?;
    let mut c = CnciConfig::new(&uuid.to_string(), &tenant);
    c.netns = args.netns.or(file.netns);
    c.compute_nets = if args.compute_nets.is_empty() {
        file.compute_nets
    } else {
        args.compute_nets
    };
    c.tunnel_local = args.tunnel_local.or(file.tunnel_local);
    c.uplink_nets = if args.uplink_nets.is_empty() {
        file.uplink_nets
    } else {
        args.uplink_nets
    };
    c.uplink_addr = args.uplink_addr.or(file.uplink_addr);
    c.tunnel = match (args.tunnel, file.tunnel) {
        (Some(t), _) => t,
        (None, Some(t)) => t.parse().map_err(|e: String| anyhow!("tunnel: {e}"))?,
        (None, None) => BackendChoice::Auto,
    };
    c.tunnel_ttl = match (args.tunnel_ttl, file.tunnel_ttl) {
        (Some(t), _) => t.0,
        (None, Some(t)) => {
            t.parse::<TunnelTtl>()
                .map_err(|e| anyhow!("tunnel_ttl: {e}"))?
                .0
        }
        (None, None) => None,
    };
    if let Some(dir) = args.run_dir.or(file.run_dir) {
        c.run_dir = dir;
    }
    let config = AgentConfig {
        concentrator: c,
        servers,
        identity,
        uuid,
        mesh_cidr: args.mesh_cidr.or(file.mesh_cidr),
        status_ttl: Duration::from_secs(args.status_ttl.or(file.status_ttl).unwrap_or(10).max(2)),
        metrics_address: args.metrics_address.or(file.metrics_address),
    };
    Ok((config, args.datastore_config.or(file.datastore_config)))
}

async fn run_agent(args: RunArgs) -> anyhow::Result<()> {
    let file_format = match &args.config {
        Some(path) => read_file_config(path)?.log_format,
        None => None,
    };
    tenet::logging::init(
        LogFormat::choose(args.log_format, file_format.as_deref()).map_err(|e| anyhow!(e))?,
    );
    let (config, datastore) = agent_config(args)?;
    let ds = DatastoreConfig::resolve(datastore.as_deref(), |k| std::env::var(k).ok())?;
    let store: Arc<dyn Datastore> = Arc::new(ds.connect().await.with_context(|| {
        format!(
            "cannot reach etcd at {} ({})",
            ds.endpoints.join(","),
            ds.source
        )
    })?);
    let shutdown = tenet::process::terminated()?;
    tenet_cnci::agent::run(config, store, shutdown).await?;
    Ok(())
}

async fn show(
    netns: Option<PathBuf>,
    run_dir: PathBuf,
    id: Option<String>,
    config: Option<PathBuf>,
    output: Output,
) -> Result<(), (u8, anyhow::Error)> {
    let store = match &id {
        Some(_) => {
            let ds = DatastoreConfig::resolve(config.as_deref(), |k| std::env::var(k).ok())
                .map_err(|e| (1, e.into()))?;
            Some(ds.connect().await.map_err(|e| {
                (
                    2,
                    anyhow!(
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

/// The packaged example (`packaging/examples/{name}`) as shipped, and with every optional
/// `# key: value` line switched on: both must parse, so the example names no key the
/// program does not know.
#[cfg(test)]
fn example_variants(name: &str) -> [String; 2] {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/examples")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let all = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(": ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                }) =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    [text, all]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packaged_example_configuration_parses() {
        let variants = example_variants("cnci.yaml");
        assert_ne!(variants[0], variants[1], "the example shows optional keys");
        for text in variants {
            if let Err(e) = serde_saphyr::from_str::<FileConfig>(&text) {
                panic!("packaging/examples/cnci.yaml: {e}\n{text}");
            }
        }
    }
}
