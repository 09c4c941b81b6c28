//! `switchyard replay`: delivers a time range again, for backfills. From the
//! canonical topic, each event goes through the router's rules (validation,
//! the identity table, consent, allowlist, names) for the chosen
//! destinations only; from a deliver topic, each delivery goes back as it
//! is. Events the delivery ledger shows as delivered to a destination are
//! skipped there unless forced.
//!
//! The range is by record timestamp, found as Kafka finds times: in each
//! partition, from the first record at or after `--from` up to the first at
//! or after `--to`. Records in between stamped before `--from` are passed
//! over; a record stamped inside the range but written after the first one
//! past `--to` (a publisher's clock far behind) is not seen.
//!
//! A replay never touches the router's dedup state (so a live event is
//! never dropped later because a replay saw it) nor writes the identity
//! table; copies of one event within the range go once. It moves on in
//! batches whose writes are acknowledged before the next is read, so a
//! stopped replay knows exactly where each partition got to and resumes
//! there, with no gap and no double.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::delivery::dead_letter::header;
use crate::kafka::client;
use crate::kafka::reader::{self, InRange, RangeRead, ReadError};
use crate::router::RouterError;
use crate::router::pipeline::{Batch, InRecord, NotReplayed, Pipeline, Replayed};
use crate::router::route::Skip;
use crate::sink::records::latest_outcomes;

/// Records read, routed and acknowledged per step; also the most a stop
/// waits for.
const STEP: usize = 500;
/// Outcomes are written after their event; one this much older than the
/// range's start cannot be about an event in it.
const LEDGER_MARGIN: chrono::Duration = chrono::Duration::hours(24);

/// Which topic a replay reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The canonical input, routed again for the chosen destinations.
    Canonical,
    /// Each chosen destination's deliver topic, as it is.
    Deliver,
}

impl FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Source, String> {
        match s {
            "canonical" => Ok(Source::Canonical),
            "deliver" => Ok(Source::Deliver),
            other => Err(format!("`{other}`: expected canonical or deliver")),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Canonical => "canonical",
            Source::Deliver => "deliver",
        })
    }
}

/// Where a stopped replay goes on: per topic and partition, the next offset.
/// Written `TOPIC/PARTITION=OFFSET,…` (topic names hold none of `/,=`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume(BTreeMap<String, BTreeMap<i32, i64>>);

impl Resume {
    fn of(&self, topic: &str) -> HashMap<i32, i64> {
        self.0
            .get(topic)
            .map(|m| m.iter().map(|(p, o)| (*p, *o)).collect())
            .unwrap_or_default()
    }
}

impl FromStr for Resume {
    type Err = String;
    fn from_str(s: &str) -> Result<Resume, String> {
        let mut out = Resume::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let parsed = part.rsplit_once('=').and_then(|(at, offset)| {
                let (topic, partition) = at.rsplit_once('/')?;
                Some((topic, partition.parse().ok()?, offset.parse().ok()?))
            });
            let Some((topic, partition, offset)) = parsed else {
                return Err(format!("`{part}`: expected TOPIC/PARTITION=OFFSET"));
            };
            out.0
                .entry(topic.to_string())
                .or_default()
                .insert(partition, offset);
        }
        Ok(out)
    }
}

