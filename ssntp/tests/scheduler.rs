//! The scheduler's forwarding rules between real TLS clients on loopback.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use ssntp::payload::{
    AssignPublicIp, ConcentratorInstance, ConcentratorInstanceAdded, NodeConnected,
    NodeDisconnected, NodeType, Payload, PublicIpCommand, TenantAdded, TenantRemoved, TenantSubnet,
};
use ssntp::{ClientEvent, Command, Event, Frame, Operation, Role};

const QUIET: Duration = Duration::from_millis(300);

fn tenant(concentrator: &str, key: u32) -> TenantSubnet {
    TenantSubnet {
        agent_uuid: "2400bce6-ccc8-4a45-b2aa-b5cc3790077b".into(),
        agent_ip: "10.3.66.71".into(),
        tenant_uuid: "67d86208-000-4465-9018-fe14087d415f".into(),
        tenant_subnet: "172.16.0.0/24".into(),
        concentrator_uuid: concentrator.into(),
        concentrator_ip: "192.168.0.110".into(),
        subnet_key: key.into(),
    }
}

#[tokio::test]
async fn tenant_added_reaches_the_right_cnci_among_three() {
    let pki = Pki::new();
    let server = start_scheduler(&pki, loopback()).await;
    let addr = server.local_addr();
    let mut cncis = Vec::new();
    for _ in 0..3 {
        cncis.push(
            TestClient::start(client_config(&pki, Role::CNCIAGENT, addr))
                .await
                .0,
        );
    }
    let (agent, _) = TestClient::start(client_config(&pki, Role::AGENT, addr)).await;

    let target = cncis[1].client.uuid().to_string();
    let added = TenantAdded::from(tenant(&target, 4268));
    agent
        .client
        .send_event(Event::TenantAdded, added.to_yaml())
        .await
        .unwrap();
    let removed = TenantRemoved::from(tenant(&target, 4268));
    agent
        .client
        .send_event(Event::TenantRemoved, removed.to_yaml())
        .await
        .unwrap();

    let f = cncis[1].frame().await;
    assert_eq!(f.operation(), Some(Operation::Event(Event::TenantAdded)));
    assert_eq!(f.origin_uuid(), agent.client.uuid(), "Origin is preserved");
    assert_eq!(TenantAdded::from_yaml(&f.payload).unwrap(), added);
    let f = cncis[1].frame().await;
    assert_eq!(f.operation(), Some(Operation::Event(Event::TenantRemoved)));
    assert_eq!(TenantRemoved::from_yaml(&f.payload).unwrap(), removed);
    for i in [0, 2] {
        assert!(
            cncis[i].maybe_frame(QUIET).await.is_none(),
            "CNCI {i} got a frame"
        );
    }
    assert_eq!(server.handle().stats().forwarded.load(Ordering::Relaxed), 2);
    server.shutdown().await;
}

