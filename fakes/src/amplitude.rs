//! Amplitude's HTTP V2 API, `POST /2/httpapi`, answering the way
//! amplitude.com/docs/apis/analytics/http-v2 says it does.
//!
//! Checks, in order: the path (404 otherwise) and method; `Content-Type:
//! application/json`; the body size (`max_body_bytes`, 413 `{"code":413,
//! "error":"Payload too large"}`); JSON (400 "Invalid JSON request body");
//! `api_key` and `events` present (400 "Request missing required field"
//! with `missing_field`); the key (400 "Invalid API key"); the event count
//! (`max_events`, 413). Then each event: `event_type` present, a string,
//! not reserved (`[Amplitude] …`); a `user_id` or `device_id` that
//! Amplitude keeps (at least `options.min_id_length`, default 5,
//! characters, not a placeholder such as "null": a shorter one is removed,
//! and an event left with none is refused); `time` an integer; `insert_id`
//! a string; `revenue`, `price` numbers, `quantity` an integer; `ip`,
//! `productId`, `revenueType` strings; `event_properties` and
//! `user_properties` objects at most 40 layers deep. Offending events are answered with
//! 400 and `events_with_missing_fields` / `events_with_invalid_fields`
//! (field → indexes), and the request ingests nothing.
//!
//! Throttling: each user and device may have `max_events_per_window`
//! events in `throttle_window` (Amplitude: 30 per second, averaged over
//! 30 s); a request that would pass it gets 429 with `eps_threshold`,
//! `throttled_users`, `throttled_devices` and `throttled_events`, and
//! ingests nothing.
//!
//! Dedup: an event whose (`device_id`, `insert_id`) was ingested in the
//! last 7 days is dropped (Amplitude sets a missing device_id from the
//! user_id, so the fake keys on the user_id then). 200 answers carry
//! `code`, `events_ingested`, `payload_size_bytes`, `server_upload_time`.
//!
//! Where the docs are silent the fake chooses, and says so: it lists every
//! offending event (the docs say "the index of the first event"), and an
//! event without a kept id is listed under `events_with_missing_fields` as
//! `user_id`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use crate::{Accepted, Dedup, Incoming, Reply, Vendor};

