//! Typed configuration: one TOML file, secrets as `${ENV_VAR}`, and every
//! problem reported with the file and the dotted key it is about.
//!
//! Each section (and each destination) is deserialised on its own so that one
//! mistake does not hide the next: `switchyard check` lists them all.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::destinations::Vendor;
use crate::event::EventName;
use crate::event::normalize::{PhoneCountry, parse_country};
use crate::settings::{ConsentDefault, Problem, de_duration, deserialize_at, is_consent_category};
use crate::sink::config::DeliverySettings;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{}: cannot read config: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{}", render_problems(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// Every problem, one per line, each naming the file.
    pub fn lines(&self) -> Vec<String> {
        match self {
            ConfigError::Invalid { path, problems } => problems
                .iter()
                .map(|p| format!("{}: {p}", path.display()))
                .collect(),
            other => vec![other.to_string()],
        }
    }
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {p}", path.display()))
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Debug, Clone, Default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    pub router: RouterConfig,
    pub identity: IdentityConfig,
    pub metrics: MetricsConfig,
    pub ingest: crate::ingest::config::IngestConfig,
    pub destinations: BTreeMap<String, DestinationConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Deliveries, state and consumer offsets commit in one Kafka transaction.
    ExactlyOnce,
    /// Idempotent producer; offsets committed only after the produce is acked.
    AtLeastOnce,
}

impl Guarantee {
    pub fn as_str(self) -> &'static str {
        match self {
            Guarantee::ExactlyOnce => "exactly_once",
            Guarantee::AtLeastOnce => "at_least_once",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `host:port[,host:port…]`; absent means the embedded, non-durable broker.
    pub brokers: Option<String>,
    pub guarantee: Guarantee,
    pub client_id: String,
    /// librdkafka properties passed through to every client (security, SASL, timeouts…).
    pub properties: BTreeMap<String, PropertyValue>,
    /// Passed through to consumers only, after `properties`: librdkafka
    /// warns at every producer given a consumer property (and the reverse).
    pub consumer_properties: BTreeMap<String, PropertyValue>,
    /// Passed through to producers only, after `properties`.
    pub producer_properties: BTreeMap<String, PropertyValue>,
    /// The largest record any switchyard producer writes, derived from
    /// `router.max_record_bytes` (see [`RouterConfig::produced_record_bytes`]).
    #[serde(skip)]
    pub max_message_bytes: usize,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: None,
            guarantee: Guarantee::ExactlyOnce,
            client_id: "switchyard".into(),
            properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
            max_message_bytes: RouterConfig::default().produced_record_bytes(),
        }
    }
}

impl KafkaConfig {
    /// Makes the values of credential properties (SASL passwords, key
    /// passwords, OAuth client secrets, JAAS configs) known secrets, so text
    /// that quotes one is cleaned before it is logged.
    fn register_secrets(&self) {
        let maps = [
            &self.properties,
            &self.consumer_properties,
            &self.producer_properties,
        ];
        for (key, value) in maps.into_iter().flatten() {
            let sensitive = ["password", "secret", "jaas", "oauthbearer.config", "pem"]
                .iter()
                .any(|w| key.contains(w));
            if sensitive && let PropertyValue::Str(v) = value {
                let _ = crate::settings::Secret::new(v.clone());
            }
        }
    }
}

/// librdkafka takes every property as a string; TOML users write numbers and booleans.
#[derive(Clone, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    Str(String),
    Int(i64),
    Bool(bool),
}

impl PropertyValue {
    pub fn to_kafka_string(&self) -> String {
        match self {
            PropertyValue::Str(s) => s.clone(),
            PropertyValue::Int(i) => i.to_string(),
            PropertyValue::Bool(b) => b.to_string(),
        }
    }
}

