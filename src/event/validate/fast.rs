//! `parse_event`'s fast path: the bytes go straight into the typed event (no
//! `serde_json::Value` tree), which is then checked against the contract
//! with the same predicates the reference walk uses.
//!
//! The path only ever says "valid, and here is the event" or "no opinion";
//! every `None` falls back to the reference walk, which decides and writes
//! the messages. So it may refuse more than the contract (a duplicated key,
//! for instance), but it must never accept anything the walk refuses, and
//! what it returns must equal what the reference path returns, normalised
//! identifiers and dropped hints included. The typed model alone is more lenient than the contract in a few
//! ways, which the strict deserialisers below close before the typed check
//! runs:
//!
//! - an `Option` field reads `null` as absent; the contract refuses `null`;
//! - a derived struct also reads a JSON array of its fields in order;
//! - a derived unit enum (`ConsentState`) also reads `{"granted": null}`;
//! - chrono reads timestamps the contract refuses (lowercase `t`, a space
//!   for `T`, years outside 1900-2099), and a timestamp cannot be checked
//!   once parsed.
//!
//! It also reads the text as `&str` (one UTF-8 check for the whole record
//! instead of one per string) and builds timestamps from the fields the
//! contract check reads, instead of having chrono parse them again.
//!
//! The remote derives below mirror the model's field list, so a field added
//! to the model without a strict reader here fails to compile.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveTime, TimeZone, Utc};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::{
    Hint, LISTS, MAX_QUANTITY, Seg, Timestamp, check_timestamp, is_currency, is_email_field,
    is_event_id, is_locale, is_phone_field, is_sha256_hex, is_url_field, len_within, non_negative,
    render_pointer, sort_hints, trim_in_place,
};
use crate::event::model::{
    CanonicalEvent, ClickIds, ConsentState, Context, DroppedHint, EventName, Item,
    is_custom_event_name, is_snake_key, whole_number,
};

/// The event when `bytes` is certainly a valid canonical event; `None` when
/// the reference walk has to decide.
pub(super) fn parse(bytes: &[u8]) -> Option<CanonicalEvent> {
    // One UTF-8 check for the whole record rather than one per string, which
    // is what `from_slice` does; for UTF-8 input the two read the same.
    let text = std::str::from_utf8(bytes).ok()?;
    let mut de = serde_json::Deserializer::from_str(text);
    let mut event = StrictEvent::deserialize(MapOnly(&mut de)).ok()?;
    // What `serde_json::from_slice` does after the value: only whitespace may
    // follow.
    de.end().ok()?;
    normalize_identifiers(&mut event);
    contract_holds(&event).then_some(event)
}

/// What the reference path's `normalize_identifiers` does to the JSON tree,
/// done to the typed event, with the walk's `Hint` rules and its pointers
/// and order for what is dropped. In place: an event whose ids need no
/// trimming and whose hints are fine costs no allocation here. (`ip` was
/// trimmed as it was read, and a malformed one sent the event to the
/// reference path.)
fn normalize_identifiers(e: &mut CanonicalEvent) {
    trim_in_place(&mut e.event_id);
    for id in [&mut e.user_id, &mut e.anonymous_id].into_iter().flatten() {
        trim_in_place(id);
    }
    let mut dropped = Vec::new();
    let mut keep =
        |field: &'static str, at: &[Seg<'_>], hint: Hint, s: &mut String| match hint.problem(s) {
            None => {
                hint.normalize(s);
                true
            }
            Some(reason) => {
                dropped.push(DroppedHint {
                    field,
                    pointer: render_pointer(at),
                    reason,
                });
                false
            }
        };
    for (field, hint, slot) in [
        ("email", Hint::Email, &mut e.email),
        ("phone", Hint::Phone, &mut e.phone),
        ("email_sha256", Hint::Sha256, &mut e.email_sha256),
        ("phone_sha256", Hint::Sha256, &mut e.phone_sha256),
    ] {
        if let Some(s) = slot
            && !keep(field, &[Seg::Key(field)], hint, s)
        {
            *slot = None;
        }
    }
    e.external_ids.retain(|key, id| {
        let at = [Seg::Key("external_ids"), Seg::Key(key)];
        keep("external_ids", &at, Hint::ExternalId, id)
    });
    if let Some(ids) = &mut e.click_ids {
        let ClickIds {
            fbc,
            fbp,
            gclid,
            gbraid,
            wbraid,
            ttclid,
            ttp,
        } = ids;
        for (key, slot) in [
            ("fbc", fbc),
            ("fbp", fbp),
            ("gclid", gclid),
            ("gbraid", gbraid),
            ("wbraid", wbraid),
            ("ttclid", ttclid),
            ("ttp", ttp),
        ] {
            let at = [Seg::Key("click_ids"), Seg::Key(key)];
            if let Some(s) = slot
                && !keep("click_ids", &at, Hint::ClickId, s)
            {
                *slot = None;
            }
        }
    }
    sort_hints(&mut dropped);
    e.dropped_hints = dropped;
}

