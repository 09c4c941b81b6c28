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
pub mod handover;
pub mod metrics;
pub mod offsets;
pub mod pace;
pub mod records;
pub mod retry;
mod round;
pub mod scan;
pub mod send;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Statistics};
use rdkafka::{Offset, TopicPartitionList};
use thiserror::Error;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::kafka::client::{self, ProducerGuard};
use crate::kafka::rebalance::{self, GroupConsumer};
use crate::run::{RoleContext, SHUTDOWN_DEADLINE};
use config::DeliverySettings;
use destination::Limits;
use handover::Ownership;
use metrics::RETRY_QUEUE;
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
    #[error(
        "with ordering, {deliver} ({deliver_partitions} partitions) and {retry} ({retry_partitions}) need the same partition count"
    )]
    NotCopartitioned {
        deliver: String,
        deliver_partitions: i32,
        retry: String,
        retry_partitions: i32,
    },
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

    let max_buffered = shared.limits.max_events * (shared.settings.max_in_flight + 2);
    let mut engine = Engine {
        max_buffered,
        hold_max: (max_buffered / 4).max(16),
        shared: shared.clone(),
        ready: VecDeque::new(),
        ready_bytes: 0,
        ready_since: None,
        active: HashMap::new(),
        held: 0,
        parked: Parked::default(),
        parked_full: false,
        retries: BTreeMap::new(),
        requeue: Vec::new(),
        batches: JoinSet::new(),
        writes: JoinSet::new(),
        writing: 0,
        read_again_at: None,
        consumer_failing: false,
        throttled: false,
        cancel: CancellationToken::new(),
    };
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
struct SinkContext {
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
                let mut commits = TopicPartitionList::new();
                for (topic, partition, offset) in &report.commits {
                    if let Err(e) =
                        commits.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                    {
                        tracing::warn!(error = %e, "bad commit offset");
                    }
                }
                if commits.count() > 0
                    && let Err(e) = consumer.commit(&commits, CommitMode::Sync)
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

type SinkConsumer = StreamConsumer<SinkContext>;

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

/// What a task reports when it ends.
type TaskResult = Result<Vec<Done>, SinkError>;

struct Engine {
    shared: Arc<Shared>,
    ready: VecDeque<Item>,
    ready_bytes: usize,
    /// When the oldest item in `ready` arrived (the linger clock).
    ready_since: Option<Instant>,
    /// With ordering: people with an event in `ready` or in flight, and their
    /// later events waiting behind it.
    active: HashMap<String, Person>,
    held: usize,
    /// With ordering: people with events on the retry topic.
    parked: Parked,
    /// Deliver partitions are paused: `parked` is at its bound.
    parked_full: bool,
    /// Retry-topic partitions: records read before they are due.
    retries: BTreeMap<i32, RetryPartition>,
    /// Retry records to write back to the end of their partition.
    requeue: Vec<(Item, Final)>,
    /// Delivery batches (at most `max_in_flight`).
    batches: JoinSet<TaskResult>,
    /// Writes to the retry topic (parked followers, requeued records), with
    /// how many items each holds.
    writes: JoinSet<(usize, TaskResult)>,
    writing: usize,
    max_buffered: usize,
    /// The most not-yet-due records held per retry partition.
    hold_max: usize,
    /// After a consumer error, reading resumes then.
    read_again_at: Option<Instant>,
    /// The last read failed (logged once until a record arrives).
    consumer_failing: bool,
    /// Every assigned partition is paused: too much is buffered. The
    /// consumer is still polled, so rebalances are served at once.
    throttled: bool,
    /// Tells batches to stop retrying (shutdown).
    cancel: CancellationToken,
}

/// A person with an event out (in `ready` or in flight) and the later ones
/// waiting behind it.
struct Person {
    /// The partition the event out was read from.
    head: (String, i32),
    waiting: VecDeque<Item>,
}

#[derive(Default)]
struct RetryPartition {
    /// Records due within the hold horizon, earliest first.
    held: BinaryHeap<Reverse<Held>>,
    /// Paused until then: reading came round to records requeued this lap.
    lap_pause: Option<Instant>,
    /// Paused because `held` is full.
    full: bool,
    /// When this lap's first record was requeued; reading a record requeued
    /// since then means the lap is complete.
    lap_started: Option<DateTime<Utc>>,
    /// The earliest due among the records requeued this lap.
    lap_min_due: Option<DateTime<Utc>>,
}

impl RetryPartition {
    fn is_paused(&self) -> bool {
        self.full || self.lap_pause.is_some()
    }
}

/// A held retry record, ordered by due time, then offset.
struct Held(Item);

impl Held {
    fn key(&self) -> (Option<DateTime<Utc>>, i64) {
        (self.0.due, self.0.source.offset)
    }
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Held {}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

/// What to do with a retry record just read.
enum RetryStep {
    Now,
    Hold,
    Requeue(DateTime<Utc>),
}

/// The step for a retry record due at `due`, read at `now`: due ones go
/// now, those due within `horizon` wait in memory, the rest go back to the
/// end of the partition so they hold up neither nearer records nor commits.
fn retry_step(due: Option<DateTime<Utc>>, now: DateTime<Utc>, horizon: Duration) -> RetryStep {
    let horizon = chrono::Duration::from_std(horizon).unwrap_or(chrono::Duration::MAX);
    match due {
        Some(d) if d > now + horizon => RetryStep::Requeue(d),
        Some(d) if d > now => RetryStep::Hold,
        _ => RetryStep::Now,
    }
}

/// How long to pause a retry partition once reading came round to records
/// requeued this lap: until the earliest of them is within `horizon`, but at
/// most `horizon`, so a record parked meanwhile (by any instance) is read at
/// most `horizon` after it is due, and each far-off record is rewritten
/// about once per `horizon` while it waits (the one ending a lap twice).
fn lap_pause(
    min_due: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    horizon: Duration,
) -> Option<Duration> {
    let until = min_due? - chrono::Duration::from_std(horizon).ok()?;
    let pause = (until - now).to_std().ok()?;
    // A little past the point, so the record read then is within the
    // horizon and held rather than written back once more.
    (!pause.is_zero()).then(|| (pause + LAP_MARGIN).min(horizon))
}

/// See [`lap_pause`].
const LAP_MARGIN: Duration = Duration::from_millis(100);

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
                .filter(|_| self.batches.len() < max_in_flight && stop_by.is_none())
                .map(|t| t + self.shared.settings.linger);
            let due_at = self.next_due();
            let can_read =
                stop_by.is_none() && self.read_again_at.is_none_or(|t| t <= Instant::now());
            let read_again_at = self.read_again_at.filter(|_| stop_by.is_none());
            tokio::select! {
                _ = shutdown.cancelled(), if stop_by.is_none() => {
                    // Batches stop retrying and report what is durable; the
                    // rest stays uncommitted for the partition's next owner.
                    self.cancel.cancel();
                    stop_by = Some(Instant::now() + SHUTDOWN_DEADLINE - Duration::from_secs(5));
                }
                joined = self.batches.join_next(), if !self.batches.is_empty() => {
                    match joined {
                        Some(Ok(Ok(done))) => done.into_iter().for_each(|d| self.on_done(d)),
                        Some(Ok(Err(e))) => return Err(e),
                        Some(Err(e)) => return Err(SinkError::Task(e.to_string())),
                        None => {}
                    }
                }
                joined = self.writes.join_next(), if !self.writes.is_empty() => {
                    match joined {
                        Some(Ok((items, result))) => {
                            self.writing -= items;
                            result?.into_iter().for_each(|d| self.on_done(d));
                        }
                        Some(Err(e)) => return Err(SinkError::Task(e.to_string())),
                        None => {}
                    }
                }
                msg = consumer.recv(), if can_read => {
                    match msg {
                        Ok(m) => {
                            self.consumer_failing = false;
                            let mut item = Item::from_message(&m);
                            self.shared.ownership.seen(&mut item);
                            self.accept(item, consumer);
                        }
                        Err(e) => {
                            // librdkafka reconnects on its own; say so once per spell.
                            if !self.consumer_failing {
                                tracing::warn!(destination = %self.shared.destination, error = %e, "consumer error; reading on once the broker answers");
                            }
                            self.consumer_failing = true;
                            self.read_again_at = Some(Instant::now() + Duration::from_millis(200));
                        }
                    }
                }
                _ = sleep_until_opt(read_again_at), if read_again_at.is_some() && !can_read => {
                    self.read_again_at = None;
                }
                _ = sleep_until_opt(linger_at), if linger_at.is_some() => {}
                _ = sleep_until_opt(due_at), if due_at.is_some() => self.release_due(consumer),
                _ = commit_tick.tick() => {
                    self.commit(consumer, CommitMode::Async);
                    self.report();
                }
                _ = sleep_until_opt(stop_by), if stop_by.is_some() => {
                    tracing::warn!(destination = %self.shared.destination, batches = self.batches.len(), "shutdown deadline passed; abandoning in-flight batches (their offsets stay uncommitted)");
                    self.batches.abort_all();
                    self.writes.abort_all();
                    return Ok(());
                }
            }
            // A rebalance callback may have run inside `recv`.
            self.drop_handed_over();
            self.back_pressure(consumer);
            if stop_by.is_some() {
                if self.batches.is_empty() && self.writes.is_empty() {
                    return Ok(());
                }
                continue;
            }
            self.write_requeued();
            while self.should_flush() {
                self.flush();
            }
        }
    }

    fn buffered(&self) -> usize {
        self.ready.len()
            + self.held
            + self.writing
            + self.requeue.len()
            + self.retries.values().map(|r| r.held.len()).sum::<usize>()
    }

    fn report(&self) {
        let name = &self.shared.destination;
        let held: usize = self.retries.values().map(|r| r.held.len()).sum();
        RETRY_QUEUE
            .with_label_values(&[name])
            .set(i64::try_from(held).unwrap_or(i64::MAX));
        if self.shared.settings.ordering {
            metrics::PARKED_EVENTS
                .with_label_values(&[name])
                .set(i64::try_from(self.parked.events).unwrap_or(i64::MAX));
        }
        if let Some(ledger) = &self.shared.ledger {
            let mut l = ledger.lock().expect("ledger lock");
            l.expire(Utc::now());
            metrics::LEDGER_INDEX
                .with_label_values(&[name])
                .set(i64::try_from(l.len()).unwrap_or(i64::MAX));
            metrics::LEDGER_EVICTIONS
                .with_label_values(&[name])
                .set(i64::try_from(l.evicted()).unwrap_or(i64::MAX));
        }
    }

    fn next_due(&self) -> Option<Instant> {
        self.retries
            .values()
            .flat_map(|r| {
                let due = r.held.peek().and_then(|h| h.0.0.due).map(instant_at);
                [due, r.lap_pause]
            })
            .flatten()
            .min()
    }

    /// Pauses every assigned partition while too much is buffered, and
    /// resumes them (but retry partitions waiting on their own) once half of
    /// it is gone. After an assignment the state is applied again to all of
    /// them: librdkafka keeps a partition's pause across a revoke and a new
    /// assignment of it.
    fn back_pressure(&mut self, consumer: &SinkConsumer) {
        let buffered = self.buffered();
        let assigned = self.shared.ownership.take_assignment();
        let throttle = if self.throttled {
            buffered > self.max_buffered / 2
        } else {
            buffered >= self.max_buffered
        };
        let max_parked = self.shared.settings.max_parked;
        let parked_full = if self.parked_full {
            self.parked.events > max_parked * 3 / 4
        } else {
            self.parked.events >= max_parked
        };
        if throttle == self.throttled && parked_full == self.parked_full && !assigned {
            return;
        }
        if parked_full != self.parked_full {
            tracing::info!(
                destination = %self.shared.destination,
                parked = self.parked.events,
                max_parked,
                "{}",
                if parked_full {
                    "parked events at their bound; new deliveries wait until some are resolved"
                } else {
                    "room for parked events again; reading new deliveries"
                }
            );
        }
        self.throttled = throttle;
        self.parked_full = parked_full;
        let Ok(assignment) = consumer.assignment() else {
            return;
        };
        let (mut pause, mut resume) = (TopicPartitionList::new(), TopicPartitionList::new());
        for e in assignment.elements() {
            let is_retry = e.topic() == self.shared.retry_topic;
            let waits_on_its_own = is_retry
                && self
                    .retries
                    .get(&e.partition())
                    .is_some_and(RetryPartition::is_paused);
            // Retry partitions read on: resolving parked events makes room.
            let no_room = parked_full && !is_retry;
            if throttle || waits_on_its_own || no_room {
                pause.add_partition(e.topic(), e.partition());
            } else {
                resume.add_partition(e.topic(), e.partition());
            }
        }
        for (tpl, paused) in [(pause, true), (resume, false)] {
            if tpl.count() == 0 {
                continue;
            }
            let result = if paused {
                consumer.pause(&tpl)
            } else {
                consumer.resume(&tpl)
            };
            if let Err(e) = result {
                tracing::warn!(destination = %self.shared.destination, pause = paused, error = %e, "cannot pause or resume reading");
            }
        }
    }

    fn pause(&self, consumer: &SinkConsumer, partition: i32, resume: bool) {
        if resume && self.throttled {
            return; // resumed with the rest
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.shared.retry_topic, partition);
        let result = if resume {
            consumer.resume(&tpl)
        } else {
            consumer.pause(&tpl)
        };
        if let Err(e) = result {
            tracing::warn!(destination = %self.shared.destination, partition, resume, error = %e, "cannot pause or resume the retry partition");
        }
    }

    /// Routes a record just read.
    fn accept(&mut self, item: Item, consumer: &SinkConsumer) {
        if item.source.topic != self.shared.retry_topic {
            self.admit(item);
            return;
        }
        let now = Utc::now();
        let horizon = self.shared.settings.retry.park_after;
        let p = item.source.partition;
        let rp = self.retries.entry(p).or_default();
        let mut pause = false;
        let lap_done = matches!((rp.lap_started, item.requeued_at), (Some(started), Some(at)) if at >= started);
        if lap_done {
            // Came round to records this lap wrote back: the rest of the
            // partition is not due soon; read on once the earliest nears.
            if let Some(wait) = lap_pause(rp.lap_min_due, now, horizon) {
                pause = rp.lap_pause.is_none() && !rp.full;
                rp.lap_pause = Some(Instant::now() + wait);
            }
            rp.lap_started = None;
            rp.lap_min_due = None;
        }
        match retry_step(item.due, now, horizon) {
            RetryStep::Now => self.admit(item),
            RetryStep::Hold => {
                rp.held.push(Reverse(Held(item)));
                if rp.held.len() >= self.hold_max && !rp.full {
                    pause |= rp.lap_pause.is_none();
                    rp.full = true;
                }
            }
            RetryStep::Requeue(due) => {
                // The record that ended a lap does not start the next one:
                // its copy lands before anything parked during the pause,
                // and reading it must not end the next lap at once.
                if !lap_done {
                    rp.lap_started.get_or_insert(now);
                    rp.lap_min_due = Some(rp.lap_min_due.map_or(due, |m| m.min(due)));
                }
                let reason = item.reason.clone().unwrap_or_default();
                self.requeue.push((
                    item,
                    Final::Requeued {
                        due,
                        reason,
                        at: now,
                    },
                ));
            }
        }
        if pause {
            self.pause(consumer, p, false);
        }
    }

    /// Writes the retry records read before they were due back to the end of
    /// their partitions (one task per engine round).
    fn write_requeued(&mut self) {
        if self.requeue.is_empty() {
            return;
        }
        let finals = std::mem::take(&mut self.requeue);
        self.shared
            .ownership
            .dispatched(finals.iter().map(|(i, _)| i));
        let n = finals.len();
        self.writing += n;
        let shared = self.shared.clone();
        let cancel = self.cancel.clone();
        self.writes
            .spawn(async move { (n, send::persist(&shared, finals, &cancel).await) });
    }

    fn release_due(&mut self, consumer: &SinkConsumer) {
        let now = Utc::now();
        let now_i = Instant::now();
        let mut released = Vec::new();
        let mut resume = Vec::new();
        for (p, rp) in &mut self.retries {
            while rp
                .held
                .peek()
                .is_some_and(|h| h.0.0.due.is_none_or(|d| d <= now))
            {
                released.extend(rp.held.pop().map(|h| h.0.0));
            }
            let was_paused = rp.is_paused();
            if rp.lap_pause.is_some_and(|t| t <= now_i) {
                rp.lap_pause = None;
            }
            if rp.full && rp.held.len() < self.hold_max / 2 {
                rp.full = false;
            }
            if was_paused && !rp.is_paused() {
                resume.push(*p);
            }
        }
        for p in resume {
            self.pause(consumer, p, true);
        }
        for item in released {
            self.admit(item);
        }
    }

    /// Drops what is buffered of partitions handed to another instance: it
    /// was never sent, and their next owner reads it again.
    fn drop_handed_over(&mut self) {
        let revoked = self.shared.ownership.take_revoked();
        if revoked.is_empty() {
            return;
        }
        let gone: HashSet<(String, i32)> = revoked.into_iter().collect();
        let is_gone = |p: &records::Position| gone.contains(&(p.topic.clone(), p.partition));
        let before = self.buffered();
        self.ready.retain(|i| !is_gone(&i.source));
        self.ready_bytes = self.ready.iter().map(|i| i.raw.len()).sum();
        if self.ready.is_empty() {
            self.ready_since = None;
        }
        let retry_topic = self.shared.retry_topic.clone();
        let retry_gone = |p: i32| gone.contains(&(retry_topic.clone(), p));
        self.retries.retain(|p, _| !retry_gone(*p));
        self.requeue.retain(|(i, _)| !is_gone(&i.source));
        // Their parked events are read by the retry partition's new owner.
        self.parked.forget_partitions(retry_gone);
        let mut release = Vec::new();
        for (anchor, person) in &mut self.active {
            let n = person.waiting.len();
            person.waiting.retain(|i| !is_gone(&i.source));
            self.held -= n - person.waiting.len();
            if gone.contains(&person.head) {
                release.push(anchor.clone());
            }
        }
        for anchor in release {
            self.release_next(&anchor);
        }
        tracing::info!(
            destination = %self.shared.destination,
            dropped = before.saturating_sub(self.buffered()),
            "buffered records of handed-over partitions dropped"
        );
    }

    /// An item that may be sent now (subject to ordering and the ledger).
    fn admit(&mut self, item: Item) {
        if let (Some(ledger), Some(id)) = (&self.shared.ledger, item.event_id())
            && ledger
                .lock()
                .expect("ledger lock")
                .is_delivered(id, Utc::now())
        {
            tracing::debug!(destination = %self.shared.destination, event_id = id, "already delivered; skipped");
            metrics::EVENTS
                .with_label_values(&[&self.shared.destination, "skipped_duplicate"])
                .inc();
            let source = &item.source;
            self.shared
                .ownership
                .done(&source.topic, source.partition, source.offset, item.epoch);
            // Not sent, so it releases nobody waiting behind an event in
            // flight; but if it was parked, it no longer holds anyone back.
            self.parked.remove(item.anchor(), item.origin.offset);
            return;
        }
        let anchor = item.anchor().to_string();
        if !self.shared.settings.ordering || anchor.is_empty() {
            self.push_ready(item);
            return;
        }
        if let Some(person) = self.active.get_mut(&anchor) {
            person.waiting.push_back(item);
            self.held += 1;
        } else if let Some(due) = self.must_follow(&item) {
            self.follow(item, due);
        } else {
            self.active.insert(
                anchor,
                Person {
                    head: (item.source.topic.clone(), item.source.partition),
                    waiting: VecDeque::new(),
                },
            );
            self.push_ready(item);
        }
    }

    /// With ordering, an item may go out only when none of its person's
    /// older events is parked; otherwise it returns the due time to park
    /// behind them. Deliver-topic offsets order one person's events (one
    /// key, one partition).
    fn must_follow(&self, item: &Item) -> Option<DateTime<Utc>> {
        let parked = self.parked.people.get(item.anchor())?;
        let oldest = *parked.origins.first()?;
        let is_oldest =
            item.source.topic == self.shared.retry_topic && item.origin.offset == oldest;
        (!is_oldest).then_some(parked.due)
    }

    /// Parks `item` behind its person's earlier parked event (same deliver
    /// partition, so the same retry partition, so read back in order).
    fn follow(&mut self, item: Item, due: DateTime<Utc>) {
        self.parked.add(
            item.anchor(),
            item.origin.offset,
            due,
            send::retry_partition(&item),
        );
        self.shared.ownership.dispatched([&item]);
        self.writing += 1;
        let shared = self.shared.clone();
        let cancel = self.cancel.clone();
        let reason = "waiting behind an earlier event of the same person".to_string();
        self.writes.spawn(async move {
            let done = send::persist(
                &shared,
                vec![(item, Final::Parked { due, reason })],
                &cancel,
            )
            .await
            .map(|done| {
                done.into_iter()
                    .map(|d| Done {
                        kind: match d.kind {
                            DoneKind::Parked {
                                due,
                                retry_partition,
                            } => DoneKind::Followed {
                                due,
                                retry_partition,
                            },
                            other => other,
                        },
                        ..d
                    })
                    .collect()
            });
            (1, done)
        });
    }

    fn on_done(&mut self, d: Done) {
        if let DoneKind::Parked {
            due,
            retry_partition,
        }
        | DoneKind::Followed {
            due,
            retry_partition,
        } = d.kind
        {
            self.wake_for(retry_partition, due);
        }
        if !self.shared.settings.ordering || d.anchor.is_empty() {
            return;
        }
        // An outcome from before a handover of its partition: the ordering
        // state it would update was dropped with the partition.
        if !self
            .shared
            .ownership
            .is_current(&d.source.topic, d.source.partition, d.epoch)
        {
            return;
        }
        match d.kind {
            DoneKind::Parked {
                due,
                retry_partition,
            } => {
                self.parked
                    .add(&d.anchor, d.origin_offset, due, retry_partition);
                let waiting = self
                    .active
                    .remove(&d.anchor)
                    .map(|p| p.waiting)
                    .unwrap_or_default();
                self.held -= waiting.len();
                for item in waiting {
                    self.follow(item, due);
                }
            }
            DoneKind::Resolved => {
                self.parked.remove(&d.anchor, d.origin_offset);
                self.release_next(&d.anchor);
            }
            DoneKind::Followed { .. } | DoneKind::Requeued => {}
        }
    }

    /// This instance just parked a record due at `due` on a retry partition
    /// that waits out a lap: read on in time for it.
    fn wake_for(&mut self, partition: i32, due: DateTime<Utc>) {
        let horizon = chrono::Duration::from_std(self.shared.settings.retry.park_after)
            .unwrap_or(chrono::Duration::MAX);
        if let Some(rp) = self.retries.get_mut(&partition)
            && let Some(resume) = rp.lap_pause
        {
            rp.lap_pause = Some(resume.min(instant_at(due - horizon)));
        }
    }

    /// The person's event out is resolved (or was dropped with its
    /// partition): the next one waiting goes out, unless an older one of
    /// theirs is still parked.
    fn release_next(&mut self, anchor: &str) {
        loop {
            let Some(next) = self
                .active
                .get_mut(anchor)
                .and_then(|p| p.waiting.pop_front())
            else {
                self.active.remove(anchor);
                return;
            };
            self.held -= 1;
            match self.must_follow(&next) {
                Some(due) => self.follow(next, due),
                None => {
                    if let Some(p) = self.active.get_mut(anchor) {
                        p.head = (next.source.topic.clone(), next.source.partition);
                    }
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
        self.batches.len() < self.shared.settings.max_in_flight
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
        self.shared.ownership.dispatched(&batch);
        let shared = self.shared.clone();
        let cancel = self.cancel.clone();
        self.batches
            .spawn(async move { send::deliver(shared, batch, cancel).await });
    }

    fn commit(&mut self, consumer: &SinkConsumer, mode: CommitMode) {
        let commits = self.shared.ownership.take_commits();
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
            // Only owned partitions are ever committed; a failure means the
            // next owner re-reads from the previous commit (duplicates, no loss).
            tracing::warn!(destination = %self.shared.destination, error = %e, "offset commit failed");
        }
    }
}

/// With ordering: the people with events on the retry topic, and how many
/// events that is (what bounds it).
#[derive(Default)]
struct Parked {
    people: HashMap<String, ParkedPerson>,
    events: usize,
}

struct ParkedPerson {
    /// Deliver-topic offsets of their parked events (oldest first).
    origins: BTreeSet<i64>,
    /// The latest due time among them.
    due: DateTime<Utc>,
    /// The retry partition holding them: their deliver partition's number,
    /// so this instance reads it back and sees them resolved.
    retry_partition: i32,
}

impl Parked {
    fn add(&mut self, anchor: &str, origin_offset: i64, due: DateTime<Utc>, retry_partition: i32) {
        let person = self
            .people
            .entry(anchor.to_string())
            .or_insert_with(|| ParkedPerson {
                origins: BTreeSet::new(),
                due,
                retry_partition,
            });
        if person.origins.insert(origin_offset) {
            self.events += 1;
        }
        person.due = person.due.max(due);
    }

    fn remove(&mut self, anchor: &str, origin_offset: i64) {
        if let Some(p) = self.people.get_mut(anchor)
            && p.origins.remove(&origin_offset)
        {
            self.events -= 1;
            if p.origins.is_empty() {
                self.people.remove(anchor);
            }
        }
    }

    /// Forgets the people whose retry partition `gone` says another instance reads now.
    fn forget_partitions(&mut self, gone: impl Fn(i32) -> bool) {
        let events = &mut self.events;
        self.people.retain(|_, p| {
            let keep = !gone(p.retry_partition);
            if !keep {
                *events -= p.origins.len();
            }
            keep
        });
    }
}

/// The monotonic time of a wall-clock due time. A due time read from a
/// record header may be anything; one beyond a year (far past any retry
/// budget) counts as a year rather than overflowing.
fn instant_at(at: DateTime<Utc>) -> Instant {
    const YEAR: Duration = Duration::from_secs(365 * 86_400);
    let wait = (at - Utc::now()).to_std().unwrap_or_default().min(YEAR);
    Instant::now() + wait
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_records_go_now_wait_in_memory_or_go_back_to_the_end() {
        let now = Utc::now();
        let h = Duration::from_secs(30);
        let at = |s: i64| Some(now + chrono::Duration::seconds(s));
        assert!(matches!(retry_step(None, now, h), RetryStep::Now));
        assert!(matches!(retry_step(at(-5), now, h), RetryStep::Now));
        assert!(matches!(retry_step(at(0), now, h), RetryStep::Now));
        assert!(matches!(retry_step(at(10), now, h), RetryStep::Hold));
        assert!(matches!(retry_step(at(30), now, h), RetryStep::Hold));
        assert!(matches!(retry_step(at(31), now, h), RetryStep::Requeue(d) if Some(d) == at(31)));
    }

    #[test]
    fn a_complete_lap_pauses_until_the_earliest_nears_within_bounds() {
        let now = Utc::now();
        let h = Duration::from_secs(30);
        let at = |s: i64| Some(now + chrono::Duration::seconds(s));
        assert_eq!(lap_pause(None, now, h), None);
        // Due in 50 s: read on 30 s before, in 20 s (and a margin).
        assert_eq!(
            lap_pause(at(50), now, h),
            Some(Duration::from_secs(20) + LAP_MARGIN)
        );
        // Already within the horizon: no pause.
        assert_eq!(lap_pause(at(20), now, h), None);
        // Far off: at most one horizon, so records parked meanwhile are not
        // read more than that late.
        assert_eq!(lap_pause(at(3600), now, h), Some(h));
    }

    #[test]
    fn held_records_come_out_by_due_time_then_offset() {
        let item = |offset: i64, due_s: i64| {
            let mut i = Item {
                delivery: None,
                raw: Vec::new(),
                key: None,
                headers: Vec::new(),
                source: records::Position {
                    topic: "r".into(),
                    partition: 0,
                    offset,
                },
                origin: records::Position {
                    topic: "d".into(),
                    partition: 0,
                    offset,
                },
                attempts: 1,
                first_attempt: None,
                last_attempt: None,
                due: None,
                reason: None,
                requeued_at: None,
                epoch: 1,
            };
            i.due = DateTime::from_timestamp(due_s, 0);
            Reverse(Held(i))
        };
        let mut heap = BinaryHeap::new();
        heap.extend([item(1, 50), item(2, 10), item(3, 50), item(4, 30)]);
        let order: Vec<i64> =
            std::iter::from_fn(|| heap.pop().map(|h| h.0.0.source.offset)).collect();
        assert_eq!(order, [2, 4, 1, 3]);
    }
}