impl fmt::Debug for PropertyValue {
    // Properties carry SASL passwords and key material; never print their values.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Properties switchyard sets itself, per client, to keep its guarantees.
pub const OWNED_KAFKA_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "group.id",
    "group.instance.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.idempotence",
    "transactional.id",
    "isolation.level",
    // Idempotence needs all acks; re-published keys must land where a
    // Java publisher's would.
    "acks",
    "partitioner",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicsConfig {
    /// The input topic publishers write canonical events to (key = event_id).
    pub canonical: String,
    /// Prefix of every topic switchyard owns: `<prefix>.dlq`, `<prefix>.dedup`…
    pub prefix: String,
    /// Partition count used only when switchyard creates the canonical topic;
    /// an existing canonical topic's count wins and the state topics follow it.
    pub partitions: i32,
    pub replication_factor: i32,
    #[serde(deserialize_with = "de_duration")]
    pub dlq_retention: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub retry_retention: Duration,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        TopicsConfig {
            canonical: "events.canonical".into(),
            prefix: "switchyard".into(),
            partitions: 6,
            replication_factor: 1,
            dlq_retention: Duration::from_secs(30 * 86_400),
            retry_retention: Duration::from_secs(7 * 86_400),
        }
    }
}

impl TopicsConfig {
    pub fn dlq(&self) -> String {
        format!("{}.dlq", self.prefix)
    }
    pub fn dedup(&self) -> String {
        format!("{}.dedup", self.prefix)
    }
    pub fn identity(&self) -> String {
        format!("{}.identity", self.prefix)
    }
    pub fn outcomes(&self) -> String {
        format!("{}.outcomes", self.prefix)
    }
    pub fn deliver(&self, destination: &str) -> String {
        format!("{}.deliver.{destination}", self.prefix)
    }
    pub fn retry(&self, destination: &str) -> String {
        format!("{}.retry.{destination}", self.prefix)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterConfig {
    /// How long an event_id is remembered for dedup (Meta and TikTok use 48 h).
    #[serde(deserialize_with = "de_duration")]
    pub dedup_window: Duration,
    /// The one size setting: input records larger than this are
    /// dead-lettered as oversize (ingest answers 413), and every producer and
    /// topic limit is derived from it.
    pub max_record_bytes: usize,
    /// How long a read of state (dedup restore, identity load) may go
    /// without a record or an offset advance before it fails. Not a total
    /// time: state topics grow, and a slow but moving read must finish.
    #[serde(deserialize_with = "de_duration")]
    pub state_stall_timeout: Duration,
}

/// What the router may add to an accepted record: enrichment, the
/// delivery's own fields and headers (deliveries larger than the input plus
/// this are dead-lettered, not produced).
pub const ROUTED_ALLOWANCE: usize = 48 * 1024;
/// What the sinks add on top of a delivery: the failure headers of a retry
/// or dead-letter copy (each capped well below this).
pub const FAILURE_ALLOWANCE: usize = 16 * 1024;
/// librdkafka's and Kafka's own bounds on `message.max.bytes`.
const MAX_MESSAGE_BYTES: usize = 1_000_000_000;

impl RouterConfig {
    /// The largest delivery (key, value and headers) the router produces.
    pub fn routed_record_bytes(&self) -> usize {
        self.max_record_bytes + ROUTED_ALLOWANCE
    }

    /// The largest record any switchyard producer writes: a delivery plus a
    /// sink's failure headers. Producers and created topics are set to it.
    pub fn produced_record_bytes(&self) -> usize {
        self.routed_record_bytes() + FAILURE_ALLOWANCE
    }
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            dedup_window: Duration::from_secs(48 * 3600),
            // With the allowances, what is produced stays under librdkafka's
            // and the broker's default 1,000,000-byte message limit, so no
            // broker or topic setting has to change.
            max_record_bytes: 900 * 1024,
            state_stall_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// ISO 3166 alpha-2 country for phone numbers written without a country code.
    pub default_phone_country: String,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            default_phone_country: "US".into(),
        }
    }
}

