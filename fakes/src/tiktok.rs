//! TikTok Events API 2.0 stand-in: `POST /open_api/{version}/event/track/`.
//!
//! Checks the `Access-Token` header, the path's version, a JSON body with
//! `event_source` (web|app|offline|crm), `event_source_id` (the pixel code
//! the token may use), a non-empty `data` of at most 1000 events, and per
//! event `event`, `event_time` (unix seconds inside the window), SHA-256
//! format of `user.email`/`phone`/`external_id`, `user.ip`, `page.url` and
//! the `properties` types. One invalid event fails the whole request.
//!
//! Like the Business API it answers HTTP 200 with the verdict in the body:
//! `{"code":0,"message":"OK","request_id":…,"data":{}}`, or 40001 (no
//! permission for the pixel), 40002 (invalid parameter), 40104 (no token),
//! 40105 (wrong token). A path that is not the track endpoint gets 404.
//! A resent event (same `event` and `event_id` within 48 h) is answered OK
//! and recorded once.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::{Accepted, Dedup, Incoming, Reply, Vendor, is_sha256_hex};

pub const OK: i64 = 0;
pub const NO_PERMISSION: i64 = 40001;
pub const INVALID_PARAMETER: i64 = 40002;
pub const TOKEN_MISSING: i64 = 40104;
pub const TOKEN_INVALID: i64 = 40105;

pub const EVENT_SOURCES: &[&str] = &["web", "app", "offline", "crm"];

#[derive(Debug, Clone)]
pub struct Settings {
    pub pixel_code: String,
    pub access_token: String,
    /// Versions served under `/open_api/`.
    pub api_versions: Vec<String>,
    pub max_events: usize,
    /// Older event_times are refused. TikTok documents no hard cut-off we
    /// could verify; 7 days mirrors the destination's default.
    pub max_event_age: Duration,
    /// How far ahead of the fake's clock an event_time may be.
    pub max_future_skew: Duration,
    pub dedup_window: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            pixel_code: "CDEMO0000000001".into(),
            access_token: "demo-token".into(),
            api_versions: vec!["v1.3".into()],
            max_events: 1000,
            max_event_age: Duration::from_secs(7 * 86_400),
            max_future_skew: Duration::from_secs(60),
            dedup_window: Duration::from_secs(48 * 3600),
        }
    }
}

/// The id TikTok puts on every answer.
fn request_id(now: DateTime<Utc>) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{}{:08X}",
        now.format("%Y%m%d%H%M%S"),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn answer(code: i64, message: impl Into<String>, now: DateTime<Utc>) -> Reply {
    Reply::json(
        200,
        json!({"code": code, "message": message.into(), "request_id": request_id(now), "data": {}}),
    )
}

/// A refusal: the body code and its message.
type Refusal = (i64, String);

