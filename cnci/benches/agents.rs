//! Agent benchmark: `cargo bench -p tenet-cnci --bench agents` (root; real etcd, dnsmasq,
//! TLS on loopback, namespaces).
//!
//! A controller sends START through the scheduler to the compute-node agent (`tenet-cn`'s
//! `agent::run`, in this process); each start is a VM tap. Two layouts:
//! * **a new subnet for every start** (the worst case): each start also creates a bridge and
//!   a tunnel and sends TenantAdded to the concentrator agent (`tenet-cnci`'s `agent::run`),
//!   which attaches the subnet (bridge, tunnel, dnsmasq);
//! * **10 starts per subnet** (a tenant launching instances into its subnets): the first
//!   start of a subnet does the above, the other nine only make a tap.
//!
//! Timed per start: START sent → endpoint in etcd (the compute node's work) → the subnet's
//! attachment in etcd (TenantAdded applied at the concentrator), both seen by an etcd watch;
//! p50/p99 at concurrency 1 and 10, without DHCP. Concurrency counts STARTs the compute node
//! has not finished (a controller does not wait for concentrators); the attachment is still
//! awaited for its latency. The baseline, measured in the same run on a host of its own: the
//! compute node's library alone (`ComputeNode::create_vnic` of the same taps, same layout).
//! Next to it, the **etcd floor**: the etcd operations every START needs (read the endpoint
//! key, one transaction for the address and the endpoint) alone at the same concurrency, on
//! the same etcd — the rate no agent writing its state to etcd can pass.
//!
//! Everything shares this machine's cores: etcd, the scheduler, the concentrator and its
//! dnsmasqs, which on a cloud run on other machines. So a second table gives the compute-node
//! agent's own cost: the on-CPU time of its threads per start (its user time and the kernel
//! work of its system calls) next to the library's per VNIC, the library run on a runtime of
//! its own the same way. A third says where the machine's CPU went during each run, per
//! start: the agents, the dnsmasqs, etcd, the bench's own runtime (the scheduler, the
//! controller, the watch), and the rest (kernel threads, other processes) — for the agents'
//! run, and for the library's and the etcd floor's alone. A fourth gives etcd's own work per
//! start (its `/metrics`): requests, transactions, keys written, watch events sent. The last
//! says what this machine allows at all: the rate if the compute-node agent cost the machine
//! no more than the library does and every core were busy, the other parts as measured.
//!
//! `TENET_BENCH_STARTS` sets the starts per run (default 200); `TENET_BENCH_RUNS` picks runs.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ipnetwork::Ipv4Network;
use ssntp::payload::{Payload, Start, StartCommand, VnicNetworking};
use ssntp::{Command, Role, Uuid};
use tenet::net::tunnel::BackendChoice;
use tenet::store::Datastore;
use tenet::testbed::{EtcdServer, Fabric};
use tenet_cn::{CnConfig, ComputeNode, VnicConfig, VnicRole};
use tokio::sync::{Semaphore, oneshot};

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(BENCH)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

/// Runs `f` to completion on a 2-thread runtime of its own, on a thread of its own.
/// Its threads carry `name`, so a profile tells the agents apart.
fn on_own_runtime<F>(name: &'static str, f: F) -> std::thread::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name)
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
}

/// The subnet of a run's i-th start, `per_subnet` starts to a subnet.
fn subnet(run: u8, i: usize, per_subnet: usize) -> Ipv4Network {
    Ipv4Network::new(Ipv4Addr::new(10, 100 + run, (i / per_subnet) as u8, 0), 24).unwrap()
}

/// One measured run: how starts are spread over subnets and how many are outstanding.
#[derive(Clone)]
struct Run {
    layout: &'static str,
    per_subnet: usize,
    concurrency: usize,
    /// Picks the run's own subnets.
    number: u8,
}

#[derive(Default)]
struct Seen {
    endpoint: HashMap<String, Instant>,
    attached: HashMap<Ipv4Network, Instant>,
}

