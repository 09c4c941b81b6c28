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

use crate::event::EventName;
use crate::event::normalize::{PhoneCountry, parse_country};
use crate::sink::config::DeliverySettings;

/// One problem with a configuration value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the key, e.g. `destinations.meta.access_token`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "`{}`: {}", self.key, self.message)
        }
    }
}

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

/// A secret value: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentDefault {
    Deny,
    Grant,
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
    pub kind: DestinationKind,
}

#[derive(Debug, Clone)]
pub enum DestinationKind {
    Webhook(WebhookSettings),
    MetaCapi(MetaCapiSettings),
    TiktokEvents(TiktokSettings),
    GoogleAds(GoogleAdsSettings),
    Ga4(Ga4Settings),
}

impl DestinationKind {
    pub const TYPES: &'static [&'static str] =
        &["webhook", "meta_capi", "tiktok_events", "google_ads", "ga4"];

    pub fn type_name(&self) -> &'static str {
        match self {
            DestinationKind::Webhook(_) => "webhook",
            DestinationKind::MetaCapi(_) => "meta_capi",
            DestinationKind::TiktokEvents(_) => "tiktok_events",
            DestinationKind::GoogleAds(_) => "google_ads",
            DestinationKind::Ga4(_) => "ga4",
        }
    }

    /// Ad platforms only ever receive hashed identifiers and default to no consent.
    pub fn is_ad_platform(&self) -> bool {
        matches!(
            self,
            DestinationKind::MetaCapi(_)
                | DestinationKind::TiktokEvents(_)
                | DestinationKind::GoogleAds(_)
        )
    }

    /// Destinations that must never see raw contact data, only SHA-256 hashes.
    pub fn hashes_only(&self) -> bool {
        self.is_ad_platform() || matches!(self, DestinationKind::Ga4(_))
    }

    fn default_consent(&self) -> Option<&'static str> {
        match self {
            DestinationKind::MetaCapi(_)
            | DestinationKind::TiktokEvents(_)
            | DestinationKind::GoogleAds(_) => Some("ads"),
            DestinationKind::Ga4(_) => Some("analytics"),
            // A webhook can carry anything; its owner must say which consent it needs.
            DestinationKind::Webhook(_) => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    pub url: String,
    /// HMAC-SHA256 key for `X-Switchyard-Signature`.
    pub secret: Secret,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetaCapiSettings {
    pub pixel_id: String,
    pub access_token: Secret,
    #[serde(default = "meta_default_version")]
    pub api_version: String,
    #[serde(default = "meta_default_action_source")]
    pub action_source: String,
    /// Per canonical `source` (the publishing service), an action_source
    /// other than `action_source`: e.g. `{ billing = "system_generated" }`,
    /// because server-made events have no page URL or user agent, which
    /// Meta requires of `website` events.
    #[serde(default)]
    pub action_source_by_source: BTreeMap<String, String>,
    pub test_event_code: Option<String>,
    #[serde(default = "meta_default_base_url")]
    pub base_url: String,
    /// Where the access token travels. Meta's docs show the `access_token`
    /// query parameter; the Graph API also takes `Authorization: Bearer`,
    /// which keeps the token out of URLs (and so out of client error text).
    #[serde(default)]
    pub access_token_in: TokenPlacement,
    /// Meta's Limited Data Use flags: `[]` (none) or `["LDU"]`.
    #[serde(default)]
    pub data_processing_options: Vec<String>,
    /// With LDU: 0 = let Meta geolocate, 1 = United States.
    pub data_processing_options_country: Option<u32>,
    /// With LDU: 0 = let Meta geolocate, 1000 = California (Meta numbers
    /// further US states from 1000 up).
    pub data_processing_options_state: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenPlacement {
    /// `Authorization: Bearer <token>`.
    #[default]
    Header,
    /// `?access_token=<token>`, as in Meta's examples.
    Query,
}

fn meta_default_version() -> String {
    "v21.0".into()
}
fn meta_default_action_source() -> String {
    "website".into()
}
fn meta_default_base_url() -> String {
    "https://graph.facebook.com".into()
}

const META_ACTION_SOURCES: &[&str] = &[
    "website",
    "app",
    "email",
    "phone_call",
    "chat",
    "physical_store",
    "system_generated",
    "other",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TiktokSettings {
    /// The pixel / event source id (`event_source_id`).
    pub pixel_code: String,
    pub access_token: Secret,
    #[serde(default = "tiktok_default_event_source")]
    pub event_source: String,
    pub test_event_code: Option<String>,
    #[serde(default = "tiktok_default_base_url")]
    pub base_url: String,
    /// The Business API version in the path (`/open_api/<v>/event/track/`).
    #[serde(default = "tiktok_default_version")]
    pub api_version: String,
    /// Events older than this are dead-lettered instead of sent. TikTok
    /// documents no hard cut-off we could verify; 7 days is how long a
    /// ttclid stays valid (and the age Meta enforces).
    #[serde(
        default = "tiktok_default_max_event_age",
        deserialize_with = "de_duration"
    )]
    pub max_event_age: Duration,
}

fn tiktok_default_event_source() -> String {
    "web".into()
}
fn tiktok_default_version() -> String {
    "v1.3".into()
}
fn tiktok_default_max_event_age() -> Duration {
    Duration::from_secs(7 * 86_400)
}
fn tiktok_default_base_url() -> String {
    "https://business-api.tiktok.com".into()
}

const TIKTOK_EVENT_SOURCES: &[&str] = &["web", "app", "offline", "crm"];

/// OAuth 2 refresh-token credentials (RFC 6749 §6).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthSettings {
    pub client_id: String,
    pub client_secret: Secret,
    pub refresh_token: Secret,
    #[serde(default = "google_default_token_url")]
    pub token_url: String,
}

