//! Signed webhook (`type = "webhook"`).
//!
//! One request carries a batch: `{"events":[{"idempotency_key", "destination",
//! "name", "event", "routed_at"}, …]}`. Every event carries its own
//! `idempotency_key` (= event_id) in the body, because one header cannot name
//! several events; the `Idempotency-Key` header is the event_id when the
//! request holds one event, and for a batch a digest of its events' keys, so
//! a resent request carries the same header as the first send.
//!
//! `X-Switchyard-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
//! lets the receiver check origin and freshness (see docs/destinations/webhook.md).
//!
//! Receivers answer 2xx when they took the batch. To refuse some events they
//! list them: `{"errors":[{"idempotency_key":"…","reason":"…","retryable":false}]}`.
//! With a 2xx the unlisted events count as delivered; with a 400/422 the
//! unlisted ones were not taken and are resent without the refused ones.
//! Receivers have no dedup of their own obligation, so the sink checks the
//! delivery ledger before sending.

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Contact, Kind, Spec};
use crate::delivery::Delivery;
use crate::event::normalize::{EmailRule, PhoneFormat};
use crate::event::{CanonicalEvent, EventName};
use crate::settings::{Problem, Secret, check_url, reporter};
use crate::sink::destination::{Classified, Destination, Limits, Outcome, Request, Response};
use crate::sink::retry;

pub const SIGNATURE_HEADER: &str = "X-Switchyard-Signature";

/// A webhook can carry anything: its owner names the consent it needs and
/// may be given raw contact data (`raw_contact = true`).
pub const SPEC: Spec = Spec {
    type_name: "webhook",
    kind: Kind::Webhook,
    contact: Contact::RawWhenConfigured,
    email: EmailRule::Plain,
    phone: PhoneFormat::E164,
    ordering: false,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub url: String,
    /// HMAC-SHA256 key for `X-Switchyard-Signature`.
    pub secret: Secret,
}

impl Settings {
    /// What types cannot say; each problem is named under `key`.
    pub fn check(&self, key: &str, problems: &mut Vec<Problem>) {
        let mut bad = reporter(key, problems);
        if let Err(why) = check_url(&self.url) {
            bad("url", why);
        }
        if self.secret.expose().len() < 16 {
            bad("secret", "must be at least 16 characters".into());
        }
    }

    /// A webhook receives the canonical name of everything.
    pub fn preset_name<'a>(&self, event: &'a EventName) -> Option<&'a str> {
        Some(event.as_str())
    }
}

pub struct Webhook {
    settings: Settings,
}

impl Webhook {
    pub fn new(settings: Settings) -> Self {
        Webhook { settings }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    events: Vec<BodyEvent<'a>>,
}

#[derive(Serialize)]
struct BodyEvent<'a> {
    idempotency_key: &'a str,
    destination: &'a str,
    name: &'a str,
    event: &'a CanonicalEvent,
    routed_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Deserialize)]
struct Refusals {
    #[serde(default)]
    errors: Vec<Refusal>,
}

#[derive(Deserialize)]
struct Refusal {
    idempotency_key: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    retryable: bool,
}

/// `t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The `Idempotency-Key` header for a request holding `batch`.
pub fn idempotency_header(batch: &[Delivery]) -> String {
    match batch {
        [one] => one.idempotency_key().to_string(),
        many => {
            let mut h = Sha256::new();
            for d in many {
                h.update(d.idempotency_key().as_bytes());
                h.update(b"\n");
            }
            format!("batch-{}", hex::encode(h.finalize()))
        }
    }
}

impl Webhook {
    fn request(&self, batch: &[Delivery], t: u64) -> Request {
        let body = Body {
            events: batch
                .iter()
                .map(|d| BodyEvent {
                    idempotency_key: d.idempotency_key(),
                    destination: &d.destination,
                    name: &d.name,
                    event: &d.event,
                    routed_at: d.routed_at,
                })
                .collect(),
        };
        let body = serde_json::to_vec(&body).expect("events serialise to JSON");
        let sig = signature(self.settings.secret.expose().as_bytes(), t, &body);
        let headers = vec![
            ("Content-Type".into(), "application/json".into()),
            (SIGNATURE_HEADER.into(), sig),
            ("Idempotency-Key".into(), idempotency_header(batch)),
        ];
        Request::post("events", &self.settings.url, headers, body, 0..batch.len())
    }
}

impl Destination for Webhook {
    fn limits(&self) -> Limits {
        Limits {
            max_events: 1000,
            max_bytes: 5 * 1024 * 1024,
            max_event_age: None,
        }
    }

    fn vendor_dedup(&self) -> bool {
        false
    }

    fn map(&self, batch: &[Delivery]) -> Vec<Request> {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        vec![self.request(batch, t)]
    }

