//! Kafka helpers for integration tests: produce fixtures, read topics back,
//! run and kill switchyard processes.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// A record read back from a topic.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: HashMap<String, String>,
}

impl Record {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(self.payload.as_deref().expect("payload")).expect("JSON payload")
    }
    pub fn key_str(&self) -> &str {
        std::str::from_utf8(self.key.as_deref().unwrap_or_default()).unwrap_or("")
    }
}

pub fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("message.max.bytes", "12000000")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// Produces `(key, payload)` records and waits for every ack.
pub async fn produce(brokers: &str, topic: &str, records: &[(Option<String>, Vec<u8>)]) {
    let p = producer(brokers);
    let mut acks = Vec::with_capacity(records.len());
    for (k, v) in records {
        let mut r = FutureRecord::<String, Vec<u8>>::to(topic).payload(v);
        if let Some(k) = k {
            r = r.key(k);
        }
        loop {
            match p.send_result(r) {
                Ok(a) => {
                    acks.push(a);
                    break;
                }
                Err((_, back)) => {
                    r = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
    for a in acks {
        a.await.expect("ack").expect("delivered");
    }
}

/// Produces `(key, payload)` records with a producer using `partitioner`
/// (librdkafka's names: `consistent_random`, `murmur2_random`…) and returns
/// the partition each record landed on, in order.
pub async fn produce_with(
    brokers: &str,
    topic: &str,
    partitioner: &str,
    records: &[(Option<String>, Vec<u8>)],
) -> Vec<i32> {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("partitioner", partitioner)
        .create()
        .expect("producer");
    let mut acks = Vec::with_capacity(records.len());
    for (k, v) in records {
        let mut r = FutureRecord::<String, Vec<u8>>::to(topic).payload(v);
        if let Some(k) = k {
            r = r.key(k);
        }
        acks.push(p.send_result(r).map_err(|(e, _)| e).expect("enqueue"));
    }
    let mut partitions = Vec::with_capacity(acks.len());
    for a in acks {
        let delivery = a.await.expect("ack").expect("delivered");
        partitions.push(delivery.partition);
    }
    partitions
}

/// Reads a whole topic (all partitions, from the beginning) until `done`
/// says enough or `limit` passes; `read_committed` hides aborted records.
pub fn read_until(
    brokers: &str,
    topic: &str,
    limit: Duration,
    done: impl Fn(&[Record]) -> bool,
) -> Vec<Record> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "switchyard-test-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for p in md.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let start = Instant::now();
    while start.elapsed() < limit && !done(&out) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            let mut headers = HashMap::new();
            if let Some(h) = m.headers() {
                for hdr in h.iter() {
                    headers.insert(
                        hdr.key.to_string(),
                        String::from_utf8_lossy(hdr.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            out.push(Record {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
                headers,
            });
        }
    }
    out
}

/// Reads everything the topic holds now: up to each partition's end offset
/// as of the call.
pub fn read_all(brokers: &str, topic: &str) -> Vec<Record> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let ends: HashMap<i32, i64> = md.topics()[0]
        .partitions()
        .iter()
        .map(|p| {
            let (_, high) = c
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .expect("watermarks");
            (p.id(), high)
        })
        .collect();
    let want = std::cell::RefCell::new(ends);
    read_until(brokers, topic, Duration::from_secs(120), |rs| {
        let mut w = want.borrow_mut();
        if let Some(r) = rs.last() {
            w.retain(|p, end| !(*p == r.partition && r.offset >= *end - 1));
        }
        w.retain(|_, end| *end > 0);
        w.is_empty()
    })
}

/// `switchyard run` as a child process, logging to `log`.
pub fn spawn_switchyard(args: &[&str], config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    super::switchyard()
        .arg("run")
        .args(args)
        .arg("--config")
        .arg(config)
        .env(
            "RUST_LOG",
            std::env::var("SWITCHYARD_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn switchyard")
}

pub fn sigkill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGTERM, then the exit status (waits up to `limit`).
pub fn sigterm(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    sigkill(child);
    None
}

/// Creates `name` with the broker's default configuration (not as
/// `topics create` would), for tests that need a topic switchyard did not make.
pub async fn create_topic(brokers: &str, name: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let made = admin
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    assert!(made.iter().all(|r| r.is_ok()), "{made:?}");
}
