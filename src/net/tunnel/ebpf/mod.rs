//! The eBPF GRE backend: kernel gretap's wire format at kernel speed on kernels without
//! ip_gre, with two tc programs (`gre.bpf.c`, compiled by clang at build time and loaded with
//! aya).
//!
//! Each tunnel is a veth pair: the port (named as the tunnel, enslaved to the tenant bridge
//! like a gretap) runs the encapsulation program on its egress; its peer (`ep` + 8 hex of the
//! tunnel's name, up, otherwise unused) only gives the port its carrier — this kernel has no
//! `dummy`. The device holding the tunnel's local address runs the decapsulation program on
//! its ingress, which redirects into the port's ingress. The programs share four maps that this module fills: ports by ifindex, tunnels
//! by (peer, local, key), peers, and per-CPU counters per tunnel slot.
//!
//! The tc filters belong to the kernel, not to the agent: they keep forwarding while the
//! agent is down. A new agent loads the object again and *replaces* the filters on every
//! adopted port and underlay with its own programs and freshly filled maps (the tunnels come
//! from the ports' aliases), so nothing has to be pinned and nothing is left in bpffs.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tracing::{debug, info, warn};

use super::userspace::stats::{Counter, DropReason, Region, SlotRef, stats_dir};
use super::userspace::{Endpoint, EngineStats, TunnelStats};
use super::{
    GRE_OVERHEAD, TunnelBackend, TunnelKind, TunnelSpec, delete_named, existing, finish,
    tenant_mtu, tunnels_of,
};
use crate::net::link::Link;
use crate::net::new_link::NewLink;
use crate::net::{Leftovers, NetError, NetResult, Netlink, netns};

/// Tunnels one namespace's maps hold.
pub const MAX_TUNNELS: u32 = 8192;
/// Where tenet's filters sit: priority and handle on the ports' egress and the underlay's
/// ingress (a fixed place, so that a restarted agent replaces exactly its own).
const FILTER_PRIORITY: u16 = 0x7e4e;
const FILTER_HANDLE: u16 = 0x47;
const ENCAP: &str = "tenet_gre_encap";
const DECAP: &str = "tenet_gre_decap";

#[cfg(tenet_ebpf)]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gre.bpf.o"));

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    remote: u32,
    local: u32,
    key: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct FlowVal {
    ifindex: u32,
    slot: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct PortVal {
    local: u32,
    remote: u32,
    key: u32,
    slot: u32,
    ttl: u32,
}

const COUNTERS: usize = 10;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    v: [u64; COUNTERS],
}

// SAFETY: plain #[repr(C)] structs of integers without padding, as the BPF side lays them out.
unsafe impl aya::Pod for FlowKey {}
// SAFETY: as above.
unsafe impl aya::Pod for FlowVal {}
// SAFETY: as above.
unsafe impl aya::Pod for PortVal {}
// SAFETY: as above.
unsafe impl aya::Pod for Counters {}

