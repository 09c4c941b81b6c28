//! `switchyard run --role sink --destination NAME`: drains
//! `<prefix>.deliver.<NAME>` (and its retry topic) in consumer group
//! `<prefix>-sink-<NAME>` (`switchyard-sink-<NAME>` by default), delivers in batches, and commits a record's
//! offset only once its outcome is durable.
//!
//! The engine is one task that owns the consumer and all bookkeeping; each
//! batch runs in its own task ([`send::deliver`]) and reports back what it
//! made durable. Bounded: at most `max_in_flight` batches and a fixed number
//! of buffered records, after which the engine stops reading.

pub mod auth;
pub mod bench;
pub mod config;
pub mod destination;
pub mod dlq;
pub mod metrics;
pub mod offsets;
pub mod pace;
pub mod records;
pub mod retry;
pub mod scan;
pub mod send;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::{ClientContext, Statistics};
use rdkafka::{Offset, TopicPartitionList};
use thiserror::Error;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::kafka::client;
use crate::run::{RoleContext, SHUTDOWN_DEADLINE};
use destination::Limits;
use metrics::RETRY_QUEUE;
use offsets::OffsetTracker;
use pace::Pace;
use records::{Final, Item, LedgerIndex};
use send::{Done, DoneKind, Shared};

/// How often durable progress is committed.
const COMMIT_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Debug, Error)]
pub enum SinkError {
    #[error("unknown or disabled destination `{0}`")]
    UnknownDestination(String),
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("writing an outcome failed: {0}")]
    Produce(KafkaError),
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("reading {topic}: {message}")]
    Scan { topic: String, message: String },
    #[error("batch task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Cluster(#[from] crate::kafka::Error),
}

pub async fn run(ctx: RoleContext, destination: &str) -> Result<(), SinkError> {
    let config = ctx.config.clone();
    let dest = config
        .destinations
        .get(destination)
        .filter(|d| d.enabled)
        .ok_or_else(|| SinkError::UnknownDestination(destination.to_string()))?;
    let vendor = crate::destinations::build(dest);
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
        let index = load_ledger(&ctx, destination).await?;
        tracing::info!(
            destination,
            delivered = index.len(),
            "delivery ledger loaded"
        );
        Some(Mutex::new(index))
    };
    let producer: FutureProducer =
        client::idempotent_producer(&config.kafka, &ctx.bootstrap).create()?;
    let http = reqwest::Client::builder()
        .timeout(settings.request_timeout)
        .pool_max_idle_per_host(settings.max_in_flight)
        .build()?;
    let shared = Arc::new(Shared {
        destination: destination.to_string(),
        vendor,
        pace: Pace::new(&settings.rate_limit, limits.max_events),
        settings,
        limits,
        http,
        producer,
        dlq_topic: topics.dlq(),
        outcomes_topic: topics.outcomes(),
        retry_topic: topics.retry(destination),
        ledger,
        tokens: vendor_oauth,
    });

    let group = group_id(&ctx.config, destination);
    let mut consumer_config = client::manual_commit_consumer(&config.kafka, &ctx.bootstrap, &group);
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
    if !config.kafka.properties.contains_key("fetch.wait.max.ms") {
        consumer_config.set("fetch.wait.max.ms", "20");
    }
    let consumer: SinkConsumer = consumer_config.create_with_context(LagReporter {
        destination: destination.to_string(),
    })?;
    let deliver_topic = topics.deliver(destination);
    consumer.subscribe(&[&deliver_topic, &shared.retry_topic])?;
    tracing::info!(destination, group, "sink started");

    let mut engine = Engine {
        max_buffered: shared.limits.max_events * (shared.settings.max_in_flight + 2),
        shared: shared.clone(),
        tracker: OffsetTracker::default(),
        ready: VecDeque::new(),
        ready_bytes: 0,
        ready_since: None,
        active: HashMap::new(),
        held: 0,
        parked: HashMap::new(),
        delayed: BTreeMap::new(),
        inflight: JoinSet::new(),
        cancel: CancellationToken::new(),
    };
    let result = engine.run(&consumer, &ctx.shutdown).await;
    // Whatever is durable is committed, also when stopping on an error.
    engine.commit(&consumer, CommitMode::Sync);
    let _ = shared.producer.flush(Duration::from_secs(5));
    RETRY_QUEUE.with_label_values(&[destination]).set(0);
    tracing::info!(destination, "sink stopped");
    result
}

