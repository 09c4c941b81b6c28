//! The Amplitude destination against its loopback fake: a shopper browses
//! anonymously, signs in (an identify carrying both ids) and buys; events
//! are routed and PII-shaped by the router's own code, mapped, sent over
//! HTTP and classified. Amplitude's partial answers (a 400 naming events, a
//! 429 naming users) are followed the way the sink does: named rows are
//! dead-lettered or wait, the others go again. The last test runs the real
//! sink over the broker.

mod common;

use std::path::Path;

use chrono::{Duration, Utc};
use serde_json::{Value, json};
use switchyard::config::Config;
use switchyard::delivery::Delivery;
use switchyard::sink::destination::{Destination, Outcome};
use switchyard_fakes::amplitude::Settings as Fake;

use common::vendor::{deliver, deliver_tampered, routed, send};

const KEY: &str = "demo-amplitude-api-key";
const EMAIL: &str = "Jane.Doe@Example.com";
const PHONE: &str = "+1 650 253 0000";

/// Two Amplitude destinations on the same fake: one as shipped, one
/// allowed raw contact data.
fn config(base_url: &str, key: &str) -> Config {
    let text = format!(
        r#"
[destinations.amplitude]
type = "amplitude"
api_key = "{key}"
base_url = "{base_url}"

[destinations.amplitude_raw]
type = "amplitude"
api_key = "{key}"
base_url = "{base_url}"
raw_contact = true
"#
    );
    Config::parse(&text, Path::new("amplitude.toml"), &|_| None).expect("config parses")
}

fn ago(minutes: i64) -> String {
    (Utc::now() - Duration::minutes(minutes)).to_rfc3339()
}

/// Anonymous browsing, the sign-in that links it, a purchase, a custom event.
fn journey() -> Vec<Value> {
    let c = json!({"analytics": "granted"});
    let ctx = json!({"ip": "203.0.113.7", "page_url": "https://shop.example/p/1"});
    vec![
        json!({"event": "view_content", "event_id": "a-1", "occurred_at": ago(30), "anonymous_id": "anon-7",
               "consent": c, "context": ctx, "items": [{"id": "sku-1", "name": "Shoe", "price": 60.0}]}),
        json!({"event": "add_to_cart", "event_id": "a-2", "occurred_at": ago(29), "anonymous_id": "anon-7",
               "consent": c, "value": 60.0, "currency": "EUR",
               "items": [{"id": "sku-1", "name": "Shoe", "price": 60.0, "quantity": 1}]}),
        json!({"event": "identify", "event_id": "a-3", "occurred_at": ago(28), "anonymous_id": "anon-7",
               "user_id": "user-7", "email": EMAIL, "phone": PHONE, "consent": c,
               "traits": {"plan": "pro", "email": EMAIL}}),
        json!({"event": "purchase", "event_id": "a-4", "occurred_at": ago(27), "anonymous_id": "anon-7",
               "user_id": "user-7", "email": EMAIL, "consent": c, "value": 60.0, "currency": "EUR",
               "order_id": "ord-7", "items": [{"id": "sku-1", "name": "Shoe", "price": 60.0, "quantity": 1}]}),
        json!({"event": "custom.webinar_registered", "event_id": "a-5", "occurred_at": ago(26),
               "user_id": "user-7", "consent": c}),
    ]
}

fn batch(config: &Config, dest: &str) -> Vec<Delivery> {
    journey().iter().map(|r| routed(config, dest, r)).collect()
}

fn insert_ids(fake: &switchyard_fakes::Fake) -> Vec<String> {
    let mut keys: Vec<String> = fake.accepted().into_iter().filter_map(|a| a.key).collect();
    keys.sort_unstable();
    keys
}

