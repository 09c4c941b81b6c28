//! Amplitude HTTP V2 API (`type = "amplitude"`).
//!
//! `POST {host}/2/httpapi`, `Content-Type: application/json`, body
//! `{"api_key", "options"?: {"min_id_length"}, "events": [...]}`. Host by
//! `region`: `https://api2.amplitude.com` (default data residency) or
//! `https://api.eu.amplitude.com` (EU); `base_url` overrides both (tests,
//! proxies). The project API key travels in the body.
//!
//! Checked in Amplitude's own documentation (December 2026):
//! - amplitude.com/docs/apis/analytics/http-v2 (source:
//!   amplitude/amplitude-docs, the HTTP V2 API page): endpoints and hosts,
//!   the `Content-Type` header, the body (`api_key`, `events`, `options.
//!   min_id_length`), event keys (`user_id`/`device_id`, one required, at
//!   least 5 characters unless `min_id_length` says otherwise, a too short
//!   one is removed from the event; the ids refused with a 400, "anonymous",
//!   "null", "0"…; a missing `device_id` is set to a hash of the `user_id`;
//!   `event_type`, with `$identify` predefined and `[Amplitude] …` names
//!   reserved; `time` in ms since epoch, any other format is a 400;
//!   `event_properties`, `user_properties` with `$set`/`$setOnce` on
//!   `$identify`; `price`, `quantity`, `revenue` (negative for refunds),
//!   `productId` and `revenueType` (which need a price or revenue); `ip`;
//!   `insert_id`), string values at most 1024 characters, "Event
//!   deduplication" (an `insert_id` repeated on the same `device_id` within
//!   7 days is ignored), and the answers: 200 `{code, events_ingested,
//!   payload_size_bytes, server_upload_time}`; 400 with `error`,
//!   `missing_field`, `events_with_invalid_fields` and
//!   `events_with_missing_fields` (field → event indexes), or
//!   `silenced_devices`/`silenced_events`; 403 from the WAF; 413 "Payload too
//!   large"; 429 with `eps_threshold`, `throttled_devices`, `throttled_users`
//!   (id → events per second) and `throttled_events` (indexes), "pause
//!   sending events for that user or device for a period of 30 seconds";
//!   500/502/504 may have ingested (retry with the same insert_id); 503 did
//!   not.
//! - amplitude.com/docs/apis/analytics/http-api-batching-retries (updated
//!   2026-11-05): up to 2,000 events per request, requests under 1 MB (413
//!   above), 30 events per second per user or device; "When a 400 response
//!   lists rejected events, remove those events and resend the rest"; a
//!   retry with the same `insert_id` does not duplicate.
//! - amplitude/Amplitude-Kotlin `ResponseHandler` (Amplitude's own SDK, for
//!   what the docs leave open): on a 400 the events named in
//!   `events_with_invalid_fields`, `events_with_missing_fields` and
//!   `silenced_events` are dropped and the others sent again; on a 429 the
//!   `throttled_events` wait and the others are sent again at once (so a
//!   429 ingests nothing); Amplitude-TypeScript also reads
//!   `events_with_invalid_id_lengths` and `exceeded_daily_quota_users`/
//!   `_devices`.
//!
//! Mapping: `event_type` = the preset name; `user_id` = user_id and
//! `device_id` = anonymous_id, each only if Amplitude would keep it (an id
//! it would remove is left out here, so what is sent is what Amplitude
//! keys on); both on one event is how Amplitude links the anonymous device
//! to the known user. `time` = occurred_at in ms; `insert_id` = 32 hex of
//! SHA-256("switchyard:amplitude:" + event_id). `ip` = context.ip (never
//! `$remote`: that would be our server's address). Identify → `$identify`
//! with `user_properties.$set` = traits (the router leaves contact traits,
//! email and phone out unless `raw_contact = true`), chosen over the
//! separate Identify API because it travels in the same request as the
//! events, keeps their order and is deduplicated by `insert_id` like them.
//! Revenue (`revenue`, `revenueType`, `productId`) is sent only for the
//! events that are money (purchase, subscribe, renewal, refund, negative);
//! other values are an event property.
//!
//! Dedup: Amplitude drops an event whose (`device_id`, `insert_id`) it saw
//! in the last 7 days, and both are derived from the event (a missing
//! `device_id` becomes a hash of the `user_id`, also derived), so a resend
//! inside the sink's retry budget (24 h by default) is dropped:
//! `vendor_dedup` is true. A retry budget above 7 days would outlive it.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

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

