//! `[ingest]`: where the gateway listens, its limits, and the keys that may
//! publish through it.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::config::check_topic_name;
use crate::settings::{Problem, Secret};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    pub listen: SocketAddr,
    /// Largest accepted request body, after gzip decompression too.
    pub body_limit_bytes: usize,
    /// Events per second one key may publish (sustained); 0 switches the limit off.
    pub rate_limit_per_second: u32,
    /// Events one key may publish at once above the sustained rate; also the
    /// largest batch a rate-limited key can send.
    pub rate_limit_burst: u32,
    /// How far `X-Switchyard-Timestamp` on `/segment/events` may be from now.
    #[serde(deserialize_with = "crate::settings::de_duration")]
    pub timestamp_skew: Duration,
    /// Refuse `/segment/events` calls without `X-Switchyard-Timestamp`
    /// (replay protection for senders that can set it).
    pub require_timestamp: bool,
    /// Longest wait for the broker's ack before answering 503.
    #[serde(deserialize_with = "crate::settings::de_duration")]
    pub produce_timeout: Duration,
    /// Requests in flight at once; above it the gateway answers 503 with
    /// `Retry-After` at once. Each holds up to twice `body_limit_bytes`
    /// (the body as sent and inflated), which bounds the gateway's memory.
    pub max_concurrent_requests: usize,
    /// Longest time to receive a request body; a client that stalls is
    /// answered 408 and its request slot freed.
    #[serde(deserialize_with = "crate::settings::de_duration")]
    pub body_read_timeout: Duration,
    /// Longest time for a whole request, body and broker ack included (408).
    #[serde(deserialize_with = "crate::settings::de_duration")]
    pub request_timeout: Duration,
    /// Topic that staging keys publish to. Without it staging keys are
    /// refused: staging traffic never reaches the canonical topic, whose
    /// consumers deliver to live destinations.
    pub staging_topic: Option<String>,
    pub keys: Vec<IngestKey>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            body_limit_bytes: 1024 * 1024,
            rate_limit_per_second: 10_000,
            rate_limit_burst: 20_000,
            timestamp_skew: Duration::from_secs(300),
            require_timestamp: false,
            produce_timeout: Duration::from_secs(5),
            max_concurrent_requests: 256,
            body_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            staging_topic: None,
            keys: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Environment {
    Production,
    Staging,
}

impl Environment {
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Production => "production",
            Environment::Staging => "staging",
        }
    }
}

/// The endpoint families a key can be allowed to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// `POST /v1/events`
    Canonical,
    /// `POST /segment/events` (webhook) and the Segment HTTP Tracking API.
    Segment,
    /// `POST /mixpanel/track`
    Mixpanel,
    /// `POST /posthog/capture`, `/posthog/batch`
    Posthog,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Canonical => "canonical",
            Route::Segment => "segment",
            Route::Mixpanel => "mixpanel",
            Route::Posthog => "posthog",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestKey {
    /// Bearer key (`/v1/events`), Segment write key (Basic-auth user),
    /// Mixpanel project token or PostHog api_key, depending on the route.
    pub key: Secret,
    /// Becomes the events' `source` and the `source` label of metrics.
    pub source: String,
    pub environment: Environment,
    /// Routes this key may use; empty = all of them.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Shared secret of a Segment webhook destination (`X-Signature`).
    pub segment_shared_secret: Option<Secret>,
    /// `client` for a key that ships in browsers or apps (Segment write
    /// keys, Mixpanel tokens and PostHog api keys usually do): anyone can
    /// send with it, so its events set no identity facts and dedup among
    /// themselves only. See docs/decisions/0002.
    #[serde(default)]
    pub trust: Trust,
}

/// Whether whoever holds a key is known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trust {
    /// Held by the operator's own services.
    #[default]
    Server,
    /// Public by design.
    Client,
}

impl IngestKey {
    pub fn allows(&self, route: Route) -> bool {
        self.routes.is_empty() || self.routes.contains(&route)
    }
}

