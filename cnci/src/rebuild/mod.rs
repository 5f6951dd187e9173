//! Taking over after a crash or restart. `rebuild` reads the subnets back from the bridges'
//! aliases and the tunnels on them, repairs what a crash left inconsistent, and adopts each
//! subnet's running dnsmasq (or starts it again); dnsmasq processes and files of subnets that
//! are gone are stopped and removed. `reset` removes this concentrator's links, daemons and
//! files, and nothing else.

mod plan;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use tenet::net::owned::{Owned, tenet_alias};
use tenet::net::{FLOOD_MAC, Link};
use tenet::process::Daemon;
use tracing::{Instrument, info, info_span, warn};

use crate::concentrator::subnet::{
    create_vxlan, enable_cross_node_routing, gateway_address, start_dhcp,
};
use crate::concentrator::{Concentrator, Inner, SubnetState, TunnelState};
use crate::dnsmasq::{daemon_spec, parse_dir_name};
use crate::error::CnciError;
use crate::names::{self, BRIDGE_KIND, OWNERSHIP, TUNNEL_KIND, VXLAN_KIND};
use plan::{Plan, Wanted, plan};

/// One thing `rebuild` found wrong, and what it did about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// A link a crashed call had started (a generated name, no alias yet): deleted.
    RemovedUnfinished { ifname: String },
    /// A concentrator bridge alias that cannot be read (or names another tenant): deleted.
    RemovedUnreadable { ifname: String, alias: String },
    /// A second bridge for one subnet: its tunnels moved to `kept`, it was deleted.
    MergedDuplicateBridge {
        subnet: Ipv4Network,
        removed: String,
        kept: String,
    },
    /// A bridge whose subnet overlaps one kept: deleted.
    RemovedOverlapping {
        subnet: Ipv4Network,
        bridge: String,
        kept: Ipv4Network,
    },
    /// A concentrator tunnel on no bridge: deleted.
    RemovedTunnelWithoutBridge { ifname: String },
    /// A tunnel that does not fit its bridge (other backend, key or local address), or a
    /// second one to the same compute node: deleted.
    RemovedStrayTunnel { ifname: String, bridge: String },
    /// VXLAN mode: a subnet without its VXLAN device: the device was made (the compute
    /// nodes' flood entries come back with their re-announcements).
    AddedVxlan { subnet: Ipv4Network, device: String },
    /// A bridge without its gateway address: the address was added.
    AddedGateway { subnet: Ipv4Network, bridge: String },
    /// A subnet whose dnsmasq was not running: started again.
    RestartedDhcp { subnet: Ipv4Network },
    /// An attachment kept in etcd whose tunnel (or subnet) was not in the kernel (a replaced
    /// or rebooted concentrator): attached again.
    RestoredAttachment {
        subnet: Ipv4Network,
        cn_ip: Ipv4Addr,
    },
    /// A dnsmasq (and its files) for a subnet that is gone: stopped and removed.
    RemovedOrphanDhcp { subnet: String, was_running: bool },
    /// A repair that did not work; what it concerns is left as it was.
    Failed { what: String, error: String },
}

impl fmt::Display for Repair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Repair::RemovedUnfinished { ifname } => {
                write!(
                    f,
                    "removed {ifname}, left unfinished by an interrupted call"
                )
            }
            Repair::RemovedUnreadable { ifname, alias } => {
                write!(
                    f,
                    "removed {ifname}, whose alias {alias:?} is not this concentrator's"
                )
            }
            Repair::MergedDuplicateBridge {
                subnet,
                removed,
                kept,
            } => write!(f, "merged bridge {removed} into {kept}: both were {subnet}"),
            Repair::RemovedOverlapping {
                subnet,
                bridge,
                kept,
            } => write!(f, "removed bridge {bridge} of {subnet}: it overlaps {kept}"),
            Repair::RemovedTunnelWithoutBridge { ifname } => {
                write!(f, "removed tunnel {ifname}: it is on no subnet bridge")
            }
            Repair::RemovedStrayTunnel { ifname, bridge } => {
                write!(
                    f,
                    "removed tunnel {ifname} from {bridge}: not one the subnet needs"
                )
            }
            Repair::RestoredAttachment { subnet, cn_ip } => {
                write!(
                    f,
                    "attached {subnet} from {cn_ip} again, as etcd records it"
                )
            }
            Repair::AddedVxlan { subnet, device } => {
                write!(f, "made the VXLAN device {device} of {subnet}")
            }
            Repair::AddedGateway { subnet, bridge } => {
                write!(f, "put the gateway of {subnet} back on {bridge}")
            }
            Repair::RestartedDhcp { subnet } => {
                write!(f, "started dnsmasq of {subnet} again: it was not running")
            }
            Repair::RemovedOrphanDhcp {
                subnet,
                was_running,
            } => write!(
                f,
                "removed the dnsmasq files{} of {subnet}, which has no bridge",
                if *was_running { " and process" } else { "" }
            ),
            Repair::Failed { what, error } => write!(f, "could not repair {what}: {error}"),
        }
    }
}

