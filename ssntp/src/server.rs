//! The SSNTP server: authenticates clients by certificate role, keeps sessions by UUID, and
//! forwards frames by rules (to every session of a role, or to the UUIDs a callback picks from
//! the payload) while notifying its own application.
//!
//! Ordering: each session's frames are read, routed and queued for their destinations by one
//! task, in arrival order, and each destination has one writer; so frames from one sender to
//! one destination arrive in the order sent. ciao ran rule callbacks on a goroutine each and
//! could reorder TenantAdded/TenantRemoved.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, error, info, info_span, warn};
use uuid::Uuid;

use crate::conn::{ConnError, IO_TIMEOUT, MessageReader, MessageWriter};
use crate::frame::{ConnectedFrame, Frame, GoTime, Message, Node};
use crate::tls::{Identity, TlsError, peer_roles};
use crate::types::{Command, ErrorCode, FrameType, Operation, Role, Status};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("claimed role {claimed} is not in the server's certificate ({held})")]
    RoleNotHeld { claimed: Role, held: Role },
}

/// A connected client as the server knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uuid: Uuid,
    pub role: Role,
    pub addr: SocketAddr,
}

/// Where a callback rule sends a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Forward(Vec<Uuid>),
    Discard,
    /// Answer the sender with this error instead of forwarding.
    Reply(ErrorCode, Vec<u8>),
}

pub type RouteFn = Arc<dyn Fn(&ServerHandle, &Peer, &Frame) -> Route + Send + Sync>;

#[derive(Clone)]
pub enum Rule {
    /// Forward to every session holding this role (except the sender).
    ToRole(Role),
    Callback(RouteFn),
}

/// Forwarding rules by operation; operations without a rule are only notified locally.
#[derive(Clone, Default)]
pub struct Rules {
    rules: HashMap<Operation, Rule>,
}

impl Rules {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn to_role(&mut self, op: Operation, role: Role) -> &mut Self {
        self.rules.insert(op, Rule::ToRole(role));
        self
    }

    pub fn callback(
        &mut self,
        op: Operation,
        f: impl Fn(&ServerHandle, &Peer, &Frame) -> Route + Send + Sync + 'static,
    ) -> &mut Self {
        self.rules.insert(op, Rule::Callback(Arc::new(f)));
        self
    }

    pub fn get(&self, op: Operation) -> Option<&Rule> {
        self.rules.get(&op)
    }
}

/// The application side of a server: told of sessions and of every valid frame received.
#[async_trait::async_trait]
pub trait ServerHandler: Send + Sync + 'static {
    async fn connected(&self, _server: &ServerHandle, _peer: &Peer) {}
    async fn disconnected(&self, _server: &ServerHandle, _peer: &Peer) {}
    async fn frame(&self, _server: &ServerHandle, _from: &Peer, _frame: &Frame) {}
}

/// A handler that does nothing but let the rules forward.
pub struct NoHandler;
impl ServerHandler for NoHandler {}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub identity: Identity,
    pub uuid: Uuid,
    /// The role to claim in CONNECTED; by default every role in the certificate.
    pub role: Option<Role>,
    /// The cluster configuration YAML sent in CONNECTED; a CONFIGURE from a controller
    /// replaces it.
    pub configuration: Vec<u8>,
    pub handshake_timeout: Duration,
    /// Frames queued per session before a forwarding sender waits.
    pub queue_depth: usize,
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, identity: Identity, uuid: Uuid) -> Self {
        ServerConfig {
            listen,
            identity,
            uuid,
            role: None,
            configuration: Vec::new(),
            handshake_timeout: IO_TIMEOUT,
            queue_depth: 1024,
        }
    }
}

/// Counters an operator (or a test) can read.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub forwarded: AtomicU64,
    pub discarded: AtomicU64,
    pub invalid_frames: AtomicU64,
    pub refused_connections: AtomicU64,
}

struct Session {
    peer: Peer,
    generation: u64,
    tx: mpsc::Sender<Arc<Frame>>,
}

struct Shared {
    uuid: Uuid,
    role: Role,
    sessions: RwLock<HashMap<Uuid, Session>>,
    configuration: RwLock<Vec<u8>>,
    generation: AtomicU64,
    stats: ServerStats,
}

/// Access to a running server: sessions, sending, counters.
#[derive(Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
}

impl ServerHandle {
    pub fn uuid(&self) -> Uuid {
        self.shared.uuid
    }

    pub fn role(&self) -> Role {
        self.shared.role
    }

    pub fn stats(&self) -> &ServerStats {
        &self.shared.stats
    }

