//! Meta Conversions API stand-in: `POST /{version}/{pixel_id}/events`.
//!
//! Checks what the Graph API checks for this edge: the version, the access
//! token (`?access_token=` or `Authorization: Bearer|OAuth`), the pixel id,
//! a JSON body with a non-empty `data` of at most 1000 server events, and
//! per event the required fields, `action_source` values, the website
//! requirements (`event_source_url`, `client_user_agent`), the event_time
//! window, SHA-256 format of hashed customer information, at least one
//! customer information parameter, value/currency of a Purchase and the
//! Limited Data Use options. One invalid event fails the whole request, as
//! at Meta.
//!
//! Errors are Graph API error objects. Codes 100 (invalid parameter), 190
//! (token) and 2635 (deprecated version) and subcodes 33 (unknown object),
//! 2804003 (event too old) and 2804019 (required parameter) are the ones
//! Meta answers for these cases; the subcodes for other invalid values
//! ([`SUBCODE_INVALID`], [`SUBCODE_TOO_MANY`]) are this fake's own, since
//! Meta documents none.
//!
//! A resent event (same `event_name` and `event_id` within 48 h) is answered
//! like a new one (`events_received` counts it) but recorded once.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use crate::{Accepted, Dedup, Incoming, Reply, Vendor, is_sha256_hex};

/// Invalid parameter (Graph API code).
pub const CODE_INVALID_PARAMETER: i64 = 100;
/// Invalid OAuth access token.
pub const CODE_AUTH: i64 = 190;
/// Unknown path components.
pub const CODE_UNKNOWN_PATH: i64 = 2500;
/// A Graph API version that is no longer served.
pub const CODE_DEPRECATED_VERSION: i64 = 2635;
/// The object (pixel) does not exist or the token may not use it.
pub const SUBCODE_UNKNOWN_OBJECT: i64 = 33;
pub const SUBCODE_TOO_OLD: i64 = 2_804_003;
pub const SUBCODE_REQUIRED: i64 = 2_804_019;
/// An invalid value (the fake's own subcode).
pub const SUBCODE_INVALID: i64 = 2_804_001;
/// More events than one request may carry (the fake's own subcode).
pub const SUBCODE_TOO_MANY: i64 = 2_804_049;

pub const ACTION_SOURCES: &[&str] = &[
    "website",
    "app",
    "email",
    "phone_call",
    "chat",
    "physical_store",
    "system_generated",
    "business_messaging",
    "other",
];

/// Customer information parameters Meta wants hashed.
const HASHED_FIELDS: &[&str] = &[
    "em", "ph", "fn", "ln", "ge", "db", "ct", "st", "zp", "country",
];

/// Parameters that identify a person without anything else.
const IDENTIFYING_FIELDS: &[&str] = &[
    "em",
    "ph",
    "fn",
    "ln",
    "ge",
    "db",
    "ct",
    "st",
    "zp",
    "country",
    "external_id",
    "fbc",
    "fbp",
    "subscription_id",
    "fb_login_id",
    "lead_id",
    "anon_id",
    "madid",
    "page_scoped_user_id",
    "ctwa_clid",
    "ig_sid",
];

#[derive(Debug, Clone)]
pub struct Settings {
    pub pixel_id: String,
    pub access_token: String,
    /// Oldest Graph API major version still served; older ones get 2635.
    pub oldest_major_version: u32,
    pub max_events: usize,
    /// Any event_time older than this fails the request.
    pub max_event_age: Duration,
    /// How far ahead of the fake's clock an event_time may be. Meta rejects
    /// future times; it documents no tolerance, so this allows clock skew.
    pub max_future_skew: Duration,
    pub dedup_window: Duration,
    /// HTTP status of a token failure (code 190).
    pub auth_status: u16,
    /// Meta only recommends hashing `external_id`; set this to insist on it.
    pub require_hashed_external_id: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            pixel_id: "100000000000001".into(),
            access_token: "demo-token".into(),
            oldest_major_version: 19,
            max_events: 1000,
            max_event_age: Duration::from_secs(7 * 86_400),
            max_future_skew: Duration::from_secs(60),
            dedup_window: Duration::from_secs(48 * 3600),
            auth_status: 401,
            require_hashed_external_id: false,
        }
    }
}

