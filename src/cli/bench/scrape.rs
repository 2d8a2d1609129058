//! What the daemon reports about itself on its admin listener's `/metrics`.
//!
//! Besides single figures for the scale phase, the audit group commits over a measured window
//! (`tillkey_audit_*`, see `metrics::AuditMetrics`). Every request waits while its group is held
//! open and then written, so these figures say how much of a phase's latency was the trail's and
//! how many entries shared each flush; the CPU split cannot, because waiting costs no CPU.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::Serialize;

/// The `/metrics` text, or None if the daemon does not answer.
pub fn metrics(admin: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text)
}

/// The value of one series, named with its labels exactly as exposed.
pub fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// The audit writer's running totals.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CommitTotals {
    commits: f64,
    entries: f64,
    open_s: f64,
    write_s: f64,
}

impl CommitTotals {
    /// None if the daemon does not answer or reports no audit figures.
    pub fn read(admin: SocketAddr) -> Option<Self> {
        Self::parse(&metrics(admin)?)
    }

    fn parse(text: &str) -> Option<Self> {
        Some(Self {
            commits: series(text, "tillkey_audit_group_entries_count")?,
            entries: series(text, "tillkey_audit_group_entries_sum")?,
            open_s: series(text, "tillkey_audit_group_wait_seconds_sum")?,
            write_s: series(text, "tillkey_audit_write_seconds_sum")?,
        })
    }

    pub fn since(self, earlier: Self) -> Self {
        self.zip(earlier, |a, b| a - b)
    }

    pub fn plus(self, other: Self) -> Self {
        self.zip(other, |a, b| a + b)
    }

    fn zip(self, o: Self, f: impl Fn(f64, f64) -> f64) -> Self {
        Self {
            commits: f(self.commits, o.commits),
            entries: f(self.entries, o.entries),
            open_s: f(self.open_s, o.open_s),
            write_s: f(self.write_s, o.write_s),
        }
    }

    /// Rates over `seconds` and means per commit; None if nothing was committed.
    pub fn over(self, seconds: f64) -> Option<Commits> {
        (self.commits > 0.0).then(|| Commits {
            per_s: self.commits / seconds.max(f64::MIN_POSITIVE),
            entries_per_commit: self.entries / self.commits,
            open_ms: self.open_s * 1e3 / self.commits,
            write_ms: self.write_s * 1e3 / self.commits,
        })
    }
}

/// The audit group commits of a phase's daemon windows.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Commits {
    pub per_s: f64,
    pub entries_per_commit: f64,
    /// Mean time a group was held open after its first entry.
    pub open_ms: f64,
    /// Mean time from a closed group to its entries durable (seal, insert, commit, flush).
    pub write_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape prometheus-client gives a histogram and a counter, with a response head.
    const SCRAPED: &str = "HTTP/1.1 200 OK\r\ncontent-length: 999\r\n\r\n\
        # TYPE tillkey_audit_group_entries histogram\n\
        tillkey_audit_group_entries_sum 300.0\n\
        tillkey_audit_group_entries_count 20\n\
        tillkey_audit_group_entries_bucket{le=\"1.0\"} 2\n\
        tillkey_audit_group_wait_seconds_sum 0.01\n\
        tillkey_audit_group_wait_seconds_count 20\n\
        tillkey_audit_write_seconds_sum 0.006\n\
        tillkey_audit_write_seconds_count 20\n\
        tillkey_audit_failed_groups_total 0\n\
        tillkey_keys 7\n";

    #[test]
    fn a_series_is_found_by_its_whole_name() {
        assert_eq!(series(SCRAPED, "tillkey_keys"), Some(7.0));
        assert_eq!(
            series(SCRAPED, "tillkey_audit_group_entries_count"),
            Some(20.0)
        );
        assert_eq!(
            series(SCRAPED, "tillkey_key"),
            None,
            "a prefix is not a name"
        );
        assert_eq!(
            series(SCRAPED, "tillkey_audit_group_entries_bucket{le=\"1.0\"}"),
            Some(2.0)
        );
    }

    #[test]
    fn commits_over_a_window() {
        let end = CommitTotals::parse(SCRAPED).unwrap();
        let start = CommitTotals {
            commits: 10.0,
            entries: 100.0,
            open_s: 0.004,
            write_s: 0.002,
        };
        let c = end.since(start).over(2.0).unwrap();
        assert_eq!(c.per_s, 5.0);
        assert_eq!(c.entries_per_commit, 20.0);
        assert!((c.open_ms - 0.6).abs() < 1e-9, "{c:?}");
        assert!((c.write_ms - 0.4).abs() < 1e-9, "{c:?}");
        assert!(
            start.since(start).over(2.0).is_none(),
            "no commit, no means"
        );
        assert!(CommitTotals::parse("tillkey_keys 7\n").is_none());
    }
}
