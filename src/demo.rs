//! `switchyard demo`: publishes a sample stream to the canonical topic, runs
//! the router on it, reads every output topic back and prints what happened
//! to each event: which destinations got it, which did not and why, and
//! which records were dead-lettered. Then it runs every destination's sink
//! against a local stand-in of the vendor (the `switchyard-fakes` servers,
//! which check requests the way the vendor does) and prints, per
//! destination, what was sent, accepted, skipped and dead-lettered.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use thiserror::Error;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use chrono::{DateTime, Utc};
use switchyard_fakes::{self as fakes, Fake};

use crate::config::Config;
use crate::delivery::Delivery;
use crate::delivery::dead_letter::{header as sink_header, stage as dlq_stage};
use crate::destinations::Vendor;
use crate::event::{InvalidEvent, parse_event};
use crate::kafka::{self, Cluster, client};
use crate::router::route::{self, Skip};
use crate::run::RoleContext;
use crate::sink::records::LedgerEntry;

/// The sample stream shipped with switchyard (`examples/events.ndjson`).
pub const SAMPLE_EVENTS: &str = include_str!("../examples/events.ndjson");

/// The destinations the demo routes to without `--config` (`examples/demo.toml`).
pub const DEMO_CONFIG: &str = include_str!("../examples/demo.toml");

/// The built-in demo configuration.
pub fn demo_config() -> Config {
    Config::parse(
        DEMO_CONFIG,
        std::path::Path::new("examples/demo.toml"),
        &|_| None,
    )
    .expect("the shipped demo config is valid (tested)")
}

