//! Reading the retry topic back. A parked record read before it is due
//! never holds up the ones behind it: due within the horizon (`park_after`)
//! it waits in memory, due later it is written back to the end of its
//! partition. A lap ends when reading comes round to the records written
//! back; the partition then pauses until the earliest of them nears.
//!
//! [`Laps`] keeps the books per retry partition; the engine pauses and
//! resumes the consumer and writes the requeued records as they say.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::offsets::Part;
use super::records::{Final, Item};

/// See [`lap_pause`].
const LAP_MARGIN: Duration = Duration::from_millis(100);

/// What reading one retry record asks of the engine.
#[derive(Debug)]
pub(super) struct ReadBack {
    /// Due: admit it now.
    pub due_now: Option<Item>,
    /// Pause the record's partition (a lap ended, or it holds all it may).
    pub pause: bool,
}

/// What [`Laps::release_due`] lets go.
#[derive(Debug, Default)]
pub(super) struct Released {
    /// Held records that are due now.
    pub items: Vec<Item>,
    /// Partitions that no longer wait on their own.
    pub resume: Vec<i32>,
}

pub(super) struct Laps {
    retry_topic: String,
    /// Records due within it wait in memory; `park_after`.
    horizon: Duration,
    /// The most not-yet-due records held per partition.
    hold_max: usize,
    partitions: BTreeMap<i32, RetryPartition>,
    /// Records to write back to the end of their partition.
    requeue: Vec<(Item, Final)>,
}

#[derive(Default)]
struct RetryPartition {
    /// Records due within the horizon, earliest first.
    not_due: BinaryHeap<Reverse<NotDue>>,
    /// Paused until then: reading came round to records requeued this lap.
    lap_pause: Option<Instant>,
    /// Paused because `not_due` is full.
    full: bool,
    /// When this lap's first record was requeued; reading a record requeued
    /// since then means the lap is complete.
    lap_started: Option<DateTime<Utc>>,
    /// The earliest due among the records requeued this lap.
    lap_min_due: Option<DateTime<Utc>>,
}

impl RetryPartition {
    fn is_paused(&self) -> bool {
        self.full || self.lap_pause.is_some()
    }
}

/// A retry record held in memory until due, ordered by due time, then offset.
struct NotDue(Item);

impl NotDue {
    fn key(&self) -> (Option<DateTime<Utc>>, i64) {
        (self.0.due, self.0.source.offset)
    }
}

impl PartialEq for NotDue {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for NotDue {}

impl PartialOrd for NotDue {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for NotDue {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl Laps {
    pub(super) fn new(retry_topic: String, horizon: Duration, hold_max: usize) -> Laps {
        Laps {
            retry_topic,
            horizon,
            hold_max,
            partitions: BTreeMap::new(),
            requeue: Vec::new(),
        }
    }

    /// Records held until due, over all partitions.
    pub(super) fn not_due(&self) -> usize {
        self.partitions.values().map(|r| r.not_due.len()).sum()
    }

    /// Records held or waiting to be written back: they count as buffered.
    pub(super) fn buffered(&self) -> usize {
        self.not_due() + self.requeue.len()
    }

    /// The partition waits on its own (a lap pause, or full).
    pub(super) fn is_paused(&self, partition: i32) -> bool {
        self.partitions
            .get(&partition)
            .is_some_and(RetryPartition::is_paused)
    }

    /// When [`Laps::release_due`] has something to do next.
    pub(super) fn next_wake(&self) -> Option<Instant> {
        self.partitions
            .values()
            .flat_map(|r| {
                let due = r.not_due.peek().and_then(|h| h.0.0.due).map(instant_at);
                [due, r.lap_pause]
            })
            .flatten()
            .min()
    }

