//! Health and Prometheus metrics for the agents: `/metrics` (Prometheus text format, from a
//! `prometheus-client` registry), `/healthz` (the process serves) and `/readyz` (its
//! dependencies answer: etcd, the scheduler), on an address the operator chooses
//! (`--metrics-address`, off unless given; a loopback or management address, since the
//! endpoints are not authenticated).
//!
//! Gauges that mirror state the agent already holds (VNICs, subnets, tunnels) are set by a
//! `refresh` callback just before each scrape, so they cannot drift; counters and histograms
//! are updated where things happen.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
pub use prometheus_client::metrics::counter::Counter;
pub use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
pub use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{info, warn};

/// Labels of one dimension (`{result="ok"}`, `{operation="START"}`, …).
pub type Labels = Vec<(String, String)>;

/// A counter family with one label.
pub fn labels(name: &str, value: &str) -> Labels {
    vec![(name.to_string(), value.to_string())]
}

/// Whether the process can do its job: `Err(why)` names the dependency that does not answer.
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// What the endpoints serve.
#[derive(Clone)]
pub struct Endpoints {
    pub registry: Arc<Mutex<Registry>>,
    /// Sets the gauges that mirror the agent's state; runs before each scrape.
    pub refresh: Arc<dyn Fn() + Send + Sync>,
    pub ready: ReadyCheck,
}

/// Serves the endpoints on `address` until the task is dropped; returns the bound address
/// (port 0 picks one).
pub async fn serve(
    address: SocketAddr,
    endpoints: Endpoints,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(endpoints);
    info!(address = %bound, "metrics and health endpoints listening");
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok((bound, task))
}

async fn metrics(State(e): State<Endpoints>) -> Response {
    (e.refresh)();
    let mut text = String::new();
    let encoded = {
        let registry = e.registry.lock().unwrap_or_else(|p| p.into_inner());
        prometheus_client::encoding::text::encode(&mut text, &registry)
    };
    match encoded {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

async fn ready(State(e): State<Endpoints>) -> Response {
    match (e.ready)().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()).into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

/// A readiness check for the datastore: one read within `timeout`.
pub fn datastore_ready(
    store: Arc<dyn crate::store::Datastore>,
    timeout: std::time::Duration,
) -> impl Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync {
    move || {
        let store = store.clone();
        Box::pin(async move {
            match tokio::time::timeout(timeout, store.revision()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("etcd: {e}")),
                Err(_) => Err(format!("etcd: no answer within {timeout:?}")),
            }
        })
    }
}

/// An agent's readiness: etcd answers a read within 2 s and `connected` (its SSNTP
/// connection to the scheduler) is up.
pub fn agent_ready(
    store: Arc<dyn crate::store::Datastore>,
    connected: Arc<std::sync::atomic::AtomicBool>,
) -> ReadyCheck {
    let etcd = datastore_ready(store, std::time::Duration::from_secs(2));
    Arc::new(move || {
        let etcd = etcd();
        let connected = connected.clone();
        Box::pin(async move {
            etcd.await?;
            match connected.load(std::sync::atomic::Ordering::Acquire) {
                true => Ok(()),
                false => Err("not connected to the scheduler".into()),
            }
        })
    })
}

/// Round trips to etcd, in seconds: 100 µs to about 3 s.
pub fn etcd_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
}

/// Durations by one label (a datastore call's operation, a policy phase, …).
pub type StoreLatency = Family<Labels, Histogram, fn() -> Histogram>;

/// An empty [`StoreLatency`] with [`etcd_histogram`]'s buckets (100 µs to about 3 s).
pub fn latency_family() -> StoreLatency {
    StoreLatency::new_with_constructor(etcd_histogram as fn() -> Histogram)
}

/// A datastore that times each call into a [`StoreLatency`] (`tenet_etcd_request_duration_seconds`
/// once registered): what the agents' etcd round trips cost, seen from the agent.
#[derive(Debug)]
pub struct TimedStore {
    inner: Arc<dyn crate::store::Datastore>,
    latency: StoreLatency,
}

