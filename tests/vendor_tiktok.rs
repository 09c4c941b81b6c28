//! The TikTok Events API destination against the loopback TikTok fake: what
//! it maps is what TikTok takes, a resend is harmless, and every way TikTok
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
use switchyard_fakes::{Fake, Scripted, serve, tiktok};

use common::vendor::{classify, deliver, ranges, send, send_raw, throttle};

const PIXEL: &str = "CDEMO0000000001";

/// Raw contact data of the people in the batch: none of it may reach TikTok.
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
[destinations.tiktok]
type = "tiktok_events"
pixel_code = "{PIXEL}"
access_token = "${{TIKTOK_TOKEN}}"
base_url = "{base_url}"
test_event_code = "TEST42"
{extra}
"#
    );
    let env = |n: &str| (n == "TIKTOK_TOKEN").then(|| "demo-token".to_string());
    let config = Config::parse(&text, Path::new("vendor_tiktok.toml"), &env).expect("config");
    let d = &config.destinations["tiktok"];
    Dest {
        dest: d.vendor.build(),
        vendor: d.vendor.clone(),
    }
}

async fn fake() -> Fake {
    serve(tiktok::Settings::default())
        .await
        .expect("fake starts")
}

/// A delivery as the router makes it for TikTok: hashes by TikTok's rules
/// (plain email, E.164 phone), no raw contact fields, the preset name.
fn delivery(vendor: &Vendor, i: usize, event: &str, at: DateTime<Utc>) -> Delivery {
    let (email, phone) = PEOPLE[i % PEOPLE.len()];
    let name = EventName::parse(event).unwrap();
    let mut ev = json!({
        "event": event,
        "event_id": format!("evt-tt-{i:04}"),
        "occurred_at": at.to_rfc3339(),
        "user_id": format!("user-{}", i % PEOPLE.len()),
        "email_sha256": hash_email(email, false),
        "phone_sha256": hash_phone(phone, parse_country("US").unwrap(), PhoneFormat::E164),
        "external_ids": {"crm": format!("CRM-{i}")},
        "click_ids": {"ttclid": format!("E.C.P.Cq{i}"), "ttp": format!("2F7h37YkS1j57AYSKTI7IHhJ{i}")},
        "context": {"ip": "2001:db8::42", "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X)",
                    "page_url": format!("https://shop.example/p/{i}"), "referrer": "https://www.tiktok.com/",
                    "locale": "en-GB"}
    });
    if matches!(
        event,
        "purchase" | "add_to_cart" | "begin_checkout" | "view_content"
    ) {
        let o = ev.as_object_mut().unwrap();
        o.insert("value".into(), json!(9.5 * (i % 4 + 1) as f64));
        o.insert("currency".into(), json!(["EUR", "USD", "GBP"][i % 3]));
        o.insert(
            "items".into(),
            json!([{"id": format!("sku-{i}"), "name": "Wool socks", "quantity": i % 3 + 1, "price": 9.5}]),
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
        destination: "tiktok".into(),
        name: vendor
            .preset_name(&name)
            .expect("TikTok maps this event")
            .to_string(),
        event,
        origin: Origin {
            topic: "switchyard.deliver.tiktok".into(),
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
        assert!(
            !text.to_lowercase().contains(&email.trim().to_lowercase()),
            "raw email on the wire"
        );
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
    assert_eq!(
        dest.limits().max_event_age,
        Some(Duration::from_secs(7 * 86_400))
    );

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

    let first = &accepted
        .iter()
        .find(|a| a.key.as_deref() == Some("evt-tt-0000"))
        .unwrap()
        .payload;
    assert_eq!(first["event"], "CompletePayment");
    assert_eq!(
        first["user"]["email"].as_str(),
        hash_email(PEOPLE[0].0, false).as_deref()
    );
    assert_eq!(
        first["user"]["phone"].as_str(),
        hash_phone(PEOPLE[0].1, parse_country("US").unwrap(), PhoneFormat::E164).as_deref()
    );
    assert_eq!(first["user"]["ttclid"], "E.C.P.Cq0");
    assert_eq!(first["page"]["referrer"], "https://www.tiktok.com/");
    assert_eq!(first["properties"]["contents"][0]["content_id"], "sku-0");
    assert_eq!(first["properties"]["order_id"], "order-0");

    for x in fake.exchanges() {
        assert_no_raw_contact(&x.request.body);
        let body: Value = serde_json::from_slice(&x.request.body).unwrap();
        assert_eq!(body["test_event_code"], "TEST42");
        assert_eq!(body["event_source"], "web");
        assert_eq!(body["event_source_id"], PIXEL);
    }

    // A resend is answered OK and recorded once.
    let again = deliver(dest.as_ref(), &http, &batch).await;
    assert!(again.iter().all(|o| *o == Outcome::Delivered), "{again:?}");
    assert_eq!(fake.accepted().len(), batch.len());
}

#[tokio::test]
async fn large_batches_are_split_at_the_event_limit() {
    let fake = fake().await;
    let Dest { dest, vendor } = destination(&fake.base_url(), "");
    let http = reqwest::Client::new();
    let batch = batch(&vendor, 1500);
    let reqs = dest.map(&batch);
    assert_eq!(ranges(&reqs), vec![0..1000, 1000..1500]);
    let outcomes = deliver(dest.as_ref(), &http, &batch).await;
    assert!(outcomes.iter().all(|o| *o == Outcome::Delivered));
    assert_eq!(fake.accepted().len(), 1500);
}

type Mutation = Box<dyn Fn(&mut String, &mut Vec<(String, String)>, &mut Value)>;

#[tokio::test]
async fn broken_requests_are_answered_and_classified_the_way_tiktok_does() {
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
    // (what, mutation, expected body code, expected class of the rejection)
    let cases: Vec<(&str, Mutation, i64, &str)> = vec![
        (
            "bad token",
            Box::new(move |_, h, _| set_header(h, "Access-Token", "not-the-token")),
            tiktok::TOKEN_INVALID,
            "auth",
        ),
        (
            "no token",
            Box::new(|_, h, _| h.retain(|(k, _)| k != "Access-Token")),
            tiktok::TOKEN_MISSING,
            "auth",
        ),
        (
            "unhashed email",
            Box::new(|_, _, b| b["data"][0]["user"]["email"] = json!("ada.lovelace@example.com")),
            tiktok::INVALID_PARAMETER,
            "invalid_parameter",
        ),
        (
            "missing event",
            Box::new(|_, _, b| {
                b["data"][0].as_object_mut().unwrap().remove("event");
            }),
            tiktok::INVALID_PARAMETER,
            "invalid_parameter",
        ),
        (
            "bad event_source",
            Box::new(|_, _, b| b["event_source"] = json!("website")),
            tiktok::INVALID_PARAMETER,
            "invalid_parameter",
        ),
        (
            "too many events",
            Box::new(|_, _, b| {
                let e = b["data"][0].clone();
                b["data"] = Value::Array(vec![e; 1001]);
            }),
            tiktok::INVALID_PARAMETER,
            "invalid_parameter",
        ),
        (
            "event_time older than 7 days",
            Box::new(|_, _, b| {
                b["data"][0]["event_time"] =
                    json!((Utc::now() - chrono::Duration::days(8)).timestamp())
            }),
            tiktok::INVALID_PARAMETER,
            "invalid_parameter",
        ),
        (
            "wrong pixel",
            Box::new(|_, _, b| b["event_source_id"] = json!("COTHER000000001")),
            tiktok::NO_PERMISSION,
            "permission",
        ),
    ];
    for (what, mutate, code, class) in cases {
        let mut url = base.url.clone();
        let mut headers = base.headers.clone();
        let mut body = base_body.clone();
        mutate(&mut url, &mut headers, &mut body);
        let resp = send_raw(&http, &url, &headers, serde_json::to_vec(&body).unwrap()).await;
        assert_eq!(resp.status, 200, "{what}: TikTok answers 200 with a code");
        let answer: Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(answer["code"], code, "{what}: {answer}");
        assert!(answer["request_id"].is_string(), "{what}");
        let outcomes = classify(dest.as_ref(), &resp, &one);
        assert!(
            matches!(&outcomes[0], Outcome::Rejected { class: c, reason } if c == class && reason.contains(answer["message"].as_str().unwrap())),
            "{what}: {:?}",
            outcomes[0]
        );
        assert!(!throttle(dest.as_ref(), &resp, &one), "{what}");
    }

    // An API version the endpoint does not serve.
    let resp = send_raw(
        &http,
        &base.url.replace("/v1.3/", "/v9.9/"),
        &base.headers,
        base.body.clone(),
    )
    .await;
    assert_eq!(resp.status, 404);
    assert!(
        matches!(&classify(dest.as_ref(), &resp, &one)[0], Outcome::Rejected { class, .. } if class == "http_404")
    );
    assert!(fake.accepted().is_empty(), "nothing broken was taken");

    // Throttles and server faults, scripted with TikTok's bodies.
    fake.script([
        Scripted {
            status: 200,
            headers: vec![],
            body: r#"{"code":40100,"message":"Too many requests. Please retry in some time.","request_id":"202611261410000001","data":{}}"#.into(),
        },
        Scripted {
            status: 200,
            headers: vec![],
            body: r#"{"code":50000,"message":"System error","request_id":"202611261410000002","data":{}}"#.into(),
        },
        Scripted {
            status: 429,
            headers: vec![("Retry-After".into(), "7".into())],
            body: String::new(),
        },
    ]);
    let expect = [
        (true, None),
        (false, None),
        (true, Some(Duration::from_secs(7))),
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
    let resp = send(&http, &base).await;
    assert_eq!(
        classify(dest.as_ref(), &resp, &one),
        vec![Outcome::Delivered]
    );
    assert_eq!(fake.accepted().len(), 1);
}

#[tokio::test]
async fn a_future_or_unhashed_event_is_refused_before_it_fails_a_request() {
    let fake = fake().await;
    let Dest { dest, vendor } = destination(&fake.base_url(), "");
    let http = reqwest::Client::new();
    let good = delivery(
        &vendor,
        0,
        "lead",
        Utc::now() - chrono::Duration::minutes(5),
    );
    let future = delivery(&vendor, 1, "lead", Utc::now() + chrono::Duration::hours(2));
    let mut unhashed = delivery(&vendor, 2, "lead", Utc::now());
    unhashed.event.email_sha256 = Some("linus@example.net".into());
    assert_eq!(dest.refuse(&future).unwrap().class, "future_event_time");
    assert_eq!(dest.refuse(&unhashed).unwrap().class, "unhashed_identifier");
    // The mapping never puts a non-hash where a hash belongs.
    let body = dest.map(std::slice::from_ref(&unhashed)).remove(0).body;
    assert!(!String::from_utf8_lossy(&body).contains("linus@"));
    // Sent anyway, the future event fails the request for both.
    let outcomes = deliver(dest.as_ref(), &http, &[good.clone(), future]).await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Rejected { class, .. } if class == "invalid_parameter")),
        "{outcomes:?}"
    );
    assert!(fake.accepted().is_empty());
    assert_eq!(
        deliver(dest.as_ref(), &http, &[good]).await,
        vec![Outcome::Delivered]
    );
}
