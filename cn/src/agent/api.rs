//! The compute node's local API: a unix socket (mode 0600, root only) through which a VM
//! launcher, the CNI plugin or the Docker plugin on the same host drive the node without
//! SSNTP. One JSON request per line, one JSON response per line:
//!
//! * `{"op":"create", "instance", "vnic", "tenant", "subnet", "kind":"vm"|"container",
//!   "concentrator"?, "concentrator_ip"?, "mac"?, "ip"?, "netns"?, "ifname"?, "queues"?,
//!   "mode"?}` — the same as a START (address, VNIC, endpoint, TenantAdded when the tunnel is
//!   new). Without `concentrator_ip` the concentrator's address comes from its status in etcd
//!   (it must be running and serve the tenant). `mode`, when given, must be the node's. The
//!   response `{"ok":true,"ifname","ip","prefix","gateway","mac","bridge","mtu","queues":N}`
//!   carries, for a VM tap, its N queue descriptors as SCM_RIGHTS on the same message.
//! * `{"op":"destroy","instance","vnic"?}` — the same as a DELETE (of one VNIC when named).
//!
//! A refusal is `{"ok":false,"reason","detail"}` with ciao's reason words.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use ssntp::Client;
use ssntp::payload::StartFailureReason;
use tenet::keyspace::NetworkMode;
use tenet::keyspace::node::{self, NodeRole};
use tokio::net::{UnixListener, UnixStream};
use tracing::{Instrument, warn};

use super::instance::{CONTAINER_IFNAME, Refused, StartRequest, refuse};
use super::{Agent, Dispatcher};
use tenet::types::{MacAddr, gateway_of};

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ApiRequest {
    Create(CreateVnic),
    Destroy(DestroyVnic),
}

/// What a workload is: a VM gets a tap, a container a veth whose peer moves into its netns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VnicKind {
    Vm,
    Container,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVnic {
    pub instance: String,
    pub vnic: String,
    pub tenant: String,
    /// GRE mode: the tenant subnet; routed mode: the Calico pool to allocate from.
    pub subnet: Ipv4Network,
    pub kind: VnicKind,
    /// The concentrator's UUID (GRE mode).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub concentrator: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concentrator_ip: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The interface's name in the container (default eth0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<usize>,
    /// Routed mode: also an IPv6 address from this Calico pool (dual stack).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool6: Option<ipnetwork::Ipv6Network>,
    /// The mode the caller expects the node to run in; refused when it runs in another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<NetworkMode>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestroyVnic {
    pub instance: String,
    /// Only this VNIC of the instance (a CNI DEL of one interface); all of them otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnic: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ApiResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// The prefix length of the workload's address (the subnet's; 32 in routed mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<u8>,
    /// The workload's default gateway (the subnet's gateway; 169.254.1.1 in routed mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// Routed dual stack: the IPv6 address (a /128) and its gateway (fe80::1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<std::net::Ipv6Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<std::net::Ipv6Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// How many descriptors came with this message.
    #[serde(default)]
    pub queues: usize,
}

/// A refusal; `reason` in ciao's words (`invalid_data`, `no_instance`, …).
fn refused(reason: impl Serialize, detail: String) -> ApiResponse {
    let reason = serde_json::to_value(reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    ApiResponse {
        ok: false,
        reason: Some(reason),
        detail: Some(detail),
        ..Default::default()
    }
}

/// Binds a unix socket (root only), replacing a stale one.
pub(super) fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub(super) async fn serve(listener: UnixListener, local: Local) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let local = local.clone();
        tokio::spawn(
            async move {
                if let Err(e) = connection(stream, &local).await {
                    warn!(error = %e, "local API connection");
                }
            }
            .in_current_span(),
        );
    }
}

async fn connection(stream: UnixStream, local: &Local) -> std::io::Result<()> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let (response, fds) = match serde_json::from_slice::<ApiRequest>(&line) {
                Err(e) => (
                    refused(StartFailureReason::InvalidPayload, e.to_string()),
                    Vec::new(),
                ),
                Ok(req) => handle(req, local).await,
            };
            send(&stream, &response, &fds).await?;
        }
        if buffer.len() > MAX_REQUEST {
            let response = refused(
                "InvalidPayload",
                format!("a request longer than {MAX_REQUEST} bytes"),
            );
            return send(&stream, &response, &[]).await;
        }
        stream.readable().await?;
        match stream.try_read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

async fn handle(req: ApiRequest, local: &Local) -> (ApiResponse, Vec<OwnedFd>) {
    let done = match req {
        ApiRequest::Create(create) => create_vnic(create, local).await,
        ApiRequest::Destroy(DestroyVnic { instance, vnic }) => local
            .delete(&instance, vnic.as_deref())
            .await
            .map(|()| (ApiResponse::default(), Vec::new()))
            .map_err(|r| refused(r.reason, r.detail)),
    };
    match done {
        Ok((mut response, fds)) => {
            response.ok = true;
            (response, fds)
        }
        Err(refusal) => (refusal, Vec::new()),
    }
}

