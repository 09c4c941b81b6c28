//! The Google Ads destination against its loopback fake (no Kafka): events
//! routed and PII-shaped by the router's own code, mapped, sent over HTTP,
//! and the fake's answers classified per event.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use chrono::{Duration, Utc};
use serde_json::{Value, json};
use switchyard::config::Config;
use switchyard::delivery::Delivery;
use switchyard::sink::destination::{Outcome, Request};
use switchyard_fakes::google_ads::Settings as Fake;

use common::vendor::{classify, deliver, deliver_tampered, routed, send, throttle};

const EMAILS: &[&str] = &[
    "Jane.Doe@Gmail.com",
    "buyer@example.com",
    "lead@example.org",
];
const PHONES: &[&str] = &["+1 650 253 0000", "+44 20 7946 0958"];

fn config(base_url: &str, extra: &str) -> Config {
    let text = format!(
        r#"
[destinations.gads]
type = "google_ads"
customer_id = "123-456-7890"
developer_token = "demo-token"
access_token = "demo-token"
conversion_actions = {{ purchase = "1001", lead = "1002", sign_up = "1003" }}
base_url = "{base_url}"
{extra}
"#
    );
    Config::parse(&text, Path::new("gads.toml"), &|_| None).expect("config parses")
}

fn ago(minutes: i64) -> String {
    (Utc::now() - Duration::minutes(minutes)).to_rfc3339()
}

/// A realistic mix: purchases by gclid and iOS braids, a lead known only by
/// its hashed contact data, a sign-up, a purchase without an order id.
fn batch(config: &Config) -> Vec<Delivery> {
    let consent = json!({"ads": "granted", "ad_personalization": "denied", "analytics": "granted"});
    let raws = [
        json!({"event": "purchase", "event_id": "ev-1", "occurred_at": ago(90), "user_id": "u-1",
               "email": EMAILS[0], "phone": PHONES[0], "value": 120.0, "currency": "EUR", "order_id": "ord-1",
               "click_ids": {"gclid": "Cj0KCQ-gclid-1"}, "consent": consent,
               "items": [{"id": "sku-1", "price": 60.0, "quantity": 2}]}),
        json!({"event": "purchase", "event_id": "ev-2", "occurred_at": ago(80), "user_id": "u-2",
               "email": EMAILS[1], "value": 15.5, "currency": "USD", "order_id": "ord-2",
               "click_ids": {"gbraid": "gbraid-2"}, "consent": consent}),
        json!({"event": "lead", "event_id": "ev-3", "occurred_at": ago(70), "anonymous_id": "anon-3",
               "email": EMAILS[2], "phone": PHONES[1], "consent": consent}),
        json!({"event": "sign_up", "event_id": "ev-4", "occurred_at": ago(60), "user_id": "u-4",
               "click_ids": {"wbraid": "wbraid-4"}, "consent": consent}),
        json!({"event": "purchase", "event_id": "ev-5", "occurred_at": ago(50), "user_id": "u-5",
               "email": EMAILS[1], "value": 9.99, "currency": "GBP",
               "click_ids": {"gclid": "Cj0KCQ-gclid-5", "wbraid": "wbraid-5"}, "consent": consent}),
    ];
    raws.iter().map(|r| routed(config, "gads", r)).collect()
}

fn no_raw_contact(bodies: &[Vec<u8>]) {
    for b in bodies {
        let text = String::from_utf8_lossy(b).to_lowercase();
        for e in EMAILS {
            assert!(!text.contains(&e.to_lowercase()), "raw email in {text}");
        }
        assert!(!text.contains('@'), "an address in {text}");
        for p in PHONES {
            let digits: String = p.chars().filter(char::is_ascii_digit).collect();
            assert!(!text.contains(&digits), "raw phone in {text}");
        }
    }
}

