//! Following the tenant's workload endpoints in etcd into dnsmasq's hosts files: list, then
//! watch from the listing's revision; each batch of changes rewrites the hosts file of each
//! subnet it touches (atomically) and sends that dnsmasq SIGHUP. A compacted watch, or a lost
//! one, lists again.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::FutureExt;
use ipnetwork::Ipv4Network;
use tenet::calico::HOSTS;
use tenet::store::{Datastore, EventKind, StoreError, WatchEvent};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::concentrator::{Inner, SubnetState};
use crate::dnsmasq::render_hosts;
use crate::endpoints::affected;

const RETRY_MAX: Duration = Duration::from_secs(5);

/// The least time between two rewrites of the hosts files: a change right after one waits
/// for the rest of the gap, gathering what else comes. A change after a quiet spell is
/// written at once.
const REFRESH_GAP: Duration = Duration::from_millis(50);

pub(crate) async fn follow_endpoints(
    inner: Weak<Inner>,
    store: Arc<dyn Datastore>,
    mut stop: watch::Receiver<bool>,
) {
    let mut retry = Duration::from_millis(100);
    loop {
        let outcome = tokio::select! {
            o = follow_once(&inner, &*store) => o,
            _ = stop.changed() => return,
        };
        match outcome {
            Ok(()) => return, // the concentrator is gone
            Err(StoreError::Compacted { .. }) => {
                info!("endpoint watch compacted; listing again");
                retry = Duration::from_millis(100);
                continue;
            }
            Err(e) => {
                warn!(error = %e, retry_ms = retry.as_millis() as u64, "following workload endpoints")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = stop.changed() => return,
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// One list and the watch after it, until the watch fails (returned) or the concentrator is
/// dropped (`Ok`).
async fn follow_once(inner: &Weak<Inner>, store: &dyn Datastore) -> Result<(), StoreError> {
    let listing = store.list(HOSTS).await?;
    {
        let Some(inner) = inner.upgrade() else {
            return Ok(());
        };
        inner.endpoints().reset(
            listing
                .kvs
                .iter()
                .map(|kv| (kv.key.as_str(), kv.value.as_slice())),
        );
        debug!(
            endpoints = inner.endpoints().len(),
            revision = listing.revision,
            "endpoints listed"
        );
        // After a (re)list every subnet is refreshed: anything may have changed meanwhile.
        refresh(&inner, None).await;
        inner.synced.send_replace(listing.revision);
    }
    let mut watch = store.watch(HOSTS, listing.revision + 1).await?;
    // The first change after the listing is written at once.
    let mut next_refresh = Instant::now();
    loop {
        let Some(first) = watch.next().await else {
            return Err(watch_ended());
        };
        // Take whatever else is already there, so a burst costs one rewrite per subnet.
        let mut batch = vec![first?];
        while let Some(Some(more)) = watch.next().now_or_never() {
            batch.push(more?);
        }
        // Soon after a rewrite, gather until the gap has passed: a tenant starting instances
        // one after another reloads each subnet's dnsmasq once per gap, not once per VNIC.
        let mut ended = false;
        while !ended && Instant::now() < next_refresh {
            match tokio::time::timeout_at(next_refresh, watch.next()).await {
                Ok(Some(more)) => batch.push(more?),
                Ok(None) => ended = true,
                Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else {
            return Ok(());
        };
        let revision = batch.last().map_or(0, |e| e.revision);
        let changed = apply(&inner, &batch);
        if !changed.is_empty() {
            refresh(&inner, Some(&changed)).await;
            next_refresh = Instant::now() + REFRESH_GAP;
        }
        inner.synced.send_replace(revision);
        if ended {
            return Err(watch_ended());
        }
    }
}

fn watch_ended() -> StoreError {
    StoreError::Unavailable {
        key: HOSTS.into(),
        reason: "the endpoint watch ended".into(),
    }
}

fn apply(inner: &Inner, batch: &[WatchEvent]) -> Vec<Ipv4Addr> {
    let mut table = inner.endpoints();
    let mut changed = Vec::new();
    for e in batch {
        changed.extend(match e.kind {
            EventKind::Put => table.put(&e.key, &e.value),
            EventKind::Delete => table.delete(&e.key),
        });
    }
    changed
}

/// Rewrites the hosts files of the subnets holding `changed` (every subnet when `None`).
async fn refresh(inner: &Inner, changed: Option<&[Ipv4Addr]>) {
    let mut subnets = inner.subnets.lock().await;
    let targets: Vec<Ipv4Network> = match changed {
        Some(ips) => affected(subnets.keys(), ips),
        None => subnets.keys().copied().collect(),
    };
    for net in targets {
        refresh_subnet(inner, &mut subnets, &net);
    }
}

/// Rewrites one subnet's hosts file from the endpoint table (and reloads its dnsmasq) when
/// it differs; the caller holds the subnets lock.
pub(crate) fn refresh_subnet(
    inner: &Inner,
    subnets: &mut BTreeMap<Ipv4Network, SubnetState>,
    net: &Ipv4Network,
) {
    let Some(state) = subnets.get_mut(net) else {
        return;
    };
    let bindings = inner.endpoints().bindings_in(net);
    let hosts = render_hosts(&bindings, net, inner.config.dhcp.prebind_ciao_macs);
    match state.dhcp.update_hosts(hosts) {
        Ok(true) => info!(subnet = %net, hosts = bindings.len(), "DHCP hosts updated"),
        Ok(false) => {}
        Err(e) => warn!(subnet = %net, error = %e, "updating DHCP hosts"),
    }
}
