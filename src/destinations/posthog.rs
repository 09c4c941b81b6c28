//! PostHog capture API (`type = "posthog"`).
//!
//! `POST {host}/batch/` with `{"api_key", "historical_migration"?, "batch":
//! [{event, distinct_id, properties, timestamp, uuid}, …]}`. Host by
//! `region`: `https://us.i.posthog.com` or `https://eu.i.posthog.com`
//! (the ingestion hosts, with `.i.`; `base_url` overrides both, for
//! self-hosted PostHog and tests). The key is the project API key (`phc_…`),
//! in the body: it is write-only.
//!
//! Checked in PostHog's own material (December 2026):
//! - posthog.com/docs/api/capture (= /docs/api/post-only-endpoints): the
//!   `/batch/` endpoint, the US/EU ingestion hosts, `api_key`, `event`,
//!   `distinct_id`, `properties`, `timestamp` (ISO 8601), `$identify` with
//!   `$set`/`$set_once`, `$create_alias`.
//! - posthog.com/docs/migrate: `historical_migration: true` when importing
//!   past data (timestamps at least 48 h old); here a setting, for backfills.
//! - posthog.com/docs/data/ingestion-warnings: events over 1 MB are
//!   discarded (with a warning, not an error); invalid UUIDs are refused;
//!   "deduping based on event UUID is not guaranteed due to how merges work
//!   in ClickHouse"; events more than 23 h in the future are hidden.
//! - PostHog/posthog `rust/capture/src/router.rs`: `/batch` takes bodies up
//!   to 20 MB (`BATCH_BODY_SIZE`; larger ones get 413).
//!   `rust/capture/src/v0_request.rs`: the batch body's fields (`api_key`
//!   alias of `token`, `historical_migration`, `batch`), a `uuid` must parse
//!   as a UUID (else the whole request fails to parse), `distinct_id` is cut
//!   to 200 characters, a personal key (`phx_`) is refused, a decoded body
//!   over the event size limit is "maximum event size exceeded".
//!   `rust/capture/src/api.rs`: the answers: 400 with the error text
//!   ("failed to parse request: …", "maximum event size exceeded", …), 401
//!   for a missing, empty or invalid key ("API key is not valid: …"), 429
//!   billing limit or rate limited, 503 "transient error, please retry".
//! - posthog.com/docs/cdp/geoip-enrichment: GeoIP prefers the event
//!   property `$ip`, else the sender's address (a server's, for us).
//!   posthog.com/manual/sessions: `$session_id` groups events into a
//!   session (replays, web analytics). posthog.com/docs/data/events:
//!   `$current_url` is a default property.
//!   posthog.com/docs/revenue-analytics/capture-revenue-events: the revenue
//!   and currency property names are chosen in PostHog's settings.
//! - PostHog/posthog plugin-server/person tests (`process_event` with
//!   `$identify` and `$anon_distinct_id`): the anonymous person is merged
//!   into the identified one by the `$identify` event alone; nothing in the
//!   docs asks other events to carry `$anon_distinct_id`, so they do not.
//!
//! Mapping: `distinct_id` = user_id, else anonymous_id. `uuid` = UUIDv5 of
//! the event_id in [`UUID_NAMESPACE`], so a resend carries the same uuid.
//! PostHog does not promise to drop the copy, so the sink's ledger still
//! decides (`vendor_dedup` is false). Identify → `$identify` with `$set`
//! from traits (the router leaves contact traits and email/phone out unless
//! `raw_contact = true`) and `$anon_distinct_id` = anonymous_id; an identify
//! without a user id goes as a `$set` event instead (posthog.com/docs/
//! product-analytics/person-properties), since PostHog refuses to merge an
//! already identified person (ingestion warning "Refused to merge an already
//! identified user") and the anonymous one must stay mergeable. A session
//! id (`$session_id`, `session_id` in properties, or `session_id` in
//! metadata) travels as `$session_id`; context.ip → `$ip`, page_url →
//! `$current_url`; value/currency/order_id/items → `revenue`, `currency`,
//! `order_id`, `products`.
//!
//! Answers: 2xx delivered; 400 rejected with PostHog's text (but "maximum
//! event size exceeded" is split); 401 rejected as `posthog_auth`; 413
//! split; 408/429/5xx retried.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha1::{Digest, Sha1};

