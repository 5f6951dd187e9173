//! Addresses, IPv4 routes and permanent neighbour entries. Adds are create-or-replace so that
//! repeating one is harmless.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnetwork::{IpNetwork, Ipv4Network};
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};

use super::link::Netlink;
use super::{NetResult, nl_err};

/// An IPv4 route in the main table unless `table` says otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub destination: Ipv4Network,
    pub gateway: Option<Ipv4Addr>,
    pub dev: Option<u32>,
    pub table: Option<u32>,
}

impl Route {
    fn object(&self) -> String {
        let mut s = format!("route {}", self.destination);
        if let Some(gw) = self.gateway {
            s.push_str(&format!(" via {gw}"));
        }
        if let Some(dev) = self.dev {
            s.push_str(&format!(" dev #{dev}"));
        }
        s
    }

    fn message(&self) -> RouteMessage {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(self.destination.network(), self.destination.prefix());
        if let Some(gw) = self.gateway {
            b = b.gateway(gw);
        }
        if let Some(dev) = self.dev {
            b = b.output_interface(dev);
            // As `ip route add X dev Y` does: a route without a gateway reaches its
            // destination on the link, and can then serve as a gateway's route.
            if self.gateway.is_none() {
                b = b.scope(rtnetlink::packet_route::route::RouteScope::Link);
            }
        }
        if let Some(t) = self.table {
            b = b.table_id(t);
        }
        b.build()
    }

    fn from_message(m: &RouteMessage) -> Option<Self> {
        let mut dst = Ipv4Addr::UNSPECIFIED;
        let mut route = Route {
            destination: Ipv4Network::new(dst, 0).ok()?,
            gateway: None,
            dev: None,
            table: Some(u32::from(m.header.table)),
        };
        for attr in &m.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = *a,
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => route.gateway = Some(*g),
                RouteAttribute::Oif(i) => route.dev = Some(*i),
                RouteAttribute::Table(t) => route.table = Some(*t),
                _ => {}
            }
        }
        route.destination = Ipv4Network::new(dst, m.header.destination_prefix_length).ok()?;
        Some(route)
    }
}

/// A permanent neighbour (ARP) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub dev: u32,
    pub ip: IpAddr,
    pub mac: Option<[u8; 6]>,
    pub permanent: bool,
}

impl Netlink {
    /// Adds `addr` (address and prefix length) to link `index`; replaces an equal one.
    pub async fn add_address(&self, index: u32, addr: IpNetwork) -> NetResult<()> {
        self.handle()
            .address()
            .add(index, addr.ip(), addr.prefix())
            .replace()
            .execute()
            .await
            .map_err(|e| nl_err("add", format!("address {addr} on link #{index}"), e))
    }

