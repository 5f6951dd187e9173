//! Policy for one host, end to end: `/calico/v1` listed then watched → the calculation
//! engine → the dataplane driver → the kernel. Felix's whole job, in-process.
//!
//! A burst of etcd changes is taken as one batch (one calculation flush, one kernel
//! transaction). A lost watch (compaction, etcd restart) relists and starts a fresh engine;
//! the dataplane's first apply after that reconciles with the kernel, so nothing is torn
//! down in between. Every `resync` interval the kernel is checked and repaired (rules or sets
//! changed by hand). On shutdown every `cali` chain and set is removed.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::net::firewall::{FirewallError, IptablesVariant};
use crate::policy::calc::{CalcConfig, CalcGraph, Input};
use crate::policy::dataplane::{PolicyDataplane, Statuses, status_changes};
use crate::policy::render::WorkloadHook;
use crate::store::{Datastore, EventKind, Revision, StoreError};

/// The subtree Felix watches.
pub const FELIX_PREFIX: &str = "/calico/v1/";

#[derive(Clone, Debug)]
pub struct PolicyConfig {
    pub calc: CalcConfig,
    pub hook: WorkloadHook,
    /// The namespace whose firewall is programmed (`None`: the caller's).
    pub netns: Option<PathBuf>,
    pub iptables: Option<IptablesVariant>,
    /// How often the kernel is checked against the state.
    pub resync: Duration,
    /// How often Felix's status keys are written (Felix's ReportingIntervalSecs, 30 s); the
    /// `status` key lives three intervals (ReportingTTLSecs, 90 s).
    pub report: Duration,
    /// Told how long each change took to calculate (`"calculate"`: the calculation graph)
    /// and to apply (`"apply"`: iptables and IP sets), for metrics.
    pub observe: Option<PhaseObserver>,
}

/// Receives (phase, duration) after each policy change.
#[derive(Clone)]
pub struct PhaseObserver(pub Arc<dyn Fn(&'static str, Duration) + Send + Sync>);

impl std::fmt::Debug for PhaseObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PhaseObserver")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy firewall: {0}")]
    Firewall(#[from] FirewallError),
    #[error("policy datastore: {0}")]
    Store(#[from] StoreError),
}

/// A running policy sync.
pub struct PolicyHandle {
    applied: watch::Receiver<Revision>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), PolicyError>>,
    reporter: JoinHandle<()>,
    stop_reporting: watch::Sender<bool>,
}

impl PolicyHandle {
    /// Waits until every datastore change up to `revision` is in the kernel.
    pub async fn wait_applied(&mut self, revision: Revision) {
        let _ = self.applied.wait_for(|r| *r >= revision).await;
    }

    /// The revision whose state the kernel has.
    pub fn applied(&self) -> Revision {
        *self.applied.borrow()
    }

    /// Stops the sync and removes every chain and set it made.
    pub async fn stop(mut self) -> Result<(), PolicyError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = self.stop_reporting.send(true);
        let _ = (&mut self.reporter).await;
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "policy sync task failed");
                Ok(())
            }
        }
    }
}

/// Starts the policy sync on its own task. Fails at once if the firewall cannot be set up.
pub async fn spawn(
    store: Arc<dyn Datastore>,
    config: PolicyConfig,
) -> Result<PolicyHandle, PolicyError> {
    let dataplane = PolicyDataplane::new(
        config.netns.as_deref(),
        config.hook.clone(),
        config.iptables,
    )
    .await?;
    let (applied_tx, applied) = watch::channel(0);
    let (stop, stopped) = oneshot::channel();
    let (stop_reporting, reporting_stopped) = watch::channel(false);
    let span = info_span!("policy", host = %config.calc.hostname);
    let reporter = tokio::spawn(
        report(
            store.clone(),
            config.calc.hostname.clone(),
            config.report,
            applied.clone(),
            reporting_stopped,
        )
        .instrument(span.clone()),
    );
    let task = tokio::spawn(
        run(store, config, dataplane, applied_tx, stopped.map(|_| ())).instrument(span),
    );
    Ok(PolicyHandle {
        applied,
        stop: Some(stop),
        task,
        reporter,
        stop_reporting,
    })
}

