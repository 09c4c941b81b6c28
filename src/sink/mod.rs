//! `switchyard run --role sink --destination NAME`: drains
//! `<prefix>.deliver.<NAME>` (and its retry topic) in consumer group
//! `<prefix>-sink-<NAME>` (`switchyard-sink-<NAME>` by default), delivers in batches, and commits a record's
//! offset only once its outcome is durable.
//!
//! One concern a file: [`wiring`] builds the role and runs the engine;
//! [`engine`] owns the consumer and feeds each record through the state
//! machines [`batching`] (batches and commits), [`ordering`] (a person's
//! events in order) and [`laps`] (the retry topic read back); each batch
//! runs in its own task ([`send::deliver`]) and reports back what it made
//! durable.

pub mod auth;
mod batching;
pub mod bench;
pub mod config;
pub mod destination;
pub mod dlq;
mod engine;
pub mod handover;
mod laps;
pub mod metrics;
pub mod offsets;
mod ordering;
pub mod pace;
pub mod records;
pub mod retry;
mod round;
pub mod scan;
pub mod send;
mod wiring;

use rdkafka::error::KafkaError;
use thiserror::Error;

pub use wiring::{group_id, run};

#[derive(Debug, Error)]
pub enum SinkError {
    #[error("unknown or disabled destination `{0}`")]
    UnknownDestination(String),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("writing an outcome failed: {0}")]
    Produce(KafkaError),
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("reading {topic}: {message}")]
    Scan { topic: String, message: String },
    #[error("batch task failed: {0}")]
    Task(String),
    #[error(
        "with ordering, {deliver} ({deliver_partitions} partitions) and {retry} ({retry_partitions}) need the same partition count"
    )]
    NotCopartitioned {
        deliver: String,
        deliver_partitions: i32,
        retry: String,
        retry_partitions: i32,
    },
    #[error(transparent)]
    Cluster(#[from] crate::kafka::Error),
}
