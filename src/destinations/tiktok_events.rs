//! TikTok Events API 2.0 (`type = "tiktok_events"`).
//!
//! `POST {base_url}/open_api/{api_version}/event/track/` with header
//! `Access-Token` and body `{"event_source","event_source_id",
//! "test_event_code"?, "data":[event, …]}`. Each event carries `event`,
//! `event_time` (unix s), `event_id` (TikTok drops a resend with the same
//! event and event_id within 48 h), `user` (hashes only: `email` and `phone`
//! are the router's TikTok-normalised SHA-256 digests, `external_id` the
//! SHA-256 of each trimmed id; `ttclid`, `ttp`, `ip`, `user_agent`, `locale`
//! as they are), `page{url,referrer}` and `properties{value,currency,
//! order_id,content_type,contents[{content_id,quantity,price}],query}`.
//!
//! TikTok answers HTTP 200 for almost everything; the body's `code` decides:
//! 0 ok, 40100 rate limited, 5xxxx server side, 40001/40002/401xx refusals.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::meta_capi::{event_time, search_query};
use super::shared::{future_refusal, hash_refusal, hashed_external_ids, requests, vendor_hash};
use super::{Contact, Kind, Spec};
use crate::delivery::Delivery;
use crate::event::EventName;
use crate::event::normalize::{EmailRule, PhoneFormat};
use crate::settings::{Problem, Secret, check_url, de_duration, is_api_version, reporter};
use crate::sink::destination::{
    Classified, Destination, Limits, Outcome, Refusal, Request, Response,
};
use crate::sink::retry;

/// Events per request (TikTok's documented maximum).
pub const MAX_EVENTS: usize = 1000;
/// Bytes per request body; TikTok names no byte limit.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// `code` values of a TikTok Business API answer.
pub const OK: i64 = 0;
/// Some events of the batch were not taken; TikTok does not say which in a
/// shape we could verify, so the batch counts as delivered (as RudderStack
/// treats it).
pub const PARTIAL_SUCCESS: i64 = 20001;
pub const NO_PERMISSION: i64 = 40001;
pub const INVALID_PARAMETER: i64 = 40002;
pub const RATE_LIMITED: i64 = 40100;
pub const TOKEN_EXPIRED: i64 = 40102;
pub const TOKEN_MISSING: i64 = 40104;
pub const TOKEN_INVALID: i64 = 40105;
/// "Please retry" (treated as a server fault by RudderStack).
pub const RETRY_LATER: i64 = 40700;

/// An ad platform: hashed identifiers only, and nothing without a yes to `ads`.
pub const SPEC: Spec = Spec {
    type_name: "tiktok_events",
    kind: Kind::AdPlatform,
    contact: Contact::HashesOnly,
    email: EmailRule::Plain,
    phone: PhoneFormat::E164,
    ordering: false,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The pixel / event source id (`event_source_id`).
    pub pixel_code: String,
    pub access_token: Secret,
    #[serde(default = "default_event_source")]
    pub event_source: String,
    pub test_event_code: Option<String>,
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// The Business API version in the path (`/open_api/<v>/event/track/`).
    #[serde(default = "default_version")]
    pub api_version: String,
    /// Events older than this are dead-lettered instead of sent. TikTok
    /// documents no hard cut-off we could verify; 7 days is how long a
    /// ttclid stays valid (and the age Meta enforces).
    #[serde(default = "default_max_event_age", deserialize_with = "de_duration")]
    pub max_event_age: Duration,
}

fn default_event_source() -> String {
    "web".into()
}
fn default_version() -> String {
    "v1.3".into()
}
fn default_max_event_age() -> Duration {
    Duration::from_secs(7 * 86_400)
}
fn default_base_url() -> String {
    "https://business-api.tiktok.com".into()
}

const EVENT_SOURCES: &[&str] = &["web", "app", "offline", "crm"];

impl Settings {
    /// What types cannot say; each problem is named under `key`.
    pub fn check(&self, key: &str, problems: &mut Vec<Problem>) {
        let mut bad = reporter(key, problems);
        if self.pixel_code.trim().is_empty() {
            bad("pixel_code", "must not be empty".into());
        }
        if !EVENT_SOURCES.contains(&self.event_source.as_str()) {
            bad(
                "event_source",
                format!("must be one of {}", EVENT_SOURCES.join(", ")),
            );
        }
        if let Err(why) = check_url(&self.base_url) {
            bad("base_url", why);
        }
        if !is_api_version(&self.api_version, true) {
            bad(
                "api_version",
                format!("`{}` is not like \"v1.3\"", self.api_version),
            );
        }
        if self.max_event_age.is_zero() {
            bad("max_event_age", "must be longer than zero".into());
        }
    }

