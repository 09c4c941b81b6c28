//! The Mixpanel destination against its loopback fake (no Kafka): events
//! routed and PII-shaped by the router's own code, mapped to /import and
//! /engage, sent over HTTP, and Mixpanel's answers classified per event.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use chrono::{Duration, Utc};
use serde_json::{Value, json};
use switchyard::config::Config;
use switchyard::delivery::Delivery;
use switchyard::sink::destination::{Destination, Outcome, Request};
use switchyard_fakes::mixpanel::{IdMerge, Mixpanel as Fake, Settings as FakeSettings, State};

use common::vendor::{deliver, deliver_tampered, routed};

const ANON: &str = "anon_c9f2e71b";
const UUID_ANON: &str = "6f1c2a9e-3b4d-4c8e-9f10-2a3b4c5d6e7f";
const EMAIL: &str = "maya.lopez@example.com";

fn config(base_url: &str, extra: &str) -> Config {
    let text = format!(
        r#"
[destinations.mixpanel]
type = "mixpanel"
project_id = "3141592"
service_account_username = "demo.sa"
service_account_secret = "demo-sa-secret"
project_token = "demo-token"
base_url = "{base_url}"
{extra}
"#
    );
    Config::parse(&text, Path::new("mixpanel.toml"), &|_| None).expect("config parses")
}

fn ago(minutes: i64) -> String {
    (Utc::now() - Duration::minutes(minutes)).to_rfc3339()
}

async fn fake(
    id_merge: IdMerge,
    f: impl FnOnce(&mut FakeSettings),
) -> (switchyard_fakes::Fake, Arc<Mutex<State>>) {
    let mut s = FakeSettings {
        id_merge,
        ..Default::default()
    };
    f(&mut s);
    let fake = Fake::new(s);
    let state = fake.state();
    (switchyard_fakes::serve(fake).await.unwrap(), state)
}

/// A visitor browses anonymously, signs in (identify), signs up and buys.
fn journey(config: &Config, anon: &str) -> Vec<Delivery> {
    let c = json!({"analytics": "granted"});
    let ctx = json!({"ip": "198.51.100.23", "page_url": "https://shop.example/p/1"});
    let raws = [
        json!({"event": "view_content", "event_id": "m-1", "occurred_at": ago(30), "anonymous_id": anon,
               "consent": c, "context": ctx, "items": [{"id": "sku-1", "price": 129.0}]}),
        json!({"event": "add_to_cart", "event_id": "m-2", "occurred_at": ago(29), "anonymous_id": anon,
               "consent": c, "value": 129.0, "currency": "USD", "items": [{"id": "sku-1", "quantity": 1, "price": 129.0}]}),
        json!({"event": "identify", "event_id": "m-3", "occurred_at": ago(28), "user_id": "u_48213",
               "anonymous_id": anon, "email": EMAIL, "phone": "+1 415 555 0142", "consent": c,
               "traits": {"first_name": "Maya", "last_name": "Lopez", "email": EMAIL, "plan": "pro",
                          "created_at": "2026-11-01T10:00:00Z"}}),
        json!({"event": "sign_up", "event_id": "m-4", "occurred_at": ago(27), "user_id": "u_48213",
               "anonymous_id": anon, "consent": c, "properties": {"method": "email"}}),
        json!({"event": "purchase", "event_id": "m-5", "occurred_at": ago(26), "user_id": "u_48213",
               "consent": c, "value": 147.0, "currency": "USD", "order_id": "SO-100231", "context": ctx}),
        json!({"event": "custom.webinar_registered", "event_id": "m-6", "occurred_at": ago(25),
               "user_id": "u_48213", "consent": c, "properties": {"webinar_id": "wb-1"}}),
    ];
    raws.iter().map(|r| routed(config, "mixpanel", r)).collect()
}

