//! `switchyard trace EVENT_ID`: one event's path as a timeline, from the
//! records switchyard left behind: its canonical copies and their
//! validation, the dedup decision, the identity the router added, each
//! enabled destination's route or skip, the delivery records (redrives and
//! replays among them), parked retries, the ledger's outcomes and the dead
//! letters.
//!
//! It finds them through the delivery ledger and the DLQ, not by reading
//! every topic: both are read from `--since`; the times and origin offsets
//! they hold say where to look in the canonical topic (only the event_id's
//! home partition), the deliver topics (the partition of the person's key
//! when it is known) and the retry topics, each read over a bounded time
//! window. An event with neither an outcome nor a dead letter (skipped
//! everywhere, or still on its way) is looked for in its home partition of
//! the canonical topic from `--since`.
//!
//! [`gather`] does the reading; [`build`] turns what was read into the
//! timeline and is pure, so it is tested without a broker.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Headers};
use serde::Serialize;
use serde_json::Value;
use thiserror::Error;

use crate::config::Config;
use crate::delivery::Delivery;
use crate::delivery::dead_letter::{header, stage};
use crate::event::{CanonicalEvent, ClickKind, InvalidEvent, parse_event};
use crate::kafka::reader::{self, Partitions, ReadError};
use crate::router::route;
use crate::sink::records::LedgerEntry;

/// How far back `--since` looks by default: the canonical and deliver
/// topics' retention.
pub const DEFAULT_SINCE: &str = "7d ago";
/// A canonical record precedes its first outcome or dead letter by the
/// router's and the sink's lag: how much of it the canonical window allows.
const BEFORE: chrono::Duration = chrono::Duration::hours(1);
/// How far past the latest time known the canonical, deliver and retry
/// windows reach (a later copy, a delivery not yet sent).
const AFTER: chrono::Duration = chrono::Duration::minutes(10);
/// The most of a vendor's reason or response a line shows.
const EXCERPT: usize = 240;

#[derive(Debug, Error)]
pub enum TraceError {
    #[error("reading {topic}: {source}")]
    Read { topic: String, source: ReadError },
    #[error("{0}")]
    Task(String),
}

/// One record read, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub at: Option<DateTime<Utc>>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, String>,
}

impl Rec {
    pub fn of(m: &BorrowedMessage<'_>) -> Rec {
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Rec {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            at: m
                .timestamp()
                .to_millis()
                .and_then(DateTime::from_timestamp_millis),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    fn place(&self) -> String {
        format!("{}/{}/{}", self.topic, self.partition, self.offset)
    }

    /// The canonical position a router dead letter names, if it names one.
    fn origin(&self) -> Option<(String, i32, i64)> {
        Some((
            self.header(header::ORIGIN_TOPIC)?.to_string(),
            self.header(header::ORIGIN_PARTITION)?.parse().ok()?,
            self.header(header::ORIGIN_OFFSET)?.parse().ok()?,
        ))
    }
}

/// What one read covered, for the report's "searched" line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Searched {
    pub topic: String,
    /// The partitions read; empty for a topic that holds nothing there.
    pub partitions: Vec<i32>,
    pub from: DateTime<Utc>,
    /// `None`: up to the end.
    pub to: Option<DateTime<Utc>>,
    pub records: u64,
}

/// Everything read about one event_id.
#[derive(Debug, Clone, Default)]
pub struct Found {
    /// Copies on the event_id's home partition of the canonical topic.
    pub canonical: Vec<Rec>,
    pub ledger: Vec<LedgerEntry>,
    /// Router and sink dead letters of the event.
    pub dead_letters: Vec<Rec>,
    /// Records of the event on deliver topics.
    pub deliveries: Vec<Rec>,
    /// Records of the event on retry topics.
    pub retries: Vec<Rec>,
    pub searched: Vec<Searched>,
}

impl Found {
    fn is_empty(&self) -> bool {
        self.canonical.is_empty()
            && self.ledger.is_empty()
            && self.dead_letters.is_empty()
            && self.deliveries.is_empty()
            && self.retries.is_empty()
    }
}

/// `id` as it appears in JSON, quotes included: records that do not hold
/// it are passed over without being parsed.
fn needle(id: &str) -> Vec<u8> {
    serde_json::to_vec(id).expect("a string serialises")
}

fn holds(payload: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(payload, needle).is_some()
}

/// Is this canonical-topic record (or router dead letter) a copy of `id`?
/// Keyed by it, or a JSON object whose `event_id` is it.
pub fn is_canonical_copy(id: &str, key: Option<&[u8]>, payload: &[u8]) -> bool {
    if key == Some(id.as_bytes()) {
        return true;
    }
    holds(payload, &needle(id))
        && serde_json::from_slice::<Value>(payload)
            .ok()
            .is_some_and(|v| v.get("event_id").and_then(Value::as_str) == Some(id))
}

/// The delivery record in `payload` when it is one of `id`.
pub fn delivery_of(id: &str, payload: &[u8]) -> Option<Delivery> {
    if !holds(payload, &needle(id)) {
        return None;
    }
    serde_json::from_slice::<Delivery>(payload)
        .ok()
        .filter(|d| d.event.event_id == id)
}

/// Is this dead letter about `id`? A sink's holds a delivery record, the
/// router's the canonical record.
pub fn is_dead_letter_of(id: &str, rec: &Rec) -> bool {
    match rec.header(header::STAGE) {
        Some(stage::SINK) => delivery_of(id, &rec.payload).is_some(),
        _ => is_canonical_copy(id, rec.key.as_deref(), &rec.payload),
    }
}

/// The identifier kinds the router added to `delivered` that the
/// publisher's `canonical` event did not carry: `user_id`, the email and
/// phone hashes (shortened), each `external_ids.KIND`, each `click_ids.KIND`.
/// Never a raw email or phone.
pub fn identity_added(canonical: &CanonicalEvent, delivered: &CanonicalEvent) -> Vec<String> {
    let mut out = Vec::new();
    if canonical.user_id.is_none() && delivered.user_id.is_some() {
        out.push("user_id".to_string());
    }
    if canonical.email.is_none()
        && canonical.email_sha256.is_none()
        && let Some(h) = &delivered.email_sha256
    {
        out.push(format!("email_sha256 {}", short_hash(h)));
    }
    if canonical.phone.is_none()
        && canonical.phone_sha256.is_none()
        && let Some(h) = &delivered.phone_sha256
    {
        out.push(format!("phone_sha256 {}", short_hash(h)));
    }
    for kind in delivered.external_ids.keys() {
        if !canonical.external_ids.contains_key(kind) {
            out.push(format!("external_ids.{kind}"));
        }
    }
    let had = |k| {
        canonical
            .click_ids
            .as_ref()
            .and_then(|c| c.get(k))
            .is_some()
    };
    if let Some(clicks) = &delivered.click_ids {
        for k in ClickKind::ALL {
            if clicks.get(k).is_some() && !had(k) {
                out.push(format!("click_ids.{}", click_name(k)));
            }
        }
    }
    out
}

fn click_name(k: ClickKind) -> String {
    serde_json::to_value(k)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn short_hash(h: &str) -> String {
    let head: String = h.chars().take(8).collect();
    format!("{head}…")
}

/// `s` cut to at most `max` characters, on one line.
fn excerpt(s: &str, max: usize) -> String {
    let one_line = s.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max).collect();
    cut.push('…');
    cut
}

/// One step of the timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub at: Option<DateTime<Utc>>,
    /// canonical, validate, dedup, identity, route, deliver, retry,
    /// outcome, dead-letter.
    pub stage: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    pub what: String,
}

