//! The PostHog destination against its loopback fake (no Kafka): a shopper
//! browses anonymously, signs in (an identify linking the two ids) and
//! buys; events are routed and PII-shaped by the router's own code, mapped,
//! sent over HTTP and classified.

mod common;

use std::path::Path;

use chrono::{Duration, Utc};
use serde_json::{Value, json};
use switchyard::config::Config;
use switchyard::delivery::Delivery;
use switchyard::sink::destination::{Destination, Outcome};
use switchyard_fakes::posthog::{Merge, Settings as Fake};

use common::vendor::{deliver, routed, send};

const KEY: &str = "phc_demo_project_key";
const EMAIL: &str = "Jane.Doe@Example.com";
const PHONE: &str = "+1 650 253 0000";

/// Two PostHog destinations on the same fake: one as shipped, one allowed
/// raw contact data.
fn config(base_url: &str, key: &str) -> Config {
    let text = format!(
        r#"
[destinations.posthog]
type = "posthog"
api_key = "{key}"
base_url = "{base_url}"
consent_default = "deny"

[destinations.posthog_raw]
type = "posthog"
api_key = "{key}"
base_url = "{base_url}"
consent_default = "deny"
raw_contact = true
"#
    );
    Config::parse(&text, Path::new("posthog.toml"), &|_| None).expect("config parses")
}

fn ago(minutes: i64) -> String {
    (Utc::now() - Duration::minutes(minutes)).to_rfc3339()
}

/// Anonymous browsing, the sign-in that links it, a purchase, a custom event.
fn journey() -> Vec<Value> {
    let c = json!({"analytics": "granted"});
    let ctx = json!({"ip": "203.0.113.7", "page_url": "https://shop.example/p/1"});
    vec![
        json!({"event": "view_content", "event_id": "p-1", "occurred_at": ago(30), "anonymous_id": "anon-7",
               "consent": c, "context": ctx, "items": [{"id": "sku-1", "name": "Shoe", "price": 60.0}],
               "properties": {"session_id": "sess-1"}}),
        json!({"event": "add_to_cart", "event_id": "p-2", "occurred_at": ago(29), "anonymous_id": "anon-7",
               "consent": c, "value": 60.0, "currency": "EUR", "metadata": {"session_id": "sess-1"},
               "items": [{"id": "sku-1", "name": "Shoe", "price": 60.0, "quantity": 1}]}),
        json!({"event": "identify", "event_id": "p-3", "occurred_at": ago(28), "anonymous_id": "anon-7",
               "user_id": "u-7", "email": EMAIL, "phone": PHONE, "consent": c,
               "traits": {"plan": "pro", "email": EMAIL}}),
        json!({"event": "purchase", "event_id": "p-4", "occurred_at": ago(27), "anonymous_id": "anon-7",
               "user_id": "u-7", "email": EMAIL, "consent": c, "value": 60.0, "currency": "EUR",
               "order_id": "ord-7", "properties": {"session_id": "sess-1"},
               "items": [{"id": "sku-1", "name": "Shoe", "price": 60.0, "quantity": 1}]}),
        json!({"event": "custom.webinar_registered", "event_id": "p-5", "occurred_at": ago(26),
               "user_id": "u-7", "consent": c}),
    ]
}

fn batch(config: &Config, dest: &str) -> Vec<Delivery> {
    journey().iter().map(|r| routed(config, dest, r)).collect()
}

