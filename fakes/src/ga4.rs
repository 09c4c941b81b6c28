//! GA4 Measurement Protocol, answering the way its validation server does.
//!
//! `POST /mp/collect` and `/debug/mp/collect` with `measurement_id` and
//! `api_secret` in the query. Both answer HTTP 200 with
//! `{"validationMessages":[{fieldPath, description, validationCode}]}`
//! (empty when all is well), which is what the validation server returns
//! and what production would silently act on. Events of a request with a
//! request-level problem are all dropped; otherwise each event is judged on
//! its own. `/mp/collect` records the events it takes; `/debug/mp/collect`
//! records nothing, as Google's does not. Set `production_answers` to make
//! `/mp/collect` answer 204 with no body, as production does.
//!
//! GA4 has no dedup: a resent event is recorded again (`key: None`).
//!
//! Stricter than Google in one place, on purpose: the validation server does
//! not check `api_secret` (production silently drops events with a wrong
//! one); with `check_credentials` (default) a wrong measurement id or secret
//! is a validation message, so a test sees it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use crate::{Accepted, Dedup, Incoming, Reply, Vendor, is_sha256_hex};

#[derive(Debug, Clone)]
pub struct Settings {
    pub measurement_id: String,
    pub api_secret: String,
    pub check_credentials: bool,
    /// `/mp/collect` answers 204 without a body (production) instead of
    /// the validation server's messages.
    pub production_answers: bool,
    pub max_events: usize,
    pub max_params: usize,
    pub max_name_len: usize,
    pub max_value_len: usize,
    /// Params allowed longer values than `max_value_len`.
    pub long_params: Vec<(String, usize)>,
    pub max_items: usize,
    /// Custom (non-standard) params per item.
    pub max_item_custom_params: usize,
    pub max_user_properties: usize,
    pub max_user_id_len: usize,
    /// Values per `user_data` hash list.
    pub max_hashes: usize,
    pub max_body_bytes: usize,
    /// How far back `timestamp_micros` may go.
    pub max_event_age: Duration,
    /// How far ahead of the fake's clock a timestamp may be.
    pub max_future: Duration,
    /// Google's older rule: `user_data` only together with `user_id`.
    pub user_data_requires_user_id: bool,
    pub reserved_event_names: Vec<String>,
    pub reserved_prefixes: Vec<String>,
}

impl Default for Settings {
    /// The demo credentials of `examples/demo.toml` and GA4's limits.
    fn default() -> Self {
        Settings {
            measurement_id: "G-DEMO000001".into(),
            api_secret: "demo-secret".into(),
            check_credentials: true,
            production_answers: false,
            max_events: 25,
            max_params: 25,
            max_name_len: 40,
            max_value_len: 100,
            long_params: vec![
                ("page_location".into(), 1000),
                ("page_referrer".into(), 420),
                ("page_title".into(), 300),
            ],
            max_items: 200,
            max_item_custom_params: 10,
            max_user_properties: 25,
            max_user_id_len: 256,
            max_hashes: 3,
            max_body_bytes: 130_000,
            max_event_age: Duration::from_secs(72 * 3600),
            max_future: Duration::from_secs(60),
            user_data_requires_user_id: false,
            reserved_event_names: [
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
            ]
            .map(String::from)
            .to_vec(),
            reserved_prefixes: ["_", "firebase_", "google_", "ga_"]
                .map(String::from)
                .to_vec(),
        }
    }
}

const TOP_FIELDS: &[&str] = &[
    "client_id",
    "app_instance_id",
    "user_id",
    "timestamp_micros",
    "user_properties",
    "consent",
    "user_data",
    "events",
    "non_personalized_ads",
    "validation_behavior",
    "user_location",
    "device",
    "ip_override",
];

const ITEM_PARAMS: &[&str] = &[
    "item_id",
    "item_name",
    "affiliation",
    "coupon",
    "discount",
    "index",
    "item_brand",
    "item_category",
    "item_category2",
    "item_category3",
    "item_category4",
    "item_category5",
    "item_list_id",
    "item_list_name",
    "item_variant",
    "location_id",
    "price",
    "quantity",
];

struct Msg {
    field_path: String,
    description: String,
    code: &'static str,
}

fn msg(field_path: impl Into<String>, code: &'static str, description: impl Into<String>) -> Msg {
    Msg {
        field_path: field_path.into(),
        description: description.into(),
        code,
    }
}

