//! GA4 Measurement Protocol (`type = "ga4"`).
//!
//! `POST {host}/mp/collect?measurement_id=…&api_secret=…` (host from
//! `region`: www.google-analytics.com, or region1.google-analytics.com for
//! "eu"; `base_url` overrides both), or `/debug/mp/collect` with
//! `debug_endpoint`. Body `{client_id, user_id?, timestamp_micros, consent?,
//! user_data?, events:[{name, params, timestamp_micros}]}`.
//!
//! Everything but `events` is per request, so one request carries events of
//! one person only (same client id, user id, consent and hashes); the batch
//! is cut into runs of consecutive events that share those, at most 25
//! events and 130 kB each. Each event also carries its own
//! `timestamp_micros` (the request's is its first event's), so events of one
//! person at different times keep their times.
//!
//! `client_id` (required) is the GA client id when the publisher sent it (the
//! `_ga` cookie value, in the property or external id named by
//! `client_id_property`), which joins the event to the web session; else the
//! `anonymous_id`; else a stable id derived from the person's user id (a
//! SHA-256 of it written as GA's "<number>.<number>"), so all of one
//! person's server-side events count as one device without sending the user
//! id itself as a client id.
//!
//! The event name is the router's (`preset_name`, overridable by
//! `event_names`). Names and params GA4 would drop (reserved names, bad
//! characters, more than 25 params, more than 200 items) are refused before
//! sending; over-long string values are cut to GA4's limits, as GA4 itself
//! would do. Hashed email/phone go in `user_data` per the `user_data`
//! setting; no raw contact data is ever sent.
//!
//! GA4 has no dedup of its own, so the sink checks its delivery ledger
//! before sending. Production answers 2xx whatever it thinks of the events,
//! so a 2xx is delivered; the debug endpoint's `validationMessages` reject
//! the events they name (or all of the request's, when they name none).
//! 429 and 5xx are retried.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::shared::{check_ad_consent, vendor_hash};
use super::{Contact, Kind, Spec};
use crate::delivery::Delivery;
use crate::event::normalize::{EmailRule, PhoneFormat};
use crate::event::{CanonicalEvent, ConsentState, EventName};
use crate::settings::{Problem, Region, Secret, check_url, de_duration, reporter};
use crate::sink::destination::{
    Classified, Destination, Limits, Outcome, Refusal, Request, Response,
};
use crate::sink::retry;

/// Events per request.
pub const MAX_EVENTS: usize = 25;
/// Params per event.
pub const MAX_PARAMS: usize = 25;
/// Event and param names.
pub const MAX_NAME_LEN: usize = 40;
/// Items per event.
pub const MAX_ITEMS: usize = 200;
/// The post body must be smaller than this.
pub const MAX_BODY_BYTES: usize = 130_000;
/// String param values, except the longer page params below.
pub const MAX_VALUE_LEN: usize = 100;
const LONG_PARAMS: &[(&str, usize)] = &[
    ("page_location", 1000),
    ("page_referrer", 420),
    ("page_title", 300),
];
const MAX_USER_ID_LEN: usize = 256;

/// Names GA4 keeps for its own automatically collected events.
pub const RESERVED_EVENT_NAMES: &[&str] = &[
    "ad_activeview",
    "ad_click",
    "ad_exposure",
    "ad_impression",
    "ad_query",
    "ad_reward",
    "adunit_exposure",
    "app_background",
    "app_clear_data",
    "app_exception",
    "app_remove",
    "app_store_refund",
    "app_store_subscription_cancel",
    "app_store_subscription_convert",
    "app_store_subscription_renew",
    "app_update",
    "app_upgrade",
    "dynamic_link_app_open",
    "dynamic_link_app_update",
    "dynamic_link_first_open",
    "error",
    "first_open",
    "first_visit",
    "in_app_purchase",
    "notification_dismiss",
    "notification_foreground",
    "notification_open",
    "notification_receive",
    "os_update",
    "session_start",
    "session_start_with_rollout",
    "user_engagement",
];
/// Prefixes GA4 keeps for itself, for event and param names alike.
pub const RESERVED_PREFIXES: &[&str] = &["_", "firebase_", "google_", "ga_"];

