//! Meta Conversions API (`type = "meta_capi"`).
//!
//! `POST {base_url}/{api_version}/{pixel_id}/events` with
//! `{"test_event_code"?, "data":[server event, …]}`; the token travels as
//! `Authorization: Bearer` or, as in Meta's examples, `?access_token=`
//! (`access_token_in`).
//!
//! Meta fails a whole request for one invalid event, so everything Meta is
//! sure to refuse is caught by `refuse` first and dead-lettered alone. What
//! goes out carries only hashes of contact data: `em`/`ph` are the router's
//! Meta-normalised SHA-256 digests, `external_id` the SHA-256 of each trimmed
//! id (user_id first, then the external ids). Meta drops a resend with the
//! same `event_id` and `event_name` within 48 h, so a retried request is
//! harmless and the sink needs no ledger look-up first.
//!
//! Responses: 200 `{"events_received":N}` means every event of the request
//! was taken. Errors are Graph API errors
//! `{"error":{"message","type","code","error_subcode","fbtrace_id"}}`, read
//! by `code` before the HTTP status, since Meta sends throttles and transient
//! faults with several statuses.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::shared::{
    FUTURE_TOLERANCE, future_refusal, hash_refusal, hashed_external_ids, requests, vendor_hash,
};
use super::{Contact, Kind, Spec};
use crate::delivery::Delivery;
use crate::event::normalize::{EmailRule, PhoneFormat};
use crate::event::{CanonicalEvent, EventName};
use crate::settings::{Problem, Secret, check_url, is_api_version, reporter};
use crate::sink::destination::{
    Classified, Destination, Limits, Outcome, Refusal, Request, Response,
};
use crate::sink::retry;

/// Events per request (Meta's documented maximum).
pub const MAX_EVENTS: usize = 1000;
/// Bytes per request body. Meta names no byte limit; this keeps a full
/// request of rich events well under what Graph API front ends take.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// Meta fails the whole request when any `event_time` is older than this.
pub const MAX_EVENT_AGE: Duration = Duration::from_secs(7 * 86_400);

/// Graph API error codes that mean "slow down" (API, user, app, page and
/// ads-management rate limits).
const THROTTLE_CODES: &[i64] = &[4, 17, 32, 341, 613];
/// Business-use-case rate limits (80000–80014, e.g. 80003 custom audiences,
/// 80004 ads management).
const BUC_THROTTLES: std::ops::RangeInclusive<i64> = 80000..=80014;

