//! The router's Kafka loop: consume a batch, run the step chain, make the
//! batch's writes durable together with its offsets, repeat.
//!
//! One loop per process, not one task per partition: a batch spans every
//! assigned partition so that one Kafka transaction (exactly-once) or one
//! ack-then-commit round (at-least-once) covers them all, and the per-record
//! work is cheap enough that the broker, not this loop, is the ceiling.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use backon::{ExponentialBuilder, Retryable};

use super::dedup::{self, PartitionDedup};
use super::identity::{IdentityTable, Profile};
use super::metrics as m;
use super::pipeline::{Batch, InRecord, Out, Outcome, Pipeline, Reroute};
use crate::config::{Config, Guarantee, KafkaConfig};
use crate::kafka::reader::{Limit, ShortRead, ToEnd};
use crate::kafka::rebalance::{self, GroupConsumer};
use crate::kafka::topics::{self, DedupTopics};
use crate::kafka::{ADMIN_TIMEOUT, client};
use crate::run::RoleContext;

/// Records per batch and how long to wait for more once one has arrived.
const MAX_BATCH: usize = 2000;
const LINGER: Duration = Duration::from_millis(20);
const TXN_TIMEOUT: Duration = Duration::from_secs(30);
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(60);
const EXPIRE_EVERY: Duration = Duration::from_secs(60);
/// Tries at restoring one partition's dedup state before the router gives up.
const RESTORE_ATTEMPTS: usize = 6;

#[derive(Debug, Error)]
pub enum RouterError {
    #[error("kafka client: {0}")]
    Client(KafkaError),
    #[error("restoring {topic} partition {partition}: {source}")]
    Restore {
        topic: String,
        partition: i32,
        source: KafkaError,
    },
    /// A read of state stopped advancing before its end offsets.
    #[error(
        "{read} of {topic} stopped before its end offsets: nothing read for {}s \
         (router.state_stall_timeout)",
        stall.as_secs()
    )]
    Stalled {
        read: &'static str,
        topic: String,
        stall: Duration,
    },
    /// A failed batch's partition, still ours, could not be sought back.
    #[error(
        "input partition {partition} could not be rewound after a failed batch ({source}); \
         restarting so that it is read again from its committed offset"
    )]
    Rewind { partition: i32, source: KafkaError },
    #[error("this instance's transactional producer was fenced or failed fatally: {0}")]
    Fatal(KafkaError),
    #[error("reading the partition layout of {topic}: {source}")]
    Layout { topic: String, source: KafkaError },
    #[error("input topic {0} does not exist (run `switchyard topics create`)")]
    NoInput(String),
    #[error("creating the dedup topic of the new layout: {0}")]
    Topics(#[from] crate::kafka::Error),
    #[error("background task: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// Shut down (or dropped) while reading state: not a failure.
    #[error("stopped while reading state")]
    Stopped,
}

/// Partition changes seen by the consumer's rebalance callback, applied by
/// the loop between batches.
#[derive(Default)]
struct RebalanceLog {
    topic: String,
    revoked: Mutex<Vec<i32>>,
    cooperative: bool,
    /// Set by every assignment: a change of the input's partition count
    /// reaches the group as a rebalance, so the loop reads the layout again.
    layout_stale: AtomicBool,
}

