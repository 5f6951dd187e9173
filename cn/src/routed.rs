//! The compute node in routed mode (Calico's model): no bridge, no tunnel, no concentrator.
//! A workload VNIC is a container veth or a VM tap named `tvr_…` whose host side carries no
//! address; the workload's /32 (/128) is reached by a device route, proxy ARP / NDP answers
//! for its link-local gateway, and BIRD announces the host's blocks (`tenet::bgp`).
//!
//! Ownership works as in GRE mode (`tenet::net::owned`): the alias, written last, records the
//! VNIC's id, tenant, addresses and MAC, so a restarted agent adopts its VNICs from the
//! kernel and deletes a half-made one. The routes on these interfaces are tenet's: a
//! [`RoutedNode::reconcile`] pass removes any route nobody asked for and restores a missing
//! one (Felix's route-table resync).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Mutex;

use ipnetwork::IpNetwork;
use tenet::net::alias::Alias;
use tenet::net::owned::{self, Owned, Ownership};
use tenet::net::routed::{self, RoutedWorkloadSpec};
use tenet::net::tap::{TapOptions, open_tap_in};
use tenet::net::{Link, Netlink, sysctl};
use tenet::types::MacAddr;
use tracing::{Instrument, info, info_span, warn};

use crate::config::VnicRole;
use crate::error::CnError;

/// Host-side names of routed VNICs.
pub const ROUTED_VNIC: &str = "tvr";
/// The alias kind of a finished routed VNIC.
pub const ROUTED_KIND: &str = "cn-routed";

pub const OWNERSHIP: Ownership = Ownership {
    component: "compute node (routed)",
    prefixes: &[ROUTED_VNIC],
    kinds: &[ROUTED_KIND],
};

/// One routed VNIC request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedVnicConfig {
    pub vnic_id: String,
    pub tenant_id: String,
    pub role: VnicRole,
    /// Single addresses (/32, /128), at least one IPv4.
    pub addresses: Vec<IpNetwork>,
    /// The workload's MAC: a VM's as its VMM sets it (needed for the host's neighbour
    /// entry); a container's is the kernel's choice when `None`.
    pub mac: Option<MacAddr>,
    /// Containers: the namespace the workload side goes to, and its name there.
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub mtu: Option<u32>,
    /// VM taps: descriptors to open (0 is taken as 1).
    pub queues: usize,
}

impl RoutedVnicConfig {
    fn check(&self) -> Result<(), CnError> {
        if self.vnic_id.is_empty()
            || self.vnic_id.len() > crate::config::MAX_ID
            || self
                .vnic_id
                .contains(|c: char| c.is_whitespace() || c == '=' || c == ',')
        {
            return Err(CnError::config(
                "vnic_id",
                format!(
                    "{:?} must be 1–48 bytes without spaces, '=' or ','",
                    self.vnic_id
                ),
            ));
        }
        if self.tenant_id.is_empty()
            || self
                .tenant_id
                .contains(|c: char| c.is_whitespace() || c == '=')
        {
            return Err(CnError::config(
                "tenant_id",
                format!("{:?} is not a tenant id", self.tenant_id),
            ));
        }
        if !self.addresses.iter().any(|a| a.is_ipv4()) {
            return Err(CnError::config(
                "addresses",
                "a routed VNIC needs an IPv4 address",
            ));
        }
        for a in &self.addresses {
            let single = if a.is_ipv4() { 32 } else { 128 };
            if a.prefix() != single {
                return Err(CnError::config(
                    "addresses",
                    format!("{a} is not a single address (/32 or /128)"),
                ));
            }
        }
        match (self.role, &self.netns, self.mac) {
            (VnicRole::Container, None, _) => Err(CnError::config(
                "netns",
                "a routed container VNIC needs the container's namespace",
            )),
            (VnicRole::Vm, _, None) => Err(CnError::config(
                "mac",
                "a routed VM VNIC needs the guest's MAC (the host's neighbour entry)",
            )),
            (VnicRole::Concentrator, _, _) => {
                Err(CnError::config("role", "routed mode has no concentrators"))
            }
            _ => Ok(()),
        }
    }
}