use super::names::NamePreset;
use super::shared;
use super::{Contact, Kind, Spec};
use crate::delivery::Delivery;
use crate::event::normalize::{EmailRule, PhoneFormat};
use crate::event::{CanonicalEvent, EventName};
use crate::settings::{Problem, Secret, check_url, reporter};
use crate::sink::destination::{
    Classified, Destination, Limits, Outcome, Refusal, Request, Response,
};
use crate::sink::retry;

/// `/batch` body limit (`BATCH_BODY_SIZE` in PostHog's capture service).
pub const MAX_BODY_BYTES: usize = 20 * 1024 * 1024;
/// PostHog discards an event over 1 MB with only an ingestion warning, so
/// such an event is dead-lettered here instead of "delivered" to nowhere.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// PostHog documents no count limit for `/batch`; this keeps a request (and
/// a failed one's resend) to a size its SDKs also send.
pub const MAX_EVENTS: usize = 1000;
/// What `/batch` keeps of a distinct_id.
pub const MAX_DISTINCT_ID_CHARS: usize = 200;
/// The namespace of every event uuid: UUIDv5(URL namespace,
/// "https://switchyard.dev/destinations/posthog/event_id"). Fixed forever:
/// changing it would give every resent event a new uuid.
pub const UUID_NAMESPACE: [u8; 16] = [
    0x75, 0x02, 0x88, 0xae, 0xb4, 0x63, 0x58, 0xa0, 0x9d, 0x92, 0x53, 0xdb, 0xbf, 0xbe, 0xfe, 0xfa,
];

/// Analytics that keeps a person's profile: it needs their yes, and gets raw
/// contact data (PostHog person properties) only when the destination says
/// so.
pub const SPEC: Spec = Spec {
    type_name: "posthog",
    kind: Kind::Analytics,
    contact: Contact::NoneUnlessConfigured,
    email: EmailRule::Plain,
    phone: PhoneFormat::E164,
    // PostHog sets person properties "in the order the events are
    // ingested, and not according to event timestamps"
    // (posthog.com/docs/data/user-properties): a retried older `$set` must
    // not land after a newer one.
    ordering: true,
};

/// PostHog Cloud's two regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Region {
    Us,
    Eu,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The starting names: "retail" (default) or "saas" (`names.rs`).
    #[serde(default)]
    pub preset: NamePreset,
    /// The project API key (`phc_…`).
    pub api_key: Secret,
    /// "us" or "eu"; required unless `base_url` is set.
    pub region: Option<Region>,
    /// Self-hosted PostHog (or a test fake): overrides `region`.
    pub base_url: Option<String>,
    /// Sends `historical_migration: true` (PostHog's flag for imports of
    /// past data), for a destination that backfills.
    #[serde(default)]
    pub historical_migration: bool,
}

impl Settings {
    /// What types cannot say; each problem is named under `key`.
    pub fn check(&self, key: &str, problems: &mut Vec<Problem>) {
        let mut bad = reporter(key, problems);
        let k = self.api_key.expose();
        if k.starts_with("phx_") {
            bad(
                "api_key",
                "is a personal API key (phx_); capture takes the project API key (phc_)".into(),
            );
        } else if !k.starts_with("phc_") || k.len() < 8 {
            bad("api_key", "must be a project API key, \"phc_…\"".into());
        }
        match &self.base_url {
            Some(u) => {
                if let Err(why) = check_url(u) {
                    bad("base_url", why);
                }
            }
            None if self.region.is_none() => bad(
                "region",
                "must be \"us\" or \"eu\" (or set base_url for self-hosted PostHog)".into(),
            ),
            None => {}
        }
    }

    /// The preset's names; identify as `$identify` (the merge and the
    /// person's properties).
    pub fn preset_name<'a>(&self, event: &'a EventName) -> Option<&'a str> {
        match event {
            EventName::Identify => Some("$identify"),
            other => self.preset.name(other),
        }
    }
}

pub struct Posthog {
    settings: Settings,
    url: String,
}

impl Posthog {
    pub fn new(settings: Settings) -> Self {
        let host = match (&settings.base_url, settings.region) {
            (Some(u), _) => u.clone(),
            (None, Some(Region::Eu)) => "https://eu.i.posthog.com".into(),
            // `check` refuses a config with neither.
            (None, _) => "https://us.i.posthog.com".into(),
        };
        let url = format!("{}/batch/", host.trim_end_matches('/'));
        Posthog { settings, url }
    }