    pub fn sessions(&self) -> Vec<Peer> {
        let sessions = self.shared.sessions.read().expect("sessions lock");
        sessions.values().map(|s| s.peer.clone()).collect()
    }

    pub fn session(&self, uuid: &Uuid) -> Option<Peer> {
        let sessions = self.shared.sessions.read().expect("sessions lock");
        sessions.get(uuid).map(|s| s.peer.clone())
    }

    pub fn configuration(&self) -> Vec<u8> {
        self.shared
            .configuration
            .read()
            .expect("config lock")
            .clone()
    }

    /// UUIDs of the sessions holding every bit of `role`.
    pub fn sessions_with(&self, role: Role) -> Vec<Uuid> {
        let sessions = self.shared.sessions.read().expect("sessions lock");
        sessions
            .values()
            .filter(|s| s.peer.role.contains(role))
            .map(|s| s.peer.uuid)
            .collect()
    }

    /// Queues a frame for one session, waiting while its queue is full for at most the write
    /// deadline; a session that stays full that long is dropped. False when no such session.
    pub async fn send_to(&self, uuid: &Uuid, frame: Arc<Frame>) -> bool {
        let target = {
            let sessions = self.shared.sessions.read().expect("sessions lock");
            sessions.get(uuid).map(|s| (s.tx.clone(), s.generation))
        };
        let Some((tx, generation)) = target else {
            return false;
        };
        match tx.send_timeout(frame, IO_TIMEOUT).await {
            Ok(()) => true,
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                warn!(session = %uuid, "session did not drain its queue within the write deadline; dropping it");
                self.remove(uuid, generation);
                false
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
        }
    }

    /// A frame of this server's own (Origin = the server) for every session holding `role`.
    pub async fn send_to_role(&self, role: Role, op: Operation, payload: Vec<u8>) -> usize {
        let frame = Arc::new(Frame::new(op, self.shared.uuid, payload));
        let mut sent = 0;
        for uuid in self.sessions_with(role) {
            sent += usize::from(self.send_to(&uuid, frame.clone()).await);
        }
        sent
    }

    fn remove(&self, uuid: &Uuid, generation: u64) -> Option<Peer> {
        let mut sessions = self.shared.sessions.write().expect("sessions lock");
        match sessions.get(uuid) {
            Some(s) if s.generation == generation => sessions.remove(uuid).map(|s| s.peer),
            _ => None,
        }
    }
}

