//! Role wiring: builds what one destination's sink runs on (the vendor
//! client, the producer, the shared state its batches use, the consumer and
//! its rebalance context), runs the [`Engine`] until shutdown, and leaves
//! nothing tracked behind.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Statistics, TopicPartitionList};

use super::config::DeliverySettings;
use super::destination::Limits;
use super::engine::Engine;
use super::handover::Ownership;
use super::metrics::{self, RETRY_QUEUE};
use super::pace::Pace;
use super::records::LedgerIndex;
use super::send::{self, Shared};
use super::{SinkError, auth, batching, scan};
use crate::kafka::client::{self, ProducerGuard};
use crate::kafka::rebalance::{self, GroupConsumer};
use crate::run::RoleContext;

/// `started` is called once the sink has checked its topics and subscribed:
/// until then `/readyz` must not call it running, or a sink that fails at
/// start would look ready between its restarts.
pub async fn run(
    ctx: RoleContext,
    destination: &str,
    started: impl FnOnce() + Send,
) -> Result<(), SinkError> {
    let config = ctx.config.clone();
    let dest = config
        .destinations
        .get(destination)
        .filter(|d| d.enabled)
        .ok_or_else(|| SinkError::UnknownDestination(destination.to_string()))?;
    let vendor = dest.vendor.build();
    let vendor_oauth = vendor.oauth().cloned().map(auth::TokenSource::new);
    let settings = dest.delivery.clone();
    let vendor_limits = vendor.limits();
    let limits = Limits {
        max_events: settings.batch_max_events.min(vendor_limits.max_events),
        max_bytes: settings.batch_max_bytes.min(vendor_limits.max_bytes),
        max_event_age: vendor_limits.max_event_age,
    };
    let topics = &config.topics;
    let ledger = if vendor.vendor_dedup() {
        None
    } else {
        let index = load_ledger(&ctx, destination, &settings).await?;
        tracing::info!(
            destination,
            delivered = index.len(),
            oldest = ?index.oldest(),
            "delivery ledger loaded"
        );
        Some(Mutex::new(index))
    };
    let mut producer_config = client::idempotent_producer(&config.kafka, &ctx.bootstrap);
    client::set_default(
        &mut producer_config,
        "message.timeout.ms",
        &send::PRODUCE_TIMEOUT.as_millis().to_string(),
    );
    let producer = ProducerGuard::new(producer_config, format!("sink {destination}"))?;
    let http = send::vendor_client(&settings)?;
    let ownership = Arc::new(Ownership::default());
    let shared = Arc::new(Shared {
        destination: destination.to_string(),
        vendor,
        pace: Pace::new(&settings.rate_limit, limits.max_events),
        settings,
        limits,
        http,
        producer,
        ownership: ownership.clone(),
        dlq_topic: topics.dlq(),
        copy_limit: ctx.config.router.routed_record_bytes(),
        cut_to: ctx.config.router.max_record_bytes.min(send::OVERSIZE_KEEP),
        outcomes_topic: topics.outcomes(),
        retry_topic: topics.retry(destination),
        ledger,
        tokens: vendor_oauth,
    });

    let group = group_id(&ctx.config, destination);
    let deliver_topic = topics.deliver(destination);
    if shared.settings.ordering {
        check_copartitioned(&ctx, &deliver_topic, &shared.retry_topic).await?;
    }
    let mut consumer_config = client::manual_commit_consumer(&config.kafka, &ctx.bootstrap, &group);
    if shared.settings.ordering {
        colocate(&mut consumer_config, destination);
    }
    consumer_config
        .set(
            "group.instance.id",
            ctx.group_instance_id(&format!("sink-{destination}")),
        )
        // Statistics carry the per-partition lag behind the lag gauge.
        .set("statistics.interval.ms", "5000");
    // Brokers may hold a fetch for the whole wait even when records are
    // there (tansu 0.6 does), which would add up to 500 ms to every delivery;
    // 20 ms keeps the added latency low at the cost of ~50 idle fetches/s.
    client::set_default(&mut consumer_config, "fetch.wait.max.ms", "20");
    let consumer = GroupConsumer::new(consumer_config.create_with_context(SinkContext {
        cooperative: rebalance::is_cooperative(&consumer_config),
        destination: destination.to_string(),
        ownership: ownership.clone(),
        handover_timeout: shared.settings.handover_timeout,
    })?);
    consumer.subscribe(&[&deliver_topic, &shared.retry_topic])?;
    tracing::info!(destination, group, "sink started");
    started();

    let mut engine = Engine::new(shared.clone());
    let result = engine.run(&consumer, &ctx.shutdown).await;
    // Whatever is durable is committed, also when stopping on an error; then
    // nothing is tracked, so the consumer's closing revoke waits for nothing.
    engine.commit(&consumer, CommitMode::Sync);
    ownership.release_all();
    drop(consumer);
    let _ = shared.producer.flush(Duration::from_secs(5));
    RETRY_QUEUE.with_label_values(&[destination]).set(0);
    if shared.settings.ordering {
        metrics::PARKED_EVENTS
            .with_label_values(&[destination])
            .set(0);
    }
    tracing::info!(destination, "sink stopped");
    result
}