#[tokio::test]
async fn journey_is_merged_delivered_once_and_resends_are_dropped() {
    let fake_settings = Fake::default();
    let persons = fake_settings.persons.clone();
    let fake = switchyard_fakes::serve(fake_settings).await.unwrap();
    let config = config(&fake.base_url(), KEY);
    let dest = config.destinations["posthog"].vendor.build();
    assert!(
        !dest.vendor_dedup(),
        "PostHog does not promise uuid dedup: the sink's ledger must check"
    );
    let batch = batch(&config, "posthog");
    for d in &batch {
        assert_eq!(dest.refuse(d), None, "{}", d.name);
    }
    let http = reqwest::Client::new();
    let outcomes = deliver(dest.as_ref(), &http, &batch).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; batch.len()]);

    let accepted = fake.accepted();
    assert_eq!(
        accepted.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        [
            "Product Viewed",
            "Product Added",
            "$identify",
            "Order Completed",
            "webinar_registered"
        ]
    );
    let ids: Vec<&str> = accepted
        .iter()
        .map(|a| a.payload["distinct_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["anon-7", "anon-7", "u-7", "u-7", "u-7"]);
    // The fake saw the anonymous browsing merged into the known person.
    assert_eq!(
        persons.merges(),
        vec![Merge {
            anonymous: "anon-7".into(),
            identified: "u-7".into()
        }]
    );
    let purchase = &accepted[3];
    assert_eq!(
        (purchase.value, purchase.currency.as_deref()),
        (Some(60.0), Some("EUR"))
    );
    assert_eq!(purchase.payload["properties"]["$session_id"], "sess-1");
    assert_eq!(purchase.payload["properties"]["order_id"], "ord-7");
    assert!(
        purchase.payload["properties"]
            .get("$anon_distinct_id")
            .is_none(),
        "only the $identify merges"
    );
    assert_eq!(accepted[1].payload["properties"]["$session_id"], "sess-1");
    assert_eq!(accepted[0].payload["properties"]["$ip"], "203.0.113.7");
    assert_eq!(
        accepted[0].payload["properties"]["$current_url"],
        "https://shop.example/p/1"
    );
    // Each event once, under a uuid of its own.
    let mut uuids: Vec<&str> = accepted.iter().filter_map(|a| a.key.as_deref()).collect();
    uuids.sort_unstable();
    uuids.dedup();
    assert_eq!(uuids.len(), batch.len());

    // Without raw_contact the identify sets traits but no email or phone.
    let set = &accepted[2].payload["properties"]["$set"];
    assert_eq!(set["plan"], "pro");
    for e in fake.exchanges() {
        let text = String::from_utf8_lossy(&e.request.body).to_lowercase();
        assert!(!text.contains("jane.doe"), "raw email sent: {text}");
        assert!(!text.contains("253 0000") && !text.contains("2530000"));
    }

    // A resend (the sink retrying after a lost answer) carries the same
    // uuids; the fake drops the copies.
    let again = deliver(dest.as_ref(), &http, &batch).await;
    assert_eq!(again, vec![Outcome::Delivered; batch.len()]);
    assert_eq!(fake.accepted().len(), batch.len());
}

#[tokio::test]
async fn raw_contact_reaches_posthog_only_when_configured() {
    let fake = switchyard_fakes::serve(Fake::default()).await.unwrap();
    let config = config(&fake.base_url(), KEY);
    let raw = journey()[2].clone();
    let http = reqwest::Client::new();
    for (dest, raw_allowed) in [("posthog", false), ("posthog_raw", true)] {
        let d = routed(&config, dest, &raw);
        let vendor = config.destinations[dest].vendor.build();
        let before = fake.accepted().len();
        // Both destinations share the fake: an event id of its own per
        // destination keeps the fake's uuid dedup from hiding the second.
        let mut d = d;
        d.event.event_id = format!("p-3-{dest}");
        assert_eq!(
            deliver(vendor.as_ref(), &http, std::slice::from_ref(&d)).await,
            vec![Outcome::Delivered]
        );
        let got = &fake.accepted()[before];
        let set = &got.payload["properties"]["$set"];
        assert_eq!(set.get("email").is_some(), raw_allowed, "{dest}: {set}");
        assert_eq!(set.get("phone").is_some(), raw_allowed, "{dest}: {set}");
    }
}

/// Sends `rows` of `batch`, halving whatever PostHog finds too large, as the
/// sink's runtime does with `Split`.
async fn deliver_splitting(
    dest: &dyn Destination,
    http: &reqwest::Client,
    batch: &[Delivery],
) -> (Vec<Option<Outcome>>, usize) {
    let mut out = vec![None; batch.len()];
    let mut splits = 0;
    let mut queue = vec![(0..batch.len()).collect::<Vec<usize>>()];
    while let Some(rows) = queue.pop() {
        let part: Vec<Delivery> = rows.iter().map(|&i| batch[i].clone()).collect();
        for req in dest.map(&part) {
            let resp = send(http, &req).await;
            let got = dest.classify(&req, &resp, &part);
            if got.rows.contains(&Outcome::Split) && req.rows.len() > 1 {
                splits += 1;
                let these: Vec<usize> = req.rows.iter().map(|&r| rows[r]).collect();
                let (a, b) = these.split_at(these.len() / 2);
                queue.push(a.to_vec());
                queue.push(b.to_vec());
                continue;
            }
            for (&r, o) in req.rows.iter().zip(got.rows) {
                out[rows[r]] = Some(o);
            }
        }
    }
    (out, splits)
}

#[tokio::test]
async fn an_oversized_batch_is_split_and_delivered_once() {
    // The URL is not in the body: the whole batch's size is known before
    // the fake (and its address) exists. Room for about half of it.
    let whole = {
        let c = config("http://127.0.0.1:9", KEY);
        let b = batch(&c, "posthog");
        c.destinations["posthog"].vendor.build().map(&b)[0]
            .body
            .len()
    };
    let fake = switchyard_fakes::serve(Fake {
        max_body_bytes: whole * 2 / 3,
        ..Fake::default()
    })
    .await
    .unwrap();
    let config = config(&fake.base_url(), KEY);
    let dest = config.destinations["posthog"].vendor.build();
    let batch = batch(&config, "posthog");
    let (out, splits) = deliver_splitting(dest.as_ref(), &reqwest::Client::new(), &batch).await;
    assert!(splits >= 1, "the first request was too large");
    assert!(fake.exchanges().iter().any(|e| e.status == 413));
    assert_eq!(out, vec![Some(Outcome::Delivered); batch.len()]);
    let mut keys: Vec<String> = fake.accepted().into_iter().filter_map(|a| a.key).collect();
    assert_eq!(keys.len(), batch.len());
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), batch.len(), "each event once");
}

#[tokio::test]
async fn a_wrong_key_is_rejected_as_auth_with_posthogs_words() {
    let fake = switchyard_fakes::serve(Fake::default()).await.unwrap();
    let config = config(&fake.base_url(), "phc_someone_elses_key");
    let dest = config.destinations["posthog"].vendor.build();
    let batch = batch(&config, "posthog");
    let out = deliver(dest.as_ref(), &reqwest::Client::new(), &batch).await;
    for o in out {
        assert!(
            matches!(&o, Outcome::Rejected { class, reason } if class == "posthog_auth" && reason.contains("API key is not valid")),
            "{o:?}"
        );
    }
    assert!(fake.accepted().is_empty());
}

#[test]
fn a_personal_key_or_no_region_is_a_config_error() {
    let text = r#"
[destinations.posthog]
type = "posthog"
api_key = "phx_personal_key"
"#;
    let err = Config::parse(text, Path::new("posthog.toml"), &|_| None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("destinations.posthog.api_key"), "{err}");
    assert!(err.contains("destinations.posthog.region"), "{err}");
    assert!(!err.contains("phx_personal_key"), "{err}");
}
