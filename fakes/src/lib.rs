//! Fake vendor servers: real HTTP on loopback, one module per vendor.
//!
//! Each fake checks a request the way the vendor's API does (auth, required
//! fields, enum values, batch limits, hash format, time windows), answers
//! with the vendor's own error body shapes, drops resends of its dedup key
//! within the vendor's window, and records every exchange and every accepted
//! event so tests (and `switchyard demo`) can compare what arrived with what
//! should have.
//!
//! This crate knows nothing of switchyard's own code: it is written from the
//! vendors' contracts, so a mapping bug cannot hide behind a shared helper.
//! The vendor logic is a pure function of (request, dedup memory, now) so it
//! is unit-tested without sockets; `serve` puts it behind a listener.

pub mod amplitude;
pub mod customerio;
pub mod ga4;
pub mod google_ads;
pub mod klaviyo;
pub mod meta;
pub mod mixpanel;
pub mod posthog;
pub mod tiktok;
pub mod webhook;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::Value;

/// One HTTP request as the vendor logic sees it (header names lower-case).
#[derive(Debug, Clone)]
pub struct Incoming {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Incoming {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON, or `None` when it is not.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// The vendor's answer plus what it took.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Value,
    /// Events the vendor accepted with this request (resends it dropped as
    /// duplicates are not listed).
    pub accepted: Vec<Accepted>,
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body,
            accepted: Vec::new(),
        }
    }
}

/// One event the vendor took, in the terms tests compare.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// The vendor's dedup key (Meta/TikTok event_id, Google orderId); `None`
    /// for vendors without one (GA4).
    pub key: Option<String>,
    /// The vendor's event name (Google: the conversion action resource).
    pub name: String,
    pub value: Option<f64>,
    pub currency: Option<String>,
    /// The event as sent.
    pub payload: Value,
}

/// A vendor's memory of dedup keys it has accepted, with its window.
#[derive(Debug)]
pub struct Dedup {
    window: chrono::Duration,
    seen: HashMap<String, DateTime<Utc>>,
}

impl Dedup {
    pub fn new(window: Duration) -> Dedup {
        Dedup {
            window: chrono::Duration::from_std(window).expect("window fits"),
            seen: HashMap::new(),
        }
    }

    /// Whether `key` is new within the window at `now`; remembers it if so.
    pub fn first(&mut self, key: &str, now: DateTime<Utc>) -> bool {
        match self.seen.get(key) {
            Some(at) if now - *at < self.window => false,
            _ => {
                self.seen.insert(key.to_string(), now);
                true
            }
        }
    }

    /// Whether `key` was accepted within the window, without remembering it.
    pub fn contains(&self, key: &str, now: DateTime<Utc>) -> bool {
        self.seen.get(key).is_some_and(|at| now - *at < self.window)
    }
}

/// A vendor's request handling: a pure function of the request, the
/// vendor's dedup memory and the time.
pub trait Vendor: Send + Sync + 'static {
    /// The vendor's dedup window (ignored by vendors without dedup).
    fn dedup_window(&self) -> Duration {
        Duration::from_secs(48 * 3600)
    }
    fn handle(&self, req: &Incoming, dedup: &mut Dedup, now: DateTime<Utc>) -> Reply;
}

/// `s` is a SHA-256 digest as vendors want it: 64 lowercase hex characters.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// One request and the answer the fake gave.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub request: Incoming,
    pub status: u16,
    pub response: Vec<u8>,
}

/// An answer given instead of the vendor logic, to inject failures.
#[derive(Debug, Clone)]
pub struct Scripted {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

#[derive(Default)]
struct Recorded {
    exchanges: Vec<Exchange>,
    accepted: Vec<Accepted>,
    script: VecDeque<Scripted>,
}

struct Shared {
    vendor: Box<dyn Vendor>,
    dedup: Mutex<Dedup>,
    recorded: Mutex<Recorded>,
}

/// A running fake; it stops when dropped.
pub struct Fake {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Serves `vendor` on a fresh loopback port (within a tokio runtime).
pub async fn serve(vendor: impl Vendor) -> std::io::Result<Fake> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        dedup: Mutex::new(Dedup::new(vendor.dedup_window())),
        vendor: Box::new(vendor),
        recorded: Mutex::default(),
    });
    let app = Router::new().fallback(handle).with_state(shared.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
    });
    Ok(Fake {
        addr,
        shared,
        stop: Some(stop),
    })
}

impl Fake {
    /// `http://127.0.0.1:PORT`, to put in a destination's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request so far with the answer it got, in arrival order.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.shared.recorded.lock().expect("lock").exchanges.clone()
    }

    /// Every event accepted so far (first sends only; dropped resends are not here).
    pub fn accepted(&self) -> Vec<Accepted> {
        self.shared.recorded.lock().expect("lock").accepted.clone()
    }

    /// Answer the next requests with these instead of the vendor logic.
    pub fn script(&self, answers: impl IntoIterator<Item = Scripted>) {
        self.shared
            .recorded
            .lock()
            .expect("lock")
            .script
            .extend(answers);
    }

    /// Waits until at least `n` events were accepted or `timeout` passed;
    /// returns whether they were.
    pub async fn wait_accepted(&self, n: usize, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.accepted().len() >= n {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = Incoming {
        method: method.as_str().to_string(),
        path: uri.path().to_string(),
        query: uri.query().map(parse_form).unwrap_or_default(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
    };
    let scripted = shared.recorded.lock().expect("lock").script.pop_front();
    let (status, extra, body, accepted) = match scripted {
        Some(s) => (s.status, s.headers, s.body.into_bytes(), Vec::new()),
        None => {
            let reply = {
                let mut dedup = shared.dedup.lock().expect("lock");
                shared.vendor.handle(&request, &mut dedup, Utc::now())
            };
            let body = serde_json::to_vec(&reply.body).expect("JSON serialises");
            (reply.status, reply.headers, body, reply.accepted)
        }
    };
    {
        let mut rec = shared.recorded.lock().expect("lock");
        rec.exchanges.push(Exchange {
            request,
            status,
            response: body.clone(),
        });
        rec.accepted.extend(accepted);
    }
    let mut response = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        body,
    )
        .into_response();
    let h = response.headers_mut();
    h.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    for (k, v) in extra {
        if let (Ok(k), Ok(v)) = (
            axum::http::HeaderName::from_bytes(k.as_bytes()),
            axum::http::HeaderValue::from_str(&v),
        ) {
            h.insert(k, v);
        }
    }
    response
}

/// The pairs of an `application/x-www-form-urlencoded` body or query.
pub fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// `application/x-www-form-urlencoded` decoding of one query component.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex_is_64_lowercase_hex() {
        assert!(is_sha256_hex(&"a1".repeat(32)));
        assert!(!is_sha256_hex(&"A1".repeat(32)));
        assert!(!is_sha256_hex(&"a1".repeat(31)));
        assert!(!is_sha256_hex("person@example.com"));
    }

    #[test]
    fn dedup_forgets_after_its_window() {
        let mut d = Dedup::new(Duration::from_secs(3600));
        let t0 = Utc::now();
        assert!(d.first("k", t0));
        assert!(!d.first("k", t0 + chrono::Duration::minutes(59)));
        assert!(d.contains("k", t0));
        assert!(d.first("k", t0 + chrono::Duration::minutes(61)));
    }

    #[test]
    fn query_components_are_decoded() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("G-X%2"), "G-X%2");
    }
}
