//! Klaviyo server-side API (`type = "klaviyo"`).
//!
//! Events: `POST {base}/api/events`, one event per request, with
//! `Authorization: Klaviyo-API-Key <private key>`, a `revision: YYYY-MM-DD`
//! header and a JSON:API body
//! `{"data": {"type": "event", "attributes": {properties, time, value,
//! value_currency, unique_id, metric: {data: {type: "metric", attributes:
//! {name}}}, profile: {data: {type: "profile", attributes: {external_id,
//! email?, phone_number?}}}}}}`. Identify: `POST {base}/api/profile-import`
//! (create or update a profile) with `{"data": {"type": "profile",
//! "attributes": {external_id, email?, phone_number?, first_name?, …,
//! properties}}}`. `base` is `https://a.klaviyo.com`; `base_url` overrides
//! it (tests, the demo).
//!
//! Checked in Klaviyo's own material (December 2026):
//! - developers.klaviyo.com/en/reference/create_event (revision
//!   2026-10-15) and klaviyo/openapi `openapi/stable/apis/create_event.json`:
//!   the path, the private-key auth, the required `revision` header
//!   ("YYYY-MM-DD[.suffix]"), `application/vnd.api+json`, the attributes
//!   above (`properties`, `metric`, `profile` required; `time` date-time,
//!   truncated to the second; `value` number; `value_currency` ISO 4217;
//!   `unique_id`: "if the unique_id is repeated for the same profile and
//!   metric, only the first processed event will be recorded"), metric name
//!   "less than 128 characters", profile `email`, `phone_number` ("E.164
//!   format"), `external_id`; 202 = accepted ("validated and submitted for
//!   processing"); 4XX/5XX bodies `{"errors": [{id, code, title, detail,
//!   source: {pointer, parameter}}]}`; payload ≤ 5 MB, ≤ 400 properties,
//!   strings ≤ 100 KB; rate limits burst 350/s, steady 3500/m.
//! - klaviyo/openapi `create_or_update_profile.json`:
//!   `POST /api/profile-import`, 201 created / 200 updated, "setting a field
//!   to null will clear out the field", payload ≤ 100 KB, burst 75/s,
//!   steady 750/m.
//! - developers.klaviyo.com/en/reference/bulk_create_events and
//!   `bulk_create_events.json` (`/api/event-bulk-create-jobs`): see below
//!   why it is not used.
//! - developers.klaviyo.com/en/reference/create_event, phone numbers:
//!   "Individual's phone number in E.164 format"; a number without its
//!   country code is left out (see `e164`).
//! - developers.klaviyo.com/en/docs/rate_limits_and_error_handling:
//!   per-account fixed windows (burst 1 s, steady 1 min), HTTP 429 when
//!   either is reached, `RateLimit-Limit`/`-Remaining`/`-Reset` on every
//!   other answer. Whether a 429 always carries `Retry-After` is not
//!   stated; when it does, the retry waits that long.
//! - developers.klaviyo.com/en/docs/guide_to_integrating_a_platform_without_a_pre_built_klaviyo_integration
//!   and /en/docs/custom_integration_faqs: Klaviyo's own metric names
//!   "Viewed Product", "Added to Cart", "Started Checkout", "Placed Order"
//!   (some features depend on them), hence the retail preset below.
//!
//! Why one event per request and not `/api/event-bulk-create-jobs` (up to
//! 1000 events, 5 MB, one 202 for the whole job): there, "if a unique_id
//! is repeated for the same profile and metric, the request will fail and
//! no events will be processed", so a resend after a lost answer would fail
//! its whole batch forever; one bad event fails the rest with it; and its
//! rate limit is 10/s burst, 150/m steady against 350/s, 3500/m for
//! `/api/events`, which answers each event on its own. Throughput comes
//! from the sink's `max_concurrent_requests` (the requests of one batch go
//! concurrently); `delivery.rate_limit` keeps under Klaviyo's steady limit
//! (the module cannot set a default for it).
//!
//! Identity: the profile is found by `external_id` (user_id) and, only when
//! the destination sets `raw_contact = true` (the router leaves email and
//! phone out otherwise), by email and E.164 phone. Klaviyo keeps a profile
//! of the person and markets to it, so the destination needs the person's
//! marketing yes (`Kind::Crm`, `Contact::NoneUnlessConfigured`: consent
//! `marketing`, silence = no). An event with none of the three is refused
//! (dead-lettered) before it is sent.
//!
//! Answers: 2xx delivered; 429 retried after `Retry-After`, and the sink
//! slows down; 408/5xx retried; 401/403 rejected as `klaviyo_auth`; 413
//! (one event is too large on its own: splitting cannot help) rejected as
//! `klaviyo_too_large`; other 4xx rejected as `klaviyo_<code>` with the
//! error's `detail`, contact data scrubbed.

