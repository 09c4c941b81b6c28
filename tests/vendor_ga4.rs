//! The GA4 destination against its loopback fake (no Kafka): events routed
//! and PII-shaped by the router's own code, mapped, sent over HTTP, and the
//! fake's validation messages classified per event.

mod common;

use std::path::Path;

use chrono::{Duration, Utc};
use serde_json::{Value, json};
use switchyard::config::Config;
use switchyard::delivery::Delivery;
use switchyard::sink::destination::{Outcome, Request};
use switchyard_fakes::ga4::Settings as Fake;

use common::vendor::{deliver, deliver_tampered, routed};

const EMAILS: &[&str] = &["Jane.Doe@Gmail.com", "buyer@example.com"];
const PHONES: &[&str] = &["+1 650 253 0000"];

fn config(base_url: &str, extra: &str) -> Config {
    let text = format!(
        r#"
[destinations.ga4]
type = "ga4"
measurement_id = "G-DEMO000001"
api_secret = "demo-secret"
base_url = "{base_url}"
{extra}
"#
    );
    Config::parse(&text, Path::new("ga4.toml"), &|_| None).expect("config parses")
}

fn ago(minutes: i64) -> String {
    (Utc::now() - Duration::minutes(minutes)).to_rfc3339()
}

/// Two shoppers' journeys, interleaved the way a partition delivers them
/// (each event carries what the identity table would have added).
fn batch(config: &Config) -> Vec<Delivery> {
    let c = json!({"analytics": "granted", "ads": "granted", "ad_personalization": "denied"});
    let page =
        json!({"page_url": "https://shop.example/p/1", "referrer": "https://www.google.com/"});
    let raws = [
        json!({"event": "view_content", "event_id": "g-1", "occurred_at": ago(60), "user_id": "u-1",
               "anonymous_id": "1234567.7654321", "email": EMAILS[0], "phone": PHONES[0], "consent": c,
               "context": page, "items": [{"id": "sku-1", "name": "Shoe", "price": 60.0}],
               "properties": {"session_id": "1730000000", "engagement_time_msec": 1500}}),
        json!({"event": "add_to_cart", "event_id": "g-2", "occurred_at": ago(59), "user_id": "u-1",
               "anonymous_id": "1234567.7654321", "email": EMAILS[0], "phone": PHONES[0], "consent": c,
               "value": 120.0, "currency": "EUR",
               "items": [{"id": "sku-1", "name": "Shoe", "price": 60.0, "quantity": 2}]}),
        json!({"event": "search", "event_id": "g-3", "occurred_at": ago(58), "anonymous_id": "anon-2",
               "consent": c, "properties": {"search_query": "red shoes"}}),
        json!({"event": "purchase", "event_id": "g-4", "occurred_at": ago(57), "user_id": "u-1",
               "anonymous_id": "1234567.7654321", "email": EMAILS[0], "consent": c, "value": 120.0, "currency": "EUR",
               "order_id": "ord-9", "items": [{"id": "sku-1", "name": "Shoe", "category": "Shoes", "brand": "Acme",
               "variant": "red", "price": 60.0, "quantity": 2}]}),
        json!({"event": "sign_up", "event_id": "g-5", "occurred_at": ago(56), "user_id": "u-2",
               "email": EMAILS[1], "consent": c}),
        json!({"event": "lead", "event_id": "g-6", "occurred_at": ago(55), "user_id": "u-2",
               "email": EMAILS[1], "consent": c, "value": 5.0, "currency": "USD"}),
        json!({"event": "refund", "event_id": "g-7", "occurred_at": ago(54), "user_id": "u-1",
               "anonymous_id": "1234567.7654321", "email": EMAILS[0], "consent": c, "value": 60.0, "currency": "EUR",
               "order_id": "ord-9"}),
    ];
    raws.iter().map(|r| routed(config, "ga4", r)).collect()
}