impl Settings {
    fn name_problem(&self, name: &str, event: bool) -> Option<(&'static str, String)> {
        if name.is_empty() || name.chars().count() > self.max_name_len {
            return Some((
                "VALUE_OUT_OF_BOUNDS",
                format!("Name [{name}] must be 1-{} characters.", self.max_name_len),
            ));
        }
        if self
            .reserved_prefixes
            .iter()
            .any(|p| name.starts_with(p.as_str()))
        {
            return Some((
                "NAME_RESERVED",
                format!("Name [{name}] uses a reserved prefix."),
            ));
        }
        let b = name.as_bytes();
        if !b[0].is_ascii_alphabetic() {
            return Some((
                "NAME_INVALID",
                format!("Name [{name}] is invalid. Names must start with an alphabetic character."),
            ));
        }
        if !b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_') {
            return Some((
                "NAME_INVALID",
                format!(
                    "Name [{name}] is invalid. Only alphanumeric characters and underscores are allowed."
                ),
            ));
        }
        if event && self.reserved_event_names.iter().any(|r| r == name) {
            return Some(("NAME_RESERVED", format!("Event name [{name}] is reserved.")));
        }
        None
    }

    fn value_limit(&self, param: &str) -> usize {
        self.long_params
            .iter()
            .find(|(n, _)| n == param)
            .map_or(self.max_value_len, |(_, l)| *l)
    }

    fn check_timestamp(&self, v: &Value, path: &str, now: DateTime<Utc>) -> Option<Msg> {
        let Some(t) = v.as_i64().or_else(|| v.as_str()?.parse().ok()) else {
            return Some(msg(
                path,
                "VALUE_INVALID",
                format!("Value for [{path}] must be an integer."),
            ));
        };
        let now_us = now.timestamp_micros();
        let oldest = now_us - i64::try_from(self.max_event_age.as_micros()).unwrap_or(i64::MAX);
        let newest = now_us + i64::try_from(self.max_future.as_micros()).unwrap_or(0);
        (t < oldest || t > newest).then(|| {
            msg(
                path,
                "VALUE_OUT_OF_BOUNDS",
                format!(
                    "Timestamp [{t}] is outside the allowed window (up to {} h in the past, not in the future).",
                    self.max_event_age.as_secs() / 3600
                ),
            )
        })
    }

    /// Request-level problems: any of them drops every event.
    fn check_request(
        &self,
        req: &Incoming,
        body: &Map<String, Value>,
        now: DateTime<Utc>,
    ) -> Vec<Msg> {
        let mut out = Vec::new();
        if self.check_credentials {
            if req.query("measurement_id") != Some(self.measurement_id.as_str()) {
                out.push(msg(
                    "measurement_id",
                    "VALUE_INVALID",
                    "Unknown measurement_id.",
                ));
            }
            if req.query("api_secret") != Some(self.api_secret.as_str()) {
                out.push(msg(
                    "api_secret",
                    "VALUE_INVALID",
                    "The api_secret does not belong to this stream.",
                ));
            }
        }
        for k in body.keys() {
            if !TOP_FIELDS.contains(&k.as_str()) {
                out.push(msg(
                    k.as_str(),
                    "NAME_INVALID",
                    format!("Unknown field [{k}]."),
                ));
            }
        }
        match body.get("client_id") {
            Some(Value::String(s)) if !s.trim().is_empty() => {}
            Some(_) => out.push(msg(
                "client_id",
                "VALUE_INVALID",
                "client_id must be a non-empty string.",
            )),
            None => out.push(msg(
                "client_id",
                "VALUE_REQUIRED",
                "Measurement requires a client_id.",
            )),
        }
        let user_id = body.get("user_id");
        if let Some(u) = user_id {
            match u.as_str() {
                Some(s) if s.is_empty() || s.chars().count() > self.max_user_id_len => {
                    out.push(msg(
                        "user_id",
                        "VALUE_OUT_OF_BOUNDS",
                        format!("user_id must be 1-{} characters.", self.max_user_id_len),
                    ))
                }
                Some(_) => {}
                None => out.push(msg("user_id", "VALUE_INVALID", "user_id must be a string.")),
            }
        }
        if let Some(t) = body.get("timestamp_micros")
            && let Some(m) = self.check_timestamp(t, "timestamp_micros", now)
        {
            out.push(m);
        }
        if let Some(v) = body.get("validation_behavior")
            && !matches!(v.as_str(), Some("RELAXED" | "ENFORCE_RECOMMENDATIONS"))
        {
            out.push(msg(
                "validation_behavior",
                "VALUE_INVALID",
                format!("Unknown validation_behavior {v}."),
            ));
        }
        if let Some(c) = body.get("consent") {
            match c.as_object() {
                None => out.push(msg(
                    "consent",
                    "VALUE_INVALID",
                    "consent must be an object.",
                )),
                Some(c) => {
                    for (k, v) in c {
                        if !matches!(k.as_str(), "ad_user_data" | "ad_personalization") {
                            out.push(msg(
                                format!("consent.{k}"),
                                "NAME_INVALID",
                                format!("Unknown consent field [{k}]."),
                            ));
                        } else if !matches!(v.as_str(), Some("GRANTED" | "DENIED")) {
                            out.push(msg(
                                format!("consent.{k}"),
                                "VALUE_INVALID",
                                format!("consent.{k} must be GRANTED or DENIED."),
                            ));
                        }
                    }
                }
            }
        }
        if let Some(ud) = body.get("user_data") {
            if self.user_data_requires_user_id && user_id.is_none() {
                out.push(msg(
                    "user_data",
                    "VALUE_REQUIRED",
                    "user_id is required when user_data is set.",
                ));
            }
            match ud.as_object() {
                None => out.push(msg(
                    "user_data",
                    "VALUE_INVALID",
                    "user_data must be an object.",
                )),
                Some(ud) => {
                    for (k, v) in ud {
                        let path = format!("user_data.{k}");
                        if !matches!(
                            k.as_str(),
                            "sha256_email_address" | "sha256_phone_number" | "address"
                        ) {
                            out.push(msg(
                                path,
                                "NAME_INVALID",
                                format!("Unknown user_data field [{k}]."),
                            ));
                            continue;
                        }
                        if k == "address" {
                            continue;
                        }
                        let values: Vec<&Value> = match v {
                            Value::Array(a) => a.iter().collect(),
                            one => vec![one],
                        };
                        if values.len() > self.max_hashes {
                            out.push(msg(
                                &path,
                                "EXCEEDED_MAX_ENTITIES",
                                format!("At most {} values.", self.max_hashes),
                            ));
                        }
                        if !values.iter().all(|h| h.as_str().is_some_and(is_sha256_hex)) {
                            out.push(msg(
                                &path,
                                "VALUE_INVALID",
                                "Value must be a SHA-256 digest in lowercase hex of the normalised value.",
                            ));
                        }
                    }
                }
            }
        }
        if let Some(up) = body.get("user_properties").and_then(Value::as_object)
            && up.len() > self.max_user_properties
        {
            out.push(msg(
                "user_properties",
                "EXCEEDED_MAX_ENTITIES",
                format!("At most {} user properties.", self.max_user_properties),
            ));
        }
        match body.get("events").and_then(Value::as_array) {
            None => out.push(msg(
                "events",
                "VALUE_REQUIRED",
                "events is required and must be a list.",
            )),
            Some(e) if e.is_empty() => out.push(msg(
                "events",
                "VALUE_REQUIRED",
                "At least one event is required.",
            )),
            Some(e) if e.len() > self.max_events => out.push(msg(
                "events",
                "EXCEEDED_MAX_ENTITIES",
                format!(
                    "A request can have at most {} events; it had {}.",
                    self.max_events,
                    e.len()
                ),
            )),
            Some(_) => {}
        }
        out
    }

    /// One event's problems.
    fn check_event(&self, i: usize, e: &Value, now: DateTime<Utc>) -> Vec<Msg> {
        let mut out = Vec::new();
        let Some(e) = e.as_object() else {
            return vec![msg(
                "events",
                "VALUE_INVALID",
                format!("Event at index: [{i}] is not an object."),
            )];
        };
        for k in e.keys() {
            if !matches!(k.as_str(), "name" | "params" | "timestamp_micros") {
                out.push(msg(
                    format!("events[{i}].{k}"),
                    "NAME_INVALID",
                    format!("Unknown event field [{k}]."),
                ));
            }
        }
        match e.get("name").and_then(Value::as_str) {
            None => out.push(msg(
                "events",
                "VALUE_REQUIRED",
                format!("Event at index: [{i}] has no name."),
            )),
            Some(name) => {
                if let Some((code, why)) = self.name_problem(name, true) {
                    out.push(msg(
                        "events",
                        code,
                        format!("Event at index: [{i}] has invalid name [{name}]. {why}"),
                    ));
                }
            }
        }
        if let Some(t) = e.get("timestamp_micros")
            && let Some(m) = self.check_timestamp(t, &format!("events[{i}].timestamp_micros"), now)
        {
            out.push(m);
        }
        let Some(params) = e.get("params") else {
            return out;
        };
        let Some(params) = params.as_object() else {
            out.push(msg(
                format!("events[{i}].params"),
                "VALUE_INVALID",
                "params must be an object.",
            ));
            return out;
        };
        if params.len() > self.max_params {
            out.push(msg(
                format!("events[{i}].params"),
                "EXCEEDED_MAX_ENTITIES",
                format!(
                    "Event at index: [{i}] has {} params; at most {} are allowed.",
                    params.len(),
                    self.max_params
                ),
            ));
        }
        for (k, v) in params {
            let path = format!("events[{i}].params.{k}");
            if let Some((code, why)) = self.name_problem(k, false) {
                out.push(msg(&path, code, why));
                continue;
            }
            if k == "items" {
                out.extend(self.check_items(&path, v));
                continue;
            }
            match v {
                Value::String(s) if s.chars().count() > self.value_limit(k) => out.push(msg(
                    &path,
                    "VALUE_OUT_OF_BOUNDS",
                    format!(
                        "Value of [{k}] is longer than {} characters.",
                        self.value_limit(k)
                    ),
                )),
                Value::String(_) | Value::Number(_) | Value::Bool(_) => {}
                _ => out.push(msg(
                    &path,
                    "VALUE_INVALID",
                    format!("Param [{k}] has unsupported value type."),
                )),
            }
        }
        if params.contains_key("value")
            && params
                .get("currency")
                .and_then(Value::as_str)
                .is_none_or(|c| c.len() != 3)
        {
            out.push(msg(
                format!("events[{i}].params.currency"),
                "VALUE_REQUIRED",
                "currency (ISO 4217) is required when value is set.",
            ));
        }
        out
    }

    fn check_items(&self, path: &str, v: &Value) -> Vec<Msg> {
        let Some(items) = v.as_array() else {
            return vec![msg(path, "VALUE_INVALID", "items must be a list.")];
        };
        let mut out = Vec::new();
        if items.len() > self.max_items {
            out.push(msg(
                path,
                "EXCEEDED_MAX_ENTITIES",
                format!("At most {} items.", self.max_items),
            ));
        }
        for (j, it) in items.iter().enumerate() {
            let here = format!("{path}[{j}]");
            let Some(it) = it.as_object() else {
                out.push(msg(&here, "VALUE_INVALID", "An item must be an object."));
                continue;
            };
            if !it.contains_key("item_id") && !it.contains_key("item_name") {
                out.push(msg(
                    &here,
                    "VALUE_REQUIRED",
                    "An item needs item_id or item_name.",
                ));
            }
            let custom = it
                .keys()
                .filter(|k| !ITEM_PARAMS.contains(&k.as_str()))
                .count();
            if custom > self.max_item_custom_params {
                out.push(msg(
                    &here,
                    "EXCEEDED_MAX_ENTITIES",
                    format!(
                        "At most {} custom item params.",
                        self.max_item_custom_params
                    ),
                ));
            }
            for (k, v) in it {
                if let Some((code, why)) = self.name_problem(k, false) {
                    out.push(msg(format!("{here}.{k}"), code, why));
                } else if v
                    .as_str()
                    .is_some_and(|s| s.chars().count() > self.max_value_len)
                {
                    out.push(msg(
                        format!("{here}.{k}"),
                        "VALUE_OUT_OF_BOUNDS",
                        format!("Value of [{k}] is too long."),
                    ));
                }
            }
        }
        out
    }
}