/// Everything the reference walk (`Checker`) enforces that the strict
/// deserialisers have not already; the order follows `Checker::event`.
fn contract_holds(e: &CanonicalEvent) -> bool {
    let revenue = LISTS.revenue.iter().any(|r| r == e.event.as_str());
    event_name_holds(&e.event)
        && is_event_id(&e.event_id)
        && text(&e.source, 1, 64)
        && text(&e.user_id, 1, 256)
        && text(&e.anonymous_id, 1, 256)
        && e.email.as_deref().is_none_or(is_email_field)
        && e.phone.as_deref().is_none_or(is_phone_field)
        && e.email_sha256.as_deref().is_none_or(is_sha256_hex)
        && e.phone_sha256.as_deref().is_none_or(is_sha256_hex)
        && e.external_ids.len() <= 16
        && e
            .external_ids
            .iter()
            .all(|(key, id)| is_snake_key(key, 32) && len_within(id, 1, 256))
        && e.click_ids.as_ref().is_none_or(click_ids_hold)
        && e.context.as_ref().is_none_or(context_holds)
        // The states themselves were read strictly (`consent`).
        && e.consent.keys().all(|category| is_snake_key(category, 32))
        && e.value.is_none_or(non_negative)
        && e.currency.as_deref().is_none_or(is_currency)
        && text(&e.order_id, 1, 128)
        && e.items.len() <= 200
        && e.items.iter().all(item_holds)
        // `properties`, `traits` and `metadata` are objects by type.
        // Event-level rules; `event`, `event_id` and `occurred_at` are
        // required by the model.
        && (e.user_id.is_some() || e.anonymous_id.is_some())
        && if revenue {
            e.value.is_some() && e.currency.is_some()
        } else {
            e.value.is_some() == e.currency.is_some()
        }
}

/// `EventName` only parses canonical or well-formed custom names; this also
/// holds the canonical ones to the schema's list, as the walk does.
fn event_name_holds(name: &EventName) -> bool {
    match name {
        EventName::Custom(name) => is_custom_event_name(name),
        canonical => LISTS.canonical.iter().any(|c| c == canonical.as_str()),
    }
}

/// An absent field, or a string of `min..=max` characters.
fn text(field: &Option<String>, min: usize, max: usize) -> bool {
    field.as_deref().is_none_or(|s| len_within(s, min, max))
}

fn click_ids_hold(ids: &ClickIds) -> bool {
    let ClickIds {
        fbc,
        fbp,
        gclid,
        gbraid,
        wbraid,
        ttclid,
        ttp,
    } = ids;
    [fbc, fbp, gclid, gbraid, wbraid, ttclid, ttp]
        .into_iter()
        .all(|id| text(id, 1, 512))
}

fn context_holds(context: &Context) -> bool {
    // `ip` parsed as an address is exactly the walk's `parse::<IpAddr>()`.
    text(&context.user_agent, 0, 1024)
        && context.page_url.as_deref().is_none_or(is_url_field)
        && context.referrer.as_deref().is_none_or(is_url_field)
        && context.locale.as_deref().is_none_or(is_locale)
}

fn item_holds(item: &Item) -> bool {
    // `whole_number` has already refused negative, fractional and >32-bit
    // quantities, so the range is all that is left of `is_quantity`.
    len_within(&item.id, 1, 128)
        && [&item.name, &item.category, &item.brand, &item.variant]
            .into_iter()
            .all(|field| text(field, 0, 256))
        && item
            .quantity
            .is_none_or(|q| (1..=MAX_QUANTITY).contains(&q))
        && item.price.is_none_or(non_negative)
}

#[derive(Deserialize)]
#[serde(remote = "CanonicalEvent", deny_unknown_fields)]
struct StrictEvent {
    event: EventName,
    event_id: String,
    #[serde(deserialize_with = "timestamp")]
    occurred_at: DateTime<Utc>,
    #[serde(default, deserialize_with = "present")]
    source: Option<String>,
    #[serde(default, deserialize_with = "present")]
    user_id: Option<String>,
    #[serde(default, deserialize_with = "present")]
    anonymous_id: Option<String>,
    #[serde(default, deserialize_with = "present")]
    email: Option<String>,
    #[serde(default, deserialize_with = "present")]
    phone: Option<String>,
    #[serde(default, deserialize_with = "present")]
    email_sha256: Option<String>,
    #[serde(default, deserialize_with = "present")]
    phone_sha256: Option<String>,
    // A map refuses `null` and arrays on its own.
    #[serde(default)]
    external_ids: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "click_ids")]
    click_ids: Option<ClickIds>,
    #[serde(default, deserialize_with = "context")]
    context: Option<Context>,
    #[serde(default, deserialize_with = "consent")]
    consent: BTreeMap<String, ConsentState>,
    #[serde(default, deserialize_with = "present")]
    value: Option<f64>,
    #[serde(default, deserialize_with = "present")]
    currency: Option<String>,
    #[serde(default, deserialize_with = "present")]
    order_id: Option<String>,
    #[serde(default, deserialize_with = "items")]
    items: Vec<Item>,
    #[serde(default, deserialize_with = "present")]
    properties: Option<Map<String, Value>>,
    #[serde(default, deserialize_with = "present")]
    traits: Option<Map<String, Value>>,
    #[serde(default, deserialize_with = "present")]
    metadata: Option<Map<String, Value>>,
    #[serde(skip)]
    dropped_hints: Vec<DroppedHint>,
}

