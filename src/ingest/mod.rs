//! The HTTP ingest gateway: native canonical events, Segment (webhook and
//! HTTP Tracking API), Mixpanel and PostHog payloads in, canonical events on
//! the canonical topic (key = event_id) out.
//!
//! A 2xx means every published event of the request was acked by the broker.
//! A request is all or nothing as far as validation goes: if any event is
//! invalid nothing is published, so a client can fix and resend the whole
//! request (the event_ids make a resend harmless downstream).
//!
//! Environments: every key is bound to `production` or `staging`. Production
//! keys publish to `topics.canonical`; staging keys publish to
//! `ingest.staging_topic` and never to the canonical topic. A request may
//! state the environment it means with `X-Switchyard-Environment`; when that
//! differs from its key's environment it is refused (403), so a staging
//! credential cannot be used for production traffic or the other way round.

pub mod bench;
pub mod config;
mod handlers;
pub mod map;
mod metrics;
pub mod mixpanel;
pub mod posthog;
mod publish;
pub mod segment;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::StatusCode;
use axum::routing::{get, post};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower_http::timeout::TimeoutLayer;

use crate::config::Config;
use crate::run::RoleContext;
use config::{IngestConfig, IngestKey};
use publish::Publisher;

#[derive(Debug, Error)]
pub enum IngestError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("ingest producer: {0}")]
    Producer(rdkafka::error::KafkaError),
    #[error("ingest server: {0}")]
    Serve(std::io::Error),
}

/// Serves the gateway on `ingest.listen` until `ctx.shutdown`.
///
/// Without any `[[ingest.keys]]` every request would be refused, so the
/// gateway does not even bind its port: `--role all` with a config that has
/// no ingest section must not fail because something else holds the port.
pub async fn run(ctx: RoleContext) -> Result<(), IngestError> {
    if ctx.config.ingest.keys.is_empty() {
        tracing::info!("no [[ingest.keys]] configured; the HTTP ingest gateway is not started");
        ctx.shutdown.cancelled().await;
        return Ok(());
    }
    let addr = ctx.config.ingest.listen;
    let listener = bind(addr).map_err(|source| IngestError::Bind { addr, source })?;
    serve(&ctx.config, &ctx.bootstrap, listener, ctx.shutdown).await
}

/// Binds with a deep accept queue: a burst of SDK connections (thousands
/// of browsers flushing at once) waits in the kernel for the gateway to
/// answer it, 503 if over its limit, instead of being reset unanswered at
/// the default 1,024.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Serves on an already bound listener until `shutdown`, then lets
/// in-flight requests finish and flushes the producer.
pub async fn serve(
    config: &Config,
    bootstrap: &str,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    if let Err(why) = ensure_staging_topic(config, bootstrap).await {
        // Not fatal: the gateway still serves production keys, and staging
        // requests answer 503 until the topic exists.
        tracing::warn!(topic = ?config.ingest.staging_topic, error = %why, "cannot ensure the ingest staging topic");
    }
    let gateway = Arc::new(Gateway::new(config, bootstrap)?);
    gateway
        .publisher
        .spawn_probe(config.topics.canonical.clone(), shutdown.clone());
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, keys = gateway.keys.len(), "ingest gateway listening");
    }
    let app = router(Arc::clone(&gateway));
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(IngestError::Serve);
    gateway.publisher.flush();
    result
}

/// Creates `ingest.staging_topic` when it is missing, partitioned like the
/// canonical topic (`switchyard topics create` does not know about it).
async fn ensure_staging_topic(config: &Config, bootstrap: &str) -> Result<(), String> {
    let Some(topic) = &config.ingest.staging_topic else {
        return Ok(());
    };
    if config.kafka.brokers.is_none() {
        // The embedded mock cluster has no CreateTopics API; it creates
        // topics on first use.
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> =
        crate::kafka::client::base(&config.kafka, bootstrap)
            .create()
            .map_err(|e| e.to_string())?;
    let existing =
        crate::kafka::topics::existing_partitions(&admin, bootstrap).map_err(|e| e.to_string())?;
    if existing.contains_key(topic) {
        return Ok(());
    }
    let partitions = existing
        .get(&config.topics.canonical)
        .copied()
        .unwrap_or(config.topics.partitions);
    let new = NewTopic::new(
        topic,
        partitions,
        TopicReplication::Fixed(config.topics.replication_factor),
    );
    let opts = AdminOptions::new().operation_timeout(Some(crate::kafka::ADMIN_TIMEOUT));
    let results = admin
        .create_topics([&new], &opts)
        .await
        .map_err(|e| e.to_string())?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(code.to_string()),
        }
    }
    tracing::info!(topic = %topic, partitions, "created the ingest staging topic");
    Ok(())
}

