//! The partitions this sink owns and what of them is durable, shared by the
//! engine, the batch tasks and the consumer's rebalance callback.
//!
//! Handing a partition over: batches stop retrying its records, the records
//! in flight get until a deadline to become durable, whatever is durable is
//! committed *before* the partition is given up, and from then on nothing of
//! it is committed by this instance (its next owner reads on from there).

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::offsets::{OffsetTracker, Part};
use super::records::Item;
use crate::kafka::Position;

pub struct Ownership {
    tracker: Mutex<OffsetTracker>,
    /// Signalled whenever records in flight finish or are let go.
    settled: Condvar,
    /// Bumped when partitions start being given up, so batches look again.
    revocations: watch::Sender<u64>,
    /// Partitions given up since the engine last dropped their buffered records.
    revoked: Mutex<Vec<Part>>,
    /// Set when partitions were assigned, for the engine (which may have to
    /// pause them).
    assigned: std::sync::atomic::AtomicBool,
}

/// What a handover did.
#[derive(Debug, Default)]
pub struct Handover {
    /// Final commit points of the partitions given up.
    pub commits: Vec<Position>,
    /// Records still in flight at the deadline: left uncommitted.
    pub abandoned: usize,
    pub waited: Duration,
}

impl Default for Ownership {
    fn default() -> Self {
        Ownership {
            tracker: Mutex::default(),
            settled: Condvar::new(),
            revocations: watch::channel(0).0,
            revoked: Mutex::default(),
            assigned: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Ownership {
    fn lock(&self) -> MutexGuard<'_, OffsetTracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tracks a record just read; sets its epoch.
    pub fn seen(&self, item: &mut Item) {
        let s = &item.source;
        item.epoch = self.lock().seen(&s.topic, s.partition, s.offset);
    }

    pub fn dispatched<'a>(&self, items: impl IntoIterator<Item = &'a Item>) {
        let mut t = self.lock();
        for i in items {
            let s = &i.source;
            t.dispatched(&s.topic, s.partition, s.offset, i.epoch);
        }
    }

    /// The outcome of the record at `source` (read in `epoch`) is durable;
    /// false when that assignment has ended.
    pub fn done(&self, topic: &str, partition: i32, offset: i64, epoch: u64) -> bool {
        let current = self.lock().done(topic, partition, offset, epoch);
        self.settled.notify_all();
        current
    }

    pub fn abandoned(&self, item: &Item) {
        let s = &item.source;
        self.lock()
            .abandoned(&s.topic, s.partition, s.offset, item.epoch);
        self.settled.notify_all();
    }

    /// Whether `item` may still be worked on: its partition is owned, in the
    /// assignment it was read in, and not being given up.
    pub fn is_live(&self, item: &Item) -> bool {
        let s = &item.source;
        self.lock().is_live(&s.topic, s.partition, item.epoch)
    }

    /// Whether `epoch` is the current assignment of the partition.
    pub fn is_current(&self, topic: &str, partition: i32, epoch: u64) -> bool {
        self.lock().is_live(topic, partition, epoch)
    }

    pub fn take_commits(&self) -> Vec<Position> {
        self.lock().take_commits()
    }

    /// Tells batches when partitions start being given up.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revocations.subscribe()
    }

    /// Partitions given up since the last call.
    pub fn take_revoked(&self) -> Vec<Part> {
        std::mem::take(&mut *self.revoked.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Gives `parts` up: waits up to `deadline` for their records in flight,
    /// then stops tracking them and returns their last commit points, which
    /// the caller commits before the partitions go. Blocking: called from
    /// the consumer's rebalance callback.
    pub fn hand_over(&self, parts: &[Part], deadline: Duration) -> Handover {
        if parts.is_empty() {
            return Handover::default();
        }
        {
            let mut t = self.lock();
            for p in parts {
                t.start_revoke(p);
            }
        }
        self.revocations.send_modify(|n| *n += 1);
        let started = Instant::now();
        let wait = || {
            let mut t = self.lock();
            loop {
                let in_flight: usize = parts.iter().map(|p| t.in_flight(p)).sum();
                let left = deadline.saturating_sub(started.elapsed());
                if in_flight == 0 || left.is_zero() {
                    return;
                }
                t = self
                    .settled
                    .wait_timeout(t, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        // The callback runs on the engine's task: on a multi-threaded runtime
        // the batches run on, the wait may block this worker; a
        // current-thread runtime could never finish them, so it does not wait.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            Ok(_) => {}
            Err(_) => wait(),
        }
        let mut report = Handover {
            waited: started.elapsed(),
            ..Handover::default()
        };
        {
            let mut t = self.lock();
            for p in parts {
                let (commit, in_flight) = t.revoke(p);
                if let Some(offset) = commit {
                    report.commits.push(Position::new(&p.0, p.1, offset));
                }
                report.abandoned += in_flight;
            }
        }
        self.revoked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(parts.iter().cloned());
        report
    }

    /// Partitions were assigned (rebalance callback).
    pub fn note_assignment(&self) {
        self.assigned
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether partitions were assigned since the last call.
    pub fn take_assignment(&self) -> bool {
        self.assigned
            .swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops tracking everything (the sink is stopping and has committed):
    /// the consumer's closing revoke then has nothing to wait for.
    pub fn release_all(&self) {
        let mut t = self.lock();
        for p in t.partitions() {
            t.revoke(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn item(offset: i64) -> Item {
        Item {
            delivery: None,
            raw: Vec::new(),
            key: None,
            headers: Vec::new(),
            source: Position {
                topic: "d".into(),
                partition: 0,
                offset,
            },
            origin: Position {
                topic: "d".into(),
                partition: 0,
                offset,
            },
            attempts: 0,
            first_attempt: None,
            last_attempt: None,
            due: None,
            reason: None,
            requeued_at: None,
            epoch: 0,
        }
    }

    #[test]
    fn a_handover_waits_for_records_in_flight_then_commits_them() {
        let own = Arc::new(Ownership::default());
        let mut items: Vec<Item> = (0..3).map(item).collect();
        for i in &mut items {
            own.seen(i);
        }
        own.dispatched(&items[..2]);
        let mut rx = own.subscribe();
        let worker = {
            let own = own.clone();
            let (a, b) = (items[0].clone(), items[1].clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                assert!(!own.is_live(&a), "being handed over");
                own.done("d", 0, a.source.offset, a.epoch);
                own.done("d", 0, b.source.offset, b.epoch);
            })
        };
        let part = ("d".to_string(), 0);
        let report = own.hand_over(std::slice::from_ref(&part), Duration::from_secs(5));
        worker.join().unwrap();
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        assert!(report.waited >= Duration::from_millis(100));
        assert_eq!(report.abandoned, 0);
        // Offset 2 was read but never sent: its next owner reads it again.
        assert_eq!(report.commits, vec![Position::new("d", 0, 2)]);
        assert_eq!(own.take_revoked(), vec![part]);
        assert!(own.take_commits().is_empty());
        assert!(!own.done("d", 0, 2, items[2].epoch));
    }

    #[test]
    fn a_handover_abandons_what_misses_the_deadline() {
        let own = Ownership::default();
        let mut i = item(9);
        own.seen(&mut i);
        own.dispatched([&i]);
        let part = ("d".to_string(), 0);
        let report = own.hand_over(&[part], Duration::from_millis(50));
        assert_eq!(report.abandoned, 1);
        assert!(report.commits.is_empty(), "nothing durable to commit");
        assert!(
            !own.done("d", 0, 9, i.epoch),
            "a late outcome commits nothing"
        );
    }
}
