//! The records a sink writes: dead letters, delivery-ledger outcomes and
//! parked retries, and the in-flight event they are built from.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use serde::{Deserialize, Serialize};

use super::retry::cut;
use crate::delivery::Delivery;
use crate::delivery::dead_letter::{header, stage};
use crate::kafka::Position;

/// The most of a vendor response a dead letter keeps.
pub const RESPONSE_EXCERPT_BYTES: usize = 1024;
/// The most of a reason (often a vendor's words) records and logs keep.
pub const REASON_MAX_BYTES: usize = 2048;
/// The most of an error class kept: some are vendors' codes, and classes
/// are metric labels too.
pub const CLASS_MAX_BYTES: usize = 64;

/// One record being delivered: the decoded delivery (if it decoded), its raw
/// bytes for the dead-letter and retry topics, and its attempt history.
#[derive(Debug, Clone)]
pub struct Item {
    pub delivery: Option<Delivery>,
    pub raw: Vec<u8>,
    pub key: Option<Vec<u8>>,
    /// The record's headers other than switchyard's bookkeeping ones.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Where this copy was read (deliver or retry topic): its offset commits.
    pub source: Position,
    /// Where the delivery was first read from the deliver topic.
    pub origin: Position,
    pub attempts: u32,
    pub first_attempt: Option<DateTime<Utc>>,
    pub last_attempt: Option<DateTime<Utc>>,
    /// When a parked record may be tried again.
    pub due: Option<DateTime<Utc>>,
    /// Why it was parked (retry records).
    pub reason: Option<String>,
    /// When a sink last wrote it back unchanged because it was not due yet.
    pub requeued_at: Option<DateTime<Utc>>,
    /// The assignment of its source partition it was read in (see
    /// [`super::offsets`]); set by the engine.
    pub epoch: u64,
}

impl Item {
    /// An item for `delivery` as if read at `at`, for sends that do not
    /// come from a topic (the sink benchmark, tests).
    pub fn unread(delivery: Delivery, at: Position) -> Item {
        Item {
            raw: serde_json::to_vec(&delivery).expect("deliveries serialise"),
            delivery: Some(delivery),
            key: None,
            headers: Vec::new(),
            source: at.clone(),
            origin: at,
            attempts: 0,
            first_attempt: None,
            last_attempt: None,
            due: None,
            reason: None,
            requeued_at: None,
            epoch: 0,
        }
    }

    pub fn from_message(m: &BorrowedMessage<'_>) -> Item {
        let raw = m.payload().unwrap_or_default().to_vec();
        let source = Position {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
        };
        let mut own = std::collections::HashMap::new();
        let mut headers = Vec::new();
        if let Some(hs) = m.headers() {
            for h in hs.iter() {
                let v = h.value.unwrap_or_default();
                if header::is_own(h.key) {
                    own.insert(h.key, String::from_utf8_lossy(v).into_owned());
                } else {
                    headers.push((h.key.to_string(), v.to_vec()));
                }
            }
        }
        let time = |k: &str| own.get(k).and_then(|v| v.parse::<DateTime<Utc>>().ok());
        let origin = match (
            own.get(header::ORIGIN_TOPIC),
            own.get(header::ORIGIN_PARTITION)
                .and_then(|p| p.parse().ok()),
            own.get(header::ORIGIN_OFFSET).and_then(|o| o.parse().ok()),
        ) {
            (Some(t), Some(p), Some(o)) => Position {
                topic: t.clone(),
                partition: p,
                offset: o,
            },
            _ => source.clone(),
        };
        Item {
            delivery: serde_json::from_slice(&raw).ok(),
            key: m.key().map(<[u8]>::to_vec),
            attempts: own
                .get(header::ATTEMPTS)
                .and_then(|a| a.parse().ok())
                .unwrap_or(0),
            first_attempt: time(header::FIRST_ATTEMPT),
            last_attempt: time(header::LAST_ATTEMPT),
            due: time(header::DUE),
            // Written by any version of switchyard, so cut again.
            reason: own
                .get(header::REASON)
                .map(|r| cut(r, REASON_MAX_BYTES).into_owned()),
            requeued_at: time(header::REQUEUED_AT),
            epoch: 0,
            raw,
            headers,
            source,
            origin,
        }
    }

