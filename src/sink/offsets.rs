//! Which offsets may be committed: per partition, everything below the
//! lowest offset whose outcome is not yet durable.
//!
//! Each assignment of a partition is its own *epoch*: a record read in an
//! earlier assignment that finishes late never counts for a later one (and a
//! partition that was given up is not tracked, so it is never committed).

use std::collections::{BTreeSet, HashMap};

use crate::kafka::Position;

pub type Part = (String, i32);

struct Track {
    pending: BTreeSet<i64>,
    /// Pending records handed to a batch (sent or about to be).
    in_flight: BTreeSet<i64>,
    /// One past the highest offset seen.
    next: i64,
    committed: i64,
    /// The first offset read in this assignment (where its reading began).
    first: i64,
    epoch: u64,
    /// Being given up: batches drop its records instead of retrying them.
    revoking: bool,
}

#[derive(Default)]
pub struct OffsetTracker {
    parts: HashMap<Part, Track>,
    epochs: u64,
}

impl OffsetTracker {
    /// A record was read and its outcome is not durable yet; returns the
    /// partition's epoch, which every later call about it must quote.
    pub fn seen(&mut self, topic: &str, partition: i32, offset: i64) -> u64 {
        let epochs = &mut self.epochs;
        let t = self
            .parts
            .entry((topic.to_string(), partition))
            .or_insert_with(|| {
                *epochs += 1;
                Track {
                    pending: BTreeSet::new(),
                    in_flight: BTreeSet::new(),
                    next: offset,
                    committed: offset,
                    first: offset,
                    epoch: *epochs,
                    revoking: false,
                }
            });
        t.pending.insert(offset);
        t.next = t.next.max(offset + 1);
        t.epoch
    }

    fn track(&mut self, topic: &str, partition: i32, epoch: u64) -> Option<&mut Track> {
        self.parts
            .get_mut(&(topic.to_string(), partition))
            .filter(|t| t.epoch == epoch)
    }

    /// The record was handed to a batch task.
    pub fn dispatched(&mut self, topic: &str, partition: i32, offset: i64, epoch: u64) {
        if let Some(t) = self.track(topic, partition, epoch) {
            t.in_flight.insert(offset);
        }
    }

    /// The record's outcome is durable. False when it belongs to an
    /// assignment that has ended.
    pub fn done(&mut self, topic: &str, partition: i32, offset: i64, epoch: u64) -> bool {
        match self.track(topic, partition, epoch) {
            Some(t) => {
                t.pending.remove(&offset);
                t.in_flight.remove(&offset);
                true
            }
            None => false,
        }
    }

    /// A batch let go of the record without a durable outcome: it stays
    /// uncommitted, for this partition's next owner.
    pub fn abandoned(&mut self, topic: &str, partition: i32, offset: i64, epoch: u64) {
        if let Some(t) = self.track(topic, partition, epoch) {
            t.in_flight.remove(&offset);
        }
    }

    /// Whether the record's assignment is current and not being given up.
    pub fn is_live(&self, topic: &str, partition: i32, epoch: u64) -> bool {
        self.parts
            .get(&(topic.to_string(), partition))
            .is_some_and(|t| t.epoch == epoch && !t.revoking)
    }

    /// Offsets to commit (the next offset to read, Kafka style) that moved
    /// since the last call.
    pub fn take_commits(&mut self) -> Vec<Position> {
        let mut out = Vec::new();
        for ((topic, partition), t) in &mut self.parts {
            if let Some(point) = t.commit_point() {
                out.push(Position::new(topic, *partition, point));
            }
        }
        out
    }

    /// Marks a partition as being given up (batches stop retrying its records).
    pub fn start_revoke(&mut self, part: &Part) {
        if let Some(t) = self.parts.get_mut(part) {
            t.revoking = true;
        }
    }

    pub fn in_flight(&self, part: &Part) -> usize {
        self.parts.get(part).map_or(0, |t| t.in_flight.len())
    }

    /// Stops tracking a partition; returns its durable point if anything
    /// was made durable in this assignment (committed again even when an
    /// earlier, asynchronous commit may have carried it: that one can have
    /// failed), and how many records were still in flight.
    pub fn revoke(&mut self, part: &Part) -> (Option<i64>, usize) {
        match self.parts.remove(part) {
            Some(t) => {
                let point = t.pending.first().copied().unwrap_or(t.next);
                ((point > t.first).then_some(point), t.in_flight.len())
            }
            None => (None, 0),
        }
    }

    /// Every tracked partition.
    pub fn partitions(&self) -> Vec<Part> {
        self.parts.keys().cloned().collect()
    }

    /// Records read whose outcome is not durable yet.
    pub fn pending(&self) -> usize {
        self.parts.values().map(|t| t.pending.len()).sum()
    }
}

impl Track {
    fn commit_point(&mut self) -> Option<i64> {
        let point = self.pending.first().copied().unwrap_or(self.next);
        (point > self.committed).then(|| {
            self.committed = point;
            point
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_the_contiguous_prefix() {
        let mut t = OffsetTracker::default();
        let mut e = 0;
        for o in 10..15 {
            e = t.seen("d", 0, o);
        }
        assert!(t.take_commits().is_empty());
        t.done("d", 0, 11, e);
        t.done("d", 0, 12, e);
        assert!(t.take_commits().is_empty(), "10 is still open");
        t.done("d", 0, 10, e);
        assert_eq!(t.take_commits(), vec![Position::new("d", 0, 13)]);
        assert!(t.take_commits().is_empty(), "nothing moved");
        t.done("d", 0, 14, e);
        t.done("d", 0, 13, e);
        assert_eq!(t.take_commits(), vec![Position::new("d", 0, 15)]);
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::default();
        t.seen("d", 0, 0);
        let e = t.seen("d", 1, 7);
        t.done("d", 1, 7, e);
        assert_eq!(t.take_commits(), vec![Position::new("d", 1, 8)]);
        assert_eq!(t.pending(), 1);
    }

    #[test]
    fn a_revoked_partition_commits_once_and_ignores_late_outcomes() {
        let mut t = OffsetTracker::default();
        let part = ("d".to_string(), 0);
        let e = t.seen("d", 0, 5);
        t.seen("d", 0, 6);
        t.seen("d", 0, 7);
        for o in 5..8 {
            t.dispatched("d", 0, o, e);
        }
        t.done("d", 0, 5, e);
        t.start_revoke(&part);
        assert!(!t.is_live("d", 0, e), "batches drop what they still retry");
        t.abandoned("d", 0, 7, e);
        assert_eq!(t.in_flight(&part), 1);
        assert_eq!(t.revoke(&part), (Some(6), 1));
        // The in-flight record finishes after the partition was given up.
        assert!(!t.done("d", 0, 6, e));
        assert!(t.take_commits().is_empty(), "never committed again");

        // Assigned again: a new epoch, from the committed offset; the old
        // epoch's late outcome does not count for it.
        let e2 = t.seen("d", 0, 6);
        assert_ne!(e, e2);
        assert!(!t.done("d", 0, 6, e));
        assert!(t.take_commits().is_empty());
        assert!(t.done("d", 0, 6, e2));
        assert_eq!(t.take_commits(), vec![Position::new("d", 0, 7)]);
    }
}
