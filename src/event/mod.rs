//! Canonical events: the typed model, validation against
//! `schemas/canonical-event.v1.json`, and identifier normalisation/hashing.

pub mod model;
pub mod normalize;
pub mod validate;

pub use model::{
    CanonicalEvent, ClickIds, ClickKind, ConsentState, Context, DroppedHint, EventName, Item,
};
pub use validate::{
    InvalidEvent, NdjsonSummary, SCHEMA_JSON, Violation, check_ndjson, check_value, parse_event,
    validate_value,
};
