//! The endpoints. Each one authenticates, parses, maps to canonical events,
//! then hands them to [`accept`], which rate-limits, validates and publishes.

use std::io::Read;
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::{
    AUTHORIZATION, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::StreamExt as _;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value, json};
use sha1::Sha1;

use super::config::{Environment, Route};
use super::map::Mapped;
use super::{Gateway, Key, metrics, mixpanel, posthog, segment};
use crate::event::{DroppedHint, check_value};

/// Names the environment a request means; must match its key's.
const ENVIRONMENT_HEADER: &str = "x-switchyard-environment";
const SIGNATURE_HEADER: &str = "x-signature";
const TIMESTAMP_HEADER: &str = "x-switchyard-timestamp";
/// Seconds a client should wait after a 503 before retrying.
const RETRY_AFTER_UNAVAILABLE: u64 = 5;
/// Seconds after a request shed over the concurrency limit: slots free up
/// as fast as requests finish.
const RETRY_AFTER_OVERLOADED: u64 = 1;

type G = State<Arc<Gateway>>;

/// A refused request: status, a stable code, a sentence, and maybe details.
pub(super) struct Reject {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
    details: Map<String, Value>,
}

impl Reject {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Reject {
        Reject {
            status,
            code,
            message: message.into(),
            retry_after: None,
            details: Map::new(),
        }
    }
    fn with(mut self, key: &str, v: Value) -> Reject {
        self.details.insert(key.into(), v);
        self
    }
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        let mut body = self.details;
        body.insert("error".into(), Value::String(self.code.into()));
        body.insert("message".into(), Value::String(self.message));
        let mut resp = (self.status, Json(Value::Object(body))).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

type Outcome = Result<Json<Value>, Reject>;

fn finish(route: &'static str, outcome: Outcome) -> Response {
    let resp = match outcome {
        Ok(body) => body.into_response(),
        Err(r) => r.into_response(),
    };
    metrics::request(route, resp.status().as_u16());
    resp
}

pub(super) async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

pub(super) async fn readyz(State(g): G) -> Response {
    if g.publisher.is_ready() {
        Json(json!({"ready": true})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "error": "broker_unavailable",
                        "message": "the Kafka broker does not answer or the canonical topic is missing"})),
        )
            .into_response()
    }
}

/// Over `ingest.max_concurrent_requests` (the load-shed layer's only error).
pub(super) async fn overloaded(_: tower::BoxError) -> Response {
    let mut r = Reject::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        "the gateway is at its limit of concurrent requests; retry shortly",
    );
    r.retry_after = Some(RETRY_AFTER_OVERLOADED);
    finish("shed", Err(r))
}

pub(super) async fn not_found() -> Response {
    finish(
        "unknown",
        Err(Reject::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such endpoint; see docs/ingest.md",
        )),
    )
}

pub(super) async fn method_not_allowed() -> Response {
    finish(
        "unknown",
        Err(Reject::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this endpoint takes POST (health endpoints take GET)",
        )),
    )
}

// ---- native canonical events ------------------------------------------------

pub(super) async fn canonical_events(State(g): G, headers: HeaderMap, body: Body) -> Response {
    let outcome = async {
        let key = match authorize(&g, bearer(&headers), Route::Canonical, &headers) {
            Ok(key) => key,
            Err(refused) => return Err(discard(&g, &headers, body, refused).await),
        };
        let bytes = read_body(&g, &headers, body).await?;
        let value = parse_json(&bytes)?;
        let (events, single) = match value {
            Value::Object(mut o) if o.contains_key("batch") => match o.remove("batch") {
                Some(Value::Array(items)) if !items.is_empty() => (items, false),
                _ => {
                    return Err(Reject::new(
                        StatusCode::BAD_REQUEST,
                        "bad_batch",
                        "`batch` must be a non-empty array of canonical events",
                    ));
                }
            },
            other => (vec![other], true),
        };
        let mapped = events.into_iter().map(Mapped::Event).collect();
        accept(&g, key, "canonical", mapped, single).await
    }
    .await;
    finish("v1_events", outcome)
}

// ---- Segment ----------------------------------------------------------------

