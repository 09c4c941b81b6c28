//! Segment → canonical: the versioned mapping table and the mapping of one
//! Segment message (webhook destination or HTTP Tracking API; same spec).
//!
//! Bump [`MAPPING_VERSION`] whenever a row changes meaning: it is written
//! into every mapped event's `metadata.ingest.mapping_version`, so a replay
//! or an analyst can tell which table produced an event.

use serde_json::{Map, Value};

use super::map::{self, Mapped};
use crate::event::EventName;

pub const MAPPING_VERSION: u32 = 1;

/// Segment track event name (e-commerce / B2B SaaS spec) → canonical name.
/// Mixpanel and PostHog product names follow the same spec, so their
/// mappings use this table too.
pub const TABLE: &[(&str, EventName)] = &[
    ("Product Viewed", EventName::ViewContent),
    ("Product Added", EventName::AddToCart),
    ("Checkout Started", EventName::BeginCheckout),
    ("Order Completed", EventName::Purchase),
    ("Purchase Completed", EventName::Purchase),
    ("Lead Submitted", EventName::Lead),
    ("Signed Up", EventName::SignUp),
    ("Trial Started", EventName::StartTrial),
    ("Subscribed", EventName::Subscribe),
    ("Subscription Renewed", EventName::Renewal),
    ("Order Refunded", EventName::Refund),
    ("Refund Issued", EventName::Refund),
    ("Products Searched", EventName::Search),
];

/// Segment page calls: kept as a custom event that only destinations
/// mapping it explicitly receive (ad platforms' PageView).
pub const PAGE_EVENT: &str = "custom.page_viewed";

/// The canonical name for a track event name: a table row, or a canonical
/// name used as-is.
pub fn canonical_name(name: &str) -> Option<EventName> {
    TABLE
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, e)| e.clone())
        .or_else(|| EventName::canonical(name).filter(|e| *e != EventName::Identify))
}

/// Maps one Segment message (`type` track, identify or page).
pub fn map_message(msg: &Value) -> Mapped {
    if !msg.is_object() {
        // Passed on as is, so that validation refuses it with its reason.
        return Mapped::Event(msg.clone());
    }
    let empty = Map::new();
    let kind = msg.get("type").and_then(Value::as_str).unwrap_or("");
    let (name, body_key) = match kind {
        "track" => {
            let event = msg.get("event").and_then(Value::as_str).unwrap_or("");
            match canonical_name(event) {
                Some(n) => (n.as_str().to_string(), "properties"),
                None => return Mapped::Unmapped(event.to_string()),
            }
        }
        "identify" => ("identify".to_string(), "traits"),
        "page" => (PAGE_EVENT.to_string(), "properties"),
        other => return Mapped::Unmapped(format!("type:{other}")),
    };
    let ctx = msg
        .get("context")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let mut body = msg
        .get(body_key)
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();

    let mut out = Map::new();
    out.insert("event".into(), Value::String(name));
    let message_id = map::id_string(msg.get("messageId"));
    map::put(&mut out, "event_id", message_id.clone().map(Value::String));
    let time = ["timestamp", "originalTimestamp", "sentAt", "receivedAt"]
        .iter()
        .find_map(|k| msg.get(*k))
        .map(map::rfc3339)
        .unwrap_or_else(|| Value::String(map::now_rfc3339()));
    out.insert("occurred_at".into(), time);
    map::put(
        &mut out,
        "user_id",
        map::id_string(msg.get("userId")).map(Value::String),
    );
    map::put(
        &mut out,
        "anonymous_id",
        map::id_string(msg.get("anonymousId")).map(Value::String),
    );
    map::take_contact(&mut body, &mut out);
    // Context traits are not passed on, so taking a copy of them is enough.
    if let Some(traits) = ctx.get("traits").and_then(Value::as_object) {
        map::take_contact(&mut traits.clone(), &mut out);
    }
    out.extend(context(ctx, kind, &body));
    if let Some(consent) = consent(ctx) {
        out.insert("consent".into(), consent);
    }
    if body_key == "properties" {
        map::take_commerce(&mut body, &mut out);
        if !body.is_empty() {
            out.insert("properties".into(), Value::Object(body));
        }
    } else if !body.is_empty() {
        out.insert("traits".into(), Value::Object(body));
    }
    out.insert(
        "metadata".into(),
        map::provenance("segment", MAPPING_VERSION, message_id.as_deref()),
    );
    Mapped::Event(Value::Object(out))
}

