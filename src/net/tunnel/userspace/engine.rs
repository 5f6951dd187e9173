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

use super::wire::{self, IPPROTO_GRE, Malformed, TX_HEADER_LEN};
use crate::net::{NetError, NetResult, netns};

/// Frames per sendmmsg/recvmmsg batch.
const BATCH: usize = 32;
/// Largest IPv4 packet, and so the largest frame plus headers that can appear.
const SLOT: usize = 65536;
/// Batches served from one tap before giving the others a turn.
const TX_ROUNDS: usize = 8;
const STOP_TOKEN: u64 = u64::MAX;
const SOCKET_BUFFER: libc::c_int = 8 << 20;

/// One tunnel as the engine sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub name: String,
    pub key: u32,
    pub local: Ipv4Addr,
    pub remote: Ipv4Addr,
}

/// Per-tunnel packet counters.
#[derive(Debug, Default)]
struct PortCounters {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    tx_errors: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    rx_errors: AtomicU64,
}

struct Port {
    endpoint: Endpoint,
    tap: OwnedFd,
    counters: PortCounters,
}

/// Drops counted before a packet reaches any tunnel.
#[derive(Debug, Default)]
struct DropCounters {
    malformed: AtomicU64,
    unknown_key: AtomicU64,
    unknown_peer: AtomicU64,
}

/// A snapshot of one tunnel's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelStats {
    pub endpoint: Endpoint,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_errors: u64,
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
    next_token: u64,
}

impl PortTable {
    fn knows_peer(&self, peer: Ipv4Addr) -> bool {
        self.by_flow.keys().any(|(remote, _, _)| *remote == peer)
    }
}

struct Shared {
    socket: OwnedFd,
    epoll: Epoll,
    ports: RwLock<PortTable>,
    drops: DropCounters,
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

fn raw_gre_socket() -> NetResult<OwnedFd> {
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
    Ok(sock)
}

impl GreEngine {
    /// Opens the raw GRE socket inside `netns` (`None`: here) and starts the threads.
    pub fn start(netns: Option<&Path>) -> NetResult<Self> {
        let socket = netns::run_in(netns, raw_gre_socket)?;
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
            epoll,
            ports: RwLock::new(PortTable::default()),
            drops: DropCounters::default(),
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
        let token = table.next_token;
        table.next_token += 1;
        let port = Arc::new(Port {
            endpoint: endpoint.clone(),
            tap,
            counters: PortCounters::default(),
        });
        self.shared
            .epoll
            .add(
                port.tap.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, token),
            )
            .map_err(|e| NetError::new("attach", &object, std::io::Error::from(e)))?;
        table.by_flow.insert(flow, port.clone());
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
        let d = &self.shared.drops;
        let mut tunnels: Vec<_> = table
            .by_token
            .values()
            .map(|p| {
                let c = &p.counters;
                TunnelStats {
                    endpoint: p.endpoint.clone(),
                    tx_packets: c.tx_packets.load(Relaxed),
                    tx_bytes: c.tx_bytes.load(Relaxed),
                    tx_errors: c.tx_errors.load(Relaxed),
                    rx_packets: c.rx_packets.load(Relaxed),
                    rx_bytes: c.rx_bytes.load(Relaxed),
                    rx_errors: c.rx_errors.load(Relaxed),
                }
            })
            .collect();
        tunnels.sort_by(|a, b| a.endpoint.name.cmp(&b.endpoint.name));
        EngineStats {
            malformed: d.malformed.load(Relaxed),
            unknown_key: d.unknown_key.load(Relaxed),
            unknown_peer: d.unknown_peer.load(Relaxed),
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

/// Preallocated buffers for one thread's batches.
struct Slots {
    data: Vec<u8>,
    lens: [usize; BATCH],
}

impl Slots {
    fn new() -> Self {
        Slots {
            data: vec![0; BATCH * SLOT],
            lens: [0; BATCH],
        }
    }
    fn ptr(&mut self, i: usize) -> *mut u8 {
        debug_assert!(i < BATCH);
        // SAFETY: i < BATCH, so the offset stays inside `data`.
        unsafe { self.data.as_mut_ptr().add(i * SLOT) }
    }
    fn slot(&self, i: usize) -> &[u8] {
        &self.data[i * SLOT..i * SLOT + self.lens[i]]
    }
}

fn tx_loop(shared: &Shared) {
    let mut events = [EpollEvent::empty(); 64];
    let mut slots = Slots::new();
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
                forward_from_tap(shared, &port, &mut slots);
            }
        }
    }
}

/// Reads what the tap has (a bounded number of batches) and sends it to the peer.
fn forward_from_tap(shared: &Shared, port: &Port, slots: &mut Slots) {
    let tap = port.tap.as_raw_fd();
    let mut header = [0u8; TX_HEADER_LEN];
    wire::write_header(&mut header, port.endpoint.key);
    for _ in 0..TX_ROUNDS {
        let mut count = 0;
        while count < BATCH {
            let buf = slots.ptr(count);
            // SAFETY: the slot has SLOT bytes; we read at most SLOT - header into its tail.
            let n = unsafe { libc::read(tap, buf.add(TX_HEADER_LEN).cast(), SLOT - TX_HEADER_LEN) };
            if n <= 0 {
                if n < 0 && last_os_error().kind() != std::io::ErrorKind::WouldBlock {
                    port.counters.tx_errors.fetch_add(1, Relaxed);
                }
                break;
            }
            // SAFETY: the header fits in the slot's first TX_HEADER_LEN bytes.
            unsafe { std::ptr::copy_nonoverlapping(header.as_ptr(), buf, TX_HEADER_LEN) };
            slots.lens[count] = n as usize + TX_HEADER_LEN;
            count += 1;
        }
        if count == 0 {
            return;
        }
        send_batch(shared, port, slots, count);
        if count < BATCH {
            return;
        }
    }
}