pub(super) async fn segment_webhook(State(g): G, headers: HeaderMap, body: Body) -> Response {
    let outcome = async {
        let raw = read_raw(&g, &headers, body).await?;
        let key = verify_segment_signature(&g, &headers, &raw)?;
        check_environment(key, &headers)?;
        let value = parse_json(&decode(&g, &headers, raw)?)?;
        let messages = match value {
            Value::Array(items) => items,
            Value::Object(mut o) if o.get("batch").is_some_and(Value::is_array) => {
                match o.remove("batch") {
                    Some(Value::Array(items)) => items,
                    _ => Vec::new(),
                }
            }
            other => vec![other],
        };
        let mapped = messages.iter().map(segment::map_message).collect();
        accept(&g, key, "segment", mapped, false)
            .await
            .map(|j| with_fields(j, &[("success", json!(true))]))
    }
    .await;
    finish("segment_webhook", outcome)
}

/// Finds the key whose Segment shared secret signed this body.
///
/// Segment signs the raw body. With `X-Switchyard-Timestamp` the signature
/// must cover `"<timestamp>." + body`: a timestamp outside the signature
/// could simply be replaced by whoever replays the request.
fn verify_segment_signature<'a>(
    g: &'a Gateway,
    headers: &HeaderMap,
    raw: &[u8],
) -> Result<&'a Key, Reject> {
    let unauthorized = |code, msg: &str| Reject::new(StatusCode::UNAUTHORIZED, code, msg);
    let signature = headers
        .get(SIGNATURE_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| unauthorized("missing_signature", "X-Signature header is required"))?;
    let signature = hex::decode(signature.trim()).map_err(|_| {
        unauthorized(
            "bad_signature",
            "X-Signature must be hex HMAC-SHA1 of the body",
        )
    })?;
    let timestamp = headers
        .get(TIMESTAMP_HEADER)
        .map(|v| v.to_str().unwrap_or(""));
    let prefix = match timestamp {
        Some(ts) => {
            let t: i64 = ts.trim().parse().map_err(|_| {
                unauthorized(
                    "bad_timestamp",
                    "X-Switchyard-Timestamp must be unix seconds",
                )
            })?;
            let skew = chrono::Utc::now().timestamp().abs_diff(t);
            if skew > g.settings.timestamp_skew.as_secs() {
                return Err(unauthorized(
                    "stale_timestamp",
                    &format!(
                        "X-Switchyard-Timestamp is {skew}s away from now; at most {}s is accepted",
                        g.settings.timestamp_skew.as_secs()
                    ),
                ));
            }
            format!("{}.", ts.trim())
        }
        None if g.settings.require_timestamp => {
            return Err(unauthorized(
                "missing_timestamp",
                "X-Switchyard-Timestamp is required (unix seconds, signed with the body)",
            ));
        }
        None => String::new(),
    };
    g.keys
        .iter()
        .filter(|k| k.config.allows(Route::Segment))
        .find(|k| {
            k.config
                .segment_shared_secret
                .as_ref()
                .is_some_and(|secret| {
                    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(secret.expose().as_bytes())
                    else {
                        return false;
                    };
                    mac.update(prefix.as_bytes());
                    mac.update(raw);
                    // verify_slice compares in constant time.
                    mac.verify_slice(&signature).is_ok()
                })
        })
        .ok_or_else(|| {
            unauthorized(
                "bad_signature",
                "X-Signature does not match any configured Segment shared secret",
            )
        })
}

pub(super) async fn segment_api_batch(g: G, headers: HeaderMap, body: Body) -> Response {
    finish("segment_batch", segment_api(g, headers, body, None).await)
}
pub(super) async fn segment_api_track(g: G, headers: HeaderMap, body: Body) -> Response {
    finish(
        "segment_track",
        segment_api(g, headers, body, Some("track")).await,
    )
}
pub(super) async fn segment_api_identify(g: G, headers: HeaderMap, body: Body) -> Response {
    finish(
        "segment_identify",
        segment_api(g, headers, body, Some("identify")).await,
    )
}
pub(super) async fn segment_api_page(g: G, headers: HeaderMap, body: Body) -> Response {
    finish(
        "segment_page",
        segment_api(g, headers, body, Some("page")).await,
    )
}

