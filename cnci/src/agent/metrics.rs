//! tenet-cnci's metrics (`--metrics-address`): the subnets and tunnels it serves, the frames
//! it handled, and `/readyz` (etcd answers and the scheduler is connected).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tenet::metrics::{Counter, Endpoints, Family, Gauge, Labels, Registry, labels};
use tenet::store::Datastore;

#[derive(Default)]
pub(super) struct CnciMetrics {
    pub subnets: Gauge,
    pub tunnels: Gauge,
    frames: Family<Labels, Counter>,
    scheduler_connected: Gauge,
    connected: AtomicBool,
}

impl CnciMetrics {
    pub fn frame(&self, operation: &str) {
        self.frames
            .get_or_create(&labels("operation", operation))
            .inc();
    }

    pub fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Release);
        self.scheduler_connected.set(i64::from(up));
    }

    pub fn endpoints(self: &Arc<Self>, store: Arc<dyn Datastore>) -> Endpoints {
        let mut registry = Registry::default();
        registry.register(
            "tenet_cnci_subnets",
            "Remote subnets attached",
            self.subnets.clone(),
        );
        registry.register(
            "tenet_cnci_tunnels",
            "Tunnels to compute nodes",
            self.tunnels.clone(),
        );
        registry.register(
            "tenet_cnci_frames",
            "SSNTP frames handled, by operation",
            self.frames.clone(),
        );
        registry.register(
            "tenet_cnci_scheduler_connected",
            "1 while the SSNTP connection to the scheduler is up",
            self.scheduler_connected.clone(),
        );
        let etcd = tenet::metrics::datastore_ready(store, Duration::from_secs(2));
        let me = self.clone();
        let ready: tenet::metrics::ReadyCheck = Arc::new(move || {
            let etcd = etcd();
            let me = me.clone();
            Box::pin(async move {
                etcd.await?;
                match me.connected.load(Ordering::Acquire) {
                    true => Ok(()),
                    false => Err("not connected to the scheduler".into()),
                }
            })
        });
        Endpoints {
            registry: Arc::new(Mutex::new(registry)),
            refresh: Arc::new(|| {}),
            ready,
        }
    }
}