/// One canonical copy, for `--json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Copy {
    pub place: String,
    pub at: Option<DateTime<Utc>>,
    pub valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One dead letter, for `--json`: where, when, and its switchyard headers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Letter {
    pub place: String,
    pub at: Option<DateTime<Utc>>,
    pub headers: BTreeMap<String, String>,
}

/// The timeline of one event_id.
#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    pub event_id: String,
    pub since: DateTime<Utc>,
    pub found: bool,
    pub canonical_topic: String,
    pub copies: Vec<Copy>,
    pub steps: Vec<Step>,
    pub ledger: Vec<LedgerEntry>,
    pub dead_letters: Vec<Letter>,
    pub searched: Vec<Searched>,
    /// What the trace cannot see, in words.
    pub limits: Vec<String>,
}

/// Builds the timeline of `id` from what was read.
pub fn build(config: &Config, id: &str, since: DateTime<Utc>, found: &Found) -> Trace {
    let canonical_topic = config.topics.canonical.clone();
    let mut steps = Vec::new();
    // Times to the millisecond, as shown and as Kafka stamps records, so
    // that a route and its delivery record of one instant keep their order.
    let step = |at: Option<DateTime<Utc>>, stage, destination: Option<&str>, what: String| Step {
        at: at.and_then(|t| DateTime::from_timestamp_millis(t.timestamp_millis())),
        stage,
        destination: destination.map(str::to_string),
        what,
    };

    // Canonical copies, validation, dedup.
    let mut copies: Vec<&Rec> = found.canonical.iter().collect();
    copies.sort_by_key(|r| r.offset);
    let parsed: Vec<Result<CanonicalEvent, InvalidEvent>> =
        copies.iter().map(|r| parse_event(&r.payload)).collect();
    let live: Vec<(&Rec, Delivery)> = found
        .deliveries
        .iter()
        .filter(|r| r.header(header::REPLAY).is_none() && r.header(header::REDRIVEN_FROM).is_none())
        .filter_map(|r| Some((r, delivery_of(id, &r.payload)?)))
        .collect();
    let routed_from: BTreeSet<(i32, i64)> = live
        .iter()
        .filter(|(_, d)| d.origin.topic == canonical_topic)
        .map(|(_, d)| (d.origin.partition, d.origin.offset))
        .collect();
    let window =
        chrono::Duration::from_std(config.router.dedup_window).unwrap_or(chrono::Duration::MAX);
    let mut first: Option<&Rec> = None;
    let n = copies.len();
    for (i, (rec, ev)) in copies.iter().zip(&parsed).enumerate() {
        let mut what = format!(
            "copy {} of {n} at {} ({})",
            i + 1,
            rec.place(),
            match rec.key.as_deref() {
                Some(k) if k == id.as_bytes() => "keyed by the event_id".to_string(),
                Some(k) => format!("keyed by {:?}", String::from_utf8_lossy(k)),
                None => "no key".to_string(),
            }
        );
        if let Some(from) = rec.header(header::REROUTED_FROM) {
            let reason = rec.header(header::REROUTE_REASON).unwrap_or("?");
            let _ = write!(
                what,
                "; the router moved it here from partition/offset {from} ({reason})"
            );
        }
        steps.push(step(rec.at, "canonical", None, what));
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                steps.push(step(
                    rec.at,
                    "validate",
                    None,
                    format!(
                        "invalid ({}): {}",
                        e.error_class(),
                        excerpt(&e.to_string(), EXCERPT)
                    ),
                ));
                continue;
            }
        };
        let mut what = format!("valid {} occurred at {}", ev.event, stamp(ev.occurred_at));
        if !ev.dropped_hints.is_empty() {
            let hints: Vec<String> = ev.dropped_hints.iter().map(|h| h.to_string()).collect();
            let _ = write!(what, "; identity hints dropped: {}", hints.join("; "));
        }
        steps.push(step(rec.at, "validate", None, what));
        let here = (rec.partition, rec.offset);
        let what = match first {
            None => {
                let mut w = "first copy of the id on its partition: passed dedup".to_string();
                if routed_from.contains(&here) {
                    w.push_str(", routed");
                } else if let Some((p, o)) = routed_from.iter().next() {
                    let _ = write!(w, "; yet the deliveries name partition/offset {p}/{o}");
                }
                w
            }
            Some(f) if routed_from.contains(&here) => format!(
                "routed again although offset {} came first (outside the dedup window, or the \
                 dedup state was lost)",
                f.offset
            ),
            Some(f) => {
                let within = match (f.at, rec.at) {
                    (Some(a), Some(b)) => b - a <= window,
                    _ => true,
                };
                if within {
                    format!(
                        "dropped as a duplicate of offset {} (no delivery names this copy)",
                        f.offset
                    )
                } else {
                    format!(
                        "not routed: no delivery names this copy, and it came more than the \
                         dedup window after offset {}",
                        f.offset
                    )
                }
            }
        };
        steps.push(step(rec.at, "dedup", None, what));
        first = first.or(Some(rec));
    }

    // Route or skip per enabled destination, and the identity added.
    let event = copies
        .iter()
        .zip(&parsed)
        .find_map(|(r, e)| e.as_ref().ok().map(|e| (*r, e)));
    let mut deliveries: Vec<(&Rec, Delivery)> = found
        .deliveries
        .iter()
        .filter_map(|r| Some((r, delivery_of(id, &r.payload)?)))
        .collect();
    deliveries.sort_by_key(|(r, _)| (r.at, r.offset));
    if let Some((rec, ev)) = event {
        for dest in config.enabled_destinations() {
            let first_delivery = live.iter().find(|(_, d)| d.destination == dest.name);
            let at = first_delivery.map_or(rec.at, |(_, d)| Some(d.routed_at));
            let what = match route::select(dest, ev) {
                Ok(name) => {
                    let mut w = format!("routed as {name}");
                    if first_delivery.is_none() {
                        w.push_str(
                            " by today's rules, but no delivery record of it was found (still \
                             on its way, an oversize delivery, or the config changed since)",
                        );
                    }
                    w
                }
                Err(skip) => format!("skipped: {}", skip.reason()),
            };
            steps.push(step(at, "route", Some(&dest.name), what));
            if let Some((_, d)) = first_delivery {
                let added = identity_added(ev, &d.event);
                let what = if added.is_empty() {
                    "nothing added".to_string()
                } else {
                    format!("added {}", added.join(", "))
                };
                steps.push(step(Some(d.routed_at), "identity", Some(&dest.name), what));
            }
        }
    }

    // Delivery records, parked retries, outcomes, dead letters.
    for (rec, d) in &deliveries {
        let mut what = format!("delivery record {} as {}", rec.place(), d.name);
        if let Some(r) = rec.header(header::REPLAY) {
            let _ = write!(what, "; written by the replay started {r}");
            if rec.header(header::REPLAY_FORCE).is_some() {
                what.push_str(" with --force");
            }
        }
        if let Some(from) = rec.header(header::REDRIVEN_FROM) {
            let _ = write!(what, "; redriven from dead letter {from}");
        }
        if let Some(h) = rec.header(header::HINTS_DROPPED) {
            let _ = write!(what, "; hints dropped: {h}");
        }
        steps.push(step(rec.at, "deliver", Some(&d.destination), what));
    }
    let mut retries: Vec<&Rec> = found.retries.iter().collect();
    retries.sort_by_key(|r| (r.at, r.offset));
    for rec in retries {
        let destination = rec.header(header::DESTINATION);
        let attempts = rec.header(header::ATTEMPTS).unwrap_or("?");
        let due = rec.header(header::DUE).map_or_else(
            || "?".to_string(),
            |d| d.parse().map_or_else(|_| d.to_string(), stamp),
        );
        let reason = excerpt(rec.header(header::REASON).unwrap_or(""), EXCERPT);
        let what = if rec.header(header::REQUEUED_AT).is_some() {
            format!(
                "written back to {} (not due yet), due {due}: {reason}",
                rec.place()
            )
        } else {
            format!(
                "parked on {} after {attempts} attempt(s), due {due}: {reason}",
                rec.place()
            )
        };
        steps.push(step(rec.at, "retry", destination, what));
    }
    let mut ledger = found.ledger.clone();
    ledger.sort_by_key(|e| e.recorded_at);
    for e in &ledger {
        let mut what = format!("{} after {} attempt(s)", e.status, e.attempts);
        if let Some(s) = e.http_status {
            let _ = write!(what, ", HTTP {s}");
        }
        if let Some(ms) = e.latency_ms {
            let _ = write!(what, " in {ms} ms");
        }
        if let Some(c) = &e.error_class {
            let _ = write!(what, ", {c}");
        }
        if let Some(t) = e.first_attempt_at {
            let _ = write!(what, "; first attempt {}", stamp(t));
        }
        steps.push(step(
            Some(e.recorded_at),
            "outcome",
            Some(&e.destination),
            what,
        ));
    }
    let mut letters: Vec<&Rec> = found.dead_letters.iter().collect();
    letters.sort_by_key(|r| (r.at, r.offset));
    for rec in &letters {
        let class = rec.header(header::ERROR_CLASS).unwrap_or("?");
        let reason = excerpt(rec.header(header::REASON).unwrap_or(""), EXCERPT);
        let what = if rec.header(header::STAGE) == Some(stage::SINK) {
            let mut w = format!("sink dead letter {}: {class}", rec.place());
            if let Some(s) = rec.header(header::HTTP_STATUS) {
                let _ = write!(w, ", HTTP {s}");
            }
            if let Some(a) = rec.header(header::ATTEMPTS) {
                let _ = write!(w, ", after {a} attempt(s)");
            }
            let _ = write!(w, ": {reason}");
            if let Some(r) = rec.header(header::RESPONSE).filter(|r| !r.is_empty()) {
                let _ = write!(w, "; response: {}", excerpt(r, EXCERPT));
            }
            if let Some(from) = rec.header(header::REDRIVEN_FROM) {
                let _ = write!(w, "; it was a redrive of {from}");
            }
            if let Some(r) = rec.header(header::REPLAY) {
                let _ = write!(w, "; it was a copy from the replay started {r}");
            }
            w
        } else {
            let origin = rec
                .origin()
                .map_or_else(|| "?".to_string(), |(t, p, o)| format!("{t}/{p}/{o}"));
            format!(
                "router dead letter {} of {origin}: {class}: {reason}",
                rec.place()
            )
        };
        let destination = rec.header(header::DESTINATION).filter(|d| !d.is_empty());
        steps.push(step(rec.at, "dead-letter", destination, what));
    }
    // In time order; steps of one time keep the order they were made in.
    steps.sort_by_key(|s| s.at);

    let found_any = !found.is_empty();
    Trace {
        event_id: id.to_string(),
        since,
        found: found_any,
        copies: copies
            .iter()
            .zip(&parsed)
            .map(|(r, e)| Copy {
                place: r.place(),
                at: r.at,
                valid: e.is_ok(),
                error: e.as_ref().err().map(|e| excerpt(&e.to_string(), EXCERPT)),
            })
            .collect(),
        canonical_topic,
        steps,
        ledger,
        dead_letters: letters
            .iter()
            .map(|r| Letter {
                place: r.place(),
                at: r.at,
                headers: r.headers.clone(),
            })
            .collect(),
        searched: found.searched.clone(),
        limits: limits(config, since),
    }
}

