//! `[destinations.NAME.delivery]`: how a sink batches, retries, paces and
//! orders one destination's deliveries. Every key has a default, so the table
//! is optional.

use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;

use crate::settings::{Problem, de_duration};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySettings {
    /// Most events in one batch; the destination's own limit wins when lower.
    pub batch_max_events: usize,
    /// Most payload bytes in one batch; the destination's own limit wins when lower.
    pub batch_max_bytes: usize,
    /// How long a partly filled batch waits for more events.
    #[serde(deserialize_with = "de_duration")]
    pub linger: Duration,
    /// Batches sent concurrently to this destination.
    pub max_in_flight: usize,
    /// Requests of one batch sent concurrently (vendors that take one
    /// person per request make many); one person's still go in order.
    pub max_concurrent_requests: usize,
    #[serde(deserialize_with = "de_duration")]
    pub request_timeout: Duration,
    pub retry: RetrySettings,
    pub rate_limit: RateLimitSettings,
    /// While one of a person's events waits to retry, their later events wait
    /// behind it (CRMs apply updates in arrival order; ad platforms do not care).
    pub ordering: bool,
    /// With ordering: the most parked events (on the retry topic, with
    /// people waiting behind them) one instance tracks. At the limit it
    /// reads no new deliveries until some are resolved; the backlog waits on
    /// the deliver topic instead of in memory.
    pub max_parked: usize,
    /// How long a partition being handed to another instance (rebalance)
    /// waits for its batches in flight before it is given up without them.
    #[serde(deserialize_with = "de_duration")]
    pub handover_timeout: Duration,
    /// Destinations without vendor dedup: how long a delivered event_id is
    /// remembered, so a resend of it is skipped.
    #[serde(deserialize_with = "de_duration")]
    pub ledger_window: Duration,
    /// Destinations without vendor dedup: the most event_ids remembered
    /// (80–100 bytes each); the oldest are forgotten first.
    pub ledger_max_entries: usize,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            batch_max_events: 500,
            batch_max_bytes: 1024 * 1024,
            linger: Duration::from_millis(100),
            max_in_flight: 4,
            max_concurrent_requests: 8,
            request_timeout: Duration::from_secs(10),
            retry: RetrySettings::default(),
            rate_limit: RateLimitSettings::default(),
            ordering: false,
            max_parked: 100_000,
            handover_timeout: Duration::from_secs(15),
            // The router's dedup window, the span in which a resend is likely.
            ledger_window: Duration::from_secs(48 * 3600),
            ledger_max_entries: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Attempts per event (the first send included) before it is dead-lettered.
    pub max_attempts: u32,
    /// Time since the first attempt after which an event is dead-lettered.
    #[serde(deserialize_with = "de_duration")]
    pub max_elapsed: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub initial_backoff: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub max_backoff: Duration,
    /// A wait longer than this moves the event to `<prefix>.retry.<NAME>`
    /// instead of holding it (and its partition's offsets) in memory.
    #[serde(deserialize_with = "de_duration")]
    pub park_after: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_attempts: 12,
            max_elapsed: Duration::from_secs(24 * 3600),
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(600),
            park_after: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSettings {
    pub requests_per_second: Option<NonZeroU32>,
    pub events_per_second: Option<NonZeroU32>,
}

impl DeliverySettings {
    /// Range checks; `key` is the table's dotted key.
    pub fn check(&self, key: &str, problems: &mut Vec<Problem>) {
        let mut bad = |k: &str, message: &str| {
            problems.push(Problem {
                key: format!("{key}.{k}"),
                message: message.to_string(),
            })
        };
        if !(1..=100_000).contains(&self.batch_max_events) {
            bad("batch_max_events", "must be 1..=100000");
        }
        if self.batch_max_bytes < 1024 {
            bad("batch_max_bytes", "must be at least 1024");
        }
        if self.linger > Duration::from_secs(60) {
            bad("linger", "must be at most 60s");
        }
        if !(1..=256).contains(&self.max_in_flight) {
            bad("max_in_flight", "must be 1..=256");
        }
        if !(1..=256).contains(&self.max_concurrent_requests) {
            bad("max_concurrent_requests", "must be 1..=256");
        }
        if self.request_timeout < Duration::from_millis(10) {
            bad("request_timeout", "must be at least 10ms");
        }
        if self.max_parked == 0 {
            bad("max_parked", "must be at least 1");
        }
        if self.handover_timeout > Duration::from_secs(240) {
            // librdkafka's default max.poll.interval.ms is 300 s: a longer
            // wait in the rebalance callback would get the member evicted.
            bad("handover_timeout", "must be at most 240s");
        }
        if self.ledger_window < Duration::from_secs(60) {
            bad("ledger_window", "must be at least 1m");
        }
        if self.ledger_max_entries < 1000 {
            bad("ledger_max_entries", "must be at least 1000");
        }
        let r = &self.retry;
        if r.max_attempts == 0 {
            bad("retry.max_attempts", "must be at least 1");
        }
        if r.initial_backoff.is_zero() {
            bad("retry.initial_backoff", "must be more than 0s");
        }
        if r.max_backoff < r.initial_backoff {
            bad(
                "retry.max_backoff",
                "must be at least retry.initial_backoff",
            );
        }
        if r.max_elapsed < r.initial_backoff {
            bad(
                "retry.max_elapsed",
                "must be at least retry.initial_backoff",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, ConfigError};

    fn parse(delivery: &str) -> Result<Config, ConfigError> {
        let text = format!(
            "[destinations.hook]\ntype = \"webhook\"\nurl = \"https://example.com/hook\"\nsecret = \"0123456789abcdef\"\nconsent = \"analytics\"\n{delivery}"
        );
        Config::parse(&text, Path::new("t.toml"), &|_| None)
    }

    fn keys(delivery: &str) -> Vec<String> {
        match parse(delivery) {
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.into_iter().map(|p| p.key).collect()
            }
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn defaults_apply_without_the_table() {
        let c = parse("").unwrap();
        let d = &c.destinations["hook"].delivery;
        assert_eq!(d, &super::DeliverySettings::default());
    }

    #[test]
    fn nested_table_is_read() {
        let c = parse(
            "[destinations.hook.delivery]\nbatch_max_events = 7\nlinger = \"5ms\"\nordering = true\nledger_window = \"2h\"\nhandover_timeout = \"3s\"\n[destinations.hook.delivery.retry]\npark_after = \"2m\"\n[destinations.hook.delivery.rate_limit]\nrequests_per_second = 3\n",
        )
        .unwrap();
        let d = &c.destinations["hook"].delivery;
        assert_eq!(d.batch_max_events, 7);
        assert_eq!(d.linger.as_millis(), 5);
        assert!(d.ordering);
        assert_eq!(d.ledger_window.as_secs(), 7200);
        assert_eq!(d.handover_timeout.as_secs(), 3);
        assert_eq!(d.ledger_max_entries, 1_000_000);
        assert_eq!(d.max_parked, 100_000);
        assert_eq!(d.retry.park_after.as_secs(), 120);
        assert_eq!(d.rate_limit.requests_per_second.unwrap().get(), 3);
        assert_eq!(d.max_in_flight, 4);
    }

    #[test]
    fn problems_name_the_dotted_key() {
        assert_eq!(
            keys("[destinations.hook.delivery]\nbatch_max_events = 0\n"),
            ["destinations.hook.delivery.batch_max_events"]
        );
        assert_eq!(
            keys("[destinations.hook.delivery]\nbatch_max_event = 10\n"),
            ["destinations.hook.delivery.batch_max_event"]
        );
        assert_eq!(
            keys("[destinations.hook.delivery.retry]\nmax_elapsed = \"soon\"\n"),
            ["destinations.hook.delivery.retry.max_elapsed"]
        );
        assert_eq!(
            keys("[destinations.hook.delivery]\nledger_window = \"5s\"\n"),
            ["destinations.hook.delivery.ledger_window"]
        );
        assert_eq!(
            keys("[destinations.hook.delivery.retry]\nmax_attempts = 0\n"),
            ["destinations.hook.delivery.retry.max_attempts"]
        );
    }
}
