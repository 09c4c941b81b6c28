//! Per-person ordering (`ordering = true`): a person's later events wait
//! while an earlier one is out (ready or in flight), and go to the retry
//! topic behind it while an earlier one is parked there. Other people keep
//! flowing.
//!
//! [`Ordering`] only keeps the books; it answers with [`Next`] steps, and the
//! engine sends or parks the items they carry.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};

use chrono::{DateTime, Utc};

use super::offsets::Part;
use super::records::Item;
use super::send;

/// What to do with an item the books let go.
#[derive(Debug)]
pub(super) enum Next {
    /// Nothing of the person's is parked ahead of it: send it.
    Send(Item),
    /// An older event of the person's is parked, due then: park this one
    /// behind it (already counted as parked).
    Follow(Item, DateTime<Utc>),
}

/// The people with an event out and the later ones waiting behind it, and
/// the people with events parked on the retry topic.
pub(super) struct Ordering {
    retry_topic: String,
    /// People with an event in the batcher or in flight.
    out: HashMap<String, Person>,
    /// Items waiting behind an event out, over all people: they count as
    /// buffered.
    waiting: usize,
    parked: Parked,
}

/// A person with an event out and the later ones waiting behind it.
struct Person {
    /// The partition the event out was read from.
    head: Part,
    waiting: VecDeque<Item>,
}

impl Ordering {
    pub(super) fn new(retry_topic: String) -> Ordering {
        Ordering {
            retry_topic,
            out: HashMap::new(),
            waiting: 0,
            parked: Parked::default(),
        }
    }

    /// Items waiting behind a person's event out.
    pub(super) fn waiting(&self) -> usize {
        self.waiting
    }

    /// Events tracked as parked (what `max_parked` bounds).
    pub(super) fn parked_events(&self) -> usize {
        self.parked.events
    }

    /// An item cleared to go (read, or released from the retry topic's
    /// hold): `None` when it waits behind its person's event out.
    pub(super) fn admit(&mut self, item: Item) -> Option<Next> {
        let anchor = item.anchor();
        // Undecodable: nobody to keep in order.
        if anchor.is_empty() {
            return Some(Next::Send(item));
        }
        if let Some(person) = self.out.get_mut(anchor) {
            person.waiting.push_back(item);
            self.waiting += 1;
            return None;
        }
        if let Some(due) = self.must_follow(&item) {
            return Some(self.follow(item, due));
        }
        self.out.insert(
            anchor.to_string(),
            Person {
                head: (item.source.topic.clone(), item.source.partition),
                waiting: VecDeque::new(),
            },
        );
        Some(Next::Send(item))
    }

    /// An item skipped unsent (the ledger has it delivered): it releases
    /// nobody waiting behind an event in flight, but if it was parked it no
    /// longer holds anyone back.
    pub(super) fn skipped(&mut self, item: &Item) {
        self.parked.remove(item.anchor(), item.origin.offset);
    }

    /// The person's event out is parked now, due then: the ones waiting
    /// behind it follow it to the retry topic.
    pub(super) fn parked(
        &mut self,
        anchor: &str,
        origin_offset: i64,
        due: DateTime<Utc>,
        retry_partition: i32,
    ) -> Vec<Next> {
        self.parked.add(anchor, origin_offset, due, retry_partition);
        let waiting = self
            .out
            .remove(anchor)
            .map(|p| p.waiting)
            .unwrap_or_default();
        self.waiting -= waiting.len();
        waiting
            .into_iter()
            .map(|item| self.follow(item, due))
            .collect()
    }

    /// The person's event was delivered or dead-lettered.
    pub(super) fn resolved(&mut self, anchor: &str, origin_offset: i64) -> Vec<Next> {
        self.parked.remove(anchor, origin_offset);
        self.release_next(anchor)
    }

    /// Forgets what was read from partitions handed to another instance:
    /// their next owner reads it again, and tracks the people parked on
    /// their retry partitions. A person whose event out came from one of
    /// them lets the next one go.
    pub(super) fn drop_partitions(&mut self, gone: &HashSet<Part>) -> Vec<Next> {
        let retry_topic = &self.retry_topic;
        self.parked
            .forget_partitions(|p| gone.contains(&(retry_topic.clone(), p)));
        let mut release = Vec::new();
        for (anchor, person) in &mut self.out {
            let n = person.waiting.len();
            person
                .waiting
                .retain(|i| !gone.contains(&(i.source.topic.clone(), i.source.partition)));
            self.waiting -= n - person.waiting.len();
            if gone.contains(&person.head) {
                release.push(anchor.clone());
            }
        }
        release
            .into_iter()
            .flat_map(|anchor| self.release_next(&anchor))
            .collect()
    }

