//! Link creation requests: what kind of link, with which settings, built into the one
//! RTM_NEWLINK message the kernel gets (so a link is born configured, not patched up after).

use std::net::Ipv4Addr;

use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{
    GreIOFlags, InfoData, InfoGre, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo,
    LinkMessage, MacVtapMode,
};
use rtnetlink::{LinkBridge, LinkMacVtap, LinkVeth, LinkVxlan};

use super::link::MAX_IFNAME;
use super::{NetError, NetResult};

/// macvtap forwarding modes that tenet uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacvtapMode {
    /// Frames between macvtaps on the same lower device are switched locally.
    Bridge,
    /// Every frame goes out through the lower device (an external switch hairpins it).
    Vepa,
}

/// VXLAN parameters (one VNI, point to point when `remote` is set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanParams {
    pub vni: u32,
    pub local: Option<Ipv4Addr>,
    pub remote: Option<Ipv4Addr>,
    /// Underlay device the encapsulated packets leave from.
    pub dev: Option<u32>,
    pub port: u16,
    pub learning: bool,
}

/// Kernel GRE-over-IPv4 Ethernet tunnel parameters (`ip link add type gretap`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GretapParams {
    pub local: Ipv4Addr,
    pub remote: Ipv4Addr,
    /// Used as both ikey and okey.
    pub key: u32,
    /// Outer TTL; 0 inherits the inner packet's (`ttl inherit`, iproute2's default).
    pub ttl: u8,
}

/// The far end of a veth pair, with the settings it gets in the same request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethPeer {
    pub name: String,
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
    /// Create the peer directly in the namespace open at this descriptor (IFLA_NET_NS_FD in
    /// the peer's message), as `ip link add … peer name X netns N` does: moving it there
    /// afterwards costs the kernel an RCU grace period (tens of milliseconds).
    pub netns_fd: Option<i32>,
}

/// What kind of link to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    Veth(VethPeer),
    Macvtap { lower: u32, mode: MacvtapMode },
    Vxlan(VxlanParams),
    Gretap(GretapParams),
}

impl LinkKind {
    pub(super) fn describe(&self) -> &'static str {
        match self {
            LinkKind::Bridge => "bridge",
            LinkKind::Veth(_) => "veth",
            LinkKind::Macvtap { .. } => "macvtap",
            LinkKind::Vxlan(_) => "vxlan",
            LinkKind::Gretap(_) => "gretap",
        }
    }
}

/// A link to create, with the settings applied in the same request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLink {
    pub name: String,
    pub kind: LinkKind,
    pub controller: Option<u32>,
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
    pub group: Option<u32>,
    pub up: bool,
    /// Give the link no IPv6 link-local address (`addrgenmode none`); see
    /// [`Netlink::disable_link_local`](super::Netlink::disable_link_local).
    pub no_link_local: bool,
}

