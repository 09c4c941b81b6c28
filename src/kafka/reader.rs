//! Reading a topic up to its end offsets, without joining a consumer group:
//! the sinks' ledger scan and the dead-letter listing, the router's dedup
//! restore and identity load, the demo's and tests' looks at a topic.
//!
//! [`ToEnd`] is the one loop they share: it polls an assigned consumer until
//! every partition has reached the end offset it was given (compaction and
//! transaction markers can leave the last offsets without a record, so the
//! consumer's position counts too), and gives up when the read stalls or
//! runs out of time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Headers, Message, OwnedMessage};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use super::progress::ReadProgress;
use super::{ADMIN_TIMEOUT, client};
use crate::config::KafkaConfig;

/// How long [`read_to_end`] may take in all.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a [`scan`] may read nothing before it is reported as stuck. Not
/// a total time: the ledger grows, and a slow scan that moves must finish.
const SCAN_STALL: Duration = Duration::from_secs(60);

/// Why a [`ToEnd`] read gave up before its end offsets.
#[derive(Debug, Error)]
pub enum ShortRead {
    #[error("stopped before its end offsets: nothing read for {}s", .0.as_secs())]
    Stalled(Duration),
    #[error("not at its end offsets after {}s", .0.as_secs())]
    TimedOut(Duration),
    #[error("stopped")]
    Stopped,
}

/// Why a [`scan`] failed.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("topic does not exist (run `switchyard topics create`)")]
    NoTopic,
    #[error(transparent)]
    Short(#[from] ShortRead),
}

/// When a read gives up.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    /// After this long without a record read or a position advanced (state
    /// topics grow, so no total time fits them all); logs its progress.
    Stall(Duration),
    /// After this long in all.
    Total(Duration),
}

/// One read of an assigned consumer up to given end offsets.
pub struct ToEnd {
    topic: String,
    /// Partition → the offset it is read up to (exclusive), while unreached.
    ends: HashMap<i32, i64>,
    limit: Limit,
    started: Instant,
    progress: ReadProgress,
    stop: Option<CancellationToken>,
    past_end: bool,
}

impl ToEnd {
    /// `what` names the read in progress lines; `ends` holds the partitions
    /// to read and the offset each is read up to.
    pub fn new(what: &'static str, topic: &str, ends: HashMap<i32, i64>, limit: Limit) -> ToEnd {
        let stall = match limit {
            Limit::Stall(d) | Limit::Total(d) => d,
        };
        ToEnd {
            topic: topic.to_string(),
            ends,
            limit,
            started: Instant::now(),
            progress: ReadProgress::new(what, topic, stall),
            stop: None,
            past_end: false,
        }
    }

    /// Gives up with [`ShortRead::Stopped`] once `stop` is cancelled.
    pub fn stop_on(mut self, stop: CancellationToken) -> ToEnd {
        self.stop = Some(stop);
        self
    }

    /// Also hands out records past the end of a partition already read to
    /// it (written since the read began): a consumer that goes on tailing
    /// the topic afterwards must not skip them.
    pub fn with_later_records(mut self) -> ToEnd {
        self.past_end = true;
        self
    }

    /// Reads no further in `partition`: it is done early.
    fn finish(&mut self, partition: i32) {
        self.ends.remove(&partition);
    }

    /// The next record, or poll error, before every partition reached its
    /// end; `Ok(None)` once they all have.
    pub fn next<'c, C: ConsumerContext>(
        &mut self,
        consumer: &'c BaseConsumer<C>,
        poll: Duration,
    ) -> Result<Option<KafkaResult<BorrowedMessage<'c>>>, ShortRead> {
        loop {
            if self.ends.is_empty() {
                return Ok(None);
            }
            if self.stop.as_ref().is_some_and(|s| s.is_cancelled()) {
                return Err(ShortRead::Stopped);
            }
            match self.limit {
                Limit::Stall(stall) => {
                    if self.progress.stalled() {
                        return Err(ShortRead::Stalled(stall));
                    }
                    self.progress.report(&self.ends);
                }
                Limit::Total(total) => {
                    if self.started.elapsed() > total {
                        return Err(ShortRead::TimedOut(total));
                    }
                }
            }
            match consumer.poll(poll) {
                Some(Ok(m)) => {
                    let p = m.partition();
                    self.progress.record(p, m.offset());
                    let end = self.ends.get(&p).copied();
                    if end.is_some_and(|end| m.offset() >= end - 1) {
                        self.ends.remove(&p);
                    }
                    if end.is_some() || self.past_end {
                        return Ok(Some(Ok(m)));
                    }
                }
                Some(Err(e)) => return Ok(Some(Err(e))),
                None => {
                    // A position that cannot be read now is asked again at
                    // the next idle poll; the limit ends a read that never moves.
                    if let Ok(pos) = consumer.position() {
                        let (topic, progress) = (&self.topic, &mut self.progress);
                        self.ends.retain(|p, end| {
                            let at = pos
                                .find_partition(topic, *p)
                                .and_then(|e| e.offset().to_raw());
                            if let Some(o) = at {
                                progress.position(*p, o);
                            }
                            at.is_none_or(|at| at < *end)
                        });
                    }
                }
            }
        }
    }
}