/// A routed VNIC as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedVnic {
    pub vnic_id: String,
    pub tenant_id: String,
    pub role: VnicRole,
    pub ifname: String,
    pub index: u32,
    pub addresses: Vec<IpNetwork>,
    pub mac: MacAddr,
}

impl RoutedVnic {
    fn alias(&self) -> Alias {
        let addrs: Vec<String> = self.addresses.iter().map(ToString::to_string).collect();
        Alias::new(ROUTED_KIND)
            .with("vnic", &self.vnic_id)
            .with("tenant", &self.tenant_id)
            .with("role", self.role.as_str())
            .with("addrs", addrs.join(","))
            .with("mac", self.mac)
    }

    fn from_link(link: &Link, alias: &Alias) -> Option<Self> {
        let role = match alias.get("role")? {
            "vm" => VnicRole::Vm,
            "container" => VnicRole::Container,
            _ => return None,
        };
        let addresses = alias
            .get("addrs")?
            .split(',')
            .map(|a| a.parse().ok())
            .collect::<Option<Vec<IpNetwork>>>()?;
        Some(RoutedVnic {
            vnic_id: alias.get("vnic")?.to_string(),
            tenant_id: alias.get("tenant")?.to_string(),
            role,
            ifname: link.name.clone(),
            index: link.index,
            addresses,
            mac: alias.get("mac")?.parse().ok()?,
        })
    }
}

/// What a [`RoutedNode::reconcile`] pass changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RouteRepair {
    /// Routes on tenet's interfaces that nobody asked for, removed.
    pub removed: Vec<String>,
    /// Routes or neighbour entries that were missing, restored.
    pub restored: Vec<String>,
}

/// The routed compute node's dataplane.
pub struct RoutedNode {
    netlink: Netlink,
    netns: Option<PathBuf>,
    vnics: Mutex<BTreeMap<String, RoutedVnic>>,
}

impl RoutedNode {
    /// Sets the host's routed-mode sysctls and adopts the routed VNICs a previous run left
    /// (deleting half-made ones). Warns when the host has no route covering the workloads'
    /// gateway: proxy ARP answers only for addresses the host can route.
    pub async fn init(netlink: Netlink, netns: Option<PathBuf>) -> Result<Self, CnError> {
        sysctl::write_all(netns.as_deref(), &routed::host_sysctls())?;
        let node = RoutedNode {
            netlink,
            netns,
            vnics: Mutex::new(BTreeMap::new()),
        };
        let (adopted, deleted) = node.adopt().await?;
        let repair = node.reconcile().await?;
        let gateway_routed = node
            .netlink
            .routes()
            .await?
            .iter()
            .any(|r| r.table == Some(254) && r.destination.contains(routed::GATEWAY_V4));
        if !gateway_routed {
            warn!(
                gateway = %routed::GATEWAY_V4,
                "no route covers the workloads' gateway (no default route?): proxy ARP will not answer for it"
            );
        }
        info!(
            adopted,
            deleted,
            routes_removed = repair.removed.len(),
            routes_restored = repair.restored.len(),
            "routed compute node ready"
        );
        Ok(node)
    }