/// Felix's endpoint status keys (`/calico/felix/v1/host/<h>/workload/<o>/<w>/endpoint/<e>`
/// = `{"status":"up"|"down"}`), written when `EndpointReportingEnabled` is true: only what
/// changed is written, a gone endpoint's key deleted; turned off, the keys written are
/// deleted (Felix keeps this off by default: it costs etcd writes).
#[derive(Default)]
struct EndpointReports {
    sent: Statuses,
}

impl EndpointReports {
    async fn sync(
        &mut self,
        store: &Arc<dyn Datastore>,
        host: &str,
        graph: &CalcGraph,
        dataplane: &PolicyDataplane,
    ) {
        use crate::calico::{CalicoKey, WorkloadEndpointId};
        let enabled = graph.felix_config().iter().any(|(k, v)| {
            k.eq_ignore_ascii_case("EndpointReportingEnabled")
                && v.trim().eq_ignore_ascii_case("true")
        });
        let now = if enabled {
            dataplane.endpoint_statuses().await
        } else {
            Default::default()
        };
        let key = |k: &crate::policy::dataplane::EndpointKey| {
            CalicoKey::WorkloadEndpointStatus(WorkloadEndpointId {
                host: host.to_string(),
                orchestrator: k.0.clone(),
                workload: k.1.clone(),
                endpoint: k.2.clone(),
            })
            .path()
        };
        let (gone, changed) = status_changes(&self.sent, &now);
        for k in gone {
            match store.delete(&key(&k), None).await {
                Ok(_) | Err(StoreError::NotFound { .. }) => {
                    self.sent.remove(&k);
                }
                Err(e) => warn!(error = %e, "deleting an endpoint status"),
            }
        }
        for (k, status) in changed {
            let value = format!(r#"{{"status":"{status}"}}"#);
            match store.put(&key(&k), value.as_bytes()).await {
                Ok(_) => {
                    self.sent.insert(k, status);
                }
                Err(e) => warn!(error = %e, "writing an endpoint status"),
            }
        }
    }
}

/// Felix's status report: once the policy is in sync, `status` (on a lease of three
/// intervals, so a dead agent's expires) and `last_reported_status` (kept) every interval.
async fn report(
    store: Arc<dyn Datastore>,
    host: String,
    interval: Duration,
    mut applied: watch::Receiver<Revision>,
    mut stop: watch::Receiver<bool>,
) {
    use crate::calico::{CalicoKey, FelixStatus};
    let started = std::time::Instant::now();
    tokio::select! {
        _ = applied.wait_for(|r| *r > 0) => {}
        _ = stop.wait_for(|s| *s) => return,
    }
    let value = |first: bool| {
        let status = FelixStatus {
            time: crate::policy::driver::iso8601(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default(),
            ),
            uptime: started.elapsed().as_secs_f64(),
            first_update: first,
        };
        serde_json::to_vec(&status).expect("status serialises")
    };
    let status_key = CalicoKey::FelixStatus { host: host.clone() }.path();
    let last_key = CalicoKey::FelixLastReportedStatus { host }.path();
    let mut leased: Option<crate::store::LeasedKey> = None;
    let mut first = true;
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let v = value(first);
        match &leased {
            Some(k) => k.set(v.clone()),
            None => match crate::store::LeasedKey::start(
                store.clone(),
                status_key.clone(),
                v.clone(),
                interval * 3,
            )
            .await
            {
                Ok(k) => leased = Some(k),
                Err(e) => {
                    warn!(error = %e, "writing Felix's status");
                    continue;
                }
            },
        }
        match store.put(&last_key, &v).await {
            Ok(_) => first = false,
            Err(e) => warn!(error = %e, "writing Felix's last reported status"),
        }
    }
    if let Some(k) = leased {
        k.stop().await;
    }
}

