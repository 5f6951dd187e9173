//! Kernel gretap tunnels (ikey = okey = key, PMTU discovery on).

use std::net::Ipv4Addr;

use async_trait::async_trait;
use tracing::{info, warn};

use super::{
    GRE_OVERHEAD, GRETAP_SUPPORTED, TunnelBackend, TunnelKind, TunnelSpec, delete_named, existing,
    finish, tenant_mtu, tunnels_of,
};
use crate::net::link::Link;
use crate::net::new_link::{GretapParams, NewLink};
use crate::net::{NetResult, Netlink};

pub struct KernelGre {
    netlink: Netlink,
}

impl KernelGre {
    pub fn new(netlink: Netlink) -> Self {
        KernelGre { netlink }
    }
}

/// The exact link tenet asks the kernel for.
pub fn gretap_link(spec: &TunnelSpec) -> NewLink {
    NewLink::gretap(
        &spec.name,
        GretapParams {
            local: spec.local,
            remote: spec.remote,
            key: spec.key.get(),
            ttl: spec.ttl.unwrap_or(0),
        },
    )
}

#[async_trait]
impl TunnelBackend for KernelGre {
    fn kind(&self) -> TunnelKind {
        TunnelKind::KernelGre
    }

    fn overhead(&self) -> u32 {
        GRE_OVERHEAD
    }

    async fn create(&self, spec: &TunnelSpec) -> NetResult<Link> {
        spec.validate()?;
        if let Some(link) = existing(&self.netlink, self.kind(), spec).await? {
            return Ok(link);
        }
        let mtu = tenant_mtu(&self.netlink, spec, GRE_OVERHEAD).await?;
        let link = self.netlink.create(&gretap_link(spec)).await?;
        finish(&self.netlink, self.kind(), spec, link.index, mtu).await
    }

    async fn delete(&self, name: &str) -> NetResult<()> {
        delete_named(&self.netlink, name).await
    }

    async fn tunnels(&self) -> NetResult<Vec<(TunnelSpec, Link)>> {
        tunnels_of(&self.netlink, self.kind()).await
    }
}

/// Whether this kernel can make gretap links. Probed once per process by creating (and
/// deleting) a throw-away gretap; EOPNOTSUPP means no GRE in this kernel.
pub async fn kernel_supports_gretap(netlink: &Netlink) -> NetResult<bool> {
    if let Some(known) = GRETAP_SUPPORTED.get() {
        return Ok(*known);
    }
    let name = format!("tnprobe{}", std::process::id() % 100_000);
    let probe = NewLink::gretap(
        &name,
        GretapParams {
            local: Ipv4Addr::new(127, 0, 0, 1),
            remote: Ipv4Addr::new(127, 0, 0, 2),
            key: 1,
            ttl: 0,
        },
    );
    let supported = match netlink.create(&probe).await {
        Ok(link) => {
            if let Err(e) = netlink.delete(link.index).await {
                warn!(error = %e, "cannot delete the gretap probe link");
            }
            true
        }
        Err(e) if e.is_unsupported() => false,
        Err(e) => return Err(e),
    };
    info!(supported, "probed kernel gretap support");
    Ok(*GRETAP_SUPPORTED.get_or_init(|| supported))
}
