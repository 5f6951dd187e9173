//! What an operator sees of a live concentrator (`tenet-cnci show`): its subnets, tunnels,
//! dnsmasq, mesh and firewall from the kernel and the run directory, and its port forwards,
//! floating IPs and mesh list from etcd. Read-only: it never changes anything.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

use ipnetwork::Ipv4Network;
use serde::Serialize;
use tenet::keyspace::cnci::{self as keys, CnciValue, FloatingIp, Mesh, PortForward};
use tenet::net::owned::tenet_alias;
use tenet::net::tunnel::TunnelSpec;
use tenet::net::{FLOOD_MAC, Netlink};
use tenet::process::Command;
use tenet::store::Datastore;

use crate::dnsmasq::{daemon_spec, dir_name};
use crate::error::CnciError;
use crate::names::{self, BRIDGE_KIND, VXLAN_KIND};

#[derive(Debug, Clone, Default, Serialize)]
pub struct SubnetView {
    pub concentrator: String,
    pub tenant: String,
    pub subnet: String,
    pub key: String,
    pub bridge: String,
    /// Compute nodes this subnet has a tunnel (or, VXLAN mode, a flood entry) to.
    pub compute_nodes: Vec<Ipv4Addr>,
    pub dnsmasq_pid: Option<u32>,
    pub leases: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct MeshTunnelView {
    pub ifname: String,
    pub remote: Ipv4Addr,
    pub key: u32,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ConcentratorView {
    pub subnets: Vec<SubnetView>,
    pub mesh_tunnels: Vec<MeshTunnelView>,
    /// Rules in tenet's concentrator chains (`iptables-save`).
    pub firewall_rules: usize,
    /// Floating IPs in tenet's nftables map, if it has one (iptables-nft).
    pub nft_floating: Option<usize>,
    pub forwards: Vec<PortForward>,
    pub floating_ips: Vec<FloatingIp>,
    pub mesh: Option<Mesh>,
}

/// Reads a concentrator: the kernel of the namespace at `netns`, the run directory, and (if
/// given) the desired state of concentrator `id` in the datastore.
pub async fn inspect(
    netns: Option<&Path>,
    run_dir: &Path,
    store: Option<(&dyn Datastore, &str)>,
) -> Result<ConcentratorView, CnciError> {
    let netlink = match netns {
        Some(p) => Netlink::connect_in(p)?,
        None => Netlink::connect()?,
    };
    let links = netlink.links().await?;
    let mut view = ConcentratorView::default();
    let mut by_bridge: BTreeMap<u32, usize> = BTreeMap::new();
    for l in &links {
        let Some(a) = tenet_alias(l).filter(|a| a.kind == BRIDGE_KIND) else {
            continue;
        };
        let subnet = a.get("subnet").unwrap_or_default().to_string();
        let dir = subnet
            .parse::<Ipv4Network>()
            .map(|n| run_dir.join(dir_name(&n)));
        let (pid, leases) = match &dir {
            Ok(d) => {
                let net: Ipv4Network = subnet.parse().expect("parsed above");
                let spec = daemon_spec(&net, d, netns);
                let pid = std::fs::read_to_string(spec.pid_file())
                    .ok()
                    .and_then(|t| t.trim().parse::<u32>().ok())
                    .filter(|p| Path::new(&format!("/proc/{p}")).exists());
                let leases = std::fs::read_to_string(d.join("leases"))
                    .map(|t| t.lines().count())
                    .unwrap_or(0);
                (pid, leases)
            }
            Err(_) => (None, 0),
        };
        by_bridge.insert(l.index, view.subnets.len());
        view.subnets.push(SubnetView {
            concentrator: a.get("conc").unwrap_or_default().into(),
            tenant: a.get("tenant").unwrap_or_default().into(),
            subnet,
            key: a.get("key").unwrap_or_default().into(),
            bridge: l.name.clone(),
            compute_nodes: Vec::new(),
            dnsmasq_pid: pid,
            leases,
        });
    }
    for l in &links {
        let Some(slot) = l.controller.and_then(|c| by_bridge.get(&c)).copied() else {
            if names::is_mesh(&l.name)
                && let Some((_, spec)) = TunnelSpec::from_link(l)
            {
                view.mesh_tunnels.push(MeshTunnelView {
                    ifname: l.name.clone(),
                    remote: spec.remote,
                    key: spec.key.get(),
                });
            }
            continue;
        };
        if tenet_alias(l).is_some_and(|a| a.kind == VXLAN_KIND) {
            for e in netlink.fdb(l.index).await? {
                if let (true, Some(std::net::IpAddr::V4(ip))) = (e.mac == FLOOD_MAC, e.dst) {
                    view.subnets[slot].compute_nodes.push(ip);
                }
            }
        } else if let Some((_, spec)) = TunnelSpec::from_link(l) {
            view.subnets[slot].compute_nodes.push(spec.remote);
        }
    }
    if let Ok(out) = Command::new("iptables-save").netns(netns).run().await {
        view.firewall_rules = out
            .stdout
            .lines()
            .filter(|l| l.starts_with("-A TENET-CNCI-"))
            .count();
    }
    let map = tenet::net::firewall::NatMap::new(crate::edge::OWNER, "", netns);
    view.nft_floating = map.read().await.ok().flatten().map(|m| m.len());
    if let Some((store, id)) = store {
        for kv in store.list(&keys::prefix(id)).await?.kvs {
            match tenet::keyspace::decode(&kv.key, &kv.value) {
                Ok(tenet::keyspace::TenetValue::Cnci(CnciValue::Forward(f))) => {
                    view.forwards.push(f)
                }
                Ok(tenet::keyspace::TenetValue::Cnci(CnciValue::Floating(f))) => {
                    view.floating_ips.push(f)
                }
                Ok(tenet::keyspace::TenetValue::Cnci(CnciValue::Mesh(m))) => view.mesh = Some(m),
                _ => {}
            }
        }
    }
    Ok(view)
}

/// The view as tables.
pub fn render_table(view: &ConcentratorView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "SUBNET            TENANT      KEY         BRIDGE        DNSMASQ   LEASES  COMPUTE NODES"
    );
    for s in &view.subnets {
        let nodes: Vec<String> = s.compute_nodes.iter().map(|ip| ip.to_string()).collect();
        let _ = writeln!(
            out,
            "{:<17} {:<11} {:<11} {:<13} {:<9} {:<7} {}",
            s.subnet,
            s.tenant,
            s.key,
            s.bridge,
            s.dnsmasq_pid.map_or("DOWN".to_string(), |p| p.to_string()),
            s.leases,
            if nodes.is_empty() {
                "-".into()
            } else {
                nodes.join(", ")
            }
        );
    }
    if !view.mesh_tunnels.is_empty() {
        let _ = writeln!(out, "\nMESH TUNNEL    REMOTE          KEY");
        for m in &view.mesh_tunnels {
            let _ = writeln!(out, "{:<14} {:<15} {}", m.ifname, m.remote, m.key);
        }
    }
    let _ = writeln!(
        out,
        "\nfirewall: {} rules in TENET-CNCI chains{}; {} port forwards, {} floating IPs in etcd",
        view.firewall_rules,
        view.nft_floating
            .map(|n| format!(", {n} floating IPs in nftables table tenet-cnci"))
            .unwrap_or_default(),
        view.forwards.len(),
        view.floating_ips.len()
    );
    for f in view.floating_ips.iter().take(20) {
        let _ = writeln!(out, "  floating {} -> {}", f.public_ip, f.private_ip);
    }
    for f in view.forwards.iter().take(20) {
        let _ = writeln!(
            out,
            "  forward {} {} -> {}:{}",
            f.protocol, f.external_port, f.internal_ip, f.internal_port
        );
    }
    if view.forwards.len() > 20 {
        let _ = writeln!(out, "  … and {} more forwards", view.forwards.len() - 20);
    }
    out
}
