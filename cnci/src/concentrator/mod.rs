//! `Concentrator`: the far end of the compute nodes' tunnels for one tenant. Per subnet, a
//! bridge holding the gateway (network + 1), a dnsmasq bound to it, and one tunnel per compute
//! node enslaved to it. One file per verb: [`attach`] (TenantAdded), [`detach`]
//! (TenantRemoved), [`subnet`] (making and removing a subnet); `crate::rebuild` takes over
//! after a crash; `crate::sync` keeps dnsmasq's hosts in step with the endpoints in etcd.
//!
//! Changes to one subnet take turns, in the order they arrive (`turns`); different subnets
//! change side by side, each holding the lock over the subnets map only to read or update
//! it and while the firewall is rendered, not while a new subnet's dnsmasq starts.

/// Stops the process here when a test's fault hook says so; compiles to nothing without the
/// `fault-injection` feature.
macro_rules! fault_point {
    ($inner:expr, $point:ident) => {
        #[cfg(feature = "fault-injection")]
        $inner.fault($crate::fault::FaultPoint::$point);
    };
}

mod attach;
mod detach;
pub(crate) mod edge;
pub(crate) mod mesh;
pub(crate) mod subnet;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use tenet::net::Netlink;
use tenet::net::tunnel::{TunnelBackend, TunnelSpec, backend};
use tenet::net::underlay::{self, UnderlayAddr};
use tenet::store::{Datastore, Revision};
use tenet::types::TunnelKey;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{Instrument, info, info_span, warn};

pub use attach::Attached;
pub use detach::Detached;
pub use mesh::{MeshChange, pair_key};

use crate::config::CnciConfig;
use crate::dnsmasq::DhcpServer;
use crate::edge::EdgeState;
use crate::endpoints::EndpointTable;
use crate::error::CnciError;
use tenet::net::firewall::{Firewall, NatMap};

/// One tenant subnet as the concentrator holds it.
pub(crate) struct SubnetState {
    pub key: TunnelKey,
    pub bridge: String,
    pub bridge_index: u32,
    /// Tunnels by compute-node address. In VXLAN mode each is a flood entry of `vxlan`.
    pub tunnels: BTreeMap<Ipv4Addr, TunnelState>,
    /// VXLAN mode: the subnet's one VXLAN device (name, index).
    pub vxlan: Option<(String, u32)>,
    pub dhcp: DhcpServer,
    /// Since when it has had no tunnel.
    pub idle_since: Option<Instant>,
}

pub(crate) struct TunnelState {
    pub name: String,
    pub index: u32,
    pub cn_id: String,
}

/// What the concentrator shares with its background tasks.
pub(crate) struct Inner {
    pub config: CnciConfig,
    pub netlink: Netlink,
    pub tunnels: Arc<dyn TunnelBackend>,
    pub compute: UnderlayAddr,
    pub uplink: Option<UnderlayAddr>,
    pub subnets: tokio::sync::Mutex<BTreeMap<Ipv4Network, SubnetState>>,
    /// Attaches and detaches take turns per subnet (`turns`); subnets being made, outside
    /// the `subnets` lock, are in `making`.
    pub turns: tenet::turns::Turns<Ipv4Network>,
    /// At most `config.max_parallel` attaches and detaches at once, in arrival order.
    pub throttle: tokio::sync::Semaphore,
    pub making: Mutex<BTreeSet<Ipv4Network>>,
    pub endpoints: Mutex<EndpointTable>,
    /// The etcd revision whose endpoints the hosts files reflect.
    pub synced: watch::Sender<Revision>,
    /// Where the edge's desired state is kept (`/tenet/v1/cnci/<id>/`).
    pub store: Option<Arc<dyn Datastore>>,
    /// The edge's rules; `None` without an uplink.
    pub firewall: Option<Firewall>,
    /// Floating IPs as nftables map elements (with iptables-nft and `nft` present); `None`:
    /// they are rules in `firewall`.
    pub natmap: Option<NatMap>,
    /// Port forwards and floating IPs. Locked after `subnets` when both are held.
    pub edge: tokio::sync::Mutex<EdgeState>,
    /// The tenant mesh in place.
    pub mesh: tokio::sync::Mutex<mesh::MeshState>,
    /// Whether the namespace settings (`crate::sysctls`) are in place; checked once, not on
    /// every firewall change.
    pub settings_ready: std::sync::atomic::AtomicBool,
    /// The settings subnets need (`sysctls::ensure_for_subnets`) are in place.
    pub subnet_settings_ready: std::sync::atomic::AtomicBool,
}

impl Inner {
    pub fn endpoints(&self) -> MutexGuard<'_, EndpointTable> {
        self.endpoints.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn making(&self) -> MutexGuard<'_, BTreeSet<Ipv4Network>> {
        self.making.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tenant MTU: the compute link's MTU minus the tunnel overhead.
    pub fn tenant_mtu(&self) -> u32 {
        self.compute.mtu.saturating_sub(self.tunnels.overhead())
    }

