//! Frame order. TenantAdded and TenantRemoved of one subnet are applied in the order
//! received, by a task per subnet, while those of different subnets run side by side (a new
//! subnet's dnsmasq does not hold up the next subnet). Any other frame (public IPs, the
//! mesh) waits until everything received before it is done, runs alone, and only then is
//! the next frame read. ciao handled each frame on a goroutine of its own and could apply a
//! TenantRemoved before the TenantAdded it followed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ipnetwork::Ipv4Network;
use ssntp::{Client, Event, Frame, Operation};
use tenet::store::LeasedKey;
use tokio::sync::{OwnedRwLockReadGuard, RwLock, mpsc};
use tracing::Instrument;

use super::Agent;
use crate::RemoteSubnet;

/// A subnet change waiting for its turn.
pub(super) struct SubnetChange {
    pub remote: RemoteSubnet,
    pub added: bool,
    /// Held until applied: a frame that must run alone waits for it.
    _received: OwnedRwLockReadGuard<()>,
}

#[derive(Default)]
pub(super) struct Dispatch {
    /// Read: a subnet change received and not yet applied; write: a frame that runs alone.
    pub gate: Arc<RwLock<()>>,
    queues: Arc<Mutex<HashMap<Ipv4Network, mpsc::UnboundedSender<SubnetChange>>>>,
}

impl Dispatch {
    pub async fn frame(
        &self,
        agent: &Arc<Agent>,
        client: &Client,
        status: &Arc<LeasedKey>,
        frame: Frame,
    ) {
        agent.count(&frame);
        let added = match frame.operation() {
            Some(Operation::Event(Event::TenantAdded)) => true,
            Some(Operation::Event(Event::TenantRemoved)) => false,
            _ => {
                let _alone = self.gate.write().await;
                agent.handle(client, &frame).await;
                status.set(agent.status().await);
                return;
            }
        };
        // A payload that does not parse is dropped (and logged) here.
        let Some(remote) = agent.subnet_change(added, &frame) else {
            return;
        };
        // Taken in the order frames arrive; never waits, since a frame that runs alone is
        // done before the next one is read.
        let received = self.gate.clone().read_owned().await;
        let change = SubnetChange {
            remote,
            added,
            _received: received,
        };
        self.enqueue(agent, status, change);
    }

    /// Hands the change to its subnet's task, starting one when the subnet has none.
    fn enqueue(&self, agent: &Arc<Agent>, status: &Arc<LeasedKey>, change: SubnetChange) {
        let subnet = change.remote.subnet;
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let change = match queues.get(&subnet) {
            Some(queue) => match queue.send(change) {
                Ok(()) => return,
                Err(mpsc::error::SendError(change)) => change,
            },
            None => change,
        };
        let (queue, changes) = mpsc::unbounded_channel();
        queue.send(change).expect("the receiver is here");
        queues.insert(subnet, queue);
        let worker = apply_in_order(
            subnet,
            changes,
            self.queues.clone(),
            agent.clone(),
            status.clone(),
        );
        tokio::spawn(worker.in_current_span());
    }
}

/// One subnet's task: applies its changes one after another; ends when none is left (the
/// check and the removal of its queue happen under the lock `enqueue` sends under).
async fn apply_in_order(
    subnet: Ipv4Network,
    mut changes: mpsc::UnboundedReceiver<SubnetChange>,
    queues: Arc<Mutex<HashMap<Ipv4Network, mpsc::UnboundedSender<SubnetChange>>>>,
    agent: Arc<Agent>,
    status: Arc<LeasedKey>,
) {
    loop {
        let change = {
            let mut queues = queues.lock().unwrap_or_else(|p| p.into_inner());
            match changes.try_recv() {
                Ok(change) => change,
                Err(_) => {
                    queues.remove(&subnet);
                    return;
                }
            }
        };
        agent.apply(&change.remote, change.added).await;
        status.set(agent.status().await);
        drop(change);
    }
}
