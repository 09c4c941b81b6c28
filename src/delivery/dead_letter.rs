//! The dead-letter record: what the router and every sink write to
//! `<prefix>.dlq`, and what `switchyard dlq` reads back. The payload is the
//! record that failed, whole (or cut, as the headers say); the headers say
//! where it came from, which stage gave up on it and why. Header names and
//! values are a contract with operators' tooling: never rename them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Headers};

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
    /// When a sink wrote a not-yet-due retry record back to the end of its
    /// partition (so one far-off record does not hold up the nearer ones).
    pub const REQUEUED_AT: &str = "switchyard-requeued-at";
    pub const REDRIVEN_FROM: &str = "switchyard-redriven-from";
    /// Router dead letters: when the record failed, and the input record's
    /// own timestamp and size (oversize payloads are cut).
    pub const FAILED_AT: &str = "switchyard-failed-at";
    pub const ORIGIN_TIMESTAMP_MS: &str = "switchyard-origin-timestamp-ms";
    pub const ORIGIN_SIZE: &str = "switchyard-origin-size";
    pub const TRUNCATED: &str = "switchyard-truncated";
    /// On a record the router re-published to its event_id's partition:
    /// where the original was (`<partition>/<offset>`), and why it was moved
    /// (`wrong_key`, `wrong_partition`).
    pub const REROUTED_FROM: &str = "switchyard-rerouted-from";
    pub const REROUTE_REASON: &str = "switchyard-reroute-reason";
    /// On a delivery: identity hints the router dropped as malformed, one
    /// `<pointer>: <why>` per hint, separated by "; " (never the value).
    pub const HINTS_DROPPED: &str = "switchyard-hints-dropped";

    /// On a delivery `switchyard replay` wrote: the replay's id (its start
    /// time), kept through retries and onto dead letters.
    pub const REPLAY: &str = "switchyard-replay";
    /// On a replayed delivery written with `--force`: the sink sends it even
    /// when its ledger shows the event delivered.
    pub const REPLAY_FORCE: &str = "switchyard-replay-force";

    /// Headers describing one attempt history; never copied onto a new
    /// record. Where a record came from (a redrive, a replay) is kept.
    pub fn is_own(name: &str) -> bool {
        name.starts_with("switchyard-") && !matches!(name, REDRIVEN_FROM | REPLAY | REPLAY_FORCE)
    }
}

/// Values of [`header::STAGE`]: which role gave the record up.
pub mod stage {
    pub const ROUTER: &str = "router";
    pub const SINK: &str = "sink";
}

/// One dead letter as listed and filtered.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub at: Option<DateTime<Utc>>,
    pub destination: String,
    pub stage: String,
    pub error_class: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl DeadLetter {
    pub fn from_message(m: &BorrowedMessage<'_>) -> DeadLetter {
        let mut headers = Vec::new();
        let mut get = BTreeMap::new();
        if let Some(hs) = m.headers() {
            for h in hs.iter() {
                let v = h.value.unwrap_or_default();
                get.insert(h.key.to_string(), String::from_utf8_lossy(v).into_owned());
                headers.push((h.key.to_string(), v.to_vec()));
            }
        }
        let field = |k: &str| get.get(k).cloned().unwrap_or_default();
        DeadLetter {
            partition: m.partition(),
            offset: m.offset(),
            at: m
                .timestamp()
                .to_millis()
                .and_then(DateTime::<Utc>::from_timestamp_millis),
            destination: field(header::DESTINATION),
            stage: field(header::STAGE),
            error_class: field(header::ERROR_CLASS),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers,
        }
    }
}
