//! The router's step chain over one record, free of I/O: decode + validate →
//! key check → dedup → identity → consent + route. Everything it wants
//! written goes into a [`Batch`]; dedup marks stay staged until the batch's
//! writes are durable, so an aborted batch leaves no trace in memory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::BuildHasher;
use std::ops::Range;
use std::sync::Arc;

use chrono::Utc;

use super::dedup::{self, ChunkId, DedupKey, PartitionDedup};
use super::identity::{IdKey, IdentityTable, PhoneHasher, Profile, Resolved};
use super::route::{self, DeliveryWriter, Skip, Stamp};
use crate::config::Config;
use crate::delivery::dead_letter::{header, stage};
use crate::event::{CanonicalEvent, DroppedHint, InvalidEvent, parse_event};
use crate::kafka::partitioner::partition_for;

/// One consumed record, borrowed from the consumer.
#[derive(Debug, Clone, Copy)]
pub struct InRecord<'a> {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub timestamp_ms: Option<i64>,
}

/// One record to produce; its key and payload live in the batch's buffer.
#[derive(Debug, Clone)]
struct OutRecord {
    /// Shared: one allocation per topic, not per record.
    topic: Arc<str>,
    partition: Option<i32>,
    key: Option<Range<usize>>,
    /// `None` is a tombstone.
    payload: Option<Range<usize>>,
    headers: Vec<(&'static str, String)>,
}

/// One record to produce, as the producer takes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Out<'a> {
    pub topic: &'a str,
    /// Set for state that must be co-partitioned with the input.
    pub partition: Option<i32>,
    pub key: Option<&'a [u8]>,
    /// `None` is a tombstone.
    pub payload: Option<&'a [u8]>,
    pub headers: &'a [(&'static str, String)],
}

/// What happened to one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Invalid {
        class: &'static str,
    },
    /// Not on its event_id's partition: re-published there, keyed by it.
    Rerouted(Reroute),
    Duplicate,
    /// Routed to this many destinations (possibly none).
    Routed {
        destinations: usize,
    },
}

impl Outcome {
    #[cfg(test)]
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Invalid { .. } => "invalid",
            Outcome::Rerouted(_) => "rerouted",
            Outcome::Duplicate => "duplicate",
            Outcome::Routed { .. } => "routed",
        }
    }
}

/// What a replay did with an event for one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    Routed,
    /// Consent, allowlist or mapping: as live routing would skip it.
    Skipped(Skip),
    /// The delivery ledger shows it delivered there.
    AlreadyDelivered,
    /// Too large to produce (dead-lettered when it was routed live).
    Oversize,
}

/// Why a replay passes over a record for every destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReplayed {
    /// Dead-lettered when it was routed live.
    Invalid,
    /// Another copy of its event_id came earlier in the replay.
    Duplicate,
    /// Not on its event_id's partition: the router moved it, and the moved
    /// copy is the one replayed.
    Moved,
}

/// Why a record was re-published to its event_id's partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reroute {
    /// Keyed by something other than its event_id (or by nothing).
    WrongKey,
    /// Keyed by its event_id, but the publisher's partitioner is not
    /// murmur2 (librdkafka's default is CRC32, sarama's FNV-1a).
    WrongPartition,
}

impl Reroute {
    pub const ALL: [Reroute; 2] = [Reroute::WrongKey, Reroute::WrongPartition];

    pub fn as_str(self) -> &'static str {
        match self {
            Reroute::WrongKey => "wrong_key",
            Reroute::WrongPartition => "wrong_partition",
        }
    }
}

/// Marks of an earlier input layout, read from one partition of its dedup
/// topic: consulted for every event until they leave the window.
#[derive(Debug)]
struct Carried {
    topic: Arc<str>,
    partition: i32,
    state: PartitionDedup,
}

/// (input partition, chunk id, its keys with their first-seen seconds)
type SealedChunk = (i32, ChunkId, Vec<(DedupKey, u32)>);

/// Everything one batch of input records produces. Reuse one with `clear`:
/// its buffers keep their capacity, so a steady stream of batches stops
/// allocating (and faulting in fresh pages) after the first few.
#[derive(Debug, Default)]
pub struct Batch {
    out: Vec<OutRecord>,
    /// Keys and payloads of `out`, back to back.
    buf: Vec<u8>,
    staged: foldhash::HashSet<(i32, DedupKey)>,
    staged_order: Vec<(i32, DedupKey, u32)>,
    /// The dedup chunks `seal` wrote into `out`, made live by `commit`.
    chunks: Vec<SealedChunk>,
    /// Identity updates as (key, payload) in `buf`, one per profile in
    /// first-seen order, holding its last state: `seal` writes them, so a
    /// person with five events in a batch costs one record, not five.
    identity: Vec<(Range<usize>, Range<usize>)>,
    /// Index into `identity` by key.
    identity_index: hashbrown::HashTable<usize>,
    /// Per input partition: first and last offset in this batch.
    pub offsets: BTreeMap<i32, (i64, i64)>,
    pub outcomes: Vec<Outcome>,
    /// Per enabled destination, in config order: events routed to it.
    pub routed: Vec<u64>,
    /// Per enabled destination: events withheld for want of consent.
    pub denied: Vec<u64>,
    /// The field of every identity hint dropped from a routed event.
    pub hints_dropped: Vec<&'static str>,
    /// Deliveries dead-lettered because they would not fit in a record.
    pub oversize_deliveries: u64,
    /// Dedup chunks tombstoned by this batch, unlisted on commit: per input
    /// partition, and per earlier layout's (topic, partition).
    expired: Vec<(i32, Vec<ChunkId>)>,
    expired_carried: Vec<(Arc<str>, i32, Vec<ChunkId>)>,
    /// When this batch was routed, as a JSON string; empty until needed.
    routed_at: Vec<u8>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty() && self.out.is_empty()
    }

    /// Empties the batch for reuse, keeping its allocations.
    pub fn clear(&mut self) {
        self.out.clear();
        self.buf.clear();
        self.staged.clear();
        self.staged_order.clear();
        self.chunks.clear();
        self.identity.clear();
        self.identity_index.clear();
        self.offsets.clear();
        self.outcomes.clear();
        self.routed.clear();
        self.denied.clear();
        self.hints_dropped.clear();
        self.oversize_deliveries = 0;
        self.expired.clear();
        self.expired_carried.clear();
        self.routed_at.clear();
    }

    /// The records to produce, in order.
    pub fn records(&self) -> impl Iterator<Item = Out<'_>> {
        self.records_from(0)
    }

    /// The records from the `start`-th on, in order: what `process` added
    /// since the batch had `start` records.
    pub fn records_from(&self, start: usize) -> impl Iterator<Item = Out<'_>> {
        let at = |r: &Option<Range<usize>>| r.clone().map(|r| &self.buf[r]);
        self.out[start.min(self.out.len())..]
            .iter()
            .map(move |o| Out {
                topic: &o.topic,
                partition: o.partition,
                key: at(&o.key),
                payload: at(&o.payload),
                headers: &o.headers,
            })
    }

    pub fn len(&self) -> usize {
        self.out.len()
    }

    fn track(&mut self, partition: i32, offset: i64) {
        self.offsets
            .entry(partition)
            .and_modify(|(_, last)| *last = offset)
            .or_insert((offset, offset));
    }

    fn bytes(&mut self, b: &[u8]) -> Range<usize> {
        self.written(|buf| buf.extend_from_slice(b))
    }

    fn written(&mut self, write: impl FnOnce(&mut Vec<u8>)) -> Range<usize> {
        let start = self.buf.len();
        write(&mut self.buf);
        start..self.buf.len()
    }

    fn push(
        &mut self,
        topic: &Arc<str>,
        partition: Option<i32>,
        key: Option<Range<usize>>,
        payload: Option<Range<usize>>,
        headers: Vec<(&'static str, String)>,
    ) {
        self.out.push(OutRecord {
            topic: topic.clone(),
            partition,
            key,
            payload,
            headers,
        });
    }

    /// Stages `profile` as the identity record for `key`, replacing one
    /// staged earlier in the batch.
    fn stage_identity(&mut self, id: IdKey<'_>, profile: &Profile) {
        let key = self.written(|b| {
            b.extend_from_slice(id.prefix.as_bytes());
            b.extend_from_slice(id.id.as_bytes());
        });
        let Batch {
            buf,
            identity,
            identity_index,
            ..
        } = self;
        let hash = |k: &[u8]| foldhash::quality::FixedState::default().hash_one(k);
        let h = hash(&buf[key.clone()]);
        let known = identity_index
            .find(h, |&i| buf[identity[i].0.clone()] == buf[key.clone()])
            .copied();
        let slot = match known {
            Some(i) => {
                // The key bytes just written are not needed again.
                buf.truncate(key.start);
                i
            }
            None => {
                identity_index
                    .insert_unique(h, identity.len(), |&i| hash(&buf[identity[i].0.clone()]));
                identity.push((key, 0..0));
                identity.len() - 1
            }
        };
        let payload =
            self.written(|b| serde_json::to_writer(b, profile).expect("serialising to memory"));
        self.identity[slot].1 = payload;
    }

    fn count(counts: &mut Vec<u64>, index: usize) {
        if counts.len() <= index {
            counts.resize(index + 1, 0);
        }
        counts[index] += 1;
    }
}

