//! tenet-cnci's metrics (`--metrics-address`): the subnets and tunnels it serves, the frames
//! it handled, the tunnel datapath's counters, and `/readyz` (etcd answers and the scheduler is connected).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tenet::metrics::{Counter, Endpoints, Family, Gauge, Labels, Registry, labels};
use tenet::store::Datastore;

#[derive(Default)]
pub(super) struct CnciMetrics {
    pub subnets: Gauge,
    pub tunnels: Gauge,
    pub dhcp_leases: Gauge,
    pub dnsmasq_restarts: Counter,
    frames: Family<Labels, Counter>,
    scheduler_connected: Gauge,
    connected: Arc<AtomicBool>,
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

    pub fn endpoints(
        self: &Arc<Self>,
        store: Arc<dyn Datastore>,
        store_latency: Option<tenet::metrics::StoreLatency>,
        tunnels: Arc<dyn tenet::net::tunnel::TunnelBackend>,
    ) -> Endpoints {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(tenet::metrics::TunnelCollector(tunnels)));
        if let Some(latency) = store_latency {
            registry.register(
                "tenet_etcd_request_duration_seconds",
                "Round trip of each etcd call, by operation",
                latency,
            );
        }
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
            "tenet_cnci_dhcp_leases",
            "DHCP leases held by the subnets' dnsmasq",
            self.dhcp_leases.clone(),
        );
        registry.register(
            "tenet_cnci_dnsmasq_restarts",
            "Times a subnet's dnsmasq died and was started again",
            self.dnsmasq_restarts.clone(),
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
        let ready = tenet::metrics::agent_ready(store, self.connected.clone());
        Endpoints {
            registry: Arc::new(Mutex::new(registry)),
            refresh: Arc::new(|| {}),
            ready,
        }
    }
}