/// Why `name` cannot be a GA4 event or param name, if it cannot.
pub fn name_problem(name: &str, event: bool) -> Option<String> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() > MAX_NAME_LEN {
        return Some(format!("`{name}` is not 1-{MAX_NAME_LEN} characters"));
    }
    if let Some(p) = RESERVED_PREFIXES.iter().find(|p| name.starts_with(**p)) {
        return Some(format!("`{name}` uses the reserved prefix `{p}`"));
    }
    if !b[0].is_ascii_alphabetic() || !b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_') {
        return Some(format!(
            "`{name}` must start with a letter and hold only letters, digits and _"
        ));
    }
    if event && RESERVED_EVENT_NAMES.contains(&name) {
        return Some(format!("`{name}` is a reserved GA4 event name"));
    }
    None
}

/// Analytics, but given hashed email/phone (`user_data`): hashes only, and
/// nothing without a yes to `analytics`.
pub const SPEC: Spec = Spec {
    type_name: "ga4",
    kind: Kind::Analytics,
    contact: Contact::HashesOnly,
    email: EmailRule::Google,
    phone: PhoneFormat::E164,
    ordering: false,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub measurement_id: String,
    pub api_secret: Secret,
    /// Where GA4 is sent: "global" or "eu" (region1.google-analytics.com).
    #[serde(default)]
    pub region: Region,
    /// Overrides the host chosen by `region` (tests, proxies).
    pub base_url: Option<String>,
    /// Send to the validation server (`/debug/mp/collect`): Google answers
    /// with `validationMessages` and records nothing.
    #[serde(default)]
    pub debug_endpoint: bool,
    /// `validation_behavior` in the body ("RELAXED" or
    /// "ENFORCE_RECOMMENDATIONS"); unset = Google's default.
    pub validation_behavior: Option<String>,
    /// Property (or external id) holding the GA client id (`_ga` cookie value).
    #[serde(default = "default_client_id_property")]
    pub client_id_property: String,
    /// When `user_data` (hashed email/phone) is sent: "with_user_id"
    /// (Google's older rule), "always", or "never".
    #[serde(default = "default_user_data")]
    pub user_data: String,
    /// Canonical consent category behind `consent.ad_user_data`; "" = never sent.
    #[serde(default = "crate::settings::default_consent_ad_user_data")]
    pub consent_ad_user_data: String,
    /// Canonical consent category behind `consent.ad_personalization`; "" = never sent.
    #[serde(default = "crate::settings::default_consent_ad_personalization")]
    pub consent_ad_personalization: String,
    /// Event properties copied into the event's params as they are.
    #[serde(default)]
    pub params_from_properties: Vec<String>,
    /// Oldest event GA4 takes (72 h per the sending guide; the use-case
    /// guide says two business days).
    #[serde(default = "default_max_event_age", deserialize_with = "de_duration")]
    pub max_event_age: Duration,
}

fn default_client_id_property() -> String {
    "ga_client_id".into()
}
fn default_user_data() -> String {
    "with_user_id".into()
}
fn default_max_event_age() -> Duration {
    Duration::from_secs(72 * 3600)
}

impl Settings {
    /// What types cannot say; each problem is named under `key`.
    pub fn check(&self, key: &str, problems: &mut Vec<Problem>) {
        let mut bad = reporter(key, problems);
        if !self.measurement_id.starts_with("G-") || self.measurement_id.len() < 4 {
            bad("measurement_id", "must look like \"G-XXXXXXX\"".into());
        }
        if let Some(u) = &self.base_url
            && let Err(why) = check_url(u)
        {
            bad("base_url", why);
        }
        if let Some(v) = &self.validation_behavior
            && !matches!(v.as_str(), "RELAXED" | "ENFORCE_RECOMMENDATIONS")
        {
            bad(
                "validation_behavior",
                "must be \"RELAXED\" or \"ENFORCE_RECOMMENDATIONS\"".into(),
            );
        }
        if self.client_id_property.trim().is_empty() {
            bad("client_id_property", "must not be empty".into());
        }
        if !matches!(self.user_data.as_str(), "with_user_id" | "always" | "never") {
            bad(
                "user_data",
                "must be \"with_user_id\", \"always\" or \"never\"".into(),
            );
        }
        check_ad_consent(
            &self.consent_ad_user_data,
            &self.consent_ad_personalization,
            &mut bad,
        );
        if self.max_event_age.is_zero() {
            bad("max_event_age", "must be more than 0".into());
        }
        for p in &self.params_from_properties {
            if let Some(why) = name_problem(p, false) {
                bad(
                    "params_from_properties",
                    format!("GA4 drops the param: {why}"),
                );
            }
        }
    }

