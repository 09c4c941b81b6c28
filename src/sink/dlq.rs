//! `switchyard dlq list` and `switchyard dlq redrive`: count dead letters, and
//! re-publish a destination's sink dead letters to its deliver topic. The
//! payload is republished unchanged, so the event keeps its event_id and
//! idempotency key.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use super::SinkError;
use crate::config::Config;
pub use crate::delivery::dead_letter::DeadLetter;
use crate::delivery::dead_letter::{header, stage};
use crate::kafka::client;

/// Every dead letter on the DLQ topic (read to its current end).
pub async fn read_all(config: &Config, bootstrap: &str) -> Result<Vec<DeadLetter>, SinkError> {
    let kafka = config.kafka.clone();
    let bootstrap = bootstrap.to_string();
    let topic = config.topics.dlq();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        super::scan::scan_topic(&kafka, &bootstrap, &topic, |m| {
            out.push(DeadLetter::from_message(m));
        })?;
        Ok(out)
    })
    .await
    .map_err(|e| SinkError::Task(e.to_string()))?
}

/// Counts by (day, destination, stage, error class).
pub fn counts(letters: &[DeadLetter]) -> BTreeMap<(String, String, String, String), usize> {
    let mut out = BTreeMap::new();
    for l in letters {
        let day = l.at.map_or_else(
            || "unknown".to_string(),
            |t| t.format("%Y-%m-%d").to_string(),
        );
        *out.entry((
            day,
            l.destination.clone(),
            l.stage.clone(),
            l.error_class.clone(),
        ))
        .or_insert(0) += 1;
    }
    out
}

#[derive(Debug, Clone, Default)]
pub struct RedriveFilter {
    pub destination: String,
    pub since: Option<DateTime<Utc>>,
    pub error_class: Option<String>,
}

impl RedriveFilter {
    /// Only sink dead letters hold a delivery record that the deliver topic accepts.
    pub fn matches(&self, l: &DeadLetter) -> bool {
        l.stage == stage::SINK
            && l.destination == self.destination
            && self.since.is_none_or(|s| l.at.is_some_and(|at| at >= s))
            && self
                .error_class
                .as_ref()
                .is_none_or(|c| *c == l.error_class)
    }
}

/// Re-publishes the matching dead letters to the destination's deliver topic
/// (unless `dry_run`); returns the ones matched.
pub async fn redrive(
    config: &Config,
    bootstrap: &str,
    filter: &RedriveFilter,
    dry_run: bool,
) -> Result<Vec<DeadLetter>, SinkError> {
    let matched: Vec<DeadLetter> = read_all(config, bootstrap)
        .await?
        .into_iter()
        .filter(|l| filter.matches(l))
        .collect();
    if dry_run || matched.is_empty() {
        return Ok(matched);
    }
    let producer: FutureProducer =
        client::idempotent_producer(&config.kafka, bootstrap).create()?;
    let topic = config.topics.deliver(&filter.destination);
    let dlq = config.topics.dlq();
    for l in &matched {
        let mut headers = OwnedHeaders::new();
        for (k, v) in l.headers.iter().filter(|(k, _)| !header::is_own(k)) {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let from = format!("{dlq}/{}/{}", l.partition, l.offset);
        let headers = headers.insert(Header {
            key: header::REDRIVEN_FROM,
            value: Some(&from),
        });
        let mut record = FutureRecord::<[u8], [u8]>::to(&topic)
            .payload(&l.payload)
            .headers(headers);
        if let Some(k) = &l.key {
            record = record.key(k);
        }
        producer
            .send(record, Timeout::After(Duration::from_secs(30)))
            .await
            .map_err(|(e, _)| SinkError::Produce(e))?;
    }
    Ok(matched)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(destination: &str, stage: &str, class: &str, at: &str) -> DeadLetter {
        DeadLetter {
            partition: 0,
            offset: 0,
            at: Some(at.parse().unwrap()),
            destination: destination.into(),
            stage: stage.into(),
            error_class: class.into(),
            key: None,
            payload: vec![],
            headers: vec![],
        }
    }

    #[test]
    fn filter_takes_sink_letters_of_one_destination() {
        let f = RedriveFilter {
            destination: "hook".into(),
            since: Some("2026-11-26T00:00:00Z".parse().unwrap()),
            error_class: Some("http_400".into()),
        };
        assert!(f.matches(&letter("hook", "sink", "http_400", "2026-11-26T10:00:00Z")));
        assert!(!f.matches(&letter(
            "hook",
            "router",
            "http_400",
            "2026-11-26T10:00:00Z"
        )));
        assert!(!f.matches(&letter("meta", "sink", "http_400", "2026-11-26T10:00:00Z")));
        assert!(!f.matches(&letter("hook", "sink", "expired", "2026-11-26T10:00:00Z")));
        assert!(!f.matches(&letter("hook", "sink", "http_400", "2026-11-25T10:00:00Z")));
    }

    #[test]
    fn counts_group_by_day_destination_stage_and_class() {
        let c = counts(&[
            letter("hook", "sink", "http_400", "2026-11-26T10:00:00Z"),
            letter("hook", "sink", "http_400", "2026-11-26T11:00:00Z"),
            letter("hook", "sink", "expired", "2026-11-27T11:00:00Z"),
        ]);
        assert_eq!(
            c.get(&(
                "2026-11-26".into(),
                "hook".into(),
                "sink".into(),
                "http_400".into()
            )),
            Some(&2)
        );
        assert_eq!(c.len(), 2);
    }
}
