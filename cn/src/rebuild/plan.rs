//! The pure half of `rebuild`: from one dump of the links, decide what stays, what is
//! re-enslaved, what is deleted and what is missing, without touching the kernel.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use tenet::net::Link;
use tenet::net::owned::{Owned, tenet_alias};
use tenet::net::tunnel::{TunnelKind, TunnelSpec};

use super::Repair;
use crate::config::VnicRole;
use crate::names::{self, BRIDGE_KIND, CNCI_VNIC_KIND, OWNERSHIP, TUNNEL_KIND, VNIC_KIND};
use crate::node::SubnetBinding;

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

#[cfg(test)]
pub(super) mod tests {
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
    pub(in crate::rebuild) fn damaged() -> (Vec<Link>, [SubnetBinding; 3]) {
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
}