/// An address as the programs compare it: the bytes in network order, read natively.
fn wire(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn bpf_err(op: &'static str, object: impl Into<String>, e: impl std::fmt::Display) -> NetError {
    NetError::new(op, object, std::io::Error::other(e.to_string()))
}

/// One tunnel the maps describe.
#[derive(Clone)]
struct Port {
    spec: TunnelSpec,
    ifindex: u32,
    slot: u32,
    /// Where `tenet tunnel stats` reads its counters (copied from the maps every second).
    published: Option<Arc<SlotRef>>,
}

/// The order of the programs' counters (`enum counter` in gre.bpf.c).
const COUNTER_ORDER: [Counter; COUNTERS] = [
    Counter::TxPackets,
    Counter::TxBytes,
    Counter::TxErrors,
    Counter::TxTooBig,
    Counter::IcmpSent,
    Counter::RxPackets,
    Counter::RxBytes,
    Counter::RxErrors,
    Counter::RxEcnDropped,
    Counter::RxEcnMarked,
];

/// How often the maps' counters are copied to the published file.
const PUBLISH_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

struct Datapath {
    bpf: aya::Ebpf,
    ports: HashMap<String, Port>,
    free: Vec<u32>,
    peers: HashMap<Ipv4Addr, u32>,
    /// Underlay devices (ifindex → name) whose ingress this process has given the
    /// decapsulation program; taken off again when the last tunnel goes.
    decap_on: HashMap<u32, String>,
}

pub struct EbpfGre {
    netlink: Netlink,
    netns: Option<PathBuf>,
    datapath: Arc<Mutex<Datapath>>,
    /// A raw GRE socket that is never read: without ip_gre, ICMP errors about GRE packets
    /// reach only raw sockets, and through this one the kernel learns the path MTU towards
    /// each peer (fragmentation needed), which the encapsulation program's route lookup sees.
    _pmtu_listener: std::os::fd::OwnedFd,
    /// The counters file of this namespace, as the user-space datapath publishes it.
    region: Arc<Region>,
    /// Dropping it stops the thread that copies the counters into `region`.
    _publisher: std::sync::mpsc::Sender<()>,
}

fn lock(d: &Mutex<Datapath>) -> std::sync::MutexGuard<'_, Datapath> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(tenet_ebpf)]
fn load() -> NetResult<aya::Ebpf> {
    use aya::programs::SchedClassifier;
    let mut bpf = aya::Ebpf::load(OBJECT).map_err(|e| bpf_err("load", "eBPF GRE object", e))?;
    for name in [ENCAP, DECAP] {
        let prog: &mut SchedClassifier = bpf
            .program_mut(name)
            .ok_or_else(|| bpf_err("find", name, "program missing from the object"))?
            .try_into()
            .map_err(|e| bpf_err("load", name, e))?;
        prog.load().map_err(|e| bpf_err("load", name, e))?;
    }
    Ok(bpf)
}

#[cfg(not(tenet_ebpf))]
fn load() -> NetResult<aya::Ebpf> {
    Err(NetError::new(
        "load",
        "eBPF GRE datapath",
        std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "this tenet was built without it (clang was missing at build time)",
        ),
    ))
}

/// Puts `program` on `device`'s tc hook (in the calling thread's namespace), replacing
/// whatever filter sits at tenet's place there (an earlier agent's program). The filter
/// outlives this process on purpose.
fn attach(
    bpf: &mut aya::Ebpf,
    program: &str,
    device: &str,
    hook: aya::programs::TcAttachType,
) -> NetResult<()> {
    use aya::programs::SchedClassifier;
    use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
    let object = format!("{program} on {device}");
    // EEXIST when the device has its clsact qdisc already: fine.
    let _ = tc::qdisc_add_clsact(device);
    let prog: &mut SchedClassifier = bpf
        .program_mut(program)
        .ok_or_else(|| bpf_err("find", program, "program missing"))?
        .try_into()
        .map_err(|e| bpf_err("attach", &object, e))?;
    let handle = TcHandle::new(0, FILTER_HANDLE);
    let created = prog.attach_with_options(
        device,
        hook,
        TcAttachOptions::Netlink(NlOptions {
            priority: FILTER_PRIORITY,
            handle,
            classid: None,
        }),
    );
    let id = match created {
        Ok(id) => id,
        Err(first) => {
            let existing =
                SchedClassifierLink::attached(device, hook, FILTER_PRIORITY, handle, None)
                    .map_err(|e| bpf_err("attach", &object, e))?;
            prog.attach_to_link(existing)
                .map_err(|e| bpf_err("attach", &object, format!("{first}; replacing: {e}")))?
        }
    };
    let link = prog
        .take_link(id)
        .map_err(|e| bpf_err("attach", &object, e))?;
    // Dropping the link would detach the filter: it stays, owned by the kernel.
    std::mem::forget(link);
    Ok(())
}

