//! ciao's scheduler as far as networking needs it: the forwarding rules and the node
//! connect/disconnect notifications, on top of the generic server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::frame::Frame;
use crate::payload::{
    AssignPublicIp, CnciRefresh, Delete, MAX_PAYLOAD, NodeConnected, NodeDisconnected, NodeEvent,
    NodeType, Payload, ReleasePublicIp, Start, TenantAdded, TenantRemoved,
};
use crate::route::{self, Scan};
use crate::server::{Peer, Route, Rules, ServerHandle, ServerHandler};
use crate::types::{Command, ErrorCode, Event, Operation, Role};

/// What goes to every controller unchanged.
const TO_CONTROLLERS: &[Operation] = &[
    Operation::Command(Command::Stats),
    Operation::Event(Event::TraceReport),
    Operation::Event(Event::InstanceDeleted),
    Operation::Event(Event::InstanceStopped),
    Operation::Event(Event::ConcentratorInstanceAdded),
    Operation::Event(Event::PublicIpAssigned),
    Operation::Event(Event::PublicIpUnassigned),
    Operation::Error(ErrorCode::StartFailure),
    Operation::Error(ErrorCode::DeleteFailure),
    Operation::Error(ErrorCode::AttachVolumeFailure),
    Operation::Error(ErrorCode::AssignPublicIpFailure),
    Operation::Error(ErrorCode::UnassignPublicIpFailure),
];

/// Forwards to the UUID in `top.field` of the payload. The field is read by a scanner when
/// the payload has ciao's plain shape (most of the scheduler's CPU went to parsing whole
/// documents for it); otherwise the payload is parsed as `P`. A payload that does not parse,
/// or names no valid UUID, is logged and dropped. The other fields are the receiver's to
/// check (ciao's scheduler reads them no more than this).
fn route_by<P: Payload>(frame: &Frame, top: &str, field: &str, pick: impl Fn(&P) -> &str) -> Route {
    if frame.payload.len() <= MAX_PAYLOAD
        && let Scan::Found(target) = route::scan(&frame.payload, top, field)
    {
        return forward_to(frame, target, P::WHAT);
    }
    let parsed = match P::from_yaml(&frame.payload) {
        Ok(p) => p,
        Err(e) => {
            warn!(origin = %frame.origin_uuid(), error = %e, "payload does not parse; frame dropped");
            return Route::Discard;
        }
    };
    forward_to(frame, pick(&parsed), P::WHAT)
}

fn forward_to(frame: &Frame, target: &str, what: &str) -> Route {
    match Uuid::parse_str(target) {
        Ok(uuid) => Route::Forward(vec![uuid]),
        Err(_) => {
            warn!(origin = %frame.origin_uuid(), target, what, "no valid destination UUID; frame dropped");
            Route::Discard
        }
    }
}

/// ciao's scheduler: its forwarding rules and what they need to remember — the controllers
/// in the order they connected. The first is the master: controller commands are forwarded
/// from it alone, and when it leaves the next one takes over (ciao's behaviour; commands
/// from the others are dropped with a log line).
#[derive(Default)]
pub struct Scheduler {
    controllers: Mutex<Vec<Uuid>>,
}

impl Scheduler {
    pub fn new() -> Arc<Self> {
        Arc::new(Scheduler::default())
    }

    /// The master controller, if one is connected.
    pub fn master(&self) -> Option<Uuid> {
        self.controllers().first().copied()
    }

    fn controllers(&self) -> std::sync::MutexGuard<'_, Vec<Uuid>> {
        self.controllers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commands a concentrator or compute node acts on are taken from the master controller
    /// only.
    fn obey_master(&self, peer: &Peer, route: impl FnOnce() -> Route) -> Route {
        if !peer.role.contains(Role::CONTROLLER) {
            warn!(sender = %peer.uuid, role = %peer.role, "controller command from a non-controller; dropped");
            return Route::Discard;
        }
        match self.master() {
            Some(m) if m == peer.uuid => route(),
            master => {
                warn!(sender = %peer.uuid, master = ?master, "command from a controller that is not the master; dropped");
                Route::Discard
            }
        }
    }