/// A Graph API error, before it is put into its body.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphError {
    pub status: u16,
    pub code: i64,
    pub subcode: Option<i64>,
    pub kind: &'static str,
    pub message: String,
    pub user_title: Option<String>,
    pub user_msg: Option<String>,
}

impl GraphError {
    fn invalid(subcode: i64, title: &str, msg: String) -> GraphError {
        GraphError {
            status: 400,
            code: CODE_INVALID_PARAMETER,
            subcode: Some(subcode),
            kind: "OAuthException",
            message: "Invalid parameter".into(),
            user_title: Some(title.into()),
            user_msg: Some(msg),
        }
    }

    fn required(path: &str) -> GraphError {
        GraphError::invalid(
            SUBCODE_REQUIRED,
            "Missing Parameter",
            format!("The parameter {path} is required."),
        )
    }

    fn bad_value(path: &str, why: &str) -> GraphError {
        GraphError::invalid(
            SUBCODE_INVALID,
            "Invalid Parameter Value",
            format!("The parameter {path} is invalid: {why}"),
        )
    }

    pub fn body(&self) -> Value {
        let mut e = Map::new();
        e.insert("message".into(), json!(self.message));
        e.insert("type".into(), json!(self.kind));
        e.insert("code".into(), json!(self.code));
        if let Some(s) = self.subcode {
            e.insert("error_subcode".into(), json!(s));
        }
        e.insert("is_transient".into(), json!(false));
        if let Some(t) = &self.user_title {
            e.insert("error_user_title".into(), json!(t));
        }
        if let Some(m) = &self.user_msg {
            e.insert("error_user_msg".into(), json!(m));
        }
        e.insert("fbtrace_id".into(), json!(fbtrace_id()));
        json!({ "error": e })
    }

    fn reply(&self) -> Reply {
        Reply::json(self.status, self.body())
    }
}

/// An opaque per-answer id like Meta's `fbtrace_id`.
fn fbtrace_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = Utc::now().timestamp_nanos_opt().unwrap_or(0) as u64;
    format!("A{:x}{:06x}", t >> 20, n & 0xff_ffff)
}

/// A JSON string with something in it.
fn non_empty_str(v: Option<&Value>) -> bool {
    v.and_then(Value::as_str)
        .is_some_and(|s| !s.trim().is_empty())
}

/// A JSON string holding an IPv4 or IPv6 address.
fn is_ip(v: &Value) -> bool {
    v.as_str().is_some_and(|s| s.parse::<IpAddr>().is_ok())
}

