//! Kafka plumbing: client configuration, the embedded broker, topic admin.

pub mod client;
pub mod embedded;
pub mod partitioner;
pub mod progress;
pub mod reader;
pub mod rebalance;
pub mod topics;

use std::time::Duration;

use rdkafka::error::KafkaError;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::Config;
pub use embedded::EmbeddedBroker;

/// How long admin and metadata calls may take before the broker counts as unreachable.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot reach Kafka at {bootstrap} within {}s: {source}", ADMIN_TIMEOUT.as_secs())]
    Unreachable {
        bootstrap: String,
        source: KafkaError,
    },
    #[error("invalid Kafka client configuration: {0}")]
    Client(KafkaError),
    #[error("could not start the embedded broker: {0}")]
    Embedded(String),
    #[error("topic {topic}: {source}")]
    Admin { topic: String, source: KafkaError },
    #[error("{} topic problem(s):\n  {}", .0.len(), .0.join("\n  "))]
    Topics(Vec<String>),
}

/// Where a record is. Commits name the next offset to read this way too.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl Position {
    pub fn new(topic: impl Into<String>, partition: i32, offset: i64) -> Position {
        Position {
            topic: topic.into(),
            partition,
            offset,
        }
    }
}

/// The brokers switchyard talks to: the configured cluster, or an in-process
/// mock cluster when none is configured (zero setup, not durable).
pub enum Cluster {
    External { bootstrap: String },
    Embedded(EmbeddedBroker),
}

impl Cluster {
    /// Uses `kafka.brokers`, or starts the embedded broker when it is absent.
    pub fn connect(config: &Config) -> Result<Cluster, Error> {
        match &config.kafka.brokers {
            Some(b) => Ok(Cluster::External {
                bootstrap: b.clone(),
            }),
            None => Ok(Cluster::Embedded(EmbeddedBroker::start()?)),
        }
    }

    pub fn bootstrap(&self) -> &str {
        match self {
            Cluster::External { bootstrap } => bootstrap,
            Cluster::Embedded(e) => e.bootstrap(),
        }
    }

    pub fn is_embedded(&self) -> bool {
        matches!(self, Cluster::Embedded(_))
    }
}