/// What `rebuild` found and did.
#[derive(Debug, Default)]
pub struct RebuildReport {
    pub subnets: usize,
    pub tunnels: usize,
    /// Subnets whose running dnsmasq was adopted.
    pub dhcp_adopted: usize,
    pub repairs: Vec<Repair>,
    /// What the firewall reconciliation found different (rules changed behind tenet's back,
    /// or missing after a reboot).
    pub firewall: tenet::net::firewall::Drift,
}

/// The links `reset` deletes: this concentrator's bridges (not another concentrator's),
/// unfinished links, and the tunnels named `tct_` or enslaved to its bridges.
fn reset_selection<'a>(links: &'a [Link], id: &str) -> Vec<&'a Link> {
    let ours = |l: &Link| {
        tenet_alias(l).is_some_and(|a| {
            (a.kind == BRIDGE_KIND || a.kind == VXLAN_KIND) && a.get("conc") == Some(id)
        })
    };
    let bridges: HashSet<u32> = links
        .iter()
        .filter(|l| ours(l) && l.kind.as_deref() == Some("bridge"))
        .map(|l| l.index)
        .collect();
    links
        .iter()
        .filter(|l| match OWNERSHIP.classify(l) {
            Owned::Unfinished => true,
            Owned::Finished(_) => ours(l),
            Owned::Foreign => tenet_alias(l).is_some_and(|a| {
                a.kind == TUNNEL_KIND
                    && (names::is_tunnel(&l.name)
                        || names::is_mesh(&l.name)
                        || l.controller.is_some_and(|c| bridges.contains(&c)))
            }),
        })
        .collect()
}

impl Concentrator {
    /// Takes over what a previous run left: the subnets from their bridges' aliases, their
    /// tunnels, their dnsmasq (adopted if still running, else started again); repairs what
    /// is inconsistent (see [`Repair`]) and replaces the in-memory state. A second call with
    /// nothing changed in between repairs nothing and restarts nothing.
    pub async fn rebuild(&self) -> Result<RebuildReport, CnciError> {
        let mut report = self.rebuild_kernel().await?;
        self.restore_attachments(&mut report).await;
        let now = self.subnets().await;
        report.subnets = now.len();
        report.tunnels = now.iter().map(|s| s.tunnels.len()).sum();
        Ok(report)
    }

    /// The attachments etcd records that the kernel did not hold, attached again.
    async fn restore_attachments(&self, report: &mut RebuildReport) {
        let Some(store) = &self.inner.store else {
            return;
        };
        let prefix = format!(
            "{}attach/",
            tenet::keyspace::cnci::prefix(&self.inner.config.id)
        );
        let listing = match store.list(&prefix).await {
            Ok(l) => l,
            Err(e) => {
                report.repairs.push(Repair::Failed {
                    what: "reading the attachments from etcd".into(),
                    error: e.to_string(),
                });
                return;
            }
        };
        for kv in listing.kvs {
            let Ok(tenet::keyspace::TenetValue::Cnci(tenet::keyspace::cnci::CnciValue::Attach(a))) =
                tenet::keyspace::decode(&kv.key, &kv.value)
            else {
                continue;
            };
            let req = crate::RemoteSubnet {
                tenant: a.tenant,
                subnet: a.subnet,
                subnet_key: a.subnet_key,
                cn_id: a.cn_id,
                cn_ip: a.cn_ip,
            };
            match self.attach_remote_subnet(&req).await {
                Ok(done) if done.new_tunnel => {
                    let r = Repair::RestoredAttachment {
                        subnet: req.subnet,
                        cn_ip: req.cn_ip,
                    };
                    warn!(repair = %r, "rebuild");
                    report.repairs.push(r);
                }
                Ok(_) => {}
                Err(e) => report.repairs.push(Repair::Failed {
                    what: format!("attaching {} from {} again", req.subnet, req.cn_ip),
                    error: e.to_string(),
                }),
            }
        }
    }