/// Topic names, built once (the dedup topic again when the layout changes).
struct Topics {
    canonical: Arc<str>,
    /// The current layout's dedup topic.
    dedup: Arc<str>,
    identity: Arc<str>,
    dlq: Arc<str>,
    /// Per enabled destination, in config order.
    deliver: Vec<Arc<str>>,
}

pub struct Pipeline {
    config: Arc<Config>,
    /// The largest delivery produced (`RouterConfig::routed_record_bytes`).
    delivery_limit: usize,
    /// Identity records of batches that failed, as (key, payload): the
    /// table learnt them already, so the batch's retry would not write them
    /// again; the next batch does.
    unwritten_identity: Vec<(Vec<u8>, Vec<u8>)>,
    topics: Topics,
    phones: PhoneHasher,
    window_secs: u32,
    /// The input topic's partition count: an event_id's partition is
    /// `partition_for(event_id, partitions)`.
    partitions: i32,
    dedup: HashMap<i32, PartitionDedup>,
    /// Marks of earlier layouts (see `kafka::topics::dedup_topics`).
    carried: Vec<Carried>,
    identity: IdentityTable,
    writer: DeliveryWriter,
    /// Sources of public ingest keys (`ingest.keys[].trust = "client"`).
    client_sources: HashSet<Box<str>>,
}

/// How far ahead of its receive time an event's own date is believed when
/// it orders identity facts (clocks of devices and servers drift).
const FUTURE_SKEW_SECS: i64 = 300;
/// How much of an oversize record's payload the dead letter keeps: brokers
/// refuse records above their message size limit, so the whole of a 10 MB
/// record cannot be written anywhere.
const OVERSIZE_KEEP: usize = 64 * 1024;