#[tokio::test]
async fn batch_is_delivered_once_and_resends_are_already_there() {
    let fake = switchyard_fakes::serve(Fake::default()).await.unwrap();
    let config = config(&fake.base_url(), "");
    let dest = config.destinations["gads"].vendor.build();
    assert!(dest.vendor_dedup());
    let batch = batch(&config);
    for d in &batch {
        assert_eq!(dest.refuse(d), None, "{}", d.event.event_id);
    }

    let outcomes = deliver(dest.as_ref(), &reqwest::Client::new(), &batch).await;
    assert_eq!(outcomes, vec![Outcome::Delivered; batch.len()]);
    let accepted = fake.accepted();
    let keys: BTreeSet<String> = accepted.iter().filter_map(|a| a.key.clone()).collect();
    let want: BTreeSet<String> = ["ord-1", "ord-2", "ev-3", "ev-4", "ev-5"]
        .map(String::from)
        .into();
    assert_eq!(keys, want);
    assert_eq!(accepted.len(), batch.len());
    let action = |id: &str| format!("customers/1234567890/conversionActions/{id}");
    for a in &accepted {
        let want_action = match a.key.as_deref() {
            Some("ev-3") => action("1002"),
            Some("ev-4") => action("1003"),
            _ => action("1001"),
        };
        assert_eq!(a.name, want_action);
    }
    let ord1 = accepted
        .iter()
        .find(|a| a.key.as_deref() == Some("ord-1"))
        .unwrap();
    assert_eq!(
        (ord1.value, ord1.currency.as_deref()),
        (Some(120.0), Some("EUR"))
    );
    assert_eq!(ord1.payload["consent"]["adUserData"], "GRANTED");
    assert_eq!(ord1.payload["consent"]["adPersonalization"], "DENIED");
    assert_eq!(
        ord1.payload["userIdentifiers"].as_array().unwrap().len(),
        2,
        "hashed email and phone"
    );
    let ev5 = accepted
        .iter()
        .find(|a| a.key.as_deref() == Some("ev-5"))
        .unwrap();
    assert_eq!(ev5.payload["gclid"], "Cj0KCQ-gclid-5");
    assert!(ev5.payload.get("wbraid").is_none(), "one click id only");
    let lead = accepted
        .iter()
        .find(|a| a.key.as_deref() == Some("ev-3"))
        .unwrap();
    assert!(lead.payload.get("gclid").is_none());

    // A resend (a retry after a lost answer, a replay) is "already there".
    let again = deliver(dest.as_ref(), &reqwest::Client::new(), &batch).await;
    assert_eq!(again, vec![Outcome::Delivered; batch.len()]);
    assert_eq!(fake.accepted().len(), batch.len(), "nothing counted twice");
    let last = fake.exchanges().pop().unwrap();
    assert!(
        String::from_utf8_lossy(&last.response).contains("ORDER_ID_ALREADY_IN_USE"),
        "the fake says why"
    );

    let bodies: Vec<Vec<u8>> = fake
        .exchanges()
        .iter()
        .map(|e| e.request.body.clone())
        .collect();
    no_raw_contact(&bodies);
}

#[derive(Debug)]
enum Want {
    Delivered,
    Rejected(&'static str),
    Retry,
}

fn check(case: &str, got: &[Outcome], want: &[Want]) {
    assert_eq!(got.len(), want.len(), "{case}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = match (g, w) {
            (Outcome::Delivered, Want::Delivered) => true,
            (Outcome::Rejected { class, .. }, Want::Rejected(c)) => class == c,
            (Outcome::Retry { .. }, Want::Retry) => true,
            _ => false,
        };
        assert!(ok, "{case}: event {i}: got {g:?}, want {w:?}");
    }
}

fn body_edit(f: impl Fn(&mut Value) + 'static) -> Box<dyn Fn(&mut Request)> {
    Box::new(move |r: &mut Request| {
        let mut b: Value = serde_json::from_slice(&r.body).unwrap();
        f(&mut b);
        r.body = serde_json::to_vec(&b).unwrap();
    })
}

fn header_edit(name: &'static str, value: Option<&'static str>) -> Box<dyn Fn(&mut Request)> {
    Box::new(move |r: &mut Request| {
        r.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        if let Some(v) = value {
            r.headers.push((name.to_string(), v.to_string()));
        }
    })
}

struct Case {
    name: &'static str,
    fake: Fake,
    extra_config: &'static str,
    tamper: Box<dyn Fn(&mut Request)>,
    want: Vec<Want>,
}

