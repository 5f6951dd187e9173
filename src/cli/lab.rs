use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use ipnetwork::Ipv4Network;
use tenet::calico::ensure_initialized;
use tenet::dump::dump;
use tenet::net::NewLink;
use tenet::net::tunnel::{BackendChoice, TunnelBackend, TunnelSpec, backend};
use tenet::testbed::{EtcdServer, Fabric, Host, Workload};
use tenet::types::TunnelKey;

use super::CliError;

#[derive(Debug, Args)]
pub struct LabArgs {
    /// Stop after this many seconds instead of waiting for Ctrl-C (0: set up, check, stop).
    #[arg(long, value_name = "SECONDS")]
    duration: Option<u64>,
    /// Tunnel backend between the two lab hosts: auto (kernel gretap if this kernel has GRE,
    /// else the user-space GRE datapath), kernel, userspace or vxlan.
    #[arg(long, value_name = "BACKEND", default_value = "auto")]
    tunnel: BackendChoice,
}

/// The lab's tenant subnet; its tunnel key is 4268 (ciao's rule).
const LAB_SUBNET: [u8; 3] = [172, 16, 0];

/// Two hosts on an underlay fabric, each with the tenant's bridge, a tunnel to the other host
/// and one workload namespace. Everything is deleted when this is dropped.
struct TenantLab {
    _tunnels: Vec<Arc<dyn TunnelBackend>>,
    workloads: Vec<Workload>,
    hosts: Vec<Host>,
    _fabric: Fabric,
}

async fn tenant_lab(choice: BackendChoice) -> anyhow::Result<TenantLab> {
    let fabric = Fabric::new()
        .await
        .context("cannot build the underlay fabric")?;
    let mut hosts = Vec::new();
    for label in ["hosta", "hostb"] {
        hosts.push(
            fabric
                .add_host(label)
                .await
                .context("cannot add a lab host")?,
        );
    }
    let subnet = Ipv4Network::new(
        Ipv4Addr::new(LAB_SUBNET[0], LAB_SUBNET[1], LAB_SUBNET[2], 0),
        24,
    )?;
    let key = TunnelKey::from_subnet(&subnet).map_err(anyhow::Error::msg)?;
    let mut tunnels = Vec::new();
    let mut workloads = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let peer = hosts[1 - i].ip();
        let backend = backend(choice, host.netlink().clone(), Some(host.path())).await?;
        let nl = host.netlink();
        let bridge = nl.create(&NewLink::bridge("br-lab").up()).await?;
        let tunnel = backend
            .create(&TunnelSpec::new("tun-lab", key, host.ip(), peer))
            .await?;
        nl.enslave(tunnel.index, bridge.index).await?;
        let ip = Ipv4Addr::new(LAB_SUBNET[0], LAB_SUBNET[1], LAB_SUBNET[2], 2 + i as u8);
        let workload = host
            .add_workload(
                &format!("vm{}", i + 1),
                "v-lab",
                bridge.index,
                Ipv4Network::new(ip, 24)?,
                tunnel.mtu,
            )
            .await?;
        println!(
            "lab: host {} (underlay {}): bridge br-lab, {} tunnel tun-lab key {key} to {peer}, \
             workload {} at {ip}",
            host.name(),
            host.ip(),
            backend.kind(),
            workload.ns.name()
        );
        tunnels.push(backend);
        workloads.push(workload);
    }
    Ok(TenantLab {
        _tunnels: tunnels,
        workloads,
        hosts,
        _fabric: fabric,
    })
}

/// Starts a real etcd in a temporary directory, initialises the Calico keyspace, builds two
/// hosts joined by a tenant tunnel and proves it with a ping, prints how to reach all of it,
/// and tears everything down on Ctrl-C (or after --duration).
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

    let lab = tenant_lab(args.tunnel)
        .await
        .context("cannot build the two-host tenant network")?;
    let (w1, w2) = (&lab.workloads[0], &lab.workloads[1]);
    if !(w1.ping(w2.ip, 2) && w2.ping(w1.ip, 2)) {
        return Err(anyhow::anyhow!(
            "the lab's workloads {} and {} cannot ping each other over the tunnel",
            w1.ip,
            w2.ip
        )
        .into());
    }
    println!(
        "lab: {} and {} ping each other over the tunnel",
        w1.ip, w2.ip
    );
    println!(
        "lab: try   ip netns exec {} ping {}    (hosts: {})",
        w1.ns.name(),
        w2.ip,
        lab.hosts
            .iter()
            .map(|h| h.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    match args.duration {
        Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
        None => {
            println!("lab: running; Ctrl-C stops it and removes everything");
            tokio::signal::ctrl_c()
                .await
                .context("cannot wait for Ctrl-C")?;
        }
    }
    drop(lab);
    drop(etcd);
    println!("lab: stopped; namespaces, links, etcd and its data removed");
    Ok(ExitCode::SUCCESS)
}
