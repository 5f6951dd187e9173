//! Taking over after a crash. `rebuild` reads the topology back from the aliases tenet wrote
//! and repairs what a crash (or an operator) left inconsistent; `reset` deletes the compute
//! node's links and nothing else.
//!
//! An alias is written last, so it marks a finished object: a link with a generated name and
//! no alias is an interrupted create (see `names`). Everything else is decided from the
//! aliases and from which bridge each link is enslaved to.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;

use tenet::net::owned::{Owned, tenet_alias};
use tenet::net::tunnel::{TunnelKind, TunnelSpec};
use tenet::net::{Leftovers, Link};
use tracing::{Instrument, info, info_span, warn};

use crate::config::VnicRole;
use crate::error::CnError;
use crate::names::{self, BRIDGE_KIND, CNCI_VNIC_KIND, OWNERSHIP, TUNNEL_KIND, VNIC_KIND};
use crate::node::topology::{FoundVnicEntry, SubnetLinks, Topology};
use crate::node::{ComputeNode, SubnetBinding, TunnelEvent, TunnelEventKind};

/// One thing `rebuild` found wrong, and what it did about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// A link a crashed call had started (a generated name, no alias yet): deleted.
    RemovedUnfinished { ifname: String },
    /// A compute-node alias that cannot be read: the link is deleted.
    RemovedUnreadable { ifname: String, alias: String },
    /// A VNIC on no tenet bridge: deleted. Its subnet is unknown, so the controller must
    /// create it again.
    RemovedVnicWithoutBridge { vnic_id: String, ifname: String },
    /// A second link with the same VNIC id: deleted.
    RemovedDuplicateVnic {
        vnic_id: String,
        ifname: String,
        kept: String,
    },
    /// A compute-node tunnel on no tenet bridge: deleted.
    RemovedTunnelWithoutBridge { ifname: String },
    /// A tunnel on a subnet bridge that is not the one the subnet needs (another backend, key
    /// or peer), or a second one: deleted.
    RemovedStrayTunnel { ifname: String, bridge: String },
    /// A subnet bridge with no VNIC: deleted with its tunnel (a TunnelDel is reported).
    RemovedEmptyBridge {
        subnet: SubnetBinding,
        bridge: String,
    },
    /// A second bridge for one subnet: its VNICs moved to `kept`; it and its tunnel deleted.
    MergedDuplicateBridge {
        subnet: SubnetBinding,
        removed: String,
        kept: String,
    },
    /// A subnet bridge without its tunnel: the tunnel was made.
    AddedTunnel {
        subnet: SubnetBinding,
        bridge: String,
        tunnel: String,
    },
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
                write!(f, "removed {ifname}, whose alias {alias:?} cannot be read")
            }
            Repair::RemovedVnicWithoutBridge { vnic_id, ifname } => {
                write!(f, "removed VNIC {vnic_id} ({ifname}): its bridge is gone")
            }
            Repair::RemovedDuplicateVnic {
                vnic_id,
                ifname,
                kept,
            } => write!(
                f,
                "removed {ifname}, a second link for VNIC {vnic_id} (kept {kept})"
            ),
            Repair::RemovedTunnelWithoutBridge { ifname } => {
                write!(f, "removed tunnel {ifname}: it is on no subnet bridge")
            }
            Repair::RemovedStrayTunnel { ifname, bridge } => {
                write!(
                    f,
                    "removed tunnel {ifname} from {bridge}: not the subnet's tunnel"
                )
            }
            Repair::RemovedEmptyBridge { subnet, bridge } => write!(
                f,
                "removed bridge {bridge} of tenant {} subnet {}: it had no VNIC",
                subnet.tenant, subnet.subnet
            ),
            Repair::MergedDuplicateBridge {
                subnet,
                removed,
                kept,
            } => write!(
                f,
                "merged bridge {removed} into {kept}: both were tenant {} subnet {}",
                subnet.tenant, subnet.subnet
            ),
            Repair::AddedTunnel {
                subnet,
                bridge,
                tunnel,
            } => write!(
                f,
                "made tunnel {tunnel} for bridge {bridge} (tenant {} subnet {})",
                subnet.tenant, subnet.subnet
            ),
            Repair::Failed { what, error } => write!(f, "could not repair {what}: {error}"),
        }
    }
}

