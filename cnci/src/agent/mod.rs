//! The concentrator agent (`tenet-cnci run`): one [`Concentrator`] driven by SSNTP frames.
//!
//! On start it rebuilds from the kernel and etcd before it takes a frame, so a restarted or
//! replaced concentrator serves what it served. On every (re)connect it announces itself
//! (ConcentratorInstanceAdded). The frames of one subnet are applied **in the order
//! received**, different subnets side by side, and any other frame alone after everything
//! received before it (`dispatch`):
//!
//! * TenantAdded / TenantRemoved → attach / detach the compute node's tunnel;
//! * AssignPublicIP / ReleasePublicIP → floating IP, answered with PublicIPAssigned /
//!   PublicIPUnassigned, or the ciao error payload with its reason;
//! * RefreshCNCI → the tenant mesh.
//!
//! Its status lives under `/tenet/v1/node/<uuid>` on a lease, so a dead agent disappears.

mod dispatch;
pub mod frames;
mod metrics;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use ssntp::payload::{
    CnciRefresh, ConcentratorInstance, ConcentratorInstanceAdded, Payload, PublicIpAssigned,
    PublicIpCommand, PublicIpEvent, PublicIpFailure, PublicIpFailureReason, PublicIpUnassigned,
    ReleasePublicIp, TenantAdded, TenantRemoved,
};
use ssntp::{
    Client, ClientConfig, ClientError, ClientEvent, Command, ErrorCode, Event, Frame, Identity,
    Operation, Role, Uuid,
};
use tenet::keyspace::node::{self, NodeRole, NodeStatus};
use tenet::store::{Datastore, LeasedKey, StoreError};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::{CnciConfig, CnciError, Concentrator};

