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
use tenet::net::{Link, MacvtapMode, Netlink, NewLink, Route};
use tokio::sync::{Semaphore, watch};
use tracing::{Instrument, info, info_span, warn};

use crate::config::{VnicConfig, VnicRole};
use crate::discovery::{Underlay, UnderlayConfig, discover};
use crate::error::CnError;

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

    fn alias(&self) -> Alias {
        Alias::new(BRIDGE_KIND)
            .with("tenant", &self.tenant)
            .with("subnet_id", &self.subnet_id)
            .with("subnet", self.subnet)
            .with("conc", &self.concentrator)
            .with("conc_ip", self.concentrator_ip)
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
enum Progress {
    Creating,
    Ready,
    Failed(String),
}

#[derive(Debug, Clone)]
struct SubnetLinks {
    bridge: String,
    tunnel: String,
}

struct SubnetEntry {
    links: SubnetLinks,
    progress: watch::Receiver<Progress>,
    vnics: HashSet<String>,
    /// Whether a container VNIC was ever on this bridge (then its removal emits Del).
    had_container: bool,
}

struct VnicEntry {
    subnet: SubnetId,
    role: VnicRole,
    ifname: String,
    peer: Option<String>,
    progress: watch::Receiver<Progress>,
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
struct Topology {
    subnets: HashMap<SubnetId, SubnetEntry>,
    vnics: HashMap<String, VnicEntry>,
}

/// The compute node's dataplane.
pub struct ComputeNode {
    config: CnConfig,
    netlink: Netlink,
    tunnels: Arc<dyn TunnelBackend>,
    underlay: Underlay,
    topology: Mutex<Topology>,
    throttle: Semaphore,
}

/// A random interface name `<prefix>_<8 hex digits>` (12 bytes).
fn random_ifname(prefix: &str) -> String {
    format!("{prefix}_{:08x}", rand::random::<u32>())
}

fn gateway_of(subnet: &Ipv4Network) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// Waits until `rx` leaves `Creating`.
async fn wait_ready(
    mut rx: watch::Receiver<Progress>,
    what: &str,
    timeout: Duration,
) -> Result<(), CnError> {
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
            _ => Ok(()),
        },
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
        })
    }

    pub fn underlay(&self) -> &Underlay {
        &self.underlay
    }

    pub fn tunnel_backend(&self) -> &Arc<dyn TunnelBackend> {
        &self.tunnels
    }

    fn tunnel_local(&self) -> Ipv4Addr {
        self.underlay.compute.addr.ip()
    }

    /// The tenant MTU: configured, or the compute link's MTU minus the tunnel overhead.
    fn tenant_mtu(&self, config: &VnicConfig) -> u32 {
        config.mtu.unwrap_or_else(|| {
            self.underlay
                .compute
                .mtu
                .saturating_sub(self.tunnels.overhead())
        })
    }

    fn event(&self, kind: TunnelEventKind, s: &SubnetId, key: TunnelKey) -> TunnelEvent {
        TunnelEvent {
            kind,
            concentrator_id: s.concentrator.clone(),
            concentrator_ip: s.concentrator_ip,
            tenant_id: s.tenant.clone(),
            subnet_id: s.subnet_id.clone(),
            subnet: s.subnet,
            subnet_key: key,
            cn_id: self.config.id.clone(),
            cn_ip: self.tunnel_local(),
        }
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
        let span = info_span!("create_vnic", vnic = %config.vnic_id, tenant = %config.tenant_id, subnet = %config.subnet);
        self.create_checked(config, checked.key, checked.mac)
            .instrument(span)
            .await
    }

    async fn create_checked(
        &self,
        config: &VnicConfig,
        key: TunnelKey,
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
            if let Some(tx) = new_subnet {
                match self.create_subnet(&sid, &links, key, config).await {
                    Ok(()) => {
                        let _ = tx.send(Progress::Ready);
                        tunnel_event = Some(self.event(TunnelEventKind::Add, &sid, key));
                    }
                    Err(e) => {
                        let _ = tx.send(Progress::Failed(e.to_string()));
                        return Err(e);
                    }
                }
            } else if let Some(rx) = subnet_wait {
                wait_ready(
                    rx,
                    &format!("bridge {}", links.bridge),
                    self.config.wait_timeout,
                )
                .await?;
            }
            let vnic = self
                .create_link(config, mac, &links.bridge, ifname, peer)
                .await?;
            Ok((vnic, tunnel_event))
        }
        .await;

        match result {
            Ok((vnic, tunnel)) => {
                let _ = vnic_tx.send(Progress::Ready);
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
        let ifname = random_ifname("tvn");
        let peer = (config.role == VnicRole::Container).then(|| ifname.replacen("tvn", "tvp", 1));
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
                    bridge: random_ifname("tbr"),
                    tunnel: random_ifname("tgt"),
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
        wait_ready(
            rx,
            &format!("VNIC {}", config.vnic_id),
            self.config.wait_timeout,
        )
        .await?;
        let link =
            self.netlink
                .link_by_name(&ifname)
                .await?
                .ok_or_else(|| CnError::Dependency {
                    what: format!("VNIC {}", config.vnic_id),
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

    async fn create_subnet(
        &self,
        sid: &SubnetId,
        links: &SubnetLinks,
        key: TunnelKey,
        config: &VnicConfig,
    ) -> Result<(), CnError> {
        let mtu = self.tenant_mtu(config);
        let bridge = self
            .netlink
            .create(&NewLink::bridge(&links.bridge).mtu(mtu))
            .await?;
        let made = async {
            self.netlink
                .set_alias(bridge.index, &sid.alias().to_string())
                .await?;
            let mut spec =
                TunnelSpec::new(&links.tunnel, key, self.tunnel_local(), sid.concentrator_ip);
            spec.mtu = Some(mtu);
            let tunnel = self.tunnels.create(&spec).await?;
            if let Err(e) = self.netlink.enslave(tunnel.index, bridge.index).await {
                let _ = self.tunnels.delete(&links.tunnel).await;
                return Err(e.into());
            }
            self.netlink.set_up(bridge.index).await?;
            Ok::<_, CnError>(())
        }
        .await;
        if made.is_err() {
            let _ = self.tunnels.delete(&links.tunnel).await;
            let _ = self.netlink.delete(bridge.index).await;
        }
        made
    }

    async fn create_link(
        &self,
        config: &VnicConfig,
        mac: Option<[u8; 6]>,
        bridge: &str,
        ifname: String,
        peer: Option<String>,
    ) -> Result<Vnic, CnError> {
        let bridge_index = self.netlink.index_of(bridge).await?;
        let mtu = self.tenant_mtu(config);
        let alias = Alias::new(VNIC_KIND)
            .with("id", &config.vnic_id)
            .with("role", config.role.as_str())
            .with("instance", &config.instance_id)
            .to_string();
        let mut queues = Vec::new();
        let link = match config.role {
            VnicRole::Vm => {
                queues = open_tap_in(self.config.netns.as_deref(), &ifname, tap_options(config))?;
                let link = self.netlink.link_by_name(&ifname).await?.ok_or_else(|| {
                    CnError::Dependency {
                        what: ifname.clone(),
                        why: "tap vanished after creation".into(),
                    }
                })?;
                if let Err(e) = self.netlink.set_mtu(link.index, mtu).await {
                    drop(queues);
                    let _ = self.netlink.delete(link.index).await;
                    return Err(e.into());
                }
                link
            }
            _ => {
                let peer = peer.clone().expect("containers have a peer");
                let mut new = NewLink::veth(&ifname, &peer).mtu(mtu);
                new = new.controller(bridge_index);
                self.netlink.create(&new).await?
            }
        };
        let finish = async {
            self.netlink.set_alias(link.index, &alias).await?;
            if config.role == VnicRole::Vm {
                self.netlink.enslave(link.index, bridge_index).await?;
            }
            if let Some(peer) = &peer {
                let p = self.netlink.index_of(peer).await?;
                if let Some(mac) = mac {
                    self.netlink.set_mac(p, mac).await?;
                }
                self.netlink.set_mtu(p, mtu).await?;
                if let Some(ns) = &config.netns {
                    self.move_into_container(p, ns).await?;
                }
            }
            self.netlink.set_up(link.index).await?;
            Ok::<_, CnError>(())
        }
        .await;
        if let Err(e) = finish {
            drop(queues);
            // Deleting the host side of a veth removes its peer too, wherever it is.
            let _ = self.netlink.delete(link.index).await;
            return Err(e);
        }
        Ok(Vnic {
            id: config.vnic_id.clone(),
            role: config.role,
            ifname,
            index: link.index,
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
            self.delete_subnet_links(&entry.links).await;
        }
    }

    async fn delete_subnet_links(&self, links: &SubnetLinks) {
        if let Err(e) = self.tunnels.delete(&links.tunnel).await {
            warn!(tunnel = %links.tunnel, error = %e, "deleting tunnel");
        }
        match self.netlink.link_by_name(&links.bridge).await {
            Ok(Some(b)) => {
                if let Err(e) = self.netlink.delete(b.index).await {
                    warn!(bridge = %links.bridge, error = %e, "deleting bridge");
                }
            }
            Ok(None) => {}
            Err(e) => warn!(bridge = %links.bridge, error = %e, "looking up bridge"),
        }
    }

    /// Destroys a tenant VNIC; an unknown VNIC is not an error. The last VNIC of a subnet also
    /// removes its tunnel and bridge and returns TunnelDel.
    pub async fn destroy_vnic(
        &self,
        config: &VnicConfig,
        cancel: Option<&watch::Receiver<bool>>,
    ) -> Result<DestroyedVnic, CnError> {
        let checked = config.check(&[VnicRole::Vm, VnicRole::Container])?;
        let _permit = self.throttle.acquire().await.expect("never closed");
        if cancel.is_some_and(|c| *c.borrow()) {
            return Err(CnError::Cancelled);
        }
        let span = info_span!("destroy_vnic", vnic = %config.vnic_id, tenant = %config.tenant_id);
        async {
            let progress = {
                let topo = self.topology.lock().expect("topology lock");
                match topo.vnics.get(&config.vnic_id) {
                    None => return Ok(DestroyedVnic::default()),
                    Some(e) => e.progress.clone(),
                }
            };
            // A create still in flight finishes (or fails and cleans up) first.
            let _ = wait_ready(
                progress,
                &format!("VNIC {}", config.vnic_id),
                self.config.wait_timeout,
            )
            .await;
            let (entry, last) = {
                let mut topo = self.topology.lock().expect("topology lock");
                let Some(entry) = topo.vnics.remove(&config.vnic_id) else {
                    return Ok(DestroyedVnic::default());
                };
                let last = match topo.subnets.get_mut(&entry.subnet) {
                    Some(s) => {
                        s.vnics.remove(&config.vnic_id);
                        if s.vnics.is_empty() {
                            topo.subnets.remove(&entry.subnet)
                        } else {
                            None
                        }
                    }
                    None => None,
                };
                (entry, last)
            };
            if let Some(link) = self.netlink.link_by_name(&entry.ifname).await? {
                self.netlink.delete(link.index).await?;
            }
            let mut out = DestroyedVnic::default();
            if let Some(subnet) = last {
                self.delete_subnet_links(&subnet.links).await;
                out.tunnel = Some(self.event(TunnelEventKind::Del, &entry.subnet, checked.key));
                if subnet.had_container {
                    out.container = Some(ContainerEvent::Del {
                        bridge: subnet.links.bridge.clone(),
                    });
                }
            }
            info!(tunnel_del = out.tunnel.is_some(), "VNIC destroyed");
            Ok(out)
        }
        .instrument(span)
        .await
    }

    /// A concentrator VM's VNIC: a macvtap (bridge mode) on the compute link with the given
    /// MAC. Idempotent; returns the link (its `/dev/tapN` is `Link::macvtap_device`).
    pub async fn create_cnci_vnic(&self, config: &VnicConfig) -> Result<Link, CnError> {
        let checked = config.check(&[VnicRole::Concentrator])?;
        let _permit = self.throttle.acquire().await.expect("never closed");
        let alias = Alias::new(CNCI_VNIC_KIND)
            .with("tenant", &config.tenant_id)
            .with("id", &config.vnic_id)
            .to_string();
        if let Some(link) = self.netlink.link_by_alias(&alias).await? {
            return Ok(link);
        }
        let name = random_ifname("tvc");
        let mut new = NewLink::macvtap(&name, self.underlay.compute.index, MacvtapMode::Bridge);
        if let Some(mac) = checked.mac {
            new = new.mac(mac);
        }
        let link = self.netlink.create(&new).await?;
        let finish = async {
            self.netlink.set_alias(link.index, &alias).await?;
            self.netlink.set_up(link.index).await?;
            Ok::<_, CnError>(())
        }
        .await;
        if let Err(e) = finish {
            let _ = self.netlink.delete(link.index).await;
            return Err(e);
        }
        info!(ifname = %name, vnic = %config.vnic_id, "concentrator VNIC created");
        Ok(self
            .netlink
            .link_by_index(link.index)
            .await?
            .unwrap_or(link))
    }

    /// Removes a concentrator VNIC; an unknown one is not an error.
    pub async fn destroy_cnci_vnic(&self, config: &VnicConfig) -> Result<(), CnError> {
        config.check(&[VnicRole::Concentrator])?;
        let alias = Alias::new(CNCI_VNIC_KIND)
            .with("tenant", &config.tenant_id)
            .with("id", &config.vnic_id)
            .to_string();
        if let Some(link) = self.netlink.link_by_alias(&alias).await? {
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
}

fn tap_options(config: &VnicConfig) -> TapOptions {
    TapOptions {
        queues: config.queues.max(1),
        vnet_hdr: true,
        nonblocking: false,
    }
}