    /// TikTok's standard event names; `None` = not sent.
    pub fn preset_name<'a>(&self, event: &'a EventName) -> Option<&'a str> {
        use EventName::*;
        Some(match event {
            ViewContent => "ViewContent",
            AddToCart => "AddToCart",
            BeginCheckout => "InitiateCheckout",
            SignUp => "CompleteRegistration",
            StartTrial | Subscribe => "Subscribe",
            Lead => "Lead",
            Purchase => "CompletePayment",
            Search => "Search",
            Renewal | Refund | Identify | Custom(_) => return None,
        })
    }
}

pub struct TiktokEvents {
    settings: Settings,
}

impl TiktokEvents {
    pub fn new(settings: Settings) -> Self {
        TiktokEvents { settings }
    }

    fn url(&self) -> String {
        format!(
            "{}/open_api/{}/event/track/",
            self.settings.base_url.trim_end_matches('/'),
            self.settings.api_version
        )
    }

    fn event<'a>(&self, d: &'a Delivery, now: DateTime<Utc>) -> Event<'a> {
        let ev = &d.event;
        let ctx = ev.context.as_ref();
        let clicks = ev.click_ids.as_ref();
        let items = &ev.items;
        let mut external = hashed_external_ids(ev);
        Event {
            event: &d.name,
            event_time: event_time(ev.occurred_at, now),
            event_id: &ev.event_id,
            user: User {
                email: ev.email_sha256.as_deref().and_then(vendor_hash),
                phone: ev.phone_sha256.as_deref().and_then(vendor_hash),
                external_id: match external.len() {
                    0 => None,
                    1 => external.pop().map(OneOrMany::One),
                    _ => Some(OneOrMany::Many(external)),
                },
                ttclid: clicks.and_then(|c| c.ttclid.as_deref()),
                ttp: clicks.and_then(|c| c.ttp.as_deref()),
                ip: ctx.and_then(|c| c.ip).map(|ip| ip.to_string()),
                user_agent: ctx.and_then(|c| c.user_agent.as_deref()),
                locale: ctx.and_then(|c| c.locale.as_deref()),
            },
            page: ctx
                .filter(|c| c.page_url.is_some() || c.referrer.is_some())
                .map(|c| Page {
                    url: c.page_url.as_deref(),
                    referrer: c.referrer.as_deref(),
                }),
            properties: Properties {
                value: ev.value,
                currency: ev.currency.as_deref(),
                order_id: ev.order_id.as_deref(),
                content_type: (!items.is_empty()).then_some("product"),
                contents: items
                    .iter()
                    .map(|i| Content {
                        content_id: &i.id,
                        quantity: i.quantity,
                        price: i.price,
                        content_name: i.name.as_deref(),
                        content_category: i.category.as_deref(),
                        brand: i.brand.as_deref(),
                    })
                    .collect(),
                query: search_query(ev),
            },
        }
    }

    fn map_at(&self, batch: &[Delivery], now: DateTime<Utc>) -> Vec<Request> {
        let events: Vec<Vec<u8>> = batch
            .iter()
            .map(|d| serde_json::to_vec(&self.event(d, now)).expect("events serialise"))
            .collect();
        let envelope = serde_json::to_vec(&Envelope {
            event_source: &self.settings.event_source,
            event_source_id: &self.settings.pixel_code,
            test_event_code: self.settings.test_event_code.as_deref(),
            data: Vec::new(),
        })
        .expect("envelope serialises");
        let url = self.url();
        let headers = vec![
            ("Content-Type".to_string(), "application/json".to_string()),
            (
                "Access-Token".to_string(),
                self.settings.access_token.expose().to_string(),
            ),
        ];
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
        if let Some(u) = ev.context.as_ref().and_then(|c| c.page_url.as_deref())
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Some(Refusal {
                class: "invalid_field",
                reason: "TikTok requires page.url to be an absolute http(s) URL".into(),
            });
        }
        None
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    event_source: &'a str,
    event_source_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    test_event_code: Option<&'a str>,
    // Last, so that the serialised envelope ends in `[]}` (see `wrap`).
    data: Vec<()>,
}

