//! Helpers more than one vendor file uses: what may be sent as a hash,
//! refusals every ad platform shares, and packing serialised events into
//! request bodies under count and byte limits.

use std::ops::Range;
use std::time::Duration;

use chrono::{DateTime, Utc};

use serde_json::{Map, Value, json};

use crate::event::normalize::hash_identifier;
use crate::event::{CanonicalEvent, Item};
use crate::settings::is_consent_category;
use crate::sink::destination::{Refusal, Request};

/// How far ahead of our clock an event time may be before it is refused:
/// vendors reject future times and document no tolerance, and publishers'
/// clocks drift.
pub const FUTURE_TOLERANCE: Duration = Duration::from_secs(5 * 60);

pub(crate) fn future_refusal(occurred_at: DateTime<Utc>, now: DateTime<Utc>) -> Option<Refusal> {
    let ahead = (occurred_at - now).to_std().ok()?;
    (ahead > FUTURE_TOLERANCE).then(|| Refusal {
        class: "future_event_time",
        reason: format!(
            "occurred_at is {} in the future; vendors reject future event times (tolerance {})",
            humantime::format_duration(Duration::from_secs(ahead.as_secs())),
            humantime::format_duration(FUTURE_TOLERANCE)
        ),
    })
}

/// Checks the two settings that name the consent categories Google's
/// `ad_user_data` and `ad_personalization` signals follow ("" = never sent).
pub(crate) fn check_ad_consent(
    user_data: &str,
    personalization: &str,
    bad: &mut impl FnMut(&str, String),
) {
    for (k, c) in [
        ("consent_ad_user_data", user_data),
        ("consent_ad_personalization", personalization),
    ] {
        if !c.is_empty() && !is_consent_category(c) {
            bad(
                k,
                format!("`{c}` is not a consent category (or \"\" for never)"),
            );
        }
    }
}

/// An item as the product-analytics vendors take it: the id under
/// `id_key`, the other fields under their canonical names, absent ones left
/// out.
pub(crate) fn item_object(it: &Item, id_key: &str) -> Value {
    let mut m = Map::new();
    m.insert(id_key.into(), json!(it.id));
    for (k, v) in [
        ("name", &it.name),
        ("category", &it.category),
        ("brand", &it.brand),
        ("variant", &it.variant),
    ] {
        if let Some(v) = v {
            m.insert(k.into(), json!(v));
        }
    }
    if let Some(price) = it.price {
        m.insert("price".into(), json!(price));
    }
    if let Some(q) = it.quantity {
        m.insert("quantity".into(), json!(q));
    }
    Value::Object(m)
}

/// The commerce fields the analytics and CRM vendors take as event
/// properties, under the names of Segment's e-commerce spec their own
/// templates use: the value under `value_key`, `currency`, `order_id`, and
/// the items as `products`.
pub(crate) fn commerce_properties(
    ev: &CanonicalEvent,
    value_key: &str,
    into: &mut Map<String, Value>,
) {
    if let Some(v) = ev.value {
        into.insert(value_key.into(), json!(v));
    }
    if let Some(c) = &ev.currency {
        into.insert("currency".into(), json!(c));
    }
    if let Some(o) = &ev.order_id {
        into.insert("order_id".into(), json!(o));
    }
    if !ev.items.is_empty() {
        let products = ev
            .items
            .iter()
            .map(|it| item_object(it, "product_id"))
            .collect();
        into.insert("products".into(), Value::Array(products));
    }
}

/// A SHA-256 digest as vendors take it (64 lowercase hex), or `None` for
/// anything else, which must never be sent: it may be raw contact data.
pub(crate) fn vendor_hash(s: &str) -> Option<String> {
    let s = s.trim();
    (s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| s.to_ascii_lowercase())
}

