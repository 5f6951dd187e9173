//! TenantRemoved: one compute node's tunnel goes; the subnet stays.

use std::time::Instant;

use tracing::{Instrument, info, info_span};

use super::Concentrator;
use crate::config::RemoteSubnet;
use crate::error::CnciError;

/// What a detach did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detached {
    /// The tunnel existed and was removed (false: nothing to do).
    pub removed: bool,
    /// Tunnels the subnet still has.
    pub remaining: usize,
}

impl Concentrator {
    /// Removes that compute node's tunnel for the subnet (ciao's TenantRemoved). The subnet's
    /// bridge and dnsmasq stay for the other compute nodes; [`Concentrator::remove_subnet`],
    /// or the configured idle period, removes them. An unknown tunnel is not an error.
    pub async fn detach_remote_subnet(&self, req: &RemoteSubnet) -> Result<Detached, CnciError> {
        req.check(
            &self.inner.config.tenant,
            self.inner.config.strict_subnet_key,
        )?;
        let span = info_span!("detach", subnet = %req.subnet, cn = %req.cn_ip);
        async {
            let _turn = self.inner.turns.take(&req.subnet).await;
            let _slot = self.inner.throttle.acquire().await.expect("never closed");
            let mut subnets = self.inner.subnets.lock().await;
            let Some(state) = subnets.get_mut(&req.subnet) else {
                return Ok(Detached {
                    removed: false,
                    remaining: 0,
                });
            };
            let Some(tunnel) = state.tunnels.get(&req.cn_ip) else {
                return Ok(Detached {
                    removed: false,
                    remaining: state.tunnels.len(),
                });
            };
            match &state.vxlan {
                Some((_, index)) => {
                    // Its flood entry, and the MACs learned behind it.
                    let netlink = &self.inner.netlink;
                    for entry in netlink.fdb(*index).await? {
                        if entry.dst == Some(req.cn_ip.into()) {
                            netlink.fdb_del(*index, entry.mac, req.cn_ip).await?;
                        }
                    }
                }
                None => self.inner.tunnels.delete(&tunnel.name).await?,
            }
            let tunnel = state.tunnels.remove(&req.cn_ip).expect("present");
            self.unpersist(&tenet::keyspace::cnci::attach_key(
                &self.inner.config.id,
                &req.subnet,
                req.cn_ip,
            ))
            .await;
            if state.tunnels.is_empty() {
                state.idle_since = Some(Instant::now());
            }
            info!(tunnel = %tunnel.name, remaining = state.tunnels.len(), "tunnel detached");
            Ok(Detached {
                removed: true,
                remaining: state.tunnels.len(),
            })
        }
        .instrument(span)
        .await
    }
}