    async fn rebuild_kernel(&self) -> Result<RebuildReport, CnciError> {
        let inner = &*self.inner;
        async {
            let mut subnets = inner.subnets.lock().await;
            // The handles go first, so that the running daemons are adopted below.
            subnets.clear();
            let links = inner.netlink.links().await?;
            let want = Wanted {
                id: &inner.config.id,
                tenant: &inner.config.tenant,
                kind: inner.tunnels.kind(),
                local: inner.tunnel_local(),
            };
            let mut plan = plan(&links, &want);
            carry_out(inner, &mut plan).await;

            let mut report = RebuildReport::default();
            for kept in std::mem::take(&mut plan.subnets) {
                let net = kept.subnet;
                match take_over(inner, kept, &mut plan.repairs).await {
                    Ok(state) => {
                        report.tunnels += state.tunnels.len();
                        report.dhcp_adopted += usize::from(state.dhcp.daemon().adopted());
                        subnets.insert(net, state);
                    }
                    Err(e) => plan.repairs.push(Repair::Failed {
                        what: format!("subnet {net}"),
                        error: e.to_string(),
                    }),
                }
            }
            let keep: HashSet<Ipv4Network> = subnets.keys().copied().collect();
            remove_orphan_dhcp(inner, &keep, &mut plan.repairs).await;
            match crate::concentrator::edge::restore(inner, &subnets).await {
                Ok(drift) => report.firewall = drift,
                Err(e) => plan.repairs.push(Repair::Failed {
                    what: "the firewall rules".into(),
                    error: e.to_string(),
                }),
            }
            if let Err(e) = crate::concentrator::mesh::restore(inner).await {
                plan.repairs.push(Repair::Failed {
                    what: "the tenant mesh".into(),
                    error: e.to_string(),
                });
            }
            report.subnets = subnets.len();
            report.repairs = plan.repairs;
            for r in &report.repairs {
                warn!(repair = %r, "rebuild");
            }
            info!(
                subnets = report.subnets,
                tunnels = report.tunnels,
                dhcp_adopted = report.dhcp_adopted,
                repairs = report.repairs.len(),
                "concentrator rebuilt from the kernel"
            );
            Ok(report)
        }
        .instrument(info_span!("rebuild"))
        .await
    }

    /// Deletes this concentrator's links (bridges, tunnels, unfinished links), stops its
    /// dnsmasq processes and removes their files. Links and daemons of anything else stay.
    /// Returns how many links went.
    pub async fn reset(&self) -> Result<usize, CnciError> {
        let inner = &*self.inner;
        async {
            let mut subnets = inner.subnets.lock().await;
            let mut failures = Vec::new();
            for (net, state) in std::mem::take(&mut *subnets) {
                if let Err(e) = state.dhcp.stop(true).await {
                    failures.push(format!("{net}: {e}"));
                }
            }
            let mut repairs = Vec::new();
            remove_orphan_dhcp(inner, &HashSet::new(), &mut repairs).await;
            failures.extend(repairs.iter().filter_map(|r| match r {
                Repair::Failed { what, error } => Some(format!("{what}: {error}")),
                _ => None,
            }));
            if let Some(fw) = &inner.firewall {
                fw.remove(crate::edge::OWNER).await?;
            }
            if let Some(map) = &inner.natmap {
                map.delete().await?;
            }
            if let Some(up) = &inner.uplink {
                let mut edge = inner.edge.lock().await;
                for public in std::mem::take(&mut edge.floating).into_keys() {
                    let addr = ipnetwork::IpNetwork::V4(Ipv4Network::new(public, 32).expect("/32"));
                    if let Err(e) = inner.netlink.del_address(up.index, addr).await {
                        failures.push(format!("{public}: {e}"));
                    }
                }
                edge.forwards.clear();
            }
            *inner.mesh.lock().await = Default::default();
            let links = inner.netlink.links().await?;
            let doomed = reset_selection(&links, &inner.config.id);
            for l in &doomed {
                if tenet_alias(l).is_some_and(|a| a.kind == TUNNEL_KIND) {
                    inner.tunnels.forget(&l.name);
                }
            }
            let deleted = OWNERSHIP.delete_all(&inner.netlink, &doomed).await?;
            crate::sysctls::restore(inner)?;
            if !failures.is_empty() {
                return Err(CnciError::file(
                    "reset left dnsmasq state in",
                    &inner.config.run_dir,
                    std::io::Error::other(failures.join("; ")),
                ));
            }
            info!(deleted, "concentrator links and daemons reset");
            Ok(deleted)
        }
        .instrument(info_span!("reset"))
        .await
    }
}

