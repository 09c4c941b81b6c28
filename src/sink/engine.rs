//! The engine: one task that owns the consumer and routes every record
//! through the state machines ([`Batcher`], [`Ordering`], [`Laps`]), runs
//! each batch and each retry-topic write in its own task, and applies what
//! they report back. Bounded: at most `max_in_flight` batches and a fixed
//! number of buffered records, after which it stops reading.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::SinkError;
use super::batching::{self, Batcher, COMMIT_INTERVAL};
use super::laps::Laps;
use super::metrics::{self, RETRY_QUEUE};
use super::ordering::{Next, Ordering};
use super::records::{Final, Item};
use super::send::{self, Done, DoneKind, Shared};
use super::wiring::SinkContext;
use crate::run::SHUTDOWN_DEADLINE;

pub(super) type SinkConsumer = StreamConsumer<SinkContext>;

/// What a task reports when it ends.
type TaskResult = Result<Vec<Done>, SinkError>;

pub(super) struct Engine {
    shared: Arc<Shared>,
    batcher: Batcher,
    /// Present with `ordering = true`.
    ordering: Option<Ordering>,
    laps: Laps,
    /// Deliver partitions are paused: the parked events are at their bound.
    parked_full: bool,
    /// Delivery batches (at most `max_in_flight`).
    batches: JoinSet<TaskResult>,
    /// Writes to the retry topic (parked followers, requeued records), with
    /// how many items each holds.
    writes: JoinSet<(usize, TaskResult)>,
    writing: usize,
    max_buffered: usize,
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

impl Engine {
    pub(super) fn new(shared: Arc<Shared>) -> Engine {
        let settings = &shared.settings;
        let max_buffered = shared.limits.max_events * (settings.max_in_flight + 2);
        Engine {
            batcher: Batcher::new(shared.limits, settings.linger),
            ordering: settings
                .ordering
                .then(|| Ordering::new(shared.retry_topic.clone())),
            laps: Laps::new(
                shared.retry_topic.clone(),
                settings.retry.park_after,
                (max_buffered / 4).max(16),
            ),
            max_buffered,
            parked_full: false,
            batches: JoinSet::new(),
            writes: JoinSet::new(),
            writing: 0,
            read_again_at: None,
            consumer_failing: false,
            throttled: false,
            cancel: CancellationToken::new(),
            shared,
        }
    }

    pub(super) async fn run(
        &mut self,
        consumer: &SinkConsumer,
        shutdown: &CancellationToken,
    ) -> Result<(), SinkError> {
        let mut commit_tick = tokio::time::interval(COMMIT_INTERVAL);
        let mut stop_by: Option<Instant> = None;
        loop {
            let max_in_flight = self.shared.settings.max_in_flight;
            let linger_at = self
                .batcher
                .linger_until()
                .filter(|_| self.batches.len() < max_in_flight && stop_by.is_none());
            let due_at = self.laps.next_wake();
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
            while self.batches.len() < max_in_flight && self.batcher.is_ready() {
                self.flush();
            }
        }
    }

    fn buffered(&self) -> usize {
        self.batcher.len()
            + self.ordering.as_ref().map_or(0, Ordering::waiting)
            + self.writing
            + self.laps.buffered()
    }

    fn parked_events(&self) -> usize {
        self.ordering.as_ref().map_or(0, Ordering::parked_events)
    }