    fn event(&self, d: &Delivery) -> Event {
        let ev = &d.event;
        let distinct_id: String = ev.anchor().chars().take(MAX_DISTINCT_ID_CHARS).collect();
        // `$identify` marks its distinct_id as identified, and PostHog
        // refuses to merge an identified person into another later; without
        // a user id there is nobody to identify, so the traits go as a
        // `$set` event (PostHog's person-properties event).
        let event = if d.name == "$identify" && ev.user_id.is_none() {
            "$set".to_string()
        } else {
            d.name.clone()
        };
        Event {
            event,
            distinct_id,
            properties: properties(d),
            timestamp: ev
                .occurred_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            uuid: event_uuid(&ev.event_id),
        }
    }
}

/// The event's properties as PostHog reads them.
fn properties(d: &Delivery) -> Map<String, Value> {
    let ev = &d.event;
    // The publisher's own properties first; what switchyard derives wins.
    let mut p = ev.properties.clone().unwrap_or_default();
    if let Some(s) = session_id(ev) {
        p.insert("$session_id".into(), s);
    }
    if let Some(ctx) = &ev.context {
        if let Some(ip) = ctx.ip {
            p.insert("$ip".into(), json!(ip.to_string()));
        }
        if let Some(u) = &ctx.page_url {
            p.insert("$current_url".into(), json!(u));
        }
    }
    shared::commerce_properties(ev, "revenue", &mut p);
    if ev.event == EventName::Identify || d.name == "$identify" {
        // The router has already left contact traits, email and phone out
        // unless this destination has `raw_contact = true`.
        let mut set = ev.traits.clone().unwrap_or_default();
        if let Some(e) = &ev.email {
            set.insert("email".into(), json!(e));
        }
        if let Some(ph) = &ev.phone {
            set.insert("phone".into(), json!(ph));
        }
        if !set.is_empty() {
            p.insert("$set".into(), Value::Object(set));
        }
        // The merge of the anonymous browsing into the known person.
        if let (Some(user), Some(anon)) = (&ev.user_id, &ev.anonymous_id)
            && user != anon
        {
            p.insert("$anon_distinct_id".into(), json!(anon));
        }
    }
    p
}

/// `$session_id`, `session_id` among properties, else `session_id` in metadata.
fn session_id(ev: &CanonicalEvent) -> Option<Value> {
    let usable = |v: &Value| match v {
        Value::String(s) if !s.trim().is_empty() => Some(v.clone()),
        Value::Number(_) => Some(v.clone()),
        _ => None,
    };
    let props = ev.properties.as_ref();
    props
        .and_then(|p| p.get("$session_id").or_else(|| p.get("session_id")))
        .and_then(usable)
        .or_else(|| {
            ev.metadata
                .as_ref()
                .and_then(|m| m.get("session_id"))
                .and_then(usable)
        })
}

/// UUIDv5 (RFC 9562 §5.5) of `event_id` in [`UUID_NAMESPACE`].
pub fn event_uuid(event_id: &str) -> String {
    uuid_v5(&UUID_NAMESPACE, event_id.as_bytes())
}

fn uuid_v5(namespace: &[u8; 16], name: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(namespace);
    h.update(name);
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..]
    )
}

#[derive(Serialize)]
struct Event {
    event: String,
    distinct_id: String,
    properties: Map<String, Value>,
    timestamp: String,
    uuid: String,
}

#[derive(Serialize)]
struct Envelope<'a> {
    api_key: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    historical_migration: bool,
    /// Last, empty: `shared::wrap` puts the events inside.
    batch: [(); 0],
}

impl Destination for Posthog {
    fn limits(&self) -> Limits {
        Limits {
            max_events: MAX_EVENTS,
            max_bytes: MAX_BODY_BYTES,
            // PostHog takes events of any age (imports are a use case).
            max_event_age: None,
        }
    }

    fn refuse(&self, d: &Delivery) -> Option<Refusal> {
        let size = serde_json::to_vec(&self.event(d)).map_or(0, |v| v.len());
        (size > MAX_EVENT_BYTES).then(|| Refusal {
            class: "posthog_event_too_large",
            reason: format!(
                "the event is {size} bytes as sent; PostHog discards events over 1 MB ({MAX_EVENT_BYTES} bytes)"
            ),
        })
    }