/// What the watch has seen, and the wake-up of the starts that wait on it: they do not
/// poll, because the bench shares the machine's two cores with what it measures.
#[derive(Default)]
struct Watched {
    seen: std::sync::Mutex<Seen>,
    changed: tokio::sync::Notify,
}

struct Outcome {
    /// On-CPU time of the compute-node agent's threads during the run.
    agent_cpu: Duration,
    /// Where the machine's CPU went during the run.
    machine: CpuUse,
    /// What etcd did during the run.
    etcd: EtcdWork,
    to_endpoint: Vec<Duration>,
    to_attached: Vec<Duration>,
    /// From the first START sent to the last endpoint written / the last attachment.
    endpoints_done: Duration,
    attached_done: Duration,
}

/// Sends `n` STARTs with `concurrency` outstanding; waits for each to be attached.
async fn starts(
    controller: &Peer,
    watched: &Arc<Watched>,
    conc: &Uuid,
    conc_ip: Ipv4Addr,
    n: usize,
    run: &Run,
) -> Outcome {
    let gate = Arc::new(Semaphore::new(run.concurrency));
    let cpu_before = thread_cpu(CN_AGENT);
    let machine_before = CpuUse::now();
    let began = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let net = subnet(run.number, i, run.per_subnet);
        let vnic = format!("v-{}-{i}", run.number);
        let start = Start::from(StartCommand {
            instance_uuid: format!("i-{}-{i}", run.number),
            tenant_uuid: "t1".into(),
            vm_type: "qemu".into(),
            networking: VnicNetworking {
                vnic_uuid: vnic.clone(),
                concentrator_uuid: conc.to_string(),
                concentrator_ip: conc_ip.to_string(),
                subnet: net.to_string(),
                ..Default::default()
            },
            ..Default::default()
        });
        let sent = Instant::now();
        controller
            .client
            .send_command(Command::Start, start.to_yaml())
            .await
            .unwrap();
        let watched = watched.clone();
        tasks.push(tokio::spawn(async move {
            let deadline = sent + Duration::from_secs(60);
            // The compute node's part ends with the endpoint: the next START may go.
            let mut permit = Some(permit);
            let mut endpoint = None;
            loop {
                // Made before looking, so that a change after the look still wakes it.
                let changed = watched.changed.notified();
                {
                    let s = watched.seen.lock().unwrap();
                    if endpoint.is_none()
                        && let Some(e) = s.endpoint.get(&vnic)
                    {
                        endpoint = Some(*e);
                        permit.take();
                    }
                    if let (Some(e), Some(a)) = (endpoint, s.attached.get(&net)) {
                        // A later start in an attached subnet is ready with its endpoint.
                        let a = e.max(*a);
                        return (e - sent, a - sent, e, a);
                    }
                }
                let waited = tokio::time::timeout_at(deadline.into(), changed).await;
                assert!(waited.is_ok(), "start {vnic} not done in 60 s");
            }
        }));
    }
    let mut to_endpoint = Vec::new();
    let mut to_attached = Vec::new();
    let (mut last_endpoint, mut last_attached) = (began, began);
    for t in tasks {
        let (e, a, e_at, a_at) = t.await.unwrap();
        to_endpoint.push(e);
        to_attached.push(a);
        last_endpoint = last_endpoint.max(e_at);
        last_attached = last_attached.max(a_at);
    }
    to_endpoint.sort();
    to_attached.sort();
    Outcome {
        agent_cpu: thread_cpu(CN_AGENT).saturating_sub(cpu_before),
        machine: CpuUse::now().since(&machine_before),
        etcd: EtcdWork::default(),
        to_endpoint,
        to_attached,
        endpoints_done: last_endpoint - began,
        attached_done: last_attached - began,
    }
}

/// Thread names: the agents' runtimes, the library's, the bench's own.
const CN_AGENT: &str = "cn-agent";
const CNCI_AGENT: &str = "cnci-agent";
const CN_LIBRARY: &str = "cn-library";
const BENCH: &str = "bench";

