//! Vendor destinations, one file each: limits, `map` and `classify`.

pub mod meta_capi;
pub mod tiktok_events;
pub mod webhook;

use std::sync::Arc;

use crate::config::{DestinationConfig, DestinationKind};
use crate::sink::destination::Destination;

/// The destination implementation for a configured destination; `None` for a
/// type whose vendor mapping is not built yet.
pub fn build(config: &DestinationConfig) -> Option<Arc<dyn Destination>> {
    match &config.kind {
        DestinationKind::Webhook(w) => Some(Arc::new(webhook::Webhook::new(w.clone()))),
        DestinationKind::MetaCapi(m) => Some(Arc::new(meta_capi::MetaCapi::new(m.clone()))),
        DestinationKind::TiktokEvents(t) => {
            Some(Arc::new(tiktok_events::TiktokEvents::new(t.clone())))
        }
        DestinationKind::GoogleAds(_) | DestinationKind::Ga4(_) => None,
    }
}
