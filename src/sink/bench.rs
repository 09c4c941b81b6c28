//! `switchyard bench sink`: (a) the sink's own cost per core, fed from memory
//! (decode → batch → map + sign → HTTP to a loopback receiver → classify →
//! ledger record encoding), because the broker caps anything read from it;
//! (b) the end-to-end rate from a deliver topic; (c) the latency from
//! produce to the vendor at a steady 2k events/s, with a plain consumer of
//! the same records as the baseline (the broker's share), and per event the
//! difference (what the sink adds).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use futures::StreamExt;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::SinkError;
use super::config::DeliverySettings;
use super::destination::{Destination, Outcome, Response};
use super::records::{Final, Item, LedgerEntry};
use super::send::Shared;
use crate::config::{Config, DestinationConfig};
use crate::delivery::Delivery;
use crate::destinations::Vendor;
use crate::destinations::webhook::{self, Webhook};
use crate::kafka::Position;
use crate::kafka::{Cluster, client, topics};
use crate::run::RoleContext;
use crate::settings::{ConsentDefault, Secret};

const BATCH: usize = 1000;
const STEADY_RATE: u64 = 2000;
const STEADY_SECONDS: u64 = 10;

#[derive(Debug, Serialize)]
pub struct Figures {
    pub bench: &'static str,
    pub a_events: usize,
    pub a_events_per_s: f64,
    pub a_events_per_core_s: f64,
    /// Mixpanel into its stand-in, in the same run, and its ratio to the
    /// webhook's figure (None without the stand-ins).
    pub a_mixpanel_events_per_core_s: Option<f64>,
    pub a_mixpanel_over_webhook: Option<f64>,
    /// What Mixpanel's stand-in itself managed per CPU-second, on its own
    /// thread (not counted in the sink's figures).
    pub a_mixpanel_stand_in_events_per_core_s: Option<f64>,
    pub b_events: Option<usize>,
    pub b_events_per_s: Option<f64>,
    pub c_rate: Option<u64>,
    pub c_p50_ms: Option<f64>,
    pub c_p99_ms: Option<f64>,
    /// The same records read by a plain consumer in the same run: what the
    /// broker and the client library cost before the sink does anything.
    pub c_consumer_p50_ms: Option<f64>,
    pub c_consumer_p99_ms: Option<f64>,
    /// Per event, the vendor's receipt less the plain consumer's read: what
    /// the sink itself adds.
    pub c_added_p50_ms: Option<f64>,
    pub c_added_p99_ms: Option<f64>,
    pub d_events: usize,
    pub d_latency_ms: u64,
    pub d_events_per_s_concurrency_1: f64,
    pub d_events_per_s_concurrency_16: f64,
    pub d_ratio: f64,
}

/// A loopback receiver that takes every batch and counts its events.
#[derive(Default)]
struct Receiver {
    events: AtomicU64,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
    measure: AtomicBool,
    /// Every measured event the receiver got.
    arrivals: Mutex<Vec<Arrival>>,
}

async fn take(State(r): State<Arc<Receiver>>, body: Bytes) -> &'static str {
    let now = Instant::now();
    let n = memchr::memmem::find_iter(&body, b"\"idempotency_key\"").count() as u64;
    r.events.fetch_add(n, Ordering::Relaxed);
    r.first.lock().expect("bench lock").get_or_insert(now);
    *r.last.lock().expect("bench lock") = Some(now);
    if r.measure.load(Ordering::Relaxed)
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
    {
        let at = unix_us();
        let mut l = r.arrivals.lock().expect("bench lock");
        for e in v["events"].as_array().into_iter().flatten() {
            if let Some(arrival) = arrival(&e["event"], at) {
                l.push(arrival);
            }
        }
    }
    "{}"
}