/// Events per request ("up to 2,000").
pub const MAX_EVENTS: usize = 2000;
/// Request body limit: "under 1 MB"; the docs do not say which megabyte,
/// so the smaller one.
pub const MAX_BODY_BYTES: usize = 1_000_000;
/// Amplitude's default minimum length of `user_id` and `device_id`.
pub const DEFAULT_MIN_ID_LENGTH: usize = 5;
/// The longest string value Amplitude keeps.
pub const MAX_STRING_CHARS: usize = 1024;
/// `insert_id` length in hex digits.
pub const INSERT_ID_LEN: usize = 32;
/// The pause Amplitude asks of a throttled user or device.
pub const THROTTLE_PAUSE: Duration = Duration::from_secs(30);

/// Ids Amplitude refuses with a 400 ("Invalid IDs that result in a 400
/// error"), compared lower-cased.
pub const INVALID_IDS: &[&str] = &[
    "anonymous",
    "nil",
    "none",
    "null",
    "n/a",
    "na",
    "undefined",
    "unknown",
    "\"\"",
    "00000000-0000-0000-0000-000000000000",
    "{}",
    "lmy47d",
    "0",
    "-1",
];

/// Analytics that keeps a profile of the person: it needs their yes, gets
/// no hashes (Amplitude matches nothing with them) and raw email/phone
/// (as user properties) only when the destination sets `raw_contact = true`.
pub const SPEC: Spec = Spec {
    type_name: "amplitude",
    kind: Kind::Analytics,
    contact: Contact::NoneUnlessConfigured,
    email: EmailRule::Plain,
    phone: PhoneFormat::E164,
    // A throttled user or device is to pause ("pause sending events for
    // that user or device for a period of 30 seconds"): their later events
    // wait behind the retried ones instead of earning more 429s, and an
    // older `$identify` cannot land after a newer one.
    ordering: true,
};

/// Amplitude's data residencies for the HTTP V2 API.
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
    /// The project API key.
    pub api_key: Secret,
    /// "us" or "eu"; required unless `base_url` is set.
    pub region: Option<Region>,
    /// A proxy or test fake: overrides `region`.
    pub base_url: Option<String>,
    /// Amplitude's `options.min_id_length`, for projects whose ids are
    /// shorter than 5 characters.
    pub min_id_length: Option<usize>,
}

impl Settings {
    /// What types cannot say; each problem is named under `key`.
    pub fn check(&self, key: &str, problems: &mut Vec<Problem>) {
        let mut bad = reporter(key, problems);
        let k = self.api_key.expose();
        if k.trim().is_empty() || k.chars().any(char::is_whitespace) {
            bad(
                "api_key",
                "must be the project API key (no spaces, not empty)".into(),
            );
        }
        if let Some(n) = self.min_id_length
            && !(1..=MAX_STRING_CHARS).contains(&n)
        {
            bad(
                "min_id_length",
                format!("must be between 1 and {MAX_STRING_CHARS}"),
            );
        }
        match &self.base_url {
            Some(u) => {
                if let Err(why) = check_url(u) {
                    bad("base_url", why);
                }
            }
            None if self.region.is_none() => bad(
                "region",
                "must be \"us\" or \"eu\" (the project's data residency), or set base_url".into(),
            ),
            None => {}
        }
    }

    /// The preset's names; identify as `$identify` (user properties).
    pub fn preset_name<'a>(&self, event: &'a EventName) -> Option<&'a str> {
        match event {
            EventName::Identify => Some("$identify"),
            other => self.preset.name(other),
        }
    }
}

pub struct Amplitude {
    settings: Settings,
    url: String,
    min_id_length: usize,
}

/// The ids an event is sent with, as Amplitude keeps them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ids<'e> {
    user_id: Option<&'e str>,
    device_id: Option<&'e str>,
}

impl Amplitude {
    pub fn new(settings: Settings) -> Self {
        let host = match (&settings.base_url, settings.region) {
            (Some(u), _) => u.clone(),
            (None, Some(Region::Eu)) => "https://api.eu.amplitude.com".into(),
            // `check` refuses a config with neither.
            (None, _) => "https://api2.amplitude.com".into(),
        };
        let url = format!("{}/2/httpapi", host.trim_end_matches('/'));
        let min_id_length = settings.min_id_length.unwrap_or(DEFAULT_MIN_ID_LENGTH);
        Amplitude {
            settings,
            url,
            min_id_length,
        }
    }