use std::time::SystemTime;

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::names::NamePreset;
use super::shared;
use super::{Contact, Kind, Spec};
use crate::delivery::Delivery;
use crate::event::normalize::{EmailRule, PhoneFormat, normalize_phone};
use crate::event::{CanonicalEvent, EventName};
use crate::settings::{Problem, Secret, check_url, reporter};
use crate::sink::destination::{
    Classified, Destination, Limits, Outcome, Refusal, Request, Response,
};
use crate::sink::retry;

/// `/api/events` payload limit (5 MB).
pub const MAX_EVENT_BYTES: usize = 5 * 1024 * 1024;
/// `/api/profile-import` payload limit (100 KB).
pub const MAX_PROFILE_BYTES: usize = 100 * 1024;
/// "Must be less than 128 characters."
pub const MAX_METRIC_NAME_CHARS: usize = 127;
/// Rows per batch: each becomes its own request, so this only bounds how
/// much one batch holds in flight (and how much a parked batch retries).
pub const MAX_EVENTS: usize = 100;
/// The revision sent when the destination names none: the latest Klaviyo
/// documented in December 2026.
pub const DEFAULT_REVISION: &str = "2026-10-15";
const BASE_URL: &str = "https://a.klaviyo.com";
const CONTENT_TYPE: &str = "application/vnd.api+json";
/// Profile attributes of their own in `profile-import`; other traits go to
/// `properties` (custom profile properties).
const PROFILE_ATTRIBUTES: [&str; 6] = [
    "first_name",
    "last_name",
    "organization",
    "title",
    "locale",
    "image",
];

/// A CRM that markets to the person: their marketing yes, and raw contact
/// data only when the destination asks for it. Klaviyo matches profiles on
/// plain email and phone, so hashes are of no use to it.
pub const SPEC: Spec = Spec {
    type_name: "klaviyo",
    kind: Kind::Crm,
    contact: Contact::NoneUnlessConfigured,
    email: EmailRule::Plain,
    phone: PhoneFormat::E164,
    // Profile imports overwrite properties in arrival order: a retried older
    // identify must not land after a newer one.
    ordering: true,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// "retail" (default: Klaviyo's own ecommerce metric names) or "saas".
    #[serde(default)]
    pub preset: NamePreset,
    /// A private API key (server-side; public site IDs are for `/client`).
    pub api_key: Secret,
    /// The API revision, `YYYY-MM-DD` with an optional `.suffix`.
    #[serde(default = "default_revision")]
    pub revision: String,
    /// Overrides `https://a.klaviyo.com` (tests, the demo).
    pub base_url: Option<String>,
}

fn default_revision() -> String {
    DEFAULT_REVISION.into()
}

