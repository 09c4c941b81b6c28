//! End to end through the real pipeline: a fixture stream of canonical events
//! goes through the router and the four ad-platform sinks (one `run --role
//! all` process against tansu) into the vendor stand-ins, which check every
//! request the way the vendor does. Per destination: the accepted set equals
//! the expected one (consent and allowlist applied), nothing is accepted
//! twice, revenue per currency matches the canonical events, and no request
//! carries a raw email or phone.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::kafka::{produce, read_all, sigterm, spawn_switchyard};
use serde_json::{Value, json};
use switchyard_fakes::{Fake, ga4, google_ads, meta, serve, tiktok};

const META: &str = "meta";
const TIKTOK: &str = "tiktok";
const GOOGLE: &str = "google_ads";
const GA4: &str = "ga4";
const ALL: [&str; 4] = [META, TIKTOK, GOOGLE, GA4];

/// One canonical event and the destinations that must accept it.
struct Case {
    event: Value,
    expect: &'static [&'static str],
}

const EMAILS: [&str; 4] = [
    "Ada.Lovelace@Example.com",
    "bob.builder@example.org",
    "carol@example.net",
    "dave.d@example.com",
];
const PHONES: [&str; 2] = ["+14155550123", "+442071838750"];

fn at(now: DateTime<Utc>, minutes_ago: i64) -> String {
    (now - chrono::Duration::minutes(minutes_ago))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn web() -> Value {
    json!({
        "ip": "198.51.100.23",
        "user_agent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 Version/18.0 Safari/605.1.15",
        "page_url": "https://shop.example.com/checkout",
        "referrer": "https://www.google.com/"
    })
}

fn fixture(run: &str, now: DateTime<Utc>) -> Vec<Case> {
    let id = |n: &str| format!("{run}-{n}");
    let granted = json!({"ads": "granted", "analytics": "granted"});
    let ads_denied = json!({"ads": "denied", "analytics": "granted"});
    let analytics_denied = json!({"ads": "granted", "analytics": "denied"});
    let anon_a = id("anon-a");
    let user_a = id("user-a");
    vec![
        // A browses anonymously, arriving from ads on three platforms.
        Case {
            event: json!({"event": "view_content", "event_id": id("e01"), "occurred_at": at(now, 50),
                "anonymous_id": anon_a, "consent": granted, "context": web(),
                "click_ids": {"fbc": "fb.1.1764100801000.IwZXh0bgNhZW0", "fbp": "fb.1.1764100790000.1846739201",
                              "gclid": "Cj0KCQiAo5u6BhDJARIsAAVoDWs9xQ", "ttclid": "E.C.P.v3Lq8xKs", "ttp": "2Vx9Q7o1"},
                "items": [{"id": "sku-1", "name": "Trail Runner", "price": 129.0}]}),
            expect: &[META, TIKTOK, GA4],
        },
        Case {
            event: json!({"event": "add_to_cart", "event_id": id("e02"), "occurred_at": at(now, 48),
                "anonymous_id": anon_a, "consent": granted, "context": web(),
                "value": 129.0, "currency": "USD",
                "items": [{"id": "sku-1", "name": "Trail Runner", "quantity": 1, "price": 129.0}]}),
            expect: &[META, TIKTOK, GA4],
        },
        // A signs up: the anonymous visitor becomes a known user with contact data.
        Case {
            event: json!({"event": "sign_up", "event_id": id("e03"), "occurred_at": at(now, 45),
                "anonymous_id": anon_a, "user_id": user_a, "email": EMAILS[0], "phone": PHONES[0],
                "consent": granted, "context": web()}),
            expect: &[META, TIKTOK, GOOGLE, GA4],
        },
        // Server-side purchases name only the user: identity fills in the rest.
        Case {
            event: json!({"event": "purchase", "event_id": id("e04"), "occurred_at": at(now, 40),
                "user_id": user_a, "consent": granted, "context": web(),
                "value": 129.0, "currency": "USD", "order_id": id("order-a1"),
                "items": [{"id": "sku-1", "name": "Trail Runner", "quantity": 1, "price": 129.0}]}),
            expect: &[META, TIKTOK, GOOGLE, GA4],
        },
        Case {
            event: json!({"event": "purchase", "event_id": id("e05"), "occurred_at": at(now, 38),
                "user_id": user_a, "consent": granted, "context": web(),
                "value": 40.0, "currency": "EUR", "order_id": id("order-a2"),
                "items": [{"id": "sku-9", "name": "Socks", "quantity": 4, "price": 10.0}]}),
            expect: &[META, TIKTOK, GOOGLE, GA4],
        },
        Case {
            event: json!({"event": "refund", "event_id": id("e06"), "occurred_at": at(now, 30),
                "user_id": user_a, "consent": granted,
                "value": 129.0, "currency": "USD", "order_id": id("order-a1")}),
            expect: &[GA4],
        },
        // B said no to ads: analytics only.
        Case {
            event: json!({"event": "purchase", "event_id": id("e07"), "occurred_at": at(now, 35),
                "user_id": id("user-b"), "anonymous_id": id("anon-b"), "email": EMAILS[1], "consent": ads_denied,
                "context": web(), "value": 50.0, "currency": "USD", "order_id": id("order-b1"),
                "click_ids": {"gclid": "Cj0KCQiBBBBBBBBB"}}),
            expect: &[GA4],
        },
        Case {
            event: json!({"event": "lead", "event_id": id("e08"), "occurred_at": at(now, 34),
                "user_id": id("user-b"), "anonymous_id": id("anon-b"), "consent": ads_denied, "context": web()}),
            expect: &[GA4],
        },
        // C says nothing about consent: every destination that receives
        // hashed contact data (the ad platforms and GA4) defaults to deny.
        Case {
            event: json!({"event": "view_content", "event_id": id("e09"), "occurred_at": at(now, 33),
                "anonymous_id": id("anon-c"), "context": web()}),
            expect: &[],
        },
        Case {
            event: json!({"event": "lead", "event_id": id("e10"), "occurred_at": at(now, 32),
                "anonymous_id": id("anon-c"), "email": EMAILS[2], "phone": PHONES[1], "context": web(),
                "click_ids": {"gclid": "Cj0KCQiCCCCCCCCC"}}),
            expect: &[],
        },
        // D allows ads but not analytics.
        Case {
            event: json!({"event": "purchase", "event_id": id("e11"), "occurred_at": at(now, 20),
                "user_id": id("user-d"), "anonymous_id": id("anon-d"), "email": EMAILS[3], "consent": analytics_denied,
                "context": web(), "click_ids": {"gclid": "Cj0KCQiDDDDDDDDD", "fbc": "fb.1.1764100801000.DDDD"},
                "value": 15.5, "currency": "EUR", "order_id": id("order-d1")}),
            expect: &[META, TIKTOK, GOOGLE],
        },
        Case {
            event: json!({"event": "start_trial", "event_id": id("e12"), "occurred_at": at(now, 19),
                "user_id": id("user-d"), "anonymous_id": id("anon-d"), "consent": analytics_denied, "context": web()}),
            expect: &[META, TIKTOK],
        },
    ]
}

fn config(brokers: &str, prefix: &str, fakes: &BTreeMap<&str, Fake>) -> String {
    format!(
        r#"
[kafka]
brokers = "{brokers}"
guarantee = "at_least_once"
# tansu 0.6.0 does not finish cooperative rebalances.
consumer_properties = {{ "partition.assignment.strategy" = "roundrobin" }}
[topics]
canonical = "{prefix}.canonical"
prefix = "{prefix}"
partitions = 3
[metrics]
listen = "127.0.0.1:0"

[destinations.meta]
type = "meta_capi"
pixel_id = "100000000000001"
access_token = "demo-token"
base_url = "{meta}"
[destinations.meta.delivery]
linger = "50ms"

[destinations.tiktok]
type = "tiktok_events"
pixel_code = "CDEMO0000000001"
access_token = "demo-token"
base_url = "{tiktok}"
[destinations.tiktok.delivery]
linger = "50ms"

[destinations.google_ads]
type = "google_ads"
customer_id = "123-456-7890"
developer_token = "demo-token"
access_token = "demo-token"
conversion_actions = {{ purchase = "1001", lead = "1002", sign_up = "1003" }}
base_url = "{google}"
[destinations.google_ads.delivery]
linger = "50ms"

[destinations.ga4]
type = "ga4"
measurement_id = "G-DEMO000001"
api_secret = "demo-secret"
base_url = "{ga4}"
[destinations.ga4.delivery]
linger = "50ms"
"#,
        meta = fakes[META].base_url(),
        tiktok = fakes[TIKTOK].base_url(),
        google = fakes[GOOGLE].base_url(),
        ga4 = fakes[GA4].base_url(),
    )
}

/// The fixture value of `field` as a string.
fn s<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    v.get(field).and_then(Value::as_str)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canonical_events_reach_the_four_ad_platforms_exactly_as_expected() {
    let brokers = common::brokers();
    let prefix = common::unique("ads");
    let now = Utc::now();
    let cases = fixture(&prefix, now);

    let mut fakes = BTreeMap::new();
    fakes.insert(META, serve(meta::Settings::default()).await.unwrap());
    fakes.insert(TIKTOK, serve(tiktok::Settings::default()).await.unwrap());
    fakes.insert(
        GOOGLE,
        serve(google_ads::Settings::default()).await.unwrap(),
    );
    fakes.insert(GA4, serve(ga4::Settings::default()).await.unwrap());

    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(dir.path(), &config(&brokers, &prefix, &fakes));
    common::run_ok(&["topics", "create"], &config);

    // Every event once keyed by its id, then two duplicates: one resent as
    // is, one resent under the wrong key (the router re-keys it first).
    let mut records: Vec<(Option<String>, Vec<u8>)> = cases
        .iter()
        .map(|c| {
            (
                s(&c.event, "event_id").map(String::from),
                serde_json::to_vec(&c.event).unwrap(),
            )
        })
        .collect();
    records.push(records[3].clone());
    records.push((Some("wrong-key".into()), records[10].1.clone()));
    let canonical = format!("{prefix}.canonical");

    let log = dir.path().join("switchyard.log");
    let mut child = spawn_switchyard(
        &["--role", "all", "--instance-id", "ads-e2e"],
        &config,
        &log,
    );
    // A's browsing and sign-up first, as in life: the later server-side
    // purchases name only the user and are enriched from what the sign-up
    // taught. Published together, partitions would be read in any order
    // and a purchase could be routed before the sign-up it depends on.
    produce(&brokers, &canonical, &records[..3]).await;
    assert!(
        fakes[META].wait_accepted(3, Duration::from_secs(120)).await,
        "sign-up not delivered; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    produce(&brokers, &canonical, &records[3..]).await;
    for dest in ALL {
        let want = cases.iter().filter(|c| c.expect.contains(&dest)).count();
        let ok = fakes[dest]
            .wait_accepted(want, Duration::from_secs(120))
            .await;
        assert!(
            ok,
            "{dest}: {} of {want} accepted; log:\n{}",
            fakes[dest].accepted().len(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    // Long enough for a stray duplicate or unexpected event to show up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(sigterm(&mut child, Duration::from_secs(30)).is_some());

    for dest in ALL {
        let fake = &fakes[dest];
        let expected: Vec<&Value> = cases
            .iter()
            .filter(|c| c.expect.contains(&dest))
            .map(|c| &c.event)
            .collect();
        let accepted = fake.accepted();

        // The accepted set is the expected set, each once.
        assert_eq!(accepted.len(), expected.len(), "{dest}: {accepted:#?}");
        let keys: Vec<String> = accepted.iter().filter_map(|a| a.key.clone()).collect();
        let unique: BTreeSet<&String> = keys.iter().collect();
        assert_eq!(unique.len(), keys.len(), "{dest}: a key accepted twice");
        if dest != GA4 {
            let want: BTreeSet<String> = expected.iter().map(|e| vendor_key(dest, e)).collect();
            let got: BTreeSet<String> = keys.into_iter().collect();
            assert_eq!(got, want, "{dest}: accepted keys");
        }

        // Revenue parity per currency.
        let mut want_revenue: BTreeMap<String, f64> = BTreeMap::new();
        for e in &expected {
            if let (Some(v), Some(c)) = (e["value"].as_f64(), s(e, "currency")) {
                *want_revenue.entry(c.to_string()).or_default() += v;
            }
        }
        let mut got_revenue: BTreeMap<String, f64> = BTreeMap::new();
        for a in &accepted {
            if let (Some(v), Some(c)) = (a.value, &a.currency) {
                *got_revenue.entry(c.clone()).or_default() += v;
            }
        }
        assert_eq!(
            got_revenue.len(),
            want_revenue.len(),
            "{dest}: {got_revenue:?} vs {want_revenue:?}"
        );
        for (c, v) in &want_revenue {
            assert!(
                (got_revenue.get(c).copied().unwrap_or(0.0) - v).abs() < 1e-9,
                "{dest}: revenue in {c}: {got_revenue:?} vs {want_revenue:?}"
            );
        }

        // No raw contact data anywhere in any request.
        let exchanges = fake.exchanges();
        assert!(!exchanges.is_empty());
        for x in &exchanges {
            let text = format!(
                "{} {:?} {:?} {}",
                x.request.path,
                x.request.query,
                x.request.headers,
                String::from_utf8_lossy(&x.request.body)
            )
            .to_lowercase();
            for raw in EMAILS {
                assert!(
                    !text.contains(&raw.to_lowercase()),
                    "{dest} got raw email {raw}"
                );
            }
            for raw in PHONES {
                let digits = raw.trim_start_matches('+');
                assert!(!text.contains(digits), "{dest} got raw phone {raw}");
            }
        }
    }

    // Nothing was dead-lettered: every expected event made it, and the
    // unexpected ones were never routed.
    let dlq = read_all(&brokers, &format!("{prefix}.dlq"));
    assert!(
        dlq.is_empty(),
        "dead letters: {:?}",
        dlq.iter().map(|r| &r.headers).collect::<Vec<_>>()
    );
}

/// The key the vendor dedups on for this canonical event.
fn vendor_key(dest: &str, e: &Value) -> String {
    match dest {
        GOOGLE => s(e, "order_id").or(s(e, "event_id")).unwrap().to_string(),
        _ => s(e, "event_id").unwrap().to_string(),
    }
}

/// Google access tokens last about an hour; with `[oauth]` the sink fetches
/// them from the token endpoint, renews them before they expire and, when
/// one is refused anyway, fetches another and resends. Here they live 3 s
/// while purchases keep arriving for 8 s: every one is accepted, none is
/// dead-lettered, and the token endpoint was asked again as tokens expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_ads_access_tokens_are_refreshed_as_they_expire() {
    let brokers = common::brokers();
    let prefix = common::unique("oauth");
    let fake = serve(google_ads::Settings {
        access_token: String::new(),
        oauth: google_ads::OAuthClient {
            token_lifetime: Duration::from_secs(3),
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(
        dir.path(),
        &format!(
            r#"
[kafka]
brokers = "{brokers}"
guarantee = "at_least_once"
consumer_properties = {{ "partition.assignment.strategy" = "roundrobin" }}
[topics]
canonical = "{prefix}.canonical"
prefix = "{prefix}"
partitions = 2
[metrics]
listen = "127.0.0.1:0"
[destinations.google_ads]
type = "google_ads"
customer_id = "123-456-7890"
developer_token = "demo-token"
conversion_actions = {{ purchase = "1001" }}
base_url = "{base}"
[destinations.google_ads.oauth]
client_id = "demo-client.apps.googleusercontent.com"
client_secret = "demo-client-secret"
refresh_token = "demo-refresh-token"
token_url = "{base}/token"
[destinations.google_ads.delivery]
linger = "20ms"
"#,
            base = fake.base_url()
        ),
    );
    common::run_ok(&["topics", "create"], &config);
    let log = dir.path().join("switchyard.log");
    let mut child = spawn_switchyard(
        &["--role", "all", "--instance-id", "oauth-e2e"],
        &config,
        &log,
    );
    let now = Utc::now();
    let waves = 5;
    for wave in 0..waves {
        let records: Vec<(Option<String>, Vec<u8>)> = (0..4)
            .map(|i| {
                let id = format!("{prefix}-w{wave}-{i}");
                let ev = json!({"event": "purchase", "event_id": id, "occurred_at": at(now, 5),
                    "user_id": format!("u-{i}"), "consent": {"ads": "granted"},
                    "click_ids": {"gclid": format!("Cj0-{wave}-{i}")},
                    "value": 10.0, "currency": "EUR", "order_id": format!("{id}-order")});
                (Some(id), serde_json::to_vec(&ev).unwrap())
            })
            .collect();
        produce(&brokers, &format!("{prefix}.canonical"), &records).await;
        // Each wave goes out before the next is published, which comes
        // after the token it used has expired: every wave needs a new one,
        // however slowly the machine runs.
        let ok = fake
            .wait_accepted((wave + 1) * 4, Duration::from_secs(90))
            .await;
        assert!(ok, "wave {wave} not accepted");
        tokio::time::sleep(Duration::from_millis(3500)).await;
    }
    let ok = fake.wait_accepted(waves * 4, Duration::from_secs(90)).await;
    assert!(
        ok,
        "{} of {} accepted; log:\n{}",
        fake.accepted().len(),
        waves * 4,
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(sigterm(&mut child, Duration::from_secs(30)).is_some());
    let refreshes = fake
        .exchanges()
        .iter()
        .filter(|x| x.request.path == "/token")
        .count();
    assert!(
        refreshes >= 3,
        "token endpoint asked {refreshes} times for {waves} waves 3.5 s apart, with 3 s tokens"
    );
    let dlq = read_all(&brokers, &format!("{prefix}.dlq"));
    assert!(
        dlq.is_empty(),
        "dead letters: {:?}",
        dlq.iter().map(|r| &r.headers).collect::<Vec<_>>()
    );
    // No secret of the OAuth exchange ever went to the vendor API itself.
    for x in fake
        .exchanges()
        .iter()
        .filter(|x| x.request.path != "/token")
    {
        let text = format!(
            "{:?} {}",
            x.request.headers,
            String::from_utf8_lossy(&x.request.body)
        );
        assert!(!text.contains("demo-refresh-token") && !text.contains("demo-client-secret"));
    }
}
