//! Reads a whole topic, up to the end it had when the scan started, without
//! joining a consumer group (ledger index, dead-letter listing).

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::SinkError;
use crate::config::KafkaConfig;
use crate::kafka::progress::ReadProgress;
use crate::kafka::{ADMIN_TIMEOUT, client};

/// How long a scan may read nothing before it is reported as stuck. Not a
/// total time: the ledger grows, and a slow scan that moves must finish.
const SCAN_STALL: Duration = Duration::from_secs(60);

/// Calls `each` for every record of `topic` below the high watermarks read at
/// the start. Blocking: call it from `spawn_blocking` in async code.
pub fn scan_topic(
    kafka: &KafkaConfig,
    bootstrap: &str,
    topic: &str,
    each: impl FnMut(&BorrowedMessage<'_>),
) -> Result<(), SinkError> {
    scan_topic_since(kafka, bootstrap, topic, None, each)
}

/// [`scan_topic`] from the first record with a timestamp at or after
/// `since_ms` (unix milliseconds) in each partition, when given.
pub fn scan_topic_since(
    kafka: &KafkaConfig,
    bootstrap: &str,
    topic: &str,
    since_ms: Option<i64>,
    mut each: impl FnMut(&BorrowedMessage<'_>),
) -> Result<(), SinkError> {
    let fail = |message: String| SinkError::Scan {
        topic: topic.to_string(),
        message,
    };
    let mut cfg = client::consumer(kafka, bootstrap);
    // A group id is required by librdkafka even though nothing is committed.
    cfg.set("group.id", "switchyard-scan")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer = cfg.create()?;
    let md = consumer.fetch_metadata(Some(topic), ADMIN_TIMEOUT)?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(fail(
            "topic does not exist (run `switchyard topics create`)".into(),
        ));
    }
    let mut starts = HashMap::new();
    if let Some(ms) = since_ms {
        let mut query = TopicPartitionList::new();
        for p in &partitions {
            query.add_partition_offset(topic, *p, Offset::Offset(ms))?;
        }
        for e in consumer.offsets_for_times(query, ADMIN_TIMEOUT)?.elements() {
            starts.insert(e.partition(), e.offset());
        }
    }
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, ADMIN_TIMEOUT)?;
        let start = match starts.get(&p) {
            // No record that recent in this partition.
            Some(Offset::End) => continue,
            Some(Offset::Offset(o)) => (*o).max(low),
            _ => low,
        };
        if high > start {
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Offset(start))?;
        }
    }
    if ends.is_empty() {
        return Ok(());
    }
    consumer.assign(&tpl)?;
    let mut progress = ReadProgress::new("scan", topic, SCAN_STALL);
    while !ends.is_empty() {
        if progress.stalled() {
            return Err(fail(format!(
                "stopped before its end offsets: nothing read for {}s",
                SCAN_STALL.as_secs()
            )));
        }
        progress.report(&ends);
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let p = m.partition();
                progress.record(p, m.offset());
                let reached = ends.get(&p).is_some_and(|end| m.offset() + 1 >= *end);
                if ends.contains_key(&p) {
                    each(&m);
                }
                if reached {
                    ends.remove(&p);
                }
            }
            Some(Err(e)) => return Err(e.into()),
            None => {
                // Compaction can remove the last records below the watermark.
                let pos = consumer.position()?;
                ends.retain(|p, end| {
                    let at = pos
                        .find_partition(topic, *p)
                        .and_then(|e| e.offset().to_raw());
                    if let Some(o) = at {
                        progress.position(*p, o);
                    }
                    at.is_none_or(|at| at < *end)
                });
            }
        }
    }
    Ok(())
}