/// Ids Amplitude refuses ("Invalid IDs that result in a 400 error").
const INVALID_IDS: &[&str] = &[
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

/// Recent event times per user and device, shared by the fake's requests.
#[derive(Debug, Clone, Default)]
pub struct Rates(Arc<Mutex<HashMap<String, VecDeque<DateTime<Utc>>>>>);

#[derive(Debug, Clone)]
pub struct Settings {
    /// The project API key the fake takes.
    pub api_key: String,
    /// Events per request (Amplitude: 2000).
    pub max_events: usize,
    /// Body bytes per request (Amplitude: under 1 MB).
    pub max_body_bytes: usize,
    /// Events one user or device may send in `throttle_window`.
    pub max_events_per_window: usize,
    pub throttle_window: Duration,
    /// How long an insert_id is remembered (Amplitude: 7 days).
    pub dedup_window: Duration,
    pub rates: Rates,
}

impl Default for Settings {
    /// The demo key of `examples/demo.toml` and Amplitude's limits.
    fn default() -> Self {
        Settings {
            api_key: "demo-amplitude-api-key".into(),
            max_events: 2000,
            max_body_bytes: 1_000_000,
            max_events_per_window: 30 * 30,
            throttle_window: Duration::from_secs(30),
            dedup_window: Duration::from_secs(7 * 24 * 3600),
            rates: Rates::default(),
        }
    }
}

fn error(status: u16, text: &str) -> Reply {
    Reply::json(status, json!({"code": status, "error": text}))
}

fn missing(field: &str) -> Reply {
    Reply::json(
        400,
        json!({"code": 400, "error": "Request missing required field", "missing_field": field}),
    )
}

/// The id as Amplitude keeps it, or `None` when it would be removed.
fn kept(e: &Map<String, Value>, key: &str, min: usize) -> Option<String> {
    let id = e.get(key)?.as_str()?;
    let n = id.chars().count();
    (n >= min && n <= 1024 && !INVALID_IDS.contains(&id.trim().to_lowercase().as_str()))
        .then(|| id.to_string())
}

/// "Object depth may not exceed 40 layers."
const MAX_DEPTH: usize = 40;

/// How many objects and arrays deep `v` goes (a plain value: 0).
fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Whether a field's value has the type Amplitude wants.
type Shape = fn(&Value) -> bool;

#[derive(Default)]
struct Faults {
    missing: HashMap<&'static str, Vec<usize>>,
    invalid: HashMap<&'static str, Vec<usize>>,
}

impl Faults {
    fn check(&mut self, i: usize, e: &Map<String, Value>, min: usize) {
        match e.get("event_type") {
            None | Some(Value::Null) => self.missing.entry("event_type").or_default().push(i),
            Some(Value::String(s)) if !s.is_empty() && !s.starts_with("[Amplitude]") => {}
            Some(_) => self.invalid.entry("event_type").or_default().push(i),
        }
        if kept(e, "user_id", min).is_none() && kept(e, "device_id", min).is_none() {
            self.missing.entry("user_id").or_default().push(i);
        }
        let kinds: [(&'static str, Shape); 8] = [
            ("time", |v| v.is_i64() || v.is_u64()),
            ("insert_id", Value::is_string),
            ("revenue", Value::is_number),
            ("price", Value::is_number),
            ("quantity", |v| v.is_i64() || v.is_u64()),
            ("ip", Value::is_string),
            ("productId", Value::is_string),
            ("revenueType", Value::is_string),
        ];
        for (field, ok) in kinds {
            if e.get(field).is_some_and(|v| !ok(v)) {
                self.invalid.entry(field).or_default().push(i);
            }
        }
        for field in ["event_properties", "user_properties"] {
            if e.get(field)
                .is_some_and(|v| !v.is_object() || depth(v) > MAX_DEPTH)
            {
                self.invalid.entry(field).or_default().push(i);
            }
        }
    }
}

impl Settings {
    /// The ids over their rate if `events` were ingested now; records the
    /// events when none is.
    fn throttle(
        &self,
        events: &[(Option<String>, Option<String>)],
        now: DateTime<Utc>,
    ) -> Option<Reply> {
        let window = chrono::Duration::from_std(self.throttle_window).expect("window fits");
        let mut rates = self.rates.0.lock().expect("lock");
        let mut wanted: HashMap<String, usize> = HashMap::new();
        for (u, d) in events {
            for key in [
                u.as_ref().map(|u| format!("u:{u}")),
                d.as_ref().map(|d| format!("d:{d}")),
            ]
            .into_iter()
            .flatten()
            {
                *wanted.entry(key).or_default() += 1;
            }
        }
        let mut over: HashMap<String, usize> = HashMap::new();
        for (key, n) in &wanted {
            let q = rates.entry(key.clone()).or_default();
            while q.front().is_some_and(|t| now - *t >= window) {
                q.pop_front();
            }
            if q.len() + n > self.max_events_per_window {
                over.insert(key.clone(), q.len() + n);
            }
        }
        if over.is_empty() {
            for (key, n) in wanted {
                rates
                    .entry(key)
                    .or_default()
                    .extend(std::iter::repeat_n(now, n));
            }
            return None;
        }
        let secs = self.throttle_window.as_secs().max(1) as usize;
        let eps = |n: usize| json!(n / secs);
        let mut users = Map::new();
        let mut devices = Map::new();
        let mut indexes = Vec::new();
        for (i, (u, d)) in events.iter().enumerate() {
            let mut hit = false;
            if let Some(u) = u
                && let Some(&n) = over.get(&format!("u:{u}"))
            {
                users.insert(u.clone(), eps(n));
                hit = true;
            }
            if let Some(d) = d
                && let Some(&n) = over.get(&format!("d:{d}"))
            {
                devices.insert(d.clone(), eps(n));
                hit = true;
            }
            if hit {
                indexes.push(i);
            }
        }
        Some(Reply::json(
            429,
            json!({
                "code": 429,
                "error": "Too many requests for some devices and users",
                "eps_threshold": self.max_events_per_window / secs,
                "throttled_devices": devices,
                "throttled_users": users,
                "throttled_events": indexes,
            }),
        ))
    }
}

impl Vendor for Settings {
    fn dedup_window(&self) -> Duration {
        self.dedup_window
    }

    fn handle(&self, req: &Incoming, dedup: &mut Dedup, now: DateTime<Utc>) -> Reply {
        if req.path != "/2/httpapi" {
            return error(404, "Invalid request path");
        }
        if req.method != "POST" {
            return error(405, "Method not allowed");
        }
        if !req
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json"))
        {
            return error(400, "Invalid JSON request body");
        }
        if req.body.len() > self.max_body_bytes {
            return error(413, "Payload too large");
        }
        if req.body.is_empty() {
            return error(400, "Missing request body");
        }
        let Some(body) = req.json() else {
            return error(400, "Invalid JSON request body");
        };
        let Some(key) = body.get("api_key").and_then(Value::as_str) else {
            return missing("api_key");
        };
        let Some(events) = body.get("events").and_then(Value::as_array) else {
            return missing("events");
        };
        if key != self.api_key {
            return error(400, "Invalid API key");
        }
        if events.len() > self.max_events {
            return error(413, "Payload too large");
        }
        let min = body
            .pointer("/options/min_id_length")
            .and_then(Value::as_u64)
            .map_or(5, |n| n as usize);
        let mut faults = Faults::default();
        let mut objects = Vec::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            let Some(e) = e.as_object() else {
                return error(400, "Invalid event JSON");
            };
            faults.check(i, e, min);
            objects.push(e);
        }
        if !faults.missing.is_empty() || !faults.invalid.is_empty() {
            let error = if faults.invalid.is_empty() {
                "Request missing required field"
            } else {
                "Invalid field values on some events"
            };
            let mut b = json!({"code": 400, "error": error});
            if !faults.missing.is_empty() {
                b["events_with_missing_fields"] = json!(faults.missing);
            }
            if !faults.invalid.is_empty() {
                b["events_with_invalid_fields"] = json!(faults.invalid);
            }
            return Reply::json(400, b);
        }
        let ids: Vec<(Option<String>, Option<String>)> = objects
            .iter()
            .map(|e| (kept(e, "user_id", min), kept(e, "device_id", min)))
            .collect();
        if let Some(reply) = self.throttle(&ids, now) {
            return reply;
        }
        let mut accepted = Vec::new();
        for (e, (user, device)) in objects.iter().zip(&ids) {
            if let Some(insert_id) = e.get("insert_id").and_then(Value::as_str) {
                // Amplitude sets a missing device_id from the user_id.
                let device = device
                    .clone()
                    .or_else(|| user.as_ref().map(|u| format!("user:{u}")))
                    .unwrap_or_default();
                if !dedup.first(&format!("{device}\u{1f}{insert_id}"), now) {
                    continue;
                }
            }
            let mut payload = (*e).clone();
            // A too short id is removed, as Amplitude does.
            for (k, v) in [("user_id", user), ("device_id", device)] {
                if v.is_none() {
                    payload.remove(k);
                }
            }
            accepted.push(Accepted {
                key: e
                    .get("insert_id")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                name: e["event_type"].as_str().unwrap_or_default().to_string(),
                value: e.get("revenue").and_then(Value::as_f64),
                currency: e
                    .get("event_properties")
                    .and_then(|p| p.get("currency"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                payload: Value::Object(payload),
            });
        }
        Reply {
            status: 200,
            headers: Vec::new(),
            body: json!({
                "code": 200,
                "events_ingested": accepted.len(),
                "payload_size_bytes": req.body.len(),
                "server_upload_time": now.timestamp_millis(),
            }),
            accepted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: Value) -> Incoming {
        Incoming {
            method: "POST".into(),
            path: "/2/httpapi".into(),
            query: vec![],
            headers: vec![("content-type".into(), "application/json".into())],
            body: serde_json::to_vec(&body).unwrap(),
        }
    }

    fn ev(insert_id: &str, user: &str) -> Value {
        json!({"event_type": "x", "user_id": user, "time": 1_700_000_000_000_i64, "insert_id": insert_id})
    }

    fn send(s: &Settings, d: &mut Dedup, events: Value) -> Reply {
        s.handle(
            &req(json!({"api_key": s.api_key, "events": events})),
            d,
            Utc::now(),
        )
    }

    #[test]
    fn amplitude_ingests_once_per_device_and_insert_id() {
        let s = Settings::default();
        let mut d = Dedup::new(s.dedup_window);
        let r = send(&s, &mut d, json!([ev("a", "user-1"), ev("b", "user-1")]));
        assert_eq!((r.status, r.accepted.len()), (200, 2));
        assert_eq!(r.body["events_ingested"], 2);
        let r = send(&s, &mut d, json!([ev("a", "user-1")]));
        assert_eq!((r.status, r.accepted.len()), (200, 0));
        // The same insert_id for another person is another event.
        let r = send(&s, &mut d, json!([ev("a", "user-2")]));
        assert_eq!(r.accepted.len(), 1);
    }

    #[test]
    fn refusals_use_amplitudes_bodies_and_ingest_nothing() {
        let s = Settings::default();
        let mut d = Dedup::new(s.dedup_window);
        let r = s.handle(&req(json!({"events": []})), &mut d, Utc::now());
        assert_eq!(
            (r.status, r.body["missing_field"].clone()),
            (400, json!("api_key"))
        );
        let r = s.handle(
            &req(json!({"api_key": "wrong", "events": []})),
            &mut d,
            Utc::now(),
        );
        assert_eq!(
            (r.status, r.body["error"].clone()),
            (400, json!("Invalid API key"))
        );
        let mut bad_time = ev("c", "user-1");
        bad_time["time"] = json!("2026-01-01T00:00:00Z");
        let short = ev("d", "abc");
        let mut deep = ev("g", "user-1");
        let mut nest = json!(1);
        for _ in 0..41 {
            nest = json!({ "k": nest });
        }
        deep["event_properties"] = nest;
        let r = send(&s, &mut d, json!([deep]));
        assert_eq!(
            r.body["events_with_invalid_fields"],
            json!({"event_properties": [0]})
        );
        let r = send(&s, &mut d, json!([ev("b", "user-1"), bad_time, short]));
        assert_eq!(r.status, 400);
        assert_eq!(r.body["events_with_invalid_fields"], json!({"time": [1]}));
        assert_eq!(
            r.body["events_with_missing_fields"],
            json!({"user_id": [2]})
        );
        assert!(r.accepted.is_empty());
        // min_id_length lets the short id through.
        let r = s.handle(
            &req(json!({"api_key": s.api_key, "options": {"min_id_length": 3}, "events": [ev("d", "abc")]})),
            &mut d,
            Utc::now(),
        );
        assert_eq!((r.status, r.accepted.len()), (200, 1));
        let small = Settings {
            max_events: 1,
            ..Settings::default()
        };
        let r = send(
            &small,
            &mut d,
            json!([ev("e", "user-1"), ev("f", "user-1")]),
        );
        assert_eq!(
            (r.status, r.body["error"].clone()),
            (413, json!("Payload too large"))
        );
    }

    #[test]
    fn a_busy_user_is_throttled_by_name_and_index() {
        let s = Settings {
            max_events_per_window: 2,
            ..Settings::default()
        };
        let mut d = Dedup::new(s.dedup_window);
        let r = send(
            &s,
            &mut d,
            json!([
                ev("a", "busy-user"),
                ev("b", "calm-user"),
                ev("c", "busy-user"),
                ev("d", "busy-user")
            ]),
        );
        assert_eq!(r.status, 429);
        assert_eq!(r.body["throttled_events"], json!([0, 2, 3]));
        assert!(r.body["throttled_users"].get("busy-user").is_some());
        assert!(r.accepted.is_empty());
        // Nothing was counted: two of them fit.
        let r = send(
            &s,
            &mut d,
            json!([ev("a", "busy-user"), ev("b", "calm-user")]),
        );
        assert_eq!(r.status, 200);
    }
}
