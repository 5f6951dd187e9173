//! The node's bookkeeping: which subnets and VNICs exist, and which are still being made.
//! It lives under one mutex in [`super::ComputeNode`] and does no I/O; calls hold the lock
//! only to book or release objects, never across netlink work.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tenet::net::owned::Ownership;
use tokio::sync::watch;

use super::types::SubnetBinding;
use crate::config::{VnicConfig, VnicRole};
use crate::error::CnError;
use crate::names;

/// Progress of an object some call is creating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    Creating,
    /// Made; the link's index (the bridge's for a subnet).
    Ready(u32),
    Failed(String),
}

/// A progress channel for an object that already exists (found by `rebuild`).
fn ready(index: u32) -> watch::Receiver<Progress> {
    watch::channel(Progress::Ready(index)).1
}

/// Waits until `rx` leaves `Creating`; returns the made link's index.
pub(crate) async fn wait_ready(
    mut rx: watch::Receiver<Progress>,
    what: &str,
    timeout: Duration,
) -> Result<u32, CnError> {
    let waited = tokio::time::timeout(timeout, rx.wait_for(|p| *p != Progress::Creating)).await;
    match waited {
        Err(_) => Err(CnError::Timeout {
            what: what.into(),
            seconds: timeout.as_secs(),
        }),
        Ok(Err(_)) => Err(CnError::Dependency {
            what: what.into(),
            why: "the creating call went away".into(),
        }),
        Ok(Ok(p)) => match &*p {
            Progress::Failed(why) => Err(CnError::Dependency {
                what: what.into(),
                why: why.clone(),
            }),
            Progress::Ready(index) => Ok(*index),
            Progress::Creating => unreachable!("waited for a change"),
        },
    }
}

/// The index of an object that is ready, if it is.
pub(crate) fn ready_index(rx: &watch::Receiver<Progress>) -> Option<u32> {
    match *rx.borrow() {
        Progress::Ready(i) => Some(i),
        _ => None,
    }
}

/// The names of a subnet's bridge and tunnel.
#[derive(Debug, Clone)]
pub(crate) struct SubnetLinks {
    pub bridge: String,
    /// Empty when `rebuild` found the tunnel missing and could not make it.
    pub tunnel: String,
}

pub(crate) struct SubnetEntry {
    pub links: SubnetLinks,
    pub progress: watch::Receiver<Progress>,
    vnics: HashSet<String>,
    /// Whether a container VNIC was ever on this bridge (then its removal emits Del).
    pub had_container: bool,
}

pub(crate) struct VnicEntry {
    pub subnet: SubnetBinding,
    pub role: VnicRole,
    pub ifname: String,
    pub peer: Option<String>,
    pub progress: watch::Receiver<Progress>,
}

/// Names a create generated before taking the lock (checked against the kernel): the VNIC's,
/// and the subnet's when it looked new.
pub(crate) struct FreshNames {
    pub vnic: String,
    pub subnet: Option<SubnetLinks>,
}

/// What booking a VNIC found.
pub(crate) enum Reservation {
    /// The VNIC is known: return it (once ready) with no events.
    Existing {
        progress: watch::Receiver<Progress>,
        ifname: String,
        peer: Option<String>,
        bridge: Option<String>,
    },
    /// Booked: create the VNIC, and the subnet's links when `new_subnet` is set (others wait
    /// on `subnet_wait`).
    New {
        ifname: String,
        peer: Option<String>,
        links: SubnetLinks,
        subnet_wait: Option<watch::Receiver<Progress>>,
        new_subnet: Option<watch::Sender<Progress>>,
        container: ContainerFirst,
    },
}

/// For a container VNIC: whether it is the first container on its bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ContainerFirst {
    NotAContainer,
    First,
    Later,
}

/// A VNIC booked for removal by a destroy: what to delete and what to report.
pub(crate) struct Removal {
    pub vnic: VnicEntry,
    /// The subnet, when this was its last VNIC.
    pub subnet: Option<SubnetEntry>,
}

/// A VNIC `rebuild` found in the kernel, to take into the topology.
pub(crate) struct FoundVnicEntry {
    pub id: String,
    pub role: VnicRole,
    pub ifname: String,
    pub index: u32,
}

#[derive(Default)]
pub(crate) struct Topology {
    subnets: HashMap<SubnetBinding, SubnetEntry>,
    vnics: HashMap<String, VnicEntry>,
}

impl Topology {
    pub fn has_subnet(&self, binding: &SubnetBinding) -> bool {
        self.subnets.contains_key(binding)
    }

    pub fn subnet_count(&self) -> usize {
        self.subnets.len()
    }

    pub fn vnic_count(&self) -> usize {
        self.vnics.len()
    }

