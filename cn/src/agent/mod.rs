//! The compute-node agent (`tenet-cn run`): one [`ComputeNode`] driven by SSNTP frames.
//!
//! On start it rebuilds from the kernel, then reconciles with its endpoints in etcd (an
//! endpoint whose VNIC is missing gets it back), then tells each concentrator again about
//! every subnet it has a tunnel for (TenantAdded; a concentrator treats repeats as no-ops).
//! STARTs run side by side (one at a time per instance); a DELETE waits for the STARTs
//! received before it and runs alone (see `Dispatcher`):
//!
//! * START → the instance's address (per-tenant IPAM; handle = the VNIC UUID), its VNIC
//!   (in the named network namespace for a container), its Calico workload endpoint
//!   (labelled with its tenant), and TenantAdded when its subnet's tunnel is new; a failure
//!   undoes what was done and is reported as StartFailure with ciao's reason;
//! * DELETE → every VNIC of the instance (found from its endpoints), the endpoints, the
//!   addresses, TenantRemoved for tunnels that went, and InstanceDeleted; or DeleteFailure.
//!
//! Its status lives under `/tenet/v1/node/<uuid>` on a lease, as the concentrator's does.

pub mod api;
pub mod api_client;
mod docker;
pub mod instance;
mod metrics;
pub mod routed;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ssntp::payload::{
    Delete, DeleteFailure, DeleteFailureReason, InstanceDeleted, InstanceDeletedEvent, Payload,
    Start, StartFailure, StartFailureReason, TenantAdded, TenantRemoved, TenantSubnet,
};
use ssntp::{
    Client, ClientConfig, ClientError, ClientEvent, Command, ErrorCode, Event, Frame, Identity,
    Operation, Role, Uuid,
};
use tenet::calico::vnic::VnicRecord;
use tenet::calico::{CalicoKey, WorkloadEndpoint};
use tenet::ipam::Ipam;
use tenet::keyspace::node::{self, NodeRole, NodeStatus};
use tenet::store::{Datastore, LeasedKey, StoreError};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::node::{TunnelEvent, TunnelEventKind};
use crate::{CnConfig, CnError, ComputeNode};

