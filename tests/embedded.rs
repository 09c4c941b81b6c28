//! The embedded default: with no brokers configured, switchyard runs on
//! librdkafka's in-process mock cluster.

use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};

use switchyard::config::Config;
use switchyard::kafka::{Cluster, client, topics};

#[tokio::test]
async fn produce_consume_round_trip_on_the_embedded_broker() {
    let config = Config::default();
    let cluster = Cluster::connect(&config).expect("embedded broker");
    assert!(cluster.is_embedded());
    let reports = topics::ensure(&cluster, &config).await.expect("topics");
    assert!(reports.iter().any(|r| r.spec.name == "switchyard.dedup"));

    let producer: FutureProducer = client::idempotent_producer(&config.kafka, cluster.bootstrap())
        .create()
        .unwrap();
    let mut sent = Vec::new();
    for i in 0..20 {
        let key = format!("evt-{i}");
        let payload = format!("{{\"n\":{i}}}");
        let (partition, offset) = producer
            .send(
                FutureRecord::to(&config.topics.canonical)
                    .key(&key)
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map(|d| (d.partition, d.offset))
            .map_err(|(e, _)| e)
            .unwrap();
        sent.push((key, payload, partition, offset));
    }

    let consumer: StreamConsumer =
        client::manual_commit_consumer(&config.kafka, cluster.bootstrap(), "round-trip")
            .create()
            .unwrap();
    consumer.subscribe(&[&config.topics.canonical]).unwrap();
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("records come back within 30 s")
            .unwrap();
        got.push((
            String::from_utf8(m.key().unwrap().to_vec()).unwrap(),
            String::from_utf8(m.payload().unwrap().to_vec()).unwrap(),
            m.partition(),
            m.offset(),
        ));
    }
    got.sort();
    sent.sort();
    assert_eq!(got, sent);
}