impl IdentityConfig {
    /// Validated at load time, so this cannot fail on a loaded config.
    pub fn phone_country(&self) -> PhoneCountry {
        parse_country(&self.default_phone_country).unwrap_or(PhoneCountry::US)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the Prometheus `/metrics` endpoint.
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// A destination: what every destination has, plus its vendor's settings.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    pub name: String,
    pub enabled: bool,
    /// Consent category the destination needs (`ads`, `analytics`, `marketing`…).
    pub consent: String,
    /// What happens when an event says nothing about that category.
    pub consent_default: ConsentDefault,
    /// Canonical events this destination receives; empty = every event its mapping knows.
    pub events: Vec<EventName>,
    /// Overrides of the canonical → vendor event-name presets.
    pub event_names: BTreeMap<String, String>,
    /// May this destination receive raw email/phone (CRM, own webhooks)?
    /// Never allowed for ad platforms or GA4, which get hashes only.
    pub raw_contact: bool,
    /// `[destinations.NAME.delivery]`: batching, retries, rate limit, ordering.
    pub delivery: DeliverySettings,
    /// Which vendor, with its settings and policy.
    pub vendor: Vendor,
}

impl Config {
    /// Reads, expands `${ENV}` and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path, &|name| std::env::var(name).ok())
    }

    /// Parses config text; `env` looks up `${NAME}` references (injectable for tests).
    pub fn parse(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut root: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: syntax_message(&e, text),
        })?;
        let mut problems = Vec::new();
        for (key, value) in root.iter_mut() {
            expand_env(value, key, env, &mut problems);
        }
        let mut config = Config::default();
        for (section, value) in root {
            match section.as_str() {
                "kafka" => take(&mut config.kafka, value, "kafka", &mut problems),
                "topics" => take(&mut config.topics, value, "topics", &mut problems),
                "router" => take(&mut config.router, value, "router", &mut problems),
                "identity" => take(&mut config.identity, value, "identity", &mut problems),
                "metrics" => take(&mut config.metrics, value, "metrics", &mut problems),
                "ingest" => take(&mut config.ingest, value, "ingest", &mut problems),
                "destinations" => {
                    config.destinations = parse_destinations(value, &mut problems);
                }
                other => problems.push(Problem {
                    key: other.to_string(),
                    message: "unknown section; expected one of kafka, topics, router, identity, metrics, ingest, destinations".into(),
                }),
            }
        }
        config.check(&mut problems);
        config.kafka.max_message_bytes = config.router.produced_record_bytes();
        config.kafka.register_secrets();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    /// Semantic checks that types alone cannot express.
    fn check(&self, problems: &mut Vec<Problem>) {
        let mut bad = |key: &str, message: String| {
            problems.push(Problem {
                key: key.to_string(),
                message,
            })
        };
        if let Some(brokers) = &self.kafka.brokers {
            for b in brokers.split(',') {
                let b = b.trim();
                let ok = b
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
                if !ok {
                    bad(
                        "kafka.brokers",
                        format!(
                            "`{b}` is not host:port (remove the key to use the embedded broker)"
                        ),
                    );
                }
            }
        }
        let k = &self.kafka;
        for (table, props) in [
            ("properties", &k.properties),
            ("consumer_properties", &k.consumer_properties),
            ("producer_properties", &k.producer_properties),
        ] {
            for key in props.keys() {
                if OWNED_KAFKA_PROPERTIES.contains(&key.as_str()) {
                    bad(
                        &format!("kafka.{table}.\"{key}\""),
                        "switchyard sets this property itself to keep its delivery guarantee; remove it (use kafka.brokers for the bootstrap servers)".into(),
                    );
                }
            }
        }
        let t = &self.topics;
        for (key, name) in [
            ("topics.canonical", &t.canonical),
            ("topics.prefix", &t.prefix),
        ] {
            if let Err(why) = check_topic_name(name) {
                bad(key, why);
            }
        }
        if !(1..=10_000).contains(&t.partitions) {
            bad(
                "topics.partitions",
                format!("must be 1..=10000, got {}", t.partitions),
            );
        }
        if !(1..=32).contains(&t.replication_factor) {
            bad(
                "topics.replication_factor",
                format!("must be 1..=32, got {}", t.replication_factor),
            );
        }
        if self.router.dedup_window < Duration::from_secs(60) {
            bad("router.dedup_window", "must be at least 1m".into());
        }
        if self.router.state_stall_timeout < Duration::from_secs(1) {
            bad("router.state_stall_timeout", "must be at least 1s".into());
        }
        let max_input = MAX_MESSAGE_BYTES - ROUTED_ALLOWANCE - FAILURE_ALLOWANCE;
        if !(1024..=max_input).contains(&self.router.max_record_bytes) {
            bad(
                "router.max_record_bytes",
                format!("must be 1024..={max_input}"),
            );
        }
        let needed = self.router.produced_record_bytes();
        for (table, props) in [
            ("properties", &self.kafka.properties),
            ("producer_properties", &self.kafka.producer_properties),
        ] {
            let Some(v) = props.get("message.max.bytes") else {
                continue;
            };
            if v.to_kafka_string()
                .parse::<usize>()
                .is_ok_and(|n| n < needed)
            {
                bad(
                    &format!("kafka.{table}.message.max.bytes"),
                    format!(
                        "must be at least {needed}: router.max_record_bytes plus {} bytes the \
                         router and sinks add to a record; leave it unset to have it derived",
                        ROUTED_ALLOWANCE + FAILURE_ALLOWANCE
                    ),
                );
            }
        }
        if parse_country(&self.identity.default_phone_country).is_none() {
            bad(
                "identity.default_phone_country",
                format!(
                    "`{}` is not an ISO 3166 alpha-2 country code like \"US\" or \"GB\"",
                    self.identity.default_phone_country
                ),
            );
        }
        self.ingest.check(problems);
    }

    /// The destinations that are switched on.
    pub fn enabled_destinations(&self) -> impl Iterator<Item = &DestinationConfig> {
        self.destinations.values().filter(|d| d.enabled)
    }

    /// Which enabled destinations a command was asked for, as flags beside
    /// [`Config::enabled_destinations`]; all of them when `asked` is empty.
    pub fn chosen_destinations(&self, asked: &[String]) -> Result<Vec<bool>, NotEnabled> {
        let enabled: Vec<&str> = self
            .enabled_destinations()
            .map(|d| d.name.as_str())
            .collect();
        if let Some(name) = asked.iter().find(|a| !enabled.contains(&a.as_str())) {
            return Err(NotEnabled {
                name: name.clone(),
                enabled: enabled.join(", "),
            });
        }
        Ok(enabled
            .iter()
            .map(|n| asked.is_empty() || asked.iter().any(|a| a == n))
            .collect())
    }
}