impl IngestConfig {
    pub(crate) fn check(&self, problems: &mut Vec<Problem>) {
        let mut bad = |key: String, message: String| problems.push(Problem { key, message });
        if self.body_limit_bytes < 1024 {
            bad(
                "ingest.body_limit_bytes".into(),
                "must be at least 1024".into(),
            );
        }
        if self.rate_limit_per_second > 0 && self.rate_limit_burst == 0 {
            bad(
                "ingest.rate_limit_burst".into(),
                "must be at least 1 when rate_limit_per_second is set".into(),
            );
        }
        if self.produce_timeout < Duration::from_millis(100) {
            bad(
                "ingest.produce_timeout".into(),
                "must be at least 100ms".into(),
            );
        }
        if self.max_concurrent_requests == 0 {
            bad(
                "ingest.max_concurrent_requests".into(),
                "must be at least 1".into(),
            );
        }
        if self.body_read_timeout < Duration::from_millis(100) {
            bad(
                "ingest.body_read_timeout".into(),
                "must be at least 100ms".into(),
            );
        }
        if self.request_timeout <= self.body_read_timeout + self.produce_timeout {
            // Otherwise a slow body or a slow broker would be cut off by the
            // request timeout before its own, more telling, answer.
            bad(
                "ingest.request_timeout".into(),
                "must be longer than body_read_timeout + produce_timeout".into(),
            );
        }
        if let Some(t) = &self.staging_topic
            && let Err(why) = check_topic_name(t)
        {
            bad("ingest.staging_topic".into(), why);
        }
        let mut seen = std::collections::HashSet::new();
        let mut trust_of = std::collections::HashMap::new();
        for (i, k) in self.keys.iter().enumerate() {
            let key = |field: &str| format!("ingest.keys[{i}].{field}");
            if k.key.expose().len() < 16 {
                bad(key("key"), "must be at least 16 characters".into());
            } else if !seen.insert(k.key.expose()) {
                bad(key("key"), "the same key is configured twice".into());
            }
            if k.source.is_empty() || k.source.len() > 64 {
                bad(key("source"), "must be 1-64 characters".into());
            }
            // The router knows an event's key only by its source.
            if *trust_of.entry(k.source.as_str()).or_insert(k.trust) != k.trust {
                bad(
                    key("trust"),
                    format!(
                        "another key of source `{}` has another trust; the router tells keys apart by source",
                        k.source
                    ),
                );
            }
            if k.environment == Environment::Staging && self.staging_topic.is_none() {
                bad(
                    key("environment"),
                    "a staging key needs ingest.staging_topic (staging events never go to the canonical topic)".into(),
                );
            }
            if let Some(s) = &k.segment_shared_secret
                && s.expose().len() < 16
            {
                bad(
                    key("segment_shared_secret"),
                    "must be at least 16 characters".into(),
                );
            }
        }
    }

    /// Sources whose keys are public: their events set no identity facts
    /// and dedup among themselves only.
    pub fn client_sources(&self) -> std::collections::HashSet<Box<str>> {
        self.keys
            .iter()
            .filter(|k| k.trust == Trust::Client)
            .map(|k| k.source.as_str().into())
            .collect()
    }

    /// The topic a key's events go to.
    pub fn topic_for<'a>(&'a self, canonical: &'a str, env: Environment) -> Option<&'a str> {
        match env {
            Environment::Production => Some(canonical),
            Environment::Staging => self.staging_topic.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, ConfigError};

    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let env = |name: &str| (name == "CHECKOUT_KEY").then(|| "ck_0123456789abcdef".to_string());
        Config::parse(text, Path::new("test.toml"), &env)
    }

    #[test]
    fn keys_parse_with_env_secrets() {
        let c = parse(
            r#"
            [ingest]
            listen = "0.0.0.0:8080"
            timestamp_skew = "2m"
            staging_topic = "events.staging"
            [[ingest.keys]]
            key = "${CHECKOUT_KEY}"
            source = "checkout-api"
            environment = "production"
            routes = ["canonical", "segment"]
            [[ingest.keys]]
            key = "st_0123456789abcdef"
            source = "checkout-staging"
            environment = "staging"
            "#,
        )
        .unwrap();
        let i = &c.ingest;
        assert_eq!(i.timestamp_skew, Duration::from_secs(120));
        assert_eq!(i.keys[0].key.expose(), "ck_0123456789abcdef");
        assert!(i.keys[0].allows(Route::Segment) && !i.keys[0].allows(Route::Posthog));
        assert!(i.keys[1].allows(Route::Posthog));
        assert_eq!(
            i.topic_for("events.canonical", Environment::Staging),
            Some("events.staging")
        );
        assert!(!format!("{c:?}").contains("ck_0123456789abcdef"));
    }

    #[test]
    fn keys_of_one_source_agree_on_trust() {
        let text = |trust: &str| {
            format!(
                "[[ingest.keys]]\nkey = \"srv_0123456789abcdef\"\nsource = \"web\"\nenvironment = \"production\"\n\
                 [[ingest.keys]]\nkey = \"pub_0123456789abcdef\"\nsource = \"web\"\nenvironment = \"production\"\ntrust = \"{trust}\"\n"
            )
        };
        let Err(ConfigError::Invalid { problems, .. }) = parse(&text("client")) else {
            panic!("accepted")
        };
        assert_eq!(problems[0].key, "ingest.keys[1].trust");
        let c = parse(&text("server")).unwrap();
        assert!(c.ingest.client_sources().is_empty());
    }

    #[test]
    fn problems_are_named_by_key() {
        let Err(ConfigError::Invalid { problems, .. }) = parse(
            r#"
            [ingest]
            body_limit_bytes = 10
            max_concurrent_requests = 0
            body_read_timeout = "10ms"
            request_timeout = "5s"
            [[ingest.keys]]
            key = "short"
            source = "x"
            environment = "staging"
            segment_shared_secret = "tiny"
            "#,
        ) else {
            panic!("accepted")
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "ingest.body_limit_bytes",
                "ingest.max_concurrent_requests",
                "ingest.body_read_timeout",
                "ingest.request_timeout",
                "ingest.keys[0].key",
                "ingest.keys[0].environment",
                "ingest.keys[0].segment_shared_secret"
            ]
        );
        let Err(ConfigError::Invalid { problems, .. }) =
            parse("[[ingest.keys]]\nkey = \"k\"\nsource = \"s\"\nenvironment = \"prod\"\n")
        else {
            panic!("accepted")
        };
        assert_eq!(problems[0].key, "ingest.keys[0].environment");
    }
}
