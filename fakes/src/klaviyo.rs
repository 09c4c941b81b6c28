//! Klaviyo's server-side API: `POST /api/events` (Create Event) and
//! `POST /api/profile-import` (Create or Update Profile), from
//! klaviyo/openapi `openapi/stable/apis/create_event.json` and
//! `create_or_update_profile.json` and developers.klaviyo.com's
//! rate-limit and error page.
//!
//! Both take `Authorization: Klaviyo-API-Key <private key>` (else 401), a
//! `revision: YYYY-MM-DD[.suffix]` header (else 400) and a JSON:API body
//! (`application/vnd.api+json`). Events: `data.type = "event"`,
//! `attributes.properties` (object), `metric.data` (`type = "metric"`,
//! `attributes.name` under 128 characters) and `profile.data` (`type =
//! "profile"`, at least one of `id`, `email`, `phone_number`, `external_id`)
//! are required; `phone_number` must be E.164, `time` RFC 3339, `value` a
//! number, `value_currency` three letters; the body ≤ 5 MB (else 413).
//! Answer 202 without a body. Profile imports: `data.type = "profile"`, an
//! identifier, ≤ 100 KB; 201 when the profile is new, 200 when updated, with
//! the profile in the body. Errors are `{"errors": [{id, status, code,
//! title, detail, source: {pointer}}]}`. Klaviyo's error `detail` texts are
//! not documented one by one; the fake's are in that shape and quote the
//! refused value (Klaviyo's may, and nothing says they do not), so tests
//! see that switchyard never repeats it.
//!
//! Dedup: an event whose `unique_id` was taken before for the same profile
//! and metric is answered 202 and not recorded again ("only the first
//! processed event will be recorded"). [`Profiles`] keeps the imported
//! profiles, merged by their first identifier; an import is recorded as
//! accepted (name "profile-import", key the profile's identifier) unless it
//! changed nothing, so a resent identify is recorded once too.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use crate::{Accepted, Dedup, Incoming, Reply, Vendor};

/// The profiles imported through `/api/profile-import`, keyed by external_id
/// (else email, else phone), shared between the fake and the test.
#[derive(Debug, Clone, Default)]
pub struct Profiles(Arc<Mutex<BTreeMap<String, Map<String, Value>>>>);

