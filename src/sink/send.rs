//! One batch's life: map, send, classify, retry the failed part in memory
//! while the waits are short, then make every outcome durable (ledger, dead
//! letter or retry topic) before the engine may commit its offsets.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::join_all;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Header;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::SinkError;
use super::auth::TokenSource;
use super::config::DeliverySettings;
use super::destination::{Destination, Limits, Outcome, Request, Response};
use super::handover::Ownership;
use super::metrics::{
    BATCH_EVENTS, DLQ_WRITES, EVENTS, PACE_SHARE, REQUEST_SECONDS, REQUESTS, status_class,
};
use super::pace::Pace;
use super::records::{
    CLASS_MAX_BYTES, Final, Item, LedgerEntry, LedgerIndex, Position, REASON_MAX_BYTES,
    RESPONSE_EXCERPT_BYTES, Rejection, header, ledger_key,
};
use super::retry::{Next, cut_string, excerpt, next_step, retry_after};
use crate::delivery::Delivery;
use crate::kafka::client::ProducerGuard;

/// How long a record may wait for its ack (librdkafka's `message.timeout.ms`
/// for the sink's producer unless configured): a write that fails is retried
/// with a fresh producer instead of holding the batch for librdkafka's 5 min.
pub const PRODUCE_TIMEOUT: Duration = Duration::from_secs(30);
/// What a cut dead letter keeps of an oversize record (as the router does)
/// and of its key.
pub const OVERSIZE_KEEP: usize = 64 * 1024;
const KEY_KEEP: usize = 1024;
/// The longest pause between attempts to make outcomes durable.
const MAX_PERSIST_BACKOFF: Duration = Duration::from_secs(10);
/// The most of a response body read: room for any vendor's per-event
/// answers to a full batch. A longer body (or one without end) is read up to
/// here and classified on what arrived, so a vendor cannot make a sink
/// buffer gigabytes.
pub const RESPONSE_MAX_BYTES: usize = 4 * 1024 * 1024;

/// Everything one destination's batches share.
pub struct Shared {
    pub destination: String,
    pub vendor: Arc<dyn Destination>,
    pub settings: DeliverySettings,
    /// The tighter of the config and the vendor's limits.
    pub limits: Limits,
    pub http: reqwest::Client,
    pub pace: Pace,
    /// Replaced after failed writes (tansu 0.6 panics on an epoch bump).
    pub producer: ProducerGuard,
    /// Owned partitions and their durable progress.
    pub ownership: Arc<Ownership>,
    pub dlq_topic: String,
    /// The largest delivery record the router writes: a dead letter of a
    /// larger one (written to the deliver topic by something else) is cut
    /// to `cut_to` bytes, or it could not be produced and would stall the
    /// destination.
    pub copy_limit: usize,
    pub cut_to: usize,
    pub outcomes_topic: String,
    pub retry_topic: String,
    /// Present when the vendor does not dedup: event ids already delivered.
    pub ledger: Option<Mutex<LedgerIndex>>,
    /// Present when the vendor authenticates with refreshed OAuth tokens.
    pub tokens: Option<TokenSource>,
}

/// What the engine learns when an item's outcome is durable (its offset is
/// already marked done in [`Ownership`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    pub source: Position,
    /// The assignment of the source partition the item was read in.
    pub epoch: u64,
    pub anchor: String,
    /// The deliver-topic offset, which orders one person's events.
    pub origin_offset: i64,
    pub kind: DoneKind,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DoneKind {
    /// Delivered or dead-lettered.
    Resolved,
    /// Moved to the retry topic (that partition of it), due then.
    Parked {
        due: DateTime<Utc>,
        retry_partition: i32,
    },
    /// Moved to the retry topic to stay behind an earlier parked event.
    Followed {
        due: DateTime<Utc>,
        retry_partition: i32,
    },
    /// Written back to the end of its retry partition, not due yet.
    Requeued,
}