#[derive(Serialize)]
struct Event<'a> {
    event: &'a str,
    event_time: i64,
    event_id: &'a str,
    user: User<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    page: Option<Page<'a>>,
    #[serde(skip_serializing_if = "Properties::is_empty")]
    properties: Properties<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Serialize)]
struct User<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    phone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    external_id: Option<OneOrMany>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttclid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttp: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_agent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    locale: Option<&'a str>,
}

#[derive(Serialize)]
struct Page<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    referrer: Option<&'a str>,
}

#[derive(Serialize)]
struct Properties<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    currency: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    order_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    contents: Vec<Content<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<&'a str>,
}

impl Properties<'_> {
    fn is_empty(&self) -> bool {
        self.value.is_none()
            && self.currency.is_none()
            && self.order_id.is_none()
            && self.contents.is_empty()
            && self.query.is_none()
    }
}

#[derive(Serialize)]
struct Content<'a> {
    content_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    quantity: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    price: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_category: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    brand: Option<&'a str>,
}

/// A TikTok Business API answer.
#[derive(Debug, Deserialize)]
struct Answer {
    code: i64,
    #[serde(default)]
    message: String,
    #[serde(default)]
    request_id: Option<String>,
}

/// What an answer `code` means for the events of its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    Retry,
    Throttle,
    Reject(&'static str),
}

pub fn verdict(code: i64) -> Verdict {
    match code {
        OK | PARTIAL_SUCCESS => Verdict::Delivered,
        RATE_LIMITED => Verdict::Throttle,
        RETRY_LATER | 50000..=59999 => Verdict::Retry,
        NO_PERMISSION => Verdict::Reject("permission"),
        INVALID_PARAMETER => Verdict::Reject("invalid_parameter"),
        TOKEN_EXPIRED | TOKEN_MISSING | TOKEN_INVALID => Verdict::Reject("auth"),
        _ => Verdict::Reject("tiktok_error"),
    }
}

fn answer(response: &Response) -> Option<Answer> {
    serde_json::from_slice(&response.body).ok()
}

/// The one outcome every event of a request shares.
pub fn outcome(response: &Response, now: SystemTime) -> Outcome {
    let after = || {
        response
            .header("retry-after")
            .and_then(|v| retry::retry_after(v, now))
    };
    if !(200..300).contains(&response.status) {
        return retry::by_status(response, now).unwrap_or(Outcome::Retry {
            after: after(),
            reason: format!("HTTP {}", response.status),
        });
    }
    let Some(a) = answer(response) else {
        // A 2xx that is not TikTok's JSON came from something in between;
        // TikTok's event_id dedup makes sending again harmless.
        return Outcome::Retry {
            after: None,
            reason: format!(
                "HTTP {} without a TikTok answer: {}",
                response.status,
                retry::excerpt(&response.body, 200)
            ),
        };
    };
    let reason = || {
        let mut s = format!("TikTok code {}: {}", a.code, a.message);
        if let Some(id) = &a.request_id {
            s.push_str(&format!(" (request_id {id})"));
        }
        s
    };
    match verdict(a.code) {
        Verdict::Delivered => Outcome::Delivered,
        Verdict::Retry | Verdict::Throttle => Outcome::Retry {
            after: after(),
            reason: reason(),
        },
        Verdict::Reject(class) => Outcome::Rejected {
            class: class.into(),
            reason: reason(),
        },
    }
}