#[tokio::test]
async fn broken_requests_get_googles_answers_and_per_event_outcomes() {
    use Want::*;
    let five = || vec![Delivered, Delivered, Delivered, Delivered, Delivered];
    let all = |w: fn() -> Want| (0..5).map(|_| w()).collect::<Vec<_>>();
    let cases = vec![
        Case {
            name: "control: nothing broken",
            fake: Fake::default(),
            extra_config: "",
            tamper: Box::new(|_| {}),
            want: five(),
        },
        Case {
            name: "bad access token",
            fake: Fake::default(),
            extra_config: "",
            tamper: header_edit("Authorization", Some("Bearer expired-token")),
            want: all(|| Rejected("google_ads_auth")),
        },
        Case {
            name: "missing developer token",
            fake: Fake::default(),
            extra_config: "",
            tamper: header_edit("developer-token", None),
            want: all(|| Rejected("google_ads_developer_token_parameter_missing")),
        },
        Case {
            name: "wrong developer token",
            fake: Fake {
                developer_token: "another-token".into(),
                ..Fake::default()
            },
            extra_config: "",
            tamper: Box::new(|_| {}),
            want: all(|| Rejected("google_ads_auth")),
        },
        Case {
            name: "unhashed email in row 0",
            fake: Fake::default(),
            extra_config: "",
            tamper: body_edit(|b| {
                b["conversions"][0]["userIdentifiers"][0] =
                    json!({"hashedEmail": "jane.doe@gmail.com"});
            }),
            want: vec![
                Rejected("google_ads_invalid_user_identifier"),
                Delivered,
                Delivered,
                Delivered,
                Delivered,
            ],
        },
        Case {
            name: "two click ids in row 1",
            fake: Fake::default(),
            extra_config: "",
            tamper: body_edit(|b| b["conversions"][1]["wbraid"] = json!("wbraid-x")),
            want: vec![
                Delivered,
                Rejected("google_ads_gbraid_wbraid_both_set"),
                Delivered,
                Delivered,
                Delivered,
            ],
        },
        Case {
            name: "ISO date time in row 2, future date in row 3",
            fake: Fake::default(),
            extra_config: "",
            tamper: body_edit(|b| {
                b["conversions"][2]["conversionDateTime"] = json!("2026-01-02T03:04:05Z");
                let later = (Utc::now() + Duration::days(2)).format("%Y-%m-%d %H:%M:%S+00:00");
                b["conversions"][3]["conversionDateTime"] = json!(later.to_string());
            }),
            want: vec![
                Delivered,
                Delivered,
                Rejected("google_ads_invalid_string_date_time_seconds_with_offset"),
                Rejected("google_ads_later_than_maximum_date"),
                Delivered,
            ],
        },
        Case {
            name: "unknown conversion action for purchases",
            fake: Fake::default(),
            extra_config: "",
            tamper: body_edit(|b| {
                for c in b["conversions"].as_array_mut().unwrap() {
                    if c["conversionAction"] == "customers/1234567890/conversionActions/1001" {
                        c["conversionAction"] =
                            json!("customers/1234567890/conversionActions/4242");
                    }
                }
            }),
            want: vec![
                Rejected("google_ads_no_conversion_action_found"),
                Rejected("google_ads_no_conversion_action_found"),
                Delivered,
                Delivered,
                Rejected("google_ads_no_conversion_action_found"),
            ],
        },
        Case {
            name: "one order twice in a request (map never sends this): both resent",
            fake: Fake::default(),
            extra_config: "",
            tamper: body_edit(|b| b["conversions"][1]["orderId"] = json!("ord-1")),
            want: vec![Retry, Retry, Delivered, Delivered, Delivered],
        },
        Case {
            name: "too many conversions for the vendor",
            fake: Fake {
                max_conversions: 4,
                ..Fake::default()
            },
            extra_config: "",
            tamper: Box::new(|_| {}),
            want: all(|| Rejected("google_ads_too_many_conversions_in_request")),
        },
        Case {
            name: "leads without click need enhanced conversions for leads",
            fake: Fake {
                enhanced_conversions_for_leads: false,
                ..Fake::default()
            },
            extra_config: "",
            tamper: Box::new(|_| {}),
            want: vec![
                Delivered,
                Delivered,
                Rejected("google_ads_customer_not_enabled_enhanced_conversions_for_leads"),
                Delivered,
                Delivered,
            ],
        },
        Case {
            name: "manager account header",
            fake: Fake {
                login_customer_id: Some("5555555555".into()),
                ..Fake::default()
            },
            extra_config: "login_customer_id = \"555-555-5555\"",
            tamper: Box::new(|_| {}),
            want: five(),
        },
        Case {
            name: "manager account header missing",
            fake: Fake {
                login_customer_id: Some("5555555555".into()),
                ..Fake::default()
            },
            extra_config: "",
            tamper: Box::new(|_| {}),
            want: all(|| Rejected("google_ads_auth")),
        },
        Case {
            name: "local time zone offset",
            fake: Fake::default(),
            extra_config: "time_zone_offset = \"-08:00\"",
            tamper: Box::new(|_| {}),
            want: five(),
        },
    ];
    for case in cases {
        let fake = switchyard_fakes::serve(case.fake).await.unwrap();
        let config = config(&fake.base_url(), case.extra_config);
        let dest = config.destinations["gads"].vendor.build();
        let batch = batch(&config);
        let got = deliver_tampered(
            dest.as_ref(),
            &reqwest::Client::new(),
            &batch,
            case.tamper.as_ref(),
        )
        .await;
        check(case.name, &got, &case.want);
        let delivered = case
            .want
            .iter()
            .filter(|w| matches!(w, Want::Delivered))
            .count();
        assert_eq!(fake.accepted().len(), delivered, "{}", case.name);
    }
}