/// What a trace from `since` cannot see.
fn limits(config: &Config, since: DateTime<Utc>) -> Vec<String> {
    let days = |d: std::time::Duration| match d.as_secs() {
        s if s % 86_400 == 0 => format!("{} d", s / 86_400),
        _ => humantime::format_duration(d).to_string(),
    };
    vec![
        format!(
            "outcomes and dead letters written before {} (--since); dead letters are kept {} \
             (topics.dlq_retention), and the compacted ledger keeps only an event's latest \
             outcome per destination once compacted",
            stamp(since),
            days(config.topics.dlq_retention)
        ),
        format!(
            "the canonical and deliver topics keep 7 d as `topics create` makes them, retry \
             topics {} (topics.retry_retention); copies, deliveries and parked retries are looked for \
             only near the times the ledger and the DLQ give (1 h before, 10 min after)",
            days(config.topics.retry_retention)
        ),
        "copies the router never moved that sit on another partition than the event_id's \
         home; routes follow the current config's rules"
            .to_string(),
    ]
}

fn stamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl Trace {
    /// The human timeline: a header, one line per step, what it searched.
    pub fn text(&self) -> String {
        let mut out = String::new();
        if !self.found {
            let _ = writeln!(
                out,
                "no record of {} since {}",
                self.event_id,
                stamp(self.since)
            );
        } else {
            let _ = writeln!(
                out,
                "trace of {} since {}",
                self.event_id,
                stamp(self.since)
            );
            for s in &self.steps {
                let at = s.at.map_or_else(|| "-".to_string(), stamp);
                let _ = writeln!(
                    out,
                    "{at:<24}  {:<11} {:<14} {}",
                    s.stage,
                    s.destination.as_deref().unwrap_or("-"),
                    s.what
                );
            }
        }
        out.push_str("searched:\n");
        for s in &self.searched {
            let parts = if s.partitions.is_empty() {
                "no partitions".to_string()
            } else {
                let ps: Vec<String> = s.partitions.iter().map(i32::to_string).collect();
                format!("partition(s) {}", ps.join(","))
            };
            let to = s.to.map_or_else(|| "its end".to_string(), stamp);
            let _ = writeln!(
                out,
                "  {} {parts} from {} to {to}: {} record(s) read",
                s.topic,
                stamp(s.from),
                s.records
            );
        }
        out.push_str("cannot see:\n");
        for l in &self.limits {
            let _ = writeln!(out, "  {l}");
        }
        out
    }
}

