//! `switchyard replay` against a real Kafka-protocol broker (tansu): a time
//! range of the canonical topic goes to the chosen destination and nowhere
//! else, events the ledger shows delivered are skipped, an interrupted
//! replay resumes without a gap or a double, `--dry-run` writes nothing,
//! and a deliver topic's range is copied as it is.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use common::kafka::{Record, read_all};

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    brokers: String,
    prefix: String,
    canonical: String,
    /// The range replayed: [from, to).
    from: DateTime<Utc>,
    to: DateTime<Utc>,
}

const SECRET: &str = "0123456789abcdef";

impl Setup {
    fn new() -> Setup {
        Setup::with_hook("http://127.0.0.1:9/hook")
    }

    fn with_hook(hook: &str) -> Setup {
        let brokers = common::brokers();
        let prefix = common::unique("replay");
        let canonical = format!("{prefix}.canonical");
        let dir = tempfile::tempdir().unwrap();
        let text = common::pipeline_config(&prefix, 3)
            + &common::webhook("hook", hook, SECRET, "")
            + &common::webhook("other", "http://127.0.0.1:9/other", SECRET, "");
        let config = common::write_config(dir.path(), &text);
        common::run_ok(&["topics", "create"], &config);
        let now = Utc::now();
        Setup {
            _dir: dir,
            config,
            brokers,
            prefix,
            canonical,
            from: now - chrono::Duration::minutes(90),
            to: now - chrono::Duration::minutes(30),
        }
    }

    fn deliver(&self, d: &str) -> String {
        format!("{}.deliver.{d}", self.prefix)
    }

    fn range_args(&self) -> Vec<String> {
        let t = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Millis, true);
        vec![
            "replay".into(),
            "--from".into(),
            t(self.from),
            "--to".into(),
            t(self.to),
        ]
    }

    fn replay(&self, extra: &[&str]) -> String {
        let mut args = self.range_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::run_ok(&args, &self.config)
    }
}

fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap()
}

/// Produces `(key, payload, timestamp)` records in the order of their
/// timestamps, as publishers' clocks write them, and waits for every ack.
async fn produce_at(brokers: &str, topic: &str, records: &[(String, String, DateTime<Utc>)]) {
    let p = producer(brokers);
    let mut records = records.to_vec();
    records.sort_by_key(|(_, _, at)| *at);
    let mut acks = Vec::new();
    for (k, v, at) in &records {
        let record = FutureRecord::to(topic)
            .key(k)
            .payload(v)
            .timestamp(at.timestamp_millis());
        acks.push(p.send_result(record).map_err(|(e, _)| e).expect("enqueue"));
    }
    for a in acks {
        a.await.expect("ack").expect("delivered");
    }
}

fn purchase(id: &str, analytics: &str) -> String {
    serde_json::json!({
        "event": "purchase", "event_id": id, "occurred_at": "2026-12-01T10:00:00Z",
        "user_id": format!("user-{id}"), "value": 12.5, "currency": "EUR",
        "consent": {"analytics": analytics}
    })
    .to_string()
}

/// Canonical records keyed by event_id: `n` in the range, 10 before and 10
/// after it, and `extra`; returns the ids in the range.
async fn publish(
    s: &Setup,
    tag: &str,
    n: usize,
    extra: Vec<(String, String, DateTime<Utc>)>,
) -> Vec<String> {
    let span = s.to - s.from;
    let mut records = Vec::new();
    let mut inside = Vec::new();
    for i in 0..n {
        let id = format!("{tag}-in-{i}");
        let at = s.from + span * (i as i32 + 1) / (n as i32 + 2);
        records.push((id.clone(), purchase(&id, "granted"), at));
        inside.push(id);
    }
    for i in 0..10 {
        let before = format!("{tag}-before-{i}");
        records.push((
            before.clone(),
            purchase(&before, "granted"),
            s.from - chrono::Duration::minutes(10 + i),
        ));
        let after = format!("{tag}-after-{i}");
        records.push((
            after.clone(),
            purchase(&after, "granted"),
            s.to + chrono::Duration::minutes(1 + i),
        ));
    }
    records.extend(extra);
    produce_at(&s.brokers, &s.canonical, &records).await;
    inside
}

/// Ledger records saying each of `ids` was delivered to `destination`.
async fn delivered(s: &Setup, destination: &str, ids: &[&str]) {
    let now = Utc::now();
    let records: Vec<(String, String, DateTime<Utc>)> = ids
        .iter()
        .map(|id| {
            let entry = serde_json::json!({
                "event_id": id, "destination": destination, "status": "delivered",
                "attempts": 1, "http_status": 200, "recorded_at": now
            });
            (format!("{id}/{destination}"), entry.to_string(), now)
        })
        .collect();
    produce_at(&s.brokers, &format!("{}.outcomes", s.prefix), &records).await;
}

