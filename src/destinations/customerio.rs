//! Customer.io Track API (`type = "customerio"`).
//!
//! Known people go to `POST {host}/api/v2/batch` as `{"batch": [op, …]}`,
//! each op `{"type": "person", "identifiers": {"id"|"email": …}, "action":
//! "identify"|"event", …}`. People known only by an anonymous id go to
//! `POST {host}/api/v1/events` one event per request (`{name, anonymous_id,
//! id, timestamp, data}`): the v2 person identifiers are `id`, `email`,
//! `phone` or `cio_id` only. Host by `region`: `https://track.customer.io`
//! or `https://track-eu.customer.io` (`base_url` overrides both, for
//! tests). Auth: HTTP Basic, `site_id:api_key`.
//!
//! Checked in Customer.io's own material (December 2026): its published
//! OpenAPI document for the Track API (docs.customer.io/files/journeys-track.json,
//! rendered at docs.customer.io/integrations/api/track/ and
//! docs.customer.io/integrations/api/track/tag/track_v2/):
//! - servers `https://track.customer.io` and `https://track-eu.customer.io`,
//!   "basic authentication with your Site ID as the user name and your
//!   secret key as the password".
//! - `/api/v2/batch`: "Your batch request must be smaller than 500kb. Each of
//!   the requests within the batch must also be 32kb or smaller." 200 is
//!   success; 207 "At least one object in the batch was invalid; all other
//!   requests are accepted", body `{"errors": [{"batch_index", "reason",
//!   "field", "message"}]}` with `batch_index` "the 0-indexed position of the
//!   failing object"; 400 "The entire request was malformed or invalid"
//!   (`{"errors": [{reason, field, message}]}`); 401 unauthorised.
//! - `person_common`: `identifiers` is one of `id`, `email`, `phone`,
//!   `cio_id`: "You cannot pass multiple identifiers"; `email` only when the
//!   workspace has email identifiers on.
//! - `person_event`: `name` required, `id` "A valid ULID used to deduplicate
//!   events", `timestamp` "The Unix timestamp when the event happened"
//!   (integer seconds), `attributes`. `identify_person`: `attributes`,
//!   `timestamp` (integer seconds).
//! - `/api/v1/events` ("Track an anonymous event"): `anonymous_id`, `name`,
//!   `id` (ULID: "If an event repeats a value we've already received, we
//!   ignore the duplicate"), `timestamp`, `data`; 400 `{"meta": {"errors":
//!   [..]}}`. "When you identify a person, you can set their `anonymous_id`
//!   attribute … we associate those events with the person. If you
//!   associate an event with a person within 72 hours of the timestamp on
//!   the event, you can trigger campaigns from the event."
//! - "Rate Limits": 1000 requests per second, "not strictly enforced";
//!   limits: person ID 150 bytes, event name 100 bytes, event data 100000
//!   bytes (v1).
//!
//! Not in those pages, so decided here: whether ops of one batch are applied
//! in order (nothing says they are, so a person's identify travels in a
//! request before the request with their events); which status answers a
//! body over 500 KB (413 is read as "split", as for every vendor); what
//! Customer.io does with the time part of an event's ULID (nothing is said;
//! it is the event's own time here, so the id is a pure function of the
//! event); the dedup window (not stated).
//!
//! Mapping: the person identifier is the first of `identify_by` (`id` =
//! user_id, `email` = the raw email, only with `raw_contact = true`) the
//! event has. Identify → `identify` with traits as attributes (plus email
//! and phone when the router let them through) and `anonymous_id`, which
//! merges the anonymous events into the person. Other events → `event` with
//! `id` = [`event_ulid`] of the event id. Events older than 72 h are still
//! sent (the profile keeps them) and counted in
//! `switchyard_customerio_untriggered_events_total`: they start no campaign.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use prometheus::{IntCounterVec, register_int_counter_vec};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::names::NamePreset;
use super::shared;
use super::{Contact, Kind, Spec};
use crate::delivery::Delivery;
use crate::event::EventName;
use crate::event::normalize::{EmailRule, PhoneFormat};
use crate::settings::{Problem, Secret, check_url, reporter};
use crate::sink::destination::{
    Classified, Destination, Limits, Outcome, Refusal, Request, Response,
};
use crate::sink::retry;