    /// GA4's recommended event names; `None` = not sent.
    pub fn preset_name<'a>(&self, event: &'a EventName) -> Option<&'a str> {
        use EventName::*;
        Some(match event {
            ViewContent => "view_item",
            AddToCart => "add_to_cart",
            BeginCheckout => "begin_checkout",
            SignUp => "sign_up",
            Lead => "generate_lead",
            Purchase => "purchase",
            Search => "search",
            Refund => "refund",
            StartTrial | Subscribe | Renewal | Identify | Custom(_) => return None,
        })
    }
}

pub struct Ga4 {
    settings: Settings,
    url: String,
}

impl Ga4 {
    pub fn new(settings: Settings) -> Self {
        let host = settings.base_url.clone().unwrap_or_else(|| {
            match settings.region {
                Region::Eu => "https://region1.google-analytics.com",
                Region::Global => "https://www.google-analytics.com",
            }
            .to_string()
        });
        let path = if settings.debug_endpoint {
            "debug/mp/collect"
        } else {
            "mp/collect"
        };
        let query = serde_urlencoded::to_string([
            ("measurement_id", settings.measurement_id.as_str()),
            ("api_secret", settings.api_secret.expose()),
        ])
        .expect("strings encode");
        let url = format!("{}/{path}?{query}", host.trim_end_matches('/'));
        Ga4 { settings, url }
    }

    /// The request-level part of the body for this event's person.
    fn head(&self, ev: &CanonicalEvent) -> Head {
        let user_id = ev
            .user_id
            .as_deref()
            .filter(|u| usable_id(u) && u.len() <= MAX_USER_ID_LEN)
            .map(str::to_string);
        let consent = {
            let status = |category: &str| {
                (!category.is_empty())
                    .then(|| ev.consent_for(category))
                    .flatten()
                    .map(|c| match c {
                        ConsentState::Granted => "GRANTED",
                        ConsentState::Denied => "DENIED",
                    })
            };
            let c = Consent {
                ad_user_data: status(&self.settings.consent_ad_user_data),
                ad_personalization: status(&self.settings.consent_ad_personalization),
            };
            (c.ad_user_data.is_some() || c.ad_personalization.is_some()).then_some(c)
        };
        let send_user_data = match self.settings.user_data.as_str() {
            "always" => true,
            "never" => false,
            _ => user_id.is_some(),
        };
        let user_data = send_user_data
            .then(|| UserData {
                sha256_email_address: ev
                    .email_sha256
                    .as_deref()
                    .and_then(vendor_hash)
                    .into_iter()
                    .collect(),
                sha256_phone_number: ev
                    .phone_sha256
                    .as_deref()
                    .and_then(vendor_hash)
                    .into_iter()
                    .collect(),
            })
            .filter(|u| !u.sha256_email_address.is_empty() || !u.sha256_phone_number.is_empty());
        Head {
            client_id: self.client_id(ev),
            user_id,
            consent,
            user_data,
        }
    }

    fn client_id(&self, ev: &CanonicalEvent) -> String {
        let key = self.settings.client_id_property.as_str();
        let from_properties =
            ev.properties
                .as_ref()
                .and_then(|p| p.get(key))
                .and_then(|v| match v {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                });
        from_properties
            .or_else(|| ev.external_ids.get(key).cloned())
            .or_else(|| ev.anonymous_id.clone())
            .map(|s| s.trim().to_string())
            .filter(|s| usable_id(s))
            .unwrap_or_else(|| derived_client_id(ev.anchor()))
    }