#[repr(C)]
struct PktinfoCmsg {
    hdr: libc::cmsghdr,
    info: libc::in_pktinfo,
}

fn send_batch(shared: &Shared, port: &Port, slots: &mut Slots, count: usize) {
    let e = &port.endpoint;
    // SAFETY (whole block): every pointer placed in the message headers points into locals
    // or `slots`, all of which outlive the sendmmsg calls below.
    unsafe {
        let mut addr: libc::sockaddr_in = zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from(e.remote).to_be();
        // The source address is the tunnel's local end, whatever the routing table prefers.
        let mut cmsg: PktinfoCmsg = zeroed();
        cmsg.hdr.cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as usize;
        cmsg.hdr.cmsg_level = libc::IPPROTO_IP;
        cmsg.hdr.cmsg_type = libc::IP_PKTINFO;
        cmsg.info.ipi_spec_dst.s_addr = u32::from(e.local).to_be();
        let with_source = !e.local.is_unspecified();
        let mut iov: [libc::iovec; BATCH] = zeroed();
        let mut msgs: [libc::mmsghdr; BATCH] = zeroed();
        for i in 0..count {
            iov[i].iov_base = slots.ptr(i).cast();
            iov[i].iov_len = slots.lens[i];
            let h = &mut msgs[i].msg_hdr;
            h.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
            h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
            if with_source {
                h.msg_control = (&mut cmsg as *mut PktinfoCmsg).cast();
                h.msg_controllen = libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) as usize;
            }
        }
        let fd = shared.socket.as_raw_fd();
        let mut sent = 0;
        while sent < count {
            let r = libc::sendmmsg(fd, msgs.as_mut_ptr().add(sent), (count - sent) as u32, 0);
            if r < 0 {
                if last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // The first message of the rest failed (e.g. EMSGSIZE): count it, go on.
                port.counters.tx_errors.fetch_add(1, Relaxed);
                sent += 1;
                continue;
            }
            for m in &msgs[sent..sent + r as usize] {
                port.counters.tx_packets.fetch_add(1, Relaxed);
                port.counters
                    .tx_bytes
                    .fetch_add((m.msg_len as usize - TX_HEADER_LEN) as u64, Relaxed);
            }
            sent += r as usize;
        }
    }
}

fn rx_loop(shared: &Shared, stop_fd: RawFd) {
    let sock = shared.socket.as_raw_fd();
    let mut slots = Slots::new();
    // SAFETY: zeroed iovec/mmsghdr arrays are valid "empty" values.
    let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    for i in 0..BATCH {
        iov[i].iov_base = slots.ptr(i).cast();
        iov[i].iov_len = SLOT;
        msgs[i].msg_hdr.msg_iov = &mut iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
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
            // SAFETY: msgs/iov point into `slots`, alive for the whole loop.
            let n = unsafe {
                libc::recvmmsg(
                    sock,
                    msgs.as_mut_ptr(),
                    BATCH as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n <= 0 {
                break;
            }
            let n = n as usize;
            for (len, m) in slots.lens.iter_mut().zip(&msgs[..n]) {
                *len = m.msg_len as usize;
            }
            let table = shared.ports.read().expect("port table poisoned");
            for i in 0..n {
                deliver(shared, &table, slots.slot(i));
            }
            drop(table);
            if n < BATCH {
                break;
            }
        }
    }
}

fn deliver(shared: &Shared, table: &PortTable, packet: &[u8]) {
    let d = &shared.drops;
    let pkt = match wire::parse(packet) {
        Ok(p) => p,
        Err(Malformed::Truncated)
        | Err(Malformed::UnsupportedFlags)
        | Err(Malformed::NotEthernet)
        | Err(Malformed::BadChecksum) => {
            d.malformed.fetch_add(1, Relaxed);
            return;
        }
    };
    let port = pkt
        .key
        .and_then(|k| table.by_flow.get(&(pkt.source, pkt.destination, k)));
    let Some(port) = port else {
        if table.knows_peer(pkt.source) {
            d.unknown_key.fetch_add(1, Relaxed);
        } else {
            d.unknown_peer.fetch_add(1, Relaxed);
        }
        return;
    };
    // SAFETY: writing a borrowed, initialised slice to the tap descriptor.
    let w = unsafe {
        libc::write(
            port.tap.as_raw_fd(),
            pkt.frame.as_ptr().cast(),
            pkt.frame.len(),
        )
    };
    if w < 0 {
        port.counters.rx_errors.fetch_add(1, Relaxed);
    } else {
        port.counters.rx_packets.fetch_add(1, Relaxed);
        port.counters
            .rx_bytes
            .fetch_add(pkt.frame.len() as u64, Relaxed);
    }
}
