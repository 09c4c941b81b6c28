//! The records a sink writes: dead letters, delivery-ledger outcomes and
//! parked retries, and the in-flight event they are built from.

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use serde::{Deserialize, Serialize};

use crate::delivery::Delivery;

/// Header names switchyard sets on dead letters (router and sink alike, so
/// `dlq list` reads both) and retry records.
pub mod header {
    pub const DESTINATION: &str = "switchyard-destination";
    pub const STAGE: &str = "switchyard-stage";
    pub const ERROR_CLASS: &str = "switchyard-error-class";
    pub const REASON: &str = "switchyard-reason";
    pub const HTTP_STATUS: &str = "switchyard-http-status";
    pub const RESPONSE: &str = "switchyard-response";
    pub const ATTEMPTS: &str = "switchyard-attempts";
    pub const FIRST_ATTEMPT: &str = "switchyard-first-attempt";
    pub const LAST_ATTEMPT: &str = "switchyard-last-attempt";
    pub const ORIGIN_TOPIC: &str = "switchyard-origin-topic";
    pub const ORIGIN_PARTITION: &str = "switchyard-origin-partition";
    pub const ORIGIN_OFFSET: &str = "switchyard-origin-offset";
    pub const DUE: &str = "switchyard-due";
    pub const REDRIVEN_FROM: &str = "switchyard-redriven-from";
    /// Router dead letters: when the record failed, and the input record's
    /// own timestamp and size (oversize payloads are cut).
    pub const FAILED_AT: &str = "switchyard-failed-at";
    pub const ORIGIN_TIMESTAMP_MS: &str = "switchyard-origin-timestamp-ms";
    pub const ORIGIN_SIZE: &str = "switchyard-origin-size";
    pub const TRUNCATED: &str = "switchyard-truncated";
    /// On a record the router re-published under its event_id: where the
    /// mis-keyed original was (`<partition>/<offset>`).
    pub const REKEYED_FROM: &str = "switchyard-rekeyed-from";

    /// Headers describing one attempt history; never copied onto a new record.
    pub fn is_own(name: &str) -> bool {
        name.starts_with("switchyard-") && name != REDRIVEN_FROM
    }
}

/// The most of a vendor response a dead letter keeps.
pub const RESPONSE_EXCERPT_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

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
}

impl Item {
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

    /// Headers of this item's record on the retry topic.
    pub fn retry_headers(
        &self,
        destination: &str,
        due: DateTime<Utc>,
        reason: &str,
    ) -> OwnedHeaders {
        self.history_headers()
            .insert(Header {
                key: header::DESTINATION,
                value: Some(destination),
            })
            .insert(Header {
                key: header::DUE,
                value: Some(&due.to_rfc3339()),
            })
            .insert(Header {
                key: header::REASON,
                value: Some(reason),
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
                value: Some("sink"),
            })
            .insert(Header {
                key: header::ERROR_CLASS,
                value: Some(&rejection.class),
            })
            .insert(Header {
                key: header::REASON,
                value: Some(&rejection.reason),
            })
            .insert(Header {
                key: header::RESPONSE,
                value: Some(
                    super::retry::excerpt(rejection.response.as_bytes(), RESPONSE_EXCERPT_BYTES)
                        .as_bytes(),
                ),
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub class: String,
    pub reason: String,
    pub status: Option<u16>,
    /// The vendor's response body (cut to 1 KB when written).
    pub response: String,
}

/// How one item ended in this sink.
#[derive(Debug, Clone, PartialEq)]
pub enum Final {
    Delivered { status: u16, latency: Duration },
    Rejected(Rejection),
    Parked { due: DateTime<Utc>, reason: String },
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
            Final::Parked { .. } => return None,
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
        })
    }
}

/// Event ids the ledger records as delivered to one destination.
#[derive(Debug, Default)]
pub struct LedgerIndex {
    delivered: HashSet<String>,
}

impl LedgerIndex {
    /// Folds one ledger record (key `event_id/destination`) into the index.
    pub fn apply(&mut self, destination: &str, key: &[u8], value: Option<&[u8]>) {
        let Some(event_id) = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_suffix(destination))
            .and_then(|k| k.strip_suffix('/'))
        else {
            return;
        };
        match value.and_then(|v| serde_json::from_slice::<LedgerEntry>(v).ok()) {
            Some(e) if e.status == "delivered" => {
                self.delivered.insert(event_id.to_string());
            }
            _ => {
                self.delivered.remove(event_id);
            }
        }
    }

    pub fn insert(&mut self, event_id: &str) {
        self.delivered.insert(event_id.to_string());
    }

    pub fn is_delivered(&self, event_id: &str) -> bool {
        self.delivered.contains(event_id)
    }

    pub fn len(&self) -> usize {
        self.delivered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.delivered.is_empty()
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
        })
        .unwrap()
    }

    #[test]
    fn index_keeps_delivered_ids_of_its_destination() {
        let mut idx = LedgerIndex::default();
        idx.apply("hook", b"e1/hook", Some(&entry("delivered")));
        idx.apply("hook", b"e2/other", Some(&entry("delivered")));
        idx.apply("hook", b"e3/hook", Some(&entry("rejected")));
        assert!(idx.is_delivered("e1"));
        assert!(!idx.is_delivered("e2"));
        assert!(!idx.is_delivered("e3"));
        idx.apply("hook", b"e1/hook", None);
        assert!(idx.is_empty(), "a tombstone forgets the event");
        assert_eq!(ledger_key("e1", "hook"), "e1/hook");
    }
}
