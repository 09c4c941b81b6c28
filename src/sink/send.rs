//! One batch's life: map, send, classify, retry the failed part in memory
//! while the waits are short, then make every outcome durable (ledger, dead
//! letter or retry topic) before the engine may commit its offsets.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
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
use super::destination::{Classified, Destination, Limits, Outcome, Request, Response};
use super::handover::Ownership;
use super::metrics::{
    BATCH_EVENTS, DLQ_WRITES, EVENTS, PACE_SHARE, REQUEST_SECONDS, REQUESTS, status_class,
};
use super::pace::Pace;
use super::records::{
    CLASS_MAX_BYTES, Final, Item, LedgerEntry, LedgerIndex, REASON_MAX_BYTES,
    RESPONSE_EXCERPT_BYTES, Rejection, ledger_key,
};
use super::retry::{Next, cut_string, excerpt, next_step, retry_after};
use super::round::{self, Planned};
use crate::delivery::Delivery;
use crate::delivery::dead_letter::header;
use crate::kafka::Position;
use crate::kafka::client::ProducerGuard;
use crate::redact::redacted;

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

impl Shared {
    /// A destination's sending state without a broker behind it, for sends
    /// whose outcomes are not written ([`attempt`] alone: the sink
    /// benchmark and tests). Its producer has no brokers and is never used.
    pub fn detached(
        destination: &str,
        vendor: Arc<dyn Destination>,
        settings: DeliverySettings,
    ) -> Result<Shared, SinkError> {
        // No brokers at all: it is never used, and one that pointed
        // somewhere would report its failures to connect as errors.
        let mut producer = rdkafka::ClientConfig::new();
        producer.set_log_level(rdkafka::config::RDKafkaLogLevel::Emerg);
        let limits = vendor.limits();
        Ok(Shared {
            destination: destination.to_string(),
            pace: Pace::new(&settings.rate_limit, limits.max_events),
            http: vendor_client(&settings)?,
            vendor,
            settings,
            limits,
            producer: ProducerGuard::new(producer, "detached")?,
            ownership: Arc::default(),
            dlq_topic: String::new(),
            copy_limit: usize::MAX,
            cut_to: OVERSIZE_KEEP,
            outcomes_topic: String::new(),
            retry_topic: String::new(),
            ledger: None,
            tokens: None,
        })
    }
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
    let finals = attempt(&shared, items, &cancel).await;
    persist(&shared, finals, &cancel).await
}