/// Segment's HTTP Tracking API: the write key is the Basic-auth user (or
/// `writeKey` in the body, which some SDKs send instead).
///
/// A Basic-auth key is checked before the body is read: a request with a
/// wrong key costs no body read, inflation or parse. Only a request without
/// one is read (within the body limits) to find its `writeKey`.
async fn segment_api(State(g): G, headers: HeaderMap, body: Body, kind: Option<&str>) -> Outcome {
    let header_key = match basic_user(&headers) {
        Some(user) => match authorize(&g, Some(&user), Route::Segment, &headers) {
            Ok(key) => Some(key),
            Err(refused) => return Err(discard(&g, &headers, body, refused).await),
        },
        None => None,
    };
    let bytes = read_body(&g, &headers, body).await?;
    let value = parse_json(&bytes)?;
    let key = match header_key {
        Some(key) => key,
        None => authorize(
            &g,
            value.get("writeKey").and_then(Value::as_str),
            Route::Segment,
            &headers,
        )?,
    };
    let messages = match (kind, value) {
        (None, Value::Object(mut o)) => match o.remove("batch") {
            Some(Value::Array(items)) => items,
            _ => {
                return Err(Reject::new(
                    StatusCode::BAD_REQUEST,
                    "bad_batch",
                    "`batch` must be an array of Segment messages",
                ));
            }
        },
        (Some(kind), Value::Object(mut o)) => {
            // The path says the type; SDKs may leave it out of the body.
            o.entry("type")
                .or_insert_with(|| Value::String(kind.into()));
            vec![Value::Object(o)]
        }
        _ => {
            return Err(Reject::new(
                StatusCode::BAD_REQUEST,
                "bad_payload",
                "expected a JSON object",
            ));
        }
    };
    let mapped = messages.iter().map(segment::map_message).collect();
    accept(&g, key, "segment", mapped, false)
        .await
        .map(|j| with_fields(j, &[("success", json!(true))]))
}

// ---- Mixpanel and PostHog ---------------------------------------------------

pub(super) async fn mixpanel_track(State(g): G, headers: HeaderMap, body: Body) -> Response {
    let outcome = async {
        let bytes = read_body(&g, &headers, body).await?;
        let form = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
        let json_bytes = if form {
            mixpanel_form_data(&bytes)?
        } else {
            bytes.to_vec()
        };
        let events = one_or_many(parse_json(&json_bytes)?);
        let token = same_credential(events.iter().map(mixpanel::token), "properties.token")?;
        let key = authorize(&g, token, Route::Mixpanel, &headers)?;
        let mapped = events.iter().map(mixpanel::map_event).collect();
        // Mixpanel's SDKs check `status == 1`.
        accept(&g, key, "mixpanel", mapped, false)
            .await
            .map(|j| with_fields(j, &[("status", json!(1))]))
    }
    .await;
    finish("mixpanel_track", outcome)
}

/// `data=<JSON>` or `data=<base64 JSON>`, as Mixpanel's `/track` takes them.
fn mixpanel_form_data(body: &[u8]) -> Result<Vec<u8>, Reject> {
    let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|e| Reject::new(StatusCode::BAD_REQUEST, "malformed_form", e.to_string()))?;
    let data = fields
        .into_iter()
        .find(|(k, _)| k == "data")
        .map(|(_, v)| v)
        .ok_or_else(|| {
            Reject::new(
                StatusCode::BAD_REQUEST,
                "malformed_form",
                "the form has no `data` field",
            )
        })?;
    let trimmed = data.trim_start();
    if trimmed.starts_with('[') || trimmed.starts_with('{') {
        Ok(data.into_bytes())
    } else {
        BASE64.decode(data.trim()).map_err(|_| {
            Reject::new(
                StatusCode::BAD_REQUEST,
                "malformed_form",
                "`data` is neither JSON nor base64 JSON",
            )
        })
    }
}

pub(super) async fn posthog_capture(g: G, headers: HeaderMap, body: Body) -> Response {
    finish("posthog_capture", posthog(g, headers, body).await)
}
pub(super) async fn posthog_batch(g: G, headers: HeaderMap, body: Body) -> Response {
    finish("posthog_batch", posthog(g, headers, body).await)
}