/// What `rebuild` found and did.
#[derive(Debug, Default)]
pub struct RebuildReport {
    pub subnets: usize,
    pub vnics: usize,
    pub cnci_vnics: usize,
    /// A TunnelAdd for every subnet present. A crash can fall between making a subnet and
    /// reporting it, so the agent announces them all again; a concentrator takes a repeat as a
    /// no-op.
    pub present: Vec<TunnelEvent>,
    /// A TunnelDel for every subnet removed because it had no VNIC.
    pub removed: Vec<TunnelEvent>,
    pub repairs: Vec<Repair>,
}

/// A VNIC found in the kernel.
#[derive(Debug, Clone)]
pub(crate) struct FoundVnic {
    pub id: String,
    pub role: VnicRole,
    pub link: Link,
}

/// A subnet that stays: its bridge, its tunnel (`None`: to be made) and its VNICs.
#[derive(Debug)]
pub(crate) struct KeptSubnet {
    pub id: SubnetBinding,
    pub bridge: Link,
    pub tunnel: Option<Link>,
    pub vnics: Vec<FoundVnic>,
}

/// What to do, decided from one dump of the links without touching the kernel.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub subnets: Vec<KeptSubnet>,
    /// Links to re-enslave: (link, bridge).
    pub moves: Vec<(u32, u32)>,
    /// Tunnels whose datapath state must go before their links are deleted.
    pub forget: Vec<String>,
    pub delete: Vec<u32>,
    /// Subnets removed because no VNIC was left.
    pub emptied: Vec<SubnetBinding>,
    pub repairs: Vec<Repair>,
    pub cnci_vnics: usize,
}

/// The tunnel every subnet should have: this backend, from this address.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WantedTunnel {
    pub kind: TunnelKind,
    pub local: Ipv4Addr,
}

fn parse_role(text: &str) -> Option<VnicRole> {
    match text {
        "vm" => Some(VnicRole::Vm),
        "container" => Some(VnicRole::Container),
        _ => None,
    }
}

