//! Making and removing a tenant subnet: its bridge with the gateway address, its dnsmasq,
//! and (on removal) its tunnels. The bridge's alias is written last, once dnsmasq runs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ipnetwork::{IpNetwork, Ipv4Network};
use tenet::net::alias::Alias;
use tenet::net::owned;
use tenet::net::tunnel::VXLAN_PORT;
use tenet::net::{Leftovers, NewLink, VxlanParams, sysctl};
use tenet::types::{TunnelKey, gateway_of};
use tracing::info;

use super::{Inner, SubnetState};
use crate::dnsmasq::{DhcpServer, DhcpSubnet, dir_name, render_config, render_hosts};
use crate::error::CnciError;
use crate::names::{self, BRIDGE_KIND, OWNERSHIP, VXLAN_KIND};

/// The alias of a subnet's bridge: whose it is and what it serves.
pub(crate) fn bridge_alias(inner: &Inner, subnet: &Ipv4Network, key: TunnelKey) -> Alias {
    Alias::new(BRIDGE_KIND)
        .with("conc", &inner.config.id)
        .with("tenant", &inner.config.tenant)
        .with("subnet", subnet)
        .with("key", key)
}

/// The alias of a subnet's VXLAN device.
pub(crate) fn vxlan_alias(inner: &Inner, subnet: &Ipv4Network, key: TunnelKey) -> Alias {
    Alias::new(VXLAN_KIND)
        .with("conc", &inner.config.id)
        .with("subnet", subnet)
        .with("key", key)
}

/// VXLAN mode: the subnet's VXLAN device (VNI = key, learning, no fixed remote: one flood
/// entry per compute node), enslaved to `bridge`, its alias last. Removed again on failure.
pub(crate) async fn create_vxlan(
    inner: &Inner,
    subnet: &Ipv4Network,
    key: TunnelKey,
    bridge: u32,
) -> Result<(String, u32), CnciError> {
    let netlink = &inner.netlink;
    let name = OWNERSHIP.fresh_name(netlink, names::VXLAN).await?;
    let params = VxlanParams {
        vni: key.get(),
        local: Some(inner.tunnel_local()),
        remote: None,
        dev: Some(inner.compute.index),
        port: VXLAN_PORT,
        // The concentrator learns which compute node each workload MAC is behind, so
        // known unicast is not flooded to every node.
        learning: true,
    };
    let new = NewLink::vxlan(&name, params)
        .mtu(inner.tenant_mtu())
        .controller(bridge)
        .no_link_local()
        .up();
    let index = netlink.create_index(&new).await?;
    if let Err(e) = owned::commit(netlink, index, &vxlan_alias(inner, subnet, key)).await {
        let mut left = Leftovers::new();
        left.note(netlink.delete(index).await);
        return Err(CnciError::from(e).with_leftovers(left));
    }
    Ok((name, index))
}

/// VXLAN mode: all compute nodes of a subnet are behind one bridge port (the VXLAN device),
/// and a bridge never sends a frame back out the port it came in on; reflecting it would
/// echo every broadcast to its sender. So the gateway answers ARP for the subnet's other
/// hosts (RFC 3069 proxy ARP, `proxy_arp_pvlan`) and routes between compute nodes, which
/// needs forwarding on in the concentrator's namespace.
pub(crate) fn enable_cross_node_routing(inner: &Inner, bridge: &str) -> Result<(), CnciError> {
    let netns = inner.config.netns.as_deref();
    crate::sysctls::ensure(inner)?;
    sysctl::write(
        netns,
        &format!("net.ipv4.conf.{bridge}.proxy_arp_pvlan"),
        "1",
    )?;
    // Proxy ARP answers are otherwise delayed by up to 0.8 s.
    sysctl::write(netns, &format!("net.ipv4.neigh.{bridge}.proxy_delay"), "0")?;
    Ok(())
}

/// The gateway address the bridge holds: network + 1 with the subnet's prefix.
pub(crate) fn gateway_address(subnet: &Ipv4Network) -> IpNetwork {
    IpNetwork::V4(Ipv4Network::new(gateway_of(subnet), subnet.prefix()).expect("valid prefix"))
}

/// Starts (or adopts) the subnet's dnsmasq, with the hosts the endpoint table holds now.
pub(crate) async fn start_dhcp(
    inner: &Inner,
    subnet: &Ipv4Network,
    bridge: &str,
) -> Result<DhcpServer, CnciError> {
    let dir = inner.config.run_dir.join(dir_name(subnet));
    let options = &inner.config.dhcp;
    let config = render_config(&DhcpSubnet {
        tenant: &inner.config.tenant,
        subnet: *subnet,
        bridge,
        mtu: options.mtu.unwrap_or_else(|| inner.tenant_mtu()),
        dir: &dir,
        options,
    });
    let bindings = inner.endpoints().bindings_in(subnet);
    let hosts = render_hosts(&bindings, subnet, options.prebind_ciao_macs);
    DhcpServer::start(*subnet, &dir, inner.config.netns.as_deref(), &config, hosts).await
}

