//! The router's step chain over one record, free of I/O: decode + validate →
//! key check → dedup → identity → consent + route. Everything it wants
//! written goes into a [`Batch`]; dedup marks stay staged until the batch's
//! writes are durable, so an aborted batch leaves no trace in memory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::Utc;

use super::dedup::{self, ChunkId, DedupKey, PartitionDedup};
use super::identity::{IdentityTable, Profile};
use super::route::{self, Skip};
use crate::config::Config;
use crate::delivery::{DELIVERY_VERSION, Delivery, Origin};
use crate::event::normalize::PhoneCountry;
use crate::event::{CanonicalEvent, InvalidEvent, parse_event};
use crate::sink::records::header;

/// One consumed record, borrowed from the consumer.
#[derive(Debug, Clone, Copy)]
pub struct InRecord<'a> {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub timestamp_ms: Option<i64>,
}

/// One record to produce.
#[derive(Debug, Clone, PartialEq)]
pub struct OutRecord {
    /// Shared: one allocation per topic, not per record.
    pub topic: Arc<str>,
    /// Set for state that must be co-partitioned with the input.
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    /// `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(&'static str, String)>,
}

/// What happened to one record.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Invalid {
        class: &'static str,
        reason: String,
    },
    /// Keyed by something other than its event_id: re-published under it.
    Rekeyed {
        event_id: String,
    },
    Duplicate {
        event_id: String,
    },
    Routed {
        event_id: String,
        event: String,
        delivered: Vec<String>,
        skipped: Vec<(String, Skip)>,
    },
}

impl Outcome {
    #[cfg(test)]
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Invalid { .. } => "invalid",
            Outcome::Rekeyed { .. } => "rekeyed",
            Outcome::Duplicate { .. } => "duplicate",
            Outcome::Routed { .. } => "routed",
        }
    }
}

/// (input partition, chunk id, its keys with their first-seen seconds)
type SealedChunk = (i32, ChunkId, Vec<(DedupKey, u32)>);

/// Everything one batch of input records produces.
#[derive(Debug, Default)]
pub struct Batch {
    pub out: Vec<OutRecord>,
    staged: HashSet<(i32, DedupKey)>,
    staged_order: Vec<(i32, DedupKey, u32)>,
    /// The dedup chunks `seal` wrote into `out`, made live by `commit`.
    chunks: Vec<SealedChunk>,
    /// Per input partition: first and last offset in this batch.
    pub offsets: BTreeMap<i32, (i64, i64)>,
    pub outcomes: Vec<Outcome>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty() && self.out.is_empty()
    }

    fn track(&mut self, partition: i32, offset: i64) {
        self.offsets
            .entry(partition)
            .and_modify(|(_, last)| *last = offset)
            .or_insert((offset, offset));
    }
}

/// Topic names, built once.
struct Topics {
    canonical: Arc<str>,
    dedup: Arc<str>,
    identity: Arc<str>,
    dlq: Arc<str>,
    /// Per enabled destination, in config order.
    deliver: Vec<Arc<str>>,
}

pub struct Pipeline {
    config: Arc<Config>,
    topics: Topics,
    country: PhoneCountry,
    window_secs: u32,
    dedup: HashMap<i32, PartitionDedup>,
    identity: IdentityTable,
}