#[tokio::test]
async fn ten_thousand_frames_arrive_in_order() {
    let pki = Pki::new();
    let server = start_scheduler(&pki, loopback()).await;
    let addr = server.local_addr();
    let (mut cnci, _) = TestClient::start(client_config(&pki, Role::CNCIAGENT, addr)).await;
    let (agent, _) = TestClient::start(client_config(&pki, Role::AGENT, addr)).await;
    let target = cnci.client.uuid().to_string();
    const N: u32 = 10_000;
    // Alternate Added/Removed as a churning subnet does: order is what makes them correct.
    let sender = tokio::spawn({
        let client = agent.client.clone();
        async move {
            for i in 0..N {
                let (ev, payload) = if i % 2 == 0 {
                    (
                        Event::TenantAdded,
                        TenantAdded::from(tenant(&target, i)).to_yaml(),
                    )
                } else {
                    (
                        Event::TenantRemoved,
                        TenantRemoved::from(tenant(&target, i)).to_yaml(),
                    )
                };
                client.send_event(ev, payload).await.unwrap();
            }
        }
    });
    for i in 0..N {
        let f = cnci.frame().await;
        let key = if i % 2 == 0 {
            assert_eq!(
                f.operation(),
                Some(Operation::Event(Event::TenantAdded)),
                "frame {i}"
            );
            TenantAdded::from_yaml(&f.payload)
                .unwrap()
                .tenant_added
                .subnet_key
        } else {
            assert_eq!(
                f.operation(),
                Some(Operation::Event(Event::TenantRemoved)),
                "frame {i}"
            );
            TenantRemoved::from_yaml(&f.payload)
                .unwrap()
                .tenant_removed
                .subnet_key
        };
        assert_eq!(key, i64::from(i), "frame {i} out of order");
    }
    sender.await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn clients_reconnect_after_the_scheduler_restarts() {
    let pki = Pki::new();
    let server = start_scheduler(&pki, loopback()).await;
    let addr = server.local_addr();
    let (mut cnci, first) = TestClient::start(client_config(&pki, Role::CNCIAGENT, addr)).await;
    let (mut agent, _) = TestClient::start(client_config(&pki, Role::AGENT, addr)).await;
    server.shutdown().await;

    for c in [&mut cnci, &mut agent] {
        match c.event().await {
            ClientEvent::Disconnected { .. } => {}
            other => panic!("expected Disconnected, got {other:?}"),
        }
        assert!(!c.client.is_connected());
    }
    // While the scheduler is down, sending fails clearly instead of queueing forever.
    let err = agent
        .client
        .send_event(Event::TenantAdded, vec![])
        .await
        .unwrap_err();
    assert!(matches!(err, ssntp::ClientError::NotConnected), "{err}");

    // A new scheduler process on the same address: a new UUID, the same clients.
    let server = start_scheduler(&pki, addr).await;
    let second = cnci.connected().await;
    agent.connected().await;
    assert_ne!(first.uuid, second.uuid);

    let target = cnci.client.uuid().to_string();
    let added = TenantAdded::from(tenant(&target, 7)).to_yaml();
    agent
        .client
        .send_event(Event::TenantAdded, added.clone())
        .await
        .unwrap();
    assert_eq!(cnci.frame().await.payload, added);
    server.shutdown().await;
}

#[tokio::test]
async fn controllers_hear_of_nodes_cncis_and_public_ips() {
    let pki = Pki::new();
    let server = start_scheduler(&pki, loopback()).await;
    let addr = server.local_addr();
    let (mut controller, _) = TestClient::start(client_config(&pki, Role::CONTROLLER, addr)).await;
    let (mut cnci, _) = TestClient::start(client_config(&pki, Role::CNCIAGENT, addr)).await;

    // A compute node and a network node come and go; the CNCI agent is not a node.
    let (agent, _) = TestClient::start(client_config(&pki, Role::AGENT, addr)).await;
    let f = controller.frame().await;
    assert_eq!(f.operation(), Some(Operation::Event(Event::NodeConnected)));
    let ev = NodeConnected::from_yaml(&f.payload).unwrap().node_connected;
    assert_eq!(ev.node_uuid, agent.client.uuid().to_string());
    assert_eq!(ev.node_type, NodeType::ComputeNode);
    let (netnode, _) = TestClient::start(client_config(&pki, Role::NETAGENT, addr)).await;
    let f = controller.frame().await;
    let ev = NodeConnected::from_yaml(&f.payload).unwrap().node_connected;
    assert_eq!(ev.node_type, NodeType::NetworkNode);
    assert_eq!(ev.node_uuid, netnode.client.uuid().to_string());
    agent.client.close().await;
    let f = controller.frame().await;
    assert_eq!(
        f.operation(),
        Some(Operation::Event(Event::NodeDisconnected))
    );
    let ev = NodeDisconnected::from_yaml(&f.payload)
        .unwrap()
        .node_disconnected;
    assert_eq!(ev.node_uuid, agent.client.uuid().to_string());

    // CNCI → controllers.
    let inst = ConcentratorInstanceAdded::from(ConcentratorInstance {
        instance_uuid: cnci.client.uuid().to_string(),
        tenant_uuid: "t1".into(),
        concentrator_ip: "192.168.0.110".into(),
        concentrator_mac: "02:00:ff:00:00:01".into(),
    });
    cnci.client
        .send_event(Event::ConcentratorInstanceAdded, inst.to_yaml())
        .await
        .unwrap();
    let f = controller.frame().await;
    assert_eq!(
        ConcentratorInstanceAdded::from_yaml(&f.payload).unwrap(),
        inst
    );
    assert_eq!(f.origin_uuid(), cnci.client.uuid());

    // Controller → CNCI, by concentrator_uuid; the same command from a non-controller is dropped.
    let assign = AssignPublicIp::from(PublicIpCommand {
        concentrator_uuid: cnci.client.uuid().to_string(),
        tenant_uuid: "t1".into(),
        instance_uuid: "i1".into(),
        public_ip: "10.1.2.3".into(),
        private_ip: "172.16.0.2".into(),
        vnic_mac: "02:00:e6:f5:00:02".into(),
    });
    netnode
        .client
        .send_command(Command::AssignPublicIp, assign.to_yaml())
        .await
        .unwrap();
    controller
        .client
        .send_command(Command::AssignPublicIp, assign.to_yaml())
        .await
        .unwrap();
    let f = cnci.frame().await;
    assert_eq!(
        f.origin_uuid(),
        controller.client.uuid(),
        "only the controller's command arrives"
    );
    assert_eq!(AssignPublicIp::from_yaml(&f.payload).unwrap(), assign);

    // The CNCI's answer and failures go back to controllers.
    cnci.client
        .send_error(
            ssntp::ErrorCode::AssignPublicIpFailure,
            b"reason: no_instance\n".to_vec(),
        )
        .await
        .unwrap();
    let f = controller.frame().await;
    assert_eq!(
        f.operation(),
        Some(Operation::Error(ssntp::ErrorCode::AssignPublicIpFailure))
    );
    assert!(cnci.maybe_frame(QUIET).await.is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn payloads_it_cannot_parse_are_dropped_and_the_scheduler_goes_on() {
    let pki = Pki::new();
    let server = start_scheduler(&pki, loopback()).await;
    let addr = server.local_addr();
    let (mut cnci, _) = TestClient::start(client_config(&pki, Role::CNCIAGENT, addr)).await;
    let (agent, _) = TestClient::start(client_config(&pki, Role::AGENT, addr)).await;
    let bad: [&[u8]; 5] = [
        b"tenant_added: [not, a, map]\n",
        b"\xff\xfe garbage",
        b"tenant_added:\n  concentrator_uuid: not-a-uuid\n",
        b"tenant_added:\n  subnet_key: -1\n",
        b"",
    ];
    for p in bad {
        agent
            .client
            .send_event(Event::TenantAdded, p.to_vec())
            .await
            .unwrap();
    }
    // An oversized payload too.
    let mut big = b"tenant_added:\n  agent_ip: \"".to_vec();
    big.resize(2 << 20, b'x');
    agent
        .client
        .send(Frame::new(
            Operation::Event(Event::TenantAdded),
            agent.client.uuid(),
            big,
        ))
        .await
        .unwrap();

    let good = TenantAdded::from(tenant(&cnci.client.uuid().to_string(), 1)).to_yaml();
    agent
        .client
        .send_event(Event::TenantAdded, good.clone())
        .await
        .unwrap();
    assert_eq!(
        cnci.frame().await.payload,
        good,
        "the first frame through is the good one"
    );
    assert_eq!(server.handle().stats().discarded.load(Ordering::Relaxed), 6);
    assert!(agent.client.is_connected());
    server.shutdown().await;
}

/// ciao's `subnet_key` is a Go int: the scheduler routes by `concentrator_uuid` alone and
/// forwards a negative or oversized key as ciao does (the concentrator refuses it), whether
/// the payload has ciao's plain shape (read by the scanner) or not (parsed in full).
#[tokio::test]
async fn any_go_int_subnet_key_is_forwarded_like_ciao() {
    let pki = Pki::new();
    let server = start_scheduler(&pki, loopback()).await;
    let addr = server.local_addr();
    let (mut cnci, _) = TestClient::start(client_config(&pki, Role::CNCIAGENT, addr)).await;
    let (agent, _) = TestClient::start(client_config(&pki, Role::AGENT, addr)).await;
    let target = cnci.client.uuid();
    let plain = format!(
        "tenant_added:\n  agent_uuid: a\n  concentrator_uuid: {target}\n  subnet_key: -5\n"
    );
    let flow =
        format!("tenant_added: {{concentrator_uuid: \"{target}\", subnet_key: 8589934592}}\n");
    for payload in [plain, flow] {
        agent
            .client
            .send_event(Event::TenantAdded, payload.clone().into_bytes())
            .await
            .unwrap();
        let f = cnci.frame().await;
        assert_eq!(f.payload, payload.as_bytes(), "forwarded unchanged");
        let key = TenantAdded::from_yaml(&f.payload)
            .unwrap()
            .tenant_added
            .subnet_key;
        assert!(key < 0 || key > i64::from(u32::MAX));
    }
    server.shutdown().await;
}

/// NodeConnected events a controller receives within `quiet` of silence: (uuid, type).
async fn node_events(c: &mut TestClient) -> Vec<(String, NodeType)> {
    let mut seen = Vec::new();
    while let Some(f) = c.maybe_frame(QUIET).await {
        if f.operation() == Some(Operation::Event(Event::NodeConnected)) {
            let ev = NodeConnected::from_yaml(&f.payload).unwrap().node_connected;
            seen.push((ev.node_uuid, ev.node_type));
        }
    }
    seen.sort_by_key(|(u, t)| (u.clone(), *t as u8));
    seen
}

/// ciao: a controller that connects after the nodes hears NodeConnected for each of them
/// (sendDirectedNodeConnectionEvents), and a node holding AGENT and NETAGENT is two nodes.
#[tokio::test]
async fn a_late_controller_hears_of_every_node_and_dual_role_nodes_count_twice() {
    let pki = Pki::new();
    let server = start_scheduler(&pki, loopback()).await;
    let addr = server.local_addr();
    let (compute, _) = TestClient::start(client_config(&pki, Role::AGENT, addr)).await;
    let (network, _) = TestClient::start(client_config(&pki, Role::NETAGENT, addr)).await;
    let (_cnci, _) = TestClient::start(client_config(&pki, Role::CNCIAGENT, addr)).await;
    let (mut controller, _) = TestClient::start(client_config(&pki, Role::CONTROLLER, addr)).await;
    let mut want = vec![
        (compute.client.uuid().to_string(), NodeType::ComputeNode),
        (network.client.uuid().to_string(), NodeType::NetworkNode),
    ];
    want.sort_by_key(|(u, t)| (u.clone(), *t as u8));
    assert_eq!(
        node_events(&mut controller).await,
        want,
        "no CNCI, one event per node"
    );

    let (dual, _) =
        TestClient::start(client_config(&pki, Role::AGENT | Role::NETAGENT, addr)).await;
    let dual_id = dual.client.uuid().to_string();
    assert_eq!(
        node_events(&mut controller).await,
        [
            (dual_id.clone(), NodeType::ComputeNode),
            (dual_id.clone(), NodeType::NetworkNode)
        ]
    );
    dual.client.close().await;
    let mut gone = Vec::new();
    while let Some(f) = controller.maybe_frame(QUIET).await {
        if f.operation() == Some(Operation::Event(Event::NodeDisconnected)) {
            gone.push(
                NodeDisconnected::from_yaml(&f.payload)
                    .unwrap()
                    .node_disconnected
                    .node_type,
            );
        }
    }
    gone.sort_by_key(|t| *t as u8);
    assert_eq!(gone, [NodeType::ComputeNode, NodeType::NetworkNode]);
    server.shutdown().await;
}

/// ciao: controller commands are forwarded from the master controller only — the first
/// connected; when it leaves, the next one.
#[tokio::test]
async fn only_the_master_controller_is_obeyed() {
    let pki = Pki::new();
    let server = start_scheduler(&pki, loopback()).await;
    let addr = server.local_addr();
    let (mut cnci, _) = TestClient::start(client_config(&pki, Role::CNCIAGENT, addr)).await;
    let (first, _) = TestClient::start(client_config(&pki, Role::CONTROLLER, addr)).await;
    let (second, _) = TestClient::start(client_config(&pki, Role::CONTROLLER, addr)).await;
    let target = cnci.client.uuid().to_string();
    let assign = |ip: &str| {
        AssignPublicIp::from(PublicIpCommand {
            concentrator_uuid: target.clone(),
            public_ip: ip.into(),
            ..Default::default()
        })
        .to_yaml()
    };
    second
        .client
        .send_command(Command::AssignPublicIp, assign("192.0.2.2"))
        .await
        .unwrap();
    first
        .client
        .send_command(Command::AssignPublicIp, assign("192.0.2.1"))
        .await
        .unwrap();
    let f = cnci.frame().await;
    assert_eq!(f.origin_uuid(), first.client.uuid(), "the master's command");
    assert!(
        cnci.maybe_frame(QUIET).await.is_none(),
        "the other controller's command is dropped"
    );
    first.client.close().await;
    // Once the master has gone, the next controller is obeyed.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        second
            .client
            .send_command(Command::AssignPublicIp, assign("192.0.2.3"))
            .await
            .unwrap();
        if let Some(f) = cnci.maybe_frame(QUIET).await {
            assert_eq!(f.origin_uuid(), second.client.uuid());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second controller never took over"
        );
    }
    server.shutdown().await;
}