impl Destination for TiktokEvents {
    fn limits(&self) -> Limits {
        Limits {
            max_events: MAX_EVENTS,
            max_bytes: MAX_BODY_BYTES,
            max_event_age: Some(self.settings.max_event_age),
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

/// Whether TikTok asks for less traffic: 429, or its rate-limit code in a 200.
fn is_throttle(response: &Response) -> bool {
    response.status == 429
        || ((200..300).contains(&response.status)
            && answer(response).is_some_and(|a| verdict(a.code) == Verdict::Throttle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::meta_capi::tests::{EMAIL_HASH, PHONE_HASH, delivery, now};
    use crate::destinations::test_support::body;
    use crate::destinations::{Vendor, test_support};
    use crate::event::normalize::sha256_hex;
    use serde_json::json;
    use std::time::Duration;

    fn tiktok(extra: &str) -> TiktokEvents {
        let text =
            format!("pixel_code = \"CDEMO0000000001\"\naccess_token = \"demo-token\"\n{extra}\n");
        match test_support::vendor("tiktok_events", "destinations.tt", &text) {
            Ok(Vendor::TiktokEvents(t)) => TiktokEvents::new(t),
            other => panic!("{other:?}"),
        }
    }

    fn response(status: u16, body: &str) -> Response {
        Response {
            status,
            headers: vec![],
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn maps_a_purchase() {
        let t = tiktok("test_event_code = \"TEST42\"");
        let reqs = t.map_at(&[delivery("e1", "CompletePayment", json!({}))], now());
        let r = &reqs[0];
        assert_eq!(
            r.url,
            "https://business-api.tiktok.com/open_api/v1.3/event/track/"
        );
        assert!(
            r.headers
                .contains(&("Access-Token".into(), "demo-token".into()))
        );
        let b = body(r);
        assert_eq!(b["event_source"], "web");
        assert_eq!(b["event_source_id"], "CDEMO0000000001");
        assert_eq!(b["test_event_code"], "TEST42");
        let e = &b["data"][0];
        assert_eq!(e["event"], "CompletePayment");
        assert_eq!(e["event_id"], "e1");
        assert_eq!(e["event_time"], 1_795_701_791);
        let u = &e["user"];
        assert_eq!(u["email"], EMAIL_HASH);
        assert_eq!(u["phone"], PHONE_HASH);
        assert_eq!(
            u["external_id"],
            json!([sha256_hex("u_1"), sha256_hex("c-9")])
        );
        assert_eq!(u["ttclid"], "E.C.P.x");
        assert_eq!(u["ttp"], "ttp-1");
        assert_eq!(u["ip"], "203.0.113.7");
        assert_eq!(u["user_agent"], "Mozilla/5.0");
        assert_eq!(u["locale"], "de-DE");
        assert!(u.get("fbc").is_none());
        assert_eq!(
            e["page"],
            json!({"url": "https://shop.example/checkout", "referrer": "https://shop.example/cart"})
        );
        let p = &e["properties"];
        assert_eq!(p["value"], 59.9);
        assert_eq!(p["currency"], "EUR");
        assert_eq!(p["order_id"], "o-1");
        assert_eq!(p["content_type"], "product");
        assert_eq!(
            p["contents"],
            json!([{"content_id": "sku-1", "quantity": 2, "price": 19.95}, {"content_id": "sku-2", "price": 20.0}])
        );
    }

    #[test]
    fn one_external_id_is_a_string_and_settings_shape_the_request() {
        let t = tiktok(
            "api_version = \"v1.4\"\nevent_source = \"crm\"\nbase_url = \"http://127.0.0.1:9/\"",
        );
        let d = delivery(
            "e1",
            "Lead",
            json!({"external_ids": null, "context": null, "value": null, "currency": null,
                   "order_id": null, "items": null}),
        );
        let r = &t.map_at(&[d], now())[0];
        assert_eq!(r.url, "http://127.0.0.1:9/open_api/v1.4/event/track/");
        let b = body(r);
        assert_eq!(b["event_source"], "crm");
        assert!(b.get("test_event_code").is_none());
        let e = &b["data"][0];
        assert_eq!(e["user"]["external_id"], sha256_hex("u_1"));
        assert!(e.get("page").is_none());
        assert!(e.get("properties").is_none());
    }

    #[test]
    fn config_defaults_and_checks() {
        let t = tiktok("");
        assert_eq!(t.settings.api_version, "v1.3");
        assert_eq!(
            t.limits().max_event_age,
            Some(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(
            tiktok("max_event_age = \"28d\"").limits().max_event_age,
            Some(Duration::from_secs(28 * 86_400))
        );
        let text = "pixel_code = \"C1\"\naccess_token = \"t\"\napi_version = \"1.3\"\n";
        match test_support::vendor("tiktok_events", "destinations.tt", text) {
            Err(problems) => {
                assert_eq!(problems[0].key, "destinations.tt.api_version")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn batches_split_at_the_event_limit() {
        let batch: Vec<Delivery> = (0..1001)
            .map(|i| delivery(&format!("e{i}"), "Lead", json!({})))
            .collect();
        let reqs = tiktok("").map_at(&batch, now());
        assert_eq!(test_support::ranges(&reqs), vec![0..1000, 1000..1001]);
        assert_eq!(body(&reqs[1])["data"][0]["event_id"], "e1000");
    }

    #[test]
    fn refusals() {
        let t = tiktok("");
        let table: Vec<(Delivery, Option<&str>)> = vec![
            (delivery("e", "Lead", json!({})), None),
            (
                delivery("e", "Lead", json!({"phone_sha256": "+4915112345678"})),
                Some("unhashed_identifier"),
            ),
            (
                delivery("e", "Lead", json!({"occurred_at": "2026-11-27T14:00:00Z"})),
                Some("future_event_time"),
            ),
            (
                delivery(
                    "e",
                    "Lead",
                    json!({"context": {"page_url": "shop.example/x"}}),
                ),
                Some("invalid_field"),
            ),
            // No identifiers at all is TikTok's business (it takes the event).
            (
                delivery(
                    "e",
                    "Lead",
                    json!({"user_id": null, "anonymous_id": "a", "email_sha256": null, "phone_sha256": null,
                           "external_ids": null, "click_ids": null, "context": null}),
                ),
                None,
            ),
        ];
        for (d, class) in table {
            assert_eq!(
                t.refuse_at(&d, now()).map(|r| r.class),
                class,
                "{:?}",
                d.event
            );
        }
    }

    #[test]
    fn classifies_recorded_responses() {
        let t = tiktok("");
        let batch = [delivery("e1", "Lead", json!({}))];
        let table: &[(u16, &str, &str, bool)] = &[
            (
                200,
                r#"{"code":0,"message":"OK","request_id":"2026112614","data":{}}"#,
                "delivered",
                false,
            ),
            (
                200,
                r#"{"code":20001,"message":"Partial success","request_id":"r","data":{}}"#,
                "delivered",
                false,
            ),
            (
                200,
                r#"{"code":40100,"message":"Too many requests. Please retry in some time.","request_id":"r"}"#,
                "retry",
                true,
            ),
            (
                200,
                r#"{"code":50000,"message":"System error","request_id":"r"}"#,
                "retry",
                false,
            ),
            (
                200,
                r#"{"code":51021,"message":"Service busy","request_id":"r"}"#,
                "retry",
                false,
            ),
            (
                200,
                r#"{"code":40700,"message":"Internal error, please retry","request_id":"r"}"#,
                "retry",
                false,
            ),
            (
                200,
                r#"{"code":40001,"message":"No permission to operate pixel code: C0","request_id":"r"}"#,
                "permission",
                false,
            ),
            (
                200,
                r#"{"code":40002,"message":"data[0].event_time: Invalid value","request_id":"r"}"#,
                "invalid_parameter",
                false,
            ),
            (
                200,
                r#"{"code":40104,"message":"Access token is null","request_id":"r"}"#,
                "auth",
                false,
            ),
            (
                200,
                r#"{"code":40105,"message":"Access token is incorrect or has been revoked.","request_id":"r"}"#,
                "auth",
                false,
            ),
            (
                200,
                r#"{"code":40102,"message":"Access token has expired","request_id":"r"}"#,
                "auth",
                false,
            ),
            (
                200,
                r#"{"code":40006,"message":"Something else","request_id":"r"}"#,
                "tiktok_error",
                false,
            ),
            (200, "<html>proxy</html>", "retry", false),
            (429, "", "retry", true),
            (503, "", "retry", false),
            (404, "{}", "http_404", false),
        ];
        for (status, text, expected, throttle) in table {
            let r = response(*status, text);
            let o = test_support::classify(&t, &r, &batch);
            let got = match &o[0] {
                Outcome::Delivered => "delivered".to_string(),
                Outcome::Retry { .. } => "retry".to_string(),
                Outcome::Rejected { class, .. } => class.clone(),
                other => format!("{other:?}"),
            };
            assert_eq!(got, *expected, "{status} {text}");
            assert_eq!(
                test_support::throttle(&t, &r, &batch),
                *throttle,
                "{status} {text}"
            );
        }
        let Outcome::Rejected { reason, .. } = outcome(
            &response(
                200,
                r#"{"code":40002,"message":"bad event_time","request_id":"abc"}"#,
            ),
            SystemTime::now(),
        ) else {
            panic!()
        };
        assert_eq!(reason, "TikTok code 40002: bad event_time (request_id abc)");
    }

    #[test]
    fn no_raw_contact_data_in_bodies() {
        let d = delivery("e1", "CompletePayment", json!({}));
        let b = String::from_utf8(tiktok("").map_at(&[d], now())[0].body.clone()).unwrap();
        assert!(!b.contains('@'));
        assert!(!b.contains("c-9"));
        assert!(!b.contains("\"u_1\""));
    }
}
