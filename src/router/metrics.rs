//! The router's Prometheus metrics (default registry).

use std::sync::LazyLock;

use prometheus::{
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, register_int_counter,
    register_int_counter_vec, register_int_gauge, register_int_gauge_vec,
};

fn counter(name: &str, help: &str) -> IntCounter {
    register_int_counter!(name, help).expect("metric registers once")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register_int_counter_vec!(name, help, labels).expect("metric registers once")
}

pub static CONSUMED: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "switchyard_router_records_consumed_total",
        "Records read from the canonical topic.",
    )
});
pub static INVALID: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "switchyard_router_records_invalid_total",
        "Records dead-lettered by the router, by error class.",
        &["class"],
    )
});
pub static REROUTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "switchyard_router_records_rerouted_total",
        "Records not on their event_id's partition, re-published there, by reason (wrong_key, wrong_partition).",
        &["reason"],
    )
});
pub static HINTS_DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "switchyard_hints_dropped_total",
        "Identity hints left out of routed events as malformed, by field.",
        &["field"],
    )
});
pub static DUPLICATES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "switchyard_router_duplicates_dropped_total",
        "Events dropped as duplicates by event_id.",
    )
});
pub static CONSENT_DENIED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "switchyard_router_consent_denied_total",
        "Events not sent to a destination for lack of consent.",
        &["destination", "category"],
    )
});
pub static ROUTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "switchyard_router_events_routed_total",
        "Events written to a destination's delivery topic.",
        &["destination"],
    )
});
pub static TRANSACTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "switchyard_router_batches_total",
        "Router batches by result (committed, aborted).",
        &["result"],
    )
});
pub static LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "switchyard_router_consumer_lag_records",
        "Records between the last processed offset and the partition's end.",
        &["partition"]
    )
    .expect("metric registers once")
});
pub static DEDUP_KEYS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "switchyard_router_dedup_keys",
        "Event ids remembered for dedup."
    )
    .expect("metric registers once")
});
pub static DEDUP_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "switchyard_router_dedup_bytes",
        "Heap bytes held by dedup state."
    )
    .expect("metric registers once")
});
pub static IDENTITIES: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "switchyard_router_identity_entries",
        "Entries in the identity table."
    )
    .expect("metric registers once")
});
