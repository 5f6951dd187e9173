//! The user-space GRE datapath: two threads per namespace.
//!
//! * **tx** waits (epoll) on every tunnel's tap, reads frames in batches straight into
//!   buffers that leave room for the GRE header in front, and sends each batch to the peer
//!   with one `sendmmsg` on the namespace's raw protocol-47 socket.
//! * **rx** receives batches with `recvmmsg`, parses each packet in place and writes the inner
//!   frame to the tap chosen by (source, destination, key).
//!
//! Buffers are allocated once per thread; the hot path neither allocates nor copies. The
//! taps are persistent: stopping the engine closes its descriptors but leaves the devices, and
//! a new engine attaches to them again.

use std::collections::HashMap;
use std::mem::{size_of, zeroed};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tracing::{debug, info, warn};

use super::ecn::{self, Decap};
use super::offload::{
    Coalescer, F_NEEDS_CSUM, GSO_ECN, GSO_NONE, GSO_TCPV4, TcpSegmenter, VNET_HDR_LEN, VnetHdr,
    complete_checksum, mergeable_segment, oversized_tcp, partial_checksum,
};
use super::pmtu::{self, QUOTE_ROOM};
use super::stats::{self, Counter, DropReason, Region, SlotRef, netns_inode, stats_dir};
use super::wire::{self, IPPROTO_GRE, TX_HEADER_LEN};
use crate::net::{NetError, NetResult, netns};

/// Packets per recvmmsg batch.
const RX_BATCH: usize = 64;
/// Frames read from one tap before the resulting segments are sent.
const TX_FRAMES: usize = 16;
/// Messages per sendmmsg: 16 super-frames of ~45 segments each.
const TX_MSGS: usize = 1024;
/// Per-message room for the GRE header and a copy of the inner Ethernet/IP/TCP headers.
const HDR_ROOM: usize = 192;
/// A vnet header plus the largest frame a tap can hand over, or the largest IPv4 packet.
const SLOT: usize = VNET_HDR_LEN + 65550;
/// Rounds of TX_FRAMES served from one tap before giving the others a turn.
const TX_ROUNDS: usize = 4;
const STOP_TOKEN: u64 = u64::MAX;
const SOCKET_BUFFER: libc::c_int = 8 << 20;

/// One tunnel as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub name: String,
    pub key: u32,
    pub local: Ipv4Addr,
    pub remote: Ipv4Addr,
    /// A fixed outer TTL; `None` inherits the inner packet's (gretap's `ttl inherit`).
    pub ttl: Option<u8>,
}

struct Port {
    endpoint: Endpoint,
    tap: OwnedFd,
    /// The tap's MTU when it was attached: a larger TCP frame from the peer is a super-frame.
    mtu: usize,
    counters: SlotRef,
}

/// A snapshot of one tunnel's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelStats {
    pub endpoint: Endpoint,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
    /// Of the tx errors: frames larger than the path MTU allows.
    pub tx_too_big: u64,
    /// ICMP fragmentation-needed / packet-too-big replies sent to tenant senders.
    pub icmp_sent: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    /// Of the rx errors: CE outside over a not-ECT packet inside (RFC 6040 drop).
    pub rx_ecn_dropped: u64,
    /// Inner packets marked CE (or ECT(1)) from the outer header.
    pub rx_ecn_marked: u64,
}

/// A snapshot of the engine's counters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EngineStats {
    /// Not IPv4/GRE/Ethernet, truncated, bad checksum or unsupported GRE flags.
    pub malformed: u64,
    /// From a known peer, but with a key no tunnel to that peer uses (or no key).
    pub unknown_key: u64,
    /// From an address that is not the remote end of any tunnel.
    pub unknown_peer: u64,
    pub tunnels: Vec<TunnelStats>,
}

#[derive(Default)]
struct PortTable {
    by_token: HashMap<u64, Arc<Port>>,
    /// (remote, local, key) → port: the same demultiplexing as kernel gretap.
    by_flow: HashMap<(Ipv4Addr, Ipv4Addr, u32), Arc<Port>>,
    by_name: HashMap<String, u64>,
    /// Tunnels per remote address, to tell an unknown key from an unknown peer in O(1).
    peers: HashMap<Ipv4Addr, usize>,
    next_token: u64,
}