/// What `tenet-cnci run` needs.
pub struct AgentConfig {
    /// The concentrator; its `id` is the SSNTP UUID's text.
    pub concentrator: CnciConfig,
    /// Scheduler addresses (`host:port`), tried in order.
    pub servers: Vec<String>,
    pub identity: Identity,
    pub uuid: Uuid,
    /// Where mesh addresses come from when RefreshCNCI does not give them.
    pub mesh_cidr: Option<Ipv4Network>,
    /// The status key's lease.
    pub status_ttl: Duration,
    /// /metrics, /healthz and /readyz on this address, if any.
    pub metrics_address: Option<std::net::SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "the certificate holds roles {held} but not cnciagent; issue one with `tenet cert issue --role cnciagent`"
    )]
    Role { held: Role },
    #[error("concentrator: {0}")]
    Cnci(#[from] CnciError),
    #[error("SSNTP: {0}")]
    Ssntp(#[from] ClientError),
    #[error("status in etcd: {0}")]
    Store(#[from] StoreError),
    #[error("metrics address {0}: {1}")]
    Metrics(std::net::SocketAddr, std::io::Error),
}

/// Runs the agent until `shutdown` completes or the scheduler refuses it for good. On
/// shutdown the kernel state stays for the next agent to take over (`rebuild`).
pub async fn run(
    config: AgentConfig,
    store: Arc<dyn Datastore>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let held = config.identity.roles();
    if !held.contains(Role::CNCIAGENT) {
        return Err(AgentError::Role { held });
    }
    let span = info_span!("cnci_agent", uuid = %config.uuid, tenant = %config.concentrator.tenant);
    // With metrics on, every etcd call is timed.
    let (store, store_latency) = match config.metrics_address {
        Some(_) => {
            let (timed, latency) = tenet::metrics::TimedStore::wrap(store);
            (timed, Some(latency))
        }
        None => (store, None),
    };
    async move {
        let conc = Concentrator::init(config.concentrator, Some(store.clone())).await?;
        let report = conc.rebuild().await?;
        info!(
            repairs = report.repairs.len(),
            "rebuilt from the kernel and etcd"
        );
        let started = node::now();
        let agent = Arc::new(Agent {
            uuid: config.uuid,
            mesh_cidr: config.mesh_cidr,
            started,
            conc,
            metrics: Default::default(),
        });
        let metrics_server = match config.metrics_address {
            Some(address) => {
                let endpoints = agent.metrics.endpoints(
                    store.clone(),
                    store_latency,
                    agent.conc.tunnel_backend().clone(),
                );
                let (_, task) = tenet::metrics::serve(address, endpoints)
                    .await
                    .map_err(|e| AgentError::Metrics(address, e))?;
                Some(task)
            }
            None => None,
        };
        let status = Arc::new(
            LeasedKey::start(
                store,
                node::key(&config.uuid.to_string()),
                agent.status().await,
                config.status_ttl,
            )
            .await?,
        );
        let dispatch = dispatch::Dispatch::default();
        let mut client_config = ClientConfig::new(config.servers, config.identity, config.uuid);
        client_config.role = Some(Role::CNCIAGENT);
        let (client, mut events) = Client::start(client_config)?;
        tokio::pin!(shutdown);
        // Leases and restarts change without frames: their gauges are read again every few
        // seconds.
        let mut refresh = tokio::time::interval(Duration::from_secs(5));
        let result = loop {
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                _ = refresh.tick(), if metrics_server.is_some() => {
                    agent.refresh_dhcp_metrics().await;
                }
                event = events.recv() => match event {
                    None => break Ok(()),
                    Some(ClientEvent::Connected(server)) => {
                        info!(scheduler = %server.address, "connected");
                        agent.metrics.set_connected(true);
                        agent.announce(&client).await;
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
        if let Some(task) = metrics_server {
            task.abort();
        }
        // Subnet changes still queued are applied first.
        drop(dispatch.gate.write().await);
        client.close().await;
        if let Ok(status) = Arc::try_unwrap(status) {
            status.stop().await;
        }
        agent.conc.shutdown().await;
        info!("stopped");
        result
    }
    .instrument(span)
    .await
}

struct Agent {
    uuid: Uuid,
    mesh_cidr: Option<Ipv4Network>,
    started: u64,
    conc: Concentrator,
    metrics: std::sync::Arc<metrics::CnciMetrics>,
}

impl Agent {
    /// The status key's value. Cheap, since it is written after every subnet change: no
    /// file is read (with hundreds of subnets, reading each one's leases file under the
    /// subnets' lock after every TenantAdded made attaching slower the more subnets there
    /// were).
    async fn status(&self) -> Vec<u8> {
        let (subnets, tunnels) = self.conc.summary().await;
        let status = NodeStatus {
            uuid: self.uuid.to_string(),
            role: NodeRole::Concentrator,
            name: self.conc.config().id.clone(),
            tenant: Some(self.conc.config().tenant.clone()),
            underlay_ip: self.conc.compute().addr.ip(),
            version: env!("CARGO_PKG_VERSION").into(),
            started: self.started,
            tunnels,
            subnets,
        };
        self.metrics.subnets.set(status.subnets.len() as i64);
        self.metrics.tunnels.set(status.tunnels as i64);
        serde_json::to_vec(&status).expect("a status serialises")
    }

    /// The DHCP gauges (leases, dnsmasq restarts), which change without frames: read every
    /// few seconds.
    async fn refresh_dhcp_metrics(&self) {
        let subnets = self.conc.subnets().await;
        let leases: usize = subnets.iter().map(|s| s.dhcp_leases).sum();
        let restarts: u64 = subnets.iter().map(|s| u64::from(s.dhcp_restarts)).sum();
        self.metrics.dhcp_leases.set(leases as i64);
        let counted = self.metrics.dnsmasq_restarts.get();
        self.metrics
            .dnsmasq_restarts
            .inc_by(restarts.saturating_sub(counted));
    }

    /// ConcentratorInstanceAdded: who this concentrator is and where its tunnels end.
    async fn announce(&self, client: &Client) {
        let payload = ConcentratorInstanceAdded::from(ConcentratorInstance {
            instance_uuid: self.uuid.to_string(),
            tenant_uuid: self.conc.config().tenant.clone(),
            concentrator_ip: self.conc.compute().addr.ip().to_string(),
            concentrator_mac: self.conc.compute_mac().await.unwrap_or_default(),
        });
        if let Err(e) = client
            .send_event(Event::ConcentratorInstanceAdded, payload.to_yaml())
            .await
        {
            warn!(error = %e, "could not announce the concentrator");
        }
    }

    fn count(&self, frame: &Frame) {
        self.metrics.frame(
            &frame
                .operation()
                .map_or_else(|| "unknown".to_string(), |op| format!("{op:?}")),
        );
    }

    /// Every frame but the subnet changes (`dispatch` applies those).
    async fn handle(&self, client: &Client, frame: &Frame) {
        let Some(op) = frame.operation() else {
            debug!("frame without a known operation; ignored");
            return;
        };
        match op {
            Operation::Command(Command::AssignPublicIp) => self.assign(client, frame).await,
            Operation::Command(Command::ReleasePublicIp) => self.release(client, frame).await,
            Operation::Command(Command::RefreshCnci) => self.refresh(frame).await,
            other => debug!(operation = ?other, "not a concentrator operation; ignored"),
        }
    }

    /// The subnet a TenantAdded (`added`) or TenantRemoved is about; `None` (logged) when
    /// its payload is unusable.
    fn subnet_change(&self, added: bool, frame: &Frame) -> Option<crate::RemoteSubnet> {
        let what = if added {
            "TenantAdded"
        } else {
            "TenantRemoved"
        };
        let parsed = if added {
            TenantAdded::from_yaml(&frame.payload).map(|p| p.tenant_added)
        } else {
            TenantRemoved::from_yaml(&frame.payload).map(|p| p.tenant_removed)
        };
        let remote = parsed
            .map_err(|e| e.to_string())
            .and_then(|p| frames::remote_subnet(&p).map_err(|e| e.to_string()));
        match remote {
            Ok(r) => Some(r),
            Err(error) => {
                warn!(%error, "{what} dropped");
                None
            }
        }
    }

    /// Attaches (`added`) or detaches the compute node's tunnel for the subnet.
    async fn apply(&self, remote: &crate::RemoteSubnet, added: bool) {
        if added {
            match self.conc.attach_remote_subnet(remote).await {
                Ok(a) => {
                    info!(subnet = %remote.subnet, cn = %remote.cn_id, cn_ip = %remote.cn_ip, result = ?a, "TenantAdded")
                }
                Err(e) => {
                    error!(subnet = %remote.subnet, cn = %remote.cn_id, error = %e, "TenantAdded failed")
                }
            }
        } else {
            match self.conc.detach_remote_subnet(remote).await {
                Ok(d) => {
                    info!(subnet = %remote.subnet, cn = %remote.cn_id, result = ?d, "TenantRemoved")
                }
                Err(e) => {
                    error!(subnet = %remote.subnet, cn = %remote.cn_id, error = %e, "TenantRemoved failed")
                }
            }
        }
    }

    async fn assign(&self, client: &Client, frame: &Frame) {
        let cmd = match ssntp::payload::AssignPublicIp::from_yaml(&frame.payload) {
            Ok(p) => p.assign_public_ip,
            Err(e) => {
                warn!(error = %e, "AssignPublicIP refused");
                let failure = PublicIpFailure {
                    concentrator_uuid: self.uuid.to_string(),
                    reason: PublicIpFailureReason::InvalidPayload,
                    ..Default::default()
                };
                return self
                    .fail(client, ErrorCode::AssignPublicIpFailure, failure)
                    .await;
            }
        };
        let outcome = match frames::public_ip(&cmd, true) {
            Err(e) => Err((PublicIpFailureReason::InvalidData, e.to_string())),
            Ok((public, private)) => self
                .conc
                .assign_floating_ip(public, private.expect("asked for"))
                .await
                .map_err(|e| {
                    (
                        failure_reason(&e, PublicIpFailureReason::AssignFailure),
                        e.to_string(),
                    )
                }),
        };
        match outcome {
            Ok(_) => {
                info!(public = %cmd.public_ip, private = %cmd.private_ip, instance = %cmd.instance_uuid, "AssignPublicIP");
                let event = PublicIpAssigned::from(self.event_of(&cmd));
                self.send(client, Event::PublicIpAssigned, event.to_yaml())
                    .await;
            }
            Err((reason, why)) => {
                warn!(public = %cmd.public_ip, private = %cmd.private_ip, %why, ?reason, "AssignPublicIP failed");
                let failure = failure_of(&cmd, &self.uuid, reason);
                self.fail(client, ErrorCode::AssignPublicIpFailure, failure)
                    .await;
            }
        }
    }

    async fn release(&self, client: &Client, frame: &Frame) {
        let cmd = match ReleasePublicIp::from_yaml(&frame.payload) {
            Ok(p) => p.release_public_ip,
            Err(e) => {
                warn!(error = %e, "ReleasePublicIP refused");
                let failure = PublicIpFailure {
                    concentrator_uuid: self.uuid.to_string(),
                    reason: PublicIpFailureReason::InvalidPayload,
                    ..Default::default()
                };
                return self
                    .fail(client, ErrorCode::UnassignPublicIpFailure, failure)
                    .await;
            }
        };
        let outcome = match frames::public_ip(&cmd, false) {
            Err(e) => Err((PublicIpFailureReason::InvalidData, e.to_string())),
            Ok((public, _)) => self.conc.release_floating_ip(public).await.map_err(|e| {
                (
                    failure_reason(&e, PublicIpFailureReason::ReleaseFailure),
                    e.to_string(),
                )
            }),
        };
        match outcome {
            // Releasing what is not assigned is not an error (idempotent, as a retry needs).
            Ok(_) => {
                info!(public = %cmd.public_ip, instance = %cmd.instance_uuid, "ReleasePublicIP");
                let event = PublicIpUnassigned::from(self.event_of(&cmd));
                self.send(client, Event::PublicIpUnassigned, event.to_yaml())
                    .await;
            }
            Err((reason, why)) => {
                warn!(public = %cmd.public_ip, %why, ?reason, "ReleasePublicIP failed");
                let failure = failure_of(&cmd, &self.uuid, reason);
                self.fail(client, ErrorCode::UnassignPublicIpFailure, failure)
                    .await;
            }
        }
    }

    async fn refresh(&self, frame: &Frame) {
        let cmd = match CnciRefresh::from_yaml(&frame.payload) {
            Ok(p) => p.cnci_refresh,
            Err(e) => return warn!(error = %e, "RefreshCNCI dropped"),
        };
        let mesh = match frames::mesh(&cmd, self.mesh_cidr, self.conc.compute().addr.ip()) {
            Ok(m) => m,
            Err(e) => return error!(error = %e, "RefreshCNCI refused"),
        };
        match self.conc.update_mesh(&mesh).await {
            Ok(change) => info!(peers = mesh.peers.len(), ?change, "RefreshCNCI"),
            Err(e) => error!(error = %e, "RefreshCNCI failed"),
        }
    }

    fn event_of(&self, cmd: &PublicIpCommand) -> PublicIpEvent {
        PublicIpEvent {
            concentrator_uuid: self.uuid.to_string(),
            instance_uuid: cmd.instance_uuid.clone(),
            public_ip: cmd.public_ip.clone(),
            private_ip: cmd.private_ip.clone(),
        }
    }

    async fn fail(&self, client: &Client, code: ErrorCode, failure: PublicIpFailure) {
        if let Err(e) = client.send_error(code, failure.to_yaml()).await {
            warn!(error = %e, "could not report the failure");
        }
    }

    async fn send(&self, client: &Client, event: Event, payload: Vec<u8>) {
        if let Err(e) = client.send_event(event, payload).await {
            warn!(error = %e, ?event, "could not send the event");
        }
    }
}

fn failure_of(
    cmd: &PublicIpCommand,
    uuid: &Uuid,
    reason: PublicIpFailureReason,
) -> PublicIpFailure {
    PublicIpFailure {
        concentrator_uuid: uuid.to_string(),
        tenant_uuid: cmd.tenant_uuid.clone(),
        instance_uuid: cmd.instance_uuid.clone(),
        public_ip: cmd.public_ip.clone(),
        private_ip: cmd.private_ip.clone(),
        vnic_mac: cmd.vnic_mac.clone(),
        reason,
    }
}

/// A request the concentrator refused as wrong is ciao's `invalid_data`; anything else
/// failed while applying.
fn failure_reason(e: &CnciError, otherwise: PublicIpFailureReason) -> PublicIpFailureReason {
    match e {
        CnciError::Invalid { .. } => PublicIpFailureReason::InvalidData,
        _ => otherwise,
    }
}
