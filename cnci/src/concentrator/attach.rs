//! TenantAdded: a compute node's tunnel for a subnet, and the subnet itself if it is new.

use tenet::net::{FLOOD_MAC, Leftovers};
use tracing::{Instrument, info, info_span, warn};

use super::subnet;
use super::{Concentrator, TunnelState};
use crate::config::RemoteSubnet;
use crate::error::CnciError;
use crate::names::{self, OWNERSHIP};

fn attach_key(inner: &super::Inner, req: &RemoteSubnet) -> String {
    tenet::keyspace::cnci::attach_key(&inner.config.id, &req.subnet, req.cn_ip)
}

fn attachment(req: &RemoteSubnet) -> tenet::keyspace::cnci::Attachment {
    tenet::keyspace::cnci::Attachment {
        tenant: req.tenant.clone(),
        subnet: req.subnet,
        subnet_key: req.subnet_key,
        cn_id: req.cn_id.clone(),
        cn_ip: req.cn_ip,
    }
}

/// A subnet in `Inner::making` while this lives (also when the attach is dropped half-way).
struct Making<'a> {
    inner: &'a super::Inner,
    subnet: ipnetwork::Ipv4Network,
}

impl<'a> Making<'a> {
    fn new(inner: &'a super::Inner, subnet: ipnetwork::Ipv4Network) -> Self {
        inner.making().insert(subnet);
        Making { inner, subnet }
    }
}

impl Drop for Making<'_> {
    fn drop(&mut self) {
        self.inner.making().remove(&self.subnet);
    }
}

/// What an attach did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// The subnet's bridge.
    pub bridge: String,
    /// This attach made the subnet (bridge, gateway, dnsmasq).
    pub new_subnet: bool,
    /// This attach made the compute node's tunnel (false: a repeat, nothing changed).
    pub new_tunnel: bool,
}

impl Concentrator {
    /// Attaches a compute node's tunnel for a tenant subnet (ciao's TenantAdded). The first
    /// attach of a subnet makes its bridge with the gateway and starts its dnsmasq; each
    /// compute node gets its own tunnel (key = subnet key, remote = the node). Idempotent: a
    /// repeat (a compute node re-announcing after a restart) changes nothing. Bad input is
    /// refused with the field named before anything is touched; a failure half-way removes
    /// what this call made.
    pub async fn attach_remote_subnet(&self, req: &RemoteSubnet) -> Result<Attached, CnciError> {
        let key = req.check(
            &self.inner.config.tenant,
            self.inner.config.strict_subnet_key,
        )?;
        if req.cn_ip == self.inner.tunnel_local() {
            return Err(CnciError::invalid(
                "cn_ip",
                format!("{} is this concentrator's own address", req.cn_ip),
            ));
        }
        let span = info_span!("attach", subnet = %req.subnet, cn = %req.cn_ip, cn_id = %req.cn_id);
        self.attach_checked(req, key).instrument(span).await
    }