impl PortTable {
    fn knows_peer(&self, peer: Ipv4Addr) -> bool {
        self.peers.contains_key(&peer)
    }
}

struct Shared {
    socket: OwnedFd,
    /// A UDP socket in the same namespace, connected to a peer only to read the path MTU
    /// the kernel learned for it (IP_MTU).
    probe: OwnedFd,
    epoll: Epoll,
    ports: RwLock<PortTable>,
    /// Where the counters live: the published file, then private memory if it is full.
    counters: [Arc<Region>; 2],
}

impl Shared {
    fn drop_counter(&self, d: DropReason) -> &AtomicU64 {
        self.counters[0].drop_counter(d)
    }
}

/// The running datapath of one network namespace.
pub struct GreEngine {
    shared: Arc<Shared>,
    stop: OwnedFd,
    threads: Vec<JoinHandle<()>>,
}

fn os_err<'a>(op: &'static str, object: &'a str) -> impl FnOnce(std::io::Error) -> NetError + 'a {
    move |e| NetError::new(op, object, e)
}

fn last_os_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn set_int_opt(fd: RawFd, level: libc::c_int, opt: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: plain setsockopt with a c_int value that outlives the call.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

pub(crate) fn raw_gre_socket() -> NetResult<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            IPPROTO_GRE,
        )
    };
    if fd < 0 {
        return Err(NetError::new("open", "raw GRE socket", last_os_error()));
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // Bursts of a fast sender must not overflow the default ~200 KB buffers; FORCE needs
    // CAP_NET_ADMIN, so fall back to the capped variant.
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if !set_int_opt(fd, libc::SOL_SOCKET, force, SOCKET_BUFFER) {
            set_int_opt(fd, libc::SOL_SOCKET, plain, SOCKET_BUFFER);
        }
    }
    // DF on every outer packet and no fragmentation by the kernel: a frame that does not fit
    // the path fails with EMSGSIZE and its sender is told the tunnel MTU (gretap's pmtudisc).
    if !set_int_opt(
        fd,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DO,
    ) {
        return Err(NetError::new(
            "set IP_MTU_DISCOVER on",
            "raw GRE socket",
            last_os_error(),
        ));
    }
    Ok(sock)
}