/// Delivers `items`, retrying failures in memory; returns once every item
/// that reached an outcome has it durably written. Items still waiting to
/// retry when `cancel` fires, or whose partition is being handed to another
/// instance, are let go without an outcome: their offsets stay uncommitted,
/// so the partition's next owner sends them again.
pub async fn deliver(
    shared: Arc<Shared>,
    items: Vec<Item>,
    cancel: CancellationToken,
) -> Result<Vec<Done>, SinkError> {
    let mut handovers = shared.ownership.subscribe();
    let mut finals = Vec::with_capacity(items.len());
    let mut pending: Vec<(Item, Delivery)> = Vec::with_capacity(items.len());
    let now = Utc::now();
    for mut item in items {
        let Some(d) = item.delivery.take() else {
            finals.push((item, reject("decode", "not a delivery record".into())));
            continue;
        };
        let age = (now - d.event.occurred_at).to_std().ok();
        let too_old = shared
            .limits
            .max_event_age
            .filter(|max| age.is_some_and(|a| a > *max));
        if let Some(max) = too_old {
            let reason = format!(
                "event is {} old; {} accepts events up to {} old",
                humantime::format_duration(Duration::from_secs(age.unwrap_or_default().as_secs())),
                shared.destination,
                humantime::format_duration(max)
            );
            item.delivery = Some(d);
            finals.push((item, reject("expired", reason)));
        } else if let Some(refusal) = shared.vendor.refuse(&d) {
            item.delivery = Some(d);
            let reason = cut_string(refusal.reason, REASON_MAX_BYTES);
            finals.push((item, reject(refusal.class, reason)));
        } else if item.raw.len() > shared.limits.max_bytes {
            item.delivery = Some(d);
            finals.push((
                item,
                reject("oversize", "larger than one request may be".into()),
            ));
        } else {
            pending.push((item, d));
        }
    }
    // Each person's events side by side (a stable sort keeps their order),
    // so vendors whose requests carry one person at a time (GA4) fill them
    // instead of sending one request per interleaved event.
    pending.sort_by(|(_, a), (_, b)| a.key().cmp(b.key()));
    let name = shared.destination.as_str();
    BATCH_EVENTS
        .with_label_values(&[name])
        .observe(pending.len() as f64);

    'rounds: while !pending.is_empty() {
        let_go_of_handed_over(&shared, &mut pending);
        if pending.is_empty() {
            break;
        }
        let batch: Vec<Delivery> = pending.iter().map(|(_, d)| d.clone()).collect();
        let mut outcomes: Vec<Option<Answer>> = vec![None; batch.len()];
        // Events of requests not sent this round (a handover or shutdown
        // came while they waited for the pace): no attempt is counted.
        let mut unsent = vec![false; batch.len()];
        let requests = shared.vendor.map(&batch);
        let mut interrupted = false;
        for req in requests {
            let events = req.events.clone();
            if interrupted {
                unsent[events.clone()].fill(true);
                continue;
            }
            tokio::select! {
                _ = shared.pace.acquire(events.len()) => {}
                _ = cancel.cancelled() => interrupted = true,
                _ = handovers.changed() => interrupted = true,
            }
            if interrupted {
                unsent[events.clone()].fill(true);
                continue;
            }
            let at = Utc::now();
            for (item, _) in &mut pending[events.clone()] {
                item.attempts += 1;
                item.first_attempt.get_or_insert(at);
                item.last_attempt = Some(at);
            }
            let started = Instant::now();
            let result = send_request(&shared, req).await;
            let latency = started.elapsed();
            REQUEST_SECONDS
                .with_label_values(&[name])
                .observe(latency.as_secs_f64());
            let slice = &batch[events.clone()];
            let per_event: Vec<(Outcome, Option<u16>, String)> = match result {
                Ok(resp) => {
                    REQUESTS
                        .with_label_values(&[name, status_class(resp.status)])
                        .inc();
                    if shared.vendor.is_throttle(&resp) {
                        let after = resp
                            .header("retry-after")
                            .and_then(|v| retry_after(v, std::time::SystemTime::now()));
                        shared
                            .pace
                            .throttled(after, shared.settings.retry.max_backoff);
                    } else if (200..300).contains(&resp.status) {
                        shared.pace.succeeded();
                    }
                    PACE_SHARE
                        .with_label_values(&[name])
                        .set(shared.pace.share());
                    let body = excerpt(&resp.body, RESPONSE_EXCERPT_BYTES);
                    shared
                        .vendor
                        .classify(&resp, slice)
                        .into_iter()
                        .map(|o| (bounded(o), Some(resp.status), body.clone()))
                        .collect()
                }
                Err(reason) => {
                    REQUESTS.with_label_values(&[name, "network"]).inc();
                    let reason = cut_string(reason, REASON_MAX_BYTES);
                    slice
                        .iter()
                        .map(|_| {
                            (
                                Outcome::Retry {
                                    after: None,
                                    reason: reason.clone(),
                                },
                                None,
                                String::new(),
                            )
                        })
                        .collect()
                }
            };
            for (slot, (o, status, body)) in outcomes[events.clone()].iter_mut().zip(per_event) {
                *slot = Some(Answer {
                    outcome: o,
                    status,
                    body,
                    latency,
                });
            }
        }

        let now = Utc::now();
        let mut wait = Duration::ZERO;
        let mut again = Vec::new();
        for (((mut item, d), outcome), unsent) in pending.drain(..).zip(outcomes).zip(unsent) {
            if unsent {
                again.push((item, d));
                continue;
            }
            let Answer {
                outcome,
                status,
                body,
                latency,
            } = outcome.unwrap_or_else(|| Answer {
                outcome: Outcome::Retry {
                    after: None,
                    reason: "the destination built no request for this event".into(),
                },
                status: None,
                body: String::new(),
                latency: Duration::ZERO,
            });
            let fin = match outcome {
                Outcome::Delivered => Final::Delivered {
                    status: status.unwrap_or(0),
                    latency,
                },
                Outcome::Rejected { class, reason } => Final::Rejected(Rejection {
                    class,
                    reason,
                    status,
                    response: body,
                }),
                Outcome::Retry { after, reason } => {
                    let elapsed = item
                        .first_attempt
                        .and_then(|f| (now - f).to_std().ok())
                        .unwrap_or_default();
                    match next_step(
                        &shared.settings.retry,
                        item.attempts,
                        elapsed,
                        after,
                        fastrand::f64(),
                    ) {
                        Next::Wait(w) => {
                            wait = wait.max(w);
                            EVENTS.with_label_values(&[name, "retried"]).inc();
                            again.push((item, d));
                            continue;
                        }
                        Next::Park(w) => Final::Parked {
                            due: now + chrono::Duration::from_std(w).unwrap_or_default(),
                            reason,
                        },
                        Next::GiveUp => Final::Rejected(Rejection {
                            class: "retries_exhausted".into(),
                            reason: format!("gave up after {} attempts: {reason}", item.attempts),
                            status,
                            response: body,
                        }),
                    }
                }
            };
            item.delivery = Some(d);
            finals.push((item, fin));
        }
        pending = again;
        if pending.is_empty() || cancel.is_cancelled() {
            break;
        }
        tracing::debug!(
            destination = name,
            events = pending.len(),
            wait_ms = wait.as_millis() as u64,
            "retrying"
        );
        let wake = Instant::now() + wait;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => break,
                _ = cancel.cancelled() => break 'rounds,
                _ = handovers.changed() => {
                    let_go_of_handed_over(&shared, &mut pending);
                    if pending.is_empty() {
                        break 'rounds;
                    }
                }
            }
        }
    }
    for (item, _) in &pending {
        shared.ownership.abandoned(item);
    }
    persist(&shared, finals, &cancel).await
}