impl NewLink {
    pub fn new(name: impl Into<String>, kind: LinkKind) -> Self {
        NewLink {
            name: name.into(),
            kind,
            controller: None,
            mtu: None,
            mac: None,
            group: None,
            up: false,
            no_link_local: false,
        }
    }
    pub fn bridge(name: impl Into<String>) -> Self {
        Self::new(name, LinkKind::Bridge)
    }
    pub fn veth(name: impl Into<String>, peer: impl Into<String>) -> Self {
        Self::new(
            name,
            LinkKind::Veth(VethPeer {
                name: peer.into(),
                mtu: None,
                mac: None,
                netns_fd: None,
            }),
        )
    }
    /// Sets the MTU and MAC of a veth's peer in the creating request (no-op for other kinds).
    pub fn peer_settings(mut self, mtu: Option<u32>, mac: Option<[u8; 6]>) -> Self {
        if let LinkKind::Veth(peer) = &mut self.kind {
            peer.mtu = mtu;
            peer.mac = mac;
        }
        self
    }
    /// Creates a veth's peer inside the namespace open at `fd`, which must stay open until
    /// the request is answered (no-op for other kinds).
    pub fn peer_netns(mut self, fd: std::os::fd::BorrowedFd<'_>) -> Self {
        use std::os::fd::AsRawFd;
        if let LinkKind::Veth(peer) = &mut self.kind {
            peer.netns_fd = Some(fd.as_raw_fd());
        }
        self
    }
    pub fn macvtap(name: impl Into<String>, lower: u32, mode: MacvtapMode) -> Self {
        Self::new(name, LinkKind::Macvtap { lower, mode })
    }
    pub fn vxlan(name: impl Into<String>, params: VxlanParams) -> Self {
        Self::new(name, LinkKind::Vxlan(params))
    }
    pub fn gretap(name: impl Into<String>, params: GretapParams) -> Self {
        Self::new(name, LinkKind::Gretap(params))
    }
    pub fn controller(mut self, bridge: u32) -> Self {
        self.controller = Some(bridge);
        self
    }
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = Some(mtu);
        self
    }
    pub fn mac(mut self, mac: [u8; 6]) -> Self {
        self.mac = Some(mac);
        self
    }
    pub fn group(mut self, group: u32) -> Self {
        self.group = Some(group);
        self
    }
    pub fn up(mut self) -> Self {
        self.up = true;
        self
    }
    /// A tenant L2 port or bridge: no IPv6 link-local address on the host's side of it.
    pub fn no_link_local(mut self) -> Self {
        self.no_link_local = true;
        self
    }

    /// `veth tb-a` style description used in errors and logs.
    pub fn object(&self) -> String {
        format!("{} {}", self.kind.describe(), self.name)
    }

    /// The RTM_NEWLINK body. Pure, so tests can compare it with what iproute2 sends.
    pub fn message(&self) -> NetResult<LinkMessage> {
        check_name("create", &self.object(), &self.name)?;
        let mut msg = match &self.kind {
            LinkKind::Bridge => LinkBridge::new(&self.name).build(),
            LinkKind::Veth(peer) => {
                check_name("create", &self.object(), &peer.name)?;
                let mut msg = LinkVeth::new(&self.name, &peer.name).build();
                if peer.mtu.is_some() || peer.mac.is_some() || peer.netns_fd.is_some() {
                    set_veth_peer(&mut msg, peer);
                }
                msg
            }
            LinkKind::Macvtap { lower, mode } => {
                let mode = match mode {
                    MacvtapMode::Bridge => MacVtapMode::Bridge,
                    MacvtapMode::Vepa => MacVtapMode::Vepa,
                };
                LinkMacVtap::new(&self.name, *lower, mode).build()
            }
            LinkKind::Vxlan(p) => {
                let mut b = LinkVxlan::new(&self.name, p.vni)
                    .port(p.port)
                    .learning(p.learning);
                if let Some(local) = p.local {
                    b = b.local(local);
                }
                if let Some(remote) = p.remote {
                    b = b.remote(remote);
                }
                if let Some(dev) = p.dev {
                    b = b.dev(dev);
                }
                b.build()
            }
            LinkKind::Gretap(p) => gretap_message(&self.name, p),
        };
        if let Some(c) = self.controller {
            msg.attributes.push(LinkAttribute::Controller(c));
        }
        if let Some(mtu) = self.mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(mac) = self.mac {
            msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        if let Some(group) = self.group {
            msg.attributes.push(LinkAttribute::Group(group));
        }
        // Exactly as asked: rtnetlink's bridge builder sets IFF_UP on its own.
        if self.up {
            msg.header.flags |= LinkFlags::Up;
            msg.header.change_mask |= LinkFlags::Up;
        } else {
            msg.header.flags.remove(LinkFlags::Up);
            msg.header.change_mask.remove(LinkFlags::Up);
        }
        Ok(msg)
    }
}

/// Adds the peer's MTU and MAC to the IFLA_INFO_DATA/VETH_INFO_PEER message `LinkVeth` built.
fn set_veth_peer(msg: &mut LinkMessage, peer: &VethPeer) {
    for attr in &mut msg.attributes {
        let LinkAttribute::LinkInfo(infos) = attr else {
            continue;
        };
        for info in infos {
            if let LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))) = info {
                if let Some(mtu) = peer.mtu {
                    p.attributes.push(LinkAttribute::Mtu(mtu));
                }
                if let Some(mac) = peer.mac {
                    p.attributes.push(LinkAttribute::Address(mac.to_vec()));
                }
                if let Some(fd) = peer.netns_fd {
                    p.attributes.push(LinkAttribute::NetNsFd(fd));
                }
            }
        }
    }
}

/// The gretap request exactly as iproute2 6.1 builds it for
/// `ip link add NAME type gretap local A remote B ikey K okey K`: every IFLA_GRE_* attribute
/// it sends, in its order, including the zero-valued ones (PMTU discovery on).
fn gretap_message(name: &str, p: &GretapParams) -> LinkMessage {
    let data = vec![
        InfoGre::IKey(p.key),
        InfoGre::OKey(p.key),
        InfoGre::IFlags(GreIOFlags::Key),
        InfoGre::OFlags(GreIOFlags::Key),
        InfoGre::Local(p.local),
        InfoGre::Remote(p.remote),
        InfoGre::PathMTUDiscovery(true),
        InfoGre::Tos(0),
        InfoGre::Ttl(p.ttl),
        InfoGre::FwMask(0),
        InfoGre::EncapType(Default::default()),
        InfoGre::EncapFlags(Default::default()),
        InfoGre::SourcePort(0),
        InfoGre::DestinationPort(0),
    ];
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::GreTap),
        LinkInfo::Data(InfoData::GreTap(data)),
    ]));
    msg
}

/// The full RTM_NEWLINK request tenet sends for `link` (sequence number left at 0).
pub fn new_link_request(link: &NewLink) -> NetResult<NetlinkMessage<RouteNetlinkMessage>> {
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewLink(link.message()?));
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE;
    req.finalize();
    Ok(req)
}

pub(super) fn check_name(op: &'static str, object: &str, name: &str) -> NetResult<()> {
    if name.is_empty() || name.len() > MAX_IFNAME {
        return Err(NetError::invalid(
            op,
            object,
            format!(
                "interface name {name:?} must be 1 to {MAX_IFNAME} bytes, not {}",
                name.len()
            ),
        ));
    }
    if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        return Err(NetError::invalid(
            op,
            object,
            format!("interface name {name:?} may not contain '/', ':' or whitespace"),
        ));
    }
    Ok(())
}
