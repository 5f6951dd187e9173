//! The user-space GRE backend: a persistent tap per tunnel (enslaved to a bridge like a
//! gretap would be) served by the [`GreEngine`] of the namespace.

pub mod ecn;
mod engine;
pub mod offload;
pub mod pmtu;
pub mod stats;
pub mod wire;

use std::path::PathBuf;

use async_trait::async_trait;
use tracing::{info, warn};

pub(crate) use engine::raw_gre_socket;
pub use engine::{Endpoint, EngineStats, GreEngine, TunnelStats};

use super::{
    GRE_OVERHEAD, TunnelBackend, TunnelKind, TunnelSpec, delete_named, existing, finish,
    tenant_mtu, tunnels_of,
};
use crate::net::link::Link;
use std::os::fd::{AsFd, OwnedFd};

use crate::net::tap::{TUN_F_CSUM, TUN_F_TSO4, TapOptions, open_tap_in, set_offload};
use crate::net::{Leftovers, NetError, NetResult, Netlink};

pub struct UserspaceGre {
    netlink: Netlink,
    netns: Option<PathBuf>,
    engine: GreEngine,
}

fn endpoint(spec: &TunnelSpec) -> Endpoint {
    Endpoint {
        name: spec.name.clone(),
        key: spec.key.get(),
        local: spec.local,
        remote: spec.remote,
        ttl: spec.ttl,
    }
}

/// Opens (creating if needed) a tunnel tap the way the engine reads it: non-blocking, with a
/// vnet header on every frame and checksum + TCP segmentation offload, so that the kernel
/// hands over 64 KB TCP super-frames that the engine segments itself.
fn open_engine_tap(netns: Option<&std::path::Path>, name: &str) -> NetResult<OwnedFd> {
    let opts = TapOptions {
        vnet_hdr: true,
        ..TapOptions::default()
    };
    let tap = open_tap_in(netns, name, opts)?.remove(0);
    set_offload(tap.as_fd(), TUN_F_CSUM | TUN_F_TSO4)
        .map_err(|e| NetError::new("set offloads of", format!("tap {name}"), e.cause))?;
    Ok(tap)
}

impl UserspaceGre {
    /// Starts the engine in `netns` (the namespace `netlink` is bound to; `None`: the
    /// caller's) and adopts every user-space tunnel tap already there.
    pub async fn start(netlink: Netlink, netns: Option<PathBuf>) -> NetResult<Self> {
        let engine = GreEngine::start(netns.as_deref())?;
        let backend = UserspaceGre {
            netlink,
            netns,
            engine,
        };
        let found = tunnels_of(&backend.netlink, TunnelKind::UserspaceGre).await?;
        let mut adopted = 0;
        for (spec, _) in &found {
            match backend.attach(spec) {
                Ok(()) => adopted += 1,
                Err(e) => warn!(tunnel = %spec.name, error = %e, "cannot adopt tunnel tap"),
            }
        }
        info!(adopted, "user-space GRE tunnels adopted from the kernel");
        Ok(backend)
    }

    fn attach(&self, spec: &TunnelSpec) -> NetResult<()> {
        let tap = open_engine_tap(self.netns.as_deref(), &spec.name)?;
        self.engine.attach(endpoint(spec), tap)
    }

    /// Packet and drop counters of the datapath.
    pub fn stats(&self) -> EngineStats {
        self.engine.stats()
    }

    pub fn engine(&self) -> &GreEngine {
        &self.engine
    }

    /// Stops the datapath; the taps stay, and a new backend adopts them.
    pub fn stop(self) {
        self.engine.stop();
    }
}

#[async_trait]
impl TunnelBackend for UserspaceGre {
    fn kind(&self) -> TunnelKind {
        TunnelKind::UserspaceGre
    }

    fn overhead(&self) -> u32 {
        GRE_OVERHEAD
    }

    async fn create(&self, spec: &TunnelSpec) -> NetResult<Link> {
        spec.validate()?;
        if let Some(link) = existing(&self.netlink, self.kind(), spec).await? {
            // Not attached yet (adopted after a restart failed), or attached with other
            // settings (a new fixed TTL): attach as asked, and record it.
            if !self.engine.endpoints().contains(&endpoint(spec)) {
                self.attach(spec)?;
                self.netlink
                    .set_alias(link.index, &spec.alias(self.kind()))
                    .await?;
            }
            return Ok(link);
        }
        let mtu = tenant_mtu(&self.netlink, spec, GRE_OVERHEAD).await?;
        let tap = open_engine_tap(self.netns.as_deref(), &spec.name)?;
        let index = self.netlink.index_of(&spec.name).await?;
        let link = finish(&self.netlink, self.kind(), spec, index, mtu).await?;
        if let Err(e) = self.engine.attach(endpoint(spec), tap) {
            let mut left = Leftovers::new();
            left.note(self.netlink.delete(index).await);
            left.log(&format!("tunnel {}", spec.name));
            return Err(e.with_leftovers(left));
        }
        Ok(link)
    }

    async fn delete(&self, name: &str) -> NetResult<()> {
        self.engine.detach(name);
        delete_named(&self.netlink, name).await
    }

    async fn tunnels(&self) -> NetResult<Vec<(TunnelSpec, Link)>> {
        tunnels_of(&self.netlink, self.kind()).await
    }

    fn forget(&self, name: &str) {
        self.engine.detach(name);
    }

    fn stats(&self) -> Option<EngineStats> {
        Some(self.engine.stats())
    }
}