/// An ad platform: hashed identifiers only, and nothing without a yes to `ads`.
pub const SPEC: Spec = Spec {
    type_name: "meta_capi",
    kind: Kind::AdPlatform,
    contact: Contact::HashesOnly,
    email: EmailRule::Plain,
    phone: PhoneFormat::DigitsOnly,
    ordering: false,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub pixel_id: String,
    pub access_token: Secret,
    #[serde(default = "default_version")]
    pub api_version: String,
    #[serde(default = "default_action_source")]
    pub action_source: String,
    /// Per canonical `source` (the publishing service), an action_source
    /// other than `action_source`: e.g. `{ billing = "system_generated" }`,
    /// because server-made events have no page URL or user agent, which
    /// Meta requires of `website` events.
    #[serde(default)]
    pub action_source_by_source: BTreeMap<String, String>,
    pub test_event_code: Option<String>,
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Where the access token travels. Meta's docs show the `access_token`
    /// query parameter; the Graph API also takes `Authorization: Bearer`,
    /// which keeps the token out of URLs (and so out of client error text).
    #[serde(default)]
    pub access_token_in: TokenPlacement,
    /// Meta's Limited Data Use flags: `[]` (none) or `["LDU"]`.
    #[serde(default)]
    pub data_processing_options: Vec<String>,
    /// With LDU: 0 = let Meta geolocate, 1 = United States.
    pub data_processing_options_country: Option<u32>,
    /// With LDU: 0 = let Meta geolocate, 1000 = California (Meta numbers
    /// further US states from 1000 up).
    pub data_processing_options_state: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenPlacement {
    /// `Authorization: Bearer <token>`.
    #[default]
    Header,
    /// `?access_token=<token>`, as in Meta's examples.
    Query,
}

fn default_version() -> String {
    "v21.0".into()
}
fn default_action_source() -> String {
    "website".into()
}
fn default_base_url() -> String {
    "https://graph.facebook.com".into()
}

const ACTION_SOURCES: &[&str] = &[
    "website",
    "app",
    "email",
    "phone_call",
    "chat",
    "physical_store",
    "system_generated",
    "other",
];

impl Settings {
    /// What types cannot say; each problem is named under `key`.
    pub fn check(&self, key: &str, problems: &mut Vec<Problem>) {
        let mut bad = reporter(key, problems);
        let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
        if !digits(&self.pixel_id) {
            bad("pixel_id", "must be the numeric pixel / dataset id".into());
        }
        if !is_api_version(&self.api_version, true) {
            bad(
                "api_version",
                format!("`{}` is not like \"v21.0\"", self.api_version),
            );
        }
        if !ACTION_SOURCES.contains(&self.action_source.as_str()) {
            bad(
                "action_source",
                format!("must be one of {}", ACTION_SOURCES.join(", ")),
            );
        }
        for (source, action) in &self.action_source_by_source {
            if !ACTION_SOURCES.contains(&action.as_str()) {
                bad(
                    &format!("action_source_by_source.{source}"),
                    format!("must be one of {}", ACTION_SOURCES.join(", ")),
                );
            }
        }
        if let Err(why) = check_url(&self.base_url) {
            bad("base_url", why);
        }
        let ldu = match self.data_processing_options.as_slice() {
            [] => false,
            [one] if one == "LDU" => true,
            _ => {
                bad("data_processing_options", "must be [] or [\"LDU\"]".into());
                true
            }
        };
        if let Some(c) = self.data_processing_options_country {
            if !ldu {
                bad(
                    "data_processing_options_country",
                    "only applies with data_processing_options = [\"LDU\"]".into(),
                );
            } else if c > 1 {
                bad(
                    "data_processing_options_country",
                    "must be 0 (geolocate) or 1 (United States)".into(),
                );
            }
        }
        if let Some(st) = self.data_processing_options_state {
            if !ldu {
                bad(
                    "data_processing_options_state",
                    "only applies with data_processing_options = [\"LDU\"]".into(),
                );
            } else if st != 0 && !(1000..2000).contains(&st) {
                bad(
                    "data_processing_options_state",
                    "must be 0 (geolocate) or a Meta US state code such as 1000 (California)"
                        .into(),
                );
            }
        }
    }

    /// Meta's standard event names; `None` = not sent.
    pub fn preset_name<'a>(&self, event: &'a EventName) -> Option<&'a str> {
        use EventName::*;
        Some(match event {
            ViewContent => "ViewContent",
            AddToCart => "AddToCart",
            BeginCheckout => "InitiateCheckout",
            SignUp => "CompleteRegistration",
            StartTrial => "StartTrial",
            Lead => "Lead",
            Purchase => "Purchase",
            Subscribe => "Subscribe",
            Renewal => "Renewal",
            Search => "Search",
            Refund | Identify | Custom(_) => return None,
        })
    }
}

pub struct MetaCapi {
    settings: Settings,
}

impl MetaCapi {
    pub fn new(settings: Settings) -> Self {
        MetaCapi { settings }
    }

    fn url(&self) -> String {
        let base = self.settings.base_url.trim_end_matches('/');
        let url = format!(
            "{base}/{}/{}/events",
            self.settings.api_version, self.settings.pixel_id
        );
        match self.settings.access_token_in {
            TokenPlacement::Header => url,
            TokenPlacement::Query => format!(
                "{url}?{}",
                serde_urlencoded::to_string([(
                    "access_token",
                    self.settings.access_token.expose()
                )])
                .expect("a string pair encodes")
            ),
        }
    }

    fn headers(&self) -> Vec<(String, String)> {
        let mut h = vec![("Content-Type".to_string(), "application/json".to_string())];
        if self.settings.access_token_in == TokenPlacement::Header {
            h.push((
                "Authorization".into(),
                format!("Bearer {}", self.settings.access_token.expose()),
            ));
        }
        h
    }

    /// `action_source_by_source` for the event's publisher, else `action_source`.
    fn action_source(&self, ev: &CanonicalEvent) -> &str {
        ev.source
            .as_deref()
            .and_then(|s| self.settings.action_source_by_source.get(s))
            .unwrap_or(&self.settings.action_source)
    }