/// Sends `items` until each has an outcome or is let go (see [`deliver`]):
/// rounds of requests, retrying in memory while the waits are short.
pub async fn attempt(
    shared: &Shared,
    items: Vec<Item>,
    cancel: &CancellationToken,
) -> Vec<(Item, Final)> {
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

    let mut pending: Vec<Row> = pending.into_iter().map(Row::new).collect();
    'rounds: while !pending.is_empty() {
        let_go_of_handed_over(shared, &mut pending);
        if pending.is_empty() {
            break;
        }
        let round: Vec<Delivery> = pending.iter().map(|r| r.delivery.clone()).collect();
        let caps: Vec<Option<usize>> = pending.iter().map(|r| r.cap).collect();
        let planned = {
            let done: Vec<&[&'static str]> = pending.iter().map(|r| r.done.as_slice()).collect();
            round::plan(shared.vendor.as_ref(), &round, &caps, &done)
        };
        let lanes = round::lanes(&planned.calls, |r| round[r].key());
        // A handover or shutdown stops requests that still wait for the
        // pace; those already sent are answered.
        let interrupt = cancel.child_token();
        let sending = futures::stream::iter(lanes)
            .map(|lane| send_lane(shared, &planned, &round, lane, &interrupt))
            .buffer_unordered(shared.settings.max_concurrent_requests)
            .collect::<Vec<_>>();
        tokio::pin!(sending);
        let answered = tokio::select! {
            a = &mut sending => a,
            _ = handovers.changed() => {
                interrupt.cancel();
                sending.await
            }
        };

        let mut answers: Vec<Option<Answer>> = vec![None; pending.len()];
        let mut sent = vec![false; pending.len()];
        let mut unsent = vec![false; pending.len()];
        // Per row: each call's endpoint and whether it delivered the row.
        let mut calls_of: Vec<Vec<(&'static str, bool)>> = vec![Vec::new(); pending.len()];
        for (c, call_answer) in answered.into_iter().flatten() {
            let call = &planned.calls[c];
            let Some(CallAnswer {
                classified,
                status,
                body,
                latency,
                at,
            }) = call_answer
            else {
                for &r in &call.rows {
                    unsent[r] = true;
                }
                continue;
            };
            let mut outcomes = classified.rows.into_iter();
            for &r in &call.rows {
                let row = &mut pending[r];
                row.item.first_attempt.get_or_insert(at);
                row.item.last_attempt = Some(at);
                sent[r] = true;
                let outcome = outcomes.next().unwrap_or_else(|| Outcome::Retry {
                    after: None,
                    reason: "the vendor's answer was not classified for this event".into(),
                });
                let outcome = round::settle(bounded(outcome), call.rows.len(), status);
                calls_of[r].push((call.request.endpoint, outcome == Outcome::Delivered));
                if outcome == Outcome::Split {
                    let half = (call.rows.len() / 2).max(1);
                    row.cap = Some(row.cap.map_or(half, |c| c.min(half)));
                }
                let answer = Answer {
                    outcome,
                    status,
                    body: body.clone(),
                    latency,
                };
                answers[r] = Some(match answers[r].take() {
                    Some(before) => before.merge(answer),
                    None => answer,
                });
            }
        }

        let now = Utc::now();
        let mut wait = Duration::ZERO;
        let mut again = Vec::new();
        for ((((mut row, answer), sent), unsent), calls) in pending
            .drain(..)
            .zip(answers)
            .zip(sent)
            .zip(unsent)
            .zip(calls_of)
        {
            round::note_done(&mut row.done, &calls);
            let answer = match answer {
                // None of its requests went out: no attempt is counted.
                None if unsent => {
                    again.push(row);
                    continue;
                }
                None => Answer::retry("the destination built no request for this event"),
                // Part of it went out: the rest goes again.
                Some(a) if unsent => a.merge(Answer::resend()),
                Some(a) => a,
            };
            let Answer {
                outcome,
                status,
                body,
                latency,
            } = answer;
            let outcome = match outcome {
                Outcome::Split | Outcome::Resend if row.free_rounds < MAX_FREE_ROUNDS => {
                    row.free_rounds += 1;
                    again.push(row);
                    continue;
                }
                Outcome::Split | Outcome::Resend => Outcome::Retry {
                    after: None,
                    reason: format!(
                        "sent again {MAX_FREE_ROUNDS} times without an answer about this event"
                    ),
                },
                o => o,
            };
            if sent || matches!(outcome, Outcome::Retry { .. }) {
                row.item.attempts += 1;
            }
            let Row {
                mut item,
                delivery,
                cap,
                free_rounds,
                done,
            } = row;
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
                            again.push(Row {
                                item,
                                delivery,
                                cap,
                                free_rounds,
                                done,
                            });
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
                Outcome::Split | Outcome::Resend => unreachable!("turned into a retry above"),
            };
            item.delivery = Some(delivery);
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
                    let_go_of_handed_over(shared, &mut pending);
                    if pending.is_empty() {
                        break 'rounds;
                    }
                }
            }
        }
    }
    for row in &pending {
        shared.ownership.abandoned(&row.item);
    }
    finals
}

/// Drops the items whose partition is being handed over (or was): the next
/// owner sends them, so retrying them here would only add duplicates.
fn let_go_of_handed_over(shared: &Shared, pending: &mut Vec<Row>) {
    pending.retain(|row| {
        let live = shared.ownership.is_live(&row.item);
        if !live {
            shared.ownership.abandoned(&row.item);
        }
        live
    });
}