#[tokio::test]
async fn journey_is_linked_delivered_once_and_resends_are_dropped() {
    let fake = switchyard_fakes::serve(Fake::default()).await.unwrap();
    let config = config(&fake.base_url(), KEY);
    let dest = config.destinations["amplitude"].vendor.build();
    assert!(
        dest.vendor_dedup(),
        "Amplitude drops a repeated (device_id, insert_id) for 7 days"
    );
    let batch = batch(&config, "amplitude");
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
    let ids: Vec<(Value, Value)> = accepted
        .iter()
        .map(|a| (a.payload["user_id"].clone(), a.payload["device_id"].clone()))
        .collect();
    assert_eq!(
        ids,
        [
            (Value::Null, json!("anon-7")),
            (Value::Null, json!("anon-7")),
            // The identify carries both ids: the device joins the user.
            (json!("user-7"), json!("anon-7")),
            (json!("user-7"), json!("anon-7")),
            (json!("user-7"), Value::Null),
        ]
    );
    let purchase = &accepted[3];
    assert_eq!(
        (purchase.value, purchase.currency.as_deref()),
        (Some(60.0), Some("EUR"))
    );
    assert_eq!(purchase.payload["revenueType"], "purchase");
    assert_eq!(purchase.payload["productId"], "sku-1");
    assert_eq!(purchase.payload["event_properties"]["order_id"], "ord-7");
    assert!(purchase.payload["time"].is_i64(), "ms since epoch");
    assert_eq!(accepted[0].payload["ip"], "203.0.113.7");
    assert!(
        accepted[1].payload.get("revenue").is_none(),
        "a cart is not revenue"
    );
    assert_eq!(insert_ids(&fake).len(), batch.len(), "an insert_id each");

    // Without raw_contact the identify sets traits but no email or phone.
    assert_eq!(
        accepted[2].payload["user_properties"],
        json!({"$set": {"plan": "pro"}})
    );
    for e in fake.exchanges() {
        let text = String::from_utf8_lossy(&e.request.body).to_lowercase();
        assert!(!text.contains("jane.doe"), "raw email sent: {text}");
        assert!(!text.contains("253 0000") && !text.contains("2530000"));
    }

    // A resend (the sink retrying after a lost answer) carries the same
    // insert_ids; the fake drops the copies.
    let again = deliver(dest.as_ref(), &http, &batch).await;
    assert_eq!(again, vec![Outcome::Delivered; batch.len()]);
    assert_eq!(fake.accepted().len(), batch.len());
}

#[tokio::test]
async fn raw_contact_reaches_amplitude_only_when_configured() {
    let fake = switchyard_fakes::serve(Fake::default()).await.unwrap();
    let config = config(&fake.base_url(), KEY);
    let raw = journey()[2].clone();
    let http = reqwest::Client::new();
    for (dest, raw_allowed) in [("amplitude", false), ("amplitude_raw", true)] {
        let mut d = routed(&config, dest, &raw);
        // An event id of its own per destination keeps the fake's dedup
        // from hiding the second.
        d.event.event_id = format!("a-3-{dest}");
        let vendor = config.destinations[dest].vendor.build();
        let before = fake.accepted().len();
        assert_eq!(
            deliver(vendor.as_ref(), &http, std::slice::from_ref(&d)).await,
            vec![Outcome::Delivered]
        );
        let set = &fake.accepted()[before].payload["user_properties"]["$set"];
        assert_eq!(set.get("email").is_some(), raw_allowed, "{dest}: {set}");
        assert_eq!(set.get("phone").is_some(), raw_allowed, "{dest}: {set}");
    }
}

/// Sends `batch` again and again as the sink does with Amplitude's partial
/// answers: `Resend` rows go at once, the others are final here. Returns
/// each row's final outcome and how many rounds it took.
async fn deliver_resending(
    dest: &dyn Destination,
    http: &reqwest::Client,
    batch: &[Delivery],
    first_tamper: &dyn Fn(&mut switchyard::sink::destination::Request),
) -> (Vec<Outcome>, usize) {
    let mut out: Vec<Option<Outcome>> = vec![None; batch.len()];
    let mut pending: Vec<usize> = (0..batch.len()).collect();
    let mut rounds = 0;
    while !pending.is_empty() {
        rounds += 1;
        assert!(rounds <= 5, "resends must end");
        let part: Vec<Delivery> = pending.iter().map(|&i| batch[i].clone()).collect();
        let got = if rounds == 1 {
            deliver_tampered(dest, http, &part, first_tamper).await
        } else {
            deliver(dest, http, &part).await
        };
        let mut next = Vec::new();
        for (&row, o) in pending.iter().zip(got) {
            if o == Outcome::Resend {
                next.push(row);
            } else {
                out[row] = Some(o);
            }
        }
        pending = next;
    }
    (out.into_iter().map(Option::unwrap).collect(), rounds)
}

