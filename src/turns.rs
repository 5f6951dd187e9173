//! Turns per key: async work on one key (a subnet, an instance) runs one at a time, in the
//! order it asked, while work on different keys runs side by side. The concentrator's
//! attaches and detaches take turns per subnet; the compute node's STARTs per instance.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// The turn-takers per key; an entry lives while someone holds or waits for its turn.
pub struct Turns<K> {
    locks: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K> Default for Turns<K> {
    fn default() -> Self {
        Turns {
            locks: Mutex::new(HashMap::new()),
        }
    }
}

/// Held while it is this caller's turn for `key`.
pub struct Turn<'a, K: Eq + Hash> {
    turns: &'a Turns<K>,
    key: Option<K>,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Eq + Hash + Clone> Turns<K> {
    /// Waits for `key`'s turn (tokio's mutex is fair: first come, first served).
    pub async fn take(&self, key: &K) -> Turn<'_, K> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let guard = lock.clone().lock_owned().await;
        Turn {
            turns: self,
            key: Some(key.clone()),
            lock,
            guard: Some(guard),
        }
    }
}

impl<K: Eq + Hash> Drop for Turn<'_, K> {
    fn drop(&mut self) {
        self.guard.take();
        let mut locks = self.turns.locks.lock().unwrap_or_else(|p| p.into_inner());
        // The map's reference and ours: nobody else holds or waits for this key.
        if Arc::strong_count(&self.lock) == 2
            && let Some(key) = self.key.take()
        {
            locks.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_key_takes_turns_and_other_keys_do_not_wait() {
        let turns = Arc::new(Turns::<u32>::default());
        let first = turns.take(&1).await;
        // Another key's turn comes at once.
        let other = tokio::time::timeout(Duration::from_secs(1), turns.take(&2)).await;
        assert!(other.is_ok(), "key 2 waited for key 1");
        drop(other);
        // The same key waits until the first turn ends.
        let t = turns.clone();
        let mut second = tokio::spawn(async move {
            let _turn = t.take(&1).await;
        });
        let waited = tokio::time::timeout(Duration::from_millis(100), &mut second).await;
        assert!(waited.is_err(), "key 1 was taken twice at once");
        drop(first);
        second.await.unwrap();
        assert!(
            turns.locks.lock().unwrap().is_empty(),
            "entries go with the last turn"
        );
    }
}