impl ClientContext for RebalanceLog {
    // Lag from librdkafka's own statistics: no extra broker round trips.
    fn stats(&self, stats: rdkafka::Statistics) {
        if let Some(t) = stats.topics.get(&self.topic) {
            for (p, s) in &t.partitions {
                if *p >= 0 && s.consumer_lag >= 0 {
                    m::LAG
                        .with_label_values(&[&p.to_string()])
                        .set(s.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for RebalanceLog {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        rebalance::apply(self, consumer, self.cooperative, err, tpl);
    }

    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
            for e in tpl.elements_for_topic(&self.topic) {
                revoked.push(e.partition());
            }
            info!(partitions = ?*revoked, "partitions revoked");
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let ps: Vec<i32> = tpl
                    .elements_for_topic(&self.topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect();
                info!(partitions = ?ps, "partitions assigned");
                self.layout_stale.store(true, Ordering::Release);
            }
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

pub async fn run(ctx: RoleContext) -> Result<(), RouterError> {
    match route(ctx).await {
        Err(RouterError::Stopped) => {
            info!("router stopped while reading state");
            Ok(())
        }
        r => r,
    }
}

async fn route(ctx: RoleContext) -> Result<(), RouterError> {
    // Reads of state run on blocking threads, which outlive a dropped (or
    // aborted) router unless told: this token stops them either way.
    let stop = ctx.shutdown.child_token();
    let _stop_when_dropped = stop.clone().drop_guard();
    let config = ctx.config.clone();
    let topics = &config.topics;
    let group = format!("{}-router", topics.prefix);
    let mut cc = client::manual_commit_consumer(&config.kafka, &ctx.bootstrap, &group);
    cc.set("group.instance.id", ctx.group_instance_id("router"))
        .set("statistics.interval.ms", "5000");
    // Cooperative rebalancing moves only the partitions that change owner;
    // kafka.consumer_properties can choose another strategy for brokers that
    // need it.
    client::set_default(
        &mut cc,
        "partition.assignment.strategy",
        "cooperative-sticky",
    );
    let log = RebalanceLog {
        topic: topics.canonical.clone(),
        revoked: Mutex::new(Vec::new()),
        cooperative: rebalance::is_cooperative(&cc),
        layout_stale: AtomicBool::new(false),
    };
    let consumer = GroupConsumer::new(cc.create_with_context(log).map_err(RouterError::Client)?);
    consumer
        .subscribe(&[&topics.canonical])
        .map_err(RouterError::Client)?;

    let exactly_once = config.kafka.guarantee == Guarantee::ExactlyOnce;
    let mut pc = client::idempotent_producer(&config.kafka, &ctx.bootstrap);
    if exactly_once {
        // Stable per instance: a restarted instance fences its own zombie.
        pc.set("transactional.id", format!("{group}-{}", ctx.instance_id));
    }
    let producer: FutureProducer = pc.create().map_err(RouterError::Client)?;
    // At-least-once sends a batch's few dedup marks on their own, after its
    // deliveries are acked: nothing else is coming to share a request with,
    // so they go at once rather than after the shared producer's linger,
    // which was most of the marks' round trip.
    let marks_producer: Option<FutureProducer> = if exactly_once {
        None
    } else {
        let mut mc = client::idempotent_producer(&config.kafka, &ctx.bootstrap);
        mc.set("linger.ms", "0");
        Some(mc.create().map_err(RouterError::Client)?)
    };
    if exactly_once {
        let p = producer.clone();
        tokio::task::spawn_blocking(move || p.init_transactions(TXN_TIMEOUT))
            .await?
            .map_err(RouterError::Fatal)?;
    }

    let mut tail = IdentityTail::start(&config.kafka, &ctx.bootstrap, &topics.identity())?;
    let mut pipeline = Pipeline::new(config.clone());
    tail = load_identity(
        tail,
        &mut pipeline,
        config.router.state_stall_timeout,
        &stop,
    )
    .await?;
    let layout = read_layout(&config, &ctx.bootstrap).await?;
    apply_layout(&config, &ctx.bootstrap, &mut pipeline, layout, true, &stop).await?;
    info!(
        group = %group,
        guarantee = config.kafka.guarantee.as_str(),
        identities = pipeline.identity().len(),
        "router started"
    );

    let mut last_expiry = Instant::now();
    let mut reroutes = RerouteLog::new(&config.topics.canonical);
    for r in Reroute::ALL {
        // Shown at 0 from the start, so a rate over them is defined.
        m::REROUTED.with_label_values(&[r.as_str()]);
    }
    let mut batch_no: u64 = 0;
    // One batch, cleared between uses: it keeps its buffers' capacity.
    let mut batch = Batch::default();
    loop {
        let waited = Instant::now();
        let msgs = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            msgs = next_batch(&consumer) => msgs,
        };
        let waited = waited.elapsed();
        let started = Instant::now();
        batch_no += 1;
        apply_revocations(&consumer, &mut pipeline);
        if consumer
            .context()
            .layout_stale
            .swap(false, Ordering::AcqRel)
        {
            let layout = tokio::select! {
                biased;
                _ = ctx.shutdown.cancelled() => break,
                layout = read_layout(&config, &ctx.bootstrap) => layout?,
            };
            apply_layout(&config, &ctx.bootstrap, &mut pipeline, layout, false, &stop).await?;
        }
        tail.drain(&mut pipeline);
        let assigned = assigned_partitions(&consumer, &topics.canonical);
        let msgs: Vec<OwnedMessage> = msgs
            .into_iter()
            .filter(|m| assigned.contains(&m.partition()))
            .collect();
        // Every assigned partition still without state is restored together
        // as soon as one of them has records: each restore waits mostly on
        // the broker (0.7–1.5 s per partition on tansu, even empty), so a
        // restart or rebalance pays that once, not once per partition.
        let unrestored: BTreeSet<i32> = if msgs.iter().any(|m| !pipeline.is_restored(m.partition()))
        {
            assigned
                .iter()
                .copied()
                .filter(|p| !pipeline.is_restored(*p))
                .collect()
        } else {
            BTreeSet::new()
        };
        let dedup_topic = pipeline.dedup_topic().to_string();
        let restores = futures::future::try_join_all(unrestored.iter().map(|&p| {
            restore_with_retry(&config, &ctx.bootstrap, &dedup_topic, p, &pipeline, &stop)
        }));
        // A slow or retried restore must not hold up a shutdown.
        let states = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => break,
            states = restores => states?,
        };
        for (p, state) in unrestored.into_iter().zip(states) {
            info!(partition = p, keys = state.len(), "dedup state restored");
            pipeline.install(p, state);
        }

        let now = unix_secs();
        batch.clear();
        // At-least-once hands each record's outputs to the producer as soon
        // as they exist, so the broker works on the first while the rest are
        // routed. (A transaction has to begin first; it takes them at the end.)
        let mut sent: Result<Vec<DeliveryFuture>, KafkaError> = Ok(Vec::new());
        let wait = Patience::from_now(&stop);
        for msg in &msgs {
            let from = batch.len();
            pipeline.process(&in_record(msg), now, &mut batch);
            if !exactly_once
                && let Ok(acks) = &mut sent
                && let Err(e) = enqueue_into(&producer, batch.records_from(from), acks, wait).await
            {
                sent = Err(e);
            }
        }
        let streamed = batch.len();
        pipeline.seal(&mut batch);
        if last_expiry.elapsed() >= EXPIRE_EVERY {
            let n = pipeline.expire(now, &mut batch);
            if n > 0 {
                info!(keys = n, "dedup keys expired");
            }
            last_expiry = Instant::now();
        }
        if batch.is_empty() {
            continue;
        }
        let processed = started.elapsed();
        let span =
            info_span!("batch", n = batch_no, records = msgs.len(), offsets = ?batch.offsets);
        let result = match &marks_producer {
            None => {
                commit_transaction(&producer, &consumer, &config, &batch, wait)
                    .instrument(span)
                    .await
            }
            Some(marks) => {
                let producers = (&producer, marks);
                let dedup_topic = pipeline.dedup_topic();
                let sent = (sent, streamed);
                commit_at_least_once(
                    producers,
                    &consumer,
                    &config,
                    dedup_topic,
                    &batch,
                    sent,
                    wait,
                )
                .instrument(span)
                .await
            }
        };
        tracing::debug!(
            batch = batch_no,
            records = msgs.len(),
            writes = batch.len(),
            waited_ms = waited.as_millis() as u64,
            processed_ms = processed.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            ok = result.is_ok(),
            "batch done"
        );
        match result {
            Ok(()) => {
                pipeline.commit(&batch);
                record_metrics(&batch, &pipeline, &config);
                reroutes.count(&batch.outcomes);
            }
            Err(BatchError::Fatal(e)) if ctx.shutdown.is_cancelled() => {
                // Stopped while a commit was unconfirmed: the transactional
                // id's next producer settles it (completes or aborts) when it starts.
                warn!(error = %e, "stopping with the last transaction unsettled");
                break;
            }
            Err(BatchError::Fatal(e)) => return Err(RouterError::Fatal(e)),
            Err(BatchError::Retry(_)) if ctx.shutdown.is_cancelled() => break,
            Err(BatchError::Retry(e)) => {
                pipeline.abort(&batch);
                m::TRANSACTIONS.with_label_values(&["aborted"]).inc();
                warn!(error = %e, "batch not committed; rewinding to its first offsets");
                rewind(&consumer, &config.topics.canonical, &batch)?;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    info!("router stopping");
    // Leaving the group promptly hands partitions to the other instances.
    consumer.unsubscribe();
    Ok(())
}

fn unix_secs() -> u32 {
    u32::try_from(chrono::Utc::now().timestamp()).unwrap_or(u32::MAX)
}

fn in_record(m: &OwnedMessage) -> InRecord<'_> {
    InRecord {
        partition: m.partition(),
        offset: m.offset(),
        key: m.key(),
        payload: m.payload(),
        timestamp_ms: m.timestamp().to_millis(),
    }
}

/// Waits for one record, then takes what else arrives within the linger time.
async fn next_batch(consumer: &StreamConsumer<RebalanceLog>) -> Vec<OwnedMessage> {
    let mut msgs = Vec::new();
    loop {
        match consumer.recv().await {
            Ok(m) => {
                msgs.push(m.detach());
                break;
            }
            Err(e) => {
                warn!(error = %e, "consumer error");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let deadline = tokio::time::Instant::now() + LINGER;
    while msgs.len() < MAX_BATCH {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => msgs.push(m.detach()),
            Ok(Err(e)) => {
                warn!(error = %e, "consumer error");
                break;
            }
            Err(_) => break,
        }
    }
    msgs
}

fn apply_revocations(consumer: &StreamConsumer<RebalanceLog>, pipeline: &mut Pipeline) {
    let revoked: Vec<i32> = std::mem::take(
        &mut *consumer
            .context()
            .revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    for p in revoked {
        pipeline.revoke(p);
    }
}

fn assigned_partitions(consumer: &StreamConsumer<RebalanceLog>, topic: &str) -> HashSet<i32> {
    consumer
        .assignment()
        .map(|tpl| {
            tpl.elements_for_topic(topic)
                .iter()
                .map(|e| e.partition())
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Debug)]
enum BatchError {
    /// The batch did not become durable; rewind and process it again.
    Retry(KafkaError),
    /// This producer can no longer be used (fenced by a newer instance).
    Fatal(KafkaError),
}

fn to_record(o: Out<'_>) -> FutureRecord<'_, [u8], [u8]> {
    let mut r = FutureRecord::to(o.topic);
    if let Some(p) = o.partition {
        r = r.partition(p);
    }
    if let Some(k) = o.key {
        r = r.key(k);
    }
    if let Some(v) = o.payload {
        r = r.payload(v);
    }
    if !o.headers.is_empty() {
        let mut h = OwnedHeaders::new_with_capacity(o.headers.len());
        for (k, v) in o.headers {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        r = r.headers(h);
    }
    r
}

/// How long a batch's writes may wait on the broker: until the batch's
/// deadline, or until shutdown (the batch is then simply not committed).
#[derive(Clone, Copy)]
struct Patience<'a> {
    deadline: Instant,
    stop: &'a CancellationToken,
}

impl<'a> Patience<'a> {
    fn from_now(stop: &'a CancellationToken) -> Patience<'a> {
        Patience {
            deadline: Instant::now() + PRODUCE_TIMEOUT,
            stop,
        }
    }
}

/// Enqueues every record now (so they travel together) and returns their acks.
async fn enqueue<'a>(
    producer: &FutureProducer,
    records: impl Iterator<Item = Out<'a>>,
    wait: Patience<'_>,
) -> Result<Vec<DeliveryFuture>, KafkaError> {
    let mut acks = Vec::new();
    enqueue_into(producer, records, &mut acks, wait).await?;
    Ok(acks)
}

async fn enqueue_into<'a>(
    producer: &FutureProducer,
    records: impl Iterator<Item = Out<'a>>,
    acks: &mut Vec<DeliveryFuture>,
    wait: Patience<'_>,
) -> Result<(), KafkaError> {
    for o in records {
        acks.push(client::enqueue(producer, to_record(o), wait.deadline, wait.stop).await?);
    }
    Ok(())
}

async fn await_acks(acks: Vec<DeliveryFuture>, wait: Patience<'_>) -> Result<(), KafkaError> {
    // A broker that never answers must not hold the batch forever.
    tokio::select! {
        r = tokio::time::timeout_at(wait.deadline.into(), client::acked(acks)) => {
            r.unwrap_or(Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)))
        }
        _ = wait.stop.cancelled() => Err(KafkaError::Canceled),
    }
}

fn offsets_tpl(topic: &str, batch: &Batch) -> Result<TopicPartitionList, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    for (&p, &(_, last)) in &batch.offsets {
        tpl.add_partition_offset(topic, p, Offset::Offset(last + 1))?;
    }
    Ok(tpl)
}

/// At-least-once: deliveries, dead letters and identity first (`sent`: the
/// acks of the first `streamed` records, the ones `process` wrote, enqueued
/// as it went); only once they are acked the dedup marks (a mark must never
/// be durable for an event whose deliveries might be lost); only then the
/// offsets.
async fn commit_at_least_once(
    (producer, marks_producer): (&FutureProducer, &FutureProducer),
    consumer: &StreamConsumer<RebalanceLog>,
    config: &Config,
    dedup_topic: &str,
    batch: &Batch,
    (sent, streamed): (Result<Vec<DeliveryFuture>, KafkaError>, usize),
    wait: Patience<'_>,
) -> Result<(), BatchError> {
    // After what `process` wrote, `seal` adds the identity updates and the
    // dedup marks, and `expire` dedup tombstones.
    let (marks, rest): (Vec<Out<'_>>, Vec<Out<'_>>) = batch
        .records_from(streamed)
        .partition(|o| o.topic == dedup_topic);
    let mut acks = sent.map_err(BatchError::Retry)?;
    let t = Instant::now();
    enqueue_into(producer, rest.into_iter(), &mut acks, wait)
        .await
        .map_err(BatchError::Retry)?;
    await_acks(acks, wait).await.map_err(BatchError::Retry)?;
    let outputs_ms = t.elapsed().as_millis() as u64;
    let acks = enqueue(marks_producer, marks.into_iter(), wait)
        .await
        .map_err(BatchError::Retry)?;
    await_acks(acks, wait).await.map_err(BatchError::Retry)?;
    tracing::debug!(
        outputs_ms,
        marks_ms = t.elapsed().as_millis() as u64 - outputs_ms,
        "batch writes acknowledged"
    );
    if batch.offsets.is_empty() {
        return Ok(());
    }
    let tpl = offsets_tpl(&config.topics.canonical, batch).map_err(BatchError::Retry)?;
    // A failed commit after durable writes only means the batch is seen
    // again: its deliveries repeat (at-least-once) and its marks drop the rest.
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        warn!(error = %e, "offset commit failed; the batch may be processed again");
    }
    m::TRANSACTIONS.with_label_values(&["committed"]).inc();
    Ok(())
}

/// Exactly-once: every write and the consumer offsets in one transaction.
async fn commit_transaction(
    producer: &FutureProducer,
    consumer: &StreamConsumer<RebalanceLog>,
    config: &Config,
    batch: &Batch,
    wait: Patience<'_>,
) -> Result<(), BatchError> {
    let classify = |e: KafkaError| match &e {
        KafkaError::Transaction(t) if t.is_fatal() => BatchError::Fatal(e),
        _ => BatchError::Retry(e),
    };
    let result = async {
        producer.begin_transaction().map_err(classify)?;
        let acks = enqueue(producer, batch.records(), wait)
            .await
            .map_err(BatchError::Retry)?;
        await_acks(acks, wait).await.map_err(BatchError::Retry)?;
        let tpl = offsets_tpl(&config.topics.canonical, batch).map_err(BatchError::Retry)?;
        let cgm = consumer
            .group_metadata()
            .ok_or(BatchError::Retry(KafkaError::Canceled))?;
        let p = producer.clone();
        let stop = wait.stop.clone();
        tokio::task::spawn_blocking(move || {
            if tpl.count() > 0 {
                until_known(&stop, "send offsets", || {
                    p.send_offsets_to_transaction(&tpl, &cgm, TXN_TIMEOUT)
                })?;
            }
            until_known(&stop, "commit", || p.commit_transaction(TXN_TIMEOUT))
        })
        .await
        .map_err(|_| BatchError::Retry(KafkaError::Canceled))?
        .map_err(classify)
    }
    .await;
    match result {
        Ok(()) => {
            m::TRANSACTIONS.with_label_values(&["committed"]).inc();
            Ok(())
        }
        Err(BatchError::Fatal(e)) => Err(BatchError::Fatal(e)),
        Err(BatchError::Retry(e)) => {
            let p = producer.clone();
            let stop = wait.stop.clone();
            let aborted = tokio::task::spawn_blocking(move || {
                until_known(&stop, "abort", || p.abort_transaction(TXN_TIMEOUT))
            })
            .await
            .map_err(|_| BatchError::Retry(KafkaError::Canceled))?;
            match aborted {
                Ok(()) => Err(BatchError::Retry(e)),
                // A producer whose transaction is neither committed nor
                // aborted cannot begin another: only a new one (which fences
                // this one's transaction) can go on.
                Err(abort_err) => Err(BatchError::Fatal(abort_err)),
            }
        }
    }
}

/// Repeats a transactional call while librdkafka reports it retriable: a
/// commit or abort that timed out may still complete on the broker, and
/// giving up on it (say, aborting a commit) leaves the producer unusable.
/// Stops repeating on shutdown; the next instance's producer settles it.
fn until_known(
    stop: &CancellationToken,
    what: &'static str,
    mut call: impl FnMut() -> KafkaResult<()>,
) -> KafkaResult<()> {
    loop {
        match call() {
            Err(KafkaError::Transaction(e)) if e.is_retriable() && !stop.is_cancelled() => {
                warn!(error = %e, "transaction {what} not confirmed yet; retrying");
            }
            r => return r,
        }
    }
}

/// Seeks every partition of a failed batch back to the batch's own first
/// offsets (tracked here: the group's committed offsets may lag).
///
/// A partition that is still ours but could not be sought back fails the
/// router: its next read would start after the failed batch, and the next
/// commit would skip that batch for good. The restarted router re-reads
/// every partition from its committed offset, which is always safe: under
/// exactly-once those are the transactions' own, under at-least-once they are
/// committed only once the writes are durable, and dedup drops what was
/// routed already. Re-assigning just that partition would spare the other
/// partitions a restart, but differs between the eager and the cooperative
/// protocol and relies on the same consumer whose seek just failed, for a
/// failure librdkafka only reports on an internal timeout.
fn rewind(
    consumer: &StreamConsumer<RebalanceLog>,
    topic: &str,
    batch: &Batch,
) -> Result<(), RouterError> {
    for (&p, &(first, _)) in &batch.offsets {
        let seek = consumer.seek(topic, p, Offset::Offset(first), Duration::from_secs(10));
        // Asked only after a failure: a seek that worked needs no assignment.
        let assigned = match seek {
            Ok(()) => HashSet::new(),
            Err(_) => assigned_partitions(consumer, topic),
        };
        match after_seek(p, seek, &assigned) {
            AfterSeek::Rewound => {}
            AfterSeek::Revoked(e) => {
                warn!(partition = p, error = %e, "seek failed on a revoked partition; its new owner reads it from the committed offset");
            }
            AfterSeek::NotRewound(source) => {
                return Err(RouterError::Rewind {
                    partition: p,
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Where the next read of a failed batch's partition starts after the seek
/// back to the batch.
#[derive(Debug)]
enum AfterSeek {
    /// At the batch's first offset.
    Rewound,
    /// Revoked meanwhile: its new owner starts at the committed offset.
    Revoked(KafkaError),
    /// Still assigned here, after the failed batch: it would be skipped.
    NotRewound(KafkaError),
}

fn after_seek(partition: i32, seek: KafkaResult<()>, assigned: &HashSet<i32>) -> AfterSeek {
    match seek {
        Ok(()) => AfterSeek::Rewound,
        Err(e) if assigned.contains(&partition) => AfterSeek::NotRewound(e),
        Err(e) => AfterSeek::Revoked(e),
    }
}

fn record_metrics(batch: &Batch, pipeline: &Pipeline, config: &Config) {
    m::CONSUMED.inc_by(batch.outcomes.len() as u64);
    for o in &batch.outcomes {
        match o {
            Outcome::Invalid { class } => m::INVALID.with_label_values(&[class]).inc(),
            Outcome::Rerouted(r) => m::REROUTED.with_label_values(&[r.as_str()]).inc(),
            Outcome::Duplicate => m::DUPLICATES.inc(),
            Outcome::Routed { .. } => {}
        }
    }
    for (i, d) in config.enabled_destinations().enumerate() {
        if let Some(&n) = batch.routed.get(i).filter(|n| **n > 0) {
            m::ROUTED.with_label_values(&[&d.name]).inc_by(n);
        }
        if let Some(&n) = batch.denied.get(i).filter(|n| **n > 0) {
            m::CONSENT_DENIED
                .with_label_values(&[&d.name, &d.consent])
                .inc_by(n);
        }
    }
    if batch.oversize_deliveries > 0 {
        m::INVALID
            .with_label_values(&["delivery_oversize"])
            .inc_by(batch.oversize_deliveries);
    }
    for field in &batch.hints_dropped {
        m::HINTS_DROPPED.with_label_values(&[field]).inc();
    }
    m::DEDUP_KEYS.set(pipeline.dedup_keys() as i64);
    m::DEDUP_BYTES.set(pipeline.dedup_heap_bytes() as i64);
}

/// The input topic's partition count and the dedup topics for it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    partitions: i32,
    dedup: DedupTopics,
    /// Whether `dedup.current` exists yet.
    current_exists: bool,
}

async fn read_layout(config: &Arc<Config>, bootstrap: &str) -> Result<Layout, RouterError> {
    let config = config.clone();
    let bootstrap = bootstrap.to_string();
    tokio::task::spawn_blocking(move || {
        let input = &config.topics.canonical;
        let err = |source| RouterError::Layout {
            topic: input.clone(),
            source,
        };
        let reader: BaseConsumer = client::reader(&config.kafka, &bootstrap)
            .create()
            .map_err(err)?;
        let md = reader.fetch_metadata(None, ADMIN_TIMEOUT).map_err(err)?;
        let existing: HashMap<String, i32> = md
            .topics()
            .iter()
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .map(|t| (t.name().to_string(), t.partitions().len() as i32))
            .collect();
        let partitions = *existing
            .get(input)
            .ok_or_else(|| RouterError::NoInput(input.clone()))?;
        let dedup = topics::dedup_topics(&config.topics.dedup(), partitions, &existing);
        Ok(Layout {
            partitions,
            current_exists: existing.contains_key(&dedup.current),
            dedup,
        })
    })
    .await?
}

/// Makes `layout` the pipeline's. At start, and whenever the input's
/// partition count has changed, the marks of earlier layouts are read whole
/// (they remember event_ids that now belong to other partitions) and the
/// current layout's partitions are restored afresh from its own topic.
async fn apply_layout(
    config: &Arc<Config>,
    bootstrap: &str,
    pipeline: &mut Pipeline,
    layout: Layout,
    starting: bool,
    stop: &CancellationToken,
) -> Result<(), RouterError> {
    let changed = layout.partitions != pipeline.partitions()
        || layout.dedup.current != pipeline.dedup_topic();
    if !starting && !changed {
        return Ok(());
    }
    if changed && !starting {
        warn!(
            from = pipeline.partitions(),
            to = layout.partitions,
            dedup_topic = %layout.dedup.current,
            "the input topic's partition count changed: event_ids move to other partitions; \
             dedup continues in a topic for the new layout and every earlier layout's marks \
             are read in full until they leave the window"
        );
    }
    if !layout.current_exists {
        topics::create_dedup(config, bootstrap, &layout.dedup.current, layout.partitions).await?;
    }
    pipeline.set_layout(layout.partitions, &layout.dedup.current);
    pipeline.clear_carried();
    let reads = layout
        .dedup
        .past
        .iter()
        .flat_map(|(topic, n)| (0..*n).map(move |p| (topic.as_str(), p)));
    let states = futures::future::try_join_all(
        reads
            .clone()
            .map(|(topic, p)| restore_with_retry(config, bootstrap, topic, p, pipeline, stop)),
    )
    .await?;
    for ((topic, p), state) in reads.zip(states) {
        pipeline.carry(topic, p, state);
    }
    if !layout.dedup.past.is_empty() {
        info!(
            topics = ?layout.dedup.past,
            keys = pipeline.carried_keys(),
            "marks of earlier input layouts loaded"
        );
    }
    Ok(())
}

/// Says, at most once a minute, what share of the input was on the wrong
/// partition and how publishers avoid that extra hop.
struct RerouteLog {
    topic: String,
    since: Instant,
    records: u64,
    rerouted: [u64; 2],
}

const REROUTE_LOG_EVERY: Duration = Duration::from_secs(60);

impl RerouteLog {
    fn new(topic: &str) -> RerouteLog {
        RerouteLog {
            topic: topic.to_string(),
            since: Instant::now(),
            records: 0,
            rerouted: [0; 2],
        }
    }

    fn count(&mut self, outcomes: &[Outcome]) {
        self.records += outcomes.len() as u64;
        for o in outcomes {
            if let Outcome::Rerouted(r) = o {
                self.rerouted[*r as usize] += 1;
            }
        }
        if self.since.elapsed() < REROUTE_LOG_EVERY {
            return;
        }
        let [wrong_key, wrong_partition] = self.rerouted;
        if wrong_key + wrong_partition > 0 {
            warn!(
                topic = %self.topic,
                records = self.records,
                wrong_key,
                wrong_partition,
                "{}",
                reroute_advice(self.records, wrong_key, wrong_partition)
            );
        }
        *self = RerouteLog::new(&self.topic);
    }
}

/// The words of the reroute warning.
fn reroute_advice(records: u64, wrong_key: u64, wrong_partition: u64) -> String {
    let share = |n: u64| 100.0 * n as f64 / records.max(1) as f64;
    let mut s = format!(
        "{:.1}% of the input records in the last minute were not on their event_id's partition and took an extra hop (re-published there)",
        share(wrong_key + wrong_partition)
    );
    if wrong_key > 0 {
        s.push_str(&format!(
            "; {:.1}% were not keyed by their event_id: publish with key = event_id",
            share(wrong_key)
        ));
    }
    if wrong_partition > 0 {
        s.push_str(&format!(
            "; {:.1}% were keyed by it but partitioned by another hash: use the Java client's murmur2 partitioner (librdkafka clients such as confluent-kafka for Python, Go and .NET, node-rdkafka and rust-rdkafka: partitioner=murmur2_random; Sarama: Producer.Partitioner = sarama.NewMurmur2Partitioner; kafka-go: Balancer = kafka.Murmur2Balancer{{}}; the Java client, franz-go and KafkaJS 2 already do)",
            share(wrong_partition)
        ));
    }
    s
}

/// Reads dedup partition `p` from the beginning to its end.
/// A broker slow to answer (a metadata or fetch timeout) is no reason to
/// stop routing every other partition too: a failed restore is tried again.
async fn restore_with_retry(
    config: &Arc<Config>,
    bootstrap: &str,
    topic: &str,
    p: i32,
    pipeline: &Pipeline,
    stop: &CancellationToken,
) -> Result<PartitionDedup, RouterError> {
    (|| restore_partition(config, bootstrap, topic, p, pipeline, stop))
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(500))
                .with_max_delay(Duration::from_secs(10))
                .with_max_times(RESTORE_ATTEMPTS - 1)
                .with_jitter(),
        )
        .when(|e| matches!(e, RouterError::Restore { .. } | RouterError::Stalled { .. }))
        .notify(|e, wait| {
            warn!(partition = p, error = %e, retry_in_ms = wait.as_millis() as u64, "dedup restore failed; retrying");
        })
        .await
}

pub(super) async fn restore_partition(
    config: &Arc<Config>,
    bootstrap: &str,
    topic: &str,
    partition: i32,
    pipeline: &Pipeline,
    stop: &CancellationToken,
) -> Result<PartitionDedup, RouterError> {
    let stop = stop.clone();
    let topic = topic.to_string();
    let kafka = config.kafka.clone();
    let bootstrap = bootstrap.to_string();
    let oldest_live = pipeline.oldest_live(unix_secs());
    let stall = config.router.state_stall_timeout;
    tokio::task::spawn_blocking(move || {
        let err = |source| RouterError::Restore {
            topic: topic.clone(),
            partition,
            source,
        };
        let consumer: BaseConsumer = client::reader(&kafka, &bootstrap).create().map_err(err)?;
        let (low, high) = consumer
            .fetch_watermarks(&topic, partition, Duration::from_secs(10))
            .map_err(err)?;
        let mut restore = dedup::Restore::default();
        let finish = |restore: dedup::Restore| {
            let (state, unreadable) = restore.finish(oldest_live);
            if unreadable > 0 {
                tracing::warn!(
                    partition,
                    records = unreadable,
                    "dedup records in an unknown format were skipped"
                );
            }
            state
        };
        if high <= low {
            return Ok(finish(restore));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, partition, Offset::Offset(low))
            .map_err(err)?;
        consumer.assign(&tpl).map_err(err)?;
        let ends = HashMap::from([(partition, high)]);
        let mut read = ToEnd::new("dedup restore", &topic, ends, Limit::Stall(stall)).stop_on(stop);
        loop {
            let polled = read
                .next(&consumer, Duration::from_millis(500))
                .map_err(|e| {
                    state_read_failed(e, "dedup restore", format!("{topic} partition {partition}"))
                })?;
            match polled {
                Some(Ok(msg)) => {
                    if let Some(key) = msg.key() {
                        restore.record(key, msg.payload());
                    }
                }
                Some(Err(e)) => return Err(err(e)),
                None => return Ok(finish(restore)),
            }
        }
    })
    .await?
}

/// A read of state that stopped short, as the router reports it.
fn state_read_failed(e: ShortRead, read: &'static str, topic: String) -> RouterError {
    match e {
        // The router's reads are bounded by stalls only; a total limit, were
        // one set, would end them the same way.
        ShortRead::Stalled(stall) | ShortRead::TimedOut(stall) => {
            RouterError::Stalled { read, topic, stall }
        }
        ShortRead::Stopped => RouterError::Stopped,
    }
}

/// Tails the whole identity topic: every instance sees every update.
pub(super) struct IdentityTail {
    consumer: BaseConsumer,
    topic: String,
    ends: HashMap<i32, i64>,
}

impl IdentityTail {
    pub(super) fn start(
        kafka: &KafkaConfig,
        bootstrap: &str,
        topic: &str,
    ) -> Result<IdentityTail, RouterError> {
        let err = |source| RouterError::Restore {
            topic: topic.to_string(),
            partition: -1,
            source,
        };
        let consumer: BaseConsumer = client::reader(kafka, bootstrap).create().map_err(err)?;
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(err)?;
        let mut tpl = TopicPartitionList::new();
        let mut ends = HashMap::new();
        for t in md.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                    .map_err(err)?;
                let (_, high) = consumer
                    .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                    .map_err(err)?;
                ends.insert(p.id(), high);
            }
        }
        consumer.assign(&tpl).map_err(err)?;
        Ok(IdentityTail {
            consumer,
            topic: topic.to_string(),
            ends,
        })
    }

    fn apply(msg: &rdkafka::message::BorrowedMessage<'_>, table: &mut IdentityTable) {
        let (Some(key), Some(payload)) = (msg.key(), msg.payload()) else {
            return;
        };
        match (
            std::str::from_utf8(key),
            serde_json::from_slice::<Profile>(payload),
        ) {
            (Ok(k), Ok(p)) => table.apply(k, &p),
            _ => warn!(
                partition = msg.partition(),
                offset = msg.offset(),
                "unreadable identity record skipped"
            ),
        }
    }

    /// Applies whatever has arrived, without waiting.
    fn drain(&mut self, pipeline: &mut Pipeline) {
        while let Some(r) = self.consumer.poll(Duration::ZERO) {
            match r {
                Ok(msg) => Self::apply(&msg, pipeline.identity()),
                Err(e) => {
                    warn!(topic = %self.topic, error = %e, "identity tail error");
                    break;
                }
            }
        }
        m::IDENTITIES.set(pipeline.identity().len() as i64);
    }
}

/// Reads the identity topic up to where it ended at start-up, so the first
/// events are enriched with everything known before this instance started.
/// Records are applied as they are read: the topic holds several records per
/// person until it is compacted, far more than the table they make.
///
/// A load that stops advancing fails the router (which is restarted) rather
/// than routing with a partial table: events enriched from it would go out
/// without identifiers known before, for good, and the profiles the router
/// writes back would lack them too, so compaction could replace a person's
/// full record with a thinner one. A restart only delays routing: the input
/// waits in Kafka at the committed offsets.
pub(super) async fn load_identity(
    tail: IdentityTail,
    pipeline: &mut Pipeline,
    stall: Duration,
    stop: &CancellationToken,
) -> Result<IdentityTail, RouterError> {
    // The table goes to the blocking reader and comes back filled.
    let mut table = std::mem::take(pipeline.identity());
    let stop = stop.clone();
    let (tail, table) = tokio::task::spawn_blocking(move || {
        let ends = tail
            .ends
            .iter()
            .filter(|(_, end)| **end > 0)
            .map(|(p, e)| (*p, *e))
            .collect();
        // The tail reads on from here: no record read past an end may be skipped.
        let mut read = ToEnd::new("identity load", &tail.topic, ends, Limit::Stall(stall))
            .stop_on(stop)
            .with_later_records();
        loop {
            let polled = read
                .next(&tail.consumer, Duration::from_millis(200))
                .map_err(|e| state_read_failed(e, "identity load", tail.topic.clone()))?;
            match polled {
                Some(Ok(msg)) => IdentityTail::apply(&msg, &mut table),
                Some(Err(e)) => warn!(error = %e, "identity load error"),
                None => break,
            }
        }
        Ok::<_, RouterError>((tail, table))
    })
    .await??;
    *pipeline.identity() = table;
    m::IDENTITIES.set(pipeline.identity().len() as i64);
    Ok(tail)
}

/// A pipeline for `switchyard replay`: the identity table loaded (read,
/// never written back) and the input's layout of `partitions`.
pub async fn replay_pipeline(
    config: Arc<Config>,
    bootstrap: &str,
    partitions: i32,
    stop: &CancellationToken,
) -> Result<Pipeline, RouterError> {
    let tail = IdentityTail::start(&config.kafka, bootstrap, &config.topics.identity())?;
    let mut pipeline = Pipeline::new(config.clone());
    load_identity(tail, &mut pipeline, config.router.state_stall_timeout, stop).await?;
    pipeline.set_layout(partitions, &config.topics.dedup());
    Ok(pipeline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_seek_of_a_partition_still_assigned_is_not_a_rewind() {
        let failed = || Err(KafkaError::Seek("timed out".into()));
        let assigned = HashSet::from([0, 1]);
        assert!(matches!(
            after_seek(1, failed(), &assigned),
            AfterSeek::NotRewound(_)
        ));
        assert!(matches!(
            after_seek(2, failed(), &assigned),
            AfterSeek::Revoked(_)
        ));
        assert!(matches!(
            after_seek(1, Ok(()), &assigned),
            AfterSeek::Rewound
        ));
    }

    #[test]
    fn the_reroute_warning_gives_the_share_and_the_fix_for_each_reason() {
        let both = reroute_advice(1000, 100, 250);
        assert!(both.starts_with("35.0% of the input records"), "{both}");
        assert!(
            both.contains("10.0% were not keyed by their event_id"),
            "{both}"
        );
        assert!(both.contains("25.0% were keyed by it"), "{both}");
        assert!(both.contains("partitioner=murmur2_random"), "{both}");
        let keys_only = reroute_advice(10, 10, 0);
        assert!(keys_only.contains("100.0% were not keyed"), "{keys_only}");
        assert!(!keys_only.contains("murmur2"), "{keys_only}");
    }
}
