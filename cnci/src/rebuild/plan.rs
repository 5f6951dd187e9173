//! The pure half of the concentrator's rebuild: from one dump of the links, decide which
//! subnets stay (bridge + tunnels), what is re-enslaved and what is deleted.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use tenet::net::Link;
use tenet::net::alias::Alias;
use tenet::net::owned::{Owned, tenet_alias};
use tenet::net::tunnel::{TunnelKind, TunnelSpec};
use tenet::types::TunnelKey;

use super::Repair;
use crate::names::{self, BRIDGE_KIND, OWNERSHIP, TUNNEL_KIND, VXLAN_KIND};

/// Whose links these are and which tunnels they should have.
#[derive(Debug, Clone)]
pub(crate) struct Wanted<'a> {
    pub id: &'a str,
    pub tenant: &'a str,
    pub kind: TunnelKind,
    pub local: Ipv4Addr,
}

/// A subnet that stays, with its tunnels by compute-node address.
#[derive(Debug)]
pub(crate) struct KeptSubnet {
    pub subnet: Ipv4Network,
    pub key: TunnelKey,
    pub bridge: Link,
    pub tunnels: Vec<(Ipv4Addr, Link)>,
    /// VXLAN mode: the subnet's VXLAN device (`None`: to be made).
    pub vxlan: Option<Link>,
}

#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub subnets: Vec<KeptSubnet>,
    /// (link, bridge) to re-enslave.
    pub moves: Vec<(u32, u32)>,
    /// Tunnels whose datapath state goes before their links are deleted.
    pub forget: Vec<String>,
    pub delete: Vec<u32>,
    pub repairs: Vec<Repair>,
}

/// A concentrator bridge alias of `id`: (subnet, key), or why it cannot be read.
fn bridge_of(alias: &Alias, want: &Wanted<'_>) -> Option<Result<(Ipv4Network, TunnelKey), ()>> {
    if alias.kind != BRIDGE_KIND || alias.get("conc") != Some(want.id) {
        return None;
    }
    let parsed = (|| {
        if alias.get("tenant")? != want.tenant {
            return None;
        }
        let subnet: Ipv4Network = alias.get("subnet")?.parse().ok()?;
        let key = TunnelKey::new(alias.get("key")?.parse().ok()?)?;
        (subnet.ip() == subnet.network()).then_some((subnet, key))
    })();
    Some(parsed.ok_or(()))
}