/// With ordering, the instance that parks a person's event must be the one
/// that reads it back, or it never sees it resolved (decision 0003). Parked
/// records go to their deliver partition's number on the retry topic, and
/// the range assignor gives partition k of both topics to one member.
fn colocate(consumer_config: &mut rdkafka::ClientConfig, destination: &str) {
    if consumer_config
        .get("group.protocol")
        .is_some_and(|p| p.trim().eq_ignore_ascii_case("consumer"))
    {
        // The broker assigns: only `group.remote.assignor = "range"` co-locates.
        if consumer_config.get("group.remote.assignor") != Some("range") {
            tracing::warn!(
                destination,
                "ordering needs group.remote.assignor = \"range\" with group.protocol = consumer; parked people may be tracked where they are never resolved"
            );
        }
        return;
    }
    if let Some(configured) = consumer_config
        .get("partition.assignment.strategy")
        .filter(|s| s.trim() != "range")
    {
        tracing::warn!(
            destination,
            configured,
            "ordering needs the range assignor; this sink uses it instead"
        );
    }
    consumer_config.set("partition.assignment.strategy", "range");
}

/// With ordering, a person's deliver and retry partitions have one number:
/// both topics need the same partition count.
async fn check_copartitioned(
    ctx: &RoleContext,
    deliver: &str,
    retry: &str,
) -> Result<(), SinkError> {
    let kafka = ctx.config.kafka.clone();
    let bootstrap = ctx.bootstrap.clone();
    let counts = tokio::task::spawn_blocking(move || {
        let admin = client::base(&kafka, &bootstrap)
            .create()
            .map_err(crate::kafka::Error::Client)?;
        crate::kafka::topics::existing_partitions(&admin, &bootstrap)
    })
    .await
    .map_err(|e| SinkError::Task(e.to_string()))??;
    let count = |t: &str| counts.get(t).copied().unwrap_or(0);
    if count(deliver) != count(retry) {
        return Err(SinkError::NotCopartitioned {
            deliver: deliver.to_string(),
            deliver_partitions: count(deliver),
            retry: retry.to_string(),
            retry_partitions: count(retry),
        });
    }
    Ok(())
}

/// The consumer's context: hands partitions over on a rebalance, and
/// publishes consumer lag from librdkafka's statistics.
pub(super) struct SinkContext {
    /// Decided by the config (see `kafka::rebalance`), never asked of librdkafka.
    cooperative: bool,
    destination: String,
    ownership: Arc<Ownership>,
    handover_timeout: Duration,
}

impl ClientContext for SinkContext {
    fn stats(&self, statistics: Statistics) {
        for (name, topic) in &statistics.topics {
            let lag: i64 = topic
                .partitions
                .values()
                .map(|p| p.consumer_lag)
                .filter(|l| *l > 0)
                .sum();
            metrics::CONSUMER_LAG
                .with_label_values(&[&self.destination, name])
                .set(lag);
        }
    }
}

impl ConsumerContext for SinkContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        rebalance::apply(self, consumer, self.cooperative, err, tpl);
    }

    /// Runs before librdkafka gives the partitions up (and before the group
    /// assigns them to anyone else): their durable progress is committed
    /// here, and nothing of them is committed by this instance afterwards.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let parts: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                let report = self.ownership.hand_over(&parts, self.handover_timeout);
                if !report.commits.is_empty()
                    && let Err(e) = batching::commit(consumer, &report.commits, CommitMode::Sync)
                {
                    // The next owner re-reads from the previous commit: duplicates, no loss.
                    tracing::warn!(destination = %self.destination, error = %e, "final commit of the partitions handed over failed");
                }
                if report.abandoned > 0 {
                    tracing::warn!(destination = %self.destination, events = report.abandoned, "handover deadline passed: events in flight were let go uncommitted (their next owner resends them)");
                }
                tracing::info!(
                    destination = %self.destination,
                    partitions = ?parts,
                    waited_ms = report.waited.as_millis() as u64,
                    committed = ?report.commits,
                    "partitions handed over"
                );
            }
            Rebalance::Assign(tpl) => {
                self.ownership.note_assignment();
                let parts: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect();
                tracing::info!(destination = %self.destination, partitions = ?parts, "partitions assigned");
            }
            Rebalance::Error(e) => {
                tracing::warn!(destination = %self.destination, error = %e, "rebalance error")
            }
        }
    }
}

async fn load_ledger(
    ctx: &RoleContext,
    destination: &str,
    settings: &DeliverySettings,
) -> Result<LedgerIndex, SinkError> {
    let kafka = ctx.config.kafka.clone();
    let bootstrap = ctx.bootstrap.clone();
    let topic = ctx.config.topics.outcomes();
    let destination = destination.to_string();
    let (window, max_entries) = (settings.ledger_window, settings.ledger_max_entries);
    tokio::task::spawn_blocking(move || {
        let now = Utc::now();
        let mut index = LedgerIndex::new(window, max_entries);
        // Outcomes older than the window are not even read.
        let since = now - chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
        scan::scan_topic_since(
            &kafka,
            &bootstrap,
            &topic,
            Some(since.timestamp_millis()),
            |m| {
                use rdkafka::Message;
                if let Some(key) = m.key() {
                    index.apply(&destination, key, m.payload(), now);
                }
            },
        )?;
        index.loaded(Utc::now());
        Ok(index)
    })
    .await
    .map_err(|e| SinkError::Task(e.to_string()))?
}

/// The consumer group of one destination's sink: `<prefix>-sink-<NAME>`, so
/// deployments (and tests) with different topic prefixes never share groups.
pub fn group_id(config: &crate::config::Config, destination: &str) -> String {
    format!("{}-sink-{destination}", config.topics.prefix)
}
