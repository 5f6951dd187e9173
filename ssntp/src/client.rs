//! The SSNTP client: dial, CONNECT/CONNECTED handshake, then frames both ways; reconnects with
//! randomised backoff when the connection drops.
//!
//! Unlike ciao (one goroutine per received frame), received frames reach the application in the
//! order the server sent them: one reader per connection pushes them into one channel, and
//! waits when the application is slower (TCP flow control then slows the server).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use crate::conn::{ConnError, IO_TIMEOUT, MessageReader, MessageWriter};
use crate::frame::{ConnectFrame, Frame, Message};
use crate::tls::{Identity, TlsError, peer_roles, server_name};
use crate::types::{Command, ErrorCode, Event, Operation, Role, Status};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("no server address configured")]
    NoServer,
    #[error("claimed role {claimed} is not in this node's certificate ({held})")]
    RoleNotHeld { claimed: Role, held: Role },
    #[error("not connected to a server")]
    NotConnected,
    #[error("the client is closed")]
    Closed,
    #[error("server {server} refused the connection: {error}")]
    Refused { server: String, error: String },
    #[error("server {server} claims role {claimed} but its certificate holds {held}")]
    ServerRole {
        server: String,
        claimed: Role,
        held: Role,
    },
}

/// ciao's reconnect delay: a random 1..N seconds with N cycling through 5, 10, 20, 40.
#[derive(Debug, Clone)]
pub struct Backoff {
    pub ceilings: Vec<Duration>,
}

impl Backoff {
    pub fn ciao() -> Self {
        Backoff {
            ceilings: [5, 10, 20, 40].map(Duration::from_secs).to_vec(),
        }
    }

    /// A short schedule for tests and labs: the same shape, scaled to `base`.
    pub fn scaled(base: Duration) -> Self {
        Backoff {
            ceilings: [1, 2, 4, 8].map(|m| base * m).to_vec(),
        }
    }

