//! A throw-away PKI and helpers for SSNTP tests on loopback.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ssntp::cert::{self, CertRequest};
use ssntp::{
    Backoff, Client, ClientConfig, ClientEvent, Frame, Identity, Role, Server, ServerConfig,
    ServerInfo, Uuid,
};
use tokio::sync::mpsc;

pub const WAIT: Duration = Duration::from_secs(20);

/// A CA and role certificates issued by it, for 127.0.0.1 and localhost.
pub struct Pki {
    ca: cert::GeneratedCert,
}

impl Pki {
    pub fn new() -> Self {
        Pki {
            ca: cert::generate_ca("tenet test CA", "tenet tests", 1).unwrap(),
        }
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca.cert_pem
    }

    pub fn issue(&self, roles: Role) -> cert::GeneratedCert {
        let req = CertRequest::new(
            roles,
            vec!["localhost".into()],
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        );
        cert::issue(&self.ca.cert_pem, &self.ca.key_pem, &req).unwrap()
    }

    pub fn identity(&self, roles: Role) -> Identity {
        let c = self.issue(roles);
        Identity::from_pem(
            c.bundle().as_bytes(),
            self.ca.cert_pem.as_bytes(),
            "node",
            "ca",
        )
        .unwrap()
    }
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub async fn start_scheduler(pki: &Pki, listen: SocketAddr) -> Server {
    let mut config = ServerConfig::new(
        listen,
        pki.identity(Role::SCHEDULER | Role::SERVER),
        Uuid::new_v4(),
    );
    config.role = Some(Role::SCHEDULER);
    config.configuration =
        b"configure:\n  launcher:\n    compute_net:\n    - 10.254.0.0/24\n".to_vec();
    let scheduler = ssntp::scheduler::Scheduler::new();
    Server::start(config, scheduler.rules(), scheduler)
        .await
        .unwrap()
}

pub fn client_config(pki: &Pki, roles: Role, server: SocketAddr) -> ClientConfig {
    let mut c = ClientConfig::new(
        vec![server.to_string()],
        pki.identity(roles),
        Uuid::new_v4(),
    );
    c.backoff = Backoff::scaled(Duration::from_millis(50));
    c
}

pub struct TestClient {
    pub client: Client,
    pub events: mpsc::Receiver<ClientEvent>,
}

impl TestClient {
    pub async fn start(config: ClientConfig) -> (Self, ServerInfo) {
        let (client, events) = Client::start(config).unwrap();
        let mut c = TestClient { client, events };
        let info = c.connected().await;
        (c, info)
    }

    pub async fn event(&mut self) -> ClientEvent {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("an event in time")
            .expect("the client is running")
    }

    pub async fn connected(&mut self) -> ServerInfo {
        loop {
            match self.event().await {
                ClientEvent::Connected(info) => return info,
                ClientEvent::Stopped(e) => panic!("client stopped: {e:?}"),
                other => eprintln!("waiting for Connected, got {other:?}"),
            }
        }
    }

    pub async fn frame(&mut self) -> Frame {
        match self.event().await {
            ClientEvent::Frame(f) => f,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// The next frame, or None if nothing arrives within `quiet`.
    pub async fn maybe_frame(&mut self, quiet: Duration) -> Option<Frame> {
        match tokio::time::timeout(quiet, self.events.recv()).await {
            Err(_) => None,
            Ok(Some(ClientEvent::Frame(f))) => Some(f),
            Ok(other) => panic!("expected a frame or nothing, got {other:?}"),
        }
    }
}
