//! Secrets and raw contact data stay where they belong. The whole pipeline
//! (router and sinks, debug logs) runs with known secrets and known raw
//! emails and phones; a vendor quotes both back in its error, GA4 sends to
//! a closed port (its URL carries its API secret) until it gives up, a
//! publisher puts a phone where a string goes. Then every log line, every metric, every
//! dead-letter header, ledger record and retry header is searched: none may
//! hold a secret or a raw contact value. (Dead-letter payloads keep the
//! event as published, by design; see docs/operations.md.)

mod common;

use std::fmt::Write as _;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::fake_vendor::FakeVendor;
use common::kafka::read_all;

const HOOK_SECRET: &str = "whsec-hygiene-7f3a9c2e51";
const GA4_SECRET: &str = "ga4-secret-hygiene-4411";
const EMAIL: &str = "Hygiene.Person@example.com";
const PHONE: &str = "+14155550123";
const PHONE_DIGITS: &str = "4155550123";

/// Each needle found in `haystack`, with the line it is on.
fn leaks(haystack: &[(String, String)], needles: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for (place, text) in haystack {
        let lower = text.to_lowercase();
        for n in needles {
            if let Some(at) = lower.find(&n.to_lowercase()) {
                let start = lower[..at].rfind('\n').map_or(0, |i| i + 1);
                let end = lower[at..].find('\n').map_or(text.len(), |i| at + i);
                found.push(format!("{n} in {place}: {}", &text[start..end]));
            }
        }
    }
    found
}

#[test]
fn the_search_finds_a_planted_value() {
    let planted = vec![
        (
            "log".to_string(),
            "a\nreason: bad key whsec-hygiene-7f3a9c2e51 here\nb".to_string(),
        ),
        (
            "header".to_string(),
            format!("x-reason={}", EMAIL.to_uppercase()),
        ),
    ];
    let found = leaks(&planted, &[HOOK_SECRET, EMAIL]);
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(
        found[0].ends_with("reason: bad key whsec-hygiene-7f3a9c2e51 here"),
        "{}",
        found[0]
    );
}