impl Datapath {
    fn map<'a>(&'a mut self, name: &str) -> NetResult<&'a mut aya::maps::Map> {
        self.bpf
            .map_mut(name)
            .ok_or_else(|| bpf_err("find", name, "map missing from the object"))
    }

    /// Writes the tunnel into the maps (its counters from zero).
    fn publish(&mut self, port: &Port) -> NetResult<()> {
        use aya::maps::{HashMap as BpfHash, PerCpuArray, PerCpuValues};
        let s = &port.spec;
        let object = format!("tunnel {}", s.name);
        let fail = |e: aya::maps::MapError| bpf_err("publish", object.clone(), e);
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| bpf_err("count", "CPUs", e))?;
        let mut counters: PerCpuArray<_, Counters> =
            PerCpuArray::try_from(self.map("tenet_counters")?).map_err(fail)?;
        counters
            .set(
                port.slot,
                PerCpuValues::try_from(vec![Counters::default(); cpus])
                    .map_err(|e| bpf_err("publish", object.clone(), e))?,
                0,
            )
            .map_err(fail)?;
        let mut ports: BpfHash<_, u32, PortVal> =
            BpfHash::try_from(self.map("tenet_ports")?).map_err(fail)?;
        let val = PortVal {
            local: wire(s.local),
            remote: wire(s.remote),
            key: s.key.get().to_be(),
            slot: port.slot,
            ttl: u32::from(s.ttl.unwrap_or(0)),
        };
        ports.insert(port.ifindex, val, 0).map_err(fail)?;
        let mut flows: BpfHash<_, FlowKey, FlowVal> =
            BpfHash::try_from(self.map("tenet_flows")?).map_err(fail)?;
        let key = FlowKey {
            remote: wire(s.remote),
            local: wire(s.local),
            key: s.key.get(),
        };
        let flow = FlowVal {
            ifindex: port.ifindex,
            slot: port.slot,
        };
        flows.insert(key, flow, 0).map_err(fail)?;
        let n = {
            let n = self.peers.entry(s.remote).or_default();
            *n += 1;
            *n
        };
        let mut peers: BpfHash<_, u32, u32> =
            BpfHash::try_from(self.map("tenet_peers")?).map_err(fail)?;
        peers.insert(wire(s.remote), n, 0).map_err(fail)?;
        Ok(())
    }

    /// Takes the tunnel out of the maps; its slot becomes free.
    fn withdraw(&mut self, name: &str) -> Option<Port> {
        use aya::maps::HashMap as BpfHash;
        let port = self.ports.remove(name)?;
        let s = &port.spec;
        if let Some(Ok(mut ports)) = self
            .bpf
            .map_mut("tenet_ports")
            .map(BpfHash::<_, u32, PortVal>::try_from)
        {
            let _ = ports.remove(&port.ifindex);
        }
        if let Some(Ok(mut flows)) = self
            .bpf
            .map_mut("tenet_flows")
            .map(BpfHash::<_, FlowKey, FlowVal>::try_from)
        {
            let _ = flows.remove(&FlowKey {
                remote: wire(s.remote),
                local: wire(s.local),
                key: s.key.get(),
            });
        }
        let left = match self.peers.get_mut(&s.remote) {
            Some(n) => {
                *n -= 1;
                *n
            }
            None => 0,
        };
        if left == 0 {
            self.peers.remove(&s.remote);
        }
        if let Some(Ok(mut peers)) = self
            .bpf
            .map_mut("tenet_peers")
            .map(BpfHash::<_, u32, u32>::try_from)
        {
            let _ = if left == 0 {
                peers.remove(&wire(s.remote))
            } else {
                peers.insert(wire(s.remote), left, 0)
            };
        }
        self.free.push(port.slot);
        Some(port)
    }

    fn counters(&mut self, slot: u32) -> Counters {
        use aya::maps::PerCpuArray;
        let mut sum = Counters::default();
        if let Some(Ok(map)) = self
            .bpf
            .map_mut("tenet_counters")
            .map(PerCpuArray::<_, Counters>::try_from)
            && let Ok(per_cpu) = map.get(&slot, 0)
        {
            for c in per_cpu.iter() {
                for (s, v) in sum.v.iter_mut().zip(c.v) {
                    *s += v;
                }
            }
        }
        sum
    }

    fn drops(&mut self) -> [u64; 4] {
        use aya::maps::PerCpuArray;
        let mut out = [0u64; 4];
        if let Some(Ok(map)) = self
            .bpf
            .map_mut("tenet_drops")
            .map(PerCpuArray::<_, u64>::try_from)
        {
            for (i, o) in out.iter_mut().enumerate() {
                if let Ok(v) = map.get(&(i as u32), 0) {
                    *o = v.iter().sum();
                }
            }
        }
        out
    }
}