impl TimedStore {
    /// Wraps `inner`; the returned family is what to register.
    pub fn wrap(
        inner: Arc<dyn crate::store::Datastore>,
    ) -> (Arc<dyn crate::store::Datastore>, StoreLatency) {
        let latency = latency_family();
        let store = Arc::new(TimedStore {
            inner,
            latency: latency.clone(),
        });
        (store, latency)
    }

    async fn timed<T>(&self, op: &str, call: impl Future<Output = T>) -> T {
        let start = std::time::Instant::now();
        let out = call.await;
        self.latency
            .get_or_create(&labels("operation", op))
            .observe(start.elapsed().as_secs_f64());
        out
    }
}

#[async_trait::async_trait]
impl crate::store::Datastore for TimedStore {
    async fn get(&self, key: &str) -> crate::store::StoreResult<Option<crate::store::KeyValue>> {
        self.timed("get", self.inner.get(key)).await
    }
    async fn list(&self, prefix: &str) -> crate::store::StoreResult<crate::store::Listing> {
        self.timed("list", self.inner.list(prefix)).await
    }
    async fn create(
        &self,
        key: &str,
        value: &[u8],
    ) -> crate::store::StoreResult<crate::store::Revision> {
        self.timed("create", self.inner.create(key, value)).await
    }
    async fn update(
        &self,
        key: &str,
        value: &[u8],
        expected: crate::store::Revision,
    ) -> crate::store::StoreResult<crate::store::Revision> {
        self.timed("update", self.inner.update(key, value, expected))
            .await
    }
    async fn put(
        &self,
        key: &str,
        value: &[u8],
    ) -> crate::store::StoreResult<crate::store::Revision> {
        self.timed("put", self.inner.put(key, value)).await
    }
    async fn put_with_lease(
        &self,
        key: &str,
        value: &[u8],
        lease: crate::store::LeaseId,
    ) -> crate::store::StoreResult<crate::store::Revision> {
        self.timed("put", self.inner.put_with_lease(key, value, lease))
            .await
    }
    async fn delete(
        &self,
        key: &str,
        expected: Option<crate::store::Revision>,
    ) -> crate::store::StoreResult<crate::store::Revision> {
        self.timed("delete", self.inner.delete(key, expected)).await
    }
    async fn delete_prefix(&self, prefix: &str) -> crate::store::StoreResult<u64> {
        self.timed("delete", self.inner.delete_prefix(prefix)).await
    }
    async fn txn(
        &self,
        txn: crate::store::Txn,
    ) -> crate::store::StoreResult<crate::store::Revision> {
        self.timed("txn", self.inner.txn(txn)).await
    }
    async fn txn_or_read(
        &self,
        txn: crate::store::Txn,
    ) -> crate::store::StoreResult<crate::store::TxnOutcome> {
        self.timed("txn", self.inner.txn_or_read(txn)).await
    }
    async fn get_many(
        &self,
        keys: &[String],
    ) -> crate::store::StoreResult<Vec<Option<crate::store::KeyValue>>> {
        self.timed("get", self.inner.get_many(keys)).await
    }
    async fn watch(
        &self,
        prefix: &str,
        start: crate::store::Revision,
    ) -> crate::store::StoreResult<crate::store::Watch> {
        self.timed("watch", self.inner.watch(prefix, start)).await
    }
    async fn grant_lease(
        &self,
        ttl: std::time::Duration,
    ) -> crate::store::StoreResult<crate::store::LeaseId> {
        self.timed("lease", self.inner.grant_lease(ttl)).await
    }
    async fn keep_alive(
        &self,
        lease: crate::store::LeaseId,
    ) -> crate::store::StoreResult<std::time::Duration> {
        self.timed("lease", self.inner.keep_alive(lease)).await
    }
    async fn revoke_lease(&self, lease: crate::store::LeaseId) -> crate::store::StoreResult<()> {
        self.timed("lease", self.inner.revoke_lease(lease)).await
    }
    async fn compact(&self, revision: crate::store::Revision) -> crate::store::StoreResult<()> {
        self.timed("compact", self.inner.compact(revision)).await
    }
    async fn revision(&self) -> crate::store::StoreResult<crate::store::Revision> {
        self.timed("get", self.inner.revision()).await
    }
}