    /// The server event for one delivery, as sent at `now`.
    fn server_event<'a>(&'a self, d: &'a Delivery, now: DateTime<Utc>) -> ServerEvent<'a> {
        let ev = &d.event;
        let ctx = ev.context.as_ref();
        let clicks = ev.click_ids.as_ref();
        let ldu = !self.settings.data_processing_options.is_empty();
        ServerEvent {
            event_name: &d.name,
            event_time: event_time(ev.occurred_at, now),
            event_id: &ev.event_id,
            action_source: self.action_source(ev),
            event_source_url: ctx.and_then(|c| c.page_url.as_deref()),
            referrer_url: ctx.and_then(|c| c.referrer.as_deref()),
            user_data: UserData {
                em: ev
                    .email_sha256
                    .as_deref()
                    .and_then(vendor_hash)
                    .into_iter()
                    .collect(),
                ph: ev
                    .phone_sha256
                    .as_deref()
                    .and_then(vendor_hash)
                    .into_iter()
                    .collect(),
                external_id: hashed_external_ids(ev),
                client_ip_address: ctx.and_then(|c| c.ip).map(|ip| ip.to_string()),
                client_user_agent: ctx.and_then(|c| c.user_agent.as_deref()),
                fbc: clicks.and_then(|c| c.fbc.as_deref()),
                fbp: clicks.and_then(|c| c.fbp.as_deref()),
            },
            custom_data: CustomData::of(ev),
            data_processing_options: ldu.then_some(&self.settings.data_processing_options),
            data_processing_options_country: self
                .settings
                .data_processing_options_country
                .filter(|_| ldu),
            data_processing_options_state: self
                .settings
                .data_processing_options_state
                .filter(|_| ldu),
        }
    }

    fn map_at(&self, batch: &[Delivery], now: DateTime<Utc>) -> Vec<Request> {
        let events: Vec<Vec<u8>> = batch
            .iter()
            .map(|d| serde_json::to_vec(&self.server_event(d, now)).expect("events serialise"))
            .collect();
        let envelope = serde_json::to_vec(&Envelope {
            test_event_code: self.settings.test_event_code.as_deref(),
            data: Vec::new(),
        })
        .expect("envelope serialises");
        let url = self.url();
        let headers = self.headers();
        requests(
            &url,
            &headers,
            &envelope,
            &events,
            MAX_EVENTS,
            MAX_BODY_BYTES,
        )
    }

    fn refuse_at(&self, d: &Delivery, now: DateTime<Utc>) -> Option<Refusal> {
        let ev = &d.event;
        if let Some(r) = future_refusal(ev.occurred_at, now) {
            return Some(r);
        }
        if let Some(r) = hash_refusal(ev) {
            return Some(r);
        }
        let ctx = ev.context.as_ref();
        let url = ctx.and_then(|c| c.page_url.as_deref());
        let ua = ctx
            .and_then(|c| c.user_agent.as_deref())
            .filter(|u| !u.trim().is_empty());
        if self.action_source(ev) == "website" {
            match url {
                None => {
                    return Some(Refusal {
                        class: "missing_field",
                        reason: "Meta requires event_source_url (context.page_url) for action_source=website".into(),
                    });
                }
                Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                    return Some(Refusal {
                        class: "invalid_field",
                        reason: "Meta requires event_source_url to start with http:// or https://"
                            .into(),
                    });
                }
                Some(_) => {}
            }
            if ua.is_none() {
                return Some(Refusal {
                    class: "missing_field",
                    reason: "Meta requires client_user_agent (context.user_agent) for action_source=website".into(),
                });
            }
        }
        let clicks = ev.click_ids.as_ref();
        let has_customer_info = ev.email_sha256.is_some()
            || ev.phone_sha256.is_some()
            || !hashed_external_ids(ev).is_empty()
            || clicks.is_some_and(|c| c.fbc.is_some() || c.fbp.is_some())
            || (ctx.is_some_and(|c| c.ip.is_some()) && ua.is_some());
        if !has_customer_info {
            return Some(Refusal {
                class: "no_customer_information",
                reason: "Meta needs at least one customer information parameter (em, ph, external_id, fbc, fbp, or client_ip_address with client_user_agent); the event has none".into(),
            });
        }
        if d.name == "Purchase" && (ev.value.is_none() || ev.currency.is_none()) {
            return Some(Refusal {
                class: "missing_field",
                reason: "Meta requires custom_data.value and currency for Purchase".into(),
            });
        }
        None
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    test_event_code: Option<&'a str>,
    // Last, so that the serialised envelope ends in `[]}` (see `wrap`).
    data: Vec<()>,
}

#[derive(Serialize)]
struct ServerEvent<'a> {
    event_name: &'a str,
    event_time: i64,
    event_id: &'a str,
    action_source: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_source_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    referrer_url: Option<&'a str>,
    user_data: UserData<'a>,
    #[serde(skip_serializing_if = "CustomData::is_empty")]
    custom_data: CustomData<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_processing_options: Option<&'a Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_processing_options_country: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_processing_options_state: Option<u32>,
}

#[derive(Serialize)]
struct UserData<'a> {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    em: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ph: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    external_id: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_ip_address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_user_agent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fbc: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fbp: Option<&'a str>,
}

#[derive(Serialize)]
struct CustomData<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    currency: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    order_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    content_ids: Vec<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    contents: Vec<Content<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_items: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    search_string: Option<&'a str>,
}

