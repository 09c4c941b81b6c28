//! `switchyard tail` against tansu and a running sink: deliveries, a
//! rejection with the vendor's reason and a parked retry show up live, one
//! line each, and the filters keep only what was asked for.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fake_vendor::{FakeVendor, Reply};

const SECRET: &str = "0123456789abcdef";

/// A running `switchyard tail`, its stdout lines gathered as they come.
struct Tail {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Tail {
    fn start(args: &[&str], config: &Path) -> Tail {
        let mut child = common::switchyard()
            .arg("tail")
            .args(args)
            .arg("--config")
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = BufReader::new(child.stdout.take().unwrap());
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        // Positioned once it says so on stderr: nothing after is missed.
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        err.read_line(&mut first).unwrap();
        assert!(first.starts_with("following "), "{first}");
        std::thread::spawn(move || for _ in err.lines() {});
        Tail { child, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Ctrl-C; it must stop cleanly.
    fn stop(mut self) -> Vec<String> {
        let _ = std::process::Command::new("kill")
            .arg("-INT")
            .arg(self.child.id().to_string())
            .status();
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "tail exited with {status}");
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "tail did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        self.lines()
    }
}

fn delivery(id: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "v": 1, "destination": "hook", "name": "purchase",
        "event": {
            "event": "purchase", "event_id": id, "occurred_at": "2026-12-05T01:00:00Z",
            "user_id": format!("user-{id}"), "value": 5.0, "currency": "EUR"
        },
        "origin": {"topic": "canonical", "partition": 0, "offset": 0},
        "routed_at": "2026-12-05T01:00:01Z"
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_shows_deliveries_rejections_and_parked_retries_as_they_happen() {
    let _w = common::watchdog("tail", Duration::from_secs(300));
    let fake = FakeVendor::start(SECRET).await;
    let brokers = common::brokers();
    let prefix = common::unique("tail");
    let dir = tempfile::tempdir().unwrap();
    let text = common::pipeline_config(&prefix, 2)
        + &common::webhook(
            "hook",
            &fake.url(),
            SECRET,
            "[destinations.hook.delivery.retry]\npark_after = \"1s\"",
        )
        + &common::webhook("other", "http://127.0.0.1:9/other", SECRET, "");
    let config = common::write_config(dir.path(), &text);
    common::run_ok(&["topics", "create"], &config);
    let all = Tail::start(&["--json"], &config);
    let rejected = Tail::start(&["--destination", "hook", "--outcome", "rejected"], &config);
    let elsewhere = Tail::start(&["--destination", "other"], &config);

    // The first request waits longer than park_after: its events park.
    fake.script([Reply::TooMany { retry_after_s: 3 }]);
    fake.refuse_with(&["t-bad"], "email is not valid");
    let ids = ["t-0", "t-1", "t-2", "t-bad"];
    let records: Vec<(Option<String>, Vec<u8>)> = ids
        .iter()
        .map(|id| (Some(format!("user-{id}")), delivery(id)))
        .collect();
    common::kafka::produce(&brokers, &format!("{prefix}.deliver.hook"), &records).await;
    let log = dir.path().join("sink.log");
    let mut sink = common::kafka::spawn_switchyard(
        &[
            "--role",
            "sink",
            "--destination",
            "hook",
            "--instance-id",
            "tail-sink",
        ],
        &config,
        &log,
    );

    let parsed = |lines: &[String]| -> Vec<serde_json::Value> {
        lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    let has = |seen: &[serde_json::Value], outcome: &str, id: &str| {
        seen.iter()
            .any(|v| v["outcome"] == outcome && v["event_id"] == id)
    };
    let t = Instant::now();
    loop {
        let seen = parsed(&all.lines());
        let done = ["t-0", "t-1", "t-2"]
            .iter()
            .all(|id| has(&seen, "delivered", id))
            && has(&seen, "rejected", "t-bad")
            && seen.iter().any(|v| v["outcome"] == "retrying");
        if done {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "{seen:#?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A forced replay of the range: its deliveries are marked replayed.
    common::run_ok(
        &[
            "replay",
            "--from",
            "10m ago",
            "--source",
            "deliver",
            "--destination",
            "hook",
            "--force",
        ],
        &config,
    );
    let replayed = |seen: &[serde_json::Value], id: &str| {
        seen.iter()
            .any(|v| v["outcome"] == "delivered" && v["event_id"] == id && v["replay"].is_string())
    };
    let t = Instant::now();
    let bad_again = |seen: &[serde_json::Value]| {
        seen.iter().any(|v| {
            v["outcome"] == "rejected" && v["event_id"] == "t-bad" && v["replay"].is_string()
        })
    };
    while !["t-0", "t-1", "t-2"]
        .iter()
        .all(|id| replayed(&parsed(&all.lines()), id))
        || !bad_again(&parsed(&all.lines()))
        || rejected.lines().len() < 2
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{:#?}",
            parsed(&all.lines())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let seen = parsed(&all.stop());
    let bad = seen.iter().find(|v| v["outcome"] == "rejected").unwrap();
    assert_eq!(bad["destination"], "hook");
    assert!(
        bad["reason"]
            .as_str()
            .unwrap()
            .contains("email is not valid"),
        "{bad}"
    );
    let parked = seen.iter().find(|v| v["outcome"] == "retrying").unwrap();
    assert!(parked["due"].is_string(), "{parked}");
    let delivered = seen.iter().find(|v| v["outcome"] == "delivered").unwrap();
    assert_eq!(delivered["http_status"], 200, "{delivered}");

    // Filtered: only hook's rejections, as lines a person reads (the
    // second is the forced replay's).
    let lines = rejected.stop();
    assert_eq!(lines.len(), 2, "{lines:#?}");
    for l in &lines {
        assert!(
            l.contains("rejected") && l.contains("t-bad") && l.contains("email is not valid"),
            "{l}"
        );
    }
    assert!(lines[1].contains("replayed"), "{}", lines[1]);
    assert!(
        elsewhere.stop().is_empty(),
        "another destination's outcomes"
    );
    common::kafka::sigterm(&mut sink, Duration::from_secs(30));
}
