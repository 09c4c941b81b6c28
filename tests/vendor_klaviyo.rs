//! The Klaviyo destination against its loopback fake: first without Kafka
//! (routed by the router's own code, mapped, sent over HTTP, classified),
//! then through a real broker and the real sink, with a throttled answer,
//! an event too large for Klaviyo and a person nobody can find.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{Duration, Utc};
use serde_json::{Value, json};
use switchyard::config::Config;
use switchyard::delivery::Delivery;
use switchyard::sink::destination::Outcome;
use switchyard::sink::dlq;
use switchyard_fakes::Scripted;
use switchyard_fakes::klaviyo::Settings as Fake;

use common::vendor::{deliver, deliver_tampered, routed};

const KEY: &str = "pk_demo_private_key";
const EMAIL: &str = "Jane.Doe@Example.com";
const PHONE: &str = "+1 650 253 0000";

/// Two Klaviyo destinations on the same fake: one as shipped, one allowed
/// raw contact data.
fn config(base_url: &str, key: &str) -> Config {
    let text = format!(
        r#"
[destinations.klaviyo]
type = "klaviyo"
api_key = "{key}"
base_url = "{base_url}"

[destinations.klaviyo_raw]
type = "klaviyo"
api_key = "{key}"
base_url = "{base_url}"
raw_contact = true
"#
    );
    Config::parse(&text, Path::new("klaviyo.toml"), &|_| None).expect("config parses")
}

fn ago(minutes: i64) -> String {
    (Utc::now() - Duration::minutes(minutes)).to_rfc3339()
}

/// A signed-in shopper: view, cart, identify, purchase, a custom event.
fn journey(tag: &str) -> Vec<Value> {
    let c = json!({"marketing": "granted"});
    vec![
        json!({"event": "view_content", "event_id": format!("{tag}-1"), "occurred_at": ago(30),
               "user_id": "u-7", "consent": c, "items": [{"id": "sku-1", "name": "Shoe", "price": 60.0}]}),
        json!({"event": "add_to_cart", "event_id": format!("{tag}-2"), "occurred_at": ago(29),
               "user_id": "u-7", "consent": c, "value": 60.0, "currency": "EUR",
               "items": [{"id": "sku-1", "name": "Shoe", "price": 60.0, "quantity": 1}]}),
        json!({"event": "identify", "event_id": format!("{tag}-3"), "occurred_at": ago(28),
               "user_id": "u-7", "email": EMAIL, "phone": PHONE, "consent": c,
               "traits": {"first_name": "Jane", "plan": "pro", "email": EMAIL}}),
        json!({"event": "purchase", "event_id": format!("{tag}-4"), "occurred_at": ago(27),
               "user_id": "u-7", "email": EMAIL, "phone": PHONE, "consent": c, "value": 60.0,
               "currency": "EUR", "order_id": "ord-7",
               "items": [{"id": "sku-1", "name": "Shoe", "price": 60.0, "quantity": 1}]}),
        json!({"event": "custom.webinar_registered", "event_id": format!("{tag}-5"),
               "occurred_at": ago(26), "user_id": "u-7", "consent": c}),
    ]
}

fn batch(config: &Config, dest: &str, tag: &str) -> Vec<Delivery> {
    journey(tag)
        .iter()
        .map(|r| routed(config, dest, r))
        .collect()
}

fn no_raw_contact(fake: &switchyard_fakes::Fake) {
    for e in fake.exchanges() {
        let text = String::from_utf8_lossy(&e.request.body).to_lowercase();
        assert!(!text.contains("jane.doe"), "raw email sent: {text}");
        assert!(!text.contains("6502530000") && !text.contains("253 0000"));
    }
}

