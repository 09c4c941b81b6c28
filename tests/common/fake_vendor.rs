//! A fake webhook receiver, scripted per test: it checks the signature the
//! way a real receiver would, answers from a script (5xx, 429 with
//! Retry-After, hangs, dropped connections, per-event refusals), and records
//! every request with its timing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    TooMany {
        retry_after_s: u64,
    },
    /// Hold the request this long, then answer 200 (after the client gave up).
    Hang(Duration),
    /// Close the connection without answering.
    Drop,
    /// Hold the request this long, then answer it the default way.
    Slow(Duration),
    /// Answer with this status and a body that never ends.
    Endless(u16),
    /// 503 with Retry-After: a wait the vendor sets, without the throttle
    /// a 429 puts on the pace.
    Unavailable {
        retry_after_s: u64,
    },
}

#[derive(Debug, Clone)]
pub struct Received {
    pub arrived: Instant,
    /// When the answer was sent (None while the request is being held).
    pub answered: Option<Instant>,
    pub status: u16,
    /// Event ids the answer accepted.
    pub accepted: Vec<String>,
    pub idempotency_header: String,
    /// (event_id, idempotency_key) per event in the body.
    pub events: Vec<(String, String)>,
}

#[derive(Default)]
struct Inner {
    script: VecDeque<Reply>,
    /// Event ids refused permanently while present.
    refuse: HashSet<String>,
    /// The reason given for permanent refusals, instead of the default.
    refusal_reason: Option<String>,
    /// Event ids refused as retryable this many more times.
    fail: HashMap<String, u32>,
    /// Delay before every default 200.
    delay: Duration,
    received: Vec<Received>,
}

#[derive(Clone)]
pub struct FakeVendor {
    pub addr: SocketAddr,
    secret: Arc<String>,
    inner: Arc<Mutex<Inner>>,
}

impl FakeVendor {
    pub async fn start(secret: &str) -> FakeVendor {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = FakeVendor {
            addr: listener.local_addr().unwrap(),
            secret: Arc::new(secret.to_string()),
            inner: Arc::default(),
        };
        let app = Router::new()
            .route("/hook", post(handle))
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        fake
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.inner.lock().unwrap().script.extend(replies);
    }

    /// Drops the replies not used yet.
    pub fn clear_script(&self) {
        self.inner.lock().unwrap().script.clear();
    }

    pub fn refuse(&self, ids: &[&str]) {
        let mut i = self.inner.lock().unwrap();
        i.refuse = ids.iter().map(|s| s.to_string()).collect();
    }

    /// Refuses `ids` permanently, giving `reason` for each.
    pub fn refuse_with(&self, ids: &[&str], reason: &str) {
        self.refuse(ids);
        self.inner.lock().unwrap().refusal_reason = Some(reason.to_string());
    }

    pub fn fail_times(&self, id: &str, times: u32) {
        self.inner
            .lock()
            .unwrap()
            .fail
            .insert(id.to_string(), times);
    }

    pub fn set_delay(&self, d: Duration) {
        self.inner.lock().unwrap().delay = d;
    }

    pub fn received(&self) -> Vec<Received> {
        self.inner.lock().unwrap().received.clone()
    }

    /// Event ids accepted by some answer.
    pub fn delivered(&self) -> HashSet<String> {
        let i = self.inner.lock().unwrap();
        i.received
            .iter()
            .flat_map(|r| r.accepted.iter().cloned())
            .collect()
    }

    /// Requests arrived but not yet answered.
    pub fn holding(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.answered.is_none())
            .collect()
    }
}

fn verify(secret: &str, header: &str, body: &[u8]) -> bool {
    let Some((t, v1)) = header
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
    else {
        return false;
    };
    let Ok(sig) = hex::decode(v1) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(t.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

async fn handle(State(fake): State<FakeVendor>, headers: HeaderMap, body: Bytes) -> Response {
    let arrived = Instant::now();
    let sig = headers
        .get("x-switchyard-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !verify(&fake.secret, sig, &body) {
        return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
    }
    let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let events: Vec<(String, String)> = parsed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event"]["event_id"].as_str().unwrap().to_string(),
                e["idempotency_key"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let idempotency_header = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let (reply, index, delay) = {
        let mut i = fake.inner.lock().unwrap();
        let reply = i.script.pop_front();
        i.received.push(Received {
            arrived,
            answered: None,
            status: 0,
            accepted: Vec::new(),
            idempotency_header,
            events: events.clone(),
        });
        (reply, i.received.len() - 1, i.delay)
    };
    let answer = |status: u16| {
        let mut i = fake.inner.lock().unwrap();
        i.received[index].status = status;
        i.received[index].answered = Some(Instant::now());
    };
    let (reply, delay) = match reply {
        Some(Reply::Slow(d)) => (None, d),
        other => (other, delay),
    };
    match reply {
        Some(Reply::Status(s)) => {
            answer(s);
            if (200..300).contains(&s) {
                fake.inner.lock().unwrap().received[index].accepted =
                    events.iter().map(|(id, _)| id.clone()).collect();
            }
            StatusCode::from_u16(s).unwrap().into_response()
        }
        Some(Reply::TooMany { retry_after_s }) => {
            answer(429);
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", retry_after_s.to_string())],
                "slow down",
            )
                .into_response()
        }
        Some(Reply::Hang(d)) => {
            tokio::time::sleep(d).await;
            // The client gave up long ago: the answer reaches nobody.
            fake.inner.lock().unwrap().received[index].status = 0;
            StatusCode::OK.into_response()
        }
        // Unwinding without the panic hook ends the connection's task, so
        // the socket closes with no answer and no noise on stderr.
        Some(Reply::Drop) => std::panic::resume_unwind(Box::new("drop the connection")),
        Some(Reply::Unavailable { retry_after_s }) => {
            answer(503);
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", retry_after_s.to_string())],
                "down for maintenance",
            )
                .into_response()
        }
        Some(Reply::Endless(s)) => {
            answer(s);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let body = futures::stream::repeat_with(move || {
                Ok::<_, std::convert::Infallible>(chunk.clone())
            });
            (
                StatusCode::from_u16(s).unwrap(),
                axum::body::Body::from_stream(body),
            )
                .into_response()
        }
        Some(Reply::Slow(_)) => unreachable!("answered the default way"),
        None => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let mut i = fake.inner.lock().unwrap();
            let mut errors = Vec::new();
            let refusal = i
                .refusal_reason
                .clone()
                .unwrap_or_else(|| "value must be positive".into());
            for (id, _) in &events {
                if i.refuse.contains(id) {
                    errors.push(serde_json::json!({"idempotency_key": id, "reason": refusal}));
                } else if let Some(n) = i.fail.get_mut(id)
                    && *n > 0
                {
                    *n -= 1;
                    errors.push(serde_json::json!({"idempotency_key": id, "reason": "locked, try later", "retryable": true}));
                }
            }
            let refused = errors.iter().any(|e| e.get("retryable").is_none());
            let status = if refused { 400 } else { 200 };
            if !refused {
                let failed: HashSet<&str> = errors
                    .iter()
                    .filter_map(|e| e["idempotency_key"].as_str())
                    .collect();
                i.received[index].accepted = events
                    .iter()
                    .filter(|(id, _)| !failed.contains(id.as_str()))
                    .map(|(id, _)| id.clone())
                    .collect();
            }
            i.received[index].status = status;
            i.received[index].answered = Some(Instant::now());
            (
                StatusCode::from_u16(status).unwrap(),
                serde_json::json!({ "errors": errors }).to_string(),
            )
                .into_response()
        }
    }
}
