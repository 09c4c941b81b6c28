//! Mixpanel's Import API (`/import`) and Engage API (`/engage`), written
//! from docs.mixpanel.com (reference/import-events, reference/event-deduplication,
//! openapi/ingestion.openapi.yaml, reference/user-profile-limits,
//! docs/tracking-methods/id-management/*).
//!
//! `/import?strict=1` with HTTP Basic auth: a service account
//! (`username:secret`, and `project_id` in the query must be the project's)
//! or the project API secret as the user with an empty password (no
//! `project_id`). 401 `{"code":401,"error":"Invalid credentials","status":"Unauthorized"}`
//! otherwise. A body over `max_body_bytes` answers 413; a body that is not a
//! JSON array of at most `max_events` events answers 400 without
//! `failed_records`. Each event is then judged on its own (event name,
//! `time` after 1971 and at most an hour ahead, `distinct_id` present and not
//! on Mixpanel's list of disallowed values, `$insert_id` of at most 36
//! alphanumerics or `-`, fewer than 255 properties, at most 1 MB): the valid
//! ones are ingested, and if any failed the answer is 400 with
//! `failed_records` (`index`, `$insert_id`, `field`, `message`) and
//! `num_records_imported`, as Mixpanel's strict mode does.
//!
//! Ingested events are deduplicated on (event, distinct_id, time,
//! $insert_id): a resend is counted in `num_records_imported` but not
//! accepted again. Identity clusters follow the project's merge API:
//! simplified links `$device:<$device_id>` to `$user_id` when an event holds
//! both; original links `$anon_id` (UUID v4 only) to `$identified_id` on
//! `$identify`, and the two `$distinct_ids` of `$merge`.
//!
//! `/engage` takes a JSON array of at most 2000 updates, each with the
//! project's `$token`, a `$distinct_id` and one operation (`$set`,
//! `$set_once`, `$append`, `$union`, `$add`, `$unset`, `$remove`,
//! `$delete`), and answers 200 either way: `{"status":1,"error":null}` with
//! `verbose=1` (else `1`), or status 0 (`0`) when any update is invalid, in
//! which case none is applied. Profiles are kept for tests to read.
//!
//! `accepted()` lists the events taken (not `$identify`/`$merge`, which are
//! identity operations) and each profile `$set` (name `"$set"`), so an
//! identify counts once whichever merge API the project uses.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use crate::{Accepted, Dedup, Incoming, Reply, Vendor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdMerge {
    Simplified,
    Original,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub project_id: String,
    pub service_account_username: String,
    pub service_account_secret: String,
    pub api_secret: String,
    pub project_token: String,
    pub id_merge: IdMerge,
    pub max_events: usize,
    pub max_body_bytes: usize,
    pub max_event_bytes: usize,
    pub max_updates: usize,
    /// The event property `Accepted::value` is read from.
    pub revenue_property: String,
    pub currency_property: String,
}

impl Default for Settings {
    /// The demo credentials of `examples/demo.toml` and Mixpanel's limits.
    fn default() -> Self {
        Settings {
            project_id: "3141592".into(),
            service_account_username: "demo.sa".into(),
            service_account_secret: "demo-sa-secret".into(),
            api_secret: "demo-api-secret".into(),
            project_token: "demo-token".into(),
            id_merge: IdMerge::Simplified,
            max_events: 2000,
            max_body_bytes: 10 * 1024 * 1024,
            max_event_bytes: 1024 * 1024,
            max_updates: 2000,
            revenue_property: "$amount".into(),
            currency_property: "$currency".into(),
        }
    }
}

const DISALLOWED_IDS: &[&str] = &[
    "00000000-0000-0000-0000-000000000000",
    "anon",
    "anonymous",
    "nil",
    "none",
    "null",
    "n/a",
    "na",
    "undefined",
    "unknown",
    "<nil>",
    "0",
    "-1",
    "true",
    "false",
    "[]",
    "{}",
];

const OPERATIONS: &[&str] = &[
    "$set",
    "$set_once",
    "$add",
    "$union",
    "$append",
    "$remove",
    "$unset",
    "$delete",
];