fn udp_probe_socket() -> NetResult<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetError::new(
            "open",
            "path MTU probe socket",
            last_os_error(),
        ));
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The MTU of link `name`, asked through `socket` (which lives in the link's namespace).
fn link_mtu(socket: RawFd, name: &str) -> Option<usize> {
    // SAFETY: an all-zero ifreq is valid; the name is copied in bounds below.
    let mut req: libc::ifreq = unsafe { zeroed() };
    if name.len() >= req.ifr_name.len() {
        return None;
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU reads the name and writes ifru_mtu inside `req`.
    if unsafe { libc::ioctl(socket, libc::SIOCGIFMTU, &mut req) } != 0 {
        return None;
    }
    // SAFETY: on success the kernel filled ifru_mtu.
    Some(unsafe { req.ifr_ifru.ifru_mtu } as usize)
}

/// The path MTU the kernel knows towards `remote` (learned from ICMP, or the route's).
fn path_mtu(probe: RawFd, remote: Ipv4Addr) -> Option<u32> {
    // SAFETY: an all-zero sockaddr_in is valid; the fields are set below.
    let mut addr: libc::sockaddr_in = unsafe { zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_port = 9u16.to_be();
    addr.sin_addr.s_addr = u32::from(remote).to_be();
    let mut mtu: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: connect and getsockopt with pointers to live locals of the sizes given. A UDP
    // connect sends nothing; it only looks the route up.
    let ok = unsafe {
        libc::connect(
            probe,
            (&addr as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) == 0
            && libc::getsockopt(
                probe,
                libc::IPPROTO_IP,
                libc::IP_MTU,
                (&mut mtu as *mut libc::c_int).cast(),
                &mut len,
            ) == 0
    };
    (ok && mtu > 0).then_some(mtu as u32)
}

impl GreEngine {
    /// Opens the raw GRE socket inside `netns` (`None`: here) and starts the threads.
    pub fn start(netns: Option<&Path>) -> NetResult<Self> {
        let (socket, probe, inode) = netns::run_in(netns, || {
            let inode =
                netns_inode(None).map_err(|e| NetError::new("identify", "network namespace", e))?;
            Ok((raw_gre_socket()?, udp_probe_socket()?, inode))
        })?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| NetError::new("create", "epoll", std::io::Error::from(e)))?;
        // SAFETY: eventfd(2) with constant flags; checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(NetError::new("create", "eventfd", last_os_error()));
        }
        // SAFETY: efd was just created and is owned by nobody else.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        epoll
            .add(
                stop.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, STOP_TOKEN),
            )
            .map_err(|e| NetError::new("watch", "eventfd", std::io::Error::from(e)))?;
        let shared = Arc::new(Shared {
            socket,
            probe,
            epoll,
            ports: RwLock::new(PortTable::default()),
            counters: [Region::publish(&stats_dir(), inode), Region::private()],
        });
        let tx = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("tenet-gre-tx".into())
                .spawn(move || tx_loop(&shared))
                .map_err(os_err("spawn", "GRE tx thread"))?
        };
        let rx = {
            let shared = shared.clone();
            let stop_fd = stop.as_raw_fd();
            std::thread::Builder::new()
                .name("tenet-gre-rx".into())
                .spawn(move || rx_loop(&shared, stop_fd))
                .map_err(os_err("spawn", "GRE rx thread"))?
        };
        info!(netns = ?netns, "user-space GRE engine started");
        Ok(GreEngine {
            shared,
            stop,
            threads: vec![tx, rx],
        })
    }

    /// Starts forwarding between `tap` (a descriptor of the tunnel's tap, non-blocking) and
    /// the peer. Replaces an earlier attachment of the same name.
    pub fn attach(&self, endpoint: Endpoint, tap: OwnedFd) -> NetResult<()> {
        let object = format!("tunnel {}", endpoint.name);
        if endpoint.key == 0 {
            return Err(NetError::invalid(
                "attach",
                object,
                "tunnel key 0 is invalid",
            ));
        }
        self.detach(&endpoint.name);
        let mut table = self.shared.ports.write().expect("port table poisoned");
        let flow = (endpoint.remote, endpoint.local, endpoint.key);
        if let Some(other) = table.by_flow.get(&flow) {
            return Err(NetError::invalid(
                "attach",
                object,
                format!(
                    "tunnel {} already carries key {} from {}",
                    other.endpoint.name, endpoint.key, endpoint.remote
                ),
            ));
        }
        let e = &endpoint;
        let counters = self
            .shared
            .counters
            .iter()
            .find_map(|r| r.claim(&e.name, e.key, e.local, e.remote))
            .ok_or_else(|| {
                NetError::invalid(
                    "attach",
                    &object,
                    format!(
                        "no room for more than {} tunnels' counters",
                        2 * stats::SLOTS
                    ),
                )
            })?;
        let token = table.next_token;
        table.next_token += 1;
        let port = Arc::new(Port {
            mtu: link_mtu(self.shared.socket.as_raw_fd(), &endpoint.name).unwrap_or(1500),
            endpoint: endpoint.clone(),
            tap,
            counters,
        });
        self.shared
            .epoll
            .add(
                port.tap.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, token),
            )
            .map_err(|e| NetError::new("attach", &object, std::io::Error::from(e)))?;
        table.by_flow.insert(flow, port.clone());
        *table.peers.entry(endpoint.remote).or_default() += 1;
        table.by_name.insert(endpoint.name.clone(), token);
        table.by_token.insert(token, port);
        debug!(tunnel = %endpoint.name, key = endpoint.key, remote = %endpoint.remote, "tunnel attached");
        Ok(())
    }

    /// Stops forwarding for `name`; returns whether it was attached. The tap stays.
    pub fn detach(&self, name: &str) -> bool {
        let mut table = self.shared.ports.write().expect("port table poisoned");
        let Some(token) = table.by_name.remove(name) else {
            return false;
        };
        if let Some(port) = table.by_token.remove(&token) {
            let e = &port.endpoint;
            table.by_flow.remove(&(e.remote, e.local, e.key));
            if let Some(n) = table.peers.get_mut(&e.remote) {
                *n -= 1;
                if *n == 0 {
                    table.peers.remove(&e.remote);
                }
            }
            let _ = self.shared.epoll.delete(port.tap.as_fd());
        }
        debug!(tunnel = name, "tunnel detached");
        true
    }

    pub fn endpoints(&self) -> Vec<Endpoint> {
        let table = self.shared.ports.read().expect("port table poisoned");
        let mut v: Vec<_> = table
            .by_token
            .values()
            .map(|p| p.endpoint.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    pub fn stats(&self) -> EngineStats {
        let table = self.shared.ports.read().expect("port table poisoned");
        let mut tunnels: Vec<_> = table
            .by_token
            .values()
            .map(|p| {
                let c = &p.counters;
                TunnelStats {
                    endpoint: p.endpoint.clone(),
                    tx_packets: c.get(Counter::TxPackets),
                    tx_bytes: c.get(Counter::TxBytes),
                    tx_errors: c.get(Counter::TxErrors),
                    tx_too_big: c.get(Counter::TxTooBig),
                    icmp_sent: c.get(Counter::IcmpSent),
                    rx_packets: c.get(Counter::RxPackets),
                    rx_bytes: c.get(Counter::RxBytes),
                    rx_errors: c.get(Counter::RxErrors),
                    rx_ecn_dropped: c.get(Counter::RxEcnDropped),
                    rx_ecn_marked: c.get(Counter::RxEcnMarked),
                }
            })
            .collect();
        tunnels.sort_by(|a, b| a.endpoint.name.cmp(&b.endpoint.name));
        let d = |r| self.shared.drop_counter(r).load(Relaxed);
        EngineStats {
            malformed: d(DropReason::Malformed),
            unknown_key: d(DropReason::UnknownKey),
            unknown_peer: d(DropReason::UnknownPeer),
            tunnels,
        }
    }

    /// Stops both threads and closes every descriptor; the taps remain.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        info!("user-space GRE engine stopped");
    }
}