    /// The event's params, or why GA4 would drop the event.
    fn params(&self, d: &Delivery) -> Result<Map<String, Value>, Refusal> {
        let ev = &d.event;
        let mut p = Map::new();
        if let Some(v) = ev.value {
            p.insert("value".into(), json!(v));
        }
        if let Some(c) = &ev.currency {
            p.insert("currency".into(), json!(c));
        }
        // GA4 requires a transaction id on purchases and refunds (it is how
        // GA4 ties a refund to its purchase); the event id stands in when
        // the publisher has no order id.
        let transaction_id = ev.order_id.clone().or_else(|| {
            matches!(ev.event, EventName::Purchase | EventName::Refund).then(|| ev.event_id.clone())
        });
        if let Some(t) = transaction_id {
            p.insert("transaction_id".into(), json!(t));
        }
        if !ev.items.is_empty() {
            if ev.items.len() > MAX_ITEMS {
                return Err(Refusal {
                    class: "ga4_limits",
                    reason: format!(
                        "{} items; GA4 takes at most {MAX_ITEMS} per event",
                        ev.items.len()
                    ),
                });
            }
            let items: Vec<Value> = ev
                .items
                .iter()
                .map(|it| {
                    let mut m = Map::new();
                    m.insert("item_id".into(), json!(cut(&it.id, MAX_VALUE_LEN)));
                    for (k, v) in [
                        ("item_name", &it.name),
                        ("item_category", &it.category),
                        ("item_brand", &it.brand),
                        ("item_variant", &it.variant),
                    ] {
                        if let Some(v) = v {
                            m.insert(k.into(), json!(cut(v, MAX_VALUE_LEN)));
                        }
                    }
                    if let Some(price) = it.price {
                        m.insert("price".into(), json!(price));
                    }
                    if let Some(q) = it.quantity {
                        m.insert("quantity".into(), json!(q));
                    }
                    Value::Object(m)
                })
                .collect();
            p.insert("items".into(), Value::Array(items));
        }
        if let Some(ctx) = &ev.context {
            if let Some(u) = &ctx.page_url {
                p.insert("page_location".into(), json!(u));
            }
            if let Some(r) = &ctx.referrer {
                p.insert("page_referrer".into(), json!(r));
            }
        }
        let props = ev.properties.as_ref();
        let prop = |k: &str| props.and_then(|m| m.get(k)).filter(|v| is_scalar(v));
        for k in ["session_id", "engagement_time_msec"] {
            if let Some(v) = prop(k) {
                p.insert(k.into(), v.clone());
            }
        }
        if ev.event == EventName::Search
            && let Some(q) = prop("search_term").or_else(|| prop("search_query"))
        {
            p.insert("search_term".into(), q.clone());
        }
        for k in &self.settings.params_from_properties {
            if let Some(why) = name_problem(k, false) {
                return Err(Refusal {
                    class: "ga4_param_name",
                    reason: format!("param {why}"),
                });
            }
            if let Some(v) = prop(k) {
                p.insert(k.clone(), v.clone());
            }
        }
        if p.len() > MAX_PARAMS {
            return Err(Refusal {
                class: "ga4_limits",
                reason: format!(
                    "{} params; GA4 takes at most {MAX_PARAMS} per event",
                    p.len()
                ),
            });
        }
        for (k, v) in p.iter_mut() {
            if let Value::String(s) = v {
                let max = LONG_PARAMS
                    .iter()
                    .find(|(n, _)| n == k)
                    .map_or(MAX_VALUE_LEN, |(_, m)| *m);
                if s.chars().count() > max {
                    *s = cut(s, max);
                }
            }
        }
        Ok(p)
    }

    fn event(&self, d: &Delivery) -> Result<Event, Refusal> {
        if let Some(why) = name_problem(&d.name, true) {
            return Err(Refusal {
                class: "ga4_event_name",
                reason: format!("GA4 drops this event: {why}"),
            });
        }
        Ok(Event {
            name: d.name.clone(),
            params: self.params(d)?,
            timestamp_micros: micros(d),
        })
    }

