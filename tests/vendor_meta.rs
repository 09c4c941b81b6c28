//! The Meta Conversions API destination against the loopback Meta fake:
//! what it maps is what Meta takes, a resend is harmless, and every way Meta
//! refuses a request is classified the way it should be. No Kafka needed.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use switchyard::config::Config;
use switchyard::delivery::{DELIVERY_VERSION, Delivery, Origin};
use switchyard::destinations::Vendor;
use switchyard::event::normalize::{PhoneFormat, hash_email, hash_phone, parse_country};
use switchyard::event::{CanonicalEvent, EventName};
use switchyard::sink::destination::{Destination, Outcome};
use switchyard_fakes::{Fake, Scripted, meta, serve};

use common::vendor::{classify, deliver, ranges, send, send_raw, throttle};

const PIXEL: &str = "100000000000001";

/// Raw contact data of the people in the batch: none of it may reach Meta.
const PEOPLE: &[(&str, &str)] = &[
    ("Ada.Lovelace@Example.com ", "+1 650 253 0000"),
    ("grace@example.org", "+44 20 7946 0958"),
    ("linus@example.net", "+49 30 901820"),
];

struct Dest {
    dest: Arc<dyn Destination>,
    vendor: Vendor,
}

fn destination(base_url: &str, extra: &str) -> Dest {
    let text = format!(
        r#"
[destinations.meta]
type = "meta_capi"
pixel_id = "{PIXEL}"
access_token = "${{META_TOKEN}}"
base_url = "{base_url}"
test_event_code = "TEST123"
{extra}
"#
    );
    let env = |n: &str| (n == "META_TOKEN").then(|| "demo-token".to_string());
    let config = Config::parse(&text, Path::new("vendor_meta.toml"), &env).expect("config");
    let d = &config.destinations["meta"];
    Dest {
        dest: d.vendor.build(),
        vendor: d.vendor.clone(),
    }
}

async fn fake() -> Fake {
    // Insisting on a hashed external_id checks that switchyard hashes it.
    serve(meta::Settings {
        require_hashed_external_id: true,
        ..meta::Settings::default()
    })
    .await
    .expect("fake starts")
}

/// A delivery as the router makes it for Meta: hashes by Meta's rules, no
/// raw contact fields, the vendor name from the presets.
fn delivery(vendor: &Vendor, i: usize, event: &str, at: DateTime<Utc>) -> Delivery {
    let (email, phone) = PEOPLE[i % PEOPLE.len()];
    let name = EventName::parse(event).unwrap();
    let mut ev = json!({
        "event": event,
        "event_id": format!("evt-meta-{i:04}"),
        "occurred_at": at.to_rfc3339(),
        "user_id": format!("user-{}", i % PEOPLE.len()),
        "email_sha256": hash_email(email, false),
        "phone_sha256": hash_phone(phone, parse_country("US").unwrap(), PhoneFormat::DigitsOnly),
        "external_ids": {"crm": format!("CRM-{i}")},
        "click_ids": {"fbc": format!("fb.1.1764100000000.IwAR{i}"), "fbp": format!("fb.1.1764100000000.{i}")},
        "context": {"ip": "203.0.113.9", "user_agent": "Mozilla/5.0 (X11; Linux x86_64)",
                    "page_url": format!("https://shop.example/p/{i}"), "referrer": "https://www.example.com/"}
    });
    if matches!(
        event,
        "purchase" | "add_to_cart" | "begin_checkout" | "view_content"
    ) {
        let o = ev.as_object_mut().unwrap();
        o.insert("value".into(), json!(19.99 * (i % 4 + 1) as f64));
        o.insert("currency".into(), json!(["EUR", "USD", "GBP"][i % 3]));
        o.insert(
            "items".into(),
            json!([{"id": format!("sku-{i}"), "quantity": i % 3 + 1, "price": 19.99}]),
        );
        if event == "purchase" {
            o.insert("order_id".into(), json!(format!("order-{i}")));
        }
    }
    if event == "search" {
        ev["properties"] = json!({"query": "wool socks"});
    }
    let event: CanonicalEvent = serde_json::from_value(ev).unwrap();
    Delivery {
        v: DELIVERY_VERSION,
        destination: "meta".into(),
        name: vendor
            .preset_name(&name)
            .expect("Meta maps this event")
            .to_string(),
        event,
        origin: Origin {
            topic: "switchyard.deliver.meta".into(),
            partition: 0,
            offset: i as i64,
        },
        routed_at: Utc::now(),
    }
}