    /// The delay after the `attempt`-th failed round (0-based): uniform in [ceiling/5, ceiling].
    pub fn delay(&self, attempt: usize) -> Duration {
        let Some(ceiling) = self.ceilings.get(attempt % self.ceilings.len().max(1)) else {
            return Duration::ZERO;
        };
        let floor = *ceiling / 5;
        let span = ceiling.saturating_sub(floor).as_millis() as u64;
        floor + Duration::from_millis(rand::random_range(0..=span))
    }
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` candidates, tried in order on every round.
    pub servers: Vec<String>,
    pub identity: Identity,
    pub uuid: Uuid,
    /// The role to claim; by default every role in the certificate, as ciao does.
    pub role: Option<Role>,
    pub backoff: Backoff,
    /// Limit on TCP connect + TLS handshake + CONNECTED reply.
    pub handshake_timeout: Duration,
}

impl ClientConfig {
    pub fn new(servers: Vec<String>, identity: Identity, uuid: Uuid) -> Self {
        ClientConfig {
            servers,
            identity,
            uuid,
            role: None,
            backoff: Backoff::ciao(),
            handshake_timeout: IO_TIMEOUT,
        }
    }
}

/// What the server said about itself when the connection was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    pub address: String,
    pub uuid: Uuid,
    pub role: Role,
    /// The cluster configuration YAML from CONNECTED (replaced by later CONFIGURE commands).
    pub configuration: Vec<u8>,
}

/// What the client tells the application, in order.
#[derive(Debug)]
pub enum ClientEvent {
    Connected(ServerInfo),
    Frame(Frame),
    Disconnected {
        reason: String,
    },
    /// The client stopped for good: closed by the application (`None`) or a refusal that
    /// retrying cannot fix, such as a role the server does not accept.
    Stopped(Option<ClientError>),
}

struct Shared {
    uuid: Uuid,
    role: Role,
    session: Mutex<Option<mpsc::Sender<Frame>>>,
    configuration: Mutex<Vec<u8>>,
}

/// A running client; cheap to clone, every clone sends on the same connection.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
    close: watch::Sender<bool>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

const OUTBOUND_DEPTH: usize = 1024;
const EVENT_DEPTH: usize = 1024;
/// Frames written per TLS flush at most, so one busy sender cannot starve the flush.
const WRITE_BATCH: usize = 256;

impl Client {
    /// Starts connecting in the background. Events (connected, frames, disconnected) arrive on
    /// the returned channel; dropping it stops the client.
    pub fn start(
        config: ClientConfig,
    ) -> Result<(Client, mpsc::Receiver<ClientEvent>), ClientError> {
        if config.servers.is_empty() {
            return Err(ClientError::NoServer);
        }
        let held = config.identity.roles();
        let role = config.role.unwrap_or(held);
        let tls = TlsConnector::from(config.identity.client_config()?);
        let shared = Arc::new(Shared {
            uuid: config.uuid,
            role,
            session: Mutex::new(None),
            configuration: Mutex::new(Vec::new()),
        });
        let (events_tx, events_rx) = mpsc::channel(EVENT_DEPTH);
        let (close, closed) = watch::channel(false);
        let runner = Runner {
            config,
            tls,
            shared: shared.clone(),
            events: events_tx,
            closed,
        };
        let task = tokio::spawn(runner.run());
        Ok((
            Client {
                shared,
                close,
                task: Arc::new(Mutex::new(Some(task))),
            },
            events_rx,
        ))
    }

    pub fn uuid(&self) -> Uuid {
        self.shared.uuid
    }

    pub fn role(&self) -> Role {
        self.shared.role
    }

    pub fn is_connected(&self) -> bool {
        self.shared.session.lock().expect("session lock").is_some()
    }

    /// The latest cluster configuration the server sent.
    pub fn configuration(&self) -> Vec<u8> {
        self.shared
            .configuration
            .lock()
            .expect("config lock")
            .clone()
    }

    /// Queues a frame on the current connection. Frames are written in the order queued.
    pub async fn send(&self, frame: Frame) -> Result<(), ClientError> {
        let tx = self
            .shared
            .session
            .lock()
            .expect("session lock")
            .clone()
            .ok_or(ClientError::NotConnected)?;
        tx.send(frame).await.map_err(|_| ClientError::NotConnected)
    }

    async fn send_op(&self, op: Operation, payload: Vec<u8>) -> Result<(), ClientError> {
        self.send(Frame::new(op, self.shared.uuid, payload)).await
    }

    pub async fn send_command(&self, c: Command, payload: Vec<u8>) -> Result<(), ClientError> {
        self.send_op(Operation::Command(c), payload).await
    }

    pub async fn send_status(&self, s: Status, payload: Vec<u8>) -> Result<(), ClientError> {
        self.send_op(Operation::Status(s), payload).await
    }

    pub async fn send_event(&self, e: Event, payload: Vec<u8>) -> Result<(), ClientError> {
        self.send_op(Operation::Event(e), payload).await
    }

    pub async fn send_error(&self, e: ErrorCode, payload: Vec<u8>) -> Result<(), ClientError> {
        self.send_op(Operation::Error(e), payload).await
    }

    /// Writes what is queued, closes the connection with TLS close_notify and stops.
    pub async fn close(&self) {
        let _ = self.close.send(true);
        let task = self.task.lock().expect("task lock").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

struct Runner {
    config: ClientConfig,
    tls: TlsConnector,
    shared: Arc<Shared>,
    events: mpsc::Sender<ClientEvent>,
    closed: watch::Receiver<bool>,
}

/// The two directions of an established connection; their gob stream state carries over from
/// the handshake.
type Connection = (
    MessageReader<ReadHalf<TlsStream<TcpStream>>>,
    MessageWriter<WriteHalf<TlsStream<TcpStream>>>,
);

/// How one connection attempt or session ended.
enum Ending {
    /// Try again (after a backoff if nothing connected).
    Retry(String),
    /// Try again, but a certificate is the reason, which retrying alone will not fix.
    Certificate(String),
    /// Stop for good.
    Stop(Option<ClientError>),
}

impl Runner {
    async fn run(mut self) {
        let mut failures = 0usize;
        let ending = loop {
            if *self.closed.borrow() {
                break None;
            }
            match self.connect_any().await {
                Ok((stream, info)) => {
                    failures = 0;
                    info!(server = %info.address, server_uuid = %info.uuid, role = %info.role, "SSNTP connected");
                    *self.shared.configuration.lock().expect("config lock") =
                        info.configuration.clone();
                    // The sender is in place before the application hears of the
                    // connection, so a send right after Connected is not NotConnected.
                    let (tx, outbound) = mpsc::channel::<Frame>(OUTBOUND_DEPTH);
                    *self.shared.session.lock().expect("session lock") = Some(tx);
                    if self
                        .events
                        .send(ClientEvent::Connected(info))
                        .await
                        .is_err()
                    {
                        break None;
                    }
                    match self.session(stream, outbound).await {
                        Ending::Retry(reason) | Ending::Certificate(reason) => {
                            info!(%reason, "SSNTP disconnected; reconnecting");
                            let event = ClientEvent::Disconnected { reason };
                            if self.events.send(event).await.is_err() {
                                break None;
                            }
                        }
                        Ending::Stop(e) => break e,
                    }
                }
                Err(Ending::Stop(e)) => break e,
                Err(ending @ (Ending::Retry(_) | Ending::Certificate(_))) => {
                    let delay = self.config.backoff.delay(failures);
                    failures += 1;
                    match ending {
                        Ending::Certificate(reason) => {
                            warn!(%reason, ?delay, "retrying, but the certificate problem remains until the certificates change")
                        }
                        Ending::Retry(reason) => {
                            debug!(%reason, ?delay, "no SSNTP server reachable; backing off")
                        }
                        Ending::Stop(_) => unreachable!("matched above"),
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.closed.changed() => {}
                    }
                }
            }
        };
        if let Some(e) = &ending {
            warn!(error = %e, "SSNTP client stopped");
        }
        let _ = self.events.send(ClientEvent::Stopped(ending)).await;
    }

    async fn connect_any(&mut self) -> Result<(Connection, ServerInfo), Ending> {
        let mut last = String::new();
        let mut certificate = None;
        for server in self.config.servers.clone() {
            let attempt =
                tokio::time::timeout(self.config.handshake_timeout, self.connect(&server));
            match attempt.await {
                Ok(Ok(ok)) => return Ok(ok),
                Ok(Err(Ending::Retry(why))) => last = format!("{server}: {why}"),
                Ok(Err(Ending::Certificate(why))) => {
                    // Said now, at error level: every later attempt fails the same way until
                    // the certificates change.
                    error!(reason = %why, "TLS certificate refused; retrying will not help until the certificates change");
                    certificate = Some(why);
                }
                Ok(Err(stop)) => return Err(stop),
                Err(_) => last = format!("{server}: handshake timed out"),
            }
        }
        Err(match certificate {
            Some(why) => Ending::Certificate(why),
            None => Ending::Retry(last),
        })
    }

    async fn connect(&self, server: &str) -> Result<(Connection, ServerInfo), Ending> {
        let retry = |e: &dyn std::fmt::Display| Ending::Retry(e.to_string());
        let name = server_name(server).map_err(|e| Ending::Stop(Some(e.into())))?;
        let tcp = TcpStream::connect(server).await.map_err(|e| retry(&e))?;
        let _ = tcp.set_nodelay(true);
        let stream =
            self.tls.connect(name, tcp).await.map_err(
                |e| match crate::tls::certificate_problem(&e) {
                    Some(why) => Ending::Certificate(format!("{server}: {why}")),
                    None => retry(&e),
                },
            )?;
        let held = peer_roles(stream.get_ref().1.peer_certificates());
        let (r, w) = tokio::io::split(stream);
        let mut reader = MessageReader::new(r);
        let mut writer = MessageWriter::new(w);
        let connect = ConnectFrame {
            header: Operation::Command(Command::Connect).header(),
            role: self.shared.role.bits(),
            source: self.shared.uuid.as_bytes().to_vec(),
            destination: vec![0; 16],
        };
        writer
            .send(&Message::Connect(connect))
            .await
            .map_err(|e| retry(&e))?;
        let reply = reader
            .read()
            .await
            .map_err(|e| retry(&e))?
            .ok_or_else(|| Ending::Retry("closed during the handshake".into()))?;
        let refused = |error: String| ClientError::Refused {
            server: server.to_string(),
            error,
        };
        let connected = match reply {
            Message::Connected(c)
                if Operation::from_header(&c.header)
                    == Some(Operation::Status(Status::Connected)) =>
            {
                c
            }
            Message::Frame(f) => {
                return Err(match f.operation() {
                    Some(Operation::Error(ErrorCode::ConnectionFailure)) => {
                        Ending::Retry("server answered ConnectionFailure".into())
                    }
                    Some(op) => Ending::Stop(Some(refused(op.to_string()))),
                    None => Ending::Stop(Some(refused(format!("{:?}", f.header)))),
                });
            }
            other => return Err(Ending::Stop(Some(refused(format!("unexpected {other:?}"))))),
        };
        let claimed = Role(connected.role);
        if claimed.is_empty() || !held.contains(claimed) {
            let error = Frame::new(
                Operation::Error(ErrorCode::ConnectionFailure),
                self.shared.uuid,
                Vec::new(),
            );
            let _ = writer.send(&Message::Frame(error)).await;
            let _ = writer.shutdown().await;
            return Err(Ending::Stop(Some(ClientError::ServerRole {
                server: server.to_string(),
                claimed,
                held,
            })));
        }
        let uuid = Uuid::from_slice(&connected.source).unwrap_or_default();
        let info = ServerInfo {
            address: server.to_string(),
            uuid,
            role: claimed,
            configuration: connected.payload,
        };
        Ok(((reader, writer), info))
    }

    async fn session(
        &mut self,
        (reader, mut writer): Connection,
        mut outbound: mpsc::Receiver<Frame>,
    ) -> Ending {
        let mut reader = tokio::spawn(read_frames(
            reader,
            self.events.clone(),
            self.shared.clone(),
        ));
        let ending = loop {
            tokio::select! {
                biased;
                _ = self.closed.changed() => {
                    // Write what the application queued before it asked to close.
                    while let Ok(f) = outbound.try_recv() {
                        writer.queue_frame(&f);
                    }
                    let _ = writer.shutdown().await;
                    break Ending::Stop(None);
                }
                done = &mut reader => {
                    break match done {
                        Ok(Ok(())) => Ending::Retry("server closed the connection".into()),
                        Ok(Err(ReadEnd::AppGone)) => Ending::Stop(None),
                        Ok(Err(ReadEnd::Conn(e))) => Ending::Retry(e.to_string()),
                        Err(e) => Ending::Retry(format!("reader task: {e}")),
                    };
                }
                frame = outbound.recv() => {
                    let Some(frame) = frame else { break Ending::Stop(None) };
                    writer.queue_frame(&frame);
                    let mut n = 1;
                    while n < WRITE_BATCH {
                        let Ok(f) = outbound.try_recv() else { break };
                        writer.queue_frame(&f);
                        n += 1;
                    }
                    if let Err(e) = writer.flush().await {
                        break Ending::Retry(e.to_string());
                    }
                }
            }
        };
        *self.shared.session.lock().expect("session lock") = None;
        reader.abort();
        ending
    }
}

enum ReadEnd {
    Conn(ConnError),
    AppGone,
}

async fn read_frames<R: tokio::io::AsyncRead + Unpin>(
    mut reader: MessageReader<R>,
    events: mpsc::Sender<ClientEvent>,
    shared: Arc<Shared>,
) -> Result<(), ReadEnd> {
    loop {
        match reader.read().await.map_err(ReadEnd::Conn)? {
            None => return Ok(()),
            Some(Message::Frame(frame)) => {
                if frame.operation() == Some(Operation::Command(Command::Configure)) {
                    *shared.configuration.lock().expect("config lock") = frame.payload.clone();
                }
                events
                    .send(ClientEvent::Frame(frame))
                    .await
                    .map_err(|_| ReadEnd::AppGone)?;
            }
            Some(other) => {
                warn!(message = ?other, "unexpected handshake message after CONNECTED; ignored")
            }
        }
    }
}