    /// Books the VNIC (and its subnet, if new), or finds it already booked.
    pub fn reserve(
        &mut self,
        config: &VnicConfig,
        binding: &SubnetBinding,
        vnic_rx: watch::Receiver<Progress>,
        names: FreshNames,
    ) -> Result<Reservation, CnError> {
        if let Some(existing) = self.vnics.get(&config.vnic_id) {
            if existing.subnet != *binding || existing.role != config.role {
                return Err(CnError::config(
                    "vnic_id",
                    format!(
                        "{} exists with another tenant, subnet, concentrator or role",
                        config.vnic_id
                    ),
                ));
            }
            return Ok(Reservation::Existing {
                progress: existing.progress.clone(),
                ifname: existing.ifname.clone(),
                peer: existing.peer.clone(),
                bridge: self.subnets.get(binding).map(|s| s.links.bridge.clone()),
            });
        }
        let ifname = names.vnic;
        let is_container = config.role == VnicRole::Container;
        let peer = is_container.then(|| names::peer_of(&ifname));
        self.vnics.insert(
            config.vnic_id.clone(),
            VnicEntry {
                subnet: binding.clone(),
                role: config.role,
                ifname: ifname.clone(),
                peer: peer.clone(),
                progress: vnic_rx,
            },
        );
        let first = |yes: bool| match (is_container, yes) {
            (false, _) => ContainerFirst::NotAContainer,
            (true, true) => ContainerFirst::First,
            (true, false) => ContainerFirst::Later,
        };
        Ok(match self.subnets.get_mut(binding) {
            Some(entry) => {
                entry.vnics.insert(config.vnic_id.clone());
                let container = first(!entry.had_container);
                entry.had_container |= is_container;
                Reservation::New {
                    ifname,
                    peer,
                    links: entry.links.clone(),
                    subnet_wait: Some(entry.progress.clone()),
                    new_subnet: None,
                    container,
                }
            }
            None => {
                // The subnet looked known when the names were made, and has gone since.
                let links = names.subnet.unwrap_or_else(|| SubnetLinks {
                    bridge: Ownership::random_name(names::BRIDGE),
                    tunnel: Ownership::random_name(names::TUNNEL),
                });
                let (tx, rx) = watch::channel(Progress::Creating);
                self.subnets.insert(
                    binding.clone(),
                    SubnetEntry {
                        links: links.clone(),
                        progress: rx,
                        vnics: HashSet::from([config.vnic_id.clone()]),
                        had_container: is_container,
                    },
                );
                Reservation::New {
                    ifname,
                    peer,
                    links,
                    subnet_wait: None,
                    new_subnet: Some(tx),
                    container: first(true),
                }
            }
        })
    }

    /// After a failed create: forgets the VNIC, and returns its subnet if that has no VNIC
    /// left (the caller removes its links).
    pub fn forget_failed(&mut self, vnic_id: &str, binding: &SubnetBinding) -> Option<SubnetEntry> {
        self.vnics.remove(vnic_id);
        let empty = self.subnets.get_mut(binding).is_some_and(|e| {
            e.vnics.remove(vnic_id);
            e.vnics.is_empty()
        });
        if empty {
            self.subnets.remove(binding)
        } else {
            None
        }
    }

    /// Progress of the VNICs among `ids` that are still being created.
    pub fn in_flight<'a>(
        &self,
        ids: impl Iterator<Item = &'a str>,
    ) -> Vec<watch::Receiver<Progress>> {
        ids.filter_map(|id| self.vnics.get(id))
            .filter(|e| ready_index(&e.progress).is_none())
            .map(|e| e.progress.clone())
            .collect()
    }

    /// Forgets the VNICs `ids` (unknown ones give `None`), and each subnet left without a
    /// VNIC; `on_emptied` sees each such subnet before the lock is released.
    pub fn take_removals<'a>(
        &mut self,
        ids: impl Iterator<Item = &'a str>,
        mut on_emptied: impl FnMut(&SubnetEntry),
    ) -> Vec<Option<Removal>> {
        ids.map(|id| {
            let vnic = self.vnics.remove(id)?;
            let emptied = self.subnets.get_mut(&vnic.subnet).is_some_and(|s| {
                s.vnics.remove(id);
                s.vnics.is_empty()
            });
            let subnet = if emptied {
                let s = self.subnets.remove(&vnic.subnet);
                if let Some(s) = &s {
                    on_emptied(s);
                }
                s
            } else {
                None
            };
            Some(Removal { vnic, subnet })
        })
        .collect()
    }

    /// Takes in a subnet `rebuild` found complete in the kernel, with its VNICs.
    pub fn insert_found(
        &mut self,
        binding: SubnetBinding,
        links: SubnetLinks,
        bridge_index: u32,
        vnics: Vec<FoundVnicEntry>,
    ) {
        for v in &vnics {
            let entry = VnicEntry {
                subnet: binding.clone(),
                role: v.role,
                ifname: v.ifname.clone(),
                peer: (v.role == VnicRole::Container).then(|| names::peer_of(&v.ifname)),
                progress: ready(v.index),
            };
            self.vnics.insert(v.id.clone(), entry);
        }
        self.subnets.insert(
            binding,
            SubnetEntry {
                links,
                progress: ready(bridge_index),
                had_container: vnics.iter().any(|v| v.role == VnicRole::Container),
                vnics: vnics.into_iter().map(|v| v.id).collect(),
            },
        );
    }

    /// Every subnet with its bridge name and VNIC count.
    pub fn subnets(&self) -> Vec<(SubnetBinding, String, usize)> {
        self.subnets
            .iter()
            .map(|(k, v)| (k.clone(), v.links.bridge.clone(), v.vnics.len()))
            .collect()
    }

    pub fn vnic_ids(&self) -> Vec<String> {
        self.vnics.keys().cloned().collect()
    }

    pub fn vnic_bindings(&self) -> Vec<(String, SubnetBinding)> {
        self.vnics
            .iter()
            .map(|(id, v)| (id.clone(), v.subnet.clone()))
            .collect()
    }
}