/// Publishes consumer lag from librdkafka's statistics.
struct LagReporter {
    destination: String,
}

impl ClientContext for LagReporter {
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

impl ConsumerContext for LagReporter {}

type SinkConsumer = StreamConsumer<LagReporter>;

async fn load_ledger(ctx: &RoleContext, destination: &str) -> Result<LedgerIndex, SinkError> {
    let kafka = ctx.config.kafka.clone();
    let bootstrap = ctx.bootstrap.clone();
    let topic = ctx.config.topics.outcomes();
    let destination = destination.to_string();
    tokio::task::spawn_blocking(move || {
        let mut index = LedgerIndex::default();
        scan::scan_topic(&kafka, &bootstrap, &topic, |m| {
            use rdkafka::Message;
            if let Some(key) = m.key() {
                index.apply(&destination, key, m.payload());
            }
        })?;
        Ok(index)
    })
    .await
    .map_err(|e| SinkError::Task(e.to_string()))?
}

struct Engine {
    shared: Arc<Shared>,
    tracker: OffsetTracker,
    ready: VecDeque<Item>,
    ready_bytes: usize,
    /// When the oldest item in `ready` arrived (the linger clock).
    ready_since: Option<Instant>,
    /// With ordering: people with an event in `ready` or in flight, and their
    /// later events waiting behind it.
    active: HashMap<String, VecDeque<Item>>,
    held: usize,
    /// With ordering: people with events on the retry topic.
    parked: HashMap<String, ParkedPerson>,
    /// Retry-topic records read before they are due, per partition (paused).
    delayed: BTreeMap<i32, VecDeque<Item>>,
    inflight: JoinSet<Result<Vec<Done>, SinkError>>,
    max_buffered: usize,
    /// Tells batches to stop retrying (shutdown).
    cancel: CancellationToken,
}

impl Engine {
    async fn run(
        &mut self,
        consumer: &SinkConsumer,
        shutdown: &CancellationToken,
    ) -> Result<(), SinkError> {
        let mut commit_tick = tokio::time::interval(COMMIT_INTERVAL);
        let mut stop_by: Option<Instant> = None;
        loop {
            let max_in_flight = self.shared.settings.max_in_flight;
            let linger_at = self
                .ready_since
                .filter(|_| self.inflight.len() < max_in_flight && stop_by.is_none())
                .map(|t| t + self.shared.settings.linger);
            let due_at = self.next_due();
            let can_read = stop_by.is_none() && self.buffered() < self.max_buffered;
            tokio::select! {
                _ = shutdown.cancelled(), if stop_by.is_none() => {
                    // Batches stop retrying and report what is durable; the
                    // rest stays uncommitted for the partition's next owner.
                    self.cancel.cancel();
                    stop_by = Some(Instant::now() + SHUTDOWN_DEADLINE - Duration::from_secs(5));
                }
                joined = self.inflight.join_next(), if !self.inflight.is_empty() => {
                    match joined {
                        Some(Ok(Ok(done))) => done.into_iter().for_each(|d| self.on_done(d)),
                        Some(Ok(Err(e))) => return Err(e),
                        Some(Err(e)) => return Err(SinkError::Task(e.to_string())),
                        None => {}
                    }
                }
                msg = consumer.recv(), if can_read => {
                    let item = Item::from_message(&msg?);
                    self.tracker.seen(&item.source.topic, item.source.partition, item.source.offset);
                    self.accept(item, consumer);
                }
                _ = sleep_until_opt(linger_at), if linger_at.is_some() => {}
                _ = sleep_until_opt(due_at), if due_at.is_some() => self.release_due(consumer),
                _ = commit_tick.tick() => {
                    self.commit(consumer, CommitMode::Async);
                    RETRY_QUEUE
                        .with_label_values(&[&self.shared.destination])
                        .set(i64::try_from(self.delayed.values().map(VecDeque::len).sum::<usize>()).unwrap_or(i64::MAX));
                }
                _ = sleep_until_opt(stop_by), if stop_by.is_some() => {
                    tracing::warn!(destination = %self.shared.destination, batches = self.inflight.len(), "shutdown deadline passed; abandoning in-flight batches (their offsets stay uncommitted)");
                    self.inflight.abort_all();
                    return Ok(());
                }
            }
            if stop_by.is_some() {
                if self.inflight.is_empty() {
                    return Ok(());
                }
                continue;
            }
            while self.should_flush() {
                self.flush();
            }
        }
    }