    fn vendor_dedup(&self) -> bool {
        // PostHog's docs: dedup on uuid "is not guaranteed".
        false
    }

    fn map(&self, batch: &[Delivery]) -> Vec<Request> {
        let events: Vec<Vec<u8>> = batch
            .iter()
            .map(|d| serde_json::to_vec(&self.event(d)).expect("events serialise to JSON"))
            .collect();
        let envelope = serde_json::to_vec(&Envelope {
            api_key: self.settings.api_key.expose(),
            historical_migration: self.settings.historical_migration,
            batch: [],
        })
        .expect("the envelope serialises");
        let headers = vec![("Content-Type".into(), "application/json".into())];
        shared::requests(
            &self.url,
            &headers,
            &envelope,
            &events,
            MAX_EVENTS,
            MAX_BODY_BYTES,
        )
    }

    fn classify(&self, request: &Request, response: &Response, _: &[Delivery]) -> Classified {
        let text = || retry::excerpt(&response.body, 300);
        let outcome = match response.status {
            // capture's answer when a decoded body is over its size limit:
            // the same events in smaller requests fit.
            400 if text().contains("maximum event size exceeded") => Outcome::Split,
            400 => Outcome::Rejected {
                class: "posthog_invalid_request".into(),
                reason: format!("PostHog (HTTP 400): {}", text()),
            },
            401 => Outcome::Rejected {
                class: "posthog_auth".into(),
                reason: format!("PostHog refused the project API key (HTTP 401): {}", text()),
            },
            _ => retry::by_status(response, SystemTime::now()).unwrap_or(Outcome::Delivered),
        };
        Classified::all(request, response, outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::test_support::{self, body, ok};

    fn settings() -> Settings {
        Settings {
            preset: NamePreset::Retail,
            api_key: Secret::new("phc_test_key_123"),
            region: Some(Region::Us),
            base_url: None,
            historical_migration: false,
        }
    }

    fn posthog() -> Posthog {
        Posthog::new(settings())
    }

    fn delivery(name: &str, extra: Value) -> Delivery {
        let ev = json!({
            "event": "purchase", "event_id": "e1", "occurred_at": "2026-11-26T14:03:11Z",
            "user_id": "u_1", "anonymous_id": "anon-1", "value": 49.5, "currency": "EUR",
            "order_id": "o-1",
            "items": [{"id": "sku-1", "name": "Shoe", "price": 24.75, "quantity": 2}],
            "context": {"ip": "203.0.113.7", "page_url": "https://shop.example/checkout"},
            "properties": {"plan": "pro"},
            "metadata": {"session_id": "sess-9"}
        });
        test_support::delivery("posthog", name, ev, extra)
    }

    fn response(status: u16, text: &str) -> Response {
        Response {
            status,
            headers: vec![],
            body: text.as_bytes().to_vec(),
        }
    }

    #[test]
    fn uuid_v5_matches_known_vectors() {
        // uuid.uuid5(uuid.NAMESPACE_DNS, "python.org") in Python.
        let dns = [
            0x6b, 0xa7, 0xb8, 0x10, 0x9d, 0xad, 0x11, 0xd1, 0x80, 0xb4, 0x00, 0xc0, 0x4f, 0xd4,
            0x30, 0xc8,
        ];
        assert_eq!(
            uuid_v5(&dns, b"python.org"),
            "886313e1-3b8a-5372-9b90-0c9aee199e5d"
        );
        // uuid.uuid5(uuid.UUID("750288ae-b463-58a0-9d92-53dbbfbefefa"), "e1").
        assert_eq!(event_uuid("e1"), "71dd525b-97a0-5e83-9dce-bd077d315aea");
    }

    #[test]
    fn urls_follow_region_and_base_url() {
        assert_eq!(posthog().url, "https://us.i.posthog.com/batch/");
        let mut s = settings();
        s.region = Some(Region::Eu);
        assert_eq!(
            Posthog::new(s.clone()).url,
            "https://eu.i.posthog.com/batch/"
        );
        s.base_url = Some("http://127.0.0.1:9/".into());
        assert_eq!(Posthog::new(s).url, "http://127.0.0.1:9/batch/");
    }

    #[test]
    fn settings_are_checked() {
        let v = test_support::vendor(
            "posthog",
            "destinations.ph",
            "api_key = \"phc_abcdef12\"\nregion = \"eu\"",
        );
        assert!(v.is_ok(), "{v:?}");
        let p = test_support::vendor("posthog", "destinations.ph", "api_key = \"phx_personal\"")
            .unwrap_err();
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["destinations.ph.api_key", "destinations.ph.region"]);
        assert!(p[0].message.contains("personal"));
        assert!(
            !p[0].message.contains("phx_personal"),
            "the key is never repeated"
        );
        assert!(
            test_support::vendor(
                "posthog",
                "destinations.ph",
                "api_key = \"phc_abcdef12\"\nbase_url = \"https://ph.internal.example\""
            )
            .is_ok()
        );
        // A region PostHog does not have stops at parsing.
        assert!(
            test_support::vendor(
                "posthog",
                "d",
                "api_key = \"phc_abcdef12\"\nregion = \"asia\""
            )
            .is_err()
        );
    }

    #[test]
    fn presets_use_posthog_style_names() {
        let s = settings();
        assert_eq!(s.preset_name(&EventName::Purchase), Some("Order Completed"));
        assert_eq!(s.preset_name(&EventName::Identify), Some("$identify"));
        assert_eq!(s.preset_name(&EventName::Search), Some("Products Searched"));
        let custom = EventName::Custom("custom.webinar_registered".into());
        assert_eq!(s.preset_name(&custom), Some("webinar_registered"));
    }

    #[test]
    fn body_carries_key_ids_uuid_and_properties() {
        let r = &posthog().map(&[delivery("Order Completed", json!({}))])[0];
        assert_eq!(r.url, "https://us.i.posthog.com/batch/");
        assert_eq!(
            body(r),
            json!({
                "api_key": "phc_test_key_123",
                "batch": [{
                    "event": "Order Completed",
                    "distinct_id": "u_1",
                    "properties": {
                        "plan": "pro",
                        "$session_id": "sess-9",
                        "$ip": "203.0.113.7",
                        "$current_url": "https://shop.example/checkout",
                        "revenue": 49.5, "currency": "EUR", "order_id": "o-1",
                        "products": [{"product_id": "sku-1", "name": "Shoe", "price": 24.75, "quantity": 2}]
                    },
                    "timestamp": "2026-11-26T14:03:11.000Z",
                    "uuid": event_uuid("e1")
                }]
            })
        );
        // Not an identify: no merge claim on ordinary events.
        assert!(
            body(r)["batch"][0]["properties"]
                .get("$anon_distinct_id")
                .is_none()
        );
    }

    #[test]
    fn anonymous_events_use_the_anonymous_id_and_sessions_come_from_properties() {
        let d = delivery(
            "Product Viewed",
            json!({"user_id": null, "properties": {"session_id": 17}}),
        );
        let b = body(&posthog().map(&[d])[0]);
        assert_eq!(b["batch"][0]["distinct_id"], "anon-1");
        assert_eq!(b["batch"][0]["properties"]["$session_id"], 17);
        let long = "x".repeat(300);
        let d = delivery("Product Viewed", json!({"user_id": long}));
        let b = body(&posthog().map(&[d])[0]);
        assert_eq!(b["batch"][0]["distinct_id"].as_str().unwrap().len(), 200);
    }

    #[test]
    fn identify_sets_traits_and_merges_the_anonymous_id() {
        let d = delivery(
            "$identify",
            json!({"event": "identify", "traits": {"plan": "pro"}, "value": null,
                   "currency": null, "order_id": null, "items": null}),
        );
        let p = &body(&posthog().map(&[d])[0])["batch"][0]["properties"];
        assert_eq!(p["$set"], json!({"plan": "pro"}));
        assert_eq!(p["$anon_distinct_id"], "anon-1");
        // Raw contact data is in the delivery only when the router allowed it.
        let d = delivery(
            "$identify",
            json!({"event": "identify", "email": "jo@example.com", "traits": {"plan": "pro"}}),
        );
        let p = &body(&posthog().map(&[d])[0])["batch"][0]["properties"];
        assert_eq!(p["$set"]["email"], "jo@example.com");
        // No user id: nothing to merge into, and the anonymous person must
        // stay mergeable, so the traits go as a `$set` event.
        let d = delivery(
            "$identify",
            json!({"event": "identify", "user_id": null, "traits": {"plan": "pro"}}),
        );
        let e = &body(&posthog().map(&[d])[0])["batch"][0];
        assert_eq!(e["event"], "$set");
        assert_eq!(e["distinct_id"], "anon-1");
        assert_eq!(e["properties"]["$set"], json!({"plan": "pro"}));
        assert!(e["properties"].get("$anon_distinct_id").is_none());
    }

    #[test]
    fn policy_is_analytics_with_raw_contact_only_when_configured() {
        assert_eq!(SPEC.default_consent(), Some("analytics"));
        assert!(!SPEC.hashes_only(), "raw_contact = true is allowed");
        // A missing answer is a no.
        assert_eq!(
            SPEC.consent_default(),
            crate::settings::ConsentDefault::Deny
        );
    }

    #[test]
    fn historical_migration_is_sent_only_when_set() {
        assert!(
            body(&posthog().map(&[delivery("x", json!({}))])[0])
                .get("historical_migration")
                .is_none()
        );
        let mut s = settings();
        s.historical_migration = true;
        let b = body(&Posthog::new(s).map(&[delivery("x", json!({}))])[0]);
        assert_eq!(b["historical_migration"], true);
    }

    #[test]
    fn requests_hold_at_most_1000_events_and_events_over_1_mb_are_refused() {
        let batch: Vec<Delivery> = (0..1001)
            .map(|i| delivery("x", json!({"event_id": format!("e{i}")})))
            .collect();
        let reqs = posthog().map(&batch);
        assert_eq!(test_support::ranges(&reqs), vec![0..1000, 1000..1001]);
        assert_eq!(posthog().refuse(&batch[0]), None);
        let big = delivery(
            "x",
            json!({"properties": {"blob": "y".repeat(MAX_EVENT_BYTES)}}),
        );
        assert_eq!(
            posthog().refuse(&big).unwrap().class,
            "posthog_event_too_large"
        );
    }

    /// Answers recorded from PostHog's capture service (its `CaptureError`
    /// texts) and what each means for every event of the request.
    #[test]
    fn recorded_answers_classify() {
        let batch = [
            delivery("x", json!({})),
            delivery("y", json!({"event_id": "e2"})),
        ];
        let rejected = |class: &str, words: &str| {
            let (class, words) = (class.to_string(), words.to_string());
            move |o: &Outcome| matches!(o, Outcome::Rejected { class: c, reason } if *c == class && reason.contains(&words))
        };
        type Expect = Box<dyn Fn(&Outcome) -> bool>;
        let table: Vec<(Response, Expect)> = vec![
            (
                ok(json!({"status": 1})),
                Box::new(|o| *o == Outcome::Delivered),
            ),
            (
                ok(json!({"status": "Ok"})),
                Box::new(|o| *o == Outcome::Delivered),
            ),
            (
                response(
                    400,
                    "failed to parse request: invalid type: string \"x\", expected a UUID",
                ),
                Box::new(rejected(
                    "posthog_invalid_request",
                    "failed to parse request",
                )),
            ),
            (
                response(400, "event submitted without a distinct_id"),
                Box::new(rejected("posthog_invalid_request", "without a distinct_id")),
            ),
            (
                response(400, "maximum event size exceeded"),
                Box::new(|o| *o == Outcome::Split),
            ),
            (
                response(401, "API key is not valid: personal api key"),
                Box::new(rejected("posthog_auth", "API key is not valid")),
            ),
            (
                response(401, "event submitted without an api_key"),
                Box::new(rejected("posthog_auth", "without an api_key")),
            ),
            (
                response(413, "length limit exceeded"),
                Box::new(|o| *o == Outcome::Split),
            ),
            (
                response(429, "rate limited"),
                Box::new(|o| matches!(o, Outcome::Retry { .. })),
            ),
            (
                response(503, "transient error, please retry"),
                Box::new(|o| matches!(o, Outcome::Retry { .. })),
            ),
        ];
        for (resp, expect) in table {
            let got = test_support::classify(&posthog(), &resp, &batch);
            assert!(got.iter().all(&expect), "HTTP {}: {got:?}", resp.status);
        }
        assert!(test_support::throttle(
            &posthog(),
            &response(429, "billing limit reached"),
            &batch
        ));
    }
}