    fn request(&self, head: &Head, events: Vec<Event>, rows: Vec<usize>) -> Request {
        let body = Body {
            client_id: &head.client_id,
            user_id: head.user_id.as_deref(),
            timestamp_micros: events.first().map_or(0, |e| e.timestamp_micros),
            consent: head.consent.as_ref(),
            user_data: head.user_data.as_ref(),
            validation_behavior: self.settings.validation_behavior.as_deref(),
            events,
        };
        let headers = vec![("Content-Type".into(), "application/json".into())];
        let body = serde_json::to_vec(&body).expect("events serialise to JSON");
        Request::post("events", &self.url, headers, body, rows)
    }
}

fn micros(d: &Delivery) -> i64 {
    d.event.occurred_at.timestamp_micros()
}

/// A client or user id GA4 may be given: not blank, and not an email
/// address (GA4's terms forbid personal data in ids).
fn usable_id(s: &str) -> bool {
    !s.trim().is_empty() && !s.contains('@')
}

/// GA's client id shape ("<number>.<number>") from a digest of the person's
/// anchor: stable across batches, and not the id itself.
pub fn derived_client_id(anchor: &str) -> String {
    let h = Sha256::digest(format!("switchyard-ga4:{anchor}").as_bytes());
    let a = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let b = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    format!("{a}.{b}")
}

fn is_scalar(v: &Value) -> bool {
    matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_))
}