/// On-CPU time so far of this process's threads named `name` (`/proc/self/task/*/schedstat`,
/// in nanoseconds): their user time and the kernel work done in their system calls — for
/// netlink requests, most of a VNIC's cost.
fn thread_cpu(name: &str) -> Duration {
    let mut nanos = 0u64;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let dir = task.path();
        if std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == name) {
            nanos += std::fs::read_to_string(dir.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(nanos)
}

/// CPU time so far: the machine's (busy, all cores, from /proc/stat), and that of each part
/// of the system under test — the agents' runtimes and the bench's (which runs the
/// scheduler, the controller and the etcd watch) by thread name, etcd and the dnsmasqs by
/// process name.
#[derive(Clone, Copy, Default)]
struct CpuUse {
    busy: Duration,
    cn_agent: Duration,
    cn_library: Duration,
    cnci_agent: Duration,
    dnsmasq: Duration,
    etcd: Duration,
    bench: Duration,
    /// Wall-clock time (since the bench began), for how busy the machine was.
    wall: Duration,
}

impl CpuUse {
    fn now() -> Self {
        let ticks: u64 = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                let f: Vec<u64> = s
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                // All but idle (3) and iowait (4); guest time is already in user time.
                Some(f.iter().take(8).sum::<u64>() - f.get(3)? - f.get(4)?)
            })
            .unwrap_or(0);
        let tick = 1e9
            / nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
                .ok()
                .flatten()
                .unwrap_or(100) as f64;
        CpuUse {
            busy: Duration::from_nanos((ticks as f64 * tick) as u64),
            cn_agent: thread_cpu(CN_AGENT),
            cn_library: thread_cpu(CN_LIBRARY),
            cnci_agent: thread_cpu(CNCI_AGENT),
            dnsmasq: process_cpu("dnsmasq"),
            etcd: process_cpu("etcd"),
            bench: thread_cpu(BENCH),
            wall: bench_began().elapsed(),
        }
    }

    /// The CPU no part counted here took: kernel threads, other processes.
    fn rest(&self) -> Duration {
        let counted = self.cn_agent
            + self.cn_library
            + self.cnci_agent
            + self.dnsmasq
            + self.etcd
            + self.bench;
        self.busy.saturating_sub(counted)
    }

    /// The table's cells: CPU per start of the machine and of each part.
    fn row(&self, n: usize) -> String {
        let per = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1e3 / n as f64);
        let node = self.cn_agent + self.cn_library;
        format!(
            "{} ({:.0}% of {} cores) | {} | {} | {} | {} | {} | {}",
            per(self.busy),
            100.0 * self.busy.as_secs_f64() / (self.wall.as_secs_f64() * cores() as f64),
            cores(),
            per(node),
            per(self.cnci_agent),
            per(self.dnsmasq),
            per(self.etcd),
            per(self.bench),
            per(self.rest()),
        )
    }

    fn since(&self, before: &Self) -> Self {
        CpuUse {
            busy: self.busy.saturating_sub(before.busy),
            cn_agent: self.cn_agent.saturating_sub(before.cn_agent),
            cn_library: self.cn_library.saturating_sub(before.cn_library),
            cnci_agent: self.cnci_agent.saturating_sub(before.cnci_agent),
            dnsmasq: self.dnsmasq.saturating_sub(before.dnsmasq),
            etcd: self.etcd.saturating_sub(before.etcd),
            bench: self.bench.saturating_sub(before.bench),
            wall: self.wall.saturating_sub(before.wall),
        }
    }
}