/// What the fake Mixpanel project holds besides its events.
#[derive(Debug, Default)]
pub struct State {
    /// Profiles by `$distinct_id`.
    pub profiles: BTreeMap<String, Map<String, Value>>,
    /// Identity clusters: each id → its cluster's canonical id.
    pub canonical: BTreeMap<String, String>,
}

impl State {
    /// The canonical id of `id`'s cluster (the id itself when unmerged).
    pub fn canonical_of(&self, id: &str) -> String {
        self.canonical
            .get(id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }

    fn link(&mut self, canonical: &str, other: &str) {
        let target = self.canonical_of(canonical);
        let moved = self.canonical_of(other);
        if moved == target {
            return;
        }
        for v in self.canonical.values_mut() {
            if *v == moved {
                *v = target.clone();
            }
        }
        self.canonical.insert(moved.clone(), target.clone());
        self.canonical.insert(other.to_string(), target.clone());
        self.canonical.entry(target.clone()).or_insert(target);
    }
}

/// The fake; `state()` stays readable after it is served.
pub struct Mixpanel {
    settings: Settings,
    state: Arc<Mutex<State>>,
}

impl Mixpanel {
    pub fn new(settings: Settings) -> Mixpanel {
        Mixpanel {
            settings,
            state: Arc::default(),
        }
    }

    /// The project's profiles and identity clusters.
    pub fn state(&self) -> Arc<Mutex<State>> {
        self.state.clone()
    }
}

impl From<Settings> for Mixpanel {
    fn from(s: Settings) -> Self {
        Mixpanel::new(s)
    }
}

fn error(status: u16, text: &str, error: &str) -> Reply {
    Reply::json(
        status,
        json!({"code": status, "error": error, "status": text}),
    )
}

fn basic_auth(req: &Incoming) -> Option<(String, String)> {
    let v = req.header("authorization")?.strip_prefix("Basic ")?;
    let decoded = decode_base64(v.trim())?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::new();
    for chunk in s.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len().max(1)]);
    }
    Some(out)
}

fn disallowed(id: &str) -> bool {
    DISALLOWED_IDS
        .iter()
        .any(|d| d.eq_ignore_ascii_case(id.trim()))
}

fn is_uuid_v4(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
        && b[14] == b'4'
        && matches!(b[19].to_ascii_lowercase(), b'8' | b'9' | b'a' | b'b')
}

