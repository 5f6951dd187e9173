//! Routed workload interfaces (Calico's model, §3.6): no bridge; the workload has its address
//! as a /32 (/128) and a default route via a link-local gateway that the host answers by
//! proxy ARP (IPv4) or proxy NDP (IPv6); the host reaches the workload by a device route.
//!
//! The routes tenet adds here carry protocol `boot`, as `ip route add` and Felix's do, so that
//! BIRD's kernel protocol (`learn`) sees them and announces a borrowed address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::path::Path;

use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::neighbour::{NeighbourFlags, NeighbourState};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};

use super::link::Netlink;
use super::{NetError, NetResult, NewLink, nl_err};

/// The gateway a routed workload's default route points at (Calico's choice): nothing has
/// this address; the host's proxy ARP answers for it.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The IPv6 gateway, answered by a proxy NDP entry on the host side.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// A route straight to a link (no gateway) in the main table, as routed mode keeps one per
/// workload address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRoute {
    pub destination: IpNetwork,
    pub dev: u32,
    /// The route's protocol number (`boot` = 3 for tenet's and Felix's, `kernel` = 2 for
    /// the kernel's connected routes).
    pub protocol: u8,
}

fn device_route_message(destination: IpNetwork, dev: u32) -> RouteMessage {
    RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(destination.ip(), destination.prefix())
        .expect("an IpNetwork's prefix fits its family")
        .output_interface(dev)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::Boot)
        .kind(RouteType::Unicast)
        .build()
}

impl Netlink {
    /// Adds (or replaces) `destination dev <dev> scope link proto boot`.
    pub async fn add_device_route(&self, destination: IpNetwork, dev: u32) -> NetResult<()> {
        self.handle()
            .route()
            .add(device_route_message(destination, dev))
            .replace()
            .execute()
            .await
            .map_err(|e| nl_err("add", format!("route {destination} dev #{dev}"), e))
    }

    /// Removes a device route; a missing one is not an error.
    pub async fn del_device_route(&self, destination: IpNetwork, dev: u32) -> NetResult<()> {
        match self
            .handle()
            .route()
            .del(device_route_message(destination, dev))
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = nl_err("delete", format!("route {destination} dev #{dev}"), e);
                if e.errno() == Some(libc::ESRCH) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Every route the kernel lists, both families.
    async fn all_routes(&self) -> NetResult<Vec<RouteMessage>> {
        let mut all = Vec::new();
        for request in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let _turn = self.dump_turn().await;
            let msgs: Vec<RouteMessage> = self
                .handle()
                .route()
                .get(request)
                .execute()
                .try_collect()
                .await
                .map_err(|e| nl_err("list", "routes", e))?;
            all.extend(msgs);
        }
        Ok(all)
    }

    /// Every gateway-less route of the main table (both families), with its device.
    pub async fn device_routes(&self) -> NetResult<Vec<DeviceRoute>> {
        let all = self.all_routes().await?;
        Ok(all.iter().filter_map(parse_device_route).collect())
    }

    /// Every route of the main table with a gateway (both families): destination, gateway,
    /// device.
    pub async fn gateway_routes(&self) -> NetResult<Vec<(IpNetwork, IpAddr, Option<u32>)>> {
        let all = self.all_routes().await?;
        Ok(all.iter().filter_map(parse_gateway_route).collect())
    }

    /// Adds a proxy neighbour entry (`ip -6 neigh add proxy <ip> dev <index>`): with
    /// `proxy_ndp` on, the host answers neighbour solicitations for `ip` on that link.
    pub async fn add_proxy_neighbour(&self, index: u32, ip: IpAddr) -> NetResult<()> {
        self.handle()
            .neighbours()
            .add(index, ip)
            .flags(NeighbourFlags::Proxy)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| nl_err("add", format!("proxy neighbour {ip} on link #{index}"), e))
    }
}

fn parse_gateway_route(m: &RouteMessage) -> Option<(IpNetwork, IpAddr, Option<u32>)> {
    if m.header.table != 254 || m.header.kind != RouteType::Unicast {
        return None;
    }
    let v6 = m.header.address_family == rtnetlink::packet_route::AddressFamily::Inet6;
    let mut dst: IpAddr = if v6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let (mut gateway, mut dev) = (None, None);
    for attr in &m.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = IpAddr::V4(*a),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = IpAddr::V6(*a),
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(IpAddr::V4(*a)),
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => gateway = Some(IpAddr::V6(*a)),
            RouteAttribute::Oif(i) => dev = Some(*i),
            _ => {}
        }
    }
    let destination = IpNetwork::new(dst, m.header.destination_prefix_length).ok()?;
    Some((destination, gateway?, dev))
}