pub(crate) fn plan(links: &[Link], want: WantedTunnel) -> Plan {
    let mut plan = Plan::default();
    let mut bridges: Vec<(SubnetBinding, &Link)> = Vec::new();
    let mut vnics: Vec<FoundVnic> = Vec::new();
    let mut tunnels: Vec<(TunnelKind, TunnelSpec, &Link)> = Vec::new();

    let unreadable = |plan: &mut Plan, l: &Link| {
        plan.delete.push(l.index);
        plan.repairs.push(Repair::RemovedUnreadable {
            ifname: l.name.clone(),
            alias: l.alias.clone().unwrap_or_default(),
        });
    };
    for l in links {
        let alias = match OWNERSHIP.classify(l) {
            Owned::Finished(alias) => alias,
            Owned::Unfinished => {
                if names::is_tunnel(&l.name) {
                    plan.forget.push(l.name.clone());
                }
                plan.delete.push(l.index);
                plan.repairs.push(Repair::RemovedUnfinished {
                    ifname: l.name.clone(),
                });
                continue;
            }
            // Tunnels carry the backends' shared alias kind; the rest is not ours.
            Owned::Foreign => match tenet_alias(l) {
                Some(alias) if alias.kind == TUNNEL_KIND => alias,
                _ => continue,
            },
        };
        match alias.kind.as_str() {
            BRIDGE_KIND => match SubnetBinding::from_alias(&alias) {
                Some(sid) if l.kind.as_deref() == Some("bridge") => bridges.push((sid, l)),
                _ => unreadable(&mut plan, l),
            },
            VNIC_KIND => {
                let id = alias.get("id").filter(|id| !id.is_empty());
                let role = alias.get("role").and_then(parse_role);
                let kind_fits = matches!(l.kind.as_deref(), Some("veth") | Some("tun"));
                match (id, role) {
                    (Some(id), Some(role)) if kind_fits => vnics.push(FoundVnic {
                        id: id.to_string(),
                        role,
                        link: l.clone(),
                    }),
                    _ => unreadable(&mut plan, l),
                }
            }
            CNCI_VNIC_KIND => plan.cnci_vnics += 1,
            TUNNEL_KIND => match TunnelSpec::from_link(l) {
                Some((kind, spec)) => tunnels.push((kind, spec, l)),
                None if names::is_tunnel(&l.name) => {
                    plan.forget.push(l.name.clone());
                    unreadable(&mut plan, l);
                }
                None => {}
            },
            // Another tenet component's link.
            _ => {}
        }
    }

    // VNIC count per bridge, to keep the busiest of duplicate bridges.
    let mut on_bridge: HashMap<u32, usize> = HashMap::new();
    for v in &vnics {
        if let Some(c) = v.link.controller {
            *on_bridge.entry(c).or_default() += 1;
        }
    }
    let mut by_subnet: HashMap<SubnetBinding, Vec<&Link>> = HashMap::new();
    for (sid, l) in bridges {
        by_subnet.entry(sid).or_default().push(l);
    }
    // Bridge index (kept or duplicate) → (kept subnet, whether it is the kept bridge).
    let mut bridge_of: HashMap<u32, (usize, bool)> = HashMap::new();
    let mut duplicates: Vec<(usize, &Link)> = Vec::new();
    let mut groups: Vec<_> = by_subnet.into_iter().collect();
    groups.sort_by_key(|(_, ls)| ls.iter().map(|l| l.index).min());
    for (sid, mut ls) in groups {
        ls.sort_by_key(|l| (std::cmp::Reverse(on_bridge.get(&l.index).copied()), l.index));
        let slot = plan.subnets.len();
        bridge_of.insert(ls[0].index, (slot, true));
        for dup in &ls[1..] {
            bridge_of.insert(dup.index, (slot, false));
            duplicates.push((slot, dup));
        }
        plan.subnets.push(KeptSubnet {
            id: sid,
            bridge: ls[0].clone(),
            tunnel: None,
            vnics: Vec::new(),
        });
    }

    // VNICs: one link per id, preferring one that is on a subnet bridge.
    vnics.sort_by(|a, b| {
        let on = |v: &FoundVnic| {
            v.link
                .controller
                .is_some_and(|c| bridge_of.contains_key(&c))
        };
        (a.id.as_str(), !on(a), a.link.index).cmp(&(b.id.as_str(), !on(b), b.link.index))
    });
    let mut kept_ids: HashMap<String, String> = HashMap::new();
    for v in vnics {
        if let Some(kept) = kept_ids.get(&v.id) {
            plan.delete.push(v.link.index);
            plan.repairs.push(Repair::RemovedDuplicateVnic {
                vnic_id: v.id,
                ifname: v.link.name,
                kept: kept.clone(),
            });
            continue;
        }
        kept_ids.insert(v.id.clone(), v.link.name.clone());
        match v.link.controller.and_then(|c| bridge_of.get(&c)) {
            Some(&(slot, is_kept)) => {
                if !is_kept {
                    plan.moves
                        .push((v.link.index, plan.subnets[slot].bridge.index));
                }
                plan.subnets[slot].vnics.push(v);
            }
            None => {
                plan.delete.push(v.link.index);
                plan.repairs.push(Repair::RemovedVnicWithoutBridge {
                    vnic_id: v.id,
                    ifname: v.link.name,
                });
            }
        }
    }

    // Tunnels: the first matching one on each kept bridge stays.
    tunnels.sort_by_key(|(_, _, l)| l.index);
    for (kind, spec, l) in tunnels {
        let remove = |plan: &mut Plan, repair: Option<Repair>| {
            plan.forget.push(l.name.clone());
            plan.delete.push(l.index);
            plan.repairs.extend(repair);
        };
        match l.controller.and_then(|c| bridge_of.get(&c)) {
            Some(&(slot, true)) => {
                let s = &mut plan.subnets[slot];
                let fits = kind == want.kind
                    && spec.key == s.id.key()
                    && spec.local == want.local
                    && spec.remote == s.id.concentrator_ip;
                if fits && s.tunnel.is_none() {
                    s.tunnel = Some(l.clone());
                } else {
                    let bridge = s.bridge.name.clone();
                    remove(
                        &mut plan,
                        Some(Repair::RemovedStrayTunnel {
                            ifname: l.name.clone(),
                            bridge,
                        }),
                    );
                }
            }
            // On a duplicate bridge: goes with it.
            Some(&(_, false)) => remove(&mut plan, None),
            None if names::is_tunnel(&l.name) => remove(
                &mut plan,
                Some(Repair::RemovedTunnelWithoutBridge {
                    ifname: l.name.clone(),
                }),
            ),
            // Some other component's tunnel.
            None => {}
        }
    }

    for (slot, dup) in duplicates {
        plan.delete.push(dup.index);
        plan.repairs.push(Repair::MergedDuplicateBridge {
            subnet: plan.subnets[slot].id.clone(),
            removed: dup.name.clone(),
            kept: plan.subnets[slot].bridge.name.clone(),
        });
    }

    // Subnets with no VNIC go, tunnel and all.
    let (kept, empty): (Vec<_>, Vec<_>) = std::mem::take(&mut plan.subnets)
        .into_iter()
        .partition(|s| !s.vnics.is_empty());
    plan.subnets = kept;
    for s in empty {
        plan.delete.push(s.bridge.index);
        if let Some(t) = s.tunnel {
            plan.forget.push(t.name.clone());
            plan.delete.push(t.index);
        }
        plan.repairs.push(Repair::RemovedEmptyBridge {
            subnet: s.id.clone(),
            bridge: s.bridge.name.clone(),
        });
        plan.emptied.push(s.id);
    }
    plan
}