fn cut(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[derive(Serialize, PartialEq)]
struct Consent {
    #[serde(skip_serializing_if = "Option::is_none")]
    ad_user_data: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ad_personalization: Option<&'static str>,
}

#[derive(Serialize, PartialEq)]
struct UserData {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sha256_email_address: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sha256_phone_number: Vec<String>,
}

/// What one request's events must share.
#[derive(PartialEq)]
struct Head {
    client_id: String,
    user_id: Option<String>,
    consent: Option<Consent>,
    user_data: Option<UserData>,
}

#[derive(Serialize)]
struct Event {
    name: String,
    params: Map<String, Value>,
    timestamp_micros: i64,
}

#[derive(Serialize)]
struct Body<'a> {
    client_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    timestamp_micros: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    consent: Option<&'a Consent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_data: Option<&'a UserData>,
    #[serde(skip_serializing_if = "Option::is_none")]
    validation_behavior: Option<&'a str>,
    events: Vec<Event>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct Validation {
    validation_messages: Vec<Message>,
}

#[derive(Deserialize, Default, Debug)]
#[serde(rename_all = "camelCase", default)]
struct Message {
    field_path: String,
    description: String,
    validation_code: String,
}

/// The event index a validation message is about: `events[N]…` or
/// `events.N…` in the field path, or "index: [N]" in the description (the
/// form Google's own example uses). `None` = the request as a whole.
fn message_index(m: &Message) -> Option<usize> {
    let digits = |s: &str| -> Option<usize> {
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        s[..end].parse().ok()
    };
    if let Some(rest) = m.field_path.strip_prefix("events") {
        let rest = rest.trim_start_matches(['[', '.']);
        if let Some(i) = digits(rest) {
            return Some(i);
        }
    }
    let d = &m.description;
    let at = d
        .find("index: [")
        .map(|i| i + 8)
        .or_else(|| d.find("index [").map(|i| i + 7))?;
    digits(&d[at..])
}

impl Destination for Ga4 {
    fn limits(&self) -> Limits {
        Limits {
            max_events: MAX_EVENTS,
            max_bytes: 1024 * 1024,
            max_event_age: Some(self.settings.max_event_age),
        }
    }

    fn refuse(&self, delivery: &Delivery) -> Option<Refusal> {
        self.event(delivery).err()
    }

    fn vendor_dedup(&self) -> bool {
        false
    }

    fn map(&self, batch: &[Delivery]) -> Vec<Request> {
        let mut requests = Vec::new();
        // (head, events, their rows, body bytes so far)
        let mut run: Option<(Head, Vec<Event>, Vec<usize>, usize)> = None;
        for (i, d) in batch.iter().enumerate() {
            // The runtime refuses such events before they reach `map`.
            let Ok(event) = self.event(d) else {
                continue;
            };
            let head = self.head(&d.event);
            let size = serde_json::to_vec(&event).map_or(0, |v| v.len()) + 1;
            if let Some((h, mut events, mut rows, bytes)) = run.take() {
                // Room for the head's own fields is kept with a margin.
                let fits =
                    h == head && events.len() < MAX_EVENTS && bytes + size < MAX_BODY_BYTES - 2048;
                if fits {
                    events.push(event);
                    rows.push(i);
                    run = Some((h, events, rows, bytes + size));
                    continue;
                }
                requests.push(self.request(&h, events, rows));
            }
            run = Some((head, vec![event], vec![i], size));
        }
        if let Some((h, events, rows, _)) = run {
            requests.push(self.request(&h, events, rows));
        }
        requests
    }

    fn classify(&self, request: &Request, response: &Response, _: &[Delivery]) -> Classified {
        if let Some(o) = retry::by_status(response, SystemTime::now()) {
            return Classified::all(request, response, o);
        }
        let messages = serde_json::from_slice::<Validation>(&response.body)
            .map(|v| v.validation_messages)
            .unwrap_or_default();
        let reject = |m: &Message| Outcome::Rejected {
            class: if m.validation_code.is_empty() {
                "ga4_invalid".into()
            } else {
                format!("ga4_{}", m.validation_code.to_ascii_lowercase())
            },
            reason: format!(
                "GA4 validation {} at `{}`: {}",
                m.validation_code, m.field_path, m.description
            ),
        };
        let general = messages.iter().find(|m| message_index(m).is_none());
        // The body's events are the request's rows, in order.
        let rows = (0..request.rows.len())
            .map(|i| {
                messages
                    .iter()
                    .find(|m| message_index(m) == Some(i))
                    .or(general)
                    .map_or(Outcome::Delivered, reject)
            })
            .collect();
        Classified::rows(response, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::test_support::{self, body, ok};

    const EMAIL_HASH: &str = "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b";

    fn settings() -> Settings {
        Settings {
            measurement_id: "G-TEST1".into(),
            api_secret: Secret::new("s3cret&x"),
            region: Region::Global,
            base_url: None,
            debug_endpoint: false,
            validation_behavior: None,
            client_id_property: "ga_client_id".into(),
            user_data: "with_user_id".into(),
            consent_ad_user_data: "ads".into(),
            consent_ad_personalization: "ad_personalization".into(),
            params_from_properties: vec![],
            max_event_age: Duration::from_secs(72 * 3600),
        }
    }

    fn ga4() -> Ga4 {
        Ga4::new(settings())
    }

    fn delivery(name: &str, extra: Value) -> Delivery {
        let ev = json!({
            "event": "purchase", "event_id": "e1", "occurred_at": "2026-11-26T14:03:11Z",
            "user_id": "u_1", "anonymous_id": "anon-1", "value": 49.5, "currency": "EUR",
            "order_id": "o-1", "email_sha256": EMAIL_HASH,
            "items": [{"id": "sku-1", "name": "Shoe", "category": "Shoes", "brand": "B",
                       "variant": "red", "price": 24.75, "quantity": 2}],
            "context": {"page_url": "https://shop.example/checkout", "referrer": "https://google.com/"},
            "properties": {"session_id": "1700000000", "engagement_time_msec": 1200, "plan": "pro"},
            "consent": {"analytics": "granted", "ads": "granted"}
        });
        test_support::delivery("ga4", name, ev, extra)
    }

    #[test]
    fn urls_follow_region_debug_and_base_url() {
        assert_eq!(
            ga4().url,
            "https://www.google-analytics.com/mp/collect?measurement_id=G-TEST1&api_secret=s3cret%26x"
        );
        let mut s = settings();
        s.region = Region::Eu;
        s.debug_endpoint = true;
        assert!(
            Ga4::new(s.clone())
                .url
                .starts_with("https://region1.google-analytics.com/debug/mp/collect?")
        );
        s.base_url = Some("http://127.0.0.1:9/".into());
        assert!(
            Ga4::new(s)
                .url
                .starts_with("http://127.0.0.1:9/debug/mp/collect?")
        );
    }

    #[test]
    fn body_carries_ids_consent_hashes_and_params() {
        let r = &ga4().map(&[delivery("purchase", json!({}))])[0];
        assert_eq!(
            body(r),
            json!({
                "client_id": "anon-1",
                "user_id": "u_1",
                "timestamp_micros": 1_795_701_791_000_000_i64,
                "consent": {"ad_user_data": "GRANTED"},
                "user_data": {"sha256_email_address": [EMAIL_HASH]},
                "events": [{
                    "name": "purchase",
                    "params": {
                        "value": 49.5, "currency": "EUR", "transaction_id": "o-1",
                        "items": [{"item_id": "sku-1", "item_name": "Shoe", "item_category": "Shoes",
                                   "item_brand": "B", "item_variant": "red", "price": 24.75, "quantity": 2}],
                        "page_location": "https://shop.example/checkout",
                        "page_referrer": "https://google.com/",
                        "session_id": "1700000000",
                        "engagement_time_msec": 1200
                    },
                    "timestamp_micros": 1_795_701_791_000_000_i64
                }]
            })
        );
    }

    #[test]
    fn client_id_prefers_the_ga_cookie_then_anonymous_then_derived() {
        let d = delivery(
            "purchase",
            json!({"properties": {"ga_client_id": "123.456"}}),
        );
        assert_eq!(body(&ga4().map(&[d])[0])["client_id"], "123.456");
        let d = delivery("purchase", json!({"anonymous_id": null}));
        let cid = body(&ga4().map(&[d])[0])["client_id"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(cid, derived_client_id("u_1"));
        assert!(!cid.contains("u_1"));
        let (a, b) = cid.split_once('.').unwrap();
        assert!(a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok());
        // An email is never an id.
        let d = delivery(
            "purchase",
            json!({"anonymous_id": "a@b.example", "user_id": "x@y.example"}),
        );
        let b = body(&ga4().map(&[d])[0]);
        assert!(b.get("user_id").is_none());
        assert!(!b.to_string().contains('@'));
    }

    #[test]
    fn user_data_follows_the_setting() {
        let no_user = delivery("purchase", json!({"user_id": null}));
        assert!(
            body(&ga4().map(std::slice::from_ref(&no_user))[0])
                .get("user_data")
                .is_none()
        );
        let mut s = settings();
        s.user_data = "always".into();
        assert!(
            body(&Ga4::new(s.clone()).map(std::slice::from_ref(&no_user))[0])
                .get("user_data")
                .is_some()
        );
        s.user_data = "never".into();
        assert!(
            body(&Ga4::new(s).map(&[delivery("purchase", json!({}))])[0])
                .get("user_data")
                .is_none()
        );
    }

    #[test]
    fn requests_hold_one_person_and_at_most_25_events() {
        let mut batch: Vec<Delivery> = (0..30)
            .map(|i| delivery("purchase", json!({"event_id": format!("e{i}")})))
            .collect();
        batch.push(delivery(
            "purchase",
            json!({"event_id": "other", "user_id": "u_2", "anonymous_id": "anon-2"}),
        ));
        batch.push(delivery("purchase", json!({"event_id": "back"})));
        let reqs = ga4().map(&batch);
        assert_eq!(
            test_support::ranges(&reqs),
            vec![0..25, 25..30, 30..31, 31..32]
        );
        assert_eq!(body(&reqs[2])["client_id"], "anon-2");
    }

    #[test]
    fn each_event_keeps_its_own_time() {
        let batch = [
            delivery("purchase", json!({"event_id": "a"})),
            delivery(
                "purchase",
                json!({"event_id": "b", "occurred_at": "2026-11-26T14:05:00Z"}),
            ),
        ];
        let b = body(&ga4().map(&batch)[0]);
        assert_eq!(b["timestamp_micros"], b["events"][0]["timestamp_micros"]);
        assert_eq!(
            b["events"][1]["timestamp_micros"],
            1_795_701_900_000_000_i64
        );
    }

    #[test]
    fn names_and_limits_are_refused_before_sending() {
        for bad in [
            "session_start",
            "ga_thing",
            "_x",
            "9lives",
            "has-dash",
            &"a".repeat(41),
        ] {
            let r = ga4().refuse(&delivery(bad, json!({}))).unwrap();
            assert_eq!(r.class, "ga4_event_name", "{bad}");
        }
        assert_eq!(ga4().refuse(&delivery("generate_lead", json!({}))), None);
        let mut s = settings();
        s.params_from_properties = (0..20).map(|i| format!("p{i}")).collect();
        let props: Map<String, Value> = (0..20).map(|i| (format!("p{i}"), json!(i))).collect();
        let d = delivery("purchase", json!({"properties": props}));
        let r = Ga4::new(s).refuse(&d).unwrap();
        assert_eq!(r.class, "ga4_limits");
        assert!(r.reason.contains("params"));
        let items: Vec<Value> = (0..201).map(|i| json!({"id": format!("s{i}")})).collect();
        assert_eq!(
            ga4()
                .refuse(&delivery("purchase", json!({"items": items})))
                .unwrap()
                .class,
            "ga4_limits"
        );
    }

    #[test]
    fn long_values_are_cut_to_ga4_limits() {
        let long = format!("https://shop.example/{}", "x".repeat(2000));
        let d = delivery(
            "purchase",
            json!({"context": {"page_url": long, "referrer": long}, "order_id": "o".repeat(150)}),
        );
        let p = &body(&ga4().map(&[d])[0])["events"][0]["params"];
        assert_eq!(p["page_location"].as_str().unwrap().len(), 1000);
        assert_eq!(p["page_referrer"].as_str().unwrap().len(), 420);
        assert_eq!(p["transaction_id"].as_str().unwrap().len(), 100);
    }

    #[test]
    fn transaction_id_falls_back_to_event_id_for_purchases_only() {
        let p = |name: &str, ev: &str| {
            let d = delivery(name, json!({"event": ev, "order_id": null}));
            body(&ga4().map(&[d])[0])["events"][0]["params"].clone()
        };
        assert_eq!(p("purchase", "purchase")["transaction_id"], "e1");
        assert_eq!(p("refund", "refund")["transaction_id"], "e1");
        assert!(p("generate_lead", "lead").get("transaction_id").is_none());
    }

    #[test]
    fn validation_messages_reject_the_events_they_name() {
        let batch: Vec<Delivery> = (0..3)
            .map(|i| delivery("purchase", json!({"event_id": format!("e{i}")})))
            .collect();
        assert_eq!(
            test_support::classify(&ga4(), &ok(json!({"validationMessages": []})), &batch),
            vec![Outcome::Delivered; 3]
        );
        let empty = Response {
            status: 204,
            headers: vec![],
            body: vec![],
        };
        assert_eq!(
            test_support::classify(&ga4(), &empty, &batch),
            vec![Outcome::Delivered; 3]
        );
        let o = test_support::classify(
            &ga4(),
            &ok(json!({"validationMessages": [
                {"fieldPath": "events", "description": "Event at index: [1] has invalid name [x-y].", "validationCode": "NAME_INVALID"},
                {"fieldPath": "events[2].params.currency", "description": "bad", "validationCode": "VALUE_INVALID"}
            ]})),
            &batch,
        );
        assert_eq!(o[0], Outcome::Delivered);
        assert!(matches!(&o[1], Outcome::Rejected { class, .. } if class == "ga4_name_invalid"));
        assert!(matches!(&o[2], Outcome::Rejected { class, .. } if class == "ga4_value_invalid"));
        let o = test_support::classify(
            &ga4(),
            &ok(json!({"validationMessages": [
                {"fieldPath": "client_id", "description": "required", "validationCode": "VALUE_REQUIRED"}
            ]})),
            &batch,
        );
        assert!(o.iter().all(
            |o| matches!(o, Outcome::Rejected { class, .. } if class == "ga4_value_required")
        ));
        let busy = Response {
            status: 503,
            headers: vec![],
            body: vec![],
        };
        assert!(
            test_support::classify(&ga4(), &busy, &batch)
                .iter()
                .all(|o| matches!(o, Outcome::Retry { .. }))
        );
    }
}
