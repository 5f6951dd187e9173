//! The GRE datapaths' counters, published where other processes can read them (the
//! user-space engine counts here directly; the eBPF backend copies its maps here).
//!
//! The counters live in a shared memory mapping of `/run/tenet/tunnels/<netns inode>.stats`
//! (tmpfs): the datapath threads increment them in place, and `tenet tunnel stats` or
//! `tenet status` read the file at any moment without asking the agent — the same way one
//! reads the pinned maps of a BPF datapath. The file holds a header (who publishes, the
//! engine-wide drops) and one slot per tunnel. A slot's `seq` is 0 when free, odd while its
//! identity is being written and even once it is valid, so a reader never reports a slot
//! half re-used. The file goes when the engine stops; one left by a crashed agent names a
//! dead pid and readers skip it.

use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::num::NonZeroUsize;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::Release};

use nix::sys::mman::{MapFlags, ProtFlags, mmap, mmap_anonymous, munmap};
use serde::Serialize;
use tracing::{debug, warn};

use crate::process::DEFAULT_RUN_DIR;

const MAGIC: u64 = u64::from_le_bytes(*b"TNTGRE01");
/// Tunnels one file can describe; a namespace with more still forwards, but the extra
/// tunnels' counters stay private to the agent.
pub const SLOTS: usize = 4096;

/// Per-tunnel counters, in slot order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Counter {
    TxPackets,
    TxBytes,
    /// Frames that could not be sent (malformed offload metadata, send failures, too big).
    TxErrors,
    /// Of the errors: frames larger than the path allows (each may be answered with an ICMP).
    TxTooBig,
    /// ICMP fragmentation-needed / packet-too-big replies written into the tap.
    IcmpSent,
    RxPackets,
    RxBytes,
    /// Packets not delivered to the tap (write failures, ECN drops).
    RxErrors,
    /// Of the errors: CE outside, not ECN-capable inside (RFC 6040).
    RxEcnDropped,
    /// Inner packets whose ECN field the outer one changed (CE or ECT(1)).
    RxEcnMarked,
}

const COUNTERS: usize = Counter::RxEcnMarked as usize + 1;
const _: () = assert!(COUNTERS <= COUNTER_SLOTS);
const COUNTER_SLOTS: usize = 18;

/// One tunnel's slot (192 bytes).
#[repr(C)]
pub struct Slot {
    seq: AtomicU64,
    name: [AtomicU64; 2],
    key: AtomicU32,
    local: AtomicU32,
    remote: AtomicU32,
    _pad: AtomicU32,
    counters: [AtomicU64; COUNTER_SLOTS],
    _reserved: AtomicU64,
}

impl Slot {
    #[inline]
    pub fn add(&self, c: Counter, n: u64) {
        self.counters[c as usize].fetch_add(n, Relaxed);
    }

    pub fn get(&self, c: Counter) -> u64 {
        self.counters[c as usize].load(Relaxed)
    }

    /// Publishes a counter kept elsewhere (the eBPF datapath's maps).
    pub fn set(&self, c: Counter, value: u64) {
        self.counters[c as usize].store(value, Relaxed);
    }
}

/// Engine-wide drops, counted before a packet reaches any tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// Not IPv4/GRE/Ethernet, truncated, bad checksum or unsupported GRE flags.
    Malformed,
    /// From a known peer, but with a key no tunnel to that peer uses (or no key).
    UnknownKey,
    /// From an address that is not the remote end of any tunnel.
    UnknownPeer,
}

#[repr(C)]
struct Header {
    magic: AtomicU64,
    pid: AtomicU64,
    netns_inode: AtomicU64,
    slots: AtomicU64,
    drops: [AtomicU64; 8],
    _reserved: [AtomicU64; 12],
}

const HEADER: usize = size_of::<Header>();
const LEN: usize = HEADER + SLOTS * size_of::<Slot>();

/// The mapping the engine counts in.
pub struct Region {
    base: NonNull<std::ffi::c_void>,
    /// The published file and its inode, to remove exactly it (and not a successor's).
    file: Option<(PathBuf, u64)>,
    free: std::sync::Mutex<Vec<usize>>,
}

// SAFETY: the mapping is only accessed through atomics.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