#[tokio::test]
async fn a_journey_merges_under_simplified_and_profiles_hold_no_contact_by_default() {
    let (fake, state) = fake(IdMerge::Simplified, |_| {}).await;
    let config = config(&fake.base_url(), "id_merge = \"simplified\"");
    let dest = config.destinations["mixpanel"].vendor.build();
    let batch = journey(&config, ANON);
    for d in &batch {
        assert_eq!(dest.refuse(d), None, "{}", d.name);
    }
    let outcomes = deliver(dest.as_ref(), &reqwest::Client::new(), &batch).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; batch.len()]);

    let accepted = fake.accepted();
    assert_eq!(
        accepted.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        [
            "Product Viewed",
            "Product Added",
            "Signed Up",
            "Order Completed",
            "webinar_registered",
            "$set"
        ],
        "identify is a profile update only"
    );
    let p = |i: usize| accepted[i].payload["properties"].clone();
    assert_eq!(p(0)["distinct_id"], format!("$device:{ANON}"));
    assert_eq!(p(0)["$device_id"], ANON);
    assert_eq!(p(0)["ip"], "198.51.100.23");
    assert_eq!(p(2)["distinct_id"], "u_48213");
    assert_eq!(
        (p(2)["$device_id"].as_str(), p(2)["$user_id"].as_str()),
        (Some(ANON), Some("u_48213"))
    );
    assert_eq!(
        (accepted[3].value, accepted[3].currency.as_deref()),
        (Some(147.0), Some("USD"))
    );
    assert_eq!(p(3)["ip"], "198.51.100.23");
    assert_eq!(p(4)["webinar_id"], "wb-1");

    let st = state.lock().unwrap();
    // The merge is visible: the anonymous browsing belongs to the user.
    assert_eq!(st.canonical_of(&format!("$device:{ANON}")), "u_48213");
    let profile = &st.profiles["u_48213"];
    assert_eq!(profile["$first_name"], "Maya");
    assert_eq!(profile["$last_name"], "Lopez");
    assert_eq!(profile["plan"], "pro");
    assert_eq!(profile["$created"], "2026-11-01T10:00:00Z");
    assert!(
        profile.get("$email").is_none(),
        "raw_contact is off: {profile:?}"
    );
    assert!(profile.get("$phone").is_none());
    assert_eq!(
        profile["$transactions"],
        json!([{"$amount": 147.0, "$time": profile["$transactions"][0]["$time"],
                "currency": "USD", "order_id": "SO-100231"}])
    );
    drop(st);

    // Nothing personal on the wire: no email, no phone, no hash.
    for e in fake.exchanges() {
        let text = String::from_utf8_lossy(&e.request.body).to_lowercase();
        assert!(!text.contains('@'), "{text}");
        assert!(!text.contains("5550142"), "{text}");
        assert!(!text.contains("sha256"), "{text}");
    }
}

#[tokio::test]
async fn raw_contact_puts_email_and_phone_on_the_profile() {
    let (fake, state) = fake(IdMerge::Simplified, |_| {}).await;
    let config = config(
        &fake.base_url(),
        "id_merge = \"simplified\"\nraw_contact = true",
    );
    let dest = config.destinations["mixpanel"].vendor.build();
    let batch = journey(&config, ANON);
    let outcomes = deliver(dest.as_ref(), &reqwest::Client::new(), &batch).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; batch.len()]);
    let st = state.lock().unwrap();
    let profile = &st.profiles["u_48213"];
    assert_eq!(profile["$email"], EMAIL);
    assert!(profile["$phone"].as_str().is_some(), "{profile:?}");
}

#[tokio::test]
async fn the_original_api_merges_with_identify_or_merge() {
    for (anon, event) in [(UUID_ANON, "$identify"), (ANON, "$merge")] {
        let (fake, state) = fake(IdMerge::Original, |_| {}).await;
        let config = config(&fake.base_url(), "id_merge = \"original\"");
        let dest = config.destinations["mixpanel"].vendor.build();
        let batch = journey(&config, anon);
        let outcomes = deliver(dest.as_ref(), &reqwest::Client::new(), &batch).await;
        assert_eq!(outcomes, vec![Outcome::Delivered; batch.len()]);
        let accepted = fake.accepted();
        let sent: Vec<Value> = fake
            .exchanges()
            .iter()
            .filter(|e| e.request.path == "/import")
            .flat_map(|e| serde_json::from_slice::<Vec<Value>>(&e.request.body).unwrap())
            .collect();
        assert_eq!(sent[2]["event"], event);
        assert_eq!(sent[2]["properties"]["distinct_id"], "u_48213");
        assert_eq!(accepted[0].payload["properties"]["distinct_id"], anon);
        assert!(
            accepted[0].payload["properties"]
                .get("$device_id")
                .is_none()
        );
        assert_eq!(
            state.lock().unwrap().canonical_of(anon),
            "u_48213",
            "{event}"
        );
    }
}

