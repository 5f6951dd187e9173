//! `ComputeNode`: tenant VNICs, one bridge and one tunnel per (tenant, subnet, concentrator),
//! and the events the agent turns into SSNTP messages.
//!
//! Bookkeeping (which subnets and VNICs exist, who is creating what) lives under one mutex;
//! netlink work happens outside it. A call that needs a bridge another call is still creating
//! waits for it, with a timeout.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnetwork::{IpNetwork, Ipv4Network};
use tenet::net::alias::Alias;
use tenet::net::tap::{TapOptions, open_tap_in};
use tenet::net::tunnel::{BackendChoice, TunnelBackend, TunnelKey, TunnelSpec, backend};
use tenet::net::{Link, LinkUpdate, MacvtapMode, Netlink, NewLink, Route};
use tokio::sync::{RwLock, Semaphore, watch};
use tracing::{Instrument, info, info_span, warn};

use crate::config::{VnicConfig, VnicRole};
use crate::discovery::{Underlay, UnderlayConfig, discover};
use crate::error::CnError;
use crate::fault::{FaultHook, FaultPoint};
use crate::names;

/// Alias kinds tenet's compute node writes.
pub const BRIDGE_KIND: &str = "cn-bridge";
pub const VNIC_KIND: &str = "cn-vnic";
pub const CNCI_VNIC_KIND: &str = "cn-cncivnic";

#[derive(Debug, Clone)]
pub struct CnConfig {
    /// This node's id, reported in tunnel events.
    pub id: String,
    pub underlay: UnderlayConfig,
    pub tunnel: BackendChoice,
    /// The namespace to work in (`None`: the caller's).
    pub netns: Option<PathBuf>,
    /// Calls doing kernel work at once.
    pub max_parallel: usize,
    /// How long a call waits for an object another call is creating.
    pub wait_timeout: Duration,
    /// Tests only: called at each [`FaultPoint`] to simulate a crash there.
    pub fault_hook: Option<FaultHook>,
}

impl CnConfig {
    pub fn new(id: &str) -> Self {
        CnConfig {
            id: id.into(),
            underlay: UnderlayConfig::default(),
            tunnel: BackendChoice::Auto,
            netns: None,
            max_parallel: 8,
            wait_timeout: Duration::from_secs(6),
            fault_hook: None,
        }
    }
}

/// Identity of a tenant subnet on this node: one bridge and one tunnel each.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubnetId {
    pub tenant: String,
    pub subnet_id: String,
    pub subnet: Ipv4Network,
    pub concentrator: String,
    pub concentrator_ip: Ipv4Addr,
}

impl SubnetId {
    fn of(c: &VnicConfig) -> Self {
        SubnetId {
            tenant: c.tenant_id.clone(),
            subnet_id: c.subnet_id.clone(),
            subnet: c.subnet,
            concentrator: c.concentrator_id.clone(),
            concentrator_ip: c.concentrator_ip,
        }
    }

    pub(crate) fn alias(&self) -> Alias {
        Alias::new(BRIDGE_KIND)
            .with("tenant", &self.tenant)
            .with("subnet_id", &self.subnet_id)
            .with("subnet", self.subnet)
            .with("conc", &self.concentrator)
            .with("conc_ip", self.concentrator_ip)
    }

    /// The subnet a bridge alias records; `None` if any field is missing or malformed.
    pub(crate) fn from_alias(alias: &Alias) -> Option<Self> {
        if alias.kind != BRIDGE_KIND {
            return None;
        }
        let sid = SubnetId {
            tenant: alias.get("tenant")?.to_string(),
            subnet_id: alias.get("subnet_id")?.to_string(),
            subnet: alias.get("subnet")?.parse().ok()?,
            concentrator: alias.get("conc")?.to_string(),
            concentrator_ip: alias.get("conc_ip")?.parse().ok()?,
        };
        // Only a subnet tenet could have made: a valid tunnel key, no host bits.
        TunnelKey::from_subnet(&sid.subnet).ok()?;
        (sid.subnet.ip() == sid.subnet.network() && !sid.tenant.is_empty()).then_some(sid)
    }

