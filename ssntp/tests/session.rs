//! Real TLS clients and servers on loopback: every frame type both ways, roles checked in both
//! directions, unauthenticated peers refused.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use ssntp::{
    ClientError, ClientEvent, ErrorCode, Frame, FrameTrace, GoTime, Header, NoHandler, Node,
    Operation, Peer, Role, Rules, Server, ServerConfig, ServerHandle, ServerHandler, Uuid,
};
use tokio::sync::mpsc;

/// Hands every frame the server receives to the test.
struct Recorder(mpsc::UnboundedSender<(Peer, Frame)>);

#[async_trait::async_trait]
impl ServerHandler for Recorder {
    async fn frame(&self, _: &ServerHandle, from: &Peer, frame: &Frame) {
        let _ = self.0.send((from.clone(), frame.clone()));
    }
}

fn traced(origin: Uuid) -> Frame {
    let mut f = Frame::new(
        Operation::Status(ssntp::Status::Ready),
        origin,
        b"ready: {}\n".to_vec(),
    );
    f.header.major |= ssntp::types::TRACE_FLAG;
    f.trace = Some(FrameTrace {
        label: b"lbl".to_vec(),
        start_timestamp: GoTime::from_unix(1_700_000_000, 5),
        end_timestamp: GoTime::default(),
        path_length: 1,
        path: vec![Node {
            uuid: origin.as_bytes().to_vec(),
            role: Role::AGENT.bits(),
            tx_timestamp: GoTime::from_unix(1_700_000_000, 7),
            rx_timestamp: GoTime::default(),
        }],
    });
    f
}