/// Drops the items whose partition is being handed over (or was): the next
/// owner sends them, so retrying them here would only add duplicates.
fn let_go_of_handed_over(shared: &Shared, pending: &mut Vec<(Item, Delivery)>) {
    pending.retain(|(item, _)| {
        let live = shared.ownership.is_live(item);
        if !live {
            shared.ownership.abandoned(item);
        }
        live
    });
}

/// A vendor's outcome with its texts cut to what records, logs and metric
/// labels keep.
fn bounded(outcome: Outcome) -> Outcome {
    match outcome {
        Outcome::Delivered => Outcome::Delivered,
        Outcome::Retry { after, reason } => Outcome::Retry {
            after,
            reason: cut_string(reason, REASON_MAX_BYTES),
        },
        Outcome::Rejected { class, reason } => Outcome::Rejected {
            class: cut_string(class, CLASS_MAX_BYTES),
            reason: cut_string(reason, REASON_MAX_BYTES),
        },
    }
}

/// One event's answer from its request.
#[derive(Clone)]
struct Answer {
    outcome: Outcome,
    status: Option<u16>,
    /// The response body, cut to the dead-letter excerpt size.
    body: String,
    latency: Duration,
}

fn reject(class: &str, reason: String) -> Final {
    Final::Rejected(Rejection {
        class: class.into(),
        reason,
        status: None,
        response: String::new(),
    })
}

