//! The real `tenet-cnci run` binary against a scheduler (the library the tenet-scheduler
//! binary runs), real etcd and TLS on loopback, and namespaces: a compute node's TenantAdded
//! makes the workload's lease come over the tunnel, a controller's AssignPublicIP is answered
//! and the external host reaches the workload, bad requests get ciao's error payload with a
//! reason, 201 interleaved TenantAdded/TenantRemoved end in the state of the last, the status
//! key lives on a lease, and a restarted agent announces itself again and serves on.

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use ssntp::payload::{
    AssignPublicIp, ConcentratorInstanceAdded, Payload, PublicIpAssigned, PublicIpCommand,
    PublicIpFailure, PublicIpFailureReason, ReleasePublicIp, TenantAdded, TenantRemoved,
    TenantSubnet,
};
use ssntp::{Command, ErrorCode, Event, Operation, Role, Uuid};
use tenet::net::tunnel::BackendChoice;
use tenet::store::Datastore;
use tenet::testbed::{EtcdServer, Fabric, Host};

/// The agent process; killed (and waited for) if the test fails before stopping it.
struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

/// Another workspace binary, next to this test's (`cargo test --workspace` builds them all).
fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace` first (`cargo test --workspace` does)",
        path.display()
    );
    path
}

impl Agent {
    fn spawn(args: &[String], etcd: &str, log: &Path) -> Agent {
        Self::spawn_program(Path::new(env!("CARGO_BIN_EXE_tenet-cnci")), args, etcd, log)
    }

    fn spawn_program(program: &Path, args: &[String], etcd: &str, log: &Path) -> Agent {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = std::process::Command::new(program)
            .arg("run")
            .args(args)
            .env("ETCD_ENDPOINTS", etcd)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        Agent {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    /// SIGTERM, and the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        child.wait().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            eprintln!("--- agent log {} ---\n{}", self.log.display(), self.log());
        }
    }
}

fn tenant_subnet(cn: &str, cn_ip: Ipv4Addr, conc: &Uuid, conc_ip: Ipv4Addr) -> TenantSubnet {
    let net = subnet();
    TenantSubnet {
        agent_uuid: cn.into(),
        agent_ip: cn_ip.to_string(),
        tenant_uuid: "t1".into(),
        tenant_subnet: net.to_string(),
        concentrator_uuid: conc.to_string(),
        concentrator_ip: conc_ip.to_string(),
        subnet_key: tenet::types::TunnelKey::from_subnet(&net)
            .unwrap()
            .get()
            .into(),
    }
}

/// The compute nodes the concentrator in `host` has tunnels to (from the kernel).
async fn tunnels_to(host: &Host, run: &Path) -> Vec<Ipv4Addr> {
    let view = tenet_cnci::show::inspect(Some(&host.path()), run, None)
        .await
        .unwrap();
    view.subnets
        .into_iter()
        .flat_map(|s| s.compute_nodes)
        .collect()
}

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concentrator_agent_over_ssntp() {
    let etcd = EtcdServer::start().await.unwrap();
    let store: Arc<dyn Datastore> = Arc::new(etcd.store().await.unwrap());
    let pki = Pki::new();
    let sched = scheduler(&pki).await;
    let addr = sched.local_addr();
    let fabric = Fabric::new().await.unwrap();
    let cn_host = fabric.add_host("cn").await.unwrap();
    let conc_host = fabric.add_host("conc").await.unwrap();
    let inet = internet(&conc_host);
    let run = tempfile::tempdir().unwrap();
    let uuid = Uuid::new_v4();
    let (cert, ca) = pki.files(Role::CNCIAGENT, "cnci");
    let args: Vec<String> = [
        "--server",
        &addr.to_string(),
        "--cert",
        cert.to_str().unwrap(),
        "--ca",
        ca.to_str().unwrap(),
        "--uuid",
        &uuid.to_string(),
        "--tenant",
        "t1",
        "--netns",
        conc_host.path().to_str().unwrap(),
        "--compute-net",
        "10.254.0.0/16",
        "--tunnel",
        "userspace",
        "--run-dir",
        run.path().to_str().unwrap(),
        "--status-ttl",
        "3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = run.path().join("agent.log");

    // A certificate without the cnciagent role is refused with a reason, before anything.
    let (wrong, _) = pki.files(Role::AGENT, "wrong");
    let mut wrong_args = args.clone();
    wrong_args[3] = wrong.to_str().unwrap().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tenet-cnci"))
        .arg("run")
        .args(&wrong_args)
        .env("ETCD_ENDPOINTS", etcd.endpoint())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not cnciagent"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut controller = Peer::start(&pki, Role::CONTROLLER, addr).await;
    let mut agent = Agent::spawn(&args, &etcd.endpoint(), &log);
    let hello = controller
        .expect(Operation::Event(Event::ConcentratorInstanceAdded))
        .await;
    let hello = ConcentratorInstanceAdded::from_yaml(&hello.payload)
        .unwrap()
        .concentrator_instance_added;
    assert_eq!(hello.instance_uuid, uuid.to_string());
    assert_eq!(hello.tenant_uuid, "t1");
    assert_eq!(hello.concentrator_ip, conc_host.ip().to_string());
    assert_eq!(hello.concentrator_mac.len(), 17, "{hello:?}");
    let status_key = tenet::keyspace::node::key(&uuid.to_string());
    let status = store.get(&status_key).await.unwrap().expect("status key");
    let status = tenet::keyspace::node::decode(&status_key, &status.value).unwrap();
    assert_eq!(status.underlay_ip, conc_host.ip());

    // A compute node's TenantAdded: the workload leases its address over the tunnel.
    let cn = cn_on(&cn_host, "cn-1", BackendChoice::Userspace).await;
    let w = workload(
        &cn,
        &cn_host,
        "v1",
        "t1",
        (&uuid.to_string(), conc_host.ip()),
        "02:00:00:00:00:05",
    )
    .await;
    put_endpoint(
        &store,
        "cn-1",
        "v1",
        "t1",
        w.mac,
        "172.16.0.5".parse().unwrap(),
    )
    .await;
    let cn_agent = Peer::start(&pki, Role::AGENT, addr).await;
    let added = TenantAdded::from(tenant_subnet("cn-1", cn_host.ip(), &uuid, conc_host.ip()));
    cn_agent
        .client
        .send_event(Event::TenantAdded, added.to_yaml())
        .await
        .unwrap();
    let dhcp = DhcpClient::new();
    let lease = dhcp.lease(&w.ns, 15).expect("a lease over the tunnel");
    assert_eq!(lease.ip, "172.16.0.5".parse::<Ipv4Addr>().unwrap());
    assert!(ping(&w.ns, lease.router));

    // AssignPublicIP from the controller: answered, and the external host reaches w.
    let command = |public: &str, private: &str| PublicIpCommand {
        concentrator_uuid: uuid.to_string(),
        tenant_uuid: "t1".into(),
        instance_uuid: "i-1".into(),
        public_ip: public.into(),
        private_ip: private.into(),
        vnic_mac: w.mac.to_string(),
    };
    controller
        .client
        .send_command(
            Command::AssignPublicIp,
            AssignPublicIp::from(command("192.0.2.50", "172.16.0.5")).to_yaml(),
        )
        .await
        .unwrap();
    let assigned = controller
        .expect(Operation::Event(Event::PublicIpAssigned))
        .await;
    let assigned = PublicIpAssigned::from_yaml(&assigned.payload)
        .unwrap()
        .public_ip_assigned;
    assert_eq!(
        (assigned.public_ip.as_str(), assigned.instance_uuid.as_str()),
        ("192.0.2.50", "i-1")
    );
    assert!(
        ping(&inet, "192.0.2.50".parse().unwrap()),
        "the floating IP answers"
    );

    // Bad requests: ciao's error payload with its reason.
    for (public, private) in [("192.0.2.51", "172.99.0.1"), ("not-an-ip", "172.16.0.5")] {
        controller
            .client
            .send_command(
                Command::AssignPublicIp,
                AssignPublicIp::from(command(public, private)).to_yaml(),
            )
            .await
            .unwrap();
        let failed = controller
            .expect(Operation::Error(ErrorCode::AssignPublicIpFailure))
            .await;
        let failed = PublicIpFailure::from_yaml(&failed.payload).unwrap();
        assert_eq!(failed.reason, PublicIpFailureReason::InvalidData);
        assert_eq!(failed.public_ip, public);
    }
    controller
        .client
        .send_command(
            Command::ReleasePublicIp,
            ReleasePublicIp::from(command("192.0.2.50", "172.16.0.5")).to_yaml(),
        )
        .await
        .unwrap();
    controller
        .expect(Operation::Event(Event::PublicIpUnassigned))
        .await;
    assert!(!ping(&inet, "192.0.2.50".parse().unwrap()), "released");

    // 201 interleaved TenantAdded/TenantRemoved for one compute node, then a marker from
    // the same sender: when the marker's tunnel is there, all were applied, in order.
    let flappy: Ipv4Addr = "10.254.0.77".parse().unwrap();
    for i in 0..=200 {
        let p = tenant_subnet("cn-x", flappy, &uuid, conc_host.ip());
        let (event, payload) = if i % 2 == 0 {
            (Event::TenantAdded, TenantAdded::from(p).to_yaml())
        } else {
            (Event::TenantRemoved, TenantRemoved::from(p).to_yaml())
        };
        cn_agent.client.send_event(event, payload).await.unwrap();
    }
    let marker: Ipv4Addr = "10.254.0.78".parse().unwrap();
    cn_agent
        .client
        .send_event(
            Event::TenantAdded,
            TenantAdded::from(tenant_subnet("cn-y", marker, &uuid, conc_host.ip())).to_yaml(),
        )
        .await
        .unwrap();
    wait_until("the marker's tunnel", || async {
        tunnels_to(&conc_host, run.path()).await.contains(&marker)
    })
    .await;
    assert!(
        tunnels_to(&conc_host, run.path()).await.contains(&flappy),
        "the last of the interleaved frames was a TenantAdded"
    );
    wait_until("the status counts the tunnels", || async {
        store
            .get(&status_key)
            .await
            .unwrap()
            .and_then(|kv| tenet::keyspace::node::decode(&status_key, &kv.value).ok())
            .is_some_and(|s| s.tunnels == 3)
    })
    .await;

    // SIGTERM: a clean exit, and the status key goes with its lease. (The bridges and
    // dnsmasq stay for the next agent; the userspace GRE datapath lives in the process.)
    assert!(agent.stop().success(), "{}", agent.log());
    assert!(store.get(&status_key).await.unwrap().is_none());

    // A new agent takes over and announces itself again.
    let mut agent = Agent::spawn(&args, &etcd.endpoint(), &log);
    controller
        .expect(Operation::Event(Event::ConcentratorInstanceAdded))
        .await;
    assert!(dhcp.lease(&w.ns, 10).is_some(), "leases after the restart");
    assert!(ping(&w.ns, lease.router));
    assert!(agent.stop().success(), "{}", agent.log());

    // Leave nothing: the dataplane the agents left, removed through the library.
    let mut config = cnci_config(&conc_host, &uuid.to_string(), "t1", run.path());
    config.compute_nets = vec!["10.254.0.0/16".parse().unwrap()];
    let conc = tenet_cnci::Concentrator::init(config, Some(store.clone()))
        .await
        .unwrap();
    conc.rebuild().await.unwrap();
    conc.reset().await.unwrap();
    cn.reset().await.unwrap();
    sched.shutdown().await;
}

/// One request on the local API: the response and the descriptors that came with it.
fn api_call(
    path: &Path,
    request: &str,
) -> (tenet_cn::agent::api::ApiResponse, Vec<std::os::fd::OwnedFd>) {
    tenet_cn::agent::api_client::ApiClient::new(path)
        .call_raw(request)
        .unwrap()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Both agents as real binaries: a controller starts a container workload through the
/// scheduler → tenet-cn makes its address (per-tenant IPAM), its VNIC in the workload's
/// namespace and its endpoint, and tells tenet-cnci (TenantAdded) → the workload reaches its
/// gateway over the tunnel and leases its address by DHCP. DELETE undoes all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_starts_and_deletes_a_container_workload() {
    use ssntp::payload::{
        Delete, DeleteFailure, DeleteFailureReason, NodeConnected, Start, StartCommand,
        StartFailure, StartFailureReason, StopCommand, VnicNetworking,
    };
    let etcd = EtcdServer::start().await.unwrap();
    let store: Arc<dyn Datastore> = Arc::new(etcd.store().await.unwrap());
    let pki = Pki::new();
    let sched = scheduler(&pki).await;
    let addr = sched.local_addr().to_string();
    let fabric = Fabric::new().await.unwrap();
    let cn_host = fabric.add_host("cn").await.unwrap();
    let conc_host = fabric.add_host("conc").await.unwrap();
    let _inet = internet(&conc_host);
    let run = tempfile::tempdir().unwrap();
    let (conc_uuid, cn_uuid) = (Uuid::new_v4(), Uuid::new_v4());
    let mut controller = Peer::start(&pki, Role::CONTROLLER, sched.local_addr()).await;

    let run_dir = run.path().join("cnci");
    let mut conc_args = cnci_args(&pki, &addr, &conc_uuid, &conc_host, &run_dir);
    conc_args.extend(strings(&["--tunnel", "userspace"]));
    let mut conc_agent = Agent::spawn(&conc_args, &etcd.endpoint(), &run.path().join("cnci.log"));
    controller
        .expect(Operation::Event(Event::ConcentratorInstanceAdded))
        .await;

    let api_socket = run.path().join("cn.sock");
    let mut cn = cn_args(&pki, &addr, &cn_uuid, "cn-1", &cn_host);
    cn.extend(strings(&[
        "--tunnel",
        "userspace",
        "--api-socket",
        api_socket.to_str().unwrap(),
        "--log-format",
        "json",
    ]));
    let mut cn_agent = Agent::spawn_program(
        &workspace_binary("tenet-cn"),
        &cn,
        &etcd.endpoint(),
        &run.path().join("cn.log"),
    );
    let node = controller
        .expect(Operation::Event(Event::NodeConnected))
        .await;
    assert_eq!(
        NodeConnected::from_yaml(&node.payload)
            .unwrap()
            .node_connected
            .node_uuid,
        cn_uuid.to_string()
    );

    // START a container workload in its own namespace.
    let wl = tenet::testbed::Netns::create("wl").unwrap();
    let start = |instance: &str, concentrator: &str| {
        Start::from(StartCommand {
            instance_uuid: instance.into(),
            tenant_uuid: "t1".into(),
            vm_type: "docker".into(),
            networking: VnicNetworking {
                vnic_mac: "02:00:00:00:01:02".into(),
                vnic_uuid: format!("vnic-{instance}"),
                concentrator_uuid: concentrator.into(),
                concentrator_ip: conc_host.ip().to_string(),
                subnet: "172.16.0.0/24".into(),
                netns: wl.path().to_string_lossy().into_owned(),
                ..Default::default()
            },
            ..Default::default()
        })
        .to_yaml()
    };
    controller
        .client
        .send_command(Command::Start, start("i-1", &conc_uuid.to_string()))
        .await
        .unwrap();
    let endpoint = tenet::calico::CalicoKey::WorkloadEndpoint(tenet::calico::WorkloadEndpointId {
        host: "cn-1".into(),
        orchestrator: "ciao".into(),
        workload: "i-1".into(),
        endpoint: "vnic-i-1".into(),
    })
    .path();
    wait_until("the endpoint", || async {
        store.get(&endpoint).await.unwrap().is_some()
    })
    .await;
    let ep: tenet::calico::WorkloadEndpoint =
        serde_json::from_slice(&store.get(&endpoint).await.unwrap().unwrap().value).unwrap();
    assert_eq!(ep.labels["tenet.tenant"], "t1");
    assert_eq!(
        ep.ipv4_nets[0].to_string(),
        "172.16.0.2/32",
        "the first workload address"
    );
    let shown = wl.run(&["ip", "-4", "addr", "show", "eth0"]).unwrap();
    assert!(shown.contains("172.16.0.2/24"), "{shown}");
    wait_until(
        "the workload reaches its gateway over the tunnel",
        || async { ping(&wl, "172.16.0.1".parse().unwrap()) },
    )
    .await;
    let lease = DhcpClient::new().lease(&wl, 10).expect("a DHCP lease");
    assert_eq!(lease.ip.to_string(), "172.16.0.2");

    // `tenet status`: both agents, the compute node with its tunnel's subnet.
    let out = std::process::Command::new(workspace_binary("tenet"))
        .args(["status", "-o", "json"])
        .env("ETCD_ENDPOINTS", etcd.endpoint())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Each row is the agent's status key, plus what its datapath counted where it runs on
    // this machine.
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let nodes: Vec<tenet::keyspace::node::NodeStatus> = rows
        .into_iter()
        .map(|mut row| {
            row.as_object_mut().unwrap().remove("datapath");
            serde_json::from_value(row).unwrap()
        })
        .collect();
    let cn_node = nodes
        .iter()
        .find(|n| n.uuid == cn_uuid.to_string())
        .unwrap();
    assert_eq!(cn_node.name, "cn-1");
    assert_eq!(cn_node.subnets, ["172.16.0.0/24".parse().unwrap()]);
    assert!(nodes.iter().any(|n| n.uuid == conc_uuid.to_string()
        && n.role == tenet::keyspace::node::NodeRole::Concentrator));

    // A START whose subnet has no concentrator: StartFailure, nothing made.
    controller
        .client
        .send_command(Command::Start, start("i-2", ""))
        .await
        .unwrap();
    let failed = controller
        .expect(Operation::Error(ErrorCode::StartFailure))
        .await;
    let failed = StartFailure::from_yaml(&failed.payload).unwrap();
    assert_eq!(failed.reason, StartFailureReason::InvalidData);
    assert_eq!(failed.instance_uuid, "i-2");
    assert!(failed.detail.contains("concentrator"), "{failed:?}");

    // DELETE: VNIC, endpoint, address and tunnel go, at both ends.
    let delete = |instance: &str| {
        Delete::from(StopCommand {
            instance_uuid: instance.into(),
            workload_agent_uuid: cn_uuid.to_string(),
            migration: false,
        })
        .to_yaml()
    };
    controller
        .client
        .send_command(Command::Delete, delete("i-1"))
        .await
        .unwrap();
    controller
        .expect(Operation::Event(Event::InstanceDeleted))
        .await;
    assert!(store.get(&endpoint).await.unwrap().is_none());
    let ipam_left = store
        .list("/tenet/v1/tenant/t1/ipam/handle/")
        .await
        .unwrap();
    assert!(
        ipam_left
            .kvs
            .iter()
            .all(|kv| kv.key.contains("tenet-reserved")),
        "only the subnet's reserved addresses stay held: {:?}",
        ipam_left.kvs.iter().map(|kv| &kv.key).collect::<Vec<_>>()
    );
    assert!(
        store.list("/calico/ipam/").await.unwrap().kvs.is_empty(),
        "Calico's global IPAM is untouched"
    );
    let links = cn_host.run(&["ip", "-o", "link"]).unwrap();
    assert!(
        ["tvn", "tbr", "tgt"].iter().all(|p| !links.contains(p)),
        "{links}"
    );
    wait_until("the concentrator drops the tunnel", || async {
        tunnels_to(&conc_host, &run_dir).await.is_empty()
    })
    .await;
    controller
        .client
        .send_command(Command::Delete, delete("i-1"))
        .await
        .unwrap();
    let failed = controller
        .expect(Operation::Error(ErrorCode::DeleteFailure))
        .await;
    assert_eq!(
        DeleteFailure::from_yaml(&failed.payload).unwrap().reason,
        DeleteFailureReason::NoInstance
    );
    let cn_status = tenet::keyspace::node::key(&cn_uuid.to_string());
    assert!(store.get(&cn_status).await.unwrap().is_some());

    // The local API: a VM tap whose queue descriptors come back over the socket and work.
    let mode = std::fs::metadata(&api_socket).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let create = format!(
        r#"{{"op":"create","instance":"vm-1","vnic":"vnic-vm-1","tenant":"t1","subnet":"172.16.0.0/24","concentrator":"{conc_uuid}","concentrator_ip":"{}","kind":"vm","queues":2}}"#,
        conc_host.ip()
    );
    let (created, queues) = api_call(&api_socket, &create);
    assert!(created.ok, "{created:?}");
    assert_eq!((created.queues, queues.len()), (2, 2));
    let tap = created.ifname.clone().unwrap();
    // A frame written to a queue is a frame the tap receives on the host (VM taps carry the
    // virtio-net header, 10 bytes, in front).
    let frame = [
        [0u8; 10].as_slice(),
        &[0xffu8; 6],
        &[0x02, 0, 0, 0, 0, 0x09],
        &[0x88, 0xb5],
        &[0u8; 46],
    ]
    .concat();
    assert_eq!(nix::unistd::write(&queues[0], &frame).unwrap(), frame.len());
    let stats = cn_host
        .run(&["ip", "-s", "-j", "link", "show", &tap])
        .unwrap();
    let rx: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(
        rx[0]["stats64"]["rx"]["packets"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    // The same instance twice at once: one is made, the other refused (one address).
    let twice = create.replace("vm-1", "vm-2");
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| api_call(&api_socket, &twice).0);
        let b = s.spawn(|| api_call(&api_socket, &twice).0);
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(
        [a.ok, b.ok].iter().filter(|ok| **ok).count(),
        1,
        "{a:?} {b:?}"
    );
    let (winner, loser) = if a.ok { (&a, &b) } else { (&b, &a) };
    assert_eq!(
        loser.reason.as_deref(),
        Some("instance_exists"),
        "{loser:?}"
    );
    // The refused one undid only what it made: the instance keeps its tap (the refused
    // START found it made) and its address (below).
    let tap2 = winner.ifname.clone().unwrap();
    assert!(
        cn_host.run(&["ip", "link", "show", &tap2]).is_ok(),
        "the instance's tap is gone"
    );
    // Repeated with the instance's own address: the instance exists (not "address taken").
    let own_ip = winner.ip.unwrap();
    let (again, _) = api_call(
        &api_socket,
        &twice.replace(r#""kind":"vm""#, &format!(r#""kind":"vm","ip":"{own_ip}""#)),
    );
    assert_eq!(
        again.reason.as_deref(),
        Some("instance_exists"),
        "{again:?}"
    );
    let handles = store
        .list("/tenet/v1/tenant/t1/ipam/handle/")
        .await
        .unwrap();
    assert_eq!(
        handles
            .kvs
            .iter()
            .filter(|kv| kv.key.ends_with("vnic-vm-2"))
            .count(),
        1
    );
    let held: tenet::calico::IpamHandle = serde_json::from_slice(
        &store
            .get("/tenet/v1/tenant/t1/ipam/handle/vnic-vm-2")
            .await
            .unwrap()
            .unwrap()
            .value,
    )
    .unwrap();
    assert_eq!(held.block.values().sum::<u64>(), 1, "one address: {held:?}");
    let (gone, _) = api_call(&api_socket, r#"{"op":"destroy","instance":"vm-2"}"#);
    assert!(gone.ok, "{gone:?}");
    let (bad, none) = api_call(&api_socket, r#"{"op":"create","kind":"vm"}"#);
    assert!(!bad.ok && none.is_empty());
    assert_eq!(bad.reason.as_deref(), Some("invalid_payload"));
    // A VM's tap is made while its address is allocated. When the address is refused (here
    // the gateway's, in a subnet new to the node), the tap, bridge and tunnel made for it go
    // again: the node's links are what they were.
    let links = || {
        let mut names: Vec<String> = cn_host
            .run(&["ip", "-o", "link", "show"])
            .unwrap()
            .lines()
            .filter_map(|l| l.split(": ").nth(1).map(str::to_string))
            .collect();
        names.sort();
        names
    };
    let before = links();
    let gateway = format!(
        r#"{{"op":"create","instance":"vm-3","vnic":"vnic-vm-3","tenant":"t1","subnet":"172.16.9.0/24","concentrator":"{conc_uuid}","concentrator_ip":"{}","kind":"vm","ip":"172.16.9.1"}}"#,
        conc_host.ip()
    );
    let (refused, none) = api_call(&api_socket, &gateway);
    assert!(!refused.ok && none.is_empty(), "{refused:?}");
    assert_eq!(
        refused.reason.as_deref(),
        Some("invalid_data"),
        "{refused:?}"
    );
    assert_eq!(links(), before);
    drop(queues);
    let (destroyed, _) = api_call(&api_socket, r#"{"op":"destroy","instance":"vm-1"}"#);
    assert!(destroyed.ok, "{destroyed:?}");
    assert!(!cn_host.run(&["ip", "-o", "link"]).unwrap().contains(&tap));

    assert!(cn_agent.stop().success(), "{}", cn_agent.log());
    // `--log-format json`: every line is a JSON object, and the START's lines carry its
    // span with tenant, VNIC and subnet under the agent's span with the node's ids.
    let json: Vec<serde_json::Value> = cn_agent
        .log()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        json.iter().any(|v| {
            let spans = v["spans"].as_array().cloned().unwrap_or_default();
            spans
                .iter()
                .any(|s| s["name"] == "cn_agent" && s["host"] == "cn-1")
                && spans.iter().any(|s| {
                    s["name"] == "start"
                        && s["tenant"] == "t1"
                        && s.get("vnic").is_some()
                        && s.get("subnet").is_some()
                })
        }),
        "no START line with its spans:\n{}",
        cn_agent.log()
    );
    assert!(conc_agent.stop().success(), "{}", conc_agent.log());
    assert!(store.get(&cn_status).await.unwrap().is_none());
    let mut config = cnci_config(&conc_host, &conc_uuid.to_string(), "t1", &run_dir);
    config.compute_nets = vec!["10.254.0.0/16".parse().unwrap()];
    let conc = tenet_cnci::Concentrator::init(config, Some(store.clone()))
        .await
        .unwrap();
    conc.rebuild().await.unwrap();
    conc.reset().await.unwrap();
    cn_on(&cn_host, "cn-x", BackendChoice::Userspace)
        .await
        .reset()
        .await
        .unwrap();
    sched.shutdown().await;
}

/// The arguments of a concentrator agent for tenant t1 in `host`.
fn cnci_args(pki: &Pki, scheduler: &str, uuid: &Uuid, host: &Host, run_dir: &Path) -> Vec<String> {
    let (cert, ca) = pki.files(Role::CNCIAGENT, "cnci");
    strings(&[
        "--server",
        scheduler,
        "--cert",
        cert.to_str().unwrap(),
        "--ca",
        ca.to_str().unwrap(),
        "--uuid",
        &uuid.to_string(),
        "--tenant",
        "t1",
        "--netns",
        host.path().to_str().unwrap(),
        "--compute-net",
        "10.254.0.0/16",
        "--run-dir",
        run_dir.to_str().unwrap(),
    ])
}

/// The arguments of a compute node agent named `name` in `host`.
fn cn_args(pki: &Pki, scheduler: &str, uuid: &Uuid, name: &str, host: &Host) -> Vec<String> {
    let (cert, ca) = pki.files(Role::AGENT, "cn");
    strings(&[
        "--server",
        scheduler,
        "--cert",
        cert.to_str().unwrap(),
        "--ca",
        ca.to_str().unwrap(),
        "--uuid",
        &uuid.to_string(),
        "--host",
        name,
        "--netns",
        host.path().to_str().unwrap(),
        "--compute-net",
        "10.254.0.0/16",
        "--status-ttl",
        "3",
    ])
}

/// A 3-member etcd cluster loses its quorum (two members killed) while a workload runs:
/// both agents keep running and keep the dataplane as it was — the workload still reaches
/// its gateway over the tunnel and renews its lease from the concentrator's dnsmasq — and
/// once the members are back the agents catch up: a new START gets its address, tunnel and
/// lease. The agents use the default tunnel backend (eBPF on this kernel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_keep_the_dataplane_while_the_etcd_cluster_has_no_quorum() {
    use ssntp::payload::{Start, StartCommand, VnicNetworking};
    let mut cluster = tenet::testbed::EtcdCluster::start(3).await.unwrap();
    let endpoints = cluster.endpoints().join(",");
    let store: Arc<dyn Datastore> = Arc::new(cluster.store().await.unwrap());
    let pki = Pki::new();
    let sched = scheduler(&pki).await;
    let addr = sched.local_addr().to_string();
    let fabric = Fabric::new().await.unwrap();
    let cn_host = fabric.add_host("cn").await.unwrap();
    let conc_host = fabric.add_host("conc").await.unwrap();
    let _inet = internet(&conc_host);
    let run = tempfile::tempdir().unwrap();
    let (conc_uuid, cn_uuid) = (Uuid::new_v4(), Uuid::new_v4());
    let mut controller = Peer::start(&pki, Role::CONTROLLER, sched.local_addr()).await;

    let mut conc_agent = Agent::spawn(
        &cnci_args(
            &pki,
            &addr,
            &conc_uuid,
            &conc_host,
            &run.path().join("cnci"),
        ),
        &endpoints,
        &run.path().join("cnci.log"),
    );
    controller
        .expect(Operation::Event(Event::ConcentratorInstanceAdded))
        .await;
    let mut cn_agent = Agent::spawn_program(
        &workspace_binary("tenet-cn"),
        &cn_args(&pki, &addr, &cn_uuid, "cn-1", &cn_host),
        &endpoints,
        &run.path().join("cn.log"),
    );
    controller
        .expect(Operation::Event(Event::NodeConnected))
        .await;

    let start = |instance: &str, mac: &str, netns: &tenet::testbed::Netns| {
        Start::from(StartCommand {
            instance_uuid: instance.into(),
            tenant_uuid: "t1".into(),
            vm_type: "docker".into(),
            networking: VnicNetworking {
                vnic_mac: mac.into(),
                vnic_uuid: format!("vnic-{instance}"),
                concentrator_uuid: conc_uuid.to_string(),
                concentrator_ip: conc_host.ip().to_string(),
                subnet: "172.16.0.0/24".into(),
                netns: netns.path().to_string_lossy().into_owned(),
                ..Default::default()
            },
            ..Default::default()
        })
        .to_yaml()
    };
    let endpoint_of = |instance: &str| {
        tenet::calico::CalicoKey::WorkloadEndpoint(tenet::calico::WorkloadEndpointId {
            host: "cn-1".into(),
            orchestrator: "ciao".into(),
            workload: instance.into(),
            endpoint: format!("vnic-{instance}"),
        })
        .path()
    };
    let gateway: Ipv4Addr = "172.16.0.1".parse().unwrap();
    let wl1 = tenet::testbed::Netns::create("wl").unwrap();
    controller
        .client
        .send_command(Command::Start, start("i-1", "02:00:00:00:01:02", &wl1))
        .await
        .unwrap();
    wait_until("the first endpoint", || async {
        store.get(&endpoint_of("i-1")).await.unwrap().is_some()
    })
    .await;
    wait_until("the first workload reaches its gateway", || async {
        ping(&wl1, gateway)
    })
    .await;
    let dhcp = DhcpClient::new();
    let first = dhcp.lease(&wl1, 10).expect("a DHCP lease").ip;

    // Two of three members down: no quorum, every etcd call fails.
    let leader = cluster.leader().unwrap_or(0);
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    cluster.kill(leader);
    cluster.kill(others[0]);
    // Long enough for the agents to notice (status keys on 3 s leases, their watches): the
    // dataplane stays, checked over and over, and neither agent exits.
    let outage = std::time::Instant::now();
    while outage.elapsed() < Duration::from_secs(8) {
        assert!(
            ping(&wl1, gateway),
            "the tunnel carries traffic during the outage"
        );
        for (name, agent) in [("tenet-cnci", &mut conc_agent), ("tenet-cn", &mut cn_agent)] {
            let exited = agent.child.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none(),
                "{name} exited during the outage: {exited:?}\n{}",
                agent.log()
            );
        }
    }
    assert_eq!(
        dhcp.lease(&wl1, 10).map(|l| l.ip),
        Some(first),
        "dnsmasq renews the lease without etcd"
    );

    // Quorum back: the agents catch up, and a new START is served in full.
    cluster.restart(leader).unwrap();
    cluster.restart(others[0]).unwrap();
    cluster.wait_quorum().await.unwrap();
    let wl2 = tenet::testbed::Netns::create("wl").unwrap();
    controller
        .client
        .send_command(Command::Start, start("i-2", "02:00:00:00:01:03", &wl2))
        .await
        .unwrap();
    wait_until("the second endpoint", || async {
        store
            .get(&endpoint_of("i-2"))
            .await
            .is_ok_and(|e| e.is_some())
    })
    .await;
    wait_until("the second workload reaches its gateway", || async {
        ping(&wl2, gateway)
    })
    .await;
    let second = dhcp.lease(&wl2, 10).expect("a lease after the outage").ip;
    assert_ne!(second, first);
    assert!(ping(&wl1, gateway), "the first workload all along");

    assert!(cn_agent.stop().success(), "{}", cn_agent.log());
    assert!(conc_agent.stop().success(), "{}", conc_agent.log());
}