impl Drop for GreEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn tx_loop(shared: &Shared) {
    let mut events = [EpollEvent::empty(); 64];
    let mut tx = TxBatch::new();
    loop {
        let n = match shared.epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                warn!(error = %e, "GRE tx: epoll failed; stopping");
                return;
            }
        };
        for ev in &events[..n] {
            if ev.data() == STOP_TOKEN {
                return;
            }
            let port = {
                let table = shared.ports.read().expect("port table poisoned");
                table.by_token.get(&ev.data()).cloned()
            };
            if let Some(port) = port {
                forward_from_tap(shared, &port, &mut tx);
            }
        }
    }
}

/// The ancillary data of one outer packet: the source address (the tunnel's local end,
/// whatever routing would prefer), the TOS byte carrying the inner ECN field and, last so
/// that it can be left out, the TTL.
#[repr(C)]
#[derive(Clone, Copy)]
struct TxControl {
    pktinfo_hdr: libc::cmsghdr,
    pktinfo: libc::in_pktinfo,
    tos_hdr: libc::cmsghdr,
    tos: libc::c_int,
    ttl_hdr: libc::cmsghdr,
    ttl: libc::c_int,
}

/// Byte lengths of the control block without and with the TTL message.
fn control_lengths() -> (usize, usize) {
    // SAFETY: CMSG_SPACE is pure arithmetic.
    let (pktinfo, int) = unsafe {
        (
            libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) as usize,
            libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) as usize,
        )
    };
    (pktinfo + int, pktinfo + 2 * int)
}

impl TxControl {
    fn new() -> Self {
        // SAFETY: all-zero cmsghdr/in_pktinfo/c_int values are valid.
        let mut c: TxControl = unsafe { zeroed() };
        // SAFETY: CMSG_LEN is pure arithmetic.
        let (pktinfo_len, int_len) = unsafe {
            (
                libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as usize,
                libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as usize,
            )
        };
        c.pktinfo_hdr.cmsg_len = pktinfo_len;
        c.pktinfo_hdr.cmsg_level = libc::IPPROTO_IP;
        c.pktinfo_hdr.cmsg_type = libc::IP_PKTINFO;
        c.tos_hdr.cmsg_len = int_len;
        c.tos_hdr.cmsg_level = libc::IPPROTO_IP;
        c.tos_hdr.cmsg_type = libc::IP_TOS;
        c.ttl_hdr.cmsg_len = int_len;
        c.ttl_hdr.cmsg_level = libc::IPPROTO_IP;
        c.ttl_hdr.cmsg_type = libc::IP_TTL;
        c
    }
}

