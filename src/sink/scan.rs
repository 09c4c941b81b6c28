//! The sink's reads of a whole topic (ledger index, dead-letter listing):
//! [`crate::kafka::reader::scan`], with its failures as [`SinkError`]s.

use rdkafka::message::BorrowedMessage;

use super::SinkError;
use crate::config::KafkaConfig;
use crate::kafka::reader::{self, ReadError};

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
    each: impl FnMut(&BorrowedMessage<'_>),
) -> Result<(), SinkError> {
    reader::scan(kafka, bootstrap, topic, since_ms, each).map_err(|e| match e {
        ReadError::Kafka(e) => SinkError::Kafka(e),
        other => SinkError::Scan {
            topic: topic.to_string(),
            message: other.to_string(),
        },
    })
}
