//! Shared by the compute-node tests and benchmark: a fleet of VNIC requests and a view of
//! the links the compute node owns.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use tenet::net::Link;
use tenet::net::alias::Alias;
use tenet_cn::{VnicConfig, VnicRole};

/// `count` VNIC requests spread round-robin over `subnets` tenant subnets (tenant `tK`,
/// subnet `10.K.0.0/24`, all to one concentrator). Every `vm_every`-th is a VM tap
/// (`0`: containers only).
pub fn fleet(count: usize, subnets: usize, conc_ip: Ipv4Addr, vm_every: usize) -> Vec<VnicConfig> {
    (0..count)
        .map(|i| {
            let k = i % subnets + 1;
            let subnet = format!("10.{k}.0.0/24").parse().unwrap();
            let mac = format!("02:00:0a:{k:02x}:{:02x}:{:02x}", i / 256, i % 256);
            let mut c = VnicConfig::container(
                &format!("vnic-{i}"),
                &format!("t{k}"),
                subnet,
                "conc",
                conc_ip,
                mac.parse().unwrap(),
            );
            if vm_every > 0 && i % vm_every == vm_every - 1 {
                c.role = VnicRole::Vm;
                c.queues = 2;
            }
            c
        })
        .collect()
}

/// What the compute node's links look like, checked for consistency.
#[derive(Debug, PartialEq, Eq)]
pub struct Census {
    pub bridges: usize,
    pub tunnels: usize,
    pub vnics: usize,
    /// (name, alias, controller's name) of every link with a tenet alias, sorted.
    pub links: Vec<(String, String, Option<String>)>,
}

fn generated(name: &str) -> bool {
    ["tbr_", "tgt_", "tvn_", "tvc_"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// Counts the compute node's bridges, tunnels and VNICs in `links` and panics, saying what is
/// wrong, on any leak or duplicate: an unfinished link (generated name, no alias), a VNIC or
/// tunnel on no subnet bridge, a bridge without exactly one tunnel or without a VNIC, two
/// bridges for one subnet, two links for one VNIC id.
pub fn census(links: &[Link]) -> Census {
    let by_index: HashMap<u32, &Link> = links.iter().map(|l| (l.index, l)).collect();
    let alias_of = |l: &Link| l.alias.as_deref().and_then(Alias::parse);
    let mut subnets = HashSet::new();
    let mut bridges = HashMap::new();
    for l in links {
        if let Some(a) = alias_of(l).filter(|a| a.kind == "cn-bridge") {
            let key = (
                a.get("tenant").unwrap().to_string(),
                a.get("subnet").unwrap().to_string(),
                a.get("conc").unwrap().to_string(),
            );
            assert!(subnets.insert(key.clone()), "two bridges for {key:?}");
            bridges.insert(l.index, (0usize, 0usize));
        }
    }
    let mut vnic_ids = HashSet::new();
    let (mut tunnels, mut vnics) = (0, 0);
    for l in links {
        let alias = alias_of(l);
        if alias.is_none() {
            assert!(!generated(&l.name), "unfinished link left behind: {l:?}");
            continue;
        }
        let a = alias.unwrap();
        let on = l.controller.and_then(|c| bridges.get_mut(&c));
        match a.kind.as_str() {
            "tunnel" => {
                let counts = on.unwrap_or_else(|| panic!("tunnel on no subnet bridge: {l:?}"));
                counts.0 += 1;
                tunnels += 1;
            }
            "cn-vnic" => {
                let counts = on.unwrap_or_else(|| panic!("VNIC on no subnet bridge: {l:?}"));
                counts.1 += 1;
                vnics += 1;
                let id = a.get("id").unwrap().to_string();
                assert!(vnic_ids.insert(id.clone()), "two links for VNIC {id}");
            }
            _ => {}
        }
    }
    for (index, (t, v)) in &bridges {
        let name = &by_index[index].name;
        assert_eq!(*t, 1, "bridge {name} has {t} tunnels");
        assert!(*v > 0, "bridge {name} has no VNIC");
    }
    let mut view: Vec<_> = links
        .iter()
        .filter(|l| alias_of(l).is_some())
        .map(|l| {
            (
                l.name.clone(),
                l.alias.clone().unwrap(),
                l.controller
                    .and_then(|c| by_index.get(&c))
                    .map(|b| b.name.clone()),
            )
        })
        .collect();
    view.sort();
    Census {
        bridges: bridges.len(),
        tunnels,
        vnics,
        links: view,
    }
}
