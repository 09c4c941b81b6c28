//! Pieces shared by the Segment, Mixpanel and PostHog mappings: each of them
//! builds a canonical event as a JSON object, which then goes through the
//! same contract validation as a natively published event.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

/// What a vendor payload turned into.
#[derive(Debug, Clone, PartialEq)]
pub enum Mapped {
    /// A canonical event candidate (validated afterwards).
    Event(Value),
    /// A well-formed call whose name the mapping table does not know: accepted
    /// but not published (the canonical topic is the narrow activation lane).
    Unmapped(String),
}

/// A string or a number as a string (ids are often numeric in vendor SDKs).
pub fn id_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// RFC 3339 in UTC with milliseconds, the form the contract expects; a value
/// that is not a timestamp is passed through so validation names it.
pub fn rfc3339(v: &Value) -> Value {
    match v {
        Value::String(s) => match DateTime::parse_from_rfc3339(s) {
            Ok(t) => Value::String(
                t.with_timezone(&Utc)
                    .to_rfc3339_opts(SecondsFormat::Millis, true),
            ),
            Err(_) => v.clone(),
        },
        Value::Number(n) => n
            .as_f64()
            .and_then(unix_to_rfc3339)
            .map_or_else(|| v.clone(), Value::String),
        other => other.clone(),
    }
}

/// Unix time in seconds, or milliseconds when it is too large to be seconds
/// (Mixpanel SDKs send either).
pub fn unix_to_rfc3339(t: f64) -> Option<String> {
    let millis = if t > 1e11 { t } else { t * 1000.0 };
    // Whole milliseconds are all the contract keeps.
    DateTime::<Utc>::from_timestamp_millis(millis.round() as i64)
        .map(|d| d.to_rfc3339_opts(SecondsFormat::Millis, true))
}

pub fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Commerce properties shared by the vendors' e-commerce specs: moves
/// revenue/total/value, currency, order id and products out of `props` into
/// the canonical fields of `out`, leaving the rest in `props`.
pub fn take_commerce(props: &mut Map<String, Value>, out: &mut Map<String, Value>) {
    let value = ["revenue", "total", "value", "$amount"]
        .iter()
        .find_map(|k| props.get(*k).filter(|v| v.is_number()).cloned());
    let currency = ["currency", "$currency"]
        .iter()
        .find_map(|k| props.get(*k).and_then(Value::as_str))
        .map(str::to_ascii_uppercase);
    if let Some(v) = value {
        out.insert("value".into(), v);
        // Segment's e-commerce spec: a value without a currency is in USD.
        out.insert(
            "currency".into(),
            Value::String(currency.unwrap_or_else(|| "USD".into())),
        );
        for k in [
            "revenue",
            "total",
            "value",
            "$amount",
            "currency",
            "$currency",
        ] {
            props.remove(k);
        }
    }
    if let Some(order) = id_string(props.get("orderId").or(props.get("order_id"))) {
        out.insert("order_id".into(), Value::String(order));
        props.remove("orderId");
        props.remove("order_id");
    }
    if let Some(Value::Array(products)) = props.remove("products") {
        let items: Vec<Value> = products.iter().map(item).collect();
        out.insert("items".into(), Value::Array(items));
    }
}

/// One product of a vendor's e-commerce spec as a canonical item.
fn item(p: &Value) -> Value {
    let mut i = Map::new();
    if let Some(id) = id_string(p.get("product_id").or(p.get("sku")).or(p.get("id"))) {
        i.insert("id".into(), Value::String(id));
    }
    for k in ["name", "category", "brand", "variant", "quantity", "price"] {
        if let Some(v) = p.get(k) {
            i.insert(k.into(), v.clone());
        }
    }
    Value::Object(i)
}