/// The partitions of `topic` (none when it does not exist).
fn partitions<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> KafkaResult<Vec<i32>> {
    let md = consumer.fetch_metadata(Some(topic), ADMIN_TIMEOUT)?;
    Ok(md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// Assigns `consumer` the non-empty `partitions` of `topic`, each from its
/// first record with a timestamp at or after `since_ms` (unix milliseconds)
/// when given, else from its start; returns the high watermark of each, the
/// end to read to.
fn assign_to_ends<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    partitions: &[i32],
    since_ms: Option<i64>,
) -> KafkaResult<HashMap<i32, i64>> {
    let mut starts = HashMap::new();
    if let Some(ms) = since_ms {
        let mut query = TopicPartitionList::new();
        for p in partitions {
            query.add_partition_offset(topic, *p, Offset::Offset(ms))?;
        }
        for e in consumer.offsets_for_times(query, ADMIN_TIMEOUT)?.elements() {
            starts.insert(e.partition(), e.offset());
        }
    }
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, ADMIN_TIMEOUT)?;
        let start = match starts.get(&p) {
            // No record that recent in this partition.
            Some(Offset::End) => continue,
            Some(Offset::Offset(o)) => (*o).max(low),
            _ => low,
        };
        if high > start {
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Offset(start))?;
        }
    }
    if !ends.is_empty() {
        consumer.assign(&tpl)?;
    }
    Ok(ends)
}

/// What a time range covers of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// The first record at or after the range's start.
    pub start: i64,
    /// The partition's end when the range was found: nothing at or past it
    /// is in the range.
    pub end: i64,
    /// Where the broker says the range ends (the first record at or after
    /// its end), for progress only: the reader ends a partition at the
    /// first record stamped at or after the range's end, because brokers
    /// answer "no such record" differently (tansu 0.6 answers offset 0).
    pub estimate: i64,
}

/// The partitions of a topic (none when it does not exist).
pub fn topic_partitions<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> Result<Vec<i32>, ReadError> {
    let found = partitions(consumer, topic)?;
    if found.is_empty() {
        return Err(ReadError::NoTopic);
    }
    Ok(found)
}

/// Assigns `consumer` the records of `topic` from the first at or after
/// `from_ms` (unix milliseconds) in each partition, or from the offset
/// `resume` gives a partition where that is later; returns each partition's
/// [`Span`], leaving out those with nothing to read.
pub fn assign_range<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    (from_ms, to_ms): (i64, i64),
    resume: &HashMap<i32, i64>,
) -> Result<std::collections::BTreeMap<i32, Span>, ReadError> {
    let partitions = topic_partitions(consumer, topic)?;
    let at = |ms: i64| -> KafkaResult<HashMap<i32, Offset>> {
        let mut query = TopicPartitionList::new();
        for p in &partitions {
            query.add_partition_offset(topic, *p, Offset::Offset(ms))?;
        }
        Ok(consumer
            .offsets_for_times(query, ADMIN_TIMEOUT)?
            .elements()
            .iter()
            .map(|e| (e.partition(), e.offset()))
            .collect())
    };
    let (starts, ends) = (at(from_ms)?, at(to_ms)?);
    let mut spans = std::collections::BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, ADMIN_TIMEOUT)?;
        let start = match starts.get(&p) {
            // No record that recent.
            Some(Offset::End) => high,
            Some(Offset::Offset(o)) => (*o).clamp(low, high),
            _ => low,
        }
        .max(resume.get(&p).copied().unwrap_or(low));
        let estimate = match ends.get(&p) {
            Some(Offset::Offset(o)) if *o > start => (*o).min(high),
            _ => high,
        };
        if high > start {
            spans.insert(
                p,
                Span {
                    start,
                    end: high,
                    estimate,
                },
            );
            tpl.add_partition_offset(topic, p, Offset::Offset(start))?;
        }
    }
    if !spans.is_empty() {
        consumer.assign(&tpl)?;
    }
    Ok(spans)
}