/// How often an event may be sent again at once, without costing an
/// attempt (a split, or a vendor that did not look at it), before a vendor
/// that keeps answering so is treated as failing.
const MAX_FREE_ROUNDS: u32 = 8;

/// An event still to be sent.
struct Row {
    item: Item,
    delivery: Delivery,
    /// The most rows a request carrying it may hold, after the vendor
    /// refused a larger one as too large.
    cap: Option<usize>,
    /// Rounds it was sent again without being charged an attempt.
    free_rounds: u32,
    /// Endpoints every call of which delivered this row in an earlier
    /// round: a later round leaves them out, so a second call that failed
    /// does not send the first again (an `$append` is not idempotent).
    done: Vec<&'static str>,
}

impl Row {
    fn new((item, delivery): (Item, Delivery)) -> Row {
        Row {
            item,
            delivery,
            cap: None,
            free_rounds: 0,
            done: Vec::new(),
        }
    }
}

/// What one request of a lane got: `None` when it was not sent (the round
/// was interrupted while it waited for the pace).
struct CallAnswer {
    classified: Classified,
    status: Option<u16>,
    /// The response body, cut to the dead-letter excerpt size.
    body: String,
    latency: Duration,
    at: DateTime<Utc>,
}

/// Sends a lane's requests one after another (they carry a common person)
/// and classifies each answer as it comes, so a throttle slows the other
/// lanes at once.
async fn send_lane(
    shared: &Shared,
    planned: &Planned,
    round: &[Delivery],
    lane: Vec<usize>,
    interrupt: &CancellationToken,
) -> Vec<(usize, Option<CallAnswer>)> {
    let name = shared.destination.as_str();
    let mut out = Vec::with_capacity(lane.len());
    for c in lane {
        let call = &planned.calls[c];
        if interrupt.is_cancelled() {
            out.push((c, None));
            continue;
        }
        tokio::select! {
            _ = shared.pace.acquire(call.rows.len()) => {}
            _ = interrupt.cancelled() => {
                out.push((c, None));
                continue;
            }
        }
        let at = Utc::now();
        let started = Instant::now();
        let result = send_request(shared, &call.request).await;
        let latency = started.elapsed();
        REQUEST_SECONDS
            .with_label_values(&[name])
            .observe(latency.as_secs_f64());
        let answer = match result {
            Ok(resp) => {
                REQUESTS
                    .with_label_values(&[name, status_class(resp.status)])
                    .inc();
                let mut classified =
                    shared
                        .vendor
                        .classify(&call.request, &resp, planned.batch(call, round));
                // Vendors quote what they refuse; reasons and the excerpt go
                // to logs and dead-letter headers.
                for o in &mut classified.rows {
                    if let Outcome::Rejected { reason, .. } | Outcome::Retry { reason, .. } = o {
                        *reason = redacted(std::mem::take(reason));
                    }
                }
                if classified.throttle {
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
                CallAnswer {
                    classified,
                    status: Some(resp.status),
                    body: redacted(excerpt(&resp.body, RESPONSE_EXCERPT_BYTES)),
                    latency,
                    at,
                }
            }
            Err(reason) => {
                REQUESTS.with_label_values(&[name, "network"]).inc();
                // A client error quotes the URL, and GA4's holds its secret.
                let reason = redacted(cut_string(reason, REASON_MAX_BYTES));
                CallAnswer {
                    classified: Classified {
                        rows: vec![
                            Outcome::Retry {
                                after: None,
                                reason,
                            };
                            call.rows.len()
                        ],
                        throttle: false,
                    },
                    status: None,
                    body: String::new(),
                    latency,
                    at,
                }
            }
        };
        out.push((c, Some(answer)));
    }
    out
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
        o @ (Outcome::Split | Outcome::Resend) => o,
    }
}