fn batch(vendor: &Vendor, n: usize) -> Vec<Delivery> {
    let names = [
        "purchase",
        "lead",
        "sign_up",
        "add_to_cart",
        "view_content",
        "begin_checkout",
        "start_trial",
        "subscribe",
        "search",
    ];
    let now = Utc::now();
    (0..n)
        .map(|i| {
            let at = now - chrono::Duration::minutes((i % 90) as i64 + 1);
            delivery(vendor, i, names[i % names.len()], at)
        })
        .collect()
}

fn assert_no_raw_contact(body: &[u8]) {
    let text = String::from_utf8_lossy(body);
    for (email, phone) in PEOPLE {
        assert!(!text.contains(email.trim()), "raw email on the wire");
        assert!(!text.to_lowercase().contains(&email.trim().to_lowercase()));
        let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
        assert!(!text.contains(&digits), "raw phone on the wire");
        assert!(!text.contains(phone));
    }
    assert!(!text.contains('@'));
    assert!(!text.contains("CRM-"), "external ids are hashed");
}

#[tokio::test]
async fn a_batch_is_delivered_once_and_a_resend_is_harmless() {
    let fake = fake().await;
    let Dest { dest, vendor } = destination(&fake.base_url(), "");
    let http = reqwest::Client::new();
    let batch = batch(&vendor, 24);
    for d in &batch {
        assert_eq!(dest.refuse(d), None, "{}", d.event.event_id);
    }
    assert!(dest.vendor_dedup());

    let outcomes = deliver(dest.as_ref(), &http, &batch).await;
    assert!(
        outcomes.iter().all(|o| *o == Outcome::Delivered),
        "{outcomes:?}"
    );

    let accepted = fake.accepted();
    let got: BTreeMap<String, (String, Option<f64>, Option<String>)> = accepted
        .iter()
        .map(|a| {
            (
                a.key.clone().unwrap(),
                (a.name.clone(), a.value, a.currency.clone()),
            )
        })
        .collect();
    let want: BTreeMap<String, (String, Option<f64>, Option<String>)> = batch
        .iter()
        .map(|d| {
            (
                d.event.event_id.clone(),
                (d.name.clone(), d.event.value, d.event.currency.clone()),
            )
        })
        .collect();
    assert_eq!(accepted.len(), batch.len());
    assert_eq!(got, want);

    // What Meta took carries the hashes and click ids of the event.
    let first = &accepted
        .iter()
        .find(|a| a.key.as_deref() == Some("evt-meta-0000"))
        .unwrap()
        .payload;
    assert_eq!(first["event_name"], "Purchase");
    assert_eq!(
        first["user_data"]["em"][0].as_str(),
        hash_email(PEOPLE[0].0, false).as_deref()
    );
    assert_eq!(first["user_data"]["fbc"], "fb.1.1764100000000.IwAR0");
    assert_eq!(first["custom_data"]["contents"][0]["id"], "sku-0");
    assert_eq!(first["custom_data"]["order_id"], "order-0");

    for x in fake.exchanges() {
        assert_no_raw_contact(&x.request.body);
        let body: Value = serde_json::from_slice(&x.request.body).unwrap();
        assert_eq!(body["test_event_code"], "TEST123");
        assert!(
            x.request.query.is_empty(),
            "the token travels in a header by default"
        );
    }

    // A resend (a retry after a lost answer) is answered the same and recorded once.
    let again = deliver(dest.as_ref(), &http, &batch).await;
    assert!(again.iter().all(|o| *o == Outcome::Delivered), "{again:?}");
    assert_eq!(fake.accepted().len(), batch.len());
    let last: Value = serde_json::from_slice(&fake.exchanges().last().unwrap().response).unwrap();
    assert_eq!(last["events_received"], batch.len());
}

