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

/// Certificates as ciao-cert makes them: the "any" extended key usage plus role OIDs (no
/// serverAuth/clientAuth), and a CA certificate that the scheduler itself presents.
struct CiaoPki {
    ca_pem: String,
    ca_bundle: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn ciao_params(roles: Role, ca: bool, days: (i64, i64)) -> rcgen::CertificateParams {
    use rcgen::{BasicConstraints, ExtendedKeyUsagePurpose as E, IsCa, KeyUsagePurpose as K};
    let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    p.subject_alt_names.push(rcgen::SanType::IpAddress(
        std::net::Ipv4Addr::LOCALHOST.into(),
    ));
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now + time::Duration::days(days.0);
    p.not_after = now + time::Duration::days(days.1);
    p.key_usages = vec![K::DigitalSignature, K::KeyEncipherment];
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages.push(K::KeyCertSign);
    }
    p.extended_key_usages = vec![E::Any];
    p.extended_key_usages
        .extend(roles.oids().into_iter().map(E::Other));
    p
}

impl CiaoPki {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = ciao_params(Role::SCHEDULER | Role::SERVER, true, (-1, 365));
        let cert = params.self_signed(&key).unwrap();
        let ca_pem = cert.pem();
        let ca_bundle = format!("{}{}", ca_pem, key.serialize_pem());
        CiaoPki {
            ca_pem,
            ca_bundle,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    fn node(&self, roles: Role, days: (i64, i64)) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = ciao_params(roles, false, days)
            .signed_by(&key, &self.issuer)
            .unwrap();
        format!("{}{}", cert.pem(), key.serialize_pem())
    }

    fn identity(&self, bundle: &str, compat: bool) -> ssntp::Identity {
        ssntp::Identity::from_pem(bundle.as_bytes(), self.ca_pem.as_bytes(), "node", "ca")
            .unwrap()
            .with_ciao_compat(compat)
    }
}

/// `--ciao-compat-certs`: a mixed ciao/tenet cluster connects with ciao's certificates, while
/// the chain, the signatures and the validity periods are still checked.
#[tokio::test]
async fn ciao_made_certificates_only_with_the_opt_in() {
    let ciao = CiaoPki::new();
    let start = |compat: bool| {
        let mut config = ssntp::ServerConfig::new(
            loopback(),
            ciao.identity(&ciao.ca_bundle, compat),
            Uuid::new_v4(),
        );
        config.role = Some(Role::SCHEDULER);
        let scheduler = ssntp::scheduler::Scheduler::new();
        ssntp::Server::start(config, scheduler.rules(), scheduler)
    };
    let connects = |server: std::net::SocketAddr, identity: ssntp::Identity| async move {
        let mut c = ssntp::ClientConfig::new(vec![server.to_string()], identity, Uuid::new_v4());
        c.handshake_timeout = Duration::from_secs(2);
        c.backoff = ssntp::Backoff::scaled(Duration::from_millis(50));
        let (client, mut events) = ssntp::Client::start(c).unwrap();
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(1), events.recv()).await,
            Ok(Some(ssntp::ClientEvent::Connected(_)))
        );
        client.close().await;
        ok
    };
    let agent = ciao.node(Role::AGENT, (-1, 365));

    // Without the opt-in, webpki refuses ciao's certificates.
    let strict = start(false).await.unwrap();
    assert!(!connects(strict.local_addr(), ciao.identity(&agent, false)).await);
    strict.shutdown().await;

    let compat = start(true).await.unwrap();
    let addr = compat.local_addr();
    assert!(
        connects(addr, ciao.identity(&agent, true)).await,
        "ciao's certificates with --ciao-compat-certs"
    );
    // Still checked: an expired certificate, and one from another ciao CA.
    let expired = ciao.node(Role::AGENT, (-10, -1));
    assert!(
        !connects(addr, ciao.identity(&expired, true)).await,
        "expired"
    );
    let other = CiaoPki::new();
    let foreign = other.node(Role::AGENT, (-1, 365));
    let id = ssntp::Identity::from_pem(foreign.as_bytes(), ciao.ca_pem.as_bytes(), "node", "ca")
        .unwrap()
        .with_ciao_compat(true);
    assert!(!connects(addr, id).await, "another CA");
    compat.shutdown().await;
}