/// The name of a tunnel port's veth peer: short, fixed for the tunnel, and not shaped like
/// the `<prefix>_<8 hex>` names tenet's components generate (so no reset takes it for an
/// interrupted create of theirs). Deleting the port deletes it.
pub fn peer_name(tunnel: &str) -> String {
    // FNV-1a: stable across builds and processes.
    let hash = tunnel.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("ep{hash:08x}")
}

/// Copies the maps' counters into the published file every second until the sender is
/// dropped (or the datapath is gone).
fn spawn_publisher(
    datapath: std::sync::Weak<Mutex<Datapath>>,
    region: Arc<Region>,
) -> std::sync::mpsc::Sender<()> {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("tenet-ebpf-stats".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(PUBLISH_EVERY)
            {
                let Some(datapath) = datapath.upgrade() else {
                    return;
                };
                let mut d = lock(&datapath);
                let ports: Vec<Port> = d.ports.values().cloned().collect();
                for p in &ports {
                    let Some(slot) = &p.published else { continue };
                    let values = d.counters(p.slot).v;
                    for (c, v) in COUNTER_ORDER.iter().zip(values) {
                        slot.set(*c, v);
                    }
                }
                let drops = d.drops();
                for (reason, v) in [
                    (DropReason::Malformed, drops[0]),
                    (DropReason::UnknownKey, drops[1]),
                    (DropReason::UnknownPeer, drops[2]),
                ] {
                    region
                        .drop_counter(reason)
                        .store(v, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start publishing the eBPF datapath's counters");
    }
    stop
}

/// Loads the programs once and lets them go: can this kernel run the datapath?
pub fn probe() -> NetResult<()> {
    load().map(drop)
}

impl EbpfGre {
    /// Loads the datapath for the namespace `netlink` is bound to (`netns`: its file) and
    /// adopts every eBPF tunnel already there: their filters are replaced by this process's
    /// programs and the maps refilled from the ports' aliases.
    pub async fn start(netlink: Netlink, netns: Option<PathBuf>) -> NetResult<Self> {
        let bpf = load()?;
        let (pmtu_listener, inode) = netns::run_in(netns.as_deref(), || {
            let inode = super::userspace::stats::netns_inode(None)
                .map_err(|e| NetError::new("identify", "network namespace", e))?;
            Ok((super::userspace::raw_gre_socket()?, inode))
        })?;
        let datapath = Arc::new(Mutex::new(Datapath {
            bpf,
            ports: HashMap::new(),
            free: (0..MAX_TUNNELS).rev().collect(),
            peers: HashMap::new(),
            decap_on: HashMap::new(),
        }));
        let region = Region::publish(&stats_dir(), inode);
        let backend = EbpfGre {
            netlink,
            _pmtu_listener: pmtu_listener,
            netns,
            _publisher: spawn_publisher(Arc::downgrade(&datapath), region.clone()),
            region,
            datapath,
        };
        let found = tunnels_of(&backend.netlink, TunnelKind::EbpfGre).await?;
        let mut adopted = 0;
        for (spec, link) in &found {
            match backend.install(spec, link.index).await {
                Ok(()) => adopted += 1,
                Err(e) => warn!(tunnel = %spec.name, error = %e, "cannot adopt eBPF tunnel"),
            }
        }
        info!(
            adopted,
            "eBPF GRE datapath loaded; tunnels adopted from the kernel"
        );
        Ok(backend)
    }

    /// Once no tunnel is left, takes the decapsulation program off the underlay devices, so
    /// that a host without tenet tunnels carries no tenet filter. (The clsact qdisc stays:
    /// it may have been there before, and empty it does nothing.)
    fn release_underlays_if_idle(&self) {
        let underlays: Vec<String> = {
            let mut d = lock(&self.datapath);
            if !d.ports.is_empty() {
                return;
            }
            d.decap_on.drain().map(|(_, name)| name).collect()
        };
        if underlays.is_empty() {
            return;
        }
        let released = netns::run_in(self.netns.as_deref(), move || {
            use aya::programs::TcAttachType;
            use aya::programs::links::Link as _;
            use aya::programs::tc::{SchedClassifierLink, TcHandle};
            for device in &underlays {
                let handle = TcHandle::new(0, FILTER_HANDLE);
                SchedClassifierLink::attached(
                    device,
                    TcAttachType::Ingress,
                    FILTER_PRIORITY,
                    handle,
                    None,
                )
                .map_err(|e| bpf_err("detach", format!("{DECAP} from {device}"), e))?
                .detach()
                .map_err(|e| bpf_err("detach", format!("{DECAP} from {device}"), e))?;
                info!(%device, "last eBPF tunnel gone: decapsulation program taken off");
            }
            Ok(())
        });
        if let Err(e) = released {
            warn!(error = %e, "cannot take the decapsulation program off the underlay");
        }
    }

    /// The underlay device that holds `local`: (ifindex, name).
    async fn underlay(&self, spec: &TunnelSpec) -> NetResult<(u32, String)> {
        let index = self
            .netlink
            .link_of_address(spec.local.into())
            .await?
            .ok_or_else(|| {
                NetError::invalid(
                    "create",
                    spec.object(),
                    format!("no link holds the local address {}", spec.local),
                )
            })?;
        let link = self
            .netlink
            .link_by_index(index)
            .await?
            .ok_or_else(|| NetError::not_found("create", spec.object()))?;
        Ok((index, link.name))
    }

    /// Gives port `ifindex` its program and map entries, and the underlay its decapsulation
    /// program if it has not got it from this process yet.
    async fn install(&self, spec: &TunnelSpec, ifindex: u32) -> NetResult<()> {
        let (underlay, underlay_name) = self.underlay(spec).await?;
        let slot = {
            let mut d = lock(&self.datapath);
            if let Some(old) = d.withdraw(&spec.name) {
                debug!(tunnel = %old.spec.name, "tunnel re-installed");
            }
            d.free.pop().ok_or_else(|| {
                NetError::invalid(
                    "create",
                    spec.object(),
                    format!("the eBPF datapath holds at most {MAX_TUNNELS} tunnels"),
                )
            })?
        };
        let port = Port {
            spec: spec.clone(),
            ifindex,
            slot,
            published: self
                .region
                .claim(&spec.name, spec.key.get(), spec.local, spec.remote)
                .map(Arc::new),
        };
        let datapath = self.datapath.clone();
        let name = spec.name.clone();
        let attached = netns::run_in(self.netns.as_deref(), move || {
            use aya::programs::TcAttachType;
            let mut d = lock(&datapath);
            if !d.decap_on.contains_key(&underlay) {
                attach(&mut d.bpf, DECAP, &underlay_name, TcAttachType::Ingress)?;
                d.decap_on.insert(underlay, underlay_name);
            }
            // The encapsulation program's route lookup needs forwarding on the device it
            // names, the port; a bridge port never hands packets to IP, so nothing else
            // changes.
            let key = format!("/proc/sys/net/ipv4/conf/{name}/forwarding");
            std::fs::write(&key, "1").map_err(|e| NetError::new("write sysctl", key, e))?;
            attach(&mut d.bpf, ENCAP, &name, TcAttachType::Egress)
        });
        let published = attached.and_then(|()| {
            let mut d = lock(&self.datapath);
            d.publish(&port)?;
            d.ports.insert(spec.name.clone(), port.clone());
            Ok(())
        });
        if let Err(e) = published {
            let mut d = lock(&self.datapath);
            d.ports.insert(spec.name.clone(), port);
            d.withdraw(&spec.name);
            return Err(e);
        }
        // The programs find the peer's MAC in the neighbour table: have it resolved now.
        if let Err(e) = self
            .netlink
            .resolve_neighbour(underlay, spec.remote.into())
            .await
        {
            warn!(tunnel = %spec.name, error = %e, "cannot start resolving the peer's neighbour entry");
        }
        Ok(())
    }
}

#[async_trait]
impl TunnelBackend for EbpfGre {
    fn kind(&self) -> TunnelKind {
        TunnelKind::EbpfGre
    }

    fn overhead(&self) -> u32 {
        GRE_OVERHEAD
    }

    async fn create(&self, spec: &TunnelSpec) -> NetResult<Link> {
        spec.validate()?;
        if let Some(link) = existing(&self.netlink, self.kind(), spec).await? {
            let current = lock(&self.datapath).ports.get(&spec.name).cloned();
            if current.is_none_or(|p| p.spec.ttl != spec.ttl || p.ifindex != link.index) {
                self.install(spec, link.index).await?;
                self.netlink
                    .set_alias(link.index, &spec.alias(self.kind()))
                    .await?;
            }
            return Ok(link);
        }
        let mtu = tenant_mtu(&self.netlink, spec, GRE_OVERHEAD).await?;
        let peer = peer_name(&spec.name);
        let link = self
            .netlink
            .create(&NewLink::veth(&spec.name, &peer))
            .await?;
        let peer_up = async {
            let index = self.netlink.index_of(&peer).await?;
            self.netlink.disable_link_local(index).await?;
            self.netlink.set_up(index).await
        };
        if let Err(e) = peer_up.await {
            let mut left = Leftovers::new();
            left.note(self.netlink.delete(link.index).await);
            left.log(&spec.object());
            return Err(e.with_leftovers(left));
        }
        if let Err(e) = self.install(spec, link.index).await {
            let mut left = Leftovers::new();
            left.note(self.netlink.delete(link.index).await);
            left.log(&spec.object());
            return Err(e.with_leftovers(left));
        }
        match finish(&self.netlink, self.kind(), spec, link.index, mtu).await {
            Ok(link) => Ok(link),
            Err(e) => {
                lock(&self.datapath).withdraw(&spec.name);
                Err(e)
            }
        }
    }

    async fn delete(&self, name: &str) -> NetResult<()> {
        lock(&self.datapath).withdraw(name);
        let deleted = delete_named(&self.netlink, name).await;
        self.release_underlays_if_idle();
        deleted
    }

    async fn tunnels(&self) -> NetResult<Vec<(TunnelSpec, Link)>> {
        tunnels_of(&self.netlink, self.kind()).await
    }

    fn forget(&self, name: &str) {
        lock(&self.datapath).withdraw(name);
        self.release_underlays_if_idle();
    }

    fn stats(&self) -> Option<EngineStats> {
        let mut d = lock(&self.datapath);
        let ports: Vec<Port> = d.ports.values().cloned().collect();
        let mut tunnels: Vec<TunnelStats> = ports
            .iter()
            .map(|p| {
                let c = d.counters(p.slot).v;
                TunnelStats {
                    endpoint: Endpoint {
                        name: p.spec.name.clone(),
                        key: p.spec.key.get(),
                        local: p.spec.local,
                        remote: p.spec.remote,
                        ttl: p.spec.ttl,
                    },
                    tx_packets: c[0],
                    tx_bytes: c[1],
                    tx_errors: c[2],
                    tx_too_big: c[3],
                    icmp_sent: c[4],
                    rx_packets: c[5],
                    rx_bytes: c[6],
                    rx_errors: c[7],
                    rx_ecn_dropped: c[8],
                    rx_ecn_marked: c[9],
                }
            })
            .collect();
        tunnels.sort_by(|a, b| a.endpoint.name.cmp(&b.endpoint.name));
        let [malformed, unknown_key, unknown_peer, _no_neighbour] = d.drops();
        Some(EngineStats {
            malformed,
            unknown_key,
            unknown_peer,
            tunnels,
        })
    }
}
