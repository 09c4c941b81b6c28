//! `switchyard demo`: publishes a sample stream to the canonical topic, reads
//! it back through Kafka and prints what happened to every event.

use std::collections::HashMap;
use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use thiserror::Error;

use crate::config::Config;
use crate::event::{InvalidEvent, parse_event};
use crate::kafka::{self, Cluster, client};

/// The sample stream shipped with switchyard (`examples/events.ndjson`).
pub const SAMPLE_EVENTS: &str = include_str!("../examples/events.ndjson");

const READ_BACK_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum DemoError {
    #[error(transparent)]
    Kafka(#[from] kafka::Error),
    #[error("publishing line {line} failed: {source}")]
    Publish {
        line: usize,
        source: rdkafka::error::KafkaError,
    },
    #[error("reading the canonical topic back failed: {0}")]
    Consume(rdkafka::error::KafkaError),
    #[error("only {seen} of {expected} published records came back within {}s", READ_BACK_TIMEOUT.as_secs())]
    Incomplete { seen: usize, expected: usize },
    #[error("writing the report failed: {0}")]
    Output(#[from] std::io::Error),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DemoSummary {
    pub published: usize,
    pub valid: usize,
    pub invalid: usize,
}

/// One published line: where it is in the input and where it landed in Kafka.
struct Published {
    line: usize,
    partition: i32,
    offset: i64,
}

pub async fn run(
    config: &Config,
    cluster: &Cluster,
    input: &str,
    out: &mut dyn Write,
) -> Result<DemoSummary, DemoError> {
    kafka::topics::ensure(cluster, config).await?;
    let topic = &config.topics.canonical;
    let published = publish(config, cluster, topic, input).await?;
    writeln!(
        out,
        "published {} records to {topic} on {}{}",
        published.len(),
        cluster.bootstrap(),
        if cluster.is_embedded() {
            " (embedded broker, not durable)"
        } else {
            ""
        }
    )?;

    let records = read_back(config, cluster, topic, &published).await?;
    let mut summary = DemoSummary {
        published: published.len(),
        ..DemoSummary::default()
    };
    for p in &published {
        let payload = &records[&(p.partition, p.offset)];
        let place = format!("p{}@{}", p.partition, p.offset);
        match parse_event(payload) {
            Ok(ev) => {
                summary.valid += 1;
                writeln!(
                    out,
                    "line {:>3}  {place:<8} {:<16} {:<24} valid",
                    p.line,
                    ev.event.as_str(),
                    ev.event_id
                )?;
            }
            Err(err) => {
                summary.invalid += 1;
                report_invalid(out, p.line, &place, payload, &err)?;
            }
        }
    }
    writeln!(
        out,
        "{} published, {} valid, {} invalid (invalid records go to {} once the router runs)",
        summary.published,
        summary.valid,
        summary.invalid,
        config.topics.dlq()
    )?;
    Ok(summary)
}

fn report_invalid(
    out: &mut dyn Write,
    line: usize,
    place: &str,
    payload: &[u8],
    err: &InvalidEvent,
) -> std::io::Result<()> {
    let id = serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get("event_id").and_then(|i| i.as_str()).map(String::from))
        .unwrap_or_else(|| "-".into());
    writeln!(
        out,
        "line {line:>3}  {place:<8} {:<16} {id:<24} INVALID ({})",
        "-",
        err.error_class()
    )?;
    match err {
        InvalidEvent::Schema(violations) => {
            for v in violations {
                writeln!(out, "            {v}")?;
            }
        }
        other => writeln!(out, "            {other}")?,
    }
    Ok(())
}

/// Publishes every non-blank line, keyed by its event_id when it has one so
/// duplicates meet in one partition; returns where each landed.
async fn publish(
    config: &Config,
    cluster: &Cluster,
    topic: &str,
    input: &str,
) -> Result<Vec<Published>, DemoError> {
    let producer: FutureProducer = client::idempotent_producer(&config.kafka, cluster.bootstrap())
        .create()
        .map_err(|e| DemoError::Kafka(kafka::Error::Client(e)))?;
    let mut out = Vec::new();
    for (i, line) in input.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let key = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("event_id").and_then(|i| i.as_str()).map(String::from));
        let mut record = FutureRecord::<str, str>::to(topic).payload(line);
        if let Some(k) = key.as_deref() {
            record = record.key(k);
        }
        let delivery = producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(source, _)| DemoError::Publish {
                line: i + 1,
                source,
            })?;
        out.push(Published {
            line: i + 1,
            partition: delivery.partition,
            offset: delivery.offset,
        });
    }
    Ok(out)
}

/// Reads exactly the published records back (the topic may hold older data).
async fn read_back(
    config: &Config,
    cluster: &Cluster,
    topic: &str,
    published: &[Published],
) -> Result<HashMap<(i32, i64), Vec<u8>>, DemoError> {
    let consumer: StreamConsumer = client::base(&config.kafka, cluster.bootstrap())
        .set("group.id", "switchyard-demo")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| DemoError::Kafka(kafka::Error::Client(e)))?;
    let mut first: HashMap<i32, i64> = HashMap::new();
    for p in published {
        let o = first.entry(p.partition).or_insert(p.offset);
        *o = (*o).min(p.offset);
    }
    let mut tpl = TopicPartitionList::new();
    for (&partition, &offset) in &first {
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
            .map_err(DemoError::Consume)?;
    }
    consumer.assign(&tpl).map_err(DemoError::Consume)?;

    let wanted: HashSet<(i32, i64)> = published.iter().map(|p| (p.partition, p.offset)).collect();
    let mut records = HashMap::with_capacity(wanted.len());
    let collect = async {
        while records.len() < wanted.len() {
            let m = consumer.recv().await.map_err(DemoError::Consume)?;
            let at = (m.partition(), m.offset());
            if wanted.contains(&at) {
                records.insert(at, m.payload().unwrap_or_default().to_vec());
            }
        }
        Ok::<_, DemoError>(())
    };
    match tokio::time::timeout(READ_BACK_TIMEOUT, collect).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(DemoError::Incomplete {
                seen: records.len(),
                expected: wanted.len(),
            });
        }
    }
    Ok(records)
}
