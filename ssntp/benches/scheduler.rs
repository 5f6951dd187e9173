//! Forwarding through tenet-scheduler's rules vs a raw TLS echo of the same bytes.
//!
//! Both runs use 100 TLS clients on loopback, each keeping WINDOW frames in flight:
//! * scheduler: client i sends TenantAdded frames whose `concentrator_uuid` is client i+1, so
//!   every frame crosses client → scheduler (decode, parse YAML, route, encode) → client;
//! * echo: client i sends the same gob bytes to a TLS server that writes them straight back.
//!
//! Latency is send → receive of each frame (one forward vs one echo round trip: both are two
//! TLS hops). `TENET_BENCH_SECONDS` sets the measured time per run (default 5).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ssntp::conn::{MessageReader, MessageWriter};
use ssntp::payload::{Payload, TenantAdded, TenantSubnet};
use ssntp::{
    Client, ClientConfig, ClientEvent, Event, Frame, Message, Operation, Role, Server,
    ServerConfig, Uuid,
};
use tokio::sync::Semaphore;

const CLIENTS: usize = 100;

/// How hard the clients push.
#[derive(Clone, Copy)]
enum Load {
    /// As fast as possible with this many frames in flight per client: the peak rate.
    Saturate { window: usize },
    /// Each client sends at this rate (open loop, up to 64 in flight): latency below the peak.
    Rate { per_client_hz: u32 },
}

impl Load {
    fn window(self) -> usize {
        match self {
            Load::Saturate { window } => window,
            Load::Rate { .. } => 64,
        }
    }

    fn describe(self) -> String {
        match self {
            Load::Saturate { window } => format!("saturated, {window} in flight per client"),
            Load::Rate { per_client_hz } => {
                format!("offered {} frames/s", per_client_hz as usize * CLIENTS)
            }
        }
    }

    /// A pacer for one sender: `None` when sending flat out.
    fn pacer(self) -> Option<tokio::time::Interval> {
        match self {
            Load::Saturate { .. } => None,
            Load::Rate { per_client_hz } => {
                let period = Duration::from_secs(1) / per_client_hz;
                // Spread the clients' phases so they do not all send in the same millisecond.
                let offset = period.mul_f64(rand_fraction());
                let mut i = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                Some(i)
            }
        }
    }
}

fn rand_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() % 10_000) as f64 / 10_000.0
}

// The same throw-away PKI the tests use.
#[path = "../tests/common/mod.rs"]
mod common;
use common::Pki;

/// What one run measured.
struct Outcome {
    frames: u64,
    seconds: f64,
    latencies_us: Vec<u64>,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.frames as f64 / self.seconds
    }

    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
}

/// Counts frames and latencies only inside the measured window.
struct Meter {
    base: Instant,
    measuring: AtomicBool,
    frames: AtomicU64,
    latencies: Mutex<Vec<u64>>,
}

impl Meter {
    fn new() -> Arc<Self> {
        Arc::new(Meter {
            base: Instant::now(),
            measuring: AtomicBool::new(false),
            frames: AtomicU64::new(0),
            latencies: Mutex::new(Vec::with_capacity(1 << 20)),
        })
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn record(&self, sent_ns: u64, local: &mut Vec<u64>) {
        if self.measuring.load(Ordering::Relaxed) {
            self.frames.fetch_add(1, Ordering::Relaxed);
            local.push((self.now_ns().saturating_sub(sent_ns)) / 1000);
        }
    }

    /// Runs the measured window after a warm-up; returns (frames, seconds).
    async fn measure(&self, warmup: Duration, seconds: f64) -> (u64, f64) {
        tokio::time::sleep(warmup).await;
        self.measuring.store(true, Ordering::Relaxed);
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        self.measuring.store(false, Ordering::Relaxed);
        (
            self.frames.load(Ordering::Relaxed),
            start.elapsed().as_secs_f64(),
        )
    }

    /// Once every receiver has stopped and handed in its samples.
    fn outcome(&self, (frames, seconds): (u64, f64)) -> Outcome {
        let mut latencies_us = std::mem::take(&mut *self.latencies.lock().unwrap());
        latencies_us.sort_unstable();
        Outcome {
            frames,
            seconds,
            latencies_us,
        }
    }
}

/// A TenantAdded payload for `target` that carries its send time in `agent_uuid`.
fn payload(target: Uuid, sent_ns: u64) -> Vec<u8> {
    TenantAdded::from(TenantSubnet {
        agent_uuid: sent_ns.to_string(),
        agent_ip: "10.254.0.1".into(),
        tenant_uuid: "67d86208-b46c-4465-9018-fe14087d415f".into(),
        tenant_subnet: "172.16.0.0/24".into(),
        concentrator_uuid: target.to_string(),
        concentrator_ip: "10.254.0.2".into(),
        subnet_key: 4268,
    })
    .to_yaml()
}

fn sent_time(frame: &Frame) -> u64 {
    TenantAdded::from_yaml(&frame.payload)
        .map(|p| p.tenant_added.agent_uuid.parse().unwrap_or(0))
        .unwrap_or(0)
}

async fn run_scheduler(pki: &Pki, seconds: f64, load: Load) -> Outcome {
    let mut config = ServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        pki.identity(Role::SCHEDULER | Role::SERVER),
        Uuid::new_v4(),
    );
    config.role = Some(Role::SCHEDULER);
    let scheduler = ssntp::scheduler::Scheduler::new();
    let server = Server::start(config, scheduler.rules(), scheduler)
        .await
        .unwrap();
    let addr = server.local_addr().to_string();
    let identity = pki.identity(Role::AGENT | Role::CNCIAGENT);
    let uuids: Vec<Uuid> = (0..CLIENTS).map(|_| Uuid::new_v4()).collect();
    let mut clients = Vec::new();
    for &uuid in &uuids {
        let config = ClientConfig::new(vec![addr.clone()], identity.clone(), uuid);
        let (client, mut events) = Client::start(config).unwrap();
        match events.recv().await {
            Some(ClientEvent::Connected(_)) => {}
            other => panic!("client did not connect: {other:?}"),
        }
        clients.push((client, events));
    }
    let meter = Meter::new();
    let stop = Arc::new(AtomicBool::new(false));
    // One window per sender; the receiver (the next client) gives the permit back.
    let windows: Vec<Arc<Semaphore>> = (0..CLIENTS)
        .map(|_| Arc::new(Semaphore::new(load.window())))
        .collect();
    let mut tasks = Vec::new();
    for (i, (client, mut events)) in clients.into_iter().enumerate() {
        let target = uuids[(i + 1) % CLIENTS];
        let window = windows[i].clone();
        let (m, s, c) = (meter.clone(), stop.clone(), client.clone());
        let mut pacer = load.pacer();
        tasks.push(tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                if let Some(p) = pacer.as_mut() {
                    p.tick().await;
                }
                let permit = window.acquire().await.unwrap();
                permit.forget();
                if c.send_event(Event::TenantAdded, payload(target, m.now_ns()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }));
        let upstream = windows[(i + CLIENTS - 1) % CLIENTS].clone();
        let (m, s) = (meter.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = Vec::new();
            while let Some(ev) = events.recv().await {
                if let ClientEvent::Frame(f) = ev {
                    m.record(sent_time(&f), &mut local);
                    upstream.add_permits(1);
                }
                if s.load(Ordering::Relaxed) || local.len() >= 4096 {
                    m.latencies.lock().unwrap().append(&mut local);
                    if s.load(Ordering::Relaxed) {
                        break;
                    }
                }
            }
            m.latencies.lock().unwrap().append(&mut local);
            client.close().await;
        }));
    }
    let measured = meter.measure(Duration::from_millis(500), seconds).await;
    stop.store(true, Ordering::Relaxed);
    for w in &windows {
        w.add_permits(load.window());
    }
    server.shutdown().await;
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    meter.outcome(measured)
}

