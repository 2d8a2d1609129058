//! How an instance learns of the changes other instances make to keys (PostgreSQL only: a
//! SQLite registry serves one process). Every change writes a row to `key_changes` in its own
//! transaction; each instance polls for rows it has not seen and reads those keys again. A row
//! this process wrote counts as seen once the change it records is committed and published here
//! ([`Registry::seen_own`]): reading those keys again cost a busy instance more than its polls
//! could afford (under a burst of rotations a poll took over a second, and the instance stopped
//! serving). A change whose commit failed is not marked, so an unclear commit is read again.
//!
//! Sequence numbers are handed out when a row is inserted, not when its transaction commits, so
//! a row can appear below one already seen. Each poll therefore looks back over the last
//! [`LOOKBACK`] numbers and skips the rows it has seen; a number still missing after that is a
//! transaction that rolled back (or one open for longer than the window) and is left behind.

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::Row;

use super::{KeyRecord, Registry, RegistryError};
use crate::backend::ObjectRef;
use crate::keys::{KeyName, KeyType, VersionState};

/// How far below the highest number seen each poll looks again.
const LOOKBACK: i64 = 1000;

/// How long an instance may go without a successful poll before it stops serving keys.
pub const MAX_BEHIND: Duration = Duration::from_secs(1);

/// What this instance has read of the change log.
pub(super) struct Feed {
    seen: Mutex<Seen>,
    /// When the last poll succeeded (or the registry was loaded).
    current_at: Mutex<Instant>,
}

#[derive(Default)]
struct Seen {
    high: i64,
    /// Numbers seen within [`LOOKBACK`] of `high`, and this process's own above it.
    recent: BTreeSet<i64>,
}

impl Seen {
    /// Each poll reads the rows above this.
    fn floor(&self) -> i64 {
        self.high - LOOKBACK
    }

    fn unread(&self, seq: i64) -> bool {
        !self.recent.contains(&seq)
    }

    /// This process's own rows, committed and published: only marked, so the window moves with
    /// what polls read and never past another instance's row that no poll has read yet.
    fn own(&mut self, seqs: impl IntoIterator<Item = i64>) {
        self.recent.extend(seqs);
    }

    /// A poll read `fresh` (the keys of which it read again) among rows up to `last`.
    fn read(&mut self, fresh: impl IntoIterator<Item = i64>, last: Option<i64>) {
        self.recent.extend(fresh);
        if let Some(last) = last {
            self.high = self.high.max(last);
        }
        self.recent = self.recent.split_off(&self.floor());
    }
}

impl Feed {
    /// Everything up to `high` is in the index already (it was loaded after `high` was read).
    pub(super) fn starting_at(high: i64) -> Self {
        Self {
            seen: Mutex::new(Seen {
                high,
                recent: BTreeSet::new(),
            }),
            current_at: Mutex::new(Instant::now()),
        }
    }
}

/// The highest change number now: read before the index is loaded, so no change is missed.
pub(super) async fn high_water(pool: &sqlx::AnyPool) -> Result<i64, RegistryError> {
    let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS high FROM key_changes")
        .fetch_one(pool)
        .await?;
    Ok(row.try_get("high")?)
}

/// Record that `name` changed, in the transaction that changes it; the row's number.
pub(super) async fn record(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    name: &KeyName,
) -> Result<i64, RegistryError> {
    let row = sqlx::query("INSERT INTO key_changes (name) VALUES ($1) RETURNING seq")
        .bind(name.as_str())
        .fetch_one(&mut **tx)
        .await?;
    Ok(row.try_get("seq")?)
}

/// What a poll of the change feed found.
#[derive(Default)]
pub struct CaughtUp {
    /// Keys read again.
    pub keys: usize,
    /// Derived versions another instance destroyed since this process last read them: their
    /// derived keys may still sit in this process's device cache, which only the destroying
    /// instance's emptied.
    pub destroyed: Vec<(KeyType, ObjectRef)>,
}

