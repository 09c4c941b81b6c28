//! librdkafka client configuration built from `[kafka]`.

use rdkafka::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::producer::BaseProducer;

use super::Error;
use crate::config::KafkaConfig;

/// Settings shared by every client: bootstrap, client id and the user's pass-through properties.
pub fn base(kafka: &KafkaConfig, bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("client.id", &kafka.client_id);
    for (k, v) in &kafka.properties {
        c.set(k, v.to_kafka_string());
    }
    c
}

/// An idempotent producer's settings: no duplicates or reordering from its own retries.
///
/// murmur2 is the Java client's partitioner: a key re-published by switchyard
/// must land on the partition a Java (or Go, or Python) publisher would have
/// chosen, or duplicates of one event_id would miss each other in dedup.
pub fn idempotent_producer(kafka: &KafkaConfig, bootstrap: &str) -> ClientConfig {
    let mut c = base(kafka, bootstrap);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("partitioner", "murmur2_random");
    c
}

/// A consumer that never commits on its own: switchyard commits only what is durable.
pub fn manual_commit_consumer(kafka: &KafkaConfig, bootstrap: &str, group: &str) -> ClientConfig {
    let mut c = base(kafka, bootstrap);
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed");
    c
}

/// A consumer that only reads assigned partitions (state topics, tooling):
/// it joins no group and never commits anything.
pub fn reader(kafka: &KafkaConfig, bootstrap: &str) -> ClientConfig {
    let mut c = base(kafka, bootstrap);
    c.set("group.id", "switchyard-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed");
    c
}

/// Lets librdkafka reject unknown or malformed pass-through properties
/// before anything connects (`switchyard check`).
pub fn check_properties(kafka: &KafkaConfig) -> Result<(), Error> {
    // A placeholder bootstrap: creating a client validates properties without a broker.
    let mut c = base(kafka, "127.0.0.1:9");
    c.set("enable.idempotence", "true")
        .set_log_level(RDKafkaLogLevel::Emerg);
    c.create::<BaseProducer>().map(drop).map_err(Error::Client)
}

/// Enqueues a record now (so a batch travels together) and returns its ack;
/// a full local queue is waited out, any other error is returned.
pub async fn enqueue<K, P>(
    producer: &rdkafka::producer::FutureProducer,
    mut record: rdkafka::producer::FutureRecord<'_, K, P>,
) -> Result<rdkafka::producer::DeliveryFuture, rdkafka::error::KafkaError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    use rdkafka::error::KafkaError;
    use rdkafka::types::RDKafkaErrorCode;
    loop {
        match producer.send_result(record) {
            Ok(ack) => return Ok(ack),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Waits for acks; the first failure is returned.
pub async fn acked(
    acks: Vec<rdkafka::producer::DeliveryFuture>,
) -> Result<(), rdkafka::error::KafkaError> {
    for ack in acks {
        ack.await
            .map_err(|_| rdkafka::error::KafkaError::Canceled)?
            .map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// An idempotent producer that is swapped for a fresh one after any of its
/// records failed.
///
/// A producer whose records timed out must bump its idempotence epoch (or is
/// left fatally failed on a sequence gap), and tansu 0.6 panics on that bump
/// and then serves nothing. The bump is only sent once the broker answers
/// again, so dropping the failed producer before then avoids it; a new
/// producer id costs nothing, because whatever failed is retried by its
/// caller. Callers still holding the old producer finish with it.
pub struct ProducerGuard {
    /// The producer in use and its generation (bumped by each replacement).
    current: std::sync::RwLock<(u64, rdkafka::producer::FutureProducer)>,
    settings: ClientConfig,
    /// Who uses it, for the log line.
    role: String,
}

impl ProducerGuard {
    pub fn new(
        settings: ClientConfig,
        role: impl Into<String>,
    ) -> Result<ProducerGuard, rdkafka::error::KafkaError> {
        Ok(ProducerGuard {
            current: std::sync::RwLock::new((0, settings.create()?)),
            settings,
            role: role.into(),
        })
    }

    /// The producer to use and its generation (pass that to [`Self::replace`]).
    pub fn current(&self) -> (u64, rdkafka::producer::FutureProducer) {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the producer of `failed_generation` after records failed;
    /// a no-op when another caller replaced it already. Returns whether the
    /// producer in use is now newer than `failed_generation`.
    pub fn replace(&self, failed_generation: u64) -> bool {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.0 != failed_generation {
            return true;
        }
        match self.settings.create::<rdkafka::producer::FutureProducer>() {
            Ok(p) => {
                *current = (failed_generation + 1, p);
                tracing::info!(
                    role = %self.role,
                    generation = failed_generation + 1,
                    "producer replaced after failed records"
                );
                true
            }
            Err(e) => {
                tracing::warn!(role = %self.role, error = %e, "cannot create a new producer; keeping the old one");
                false
            }
        }
    }

    /// Waits up to `timeout` for records still queued in the current producer.
    pub fn flush(&self, timeout: std::time::Duration) -> Result<(), rdkafka::error::KafkaError> {
        use rdkafka::producer::Producer;
        self.current().1.flush(timeout)
    }
}