#[tokio::test]
async fn token_in_the_query_and_limited_data_use_are_accepted() {
    let fake = fake().await;
    let Dest { dest, vendor } = destination(
        &fake.base_url(),
        "access_token_in = \"query\"\ndata_processing_options = [\"LDU\"]\ndata_processing_options_country = 1\ndata_processing_options_state = 1000",
    );
    let http = reqwest::Client::new();
    let batch = batch(&vendor, 3);
    let outcomes = deliver(dest.as_ref(), &http, &batch).await;
    assert!(
        outcomes.iter().all(|o| *o == Outcome::Delivered),
        "{outcomes:?}"
    );
    let x = &fake.exchanges()[0];
    assert_eq!(x.request.query("access_token"), Some("demo-token"));
    assert_eq!(
        fake.accepted()[0].payload["data_processing_options"],
        json!(["LDU"])
    );
}

#[tokio::test]
async fn large_batches_are_split_at_the_event_limit() {
    let fake = fake().await;
    let Dest { dest, vendor } = destination(&fake.base_url(), "");
    let http = reqwest::Client::new();
    let batch = batch(&vendor, 2101);
    let reqs = dest.map(&batch);
    assert_eq!(ranges(&reqs), vec![0..1000, 1000..2000, 2000..2101]);
    let outcomes = deliver(dest.as_ref(), &http, &batch).await;
    assert!(outcomes.iter().all(|o| *o == Outcome::Delivered));
    assert_eq!(fake.accepted().len(), 2101);
}

#[tokio::test]
async fn an_event_meta_would_refuse_is_refused_before_it_fails_a_request() {
    let fake = fake().await;
    let Dest { dest, vendor } = destination(&fake.base_url(), "");
    let http = reqwest::Client::new();
    let good = delivery(
        &vendor,
        0,
        "lead",
        Utc::now() - chrono::Duration::minutes(5),
    );
    let mut bad = delivery(
        &vendor,
        1,
        "lead",
        Utc::now() - chrono::Duration::minutes(5),
    );
    bad.event.context.as_mut().unwrap().page_url = None;
    let refusal = dest.refuse(&bad).expect("refused");
    assert_eq!(refusal.class, "missing_field");
    assert!(
        refusal.reason.contains("event_source_url"),
        "{}",
        refusal.reason
    );

    // Sent anyway, Meta fails the request for both.
    let outcomes = deliver(dest.as_ref(), &http, &[good.clone(), bad]).await;
    for o in &outcomes {
        assert!(
            matches!(o, Outcome::Rejected { class, reason } if class == "invalid_parameter" && reason.contains("event_source_url")),
            "{o:?}"
        );
    }
    assert!(fake.accepted().is_empty());
    // Alone, the good one goes through.
    assert_eq!(
        deliver(dest.as_ref(), &http, &[good]).await,
        vec![Outcome::Delivered]
    );
}

type Mutation = Box<dyn Fn(&mut String, &mut Vec<(String, String)>, &mut Value)>;