#[tokio::test]
async fn a_partial_failure_dead_letters_exactly_the_failed_rows() {
    let (fake, _) = fake(IdMerge::Simplified, |_| {}).await;
    let config = config(&fake.base_url(), "id_merge = \"simplified\"");
    let dest = config.destinations["mixpanel"].vendor.build();
    let batch = journey(&config, ANON);
    // Break the second and fourth events of the /import body on the way.
    let tamper = |r: &mut Request| {
        if r.endpoint != "events" {
            return;
        }
        let mut b: Value = serde_json::from_slice(&r.body).unwrap();
        b[1]["properties"]["$insert_id"] = json!("not_allowed!");
        b[3]["properties"]["time"] = json!("yesterday");
        r.body = serde_json::to_vec(&b).unwrap();
    };
    let outcomes = deliver_tampered(dest.as_ref(), &reqwest::Client::new(), &batch, &tamper).await;
    let rejected: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter(
            |(_, o)| matches!(o, Outcome::Rejected { class, .. } if class == "mixpanel_invalid"),
        )
        .map(|(i, _)| i)
        .collect();
    // Body positions 1 and 3 are rows 1 (add_to_cart) and 3 (sign_up): the
    // identify (row 2) is the `$identify` at position 2.
    assert_eq!(rejected, [1, 3], "{outcomes:?}");
    assert!(
        outcomes
            .iter()
            .enumerate()
            .filter(|(i, _)| ![1, 3].contains(i))
            .all(|(_, o)| *o == Outcome::Delivered)
    );
    let Outcome::Rejected { reason, .. } = &outcomes[3] else {
        unreachable!()
    };
    assert!(reason.contains("properties.time"), "{reason}");
    assert_eq!(
        fake.accepted().iter().filter(|a| a.name != "$set").count(),
        3,
        "Mixpanel ingests the valid ones (and counts no `$identify`)"
    );
}

/// Sends `batch` as the sink does on a 413: the rows go again in requests
/// of half as many rows until they fit.
async fn deliver_splitting(dest: &dyn Destination, batch: &[Delivery]) -> Vec<Outcome> {
    let http = reqwest::Client::new();
    let mut out: Vec<Option<Outcome>> = vec![None; batch.len()];
    let mut cap = batch.len();
    while out.iter().any(Option::is_none) {
        let pending: Vec<usize> = (0..batch.len()).filter(|i| out[*i].is_none()).collect();
        for chunk in pending.chunks(cap) {
            let sub: Vec<Delivery> = chunk.iter().map(|&i| batch[i].clone()).collect();
            let got = deliver(dest, &http, &sub).await;
            for (&i, o) in chunk.iter().zip(got) {
                if o != Outcome::Split {
                    out[i] = Some(o);
                }
            }
        }
        assert!(cap > 1, "a single row was too large");
        cap = cap.div_ceil(2);
    }
    out.into_iter().map(Option::unwrap).collect()
}