fn parse_device_route(m: &RouteMessage) -> Option<DeviceRoute> {
    if m.header.table != 254 || m.header.kind != RouteType::Unicast {
        return None;
    }
    let mut dst = None;
    let mut dev = None;
    for attr in &m.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = Some(IpAddr::V6(*a)),
            RouteAttribute::Gateway(_) | RouteAttribute::Via(_) | RouteAttribute::MultiPath(_) => {
                return None;
            }
            RouteAttribute::Oif(i) => dev = Some(*i),
            _ => {}
        }
    }
    let destination = IpNetwork::new(dst?, m.header.destination_prefix_length).ok()?;
    Some(DeviceRoute {
        destination,
        dev: dev?,
        protocol: u8::from(m.header.protocol),
    })
}

/// Calico's settings for the host side of a routed workload interface: proxy ARP answering
/// at once, strict reverse-path filtering (a workload cannot spoof another's address),
/// forwarding; IPv6 proxy NDP and forwarding.
pub fn host_interface_sysctls(ifname: &str, ipv6: bool) -> Vec<(String, &'static str)> {
    let mut keys = vec![
        (format!("net.ipv4.conf.{ifname}.rp_filter"), "1"),
        (format!("net.ipv4.conf.{ifname}.route_localnet"), "1"),
        (format!("net.ipv4.conf.{ifname}.proxy_arp"), "1"),
        (format!("net.ipv4.neigh.{ifname}.proxy_delay"), "0"),
        (format!("net.ipv4.conf.{ifname}.forwarding"), "1"),
    ];
    if ipv6 {
        keys.push((format!("net.ipv6.conf.{ifname}.proxy_ndp"), "1"));
        keys.push((format!("net.ipv6.neigh.{ifname}.proxy_delay"), "0"));
        keys.push((format!("net.ipv6.conf.{ifname}.forwarding"), "1"));
        // The host side's link-local address answers for the gateway; waiting for duplicate
        // address detection on a two-ended veth only delays the workload's first packets.
        keys.push((format!("net.ipv6.conf.{ifname}.accept_dad"), "0"));
    }
    keys
}

/// What a routed workload gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedWorkloadSpec {
    /// The host side's name (tenet's routed prefix, see the owner's naming).
    pub host_ifname: String,
    /// The name the workload side gets inside the workload's namespace.
    pub workload_ifname: String,
    /// The workload's addresses: single addresses (/32, /128).
    pub addresses: Vec<IpNetwork>,
    pub mtu: Option<u32>,
}

/// A routed workload as made: the host side's index and the workload side's MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedWorkload {
    pub host_index: u32,
    pub workload_mac: [u8; 6],
}

/// Cables a workload namespace to the host by a veth and routes it: the workload side gets
/// the addresses and a default route via [`GATEWAY_V4`] / [`GATEWAY_V6`]; the host side gets
/// no address, Calico's sysctls, a device route and a permanent neighbour entry per address.
/// On failure the veth is deleted again, so nothing is left half made.
pub async fn attach_workload(
    host: &Netlink,
    host_netns: Option<&Path>,
    workload_netns: &Path,
    spec: &RoutedWorkloadSpec,
) -> NetResult<RoutedWorkload> {
    for a in &spec.addresses {
        if a.prefix() != if a.is_ipv4() { 32 } else { 128 } {
            return Err(NetError::invalid(
                "attach",
                format!("workload address {a}"),
                "routed workloads have single addresses (/32, /128)",
            ));
        }
    }
    // The workload's end is made in its namespace under its final name (moving it there
    // afterwards costs an RCU grace period).
    let target = std::fs::File::open(workload_netns)
        .map_err(|e| NetError::new("open", workload_netns.display().to_string(), e))?;
    let mut link =
        NewLink::veth(&spec.host_ifname, &spec.workload_ifname).peer_netns(target.as_fd());
    if let Some(mtu) = spec.mtu {
        link = link.mtu(mtu).peer_settings(Some(mtu), None);
    }
    let created = host.create(&link).await?;
    drop(target);
    match finish_attach(host, host_netns, workload_netns, spec, created.index).await {
        Ok(w) => Ok(w),
        Err(e) => {
            let _ = host.delete(created.index).await;
            Err(e)
        }
    }
}