/// A command named a destination that is not enabled in the config.
#[derive(Debug, Error)]
#[error("`{name}` is no enabled destination (enabled: {enabled})")]
pub struct NotEnabled {
    pub name: String,
    pub enabled: String,
}

fn syntax_message(e: &toml::de::Error, text: &str) -> String {
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!(
                "line {line}, column {col}: TOML syntax error: {}",
                e.message()
            )
        }
        None => format!("TOML syntax error: {}", e.message()),
    }
}

static ENV_REF: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\$\{([^}]*)\}").expect("static regex"));
static ENV_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z_][A-Za-z0-9_]*$").expect("static regex"));

/// Replaces `${NAME}` in every string value; a missing variable is a problem
/// naming both the key and the variable (never the value).
fn expand_env(
    value: &mut toml::Value,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Vec<Problem>,
) {
    match value {
        toml::Value::String(s) if s.contains("${") => {
            let mut out = String::with_capacity(s.len());
            let mut last = 0;
            for cap in ENV_REF.captures_iter(s) {
                let whole = cap.get(0).expect("group 0 always matches");
                out.push_str(&s[last..whole.start()]);
                let name = &cap[1];
                if !ENV_NAME.is_match(name) {
                    problems.push(Problem {
                        key: key.to_string(),
                        message: format!(
                            "`${{{name}}}` is not a valid environment variable reference"
                        ),
                    });
                } else {
                    match env(name) {
                        Some(v) => out.push_str(&v),
                        None => problems.push(Problem {
                            key: key.to_string(),
                            message: format!("environment variable {name} is not set"),
                        }),
                    }
                }
                last = whole.end();
            }
            out.push_str(&s[last..]);
            *s = out;
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_env(item, &format!("{key}[{i}]"), env, problems);
            }
        }
        toml::Value::Table(table) => {
            for (k, v) in table.iter_mut() {
                expand_env(v, &format!("{key}.{}", dotted(k)), env, problems);
            }
        }
        _ => {}
    }
}