impl fmt::Display for Resume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (topic, partitions) in &self.0 {
            for (p, o) in partitions {
                if !first {
                    f.write_str(",")?;
                }
                first = false;
                write!(f, "{topic}/{p}={o}")?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Enabled destinations by name; empty: every enabled one.
    pub destinations: Vec<String>,
    pub source: Source,
    /// Count what would be replayed; write nothing.
    pub dry_run: bool,
    /// At most this many records read per second.
    pub rate: Option<u32>,
    /// Replay events the ledger shows as delivered, and have sinks send them.
    pub force: bool,
    pub resume: Resume,
}

/// Per destination, what the replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    pub replayed: u64,
    /// The ledger shows them delivered there.
    pub delivered_before: u64,
    pub consent: u64,
    /// Not in the destination's allowlist, or no vendor name for the event.
    pub not_routed: u64,
    /// Too large to produce (dead-lettered when routed live).
    pub oversize: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Records in the range, read.
    pub records: u64,
    /// Records between the range's first and last offsets whose own
    /// timestamp lies outside it (a publisher's clock off): passed over.
    pub outside: u64,
    pub invalid: u64,
    /// Further copies of an event_id within the range.
    pub duplicates: u64,
    /// Copies on a partition other than their event_id's (the router moved
    /// them; they are replayed from where it moved them).
    pub moved: u64,
    pub rows: BTreeMap<String, Row>,
    /// Set when stopped before the end: where to go on from.
    pub stopped: Option<Resume>,
    pub dry_run: bool,
}

/// How far a replay is, for its progress display.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub read: u64,
    pub total: u64,
    pub elapsed: Duration,
}

#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("--from ({0}) must be before --to ({1})")]
    EmptyRange(DateTime<Utc>, DateTime<Utc>),
    #[error(transparent)]
    NotEnabled(#[from] crate::config::NotEnabled),
    #[error("reading {topic}: {source}")]
    Read { topic: String, source: ReadError },
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("loading the identity table: {0}")]
    Router(#[from] RouterError),
    #[error("writing replayed records: {0}")]
    Produce(KafkaError),
    #[error("{0}")]
    Task(String),
}

/// One topic to read, and for a deliver topic the destination it feeds.
struct Work {
    topic: String,
    destination: Option<usize>,
    consumer: BaseConsumer,
    read: RangeRead,
}

/// Runs a replay until its range is done or `stop` is cancelled (then the
/// report says where to resume). `progress` is called after every step.
pub async fn run(
    config: Arc<Config>,
    bootstrap: &str,
    opts: Options,
    stop: CancellationToken,
    progress: impl FnMut(&Progress) + Send + 'static,
) -> Result<Report, ReplayError> {
    if opts.from >= opts.to {
        return Err(ReplayError::EmptyRange(opts.from, opts.to));
    }
    let enabled: Vec<String> = config
        .enabled_destinations()
        .map(|d| d.name.clone())
        .collect();
    let only = config.chosen_destinations(&opts.destinations)?;
    let names: Vec<String> = enabled
        .iter()
        .zip(&only)
        .filter(|(_, o)| **o)
        .map(|(n, _)| n.clone())
        .collect();
    let delivered = if opts.force {
        HashMap::new()
    } else {
        ledger(&config, bootstrap, opts.from - LEDGER_MARGIN, &names).await?
    };

    let range = (opts.from.timestamp_millis(), opts.to.timestamp_millis());
    let topics: Vec<(String, Option<usize>)> = match opts.source {
        Source::Canonical => vec![(config.topics.canonical.clone(), None)],
        Source::Deliver => only
            .iter()
            .enumerate()
            .filter(|(_, o)| **o)
            .map(|(i, _)| (config.topics.deliver(&enabled[i]), Some(i)))
            .collect(),
    };
    let (kafka, at, resume) = (
        config.kafka.clone(),
        bootstrap.to_string(),
        opts.resume.clone(),
    );
    let work = tokio::task::spawn_blocking(move || {
        topics
            .into_iter()
            .map(|(topic, destination)| {
                let (consumer, read) =
                    RangeRead::open(&kafka, &at, &topic, range, &resume.of(&topic)).map_err(
                        |source| ReplayError::Read {
                            topic: topic.clone(),
                            source,
                        },
                    )?;
                tracing::debug!(topic, spans = ?read.spans(), "replay range");
                Ok(Work {
                    topic,
                    destination,
                    consumer,
                    read,
                })
            })
            .collect::<Result<Vec<Work>, ReplayError>>()
    })
    .await
    .map_err(|e| ReplayError::Task(e.to_string()))??;

    let pipeline = match opts.source {
        Source::Canonical => {
            let partitions = work
                .first()
                .map(|w| partition_count(&w.consumer, &w.topic))
                .transpose()?
                .unwrap_or(config.topics.partitions);
            Some(
                crate::router::replay_pipeline(config.clone(), bootstrap, partitions, &stop)
                    .await?,
            )
        }
        Source::Deliver => None,
    };
    let producer: FutureProducer =
        client::idempotent_producer(&config.kafka, bootstrap).create()?;
    let replay = Replay {
        handle: tokio::runtime::Handle::current(),
        producer,
        enabled,
        only,
        delivered,
        pipeline,
        headers: replay_headers(&opts),
        opts,
        stop,
    };
    tokio::task::spawn_blocking(move || replay.go(work, progress))
        .await
        .map_err(|e| ReplayError::Task(e.to_string()))?
}

