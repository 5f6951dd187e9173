//! The controller commands of `tenet` (instance start/delete, public-ip assign/release,
//! cnci refresh) against a real scheduler over TLS on loopback, with the test playing the
//! compute node and the concentrator that answer them.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use ssntp::cert::{self, CertRequest};
use ssntp::payload::{
    AssignPublicIp, CnciRefresh, Delete, InstanceDeleted, InstanceDeletedEvent, Payload,
    PublicIpAssigned, PublicIpEvent, PublicIpFailure, PublicIpFailureReason, Start, StartFailure,
    StartFailureReason,
};
use ssntp::{
    Backoff, Client, ClientConfig, ClientEvent, Command, ErrorCode, Event, Frame, Identity,
    Operation, Role, Server, ServerConfig, Uuid,
};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

struct Pki {
    ca: cert::GeneratedCert,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        Pki {
            ca: cert::generate_ca("tenet test CA", "tenet tests", 1).unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn issue(&self, roles: Role) -> cert::GeneratedCert {
        let req = CertRequest::new(
            roles,
            vec!["localhost".into()],
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
        );
        cert::issue(&self.ca.cert_pem, &self.ca.key_pem, &req).unwrap()
    }

    fn identity(&self, roles: Role) -> Identity {
        let c = self.issue(roles);
        Identity::from_pem(
            c.bundle().as_bytes(),
            self.ca.cert_pem.as_bytes(),
            "node",
            "ca",
        )
        .unwrap()
    }

    fn files(&self, roles: Role, name: &str) -> (PathBuf, PathBuf) {
        let cert = self.dir.path().join(format!("{name}.pem"));
        std::fs::write(&cert, self.issue(roles).bundle()).unwrap();
        let ca = self.dir.path().join("ca.pem");
        std::fs::write(&ca, &self.ca.cert_pem).unwrap();
        (cert, ca)
    }
}

struct Peer {
    client: Client,
    events: mpsc::Receiver<ClientEvent>,
}

impl Peer {
    async fn start(pki: &Pki, roles: Role, server: std::net::SocketAddr) -> Peer {
        let mut c = ClientConfig::new(
            vec![server.to_string()],
            pki.identity(roles),
            Uuid::new_v4(),
        );
        c.backoff = Backoff::scaled(Duration::from_millis(50));
        let (client, events) = Client::start(c).unwrap();
        let mut p = Peer { client, events };
        loop {
            match tokio::time::timeout(WAIT, p.events.recv()).await {
                Ok(Some(ClientEvent::Connected(_))) => return p,
                Ok(Some(_)) => {}
                other => panic!("no connection: {other:?}"),
            }
        }
    }

    async fn expect(&mut self, op: Operation) -> Frame {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ClientEvent::Frame(f))) if f.operation() == Some(op) => return f,
                Ok(Some(_)) => {}
                other => panic!("waiting for {op:?}: {other:?}"),
            }
        }
    }
}

