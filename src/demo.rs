//! `switchyard demo`: publishes a sample stream to the canonical topic, runs
//! the router on it, reads every output topic back and prints what happened
//! to each event: which destinations got it, which did not and why, and
//! which records were dead-lettered.

use std::collections::HashMap;
use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use thiserror::Error;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::delivery::Delivery;
use crate::event::{InvalidEvent, parse_event};
use crate::kafka::{self, Cluster, client};
use crate::router::route;
use crate::run::RoleContext;

/// The sample stream shipped with switchyard (`examples/events.ndjson`).
pub const SAMPLE_EVENTS: &str = include_str!("../examples/events.ndjson");

/// The destinations the demo routes to without `--config` (`examples/demo.toml`).
pub const DEMO_CONFIG: &str = include_str!("../examples/demo.toml");

/// The built-in demo configuration.
pub fn demo_config() -> Config {
    Config::parse(
        DEMO_CONFIG,
        std::path::Path::new("examples/demo.toml"),
        &|_| None,
    )
    .expect("the shipped demo config is valid (tested)")
}

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
    #[error("the router did not finish the sample within {}s", READ_BACK_TIMEOUT.as_secs())]
    RouterTimeout,
    #[error("the router failed: {0}")]
    Router(#[from] crate::router::RouterError),
    #[error("writing the report failed: {0}")]
    Output(#[from] std::io::Error),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DemoSummary {
    pub published: usize,
    pub valid: usize,
    pub invalid: usize,
    pub duplicates: usize,
    /// Deliveries written, over all destinations.
    pub routed: usize,
}

/// One published line: where it is in the input and where it landed in Kafka.
struct Published {
    line: usize,
    partition: i32,
    offset: i64,
}

pub async fn run(
    config: Arc<Config>,
    cluster: &Cluster,
    input: &str,
    out: &mut dyn Write,
) -> Result<DemoSummary, DemoError> {
    kafka::topics::ensure(cluster, &config).await?;
    let topic = &config.topics.canonical;
    let published = publish(&config, cluster, topic, input).await?;
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
    let records = read_back(&config, cluster, topic, &published).await?;
    route_all(&config, cluster, &published).await?;

    let outputs = collect_outputs(&config, cluster.bootstrap()).await?;
    let names: Vec<&str> = config
        .enabled_destinations()
        .map(|d| d.name.as_str())
        .collect();
    writeln!(
        out,
        "routed by the router to {} destinations: {}",
        names.len(),
        names.join(", ")
    )?;
    let mut summary = DemoSummary {
        published: published.len(),
        ..DemoSummary::default()
    };
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for p in &published {
        let at = (p.partition, p.offset);
        let payload = &records[&at];
        let place = format!("p{}@{}", p.partition, p.offset);
        let ev = match parse_event(payload) {
            Ok(ev) => ev,
            Err(err) => {
                summary.invalid += 1;
                report_invalid(out, p.line, &place, payload, &err)?;
                if let Some(class) = outputs.dead_letters.get(&at) {
                    writeln!(out, "            → {} ({class})", config.topics.dlq())?;
                }
                continue;
            }
        };
        summary.valid += 1;
        let head = format!(
            "line {:>3}  {place:<8} {:<16} {:<16}",
            p.line,
            ev.event.as_str(),
            ev.event_id
        );
        if let Some(first) = first_line.get(&ev.event_id) {
            summary.duplicates += 1;
            writeln!(out, "{head} duplicate of line {first}: dropped")?;
            continue;
        }
        first_line.insert(ev.event_id.clone(), p.line);
        let got = outputs.delivered.get(&at).cloned().unwrap_or_default();
        summary.routed += got.len();
        let skipped: Vec<String> = config
            .enabled_destinations()
            .filter(|d| !got.contains(&d.name))
            .map(|d| match route::select(d, &ev) {
                Err(skip) => format!("{} ({})", d.name, skip.reason()),
                Ok(_) => format!("{} (not delivered)", d.name),
            })
            .collect();
        let sent = if got.is_empty() {
            "-".to_string()
        } else {
            got.join(", ")
        };
        writeln!(out, "{head} → {sent}")?;
        if !skipped.is_empty() {
            writeln!(out, "            skipped: {}", skipped.join("; "))?;
        }
    }
    writeln!(
        out,
        "{} published: {} valid ({} duplicates dropped), {} invalid dead-lettered to {}; {} deliveries routed",
        summary.published,
        summary.valid,
        summary.duplicates,
        summary.invalid,
        config.topics.dlq(),
        summary.routed
    )?;
    Ok(summary)
}

/// Runs the real router until it has committed every published record.
async fn route_all(
    config: &Arc<Config>,
    cluster: &Cluster,
    published: &[Published],
) -> Result<(), DemoError> {
    let shutdown = CancellationToken::new();
    let ctx = RoleContext {
        config: config.clone(),
        bootstrap: cluster.bootstrap().to_string(),
        instance_id: format!("demo-{}", std::process::id()),
        shutdown: shutdown.clone(),
    };
    let mut router = tokio::spawn(crate::router::run(ctx));
    // The router runs in this process, so its own count of records in
    // committed batches says when the sample has been routed. (The embedded
    // mock cluster does not report transactionally committed group offsets.)
    let start = crate::router::records_committed();
    let want = published.len() as u64;
    let deadline = tokio::time::Instant::now() + READ_BACK_TIMEOUT;
    while crate::router::records_committed() - start < want {
        tokio::select! {
            done = &mut router => {
                // The router never stops on its own; finishing early is a failure.
                done.map_err(crate::router::RouterError::from)??;
                return Err(DemoError::RouterTimeout);
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        if tokio::time::Instant::now() > deadline {
            shutdown.cancel();
            return Err(DemoError::RouterTimeout);
        }
    }
    shutdown.cancel();
    router.await.map_err(crate::router::RouterError::from)??;
    Ok(())
}

/// What the router wrote, by the canonical record it came from.
struct Outputs {
    delivered: HashMap<(i32, i64), Vec<String>>,
    dead_letters: HashMap<(i32, i64), String>,
}

async fn collect_outputs(config: &Config, bootstrap: &str) -> Result<Outputs, DemoError> {
    let mut outputs = Outputs {
        delivered: HashMap::new(),
        dead_letters: HashMap::new(),
    };
    for d in config.enabled_destinations() {
        let records =
            kafka::reader::read_to_end(&config.kafka, bootstrap, &config.topics.deliver(&d.name))
                .await
                .map_err(DemoError::Consume)?;
        for r in records {
            if let Some(delivery) = r
                .payload()
                .and_then(|p| serde_json::from_slice::<Delivery>(p).ok())
            {
                outputs
                    .delivered
                    .entry((delivery.origin.partition, delivery.origin.offset))
                    .or_default()
                    .push(d.name.clone());
            }
        }
    }
    let dlq = kafka::reader::read_to_end(&config.kafka, bootstrap, &config.topics.dlq())
        .await
        .map_err(DemoError::Consume)?;
    for r in dlq {
        let h = kafka::reader::headers(&r);
        if let (Some(p), Some(o)) = (
            h.get("original_partition").and_then(|v| v.parse().ok()),
            h.get("original_offset").and_then(|v| v.parse().ok()),
        ) {
            let class = h.get("error_class").cloned().unwrap_or_default();
            outputs.dead_letters.insert((p, o), class);
        }
    }
    Ok(outputs)
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