/// One read of a time range of a topic found by [`assign_range`]: its
/// records in each partition's order, a partition ending at its first
/// record stamped at or after the range's end, as Kafka finds times.
pub struct RangeRead {
    read: ToEnd,
    spans: std::collections::BTreeMap<i32, Span>,
    range: (i64, i64),
}

/// What [`RangeRead::next`] found.
pub enum InRange<'c> {
    /// A record in the range.
    Record(BorrowedMessage<'c>),
    /// A record between the range's offsets stamped before its start (a
    /// publisher's clock behind): passed over.
    Early { partition: i32, offset: i64 },
}

impl RangeRead {
    /// Opens a reader of `topic` assigned to `range` (unix milliseconds,
    /// `[from, to)`), from `resume`'s offsets where later.
    pub fn open(
        kafka: &KafkaConfig,
        bootstrap: &str,
        topic: &str,
        range: (i64, i64),
        resume: &HashMap<i32, i64>,
    ) -> Result<(BaseConsumer, RangeRead), ReadError> {
        let consumer: BaseConsumer = client::reader(kafka, bootstrap).create()?;
        let spans = assign_range(&consumer, topic, range, resume)?;
        let ends = spans.iter().map(|(p, s)| (*p, s.end)).collect();
        let read = RangeRead {
            read: ToEnd::new("range read", topic, ends, Limit::Stall(SCAN_STALL)),
            spans,
            range,
        };
        Ok((consumer, read))
    }

    /// Each partition's span, as found when opened.
    pub fn spans(&self) -> &std::collections::BTreeMap<i32, Span> {
        &self.spans
    }

    /// The next record of the range; `None` once every partition is done.
    pub fn next<'c, C: ConsumerContext>(
        &mut self,
        consumer: &'c BaseConsumer<C>,
    ) -> Result<Option<InRange<'c>>, ReadError> {
        loop {
            let Some(m) = self.read.next(consumer, Duration::from_millis(100))? else {
                return Ok(None);
            };
            let m = m?;
            let Some(span) = self.spans.get(&m.partition()) else {
                continue;
            };
            if m.offset() >= span.end {
                continue;
            }
            let stamped = m.timestamp().to_millis();
            if stamped.is_some_and(|ms| ms >= self.range.1) {
                self.read.finish(m.partition());
                continue;
            }
            if stamped.is_some_and(|ms| ms < self.range.0) {
                return Ok(Some(InRange::Early {
                    partition: m.partition(),
                    offset: m.offset(),
                }));
            }
            return Ok(Some(InRange::Record(m)));
        }
    }
}

/// Calls `each` for every record of `topic` below the high watermarks read
/// at the start, from the first record at or after `since_ms` in each
/// partition when given. Fails on a topic that does not exist, and on a
/// read that stalls. Blocking: call it from `spawn_blocking` in async code.
pub fn scan(
    kafka: &KafkaConfig,
    bootstrap: &str,
    topic: &str,
    since_ms: Option<i64>,
    mut each: impl FnMut(&BorrowedMessage<'_>),
) -> Result<(), ReadError> {
    let mut cfg = client::consumer(kafka, bootstrap);
    // A group id is required by librdkafka even though nothing is committed.
    cfg.set("group.id", "switchyard-scan")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer = cfg.create()?;
    let partitions = partitions(&consumer, topic)?;
    if partitions.is_empty() {
        return Err(ReadError::NoTopic);
    }
    let ends = assign_to_ends(&consumer, topic, &partitions, since_ms)?;
    let mut read = ToEnd::new("scan", topic, ends, Limit::Stall(SCAN_STALL));
    while let Some(m) = read.next(&consumer, Duration::from_millis(200))? {
        each(&m?);
    }
    Ok(())
}

/// Which partitions of a topic a [`scan_window`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Partitions {
    All,
    /// The partitions these keys go to under the Java client's partitioner
    /// (murmur2), as every producer of switchyard's writes them.
    OfKeys(Vec<Vec<u8>>),
}

/// What a [`scan_window`] read: the partitions and how many records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    pub partitions: Vec<i32>,
    pub records: u64,
}