fn google_default_token_url() -> String {
    "https://oauth2.googleapis.com/token".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoogleAdsSettings {
    /// Ten digits; dashes as shown in the Google Ads UI are accepted.
    pub customer_id: String,
    pub login_customer_id: Option<String>,
    pub developer_token: Secret,
    /// A fixed OAuth access token. Google's last about an hour, so this
    /// suits tests and short runs; long-running sinks set `oauth` instead.
    #[serde(default)]
    pub access_token: Option<Secret>,
    /// Refresh-token credentials: the sink fetches access tokens itself and
    /// renews them before they expire (and once more after a 401).
    #[serde(default)]
    pub oauth: Option<OAuthSettings>,
    /// Canonical event → conversion action id.
    pub conversion_actions: BTreeMap<String, String>,
    #[serde(default = "google_default_version")]
    pub api_version: String,
    #[serde(default = "google_default_base_url")]
    pub base_url: String,
    /// Offset written into `conversionDateTime` ("+hh:mm" or "-hh:mm"); the
    /// instant is the same whatever the offset, so this only changes how the
    /// time reads in Google's reports.
    #[serde(default = "google_default_time_zone_offset")]
    pub time_zone_offset: String,
    /// Which click id wins when an event carries several (Google accepts one).
    #[serde(default = "google_default_click_id_priority")]
    pub click_id_priority: Vec<String>,
    /// Upload conversions that have no click id but a hashed email/phone
    /// (enhanced conversions for leads; must be turned on in the account).
    #[serde(default = "default_true")]
    pub enhanced_conversions_for_leads: bool,
    /// Send `userIdentifiers` at all (needs the customer data terms accepted).
    #[serde(default = "default_true")]
    pub send_user_identifiers: bool,
    /// Canonical consent category behind `consent.adUserData`; "" = never sent.
    #[serde(default = "default_consent_ad_user_data")]
    pub consent_ad_user_data: String,
    /// Canonical consent category behind `consent.adPersonalization`; "" = never sent.
    #[serde(default = "default_consent_ad_personalization")]
    pub consent_ad_personalization: String,
    /// `validateOnly`: Google checks the conversions and records nothing.
    #[serde(default)]
    pub validate_only: bool,
    /// `debugEnabled`: full checks for user-identifier uploads (CLICK_NOT_FOUND
    /// is reported instead of silently accepted).
    #[serde(default)]
    pub debug_enabled: bool,
}

fn google_default_version() -> String {
    "v21".into()
}
fn google_default_base_url() -> String {
    "https://googleads.googleapis.com".into()
}
fn google_default_time_zone_offset() -> String {
    "+00:00".into()
}
fn google_default_click_id_priority() -> Vec<String> {
    crate::destinations::google_ads::CLICK_IDS
        .iter()
        .map(|s| s.to_string())
        .collect()
}
fn default_true() -> bool {
    true
}
fn default_consent_ad_user_data() -> String {
    "ads".into()
}
fn default_consent_ad_personalization() -> String {
    "ad_personalization".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ga4Settings {
    pub measurement_id: String,
    pub api_secret: Secret,
    #[serde(default = "ga4_default_region")]
    pub region: String,
    /// Overrides the host chosen by `region` (tests, proxies).
    pub base_url: Option<String>,
    /// Send to the validation server (`/debug/mp/collect`): Google answers
    /// with `validationMessages` and records nothing.
    #[serde(default)]
    pub debug_endpoint: bool,
    /// `validation_behavior` in the body ("RELAXED" or
    /// "ENFORCE_RECOMMENDATIONS"); unset = Google's default.
    pub validation_behavior: Option<String>,
    /// Property (or external id) holding the GA client id (`_ga` cookie value).
    #[serde(default = "ga4_default_client_id_property")]
    pub client_id_property: String,
    /// When `user_data` (hashed email/phone) is sent: "with_user_id"
    /// (Google's older rule), "always", or "never".
    #[serde(default = "ga4_default_user_data")]
    pub user_data: String,
    /// Canonical consent category behind `consent.ad_user_data`; "" = never sent.
    #[serde(default = "default_consent_ad_user_data")]
    pub consent_ad_user_data: String,
    /// Canonical consent category behind `consent.ad_personalization`; "" = never sent.
    #[serde(default = "default_consent_ad_personalization")]
    pub consent_ad_personalization: String,
    /// Event properties copied into the event's params as they are.
    #[serde(default)]
    pub params_from_properties: Vec<String>,
    /// Oldest event GA4 takes (72 h per the sending guide; the use-case
    /// guide says two business days).
    #[serde(
        default = "ga4_default_max_event_age",
        deserialize_with = "de_duration"
    )]
    pub max_event_age: Duration,
}

