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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

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
