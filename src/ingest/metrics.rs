//! Ingest metrics (prometheus default registry, served on `/metrics`).

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};

use prometheus::{IntCounterVec, register_int_counter_vec};

static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "switchyard_ingest_requests_total",
        "HTTP requests to the ingest gateway by route and status code",
        &["route", "status"]
    )
    .expect("metric registers once")
});

static EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "switchyard_ingest_events_total",
        "Events received by the ingest gateway by source and outcome (accepted, rejected, unmapped)",
        &["source", "outcome"]
    )
    .expect("metric registers once")
});

static UNMAPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "switchyard_ingest_unmapped_events_total",
        "Vendor events accepted but not published because the mapping table has no row for their name",
        &["source", "name"]
    )
    .expect("metric registers once")
});

/// Distinct unmapped names seen; a label per name beyond this would let
/// senders grow the metric without bound.
const MAX_UNMAPPED_NAMES: usize = 500;
static SEEN_UNMAPPED: LazyLock<Mutex<HashSet<String>>> =
    LazyLock::new(|| Mutex::new(HashSet::new()));

pub fn request(route: &str, status: u16) {
    REQUESTS
        .with_label_values(&[route, &status.to_string()])
        .inc();
}

pub fn events(source: &str, outcome: &str, n: usize) {
    if n > 0 {
        EVENTS
            .with_label_values(&[source, outcome])
            .inc_by(n as u64);
    }
}

/// Counts an unmapped name and logs it the first time it is seen.
pub fn unmapped(source: &str, via: &str, name: &str) {
    let label = {
        let mut seen = SEEN_UNMAPPED.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(name) {
            name.to_string()
        } else if seen.len() < MAX_UNMAPPED_NAMES {
            seen.insert(name.to_string());
            tracing::warn!(
                source,
                via,
                name,
                "event name not in the mapping table: accepted, not published"
            );
            name.to_string()
        } else {
            "(other)".to_string()
        }
    };
    UNMAPPED.with_label_values(&[source, &label]).inc();
    events(source, "unmapped", 1);
}
