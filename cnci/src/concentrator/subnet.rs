//! Making and removing a tenant subnet: its bridge with the gateway address, its dnsmasq,
//! and (on removal) its tunnels. The bridge's alias is written last, once dnsmasq runs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ipnetwork::{IpNetwork, Ipv4Network};
use tenet::net::alias::Alias;
use tenet::net::owned;
use tenet::net::{Leftovers, NewLink};
use tenet::types::{TunnelKey, gateway_of};
use tracing::info;

use super::{Inner, SubnetState};
use crate::dnsmasq::{DhcpServer, DhcpSubnet, dir_name, render_config, render_hosts};
use crate::error::CnciError;
use crate::names::{self, BRIDGE_KIND, OWNERSHIP};

/// The alias of a subnet's bridge: whose it is and what it serves.
pub(crate) fn bridge_alias(inner: &Inner, subnet: &Ipv4Network, key: TunnelKey) -> Alias {
    Alias::new(BRIDGE_KIND)
        .with("conc", &inner.config.id)
        .with("tenant", &inner.config.tenant)
        .with("subnet", subnet)
        .with("key", key)
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
    let bridge = OWNERSHIP.fresh_name(netlink, names::BRIDGE).await?;
    let index = netlink
        .create_index(&NewLink::bridge(&bridge).mtu(inner.tenant_mtu()).up())
        .await?;
    fault_point!(inner, BridgeCreated);
    let made = async {
        netlink.add_address(index, gateway_address(subnet)).await?;
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
        Ok(dhcp)
    }
    .await;
    let dhcp = match made {
        Ok(dhcp) => dhcp,
        Err(e) => {
            let mut left = Leftovers::new();
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
    for t in state.tunnels.values() {
        inner.tunnels.forget(&t.name);
        links.push(t.index);
    }
    links.push(state.bridge_index);
    let deleted = inner.netlink.delete_many(&links).await;
    let stopped = state.dhcp.stop(true).await;
    deleted?;
    stopped?;
    info!(%subnet, bridge = %state.bridge, "subnet removed");
    Ok(())
}

/// Removes the subnets idle (no tunnel) for longer than `idle`; returns them.
pub(crate) async fn remove_idle(inner: &Inner, idle: Duration) -> Vec<Ipv4Network> {
    let mut subnets = inner.subnets.lock().await;
    let mut due: Vec<Ipv4Network> = Vec::new();
    for (net, s) in subnets.iter() {
        let idle_for = s.idle_since.map(|t| t.elapsed()).unwrap_or_default();
        if s.tunnels.is_empty() && idle_for >= idle {
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
        destroy(&self.inner, subnet, state).await?;
        Ok(true)
    }

    /// Removes every subnet that has had no tunnel for `idle`; returns them.
    pub async fn remove_idle_subnets(&self, idle: Duration) -> Vec<Ipv4Network> {
        remove_idle(&self.inner, idle).await
    }
}