/// The links `reset` deletes: the compute node's own (see `names::OWNERSHIP`) and the
/// tunnels that are its: named `tgt_` or enslaved to one of its bridges.
fn reset_selection(links: &[Link]) -> Vec<&Link> {
    let cn_bridges: HashSet<u32> = links
        .iter()
        .filter(|l| tenet_alias(l).is_some_and(|a| a.kind == BRIDGE_KIND))
        .map(|l| l.index)
        .collect();
    OWNERSHIP.reset_selection(links, |l, a| {
        a.kind == TUNNEL_KIND
            && (names::is_tunnel(&l.name) || l.controller.is_some_and(|c| cn_bridges.contains(&c)))
    })
}

impl ComputeNode {
    /// Takes over the links a previous run left: reads every subnet bridge, tunnel and VNIC
    /// back from its alias, repairs what is inconsistent (see [`Repair`]) and replaces the
    /// in-memory topology. Waits for calls in flight and blocks new ones while it runs. A
    /// second call with nothing changed in between repairs nothing.
    pub async fn rebuild(&self) -> Result<RebuildReport, CnError> {
        let _exclusive = self.rebuild_lock.write().await;
        async {
            let links = self.netlink.links().await?;
            let want = WantedTunnel {
                kind: self.tunnels.kind(),
                local: self.tunnel_local(),
            };
            let mut plan = plan(&links, want);
            self.carry_out(&mut plan).await;

            let mut topo = Topology::default();
            for s in &plan.subnets {
                let links = SubnetLinks {
                    bridge: s.bridge.name.clone(),
                    tunnel: s
                        .tunnel
                        .as_ref()
                        .map(|t| t.name.clone())
                        .unwrap_or_default(),
                };
                let vnics = s
                    .vnics
                    .iter()
                    .map(|v| FoundVnicEntry {
                        id: v.id.clone(),
                        role: v.role,
                        ifname: v.link.name.clone(),
                        index: v.link.index,
                    })
                    .collect();
                topo.insert_found(s.id.clone(), links, s.bridge.index, vnics);
            }
            let report = RebuildReport {
                subnets: topo.subnet_count(),
                vnics: topo.vnic_count(),
                cnci_vnics: plan.cnci_vnics,
                present: plan
                    .subnets
                    .iter()
                    .map(|s| self.event(TunnelEventKind::Add, &s.id))
                    .collect(),
                removed: plan
                    .emptied
                    .iter()
                    .map(|s| self.event(TunnelEventKind::Del, s))
                    .collect(),
                repairs: plan.repairs,
            };
            *self.topology() = topo;
            for r in &report.repairs {
                warn!(repair = %r, "rebuild");
            }
            info!(
                subnets = report.subnets,
                vnics = report.vnics,
                repairs = report.repairs.len(),
                "topology rebuilt from the kernel"
            );
            Ok(report)
        }
        .instrument(info_span!("rebuild"))
        .await
    }