async fn run_echo(pki: &Pki, seconds: f64, load: Load) -> Outcome {
    let server_id = pki.identity(Role::SERVER);
    let acceptor = tokio_rustls::TlsAcceptor::from(server_id.server_config().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                break;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let (mut r, mut w) = tokio::io::split(tls);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
        }
    });
    let client_id = pki.identity(Role::AGENT);
    let connector = tokio_rustls::TlsConnector::from(client_id.client_config().unwrap());
    let meter = Meter::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = ssntp::tls::server_name("127.0.0.1").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let (r, w) = tokio::io::split(tls);
        let window = Arc::new(Semaphore::new(load.window()));
        let mut pacer = load.pacer();
        let origin = Uuid::new_v4();
        let target = Uuid::new_v4();
        let (m, s, win) = (meter.clone(), stop.clone(), window.clone());
        tasks.push(tokio::spawn(async move {
            let mut writer = MessageWriter::new(w);
            while !s.load(Ordering::Relaxed) {
                if let Some(p) = pacer.as_mut() {
                    p.tick().await;
                }
                win.acquire().await.unwrap().forget();
                let f = Frame::new(
                    Operation::Event(Event::TenantAdded),
                    origin,
                    payload(target, m.now_ns()),
                );
                if writer.send(&Message::Frame(f)).await.is_err() {
                    break;
                }
            }
            let _ = writer.shutdown().await;
        }));
        let (m, s) = (meter.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut reader = MessageReader::new(r);
            let mut local = Vec::new();
            while let Ok(Some(Message::Frame(f))) = reader.read().await {
                m.record(sent_time(&f), &mut local);
                window.add_permits(1);
                if s.load(Ordering::Relaxed) || local.len() >= 4096 {
                    m.latencies.lock().unwrap().append(&mut local);
                }
            }
            m.latencies.lock().unwrap().append(&mut local);
        }));
    }
    let measured = meter.measure(Duration::from_millis(500), seconds).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    echo.abort();
    meter.outcome(measured)
}

fn main() {
    let seconds: f64 = std::env::var("TENET_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pki = Pki::new();
    let loads = [
        Load::Saturate { window: 4 },
        Load::Rate { per_client_hz: 100 },
    ];
    println!(
        "\nSSNTP forwarding, {CLIENTS} TLS clients on loopback, {seconds} s per run, 2 worker threads\n"
    );
    println!("| load | path | frames/s | p50 ms | p99 ms | rate vs echo |");
    println!("|---|---|---|---|---|---|");
    for load in loads {
        let (echo, sched) = runtime.block_on(async {
            let echo = run_echo(&pki, seconds, load).await;
            let sched = run_scheduler(&pki, seconds, load).await;
            (echo, sched)
        });
        for (name, o) in [
            ("raw TLS echo of the same gob bytes (baseline)", &echo),
            ("client → tenet-scheduler → client", &sched),
        ] {
            println!(
                "| {} | {name} | {:.0} | {:.2} | {:.2} | {:.2}× |",
                load.describe(),
                o.rate(),
                o.percentile(0.50),
                o.percentile(0.99),
                o.rate() / echo.rate()
            );
        }
    }
}
