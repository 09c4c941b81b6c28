//! Every copy of an event_id is compared on one partition, whichever key and
//! partitioner its publisher used, and across a change of the input's
//! partition count: on tansu (at-least-once, router processes) and on the
//! mock cluster (exactly-once, in process).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::kafka::{Record, produce_with, read_all, read_until};
use common::router::{Setup, sample};
use serde_json::json;
use switchyard::config::Config;
use switchyard::kafka::partitioner::partition_for;
use switchyard::kafka::{Cluster, topics};
use switchyard::run::RoleContext;
use tokio_util::sync::CancellationToken;

const T: &str = "2026-11-20T10:00:00Z";

fn purchase(id: &str, anon: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"event":"purchase","event_id":id,"occurred_at":T,
        "anonymous_id":anon,"value":10,"currency":"EUR",
        "consent":{"ads":"granted","analytics":"granted"}}))
    .unwrap()
}

/// `n` purchases `<tag>-<i>`, each by visitor `anon-<tag>-<i>`.
fn events(tag: &str, n: usize) -> Vec<(String, String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let id = format!("{tag}-{i:03}");
            let anon = format!("anon-{id}");
            let body = purchase(&id, &anon);
            (id, anon, body)
        })
        .collect()
}

fn keyed_by_id(evs: &[(String, String, Vec<u8>)]) -> Vec<(Option<String>, Vec<u8>)> {
    evs.iter()
        .map(|(id, _, b)| (Some(id.clone()), b.clone()))
        .collect()
}

fn keyed_by_visitor(evs: &[(String, String, Vec<u8>)]) -> Vec<(Option<String>, Vec<u8>)> {
    evs.iter()
        .map(|(_, a, b)| (Some(a.clone()), b.clone()))
        .collect()
}

/// How many times each event_id was delivered.
fn counts(records: &[Record]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in records {
        let id = r.json()["event"]["event_id"].as_str().unwrap().to_string();
        *out.entry(id).or_insert(0) += 1;
    }
    out
}

/// Waits until `topic` holds `want` records, gives a duplicate time to show
/// up behind them, and returns everything it holds.
async fn settled(brokers: &str, topic: &str, want: usize) -> Vec<Record> {
    read_until(brokers, topic, Duration::from_secs(180), |r| {
        r.len() >= want
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    read_all(brokers, topic)
}

fn assert_once(records: &[Record], ids: &[String], what: &str) {
    let got = counts(records);
    let want: BTreeMap<String, usize> = ids.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(got, want, "{what}: every event exactly once");
}

/// The three copies of each event, as the issue reported them: keyed by
/// event_id through librdkafka's default partitioner (CRC32), keyed by the
/// visitor through it, and keyed by event_id through a murmur2 producer.
/// Returns (expected wrong_partition, expected wrong_key) re-routes.
async fn publish_three_ways(
    brokers: &str,
    canonical: &str,
    partitions: i32,
    evs: &[(String, String, Vec<u8>)],
) -> (u64, u64) {
    let homes: Vec<i32> = evs
        .iter()
        .map(|(id, _, _)| partition_for(id.as_bytes(), partitions))
        .collect();
    let off_home = |landed: &[i32]| -> u64 {
        landed.iter().zip(&homes).filter(|(l, h)| l != h).count() as u64
    };
    let crc = produce_with(brokers, canonical, "consistent_random", &keyed_by_id(evs)).await;
    let visitor = produce_with(
        brokers,
        canonical,
        "consistent_random",
        &keyed_by_visitor(evs),
    )
    .await;
    let murmur = produce_with(brokers, canonical, "murmur2_random", &keyed_by_id(evs)).await;
    assert_eq!(
        murmur, homes,
        "switchyard's partitioner is librdkafka's murmur2_random"
    );
    let (wrong_partition, wrong_key) = (off_home(&crc), off_home(&visitor));
    assert!(
        wrong_partition > 0 && wrong_key > 0,
        "the fixture must exercise both reasons"
    );
    (wrong_partition, wrong_key)
}

#[tokio::test(flavor = "multi_thread")]
async fn any_key_and_partitioner_reach_each_destination_once_at_least_once() {
    let _watchdog = common::watchdog(
        "any_key_and_partitioner_reach_each_destination_once_at_least_once",
        Duration::from_secs(600),
    );
    let s = Setup::new("at_least_once", 4);
    let evs = events("pp", 40);
    let ids: Vec<String> = evs.iter().map(|e| e.0.clone()).collect();
    let (wrong_partition, wrong_key) = publish_three_ways(&s.brokers, &s.canonical, 4, &evs).await;

    let mut router = s.router("r1");
    for d in ["meta", "hook"] {
        let got = settled(&s.brokers, &s.deliver(d), ids.len()).await;
        assert_once(&got, &ids, &format!("{d}\n{}", s.logs("r1")));
    }
    let metrics = s.metrics("r1").await;
    assert_eq!(
        sample(
            &metrics,
            r#"switchyard_router_records_rerouted_total{reason="wrong_partition"}"#
        ),
        Some(wrong_partition),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"switchyard_router_records_rerouted_total{reason="wrong_key"}"#
        ),
        Some(wrong_key),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "switchyard_router_duplicates_dropped_total"),
        Some(2 * ids.len() as u64),
        "two of the three copies of each event are duplicates\n{metrics}"
    );
    // The re-published copies carry where they came from and why.
    let moved: Vec<Record> = read_all(&s.brokers, &s.canonical)
        .into_iter()
        .filter(|r| r.headers.contains_key("switchyard-rerouted-from"))
        .collect();
    assert_eq!(moved.len() as u64, wrong_partition + wrong_key);
    for r in &moved {
        let id = r.json()["event_id"].as_str().unwrap().to_string();
        assert_eq!(r.key_str(), id);
        assert_eq!(r.partition, partition_for(id.as_bytes(), 4));
    }
    s.stop(&mut router, "r1");
}

