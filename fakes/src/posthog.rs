//! PostHog's capture service, `/batch/`, answering the way
//! `rust/capture` in PostHog/posthog does.
//!
//! `POST /batch/` (or `/batch`) with `{"api_key" (or "token"),
//! "historical_migration"?, "batch": [{event, distinct_id, properties?,
//! timestamp?, uuid?}]}`. A body over `max_body_bytes` (20 MB) gets 413; a
//! body that does not parse (a `uuid` that is not a UUID included) gets 400
//! with capture's "failed to parse request: …" text; a missing key 401
//! "event submitted without an api_key"; an empty or personal (`phx_`) key
//! 401 "API key is not valid: …"; an empty batch, an empty event name or a
//! missing distinct_id 400 with capture's texts. Everything else is 200
//! `{"status":"Ok"}`, and events over 1 MB are then dropped without a word,
//! as PostHog does (an ingestion warning only).
//!
//! Dedup: an event whose `uuid` was taken before is dropped (PostHog's
//! docs say this is not guaranteed; the fake models the kind case, so a
//! test can see a resend carries the same uuid). `$identify` with
//! `$anon_distinct_id` merges the anonymous person into the identified one;
//! [`Persons`] records the merges.
//!
//! Stricter than PostHog in one place, on purpose: capture does not know
//! which keys belong to a project (events for an unknown key are dropped
//! later, silently); with `check_key` (default) any key but `api_key` is a
//! 401, so a test sees a wrong key.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::{Accepted, Dedup, Incoming, Reply, Vendor};

/// Who was merged into whom, shared between the fake and the test.
#[derive(Debug, Clone, Default)]
pub struct Persons(Arc<Mutex<Vec<Merge>>>);

/// One `$identify` merge: `anonymous` now belongs to `identified`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merge {
    pub anonymous: String,
    pub identified: String,
}