    /// The person this event is about (ordering key); empty when undecodable.
    pub fn anchor(&self) -> &str {
        self.delivery.as_ref().map_or("", Delivery::key)
    }

    pub fn event_id(&self) -> Option<&str> {
        self.delivery.as_ref().map(|d| d.event.event_id.as_str())
    }

    fn history_headers(&self) -> OwnedHeaders {
        let mut h = OwnedHeaders::new();
        for (k, v) in &self.headers {
            h = h.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let put = |h: OwnedHeaders, k: &str, v: String| {
            h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            })
        };
        h = put(h, header::ATTEMPTS, self.attempts.to_string());
        if let Some(t) = self.first_attempt {
            h = put(h, header::FIRST_ATTEMPT, t.to_rfc3339());
        }
        if let Some(t) = self.last_attempt {
            h = put(h, header::LAST_ATTEMPT, t.to_rfc3339());
        }
        h = put(h, header::ORIGIN_TOPIC, self.origin.topic.clone());
        h = put(
            h,
            header::ORIGIN_PARTITION,
            self.origin.partition.to_string(),
        );
        put(h, header::ORIGIN_OFFSET, self.origin.offset.to_string())
    }

    /// Headers of this item's record on the retry topic; `requeued_at` marks
    /// a record written back unchanged because it was not due yet.
    pub fn retry_headers(
        &self,
        destination: &str,
        due: DateTime<Utc>,
        reason: &str,
        requeued_at: Option<DateTime<Utc>>,
    ) -> OwnedHeaders {
        let mut h = self.history_headers();
        if let Some(t) = requeued_at {
            h = h.insert(Header {
                key: header::REQUEUED_AT,
                value: Some(&t.to_rfc3339()),
            });
        }
        h.insert(Header {
            key: header::DESTINATION,
            value: Some(destination),
        })
        .insert(Header {
            key: header::DUE,
            value: Some(&due.to_rfc3339()),
        })
        .insert(Header {
            key: header::REASON,
            value: Some(&*cut(reason, REASON_MAX_BYTES)),
        })
    }

    /// Headers of this item's dead letter.
    pub fn dlq_headers(&self, destination: &str, rejection: &Rejection) -> OwnedHeaders {
        let mut h = self
            .history_headers()
            .insert(Header {
                key: header::DESTINATION,
                value: Some(destination),
            })
            .insert(Header {
                key: header::STAGE,
                value: Some(stage::SINK),
            })
            .insert(Header {
                key: header::ERROR_CLASS,
                value: Some(&*cut(&rejection.class, CLASS_MAX_BYTES)),
            })
            .insert(Header {
                key: header::REASON,
                value: Some(&*cut(&rejection.reason, REASON_MAX_BYTES)),
            })
            .insert(Header {
                key: header::RESPONSE,
                value: Some(&*cut(&rejection.response, RESPONSE_EXCERPT_BYTES)),
            });
        if let Some(s) = rejection.status {
            h = h.insert(Header {
                key: header::HTTP_STATUS,
                value: Some(&s.to_string()),
            });
        }
        h
    }
}

