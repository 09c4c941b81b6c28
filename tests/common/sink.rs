//! Helpers for the sink's integration tests: a webhook destination on its
//! own topics and group, deliveries fed straight into its deliver topic, and
//! the sink run in-process or as a child process.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message};
use switchyard::config::Config;
use switchyard::delivery::Delivery;
use switchyard::kafka::{Cluster, topics};
use switchyard::run::RoleContext;
use switchyard::sink::{self, SinkError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::fake_vendor::FakeVendor;

pub const SECRET: &str = "0123456789abcdef-test";

pub struct Setup {
    pub config: Arc<Config>,
    pub path: PathBuf,
    pub dir: tempfile::TempDir,
}

/// Unique names per test: the prefix and destination name make the
/// consumer group (`<prefix>-sink-<NAME>`), which tests must not share.
pub fn setup(fake: &FakeVendor, delivery: &str) -> Setup {
    setup_with(fake, delivery, 2, "")
}

/// [`setup`] with `partitions` per topic and extra lines for `[kafka]`
/// (e.g. `consumer_properties = { "session.timeout.ms" = "6000" }`).
pub fn setup_with(fake: &FakeVendor, delivery: &str, partitions: i32, kafka: &str) -> Setup {
    let prefix = super::unique("sink");
    let name = super::unique("hook");
    let text = format!(
        r#"
[kafka]
brokers = "{brokers}"
guarantee = "at_least_once"
{kafka}

[topics]
prefix = "{prefix}"
canonical = "{prefix}.canonical"
partitions = {partitions}

[metrics]
listen = "127.0.0.1:0"

[destinations.{name}]
type = "webhook"
url = "{url}"
secret = "{SECRET}"
consent = "analytics"

[destinations.{name}.delivery]
{delivery}
"#,
        delivery = delivery.replace("destinations.hook", &format!("destinations.{name}")),
        brokers = super::brokers(),
        url = fake.url(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = super::write_config(dir.path(), &text);
    Setup {
        config: Arc::new(Config::load(&path).unwrap()),
        path,
        dir,
    }
}

pub fn dest(config: &Config) -> String {
    config.destinations.keys().next().unwrap().clone()
}

pub async fn ensure_topics(config: &Config) {
    let cluster = Cluster::connect(config).unwrap();
    topics::ensure(&cluster, config).await.unwrap();
}

pub fn delivery(dest: &str, id: &str, user: &str) -> Delivery {
    serde_json::from_value(serde_json::json!({
        "v": 1,
        "destination": dest,
        "name": "purchase",
        "event": {
            "event": "purchase", "event_id": id, "occurred_at": "2026-11-26T14:03:11Z",
            "user_id": user, "value": 10.0, "currency": "EUR"
        },
        "origin": {"topic": "events.canonical", "partition": 0, "offset": 1},
        "routed_at": "2026-11-26T14:03:12Z"
    }))
    .unwrap()
}

/// Publishes (event_id, user) deliveries in order, keyed by user like the router.
pub async fn produce(config: &Config, events: &[(String, String)]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", super::brokers())
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let name = dest(config);
    let topic = config.topics.deliver(&name);
    for (id, user) in events {
        let payload = serde_json::to_vec(&delivery(&name, id, user)).unwrap();
        producer
            .send(
                FutureRecord::to(&topic).key(user).payload(&payload),
                Timeout::After(Duration::from_secs(10)),
            )
            .await
            .unwrap();
    }
}

pub fn events(tag: &str, n: usize, users: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("{tag}-{i}"), format!("user-{}", i % users)))
        .collect()
}

pub struct InProcess {
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), SinkError>>,
}

pub async fn start(config: &Arc<Config>) -> InProcess {
    ensure_topics(config).await;
    let shutdown = CancellationToken::new();
    let ctx = RoleContext {
        config: config.clone(),
        bootstrap: super::brokers(),
        instance_id: super::unique("inproc"),
        shutdown: shutdown.clone(),
    };
    let name = dest(config);
    let handle = tokio::spawn(async move { sink::run(ctx, &name, || {}).await });
    InProcess { shutdown, handle }
}

impl InProcess {
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("sink stops within its deadline")
            .unwrap()
            .expect("sink ends cleanly");
    }
}

pub async fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn ids(events: &[(String, String)]) -> HashSet<String> {
    events.iter().map(|(id, _)| id.clone()).collect()
}

pub fn assert_keys_are_event_ids(fake: &FakeVendor) {
    for r in fake.received() {
        for (id, key) in &r.events {
            assert_eq!(
                id, key,
                "every event carries its event_id as idempotency key"
            );
        }
        if let [(id, _)] = r.events.as_slice() {
            assert_eq!(&r.idempotency_header, id);
        }
    }
}

pub async fn ledger(config: &Config) -> Vec<serde_json::Value> {
    let kafka = config.kafka.clone();
    let topic = config.topics.outcomes();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        sink::scan::scan_topic(&kafka, &super::brokers(), &topic, |m| {
            out.push(serde_json::from_slice(m.payload().unwrap()).unwrap());
        })
        .unwrap();
        out
    })
    .await
    .unwrap()
}

pub fn spawn_sink(path: &Path, name: &str, instance: &str) -> Child {
    super::switchyard()
        .args([
            "run",
            "--role",
            "sink",
            "--destination",
            name,
            "--instance-id",
            instance,
            "--config",
        ])
        .arg(path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// Committed offsets of the sink's group on its deliver topic, summed over partitions.
pub fn committed_on_deliver(config: &Config) -> i64 {
    committed(config, &config.topics.deliver(&dest(config)))
        .into_iter()
        .filter(|o| *o >= 0)
        .sum()
}

/// The sink group's committed offset per partition of `topic` (-1 = none).
pub fn committed(config: &Config, topic: &str) -> Vec<i64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let name = dest(config);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", super::brokers())
        .set("group.id", switchyard::sink::group_id(config, &name))
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..config.topics.partitions {
        tpl.add_partition(topic, p);
    }
    consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .map(|e| e.offset().to_raw().unwrap_or(-1))
        .collect()
}