    /// Whether Amplitude keeps `id` as a user or device id.
    fn keeps(&self, id: &str) -> bool {
        let n = id.chars().count();
        n >= self.min_id_length
            && n <= MAX_STRING_CHARS
            && !INVALID_IDS.contains(&id.trim().to_lowercase().as_str())
    }

    fn ids<'e>(&self, ev: &'e CanonicalEvent) -> Ids<'e> {
        let keep = |v: &'e Option<String>| v.as_deref().filter(|id| self.keeps(id));
        Ids {
            user_id: keep(&ev.user_id),
            device_id: keep(&ev.anonymous_id),
        }
    }

    fn event(&self, d: &Delivery) -> Value {
        let ev = &d.event;
        let ids = self.ids(ev);
        let mut e = Map::new();
        e.insert("event_type".into(), json!(d.name));
        if let Some(u) = ids.user_id {
            e.insert("user_id".into(), json!(u));
        }
        if let Some(dev) = ids.device_id {
            e.insert("device_id".into(), json!(dev));
        }
        e.insert("time".into(), json!(ev.occurred_at.timestamp_millis()));
        e.insert("insert_id".into(), json!(insert_id(&ev.event_id)));
        if let Some(ip) = ev.context.as_ref().and_then(|c| c.ip) {
            e.insert("ip".into(), json!(ip.to_string()));
        }
        if ev.event == EventName::Identify || d.name == "$identify" {
            // The router has already left contact traits, email and phone
            // out unless this destination has `raw_contact = true`.
            let mut set = ev.traits.clone().unwrap_or_default();
            if let Some(v) = &ev.email {
                set.insert("email".into(), json!(v));
            }
            if let Some(v) = &ev.phone {
                set.insert("phone".into(), json!(v));
            }
            if !set.is_empty() {
                e.insert("user_properties".into(), json!({ "$set": set }));
            }
        } else {
            revenue(ev, &mut e);
            let props = event_properties(ev);
            if !props.is_empty() {
                e.insert("event_properties".into(), Value::Object(props));
            }
        }
        Value::Object(e)
    }
}

/// Revenue fields for the events that are money. Only `revenue` is sent:
/// with price and quantity as well Amplitude would count price × quantity,
/// which is not the order's value when it has tax or shipping.
fn revenue(ev: &CanonicalEvent, e: &mut Map<String, Value>) {
    let Some(value) = ev.value else { return };
    let (amount, kind) = match ev.event {
        EventName::Purchase => (value, "purchase"),
        EventName::Subscribe => (value, "subscription"),
        EventName::Renewal => (value, "renewal"),
        // "Use negative values for refunds."
        EventName::Refund => (-value.abs(), "refund"),
        _ => return,
    };
    e.insert("revenue".into(), json!(amount));
    e.insert("revenueType".into(), json!(kind));
    if let [only] = ev.items.as_slice() {
        e.insert("productId".into(), json!(only.id));
    }
}

fn event_properties(ev: &CanonicalEvent) -> Map<String, Value> {
    // The publisher's own properties first; what switchyard derives wins.
    let mut p = ev.properties.clone().unwrap_or_default();
    if let Some(ctx) = &ev.context {
        if let Some(u) = &ctx.page_url {
            p.insert("page_url".into(), json!(u));
        }
        if let Some(r) = &ctx.referrer {
            p.insert("referrer".into(), json!(r));
        }
    }
    shared::commerce_properties(ev, "value", &mut p);
    p
}

/// The event's `insert_id`: the same on every resend of the event.
pub fn insert_id(event_id: &str) -> String {
    let h = Sha256::digest(format!("switchyard:amplitude:{event_id}").as_bytes());
    hex::encode(h)[..INSERT_ID_LEN].to_string()
}

#[derive(Serialize)]
struct Options {
    min_id_length: usize,
}

#[derive(Serialize)]
struct Envelope<'a> {
    api_key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    options: Option<Options>,
    /// Last, empty: `shared::wrap` puts the events inside.
    events: [(); 0],
}

/// The fields of Amplitude's 400 and 429 answers this module reads.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Answer {
    error: Option<String>,
    missing_field: Option<String>,
    events_with_invalid_fields: BTreeMap<String, Vec<i64>>,
    events_with_missing_fields: BTreeMap<String, Vec<i64>>,
    events_with_invalid_id_lengths: BTreeMap<String, Vec<i64>>,
    silenced_events: Vec<i64>,
    throttled_events: Vec<i64>,
    throttled_users: HashMap<String, Value>,
    throttled_devices: HashMap<String, Value>,
    exceeded_daily_quota_users: HashMap<String, Value>,
    exceeded_daily_quota_devices: HashMap<String, Value>,
}

