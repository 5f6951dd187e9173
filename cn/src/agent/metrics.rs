//! tenet-cn's metrics (`--metrics-address`): what the node holds, what it was asked to do,
//! and whether it can do it (`/readyz`: etcd answers and the scheduler is connected).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tenet::metrics::{Counter, Endpoints, Family, Gauge, Labels, Registry, labels};
use tenet::store::Datastore;

use super::Agent;

#[derive(Default)]
pub(super) struct CnMetrics {
    vnics: Gauge,
    subnets: Gauge,
    starts: Family<Labels, Counter>,
    deletes: Family<Labels, Counter>,
    scheduler_connected: Gauge,
    connected: AtomicBool,
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

/// The endpoints for `agent`.
pub(super) fn endpoints(agent: &Arc<Agent>, store: Arc<dyn Datastore>) -> Endpoints {
    let mut registry = Registry::default();
    agent.metrics.register(&mut registry);
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
    };
    let etcd = tenet::metrics::datastore_ready(store, Duration::from_secs(2));
    let metrics = agent.metrics.clone();
    let ready: tenet::metrics::ReadyCheck = Arc::new(move || {
        let etcd = etcd();
        let metrics = metrics.clone();
        Box::pin(async move {
            etcd.await?;
            match metrics.connected.load(Ordering::Acquire) {
                true => Ok(()),
                false => Err("not connected to the scheduler".into()),
            }
        })
    });
    Endpoints {
        registry: Arc::new(Mutex::new(registry)),
        refresh: Arc::new(refresh),
        ready,
    }
}
