//! `switchyard bench router`: (a) the in-process step chain's events/s per
//! core with three destinations; (b) end-to-end events/s through a broker;
//! (c) a raw consume → produce copy with the same fan-out on the same broker,
//! and (b)/(c); (d) dedup memory per key and restore time; (e) the identity
//! table's memory per person, and the time a starting router takes to load
//! it from the identity topic.
//!
//! (a) is measured on one thread and charged by that thread's own CPU time
//! (/proc/thread-self/schedstat), so other load on the machine does not
//! count. (b) and (c) run one after the other on the same broker and input,
//! so their ratio is what to compare across machines.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, DefaultConsumerContext};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use super::dedup::{self, PartitionDedup};
use super::identity::IdentityTable;
use super::pipeline::{Batch, InRecord, Out, Pipeline};
use super::runner::{IdentityTail, load_identity, restore_partition};
use crate::config::Config;
use crate::kafka::partitioner::partition_for;
use crate::kafka::rebalance::GroupConsumer;
use crate::kafka::{self, Cluster, client};
use crate::run::RoleContext;

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The broker for (b), (c) and the restore half of (d), e.g. a local tansu.
    pub brokers: Option<String>,
    /// Events through the in-process step chain.
    pub chain_events: usize,
    /// Events through the broker for (b) and (c).
    pub broker_events: usize,
    /// Keys for the dedup memory and restore figures.
    pub dedup_keys: usize,
    /// People (ten events each) for the identity figures.
    pub identity_people: usize,
    /// Alternating (b)/(c) measurements; their medians are reported.
    pub rounds: usize,
}