impl CaughtUp {
    fn destroyed_derived(&mut self, before: Option<&KeyRecord>, after: Option<&KeyRecord>) {
        let (Some(before), Some(after)) = (before, after) else {
            return;
        };
        for v in &after.versions {
            // A destroyed version's record no longer names its key; the one read before does.
            let Some(was) = before.version(v.version) else {
                continue;
            };
            if v.state == VersionState::Destroyed
                && was.state != VersionState::Destroyed
                && was.derivation.is_some()
            {
                self.destroyed.push((after.key_type, was.object.clone()));
            }
        }
    }
}

impl Registry {
    /// The change rows `seqs` were written by this process, and their changes are committed and
    /// in the index: polls need not read those keys again.
    pub(super) fn seen_own(&self, seqs: impl IntoIterator<Item = i64>) {
        let Some(feed) = &self.feed else { return };
        feed.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .own(seqs);
    }

    /// Read again every key changed elsewhere since the last call. Nothing to do on SQLite.
    pub async fn catch_up(&self) -> Result<CaughtUp, RegistryError> {
        let mut caught = CaughtUp::default();
        let Some(feed) = &self.feed else {
            return Ok(caught);
        };
        let started = Instant::now();
        let floor = feed.seen.lock().unwrap_or_else(|p| p.into_inner()).floor();
        let rows = sqlx::query("SELECT seq, name FROM key_changes WHERE seq > $1 ORDER BY seq")
            .bind(floor)
            .fetch_all(&self.pool)
            .await?;
        let mut fresh = Vec::new();
        {
            let seen = feed.seen.lock().unwrap_or_else(|p| p.into_inner());
            for r in &rows {
                let seq: i64 = r.try_get("seq")?;
                if seen.unread(seq) {
                    fresh.push((seq, r.try_get::<String, _>("name")?));
                }
            }
        }
        let mut names = HashSet::new();
        for (_, name) in &fresh {
            if names.insert(name.clone()) {
                if let Ok(name) = KeyName::parse(name) {
                    let before = self.get(&name);
                    let after = self.reload(&name).await?;
                    caught.destroyed_derived(before.as_deref(), after.as_deref());
                }
            }
        }
        caught.keys = names.len();
        // Every row this poll read moves the window, this process's own included.
        let last = rows.last().map(|r| r.try_get("seq")).transpose()?;
        feed.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .read(fresh.iter().map(|(seq, _)| *seq), last);
        // Current as of when this poll started: what committed after it is the next poll's.
        *feed.current_at.lock().unwrap_or_else(|p| p.into_inner()) = started;
        Ok(caught)
    }

    /// How long since the index last caught up with the database; `None` when nothing else
    /// writes it (SQLite).
    pub fn behind(&self) -> Option<Duration> {
        self.feed.as_ref().map(|f| {
            f.current_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The review's case: another instance's row (a revocation) is committed but not yet
    /// polled when this process writes a burst of its own changes. The next poll still reads
    /// it, and only it; then the window moves past all of them.
    #[test]
    fn a_burst_of_own_changes_never_moves_the_window_past_an_unread_row() {
        let mut seen = Seen::default();
        seen.own(2..=1500);
        assert!(seen.floor() < 1, "the next poll would not read row 1");
        let rows: Vec<i64> = (1..=1500).collect();
        let unread: Vec<i64> = rows.iter().copied().filter(|s| seen.unread(*s)).collect();
        assert_eq!(unread, [1]);
        seen.read(unread, rows.last().copied());
        assert_eq!(seen.floor(), 1500 - LOOKBACK);
        assert!((1..=1500).all(|s| s <= seen.floor() || !seen.unread(s)));
    }

    #[test]
    fn a_row_committed_late_below_the_last_read_is_still_read() {
        let mut seen = Seen::default();
        // Rows 1 and 3 committed; 2 (another instance's) commits after this poll.
        seen.read([1, 3], Some(3));
        assert!(seen.floor() < 2 && seen.unread(2));
        assert!(!seen.unread(1) && !seen.unread(3));
    }
}