    fn book(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, RoutedVnic>> {
        self.vnics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the kernel's finished routed VNICs into the books; deletes unfinished ones.
    async fn adopt(&self) -> Result<(usize, usize), CnError> {
        let links = self.netlink.links().await?;
        let mut book = BTreeMap::new();
        let mut unfinished = Vec::new();
        for link in &links {
            match OWNERSHIP.classify(link) {
                Owned::Finished(alias) => match RoutedVnic::from_link(link, &alias) {
                    Some(v) => {
                        book.insert(v.vnic_id.clone(), v);
                    }
                    None => unfinished.push(link),
                },
                Owned::Unfinished => unfinished.push(link),
                Owned::Foreign => {}
            }
        }
        let deleted = if unfinished.is_empty() {
            0
        } else {
            let names: Vec<&str> = unfinished.iter().map(|l| l.name.as_str()).collect();
            warn!(links = ?names, "deleting routed VNICs a crashed call left half made");
            OWNERSHIP.delete_all(&self.netlink, &unfinished).await?
        };
        let adopted = book.len();
        *self.book() = book;
        Ok((adopted, deleted))
    }

    /// The routed VNICs, by id.
    pub fn vnics(&self) -> Vec<RoutedVnic> {
        self.book().values().cloned().collect()
    }

    /// Creates a routed VNIC; a repeat for the same id returns the existing one (and no
    /// descriptors). On failure nothing is left.
    pub async fn create_vnic(
        &self,
        config: &RoutedVnicConfig,
    ) -> Result<(RoutedVnic, Vec<OwnedFd>), CnError> {
        config.check()?;
        if let Some(existing) = self.book().get(&config.vnic_id) {
            return Ok((existing.clone(), Vec::new()));
        }
        let span =
            info_span!("create_routed_vnic", vnic = %config.vnic_id, tenant = %config.tenant_id);
        async {
            let ifname = OWNERSHIP.fresh_name(&self.netlink, ROUTED_VNIC).await?;
            let (index, mac, queues) = match config.role {
                VnicRole::Container => {
                    let spec = RoutedWorkloadSpec {
                        host_ifname: ifname.clone(),
                        workload_ifname: config.ifname.clone(),
                        addresses: config.addresses.clone(),
                        mtu: config.mtu,
                    };
                    let netns = config.netns.as_deref().expect("checked");
                    let w =
                        routed::attach_workload(&self.netlink, self.netns.as_deref(), netns, &spec)
                            .await?;
                    (w.host_index, MacAddr(w.workload_mac), Vec::new())
                }
                _ => {
                    let options = TapOptions {
                        queues: config.queues.max(1),
                        ..TapOptions::default()
                    };
                    let queues = open_tap_in(self.netns.as_deref(), &ifname, options)?;
                    let index = self.netlink.index_of(&ifname).await?;
                    let mac = config.mac.expect("checked");
                    let routed = async {
                        if let Some(mtu) = config.mtu {
                            self.netlink.set_mtu(index, mtu).await?;
                        }
                        routed::route_to(
                            &self.netlink,
                            self.netns.as_deref(),
                            &ifname,
                            index,
                            &config.addresses,
                            mac.octets(),
                        )
                        .await
                    };
                    if let Err(e) = routed.await {
                        drop(queues);
                        let _ = self.netlink.delete(index).await;
                        return Err(e.into());
                    }
                    (index, mac, queues)
                }
            };
            let vnic = RoutedVnic {
                vnic_id: config.vnic_id.clone(),
                tenant_id: config.tenant_id.clone(),
                role: config.role,
                ifname,
                index,
                addresses: config.addresses.clone(),
                mac,
            };
            if let Err(e) = owned::commit(&self.netlink, index, &vnic.alias()).await {
                let _ = self.netlink.delete(index).await;
                return Err(e.into());
            }
            self.book().insert(vnic.vnic_id.clone(), vnic.clone());
            info!(ifname = %vnic.ifname, addresses = ?vnic.addresses, "routed VNIC created");
            Ok((vnic, queues))
        }
        .instrument(span)
        .await
    }

    /// Deletes a routed VNIC (its routes and neighbour entries go with the link). An unknown
    /// id succeeds: the VNIC is gone either way.
    pub async fn destroy_vnic(&self, vnic_id: &str) -> Result<Option<RoutedVnic>, CnError> {
        let Some(vnic) = self.book().get(vnic_id).cloned() else {
            return Ok(None);
        };
        routed::detach_workload(&self.netlink, vnic.index).await?;
        self.book().remove(vnic_id);
        info!(vnic = %vnic_id, ifname = %vnic.ifname, "routed VNIC deleted");
        Ok(Some(vnic))
    }

    /// Makes the routes and neighbour entries on tenet's routed interfaces exactly what the
    /// VNICs ask for: removes unknown routes (the kernel's own connected and link-local
    /// routes excepted), restores missing routes and neighbour entries.
    pub async fn reconcile(&self) -> Result<RouteRepair, CnError> {
        let vnics = self.vnics();
        let by_index: BTreeMap<u32, &RoutedVnic> = vnics.iter().map(|v| (v.index, v)).collect();
        let mut repair = RouteRepair::default();
        let mut present: BTreeSet<(u32, IpNetwork)> = BTreeSet::new();
        for route in self.netlink.device_routes().await? {
            let Some(vnic) = by_index.get(&route.dev) else {
                continue;
            };
            // RTPROT_KERNEL: the kernel's own (fe80::/64 on every IPv6 link).
            if route.protocol == 2 {
                continue;
            }
            if vnic.addresses.contains(&route.destination) {
                present.insert((route.dev, route.destination));
            } else {
                self.netlink
                    .del_device_route(route.destination, route.dev)
                    .await?;
                repair
                    .removed
                    .push(format!("{} dev {}", route.destination, vnic.ifname));
            }
        }
        let neighbours = self.netlink.neighbour_table().await?;
        for vnic in &vnics {
            for a in &vnic.addresses {
                if !present.contains(&(vnic.index, *a)) {
                    self.netlink.add_device_route(*a, vnic.index).await?;
                    repair
                        .restored
                        .push(format!("route {a} dev {}", vnic.ifname));
                }
                let has_neighbour = neighbours
                    .iter()
                    .any(|n| n.ip == a.ip() && n.permanent && n.mac == Some(vnic.mac.octets()));
                if !has_neighbour {
                    self.netlink
                        .add_neighbour(vnic.index, a.ip(), vnic.mac.octets())
                        .await?;
                    repair
                        .restored
                        .push(format!("neighbour {} dev {}", a.ip(), vnic.ifname));
                }
            }
        }
        if !repair.removed.is_empty() || !repair.restored.is_empty() {
            warn!(removed = ?repair.removed, restored = ?repair.restored, "routes on routed VNICs repaired");
        }
        Ok(repair)
    }

    /// The addresses of every routed VNIC (what the host announces beyond its blocks).
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.book()
            .values()
            .flat_map(|v| v.addresses.iter().map(|a| a.ip()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RoutedVnicConfig {
        RoutedVnicConfig {
            vnic_id: "v1".into(),
            tenant_id: "acme".into(),
            role: VnicRole::Vm,
            addresses: vec!["10.65.0.3/32".parse().unwrap()],
            mac: Some("02:00:00:00:00:01".parse().unwrap()),
            netns: None,
            ifname: "eth0".into(),
            mtu: None,
            queues: 1,
        }
    }

    #[test]
    fn bad_requests_are_named() {
        config().check().unwrap();
        let mut c = config();
        c.addresses = vec!["10.65.0.0/26".parse().unwrap()];
        assert!(
            c.check()
                .unwrap_err()
                .to_string()
                .contains("single address")
        );
        let mut c = config();
        c.addresses = vec!["fd10::3/128".parse().unwrap()];
        assert!(c.check().unwrap_err().to_string().contains("IPv4"));
        let mut c = config();
        c.mac = None;
        assert!(c.check().unwrap_err().to_string().contains("MAC"));
        let mut c = config();
        c.role = VnicRole::Container;
        assert!(c.check().unwrap_err().to_string().contains("namespace"));
        let mut c = config();
        c.vnic_id = "a,b".into();
        assert!(c.check().is_err());
    }

    #[test]
    fn the_alias_round_trips() {
        let v = RoutedVnic {
            vnic_id: "v1".into(),
            tenant_id: "acme".into(),
            role: VnicRole::Container,
            ifname: "tvr_0000abcd".into(),
            index: 7,
            addresses: vec![
                "10.65.0.3/32".parse().unwrap(),
                "fd10::3/128".parse().unwrap(),
            ],
            mac: "02:00:00:00:00:01".parse().unwrap(),
        };
        let alias = Alias::parse(&v.alias().to_string()).unwrap();
        let link = Link {
            index: 7,
            name: "tvr_0000abcd".into(),
            kind: Some("veth".into()),
            alias: Some(alias.to_string()),
            controller: None,
            up: true,
            oper_state: "up".into(),
            mtu: 1500,
            mac: None,
            group: 0,
        };
        assert_eq!(RoutedVnic::from_link(&link, &alias), Some(v));
        assert!(v_alias_fits(&RoutedVnic {
            vnic_id: "x".repeat(48),
            tenant_id: "y".repeat(48),
            ..RoutedVnic::from_link(&link, &alias).unwrap()
        }));
    }

    fn v_alias_fits(v: &RoutedVnic) -> bool {
        v.alias().to_string().len() < 256
    }
}