#[derive(Debug, Error)]
pub enum BenchError {
    #[error(transparent)]
    Kafka(#[from] kafka::Error),
    #[error("kafka: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Router(#[from] super::RouterError),
    #[error("{0} did not finish within {1:?}")]
    Timeout(&'static str, Duration),
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    pub bench: &'static str,
    pub destinations: usize,
    pub chain_events: usize,
    pub chain_events_per_s_per_core: f64,
    pub chain_passes: Vec<f64>,
    /// Records the step chain wrote per input event.
    pub deliveries_per_event: f64,
    pub identity_writes_per_event: f64,
    pub broker: Option<String>,
    pub broker_events: usize,
    pub e2e_events_per_s: Option<f64>,
    pub copy_events_per_s: Option<f64>,
    pub e2e_to_copy_ratio: Option<f64>,
    pub e2e_rounds: Vec<f64>,
    pub copy_rounds: Vec<f64>,
    pub dedup_keys: usize,
    pub dedup_bytes_per_key: f64,
    pub dedup_restore_s: Option<f64>,
    /// Each a user and a device in the table.
    pub identity_people: usize,
    /// Identity topic records their events wrote.
    pub identity_records: usize,
    pub identity_bytes_per_person: f64,
    /// CPU seconds to parse and apply the records, without a broker.
    pub identity_apply_s: f64,
    pub identity_load_s: Option<f64>,
}

const DESTINATIONS: &str = r#"
[destinations.meta]
type = "meta_capi"
pixel_id = "1"
access_token = "bench"
[destinations.ga4]
type = "ga4"
measurement_id = "G-BENCH1"
api_secret = "bench"
[destinations.hook]
type = "webhook"
url = "http://127.0.0.1:9/"
secret = "0123456789abcdef"
consent = "analytics"
"#;

fn config(brokers: Option<&str>, prefix: &str) -> Config {
    let kafka = match brokers {
        Some(b) => format!(
            "[kafka]\nbrokers = \"{b}\"\nguarantee = \"at_least_once\"\nconsumer_properties = {{ \"partition.assignment.strategy\" = \"roundrobin\" }}\n"
        ),
        None => String::new(),
    };
    let text = format!(
        "{kafka}[topics]\ncanonical = \"{prefix}.canonical\"\nprefix = \"{prefix}\"\npartitions = 4\n[metrics]\nlisten = \"127.0.0.1:0\"\n{DESTINATIONS}"
    );
    Config::parse(&text, std::path::Path::new("bench.toml"), &|_| None)
        .expect("the bench config is valid")
}

/// People who come back, as they do in real traffic: `n / 10` people with
/// ten events each, spread through the stream (one person's events are
/// `n / 10` apart, so they seldom share a batch). Everyone has one device
/// (anonymous id) and a user id, and one event in five is made logged out.
/// A third of people gave an email and a tenth a phone number, the same each
/// time. The Meta click cookie (`fbc`) is replaced when someone comes back
/// through a new ad: on their first event and on every fifth after it. One
/// event in 50 repeats the event before it. Events are a second apart.
/// What the identity table learns per event decides how much the router
/// writes beyond the deliveries: `identity_writes_per_event` in the figures.
fn events(n: usize) -> impl Iterator<Item = (String, Vec<u8>)> {
    let people = people(n);
    (0..n).map(move |i| {
            let (person, visit) = (i % people, i / people);
            let dup_of = if i % 50 == 49 { i - 1 } else { i };
            let id = format!("bench-{dup_of:09}");
            let who = if (person + visit) % 5 == 0 {
                format!(r#""anonymous_id":"anon-{person}""#)
            } else {
                format!(r#""user_id":"u-{person}","anonymous_id":"anon-{person}""#)
            };
            let email = if person % 3 == 0 {
                format!(r#","email":"Person.{person}@Example.com""#)
            } else {
                String::new()
            };
            let phone = if person % 10 == 0 {
                format!(r#","phone":"+1 650 253 {:04}""#, person % 10_000)
            } else {
                String::new()
            };
            let click = visit / 5;
            // A second apart, so identity facts have an order to keep.
            let at = chrono::DateTime::from_timestamp(1_795_132_800 + i as i64, 0)
                .expect("a valid time")
                .format("%Y-%m-%dT%H:%M:%SZ");
            let body = format!(
                r#"{{"event":"purchase","event_id":"{id}","occurred_at":"{at}",{who}{email}{phone},"value":{}.5,"currency":"USD","order_id":"o-{i}","items":[{{"id":"sku-{}","quantity":1,"price":{}.5}}],"click_ids":{{"fbc":"fb.1.1700000000.{person}x{click}"}},"context":{{"ip":"203.0.113.7","user_agent":"Mozilla/5.0"}},"consent":{{"ads":"granted","analytics":"granted"}}}}"#,
                i % 500,
                i % 300,
                i % 500
            );
            (id, body.into_bytes())
    })
}

/// The people among `n` events of [`events`].
fn people(n: usize) -> usize {
    (n / 10).max(1)
}

/// CPU time this thread has run, from the scheduler's own accounting.
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

pub async fn run(opts: &BenchOptions) -> Result<Figures, BenchError> {
    let mut f = Figures {
        bench: "router",
        destinations: 3,
        chain_events: opts.chain_events,
        broker: opts.brokers.clone(),
        broker_events: opts.broker_events,
        dedup_keys: opts.dedup_keys,
        ..Figures::default()
    };
    // Each pass runs the same input through a fresh pipeline; the median
    // counts, because one pass on a shared VM can lose a third of its speed
    // to the kernel zeroing pages the allocator handed back.
    let input = Arc::new(events(opts.chain_events).collect::<Vec<_>>());
    for pass in 1..=CHAIN_PASSES {
        let (rate, deliveries, identity_writes) = tokio::task::spawn_blocking({
            let input = input.clone();
            move || step_chain(&input)
        })
        .await
        .map_err(super::RouterError::from)?;
        println!("(a) pass {pass}: {rate:.0} events/s per core");
        f.chain_passes.push(rate);
        f.deliveries_per_event = deliveries;
        f.identity_writes_per_event = identity_writes;
    }
    drop(input);
    f.chain_events_per_s_per_core = median(&f.chain_passes);
    println!(
        "(a) step chain, 3 destinations: {:.0} events/s per core ({} events, median of {CHAIN_PASSES} passes)",
        f.chain_events_per_s_per_core, opts.chain_events
    );
    println!(
        "(a) writes per event: {:.2} deliveries, {:.2} identity updates",
        f.deliveries_per_event, f.identity_writes_per_event
    );

    // As the router holds them: chunks of one batch's new keys each.
    let mut state = PartitionDedup::default();
    let entries: Vec<_> = (0..opts.dedup_keys)
        .map(|i| (dedup::key_of(&format!("evt-{i:012}")), 1_700_000_000))
        .collect();
    for part in entries.chunks(1000) {
        state.insert_chunk(dedup::new_chunk_id(), part);
    }
    f.dedup_bytes_per_key = state.heap_bytes() as f64 / state.len().max(1) as f64;
    println!(
        "(d) dedup memory: {:.1} bytes/key at {} keys",
        f.dedup_bytes_per_key, opts.dedup_keys
    );

    let people = opts.identity_people;
    let (identity, table, apply) = tokio::task::spawn_blocking(move || {
        let (records, table) = identity_records(people);
        let cpu = thread_cpu();
        let mut loaded = IdentityTable::default();
        for (k, v) in &records {
            if let (Ok(k), Ok(p)) = (std::str::from_utf8(k), serde_json::from_slice(v)) {
                loaded.apply(k, &p);
            }
        }
        (records, table, thread_cpu().saturating_sub(cpu))
    })
    .await
    .map_err(super::RouterError::from)?;
    f.identity_apply_s = apply.as_secs_f64();
    f.identity_people = people;
    f.identity_records = identity.len();
    f.identity_bytes_per_person = table.heap_bytes() as f64 / people as f64;
    println!(
        "(e) identity memory: {:.0} bytes/person at {people} people (a user and a device each; their {} events wrote {} identity records)",
        f.identity_bytes_per_person,
        people * 10,
        identity.len()
    );
    println!(
        "(e) parsing and applying those records in process: {:.2} s of CPU",
        f.identity_apply_s
    );

    let Some(brokers) = opts.brokers.clone() else {
        println!(
            "(b), (c) and the restore time need --brokers (e.g. a tansu from scripts/kafka-dev.sh start)"
        );
        return Ok(f);
    };
    // tansu sometimes holds a produce acknowledgement for seconds; one such
    // stall in one measurement decides a single-shot ratio. So (b) and (c)
    // run in alternating rounds on fresh topics, and the medians count.
    let input: Vec<_> = events(opts.broker_events).collect();
    for round in 1..=opts.rounds {
        let c = fresh_topics(&brokers, &round.to_string()).await?;
        produce(&c, &brokers, &c.topics.canonical, &input).await?;
        let e2e = end_to_end(&c, &brokers, input.len()).await?;
        let copy = raw_copy(&c, &brokers, input.len()).await?;
        println!(
            "round {round}: (b) end to end {e2e:.0} events/s, (c) raw copy {copy:.0} events/s, (b)/(c) = {:.2}",
            e2e / copy
        );
        f.e2e_rounds.push(e2e);
        f.copy_rounds.push(copy);
    }
    let (e2e, copy) = (median(&f.e2e_rounds), median(&f.copy_rounds));
    f.e2e_events_per_s = Some(e2e);
    f.copy_events_per_s = Some(copy);
    f.e2e_to_copy_ratio = Some(e2e / copy);
    println!(
        "(b) end to end through {brokers}, median of {} rounds: {e2e:.0} events/s",
        opts.rounds
    );
    println!(
        "(c) raw consume→produce copy, same fan-out, median: {copy:.0} events/s; (b)/(c) = {:.2}",
        e2e / copy
    );

    // State topics nothing else has written to: the rounds' routers wrote
    // their own dedup and identity records.
    let cfg = fresh_topics(&brokers, "state").await?;
    let restore = restore_time(&cfg, &brokers, opts.dedup_keys).await?;
    f.dedup_restore_s = Some(restore);
    println!(
        "(d) restore of {} dedup keys from {brokers}: {restore:.1} s",
        opts.dedup_keys
    );

    let load = identity_load_time(&cfg, &brokers, &identity, &table).await?;
    f.identity_load_s = Some(load);
    println!(
        "(e) identity load of {} records ({people} people) from {brokers}: {load:.1} s",
        identity.len()
    );
    Ok(f)
}

/// A configuration whose topics, created now, are this run's alone.
async fn fresh_topics(brokers: &str, name: &str) -> Result<Arc<Config>, BenchError> {
    let prefix = format!(
        "bench-{}-{}-{name}",
        std::process::id(),
        chrono::Utc::now().timestamp()
    );
    let cfg = Arc::new(config(Some(brokers), &prefix));
    let cluster = Cluster::connect(&cfg)?;
    kafka::topics::ensure(&cluster, &cfg).await?;
    Ok(cfg)
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

const CHAIN_PASSES: usize = 5;

/// Events/s per core, and deliveries and identity records written per event.
fn step_chain(input: &[(String, Vec<u8>)]) -> (f64, f64, f64) {
    let cfg = Arc::new(config(None, "bench"));
    let identity = cfg.topics.identity();
    let deliver = cfg.topics.deliver("");
    let (mut identity_writes, mut deliveries) = (0, 0);
    let cpu = thread_cpu();
    let wall = Instant::now();
    chain(cfg, input.iter().map(|(id, p)| (id, p)), |o| {
        if *o.topic == *identity {
            identity_writes += 1;
        } else if o.topic.starts_with(&deliver) {
            deliveries += 1;
        }
    });
    let spent = match thread_cpu().saturating_sub(cpu) {
        d if d.is_zero() => wall.elapsed(),
        d => d,
    };
    let n = input.len() as f64;
    (
        n / spent.as_secs_f64(),
        deliveries as f64 / n,
        identity_writes as f64 / n,
    )
}

/// Runs `input` through a fresh pipeline in batches of 2000, as the router
/// does, handing each record it writes to `out`; returns the pipeline.
fn chain<K: AsRef<str>, V: AsRef<[u8]>>(
    cfg: Arc<Config>,
    input: impl IntoIterator<Item = (K, V)>,
    mut out: impl FnMut(Out<'_>),
) -> Pipeline {
    let dedup = cfg.topics.dedup();
    let mut pipeline = Pipeline::new(cfg);
    pipeline.set_layout(4, &dedup);
    for p in 0..4 {
        pipeline.install(p, PartitionDedup::default());
    }
    // Reused, as the router reuses it.
    let mut batch = Batch::default();
    let mut input = input.into_iter().enumerate().peekable();
    while input.peek().is_some() {
        batch.clear();
        for (offset, (id, payload)) in input.by_ref().take(2000) {
            let (id, payload) = (id.as_ref(), payload.as_ref());
            let rec = InRecord {
                // As a keyed murmur2 producer would: a duplicate meets its original.
                partition: partition_for(id.as_bytes(), 4),
                offset: offset as i64,
                key: Some(id.as_bytes()),
                payload: Some(payload),
                timestamp_ms: None,
            };
            pipeline.process(&rec, 1_700_000_000, &mut batch);
        }
        pipeline.seal(&mut batch);
        pipeline.commit(&batch);
        batch.records().for_each(&mut out);
    }
    pipeline
}

/// A record's key and value.
type Record = (Vec<u8>, Vec<u8>);

/// The identity records the events of `people` people make the
/// router write, superseded ones included, as an uncompacted topic holds
/// them; and the table they build.
fn identity_records(people: usize) -> (Vec<Record>, IdentityTable) {
    let cfg = Arc::new(config(None, "bench"));
    let topic = cfg.topics.identity();
    let mut records = Vec::new();
    let mut pipeline = chain(cfg.clone(), events(people * 10), |o| {
        if *o.topic == *topic
            && let (Some(k), Some(v)) = (o.key, o.payload)
        {
            records.push((k.to_vec(), v.to_vec()));
        }
    });
    (records, std::mem::take(pipeline.identity()))
}

async fn produce(
    cfg: &Config,
    brokers: &str,
    topic: &str,
    records: &[(String, Vec<u8>)],
) -> Result<(), BenchError> {
    let producer: FutureProducer = client::idempotent_producer(&cfg.kafka, brokers).create()?;
    let mut acks = Vec::with_capacity(records.len());
    for (k, v) in records {
        let r = FutureRecord::to(topic)
            .key(k.as_bytes())
            .payload(v.as_slice());
        acks.push(enqueue(&producer, r).await?);
    }
    client::acked(acks).await?;
    Ok(())
}

/// Router rate between 5% and 100% of the input committed, so group join
/// and restore do not count.
async fn end_to_end(cfg: &Arc<Config>, brokers: &str, n: usize) -> Result<f64, BenchError> {
    let shutdown = CancellationToken::new();
    let ctx = RoleContext {
        config: cfg.clone(),
        bootstrap: brokers.to_string(),
        instance_id: format!("bench-{}", std::process::id()),
        shutdown: shutdown.clone(),
    };
    let start = super::records_committed();
    let task = tokio::spawn(super::run(ctx));
    let limit = Duration::from_secs(600);
    let first = (n / 20) as u64;
    let t0 = wait_until(|| super::records_committed() - start >= first, limit).await;
    let t1 = wait_until(|| super::records_committed() - start >= n as u64, limit).await;
    shutdown.cancel();
    task.await.map_err(super::RouterError::from)??;
    let (Some(t0), Some(t1)) = (t0, t1) else {
        return Err(BenchError::Timeout("the router", limit));
    };
    Ok((n as u64 - first) as f64 / (t1 - t0).as_secs_f64())
}

async fn wait_until(done: impl Fn() -> bool, limit: Duration) -> Option<Instant> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some(Instant::now())
}

/// The same input copied to three topics with no processing, committing
/// offsets after the acks: what the broker allows a router to do at best.
async fn raw_copy(cfg: &Config, brokers: &str, n: usize) -> Result<f64, BenchError> {
    let topics: Vec<String> = ["meta", "ga4", "hook"]
        .iter()
        .map(|d| format!("{}.copy", cfg.topics.deliver(d)))
        .collect();
    let admin: AdminClient<DefaultClientContext> = client::base(&cfg.kafka, brokers).create()?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            NewTopic::new(
                t,
                cfg.topics.partitions,
                TopicReplication::Fixed(cfg.topics.replication_factor),
            )
        })
        .collect();
    for r in admin.create_topics(&new, &AdminOptions::new()).await? {
        r.map_err(|(_, code)| rdkafka::error::KafkaError::AdminOp(code))?;
    }
    let consumer: GroupConsumer<DefaultConsumerContext> = GroupConsumer::new(
        client::manual_commit_consumer(&cfg.kafka, brokers, &format!("{}-copy", cfg.topics.prefix))
            .create()?,
    );
    consumer.subscribe(&[&cfg.topics.canonical])?;
    let producer: FutureProducer = client::idempotent_producer(&cfg.kafka, brokers).create()?;
    let mut seen = 0usize;
    let mut t0 = None;
    let first = n / 20;
    let deadline = Instant::now() + Duration::from_secs(600);
    while seen < n {
        if Instant::now() > deadline {
            return Err(BenchError::Timeout(
                "the raw copy",
                Duration::from_secs(600),
            ));
        }
        let mut msgs = vec![consumer.recv().await?.detach()];
        let linger = tokio::time::Instant::now() + Duration::from_millis(20);
        while msgs.len() < 2000 {
            match tokio::time::timeout_at(linger, consumer.recv()).await {
                Ok(Ok(m)) => msgs.push(m.detach()),
                _ => break,
            }
        }
        let mut acks = Vec::with_capacity(msgs.len() * topics.len());
        for m in &msgs {
            for t in &topics {
                let r = FutureRecord::to(t)
                    .key(m.key().unwrap_or_default())
                    .payload(m.payload().unwrap_or_default());
                acks.push(enqueue(&producer, r).await?);
            }
        }
        client::acked(acks).await?;
        consumer.commit_consumer_state(CommitMode::Async)?;
        seen += msgs.len();
        if t0.is_none() && seen >= first {
            t0 = Some((Instant::now(), seen));
        }
    }
    let (t0, at) = t0.unwrap_or((Instant::now(), seen));
    Ok((seen - at) as f64 / t0.elapsed().as_secs_f64().max(1e-9))
}

async fn restore_time(cfg: &Arc<Config>, brokers: &str, keys: usize) -> Result<f64, BenchError> {
    let producer: FutureProducer = client::idempotent_producer(&cfg.kafka, brokers).create()?;
    let topic = cfg.topics.dedup();
    let now = u32::try_from(chrono::Utc::now().timestamp()).unwrap_or(u32::MAX);
    // Chunks as the router writes them, for batches of 1000 new keys.
    let mut acks = Vec::new();
    let keys_of = (0..keys).map(|i| (dedup::key_of(&format!("evt-{i:012}")), now));
    let entries: Vec<_> = keys_of.collect();
    for part in entries.chunks(1000) {
        let id = dedup::new_chunk_id();
        let v = dedup::encode_chunk(part);
        let r = FutureRecord::to(&topic)
            .partition(0)
            .key(&id[..])
            .payload(&v[..]);
        acks.push(enqueue(&producer, r).await?);
    }
    client::acked(acks).await?;
    let pipeline = Pipeline::new(cfg.clone());
    let t = Instant::now();
    let stop = CancellationToken::new();
    let state = restore_partition(cfg, brokers, &topic, 0, &pipeline, &stop).await?;
    let secs = t.elapsed().as_secs_f64();
    if state.len() < keys {
        println!("warning: restored {} of {keys} keys", state.len());
    }
    Ok(secs)
}

/// Produces `records` to the identity topic and times a cold load of it, as
/// a starting router loads it.
async fn identity_load_time(
    cfg: &Arc<Config>,
    brokers: &str,
    records: &[Record],
    written: &IdentityTable,
) -> Result<f64, BenchError> {
    let producer: FutureProducer = client::idempotent_producer(&cfg.kafka, brokers).create()?;
    let topic = cfg.topics.identity();
    let mut acks = Vec::with_capacity(records.len());
    for (k, v) in records {
        let r = FutureRecord::to(&topic).key(&k[..]).payload(&v[..]);
        acks.push(enqueue(&producer, r).await?);
    }
    client::acked(acks).await?;
    let mut pipeline = Pipeline::new(cfg.clone());
    let t = Instant::now();
    let tail = IdentityTail::start(&cfg.kafka, brokers, &topic)?;
    load_identity(
        tail,
        &mut pipeline,
        cfg.router.state_stall_timeout,
        &CancellationToken::new(),
    )
    .await?;
    let secs = t.elapsed().as_secs_f64();
    // The same records in the same per-key order make the same table.
    let (n, example) = written.differences(pipeline.identity());
    if n > 0 {
        println!(
            "warning: {n} of {} identity entries differ after the load, e.g. {}",
            written.len(),
            example.unwrap_or_default()
        );
    }
    Ok(secs)
}

/// The bench's own writes: a broker that takes nothing for a minute fails the run.
async fn enqueue<K, P>(
    producer: &FutureProducer,
    record: FutureRecord<'_, K, P>,
) -> Result<rdkafka::producer::DeliveryFuture, rdkafka::error::KafkaError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    client::enqueue(producer, record, deadline, &CancellationToken::new()).await
}
