//! End to end through the real pipeline for the product-analytics and CRM
//! vendors: one `run --role all` process against tansu routes a stream with
//! anonymous browsing, an identify that links it to a known user with
//! traits, purchases in two currencies, a duplicate published twice, a
//! person without analytics consent and a trait update, into each vendor's
//! stand-in. Per destination: the accepted events are exactly the expected
//! ones, each once; revenue per currency matches the input; the analytics
//! vendors see the anonymous → known merge; the profiles carry the traits
//! as last updated; and no request carries a field the destination's
//! settings forbid.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::kafka::{produce, read_all, sigterm, spawn_switchyard};
use serde_json::{Value, json};
use switchyard::destinations::{amplitude, customerio, mixpanel, posthog};
use switchyard_fakes::{Accepted, Fake, serve};

const MIXPANEL: &str = "mixpanel";
const POSTHOG: &str = "posthog";
const AMPLITUDE: &str = "amplitude";
const CUSTOMERIO: &str = "customerio";
const KLAVIYO: &str = "klaviyo";
const ALL: [&str; 5] = [MIXPANEL, POSTHOG, AMPLITUDE, CUSTOMERIO, KLAVIYO];

const EMAIL_A: &str = "Ada.Lovelace@Example.com";
const PHONE_A: &str = "+14155550123";
const EMAIL_B: &str = "bob.builder@example.org";

/// One canonical event and the destinations that must accept it as an event.
struct Case {
    event: Value,
    expect: &'static [&'static str],
}