/// One event or `{api_key, batch:[...]}`, on either path, gzip or plain.
async fn posthog(State(g): G, headers: HeaderMap, body: Body) -> Outcome {
    let bytes = read_body(&g, &headers, body).await?;
    let value = parse_json(&bytes)?;
    let (envelope, events) = match value {
        Value::Object(mut o) if o.get("batch").is_some_and(Value::is_array) => {
            let events = match o.remove("batch") {
                Some(Value::Array(items)) => items,
                _ => Vec::new(),
            };
            (Some(Value::Object(o)), events)
        }
        other => (None, one_or_many(other)),
    };
    let api_key = same_credential(
        events
            .iter()
            .map(|e| posthog::api_key(e, envelope.as_ref())),
        "api_key",
    )?;
    let key = authorize(&g, api_key, Route::Posthog, &headers)?;
    let mapped = events.iter().map(posthog::map_event).collect();
    accept(&g, key, "posthog", mapped, false)
        .await
        .map(|j| with_fields(j, &[("status", json!(1))]))
}

fn one_or_many(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items,
        other => vec![other],
    }
}

/// The one credential all events of a request carry in their payload.
fn same_credential<'a>(
    mut creds: impl Iterator<Item = Option<&'a str>>,
    field: &str,
) -> Result<Option<&'a str>, Reject> {
    let first = creds.next().flatten();
    if creds.any(|c| c != first) {
        return Err(Reject::new(
            StatusCode::BAD_REQUEST,
            "mixed_credentials",
            format!("every event of one request must carry the same `{field}`"),
        ));
    }
    Ok(first)
}

// ---- the shared path --------------------------------------------------------

/// Rate-limits, validates and publishes one request's events.
async fn accept(g: &Gateway, key: &Key, via: &str, mapped: Vec<Mapped>, single: bool) -> Outcome {
    let source = key.config.source.as_str();
    let n = mapped.len();
    if n == 0 {
        return Err(Reject::new(
            StatusCode::BAD_REQUEST,
            "no_events",
            "the request holds no events",
        ));
    }
    if let Some(limiter) = &key.limiter {
        let cost = NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        let over = match limiter.check_n(cost) {
            Ok(Ok(())) => None,
            Ok(Err(_)) => Some(format!(
                "key for source `{source}` is over its rate of {} events/s",
                g.settings.rate_limit_per_second
            )),
            Err(_) => Some(format!(
                "{n} events in one request exceed the key's burst of {} events; split the request",
                g.settings.rate_limit_burst
            )),
        };
        if let Some(message) = over {
            metrics::events(source, "rejected", n);
            let mut r = Reject::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
            r.retry_after = Some(1);
            return Err(r);
        }
    }

    // Validate everything before publishing anything.
    let mut results: Vec<Value> = Vec::with_capacity(n);
    let mut too_large = 0;
    let mut records: Vec<(String, Vec<u8>)> = Vec::with_capacity(n);
    let mut invalid = 0usize;
    let mut first_violations = Value::Null;
    for (index, m) in mapped.into_iter().enumerate() {
        match m {
            Mapped::Unmapped(name) => {
                metrics::unmapped(source, via, &name);
                results.push(json!({"index": index, "status": "unmapped", "name": name}));
            }
            Mapped::Event(mut event) => match admit(&mut event, source, via, g.max_record_bytes) {
                Ok(admitted) => {
                    results.push(admitted.result(index));
                    records.push((admitted.id, admitted.payload));
                }
                Err(Refusal {
                    violations,
                    too_large: big,
                }) => {
                    invalid += 1;
                    too_large += usize::from(big);
                    let v = serde_json::to_value(&violations).unwrap_or_default();
                    if first_violations.is_null() {
                        first_violations = v.clone();
                    }
                    results.push(json!({"index": index, "status": "invalid", "violations": v}));
                }
            },
        }
    }
    if invalid > 0 {
        metrics::events(source, "rejected", records.len() + invalid);
        for r in &mut results {
            if r["status"] == "accepted" {
                r["status"] = json!("not_published");
            }
        }
        let mut reject = if too_large == invalid {
            Reject::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "event_too_large",
                format!(
                    "{too_large} event(s) larger than a record may be (router.max_record_bytes = {}); nothing was published",
                    g.max_record_bytes
                ),
            )
            .with("violations", first_violations)
        } else if single {
            Reject::new(
                StatusCode::BAD_REQUEST,
                "invalid_event",
                "the event violates the canonical contract; nothing was published",
            )
            .with("violations", first_violations)
        } else {
            Reject::new(
                StatusCode::BAD_REQUEST,
                "invalid_events",
                format!(
                    "{invalid} of {n} events violate the canonical contract; nothing was published"
                ),
            )
        };
        reject = reject.with("results", Value::Array(results));
        return Err(reject);
    }

    let topic = topic(g, key)?;
    let acks = g.publisher.publish(topic, &records).await;
    let failed: Vec<String> = acks
        .iter()
        .filter_map(|a| a.as_ref().err().map(|e| e.0.clone()))
        .collect();
    if let Some(why) = failed.first() {
        tracing::warn!(source, topic, failed = failed.len(), error = %why, "publish not acknowledged");
        metrics::events(source, "rejected", records.len());
        let mut acked = acks.iter();
        for r in &mut results {
            if r["status"] == "accepted" && acked.next().is_some_and(Result::is_err) {
                r["status"] = json!("not_acknowledged");
            }
        }
        let mut reject = Reject::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            format!(
                "{} of {} events were not acknowledged by Kafka ({why}); retry the request",
                failed.len(),
                records.len()
            ),
        )
        .with("results", Value::Array(results));
        reject.retry_after = Some(RETRY_AFTER_UNAVAILABLE);
        return Err(reject);
    }
    metrics::events(source, "accepted", records.len());
    Ok(Json(json!({
        "accepted": records.len(),
        "unmapped": n - records.len(),
        "results": results,
    })))
}