impl Answer {
    fn read(body: &[u8]) -> Answer {
        serde_json::from_slice(body).unwrap_or_default()
    }

    /// Position in the request → why Amplitude refused that event.
    fn refused(&self, n: usize) -> HashMap<usize, String> {
        let mut out: HashMap<usize, String> = HashMap::new();
        let mut add = |i: i64, why: String| {
            if let Ok(i) = usize::try_from(i)
                && i < n
            {
                out.entry(i).or_insert(why);
            }
        };
        for (what, map) in [
            ("invalid", &self.events_with_invalid_fields),
            ("missing", &self.events_with_missing_fields),
            ("too short", &self.events_with_invalid_id_lengths),
        ] {
            for (field, idx) in map {
                for &i in idx {
                    add(i, format!("{what} field `{}`", retry::cut(field, 64)));
                }
            }
        }
        for &i in &self.silenced_events {
            add(i, "its device_id is silenced".into());
        }
        out
    }
}

impl Amplitude {
    fn classify_400(&self, request: &Request, response: &Response) -> Classified {
        let answer = Answer::read(&response.body);
        let error =
            retry::cut(answer.error.as_deref().unwrap_or("(no error text)"), 200).into_owned();
        let refused = answer.refused(request.rows.len());
        if refused.is_empty() {
            let class = if error.contains("Invalid API key") {
                "amplitude_auth"
            } else {
                "amplitude_invalid_request"
            };
            let missing = answer
                .missing_field
                .as_deref()
                .map(|f| format!(" (missing `{}`)", retry::cut(f, 64)))
                .unwrap_or_default();
            return Classified::all(
                request,
                response,
                Outcome::Rejected {
                    class: class.into(),
                    reason: format!("Amplitude (HTTP 400): {error}{missing}"),
                },
            );
        }
        let rows = (0..request.rows.len())
            .map(|i| match refused.get(&i) {
                Some(why) => Outcome::Rejected {
                    class: "amplitude_invalid_event".into(),
                    reason: format!("Amplitude (HTTP 400): {error}: {why}"),
                },
                // Amplitude ingested nothing of the request; the others
                // were not at fault.
                None => Outcome::Resend,
            })
            .collect();
        Classified::rows(response, rows)
    }

    fn classify_429(
        &self,
        request: &Request,
        response: &Response,
        batch: &[Delivery],
    ) -> Classified {
        let answer = Answer::read(&response.body);
        let after = response
            .header("retry-after")
            .and_then(|v| retry::retry_after(v, SystemTime::now()))
            .unwrap_or(THROTTLE_PAUSE);
        let n = request.rows.len();
        let mut throttled = vec![false; n];
        for &i in &answer.throttled_events {
            if let Ok(i) = usize::try_from(i)
                && i < n
            {
                throttled[i] = true;
            }
        }
        let named = |map: &HashMap<String, Value>, id: Option<&str>| {
            id.is_some_and(|id| map.contains_key(id))
        };
        let mut quota = vec![false; n];
        for (pos, d) in request.deliveries(batch).enumerate() {
            let ids = self.ids(&d.event);
            throttled[pos] |= named(&answer.throttled_users, ids.user_id)
                || named(&answer.throttled_devices, ids.device_id);
            quota[pos] = named(&answer.exceeded_daily_quota_users, ids.user_id)
                || named(&answer.exceeded_daily_quota_devices, ids.device_id);
        }
        let none_named = !throttled.iter().chain(&quota).any(|&t| t);
        let rows = (0..n)
            .map(|i| {
                if quota[i] {
                    // The quota is daily: the attempts left may outlast it.
                    Outcome::Retry {
                        after: None,
                        reason: "Amplitude (HTTP 429): the user or device is over the project's daily event quota".into(),
                    }
                } else if throttled[i] || none_named {
                    Outcome::Retry {
                        after: Some(after),
                        reason: "Amplitude (HTTP 429): the user or device is over Amplitude's events-per-second limit".into(),
                    }
                } else {
                    // A 429 ingests none of the request.
                    Outcome::Resend
                }
            })
            .collect();
        Classified {
            rows,
            throttle: true,
        }
    }
}

impl Destination for Amplitude {
    fn limits(&self) -> Limits {
        Limits {
            max_events: MAX_EVENTS,
            max_bytes: MAX_BODY_BYTES,
            // The HTTP V2 API documents no maximum event age.
            max_event_age: None,
        }
    }