#[cfg(test)]
impl Item {
    /// `person`'s event read at `source`, first read at `origin`.
    pub(crate) fn for_test(source: Position, origin: Position, person: &str) -> Item {
        let event = serde_json::json!({
            "event": "purchase", "event_id": format!("e{}", origin.offset),
            "occurred_at": "2026-11-26T14:03:11Z", "user_id": person
        });
        let d = crate::destinations::test_support::delivery(
            "d",
            "purchase",
            event,
            serde_json::json!({}),
        );
        Item {
            raw: serde_json::to_vec(&d).expect("a delivery"),
            delivery: Some(d),
            key: None,
            headers: Vec::new(),
            source,
            origin,
            attempts: 1,
            first_attempt: None,
            last_attempt: None,
            due: None,
            reason: None,
            requeued_at: None,
            epoch: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub class: String,
    pub reason: String,
    pub status: Option<u16>,
    /// The head of the vendor's response body (see `RESPONSE_EXCERPT_BYTES`).
    pub response: String,
}

/// How one item ended in this sink.
#[derive(Debug, Clone, PartialEq)]
pub enum Final {
    Delivered {
        status: u16,
        latency: Duration,
    },
    Rejected(Rejection),
    Parked {
        due: DateTime<Utc>,
        reason: String,
    },
    /// A retry record read before it was due, written back unchanged to the
    /// end of its partition at `at`.
    Requeued {
        due: DateTime<Utc>,
        reason: String,
        at: DateTime<Utc>,
    },
}

/// A delivery-ledger record on `<prefix>.outcomes`, key `event_id/destination`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub event_id: String,
    pub destination: String,
    /// `delivered` or `rejected`.
    pub status: String,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_attempt_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub recorded_at: DateTime<Utc>,
    /// The `switchyard replay` that wrote the delivery, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay: Option<String>,
}

/// Per (destination, event_id) of `destinations`: whether the latest
/// outcome on the ledger `topic` written since `since_ms` (unix ms) says
/// delivered (else rejected). Blocking: call it from `spawn_blocking`.
pub fn latest_outcomes(
    kafka: &crate::config::KafkaConfig,
    bootstrap: &str,
    topic: &str,
    since_ms: i64,
    destinations: &std::collections::HashSet<String>,
) -> Result<HashMap<(String, String), bool>, crate::kafka::reader::ReadError> {
    let mut latest = HashMap::new();
    crate::kafka::reader::scan(kafka, bootstrap, topic, Some(since_ms), |m| {
        if let Some(e) = m
            .payload()
            .and_then(|p| serde_json::from_slice::<LedgerEntry>(p).ok())
            .filter(|e| destinations.contains(&e.destination))
        {
            latest.insert((e.destination, e.event_id), e.status == "delivered");
        }
    })?;
    Ok(latest)
}

pub fn ledger_key(event_id: &str, destination: &str) -> String {
    format!("{event_id}/{destination}")
}

impl LedgerEntry {
    pub fn new(item: &Item, destination: &str, fin: &Final) -> Option<LedgerEntry> {
        let event_id = item.event_id()?.to_string();
        let (status, http_status, latency_ms, error_class) = match fin {
            Final::Delivered { status, latency } => (
                "delivered",
                Some(*status),
                Some(u64::try_from(latency.as_millis()).unwrap_or(u64::MAX)),
                None,
            ),
            Final::Rejected(r) => ("rejected", r.status, None, Some(r.class.clone())),
            Final::Parked { .. } | Final::Requeued { .. } => return None,
        };
        Some(LedgerEntry {
            event_id,
            destination: destination.to_string(),
            status: status.to_string(),
            attempts: item.attempts,
            http_status,
            latency_ms,
            error_class,
            first_attempt_at: item.first_attempt,
            last_attempt_at: item.last_attempt,
            recorded_at: Utc::now(),
            replay: item
                .headers
                .iter()
                .find(|(k, _)| k == header::REPLAY)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned()),
        })
    }
}

/// Event ids the ledger records as delivered to one destination, for the
/// last `window` and at most `max_entries` of them (the oldest go first).
///
/// Ids are kept as 128-bit digests, 80–100 bytes an entry with the expiry
/// queue: a resend is caught as long as its first delivery is in the index.
#[derive(Debug)]
pub struct LedgerIndex {
    window: chrono::Duration,
    max_entries: usize,
    /// Digest → when it was recorded delivered (unix seconds).
    delivered: HashMap<IdDigest, i64>,
    /// (recorded, digest), oldest first; may hold pairs already replaced or
    /// removed in `delivered`, which expiry skips.
    order: VecDeque<(i64, IdDigest)>,
    /// Entries dropped before their window ended, to stay within `max_entries`.
    evicted: u64,
}