    pub fn tunnel_local(&self) -> Ipv4Addr {
        self.compute.addr.ip()
    }

    /// A tunnel from this concentrator to `remote`, with the configured MTU and TTL.
    pub fn tunnel_spec(&self, name: &str, key: TunnelKey, remote: Ipv4Addr) -> TunnelSpec {
        let mut spec = TunnelSpec::new(name, key, self.tunnel_local(), remote);
        spec.mtu = Some(self.tenant_mtu());
        spec.ttl = self.config.tunnel_ttl;
        spec
    }

    /// VXLAN mode: one VXLAN device per subnet with a flood entry per compute node, because
    /// the kernel refuses a second device with the same VNI and port.
    pub fn vxlan_mode(&self) -> bool {
        self.tunnels.kind() == tenet::net::tunnel::TunnelKind::Vxlan
    }

    #[cfg(feature = "fault-injection")]
    pub fn fault(&self, point: crate::fault::FaultPoint) {
        if let Some(hook) = &self.config.fault_hook {
            (hook.0)(point);
        }
    }
}

/// What one subnet looks like now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetInfo {
    pub subnet: Ipv4Network,
    pub key: TunnelKey,
    pub bridge: String,
    /// (compute node address, its id, tunnel interface).
    pub tunnels: Vec<(Ipv4Addr, String, String)>,
    pub dhcp_pid: Option<u32>,
    /// How often its dnsmasq was restarted after dying.
    pub dhcp_restarts: u32,
    /// The leases its dnsmasq holds.
    pub dhcp_leases: usize,
}

/// The concentrator's dataplane for one tenant.
pub struct Concentrator {
    pub(crate) inner: Arc<Inner>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Concentrator {
    /// Finds the compute link and the uplink, sets up the tunnel backend and, given a
    /// datastore, starts following the tenant's workload endpoints for DHCP. Does not touch
    /// existing links or daemons: call [`Concentrator::rebuild`] to take over what a previous
    /// run left before attaching anything.
    pub async fn init(
        config: CnciConfig,
        store: Option<Arc<dyn Datastore>>,
    ) -> Result<Self, CnciError> {
        config.check()?;
        let netlink = match &config.netns {
            Some(p) => Netlink::connect_in(p)?,
            None => Netlink::connect()?,
        };
        let candidates = underlay::candidates(&netlink).await?;
        let compute = match config.tunnel_local {
            Some(ip) => underlay::by_address("tunnel local", &candidates, ip),
            None => underlay::pick("compute", &candidates, &config.compute_nets),
        }
        .map_err(CnciError::Discovery)?;
        let uplink = find_uplink(&config, &candidates, &compute)?;
        let tunnels = backend(config.tunnel, netlink.clone(), config.netns.clone()).await?;
        let firewall = match &uplink {
            Some(_) => Some(
                Firewall::new(config.netns.as_deref(), config.iptables)
                    .await
                    .map_err(CnciError::Firewall)?,
            ),
            None => None,
        };
        let natmap = match (&firewall, &uplink) {
            (Some(fw), Some(up))
                if config.nft_floating
                    && fw.backend() == "iptables-nft"
                    && NatMap::available(config.netns.as_deref()).await =>
            {
                Some(NatMap::new(
                    crate::edge::OWNER,
                    &up.link,
                    config.netns.as_deref(),
                ))
            }
            _ => None,
        };
        info!(
            cnci = %config.id,
            tenant = %config.tenant,
            compute = %compute.addr,
            uplink = ?uplink.as_ref().map(|u| u.addr),
            tunnel = %tunnels.kind(),
            "concentrator ready"
        );
        let (synced, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            endpoints: Mutex::new(EndpointTable::new(&config.tenant)),
            throttle: tokio::sync::Semaphore::new(config.max_parallel.max(1)),
            config,
            netlink,
            tunnels,
            compute,
            uplink,
            subnets: tokio::sync::Mutex::new(BTreeMap::new()),
            turns: Default::default(),
            making: Default::default(),
            synced,
            store: store.clone(),
            firewall,
            natmap,
            edge: tokio::sync::Mutex::new(EdgeState::default()),
            mesh: tokio::sync::Mutex::new(mesh::MeshState::default()),
            settings_ready: std::sync::atomic::AtomicBool::new(false),
            subnet_settings_ready: std::sync::atomic::AtomicBool::new(false),
        });
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let span = info_span!("cnci", id = %inner.config.id, tenant = %inner.config.tenant);
        if let Some(store) = store {
            tasks.push(tokio::spawn(
                crate::sync::follow_endpoints(Arc::downgrade(&inner), store, stop_rx.clone())
                    .instrument(span.clone()),
            ));
        }
        if let Some(idle) = inner.config.idle_timeout {
            tasks.push(tokio::spawn(
                reap_idle(Arc::downgrade(&inner), idle, stop_rx).instrument(span),
            ));
        }
        Ok(Concentrator {
            inner,
            stop,
            tasks: Mutex::new(tasks),
        })
    }

