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
