//! Customer.io's Track API: `POST /api/v2/batch` and `POST /api/v1/events`
//! (anonymous events), answering as Customer.io's published OpenAPI
//! document (docs.customer.io/files/journeys-track.json) says.
//!
//! Both take HTTP Basic `site_id:api_key`; anything else is 401 (the
//! document gives no body for it: the fake sends
//! `{"meta":{"error":"Unauthorized request"}}`).
//!
//! `/api/v2/batch` takes `{"batch": [op, …]}`. A body over
//! `max_body_bytes` (500 KB) gets 413 (the document states the limit, not
//! the status). A body that is not JSON or has no `batch` array is 400
//! `{"errors": [{reason, field, message}]}`. Each op is checked on its own:
//! `type` "person", `identifiers` exactly one of `id` (≤ 150 bytes), `email`
//! (only with `email_identifiers`), `phone` (E.164), `cio_id`; `action` "identify" or
//! "event"; an event's `name` (1-100 bytes); `id` a ULID; `timestamp` an
//! integer; the op ≤ `max_op_bytes` (32 KB). Invalid ops are listed in a 207
//! `{"errors": [{batch_index, reason, field, message}]}` and the others
//! are taken; with none invalid the answer is 200 `{}`.
//!
//! `/api/v1/events`: `name` required, `anonymous_id`, `id` (ULID),
//! `timestamp` (integer), `data`; errors are 400 `{"meta": {"errors":
//! [..]}}`, success 200 `{}`.
//!
//! Dedup: an event whose `id` was taken before is dropped ("If an event
//! repeats a value we've already received, we ignore the duplicate").
//! [`People`] records each identify's attributes, so a test sees who was
//! identified with what and which anonymous id they merged.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use crate::{Accepted, Dedup, Incoming, Reply, Vendor};

/// The people identified so far: identifier ("id:u-1", "email:…") → the
/// attributes set on them, merged in arrival order.
#[derive(Debug, Clone, Default)]
pub struct People(Arc<Mutex<BTreeMap<String, Map<String, Value>>>>);