/// An event that may be published.
#[derive(Debug)]
struct Admitted {
    /// The record key: the event id as the router reads it (trimmed).
    id: String,
    payload: Vec<u8>,
    /// Malformed identity hints the router will drop.
    warnings: Vec<DroppedHint>,
}

impl Admitted {
    /// The per-item answer; `warnings` appears only when there are some.
    fn result(&self, index: usize) -> Value {
        let mut result = json!({"index": index, "status": "accepted", "event_id": self.id});
        if !self.warnings.is_empty() {
            result["warnings"] = self
                .warnings
                .iter()
                .map(|h| {
                    json!({
                        "pointer": h.pointer,
                        "message": format!("{}; the hint is dropped, the event is routed", h.reason),
                    })
                })
                .collect();
        }
        result
    }
}

/// Checks one mapped event against the contract and the key's source and
/// serialises it. A malformed identity hint is not refused: the event is
/// published as sent and the router drops the hint, so the publisher hears
/// about it as a warning instead of losing the conversion.
/// Why an event was not admitted: its violations, and whether its size
/// was the only one (a 413: the event is valid, it just cannot be a record).
#[derive(Debug)]
struct Refusal {
    violations: Vec<crate::event::Violation>,
    too_large: bool,
}

fn admit(
    event: &mut Value,
    source: &str,
    via: &str,
    max_record_bytes: usize,
) -> Result<Admitted, Refusal> {
    let (mut violations, warnings) = check_value(event);
    if let Value::Object(o) = event {
        bind_source(o, source, via, &mut violations);
    }
    // Serialising a Value cannot fail.
    let payload = serde_json::to_vec(event).unwrap_or_default();
    let too_large = payload.len() > max_record_bytes;
    if too_large {
        violations.push(crate::event::Violation {
            pointer: String::new(),
            message: format!(
                "the event is {} bytes; the router accepts at most {max_record_bytes} (router.max_record_bytes)",
                payload.len(),
            ),
        });
    }
    if !violations.is_empty() {
        return Err(Refusal {
            too_large: too_large && violations.len() == 1,
            violations,
        });
    }
    // The router trims the id it dedups by; the record key is the same
    // string, so a retry with different padding lands on the same partition.
    let id = event["event_id"]
        .as_str()
        .unwrap_or_default()
        .trim()
        .to_owned();
    Ok(Admitted {
        id,
        payload,
        warnings,
    })
}

