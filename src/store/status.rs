//! A key kept alive on a lease: an agent's status (`keyspace::node`). The key is written on a
//! fresh lease, the lease is refreshed at a third of its time to live, the value is
//! rewritten when the agent reports a change, and when etcd was unreachable long enough for
//! the lease to expire, a new lease and the key are put back. Stopping revokes the lease, so
//! the key goes at once; a crash lets it expire. Changes are written at most every
//! [`MIN_REWRITE_GAP`], the latest one each time.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{Datastore, LeaseId, StoreResult};

/// The least time between two rewrites of the value. A burst of changes (a START per
/// millisecond, each adding a subnet to the node's list) would otherwise rewrite a growing
/// value once per change: 200 new subnets cost etcd 200 writes of up to 200 subnets each.
pub const MIN_REWRITE_GAP: Duration = Duration::from_millis(250);

/// A key held on a lease by a background task.
pub struct LeasedKey {
    value: watch::Sender<Vec<u8>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl LeasedKey {
    /// Writes `key` = `value` on a lease of `ttl` and keeps it alive. Fails if the first
    /// write does.
    pub async fn start(
        store: Arc<dyn Datastore>,
        key: String,
        value: Vec<u8>,
        ttl: Duration,
    ) -> StoreResult<LeasedKey> {
        let lease = put_on_new_lease(&*store, &key, &value, ttl).await?;
        let (value_tx, value_rx) = watch::channel(value);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(keep(store, key, ttl, Some(lease), value_rx, stop_rx));
        Ok(LeasedKey {
            value: value_tx,
            stop,
            task,
        })
    }

    /// Rewrites the value (if it changed).
    pub fn set(&self, value: Vec<u8>) {
        self.value.send_if_modified(|v| {
            let changed = *v != value;
            *v = value;
            changed
        });
    }

    /// Revokes the lease: the key goes now.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn put_on_new_lease(
    store: &dyn Datastore,
    key: &str,
    value: &[u8],
    ttl: Duration,
) -> StoreResult<LeaseId> {
    let lease = store.grant_lease(ttl).await?;
    store.put_with_lease(key, value, lease).await?;
    Ok(lease)
}

async fn keep(
    store: Arc<dyn Datastore>,
    key: String,
    ttl: Duration,
    mut lease: Option<LeaseId>,
    mut value: watch::Receiver<Vec<u8>>,
    mut stop: watch::Receiver<bool>,
) {
    let period = (ttl / 3).max(Duration::from_millis(200));
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    let mut next_write = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            changed = value.changed() => {
                if changed.is_err() {
                    break;
                }
                // Changes meanwhile are taken together: the value after the gap is written.
                tokio::select! {
                    _ = tokio::time::sleep_until(next_write) => {}
                    _ = stop.changed() => break,
                }
                next_write = tokio::time::Instant::now() + MIN_REWRITE_GAP;
                let v = value.borrow_and_update().clone();
                match lease {
                    Some(l) => {
                        if let Err(e) = store.put_with_lease(&key, &v, l).await {
                            warn!(%key, error = %e, "could not update the status key");
                            lease = None;
                        }
                    }
                    None => lease = renew(&*store, &key, &v, ttl).await,
                }
            }
            _ = tick.tick() => {
                let alive = match lease {
                    Some(l) => store.keep_alive(l).await.map(|left| !left.is_zero()).unwrap_or_else(|e| {
                        debug!(%key, error = %e, "keeping the status lease alive");
                        false
                    }),
                    None => false,
                };
                if !alive {
                    let v = value.borrow().clone();
                    lease = renew(&*store, &key, &v, ttl).await;
                }
            }
        }
    }
    if let Some(l) = lease
        && let Err(e) = store.revoke_lease(l).await
    {
        warn!(%key, error = %e, "could not revoke the status lease; the key expires with it");
    }
}

async fn renew(store: &dyn Datastore, key: &str, value: &[u8], ttl: Duration) -> Option<LeaseId> {
    match put_on_new_lease(store, key, value, ttl).await {
        Ok(l) => {
            info!(%key, "status key written on a new lease");
            Some(l)
        }
        Err(e) => {
            debug!(%key, error = %e, "status key not written yet");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn the_key_follows_the_value_and_goes_on_stop() {
        let store: Arc<dyn Datastore> = Arc::new(MemoryStore::new());
        let held = LeasedKey::start(
            store.clone(),
            "/k".into(),
            b"one".to_vec(),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(store.get("/k").await.unwrap().unwrap().value, b"one");
        let mut watch = store.watch("/k", 0).await.unwrap();
        held.set(b"two".to_vec());
        watch.next().await.unwrap().unwrap();
        assert_eq!(store.get("/k").await.unwrap().unwrap().value, b"two");
        held.stop().await;
        assert!(store.get("/k").await.unwrap().is_none());
    }

    /// 100 changes a millisecond apart are a handful of writes, the last value among them.
    #[tokio::test]
    async fn a_burst_of_changes_is_a_few_writes_ending_with_the_last() {
        let store: Arc<dyn Datastore> = Arc::new(MemoryStore::new());
        let held = LeasedKey::start(
            store.clone(),
            "/k".into(),
            b"0".to_vec(),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        let mut watch = store.watch("/k", 0).await.unwrap();
        let began = std::time::Instant::now();
        for i in 1..=100 {
            held.set(i.to_string().into_bytes());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // A loaded machine stretches the sleeps: one write per gap the burst lasted, and the
        // last one after it.
        let most = (began.elapsed().as_millis() / MIN_REWRITE_GAP.as_millis()) as usize + 2;
        tokio::time::sleep(MIN_REWRITE_GAP * 2).await;
        assert_eq!(store.get("/k").await.unwrap().unwrap().value, b"100");
        let mut writes = 0;
        while let Some(Some(event)) = futures::FutureExt::now_or_never(watch.next()) {
            event.unwrap();
            writes += 1;
        }
        assert!(
            (1..=most.min(10)).contains(&writes),
            "{writes} writes for 100 changes in {:?}",
            began.elapsed()
        );
        held.stop().await;
    }
}