fn answer(messages: &[Msg], accepted: Vec<Accepted>) -> Reply {
    Reply {
        status: 200,
        headers: Vec::new(),
        body: json!({"validationMessages": messages.iter().map(|m| json!({
            "fieldPath": m.field_path,
            "description": m.description,
            "validationCode": m.code,
        })).collect::<Vec<_>>()}),
        accepted,
    }
}

impl Vendor for Settings {
    fn handle(&self, req: &Incoming, _dedup: &mut Dedup, now: DateTime<Utc>) -> Reply {
        let debug = match req.path.as_str() {
            "/mp/collect" => false,
            "/debug/mp/collect" => true,
            _ => return Reply::json(404, json!({"error": "not found"})),
        };
        if req.method != "POST" {
            return Reply::json(405, json!({"error": "only POST is supported"}));
        }
        let mut reply = self.validate(req, now, !debug);
        if self.production_answers && !debug {
            reply.status = 204;
            reply.body = Value::Null;
        }
        reply
    }
}

impl Settings {
    fn validate(&self, req: &Incoming, now: DateTime<Utc>, record: bool) -> Reply {
        if req.body.len() >= self.max_body_bytes {
            return answer(
                &[msg(
                    "",
                    "VALUE_OUT_OF_BOUNDS",
                    format!(
                        "The post body must be smaller than {} bytes.",
                        self.max_body_bytes
                    ),
                )],
                Vec::new(),
            );
        }
        let Some(body) = req.json() else {
            return answer(
                &[msg(
                    "",
                    "VALUE_INVALID",
                    "Unable to parse Measurement Protocol JSON payload.",
                )],
                Vec::new(),
            );
        };
        let Some(body) = body.as_object() else {
            return answer(
                &[msg(
                    "",
                    "VALUE_INVALID",
                    "The payload must be a JSON object.",
                )],
                Vec::new(),
            );
        };
        let mut messages = self.check_request(req, body, now);
        if !messages.is_empty() {
            return answer(&messages, Vec::new());
        }
        let events = body
            .get("events")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut accepted = Vec::new();
        for (i, e) in events.iter().enumerate() {
            let problems = self.check_event(i, e, now);
            if !problems.is_empty() {
                messages.extend(problems);
                continue;
            }
            if !record {
                continue;
            }
            let params = e.get("params").and_then(Value::as_object);
            accepted.push(Accepted {
                key: None,
                name: e.get("name").and_then(Value::as_str).unwrap_or_default().to_string(),
                value: params.and_then(|p| p.get("value")).and_then(Value::as_f64),
                currency: params
                    .and_then(|p| p.get("currency"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                payload: json!({
                    "client_id": body.get("client_id"),
                    "user_id": body.get("user_id"),
                    "user_data": body.get("user_data"),
                    "consent": body.get("consent"),
                    "timestamp_micros": e.get("timestamp_micros").or_else(|| body.get("timestamp_micros")),
                    "event": e,
                }),
            });
        }
        answer(&messages, accepted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b";

    fn now() -> DateTime<Utc> {
        "2026-02-01T00:00:00Z".parse().unwrap()
    }

    fn us(ago_hours: i64) -> i64 {
        (now() - chrono::Duration::hours(ago_hours)).timestamp_micros()
    }

    fn req(path: &str, secret: &str, body: Value) -> Incoming {
        Incoming {
            method: "POST".into(),
            path: path.into(),
            query: vec![
                ("measurement_id".into(), "G-DEMO000001".into()),
                ("api_secret".into(), secret.into()),
            ],
            headers: vec![],
            body: serde_json::to_vec(&body).unwrap(),
        }
    }

    fn event(name: &str) -> Value {
        json!({"name": name, "params": {"value": 10.0, "currency": "EUR", "transaction_id": "t1",
               "items": [{"item_id": "sku", "price": 5.0, "quantity": 2}]},
               "timestamp_micros": us(1)})
    }

    fn body(events: Vec<Value>) -> Value {
        json!({"client_id": "123.456", "user_id": "u1", "timestamp_micros": us(1),
               "user_data": {"sha256_email_address": [HASH]},
               "consent": {"ad_user_data": "GRANTED"}, "events": events})
    }

    fn run(s: &Settings, r: &Incoming) -> Reply {
        s.handle(r, &mut Dedup::new(Duration::from_secs(1)), now())
    }

    fn codes(r: &Reply) -> Vec<(String, String)> {
        r.body["validationMessages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["fieldPath"].as_str().unwrap().to_string(),
                    m["validationCode"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn valid_events_are_recorded_every_time() {
        let s = Settings::default();
        let r = run(
            &s,
            &req(
                "/mp/collect",
                "demo-secret",
                body(vec![event("purchase"), event("generate_lead")]),
            ),
        );
        assert_eq!(r.status, 200);
        assert!(codes(&r).is_empty(), "{}", r.body);
        assert_eq!(r.accepted.len(), 2);
        assert_eq!(r.accepted[0].key, None);
        assert_eq!(r.accepted[0].name, "purchase");
        assert_eq!(r.accepted[0].value, Some(10.0));
        assert_eq!(r.accepted[1].payload["client_id"], "123.456");
        // No dedup: the same again is recorded again.
        let again = run(
            &s,
            &req("/mp/collect", "demo-secret", body(vec![event("purchase")])),
        );
        assert_eq!(again.accepted.len(), 1);
        // The validation server records nothing.
        assert!(
            run(
                &s,
                &req(
                    "/debug/mp/collect",
                    "demo-secret",
                    body(vec![event("purchase")])
                )
            )
            .accepted
            .is_empty()
        );
    }

    #[test]
    fn request_problems_drop_everything() {
        let s = Settings::default();
        let r = run(
            &s,
            &req("/mp/collect", "wrong", body(vec![event("purchase")])),
        );
        assert_eq!(
            codes(&r),
            vec![("api_secret".into(), "VALUE_INVALID".into())]
        );
        assert!(r.accepted.is_empty());
        let r = run(
            &s,
            &req(
                "/mp/collect",
                "demo-secret",
                body((0..26).map(|_| event("purchase")).collect()),
            ),
        );
        assert_eq!(
            codes(&r),
            vec![("events".into(), "EXCEEDED_MAX_ENTITIES".into())]
        );
        let mut b = body(vec![event("purchase")]);
        b.as_object_mut().unwrap().remove("client_id");
        b["user_data"] = json!({"sha256_email_address": ["person@example.com"]});
        b["timestamp_micros"] = json!(us(73));
        let r = run(&s, &req("/mp/collect", "demo-secret", b));
        assert_eq!(
            codes(&r),
            vec![
                ("client_id".into(), "VALUE_REQUIRED".into()),
                ("timestamp_micros".into(), "VALUE_OUT_OF_BOUNDS".into()),
                (
                    "user_data.sha256_email_address".into(),
                    "VALUE_INVALID".into()
                ),
            ]
        );
    }

    #[test]
    fn event_problems_drop_only_that_event() {
        let s = Settings::default();
        let mut many = event("purchase");
        for i in 0..23 {
            many["params"][format!("p{i}")] = json!(i);
        }
        let mut old = event("purchase");
        old["timestamp_micros"] = json!(us(80));
        let mut long = event("purchase");
        long["params"]["page_title"] = json!("t".repeat(301));
        long["params"]["page_location"] = json!("u".repeat(1000));
        let events = vec![
            event("purchase"),
            event("session_start"),
            event("bad-name"),
            many,
            old,
            long,
            event("ga_custom"),
        ];
        let r = run(&s, &req("/mp/collect", "demo-secret", body(events)));
        assert_eq!(
            codes(&r),
            vec![
                ("events".into(), "NAME_RESERVED".into()),
                ("events".into(), "NAME_INVALID".into()),
                ("events[3].params".into(), "EXCEEDED_MAX_ENTITIES".into()),
                (
                    "events[4].timestamp_micros".into(),
                    "VALUE_OUT_OF_BOUNDS".into()
                ),
                (
                    "events[5].params.page_title".into(),
                    "VALUE_OUT_OF_BOUNDS".into()
                ),
                ("events".into(), "NAME_RESERVED".into()),
            ]
        );
        assert!(
            r.body["validationMessages"][0]["description"]
                .as_str()
                .unwrap()
                .contains("index: [1]")
        );
        assert_eq!(r.accepted.len(), 1);
    }

    #[test]
    fn production_answers_are_empty() {
        let s = Settings {
            production_answers: true,
            ..Settings::default()
        };
        let r = run(
            &s,
            &req(
                "/mp/collect",
                "demo-secret",
                body(vec![event("purchase"), event("error")]),
            ),
        );
        assert_eq!(r.status, 204);
        assert_eq!(r.accepted.len(), 1);
    }
}
