//! Vendor destinations, one file each: limits, `map` and `classify`.

pub mod webhook;

use std::sync::Arc;

use crate::config::{DestinationConfig, DestinationKind};
use crate::sink::destination::Destination;

/// The destination implementation for a configured destination; `None` for a
/// type whose vendor mapping is not built yet.
pub fn build(config: &DestinationConfig) -> Option<Arc<dyn Destination>> {
    match &config.kind {
        DestinationKind::Webhook(w) => Some(Arc::new(webhook::Webhook::new(w.clone()))),
        DestinationKind::MetaCapi(_)
        | DestinationKind::TiktokEvents(_)
        | DestinationKind::GoogleAds(_)
        | DestinationKind::Ga4(_) => None,
    }
}