    fn report(&self) {
        let name = &self.shared.destination;
        RETRY_QUEUE
            .with_label_values(&[name])
            .set(i64::try_from(self.laps.not_due()).unwrap_or(i64::MAX));
        if self.ordering.is_some() {
            metrics::PARKED_EVENTS
                .with_label_values(&[name])
                .set(i64::try_from(self.parked_events()).unwrap_or(i64::MAX));
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
        let parked = self.parked_events();
        let parked_full = if self.parked_full {
            parked > max_parked * 3 / 4
        } else {
            parked >= max_parked
        };
        if throttle == self.throttled && parked_full == self.parked_full && !assigned {
            return;
        }
        if parked_full != self.parked_full {
            tracing::info!(
                destination = %self.shared.destination,
                parked,
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
            let waits_on_its_own = is_retry && self.laps.is_paused(e.partition());
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
        let partition = item.source.partition;
        let read = self.laps.read(item, Utc::now());
        if let Some(item) = read.due_now {
            self.admit(item);
        }
        if read.pause {
            self.pause(consumer, partition, false);
        }
    }

    /// Writes the retry records read before they were due back to the end of
    /// their partitions (one task per engine round).
    fn write_requeued(&mut self) {
        let finals = self.laps.take_requeued();
        if finals.is_empty() {
            return;
        }
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
        let released = self.laps.release_due(Utc::now());
        for p in released.resume {
            self.pause(consumer, p, true);
        }
        for item in released.items {
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
        let gone: HashSet<_> = revoked.into_iter().collect();
        let before = self.buffered();
        self.batcher.drop_partitions(&gone);
        self.laps.drop_partitions(&gone);
        // Their parked events are read by the retry partition's new owner.
        let next = self
            .ordering
            .as_mut()
            .map(|o| o.drop_partitions(&gone))
            .unwrap_or_default();
        self.go(next);
        tracing::info!(
            destination = %self.shared.destination,
            dropped = before.saturating_sub(self.buffered()),
            "buffered records of handed-over partitions dropped"
        );
    }

    /// An item that may be sent now (subject to ordering and the ledger).
    fn admit(&mut self, item: Item) {
        // A forced replay is sent again on purpose (e.g. after a mapping fix).
        let forced = item
            .headers
            .iter()
            .any(|(k, _)| k == crate::delivery::dead_letter::header::REPLAY_FORCE);
        if let (Some(ledger), Some(id), false) = (&self.shared.ledger, item.event_id(), forced)
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
            if let Some(o) = &mut self.ordering {
                o.skipped(&item);
            }
            return;
        }
        let next = match &mut self.ordering {
            Some(o) => o.admit(item),
            None => Some(Next::Send(item)),
        };
        self.go(next);
    }

    /// Carries out what the ordering books let go.
    fn go(&mut self, next: impl IntoIterator<Item = Next>) {
        for n in next {
            match n {
                Next::Send(item) => self.batcher.push(item),
                Next::Follow(item, due) => self.follow(item, due),
            }
        }
    }

    /// Writes `item` to the retry topic behind its person's parked event.
    fn follow(&mut self, item: Item, due: DateTime<Utc>) {
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
            self.laps.wake_for(retry_partition, due);
        }
        if self.ordering.is_none() || d.anchor.is_empty() {
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
        let Some(ordering) = &mut self.ordering else {
            return;
        };
        let next = match d.kind {
            DoneKind::Parked {
                due,
                retry_partition,
            } => ordering.parked(&d.anchor, d.origin_offset, due, retry_partition),
            DoneKind::Resolved => ordering.resolved(&d.anchor, d.origin_offset),
            DoneKind::Followed { .. } | DoneKind::Requeued => Vec::new(),
        };
        self.go(next);
    }

    fn flush(&mut self) {
        let batch = self.batcher.take();
        self.shared.ownership.dispatched(&batch);
        let shared = self.shared.clone();
        let cancel = self.cancel.clone();
        self.batches
            .spawn(async move { send::deliver(shared, batch, cancel).await });
    }

    pub(super) fn commit(&mut self, consumer: &SinkConsumer, mode: CommitMode) {
        let commits = self.shared.ownership.take_commits();
        if commits.is_empty() {
            return;
        }
        if let Err(e) = batching::commit(consumer, &commits, mode) {
            // Only owned partitions are ever committed; a failure means the
            // next owner re-reads from the previous commit (duplicates, no loss).
            tracing::warn!(destination = %self.shared.destination, error = %e, "offset commit failed");
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
