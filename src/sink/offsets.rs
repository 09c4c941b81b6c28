//! Which offsets may be committed: per partition, everything below the
//! lowest offset whose outcome is not yet durable.

use std::collections::{BTreeSet, HashMap};

#[derive(Default)]
struct Track {
    pending: BTreeSet<i64>,
    /// One past the highest offset seen.
    next: i64,
    committed: i64,
}

#[derive(Default)]
pub struct OffsetTracker {
    parts: HashMap<(String, i32), Track>,
}

impl OffsetTracker {
    /// A record was read and its outcome is not durable yet.
    pub fn seen(&mut self, topic: &str, partition: i32, offset: i64) {
        let t = self
            .parts
            .entry((topic.to_string(), partition))
            .or_insert_with(|| Track {
                committed: offset,
                ..Track::default()
            });
        t.pending.insert(offset);
        t.next = t.next.max(offset + 1);
    }

    /// The record's outcome is durable.
    pub fn done(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(t) = self.parts.get_mut(&(topic.to_string(), partition)) {
            t.pending.remove(&offset);
        }
    }

    /// Offsets to commit (the next offset to read, Kafka style) that moved
    /// since the last call.
    pub fn take_commits(&mut self) -> Vec<(String, i32, i64)> {
        let mut out = Vec::new();
        for ((topic, partition), t) in &mut self.parts {
            let point = t.pending.first().copied().unwrap_or(t.next);
            if point > t.committed {
                t.committed = point;
                out.push((topic.clone(), *partition, point));
            }
        }
        out
    }

    /// Records read whose outcome is not durable yet.
    pub fn pending(&self) -> usize {
        self.parts.values().map(|t| t.pending.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_the_contiguous_prefix() {
        let mut t = OffsetTracker::default();
        for o in 10..15 {
            t.seen("d", 0, o);
        }
        assert!(t.take_commits().is_empty());
        t.done("d", 0, 11);
        t.done("d", 0, 12);
        assert!(t.take_commits().is_empty(), "10 is still open");
        t.done("d", 0, 10);
        assert_eq!(t.take_commits(), vec![("d".to_string(), 0, 13)]);
        assert!(t.take_commits().is_empty(), "nothing moved");
        t.done("d", 0, 14);
        t.done("d", 0, 13);
        assert_eq!(t.take_commits(), vec![("d".to_string(), 0, 15)]);
        assert_eq!(t.pending(), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::default();
        t.seen("d", 0, 0);
        t.seen("d", 1, 7);
        t.done("d", 1, 7);
        assert_eq!(t.take_commits(), vec![("d".to_string(), 1, 8)]);
        assert_eq!(t.pending(), 1);
    }
}