#[derive(Serialize)]
struct Content<'a> {
    id: &'a str,
    quantity: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    item_price: Option<f64>,
}

impl<'a> CustomData<'a> {
    fn of(ev: &'a CanonicalEvent) -> Self {
        let items = &ev.items;
        CustomData {
            value: ev.value,
            currency: ev.currency.as_deref(),
            order_id: ev.order_id.as_deref(),
            content_ids: items.iter().map(|i| i.id.as_str()).collect(),
            contents: items
                .iter()
                .map(|i| Content {
                    id: &i.id,
                    // Meta requires a quantity per content; a line without one is one unit.
                    quantity: i.quantity.unwrap_or(1),
                    item_price: i.price,
                })
                .collect(),
            content_type: (!items.is_empty()).then_some("product"),
            num_items: (!items.is_empty())
                .then(|| items.iter().map(|i| i.quantity.unwrap_or(1)).sum()),
            search_string: search_query(ev),
        }
    }

    fn is_empty(&self) -> bool {
        self.value.is_none()
            && self.currency.is_none()
            && self.order_id.is_none()
            && self.contents.is_empty()
            && self.search_string.is_none()
    }
}

/// The search text of a search event (`properties.query` or `.search_string`).
pub(crate) fn search_query(ev: &CanonicalEvent) -> Option<&str> {
    let props = ev.properties.as_ref()?;
    ["query", "search_string"]
        .iter()
        .find_map(|k| props.get(*k).and_then(|v| v.as_str()))
        .filter(|s| !s.is_empty())
}

/// Unix seconds of `occurred_at`, with a slightly-future time (publisher
/// clock ahead of ours, within [`FUTURE_TOLERANCE`]) sent as `now` because
/// vendors reject future times. A time further ahead is sent as it is:
/// `refuse` keeps such events out, and the vendor's refusal says why.
pub(crate) fn event_time(occurred_at: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    let ahead = (occurred_at - now).to_std().unwrap_or(Duration::ZERO);
    if ahead > Duration::ZERO && ahead <= FUTURE_TOLERANCE {
        now.timestamp()
    } else {
        occurred_at.timestamp()
    }
}

/// A Graph API error body.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: GraphError,
}

#[derive(Debug, Deserialize)]
struct GraphError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    code: i64,
    #[serde(default)]
    error_subcode: Option<i64>,
    #[serde(default)]
    error_user_title: Option<String>,
    #[serde(default)]
    error_user_msg: Option<String>,
    #[serde(default)]
    is_transient: Option<bool>,
    #[serde(default)]
    fbtrace_id: Option<String>,
}

/// What a Graph API error means for the events of its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Retry,
    Throttle,
    Reject(&'static str),
}

/// The decision for an error `code`/`subcode` answered with `status`.
pub fn verdict(code: i64, subcode: Option<i64>, is_transient: bool, status: u16) -> Verdict {
    match code {
        c if THROTTLE_CODES.contains(&c) || BUC_THROTTLES.contains(&c) => Verdict::Throttle,
        // 1 unknown error, 2 service temporarily unavailable, 368 temporarily
        // blocked: Meta's own advice is to retry.
        1 | 2 | 368 => Verdict::Retry,
        190 | 102 => Verdict::Reject("auth"),
        10 | 200..=299 => Verdict::Reject("permission"),
        100 if subcode == Some(33) => Verdict::Reject("unknown_pixel"),
        100 if subcode == Some(2_804_003) => Verdict::Reject("expired"),
        100 => Verdict::Reject("invalid_parameter"),
        2635 => Verdict::Reject("api_version"),
        _ if is_transient || status >= 500 => Verdict::Retry,
        _ => Verdict::Reject("meta_error"),
    }
}

fn graph_error(response: &Response) -> Option<GraphError> {
    serde_json::from_slice::<ErrorBody>(&response.body)
        .ok()
        .map(|b| b.error)
}

fn describe(e: &GraphError, status: u16) -> String {
    let mut s = format!("Meta HTTP {status}, code {}", e.code);
    if let Some(sub) = e.error_subcode {
        s.push_str(&format!("/{sub}"));
    }
    s.push_str(": ");
    s.push_str(&e.message);
    for extra in [&e.error_user_title, &e.error_user_msg]
        .into_iter()
        .flatten()
    {
        if !extra.is_empty() && !e.message.contains(extra.as_str()) {
            s.push_str(" — ");
            s.push_str(extra);
        }
    }
    if let Some(t) = &e.fbtrace_id {
        s.push_str(&format!(" (fbtrace_id {t})"));
    }
    s
}

