//! The Customer.io destination: through a real broker and the real sink to
//! its loopback fake (a shopper browses anonymously, signs in and buys;
//! one event is too large for the fake's op limit and must be dead-lettered
//! alone), and directly against the fake for resends, raw contact and auth.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::{Value, json};
use switchyard::config::Config;
use switchyard::delivery::Delivery;
use switchyard::sink::destination::Outcome;
use switchyard::sink::dlq;
use switchyard_fakes::Scripted;
use switchyard_fakes::customerio::Settings as Fake;

use common::sink::{start, wait_until};
use common::vendor::{deliver, routed};

const SITE: &str = "demo-site-id";
const KEY: &str = "demo-track-api-key";
const EMAIL: &str = "Jane.Doe@Example.com";

fn ago(minutes: i64) -> String {
    (Utc::now() - chrono::Duration::minutes(minutes)).to_rfc3339()
}

/// `tag` keeps event ids apart between tests and runs (the fake and the
/// broker outlive nothing, but the ledger of a reused name would).
fn journey(tag: &str) -> Vec<Value> {
    let c = json!({"marketing": "granted"});
    vec![
        json!({"event": "view_content", "event_id": format!("{tag}-1"), "occurred_at": ago(30),
               "anonymous_id": "anon-7", "consent": c,
               "items": [{"id": "sku-1", "name": "Shoe", "price": 60.0}]}),
        json!({"event": "identify", "event_id": format!("{tag}-2"), "occurred_at": ago(28),
               "anonymous_id": "anon-7", "user_id": "u-7", "email": EMAIL, "consent": c,
               "traits": {"plan": "pro", "email": EMAIL}}),
        json!({"event": "purchase", "event_id": format!("{tag}-3"), "occurred_at": ago(27),
               "anonymous_id": "anon-7", "user_id": "u-7", "email": EMAIL, "consent": c,
               "value": 60.0, "currency": "EUR", "order_id": "ord-7",
               "items": [{"id": "sku-1", "name": "Shoe", "price": 60.0, "quantity": 1}]}),
        // Over the fake's op limit (set low below): the 207 names it.
        json!({"event": "custom.note_added", "event_id": format!("{tag}-4"), "occurred_at": ago(26),
               "user_id": "u-7", "consent": c, "properties": {"note": "n".repeat(3000)}}),
        json!({"event": "custom.webinar_registered", "event_id": format!("{tag}-5"),
               "occurred_at": ago(25), "user_id": "u-7", "consent": c}),
    ]
}

fn config(base_url: &str, prefix: &str, name: &str, site: &str) -> Config {
    let text = format!(
        r#"
[kafka]
brokers = "{brokers}"
guarantee = "at_least_once"

[topics]
prefix = "{prefix}"
canonical = "{prefix}.canonical"
partitions = 2

[metrics]
listen = "127.0.0.1:0"

[destinations.{name}]
type = "customerio"
site_id = "{site}"
api_key = "{KEY}"
base_url = "{base_url}"

[destinations.{name}.delivery]
batch_max_events = 10
linger = "200ms"

[destinations.{name}.delivery.retry]
initial_backoff = "50ms"
max_backoff = "200ms"

[destinations.{name}_raw]
type = "customerio"
site_id = "{site}"
api_key = "{KEY}"
base_url = "{base_url}"
raw_contact = true
identify_by = ["id", "email"]
"#,
        brokers = common::brokers(),
    );
    Config::parse(&text, Path::new("customerio.toml"), &|_| None).expect("config parses")
}

