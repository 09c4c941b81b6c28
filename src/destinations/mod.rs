//! Vendor destinations, one file each: limits, `map` and `classify`.

pub mod ga4;
pub mod google_ads;
pub mod webhook;

use std::sync::Arc;

use crate::config::{DestinationConfig, DestinationKind};
use crate::sink::destination::Destination;

/// The destination implementation for a configured destination; `None` for a
/// type whose vendor mapping is not built yet.
pub fn build(config: &DestinationConfig) -> Option<Arc<dyn Destination>> {
    match &config.kind {
        DestinationKind::Webhook(w) => Some(Arc::new(webhook::Webhook::new(w.clone()))),
        DestinationKind::GoogleAds(g) => Some(Arc::new(google_ads::GoogleAds::new(g.clone()))),
        DestinationKind::Ga4(g) => Some(Arc::new(ga4::Ga4::new(g.clone()))),
        DestinationKind::MetaCapi(_) | DestinationKind::TiktokEvents(_) => None,
    }
}