/// Refuses an event whose contact "hash" is not a digest, so that a router
/// bug can never put raw email or phone on the wire.
pub(crate) fn hash_refusal(ev: &CanonicalEvent) -> Option<Refusal> {
    for (field, value) in [
        ("email_sha256", &ev.email_sha256),
        ("phone_sha256", &ev.phone_sha256),
    ] {
        if value.as_deref().is_some_and(|v| vendor_hash(v).is_none()) {
            return Some(Refusal {
                class: "unhashed_identifier",
                reason: format!("{field} is not a SHA-256 hex digest; it is never sent as is"),
            });
        }
    }
    None
}

/// SHA-256 of each trimmed id, user_id first, without repeats.
pub(crate) fn hashed_external_ids(ev: &CanonicalEvent) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for raw in ev.user_id.iter().chain(ev.external_ids.values()) {
        if let Some(h) = hash_identifier(raw)
            && !out.contains(&h)
        {
            out.push(h);
        }
    }
    out
}

/// Contiguous runs of `events` (serialised) that fit `max_events` and
/// `max_bytes` inside an envelope of `overhead` bytes. An event too large
/// even alone travels alone and the vendor's answer decides its fate.
pub(crate) fn pack(
    events: &[Vec<u8>],
    overhead: usize,
    max_events: usize,
    max_bytes: usize,
) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = overhead;
    for (i, e) in events.iter().enumerate() {
        let n = i - start;
        let add = e.len() + usize::from(n > 0);
        if n > 0 && (n >= max_events || bytes + add > max_bytes) {
            out.push(start..i);
            start = i;
            bytes = overhead + e.len();
        } else {
            bytes += add;
        }
    }
    if start < events.len() {
        out.push(start..events.len());
    }
    out
}

/// `envelope` (serialised with an empty `data` array as its last field,
/// so it ends in `[]}`) with `events` put inside that array.
pub(crate) fn wrap(envelope: &[u8], events: &[Vec<u8>]) -> Vec<u8> {
    debug_assert!(envelope.ends_with(b"[]}"));
    let head = &envelope[..envelope.len() - 2];
    let mut body =
        Vec::with_capacity(envelope.len() + events.iter().map(|e| e.len() + 1).sum::<usize>());
    body.extend_from_slice(head);
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(e);
    }
    body.extend_from_slice(b"]}");
    body
}

/// One request per run of `events` that fits `max_events` and `max_bytes`,
/// each body being `envelope` with its run inside (see [`wrap`]).
pub(crate) fn requests(
    url: &str,
    headers: &[(String, String)],
    envelope: &[u8],
    events: &[Vec<u8>],
    max_events: usize,
    max_bytes: usize,
) -> Vec<Request> {
    pack(events, envelope.len(), max_events, max_bytes)
        .into_iter()
        .map(|range| {
            let body = wrap(envelope, &events[range.clone()]);
            Request::post("events", url, headers.to_vec(), body, range)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_packed_under_both_limits_and_wrapped_in_the_envelope() {
        let sizes = vec![vec![b'x'; 40]; 5];
        // Envelope 10 + 40 + (1 + 40) = 91 fits 100; a third would not.
        assert_eq!(pack(&sizes, 10, 1000, 100), vec![0..2, 2..4, 4..5]);
        // An event larger than the limit alone still travels, alone.
        assert_eq!(
            pack(&sizes, 10, 1000, 20),
            vec![0..1, 1..2, 2..3, 3..4, 4..5]
        );
        assert_eq!(pack(&sizes, 10, 2, 10_000), vec![0..2, 2..4, 4..5]);
        assert_eq!(pack(&[], 10, 1000, 100), Vec::<Range<usize>>::new());
        assert_eq!(
            wrap(b"{\"data\":[]}", &[b"1".to_vec(), b"2".to_vec()]),
            b"{\"data\":[1,2]}"
        );
        let reqs = requests("http://v/e", &[], b"{\"data\":[]}", &sizes, 2, 10_000);
        assert_eq!(reqs.len(), 3);
        assert_eq!(reqs[2].rows, vec![4]);
        assert_eq!(
            reqs[2].body,
            [b"{\"data\":[".as_slice(), &[b'x'; 40], b"]}"].concat()
        );
    }
}
