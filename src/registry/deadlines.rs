//! The scheduler's agenda: each key's next time-driven change (rotation period elapsed, end of
//! a verify-only grace), ordered by time. Kept in step with the index on every publish, so a
//! scheduler pass costs the number of keys due, not the number of keys registered.

use std::collections::BTreeSet;

use super::KeyRecord;
use crate::keys::{KeyName, VersionState};

#[derive(Default)]
pub(super) struct Deadlines {
    agenda: BTreeSet<(i64, KeyName)>,
}

impl Deadlines {
    /// The agenda of `keys` (given in name order) at start-up, built in one sorted pass.
    pub fn build<'a>(keys: impl Iterator<Item = &'a KeyRecord>) -> Self {
        let mut entries: Vec<(i64, KeyName)> = keys
            .filter_map(|k| next_deadline(k).map(|at| (at, k.name.clone())))
            .collect();
        // Stable by time keeps name order among equal times (keys enrolled in the same second),
        // so the set is built from sorted input without comparing names.
        entries.sort_by_key(|e| e.0);
        Self {
            agenda: entries.into_iter().collect(),
        }
    }

    /// Replace `old`'s entry (the record being superseded, if any) with `new`'s.
    pub fn update(&mut self, old: Option<&KeyRecord>, new: &KeyRecord) {
        if let Some(at) = old.and_then(next_deadline) {
            // The old record is always the same key as the new one.
            self.agenda.remove(&(at, new.name.clone()));
        }
        if let Some(at) = next_deadline(new) {
            self.agenda.insert((at, new.name.clone()));
        }
    }

    /// Keys due at or before `now`, earliest first. They stay on the agenda until the change is
    /// made (and published), so a failed change is retried on the next pass.
    pub fn due(&self, now: i64) -> Vec<KeyName> {
        self.agenda
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, name)| name.clone())
            .collect()
    }
}

/// When `key` next needs the scheduler, if ever.
pub fn next_deadline(key: &KeyRecord) -> Option<i64> {
    let rotation = match (key.lifecycle.rotation_period, key.active()) {
        (Some(p), Some(a)) => Some(
            a.created_at
                .saturating_add(i64::try_from(p).unwrap_or(i64::MAX)),
        ),
        _ => None,
    };
    let grace = key
        .versions
        .iter()
        .filter(|v| v.state == VersionState::VerifyOnly)
        .filter_map(|v| v.grace_until)
        .min();
    match (rotation, grace) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