#[tokio::test]
async fn batch_is_delivered_per_person_and_resends_count_again() {
    let fake = switchyard_fakes::serve(Fake::default()).await.unwrap();
    let config = config(&fake.base_url(), "");
    let dest = config.destinations["ga4"].vendor.build();
    assert!(
        !dest.vendor_dedup(),
        "GA4 keeps every copy: the sink's ledger must dedup"
    );
    let batch = batch(&config);
    for d in &batch {
        assert_eq!(dest.refuse(d), None, "{}", d.name);
    }
    let requests = dest.map(&batch);
    // u-1, anon-2, u-1, u-2 (sign_up + lead), u-1.
    assert_eq!(
        requests.iter().map(|r| r.rows.clone()).collect::<Vec<_>>(),
        vec![vec![0, 1], vec![2], vec![3], vec![4, 5], vec![6]]
    );

    let outcomes = deliver(dest.as_ref(), &reqwest::Client::new(), &batch).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; batch.len()]);
    let accepted = fake.accepted();
    assert_eq!(
        accepted.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        batch.iter().map(|d| d.name.as_str()).collect::<Vec<_>>()
    );
    assert_eq!(
        accepted.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        [
            "view_item",
            "add_to_cart",
            "search",
            "purchase",
            "sign_up",
            "generate_lead",
            "refund"
        ]
    );
    assert!(accepted.iter().all(|a| a.key.is_none()));
    let purchase = &accepted[3];
    assert_eq!(
        (purchase.value, purchase.currency.as_deref()),
        (Some(120.0), Some("EUR"))
    );
    let p = &purchase.payload;
    assert_eq!(
        p["client_id"], "1234567.7654321",
        "the GA cookie id joins the web session"
    );
    assert_eq!(p["user_id"], "u-1");
    assert_eq!(p["event"]["params"]["transaction_id"], "ord-9");
    assert_eq!(p["event"]["params"]["items"][0]["item_brand"], "Acme");
    assert_eq!(
        p["consent"],
        json!({"ad_user_data": "GRANTED", "ad_personalization": "DENIED"})
    );
    assert_eq!(
        p["user_data"]["sha256_email_address"][0],
        switchyard::event::normalize::hash_email(EMAILS[0], true).unwrap(),
        "Google's normalisation (gmail dots dropped)"
    );
    assert_eq!(
        accepted[2].payload["event"]["params"]["search_term"],
        "red shoes"
    );
    assert_eq!(accepted[2].payload["client_id"], "anon-2");
    assert!(
        accepted[2].payload["user_data"].is_null(),
        "no user id, no user_data"
    );
    assert_eq!(
        accepted[0].payload["event"]["params"]["page_location"],
        "https://shop.example/p/1"
    );

    // GA4 counts a resend again; that is why the ledger is consulted first.
    deliver(dest.as_ref(), &reqwest::Client::new(), &batch).await;
    assert_eq!(fake.accepted().len(), 2 * batch.len());

    for e in fake.exchanges() {
        let text = String::from_utf8_lossy(&e.request.body).to_lowercase();
        for m in EMAILS {
            assert!(!text.contains(&m.to_lowercase()), "raw email in {text}");
        }
        assert!(!text.contains('@'));
        assert!(!text.contains("6502530000"), "raw phone in {text}");
    }
}

#[tokio::test]
async fn the_debug_endpoint_validates_and_records_nothing() {
    let fake = switchyard_fakes::serve(Fake::default()).await.unwrap();
    let config = config(&fake.base_url(), "debug_endpoint = true");
    let dest = config.destinations["ga4"].vendor.build();
    let batch = batch(&config);
    let outcomes = deliver(dest.as_ref(), &reqwest::Client::new(), &batch).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; batch.len()]);
    assert!(fake.accepted().is_empty());
    assert!(
        fake.exchanges()
            .iter()
            .all(|e| e.request.path == "/debug/mp/collect")
    );
}