    pub fn config(&self) -> &CnciConfig {
        &self.inner.config
    }

    /// The compute link: where tunnels arrive.
    pub fn compute(&self) -> &UnderlayAddr {
        &self.inner.compute
    }

    /// The uplink (the external network), when there is one.
    /// The MAC address of the compute link (ciao's `concentrator_mac`), as `aa:bb:…`.
    pub async fn compute_mac(&self) -> Option<String> {
        let link = self
            .inner
            .netlink
            .link_by_index(self.inner.compute.index)
            .await
            .ok()??;
        let mac = link.mac?;
        Some(tenet::types::MacAddr::from(mac).to_string())
    }

    pub fn uplink(&self) -> Option<&UnderlayAddr> {
        self.inner.uplink.as_ref()
    }

    pub fn tunnel_backend(&self) -> &Arc<dyn TunnelBackend> {
        &self.inner.tunnels
    }

    /// The etcd revision whose workload endpoints dnsmasq's hosts files reflect; changes as
    /// the endpoint watch is applied (await it instead of polling).
    pub fn synced_revision(&self) -> watch::Receiver<Revision> {
        self.inner.synced.subscribe()
    }

    /// Every subnet with its bridge, tunnels and dnsmasq.
    pub async fn subnets(&self) -> Vec<SubnetInfo> {
        // The leases files are read after the lock is let go: attaches wait for it.
        let listed: Vec<(SubnetInfo, std::path::PathBuf)> = {
            let subnets = self.inner.subnets.lock().await;
            subnets
                .iter()
                .map(|(net, s)| {
                    let info = SubnetInfo {
                        subnet: *net,
                        key: s.key,
                        bridge: s.bridge.clone(),
                        tunnels: s
                            .tunnels
                            .iter()
                            .map(|(ip, t)| (*ip, t.cn_id.clone(), t.name.clone()))
                            .collect(),
                        dhcp_pid: s.dhcp.daemon().pid(),
                        dhcp_restarts: s.dhcp.daemon().restarts(),
                        dhcp_leases: 0,
                    };
                    (info, s.dhcp.dir().to_path_buf())
                })
                .collect()
        };
        listed
            .into_iter()
            .map(|(mut info, dir)| {
                info.dhcp_leases = crate::dnsmasq::leases_in(&dir);
                info
            })
            .collect()
    }

    /// The attached subnets and how many tunnels they have, without reading any file: what
    /// the agent's status needs after every TenantAdded and TenantRemoved.
    pub async fn summary(&self) -> (Vec<Ipv4Network>, usize) {
        let subnets = self.inner.subnets.lock().await;
        let tunnels = subnets.values().map(|s| s.tunnels.len()).sum();
        (subnets.keys().copied().collect(), tunnels)
    }

    /// Stops the background tasks. The links and dnsmasq processes stay, for the next
    /// concentrator to take over with [`Concentrator::rebuild`]; [`Concentrator::reset`]
    /// removes them.
    pub async fn shutdown(&self) {
        self.stop.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for task in tasks {
            if let Err(e) = task.await {
                warn!(error = %e, "a concentrator task failed");
            }
        }
    }
}

impl Drop for Concentrator {
    fn drop(&mut self) {
        for task in self
            .tasks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            task.abort();
        }
    }
}

/// The uplink: explicit, else by CIDR, else the one physical address that is not the
/// compute link's (none is fine: NAT is then unavailable).
fn find_uplink(
    config: &CnciConfig,
    candidates: &[UnderlayAddr],
    compute: &UnderlayAddr,
) -> Result<Option<UnderlayAddr>, CnciError> {
    if let Some(ip) = config.uplink_addr {
        return underlay::by_address("uplink", candidates, ip)
            .map(Some)
            .map_err(CnciError::Discovery);
    }
    // Floating IPs sit on the uplink as /32s; they are not its address.
    let candidates: Vec<UnderlayAddr> = candidates
        .iter()
        .filter(|a| a.addr.prefix() < 32)
        .cloned()
        .collect();
    if !config.uplink_nets.is_empty() {
        return underlay::pick("uplink", &candidates, &config.uplink_nets)
            .map(Some)
            .map_err(CnciError::Discovery);
    }
    let others: Vec<UnderlayAddr> = candidates
        .iter()
        .filter(|a| a.index != compute.index)
        .cloned()
        .collect();
    match others.len() {
        0 => Ok(None),
        _ => underlay::pick("uplink", &others, &[])
            .map(Some)
            .map_err(CnciError::Discovery),
    }
}

/// Removes subnets that have had no tunnel for `idle`.
async fn reap_idle(inner: std::sync::Weak<Inner>, idle: Duration, mut stop: watch::Receiver<bool>) {
    let tick = (idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.changed() => return,
        }
        let Some(inner) = inner.upgrade() else { return };
        for net in subnet::remove_idle(&inner, idle).await {
            info!(subnet = %net, idle_s = idle.as_secs(), "removed an idle subnet");
        }
    }
}
