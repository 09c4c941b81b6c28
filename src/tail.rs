//! `switchyard tail`: outcomes as they happen, one line each. Deliveries
//! come from the delivery ledger (`<prefix>.outcomes`), rejections from the
//! dead-letter topic (the sink's, with the vendor's reason, and the
//! router's: events that never reached a destination), and retries from
//! each destination's retry topic (an event parked to wait; the copies a
//! sink writes back while it is not yet due are not shown again).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::delivery::dead_letter::header;
use crate::kafka::reader::{self, ReadError};
use crate::kafka::{ADMIN_TIMEOUT, client};
use crate::sink::records::LedgerEntry;

/// How much of a reason a line shows (the dead letter keeps it whole).
const REASON_SHOWN: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Delivered,
    Rejected,
    Retrying,
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Kind, String> {
        match s {
            "delivered" => Ok(Kind::Delivered),
            "rejected" => Ok(Kind::Rejected),
            "retrying" => Ok(Kind::Retrying),
            other => Err(format!(
                "`{other}`: expected delivered, rejected or retrying"
            )),
        }
    }
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Delivered => "delivered",
            Kind::Rejected => "rejected",
            Kind::Retrying => "retrying",
        }
    }
}

/// One outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Line {
    pub at: DateTime<Utc>,
    pub outcome: Kind,
    /// Empty for the router's dead letters (no destination was reached).
    pub destination: String,
    pub event_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Retrying: when the parked event is due again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub due: Option<DateTime<Utc>>,
    /// Set when the delivery was written by `switchyard replay`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay: Option<String>,
}

/// Which topic a record was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Ledger,
    DeadLetters,
    Retry,
}

/// A record as the pure readers take it.
pub struct Record<'a> {
    pub payload: Option<&'a [u8]>,
    pub headers: &'a HashMap<String, String>,
    pub timestamp_ms: Option<i64>,
}

impl Line {
    /// The outcome one record says, if it says one.
    pub fn of(from: Source, r: &Record<'_>) -> Option<Line> {
        let at = r
            .timestamp_ms
            .and_then(DateTime::from_timestamp_millis)
            .unwrap_or_else(Utc::now);
        let h = |k: &str| r.headers.get(k).cloned();
        let replay = h(header::REPLAY);
        match from {
            Source::Ledger => {
                let e: LedgerEntry = serde_json::from_slice(r.payload?).ok()?;
                // A rejection's line comes from its dead letter, which says why.
                (e.status == "delivered").then(|| Line {
                    at: e.last_attempt_at.unwrap_or(e.recorded_at),
                    outcome: Kind::Delivered,
                    destination: e.destination,
                    event_id: Some(e.event_id),
                    http_status: e.http_status,
                    attempts: Some(e.attempts),
                    latency_ms: e.latency_ms,
                    error_class: None,
                    reason: None,
                    due: None,
                    replay: e.replay,
                })
            }
            Source::DeadLetters => Some(Line {
                at,
                outcome: Kind::Rejected,
                destination: h(header::DESTINATION).unwrap_or_default(),
                event_id: crate::delivery::event_id_in(r.payload),
                http_status: h(header::HTTP_STATUS).and_then(|s| s.parse().ok()),
                attempts: h(header::ATTEMPTS).and_then(|s| s.parse().ok()),
                latency_ms: None,
                error_class: h(header::ERROR_CLASS),
                reason: h(header::REASON),
                due: None,
                replay,
            }),
            Source::Retry => {
                if r.headers.contains_key(header::REQUEUED_AT) {
                    return None;
                }
                Some(Line {
                    at,
                    outcome: Kind::Retrying,
                    destination: h(header::DESTINATION).unwrap_or_default(),
                    event_id: crate::delivery::event_id_in(r.payload),
                    http_status: None,
                    attempts: h(header::ATTEMPTS).and_then(|s| s.parse().ok()),
                    latency_ms: None,
                    error_class: None,
                    reason: h(header::REASON),
                    due: h(header::DUE).and_then(|s| s.parse().ok()),
                    replay,
                })
            }
        }
    }

