//! The sink across a broker crash: `switchyard run --role sink` as its own
//! process keeps delivering while the broker is killed (SIGKILL) and
//! restarted; outcome writes that fail in between are retried, and nothing
//! is lost.
//!
//! tansu 0.6.0 panics (and then serves nothing) when an idempotent producer
//! bumps its epoch after records timed out; the sink swaps in a fresh
//! producer after any failed write instead, like ingest. The produce timeout
//! is 3 s here so records do time out during the outage.
//!
//! A test binary of its own because it kills the shared test broker; cargo
//! runs test binaries one after another.

mod common;

use std::process::{Child, Command};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use common::fake_vendor::FakeVendor;
use common::sink::*;

/// Kills the child however the test ends.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        common::kafka::sigkill(&mut self.0);
    }
}

/// Restarts the killed broker however the test ends, so that the test
/// binaries after this one find it running.
struct KilledBroker;
impl Drop for KilledBroker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = std::panic::catch_unwind(|| broker_script("restart"));
        } else {
            broker_script("restart");
        }
    }
}

/// Runs `scripts/kafka-dev.sh ACTION` for the test broker, after checking
/// that its data dir belongs to the broker on our port (the script kills
/// whatever pid that dir names).
fn broker_script(action: &str) {
    let brokers = common::brokers();
    let port = brokers.rsplit(':').next().expect("host:port");
    let dir = std::env::var("SWITCHYARD_KAFKA_DIR").expect(
        "SWITCHYARD_KAFKA_DIR names the test broker's data dir (scripts/test.sh exports it)",
    );
    if action == "kill" {
        let pid = std::fs::read_to_string(format!("{dir}/tansu.pid")).expect("tansu.pid");
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
        assert!(
            String::from_utf8_lossy(&cmdline).contains(&format!("127.0.0.1:{port}")),
            "{dir}/tansu.pid is not the broker on port {port}"
        );
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka-dev.sh");
    let out = Command::new(script)
        .arg(action)
        .env("SWITCHYARD_KAFKA_PORT", port)
        .env("SWITCHYARD_KAFKA_DIR", &dir)
        .output()
        .expect("run kafka-dev.sh");
    assert!(
        out.status.success(),
        "kafka-dev.sh {action}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn broker_answers() -> bool {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .create()
        .unwrap();
    c.fetch_metadata(None, Duration::from_secs(5)).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_survive_a_broker_crash_with_a_fresh_producer() {
    let fake = FakeVendor::start(SECRET).await;
    // Slow answers, so batches are at the vendor when the broker dies.
    fake.set_delay(Duration::from_secs(1));
    let s = setup_with(
        &fake,
        "batch_max_events = 20\nlinger = \"20ms\"\nmax_in_flight = 2\n",
        2,
        r#"producer_properties = { "message.timeout.ms" = "3000" }"#,
    );
    ensure_topics(&s.config).await;
    let evs = events(&common::unique("crash"), 200, 30);
    produce(&s.config, &evs).await;
    let want = ids(&evs);
    let log = s.dir.path().join("sink.log");
    let name = dest(&s.config);
    let instance = common::unique("crash");
    let mut sink = Proc(common::kafka::spawn_switchyard(
        &[
            "--role",
            "sink",
            "--destination",
            &name,
            "--instance-id",
            &instance,
        ],
        &s.path,
        &log,
    ));
    wait_until(
        "some delivered and two batches at the vendor",
        Duration::from_secs(60),
        || fake.delivered().len() >= 40 && fake.holding().len() == 2,
    )
    .await;

    let restart = KilledBroker;
    broker_script("kill");
    let killed_at = fake.delivered().len();
    // Batches in flight reach the vendor, but their outcomes cannot be
    // written: the writes time out (3 s) and are retried.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during = fake.delivered().len() - killed_at;
    assert!(
        during > 0,
        "the batches at the vendor were answered meanwhile"
    );
    drop(restart); // restarts the broker
    wait_until("every event delivered", Duration::from_secs(90), || {
        fake.delivered().is_superset(&want)
    })
    .await;
    let alive = sink.0.try_wait().unwrap().is_none();
    let sink_log = std::fs::read_to_string(&log).unwrap();
    assert!(alive, "the sink kept running:\n{sink_log}");
    let status = tokio::task::spawn_blocking(move || {
        common::kafka::sigterm(&mut sink.0, Duration::from_secs(40))
    })
    .await
    .unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{sink_log}"
    );
    let replaced = sink_log.matches("producer replaced").count();
    let failures = sink_log.matches("writing outcomes failed").count();
    let sends: usize = fake.received().iter().map(|r| r.events.len()).sum();
    println!(
        "broker crash figures: {} events, {killed_at} delivered before the kill, {during} more sent while it was down, \
         {failures} failed outcome writes, producer replaced {replaced} times, {} event sends in all",
        evs.len(),
        sends
    );
    assert!(failures >= 1 && replaced >= 1, "{sink_log}");
    assert!(
        broker_answers(),
        "the broker still serves after the sink's writes resumed"
    );
    assert_keys_are_event_ids(&fake);
}