async fn finish_attach(
    host: &Netlink,
    host_netns: Option<&Path>,
    workload_netns: &Path,
    spec: &RoutedWorkloadSpec,
    host_index: u32,
) -> NetResult<RoutedWorkload> {
    let ipv6 = spec.addresses.iter().any(|a| a.is_ipv6());
    let inside = Netlink::connect_in(workload_netns)?;
    let index = inside.index_of(&spec.workload_ifname).await?;
    if ipv6 {
        // No duplicate address detection: the address is IPAM's and the link has one peer.
        super::sysctl::write_all(
            Some(workload_netns),
            &[(
                format!("net.ipv6.conf.{}.accept_dad", spec.workload_ifname),
                "0",
            )],
        )?;
    }
    for a in &spec.addresses {
        inside.add_address(index, *a).await?;
    }
    inside.set_up(index).await?;
    let mac = inside
        .link_by_index(index)
        .await?
        .and_then(|l| l.mac)
        .ok_or_else(|| NetError::invalid("attach", spec.workload_ifname.clone(), "no MAC"))?;
    for a in &spec.addresses {
        let gateway = if a.is_ipv4() {
            IpAddr::V4(GATEWAY_V4)
        } else {
            IpAddr::V6(GATEWAY_V6)
        };
        // The gateway is on the link; the default route goes through it.
        if a.is_ipv4() {
            inside
                .add_device_route(IpNetwork::new(gateway, 32).expect("/32"), index)
                .await?;
        }
        inside.add_default_route(gateway, index).await?;
    }
    route_to(
        host,
        host_netns,
        &spec.host_ifname,
        host_index,
        &spec.addresses,
        mac,
    )
    .await?;
    Ok(RoutedWorkload {
        host_index,
        workload_mac: mac,
    })
}

/// The host side of a routed workload interface (a veth's host end or a VM's tap): Calico's
/// sysctls, up, a device route and a permanent neighbour entry per address, and the proxy
/// NDP entry for the IPv6 gateway. Repeating it is harmless.
pub async fn route_to(
    host: &Netlink,
    host_netns: Option<&Path>,
    ifname: &str,
    index: u32,
    addresses: &[IpNetwork],
    mac: [u8; 6],
) -> NetResult<()> {
    let ipv6 = addresses.iter().any(|a| a.is_ipv6());
    super::sysctl::write_all(host_netns, &host_interface_sysctls(ifname, ipv6))?;
    host.set_up(index).await?;
    for a in addresses {
        host.add_device_route(*a, index).await?;
        host.add_neighbour(index, a.ip(), mac).await?;
    }
    if ipv6 {
        host.add_proxy_neighbour(index, IpAddr::V6(GATEWAY_V6))
            .await?;
    }
    Ok(())
}

impl Netlink {
    /// `default via <gateway> dev <dev>` (either family); replaces an existing default.
    pub async fn add_default_route(&self, gateway: IpAddr, dev: u32) -> NetResult<()> {
        let message = match gateway {
            IpAddr::V4(g) => RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(g)
                .output_interface(dev)
                .build(),
            IpAddr::V6(g) => RouteMessageBuilder::<Ipv6Addr>::new()
                .gateway(g)
                .output_interface(dev)
                .build(),
        };
        self.handle()
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(|e| nl_err("add", format!("default route via {gateway}"), e))
    }
}

/// Routed-mode settings of the whole host namespace: forwarding on, and strict reverse-path
/// filtering as the default for new interfaces (Felix refuses loose `all`).
pub fn host_sysctls() -> Vec<(String, &'static str)> {
    vec![
        ("net.ipv4.ip_forward".into(), "1"),
        ("net.ipv4.conf.default.rp_filter".into(), "1"),
        ("net.ipv6.conf.all.forwarding".into(), "1"),
    ]
}

/// Deletes a routed workload's host-side link; its routes and neighbour entries (and a veth's
/// workload end) go with it. An already-deleted link is not an error.
pub async fn detach_workload(host: &Netlink, host_index: u32) -> NetResult<()> {
    match host.delete(host_index).await {
        Ok(()) => Ok(()),
        Err(e) if e.errno() == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calico_interface_settings() {
        let keys = host_interface_sysctls("tvr_1", true);
        assert!(keys.contains(&("net.ipv4.conf.tvr_1.proxy_arp".into(), "1")));
        assert!(keys.contains(&("net.ipv4.neigh.tvr_1.proxy_delay".into(), "0")));
        assert!(keys.contains(&("net.ipv6.conf.tvr_1.proxy_ndp".into(), "1")));
        assert_eq!(host_interface_sysctls("tvr_1", false).len(), 5);
    }

    #[test]
    fn device_route_messages_carry_proto_boot_and_link_scope() {
        let m = device_route_message("10.65.0.3/32".parse().unwrap(), 7);
        assert_eq!(m.header.protocol, RouteProtocol::Boot);
        assert_eq!(m.header.scope, RouteScope::Link);
        assert_eq!(m.header.destination_prefix_length, 32);
        let m6 = device_route_message("fd10::3/128".parse().unwrap(), 7);
        assert_eq!(m6.header.destination_prefix_length, 128);
        assert!(
            parse_device_route(&{
                let mut m = m.clone();
                m.header.table = 254;
                m
            })
            .is_some()
        );
    }
}