    /// The person's event out is resolved (or was dropped with its
    /// partition): the next one waiting goes out, unless an older one of
    /// theirs is still parked, in which case it follows that one.
    fn release_next(&mut self, anchor: &str) -> Vec<Next> {
        let mut steps = Vec::new();
        loop {
            let Some(next) = self.out.get_mut(anchor).and_then(|p| p.waiting.pop_front()) else {
                self.out.remove(anchor);
                return steps;
            };
            self.waiting -= 1;
            match self.must_follow(&next) {
                Some(due) => steps.push(self.follow(next, due)),
                None => {
                    if let Some(p) = self.out.get_mut(anchor) {
                        p.head = (next.source.topic.clone(), next.source.partition);
                    }
                    steps.push(Next::Send(next));
                    return steps;
                }
            }
        }
    }

    /// An item may go out only when none of its person's older events is
    /// parked; otherwise this is the due time to park behind them.
    /// Deliver-topic offsets order one person's events (one key, one
    /// partition).
    fn must_follow(&self, item: &Item) -> Option<DateTime<Utc>> {
        let parked = self.parked.people.get(item.anchor())?;
        let oldest = *parked.origins.first()?;
        let is_oldest = item.source.topic == self.retry_topic && item.origin.offset == oldest;
        (!is_oldest).then_some(parked.due)
    }

    /// Parks `item` behind its person's earlier parked event (same deliver
    /// partition, so the same retry partition, so read back in order).
    fn follow(&mut self, item: Item, due: DateTime<Utc>) -> Next {
        self.parked.add(
            item.anchor(),
            item.origin.offset,
            due,
            send::retry_partition(&item),
        );
        Next::Follow(item, due)
    }
}

/// The people with events on the retry topic, and how many events that is
/// (what bounds it).
#[derive(Default)]
struct Parked {
    people: HashMap<String, ParkedPerson>,
    events: usize,
}

struct ParkedPerson {
    /// Deliver-topic offsets of their parked events (oldest first).
    origins: BTreeSet<i64>,
    /// The latest due time among them.
    due: DateTime<Utc>,
    /// The retry partition holding them: their deliver partition's number,
    /// so this instance reads it back and sees them resolved.
    retry_partition: i32,
}

impl Parked {
    fn add(&mut self, anchor: &str, origin_offset: i64, due: DateTime<Utc>, retry_partition: i32) {
        let person = self
            .people
            .entry(anchor.to_string())
            .or_insert_with(|| ParkedPerson {
                origins: BTreeSet::new(),
                due,
                retry_partition,
            });
        if person.origins.insert(origin_offset) {
            self.events += 1;
        }
        person.due = person.due.max(due);
    }

    fn remove(&mut self, anchor: &str, origin_offset: i64) {
        if let Some(p) = self.people.get_mut(anchor)
            && p.origins.remove(&origin_offset)
        {
            self.events -= 1;
            if p.origins.is_empty() {
                self.people.remove(anchor);
            }
        }
    }

