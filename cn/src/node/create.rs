//! Creating tenant VNICs: book under the lock, then make the subnet's bridge and tunnel (first
//! VNIC only) and the VNIC's link, each with its alias written last (`tenet::net::owned`).

use std::os::fd::AsFd;

use ipnetwork::IpNetwork;
use tenet::net::owned;
use tenet::net::tap::{TapOptions, open_tap_in};
use tenet::net::{Leftovers, LinkUpdate, Netlink, NewLink, Route};
use tenet::types::{MacAddr, gateway_of};
use tokio::sync::watch;
use tracing::{Instrument, info, info_span, warn};

use super::topology::{
    ContainerFirst, FreshNames, Progress, Reservation, SubnetLinks, ready_index, wait_ready,
};
use super::{
    ComputeNode, ContainerEvent, ContainerNetwork, CreatedVnic, SubnetBinding, TunnelEventKind,
    Vnic,
};
use crate::config::{ContainerNetns, VnicConfig, VnicRole};
use crate::error::CnError;
use crate::names::{self, OWNERSHIP, VNIC_KIND};

impl ComputeNode {
    /// Creates a tenant VNIC (VM tap or container veth). The first VNIC of a tenant subnet
    /// also creates its bridge and tunnel and returns a TunnelAdd event; a repeated create of
    /// the same VNIC returns it again with no event. On failure nothing this call created is
    /// left behind (what could not be undone is named in the error).
    pub async fn create_vnic(
        &self,
        config: &VnicConfig,
        cancel: Option<&watch::Receiver<bool>>,
    ) -> Result<CreatedVnic, CnError> {
        let checked = config.check(&[VnicRole::Vm, VnicRole::Container])?;
        let _permit = self.admit(cancel).await?;
        let _shared = self.rebuild_lock.read().await;
        let span = info_span!("create_vnic", vnic = %config.vnic_id, tenant = %config.tenant_id, subnet = %config.subnet);
        self.create_checked(config, checked.mac)
            .instrument(span)
            .await
    }

    /// Generated names for the VNIC, and for its subnet if that looks new, each checked
    /// against the kernel before the lock is taken.
    async fn fresh_names(&self, binding: &SubnetBinding) -> Result<FreshNames, CnError> {
        let vnic = OWNERSHIP.fresh_name(&self.netlink, names::VNIC).await?;
        let subnet = if self.topology().has_subnet(binding) {
            None
        } else {
            Some(SubnetLinks {
                bridge: OWNERSHIP.fresh_name(&self.netlink, names::BRIDGE).await?,
                tunnel: OWNERSHIP.fresh_name(&self.netlink, names::TUNNEL).await?,
            })
        };
        Ok(FreshNames { vnic, subnet })
    }