/// `/api/v2/batch`: "must be smaller than 500kb" (read as 500 000 bytes, the
/// smaller reading).
pub const MAX_BODY_BYTES: usize = 500_000;
/// Each op of a batch: "32kb or smaller".
pub const MAX_OP_BYTES: usize = 32_000;
/// Customer.io states no count limit; the byte limit binds long before.
pub const MAX_OPS: usize = 1000;
/// Person ID: 150 bytes.
pub const MAX_ID_BYTES: usize = 150;
/// Event name: 100 bytes.
pub const MAX_NAME_BYTES: usize = 100;
/// `/api/v1/events` event data: 100000 bytes.
pub const MAX_V1_DATA_BYTES: usize = 100_000;
/// Events associated with a person later than this after their timestamp
/// trigger no campaign.
pub const CAMPAIGN_WINDOW: Duration = Duration::from_secs(72 * 3600);

/// Events delivered too late to trigger a campaign, by destination.
static UNTRIGGERED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "switchyard_customerio_untriggered_events_total",
        "Events delivered to Customer.io more than 72 h after they occurred: stored on the profile, but they trigger no campaign",
        &["destination"]
    )
    .expect("metric registers once")
});

/// A CRM: marketing consent, raw email only when the destination says so.
pub const SPEC: Spec = Spec {
    type_name: "customerio",
    kind: Kind::Crm,
    contact: Contact::RawWhenConfigured,
    email: EmailRule::Plain,
    phone: PhoneFormat::E164,
    // Attributes are set in arrival order; a retried older identify must not
    // land after a newer one.
    ordering: true,
};

/// Customer.io's two data centres.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Region {
    Us,
    Eu,
}

/// A person identifier Customer.io takes in `identifiers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Identifier {
    /// The publisher's user_id.
    Id,
    /// The raw email (needs `raw_contact = true` and email identifiers on in
    /// the workspace).
    Email,
}

fn by_id() -> Vec<Identifier> {
    vec![Identifier::Id]
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The starting names: "retail" (default) or "saas" (`names.rs`).
    #[serde(default)]
    pub preset: NamePreset,
    /// The workspace's Site ID (the Basic auth user name).
    pub site_id: String,
    /// The Track API key (the Basic auth password).
    pub api_key: Secret,
    /// "us" or "eu"; required unless `base_url` is set.
    pub region: Option<Region>,
    /// A test fake: overrides `region`.
    pub base_url: Option<String>,
    /// Which identifier names a person, in order of preference: the first
    /// the event has is used (Customer.io takes exactly one per op).
    #[serde(default = "by_id")]
    pub identify_by: Vec<Identifier>,
}

impl Settings {
    /// What types cannot say; each problem is named under `key`.
    pub fn check(&self, key: &str, problems: &mut Vec<Problem>) {
        let mut bad = reporter(key, problems);
        if self.site_id.trim().is_empty() {
            bad("site_id", "must be the workspace's Site ID".into());
        }
        if self.api_key.expose().trim().is_empty() {
            bad("api_key", "must be the workspace's Track API key".into());
        }
        match &self.base_url {
            Some(u) => {
                if let Err(why) = check_url(u) {
                    bad("base_url", why);
                }
            }
            None if self.region.is_none() => bad("region", "must be \"us\" or \"eu\"".into()),
            None => {}
        }
        if self.identify_by.is_empty() {
            bad(
                "identify_by",
                "must name at least one of \"id\", \"email\"".into(),
            );
        } else if self
            .identify_by
            .iter()
            .enumerate()
            .any(|(i, x)| self.identify_by[..i].contains(x))
        {
            bad("identify_by", "names an identifier twice".into());
        }
    }

    /// The setting that needs `raw_contact = true`, if any: identifying
    /// people by email sends the raw address.
    pub fn needs_raw_contact(&self) -> Option<&'static str> {
        self.identify_by
            .contains(&Identifier::Email)
            .then_some("identify_by")
    }

    /// The preset's names (Segment-style, which Customer.io's own Data
    /// Pipelines templates use); identify is an `identify` op, not an event.
    pub fn preset_name<'a>(&self, event: &'a EventName) -> Option<&'a str> {
        match event {
            EventName::Identify => Some("identify"),
            other => self.preset.name(other),
        }
    }
}

pub struct Customerio {
    settings: Settings,
    batch_url: String,
    anonymous_url: String,
    auth: String,
}

/// Where one row goes.
enum Op {
    /// A v2 batch op (identify or event) for a known person.
    Batch { identify: bool, op: Value },
    /// A v1 anonymous event.
    Anonymous(Value),
}

