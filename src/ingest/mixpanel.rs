//! Mixpanel `/track` events (as the Mixpanel server SDKs send them) → canonical.

use serde_json::{Map, Value};

use super::map::{self, Mapped};
use super::segment;

/// Properties Mixpanel itself consumes; they are not business properties.
const RESERVED: &[&str] = &[
    "token",
    "time",
    "distinct_id",
    "$insert_id",
    "$user_id",
    "$device_id",
    "$anon_id",
    "$identified_id",
    "ip",
    "$current_url",
    "$referrer",
    "mp_lib",
    "$lib_version",
];

/// The project token of one event (it travels inside `properties`).
pub fn token(ev: &Value) -> Option<&str> {
    ev.get("properties")?.get("token")?.as_str()
}

/// Maps one Mixpanel event `{event, properties:{token, distinct_id, time, $insert_id, ...}}`.
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
    let mut out = Map::new();
    out.insert("event".into(), Value::String(canonical));
    let insert_id = map::id_string(props.get("$insert_id"));
    map::put(&mut out, "event_id", insert_id.clone().map(Value::String));
    let time = props
        .get("time")
        .map(map::rfc3339)
        .unwrap_or_else(|| Value::String(map::now_rfc3339()));
    out.insert("occurred_at".into(), time);

    // Simplified ID merge writes anonymous distinct_ids as "$device:<id>".
    let distinct = map::id_string(props.get("distinct_id"));
    let (distinct_user, distinct_device) = match distinct.as_deref() {
        Some(d) => match d.strip_prefix("$device:") {
            Some(device) => (None, Some(device.to_string())),
            None => (Some(d.to_string()), None),
        },
        None => (None, None),
    };
    let user = if identify {
        map::id_string(props.get("$identified_id")).or(distinct_user)
    } else {
        map::id_string(props.get("$user_id")).or(distinct_user)
    };
    let anon = ["$anon_id", "$device_id"]
        .iter()
        .find_map(|k| map::id_string(props.get(*k)))
        .or(distinct_device);
    map::put(&mut out, "user_id", user.map(Value::String));
    map::put(&mut out, "anonymous_id", anon.map(Value::String));
    map::take_contact(&mut props, &mut out);

    map::put_web_context(&props, "ip", &mut out);
    for k in RESERVED {
        props.remove(*k);
    }
    // Mixpanel's identify carries its traits as plain properties.
    let (traits, props) = if identify {
        (props, Map::new())
    } else {
        (Map::new(), props)
    };
    Mapped::Event(map::finish(
        out,
        identify,
        traits,
        props,
        "mixpanel",
        insert_id.as_deref(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::validate_value;
    use serde_json::json;

    #[test]
    fn purchase_with_insert_id_and_unix_time() {
        let ev = json!({"event": "Purchase Completed", "properties": {
            "token": "tok", "distinct_id": "u-1", "$anon_id": "a-1", "time": 1_790_000_000,
            "$insert_id": "ins-1", "$amount": 12.5, "$currency": "gbp", "plan": "pro",
            "$current_url": "https://shop.example/"
        }});
        assert_eq!(token(&ev), Some("tok"));
        let Mapped::Event(v) = map_event(&ev) else {
            panic!()
        };
        assert_eq!(validate_value(&v), vec![]);
        assert_eq!(
            v,
            json!({
                "event": "purchase", "event_id": "ins-1", "occurred_at": "2026-09-21T14:13:20.000Z",
                "user_id": "u-1", "anonymous_id": "a-1",
                "context": {"page_url": "https://shop.example/"},
                "value": 12.5, "currency": "GBP", "properties": {"plan": "pro"},
                "metadata": {"ingest": {"via": "mixpanel", "mapping_version": 1, "source_id": "ins-1"}}
            })
        );
    }

    #[test]
    fn identify_and_device_ids() {
        let Mapped::Event(v) = map_event(&json!({"event": "$identify", "properties": {
            "distinct_id": "u-2", "$identified_id": "u-2", "$anon_id": "a-2",
            "$insert_id": "i2", "time": 1_790_000_000_000_u64, "$email": "p@q.example"
        }})) else {
            panic!()
        };
        assert_eq!(validate_value(&v), vec![]);
        assert_eq!(
            (v["event"].as_str(), v["user_id"].as_str()),
            (Some("identify"), Some("u-2"))
        );
        assert_eq!(v["anonymous_id"], json!("a-2"));
        assert_eq!(v["email"], json!("p@q.example"));
        assert!(v.get("traits").is_none(), "{v}");
        let Mapped::Event(p) = map_event(&json!({"event": "Signed Up", "properties": {
            "distinct_id": "u-3", "$insert_id": "i4", "time": 1_790_000_000,
            "$email": "r@s.example", "$phone": "+1 415 555 0101", "plan": "pro"
        }})) else {
            panic!()
        };
        assert_eq!(validate_value(&p), vec![]);
        assert_eq!(
            (p["email"].as_str(), p["phone"].as_str()),
            (Some("r@s.example"), Some("+1 415 555 0101"))
        );
        assert_eq!(p["properties"], json!({"plan": "pro"}));
        let Mapped::Event(d) = map_event(&json!({"event": "Signed Up", "properties": {
            "distinct_id": "$device:dev-9", "$insert_id": "i3", "time": 1_790_000_000
        }})) else {
            panic!()
        };
        assert_eq!(d["anonymous_id"], json!("dev-9"));
        assert!(d.get("user_id").is_none());
    }

    #[test]
    fn unknown_names_are_unmapped() {
        assert_eq!(
            map_event(&json!({"event": "Button Clicked", "properties": {}})),
            Mapped::Unmapped("Button Clicked".into())
        );
    }
}