/// How much of an oversize record's payload the dead letter keeps: brokers
/// refuse records above their message size limit, so the whole of a 10 MB
/// record cannot be written anywhere.
const OVERSIZE_KEEP: usize = 64 * 1024;
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
            country: config.identity.phone_country(),
            window_secs: u32::try_from(config.router.dedup_window.as_secs()).unwrap_or(u32::MAX),
            config,
            dedup: HashMap::new(),
            identity: IdentityTable::default(),
        }
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
        self.dedup.values().map(PartitionDedup::len).sum()
    }

    pub fn dedup_heap_bytes(&self) -> usize {
        self.dedup.values().map(PartitionDedup::heap_bytes).sum()
    }

    /// Writes the batch's new dedup keys into `out` as chunk records, one
    /// per input partition (split at `CHUNK_MAX_KEYS`). Call once, after the
    /// last `process` of the batch.
    pub fn seal(&self, batch: &mut Batch) {
        let mut by_partition: BTreeMap<i32, Vec<(DedupKey, u32)>> = BTreeMap::new();
        for (p, k, t) in batch.staged_order.drain(..) {
            by_partition.entry(p).or_default().push((k, t));
        }
        for (p, entries) in by_partition {
            for part in entries.chunks(dedup::CHUNK_MAX_KEYS) {
                let id = dedup::new_chunk_id();
                batch.out.push(OutRecord {
                    topic: self.topics.dedup.clone(),
                    partition: Some(p),
                    key: Some(id.to_vec()),
                    payload: Some(dedup::encode_chunk(part)),
                    headers: Vec::new(),
                });
                batch.chunks.push((p, id, part.to_vec()));
            }
        }
    }

    /// Makes a durable batch's dedup chunks part of the in-memory state.
    pub fn commit(&mut self, batch: &Batch) {
        debug_assert!(batch.staged_order.is_empty(), "commit of an unsealed batch");
        for (p, id, entries) in &batch.chunks {
            if let Some(state) = self.dedup.get_mut(p) {
                state.insert_chunk(*id, entries);
            }
        }
    }

    /// Forgets keys older than the window and adds a tombstone to `batch`
    /// for every chunk wholly outside it; returns the number of tombstones.
    pub fn expire(&mut self, now_secs: u32, batch: &mut Batch) -> usize {
        let oldest = self.oldest_live(now_secs);
        let topic = &self.topics.dedup;
        let mut n = 0;
        for (p, state) in &mut self.dedup {
            for id in state.expire(oldest) {
                n += 1;
                batch.out.push(OutRecord {
                    topic: topic.clone(),
                    partition: Some(*p),
                    key: Some(id.to_vec()),
                    payload: None,
                    headers: Vec::new(),
                });
            }
        }
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
        if rec.key != Some(ev.event_id.as_bytes()) {
            // Only a record keyed by its event_id meets its duplicates in one
            // partition; re-publish it so that it does, and route that copy.
            batch.out.push(OutRecord {
                topic: self.topics.canonical.clone(),
                partition: None,
                key: Some(ev.event_id.clone().into_bytes()),
                payload: Some(payload.to_vec()),
                headers: vec![(
                    header::REKEYED_FROM,
                    format!("{}/{}", rec.partition, rec.offset),
                )],
            });
            return Outcome::Rekeyed {
                event_id: ev.event_id,
            };
        }

        let k = dedup::key_of(&ev.event_id);
        let seen = self
            .dedup
            .get(&rec.partition)
            .is_some_and(|s| s.contains(&k))
            || batch.staged.contains(&(rec.partition, k));
        if seen {
            return Outcome::Duplicate {
                event_id: ev.event_id,
            };
        }
        batch.staged.insert((rec.partition, k));
        batch.staged_order.push((rec.partition, k, now_secs));

        let hints = Profile::from_event(&ev, self.country);
        let identity_topic = &self.topics.identity;
        for (key, profile) in self.identity.observe(&ev, &hints) {
            batch.out.push(OutRecord {
                topic: identity_topic.clone(),
                partition: None,
                key: Some(key.into_bytes()),
                payload: Some(serde_json::to_vec(&profile).unwrap_or_default()),
                headers: Vec::new(),
            });
        }
        let who = self.identity.resolve(&ev);
        self.route(rec, &ev, &who, batch)
    }

    fn route(
        &self,
        rec: &InRecord<'_>,
        ev: &CanonicalEvent,
        who: &super::identity::Resolved,
        batch: &mut Batch,
    ) -> Outcome {
        let mut delivered = Vec::new();
        let mut skipped = Vec::new();
        let routed_at = Utc::now();
        for (dest, topic) in self.config.enabled_destinations().zip(&self.topics.deliver) {
            match route::select(dest, ev) {
                Ok(name) => {
                    let d = Delivery {
                        v: DELIVERY_VERSION,
                        destination: dest.name.clone(),
                        name,
                        event: route::shape(dest, ev, who),
                        origin: Origin {
                            topic: self.config.topics.canonical.clone(),
                            partition: rec.partition,
                            offset: rec.offset,
                        },
                        routed_at,
                    };
                    batch.out.push(OutRecord {
                        topic: topic.clone(),
                        partition: None,
                        key: Some(d.key().as_bytes().to_vec()),
                        payload: Some(serde_json::to_vec(&d).unwrap_or_default()),
                        headers: Vec::new(),
                    });
                    delivered.push(dest.name.clone());
                }
                Err(skip) => skipped.push((dest.name.clone(), skip)),
            }
        }
        Outcome::Routed {
            event_id: ev.event_id.clone(),
            event: ev.event.as_str().to_string(),
            delivered,
            skipped,
        }
    }

    fn invalid(&self, rec: &InRecord<'_>, batch: &mut Batch, err: &InvalidEvent) -> Outcome {
        self.dead_letter(rec, batch, err.error_class(), err.to_string(), None)
    }

    fn dead_letter(
        &self,
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
            (header::STAGE, "router".to_string()),
            (header::ERROR_CLASS, class.to_string()),
            (header::REASON, reason.clone()),
            (header::ORIGIN_TOPIC, self.config.topics.canonical.clone()),
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
                p[..OVERSIZE_KEEP.min(p.len())].to_vec()
            }
            None => p.to_vec(),
        });
        batch.out.push(OutRecord {
            topic: self.topics.dlq.clone(),
            partition: None,
            key: rec.key.map(<[u8]>::to_vec),
            payload,
            headers,
        });
        Outcome::Invalid { class, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline() -> Pipeline {
        let cfg = Config::parse(
            r#"
[destinations.meta]
type = "meta_capi"
pixel_id = "1"
access_token = "t"
[destinations.hook]
type = "webhook"
url = "http://127.0.0.1:1/"
secret = "0123456789abcdef"
consent = "analytics"
"#,
            std::path::Path::new("t.toml"),
            &|_| None,
        )
        .unwrap();
        let mut p = Pipeline::new(Arc::new(cfg));
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
        b.out.iter().map(|o| &*o.topic).collect()
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
                "switchyard.identity",
                "switchyard.deliver.hook",
                "switchyard.deliver.meta",
                "switchyard.dedup",
            ]
        );
        let mark = &b.out[3];
        assert_eq!(mark.partition, Some(0));
        assert_eq!(
            dedup::decode_chunk(mark.payload.as_ref().unwrap()),
            Some(vec![(dedup::key_of("e1"), 1000)])
        );
        let d: Delivery = serde_json::from_slice(b.out[2].payload.as_ref().unwrap()).unwrap();
        assert_eq!(d.name, "Purchase");
        assert_eq!(d.origin.offset, 7);
        assert_eq!(b.offsets[&0], (7, 7));
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
        assert!(later.out.is_empty());
    }

    #[test]
    fn misskeyed_records_are_republished_under_their_event_id() {
        let mut p = pipeline();
        let mut b = Batch::default();
        p.process(&rec(Some("user-9"), PURCHASE, 1), 1000, &mut b);
        p.process(&rec(None, PURCHASE, 2), 1000, &mut b);
        assert_eq!(topics(&b), vec!["events.canonical", "events.canonical"]);
        assert!(
            b.out
                .iter()
                .all(|o| o.key.as_deref() == Some(b"e1".as_slice()))
        );
        assert_eq!(b.outcomes[0].label(), "rekeyed");
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
        assert_eq!(b.out.len(), cases.len());
        for (out, (r, class)) in b.out.iter().zip(&cases) {
            assert_eq!(&*out.topic, "switchyard.dlq");
            let h: HashMap<&str, &str> =
                out.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            assert_eq!(h[header::ERROR_CLASS], *class);
            assert_eq!(h[header::ORIGIN_OFFSET], r.offset.to_string());
            assert!(!h[header::REASON].is_empty());
            if *class == "oversize" {
                assert_eq!(out.payload.as_ref().unwrap().len(), OVERSIZE_KEEP);
            } else {
                assert_eq!(out.payload.as_deref(), r.payload);
            }
        }
        let schema = b.out[3]
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
    fn expired_keys_get_tombstones() {
        let mut p = pipeline();
        let mut b = Batch::default();
        p.process(&rec(Some("e1"), PURCHASE, 1), 1000, &mut b);
        p.seal(&mut b);
        p.commit(&b);
        let mut t = Batch::default();
        assert_eq!(p.expire(1000 + 48 * 3600 + 1, &mut t), 1);
        assert_eq!(t.out[0].payload, None);
        assert_eq!(t.out[0].partition, Some(0));
        assert_eq!(p.dedup_keys(), 0);
    }
}