/// `YYYY-MM-DD[.suffix]`, a real month and day.
pub fn is_revision(r: &str) -> bool {
    let (date, suffix) = match r.split_once('.') {
        Some((d, s)) => (d, Some(s)),
        None => (r, None),
    };
    let suffix_ok = suffix
        .is_none_or(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    suffix_ok && chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").is_ok() && date.len() == 10
}

impl Settings {
    pub fn check(&self, key: &str, problems: &mut Vec<Problem>) {
        let mut bad = reporter(key, problems);
        let k = self.api_key.expose();
        if k.trim().is_empty() || k.chars().any(char::is_whitespace) {
            bad(
                "api_key",
                "must be a Klaviyo private API key, without spaces and without the \"Klaviyo-API-Key\" prefix".into(),
            );
        }
        if !is_revision(&self.revision) {
            bad(
                "revision",
                format!(
                    "`{}` is not an API revision like \"{DEFAULT_REVISION}\" (YYYY-MM-DD[.suffix])",
                    self.revision.chars().take(40).collect::<String>()
                ),
            );
        }
        if let Some(u) = &self.base_url
            && let Err(why) = check_url(u)
        {
            bad("base_url", why);
        }
    }

    /// Klaviyo's own names for the shop journey under `retail` (its
    /// features read them); the shared presets otherwise. Identify is a
    /// profile import, named for logs only.
    pub fn preset_name<'a>(&self, event: &'a EventName) -> Option<&'a str> {
        match (event, self.preset) {
            (EventName::Identify, _) => Some("profile-import"),
            (EventName::ViewContent, NamePreset::Retail) => Some("Viewed Product"),
            (EventName::AddToCart, NamePreset::Retail) => Some("Added to Cart"),
            (EventName::BeginCheckout, NamePreset::Retail) => Some("Started Checkout"),
            (EventName::Purchase, NamePreset::Retail) => Some("Placed Order"),
            (other, preset) => preset.name(other),
        }
    }
}

pub struct Klaviyo {
    settings: Settings,
    events_url: String,
    profiles_url: String,
}

impl Klaviyo {
    pub fn new(settings: Settings) -> Self {
        let base = settings
            .base_url
            .as_deref()
            .unwrap_or(BASE_URL)
            .trim_end_matches('/')
            .to_string();
        Klaviyo {
            events_url: format!("{base}/api/events"),
            profiles_url: format!("{base}/api/profile-import"),
            settings,
        }
    }

    fn headers(&self) -> Vec<(String, String)> {
        vec![
            (
                "Authorization".into(),
                format!("Klaviyo-API-Key {}", self.settings.api_key.expose()),
            ),
            ("revision".into(), self.settings.revision.clone()),
            ("Content-Type".into(), CONTENT_TYPE.into()),
            ("Accept".into(), CONTENT_TYPE.into()),
        ]
    }