/// The one outcome every event of a request shares (Meta takes or fails a
/// request whole).
pub fn outcome(response: &Response, now: SystemTime) -> Outcome {
    if let Some(e) = graph_error(response) {
        let reason = describe(&e, response.status);
        let after = response
            .header("retry-after")
            .and_then(|v| retry::retry_after(v, now));
        return match verdict(
            e.code,
            e.error_subcode,
            e.is_transient.unwrap_or(false),
            response.status,
        ) {
            Verdict::Retry | Verdict::Throttle => Outcome::Retry { after, reason },
            Verdict::Reject(class) => Outcome::Rejected {
                class: class.into(),
                reason,
            },
        };
    }
    // 2xx without an error object: Meta took the request (`events_received`).
    retry::by_status(response, now).unwrap_or(Outcome::Delivered)
}

impl Destination for MetaCapi {
    fn limits(&self) -> Limits {
        Limits {
            max_events: MAX_EVENTS,
            max_bytes: MAX_BODY_BYTES,
            max_event_age: Some(MAX_EVENT_AGE),
        }
    }

    fn refuse(&self, delivery: &Delivery) -> Option<Refusal> {
        self.refuse_at(delivery, Utc::now())
    }

    fn vendor_dedup(&self) -> bool {
        true
    }

    fn map(&self, batch: &[Delivery]) -> Vec<Request> {
        self.map_at(batch, Utc::now())
    }

    fn classify(&self, request: &Request, response: &Response, _: &[Delivery]) -> Classified {
        Classified {
            throttle: is_throttle(response),
            ..Classified::all(request, response, outcome(response, SystemTime::now()))
        }
    }
}