fn purchase(id: &str, extra: serde_json::Value) -> (Option<String>, Vec<u8>) {
    let mut ev = serde_json::json!({
        "event": "purchase", "event_id": id, "occurred_at": chrono::Utc::now(),
        "user_id": format!("user-{id}"), "anonymous_id": format!("anon-{id}"),
        "email": EMAIL, "phone": PHONE,
        "value": 12.0, "currency": "EUR",
        "consent": {"analytics": "granted", "ads": "granted"}
    });
    for (k, v) in extra.as_object().unwrap() {
        ev[k] = v.clone();
    }
    (Some(id.to_string()), ev.to_string().into_bytes())
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_or_raw_contact_value_reaches_logs_metrics_or_dead_letter_headers() {
    let _w = common::watchdog("hygiene", Duration::from_secs(300));
    let hook = FakeVendor::start(HOOK_SECRET).await;
    // The vendor quotes what it refuses, and the key it was sent.
    hook.refuse_with(
        &["h-bad"],
        &format!("email {EMAIL} / phone {PHONE} refused for key {HOOK_SECRET}"),
    );
    let ga4 = switchyard_fakes::serve(switchyard_fakes::ga4::Settings {
        api_secret: GA4_SECRET.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let measurement = switchyard_fakes::ga4::Settings::default().measurement_id;
    let brokers = common::brokers();
    let prefix = common::unique("hygiene");
    let dir = tempfile::tempdir().unwrap();
    let text = common::pipeline_config(&prefix, 2)
        + &format!(
            r#"
[destinations.hook]
type = "webhook"
url = "{hook_url}"
secret = "${{HYGIENE_HOOK_SECRET}}"
consent = "analytics"
raw_contact = true

[destinations.hook.delivery]
linger = "10ms"

[destinations.ga4]
type = "ga4"
measurement_id = "{measurement}"
api_secret = "${{HYGIENE_GA4_SECRET}}"
base_url = "{ga4_url}"

# Nothing listens here: every send fails with a client error (whose text
# may quote the URL, api_secret included) until the event is given up.
[destinations.ga4_down]
type = "ga4"
measurement_id = "{measurement}"
api_secret = "${{HYGIENE_GA4_SECRET}}"
base_url = "http://127.0.0.1:9"

[destinations.ga4_down.delivery.retry]
max_attempts = 2
initial_backoff = "50ms"
"#,
            hook_url = hook.url(),
            ga4_url = ga4.base_url(),
        );
    let config = common::write_config(dir.path(), &text);
    let mut create = common::switchyard();
    create
        .args(["topics", "create", "--config"])
        .arg(&config)
        .env("HYGIENE_HOOK_SECRET", HOOK_SECRET)
        .env("HYGIENE_GA4_SECRET", GA4_SECRET);
    assert!(create.status().unwrap().success());

    // The config's Debug output never shows a secret.
    let parsed = switchyard::config::Config::parse(&text, &config, &|k| match k {
        "HYGIENE_HOOK_SECRET" => Some(HOOK_SECRET.into()),
        "HYGIENE_GA4_SECRET" => Some(GA4_SECRET.into()),
        _ => None,
    })
    .unwrap();
    let debug = format!("{parsed:?}");
    assert!(
        !debug.contains(HOOK_SECRET) && !debug.contains(GA4_SECRET),
        "{debug}"
    );

    let log_path = dir.path().join("all.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut run = common::switchyard()
        .args([
            "run",
            "--role",
            "all",
            "--instance-id",
            "hygiene",
            "--config",
        ])
        .arg(&config)
        .env("RUST_LOG", "switchyard=debug,info")
        .env("HYGIENE_HOOK_SECRET", HOOK_SECRET)
        .env("HYGIENE_GA4_SECRET", GA4_SECRET)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();

    common::kafka::produce(
        &brokers,
        &format!("{prefix}.canonical"),
        &[
            purchase("h-ok", serde_json::json!({})),
            purchase("h-bad", serde_json::json!({})),
            // A phone where a string goes: the router dead-letters the event
            // and says why without quoting it.
            purchase("h-invalid", serde_json::json!({"phone": 4155550123_u64})),
        ],
    )
    .await;

    // Until every path has run: delivered, refused, given up, invalid.
    let dlq = format!("{prefix}.dlq");
    let t = Instant::now();
    loop {
        let letters = read_all(&brokers, &dlq);
        let from = |d: &str| {
            letters
                .iter()
                .any(|r| r.headers.get("switchyard-destination").map(String::as_str) == Some(d))
        };
        let router = letters
            .iter()
            .any(|r| r.headers.get("switchyard-stage").map(String::as_str) == Some("router"));
        if hook.delivered().contains("h-ok")
            && from("hook")
            && from("ga4_down")
            && router
            && !ga4.accepted().is_empty()
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "not every path ran: {} dead letters\n{}",
            letters.len(),
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    let logs = std::fs::read_to_string(&log_path).unwrap();
    let addr = logs
        .lines()
        .rev()
        .find(|l| l.contains("metrics endpoint listening"))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("bound=")))
        .unwrap_or_else(|| panic!("no metrics address:\n{logs}"))
        .to_string();
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    common::kafka::sigterm(&mut run, Duration::from_secs(30));
    let logs = std::fs::read_to_string(&log_path).unwrap();

    let headers = |topic: &str| -> String {
        let mut out = String::new();
        for r in read_all(&brokers, topic) {
            for (k, v) in &r.headers {
                let _ = writeln!(out, "{topic}/{}/{} {k}={v}", r.partition, r.offset);
            }
        }
        out
    };
    let ledger: String = read_all(&brokers, &format!("{prefix}.outcomes"))
        .iter()
        .map(|r| {
            String::from_utf8_lossy(r.payload.as_deref().unwrap_or_default()).into_owned() + "\n"
        })
        .collect();
    let mut haystack = vec![
        ("the log".to_string(), logs.clone()),
        ("/metrics".to_string(), metrics),
        ("dead-letter headers".to_string(), headers(&dlq)),
        ("the ledger".to_string(), ledger),
    ];
    for d in ["hook", "ga4", "ga4_down"] {
        let topic = format!("{prefix}.retry.{d}");
        haystack.push((format!("{topic} headers"), headers(&topic)));
    }
    let found = leaks(
        &haystack,
        &[HOOK_SECRET, GA4_SECRET, EMAIL, PHONE, PHONE_DIGITS],
    );
    assert!(found.is_empty(), "leaked:\n{}", found.join("\n"));

    // The paths above did say why, only without the values.
    let letters = headers(&dlq);
    assert!(letters.contains("refused for key [secret]"), "{letters}");
    assert!(
        letters.contains("email [email] / phone [phone]"),
        "{letters}"
    );
    // The vendor was sent the raw email (raw_contact = true): the search
    // above is about everything else.
    assert!(
        hook.received()
            .iter()
            .any(|r| r.events.iter().any(|(id, _)| id == "h-ok")),
    );
}