    /// The scheduler's forwarding rules.
    pub fn rules(self: &Arc<Self>) -> Rules {
        let mut rules = Rules::new();
        for &op in TO_CONTROLLERS {
            rules.to_role(op, Role::CONTROLLER);
        }
        rules
            .callback(Operation::Event(Event::TenantAdded), |_, _, f| {
                route_by::<TenantAdded>(f, "tenant_added", "concentrator_uuid", |p| {
                    &p.tenant_added.concentrator_uuid
                })
            })
            .callback(Operation::Event(Event::TenantRemoved), |_, _, f| {
                route_by::<TenantRemoved>(f, "tenant_removed", "concentrator_uuid", |p| {
                    &p.tenant_removed.concentrator_uuid
                })
            });
        let me = self.clone();
        rules.callback(
            Operation::Command(Command::AssignPublicIp),
            move |_, peer, f| {
                me.obey_master(peer, || {
                    route_by::<AssignPublicIp>(f, "assign_public_ip", "concentrator_uuid", |p| {
                        &p.assign_public_ip.concentrator_uuid
                    })
                })
            },
        );
        let me = self.clone();
        rules.callback(
            Operation::Command(Command::ReleasePublicIp),
            move |_, peer, f| {
                me.obey_master(peer, || {
                    route_by::<ReleasePublicIp>(f, "release_public_ip", "concentrator_uuid", |p| {
                        &p.release_public_ip.concentrator_uuid
                    })
                })
            },
        );
        let me = self.clone();
        rules.callback(
            Operation::Command(Command::RefreshCnci),
            move |_, peer, f| {
                me.obey_master(peer, || {
                    route_by::<CnciRefresh>(f, "cnci_refresh", "cnci_uuid", |p| {
                        &p.cnci_refresh.cnci_uuid
                    })
                })
            },
        );
        let me = self.clone();
        rules.callback(Operation::Command(Command::Delete), move |_, peer, f| {
            me.obey_master(peer, || {
                route_by::<Delete>(f, "delete", "workload_agent_uuid", |p| {
                    &p.delete.workload_agent_uuid
                })
            })
        });
        let next = Arc::new(AtomicUsize::new(0));
        let me = self.clone();
        rules.callback(
            Operation::Command(Command::Start),
            move |server, peer, f| me.obey_master(peer, || place_start(server, f, &next)),
        );
        rules
    }
}

/// START goes to a network node when the workload asks for one, else to a compute node,
/// round robin; with none connected the controller gets StartFailure.
fn place_start(server: &ServerHandle, frame: &Frame, next: &AtomicUsize) -> Route {
    let start = match Start::from_yaml(&frame.payload) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "START payload does not parse; answering StartFailure");
            return Route::Reply(ErrorCode::StartFailure, frame.payload.clone());
        }
    };
    let role = if start.start.requirements.network_node {
        Role::NETAGENT
    } else {
        Role::AGENT
    };
    let mut nodes = server.sessions_with(role);
    if nodes.is_empty() {
        warn!(instance = %start.start.instance_uuid, %role, "no node to start the instance on");
        return Route::Reply(ErrorCode::StartFailure, frame.payload.clone());
    }
    nodes.sort();
    let pick = nodes[next.fetch_add(1, Ordering::Relaxed) % nodes.len()];
    debug!(instance = %start.start.instance_uuid, node = %pick, "START placed");
    Route::Forward(vec![pick])
}

/// A node's NodeConnected/NodeDisconnected events: one per node role it holds (a node with
/// both AGENT and NETAGENT is a compute node and a network node, as in ciao). CNCI agents
/// and controllers are not nodes.
fn node_events(peer: &Peer) -> Vec<NodeEvent> {
    [
        (Role::AGENT, NodeType::ComputeNode),
        (Role::NETAGENT, NodeType::NetworkNode),
    ]
    .into_iter()
    .filter(|(role, _)| peer.role.contains(*role))
    .map(|(_, node_type)| NodeEvent {
        node_uuid: peer.uuid.to_string(),
        node_type,
    })
    .collect()
}

#[async_trait::async_trait]
impl ServerHandler for Scheduler {
    async fn connected(&self, server: &ServerHandle, peer: &Peer) {
        if peer.role.contains(Role::CONTROLLER) {
            let master = {
                let mut c = self.controllers();
                c.retain(|u| *u != peer.uuid);
                c.push(peer.uuid);
                c[0]
            };
            info!(controller = %peer.uuid, %master, "controller connected");
            // A controller that comes after the nodes hears of each of them (ciao:
            // sendDirectedNodeConnectionEvents).
            let op = Operation::Event(Event::NodeConnected);
            for node in server.sessions() {
                for ev in node_events(&node) {
                    let frame = Frame::new(op, server.uuid(), NodeConnected::from(ev).to_yaml());
                    server.send_to(&peer.uuid, Arc::new(frame)).await;
                }
            }
        }
        for ev in node_events(peer) {
            let payload = NodeConnected::from(ev).to_yaml();
            let op = Operation::Event(Event::NodeConnected);
            server.send_to_role(Role::CONTROLLER, op, payload).await;
        }
    }

    async fn disconnected(&self, server: &ServerHandle, peer: &Peer) {
        // A session replaced by a reconnect of the same UUID is still a controller.
        if peer.role.contains(Role::CONTROLLER) && server.session(&peer.uuid).is_none() {
            let mut c = self.controllers();
            c.retain(|u| *u != peer.uuid);
            info!(controller = %peer.uuid, master = ?c.first(), "controller left");
        }
        for ev in node_events(peer) {
            let payload = NodeDisconnected::from(ev).to_yaml();
            let op = Operation::Event(Event::NodeDisconnected);
            server.send_to_role(Role::CONTROLLER, op, payload).await;
        }
    }
}
