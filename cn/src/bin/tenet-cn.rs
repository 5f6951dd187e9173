//! `tenet-cn`: the compute node's command. `run` is the agent (SSNTP + etcd).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use ipnetwork::Ipv4Network;
use serde::Deserialize;
use ssntp::{Identity, TlsFiles, Uuid};
use tenet::logging::LogFormat;
use tenet::net::tunnel::{BackendChoice, TunnelTtl};
use tenet::store::Datastore;
use tenet::store::config::DatastoreConfig;
use tenet_cn::CnConfig;
use tenet_cn::agent::AgentConfig;
use tenet_cn::agent::routed::RoutedConfig;

const RUN_HELP: &str = "\
Configuration comes from a YAML file (--config), the environment (TENET_CN_*) and flags;
flags win over the environment, which wins over the file. File keys are the flag names with
underscores: servers, cert, ca, uuid, host, orchestrator, netns, compute_nets,
management_nets, tunnel_local, tunnel, tunnel_ttl, datastore_config, status_ttl,
ciao_compat_certs, api_socket, docker_socket, metrics_address, policy, log_format, mode, bird, bird_dir, as_number,
bgp_ipv6, bgp_hold_time.

Routed mode (--mode routed) replaces bridges, tunnels and concentrators by Calico's model:
each VNIC is routed by a /32 host route with proxy ARP, addresses come from Calico's pools
(`tenet ipam pool add`), and BIRD 2 (Debian `bird2`), configured by tenet from etcd, announces
this host's blocks to the other hosts and to the peers in /calico/bgp/v1. `tenet node status`
shows the sessions.

The certificate's role says what the node is: agent (compute node) or netagent (network
node), or both. The datastore follows calicoctl: a calicoApiConfig file (--datastore-config)
or ETCD_ENDPOINTS.

Example:
  tenet cert issue --ca /etc/tenet/pki/CAkey-tenet.pem --role agent --host cn-1 \\
      --out /etc/tenet/pki
  ETCD_ENDPOINTS=http://10.0.0.5:2379 tenet-cn run --server 10.0.0.5:8888 \\
      --cert /etc/tenet/pki/cert-Agent-cn-1.pem --ca /etc/tenet/pki/CAcert-tenet.pem \\
      --host cn-1 --compute-net 10.254.0.0/16";