/// Whether Meta asks for less traffic: 429, or a rate-limit error code.
fn is_throttle(response: &Response) -> bool {
    response.status == 429
        || graph_error(response).is_some_and(|e| {
            verdict(e.code, e.error_subcode, false, response.status) == Verdict::Throttle
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::destinations::Vendor;
    use crate::destinations::test_support::{self, body};
    use crate::event::normalize::sha256_hex;
    use serde_json::{Value, json};

    pub(crate) const EMAIL_HASH: &str =
        "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b";
    pub(crate) const PHONE_HASH: &str =
        "67d3cb9e9b1b64b913a5f2508beac167cfa7d3fb943f6a52e6767392d425a536";

    fn settings(extra: &str) -> Settings {
        let text = format!("pixel_id = \"100000000000001\"\naccess_token = \"tok en\"\n{extra}\n");
        match test_support::vendor("meta_capi", "destinations.meta", &text) {
            Ok(Vendor::MetaCapi(m)) => m,
            other => panic!("{other:?}"),
        }
    }

    fn meta(extra: &str) -> MetaCapi {
        MetaCapi::new(settings(extra))
    }

    pub(crate) fn now() -> DateTime<Utc> {
        "2026-11-26T14:10:00Z".parse().unwrap()
    }

    pub(crate) fn delivery(id: &str, name: &str, event: Value) -> Delivery {
        let base = json!({
            "event": "purchase", "event_id": id, "occurred_at": "2026-11-26T14:03:11Z",
            "user_id": "u_1", "value": 59.9, "currency": "EUR", "order_id": "o-1",
            "email_sha256": EMAIL_HASH, "phone_sha256": PHONE_HASH,
            "external_ids": {"crm": " c-9 "},
            "click_ids": {"fbc": "fb.1.1700000000000.AbC", "fbp": "fb.1.1700000000000.123", "ttclid": "E.C.P.x", "ttp": "ttp-1"},
            "context": {"ip": "203.0.113.7", "user_agent": "Mozilla/5.0", "page_url": "https://shop.example/checkout", "referrer": "https://shop.example/cart", "locale": "de-DE"},
            "items": [{"id": "sku-1", "quantity": 2, "price": 19.95}, {"id": "sku-2", "price": 20.0}]
        });
        test_support::delivery("meta", name, base, event)
    }

    fn response(status: u16, body: &str) -> Response {
        Response {
            status,
            headers: vec![],
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn maps_a_purchase_with_hashes_click_ids_and_contents() {
        let m = meta("test_event_code = \"TEST123\"");
        let reqs = m.map_at(&[delivery("e1", "Purchase", json!({}))], now());
        assert_eq!(reqs.len(), 1);
        let r = &reqs[0];
        assert_eq!(
            r.url,
            "https://graph.facebook.com/v21.0/100000000000001/events"
        );
        assert!(
            r.headers
                .contains(&("Authorization".into(), "Bearer tok en".into()))
        );
        let b = body(r);
        assert_eq!(b["test_event_code"], "TEST123");
        let e = &b["data"][0];
        assert_eq!(e["event_name"], "Purchase");
        assert_eq!(e["event_id"], "e1");
        assert_eq!(e["event_time"], 1_795_701_791);
        assert_eq!(e["action_source"], "website");
        assert_eq!(e["event_source_url"], "https://shop.example/checkout");
        assert_eq!(e["referrer_url"], "https://shop.example/cart");
        let u = &e["user_data"];
        assert_eq!(u["em"], json!([EMAIL_HASH]));
        assert_eq!(u["ph"], json!([PHONE_HASH]));
        assert_eq!(
            u["external_id"],
            json!([sha256_hex("u_1"), sha256_hex("c-9")])
        );
        assert_eq!(u["client_ip_address"], "203.0.113.7");
        assert_eq!(u["client_user_agent"], "Mozilla/5.0");
        assert_eq!(u["fbc"], "fb.1.1700000000000.AbC");
        assert_eq!(u["fbp"], "fb.1.1700000000000.123");
        assert!(u.get("ttclid").is_none());
        let c = &e["custom_data"];
        assert_eq!(c["value"], 59.9);
        assert_eq!(c["currency"], "EUR");
        assert_eq!(c["order_id"], "o-1");
        assert_eq!(c["content_ids"], json!(["sku-1", "sku-2"]));
        assert_eq!(
            c["contents"],
            json!([{"id": "sku-1", "quantity": 2, "item_price": 19.95}, {"id": "sku-2", "quantity": 1, "item_price": 20.0}])
        );
        assert_eq!(c["content_type"], "product");
        assert_eq!(c["num_items"], 3);
        assert!(e.get("data_processing_options").is_none());
    }

    #[test]
    fn token_in_query_is_url_encoded_and_absent_from_headers() {
        let r = &meta("access_token_in = \"query\"")
            .map_at(&[delivery("e1", "Lead", json!({}))], now())[0];
        assert!(r.url.ends_with("/events?access_token=tok+en"), "{}", r.url);
        assert!(!r.headers.iter().any(|(k, _)| k == "Authorization"));
    }

    #[test]
    fn limited_data_use_is_sent_only_when_configured() {
        let m = meta(
            "data_processing_options = [\"LDU\"]\ndata_processing_options_country = 1\ndata_processing_options_state = 1000",
        );
        let e = &body(&m.map_at(&[delivery("e1", "Lead", json!({}))], now())[0])["data"][0];
        assert_eq!(e["data_processing_options"], json!(["LDU"]));
        assert_eq!(e["data_processing_options_country"], 1);
        assert_eq!(e["data_processing_options_state"], 1000);
    }

    #[test]
    fn config_checks_data_processing_options() {
        let bad = |extra: &str| {
            let text = format!("pixel_id = \"1\"\naccess_token = \"t\"\n{extra}\n");
            match test_support::vendor("meta_capi", "destinations.meta", &text) {
                Err(problems) => problems.into_iter().map(|p| p.key).collect::<Vec<_>>(),
                other => panic!("accepted {extra}: {other:?}"),
            }
        };
        assert_eq!(
            bad("data_processing_options = [\"XYZ\"]"),
            vec!["destinations.meta.data_processing_options"]
        );
        assert_eq!(
            bad("data_processing_options_country = 1"),
            vec!["destinations.meta.data_processing_options_country"]
        );
        assert_eq!(
            bad("data_processing_options = [\"LDU\"]\ndata_processing_options_state = 7"),
            vec!["destinations.meta.data_processing_options_state"]
        );
        assert_eq!(
            bad("access_token_in = \"body\""),
            vec!["destinations.meta.access_token_in"]
        );
    }

    #[test]
    fn bare_events_carry_no_empty_objects_and_small_clock_drift_is_now() {
        let d = delivery(
            "e1",
            "Lead",
            json!({"event": "lead", "value": null, "currency": null, "order_id": null, "items": null,
                   "occurred_at": "2026-11-26T14:12:00Z"}),
        );
        let e = &body(&meta("").map_at(&[d], now())[0])["data"][0];
        assert!(e.get("custom_data").is_none());
        assert_eq!(e["event_time"], now().timestamp());
    }

    #[test]
    fn search_text_goes_to_search_string() {
        let d = delivery(
            "e1",
            "Search",
            json!({"event": "search", "value": null, "currency": null, "order_id": null, "items": null,
                   "properties": {"query": "red shoes"}}),
        );
        let e = &body(&meta("").map_at(&[d], now())[0])["data"][0];
        assert_eq!(e["custom_data"], json!({"search_string": "red shoes"}));
    }

    #[test]
    fn batches_split_at_the_event_limit() {
        let batch: Vec<Delivery> = (0..2500)
            .map(|i| delivery(&format!("e{i}"), "Lead", json!({})))
            .collect();
        let reqs = meta("").map_at(&batch, now());
        let ranges = test_support::ranges(&reqs);
        assert_eq!(ranges, vec![0..1000, 1000..2000, 2000..2500]);
        for r in &reqs {
            assert_eq!(body(r)["data"].as_array().unwrap().len(), r.rows.len());
        }
    }

    #[test]
    fn refusals() {
        let m = meta("");
        let cases: Vec<(&str, Delivery, Option<&str>)> = vec![
            ("complete", delivery("e", "Purchase", json!({})), None),
            (
                "no page url on a website event",
                delivery(
                    "e",
                    "Lead",
                    json!({"context": {"user_agent": "UA", "ip": "203.0.113.7"}}),
                ),
                Some("missing_field"),
            ),
            (
                "relative page url",
                delivery(
                    "e",
                    "Lead",
                    json!({"context": {"user_agent": "UA", "page_url": "/checkout"}}),
                ),
                Some("invalid_field"),
            ),
            (
                "no user agent on a website event",
                delivery(
                    "e",
                    "Lead",
                    json!({"context": {"page_url": "https://a.example/"}}),
                ),
                Some("missing_field"),
            ),
            (
                "no customer information",
                delivery(
                    "e",
                    "Lead",
                    json!({"user_id": null, "anonymous_id": "anon", "email_sha256": null, "phone_sha256": null,
                           "external_ids": null, "click_ids": null,
                           "context": {"page_url": "https://a.example/", "user_agent": "UA"}}),
                ),
                Some("no_customer_information"),
            ),
            (
                "ip with user agent is enough",
                delivery(
                    "e",
                    "Lead",
                    json!({"user_id": null, "anonymous_id": "anon", "email_sha256": null, "phone_sha256": null,
                           "external_ids": null, "click_ids": null}),
                ),
                None,
            ),
            (
                "raw email where a hash belongs",
                delivery("e", "Lead", json!({"email_sha256": "person@example.com"})),
                Some("unhashed_identifier"),
            ),
            (
                "far-future event time",
                delivery("e", "Lead", json!({"occurred_at": "2026-11-26T15:00:00Z"})),
                Some("future_event_time"),
            ),
            (
                "Purchase name without value",
                delivery(
                    "e",
                    "Purchase",
                    json!({"event": "lead", "value": null, "currency": null}),
                ),
                Some("missing_field"),
            ),
        ];
        for (what, d, class) in cases {
            assert_eq!(m.refuse_at(&d, now()).map(|r| r.class), class, "{what}");
        }
        // Non-web sources need neither page URL nor user agent.
        let crm = meta("action_source = \"system_generated\"");
        let d = delivery("e", "Lead", json!({"context": null}));
        assert_eq!(crm.refuse_at(&d, now()), None);
        // Per publisher: billing's server events are system_generated, the
        // web tracker's stay website and still need their page URL.
        let mixed = meta("action_source_by_source = { billing = \"system_generated\" }");
        let billing = delivery("e", "Lead", json!({"context": null, "source": "billing"}));
        assert_eq!(mixed.refuse_at(&billing, now()), None);
        let e = mixed.server_event(&billing, now());
        assert_eq!(e.action_source, "system_generated");
        let web = delivery(
            "e",
            "Lead",
            json!({"context": null, "source": "web-tracker"}),
        );
        assert_eq!(
            mixed.refuse_at(&web, now()).map(|r| r.class),
            Some("missing_field")
        );
    }

    #[test]
    fn classifies_recorded_responses() {
        let batch = [
            delivery("e1", "Lead", json!({})),
            delivery("e2", "Lead", json!({})),
        ];
        let m = meta("");
        // (status, body, expected: "delivered" | "retry" | class, throttle)
        let table: &[(u16, &str, &str, bool)] = &[
            (
                200,
                r#"{"events_received":2,"messages":[],"fbtrace_id":"AbC"}"#,
                "delivered",
                false,
            ),
            (200, "", "delivered", false),
            (
                500,
                r#"{"error":{"message":"An unknown error occurred","type":"OAuthException","code":1,"error_subcode":99,"is_transient":true,"fbtrace_id":"A1"}}"#,
                "retry",
                false,
            ),
            (
                503,
                r#"{"error":{"message":"Service temporarily unavailable","type":"OAuthException","code":2,"is_transient":true,"fbtrace_id":"A2"}}"#,
                "retry",
                false,
            ),
            (
                400,
                r#"{"error":{"message":"(#4) Application request limit reached","type":"OAuthException","code":4,"is_transient":true,"fbtrace_id":"A3"}}"#,
                "retry",
                true,
            ),
            (
                400,
                r#"{"error":{"message":"(#17) User request limit reached","type":"OAuthException","code":17,"error_subcode":2446079,"fbtrace_id":"A4"}}"#,
                "retry",
                true,
            ),
            (
                400,
                r#"{"error":{"message":"(#32) Page request limit reached","type":"OAuthException","code":32,"fbtrace_id":"A5"}}"#,
                "retry",
                true,
            ),
            (
                400,
                r#"{"error":{"message":"(#613) Calls to this api have exceeded the rate limit.","type":"OAuthException","code":613,"fbtrace_id":"A6"}}"#,
                "retry",
                true,
            ),
            (
                400,
                r#"{"error":{"message":"There have been too many calls to this ad-account.","type":"OAuthException","code":80003,"fbtrace_id":"A7"}}"#,
                "retry",
                true,
            ),
            (
                400,
                r#"{"error":{"message":"Invalid parameter","type":"OAuthException","code":100,"error_subcode":2804003,"error_user_title":"Event Timestamp Too Old","error_user_msg":"The timestamp for this event is more than 7 days in the past.","fbtrace_id":"A8"}}"#,
                "expired",
                false,
            ),
            (
                400,
                r#"{"error":{"message":"Invalid parameter","type":"OAuthException","code":100,"error_subcode":2804019,"error_user_msg":"The parameter $['data'][0]['event_time'] is required.","fbtrace_id":"A9"}}"#,
                "invalid_parameter",
                false,
            ),
            (
                400,
                r#"{"error":{"message":"Unsupported post request. Object with ID '1' does not exist, cannot be loaded due to missing permissions, or does not support this operation.","type":"GraphMethodException","code":100,"error_subcode":33,"fbtrace_id":"B1"}}"#,
                "unknown_pixel",
                false,
            ),
            (
                401,
                r#"{"error":{"message":"Invalid OAuth access token - Cannot parse access token","type":"OAuthException","code":190,"fbtrace_id":"B2"}}"#,
                "auth",
                false,
            ),
            (
                400,
                r#"{"error":{"message":"(#200) Permissions error","type":"OAuthException","code":200,"fbtrace_id":"B3"}}"#,
                "permission",
                false,
            ),
            (
                400,
                r#"{"error":{"message":"Something else","type":"OAuthException","code":12345,"fbtrace_id":"B4"}}"#,
                "meta_error",
                false,
            ),
            (
                400,
                r#"{"error":{"message":"Something transient","type":"OAuthException","code":12345,"is_transient":true}}"#,
                "retry",
                false,
            ),
            (502, "<html>bad gateway</html>", "retry", false),
            (429, "", "retry", true),
            (404, "not found", "http_404", false),
        ];
        for (status, text, expected, throttle) in table {
            let r = response(*status, text);
            let o = test_support::classify(&m, &r, &batch);
            assert_eq!(o.len(), 2);
            assert_eq!(o[0], o[1]);
            let got = match &o[0] {
                Outcome::Delivered => "delivered".to_string(),
                Outcome::Retry { .. } => "retry".to_string(),
                Outcome::Rejected { class, .. } => class.clone(),
                other => format!("{other:?}"),
            };
            assert_eq!(got, *expected, "{status} {text}");
            assert_eq!(
                test_support::throttle(&m, &r, &batch),
                *throttle,
                "{status} {text}"
            );
        }
    }

    #[test]
    fn rejection_reasons_carry_the_message_and_trace() {
        let r = response(
            400,
            r#"{"error":{"message":"Invalid parameter","type":"OAuthException","code":100,"error_subcode":2804019,"error_user_msg":"The parameter $['data'][0]['event_time'] is required.","fbtrace_id":"A9"}}"#,
        );
        let Outcome::Rejected { reason, .. } = outcome(&r, SystemTime::now()) else {
            panic!("not rejected")
        };
        assert!(reason.contains("code 100/2804019"), "{reason}");
        assert!(reason.contains("event_time'] is required"), "{reason}");
        assert!(reason.contains("fbtrace_id A9"), "{reason}");
        let mut throttled = response(
            400,
            r#"{"error":{"message":"limit","type":"OAuthException","code":17}}"#,
        );
        throttled.headers.push(("retry-after".into(), "30".into()));
        assert!(matches!(
            outcome(&throttled, SystemTime::now()),
            Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(30)
        ));
    }

    #[test]
    fn no_raw_contact_data_in_bodies() {
        let d = delivery("e1", "Purchase", json!({}));
        let b = String::from_utf8(meta("").map_at(&[d], now())[0].body.clone()).unwrap();
        assert!(!b.contains('@'));
        assert!(!b.contains("c-9"), "external ids are hashed");
        assert!(!b.contains("\"u_1\""));
    }
}