/// A record's size as the producer counts it against `message.max.bytes`:
/// key, value and headers, and generously their framing (varint lengths,
/// timestamps, attributes).
fn wire_size(key: usize, payload: usize, headers: &[(&'static str, String)]) -> usize {
    const RECORD_FRAMING: usize = 64;
    const HEADER_FRAMING: usize = 10;
    key + payload
        + RECORD_FRAMING
        + headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + HEADER_FRAMING)
            .sum::<usize>()
}
const REASON_MAX: usize = 4096;

impl Pipeline {
    pub fn new(config: Arc<Config>) -> Pipeline {
        crate::event::normalize::warm_up();
        let t = &config.topics;
        let topics = Topics {
            canonical: t.canonical.as_str().into(),
            dedup: t.dedup().into(),
            identity: t.identity().into(),
            dlq: t.dlq().into(),
            deliver: config
                .enabled_destinations()
                .map(|d| t.deliver(&d.name).into())
                .collect(),
        };
        Pipeline {
            topics,
            phones: PhoneHasher::new(config.identity.phone_country()),
            window_secs: u32::try_from(config.router.dedup_window.as_secs()).unwrap_or(u32::MAX),
            writer: DeliveryWriter::new(&t.canonical, config.enabled_destinations()),
            partitions: config.topics.partitions,
            dedup: HashMap::new(),
            carried: Vec::new(),
            identity: IdentityTable::default(),
            delivery_limit: config.router.routed_record_bytes(),
            unwritten_identity: Vec::new(),
            client_sources: config.ingest.client_sources(),
            config,
        }
    }

    /// The input's partition count and the dedup topic of that layout.
    /// Partition state of another layout is dropped (it is restored again
    /// from the new topic); marks of earlier layouts are `carry`'d in.
    pub fn set_layout(&mut self, partitions: i32, dedup_topic: &str) {
        if partitions != self.partitions || *self.topics.dedup != *dedup_topic {
            self.dedup.clear();
        }
        self.partitions = partitions;
        self.topics.dedup = dedup_topic.into();
    }

    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    pub fn dedup_topic(&self) -> &str {
        &self.topics.dedup
    }

    /// Forgets the marks of earlier layouts, before they are read again.
    pub fn clear_carried(&mut self) {
        self.carried.clear();
    }

    /// Adds the marks read from `partition` of an earlier layout's dedup topic.
    pub fn carry(&mut self, topic: &str, partition: i32, state: PartitionDedup) {
        if state.has_chunks() {
            self.carried.push(Carried {
                topic: topic.into(),
                partition,
                state,
            });
        }
    }

    pub fn carried_keys(&self) -> usize {
        self.carried.iter().map(|c| c.state.len()).sum()
    }

    pub fn identity(&mut self) -> &mut IdentityTable {
        &mut self.identity
    }

    pub fn is_restored(&self, partition: i32) -> bool {
        self.dedup.contains_key(&partition)
    }

    pub fn install(&mut self, partition: i32, state: PartitionDedup) {
        self.dedup.insert(partition, state);
    }

    /// Drops a partition's state when another instance takes it over.
    pub fn revoke(&mut self, partition: i32) {
        self.dedup.remove(&partition);
    }

    /// The oldest first-seen second that is still inside the window.
    pub fn oldest_live(&self, now_secs: u32) -> u32 {
        now_secs.saturating_sub(self.window_secs)
    }

    pub fn dedup_keys(&self) -> usize {
        self.dedup.values().map(PartitionDedup::len).sum::<usize>() + self.carried_keys()
    }

    pub fn dedup_heap_bytes(&self) -> usize {
        self.dedup
            .values()
            .map(PartitionDedup::heap_bytes)
            .sum::<usize>()
            + self
                .carried
                .iter()
                .map(|c| c.state.heap_bytes())
                .sum::<usize>()
    }

    /// Writes the batch's identity updates, then its new dedup keys as chunk
    /// records, one per input partition (split at `CHUNK_MAX_KEYS`). Call
    /// once, after the last `process` of the batch.
    pub fn seal(&self, batch: &mut Batch) {
        // Before the batch's own: where both name a person, its newer
        // state comes last.
        for (key, payload) in &self.unwritten_identity {
            let (key, payload) = (batch.bytes(key), batch.bytes(payload));
            batch.push(
                &self.topics.identity,
                None,
                Some(key),
                Some(payload),
                Vec::new(),
            );
        }
        for i in 0..batch.identity.len() {
            let (key, payload) = batch.identity[i].clone();
            batch.push(
                &self.topics.identity,
                None,
                Some(key),
                Some(payload),
                Vec::new(),
            );
        }
        batch.identity.clear();
        batch.identity_index.clear();
        let mut by_partition: BTreeMap<i32, Vec<(DedupKey, u32)>> = BTreeMap::new();
        for (p, k, t) in batch.staged_order.drain(..) {
            by_partition.entry(p).or_default().push((k, t));
        }
        for (p, entries) in by_partition {
            for part in entries.chunks(dedup::CHUNK_MAX_KEYS) {
                let id = dedup::new_chunk_id();
                let key = batch.bytes(&id);
                let payload = batch.bytes(&dedup::encode_chunk(part));
                batch.push(
                    &self.topics.dedup,
                    Some(p),
                    Some(key),
                    Some(payload),
                    Vec::new(),
                );
                batch.chunks.push((p, id, part.to_vec()));
            }
        }
    }

    /// Makes a durable batch's dedup chunks part of the in-memory state.
    pub fn commit(&mut self, batch: &Batch) {
        debug_assert!(batch.staged_order.is_empty(), "commit of an unsealed batch");
        self.unwritten_identity.clear();
        for (p, id, entries) in &batch.chunks {
            if let Some(state) = self.dedup.get_mut(p) {
                state.insert_chunk(*id, entries);
            }
        }
        for (p, ids) in &batch.expired {
            if let Some(state) = self.dedup.get_mut(p) {
                state.drop_chunks(ids);
            }
        }
        for (topic, p, ids) in &batch.expired_carried {
            if let Some(c) = self
                .carried
                .iter_mut()
                .find(|c| c.partition == *p && &c.topic == topic)
            {
                c.state.drop_chunks(ids);
            }
        }
        self.carried.retain(|c| c.state.has_chunks());
    }

    /// A sealed batch was not committed (it is read again): its dedup marks
    /// and expiries were never applied, but the identity table learnt from
    /// it, so its identity records are kept for the next batch to write.
    pub fn abort(&mut self, batch: &Batch) {
        let identity = &self.topics.identity;
        let records: Vec<(Vec<u8>, Vec<u8>)> = batch
            .records()
            .filter(|o| o.topic == &**identity)
            .filter_map(|o| Some((o.key?.to_vec(), o.payload?.to_vec())))
            .collect();
        // Keeps the last state per person (they are the batch's own plus,
        // after two failures in a row, those kept from before).
        let mut seen = HashSet::new();
        let mut kept: Vec<(Vec<u8>, Vec<u8>)> = records
            .into_iter()
            .rev()
            .filter(|(k, _)| seen.insert(k.clone()))
            .collect();
        kept.reverse();
        self.unwritten_identity = kept;
    }

    /// Forgets keys older than the window and adds a tombstone to `batch`
    /// for every chunk wholly outside it; returns the number of tombstones.
    /// The chunks are unlisted by `commit`, once their tombstones are
    /// durable: a batch that fails leaves them to be tombstoned again.
    pub fn expire(&mut self, now_secs: u32, batch: &mut Batch) -> usize {
        let oldest = self.oldest_live(now_secs);
        let topic = &self.topics.dedup;
        let mut n = 0;
        for (p, state) in &mut self.dedup {
            let ids = state.expire(oldest);
            for id in &ids {
                n += 1;
                let key = batch.bytes(id);
                batch.push(topic, Some(*p), Some(key), None, Vec::new());
            }
            if !ids.is_empty() {
                batch.expired.push((*p, ids));
            }
        }
        // Every instance holds the earlier layouts' marks; only the holder of
        // input partition 0 tombstones them, so each is written once. The
        // others have nothing to make durable and unlist them at once.
        let tombstones = self.dedup.contains_key(&0);
        for c in &mut self.carried {
            let ids = c.state.expire(oldest);
            if ids.is_empty() {
                continue;
            }
            if !tombstones {
                c.state.drop_chunks(&ids);
                continue;
            }
            for id in &ids {
                n += 1;
                let key = batch.bytes(id);
                batch.push(&c.topic, Some(c.partition), Some(key), None, Vec::new());
            }
            batch
                .expired_carried
                .push((c.topic.clone(), c.partition, ids));
        }
        self.carried.retain(|c| c.state.has_chunks());
        n
    }

    pub fn process(&mut self, rec: &InRecord<'_>, now_secs: u32, batch: &mut Batch) {
        batch.track(rec.partition, rec.offset);
        let outcome = self.step(rec, now_secs, batch);
        batch.outcomes.push(outcome);
    }

    fn step(&mut self, rec: &InRecord<'_>, now_secs: u32, batch: &mut Batch) -> Outcome {
        let Some(payload) = rec.payload else {
            return self.dead_letter(rec, batch, "empty", "record has no payload".into(), None);
        };
        let max = self.config.router.max_record_bytes;
        if payload.len() > max {
            let reason = format!(
                "record is {} bytes; the limit (router.max_record_bytes) is {max}",
                payload.len()
            );
            return self.dead_letter(rec, batch, "oversize", reason, Some(payload.len()));
        }
        let ev = match parse_event(payload) {
            Ok(ev) => ev,
            Err(e) => return self.invalid(rec, batch, &e),
        };
        let home = partition_for(ev.event_id.as_bytes(), self.partitions);
        if rec.partition != home {
            // Copies of an event meet only on its event_id's partition,
            // whichever key and partitioner the publisher used: move it
            // there and route that copy. (A mis-keyed record that is already
            // on its event_id's partition is routed where it is.)
            let reason = if rec.key == Some(ev.event_id.as_bytes()) {
                Reroute::WrongPartition
            } else {
                Reroute::WrongKey
            };
            let key = batch.bytes(ev.event_id.as_bytes());
            let payload = batch.bytes(payload);
            let from = format!("{}/{}", rec.partition, rec.offset);
            batch.push(
                &self.topics.canonical,
                Some(home),
                Some(key),
                Some(payload),
                vec![
                    (header::REROUTED_FROM, from),
                    (header::REROUTE_REASON, reason.as_str().to_string()),
                ],
            );
            return Outcome::Rerouted(reason);
        }

        let client = ev
            .source
            .as_deref()
            .filter(|s| self.client_sources.contains(*s));
        let k = match client {
            Some(source) => dedup::source_key_of(source, &ev.event_id),
            None => dedup::key_of(&ev.event_id),
        };
        let seen = self
            .dedup
            .get(&rec.partition)
            .is_some_and(|s| s.contains(&k))
            || batch.staged.contains(&(rec.partition, k))
            || self.carried.iter().any(|c| c.state.contains(&k));
        if seen {
            return Outcome::Duplicate;
        }
        batch.staged.insert((rec.partition, k));
        batch.staged_order.push((rec.partition, k, now_secs));

        let mut hints = Profile::from_event(&ev, &mut self.phones);
        // What a newer event says about a person wins, so an event dated in
        // the future (a wrong clock, or a public write key used on purpose)
        // would lock their email hash or device link until that date. For
        // that ordering, an event dated further ahead than clocks drift
        // counts as of when it was received.
        let now = Utc::now().timestamp();
        let received = rec
            .timestamp_ms
            .map_or(now, |ms| ms.div_euclid(1000))
            .min(now);
        if hints.as_of > received + FUTURE_SKEW_SECS {
            hints.as_of = received;
        }
        // A phone of the right shape that is no number in E.164 (with the
        // configured default country) is dropped like any malformed hint.
        let bad_phone = ev
            .phone
            .as_deref()
            .filter(|raw| self.phones.hash(raw).is_none())
            .map(|raw| DroppedHint {
                field: "phone",
                pointer: "/phone".into(),
                reason: format!(
                    "not a phone number in E.164 with default country {} ({} characters)",
                    self.config.identity.default_phone_country,
                    raw.chars().count()
                ),
            });
        let dropped: Vec<&DroppedHint> = ev.dropped_hints.iter().chain(&bad_phone).collect();
        let hint_header: Vec<(&'static str, String)> = if dropped.is_empty() {
            Vec::new()
        } else {
            let all: Vec<String> = dropped.iter().map(|h| h.to_string()).collect();
            vec![(header::HINTS_DROPPED, all.join("; "))]
        };
        let who = if client.is_some() {
            // Anyone can send with a public key: what its events say about a
            // person serves their own delivery, never the table.
            self.identity.resolve_with_own(&ev, &hints)
        } else {
            self.identity
                .observe(&ev, &hints, |id: IdKey<'_>, profile| {
                    batch.stage_identity(id, profile);
                })
        };
        if batch.routed_at.is_empty() {
            serde_json::to_writer(&mut batch.routed_at, &Utc::now())
                .expect("serialising to memory");
        }
        // The person, so one person's deliveries stay in order within a partition.
        let anchor = ev
            .user_id
            .as_deref()
            .or(who.user_id)
            .or(ev.anonymous_id.as_deref())
            .unwrap_or_default();
        let mut routed = 0;
        for (i, (dest, topic)) in self
            .config
            .enabled_destinations()
            .zip(&self.topics.deliver)
            .enumerate()
        {
            match route::select(dest, &ev) {
                Ok(name) => {
                    if routed == 0 {
                        self.writer.prepare(&ev, &who);
                    }
                    let limit = self.delivery_limit;
                    let written = write_delivery(
                        &mut self.writer,
                        batch,
                        (i, name),
                        (&ev, &who, anchor),
                        rec,
                        (&hint_header, limit),
                    );
                    let Ok((key, payload)) = written else {
                        // No producer or broker would take it, and a refused
                        // record would stall the partition: the event goes to
                        // the DLQ for this destination instead.
                        let size = written.err().unwrap_or_default();
                        let reason = format!(
                            "the delivery for destination {} would be {size} bytes; the limit is \
                             {limit} (router.max_record_bytes plus what routing may add)",
                            dest.name
                        );
                        let to = (
                            &self.config.topics.canonical[..],
                            &self.topics.dlq,
                            self.config.router.max_record_bytes,
                        );
                        dead_letter(to, rec, batch, "delivery_oversize", reason, None);
                        batch.oversize_deliveries += 1;
                        continue;
                    };
                    batch.push(topic, None, Some(key), Some(payload), hint_header.clone());
                    Batch::count(&mut batch.routed, i);
                    routed += 1;
                }
                Err(Skip::ConsentDenied { .. } | Skip::ConsentMissing { .. }) => {
                    Batch::count(&mut batch.denied, i);
                }
                Err(Skip::NotMapped | Skip::NotInAllowlist) => {}
            }
        }
        batch.hints_dropped.extend(dropped.iter().map(|h| h.field));
        Outcome::Routed {
            destinations: routed,
        }
    }

    /// Routes `rec` again, for the destinations `only` marks (indexes of
    /// the enabled destinations), as [`Pipeline::process`] would but as a
    /// replay: no dedup state is read or written (a copy seen twice within
    /// the replay is dropped through `seen`), the identity table is read but
    /// never written, nothing is dead-lettered again, and a destination for
    /// which `delivered` says the event already went is skipped. Every
    /// delivery carries `headers`.
    pub fn replay(
        &mut self,
        rec: &InRecord<'_>,
        only: &[bool],
        seen: &mut HashSet<String>,
        delivered: impl Fn(usize, &str) -> bool,
        headers: &[(&'static str, String)],
        batch: &mut Batch,
    ) -> Result<Vec<(usize, Replayed)>, NotReplayed> {
        let payload = rec.payload.ok_or(NotReplayed::Invalid)?;
        let ev = parse_event(payload).map_err(|_| NotReplayed::Invalid)?;
        if rec.partition != partition_for(ev.event_id.as_bytes(), self.partitions) {
            // Routed live from the copy on its event_id's partition.
            return Err(NotReplayed::Moved);
        }
        if !seen.insert(ev.event_id.clone()) {
            return Err(NotReplayed::Duplicate);
        }
        let hints = Profile::from_event(&ev, &mut self.phones);
        let who = self.identity.resolve_with_own(&ev, &hints);
        if batch.routed_at.is_empty() {
            serde_json::to_writer(&mut batch.routed_at, &Utc::now())
                .expect("serialising to memory");
        }
        let anchor = ev
            .user_id
            .as_deref()
            .or(who.user_id)
            .or(ev.anonymous_id.as_deref())
            .unwrap_or_default();
        let mut out = Vec::new();
        let mut prepared = false;
        for (i, (dest, topic)) in self
            .config
            .enabled_destinations()
            .zip(&self.topics.deliver)
            .enumerate()
        {
            if !only.get(i).copied().unwrap_or(false) {
                continue;
            }
            let name = match route::select(dest, &ev) {
                Ok(name) => name,
                Err(skip) => {
                    out.push((i, Replayed::Skipped(skip)));
                    continue;
                }
            };
            if delivered(i, &ev.event_id) {
                out.push((i, Replayed::AlreadyDelivered));
                continue;
            }
            if !prepared {
                self.writer.prepare(&ev, &who);
                prepared = true;
            }
            let written = write_delivery(
                &mut self.writer,
                batch,
                (i, name),
                (&ev, &who, anchor),
                rec,
                (headers, self.delivery_limit),
            );
            let Ok((key, payload)) = written else {
                // Dead-lettered when it was routed live.
                out.push((i, Replayed::Oversize));
                continue;
            };
            batch.push(topic, None, Some(key), Some(payload), headers.to_vec());
            out.push((i, Replayed::Routed));
        }
        Ok(out)
    }

    fn invalid(&self, rec: &InRecord<'_>, batch: &mut Batch, err: &InvalidEvent) -> Outcome {
        self.dead_letter(rec, batch, err.error_class(), err.to_string(), None)
    }

    fn dead_letter(
        &self,
        rec: &InRecord<'_>,
        batch: &mut Batch,
        class: &'static str,
        reason: String,
        oversize: Option<usize>,
    ) -> Outcome {
        let to = (
            &self.config.topics.canonical[..],
            &self.topics.dlq,
            self.config.router.max_record_bytes,
        );
        dead_letter(to, rec, batch, class, reason, oversize)
    }
}

/// Writes the delivery of `ev` for destination `i` (named `name` there)
/// into `batch`'s buffer: its key's and payload's ranges, or, when the
/// record with `headers` would be larger than `limit`, its size (and
/// nothing stays written).
fn write_delivery(
    writer: &mut DeliveryWriter,
    batch: &mut Batch,
    (i, name): (usize, &str),
    (ev, who, anchor): (&CanonicalEvent, &Resolved<'_>, &str),
    rec: &InRecord<'_>,
    (headers, limit): (&[(&'static str, String)], usize),
) -> Result<(Range<usize>, Range<usize>), usize> {
    let key = batch.bytes(anchor.as_bytes());
    let start = batch.buf.len();
    writer.write(
        &mut batch.buf,
        i,
        name,
        ev,
        who,
        Stamp {
            partition: rec.partition,
            offset: rec.offset,
            routed_at: &batch.routed_at,
        },
    );
    let payload = start..batch.buf.len();
    let size = wire_size(key.len(), payload.len(), headers);
    if size > limit {
        batch.buf.truncate(key.start);
        return Err(size);
    }
    Ok((key, payload))
}

/// Writes `rec` to the DLQ (`to`: the input topic's name, the DLQ's and the
/// record limit), with why; an oversize payload is cut to fit.
fn dead_letter(
    (canonical, dlq, max_record_bytes): (&str, &Arc<str>, usize),
    rec: &InRecord<'_>,
    batch: &mut Batch,
    class: &'static str,
    mut reason: String,
    oversize: Option<usize>,
) -> Outcome {
    if reason.len() > REASON_MAX {
        let mut cut = REASON_MAX;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    let mut headers = vec![
        (header::STAGE, stage::ROUTER.to_string()),
        (header::ERROR_CLASS, class.to_string()),
        (header::REASON, reason),
        (header::ORIGIN_TOPIC, canonical.to_string()),
        (header::ORIGIN_PARTITION, rec.partition.to_string()),
        (header::ORIGIN_OFFSET, rec.offset.to_string()),
        (header::FAILED_AT, Utc::now().to_rfc3339()),
    ];
    if let Some(ts) = rec.timestamp_ms {
        headers.push((header::ORIGIN_TIMESTAMP_MS, ts.to_string()));
    }
    let payload = rec.payload.map(|p| match oversize {
        Some(size) => {
            headers.push((header::ORIGIN_SIZE, size.to_string()));
            headers.push((header::TRUNCATED, "true".into()));
            batch.bytes(&p[..OVERSIZE_KEEP.min(max_record_bytes).min(p.len())])
        }
        None => batch.bytes(p),
    });
    let key = rec.key.map(|k| batch.bytes(k));
    batch.push(dlq, None, key, payload, headers);
    Outcome::Invalid { class }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::Delivery;
    use crate::event::ClickKind;
    use crate::event::normalize::EmailRule;
    use chrono::DateTime;

    fn pipeline() -> Pipeline {
        pipeline_with("")
    }

    fn pipeline_with(extra: &str) -> Pipeline {
        let cfg = Config::parse(
            &format!(
                r#"
{extra}
[destinations.meta]
type = "meta_capi"
pixel_id = "1"
access_token = "t"
[destinations.hook]
type = "webhook"
url = "http://127.0.0.1:1/"
secret = "0123456789abcdef"
consent = "analytics"
"#
            ),
            std::path::Path::new("t.toml"),
            &|_| None,
        )
        .unwrap();
        let mut p = Pipeline::new(Arc::new(cfg));
        // One partition: every event_id's home is partition 0.
        p.set_layout(1, "switchyard.dedup");
        p.install(0, PartitionDedup::default());
        p
    }

    fn rec<'a>(key: Option<&'a str>, payload: &'a str, offset: i64) -> InRecord<'a> {
        InRecord {
            partition: 0,
            offset,
            key: key.map(str::as_bytes),
            payload: Some(payload.as_bytes()),
            timestamp_ms: None,
        }
    }

    const PURCHASE: &str = r#"{"event":"purchase","event_id":"e1","occurred_at":"2026-11-20T10:00:00Z","user_id":"u1","email":"a@example.com","value":5,"currency":"USD","consent":{"ads":"granted"}}"#;

    fn topics(b: &Batch) -> Vec<&str> {
        b.records().map(|o| o.topic).collect()
    }

    #[test]
    fn a_valid_event_is_marked_and_routed() {
        let mut p = pipeline();
        let mut b = Batch::default();
        p.process(&rec(Some("e1"), PURCHASE, 7), 1000, &mut b);
        p.seal(&mut b);
        assert_eq!(
            topics(&b),
            vec![
                "switchyard.deliver.hook",
                "switchyard.deliver.meta",
                "switchyard.identity",
                "switchyard.dedup",
            ]
        );
        let out: Vec<Out<'_>> = b.records().collect();
        let mark = &out[3];
        assert_eq!(mark.partition, Some(0));
        assert_eq!(
            dedup::decode_chunk(mark.payload.unwrap()),
            Some(vec![(dedup::key_of("e1"), 1000)])
        );
        let d: Delivery = serde_json::from_slice(out[1].payload.unwrap()).unwrap();
        assert_eq!(d.name, "Purchase");
        assert_eq!(d.origin.offset, 7);
        assert_eq!(b.offsets[&0], (7, 7));
    }

    #[test]
    fn a_delivery_that_would_not_fit_a_record_is_dead_lettered_and_the_others_still_go() {
        let sizes = |limit: Option<usize>| {
            let mut p = pipeline();
            if let Some(l) = limit {
                p.delivery_limit = l;
            }
            let mut b = Batch::default();
            p.process(&rec(Some("e1"), PURCHASE, 7), 1000, &mut b);
            let out: Vec<(String, usize, Option<String>)> = b
                .records()
                .map(|o| {
                    let reason = o
                        .headers
                        .iter()
                        .find(|(k, _)| *k == header::REASON)
                        .map(|(_, v)| v.clone());
                    let size = wire_size(
                        o.key.map_or(0, <[u8]>::len),
                        o.payload.map_or(0, <[u8]>::len),
                        o.headers,
                    );
                    (o.topic.to_string(), size, reason)
                })
                .collect();
            (out, b.oversize_deliveries, b.outcomes[0])
        };
        let (full, none, _) = sizes(None);
        assert_eq!(none, 0);
        let size_of = |t: &str| full.iter().find(|o| o.0 == t).unwrap().1;
        let hook = size_of("switchyard.deliver.hook");
        let meta = size_of("switchyard.deliver.meta");
        let bigger = if hook >= meta { "hook" } else { "meta" };

        // A delivery of exactly the limit goes out.
        let (out, oversize, _) = sizes(Some(hook.max(meta)));
        assert_eq!(oversize, 0);
        assert!(out.iter().all(|o| o.0 != "switchyard.dlq"));

        // One byte less: the bigger one is dead-lettered with its reason,
        // the other still delivered (both, when they are the same size).
        let (out, oversize, outcome) = sizes(Some(hook.max(meta) - 1));
        let both = hook == meta;
        assert_eq!(oversize, if both { 2 } else { 1 });
        assert_eq!(
            outcome,
            Outcome::Routed {
                destinations: if both { 0 } else { 1 }
            }
        );
        let dead: Vec<&str> = out
            .iter()
            .filter(|o| o.0 == "switchyard.dlq")
            .map(|o| o.2.as_deref().unwrap())
            .collect();
        assert!(
            dead.iter()
                .any(|r| r.contains(&format!("destination {bigger} would be"))),
            "{dead:?}"
        );
    }

    #[test]
    fn an_event_dated_in_the_future_cannot_lock_a_persons_identity() {
        let mut p = pipeline();
        let mut b = Batch::default();
        let now = Utc::now();
        let at = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let far = DateTime::parse_from_rfc3339("2099-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        let events = [
            format!(
                r#"{{"event":"lead","event_id":"e1","occurred_at":"{}","user_id":"u1","anonymous_id":"a1","email":"planted@example.com"}}"#,
                at(far)
            ),
            format!(
                r#"{{"event":"lead","event_id":"e2","occurred_at":"{}","user_id":"u1","anonymous_id":"a1","email":"real@example.com"}}"#,
                at(now + chrono::Duration::seconds(1))
            ),
            format!(
                r#"{{"event":"purchase","event_id":"e3","occurred_at":"{}","user_id":"u1","value":5,"currency":"USD","consent":{{"ads":"granted"}}}}"#,
                at(now + chrono::Duration::seconds(2))
            ),
        ];
        for (i, e) in events.iter().enumerate() {
            let id = format!("e{}", i + 1);
            p.process(&rec(Some(&id), e, i as i64), 1000, &mut b);
        }
        p.seal(&mut b);
        let meta: Vec<Delivery> = b
            .records()
            .filter(|o| o.topic == "switchyard.deliver.meta")
            .map(|o| serde_json::from_slice(o.payload.unwrap()).unwrap())
            .collect();
        let purchase = meta.iter().find(|d| d.event.event_id == "e3").unwrap();
        assert_eq!(
            purchase.event.email_sha256,
            Some(crate::event::normalize::sha256_hex("real@example.com"))
        );
    }

    const CLIENT_KEY: &str = r#"
[[ingest.keys]]
key = "pub_0123456789abcdef"
source = "web"
environment = "production"
trust = "client"
"#;

    fn deliveries(b: &Batch, topic: &str) -> Vec<Delivery> {
        b.records()
            .filter(|o| o.topic == topic)
            .map(|o| serde_json::from_slice(o.payload.unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn an_event_from_a_client_key_sets_no_identity_facts_but_keeps_its_own() {
        let mut p = pipeline_with(CLIENT_KEY);
        let mut b = Batch::default();
        let events = [
            r#"{"event":"purchase","event_id":"c1","occurred_at":"2026-11-20T10:00:00Z","source":"web","user_id":"u1","anonymous_id":"a1","email":"planted@example.com","external_ids":{"crm":"X"},"value":5,"currency":"USD","consent":{"ads":"granted"}}"#,
            r#"{"event":"purchase","event_id":"s1","occurred_at":"2026-11-20T10:01:00Z","user_id":"u1","value":5,"currency":"USD","consent":{"ads":"granted"}}"#,
            r#"{"event":"purchase","event_id":"s2","occurred_at":"2026-11-20T10:02:00Z","anonymous_id":"a1","value":5,"currency":"USD","consent":{"ads":"granted"}}"#,
        ];
        for (i, e) in events.iter().enumerate() {
            p.process(&rec(None, e, i as i64), 1000, &mut b);
        }
        p.seal(&mut b);
        assert!(
            !topics(&b).contains(&"switchyard.identity"),
            "{:?}",
            topics(&b)
        );
        let meta = deliveries(&b, "switchyard.deliver.meta");
        let of = |id: &str| &meta.iter().find(|d| d.event.event_id == id).unwrap().event;
        let planted = crate::event::normalize::sha256_hex("planted@example.com");
        assert_eq!(of("c1").email_sha256.as_ref(), Some(&planted));
        assert_eq!(
            of("c1").external_ids.get("crm"),
            Some(&crate::event::normalize::sha256_hex("X"))
        );
        assert_eq!(of("s1").email_sha256, None);
        assert_eq!(
            (of("s2").user_id.as_deref(), of("s2").email_sha256.as_ref()),
            (None, None)
        );
    }

    #[test]
    fn a_client_key_cannot_suppress_a_server_event_by_its_event_id() {
        let mut p = pipeline_with(CLIENT_KEY);
        let mut b = Batch::default();
        let client = r#"{"event":"purchase","event_id":"o-1","occurred_at":"2026-11-20T10:00:00Z","source":"web","user_id":"u1","value":1,"currency":"USD","consent":{"ads":"granted"}}"#;
        let server = r#"{"event":"purchase","event_id":"o-1","occurred_at":"2026-11-20T10:00:00Z","source":"billing","user_id":"u1","value":99,"currency":"USD","consent":{"ads":"granted"}}"#;
        for (i, e) in [client, server, client, server].iter().enumerate() {
            p.process(&rec(Some("o-1"), e, i as i64), 1000, &mut b);
        }
        p.seal(&mut b);
        let values: Vec<Option<f64>> = deliveries(&b, "switchyard.deliver.meta")
            .iter()
            .map(|d| d.event.value)
            .collect();
        // Each source's resend is a duplicate; the guessed id stops nothing.
        assert_eq!(values, [Some(1.0), Some(99.0)]);
    }

    #[test]
    fn a_person_with_several_events_in_a_batch_costs_one_identity_record() {
        let mut p = pipeline();
        let mut b = Batch::default();
        let events = [
            r#"{"event":"lead","event_id":"e1","occurred_at":"2026-11-20T10:00:00Z","user_id":"u1","anonymous_id":"a1","click_ids":{"fbc":"F1"}}"#,
            r#"{"event":"lead","event_id":"e2","occurred_at":"2026-11-20T10:01:00Z","user_id":"u2","click_ids":{"fbc":"G1"}}"#,
            r#"{"event":"lead","event_id":"e3","occurred_at":"2026-11-20T10:02:00Z","user_id":"u1","email":"a@example.com"}"#,
            r#"{"event":"lead","event_id":"e4","occurred_at":"2026-11-20T10:03:00Z","anonymous_id":"a1","click_ids":{"fbc":"F2"}}"#,
        ];
        for (i, e) in events.iter().enumerate() {
            let id = format!("e{}", i + 1);
            p.process(&rec(Some(&id), e, i as i64), 1000, &mut b);
        }
        p.seal(&mut b);
        let identity: Vec<(String, Profile)> = b
            .records()
            .filter(|o| o.topic == "switchyard.identity")
            .map(|o| {
                (
                    String::from_utf8(o.key.unwrap().to_vec()).unwrap(),
                    serde_json::from_slice(o.payload.unwrap()).unwrap(),
                )
            })
            .collect();
        let keys: Vec<&str> = identity.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["a:a1", "u:u1", "u:u2"], "first-seen order, one each");
        let u1 = &identity[1].1;
        assert_eq!(u1.click_id(ClickKind::Fbc), Some("F2"), "the last state");
        assert!(u1.email_hash(EmailRule::Plain).is_some());
        assert_eq!(identity[0].1.user_id.as_deref(), Some("u1"));
        assert_eq!(identity[2].1.click_id(ClickKind::Fbc), Some("G1"));

        // Reused, the batch starts with nothing staged.
        b.clear();
        p.process(
            &rec(Some("e9"), events[1].replace("e2", "e9").as_str(), 9),
            1000,
            &mut b,
        );
        p.seal(&mut b);
        assert!(b.records().all(|o| o.topic != "switchyard.identity"));
    }

    #[test]
    fn duplicates_are_dropped_within_a_batch_and_after_commit_but_not_after_abort() {
        let mut p = pipeline();
        let mut b = Batch::default();
        p.process(&rec(Some("e1"), PURCHASE, 1), 1000, &mut b);
        p.process(&rec(Some("e1"), PURCHASE, 2), 1000, &mut b);
        assert_eq!(b.outcomes[1].label(), "duplicate");
        // Aborted: nothing was remembered, so the retry routes it again.
        drop(b);
        let mut retry = Batch::default();
        p.process(&rec(Some("e1"), PURCHASE, 1), 1000, &mut retry);
        assert_eq!(retry.outcomes[0].label(), "routed");
        p.seal(&mut retry);
        p.commit(&retry);
        let mut later = Batch::default();
        p.process(&rec(Some("e1"), PURCHASE, 3), 1001, &mut later);
        assert_eq!(later.outcomes[0].label(), "duplicate");
        assert_eq!(later.len(), 0);
    }

    /// A pipeline over 4 input partitions, all held, and the home of "e1".
    fn four_partitions() -> (Pipeline, i32) {
        let mut p = pipeline();
        p.set_layout(4, "switchyard.dedup");
        for i in 0..4 {
            p.install(i, PartitionDedup::default());
        }
        (p, partition_for(b"e1", 4))
    }

    fn on(partition: i32, key: Option<&'static str>, offset: i64) -> InRecord<'static> {
        InRecord {
            partition,
            ..rec(key, PURCHASE, offset)
        }
    }

    #[test]
    fn records_off_their_event_ids_partition_are_moved_there_whatever_their_key() {
        let (mut p, home) = four_partitions();
        let away = (home + 1) % 4;
        let mut b = Batch::default();
        p.process(&on(away, Some("e1"), 1), 1000, &mut b);
        p.process(&on(away, Some("user-9"), 2), 1000, &mut b);
        p.process(&on(away, None, 3), 1000, &mut b);
        let labels: Vec<Outcome> = b.outcomes.clone();
        assert_eq!(
            labels,
            vec![
                Outcome::Rerouted(Reroute::WrongPartition),
                Outcome::Rerouted(Reroute::WrongKey),
                Outcome::Rerouted(Reroute::WrongKey),
            ]
        );
        for (o, (offset, reason)) in
            b.records()
                .zip([(1, "wrong_partition"), (2, "wrong_key"), (3, "wrong_key")])
        {
            assert_eq!(o.topic, "events.canonical");
            assert_eq!(o.partition, Some(home), "sent to the home partition itself");
            assert_eq!(o.key, Some(b"e1".as_slice()));
            assert_eq!(o.payload, Some(PURCHASE.as_bytes()));
            let h: HashMap<&str, &str> = o.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!(h[header::REROUTED_FROM], format!("{away}/{offset}"));
            assert_eq!(h[header::REROUTE_REASON], reason);
        }
    }

    #[test]
    fn a_record_on_its_event_ids_partition_is_routed_in_place_whatever_its_key() {
        let (mut p, home) = four_partitions();
        let mut b = Batch::default();
        p.process(&on(home, Some("user-9"), 1), 1000, &mut b);
        p.process(&on(home, None, 2), 1000, &mut b);
        p.process(&on(home, Some("e1"), 3), 1000, &mut b);
        assert_eq!(b.outcomes[0], Outcome::Routed { destinations: 2 });
        assert_eq!(b.outcomes[1], Outcome::Duplicate);
        assert_eq!(b.outcomes[2], Outcome::Duplicate);
        assert!(b.records().all(|o| o.topic != "events.canonical"));
    }

    #[test]
    fn marks_of_an_earlier_layout_drop_duplicates_until_they_expire() {
        let (mut p, home) = four_partitions();
        // e1 was seen when the input had 2 partitions; its mark is in the
        // base topic's partition that layout gave it.
        let mut old = dedup::Restore::default();
        let id = dedup::new_chunk_id();
        old.record(
            &id,
            Some(&dedup::encode_chunk(&[(dedup::key_of("e1"), 1000)])),
        );
        let (state, _) = old.finish(0);
        p.set_layout(4, "switchyard.dedup.p4");
        assert_eq!(
            p.dedup_keys(),
            0,
            "partition state of another topic is dropped"
        );
        for i in 0..4 {
            p.install(i, PartitionDedup::default());
        }
        p.carry("switchyard.dedup", partition_for(b"e1", 2), state);
        assert_eq!(p.carried_keys(), 1);
        let mut b = Batch::default();
        p.process(&on(home, Some("e1"), 1), 1000, &mut b);
        assert_eq!(b.outcomes, vec![Outcome::Duplicate]);

        // Past the window, the holder of input partition 0 tombstones it in
        // the earlier layout's topic; nobody else does.
        let late = 1000 + 48 * 3600 + 1;
        let mut t = Batch::default();
        p.revoke(0);
        let mut other = Pipeline::new(p.config.clone());
        other.carry("switchyard.dedup", 1, {
            let mut r = dedup::Restore::default();
            r.record(
                &id,
                Some(&dedup::encode_chunk(&[(dedup::key_of("e1"), 1000)])),
            );
            r.finish(0).0
        });
        assert_eq!(other.expire(late, &mut t), 0);
        assert_eq!(other.carried_keys(), 0);
        p.install(0, PartitionDedup::default());
        assert_eq!(p.expire(late, &mut t), 1);
        let tomb = t.records().next().unwrap();
        assert_eq!(
            (tomb.topic, tomb.partition, tomb.key, tomb.payload),
            (
                "switchyard.dedup",
                Some(partition_for(b"e1", 2)),
                Some(&id[..]),
                None
            )
        );
        let mut b = Batch::default();
        p.process(&on(home, Some("e1"), 2), late, &mut b);
        assert_eq!(b.outcomes[0], Outcome::Routed { destinations: 2 });
    }

    #[test]
    fn a_malformed_hint_is_dropped_and_named_on_every_delivery_never_its_value() {
        let mut p = pipeline();
        let mut b = Batch::default();
        let ev = r#"{"event":"purchase","event_id":"e1","occurred_at":"2026-11-20T10:00:00Z","user_id":"u1","email":" n/a ","phone":"+1 555 0100 99","value":5,"currency":"USD","consent":{"ads":"granted"}}"#;
        p.process(&rec(Some("e1"), ev, 1), 1000, &mut b);
        assert_eq!(b.outcomes[0], Outcome::Routed { destinations: 2 });
        assert_eq!(b.hints_dropped, vec!["email", "phone"]);
        let deliveries: Vec<Out<'_>> = b
            .records()
            .filter(|o| o.topic.starts_with("switchyard.deliver."))
            .collect();
        assert_eq!(deliveries.len(), 2);
        for d in &deliveries {
            let h: HashMap<&str, &str> = d.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let why = h[header::HINTS_DROPPED];
            assert!(why.starts_with("/email: "), "{why}");
            assert!(
                why.contains("; /phone: not a phone number in E.164"),
                "{why}"
            );
            assert!(!why.contains("n/a") && !why.contains("555"), "{why}");
            let sent: Delivery = serde_json::from_slice(d.payload.unwrap()).unwrap();
            assert!(sent.event.email_sha256.is_none() && sent.event.phone_sha256.is_none());
        }
        // A clean event carries no such header.
        let mut clean = Batch::default();
        p.process(
            &rec(Some("e2"), &PURCHASE.replace("e1", "e2"), 2),
            1000,
            &mut clean,
        );
        assert!(clean.hints_dropped.is_empty());
        assert!(clean.records().all(|o| o.headers.is_empty()));
    }

    #[test]
    fn poison_records_are_dead_lettered_with_payload_and_reason() {
        let mut p = pipeline();
        let mut b = Batch::default();
        let bad_utf8 = [0xff, 0xfe, b'{'];
        let big = "x".repeat(2 * 1024 * 1024);
        let cases: Vec<(InRecord<'_>, &str)> = vec![
            (
                InRecord {
                    partition: 0,
                    offset: 1,
                    key: None,
                    payload: Some(&bad_utf8),
                    timestamp_ms: Some(5),
                },
                "bad_json",
            ),
            (
                rec(None, r#"{"event":"purchase","event_id":"#, 2),
                "bad_json",
            ),
            (rec(None, "[1,2]", 3), "not_object"),
            (
                rec(
                    Some("e"),
                    r#"{"event":"lead","event_id":"e","occurred_at":"yesterday","user_id":7}"#,
                    4,
                ),
                "schema",
            ),
            (rec(None, &big, 5), "oversize"),
            (
                InRecord {
                    partition: 0,
                    offset: 6,
                    key: None,
                    payload: None,
                    timestamp_ms: None,
                },
                "empty",
            ),
        ];
        for (r, _) in &cases {
            p.process(r, 1000, &mut b);
        }
        assert_eq!(b.len(), cases.len());
        for (out, (r, class)) in b.records().zip(&cases) {
            assert_eq!(out.topic, "switchyard.dlq");
            let h: HashMap<&str, &str> =
                out.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!(h[header::ERROR_CLASS], *class);
            assert_eq!(h[header::ORIGIN_OFFSET], r.offset.to_string());
            assert!(!h[header::REASON].is_empty());
            if *class == "oversize" {
                assert_eq!(out.payload.unwrap().len(), OVERSIZE_KEEP);
            } else {
                assert_eq!(out.payload, r.payload);
            }
        }
        let schema = b
            .records()
            .nth(3)
            .unwrap()
            .headers
            .iter()
            .find(|(k, _)| *k == header::REASON)
            .unwrap();
        assert!(
            schema.1.contains("/occurred_at") && schema.1.contains("/user_id"),
            "{}",
            schema.1
        );
    }

    #[test]
    fn identity_learnt_in_a_failed_batch_is_written_by_the_next_one() {
        let mut p = pipeline();
        let identify = r#"{"event":"identify","event_id":"i1","occurred_at":"2026-11-20T10:00:00Z","user_id":"u1","anonymous_id":"a1","email":"a@example.com","consent":{"ads":"granted","analytics":"granted"}}"#;
        let identity_keys = |b: &Batch| -> Vec<String> {
            b.records()
                .filter(|o| o.topic == "switchyard.identity")
                .map(|o| String::from_utf8(o.key.unwrap().to_vec()).unwrap())
                .collect()
        };
        let mut first = Batch::default();
        p.process(&rec(Some("i1"), identify, 1), 1000, &mut first);
        p.seal(&mut first);
        assert_eq!(identity_keys(&first), ["a:a1", "u:u1"]);
        // Its writes failed; the same record is read again.
        p.abort(&first);
        let mut retry = Batch::default();
        p.process(&rec(Some("i1"), identify, 1), 1000, &mut retry);
        p.seal(&mut retry);
        assert_eq!(identity_keys(&retry), ["a:a1", "u:u1"]);
        p.commit(&retry);
        let mut later = Batch::default();
        p.process(
            &rec(Some("i2"), &identify.replace("i1", "i2"), 2),
            1000,
            &mut later,
        );
        p.seal(&mut later);
        assert!(identity_keys(&later).is_empty(), "written once committed");
    }

    #[test]
    fn expired_keys_get_tombstones() {
        let mut p = pipeline();
        let mut b = Batch::default();
        p.process(&rec(Some("e1"), PURCHASE, 1), 1000, &mut b);
        p.seal(&mut b);
        p.commit(&b);
        let late = 1000 + 48 * 3600 + 1;
        let mut t = Batch::default();
        assert_eq!(p.expire(late, &mut t), 1);
        let tomb = t.records().next().unwrap();
        assert_eq!(tomb.payload, None);
        assert_eq!(tomb.partition, Some(0));
        assert_eq!(p.dedup_keys(), 0);

        // The batch with the tombstone failed: the next expiry writes it again.
        let mut again = Batch::default();
        assert_eq!(p.expire(late, &mut again), 1);
        p.seal(&mut again);
        p.commit(&again);
        // Committed, the chunk is gone and nothing is tombstoned twice.
        let mut after = Batch::default();
        assert_eq!(p.expire(late, &mut after), 0);
    }
}