fn at(now: DateTime<Utc>, minutes_ago: i64) -> String {
    (now - chrono::Duration::minutes(minutes_ago))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Published in three phases (see the test): browsing and the identify;
/// then purchases, the duplicate and person B; then the trait update.
fn fixture(run: &str, now: DateTime<Utc>) -> [Vec<Case>; 3] {
    let id = |n: &str| format!("{run}-{n}");
    let granted = json!({"analytics": "granted", "marketing": "granted"});
    let no_analytics = json!({"analytics": "denied", "marketing": "granted"});
    let (anon_a, user_a) = (id("anon-a"), id("user-a"));
    let ctx = json!({"ip": "198.51.100.23", "page_url": "https://shop.example.com/p/1"});
    [
        vec![
            Case {
                event: json!({"event": "view_content", "event_id": id("e01"), "occurred_at": at(now, 50),
                    "anonymous_id": anon_a, "consent": granted, "context": ctx,
                    "items": [{"id": "sku-1", "name": "Trail Runner", "price": 129.0}]}),
                // Klaviyo's allowlist leaves anonymous browsing out.
                expect: &[MIXPANEL, POSTHOG, AMPLITUDE, CUSTOMERIO],
            },
            Case {
                event: json!({"event": "add_to_cart", "event_id": id("e02"), "occurred_at": at(now, 48),
                    "anonymous_id": anon_a, "consent": granted, "context": ctx,
                    "items": [{"id": "sku-1", "name": "Trail Runner", "quantity": 1, "price": 129.0}]}),
                expect: &[MIXPANEL, POSTHOG, AMPLITUDE, CUSTOMERIO],
            },
            // A signs in: the anonymous visitor becomes a known user.
            Case {
                event: json!({"event": "identify", "event_id": id("e03"), "occurred_at": at(now, 46),
                    "anonymous_id": anon_a, "user_id": user_a, "email": EMAIL_A, "phone": PHONE_A,
                    "consent": granted,
                    "traits": {"first_name": "Ada", "plan": "pro", "email": EMAIL_A}}),
                // Mixpanel: a profile update and an `$identify` that merges
                // (an identity operation its stand-in does not count); the
                // CRMs: a profile update (checked below).
                expect: &[POSTHOG, AMPLITUDE],
            },
        ],
        vec![
            // Server-side purchases name only the user.
            Case {
                event: json!({"event": "purchase", "event_id": id("e04"), "occurred_at": at(now, 40),
                    "user_id": user_a, "consent": granted, "value": 129.0, "currency": "USD",
                    "order_id": id("order-a1"),
                    "items": [{"id": "sku-1", "name": "Trail Runner", "quantity": 1, "price": 129.0}]}),
                expect: &[MIXPANEL, POSTHOG, AMPLITUDE, CUSTOMERIO, KLAVIYO],
            },
            Case {
                event: json!({"event": "purchase", "event_id": id("e05"), "occurred_at": at(now, 38),
                    "user_id": user_a, "consent": granted, "value": 40.0, "currency": "EUR",
                    "order_id": id("order-a2")}),
                expect: &[MIXPANEL, POSTHOG, AMPLITUDE, CUSTOMERIO, KLAVIYO],
            },
            Case {
                event: json!({"event": "custom.webinar_registered", "event_id": id("e06"),
                    "occurred_at": at(now, 36), "user_id": user_a, "consent": granted,
                    "properties": {"webinar_id": "wb-1"}}),
                expect: &[MIXPANEL, POSTHOG, AMPLITUDE, CUSTOMERIO, KLAVIYO],
            },
            // B said no to analytics (yes to marketing).
            Case {
                event: json!({"event": "purchase", "event_id": id("e07"), "occurred_at": at(now, 35),
                    "user_id": id("user-b"), "email": EMAIL_B, "consent": no_analytics,
                    "value": 50.0, "currency": "USD", "order_id": id("order-b1")}),
                expect: &[CUSTOMERIO, KLAVIYO],
            },
        ],
        vec![
            // A's plan changes.
            Case {
                event: json!({"event": "identify", "event_id": id("e08"), "occurred_at": at(now, 20),
                    "user_id": user_a, "consent": granted, "traits": {"plan": "team"}}),
                expect: &[POSTHOG, AMPLITUDE],
            },
        ],
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

[destinations.mixpanel]
type = "mixpanel"
id_merge = "simplified"
project_id = "3141592"
service_account_username = "demo.sa"
service_account_secret = "demo-sa-secret"
project_token = "demo-token"
base_url = "{mixpanel}"
[destinations.mixpanel.delivery]
linger = "50ms"

[destinations.posthog]
type = "posthog"
api_key = "phc_demo_project_key"
base_url = "{posthog}"
[destinations.posthog.delivery]
linger = "50ms"

[destinations.amplitude]
type = "amplitude"
api_key = "demo-amplitude-api-key"
base_url = "{amplitude}"
[destinations.amplitude.delivery]
linger = "50ms"

[destinations.customerio]
type = "customerio"
site_id = "{customerio_site}"
api_key = "{customerio_key}"
base_url = "{customerio}"
[destinations.customerio.delivery]
linger = "50ms"

# Raw contact allowed: Klaviyo finds profiles by email.
[destinations.klaviyo]
type = "klaviyo"
api_key = "{klaviyo_key}"
raw_contact = true
events = ["identify", "purchase", "custom.webinar_registered"]
base_url = "{klaviyo}"
[destinations.klaviyo.delivery]
linger = "50ms"
"#,
        mixpanel = fakes[MIXPANEL].base_url(),
        posthog = fakes[POSTHOG].base_url(),
        amplitude = fakes[AMPLITUDE].base_url(),
        customerio = fakes[CUSTOMERIO].base_url(),
        customerio_site = switchyard_fakes::customerio::Settings::default().site_id,
        customerio_key = switchyard_fakes::customerio::Settings::default().api_key,
        klaviyo = fakes[KLAVIYO].base_url(),
        klaviyo_key = switchyard_fakes::klaviyo::Settings::default().api_key,
    )
}

fn s<'a>(v: &'a Value, field: &str) -> Option<&'a str> {
    v.get(field).and_then(Value::as_str)
}

/// The vendor's dedup key for a canonical event it takes as an event.
fn vendor_key(dest: &str, e: &Value) -> String {
    let id = s(e, "event_id").unwrap();
    match dest {
        MIXPANEL => mixpanel::insert_id(id),
        POSTHOG => posthog::event_uuid(id),
        AMPLITUDE => amplitude::insert_id(id),
        CUSTOMERIO => {
            let at = chrono::DateTime::parse_from_rfc3339(s(e, "occurred_at").unwrap()).unwrap();
            customerio::event_ulid(id, at.with_timezone(&Utc))
        }
        KLAVIYO => id.to_string(),
        _ => unreachable!("{dest}"),
    }
}