/// The tunnel datapath's counters, read from the backend at each scrape: per tunnel
/// `tenet_tunnel_{packets,bytes,errors}_total{tunnel,direction}`, `…_too_big_total`,
/// `…_icmp_sent_total`, `…_ecn_total{action}`, and per namespace
/// `tenet_tunnel_dropped_total{reason}`. Kernel backends publish nothing here.
pub struct TunnelCollector(pub Arc<dyn crate::net::tunnel::TunnelBackend>);

impl std::fmt::Debug for TunnelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TunnelCollector")
    }
}

type Sample = (Labels, u64);

fn encode_counter(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[Sample],
) -> std::fmt::Result {
    use prometheus_client::encoding::EncodeMetric;
    use prometheus_client::metrics::TypedMetric;
    use prometheus_client::metrics::counter::ConstCounter;
    let mut metric = encoder.encode_descriptor(name, help, None, ConstCounter::<u64>::TYPE)?;
    for (labels, value) in samples {
        ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

impl prometheus_client::collector::Collector for TunnelCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> std::fmt::Result {
        let Some(stats) = self.0.stats() else {
            return Ok(());
        };
        let per = |dir: &str, f: &dyn Fn(&crate::net::tunnel::userspace::TunnelStats) -> u64| {
            stats
                .tunnels
                .iter()
                .map(|t| {
                    let mut l = labels("tunnel", &t.endpoint.name);
                    if !dir.is_empty() {
                        l.push(("direction".into(), dir.into()));
                    }
                    (l, f(t))
                })
                .collect::<Vec<Sample>>()
        };
        let both =
            |tx: &dyn Fn(&crate::net::tunnel::userspace::TunnelStats) -> u64,
             rx: &dyn Fn(&crate::net::tunnel::userspace::TunnelStats) -> u64| {
                let mut v = per("tx", tx);
                v.extend(per("rx", rx));
                v
            };
        encode_counter(
            &mut encoder,
            "tenet_tunnel_packets",
            "Packets through each tunnel, by direction",
            &both(&|t| t.tx_packets, &|t| t.rx_packets),
        )?;
        encode_counter(
            &mut encoder,
            "tenet_tunnel_bytes",
            "Bytes of inner frames through each tunnel, by direction",
            &both(&|t| t.tx_bytes, &|t| t.rx_bytes),
        )?;
        encode_counter(
            &mut encoder,
            "tenet_tunnel_errors",
            "Frames a tunnel could not send or deliver, by direction",
            &both(&|t| t.tx_errors, &|t| t.rx_errors),
        )?;
        encode_counter(
            &mut encoder,
            "tenet_tunnel_too_big",
            "Frames larger than the path MTU allows",
            &per("", &|t| t.tx_too_big),
        )?;
        encode_counter(
            &mut encoder,
            "tenet_tunnel_icmp_sent",
            "ICMP fragmentation-needed / packet-too-big replies sent to tenant senders",
            &per("", &|t| t.icmp_sent),
        )?;
        let mut ecn = Vec::new();
        for t in &stats.tunnels {
            for (action, v) in [("dropped", t.rx_ecn_dropped), ("marked", t.rx_ecn_marked)] {
                let mut l = labels("tunnel", &t.endpoint.name);
                l.push(("action".into(), action.into()));
                ecn.push((l, v));
            }
        }
        encode_counter(
            &mut encoder,
            "tenet_tunnel_ecn",
            "Received packets whose outer congestion mark dropped or marked the inner one",
            &ecn,
        )?;
        encode_counter(
            &mut encoder,
            "tenet_tunnel_dropped",
            "GRE packets dropped before reaching any tunnel, by reason",
            &[
                (labels("reason", "malformed"), stats.malformed),
                (labels("reason", "unknown_key"), stats.unknown_key),
                (labels("reason", "unknown_peer"), stats.unknown_peer),
            ],
        )
    }
}