impl Settings {
    fn token<'a>(&self, req: &'a Incoming) -> Option<&'a str> {
        req.query("access_token").or_else(|| {
            req.header("authorization").and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("OAuth "))
                    .map(str::trim)
            })
        })
    }

    /// Everything but the events: method, path, version, token, pixel, body.
    fn check_request(&self, req: &Incoming) -> Result<Value, GraphError> {
        let parts: Vec<&str> = req.path.trim_matches('/').split('/').collect();
        let [version, pixel, "events"] = parts.as_slice() else {
            return Err(GraphError {
                status: 400,
                code: CODE_UNKNOWN_PATH,
                subcode: None,
                kind: "OAuthException",
                message: format!("Unknown path components: {}", req.path),
                user_title: None,
                user_msg: None,
            });
        };
        let major = version
            .strip_prefix('v')
            .and_then(|v| v.split_once('.'))
            .filter(|(_, minor)| !minor.is_empty() && minor.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|(major, _)| major.parse::<u32>().ok());
        match major {
            None => {
                return Err(GraphError {
                    status: 400,
                    code: CODE_UNKNOWN_PATH,
                    subcode: None,
                    kind: "OAuthException",
                    message: format!("Unknown path components: /{version}"),
                    user_title: None,
                    user_msg: None,
                });
            }
            Some(m) if m < self.oldest_major_version => {
                return Err(GraphError {
                    status: 400,
                    code: CODE_DEPRECATED_VERSION,
                    subcode: None,
                    kind: "OAuthException",
                    message: format!(
                        "(#2635) You are calling a deprecated version of the Ads API. Please update to the latest version: v{}.0.",
                        self.oldest_major_version
                    ),
                    user_title: None,
                    user_msg: None,
                });
            }
            Some(_) => {}
        }
        match self.token(req) {
            Some(t) if t == self.access_token => {}
            Some(_) | None => {
                return Err(GraphError {
                    status: self.auth_status,
                    code: CODE_AUTH,
                    subcode: None,
                    kind: "OAuthException",
                    message: "Invalid OAuth access token - Cannot parse access token".into(),
                    user_title: None,
                    user_msg: None,
                });
            }
        }
        if *pixel != self.pixel_id {
            return Err(GraphError {
                status: 400,
                code: CODE_INVALID_PARAMETER,
                subcode: Some(SUBCODE_UNKNOWN_OBJECT),
                kind: "GraphMethodException",
                message: format!(
                    "Unsupported post request. Object with ID '{pixel}' does not exist, cannot be loaded due to missing permissions, or does not support this operation. Please read the Graph API documentation at https://developers.facebook.com/docs/graph-api"
                ),
                user_title: None,
                user_msg: None,
            });
        }
        if req.method != "POST" {
            return Err(GraphError::bad_value(
                "method",
                &format!("{} is not supported on /events", req.method),
            ));
        }
        let Some(body) = req.json().filter(Value::is_object) else {
            return Err(GraphError::required("data"));
        };
        Ok(body)
    }

    fn check_event(&self, i: usize, e: &Value, now: DateTime<Utc>) -> Result<(), GraphError> {
        let at = |f: &str| format!("$['data'][{i}]['{f}']");
        let Some(e) = e.as_object() else {
            return Err(GraphError::bad_value(
                &format!("$['data'][{i}]"),
                "must be an object",
            ));
        };
        match e.get("event_name") {
            Some(Value::String(s)) if !s.trim().is_empty() => {}
            Some(_) => {
                return Err(GraphError::bad_value(
                    &at("event_name"),
                    "must be a non-empty string",
                ));
            }
            None => return Err(GraphError::required(&at("event_name"))),
        }
        let Some(t) = e.get("event_time") else {
            return Err(GraphError::required(&at("event_time")));
        };
        let Some(t) = t.as_i64() else {
            return Err(GraphError::bad_value(
                &at("event_time"),
                "must be a unix timestamp in seconds",
            ));
        };
        if t > 9_999_999_999 {
            return Err(GraphError::bad_value(
                &at("event_time"),
                "must be in seconds, not milliseconds",
            ));
        }
        let age = now.timestamp() - t;
        if age > i64::try_from(self.max_event_age.as_secs()).unwrap_or(i64::MAX) {
            return Err(GraphError::invalid(
                SUBCODE_TOO_OLD,
                "Event Timestamp Too Old",
                format!(
                    "The timestamp for this event is more than {} days in the past: $['data'][{i}]['event_time'].",
                    self.max_event_age.as_secs() / 86_400
                ),
            ));
        }
        if -age > i64::try_from(self.max_future_skew.as_secs()).unwrap_or(i64::MAX) {
            return Err(GraphError::bad_value(
                &at("event_time"),
                "the event_time is in the future",
            ));
        }
        if let Some(id) = e.get("event_id")
            && !id.is_string()
        {
            return Err(GraphError::bad_value(&at("event_id"), "must be a string"));
        }
        let source = match e.get("action_source") {
            Some(Value::String(s)) if ACTION_SOURCES.contains(&s.as_str()) => s.as_str(),
            Some(_) => {
                return Err(GraphError::bad_value(
                    &at("action_source"),
                    &format!("must be one of {}", ACTION_SOURCES.join(", ")),
                ));
            }
            None => return Err(GraphError::required(&at("action_source"))),
        };
        let user = match e.get("user_data") {
            Some(Value::Object(u)) => u,
            Some(_) => return Err(GraphError::bad_value(&at("user_data"), "must be an object")),
            None => return Err(GraphError::required(&at("user_data"))),
        };
        let ud = |f: &str| format!("$['data'][{i}]['user_data']['{f}']");
        if source == "website" {
            match e.get("event_source_url") {
                Some(Value::String(u)) if u.starts_with("http://") || u.starts_with("https://") => {
                }
                Some(_) => {
                    return Err(GraphError::bad_value(
                        &at("event_source_url"),
                        "must begin with http:// or https://",
                    ));
                }
                None => return Err(GraphError::required(&at("event_source_url"))),
            }
            if !non_empty_str(user.get("client_user_agent")) {
                return Err(GraphError::required(&ud("client_user_agent")));
            }
        }
        let mut hashed: Vec<&str> = HASHED_FIELDS.to_vec();
        if self.require_hashed_external_id {
            hashed.push("external_id");
        }
        for f in hashed {
            if let Some(v) = user.get(f) {
                let ok = match v {
                    Value::String(s) => is_sha256_hex(s),
                    Value::Array(a) => {
                        !a.is_empty() && a.iter().all(|x| x.as_str().is_some_and(is_sha256_hex))
                    }
                    _ => false,
                };
                if !ok {
                    return Err(GraphError::bad_value(
                        &ud(f),
                        "must be hashed with SHA-256 (64 lowercase hex characters)",
                    ));
                }
            }
        }
        if let Some(ip) = user.get("client_ip_address")
            && !is_ip(ip)
        {
            return Err(GraphError::bad_value(
                &ud("client_ip_address"),
                "must be an IPv4 or IPv6 address",
            ));
        }
        let present = |f: &str| {
            user.get(f).is_some_and(|v| match v {
                Value::String(s) => !s.is_empty(),
                Value::Array(a) => !a.is_empty(),
                Value::Null => false,
                _ => true,
            })
        };
        let identified = IDENTIFYING_FIELDS.iter().any(|f| present(f))
            || (present("client_ip_address") && present("client_user_agent"));
        if !identified {
            return Err(GraphError::invalid(
                SUBCODE_INVALID,
                "No Customer Information",
                format!(
                    "$['data'][{i}]['user_data'] must contain at least one customer information parameter."
                ),
            ));
        }
        let custom = match e.get("custom_data") {
            None => None,
            Some(Value::Object(c)) => Some(c),
            Some(_) => {
                return Err(GraphError::bad_value(
                    &at("custom_data"),
                    "must be an object",
                ));
            }
        };
        let cd = |f: &str| format!("$['data'][{i}]['custom_data']['{f}']");
        if let Some(c) = custom {
            if let Some(v) = c.get("value")
                && !v.is_number()
            {
                return Err(GraphError::bad_value(&cd("value"), "must be a number"));
            }
            if let Some(cur) = c.get("currency")
                && !cur
                    .as_str()
                    .is_some_and(|s| s.len() == 3 && s.bytes().all(|b| b.is_ascii_alphabetic()))
            {
                return Err(GraphError::bad_value(
                    &cd("currency"),
                    "must be an ISO 4217 code",
                ));
            }
            if let Some(contents) = c.get("contents") {
                let ok = contents.as_array().is_some_and(|a| {
                    a.iter().all(|x| {
                        x.get("id").is_some_and(Value::is_string)
                            && x.get("quantity").is_some_and(|q| q.as_u64().is_some())
                            && x.get("item_price").is_none_or(Value::is_number)
                    })
                });
                if !ok {
                    return Err(GraphError::bad_value(
                        &cd("contents"),
                        "must be a list of {id, quantity, item_price?}",
                    ));
                }
            }
            if let Some(ids) = c.get("content_ids")
                && !ids
                    .as_array()
                    .is_some_and(|a| a.iter().all(Value::is_string))
            {
                return Err(GraphError::bad_value(
                    &cd("content_ids"),
                    "must be a list of strings",
                ));
            }
        }
        if e.get("event_name").and_then(Value::as_str) == Some("Purchase") {
            for f in ["value", "currency"] {
                if custom.and_then(|c| c.get(f)).is_none() {
                    return Err(GraphError::required(&cd(f)));
                }
            }
        }
        if let Some(dpo) = e.get("data_processing_options") {
            let Some(opts) = dpo.as_array() else {
                return Err(GraphError::bad_value(
                    &at("data_processing_options"),
                    "must be a list",
                ));
            };
            if !opts.iter().all(|o| o.as_str() == Some("LDU")) {
                return Err(GraphError::bad_value(
                    &at("data_processing_options"),
                    "the only option is \"LDU\"",
                ));
            }
            if let Some(c) = e.get("data_processing_options_country")
                && !matches!(c.as_u64(), Some(0 | 1))
            {
                return Err(GraphError::bad_value(
                    &at("data_processing_options_country"),
                    "must be 0 or 1",
                ));
            }
            if let Some(s) = e.get("data_processing_options_state")
                && !matches!(s.as_u64(), Some(0 | 1000..=1999))
            {
                return Err(GraphError::bad_value(
                    &at("data_processing_options_state"),
                    "must be 0 or a state code from 1000",
                ));
            }
        }
        Ok(())
    }

    fn check(&self, req: &Incoming, now: DateTime<Utc>) -> Result<Vec<Value>, GraphError> {
        let body = self.check_request(req)?;
        if let Some(code) = body.get("test_event_code")
            && !non_empty_str(Some(code))
        {
            return Err(GraphError::bad_value(
                "test_event_code",
                "must be a non-empty string",
            ));
        }
        let data = match body.get("data") {
            Some(Value::Array(a)) if !a.is_empty() => a,
            Some(Value::Array(_)) => {
                return Err(GraphError::bad_value(
                    "data",
                    "must be a non-empty array of events",
                ));
            }
            Some(_) => return Err(GraphError::bad_value("data", "must be an array of events")),
            None => return Err(GraphError::required("data")),
        };
        if data.len() > self.max_events {
            return Err(GraphError::invalid(
                SUBCODE_TOO_MANY,
                "Too Many Events",
                format!(
                    "A request may carry at most {} events; this one has {}.",
                    self.max_events,
                    data.len()
                ),
            ));
        }
        for (i, e) in data.iter().enumerate() {
            self.check_event(i, e, now)?;
        }
        Ok(data.clone())
    }
}