    pub(crate) fn key(&self) -> TunnelKey {
        TunnelKey::from_subnet(&self.subnet).expect("checked when the subnet was admitted")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEventKind {
    Add,
    Del,
}

/// What the agent must tell the concentrator (TenantAdded / TenantRemoved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelEvent {
    pub kind: TunnelEventKind,
    pub concentrator_id: String,
    pub concentrator_ip: Ipv4Addr,
    pub tenant_id: String,
    pub subnet_id: String,
    pub subnet: Ipv4Network,
    pub subnet_key: TunnelKey,
    pub cn_id: String,
    pub cn_ip: Ipv4Addr,
}

/// What a container runtime needs to know about the tenant network on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerEvent {
    /// The first container VNIC on this bridge: create the runtime's network.
    Add(ContainerNetwork),
    /// A later one: the network exists.
    Info(ContainerNetwork),
    /// The bridge is gone: remove the runtime's network named `bridge`.
    Del { bridge: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerNetwork {
    /// The bridge's interface name (ciao used it as the docker network name).
    pub bridge: String,
    pub subnet: Ipv4Network,
    /// The subnet's first host address, which the concentrator holds.
    pub gateway: Ipv4Addr,
}

/// A VNIC as created.
#[derive(Debug)]
pub struct Vnic {
    pub id: String,
    pub role: VnicRole,
    /// Host-side interface (tap, or the host end of the veth).
    pub ifname: String,
    pub index: u32,
    /// Container side: its name on the host, or in the container's namespace once moved.
    pub peer: Option<String>,
    pub bridge: String,
    pub mtu: u32,
    /// VM taps: one descriptor per queue, for the VMM. The caller owns them.
    pub queues: Vec<OwnedFd>,
}

#[derive(Debug)]
pub struct CreatedVnic {
    pub vnic: Vnic,
    pub tunnel: Option<TunnelEvent>,
    pub container: Option<ContainerEvent>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct DestroyedVnic {
    pub tunnel: Option<TunnelEvent>,
    pub container: Option<ContainerEvent>,
}

/// Progress of an object some call is creating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Progress {
    Creating,
    /// Made; the link's index (the bridge's for a subnet).
    Ready(u32),
    Failed(String),
}

#[derive(Debug, Clone)]
pub(crate) struct SubnetLinks {
    pub bridge: String,
    /// Empty when `rebuild` found the tunnel missing and could not make it.
    pub tunnel: String,
}

pub(crate) struct SubnetEntry {
    pub links: SubnetLinks,
    pub progress: watch::Receiver<Progress>,
    pub vnics: HashSet<String>,
    /// Whether a container VNIC was ever on this bridge (then its removal emits Del).
    pub had_container: bool,
}

pub(crate) struct VnicEntry {
    pub subnet: SubnetId,
    pub role: VnicRole,
    pub ifname: String,
    pub peer: Option<String>,
    pub progress: watch::Receiver<Progress>,
}

/// A progress channel for an object that already exists (found by `rebuild`).
pub(crate) fn ready(index: u32) -> watch::Receiver<Progress> {
    watch::channel(Progress::Ready(index)).1
}

/// What booking a VNIC found.
enum Reservation {
    /// The VNIC is known: return it (once ready) with no events.
    Existing {
        progress: watch::Receiver<Progress>,
        ifname: String,
        peer: Option<String>,
        bridge: Option<String>,
    },
    /// Booked: create the VNIC, and the subnet's links when `new_subnet` is set (others wait
    /// on `subnet_wait`). `container` = (is a container, first container on the bridge).
    New {
        ifname: String,
        peer: Option<String>,
        links: SubnetLinks,
        subnet_wait: Option<watch::Receiver<Progress>>,
        new_subnet: Option<watch::Sender<Progress>>,
        container: (bool, bool),
    },
}

#[derive(Default)]
pub(crate) struct Topology {
    pub subnets: HashMap<SubnetId, SubnetEntry>,
    pub vnics: HashMap<String, VnicEntry>,
}

/// A VNIC booked for removal by a destroy: what to delete and what to report.
struct Removal {
    vnic: VnicEntry,
    /// The subnet, when this was its last VNIC.
    subnet: Option<SubnetEntry>,
}

/// The compute node's dataplane.
pub struct ComputeNode {
    pub(crate) config: CnConfig,
    pub(crate) netlink: Netlink,
    pub(crate) tunnels: Arc<dyn TunnelBackend>,
    pub(crate) underlay: Underlay,
    pub(crate) topology: Mutex<Topology>,
    throttle: Semaphore,
    /// Creates and destroys hold it shared; `rebuild` and `reset`, which replace the whole
    /// topology, hold it exclusively.
    pub(crate) gate: RwLock<()>,
}

fn gateway_of(subnet: &Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// Waits until `rx` leaves `Creating`; returns the made link's index.
async fn wait_ready(
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
fn ready_index(rx: &watch::Receiver<Progress>) -> Option<u32> {
    match *rx.borrow() {
        Progress::Ready(i) => Some(i),
        _ => None,
    }
}

impl ComputeNode {
    /// Discovers the underlay and sets up the tunnel backend. Does not touch existing links;
    /// call [`ComputeNode::rebuild`] to take over what a previous run left.
    pub async fn init(config: CnConfig) -> Result<Self, CnError> {
        let netlink = match &config.netns {
            Some(p) => Netlink::connect_in(p)?,
            None => Netlink::connect()?,
        };
        let underlay = discover(&netlink, &config.underlay).await?;
        let tunnels = backend(config.tunnel, netlink.clone(), config.netns.clone()).await?;
        info!(
            cn = %config.id,
            compute = %underlay.compute.addr,
            management = %underlay.management.addr,
            tunnel = %tunnels.kind(),
            "compute node ready"
        );
        Ok(ComputeNode {
            throttle: Semaphore::new(config.max_parallel.max(1)),
            config,
            netlink,
            tunnels,
            underlay,
            topology: Mutex::new(Topology::default()),
            gate: RwLock::new(()),
        })
    }

    pub fn underlay(&self) -> &Underlay {
        &self.underlay
    }

    pub fn tunnel_backend(&self) -> &Arc<dyn TunnelBackend> {
        &self.tunnels
    }

    pub(crate) fn tunnel_local(&self) -> Ipv4Addr {
        self.underlay.compute.addr.ip()
    }

    pub(crate) fn fault(&self, point: FaultPoint) {
        if let Some(hook) = &self.config.fault_hook {
            (hook.0)(point);
        }
    }

    /// The tenant MTU: configured, or the compute link's MTU minus the tunnel overhead.
    fn tenant_mtu(&self, config: &VnicConfig) -> u32 {
        config.mtu.unwrap_or_else(|| self.default_mtu())
    }

    pub(crate) fn default_mtu(&self) -> u32 {
        self.underlay
            .compute
            .mtu
            .saturating_sub(self.tunnels.overhead())
    }

    pub(crate) fn event(&self, kind: TunnelEventKind, s: &SubnetId) -> TunnelEvent {
        TunnelEvent {
            kind,
            concentrator_id: s.concentrator.clone(),
            concentrator_ip: s.concentrator_ip,
            tenant_id: s.tenant.clone(),
            subnet_id: s.subnet_id.clone(),
            subnet: s.subnet,
            subnet_key: s.key(),
            cn_id: self.config.id.clone(),
            cn_ip: self.tunnel_local(),
        }
    }

    /// The tunnel a subnet's bridge carries.
    pub(crate) fn tunnel_spec(&self, sid: &SubnetId, name: &str, mtu: u32) -> TunnelSpec {
        let mut spec = TunnelSpec::new(name, sid.key(), self.tunnel_local(), sid.concentrator_ip);
        spec.mtu = Some(mtu);
        spec
    }

    /// Creates a tenant VNIC (VM tap or container veth). The first VNIC of a tenant subnet
    /// also creates its bridge and tunnel and returns a TunnelAdd event; a repeated create of
    /// the same VNIC returns it again with no event. On failure nothing this call created is
    /// left behind.
    pub async fn create_vnic(
        &self,
        config: &VnicConfig,
        cancel: Option<&watch::Receiver<bool>>,
    ) -> Result<CreatedVnic, CnError> {
        let checked = config.check(&[VnicRole::Vm, VnicRole::Container])?;
        let _permit = self.throttle.acquire().await.expect("never closed");
        if cancel.is_some_and(|c| *c.borrow()) {
            return Err(CnError::Cancelled);
        }
        let _gate = self.gate.read().await;
        let span = info_span!("create_vnic", vnic = %config.vnic_id, tenant = %config.tenant_id, subnet = %config.subnet);
        self.create_checked(config, checked.mac)
            .instrument(span)
            .await
    }

    async fn create_checked(
        &self,
        config: &VnicConfig,
        mac: Option<[u8; 6]>,
    ) -> Result<CreatedVnic, CnError> {
        let sid = SubnetId::of(config);
        let (vnic_tx, vnic_rx) = watch::channel(Progress::Creating);
        // Reserve under the lock: the VNIC, and the subnet if it is new.
        let reserved = self.reserve(config, &sid, vnic_rx);
        let (ifname, peer, links, subnet_wait, new_subnet, container_event) = match reserved? {
            Reservation::Existing {
                progress,
                ifname,
                peer,
                bridge,
            } => {
                return self.existing(config, progress, ifname, peer, bridge).await;
            }
            Reservation::New {
                ifname,
                peer,
                links,
                subnet_wait,
                new_subnet,
                container,
            } => (ifname, peer, links, subnet_wait, new_subnet, container),
        };

        let result = async {
            let mut tunnel_event = None;
            let bridge_index = if let Some(tx) = new_subnet {
                match self.create_subnet(&sid, &links, config).await {
                    Ok(index) => {
                        let _ = tx.send(Progress::Ready(index));
                        tunnel_event = Some(self.event(TunnelEventKind::Add, &sid));
                        index
                    }
                    Err(e) => {
                        let _ = tx.send(Progress::Failed(e.to_string()));
                        return Err(e);
                    }
                }
            } else {
                let rx = subnet_wait.expect("a booked VNIC waits for its subnet or makes it");
                let what = format!("bridge {}", links.bridge);
                wait_ready(rx, &what, self.config.wait_timeout).await?
            };
            let vnic = self
                .create_link(config, mac, bridge_index, &links.bridge, ifname, peer)
                .await?;
            Ok((vnic, tunnel_event))
        }
        .await;

        match result {
            Ok((vnic, tunnel)) => {
                let _ = vnic_tx.send(Progress::Ready(vnic.index));
                let container = match container_event {
                    (false, _) => None,
                    (true, first) => {
                        let net = ContainerNetwork {
                            bridge: links.bridge.clone(),
                            subnet: config.subnet,
                            gateway: gateway_of(&config.subnet),
                        };
                        Some(if first {
                            ContainerEvent::Add(net)
                        } else {
                            ContainerEvent::Info(net)
                        })
                    }
                };
                info!(ifname = %vnic.ifname, bridge = %vnic.bridge, tunnel_add = tunnel.is_some(), "VNIC created");
                Ok(CreatedVnic {
                    vnic,
                    tunnel,
                    container,
                })
            }
            Err(e) => {
                let _ = vnic_tx.send(Progress::Failed(e.to_string()));
                warn!(error = %e, "VNIC creation failed; rolling back");
                self.forget_failed(config, &sid).await;
                Err(e)
            }
        }
    }

    /// Books the VNIC (and its subnet, if new) under the lock, or finds it already booked.
    fn reserve(
        &self,
        config: &VnicConfig,
        sid: &SubnetId,
        vnic_rx: watch::Receiver<Progress>,
    ) -> Result<Reservation, CnError> {
        let mut topo = self.topology.lock().expect("topology lock");
        if let Some(existing) = topo.vnics.get(&config.vnic_id) {
            if existing.subnet != *sid || existing.role != config.role {
                return Err(CnError::config(
                    "vnic_id",
                    format!(
                        "{} exists with another tenant, subnet, concentrator or role",
                        config.vnic_id
                    ),
                ));
            }
            let bridge = topo.subnets.get(sid).map(|s| s.links.bridge.clone());
            let existing = &topo.vnics[&config.vnic_id];
            return Ok(Reservation::Existing {
                progress: existing.progress.clone(),
                ifname: existing.ifname.clone(),
                peer: existing.peer.clone(),
                bridge,
            });
        }
        let ifname = names::random(names::VNIC);
        let peer = (config.role == VnicRole::Container).then(|| names::peer_of(&ifname));
        topo.vnics.insert(
            config.vnic_id.clone(),
            VnicEntry {
                subnet: sid.clone(),
                role: config.role,
                ifname: ifname.clone(),
                peer: peer.clone(),
                progress: vnic_rx,
            },
        );
        let is_container = config.role == VnicRole::Container;
        Ok(match topo.subnets.get_mut(sid) {
            Some(entry) => {
                entry.vnics.insert(config.vnic_id.clone());
                let first_container = is_container && !entry.had_container;
                entry.had_container |= is_container;
                Reservation::New {
                    ifname,
                    peer,
                    links: entry.links.clone(),
                    subnet_wait: Some(entry.progress.clone()),
                    new_subnet: None,
                    container: (is_container, first_container),
                }
            }
            None => {
                let links = SubnetLinks {
                    bridge: names::random(names::BRIDGE),
                    tunnel: names::random(names::TUNNEL),
                };
                let (tx, rx) = watch::channel(Progress::Creating);
                topo.subnets.insert(
                    sid.clone(),
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
                    container: (is_container, is_container),
                }
            }
        })
    }

    /// A repeated create: wait for the first one, return the same VNIC, no events.
    async fn existing(
        &self,
        config: &VnicConfig,
        rx: watch::Receiver<Progress>,
        ifname: String,
        peer: Option<String>,
        bridge: Option<String>,
    ) -> Result<CreatedVnic, CnError> {
        let what = format!("VNIC {}", config.vnic_id);
        let index = wait_ready(rx, &what, self.config.wait_timeout).await?;
        let link = self
            .netlink
            .link_by_index(index)
            .await?
            .ok_or_else(|| CnError::Dependency {
                what,
                why: format!("{ifname} has disappeared from the kernel"),
            })?;
        let queues = if config.role == VnicRole::Vm {
            open_tap_in(self.config.netns.as_deref(), &ifname, tap_options(config))?
        } else {
            Vec::new()
        };
        let bridge = bridge.unwrap_or_default();
        let container = (config.role == VnicRole::Container).then(|| {
            ContainerEvent::Info(ContainerNetwork {
                bridge: bridge.clone(),
                subnet: config.subnet,
                gateway: gateway_of(&config.subnet),
            })
        });
        Ok(CreatedVnic {
            vnic: Vnic {
                id: config.vnic_id.clone(),
                role: config.role,
                ifname,
                index: link.index,
                peer: config.netns.as_ref().map(|n| n.ifname.clone()).or(peer),
                bridge,
                mtu: link.mtu,
                queues,
            },
            tunnel: None,
            container,
        })
    }

    /// Makes the bridge (up) and its tunnel; the bridge's alias goes on last, so that a crash
    /// part-way leaves an alias-less bridge that `rebuild` recognises as unfinished.
    async fn create_subnet(
        &self,
        sid: &SubnetId,
        links: &SubnetLinks,
        config: &VnicConfig,
    ) -> Result<u32, CnError> {
        let mtu = self.tenant_mtu(config);
        let bridge = self
            .netlink
            .create_index(&NewLink::bridge(&links.bridge).mtu(mtu).up())
            .await?;
        self.fault(FaultPoint::BridgeCreated);
        let made = async {
            let spec = self.tunnel_spec(sid, &links.tunnel, mtu);
            let tunnel = self.tunnels.create(&spec).await?;
            self.fault(FaultPoint::TunnelCreated);
            self.netlink.enslave(tunnel.index, bridge).await?;
            self.fault(FaultPoint::TunnelEnslaved);
            self.netlink
                .set_alias(bridge, &sid.alias().to_string())
                .await?;
            Ok::<_, CnError>(())
        }
        .await;
        if let Err(e) = made {
            let _ = self.tunnels.delete(&links.tunnel).await;
            let _ = self.netlink.delete(bridge).await;
            return Err(e);
        }
        self.fault(FaultPoint::SubnetReady);
        Ok(bridge)
    }

    /// Makes the VNIC's link, fully configured, with its alias last (see `create_subnet`).
    async fn create_link(
        &self,
        config: &VnicConfig,
        mac: Option<[u8; 6]>,
        bridge_index: u32,
        bridge: &str,
        ifname: String,
        peer: Option<String>,
    ) -> Result<Vnic, CnError> {
        let mtu = self.tenant_mtu(config);
        let alias = Alias::new(VNIC_KIND)
            .with("id", &config.vnic_id)
            .with("role", config.role.as_str())
            .with("instance", &config.instance_id)
            .to_string();
        let mut queues = Vec::new();
        let index = match config.role {
            VnicRole::Vm => {
                queues = open_tap_in(self.config.netns.as_deref(), &ifname, tap_options(config))?;
                match self.netlink.index_of(&ifname).await {
                    Ok(i) => i,
                    Err(e) => {
                        drop(queues);
                        return Err(e.into());
                    }
                }
            }
            _ => {
                let peer = peer.as_deref().expect("containers have a peer");
                // Host end on the bridge and up, container end with its MTU and MAC: one
                // request.
                let new = NewLink::veth(&ifname, peer)
                    .peer_settings(Some(mtu), mac)
                    .mtu(mtu)
                    .controller(bridge_index)
                    .up();
                self.netlink.create_index(&new).await?
            }
        };
        self.fault(FaultPoint::VnicLinkCreated);
        let finish = async {
            if let (Some(peer), Some(ns)) = (&peer, &config.netns) {
                let p = self.netlink.index_of(peer).await?;
                self.move_into_container(p, ns).await?;
            }
            let update = if config.role == VnicRole::Vm {
                LinkUpdate {
                    mtu: Some(mtu),
                    controller: Some(bridge_index),
                    alias: Some(alias),
                    up: true,
                }
            } else {
                LinkUpdate {
                    alias: Some(alias),
                    ..LinkUpdate::default()
                }
            };
            self.netlink.update(index, &update).await?;
            Ok::<_, CnError>(())
        }
        .await;
        if let Err(e) = finish {
            drop(queues);
            // Deleting the host side of a veth removes its peer too, wherever it is.
            let _ = self.netlink.delete(index).await;
            return Err(e);
        }
        self.fault(FaultPoint::VnicReady);
        Ok(Vnic {
            id: config.vnic_id.clone(),
            role: config.role,
            ifname,
            index,
            peer: config.netns.as_ref().map(|n| n.ifname.clone()).or(peer),
            bridge: bridge.to_string(),
            mtu,
            queues,
        })
    }

    /// Moves the container side into the runtime's namespace with its name, address and
    /// default route.
    async fn move_into_container(
        &self,
        index: u32,
        ns: &crate::config::ContainerNetns,
    ) -> Result<(), CnError> {
        let file = std::fs::File::open(&ns.path)
            .map_err(|e| CnError::config("netns.path", format!("{}: {e}", ns.path.display())))?;
        self.netlink
            .move_to_netns(index, file.as_fd(), Some(&ns.ifname))
            .await?;
        let inside = Netlink::connect_in(&ns.path)?;
        let configure = async {
            let i = inside.index_of(&ns.ifname).await?;
            inside.add_address(i, IpNetwork::V4(ns.address)).await?;
            inside.set_up(i).await?;
            if let Some(gw) = ns.gateway {
                inside
                    .add_route(&Route {
                        destination: "0.0.0.0/0".parse().expect("valid"),
                        gateway: Some(gw),
                        dev: Some(i),
                        table: None,
                    })
                    .await?;
            }
            Ok::<_, CnError>(())
        }
        .await;
        if configure.is_err()
            && let Ok(i) = inside.index_of(&ns.ifname).await
        {
            let _ = inside.delete(i).await;
        }
        configure
    }

    /// After a failed create: forget the VNIC, and the subnet if this call made it or it has
    /// no VNIC left (removing its links).
    async fn forget_failed(&self, config: &VnicConfig, sid: &SubnetId) {
        let teardown = {
            let mut topo = self.topology.lock().expect("topology lock");
            topo.vnics.remove(&config.vnic_id);
            let empty = topo.subnets.get_mut(sid).is_some_and(|e| {
                e.vnics.remove(&config.vnic_id);
                e.vnics.is_empty()
            });
            if empty {
                topo.subnets.remove(sid)
            } else {
                None
            }
        };
        if let Some(entry) = teardown {
            if let Err(e) = self.tunnels.delete(&entry.links.tunnel).await {
                warn!(tunnel = %entry.links.tunnel, error = %e, "deleting tunnel");
            }
            if let Some(bridge) = ready_index(&entry.progress)
                && let Err(e) = self.netlink.delete(bridge).await
                && !e.is_not_found()
            {
                warn!(bridge = %entry.links.bridge, error = %e, "deleting bridge");
            }
        }
    }

    /// Destroys a tenant VNIC; an unknown VNIC is not an error. The last VNIC of a subnet also
    /// removes its tunnel and bridge and returns TunnelDel.
    pub async fn destroy_vnic(
        &self,
        config: &VnicConfig,
        cancel: Option<&watch::Receiver<bool>>,
    ) -> Result<DestroyedVnic, CnError> {
        let mut out = self
            .destroy_vnics(std::slice::from_ref(config), cancel)
            .await?;
        Ok(out.pop().unwrap_or_default())
    }

    /// Destroys many VNICs at once, as [`ComputeNode::destroy_vnic`] does each one, but with
    /// the kernel work batched: every VNIC in one link-group deletion, then every subnet they
    /// emptied in another. Returns one result per config, in order. Every config is checked
    /// first; a bad one fails the call before anything is touched. The VNICs are forgotten
    /// before the kernel work, so if the kernel refuses a deletion the error is returned and
    /// the links left over are taken up by the next [`ComputeNode::rebuild`].
    pub async fn destroy_vnics(
        &self,
        configs: &[VnicConfig],
        cancel: Option<&watch::Receiver<bool>>,
    ) -> Result<Vec<DestroyedVnic>, CnError> {
        for config in configs {
            config.check(&[VnicRole::Vm, VnicRole::Container])?;
        }
        let _permit = self.throttle.acquire().await.expect("never closed");
        if cancel.is_some_and(|c| *c.borrow()) {
            return Err(CnError::Cancelled);
        }
        let _gate = self.gate.read().await;
        let span = info_span!("destroy_vnics", count = configs.len());
        self.destroy_checked(configs).instrument(span).await
    }

    async fn destroy_checked(&self, configs: &[VnicConfig]) -> Result<Vec<DestroyedVnic>, CnError> {
        // Creates still in flight finish (or fail and clean up) first.
        let in_flight: Vec<_> = {
            let topo = self.topology.lock().expect("topology lock");
            configs
                .iter()
                .filter_map(|c| topo.vnics.get(&c.vnic_id))
                .filter(|e| ready_index(&e.progress).is_none())
                .map(|e| e.progress.clone())
                .collect()
        };
        for rx in in_flight {
            let _ = wait_ready(rx, "VNIC", self.config.wait_timeout).await;
        }

        let removals: Vec<Option<Removal>> = {
            let mut topo = self.topology.lock().expect("topology lock");
            configs
                .iter()
                .map(|c| {
                    let vnic = topo.vnics.remove(&c.vnic_id)?;
                    let entry = topo.subnets.get_mut(&vnic.subnet);
                    let emptied = entry.is_some_and(|s| {
                        s.vnics.remove(&c.vnic_id);
                        s.vnics.is_empty()
                    });
                    let subnet = if emptied {
                        let s = topo.subnets.remove(&vnic.subnet);
                        // Before the lock goes: a create for the same subnet may start a new
                        // tunnel with the same key and peer right after.
                        if let Some(s) = &s {
                            self.tunnels.forget(&s.links.tunnel);
                        }
                        s
                    } else {
                        None
                    };
                    Some(Removal { vnic, subnet })
                })
                .collect()
        };

        let vnic_links: Vec<u32> = removals
            .iter()
            .flatten()
            .filter_map(|r| ready_index(&r.vnic.progress))
            .collect();
        self.netlink.delete_many(&vnic_links).await?;
        self.fault(FaultPoint::VnicsDeleted);
        let mut subnet_links = Vec::new();
        for s in removals.iter().flatten().filter_map(|r| r.subnet.as_ref()) {
            subnet_links.extend(ready_index(&s.progress));
            if s.links.tunnel.is_empty() {
                // A subnet `rebuild` could not give a tunnel.
                continue;
            }
            match self.netlink.link_by_name(&s.links.tunnel).await {
                Ok(Some(t)) => subnet_links.push(t.index),
                Ok(None) => {}
                Err(e) => warn!(tunnel = %s.links.tunnel, error = %e, "looking up tunnel"),
            }
        }
        self.netlink.delete_many(&subnet_links).await?;

        let out: Vec<DestroyedVnic> = removals
            .into_iter()
            .map(|r| {
                let Some(Removal { vnic, subnet }) = r else {
                    return DestroyedVnic::default();
                };
                let Some(subnet) = subnet else {
                    return DestroyedVnic::default();
                };
                DestroyedVnic {
                    tunnel: Some(self.event(TunnelEventKind::Del, &vnic.subnet)),
                    container: subnet.had_container.then(|| ContainerEvent::Del {
                        bridge: subnet.links.bridge.clone(),
                    }),
                }
            })
            .collect();
        info!(
            vnics = vnic_links.len(),
            tunnel_del = out.iter().filter(|d| d.tunnel.is_some()).count(),
            "VNICs destroyed"
        );
        Ok(out)
    }

    /// A concentrator VM's VNIC: a macvtap (bridge mode) on the compute link with the given
    /// MAC. Idempotent; returns the link (its `/dev/tapN` is `Link::macvtap_device`).
    pub async fn create_cnci_vnic(&self, config: &VnicConfig) -> Result<Link, CnError> {
        let checked = config.check(&[VnicRole::Concentrator])?;
        let _permit = self.throttle.acquire().await.expect("never closed");
        let _gate = self.gate.read().await;
        let alias = cnci_alias(config);
        if let Some(link) = self.netlink.link_by_alias(&alias).await? {
            return Ok(link);
        }
        let name = names::random(names::CNCI_VNIC);
        let mut new = NewLink::macvtap(&name, self.underlay.compute.index, MacvtapMode::Bridge);
        if let Some(mac) = checked.mac {
            new = new.mac(mac);
        }
        let index = self.netlink.create_index(&new.up()).await?;
        if let Err(e) = self.netlink.set_alias(index, &alias).await {
            let _ = self.netlink.delete(index).await;
            return Err(e.into());
        }
        info!(ifname = %name, vnic = %config.vnic_id, "concentrator VNIC created");
        self.netlink
            .link_by_index(index)
            .await?
            .ok_or_else(|| CnError::Dependency {
                what: format!("concentrator VNIC {}", config.vnic_id),
                why: format!("{name} has disappeared from the kernel"),
            })
    }

    /// Removes a concentrator VNIC; an unknown one is not an error.
    pub async fn destroy_cnci_vnic(&self, config: &VnicConfig) -> Result<(), CnError> {
        config.check(&[VnicRole::Concentrator])?;
        let _gate = self.gate.read().await;
        if let Some(link) = self.netlink.link_by_alias(&cnci_alias(config)).await? {
            self.netlink.delete(link.index).await?;
        }
        Ok(())
    }

    /// Subnets present on this node with their bridge names and VNIC counts.
    pub fn subnets(&self) -> Vec<(SubnetId, String, usize)> {
        let topo = self.topology.lock().expect("topology lock");
        topo.subnets
            .iter()
            .map(|(k, v)| (k.clone(), v.links.bridge.clone(), v.vnics.len()))
            .collect()
    }

    /// The ids of the VNICs this node knows.
    pub fn vnic_ids(&self) -> Vec<String> {
        let topo = self.topology.lock().expect("topology lock");
        topo.vnics.keys().cloned().collect()
    }
}

fn cnci_alias(config: &VnicConfig) -> String {
    Alias::new(CNCI_VNIC_KIND)
        .with("tenant", &config.tenant_id)
        .with("id", &config.vnic_id)
        .to_string()
}

fn tap_options(config: &VnicConfig) -> TapOptions {
    TapOptions {
        queues: config.queues.max(1),
        vnet_hdr: true,
        nonblocking: false,
    }
}