async fn create_vnic(
    c: CreateVnic,
    local: &Local,
) -> Result<(ApiResponse, Vec<OwnedFd>), ApiResponse> {
    let refusal = |r: Refused<StartFailureReason>| refused(r.reason, r.detail);
    let bad = |detail: String| refused(StartFailureReason::InvalidData, detail);
    let node_mode = local.mode();
    if let Some(mode) = c.mode {
        let same = match mode {
            NetworkMode::Routed => node_mode == NetworkMode::Routed,
            NetworkMode::Gre | NetworkMode::Vxlan => node_mode != NetworkMode::Routed,
        };
        if !same {
            return Err(bad(format!(
                "this node runs in {node_mode} mode; the request is for {mode} mode"
            )));
        }
    }
    if c.pool6.is_some() && node_mode != NetworkMode::Routed {
        return Err(bad(format!(
            "pool6 (IPv6) is for routed mode; this node runs in {node_mode} mode"
        )));
    }
    let concentrator_ip = match (node_mode, c.concentrator_ip) {
        (NetworkMode::Routed, ip) => ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
        (_, Some(ip)) => ip,
        (_, None) => local
            .agent
            .concentrator_ip(&c.tenant, &c.concentrator)
            .await
            .map_err(refusal)?,
    };
    let start = StartRequest {
        instance: c.instance,
        vnic: c.vnic,
        tenant: c.tenant,
        subnet: c.subnet,
        concentrator: c.concentrator,
        concentrator_ip,
        mac: c.mac,
        ip: c.ip,
        container: c.kind == VnicKind::Container,
        netns: c.netns,
        ifname: c.ifname.unwrap_or_else(|| CONTAINER_IFNAME.into()),
        pool6: c.pool6,
        docker: false,
        queues: c.queues.unwrap_or(1),
    };
    let started = local.start(&start).await.map_err(refusal)?;
    let (prefix, gateway) = match node_mode {
        NetworkMode::Routed => (32, tenet::net::routed::GATEWAY_V4),
        _ => (start.subnet.prefix(), gateway_of(&start.subnet)),
    };
    let v = started.vnic;
    let response = ApiResponse {
        ok: true,
        ifname: Some(v.ifname),
        ip: Some(started.ip),
        prefix: Some(prefix),
        gateway: Some(gateway),
        ip6: started.ip6,
        gateway6: started.ip6.map(|_| tenet::net::routed::GATEWAY_V6),
        mac: Some(started.mac.to_string()),
        bridge: Some(v.bridge).filter(|b| !b.is_empty()),
        mtu: Some(v.mtu).filter(|m| *m != 0),
        queues: v.queues.len(),
        ..Default::default()
    };
    Ok((response, v.queues))
}

/// What the local front ends (this API, the Docker driver) share: the agent, its SSNTP
/// client for TenantAdded/TenantRemoved, and the rules that order STARTs and DELETEs.
#[derive(Clone)]
pub(super) struct Local {
    pub(super) agent: Arc<Agent>,
    pub(super) client: Client,
    pub(super) dispatch: Arc<Dispatcher>,
}

impl Local {
    pub(super) fn mode(&self) -> NetworkMode {
        match self.agent.routed {
            Some(_) => NetworkMode::Routed,
            None => NetworkMode::Gre,
        }
    }

    /// A START by the rules of STARTs (see `Dispatcher`), with its TenantAdded.
    pub(super) async fn start(
        &self,
        start: &StartRequest,
    ) -> Result<super::instance::Started, Refused<StartFailureReason>> {
        super::instance::check_request(start)?;
        let _shared = self.dispatch.gate.read().await;
        let outcome = self
            .dispatch
            .one_per_instance(&start.instance, self.agent.start(start))
            .await;
        self.agent.announce_start(&self.client, &outcome).await;
        outcome
    }

    /// A DELETE (of one VNIC when named), alone, with its TenantRemoved.
    pub(super) async fn delete(
        &self,
        instance: &str,
        vnic: Option<&str>,
    ) -> Result<(), Refused<ssntp::payload::DeleteFailureReason>> {
        let _alone = self.dispatch.gate.write().await;
        let tunnels = self.agent.delete(instance, vnic).await?;
        for t in &tunnels {
            self.agent.tunnel_event(&self.client, t).await;
        }
        Ok(())
    }
}

impl Agent {
    /// A running concentrator's underlay address, from its status in etcd; it must serve
    /// `tenant`.
    pub(super) async fn concentrator_ip(
        &self,
        tenant: &str,
        uuid: &str,
    ) -> Result<Ipv4Addr, Refused<StartFailureReason>> {
        let bad = |detail: String| refuse(StartFailureReason::InvalidData, detail);
        if uuid.is_empty() {
            return Err(bad(
                "concentrator is empty: name the concentrator that serves the tenant's subnet"
                    .into(),
            ));
        }
        let key = node::key(uuid);
        let raw = self
            .store
            .get(&key)
            .await
            .map_err(|e| refuse(StartFailureReason::NetworkFailure, format!("{key}: {e}")))?
            .ok_or_else(|| {
                bad(format!(
                    "concentrator {uuid} is not running (no status at {key}); start it or give its address"
                ))
            })?;
        let status = node::decode(&key, &raw.value).map_err(|e| bad(format!("{key}: {e}")))?;
        if status.role != NodeRole::Concentrator {
            return Err(bad(format!(
                "{uuid} is a {}, not a concentrator",
                status.role
            )));
        }
        match status.tenant.as_deref() {
            Some(t) if t != tenant => Err(bad(format!(
                "concentrator {uuid} serves tenant {t}, not {tenant}"
            ))),
            _ => Ok(status.underlay_ip),
        }
    }
}

/// One response line, with `fds` as SCM_RIGHTS on its first byte.
async fn send(stream: &UnixStream, response: &ApiResponse, fds: &[OwnedFd]) -> std::io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let mut line = serde_json::to_vec(response).expect("responses serialise");
    line.push(b'\n');
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut sent = 0;
    while sent < line.len() {
        stream.writable().await?;
        let chunk = &line[sent..];
        let result = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let iov = [std::io::IoSlice::new(chunk)];
            let cmsg = [ControlMessage::ScmRights(&raw)];
            let cmsgs: &[ControlMessage] = if sent == 0 && !raw.is_empty() {
                &cmsg
            } else {
                &[]
            };
            sendmsg::<()>(stream.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
                .map_err(std::io::Error::from)
        });
        match result {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