/// The directory the engines publish in.
pub fn stats_dir() -> PathBuf {
    Path::new(DEFAULT_RUN_DIR).join("tunnels")
}

/// The inode of the network namespace `netns` (`None`: the calling thread's).
pub fn netns_inode(netns: Option<&Path>) -> std::io::Result<u64> {
    let path = netns.unwrap_or(Path::new("/proc/thread-self/ns/net"));
    Ok(std::fs::metadata(path)?.ino())
}

impl Region {
    /// Maps `<dir>/<netns inode>.stats`; if the file cannot be made, the counters are kept
    /// in private memory (the datapath works the same, only nobody else can read them).
    pub fn publish(dir: &Path, netns_inode: u64) -> Arc<Region> {
        sweep(dir);
        let path = dir.join(format!("{netns_inode}.stats"));
        let region = match Self::map_file(&path) {
            Ok(r) => r,
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot publish tunnel counters; keeping them private");
                Self::map_private()
            }
        };
        let h = region.header();
        h.pid.store(u64::from(std::process::id()), Relaxed);
        h.netns_inode.store(netns_inode, Relaxed);
        h.slots.store(SLOTS as u64, Relaxed);
        h.magic.store(MAGIC, Release);
        Arc::new(region)
    }

    fn map_file(path: &Path) -> std::io::Result<Region> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // A fresh file, not the one a previous engine left: its counters start at zero.
        let _ = std::fs::remove_file(path);
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(LEN as u64)?;
        let inode = file.metadata()?.ino();
        // SAFETY: a fresh shared mapping of a file of LEN bytes; nothing else maps it in this
        // process, and it is unmapped only in Drop.
        let base = unsafe {
            mmap(
                None,
                NonZeroUsize::new(LEN).expect("non-zero"),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                file.as_fd(),
                0,
            )
        }
        .map_err(std::io::Error::from)?;
        debug!(path = %path.display(), "tunnel counters published");
        Ok(Region {
            base,
            file: Some((path.to_path_buf(), inode)),
            free: std::sync::Mutex::new((0..SLOTS).rev().collect()),
        })
    }

    /// Counters nobody else reads (for tunnels beyond what the published file holds).
    pub fn private() -> Arc<Region> {
        Arc::new(Self::map_private())
    }

    fn map_private() -> Region {
        // SAFETY: an anonymous private mapping; unmapped only in Drop.
        let base = unsafe {
            mmap_anonymous(
                None,
                NonZeroUsize::new(LEN).expect("non-zero"),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .expect("anonymous memory for the tunnel counters");
        Region {
            base,
            file: None,
            free: std::sync::Mutex::new((0..SLOTS).rev().collect()),
        }
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is LEN bytes, starts with a Header, and all-zero bytes are a
        // valid Header (atomics).
        unsafe { self.base.cast::<Header>().as_ref() }
    }

    fn slot_at(&self, i: usize) -> &Slot {
        assert!(i < SLOTS);
        // SAFETY: slot i lies inside the mapping (i < SLOTS) and is suitably aligned (the
        // header and slots are multiples of 8 bytes); all-zero bytes are a valid Slot.
        unsafe {
            &*self
                .base
                .as_ptr()
                .cast::<u8>()
                .add(HEADER + i * size_of::<Slot>())
                .cast::<Slot>()
        }
    }

    pub fn drop_counter(&self, d: DropReason) -> &AtomicU64 {
        &self.header().drops[d as usize]
    }

    /// Takes a free slot for a tunnel, zeroes its counters and publishes its identity;
    /// `None` when every slot is taken.
    pub fn claim(
        self: &Arc<Self>,
        name: &str,
        key: u32,
        local: Ipv4Addr,
        remote: Ipv4Addr,
    ) -> Option<SlotRef> {
        let i = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
        let s = self.slot_at(i);
        let seq = s.seq.load(Relaxed);
        s.seq.store(seq | 1, Release);
        let mut bytes = [0u8; 16];
        let n = name.len().min(16);
        bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
        s.name[0].store(
            u64::from_le_bytes(bytes[..8].try_into().expect("8")),
            Relaxed,
        );
        s.name[1].store(
            u64::from_le_bytes(bytes[8..].try_into().expect("8")),
            Relaxed,
        );
        s.key.store(key, Relaxed);
        s.local.store(u32::from(local), Relaxed);
        s.remote.store(u32::from(remote), Relaxed);
        for c in &s.counters {
            c.store(0, Relaxed);
        }
        s.seq.store((seq | 1) + 1, Release);
        Some(SlotRef {
            region: self.clone(),
            index: i,
        })
    }

    fn release(&self, i: usize) {
        let s = self.slot_at(i);
        s.seq.store(0, Release);
        self.free.lock().unwrap_or_else(|p| p.into_inner()).push(i);
    }
}

impl std::ops::Drop for Region {
    fn drop(&mut self) {
        if let Some((path, inode)) = &self.file {
            // Only our own file: a successor engine may already have replaced it.
            if std::fs::metadata(path).is_ok_and(|m| m.ino() == *inode) {
                let _ = std::fs::remove_file(path);
            }
        }
        // SAFETY: base/LEN is the mapping made in map_file/map_private, used by nobody now.
        unsafe {
            let _ = munmap(self.base, LEN);
        }
    }
}

/// A tunnel's claimed slot; dropping it frees the slot.
pub struct SlotRef {
    region: Arc<Region>,
    index: usize,
}

impl std::ops::Deref for SlotRef {
    type Target = Slot;
    fn deref(&self) -> &Slot {
        self.region.slot_at(self.index)
    }
}

impl std::ops::Drop for SlotRef {
    fn drop(&mut self) {
        self.region.release(self.index);
    }
}

/// A tunnel's counters as read from a stats file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublishedTunnel {
    pub name: String,
    pub key: u32,
    pub local: Ipv4Addr,
    pub remote: Ipv4Addr,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_errors: u64,
    pub tx_too_big: u64,
    pub icmp_sent: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub rx_ecn_dropped: u64,
    pub rx_ecn_marked: u64,
}

