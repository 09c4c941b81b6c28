//! Batching and commits: items cleared to send gather until a batch is full
//! (the tighter of the config's and the vendor's limits) or has lingered;
//! the offsets whose outcomes are durable are committed from
//! [`super::handover::Ownership`].

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};
use tokio::time::Instant;

use super::destination::Limits;
use super::offsets::Part;
use super::records::Item;
use crate::kafka::Position;

/// How often durable progress is committed.
pub(super) const COMMIT_INTERVAL: Duration = Duration::from_millis(500);

pub(super) struct Batcher {
    limits: Limits,
    linger: Duration,
    ready: VecDeque<Item>,
    bytes: usize,
    /// When the oldest item in `ready` arrived (the linger clock).
    since: Option<Instant>,
}

impl Batcher {
    pub(super) fn new(limits: Limits, linger: Duration) -> Batcher {
        Batcher {
            limits,
            linger,
            ready: VecDeque::new(),
            bytes: 0,
            since: None,
        }
    }

    pub(super) fn push(&mut self, item: Item) {
        self.bytes += item.raw.len();
        self.since.get_or_insert_with(Instant::now);
        self.ready.push_back(item);
    }

    pub(super) fn len(&self) -> usize {
        self.ready.len()
    }

    /// When the items waiting have lingered long enough to go.
    pub(super) fn linger_until(&self) -> Option<Instant> {
        self.since.map(|t| t + self.linger)
    }

    /// A batch is full, or the oldest item has lingered enough.
    pub(super) fn is_ready(&self) -> bool {
        let Some(since) = self.since else {
            return false;
        };
        self.ready.len() >= self.limits.max_events
            || self.bytes >= self.limits.max_bytes
            || since.elapsed() >= self.linger
    }

    /// The next batch, oldest first, within the limits (one item always
    /// goes, however big: the vendor's answer decides about it). The linger
    /// clock restarts for what stays.
    pub(super) fn take(&mut self) -> Vec<Item> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(next) = self.ready.front() {
            let fits = batch.len() < self.limits.max_events
                && bytes + next.raw.len() <= self.limits.max_bytes;
            if !batch.is_empty() && !fits {
                break;
            }
            bytes += next.raw.len();
            batch.extend(self.ready.pop_front());
        }
        self.bytes -= bytes;
        self.since = if self.ready.is_empty() {
            None
        } else {
            Some(Instant::now())
        };
        batch
    }

    /// Drops the items read from partitions handed to another instance.
    pub(super) fn drop_partitions(&mut self, gone: &HashSet<Part>) {
        self.ready
            .retain(|i| !gone.contains(&(i.source.topic.clone(), i.source.partition)));
        self.bytes = self.ready.iter().map(|i| i.raw.len()).sum();
        if self.ready.is_empty() {
            self.since = None;
        }
    }
}

/// Commits `commits` (the next offset to read of each partition); a bad
/// entry is logged and left out.
pub(super) fn commit<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    commits: &[Position],
    mode: CommitMode,
) -> KafkaResult<()> {
    let mut tpl = TopicPartitionList::new();
    for at in commits {
        if let Err(e) = tpl.add_partition_offset(&at.topic, at.partition, Offset::Offset(at.offset))
        {
            tracing::warn!(error = %e, "bad commit offset");
        }
    }
    consumer.commit(&tpl, mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(offset: i64, bytes: usize) -> Item {
        let at = Position {
            topic: "deliver".into(),
            partition: 0,
            offset,
        };
        let mut i = Item::for_test(at.clone(), at, "ann");
        i.raw = vec![b'x'; bytes];
        i
    }

    fn limits(max_events: usize, max_bytes: usize) -> Limits {
        Limits {
            max_events,
            max_bytes,
            max_event_age: None,
        }
    }

    fn offsets(batch: &[Item]) -> Vec<i64> {
        batch.iter().map(|i| i.source.offset).collect()
    }

    #[test]
    fn a_batch_goes_when_full_by_count_or_bytes() {
        let mut b = Batcher::new(limits(3, 100), Duration::from_secs(60));
        assert!(!b.is_ready(), "nothing to send");
        b.push(item(0, 10));
        b.push(item(1, 10));
        assert!(!b.is_ready());
        b.push(item(2, 10));
        b.push(item(3, 10));
        assert!(b.is_ready(), "count");
        assert_eq!(offsets(&b.take()), [0, 1, 2]);
        assert_eq!(b.len(), 1);
        assert!(!b.is_ready(), "the rest waits");
        b.push(item(4, 95));
        assert!(b.is_ready(), "bytes");
        assert_eq!(offsets(&b.take()), [3], "105 bytes would not fit");
        assert_eq!(offsets(&b.take()), [4]);
        assert_eq!((b.len(), b.linger_until()), (0, None));
    }

    #[test]
    fn an_item_over_the_byte_limit_goes_alone() {
        let mut b = Batcher::new(limits(10, 100), Duration::from_secs(60));
        b.push(item(0, 500));
        b.push(item(1, 5));
        assert_eq!(offsets(&b.take()), [0]);
        assert_eq!(offsets(&b.take()), [1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_goes_once_its_oldest_item_lingered() {
        let linger = Duration::from_millis(100);
        let mut b = Batcher::new(limits(10, 1000), linger);
        b.push(item(0, 1));
        let until = b.linger_until().unwrap();
        tokio::time::advance(Duration::from_millis(60)).await;
        b.push(item(1, 1));
        assert_eq!(b.linger_until(), Some(until), "the oldest item's clock");
        assert!(!b.is_ready());
        tokio::time::advance(Duration::from_millis(40)).await;
        assert!(b.is_ready());
    }

    #[test]
    fn handed_over_partitions_leave_the_batcher() {
        let mut b = Batcher::new(limits(10, 1000), Duration::from_secs(60));
        b.push(item(0, 7));
        b.drop_partitions(&HashSet::from([("deliver".to_string(), 1)]));
        assert_eq!(b.len(), 1);
        b.drop_partitions(&HashSet::from([("deliver".to_string(), 0)]));
        assert_eq!((b.len(), b.linger_until()), (0, None));
        assert!(!b.is_ready());
    }
}