impl Mixpanel {
    /// Why Mixpanel's strict validation fails this event: (field, message).
    fn invalid(&self, e: &Value, now: DateTime<Utc>) -> Option<(&'static str, String)> {
        let Some(obj) = e.as_object() else {
            return Some(("event", "event must be a JSON object".into()));
        };
        match obj.get("event").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => {}
            _ => return Some(("event", "'event' must be a non-empty string".into())),
        }
        let Some(p) = obj.get("properties").and_then(Value::as_object) else {
            return Some(("properties", "'properties' must be an object".into()));
        };
        let Some(t) = p.get("time").and_then(Value::as_f64) else {
            return Some((
                "properties.time",
                "'properties.time' is invalid: must be specified as seconds since epoch".into(),
            ));
        };
        // Seconds or milliseconds.
        let secs = if t > 1e11 { t / 1000.0 } else { t };
        if secs < 31_536_000.0 || secs > (now.timestamp() + 3600) as f64 {
            return Some((
                "properties.time",
                "'properties.time' is invalid: before 1971-01-01 or more than 1 hour in the future"
                    .into(),
            ));
        }
        match p.get("distinct_id") {
            Some(Value::String(d)) if disallowed(d) => {
                return Some((
                    "properties.distinct_id",
                    format!("'properties.distinct_id' is invalid: {d} is not allowed"),
                ));
            }
            Some(Value::String(_)) => {}
            _ => {
                return Some((
                    "properties.distinct_id",
                    "'properties.distinct_id' is required".into(),
                ));
            }
        }
        match p.get("$insert_id").and_then(Value::as_str) {
            Some(id)
                if !id.is_empty()
                    && id.len() <= 36
                    && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !disallowed(id) => {}
            _ => {
                return Some((
                    "properties.$insert_id",
                    "'properties.$insert_id' is invalid: must be at most 36 alphanumeric characters or '-'".into(),
                ));
            }
        }
        if p.len() >= 255 {
            return Some(("properties", "event has too many properties".into()));
        }
        if serde_json::to_vec(e).map_or(0, |b| b.len()) > self.settings.max_event_bytes {
            return Some(("event", "event exceeds 1MB".into()));
        }
        None
    }

    fn import(&self, req: &Incoming, dedup: &mut Dedup, now: DateTime<Utc>) -> Reply {
        let s = &self.settings;
        if req.query("strict") != Some("1") {
            return error(400, "Bad Request", "this fake only speaks strict=1");
        }
        let authorised = match (basic_auth(req), req.query("project_id")) {
            (Some((u, p)), Some(project)) => {
                u == s.service_account_username
                    && p == s.service_account_secret
                    && project == s.project_id
            }
            (Some((u, p)), None) => !s.api_secret.is_empty() && u == s.api_secret && p.is_empty(),
            (None, _) => false,
        };
        if !authorised {
            return error(401, "Unauthorized", "Invalid credentials");
        }
        if req.body.len() > s.max_body_bytes {
            return error(
                413,
                "Request Entity Too Large",
                &format!("request exceeds max limit of {} bytes", s.max_body_bytes),
            );
        }
        let Some(Value::Array(events)) = req.json() else {
            return error(400, "Bad Request", "unable to parse body as a JSON array");
        };
        if events.is_empty() || events.len() > s.max_events {
            return error(
                400,
                "Bad Request",
                &format!("batch must hold 1 to {} events", s.max_events),
            );
        }
        let mut failed = Vec::new();
        let mut imported = 0;
        let mut accepted = Vec::new();
        let mut state = self.state.lock().expect("lock");
        for (index, e) in events.iter().enumerate() {
            let p = &e["properties"];
            if let Some((field, message)) = self.invalid(e, now) {
                failed.push(json!({"index": index, "$insert_id": p["$insert_id"],
                                   "field": field, "message": message}));
                continue;
            }
            imported += 1;
            let name = e["event"].as_str().unwrap_or_default();
            let key = format!(
                "{name}\u{1f}{}\u{1f}{}\u{1f}{}",
                p["distinct_id"].as_str().unwrap_or_default(),
                p["time"],
                p["$insert_id"].as_str().unwrap_or_default()
            );
            if !dedup.first(&key, now) {
                continue;
            }
            // Identity, as the project's merge API would do it.
            match (s.id_merge, name) {
                (IdMerge::Original, "$identify") => {
                    if let (Some(user), Some(anon)) =
                        (p["$identified_id"].as_str(), p["$anon_id"].as_str())
                        && is_uuid_v4(anon)
                    {
                        state.link(user, anon);
                    }
                }
                (IdMerge::Original, "$merge") => {
                    if let Some([a, b]) = p["$distinct_ids"].as_array().map(Vec::as_slice)
                        && let (Some(a), Some(b)) = (a.as_str(), b.as_str())
                    {
                        state.link(a, b);
                    }
                }
                (IdMerge::Simplified, _) => {
                    if let (Some(device), Some(user)) =
                        (p["$device_id"].as_str(), p["$user_id"].as_str())
                    {
                        state.link(user, &format!("$device:{device}"));
                    }
                }
                _ => {}
            }
            if matches!(name, "$identify" | "$merge" | "$create_alias") {
                // An identity operation, not an event anyone counts.
                continue;
            }
            accepted.push(Accepted {
                key: p["$insert_id"].as_str().map(str::to_string),
                name: name.to_string(),
                value: p[&s.revenue_property].as_f64(),
                currency: p[&s.currency_property].as_str().map(str::to_string),
                payload: e.clone(),
            });
        }
        let mut reply = if failed.is_empty() {
            Reply::json(
                200,
                json!({"code": 200, "num_records_imported": imported, "status": "OK"}),
            )
        } else {
            Reply::json(
                400,
                json!({"code": 400, "error": "some data points in the request failed validation",
                       "failed_records": failed, "num_records_imported": imported,
                       "status": "Bad Request"}),
            )
        };
        reply.accepted = accepted;
        reply
    }

    fn engage(&self, req: &Incoming) -> Reply {
        let s = &self.settings;
        let verbose = req.query("verbose") == Some("1");
        let answer = |error: Option<String>| {
            let ok = error.is_none();
            Reply::json(
                200,
                if verbose {
                    json!({"status": if ok { 1 } else { 0 }, "error": error})
                } else {
                    json!(if ok { 1 } else { 0 })
                },
            )
        };
        let Some(Value::Array(updates)) = req.json() else {
            return answer(Some("data, invalid JSON list of updates".into()));
        };
        if updates.is_empty() || updates.len() > s.max_updates {
            return answer(Some(format!(
                "batch must hold 1 to {} updates",
                s.max_updates
            )));
        }
        for u in &updates {
            let Some(o) = u.as_object() else {
                return answer(Some("update must be an object".into()));
            };
            if o.get("$token").and_then(Value::as_str) != Some(s.project_token.as_str()) {
                return answer(Some("$token, missing or invalid".into()));
            }
            if o.get("$distinct_id")
                .and_then(Value::as_str)
                .is_none_or(|d| d.is_empty() || disallowed(d))
            {
                return answer(Some("$distinct_id, missing or invalid".into()));
            }
            let ops = o
                .keys()
                .filter(|k| OPERATIONS.contains(&k.as_str()))
                .count();
            if ops != 1 {
                return answer(Some("each update must hold exactly one operation".into()));
            }
            if serde_json::to_vec(u).map_or(0, |b| b.len()) > s.max_event_bytes {
                return answer(Some("update exceeds 1MB".into()));
            }
        }
        let mut state = self.state.lock().expect("lock");
        let mut accepted = Vec::new();
        for u in &updates {
            if u.get("$set").is_some() {
                accepted.push(Accepted {
                    key: None,
                    name: "$set".into(),
                    value: None,
                    currency: None,
                    payload: u.clone(),
                });
            }
            let id = u["$distinct_id"].as_str().unwrap_or_default().to_string();
            let profile = state.profiles.entry(id).or_default();
            if let Some(set) = u["$set"].as_object() {
                for (k, v) in set {
                    profile.insert(k.clone(), v.clone());
                }
            }
            if let Some(once) = u["$set_once"].as_object() {
                for (k, v) in once {
                    profile.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            if let Some(append) = u["$append"].as_object() {
                for (k, v) in append {
                    match profile
                        .entry(k.clone())
                        .or_insert_with(|| Value::Array(Vec::new()))
                    {
                        Value::Array(list) => list.push(v.clone()),
                        other => *other = Value::Array(vec![v.clone()]),
                    }
                }
            }
        }
        let mut reply = answer(None);
        reply.accepted = accepted;
        reply
    }
}

impl Vendor for Mixpanel {
    /// Query-time dedup has no window; a year stands for "always".
    fn dedup_window(&self) -> Duration {
        Duration::from_secs(365 * 24 * 3600)
    }

    fn handle(&self, req: &Incoming, dedup: &mut Dedup, now: DateTime<Utc>) -> Reply {
        if req.method != "POST" {
            return error(405, "Method Not Allowed", "POST only");
        }
        match req.path.trim_end_matches('/') {
            "/import" => self.import(req, dedup, now),
            "/engage" => self.engage(req),
            _ => error(404, "Not Found", "no such endpoint"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(path: &str, query: &[(&str, &str)], auth: Option<&str>, body: Value) -> Incoming {
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        if let Some(a) = auth {
            headers.push(("authorization".into(), format!("Basic {a}")));
        }
        Incoming {
            method: "POST".into(),
            path: path.into(),
            query: query
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            headers,
            body: serde_json::to_vec(&body).unwrap(),
        }
    }

    // base64("demo.sa:demo-sa-secret")
    const SA: &str = "ZGVtby5zYTpkZW1vLXNhLXNlY3JldA==";

    fn event(name: &str, insert_id: &str, extra: Value) -> Value {
        let mut p = json!({"time": Utc::now().timestamp_millis() - 1000,
                           "distinct_id": "u1", "$insert_id": insert_id});
        if let (Some(p), Value::Object(e)) = (p.as_object_mut(), extra) {
            p.extend(e);
        }
        json!({"event": name, "properties": p})
    }

    #[test]
    fn base64_decodes() {
        assert_eq!(decode_base64(SA).unwrap(), b"demo.sa:demo-sa-secret");
        assert_eq!(decode_base64("YTo=").unwrap(), b"a:");
    }

    #[test]
    fn strict_import_takes_the_valid_and_lists_the_failed() {
        let mp = Mixpanel::new(Settings::default());
        let mut dedup = Dedup::new(mp.dedup_window());
        let q = [("strict", "1"), ("project_id", "3141592")];
        let body = json!([
            event("A", "id-1", json!({})),
            event("B", "bad_id!", json!({})),
            event("C", "id-3", json!({"distinct_id": "undefined"})),
            event("D", "id-4", json!({}))
        ]);
        let r = mp.handle(
            &incoming("/import", &q, Some(SA), body.clone()),
            &mut dedup,
            Utc::now(),
        );
        assert_eq!(r.status, 400);
        assert_eq!(r.body["num_records_imported"], 2);
        let failed: Vec<u64> = r.body["failed_records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["index"].as_u64().unwrap())
            .collect();
        assert_eq!(failed, [1, 2]);
        assert_eq!(r.accepted.len(), 2);
        // The same again: counted, not accepted twice.
        let r = mp.handle(
            &incoming("/import", &q, Some(SA), body),
            &mut dedup,
            Utc::now(),
        );
        assert_eq!(r.body["num_records_imported"], 2);
        assert!(r.accepted.is_empty());
        // Wrong project, no auth.
        let q2 = [("strict", "1"), ("project_id", "1")];
        let one = json!([event("A", "id-9", json!({}))]);
        assert_eq!(
            mp.handle(
                &incoming("/import", &q2, Some(SA), one.clone()),
                &mut dedup,
                Utc::now()
            )
            .status,
            401
        );
        assert_eq!(
            mp.handle(&incoming("/import", &q, None, one), &mut dedup, Utc::now())
                .status,
            401
        );
    }

    #[test]
    fn simplified_merge_links_device_to_user_and_engage_keeps_profiles() {
        let mp = Mixpanel::new(Settings::default());
        let state = mp.state();
        let mut dedup = Dedup::new(mp.dedup_window());
        let q = [("strict", "1"), ("project_id", "3141592")];
        let body = json!([event(
            "Signed Up",
            "id-1",
            json!({"distinct_id": "u1", "$device_id": "d1", "$user_id": "u1"})
        )]);
        assert_eq!(
            mp.handle(
                &incoming("/import", &q, Some(SA), body),
                &mut dedup,
                Utc::now()
            )
            .status,
            200
        );
        assert_eq!(state.lock().unwrap().canonical_of("$device:d1"), "u1");
        let ups = json!([
            {"$token": "demo-token", "$distinct_id": "u1", "$set": {"$name": "A"}},
            {"$token": "demo-token", "$distinct_id": "u1", "$append": {"$transactions": {"$amount": 5}}}
        ]);
        let r = mp.handle(
            &incoming("/engage", &[("verbose", "1")], None, ups),
            &mut dedup,
            Utc::now(),
        );
        assert_eq!(r.body, json!({"status": 1, "error": null}));
        let st = state.lock().unwrap();
        assert_eq!(st.profiles["u1"]["$name"], "A");
        assert_eq!(st.profiles["u1"]["$transactions"], json!([{"$amount": 5}]));
        drop(st);
        let bad = json!([{"$token": "nope", "$distinct_id": "u1", "$set": {}}]);
        let r = mp.handle(
            &incoming("/engage", &[("verbose", "1")], None, bad),
            &mut dedup,
            Utc::now(),
        );
        assert_eq!(r.body["status"], 0);
    }
}