#[tokio::test]
async fn a_400_dead_letters_exactly_the_named_events_and_the_rest_arrive_once() {
    let fake = switchyard_fakes::serve(Fake::default()).await.unwrap();
    let config = config(&fake.base_url(), KEY);
    let dest = config.destinations["amplitude"].vendor.build();
    let batch = batch(&config, "amplitude");
    // The second event's time is broken on the wire (as a mapping bug
    // would): Amplitude names it and ingests nothing.
    let break_time = |req: &mut switchyard::sink::destination::Request| {
        let mut b: Value = serde_json::from_slice(&req.body).unwrap();
        b["events"][1]["time"] = json!("yesterday");
        req.body = serde_json::to_vec(&b).unwrap();
    };
    let (out, rounds) =
        deliver_resending(dest.as_ref(), &reqwest::Client::new(), &batch, &break_time).await;
    assert_eq!(rounds, 2);
    for (i, o) in out.iter().enumerate() {
        if i == 1 {
            assert!(
                matches!(o, Outcome::Rejected { class, reason } if class == "amplitude_invalid_event" && reason.contains("`time`")),
                "{o:?}"
            );
        } else {
            assert_eq!(*o, Outcome::Delivered, "row {i}");
        }
    }
    assert_eq!(fake.exchanges()[0].status, 400);
    let want: Vec<&str> = vec![
        "Product Viewed",
        "$identify",
        "Order Completed",
        "webinar_registered",
    ];
    let got: Vec<String> = fake.accepted().into_iter().map(|a| a.name).collect();
    assert_eq!(got, want, "each other event exactly once");
}

#[tokio::test]
async fn a_throttled_user_waits_while_the_others_arrive_once() {
    let fake = switchyard_fakes::serve(Fake {
        max_events_per_window: 2,
        ..Fake::default()
    })
    .await
    .unwrap();
    let config = config(&fake.base_url(), KEY);
    let dest = config.destinations["amplitude"].vendor.build();
    let c = json!({"analytics": "granted"});
    let raw: Vec<Value> = (0..5)
        .map(|i| {
            let user = if i % 2 == 0 { "busy-user" } else { "calm-user" };
            json!({"event": "custom.clicked", "event_id": format!("t-{i}"), "occurred_at": ago(5),
                   "user_id": user, "consent": c})
        })
        .collect();
    let batch: Vec<Delivery> = raw
        .iter()
        .map(|r| routed(&config, "amplitude", r))
        .collect();
    let (out, _) = deliver_resending(dest.as_ref(), &reqwest::Client::new(), &batch, &|_| {}).await;
    assert_eq!(fake.exchanges()[0].status, 429);
    for (i, o) in out.iter().enumerate() {
        if i % 2 == 0 {
            assert!(
                matches!(o, Outcome::Retry { after: Some(a), .. } if a.as_secs() == 30),
                "row {i}: {o:?}"
            );
        } else {
            assert_eq!(*o, Outcome::Delivered, "row {i}");
        }
    }
    let want = vec![
        switchyard::destinations::amplitude::insert_id("t-1"),
        switchyard::destinations::amplitude::insert_id("t-3"),
    ];
    let mut want = want;
    want.sort_unstable();
    assert_eq!(insert_ids(&fake), want);
}

/// Sends `batch`, halving whatever Amplitude finds too large, as the sink
/// does with `Split`.
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
    let whole = {
        let c = config("http://127.0.0.1:9", KEY);
        let b = batch(&c, "amplitude");
        c.destinations["amplitude"].vendor.build().map(&b)[0]
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
    let dest = config.destinations["amplitude"].vendor.build();
    let batch = batch(&config, "amplitude");
    let (out, splits) = deliver_splitting(dest.as_ref(), &reqwest::Client::new(), &batch).await;
    assert!(splits >= 1, "the first request was too large");
    assert!(fake.exchanges().iter().any(|e| e.status == 413));
    assert_eq!(out, vec![Some(Outcome::Delivered); batch.len()]);
    let mut keys = insert_ids(&fake);
    assert_eq!(keys.len(), batch.len());
    keys.dedup();
    assert_eq!(keys.len(), batch.len(), "each event once");
}

#[tokio::test]
async fn a_wrong_key_is_rejected_as_auth_with_amplitudes_words() {
    let fake = switchyard_fakes::serve(Fake::default()).await.unwrap();
    let config = config(&fake.base_url(), "someone-elses-key");
    let dest = config.destinations["amplitude"].vendor.build();
    let batch = batch(&config, "amplitude");
    for o in deliver(dest.as_ref(), &reqwest::Client::new(), &batch).await {
        assert!(
            matches!(&o, Outcome::Rejected { class, reason } if class == "amplitude_auth" && reason.contains("Invalid API key")),
            "{o:?}"
        );
    }
    assert!(fake.accepted().is_empty());
}

