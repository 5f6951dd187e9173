//! tenet-cn's metrics (`--metrics-address`): what the node holds, what it was asked to do,
//! and whether it can do it (`/readyz`: etcd answers and the scheduler is connected).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tenet::metrics::{Counter, Endpoints, Family, Gauge, Labels, Registry, labels};
use tenet::store::Datastore;

use super::Agent;

/// Policy calculation and apply durations (`tenet_policy_duration_seconds{phase}`).
#[derive(Clone)]
pub(super) struct PolicyLatency(pub tenet::metrics::StoreLatency);

impl Default for PolicyLatency {
    fn default() -> Self {
        PolicyLatency(tenet::metrics::latency_family())
    }
}

#[derive(Default)]
pub(super) struct CnMetrics {
    vnics: Gauge,
    subnets: Gauge,
    starts: Family<Labels, Counter>,
    deletes: Family<Labels, Counter>,
    scheduler_connected: Gauge,
    connected: Arc<AtomicBool>,
    pub(super) policy: PolicyLatency,
    bgp_sessions: Gauge,
    bgp_established: Gauge,
    ipam_assigned: Counter,
    ipam_released: Counter,
    ipam_transactions: Counter,
    ipam_conflicts: Counter,
}

impl CnMetrics {
    fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register("tenet_cn_vnics", "VNICs on this node", self.vnics.clone());
        registry.register(
            "tenet_cn_subnets",
            "Tenant subnets with a bridge and tunnel on this node (gre mode)",
            self.subnets.clone(),
        );
        registry.register(
            "tenet_cn_starts",
            "STARTs and local creates, by result (ok, or ciao's refusal reason)",
            self.starts.clone(),
        );
        registry.register(
            "tenet_cn_deletes",
            "DELETEs and local destroys, by result",
            self.deletes.clone(),
        );
        for (name, help, counter) in [
            (
                "tenet_ipam_assigned",
                "Addresses assigned by this node's IPAM",
                &self.ipam_assigned,
            ),
            (
                "tenet_ipam_released",
                "Addresses released by this node's IPAM",
                &self.ipam_released,
            ),
            (
                "tenet_ipam_transactions",
                "IPAM transactions committed in etcd",
                &self.ipam_transactions,
            ),
            (
                "tenet_ipam_conflicts",
                "IPAM transactions that lost a race and were retried",
                &self.ipam_conflicts,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "tenet_policy_duration_seconds",
            "How long each policy change took to calculate and to apply (iptables, IP sets), by phase",
            self.policy.0.clone(),
        );
        registry.register(
            "tenet_bgp_sessions",
            "BGP sessions of this node's BIRD (routed mode)",
            self.bgp_sessions.clone(),
        );
        registry.register(
            "tenet_bgp_sessions_established",
            "BGP sessions of this node's BIRD that are Established (routed mode)",
            self.bgp_established.clone(),
        );
        registry.register(
            "tenet_cn_scheduler_connected",
            "1 while the SSNTP connection to the scheduler is up",
            self.scheduler_connected.clone(),
        );
    }

    pub(super) fn started<T, R: serde::Serialize>(
        &self,
        outcome: &Result<T, super::instance::Refused<R>>,
    ) {
        self.starts
            .get_or_create(&labels("result", &result(outcome)))
            .inc();
    }

    pub(super) fn deleted<T, R: serde::Serialize>(
        &self,
        outcome: &Result<T, super::instance::Refused<R>>,
    ) {
        self.deletes
            .get_or_create(&labels("result", &result(outcome)))
            .inc();
    }

    pub(super) fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Release);
        self.scheduler_connected.set(i64::from(up));
    }
}

fn result<T, R: serde::Serialize>(outcome: &Result<T, super::instance::Refused<R>>) -> String {
    match outcome {
        Ok(_) => "ok".into(),
        Err(r) => serde_json::to_value(&r.reason)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "refused".into()),
    }
}

/// Routed mode: reads the BIRD's sessions every `every` into the BGP gauges (BIRD is asked
/// over its control socket, so not at scrape time).
pub(super) async fn follow_bgp(agent: Arc<Agent>, every: Duration) {
    let Some(routed) = agent.routed.clone() else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let socket = routed
            .speaker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|s| s.config().control_socket());
        let Some(socket) = socket else { return };
        let sessions = match tenet::bgp::control::BirdControl::connect(&socket).await {
            Ok(mut control) => control.protocols().await,
            Err(e) => Err(e),
        };
        match sessions {
            Ok(protocols) => {
                let bgp: Vec<_> = protocols.iter().filter(|p| p.proto == "BGP").collect();
                agent.metrics.bgp_sessions.set(bgp.len() as i64);
                agent
                    .metrics
                    .bgp_established
                    .set(bgp.iter().filter(|p| p.established()).count() as i64);
            }
            Err(e) => tracing::debug!(error = %e, "reading BIRD's sessions for metrics"),
        }
    }
}

/// The endpoints for `agent`.
pub(super) fn endpoints(
    agent: &Arc<Agent>,
    store: Arc<dyn Datastore>,
    store_latency: Option<tenet::metrics::StoreLatency>,
) -> Endpoints {
    let mut registry = Registry::default();
    agent.metrics.register(&mut registry);
    registry.register_collector(Box::new(tenet::metrics::TunnelCollector(
        agent.node.tunnel_backend().clone(),
    )));
    if let Some(latency) = store_latency {
        registry.register(
            "tenet_etcd_request_duration_seconds",
            "Round trip of each etcd call, by operation",
            latency,
        );
    }
    let refreshed = agent.clone();
    let refresh = move || {
        let node = &refreshed.node;
        let routed = refreshed
            .routed
            .as_ref()
            .map_or(0, |r| r.node.vnics().len());
        refreshed
            .metrics
            .vnics
            .set((node.vnic_ids().len() + routed) as i64);
        refreshed.metrics.subnets.set(node.subnets().len() as i64);
        // The IPAM counters are the sums over the node's IPAM clients (one per tenant, and
        // Calico's in routed mode); a counter only moves forward to them.
        let mut ipams: Vec<Arc<tenet::ipam::Ipam>> = refreshed
            .ipams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        if let Some(r) = &refreshed.routed {
            ipams.push(Arc::new(r.ipam.clone()));
        }
        let sum = |f: fn(&tenet::ipam::IpamStats) -> &std::sync::atomic::AtomicU64| -> u64 {
            ipams
                .iter()
                .map(|i| f(i.stats()).load(Ordering::Relaxed))
                .sum()
        };
        let m = &refreshed.metrics;
        for (counter, total) in [
            (&m.ipam_assigned, sum(|s| &s.assigned)),
            (&m.ipam_released, sum(|s| &s.released)),
            (&m.ipam_transactions, sum(|s| &s.transactions)),
            (&m.ipam_conflicts, sum(|s| &s.conflicts)),
        ] {
            counter.inc_by(total.saturating_sub(counter.get()));
        }
    };
    let ready = tenet::metrics::agent_ready(store, agent.metrics.connected.clone());
    Endpoints {
        registry: Arc::new(Mutex::new(registry)),
        refresh: Arc::new(refresh),
        ready,
    }
}