impl People {
    pub fn get(&self, identifier: &str) -> Option<Map<String, Value>> {
        self.0.lock().expect("lock").get(identifier).cloned()
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub site_id: String,
    pub api_key: String,
    /// Whether the workspace takes `email` as an identifier.
    pub email_identifiers: bool,
    /// `/api/v2/batch` body limit (Customer.io: 500 KB).
    pub max_body_bytes: usize,
    /// Each op of a batch (Customer.io: 32 KB).
    pub max_op_bytes: usize,
    /// How long an event id is remembered (Customer.io states none).
    pub dedup_window: Duration,
    pub people: People,
}

impl Default for Settings {
    /// The demo credentials of `examples/demo.toml` and Customer.io's limits.
    fn default() -> Self {
        Settings {
            site_id: "demo-site-id".into(),
            api_key: "demo-track-api-key".into(),
            email_identifiers: true,
            max_body_bytes: 500_000,
            max_op_bytes: 32_000,
            dedup_window: Duration::from_secs(30 * 24 * 3600),
            people: People::default(),
        }
    }
}

/// 26 Crockford base32 characters whose first is at most 7 (128 bits).
pub fn is_ulid(s: &str) -> bool {
    s.len() == 26
        && s.as_bytes()[0] <= b'7'
        && s.bytes()
            .all(|b| b"0123456789ABCDEFGHJKMNPQRSTVWXYZ".contains(&b))
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let s = s.trim_end_matches('=');
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for b in s.bytes() {
        let v = A.iter().position(|&c| c == b)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// One invalid op: (field, message).
type Invalid = (&'static str, String);

impl Settings {
    fn authorised(&self, req: &Incoming) -> bool {
        let expected = format!("{}:{}", self.site_id, self.api_key);
        req.header("authorization")
            .and_then(|h| h.strip_prefix("Basic "))
            .and_then(base64_decode)
            .is_some_and(|c| c == expected.as_bytes())
    }

    fn check_op(&self, op: &Value) -> Result<(), Invalid> {
        if serde_json::to_vec(op).map_or(0, |v| v.len()) > self.max_op_bytes {
            return Err((
                "batch",
                format!(
                    "each request in a batch must be {} bytes or smaller",
                    self.max_op_bytes
                ),
            ));
        }
        if op.get("type").and_then(Value::as_str) != Some("person") {
            return Err(("type", "must be person".into()));
        }
        let Some(ids) = op.get("identifiers").and_then(Value::as_object) else {
            return Err(("identifiers", "is required".into()));
        };
        if ids.len() != 1 {
            return Err(("identifiers", "you cannot pass multiple identifiers".into()));
        }
        for (k, v) in ids {
            let Some(v) = v.as_str().filter(|v| !v.is_empty()) else {
                return Err(("identifiers", format!("{k} must be a non-empty string")));
            };
            match k.as_str() {
                "id" if v.len() > 150 => {
                    return Err(("identifiers.id", "is longer than 150 bytes".into()));
                }
                "id" | "cio_id" => {}
                "email" if !self.email_identifiers => {
                    return Err((
                        "identifiers.email",
                        "email is not an identifier in this workspace".into(),
                    ));
                }
                "email" if !v.contains('@') => {
                    return Err(("identifiers.email", "is not an email address".into()));
                }
                "email" => {}
                "phone" if !v.starts_with('+') => {
                    return Err(("identifiers.phone", "must be in E.164 format".into()));
                }
                "phone" => {}
                _ => return Err(("identifiers", format!("unknown identifier {k}"))),
            }
        }
        if let Some(t) = op.get("timestamp")
            && !t.is_i64()
        {
            return Err(("timestamp", "must be a unix timestamp in seconds".into()));
        }
        match op.get("action").and_then(Value::as_str) {
            Some("identify") => Ok(()),
            Some("event") => {
                match op.get("name").and_then(Value::as_str) {
                    Some(n) if !n.is_empty() && n.len() <= 100 => {}
                    _ => return Err(("name", "is required and at most 100 bytes".into())),
                }
                match op.get("id") {
                    None => Ok(()),
                    Some(Value::String(id)) if is_ulid(id) => Ok(()),
                    Some(_) => Err(("id", "must be a valid ULID".into())),
                }
            }
            _ => Err(("action", "must be identify or event".into())),
        }
    }

    fn batch(&self, req: &Incoming, dedup: &mut Dedup, now: DateTime<Utc>) -> Reply {
        if req.body.len() > self.max_body_bytes {
            return Reply::json(
                413,
                json!({"errors": [{"reason": "too_large", "field": "batch",
                "message": "your batch request must be smaller than 500kb"}]}),
            );
        }
        let Some(batch) = req
            .json()
            .and_then(|b| b.get("batch").and_then(Value::as_array).cloned())
        else {
            return Reply::json(
                400,
                json!({"errors": [{"reason": "invalid", "field": "batch",
                "message": "the request body must be a JSON object with a batch array"}]}),
            );
        };
        let mut errors = Vec::new();
        let mut accepted = Vec::new();
        for (i, op) in batch.iter().enumerate() {
            if let Err((field, message)) = self.check_op(op) {
                errors.push(json!({"batch_index": i, "reason": "invalid", "field": field, "message": message}));
                continue;
            }
            let (k, v) = op["identifiers"]
                .as_object()
                .and_then(|m| m.iter().next())
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .unwrap_or_default();
            if op["action"] == "identify" {
                let attrs = op
                    .get("attributes")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                let mut people = self.people.0.lock().expect("lock");
                people.entry(format!("{k}:{v}")).or_default().extend(attrs);
                accepted.push(Accepted {
                    key: None,
                    name: "identify".into(),
                    value: None,
                    currency: None,
                    payload: op.clone(),
                });
                continue;
            }
            if let Some(id) = op.get("id").and_then(Value::as_str)
                && !dedup.first(id, now)
            {
                continue;
            }
            accepted.push(event(op, "attributes"));
        }
        if errors.is_empty() {
            Reply {
                status: 200,
                headers: Vec::new(),
                body: json!({}),
                accepted,
            }
        } else {
            Reply {
                status: 207,
                headers: Vec::new(),
                body: json!({"errors": errors}),
                accepted,
            }
        }
    }

    fn anonymous(&self, req: &Incoming, dedup: &mut Dedup, now: DateTime<Utc>) -> Reply {
        let bad = |m: &str| Reply::json(400, json!({"meta": {"errors": [m]}}));
        let Some(e) = req.json().filter(Value::is_object) else {
            return bad("request body must be a JSON object");
        };
        match e.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() && n.len() <= 100 => {}
            _ => return bad("name is required and at most 100 bytes"),
        }
        if let Some(id) = e.get("id")
            && !id.as_str().is_some_and(is_ulid)
        {
            return bad("id must be a valid ULID");
        }
        if let Some(t) = e.get("timestamp")
            && !t.is_i64()
        {
            return bad("timestamp must be a unix timestamp");
        }
        if serde_json::to_vec(&e["data"]).map_or(0, |v| v.len()) > 100_000 {
            return bad("data is larger than 100000 bytes");
        }
        let mut accepted = Vec::new();
        let fresh = e
            .get("id")
            .and_then(Value::as_str)
            .is_none_or(|id| dedup.first(id, now));
        if fresh {
            accepted.push(event(&e, "data"));
        }
        Reply {
            status: 200,
            headers: Vec::new(),
            body: json!({}),
            accepted,
        }
    }
}

fn event(e: &Value, data: &str) -> Accepted {
    Accepted {
        key: e.get("id").and_then(Value::as_str).map(str::to_string),
        name: e["name"].as_str().unwrap_or_default().to_string(),
        value: e[data].get("value").and_then(Value::as_f64),
        currency: e[data]
            .get("currency")
            .and_then(Value::as_str)
            .map(str::to_string),
        payload: e.clone(),
    }
}

impl Vendor for Settings {
    fn dedup_window(&self) -> Duration {
        self.dedup_window
    }

    fn handle(&self, req: &Incoming, dedup: &mut Dedup, now: DateTime<Utc>) -> Reply {
        if req.method != "POST" {
            return Reply::json(405, json!({"meta": {"error": "method not allowed"}}));
        }
        let path = req.path.trim_end_matches('/');
        if path != "/api/v2/batch" && path != "/api/v1/events" {
            return Reply::json(404, json!({"meta": {"error": "not found"}}));
        }
        if !self.authorised(req) {
            return Reply::json(401, json!({"meta": {"error": "Unauthorized request"}}));
        }
        if path == "/api/v2/batch" {
            self.batch(req, dedup, now)
        } else {
            self.anonymous(req, dedup, now)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ULID: &str = "01ARZ3NDEKTSV4RRFFQ69G5FAV";

    fn req(path: &str, body: Value, auth: &str) -> Incoming {
        let b64 = |s: &str| {
            const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let mut out = String::new();
            for c in s.as_bytes().chunks(3) {
                let n = (u32::from(c[0]) << 16)
                    | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                    | u32::from(*c.get(2).unwrap_or(&0));
                for i in 0..4 {
                    if i <= c.len() {
                        out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
                    } else {
                        out.push('=');
                    }
                }
            }
            out
        };
        Incoming {
            method: "POST".into(),
            path: path.into(),
            query: vec![],
            headers: vec![("authorization".into(), format!("Basic {}", b64(auth)))],
            body: serde_json::to_vec(&body).unwrap(),
        }
    }

    const AUTH: &str = "demo-site-id:demo-track-api-key";

    fn ev(id: &str) -> Value {
        json!({"type": "person", "identifiers": {"id": "u-1"}, "action": "event", "name": "x", "id": id, "timestamp": 1})
    }

    #[test]
    fn batch_answers_207_naming_the_invalid_ops_and_dedups_on_id() {
        let s = Settings::default();
        let mut d = Dedup::new(s.dedup_window);
        let now = Utc::now();
        let ident = json!({"type": "person", "identifiers": {"id": "u-1"}, "action": "identify",
                           "attributes": {"plan": "pro", "anonymous_id": "a-1"}});
        let two_ids = json!({"type": "person", "identifiers": {"id": "u-1", "email": "a@b.c"}, "action": "event", "name": "x"});
        let r = s.handle(
            &req(
                "/api/v2/batch",
                json!({"batch": [ident, ev(ULID), ev("nope"), two_ids]}),
                AUTH,
            ),
            &mut d,
            now,
        );
        assert_eq!(r.status, 207);
        let idx: Vec<u64> = r.body["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["batch_index"].as_u64().unwrap())
            .collect();
        assert_eq!(idx, [2, 3]);
        assert_eq!(r.accepted.len(), 2);
        assert_eq!(s.people.get("id:u-1").unwrap()["anonymous_id"], "a-1");
        // The resend of the event is dropped.
        let r = s.handle(
            &req("/api/v2/batch", json!({"batch": [ev(ULID)]}), AUTH),
            &mut d,
            now,
        );
        assert_eq!((r.status, r.accepted.len()), (200, 0));
        assert_eq!(
            s.handle(
                &req("/api/v2/batch", json!({"batch": []}), "demo-site-id:wrong"),
                &mut d,
                now
            )
            .status,
            401
        );
        assert_eq!(
            s.handle(
                &req("/api/v2/batch", json!({"nope": []}), AUTH),
                &mut d,
                now
            )
            .status,
            400
        );
        let small = Settings {
            max_body_bytes: 10,
            ..Settings::default()
        };
        assert_eq!(
            small
                .handle(
                    &req("/api/v2/batch", json!({"batch": []}), AUTH),
                    &mut d,
                    now
                )
                .status,
            413
        );
        let no_email = Settings {
            email_identifiers: false,
            ..Settings::default()
        };
        let by_email =
            json!({"type": "person", "identifiers": {"email": "a@b.c"}, "action": "identify"});
        assert_eq!(
            no_email
                .handle(
                    &req("/api/v2/batch", json!({"batch": [by_email]}), AUTH),
                    &mut d,
                    now
                )
                .status,
            207
        );
    }

    #[test]
    fn anonymous_events_need_a_name_and_dedup_on_id() {
        let s = Settings::default();
        let mut d = Dedup::new(s.dedup_window);
        let now = Utc::now();
        let e = json!({"name": "viewed", "anonymous_id": "a-1", "id": ULID, "timestamp": 1, "data": {}});
        let r = s.handle(&req("/api/v1/events", e.clone(), AUTH), &mut d, now);
        assert_eq!((r.status, r.accepted.len()), (200, 1));
        let r = s.handle(&req("/api/v1/events", e, AUTH), &mut d, now);
        assert_eq!((r.status, r.accepted.len()), (200, 0));
        let r = s.handle(
            &req("/api/v1/events", json!({"anonymous_id": "a-1"}), AUTH),
            &mut d,
            now,
        );
        assert_eq!(r.status, 400);
        assert!(
            r.body["meta"]["errors"][0]
                .as_str()
                .unwrap()
                .contains("name")
        );
    }
}