/// Reads what switchyard kept about `id` since `since` (see the module's
/// documentation for where it looks) and builds its timeline.
pub async fn trace(
    config: Arc<Config>,
    bootstrap: &str,
    id: &str,
    since: DateTime<Utc>,
) -> Result<Trace, TraceError> {
    let (c, b, i) = (config.clone(), bootstrap.to_string(), id.to_string());
    let found = tokio::task::spawn_blocking(move || gather(&c, &b, &i, since, Utc::now()))
        .await
        .map_err(|e| TraceError::Task(e.to_string()))??;
    Ok(build(&config, id, since, &found))
}

/// Blocking: every read of a trace, in order (each narrows the next).
pub fn gather(
    config: &Config,
    bootstrap: &str,
    id: &str,
    since: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Found, TraceError> {
    let mut found = Found::default();
    let read = |topic: &str,
                which: &Partitions,
                (from, to): (DateTime<Utc>, Option<DateTime<Utc>>),
                earliest: &HashMap<i32, i64>,
                each: &mut dyn FnMut(&BorrowedMessage<'_>)|
     -> Result<Searched, TraceError> {
        let range = (
            from.timestamp_millis(),
            to.map_or(i64::MAX, |t| t.timestamp_millis()),
        );
        let w = reader::scan_window(
            &config.kafka,
            bootstrap,
            topic,
            which,
            range,
            earliest,
            each,
        )
        .map_err(|source| TraceError::Read {
            topic: topic.to_string(),
            source,
        })?;
        Ok(Searched {
            topic: topic.to_string(),
            partitions: w.partitions,
            from,
            to,
            records: w.records,
        })
    };
    let none = HashMap::new();

    // The ledger: the destinations and the times of every outcome.
    let prefix = format!("{id}/");
    let mut ledger = Vec::new();
    let searched = read(
        &config.topics.outcomes(),
        &Partitions::All,
        (since, None),
        &none,
        &mut |m| {
            if !m.key().is_some_and(|k| k.starts_with(prefix.as_bytes())) {
                return;
            }
            if let Some(e) = m
                .payload()
                .and_then(|p| serde_json::from_slice::<LedgerEntry>(p).ok())
                .filter(|e| e.event_id == id)
            {
                ledger.push(e);
            }
        },
    )?;
    found.searched.push(searched);
    found.ledger = ledger;

    // The DLQ: dead letters, with origin offsets.
    let mut letters = Vec::new();
    let searched = read(
        &config.topics.dlq(),
        &Partitions::All,
        (since, None),
        &none,
        &mut |m| {
            let rec = Rec::of(m);
            if is_dead_letter_of(id, &rec) {
                letters.push(rec);
            }
        },
    )?;
    found.searched.push(searched);
    found.dead_letters = letters;

    // Times known so far, and canonical offsets named.
    let mut times: Vec<DateTime<Utc>> = Vec::new();
    for e in &found.ledger {
        times.extend(
            [Some(e.recorded_at), e.first_attempt_at, e.last_attempt_at]
                .into_iter()
                .flatten(),
        );
    }
    let canonical = &config.topics.canonical;
    let mut origins: HashMap<i32, i64> = HashMap::new();
    let mut name = |topic: &str, p: i32, o: i64| {
        if topic == canonical {
            let e = origins.entry(p).or_insert(o);
            *e = (*e).min(o);
        }
    };
    for l in &found.dead_letters {
        times.extend(l.at);
        times.extend(
            l.header(header::ORIGIN_TIMESTAMP_MS)
                .and_then(|v| v.parse().ok())
                .and_then(DateTime::from_timestamp_millis),
        );
        if let Some(d) = delivery_of(id, &l.payload) {
            times.push(d.routed_at);
            name(&d.origin.topic, d.origin.partition, d.origin.offset);
        } else if let Some((t, p, o)) = l.origin() {
            name(&t, p, o);
        }
    }

    // The canonical copies, on the event_id's home partition.
    let window = match (times.iter().min(), times.iter().max()) {
        (Some(a), Some(b)) => (*a - BEFORE, Some(*b + AFTER)),
        // Nothing to narrow it: the partition from --since.
        _ => (since, None),
    };
    let mut copies = Vec::new();
    let searched = read(
        canonical,
        &Partitions::OfKeys(vec![id.as_bytes().to_vec()]),
        window,
        &origins,
        &mut |m| {
            if is_canonical_copy(id, m.key(), m.payload().unwrap_or_default()) {
                copies.push(Rec::of(m));
            }
        },
    )?;
    found.searched.push(searched);
    found.canonical = copies;
    times.extend(found.canonical.iter().filter_map(|r| r.at));
    let Some(earliest) = times.iter().min().copied() else {
        return Ok(found);
    };
    let latest = times.iter().max().copied().unwrap_or(earliest).min(now) + AFTER;
    let event = found
        .canonical
        .iter()
        .find_map(|r| parse_event(&r.payload).ok());
    let from = found
        .canonical
        .iter()
        .filter_map(|r| r.at)
        .min()
        .unwrap_or(earliest - BEFORE);

    // Delivery records, then parked retries, per destination that has a
    // trace of the event or that the router's rules send it to.
    for dest in config.enabled_destinations() {
        let ledgered = found.ledger.iter().any(|e| e.destination == dest.name);
        let letters: Vec<&Rec> = found
            .dead_letters
            .iter()
            .filter(|l| l.header(header::DESTINATION) == Some(dest.name.as_str()))
            .collect();
        let routed = event
            .as_ref()
            .is_some_and(|ev| route::select(dest, ev).is_ok());
        if !ledgered && letters.is_empty() && !routed {
            continue;
        }
        let topic = config.topics.deliver(&dest.name);
        // The person keys the delivery: a dead letter's key, and the
        // event's user_id when it has one. Without either (an anonymous
        // event, whose user the router may have known) every partition.
        let mut keys: Vec<Vec<u8>> = letters.iter().filter_map(|l| l.key.clone()).collect();
        if let Some(user) = event.as_ref().and_then(|ev| ev.user_id.as_deref()) {
            keys.push(user.as_bytes().to_vec());
        }
        let which = if keys.is_empty() {
            Partitions::All
        } else {
            Partitions::OfKeys(keys)
        };
        let mut at: HashMap<i32, i64> = HashMap::new();
        for l in &letters {
            if let Some((_, p, o)) = l.origin().filter(|(t, _, _)| *t == topic) {
                let e = at.entry(p).or_insert(o);
                *e = (*e).min(o);
            }
        }
        let mut records = Vec::new();
        let searched = read(&topic, &which, (from, Some(latest)), &at, &mut |m| {
            if delivery_of(id, m.payload().unwrap_or_default()).is_some() {
                records.push(Rec::of(m));
            }
        })?;
        found.searched.push(searched);
        let retried = found
            .ledger
            .iter()
            .any(|e| e.destination == dest.name && e.attempts > 1)
            || !letters.is_empty()
            || !ledgered;
        if retried && !records.is_empty() {
            let keys: Vec<Vec<u8>> = records.iter().filter_map(|r| r.key.clone()).collect();
            let which = if keys.is_empty() {
                Partitions::All
            } else {
                Partitions::OfKeys(keys)
            };
            let start = records.iter().filter_map(|r| r.at).min().unwrap_or(from);
            let mut parked = Vec::new();
            let searched = read(
                &config.topics.retry(&dest.name),
                &which,
                (start, Some(latest)),
                &none,
                &mut |m| {
                    if delivery_of(id, m.payload().unwrap_or_default()).is_some() {
                        parked.push(Rec::of(m));
                    }
                },
            )?;
            found.searched.push(searched);
            found.retries.extend(parked);
        }
        found.deliveries.extend(records);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(
            r#"
[topics]
canonical = "ev"
prefix = "sy"
[destinations.hook]
type = "webhook"
url = "http://127.0.0.1:1/"
secret = "0123456789abcdef"
consent = "analytics"
[destinations.meta]
type = "meta_capi"
pixel_id = "1"
access_token = "t"
"#,
            std::path::Path::new("t.toml"),
            &|_| None,
        )
        .unwrap()
    }

    fn t(s: &str) -> DateTime<Utc> {
        format!("2026-12-01T10:{s}Z").parse().unwrap()
    }

    fn rec(topic: &str, partition: i32, offset: i64, at: &str, payload: Value) -> Rec {
        Rec {
            topic: topic.into(),
            partition,
            offset,
            at: Some(t(at)),
            key: None,
            payload: payload.to_string().into_bytes(),
            headers: BTreeMap::new(),
        }
    }

    fn with(mut r: Rec, headers: &[(&str, &str)]) -> Rec {
        for (k, v) in headers {
            r.headers.insert(k.to_string(), v.to_string());
        }
        r
    }

    fn purchase(id: &str) -> Value {
        serde_json::json!({
            "event": "purchase", "event_id": id, "occurred_at": "2026-12-01T09:59:00Z",
            "anonymous_id": "anon-1", "value": 5.0, "currency": "EUR",
            "consent": {"analytics": "granted"}
        })
    }

    fn delivery(dest: &str, id: &str, offset: i64, routed: &str) -> Value {
        let mut event = purchase(id);
        event["user_id"] = "u-1".into();
        event["email_sha256"] = "ab".repeat(32).into();
        event["click_ids"] = serde_json::json!({"gclid": "g-1"});
        serde_json::json!({
            "v": 1, "destination": dest, "name": "purchase", "event": event,
            "origin": {"topic": "ev", "partition": 2, "offset": offset},
            "routed_at": t(routed)
        })
    }

    fn ledger(status: &str, attempts: u32, at: &str) -> LedgerEntry {
        LedgerEntry {
            event_id: "e1".into(),
            destination: "hook".into(),
            status: status.into(),
            attempts,
            http_status: Some(if status == "delivered" { 200 } else { 400 }),
            latency_ms: (status == "delivered").then_some(12),
            error_class: (status != "delivered").then(|| "webhook_refused".into()),
            first_attempt_at: Some(t(at)),
            last_attempt_at: Some(t(at)),
            recorded_at: t(at),
            replay: None,
        }
    }

    fn lines(trace: &Trace) -> Vec<String> {
        trace
            .steps
            .iter()
            .map(|s| {
                format!(
                    "{} {} {}",
                    s.stage,
                    s.destination.as_deref().unwrap_or("-"),
                    s.what
                )
            })
            .collect()
    }

    fn has(lines: &[String], want: &str) -> bool {
        lines.iter().any(|l| l.contains(want))
    }

    #[test]
    fn copies_and_deliveries_are_matched_by_event_id_not_by_a_substring() {
        let p = purchase("e1").to_string();
        assert!(is_canonical_copy("e1", None, p.as_bytes()));
        assert!(is_canonical_copy("e1", Some(b"e1"), b"{not json"));
        assert!(!is_canonical_copy("e", None, p.as_bytes()));
        let mut other = purchase("e2");
        other["order_id"] = "e1".into();
        assert!(!is_canonical_copy("e1", None, other.to_string().as_bytes()));
        let d = delivery("hook", "e1", 4, "00:01").to_string();
        assert!(delivery_of("e1", d.as_bytes()).is_some());
        assert!(delivery_of("e2", d.as_bytes()).is_none());
        let router = with(
            rec("sy.dlq", 0, 0, "00:00", Value::Null),
            &[(header::STAGE, "router")],
        );
        let router = Rec {
            key: Some(b"e1".to_vec()),
            payload: b"{oops".to_vec(),
            ..router
        };
        assert!(is_dead_letter_of("e1", &router));
        let sink = with(
            rec("sy.dlq", 0, 1, "00:00", delivery("hook", "e1", 4, "00:01")),
            &[(header::STAGE, "sink")],
        );
        assert!(is_dead_letter_of("e1", &sink));
        assert!(!is_dead_letter_of("e2", &sink));
    }

    #[test]
    fn identity_lists_the_kinds_added_and_never_a_raw_contact() {
        let mut ev: CanonicalEvent = serde_json::from_value(purchase("e1")).unwrap();
        ev.email = Some("ann@example.com".into());
        let mut out = ev.clone();
        out.email = None;
        out.user_id = Some("u-1".into());
        out.email_sha256 = Some("c".repeat(64));
        out.phone_sha256 = Some("d".repeat(64));
        out.external_ids.insert("crm".into(), "x".into());
        out.click_ids = Some(crate::event::ClickIds {
            gclid: Some("g".into()),
            ..Default::default()
        });
        let added = identity_added(&ev, &out);
        assert_eq!(
            added,
            vec![
                "user_id".to_string(),
                format!("phone_sha256 {}…", "d".repeat(8)),
                "external_ids.crm".into(),
                "click_ids.gclid".into(),
            ],
            "the email's hash came from the event's own email"
        );
        assert!(
            added
                .iter()
                .all(|a| !a.contains('@') && !a.contains(&"d".repeat(9)))
        );
        assert!(identity_added(&ev, &ev).is_empty());
    }

    #[test]
    fn a_delivered_event_shows_its_copy_route_identity_delivery_and_outcome() {
        let mut c = with(rec("ev", 2, 7, "00:00", purchase("e1")), &[]);
        c.key = Some(b"e1".to_vec());
        let dup = with(rec("ev", 2, 9, "00:02", purchase("e1")), &[]);
        let found = Found {
            canonical: vec![dup, c],
            deliveries: vec![rec(
                "sy.deliver.hook",
                1,
                3,
                "00:01",
                delivery("hook", "e1", 7, "00:01"),
            )],
            ledger: vec![ledger("delivered", 1, "00:05")],
            ..Found::default()
        };
        let trace = build(&config(), "e1", t("00:00"), &found);
        assert!(trace.found);
        let l = lines(&trace);
        assert!(
            l[0].starts_with("canonical - copy 1 of 2 at ev/2/7 (keyed by the event_id)"),
            "{l:#?}"
        );
        assert!(
            has(
                &l,
                "validate - valid purchase occurred at 2026-12-01T09:59:00.000Z"
            ),
            "{l:#?}"
        );
        assert!(
            has(
                &l,
                "dedup - first copy of the id on its partition: passed dedup, routed"
            ),
            "{l:#?}"
        );
        assert!(
            has(&l, "dedup - dropped as a duplicate of offset 7"),
            "{l:#?}"
        );
        assert!(has(&l, "route hook routed as purchase"), "{l:#?}");
        assert!(
            has(&l, "route meta skipped: consent ads missing (default deny)"),
            "{l:#?}"
        );
        assert!(
            has(
                &l,
                &format!(
                    "identity hook added user_id, email_sha256 {}…, click_ids.gclid",
                    "ab".repeat(4)
                )
            ),
            "{l:#?}"
        );
        assert!(
            has(
                &l,
                "deliver hook delivery record sy.deliver.hook/1/3 as purchase"
            ),
            "{l:#?}"
        );
        assert!(
            has(
                &l,
                "outcome hook delivered after 1 attempt(s), HTTP 200 in 12 ms"
            ),
            "{l:#?}"
        );
        // In time order.
        let times: Vec<_> = trace.steps.iter().map(|s| s.at).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
        let text = trace.text();
        assert!(
            text.starts_with("trace of e1 since 2026-12-01T10:00:00.000Z\n"),
            "{text}"
        );
        assert!(!text.contains("ann@"), "{text}");
    }

    #[test]
    fn rejections_retries_replays_and_redrives_are_told_from_their_headers() {
        let c = rec("ev", 2, 7, "00:00", purchase("e1"));
        let letter = with(
            rec("sy.dlq", 0, 4, "00:03", delivery("hook", "e1", 7, "00:01")),
            &[
                (header::STAGE, "sink"),
                (header::DESTINATION, "hook"),
                (header::ERROR_CLASS, "webhook_refused"),
                (header::HTTP_STATUS, "400"),
                (header::ATTEMPTS, "1"),
                (
                    header::REASON,
                    "receiver (HTTP 400): amount must be positive",
                ),
                (header::RESPONSE, "{\"errors\":[]}"),
            ],
        );
        let parked = with(
            rec(
                "sy.retry.hook",
                1,
                0,
                "00:02",
                delivery("hook", "e1", 7, "00:01"),
            ),
            &[
                (header::DESTINATION, "hook"),
                (header::ATTEMPTS, "1"),
                (header::DUE, "2026-12-01T10:00:03.25+00:00"),
                (header::REASON, "HTTP 503"),
            ],
        );
        let replayed = with(
            rec(
                "sy.deliver.hook",
                1,
                8,
                "00:10",
                delivery("hook", "e1", 7, "00:10"),
            ),
            &[
                (header::REPLAY, "2026-12-01T10:10:00.000Z"),
                (header::REPLAY_FORCE, "1"),
            ],
        );
        let redriven = with(
            rec(
                "sy.deliver.hook",
                1,
                9,
                "00:20",
                delivery("hook", "e1", 7, "00:01"),
            ),
            &[(header::REDRIVEN_FROM, "sy.dlq/0/4")],
        );
        let found = Found {
            canonical: vec![c],
            deliveries: vec![
                rec(
                    "sy.deliver.hook",
                    1,
                    3,
                    "00:01",
                    delivery("hook", "e1", 7, "00:01"),
                ),
                replayed,
                redriven,
            ],
            retries: vec![parked],
            ledger: vec![
                ledger("rejected", 2, "00:03"),
                ledger("delivered", 1, "00:11"),
            ],
            dead_letters: vec![letter],
            ..Found::default()
        };
        let l = lines(&build(&config(), "e1", t("00:00"), &found));
        assert!(
            has(
                &l,
                "retry hook parked on sy.retry.hook/1/0 after 1 attempt(s), due 2026-12-01T10:00:03.250Z: HTTP 503"
            ),
            "{l:#?}"
        );
        assert!(
            has(
                &l,
                "outcome hook rejected after 2 attempt(s), HTTP 400, webhook_refused"
            ),
            "{l:#?}"
        );
        assert!(
            has(
                &l,
                "dead-letter hook sink dead letter sy.dlq/0/4: webhook_refused, HTTP 400, after 1 attempt(s): receiver (HTTP 400): amount must be positive; response: {\"errors\":[]}"
            ),
            "{l:#?}"
        );
        assert!(
            has(
                &l,
                "deliver hook delivery record sy.deliver.hook/1/8 as purchase; written by the replay started 2026-12-01T10:10:00.000Z with --force"
            ),
            "{l:#?}"
        );
        assert!(
            has(
                &l,
                "deliver hook delivery record sy.deliver.hook/1/9 as purchase; redriven from dead letter sy.dlq/0/4"
            ),
            "{l:#?}"
        );
        // The replay and the redrive are not the router's routing of the
        // copy, so the first copy is still the one routed.
        assert!(has(&l, "passed dedup, routed"), "{l:#?}");
        assert_eq!(
            l.iter().filter(|s| s.starts_with("identity hook")).count(),
            1
        );
    }

    #[test]
    fn an_invalid_copy_and_a_moved_one_say_so() {
        let bad = with(
            Rec {
                key: Some(b"e1".to_vec()),
                payload: b"{\"event_id\":\"e1\"".to_vec(),
                ..rec("ev", 2, 1, "00:00", Value::Null)
            },
            &[],
        );
        let moved = with(
            rec("ev", 2, 3, "00:01", purchase("e1")),
            &[
                (header::REROUTED_FROM, "0/12"),
                (header::REROUTE_REASON, "wrong_key"),
            ],
        );
        let letter = with(
            rec("sy.dlq", 0, 0, "00:00", Value::Null),
            &[
                (header::STAGE, "router"),
                (header::ERROR_CLASS, "bad_json"),
                (header::REASON, "not valid JSON: EOF"),
                (header::ORIGIN_TOPIC, "ev"),
                (header::ORIGIN_PARTITION, "2"),
                (header::ORIGIN_OFFSET, "1"),
            ],
        );
        let found = Found {
            canonical: vec![bad, moved],
            dead_letters: vec![letter],
            ..Found::default()
        };
        let l = lines(&build(&config(), "e1", t("00:00"), &found));
        assert!(
            has(&l, "validate - invalid (bad_json): not valid JSON"),
            "{l:#?}"
        );
        assert!(
            has(
                &l,
                "router dead letter sy.dlq/0/0 of ev/2/1: bad_json: not valid JSON: EOF"
            ),
            "{l:#?}"
        );
        assert!(
            has(&l, "moved it here from partition/offset 0/12 (wrong_key)"),
            "{l:#?}"
        );
        assert!(
            has(&l, "first copy of the id on its partition: passed dedup"),
            "{l:#?}"
        );
        assert!(
            has(
                &l,
                "route hook routed as purchase by today's rules, but no delivery record"
            ),
            "{l:#?}"
        );
    }

    #[test]
    fn nothing_found_says_since_when_and_where_it_looked() {
        let found = Found {
            searched: vec![Searched {
                topic: "sy.outcomes".into(),
                partitions: vec![0, 1],
                from: t("00:00"),
                to: None,
                records: 42,
            }],
            ..Found::default()
        };
        let trace = build(&config(), "e9", t("00:00"), &found);
        assert!(!trace.found);
        let text = trace.text();
        assert!(
            text.starts_with("no record of e9 since 2026-12-01T10:00:00.000Z\n"),
            "{text}"
        );
        assert!(text.contains("sy.outcomes partition(s) 0,1 from 2026-12-01T10:00:00.000Z to its end: 42 record(s) read"), "{text}");
        assert!(text.contains("cannot see:"), "{text}");
        let json = serde_json::to_value(&trace).unwrap();
        assert_eq!(json["found"], false);
        assert_eq!(json["event_id"], "e9");
    }
}