/// Moves identity hints the vendors keep among properties/traits into the
/// contact fields, where the identifier rules (normalisation, validation,
/// hashing, dropped hints) apply and only raw-contact destinations see them
/// unhashed. Moved, not copied: properties and traits go to every
/// destination. What is not moved (a second address, a value that is not a
/// string) the router keeps from destinations without raw contact.
pub fn take_contact(from: &mut Map<String, Value>, out: &mut Map<String, Value>) {
    for (canonical, keys) in [
        ("email", ["email", "$email"]),
        ("phone", ["phone", "$phone"]),
    ] {
        if out.contains_key(canonical) {
            continue;
        }
        if let Some(key) = keys
            .iter()
            .find(|k| from.get(**k).is_some_and(Value::is_string))
            && let Some(v) = from.remove(*key)
        {
            out.insert(canonical.into(), v);
        }
    }
}

/// Where the event came from, kept in `metadata` for tracing back.
pub fn provenance(via: &str, mapping_version: u32, source_id: Option<&str>) -> Value {
    let mut m = json!({ "via": via, "mapping_version": mapping_version });
    if let Some(id) = source_id {
        m["source_id"] = Value::String(id.into());
    }
    json!({ "ingest": m })
}

/// Sets `key` only when there is a value.
pub fn put(out: &mut Map<String, Value>, key: &str, v: Option<Value>) {
    if let Some(v) = v {
        out.insert(key.into(), v);
    }
}

/// The browser context that the Mixpanel and PostHog SDKs both put in
/// properties (their IP keys differ), as a canonical `context`.
pub fn put_web_context(props: &Map<String, Value>, ip_key: &str, out: &mut Map<String, Value>) {
    let string = |k: &str| props.get(k).filter(|v| v.is_string()).cloned();
    let mut context = Map::new();
    put(&mut context, "ip", string(ip_key));
    put(&mut context, "page_url", string("$current_url"));
    put(&mut context, "referrer", string("$referrer"));
    if !context.is_empty() {
        out.insert("context".into(), Value::Object(context));
    }
}

/// An identify call's traits, or an event's commerce fields and remaining
/// properties; then where the event came from.
pub fn finish(
    mut out: Map<String, Value>,
    identify: bool,
    traits: Map<String, Value>,
    mut props: Map<String, Value>,
    via: &str,
    source_id: Option<&str>,
) -> Value {
    if identify {
        if !traits.is_empty() {
            out.insert("traits".into(), Value::Object(traits));
        }
    } else {
        take_commerce(&mut props, &mut out);
        if !props.is_empty() {
            out.insert("properties".into(), Value::Object(props));
        }
    }
    out.insert(
        "metadata".into(),
        provenance(via, super::segment::MAPPING_VERSION, source_id),
    );
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_become_utc_millis() {
        assert_eq!(
            rfc3339(&json!("2026-11-26T10:00:00+01:00")),
            json!("2026-11-26T09:00:00.000Z")
        );
        assert_eq!(
            rfc3339(&json!(1_790_000_000)),
            json!("2026-09-21T14:13:20.000Z")
        );
        assert_eq!(
            rfc3339(&json!(1_790_000_000_123_u64)),
            json!("2026-09-21T14:13:20.123Z")
        );
        assert_eq!(rfc3339(&json!("yesterday")), json!("yesterday"));
    }

    #[test]
    fn commerce_fields_move_to_canonical_ones() {
        let mut props = json!({
            "revenue": 49.5, "currency": "eur", "orderId": 1234,
            "products": [{"product_id": "sku-1", "quantity": 2, "price": 24.75, "coupon": "x"}],
            "plan": "pro"
        })
        .as_object()
        .cloned()
        .unwrap();
        let mut out = Map::new();
        take_commerce(&mut props, &mut out);
        assert_eq!(
            Value::Object(out),
            json!({"value": 49.5, "currency": "EUR", "order_id": "1234",
                   "items": [{"id": "sku-1", "quantity": 2, "price": 24.75}]})
        );
        assert_eq!(Value::Object(props), json!({"plan": "pro"}));
    }

    #[test]
    fn value_without_currency_is_usd() {
        let mut props = json!({"total": 10}).as_object().cloned().unwrap();
        let mut out = Map::new();
        take_commerce(&mut props, &mut out);
        assert_eq!(out["currency"], json!("USD"));
    }
}