fn invalid(msg: String) -> Refusal {
    (INVALID_PARAMETER, msg)
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
    fn check_event(&self, i: usize, e: &Value, now: DateTime<Utc>) -> Result<(), Refusal> {
        let at = |f: &str| format!("data[{i}].{f}");
        let Some(e) = e.as_object() else {
            return Err(invalid(format!("data[{i}]: must be an object")));
        };
        if !non_empty_str(e.get("event")) {
            return Err(invalid(format!(
                "{}: Missing data for required field.",
                at("event")
            )));
        }
        let Some(t) = e.get("event_time") else {
            return Err(invalid(format!(
                "{}: Missing data for required field.",
                at("event_time")
            )));
        };
        let Some(t) = t.as_i64() else {
            return Err(invalid(format!(
                "{}: Not a valid integer.",
                at("event_time")
            )));
        };
        if t > 9_999_999_999 {
            return Err(invalid(format!(
                "{}: must be a unix timestamp in seconds.",
                at("event_time")
            )));
        }
        let age = now.timestamp() - t;
        if age > i64::try_from(self.max_event_age.as_secs()).unwrap_or(i64::MAX) {
            return Err(invalid(format!(
                "{}: the event happened more than {} days ago.",
                at("event_time"),
                self.max_event_age.as_secs() / 86_400
            )));
        }
        if -age > i64::try_from(self.max_future_skew.as_secs()).unwrap_or(i64::MAX) {
            return Err(invalid(format!(
                "{}: must not be in the future.",
                at("event_time")
            )));
        }
        if let Some(id) = e.get("event_id")
            && !id.is_string()
        {
            return Err(invalid(format!("{}: Not a valid string.", at("event_id"))));
        }
        if let Some(user) = e.get("user") {
            let Some(user) = user.as_object() else {
                return Err(invalid(format!("{}: must be an object.", at("user"))));
            };
            for f in ["email", "phone", "external_id"] {
                if let Some(v) = user.get(f) {
                    let ok = match v {
                        Value::String(s) => is_sha256_hex(s),
                        Value::Array(a) => a.iter().all(|x| x.as_str().is_some_and(is_sha256_hex)),
                        _ => false,
                    };
                    if !ok {
                        return Err(invalid(format!(
                            "{}: must be SHA-256 hashed (64 lowercase hex characters).",
                            at(&format!("user.{f}"))
                        )));
                    }
                }
            }
            if let Some(ip) = user.get("ip")
                && !is_ip(ip)
            {
                return Err(invalid(format!(
                    "{}: Not a valid IP address.",
                    at("user.ip")
                )));
            }
            for f in ["ttclid", "ttp", "user_agent", "locale"] {
                if let Some(v) = user.get(f)
                    && !v.is_string()
                {
                    return Err(invalid(format!(
                        "{}: Not a valid string.",
                        at(&format!("user.{f}"))
                    )));
                }
            }
        }
        if let Some(url) = e.get("page").and_then(|p| p.get("url"))
            && !url
                .as_str()
                .is_some_and(|u| u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(invalid(format!("{}: Not a valid URL.", at("page.url"))));
        }
        if let Some(p) = e.get("properties") {
            let Some(p) = p.as_object() else {
                return Err(invalid(format!("{}: must be an object.", at("properties"))));
            };
            if let Some(v) = p.get("value")
                && !v.is_number()
            {
                return Err(invalid(format!(
                    "{}: Not a valid number.",
                    at("properties.value")
                )));
            }
            if let Some(c) = p.get("currency")
                && !c
                    .as_str()
                    .is_some_and(|s| s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase()))
            {
                return Err(invalid(format!(
                    "{}: must be an ISO 4217 currency code.",
                    at("properties.currency")
                )));
            }
            if let Some(t) = p.get("content_type")
                && !matches!(t.as_str(), Some("product" | "product_group"))
            {
                return Err(invalid(format!(
                    "{}: must be product or product_group.",
                    at("properties.content_type")
                )));
            }
            if let Some(contents) = p.get("contents") {
                let ok = contents.as_array().is_some_and(|a| {
                    a.iter().all(|c| {
                        c.get("content_id").is_none_or(Value::is_string)
                            && c.get("quantity").is_none_or(|q| q.as_u64().is_some())
                            && c.get("price").is_none_or(Value::is_number)
                    })
                });
                if !ok {
                    return Err(invalid(format!(
                        "{}: must be a list of {{content_id, quantity, price}}.",
                        at("properties.contents")
                    )));
                }
            }
        }
        Ok(())
    }

    fn check(&self, req: &Incoming, now: DateTime<Utc>) -> Result<Vec<Value>, Refusal> {
        match req.header("access-token") {
            None | Some("") => return Err((TOKEN_MISSING, "Access token is null".into())),
            Some(t) if t != self.access_token => {
                return Err((
                    TOKEN_INVALID,
                    "Access token is incorrect or has been revoked.".into(),
                ));
            }
            Some(_) => {}
        }
        let Some(body) = req.json().filter(Value::is_object) else {
            return Err(invalid("The request body is not valid JSON.".into()));
        };
        match body.get("event_source").and_then(Value::as_str) {
            Some(s) if EVENT_SOURCES.contains(&s) => {}
            Some(s) => {
                return Err(invalid(format!(
                    "event_source: Must be one of: {}; got {s}.",
                    EVENT_SOURCES.join(", ")
                )));
            }
            None => {
                return Err(invalid(
                    "event_source: Missing data for required field.".into(),
                ));
            }
        }
        match body.get("event_source_id").and_then(Value::as_str) {
            Some(id) if id == self.pixel_code => {}
            Some(id) => {
                return Err((
                    NO_PERMISSION,
                    format!("No permission to operate pixel code: {id}"),
                ));
            }
            None => {
                return Err(invalid(
                    "event_source_id: Missing data for required field.".into(),
                ));
            }
        }
        if let Some(code) = body.get("test_event_code")
            && !code.is_string()
        {
            return Err(invalid("test_event_code: Not a valid string.".into()));
        }
        let data = match body.get("data") {
            Some(Value::Array(a)) if !a.is_empty() => a,
            Some(_) => return Err(invalid("data: must be a non-empty list.".into())),
            None => return Err(invalid("data: Missing data for required field.".into())),
        };
        if data.len() > self.max_events {
            return Err(invalid(format!(
                "data: Length must be between 1 and {}.",
                self.max_events
            )));
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
        let version = req
            .path
            .strip_prefix("/open_api/")
            .and_then(|rest| rest.strip_suffix("/event/track/"));
        if !version.is_some_and(|v| self.api_versions.iter().any(|s| s == v)) {
            return Reply::json(
                404,
                json!({"code": 40400, "message": format!("Not found: {}", req.path), "request_id": request_id(now)}),
            );
        }
        if req.method != "POST" {
            return answer(
                INVALID_PARAMETER,
                format!("{} is not allowed", req.method),
                now,
            );
        }
        let events = match self.check(req, now) {
            Ok(events) => events,
            Err((code, message)) => return answer(code, message, now),
        };
        let mut accepted = Vec::new();
        for e in &events {
            let name = e["event"].as_str().unwrap_or_default();
            let key = e.get("event_id").and_then(Value::as_str);
            let first = key.is_none_or(|id| dedup.first(&format!("{name}\u{1f}{id}"), now));
            if first {
                accepted.push(Accepted {
                    key: key.map(str::to_string),
                    name: name.to_string(),
                    value: e.pointer("/properties/value").and_then(Value::as_f64),
                    currency: e
                        .pointer("/properties/currency")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    payload: e.clone(),
                });
            }
        }
        let mut reply = answer(OK, "OK", now);
        reply.accepted = accepted;
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b";
    const PATH: &str = "/open_api/v1.3/event/track/";

    fn now() -> DateTime<Utc> {
        "2026-11-26T14:10:00Z".parse().unwrap()
    }

    fn event(id: &str) -> Value {
        json!({
            "event": "CompletePayment", "event_time": now().timestamp() - 60, "event_id": id,
            "user": {"email": H, "phone": H, "external_id": [H, H], "ttclid": "E.C.P.x", "ttp": "t",
                     "ip": "2001:db8::1", "user_agent": "Mozilla/5.0", "locale": "en-US"},
            "page": {"url": "https://shop.example/", "referrer": "https://shop.example/cart"},
            "properties": {"value": 12.0, "currency": "USD", "order_id": "o1", "content_type": "product",
                           "contents": [{"content_id": "sku", "quantity": 2, "price": 6.0}]}
        })
    }

    fn request(path: &str, token: Option<&str>, body: Value) -> Incoming {
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        if let Some(t) = token {
            headers.push(("access-token".into(), t.into()));
        }
        Incoming {
            method: "POST".into(),
            path: path.into(),
            query: vec![],
            headers,
            body: serde_json::to_vec(&body).unwrap(),
        }
    }

    fn envelope(data: Vec<Value>) -> Value {
        json!({"event_source": "web", "event_source_id": "CDEMO0000000001", "test_event_code": "TEST1", "data": data})
    }

    #[test]
    fn accepts_and_records_resends_once() {
        let s = Settings::default();
        let mut d = Dedup::new(s.dedup_window);
        let req = request(
            PATH,
            Some("demo-token"),
            envelope(vec![event("e1"), event("e2")]),
        );
        let r = s.handle(&req, &mut d, now());
        assert_eq!(r.status, 200);
        assert_eq!(r.body["code"], 0, "{}", r.body);
        assert_eq!(r.body["message"], "OK");
        assert!(r.body["request_id"].is_string());
        assert_eq!(r.accepted.len(), 2);
        assert_eq!(r.accepted[1].key.as_deref(), Some("e2"));
        assert_eq!(r.accepted[1].name, "CompletePayment");
        assert_eq!(r.accepted[1].value, Some(12.0));
        assert_eq!(r.accepted[1].currency.as_deref(), Some("USD"));
        let again = s.handle(&req, &mut d, now());
        assert_eq!(again.body["code"], 0);
        assert!(again.accepted.is_empty());
        // Past the window the same event counts again.
        let later = now() + chrono::Duration::hours(49);
        let mut e = event("e1");
        e["event_time"] = json!(later.timestamp());
        let r = s.handle(
            &request(PATH, Some("demo-token"), envelope(vec![e])),
            &mut d,
            later,
        );
        assert_eq!(r.accepted.len(), 1);
    }

    #[test]
    fn refuses_requests_the_way_tiktok_does() {
        let s = Settings::default();
        let with = |f: &dyn Fn(&mut Value)| {
            let mut e = event("e1");
            f(&mut e);
            envelope(vec![event("e0"), e])
        };
        let ok = || envelope(vec![event("e1")]);
        let mut wrong_source = ok();
        wrong_source["event_source"] = json!("tv");
        let mut wrong_pixel = ok();
        wrong_pixel["event_source_id"] = json!("COTHER");
        // (what, request, HTTP status, body code)
        let cases: Vec<(&str, Incoming, u16, i64)> = vec![
            ("no token", request(PATH, None, ok()), 200, TOKEN_MISSING),
            (
                "bad token",
                request(PATH, Some("x"), ok()),
                200,
                TOKEN_INVALID,
            ),
            (
                "unknown version",
                request("/open_api/v9.9/event/track/", Some("demo-token"), ok()),
                404,
                40400,
            ),
            (
                "wrong path",
                request("/open_api/v1.3/pixel/track/", Some("demo-token"), ok()),
                404,
                40400,
            ),
            (
                "bad event_source",
                request(PATH, Some("demo-token"), wrong_source),
                200,
                INVALID_PARAMETER,
            ),
            (
                "wrong pixel",
                request(PATH, Some("demo-token"), wrong_pixel),
                200,
                NO_PERMISSION,
            ),
            (
                "empty data",
                request(PATH, Some("demo-token"), envelope(vec![])),
                200,
                INVALID_PARAMETER,
            ),
            (
                "too many",
                request(PATH, Some("demo-token"), envelope(vec![event("e"); 1001])),
                200,
                INVALID_PARAMETER,
            ),
            (
                "raw email",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| e["user"]["email"] = json!("person@example.com")),
                ),
                200,
                INVALID_PARAMETER,
            ),
            (
                "raw external id",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| e["user"]["external_id"] = json!("u_1")),
                ),
                200,
                INVALID_PARAMETER,
            ),
            (
                "missing event",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| {
                        e.as_object_mut().unwrap().remove("event");
                    }),
                ),
                200,
                INVALID_PARAMETER,
            ),
            (
                "missing event_time",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| {
                        e.as_object_mut().unwrap().remove("event_time");
                    }),
                ),
                200,
                INVALID_PARAMETER,
            ),
            (
                "too old",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| e["event_time"] = json!(now().timestamp() - 8 * 86_400)),
                ),
                200,
                INVALID_PARAMETER,
            ),
            (
                "future",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| e["event_time"] = json!(now().timestamp() + 600)),
                ),
                200,
                INVALID_PARAMETER,
            ),
            (
                "bad ip",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| e["user"]["ip"] = json!("nope")),
                ),
                200,
                INVALID_PARAMETER,
            ),
            (
                "relative url",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| e["page"]["url"] = json!("/x")),
                ),
                200,
                INVALID_PARAMETER,
            ),
            (
                "lowercase currency",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| e["properties"]["currency"] = json!("usd")),
                ),
                200,
                INVALID_PARAMETER,
            ),
            (
                "string value",
                request(
                    PATH,
                    Some("demo-token"),
                    with(&|e| e["properties"]["value"] = json!("12")),
                ),
                200,
                INVALID_PARAMETER,
            ),
        ];
        for (what, req, status, code) in cases {
            let mut d = Dedup::new(s.dedup_window);
            let r = s.handle(&req, &mut d, now());
            assert_eq!(r.status, status, "{what}: {}", r.body);
            assert_eq!(r.body["code"], code, "{what}: {}", r.body);
            assert!(r.body["message"].is_string(), "{what}");
            assert!(
                r.accepted.is_empty(),
                "{what}: one bad event fails the request"
            );
        }
    }

    #[test]
    fn messages_name_the_event() {
        let s = Settings::default();
        let mut bad = event("e1");
        bad["user"]["phone"] = json!("+15551234567");
        let r = s.handle(
            &request(PATH, Some("demo-token"), envelope(vec![event("e0"), bad])),
            &mut Dedup::new(s.dedup_window),
            now(),
        );
        assert!(
            r.body["message"]
                .as_str()
                .unwrap()
                .starts_with("data[1].user.phone"),
            "{}",
            r.body
        );
    }
}