    fn classify(&self, request: &Request, response: &Response, batch: &[Delivery]) -> Classified {
        let refused = serde_json::from_slice::<Refusals>(&response.body)
            .map(|r| r.errors)
            .unwrap_or_default();
        let partial = !refused.is_empty() && matches!(response.status, 200..=299 | 400 | 422);
        if !partial {
            let all = retry::by_status(response, SystemTime::now()).unwrap_or(Outcome::Delivered);
            return Classified::all(request, response, all);
        }
        let rows = request
            .deliveries(batch)
            .map(|d| {
                match refused
                    .iter()
                    .find(|r| r.idempotency_key == d.idempotency_key())
                {
                    Some(r) if r.retryable => Outcome::Retry {
                        after: None,
                        reason: format!("receiver: {}", r.reason),
                    },
                    Some(r) => Outcome::Rejected {
                        class: "webhook_refused".into(),
                        reason: format!("receiver (HTTP {}): {}", response.status, r.reason),
                    },
                    None if response.status < 300 => Outcome::Delivered,
                    // The receiver took nothing; the rest go again at once.
                    None => Outcome::Resend,
                }
            })
            .collect();
        Classified::rows(response, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::test_support;

    fn hook() -> Webhook {
        Webhook::new(Settings {
            url: "https://example.com/hook".into(),
            secret: Secret::new("0123456789abcdef"),
        })
    }

    fn delivery(id: &str) -> Delivery {
        let event = serde_json::json!({
            "event": "purchase", "event_id": id, "occurred_at": "2026-11-26T14:03:11Z",
            "user_id": "u_1", "value": 10.0, "currency": "EUR"
        });
        test_support::delivery("hook", "purchase", event, serde_json::json!({}))
    }

    fn response(status: u16, body: &str) -> Response {
        Response {
            status,
            headers: vec![],
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn signature_matches_a_known_vector() {
        // echo -n '1700000000.{}' | openssl dgst -sha256 -hmac 0123456789abcdef
        assert_eq!(
            signature(b"0123456789abcdef", 1_700_000_000, b"{}"),
            "t=1700000000,v1=e4f8e2ecae2295b2ddb2f0b5584c8275e226c0ebe9b3b819e70156bb67122e3e"
        );
    }

    #[test]
    fn request_carries_keys_signature_and_body() {
        let batch = [delivery("e1"), delivery("e2")];
        let r = hook().request(&batch, 1_700_000_000);
        assert_eq!(r.rows, vec![0, 1]);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["events"][0]["idempotency_key"], "e1");
        assert_eq!(body["events"][1]["event"]["event_id"], "e2");
        let header = |n: &str| {
            r.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(
            header(SIGNATURE_HEADER),
            signature(b"0123456789abcdef", 1_700_000_000, &r.body)
        );
        assert!(header("Idempotency-Key").starts_with("batch-"));
        let single = hook().request(&batch[..1], 1);
        assert!(
            single
                .headers
                .contains(&("Idempotency-Key".into(), "e1".into()))
        );
        // The same events always carry the same header.
        assert_eq!(
            idempotency_header(&batch),
            idempotency_header(&[delivery("e1"), delivery("e2")])
        );
    }

    #[test]
    fn whole_batch_outcomes_follow_the_status() {
        let batch = [delivery("e1"), delivery("e2")];
        assert_eq!(
            test_support::classify(&hook(), &response(204, ""), &batch),
            vec![Outcome::Delivered; 2]
        );
        assert!(
            test_support::classify(&hook(), &response(503, "busy"), &batch)
                .iter()
                .all(|o| matches!(o, Outcome::Retry { .. }))
        );
        assert!(
            test_support::classify(&hook(), &response(401, "who"), &batch)
                .iter()
                .all(|o| matches!(o, Outcome::Rejected { class, .. } if class == "http_401"))
        );
    }

    #[test]
    fn partial_refusals_touch_only_the_listed_events() {
        let batch = [delivery("e1"), delivery("e2"), delivery("e3")];
        let body = r#"{"errors":[{"idempotency_key":"e2","reason":"bad value"},{"idempotency_key":"e3","reason":"later","retryable":true}]}"#;
        let o = test_support::classify(&hook(), &response(400, body), &batch);
        // The receiver took nothing: e1 goes again without costing an attempt.
        assert_eq!(o[0], Outcome::Resend);
        assert!(
            matches!(&o[1], Outcome::Rejected { class, reason } if class == "webhook_refused" && reason.contains("bad value"))
        );
        assert!(matches!(&o[2], Outcome::Retry { after: None, .. }));
        let o = test_support::classify(&hook(), &response(200, body), &batch);
        assert_eq!(o[0], Outcome::Delivered);
        assert!(matches!(&o[1], Outcome::Rejected { .. }));
    }
}
