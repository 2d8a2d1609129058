//! Where the daemon's CPU goes, by the kind of thread that spent it.
//!
//! The daemon's CPU per operation is the figure issue 7 asks to drive down, and one number does
//! not say which part to work on: the network side (TLS, HTTP, JSON, policy on the async
//! workers), the token calls on the device threads, or the audit writer's group commits (whose
//! fixed cost per group weighs more per request at lower rates). The threads are told apart by
//! the names the daemon gives them.

use serde::Serialize;

use super::raw::timing::cpu_seconds;
use crate::audit::WRITER_THREAD;
use crate::daemon::WORKER_THREAD;
use crate::device::THREAD_PREFIX;

/// CPU seconds (or, after [`ByThread::per_op`], microseconds per operation) of one process.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ByThread {
    /// The async workers and the blocking pool: the network side, and the single token calls
    /// on a software token, which run where they are asked.
    pub workers: f64,
    /// The device threads: batches, and every single call to a device that makes calls wait.
    pub device: f64,
    /// The audit writer.
    pub audit: f64,
    /// Everything else: supervisors, the log flusher, the main thread, and threads that have
    /// exited (the process total keeps their time; no thread list does).
    pub other: f64,
}

impl ByThread {
    /// The process's CPU so far. None if it is gone.
    pub fn read(pid: u32) -> Option<Self> {
        let total = cpu_seconds(&pid.to_string())?;
        let mut by = Self::default();
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .flatten()
        {
            let tid = task.file_name();
            let tid = tid.to_string_lossy();
            // A thread that ends between the listing and these reads leaves its time in the
            // process total, so it lands in `other`.
            let Ok(name) = std::fs::read_to_string(task.path().join("comm")) else {
                continue;
            };
            let Some(spent) = cpu_seconds(&format!("{pid}/task/{tid}")) else {
                continue;
            };
            *by.slot(name.trim_end()) += spent;
        }
        by.other = total - by.workers - by.device - by.audit;
        Some(by)
    }

    fn slot(&mut self, thread_name: &str) -> &mut f64 {
        if thread_name == WORKER_THREAD {
            &mut self.workers
        } else if thread_name.starts_with(THREAD_PREFIX) {
            &mut self.device
        } else if thread_name == WRITER_THREAD {
            &mut self.audit
        } else {
            &mut self.other
        }
    }

    /// What was spent between `earlier` and `self`.
    pub fn since(self, earlier: Self) -> Self {
        self.zip(earlier, |now, then| now - then)
    }

    pub fn plus(self, other: Self) -> Self {
        self.zip(other, |a, b| a + b)
    }

    /// Seconds over `ops` operations as microseconds per operation.
    pub fn per_op(self, ops: f64) -> Self {
        let scale = 1e6 / ops.max(1.0);
        self.zip(self, |s, _| s * scale)
    }

    fn zip(self, o: Self, f: impl Fn(f64, f64) -> f64) -> Self {
        Self {
            workers: f(self.workers, o.workers),
            device: f(self.device, o.device),
            audit: f(self.audit, o.audit),
            other: f(self.other, o.other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_sorted_by_the_names_the_daemon_gives_them() {
        let mut by = ByThread::default();
        for (name, spent) in [
            (WORKER_THREAD, 1.0),
            (WORKER_THREAD, 2.0),
            ("device-0", 4.0),
            ("device-1", 8.0),
            (WRITER_THREAD, 16.0),
            ("log-flush", 32.0),
            ("tokio-rt-worker", 64.0),
        ] {
            *by.slot(name) += spent;
        }
        assert_eq!(
            (by.workers, by.device, by.audit, by.other),
            (3.0, 12.0, 16.0, 96.0)
        );
    }

    #[test]
    fn a_thread_named_like_a_device_thread_is_counted_as_one() {
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let (spun, spinning) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("{THREAD_PREFIX}test"))
            .spawn(move || {
                let mut x = 0u64;
                while cpu_seconds("thread-self").unwrap() < 0.1 {
                    for _ in 0..10_000 {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                }
                spun.send(()).unwrap();
                // Alive until read: an ended thread's time counts as `other`.
                let _ = wait.recv();
            })
            .unwrap();
        spinning.recv().unwrap();
        let by = ByThread::read(std::process::id()).expect("our own /proc entry");
        done.send(()).unwrap();
        thread.join().unwrap();
        assert!(by.device >= 0.1, "{by:?}");
    }
}
