//! Forwarding-database entries of a VXLAN device (`bridge fdb append … dst IP self`): which
//! remote VTEPs a frame goes to. An all-zero MAC entry per remote is the head-end replication
//! list for broadcast and unknown destinations.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::{NetResult, Netlink, nl_err};

/// The MAC of the flood (broadcast/unknown) entries.
pub const FLOOD_MAC: [u8; 6] = [0; 6];

/// One entry of a device's forwarding database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbEntry {
    pub mac: [u8; 6],
    /// The remote VTEP, for VXLAN entries.
    pub dst: Option<IpAddr>,
    pub permanent: bool,
}

fn message(index: u32, mac: [u8; 6], dst: Ipv4Addr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Bridge;
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.header.flags = NeighbourFlags::Own;
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(dst)));
    msg
}

fn mac_text(mac: [u8; 6]) -> String {
    crate::types::MacAddr(mac).to_string()
}

impl Netlink {
    /// Adds `mac → dst` to the device's forwarding database, next to any entries the MAC
    /// already has (`bridge fdb append`). Adding one that exists succeeds.
    pub async fn fdb_append(&self, index: u32, mac: [u8; 6], dst: Ipv4Addr) -> NetResult<()> {
        let object = format!("fdb entry {} dst {dst} on link #{index}", mac_text(mac));
        let mut req =
            NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(message(index, mac, dst)));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
        match self.request("add", &object, req).await {
            Err(e) if e.is_exists() => Ok(()),
            other => other.map(drop),
        }
    }

    /// Removes `mac → dst`; a missing entry is not an error.
    pub async fn fdb_del(&self, index: u32, mac: [u8; 6], dst: Ipv4Addr) -> NetResult<()> {
        let object = format!("fdb entry {} dst {dst} on link #{index}", mac_text(mac));
        let mut req =
            NetlinkMessage::from(RouteNetlinkMessage::DelNeighbour(message(index, mac, dst)));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        match self.request("delete", &object, req).await {
            Err(e) if e.is_not_found() => Ok(()),
            other => other.map(drop),
        }
    }

    /// The forwarding-database entries of device `index`.
    pub async fn fdb(&self, index: u32) -> NetResult<Vec<FdbEntry>> {
        let _turn = self.dump_turn().await;
        let mut get = self.handle().neighbours().get();
        get.message_mut().header.family = AddressFamily::Bridge;
        let msgs: Vec<NeighbourMessage> = get
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl_err("list", format!("fdb of link #{index}"), e))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.ifindex == index)
            .filter_map(|m| {
                let mut mac = None;
                let mut dst = None;
                for a in &m.attributes {
                    match a {
                        NeighbourAttribute::LinkLayerAddress(l) => {
                            mac = <[u8; 6]>::try_from(l.as_slice()).ok()
                        }
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                            dst = Some(IpAddr::V4(*v4))
                        }
                        // In a bridge-family message the parser cannot tell the address
                        // family: it hands back the bytes.
                        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                            dst = <[u8; 4]>::try_from(b.as_slice())
                                .map(|o| IpAddr::V4(Ipv4Addr::from(o)))
                                .ok()
                        }
                        _ => {}
                    }
                }
                Some(FdbEntry {
                    mac: mac?,
                    dst,
                    permanent: m.header.state == NeighbourState::Permanent,
                })
            })
            .collect())
    }
}