#[derive(Deserialize)]
#[serde(remote = "ClickIds", deny_unknown_fields)]
struct StrictClickIds {
    #[serde(default, deserialize_with = "present")]
    fbc: Option<String>,
    #[serde(default, deserialize_with = "present")]
    fbp: Option<String>,
    #[serde(default, deserialize_with = "present")]
    gclid: Option<String>,
    #[serde(default, deserialize_with = "present")]
    gbraid: Option<String>,
    #[serde(default, deserialize_with = "present")]
    wbraid: Option<String>,
    #[serde(default, deserialize_with = "present")]
    ttclid: Option<String>,
    #[serde(default, deserialize_with = "present")]
    ttp: Option<String>,
}

#[derive(Deserialize)]
#[serde(remote = "Context", deny_unknown_fields)]
struct StrictContext {
    #[serde(default, deserialize_with = "ip")]
    ip: Option<IpAddr>,
    #[serde(default, deserialize_with = "present")]
    user_agent: Option<String>,
    #[serde(default, deserialize_with = "present")]
    page_url: Option<String>,
    #[serde(default, deserialize_with = "present")]
    referrer: Option<String>,
    #[serde(default, deserialize_with = "present")]
    locale: Option<String>,
}

#[derive(Deserialize)]
#[serde(remote = "Item", deny_unknown_fields)]
struct StrictItem {
    id: String,
    #[serde(default, deserialize_with = "present")]
    name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    category: Option<String>,
    #[serde(default, deserialize_with = "present")]
    brand: Option<String>,
    #[serde(default, deserialize_with = "present")]
    variant: Option<String>,
    // The model's own reader, so both paths agree on `2.0`; it refuses
    // `null` already.
    #[serde(default, deserialize_with = "whole_number")]
    quantity: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    price: Option<f64>,
}

/// A present optional field: `null` is refused instead of read as absent.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// Trimmed, then read with `str::parse` as the walk's `Hint::Ip` checks it.
/// A malformed address is an error here, so that the reference path drops
/// it and says why.
fn ip<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IpAddr>, D::Error> {
    struct Address;
    impl Visitor<'_> for Address {
        type Value = IpAddr;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an IPv4 or IPv6 address")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<IpAddr, E> {
            s.trim()
                .parse()
                .map_err(|_| E::invalid_value(de::Unexpected::Str(s), &self))
        }
    }
    d.deserialize_str(Address).map(Some)
}

fn click_ids<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ClickIds>, D::Error> {
    StrictClickIds::deserialize(MapOnly(d)).map(Some)
}

fn context<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Context>, D::Error> {
    StrictContext::deserialize(MapOnly(d)).map(Some)
}

fn items<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Item>, D::Error> {
    struct Items;
    impl<'de> Visitor<'de> for Items {
        type Value = Vec<Item>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array of item objects")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Item>, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element_seed(ItemSeed)? {
                items.push(item);
            }
            Ok(items)
        }
    }
    struct ItemSeed;
    impl<'de> DeserializeSeed<'de> for ItemSeed {
        type Value = Item;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Item, D::Error> {
            StrictItem::deserialize(MapOnly(d))
        }
    }
    d.deserialize_seq(Items)
}

/// Consent states as strings only (see the module docs).
fn consent<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, ConsentState>, D::Error> {
    struct States;
    impl<'de> Visitor<'de> for States {
        type Value = BTreeMap<String, ConsentState>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object of consent states")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut states = BTreeMap::new();
            while let Some((category, State(state))) = map.next_entry::<String, State>()? {
                // A repeated category keeps its last state, as a
                // `serde_json::Map` (and so the walk) does.
                states.insert(category, state);
            }
            Ok(states)
        }
    }
    struct State(ConsentState);
    impl<'de> Deserialize<'de> for State {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<State, D::Error> {
            struct Word;
            impl Visitor<'_> for Word {
                type Value = State;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("\"granted\" or \"denied\"")
                }
                fn visit_str<E: de::Error>(self, s: &str) -> Result<State, E> {
                    match s {
                        "granted" => Ok(State(ConsentState::Granted)),
                        "denied" => Ok(State(ConsentState::Denied)),
                        _ => Err(E::invalid_value(de::Unexpected::Str(s), &self)),
                    }
                }
            }
            d.deserialize_str(Word)
        }
    }
    d.deserialize_map(States)
}

/// Checks the string against the contract and builds the instant from the
/// fields the check has already read.
fn timestamp<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    struct Checked;
    impl Visitor<'_> for Checked {
        type Value = DateTime<Utc>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a timestamp the contract allows")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<DateTime<Utc>, E> {
            check_timestamp(s)
                .ok()
                .and_then(|t| utc(&t))
                .ok_or_else(|| E::invalid_value(de::Unexpected::Str(s), &self))
        }
    }
    d.deserialize_str(Checked)
}