    /// A record just read from the retry topic at `now`.
    pub(super) fn read(&mut self, item: Item, now: DateTime<Utc>) -> ReadBack {
        let rp = self.partitions.entry(item.source.partition).or_default();
        let mut pause = false;
        let lap_done = matches!((rp.lap_started, item.requeued_at), (Some(started), Some(at)) if at >= started);
        if lap_done {
            // Came round to records this lap wrote back: the rest of the
            // partition is not due soon; read on once the earliest nears.
            if let Some(wait) = lap_pause(rp.lap_min_due, now, self.horizon) {
                pause = rp.lap_pause.is_none() && !rp.full;
                rp.lap_pause = Some(Instant::now() + wait);
            }
            rp.lap_started = None;
            rp.lap_min_due = None;
        }
        let mut due_now = None;
        match retry_step(item.due, now, self.horizon) {
            RetryStep::Now => due_now = Some(item),
            RetryStep::Hold => {
                rp.not_due.push(Reverse(NotDue(item)));
                if rp.not_due.len() >= self.hold_max && !rp.full {
                    pause |= rp.lap_pause.is_none();
                    rp.full = true;
                }
            }
            RetryStep::Requeue(due) => {
                // The record that ended a lap does not start the next one:
                // its copy lands before anything parked during the pause,
                // and reading it must not end the next lap at once.
                if !lap_done {
                    rp.lap_started.get_or_insert(now);
                    rp.lap_min_due = Some(rp.lap_min_due.map_or(due, |m| m.min(due)));
                }
                let reason = item.reason.clone().unwrap_or_default();
                self.requeue.push((
                    item,
                    Final::Requeued {
                        due,
                        reason,
                        at: now,
                    },
                ));
            }
        }
        ReadBack { due_now, pause }
    }

    /// The records to write back now (taken: the engine writes them).
    pub(super) fn take_requeued(&mut self) -> Vec<(Item, Final)> {
        std::mem::take(&mut self.requeue)
    }

    /// Lets go of the held records due at `now`, and ends the pauses that
    /// are over: a lap pause at its time, a full partition once half of
    /// what it may hold is gone.
    pub(super) fn release_due(&mut self, now: DateTime<Utc>) -> Released {
        let now_i = Instant::now();
        let mut out = Released::default();
        for (p, rp) in &mut self.partitions {
            while rp
                .not_due
                .peek()
                .is_some_and(|h| h.0.0.due.is_none_or(|d| d <= now))
            {
                out.items.extend(rp.not_due.pop().map(|h| h.0.0));
            }
            let was_paused = rp.is_paused();
            if rp.lap_pause.is_some_and(|t| t <= now_i) {
                rp.lap_pause = None;
            }
            if rp.full && rp.not_due.len() < self.hold_max / 2 {
                rp.full = false;
            }
            if was_paused && !rp.is_paused() {
                out.resume.push(*p);
            }
        }
        out
    }

    /// This instance just parked a record due at `due` on a retry partition
    /// that waits out a lap: read on in time for it.
    pub(super) fn wake_for(&mut self, partition: i32, due: DateTime<Utc>) {
        let horizon = chrono::Duration::from_std(self.horizon).unwrap_or(chrono::Duration::MAX);
        if let Some(rp) = self.partitions.get_mut(&partition)
            && let Some(resume) = rp.lap_pause
        {
            rp.lap_pause = Some(resume.min(instant_at(due - horizon)));
        }
    }