/// An exactly-once config for the embedded mock cluster, on `input`.
fn eos_config(input: &str, partitions: i32) -> Arc<Config> {
    let text = format!(
        r#"
[kafka]
guarantee = "exactly_once"
[topics]
canonical = "{input}"
partitions = {partitions}
[destinations.meta]
type = "meta_capi"
pixel_id = "1"
access_token = "t"
[destinations.hook]
type = "webhook"
url = "http://127.0.0.1:9/"
secret = "0123456789abcdef"
consent = "analytics"
"#
    );
    Arc::new(Config::parse(&text, Path::new("eos.toml"), &|_| None).unwrap())
}

/// A router task in this process; it stops when the token is cancelled.
struct InProcess {
    token: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), switchyard::router::RouterError>>,
}

impl InProcess {
    fn start(config: &Arc<Config>, cluster: &Cluster) -> InProcess {
        let token = CancellationToken::new();
        let task = tokio::spawn(switchyard::router::run(RoleContext {
            config: config.clone(),
            bootstrap: cluster.bootstrap().to_string(),
            instance_id: "eos-partitions".into(),
            shutdown: token.clone(),
        }));
        InProcess { token, task }
    }

    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(120), self.task)
            .await
            .expect("the router stopped within 120 s of shutdown")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn any_key_and_partitioner_reach_each_destination_once_exactly_once() {
    let _watchdog = common::watchdog(
        "any_key_and_partitioner_reach_each_destination_once_exactly_once",
        Duration::from_secs(600),
    );
    let config = eos_config("events.canonical", 4);
    let cluster = Cluster::connect(&config).unwrap();
    topics::ensure(&cluster, &config).await.unwrap();
    let brokers = cluster.bootstrap().to_string();
    let evs = events("eo", 40);
    let ids: Vec<String> = evs.iter().map(|e| e.0.clone()).collect();
    let (wrong_partition, wrong_key) =
        publish_three_ways(&brokers, &config.topics.canonical, 4, &evs).await;

    let router = InProcess::start(&config, &cluster);
    for d in ["meta", "hook"] {
        let got = settled(&brokers, &config.topics.deliver(d), ids.len()).await;
        assert_once(&got, &ids, d);
    }
    // The other in-process test publishes every record on its home
    // partition, so these counters are this test's own.
    assert_eq!(
        switchyard::router::records_rerouted("wrong_partition"),
        wrong_partition
    );
    assert_eq!(switchyard::router::records_rerouted("wrong_key"), wrong_key);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dedup_stays_exact_across_a_layout_change_exactly_once() {
    let _watchdog = common::watchdog(
        "dedup_stays_exact_across_a_layout_change_exactly_once",
        Duration::from_secs(600),
    );
    let before = eos_config("events.canonical", 2);
    let cluster = Cluster::connect(&before).unwrap();
    topics::ensure(&cluster, &before).await.unwrap();
    let brokers = cluster.bootstrap().to_string();
    let first = events("eg", 30);
    let first_ids: Vec<String> = first.iter().map(|e| e.0.clone()).collect();
    produce_with(
        &brokers,
        "events.canonical",
        "murmur2_random",
        &keyed_by_id(&first),
    )
    .await;
    let router = InProcess::start(&before, &cluster);
    settled(&brokers, &before.topics.deliver("hook"), first_ids.len()).await;
    router.stop().await;

    // The same state topics under an input of 4 partitions (see `move_input`).
    let after = eos_config("events.canonical4", 4);
    let reports = topics::ensure(&cluster, &after).await.unwrap();
    let names: Vec<&str> = reports.iter().map(|r| r.spec.name.as_str()).collect();
    assert!(names.contains(&"switchyard.dedup.p4"), "{names:?}");
    let second = events("eh", 30);
    let mut all_ids = first_ids.clone();
    all_ids.extend(second.iter().map(|e| e.0.clone()));
    let mut replay = keyed_by_id(&first);
    replay.extend(keyed_by_id(&second));
    produce_with(&brokers, "events.canonical4", "murmur2_random", &replay).await;
    let router = InProcess::start(&after, &cluster);
    for d in ["meta", "hook"] {
        let got = settled(&brokers, &after.topics.deliver(d), all_ids.len()).await;
        assert_once(&got, &all_ids, d);
    }
    router.stop().await;
}

/// Moves the router to an input topic of `partitions` partitions, keeping
/// every state topic: what the router sees when partitions are added to its
/// input. (tansu 0.6.0 cannot add partitions, having no CreatePartitions,
/// and its DeleteTopics drops every topic, so the input cannot be recreated
/// in place.) Returns the new input topic.
fn move_input(s: &Setup, partitions: i32) -> String {
    let moved = format!("{}{partitions}", s.canonical);
    let text = std::fs::read_to_string(&s.config).unwrap();
    let text = text
        .replace(
            &format!("canonical = \"{}\"", s.canonical),
            &format!("canonical = \"{moved}\""),
        )
        .replace(
            "\npartitions = 2\n",
            &format!("\npartitions = {partitions}\n"),
        );
    std::fs::write(&s.config, text).unwrap();
    moved
}

#[tokio::test(flavor = "multi_thread")]
async fn dedup_stays_exact_when_the_input_partition_count_changes() {
    let _watchdog = common::watchdog(
        "dedup_stays_exact_when_the_input_partition_count_changes",
        Duration::from_secs(600),
    );
    let s = Setup::new("at_least_once", 2);
    let first = events("gr", 30);
    let first_ids: Vec<String> = first.iter().map(|e| e.0.clone()).collect();
    produce_with(
        &s.brokers,
        &s.canonical,
        "murmur2_random",
        &keyed_by_id(&first),
    )
    .await;
    let mut router = s.router("r1");
    settled(&s.brokers, &s.deliver("hook"), first_ids.len()).await;
    s.stop(&mut router, "r1");

    let input = move_input(&s, 4);
    let report = common::run_ok(&["topics", "create"], &s.config);
    let dedup = format!("{}.dedup", s.prefix);
    let line = |name: &str| -> String {
        report
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no line for {name} in\n{report}"))
            .to_string()
    };
    assert!(
        line(&format!("{dedup}.p4")).starts_with("created"),
        "{report}"
    );
    assert!(
        line(&dedup).contains("partitions=2")
            && line(&dedup).contains("until its keys leave the window"),
        "{report}"
    );
    // Most of these now belong to another partition than they did: without
    // the earlier layout's marks, dedup would let them through again.
    let moved = first
        .iter()
        .filter(|(id, _, _)| partition_for(id.as_bytes(), 2) != partition_for(id.as_bytes(), 4))
        .count();
    assert!(moved > 0, "the fixture must move event_ids");
    let second = events("gs", 30);
    let mut all_ids = first_ids.clone();
    all_ids.extend(second.iter().map(|e| e.0.clone()));
    let mut replay = keyed_by_id(&first);
    replay.extend(keyed_by_id(&second));
    produce_with(&s.brokers, &input, "murmur2_random", &replay).await;

    let mut router = s.router("r1");
    for d in ["meta", "hook"] {
        let got = settled(&s.brokers, &s.deliver(d), all_ids.len()).await;
        assert_once(&got, &all_ids, &format!("{d}\n{}", s.logs("r1")));
    }
    let logs = s.logs("r1");
    assert!(
        logs.contains("marks of earlier input layouts loaded"),
        "{logs}"
    );
    let metrics = s.metrics("r1").await;
    assert_eq!(
        sample(&metrics, "switchyard_router_duplicates_dropped_total"),
        Some(first_ids.len() as u64),
        "{metrics}"
    );
    let marks = read_all(&s.brokers, &format!("{dedup}.p4"));
    assert!(
        !marks.is_empty(),
        "the new layout's marks go to its own topic"
    );
    s.stop(&mut router, "r1");
}