async fn produce(config: &Config, dest: &str, batch: &[Delivery]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let topic = config.topics.deliver(dest);
    for d in batch {
        let payload = serde_json::to_vec(d).unwrap();
        producer
            .send(
                FutureRecord::to(&topic).key(d.key()).payload(&payload),
                Timeout::After(Duration::from_secs(10)),
            )
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_sink_each_event_arrives_once_and_the_207_dead_letters_exactly_its_op() {
    let _dog = common::watchdog("customerio sink", Duration::from_secs(180));
    let fake_settings = Fake {
        max_op_bytes: 2000,
        ..Fake::default()
    };
    let people = fake_settings.people.clone();
    let fake = switchyard_fakes::serve(fake_settings).await.unwrap();
    // The first request fails as a 503 would: the sink retries it, and the
    // events' ULIDs keep what was accepted exact.
    fake.script([Scripted {
        status: 503,
        headers: vec![],
        body: String::new(),
    }]);
    let prefix = common::unique("cio");
    let name = common::unique("cio").replace('-', "_");
    let config = Arc::new(config(&fake.base_url(), &prefix, &name, SITE));
    let tag = common::unique("j");
    let batch: Vec<Delivery> = journey(&tag)
        .iter()
        .map(|r| routed(&config, &name, r))
        .collect();
    let sink = start(&config).await;
    produce(&config, &name, &batch).await;

    let expected_events: BTreeSet<String> =
        ["Product Viewed", "Order Completed", "webinar_registered"]
            .map(String::from)
            .into();
    wait_until("the journey delivered", Duration::from_secs(90), || {
        fake.accepted().len() >= 4
    })
    .await;
    let bootstrap = common::brokers();
    let mut letters = Vec::new();
    for _ in 0..200 {
        letters = dlq::read_all(&config, &bootstrap).await.unwrap();
        if !letters.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give a stray duplicate time to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sink.stop().await;

    let accepted = fake.accepted();
    let events: Vec<&str> = accepted
        .iter()
        .filter(|a| a.name != "identify")
        .map(|a| a.name.as_str())
        .collect();
    assert_eq!(
        events
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>(),
        expected_events
    );
    assert_eq!(events.len(), 3, "each event once: {events:?}");
    assert_eq!(accepted.iter().filter(|a| a.name == "identify").count(), 1);
    // The anonymous browsing went to /api/v1/events and the identify
    // carried the anonymous id that merges it.
    let viewed = accepted
        .iter()
        .find(|a| a.name == "Product Viewed")
        .unwrap();
    assert_eq!(viewed.payload["anonymous_id"], "anon-7");
    let person = people.get("id:u-7").expect("u-7 identified");
    assert_eq!(person["anonymous_id"], "anon-7");
    assert_eq!(person["plan"], "pro");
    let purchase = accepted
        .iter()
        .find(|a| a.name == "Order Completed")
        .unwrap();
    assert_eq!(
        (purchase.value, purchase.currency.as_deref()),
        (Some(60.0), Some("EUR"))
    );

    // Exactly the op the 207 named is dead-lettered.
    assert_eq!(letters.len(), 1, "one dead letter");
    let dead: Delivery = serde_json::from_slice(&letters[0].payload).unwrap();
    assert_eq!(dead.event.event_id, format!("{tag}-4"));
    assert_eq!(letters[0].error_class, "customerio_invalid");

    // Raw email never reached the fake for this destination.
    assert!(fake.exchanges().iter().any(|e| e.status == 503));
    assert!(fake.exchanges().iter().any(|e| e.status == 207));
    for e in fake.exchanges() {
        let text = String::from_utf8_lossy(&e.request.body).to_lowercase();
        assert!(!text.contains("jane.doe"), "raw email sent: {text}");
    }

    // A resend of the whole journey (a lost answer) adds nothing: the
    // events carry the same ULIDs.
    let again = deliver(
        config.destinations[&name].vendor.build().as_ref(),
        &reqwest::Client::new(),
        &[batch[0].clone(), batch[2].clone(), batch[4].clone()],
    )
    .await;
    assert_eq!(again, vec![Outcome::Delivered; 3]);
    assert_eq!(
        fake.accepted()
            .iter()
            .filter(|a| a.name != "identify")
            .count(),
        3
    );
}

#[tokio::test]
async fn raw_email_reaches_customerio_only_with_raw_contact() {
    let fake = switchyard_fakes::serve(Fake::default()).await.unwrap();
    let config = config(&fake.base_url(), "cio-raw", "cio", SITE);
    let http = reqwest::Client::new();
    let identify = journey("raw")[1].clone();
    for (dest, raw_allowed) in [("cio", false), ("cio_raw", true)] {
        let d = routed(&config, dest, &identify);
        let vendor = config.destinations[dest].vendor.build();
        assert_eq!(
            deliver(vendor.as_ref(), &http, std::slice::from_ref(&d)).await,
            vec![Outcome::Delivered]
        );
        let last = fake.exchanges().pop().unwrap();
        let text = String::from_utf8_lossy(&last.request.body).to_lowercase();
        assert_eq!(
            text.contains("jane.doe@example.com"),
            raw_allowed,
            "{dest}: {text}"
        );
    }
    // An anonymous identify with only an email: by email for the raw one.
    let d = routed(
        &config,
        "cio_raw",
        &json!({"event": "identify", "event_id": "raw-9", "occurred_at": ago(5), "anonymous_id": "anon-9",
                "email": EMAIL, "consent": {"marketing": "granted"}}),
    );
    let vendor = config.destinations["cio_raw"].vendor.build();
    assert_eq!(vendor.refuse(&d), None);
    assert_eq!(
        deliver(vendor.as_ref(), &http, std::slice::from_ref(&d)).await,
        vec![Outcome::Delivered]
    );
    assert!(fake.accepted().last().unwrap().payload["identifiers"]["email"].is_string());
}

#[tokio::test]
async fn wrong_credentials_are_rejected_as_auth() {
    let fake = switchyard_fakes::serve(Fake::default()).await.unwrap();
    let config = config(&fake.base_url(), "cio-auth", "cio", "someone-elses-site");
    let vendor = config.destinations["cio"].vendor.build();
    let batch: Vec<Delivery> = journey("auth")
        .iter()
        .map(|r| routed(&config, "cio", r))
        .collect();
    for o in deliver(vendor.as_ref(), &reqwest::Client::new(), &batch).await {
        assert!(
            matches!(&o, Outcome::Rejected { class, .. } if class == "customerio_auth"),
            "{o:?}"
        );
    }
    assert!(fake.accepted().is_empty());
}

#[test]
fn identify_by_email_without_raw_contact_is_a_config_error() {
    let text = r#"
[destinations.cio]
type = "customerio"
site_id = "s"
api_key = "k"
region = "eu"
identify_by = ["email"]
"#;
    let err = Config::parse(text, Path::new("customerio.toml"), &|_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("destinations.cio.identify_by"), "{err}");
}
