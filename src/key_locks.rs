//! One lock per key name, so work on one key in this process takes turns while work on
//! different keys runs side by side. Two users, each with its own set:
//!
//! - the service's changes to a key (`service::key_core`): correctness across instances comes
//!   from the registry's compare-and-set, not from here; the lock spares this process the work
//!   a certain conflict would waste (a token object made, then discarded);
//! - the registry's writes and re-reads of a key (`registry`): a re-read that began before this
//!   process's own change committed must not put the older rows over it.
//!
//! One lock for all keys would do both, but it made the scheduler rotate one key at a time
//! (about 20 a second here), and the change feed's re-reads wait behind every commit.
//!
//! Names hash onto a fixed set of locks, so memory does not grow with the number of keys; two
//! keys sharing a lock merely take turns. A caller holds one of these locks at a time, or takes
//! several at once with [`KeyLocks::lock_many`], which takes them in one global order, so they
//! cannot deadlock.

use std::hash::{Hash, Hasher};

use tokio::sync::{Mutex, MutexGuard};

/// Enough that keys changed at once rarely share a lock.
const STRIPES: usize = 256;

pub struct KeyLocks {
    stripes: Box<[Mutex<()>]>,
}

impl KeyLocks {
    pub fn new() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Wait for the turn of key `name`.
    pub async fn lock(&self, name: &str) -> MutexGuard<'_, ()> {
        self.stripes[stripe(name)].lock().await
    }

    /// Wait for the turn of every key in `names` (a batch), taking their locks in stripe order.
    pub async fn lock_many<'n>(
        &self,
        names: impl IntoIterator<Item = &'n str>,
    ) -> Vec<MutexGuard<'_, ()>> {
        let wanted: std::collections::BTreeSet<usize> = names.into_iter().map(stripe).collect();
        let mut held = Vec::with_capacity(wanted.len());
        for i in wanted {
            held.push(self.stripes[i].lock().await);
        }
        held
    }
}

impl Default for KeyLocks {
    fn default() -> Self {
        Self::new()
    }
}

fn stripe(name: &str) -> usize {
    // SipHash with fixed keys: the same stripe for a name in every call of this process.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    (h.finish() % STRIPES as u64) as usize
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_key_takes_turns_and_other_keys_do_not_wait() {
        let locks = KeyLocks::new();
        let held = locks.lock("stores/1/mac").await;
        let same = tokio::time::timeout(Duration::from_millis(50), locks.lock("stores/1/mac"));
        assert!(same.await.is_err(), "the same key was locked twice");
        // Some name among a few lands on another stripe and is not held up.
        let mut free = 0;
        for i in 0..4 {
            let other = format!("stores/2/pos/{i}/mac");
            let got = tokio::time::timeout(Duration::from_millis(50), locks.lock(&other)).await;
            free += usize::from(got.is_ok());
        }
        assert!(free >= 3, "{free} of 4 other keys could be locked");
        drop(held);
        let again = tokio::time::timeout(Duration::from_secs(5), locks.lock("stores/1/mac"));
        assert!(again.await.is_ok());
    }

    #[tokio::test]
    async fn a_batch_holds_each_of_its_keys_once() {
        let locks = KeyLocks::new();
        // A name twice (one stripe) is taken once, not waited for by itself.
        let batch = tokio::time::timeout(
            Duration::from_secs(5),
            locks.lock_many(["a/1", "a/2", "a/1"]),
        )
        .await
        .expect("a batch does not wait for itself");
        for name in ["a/1", "a/2"] {
            let got = tokio::time::timeout(Duration::from_millis(50), locks.lock(name)).await;
            assert!(got.is_err(), "{name} was free while the batch held it");
        }
        drop(batch);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), locks.lock("a/2"))
                .await
                .is_ok()
        );
    }
}