/// Applies the kernel side of `plan`; what fails becomes a `Repair::Failed`.
async fn carry_out(inner: &Inner, plan: &mut Plan) {
    for &(link, bridge) in &plan.moves {
        if let Err(e) = inner.netlink.enslave(link, bridge).await {
            plan.repairs.push(Repair::Failed {
                what: format!("moving link #{link} to bridge #{bridge}"),
                error: e.to_string(),
            });
        }
    }
    for name in &plan.forget {
        inner.tunnels.forget(name);
    }
    if let Err(e) = inner.netlink.delete_many(&plan.delete).await {
        plan.repairs.push(Repair::Failed {
            what: format!("deleting {} links", plan.delete.len()),
            error: e.to_string(),
        });
    }
}

/// Makes a kept subnet whole again: its gateway address and its dnsmasq.
async fn take_over(
    inner: &Inner,
    kept: plan::KeptSubnet,
    repairs: &mut Vec<Repair>,
) -> Result<SubnetState, CnciError> {
    let net = kept.subnet;
    let gateway = gateway_address(&net);
    let addresses = inner.netlink.addresses(kept.bridge.index).await?;
    if !addresses.contains(&gateway) {
        inner
            .netlink
            .add_address(kept.bridge.index, gateway)
            .await?;
        repairs.push(Repair::AddedGateway {
            subnet: net,
            bridge: kept.bridge.name.clone(),
        });
    }
    let vxlan = if inner.vxlan_mode() {
        enable_cross_node_routing(inner, &kept.bridge.name)?;
        Some(match kept.vxlan {
            Some(l) => (l.name, l.index),
            None => {
                let made = create_vxlan(inner, &net, kept.key, kept.bridge.index).await?;
                repairs.push(Repair::AddedVxlan {
                    subnet: net,
                    device: made.0.clone(),
                });
                made
            }
        })
    } else {
        None
    };
    let dhcp = start_dhcp(inner, &net, &kept.bridge.name).await?;
    if !dhcp.daemon().adopted() {
        repairs.push(Repair::RestartedDhcp { subnet: net });
    }
    // The compute node's id is not recorded in the kernel; its re-announcement fills it.
    let tunnels: BTreeMap<Ipv4Addr, TunnelState> = match &vxlan {
        Some((name, index)) => inner
            .netlink
            .fdb(*index)
            .await?
            .into_iter()
            .filter(|e| e.mac == FLOOD_MAC)
            .filter_map(|e| match e.dst {
                Some(std::net::IpAddr::V4(ip)) => Some((
                    ip,
                    TunnelState {
                        name: name.clone(),
                        index: *index,
                        cn_id: String::new(),
                    },
                )),
                _ => None,
            })
            .collect(),
        None => kept
            .tunnels
            .into_iter()
            .map(|(ip, link)| {
                (
                    ip,
                    TunnelState {
                        name: link.name,
                        index: link.index,
                        cn_id: String::new(),
                    },
                )
            })
            .collect(),
    };
    Ok(SubnetState {
        key: kept.key,
        bridge: kept.bridge.name,
        bridge_index: kept.bridge.index,
        vxlan,
        idle_since: tunnels.is_empty().then(std::time::Instant::now),
        tunnels,
        dhcp,
    })
}

/// Stops the dnsmasq of every subnet directory under the run directory that is not in
/// `keep`, and removes the directory.
async fn remove_orphan_dhcp(inner: &Inner, keep: &HashSet<Ipv4Network>, repairs: &mut Vec<Repair>) {
    let Ok(dir) = std::fs::read_dir(&inner.config.run_dir) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(net) = parse_dir_name(&name) else {
            continue;
        };
        if keep.contains(&net) {
            continue;
        }
        let path = entry.path();
        let spec = daemon_spec(&net, &path, inner.config.netns.as_deref());
        let was_running = match Daemon::stop_leftover(&spec).await {
            Ok(r) => r,
            Err(e) => {
                repairs.push(Repair::Failed {
                    what: format!("the dnsmasq of {net}"),
                    error: e.to_string(),
                });
                continue;
            }
        };
        match std::fs::remove_dir_all(&path) {
            Ok(()) => repairs.push(Repair::RemovedOrphanDhcp {
                subnet: name,
                was_running,
            }),
            Err(e) => repairs.push(Repair::Failed {
                what: format!("removing {}", path.display()),
                error: e.to_string(),
            }),
        }
    }
}