#[tokio::test]
async fn throttling_and_outages_are_retried() {
    let fake = switchyard_fakes::serve(Fake::default()).await.unwrap();
    let config = config(&fake.base_url(), "");
    let dest = config.destinations["gads"].vendor.build();
    let batch = batch(&config);
    fake.script([
        switchyard_fakes::Scripted {
            status: 429,
            headers: vec![("Retry-After".into(), "3".into())],
            body: json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "message": "Too many requests",
                "details": [{"@type": "type.googleapis.com/google.ads.googleads.v21.errors.GoogleAdsFailure",
                             "errors": [{"errorCode": {"quotaError": "RESOURCE_EXHAUSTED"}, "message": "quota"}]}]}})
            .to_string(),
        },
        switchyard_fakes::Scripted {
            status: 503,
            headers: vec![],
            body: json!({"error": {"code": 503, "status": "UNAVAILABLE", "message": "The service is currently unavailable."}}).to_string(),
        },
    ]);
    let http = reqwest::Client::new();
    let req = &dest.map(&batch)[0];
    let first = send(&http, req).await;
    assert!(throttle(dest.as_ref(), &first, &batch));
    assert!(
        classify(dest.as_ref(), &first, &batch)
            .iter()
            .all(|o| matches!(
                o,
                Outcome::Retry { after: Some(d), .. } if d.as_secs() == 3
            ))
    );
    let second = send(&http, req).await;
    assert!(!throttle(dest.as_ref(), &second, &batch));
    assert!(
        classify(dest.as_ref(), &second, &batch)
            .iter()
            .all(|o| matches!(o, Outcome::Retry { .. }))
    );
    // Then Google is back, and everything lands once.
    let third = send(&http, req).await;
    assert_eq!(
        classify(dest.as_ref(), &third, &batch),
        vec![Outcome::Delivered; batch.len()]
    );
    assert_eq!(fake.accepted().len(), batch.len());
}

#[test]
fn settings_are_validated_with_their_keys() {
    let text = r#"
[destinations.gads]
type = "google_ads"
customer_id = "1234567890"
developer_token = "d"
access_token = "a"
conversion_actions = { purchase = "1" }
time_zone_offset = "CET"
click_id_priority = ["gclid", "fbclid"]
consent_ad_user_data = "Ads!"
"#;
    let err = Config::parse(text, Path::new("gads.toml"), &|_| None).unwrap_err();
    let text = err.to_string();
    for key in [
        "destinations.gads.time_zone_offset",
        "destinations.gads.click_id_priority",
        "destinations.gads.consent_ad_user_data",
    ] {
        assert!(text.contains(key), "{key} in {text}");
    }
}
