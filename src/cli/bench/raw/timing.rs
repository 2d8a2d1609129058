//! The clock every raw backend benchmark shares: worker threads run one device operation after
//! another, and only those finished inside the measured window count, so the raw rate and the
//! daemon's rate in `tillkey bench` are measured the same way whatever the backend.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct RawRate {
    pub ops: u64,
    pub elapsed: Duration,
    /// CPU seconds (user + system) this process spent while the operations were counted.
    pub cpu_seconds: Option<f64>,
}

impl RawRate {
    pub fn per_second(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

/// What a worker checks between operations.
#[derive(Default)]
pub struct Pace {
    stop: AtomicBool,
    counting: AtomicBool,
    ops: AtomicU64,
}

impl Pace {
    /// Whether to do another operation.
    pub fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }

    /// One operation finished; it counts if the measured window is open.
    pub fn done_one(&self) {
        if self.counting.load(Ordering::Relaxed) {
            self.ops.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Run `work(thread_index, pace)` on `threads` threads: `warmup` uncounted, then `duration`
/// counted. The first worker error is the result.
pub fn timed<F>(
    threads: usize,
    warmup: Duration,
    duration: Duration,
    work: F,
) -> Result<RawRate, String>
where
    F: Fn(usize, &Pace) -> Result<(), String> + Send + Sync + 'static,
{
    let pace = Arc::new(Pace::default());
    let work = Arc::new(work);
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (pace, work) = (pace.clone(), work.clone());
            std::thread::spawn(move || work(t, &pace))
        })
        .collect();
    std::thread::sleep(warmup);
    pace.counting.store(true, Ordering::SeqCst);
    let cpu0 = cpu_seconds("self");
    let start = Instant::now();
    std::thread::sleep(duration);
    let ops = pace.ops.load(Ordering::SeqCst);
    let elapsed = start.elapsed();
    let cpu = cpu0.zip(cpu_seconds("self")).map(|(a, b)| b - a);
    pace.stop.store(true, Ordering::SeqCst);
    let mut first_error = None;
    for w in workers {
        let outcome = w
            .join()
            .unwrap_or_else(|_| Err("bench thread panicked".into()));
        if let Err(e) = outcome {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(RawRate {
            ops,
            elapsed,
            cpu_seconds: cpu,
        }),
    }
}

/// User + system CPU seconds of a process (`self` or a pid), from /proc.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); index 11 and 12 after the command name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}