impl Customerio {
    pub fn new(settings: Settings) -> Self {
        let host = match (&settings.base_url, settings.region) {
            (Some(u), _) => u.trim_end_matches('/').to_string(),
            (None, Some(Region::Eu)) => "https://track-eu.customer.io".into(),
            // `check` refuses a config with neither.
            (None, _) => "https://track.customer.io".into(),
        };
        let credentials = format!("{}:{}", settings.site_id, settings.api_key.expose());
        let auth = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        );
        Customerio {
            batch_url: format!("{host}/api/v2/batch"),
            anonymous_url: format!("{host}/api/v1/events"),
            settings,
            auth,
        }
    }

    /// The person identifier for `d`, as `identifiers` takes it.
    fn identifiers(&self, d: &Delivery) -> Option<Value> {
        let ev = &d.event;
        self.settings.identify_by.iter().find_map(|i| match i {
            Identifier::Id => ev.user_id.as_ref().map(|u| json!({ "id": u })),
            // Present only when the router gave this destination raw contact.
            Identifier::Email => ev.email.as_ref().map(|e| json!({ "email": e })),
        })
    }

    fn op(&self, d: &Delivery) -> Option<Op> {
        let ev = &d.event;
        let timestamp = ev.occurred_at.timestamp();
        let identify = ev.event == EventName::Identify;
        match self.identifiers(d) {
            Some(identifiers) if identify => {
                let mut attributes = ev.traits.clone().unwrap_or_default();
                if let Some(e) = &ev.email {
                    attributes.insert("email".into(), json!(e));
                }
                if let Some(p) = &ev.phone {
                    attributes.insert("phone".into(), json!(p));
                }
                // Customer.io associates the anonymous events bearing this
                // value with the person.
                if let Some(a) = &ev.anonymous_id {
                    attributes.insert("anonymous_id".into(), json!(a));
                }
                Some(Op::Batch {
                    identify: true,
                    op: json!({
                        "type": "person", "identifiers": identifiers, "action": "identify",
                        "timestamp": timestamp, "attributes": attributes,
                    }),
                })
            }
            Some(identifiers) => Some(Op::Batch {
                identify: false,
                op: json!({
                    "type": "person", "identifiers": identifiers, "action": "event",
                    "name": d.name, "id": event_ulid(&ev.event_id, ev.occurred_at),
                    "timestamp": timestamp, "attributes": attributes(d),
                }),
            }),
            // An anonymous identify has nobody to set attributes on.
            None if identify => None,
            None => ev.anonymous_id.as_ref().map(|a| {
                Op::Anonymous(json!({
                    "name": d.name, "anonymous_id": a,
                    "id": event_ulid(&ev.event_id, ev.occurred_at),
                    "timestamp": timestamp, "data": attributes(d),
                }))
            }),
        }
    }

    fn headers(&self) -> Vec<(String, String)> {
        vec![
            ("Content-Type".into(), "application/json".into()),
            ("Authorization".into(), self.auth.clone()),
        ]
    }
}

/// An event's attributes: the publisher's properties, then what switchyard
/// derives (which wins).
fn attributes(d: &Delivery) -> Map<String, Value> {
    let ev = &d.event;
    let mut a = ev.properties.clone().unwrap_or_default();
    shared::commerce_properties(ev, "value", &mut a);
    if let Some(u) = ev.context.as_ref().and_then(|c| c.page_url.as_ref()) {
        a.insert("url".into(), json!(u));
    }
    a
}

