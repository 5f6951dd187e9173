//! Links: create, find, change and delete, over one rtnetlink connection.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt, stream};
use rtnetlink::LinkUnspec;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_ECHO, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use tracing::debug;

use super::new_link::{NewLink, check_name, new_link_request};
use super::{NetError, NetResult, nl_err};

/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
pub const MAX_IFNAME: usize = 15;

/// Concurrent requests kept in flight on one connection by the batch operations.
const PIPELINE: usize = 64;

/// A link as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `bridge`, `veth`, `tun` (taps too), `macvtap`, `vxlan`, `gretap`; `None` for plain
    /// devices such as `lo`.
    pub kind: Option<String>,
    pub alias: Option<String>,
    pub controller: Option<u32>,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// Operational state as the kernel names it (`up`, `down`, `unknown`, ...).
    pub oper_state: String,
    pub mtu: u32,
    pub mac: Option<[u8; 6]>,
    pub group: u32,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Self {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            alias: None,
            controller: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            oper_state: String::new(),
            mtu: 0,
            mac: None,
            group: 0,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::IfAlias(a) => link.alias = Some(a.clone()),
                LinkAttribute::Controller(c) => link.controller = Some(*c),
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::Group(g) => link.group = *g,
                LinkAttribute::OperState(s) => {
                    link.oper_state = format!("{s:?}").to_lowercase();
                }
                LinkAttribute::Address(a) if a.len() == 6 => {
                    link.mac = Some(a.as_slice().try_into().expect("length checked"));
                }
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(k) = info {
                            link.kind = Some(k.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }

    /// The character device of a macvtap (`/dev/tapN`, N = ifindex), made by devtmpfs.
    pub fn macvtap_device(&self) -> Option<PathBuf> {
        (self.kind.as_deref() == Some("macvtap"))
            .then(|| PathBuf::from(format!("/dev/tap{}", self.index)))
    }
}

/// A netlink connection bound to one network namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
    /// The kernel runs one dump at a time per netlink socket and refuses a second with
    /// EBUSY, so dumps on this connection (and its clones) take turns.
    dumps: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Netlink")
    }
}

