//! Kernel VXLAN tunnels, point to point, VNI = tunnel key.

use async_trait::async_trait;

use super::{
    TunnelBackend, TunnelKind, TunnelSpec, VXLAN_OVERHEAD, VXLAN_PORT, delete_named, existing,
    finish, tenant_mtu, tunnels_of,
};
use crate::net::link::Link;
use crate::net::new_link::{NewLink, VxlanParams};
use crate::net::{NetError, NetResult, Netlink};

/// VNIs are 24 bits.
const MAX_VNI: u32 = (1 << 24) - 1;

pub struct Vxlan {
    netlink: Netlink,
}

impl Vxlan {
    pub fn new(netlink: Netlink) -> Self {
        Vxlan { netlink }
    }
}

#[async_trait]
impl TunnelBackend for Vxlan {
    fn kind(&self) -> TunnelKind {
        TunnelKind::Vxlan
    }

    fn overhead(&self) -> u32 {
        VXLAN_OVERHEAD
    }

    async fn create(&self, spec: &TunnelSpec) -> NetResult<Link> {
        spec.validate()?;
        if spec.key.get() > MAX_VNI {
            return Err(NetError::invalid(
                "create",
                spec.object(),
                format!("key {} does not fit in a 24-bit VNI", spec.key),
            ));
        }
        if let Some(link) = existing(&self.netlink, self.kind(), spec).await? {
            return Ok(link);
        }
        let mtu = tenant_mtu(&self.netlink, spec, VXLAN_OVERHEAD).await?;
        let dev = self.netlink.link_of_address(spec.local.into()).await?;
        let link = NewLink::vxlan(
            &spec.name,
            VxlanParams {
                vni: spec.key.get(),
                local: Some(spec.local),
                remote: Some(spec.remote),
                dev,
                port: VXLAN_PORT,
                learning: false,
            },
        );
        let link = self.netlink.create(&link).await?;
        finish(&self.netlink, self.kind(), spec, link.index, mtu).await
    }

    async fn delete(&self, name: &str) -> NetResult<()> {
        delete_named(&self.netlink, name).await
    }

    async fn tunnels(&self) -> NetResult<Vec<(TunnelSpec, Link)>> {
        tunnels_of(&self.netlink, self.kind()).await
    }
}
