//! Closing a group consumer that has rebalance events nobody has served yet
//! (a router or sink task aborted while busy) must not hang: librdkafka's
//! close can then wait forever for an answer from a group that has already
//! terminated (librdkafka #4041, #4884).

mod common;

use std::time::{Duration, Instant};

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext};

use switchyard::config::Config;
use switchyard::kafka::rebalance::{self, GroupConsumer};
use switchyard::kafka::{Cluster, client, topics};

/// Rebalances the way switchyard's router and sinks do.
struct Cooperative;

impl ClientContext for Cooperative {}

impl ConsumerContext for Cooperative {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        rebalance::apply(self, consumer, true, err, tpl);
    }
}

/// Without draining, plain rdkafka consumers hung within 7 to 15 rounds of
/// this loop (in four tries), each round a fresh consumer whose assignment
/// arrives while nobody polls it.
#[tokio::test(flavor = "multi_thread")]
async fn a_consumer_dropped_with_an_unserved_assignment_closes() {
    let _watchdog = common::watchdog(
        "a_consumer_dropped_with_an_unserved_assignment_closes",
        Duration::from_secs(300),
    );
    let config = Config::default();
    let cluster = Cluster::connect(&config).expect("embedded broker");
    topics::ensure(&cluster, &config).await.expect("topics");
    for round in 0..16u64 {
        let group = format!("close-{round}");
        let mut cc: ClientConfig =
            client::manual_commit_consumer(&config.kafka, cluster.bootstrap(), &group);
        cc.set("partition.assignment.strategy", "cooperative-sticky")
            .set("group.instance.id", "close");
        assert!(rebalance::is_cooperative(&cc));
        let consumer: StreamConsumer<Cooperative> =
            cc.create_with_context(Cooperative).expect("consumer");
        consumer
            .subscribe(&[&config.topics.canonical])
            .expect("subscribe");
        // The mock cluster hands out partitions about 3 s after a join (its
        // initial rebalance delay): close at varied points just after that.
        let unpolled = Duration::from_millis(2950 + round * 53 % 600);
        tokio::time::sleep(unpolled).await;

        let consumer = GroupConsumer::new(consumer);
        let started = Instant::now();
        let close = tokio::task::spawn_blocking(move || drop(consumer));
        tokio::time::timeout(Duration::from_secs(30), close)
            .await
            .unwrap_or_else(|_| panic!("round {round}: the close hung (unpolled for {unpolled:?})"))
            .expect("close");
        eprintln!("round {round}: closed in {:?}", started.elapsed());
    }
}
