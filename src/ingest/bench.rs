//! `switchyard bench ingest`: accepted events per second per core for
//! `/v1/events` batches, and request latency, measured in-process.
//!
//! The gateway runs on a one-worker runtime and the load generator on
//! another; "per core" divides accepted events by the CPU time of the
//! gateway's threads (its worker plus librdkafka's threads, read from
//! /proc), so the generator's own cost is not charged to the gateway. Against
//! the embedded mock cluster the mock broker's threads are librdkafka threads
//! too and are charged to the gateway: the figure is conservative.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use super::config::{Environment, IngestKey, Trust};
use crate::config::{Config, Guarantee};
use crate::kafka::{self, Cluster, EmbeddedBroker};
use crate::settings::Secret;

const KEY: &str = "bench_0123456789abcdef";
const GATEWAY_THREADS: &str = "sy-ingest-gw";
const CLIENT_THREADS: &str = "sy-bench-load";

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// A real broker to measure against as well (for reference).
    pub brokers: Option<String>,
    pub duration: Duration,
    pub warmup: Duration,
    pub batch: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
}

#[derive(Debug, Error)]
pub enum BenchError {
    #[error(transparent)]
    Kafka(#[from] kafka::Error),
    #[error(transparent)]
    Ingest(#[from] super::IngestError),
    #[error("cannot start a runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the gateway refused benchmark requests: {0}")]
    Refused(String),
}

/// Figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub broker: String,
    pub batch: usize,
    pub concurrency: usize,
    pub seconds: f64,
    pub events: u64,
    pub requests: u64,
    pub events_per_s: f64,
    /// CPU seconds of the gateway's threads (worker + librdkafka).
    pub gateway_cpu_s: f64,
    pub events_per_s_per_core: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Runs the benchmark against the embedded mock cluster, then against
/// `opts.brokers` when given.
pub fn run(opts: &BenchOptions) -> Result<Vec<Figures>, BenchError> {
    let mut out = vec![run_one(opts, None)?];
    if let Some(b) = &opts.brokers {
        out.push(run_one(opts, Some(b.clone()))?);
    }
    Ok(out)
}

fn run_one(opts: &BenchOptions, brokers: Option<String>) -> Result<Figures, BenchError> {
    let gateway_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(GATEWAY_THREADS)
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(CLIENT_THREADS)
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?;

    let run_id = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
    );
    let mut config = Config::default();
    config.kafka.guarantee = Guarantee::AtLeastOnce;
    config.kafka.brokers = brokers.clone();
    config.topics.canonical = format!("bench-ingest-{run_id}");
    config.topics.prefix = format!("bench-ingest-{run_id}-sy");
    config.ingest.rate_limit_per_second = 0;
    config.ingest.body_limit_bytes = 16 * 1024 * 1024;
    config.ingest.keys = vec![IngestKey {
        key: Secret::new(KEY),
        source: "bench".into(),
        environment: Environment::Production,
        routes: Vec::new(),
        segment_shared_secret: None,
        trust: Trust::Server,
    }];
    let cluster = match &brokers {
        Some(b) => Cluster::External {
            bootstrap: b.clone(),
        },
        None => Cluster::Embedded(EmbeddedBroker::start()?),
    };
    let broker_name = if cluster.is_embedded() {
        "embedded".to_string()
    } else {
        cluster.bootstrap().to_string()
    };
    let config = Arc::new(config);
    let spawned = gateway_rt.block_on(async {
        kafka::topics::ensure(&cluster, &config).await?;
        let s = super::spawn(
            Arc::clone(&config),
            cluster.bootstrap().to_string(),
            SocketAddr::from(([127, 0, 0, 1], 0)),
        )
        .await?;
        Ok::<_, BenchError>(s)
    })?;
    let url = format!("http://{}/v1/events", spawned.addr);

    let (warm, _) = client_rt.block_on(load(&url, &run_id, "w", opts, opts.warmup))?;
    tracing::info!(events = warm, "warm-up done");
    let cpu_before = gateway_cpu();
    let started = Instant::now();
    let (events, mut latencies) =
        client_rt.block_on(load(&url, &run_id, "m", opts, opts.duration))?;
    let seconds = started.elapsed().as_secs_f64();
    let gateway_cpu_s = (gateway_cpu() - cpu_before).max(f64::EPSILON);

    spawned.shutdown.cancel();
    let _ = gateway_rt.block_on(spawned.task);
    drop(gateway_rt);
    drop(cluster);

    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Ok(Figures {
        broker: broker_name,
        batch: opts.batch,
        concurrency: opts.concurrency,
        seconds,
        events,
        requests: latencies.len() as u64,
        events_per_s: events as f64 / seconds,
        gateway_cpu_s,
        events_per_s_per_core: events as f64 / gateway_cpu_s,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0),
    })
}

