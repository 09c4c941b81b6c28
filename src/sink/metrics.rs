//! Sink metrics in the prometheus default registry.

use std::sync::LazyLock;

use prometheus::{
    GaugeVec, HistogramVec, IntCounterVec, IntGaugeVec, exponential_buckets, register_gauge_vec,
    register_histogram_vec, register_int_counter_vec, register_int_gauge_vec,
};

pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "switchyard_sink_requests_total",
        "Vendor HTTP requests by destination and status class (2xx, 4xx, 5xx, network)",
        &["destination", "status_class"]
    )
    .expect("metric registers once")
});

pub static EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "switchyard_sink_events_total",
        "Events by destination and outcome (delivered, retried, parked, requeued, rejected, skipped_duplicate)",
        &["destination", "outcome"]
    )
    .expect("metric registers once")
});

pub static REQUEST_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "switchyard_sink_request_duration_seconds",
        "Vendor request latency",
        &["destination"],
        exponential_buckets(0.001, 2.0, 16).expect("static buckets")
    )
    .expect("metric registers once")
});

pub static BATCH_EVENTS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "switchyard_sink_batch_events",
        "Events per batch sent",
        &["destination"],
        exponential_buckets(1.0, 2.0, 14).expect("static buckets")
    )
    .expect("metric registers once")
});

pub static RETRY_QUEUE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "switchyard_sink_retry_queue_events",
        "Events waiting in memory for their next attempt or their due time",
        &["destination"]
    )
    .expect("metric registers once")
});

pub static PARKED_EVENTS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "switchyard_sink_parked_events",
        "With ordering: events on the retry topic whose people wait behind them, tracked by this instance (bounded by max_parked)",
        &["destination"]
    )
    .expect("metric registers once")
});

pub static DLQ_WRITES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "switchyard_dlq_writes_total",
        "Dead letters written by the sink, by destination and error class",
        &["destination", "error_class"]
    )
    .expect("metric registers once")
});

pub static PACE_SHARE: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        "switchyard_sink_pace_share",
        "Share of the configured rate limits in use (1 = full; halved by each throttle, restored by successes)",
        &["destination"]
    )
    .expect("metric registers once")
});

pub static LEDGER_INDEX: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "switchyard_sink_ledger_index_events",
        "Delivered event ids remembered to skip resends (destinations without vendor dedup)",
        &["destination"]
    )
    .expect("metric registers once")
});

pub static LEDGER_EVICTIONS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "switchyard_sink_ledger_index_evicted",
        "Delivered event ids forgotten before their window ended to stay within ledger_max_entries, since start",
        &["destination"]
    )
    .expect("metric registers once")
});

pub static CONSUMER_LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "switchyard_sink_consumer_lag_records",
        "Records on the deliver and retry topics not yet read by this sink (librdkafka statistics)",
        &["destination", "topic"]
    )
    .expect("metric registers once")
});

pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
