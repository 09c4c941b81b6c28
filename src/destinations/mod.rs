//! Vendor destinations, one file each: limits, `map` and `classify`.

pub mod ga4;
pub mod google_ads;
pub mod meta_capi;
mod shared;
#[cfg(test)]
pub(crate) mod test_support;
pub mod tiktok_events;
pub mod webhook;

use std::sync::Arc;

use crate::config::{DestinationConfig, DestinationKind};
use crate::sink::destination::Destination;

/// The destination implementation for a configured destination.
pub fn build(config: &DestinationConfig) -> Arc<dyn Destination> {
    match &config.kind {
        DestinationKind::Webhook(w) => Arc::new(webhook::Webhook::new(w.clone())),
        DestinationKind::MetaCapi(m) => Arc::new(meta_capi::MetaCapi::new(m.clone())),
        DestinationKind::TiktokEvents(t) => Arc::new(tiktok_events::TiktokEvents::new(t.clone())),
        DestinationKind::GoogleAds(g) => Arc::new(google_ads::GoogleAds::new(g.clone())),
        DestinationKind::Ga4(g) => Arc::new(ga4::Ga4::new(g.clone())),
    }
}