impl Vendor for Settings {
    fn dedup_window(&self) -> Duration {
        self.dedup_window
    }

    fn handle(&self, req: &Incoming, dedup: &mut Dedup, now: DateTime<Utc>) -> Reply {
        let events = match self.check(req, now) {
            Ok(events) => events,
            Err(e) => return e.reply(),
        };
        let mut accepted = Vec::new();
        for e in &events {
            let name = e["event_name"].as_str().unwrap_or_default();
            let key = e.get("event_id").and_then(Value::as_str);
            // Meta's dedup key is event_name + event_id; events without an id
            // are never deduplicated.
            let first = key.is_none_or(|id| dedup.first(&format!("{name}\u{1f}{id}"), now));
            if first {
                accepted.push(Accepted {
                    key: key.map(str::to_string),
                    name: name.to_string(),
                    value: e.pointer("/custom_data/value").and_then(Value::as_f64),
                    currency: e
                        .pointer("/custom_data/currency")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    payload: e.clone(),
                });
            }
        }
        let mut reply = Reply::json(
            200,
            json!({"events_received": events.len(), "messages": [], "fbtrace_id": fbtrace_id()}),
        );
        reply.accepted = accepted;
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b";

    fn now() -> DateTime<Utc> {
        "2026-11-26T14:10:00Z".parse().unwrap()
    }

    fn event(id: &str) -> Value {
        json!({
            "event_name": "Purchase", "event_time": now().timestamp() - 600, "event_id": id,
            "action_source": "website", "event_source_url": "https://shop.example/checkout",
            "user_data": {"em": [H], "ph": [H], "external_id": [H], "client_ip_address": "203.0.113.7",
                          "client_user_agent": "Mozilla/5.0", "fbc": "fb.1.1.x", "fbp": "fb.1.1.y"},
            "custom_data": {"value": 10.5, "currency": "EUR", "contents": [{"id": "sku", "quantity": 1, "item_price": 10.5}],
                            "content_ids": ["sku"], "content_type": "product"}
        })
    }

    fn request(path: &str, token: Option<&str>, body: Value) -> Incoming {
        Incoming {
            method: "POST".into(),
            path: path.into(),
            query: token
                .map(|t| vec![("access_token".to_string(), t.to_string())])
                .unwrap_or_default(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(&body).unwrap(),
        }
    }

    const PATH: &str = "/v21.0/100000000000001/events";

    fn send(s: &Settings, dedup: &mut Dedup, req: &Incoming) -> Reply {
        s.handle(req, dedup, now())
    }

    #[test]
    fn accepts_valid_events_and_records_resends_once() {
        let s = Settings::default();
        let mut d = Dedup::new(s.dedup_window);
        let req = request(
            PATH,
            Some("demo-token"),
            json!({"data": [event("e1"), event("e2")], "test_event_code": "T1"}),
        );
        let r = send(&s, &mut d, &req);
        assert_eq!(r.status, 200);
        assert_eq!(r.body["events_received"], 2);
        assert_eq!(r.accepted.len(), 2);
        assert_eq!(r.accepted[0].key.as_deref(), Some("e1"));
        assert_eq!(r.accepted[0].name, "Purchase");
        assert_eq!(r.accepted[0].value, Some(10.5));
        assert_eq!(r.accepted[0].currency.as_deref(), Some("EUR"));
        let again = send(&s, &mut d, &req);
        assert_eq!(again.status, 200);
        assert_eq!(again.body["events_received"], 2);
        assert!(again.accepted.is_empty());
        // The same id under another name is another event for Meta.
        let mut lead = event("e1");
        lead["event_name"] = json!("Lead");
        let r = send(
            &s,
            &mut d,
            &request(PATH, Some("demo-token"), json!({"data": [lead]})),
        );
        assert_eq!(r.accepted.len(), 1);
    }

    #[test]
    fn bearer_and_oauth_headers_carry_the_token_too() {
        let s = Settings::default();
        for scheme in ["Bearer", "OAuth"] {
            let mut d = Dedup::new(s.dedup_window);
            let mut req = request(PATH, None, json!({"data": [event("e1")]}));
            req.headers
                .push(("authorization".into(), format!("{scheme} demo-token")));
            assert_eq!(send(&s, &mut d, &req).status, 200, "{scheme}");
        }
    }

    #[test]
    fn refuses_requests_the_way_meta_does() {
        let s = Settings {
            require_hashed_external_id: true,
            ..Settings::default()
        };
        let with = |f: &dyn Fn(&mut Value)| {
            let mut e = event("e1");
            f(&mut e);
            json!({"data": [event("e0"), e]})
        };
        // (what, request, status, code, subcode)
        let cases: Vec<(&str, Incoming, u16, i64, Option<i64>)> = vec![
            (
                "bad token",
                request(PATH, Some("nope"), with(&|_| {})),
                401,
                190,
                None,
            ),
            (
                "no token",
                request(PATH, None, with(&|_| {})),
                401,
                190,
                None,
            ),
            (
                "wrong pixel",
                request("/v21.0/999/events", Some("demo-token"), with(&|_| {})),
                400,
                100,
                Some(33),
            ),
            (
                "old version",
                request(
                    "/v12.0/100000000000001/events",
                    Some("demo-token"),
                    with(&|_| {}),
                ),
                400,
                2635,
                None,
            ),
            (
                "no version",
                request("/100000000000001/events", Some("demo-token"), with(&|_| {})),
                400,
                2500,
                None,
            ),
            (
                "no data",
                request(PATH, Some("demo-token"), json!({})),
                400,
                100,
                Some(SUBCODE_REQUIRED),
            ),
            (
                "empty data",
                request(PATH, Some("demo-token"), json!({"data": []})),
                400,
                100,
                Some(SUBCODE_INVALID),
            ),
            (
                "too many events",
                request(
                    PATH,
                    Some("demo-token"),
                    json!({"data": vec![event("e"); 1001]}),
                ),
                400,
                100,
                Some(SUBCODE_TOO_MANY),
            ),
            (
                "raw email",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| e["user_data"]["em"] = json!(["person@example.com"])),
                ),
                400,
                100,
                Some(SUBCODE_INVALID),
            ),
            (
                "uppercase hash",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| e["user_data"]["ph"] = json!(H.to_uppercase())),
                ),
                400,
                100,
                Some(SUBCODE_INVALID),
            ),
            (
                "raw external id",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| e["user_data"]["external_id"] = json!(["u_1"])),
                ),
                400,
                100,
                Some(SUBCODE_INVALID),
            ),
            (
                "missing event_name",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| {
                        e.as_object_mut().unwrap().remove("event_name");
                    }),
                ),
                400,
                100,
                Some(SUBCODE_REQUIRED),
            ),
            (
                "missing action_source",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| {
                        e.as_object_mut().unwrap().remove("action_source");
                    }),
                ),
                400,
                100,
                Some(SUBCODE_REQUIRED),
            ),
            (
                "bad action_source",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| e["action_source"] = json!("web")),
                ),
                400,
                100,
                Some(SUBCODE_INVALID),
            ),
            (
                "website without url",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| {
                        e.as_object_mut().unwrap().remove("event_source_url");
                    }),
                ),
                400,
                100,
                Some(SUBCODE_REQUIRED),
            ),
            (
                "website without user agent",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| {
                        e["user_data"]
                            .as_object_mut()
                            .unwrap()
                            .remove("client_user_agent");
                    }),
                ),
                400,
                100,
                Some(SUBCODE_REQUIRED),
            ),
            (
                "too old",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| e["event_time"] = json!(now().timestamp() - 8 * 86_400)),
                ),
                400,
                100,
                Some(SUBCODE_TOO_OLD),
            ),
            (
                "future",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| e["event_time"] = json!(now().timestamp() + 3600)),
                ),
                400,
                100,
                Some(SUBCODE_INVALID),
            ),
            (
                "milliseconds",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| e["event_time"] = json!(now().timestamp_millis())),
                ),
                400,
                100,
                Some(SUBCODE_INVALID),
            ),
            (
                "purchase without currency",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| {
                        e["custom_data"].as_object_mut().unwrap().remove("currency");
                    }),
                ),
                400,
                100,
                Some(SUBCODE_REQUIRED),
            ),
            (
                "bad ip",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| e["user_data"]["client_ip_address"] = json!("999.1.1.1")),
                ),
                400,
                100,
                Some(SUBCODE_INVALID),
            ),
            (
                "no customer information",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| e["user_data"] = json!({"client_user_agent": "UA"})),
                ),
                400,
                100,
                Some(SUBCODE_INVALID),
            ),
            (
                "bad LDU option",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| e["data_processing_options"] = json!(["XYZ"])),
                ),
                400,
                100,
                Some(SUBCODE_INVALID),
            ),
            (
                "bad LDU state",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| {
                        e["data_processing_options"] = json!(["LDU"]);
                        e["data_processing_options_state"] = json!(5);
                    }),
                ),
                400,
                100,
                Some(SUBCODE_INVALID),
            ),
        ];
        for (what, req, status, code, subcode) in cases {
            let mut d = Dedup::new(s.dedup_window);
            let r = send(&s, &mut d, &req);
            assert_eq!(r.status, status, "{what}: {}", r.body);
            assert_eq!(r.body["error"]["code"], code, "{what}: {}", r.body);
            assert_eq!(
                r.body["error"]["error_subcode"].as_i64(),
                subcode,
                "{what}: {}",
                r.body
            );
            assert!(r.body["error"]["fbtrace_id"].is_string(), "{what}");
            assert!(
                r.accepted.is_empty(),
                "{what}: one bad event fails the request"
            );
        }
    }

    #[test]
    fn defaults_accept_what_meta_accepts() {
        let s = Settings::default();
        let mut d = Dedup::new(s.dedup_window);
        let mut e = event("e1");
        e["user_data"]["external_id"] = json!(["u_1"]);
        e["action_source"] = json!("physical_store");
        e.as_object_mut().unwrap().remove("event_source_url");
        e["data_processing_options"] = json!(["LDU"]);
        e["data_processing_options_country"] = json!(1);
        e["data_processing_options_state"] = json!(1000);
        let r = send(
            &s,
            &mut d,
            &request(PATH, Some("demo-token"), json!({"data": [e]})),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let msg = send(
            &s,
            &mut d,
            &request(
                PATH,
                Some("demo-token"),
                json!({"data": [{"event_name": "Lead", "event_time": now().timestamp(), "action_source": "website", "event_source_url": "https://a.example/", "user_data": {"client_user_agent": "UA"}}]}),
            ),
        );
        assert!(
            msg.body["error"]["error_user_msg"]
                .as_str()
                .unwrap()
                .contains("$['data'][0]['user_data']"),
            "{}",
            msg.body
        );
    }
}