#[tokio::test]
async fn a_413_splits_and_every_row_arrives_once_and_resends_are_dropped() {
    let (fake, _) = fake(IdMerge::Simplified, |s| s.max_body_bytes = 2_000).await;
    let config = config(&fake.base_url(), "id_merge = \"simplified\"");
    let dest = config.destinations["mixpanel"].vendor.build();
    let batch: Vec<Delivery> = (0..16)
        .map(|i| {
            routed(
                &config,
                "mixpanel",
                &json!({"event": "view_content", "event_id": format!("v-{i}"), "occurred_at": ago(10),
                        "anonymous_id": format!("anon-{}", i % 3), "consent": {"analytics": "granted"},
                        "context": {"page_url": format!("https://shop.example/p/{i}")}}),
            )
        })
        .collect();
    let outcomes = deliver_splitting(dest.as_ref(), &batch).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; batch.len()]);
    assert!(fake.exchanges().iter().any(|e| e.status == 413));
    let mut keys: Vec<String> = fake
        .accepted()
        .iter()
        .filter_map(|a| a.key.clone())
        .collect();
    assert_eq!(keys.len(), batch.len());
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), batch.len(), "every row once");

    // A resend (a sink that crashed before its ledger write) is dropped by
    // Mixpanel's own dedup on (event, distinct_id, time, $insert_id).
    let again = deliver_splitting(dest.as_ref(), &batch).await;
    assert_eq!(again, vec![Outcome::Delivered; batch.len()]);
    assert_eq!(fake.accepted().len(), batch.len());
}

#[tokio::test]
async fn wrong_credentials_are_refused_for_every_row() {
    let (fake, _) = fake(IdMerge::Simplified, |s| {
        s.service_account_secret = "rotated".into()
    })
    .await;
    let config = config(&fake.base_url(), "id_merge = \"simplified\"");
    let dest = config.destinations["mixpanel"].vendor.build();
    let batch = journey(&config, ANON);
    let outcomes = deliver(dest.as_ref(), &reqwest::Client::new(), &batch).await;
    // Every row has an /import call (the identify its `$identify`), which
    // the rotated secret fails; /engage takes the token and would pass.
    for o in &outcomes {
        assert!(
            matches!(o, Outcome::Rejected { class, .. } if class == "http_401"),
            "{o:?}"
        );
    }
}

/// Through the sink's own rounds: a purchase's /import fails once while its
/// /engage `$append` goes through; the retry sends only the /import, so the
/// profile lists the transaction once.
#[tokio::test]
async fn a_retried_purchase_appends_its_transaction_once() {
    use switchyard::kafka::Position;
    use switchyard::sink::config::DeliverySettings;
    use switchyard::sink::records::{Final, Item};
    use switchyard::sink::send::{Shared, attempt};
    use switchyard_fakes::Scripted;
    use tokio_util::sync::CancellationToken;

    let (fake, state) = fake(IdMerge::Simplified, |_| {}).await;
    let config = config(&fake.base_url(), "id_merge = \"simplified\"");
    let purchase = routed(
        &config,
        "mixpanel",
        &json!({"event": "purchase", "event_id": "t-1", "occurred_at": ago(5), "user_id": "u_7",
                "consent": {"analytics": "granted"}, "value": 40.0, "currency": "EUR"}),
    );
    let mut settings = DeliverySettings::default();
    settings.retry.initial_backoff = std::time::Duration::from_millis(10);
    let shared = Shared::detached(
        "mixpanel",
        config.destinations["mixpanel"].vendor.build(),
        settings,
    )
    .unwrap();
    let at = Position {
        topic: "deliver".into(),
        partition: 0,
        offset: 0,
    };
    let mut item = Item::unread(purchase, at);
    shared.ownership.seen(&mut item);
    // The first request of the purchase's lane is its /import.
    fake.script([Scripted {
        status: 503,
        headers: vec![],
        body: "{\"error\": \"temporarily unavailable\"}".into(),
    }]);
    let finals = attempt(&shared, vec![item], &CancellationToken::new()).await;
    assert!(
        matches!(finals.as_slice(), [(item, Final::Delivered { .. })] if item.attempts == 2),
        "{finals:?}"
    );
    let paths: Vec<String> = fake
        .exchanges()
        .iter()
        .map(|e| e.request.path.clone())
        .collect();
    assert_eq!(paths.len(), 3, "{paths:?}");
    assert_eq!(
        paths.iter().filter(|p| p.starts_with("/engage")).count(),
        1,
        "{paths:?}"
    );
    let st = state.lock().unwrap();
    assert_eq!(
        st.profiles[&st.canonical_of("u_7")]["$transactions"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
}