    fn refuse(&self, d: &Delivery) -> Option<Refusal> {
        let ids = self.ids(&d.event);
        if ids.user_id.is_none() && ids.device_id.is_none() {
            return Some(Refusal {
                class: "amplitude_no_id",
                reason: format!(
                    "neither user_id nor anonymous_id is an id Amplitude keeps (at least {} characters, at most {MAX_STRING_CHARS}, not a placeholder such as \"null\")",
                    self.min_id_length
                ),
            });
        }
        if d.name.starts_with("[Amplitude]") {
            return Some(Refusal {
                class: "amplitude_reserved_name",
                reason: "event names starting with \"[Amplitude]\" are reserved by Amplitude"
                    .into(),
            });
        }
        if d.name.is_empty() || d.name.chars().count() > MAX_STRING_CHARS {
            return Some(Refusal {
                class: "amplitude_bad_name",
                reason: format!("the event name must have 1 to {MAX_STRING_CHARS} characters"),
            });
        }
        let size = serde_json::to_vec(&self.event(d)).map_or(0, |v| v.len());
        (size > MAX_BODY_BYTES).then(|| Refusal {
            class: "amplitude_event_too_large",
            reason: format!(
                "the event is {size} bytes as sent; an Amplitude request must stay under {MAX_BODY_BYTES} bytes"
            ),
        })
    }

    fn vendor_dedup(&self) -> bool {
        true
    }