#[tokio::test]
async fn every_frame_type_both_ways() {
    let pki = Pki::new();
    let (tx, mut received) = mpsc::unbounded_channel();
    let server_uuid = Uuid::new_v4();
    let mut config = ServerConfig::new(loopback(), pki.identity(Role::SERVER), server_uuid);
    config.configuration = b"configure:\n  launcher:\n    mgmt_net: [10.0.0.0/8]\n".to_vec();
    let server = Server::start(config, Rules::new(), Arc::new(Recorder(tx)))
        .await
        .unwrap();

    let (mut c, info) =
        TestClient::start(client_config(&pki, Role::AGENT, server.local_addr())).await;
    assert_eq!(info.uuid, server_uuid);
    assert_eq!(info.role, Role::SERVER);
    assert_eq!(
        info.configuration,
        b"configure:\n  launcher:\n    mgmt_net: [10.0.0.0/8]\n"
    );
    assert_eq!(c.client.configuration(), info.configuration);

    let ops: Vec<Operation> = Operation::all().collect();
    for (i, op) in ops.iter().enumerate() {
        let payload = format!("n: {i}\n").into_bytes();
        c.client
            .send(Frame::new(*op, c.client.uuid(), payload))
            .await
            .unwrap();
    }
    c.client.send(traced(c.client.uuid())).await.unwrap();
    for (i, op) in ops.iter().enumerate() {
        let (from, f) = tokio::time::timeout(WAIT, received.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(from.uuid, c.client.uuid());
        assert_eq!(from.role, Role::AGENT);
        assert_eq!(f.operation(), Some(*op));
        assert_eq!(f.payload, format!("n: {i}\n").into_bytes());
        assert_eq!(f.payload_length as usize, f.payload.len());
        assert_eq!(f.origin_uuid(), c.client.uuid());
    }
    let (_, f) = received.recv().await.unwrap();
    assert_eq!(f, traced(c.client.uuid()));

    // And from the server to the client, through the session's writer.
    let handle = server.handle();
    for (i, op) in ops.iter().enumerate() {
        let f = Frame::new(*op, server_uuid, format!("m: {i}\n").into_bytes());
        assert!(handle.send_to(&c.client.uuid(), Arc::new(f)).await);
    }
    for (i, op) in ops.iter().enumerate() {
        let f = c.frame().await;
        assert_eq!(f.operation(), Some(*op));
        assert_eq!(f.payload, format!("m: {i}\n").into_bytes());
        assert_eq!(f.origin_uuid(), server_uuid);
    }

    // A CONFIGURE sent to the client replaces what it keeps.
    let cfg = Frame::new(
        Operation::Command(ssntp::Command::Configure),
        server_uuid,
        b"configure: {}\n".to_vec(),
    );
    handle.send_to(&c.client.uuid(), Arc::new(cfg)).await;
    c.frame().await;
    assert_eq!(c.client.configuration(), b"configure: {}\n");

    // A clean close: the server sees the session go.
    c.client.close().await;
    assert!(matches!(c.event().await, ClientEvent::Stopped(None)));
    common_wait(|| handle.sessions().is_empty()).await;
    server.shutdown().await;
}

/// A server with role SERVER, no rules and no handler.
async fn plain_server(pki: &Pki) -> Server {
    let config = ServerConfig::new(loopback(), pki.identity(Role::SERVER), Uuid::new_v4());
    Server::start(config, Rules::new(), Arc::new(NoHandler))
        .await
        .unwrap()
}

async fn common_wait(mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("condition not reached");
}

#[tokio::test]
async fn client_claiming_a_role_it_lacks_is_aborted() {
    let pki = Pki::new();
    let server = plain_server(&pki).await;
    let mut config = client_config(&pki, Role::AGENT, server.local_addr());
    config.role = Some(Role::CONTROLLER);
    let (client, mut events) = ssntp::Client::start(config).unwrap();
    let ev = tokio::time::timeout(WAIT, events.recv())
        .await
        .unwrap()
        .unwrap();
    match ev {
        ClientEvent::Stopped(Some(ClientError::Refused { error, .. })) => {
            assert_eq!(error, "ERROR ConnectionAborted")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!client.is_connected());
    assert!(server.handle().sessions().is_empty());
    assert_eq!(
        server
            .handle()
            .stats()
            .refused_connections
            .load(Ordering::Relaxed),
        1
    );
    server.shutdown().await;
}

#[tokio::test]
async fn server_claiming_a_role_it_lacks_is_refused_by_the_client() {
    let pki = Pki::new();
    let mut config = ServerConfig::new(loopback(), pki.identity(Role::SERVER), Uuid::new_v4());
    config.role = Some(Role::SCHEDULER);
    let server = Server::start(config, Rules::new(), Arc::new(NoHandler))
        .await
        .unwrap();
    let (_client, mut events) =
        ssntp::Client::start(client_config(&pki, Role::AGENT, server.local_addr())).unwrap();
    let ev = tokio::time::timeout(WAIT, events.recv())
        .await
        .unwrap()
        .unwrap();
    match ev {
        ClientEvent::Stopped(Some(ClientError::ServerRole { claimed, held, .. })) => {
            assert_eq!(claimed, Role::SCHEDULER);
            assert_eq!(held, Role::SERVER);
        }
        other => panic!("expected the client to refuse the server, got {other:?}"),
    }
    server.shutdown().await;
}

/// A TLS client that presents `client_cert` (or none) to the server and sends a CONNECT.
/// Returns what the server answered: Ok(bytes read) or the error.
async fn raw_connect(
    server: std::net::SocketAddr,
    trust_pem: &str,
    client_cert: Option<ssntp::cert::GeneratedCert>,
) -> Result<usize, std::io::Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(trust_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some(c) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    let tcp = tokio::net::TcpStream::connect(server).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await?;
    // TLS 1.3 finishes the client side before the server has checked the client certificate;
    // the refusal shows up on the first read.
    let mut enc = ssntp::Encoder::new();
    let mut buf = Vec::new();
    enc.encode(
        &ssntp::Message::Connect(ssntp::ConnectFrame {
            header: Operation::Command(ssntp::Command::Connect).header(),
            role: Role::AGENT.bits(),
            source: Uuid::new_v4().as_bytes().to_vec(),
            destination: vec![0; 16],
        }),
        &mut buf,
    );
    tls.write_all(&buf).await?;
    let mut reply = vec![0u8; 4096];
    tls.read(&mut reply).await
}

#[tokio::test]
async fn unauthenticated_clients_are_refused() {
    let pki = Pki::new();
    let server = plain_server(&pki).await;
    let addr = server.local_addr();

    // The control: a certificate from the right CA gets a CONNECTED back.
    let good = raw_connect(addr, pki.ca_pem(), Some(pki.issue(Role::AGENT))).await;
    assert!(matches!(good, Ok(n) if n > 0), "{good:?}");

    let none = raw_connect(addr, pki.ca_pem(), None).await;
    assert!(none.is_err(), "no client certificate: {none:?}");

    let other_ca = Pki::new();
    let foreign = raw_connect(addr, pki.ca_pem(), Some(other_ca.issue(Role::AGENT))).await;
    assert!(foreign.is_err(), "certificate from another CA: {foreign:?}");
    // Both failures are certificate problems that retrying will not fix, and say which side.
    let err = foreign.unwrap_err();
    let why = ssntp::tls::certificate_problem(&err)
        .unwrap_or_else(|| panic!("{err:?} / {:?}", err.get_ref()));
    assert!(why.contains("refused this node's certificate"), "{why}");
    let untrusted = raw_connect(addr, other_ca.ca_pem(), Some(pki.issue(Role::AGENT))).await;
    let why =
        ssntp::tls::certificate_problem(&untrusted.unwrap_err()).expect("a certificate problem");
    assert!(
        why.contains("peer's certificate is not acceptable"),
        "{why}"
    );

    // An ssntp client whose CA does not know the server refuses it during TLS, and retries.
    let mut config = client_config(&other_ca, Role::AGENT, addr);
    config.handshake_timeout = Duration::from_secs(2);
    let (client, mut events) = ssntp::Client::start(config).unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), events.recv())
            .await
            .is_err()
    );
    assert!(!client.is_connected());
    client.close().await;

    common_wait(|| {
        server
            .handle()
            .stats()
            .refused_connections
            .load(Ordering::Relaxed)
            >= 2
    })
    .await;
    assert!(server.handle().sessions().len() <= 1);
    server.shutdown().await;
}

#[tokio::test]
async fn unknown_frame_type_gets_invalid_frame_type() {
    let pki = Pki::new();
    let server = plain_server(&pki).await;
    let (mut c, _) = TestClient::start(client_config(&pki, Role::AGENT, server.local_addr())).await;
    let mut f = Frame::new(
        Operation::Event(ssntp::Event::TenantAdded),
        c.client.uuid(),
        vec![],
    );
    f.header = Header {
        kind: 9,
        ..f.header
    };
    c.client.send(f).await.unwrap();
    let reply = c.frame().await;
    assert_eq!(
        reply.operation(),
        Some(Operation::Error(ErrorCode::InvalidFrameType))
    );
    assert_eq!(
        server
            .handle()
            .stats()
            .invalid_frames
            .load(Ordering::Relaxed),
        1
    );
    // The session survives it.
    assert!(c.client.is_connected());
    server.shutdown().await;
}