fn partition_count(consumer: &BaseConsumer, topic: &str) -> Result<i32, ReplayError> {
    let found = reader::topic_partitions(consumer, topic).map_err(|source| ReplayError::Read {
        topic: topic.to_string(),
        source,
    })?;
    Ok(i32::try_from(found.len()).unwrap_or(i32::MAX))
}

/// The headers every replayed delivery carries.
fn replay_headers(opts: &Options) -> Vec<(&'static str, String)> {
    let mut h = vec![(
        header::REPLAY,
        Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    )];
    if opts.force {
        h.push((header::REPLAY_FORCE, "1".into()));
    }
    h
}

/// Per destination of `destinations`, the event_ids whose latest outcome
/// there is delivered, from outcomes written since `since`.
async fn ledger(
    config: &Config,
    bootstrap: &str,
    since: DateTime<Utc>,
    destinations: &[String],
) -> Result<HashMap<String, HashSet<String>>, ReplayError> {
    let (kafka, bootstrap, topic) = (
        config.kafka.clone(),
        bootstrap.to_string(),
        config.topics.outcomes(),
    );
    let wanted: HashSet<String> = destinations.iter().cloned().collect();
    tokio::task::spawn_blocking(move || {
        let latest = latest_outcomes(
            &kafka,
            &bootstrap,
            &topic,
            since.timestamp_millis(),
            &wanted,
        )
        .map_err(|source| ReplayError::Read { topic, source })?;
        let mut out: HashMap<String, HashSet<String>> = HashMap::new();
        for ((destination, event_id), delivered) in latest {
            if delivered {
                out.entry(destination).or_default().insert(event_id);
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| ReplayError::Task(e.to_string()))?
}

struct Replay {
    handle: tokio::runtime::Handle,
    producer: FutureProducer,
    enabled: Vec<String>,
    only: Vec<bool>,
    /// Per destination, the event_ids the ledger shows delivered there.
    delivered: HashMap<String, HashSet<String>>,
    pipeline: Option<Pipeline>,
    headers: Vec<(&'static str, String)>,
    opts: Options,
    stop: CancellationToken,
}

/// A record to write, owned.
struct Write {
    topic: String,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
}

impl Replay {
    /// Blocking: reads every topic's spans in steps, writes each step and
    /// waits for its acknowledgements before the next.
    fn go(
        mut self,
        work: Vec<Work>,
        mut progress: impl FnMut(&Progress),
    ) -> Result<Report, ReplayError> {
        let total: u64 = work
            .iter()
            .flat_map(|w| w.read.spans().values())
            .map(|span| u64::try_from(span.estimate - span.start).unwrap_or(0))
            .sum();
        let mut report = Report {
            dry_run: self.opts.dry_run,
            rows: self
                .enabled
                .iter()
                .zip(&self.only)
                .filter(|(_, o)| **o)
                .map(|(n, _)| (n.clone(), Row::default()))
                .collect(),
            ..Report::default()
        };
        let started = Instant::now();
        let step = self
            .opts
            .rate
            .map_or(STEP, |r| usize::try_from(r).unwrap_or(STEP).clamp(1, STEP));
        // Where each topic's partitions got to, acknowledged; from their
        // starts until then.
        let mut at: BTreeMap<String, BTreeMap<i32, i64>> = work
            .iter()
            .map(|w| {
                let starts = w.read.spans().iter().map(|(p, s)| (*p, s.start));
                (w.topic.clone(), starts.collect())
            })
            .collect();
        let mut seen: HashMap<Option<usize>, HashSet<String>> = HashMap::new();
        let mut batch = Batch::default();
        progress(&Progress {
            read: 0,
            total,
            elapsed: started.elapsed(),
        });
        for mut w in work {
            let seen = seen.entry(w.destination).or_default();
            let mut done = false;
            while !done {
                if self.stop.is_cancelled() {
                    report.stopped = Some(Resume(at));
                    return Ok(report);
                }
                let mut writes = Vec::new();
                let mut next: BTreeMap<i32, i64> = BTreeMap::new();
                batch.clear();
                let mut taken = 0;
                while taken < step {
                    let m = match w.read.next(&w.consumer) {
                        Ok(Some(InRange::Record(m))) => m,
                        Ok(Some(InRange::Early { partition, offset })) => {
                            next.insert(partition, offset + 1);
                            taken += 1;
                            report.outside += 1;
                            continue;
                        }
                        Ok(None) => {
                            done = true;
                            break;
                        }
                        Err(source) => {
                            return Err(ReplayError::Read {
                                topic: w.topic.clone(),
                                source,
                            });
                        }
                    };
                    next.insert(m.partition(), m.offset() + 1);
                    taken += 1;
                    report.records += 1;
                    match w.destination {
                        None => self.route(&m, seen, &mut batch, &mut report),
                        Some(i) => {
                            if let Some(write) = self.copy(&m, i, seen, &mut report) {
                                writes.push(write);
                            }
                        }
                    }
                }
                writes.extend(batch.records().map(|o| {
                    Write {
                        topic: o.topic.to_string(),
                        key: o.key.map(<[u8]>::to_vec),
                        payload: o.payload.unwrap_or_default().to_vec(),
                        headers: o
                            .headers
                            .iter()
                            .map(|(k, v)| ((*k).to_string(), v.clone().into_bytes()))
                            .collect(),
                    }
                }));
                if !self.opts.dry_run {
                    self.write(&writes)?;
                }
                at.entry(w.topic.clone()).or_default().extend(next);
                progress(&Progress {
                    read: report.records + report.outside,
                    total,
                    elapsed: started.elapsed(),
                });
                if let Some(rate) = self.opts.rate {
                    let read = (report.records + report.outside) as f64;
                    let due = Duration::from_secs_f64(read / f64::from(rate.max(1)));
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        self.pause(wait);
                    }
                }
            }
        }
        Ok(report)
    }

    /// Sleeps `wait`, or less when stopped.
    fn pause(&self, wait: Duration) {
        let stop = self.stop.clone();
        self.handle.block_on(async move {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = stop.cancelled() => {}
            }
        });
    }

    /// Routes one canonical record again for the chosen destinations.
    fn route(
        &mut self,
        m: &BorrowedMessage<'_>,
        seen: &mut HashSet<String>,
        batch: &mut Batch,
        report: &mut Report,
    ) {
        let Some(pipeline) = self.pipeline.as_mut() else {
            return;
        };
        let rec = InRecord {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key(),
            payload: m.payload(),
            timestamp_ms: m.timestamp().to_millis(),
        };
        let (enabled, delivered) = (&self.enabled, &self.delivered);
        let was_delivered = |i: usize, id: &str| {
            delivered
                .get(&enabled[i])
                .is_some_and(|ids| ids.contains(id))
        };
        match pipeline.replay(&rec, &self.only, seen, was_delivered, &self.headers, batch) {
            Ok(done) => {
                for (i, what) in done {
                    let Some(row) = report.rows.get_mut(&self.enabled[i]) else {
                        continue;
                    };
                    match what {
                        Replayed::Routed => row.replayed += 1,
                        Replayed::AlreadyDelivered => row.delivered_before += 1,
                        Replayed::Oversize => row.oversize += 1,
                        Replayed::Skipped(
                            Skip::ConsentDenied { .. } | Skip::ConsentMissing { .. },
                        ) => row.consent += 1,
                        Replayed::Skipped(Skip::NotInAllowlist | Skip::NotMapped) => {
                            row.not_routed += 1;
                        }
                    }
                }
            }
            Err(NotReplayed::Duplicate) => report.duplicates += 1,
            Err(NotReplayed::Moved) => report.moved += 1,
            Err(NotReplayed::Invalid) => report.invalid += 1,
        }
    }

    /// One delivery of a deliver topic, to write again as it is.
    fn copy(
        &self,
        m: &BorrowedMessage<'_>,
        destination: usize,
        seen: &mut HashSet<String>,
        report: &mut Report,
    ) -> Option<Write> {
        let name = &self.enabled[destination];
        let event_id = crate::delivery::event_id_in(m.payload());
        let Some(event_id) = event_id else {
            report.invalid += 1;
            return None;
        };
        if !seen.insert(event_id.clone()) {
            report.duplicates += 1;
            return None;
        }
        let row = report.rows.entry(name.clone()).or_default();
        if self
            .delivered
            .get(name)
            .is_some_and(|ids| ids.contains(&event_id))
        {
            row.delivered_before += 1;
            return None;
        }
        row.replayed += 1;
        let mut headers: Vec<(String, Vec<u8>)> = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .filter(|h| !header::is_own(h.key) && !h.key.starts_with("switchyard-replay"))
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        headers.extend(
            self.headers
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.clone().into_bytes())),
        );
        Some(Write {
            topic: m.topic().to_string(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers,
        })
    }

    /// Produces `writes` and waits until every one is acknowledged.
    fn write(&self, writes: &[Write]) -> Result<(), ReplayError> {
        let producer = &self.producer;
        self.handle.block_on(async {
            let sends = writes.iter().map(|w| {
                let mut headers = OwnedHeaders::new();
                for (k, v) in &w.headers {
                    headers = headers.insert(Header {
                        key: k,
                        value: Some(v),
                    });
                }
                let mut record = FutureRecord::<[u8], [u8]>::to(&w.topic)
                    .payload(&w.payload)
                    .headers(headers);
                if let Some(k) = &w.key {
                    record = record.key(k);
                }
                producer.send(record, Timeout::After(Duration::from_secs(60)))
            });
            for sent in futures::future::join_all(sends).await {
                sent.map_err(|(e, _)| ReplayError::Produce(e))?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_point_reads_back_as_written() {
        let r: Resume = "switchyard.canonical/0=12,switchyard.canonical/3=7,x.deliver.hook/1=0"
            .parse()
            .unwrap();
        assert_eq!(
            r.of("switchyard.canonical"),
            HashMap::from([(0, 12), (3, 7)])
        );
        assert_eq!(r.of("x.deliver.hook"), HashMap::from([(1, 0)]));
        assert_eq!(r.to_string().parse::<Resume>().unwrap(), r);
        assert!("canonical=3".parse::<Resume>().is_err());
        assert!("t/x=3".parse::<Resume>().is_err());
        assert_eq!("".parse::<Resume>().unwrap(), Resume::default());
    }

    #[test]
    fn sources_parse_by_name() {
        assert_eq!("canonical".parse::<Source>(), Ok(Source::Canonical));
        assert_eq!("deliver".parse::<Source>(), Ok(Source::Deliver));
        assert!("dlq".parse::<Source>().is_err());
    }
}