    /// The request for one row: its endpoint, URL and body.
    fn body(&self, d: &Delivery) -> (&'static str, &str, Value) {
        let ev = &d.event;
        if ev.event == EventName::Identify {
            let mut attributes = identifiers(ev);
            let mut properties = Map::new();
            for (k, v) in ev.traits.clone().unwrap_or_default() {
                if PROFILE_ATTRIBUTES.contains(&k.as_str()) {
                    attributes.insert(k, v);
                } else if !is_identifier_key(&k) {
                    properties.insert(k, v);
                }
            }
            if !properties.is_empty() {
                attributes.insert("properties".into(), Value::Object(properties));
            }
            let body = json!({"data": {"type": "profile", "attributes": attributes}});
            return ("profiles", &self.profiles_url, body);
        }
        let mut attributes = Map::new();
        attributes.insert("properties".into(), Value::Object(properties(ev)));
        attributes.insert(
            "time".into(),
            json!(
                ev.occurred_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
        );
        if let Some(v) = ev.value {
            attributes.insert("value".into(), json!(v));
        }
        if let Some(c) = &ev.currency {
            attributes.insert("value_currency".into(), json!(c));
        }
        attributes.insert("unique_id".into(), json!(ev.event_id));
        attributes.insert(
            "metric".into(),
            json!({"data": {"type": "metric", "attributes": {"name": d.name}}}),
        );
        attributes.insert(
            "profile".into(),
            json!({"data": {"type": "profile", "attributes": identifiers(ev)}}),
        );
        let body = json!({"data": {"type": "event", "attributes": attributes}});
        ("events", &self.events_url, body)
    }
}

/// Keys that name the person; they travel as identifiers, never as
/// properties (and contact data only when the router let it through).
fn is_identifier_key(k: &str) -> bool {
    matches!(k, "email" | "phone" | "phone_number" | "external_id")
}

/// The profile's identifiers: external_id = user_id, and the email and
/// E.164 phone when the router passed them (raw_contact = true).
fn identifiers(ev: &CanonicalEvent) -> Map<String, Value> {
    let mut m = Map::new();
    if let Some(u) = ev.user_id.as_deref().filter(|u| !u.trim().is_empty()) {
        m.insert("external_id".into(), json!(u));
    }
    if let Some(e) = ev.email.as_deref().filter(|e| e.contains('@')) {
        m.insert("email".into(), json!(e));
    }
    if let Some(p) = ev.phone.as_deref().and_then(e164) {
        m.insert("phone_number".into(), json!(p));
    }
    m
}

/// The phone in E.164, as Klaviyo's `phone_number` wants it. Only numbers
/// written with their country code: a destination has no country to read a
/// national number in, and a wrong guess would reach someone else.
fn e164(raw: &str) -> Option<String> {
    if !raw.trim_start().starts_with('+') {
        return None;
    }
    // The country is ignored for a number with its own `+` code.
    normalize_phone(raw, phonenumber::country::Id::US, PhoneFormat::E164)
}

/// The event's properties: the publisher's, then what switchyard knows.
fn properties(ev: &CanonicalEvent) -> Map<String, Value> {
    let mut p = ev.properties.clone().unwrap_or_default();
    p.retain(|k, _| !is_identifier_key(k));
    if let Some(o) = &ev.order_id {
        p.insert("order_id".into(), json!(o));
    }
    if !ev.items.is_empty() {
        let items: Vec<Value> = ev
            .items
            .iter()
            .map(|it| shared::item_object(it, "product_id"))
            .collect();
        p.insert("items".into(), Value::Array(items));
    }
    if let Some(u) = ev.context.as_ref().and_then(|c| c.page_url.as_ref()) {
        p.insert("page_url".into(), json!(u));
    }
    p
}

/// Klaviyo's error body (`errors[]`, JSON:API).
#[derive(Deserialize)]
struct ErrorBody {
    errors: Vec<ErrorObject>,
}

#[derive(Deserialize)]
struct ErrorObject {
    #[serde(default)]
    code: String,
    #[serde(default)]
    detail: String,
    #[serde(default)]
    source: Option<ErrorSource>,
}

#[derive(Deserialize)]
struct ErrorSource {
    #[serde(default)]
    pointer: Option<String>,
}

/// The first error of a Klaviyo error body as (class code, reason text), or
/// `None` when the body is not one.
fn klaviyo_error(body: &[u8]) -> Option<(String, String)> {
    let parsed: ErrorBody = serde_json::from_slice(body).ok()?;
    let first = parsed.errors.first()?;
    let code: String = first
        .code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(40)
        .collect::<String>()
        .to_ascii_lowercase();
    let mut reason = crate::redact::redact(&first.detail).into_owned();
    if let Some(p) = first.source.as_ref().and_then(|s| s.pointer.as_deref()) {
        reason.push_str(&format!(" (at {})", crate::redact::redact(p)));
    }
    if parsed.errors.len() > 1 {
        reason.push_str(&format!(" (+{} more errors)", parsed.errors.len() - 1));
    }
    Some((code, retry::cut_string(reason, 300)))
}

impl Destination for Klaviyo {
    fn limits(&self) -> Limits {
        Limits {
            max_events: MAX_EVENTS,
            // A batch is never one body: each event travels alone, so the
            // byte bound is the sum a batch of the largest events may hold.
            max_bytes: MAX_EVENTS * MAX_EVENT_BYTES,
            // Klaviyo takes any time after 1990 (historic imports are a use
            // case); `backfill` is not set, so old events can trigger flows.
            max_event_age: None,
        }
    }