    /// The kernel's address messages for link `index` (the dump filter is advisory, so the
    /// index is checked again).
    async fn address_messages(
        &self,
        op: &'static str,
        index: u32,
    ) -> NetResult<Vec<AddressMessage>> {
        let _turn = self.dump_turn().await;
        let msgs: Vec<AddressMessage> = self
            .handle()
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err(op, format!("addresses of link #{index}"), e))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.index == index)
            .collect())
    }

    pub async fn addresses(&self, index: u32) -> NetResult<Vec<IpNetwork>> {
        let msgs = self.address_messages("list", index).await?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => IpNetwork::new(*ip, m.header.prefix_len).ok(),
                    _ => None,
                })
            })
            .collect())
    }

    /// The index of the link that holds address `ip`, if any.
    pub async fn link_of_address(&self, ip: IpAddr) -> NetResult<Option<u32>> {
        let _turn = self.dump_turn().await;
        let msgs: Vec<AddressMessage> = self
            .handle()
            .address()
            .get()
            .set_address_filter(ip)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("find", format!("link holding {ip}"), e))?;
        Ok(msgs
            .iter()
            .find(|m| {
                m.attributes
                    .iter()
                    .any(|a| matches!(a, AddressAttribute::Address(a) if *a == ip))
            })
            .map(|m| m.header.index))
    }

    /// Removes `addr` from link `index`; an address that is not there is not an error.
    pub async fn del_address(&self, index: u32, addr: IpNetwork) -> NetResult<()> {
        let object = format!("address {addr} on link #{index}");
        for m in self.address_messages("delete", index).await? {
            let matches = m.header.prefix_len == addr.prefix()
                && m.attributes
                    .iter()
                    .any(|a| matches!(a, AddressAttribute::Address(ip) if *ip == addr.ip()));
            if matches {
                self.handle()
                    .address()
                    .del(m)
                    .execute()
                    .await
                    .map_err(|e| nl_err("delete", &object, e))?;
            }
        }
        Ok(())
    }

    /// Adds (or replaces) an IPv4 route.
    pub async fn add_route(&self, route: &Route) -> NetResult<()> {
        self.handle()
            .route()
            .add(route.message())
            .replace()
            .execute()
            .await
            .map_err(|e| nl_err("add", route.object(), e))
    }

    pub async fn del_route(&self, route: &Route) -> NetResult<()> {
        match self.handle().route().del(route.message()).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = nl_err("delete", route.object(), e);
                if e.errno() == Some(libc::ESRCH) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// IPv4 routes of every table.
    pub async fn routes(&self) -> NetResult<Vec<Route>> {
        let _turn = self.dump_turn().await;
        let msgs: Vec<RouteMessage> = self
            .handle()
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("list", "routes", e))?;
        Ok(msgs.iter().filter_map(Route::from_message).collect())
    }

    /// Adds (or replaces) a permanent neighbour entry `ip → mac` on link `index`.
    pub async fn add_neighbour(&self, index: u32, ip: IpAddr, mac: [u8; 6]) -> NetResult<()> {
        self.handle()
            .neighbours()
            .add(index, ip)
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| nl_err("add", format!("neighbour {ip} on link #{index}"), e))
    }

    /// Asks the kernel to resolve `ip` on link `index` now (`NTF_USE`: an entry is made if
    /// needed and ARP / neighbour discovery starts), so that a datapath that reads the
    /// neighbour table finds it resolved by the time traffic flows.
    pub async fn resolve_neighbour(&self, index: u32, ip: IpAddr) -> NetResult<()> {
        self.handle()
            .neighbours()
            .add(index, ip)
            .flags(NeighbourFlags::Use)
            .replace()
            .execute()
            .await
            .map_err(|e| nl_err("resolve", format!("neighbour {ip} on link #{index}"), e))
    }

    /// The neighbour entries of link `index`.
    pub async fn neighbours(&self, index: u32) -> NetResult<Vec<Neighbour>> {
        Ok(self
            .neighbour_table()
            .await?
            .into_iter()
            .filter(|n| n.dev == index)
            .collect())
    }

    /// Every neighbour entry of the namespace, in one dump (the kernel's dump is not
    /// filtered by link, so one dump serves any number of links).
    pub async fn neighbour_table(&self) -> NetResult<Vec<Neighbour>> {
        let _turn = self.dump_turn().await;
        let msgs: Vec<NeighbourMessage> = self
            .handle()
            .neighbours()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("list", "neighbours", e))?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                let mut ip = None;
                let mut mac = None;
                for a in &m.attributes {
                    match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                            ip = Some(IpAddr::V4(*v4))
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                            ip = Some(IpAddr::V6(*v6))
                        }
                        NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                            mac = l.as_slice().try_into().ok()
                        }
                        _ => {}
                    }
                }
                Some(Neighbour {
                    dev: m.header.ifindex,
                    ip: ip?,
                    mac,
                    permanent: m.header.state == NeighbourState::Permanent,
                })
            })
            .collect())
    }

    /// Removes the neighbour entry for `ip` on link `index`; a missing one is not an error.
    pub async fn del_neighbour(&self, index: u32, ip: IpAddr) -> NetResult<()> {
        let object = format!("neighbour {ip} on link #{index}");
        let mut msg = NeighbourMessage::default();
        msg.header.ifindex = index;
        msg.header.family = match ip {
            IpAddr::V4(_) => rtnetlink::packet_route::AddressFamily::Inet,
            IpAddr::V6(_) => rtnetlink::packet_route::AddressFamily::Inet6,
        };
        msg.attributes
            .push(NeighbourAttribute::Destination(match ip {
                IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
                IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
            }));
        match self.handle().neighbours().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = nl_err("delete", object, e);
                if e.is_not_found() { Ok(()) } else { Err(e) }
            }
        }
    }
}