#[test]
fn a_bad_min_id_length_or_no_region_is_a_config_error() {
    let text = r#"
[destinations.amplitude]
type = "amplitude"
api_key = "secret key"
min_id_length = 0
"#;
    let err = Config::parse(text, Path::new("amplitude.toml"), &|_| None)
        .unwrap_err()
        .to_string();
    for key in ["api_key", "min_id_length", "region"] {
        assert!(
            err.contains(&format!("destinations.amplitude.{key}")),
            "{err}"
        );
    }
    assert!(!err.contains("secret key"), "{err}");
}

/// The real sink over the broker: a 400 naming one event dead-letters that
/// event alone (after one attempt), and the others, resent without costing
/// an attempt, reach Amplitude exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_broker_the_named_event_is_dead_lettered_and_the_rest_arrive_once() {
    use switchyard::delivery::dead_letter::header;
    use switchyard::sink::dlq;

    let _watchdog = common::watchdog(
        "amplitude through the broker",
        std::time::Duration::from_secs(120),
    );
    let fake = switchyard_fakes::serve(Fake::default()).await.unwrap();
    let prefix = common::unique("amp");
    let name = common::unique("amp");
    let text = format!(
        r#"
[kafka]
brokers = "{brokers}"
guarantee = "at_least_once"

[topics]
prefix = "{prefix}"
canonical = "{prefix}.canonical"
partitions = 1

[metrics]
listen = "127.0.0.1:0"

[destinations.{name}]
type = "amplitude"
api_key = "{KEY}"
base_url = "{url}"

[destinations.{name}.delivery]
batch_max_events = 10
linger = "50ms"
"#,
        brokers = common::brokers(),
        url = fake.base_url(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = common::write_config(dir.path(), &text);
    let config = std::sync::Arc::new(Config::load(&path).unwrap());
    let sink = common::sink::start(&config).await;

    let tag = common::unique("ev");
    let mut deep = json!("bottom");
    for _ in 0..45 {
        deep = json!({ "k": deep });
    }
    let records: Vec<(Option<String>, Vec<u8>)> = (0..6)
        .map(|i| {
            let mut event = json!({
                "event": "purchase", "event_id": format!("{tag}-{i}"), "occurred_at": ago(3),
                "user_id": "user-42", "value": 10.0 + f64::from(i), "currency": "EUR"
            });
            if i == 2 {
                // Deeper than Amplitude takes: it names this event in a 400.
                event["properties"] = json!({ "nested": deep });
            }
            let d = json!({
                "v": 1, "destination": name, "name": "Order Completed", "event": event,
                "origin": {"topic": format!("{prefix}.canonical"), "partition": 0, "offset": i},
                "routed_at": ago(3)
            });
            (Some("user-42".to_string()), serde_json::to_vec(&d).unwrap())
        })
        .collect();
    common::kafka::produce(&common::brokers(), &config.topics.deliver(&name), &records).await;

    let others: Vec<String> = [0, 1, 3, 4, 5]
        .iter()
        .map(|i| switchyard::destinations::amplitude::insert_id(&format!("{tag}-{i}")))
        .collect();
    common::sink::wait_until(
        "the others delivered",
        std::time::Duration::from_secs(60),
        || insert_ids(&fake).len() >= others.len(),
    )
    .await;
    let mut letters = Vec::new();
    for _ in 0..100 {
        letters = dlq::read_all(&config, &common::brokers()).await.unwrap();
        if !letters.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // Time for any stray resend to arrive before the exact checks.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    sink.stop().await;

    let mut want = others.clone();
    want.sort_unstable();
    assert_eq!(insert_ids(&fake), want, "each other event exactly once");
    assert!(fake.exchanges().iter().any(|e| e.status == 400));
    assert_eq!(letters.len(), 1, "exactly the named event is dead-lettered");
    let l = &letters[0];
    let d: Delivery = serde_json::from_slice(&l.payload).unwrap();
    assert_eq!(d.event.event_id, format!("{tag}-2"));
    assert_eq!(l.error_class, "amplitude_invalid_event");
    let hdr = |k: &str| {
        l.headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    assert!(
        hdr(header::REASON).contains("event_properties"),
        "{}",
        hdr(header::REASON)
    );
    assert_eq!(hdr(header::ATTEMPTS), "1");
}