/// What the stand-in accepted as events (not profile updates).
fn events(dest: &str, accepted: Vec<Accepted>) -> Vec<Accepted> {
    match dest {
        MIXPANEL | CUSTOMERIO => accepted.into_iter().filter(|a| a.key.is_some()).collect(),
        KLAVIYO => accepted
            .into_iter()
            .filter(|a| a.name != "profile-import")
            .collect(),
        _ => accepted,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canonical_events_reach_the_analytics_and_crm_vendors_exactly_as_expected() {
    let brokers = common::brokers();
    let prefix = common::unique("acrm");
    let now = Utc::now();
    let phases = fixture(&prefix, now);

    let mixpanel_fake =
        switchyard_fakes::mixpanel::Mixpanel::new(switchyard_fakes::mixpanel::Settings::default());
    let mixpanel_state = mixpanel_fake.state();
    let posthog_settings = switchyard_fakes::posthog::Settings::default();
    let posthog_persons = posthog_settings.persons.clone();
    let mut fakes = BTreeMap::new();
    fakes.insert(MIXPANEL, serve(mixpanel_fake).await.unwrap());
    fakes.insert(POSTHOG, serve(posthog_settings).await.unwrap());
    let customerio_settings = switchyard_fakes::customerio::Settings::default();
    let customerio_people = customerio_settings.people.clone();
    fakes.insert(CUSTOMERIO, serve(customerio_settings).await.unwrap());
    let klaviyo_settings = switchyard_fakes::klaviyo::Settings::default();
    let klaviyo_profiles = klaviyo_settings.profiles.clone();
    fakes.insert(KLAVIYO, serve(klaviyo_settings).await.unwrap());
    fakes.insert(
        AMPLITUDE,
        serve(switchyard_fakes::amplitude::Settings::default())
            .await
            .unwrap(),
    );

    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(dir.path(), &config(&brokers, &prefix, &fakes));
    common::run_ok(&["topics", "create"], &config);
    let canonical = format!("{prefix}.canonical");
    let log = dir.path().join("switchyard.log");
    let mut child = spawn_switchyard(
        &["--role", "all", "--instance-id", "acrm-e2e"],
        &config,
        &log,
    );
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let record = |c: &Case| {
        (
            s(&c.event, "event_id").map(String::from),
            serde_json::to_vec(&c.event).unwrap(),
        )
    };
    // Each phase waits for the one before: events are keyed by id, so
    // published together they would be routed in any order, and a purchase
    // naming only the user could pass before the identify that links it.
    let mut published: Vec<&Case> = Vec::new();
    for (n, phase) in phases.iter().enumerate() {
        let mut records: Vec<(Option<String>, Vec<u8>)> = phase.iter().map(record).collect();
        if n == 1 {
            // The first purchase, published twice more.
            records.push(records[0].clone());
            records.push(records[0].clone());
        }
        produce(&brokers, &canonical, &records).await;
        published.extend(phase);
        for dest in ALL {
            let want = published
                .iter()
                .filter(|c| c.expect.contains(&dest))
                .count();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            while events(dest, fakes[dest].accepted()).len() < want {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{dest}: phase {n}: {} of {want} accepted; log:\n{}",
                    events(dest, fakes[dest].accepted()).len(),
                    log_text()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // Long enough for a stray duplicate or unexpected event to show up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(sigterm(&mut child, Duration::from_secs(30)).is_some());

    let user_a = format!("{prefix}-user-a");
    let anon_a = format!("{prefix}-anon-a");
    for dest in ALL {
        let fake = &fakes[dest];
        let expected: Vec<&Value> = published
            .iter()
            .filter(|c| c.expect.contains(&dest))
            .map(|c| &c.event)
            .collect();
        let accepted = events(dest, fake.accepted());

        // Exactly the expected events, each once.
        let keys: Vec<String> = accepted.iter().filter_map(|a| a.key.clone()).collect();
        assert_eq!(
            keys.len(),
            accepted.len(),
            "{dest}: an event without its key"
        );
        let unique: BTreeSet<&String> = keys.iter().collect();
        assert_eq!(unique.len(), keys.len(), "{dest}: a key accepted twice");
        let want: BTreeSet<String> = expected.iter().map(|e| vendor_key(dest, e)).collect();
        assert_eq!(
            keys.iter().cloned().collect::<BTreeSet<_>>(),
            want,
            "{dest}: accepted {accepted:#?}"
        );

        // Revenue per currency.
        let mut want_revenue: BTreeMap<String, f64> = BTreeMap::new();
        for e in expected
            .iter()
            .filter(|e| s(e, "event") == Some("purchase"))
        {
            *want_revenue
                .entry(s(e, "currency").unwrap().to_string())
                .or_default() += e["value"].as_f64().unwrap();
        }
        let mut got_revenue: BTreeMap<String, f64> = BTreeMap::new();
        for a in &accepted {
            if let (Some(v), Some(c)) = (a.value, &a.currency) {
                *got_revenue.entry(c.clone()).or_default() += v;
            }
        }
        assert_eq!(got_revenue, want_revenue, "{dest}: revenue per currency");

        // No raw contact data where the settings do not allow it (Klaviyo's
        // do, for people who said yes to marketing).
        if dest == KLAVIYO {
            continue;
        }
        for x in fake.exchanges() {
            let text = format!(
                "{} {:?} {}",
                x.request.path,
                x.request.query,
                String::from_utf8_lossy(&x.request.body)
            )
            .to_lowercase();
            for raw in [EMAIL_A, EMAIL_B] {
                assert!(
                    !text.contains(&raw.to_lowercase()),
                    "{dest} got a raw email"
                );
            }
            assert!(
                !text.contains(PHONE_A.trim_start_matches('+')),
                "{dest} got a raw phone"
            );
        }
    }

    // Mixpanel merged the anonymous visitor into the user (simplified ID
    // merge: an event with both ids), and the profile holds the traits as
    // last updated.
    {
        let st = mixpanel_state.lock().unwrap();
        assert_eq!(
            st.canonical_of(&format!("$device:{anon_a}")),
            st.canonical_of(&user_a),
            "Mixpanel merge"
        );
        let profile = &st.profiles[&user_a];
        assert_eq!(profile["plan"], "team", "{profile:?}");
        assert_eq!(profile["$first_name"], "Ada", "{profile:?}");
        assert_eq!(
            profile["$transactions"].as_array().map(Vec::len),
            Some(2),
            "one transaction per purchase: {profile:?}"
        );
    }
    // PostHog merged it with $identify.
    assert!(
        posthog_persons
            .merges()
            .iter()
            .any(|m| m.anonymous == anon_a && m.identified == user_a),
        "PostHog merge: {:?}",
        posthog_persons.merges()
    );

    // Amplitude linked the device to the user: an event carried both.
    assert!(
        fakes[AMPLITUDE].accepted().iter().any(|a| {
            a.payload["device_id"] == anon_a.as_str() && a.payload["user_id"] == user_a.as_str()
        }),
        "Amplitude link"
    );

    // The CRMs' profiles carry A's traits as last updated; Customer.io's
    // also the anonymous id it merges the browsing under.
    let person = customerio_people
        .get(&format!("id:{user_a}"))
        .expect("Customer.io identified A");
    assert_eq!(person["plan"], "team", "{person:?}");
    assert_eq!(person["first_name"], "Ada", "{person:?}");
    assert_eq!(person["anonymous_id"], anon_a.as_str(), "{person:?}");
    let profiles = klaviyo_profiles.all();
    let profile = profiles
        .get(&format!("external_id:{user_a}"))
        .unwrap_or_else(|| panic!("Klaviyo imported A: {profiles:?}"));
    assert_eq!(profile["properties"]["plan"], "team", "{profile:?}");
    assert_eq!(profile["first_name"], "Ada", "{profile:?}");

    // Nothing was dead-lettered.
    let dlq = read_all(&brokers, &format!("{prefix}.dlq"));
    assert!(
        dlq.is_empty(),
        "dead letters: {:?}",
        dlq.iter().map(|r| &r.headers).collect::<Vec<_>>()
    );
}