    fn map(&self, batch: &[Delivery]) -> Vec<Request> {
        let events: Vec<Vec<u8>> = batch
            .iter()
            .map(|d| serde_json::to_vec(&self.event(d)).expect("events serialise to JSON"))
            .collect();
        let envelope = serde_json::to_vec(&Envelope {
            api_key: self.settings.api_key.expose(),
            options: self
                .settings
                .min_id_length
                .map(|min_id_length| Options { min_id_length }),
            events: [],
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

    fn classify(&self, request: &Request, response: &Response, batch: &[Delivery]) -> Classified {
        match response.status {
            400 => self.classify_400(request, response),
            429 => self.classify_429(request, response, batch),
            403 => Classified::all(
                request,
                response,
                Outcome::Rejected {
                    class: "amplitude_forbidden".into(),
                    reason: format!(
                        "Amplitude's firewall blocked the request (HTTP 403): {}",
                        retry::excerpt(&response.body, 200)
                    ),
                },
            ),
            _ => {
                let outcome =
                    retry::by_status(response, SystemTime::now()).unwrap_or(Outcome::Delivered);
                Classified::all(request, response, outcome)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::test_support::{self, body, ok};

    fn settings() -> Settings {
        Settings {
            preset: NamePreset::Retail,
            api_key: Secret::new("0123456789abcdef0123456789abcdef"),
            region: Some(Region::Us),
            base_url: None,
            min_id_length: None,
        }
    }

    fn amp() -> Amplitude {
        Amplitude::new(settings())
    }

    fn delivery(name: &str, extra: Value) -> Delivery {
        let ev = json!({
            "event": "purchase", "event_id": "e1", "occurred_at": "2026-11-26T14:03:11Z",
            "user_id": "user-1", "anonymous_id": "anon-1", "value": 49.5, "currency": "EUR",
            "order_id": "o-1",
            "items": [{"id": "sku-1", "name": "Shoe", "price": 24.75, "quantity": 2}],
            "context": {"ip": "203.0.113.7", "page_url": "https://shop.example/checkout"},
            "properties": {"plan": "pro"}
        });
        test_support::delivery("amplitude", name, ev, extra)
    }

    fn answer(status: u16, body: Value, headers: &[(&str, &str)]) -> Response {
        Response {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: serde_json::to_vec(&body).unwrap(),
        }
    }

    #[test]
    fn urls_follow_region_and_base_url() {
        assert_eq!(amp().url, "https://api2.amplitude.com/2/httpapi");
        let mut s = settings();
        s.region = Some(Region::Eu);
        assert_eq!(
            Amplitude::new(s.clone()).url,
            "https://api.eu.amplitude.com/2/httpapi"
        );
        s.base_url = Some("http://127.0.0.1:9/".into());
        assert_eq!(Amplitude::new(s).url, "http://127.0.0.1:9/2/httpapi");
    }

    #[test]
    fn settings_are_checked() {
        let v = test_support::vendor(
            "amplitude",
            "destinations.amp",
            "api_key = \"k123\"\nregion = \"eu\"",
        );
        assert!(v.is_ok(), "{v:?}");
        let p = test_support::vendor(
            "amplitude",
            "destinations.amp",
            "api_key = \"has space\"\nmin_id_length = 0",
        )
        .unwrap_err();
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "destinations.amp.api_key",
                "destinations.amp.min_id_length",
                "destinations.amp.region"
            ]
        );
        assert!(
            p.iter().all(|p| !p.message.contains("has space")),
            "the key is never repeated"
        );
        // A residency Amplitude does not have, or a typo, stops at parsing.
        assert!(
            test_support::vendor("amplitude", "d", "api_key = \"k\"\nregion = \"asia\"").is_err()
        );
        assert!(
            test_support::vendor(
                "amplitude",
                "d",
                "api_key = \"k\"\nregion = \"us\"\nmin_id_lenght = 3"
            )
            .is_err()
        );
    }

    #[test]
    fn insert_id_is_stable_and_32_hex() {
        let a = insert_id("evt_1");
        assert_eq!(a.len(), INSERT_ID_LEN);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(a, insert_id("evt_1"));
        assert_ne!(a, insert_id("evt_2"));
    }

    #[test]
    fn a_purchase_carries_ids_time_revenue_and_properties() {
        let r = &amp().map(&[delivery("Order Completed", json!({}))])[0];
        assert_eq!(r.url, "https://api2.amplitude.com/2/httpapi");
        assert!(
            r.headers
                .contains(&("Content-Type".into(), "application/json".into()))
        );
        assert_eq!(
            body(r),
            json!({
                "api_key": "0123456789abcdef0123456789abcdef",
                "events": [{
                    "event_type": "Order Completed",
                    "user_id": "user-1",
                    "device_id": "anon-1",
                    "time": 1_795_701_791_000_i64,
                    "insert_id": insert_id("e1"),
                    "ip": "203.0.113.7",
                    "revenue": 49.5,
                    "revenueType": "purchase",
                    "productId": "sku-1",
                    "event_properties": {
                        "plan": "pro",
                        "page_url": "https://shop.example/checkout",
                        "value": 49.5, "currency": "EUR", "order_id": "o-1",
                        "products": [{"product_id": "sku-1", "name": "Shoe", "price": 24.75, "quantity": 2}]
                    }
                }]
            })
        );
    }

    #[test]
    fn only_money_events_carry_revenue_and_refunds_are_negative() {
        let cart = delivery("Product Added", json!({"event": "add_to_cart"}));
        let e = &body(&amp().map(&[cart])[0])["events"][0];
        assert!(e.get("revenue").is_none(), "{e}");
        assert_eq!(e["event_properties"]["value"], 49.5);
        let refund = delivery("Order Refunded", json!({"event": "refund", "items": []}));
        let e = &body(&amp().map(&[refund])[0])["events"][0];
        assert_eq!(
            (e["revenue"].clone(), e["revenueType"].clone()),
            (json!(-49.5), json!("refund"))
        );
        assert!(e.get("productId").is_none());
    }

    #[test]
    fn identify_sets_user_properties_and_links_device_to_user() {
        let d = delivery(
            "$identify",
            json!({"event": "identify", "traits": {"plan": "pro"}, "value": null,
                   "currency": null, "order_id": null, "items": null}),
        );
        let e = &body(&amp().map(&[d])[0])["events"][0];
        assert_eq!(e["event_type"], "$identify");
        assert_eq!(
            (e["user_id"].clone(), e["device_id"].clone()),
            (json!("user-1"), json!("anon-1"))
        );
        assert_eq!(e["user_properties"], json!({"$set": {"plan": "pro"}}));
        assert!(e.get("event_properties").is_none() && e.get("revenue").is_none());
        // Raw contact data is in the delivery only when the router allowed it.
        let d = delivery(
            "$identify",
            json!({"event": "identify", "email": "jo@example.com", "traits": {}}),
        );
        let e = &body(&amp().map(&[d])[0])["events"][0];
        assert_eq!(e["user_properties"]["$set"]["email"], "jo@example.com");
        assert_eq!(
            amp().refuse(&delivery("$identify", json!({"event": "identify"}))),
            None
        );
    }

    #[test]
    fn ids_amplitude_would_remove_are_left_out_and_an_event_without_any_is_refused() {
        let d = delivery("x", json!({"user_id": "abc", "anonymous_id": "null"}));
        assert_eq!(amp().refuse(&d).unwrap().class, "amplitude_no_id");
        let d = delivery("x", json!({"user_id": "abc", "anonymous_id": "anon-1"}));
        assert_eq!(amp().refuse(&d), None);
        let e = &body(&amp().map(std::slice::from_ref(&d))[0])["events"][0];
        assert!(e.get("user_id").is_none());
        assert_eq!(e["device_id"], "anon-1");
        // A project with short ids says so, and Amplitude is told.
        let mut s = settings();
        s.min_id_length = Some(3);
        let b = body(&Amplitude::new(s).map(&[d])[0]);
        assert_eq!(b["options"], json!({"min_id_length": 3}));
        assert_eq!(b["events"][0]["user_id"], "abc");
        assert!(
            body(&amp().map(&[delivery("x", json!({}))])[0])
                .get("options")
                .is_none()
        );
        let reserved = delivery("[Amplitude] Revenue", json!({}));
        assert_eq!(
            amp().refuse(&reserved).unwrap().class,
            "amplitude_reserved_name"
        );
    }

    #[test]
    fn presets_and_custom_names() {
        let s = settings();
        assert_eq!(s.preset_name(&EventName::Purchase), Some("Order Completed"));
        assert_eq!(s.preset_name(&EventName::Identify), Some("$identify"));
        let custom = EventName::Custom("custom.webinar_registered".into());
        assert_eq!(s.preset_name(&custom), Some("webinar_registered"));
    }

    #[test]
    fn requests_hold_at_most_2000_events() {
        let batch: Vec<Delivery> = (0..2001)
            .map(|i| delivery("x", json!({"event_id": format!("e{i}")})))
            .collect();
        assert_eq!(
            test_support::ranges(&amp().map(&batch)),
            vec![0..2000, 2000..2001]
        );
        let big = delivery(
            "x",
            json!({"properties": {"blob": "y".repeat(MAX_BODY_BYTES)}}),
        );
        assert_eq!(
            amp().refuse(&big).unwrap().class,
            "amplitude_event_too_large"
        );
    }

    #[test]
    fn policy_is_analytics_with_a_yes_and_vendor_dedup() {
        assert_eq!(SPEC.default_consent(), Some("analytics"));
        assert!(!SPEC.hashes_only());
        assert_eq!(
            SPEC.consent_default(),
            crate::settings::ConsentDefault::Deny
        );
        assert!(amp().vendor_dedup());
    }

    /// Answers shaped as Amplitude's docs record them, and what each means
    /// for the rows of a four-event request.
    #[test]
    fn recorded_answers_classify() {
        let batch: Vec<Delivery> = ["busy-user", "calm-user", "busy-user", "other-user"]
            .iter()
            .enumerate()
            .map(|(i, u)| {
                delivery(
                    "x",
                    json!({"event_id": format!("e{i}"), "user_id": u, "anonymous_id": null}),
                )
            })
            .collect();
        let rejected = |class: &'static str, words: &'static str| move |o: &Outcome| matches!(o, Outcome::Rejected { class: c, reason } if c == class && reason.contains(words));
        let retry30 = |o: &Outcome| matches!(o, Outcome::Retry { after: Some(a), .. } if *a == THROTTLE_PAUSE);
        let resend = |o: &Outcome| *o == Outcome::Resend;
        let delivered = |o: &Outcome| *o == Outcome::Delivered;
        type Expect = Box<dyn Fn(&Outcome) -> bool>;
        let all = |f: Expect| -> Vec<Expect> {
            let f = std::rc::Rc::new(f);
            (0..4)
                .map(|_| {
                    let f = f.clone();
                    Box::new(move |o: &Outcome| f(o)) as Expect
                })
                .collect()
        };
        let table: Vec<(&str, Response, Vec<Expect>, bool)> = vec![
            (
                "success",
                ok(
                    json!({"code": 200, "events_ingested": 4, "payload_size_bytes": 500, "server_upload_time": 1_396_381_378_123_i64}),
                ),
                all(Box::new(delivered)),
                false,
            ),
            (
                "partial: invalid and missing fields",
                answer(
                    400,
                    json!({"code": 400, "error": "Invalid field values on some events",
                    "events_with_invalid_fields": {"time": [1]}, "events_with_missing_fields": {"event_type": [3]}}),
                    &[],
                ),
                vec![
                    Box::new(resend),
                    Box::new(rejected("amplitude_invalid_event", "invalid field `time`")),
                    Box::new(resend),
                    Box::new(rejected(
                        "amplitude_invalid_event",
                        "missing field `event_type`",
                    )),
                ],
                false,
            ),
            (
                "partial: silenced devices",
                answer(
                    400,
                    json!({"code": 400, "error": "Events silenced for device_id", "eps_threshold": 100,
                    "silenced_devices": ["d1"], "silenced_events": [2], "throttled_devices": {}, "throttled_events": []}),
                    &[],
                ),
                vec![
                    Box::new(resend),
                    Box::new(resend),
                    Box::new(rejected("amplitude_invalid_event", "silenced")),
                    Box::new(resend),
                ],
                false,
            ),
            (
                "request-level missing field",
                answer(
                    400,
                    json!({"code": 400, "error": "Request missing required field", "missing_field": "api_key"}),
                    &[],
                ),
                all(Box::new(rejected(
                    "amplitude_invalid_request",
                    "missing `api_key`",
                ))),
                false,
            ),
            (
                "invalid api key",
                answer(400, json!({"code": 400, "error": "Invalid API key"}), &[]),
                all(Box::new(rejected("amplitude_auth", "Invalid API key"))),
                false,
            ),
            (
                "an index past the request names nothing",
                answer(
                    400,
                    json!({"code": 400, "error": "Invalid field values on some events", "events_with_invalid_fields": {"time": [9, -1]}}),
                    &[],
                ),
                all(Box::new(rejected(
                    "amplitude_invalid_request",
                    "Invalid field values",
                ))),
                false,
            ),
            (
                "throttled by index and by user",
                answer(
                    429,
                    json!({"code": 429, "error": "Too many requests for some devices and users", "eps_threshold": 30,
                    "throttled_devices": {}, "throttled_users": {"busy-user": 32}, "throttled_events": [0]}),
                    &[],
                ),
                vec![
                    Box::new(retry30),
                    Box::new(resend),
                    Box::new(retry30),
                    Box::new(resend),
                ],
                true,
            ),
            (
                "throttled, naming nobody: all wait",
                answer(
                    429,
                    json!({"code": 429, "error": "Too many requests"}),
                    &[("retry-after", "7")],
                ),
                all(Box::new(
                    |o: &Outcome| matches!(o, Outcome::Retry { after: Some(a), .. } if *a == Duration::from_secs(7)),
                )),
                true,
            ),
            (
                "over the daily quota",
                answer(
                    429,
                    json!({"code": 429, "error": "Too many requests", "exceeded_daily_quota_users": {"other-user": 500000}}),
                    &[],
                ),
                vec![
                    Box::new(resend),
                    Box::new(resend),
                    Box::new(resend),
                    Box::new(
                        |o: &Outcome| matches!(o, Outcome::Retry { after: None, reason } if reason.contains("daily")),
                    ),
                ],
                true,
            ),
            (
                "too large",
                answer(413, json!({"code": 413, "error": "Payload too large"}), &[]),
                all(Box::new(|o: &Outcome| *o == Outcome::Split)),
                false,
            ),
            (
                "blocked by the firewall",
                answer(403, json!({"code": 403, "error": "Forbidden"}), &[]),
                all(Box::new(rejected("amplitude_forbidden", "Forbidden"))),
                false,
            ),
            (
                "unauthorised",
                answer(401, json!({"code": 401, "error": "Unauthorized"}), &[]),
                all(Box::new(rejected("http_401", "Unauthorized"))),
                false,
            ),
            (
                "server error",
                answer(502, json!({"code": 502}), &[]),
                all(Box::new(|o: &Outcome| matches!(o, Outcome::Retry { .. }))),
                false,
            ),
            (
                "unavailable",
                answer(503, json!({"code": 503}), &[]),
                all(Box::new(|o: &Outcome| matches!(o, Outcome::Retry { .. }))),
                false,
            ),
        ];
        for (what, resp, expect, throttle) in table {
            let got = test_support::classify(&amp(), &resp, &batch);
            assert_eq!(got.len(), expect.len(), "{what}");
            for (i, (o, e)) in got.iter().zip(&expect).enumerate() {
                assert!(e(o), "{what}: row {i}: {o:?}");
            }
            assert_eq!(
                test_support::throttle(&amp(), &resp, &batch),
                throttle,
                "{what}"
            );
        }
    }

    #[test]
    fn no_reason_repeats_the_key_or_an_email() {
        let batch = [delivery("x", json!({"user_id": "jo@example.com"}))];
        let resp = answer(
            429,
            json!({"code": 429, "throttled_users": {"jo@example.com": 40}}),
            &[],
        );
        for o in test_support::classify(&amp(), &resp, &batch) {
            let text = format!("{o:?}");
            assert!(
                !text.contains("jo@example.com") && !text.contains("0123456789abcdef"),
                "{text}"
            );
        }
    }
}