/// A delivery record of a purchase for `destination`, stamped `at`.
fn delivery(
    s: &Setup,
    destination: &str,
    id: &str,
    at: DateTime<Utc>,
) -> (String, String, DateTime<Utc>) {
    let delivery = serde_json::json!({
        "v": 1, "destination": destination, "name": "purchase",
        "event": serde_json::from_str::<serde_json::Value>(&purchase(id, "granted")).unwrap(),
        "origin": {"topic": s.canonical, "partition": 0, "offset": 0},
        "routed_at": at
    });
    (format!("user-{id}"), delivery.to_string(), at)
}

/// Event ids of the records in `topic`, with how often each appears.
fn ids(records: &[Record]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for r in records {
        let id = r.json()["event"]["event_id"].as_str().unwrap().to_string();
        *out.entry(id).or_insert(0) += 1;
    }
    out
}

fn row<'a>(report: &'a str, destination: &str) -> Vec<&'a str> {
    report
        .lines()
        .find(|l| l.starts_with(&format!("{destination} ")))
        .unwrap_or_else(|| panic!("no row for {destination}:\n{report}"))
        .split_whitespace()
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_delivers_exactly_its_range_to_the_chosen_destination_and_skips_what_was_delivered()
 {
    let _w = common::watchdog("replay_range", Duration::from_secs(300));
    let s = Setup::new();
    // In the range besides: a second copy of one event, an event without
    // analytics consent, and a record that is no event.
    let mid = s.from + (s.to - s.from) / 2;
    let extra = vec![
        ("r-in-3".into(), purchase("r-in-3", "granted"), mid),
        ("r-denied".into(), purchase("r-denied", "denied"), mid),
        ("r-bad".into(), "{not json".into(), mid),
    ];
    let inside = publish(&s, "r", 40, extra).await;
    let before: Vec<&str> = inside[..5].iter().map(String::as_str).collect();
    delivered(&s, "hook", &before).await;

    // --dry-run counts and writes nothing.
    let dry = s.replay(&["--destination", "hook", "--dry-run"]);
    assert_eq!(row(&dry, "hook")[1..4], ["35", "5", "1"], "{dry}");
    assert!(
        dry.contains("43 record(s) read: 1 invalid") && dry.contains("1 further cop"),
        "{dry}"
    );
    assert!(read_all(&s.brokers, &s.deliver("hook")).is_empty());

    let report = s.replay(&["--destination", "hook"]);
    assert_eq!(row(&report, "hook")[1..4], ["35", "5", "1"], "{report}");
    assert!(!report.contains("other "), "{report}");
    let replayed = read_all(&s.brokers, &s.deliver("hook"));
    let got = ids(&replayed);
    let want: HashMap<String, usize> = inside[5..].iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(
        got, want,
        "exactly the range, less what was delivered, once each"
    );
    for r in &replayed {
        assert!(
            r.headers.contains_key("switchyard-replay"),
            "{:?}",
            r.headers
        );
        assert!(!r.headers.contains_key("switchyard-replay-force"));
        // Keyed by the person, as the router keys deliveries.
        assert!(r.key_str().starts_with("user-"), "{}", r.key_str());
    }
    assert!(
        read_all(&s.brokers, &s.deliver("other")).is_empty(),
        "a destination not chosen got deliveries"
    );

    // --force sends the delivered ones too, marked so the sink sends them.
    let forced = s.replay(&["--destination", "hook", "--force"]);
    assert_eq!(row(&forced, "hook")[1..4], ["40", "0", "1"], "{forced}");
    let all = read_all(&s.brokers, &s.deliver("hook"));
    let forced: Vec<&Record> = all
        .iter()
        .filter(|r| r.headers.contains_key("switchyard-replay-force"))
        .collect();
    assert_eq!(forced.len(), 40);

    // From a deliver topic: its range is copied as it is. `other` holds
    // deliveries the replays above did not write (they went to `hook`).
    let old: Vec<(String, String, DateTime<Utc>)> = (0..12)
        .map(|i| {
            let at = if i < 10 {
                mid
            } else {
                s.from - chrono::Duration::minutes(5)
            };
            delivery(&s, "other", &format!("d-{i}"), at)
        })
        .collect();
    produce_at(&s.brokers, &s.deliver("other"), &old).await;
    delivered(&s, "other", &["d-0", "d-1"]).await;
    let copied = s.replay(&["--destination", "other", "--source", "deliver"]);
    assert_eq!(row(&copied, "other")[1..3], ["8", "2"], "{copied}");
    let other = read_all(&s.brokers, &s.deliver("other"));
    let copies: Vec<&Record> = other
        .iter()
        .filter(|r| r.headers.contains_key("switchyard-replay"))
        .collect();
    let copied_ids: HashSet<String> = copies
        .iter()
        .map(|r| r.json()["event"]["event_id"].as_str().unwrap().to_string())
        .collect();
    let want: HashSet<String> = (2..10).map(|i| format!("d-{i}")).collect();
    assert_eq!(copied_ids, want);
    assert_eq!(copies.len(), 8);
}

