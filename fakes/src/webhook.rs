//! A receiver of switchyard's signed webhooks, written the way
//! docs/destinations/webhook.md tells receivers to: verify
//! `X-Switchyard-Signature` over the raw body in constant time, refuse stale
//! timestamps, drop resends by idempotency key.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::{Accepted, Dedup, Incoming, Reply, Vendor};

#[derive(Debug, Clone)]
pub struct Settings {
    pub secret: String,
    /// Signatures older (or further in the future) than this are refused.
    pub tolerance: Duration,
    /// How long an idempotency key is remembered.
    pub dedup_window: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            secret: "demo-webhook-secret-0123".into(),
            tolerance: Duration::from_secs(300),
            dedup_window: Duration::from_secs(48 * 3600),
        }
    }
}

impl Vendor for Settings {
    fn dedup_window(&self) -> Duration {
        self.dedup_window
    }

    fn handle(&self, req: &Incoming, dedup: &mut Dedup, now: DateTime<Utc>) -> Reply {
        if req.method != "POST" {
            return Reply::json(405, json!({"error": "POST only"}));
        }
        if let Err(why) = verify(
            self.secret.as_bytes(),
            req.header("x-switchyard-signature"),
            &req.body,
            now,
            self.tolerance,
        ) {
            return Reply::json(401, json!({ "error": why }));
        }
        let Some(body) = req.json() else {
            return Reply::json(400, json!({"error": "body is not JSON"}));
        };
        let Some(events) = body.get("events").and_then(Value::as_array) else {
            return Reply::json(400, json!({"error": "`events` must be an array"}));
        };
        let mut errors = Vec::new();
        let mut accepted = Vec::new();
        for e in events {
            let Some(key) = e.get("idempotency_key").and_then(Value::as_str) else {
                errors.push(json!({"idempotency_key": "", "reason": "missing idempotency_key", "retryable": false}));
                continue;
            };
            if dedup.first(key, now) {
                let event = e.get("event").cloned().unwrap_or(Value::Null);
                accepted.push(Accepted {
                    key: Some(key.to_string()),
                    name: e
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    value: event.get("value").and_then(Value::as_f64),
                    currency: event
                        .get("currency")
                        .and_then(Value::as_str)
                        .map(String::from),
                    payload: e.clone(),
                });
            }
        }
        let mut reply = Reply::json(200, json!({ "errors": errors }));
        reply.accepted = accepted;
        reply
    }
}

/// Checks `t=<unix>,v1=<hex>` against HMAC-SHA256(secret, "<t>.<body>").
pub fn verify(
    secret: &[u8],
    header: Option<&str>,
    body: &[u8],
    now: DateTime<Utc>,
    tolerance: Duration,
) -> Result<(), &'static str> {
    let header = header.ok_or("missing X-Switchyard-Signature")?;
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = hex::decode(v).ok(),
            _ => {}
        }
    }
    let (t, v1) = t.zip(v1).ok_or("malformed X-Switchyard-Signature")?;
    if (now.timestamp() - t).unsigned_abs() > tolerance.as_secs() {
        return Err("signature timestamp outside the tolerance");
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&v1).map_err(|_| "signature mismatch")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], t: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
    }

    fn request(sig: Option<String>, body: &str) -> Incoming {
        Incoming {
            method: "POST".into(),
            path: "/hook".into(),
            query: vec![],
            headers: sig
                .map(|s| vec![("x-switchyard-signature".into(), s)])
                .unwrap_or_default(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn signed_batches_are_taken_once_per_key() {
        let s = Settings::default();
        let now = Utc::now();
        let mut dedup = Dedup::new(s.dedup_window);
        let body = r#"{"events":[{"idempotency_key":"e1","name":"purchase","event":{"value":9.5,"currency":"EUR"}}]}"#;
        let sig = sign(s.secret.as_bytes(), now.timestamp(), body.as_bytes());
        let first = s.handle(&request(Some(sig.clone()), body), &mut dedup, now);
        assert_eq!(first.status, 200);
        assert_eq!(first.accepted.len(), 1);
        assert_eq!(first.accepted[0].value, Some(9.5));
        let again = s.handle(&request(Some(sig), body), &mut dedup, now);
        assert_eq!(again.status, 200);
        assert!(again.accepted.is_empty());
    }

    #[test]
    fn bad_or_stale_signatures_are_refused() {
        let s = Settings::default();
        let now = Utc::now();
        let mut dedup = Dedup::new(s.dedup_window);
        let body = r#"{"events":[]}"#;
        let stale = sign(s.secret.as_bytes(), now.timestamp() - 600, body.as_bytes());
        let wrong = sign(b"other", now.timestamp(), body.as_bytes());
        for sig in [None, Some(stale), Some(wrong), Some("t=1".into())] {
            assert_eq!(s.handle(&request(sig, body), &mut dedup, now).status, 401);
        }
    }
}