    async fn create_checked(
        &self,
        config: &VnicConfig,
        mac: Option<MacAddr>,
    ) -> Result<CreatedVnic, CnError> {
        let binding = SubnetBinding::of(config);
        let names = self.fresh_names(&binding).await?;
        let (vnic_tx, vnic_rx) = watch::channel(Progress::Creating);
        let reserved = self.topology().reserve(config, &binding, vnic_rx, names)?;
        let (ifname, peer, links, subnet_wait, new_subnet, container) = match reserved {
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
                match self.create_subnet(&binding, &links, config).await {
                    Ok(index) => {
                        tx.send_replace(Progress::Ready(index));
                        tunnel_event = Some(self.event(TunnelEventKind::Add, &binding));
                        index
                    }
                    Err(e) => {
                        tx.send_replace(Progress::Failed(e.to_string()));
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
                vnic_tx.send_replace(Progress::Ready(vnic.index));
                let net = || ContainerNetwork {
                    bridge: links.bridge.clone(),
                    subnet: config.subnet,
                    gateway: gateway_of(&config.subnet),
                };
                let container = match container {
                    ContainerFirst::NotAContainer => None,
                    ContainerFirst::First => Some(ContainerEvent::Add(net())),
                    ContainerFirst::Later => Some(ContainerEvent::Info(net())),
                };
                info!(ifname = %vnic.ifname, bridge = %vnic.bridge, tunnel_add = tunnel.is_some(), "VNIC created");
                Ok(CreatedVnic {
                    vnic,
                    tunnel,
                    container,
                    existed: false,
                })
            }
            Err(e) => {
                vnic_tx.send_replace(Progress::Failed(e.to_string()));
                warn!(error = %e, "VNIC creation failed; rolling back");
                let left = self.forget_failed(config, &binding).await;
                Err(e.with_leftovers(left))
            }
        }
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
            existed: true,
        })
    }

    /// Makes the bridge (up) and its tunnel; the bridge's alias goes on last, so that a crash
    /// part-way leaves an alias-less bridge that `rebuild` recognises as unfinished.
    async fn create_subnet(
        &self,
        binding: &SubnetBinding,
        links: &SubnetLinks,
        config: &VnicConfig,
    ) -> Result<u32, CnError> {
        let mtu = self.tenant_mtu(config);
        let bridge = self
            .netlink
            .create_index(&NewLink::bridge(&links.bridge).mtu(mtu).no_link_local().up())
            .await?;
        fault_point!(self, BridgeCreated);
        let made = async {
            let spec = self.tunnel_spec(binding, &links.tunnel, mtu);
            let tunnel = self.tunnels.create(&spec).await?;
            fault_point!(self, TunnelCreated);
            self.netlink.enslave(tunnel.index, bridge).await?;
            fault_point!(self, TunnelEnslaved);
            owned::commit(&self.netlink, bridge, &binding.alias()).await?;
            Ok::<_, CnError>(())
        }
        .await;
        if let Err(e) = made {
            let mut left = Leftovers::new();
            left.note(self.tunnels.delete(&links.tunnel).await);
            left.note(self.netlink.delete(bridge).await);
            left.log(&format!("subnet bridge {}", links.bridge));
            return Err(e.with_leftovers(left));
        }
        fault_point!(self, SubnetReady);
        Ok(bridge)
    }

    /// Makes the VNIC's link, fully configured, with its alias last (see `create_subnet`).
    async fn create_link(
        &self,
        config: &VnicConfig,
        mac: Option<MacAddr>,
        bridge_index: u32,
        bridge: &str,
        ifname: String,
        peer: Option<String>,
    ) -> Result<Vnic, CnError> {
        let mtu = self.tenant_mtu(config);
        let alias = tenet::net::alias::Alias::new(VNIC_KIND)
            .with("id", &config.vnic_id)
            .with("role", config.role.as_str())
            .with("instance", &config.instance_id)
            .to_string();
        let mut queues = Vec::new();
        let index = match config.role {
            VnicRole::Vm => {
                queues = open_tap_in(self.config.netns.as_deref(), &ifname, tap_options(config))?;
                let index = match self.netlink.index_of(&ifname).await {
                    Ok(i) => i,
                    Err(e) => {
                        drop(queues);
                        return Err(e.into());
                    }
                };
                // Before the update below sets it up: the address is made then.
                if let Err(e) = self.netlink.disable_link_local(index).await {
                    drop(queues);
                    let mut left = Leftovers::new();
                    left.note(self.netlink.delete(index).await);
                    left.log(&format!("VNIC {ifname}"));
                    return Err(CnError::from(e).with_leftovers(left));
                }
                index
            }
            _ => {
                let peer = peer.as_deref().expect("containers have a peer");
                // Host end on the bridge and up, container end with its MTU and MAC — made
                // in the container's namespace under its final name when there is one: one
                // request.
                let netns = match &config.netns {
                    Some(ns) => Some(std::fs::File::open(&ns.path).map_err(|e| {
                        CnError::config("netns.path", format!("{}: {e}", ns.path.display()))
                    })?),
                    None => None,
                };
                let new = match (&netns, &config.netns) {
                    (Some(file), Some(ns)) => {
                        NewLink::veth(&ifname, &ns.ifname).peer_netns(file.as_fd())
                    }
                    _ => NewLink::veth(&ifname, peer),
                }
                .peer_settings(Some(mtu), mac.map(MacAddr::octets))
                .mtu(mtu)
                .controller(bridge_index)
                .no_link_local()
                .up();
                self.netlink.create_index(&new).await?
            }
        };
        fault_point!(self, VnicLinkCreated);
        let finish = async {
            if let Some(ns) = &config.netns {
                self.configure_container(ns).await?;
            }
            // The alias is the commit mark: in the last request.
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
            let mut left = Leftovers::new();
            left.note(self.netlink.delete(index).await);
            left.log(&format!("VNIC {ifname}"));
            return Err(e.with_leftovers(left));
        }
        fault_point!(self, VnicReady);
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

    /// Gives the container side, already in the runtime's namespace under its name, its
    /// address and default route.
    async fn configure_container(&self, ns: &ContainerNetns) -> Result<(), CnError> {
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
        if let Err(e) = configure {
            // The caller deletes the veth from the host side; this removes it from the
            // container first, so it is gone even if the host side is not found.
            let mut left = Leftovers::new();
            match inside.index_of(&ns.ifname).await {
                Ok(i) => left.note(inside.delete(i).await),
                Err(lookup) => left.note::<()>(Err(lookup)),
            }
            left.log(&format!("container interface {}", ns.ifname));
            return Err(e.with_leftovers(left));
        }
        Ok(())
    }

    /// After a failed create: forget the VNIC, and the subnet if this call made it or it has
    /// no VNIC left (removing its links). Returns what could not be removed.
    async fn forget_failed(&self, config: &VnicConfig, binding: &SubnetBinding) -> Leftovers {
        let teardown = self.topology().forget_failed(&config.vnic_id, binding);
        let mut left = Leftovers::new();
        if let Some(entry) = teardown {
            left.note(self.tunnels.delete(&entry.links.tunnel).await);
            if let Some(bridge) = ready_index(&entry.progress) {
                left.note(self.netlink.delete(bridge).await);
            }
            left.log(&format!("subnet bridge {}", entry.links.bridge));
        }
        left
    }

    /// The tenant MTU: configured, or the compute link's MTU minus the tunnel overhead.
    fn tenant_mtu(&self, config: &VnicConfig) -> u32 {
        config.mtu.unwrap_or_else(|| self.default_mtu())
    }
}

fn tap_options(config: &VnicConfig) -> TapOptions {
    TapOptions {
        queues: config.queues.max(1),
        vnet_hdr: true,
        nonblocking: false,
    }
}
