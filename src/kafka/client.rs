//! librdkafka client configuration built from `[kafka]`.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::BaseConsumer;
use rdkafka::producer::BaseProducer;

use super::Error;
use crate::config::{KafkaConfig, PropertyValue};

/// Settings shared by every client: bootstrap, client id and the user's
/// pass-through `properties`. Admin clients use it as it is.
pub fn base(kafka: &KafkaConfig, bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("client.id", &kafka.client_id);
    pass_through(&mut c, &kafka.properties);
    c
}

/// `base` and the user's `consumer_properties`.
pub fn consumer(kafka: &KafkaConfig, bootstrap: &str) -> ClientConfig {
    let mut c = base(kafka, bootstrap);
    pass_through(&mut c, &kafka.consumer_properties);
    c
}

/// `base` and the user's `producer_properties`.
pub fn producer(kafka: &KafkaConfig, bootstrap: &str) -> ClientConfig {
    let mut c = base(kafka, bootstrap);
    pass_through(&mut c, &kafka.producer_properties);
    // Every record switchyard writes fits (the config refuses a smaller one).
    set_default(
        &mut c,
        "message.max.bytes",
        &kafka.max_message_bytes.to_string(),
    );
    c
}

/// Sets a tuning default the user's own setting, if any, overrides.
pub fn set_default(c: &mut ClientConfig, key: &str, value: &str) {
    if c.get(key).is_none() {
        c.set(key, value);
    }
}

fn pass_through(c: &mut ClientConfig, props: &BTreeMap<String, PropertyValue>) {
    for (k, v) in props {
        c.set(k, v.to_kafka_string());
    }
}

/// An idempotent producer's settings: no duplicates or reordering from its own retries.
///
/// murmur2 is the Java client's partitioner: a key re-published by switchyard
/// must land on the partition a Java (or Go, or Python) publisher would have
/// chosen, or duplicates of one event_id would miss each other in dedup.
pub fn idempotent_producer(kafka: &KafkaConfig, bootstrap: &str) -> ClientConfig {
    let mut c = producer(kafka, bootstrap);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random");
    set_default(&mut c, "linger.ms", "5");
    c
}

/// A consumer that never commits on its own: switchyard commits only what is durable.
pub fn manual_commit_consumer(kafka: &KafkaConfig, bootstrap: &str, group: &str) -> ClientConfig {
    let mut c = consumer(kafka, bootstrap);
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
    let mut c = consumer(kafka, bootstrap);
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
    const NOWHERE: &str = "127.0.0.1:9";
    let mut p = producer(kafka, NOWHERE);
    p.set("enable.idempotence", "true")
        .set_log_level(RDKafkaLogLevel::Emerg);
    p.create::<BaseProducer>().map_err(Error::Client)?;
    let mut c = consumer(kafka, NOWHERE);
    c.set("group.id", "switchyard-check")
        .set_log_level(RDKafkaLogLevel::Emerg);
    c.create::<BaseConsumer>().map(drop).map_err(Error::Client)
}

/// Enqueues a record now (so a batch travels together) and returns its ack.
/// A full local queue is waited out until `deadline` or `stop`, then its
/// `QueueFull` is returned like any other error: a broker that takes nothing
/// must not hold a caller (or a shutdown) forever.
pub async fn enqueue<K, P>(
    producer: &rdkafka::producer::FutureProducer,
    mut record: rdkafka::producer::FutureRecord<'_, K, P>,
    deadline: std::time::Instant,
    stop: &tokio_util::sync::CancellationToken,
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
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                if std::time::Instant::now() < deadline && !stop.is_cancelled() =>
            {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn kafka(extra: &str) -> KafkaConfig {
        let text = format!(
            r#"
            [kafka]
            brokers = "127.0.0.1:9092"
            [kafka.properties]
            "socket.timeout.ms" = 30000
            [kafka.consumer_properties]
            "partition.assignment.strategy" = "roundrobin"
            "socket.timeout.ms" = 45000
            {extra}
            "#
        );
        Config::parse(&text, std::path::Path::new("t.toml"), &|_| None)
            .unwrap()
            .kafka
    }

    #[test]
    fn each_client_gets_the_shared_properties_and_only_its_own_kind() {
        let k = kafka("[kafka.producer_properties]\n\"linger.ms\" = 20");
        let c = manual_commit_consumer(&k, "b:9092", "g");
        assert_eq!(c.get("partition.assignment.strategy"), Some("roundrobin"));
        assert_eq!(
            c.get("socket.timeout.ms"),
            Some("45000"),
            "the consumer's wins"
        );
        assert_eq!(c.get("linger.ms"), None);
        let r = reader(&k, "b:9092");
        assert_eq!(r.get("partition.assignment.strategy"), Some("roundrobin"));
        let p = idempotent_producer(&k, "b:9092");
        assert_eq!(p.get("partition.assignment.strategy"), None);
        assert_eq!(p.get("socket.timeout.ms"), Some("30000"));
        assert_eq!(p.get("linger.ms"), Some("20"), "the user's tuning stands");
        assert_eq!(p.get("acks"), Some("all"));
        let admin = base(&k, "b:9092");
        assert_eq!(admin.get("partition.assignment.strategy"), None);
        assert_eq!(admin.get("linger.ms"), None);
        let default = idempotent_producer(&kafka(""), "b:9092");
        assert_eq!(default.get("linger.ms"), Some("5"));
    }

    #[test]
    fn check_names_an_unknown_property_of_either_kind() {
        assert!(check_properties(&kafka("")).is_ok());
        for extra in [
            "[kafka.producer_properties]\n\"linger.msec\" = 1",
            // The consumer's table is the last one open.
            "\"fetch.wait.max.msec\" = 1",
        ] {
            let e = check_properties(&kafka(extra)).unwrap_err().to_string();
            let name = extra.split('"').nth(1).unwrap();
            assert!(e.contains(name), "{e}");
        }
    }
}