/// One engine's counters as read from its stats file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Published {
    /// The network namespace's inode (`ls -i /run/netns/NAME`, `stat -L /proc/PID/ns/net`).
    pub netns_inode: u64,
    pub pid: u32,
    pub malformed: u64,
    pub unknown_key: u64,
    pub unknown_peer: u64,
    pub tunnels: Vec<PublishedTunnel>,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Decodes a stats file's bytes; `None` if they are not one.
pub fn decode(bytes: &[u8]) -> Option<Published> {
    if bytes.len() < HEADER || u64_at(bytes, 0) != MAGIC {
        return None;
    }
    let slots = (u64_at(bytes, 24) as usize).min((bytes.len() - HEADER) / size_of::<Slot>());
    let drops = 32;
    let mut tunnels = Vec::new();
    for i in 0..slots {
        let s = &bytes[HEADER + i * size_of::<Slot>()..HEADER + (i + 1) * size_of::<Slot>()];
        let seq = u64_at(s, 0);
        if seq == 0 || seq % 2 == 1 {
            continue;
        }
        let name = String::from_utf8_lossy(&s[8..24])
            .trim_end_matches('\0')
            .to_string();
        let c = |k: Counter| u64_at(s, 40 + 8 * k as usize);
        tunnels.push(PublishedTunnel {
            name,
            key: u32_at(s, 24),
            local: Ipv4Addr::from(u32_at(s, 28)),
            remote: Ipv4Addr::from(u32_at(s, 32)),
            tx_packets: c(Counter::TxPackets),
            tx_bytes: c(Counter::TxBytes),
            tx_errors: c(Counter::TxErrors),
            tx_too_big: c(Counter::TxTooBig),
            icmp_sent: c(Counter::IcmpSent),
            rx_packets: c(Counter::RxPackets),
            rx_bytes: c(Counter::RxBytes),
            rx_errors: c(Counter::RxErrors),
            rx_ecn_dropped: c(Counter::RxEcnDropped),
            rx_ecn_marked: c(Counter::RxEcnMarked),
        });
    }
    tunnels.sort_by(|a, b| a.name.cmp(&b.name));
    Some(Published {
        netns_inode: u64_at(bytes, 16),
        pid: u64_at(bytes, 8) as u32,
        malformed: u64_at(bytes, drops + 8 * DropReason::Malformed as usize),
        unknown_key: u64_at(bytes, drops + 8 * DropReason::UnknownKey as usize),
        unknown_peer: u64_at(bytes, drops + 8 * DropReason::UnknownPeer as usize),
        tunnels,
    })
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes the files of engines whose process is gone (an agent killed with SIGKILL cannot
/// remove its own). A file whose header is not written yet is left alone: its engine may be
/// starting right now.
fn sweep(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "stats") {
            continue;
        }
        let mut header = [0u8; 32];
        let read =
            File::open(&path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut header));
        if read.is_ok() && u64_at(&header, 0) == MAGIC && !alive(u64_at(&header, 8) as u32) {
            debug!(path = %path.display(), "removing the counters of a dead engine");
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Every live engine's counters published in `dir` (files of dead agents are skipped).
pub fn read_all(dir: &Path) -> std::io::Result<Vec<Published>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "stats") {
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        match decode(&bytes) {
            Some(p) if alive(p.pid) => out.push(p),
            Some(p) => {
                debug!(path = %path.display(), pid = p.pid, "stats of a dead engine; skipped")
            }
            None => debug!(path = %path.display(), "not a tunnel stats file; skipped"),
        }
    }
    out.sort_by_key(|p| p.netns_inode);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_what_readers_decode() {
        assert_eq!(size_of::<Slot>(), 192);
        assert_eq!(HEADER, 192);
    }

    #[test]
    fn claimed_slots_are_published_and_freed() {
        let dir = tempfile::tempdir().unwrap();
        let region = Region::publish(dir.path(), 4242);
        let path = dir.path().join("4242.stats");
        let a = region
            .claim("tnt-gre-a", 7, [10, 0, 0, 1].into(), [10, 0, 0, 2].into())
            .unwrap();
        a.add(Counter::TxPackets, 3);
        a.add(Counter::RxEcnDropped, 1);
        region
            .drop_counter(DropReason::UnknownKey)
            .fetch_add(2, Relaxed);
        let read = decode(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!((read.netns_inode, read.pid), (4242, std::process::id()));
        assert_eq!(read.unknown_key, 2);
        assert_eq!(read.tunnels.len(), 1);
        let t = &read.tunnels[0];
        assert_eq!((t.name.as_str(), t.key, t.tx_packets), ("tnt-gre-a", 7, 3));
        assert_eq!(
            (t.remote, t.rx_ecn_dropped),
            (Ipv4Addr::new(10, 0, 0, 2), 1)
        );
        assert_eq!(read_all(dir.path()).unwrap(), vec![read]);

        // A freed slot disappears; a re-claimed one starts from zero.
        drop(a);
        assert!(
            decode(&std::fs::read(&path).unwrap())
                .unwrap()
                .tunnels
                .is_empty()
        );
        let b = region
            .claim("b", 8, [10, 0, 0, 1].into(), [10, 0, 0, 3].into())
            .unwrap();
        assert_eq!(b.get(Counter::TxPackets), 0);
        drop(b);
        drop(region);
        assert!(!path.exists(), "the file goes with the engine");
    }

    #[test]
    fn a_new_engine_sweeps_the_files_of_dead_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut dead = vec![0u8; 64];
        dead[..8].copy_from_slice(&MAGIC.to_le_bytes());
        dead[8..16].copy_from_slice(&(u32::MAX as u64).to_le_bytes());
        std::fs::write(dir.path().join("1.stats"), &dead).unwrap();
        // Not yet written by its (maybe starting) engine: kept.
        std::fs::write(dir.path().join("2.stats"), [0u8; 64]).unwrap();
        let _live = Region::publish(dir.path(), 3);
        assert!(!dir.path().join("1.stats").exists());
        assert!(dir.path().join("2.stats").exists());
        assert!(dir.path().join("3.stats").exists());
    }

    #[test]
    fn garbage_and_dead_engines_are_skipped() {
        assert_eq!(decode(b"not a stats file"), None);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("1.stats"), [0u8; 10]).unwrap();
        let mut dead = vec![0u8; LEN];
        dead[..8].copy_from_slice(&MAGIC.to_le_bytes());
        dead[8..16].copy_from_slice(&(u32::MAX as u64).to_le_bytes());
        std::fs::write(dir.path().join("2.stats"), dead).unwrap();
        assert!(read_all(dir.path()).unwrap().is_empty());
    }
}
