//! The record the router writes to `switchyard.deliver.<destination>` and a
//! sink reads: one canonical event, already enriched, consent-checked and
//! PII-shaped for exactly one destination.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::CanonicalEvent;

pub mod dead_letter;

/// Current version of the delivery record; bumped on incompatible changes.
pub const DELIVERY_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    pub v: u32,
    /// The destination's configured name (`[destinations.NAME]`).
    pub destination: String,
    /// The vendor's event name after the presets and the destination's overrides.
    pub name: String,
    /// The event as this destination may see it: identity-enriched, and for
    /// ad platforms with raw email/phone replaced by the vendor's hashes.
    pub event: CanonicalEvent,
    /// Where the canonical record was read, for dead letters and tracing.
    pub origin: Origin,
    pub routed_at: DateTime<Utc>,
}

/// Where the canonical record was read (same fields, same JSON).
pub type Origin = crate::kafka::Position;

impl Delivery {
    /// The Kafka key of a delivery record: the person, so one person's
    /// deliveries stay in order within a partition.
    pub fn key(&self) -> &str {
        self.event.anchor()
    }

    /// The idempotency key every vendor request carries for this event.
    pub fn idempotency_key(&self) -> &str {
        &self.event.event_id
    }
}

/// The event_id in a record's payload: a delivery record's (sinks' dead
/// letters and retries) or a canonical event's (the router's dead letters).
pub fn event_id_in(payload: Option<&[u8]>) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(payload?).ok()?;
    v.pointer("/event/event_id")
        .or_else(|| v.get("event_id"))
        .and_then(|id| id.as_str())
        .map(str::to_string)
}