/// Makes the subnet: bridge (up, tenant MTU), gateway address, dnsmasq, then the alias. On
/// failure, what was made is removed (what could not be is named in the error).
pub(crate) async fn create(
    inner: &Inner,
    subnet: &Ipv4Network,
    key: TunnelKey,
) -> Result<SubnetState, CnciError> {
    let netlink = &inner.netlink;
    crate::sysctls::ensure_for_subnets(inner)?;
    let bridge = OWNERSHIP.fresh_name(netlink, names::BRIDGE).await?;
    let index = netlink
        .create_index(
            &NewLink::bridge(&bridge)
                .mtu(inner.tenant_mtu())
                .no_link_local()
                .up(),
        )
        .await?;
    fault_point!(inner, BridgeCreated);
    let made = async {
        netlink.add_address(index, gateway_address(subnet)).await?;
        let vxlan = if inner.vxlan_mode() {
            enable_cross_node_routing(inner, &bridge)?;
            Some(create_vxlan(inner, subnet, key, index).await?)
        } else {
            None
        };
        let dhcp = start_dhcp(inner, subnet, &bridge).await?;
        fault_point!(inner, DhcpStarted);
        if let Err(e) = owned::commit(netlink, index, &bridge_alias(inner, subnet, key)).await {
            let stopped = dhcp.stop(true).await;
            return Err(match stopped {
                Ok(()) => CnciError::from(e),
                Err(also) => CnciError::from(e).with_leftovers({
                    let mut left = Leftovers::new();
                    left.push(tenet::net::NetError::invalid(
                        "stop",
                        format!("dnsmasq of {subnet}"),
                        also.to_string(),
                    ));
                    left
                }),
            });
        }
        Ok((dhcp, vxlan))
    }
    .await;
    let (dhcp, vxlan) = match made {
        Ok(made) => made,
        Err(e) => {
            let mut left = Leftovers::new();
            // A VXLAN device on the bridge is not deleted with it.
            if let Ok(Some(vx)) = netlink.links().await.map(|ls| {
                ls.into_iter()
                    .find(|l| l.controller == Some(index) && l.kind.as_deref() == Some("vxlan"))
            }) {
                left.note(netlink.delete(vx.index).await);
            }
            left.note(netlink.delete(index).await);
            left.log(&format!("subnet {subnet} bridge {bridge}"));
            return Err(e.with_leftovers(left));
        }
    };
    fault_point!(inner, SubnetReady);
    info!(%subnet, %bridge, gateway = %gateway_of(subnet), "subnet attached");
    Ok(SubnetState {
        key,
        bridge,
        bridge_index: index,
        tunnels: BTreeMap::new(),
        vxlan,
        dhcp,
        idle_since: Some(Instant::now()),
    })
}

/// Removes a subnet: its tunnels and bridge in one batch, then its dnsmasq and files.
pub(crate) async fn destroy(
    inner: &Inner,
    subnet: &Ipv4Network,
    state: SubnetState,
) -> Result<(), CnciError> {
    let mut links: Vec<u32> = Vec::new();
    match &state.vxlan {
        // Its flood entries go with it.
        Some((_, index)) => links.push(*index),
        None => {
            for t in state.tunnels.values() {
                inner.tunnels.forget(&t.name);
                links.push(t.index);
            }
        }
    }
    links.push(state.bridge_index);
    let deleted = inner.netlink.delete_many(&links).await;
    let stopped = state.dhcp.stop(true).await;
    deleted?;
    stopped?;
    if let Some(store) = &inner.store {
        store
            .delete_prefix(&tenet::keyspace::cnci::attach_subnet_prefix(
                &inner.config.id,
                subnet,
            ))
            .await?;
    }
    info!(%subnet, bridge = %state.bridge, "subnet removed");
    Ok(())
}

/// Removes the subnets idle (no tunnel) for longer than `idle`; returns them.
pub(crate) async fn remove_idle(inner: &Inner, idle: Duration) -> Vec<Ipv4Network> {
    let mut subnets = inner.subnets.lock().await;
    let mut due: Vec<Ipv4Network> = Vec::new();
    for (net, s) in subnets.iter() {
        // No `idle_since`: it has a tunnel, or an attach is making one.
        let Some(since) = s.idle_since else {
            continue;
        };
        if s.tunnels.is_empty() && since.elapsed() >= idle {
            due.push(*net);
        }
    }
    let mut removed = Vec::new();
    for net in due {
        let state = subnets.remove(&net).expect("listed");
        match destroy(inner, &net, state).await {
            Ok(()) => removed.push(net),
            Err(e) => tracing::warn!(subnet = %net, error = %e, "removing an idle subnet"),
        }
    }
    if !removed.is_empty() {
        let mut edge = inner.edge.lock().await;
        if let Err(e) = super::edge::apply(inner, &subnets, &mut edge).await {
            tracing::warn!(error = %e, "firewall after removing idle subnets");
        }
    }
    removed
}

impl super::Concentrator {
    /// Removes a subnet with its tunnels, bridge, dnsmasq and files. Returns whether it was
    /// there (an unknown subnet is not an error).
    pub async fn remove_subnet(&self, subnet: &Ipv4Network) -> Result<bool, CnciError> {
        let mut subnets = self.inner.subnets.lock().await;
        let Some(state) = subnets.remove(subnet) else {
            return Ok(false);
        };
        let destroyed = destroy(&self.inner, subnet, state).await;
        let mut edge = self.inner.edge.lock().await;
        super::edge::apply(&self.inner, &subnets, &mut edge).await?;
        destroyed?;
        Ok(true)
    }

    /// Removes every subnet that has had no tunnel for `idle`; returns them.
    pub async fn remove_idle_subnets(&self, idle: Duration) -> Vec<Ipv4Network> {
        remove_idle(&self.inner, idle).await
    }
}
