//! `tenet tunnel stats`: the GRE datapaths' counters (user-space and eBPF), read from the
//! files they publish (no agent or etcd needed).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use tenet::net::tunnel::userspace::stats::{self, Published};

use super::CliError;

#[derive(Debug, Args)]
pub struct TunnelArgs {
    #[command(subcommand)]
    command: TunnelCommand,
}

#[derive(Debug, Subcommand)]
enum TunnelCommand {
    /// Packet, byte, error and drop counters of tenet's GRE datapaths (user-space and eBPF).
    ///
    /// Per tunnel: packets and bytes each way; TX ERR (frames not sent), of which TOO BIG
    /// (larger than the path MTU; ICMP counts the fragmentation-needed / packet-too-big
    /// replies sent to their senders); RX ERR (not delivered), of which ECN DROP (congestion
    /// experienced outside, not ECN-capable inside); ECN MARK (inner packets marked CE).
    /// Per namespace, packets dropped before any tunnel: malformed, unknown key (a known
    /// peer, a key it has no tunnel for) and unknown peer.
    ///
    /// The user-space datapath counts in place; the eBPF datapath's counters (per-CPU BPF
    /// maps) are copied in every second. Kernel tunnels (gretap, VXLAN) keep their counters
    /// on the link: `ip -s link`.
    #[command(after_help = "Examples:\n  \
        tenet tunnel stats                       # this network namespace\n  \
        ip netns exec HOST tenet tunnel stats    # the same, for namespace HOST\n  \
        tenet tunnel stats --netns HOST -o json\n  \
        tenet tunnel stats --all                 # every datapath on this machine")]
    Stats(StatsArgs),
}

#[derive(Debug, Args)]
struct StatsArgs {
    /// The named network namespace (/run/netns/NAME) instead of this process's.
    #[arg(long, value_name = "NAME", conflicts_with = "all")]
    netns: Option<String>,
    /// Every datapath that publishes counters on this machine.
    #[arg(long)]
    all: bool,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Where the engines publish (default /run/tenet/tunnels).
    #[arg(long, value_name = "DIR", hide = true)]
    stats_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// One datapath as printed: its namespace's name where known.
#[derive(Debug, Serialize)]
struct Datapath {
    netns: String,
    #[serde(flatten)]
    published: Published,
}

/// Names of the namespaces in /run/netns by inode.
fn netns_names() -> HashMap<u64, String> {
    use std::os::unix::fs::MetadataExt;
    let mut names = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            if let Ok(m) = std::fs::metadata(e.path()) {
                names.insert(m.ino(), e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    names
}

pub fn run(args: &TunnelArgs) -> Result<ExitCode, CliError> {
    match &args.command {
        TunnelCommand::Stats(a) => stats_command(a),
    }
}

fn stats_command(args: &StatsArgs) -> Result<ExitCode, CliError> {
    let dir = args.stats_dir.clone().unwrap_or_else(stats::stats_dir);
    let all = stats::read_all(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let names = netns_names();
    let wanted = if args.all {
        None
    } else {
        let (path, what) = match &args.netns {
            Some(n) => (Path::new("/run/netns").join(n), format!("namespace {n}")),
            None => (
                PathBuf::from("/proc/self/ns/net"),
                "this network namespace".to_string(),
            ),
        };
        let inode = stats::netns_inode(Some(&path))
            .with_context(|| format!("cannot find {what} ({})", path.display()))?;
        Some((inode, what))
    };
    let picked: Vec<Datapath> = all
        .into_iter()
        .filter(|p| wanted.as_ref().is_none_or(|(i, _)| p.netns_inode == *i))
        .map(|p| Datapath {
            netns: names
                .get(&p.netns_inode)
                .cloned()
                .unwrap_or_else(|| format!("inode:{}", p.netns_inode)),
            published: p,
        })
        .collect();
    if let Some((_, what)) = &wanted
        && picked.is_empty()
    {
        return Err(anyhow!(
            "no GRE datapath of tenet publishes counters for {what} (they publish in {}; \
             kernel tunnels show theirs with `ip -s link`)",
            dir.display()
        )
        .into());
    }
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&picked).context("cannot print JSON")?
        ),
        Output::Table => print_table(&picked),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(datapaths: &[Datapath]) {
    println!(
        "{:<16} {:<15} {:>10} {:<15} {:>10} {:>12} {:>6} {:>7} {:>5} {:>10} {:>12} {:>6} {:>8} {:>8}",
        "NETNS",
        "TUNNEL",
        "KEY",
        "REMOTE",
        "TX PKTS",
        "TX BYTES",
        "TX ERR",
        "TOO BIG",
        "ICMP",
        "RX PKTS",
        "RX BYTES",
        "RX ERR",
        "ECN DROP",
        "ECN MARK"
    );
    for d in datapaths {
        for t in &d.published.tunnels {
            println!(
                "{:<16} {:<15} {:>10} {:<15} {:>10} {:>12} {:>6} {:>7} {:>5} {:>10} {:>12} {:>6} {:>8} {:>8}",
                d.netns,
                t.name,
                t.key,
                t.remote.to_string(),
                t.tx_packets,
                t.tx_bytes,
                t.tx_errors,
                t.tx_too_big,
                t.icmp_sent,
                t.rx_packets,
                t.rx_bytes,
                t.rx_errors,
                t.rx_ecn_dropped,
                t.rx_ecn_marked
            );
        }
    }
    for d in datapaths {
        let p = &d.published;
        println!(
            "{}: dropped before any tunnel: {} malformed, {} unknown key, {} unknown peer",
            d.netns, p.malformed, p.unknown_key, p.unknown_peer
        );
    }
    if datapaths.is_empty() {
        eprintln!("tenet: no GRE datapath of tenet publishes counters on this machine");
    }
}