/// tenet-cn: the compute node of a tenet cloud (tenant VNICs, bridges, tunnels).
#[derive(Debug, Parser)]
#[command(name = "tenet-cn", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the compute-node agent: rebuild from the kernel, reconcile with the endpoints in
    /// etcd, connect to the scheduler, and serve START and DELETE in the order they arrive.
    /// Stops on SIGTERM or Ctrl-C, leaving the dataplane for the next start.
    #[command(after_help = RUN_HELP)]
    Run(RunArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// YAML file with any of the settings below.
    #[arg(long, env = "TENET_CN_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Scheduler address host:port (repeat, or comma-separate, for fallbacks).
    #[arg(
        long = "server",
        env = "TENET_CN_SERVERS",
        value_delimiter = ',',
        value_name = "HOST:PORT"
    )]
    servers: Vec<String>,
    /// PEM file with this agent's certificate (agent and/or netagent role) and key.
    #[arg(long, env = "TENET_CN_CERT", value_name = "FILE")]
    cert: Option<PathBuf>,
    /// PEM file with the CA certificate.
    #[arg(long, env = "TENET_CN_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// This node's SSNTP UUID (default: a new one per start).
    #[arg(long, env = "TENET_CN_UUID")]
    uuid: Option<Uuid>,
    /// The Calico host name the endpoints are written under (default: the hostname).
    #[arg(long, env = "TENET_CN_HOST")]
    host: Option<String>,
    /// The orchestrator segment of endpoint keys.
    #[arg(long, env = "TENET_CN_ORCHESTRATOR")]
    orchestrator: Option<String>,
    /// Work in this network namespace (default: the agent's own).
    #[arg(long, env = "TENET_CN_NETNS", value_name = "PATH")]
    netns: Option<PathBuf>,
    /// CIDR the compute (tunnel) address is in (repeatable).
    #[arg(
        long = "compute-net",
        env = "TENET_CN_COMPUTE_NETS",
        value_delimiter = ','
    )]
    compute_nets: Vec<Ipv4Network>,
    /// CIDR the management address is in (repeatable).
    #[arg(
        long = "management-net",
        env = "TENET_CN_MANAGEMENT_NETS",
        value_delimiter = ','
    )]
    management_nets: Vec<Ipv4Network>,
    /// The tunnels' local address (wins over --compute-net).
    #[arg(long, env = "TENET_CN_TUNNEL_LOCAL")]
    tunnel_local: Option<Ipv4Addr>,
    /// Tunnel backend: auto (kernel gretap, else eBPF GRE, else user-space GRE), kernel, ebpf,
    /// userspace or vxlan.
    #[arg(long, env = "TENET_CN_TUNNEL")]
    tunnel: Option<BackendChoice>,
    /// Outer TTL of GRE tunnels: inherit (the inner packet's, as gretap does; default) or 1-255.
    #[arg(long, env = "TENET_CN_TUNNEL_TTL", value_name = "TTL")]
    tunnel_ttl: Option<TunnelTtl>,
    /// calicoctl-style datastore configuration (kind calicoApiConfig); default: ETCD_ENDPOINTS.
    #[arg(long, env = "TENET_CN_DATASTORE_CONFIG", value_name = "FILE")]
    datastore_config: Option<PathBuf>,
    /// Accept ciao-made certificates (the "any" extended key usage; the CA certificate as the
    /// scheduler's), still checking the chain, signatures and validity periods.
    #[arg(long, env = "TENET_CN_CIAO_COMPAT_CERTS")]
    ciao_compat_certs: bool,
    /// Serve the local API (create/destroy VNICs for a VM launcher, CNI or Docker plugin on
    /// this host) on this unix socket, root only; e.g. /run/tenet/cn.sock.
    #[arg(long, env = "TENET_CN_API_SOCKET", value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Serve Docker's remote network and IPAM driver on this unix socket; dockerd finds
    /// /run/docker/plugins/NAME.sock as the driver NAME: `docker network create -d tenet
    /// --ipam-driver tenet --ipam-opt tenant=T --subnet S -o tenant=T -o concentrator=UUID`.
    #[arg(long, env = "TENET_CN_DOCKER_SOCKET", value_name = "PATH")]
    docker_socket: Option<PathBuf>,
    /// Serve /metrics (Prometheus), /healthz and /readyz (etcd answers, scheduler connected)
    /// on this address, e.g. 127.0.0.1:9101; off unless given. Not authenticated: use a
    /// loopback or management address.
    #[arg(long, env = "TENET_CN_METRICS_ADDRESS", value_name = "ADDR:PORT")]
    metrics_address: Option<std::net::SocketAddr>,
    /// Seconds the status key outlives a dead agent.
    #[arg(long, env = "TENET_CN_STATUS_TTL")]
    status_ttl: Option<u64>,
    /// Log as text (default) or as one JSON object per line (for log collectors).
    #[arg(long, env = "TENET_CN_LOG_FORMAT", value_name = "text|json")]
    log_format: Option<LogFormat>,
    /// Enforce Calico policy (profiles, tags, selector policies in etcd) on this node's VNICs.
    /// The rules police the tenant bridges' VNIC ports through br_netfilter; each VNIC gets
    /// its tenant's profile `tenant.<tenant>` (created allowing everything). Stopping the
    /// agent removes the rules.
    #[arg(long, env = "TENET_CN_POLICY")]
    policy: bool,
    /// Networking mode of this node: gre (bridges and tunnels to concentrators; default) or
    /// routed (routed VNICs, BGP through BIRD).
    #[arg(long, env = "TENET_CN_MODE", value_name = "gre|routed")]
    mode: Option<String>,
    /// Routed mode: the BIRD 2 program.
    #[arg(long, env = "TENET_CN_BIRD", value_name = "PROGRAM")]
    bird: Option<String>,
    /// Routed mode: BIRD's directory (configuration, control socket `bird.ctl`, log).
    #[arg(long, env = "TENET_CN_BIRD_DIR", value_name = "DIR")]
    bird_dir: Option<PathBuf>,
    /// Routed mode: this node's AS number (default: the cluster's, `tenet config set asNumber`).
    #[arg(long, env = "TENET_CN_AS_NUMBER")]
    as_number: Option<String>,
    /// Routed mode: this node's IPv6 address for IPv6 BGP sessions and routes.
    #[arg(long, env = "TENET_CN_BGP_IPV6")]
    bgp_ipv6: Option<std::net::Ipv6Addr>,
    /// Routed mode: BGP hold time in seconds (keepalives every third of it); default 90.
    #[arg(long, env = "TENET_CN_BGP_HOLD_TIME")]
    bgp_hold_time: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    servers: Vec<String>,
    cert: Option<PathBuf>,
    ca: Option<PathBuf>,
    uuid: Option<Uuid>,
    host: Option<String>,
    orchestrator: Option<String>,
    netns: Option<PathBuf>,
    #[serde(default)]
    compute_nets: Vec<Ipv4Network>,
    #[serde(default)]
    management_nets: Vec<Ipv4Network>,
    tunnel_local: Option<Ipv4Addr>,
    tunnel: Option<String>,
    tunnel_ttl: Option<String>,
    datastore_config: Option<PathBuf>,
    status_ttl: Option<u64>,
    #[serde(default)]
    ciao_compat_certs: bool,
    api_socket: Option<PathBuf>,
    docker_socket: Option<PathBuf>,
    metrics_address: Option<std::net::SocketAddr>,
    #[serde(default)]
    policy: bool,
    log_format: Option<String>,
    mode: Option<String>,
    bird: Option<String>,
    bird_dir: Option<PathBuf>,
    as_number: Option<String>,
    bgp_ipv6: Option<std::net::Ipv6Addr>,
    bgp_hold_time: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tenet-cn: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let Command::Run(args) = cli.command;
    match runtime.block_on(run_agent(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tenet-cn: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn read_file_config(path: &Path) -> anyhow::Result<FileConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn either<T>(flag: Vec<T>, file: Vec<T>) -> Vec<T> {
    if flag.is_empty() { file } else { flag }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// Flags (and the environment, which clap reads) win over the file.
fn agent_config(args: RunArgs) -> anyhow::Result<(AgentConfig, Option<PathBuf>)> {
    let file = match &args.config {
        Some(path) => read_file_config(path)?,
        None => FileConfig::default(),
    };
    let servers = either(args.servers, file.servers);
    if servers.is_empty() {
        bail!(
            "no scheduler: give --server HOST:PORT (or TENET_CN_SERVERS, or servers: in --config)"
        );
    }
    let (Some(cert), Some(ca)) = (args.cert.or(file.cert), args.ca.or(file.ca)) else {
        bail!("--cert and --ca are required (see --help for how to make them)");
    };
    let identity = Identity::load(&TlsFiles { cert, ca })?
        .with_ciao_compat(args.ciao_compat_certs || file.ciao_compat_certs);
    let uuid = args.uuid.or(file.uuid).unwrap_or_else(Uuid::new_v4);
    let host = args
        .host
        .or(file.host)
        .or_else(hostname)
        .ok_or_else(|| anyhow!("--host is required: no hostname to default to"))?;
    let mut node = CnConfig::new(&uuid.to_string());
    node.netns = args.netns.or(file.netns);
    node.underlay.compute_nets = either(args.compute_nets, file.compute_nets);
    node.underlay.management_nets = either(args.management_nets, file.management_nets);
    node.underlay.tunnel_local = args.tunnel_local.or(file.tunnel_local);
    node.tunnel = match (args.tunnel, file.tunnel) {
        (Some(t), _) => t,
        (None, Some(t)) => t.parse().map_err(|e: String| anyhow!("tunnel: {e}"))?,
        (None, None) => BackendChoice::Auto,
    };
    node.tunnel_ttl = match (args.tunnel_ttl, file.tunnel_ttl) {
        (Some(t), _) => t.0,
        (None, Some(t)) => {
            t.parse::<TunnelTtl>()
                .map_err(|e| anyhow!("tunnel_ttl: {e}"))?
                .0
        }
        (None, None) => None,
    };
    let routed = match args.mode.or(file.mode).as_deref() {
        None | Some("gre") => None,
        Some("routed") => {
            let mut r = RoutedConfig::new();
            if let Some(bird) = args.bird.or(file.bird) {
                r.bird = bird;
            }
            if let Some(dir) = args.bird_dir.or(file.bird_dir) {
                r.run_dir = dir;
            }
            r.as_num = match args.as_number.or(file.as_number) {
                Some(text) => Some(
                    text.parse()
                        .map_err(|e: String| anyhow!("as_number: {e}"))?,
                ),
                None => None,
            };
            r.ip_v6 = args.bgp_ipv6.or(file.bgp_ipv6);
            if let Some(hold) = args.bgp_hold_time.or(file.bgp_hold_time) {
                if hold < 3 {
                    bail!("bgp_hold_time: {hold} s is below BGP's minimum of 3 s");
                }
                r.bird_options.hold_time = Duration::from_secs(hold);
                r.bird_options.keepalive_time = Duration::from_secs((hold / 3).max(1));
            }
            Some(r)
        }
        Some(other) => bail!("mode: unknown mode '{other}' (want gre or routed)"),
    };
    let config = AgentConfig {
        node,
        servers,
        identity,
        uuid,
        host,
        orchestrator: args
            .orchestrator
            .or(file.orchestrator)
            .unwrap_or_else(|| "ciao".into()),
        status_ttl: Duration::from_secs(args.status_ttl.or(file.status_ttl).unwrap_or(10).max(2)),
        api_socket: args.api_socket.or(file.api_socket),
        docker_socket: args.docker_socket.or(file.docker_socket),
        metrics_address: args.metrics_address.or(file.metrics_address),
        policy: args.policy || file.policy,
        routed,
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
    tenet_cn::agent::run(config, store, shutdown).await?;
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
        let variants = example_variants("cn.yaml");
        assert_ne!(variants[0], variants[1], "the example shows optional keys");
        for text in variants {
            if let Err(e) = serde_saphyr::from_str::<FileConfig>(&text) {
                panic!("packaging/examples/cn.yaml: {e}\n{text}");
            }
        }
    }
}
