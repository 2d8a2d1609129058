//! How the writer forms a group: which entries one transaction (one fsync, one MAC) takes.
//!
//! Once the first entry is in, the writer also waits for the requests the API has admitted but
//! not yet queued (an [`Admission`] each), at most `short`; a group still smaller than `small`
//! waits up to `long`. Why two bounds, with the measurements: BENCHMARKS.md, "Design
//! measurements moved from module headers".

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use super::BATCH;

/// How long a group waits for admitted requests.
pub struct Linger {
    pub short: Duration,
    pub long: Duration,
    pub small: usize,
}

impl Linger {
    pub const DEFAULT: Linger = Linger {
        short: Duration::from_micros(500),
        long: Duration::from_millis(2),
        small: 16,
    };
}

/// Requests admitted by the API whose entry is not queued yet.
#[derive(Default)]
pub struct Admitted {
    count: AtomicUsize,
    /// Woken when the count falls to zero: a lingering group is then complete.
    writer: OnceLock<Thread>,
}

impl Admitted {
    /// `writer` is unparked whenever the last admitted request has queued its entry.
    pub fn woken_by_last(&self, writer: Thread) {
        let _ = self.writer.set(writer);
    }

    fn outstanding(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

/// A request on its way to the audit trail; ends when dropped (after its entry is queued).
pub struct Admission(Arc<Admitted>);

impl Admission {
    pub fn new(admitted: &Arc<Admitted>) -> Self {
        admitted.count.fetch_add(1, Ordering::AcqRel);
        Self(admitted.clone())
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        // Unparking a thread that is not parked costs an atomic swap, no system call.
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(writer) = self.0.writer.get() {
                writer.unpark();
            }
        }
    }
}

/// Wait for one entry, then take what is queued and what admitted requests are about to queue,
/// as `linger` allows. Answers how long the group stayed open after its first entry, or None
/// once the queue is closed and empty. Called on the writer thread: it parks that thread.
pub fn gather<T>(
    rx: &Receiver<T>,
    admitted: &Admitted,
    linger: &Linger,
    batch: &mut Vec<T>,
) -> Option<Duration> {
    batch.push(rx.recv().ok()?);
    let started = Instant::now();
    while batch.len() < BATCH {
        match rx.try_recv() {
            Ok(p) => {
                batch.push(p);
                continue;
            }
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {}
        }
        let limit = if batch.len() < linger.small {
            linger.long
        } else {
            linger.short
        };
        let waited = started.elapsed();
        if admitted.outstanding() == 0 || waited >= limit {
            break;
        }
        // Park rather than block on the queue or nap: a blocked receiver costs every sender a
        // wake-up (a futex call and a context switch per entry), and napping one wake-up per
        // look. Parked, the writer is woken once, by the last admitted request as it queues its
        // entry, or by the clock. A wake-up left over from an earlier group only makes this
        // look again.
        std::thread::park_timeout(limit - waited);
    }
    Some(started.elapsed())
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::sync_channel;

    use super::*;

    /// Long enough that a test passing well inside it was not saved by the clock.
    const NEVER: Duration = Duration::from_secs(60);

    /// Waits for admitted requests as long as they take.
    const PATIENT: Linger = Linger {
        short: NEVER,
        long: NEVER,
        small: 16,
    };

    /// One group, and how long it stayed open by its own account, which cannot be longer than
    /// the call took.
    fn timed_gather<T>(
        rx: &Receiver<T>,
        admitted: &Admitted,
        linger: &Linger,
    ) -> (Vec<T>, Duration) {
        let started = Instant::now();
        let mut batch = Vec::new();
        let open = gather(rx, admitted, linger, &mut batch).expect("a group");
        assert!(open <= started.elapsed());
        (batch, open)
    }

    fn admitted_here() -> Arc<Admitted> {
        let a = Arc::new(Admitted::default());
        a.woken_by_last(std::thread::current());
        a
    }

    #[test]
    fn a_lone_entry_waits_for_nothing() {
        let (tx, rx) = sync_channel(8);
        let admitted = admitted_here();
        tx.send(1).unwrap();
        let (batch, open) = timed_gather(&rx, &admitted, &PATIENT);
        assert_eq!(batch, [1]);
        assert!(open < NEVER / 2);
    }

    #[test]
    fn the_group_waits_for_admitted_requests_and_is_woken_by_the_last() {
        let (tx, rx) = sync_channel(8);
        let admitted = admitted_here();
        let (first, second) = (Admission::new(&admitted), Admission::new(&admitted));
        tx.send(0).unwrap();
        let sender = {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for (i, admission) in [(1, first), (2, second)] {
                    std::thread::sleep(Duration::from_millis(20));
                    tx.send(i).unwrap();
                    drop(admission);
                }
            })
        };
        let (batch, open) = timed_gather(&rx, &admitted, &PATIENT);
        sender.join().unwrap();
        assert_eq!(batch, [0, 1, 2]);
        assert!(open < NEVER / 2, "woken by the clock, not the last request");
        // The two late entries came 20 ms apart, the first 20 ms after the sender started.
        assert!(open >= Duration::from_millis(30), "{open:?}");
    }

    #[test]
    fn a_small_group_lingers_longer_than_a_full_one() {
        let admitted = admitted_here();
        // An admitted request that never arrives: each group waits as long as `linger` allows.
        let _pending = Admission::new(&admitted);
        let linger = Linger {
            short: Duration::from_millis(1),
            long: Duration::from_millis(300),
            small: 4,
        };
        for (queued, at_least, under) in [
            (4, Duration::ZERO, Duration::from_millis(300)),
            (3, Duration::from_millis(300), NEVER),
        ] {
            let (tx, rx) = sync_channel(8);
            (0..queued).for_each(|i| tx.send(i).unwrap());
            let (batch, waited) = timed_gather(&rx, &admitted, &linger);
            assert_eq!(batch.len(), queued);
            assert!(waited >= at_least && waited < under, "{queued}: {waited:?}");
        }
    }

    #[test]
    fn a_closed_empty_queue_ends_the_writer() {
        let (tx, rx) = sync_channel::<u32>(1);
        drop(tx);
        let admitted = admitted_here();
        assert!(gather(&rx, &admitted, &Linger::DEFAULT, &mut Vec::new()).is_none());
    }
}