#[derive(Debug)]
enum Want {
    Delivered,
    Rejected(&'static str),
}

/// A change made to a request on its way to the fake.
type Tamper = Box<dyn Fn(&mut Request)>;

fn body_edit(f: impl Fn(&mut Value) + 'static) -> Tamper {
    Box::new(move |r: &mut Request| {
        let mut b: Value = serde_json::from_slice(&r.body).unwrap();
        f(&mut b);
        r.body = serde_json::to_vec(&b).unwrap();
    })
}

/// Only the request that carries `event` (by name) is edited.
fn event_edit(name: &'static str, f: impl Fn(&mut Value) + 'static) -> Box<dyn Fn(&mut Request)> {
    body_edit(move |b| {
        if b["events"][0]["name"] == name {
            f(b)
        }
    })
}

#[tokio::test]
async fn broken_requests_get_validation_messages_and_per_event_outcomes() {
    use Want::*;
    let old = (Utc::now() - Duration::hours(80)).timestamp_micros();
    let cases: Vec<(&str, &str, Tamper, Vec<Want>)> = vec![
        (
            "control: nothing broken",
            "",
            Box::new(|_| {}),
            vec![
                Delivered, Delivered, Delivered, Delivered, Delivered, Delivered, Delivered,
            ],
        ),
        (
            "bad api_secret",
            "",
            Box::new(|r: &mut Request| r.url = r.url.replace("demo-secret", "leaked-and-rotated")),
            (0..7).map(|_| Rejected("ga4_value_invalid")).collect(),
        ),
        (
            "too many events in one request",
            "",
            event_edit("view_item", |b| {
                let e = b["events"][0].clone();
                b["events"] = Value::Array(vec![e; 26]);
            }),
            vec![
                Rejected("ga4_exceeded_max_entities"),
                Rejected("ga4_exceeded_max_entities"),
                Delivered,
                Delivered,
                Delivered,
                Delivered,
                Delivered,
            ],
        ),
        (
            "too many params on the purchase",
            "",
            event_edit("purchase", |b| {
                for i in 0..22 {
                    b["events"][0]["params"][format!("extra_{i}")] = json!(i);
                }
            }),
            vec![
                Delivered,
                Delivered,
                Delivered,
                Rejected("ga4_exceeded_max_entities"),
                Delivered,
                Delivered,
                Delivered,
            ],
        ),
        (
            "too old timestamp on the lead",
            "",
            event_edit("sign_up", move |b| {
                b["events"][1]["timestamp_micros"] = json!(old)
            }),
            vec![
                Delivered,
                Delivered,
                Delivered,
                Delivered,
                Delivered,
                Rejected("ga4_value_out_of_bounds"),
                Delivered,
            ],
        ),
        (
            "unhashed email in user_data",
            "",
            event_edit("sign_up", |b| {
                b["user_data"]["sha256_email_address"] = json!(["buyer@example.com"]);
            }),
            vec![
                Delivered,
                Delivered,
                Delivered,
                Delivered,
                Rejected("ga4_value_invalid"),
                Rejected("ga4_value_invalid"),
                Delivered,
            ],
        ),
        (
            "reserved event name sent anyway",
            "",
            event_edit("search", |b| {
                b["events"][0]["name"] = json!("session_start")
            }),
            vec![
                Delivered,
                Delivered,
                Rejected("ga4_name_reserved"),
                Delivered,
                Delivered,
                Delivered,
                Delivered,
            ],
        ),
        (
            "client_id missing",
            "",
            event_edit("refund", |b| {
                b.as_object_mut().unwrap().remove("client_id");
            }),
            vec![
                Delivered,
                Delivered,
                Delivered,
                Delivered,
                Delivered,
                Delivered,
                Rejected("ga4_value_required"),
            ],
        ),
        (
            "EU region host overridden by base_url, strict validation",
            "region = \"eu\"\nvalidation_behavior = \"ENFORCE_RECOMMENDATIONS\"",
            Box::new(|_| {}),
            vec![
                Delivered, Delivered, Delivered, Delivered, Delivered, Delivered, Delivered,
            ],
        ),
    ];
    for (name, extra, tamper, want) in cases {
        let fake = switchyard_fakes::serve(Fake::default()).await.unwrap();
        let config = config(&fake.base_url(), extra);
        let dest = config.destinations["ga4"].vendor.build();
        let batch = batch(&config);
        let got = deliver_tampered(
            dest.as_ref(),
            &reqwest::Client::new(),
            &batch,
            tamper.as_ref(),
        )
        .await;
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let ok = match (g, w) {
                (Outcome::Delivered, Want::Delivered) => true,
                (Outcome::Rejected { class, .. }, Want::Rejected(c)) => class == c,
                _ => false,
            };
            assert!(ok, "{name}: event {i}: got {g:?}, want {w:?}");
        }
        let delivered = want.iter().filter(|w| matches!(w, Want::Delivered)).count();
        assert_eq!(fake.accepted().len(), delivered, "{name}");
    }
}

#[tokio::test]
async fn events_ga4_would_drop_are_refused_before_sending() {
    let fake = switchyard_fakes::serve(Fake::default()).await.unwrap();
    let params: Vec<String> = (0..22).map(|i| format!("\"p{i}\"")).collect();
    let config = config(
        &fake.base_url(),
        &format!(
            "event_names = {{ search = \"session_start\", lead = \"lead-submitted\" }}\nparams_from_properties = [{}]",
            params.join(", ")
        ),
    );
    let dest = config.destinations["ga4"].vendor.build();
    let mut batch = batch(&config);
    let props: serde_json::Map<String, Value> =
        (0..22).map(|i| (format!("p{i}"), json!(i))).collect();
    batch[3].event.properties = Some(props);
    let refusal = |i: usize| dest.refuse(&batch[i]).map(|r| r.class);
    assert_eq!(refusal(2), Some("ga4_event_name"), "reserved name");
    assert_eq!(refusal(5), Some("ga4_event_name"), "a dash");
    assert_eq!(refusal(3), Some("ga4_limits"), "over 25 params");
    assert_eq!(refusal(0), None);
    // The sink dead-letters events older than GA4 takes before they are sent.
    assert_eq!(
        dest.limits().max_event_age,
        Some(std::time::Duration::from_secs(72 * 3600))
    );
    assert_eq!(dest.limits().max_events, 25);
}

#[test]
fn settings_are_validated_with_their_keys() {
    let text = r#"
[destinations.ga4]
type = "ga4"
measurement_id = "G-X1"
api_secret = "s"
validation_behavior = "STRICT"
user_data = "sometimes"
max_event_age = "0s"
params_from_properties = ["plan", "ga_session_number"]
"#;
    let err = Config::parse(text, Path::new("ga4.toml"), &|_| None)
        .unwrap_err()
        .to_string();
    for key in [
        "destinations.ga4.validation_behavior",
        "destinations.ga4.user_data",
        "destinations.ga4.max_event_age",
        "destinations.ga4.params_from_properties",
    ] {
        assert!(err.contains(key), "{key} in {err}");
    }
}
