//! `tenet status`: every running agent (compute nodes and concentrators) from the status
//! keys they hold on leases under `/tenet/v1/node/` — a dead agent's key has expired.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tenet::keyspace::node::{self, NodeStatus};

use super::{Cli, CliError, connect, store_error};
use tenet::store::Datastore;

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Table,
    Json,
    /// The live topology as Graphviz DOT (render with `dot -Tsvg`).
    Dot,
}

fn uptime(started: u64) -> String {
    let s = node::now().saturating_sub(started);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, s % 3600 / 60),
    }
}

/// A compute node's policy, from the Felix status key its policy sync keeps alive: `in sync`
/// while reported, `-` when it does not enforce policy (or its report expired).
async fn policy_status(store: &impl Datastore, n: &NodeStatus) -> String {
    if n.role != node::NodeRole::ComputeNode {
        return "-".into();
    }
    let key = tenet::calico::CalicoKey::FelixStatus {
        host: n.name.clone(),
    }
    .path();
    match store.get(&key).await {
        Ok(Some(_)) => "in sync".into(),
        Ok(None) => "-".into(),
        Err(_) => "?".into(),
    }
}

/// What the user-space datapath on this machine counted for one agent's tunnels (found by
/// the tunnels' local address, which is the agent's underlay address).
#[derive(Debug, Default, serde::Serialize)]
struct Datapath {
    tx_packets: u64,
    rx_packets: u64,
    /// Send and delivery errors of its tunnels.
    errors: u64,
    /// Packets its namespace dropped before any tunnel (malformed, unknown key or peer).
    dropped: u64,
}

#[derive(serde::Serialize)]
struct Row<'a> {
    #[serde(flatten)]
    node: &'a NodeStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    datapath: Option<Datapath>,
}

fn local_datapaths() -> std::collections::HashMap<std::net::Ipv4Addr, Datapath> {
    use tenet::net::tunnel::userspace::stats;
    let mut by_local = std::collections::HashMap::new();
    for engine in stats::read_all(&stats::stats_dir()).unwrap_or_default() {
        let Some(local) = engine.tunnels.first().map(|t| t.local) else {
            continue;
        };
        let d: &mut Datapath = by_local.entry(local).or_default();
        d.dropped += engine.malformed + engine.unknown_key + engine.unknown_peer;
        for t in &engine.tunnels {
            d.tx_packets += t.tx_packets;
            d.rx_packets += t.rx_packets;
            d.errors += t.tx_errors + t.rx_errors;
        }
    }
    by_local
}

pub async fn run(cli: &Cli, args: &StatusArgs) -> Result<ExitCode, CliError> {
    let (store, config) = connect(cli).await?;
    if matches!(args.output, Output::Dot) {
        let topology = super::topology::Topology::load(&store)
            .await
            .map_err(|e| store_error(&config, e))?;
        print!("{}", topology.dot(&Default::default()));
        return Ok(ExitCode::SUCCESS);
    }
    let listing = store
        .list(&node::prefix())
        .await
        .map_err(|e| store_error(&config, e))?;
    let mut nodes: Vec<NodeStatus> = Vec::new();
    let mut bad = 0;
    for kv in &listing.kvs {
        match node::decode(&kv.key, &kv.value) {
            Ok(s) => nodes.push(s),
            Err(e) => {
                bad += 1;
                eprintln!("tenet: {}: {e}", kv.key);
            }
        }
    }
    nodes.sort_by(|a, b| (a.role as u8, &a.name).cmp(&(b.role as u8, &b.name)));
    let mut datapaths = local_datapaths();
    let rows: Vec<Row> = nodes
        .iter()
        .map(|n| Row {
            node: n,
            datapath: datapaths.remove(&n.underlay_ip),
        })
        .collect();
    match args.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&rows).context("cannot print JSON")?
        ),
        Output::Table | Output::Dot => {
            println!(
                "{:<14} {:<24} {:<10} {:<15} {:>7} {:>7}  {:<8} {:<10} {:<28} SUBNETS",
                "ROLE",
                "NAME",
                "TENANT",
                "UNDERLAY",
                "TUNNELS",
                "UP",
                "VERSION",
                "POLICY",
                "DATAPATH (TX/RX/ERR/DROP)"
            );
            for Row { node: n, datapath } in &rows {
                // Only datapaths on this machine are visible; `-` for the others.
                let datapath = datapath.as_ref().map_or("-".to_string(), |d| {
                    format!(
                        "{}/{}/{}/{}",
                        d.tx_packets, d.rx_packets, d.errors, d.dropped
                    )
                });
                let subnets: Vec<String> = n.subnets.iter().map(|s| s.to_string()).collect();
                let policy = policy_status(&store, n).await;
                println!(
                    "{:<14} {:<24} {:<10} {:<15} {:>7} {:>7}  {:<8} {:<10} {:<28} {}",
                    n.role.to_string(),
                    n.name,
                    n.tenant.as_deref().unwrap_or("-"),
                    n.underlay_ip,
                    n.tunnels,
                    uptime(n.started),
                    n.version,
                    policy,
                    datapath,
                    if subnets.is_empty() {
                        "-".into()
                    } else {
                        subnets.join(",")
                    }
                );
            }
            if nodes.is_empty() {
                eprintln!(
                    "tenet: no agent is running (no status under {})",
                    node::prefix()
                );
            }
        }
    }
    Ok(if bad > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