/// Segment Consent Management's `context.consent.categoryPreferences`
/// (`{"Advertising": true}`) as canonical consent (`{"advertising":
/// "granted"}`). Category names are the workspace's own, lower-cased with
/// non-alphanumerics as `_`; a destination names the one it needs in its
/// `consent` setting. Names that cannot be consent keys are left out, so
/// the destination's default applies to them.
fn consent(ctx: &Map<String, Value>) -> Option<Value> {
    let prefs = ctx
        .get("consent")?
        .get("categoryPreferences")?
        .as_object()?;
    let mut out = Map::new();
    for (name, granted) in prefs {
        let Some(granted) = granted.as_bool() else {
            continue;
        };
        let key: String = name
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        if key.len() <= 32 && key.starts_with(|c: char| c.is_ascii_lowercase()) {
            let state = if granted { "granted" } else { "denied" };
            out.insert(key, Value::String(state.into()));
        }
    }
    (!out.is_empty()).then_some(Value::Object(out))
}

fn context(ctx: &Map<String, Value>, kind: &str, body: &Map<String, Value>) -> Map<String, Value> {
    let mut c = Map::new();
    let page = ctx.get("page").and_then(Value::as_object);
    let from_page = |k: &str| {
        page.and_then(|p| p.get(k))
            // A page call carries its page in properties too.
            .or_else(|| (kind == "page").then(|| body.get(k)).flatten())
            .filter(|v| v.is_string())
            .cloned()
    };
    map::put(
        &mut c,
        "ip",
        ctx.get("ip").filter(|v| v.is_string()).cloned(),
    );
    map::put(
        &mut c,
        "user_agent",
        ctx.get("userAgent").filter(|v| v.is_string()).cloned(),
    );
    map::put(&mut c, "page_url", from_page("url"));
    map::put(&mut c, "referrer", from_page("referrer"));
    map::put(
        &mut c,
        "locale",
        ctx.get("locale").filter(|v| v.is_string()).cloned(),
    );
    let mut out = Map::new();
    if !c.is_empty() {
        out.insert("context".into(), Value::Object(c));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::validate_value;
    use serde_json::json;

    fn event(msg: Value) -> Value {
        match map_message(&msg) {
            Mapped::Event(v) => {
                assert_eq!(validate_value(&v), vec![], "{v}");
                v
            }
            other => panic!("not mapped: {other:?}"),
        }
    }

    #[test]
    fn order_completed_becomes_purchase() {
        let v = event(json!({
            "type": "track", "event": "Order Completed", "messageId": "ajs-msg-1",
            "userId": "u-1", "anonymousId": "a-1",
            "timestamp": "2026-11-26T10:00:00.5+01:00",
            "context": {"ip": "203.0.113.9", "userAgent": "Mozilla/5.0",
                        "page": {"url": "https://shop.example/thanks"}, "traits": {"email": "a@b.example"}},
            "properties": {"orderId": "o-9", "revenue": 99.0, "currency": "EUR",
                           "products": [{"product_id": "sku", "quantity": 1, "price": 99.0}], "coupon": "X"}
        }));
        assert_eq!(
            v,
            json!({
                "event": "purchase", "event_id": "ajs-msg-1",
                "occurred_at": "2026-11-26T09:00:00.500Z",
                "user_id": "u-1", "anonymous_id": "a-1", "email": "a@b.example",
                "context": {"ip": "203.0.113.9", "user_agent": "Mozilla/5.0",
                            "page_url": "https://shop.example/thanks"},
                "value": 99.0, "currency": "EUR", "order_id": "o-9",
                "items": [{"id": "sku", "quantity": 1, "price": 99.0}],
                "properties": {"coupon": "X"},
                "metadata": {"ingest": {"via": "segment", "mapping_version": 1, "source_id": "ajs-msg-1"}}
            })
        );
    }

    #[test]
    fn consent_preferences_become_canonical_consent() {
        let v = event(json!({
            "type": "track", "event": "Signed Up", "messageId": "m", "userId": "u",
            "timestamp": "2026-11-26T10:00:00Z",
            "context": {"consent": {"categoryPreferences": {
                "Advertising": true, "Product Analytics": false, "9lives": true, "Odd": "yes"
            }}}
        }));
        assert_eq!(
            v["consent"],
            json!({"advertising": "granted", "product_analytics": "denied"})
        );
    }

    #[test]
    fn every_table_row_maps() {
        for (name, canonical) in TABLE {
            let v = event(json!({
                "type": "track", "event": name, "messageId": "m", "userId": 7,
                "timestamp": "2026-11-26T10:00:00Z", "properties": {"total": 5}
            }));
            assert_eq!(v["event"], json!(canonical.as_str()), "{name}");
            assert_eq!(v["user_id"], json!("7"));
        }
    }

    #[test]
    fn identify_keeps_traits_and_page_is_custom() {
        let v = event(json!({
            "type": "identify", "messageId": "m2", "userId": "u-2", "anonymousId": "a-2",
            "timestamp": "2026-11-26T10:00:00Z",
            "traits": {"email": "x@y.example", "plan": "pro"}
        }));
        assert_eq!(v["event"], json!("identify"));
        assert_eq!(v["email"], json!("x@y.example"));
        assert_eq!(v["traits"], json!({"plan": "pro"}));
        let p = event(json!({
            "type": "page", "messageId": "m3", "anonymousId": "a-3", "name": "Home",
            "timestamp": "2026-11-26T10:00:00Z",
            "properties": {"url": "https://shop.example/", "title": "Home"}
        }));
        assert_eq!(p["event"], json!(PAGE_EVENT));
        assert_eq!(p["context"]["page_url"], json!("https://shop.example/"));
    }

    #[test]
    fn contact_properties_move_to_the_contact_fields() {
        let v = event(json!({
            "type": "track", "event": "Signed Up", "messageId": "m", "userId": "u",
            "timestamp": "2026-11-26T10:00:00Z",
            "properties": {"email": " Jane@Example.com ", "phone": "+1 415 555 0101", "plan": "pro"}
        }));
        assert_eq!(v["email"], json!(" Jane@Example.com "));
        assert_eq!(v["phone"], json!("+1 415 555 0101"));
        assert_eq!(v["properties"], json!({"plan": "pro"}));
        // A value that cannot be an identity hint stays where it was; the
        // router keeps it from destinations without raw contact.
        let v = event(json!({
            "type": "track", "event": "Signed Up", "messageId": "m", "userId": "u",
            "timestamp": "2026-11-26T10:00:00Z", "properties": {"email": ["a@b.example"]}
        }));
        assert!(v.get("email").is_none());
        assert_eq!(v["properties"], json!({"email": ["a@b.example"]}));
    }

    #[test]
    fn unknown_names_and_types_are_unmapped() {
        assert_eq!(
            map_message(&json!({"type": "track", "event": "Order Placed", "messageId": "m"})),
            Mapped::Unmapped("Order Placed".into())
        );
        assert_eq!(
            map_message(&json!({"type": "screen", "messageId": "m"})),
            Mapped::Unmapped("type:screen".into())
        );
        // "identify" as a track name must not bypass the identify rules.
        assert_eq!(
            map_message(&json!({"type": "track", "event": "identify"})),
            Mapped::Unmapped("identify".into())
        );
    }

    #[test]
    fn a_message_that_is_not_an_object_is_refused_by_validation() {
        let Mapped::Event(v) = map_message(&json!("Order Completed")) else {
            panic!()
        };
        assert_eq!(validate_value(&v).len(), 1);
    }

    #[test]
    fn a_message_without_message_id_fails_validation_at_event_id() {
        let Mapped::Event(v) =
            map_message(&json!({"type": "track", "event": "Signed Up", "userId": "u"}))
        else {
            panic!()
        };
        let violations = validate_value(&v);
        assert!(
            violations.iter().any(|x| x.pointer == "/event_id"),
            "{violations:?}"
        );
    }
}