/// Quotes a key segment that contains dots, as TOML would.
fn dotted(k: &str) -> String {
    if k.contains('.') {
        format!("\"{k}\"")
    } else {
        k.to_string()
    }
}

/// Deserialises one section, recording a problem (with its full key) instead of failing.
fn take<T: DeserializeOwned>(
    slot: &mut T,
    value: toml::Value,
    section: &str,
    problems: &mut Vec<Problem>,
) {
    match deserialize_at::<T>(value, section) {
        Ok(v) => *slot = v,
        Err(p) => problems.push(p),
    }
}

static DESTINATION_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z0-9][a-z0-9_-]{0,62}$").expect("static regex"));

const COMMON_DESTINATION_KEYS: &[&str] = &[
    "type",
    "enabled",
    "consent",
    "consent_default",
    "events",
    "event_names",
    "raw_contact",
    "delivery",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommonKeys {
    #[serde(rename = "type")]
    type_name: String,
    #[serde(default = "yes")]
    enabled: bool,
    consent: Option<String>,
    consent_default: Option<ConsentDefault>,
    #[serde(default)]
    events: Vec<String>,
    #[serde(default)]
    event_names: BTreeMap<String, String>,
    #[serde(default)]
    raw_contact: bool,
    #[serde(default)]
    delivery: DeliverySettings,
}

fn yes() -> bool {
    true
}

fn parse_destinations(
    value: toml::Value,
    problems: &mut Vec<Problem>,
) -> BTreeMap<String, DestinationConfig> {
    let mut out = BTreeMap::new();
    let toml::Value::Table(table) = value else {
        problems.push(Problem {
            key: "destinations".into(),
            message: "must be a table of named destinations, e.g. [destinations.meta]".into(),
        });
        return out;
    };
    for (name, value) in table {
        let key = format!("destinations.{}", dotted(&name));
        if !DESTINATION_NAME.is_match(&name) {
            problems.push(Problem {
                key: key.clone(),
                message:
                    "destination names are 1-63 of a-z 0-9 _ - (they become topic and group names)"
                        .into(),
            });
            continue;
        }
        if let Some(d) = parse_destination(&name, &key, value, problems) {
            out.insert(name, d);
        }
    }
    out
}

fn parse_destination(
    name: &str,
    key: &str,
    value: toml::Value,
    problems: &mut Vec<Problem>,
) -> Option<DestinationConfig> {
    let toml::Value::Table(mut table) = value else {
        problems.push(Problem {
            key: key.to_string(),
            message: "must be a table".into(),
        });
        return None;
    };
    // Whether the destination chose its ordering, or takes its vendor's.
    let ordering_set = table
        .get("delivery")
        .and_then(toml::Value::as_table)
        .is_some_and(|d| d.contains_key("ordering"));
    let mut common = toml::Table::new();
    for k in COMMON_DESTINATION_KEYS {
        if let Some(v) = table.remove(*k) {
            common.insert((*k).to_string(), v);
        }
    }
    let mut common: CommonKeys = match deserialize_at(toml::Value::Table(common), key) {
        Ok(c) => c,
        Err(p) => {
            problems.push(p);
            return None;
        }
    };
    let vendor = match Vendor::parse(&common.type_name, toml::Value::Table(table), key) {
        Ok(v) => v,
        Err(p) => {
            problems.push(p);
            return None;
        }
    };
    vendor.check(key, problems);
    let spec = vendor.spec();
    if !ordering_set {
        common.delivery.ordering = spec.ordering;
    }
    common.delivery.check(&format!("{key}.delivery"), problems);

    let consent = match common.consent.or(spec.default_consent().map(String::from)) {
        Some(c) if is_consent_category(&c) => c,
        Some(c) => {
            problems.push(Problem {
                key: format!("{key}.consent"),
                message: format!(
                    "`{c}` is not a consent category (a-z, 0-9, _; e.g. ads, analytics, marketing)"
                ),
            });
            return None;
        }
        None => {
            problems.push(Problem {
                key: format!("{key}.consent"),
                message: format!(
                    "a {} destination must name the consent category it needs (e.g. \"analytics\" or \"marketing\")",
                    spec.type_name
                ),
            });
            return None;
        }
    };
    let consent_default = common.consent_default.unwrap_or(spec.consent_default());

    let mut events = Vec::with_capacity(common.events.len());
    for (i, e) in common.events.iter().enumerate() {
        match EventName::parse(e) {
            Some(name) => events.push(name),
            None => problems.push(Problem {
                key: format!("{key}.events[{i}]"),
                message: format!("`{e}` is neither a canonical event name nor custom.<name>"),
            }),
        }
    }
    for canonical in common.event_names.keys() {
        if EventName::parse(canonical).is_none() {
            problems.push(Problem {
                key: format!("{key}.event_names.{canonical}"),
                message: format!(
                    "`{canonical}` is neither a canonical event name nor custom.<name>"
                ),
            });
        }
    }
    if common.raw_contact && spec.hashes_only() {
        problems.push(Problem {
            key: format!("{key}.raw_contact"),
            message: format!(
                "a {} destination only ever receives hashed email/phone",
                spec.type_name
            ),
        });
    }
    if let Some(setting) = vendor.needs_raw_contact()
        && !common.raw_contact
    {
        problems.push(Problem {
            key: format!("{key}.{setting}"),
            message: "sends raw contact data: it needs raw_contact = true".into(),
        });
    }
    Some(DestinationConfig {
        name: name.to_string(),
        raw_contact: common.raw_contact,
        enabled: common.enabled,
        consent,
        consent_default,
        events,
        event_names: common.event_names,
        delivery: common.delivery,
        vendor,
    })
}

/// Kafka's own rule for topic names.
pub fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err("topic names are 1-200 characters".into());
    }
    if name == "." || name == ".." {
        return Err("`.` and `..` are not topic names".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!("`{name}` may only contain a-z A-Z 0-9 . _ -"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let env = |name: &str| match name {
            "META_TOKEN" => Some("EAAB-secret".to_string()),
            "HOOK_SECRET" => Some("0123456789abcdef0123".to_string()),
            _ => None,
        };
        Config::parse(text, Path::new("test.toml"), &env)
    }

    #[test]
    fn commands_name_enabled_destinations_only() {
        let config = parse(
            "[destinations.hook]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\nsecret = \"${HOOK_SECRET}\"\nconsent = \"analytics\"\n\
             [destinations.meta]\ntype = \"meta_capi\"\npixel_id = \"1\"\naccess_token = \"${META_TOKEN}\"\n",
        )
        .unwrap();
        assert_eq!(config.chosen_destinations(&[]).unwrap(), [true, true]);
        assert_eq!(
            config.chosen_destinations(&["meta".into()]).unwrap(),
            [false, true]
        );
        let err = config
            .chosen_destinations(&["mta".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`mta`") && err.contains("hook, meta"), "{err}");
    }

    #[test]
    fn credential_properties_are_printed_nowhere() {
        let config = parse(
            "[kafka]\nbrokers = \"b:9093\"\nproperties = { \"security.protocol\" = \"sasl_ssl\", \"sasl.mechanisms\" = \"SCRAM-SHA-512\", \"sasl.username\" = \"svc\", \"sasl.password\" = \"scram-pw-9f8e7d\" }\n",
        )
        .unwrap();
        assert!(!format!("{config:?}").contains("scram-pw-9f8e7d"));
        assert_eq!(
            crate::redact::redact("SASL authentication failed for scram-pw-9f8e7d"),
            "SASL authentication failed for [secret]"
        );
    }

    fn problems(text: &str) -> Vec<Problem> {
        match parse(text) {
            Ok(_) => panic!("config was accepted:\n{text}"),
            Err(ConfigError::Invalid { problems, .. }) => problems,
            Err(other) => panic!("expected Invalid, got {other}"),
        }
    }

    fn keys(text: &str) -> Vec<String> {
        problems(text).into_iter().map(|p| p.key).collect()
    }

    #[test]
    fn empty_file_is_the_embedded_default() {
        let c = parse("").unwrap();
        assert!(c.kafka.brokers.is_none());
        assert_eq!(c.kafka.guarantee, Guarantee::ExactlyOnce);
        assert_eq!(c.router.dedup_window, Duration::from_secs(48 * 3600));
        assert_eq!(c.topics.dedup(), "switchyard.dedup");
        assert_eq!(c.topics.deliver("meta"), "switchyard.deliver.meta");
    }

    #[test]
    fn full_destination_parses_with_env_secret() {
        let c = parse(
            r#"
            [kafka]
            brokers = "127.0.0.1:9092"
            guarantee = "at_least_once"
            properties = { "socket.timeout.ms" = 30000, "security.protocol" = "plaintext" }

            [destinations.meta]
            type = "meta_capi"
            pixel_id = "1234567890"
            access_token = "${META_TOKEN}"
            events = ["purchase", "lead", "custom.webinar_registered"]
            event_names = { start_trial = "StartTrial" }
            "#,
        )
        .unwrap();
        let d = &c.destinations["meta"];
        assert_eq!(d.consent, "ads");
        assert_eq!(d.consent_default, ConsentDefault::Deny);
        assert_eq!(d.events.len(), 3);
        let Vendor::MetaCapi(m) = &d.vendor else {
            panic!("wrong vendor")
        };
        assert_eq!(m.access_token.expose(), "EAAB-secret");
        assert_eq!(m.api_version, "v21.0");
        assert!(
            !format!("{c:?}").contains("EAAB-secret"),
            "Debug leaks a secret"
        );
        assert_eq!(
            c.kafka.properties["socket.timeout.ms"].to_kafka_string(),
            "30000"
        );
    }

    #[test]
    fn ordering_is_the_vendors_unless_the_destination_sets_it() {
        let c = parse(
            r#"
            [destinations.quiet]
            type = "webhook"
            url = "https://example.com/a"
            secret = "0123456789abcdef"
            consent = "marketing"
            [destinations.quiet.delivery]
            batch_max_events = 10

            [destinations.ordered]
            type = "webhook"
            url = "https://example.com/b"
            secret = "0123456789abcdef"
            consent = "marketing"
            [destinations.ordered.delivery]
            ordering = true
            "#,
        )
        .unwrap();
        let spec = c.destinations["quiet"].vendor.spec();
        assert_eq!(c.destinations["quiet"].delivery.ordering, spec.ordering);
        assert!(c.destinations["ordered"].delivery.ordering);
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        assert_eq!(keys("[kafka]\nbrokerz = \"x:1\"\n"), vec!["kafka.brokerz"]);
        assert_eq!(keys("[kafak]\n"), vec!["kafak"]);
        let k = keys(
            r#"
            [destinations.meta]
            type = "meta_capi"
            pixel_id = "1"
            pixle_id = "1"
            access_token = "t"
            "#,
        );
        assert_eq!(k, vec!["destinations.meta.pixle_id"]);
    }

    #[test]
    fn every_destination_given_hashed_contact_data_needs_consent_by_default() {
        let c = Config::parse(
            r#"
[destinations.meta]
type = "meta_capi"
pixel_id = "1"
access_token = "t"
[destinations.ga4]
type = "ga4"
measurement_id = "G-TEST1"
api_secret = "s"
[destinations.hook]
type = "webhook"
url = "http://127.0.0.1:9/"
secret = "0123456789abcdef"
consent = "analytics"
"#,
            Path::new("t.toml"),
            &|_| None,
        )
        .unwrap();
        for (name, want) in [
            ("meta", ConsentDefault::Deny),
            ("ga4", ConsentDefault::Deny),
            ("hook", ConsentDefault::Grant),
        ] {
            assert_eq!(c.destinations[name].consent_default, want, "{name}");
            assert_eq!(
                c.destinations[name].vendor.spec().hashes_only(),
                want == ConsentDefault::Deny
            );
        }
    }

    #[test]
    fn a_bad_url_is_named_by_its_key_and_never_echoed() {
        let err = Config::parse(
            r#"
[destinations.hook]
type = "webhook"
url = "ftp://admin:hunter2@example.com/?token=s3cret"
secret = "0123456789abcdef"
consent = "analytics"
"#,
            Path::new("t.toml"),
            &|_| None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("destinations.hook.url"), "{err}");
        assert!(!err.contains("hunter2") && !err.contains("s3cret"), "{err}");
    }

    #[test]
    fn the_state_stall_timeout_defaults_to_a_minute_and_a_bad_one_is_named() {
        assert_eq!(
            parse("").unwrap().router.state_stall_timeout,
            Duration::from_secs(60)
        );
        for bad in ["0s", "soon"] {
            let k = keys(&format!("[router]\nstate_stall_timeout = \"{bad}\"\n"));
            assert_eq!(k, ["router.state_stall_timeout"], "{bad}");
        }
    }

    #[test]
    fn bad_values_are_named_and_all_reported() {
        let p = problems(
            r#"
            [router]
            dedup_window = "two days"
            [topics]
            partitions = 0
            [identity]
            default_phone_country = "XX"
            [kafka]
            guarantee = "maybe_once"
            [kafka.properties]
            "group.id" = "mine"
            [destinations.hook]
            type = "webhook"
            url = "ftp://example.com"
            secret = "short"
            [destinations.tt]
            type = "tiktok_events"
            pixel_code = "C1"
            access_token = "t"
            event_source = "tv"
            events = ["purchse"]
            "#,
        );
        let k: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "router.dedup_window",
            "topics.partitions",
            "identity.default_phone_country",
            "kafka.guarantee",
            "destinations.hook.url",
            "destinations.hook.secret",
            "destinations.hook.consent",
            "destinations.tt.event_source",
            "destinations.tt.events[0]",
        ] {
            assert!(k.contains(&expected), "missing {expected} in {k:?}");
        }
        // kafka.guarantee failing stops the kafka section, so group.id is reported on a rerun.
        let g = keys("[kafka.properties]\n\"group.id\" = \"mine\"\n");
        assert_eq!(g, vec!["kafka.properties.\"group.id\""]);
        let g = keys(
            "[kafka.consumer_properties]\n\"isolation.level\" = \"read_uncommitted\"\n[kafka.producer_properties]\n\"transactional.id\" = \"t\"\n",
        );
        assert_eq!(
            g,
            vec![
                "kafka.consumer_properties.\"isolation.level\"",
                "kafka.producer_properties.\"transactional.id\""
            ]
        );
    }

    #[test]
    fn missing_env_var_names_key_and_variable_not_value() {
        let p = problems(
            r#"
            [destinations.meta]
            type = "meta_capi"
            pixel_id = "1"
            access_token = "${NOT_SET_ANYWHERE}"
            "#,
        );
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].key, "destinations.meta.access_token");
        assert!(
            p[0].message.contains("NOT_SET_ANYWHERE"),
            "{}",
            p[0].message
        );
    }

    #[test]
    fn syntax_errors_give_a_line() {
        match parse("[kafka\nbrokers = 1") {
            Err(ConfigError::Syntax { message, .. }) => {
                assert!(message.starts_with("line 1"), "{message}")
            }
            other => panic!("expected syntax error, got {other:?}"),
        }
    }

    #[test]
    fn each_error_line_names_the_file() {
        let err = parse("[kafka]\nbrokers = \"nohost\"\n").unwrap_err();
        let lines = err.lines();
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].starts_with("test.toml: `kafka.brokers`"),
            "{}",
            lines[0]
        );
    }
}