#[tokio::test]
async fn broken_requests_are_answered_and_classified_the_way_meta_does() {
    let fake = fake().await;
    let Dest { dest, vendor } = destination(&fake.base_url(), "");
    let http = reqwest::Client::new();
    let one = vec![delivery(
        &vendor,
        0,
        "purchase",
        Utc::now() - chrono::Duration::minutes(3),
    )];
    let base = dest.map(&one).remove(0);
    let base_body: Value = serde_json::from_slice(&base.body).unwrap();

    let set_header = |h: &mut Vec<(String, String)>, k: &str, v: &str| {
        h.retain(|(name, _)| !name.eq_ignore_ascii_case(k));
        h.push((k.to_string(), v.to_string()));
    };
    // (what, mutation, expected class of the rejection)
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "bad token",
            Box::new(move |_, h, _| set_header(h, "Authorization", "Bearer not-the-token")),
            "auth",
        ),
        (
            "unhashed email",
            Box::new(|_, _, b| {
                b["data"][0]["user_data"]["em"] = json!(["ada.lovelace@example.com"])
            }),
            "invalid_parameter",
        ),
        (
            "missing event_name",
            Box::new(|_, _, b| {
                b["data"][0].as_object_mut().unwrap().remove("event_name");
            }),
            "invalid_parameter",
        ),
        (
            "bad action_source",
            Box::new(|_, _, b| b["data"][0]["action_source"] = json!("web")),
            "invalid_parameter",
        ),
        (
            "too many events",
            Box::new(|_, _, b| {
                let e = b["data"][0].clone();
                b["data"] = Value::Array(vec![e; 1001]);
            }),
            "invalid_parameter",
        ),
        (
            "event_time older than 7 days",
            Box::new(|_, _, b| {
                b["data"][0]["event_time"] =
                    json!((Utc::now() - chrono::Duration::days(8)).timestamp())
            }),
            "expired",
        ),
        (
            "wrong pixel",
            Box::new(|u, _, _| *u = u.replace(PIXEL, "100000000000999")),
            "unknown_pixel",
        ),
        (
            "retired API version",
            Box::new(|u, _, _| *u = u.replace("/v21.0/", "/v12.0/")),
            "api_version",
        ),
    ];
    for (what, mutate, class) in cases {
        let mut url = base.url.clone();
        let mut headers = base.headers.clone();
        let mut body = base_body.clone();
        mutate(&mut url, &mut headers, &mut body);
        let resp = send_raw(&http, &url, &headers, serde_json::to_vec(&body).unwrap()).await;
        assert!(resp.status >= 400, "{what}: HTTP {}", resp.status);
        let err: Value = serde_json::from_slice(&resp.body).unwrap();
        assert!(err["error"]["code"].is_i64(), "{what}: {err}");
        assert!(err["error"]["fbtrace_id"].is_string(), "{what}: {err}");
        let outcomes = classify(dest.as_ref(), &resp, &one);
        assert!(
            matches!(&outcomes[0], Outcome::Rejected { class: c, reason } if c == class && reason.contains(err["error"]["message"].as_str().unwrap())),
            "{what}: {:?}",
            outcomes[0]
        );
        assert!(!throttle(dest.as_ref(), &resp, &one), "{what}");
    }
    assert!(fake.accepted().is_empty(), "nothing broken was taken");

    // Throttles and transient faults, scripted with Meta's bodies.
    fake.script([
        Scripted {
            status: 400,
            headers: vec![],
            body: r#"{"error":{"message":"(#17) User request limit reached","type":"OAuthException","code":17,"error_subcode":2446079,"is_transient":true,"fbtrace_id":"AxT1"}}"#.into(),
        },
        Scripted {
            status: 403,
            headers: vec![("Retry-After".into(), "20".into())],
            body: r#"{"error":{"message":"(#80003) There have been too many calls to this ad-account.","type":"OAuthException","code":80003,"fbtrace_id":"AxT2"}}"#.into(),
        },
        Scripted {
            status: 500,
            headers: vec![],
            body: r#"{"error":{"message":"Service temporarily unavailable","type":"OAuthException","code":2,"is_transient":true,"fbtrace_id":"AxT3"}}"#.into(),
        },
    ]);
    let expect = [
        (true, None),
        (true, Some(Duration::from_secs(20))),
        (false, None),
    ];
    for (throttled, after) in expect {
        let resp = send(&http, &base).await;
        assert!(
            throttle(dest.as_ref(), &resp, &one) == throttled,
            "{:?}",
            String::from_utf8_lossy(&resp.body)
        );
        let o = classify(dest.as_ref(), &resp, &one);
        assert!(
            matches!(&o[0], Outcome::Retry { after: a, .. } if *a == after),
            "{:?}",
            o[0]
        );
    }
    assert!(fake.accepted().is_empty());
    // After the storm the same request goes through.
    let resp = send(&http, &base).await;
    assert_eq!(
        classify(dest.as_ref(), &resp, &one),
        vec![Outcome::Delivered]
    );
    assert_eq!(fake.accepted().len(), 1);
}