    fn refuse(&self, d: &Delivery) -> Option<Refusal> {
        let ev = &d.event;
        if identifiers(ev).is_empty() {
            return Some(Refusal {
                class: "klaviyo_no_identifier",
                reason: "no user_id (external_id) and no usable email or E.164 phone \
                         (those only with raw_contact = true): Klaviyo needs one to find the profile"
                    .into(),
            });
        }
        if ev.event != EventName::Identify && d.name.chars().count() > MAX_METRIC_NAME_CHARS {
            return Some(Refusal {
                class: "klaviyo_metric_name_too_long",
                reason: format!(
                    "the metric name is {} characters; Klaviyo takes fewer than 128",
                    d.name.chars().count()
                ),
            });
        }
        let (endpoint, _, body) = self.body(d);
        let size = body.to_string().len();
        let max = if endpoint == "profiles" {
            MAX_PROFILE_BYTES
        } else {
            MAX_EVENT_BYTES
        };
        (size > max).then(|| Refusal {
            class: "klaviyo_too_large",
            reason: format!("the {endpoint} body is {size} bytes; Klaviyo takes at most {max}"),
        })
    }

    fn vendor_dedup(&self) -> bool {
        // `unique_id` per profile and metric: a resent event is recorded once.
        true
    }

    fn map(&self, batch: &[Delivery]) -> Vec<Request> {
        batch
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (endpoint, url, body) = self.body(d);
                Request::post(
                    endpoint,
                    url,
                    self.headers(),
                    body.to_string().into_bytes(),
                    [i],
                )
            })
            .collect()
    }

    fn classify(&self, request: &Request, response: &Response, _: &[Delivery]) -> Classified {
        let status = response.status;
        let error = || klaviyo_error(&response.body);
        let outcome = match status {
            401 | 403 => Outcome::Rejected {
                class: "klaviyo_auth".into(),
                reason: format!(
                    "Klaviyo refused the API key (HTTP {status}): {}",
                    error().map_or_else(|| retry::excerpt(&response.body, 200), |(_, r)| r)
                ),
            },
            // One event per request: a smaller request cannot exist.
            413 => Outcome::Rejected {
                class: "klaviyo_too_large".into(),
                reason: "Klaviyo found the event too large (HTTP 413); it travels alone, so it cannot be split".into(),
            },
            s if (400..500).contains(&s) && s != 408 && s != 429 => match error() {
                Some((code, reason)) => Outcome::Rejected {
                    class: if code.is_empty() {
                        format!("klaviyo_http_{s}")
                    } else {
                        format!("klaviyo_{code}")
                    },
                    reason: format!("Klaviyo (HTTP {s}): {reason}"),
                },
                None => Outcome::Rejected {
                    class: format!("klaviyo_http_{s}"),
                    reason: format!("Klaviyo (HTTP {s}): {}", crate::redact::redacted(retry::excerpt(&response.body, 200))),
                },
            },
            _ => retry::by_status(response, SystemTime::now()).unwrap_or(Outcome::Delivered),
        };
        Classified::all(request, response, outcome)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::destinations::test_support::{self, body};

    fn settings() -> Settings {
        Settings {
            preset: NamePreset::Retail,
            api_key: Secret::new("pk_test_0123456789"),
            revision: DEFAULT_REVISION.into(),
            base_url: None,
        }
    }

    fn klaviyo() -> Klaviyo {
        Klaviyo::new(settings())
    }

    fn delivery(name: &str, extra: Value) -> Delivery {
        let ev = json!({
            "event": "purchase", "event_id": "e1", "occurred_at": "2026-11-26T14:03:11.250Z",
            "user_id": "u_1", "anonymous_id": "anon-1", "value": 49.5, "currency": "EUR",
            "order_id": "o-1",
            "items": [{"id": "sku-1", "name": "Shoe", "price": 24.75, "quantity": 2}],
            "context": {"page_url": "https://shop.example/checkout"},
            "properties": {"coupon": "XMAS"}
        });
        test_support::delivery("klaviyo", name, ev, extra)
    }

    fn response(status: u16, headers: &[(&str, &str)], body: &str) -> Response {
        Response {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn an_event_is_one_json_api_request_with_key_revision_and_unique_id() {
        let reqs = klaviyo().map(&[delivery("Placed Order", json!({}))]);
        assert_eq!(reqs.len(), 1);
        let r = &reqs[0];
        assert_eq!(r.url, "https://a.klaviyo.com/api/events");
        assert_eq!(r.endpoint, "events");
        assert_eq!(r.rows, vec![0]);
        let header = |n: &str| {
            r.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(
            header("Authorization"),
            Some("Klaviyo-API-Key pk_test_0123456789")
        );
        assert_eq!(header("revision"), Some("2026-10-15"));
        assert_eq!(header("Content-Type"), Some("application/vnd.api+json"));
        assert_eq!(
            body(r),
            json!({"data": {"type": "event", "attributes": {
                "properties": {
                    "coupon": "XMAS", "order_id": "o-1",
                    "items": [{"product_id": "sku-1", "name": "Shoe", "price": 24.75, "quantity": 2}],
                    "page_url": "https://shop.example/checkout"
                },
                "time": "2026-11-26T14:03:11Z",
                "value": 49.5, "value_currency": "EUR",
                "unique_id": "e1",
                "metric": {"data": {"type": "metric", "attributes": {"name": "Placed Order"}}},
                "profile": {"data": {"type": "profile", "attributes": {"external_id": "u_1"}}}
            }}})
        );
    }

    #[test]
    fn a_batch_becomes_one_request_per_event() {
        let batch: Vec<Delivery> = (0..3)
            .map(|i| delivery("x", json!({"event_id": format!("e{i}")})))
            .collect();
        let reqs = klaviyo().map(&batch);
        let rows: Vec<Vec<usize>> = reqs.iter().map(|r| r.rows.clone()).collect();
        assert_eq!(rows, vec![vec![0], vec![1], vec![2]]);
        assert_eq!(body(&reqs[2])["data"]["attributes"]["unique_id"], "e2");
    }

    #[test]
    fn contact_data_is_an_identifier_only_when_the_router_passed_it() {
        // What the router hands over with raw_contact = true.
        let d = delivery(
            "Placed Order",
            json!({"email": "jo@example.com", "phone": "+1 650 253 0000",
                   "properties": {"email": "jo@example.com", "coupon": "XMAS"}}),
        );
        let b = body(&klaviyo().map(&[d])[0]);
        let a = &b["data"]["attributes"];
        assert_eq!(
            a["profile"]["data"]["attributes"],
            json!({"external_id": "u_1", "email": "jo@example.com", "phone_number": "+16502530000"})
        );
        assert!(a["properties"].get("email").is_none());
        // A national number is left out, not guessed or sent as is.
        let d = delivery("x", json!({"phone": "650 253 0000"}));
        let b = body(&klaviyo().map(&[d])[0]);
        assert!(
            b["data"]["attributes"]["profile"]["data"]["attributes"]
                .get("phone_number")
                .is_none()
        );
    }

    #[test]
    fn identify_imports_the_profile_with_its_traits() {
        let d = delivery(
            "profile-import",
            json!({"event": "identify", "value": null, "currency": null, "order_id": null,
                   "items": null, "email": "jo@example.com",
                   "traits": {"first_name": "Jo", "plan": "pro", "email": "jo@example.com"}}),
        );
        let r = &klaviyo().map(&[d])[0];
        assert_eq!(r.url, "https://a.klaviyo.com/api/profile-import");
        assert_eq!(r.endpoint, "profiles");
        assert_eq!(
            body(r),
            json!({"data": {"type": "profile", "attributes": {
                "external_id": "u_1", "email": "jo@example.com", "first_name": "Jo",
                "properties": {"plan": "pro"}
            }}})
        );
    }

    #[test]
    fn an_event_nobody_can_be_found_by_is_refused() {
        let k = klaviyo();
        assert_eq!(k.refuse(&delivery("x", json!({}))), None);
        let anonymous = delivery("x", json!({"user_id": null}));
        let r = k.refuse(&anonymous).unwrap();
        assert_eq!(r.class, "klaviyo_no_identifier");
        assert_eq!(
            k.refuse(&delivery(
                "x",
                json!({"user_id": null, "email": "a@b.example"})
            )),
            None
        );
        let long = delivery(&"n".repeat(128), json!({}));
        assert_eq!(
            k.refuse(&long).unwrap().class,
            "klaviyo_metric_name_too_long"
        );
        let big = delivery(
            "x",
            json!({"properties": {"blob": "y".repeat(MAX_EVENT_BYTES)}}),
        );
        assert_eq!(k.refuse(&big).unwrap().class, "klaviyo_too_large");
        let big_profile = delivery(
            "profile-import",
            json!({"event": "identify", "traits": {"bio": "y".repeat(MAX_PROFILE_BYTES)}}),
        );
        assert_eq!(k.refuse(&big_profile).unwrap().class, "klaviyo_too_large");
    }

    #[test]
    fn settings_are_checked() {
        let ok = test_support::vendor("klaviyo", "destinations.k", "api_key = \"pk_abc\"");
        let Ok(super::super::Vendor::Klaviyo(s)) = ok else {
            panic!("{ok:?}");
        };
        assert_eq!(s.revision, DEFAULT_REVISION);
        assert!(
            test_support::vendor(
                "klaviyo",
                "d",
                "api_key = \"pk_abc\"\nrevision = \"2025-01-15.pre\""
            )
            .is_ok()
        );
        let p = test_support::vendor(
            "klaviyo",
            "destinations.k",
            "api_key = \"Klaviyo-API-Key pk_secret\"\nrevision = \"2025-13-40\"\nbase_url = \"ftp://x\"",
        )
        .unwrap_err();
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "destinations.k.api_key",
                "destinations.k.revision",
                "destinations.k.base_url"
            ]
        );
        assert!(p.iter().all(|p| !p.message.contains("pk_secret")));
        assert!(
            test_support::vendor("klaviyo", "d", "api_key = \"pk_a\"\nregion = \"eu\"").is_err()
        );
        for bad in ["2025-1-15", "20250115", "2025-01-15.", "v2025-01-15"] {
            assert!(!is_revision(bad), "{bad}");
        }
    }

    #[test]
    fn retail_uses_klaviyos_own_metric_names() {
        let s = settings();
        assert_eq!(s.preset_name(&EventName::Purchase), Some("Placed Order"));
        assert_eq!(
            s.preset_name(&EventName::ViewContent),
            Some("Viewed Product")
        );
        assert_eq!(s.preset_name(&EventName::AddToCart), Some("Added to Cart"));
        assert_eq!(
            s.preset_name(&EventName::BeginCheckout),
            Some("Started Checkout")
        );
        assert_eq!(s.preset_name(&EventName::SignUp), Some("Signed Up"));
        let saas = Settings {
            preset: NamePreset::Saas,
            ..settings()
        };
        assert_eq!(
            saas.preset_name(&EventName::Purchase),
            Some("Payment Completed")
        );
        let custom = EventName::Custom("custom.webinar_registered".into());
        assert_eq!(s.preset_name(&custom), Some("webinar_registered"));
    }

    #[test]
    fn policy_is_a_crm_that_needs_a_marketing_yes() {
        assert_eq!(SPEC.default_consent(), Some("marketing"));
        assert_eq!(
            SPEC.consent_default(),
            crate::settings::ConsentDefault::Deny
        );
        assert!(!SPEC.hashes_only(), "raw_contact = true is allowed");
    }

    /// Answers in Klaviyo's shapes (the OpenAPI `ClientError` body) and what
    /// each means for the event.
    #[test]
    fn recorded_answers_classify() {
        let batch = [delivery("Placed Order", json!({}))];
        let invalid = r#"{"errors":[{"id":"4b7c","status":400,"code":"invalid","title":"Invalid input.","detail":"'jo@example.com' is not a valid email address.","source":{"pointer":"/data/attributes/profile/data/attributes/email"}}]}"#;
        let missing = r#"{"errors":[{"id":"9d1e","status":400,"code":"required","title":"Missing required field.","detail":"The field 'metric' is required.","source":{"pointer":"/data/attributes/metric"}}]}"#;
        let auth = r#"{"errors":[{"id":"1a","status":401,"code":"not_authenticated","title":"Authentication credentials were not provided.","detail":"Missing or invalid private key.","source":{"pointer":"/data/"}}]}"#;
        let denied = r#"{"errors":[{"id":"2b","status":403,"code":"permission_denied","title":"You do not have permission to perform this action.","detail":"The API key does not have the required scope events:write.","source":{"pointer":"/data/"}}]}"#;
        let throttled = r#"{"errors":[{"id":"3c","status":429,"code":"throttled","title":"Request was throttled.","detail":"Request was throttled. Expected available in 7 seconds.","source":{"pointer":"/data/"}}]}"#;
        let server = r#"{"errors":[{"id":"5e","status":500,"code":"error","title":"A server error occurred.","detail":"A server error occurred.","source":{"pointer":"/data/"}}]}"#;
        type Expect = Box<dyn Fn(&Outcome) -> bool>;
        let rejected = |class: &'static str, words: &'static str| -> Expect {
            Box::new(
                move |o| matches!(o, Outcome::Rejected { class: c, reason } if c == class && reason.contains(words)),
            )
        };
        let table: Vec<(Response, Expect)> = vec![
            (
                response(202, &[], ""),
                Box::new(|o| *o == Outcome::Delivered),
            ),
            (
                response(201, &[], "{}"),
                Box::new(|o| *o == Outcome::Delivered),
            ),
            (
                response(200, &[], "{}"),
                Box::new(|o| *o == Outcome::Delivered),
            ),
            (
                response(400, &[], invalid),
                rejected("klaviyo_invalid", "is not a valid email address"),
            ),
            (
                response(400, &[], missing),
                rejected("klaviyo_required", "at /data/attributes/metric"),
            ),
            (
                response(401, &[], auth),
                rejected("klaviyo_auth", "invalid private key"),
            ),
            (
                response(403, &[], denied),
                rejected("klaviyo_auth", "events:write"),
            ),
            (
                response(413, &[], "Request Entity Too Large"),
                rejected("klaviyo_too_large", "cannot be split"),
            ),
            (
                response(404, &[], "<html>not found</html>"),
                rejected("klaviyo_http_404", "not found"),
            ),
            (
                response(429, &[("retry-after", "7")], throttled),
                Box::new(
                    |o| matches!(o, Outcome::Retry { after: Some(a), .. } if *a == Duration::from_secs(7)),
                ),
            ),
            (
                response(500, &[], server),
                Box::new(|o| matches!(o, Outcome::Retry { after: None, .. })),
            ),
            (
                response(503, &[("retry-after", "2")], ""),
                Box::new(|o| matches!(o, Outcome::Retry { after: Some(_), .. })),
            ),
        ];
        for (resp, expect) in table {
            let got = test_support::classify(&klaviyo(), &resp, &batch);
            assert!(got.iter().all(&expect), "HTTP {}: {got:?}", resp.status);
            // A raw email in Klaviyo's words never reaches a reason.
            for o in &got {
                if let Outcome::Rejected { reason, .. } = o {
                    assert!(!reason.contains("jo@example.com"), "{reason}");
                }
            }
        }
        assert!(test_support::throttle(
            &klaviyo(),
            &response(429, &[("retry-after", "7")], throttled),
            &batch
        ));
        assert!(!test_support::throttle(
            &klaviyo(),
            &response(500, &[], server),
            &batch
        ));
    }
}