/// The key's source names the events: filled in when absent, and a native
/// event that claims another source is refused.
fn bind_source(
    o: &mut Map<String, Value>,
    source: &str,
    via: &str,
    violations: &mut Vec<crate::event::Violation>,
) {
    match o.get("source").and_then(Value::as_str) {
        Some(s) if s == source => {}
        Some(s) if via == "canonical" => violations.push(crate::event::Violation {
            pointer: "/source".into(),
            message: format!("this key publishes for source `{source}`, not `{s}`"),
        }),
        _ => {
            o.insert("source".into(), Value::String(source.into()));
        }
    }
}

fn topic<'a>(g: &'a Gateway, key: &Key) -> Result<&'a str, Reject> {
    g.settings
        .topic_for(&g.canonical_topic, key.config.environment)
        .ok_or_else(|| {
            Reject::new(
                StatusCode::FORBIDDEN,
                "no_staging_topic",
                "staging keys need ingest.staging_topic",
            )
        })
}

// ---- auth, body, JSON -------------------------------------------------------

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn basic_user(headers: &HeaderMap) -> Option<String> {
    let encoded = headers
        .get(AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Basic ")?;
    let decoded = String::from_utf8(BASE64.decode(encoded.trim()).ok()?).ok()?;
    let user = decoded.split_once(':').map_or(decoded.as_str(), |(u, _)| u);
    Some(user.to_string())
}

fn authorize<'a>(
    g: &'a Gateway,
    presented: Option<&str>,
    route: Route,
    headers: &HeaderMap,
) -> Result<&'a Key, Reject> {
    let presented = presented.filter(|p| !p.is_empty()).ok_or_else(|| {
        Reject::new(
            StatusCode::UNAUTHORIZED,
            "missing_key",
            format!("no key presented for the {} route", route.as_str()),
        )
    })?;
    let key = g.key(presented).ok_or_else(|| {
        Reject::new(
            StatusCode::UNAUTHORIZED,
            "unknown_key",
            "the key is not configured",
        )
    })?;
    if !key.config.allows(route) {
        return Err(Reject::new(
            StatusCode::FORBIDDEN,
            "route_not_allowed",
            format!(
                "the key for source `{}` may not use the {} route",
                key.config.source,
                route.as_str()
            ),
        ));
    }
    check_environment(key, headers)?;
    Ok(key)
}

fn check_environment(key: &Key, headers: &HeaderMap) -> Result<(), Reject> {
    let Some(wanted) = headers.get(ENVIRONMENT_HEADER) else {
        return Ok(());
    };
    let wanted = match wanted.to_str().map(str::trim) {
        Ok("production") => Environment::Production,
        Ok("staging") => Environment::Staging,
        _ => {
            return Err(Reject::new(
                StatusCode::BAD_REQUEST,
                "bad_environment",
                "X-Switchyard-Environment must be `production` or `staging`",
            ));
        }
    };
    if wanted != key.config.environment {
        return Err(Reject::new(
            StatusCode::FORBIDDEN,
            "environment_mismatch",
            format!(
                "this is a {} key; it cannot send {} traffic",
                key.config.environment.as_str(),
                wanted.as_str()
            ),
        ));
    }
    Ok(())
}

fn too_large(limit: usize) -> Reject {
    Reject::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the request body is larger than {limit} bytes"),
    )
}

/// The body exactly as sent (signatures are over these bytes).
async fn read_raw(g: &Gateway, headers: &HeaderMap, body: Body) -> Result<Bytes, Reject> {
    let limit = g.settings.body_limit_bytes;
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large(limit));
    }
    let timeout = g.settings.body_read_timeout;
    // Past the declared length, only an oversize chunked body fails here.
    tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| {
            Reject::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the request body did not arrive within {}ms",
                    timeout.as_millis()
                ),
            )
        })?
        .map_err(|_| too_large(limit))
}

/// Drops the body of a request refused before it was read, then gives back
/// the refusal. Closing with the body unread would make a client that is
/// still sending see a broken connection instead of the answer, and SDKs
/// retry a broken connection where they give up on a 401. The body is read
/// chunk by chunk and dropped, never kept or inflated, and only up to the
/// body limit within the body-read timeout.
async fn discard(g: &Gateway, headers: &HeaderMap, body: Body, refused: Reject) -> Reject {
    let limit = g.settings.body_limit_bytes;
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return refused;
    }
    let mut chunks = body.into_data_stream();
    let mut seen = 0usize;
    let _ = tokio::time::timeout(g.settings.body_read_timeout, async {
        while let Some(Ok(chunk)) = chunks.next().await {
            seen += chunk.len();
            if seen > limit {
                break;
            }
        }
    })
    .await;
    refused
}