/// What the outer header of a frame's packets carries.
#[derive(Clone, Copy)]
struct Outer {
    tos: u8,
    /// `None`: the namespace's default TTL (non-IP frames without a fixed TTL).
    ttl: Option<u8>,
}

impl Outer {
    fn of(frame: &[u8], fixed_ttl: Option<u8>) -> Self {
        Outer {
            tos: ecn::outer_tos(frame),
            ttl: fixed_ttl.or_else(|| ecn::inner_ttl(frame)),
        }
    }
}

/// ICMP replies to oversized frames: at most this many per second, in bursts of
/// `ICMP_BURST` (the kernel rate-limits its own the same way, per destination).
const ICMP_PER_SECOND: u32 = 100;
const ICMP_BURST: u32 = 20;

struct IcmpLimiter {
    tokens: u32,
    last: std::time::Instant,
}

impl IcmpLimiter {
    fn allow(&mut self) -> bool {
        let now = std::time::Instant::now();
        let earned = (now.duration_since(self.last).as_millis() as u64 * u64::from(ICMP_PER_SECOND)
            / 1000) as u32;
        if earned > 0 {
            self.tokens = (self.tokens + earned).min(ICMP_BURST);
            self.last = now;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// The send side's buffers, allocated once: frames as read from a tap, and one sendmmsg
/// batch of messages, each two iovecs: [GRE header + inner headers] and [payload in a frame].
struct TxBatch {
    frames: Vec<u8>,
    headers: Vec<u8>,
    iov: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    control: Vec<TxControl>,
    inner_len: Vec<usize>,
    count: usize,
    addr: Box<libc::sockaddr_in>,
    local: Ipv4Addr,
    icmp: IcmpLimiter,
}

// SAFETY: the raw pointers inside point into the struct's own heap buffers; it is used by one
// thread at a time.
unsafe impl Send for TxBatch {}

impl TxBatch {
    fn new() -> Self {
        // SAFETY: all-zero iovec, mmsghdr and sockaddr_in structs are valid values.
        let mut b = unsafe {
            TxBatch {
                frames: vec![0; TX_FRAMES * SLOT],
                headers: vec![0; TX_MSGS * HDR_ROOM],
                iov: vec![zeroed(); TX_MSGS * 2],
                msgs: vec![zeroed(); TX_MSGS],
                control: vec![TxControl::new(); TX_MSGS],
                inner_len: vec![0; TX_MSGS],
                count: 0,
                addr: Box::new(zeroed()),
                local: Ipv4Addr::UNSPECIFIED,
                icmp: IcmpLimiter {
                    tokens: ICMP_BURST,
                    last: std::time::Instant::now(),
                },
            }
        };
        b.addr.sin_family = libc::AF_INET as libc::sa_family_t;
        let addr: *mut libc::sockaddr_in = &mut *b.addr;
        for i in 0..TX_MSGS {
            let iov = b.iov[2 * i..].as_mut_ptr();
            let control: *mut TxControl = &mut b.control[i];
            let h = &mut b.msgs[i].msg_hdr;
            h.msg_name = addr.cast();
            h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = iov;
            h.msg_iovlen = 2;
            h.msg_control = control.cast();
        }
        b
    }

    fn set_destination(&mut self, e: &Endpoint) {
        self.addr.sin_addr.s_addr = u32::from(e.remote).to_be();
        self.local = e.local;
    }

    /// Queues a message: `header_len` bytes of message `count`'s header room, then `payload`.
    fn push(&mut self, header_len: usize, payload: *const u8, payload_len: usize, outer: Outer) {
        let c = self.count;
        self.iov[2 * c] = libc::iovec {
            iov_base: self.headers[c * HDR_ROOM..].as_mut_ptr().cast(),
            iov_len: header_len,
        };
        self.iov[2 * c + 1] = libc::iovec {
            iov_base: payload as *mut libc::c_void,
            iov_len: payload_len,
        };
        let control = &mut self.control[c];
        control.pktinfo.ipi_spec_dst.s_addr = u32::from(self.local).to_be();
        control.tos = libc::c_int::from(outer.tos);
        let (without_ttl, with_ttl) = control_lengths();
        self.msgs[c].msg_hdr.msg_controllen = match outer.ttl {
            Some(ttl) => {
                control.ttl = libc::c_int::from(ttl);
                with_ttl
            }
            None => without_ttl,
        };
        self.inner_len[c] = header_len - TX_HEADER_LEN + payload_len;
        self.count += 1;
    }

    fn header_room(&mut self) -> &mut [u8] {
        &mut self.headers[self.count * HDR_ROOM..(self.count + 1) * HDR_ROOM]
    }

    /// Turns the frame read into slot `k` (`n` bytes, vnet header first) into messages.
    fn add_frame(&mut self, shared: &Shared, port: &Port, k: usize, n: usize) {
        let errors = &port.counters;
        if n < VNET_HDR_LEN + 14 {
            errors.add(Counter::TxErrors, 1);
            return;
        }
        let slot = k * SLOT;
        let vh = VnetHdr::parse(
            self.frames[slot..slot + VNET_HDR_LEN]
                .try_into()
                .expect("10 bytes"),
        );
        let range = slot + VNET_HDR_LEN..slot + n;
        let mut gre = [0u8; TX_HEADER_LEN];
        wire::write_header(&mut gre, port.endpoint.key);
        let outer = Outer::of(&self.frames[range.clone()], port.endpoint.ttl);
        match vh.gso_type & !GSO_ECN {
            GSO_NONE => {
                let frame = &mut self.frames[range.clone()];
                if vh.flags & F_NEEDS_CSUM != 0
                    && !complete_checksum(
                        frame,
                        usize::from(vh.csum_start),
                        usize::from(vh.csum_offset),
                    )
                {
                    errors.add(Counter::TxErrors, 1);
                    return;
                }
                if self.count == TX_MSGS {
                    self.flush(shared, port);
                }
                self.header_room()[..TX_HEADER_LEN].copy_from_slice(&gre);
                let payload = self.frames[range.clone()].as_ptr();
                self.push(TX_HEADER_LEN, payload, range.len(), outer);
            }
            GSO_TCPV4 => {
                let frame_ptr = self.frames[range.clone()].as_ptr();
                // SAFETY: the slice covers slot k, which no message refers to mutably and
                // which is not written again before the batch is flushed.
                let frame = unsafe { std::slice::from_raw_parts(frame_ptr, range.len()) };
                let Some(seg) = TcpSegmenter::new(frame, &vh) else {
                    errors.add(Counter::TxErrors, 1);
                    return;
                };
                let need = seg.count();
                if need > TX_MSGS || seg.header_len() + TX_HEADER_LEN > HDR_ROOM {
                    errors.add(Counter::TxErrors, 1);
                    return;
                }
                if self.count + need > TX_MSGS {
                    self.flush(shared, port);
                }
                for i in 0..need {
                    let room = self.header_room();
                    room[..TX_HEADER_LEN].copy_from_slice(&gre);
                    let payload = seg.segment(frame, i, &mut room[TX_HEADER_LEN..]);
                    // SAFETY: `payload` is a range inside `frame`.
                    let ptr = unsafe { frame_ptr.add(payload.start) };
                    self.push(TX_HEADER_LEN + seg.header_len(), ptr, payload.len(), outer);
                }
            }
            _ => {
                errors.add(Counter::TxErrors, 1);
            }
        }
    }

    fn flush(&mut self, shared: &Shared, port: &Port) {
        let count = self.count;
        self.count = 0;
        let fd = shared.socket.as_raw_fd();
        let c = &port.counters;
        let mut sent = 0;
        while sent < count {
            // SAFETY: messages [sent, count) were filled by push(); every pointer in them
            // points into this struct's buffers, alive and unchanged during the call.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.msgs.as_mut_ptr().add(sent),
                    (count - sent) as u32,
                    0,
                )
            };
            if r < 0 {
                let err = last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // The first remaining message failed: count it, answer it if it was too big
                // for the path, go on with the rest.
                c.add(Counter::TxErrors, 1);
                if err.raw_os_error() == Some(libc::EMSGSIZE) {
                    c.add(Counter::TxTooBig, 1);
                    self.answer_too_big(shared, port, sent);
                }
                sent += 1;
                continue;
            }
            let r = r as usize;
            c.add(Counter::TxPackets, r as u64);
            let bytes: usize = self.inner_len[sent..sent + r].iter().sum();
            c.add(Counter::TxBytes, bytes as u64);
            sent += r;
        }
    }

    /// Tells the sender of message `m` (refused with EMSGSIZE) the tunnel MTU, as kernel
    /// gretap does: ICMP fragmentation-needed / packet-too-big, written into the tap.
    fn answer_too_big(&mut self, shared: &Shared, port: &Port, m: usize) {
        let Some(path) = path_mtu(shared.probe.as_raw_fd(), port.endpoint.remote) else {
            return;
        };
        let mtu = path.saturating_sub(super::super::GRE_OVERHEAD);
        // The start of the inner frame: the copied headers after the GRE header, then the
        // payload.
        let mut start = [0u8; QUOTE_ROOM];
        let mut len = 0;
        for (i, iov) in self.iov[2 * m..2 * m + 2].iter().enumerate() {
            let skip = if i == 0 { TX_HEADER_LEN } else { 0 };
            let avail = iov.iov_len.saturating_sub(skip);
            let take = avail.min(QUOTE_ROOM - len);
            // SAFETY: iov points to `iov_len` initialised bytes of this batch's buffers.
            let bytes =
                unsafe { std::slice::from_raw_parts(iov.iov_base.cast::<u8>().add(skip), take) };
            start[len..len + take].copy_from_slice(bytes);
            len += take;
        }
        let Some(reply) = pmtu::too_big_reply(&start[..len], mtu) else {
            return;
        };
        if !self.icmp.allow() {
            return;
        }
        if write_to_tap(port, &PLAIN_VNET_HDR, &reply) > 0 {
            port.counters.add(Counter::IcmpSent, 1);
            debug!(tunnel = %port.endpoint.name, path_mtu = path, mtu, "frame too big for the path; sender told the tunnel MTU");
        }
    }
}

/// Reads what the tap has (a bounded number of rounds) and sends it to the peer.
fn forward_from_tap(shared: &Shared, port: &Port, tx: &mut TxBatch) {
    let tap = port.tap.as_raw_fd();
    tx.set_destination(&port.endpoint);
    for _ in 0..TX_ROUNDS {
        let mut frames = 0;
        while frames < TX_FRAMES {
            let buf = tx.frames[frames * SLOT..].as_mut_ptr();
            // SAFETY: slot `frames` has SLOT writable bytes; no queued message refers to it
            // (slots are reused only after the flush below).
            let n = unsafe { libc::read(tap, buf.cast(), SLOT) };
            if n <= 0 {
                if n < 0 && last_os_error().kind() != std::io::ErrorKind::WouldBlock {
                    port.counters.add(Counter::TxErrors, 1);
                }
                break;
            }
            tx.add_frame(shared, port, frames, n as usize);
            frames += 1;
        }
        if tx.count > 0 {
            tx.flush(shared, port);
        }
        if frames < TX_FRAMES {
            return;
        }
    }
}

fn rx_loop(shared: &Shared, stop_fd: RawFd) {
    let sock = shared.socket.as_raw_fd();
    let mut data = vec![0u8; RX_BATCH * SLOT];
    // SAFETY: zeroed iovec/mmsghdr values are valid "empty" values.
    let mut iov: Vec<libc::iovec> = vec![unsafe { zeroed() }; RX_BATCH];
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { zeroed() }; RX_BATCH];
    for i in 0..RX_BATCH {
        iov[i].iov_base = data[i * SLOT..].as_mut_ptr().cast();
        iov[i].iov_len = SLOT;
        msgs[i].msg_hdr.msg_iov = &mut iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    let mut coalescer = Coalescer::new();
    let mut fds = [
        libc::pollfd {
            fd: sock,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop_fd,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: fds is a valid array of two pollfd.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            warn!(error = %last_os_error(), "GRE rx: poll failed; stopping");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        loop {
            // SAFETY: msgs/iov point into `data`, alive for the whole loop.
            let n = unsafe {
                libc::recvmmsg(
                    sock,
                    msgs.as_mut_ptr(),
                    RX_BATCH as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n <= 0 {
                break;
            }
            let n = n as usize;
            let table = shared.ports.read().expect("port table poisoned");
            let mut rx = Receiver {
                shared,
                table: &table,
                coalescer: &mut coalescer,
                pending: None,
                pending_bytes: 0,
            };
            for (m, buf) in msgs[..n].iter().zip(data.chunks_mut(SLOT)) {
                let len = (m.msg_len as usize).min(SLOT);
                rx.deliver(&mut buf[..len]);
            }
            rx.flush();
            drop(table);
            if n < RX_BATCH {
                break;
            }
        }
    }
}

/// One receive batch: demultiplexes packets to taps, merging runs of TCP segments.
struct Receiver<'a> {
    shared: &'a Shared,
    table: &'a PortTable,
    coalescer: &'a mut Coalescer,
    /// The tunnel the coalescer's run belongs to.
    pending: Option<&'a Arc<Port>>,
    pending_bytes: u64,
}

const PLAIN_VNET_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

impl<'a> Receiver<'a> {
    fn deliver(&mut self, packet: &mut [u8]) {
        let shared = self.shared;
        let Ok(pkt) = wire::parse(packet) else {
            shared
                .drop_counter(DropReason::Malformed)
                .fetch_add(1, Relaxed);
            return;
        };
        let table: &'a PortTable = self.table;
        let port = pkt
            .key
            .and_then(|k| table.by_flow.get(&(pkt.source, pkt.destination, k)));
        let Some(port) = port else {
            let reason = if table.knows_peer(pkt.source) {
                DropReason::UnknownKey
            } else {
                DropReason::UnknownPeer
            };
            shared.drop_counter(reason).fetch_add(1, Relaxed);
            return;
        };
        let frame = pkt.frame;
        match ecn::decapsulate(frame, pkt.tos) {
            Decap::Unchanged => {}
            Decap::Marked => port.counters.add(Counter::RxEcnMarked, 1),
            Decap::Drop => {
                port.counters.add(Counter::RxErrors, 1);
                port.counters.add(Counter::RxEcnDropped, 1);
                return;
            }
        }
        if let Some(vh) = oversized_tcp(frame, port.mtu) {
            self.flush();
            let mut hdr = [0u8; VNET_HDR_LEN];
            vh.write(&mut hdr);
            let segments = frame.len().div_ceil(usize::from(vh.gso_size).max(1)) as u64;
            let w = write_to_tap(port, &hdr, frame);
            count_rx(port, w, segments, frame.len() as u64);
            return;
        }
        let frame: &[u8] = frame;
        if let Some(seg) = mergeable_segment(frame) {
            let same_port = self.pending.is_some_and(|p| Arc::ptr_eq(p, port));
            if !(same_port && self.coalescer.try_append(frame, &seg)) {
                self.flush();
                self.coalescer.start(frame, &seg);
                self.pending = Some(port);
            }
            self.pending_bytes += frame.len() as u64;
            return;
        }
        self.flush();
        let mut partial = [0u8; VNET_HDR_LEN];
        let vnet = match partial_checksum(frame) {
            Some(vh) => {
                vh.write(&mut partial);
                &partial
            }
            None => &PLAIN_VNET_HDR,
        };
        let w = write_to_tap(port, vnet, frame);
        count_rx(port, w, 1, frame.len() as u64);
    }

    /// Writes the coalesced run, if any, to its tap.
    fn flush(&mut self) {
        let Some(port) = self.pending.take() else {
            return;
        };
        let segments = self.coalescer.segments() as u64;
        let out = self.coalescer.take();
        // SAFETY: writing an initialised slice to the tap descriptor.
        let w = unsafe { libc::write(port.tap.as_raw_fd(), out.as_ptr().cast(), out.len()) };
        count_rx(port, w, segments, std::mem::take(&mut self.pending_bytes));
    }
}

/// Writes one frame with its vnet header to the port's tap, in one call; what writev said.
fn write_to_tap(port: &Port, vnet: &[u8; VNET_HDR_LEN], frame: &[u8]) -> isize {
    let iov = [
        libc::iovec {
            iov_base: vnet.as_ptr() as *mut libc::c_void,
            iov_len: VNET_HDR_LEN,
        },
        libc::iovec {
            iov_base: frame.as_ptr() as *mut libc::c_void,
            iov_len: frame.len(),
        },
    ];
    // SAFETY: both iovecs point to initialised memory alive during the call.
    unsafe { libc::writev(port.tap.as_raw_fd(), iov.as_ptr(), 2) }
}

fn count_rx(port: &Port, written: isize, packets: u64, bytes: u64) {
    let c = &port.counters;
    if written < 0 {
        c.add(Counter::RxErrors, packets);
    } else {
        c.add(Counter::RxPackets, packets);
        c.add(Counter::RxBytes, bytes);
    }
}