fn ga4_default_region() -> String {
    "global".into()
}
fn ga4_default_client_id_property() -> String {
    "ga_client_id".into()
}
fn ga4_default_user_data() -> String {
    "with_user_id".into()
}
fn ga4_default_max_event_age() -> Duration {
    Duration::from_secs(72 * 3600)
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

fn deserialize_at<T: DeserializeOwned>(value: toml::Value, prefix: &str) -> Result<T, Problem> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let inner = e.path().to_string();
        let key = if inner == "." || inner.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}.{inner}")
        };
        Problem {
            key,
            message: e.into_inner().message().to_string(),
        }
    })
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
    kind: String,
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
    let mut common = toml::Table::new();
    for k in COMMON_DESTINATION_KEYS {
        if let Some(v) = table.remove(*k) {
            common.insert((*k).to_string(), v);
        }
    }
    let common: CommonKeys = match deserialize_at(toml::Value::Table(common), key) {
        Ok(c) => c,
        Err(p) => {
            problems.push(p);
            return None;
        }
    };
    let settings = toml::Value::Table(table);
    let kind = match common.kind.as_str() {
        "webhook" => deserialize_at(settings, key).map(DestinationKind::Webhook),
        "meta_capi" => deserialize_at(settings, key).map(DestinationKind::MetaCapi),
        "tiktok_events" => deserialize_at(settings, key).map(DestinationKind::TiktokEvents),
        "google_ads" => deserialize_at(settings, key).map(DestinationKind::GoogleAds),
        "ga4" => deserialize_at(settings, key).map(DestinationKind::Ga4),
        other => Err(Problem {
            key: format!("{key}.type"),
            message: format!(
                "unknown destination type `{other}`; expected one of {}",
                DestinationKind::TYPES.join(", ")
            ),
        }),
    };
    let kind = match kind {
        Ok(k) => k,
        Err(p) => {
            problems.push(p);
            return None;
        }
    };
    check_settings(&kind, key, problems);
    common.delivery.check(&format!("{key}.delivery"), problems);

    let consent = match common.consent.or(kind.default_consent().map(String::from)) {
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
                    kind.type_name()
                ),
            });
            return None;
        }
    };
    // Whoever receives a person's hashed email or phone needs their yes, not
    // their silence; a webhook's owner chose its category and its default.
    let consent_default = common.consent_default.unwrap_or(if kind.hashes_only() {
        ConsentDefault::Deny
    } else {
        ConsentDefault::Grant
    });

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
    if common.raw_contact && kind.hashes_only() {
        problems.push(Problem {
            key: format!("{key}.raw_contact"),
            message: format!(
                "a {} destination only ever receives hashed email/phone",
                kind.type_name()
            ),
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
        kind,
    })
}

fn is_consent_category(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= 32
        && c.starts_with(|ch: char| ch.is_ascii_lowercase())
        && c.chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
}