const READ_BACK_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum DemoError {
    #[error(transparent)]
    Kafka(#[from] kafka::Error),
    #[error("publishing line {line} failed: {source}")]
    Publish {
        line: usize,
        source: rdkafka::error::KafkaError,
    },
    #[error("reading the canonical topic back failed: {0}")]
    Consume(rdkafka::error::KafkaError),
    #[error("only {seen} of {expected} published records came back within {}s", READ_BACK_TIMEOUT.as_secs())]
    Incomplete { seen: usize, expected: usize },
    #[error("the router did not finish the sample within {}s", READ_BACK_TIMEOUT.as_secs())]
    RouterTimeout,
    #[error("the router failed")]
    Router(#[from] crate::router::RouterError),
    #[error("starting a vendor stand-in failed")]
    Fake(#[source] std::io::Error),
    #[error("a sink failed")]
    Sink(#[from] crate::sink::SinkError),
    #[error("not every delivery had an outcome within {}s: {waiting}", DELIVERY_TIMEOUT.as_secs())]
    DeliveryTimeout { waiting: String },
    #[error("writing the report failed")]
    Output(#[from] std::io::Error),
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DemoSummary {
    pub published: usize,
    pub valid: usize,
    pub invalid: usize,
    pub duplicates: usize,
    /// Deliveries written, over all destinations.
    pub routed: usize,
    /// Events the vendor stand-ins accepted, over all destinations.
    pub accepted: usize,
    /// Deliveries the sinks dead-lettered, over all destinations.
    pub dead_lettered: usize,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct DemoOptions {
    /// Publish the events with their own times instead of shifting them to now.
    pub keep_times: bool,
}

/// One destination's figures.
#[derive(Debug, Default)]
struct Tally {
    routed: usize,
    skipped_consent: usize,
    skipped_unmapped: usize,
    /// Events that went out in a request (not refused before sending).
    sent: usize,
    accepted: usize,
    /// (event_id, error class, reason) of each dead letter.
    dead_lettered: Vec<(String, String, String)>,
}

/// One published line: where it is in the input and where it landed in Kafka.
struct Published {
    line: usize,
    partition: i32,
    offset: i64,
}

pub async fn run(
    mut config: Config,
    cluster: &Cluster,
    input: &str,
    opts: DemoOptions,
    out: &mut dyn Write,
) -> Result<DemoSummary, DemoError> {
    let fakes = start_fakes(&mut config).await?;
    let config = Arc::new(config);
    kafka::topics::ensure(cluster, &config).await?;
    let topic = &config.topics.canonical;
    let input = if opts.keep_times {
        input.to_string()
    } else {
        let (shifted, by) = make_recent(input, Utc::now());
        if let Some(by) = by {
            writeln!(
                out,
                "event times shifted {} by {} so the latest is a minute ago (vendors refuse old and future events; --keep-times keeps them)",
                if by < chrono::Duration::zero() {
                    "back"
                } else {
                    "forward"
                },
                humantime::format_duration(Duration::from_secs(by.num_seconds().unsigned_abs()))
            )?;
        }
        shifted
    };
    let published = publish(&config, cluster, topic, &input).await?;
    writeln!(
        out,
        "published {} records to {topic} on {}{}",
        published.len(),
        cluster.bootstrap(),
        if cluster.is_embedded() {
            " (embedded broker, not durable)"
        } else {
            ""
        }
    )?;
    let records = read_back(&config, cluster, topic, &published).await?;
    route_all(&config, cluster, &published).await?;

    let outputs = collect_outputs(&config, cluster.bootstrap()).await?;
    let names: Vec<&str> = config
        .enabled_destinations()
        .map(|d| d.name.as_str())
        .collect();
    writeln!(
        out,
        "routed by the router to {} destinations: {}",
        names.len(),
        names.join(", ")
    )?;
    let mut summary = DemoSummary {
        published: published.len(),
        ..DemoSummary::default()
    };
    let mut tally: BTreeMap<String, Tally> = names
        .iter()
        .map(|n| (n.to_string(), Tally::default()))
        .collect();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for p in &published {
        let at = (p.partition, p.offset);
        let payload = &records[&at];
        let place = format!("p{}@{}", p.partition, p.offset);
        let ev = match parse_event(payload) {
            Ok(ev) => ev,
            Err(err) => {
                summary.invalid += 1;
                report_invalid(out, p.line, &place, payload, &err)?;
                if let Some(class) = outputs.dead_letters.get(&at) {
                    writeln!(out, "            → {} ({class})", config.topics.dlq())?;
                }
                continue;
            }
        };
        summary.valid += 1;
        let head = format!(
            "line {:>3}  {place:<8} {:<16} {:<16}",
            p.line,
            ev.event.as_str(),
            ev.event_id
        );
        if let Some(first) = first_line.get(&ev.event_id) {
            summary.duplicates += 1;
            writeln!(out, "{head} duplicate of line {first}: dropped")?;
            continue;
        }
        first_line.insert(ev.event_id.clone(), p.line);
        let got = outputs.delivered.get(&at).cloned().unwrap_or_default();
        summary.routed += got.len();
        let mut skipped = Vec::new();
        for d in config.enabled_destinations() {
            let t = tally
                .get_mut(&d.name)
                .expect("every destination has a tally");
            if got.contains(&d.name) {
                t.routed += 1;
                continue;
            }
            skipped.push(match route::select(d, &ev) {
                Err(skip) => {
                    match skip {
                        Skip::ConsentDenied { .. } | Skip::ConsentMissing { .. } => {
                            t.skipped_consent += 1
                        }
                        Skip::NotMapped | Skip::NotInAllowlist => t.skipped_unmapped += 1,
                    }
                    format!("{} ({})", d.name, skip.reason())
                }
                Ok(_) => format!("{} (not delivered)", d.name),
            });
        }
        let sent = if got.is_empty() {
            "-".to_string()
        } else {
            got.join(", ")
        };
        writeln!(out, "{head} → {sent}")?;
        if !skipped.is_empty() {
            writeln!(out, "            skipped: {}", skipped.join("; "))?;
        }
    }
    writeln!(
        out,
        "{} published: {} valid ({} duplicates dropped), {} invalid dead-lettered to {}; {} deliveries routed",
        summary.published,
        summary.valid,
        summary.duplicates,
        summary.invalid,
        config.topics.dlq(),
        summary.routed
    )?;

    writeln!(out)?;
    for (name, fake) in &fakes {
        writeln!(
            out,
            "{name}: local {} at {}",
            fake.vendor,
            fake.server.base_url()
        )?;
    }
    deliver_all(&config, cluster, &mut tally).await?;
    for (name, fake) in &fakes {
        if let Some(t) = tally.get_mut(name) {
            t.accepted = fake.server.accepted().len();
        }
    }
    report_delivery(out, &config, &tally)?;
    summary.accepted = tally.values().map(|t| t.accepted).sum();
    summary.dead_lettered = tally.values().map(|t| t.dead_lettered.len()).sum();
    Ok(summary)
}

/// Runs the real router until it has committed every published record.
async fn route_all(
    config: &Arc<Config>,
    cluster: &Cluster,
    published: &[Published],
) -> Result<(), DemoError> {
    let shutdown = CancellationToken::new();
    let ctx = RoleContext {
        config: config.clone(),
        bootstrap: cluster.bootstrap().to_string(),
        instance_id: format!("demo-{}", std::process::id()),
        shutdown: shutdown.clone(),
    };
    let mut router = tokio::spawn(crate::router::run(ctx));
    // The router runs in this process, so its own count of records in
    // committed batches says when the sample has been routed. (The embedded
    // mock cluster does not report transactionally committed group offsets.)
    let start = crate::router::records_committed();
    let want = published.len() as u64;
    let deadline = tokio::time::Instant::now() + READ_BACK_TIMEOUT;
    while crate::router::records_committed() - start < want {
        tokio::select! {
            done = &mut router => {
                // The router never stops on its own; finishing early is a failure.
                done.map_err(crate::router::RouterError::from)??;
                return Err(DemoError::RouterTimeout);
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        if tokio::time::Instant::now() > deadline {
            shutdown.cancel();
            return Err(DemoError::RouterTimeout);
        }
    }
    shutdown.cancel();
    router.await.map_err(crate::router::RouterError::from)??;
    Ok(())
}

/// What the router wrote, by the canonical record it came from.
struct Outputs {
    delivered: HashMap<(i32, i64), Vec<String>>,
    dead_letters: HashMap<(i32, i64), String>,
}

async fn collect_outputs(config: &Config, bootstrap: &str) -> Result<Outputs, DemoError> {
    let mut outputs = Outputs {
        delivered: HashMap::new(),
        dead_letters: HashMap::new(),
    };
    for d in config.enabled_destinations() {
        let records =
            kafka::reader::read_to_end(&config.kafka, bootstrap, &config.topics.deliver(&d.name))
                .await
                .map_err(DemoError::Consume)?;
        for r in records {
            if let Some(delivery) = r
                .payload()
                .and_then(|p| serde_json::from_slice::<Delivery>(p).ok())
            {
                outputs
                    .delivered
                    .entry((delivery.origin.partition, delivery.origin.offset))
                    .or_default()
                    .push(d.name.clone());
            }
        }
    }
    let dlq = kafka::reader::read_to_end(&config.kafka, bootstrap, &config.topics.dlq())
        .await
        .map_err(DemoError::Consume)?;
    for r in dlq {
        let h = kafka::reader::headers(&r);
        if let (Some(p), Some(o)) = (
            h.get(sink_header::ORIGIN_PARTITION)
                .and_then(|v| v.parse().ok()),
            h.get(sink_header::ORIGIN_OFFSET)
                .and_then(|v| v.parse().ok()),
        ) {
            let class = h.get(sink_header::ERROR_CLASS).cloned().unwrap_or_default();
            outputs.dead_letters.insert((p, o), class);
        }
    }
    Ok(outputs)
}

fn report_invalid(
    out: &mut dyn Write,
    line: usize,
    place: &str,
    payload: &[u8],
    err: &InvalidEvent,
) -> std::io::Result<()> {
    let id = serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get("event_id").and_then(|i| i.as_str()).map(String::from))
        .unwrap_or_else(|| "-".into());
    writeln!(
        out,
        "line {line:>3}  {place:<8} {:<16} {id:<24} INVALID ({})",
        "-",
        err.error_class()
    )?;
    match err {
        InvalidEvent::Schema(violations) => {
            for v in violations {
                writeln!(out, "            {v}")?;
            }
        }
        other => writeln!(out, "            {other}")?,
    }
    Ok(())
}

/// Publishes every non-blank line, keyed by its event_id when it has one so
/// duplicates meet in one partition; returns where each landed.
async fn publish(
    config: &Config,
    cluster: &Cluster,
    topic: &str,
    input: &str,
) -> Result<Vec<Published>, DemoError> {
    let producer: FutureProducer = client::idempotent_producer(&config.kafka, cluster.bootstrap())
        .create()
        .map_err(|e| DemoError::Kafka(kafka::Error::Client(e)))?;
    let mut out = Vec::new();
    for (i, line) in input.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let key = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("event_id").and_then(|i| i.as_str()).map(String::from));
        let mut record = FutureRecord::<str, str>::to(topic).payload(line);
        if let Some(k) = key.as_deref() {
            record = record.key(k);
        }
        let delivery = producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(source, _)| DemoError::Publish {
                line: i + 1,
                source,
            })?;
        out.push(Published {
            line: i + 1,
            partition: delivery.partition,
            offset: delivery.offset,
        });
    }
    Ok(out)
}

/// Reads exactly the published records back (the topic may hold older data).
async fn read_back(
    config: &Config,
    cluster: &Cluster,
    topic: &str,
    published: &[Published],
) -> Result<HashMap<(i32, i64), Vec<u8>>, DemoError> {
    let consumer: StreamConsumer = client::consumer(&config.kafka, cluster.bootstrap())
        .set("group.id", "switchyard-demo")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| DemoError::Kafka(kafka::Error::Client(e)))?;
    let mut first: HashMap<i32, i64> = HashMap::new();
    for p in published {
        let o = first.entry(p.partition).or_insert(p.offset);
        *o = (*o).min(p.offset);
    }
    let mut tpl = TopicPartitionList::new();
    for (&partition, &offset) in &first {
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
            .map_err(DemoError::Consume)?;
    }
    consumer.assign(&tpl).map_err(DemoError::Consume)?;

    let wanted: HashSet<(i32, i64)> = published.iter().map(|p| (p.partition, p.offset)).collect();
    let mut records = HashMap::with_capacity(wanted.len());
    let collect = async {
        while records.len() < wanted.len() {
            let m = consumer.recv().await.map_err(DemoError::Consume)?;
            let at = (m.partition(), m.offset());
            if wanted.contains(&at) {
                records.insert(at, m.payload().unwrap_or_default().to_vec());
            }
        }
        Ok::<_, DemoError>(())
    };
    match tokio::time::timeout(READ_BACK_TIMEOUT, collect).await {
        Ok(r) => r?,
        Err(_) => {
            return Err(DemoError::Incomplete {
                seen: records.len(),
                expected: wanted.len(),
            });
        }
    }
    Ok(records)
}

/// A vendor stand-in the demo delivers to.
struct DemoFake {
    vendor: &'static str,
    server: Fake,
}

/// Starts a stand-in for every enabled destination, with the credentials its
/// config names, and points the destination at it.
async fn start_fakes(config: &mut Config) -> Result<BTreeMap<String, DemoFake>, DemoError> {
    let mut fakes = BTreeMap::new();
    for (name, dest) in config.destinations.iter_mut().filter(|(_, d)| d.enabled) {
        let (vendor, server) = match &mut dest.vendor {
            Vendor::Webhook(w) => {
                let server = fakes::serve(fakes::webhook::Settings {
                    secret: w.secret.expose().to_string(),
                    ..Default::default()
                })
                .await
                .map_err(DemoError::Fake)?;
                w.url = format!("{}/{name}", server.base_url());
                ("signed-webhook receiver", server)
            }
            Vendor::MetaCapi(m) => {
                let server = fakes::serve(fakes::meta::Settings {
                    pixel_id: m.pixel_id.clone(),
                    access_token: m.access_token.expose().to_string(),
                    ..Default::default()
                })
                .await
                .map_err(DemoError::Fake)?;
                m.base_url = server.base_url();
                ("Meta Conversions API", server)
            }
            Vendor::TiktokEvents(t) => {
                let server = fakes::serve(fakes::tiktok::Settings {
                    pixel_code: t.pixel_code.clone(),
                    access_token: t.access_token.expose().to_string(),
                    ..Default::default()
                })
                .await
                .map_err(DemoError::Fake)?;
                t.base_url = server.base_url();
                ("TikTok Events API", server)
            }
            Vendor::GoogleAds(g) => {
                let digits = |s: &str| s.chars().filter(char::is_ascii_digit).collect::<String>();
                let server = fakes::serve(fakes::google_ads::Settings {
                    customer_id: digits(&g.customer_id),
                    login_customer_id: g.login_customer_id.as_deref().map(digits),
                    developer_token: g.developer_token.expose().to_string(),
                    access_token: g
                        .access_token
                        .as_ref()
                        .map(|t| t.expose().to_string())
                        .unwrap_or_default(),
                    oauth: match &g.oauth {
                        Some(o) => fakes::google_ads::OAuthClient {
                            client_id: o.client_id.clone(),
                            client_secret: o.client_secret.expose().to_string(),
                            refresh_token: o.refresh_token.expose().to_string(),
                            ..Default::default()
                        },
                        None => Default::default(),
                    },
                    conversion_actions: g.conversion_actions.values().cloned().collect(),
                    ..Default::default()
                })
                .await
                .map_err(DemoError::Fake)?;
                g.base_url = server.base_url();
                if let Some(o) = &mut g.oauth {
                    o.token_url = format!("{}/token", server.base_url());
                }
                ("Google Ads API", server)
            }
            Vendor::Ga4(g) => {
                let server = fakes::serve(fakes::ga4::Settings {
                    measurement_id: g.measurement_id.clone(),
                    api_secret: g.api_secret.expose().to_string(),
                    ..Default::default()
                })
                .await
                .map_err(DemoError::Fake)?;
                g.base_url = Some(server.base_url());
                ("GA4 Measurement Protocol", server)
            }
            Vendor::Mixpanel(m) => {
                use crate::destinations::mixpanel::{Auth, IdMerge};
                let server =
                    fakes::serve(fakes::mixpanel::Mixpanel::new(fakes::mixpanel::Settings {
                        project_id: m.project_id.clone().unwrap_or_default(),
                        service_account_username: m
                            .service_account_username
                            .clone()
                            .unwrap_or_default(),
                        service_account_secret: m
                            .service_account_secret
                            .as_ref()
                            .map(|s| s.expose().to_string())
                            .unwrap_or_default(),
                        api_secret: match m.auth {
                            Auth::ApiSecret => m
                                .api_secret
                                .as_ref()
                                .map(|s| s.expose().to_string())
                                .unwrap_or_default(),
                            Auth::ServiceAccount => String::new(),
                        },
                        project_token: m.project_token.clone(),
                        id_merge: match m.id_merge {
                            IdMerge::Simplified => fakes::mixpanel::IdMerge::Simplified,
                            IdMerge::Original => fakes::mixpanel::IdMerge::Original,
                        },
                        revenue_property: m.revenue_property.clone(),
                        currency_property: m.currency_property.clone(),
                        ..Default::default()
                    }))
                    .await
                    .map_err(DemoError::Fake)?;
                m.base_url = Some(server.base_url());
                ("Mixpanel Import/Engage API", server)
            }
            Vendor::Posthog(p) => {
                let server = fakes::serve(fakes::posthog::Settings {
                    api_key: p.api_key.expose().to_string(),
                    ..Default::default()
                })
                .await
                .map_err(DemoError::Fake)?;
                p.base_url = Some(server.base_url());
                ("PostHog capture API", server)
            }
            Vendor::Amplitude(a) => {
                let server = fakes::serve(fakes::amplitude::Settings {
                    api_key: a.api_key.expose().to_string(),
                    ..Default::default()
                })
                .await
                .map_err(DemoError::Fake)?;
                a.base_url = Some(server.base_url());
                ("Amplitude HTTP V2 API", server)
            }
            Vendor::Customerio(c) => {
                let server = fakes::serve(fakes::customerio::Settings {
                    site_id: c.site_id.clone(),
                    api_key: c.api_key.expose().to_string(),
                    ..Default::default()
                })
                .await
                .map_err(DemoError::Fake)?;
                c.base_url = Some(server.base_url());
                ("Customer.io Track API", server)
            }
            Vendor::Klaviyo(k) => {
                let server = fakes::serve(fakes::klaviyo::Settings {
                    api_key: k.api_key.expose().to_string(),
                    ..Default::default()
                })
                .await
                .map_err(DemoError::Fake)?;
                k.base_url = Some(server.base_url());
                ("Klaviyo events and profile-import API", server)
            }
        };
        fakes.insert(name.clone(), DemoFake { vendor, server });
    }
    Ok(fakes)
}

/// Moves every event time by the same amount so the latest is a minute ago:
/// the vendors refuse events older than a few days or in the future, and the
/// shipped sample was written for one day. Lines that are not JSON objects
/// with an RFC 3339 `occurred_at` stay as they are (they are the sample's
/// invalid records).
fn make_recent(input: &str, now: DateTime<Utc>) -> (String, Option<chrono::Duration>) {
    let time_of = |line: &str| -> Option<(serde_json::Value, DateTime<Utc>)> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let t = DateTime::parse_from_rfc3339(v.get("occurred_at")?.as_str()?).ok()?;
        Some((v, t.with_timezone(&Utc)))
    };
    let Some(latest) = input
        .lines()
        .filter_map(|l| time_of(l).map(|(_, t)| t))
        .max()
    else {
        return (input.to_string(), None);
    };
    let by = now - chrono::Duration::minutes(1) - latest;
    // Already recent (and not ahead of the clock): leave the times alone.
    if by >= chrono::Duration::zero() && by < chrono::Duration::minutes(5) {
        return (input.to_string(), None);
    }
    let mut out = String::with_capacity(input.len());
    for line in input.lines() {
        match time_of(line) {
            Some((mut v, t)) => {
                v["occurred_at"] = serde_json::Value::String(
                    (t + by).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                );
                out.push_str(&v.to_string());
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    (out, Some(by))
}

const DELIVERY_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs every destination's sink until each delivery has a durable outcome
/// in the ledger, then reads back what was sent and dead-lettered.
async fn deliver_all(
    config: &Arc<Config>,
    cluster: &Cluster,
    tally: &mut BTreeMap<String, Tally>,
) -> Result<(), DemoError> {
    let shutdown = CancellationToken::new();
    let mut sinks = tokio::task::JoinSet::new();
    for name in tally.keys() {
        let ctx = RoleContext {
            config: config.clone(),
            bootstrap: cluster.bootstrap().to_string(),
            instance_id: format!("demo-{}", std::process::id()),
            shutdown: shutdown.clone(),
        };
        let name = name.clone();
        sinks.spawn(async move { crate::sink::run(ctx, &name, || {}).await });
    }
    let deadline = tokio::time::Instant::now() + DELIVERY_TIMEOUT;
    let outcomes = loop {
        let outcomes = read_outcomes(config, cluster.bootstrap()).await?;
        let waiting: Vec<String> = tally
            .iter()
            .filter(|(name, t)| outcomes.get(*name).map_or(0, HashMap::len) < t.routed)
            .map(|(name, _)| name.clone())
            .collect();
        if waiting.is_empty() {
            break outcomes;
        }
        if tokio::time::Instant::now() > deadline {
            shutdown.cancel();
            return Err(DemoError::DeliveryTimeout {
                waiting: waiting.join(", "),
            });
        }
        tokio::select! {
            Some(done) = sinks.join_next() => {
                // Sinks run until told to stop; one that ends early failed.
                shutdown.cancel();
                done.map_err(|e| crate::sink::SinkError::Task(e.to_string()))??;
                return Err(DemoError::DeliveryTimeout { waiting: waiting.join(", ") });
            }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    };
    shutdown.cancel();
    while let Some(done) = sinks.join_next().await {
        done.map_err(|e| crate::sink::SinkError::Task(e.to_string()))??;
    }
    for (name, t) in tally.iter_mut() {
        t.sent = outcomes
            .get(name)
            .map_or(0, |o| o.values().filter(|e| e.attempts > 0).count());
    }
    let dlq = kafka::reader::read_to_end(&config.kafka, cluster.bootstrap(), &config.topics.dlq())
        .await
        .map_err(DemoError::Consume)?;
    for r in dlq {
        let h = kafka::reader::headers(&r);
        let stage = h.get(sink_header::STAGE).map(String::as_str);
        let Some(t) = h
            .get(sink_header::DESTINATION)
            .filter(|_| stage == Some(dlq_stage::SINK))
            .and_then(|d| tally.get_mut(d))
        else {
            continue;
        };
        let event_id = r
            .payload()
            .and_then(|p| serde_json::from_slice::<Delivery>(p).ok())
            .map(|d| d.event.event_id)
            .unwrap_or_default();
        let field = |k: &str| h.get(k).cloned().unwrap_or_default();
        t.dead_lettered.push((
            event_id,
            field(sink_header::ERROR_CLASS),
            field(sink_header::REASON),
        ));
    }
    Ok(())
}

/// The delivery ledger by destination and event_id (latest entry wins).
async fn read_outcomes(
    config: &Config,
    bootstrap: &str,
) -> Result<HashMap<String, HashMap<String, LedgerEntry>>, DemoError> {
    let records = kafka::reader::read_to_end(&config.kafka, bootstrap, &config.topics.outcomes())
        .await
        .map_err(DemoError::Consume)?;
    let mut by_dest: HashMap<String, HashMap<String, LedgerEntry>> = HashMap::new();
    for r in records {
        if let Some(e) = r
            .payload()
            .and_then(|p| serde_json::from_slice::<LedgerEntry>(p).ok())
        {
            by_dest
                .entry(e.destination.clone())
                .or_default()
                .insert(e.event_id.clone(), e);
        }
    }
    Ok(by_dest)
}

fn report_delivery(
    out: &mut dyn Write,
    config: &Config,
    tally: &BTreeMap<String, Tally>,
) -> std::io::Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "{:<12} {:<14} {:>6} {:>5} {:>8} {:>13} {:>16} {:>18}",
        "destination",
        "type",
        "routed",
        "sent",
        "accepted",
        "dead-lettered",
        "skipped: consent",
        "skipped: unmapped"
    )?;
    for (name, t) in tally {
        let kind = config
            .destinations
            .get(name)
            .map_or("?", |d| d.vendor.spec().type_name);
        writeln!(
            out,
            "{name:<12} {kind:<14} {:>6} {:>5} {:>8} {:>13} {:>16} {:>18}",
            t.routed,
            t.sent,
            t.accepted,
            t.dead_lettered.len(),
            t.skipped_consent,
            t.skipped_unmapped
        )?;
    }
    for (name, t) in tally {
        for (event_id, class, reason) in &t.dead_lettered {
            writeln!(out, "dead letter  {name}: {event_id} ({class}): {reason}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_times_move_together_and_invalid_lines_stay() {
        let input = "{\"event_id\":\"a\",\"occurred_at\":\"2026-01-01T00:00:00Z\"}\n{not json\n{\"event_id\":\"b\",\"occurred_at\":\"2026-01-01T00:10:00Z\"}\n";
        let now = DateTime::parse_from_rfc3339("2026-01-08T00:11:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let (out, by) = make_recent(input, now);
        assert_eq!(by, Some(chrono::Duration::days(7)));
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].contains("2026-01-08T00:00:00Z"), "{out}");
        assert_eq!(lines[1], "{not json");
        assert!(lines[2].contains("2026-01-08T00:10:00Z"), "{out}");
        // Already recent: untouched.
        assert_eq!(make_recent(&out, now).1, None);
        // Ahead of the clock: moved back.
        let ahead = "{\"event_id\":\"a\",\"occurred_at\":\"2026-01-09T00:00:00Z\"}\n";
        let (back, by) = make_recent(ahead, now);
        assert_eq!(by, Some(-chrono::Duration::minutes(23 * 60 + 50)));
        assert!(back.contains("2026-01-08T00:10:00Z"), "{back}");
    }
}