fn bench_began() -> Instant {
    static BEGAN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *BEGAN.get_or_init(Instant::now)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// On-CPU time so far of every process named `comm` (all their threads).
fn process_cpu(comm: &str) -> Duration {
    let mut nanos = 0u64;
    for proc_dir in std::fs::read_dir("/proc").unwrap().flatten() {
        let dir = proc_dir.path();
        if !std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == comm) {
            continue;
        }
        for task in std::fs::read_dir(dir.join("task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            nanos += std::fs::read_to_string(task.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(nanos)
}

/// The library alone: the same taps, `concurrency` at a time; returns creates/s and the
/// library's on-CPU time (run on its own runtime, [`CN_LIBRARY`]).
async fn library(
    node: &Arc<ComputeNode>,
    conc_ip: Ipv4Addr,
    n: usize,
    run: &Run,
) -> (f64, Duration, CpuUse) {
    let gate = Arc::new(Semaphore::new(run.concurrency));
    let cpu_before = thread_cpu(CN_LIBRARY);
    let machine_before = CpuUse::now();
    let began = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let node = node.clone();
        let mut c = VnicConfig::container(
            &format!("v-{}-{i}", run.number),
            "t1",
            subnet(run.number, i, run.per_subnet),
            "c1",
            conc_ip,
            "02:00:00:00:00:01".parse().unwrap(),
        );
        c.role = VnicRole::Vm;
        c.mac = None;
        tasks.push(tokio::spawn(async move {
            node.create_vnic(&c, None).await.unwrap();
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rate = n as f64 / began.elapsed().as_secs_f64();
    (
        rate,
        thread_cpu(CN_LIBRARY).saturating_sub(cpu_before),
        CpuUse::now().since(&machine_before),
    )
}

/// The etcd operations no START can do without, alone at the run's concurrency: read the
/// endpoint key (is the instance new?), then one transaction (a block compared and written
/// with the address, and the endpoint). The agent's rate cannot pass this floor's.
async fn etcd_floor(store: &Arc<dyn Datastore>, n: usize, run: &Run) -> (f64, CpuUse) {
    use tenet::store::{Compare, Txn, TxnOp};
    let gate = Arc::new(Semaphore::new(run.concurrency));
    let machine_before = CpuUse::now();
    let began = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let store = store.clone();
        let key = format!("/bench/floor/{}/{i}", run.number);
        tasks.push(tokio::spawn(async move {
            assert!(store.get(&key).await.unwrap().is_none());
            let block = format!("{key}/block");
            let txn = Txn::new()
                .when(Compare::absent(block.clone()))
                .then(TxnOp::put(block, "{}"))
                .then(TxnOp::put(key, "{}"));
            store.txn(txn).await.unwrap();
            drop(permit);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rate = n as f64 / began.elapsed().as_secs_f64();
    (rate, CpuUse::now().since(&machine_before))
}

async fn run() {
    let n = env_count("TENET_BENCH_STARTS", 200).min(250);
    let etcd = EtcdServer::start().await.unwrap();
    let store: Arc<dyn Datastore> = Arc::new(etcd.store().await.unwrap());
    let pki = Pki::new();
    let sched = scheduler(&pki).await;
    let fabric = Fabric::new().await.unwrap();
    let cn_host = fabric.add_host("cn").await.unwrap();
    let conc_host = fabric.add_host("conc").await.unwrap();
    let lib_host = fabric.add_host("lib").await.unwrap();
    // The agents' run directories on tmpfs, as /run is on a systemd host (this machine's /run
    // is on its disk, where creating files in a directory with recent deletions is slow).
    let run_dir = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let servers = vec![sched.local_addr().to_string()];
    let (conc_uuid, cn_uuid) = (Uuid::new_v4(), Uuid::new_v4());

    // Watch what the agents write: endpoints and the concentrator's attachments — only
    // those, so that etcd does not send the bench every IPAM block written meanwhile.
    let watched = Arc::new(Watched::default());
    let endpoints_prefix = "/calico/v1/host/cn-1/workload/ciao/".to_string();
    let attach_prefix = format!("/tenet/v1/cnci/{conc_uuid}/attach/");
    for prefix in [endpoints_prefix, attach_prefix.clone()] {
        let mut watch = store.watch(&prefix, 0).await.unwrap();
        let watched = watched.clone();
        let attach_prefix = attach_prefix.clone();
        tokio::spawn(async move {
            while let Some(Ok(ev)) = watch.next().await {
                let now = Instant::now();
                let key = ev.key.clone();
                let mut s = watched.seen.lock().unwrap();
                if let Some(rest) = key.strip_prefix(&attach_prefix) {
                    if let Some((net, _)) = rest.split_once('/')
                        && let Some((a, p)) = net.rsplit_once('-')
                        && let (Ok(a), Ok(p)) = (a.parse(), p.parse())
                    {
                        s.attached
                            .entry(Ipv4Network::new(a, p).unwrap())
                            .or_insert(now);
                    }
                } else {
                    let vnic = key.rsplit('/').next().unwrap().to_string();
                    s.endpoint.entry(vnic).or_insert(now);
                }
                drop(s);
                watched.changed.notify_waiters();
            }
        });
    }

    let (stop_conc, conc_stopped) = oneshot::channel::<()>();
    let mut cc = cnci_config(&conc_host, &conc_uuid.to_string(), "t1", run_dir.path());
    cc.compute_nets = vec!["10.254.0.0/16".parse().unwrap()];
    // Each agent on a runtime of its own, as the separate processes they are in production.
    let conc_agent = on_own_runtime(
        CNCI_AGENT,
        tenet_cnci::agent::run(
            tenet_cnci::agent::AgentConfig {
                concentrator: cc.clone(),
                servers: servers.clone(),
                identity: pki.identity(Role::CNCIAGENT),
                uuid: conc_uuid,
                mesh_cidr: None,
                status_ttl: Duration::from_secs(10),
                metrics_address: None,
            },
            store.clone(),
            async {
                let _ = conc_stopped.await;
            },
        ),
    );
    let (stop_cn, cn_stopped) = oneshot::channel::<()>();
    let mut node = CnConfig::new(&cn_uuid.to_string());
    node.netns = Some(cn_host.path());
    node.tunnel = BackendChoice::Userspace;
    node.max_parallel = 16;
    let cn_agent = on_own_runtime(
        CN_AGENT,
        tenet_cn::agent::run(
            tenet_cn::agent::AgentConfig {
                node,
                servers,
                identity: pki.identity(Role::AGENT),
                uuid: cn_uuid,
                host: "cn-1".into(),
                orchestrator: "ciao".into(),
                status_ttl: Duration::from_secs(10),
                api_socket: None,
                docker_socket: None,
                metrics_address: None,
                policy: false,
                routed: None,
            },
            store.clone(),
            async {
                let _ = cn_stopped.await;
            },
        ),
    );
    let controller = Peer::start(&pki, Role::CONTROLLER, sched.local_addr()).await;
    // Both agents up: their status keys are there.
    for uuid in [conc_uuid, cn_uuid] {
        let key = tenet::keyspace::node::key(&uuid.to_string());
        while store.get(&key).await.unwrap().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await; // both SSNTP sessions up

    let ip = conc_host.ip();
    // (layout, per_subnet, concurrency, run number: its own subnets)
    let run = |layout, per_subnet, concurrency, number| Run {
        layout,
        per_subnet,
        concurrency,
        number,
    };
    let runs = [
        run("new subnet every start", 1, 1, 0),
        run("new subnet every start", 1, 10, 1),
        run("10 starts per subnet", 10, 1, 2),
        run("10 starts per subnet", 10, 10, 3),
    ];
    // `TENET_BENCH_RUNS=1,3` measures only those runs (0-based), e.g. under a profiler.
    let chosen: Vec<usize> = std::env::var("TENET_BENCH_RUNS").map_or_else(
        |_| (0..runs.len()).collect(),
        |v| v.split(',').filter_map(|i| i.trim().parse().ok()).collect(),
    );
    let runs: Vec<Run> = runs
        .into_iter()
        .enumerate()
        .filter(|(i, _)| chosen.contains(i))
        .map(|(_, r)| r)
        .collect();
    let mut outcomes = Vec::new();
    for r in &runs {
        let before = EtcdWork::now(&etcd);
        outcomes.push(starts(&controller, &watched, &conc_uuid, ip, n, r).await);
        outcomes.last_mut().unwrap().etcd = EtcdWork::now(&etcd).since(&before);
    }

    let mut lib_config = CnConfig::new("lib");
    lib_config.netns = Some(lib_host.path());
    lib_config.tunnel = BackendChoice::Userspace;
    lib_config.max_parallel = 16;
    // On a runtime of its own, as the agent's node is: its netlink work is on its threads.
    let lib_runs = runs.clone();
    let library_done = on_own_runtime(CN_LIBRARY, async move {
        let lib = Arc::new(ComputeNode::init(lib_config).await.unwrap());
        let mut measured = Vec::new();
        for r in &lib_runs {
            measured.push(library(&lib, ip, n, r).await);
        }
        lib.reset().await.unwrap();
        measured
    });
    let (mut lib_rates, mut lib_cpu, mut lib_machine) = (Vec::new(), Vec::new(), Vec::new());
    for (rate, cpu, machine) in library_done.join().unwrap() {
        lib_rates.push(rate);
        lib_cpu.push(cpu);
        lib_machine.push(machine);
    }
    let (mut floors, mut floor_machine, mut floor_etcd) = (Vec::new(), Vec::new(), Vec::new());
    for r in &runs {
        let before = EtcdWork::now(&etcd);
        let (rate, machine) = etcd_floor(&store, n, r).await;
        floors.push(rate);
        floor_machine.push(machine);
        floor_etcd.push(EtcdWork::now(&etcd).since(&before));
    }

    println!();
    println!("| run | starts | p50 ms | p99 ms | starts/s | vs library |");
    println!("|---|---|---|---|---|---|");
    for (((r, o), &lib_rate), floor) in runs.iter().zip(&outcomes).zip(&lib_rates).zip(floors) {
        let label = format!("{}, concurrency {}", r.layout, r.concurrency);
        let rate_endpoint = n as f64 / o.endpoints_done.as_secs_f64();
        let rate_attached = n as f64 / o.attached_done.as_secs_f64();
        println!(
            "| {label}: START → endpoint in etcd (compute-node agent) | {n} | {} | {} | {rate_endpoint:.1} | {:.2}× |",
            ms(percentile(&o.to_endpoint, 0.5)),
            ms(percentile(&o.to_endpoint, 0.99)),
            rate_endpoint / lib_rate
        );
        println!(
            "| {label}: START → TenantAdded applied at the concentrator | {n} | {} | {} | {rate_attached:.1} | {:.2}× |",
            ms(percentile(&o.to_attached, 0.5)),
            ms(percentile(&o.to_attached, 0.99)),
            rate_attached / lib_rate
        );
        println!(
            "| {label}: library create_vnic alone (baseline) | {n} | — | — | {lib_rate:.1} | 1.00× |"
        );
        println!(
            "| {label}: etcd floor — a get and a transaction per start, no kernel work | {n} | — | — | {floor:.1} | {:.2}× |",
            floor / lib_rate
        );
    }
    println!();
    println!("| run | agent CPU per start | library CPU per VNIC | agent / library |");
    println!("|---|---|---|---|");
    for ((r, o), lib) in runs.iter().zip(&outcomes).zip(&lib_cpu) {
        let per = |d: &Duration| d.as_secs_f64() * 1e3 / n as f64;
        println!(
            "| {}, concurrency {} | {:.3} ms | {:.3} ms | {:.2}× |",
            r.layout,
            r.concurrency,
            per(&o.agent_cpu),
            per(lib),
            per(&o.agent_cpu) / per(lib)
        );
    }
    println!();
    println!(
        "| run (ms of CPU per start) | machine busy | compute-node agent (or library) | concentrator agent | its dnsmasqs | etcd | scheduler, controller, watch (bench) | rest (kernel threads, other) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (((r, o), lib), floor) in runs
        .iter()
        .zip(&outcomes)
        .zip(&lib_machine)
        .zip(&floor_machine)
    {
        let label = format!("{}, concurrency {}", r.layout, r.concurrency);
        for (what, m) in [
            ("agents", &o.machine),
            ("library alone", lib),
            ("etcd floor alone", floor),
        ] {
            println!("| {label}: {what} | {} |", m.row(n));
        }
    }
    println!();
    println!(
        "| run (per start) | etcd requests | of them transactions | keys written | watch events sent |"
    );
    println!("|---|---|---|---|---|");
    for ((r, o), floor) in runs.iter().zip(&outcomes).zip(&floor_etcd) {
        let label = format!("{}, concurrency {}", r.layout, r.concurrency);
        for (what, w) in [("agents", &o.etcd), ("etcd floor alone", floor)] {
            println!("| {label}: {what} | {} |", w.row(n));
        }
    }
    println!();
    // What this machine allows at all: everything but the compute-node agent and the kernel
    // threads as measured in the run, the agent replaced by what the library alone cost the
    // machine (kernel threads included), and every core busy. Optimistic: the other parts'
    // kernel-thread work is left out.
    println!(
        "| run | agents' starts/s | at most, if the compute-node agent cost the machine only what the library does | library starts/s | that bound / library |"
    );
    println!("|---|---|---|---|---|");
    for (((r, o), lib), &lib_rate) in runs.iter().zip(&outcomes).zip(&lib_machine).zip(&lib_rates) {
        let m = &o.machine;
        let others = m.busy.saturating_sub(m.cn_agent + m.rest());
        let per_start = (others + lib.busy).as_secs_f64() / n as f64;
        let bound = cores() as f64 / per_start;
        println!(
            "| {}, concurrency {} | {:.1} | {bound:.1} | {lib_rate:.1} | {:.2}× |",
            r.layout,
            r.concurrency,
            n as f64 / o.endpoints_done.as_secs_f64(),
            bound / lib_rate
        );
    }
    println!();

    let _ = stop_cn.send(());
    let _ = stop_conc.send(());
    cn_agent.join().unwrap().unwrap();
    conc_agent.join().unwrap().unwrap();
    let conc = tenet_cnci::Concentrator::init(cc, Some(store.clone()))
        .await
        .unwrap();
    conc.rebuild().await.unwrap();
    conc.reset().await.unwrap();
    cn_on(&cn_host, "cn-x", BackendChoice::Userspace)
        .await
        .reset()
        .await
        .unwrap();
    sched.shutdown().await;
}

/// etcd's own counters (its `/metrics`): the requests it answered, the keys it wrote and
/// the watch events it sent.
#[derive(Clone, Copy, Default)]
struct EtcdWork {
    requests: f64,
    txns: f64,
    puts: f64,
    events: f64,
}

impl EtcdWork {
    fn now(etcd: &EtcdServer) -> Self {
        use std::io::{Read, Write};
        let address = etcd.endpoint().trim_start_matches("http://").to_string();
        let mut text = String::new();
        let mut http = std::net::TcpStream::connect(&address).unwrap();
        write!(http, "GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n").unwrap();
        http.read_to_string(&mut text).unwrap();
        let mut work = EtcdWork::default();
        for (name, value) in text
            .lines()
            .filter_map(|l| l.rsplit_once(' '))
            .filter_map(|(name, v)| Some((name, v.parse::<f64>().ok()?)))
        {
            let unary_kv = name.starts_with("grpc_server_handled_total{")
                && name.contains("grpc_service=\"etcdserverpb.KV\"");
            if unary_kv {
                work.requests += value;
                if name.contains("grpc_method=\"Txn\"") {
                    work.txns += value;
                }
            }
            match name {
                "etcd_debugging_mvcc_put_total" => work.puts += value,
                "etcd_debugging_mvcc_events_total" => work.events += value,
                _ => {}
            }
        }
        work
    }

    fn since(&self, before: &Self) -> Self {
        EtcdWork {
            requests: self.requests - before.requests,
            txns: self.txns - before.txns,
            puts: self.puts - before.puts,
            events: self.events - before.events,
        }
    }

    fn row(&self, n: usize) -> String {
        let per = |v: f64| format!("{:.2}", v / n as f64);
        format!(
            "{} | {} | {} | {}",
            per(self.requests),
            per(self.txns),
            per(self.puts),
            per(self.events)
        )
    }
}