/// Sends one request. With OAuth the current access token goes along, and
/// a 401 (the token died early, or was revoked and re-issued) drops it and
/// sends once more with a new one before the vendor's answer counts.
/// Errors are the reason every event of the request is retried.
async fn send_request(shared: &Shared, req: Request) -> Result<Response, String> {
    let Some(tokens) = &shared.tokens else {
        return send(&shared.http, &req.url, &req.headers, req.body)
            .await
            .map_err(network_reason);
    };
    let mut renewed = false;
    loop {
        let token = tokens
            .token(&shared.http)
            .await
            .map_err(|e| format!("oauth: {e}"))?;
        let mut headers = req.headers.clone();
        headers.push(("Authorization".into(), format!("Bearer {token}")));
        let resp = send(&shared.http, &req.url, &headers, req.body.clone())
            .await
            .map_err(network_reason)?;
        if resp.status == 401 && !renewed {
            tokens.invalidate(&token).await;
            renewed = true;
            continue;
        }
        return Ok(resp);
    }
}

/// The HTTP client a sink sends with. Redirects are not followed: a vendor
/// endpoint that redirects (or a hijacked one) would otherwise receive the
/// request again elsewhere with its secret headers (TikTok's `Access-Token`,
/// Google's `developer-token`), and the original URL's query secrets in
/// `Referer`. A 3xx is a refusal like a 4xx.
pub fn vendor_client(settings: &DeliverySettings) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(settings.request_timeout)
        .pool_max_idle_per_host(settings.max_in_flight)
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// A network failure in words, without the request URL: a URL can carry a
/// credential (GA4's api_secret, Meta's token in query mode), and reasons go
/// to logs, the ledger and dead letters.
fn network_reason(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut reason = format!("network: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    reason
}

async fn send(
    http: &reqwest::Client,
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> Result<Response, reqwest::Error> {
    let mut rb = http.post(url).body(body);
    for (k, v) in headers {
        rb = rb.header(k, v);
    }
    let resp = rb.send().await?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = read_body(resp, RESPONSE_MAX_BYTES).await?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// A response body, read until its end or `max` bytes, whichever is first.
pub(crate) async fn read_body(
    mut resp: reqwest::Response,
    max: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let expected = resp.content_length().unwrap_or(0).min(max as u64);
    let mut body = Vec::with_capacity(usize::try_from(expected).unwrap_or(max));
    while let Some(chunk) = resp.chunk().await? {
        let room = max - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() == max {
            break;
        }
    }
    Ok(body)
}

/// Writes every outcome (ledger, dead letter, retry record), waits for the
/// broker's acks and marks the items' offsets done. A failed write is
/// retried with a fresh producer until it succeeds; items whose partition is
/// handed over meanwhile, or all of them once `cancel` fires, are let go
/// without an outcome.
pub async fn persist(
    shared: &Shared,
    finals: Vec<(Item, Final)>,
    cancel: &CancellationToken,
) -> Result<Vec<Done>, SinkError> {
    let name = shared.destination.as_str();
    struct Out {
        /// Index into `finals`.
        owner: usize,
        topic: String,
        /// A requeued record goes back to its own partition, whatever the
        /// partitioner would say about its key.
        partition: Option<i32>,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        headers: Option<rdkafka::message::OwnedHeaders>,
        /// Where it was written, once acked.
        acked: Option<i32>,
    }
    let mut outs = Vec::new();
    for (owner, (item, fin)) in finals.iter().enumerate() {
        if let Some(entry) = LedgerEntry::new(item, name, fin) {
            outs.push(Out {
                owner,
                topic: shared.outcomes_topic.clone(),
                partition: None,
                key: Some(ledger_key(&entry.event_id, name).into_bytes()),
                payload: serde_json::to_vec(&entry).expect("ledger entries serialise"),
                headers: None,
                acked: None,
            });
        }
        let retry_record = |headers, partition| Out {
            owner,
            topic: shared.retry_topic.clone(),
            partition,
            key: item.key.clone(),
            payload: item.raw.clone(),
            headers: Some(headers),
            acked: None,
        };
        match fin {
            Final::Rejected(r) => {
                tracing::warn!(destination = name, event_id = item.event_id().unwrap_or(""), partition = item.source.partition, error_class = %r.class, reason = %r.reason, "dead-lettered");
                let mut headers = item.dlq_headers(name, r);
                let (mut key, mut payload) = (item.key.clone(), item.raw.clone());
                let size = payload.len() + key.as_ref().map_or(0, Vec::len);
                if size > shared.copy_limit {
                    payload.truncate(shared.cut_to);
                    if let Some(k) = &mut key {
                        k.truncate(KEY_KEEP);
                    }
                    headers = headers
                        .insert(Header {
                            key: header::ORIGIN_SIZE,
                            value: Some(&size.to_string()),
                        })
                        .insert(Header {
                            key: header::TRUNCATED,
                            value: Some("true"),
                        });
                }
                outs.push(Out {
                    owner,
                    topic: shared.dlq_topic.clone(),
                    partition: None,
                    key,
                    payload,
                    headers: Some(headers),
                    acked: None,
                });
            }
            Final::Parked { due, reason } => {
                let partition = shared.settings.ordering.then(|| retry_partition(item));
                outs.push(retry_record(
                    item.retry_headers(name, *due, reason, None),
                    partition,
                ));
            }
            Final::Requeued { due, reason, at } => {
                outs.push(retry_record(
                    item.retry_headers(name, *due, reason, Some(*at)),
                    Some(item.source.partition),
                ));
            }
            Final::Delivered { .. } => {}
        }
    }

    let mut dropped = vec![false; finals.len()];
    let mut backoff = Duration::from_millis(200);
    loop {
        let (generation, producer) = shared.producer.current();
        let todo: Vec<usize> = (0..outs.len())
            .filter(|&i| outs[i].acked.is_none() && !dropped[outs[i].owner])
            .collect();
        if todo.is_empty() {
            break;
        }
        let sends = todo.iter().map(|&i| {
            let o = &outs[i];
            let mut r = FutureRecord::<[u8], [u8]>::to(&o.topic).payload(&o.payload);
            if let Some(p) = o.partition {
                r = r.partition(p);
            }
            if let Some(k) = &o.key {
                r = r.key(k);
            }
            if let Some(h) = &o.headers {
                r = r.headers(h.clone());
            }
            producer.send(r, Timeout::After(PRODUCE_TIMEOUT))
        });
        let mut failure = None;
        for (&i, result) in todo.iter().zip(join_all(sends).await) {
            match result {
                Ok(d) => outs[i].acked = Some(d.partition),
                Err((e, _)) => failure = Some(e),
            }
        }
        drop(producer);
        let Some(e) = failure else {
            break;
        };
        if is_permanent(&e) {
            return Err(SinkError::Produce(e));
        }
        let unacked = outs.iter().filter(|o| o.acked.is_none()).count();
        tracing::warn!(destination = name, error = %e, records = unacked, retry_in_ms = backoff.as_millis() as u64, "writing outcomes failed; retrying with a fresh producer");
        shared.producer.replace(generation);
        for o in outs.iter().filter(|o| o.acked.is_none()) {
            let (item, _) = &finals[o.owner];
            if !dropped[o.owner] && (cancel.is_cancelled() || !shared.ownership.is_live(item)) {
                dropped[o.owner] = true;
                shared.ownership.abandoned(item);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = cancel.cancelled() => {}
        }
        backoff = (backoff * 2).min(MAX_PERSIST_BACKOFF);
    }

    let mut written: Vec<Option<i32>> = vec![None; finals.len()];
    for o in &outs {
        if o.topic == shared.retry_topic {
            written[o.owner] = o.acked;
        }
    }
    let mut done = Vec::with_capacity(finals.len());
    for (((item, fin), dropped), written) in finals.into_iter().zip(dropped).zip(written) {
        if dropped {
            continue;
        }
        let outcome = match &fin {
            Final::Delivered { .. } => "delivered",
            Final::Rejected(r) => {
                DLQ_WRITES.with_label_values(&[name, &r.class]).inc();
                "rejected"
            }
            Final::Parked { .. } => "parked",
            Final::Requeued { .. } => "requeued",
        };
        EVENTS.with_label_values(&[name, outcome]).inc();
        if let (Final::Delivered { .. }, Some(ledger), Some(id)) =
            (&fin, &shared.ledger, item.event_id())
        {
            ledger.lock().expect("ledger lock").insert(id, Utc::now());
        }
        let s = &item.source;
        shared
            .ownership
            .done(&s.topic, s.partition, s.offset, item.epoch);
        let retry_partition = written.unwrap_or(-1);
        done.push(Done {
            anchor: item.anchor().to_string(),
            origin_offset: item.origin.offset,
            epoch: item.epoch,
            source: item.source,
            kind: match fin {
                Final::Parked { due, .. } => DoneKind::Parked {
                    due,
                    retry_partition,
                },
                Final::Requeued { .. } => DoneKind::Requeued,
                _ => DoneKind::Resolved,
            },
        });
    }
    Ok(done)
}

/// With ordering, the retry partition an item is parked on: its deliver
/// partition's number (the topics have as many partitions, and the sink's
/// range assignor gives both to one instance), so the instance that tracks a
/// parked person is the one that reads their event back (decision 0003).
pub fn retry_partition(item: &Item) -> i32 {
    item.origin.partition
}

/// Produce errors that a retry (or a fresh producer) cannot fix.
fn is_permanent(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::MessageBatchTooLarge
                | C::InvalidRecord
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::InvalidArgument
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn vendor_calls_never_follow_a_redirect_with_their_secrets() {
        use axum::http::{HeaderMap, StatusCode, header};
        use std::sync::atomic::{AtomicUsize, Ordering};

        // Where a redirect would lead: counts whatever reaches it.
        let reached = Arc::new(AtomicUsize::new(0));
        let seen = reached.clone();
        let elsewhere = axum::Router::new().fallback(move |_: HeaderMap| {
            let seen = seen.clone();
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                StatusCode::OK
            }
        });
        let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let other_addr = other.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(other, elsewhere).await });
        let vendor = axum::Router::new().fallback(move || async move {
            (
                StatusCode::TEMPORARY_REDIRECT,
                [(header::LOCATION, format!("http://{other_addr}/collect"))],
            )
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, vendor).await });

        let settings: DeliverySettings = crate::sink::config::DeliverySettings::default();
        let resp = vendor_client(&settings)
            .unwrap()
            .post(format!("http://{addr}/events?api_secret=s3cr3t"))
            .header("Access-Token", "t0ken")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::TEMPORARY_REDIRECT);
        assert_eq!(
            reached.load(Ordering::SeqCst),
            0,
            "the redirect was followed"
        );
    }

    #[tokio::test]
    async fn network_reasons_never_carry_the_url() {
        // Port 9 (discard) is closed on loopback: the connection is refused.
        let e = reqwest::Client::new()
            .post("http://127.0.0.1:9/mp/collect?api_secret=s3cr3t-value")
            .send()
            .await
            .expect_err("nothing listens on port 9");
        let reason = network_reason(e);
        assert!(reason.starts_with("network: "), "{reason}");
        assert!(!reason.contains("s3cr3t"), "{reason}");
        assert!(!reason.contains("/mp/collect"), "{reason}");
    }
}
