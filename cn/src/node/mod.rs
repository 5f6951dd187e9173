//! `ComputeNode`: tenant VNICs, one bridge and one tunnel per (tenant, subnet, concentrator),
//! and the events the agent turns into SSNTP messages.
//!
//! Bookkeeping ([`topology`]: which subnets and VNICs exist, who is creating what) lives under
//! one mutex; netlink work happens outside it. A call that needs a bridge another call is
//! still creating waits for it, with a timeout. One file per verb: [`create`], [`destroy`],
//! [`cnci_vnic`]; `crate::rebuild` takes over after a crash.

/// Stops the process here when a test's fault hook says so; compiles to nothing without the
/// `fault-injection` feature.
macro_rules! fault_point {
    ($node:expr, $point:ident) => {
        #[cfg(feature = "fault-injection")]
        $node.fault($crate::fault::FaultPoint::$point);
    };
}

mod cnci_vnic;
mod create;
mod destroy;
pub(crate) mod topology;
mod types;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tenet::net::Netlink;
use tenet::net::tunnel::{BackendChoice, TunnelBackend, TunnelSpec, backend};
use tokio::sync::{RwLock, Semaphore};
use tracing::info;

pub use types::{
    ContainerEvent, ContainerNetwork, CreatedVnic, DestroyedVnic, SubnetBinding, TunnelEvent,
    TunnelEventKind, Vnic,
};

use crate::discovery::{Underlay, UnderlayConfig, discover};
use crate::error::CnError;
use topology::Topology;

#[derive(Debug, Clone)]
pub struct CnConfig {
    /// This node's id, reported in tunnel events.
    pub id: String,
    pub underlay: UnderlayConfig,
    pub tunnel: BackendChoice,
    /// Outer TTL of the tunnels (`None`: inherit the inner packet's).
    pub tunnel_ttl: Option<u8>,
    /// The namespace to work in (`None`: the caller's).
    pub netns: Option<PathBuf>,
    /// Calls doing kernel work at once.
    pub max_parallel: usize,
    /// How long a call waits for an object another call is creating.
    pub wait_timeout: Duration,
    /// Tests only: called at each [`crate::FaultPoint`] to simulate a crash there.
    #[cfg(feature = "fault-injection")]
    pub fault_hook: Option<crate::fault::FaultHook>,
}

impl CnConfig {
    pub fn new(id: &str) -> Self {
        CnConfig {
            id: id.into(),
            underlay: UnderlayConfig::default(),
            tunnel: BackendChoice::Auto,
            tunnel_ttl: None,
            netns: None,
            max_parallel: 8,
            wait_timeout: Duration::from_secs(6),
            #[cfg(feature = "fault-injection")]
            fault_hook: None,
        }
    }
}

/// The compute node's dataplane.
pub struct ComputeNode {
    pub(crate) config: CnConfig,
    pub(crate) netlink: Netlink,
    pub(crate) tunnels: Arc<dyn TunnelBackend>,
    pub(crate) underlay: Underlay,
    topology: Mutex<Topology>,
    throttle: Semaphore,
    /// Creates and destroys hold it shared; `rebuild` and `reset`, which replace the whole
    /// topology, hold it exclusively.
    pub(crate) rebuild_lock: RwLock<()>,
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
            rebuild_lock: RwLock::new(()),
        })
    }

    pub fn underlay(&self) -> &Underlay {
        &self.underlay
    }

    pub fn tunnel_backend(&self) -> &Arc<dyn TunnelBackend> {
        &self.tunnels
    }

    /// Subnets present on this node with their bridge names and VNIC counts.
    pub fn subnets(&self) -> Vec<(SubnetBinding, String, usize)> {
        self.topology().subnets()
    }

    /// The ids of the VNICs this node knows.
    pub fn vnic_ids(&self) -> Vec<String> {
        self.topology().vnic_ids()
    }

    /// Each VNIC this node knows with the subnet it is on (its tenant among it).
    pub fn vnic_bindings(&self) -> Vec<(String, SubnetBinding)> {
        self.topology().vnic_bindings()
    }

    pub(crate) fn topology(&self) -> MutexGuard<'_, Topology> {
        self.topology.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn tunnel_local(&self) -> Ipv4Addr {
        self.underlay.compute.addr.ip()
    }

    #[cfg(feature = "fault-injection")]
    pub(crate) fn fault(&self, point: crate::fault::FaultPoint) {
        if let Some(hook) = &self.config.fault_hook {
            (hook.0)(point);
        }
    }

    pub(crate) fn default_mtu(&self) -> u32 {
        self.underlay
            .compute
            .mtu
            .saturating_sub(self.tunnels.overhead())
    }

    pub(crate) fn event(&self, kind: TunnelEventKind, s: &SubnetBinding) -> TunnelEvent {
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
    pub(crate) fn tunnel_spec(&self, s: &SubnetBinding, name: &str, mtu: u32) -> TunnelSpec {
        let mut spec = TunnelSpec::new(name, s.key(), self.tunnel_local(), s.concentrator_ip);
        spec.mtu = Some(mtu);
        spec.ttl = self.config.tunnel_ttl;
        spec
    }

    /// Waits for a free slot among `max_parallel`, then checks for cancellation.
    async fn admit(
        &self,
        cancel: Option<&tokio::sync::watch::Receiver<bool>>,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, CnError> {
        let permit = self.throttle.acquire().await.expect("never closed");
        if cancel.is_some_and(|c| *c.borrow()) {
            return Err(CnError::Cancelled);
        }
        Ok(permit)
    }
}