/// Calls `each` for the records of some partitions of `topic` in a time
/// window: in each partition from the first record stamped at or after
/// `from_ms` (or from the earlier offset `earliest` names for it) up to the
/// first record stamped at or after `to_ms`, or the partition's end at the
/// start of the call. Blocking: call it from `spawn_blocking` in async code.
pub fn scan_window(
    kafka: &KafkaConfig,
    bootstrap: &str,
    topic: &str,
    which: &Partitions,
    (from_ms, to_ms): (i64, i64),
    earliest: &HashMap<i32, i64>,
    mut each: impl FnMut(&BorrowedMessage<'_>),
) -> Result<Window, ReadError> {
    let consumer: BaseConsumer = client::reader(kafka, bootstrap).create()?;
    let all = topic_partitions(&consumer, topic)?;
    let mut chosen: Vec<i32> = match which {
        Partitions::All => all.clone(),
        Partitions::OfKeys(keys) => {
            let n = i32::try_from(all.len()).unwrap_or(i32::MAX);
            keys.iter()
                .map(|k| super::partitioner::partition_for(k, n))
                .collect()
        }
    };
    chosen.sort_unstable();
    chosen.dedup();
    let mut query = TopicPartitionList::new();
    for p in &chosen {
        query.add_partition_offset(topic, *p, Offset::Offset(from_ms))?;
    }
    let starts: HashMap<i32, Offset> = consumer
        .offsets_for_times(query, ADMIN_TIMEOUT)?
        .elements()
        .iter()
        .map(|e| (e.partition(), e.offset()))
        .collect();
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for &p in &chosen {
        let (low, high) = consumer.fetch_watermarks(topic, p, ADMIN_TIMEOUT)?;
        let start = match starts.get(&p) {
            // No record that recent.
            Some(Offset::End) => high,
            Some(Offset::Offset(o)) => (*o).clamp(low, high),
            _ => low,
        };
        let start = earliest.get(&p).map_or(start, |e| start.min((*e).max(low)));
        if high > start {
            ends.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Offset(start))?;
        }
    }
    let mut window = Window {
        partitions: chosen,
        records: 0,
    };
    if ends.is_empty() {
        return Ok(window);
    }
    consumer.assign(&tpl)?;
    let mut read = ToEnd::new("window", topic, ends, Limit::Stall(SCAN_STALL));
    while let Some(m) = read.next(&consumer, Duration::from_millis(200))? {
        let m = m?;
        let needed = earliest
            .get(&m.partition())
            .is_some_and(|e| m.offset() <= *e);
        if !needed && m.timestamp().to_millis().is_some_and(|ms| ms >= to_ms) {
            // As Kafka finds times: the first record at or after the
            // window's end ends the partition's window.
            read.finish(m.partition());
            continue;
        }
        window.records += 1;
        each(&m);
    }
    Ok(window)
}

/// Every committed record of `topic` up to each partition's end at the time
/// of the call (later records are not waited for): for the demo, `dlq`
/// tooling and checks.
pub async fn read_to_end(
    kafka: &KafkaConfig,
    bootstrap: &str,
    topic: &str,
) -> Result<Vec<OwnedMessage>, KafkaError> {
    let consumer: BaseConsumer = client::reader(kafka, bootstrap).create()?;
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || read_blocking(&consumer, &topic))
        .await
        .map_err(|_| KafkaError::Canceled)?
}

fn read_blocking(consumer: &BaseConsumer, topic: &str) -> Result<Vec<OwnedMessage>, KafkaError> {
    let partitions = partitions(consumer, topic)?;
    let ends = assign_to_ends(consumer, topic, &partitions, None)?;
    let mut read = ToEnd::new("read", topic, ends, Limit::Total(READ_TIMEOUT)).with_later_records();
    let mut out = Vec::new();
    loop {
        match read.next(consumer, Duration::from_millis(200)) {
            Ok(Some(m)) => out.push(m?.detach()),
            Ok(None) => return Ok(out),
            Err(_) => {
                return Err(KafkaError::MessageConsumption(
                    RDKafkaErrorCode::OperationTimedOut,
                ));
            }
        }
    }
}

/// A record's headers as strings.
pub fn headers(m: &OwnedMessage) -> HashMap<String, String> {
    m.headers()
        .map(|h| {
            h.iter()
                .map(|hdr| {
                    (
                        hdr.key.to_string(),
                        String::from_utf8_lossy(hdr.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