/// One event's answer from its requests.
#[derive(Clone)]
struct Answer {
    outcome: Outcome,
    status: Option<u16>,
    /// The response body, cut to the dead-letter excerpt size.
    body: String,
    latency: Duration,
}

impl Answer {
    fn retry(reason: &str) -> Answer {
        Answer {
            outcome: Outcome::Retry {
                after: None,
                reason: reason.into(),
            },
            status: None,
            body: String::new(),
            latency: Duration::ZERO,
        }
    }

    fn resend() -> Answer {
        Answer {
            outcome: Outcome::Resend,
            ..Answer::retry("")
        }
    }

    /// The answer of an event that travelled in two requests: the worse
    /// outcome, with the status and body of the request that gave it.
    fn merge(self, other: Answer) -> Answer {
        let outcome = self.outcome.clone().merge(other.outcome.clone());
        let from = if outcome == self.outcome || other.outcome == Outcome::Resend {
            self
        } else {
            other
        };
        Answer {
            outcome,
            latency: from.latency,
            status: from.status,
            body: from.body,
        }
    }
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
async fn send_request(shared: &Shared, req: &Request) -> Result<Response, String> {
    let Some(tokens) = &shared.tokens else {
        return send(&shared.http, req, &req.headers)
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
        let resp = send(&shared.http, req, &headers)
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
        .pool_max_idle_per_host(settings.max_in_flight * settings.max_concurrent_requests)
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
    req: &Request,
    headers: &[(String, String)],
) -> Result<Response, reqwest::Error> {
    let mut rb = http
        .request(req.method.clone(), &req.url)
        .body(req.body.clone());
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

    /// The request model end to end, without Kafka: a vendor stand-in on
    /// loopback and the rounds a batch goes through.
    mod rounds {
        use super::*;
        use std::sync::atomic::{AtomicUsize, Ordering};

        use crate::destinations::test_support;
        use crate::sink::destination::Refusal;

        /// What the stand-in got: (path, the ids in the body).
        type Seen = Arc<Mutex<Vec<(String, Vec<String>)>>>;
        /// How the stand-in answers a request to `path` carrying `ids`
        /// (`n` = requests before it): status and body.
        type Script = Arc<dyn Fn(&str, &[String], usize) -> (u16, String) + Send + Sync>;

        struct Vendor {
            base: String,
            /// Each person's rows also go to /profiles, before their events.
            profiles: bool,
            /// Most rows per /events request.
            per_request: usize,
        }

        #[derive(serde::Serialize, serde::Deserialize)]
        struct Body {
            ids: Vec<String>,
        }

        /// The stand-in's verdict on a 2xx: rows (indices into the body)
        /// it refused, and rows it did not look at.
        #[derive(serde::Deserialize, Default)]
        #[serde(default)]
        struct Verdict {
            refused: Vec<usize>,
            unseen: Vec<usize>,
        }

        impl Vendor {
            fn request(
                &self,
                endpoint: &'static str,
                batch: &[Delivery],
                rows: Vec<usize>,
            ) -> Request {
                let ids = rows
                    .iter()
                    .map(|&r| batch[r].event.event_id.clone())
                    .collect();
                let body = serde_json::to_vec(&Body { ids }).unwrap();
                Request::post(
                    endpoint,
                    format!("{}/{endpoint}", self.base),
                    vec![],
                    body,
                    rows,
                )
            }
        }

        impl Destination for Vendor {
            fn limits(&self) -> Limits {
                Limits {
                    max_events: 1000,
                    max_bytes: 1 << 20,
                    max_event_age: None,
                }
            }
            fn refuse(&self, _: &Delivery) -> Option<Refusal> {
                None
            }
            fn vendor_dedup(&self) -> bool {
                true
            }
            fn map(&self, batch: &[Delivery]) -> Vec<Request> {
                let mut out = Vec::new();
                if self.profiles {
                    let mut people: Vec<&str> = Vec::new();
                    for d in batch {
                        if !people.contains(&d.key()) {
                            people.push(d.key());
                        }
                    }
                    for p in people {
                        let rows = (0..batch.len()).filter(|&r| batch[r].key() == p).collect();
                        out.push(self.request("profiles", batch, rows));
                    }
                }
                let all: Vec<usize> = (0..batch.len()).collect();
                for chunk in all.chunks(self.per_request) {
                    out.push(self.request("events", batch, chunk.to_vec()));
                }
                out
            }
            fn classify(
                &self,
                request: &Request,
                response: &Response,
                _: &[Delivery],
            ) -> Classified {
                if let Some(o) =
                    crate::sink::retry::by_status(response, std::time::SystemTime::now())
                {
                    return Classified::all(request, response, o);
                }
                let v: Verdict = serde_json::from_slice(&response.body).unwrap_or_default();
                let rows = (0..request.rows.len())
                    .map(|i| {
                        if v.refused.contains(&i) {
                            Outcome::Rejected {
                                class: format!("{}_invalid", request.endpoint),
                                reason: format!("{} refused it", request.endpoint),
                            }
                        } else if v.unseen.contains(&i) {
                            Outcome::Resend
                        } else {
                            Outcome::Delivered
                        }
                    })
                    .collect();
                Classified::rows(response, rows)
            }
        }

        /// A stand-in that answers by `script`, recording what it got;
        /// every answer is delayed a little, differently per request, so
        /// that concurrent requests finish out of order.
        async fn stand_in(script: Script) -> (String, Seen) {
            let seen: Seen = Arc::default();
            let count = Arc::new(AtomicUsize::new(0));
            let log = seen.clone();
            let app = axum::Router::new().route(
                "/{endpoint}",
                axum::routing::post(
                    move |axum::extract::Path(endpoint): axum::extract::Path<String>,
                          body: axum::body::Bytes| {
                        let (log, count, script) = (log.clone(), count.clone(), script.clone());
                        async move {
                            let ids = serde_json::from_slice::<Body>(&body).unwrap().ids;
                            let n = count.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis((n as u64 * 7) % 23)).await;
                            let (status, answer) = script(&endpoint, &ids, n);
                            log.lock().unwrap().push((endpoint, ids));
                            (axum::http::StatusCode::from_u16(status).unwrap(), answer)
                        }
                    },
                ),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move { axum::serve(listener, app).await });
            (format!("http://{addr}"), seen)
        }

        /// A stand-in answering by `script`, and the sending state of a
        /// destination whose vendor maps as told into requests to it.
        async fn vendor(
            profiles: bool,
            per_request: usize,
            settings: DeliverySettings,
            script: Script,
        ) -> (Shared, Seen) {
            let (base, seen) = stand_in(script).await;
            let vendor = Vendor {
                base,
                profiles,
                per_request,
            };
            let shared = Shared::detached("d", Arc::new(vendor), settings).unwrap();
            (shared, seen)
        }

        /// Items for `(person, event id)` pairs, tracked as read.
        fn items(shared: &Shared, events: &[(&str, &str)]) -> Vec<Item> {
            events
                .iter()
                .enumerate()
                .map(|(i, (person, id))| {
                    let event = serde_json::json!({
                        "event": "purchase", "event_id": id, "occurred_at": "2026-11-26T14:03:11Z",
                        "user_id": person, "value": 10.0, "currency": "EUR"
                    });
                    let d = test_support::delivery("d", "purchase", event, serde_json::json!({}));
                    let at = Position {
                        topic: "deliver".into(),
                        partition: 0,
                        offset: i as i64,
                    };
                    let mut item = Item::unread(d, at);
                    shared.ownership.seen(&mut item);
                    item
                })
                .collect()
        }

        fn fast() -> DeliverySettings {
            let mut s = DeliverySettings::default();
            s.retry.initial_backoff = Duration::from_millis(10);
            s.retry.max_backoff = Duration::from_millis(50);
            s
        }

        /// Each event's outcome word and attempts, by event id.
        async fn run(shared: &Shared, events: &[(&str, &str)]) -> Vec<(String, String, u32)> {
            let mut out: Vec<(String, String, u32)> =
                attempt(shared, items(shared, events), &CancellationToken::new())
                    .await
                    .into_iter()
                    .map(|(item, fin)| {
                        let word = match fin {
                            Final::Delivered { .. } => "delivered".to_string(),
                            Final::Rejected(r) => format!("rejected {}: {}", r.class, r.reason),
                            other => format!("{other:?}"),
                        };
                        (item.event_id().unwrap().to_string(), word, item.attempts)
                    })
                    .collect();
            out.sort();
            out
        }

        fn ids(seen: &Seen, endpoint: &str) -> Vec<String> {
            let mut all: Vec<String> = seen
                .lock()
                .unwrap()
                .iter()
                .filter(|(e, _)| e == endpoint)
                .flat_map(|(_, ids)| ids.clone())
                .collect();
            all.sort();
            all
        }

        #[tokio::test]
        async fn an_event_whose_second_call_fails_is_retried_and_charged_one_attempt_per_round() {
            // /events fails once with 503, then takes everything; profiles
            // are always taken.
            let script: Script = Arc::new(|endpoint: &str, _: &[String], _| {
                static EVENTS: AtomicUsize = AtomicUsize::new(0);
                if endpoint == "events" && EVENTS.fetch_add(1, Ordering::SeqCst) == 0 {
                    (503, "busy".into())
                } else {
                    (200, "{}".into())
                }
            });
            let (shared, seen) = vendor(true, 10, fast(), script).await;
            let out = run(&shared, &[("u1", "e1"), ("u2", "e2")]).await;
            assert_eq!(
                out,
                vec![
                    ("e1".into(), "delivered".into(), 2),
                    ("e2".into(), "delivered".into(), 2)
                ]
            );
            // Round two sent only the call that failed: the profile update
            // that went through is not sent again (it may not be
            // idempotent, like Mixpanel's `$append`).
            assert_eq!(ids(&seen, "profiles"), ["e1", "e2"]);
            assert_eq!(ids(&seen, "events"), ["e1", "e1", "e2", "e2"]);
        }

        #[tokio::test]
        async fn an_event_refused_by_one_of_its_calls_is_dead_lettered_with_that_reason() {
            // The profile call refuses u2's profile; events are all taken.
            let (shared, _) = vendor(
                true,
                10,
                fast(),
                Arc::new(|endpoint: &str, ids: &[String], _| {
                    if endpoint == "profiles" && ids.contains(&"e2".to_string()) {
                        (200, r#"{"refused":[0]}"#.into())
                    } else {
                        (200, "{}".into())
                    }
                }),
            )
            .await;
            let out = run(&shared, &[("u1", "e1"), ("u2", "e2")]).await;
            assert_eq!(out[0], ("e1".into(), "delivered".into(), 1));
            assert_eq!(
                out[1],
                (
                    "e2".into(),
                    "rejected profiles_invalid: profiles refused it".into(),
                    1
                )
            );
        }

        #[tokio::test]
        async fn a_partial_failure_refuses_its_rows_and_resends_the_unseen_without_an_attempt() {
            // The first /events answer refuses row 1 and did not look at the
            // rows after it; later answers take everything.
            let (shared, seen) = vendor(
                false,
                10,
                fast(),
                Arc::new(|_: &str, _: &[String], n| {
                    if n == 0 {
                        (200, r#"{"refused":[1],"unseen":[2,3]}"#.into())
                    } else {
                        (200, "{}".into())
                    }
                }),
            )
            .await;
            let out = run(
                &shared,
                &[("a", "e0"), ("b", "e1"), ("c", "e2"), ("d", "e3")],
            )
            .await;
            assert_eq!(
                out,
                vec![
                    ("e0".into(), "delivered".into(), 1),
                    (
                        "e1".into(),
                        "rejected events_invalid: events refused it".into(),
                        1
                    ),
                    ("e2".into(), "delivered".into(), 1),
                    ("e3".into(), "delivered".into(), 1),
                ]
            );
            assert_eq!(ids(&seen, "events"), ["e0", "e1", "e2", "e2", "e3", "e3"]);
        }

        #[tokio::test]
        async fn a_413_splits_until_requests_fit_and_delivers_every_row_once() {
            // More than three rows in a request is too large.
            let (shared, seen) = vendor(
                false,
                100,
                fast(),
                Arc::new(|_: &str, ids: &[String], _| {
                    if ids.len() > 3 {
                        (413, "too large".into())
                    } else {
                        (200, "{}".into())
                    }
                }),
            )
            .await;
            let events: Vec<(String, String)> = (0..10)
                .map(|i| (format!("p{i}"), format!("e{i}")))
                .collect();
            let events: Vec<(&str, &str)> = events
                .iter()
                .map(|(p, e)| (p.as_str(), e.as_str()))
                .collect();
            let out = run(&shared, &events).await;
            assert!(
                out.iter()
                    .all(|(_, word, attempts)| word == "delivered" && *attempts == 1),
                "{out:?}"
            );
            let taken: Vec<Vec<String>> = seen
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, ids)| ids.len() <= 3)
                .map(|(_, ids)| ids.clone())
                .collect();
            let mut once: Vec<String> = taken.concat();
            once.sort();
            let mut expected: Vec<String> = (0..10).map(|i| format!("e{i}")).collect();
            expected.sort();
            assert_eq!(once, expected, "every row accepted exactly once");

            // A single event that is too large on its own is dead-lettered.
            let (shared, _) = vendor(
                false,
                100,
                fast(),
                Arc::new(|_: &str, _: &[String], _| (413, "too large".into())),
            )
            .await;
            let out = run(&shared, &[("a", "e0"), ("b", "e1")]).await;
            for (_, word, _) in &out {
                assert!(word.starts_with("rejected too_large:"), "{word}");
            }
        }

        #[tokio::test]
        async fn concurrent_requests_never_reorder_one_persons_events() {
            let mut settings = fast();
            settings.max_concurrent_requests = 16;
            let ok: Script = Arc::new(|_: &str, _: &[String], _| (200, "{}".into()));
            let (shared, seen) = vendor(false, 1, settings, ok).await;
            let events: Vec<(String, String)> = (0..40)
                .map(|i| (format!("p{}", i % 4), format!("e{i:02}")))
                .collect();
            let events: Vec<(&str, &str)> = events
                .iter()
                .map(|(p, e)| (p.as_str(), e.as_str()))
                .collect();
            let out = run(&shared, &events).await;
            assert!(out.iter().all(|(_, w, _)| w == "delivered"), "{out:?}");
            let arrived: Vec<String> = seen
                .lock()
                .unwrap()
                .iter()
                .map(|(_, ids)| ids[0].clone())
                .collect();
            for p in 0..4 {
                let mine: Vec<&String> = arrived
                    .iter()
                    .filter(|id| id[1..].parse::<usize>().unwrap() % 4 == p)
                    .collect();
                let mut sorted = mine.clone();
                sorted.sort();
                assert_eq!(mine, sorted, "person p{p}'s events arrived out of order");
            }
            // The people's requests did interleave: they ran side by side.
            let people: Vec<usize> = arrived[..8]
                .iter()
                .map(|id| id[1..].parse::<usize>().unwrap() % 4)
                .collect();
            assert!(people.windows(2).any(|w| w[0] != w[1]), "{arrived:?}");
        }
    }
}
