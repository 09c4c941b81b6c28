//! `switchyard trace` against a real Kafka-protocol broker (tansu), end to
//! end through real processes: a router and a webhook sink (to a signed
//! stand-in that refuses one event and answers 503 twice for another) run
//! on a small stream; a replay re-delivers one event; then each event is
//! traced and its lines checked: delivered (with its duplicate copy and the
//! identity the router added), rejected (the stand-in's reason), retried
//! (attempts and parked records), skipped for consent, replayed, and one
//! that never existed.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use rdkafka::producer::FutureRecord;

use common::fake_vendor::{FakeVendor, Reply};
use common::kafka::{producer, read_all, sigterm, spawn_switchyard};

const SECRET: &str = "0123456789abcdef";

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    brokers: String,
    prefix: String,
    canonical: String,
}

impl Setup {
    fn new(hook: &str) -> Setup {
        let brokers = common::brokers();
        let prefix = common::unique("trace");
        let canonical = format!("{prefix}.canonical");
        let dir = tempfile::tempdir().unwrap();
        let retry = "[destinations.hook.delivery.retry]\ninitial_backoff = \"100ms\"\nmax_backoff = \"200ms\"\npark_after = \"500ms\"";
        let text =
            common::pipeline_config(&prefix, 3) + &common::webhook("hook", hook, SECRET, retry);
        let config = common::write_config(dir.path(), &text);
        common::run_ok(&["topics", "create"], &config);
        Setup {
            dir,
            config,
            brokers,
            prefix,
            canonical,
        }
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    fn logs(&self) -> String {
        ["router", "sink"]
            .iter()
            .map(|n| std::fs::read_to_string(self.log(n)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    /// Waits until the ledger holds an outcome for each of `ids` at hook.
    fn await_outcomes(&self, ids: &[&str]) {
        let topic = format!("{}.outcomes", self.prefix);
        let t = Instant::now();
        loop {
            let keys: Vec<String> = read_all(&self.brokers, &topic)
                .iter()
                .map(|r| r.key_str().to_string())
                .collect();
            let missing: Vec<&&str> = ids
                .iter()
                .filter(|id| !keys.contains(&format!("{id}/hook")))
                .collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "no outcome for {missing:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `switchyard trace ARGS… --config F`: exit code and stdout.
    fn trace(&self, args: &[&str]) -> (i32, String) {
        let out = common::switchyard()
            .arg("trace")
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let code = out.status.code().unwrap_or(-1);
        assert!(
            code != 1,
            "trace {args:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (code, stdout)
    }
}

/// Canonical records `(event_id, payload, timestamp)`, keyed by event_id
/// with the Java partitioner, acknowledged.
async fn publish(brokers: &str, topic: &str, records: &[(String, String, DateTime<Utc>)]) {
    let p = producer(brokers);
    for (id, payload, at) in records {
        p.send(
            FutureRecord::to(topic)
                .key(id)
                .payload(payload)
                .timestamp(at.timestamp_millis()),
            Duration::from_secs(10),
        )
        .await
        .expect("published");
    }
}

fn purchase(id: &str, user: &str, analytics: &str) -> String {
    serde_json::json!({
        "event": "purchase", "event_id": id, "occurred_at": Utc::now(),
        "user_id": user, "value": 12.5, "currency": "EUR",
        "consent": {"analytics": analytics}
    })
    .to_string()
}

/// The timeline's lines (between the header and "searched:").
fn steps(out: &str) -> Vec<&str> {
    out.lines()
        .skip(1)
        .take_while(|l| *l != "searched:")
        .collect()
}

/// The lines of `stage` (and destination) that contain every one of `parts`.
fn find<'a>(out: &'a str, stage: &str, parts: &[&str]) -> Vec<&'a str> {
    steps(out)
        .into_iter()
        .filter(|l| {
            let mut cols = l.split_whitespace();
            cols.nth(1) == Some(stage) && parts.iter().all(|p| l.contains(p))
        })
        .collect()
}

#[track_caller]
fn one(out: &str, stage: &str, parts: &[&str]) {
    let found = find(out, stage, parts);
    assert_eq!(
        found.len(),
        1,
        "want one {stage} line with {parts:?}, got {found:?} in:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn trace_shows_each_events_path_through_router_sink_dlq_retries_and_replay() {
    let _w = common::watchdog("trace", Duration::from_secs(420));
    let fake = FakeVendor::start(SECRET).await;
    let s = Setup::new(&fake.url());
    let mut router = spawn_switchyard(
        &["--role", "router", "--instance-id", "trace-router"],
        &s.config,
        &s.log("router"),
    );
    let mut sink = spawn_switchyard(
        &[
            "--role",
            "sink",
            "--destination",
            "hook",
            "--instance-id",
            "trace-sink",
        ],
        &s.config,
        &s.log("sink"),
    );
    let tag = common::unique("t");
    let id = |what: &str| format!("{tag}-{what}");
    let user = format!("user-{tag}");
    let now = Utc::now();

    // One event stamped half an hour ago for the replay below, first on
    // its partition (a replay's range ends at the first record stamped
    // past it); then who the person is: an identify with their email.
    let old = now - chrono::Duration::minutes(30);
    let who = serde_json::json!({
        "event": "identify", "event_id": id("who"), "occurred_at": now,
        "user_id": user, "email": "Ann.Trace@Example.com",
        "consent": {"analytics": "granted"}
    })
    .to_string();
    publish(
        &s.brokers,
        &s.canonical,
        &[
            (id("replay"), purchase(&id("replay"), &user, "granted"), old),
            (id("who"), who, now),
        ],
    )
    .await;
    s.await_outcomes(&[&id("who"), &id("replay")]);

    // Delivered (twice published: the second copy is a duplicate),
    // refused by the vendor, and skipped for consent.
    fake.refuse_with(&[&id("bad")], "amount must be positive");
    let now = Utc::now();
    publish(
        &s.brokers,
        &s.canonical,
        &[
            (id("ok"), purchase(&id("ok"), &user, "granted"), now),
            (id("ok"), purchase(&id("ok"), &user, "granted"), now),
            (id("bad"), purchase(&id("bad"), &user, "granted"), now),
            (id("skip"), purchase(&id("skip"), &user, "denied"), now),
        ],
    )
    .await;
    s.await_outcomes(&[&id("ok"), &id("bad")]);

    // Two 503s with Retry-After: 1 s is beyond park_after, so the event is
    // parked twice on the retry topic and delivered at the third attempt.
    fake.script([
        Reply::Unavailable { retry_after_s: 1 },
        Reply::Unavailable { retry_after_s: 1 },
    ]);
    publish(
        &s.brokers,
        &s.canonical,
        &[(
            id("retry"),
            purchase(&id("retry"), &user, "granted"),
            Utc::now(),
        )],
    )
    .await;
    s.await_outcomes(&[&id("retry")]);

    // The replay of the old event's minute, forced: the sink sends it again.
    let at = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Millis, true);
    let from = at(old - chrono::Duration::minutes(1));
    let to = at(old + chrono::Duration::minutes(1));
    let report = common::run_ok(
        &[
            "replay",
            "--from",
            &from,
            "--to",
            &to,
            "--destination",
            "hook",
            "--force",
        ],
        &s.config,
    );
    assert!(report.contains("1 record(s) read"), "{report}");
    let t = Instant::now();
    let sent = |id: &str| {
        fake.received()
            .iter()
            .filter(|r| r.accepted.iter().any(|a| a == id))
            .count()
    };
    while sent(&id("replay")) < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the replayed copy was not sent:\n{}",
            s.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Its ledger record follows the vendor's answer.
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();

    // Delivered: the copy, the duplicate, the route, the identity the
    // router added (a hash, never the email), the delivery and its outcome.
    let (code, ok) = s.trace(&[&id("ok")]);
    assert_eq!(code, 0, "{ok}");
    assert!(
        ok.starts_with(&format!("trace of {} since ", id("ok"))),
        "{ok}"
    );
    one(
        &ok,
        "canonical",
        &["copy 1 of 2 at", &s.canonical, "keyed by the event_id"],
    );
    one(&ok, "canonical", &["copy 2 of 2 at"]);
    assert_eq!(
        find(&ok, "validate", &["valid purchase occurred at"]).len(),
        2,
        "each copy is validated:\n{ok}"
    );
    one(
        &ok,
        "dedup",
        &["first copy of the id on its partition: passed dedup, routed"],
    );
    one(&ok, "dedup", &["dropped as a duplicate of offset"]);
    one(&ok, "route", &["hook", "routed as purchase"]);
    one(&ok, "identity", &["hook", "added email_sha256 "]);
    one(
        &ok,
        "deliver",
        &[
            "hook",
            &format!("delivery record {}.deliver.hook/", s.prefix),
        ],
    );
    one(
        &ok,
        "outcome",
        &["hook", "delivered after 1 attempt(s), HTTP 200"],
    );
    assert!(
        !ok.to_lowercase().contains("ann.trace@example.com"),
        "a raw email in the trace:\n{ok}"
    );
    assert!(
        ok.contains(&format!("{}.outcomes partition(s)", s.prefix)) && ok.contains("cannot see:"),
        "{ok}"
    );

    // Rejected: the outcome and the dead letter with the vendor's reason.
    let (code, bad) = s.trace(&[&id("bad")]);
    assert_eq!(code, 0, "{bad}");
    one(
        &bad,
        "outcome",
        &[
            "hook",
            "rejected after 1 attempt(s), HTTP 400, webhook_refused",
        ],
    );
    one(
        &bad,
        "dead-letter",
        &[
            "hook",
            &format!("sink dead letter {}.dlq/", s.prefix),
            "webhook_refused, HTTP 400, after 1 attempt(s)",
            "amount must be positive",
        ],
    );

    // Redriven once the vendor takes it: the redrive's delivery record
    // names the dead letter, and the sink delivers it.
    fake.refuse(&[]);
    let redriven = common::run_ok(&["dlq", "redrive", "--destination", "hook"], &s.config);
    assert!(redriven.contains("1 dead letter(s) redriven"), "{redriven}");
    let t = Instant::now();
    while sent(&id("bad")) < 1 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the redriven event was not sent:\n{}",
            s.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let (code, bad) = s.trace(&[&id("bad")]);
    assert_eq!(code, 0, "{bad}");
    let deliveries = find(&bad, "deliver", &["hook"]);
    assert_eq!(deliveries.len(), 2, "{bad}");
    assert!(
        deliveries[1].contains(&format!("redriven from dead letter {}.dlq/", s.prefix)),
        "{bad}"
    );
    assert!(
        !find(&bad, "outcome", &["hook", "delivered after 1 attempt(s)"]).is_empty(),
        "{bad}"
    );

    // Retried: parked twice, delivered at the third attempt.
    let (code, retry) = s.trace(&[&id("retry")]);
    assert_eq!(code, 0, "{retry}");
    let parked = find(
        &retry,
        "retry",
        &["hook", &format!("parked on {}.retry.hook/", s.prefix)],
    );
    assert_eq!(parked.len(), 2, "{retry}");
    assert!(parked[0].contains("after 1 attempt(s)"), "{retry}");
    assert!(parked[1].contains("after 2 attempt(s)"), "{retry}");
    one(
        &retry,
        "outcome",
        &["hook", "delivered after 3 attempt(s), HTTP 200"],
    );

    // Skipped for consent: found on its partition, no delivery.
    let (code, skip) = s.trace(&[&id("skip")]);
    assert_eq!(code, 0, "{skip}");
    one(&skip, "canonical", &["copy 1 of 1 at"]);
    one(
        &skip,
        "route",
        &["hook", "skipped: consent analytics denied"],
    );
    assert!(find(&skip, "deliver", &[]).is_empty(), "{skip}");
    assert!(find(&skip, "outcome", &[]).is_empty(), "{skip}");

    // Replayed: the router's delivery and the replay's, both sent.
    let (code, replay) = s.trace(&[&id("replay")]);
    assert_eq!(code, 0, "{replay}");
    let deliveries = find(&replay, "deliver", &["hook"]);
    assert_eq!(deliveries.len(), 2, "{replay}");
    assert!(!deliveries[0].contains("replay"), "{replay}");
    assert!(
        deliveries[1].contains("written by the replay started")
            && deliveries[1].contains("with --force"),
        "{replay}"
    );
    assert!(
        !find(
            &replay,
            "outcome",
            &["hook", "delivered after 1 attempt(s)"]
        )
        .is_empty(),
        "{replay}"
    );

    // --json: one object with the same steps.
    let (code, json) = s.trace(&[&id("skip"), "--json"]);
    assert_eq!(code, 0, "{json}");
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("one JSON object");
    assert_eq!(v["found"], true);
    assert_eq!(v["event_id"], id("skip"));
    assert_eq!(v["copies"][0]["valid"], true);
    assert!(v["ledger"].as_array().unwrap().is_empty(), "{json}");
    assert!(
        v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["stage"] == "route"
                && s["destination"] == "hook"
                && s["what"] == "skipped: consent analytics denied"),
        "{json}"
    );

    let (_, json) = s.trace(&[&id("bad"), "--json"]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).expect("one JSON object");
    assert_eq!(
        v["dead_letters"][0]["headers"]["switchyard-error-class"], "webhook_refused",
        "{json}"
    );

    // Never published: nothing found, exit 3, and since when it looked.
    let (code, none) = s.trace(&[&id("never"), "--since", "1h ago"]);
    assert_eq!(code, 3, "{none}");
    assert!(
        none.starts_with(&format!("no record of {} since ", id("never"))),
        "{none}"
    );
    eprintln!(
        "traces took {:?}:\n{ok}\n{bad}\n{retry}\n{skip}\n{replay}\n{none}",
        started.elapsed()
    );

    sigterm(&mut router, Duration::from_secs(30));
    sigterm(&mut sink, Duration::from_secs(30));
}