impl Persons {
    pub fn merges(&self) -> Vec<Merge> {
        self.0.lock().expect("lock").clone()
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// The project API key the fake takes.
    pub api_key: String,
    pub check_key: bool,
    /// `/batch` body limit (PostHog: 20 MB).
    pub max_body_bytes: usize,
    /// Larger events are dropped silently (PostHog: 1 MB).
    pub max_event_bytes: usize,
    /// How long a uuid is remembered.
    pub dedup_window: Duration,
    pub persons: Persons,
}

impl Default for Settings {
    /// The demo key of `examples/demo.toml` and PostHog's limits.
    fn default() -> Self {
        Settings {
            api_key: "phc_demo_project_key".into(),
            check_key: true,
            max_body_bytes: 20 * 1024 * 1024,
            max_event_bytes: 1024 * 1024,
            dedup_window: Duration::from_secs(30 * 24 * 3600),
            persons: Persons::default(),
        }
    }
}

fn text(status: u16, s: &str) -> Reply {
    Reply::json(status, Value::String(s.to_string()))
}

/// 8-4-4-4-12 hex digits, as capture's `Uuid` parsing wants.
pub fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl Vendor for Settings {
    fn dedup_window(&self) -> Duration {
        self.dedup_window
    }

    fn handle(&self, req: &Incoming, dedup: &mut Dedup, now: DateTime<Utc>) -> Reply {
        if req.path != "/batch" && req.path != "/batch/" {
            return text(404, "not found");
        }
        if req.method != "POST" {
            return text(405, "method not allowed");
        }
        if req.body.len() > self.max_body_bytes {
            return text(
                413,
                "Failed to buffer the request body: length limit exceeded",
            );
        }
        let Some(body) = req.json() else {
            return text(
                400,
                "failed to parse request: expected value at line 1 column 1",
            );
        };
        let key = body
            .get("api_key")
            .or_else(|| body.get("token"))
            .and_then(Value::as_str);
        let Some(batch) = body.get("batch").and_then(Value::as_array) else {
            return text(400, "failed to parse request: missing field `batch`");
        };
        for e in batch {
            if let Some(u) = e.get("uuid").and_then(Value::as_str)
                && !u.is_empty()
                && !is_uuid(u)
            {
                return text(
                    400,
                    &format!(
                        "failed to parse request: invalid uuid `{}`",
                        u.chars().take(40).collect::<String>()
                    ),
                );
            }
        }
        let Some(key) = key else {
            return text(401, "event submitted without an api_key");
        };
        if key.is_empty() {
            return text(401, "API key is not valid: empty");
        }
        if key.starts_with("phx_") {
            return text(401, "API key is not valid: personal api key");
        }
        if self.check_key && key != self.api_key {
            return text(401, "API key is not valid: unknown project key (fake)");
        }
        if batch.is_empty() {
            return text(400, "request holds no event");
        }
        for e in batch {
            match e.get("event").and_then(Value::as_str) {
                Some(n) if !n.is_empty() => {}
                _ => return text(400, "event submitted with an empty event name"),
            }
            match e.get("distinct_id") {
                None | Some(Value::Null) => {
                    return text(400, "event submitted without a distinct_id");
                }
                Some(Value::String(s)) if s.is_empty() => {
                    return text(400, "event submitted with an empty distinct_id");
                }
                _ => {}
            }
        }
        let mut accepted = Vec::new();
        for e in batch {
            if serde_json::to_vec(e).map_or(0, |v| v.len()) > self.max_event_bytes {
                continue;
            }
            if let Some(u) = e.get("uuid").and_then(Value::as_str)
                && !dedup.first(u, now)
            {
                continue;
            }
            let name = e["event"].as_str().unwrap_or_default().to_string();
            let props = e.get("properties").cloned().unwrap_or(json!({}));
            if name == "$identify"
                && let (Some(anon), Some(id)) = (
                    props.get("$anon_distinct_id").and_then(Value::as_str),
                    e.get("distinct_id").and_then(Value::as_str),
                )
            {
                self.persons.0.lock().expect("lock").push(Merge {
                    anonymous: anon.to_string(),
                    identified: id.to_string(),
                });
            }
            accepted.push(Accepted {
                key: e.get("uuid").and_then(Value::as_str).map(str::to_string),
                name,
                value: props.get("revenue").and_then(Value::as_f64),
                currency: props
                    .get("currency")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                payload: e.clone(),
            });
        }
        Reply {
            status: 200,
            headers: Vec::new(),
            body: json!({"status": "Ok"}),
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
            path: "/batch/".into(),
            query: vec![],
            headers: vec![],
            body: serde_json::to_vec(&body).unwrap(),
        }
    }

    fn ev(uuid: &str) -> Value {
        json!({"event": "x", "distinct_id": "u", "uuid": uuid, "properties": {}})
    }

    const U1: &str = "71dd525b-97a0-5e83-9dce-bd077d315aea";

    #[test]
    fn answers_like_capture() {
        let s = Settings::default();
        let mut d = Dedup::new(s.dedup_window);
        let now = Utc::now();
        let r = s.handle(
            &req(json!({"api_key": s.api_key, "batch": [ev(U1)]})),
            &mut d,
            now,
        );
        assert_eq!((r.status, r.accepted.len()), (200, 1));
        // The resend is dropped.
        let r = s.handle(
            &req(json!({"api_key": s.api_key, "batch": [ev(U1)]})),
            &mut d,
            now,
        );
        assert_eq!((r.status, r.accepted.len()), (200, 0));
        let r = s.handle(
            &req(json!({"api_key": s.api_key, "batch": [ev("nope")]})),
            &mut d,
            now,
        );
        assert_eq!(r.status, 400);
        let r = s.handle(&req(json!({"batch": [ev(U1)]})), &mut d, now);
        assert_eq!(r.status, 401);
        let r = s.handle(
            &req(json!({"api_key": "phx_x", "batch": [ev(U1)]})),
            &mut d,
            now,
        );
        assert_eq!(r.status, 401);
        let r = s.handle(
            &req(json!({"api_key": s.api_key, "batch": [{"event": "x"}]})),
            &mut d,
            now,
        );
        assert_eq!(
            (r.status, r.body.clone()),
            (400, json!("event submitted without a distinct_id"))
        );
        let small = Settings {
            max_body_bytes: 10,
            ..Settings::default()
        };
        assert_eq!(
            small
                .handle(&req(json!({"api_key": "k", "batch": []})), &mut d, now)
                .status,
            413
        );
    }

    #[test]
    fn identify_records_the_merge() {
        let s = Settings::default();
        let mut d = Dedup::new(s.dedup_window);
        let e = json!({"event": "$identify", "distinct_id": "u-1",
                       "properties": {"$anon_distinct_id": "anon-1"}});
        s.handle(
            &req(json!({"api_key": s.api_key, "batch": [e]})),
            &mut d,
            Utc::now(),
        );
        assert_eq!(
            s.persons.merges(),
            vec![Merge {
                anonymous: "anon-1".into(),
                identified: "u-1".into()
            }]
        );
    }
}