fn check_settings(kind: &DestinationKind, key: &str, problems: &mut Vec<Problem>) {
    let mut bad = |k: &str, message: String| {
        problems.push(Problem {
            key: format!("{key}.{k}"),
            message,
        })
    };
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    match kind {
        DestinationKind::Webhook(w) => {
            if let Err(why) = check_url(&w.url) {
                bad("url", why);
            }
            if w.secret.expose().len() < 16 {
                bad("secret", "must be at least 16 characters".into());
            }
        }
        DestinationKind::MetaCapi(m) => {
            if !digits(&m.pixel_id) {
                bad("pixel_id", "must be the numeric pixel / dataset id".into());
            }
            if !is_api_version(&m.api_version, true) {
                bad(
                    "api_version",
                    format!("`{}` is not like \"v21.0\"", m.api_version),
                );
            }
            if !META_ACTION_SOURCES.contains(&m.action_source.as_str()) {
                bad(
                    "action_source",
                    format!("must be one of {}", META_ACTION_SOURCES.join(", ")),
                );
            }
            for (source, action) in &m.action_source_by_source {
                if !META_ACTION_SOURCES.contains(&action.as_str()) {
                    bad(
                        &format!("action_source_by_source.{source}"),
                        format!("must be one of {}", META_ACTION_SOURCES.join(", ")),
                    );
                }
            }
            if let Err(why) = check_url(&m.base_url) {
                bad("base_url", why);
            }
            let ldu = match m.data_processing_options.as_slice() {
                [] => false,
                [one] if one == "LDU" => true,
                _ => {
                    bad("data_processing_options", "must be [] or [\"LDU\"]".into());
                    true
                }
            };
            if let Some(c) = m.data_processing_options_country {
                if !ldu {
                    bad(
                        "data_processing_options_country",
                        "only applies with data_processing_options = [\"LDU\"]".into(),
                    );
                } else if c > 1 {
                    bad(
                        "data_processing_options_country",
                        "must be 0 (geolocate) or 1 (United States)".into(),
                    );
                }
            }
            if let Some(st) = m.data_processing_options_state {
                if !ldu {
                    bad(
                        "data_processing_options_state",
                        "only applies with data_processing_options = [\"LDU\"]".into(),
                    );
                } else if st != 0 && !(1000..2000).contains(&st) {
                    bad(
                        "data_processing_options_state",
                        "must be 0 (geolocate) or a Meta US state code such as 1000 (California)"
                            .into(),
                    );
                }
            }
        }
        DestinationKind::TiktokEvents(t) => {
            if t.pixel_code.trim().is_empty() {
                bad("pixel_code", "must not be empty".into());
            }
            if !TIKTOK_EVENT_SOURCES.contains(&t.event_source.as_str()) {
                bad(
                    "event_source",
                    format!("must be one of {}", TIKTOK_EVENT_SOURCES.join(", ")),
                );
            }
            if let Err(why) = check_url(&t.base_url) {
                bad("base_url", why);
            }
            if !is_api_version(&t.api_version, true) {
                bad(
                    "api_version",
                    format!("`{}` is not like \"v1.3\"", t.api_version),
                );
            }
            if t.max_event_age.is_zero() {
                bad("max_event_age", "must be longer than zero".into());
            }
        }
        DestinationKind::GoogleAds(g) => {
            let ten_digits = |s: &str| {
                let d: String = s.chars().filter(|c| *c != '-').collect();
                d.len() == 10 && digits(&d)
            };
            if !ten_digits(&g.customer_id) {
                bad(
                    "customer_id",
                    "must be a 10-digit customer id (dashes allowed)".into(),
                );
            }
            if let Some(l) = &g.login_customer_id
                && !ten_digits(l)
            {
                bad(
                    "login_customer_id",
                    "must be a 10-digit customer id (dashes allowed)".into(),
                );
            }
            match (&g.access_token, &g.oauth) {
                (Some(_), Some(_)) => bad(
                    "access_token",
                    "set either access_token or [oauth], not both".into(),
                ),
                (None, None) => bad(
                    "oauth",
                    "Google Ads needs credentials: [oauth] with client_id, client_secret and refresh_token (or a fixed access_token)".into(),
                ),
                (None, Some(o)) => {
                    if let Err(why) = check_url(&o.token_url) {
                        bad("oauth.token_url", why);
                    }
                }
                (Some(_), None) => {}
            }
            if g.conversion_actions.is_empty() {
                bad(
                    "conversion_actions",
                    "map at least one canonical event to a conversion action id, e.g. { purchase = \"123456789\" }".into(),
                );
            }
            for (event, id) in &g.conversion_actions {
                if EventName::parse(event).is_none() {
                    bad(
                        &format!("conversion_actions.{event}"),
                        format!("`{event}` is neither a canonical event name nor custom.<name>"),
                    );
                }
                if !digits(id) {
                    bad(
                        &format!("conversion_actions.{event}"),
                        "conversion action ids are numeric".into(),
                    );
                }
            }
            if !is_api_version(&g.api_version, false) {
                bad(
                    "api_version",
                    format!("`{}` is not like \"v21\"", g.api_version),
                );
            }
            if let Err(why) = check_url(&g.base_url) {
                bad("base_url", why);
            }
            if crate::destinations::google_ads::parse_utc_offset(&g.time_zone_offset).is_none() {
                bad(
                    "time_zone_offset",
                    format!(
                        "`{}` is not an offset like \"+00:00\" or \"-08:00\"",
                        g.time_zone_offset
                    ),
                );
            }
            let mut seen = Vec::new();
            for id in &g.click_id_priority {
                if !crate::destinations::google_ads::CLICK_IDS.contains(&id.as_str())
                    || seen.contains(&id)
                {
                    bad(
                        "click_id_priority",
                        format!(
                            "`{id}` is not one of {} (each at most once)",
                            crate::destinations::google_ads::CLICK_IDS.join(", ")
                        ),
                    );
                }
                seen.push(id);
            }
            for (k, c) in [
                ("consent_ad_user_data", &g.consent_ad_user_data),
                ("consent_ad_personalization", &g.consent_ad_personalization),
            ] {
                if !c.is_empty() && !is_consent_category(c) {
                    bad(
                        k,
                        format!("`{c}` is not a consent category (or \"\" for never)"),
                    );
                }
            }
        }
        DestinationKind::Ga4(g) => {
            if !g.measurement_id.starts_with("G-") || g.measurement_id.len() < 4 {
                bad("measurement_id", "must look like \"G-XXXXXXX\"".into());
            }
            if !matches!(g.region.as_str(), "global" | "eu") {
                bad("region", "must be \"global\" or \"eu\"".into());
            }
            if let Some(u) = &g.base_url
                && let Err(why) = check_url(u)
            {
                bad("base_url", why);
            }
            if let Some(v) = &g.validation_behavior
                && !matches!(v.as_str(), "RELAXED" | "ENFORCE_RECOMMENDATIONS")
            {
                bad(
                    "validation_behavior",
                    "must be \"RELAXED\" or \"ENFORCE_RECOMMENDATIONS\"".into(),
                );
            }
            if g.client_id_property.trim().is_empty() {
                bad("client_id_property", "must not be empty".into());
            }
            if !matches!(g.user_data.as_str(), "with_user_id" | "always" | "never") {
                bad(
                    "user_data",
                    "must be \"with_user_id\", \"always\" or \"never\"".into(),
                );
            }
            for (k, c) in [
                ("consent_ad_user_data", &g.consent_ad_user_data),
                ("consent_ad_personalization", &g.consent_ad_personalization),
            ] {
                if !c.is_empty() && !is_consent_category(c) {
                    bad(
                        k,
                        format!("`{c}` is not a consent category (or \"\" for never)"),
                    );
                }
            }
            if g.max_event_age.is_zero() {
                bad("max_event_age", "must be more than 0".into());
            }
            for p in &g.params_from_properties {
                if let Some(why) = crate::destinations::ga4::name_problem(p, false) {
                    bad(
                        "params_from_properties",
                        format!("GA4 drops the param: {why}"),
                    );
                }
            }
        }
    }
}

fn is_api_version(v: &str, with_minor: bool) -> bool {
    let Some(rest) = v.strip_prefix('v') else {
        return false;
    };
    let mut parts = rest.split('.');
    let major_ok = parts
        .next()
        .is_some_and(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    let minor = parts.next();
    let minor_ok = match (with_minor, minor) {
        (true, Some(p)) => !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()),
        (false, None) => true,
        _ => false,
    };
    major_ok && minor_ok && parts.next().is_none()
}

/// The message never repeats the URL: one can carry a credential (user
/// info, a token in the query), and config errors go to logs and terminals.
fn check_url(u: &str) -> Result<(), String> {
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"))
        .ok_or_else(|| "must start with https:// or http://".to_string())?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err("has no host after the scheme".into());
    }
    Ok(())
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

pub(crate) fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{s}` is not a duration like \"48h\" or \"30m\" ({e})"
        ))
    })
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
        let DestinationKind::MetaCapi(m) = &d.kind else {
            panic!("wrong kind")
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
                c.destinations[name].kind.hashes_only(),
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