/// The ULID (github.com/ulid/spec) of an event: its 48-bit millisecond time
/// from `occurred_at`, its 80 "random" bits from SHA-256 of the event id, so
/// a resend carries the same id and Customer.io drops it.
pub fn event_ulid(event_id: &str, occurred_at: DateTime<Utc>) -> String {
    let ms = u64::try_from(occurred_at.timestamp_millis())
        .unwrap_or(0)
        .min((1 << 48) - 1);
    let digest = Sha256::digest(format!("switchyard/customerio/{event_id}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    bytes[6..].copy_from_slice(&digest[..10]);
    ulid_text(u128::from_be_bytes(bytes))
}

/// Crockford base32, 26 characters, most significant first.
fn ulid_text(n: u128) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    (0..26)
        .rev()
        .map(|i| char::from(ALPHABET[((n >> (i * 5)) & 31) as usize]))
        .collect()
}

#[derive(Serialize)]
struct Envelope {
    /// Empty: `shared::wrap` puts the ops inside.
    batch: [(); 0],
}

/// One op of a 207's `errors`.
#[derive(Deserialize)]
struct OpError {
    batch_index: Option<usize>,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    field: String,
}

#[derive(Deserialize)]
struct Errors {
    #[serde(default)]
    errors: Vec<OpError>,
}

impl Customerio {
    /// `classify` at `now`: the outcomes, and how many delivered rows are
    /// events too old to trigger a campaign.
    pub fn classify_at(
        &self,
        request: &Request,
        response: &Response,
        batch: &[Delivery],
        now: SystemTime,
    ) -> (Classified, usize) {
        let classified = self.outcomes(request, response, now);
        let now: DateTime<Utc> = now.into();
        let late = request
            .rows
            .iter()
            .zip(&classified.rows)
            .filter(|(r, o)| {
                **o == Outcome::Delivered
                    && batch.get(**r).is_some_and(|d| {
                        d.event.event != EventName::Identify
                            && (now - d.event.occurred_at)
                                .to_std()
                                .is_ok_and(|age| age > CAMPAIGN_WINDOW)
                    })
            })
            .count();
        (classified, late)
    }

    fn outcomes(&self, request: &Request, response: &Response, now: SystemTime) -> Classified {
        let text = || crate::redact::redacted(retry::excerpt(&response.body, 300));
        let outcome = match response.status {
            207 if request.endpoint == "batch" => return partial(request, response),
            400 => Outcome::Rejected {
                class: "customerio_invalid_request".into(),
                reason: format!("Customer.io (HTTP 400): {}", text()),
            },
            401 | 403 => Outcome::Rejected {
                class: "customerio_auth".into(),
                reason: format!(
                    "Customer.io refused the Site ID and API key (HTTP {})",
                    response.status
                ),
            },
            _ => retry::by_status(response, now).unwrap_or(Outcome::Delivered),
        };
        Classified::all(request, response, outcome)
    }
}

/// A 207: the ops named by `batch_index` failed, the others were accepted.
fn partial(request: &Request, response: &Response) -> Classified {
    let Ok(body) = serde_json::from_slice::<Errors>(&response.body) else {
        // Which ops failed is unknown: all go again (event ids dedup them).
        return Classified::all(
            request,
            response,
            Outcome::Retry {
                after: None,
                reason: "Customer.io answered 207 without a readable errors list".into(),
            },
        );
    };
    let mut rows = vec![Outcome::Delivered; request.rows.len()];
    for e in body.errors {
        // The message may repeat the offending value (an email): only the
        // reason and the field name are kept.
        if let Some(slot) = e.batch_index.and_then(|i| rows.get_mut(i)) {
            let reason = format!(
                "Customer.io refused this op: {} ({})",
                retry::cut(&e.reason, 100),
                retry::cut(&e.field, 100)
            );
            *slot = match slot {
                Outcome::Rejected { reason: r, .. } => Outcome::Rejected {
                    class: "customerio_invalid".into(),
                    reason: format!("{r}; {reason}"),
                },
                _ => Outcome::Rejected {
                    class: "customerio_invalid".into(),
                    reason,
                },
            };
        }
    }
    Classified::rows(response, rows)
}

impl Destination for Customerio {
    fn limits(&self) -> Limits {
        Limits {
            max_events: MAX_OPS,
            max_bytes: MAX_BODY_BYTES,
            // Old events are taken (they only trigger no campaign).
            max_event_age: None,
        }
    }

    fn refuse(&self, d: &Delivery) -> Option<Refusal> {
        let Some(op) = self.op(d) else {
            return Some(Refusal {
                class: "customerio_no_identifier",
                reason: format!(
                    "no {} to name the person by (identify_by) and no anonymous id",
                    self.settings
                        .identify_by
                        .iter()
                        .map(|i| match i {
                            Identifier::Id => "user id",
                            Identifier::Email => "email",
                        })
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            });
        };
        if d.event
            .user_id
            .as_ref()
            .is_some_and(|u| u.len() > MAX_ID_BYTES)
        {
            return Some(Refusal {
                class: "customerio_id_too_long",
                reason: format!("the user id is over Customer.io's {MAX_ID_BYTES} bytes"),
            });
        }
        if d.event.event != EventName::Identify && d.name.len() > MAX_NAME_BYTES {
            return Some(Refusal {
                class: "customerio_name_too_long",
                reason: format!("the event name is over Customer.io's {MAX_NAME_BYTES} bytes"),
            });
        }
        let (size, max, what) = match &op {
            Op::Batch { op, .. } => (
                serde_json::to_vec(op).map_or(0, |v| v.len()),
                MAX_OP_BYTES,
                "a batch op",
            ),
            Op::Anonymous(e) => (
                serde_json::to_vec(&e["data"]).map_or(0, |v| v.len()),
                MAX_V1_DATA_BYTES,
                "an anonymous event's data",
            ),
        };
        (size > max).then(|| Refusal {
            class: "customerio_too_large",
            reason: format!("{size} bytes as sent; Customer.io takes {what} of up to {max} bytes"),
        })
    }

    fn vendor_dedup(&self) -> bool {
        // Events dedup on their ULID, but identify ops carry no id: a late
        // resend would set old attributes again, so the ledger still checks.
        false
    }

    fn map(&self, batch: &[Delivery]) -> Vec<Request> {
        let headers = self.headers();
        let mut anonymous = Vec::new();
        let (mut identifies, mut events): (Vec<(usize, Vec<u8>)>, _) = (Vec::new(), Vec::new());
        for (i, d) in batch.iter().enumerate() {
            match self.op(d) {
                Some(Op::Batch { identify, op }) => {
                    let bytes = serde_json::to_vec(&op).expect("ops serialise");
                    if identify {
                        identifies.push((i, bytes));
                    } else {
                        events.push((i, bytes));
                    }
                }
                Some(Op::Anonymous(e)) => anonymous.push((i, e)),
                // `refuse` kept such rows out.
                None => {}
            }
        }
        // Anonymous events first, so the identify that merges them finds
        // them; then identifies, in a request before the events (nothing
        // says a batch is applied in order).
        let mut out: Vec<Request> = anonymous
            .into_iter()
            .map(|(i, e)| {
                Request::post(
                    "anonymous_event",
                    &self.anonymous_url,
                    headers.clone(),
                    serde_json::to_vec(&e).expect("events serialise"),
                    [i],
                )
            })
            .collect();
        let envelope =
            serde_json::to_vec(&Envelope { batch: [] }).expect("the envelope serialises");
        for group in [identifies, events] {
            let (rows, ops): (Vec<usize>, Vec<Vec<u8>>) = group.into_iter().unzip();
            for range in shared::pack(&ops, envelope.len(), MAX_OPS, MAX_BODY_BYTES) {
                out.push(Request::post(
                    "batch",
                    &self.batch_url,
                    headers.clone(),
                    shared::wrap(&envelope, &ops[range.clone()]),
                    rows[range].iter().copied(),
                ));
            }
        }
        out
    }

    fn classify(&self, request: &Request, response: &Response, batch: &[Delivery]) -> Classified {
        let (classified, late) = self.classify_at(request, response, batch, SystemTime::now());
        if late > 0
            && let Some(d) = request.rows.first().and_then(|&r| batch.get(r))
        {
            UNTRIGGERED
                .with_label_values(&[d.destination.as_str()])
                .inc_by(late as u64);
        }
        classified
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::test_support::{self, body, ok};

    fn settings() -> Settings {
        Settings {
            preset: NamePreset::Retail,
            site_id: "site-1".into(),
            api_key: Secret::new("key-1"),
            region: Some(Region::Us),
            base_url: None,
            identify_by: vec![Identifier::Id],
        }
    }

    fn cio() -> Customerio {
        Customerio::new(settings())
    }

    fn delivery(name: &str, extra: Value) -> Delivery {
        let ev = json!({
            "event": "purchase", "event_id": "e1", "occurred_at": "2026-11-26T14:03:11Z",
            "user_id": "u_1", "anonymous_id": "anon-1", "value": 49.5, "currency": "EUR",
            "order_id": "o-1",
            "items": [{"id": "sku-1", "name": "Shoe", "price": 24.75, "quantity": 2}],
            "context": {"page_url": "https://shop.example/checkout"},
            "properties": {"plan": "pro"}
        });
        test_support::delivery("customerio", name, ev, extra)
    }

    fn identify(extra: Value) -> Delivery {
        let mut base = json!({"event": "identify", "event_id": "i1", "traits": {"plan": "pro"},
                              "value": null, "currency": null, "order_id": null, "items": null,
                              "properties": null, "context": null});
        if let (Some(b), Value::Object(x)) = (base.as_object_mut(), extra) {
            b.extend(x);
        }
        delivery("identify", base)
    }

    fn response(status: u16, text: &str) -> Response {
        Response {
            status,
            headers: vec![],
            body: text.as_bytes().to_vec(),
        }
    }

    fn at(s: &str) -> SystemTime {
        s.parse::<DateTime<Utc>>().expect("a time").into()
    }

    #[test]
    fn ulids_are_deterministic_and_carry_the_event_time() {
        // Computed with an independent Python encoder of the ULID spec.
        let t: DateTime<Utc> = "2026-11-26T14:03:11Z".parse().unwrap();
        assert_eq!(event_ulid("e1", t), "01M8C2NP8RJYKBFBNT4N3K0B6B");
        assert_eq!(event_ulid("e1", t), event_ulid("e1", t));
        assert_ne!(event_ulid("e2", t), event_ulid("e1", t));
        // The ulid/javascript README's example time, 1469918176385 ms.
        assert_eq!(
            ulid_text(1_469_918_176_385u128 << 80),
            "01ARYZ6S410000000000000000"
        );
        assert_eq!(ulid_text(u128::MAX), "7ZZZZZZZZZZZZZZZZZZZZZZZZZ");
        // Before 1970: time 0, never a panic.
        let old: DateTime<Utc> = "1969-01-01T00:00:00Z".parse().unwrap();
        assert!(event_ulid("e1", old).starts_with("0000000000"));
    }

    #[test]
    fn urls_and_basic_auth_follow_the_settings() {
        let c = cio();
        assert_eq!(c.batch_url, "https://track.customer.io/api/v2/batch");
        assert_eq!(c.anonymous_url, "https://track.customer.io/api/v1/events");
        // base64("site-1:key-1")
        assert_eq!(c.auth, "Basic c2l0ZS0xOmtleS0x");
        let mut s = settings();
        s.region = Some(Region::Eu);
        assert_eq!(
            Customerio::new(s.clone()).batch_url,
            "https://track-eu.customer.io/api/v2/batch"
        );
        s.base_url = Some("http://127.0.0.1:9/".into());
        assert_eq!(
            Customerio::new(s).batch_url,
            "http://127.0.0.1:9/api/v2/batch"
        );
    }

    #[test]
    fn settings_are_checked() {
        let ok = "site_id = \"s\"\napi_key = \"k\"\nregion = \"eu\"";
        assert!(test_support::vendor("customerio", "destinations.c", ok).is_ok());
        let p = test_support::vendor(
            "customerio",
            "destinations.c",
            "site_id = \"\"\napi_key = \"secret-key\"\nidentify_by = [\"id\", \"id\"]",
        )
        .unwrap_err();
        let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "destinations.c.site_id",
                "destinations.c.region",
                "destinations.c.identify_by"
            ]
        );
        assert!(p.iter().all(|p| !p.message.contains("secret-key")));
        assert!(
            test_support::vendor(
                "customerio",
                "d",
                "site_id = \"s\"\napi_key = \"k\"\nregion = \"asia\""
            )
            .is_err()
        );
        assert!(
            test_support::vendor(
                "customerio",
                "d",
                "site_id = \"s\"\napi_key = \"k\"\nregion = \"us\"\nidentify_by = [\"phone\"]"
            )
            .is_err()
        );
        let mut s = settings();
        assert_eq!(s.needs_raw_contact(), None);
        s.identify_by = vec![Identifier::Id, Identifier::Email];
        assert_eq!(s.needs_raw_contact(), Some("identify_by"));
    }

    #[test]
    fn presets_and_policy() {
        let s = settings();
        assert_eq!(s.preset_name(&EventName::Purchase), Some("Order Completed"));
        assert_eq!(s.preset_name(&EventName::Identify), Some("identify"));
        assert_eq!(SPEC.default_consent(), Some("marketing"));
        assert!(!SPEC.hashes_only());
        const { assert!(SPEC.ordering) };
    }

    #[test]
    fn events_go_as_v2_event_ops_with_ulid_and_unix_seconds() {
        let reqs = cio().map(&[delivery("Order Completed", json!({}))]);
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].endpoint, "batch");
        assert_eq!(
            body(&reqs[0]),
            json!({"batch": [{
                "type": "person", "identifiers": {"id": "u_1"}, "action": "event",
                "name": "Order Completed", "id": "01M8C2NP8RJYKBFBNT4N3K0B6B",
                "timestamp": 1_795_701_791,
                "attributes": {
                    "plan": "pro", "value": 49.5, "currency": "EUR", "order_id": "o-1",
                    "products": [{"product_id": "sku-1", "name": "Shoe", "price": 24.75, "quantity": 2}],
                    "url": "https://shop.example/checkout"
                }
            }]})
        );
        assert!(
            reqs[0]
                .headers
                .contains(&("Authorization".into(), "Basic c2l0ZS0xOmtleS0x".into()))
        );
    }

    #[test]
    fn identifies_travel_before_events_and_merge_the_anonymous_id() {
        let batch = [
            delivery("Order Completed", json!({})),
            identify(json!({})),
            delivery("Product Viewed", json!({"event_id": "e0", "user_id": null})),
        ];
        let reqs = cio().map(&batch);
        let rows: Vec<(&str, Vec<usize>)> =
            reqs.iter().map(|r| (r.endpoint, r.rows.clone())).collect();
        assert_eq!(
            rows,
            [
                ("anonymous_event", vec![2]),
                ("batch", vec![1]),
                ("batch", vec![0])
            ]
        );
        assert_eq!(reqs[0].url, "https://track.customer.io/api/v1/events");
        let anon = body(&reqs[0]);
        assert_eq!(anon["anonymous_id"], "anon-1");
        assert_eq!(anon["name"], "Product Viewed");
        assert_eq!(anon["data"]["plan"], "pro");
        let ident = &body(&reqs[1])["batch"][0];
        assert_eq!(ident["action"], "identify");
        assert_eq!(ident["identifiers"], json!({"id": "u_1"}));
        assert_eq!(
            ident["attributes"],
            json!({"plan": "pro", "anonymous_id": "anon-1"})
        );
    }

    #[test]
    fn raw_contact_is_sent_only_as_the_router_passed_it() {
        // Without raw_contact the router leaves email out: none is sent.
        let d = identify(json!({"email_sha256": "a".repeat(64)}));
        let text = String::from_utf8(cio().map(&[d])[0].body.clone()).unwrap();
        assert!(
            !text.contains("sha256") && !text.contains(&"a".repeat(64)),
            "{text}"
        );
        // With it, email is an attribute, and may be the identifier.
        let d = identify(json!({"email": "jo@example.com", "user_id": null}));
        let mut s = settings();
        assert!(cio().refuse(&d).is_some(), "by id only: nobody to identify");
        s.identify_by = vec![Identifier::Id, Identifier::Email];
        let b = body(&Customerio::new(s).map(&[d])[0]);
        assert_eq!(
            b["batch"][0]["identifiers"],
            json!({"email": "jo@example.com"})
        );
        assert_eq!(b["batch"][0]["attributes"]["email"], "jo@example.com");
    }

    #[test]
    fn refusals_name_what_customerio_would_refuse() {
        let c = cio();
        assert_eq!(c.refuse(&delivery("Order Completed", json!({}))), None);
        let anon_identify = identify(json!({"user_id": null}));
        assert_eq!(
            c.refuse(&anon_identify).unwrap().class,
            "customerio_no_identifier"
        );
        let long_id = delivery("x", json!({"user_id": "u".repeat(151)}));
        assert_eq!(c.refuse(&long_id).unwrap().class, "customerio_id_too_long");
        let long_name = delivery(&"n".repeat(101), json!({}));
        assert_eq!(
            c.refuse(&long_name).unwrap().class,
            "customerio_name_too_long"
        );
        let big = delivery(
            "x",
            json!({"properties": {"blob": "y".repeat(MAX_OP_BYTES)}}),
        );
        let r = c.refuse(&big).unwrap();
        assert_eq!(r.class, "customerio_too_large");
        // A v1 anonymous event may carry up to 100000 bytes of data.
        let anon = delivery(
            "x",
            json!({"user_id": null, "properties": {"blob": "y".repeat(MAX_OP_BYTES)}}),
        );
        assert_eq!(c.refuse(&anon), None);
    }

    #[test]
    fn requests_stay_under_500_kb() {
        let batch: Vec<Delivery> = (0..40)
            .map(|i| delivery("x", json!({"event_id": format!("e{i}"), "properties": {"blob": "y".repeat(20_000)}})))
            .collect();
        let reqs = cio().map(&batch);
        assert!(reqs.len() >= 2);
        assert!(reqs.iter().all(|r| r.body.len() <= MAX_BODY_BYTES));
        assert_eq!(reqs.iter().map(|r| r.rows.len()).sum::<usize>(), 40);
    }

    /// Answers as Customer.io's OpenAPI document describes them, and what
    /// each means for every row of the request.
    #[test]
    fn recorded_answers_classify() {
        let batch = [
            delivery("x", json!({})),
            delivery("y", json!({"event_id": "e2"})),
            delivery("z", json!({"event_id": "e3"})),
        ];
        let rejected = |class: &'static str| move |o: &Outcome| matches!(o, Outcome::Rejected { class: c, .. } if c == class);
        let delivered = |o: &Outcome| *o == Outcome::Delivered;
        let retry = |o: &Outcome| matches!(o, Outcome::Retry { .. });
        type Expect = Box<dyn Fn(&Outcome) -> bool>;
        let all = |f: Expect| vec![f];
        let table: Vec<(Response, Vec<Expect>)> = vec![
            (ok(json!({})), all(Box::new(delivered))),
            (response(204, ""), all(Box::new(delivered))),
            (
                response(
                    207,
                    r#"{"errors":[{"batch_index":1,"reason":"invalid","field":"identifiers.email","message":"bad jo@example.com"}]}"#,
                ),
                vec![
                    Box::new(delivered),
                    Box::new(rejected("customerio_invalid")),
                    Box::new(delivered),
                ],
            ),
            (
                response(
                    207,
                    r#"{"errors":[{"batch_index":0,"reason":"invalid","field":"id"},{"batch_index":2,"reason":"invalid","field":"name"},{"batch_index":9}]}"#,
                ),
                vec![
                    Box::new(rejected("customerio_invalid")),
                    Box::new(delivered),
                    Box::new(rejected("customerio_invalid")),
                ],
            ),
            (response(207, "<html>"), all(Box::new(retry))),
            (
                response(
                    400,
                    r#"{"errors":[{"reason":"invalid","field":"batch","message":"jo@example.com is bad"}]}"#,
                ),
                all(Box::new(rejected("customerio_invalid_request"))),
            ),
            (
                response(401, ""),
                all(Box::new(rejected("customerio_auth"))),
            ),
            (
                response(403, ""),
                all(Box::new(rejected("customerio_auth"))),
            ),
            (response(413, ""), all(Box::new(|o| *o == Outcome::Split))),
            (response(429, ""), all(Box::new(retry))),
            (response(500, "oops"), all(Box::new(retry))),
            (response(503, ""), all(Box::new(retry))),
        ];
        for (resp, expect) in table {
            let got = test_support::classify(&cio(), &resp, &batch);
            for (i, o) in got.iter().enumerate() {
                let e = &expect[i.min(expect.len() - 1)];
                assert!(e(o), "HTTP {} row {i}: {got:?}", resp.status);
                if let Outcome::Rejected { reason, .. } = o {
                    assert!(!reason.contains("jo@example.com"), "{reason}");
                }
            }
        }
        assert!(test_support::throttle(&cio(), &response(429, ""), &batch));
        assert!(!test_support::throttle(&cio(), &response(503, ""), &batch));
    }

    #[test]
    fn events_past_the_campaign_window_are_delivered_and_counted() {
        let batch = [
            delivery("x", json!({})),
            delivery(
                "y",
                json!({"event_id": "e2", "occurred_at": "2026-11-20T00:00:00Z"}),
            ),
            identify(json!({"occurred_at": "2026-11-01T00:00:00Z"})),
        ];
        let c = cio();
        let now = at("2026-11-27T00:00:00Z");
        let mut late = 0;
        for req in c.map(&batch) {
            let (classified, n) = c.classify_at(&req, &ok(json!({})), &batch, now);
            assert!(classified.rows.iter().all(|o| *o == Outcome::Delivered));
            late += n;
        }
        // The 7-day-old event; an identify triggers nothing either way.
        assert_eq!(late, 1);
        // A refused old event is not counted.
        let req = &c.map(&batch[1..2])[0];
        let (_, n) = c.classify_at(req, &response(400, "{}"), &batch[1..2], now);
        assert_eq!(n, 0);
    }
}