/// What `tenet-cn run` needs.
pub struct AgentConfig {
    pub node: CnConfig,
    /// Scheduler addresses (`host:port`), tried in order.
    pub servers: Vec<String>,
    pub identity: Identity,
    pub uuid: Uuid,
    /// The Calico host name its endpoints are written under.
    pub host: String,
    /// The orchestrator segment of endpoint keys (ciao's is `ciao`).
    pub orchestrator: String,
    pub status_ttl: Duration,
    /// The local API's unix socket (root only), if any.
    pub api_socket: Option<std::path::PathBuf>,
    /// Docker's remote network and IPAM driver on this socket, if any (dockerd finds
    /// `/run/docker/plugins/<name>.sock` as the driver `<name>`).
    pub docker_socket: Option<std::path::PathBuf>,
    /// /metrics, /healthz and /readyz on this address, if any.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Program Calico policy for this node's VNICs (bridged: br_netfilter and physdev;
    /// routed: the VNIC interfaces).
    pub policy: bool,
    /// Routed mode (no bridges, tunnels or concentrators; BGP through BIRD); `None`: GRE.
    pub routed: Option<routed::RoutedConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "the certificate holds roles {held} but neither agent nor netagent; issue one with `tenet cert issue --role agent`"
    )]
    Role { held: Role },
    #[error("compute node: {0}")]
    Cn(#[from] CnError),
    #[error("SSNTP: {0}")]
    Ssntp(#[from] ClientError),
    #[error("datastore: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Policy(#[from] tenet::policy::sync::PolicyError),
    #[error("BGP: {0}")]
    Bgp(#[from] tenet::bgp::BgpError),
    #[error("socket {path}: {source}")]
    Api {
        path: String,
        source: std::io::Error,
    },
}

pub(crate) struct Agent {
    uuid: Uuid,
    host: String,
    orchestrator: String,
    started: u64,
    node: ComputeNode,
    store: Arc<dyn Datastore>,
    ipams: Mutex<HashMap<String, Arc<Ipam>>>,
    /// TenantRemoved for subnets the rebuild removed, sent once connected.
    removed: Mutex<Vec<TunnelEvent>>,
    /// Tenants whose default profile is known to exist.
    profiles: Mutex<std::collections::HashSet<String>>,
    /// TenantAdded owed for tunnels failed STARTs made and other VNICs kept (`undo_vnic`).
    orphaned: Mutex<Vec<TunnelEvent>>,
    /// Routed mode's node, IPAM and BGP speaker.
    routed: Option<Arc<routed::RoutedParts>>,
    metrics: Arc<metrics::CnMetrics>,
}

/// Runs the agent until `shutdown` completes or the scheduler refuses it for good. The
/// dataplane stays for the next agent (`rebuild`).
pub async fn run(
    config: AgentConfig,
    store: Arc<dyn Datastore>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let held = config.identity.roles();
    let role = Role(held.bits() & (Role::AGENT | Role::NETAGENT).bits());
    if role.is_empty() {
        return Err(AgentError::Role { held });
    }
    let span = info_span!("cn_agent", uuid = %config.uuid, host = %config.host);
    // Concurrent STARTs read and write their endpoints in shared transactions.
    let store = tenet::store::GroupedStore::wrap(store);
    // With metrics on, every etcd call is timed.
    let (store, store_latency) = match config.metrics_address {
        Some(_) => {
            let (timed, latency) = tenet::metrics::TimedStore::wrap(store);
            (timed, Some(latency))
        }
        None => (store, None),
    };
    async move {
        let node = ComputeNode::init(config.node).await?;
        let report = node.rebuild().await?;
        info!(
            subnets = report.subnets,
            vnics = report.vnics,
            "rebuilt from the kernel"
        );
        let routed = match &config.routed {
            Some(rc) => Some(Arc::new(
                start_routed(rc, &node, &config.host, store.clone()).await?,
            )),
            None => None,
        };
        let agent = Arc::new(Agent {
            uuid: config.uuid,
            host: config.host,
            orchestrator: config.orchestrator,
            started: node::now(),
            node,
            store: store.clone(),
            ipams: Mutex::new(HashMap::new()),
            removed: Mutex::new(report.removed),
            profiles: Mutex::new(Default::default()),
            orphaned: Mutex::new(Vec::new()),
            routed,
            metrics: Default::default(),
        });
        agent.reconcile().await?;
        let route_refresh = agent.routed.clone().map(|r| {
            tokio::spawn(
                async move {
                    let mut tick = tokio::time::interval(routed::ROUTE_REFRESH);
                    tick.tick().await;
                    loop {
                        tick.tick().await;
                        if let Err(e) = r.node.reconcile().await {
                            warn!(error = %e, "checking the routes of routed VNICs");
                        }
                    }
                }
                .in_current_span(),
            )
        });
        let policy = match config.policy {
            true => Some(start_policy(&agent, store.clone()).await?),
            false => None,
        };
        let status = Arc::new(
            LeasedKey::start(
                store,
                node::key(&config.uuid.to_string()),
                agent.status(),
                config.status_ttl,
            )
            .await?,
        );
        let dispatch = Arc::new(Dispatcher::default());
        let mut client_config = ClientConfig::new(config.servers, config.identity, config.uuid);
        client_config.role = Some(role);
        let (client, mut events) = Client::start(client_config)?;
        let local = api::Local {
            agent: agent.clone(),
            client: client.clone(),
            dispatch: dispatch.clone(),
        };
        let mut front_ends = Vec::new();
        if let Some(path) = &config.api_socket {
            let listener = api::bind(path).map_err(|source| AgentError::Api {
                path: path.display().to_string(),
                source,
            })?;
            info!(socket = %path.display(), "local API listening");
            let task = tokio::spawn(api::serve(listener, local.clone()).in_current_span());
            front_ends.push((task, path.clone()));
        }
        if let Some(path) = &config.docker_socket {
            let listener = docker::bind(path).map_err(|source| AgentError::Api {
                path: path.display().to_string(),
                source,
            })?;
            info!(socket = %path.display(), "Docker network and IPAM driver listening");
            let task = tokio::spawn(docker::serve(listener, local.clone()).in_current_span());
            front_ends.push((task, path.clone()));
        }
        drop(local);
        let metrics_server = match config.metrics_address {
            Some(address) => {
                let endpoints = metrics::endpoints(&agent, agent.store.clone(), store_latency);
                let (_, task) =
                    tenet::metrics::serve(address, endpoints)
                        .await
                        .map_err(|source| AgentError::Api {
                            path: address.to_string(),
                            source,
                        })?;
                let bgp = tokio::spawn(
                    metrics::follow_bgp(agent.clone(), Duration::from_secs(5)).in_current_span(),
                );
                Some((task, bgp))
            }
            None => None,
        };
        tokio::pin!(shutdown);
        let result = loop {
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                event = events.recv() => match event {
                    None => break Ok(()),
                    Some(ClientEvent::Connected(server)) => {
                        info!(scheduler = %server.address, "connected");
                        agent.metrics.set_connected(true);
                        agent.announce_tunnels(&client).await;
                    }
                    Some(ClientEvent::Frame(frame)) => {
                        dispatch.frame(&agent, &client, &status, frame).await;
                    }
                    Some(ClientEvent::Disconnected { reason }) => {
                        warn!(%reason, "disconnected from the scheduler; reconnecting");
                        agent.metrics.set_connected(false);
                    }
                    Some(ClientEvent::Stopped(e)) => break e.map_or(Ok(()), |e| Err(e.into())),
                },
            }
        };
        if let Some((task, bgp)) = metrics_server {
            task.abort();
            bgp.abort();
        }
        for (task, path) in front_ends {
            task.abort();
            let _ = task.await;
            let _ = std::fs::remove_file(path);
        }
        // STARTs still running finish first (their reports need the connection).
        drop(dispatch.gate.write().await);
        client.close().await;
        if let Ok(status) = Arc::try_unwrap(status) {
            status.stop().await;
        }
        if let Some(policy) = policy
            && let Err(e) = policy.stop().await
        {
            warn!(error = %e, "removing the policy rules");
        }
        if let Some(task) = route_refresh {
            task.abort();
        }
        if let Some(routed) = &agent.routed {
            let speaker = routed
                .speaker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(speaker) = speaker {
                speaker.stop().await;
            }
        }
        info!("stopped");
        result
    }
    .instrument(span)
    .await
}

/// Routed mode: the routed node (adopting what a previous run left) and the BGP speaker,
/// peering from this node's compute address.
async fn start_routed(
    config: &routed::RoutedConfig,
    node: &ComputeNode,
    host: &str,
    store: Arc<dyn Datastore>,
) -> Result<routed::RoutedParts, AgentError> {
    let routed_node =
        crate::routed::RoutedNode::init(node.netlink.clone(), node.config.netns.clone()).await?;
    let mut speaker = tenet::bgp::SpeakerConfig::new(
        host,
        node.underlay().compute.addr.ip(),
        config.run_dir.clone(),
    );
    speaker.ip_v6 = config.ip_v6;
    speaker.as_num = config.as_num;
    speaker.netns = node.config.netns.clone();
    speaker.bird = config.bird.clone();
    speaker.options = config.bird_options.clone();
    let speaker = tenet::bgp::BgpSpeaker::start(store.clone(), speaker).await?;
    Ok(routed::RoutedParts {
        node: routed_node,
        ipam: Ipam::new(store),
        speaker: Mutex::new(Some(speaker)),
    })
}

/// Policy for this node's VNICs: bridged hook on the VNIC ports, scoped by tenant (tenants
/// may reuse addresses).
async fn start_policy(
    agent: &Agent,
    store: Arc<dyn Datastore>,
) -> Result<tenet::policy::sync::PolicyHandle, AgentError> {
    use tenet::policy::{calc::CalcConfig, render::WorkloadHook, sync};
    let config = sync::PolicyConfig {
        calc: CalcConfig {
            hostname: agent.host.clone(),
            scope_label: Some(tenet::calico::vnic::TENANT_LABEL.into()),
        },
        hook: match agent.routed {
            None => WorkloadHook::Bridged {
                prefixes: vec![format!("{}_", crate::names::VNIC)],
            },
            Some(_) => WorkloadHook::Routed {
                prefixes: vec![format!("{}_", crate::routed::ROUTED_VNIC)],
            },
        },
        netns: agent.node.config.netns.clone(),
        iptables: None,
        resync: Duration::from_secs(30),
        report: Duration::from_secs(30),
        observe: Some({
            let latency = agent.metrics.policy.clone();
            sync::PhaseObserver(Arc::new(move |phase, took| {
                latency
                    .0
                    .get_or_create(&tenet::metrics::labels("phase", phase))
                    .observe(took.as_secs_f64());
            }))
        }),
    };
    info!("programming Calico policy for this node's VNICs");
    Ok(sync::spawn(store, config).await?)
}

/// Runs frames concurrently where that cannot change the outcome. STARTs run at once (the
/// compute node's library is concurrent, and a START only ever announces a tunnel, so their
/// events cannot contradict each other), except two for the same instance: a repeated START
/// must find the first one's endpoint and be refused, not allocate a second address. A
/// DELETE — whose subnets are known only from its endpoints — waits for every running START
/// and holds the others back until it is done, so a START and a DELETE of one instance keep
/// their order. The local API goes through the same rules.
#[derive(Default)]
struct Dispatcher {
    gate: Arc<tokio::sync::RwLock<()>>,
    /// Instances with a START (or API create) running.
    busy: tenet::turns::Turns<String>,
}

impl Dispatcher {
    /// Runs `work` for a START of `instance` after any other one for the same instance. The
    /// caller holds the gate for reading (taking it again here could wait behind a queued
    /// DELETE that waits for the caller's).
    async fn one_per_instance<T>(
        &self,
        instance: &str,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        let _turn = self.busy.take(&instance.to_string()).await;
        work.await
    }

    async fn frame(
        self: &Arc<Self>,
        agent: &Arc<Agent>,
        client: &Client,
        status: &Arc<LeasedKey>,
        frame: Frame,
    ) {
        match frame.operation() {
            Some(Operation::Command(Command::Start)) => {
                let req = match Agent::parse_start(&frame) {
                    Ok(r) => r,
                    Err((instance, refused)) => {
                        return agent.start_failed(client, instance, refused).await;
                    }
                };
                // Taken here, in the order frames arrive, so a DELETE after this START waits
                // for it. Never waits: a DELETE holds the gate only while this loop is in it.
                let shared = self.gate.clone().read_owned().await;
                let (dispatch, agent, client, status) =
                    (self.clone(), agent.clone(), client.clone(), status.clone());
                // In the agent's span, so the START's log lines carry the node's ids too.
                tokio::spawn(
                    async move {
                        dispatch
                            .one_per_instance(&req.instance, agent.on_start(&client, &req))
                            .await;
                        status.set(agent.status());
                        // Last: whoever waits on the gate finds no clone of these left.
                        drop((agent, client, status, dispatch));
                        drop(shared);
                    }
                    .in_current_span(),
                );
            }
            Some(Operation::Command(Command::Delete)) => {
                let _alone = self.gate.write().await;
                agent.on_delete(client, &frame).await;
                status.set(agent.status());
            }
            other => debug!(operation = ?other, "not a compute-node operation; ignored"),
        }
    }
}

impl Agent {
    fn ipam(&self, tenant: &str) -> Arc<Ipam> {
        self.ipams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(tenant.to_string())
            .or_insert_with(|| Arc::new(Ipam::for_tenant(self.store.clone(), tenant)))
            .clone()
    }

    fn status(&self) -> Vec<u8> {
        let subnets = self.node.subnets();
        let status = NodeStatus {
            uuid: self.uuid.to_string(),
            role: NodeRole::ComputeNode,
            name: self.host.clone(),
            tenant: None,
            underlay_ip: self.node.underlay().compute.addr.ip(),
            version: env!("CARGO_PKG_VERSION").into(),
            started: self.started,
            tunnels: subnets.len(),
            subnets: subnets.into_iter().map(|(b, _, _)| b.subnet).collect(),
        };
        serde_json::to_vec(&status).expect("a status serialises")
    }

    /// The endpoints this host holds in etcd: (instance, vnic, record).
    async fn endpoints(&self) -> Result<Vec<(String, String, VnicRecord)>, StoreError> {
        let prefix = format!(
            "{}{}/workload/{}/",
            tenet::calico::HOSTS,
            tenet::calico::escape_name(&self.host),
            tenet::calico::escape_name(&self.orchestrator)
        );
        let mut out = Vec::new();
        for kv in self.store.list(&prefix).await?.kvs {
            let Ok(CalicoKey::WorkloadEndpoint(id)) = CalicoKey::parse(&kv.key) else {
                continue;
            };
            match serde_json::from_slice::<WorkloadEndpoint>(&kv.value)
                .map_err(|e| e.to_string())
                .and_then(|e| VnicRecord::from_endpoint(&e))
            {
                Ok(r) => out.push((id.workload, id.endpoint, r)),
                Err(e) => debug!(key = %kv.key, error = %e, "not a tenet VNIC endpoint"),
            }
        }
        Ok(out)
    }

    /// After a restart: an endpoint whose VNIC is missing gets it back (same name-independent
    /// identity, MAC and address). VNICs without an endpoint are reported.
    async fn reconcile(&self) -> Result<(), AgentError> {
        if let Some(routed) = &self.routed {
            self.reconcile_routed(routed).await?;
        }
        let endpoints = self.endpoints().await?;
        let present: std::collections::HashSet<String> = self.node.vnic_ids().into_iter().collect();
        let mut recreated = 0;
        for (instance, vnic, record) in &endpoints {
            if present.contains(vnic) {
                continue;
            }
            let config = instance::config_of(instance, vnic, record);
            match self.node.create_vnic(&config, None).await {
                Ok(_) => recreated += 1,
                Err(e) => error!(%instance, %vnic, error = %e, "could not recreate a VNIC"),
            }
        }
        // A VNIC without an endpoint is a START cut short (a crash between the VNIC and its
        // endpoint): nobody was told it exists, so it goes, with its address.
        let known: std::collections::HashSet<&String> =
            endpoints.iter().map(|(_, v, _)| v).collect();
        let orphans: Vec<(String, String)> = self
            .node
            .vnic_bindings()
            .into_iter()
            .filter(|(v, _)| !known.contains(v))
            .map(|(v, b)| (v, b.tenant))
            .collect();
        if !orphans.is_empty() {
            let ids: Vec<&str> = orphans.iter().map(|(v, _)| v.as_str()).collect();
            match self.node.destroy_vnics_by_id(&ids).await {
                Ok(destroyed) => {
                    let mut removed = self.removed.lock().unwrap_or_else(|p| p.into_inner());
                    removed.extend(destroyed.into_iter().filter_map(|d| d.tunnel));
                }
                Err(e) => error!(error = %e, "could not remove VNICs without an endpoint"),
            }
            for (vnic, tenant) in &orphans {
                warn!(%vnic, %tenant, "removed a VNIC without an endpoint (a START cut short)");
                self.release(tenant, vnic).await;
            }
        }
        let leaked = self.release_leaks().await;
        info!(
            endpoints = endpoints.len(),
            recreated,
            orphans = orphans.len(),
            leaked,
            "reconciled with etcd"
        );
        Ok(())
    }

    /// Releases the addresses this host's blocks hold for no endpoint of their tenant (a
    /// START cut short before its VNIC existed). Runs before the agent serves anything, so
    /// no START of this host is in flight.
    async fn release_leaks(&self) -> usize {
        let tenants = match tenet::ipam::tenants_with_ipam(self.store.as_ref()).await {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "cannot list the tenants' IPAM to look for leaks");
                return 0;
            }
        };
        let mut released = 0;
        for tenant in tenants {
            let ipam = self.ipam(&tenant);
            let report = match ipam.check().await {
                Ok(r) => r,
                Err(e) => {
                    warn!(%tenant, error = %e, "cannot check the tenant's IPAM");
                    continue;
                }
            };
            let ours: Vec<std::net::IpAddr> = report
                .findings
                .iter()
                .filter_map(|f| match f {
                    tenet::ipam::Finding::LeakedAddress { ip, host, handle }
                        if host.as_deref() == Some(self.host.as_str()) =>
                    {
                        warn!(%tenant, %ip, %handle, "releasing an address no endpoint uses");
                        Some(*ip)
                    }
                    _ => None,
                })
                .collect();
            if ours.is_empty() {
                continue;
            }
            match ipam.release_ips(&ours).await {
                Ok(not_assigned) => released += ours.len() - not_assigned.len(),
                Err(e) => warn!(%tenant, error = %e, "could not release leaked addresses"),
            }
        }
        released
    }

    /// TenantAdded for every subnet with a tunnel (after each connect).
    async fn announce_tunnels(&self, client: &Client) {
        let removed = std::mem::take(&mut *self.removed.lock().unwrap_or_else(|p| p.into_inner()));
        for t in &removed {
            self.tunnel_event(client, t).await;
        }
        let ip = self.node.underlay().compute.addr.ip();
        for (binding, _, _) in self.node.subnets() {
            let payload = TenantAdded::from(TenantSubnet {
                agent_uuid: self.uuid.to_string(),
                agent_ip: ip.to_string(),
                tenant_uuid: binding.tenant.clone(),
                tenant_subnet: binding.subnet.to_string(),
                concentrator_uuid: binding.concentrator.clone(),
                concentrator_ip: binding.concentrator_ip.to_string(),
                subnet_key: tenet::types::TunnelKey::from_subnet(&binding.subnet)
                    .map_or(0, |k| k.get().into()),
            });
            self.send(
                client,
                Operation::Event(Event::TenantAdded),
                payload.to_yaml(),
            )
            .await;
        }
    }

    fn tunnel_payload(&self, t: &TunnelEvent) -> TenantSubnet {
        TenantSubnet {
            agent_uuid: self.uuid.to_string(),
            agent_ip: t.cn_ip.to_string(),
            tenant_uuid: t.tenant_id.clone(),
            tenant_subnet: t.subnet.to_string(),
            concentrator_uuid: t.concentrator_id.clone(),
            concentrator_ip: t.concentrator_ip.to_string(),
            subnet_key: t.subnet_key.get().into(),
        }
    }

    async fn tunnel_event(&self, client: &Client, t: &TunnelEvent) {
        let payload = self.tunnel_payload(t);
        let (op, bytes) = match t.kind {
            TunnelEventKind::Add => (Event::TenantAdded, TenantAdded::from(payload).to_yaml()),
            TunnelEventKind::Del => (Event::TenantRemoved, TenantRemoved::from(payload).to_yaml()),
        };
        self.send(client, Operation::Event(op), bytes).await;
    }

    async fn send(&self, client: &Client, op: Operation, payload: Vec<u8>) {
        if let Err(e) = client.send(Frame::new(op, self.uuid, payload)).await {
            warn!(error = %e, ?op, "could not send");
        }
    }

    /// START's request, or the failure to report (instance, reason).
    fn parse_start(
        frame: &Frame,
    ) -> Result<instance::StartRequest, (String, instance::Refused<StartFailureReason>)> {
        match Start::from_yaml(&frame.payload) {
            Err(e) => Err((
                String::new(),
                instance::Refused {
                    reason: StartFailureReason::InvalidPayload,
                    detail: e.to_string(),
                },
            )),
            Ok(s) => instance::start_request(&s.start).map_err(|r| (s.start.instance_uuid, r)),
        }
    }

    async fn on_start(&self, client: &Client, req: &instance::StartRequest) {
        let span = info_span!("start", instance = %req.instance, vnic = %req.vnic, tenant = %req.tenant, subnet = %req.subnet);
        // A VM's queue descriptors close with `outcome`: over SSNTP nobody takes them.
        let outcome = self.start(req).instrument(span).await;
        self.announce_start(client, &outcome).await;
        if let Err(refused) = outcome {
            self.start_failed(client, req.instance.clone(), refused)
                .await
        }
    }

    /// The TenantAdded a START owes, whether it was done or failed: its new tunnel, and
    /// any tunnel a failed START left to other VNICs (`undo_vnic`).
    pub(super) async fn announce_start(
        &self,
        client: &Client,
        outcome: &Result<instance::Started, instance::Refused<StartFailureReason>>,
    ) {
        if let Ok(instance::Started {
            tunnel: Some(tunnel),
            ..
        }) = outcome
        {
            self.tunnel_event(client, tunnel).await;
        }
        for tunnel in self.take_orphaned() {
            self.tunnel_event(client, &tunnel).await;
        }
    }

    async fn start_failed(
        &self,
        client: &Client,
        instance: String,
        refused: instance::Refused<StartFailureReason>,
    ) {
        warn!(%instance, reason = ?refused.reason, detail = %refused.detail, "START failed");
        let failure = StartFailure {
            node_uuid: self.uuid.to_string(),
            instance_uuid: instance,
            reason: refused.reason,
            restart: false,
            detail: refused.detail,
        };
        self.send(
            client,
            Operation::Error(ErrorCode::StartFailure),
            failure.to_yaml(),
        )
        .await;
    }

    async fn on_delete(&self, client: &Client, frame: &Frame) {
        let (instance, outcome) = match Delete::from_yaml(&frame.payload) {
            Err(e) => (
                String::new(),
                Err(instance::Refused {
                    reason: DeleteFailureReason::InvalidPayload,
                    detail: e.to_string(),
                }),
            ),
            Ok(d) if d.delete.instance_uuid.trim().is_empty() => (
                String::new(),
                Err(instance::Refused {
                    reason: DeleteFailureReason::InvalidData,
                    detail: "instance_uuid is empty".into(),
                }),
            ),
            Ok(d) => {
                let instance = d.delete.instance_uuid.trim().to_string();
                let span = info_span!("delete", %instance);
                let r = self.delete(&instance, None).instrument(span).await;
                (instance, r)
            }
        };
        match outcome {
            Ok(tunnels) => {
                for t in &tunnels {
                    self.tunnel_event(client, t).await;
                }
                let event = InstanceDeleted::from(InstanceDeletedEvent {
                    instance_uuid: instance,
                });
                self.send(
                    client,
                    Operation::Event(Event::InstanceDeleted),
                    event.to_yaml(),
                )
                .await;
            }
            Err(refused) => {
                warn!(%instance, reason = ?refused.reason, detail = %refused.detail, "DELETE failed");
                let failure = DeleteFailure {
                    node_uuid: self.uuid.to_string(),
                    instance_uuid: instance,
                    reason: refused.reason,
                    detail: refused.detail,
                };
                self.send(
                    client,
                    Operation::Error(ErrorCode::DeleteFailure),
                    failure.to_yaml(),
                )
                .await;
            }
        }
    }
}