#[tokio::test]
async fn journey_is_delivered_once_and_resends_are_dropped() {
    let fake_settings = Fake::default();
    let profiles = fake_settings.profiles.clone();
    let fake = switchyard_fakes::serve(fake_settings).await.unwrap();
    let config = config(&fake.base_url(), KEY);
    let dest = config.destinations["klaviyo"].vendor.build();
    assert!(dest.vendor_dedup(), "Klaviyo drops a repeated unique_id");
    let batch = batch(&config, "klaviyo", "k");
    for d in &batch {
        assert_eq!(dest.refuse(d), None, "{}", d.name);
    }
    let http = reqwest::Client::new();
    let outcomes = deliver(dest.as_ref(), &http, &batch).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; batch.len()]);

    // The identify is a profile import, not an event.
    let accepted = fake.accepted();
    assert_eq!(
        accepted.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        [
            "Viewed Product",
            "Added to Cart",
            "profile-import",
            "Placed Order",
            "webinar_registered"
        ]
    );
    let keys: Vec<&str> = accepted.iter().filter_map(|a| a.key.as_deref()).collect();
    assert_eq!(keys, ["k-1", "k-2", "external_id:u-7", "k-4", "k-5"]);
    let purchase = &accepted[3];
    assert_eq!(
        (purchase.value, purchase.currency.as_deref()),
        (Some(60.0), Some("EUR"))
    );
    assert_eq!(purchase.payload["properties"]["order_id"], "ord-7");
    assert_eq!(
        purchase.payload["profile"]["data"]["attributes"],
        json!({"external_id": "u-7"})
    );
    let profile = &profiles.all()["external_id:u-7"];
    assert_eq!(profile["first_name"], "Jane");
    assert_eq!(profile["properties"], json!({"plan": "pro"}));
    assert!(profile.get("email").is_none());
    no_raw_contact(&fake);

    // A resend (an answer lost on the way back) is recorded once.
    let again = deliver(dest.as_ref(), &http, &batch).await;
    assert_eq!(again, vec![Outcome::Delivered; batch.len()]);
    assert_eq!(fake.accepted().len(), accepted.len());
}

#[tokio::test]
async fn raw_contact_reaches_klaviyo_only_when_configured() {
    let fake_settings = Fake::default();
    let profiles = fake_settings.profiles.clone();
    let fake = switchyard_fakes::serve(fake_settings).await.unwrap();
    let config = config(&fake.base_url(), KEY);
    let http = reqwest::Client::new();
    let shipped = config.destinations["klaviyo"].vendor.build();
    let purchase = routed(&config, "klaviyo", &journey("s")[3]);
    assert_eq!(
        deliver(shipped.as_ref(), &http, &[purchase]).await,
        vec![Outcome::Delivered]
    );
    no_raw_contact(&fake);

    let raw = config.destinations["klaviyo_raw"].vendor.build();
    let j = journey("r");
    let batch = [
        routed(&config, "klaviyo_raw", &j[2]),
        routed(&config, "klaviyo_raw", &j[3]),
    ];
    assert_eq!(
        deliver(raw.as_ref(), &http, &batch).await,
        vec![Outcome::Delivered; 2]
    );
    let got = fake.accepted().last().cloned().unwrap();
    let who = &got.payload["profile"]["data"]["attributes"];
    assert_eq!(who["external_id"], "u-7");
    assert_eq!(who["email"], "jane.doe@example.com");
    assert_eq!(who["phone_number"], "+16502530000");
    assert_eq!(
        profiles.all()["external_id:u-7"]["email"],
        "jane.doe@example.com"
    );
}

#[tokio::test]
async fn klaviyos_refusals_are_rejected_without_repeating_contact_data() {
    let fake = switchyard_fakes::serve(Fake::default()).await.unwrap();
    let cfg = config(&fake.base_url(), KEY);
    let raw = cfg.destinations["klaviyo_raw"].vendor.build();
    let purchase = routed(&cfg, "klaviyo_raw", &journey("t")[3]);
    // An email Klaviyo refuses; its detail quotes it back.
    let out = deliver_tampered(raw.as_ref(), &reqwest::Client::new(), &[purchase], &|r| {
        let text =
            String::from_utf8_lossy(&r.body).replace("jane.doe@example.com", "jane.doe@example");
        r.body = text.into_bytes();
    })
    .await;
    match &out[0] {
        Outcome::Rejected { class, reason } => {
            assert_eq!(class, "klaviyo_invalid");
            assert!(reason.contains("is not a valid email address"), "{reason}");
            assert!(!reason.contains("jane.doe"), "{reason}");
        }
        o => panic!("{o:?}"),
    }
    assert!(fake.accepted().is_empty());

    let wrong = config(&fake.base_url(), "pk_someone_else");
    let dest = wrong.destinations["klaviyo"].vendor.build();
    let b = batch(&wrong, "klaviyo", "w");
    for o in deliver(dest.as_ref(), &reqwest::Client::new(), &b).await {
        assert!(
            matches!(&o, Outcome::Rejected { class, .. } if class == "klaviyo_auth"),
            "{o:?}"
        );
    }
    assert!(fake.accepted().is_empty());
}