    /// The line a person reads.
    pub fn human(&self) -> String {
        let mut facts = Vec::new();
        if let Some(c) = &self.error_class {
            facts.push(c.clone());
        }
        if let Some(s) = self.http_status {
            facts.push(format!("HTTP {s}"));
        }
        match self.attempts {
            Some(1) => facts.push("1 attempt".into()),
            Some(n) => facts.push(format!("{n} attempts")),
            None => {}
        }
        if let Some(ms) = self.latency_ms {
            facts.push(format!("{ms} ms"));
        }
        if let Some(due) = self.due {
            facts.push(format!("due {}", due.format("%H:%M:%S")));
        }
        if self.replay.is_some() {
            facts.push("replayed".into());
        }
        let mut line = format!(
            "{}  {:<9}  {:<16}  {:<28}  {}",
            self.at.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
            self.outcome.as_str(),
            if self.destination.is_empty() {
                "(router)"
            } else {
                &self.destination
            },
            self.event_id.as_deref().unwrap_or("-"),
            facts.join(" · ")
        );
        if let Some(reason) = &self.reason {
            line.push_str(": ");
            line.push_str(cut(reason));
        }
        line
    }
}

fn cut(s: &str) -> &str {
    if s.len() <= REASON_SHOWN {
        return s;
    }
    let mut end = REASON_SHOWN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Which outcomes to show.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Empty: every destination (and the router's dead letters).
    pub destinations: Vec<String>,
    /// Empty: every kind.
    pub outcomes: Vec<Kind>,
}

impl Filter {
    pub fn shows(&self, l: &Line) -> bool {
        (self.destinations.is_empty() || self.destinations.contains(&l.destination))
            && (self.outcomes.is_empty() || self.outcomes.contains(&l.outcome))
    }
}

#[derive(Debug, Error)]
pub enum TailError {
    #[error(transparent)]
    NotEnabled(#[from] crate::config::NotEnabled),
    #[error("{topic}: {source}")]
    Read { topic: String, source: ReadError },
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("{0}")]
    Task(String),
}

/// Follows every outcome topic from its current end until `stop`, calling
/// `ready` once positioned and `each` for every line `filter` shows.
pub async fn follow(
    config: &Config,
    bootstrap: &str,
    filter: Filter,
    stop: CancellationToken,
    ready: impl FnOnce(usize) + Send + 'static,
    mut each: impl FnMut(&Line) + Send + 'static,
) -> Result<(), TailError> {
    let only = config.chosen_destinations(&filter.destinations)?;
    let chosen: Vec<&str> = config
        .enabled_destinations()
        .zip(only)
        .filter(|(_, chosen)| *chosen)
        .map(|(d, _)| d.name.as_str())
        .collect();
    let t = &config.topics;
    let mut topics = vec![
        (t.outcomes(), Source::Ledger),
        (t.dlq(), Source::DeadLetters),
    ];
    topics.extend(chosen.iter().map(|d| (t.retry(d), Source::Retry)));
    let consumer: BaseConsumer = client::reader(&config.kafka, bootstrap).create()?;
    tokio::task::spawn_blocking(move || {
        let mut tpl = TopicPartitionList::new();
        let mut kinds = HashMap::new();
        for (topic, from) in &topics {
            let partitions =
                reader::topic_partitions(&consumer, topic).map_err(|source| TailError::Read {
                    topic: topic.clone(),
                    source,
                })?;
            for p in partitions {
                // The end as of now, so nothing written after `ready` is missed.
                let (_, high) = consumer.fetch_watermarks(topic, p, ADMIN_TIMEOUT)?;
                tpl.add_partition_offset(topic, p, Offset::Offset(high))?;
            }
            kinds.insert(topic.clone(), *from);
        }
        consumer.assign(&tpl)?;
        ready(topics.len());
        while !stop.is_cancelled() {
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = m?;
            let Some(from) = kinds.get(m.topic()) else {
                continue;
            };
            let headers: HashMap<String, String> = m
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| {
                            let v = h.value.unwrap_or_default();
                            (h.key.to_string(), String::from_utf8_lossy(v).into_owned())
                        })
                        .collect()
                })
                .unwrap_or_default();
            let record = Record {
                payload: m.payload(),
                headers: &headers,
                timestamp_ms: m.timestamp().to_millis(),
            };
            if let Some(line) = Line::of(*from, &record).filter(|l| filter.shows(l)) {
                each(&line);
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| TailError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(payload: &'a [u8], headers: &'a HashMap<String, String>) -> Record<'a> {
        Record {
            payload: Some(payload),
            headers,
            timestamp_ms: Some(1_796_432_400_000),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const DELIVERY: &[u8] =
        br#"{"v":1,"destination":"hook","name":"purchase","event":{"event":"purchase","event_id":"e-1"}}"#;

    #[test]
    fn a_delivered_ledger_entry_is_a_delivered_line() {
        let entry = br#"{"event_id":"e-1","destination":"hook","status":"delivered","attempts":2,"http_status":200,"latency_ms":41,"last_attempt_at":"2026-12-05T02:00:00Z","recorded_at":"2026-12-05T02:00:01Z"}"#;
        let none = HashMap::new();
        let l = Line::of(Source::Ledger, &record(entry, &none)).unwrap();
        assert_eq!(l.outcome, Kind::Delivered);
        assert_eq!(l.event_id.as_deref(), Some("e-1"));
        assert_eq!(
            l.human(),
            "2026-12-05T02:00:00.000Z  delivered  hook              e-1                           HTTP 200 · 2 attempts · 41 ms"
        );
        // Rejections are shown from their dead letters, with the reason.
        let rejected = br#"{"event_id":"e-1","destination":"hook","status":"rejected","attempts":1,"recorded_at":"2026-12-05T02:00:01Z"}"#;
        assert_eq!(Line::of(Source::Ledger, &record(rejected, &none)), None);
    }

    #[test]
    fn a_dead_letter_is_a_rejected_line_with_its_reason_cut() {
        let long = "x".repeat(500);
        let h = headers(&[
            (header::DESTINATION, "hook"),
            (header::ERROR_CLASS, "http_400"),
            (header::HTTP_STATUS, "400"),
            (header::ATTEMPTS, "1"),
            (header::REASON, &long),
            (header::REPLAY, "2026-12-05T01:00:00.000Z"),
        ]);
        let l = Line::of(Source::DeadLetters, &record(DELIVERY, &h)).unwrap();
        assert_eq!(l.outcome, Kind::Rejected);
        assert_eq!(l.http_status, Some(400));
        let text = l.human();
        assert!(
            text.contains("http_400 · HTTP 400 · 1 attempt · replayed: xxx"),
            "{text}"
        );
        assert!(text.len() < 400, "{text}");
        // The router's dead letters hold the canonical event.
        let router = Line::of(
            Source::DeadLetters,
            &record(br#"{"event":"purchase","event_id":"e-9"}"#, &HashMap::new()),
        )
        .unwrap();
        assert_eq!(router.event_id.as_deref(), Some("e-9"));
        assert!(router.human().contains("(router)"));
    }

    #[test]
    fn a_parked_record_is_retrying_and_its_requeued_copies_are_not_shown() {
        let h = headers(&[
            (header::DESTINATION, "hook"),
            (header::ATTEMPTS, "3"),
            (header::DUE, "2026-12-05T02:05:00Z"),
            (header::REASON, "HTTP 429"),
        ]);
        let l = Line::of(Source::Retry, &record(DELIVERY, &h)).unwrap();
        assert_eq!(l.outcome, Kind::Retrying);
        assert!(
            l.human().ends_with("3 attempts · due 02:05:00: HTTP 429"),
            "{}",
            l.human()
        );
        let mut again = h.clone();
        again.insert(header::REQUEUED_AT.into(), "2026-12-05T02:01:00Z".into());
        assert_eq!(Line::of(Source::Retry, &record(DELIVERY, &again)), None);
    }

    #[test]
    fn the_filter_picks_destinations_and_outcomes() {
        let h = headers(&[(header::DESTINATION, "hook")]);
        let l = Line::of(Source::DeadLetters, &record(DELIVERY, &h)).unwrap();
        assert!(Filter::default().shows(&l));
        let only = |d: &[&str], o: &[Kind]| Filter {
            destinations: d.iter().map(|s| s.to_string()).collect(),
            outcomes: o.to_vec(),
        };
        assert!(only(&["hook"], &[Kind::Rejected]).shows(&l));
        assert!(!only(&["meta"], &[]).shows(&l));
        assert!(!only(&[], &[Kind::Delivered, Kind::Retrying]).shows(&l));
        assert_eq!("retrying".parse::<Kind>(), Ok(Kind::Retrying));
        assert!("parked".parse::<Kind>().is_err());
    }
}
