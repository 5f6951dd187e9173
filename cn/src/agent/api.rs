//! The compute node's local API: a unix socket (mode 0600, root only) through which a VM
//! launcher, the CNI plugin or the Docker plugin on the same host drive the node without
//! SSNTP. One JSON request per line, one JSON response per line:
//!
//! * `{"op":"create", "instance", "vnic", "tenant", "subnet", "concentrator",
//!   "concentrator_ip", "mac"?, "ip"?, "netns"?, "kind":"vm"|"container", "queues"?}` — the
//!   same as a START (address, VNIC, endpoint, TenantAdded when the tunnel is new). The
//!   response `{"ok":true,"ifname","ip","mac","bridge","mtu","queues":N}` carries, for a VM
//!   tap, its N queue descriptors as SCM_RIGHTS on the same message.
//! * `{"op":"destroy","instance"}` — the same as a DELETE.
//!
//! A refusal is `{"ok":false,"reason","detail"}` with ciao's reason words.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use ssntp::Client;
use ssntp::payload::StartFailureReason;
use tokio::net::{UnixListener, UnixStream};
use tracing::{Instrument, info, warn};

use super::instance::StartRequest;
use super::{Agent, Dispatcher};
use tenet::types::MacAddr;

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum ApiRequest {
    Create {
        instance: String,
        vnic: String,
        tenant: String,
        subnet: ipnetwork::Ipv4Network,
        concentrator: String,
        concentrator_ip: std::net::Ipv4Addr,
        #[serde(default)]
        mac: Option<MacAddr>,
        #[serde(default)]
        ip: Option<std::net::Ipv4Addr>,
        #[serde(default)]
        netns: Option<PathBuf>,
        kind: String,
        #[serde(default)]
        queues: Option<usize>,
    },
    Destroy {
        instance: String,
    },
}

#[derive(Debug, Serialize, Deserialize, Default)]
pub struct ApiResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<std::net::Ipv4Addr>,
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

/// Binds the socket (root only) and serves until the task is dropped.
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
    info!(socket = %path.display(), "local API listening");
    Ok(listener)
}

pub(super) async fn serve(
    listener: UnixListener,
    agent: Arc<Agent>,
    client: Client,
    dispatch: Arc<Dispatcher>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (agent, client, dispatch) = (agent.clone(), client.clone(), dispatch.clone());
        tokio::spawn(
            async move {
                if let Err(e) = connection(stream, &agent, &client, &dispatch).await {
                    warn!(error = %e, "local API connection");
                }
            }
            .in_current_span(),
        );
    }
}

async fn connection(
    stream: UnixStream,
    agent: &Agent,
    client: &Client,
    dispatch: &Dispatcher,
) -> std::io::Result<()> {
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
                Ok(req) => handle(req, agent, client, dispatch).await,
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

async fn handle(
    req: ApiRequest,
    agent: &Agent,
    client: &Client,
    dispatch: &Dispatcher,
) -> (ApiResponse, Vec<OwnedFd>) {
    match req {
        ApiRequest::Create {
            instance,
            vnic,
            tenant,
            subnet,
            concentrator,
            concentrator_ip,
            mac,
            ip,
            netns,
            kind,
            queues,
        } => {
            let container = match kind.as_str() {
                "vm" => false,
                "container" => true,
                other => {
                    return (
                        refused(
                            "InvalidData",
                            format!("kind {other:?}: want vm or container"),
                        ),
                        Vec::new(),
                    );
                }
            };
            let start = StartRequest {
                instance,
                vnic,
                tenant,
                subnet,
                concentrator,
                concentrator_ip,
                mac,
                ip,
                container,
                netns,
                queues: queues.unwrap_or(1),
            };
            if let Err(r) = super::instance::check_request(&start) {
                return (refused(r.reason, r.detail), Vec::new());
            }
            // The rules of STARTs (see `Dispatcher`).
            let _shared = dispatch.gate.read().await;
            match dispatch
                .one_per_instance(&start.instance, agent.start(&start))
                .await
            {
                Err(r) => (refused(r.reason, r.detail), Vec::new()),
                Ok(started) => {
                    if let Some(t) = &started.tunnel {
                        agent.tunnel_event(client, t).await;
                    }
                    let v = started.vnic;
                    let response = ApiResponse {
                        ok: true,
                        ifname: Some(v.ifname),
                        ip: Some(started.ip),
                        mac: Some(started.mac.to_string()),
                        bridge: Some(v.bridge),
                        mtu: Some(v.mtu),
                        queues: v.queues.len(),
                        ..Default::default()
                    };
                    (response, v.queues)
                }
            }
        }
        ApiRequest::Destroy { instance } => {
            let _alone = dispatch.gate.write().await;
            match agent.delete(&instance).await {
                Err(r) => (refused(r.reason, r.detail), Vec::new()),
                Ok(tunnels) => {
                    for t in &tunnels {
                        agent.tunnel_event(client, t).await;
                    }
                    (
                        ApiResponse {
                            ok: true,
                            ..Default::default()
                        },
                        Vec::new(),
                    )
                }
            }
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