/// A gateway running in the background, for tests and the benchmark.
pub struct Spawned {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), IngestError>>,
}

/// Starts the gateway on `listen` (port 0: an ephemeral port) and returns
/// once it accepts connections.
pub async fn spawn(
    config: Arc<Config>,
    bootstrap: String,
    listen: SocketAddr,
) -> Result<Spawned, IngestError> {
    let listener = bind(listen).map_err(|source| IngestError::Bind {
        addr: listen,
        source,
    })?;
    let addr = listener.local_addr().map_err(IngestError::Serve)?;
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let task = tokio::spawn(async move { serve(&config, &bootstrap, listener, token).await });
    Ok(Spawned {
        addr,
        shutdown,
        task,
    })
}

fn router(gateway: Arc<Gateway>) -> Router {
    use handlers::*;
    let settings = &gateway.settings;
    // Load is shed, not queued: a client told 503 retries later, while a
    // queue would hold every waiting connection and its body.
    let limits = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(overloaded))
        .layer(LoadShedLayer::new())
        .layer(GlobalConcurrencyLimitLayer::new(
            settings.max_concurrent_requests,
        ))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            settings.request_timeout,
        ));
    let ingest = Router::new()
        .route("/v1/events", post(canonical_events))
        .route("/segment/events", post(segment_webhook))
        .route("/v1/batch", post(segment_api_batch))
        .route("/v1/track", post(segment_api_track))
        .route("/v1/identify", post(segment_api_identify))
        .route("/v1/page", post(segment_api_page))
        .route("/mixpanel/track", post(mixpanel_track))
        .route("/mixpanel/track/", post(mixpanel_track))
        .route("/posthog/capture", post(posthog_capture))
        .route("/posthog/capture/", post(posthog_capture))
        .route("/posthog/batch", post(posthog_batch))
        .route("/posthog/batch/", post(posthog_batch))
        .layer(limits);
    // Health checks stay outside the limits, so that a busy gateway is not
    // taken for a dead one.
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(ingest)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(gateway)
}

/// One configured key with its rate limiter.
struct Key {
    config: IngestKey,
    limiter: Option<DefaultDirectRateLimiter>,
}

pub(crate) struct Gateway {
    settings: IngestConfig,
    canonical_topic: String,
    /// The router dead-letters larger records, so they are refused here.
    max_record_bytes: usize,
    keys: Vec<Key>,
    /// SHA-256 of each key → index: lookups by digest do not leak, through
    /// timing, how much of a guessed key was right.
    by_digest: HashMap<[u8; 32], usize>,
    publisher: Publisher,
}

impl Gateway {
    fn new(config: &Config, bootstrap: &str) -> Result<Gateway, IngestError> {
        let settings = config.ingest.clone();
        let quota = NonZeroU32::new(settings.rate_limit_per_second).map(|rate| {
            Quota::per_second(rate)
                .allow_burst(NonZeroU32::new(settings.rate_limit_burst).unwrap_or(rate))
        });
        let keys: Vec<Key> = settings
            .keys
            .iter()
            .map(|k| Key {
                config: k.clone(),
                limiter: quota.map(RateLimiter::direct),
            })
            .collect();
        let by_digest = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (digest(k.config.key.expose()), i))
            .collect();
        let publisher = Publisher::new(&config.kafka, bootstrap, settings.produce_timeout)
            .map_err(IngestError::Producer)?;
        Ok(Gateway {
            settings,
            canonical_topic: config.topics.canonical.clone(),
            max_record_bytes: config.router.max_record_bytes,
            keys,
            by_digest,
            publisher,
        })
    }

    fn key(&self, presented: &str) -> Option<&Key> {
        self.by_digest
            .get(&digest(presented))
            .map(|&i| &self.keys[i])
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}