async fn start_receiver() -> std::io::Result<(SocketAddr, Arc<Receiver>)> {
    let r = Arc::new(Receiver::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/hook", post(take))
        .with_state(r.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((addr, r))
}

/// The bench's receivers (the loopback webhook receiver and the vendor
/// stand-ins) serve from a runtime of their own on one thread, so that (a)
/// can count the sink's CPU alone: a stand-in that validates every field
/// costs as much as the sink it measures, and the vendor's servers are not
/// the sink's cost.
struct ReceiverThread {
    handle: tokio::runtime::Handle,
    /// `/proc/PID/task/TID/stat` of the thread.
    stat: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReceiverThread {
    fn start() -> Result<Self, SinkError> {
        let (ready, started) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("bench-receivers".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.send(Err(e.to_string()));
                        return;
                    }
                };
                let stat = std::fs::read_link("/proc/thread-self")
                    .map(|p| format!("/proc/{}/stat", p.display()))
                    .map_err(|e| format!("/proc/thread-self: {e}"));
                let _ = ready.send(stat.map(|stat| (rt.handle().clone(), stat)));
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(|e| SinkError::Task(format!("bench receiver thread: {e}")))?;
        let (handle, stat) = started
            .recv()
            .map_err(|e| SinkError::Task(format!("bench receiver thread: {e}")))?
            .map_err(|e| SinkError::Task(format!("bench receiver thread: {e}")))?;
        Ok(Self {
            handle,
            stat,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Runs `f` on the receivers' thread; whatever it spawns stays there.
    async fn run<F>(&self, f: F) -> Result<F::Output, SinkError>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle
            .spawn(f)
            .await
            .map_err(|e| SinkError::Task(format!("bench receiver thread: {e}")))
    }

    fn cpu_seconds(&self) -> f64 {
        stat_cpu_seconds(&self.stat)
    }
}

impl Drop for ReceiverThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A measured event's id, when it was sent and when it arrived (µs since
/// the epoch).
type Arrival = (String, u64, u64);

fn arrival(event: &serde_json::Value, at: u64) -> Option<Arrival> {
    let sent = event["properties"]["bench_sent_us"].as_u64()?;
    Some((event["event_id"].as_str()?.to_string(), sent, at))
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// This process's CPU time (user + system), from /proc (Linux; 100 ticks/s).
fn cpu_seconds() -> f64 {
    stat_cpu_seconds("/proc/self/stat")
}

/// CPU time (user + system) from a `/proc/…/stat` file of a process or a
/// thread (the fields are the same).
fn stat_cpu_seconds(path: &str) -> f64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(0.0)
}

fn delivery(destination: &str, name: &str, i: u64, sent_us: Option<u64>) -> Vec<u8> {
    let mut props = serde_json::Map::new();
    props.insert("sku".into(), format!("sku-{}", i % 97).into());
    if let Some(s) = sent_us {
        props.insert("bench_sent_us".into(), s.into());
    }
    let d = serde_json::json!({
        "v": 1, "destination": destination, "name": name,
        "event": {
            "event": "purchase", "event_id": format!("bench-{i}"),
            "occurred_at": "2026-11-26T14:03:11Z", "user_id": format!("u-{}", i % 5000),
            "value": 19.99, "currency": "EUR", "properties": props
        },
        "origin": {"topic": "events.canonical", "partition": 0, "offset": i},
        "routed_at": "2026-11-26T14:03:12Z"
    });
    serde_json::to_vec(&d).expect("bench deliveries serialise")
}

const SECRET: &str = "bench-secret-0123456789";

/// (d): a batch of this many people, each their own GA4 request…
const D_EVENTS: usize = 200;
/// …answered after this long (a vendor across the internet is slower).
const D_LATENCY_MS: u64 = 20;
const D_PASSES: usize = 3;
const A_PASSES: usize = 3;

/// (d): events/s of one GA4 batch (one request per person) sent through
/// the sink's rounds with 1 and with 16 requests at a time, passes
/// interleaved; the medians of each.
async fn one_person_per_request() -> Result<(f64, f64), SinkError> {
    let app = Router::new().route(
        "/mp/collect",
        post(|| async {
            tokio::time::sleep(Duration::from_millis(D_LATENCY_MS)).await;
            axum::http::StatusCode::NO_CONTENT
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| SinkError::Task(format!("bench receiver: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| SinkError::Task(format!("bench receiver: {e}")))?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    let text = format!(
        "[destinations.ga4]\ntype = \"ga4\"\nmeasurement_id = \"G-BENCH1\"\n\
         api_secret = \"bench\"\nbase_url = \"http://{addr}\"\n"
    );
    let config = Config::parse(&text, std::path::Path::new("bench"), &|_| None)
        .map_err(|e| SinkError::Task(format!("bench config: {e}")))?;
    let vendor = config.destinations["ga4"].vendor.build();
    let at = chrono::Utc::now() - chrono::Duration::minutes(1);
    let deliveries: Vec<Delivery> = (0..D_EVENTS)
        .map(|i| {
            let d = serde_json::json!({
                "v": 1, "destination": "ga4", "name": "purchase",
                "event": {
                    "event": "purchase", "event_id": format!("bench-{i}"),
                    "occurred_at": at, "user_id": format!("u-{i}"),
                    "value": 19.99, "currency": "EUR",
                    "consent": {"analytics": "granted"}
                },
                "origin": {"topic": "bench", "partition": 0, "offset": i},
                "routed_at": at
            });
            serde_json::from_value(d).expect("bench deliveries are deliveries")
        })
        .collect();
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..D_PASSES {
        for (slot, concurrency) in [1, 16].into_iter().enumerate() {
            let settings = DeliverySettings {
                max_concurrent_requests: concurrency,
                ..DeliverySettings::default()
            };
            let shared = Shared::detached("ga4", vendor.clone(), settings)?;
            let items: Vec<Item> = deliveries
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let position = Position {
                        topic: "bench".into(),
                        partition: 0,
                        offset: i as i64,
                    };
                    let mut item = Item::unread(d.clone(), position);
                    shared.ownership.seen(&mut item);
                    item
                })
                .collect();
            let started = Instant::now();
            let finals = super::send::attempt(&shared, items, &CancellationToken::new()).await;
            let took = started.elapsed().as_secs_f64();
            let delivered = finals
                .iter()
                .filter(|(_, f)| matches!(f, Final::Delivered { .. }))
                .count();
            if delivered != D_EVENTS {
                return Err(SinkError::Task(format!(
                    "(d) delivered {delivered} of {D_EVENTS}"
                )));
            }
            rates[slot].push(D_EVENTS as f64 / took.max(1e-6));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [mut one, mut many] = rates;
    Ok((median(&mut one), median(&mut many)))
}

/// (a): the per-event work of a sink, fed from memory: `raw` (deliver
/// records, each event once) decoded in batches, mapped, sent to `vendor`'s
/// receiver, classified and turned into ledger records. Returns events/s
/// (wall), the CPU seconds the sink's work took and those the receiver
/// took on its own thread (not in the first).
async fn in_memory(
    vendor: Arc<dyn Destination>,
    raw: Arc<Vec<Vec<u8>>>,
    receivers: &ReceiverThread,
) -> Result<(f64, f64, f64), SinkError> {
    let http = reqwest::Client::builder().build()?;
    let cpu0 = cpu_seconds();
    let receiver0 = receivers.cpu_seconds();
    let t0 = Instant::now();
    let batches = raw.len().div_ceil(BATCH);
    let results: Vec<Result<(), SinkError>> = futures::stream::iter(0..batches)
        .map(|b| {
            let (hook, raw, http) = (vendor.clone(), raw.clone(), http.clone());
            async move {
                let batch: Vec<Delivery> = raw[b * BATCH..((b + 1) * BATCH).min(raw.len())]
                    .iter()
                    .filter_map(|r| serde_json::from_slice(r).ok())
                    .collect();
                for req in hook.map(&batch) {
                    let mut rb = http
                        .request(req.method.clone(), &req.url)
                        .body(req.body.clone());
                    for (k, v) in &req.headers {
                        rb = rb.header(k, v);
                    }
                    let resp = rb.send().await?;
                    let status = resp.status().as_u16();
                    let body = resp.bytes().await?.to_vec();
                    let resp = Response {
                        status,
                        headers: Vec::new(),
                        body,
                    };
                    let classified = hook.classify(&req, &resp, &batch);
                    // A figure for requests the receiver refused would
                    // measure nothing: any other outcome fails the pass.
                    if let Some(o) = classified
                        .rows
                        .iter()
                        .find(|o| !matches!(o, Outcome::Delivered))
                    {
                        return Err(SinkError::Task(format!(
                            "(a) the receiver did not take a request (HTTP {status}): {o:?}"
                        )));
                    }
                    for d in req.deliveries(&batch) {
                        let entry = LedgerEntry {
                            event_id: d.event.event_id.clone(),
                            destination: d.destination.clone(),
                            status: "delivered".into(),
                            attempts: 1,
                            http_status: Some(status),
                            latency_ms: Some(1),
                            error_class: None,
                            first_attempt_at: Some(chrono::Utc::now()),
                            last_attempt_at: Some(chrono::Utc::now()),
                            recorded_at: chrono::Utc::now(),
                            replay: None,
                        };
                        std::hint::black_box(serde_json::to_vec(&entry).expect("ledger entry"));
                    }
                }
                Ok(())
            }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    let wall = t0.elapsed().as_secs_f64();
    let receiver = receivers.cpu_seconds() - receiver0;
    let cpu = cpu_seconds() - cpu0 - receiver;
    Ok((raw.len() as f64 / wall, cpu, receiver))
}

/// (a) for the webhook and Mixpanel (into its validating stand-in), pass by
/// pass interleaved: events/s per CPU-second of the sink, medians of
/// [`A_PASSES`]. The webhook is the baseline Mixpanel's figure is read
/// against.
async fn in_memory_passes(
    url: &str,
    events: usize,
    receivers: &ReceiverThread,
) -> Result<APasses, SinkError> {
    let events = events.div_ceil(BATCH) * BATCH;
    let hook: Arc<dyn Destination> = Arc::new(Webhook::new(webhook::Settings {
        url: url.to_string(),
        secret: Secret::new(SECRET),
    }));
    let hook_raw: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..events as u64)
            .map(|i| delivery("bench", "purchase", i, None))
            .collect(),
    );
    let mixpanel = mixpanel_receiver(events, receivers).await?;
    let per_core = |cpu: f64| if cpu > 0.0 { events as f64 / cpu } else { 0.0 };
    let (mut hooks, mut mixpanels, mut walls) = (Vec::new(), Vec::new(), Vec::new());
    let mut stand_in = Vec::new();
    for _ in 0..A_PASSES {
        let (rate, cpu, _) = in_memory(hook.clone(), hook_raw.clone(), receivers).await?;
        walls.push(rate);
        hooks.push(per_core(cpu));
        if let Some((vendor, raw, _fake)) = &mixpanel {
            let (_, cpu, fake) = in_memory(vendor.clone(), raw.clone(), receivers).await?;
            mixpanels.push(per_core(cpu));
            stand_in.push(per_core(fake));
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    Ok(APasses {
        events,
        wall_events_per_s: median(walls).unwrap_or(0.0),
        webhook_per_core: median(hooks).unwrap_or(0.0),
        mixpanel_per_core: median(mixpanels),
        mixpanel_stand_in_per_core: median(stand_in),
    })
}

struct APasses {
    events: usize,
    wall_events_per_s: f64,
    webhook_per_core: f64,
    mixpanel_per_core: Option<f64>,
    /// Events/s per CPU-second of Mixpanel's stand-in itself.
    mixpanel_stand_in_per_core: Option<f64>,
}

/// Mixpanel's stand-in (its auth, limits and validation), the destination
/// pointed at it, and `events` purchases of distinct people and ids. `None`
/// when built without the stand-ins (`--no-default-features`).
#[cfg(feature = "demo")]
async fn mixpanel_receiver(
    events: usize,
    receivers: &ReceiverThread,
) -> Result<
    Option<(
        Arc<dyn Destination>,
        Arc<Vec<Vec<u8>>>,
        switchyard_fakes::Fake,
    )>,
    SinkError,
> {
    use crate::destinations::mixpanel::{Mixpanel, Settings};
    let fake = receivers
        .run(switchyard_fakes::serve(
            switchyard_fakes::mixpanel::Mixpanel::new(
                switchyard_fakes::mixpanel::Settings::default(),
            ),
        ))
        .await?
        .map_err(|e| SinkError::Task(format!("bench Mixpanel stand-in: {e}")))?;
    let defaults = switchyard_fakes::mixpanel::Settings::default();
    let settings: Settings = toml::Value::Table(toml::toml! {
        id_merge = "simplified"
        project_token = (defaults.project_token)
        project_id = (defaults.project_id)
        service_account_username = (defaults.service_account_username)
        service_account_secret = (defaults.service_account_secret)
        base_url = (fake.base_url())
    })
    .try_into()
    .map_err(|e| SinkError::Task(format!("bench Mixpanel settings: {e}")))?;
    let raw = (0..events as u64)
        .map(|i| delivery("mixpanel", "Order Completed", i, None))
        .collect();
    Ok(Some((
        Arc::new(Mixpanel::new(settings)),
        Arc::new(raw),
        fake,
    )))
}

#[cfg(not(feature = "demo"))]
async fn mixpanel_receiver(
    _events: usize,
    _receivers: &ReceiverThread,
) -> Result<Option<(Arc<dyn Destination>, Arc<Vec<Vec<u8>>>, ())>, SinkError> {
    Ok(None)
}

/// A config with one webhook destination on fresh topics; the destination
/// name is fresh too, since it names the consumer group and a stale static
/// member of an earlier run would hold up the group's rebalance.
fn bench_config(base: &Config, url: &str) -> (Config, String) {
    let mut config = base.clone();
    let stamp = unix_us();
    let name = format!("bench-{stamp}");
    config.topics.prefix = format!("switchyard-bench-{stamp}");
    config.topics.canonical = format!("switchyard-bench-{stamp}.canonical");
    let delivery = DeliverySettings {
        batch_max_events: BATCH,
        linger: Duration::from_millis(5),
        ..DeliverySettings::default()
    };
    config.destinations = BTreeMap::from([(
        name.clone(),
        DestinationConfig {
            name: name.clone(),
            enabled: true,
            consent: "analytics".into(),
            consent_default: ConsentDefault::Grant,
            events: Vec::new(),
            event_names: BTreeMap::new(),
            raw_contact: false,
            delivery,
            vendor: Vendor::Webhook(webhook::Settings {
                url: url.to_string(),
                secret: Secret::new(SECRET),
            }),
        },
    )]);
    (config, name)
}

async fn produce(
    producer: &FutureProducer,
    topic: &str,
    payloads: Vec<Vec<u8>>,
) -> Result<(), SinkError> {
    let sends = payloads.iter().enumerate().map(|(i, p)| {
        let key = format!("u-{}", i % 5000);
        async move {
            producer
                .send(
                    FutureRecord::to(topic).key(&key).payload(p),
                    Timeout::After(Duration::from_secs(30)),
                )
                .await
        }
    });
    for r in futures::future::join_all(sends).await {
        r.map_err(|(e, _)| SinkError::Produce(e))?;
    }
    Ok(())
}

async fn wait_for(r: &Receiver, events: u64, limit: Duration) -> bool {
    let t = Instant::now();
    while r.events.load(Ordering::Relaxed) < events {
        if t.elapsed() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Runs (a) and, when `base` names brokers, (b) and (c); prints one line per
/// figure and returns them.
pub async fn run(
    base: &Config,
    events: usize,
    out: &mut impl std::io::Write,
) -> Result<Figures, SinkError> {
    let receivers = ReceiverThread::start()?;
    let (addr, receiver) = receivers
        .run(start_receiver())
        .await?
        .map_err(|e| SinkError::Task(format!("bench receiver: {e}")))?;
    let url = format!("http://{addr}/hook");
    let a = in_memory_passes(&url, events, &receivers).await?;
    let a_events = a.events;
    let per_core = a.webhook_per_core;
    let _ = writeln!(
        out,
        "(a) in memory, CPU of the sink alone (receivers on a thread of their own, not counted), medians of {A_PASSES} interleaved passes of {a_events} events: webhook {per_core:.0} events/s/core ({:.0} events/s wall) (target ≥ 50000)",
        a.wall_events_per_s
    );
    let a_mixpanel_ratio = a
        .mixpanel_per_core
        .filter(|_| per_core > 0.0)
        .map(|m| m / per_core);
    match (a.mixpanel_per_core, a_mixpanel_ratio) {
        (Some(m), Some(ratio)) => {
            let _ = writeln!(
                out,
                "(a) Mixpanel into its validating stand-in: {m:.0} events/s/core, ×{ratio:.2} the webhook's (target ≥ 50000); the stand-in itself ran at {:.0} events/s/core",
                a.mixpanel_stand_in_per_core.unwrap_or(0.0)
            );
        }
        _ => {
            let _ = writeln!(
                out,
                "(a) Mixpanel skipped: built without the stand-ins (the demo feature)"
            );
        }
    }
    let (d1, d16) = one_person_per_request().await?;
    let d_ratio = if d1 > 0.0 { d16 / d1 } else { 0.0 };
    let _ = writeln!(
        out,
        "(d) GA4-shaped (one person per request, {D_LATENCY_MS} ms per answer): {D_EVENTS} events at {d1:.0} events/s with 1 request at a time, {d16:.0} events/s with 16 → ×{d_ratio:.1} (medians of {D_PASSES} interleaved passes)"
    );
    let mut figures = Figures {
        bench: "sink",
        a_events,
        a_events_per_s: a.wall_events_per_s.round(),
        a_events_per_core_s: per_core.round(),
        a_mixpanel_events_per_core_s: a.mixpanel_per_core.map(f64::round),
        a_mixpanel_over_webhook: a_mixpanel_ratio.map(|r| (r * 100.0).round() / 100.0),
        a_mixpanel_stand_in_events_per_core_s: a.mixpanel_stand_in_per_core.map(f64::round),
        b_events: None,
        b_events_per_s: None,
        c_rate: None,
        c_p50_ms: None,
        c_p99_ms: None,
        c_consumer_p50_ms: None,
        c_consumer_p99_ms: None,
        c_added_p50_ms: None,
        c_added_p99_ms: None,
        d_events: D_EVENTS,
        d_latency_ms: D_LATENCY_MS,
        d_events_per_s_concurrency_1: d1.round(),
        d_events_per_s_concurrency_16: d16.round(),
        d_ratio: (d_ratio * 100.0).round() / 100.0,
    };
    if base.kafka.brokers.is_none() {
        let _ = writeln!(
            out,
            "(b), (c) skipped: set kafka.brokers (the embedded broker is not for benchmarks)"
        );
        return Ok(figures);
    }

    receiver.events.store(0, Ordering::Relaxed);
    *receiver.first.lock().expect("bench lock") = None;
    *receiver.last.lock().expect("bench lock") = None;
    let (config, name) = bench_config(base, &url);
    let config = Arc::new(config);
    let cluster = Cluster::connect(&config)?;
    topics::ensure(&cluster, &config).await?;
    let producer: FutureProducer =
        client::idempotent_producer(&config.kafka, cluster.bootstrap()).create()?;
    let topic = config.topics.deliver(&name);
    let e2e = events.min(50_000);
    produce(
        &producer,
        &topic,
        (0..e2e as u64)
            .map(|i| delivery(&name, "purchase", i, None))
            .collect(),
    )
    .await?;
    let shutdown = CancellationToken::new();
    let ctx = RoleContext {
        config: config.clone(),
        bootstrap: cluster.bootstrap().to_string(),
        instance_id: format!("bench-{}", std::process::id()),
        shutdown: shutdown.clone(),
    };
    let sink_name = name.clone();
    let sink = tokio::spawn(async move { super::run(ctx, &sink_name, || {}).await });
    if !wait_for(&receiver, e2e as u64, Duration::from_secs(300)).await {
        return Err(SinkError::Task(
            "(b) did not deliver every event within 300 s".into(),
        ));
    }
    let first = receiver
        .first
        .lock()
        .expect("bench lock")
        .unwrap_or_else(Instant::now);
    let last = receiver
        .last
        .lock()
        .expect("bench lock")
        .unwrap_or_else(Instant::now);
    let b_rate = e2e as f64 / (last - first).as_secs_f64().max(1e-3);
    let _ = writeln!(
        out,
        "(b) end to end from {topic}: {e2e} events at {b_rate:.0} events/s (first to last request)"
    );
    figures.b_events = Some(e2e);
    figures.b_events_per_s = Some(b_rate.round());

    receiver.measure.store(true, Ordering::Relaxed);
    let steady = STEADY_RATE * STEADY_SECONDS;
    let plain = plain_consumer(&config, cluster.bootstrap(), &topic, steady)?;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let per_tick = STEADY_RATE / 100;
    // Each tick's records are produced without waiting for the previous
    // tick's acknowledgements, so a slow broker answer lowers no rate.
    let mut sends = tokio::task::JoinSet::new();
    for t in 0..STEADY_SECONDS * 100 {
        tick.tick().await;
        let now = unix_us();
        let batch = (0..per_tick)
            .map(|i| delivery(&name, "purchase", 1_000_000 + t * per_tick + i, Some(now)))
            .collect();
        let (producer, topic) = (producer.clone(), topic.clone());
        sends.spawn(async move { produce(&producer, &topic, batch).await });
    }
    while let Some(sent) = sends.join_next().await {
        sent.map_err(|e| SinkError::Task(e.to_string()))??;
    }
    let all = (e2e as u64) + steady;
    let complete = wait_for(&receiver, all, Duration::from_secs(60)).await;
    shutdown.cancel();
    sink.await.map_err(|e| SinkError::Task(e.to_string()))??;
    if !complete {
        return Err(SinkError::Task(
            "(c) did not deliver every event within 60 s".into(),
        ));
    }
    let plain = plain
        .join()
        .map_err(|_| SinkError::Task("(c) the plain consumer panicked".into()))??;
    let sink = std::mem::take(&mut *receiver.arrivals.lock().expect("bench lock"));
    let read_at: std::collections::HashMap<&str, u64> =
        plain.iter().map(|(id, _, at)| (id.as_str(), *at)).collect();
    // Per event: when the vendor got it less when a plain consumer got it.
    let added = sink
        .iter()
        .filter_map(|(id, _, at)| Some(at.saturating_sub(*read_at.get(id.as_str())?)))
        .collect();
    let (p50, p99) = percentiles(
        sink.iter()
            .map(|(_, sent, at)| at.saturating_sub(*sent))
            .collect(),
    );
    let (c50, c99) = percentiles(
        plain
            .iter()
            .map(|(_, sent, at)| at.saturating_sub(*sent))
            .collect(),
    );
    let (a50, a99) = percentiles(added);
    let _ = writeln!(
        out,
        "(c) at {STEADY_RATE} events/s for {STEADY_SECONDS} s, from produce: a plain consumer reads the records at p50 {c50:.1} ms, p99 {c99:.1} ms (the broker's share); the vendor gets them at p50 {p50:.1} ms, p99 {p99:.1} ms; the sink adds p50 {a50:.1} ms, p99 {a99:.1} ms per event (target p99 ≤ 100 ms)"
    );
    let round = |ms: f64| (ms * 10.0).round() / 10.0;
    figures.c_rate = Some(STEADY_RATE);
    figures.c_p50_ms = Some(round(p50));
    figures.c_p99_ms = Some(round(p99));
    figures.c_consumer_p50_ms = Some(round(c50));
    figures.c_consumer_p99_ms = Some(round(c99));
    figures.c_added_p50_ms = Some(round(a50));
    figures.c_added_p99_ms = Some(round(a99));
    Ok(figures)
}

/// p50 and p99 in milliseconds of latencies in microseconds.
fn percentiles(mut l: Vec<u64>) -> (f64, f64) {
    l.sort_unstable();
    let pct = |p: f64| {
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .map_or(0.0, |us| *us as f64 / 1000.0)
    };
    (pct(0.50), pct(0.99))
}

/// The baseline of (c): a consumer with the sink's fetch settings that reads
/// `topic` from its end and notes, for each record carrying a send time,
/// when it arrived. Started before the steady phase; ends once it has seen
/// `expected` such records (or after a minute of seeing none).
fn plain_consumer(
    config: &Config,
    bootstrap: &str,
    topic: &str,
    expected: u64,
) -> Result<std::thread::JoinHandle<Result<Vec<Arrival>, SinkError>>, SinkError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    use rdkafka::{Offset, TopicPartitionList};

    let mut c = client::reader(&config.kafka, bootstrap);
    c.set("fetch.wait.max.ms", "20");
    let consumer: BaseConsumer = c.create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::End)?;
        }
    }
    consumer.assign(&tpl)?;
    Ok(std::thread::spawn(move || {
        let mut seen = Vec::with_capacity(expected as usize);
        let mut idle = Instant::now();
        while (seen.len() as u64) < expected && idle.elapsed() < Duration::from_secs(60) {
            let Some(m) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = m?;
            let at = unix_us();
            let arrived = m
                .payload()
                .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
                .and_then(|v| arrival(&v["event"], at));
            if let Some(arrived) = arrived {
                seen.push(arrived);
                idle = Instant::now();
            }
        }
        Ok(seen)
    }))
}