/// `switchyard replay ARGS… --config CONFIG` as a child with piped output.
fn spawn_replay(args: &[String], config: &Path) -> std::process::Child {
    common::switchyard()
        .args(args)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_interrupted_replay_resumes_where_it_stopped_without_a_gap_or_a_double() {
    let _w = common::watchdog("replay_resume", Duration::from_secs(300));
    let s = Setup::new();
    let inside = publish(&s, "i", 300, Vec::new()).await;
    let mut args = s.range_args();
    args.extend(["--destination", "hook", "--rate", "50"].map(String::from));
    let child = spawn_replay(&args, &s.config);
    // Let it write some of the range (about 6 s at 50/s), then Ctrl-C.
    let t = Instant::now();
    while read_all(&s.brokers, &s.deliver("hook")).len() < 60 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the replay wrote nothing"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = std::process::Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = read_all(&s.brokers, &s.deliver("hook")).len();
    assert!(
        first < 300,
        "it was not stopped early ({first} written):\n{stdout}"
    );
    let resume = stdout
        .lines()
        .skip_while(|l| !l.starts_with("Stopped."))
        .find_map(|l| l.trim().strip_prefix("switchyard "))
        .unwrap_or_else(|| panic!("no resume command:\n{stdout}"));
    assert!(resume.contains("--resume "), "{resume}");

    // The printed command, as a user would paste it (without the rate).
    let args: Vec<String> = resume
        .split_whitespace()
        .map(String::from)
        .filter(|a| a != "--rate" && a != "50")
        .collect();
    let out = common::switchyard().args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = ids(&read_all(&s.brokers, &s.deliver("hook")));
    let want: HashMap<String, usize> = inside.iter().map(|id| (id.clone(), 1)).collect();
    assert_eq!(got.len(), want.len(), "a gap");
    assert_eq!(got, want, "a double or a stranger");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forced_replay_is_sent_again_by_the_sink_and_an_unforced_one_is_not_replayed() {
    let _w = common::watchdog("replay_force", Duration::from_secs(300));
    let fake = common::fake_vendor::FakeVendor::start(SECRET).await;
    let s = Setup::with_hook(&fake.url());
    let mid = s.from + (s.to - s.from) / 2;
    let records: Vec<_> = (0..5)
        .map(|i| delivery(&s, "hook", &format!("f-{i}"), mid))
        .collect();
    produce_at(&s.brokers, &s.deliver("hook"), &records).await;
    let log = s._dir.path().join("sink.log");
    let mut sink = common::kafka::spawn_switchyard(
        &[
            "--role",
            "sink",
            "--destination",
            "hook",
            "--instance-id",
            "replay-sink",
        ],
        &s.config,
        &log,
    );
    let sent = |fake: &common::fake_vendor::FakeVendor| -> usize {
        fake.received().iter().map(|r| r.accepted.len()).sum()
    };
    let outcomes = format!("{}.outcomes", s.prefix);
    let t = Instant::now();
    while sent(&fake) < 5 || read_all(&s.brokers, &outcomes).len() < 5 {
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "the sink did not deliver:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The ledger shows each delivered: a replay writes nothing.
    let unforced = s.replay(&["--destination", "hook", "--source", "deliver"]);
    assert_eq!(row(&unforced, "hook")[1..3], ["0", "5"], "{unforced}");
    // Forced, the copies go out, and the sink sends them although its own
    // ledger knows the events.
    let forced = s.replay(&["--destination", "hook", "--source", "deliver", "--force"]);
    assert_eq!(row(&forced, "hook")[1..3], ["5", "0"], "{forced}");
    let t = Instant::now();
    while sent(&fake) < 10 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "forced copies not sent ({} of 10):\n{}",
            sent(&fake),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Once each, no more: the copies' copies are not replayed copies again.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sent(&fake), 10);
    common::kafka::sigterm(&mut sink, Duration::from_secs(30));
}