#[test]
fn a_bad_revision_is_a_config_error_that_never_repeats_the_key() {
    let text = r#"
[destinations.klaviyo]
type = "klaviyo"
api_key = "pk secret with spaces"
revision = "latest"
"#;
    let err = Config::parse(text, Path::new("klaviyo.toml"), &|_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("destinations.klaviyo.api_key"), "{err}");
    assert!(err.contains("destinations.klaviyo.revision"), "{err}");
    assert!(!err.contains("secret with spaces"), "{err}");
}

/// Through the broker and the sink: the first answer is a 429, one event
/// is too large for Klaviyo and one names nobody. The rest arrive once;
/// exactly those two are dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_sink_each_event_once_and_exactly_the_refused_are_dead_lettered() {
    let _dog = common::watchdog("klaviyo sink", StdDuration::from_secs(240));
    let fake = switchyard_fakes::serve(Fake {
        max_event_bytes: 4096,
        ..Fake::default()
    })
    .await
    .unwrap();
    fake.script([Scripted {
        status: 429,
        headers: vec![("Retry-After".into(), "1".into())],
        body: r#"{"errors":[{"id":"t","status":429,"code":"throttled","title":"Request was throttled.","detail":"Request was throttled. Expected available in 1 second.","source":{"pointer":"/data/"}}]}"#.into(),
    }]);
    let prefix = common::unique("klaviyo");
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

[destinations.klaviyo]
type = "klaviyo"
api_key = "{KEY}"
base_url = "{url}"

[destinations.klaviyo.delivery]
batch_max_events = 4
linger = "20ms"
"#,
        brokers = common::brokers(),
        url = fake.base_url(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_config(dir.path(), &text);
    let config = Arc::new(Config::load(&path).unwrap());

    let c = json!({"marketing": "granted"});
    let mut raws = journey("b");
    raws.push(
        json!({"event": "purchase", "event_id": "b-big", "occurred_at": ago(20),
                     "user_id": "u-8", "consent": c, "value": 1.0, "currency": "EUR",
                     "properties": {"note": "x".repeat(5000)}}),
    );
    raws.push(
        json!({"event": "purchase", "event_id": "b-nobody", "occurred_at": ago(19),
                     "anonymous_id": "anon-9", "consent": c, "value": 1.0, "currency": "EUR"}),
    );
    let deliveries: Vec<Delivery> = raws.iter().map(|r| routed(&config, "klaviyo", r)).collect();
    let records: Vec<(Option<String>, Vec<u8>)> = deliveries
        .iter()
        .map(|d| {
            (
                Some(d.event.anchor().to_string()),
                serde_json::to_vec(d).unwrap(),
            )
        })
        .collect();
    let sink = common::sink::start(&config).await;
    common::kafka::produce(
        &common::brokers(),
        &config.topics.deliver("klaviyo"),
        &records,
    )
    .await;

    common::sink::wait_until("the journey delivered", StdDuration::from_secs(90), || {
        fake.accepted().len() >= 5
    })
    .await;
    let bootstrap = common::brokers();
    let mut letters = Vec::new();
    for _ in 0..300 {
        letters = dlq::read_all(&config, &bootstrap).await.unwrap();
        if letters.len() >= 2 {
            break;
        }
        tokio::time::sleep(StdDuration::from_millis(100)).await;
    }
    sink.stop().await;

    let mut dead: Vec<(String, String)> = letters
        .iter()
        .map(|l| {
            let d: Delivery = serde_json::from_slice(&l.payload).expect("whole payload kept");
            (d.event.event_id, l.error_class.clone())
        })
        .collect();
    dead.sort();
    assert_eq!(
        dead,
        [
            ("b-big".to_string(), "klaviyo_too_large".to_string()),
            ("b-nobody".to_string(), "klaviyo_no_identifier".to_string())
        ]
    );
    assert!(
        fake.exchanges().iter().any(|e| e.status == 429),
        "the throttled answer was seen"
    );
    let mut keys: Vec<String> = fake.accepted().into_iter().filter_map(|a| a.key).collect();
    keys.sort();
    assert_eq!(
        keys,
        ["b-1", "b-2", "b-4", "b-5", "external_id:u-7"],
        "each event once"
    );
    assert!(
        fake.exchanges()
            .iter()
            .all(|e| !String::from_utf8_lossy(&e.request.body).contains("b-nobody")),
        "a refused event is never sent"
    );
}