/// A running server.
pub struct Server {
    handle: ServerHandle,
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

struct Context {
    handle: ServerHandle,
    rules: Rules,
    handler: Arc<dyn ServerHandler>,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    queue_depth: usize,
}

impl Server {
    /// Binds and starts accepting.
    pub async fn start(
        config: ServerConfig,
        rules: Rules,
        handler: Arc<dyn ServerHandler>,
    ) -> Result<Server, ServerError> {
        let held = config.identity.roles();
        let role = config.role.unwrap_or(held);
        let acceptor = TlsAcceptor::from(config.identity.server_config()?);
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
        let handle = ServerHandle {
            shared: Arc::new(Shared {
                uuid: config.uuid,
                role,
                sessions: RwLock::new(HashMap::new()),
                configuration: RwLock::new(config.configuration),
                generation: AtomicU64::new(0),
                stats: ServerStats::default(),
            }),
        };
        let ctx = Arc::new(Context {
            handle: handle.clone(),
            rules,
            handler,
            acceptor,
            handshake_timeout: config.handshake_timeout,
            queue_depth: config.queue_depth.max(1),
        });
        let (stop, stopped) = watch::channel(false);
        info!(%local_addr, uuid = %config.uuid, %role, "SSNTP server listening");
        let task = tokio::spawn(accept_loop(listener, ctx, stopped));
        Ok(Server {
            handle,
            local_addr,
            stop,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Stops accepting and closes every session with TLS close_notify.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        info!(local_addr = %self.local_addr, "SSNTP server stopped");
    }
}

async fn accept_loop(listener: TcpListener, ctx: Arc<Context>, mut stopped: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stopped.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, addr)) => {
                    let ctx = ctx.clone();
                    let stopped = stopped.clone();
                    connections.spawn(
                        serve(tcp, addr, ctx, stopped).instrument(info_span!("ssntp_session", %addr)),
                    );
                }
                Err(e) => {
                    // Out of descriptors and the like: pause rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

fn error_frame(server: Uuid, code: ErrorCode) -> Message {
    Message::Frame(Frame::new(Operation::Error(code), server, Vec::new()))
}

async fn serve(
    tcp: TcpStream,
    addr: SocketAddr,
    ctx: Arc<Context>,
    stopped: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(ctx.handshake_timeout, ctx.acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            ctx.handle
                .shared
                .stats
                .refused_connections
                .fetch_add(1, Ordering::Relaxed);
            match crate::tls::certificate_problem(&e) {
                Some(why) => {
                    error!(peer = %addr, reason = %why, "TLS handshake refused: certificate")
                }
                None => info!(peer = %addr, error = %e, "TLS handshake refused"),
            }
            return;
        }
        Err(_) => {
            ctx.handle
                .shared
                .stats
                .refused_connections
                .fetch_add(1, Ordering::Relaxed);
            info!("TLS handshake timed out");
            return;
        }
    };
    let held = peer_roles(tls.get_ref().1.peer_certificates());
    let (r, w) = tokio::io::split(tls);
    let mut reader = MessageReader::new(r);
    let mut writer = MessageWriter::new(w);
    let peer = match handshake(&ctx, addr, held, &mut reader, &mut writer).await {
        Ok(peer) => peer,
        Err(code) => {
            ctx.handle
                .shared
                .stats
                .refused_connections
                .fetch_add(1, Ordering::Relaxed);
            let _ = writer.send(&error_frame(ctx.handle.uuid(), code)).await;
            let _ = writer.shutdown().await;
            return;
        }
    };
    run_session(ctx, peer, reader, writer, stopped).await;
}

async fn handshake<R, W>(
    ctx: &Context,
    addr: SocketAddr,
    held: Role,
    reader: &mut MessageReader<R>,
    writer: &mut MessageWriter<W>,
) -> Result<Peer, ErrorCode>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let connect = match reader.read_timeout(ctx.handshake_timeout, "CONNECT").await {
        Ok(Some(Message::Connect(c))) => c,
        Ok(other) => {
            info!(message = ?other, "expected CONNECT");
            return Err(ErrorCode::ConnectionFailure);
        }
        Err(e) => {
            info!(error = %e, "reading CONNECT");
            return Err(ErrorCode::ConnectionFailure);
        }
    };
    let claimed = Role(connect.role);
    if claimed.is_empty() || !held.contains(claimed) {
        warn!(%claimed, %held, "client claims a role its certificate does not hold");
        return Err(ErrorCode::ConnectionAborted);
    }
    if Operation::from_header(&connect.header) != Some(Operation::Command(Command::Connect)) {
        info!(header = ?connect.header, "first frame is not COMMAND CONNECT");
        return Err(ErrorCode::ConnectionFailure);
    }
    let Ok(uuid) = Uuid::from_slice(&connect.source) else {
        info!(
            len = connect.source.len(),
            "CONNECT source is not a 16-byte UUID"
        );
        return Err(ErrorCode::ConnectionFailure);
    };
    let payload = ctx.handle.configuration();
    let reply = ConnectedFrame {
        header: Operation::Status(Status::Connected).header(),
        role: ctx.handle.role().bits(),
        source: ctx.handle.uuid().as_bytes().to_vec(),
        destination: uuid.as_bytes().to_vec(),
        payload_length: payload.len() as u32,
        payload,
    };
    if let Err(e) = writer.send(&Message::Connected(reply)).await {
        info!(error = %e, "sending CONNECTED");
        return Err(ErrorCode::ConnectionFailure);
    }
    Ok(Peer {
        uuid,
        role: claimed,
        addr,
    })
}

async fn run_session<R, W>(
    ctx: Arc<Context>,
    peer: Peer,
    mut reader: MessageReader<R>,
    writer: MessageWriter<W>,
    mut stopped: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(ctx.queue_depth);
    let generation = ctx.handle.shared.generation.fetch_add(1, Ordering::Relaxed);
    let replaced = ctx
        .handle
        .shared
        .sessions
        .write()
        .expect("sessions lock")
        .insert(
            peer.uuid,
            Session {
                peer: peer.clone(),
                generation,
                tx,
            },
        );
    if replaced.is_some() {
        // A client that reconnects before its old connection timed out: the new one wins, and
        // dropping the old queue ends the old writer.
        info!(uuid = %peer.uuid, "session replaced by a new connection from the same UUID");
    }
    info!(uuid = %peer.uuid, role = %peer.role, "session started");
    ctx.handler.connected(&ctx.handle, &peer).await;

    let mut writer_task = tokio::spawn(write_frames(writer, rx, stopped.clone()));
    let mut writer_done = false;
    let ending = loop {
        let msg = tokio::select! {
            _ = stopped.changed() => break "server shutting down".to_string(),
            _ = &mut writer_task => {
                writer_done = true;
                break "write failed".to_string();
            }
            msg = reader.read() => msg,
        };
        match msg {
            Ok(Some(Message::Frame(frame))) => handle_frame(&ctx, &peer, frame).await,
            Ok(Some(other)) => {
                debug!(message = ?other, "handshake message inside a session; ignored");
            }
            Ok(None) => break "client closed the connection".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    // Removing the session drops its queue, which makes the writer flush, send close_notify
    // and end.
    let current = ctx.handle.remove(&peer.uuid, generation).is_some();
    if !writer_done
        && tokio::time::timeout(IO_TIMEOUT, &mut writer_task)
            .await
            .is_err()
    {
        writer_task.abort();
    }
    info!(uuid = %peer.uuid, reason = %ending, "session ended");
    // A session replaced by a newer connection from the same node is not a disconnection.
    if current {
        ctx.handler.disconnected(&ctx.handle, &peer).await;
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(
    mut writer: MessageWriter<W>,
    mut rx: mpsc::Receiver<Arc<Frame>>,
    mut stopped: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    const BATCH: usize = 256;
    loop {
        let frame = tokio::select! {
            _ = stopped.changed() => None,
            f = rx.recv() => f,
        };
        let Some(frame) = frame else {
            return writer.shutdown().await;
        };
        writer.queue_frame(&frame);
        for _ in 1..BATCH {
            let Ok(f) = rx.try_recv() else { break };
            writer.queue_frame(&f);
        }
        writer.flush().await?;
    }
}

fn now() -> GoTime {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    GoTime::from_unix(d.as_secs() as i64, d.subsec_nanos())
}

async fn handle_frame(ctx: &Context, peer: &Peer, mut frame: Frame) {
    let handle = &ctx.handle;
    let Some(op) = frame.operation() else {
        handle
            .shared
            .stats
            .invalid_frames
            .fetch_add(1, Ordering::Relaxed);
        if FrameType::from_u8(frame.header.kind).is_none() {
            warn!(
                kind = frame.header.kind,
                "frame of unknown type; answering InvalidFrameType"
            );
            let reply = Frame::new(
                Operation::Error(ErrorCode::InvalidFrameType),
                handle.uuid(),
                Vec::new(),
            );
            handle.send_to(&peer.uuid, Arc::new(reply)).await;
        } else {
            warn!(
                kind = frame.header.kind,
                operand = frame.header.operand,
                "unknown operand; dropped"
            );
        }
        return;
    };
    let received = now();
    if op == Operation::Command(Command::Configure) && peer.role.contains(Role::CONTROLLER) {
        info!(
            bytes = frame.payload.len(),
            "cluster configuration replaced by CONFIGURE"
        );
        *handle.shared.configuration.write().expect("config lock") = frame.payload.clone();
    }
    ctx.handler.frame(handle, peer, &frame).await;

    let destinations = match ctx.rules.get(op) {
        None => return,
        Some(Rule::ToRole(role)) => {
            let mut d = handle.sessions_with(*role);
            d.retain(|u| *u != peer.uuid);
            d
        }
        Some(Rule::Callback(f)) => match f(handle, peer, &frame) {
            Route::Forward(d) => d,
            Route::Discard => {
                handle
                    .shared
                    .stats
                    .discarded
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            Route::Reply(code, payload) => {
                let reply = Frame::new(Operation::Error(code), handle.uuid(), payload);
                handle.send_to(&peer.uuid, Arc::new(reply)).await;
                return;
            }
        },
    };
    if let Some(trace) = frame
        .trace
        .as_mut()
        .filter(|_| frame.header.major & crate::types::TRACE_FLAG != 0)
    {
        trace.path.push(Node {
            uuid: handle.uuid().as_bytes().to_vec(),
            role: handle.role().bits(),
            tx_timestamp: now(),
            rx_timestamp: received,
        });
        trace.path_length = trace.path.len().min(255) as u8;
    }
    let frame = Arc::new(frame);
    for uuid in destinations {
        if handle.send_to(&uuid, frame.clone()).await {
            handle
                .shared
                .stats
                .forwarded
                .fetch_add(1, Ordering::Relaxed);
        } else {
            handle
                .shared
                .stats
                .discarded
                .fetch_add(1, Ordering::Relaxed);
            debug!(destination = %uuid, %op, "no such session; frame dropped");
        }
    }
}
