//! The typed canonical event.
//!
//! Field names and shapes mirror `schemas/canonical-event.v1.json` exactly, so
//! that serialising a parsed event yields a valid event again. Values reach
//! this type only through [`crate::event::parse_event`], which validates first;
//! the deserialisers here are therefore lenient only where JSON Schema is
//! (a quantity of `2.0` is an integer) and never stricter than the contract.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

/// One canonical business event, as published to `events.canonical`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanonicalEvent {
    pub event: EventName,
    pub event_id: String,
    pub occurred_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub external_ids: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub click_ids: Option<ClickIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Context>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub consent: BTreeMap<String, ConsentState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<Item>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traits: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    /// Identity hints the publisher sent but that were malformed even after
    /// normalisation, and so are absent above. Filled by
    /// [`crate::event::parse_event`]; never on the wire, because a
    /// re-serialised event must stay valid and carry no personal data twice.
    #[serde(skip)]
    pub dropped_hints: Vec<DroppedHint>,
}

/// An identity hint that [`crate::event::parse_event`] left out of the event:
/// a hint only improves matching, so a malformed one costs the hint, never
/// the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedHint {
    /// Metric label, one of a fixed set: "email", "phone", "email_sha256",
    /// "phone_sha256", "external_ids", "click_ids", "ip".
    pub field: &'static str,
    /// RFC 6901 pointer of the dropped value, e.g. "/email",
    /// "/external_ids/crm", "/click_ids/gclid", "/context/ip".
    pub pointer: String,
    /// Why, in words. NEVER contains the value itself (it may be personal
    /// data): it describes the value's shape only, e.g. "not an email
    /// address (3 characters, no '@')".
    pub reason: String,
}

impl fmt::Display for DroppedHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.pointer, self.reason)
    }
}

impl CanonicalEvent {
    /// The person's consent for `category` at the time of the event; `None`
    /// when the publisher did not say, in which case the destination's
    /// configured default applies.
    pub fn consent_for(&self, category: &str) -> Option<ConsentState> {
        self.consent.get(category).copied()
    }

    /// The id that keys everything about this person downstream (delivery
    /// partitioning, identity lookups): `user_id` when known, else
    /// `anonymous_id`. Empty only for a hand-built event that has neither,
    /// which validation never lets through.
    pub fn anchor(&self) -> &str {
        self.user_id
            .as_deref()
            .or(self.anonymous_id.as_deref())
            .unwrap_or("")
    }
}

/// The business action. Canonical names are enum variants so that routing
/// code matches on them exhaustively; anything else must carry the
/// `custom.` prefix.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventName {
    ViewContent,
    AddToCart,
    BeginCheckout,
    SignUp,
    StartTrial,
    Lead,
    Purchase,
    Subscribe,
    Renewal,
    Refund,
    Search,
    Identify,
    /// The full name including the `custom.` prefix, e.g. `custom.webinar_registered`.
    Custom(String),
}

impl EventName {
    pub fn as_str(&self) -> &str {
        match self {
            EventName::ViewContent => "view_content",
            EventName::AddToCart => "add_to_cart",
            EventName::BeginCheckout => "begin_checkout",
            EventName::SignUp => "sign_up",
            EventName::StartTrial => "start_trial",
            EventName::Lead => "lead",
            EventName::Purchase => "purchase",
            EventName::Subscribe => "subscribe",
            EventName::Renewal => "renewal",
            EventName::Refund => "refund",
            EventName::Search => "search",
            EventName::Identify => "identify",
            EventName::Custom(name) => name,
        }
    }

    /// The variant for a canonical name; `None` for anything else, including
    /// custom names.
    pub fn canonical(name: &str) -> Option<EventName> {
        Some(match name {
            "view_content" => EventName::ViewContent,
            "add_to_cart" => EventName::AddToCart,
            "begin_checkout" => EventName::BeginCheckout,
            "sign_up" => EventName::SignUp,
            "start_trial" => EventName::StartTrial,
            "lead" => EventName::Lead,
            "purchase" => EventName::Purchase,
            "subscribe" => EventName::Subscribe,
            "renewal" => EventName::Renewal,
            "refund" => EventName::Refund,
            "search" => EventName::Search,
            "identify" => EventName::Identify,
            _ => return None,
        })
    }

    /// A canonical or well-formed custom name; `None` otherwise (a typo such
    /// as "purchse" must not silently become a custom event).
    pub fn parse(name: &str) -> Option<EventName> {
        EventName::canonical(name)
            .or_else(|| is_custom_event_name(name).then(|| EventName::Custom(name.to_owned())))
    }

    pub fn is_custom(&self) -> bool {
        matches!(self, EventName::Custom(_))
    }
}

impl fmt::Display for EventName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for EventName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl Visitor<'_> for NameVisitor {
            type Value = EventName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a canonical event name or \"custom.<name>\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EventName, E> {
                EventName::parse(v).ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

/// `^custom\.[a-z][a-z0-9_]{0,62}$`, the schema's `$defs/custom_event_name`.
pub(crate) fn is_custom_event_name(name: &str) -> bool {
    name.strip_prefix("custom.")
        .is_some_and(|rest| is_snake_key(rest, 63))
}