    async fn attach_checked(
        &self,
        req: &RemoteSubnet,
        key: tenet::types::TunnelKey,
    ) -> Result<Attached, CnciError> {
        let inner = &*self.inner;
        let _turn = inner.turns.take(&req.subnet).await;
        let _slot = inner.throttle.acquire().await.expect("never closed");
        // Decided under the lock, made without it: a new subnet's bridge and dnsmasq take
        // milliseconds, and other subnets attach meanwhile. `making` holds the subnets
        // being made, so an overlapping one is refused as if they were attached.
        let mut subnets = inner.subnets.lock().await;
        {
            let making = inner.making();
            if let Some(other) = subnets
                .keys()
                .chain(making.iter())
                .find(|net| **net != req.subnet && net.overlaps(req.subnet))
            {
                return Err(CnciError::invalid(
                    "subnet",
                    format!("{} overlaps {other}, already attached here", req.subnet),
                ));
            }
        }
        if let Some(s) = subnets.get(&req.subnet)
            && s.key != key
        {
            return Err(CnciError::invalid(
                "subnet_key",
                format!("{} is attached with key {}, not {key}", req.subnet, s.key),
            ));
        }
        let new_subnet = !subnets.contains_key(&req.subnet);
        if new_subnet {
            let making = Making::new(inner, req.subnet);
            drop(subnets);
            let state = subnet::create(inner, &req.subnet, key).await?;
            subnets = inner.subnets.lock().await;
            subnets.insert(req.subnet, state);
            // Only now: between the two, an overlapping subnet would find it in neither.
            drop(making);
            // Endpoints that arrived while dnsmasq started found no subnet to update.
            crate::sync::refresh_subnet(inner, &mut subnets, &req.subnet);
            // NAT out and forwarding for the new subnet.
            let applied = {
                let mut edge = inner.edge.lock().await;
                super::edge::apply(inner, &subnets, &mut edge).await
            };
            if let Err(e) = applied {
                let state = subnets.remove(&req.subnet).expect("present");
                if let Err(also) = subnet::destroy(inner, &req.subnet, state).await {
                    warn!(error = %also, "removing the subnet whose firewall rules failed");
                }
                return Err(e);
            }
        }
        let state = subnets.get_mut(&req.subnet).expect("present");
        if let Some(t) = state.tunnels.get_mut(&req.cn_ip) {
            if t.cn_id != req.cn_id {
                // Empty after a rebuild (the kernel does not hold it): the same attachment.
                let renamed = !t.cn_id.is_empty();
                t.cn_id = req.cn_id.clone();
                if renamed {
                    info!("the compute node at this address has a new id");
                    self.persist(&attach_key(inner, req), &attachment(req))
                        .await?;
                }
            }
            return Ok(Attached {
                bridge: state.bridge.clone(),
                new_subnet,
                new_tunnel: false,
            });
        }

        // The tunnel and its record are made outside the lock too (other subnets attach
        // meanwhile; this subnet's turn keeps its own changes in order). A subnet that is
        // not idle is left alone by the idle reaper while that happens.
        let vxlan = state.vxlan.clone();
        let bridge_index = state.bridge_index;
        let was_idle = state.idle_since.take();
        drop(subnets);
        let made = async {
            if let Some((name, index)) = &vxlan {
                // VXLAN mode: a flood entry to the compute node on the subnet's device.
                inner
                    .netlink
                    .fdb_append(*index, FLOOD_MAC, req.cn_ip)
                    .await?;
                fault_point!(inner, TunnelCreated);
                return Ok(TunnelState {
                    name: name.clone(),
                    index: *index,
                    cn_id: req.cn_id.clone(),
                });
            }
            let name = OWNERSHIP.fresh_name(&inner.netlink, names::TUNNEL).await?;
            let spec = inner.tunnel_spec(&name, key, req.cn_ip);
            let tunnel = inner.tunnels.create(&spec).await?;
            fault_point!(inner, TunnelCreated);
            if let Err(e) = inner.netlink.enslave(tunnel.index, bridge_index).await {
                let mut left = Leftovers::new();
                left.note(inner.tunnels.delete(&name).await);
                left.log(&format!("tunnel {name}"));
                return Err(CnciError::from(e).with_leftovers(left));
            }
            Ok::<_, CnciError>(TunnelState {
                name,
                index: tunnel.index,
                cn_id: req.cn_id.clone(),
            })
        }
        .await;
        let made = match made {
            // Kept in etcd, so that a replaced concentrator attaches it again.
            Ok(tunnel) => match self
                .persist(&attach_key(inner, req), &attachment(req))
                .await
            {
                Ok(()) => Ok(tunnel),
                Err(e) => {
                    let mut left = Leftovers::new();
                    if vxlan.is_none() {
                        left.note(inner.tunnels.delete(&tunnel.name).await);
                    }
                    Err(e.with_leftovers(left))
                }
            },
            Err(e) => Err(e),
        };
        let mut subnets = inner.subnets.lock().await;
        let Some(state) = subnets.get_mut(&req.subnet) else {
            // Removed meanwhile (`remove_subnet` does not take turns): so is its bridge.
            if let (Ok(tunnel), None) = (&made, &vxlan) {
                let _ = inner.tunnels.delete(&tunnel.name).await;
            }
            self.unpersist(&attach_key(inner, req)).await;
            return Err(CnciError::invalid(
                "subnet",
                format!("{} was removed while its tunnel was made", req.subnet),
            ));
        };
        match made {
            Ok(tunnel) => {
                fault_point!(inner, TunnelReady);
                info!(tunnel = %tunnel.name, bridge = %state.bridge, new_subnet, "tunnel attached");
                state.tunnels.insert(req.cn_ip, tunnel);
                state.idle_since = None;
                Ok(Attached {
                    bridge: state.bridge.clone(),
                    new_subnet,
                    new_tunnel: true,
                })
            }
            Err(e) if new_subnet => {
                // This call made the subnet: it goes too.
                let state = subnets.remove(&req.subnet).expect("present");
                match subnet::destroy(inner, &req.subnet, state).await {
                    Ok(()) => Err(e),
                    Err(also) => Err(e.with_leftovers({
                        let mut left = Leftovers::new();
                        left.push(tenet::net::NetError::invalid(
                            "remove",
                            format!("subnet {}", req.subnet),
                            also.to_string(),
                        ));
                        left
                    })),
                }
            }
            Err(e) => {
                if state.tunnels.is_empty() {
                    state.idle_since = was_idle.or_else(|| Some(std::time::Instant::now()));
                }
                Err(e)
            }
        }
    }
}