    fn buffered(&self) -> usize {
        self.ready.len() + self.held + self.delayed.values().map(VecDeque::len).sum::<usize>()
    }

    fn next_due(&self) -> Option<Instant> {
        self.delayed
            .values()
            .filter_map(|q| q.front().and_then(|i| i.due))
            .min()
            .map(instant_at)
    }

    /// Routes a record just read.
    fn accept(&mut self, item: Item, consumer: &SinkConsumer) {
        let p = item.source.partition;
        let waiting = item.source.topic == self.shared.retry_topic
            && self.delayed.get(&p).is_some_and(|q| !q.is_empty());
        // A record behind one that is not due yet waits too, even if it is
        // due itself: the retry partition keeps each person's order.
        if waiting || item.due.is_some_and(|due| due > Utc::now()) {
            let queue = self.delayed.entry(p).or_default();
            if queue.is_empty() {
                // Reading on would only pile up records that are not due either.
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&item.source.topic, p);
                if let Err(e) = consumer.pause(&tpl) {
                    tracing::warn!(destination = %self.shared.destination, partition = p, error = %e, "cannot pause the retry partition");
                }
            }
            queue.push_back(item);
            return;
        }
        self.admit(item);
    }

    fn release_due(&mut self, consumer: &SinkConsumer) {
        let now = Utc::now();
        let mut released = Vec::new();
        let mut emptied = Vec::new();
        for (p, q) in &mut self.delayed {
            while q.front().is_some_and(|i| i.due.is_none_or(|d| d <= now)) {
                released.extend(q.pop_front());
            }
            if q.is_empty() {
                emptied.push(*p);
            }
        }
        for p in emptied {
            self.delayed.remove(&p);
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(&self.shared.retry_topic, p);
            if let Err(e) = consumer.resume(&tpl) {
                tracing::warn!(destination = %self.shared.destination, partition = p, error = %e, "cannot resume the retry partition");
            }
        }
        for item in released {
            self.admit(item);
        }
    }

    /// An item that may be sent now (subject to ordering and the ledger).
    fn admit(&mut self, item: Item) {
        if let (Some(ledger), Some(id)) = (&self.shared.ledger, item.event_id())
            && ledger.lock().expect("ledger lock").is_delivered(id)
        {
            tracing::debug!(destination = %self.shared.destination, event_id = id, "already delivered; skipped");
            metrics::EVENTS
                .with_label_values(&[&self.shared.destination, "skipped_duplicate"])
                .inc();
            let source = &item.source;
            self.tracker
                .done(&source.topic, source.partition, source.offset);
            // Not sent, so it releases nobody waiting behind an event in
            // flight; but if it was parked, it no longer holds anyone back.
            self.unpark(item.anchor(), item.origin.offset);
            return;
        }
        let anchor = item.anchor().to_string();
        if !self.shared.settings.ordering || anchor.is_empty() {
            self.push_ready(item);
            return;
        }
        if let Some(queue) = self.active.get_mut(&anchor) {
            queue.push_back(item);
            self.held += 1;
        } else if let Some(due) = self.must_follow(&item) {
            self.follow(item, due);
        } else {
            self.active.insert(anchor, VecDeque::new());
            self.push_ready(item);
        }
    }

    /// With ordering, an item may go out only when none of its person's
    /// older events is parked; otherwise it returns the due time to park
    /// behind them. Deliver-topic offsets order one person's events (one
    /// key, one partition).
    fn must_follow(&self, item: &Item) -> Option<DateTime<Utc>> {
        let parked = self.parked.get(item.anchor())?;
        let oldest = *parked.origins.first()?;
        let is_oldest =
            item.source.topic == self.shared.retry_topic && item.origin.offset == oldest;
        (!is_oldest).then_some(parked.due)
    }

    /// Parks `item` behind its person's earlier parked event (same key, so
    /// the same retry partition, so read back in order).
    fn follow(&mut self, item: Item, due: DateTime<Utc>) {
        let entry = self
            .parked
            .entry(item.anchor().to_string())
            .or_insert_with(|| ParkedPerson {
                origins: BTreeSet::new(),
                due,
            });
        entry.origins.insert(item.origin.offset);
        entry.due = entry.due.max(due);
        let shared = self.shared.clone();
        let reason = "waiting behind an earlier event of the same person".to_string();
        self.inflight.spawn(async move {
            let done = send::persist(&shared, vec![(item, Final::Parked { due, reason })]).await?;
            Ok(done
                .into_iter()
                .map(|d| Done {
                    kind: DoneKind::Followed,
                    ..d
                })
                .collect())
        });
    }

