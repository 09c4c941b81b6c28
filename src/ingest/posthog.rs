//! PostHog `/capture` and `/batch` events (as posthog-python, posthog-node
//! and friends send them) → canonical.

use serde_json::{Map, Value};

use super::map::{self, Mapped};
use super::segment;

/// Properties PostHog itself consumes; they are not business properties.
const RESERVED: &[&str] = &[
    "distinct_id",
    "$anon_id",
    "$set",
    "$set_once",
    "$ip",
    "$current_url",
    "$referrer",
    "$lib",
    "$lib_version",
    "$geoip_disable",
];

/// The project key: per event, or at the top of a batch.
pub fn api_key<'a>(ev: &'a Value, batch: Option<&'a Value>) -> Option<&'a str> {
    ev.get("api_key")
        .or_else(|| ev.get("properties")?.get("api_key"))
        .or_else(|| batch?.get("api_key"))
        .and_then(Value::as_str)
}

/// Maps one PostHog event `{event, distinct_id, uuid, timestamp, properties}`.
pub fn map_event(ev: &Value) -> Mapped {
    if !ev.is_object() {
        // Passed on as is, so that validation refuses it with its reason.
        return Mapped::Event(ev.clone());
    }
    let name = ev.get("event").and_then(Value::as_str).unwrap_or("");
    let identify = name == "$identify";
    let canonical = if identify {
        "identify".to_string()
    } else {
        match segment::canonical_name(name) {
            Some(n) => n.as_str().to_string(),
            None => return Mapped::Unmapped(name.to_string()),
        }
    };
    let mut props = ev
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    props.remove("api_key");
    let mut out = Map::new();
    out.insert("event".into(), Value::String(canonical));
    let uuid = map::id_string(ev.get("uuid").or(props.get("$insert_id")));
    props.remove("$insert_id");
    map::put(&mut out, "event_id", uuid.clone().map(Value::String));
    let time = ev
        .get("timestamp")
        .map(map::rfc3339)
        .unwrap_or_else(|| Value::String(map::now_rfc3339()));
    out.insert("occurred_at".into(), time);
    let distinct = map::id_string(ev.get("distinct_id").or(props.get("distinct_id")));
    map::put(&mut out, "user_id", distinct.map(Value::String));
    map::put(
        &mut out,
        "anonymous_id",
        map::id_string(props.get("$anon_id")).map(Value::String),
    );
    let mut set = props
        .get("$set")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    map::take_contact(&mut props, &mut out);
    map::take_contact(&mut set, &mut out);

    map::put_web_context(&props, "$ip", &mut out);
    for k in RESERVED {
        props.remove(*k);
    }
    let traits = set;
    Mapped::Event(map::finish(
        out,
        identify,
        traits,
        props,
        "posthog",
        uuid.as_deref(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::validate_value;
    use serde_json::json;

    #[test]
    fn capture_maps_uuid_and_distinct_id() {
        let batch = json!({"api_key": "phc_x"});
        let ev = json!({
            "event": "Product Added", "distinct_id": "u-1", "uuid": "0190e4a0-0000-7000-8000-000000000001",
            "timestamp": "2026-11-26T10:00:00Z",
            "properties": {"$anon_id": "a-1", "value": 3, "currency": "USD", "$lib": "posthog-python", "color": "red"}
        });
        assert_eq!(api_key(&ev, Some(&batch)), Some("phc_x"));
        let Mapped::Event(v) = map_event(&ev) else {
            panic!()
        };
        assert_eq!(validate_value(&v), vec![]);
        assert_eq!(
            v,
            json!({
                "event": "add_to_cart", "event_id": "0190e4a0-0000-7000-8000-000000000001",
                "occurred_at": "2026-11-26T10:00:00.000Z", "user_id": "u-1", "anonymous_id": "a-1",
                "value": 3, "currency": "USD", "properties": {"color": "red"},
                "metadata": {"ingest": {"via": "posthog", "mapping_version": 1,
                             "source_id": "0190e4a0-0000-7000-8000-000000000001"}}
            })
        );
    }

    #[test]
    fn identify_takes_set_as_traits() {
        let Mapped::Event(v) = map_event(&json!({
            "event": "$identify", "distinct_id": "u-2", "uuid": "id-2", "api_key": "k",
            "timestamp": "2026-11-26T10:00:00Z",
            "properties": {"$set": {"email": "e@f.example", "plan": "team"}}
        })) else {
            panic!()
        };
        assert_eq!(validate_value(&v), vec![]);
        assert_eq!(v["traits"], json!({"plan": "team"}));
        assert_eq!(v["email"], json!("e@f.example"));
        let Mapped::Event(v) = map_event(&json!({
            "event": "Signed Up", "distinct_id": "u-3", "uuid": "id-3",
            "timestamp": "2026-11-26T10:00:00Z",
            "properties": {"email": "g@h.example", "$phone": "+1 415 555 0101", "plan": "team"}
        })) else {
            panic!()
        };
        assert_eq!(validate_value(&v), vec![]);
        assert_eq!(
            (v["email"].as_str(), v["phone"].as_str()),
            (Some("g@h.example"), Some("+1 415 555 0101"))
        );
        assert_eq!(v["properties"], json!({"plan": "team"}));
        assert_eq!(
            map_event(&json!({"event": "$pageview", "distinct_id": "u"})),
            Mapped::Unmapped("$pageview".into())
        );
    }
}