impl Profiles {
    pub fn all(&self) -> BTreeMap<String, Map<String, Value>> {
        self.0.lock().expect("lock").clone()
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// The private API key the fake takes.
    pub api_key: String,
    /// `/api/events` payload limit (5 MB).
    pub max_event_bytes: usize,
    /// `/api/profile-import` payload limit (100 KB).
    pub max_profile_bytes: usize,
    /// How long a unique_id is remembered (Klaviyo documents no window).
    pub dedup_window: Duration,
    pub profiles: Profiles,
}

impl Default for Settings {
    /// The demo key of `examples/demo.toml` and Klaviyo's limits.
    fn default() -> Self {
        Settings {
            api_key: "pk_demo_private_key".into(),
            max_event_bytes: 5 * 1024 * 1024,
            max_profile_bytes: 100 * 1024,
            dedup_window: Duration::from_secs(365 * 24 * 3600),
            profiles: Profiles::default(),
        }
    }
}

/// A JSON:API error answer with one error.
pub fn error(status: u16, code: &str, title: &str, detail: &str, pointer: &str) -> Reply {
    Reply::json(
        status,
        json!({"errors": [{
            "id": format!("fake-{status}-{code}"),
            "status": status,
            "code": code,
            "title": title,
            "detail": detail,
            "source": {"pointer": pointer}
        }]}),
    )
}

fn invalid(detail: &str, pointer: &str) -> Reply {
    error(400, "invalid", "Invalid input.", detail, pointer)
}

fn is_e164(p: &str) -> bool {
    p.strip_prefix('+').is_some_and(|d| {
        (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()) && !d.starts_with('0')
    })
}

/// One `@`, something before it, a dotted domain after it.
fn is_email(e: &str) -> bool {
    e.split_once('@').is_some_and(|(local, domain)| {
        !local.is_empty()
            && !domain.contains('@')
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
    })
}

fn is_revision(r: &str) -> bool {
    let date = r.split_once('.').map_or(r, |(d, _)| d);
    date.len() == 10 && chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").is_ok()
}

/// Checks a profile's identifiers; `Err` is the answer, `Ok` the key the
/// profile is known by.
fn profile_key(attributes: &Value, id: Option<&Value>, at: &str) -> Result<String, Reply> {
    let text = |k: &str| attributes.get(k).and_then(Value::as_str);
    if let Some(e) = text("email")
        && !is_email(e)
    {
        return Err(invalid(
            &format!("'{e}' is not a valid email address."),
            &format!("{at}/attributes/email"),
        ));
    }
    if let Some(p) = text("phone_number")
        && !is_e164(p)
    {
        return Err(invalid(
            &format!(
                "Invalid phone number format (Example of a valid format: +12345678901): '{p}'"
            ),
            &format!("{at}/attributes/phone_number"),
        ));
    }
    text("external_id")
        .map(|x| format!("external_id:{x}"))
        .or_else(|| text("email").map(|x| format!("email:{x}")))
        .or_else(|| text("phone_number").map(|x| format!("phone:{x}")))
        .or_else(|| id.and_then(Value::as_str).map(|x| format!("id:{x}")))
        .ok_or_else(|| {
            invalid(
                "One of the following profile identifiers is required: id, email, phone_number, external_id.",
                &format!("{at}/attributes"),
            )
        })
}

impl Settings {
    fn event(&self, body: &Value, dedup: &mut Dedup, now: DateTime<Utc>) -> Reply {
        let data = &body["data"];
        if data["type"] != "event" {
            return invalid("'type' must be 'event'.", "/data/type");
        }
        let a = &data["attributes"];
        if !a["properties"].is_object() {
            return error(
                400,
                "required",
                "Missing required field.",
                "The field 'properties' is required and must be an object.",
                "/data/attributes/properties",
            );
        }
        let metric = &a["metric"]["data"];
        let name = match metric["attributes"]["name"].as_str() {
            Some(n) if metric["type"] == "metric" && !n.is_empty() => n,
            _ => {
                return error(
                    400,
                    "required",
                    "Missing required field.",
                    "The field 'metric' is required.",
                    "/data/attributes/metric",
                );
            }
        };
        if name.chars().count() >= 128 {
            return invalid(
                "Metric name must be less than 128 characters.",
                "/data/attributes/metric/data/attributes/name",
            );
        }
        let profile = &a["profile"]["data"];
        if profile["type"] != "profile" {
            return error(
                400,
                "required",
                "Missing required field.",
                "The field 'profile' is required.",
                "/data/attributes/profile",
            );
        }
        let who = match profile_key(
            &profile["attributes"],
            profile.get("id"),
            "/data/attributes/profile/data",
        ) {
            Ok(k) => k,
            Err(reply) => return reply,
        };
        if let Some(t) = a.get("time").filter(|t| !t.is_null())
            && t.as_str()
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                .is_none()
        {
            return invalid(
                "'time' must be an ISO 8601 date-time.",
                "/data/attributes/time",
            );
        }
        if a.get("value")
            .is_some_and(|v| !v.is_null() && !v.is_number())
        {
            return invalid("'value' must be a number.", "/data/attributes/value");
        }
        if let Some(c) = a.get("value_currency").filter(|c| !c.is_null())
            && !c
                .as_str()
                .is_some_and(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()))
        {
            return invalid(
                "'value_currency' must be an ISO 4217 currency code.",
                "/data/attributes/value_currency",
            );
        }
        let unique_id = a["unique_id"].as_str().map(str::to_string);
        let reply = Reply::json(202, Value::Null);
        if let Some(u) = &unique_id
            && !dedup.first(&format!("{who}\u{0}{name}\u{0}{u}"), now)
        {
            return reply;
        }
        Reply {
            accepted: vec![Accepted {
                key: unique_id,
                name: name.to_string(),
                value: a["value"].as_f64(),
                currency: a["value_currency"].as_str().map(str::to_string),
                payload: a.clone(),
            }],
            ..reply
        }
    }

    fn profile(&self, body: &Value) -> Reply {
        let data = &body["data"];
        if data["type"] != "profile" {
            return invalid("'type' must be 'profile'.", "/data/type");
        }
        let Some(attributes) = data["attributes"].as_object() else {
            return error(
                400,
                "required",
                "Missing required field.",
                "The field 'attributes' is required.",
                "/data/attributes",
            );
        };
        let who = match profile_key(&data["attributes"], data.get("id"), "/data") {
            Ok(k) => k,
            Err(reply) => return reply,
        };
        let mut profiles = self.profiles.0.lock().expect("lock");
        let created = !profiles.contains_key(&who);
        let stored = profiles.entry(who.clone()).or_default();
        let before = stored.clone();
        for (k, v) in attributes {
            if k == "properties"
                && let (Some(new), Some(Value::Object(old))) =
                    (v.as_object(), stored.get_mut("properties"))
            {
                old.extend(new.clone());
                continue;
            }
            stored.insert(k.clone(), v.clone());
        }
        // An import that changes nothing (a resend) is not a new record.
        let accepted = if created || *stored != before {
            vec![Accepted {
                key: Some(who.clone()),
                name: "profile-import".into(),
                value: None,
                currency: None,
                payload: data["attributes"].clone(),
            }]
        } else {
            Vec::new()
        };
        let answer = json!({"data": {"type": "profile", "id": who, "attributes": stored.clone()}});
        Reply {
            accepted,
            ..Reply::json(if created { 201 } else { 200 }, answer)
        }
    }
}

impl Vendor for Settings {
    fn dedup_window(&self) -> Duration {
        self.dedup_window
    }

