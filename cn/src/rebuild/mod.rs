//! Taking over after a crash. `rebuild` reads the topology back from the aliases tenet wrote
//! and repairs what a crash (or an operator) left inconsistent; `reset` deletes the compute
//! node's links and nothing else.
//!
//! An alias is written last, so it marks a finished object: a link with a generated name and
//! no alias is an interrupted create (see `names`). Everything else is decided from the
//! aliases and from which bridge each link is enslaved to.

mod plan;
mod repair;

use std::collections::HashSet;

use tenet::net::owned::tenet_alias;
use tenet::net::{Leftovers, Link};
use tracing::{Instrument, info, info_span, warn};

pub use repair::{RebuildReport, Repair};

use crate::error::CnError;
use crate::names::{self, BRIDGE_KIND, OWNERSHIP, TUNNEL_KIND};
use crate::node::ComputeNode;
use crate::node::TunnelEventKind;
use crate::node::topology::{FoundVnicEntry, SubnetLinks, Topology};
use plan::{Plan, WantedTunnel, plan};

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

    #[test]
    fn reset_takes_only_compute_node_links() {
        let (links, _) = plan::tests::damaged();
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
