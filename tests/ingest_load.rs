//! Load through the ingest gateway, running as its own process
//! (`switchyard run --role ingest`), while the broker is killed (SIGKILL) and
//! restarted in the middle: every event the gateway acknowledged with a 2xx
//! must be on the topic afterwards.
//!
//! A test binary of its own because it kills the shared test broker; cargo
//! runs test binaries one after another.

mod common;

use std::collections::HashSet;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::json;

const KEY: &str = "load_0123456789abcdef";
const PARTITIONS: i32 = 3;
const SENDERS: usize = 4;
const BATCH: usize = 25;
/// Keeps the load bounded (≤ SENDERS × BATCH / PAUSE events/s) so the
/// verification read stays short.
const PAUSE: Duration = Duration::from_millis(25);
const KILL_AT: Duration = Duration::from_secs(10);
const RESTART_AT: Duration = Duration::from_secs(20);
const STOP_AT: Duration = Duration::from_secs(40);

/// Kills the child gateway however the test ends.
struct Gateway(Child);
impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Restarts the killed broker however the test ends, so that the test
/// binaries after this one find it running.
struct KilledBroker;
impl Drop for KilledBroker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Best effort: a second panic while unwinding would abort.
            let _ = std::panic::catch_unwind(|| broker_script("restart"));
        } else {
            broker_script("restart");
        }
    }
}

fn broker_script(action: &str) {
    let brokers = common::brokers();
    let port = brokers.rsplit(':').next().expect("host:port");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka-dev.sh");
    let out = Command::new(script)
        .arg(action)
        .env("SWITCHYARD_KAFKA_PORT", port)
        .output()
        .expect("run kafka-dev.sh");
    assert!(
        out.status.success(),
        "kafka-dev.sh {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn port_open(addr: &str) -> bool {
    std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(200)).is_ok()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Default)]
struct Tally {
    acked: HashSet<String>,
    ok_after_restart: usize,
    unavailable: usize,
    other: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_a_broker_crash() {
    let brokers = common::brokers();
    let topic = common::unique("ingest-load");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = common::write_config(
        dir.path(),
        &format!(
            r#"
[kafka]
brokers = "{brokers}"
guarantee = "at_least_once"
[topics]
canonical = "{topic}"
prefix = "{topic}-sy"
partitions = {PARTITIONS}
[metrics]
listen = "127.0.0.1:0"
[ingest]
listen = "127.0.0.1:{port}"
produce_timeout = "2s"
rate_limit_per_second = 0
[[ingest.keys]]
key = "{KEY}"
source = "load-test"
environment = "production"
"#
        ),
    );
    let log = std::fs::File::create(dir.path().join("gateway.log")).unwrap();
    let _gateway = Gateway(
        common::switchyard()
            .args([
                "run",
                "--role",
                "ingest",
                "--instance-id",
                "ingest-load",
                "--config",
            ])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the gateway"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let started = Instant::now();
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            break;
        }
        let log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "gateway not ready:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let tally = Arc::new(Mutex::new(Tally::default()));
    let t0 = Instant::now();
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let (http, base, tally) = (http.clone(), base.clone(), Arc::clone(&tally));
        senders.push(tokio::spawn(async move {
            let mut n = 0usize;
            while t0.elapsed() < STOP_AT {
                let ids: Vec<String> = (0..BATCH).map(|i| format!("load-{s}-{n}-{i}")).collect();
                n += 1;
                let batch: Vec<_> = ids
                    .iter()
                    .map(|id| json!({"event": "lead", "event_id": id, "occurred_at": "2026-11-26T10:00:00Z", "user_id": "u"}))
                    .collect();
                let sent_at = t0.elapsed();
                let resp = http
                    .post(format!("{base}/v1/events"))
                    .bearer_auth(KEY)
                    .json(&json!({ "batch": batch }))
                    .send()
                    .await;
                {
                let mut t = tally.lock().unwrap();
                match resp.map(|r| r.status().as_u16()) {
                    Ok(200) => {
                        if sent_at > RESTART_AT {
                            t.ok_after_restart += 1;
                        }
                        t.acked.extend(ids);
                    }
                    Ok(503) => t.unavailable += 1,
                    Ok(other) => t.other.push(format!("status {other}")),
                    Err(e) => t.other.push(e.to_string()),
                }
                }
                tokio::time::sleep(PAUSE).await;
            }
        }));
    }

    tokio::time::sleep(KILL_AT).await;
    let broker = KilledBroker;
    broker_script("kill");
    // SIGKILL is delivered asynchronously; give the kernel a moment.
    let killed = Instant::now();
    while port_open(&brokers) && killed.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !port_open(&brokers),
        "the broker still answers after kill: export SWITCHYARD_KAFKA_DIR as used to start it"
    );
    tokio::time::sleep(RESTART_AT - KILL_AT).await;
    drop(broker);
    for s in senders {
        s.await.unwrap();
    }

    let tally = Arc::try_unwrap(tally).ok().unwrap().into_inner().unwrap();
    let log = std::fs::read_to_string(dir.path().join("gateway.log")).unwrap_or_default();
    assert!(
        tally.other.is_empty(),
        "unexpected answers: {:?}\n{log}",
        &tally.other[..tally.other.len().min(5)]
    );
    assert!(tally.unavailable > 0, "the outage never showed as 503");
    assert!(
        tally.ok_after_restart > 0,
        "no 2xx after the broker came back:\n{log}"
    );

    let on_topic = read_all(&brokers, &topic, &tally.acked);
    let missing: Vec<&String> = tally.acked.difference(&on_topic).take(10).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged events are not on the topic, e.g. {missing:?}",
        tally.acked.len() - tally.acked.intersection(&on_topic).count(),
        tally.acked.len()
    );
    eprintln!(
        "load: {} events acknowledged, {} requests answered 503 during the outage, all acknowledged events on the topic",
        tally.acked.len(),
        tally.unavailable
    );
}

/// Event ids on `topic`, read until every `wanted` id was seen or nothing new came for 20 s.
fn read_all(brokers: &str, topic: &str, wanted: &HashSet<String>) -> HashSet<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", common::unique("ingest-load-check"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut seen = HashSet::new();
    let mut found = 0;
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_secs(20) && found < wanted.len() {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.expect("consume");
            let key = String::from_utf8_lossy(m.key().unwrap()).into_owned();
            let value: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            assert_eq!(value["event_id"], json!(key), "record keyed by event_id");
            if wanted.contains(&key) && !seen.contains(&key) {
                found += 1;
            }
            seen.insert(key);
            last = Instant::now();
        }
    }
    seen
}