/// The body, gunzipped when it is gzip (by header or by its magic bytes:
/// PostHog SDKs compress without always saying so).
async fn read_body(g: &Gateway, headers: &HeaderMap, body: Body) -> Result<Bytes, Reject> {
    let raw = read_raw(g, headers, body).await?;
    decode(g, headers, raw)
}

fn decode(g: &Gateway, headers: &HeaderMap, raw: Bytes) -> Result<Bytes, Reject> {
    let gzip_header = headers
        .get(CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    if !gzip_header && !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let limit = g.settings.body_limit_bytes;
    let mut out = Vec::new();
    // Reading one byte past the limit tells an oversize body from an exact fit
    // without inflating a gzip bomb.
    flate2::read::GzDecoder::new(&raw[..])
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            Reject::new(
                StatusCode::BAD_REQUEST,
                "bad_gzip",
                format!("the gzip body cannot be decompressed: {e}"),
            )
        })?;
    if out.len() > limit {
        return Err(too_large(limit));
    }
    Ok(Bytes::from(out))
}

fn parse_json(bytes: &[u8]) -> Result<Value, Reject> {
    serde_json::from_slice(bytes).map_err(|e| {
        Reject::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {e}"),
        )
    })
}

fn with_fields(Json(mut v): Json<Value>, fields: &[(&str, Value)]) -> Json<Value> {
    if let Value::Object(o) = &mut v {
        for (k, f) in fields {
            o.insert((*k).into(), f.clone());
        }
    }
    Json(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lead(extra: Value) -> Value {
        let mut event = json!({"event": "lead", "event_id": "e1",
            "occurred_at": "2026-11-26T10:00:00Z", "user_id": "u1"});
        for (k, v) in extra.as_object().unwrap() {
            event[k] = v.clone();
        }
        event
    }

    #[test]
    fn a_malformed_hint_is_published_as_sent_with_a_warning() {
        let mut event =
            lead(json!({"event_id": " e1 ", "email": "n/a", "phone": " +1 650 253 0000 "}));
        let admitted = admit(&mut event, "web", "canonical", 1 << 20).unwrap();
        assert_eq!(admitted.id, "e1");
        let published: Value = serde_json::from_slice(&admitted.payload).unwrap();
        assert_eq!(published["email"], "n/a");
        assert_eq!(published["event_id"], " e1 ");
        assert_eq!(published["source"], "web");
        assert_eq!(
            admitted.result(3),
            json!({"index": 3, "status": "accepted", "event_id": "e1", "warnings": [{
                "pointer": "/email",
                "message": "not an email address (3 characters, no '@'); the hint is dropped, the event is routed"
            }]})
        );
    }

    #[test]
    fn a_clean_event_has_no_warnings_key() {
        let mut event = lead(json!({"email": "Jane@Example.com"}));
        let admitted = admit(&mut event, "web", "canonical", 1 << 20).unwrap();
        assert_eq!(
            admitted.result(0),
            json!({"index": 0, "status": "accepted", "event_id": "e1"})
        );
    }

    #[test]
    fn wrong_types_and_other_rules_are_still_refused() {
        let mut event = lead(json!({"email": 42, "context": {"ip": "unknown"}}));
        let violations = admit(&mut event, "web", "canonical", 1 << 20)
            .unwrap_err()
            .violations;
        let pointers: Vec<&str> = violations.iter().map(|v| v.pointer.as_str()).collect();
        assert_eq!(pointers, ["/email"]);
        let mut event = lead(json!({"source": "crm"}));
        let refusal = admit(&mut event, "web", "canonical", 1 << 20).unwrap_err();
        assert_eq!(refusal.violations[0].pointer, "/source");
        assert!(!refusal.too_large);
        let mut event = lead(json!({}));
        let refusal = admit(&mut event, "web", "canonical", 10).unwrap_err();
        assert_eq!(refusal.violations[0].pointer, "");
        assert!(refusal.too_large, "a valid event that cannot fit is a 413");
    }
}