pub(crate) fn plan(links: &[Link], want: &Wanted<'_>) -> Plan {
    let mut plan = Plan::default();
    let mut bridges: Vec<(Ipv4Network, TunnelKey, &Link)> = Vec::new();
    let mut tunnels: Vec<(TunnelKind, TunnelSpec, &Link)> = Vec::new();
    let mut vxlans: Vec<(TunnelKey, &Link)> = Vec::new();
    for l in links {
        match OWNERSHIP.classify(l) {
            Owned::Unfinished => {
                if names::is_tunnel(&l.name) {
                    plan.forget.push(l.name.clone());
                }
                plan.delete.push(l.index);
                plan.repairs.push(Repair::RemovedUnfinished {
                    ifname: l.name.clone(),
                });
            }
            Owned::Finished(alias) if alias.kind == VXLAN_KIND => {
                if alias.get("conc") != Some(want.id) {
                    continue;
                }
                match alias
                    .get("key")
                    .and_then(|k| k.parse().ok())
                    .and_then(TunnelKey::new)
                {
                    Some(key) if l.kind.as_deref() == Some("vxlan") => vxlans.push((key, l)),
                    _ => {
                        plan.delete.push(l.index);
                        plan.repairs.push(Repair::RemovedUnreadable {
                            ifname: l.name.clone(),
                            alias: l.alias.clone().unwrap_or_default(),
                        });
                    }
                }
            }
            Owned::Finished(alias) => match bridge_of(&alias, want) {
                Some(Ok((subnet, key))) if l.kind.as_deref() == Some("bridge") => {
                    bridges.push((subnet, key, l))
                }
                Some(_) => {
                    plan.delete.push(l.index);
                    plan.repairs.push(Repair::RemovedUnreadable {
                        ifname: l.name.clone(),
                        alias: l.alias.clone().unwrap_or_default(),
                    });
                }
                // Another concentrator's bridge.
                None => {}
            },
            Owned::Foreign => {
                if tenet_alias(l).is_some_and(|a| a.kind == TUNNEL_KIND)
                    && let Some((kind, spec)) = TunnelSpec::from_link(l)
                {
                    tunnels.push((kind, spec, l));
                }
            }
        }
    }

    // Tunnels per bridge, to keep the busiest of duplicate bridges.
    let mut on_bridge: HashMap<u32, usize> = HashMap::new();
    for (_, _, t) in &tunnels {
        if let Some(c) = t.controller {
            *on_bridge.entry(c).or_default() += 1;
        }
    }
    let mut by_subnet: HashMap<Ipv4Network, Vec<(TunnelKey, &Link)>> = HashMap::new();
    for (subnet, key, l) in bridges {
        by_subnet.entry(subnet).or_default().push((key, l));
    }
    let mut groups: Vec<_> = by_subnet.into_iter().collect();
    groups.sort_by_key(|(net, _)| *net);
    // Bridge index → (kept subnet slot, whether it is the kept bridge).
    let mut slot_of: HashMap<u32, (usize, bool)> = HashMap::new();
    for (subnet, mut ls) in groups {
        ls.sort_by_key(|(_, l)| (std::cmp::Reverse(on_bridge.get(&l.index).copied()), l.index));
        if let Some(other) = plan
            .subnets
            .iter()
            .find(|k| k.subnet.overlaps(subnet))
            .map(|k| k.subnet)
        {
            for (_, l) in ls {
                plan.delete.push(l.index);
                plan.repairs.push(Repair::RemovedOverlapping {
                    subnet,
                    bridge: l.name.clone(),
                    kept: other,
                });
            }
            continue;
        }
        let slot = plan.subnets.len();
        let (key, kept) = ls[0];
        slot_of.insert(kept.index, (slot, true));
        for (_, dup) in &ls[1..] {
            slot_of.insert(dup.index, (slot, false));
            plan.delete.push(dup.index);
            plan.repairs.push(Repair::MergedDuplicateBridge {
                subnet,
                removed: dup.name.clone(),
                kept: kept.name.clone(),
            });
        }
        plan.subnets.push(KeptSubnet {
            subnet,
            key,
            bridge: kept.clone(),
            tunnels: Vec::new(),
            vxlan: None,
        });
    }

    vxlans.sort_by_key(|(_, l)| l.index);
    for (key, l) in vxlans {
        let slot = l.controller.and_then(|c| slot_of.get(&c)).copied();
        match slot {
            Some((slot, is_kept))
                if want.kind == TunnelKind::Vxlan
                    && plan.subnets[slot].key == key
                    && plan.subnets[slot].vxlan.is_none() =>
            {
                let s = &mut plan.subnets[slot];
                if !is_kept {
                    plan.moves.push((l.index, s.bridge.index));
                }
                s.vxlan = Some(l.clone());
            }
            Some((slot, _)) => {
                let bridge = plan.subnets[slot].bridge.name.clone();
                plan.delete.push(l.index);
                plan.repairs.push(Repair::RemovedStrayTunnel {
                    ifname: l.name.clone(),
                    bridge,
                });
            }
            None if l.controller.is_none() => {
                plan.delete.push(l.index);
                plan.repairs.push(Repair::RemovedTunnelWithoutBridge {
                    ifname: l.name.clone(),
                });
            }
            None => {}
        }
    }

    tunnels.sort_by_key(|(_, _, l)| l.index);
    for (kind, spec, l) in tunnels {
        let remove = |plan: &mut Plan, repair: Repair| {
            plan.forget.push(l.name.clone());
            plan.delete.push(l.index);
            plan.repairs.push(repair);
        };
        match l.controller.and_then(|c| slot_of.get(&c)).copied() {
            Some((slot, is_kept)) => {
                let s = &mut plan.subnets[slot];
                let fits = kind == want.kind && spec.key == s.key && spec.local == want.local;
                let duplicate = s.tunnels.iter().any(|(ip, _)| *ip == spec.remote);
                if fits && !duplicate {
                    if !is_kept {
                        plan.moves.push((l.index, s.bridge.index));
                    }
                    s.tunnels.push((spec.remote, l.clone()));
                } else {
                    let bridge = s.bridge.name.clone();
                    remove(
                        &mut plan,
                        Repair::RemovedStrayTunnel {
                            ifname: l.name.clone(),
                            bridge,
                        },
                    );
                }
            }
            None if names::is_tunnel(&l.name) && l.controller.is_none() => remove(
                &mut plan,
                Repair::RemovedTunnelWithoutBridge {
                    ifname: l.name.clone(),
                },
            ),
            // Another component's tunnel, or one on another concentrator's bridge.
            None => {}
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn bridge(index: u32, name: &str, conc: &str, subnet: &str) -> Link {
        let net: Ipv4Network = subnet.parse().unwrap();
        let alias = Alias::new(BRIDGE_KIND)
            .with("conc", conc)
            .with("tenant", "t1")
            .with("subnet", net)
            .with("key", TunnelKey::from_subnet(&net).unwrap());
        link(index, name, "bridge", Some(alias.to_string()), None)
    }

    fn tunnel(index: u32, name: &str, subnet: &str, remote: &str, on: Option<u32>) -> Link {
        let net: Ipv4Network = subnet.parse().unwrap();
        let alias = Alias::new(TUNNEL_KIND)
            .with("type", "usergre")
            .with("key", TunnelKey::from_subnet(&net).unwrap())
            .with("local", LOCAL)
            .with("remote", remote);
        link(index, name, "tun", Some(alias.to_string()), on)
    }

    fn want() -> Wanted<'static> {
        Wanted {
            id: "c1",
            tenant: "t1",
            kind: TunnelKind::UserspaceGre,
            local: LOCAL.parse().unwrap(),
        }
    }

    fn damaged() -> Vec<Link> {
        vec![
            link(1, "eth0", "veth", None, None),
            bridge(10, "tcb_0000000a", "c1", "172.16.0.0/24"),
            tunnel(11, "tct_0000000b", "172.16.0.0/24", "10.254.0.2", Some(10)),
            tunnel(12, "tct_0000000c", "172.16.0.0/24", "10.254.0.2", Some(10)),
            tunnel(13, "tct_0000000d", "172.16.0.0/24", "10.254.0.3", None),
            link(14, "tcb_0000000e", "bridge", None, None),
            bridge(20, "tcb_00000014", "c1", "172.16.0.0/24"),
            tunnel(21, "tct_00000015", "172.16.0.0/24", "10.254.0.4", Some(20)),
            bridge(30, "tcb_0000001e", "other", "172.16.0.0/24"),
            tunnel(31, "tct_0000001f", "172.16.0.0/24", "10.254.0.5", Some(30)),
            tunnel(32, "tct_00000020", "10.9.0.0/16", "10.254.0.2", Some(10)),
            bridge(40, "tcb_00000028", "c1", "10.9.0.0/16"),
            link(
                50,
                "tcb_00000032",
                "bridge",
                Some("tenet:v1:cnci-bridge conc=c1 tenant=t1 subnet=junk".into()),
                None,
            ),
        ]
    }

    #[test]
    fn every_kind_of_damage_is_repaired_and_others_are_left_alone() {
        let p = plan(&damaged(), &want());
        let mut deleted = p.delete.clone();
        deleted.sort();
        assert_eq!(deleted, [12, 13, 14, 20, 32, 50]);
        assert_eq!(p.moves, [(21, 10)]);
        assert_eq!(p.subnets.len(), 2);
        let a = p.subnets.iter().find(|s| s.bridge.index == 10).unwrap();
        let mut remotes: Vec<String> = a.tunnels.iter().map(|(ip, _)| ip.to_string()).collect();
        remotes.sort();
        assert_eq!(remotes, ["10.254.0.2", "10.254.0.4"]);
        let b = p.subnets.iter().find(|s| s.bridge.index == 40).unwrap();
        assert!(b.tunnels.is_empty(), "a subnet with no tunnel stays");
        assert_eq!(p.repairs.len(), 6, "{:#?}", p.repairs);
        assert!(p.repairs.contains(&Repair::MergedDuplicateBridge {
            subnet: "172.16.0.0/24".parse().unwrap(),
            removed: "tcb_00000014".into(),
            kept: "tcb_0000000a".into(),
        }));
    }

    #[test]
    fn the_repaired_state_plans_nothing() {
        let before = damaged();
        let p = plan(&before, &want());
        let after: Vec<Link> = before
            .into_iter()
            .filter(|l| !p.delete.contains(&l.index))
            .map(|mut l| {
                if let Some(&(_, to)) = p.moves.iter().find(|(i, _)| *i == l.index) {
                    l.controller = Some(to);
                }
                l
            })
            .collect();
        let again = plan(&after, &want());
        assert!(again.repairs.is_empty(), "{:#?}", again.repairs);
        assert!(again.delete.is_empty() && again.moves.is_empty());
        assert_eq!(again.subnets.len(), 2);
    }
}