    /// Forgets what was read from retry partitions handed to another
    /// instance: it was never sent, and their next owner reads it again.
    pub(super) fn drop_partitions(&mut self, gone: &HashSet<Part>) {
        let retry_topic = &self.retry_topic;
        self.partitions
            .retain(|p, _| !gone.contains(&(retry_topic.clone(), *p)));
        self.requeue
            .retain(|(i, _)| !gone.contains(&(i.source.topic.clone(), i.source.partition)));
    }
}

/// What to do with a retry record just read.
enum RetryStep {
    Now,
    Hold,
    Requeue(DateTime<Utc>),
}

/// The step for a retry record due at `due`, read at `now`: due ones go
/// now, those due within `horizon` wait in memory, the rest go back to the
/// end of the partition so they hold up neither nearer records nor commits.
fn retry_step(due: Option<DateTime<Utc>>, now: DateTime<Utc>, horizon: Duration) -> RetryStep {
    let horizon = chrono::Duration::from_std(horizon).unwrap_or(chrono::Duration::MAX);
    match due {
        Some(d) if d > now + horizon => RetryStep::Requeue(d),
        Some(d) if d > now => RetryStep::Hold,
        _ => RetryStep::Now,
    }
}

/// How long to pause a retry partition once reading came round to records
/// requeued this lap: until the earliest of them is within `horizon`, but at
/// most `horizon`, so a record parked meanwhile (by any instance) is read at
/// most `horizon` after it is due, and each far-off record is rewritten
/// about once per `horizon` while it waits (the one ending a lap twice).
fn lap_pause(
    min_due: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    horizon: Duration,
) -> Option<Duration> {
    let until = min_due? - chrono::Duration::from_std(horizon).ok()?;
    let pause = (until - now).to_std().ok()?;
    // A little past the point, so the record read then is within the
    // horizon and held rather than written back once more.
    (!pause.is_zero()).then(|| (pause + LAP_MARGIN).min(horizon))
}

/// The monotonic time of a wall-clock due time. A due time read from a
/// record header may be anything; one beyond a year (far past any retry
/// budget) counts as a year rather than overflowing.
fn instant_at(at: DateTime<Utc>) -> Instant {
    const YEAR: Duration = Duration::from_secs(365 * 86_400);
    let wait = (at - Utc::now()).to_std().unwrap_or_default().min(YEAR);
    Instant::now() + wait
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::Position;

    const H: Duration = Duration::from_secs(30);

    /// A record read from retry partition 0 at `offset`, due `due_s`
    /// seconds after `now`.
    fn parked(offset: i64, now: DateTime<Utc>, due_s: i64) -> Item {
        let source = Position {
            topic: "retry".into(),
            partition: 0,
            offset,
        };
        let mut i = Item::for_test(source.clone(), source, "ann");
        i.due = Some(now + chrono::Duration::seconds(due_s));
        i
    }

    #[test]
    fn retry_records_go_now_wait_in_memory_or_go_back_to_the_end() {
        let now = Utc::now();
        let h = Duration::from_secs(30);
        let at = |s: i64| Some(now + chrono::Duration::seconds(s));
        assert!(matches!(retry_step(None, now, h), RetryStep::Now));
        assert!(matches!(retry_step(at(-5), now, h), RetryStep::Now));
        assert!(matches!(retry_step(at(0), now, h), RetryStep::Now));
        assert!(matches!(retry_step(at(10), now, h), RetryStep::Hold));
        assert!(matches!(retry_step(at(30), now, h), RetryStep::Hold));
        assert!(matches!(retry_step(at(31), now, h), RetryStep::Requeue(d) if Some(d) == at(31)));
    }

    #[test]
    fn a_complete_lap_pauses_until_the_earliest_nears_within_bounds() {
        let now = Utc::now();
        let h = Duration::from_secs(30);
        let at = |s: i64| Some(now + chrono::Duration::seconds(s));
        assert_eq!(lap_pause(None, now, h), None);
        // Due in 50 s: read on 30 s before, in 20 s (and a margin).
        assert_eq!(
            lap_pause(at(50), now, h),
            Some(Duration::from_secs(20) + LAP_MARGIN)
        );
        // Already within the horizon: no pause.
        assert_eq!(lap_pause(at(20), now, h), None);
        // Far off: at most one horizon, so records parked meanwhile are not
        // read more than that late.
        assert_eq!(lap_pause(at(3600), now, h), Some(h));
    }

    #[test]
    fn held_records_come_out_by_due_time_then_offset() {
        let item = |offset: i64, due_s: i64| {
            let source = Position {
                topic: "r".into(),
                partition: 0,
                offset,
            };
            let mut i = Item::for_test(source.clone(), source, "ann");
            i.due = DateTime::from_timestamp(due_s, 0);
            Reverse(NotDue(i))
        };
        let mut heap = BinaryHeap::new();
        heap.extend([item(1, 50), item(2, 10), item(3, 50), item(4, 30)]);
        let order: Vec<i64> =
            std::iter::from_fn(|| heap.pop().map(|h| h.0.0.source.offset)).collect();
        assert_eq!(order, [2, 4, 1, 3]);
    }

    #[test]
    fn due_records_go_near_ones_are_held_and_far_ones_requeued() {
        let now = Utc::now();
        let mut laps = Laps::new("retry".into(), H, 16);
        let read = laps.read(parked(1, now, -1), now);
        assert!(read.due_now.is_some() && !read.pause);
        let read = laps.read(parked(2, now, 10), now);
        assert!(read.due_now.is_none() && !read.pause);
        let read = laps.read(parked(3, now, 3600), now);
        assert!(read.due_now.is_none() && !read.pause);
        assert_eq!((laps.not_due(), laps.buffered()), (1, 2));
        let requeued = laps.take_requeued();
        assert!(matches!(
            requeued.as_slice(),
            [(i, Final::Requeued { at, .. })] if i.source.offset == 3 && *at == now
        ));
        assert!(laps.next_wake().is_some(), "wakes for the held record");
        // Ten seconds on, the held record is due.
        let later = laps.release_due(now + chrono::Duration::seconds(10));
        assert_eq!(later.items.len(), 1);
        assert!(later.resume.is_empty());
        assert_eq!(laps.buffered(), 0);
    }

    #[test]
    fn reading_round_to_a_requeued_record_ends_the_lap_with_a_pause() {
        let now = Utc::now();
        let mut laps = Laps::new("retry".into(), H, 16);
        laps.read(parked(1, now, 3600), now);
        laps.take_requeued();
        assert!(!laps.is_paused(0));
        // Its copy, written back at `now`, is read again.
        let mut copy = parked(9, now, 3600);
        copy.requeued_at = Some(now);
        let read = laps.read(copy, now);
        assert!(read.pause, "the lap is complete");
        assert!(laps.is_paused(0));
        // The copy that ended the lap is written back again, but starts no lap.
        assert_eq!(laps.take_requeued().len(), 1);
        assert!(laps.partitions[&0].lap_started.is_none());
        // Parked meanwhile, due soon: the pause ends in time for it.
        let before = laps.partitions[&0].lap_pause.unwrap();
        laps.wake_for(0, now + H + chrono::Duration::seconds(1));
        assert!(laps.partitions[&0].lap_pause.unwrap() < before);
        // Once the pause is over the partition resumes.
        laps.partitions.get_mut(&0).unwrap().lap_pause = Some(Instant::now());
        assert_eq!(laps.release_due(Utc::now()).resume, [0]);
        assert!(!laps.is_paused(0));
    }

    #[test]
    fn a_partition_holding_its_most_pauses_until_half_is_gone() {
        let now = Utc::now();
        let mut laps = Laps::new("retry".into(), H, 4);
        let pauses: Vec<bool> = (0..4)
            .map(|o| laps.read(parked(o, now, 5 + o), now).pause)
            .collect();
        assert_eq!(pauses, [false, false, false, true]);
        assert!(laps.is_paused(0));
        // Two due: half is not gone yet (2 of 4 held is not below 2).
        let r = laps.release_due(now + chrono::Duration::seconds(6));
        assert_eq!((r.items.len(), r.resume.len()), (2, 0));
        let r = laps.release_due(now + chrono::Duration::seconds(7));
        assert_eq!((r.items.len(), r.resume.as_slice()), (1, &[0][..]));
    }

    #[test]
    fn handed_over_retry_partitions_are_forgotten() {
        let now = Utc::now();
        let mut laps = Laps::new("retry".into(), H, 16);
        laps.read(parked(1, now, 10), now);
        laps.read(parked(2, now, 3600), now);
        laps.drop_partitions(&HashSet::from([("deliver".to_string(), 0)]));
        assert_eq!(laps.buffered(), 2, "another topic's partition");
        laps.drop_partitions(&HashSet::from([("retry".to_string(), 0)]));
        assert_eq!(laps.buffered(), 0);
    }
}