    /// Forgets the people whose retry partition `gone` says another instance reads now.
    fn forget_partitions(&mut self, gone: impl Fn(i32) -> bool) {
        let events = &mut self.events;
        self.people.retain(|_, p| {
            let keep = !gone(p.retry_partition);
            if !keep {
                *events -= p.origins.len();
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::Position;

    const DELIVER: &str = "deliver";
    const RETRY: &str = "retry";

    /// `person`'s event read at `offset` of deliver partition 0.
    fn read(person: &str, offset: i64) -> Item {
        let at = Position {
            topic: DELIVER.into(),
            partition: 0,
            offset,
        };
        Item::for_test(at.clone(), at, person)
    }

    /// That event read back from retry partition 0 at `offset`.
    fn read_back(person: &str, origin: i64, offset: i64) -> Item {
        let source = Position {
            topic: RETRY.into(),
            partition: 0,
            offset,
        };
        let origin = Position {
            topic: DELIVER.into(),
            partition: 0,
            offset: origin,
        };
        Item::for_test(source, origin, person)
    }

    fn due() -> DateTime<Utc> {
        "2026-11-26T15:00:00Z".parse().unwrap()
    }

    /// The deliver offsets of the steps, `+` for sent and `~` for followed.
    fn steps(next: impl IntoIterator<Item = Next>) -> Vec<String> {
        next.into_iter()
            .map(|n| match n {
                Next::Send(i) => format!("+{}", i.origin.offset),
                Next::Follow(i, _) => format!("~{}", i.origin.offset),
            })
            .collect()
    }

    #[test]
    fn a_persons_later_events_wait_until_the_one_out_is_resolved() {
        let mut o = Ordering::new(RETRY.into());
        assert_eq!(steps(o.admit(read("ann", 1))), ["+1"]);
        assert!(o.admit(read("ann", 2)).is_none());
        assert!(o.admit(read("ann", 3)).is_none());
        assert_eq!(steps(o.admit(read("bob", 4))), ["+4"], "others flow");
        assert_eq!(o.waiting(), 2);
        assert_eq!(steps(o.resolved("ann", 1)), ["+2"]);
        assert_eq!(steps(o.resolved("ann", 2)), ["+3"]);
        assert_eq!(steps(o.resolved("ann", 3)), Vec::<String>::new());
        assert_eq!(o.waiting(), 0);
        assert!(!o.out.contains_key("ann"), "a resolved person is forgotten");
        // Undecodable records have nobody to wait for.
        let mut blank = read("ann", 9);
        blank.delivery = None;
        assert_eq!(steps(o.admit(blank)), ["+9"]);
    }

    #[test]
    fn a_parked_event_takes_the_waiting_ones_and_later_reads_behind_it() {
        let mut o = Ordering::new(RETRY.into());
        o.admit(read("ann", 1));
        o.admit(read("ann", 2));
        assert_eq!(steps(o.parked("ann", 1, due(), 0)), ["~2"]);
        assert_eq!((o.waiting(), o.parked_events()), (0, 2));
        // Read later from the deliver topic: behind the parked ones.
        assert_eq!(steps(o.admit(read("ann", 3))), ["~3"]);
        assert_eq!(o.parked_events(), 3);
        // Read back, the oldest goes out; the next waits behind it.
        assert_eq!(steps(o.admit(read_back("ann", 1, 10))), ["+1"]);
        assert!(o.admit(read_back("ann", 2, 11)).is_none());
        assert_eq!(steps(o.resolved("ann", 1)), ["+2"]);
        assert_eq!(steps(o.resolved("ann", 2)), Vec::<String>::new());
        // A duplicate skipped unsent no longer holds anyone back.
        o.skipped(&read_back("ann", 3, 12));
        assert_eq!(o.parked_events(), 0);
        assert_eq!(steps(o.admit(read("ann", 4))), ["+4"]);
    }

    #[test]
    fn a_released_event_still_behind_a_parked_one_follows_it() {
        let mut o = Ordering::new(RETRY.into());
        o.admit(read("ann", 1));
        o.admit(read("ann", 2));
        o.parked("ann", 1, due(), 0);
        // The oldest parked one is read back and goes out; event 3, read
        // meanwhile, waits behind it.
        assert_eq!(steps(o.admit(read_back("ann", 1, 10))), ["+1"]);
        assert!(o.admit(read("ann", 3)).is_none());
        assert_eq!(
            steps(o.resolved("ann", 1)),
            ["~3"],
            "2 is still parked ahead of it"
        );
        assert_eq!((o.waiting(), o.parked_events()), (0, 2));
    }

    #[test]
    fn handed_over_partitions_drop_their_waiting_items_and_parked_people() {
        let mut o = Ordering::new(RETRY.into());
        o.admit(read("ann", 1));
        o.admit(read("ann", 2));
        o.parked("bob", 5, due(), 0);
        o.parked("cay", 6, due(), 1);
        let gone = HashSet::from([(DELIVER.to_string(), 0), (RETRY.to_string(), 0)]);
        assert_eq!(steps(o.drop_partitions(&gone)), Vec::<String>::new());
        assert_eq!(o.waiting(), 0);
        assert!(o.out.is_empty(), "ann's head went with the partition");
        assert_eq!(o.parked_events(), 1, "only cay's retry partition stays");
    }
}