/// Keeps `opts.concurrency` requests in flight for `duration`; returns the
/// accepted events and each request's latency.
async fn load(
    url: &str,
    run_id: &str,
    phase: &str,
    opts: &BenchOptions,
    duration: Duration,
) -> Result<(u64, Vec<Duration>), BenchError> {
    let http = reqwest::Client::new();
    let until = Instant::now() + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..opts.concurrency {
        let (http, url, batch) = (http.clone(), url.to_string(), opts.batch);
        let prefix = format!("bench-{run_id}-{phase}-{worker}");
        tasks.spawn(async move {
            let mut events = 0u64;
            let mut latencies = Vec::new();
            let mut n = 0u64;
            while Instant::now() < until {
                let body = batch_body(&prefix, n, batch);
                n += 1;
                let t = Instant::now();
                let resp = http
                    .post(&url)
                    .bearer_auth(KEY)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| BenchError::Refused(e.to_string()))?;
                let status = resp.status();
                let text = resp
                    .text()
                    .await
                    .map_err(|e| BenchError::Refused(e.to_string()))?;
                if !status.is_success() {
                    return Err(BenchError::Refused(format!("{status}: {text}")));
                }
                latencies.push(t.elapsed());
                events += batch as u64;
            }
            Ok((events, latencies))
        });
    }
    let mut events = 0;
    let mut latencies = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (e, l) = joined.map_err(|e| BenchError::Refused(e.to_string()))??;
        events += e;
        latencies.extend(l);
    }
    Ok((events, latencies))
}

/// A `{"batch":[...]}` of realistic purchase events with unique ids.
fn batch_body(prefix: &str, n: u64, batch: usize) -> String {
    let mut s = String::with_capacity(batch * 360 + 16);
    s.push_str("{\"batch\":[");
    for i in 0..batch {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            r#"{{"event":"purchase","event_id":"{prefix}-{n}-{i}","occurred_at":"2026-11-26T10:00:00.250Z","user_id":"user-{i}","email":"buyer{i}@example.com","value":49.99,"currency":"EUR","order_id":"order-{n}-{i}","context":{{"ip":"203.0.113.7","user_agent":"Mozilla/5.0 (X11; Linux x86_64)","page_url":"https://shop.example/checkout/thanks"}},"consent":{{"ads":"granted","analytics":"granted"}},"items":[{{"id":"sku-1","quantity":1,"price":49.99}}]}}"#
        ));
    }
    s.push_str("]}");
    s
}

/// CPU seconds used so far by the gateway's threads: its tokio worker(s)
/// and every librdkafka thread (`rdk:*`) of the process.
fn gateway_cpu() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut ns = 0u64;
    for t in tasks.flatten() {
        let path = t.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !(comm.starts_with(GATEWAY_THREADS) || comm.starts_with("rdk:")) {
            continue;
        }
        // schedstat: time on CPU (ns), wait time, timeslices.
        ns += std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
    }
    ns as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_event;

    #[test]
    fn benchmark_events_are_valid_canonical_events() {
        let body: serde_json::Value = serde_json::from_str(&batch_body("p", 1, 3)).unwrap();
        let items = body["batch"].as_array().unwrap();
        assert_eq!(items.len(), 3);
        for e in items {
            parse_event(&serde_json::to_vec(e).unwrap()).unwrap();
        }
    }
}
