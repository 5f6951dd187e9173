//! tenet-scheduler: the SSNTP server that every tenet and ciao node connects to. It checks
//! each node's certificate role and forwards frames by ciao's networking rules.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde::Deserialize;
use ssntp::payload::{Configure, Payload};
use ssntp::{Identity, Role, Server, ServerConfig, TlsFiles, Uuid, scheduler};
use tracing::info;

const AFTER_HELP: &str = "\
Forwarding rules:
  TenantAdded, TenantRemoved           -> the CNCI whose UUID is `concentrator_uuid`
  AssignPublicIP, ReleasePublicIP      -> `concentrator_uuid` (from the master controller)
  RefreshCNCI                          -> `cnci_uuid` (from the master controller)
  START                                -> a compute node (a network node if asked), round robin
                                          (from the master controller)
  The master controller is the first connected; when it leaves, the next one.
  ConcentratorInstanceAdded, PublicIPAssigned/Unassigned, public-IP errors, STATS,
  InstanceDeleted/Stopped, TraceReport -> every controller
  NodeConnected/NodeDisconnected       -> every controller, when agents come and go (one per
                                          node role); a late controller hears of every node

Certificates come from `tenet cert`: the scheduler's file must carry the scheduler role.

Example:
  tenet cert ca --out /etc/tenet/pki
  tenet cert issue --ca /etc/tenet/pki/CAkey-tenet.pem --role scheduler,server \\
      --host sched.example --ip 10.0.0.5 --out /etc/tenet/pki
  tenet-scheduler --cert /etc/tenet/pki/cert-Server-Scheduler-sched.example.pem \\
      --ca /etc/tenet/pki/CAcert-tenet.pem --configuration cluster.yaml";

/// The SSNTP scheduler: mutual-TLS server and frame forwarder for tenet and ciao nodes.
#[derive(Parser, Debug)]
#[command(name = "tenet-scheduler", version, after_help = AFTER_HELP)]
struct Args {
    /// YAML file with any of the keys below (listen, cert, ca, uuid, configuration); flags win.
    #[arg(long, env = "TENET_SCHEDULER_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "TENET_SCHEDULER_LISTEN")]
    listen: Option<SocketAddr>,
    /// PEM file holding the scheduler's certificate and private key.
    #[arg(long, env = "TENET_SCHEDULER_CERT")]
    cert: Option<PathBuf>,
    /// PEM file with the CA certificate that signed every node's certificate.
    #[arg(long, env = "TENET_SCHEDULER_CA")]
    ca: Option<PathBuf>,
    /// The scheduler's SSNTP UUID (default: a new random one per start).
    #[arg(long)]
    uuid: Option<Uuid>,
    /// Cluster configuration YAML (`configure:` document) sent to every node on connect.
    #[arg(long)]
    configuration: Option<PathBuf>,
    /// Accept ciao-made certificates (the "any" extended key usage; the CA certificate as a
    /// peer's), still checking the chain, signatures and validity periods.
    #[arg(long, env = "TENET_CIAO_COMPAT_CERTS")]
    ciao_compat_certs: bool,
    /// Log as text (default) or as one JSON object per line (for log collectors).
    #[arg(
        long,
        env = "TENET_SCHEDULER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Serve /metrics (Prometheus: sessions by role, frames forwarded, discarded, invalid),
    /// /healthz and /readyz on this address, e.g. 127.0.0.1:9100; off unless given. Not
    /// authenticated: use a loopback or management address.
    #[arg(
        long,
        env = "TENET_SCHEDULER_METRICS_ADDRESS",
        value_name = "ADDR:PORT"
    )]
    metrics_address: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    cert: Option<PathBuf>,
    ca: Option<PathBuf>,
    uuid: Option<Uuid>,
    configuration: Option<PathBuf>,
    #[serde(default)]
    ciao_compat_certs: bool,
    metrics_address: Option<SocketAddr>,
}

#[path = "scheduler/metrics.rs"]
mod scheduler_metrics;

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    // As tenet::logging does for the agents (this crate depends on nothing of tenet's).
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().with_span_list(true).init(),
    }
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_saphyr::from_str::<FileConfig>(&text)
                .with_context(|| format!("parsing {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], ssntp::types::DEFAULT_PORT)));
    let (Some(cert), Some(ca)) = (args.cert.or(file.cert), args.ca.or(file.ca)) else {
        bail!("--cert and --ca are required (see --help for how to make them)");
    };
    let identity = Identity::load(&TlsFiles { cert, ca })?
        .with_ciao_compat(args.ciao_compat_certs || file.ciao_compat_certs);
    if !identity.roles().contains(Role::SCHEDULER) {
        bail!(
            "the certificate holds roles {} but not scheduler; issue one with --role scheduler",
            identity.roles()
        );
    }
    let uuid = args.uuid.or(file.uuid).unwrap_or_else(Uuid::new_v4);
    let mut config = ServerConfig::new(listen, identity, uuid);
    if let Some(path) = args.configuration.or(file.configuration) {
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Configure::from_yaml(&bytes).with_context(|| format!("{}", path.display()))?;
        config.configuration = bytes;
    }
    let sched = scheduler::Scheduler::new();
    let server = Server::start(config, sched.rules(), sched.clone()).await?;
    info!(addr = %server.local_addr(), %uuid, "tenet-scheduler ready");
    if let Some(address) = args.metrics_address.or(file.metrics_address) {
        scheduler_metrics::serve(address, server.handle())
            .await
            .with_context(|| format!("metrics address {address}"))?;
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("shutting down");
    server.shutdown().await;
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
        let variants = example_variants("scheduler.yaml");
        assert_ne!(variants[0], variants[1], "the example shows optional keys");
        for text in variants {
            if let Err(e) = serde_saphyr::from_str::<FileConfig>(&text) {
                panic!("packaging/examples/scheduler.yaml: {e}\n{text}");
            }
        }
    }
}