    fn on_done(&mut self, d: Done) {
        self.tracker
            .done(&d.source.topic, d.source.partition, d.source.offset);
        if !self.shared.settings.ordering || d.anchor.is_empty() {
            return;
        }
        match d.kind {
            DoneKind::Parked(due) => {
                let entry = self
                    .parked
                    .entry(d.anchor.clone())
                    .or_insert_with(|| ParkedPerson {
                        origins: BTreeSet::new(),
                        due,
                    });
                entry.origins.insert(d.origin_offset);
                entry.due = entry.due.max(due);
                let waiting = self.active.remove(&d.anchor).unwrap_or_default();
                self.held -= waiting.len();
                for item in waiting {
                    self.follow(item, due);
                }
            }
            DoneKind::Resolved => {
                self.unpark(&d.anchor, d.origin_offset);
                self.release_next(&d.anchor);
            }
            DoneKind::Followed => {}
        }
    }

    fn unpark(&mut self, anchor: &str, origin_offset: i64) {
        if let Some(p) = self.parked.get_mut(anchor) {
            p.origins.remove(&origin_offset);
            if p.origins.is_empty() {
                self.parked.remove(anchor);
            }
        }
    }

    /// The person's event in flight is resolved: the next one waiting goes
    /// out, unless an older one of theirs is still parked.
    fn release_next(&mut self, anchor: &str) {
        loop {
            let Some(next) = self.active.get_mut(anchor).and_then(VecDeque::pop_front) else {
                self.active.remove(anchor);
                return;
            };
            self.held -= 1;
            match self.must_follow(&next) {
                Some(due) => self.follow(next, due),
                None => {
                    self.push_ready(next);
                    return;
                }
            }
        }
    }

    fn push_ready(&mut self, item: Item) {
        self.ready_bytes += item.raw.len();
        self.ready_since.get_or_insert_with(Instant::now);
        self.ready.push_back(item);
    }

    fn should_flush(&self) -> bool {
        let Some(since) = self.ready_since else {
            return false;
        };
        self.inflight.len() < self.shared.settings.max_in_flight
            && (self.ready.len() >= self.shared.limits.max_events
                || self.ready_bytes >= self.shared.limits.max_bytes
                || since.elapsed() >= self.shared.settings.linger)
    }

    fn flush(&mut self) {
        let limits = self.shared.limits;
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(next) = self.ready.front() {
            let fits =
                batch.len() < limits.max_events && bytes + next.raw.len() <= limits.max_bytes;
            if !batch.is_empty() && !fits {
                break;
            }
            bytes += next.raw.len();
            batch.extend(self.ready.pop_front());
        }
        self.ready_bytes -= bytes;
        self.ready_since = if self.ready.is_empty() {
            None
        } else {
            Some(Instant::now())
        };
        let shared = self.shared.clone();
        let cancel = self.cancel.clone();
        self.inflight
            .spawn(async move { send::deliver(shared, batch, cancel).await });
    }

    fn commit(&mut self, consumer: &SinkConsumer, mode: CommitMode) {
        let commits = self.tracker.take_commits();
        if commits.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (topic, partition, offset) in &commits {
            if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
                tracing::warn!(error = %e, "bad commit offset");
            }
        }
        if let Err(e) = consumer.commit(&tpl, mode) {
            // A revoked partition refuses commits; its new owner re-reads from
            // the last committed offset, so nothing is lost.
            tracing::warn!(destination = %self.shared.destination, error = %e, "offset commit failed");
        }
    }
}

struct ParkedPerson {
    /// Deliver-topic offsets of their parked events (oldest first).
    origins: BTreeSet<i64>,
    /// The latest due time among them.
    due: DateTime<Utc>,
}

fn instant_at(at: DateTime<Utc>) -> Instant {
    Instant::now() + (at - Utc::now()).to_std().unwrap_or_default()
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The consumer group of one destination's sink: `<prefix>-sink-<NAME>`, so
/// deployments (and tests) with different topic prefixes never share groups.
pub fn group_id(config: &crate::config::Config, destination: &str) -> String {
    format!("{}-sink-{destination}", config.topics.prefix)
}