/// Runs `tenet <args>` as the controller in the background.
fn tenet(
    addr: &str,
    cert: &PathBuf,
    ca: &PathBuf,
    args: &[&str],
) -> tokio::task::JoinHandle<Output> {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tenet"));
    cmd.args(args)
        .env("TENET_SCHEDULER", addr)
        .env("TENET_CONTROLLER_CERT", cert)
        .env("TENET_CA", ca);
    tokio::spawn(async move { cmd.output().await.unwrap() })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_commands_over_ssntp() {
    let pki = Pki::new();
    let mut config = ServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        pki.identity(Role::SCHEDULER | Role::SERVER),
        Uuid::new_v4(),
    );
    config.role = Some(Role::SCHEDULER);
    let scheduler = ssntp::scheduler::Scheduler::new();
    let sched = Server::start(config, scheduler.rules(), scheduler)
        .await
        .unwrap();
    let addr = sched.local_addr().to_string();
    let mut cnci = Peer::start(&pki, Role::CNCIAGENT, sched.local_addr()).await;
    let mut cn = Peer::start(&pki, Role::AGENT, sched.local_addr()).await;
    let (cert, ca) = pki.files(Role::CONTROLLER, "controller");
    let conc = cnci.client.uuid().to_string();

    // public-ip assign: the concentrator's answer is the command's result.
    let run = tenet(
        &addr,
        &cert,
        &ca,
        &[
            "public-ip",
            "assign",
            "--concentrator",
            &conc,
            "--public",
            "192.0.2.50",
            "--private",
            "172.16.0.5",
        ],
    );
    let f = cnci
        .expect(Operation::Command(Command::AssignPublicIp))
        .await;
    let cmd = AssignPublicIp::from_yaml(&f.payload)
        .unwrap()
        .assign_public_ip;
    assert_eq!(
        (cmd.public_ip.as_str(), cmd.private_ip.as_str()),
        ("192.0.2.50", "172.16.0.5")
    );
    let ok = PublicIpAssigned::from(PublicIpEvent {
        concentrator_uuid: conc.clone(),
        instance_uuid: String::new(),
        public_ip: cmd.public_ip.clone(),
        private_ip: cmd.private_ip.clone(),
    });
    cnci.client
        .send_event(Event::PublicIpAssigned, ok.to_yaml())
        .await
        .unwrap();
    let out = run.await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "192.0.2.50 -> 172.16.0.5");

    // ... and a refusal is exit status 1 with the reason.
    let run = tenet(
        &addr,
        &cert,
        &ca,
        &[
            "public-ip",
            "assign",
            "--concentrator",
            &conc,
            "--public",
            "192.0.2.51",
            "--private",
            "172.99.0.1",
        ],
    );
    cnci.expect(Operation::Command(Command::AssignPublicIp))
        .await;
    let failure = PublicIpFailure {
        concentrator_uuid: conc.clone(),
        public_ip: "192.0.2.51".into(),
        private_ip: "172.99.0.1".into(),
        reason: PublicIpFailureReason::InvalidData,
        ..Default::default()
    };
    cnci.client
        .send_error(ErrorCode::AssignPublicIpFailure, failure.to_yaml())
        .await
        .unwrap();
    let out = run.await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("InvalidData"),
        "{}",
        text(&out.stderr)
    );

    // instance start: a StartFailure for the instance fails the command with its detail.
    let run = tenet(
        &addr,
        &cert,
        &ca,
        &[
            "instance",
            "start",
            "--tenant",
            "t1",
            "--subnet",
            "172.16.0.0/24",
            "--concentrator",
            &conc,
            "--concentrator-ip",
            "10.254.0.2",
            "--netns",
            "/run/netns/w1",
            "--wait",
            "10",
        ],
    );
    let f = cn.expect(Operation::Command(Command::Start)).await;
    let start = Start::from_yaml(&f.payload).unwrap().start;
    assert_eq!(start.networking.netns, "/run/netns/w1");
    assert_eq!(start.vm_type, "docker");
    let failure = StartFailure {
        node_uuid: cn.client.uuid().to_string(),
        instance_uuid: start.instance_uuid.clone(),
        reason: StartFailureReason::NetworkFailure,
        restart: false,
        detail: "creating the VNIC: no such namespace".into(),
    };
    cn.client
        .send_error(ErrorCode::StartFailure, failure.to_yaml())
        .await
        .unwrap();
    let out = run.await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no such namespace"),
        "{}",
        text(&out.stderr)
    );

    // ... and without a failure it prints the instance UUID.
    let instance = Uuid::new_v4().to_string();
    let run = tenet(
        &addr,
        &cert,
        &ca,
        &[
            "instance",
            "start",
            "--tenant",
            "t1",
            "--subnet",
            "172.16.0.0/24",
            "--concentrator",
            &conc,
            "--concentrator-ip",
            "10.254.0.2",
            "--instance",
            &instance,
            "--wait",
            "1",
        ],
    );
    cn.expect(Operation::Command(Command::Start)).await;
    let out = run.await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), instance);

    // instance delete: routed to the node, answered with InstanceDeleted.
    let node = cn.client.uuid().to_string();
    let run = tenet(
        &addr,
        &cert,
        &ca,
        &[
            "instance",
            "delete",
            "--instance",
            &instance,
            "--node",
            &node,
        ],
    );
    let f = cn.expect(Operation::Command(Command::Delete)).await;
    assert_eq!(
        Delete::from_yaml(&f.payload).unwrap().delete.instance_uuid,
        instance
    );
    let done = InstanceDeleted::from(InstanceDeletedEvent {
        instance_uuid: instance.clone(),
    });
    cn.client
        .send_event(Event::InstanceDeleted, done.to_yaml())
        .await
        .unwrap();
    let out = run.await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    // cnci refresh: the peers as ciao lists them; a bad peer is refused before sending.
    let run = tenet(
        &addr,
        &cert,
        &ca,
        &[
            "cnci",
            "refresh",
            "--concentrator",
            &conc,
            "--peer",
            "10.254.0.2=172.16.0.0/24",
            "--peer",
            "10.254.0.3=172.16.1.0/24,192.168.128.2",
        ],
    );
    let f = cnci.expect(Operation::Command(Command::RefreshCnci)).await;
    let refresh = CnciRefresh::from_yaml(&f.payload).unwrap().cnci_refresh;
    assert_eq!(refresh.cncis.len(), 2);
    assert_eq!(refresh.cncis[1].tunnel_ip, "192.168.128.2");
    assert!(run.await.unwrap().status.success());
    let out = tenet(
        &addr,
        &cert,
        &ca,
        &["cnci", "refresh", "--concentrator", &conc, "--peer", "nope"],
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--peer"),
        "{}",
        text(&out.stderr)
    );

    // A certificate without the controller role is refused with the reason.
    let (agent_cert, _) = pki.files(Role::AGENT, "agent");
    let out = tenet(
        &addr,
        &agent_cert,
        &ca,
        &[
            "public-ip",
            "release",
            "--concentrator",
            &conc,
            "--public",
            "192.0.2.50",
        ],
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not controller"),
        "{}",
        text(&out.stderr)
    );
    sched.shutdown().await;
}
