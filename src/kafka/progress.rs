//! Watching a read of a topic up to its end offsets (dedup restore, identity
//! load, ledger scan). State topics grow, so no fixed total time fits them
//! all: a read gives up only when it stops advancing, and says how far it is
//! while it goes on.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracing::info;

/// How often a read in progress says how far it got.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Per-partition progress of one read, against the end offsets it reads to.
pub struct ReadProgress {
    what: &'static str,
    topic: String,
    stall: Duration,
    /// Partition → (next offset to read, records read).
    at: HashMap<i32, (i64, u64)>,
    last_advance: Instant,
    last_report: Instant,
}

impl ReadProgress {
    /// `what` names the read in its log lines; it fails after `stall`
    /// without a record read or a position advanced.
    pub fn new(what: &'static str, topic: &str, stall: Duration) -> ReadProgress {
        let now = Instant::now();
        ReadProgress {
            what,
            topic: topic.to_string(),
            stall,
            at: HashMap::new(),
            last_advance: now,
            last_report: now,
        }
    }

    /// A record at `offset` of `partition` was read.
    pub fn record(&mut self, partition: i32, offset: i64) {
        let e = self.at.entry(partition).or_insert((offset, 0));
        e.1 += 1;
        e.0 = e.0.max(offset + 1);
        self.last_advance = Instant::now();
    }

    /// The consumer's position in `partition`: compaction can leave offsets
    /// without records, which moves the position without a record read.
    pub fn position(&mut self, partition: i32, position: i64) {
        let e = self.at.entry(partition).or_insert((-1, 0));
        if position > e.0 {
            e.0 = position;
            self.last_advance = Instant::now();
        }
    }

    /// Nothing was read and no position moved for the stall window.
    pub fn stalled(&self) -> bool {
        self.last_advance.elapsed() >= self.stall
    }

    /// Logs, at most every [`REPORT_EVERY`], one line per partition still
    /// being read, with its position against its end.
    pub fn report(&mut self, ends: &HashMap<i32, i64>) {
        if self.last_report.elapsed() < REPORT_EVERY {
            return;
        }
        self.last_report = Instant::now();
        for (&partition, &end) in ends {
            // Position -1: nothing read from the partition yet.
            let (position, records) = self.at.get(&partition).copied().unwrap_or((-1, 0));
            info!(
                read = self.what,
                topic = %self.topic,
                partition,
                records,
                position,
                end,
                "reading state to its end offsets"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_stalls_only_after_the_window_without_any_advance() {
        let mut p = ReadProgress::new("test", "t", Duration::from_millis(300));
        for offset in 0..4 {
            std::thread::sleep(Duration::from_millis(100));
            p.record(0, offset);
            assert!(!p.stalled(), "a read that keeps advancing never stalls");
        }
        std::thread::sleep(Duration::from_millis(100));
        // A position that did not move is no progress.
        p.position(0, 4);
        std::thread::sleep(Duration::from_millis(250));
        assert!(p.stalled());
        // A position moved past a compacted gap is.
        p.position(0, 10);
        assert!(!p.stalled());
    }
}