type IdDigest = [u8; 16];

fn digest(event_id: &str) -> IdDigest {
    use sha2::{Digest, Sha256};
    let full = Sha256::digest(event_id.as_bytes());
    let mut out = [0; 16];
    out.copy_from_slice(&full[..16]);
    out
}

impl LedgerIndex {
    pub fn new(window: Duration, max_entries: usize) -> LedgerIndex {
        LedgerIndex {
            window: chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX),
            max_entries: max_entries.max(1),
            delivered: HashMap::new(),
            order: VecDeque::new(),
            evicted: 0,
        }
    }

    /// Folds one ledger record (key `event_id/destination`) into the index;
    /// records older than the window at `now` are left out.
    pub fn apply(
        &mut self,
        destination: &str,
        key: &[u8],
        value: Option<&[u8]>,
        now: DateTime<Utc>,
    ) {
        let Some(event_id) = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_suffix(destination))
            .and_then(|k| k.strip_suffix('/'))
        else {
            return;
        };
        match value.and_then(|v| serde_json::from_slice::<LedgerEntry>(v).ok()) {
            Some(e) if e.status == "delivered" => {
                if e.recorded_at > now - self.window {
                    self.record(digest(event_id), e.recorded_at.timestamp());
                    // Records arrive partition by partition, not in time
                    // order: trim in sorted rounds, not on every insert.
                    if self.order.len() >= self.max_entries.saturating_add(self.max_entries / 2) {
                        self.trim(now);
                    }
                }
            }
            _ => {
                self.delivered.remove(&digest(event_id));
            }
        }
    }

    /// Call once every record is applied: sorts by time and drops what is
    /// beyond the window or the size limit.
    pub fn loaded(&mut self, now: DateTime<Utc>) {
        self.trim(now);
    }

    fn trim(&mut self, now: DateTime<Utc>) {
        self.order.make_contiguous().sort_unstable();
        self.expire(now);
    }

    fn record(&mut self, id: IdDigest, at: i64) {
        self.delivered.insert(id, at);
        self.order.push_back((at, id));
    }

    pub fn insert(&mut self, event_id: &str, now: DateTime<Utc>) {
        self.record(digest(event_id), now.timestamp());
        if self.order.len() > self.max_entries {
            self.expire(now);
        }
    }

    /// Drops entries older than the window, then the oldest beyond `max_entries`.
    pub fn expire(&mut self, now: DateTime<Utc>) {
        let cutoff = (now - self.window).timestamp();
        while let Some(&(at, id)) = self.order.front() {
            let over = self.order.len() > self.max_entries;
            if at > cutoff && !over {
                break;
            }
            self.order.pop_front();
            if self.delivered.get(&id) == Some(&at) {
                self.delivered.remove(&id);
                if at > cutoff {
                    self.evicted += 1;
                }
            }
        }
    }

    pub fn is_delivered(&self, event_id: &str, now: DateTime<Utc>) -> bool {
        let cutoff = (now - self.window).timestamp();
        self.delivered
            .get(&digest(event_id))
            .is_some_and(|at| *at > cutoff)
    }

    pub fn len(&self) -> usize {
        self.delivered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.delivered.is_empty()
    }

    /// Entries dropped early to stay within `max_entries`, since start.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// When the oldest entry still held was recorded.
    pub fn oldest(&self) -> Option<DateTime<Utc>> {
        self.order
            .iter()
            .find(|(at, id)| self.delivered.get(id) == Some(at))
            .and_then(|(at, _)| DateTime::from_timestamp(*at, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(status: &str) -> Vec<u8> {
        serde_json::to_vec(&LedgerEntry {
            event_id: "e1".into(),
            destination: "hook".into(),
            status: status.into(),
            attempts: 1,
            http_status: Some(200),
            latency_ms: Some(3),
            error_class: None,
            first_attempt_at: None,
            last_attempt_at: None,
            recorded_at: Utc::now(),
            replay: None,
        })
        .unwrap()
    }

    fn entry_at(status: &str, at: DateTime<Utc>) -> Vec<u8> {
        let mut e: LedgerEntry = serde_json::from_slice(&entry(status)).unwrap();
        e.recorded_at = at;
        serde_json::to_vec(&e).unwrap()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn index_keeps_delivered_ids_of_its_destination() {
        let now = Utc::now();
        let mut idx = LedgerIndex::new(48 * HOUR, 1000);
        idx.apply("hook", b"e1/hook", Some(&entry("delivered")), now);
        idx.apply("hook", b"e2/other", Some(&entry("delivered")), now);
        idx.apply("hook", b"e3/hook", Some(&entry("rejected")), now);
        idx.loaded(now);
        assert!(idx.is_delivered("e1", now));
        assert!(!idx.is_delivered("e2", now));
        assert!(!idx.is_delivered("e3", now));
        idx.apply("hook", b"e1/hook", None, now);
        assert!(idx.is_empty(), "a tombstone forgets the event");
        assert_eq!(ledger_key("e1", "hook"), "e1/hook");
    }

    #[test]
    fn entries_older_than_the_window_are_left_out_on_load_and_expire_while_running() {
        let now = Utc::now();
        let h = |n: i64| now - chrono::Duration::hours(n);
        let mut idx = LedgerIndex::new(48 * HOUR, 1000);
        // Out of time order, as partitions interleave.
        idx.apply("hook", b"new/hook", Some(&entry_at("delivered", h(1))), now);
        idx.apply(
            "hook",
            b"old/hook",
            Some(&entry_at("delivered", h(49))),
            now,
        );
        idx.apply(
            "hook",
            b"mid/hook",
            Some(&entry_at("delivered", h(47))),
            now,
        );
        idx.loaded(now);
        assert_eq!(idx.len(), 2, "the 49 h old outcome is not loaded");
        assert!(!idx.is_delivered("old", now));
        assert!(idx.is_delivered("mid", now));
        assert_eq!(idx.oldest().map(|t| t.timestamp()), Some(h(47).timestamp()));

        // Two hours later `mid` is past the window: not delivered any more,
        // even before expiry runs, and expiry frees it.
        let later = now + chrono::Duration::hours(2);
        assert!(!idx.is_delivered("mid", later));
        idx.insert("fresh", later);
        idx.expire(later);
        assert_eq!(idx.len(), 2);
        assert!(idx.is_delivered("new", later));
        assert!(idx.is_delivered("fresh", later));
        assert_eq!(idx.evicted(), 0, "expired, not evicted");
        // Everything expires eventually; nothing is left in the queue.
        idx.expire(later + chrono::Duration::hours(48));
        assert!(idx.is_empty());
        assert!(idx.order.is_empty());
    }

    #[test]
    fn the_index_never_holds_more_than_its_limit() {
        let now = Utc::now();
        let mut idx = LedgerIndex::new(48 * HOUR, 100);
        for i in 0..1000 {
            let at = now - chrono::Duration::seconds(1000 - i);
            let key = format!("e{i}/hook");
            idx.apply(
                "hook",
                key.as_bytes(),
                Some(&entry_at("delivered", at)),
                now,
            );
            assert!(idx.order.len() <= 150, "bounded while loading");
        }
        idx.loaded(now);
        assert_eq!(idx.len(), 100);
        assert!(idx.is_delivered("e999", now), "the newest are kept");
        assert!(!idx.is_delivered("e899", now));
        for i in 0..500 {
            idx.insert(&format!("run{i}"), now);
            assert!(idx.order.len() <= 100);
        }
        assert_eq!(idx.len(), 100);
        assert!(idx.is_delivered("run499", now));
        assert!(idx.evicted() >= 1300);
        // The same event delivered again replaces its entry rather than
        // growing the index.
        for _ in 0..50 {
            idx.insert("again", now);
        }
        assert!(idx.len() <= 100 && idx.order.len() <= 100);
    }
}