async fn run(
    store: Arc<dyn Datastore>,
    config: PolicyConfig,
    mut dataplane: PolicyDataplane,
    applied: watch::Sender<Revision>,
    stop: impl Future<Output = ()>,
) -> Result<(), PolicyError> {
    tokio::pin!(stop);
    let mut backoff = Duration::from_millis(200);
    loop {
        let session = sync_once(&store, &config, &mut dataplane, &applied);
        tokio::select! {
            biased;
            _ = &mut stop => break,
            ended = session => {
                match ended {
                    Ok(()) => backoff = Duration::from_millis(200),
                    Err(e) => {
                        warn!(error = %e, retry_in = ?backoff, "policy sync interrupted; listing again");
                    }
                }
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    info!("policy sync stopping: removing its chains and sets");
    dataplane.remove().await?;
    Ok(())
}

/// One list + watch session; returns when the watch is lost.
async fn sync_once(
    store: &Arc<dyn Datastore>,
    config: &PolicyConfig,
    dataplane: &mut PolicyDataplane,
    applied: &watch::Sender<Revision>,
) -> Result<(), PolicyError> {
    let listing = store.list(FELIX_PREFIX).await?;
    let mut graph = CalcGraph::new(config.calc.clone());
    for kv in &listing.kvs {
        if let Some(input) = Input::from_kv(&kv.key, Some(&kv.value)) {
            graph.apply(input);
        }
    }
    graph.apply(Input::InSync);
    dataplane.reset();
    for msg in graph.flush() {
        dataplane.handle(msg);
    }
    let report = dataplane.reconcile().await?;
    let stats = graph.stats();
    info!(
        revision = listing.revision,
        endpoints = stats.endpoints,
        local = stats.local_endpoints,
        policies = stats.active_policies,
        profiles = stats.active_profiles,
        ip_sets = stats.ip_sets,
        took = ?report.took,
        "policy in sync"
    );
    let mut endpoints = EndpointReports::default();
    endpoints
        .sync(store, &config.calc.hostname, &graph, dataplane)
        .await;
    applied.send_replace(listing.revision);
    let mut watch = store.watch(FELIX_PREFIX, listing.revision + 1).await?;
    let mut resync = tokio::time::interval(config.resync);
    resync.tick().await;
    loop {
        tokio::select! {
            event = watch.next() => {
                let Some(first) = event else {
                    return Err(StoreError::Unavailable {
                        key: FELIX_PREFIX.into(),
                        reason: "the watch ended".into(),
                    }.into());
                };
                let mut batch = vec![first?];
                while let Some(Some(more)) = watch.next().now_or_never() {
                    batch.push(more?);
                }
                let revision = batch.last().map_or(0, |e| e.revision);
                let calculating = std::time::Instant::now();
                for e in &batch {
                    let value = match e.kind {
                        EventKind::Put => Some(e.value.as_slice()),
                        EventKind::Delete => None,
                    };
                    if let Some(input) = Input::from_kv(&e.key, value) {
                        graph.apply(input);
                    }
                }
                let msgs = graph.flush();
                let count = msgs.len();
                for msg in msgs {
                    dataplane.handle(msg);
                }
                let applying = std::time::Instant::now();
                if let Some(observe) = &config.observe {
                    (observe.0)("calculate", applying - calculating);
                }
                let outcome = dataplane.apply().await;
                if let Some(observe) = &config.observe {
                    (observe.0)("apply", applying.elapsed());
                }
                match outcome {
                    Ok(report) => debug!(events = batch.len(), messages = count, took = ?report.took, "policy change applied"),
                    // The dataplane reconciles at its next apply or resync.
                    Err(e) => warn!(error = %e, "policy change not applied; retrying at the next resync"),
                }
                endpoints
                    .sync(store, &config.calc.hostname, &graph, dataplane)
                    .await;
                applied.send_replace(revision);
            }
            _ = resync.tick() => {
                if let Err(e) = dataplane.reconcile().await {
                    warn!(error = %e, "policy resync failed");
                }
                endpoints
                    .sync(store, &config.calc.hostname, &graph, dataplane)
                    .await;
            }
        }
    }
}