impl Netlink {
    /// A connection in the caller's namespace. Needs a tokio runtime.
    pub fn connect() -> NetResult<Self> {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| NetError::new("open", "netlink socket", e))?;
        tokio::spawn(conn);
        Ok(Netlink {
            handle,
            dumps: Arc::default(),
        })
    }

    /// A connection inside the namespace at `netns` (e.g. `/run/netns/NAME`).
    pub fn connect_in(netns: &Path) -> NetResult<Self> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle) = super::netns::run_in(Some(netns), move || {
            let _guard = rt.enter();
            let (conn, handle, _) = rtnetlink::new_connection()
                .map_err(|e| NetError::new("open", "netlink socket", e))?;
            Ok((conn, handle))
        })?;
        tokio::spawn(conn);
        Ok(Netlink {
            handle,
            dumps: Arc::default(),
        })
    }

    pub fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }

    /// This connection's turn to dump: hold it while the dump's messages are collected.
    pub(super) async fn dump_turn(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.dumps.lock().await
    }

    /// Sends one request and collects the messages the kernel answers with.
    pub(super) async fn request(
        &self,
        op: &'static str,
        object: &str,
        req: NetlinkMessage<RouteNetlinkMessage>,
    ) -> NetResult<Vec<RouteNetlinkMessage>> {
        let mut replies = self
            .handle
            .clone()
            .request(req)
            .map_err(|e| nl_err(op, object, e))?;
        let mut out = Vec::new();
        while let Some(msg) = replies.next().await {
            match msg.payload {
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(NetError::new(op, object, e.to_io()));
                }
                NetlinkPayload::InnerMessage(m) => out.push(m),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Creates a link and returns it as the kernel reports it.
    pub async fn create(&self, link: &NewLink) -> NetResult<Link> {
        let index = self.create_index(link).await?;
        // The echo is the link as registered, before the controller is set: re-read it.
        self.link_by_index(index)
            .await?
            .ok_or_else(|| NetError::not_found("create", link.object()))
    }

    /// Creates a link and returns only its index: one round trip for hot paths (three for
    /// a link without a link-local address: created down, mode set, then up).
    pub async fn create_index(&self, link: &NewLink) -> NetResult<u32> {
        if link.no_link_local && link.up {
            let down = NewLink {
                up: false,
                ..link.clone()
            };
            let index = self.create_echoed(&down).await?;
            let finished = async {
                self.disable_link_local(index).await?;
                self.set_up(index).await
            };
            if let Err(e) = finished.await {
                let mut left = super::Leftovers::new();
                left.note(self.delete(index).await);
                left.log(&link.object());
                return Err(e.with_leftovers(left));
            }
            return Ok(index);
        }
        self.create_echoed(link).await
    }

    /// One RTM_NEWLINK, answered with the new link's index.
    async fn create_echoed(&self, link: &NewLink) -> NetResult<u32> {
        let object = link.object();
        let mut req = new_link_request(link)?;
        // NLM_F_ECHO makes the kernel answer with the new link's index.
        req.header.flags |= NLM_F_ECHO;
        let replies = self.request("create", &object, req).await?;
        let echoed = replies.iter().find_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) if l.header.index != 0 => Some(l.header.index),
            _ => None,
        });
        let index = match echoed {
            Some(index) => index,
            None => self.index_of(&link.name).await?,
        };
        debug!(link = %link.name, index, kind = link.kind.describe(), "link created");
        Ok(index)
    }

    /// Creates many links with up to 64 requests in flight; stops at the first failure and
    /// returns it (links already made are left for the caller to delete).
    pub async fn create_many(&self, links: &[NewLink]) -> NetResult<()> {
        stream::iter(links.iter().map(|l| async move {
            let req = new_link_request(l)?;
            self.request("create", &l.object(), req).await.map(drop)
        }))
        .buffer_unordered(PIPELINE)
        .try_collect::<Vec<()>>()
        .await
        .map(drop)
    }

    /// Every link in the namespace.
    pub async fn links(&self) -> NetResult<Vec<Link>> {
        let _turn = self.dump_turn().await;
        self.handle
            .link()
            .get()
            .execute()
            .map_ok(|m| Link::from_message(&m))
            .try_collect()
            .await
            .map_err(|e| nl_err("list", "links", e))
    }

    pub async fn link_by_name(&self, name: &str) -> NetResult<Option<Link>> {
        check_name("find", &format!("link {name}"), name)?;
        let res = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await;
        absent_is_none(res, "find", format!("link {name}"))
    }

    pub async fn link_by_index(&self, index: u32) -> NetResult<Option<Link>> {
        let res = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await;
        absent_is_none(res, "find", format!("link #{index}"))
    }

    /// The link whose alias is exactly `alias` (the kernel cannot filter by alias, so this
    /// is a dump).
    pub async fn link_by_alias(&self, alias: &str) -> NetResult<Option<Link>> {
        Ok(self
            .links()
            .await?
            .into_iter()
            .find(|l| l.alias.as_deref() == Some(alias)))
    }

    /// Links whose alias starts with `prefix`.
    pub async fn links_with_alias_prefix(&self, prefix: &str) -> NetResult<Vec<Link>> {
        Ok(self
            .links()
            .await?
            .into_iter()
            .filter(|l| l.alias.as_deref().is_some_and(|a| a.starts_with(prefix)))
            .collect())
    }

    /// The index of `name`, or a NotFound error naming it.
    pub async fn index_of(&self, name: &str) -> NetResult<u32> {
        self.link_by_name(name)
            .await?
            .map(|l| l.index)
            .ok_or_else(|| NetError::not_found("find", format!("link {name}")))
    }

    async fn set(
        &self,
        op: &'static str,
        index: u32,
        build: impl FnOnce(
            rtnetlink::LinkMessageBuilder<LinkUnspec>,
        ) -> rtnetlink::LinkMessageBuilder<LinkUnspec>,
    ) -> NetResult<()> {
        let msg = build(LinkUnspec::new_with_index(index)).build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| nl_err(op, format!("link #{index}"), e))
    }

    /// Applies several settings in one RTM_SETLINK. The kernel applies them one after another
    /// in its own order, so a failure can leave some of them applied.
    pub async fn update(&self, index: u32, change: &LinkUpdate) -> NetResult<()> {
        if let Some(alias) = &change.alias {
            check_alias(index, alias)?;
        }
        self.set("update", index, |mut b| {
            if let Some(mtu) = change.mtu {
                b = b.mtu(mtu);
            }
            if let Some(c) = change.controller {
                b = b.controller(c);
            }
            if let Some(alias) = &change.alias {
                b = b.alias(alias);
            }
            if change.up {
                b = b.up();
            }
            b
        })
        .await
    }

    /// Makes a bridge pass its bridged IPv4 and IPv6 traffic through iptables/ip6tables
    /// (br_netfilter's per-bridge switch, `nf_call_iptables`), whatever the namespace's
    /// `net.bridge.bridge-nf-call-*` sysctls say.
    pub async fn set_bridge_nf_call(&self, index: u32, on: bool) -> NetResult<()> {
        use rtnetlink::packet_route::link::{InfoBridge, InfoData, InfoKind};
        // Link-kind options change through RTM_NEWLINK on the existing link (the kernel's
        // changelink); RTM_SETLINK ignores them.
        let msg = LinkUnspec::new_with_index(index)
            .append_extra_attribute(LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Bridge),
                LinkInfo::Data(InfoData::Bridge(vec![
                    InfoBridge::NfCallIpTables(on),
                    InfoBridge::NfCallIp6Tables(on),
                ])),
            ]))
            .build();
        // Neither EXCL (it exists) nor REPLACE (which the kernel refuses for a link).
        use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_REQUEST};
        self.handle
            .link()
            .add(msg)
            .set_flags(NLM_F_REQUEST | NLM_F_ACK)
            .execute()
            .await
            .map_err(|e| nl_err("set bridge nf_call", format!("link #{index}"), e))
    }

    /// No IPv6 link-local address on this link (`ip link set DEV addrgenmode none`), for
    /// links that are only tenant L2: bridges and their ports. With one, the host would be
    /// reachable from the tenant's segment at `fe80::…%bridge`, and every address the
    /// kernel adds wakes each dnsmasq of the namespace to enumerate all addresses again.
    /// The kernel only takes this on an existing link and only before it goes up (the
    /// address is made when it does), so call it between create and up.
    pub async fn disable_link_local(&self, index: u32) -> NetResult<()> {
        use rtnetlink::packet_route::link::{AfSpecInet6, AfSpecUnspec, In6AddrGenMode};
        self.set("disable IPv6 link-local on", index, |b| {
            b.append_extra_attribute(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
            )]))
        })
        .await
    }

    pub async fn set_up(&self, index: u32) -> NetResult<()> {
        self.set("set up", index, |b| b.up()).await
    }
    pub async fn set_down(&self, index: u32) -> NetResult<()> {
        self.set("set down", index, |b| b.down()).await
    }
    pub async fn set_mtu(&self, index: u32, mtu: u32) -> NetResult<()> {
        self.set("set mtu of", index, |b| b.mtu(mtu)).await
    }
    pub async fn set_mac(&self, index: u32, mac: [u8; 6]) -> NetResult<()> {
        self.set("set address of", index, |b| b.address(mac.to_vec()))
            .await
    }
    /// Sets IFLA_IFALIAS (at most 255 bytes); tenet keeps object identities there.
    pub async fn set_alias(&self, index: u32, alias: &str) -> NetResult<()> {
        check_alias(index, alias)?;
        self.set("set alias of", index, |b| b.alias(alias)).await
    }
    pub async fn set_group(&self, index: u32, group: u32) -> NetResult<()> {
        self.set("set group of", index, |b| b.link_group(group))
            .await
    }
    pub async fn rename(&self, index: u32, name: &str) -> NetResult<()> {
        check_name("rename", &format!("link #{index}"), name)?;
        self.set("rename", index, |b| b.name(name)).await
    }
    /// Makes `index` a port of `bridge`.
    pub async fn enslave(&self, index: u32, bridge: u32) -> NetResult<()> {
        self.set("enslave", index, |b| b.controller(bridge)).await
    }
    /// Detaches `index` from its bridge.
    pub async fn release(&self, index: u32) -> NetResult<()> {
        self.set("release", index, |b| b.nocontroller()).await
    }

    /// Moves a link into the namespace `netns` (an open namespace file), renaming it on the
    /// way when `new_name` is given. After this the link is only visible from there.
    pub async fn move_to_netns(
        &self,
        index: u32,
        netns: BorrowedFd<'_>,
        new_name: Option<&str>,
    ) -> NetResult<()> {
        if let Some(n) = new_name {
            check_name("move", &format!("link #{index}"), n)?;
        }
        let fd = netns.as_raw_fd();
        self.set("move", index, |b| {
            let b = b.setns_by_fd(fd);
            match new_name {
                Some(n) => b.name(n),
                None => b,
            }
        })
        .await
    }

    pub async fn delete(&self, index: u32) -> NetResult<()> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|e| nl_err("delete", format!("link #{index}"), e))
    }

    /// Deletes many links with one RTM_DELLINK: moves them into a fresh link group, then
    /// deletes the group. The kernel then pays its per-deletion synchronisation once, not once
    /// per link. Links that are already gone are skipped.
    pub async fn delete_many(&self, indexes: &[u32]) -> NetResult<()> {
        match indexes {
            [] => return Ok(()),
            // One link: a plain delete is one request instead of two.
            [one] => {
                return match self.delete(*one).await {
                    Err(e) if e.is_not_found() => Ok(()),
                    other => other,
                };
            }
            _ => {}
        }
        let group = batch_group();
        // Owned indexes: a closure over `&u32` makes this future not `Send` for every
        // lifetime (a rustc limitation), and callers spawn it.
        let owned: Vec<u32> = indexes.to_vec();
        stream::iter(owned.into_iter().map(|i| async move {
            match self.set_group(i, group).await {
                Err(e) if e.is_not_found() => Ok(()),
                other => other,
            }
        }))
        .buffer_unordered(PIPELINE)
        .try_collect::<Vec<()>>()
        .await?;
        self.delete_group(group).await
    }

    /// Deletes every link in `group` (`ip link delete group N`). Group 0 is every link's
    /// default and is refused.
    pub async fn delete_group(&self, group: u32) -> NetResult<()> {
        let object = format!("link group {group}");
        if group == 0 {
            return Err(NetError::invalid(
                "delete",
                object,
                "group 0 holds every link by default",
            ));
        }
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::Group(group));
        let mut req = NetlinkMessage::from(RouteNetlinkMessage::DelLink(msg));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        match self.request("delete", &object, req).await {
            Err(e) if e.is_not_found() => Ok(()),
            other => other.map(drop),
        }
    }
}

fn check_alias(index: u32, alias: &str) -> NetResult<()> {
    if alias.len() > 255 {
        return Err(NetError::invalid(
            "set alias of",
            format!("link #{index}"),
            format!(
                "alias is {} bytes, the kernel keeps at most 255",
                alias.len()
            ),
        ));
    }
    Ok(())
}

/// Settings [`Netlink::update`] applies together; `None`/`false` leaves a setting alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkUpdate {
    pub mtu: Option<u32>,
    pub controller: Option<u32>,
    pub alias: Option<String>,
    pub up: bool,
}

/// A link group number unlikely to be used by anything else: high bit pattern, pid, counter.
fn batch_group() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed) & 0xff;
    0x7e00_0000 | ((std::process::id() & 0xffff) << 8) | n
}

fn absent_is_none(
    res: Result<Option<LinkMessage>, rtnetlink::Error>,
    op: &'static str,
    object: String,
) -> NetResult<Option<Link>> {
    match res {
        Ok(Some(m)) => Ok(Some(Link::from_message(&m))),
        Ok(None) => Ok(None),
        Err(e) => {
            let e = nl_err(op, object, e);
            if e.is_not_found() { Ok(None) } else { Err(e) }
        }
    }
}
