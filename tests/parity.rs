//! `switchyard parity` over a real pipeline (tansu, the router, a webhook
//! sink and its stand-in): revenue per destination and currency matches
//! once delivered, each difference is explained (consent, not routed,
//! rejected), and an event the router never routed is unexplained (exit 1)
//! until it is.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::fake_vendor::FakeVendor;

const SECRET: &str = "0123456789abcdef";

fn purchase(id: &str, value: f64, currency: &str, analytics: &str) -> (Option<String>, Vec<u8>) {
    let ev = serde_json::json!({
        "event": "purchase", "event_id": id, "occurred_at": chrono::Utc::now(),
        "user_id": format!("user-{id}"), "value": value, "currency": currency,
        "consent": {"analytics": analytics}
    });
    (Some(id.to_string()), ev.to_string().into_bytes())
}

fn parity(config: &std::path::Path, json: bool) -> Output {
    let mut c = common::switchyard();
    c.args(["parity", "--from", "15m ago", "--config"])
        .arg(config);
    if json {
        c.arg("--json");
    }
    c.output().unwrap()
}

fn row<'a>(report: &'a serde_json::Value, dest: &str, currency: &str) -> &'a serde_json::Value {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["destination"] == dest && r["currency"] == currency)
        .map(|r| &r["row"])
        .unwrap_or_else(|| panic!("no {dest} {currency} row in {report}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn parity_explains_every_difference_and_fails_on_an_event_never_routed() {
    let _w = common::watchdog("parity", Duration::from_secs(300));
    let fake = FakeVendor::start(SECRET).await;
    fake.refuse_with(&["p-bad"], "currency not supported");
    // Retried (5xx) for longer than the test: pending.
    fake.fail_times("p-slow", 1000);
    let brokers = common::brokers();
    let prefix = common::unique("parity");
    let dir = tempfile::tempdir().unwrap();
    let text = common::pipeline_config(&prefix, 2)
        // p-slow parks at once instead of holding the sink in its backoff.
        + &common::webhook(
            "hook",
            &fake.url(),
            SECRET,
            "[destinations.hook.delivery.retry]\npark_after = \"1s\"",
        )
        + &format!(
            "[destinations.signups]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/signups\"\n\
             secret = \"{SECRET}\"\nconsent = \"analytics\"\nevents = [\"sign_up\"]\n"
        );
    let config = common::write_config(dir.path(), &text);
    common::run_ok(&["topics", "create"], &config);
    let canonical = format!("{prefix}.canonical");
    common::kafka::produce(
        &brokers,
        &canonical,
        &[
            purchase("p-1", 10.0, "EUR", "granted"),
            purchase("p-2", 20.5, "EUR", "granted"),
            purchase("p-3", 7.25, "USD", "granted"),
            purchase("p-denied", 99.0, "EUR", "denied"),
            purchase("p-bad", 5.0, "USD", "granted"),
            purchase("p-slow", 4.0, "USD", "granted"),
        ],
    )
    .await;
    let log = |n: &str| dir.path().join(format!("{n}.log"));
    let mut router = common::kafka::spawn_switchyard(
        &["--role", "router", "--instance-id", "parity-router"],
        &config,
        &log("router"),
    );
    let mut sink = common::kafka::spawn_switchyard(
        &[
            "--role",
            "sink",
            "--destination",
            "hook",
            "--instance-id",
            "parity-sink",
        ],
        &config,
        &log("sink"),
    );
    let outcomes = format!("{prefix}.outcomes");
    let t = Instant::now();
    while common::kafka::read_all(&brokers, &outcomes).len() < 4 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no outcomes:\n{}\n{}",
            std::fs::read_to_string(log("router")).unwrap_or_default(),
            std::fs::read_to_string(log("sink")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    let out = parity(&config, true);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["events"], 6);
    assert_eq!(report["unexplained"], 0);
    let eur = row(&report, "hook", "EUR");
    assert_eq!(eur["canonical"]["value"], 129.5);
    assert_eq!(eur["delivered"]["value"], 30.5);
    assert_eq!(eur["why"]["consent"]["value"], 99.0);
    assert_eq!(eur["examples"]["consent"][0], "p-denied");
    let usd = row(&report, "hook", "USD");
    assert_eq!(usd["delivered"]["value"], 7.25);
    assert_eq!(usd["why"]["rejected"]["events"], 1);
    assert_eq!(usd["examples"]["rejected"][0], "p-bad");
    assert_eq!(usd["why"]["pending"]["value"], 4.0);
    assert_eq!(usd["examples"]["pending"][0], "p-slow");
    // A destination that takes sign-ups only: nothing routed, all explained.
    let signups = row(&report, "signups", "USD");
    assert_eq!(signups["delivered"]["events"], 0);
    assert_eq!(signups["why"]["not_routed"]["events"], 3);

    // An event published while no router runs has no delivery record.
    common::kafka::sigterm(&mut router, Duration::from_secs(30));
    common::kafka::produce(
        &brokers,
        &canonical,
        &[purchase("p-late", 3.0, "EUR", "granted")],
    )
    .await;
    let out = parity(&config, false);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("hook EUR unexplained: p-late"), "{text}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 event(s) routed by the rules"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Once routed (and delivered), it is accounted for again.
    let mut router = common::kafka::spawn_switchyard(
        &["--role", "router", "--instance-id", "parity-router"],
        &config,
        &log("router"),
    );
    let t = Instant::now();
    loop {
        let out = parity(&config, true);
        if out.status.success() {
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(report["events"], 7);
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(90), "p-late never routed");
        std::thread::sleep(Duration::from_millis(500));
    }

    // The vendor takes p-bad now: a replay of the range sends it again (the
    // ledger says rejected), and parity counts it delivered.
    fake.refuse(&[]);
    common::run_ok(
        &["replay", "--from", "15m ago", "--destination", "hook"],
        &config,
    );
    let t = Instant::now();
    loop {
        let out = parity(&config, true);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if row(&report, "hook", "USD")["delivered"]["value"] == 12.25 {
            assert!(row(&report, "hook", "USD")["why"]["rejected"].is_null());
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(90), "{report}");
        std::thread::sleep(Duration::from_millis(500));
    }
    common::kafka::sigterm(&mut router, Duration::from_secs(30));
    common::kafka::sigterm(&mut sink, Duration::from_secs(30));
}