/// `^[a-z][a-z0-9_]{0,max-1}$`: the shape of custom event names and of
/// consent / external-id keys.
pub(crate) fn is_snake_key(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b[0].is_ascii_lowercase()
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsentState {
    Granted,
    Denied,
}

impl ConsentState {
    pub fn is_granted(self) -> bool {
        self == ConsentState::Granted
    }
}

/// Ad click and browser ids; passed to ad platforms unhashed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickIds {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fbc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fbp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gclid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gbraid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wbraid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttclid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttp: Option<String>,
}

/// One of the fields of [`ClickIds`], named as it is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClickKind {
    Fbc,
    Fbp,
    Gclid,
    Gbraid,
    Wbraid,
    Ttclid,
    Ttp,
}

impl ClickKind {
    pub const ALL: [ClickKind; 7] = [
        ClickKind::Fbc,
        ClickKind::Fbp,
        ClickKind::Gclid,
        ClickKind::Gbraid,
        ClickKind::Wbraid,
        ClickKind::Ttclid,
        ClickKind::Ttp,
    ];
}

impl ClickIds {
    pub fn get(&self, kind: ClickKind) -> Option<&str> {
        match kind {
            ClickKind::Fbc => &self.fbc,
            ClickKind::Fbp => &self.fbp,
            ClickKind::Gclid => &self.gclid,
            ClickKind::Gbraid => &self.gbraid,
            ClickKind::Wbraid => &self.wbraid,
            ClickKind::Ttclid => &self.ttclid,
            ClickKind::Ttp => &self.ttp,
        }
        .as_deref()
    }
}

/// Where the action happened, as seen by the person's browser or app.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referrer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
}

/// One product line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brand: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "whole_number"
    )]
    pub quantity: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<f64>,
}

/// JSON Schema's `integer` includes `2.0`; serde's `u32` does not. Accept
/// what the contract accepts so that a validated event always deserialises.
/// Also used by `parse_event`'s fast path, so both paths read a quantity the
/// same way.
pub(crate) fn whole_number<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u32>, D::Error> {
    struct WholeNumber;
    impl Visitor<'_> for WholeNumber {
        type Value = u32;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a whole number that fits in 32 bits")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u32, E> {
            u32::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u32, E> {
            u32::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<u32, E> {
            if v.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&v) {
                // Exact: the value is whole and within u32's range.
                Ok(v as u32)
            } else {
                Err(E::invalid_value(de::Unexpected::Float(v), &self))
            }
        }
    }
    deserializer.deserialize_any(WholeNumber).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn event_name_round_trips_as_a_string() {
        for name in ["purchase", "identify", "custom.webinar_registered"] {
            let parsed: EventName = serde_json::from_value(json!(name)).unwrap();
            assert_eq!(parsed.as_str(), name);
            assert_eq!(serde_json::to_value(&parsed).unwrap(), json!(name));
        }
        assert_eq!(EventName::parse("purchase"), Some(EventName::Purchase));
        assert!(EventName::parse("custom.x").unwrap().is_custom());
    }

    #[test]
    fn event_name_rejects_typos_and_bad_custom_names() {
        for bad in [
            "purchse",
            "Purchase",
            "custom.",
            "custom.Webinar",
            "custom.9lives",
            "custom.a-b",
            "webinar_registered",
        ] {
            assert_eq!(EventName::parse(bad), None, "{bad}");
            assert!(serde_json::from_value::<EventName>(json!(bad)).is_err());
        }
        let longest = format!("custom.a{}", "b".repeat(62));
        assert!(EventName::parse(&longest).is_some());
        assert!(EventName::parse(&format!("{longest}b")).is_none());
    }

    #[test]
    fn quantity_accepts_whole_floats_like_json_schema_does() {
        let item: Item = serde_json::from_value(json!({"id": "sku", "quantity": 2.0})).unwrap();
        assert_eq!(item.quantity, Some(2));
        assert!(serde_json::from_value::<Item>(json!({"id": "sku", "quantity": 2.5})).is_err());
        assert!(serde_json::from_value::<Item>(json!({"id": "sku", "quantity": -1})).is_err());
    }

    #[test]
    fn helpers() {
        let mut event: CanonicalEvent = serde_json::from_value(json!({
            "event": "lead",
            "event_id": "e1",
            "occurred_at": "2026-11-26T10:00:00+01:00",
            "anonymous_id": "anon-1",
            "consent": {"ads": "denied", "analytics": "granted"}
        }))
        .unwrap();
        assert_eq!(event.anchor(), "anon-1");
        assert_eq!(event.consent_for("ads"), Some(ConsentState::Denied));
        assert!(event.consent_for("analytics").unwrap().is_granted());
        assert_eq!(event.consent_for("email"), None);
        assert_eq!(event.occurred_at.to_rfc3339(), "2026-11-26T09:00:00+00:00");
        event.user_id = Some("u-1".into());
        assert_eq!(event.anchor(), "u-1");
    }

    #[test]
    fn absent_optionals_are_not_serialised() {
        let event: CanonicalEvent = serde_json::from_value(json!({
            "event": "sign_up",
            "event_id": "e2",
            "occurred_at": "2026-11-26T10:00:00Z",
            "user_id": "u-2",
            "items": [],
            "consent": {}
        }))
        .unwrap();
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            json!({
                "event": "sign_up",
                "event_id": "e2",
                "occurred_at": "2026-11-26T10:00:00Z",
                "user_id": "u-2"
            })
        );
    }
}