/// The instant chrono's `DateTime<Utc>` deserialiser (the reference path's)
/// makes of the same fields, built the way its `Parsed::to_datetime` does:
/// a leap second is second 59 plus a whole second of nanoseconds, and the
/// local time is taken at its fixed offset. Parsing the text again would
/// cost about a tenth of the fast path. `None` only if chrono would refuse
/// it as well.
fn utc(t: &Timestamp) -> Option<DateTime<Utc>> {
    let (second, leap) = match t.second {
        60 => (59, 1_000_000_000),
        second => (second, 0),
    };
    let date = NaiveDate::from_ymd_opt(i32::try_from(t.year).ok()?, t.month, t.day)?;
    let time = NaiveTime::from_hms_nano_opt(t.hour, t.minute, second, leap + t.nanosecond)?;
    let offset = FixedOffset::east_opt(t.offset_minutes * 60)?;
    let local = offset.from_local_datetime(&date.and_time(time)).single()?;
    Some(local.with_timezone(&Utc))
}

/// Sends every request to `deserialize_map`: a derived struct deserialiser
/// asks for `deserialize_struct`, which serde_json also satisfies from a JSON
/// array of field values (`["purchase", "evt_1", ...]`), and the contract
/// wants objects.
struct MapOnly<D>(D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for MapOnly<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(visitor)
    }

    fn is_human_readable(&self) -> bool {
        self.0.is_human_readable()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::validate::tests::base;
    use crate::event::validate::{InvalidEvent, parse_event, parse_event_slow};
    use serde_json::json;

    fn with(field: &str, value: Value) -> String {
        let mut event = base();
        event[field] = value;
        event.to_string()
    }

    /// The fast path takes `json`, and returns what the reference path does.
    #[track_caller]
    fn takes(json: &str) -> CanonicalEvent {
        let slow = parse_event_slow(json.as_bytes())
            .unwrap_or_else(|e| panic!("reference path refuses {json}: {e}"));
        let fast = parse(json.as_bytes()).unwrap_or_else(|| panic!("fast path refuses {json}"));
        assert_eq!(fast, slow, "{json}");
        // Stricter than `PartialEq`, which has 0.0 == -0.0.
        assert_eq!(
            serde_json::to_string(&fast).unwrap(),
            serde_json::to_string(&slow).unwrap(),
            "{json}"
        );
        fast
    }

    /// The fast path takes `json` without the hint at `pointer`, as the
    /// reference path does.
    #[track_caller]
    fn drops(json: &str, pointer: &str) -> CanonicalEvent {
        let event = takes(json);
        let dropped: Vec<&str> = event
            .dropped_hints
            .iter()
            .map(|h| h.pointer.as_str())
            .collect();
        assert_eq!(dropped, [pointer], "{json}");
        let again = serde_json::to_value(&event).unwrap();
        assert_eq!(again.pointer(pointer), None, "{json}");
        event
    }

    /// The fast path has no opinion on `json`, and the reference path refuses
    /// it.
    #[track_caller]
    fn refuses(json: &str) -> InvalidEvent {
        assert_eq!(parse(json.as_bytes()), None, "fast path takes {json}");
        parse_event_slow(json.as_bytes()).expect_err(&format!("reference path takes {json}"))
    }

    /// The typed model alone takes `json`: the case is a real trap, not one
    /// that serde refuses anyway.
    #[track_caller]
    fn model_takes(json: &str) {
        if let Err(e) = serde_json::from_str::<CanonicalEvent>(json) {
            panic!("the typed model refuses {json}: {e}");
        }
    }

    #[test]
    fn a_typical_event_goes_fast() {
        let event = takes(
            r#"{"event":"purchase","event_id":"bench-000000030","occurred_at":"2026-11-20T10:00:00Z","user_id":"u-30","anonymous_id":"anon-30","email":"Person.30@Example.com","phone":"+1 650 253 0030","value":30.5,"currency":"USD","order_id":"o-30","items":[{"id":"sku-30","quantity":1,"price":30.5}],"click_ids":{"fbc":"fb.1.1700000000.30"},"context":{"ip":"203.0.113.7","user_agent":"Mozilla/5.0"},"consent":{"ads":"granted","analytics":"granted"}}"#,
        );
        assert_eq!(event.items[0].quantity, Some(1));
        takes(&base().to_string());
    }

    #[test]
    fn null_is_not_an_absent_field() {
        for field in [
            "source",
            "user_id",
            "anonymous_id",
            "email",
            "phone",
            "email_sha256",
            "phone_sha256",
            "external_ids",
            "click_ids",
            "context",
            "consent",
            "order_id",
            "items",
            "properties",
            "traits",
            "metadata",
        ] {
            let json = with(field, Value::Null);
            refuses(&json);
            if !["external_ids", "consent", "items"].contains(&field) {
                model_takes(&json);
            }
        }
        // `value` and `currency` go together; null in either is refused.
        let json = json!({"event": "lead", "event_id": "e", "occurred_at": "2026-11-26T10:00:00Z",
            "user_id": "u", "value": null, "currency": null})
        .to_string();
        refuses(&json);
        model_takes(&json);
        for (field, inner) in [
            ("click_ids", "fbc"),
            ("click_ids", "ttp"),
            ("context", "ip"),
            ("context", "user_agent"),
            ("context", "page_url"),
            ("context", "referrer"),
            ("context", "locale"),
        ] {
            let json = with(field, json!({ inner: null }));
            refuses(&json);
            model_takes(&json);
        }
        for inner in ["name", "category", "brand", "variant", "quantity", "price"] {
            let json = with("items", json!([{"id": "sku", inner: null}]));
            refuses(&json);
            if inner != "quantity" {
                model_takes(&json);
            }
        }
        refuses(&with("consent", json!({"ads": null})));
        refuses(&with("external_ids", json!({"crm": null})));
        refuses(&with("items", json!([null])));
        // Inside the free-form objects, null is just a value.
        takes(&with("properties", json!({"coupon": null, "n": [null]})));
    }

    #[test]
    fn objects_are_objects_not_arrays_of_their_fields() {
        let top = r#"["lead","evt_1","2026-11-26T10:00:00Z","web","u1"]"#;
        assert!(serde_json::from_str::<CanonicalEvent>(top).is_ok());
        assert!(matches!(refuses(top), InvalidEvent::NotObject("array")));
        for (field, array) in [
            ("context", json!(["1.2.3.4", "Mozilla/5.0"])),
            ("click_ids", json!(["fb.1.1.x"])),
            ("items", json!([["sku", "Name"]])),
        ] {
            let json = with(field, array);
            refuses(&json);
            model_takes(&json);
        }
        for not_object in [json!([]), json!("x"), json!(1)] {
            refuses(&with("properties", not_object.clone()));
            refuses(&with("consent", not_object.clone()));
            refuses(&with("external_ids", not_object));
        }
    }

    #[test]
    fn consent_states_are_strings() {
        let json = with("consent", json!({"ads": {"granted": null}}));
        refuses(&json);
        model_takes(&json);
        refuses(&with("consent", json!({"ads": "GRANTED"})));
        refuses(&with("consent", json!({"ads": true})));
        refuses(&with("consent", json!({"Ads": "granted"})));
        let event = takes(&with(
            "consent",
            json!({"ads": "denied", "email": "granted"}),
        ));
        assert_eq!(event.consent_for("ads"), Some(ConsentState::Denied));
    }

    #[test]
    fn quantities_are_whole_numbers_in_range() {
        let quantity = |q: &str| {
            with(
                "items",
                serde_json::from_str(&format!(r#"[{{"id":"sku","quantity":{q}}}]"#)).unwrap(),
            )
        };
        for (ok, expected) in [
            ("1", 1),
            ("2.0", 2),
            ("1e9", 1_000_000_000),
            ("1000000000", 1_000_000_000),
            ("3e0", 3),
        ] {
            assert_eq!(
                takes(&quantity(ok)).items[0].quantity,
                Some(expected),
                "{ok}"
            );
        }
        for bad in [
            "0",
            "0.0",
            "-0.0",
            "-1",
            "2.5",
            "1000000001",
            "1e10",
            "4294967296",
            "\"1\"",
            "true",
        ] {
            refuses(&quantity(bad));
        }
        // Whole and within u32, so the model reads it; the contract does not.
        model_takes(&quantity("0"));
        model_takes(&quantity("4294967295"));
    }

    #[test]
    fn amounts_agree_to_the_bit() {
        for value in [
            "0",
            "-0",
            "-0.0",
            "0.1",
            "49.99",
            "0.30000000000000004",
            "1e300",
            "1.7976931348623157e308",
            "5e-324",
            "18446744073709551615",
            "18446744073709551616",
            "123456789012345678901234567890",
            "1E2",
            "2.5e-7",
        ] {
            let json = with("value", serde_json::from_str(value).unwrap());
            takes(&json);
            let json = with(
                "items",
                serde_json::from_str(&format!(r#"[{{"id":"sku","price":{value}}}]"#)).unwrap(),
            );
            takes(&json);
        }
        // Written out by hand, since `Value` re-prints numbers.
        let raw = r#"{"event":"purchase","event_id":"e","occurred_at":"2026-11-26T10:00:00Z","user_id":"u","currency":"USD","value":-0}"#;
        takes(raw);
        for bad in ["-1", "-1e-300", "\"1\""] {
            let json = with("value", serde_json::from_str(bad).unwrap());
            refuses(&json);
            refuses(&with(
                "items",
                serde_json::from_str(&format!(r#"[{{"id":"sku","price":{bad}}}]"#)).unwrap(),
            ));
        }
        // Out of f64's range: bad JSON on both sides.
        let huge = r#"{"event":"purchase","event_id":"e","occurred_at":"2026-11-26T10:00:00Z","user_id":"u","currency":"USD","value":1e400}"#;
        assert_eq!(parse(huge.as_bytes()), None);
        assert_eq!(
            parse_event_slow(huge.as_bytes()).unwrap_err().error_class(),
            "bad_json"
        );
    }

    #[test]
    fn timestamps_chrono_reads_but_the_contract_does_not() {
        for bad in [
            "2026-11-26t10:00:00z",
            "2026-11-26 10:00:00Z",
            "2026-11-26T10:00:00.1234567890Z",
            "1899-12-31T23:59:59Z",
            "2100-01-01T00:00:00Z",
            "1900-01-01T10:00:00+01:00",
            "2099-12-31T20:00:00-05:00",
            "2026-11-26T23:59:60+01:00",
            "2026-11-26T10:59:60Z",
        ] {
            let json = with("occurred_at", json!(bad));
            model_takes(&json);
            refuses(&json);
        }
        for bad in [
            "2026-11-26",
            "2026-11-26T10:00:00",
            "2026-02-29T00:00:00Z",
            "2026-11-26T10:00:00Z ",
        ] {
            refuses(&with("occurred_at", json!(bad)));
        }
        refuses(&with("occurred_at", json!(1_764_151_200)));
        for ok in [
            "2026-11-26T10:00:00Z",
            "2026-11-26T10:00:00.123456789+05:30",
            "2026-12-31T23:59:60Z",
            "2027-01-01T00:59:60+01:00",
            "1900-01-01T00:00:00-01:00",
            "2099-12-31T23:59:59+01:00",
            "2026-11-26T10:00:00-00:00",
        ] {
            takes(&with("occurred_at", json!(ok)));
        }
        // Escaped in the JSON text: the check sees the decoded string.
        takes(
            r#"{"event":"lead","event_id":"e","occurred_at":"2026-11-26\u005410:00:00Z","user_id":"u"}"#,
        );
    }

    /// What the reference path makes of a timestamp: chrono's deserialiser.
    fn chrono_reads(s: &str) -> Option<DateTime<Utc>> {
        serde_json::from_value(json!(s)).ok()
    }

    #[test]
    fn timestamps_are_the_instants_chrono_reads() {
        let years = [1900, 1901, 1904, 1999, 2000, 2024, 2026, 2096, 2098, 2099];
        let days = [1, 28, 29, 30, 31];
        let hours = [0, 1, 12, 22, 23];
        let minutes = [0, 1, 30, 58, 59];
        let seconds = [0, 1, 59, 60];
        let fractions = [
            "",
            ".0",
            ".5",
            ".05",
            ".123",
            ".000001",
            ".000000001",
            ".999999999",
            ".12345678",
        ];
        let offsets = [
            "Z", "+00:00", "-00:00", "+01:00", "-01:00", "+05:30", "-09:30", "+13:45", "-23:59",
            "+23:59",
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut pick = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let mut checked = 0;
        for _ in 0..50_000 {
            let s = format!(
                "{}-{:02}-{:02}T{:02}:{:02}:{:02}{}{}",
                years[pick(years.len())],
                1 + pick(12),
                days[pick(days.len())],
                hours[pick(hours.len())],
                minutes[pick(minutes.len())],
                seconds[pick(seconds.len())],
                fractions[pick(fractions.len())],
                offsets[pick(offsets.len())],
            );
            if let Ok(t) = check_timestamp(&s) {
                assert_eq!(utc(&t), chrono_reads(&s), "{s}");
                checked += 1;
            }
        }
        assert!(checked > 10_000, "only {checked} valid timestamps");

        // Leap seconds are valid only at 23:59 UTC, which random picks seldom
        // hit: write each offset's local time for that minute.
        let mut leaps = 0;
        for date in [
            "1900-01-01",
            "1999-12-31",
            "2024-02-28",
            "2024-02-29",
            "2026-06-30",
            "2026-12-31",
            "2099-12-31",
        ] {
            let midnight = NaiveDate::parse_from_str(date, "%Y-%m-%d")
                .unwrap()
                .and_hms_opt(23, 59, 0)
                .unwrap();
            for offset in offsets {
                let minutes = match offset {
                    "Z" => 0,
                    _ => {
                        let sign = if offset.starts_with('-') { -1 } else { 1 };
                        sign * (offset[1..3].parse::<i64>().unwrap() * 60
                            + offset[4..6].parse::<i64>().unwrap())
                    }
                };
                let local = midnight + chrono::Duration::minutes(minutes);
                for fraction in ["", ".5", ".999999999"] {
                    let s = format!("{}:60{fraction}{offset}", local.format("%Y-%m-%dT%H:%M"));
                    if let Ok(t) = check_timestamp(&s) {
                        let parsed = utc(&t);
                        assert_eq!(parsed, chrono_reads(&s), "{s}");
                        assert!(
                            parsed.unwrap().timestamp_subsec_nanos() >= 1_000_000_000,
                            "{s}"
                        );
                        leaps += 1;
                    }
                }
            }
        }
        assert!(leaps > 100, "only {leaps} leap seconds");
    }

    #[test]
    fn duplicate_keys_keep_the_last_value_or_go_slow() {
        // The walk sees only the last "source"; derive refuses the repeat, so
        // the fast path steps aside and the event is still accepted.
        let json = r#"{"event":"lead","event_id":"e","occurred_at":"2026-11-26T10:00:00Z","user_id":"u","source":1,"source":"web"}"#;
        assert_eq!(parse(json.as_bytes()), None);
        assert_eq!(
            parse_event(json.as_bytes()).unwrap().source.as_deref(),
            Some("web")
        );
        let json = r#"{"event":"lead","event_id":"e","occurred_at":"2026-11-26T10:00:00Z","user_id":"u","source":"web","source":1}"#;
        refuses(json);
        let json = r#"{"event":"lead","event_id":"e","occurred_at":"2026-11-26T10:00:00Z","user_id":"u","context":{"ip":"x","ip":"::1"}}"#;
        assert_eq!(parse(json.as_bytes()), None);
        assert!(parse_event(json.as_bytes()).is_ok());
        // In maps, the last value wins on both paths.
        for json in [
            r#"{"event":"lead","event_id":"e","occurred_at":"2026-11-26T10:00:00Z","user_id":"u","consent":{"ads":"granted","ads":"denied"}}"#,
            r#"{"event":"lead","event_id":"e","occurred_at":"2026-11-26T10:00:00Z","user_id":"u","external_ids":{"crm":"1","crm":"2"}}"#,
            r#"{"event":"lead","event_id":"e","occurred_at":"2026-11-26T10:00:00Z","user_id":"u","properties":{"a":1,"b":2,"a":[3]}}"#,
        ] {
            takes(json);
        }
        // A repeat of a bad value is still bad, even if the last is fine.
        refuses(
            r#"{"event":"lead","event_id":"e","occurred_at":"2026-11-26T10:00:00Z","user_id":"u","consent":{"ads":"granted","ads":"maybe"}}"#,
        );
        // The walk only sees the last one, so this is valid; the fast path
        // refuses the first and steps aside.
        let json = r#"{"event":"lead","event_id":"e","occurred_at":"2026-11-26T10:00:00Z","user_id":"u","consent":{"ads":"maybe","ads":"granted"}}"#;
        assert_eq!(parse(json.as_bytes()), None);
        assert!(parse_event(json.as_bytes()).is_ok());
    }

    #[test]
    fn unknown_fields_are_refused_everywhere() {
        refuses(&with("timestamp", json!("2026-11-26T10:00:00Z")));
        refuses(&with("evnt", json!("x")));
        refuses(&with("click_ids", json!({"fbclid": "x"})));
        refuses(&with("context", json!({"country": "DE"})));
        refuses(&with("items", json!([{"id": "sku", "sku": "x"}])));
        refuses(&with("items", json!([{"name": "no id"}])));
    }

    #[test]
    fn lengths_are_characters_except_where_the_pattern_is_ascii() {
        let e = "é"; // two bytes, one character
        takes(&with("source", json!(e.repeat(64))));
        refuses(&with("source", json!(e.repeat(65))));
        refuses(&with("source", json!("")));
        takes(&with("user_id", json!(e.repeat(256))));
        refuses(&with("user_id", json!("u".repeat(257))));
        refuses(&with("user_id", json!("")));
        takes(&with("order_id", json!("o".repeat(128))));
        refuses(&with("order_id", json!("o".repeat(129))));
        takes(&with("event_id", json!("e".repeat(128))));
        refuses(&with("event_id", json!("e".repeat(129))));
        refuses(&with("event_id", json!(e)));
        takes(&with("phone", json!(format!("+{}", "1".repeat(31)))));
        drops(
            &with("phone", json!(format!("+{}", "1".repeat(32)))),
            "/phone",
        );
        drops(&with("phone", json!("12345")), "/phone");
        takes(&with("email", json!(format!("{}@b.co", "a".repeat(249)))));
        drops(
            &with("email", json!(format!("{}@b.co", "a".repeat(250)))),
            "/email",
        );
        // Counted once trimmed.
        takes(&with("email", json!(format!(" {}@b.co ", "a".repeat(249)))));
        takes(&with(
            "context",
            json!({"user_agent": "", "locale": "en-US"}),
        ));
        takes(&with("context", json!({"user_agent": e.repeat(1024)})));
        refuses(&with("context", json!({"user_agent": "x".repeat(1025)})));
        let long_url = format!("https://a.b/{}", "p".repeat(2048 - 12));
        takes(&with("context", json!({"page_url": long_url})));
        refuses(&with(
            "context",
            json!({"referrer": format!("{long_url}p")}),
        ));
        takes(&with("click_ids", json!({"fbc": "f".repeat(512)})));
        drops(
            &with("click_ids", json!({"fbp": "f".repeat(513)})),
            "/click_ids/fbp",
        );
        drops(&with("click_ids", json!({"gclid": ""})), "/click_ids/gclid");
        takes(&with(
            "items",
            json!([{"id": e.repeat(128), "name": "", "variant": e.repeat(256)}]),
        ));
        refuses(&with("items", json!([{"id": ""}])));
        refuses(&with(
            "items",
            json!([{"id": "x", "brand": "b".repeat(257)}]),
        ));
        refuses(&with("items", json!(vec![json!({"id": "x"}); 201])));
        takes(&with("items", json!(vec![json!({"id": "x"}); 200])));
        let ids: Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        refuses(&with("external_ids", Value::Object(ids.clone())));
        let ids: Map<String, Value> = ids.into_iter().take(16).collect();
        takes(&with("external_ids", Value::Object(ids)));
        drops(
            &with("external_ids", json!({"crm": ""})),
            "/external_ids/crm",
        );
        refuses(&with("external_ids", json!({"crm": 1})));
        refuses(&with("external_ids", json!({"CRM": "1"})));
        refuses(&with("external_ids", json!({"a".repeat(33): "1"})));
    }

    #[test]
    fn formats_use_the_walks_predicates() {
        takes(&with("email_sha256", json!("a".repeat(64))));
        let event = takes(&with("email_sha256", json!("A".repeat(64))));
        assert_eq!(event.email_sha256, Some("a".repeat(64)));
        drops(
            &with("phone_sha256", json!("a".repeat(63))),
            "/phone_sha256",
        );
        refuses(&with("currency", json!("usd")));
        refuses(&with("currency", json!("XXX")));
        drops(&with("email", json!("a@b")), "/email");
        drops(&with("phone", json!("tel:+1650")), "/phone");
        for ip in ["::1", "203.0.113.7", "::ffff:1.2.3.4", " 1.2.3.4\n"] {
            takes(&with("context", json!({ "ip": ip })));
        }
        // A malformed address is left to the reference path, which drops it.
        for ip in ["1.2.3.04", "fe80::1%eth0", "1.2.3", ""] {
            let json = with("context", json!({ "ip": ip }));
            assert_eq!(parse(json.as_bytes()), None, "{json}");
            let event = parse_event(json.as_bytes()).unwrap();
            assert_eq!(event.context, Some(Context::default()), "{json}");
            assert_eq!(event.dropped_hints[0].pointer, "/context/ip");
        }
        refuses(&with("context", json!({"page_url": "example.com/page"})));
        refuses(&with("context", json!({"locale": "EN"})));
        refuses(&with("event", json!("purchse")));
        refuses(&with("event", json!("custom.A")));
        refuses(&with("event", json!(["purchase"])));
        refuses(&with("properties", json!("x")));
        takes(&with(
            "traits",
            json!({"n": 1, "list": [1, "a", {"x": null}], "deep": {"a": {"b": true}}}),
        ));
        takes(&with("metadata", json!({})));
    }

    #[test]
    fn event_level_rules() {
        let lead = |extra: Value| {
            let mut event =
                json!({"event": "lead", "event_id": "e", "occurred_at": "2026-11-26T10:00:00Z"});
            for (k, v) in extra.as_object().unwrap() {
                event[k] = v.clone();
            }
            event.to_string()
        };
        refuses(&lead(json!({})));
        takes(&lead(json!({"anonymous_id": "a"})));
        takes(&lead(
            json!({"user_id": "u", "value": 1, "currency": "EUR"}),
        ));
        refuses(&lead(json!({"user_id": "u", "value": 1})));
        refuses(&lead(json!({"user_id": "u", "currency": "EUR"})));
        for required in ["event", "event_id", "occurred_at"] {
            let mut event = base();
            event.as_object_mut().unwrap().remove(required);
            refuses(&event.to_string());
        }
        for revenue in ["purchase", "subscribe", "renewal", "refund"] {
            let mut event = base();
            event["event"] = json!(revenue);
            takes(&event.to_string());
            for needed in ["value", "currency"] {
                let mut event = event.clone();
                event.as_object_mut().unwrap().remove(needed);
                refuses(&event.to_string());
            }
        }
        takes(&with("event", json!("custom.webinar_registered")));
    }

    #[test]
    fn json_framing_matches_from_slice() {
        let event = base().to_string();
        takes(&format!(" \n\t{event}\r\n "));
        refuses(&format!("{event} x"));
        refuses(&format!("{event}{event}"));
        refuses(&event[..event.len() - 1]);
        refuses("");
        refuses("null");
        // Escapes decode the same way on both paths, keys included.
        takes(
            r#"{"ev\u0065nt":"lead","event_id":"e","occurred_at":"2026-11-26T10:00:00Z","user_id":"\u00e9\n"}"#,
        );
        refuses(
            r#"{"event":"lead","event_id":"e","occurred_at":"2026-11-26T10:00:00Z","user_id":"\ud800"}"#,
        );
        takes(&with("user_id", json!("\u{0}")));
        // Not UTF-8: `from_slice` refuses it inside a string; the fast path
        // refuses the whole record up front.
        let text = base().to_string();
        let mut bytes = text.clone().into_bytes();
        bytes[text.find("u1").unwrap() + 1] = 0xff;
        assert_eq!(parse(&bytes), None);
        assert_eq!(
            parse_event_slow(&bytes).unwrap_err().error_class(),
            "bad_json"
        );
        // Deep nesting inside a free-form object: same recursion limit.
        let nest = |depth: usize| {
            with("properties", json!({})).replace(
                "\"properties\":{}",
                &format!(
                    "\"properties\":{{\"a\":{}1{}}}",
                    "[".repeat(depth),
                    "]".repeat(depth)
                ),
            )
        };
        takes(&nest(100));
        let deep = nest(200);
        assert_eq!(parse(deep.as_bytes()), None);
        assert_eq!(
            parse_event_slow(deep.as_bytes()).unwrap_err().error_class(),
            "bad_json"
        );
    }

    #[test]
    fn every_valid_corpus_event_goes_fast() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/events/corpus.ndjson"
        );
        let corpus = std::fs::read_to_string(path).unwrap();
        let mut valid = 0;
        for line in corpus.lines().filter(|l| !l.trim().is_empty()) {
            let case: Value = serde_json::from_str(line).unwrap();
            let event = case["event"].to_string();
            let bad_ip = case["warnings"]
                .as_array()
                .is_some_and(|w| w.contains(&json!("/context/ip")));
            if case["valid"] == true && bad_ip {
                // Left to the reference path (see `ip`).
                assert_eq!(parse(event.as_bytes()), None);
                assert!(parse_event(event.as_bytes()).is_ok());
            } else if case["valid"] == true {
                takes(&event);
                valid += 1;
            } else {
                refuses(&event);
            }
        }
        assert!(valid >= 10, "{valid}");
    }
}
