//! The daemon's log output: lines collected in memory and written to standard error in batches.
//!
//! At tens of thousands of requests per second, one `write(2)` per request line cost about a
//! tenth of the daemon's CPU (profiled with `perf` under `tillkey bench`). Lines are now
//! appended to a buffer and written when it passes 32 KiB or, at the latest, every 25 ms by a
//! flusher thread, so a line reaches the journal at most 25 ms late. Warnings and errors are
//! written at once, together with everything buffered before them, so the lines an operator
//! needs after a failure are never the ones still waiting. The tamper-evident audit trail, not
//! this log, is the durable record of what was done.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

const FLUSH_AT: usize = 32 * 1024;
const FLUSH_EVERY: Duration = Duration::from_millis(25);

static PENDING: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// Held from taking the buffer until it is written, so batches leave in the order they filled.
static OUTPUT: Mutex<()> = Mutex::new(());
static FLUSHER: Once = Once::new();
/// False until the flusher runs: without it every line is written at once, as before batching.
static FLUSHING: AtomicBool = AtomicBool::new(false);

/// Write everything buffered now (at exit, and from the flusher).
pub fn flush() {
    let _in_order = OUTPUT.lock().unwrap_or_else(|p| p.into_inner());
    let lines = std::mem::take(&mut *PENDING.lock().unwrap_or_else(|p| p.into_inner()));
    if !lines.is_empty() {
        // Nowhere left to report a failure to write the log.
        let _ = std::io::stderr().lock().write_all(&lines);
    }
}

/// `MakeWriter` for `tracing_subscriber::fmt`: one [`Line`] per event.
pub struct BatchedStderr;

impl BatchedStderr {
    /// The writer; starts the flusher thread the first time.
    pub fn start() -> Self {
        FLUSHER.call_once(|| {
            let started = std::thread::Builder::new()
                .name("log-flush".into())
                .spawn(|| loop {
                    std::thread::sleep(FLUSH_EVERY);
                    flush();
                });
            FLUSHING.store(started.is_ok(), Ordering::Release);
        });
        Self
    }
}

impl<'a> MakeWriter<'a> for BatchedStderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { urgent: true }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        // `Level` orders by verbosity: WARN and ERROR compare below INFO.
        Line {
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

/// One event's output (the formatter writes a whole line at once).
pub struct Line {
    urgent: bool,
}

impl Write for Line {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let due = {
            let mut pending = PENDING.lock().unwrap_or_else(|p| p.into_inner());
            pending.extend_from_slice(bytes);
            self.urgent || pending.len() >= FLUSH_AT || !FLUSHING.load(Ordering::Acquire)
        };
        if due {
            flush();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Lets one line a second through and counts the rest, for an error that repeats on every
/// request while a dependency is down. Under load a token or audit outage would otherwise write
/// thousands of identical, unbuffered error lines a second, and journald's rate limit would then
/// drop the lines an operator needs (the failure's first report, the reconnect). Each request's
/// own outcome is still in its request line.
pub struct Throttle {
    /// Milliseconds since [`epoch`] before which lines are held back.
    next_ms: AtomicU64,
    held: AtomicU64,
}

impl Throttle {
    const EVERY_MS: u64 = 1_000;

    pub const fn new() -> Self {
        Self {
            next_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: write this line, noting `n` held back since the last one. `None`: hold it.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(epoch().elapsed().as_millis() as u64)
    }

    fn admit_at(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        if now_ms >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now_ms + Self::EVERY_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

#[cfg(test)]
mod tests {
    use super::Throttle;

    #[test]
    fn one_line_a_second_and_the_count_of_the_rest() {
        let t = Throttle::new();
        assert_eq!(t.admit_at(5), Some(0));
        assert_eq!(t.admit_at(6), None);
        assert_eq!(t.admit_at(1_004), None);
        assert_eq!(t.admit_at(1_005), Some(2));
        assert_eq!(t.admit_at(1_500), None);
        assert_eq!(t.admit_at(9_000), Some(1));
        assert_eq!(t.admit_at(9_001), None);
    }
}