    fn handle(&self, req: &Incoming, dedup: &mut Dedup, now: DateTime<Utc>) -> Reply {
        let path = req.path.trim_end_matches('/');
        let limit = match path {
            "/api/events" => self.max_event_bytes,
            "/api/profile-import" => self.max_profile_bytes,
            _ => return error(404, "not_found", "Not found.", "Not found.", "/"),
        };
        if req.method != "POST" {
            return error(
                405,
                "method_not_allowed",
                "Method not allowed.",
                &format!("Method \"{}\" not allowed.", req.method),
                "/",
            );
        }
        match req
            .header("authorization")
            .and_then(|h| h.strip_prefix("Klaviyo-API-Key "))
        {
            None => {
                return error(
                    401,
                    "not_authenticated",
                    "Authentication credentials were not provided.",
                    "Missing or invalid private key.",
                    "/data/",
                );
            }
            Some(k) if k != self.api_key => {
                return error(
                    401,
                    "authentication_failed",
                    "Incorrect authentication credentials.",
                    "Incorrect authentication credentials.",
                    "/data/",
                );
            }
            Some(_) => {}
        }
        if !req.header("revision").is_some_and(is_revision) {
            return error(
                400,
                "invalid_revision",
                "Invalid revision.",
                "A valid 'revision' header (YYYY-MM-DD) is required.",
                "/",
            );
        }
        if req.body.len() > limit {
            return error(
                413,
                "payload_too_large",
                "Request entity too large.",
                &format!("The payload must not exceed {limit} bytes."),
                "/data/",
            );
        }
        let Some(body) = req.json() else {
            return error(
                400,
                "parse_error",
                "Malformed request.",
                "The request body is not valid JSON.",
                "/",
            );
        };
        if path == "/api/events" {
            self.event(&body, dedup, now)
        } else {
            self.profile(&body)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &str, key: &str, body: Value) -> Incoming {
        Incoming {
            method: "POST".into(),
            path: path.into(),
            query: vec![],
            headers: vec![
                ("authorization".into(), format!("Klaviyo-API-Key {key}")),
                ("revision".into(), "2026-10-15".into()),
            ],
            body: serde_json::to_vec(&body).unwrap(),
        }
    }

    fn event(unique_id: &str, profile: Value) -> Value {
        json!({"data": {"type": "event", "attributes": {
            "properties": {}, "unique_id": unique_id, "time": "2026-11-26T14:03:11Z",
            "value": 9.5, "value_currency": "EUR",
            "metric": {"data": {"type": "metric", "attributes": {"name": "Placed Order"}}},
            "profile": {"data": {"type": "profile", "attributes": profile}}
        }}})
    }

    #[test]
    fn events_are_checked_recorded_once_per_profile_and_metric() {
        let s = Settings::default();
        let mut d = Dedup::new(s.dedup_window);
        let now = Utc::now();
        let k = s.api_key.clone();
        let r = s.handle(
            &req("/api/events", &k, event("e1", json!({"external_id": "u"}))),
            &mut d,
            now,
        );
        assert_eq!((r.status, r.accepted.len()), (202, 1));
        let r = s.handle(
            &req("/api/events", &k, event("e1", json!({"external_id": "u"}))),
            &mut d,
            now,
        );
        assert_eq!((r.status, r.accepted.len()), (202, 0), "a resend");
        // Another profile: a different event.
        let r = s.handle(
            &req("/api/events", &k, event("e1", json!({"external_id": "v"}))),
            &mut d,
            now,
        );
        assert_eq!(r.accepted.len(), 1);
        let r = s.handle(&req("/api/events", &k, event("e2", json!({}))), &mut d, now);
        assert_eq!(r.status, 400);
        let r = s.handle(
            &req(
                "/api/events",
                &k,
                event("e3", json!({"phone_number": "650 253"})),
            ),
            &mut d,
            now,
        );
        assert_eq!(
            (r.status, r.body["errors"][0]["code"].clone()),
            (400, json!("invalid"))
        );
        let r = s.handle(
            &req(
                "/api/events",
                "pk_wrong",
                event("e4", json!({"external_id": "u"})),
            ),
            &mut d,
            now,
        );
        assert_eq!(r.status, 401);
        let mut no_revision = req("/api/events", &k, event("e5", json!({"external_id": "u"})));
        no_revision.headers.retain(|(h, _)| h != "revision");
        assert_eq!(s.handle(&no_revision, &mut d, now).status, 400);
        let small = Settings {
            max_event_bytes: 10,
            ..Settings::default()
        };
        let r = small.handle(
            &req("/api/events", &k, event("e6", json!({"external_id": "u"}))),
            &mut d,
            now,
        );
        assert_eq!(r.status, 413);
    }

    #[test]
    fn profile_imports_create_then_update() {
        let s = Settings::default();
        let mut d = Dedup::new(s.dedup_window);
        let k = s.api_key.clone();
        let p = |props: Value| json!({"data": {"type": "profile", "attributes": {"external_id": "u", "properties": props}}});
        let now = Utc::now();
        let r = s.handle(
            &req("/api/profile-import", &k, p(json!({"a": 1}))),
            &mut d,
            now,
        );
        assert_eq!(r.status, 201);
        let r = s.handle(
            &req("/api/profile-import", &k, p(json!({"b": 2}))),
            &mut d,
            now,
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            s.profiles.all()["external_id:u"]["properties"],
            json!({"a": 1, "b": 2})
        );
    }
}