    /// Applies the kernel side of `plan`; what fails becomes a `Repair::Failed`.
    async fn carry_out(&self, plan: &mut Plan) {
        for &(link, bridge) in &plan.moves {
            if let Err(e) = self.netlink.enslave(link, bridge).await {
                plan.repairs.push(Repair::Failed {
                    what: format!("moving link #{link} to bridge #{bridge}"),
                    error: e.to_string(),
                });
            }
        }
        for name in &plan.forget {
            self.tunnels.forget(name);
        }
        if let Err(e) = self.netlink.delete_many(&plan.delete).await {
            plan.repairs.push(Repair::Failed {
                what: format!("deleting {} links", plan.delete.len()),
                error: e.to_string(),
            });
        }
        for s in plan.subnets.iter_mut().filter(|s| s.tunnel.is_none()) {
            let name = match OWNERSHIP.fresh_name(&self.netlink, names::TUNNEL).await {
                Ok(name) => name,
                Err(e) => {
                    plan.repairs.push(Repair::Failed {
                        what: format!("the tunnel of bridge {}", s.bridge.name),
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            let spec = self.tunnel_spec(&s.id, &name, s.bridge.mtu);
            let made = async {
                let t = self.tunnels.create(&spec).await?;
                self.netlink.enslave(t.index, s.bridge.index).await?;
                Ok::<_, CnError>(t)
            }
            .await;
            match made {
                Ok(t) => {
                    plan.repairs.push(Repair::AddedTunnel {
                        subnet: s.id.clone(),
                        bridge: s.bridge.name.clone(),
                        tunnel: name,
                    });
                    s.tunnel = Some(t);
                }
                Err(e) => {
                    let mut left = Leftovers::new();
                    left.note(self.tunnels.delete(&name).await);
                    left.log(&format!("tunnel {name}"));
                    plan.repairs.push(Repair::Failed {
                        what: format!("the tunnel of bridge {}", s.bridge.name),
                        error: e.with_leftovers(left).to_string(),
                    });
                }
            }
        }
    }

    /// Deletes every link the compute node owns (subnet bridges and their tunnels, VNICs,
    /// concentrator VNICs, and unfinished links) and forgets the topology. Links of anything
    /// else, tenet's other components included, are left alone. Returns how many links went.
    pub async fn reset(&self) -> Result<usize, CnError> {
        let _exclusive = self.rebuild_lock.write().await;
        async {
            let links = self.netlink.links().await?;
            let doomed = reset_selection(&links);
            for l in &doomed {
                if tenet_alias(l).is_some_and(|a| a.kind == TUNNEL_KIND) {
                    self.tunnels.forget(&l.name);
                }
            }
            *self.topology() = Topology::default();
            let deleted = OWNERSHIP.delete_all(&self.netlink, &doomed).await?;
            info!(deleted, "compute-node links reset");
            Ok(deleted)
        }
        .instrument(info_span!("reset"))
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tenet::net::alias::Alias;

    const LOCAL: &str = "10.254.0.1";

    fn link(index: u32, name: &str, kind: &str, alias: Option<String>, on: Option<u32>) -> Link {
        Link {
            index,
            name: name.into(),
            kind: Some(kind.into()),
            alias,
            controller: on,
            up: true,
            oper_state: "up".into(),
            mtu: 1458,
            mac: None,
            group: 0,
        }
    }

    fn subnet(tenant: &str, net: &str, conc_ip: &str) -> SubnetBinding {
        SubnetBinding {
            tenant: tenant.into(),
            subnet_id: net.into(),
            subnet: net.parse().unwrap(),
            concentrator: format!("conc-{tenant}"),
            concentrator_ip: conc_ip.parse().unwrap(),
        }
    }

    fn bridge(index: u32, name: &str, sid: &SubnetBinding) -> Link {
        link(index, name, "bridge", Some(sid.alias().to_string()), None)
    }

    fn tunnel(index: u32, name: &str, kind: &str, sid: &SubnetBinding, on: Option<u32>) -> Link {
        let alias = Alias::new(TUNNEL_KIND)
            .with("type", kind)
            .with("key", sid.key())
            .with("local", LOCAL)
            .with("remote", sid.concentrator_ip);
        link(index, name, "tun", Some(alias.to_string()), on)
    }

    fn vnic(index: u32, name: &str, id: &str, on: Option<u32>) -> Link {
        let alias = Alias::new(VNIC_KIND)
            .with("id", id)
            .with("role", "container")
            .with("instance", id);
        link(index, name, "veth", Some(alias.to_string()), on)
    }

    fn want() -> WantedTunnel {
        WantedTunnel {
            kind: TunnelKind::UserspaceGre,
            local: LOCAL.parse().unwrap(),
        }
    }

    /// A healthy subnet plus one of every kind of damage.
    fn damaged() -> (Vec<Link>, [SubnetBinding; 3]) {
        let a = subnet("t1", "172.16.0.0/24", "10.254.0.9");
        let b = subnet("t2", "172.16.0.0/24", "10.254.0.8");
        let c = subnet("t3", "10.9.0.0/16", "10.254.0.7");
        let links = vec![
            link(1, "eth0", "veth", None, None),
            link(2, "foreign0", "dummy", Some("tenant=acme".into()), None),
            link(
                3,
                "cncibr",
                "bridge",
                Some("tenet:v1:cnci-bridge subnet=x".into()),
                None,
            ),
            bridge(10, "tbr_0000000a", &a),
            tunnel(11, "tgt_0000000a", "usergre", &a, Some(10)),
            vnic(12, "tvn_0000000a", "v1", Some(10)),
            link(13, "tvn_0000000b", "veth", None, Some(10)),
            vnic(14, "tvn_0000000c", "v9", None),
            tunnel(15, "tgt_0000000c", "usergre", &a, None),
            tunnel(16, "tgt_0000000d", "gretap", &a, Some(10)),
            bridge(20, "tbr_00000014", &b),
            tunnel(21, "tgt_00000014", "usergre", &b, Some(20)),
            bridge(30, "tbr_0000001e", &c),
            vnic(31, "tvn_0000001e", "v3", Some(30)),
            bridge(40, "tbr_00000028", &a),
            vnic(41, "tvn_00000029", "v2", Some(40)),
            tunnel(42, "tgt_0000002a", "usergre", &a, Some(40)),
            vnic(50, "tvn_00000032", "v1", None),
            link(
                60,
                "tbr_0000003c",
                "bridge",
                Some("tenet:v1:cn-bridge tenant=x".into()),
                None,
            ),
            link(
                61,
                "tvc_0000003d",
                "macvtap",
                Some("tenet:v1:cn-cncivnic tenant=t1 id=c".into()),
                None,
            ),
            link(62, "tvp_0000003e", "veth", None, None),
        ];
        (links, [a, b, c])
    }

    #[test]
    fn every_kind_of_damage_is_repaired_or_reported() {
        let (links, [a, b, c]) = damaged();
        let p = plan(&links, want());
        let mut deleted = p.delete.clone();
        deleted.sort();
        assert_eq!(deleted, vec![13, 14, 15, 16, 20, 21, 40, 42, 50, 60]);
        assert_eq!(p.moves, vec![(41, 10)]);
        let mut forgotten = p.forget.clone();
        forgotten.sort();
        assert_eq!(
            forgotten,
            [
                "tgt_0000000c",
                "tgt_0000000d",
                "tgt_00000014",
                "tgt_0000002a"
            ]
        );
        assert_eq!(p.emptied, vec![b.clone()]);
        assert_eq!(p.cnci_vnics, 1);

        assert_eq!(p.subnets.len(), 2);
        let sa = p.subnets.iter().find(|s| s.id == a).unwrap();
        assert_eq!(sa.bridge.index, 10);
        assert_eq!(sa.tunnel.as_ref().map(|t| t.index), Some(11));
        let mut ids: Vec<_> = sa.vnics.iter().map(|v| v.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["v1", "v2"]);
        let sc = p.subnets.iter().find(|s| s.id == c).unwrap();
        assert!(sc.tunnel.is_none(), "made by the executor");

        let has = |want: &Repair| p.repairs.contains(want);
        assert!(has(&Repair::RemovedUnfinished {
            ifname: "tvn_0000000b".into()
        }));
        assert!(has(&Repair::RemovedVnicWithoutBridge {
            vnic_id: "v9".into(),
            ifname: "tvn_0000000c".into()
        }));
        assert!(has(&Repair::RemovedTunnelWithoutBridge {
            ifname: "tgt_0000000c".into()
        }));
        assert!(has(&Repair::RemovedStrayTunnel {
            ifname: "tgt_0000000d".into(),
            bridge: "tbr_0000000a".into()
        }));
        assert!(has(&Repair::RemovedEmptyBridge {
            subnet: b,
            bridge: "tbr_00000014".into()
        }));
        assert!(has(&Repair::MergedDuplicateBridge {
            subnet: a,
            removed: "tbr_00000028".into(),
            kept: "tbr_0000000a".into()
        }));
        assert!(has(&Repair::RemovedDuplicateVnic {
            vnic_id: "v1".into(),
            ifname: "tvn_00000032".into(),
            kept: "tvn_0000000a".into()
        }));
        assert!(p.repairs.iter().any(
            |r| matches!(r, Repair::RemovedUnreadable { ifname, .. } if ifname == "tbr_0000003c")
        ));
        assert_eq!(p.repairs.len(), 8, "{:#?}", p.repairs);
    }

    #[test]
    fn the_repaired_state_plans_nothing() {
        let (links, [_, _, c]) = damaged();
        let p = plan(&links, want());
        // What the kernel holds once the plan is carried out.
        let mut after: Vec<Link> = links
            .into_iter()
            .filter(|l| !p.delete.contains(&l.index))
            .map(|mut l| {
                if let Some(&(_, to)) = p.moves.iter().find(|(i, _)| *i == l.index) {
                    l.controller = Some(to);
                }
                l
            })
            .collect();
        after.push(tunnel(70, "tgt_00000046", "usergre", &c, Some(30)));
        let again = plan(&after, want());
        assert!(again.repairs.is_empty(), "{:#?}", again.repairs);
        assert!(again.delete.is_empty() && again.moves.is_empty() && again.forget.is_empty());
        assert_eq!(again.subnets.len(), 2);
        assert!(again.subnets.iter().all(|s| s.tunnel.is_some()));
    }

    #[test]
    fn reset_takes_only_compute_node_links() {
        let (links, _) = damaged();
        let doomed: HashSet<u32> = reset_selection(&links).iter().map(|l| l.index).collect();
        let kept: Vec<&str> = links
            .iter()
            .filter(|l| !doomed.contains(&l.index))
            .map(|l| l.name.as_str())
            .collect();
        // The container end goes with its veth; the rest are not the compute node's.
        assert_eq!(kept, ["eth0", "foreign0", "cncibr", "tvp_0000003e"]);
    }
}
