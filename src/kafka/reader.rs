//! Reading a whole topic as it is now: for the demo, `dlq` tooling and checks.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::{ADMIN_TIMEOUT, client};
use crate::config::KafkaConfig;

/// Every committed record of `topic` up to each partition's end at the time
/// of the call (later records are not waited for).
pub async fn read_to_end(
    kafka: &KafkaConfig,
    bootstrap: &str,
    topic: &str,
) -> Result<Vec<OwnedMessage>, KafkaError> {
    let consumer: BaseConsumer = client::reader(kafka, bootstrap).create()?;
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || read_blocking(&consumer, &topic))
        .await
        .map_err(|_| KafkaError::Canceled)?
}

fn read_blocking(consumer: &BaseConsumer, topic: &str) -> Result<Vec<OwnedMessage>, KafkaError> {
    let md = consumer.fetch_metadata(Some(topic), ADMIN_TIMEOUT)?;
    let mut tpl = TopicPartitionList::new();
    let mut pending: HashMap<i32, i64> = HashMap::new();
    for t in md.topics() {
        for p in t.partitions() {
            let (low, high) = consumer.fetch_watermarks(topic, p.id(), ADMIN_TIMEOUT)?;
            if high > low {
                tpl.add_partition_offset(topic, p.id(), Offset::Offset(low))?;
                pending.insert(p.id(), high);
            }
        }
    }
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !pending.is_empty() {
        if Instant::now() > deadline {
            return Err(KafkaError::MessageConsumption(
                RDKafkaErrorCode::OperationTimedOut,
            ));
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if pending
                    .get(&m.partition())
                    .is_some_and(|end| m.offset() >= end - 1)
                {
                    pending.remove(&m.partition());
                }
                out.push(m.detach());
            }
            Some(Err(e)) => return Err(e),
            None => {
                // Transaction markers and compaction leave offsets with no record.
                if let Ok(pos) = consumer.position() {
                    pending.retain(|p, end| {
                        pos.find_partition(topic, *p)
                            .and_then(|e| e.offset().to_raw())
                            .is_none_or(|o| o < *end)
                    });
                }
            }
        }
    }
    Ok(out)
}

/// A record's headers as strings.
pub fn headers(m: &OwnedMessage) -> HashMap<String, String> {
    m.headers()
        .map(|h| {
            h.iter()
                .map(|hdr| {
                    (
                        hdr.key.to_string(),
                        String::from_utf8_lossy(hdr.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
