//! Mixpanel (`type = "mixpanel"`): events through the Import API, profiles
//! through the Engage API.
//!
//! Every wire detail below was checked against Mixpanel's own documentation
//! (the `mixpanel/docs` repository behind docs.mixpanel.com, and Mixpanel's
//! official Python library where the docs are silent); the page for each is
//! named in docs/destinations/mixpanel.md, "What was verified where".
//!
//! **Events**: `POST {host}/import?strict=1[&project_id=N]`, a JSON array of
//! `{"event", "properties": {time, distinct_id, $insert_id, …}}`; at most
//! 2000 events and 10 MB uncompressed per request, 1 MB per event, fewer
//! than 255 properties per event (reference/import-events). HTTP Basic auth:
//! a service account (`username:secret`, with `project_id` in the query), or
//! the deprecated project API secret as the user with an empty password (and
//! no `project_id`: openapi/identity.openapi.yaml "do not provide if using
//! secret auth"). Hosts by data residency (openapi/ingestion.openapi.yaml
//! `servers`, docs/privacy/eu-residency, in-residency): `us` api.mixpanel.com,
//! `eu` api-eu.mixpanel.com, `in` api-in.mixpanel.com.
//!
//! `time` is epoch milliseconds (seconds or milliseconds are taken); Mixpanel
//! rejects times before 1971-01-01 and more than 1 hour ahead of its clock,
//! and has no maximum age on /import, so there is no `max_event_age`.
//! `$insert_id` is the first 36 hex digits of SHA-256("switchyard:" +
//! event_id): ≤ 36 bytes of alphanumerics, as Mixpanel requires, and the same
//! on every resend. `ip` is `context.ip`, else `"0"` (Mixpanel would
//! otherwise geolocate our server's address).
//!
//! **Identity** (`id_merge`, docs/tracking-methods/id-management/…):
//! - `simplified`: events carry `$device_id` (anonymous_id) and `$user_id`
//!   (user_id); `distinct_id` is the user id, else `$device:<anonymous_id>`,
//!   which is what Mixpanel itself would set. The first event with both ids
//!   merges them; an identify is a profile update only.
//! - `original`: `distinct_id` is the user id, else the anonymous id; an
//!   identify also sends `$identify` (`$identified_id`, `$anon_id`) through
//!   /import, which Mixpanel only honours for a UUID v4 `$anon_id`; for any
//!   other anonymous id it sends `$merge` (`$distinct_ids`) instead.
//!
//! **Profiles**: `POST {host}/engage?verbose=1&ip=0`, a JSON array of update
//! objects `{$token, $distinct_id, $time (seconds), $ip, <one operation>}`, at most
//! 2000 per request, 1 MB each (reference/user-profile-limits). An identify
//! with a user id sends `$set` (and `$set_once` for `set_once_traits`), with
//! common traits under Mixpanel's reserved names (`$email`, `$phone`,
//! `$name`, `$first_name`, `$last_name`, `$avatar`, `$created`, `$city`,
//! `$region`, `$country_code`, `$timezone`). The router gives this
//! destination raw email/phone (traits or top-level) only with
//! `raw_contact = true`; it never sends a hash. A purchase with a value and
//! a user id appends `{$amount, $time, …}` to `$transactions`
//! (`$append`, as Mixpanel's libraries' `track_charge` do), unless
//! `transactions = false`.
//!
//! **Answers**: /import 200 `{"code":200,"num_records_imported":N,"status":"OK"}`
//! delivers all; 400 with `failed_records` (`index`, `$insert_id` or
//! `insert_id`, `field`, `message`) rejects exactly those rows and delivers
//! the rest, since "if some events pass validation and others fail, Mixpanel
//! will ingest the events that pass validation"; any other 400, 401 and 403
//! reject; 413 splits; 429 (a throttle, honouring Retry-After) and 5xx retry.
//! /engage answers 200 either way: `{"status":1,"error":null}` delivers, a
//! status 0 rejects the request's rows with Mixpanel's error.
//!
//! **Dedup**: Mixpanel drops events equal in (event, distinct_id, time,
//! $insert_id) (reference/event-deduplication), and every field of those is
//! derived from the event, so a resent event is dropped; `$set`/`$set_once`
//! are idempotent. `$append` is not, so with `transactions` on the sink
//! checks its ledger before sending (`vendor_dedup() == false`).

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, TimeZone, Utc};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::names::NamePreset;
use super::shared::{item_object, pack};
use super::{Contact, Kind, Spec};
use crate::delivery::Delivery;
use crate::event::normalize::{EmailRule, PhoneFormat};
use crate::event::{CanonicalEvent, EventName};
use crate::settings::{Problem, Secret, check_url, reporter};
use crate::sink::destination::{
    Classified, Destination, Limits, Outcome, Refusal, Request, Response,
};
use crate::sink::retry;

/// Events per /import request.
pub const MAX_EVENTS: usize = 2000;
/// Uncompressed bytes per /import request.
pub const MAX_BODY_BYTES: usize = 10 * 1024 * 1024;
/// Uncompressed bytes per event, and per profile update.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// An event must have fewer properties than this.
pub const MAX_PROPERTIES: usize = 255;
/// Profile updates per /engage request.
pub const MAX_UPDATES: usize = 2000;
/// `$insert_id` length in bytes.
pub const INSERT_ID_LEN: usize = 36;
/// How far ahead of Mixpanel's clock an event time may be.
pub const MAX_AHEAD: Duration = Duration::from_secs(3600);
/// Mixpanel rejects event times before 1971-01-01T00:00:00Z.
pub const MIN_TIME_SECS: i64 = 31_536_000;

/// Values Mixpanel refuses as `distinct_id` (and as `$insert_id`), to catch
/// implementation mistakes (reference/import-events).
pub const DISALLOWED_IDS: &[&str] = &[
    "00000000-0000-0000-0000-000000000000",
    "anon",
    "anonymous",
    "nil",
    "none",
    "null",
    "n/a",
    "na",
    "undefined",
    "unknown",
    "<nil>",
    "0",
    "-1",
    "true",
    "false",
    "[]",
    "{}",
];

/// Event properties this module sets; a publisher property of the same
/// name is not copied over them.
const RESERVED_EVENT_PROPERTIES: &[&str] = &[
    "time",
    "distinct_id",
    "$insert_id",
    "$device_id",
    "$user_id",
    "ip",
    "token",
    "$current_url",
    "$referrer",
    "order_id",
    "items",
];

/// Trait names (lower-cased, without `_ - . space` and a leading `$`) and
/// the reserved or default profile property each becomes
/// (docs/data-structure/property-reference/reserved-properties and
/// default-properties).
const PROFILE_TRAITS: &[(&str, &str)] = &[
    ("email", "$email"),
    ("phone", "$phone"),
    ("name", "$name"),
    ("firstname", "$first_name"),
    ("lastname", "$last_name"),
    ("avatar", "$avatar"),
    ("createdat", "$created"),
    ("created", "$created"),
    ("city", "$city"),
    ("region", "$region"),
    ("countrycode", "$country_code"),
    ("timezone", "$timezone"),
];

/// Analytics that builds a profile of the person: nothing without a yes to
/// `analytics`, no hashes (Mixpanel matches no audiences with them), raw
/// email/phone only when the destination sets `raw_contact = true`.
pub const SPEC: Spec = Spec {
    type_name: "mixpanel",
    kind: Kind::Analytics,
    contact: Contact::NoneUnlessConfigured,
    email: EmailRule::Plain,
    phone: PhoneFormat::E164,
    ordering: false,
};

/// Which identity merge API the Mixpanel project uses (Project Settings →
/// Identity Merge).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdMerge {
    Simplified,
    Original,
}

/// How /import requests authenticate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Auth {
    /// A service account's username and secret, with `project_id`.
    #[default]
    ServiceAccount,
    /// The project's API secret as the user, empty password (deprecated by
    /// Mixpanel, retired on 2027-03-03).
    ApiSecret,
}

/// Where the project's data lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Residency {
    #[default]
    Us,
    Eu,
    In,
}

impl Residency {
    pub fn host(self) -> &'static str {
        match self {
            Residency::Us => "https://api.mixpanel.com",
            Residency::Eu => "https://api-eu.mixpanel.com",
            Residency::In => "https://api-in.mixpanel.com",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The starting names: "retail" (default) or "saas" (`names.rs`).
    #[serde(default)]
    pub preset: NamePreset,
    /// The identity merge API of the project: "simplified" or "original".
    pub id_merge: IdMerge,
    #[serde(default)]
    pub auth: Auth,
    /// The numeric project id (service-account auth only).
    pub project_id: Option<String>,
    pub service_account_username: Option<String>,
    pub service_account_secret: Option<Secret>,
    pub api_secret: Option<Secret>,
    /// The project token, which /engage takes in every update (`$token`).
    pub project_token: String,
    #[serde(default)]
    pub residency: Residency,
    /// Overrides the host chosen by `residency` (tests, proxies).
    pub base_url: Option<String>,
    /// The event property that carries `value`.
    #[serde(default = "default_revenue_property")]
    pub revenue_property: String,
    /// The event property that carries `currency`.
    #[serde(default = "default_currency_property")]
    pub currency_property: String,
    /// Append each purchase to the profile's `$transactions`.
    #[serde(default = "yes")]
    pub transactions: bool,
    /// Identify traits set only when the profile has no value yet.
    #[serde(default = "default_set_once_traits")]
    pub set_once_traits: Vec<String>,
}

fn default_revenue_property() -> String {
    "$amount".into()
}
fn default_currency_property() -> String {
    "$currency".into()
}
fn yes() -> bool {
    true
}
fn default_set_once_traits() -> Vec<String> {
    vec!["created_at".into()]
}

impl Settings {
    /// What types cannot say; each problem is named under `key`.
    pub fn check(&self, key: &str, problems: &mut Vec<Problem>) {
        let mut bad = reporter(key, problems);
        match self.auth {
            Auth::ServiceAccount => {
                match &self.project_id {
                    Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {}
                    Some(_) => bad("project_id", "must be the numeric project id".into()),
                    None => bad(
                        "project_id",
                        "is required with auth = \"service_account\"".into(),
                    ),
                }
                if self
                    .service_account_username
                    .as_deref()
                    .is_none_or(|u| u.trim().is_empty())
                {
                    bad(
                        "service_account_username",
                        "is required with auth = \"service_account\"".into(),
                    );
                }
                if self
                    .service_account_secret
                    .as_ref()
                    .is_none_or(|s| s.expose().is_empty())
                {
                    bad(
                        "service_account_secret",
                        "is required with auth = \"service_account\"".into(),
                    );
                }
                if self.api_secret.is_some() {
                    bad(
                        "api_secret",
                        "is only used with auth = \"api_secret\"".into(),
                    );
                }
            }
            Auth::ApiSecret => {
                if self
                    .api_secret
                    .as_ref()
                    .is_none_or(|s| s.expose().is_empty())
                {
                    bad(
                        "api_secret",
                        "is required with auth = \"api_secret\"".into(),
                    );
                }
                for (k, set) in [
                    ("project_id", self.project_id.is_some()),
                    (
                        "service_account_username",
                        self.service_account_username.is_some(),
                    ),
                    (
                        "service_account_secret",
                        self.service_account_secret.is_some(),
                    ),
                ] {
                    if set {
                        bad(
                            k,
                            "is only used with auth = \"service_account\" (Mixpanel wants no project_id with the API secret)".into(),
                        );
                    }
                }
            }
        }
        if self.project_token.trim().is_empty() {
            bad(
                "project_token",
                "must not be empty (profile updates carry it)".into(),
            );
        }
        if let Some(u) = &self.base_url
            && let Err(why) = check_url(u)
        {
            bad("base_url", why);
        }
        for (k, p) in [
            ("revenue_property", &self.revenue_property),
            ("currency_property", &self.currency_property),
        ] {
            if p.trim().is_empty() || RESERVED_EVENT_PROPERTIES.contains(&p.as_str()) {
                bad(
                    k,
                    format!("`{p}` is empty or a property this destination sets itself"),
                );
            }
        }
        if self.revenue_property == self.currency_property {
            bad(
                "currency_property",
                "must differ from revenue_property".into(),
            );
        }
    }

    /// The preset's names; identify as `$identify` (a profile update, plus
    /// the merge event under the original API).
    pub fn preset_name<'a>(&self, event: &'a EventName) -> Option<&'a str> {
        match event {
            EventName::Identify => Some("$identify"),
            other => self.preset.name(other),
        }
    }
}

pub struct Mixpanel {
    settings: Settings,
    import_url: String,
    engage_url: String,
    /// `Authorization` for /import.
    auth: String,
}

impl Mixpanel {
    pub fn new(settings: Settings) -> Self {
        let host = settings
            .base_url
            .clone()
            .unwrap_or_else(|| settings.residency.host().to_string());
        let host = host.trim_end_matches('/');
        let (user, password) = match settings.auth {
            Auth::ServiceAccount => (
                settings
                    .service_account_username
                    .clone()
                    .unwrap_or_default(),
                settings
                    .service_account_secret
                    .as_ref()
                    .map(|s| s.expose().to_string())
                    .unwrap_or_default(),
            ),
            Auth::ApiSecret => (
                settings
                    .api_secret
                    .as_ref()
                    .map(|s| s.expose().to_string())
                    .unwrap_or_default(),
                String::new(),
            ),
        };
        let auth = format!("Basic {}", BASE64.encode(format!("{user}:{password}")));
        let mut query = vec![("strict", "1")];
        if let (Auth::ServiceAccount, Some(p)) = (settings.auth, &settings.project_id) {
            query.push(("project_id", p.as_str()));
        }
        let query = serde_urlencoded::to_string(query).expect("strings encode");
        Mixpanel {
            import_url: format!("{host}/import?{query}"),
            engage_url: format!("{host}/engage?verbose=1&ip=0"),
            auth,
            settings,
        }
    }

    fn user_id<'e>(&self, ev: &'e CanonicalEvent) -> Option<&'e str> {
        ev.user_id
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
    }

    fn anonymous_id<'e>(&self, ev: &'e CanonicalEvent) -> Option<&'e str> {
        ev.anonymous_id
            .as_deref()
            .map(str::trim)
            .filter(|a| !a.is_empty())
    }

    /// The event's `distinct_id` as Mixpanel would derive it under the
    /// project's merge API; "" for an event of nobody.
    pub fn distinct_id(&self, ev: &CanonicalEvent) -> String {
        match (
            self.user_id(ev),
            self.anonymous_id(ev),
            self.settings.id_merge,
        ) {
            (Some(u), _, _) => u.to_string(),
            (None, Some(a), IdMerge::Simplified) => format!("$device:{a}"),
            (None, Some(a), IdMerge::Original) => a.to_string(),
            (None, None, _) => String::new(),
        }
    }

    /// The /import event for a row, if it has one: every event but
    /// identify; identify under the original API when there is an
    /// anonymous id to merge.
    fn event(&self, d: &Delivery) -> Option<Value> {
        let ev = &d.event;
        let time = ev.occurred_at.timestamp_millis();
        if ev.event == EventName::Identify {
            let user = self.user_id(ev)?;
            let anon = self.anonymous_id(ev).filter(|a| *a != user)?;
            let mut p = Map::new();
            p.insert("time".into(), json!(time));
            p.insert("distinct_id".into(), json!(user));
            p.insert("$insert_id".into(), json!(insert_id(&ev.event_id)));
            let name = if self.settings.id_merge == IdMerge::Simplified {
                // The simplified API merges on any event that carries both
                // ids; the SDKs' identify() sends this one.
                p.insert("$device_id".into(), json!(anon));
                p.insert("$user_id".into(), json!(user));
                "$identify"
            } else if is_uuid_v4(anon) {
                p.insert("$identified_id".into(), json!(user));
                p.insert("$anon_id".into(), json!(anon));
                "$identify"
            } else {
                p.insert("$distinct_ids".into(), json!([user, anon]));
                "$merge"
            };
            return Some(json!({"event": name, "properties": p}));
        }
        let mut p = Map::new();
        if let Some(props) = &ev.properties {
            for (k, v) in props {
                if !RESERVED_EVENT_PROPERTIES.contains(&k.as_str())
                    && *k != self.settings.revenue_property
                    && *k != self.settings.currency_property
                {
                    p.insert(k.clone(), v.clone());
                }
            }
        }
        p.insert("time".into(), json!(time));
        p.insert("distinct_id".into(), json!(self.distinct_id(ev)));
        p.insert("$insert_id".into(), json!(insert_id(&ev.event_id)));
        if self.settings.id_merge == IdMerge::Simplified {
            if let Some(a) = self.anonymous_id(ev) {
                p.insert("$device_id".into(), json!(a));
            }
            if let Some(u) = self.user_id(ev) {
                p.insert("$user_id".into(), json!(u));
            }
        }
        p.insert("ip".into(), json!(ip(ev)));
        if let Some(ctx) = &ev.context {
            if let Some(u) = &ctx.page_url {
                p.insert("$current_url".into(), json!(u));
            }
            if let Some(r) = &ctx.referrer {
                p.insert("$referrer".into(), json!(r));
            }
        }
        if let Some(v) = ev.value {
            p.insert(self.settings.revenue_property.clone(), json!(v));
        }
        if let Some(c) = &ev.currency {
            p.insert(self.settings.currency_property.clone(), json!(c));
        }
        if let Some(o) = &ev.order_id {
            p.insert("order_id".into(), json!(o));
        }
        if !ev.items.is_empty() {
            let items: Vec<Value> = ev.items.iter().map(|it| item_object(it, "id")).collect();
            p.insert("items".into(), Value::Array(items));
        }
        Some(json!({"event": d.name, "properties": p}))
    }

    /// The /engage updates for a row: an identify's traits, a purchase's
    /// transaction; none without a user id.
    fn updates(&self, d: &Delivery) -> Vec<Value> {
        let ev = &d.event;
        let Some(user) = self.user_id(ev) else {
            return Vec::new();
        };
        let update = |op: &str, value: Value| {
            let mut u = Map::new();
            u.insert("$token".into(), json!(self.settings.project_token));
            u.insert("$distinct_id".into(), json!(user));
            // Seconds, as Mixpanel's Python library sends it (the docs say
            // nothing of `$time` on profile updates).
            u.insert("$time".into(), json!(ev.occurred_at.timestamp()));
            u.insert("$ip".into(), json!(ip(ev)));
            u.insert(op.into(), value);
            Value::Object(u)
        };
        match &ev.event {
            EventName::Identify => {
                let (set, once) = self.traits(ev);
                let mut out = vec![update("$set", Value::Object(set))];
                if !once.is_empty() {
                    out.push(update("$set_once", Value::Object(once)));
                }
                out
            }
            EventName::Purchase if self.settings.transactions => {
                let Some(amount) = ev.value else {
                    return Vec::new();
                };
                let mut t = Map::new();
                t.insert("$amount".into(), json!(amount));
                t.insert(
                    "$time".into(),
                    json!(ev.occurred_at.format("%Y-%m-%dT%H:%M:%S").to_string()),
                );
                if let Some(c) = &ev.currency {
                    t.insert("currency".into(), json!(c));
                }
                if let Some(o) = &ev.order_id {
                    t.insert("order_id".into(), json!(o));
                }
                vec![update("$append", json!({"$transactions": t}))]
            }
            _ => Vec::new(),
        }
    }

    /// An identify's traits as (`$set`, `$set_once`) properties, common ones
    /// under Mixpanel's reserved names. Raw email/phone are there only when
    /// the router let them through (`raw_contact = true`).
    fn traits(&self, ev: &CanonicalEvent) -> (Map<String, Value>, Map<String, Value>) {
        let mut set = Map::new();
        let mut once = Map::new();
        if let Some(traits) = &ev.traits {
            for (k, v) in traits {
                let name = profile_name(k);
                if self.settings.set_once_traits.iter().any(|o| o == k) {
                    once.insert(name, v.clone());
                } else {
                    set.insert(name, v.clone());
                }
            }
        }
        for (field, name) in [(&ev.email, "$email"), (&ev.phone, "$phone")] {
            if let Some(v) = field
                && !set.contains_key(name)
                && !once.contains_key(name)
            {
                set.insert(name.into(), json!(v));
            }
        }
        (set, once)
    }
}

/// `context.ip`, else "0": Mixpanel then skips geolocation instead of
/// locating the sink's own address.
fn ip(ev: &CanonicalEvent) -> String {
    ev.context
        .as_ref()
        .and_then(|c| c.ip)
        .map_or_else(|| "0".to_string(), |ip| ip.to_string())
}

/// The profile property a trait is stored under.
fn profile_name(trait_name: &str) -> String {
    let folded: String = trait_name
        .trim()
        .trim_start_matches('$')
        .chars()
        .filter(|c| !matches!(c, '_' | '-' | ' ' | '.'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    PROFILE_TRAITS
        .iter()
        .find(|(k, _)| *k == folded)
        .map_or_else(|| trait_name.to_string(), |(_, v)| (*v).to_string())
}

/// `$insert_id` for an event: the first 36 hex digits of a SHA-256 of its
/// event_id, so it fits Mixpanel's "≤ 36 bytes, alphanumeric or -" whatever
/// the event_id holds, and is the same on every resend.
pub fn insert_id(event_id: &str) -> String {
    let h = Sha256::digest(format!("switchyard:{event_id}").as_bytes());
    hex::encode(h)[..INSERT_ID_LEN].to_string()
}

/// A UUID version 4 (`xxxxxxxx-xxxx-4xxx-[89ab]xxx-xxxxxxxxxxxx`), the only
/// `$anon_id` Mixpanel's `$identify` merges.
pub fn is_uuid_v4(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
        && b[14] == b'4'
        && matches!(b[19].to_ascii_lowercase(), b'8' | b'9' | b'a' | b'b')
}

/// Whether Mixpanel refuses `id` as a distinct_id.
pub fn disallowed_id(id: &str) -> bool {
    DISALLOWED_IDS
        .iter()
        .any(|d| d.eq_ignore_ascii_case(id.trim()))
}

fn refusal(class: &'static str, reason: String) -> Refusal {
    Refusal { class, reason }
}

/// Mixpanel's answer to a strict /import that failed validation.
#[derive(Deserialize, Default)]
#[serde(default)]
struct StrictInvalid {
    failed_records: Vec<FailedRecord>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct FailedRecord {
    index: Option<usize>,
    #[serde(rename = "$insert_id", alias = "insert_id")]
    insert_id: String,
    field: String,
    message: String,
}

/// /engage's `verbose=1` answer.
#[derive(Deserialize)]
struct Verbose {
    status: i64,
    #[serde(default)]
    error: Option<String>,
}

impl Mixpanel {
    fn classify_import(&self, request: &Request, response: &Response) -> Classified {
        if response.status == 400
            && let Ok(body) = serde_json::from_slice::<StrictInvalid>(&response.body)
            && !body.failed_records.is_empty()
        {
            // Mixpanel ingests the rows that passed validation.
            let mut rows = vec![Outcome::Delivered; request.rows.len()];
            for f in &body.failed_records {
                if let Some(o) = f.index.and_then(|i| rows.get_mut(i)) {
                    *o = Outcome::Rejected {
                        class: "mixpanel_invalid".into(),
                        reason: retry::cut_string(
                            format!(
                                "Mixpanel refused `{}` ($insert_id {}): {}",
                                f.field, f.insert_id, f.message
                            ),
                            500,
                        ),
                    };
                }
            }
            return Classified::rows(response, rows);
        }
        if let Some(o) = retry::by_status(response, SystemTime::now()) {
            return Classified::all(request, response, o);
        }
        Classified::all(request, response, Outcome::Delivered)
    }

    fn classify_engage(&self, request: &Request, response: &Response) -> Classified {
        if let Some(o) = retry::by_status(response, SystemTime::now()) {
            return Classified::all(request, response, o);
        }
        let failed = match serde_json::from_slice::<Value>(&response.body) {
            Ok(Value::Number(n)) if n.as_i64() == Some(0) => {
                Some("no update in the request was valid".to_string())
            }
            Ok(v @ Value::Object(_)) => match serde_json::from_value::<Verbose>(v) {
                Ok(Verbose { status: 0, error }) => {
                    Some(error.unwrap_or_else(|| "status 0".into()))
                }
                _ => None,
            },
            _ => None,
        };
        let outcome = match failed {
            Some(error) => Outcome::Rejected {
                class: "mixpanel_profile_invalid".into(),
                reason: retry::cut_string(format!("Mixpanel /engage: {error}"), 500),
            },
            None => Outcome::Delivered,
        };
        Classified::all(request, response, outcome)
    }

    fn requests(
        &self,
        endpoint: &'static str,
        url: &str,
        auth: bool,
        items: &[(usize, Vec<u8>)],
        max_items: usize,
        max_bytes: usize,
    ) -> Vec<Request> {
        let bodies: Vec<Vec<u8>> = items.iter().map(|(_, b)| b.clone()).collect();
        let mut headers = vec![("Content-Type".to_string(), "application/json".to_string())];
        if auth {
            headers.push(("Authorization".to_string(), self.auth.clone()));
        }
        pack(&bodies, 2, max_items, max_bytes)
            .into_iter()
            .map(|range| {
                let mut body = Vec::with_capacity(
                    2 + bodies[range.clone()]
                        .iter()
                        .map(|b| b.len() + 1)
                        .sum::<usize>(),
                );
                body.push(b'[');
                let mut rows: Vec<usize> = Vec::new();
                for (n, i) in range.enumerate() {
                    if n > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(&bodies[i]);
                    let row = items[i].0;
                    if rows.last() != Some(&row) {
                        rows.push(row);
                    }
                }
                body.push(b']');
                Request::post(endpoint, url, headers.clone(), body, rows)
            })
            .collect()
    }
}

impl Destination for Mixpanel {
    fn limits(&self) -> Limits {
        Limits {
            max_events: MAX_EVENTS,
            max_bytes: MAX_BODY_BYTES,
            // /import takes events of any age (only before 1971 is refused).
            max_event_age: None,
        }
    }

    fn refuse(&self, d: &Delivery) -> Option<Refusal> {
        let ev = &d.event;
        if ev.event == EventName::Identify && self.user_id(ev).is_none() {
            return Some(refusal(
                "mixpanel_no_user_id",
                "an identify without a user_id: Mixpanel profiles are keyed by it".into(),
            ));
        }
        let now = Utc::now();
        if ev.occurred_at.timestamp() < MIN_TIME_SECS {
            return Some(refusal(
                "mixpanel_time",
                "occurred_at is before 1971-01-01; Mixpanel rejects such times".into(),
            ));
        }
        if let Ok(ahead) = (ev.occurred_at - now).to_std()
            && ahead > MAX_AHEAD
        {
            return Some(refusal(
                "future_event_time",
                format!(
                    "occurred_at is {} ahead; Mixpanel rejects times more than 1 hour in the future",
                    humantime::format_duration(Duration::from_secs(ahead.as_secs()))
                ),
            ));
        }
        let distinct_id = match ev.event {
            EventName::Identify => self.user_id(ev).unwrap_or_default().to_string(),
            _ => self.distinct_id(ev),
        };
        if disallowed_id(&distinct_id)
            || self.user_id(ev).is_some_and(disallowed_id)
            || (self.settings.id_merge == IdMerge::Original
                && self.anonymous_id(ev).is_some_and(disallowed_id))
        {
            return Some(refusal(
                "mixpanel_invalid_distinct_id",
                format!("distinct id `{distinct_id}` is one Mixpanel disallows"),
            ));
        }
        if d.name.trim().is_empty() {
            return Some(refusal(
                "mixpanel_event_name",
                "the event name is empty".into(),
            ));
        }
        if let Some(e) = self.event(d) {
            let n = e["properties"].as_object().map_or(0, Map::len);
            if n >= MAX_PROPERTIES {
                return Some(refusal(
                    "mixpanel_limits",
                    format!("{n} properties; Mixpanel takes fewer than {MAX_PROPERTIES} per event"),
                ));
            }
            let size = serde_json::to_vec(&e).map_or(0, |b| b.len());
            if size > MAX_EVENT_BYTES {
                return Some(refusal(
                    "mixpanel_limits",
                    format!("the event is {size} bytes; Mixpanel takes at most 1 MB"),
                ));
            }
        }
        for u in self.updates(d) {
            let size = serde_json::to_vec(&u).map_or(0, |b| b.len());
            if size > MAX_EVENT_BYTES {
                return Some(refusal(
                    "mixpanel_limits",
                    format!("the profile update is {size} bytes; Mixpanel takes at most 1 MB"),
                ));
            }
        }
        None
    }

    fn vendor_dedup(&self) -> bool {
        // Events are dropped by Mixpanel on resend, profile $set is
        // idempotent; a resent $append of a transaction is not.
        !self.settings.transactions
    }

    fn map(&self, batch: &[Delivery]) -> Vec<Request> {
        let mut events: Vec<(usize, Vec<u8>)> = Vec::new();
        let mut updates: Vec<(usize, Vec<u8>)> = Vec::new();
        for (i, d) in batch.iter().enumerate() {
            if let Some(e) = self.event(d) {
                events.push((i, serde_json::to_vec(&e).expect("serialising to memory")));
            }
            for u in self.updates(d) {
                updates.push((i, serde_json::to_vec(&u).expect("serialising to memory")));
            }
        }
        let mut out = self.requests(
            "events",
            &self.import_url,
            true,
            &events,
            MAX_EVENTS,
            MAX_BODY_BYTES,
        );
        // Profiles after events: a purchase's transaction follows its event.
        out.extend(self.requests(
            "profiles",
            &self.engage_url,
            false,
            &updates,
            MAX_UPDATES,
            MAX_BODY_BYTES,
        ));
        out
    }

    fn classify(&self, request: &Request, response: &Response, _: &[Delivery]) -> Classified {
        match request.endpoint {
            "profiles" => self.classify_engage(request, response),
            _ => self.classify_import(request, response),
        }
    }
}

/// The first time Mixpanel takes (1971-01-01), for tests.
pub fn min_time() -> DateTime<Utc> {
    Utc.timestamp_opt(MIN_TIME_SECS, 0)
        .single()
        .expect("a valid time")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::test_support::{self, body};

    fn settings() -> Settings {
        Settings {
            preset: NamePreset::Retail,
            id_merge: IdMerge::Simplified,
            auth: Auth::ServiceAccount,
            project_id: Some("3141592".into()),
            service_account_username: Some("sy.export.mp-service-account".into()),
            service_account_secret: Some(Secret::new("s3cret")),
            api_secret: None,
            project_token: "tok123".into(),
            residency: Residency::Us,
            base_url: None,
            revenue_property: "$amount".into(),
            currency_property: "$currency".into(),
            transactions: true,
            set_once_traits: vec!["created_at".into()],
        }
    }

    fn mp() -> Mixpanel {
        Mixpanel::new(settings())
    }

    fn original() -> Mixpanel {
        Mixpanel::new(Settings {
            id_merge: IdMerge::Original,
            ..settings()
        })
    }

    fn delivery(name: &str, extra: Value) -> Delivery {
        let ev = json!({
            "event": "purchase", "event_id": "evt_01", "occurred_at": "2026-11-26T14:03:11Z",
            "user_id": "u_1", "anonymous_id": "anon-1", "value": 49.5, "currency": "EUR",
            "order_id": "o-1",
            "email_sha256": "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b",
            "items": [{"id": "sku-1", "name": "Shoe", "price": 24.75, "quantity": 2}],
            "context": {"ip": "198.51.100.23", "page_url": "https://shop.example/checkout",
                        "referrer": "https://google.com/"},
            "properties": {"coupon": "BF", "time": 1, "distinct_id": "evil"},
            "consent": {"analytics": "granted"}
        });
        test_support::delivery("mixpanel", name, ev, extra)
    }

    fn identify(extra: Value) -> Delivery {
        let base = json!({"event": "identify", "value": null, "currency": null,
                          "order_id": null, "items": null, "properties": null,
                          "traits": {"first_name": "Maya", "plan": "pro", "created_at": "2026-01-01"}});
        let mut over = base.as_object().unwrap().clone();
        if let Value::Object(e) = extra {
            over.extend(e);
        }
        delivery("$identify", Value::Object(over))
    }

    #[test]
    fn settings_are_checked() {
        let ok = test_support::vendor(
            "mixpanel",
            "destinations.mp",
            r#"
id_merge = "simplified"
project_id = "3141592"
service_account_username = "u"
service_account_secret = "s"
project_token = "t"
residency = "eu"
"#,
        );
        assert!(ok.is_ok(), "{ok:?}");
        let e = test_support::vendor(
            "mixpanel",
            "destinations.mp",
            r#"
id_merge = "original"
auth = "api_secret"
project_id = "1"
project_token = ""
revenue_property = "time"
"#,
        )
        .unwrap_err();
        let keys: Vec<&str> = e.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "destinations.mp.api_secret",
                "destinations.mp.project_id",
                "destinations.mp.project_token",
                "destinations.mp.revenue_property"
            ]
        );
        let e = test_support::vendor(
            "mixpanel",
            "destinations.mp",
            "id_merge = \"sometimes\"\nproject_token = \"t\"",
        )
        .unwrap_err();
        assert!(e[0].message.contains("simplified"), "{e:?}");
        let e = test_support::vendor(
            "mixpanel",
            "destinations.mp",
            "project_token = \"t\"\nid_merge = \"original\"\nbogus = 1",
        )
        .unwrap_err();
        assert!(e[0].message.contains("bogus"), "{e:?}");
    }

    #[test]
    fn hosts_follow_residency_and_auth_chooses_query_and_header() {
        let m = mp();
        assert_eq!(
            m.import_url,
            "https://api.mixpanel.com/import?strict=1&project_id=3141592"
        );
        assert_eq!(
            m.engage_url,
            "https://api.mixpanel.com/engage?verbose=1&ip=0"
        );
        assert_eq!(
            m.auth,
            format!(
                "Basic {}",
                BASE64.encode("sy.export.mp-service-account:s3cret")
            )
        );
        for (r, host) in [
            (Residency::Eu, "https://api-eu.mixpanel.com/"),
            (Residency::In, "https://api-in.mixpanel.com/"),
        ] {
            let m = Mixpanel::new(Settings {
                residency: r,
                ..settings()
            });
            assert!(m.import_url.starts_with(host), "{}", m.import_url);
        }
        let m = Mixpanel::new(Settings {
            auth: Auth::ApiSecret,
            api_secret: Some(Secret::new("apisecret")),
            project_id: None,
            base_url: Some("http://127.0.0.1:9/".into()),
            ..settings()
        });
        assert_eq!(m.import_url, "http://127.0.0.1:9/import?strict=1");
        assert_eq!(m.auth, format!("Basic {}", BASE64.encode("apisecret:")));
        let reqs = m.map(&[delivery("Order Completed", json!({}))]);
        assert!(reqs[0].headers.iter().any(|(k, _)| k == "Authorization"));
        assert!(
            !reqs[1].headers.iter().any(|(k, _)| k == "Authorization"),
            "/engage needs only the token"
        );
    }

    #[test]
    fn insert_id_is_36_alphanumerics_and_stable() {
        let a = insert_id("evt_01JDX0001");
        assert_eq!(a.len(), INSERT_ID_LEN);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        assert_eq!(a, insert_id("evt_01JDX0001"));
        assert_ne!(a, insert_id("evt_01JDX0002"));
        assert!(!disallowed_id(&a));
    }

    #[test]
    fn a_purchase_becomes_an_event_and_a_transaction() {
        let reqs = mp().map(&[delivery("Order Completed", json!({}))]);
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[0].endpoint, "events");
        assert_eq!(
            body(&reqs[0]),
            json!([{
                "event": "Order Completed",
                "properties": {
                    "coupon": "BF",
                    "time": 1_795_701_791_000_i64,
                    "distinct_id": "u_1",
                    "$insert_id": insert_id("evt_01"),
                    "$device_id": "anon-1",
                    "$user_id": "u_1",
                    "ip": "198.51.100.23",
                    "$current_url": "https://shop.example/checkout",
                    "$referrer": "https://google.com/",
                    "$amount": 49.5,
                    "$currency": "EUR",
                    "order_id": "o-1",
                    "items": [{"id": "sku-1", "name": "Shoe", "price": 24.75, "quantity": 2}]
                }
            }])
        );
        assert_eq!(reqs[1].endpoint, "profiles");
        assert_eq!(
            body(&reqs[1]),
            json!([{
                "$token": "tok123", "$distinct_id": "u_1", "$time": 1_795_701_791_i64,
                "$ip": "198.51.100.23",
                "$append": {"$transactions": {"$amount": 49.5, "$time": "2026-11-26T14:03:11",
                                              "currency": "EUR", "order_id": "o-1"}}
            }])
        );
        assert!(!mp().vendor_dedup(), "a resent $append is not dropped");
        let no_tx = Mixpanel::new(Settings {
            transactions: false,
            revenue_property: "Revenue".into(),
            currency_property: "Currency".into(),
            ..settings()
        });
        assert!(no_tx.vendor_dedup());
        let reqs = no_tx.map(&[delivery("Order Completed", json!({}))]);
        assert_eq!(reqs.len(), 1);
        assert_eq!(body(&reqs[0])[0]["properties"]["Revenue"], 49.5);
        assert_eq!(body(&reqs[0])[0]["properties"]["Currency"], "EUR");
    }

    #[test]
    fn no_hash_is_ever_sent() {
        for m in [mp(), original()] {
            for d in [delivery("Order Completed", json!({})), identify(json!({}))] {
                for r in m.map(&[d]) {
                    let text = String::from_utf8(r.body.clone()).unwrap();
                    assert!(!text.contains("973dfe46"), "{text}");
                }
            }
        }
    }

    #[test]
    fn distinct_id_follows_the_merge_api() {
        let anon = delivery("Product Viewed", json!({"user_id": null}));
        let p = &body(&mp().map(std::slice::from_ref(&anon))[0])[0]["properties"];
        assert_eq!(p["distinct_id"], "$device:anon-1");
        assert_eq!(p["$device_id"], "anon-1");
        assert!(p.get("$user_id").is_none());
        let p = &body(&original().map(&[anon])[0])[0]["properties"];
        assert_eq!(p["distinct_id"], "anon-1");
        assert!(p.get("$device_id").is_none());
        let nobody = delivery(
            "Product Viewed",
            json!({"user_id": null, "anonymous_id": null}),
        );
        assert_eq!(
            body(&mp().map(&[nobody])[0])[0]["properties"]["distinct_id"],
            ""
        );
    }

    #[test]
    fn identify_is_a_profile_update_and_under_original_a_merge() {
        let d = identify(json!({"email": "maya@example.com"}));
        let reqs = mp().map(std::slice::from_ref(&d));
        assert_eq!(reqs.len(), 2);
        // Simplified: the merge is an event carrying both ids, as the
        // SDKs' identify() sends it.
        let e = &body(&reqs[0])[0];
        assert_eq!(e["event"], "$identify");
        assert_eq!(e["properties"]["$device_id"], "anon-1");
        assert_eq!(e["properties"]["$user_id"], "u_1");
        assert_eq!(e["properties"]["distinct_id"], "u_1");
        let no_anon = identify(json!({"anonymous_id": null}));
        assert_eq!(mp().map(&[no_anon]).len(), 1, "nothing to merge: no event");
        let b = body(&reqs[1]);
        assert_eq!(
            b[0]["$set"],
            json!({"$first_name": "Maya", "plan": "pro", "$email": "maya@example.com"})
        );
        assert_eq!(b[1]["$set_once"], json!({"$created": "2026-01-01"}));
        assert_eq!(b[0]["$distinct_id"], "u_1");

        let reqs = original().map(std::slice::from_ref(&d));
        assert_eq!(reqs.len(), 2);
        let e = &body(&reqs[0])[0];
        assert_eq!(e["event"], "$merge", "anon-1 is not a UUID v4");
        assert_eq!(e["properties"]["$distinct_ids"], json!(["u_1", "anon-1"]));
        let uuid = "6f1c2a9e-3b4d-4c8e-9f10-2a3b4c5d6e7f";
        let reqs = original().map(&[identify(json!({"anonymous_id": uuid}))]);
        let e = &body(&reqs[0])[0];
        assert_eq!(e["event"], "$identify");
        assert_eq!(e["properties"]["$identified_id"], "u_1");
        assert_eq!(e["properties"]["$anon_id"], uuid);
        assert_eq!(e["properties"]["distinct_id"], "u_1");
        assert!(e["properties"]["$insert_id"].is_string());
        // No anonymous id: nothing to merge.
        let reqs = original().map(&[identify(json!({"anonymous_id": null}))]);
        assert_eq!(
            reqs.iter().map(|r| r.endpoint).collect::<Vec<_>>(),
            ["profiles"]
        );
    }

    #[test]
    fn presets_and_custom_names() {
        let s = settings();
        let n = |e: &str| {
            s.preset_name(&EventName::parse(e).unwrap())
                .map(str::to_string)
        };
        assert_eq!(n("view_content").as_deref(), Some("Product Viewed"));
        assert_eq!(n("purchase").as_deref(), Some("Order Completed"));
        assert_eq!(n("refund").as_deref(), Some("Order Refunded"));
        assert_eq!(
            n("custom.webinar_registered").as_deref(),
            Some("webinar_registered")
        );
        assert_eq!(n("identify").as_deref(), Some("$identify"));
    }

    #[test]
    fn events_mixpanel_would_refuse_are_refused_before_sending() {
        let m = mp();
        assert_eq!(m.refuse(&delivery("Order Completed", json!({}))), None);
        let r = |extra| {
            m.refuse(&delivery("Order Completed", extra))
                .map(|r| r.class)
        };
        assert_eq!(
            r(json!({"user_id": "undefined"})),
            Some("mixpanel_invalid_distinct_id")
        );
        assert_eq!(
            r(json!({"occurred_at": "1970-06-01T00:00:00Z"})),
            Some("mixpanel_time")
        );
        let later = (Utc::now() + chrono::Duration::minutes(90)).to_rfc3339();
        assert_eq!(r(json!({"occurred_at": later})), Some("future_event_time"));
        let soon = (Utc::now() + chrono::Duration::minutes(30)).to_rfc3339();
        assert_eq!(
            r(json!({"occurred_at": soon})),
            None,
            "within Mixpanel's hour"
        );
        let props: Map<String, Value> = (0..260).map(|i| (format!("p{i}"), json!(i))).collect();
        assert_eq!(r(json!({"properties": props})), Some("mixpanel_limits"));
        assert_eq!(
            m.refuse(&identify(json!({"user_id": null})))
                .map(|r| r.class),
            Some("mixpanel_no_user_id")
        );
        assert!(min_time().timestamp() == MIN_TIME_SECS);
    }

    #[test]
    fn requests_hold_at_most_2000_events() {
        let batch: Vec<Delivery> = (0..2001)
            .map(|i| {
                delivery(
                    "Product Viewed",
                    json!({"event": "view_content", "event_id": format!("e{i}"), "value": null}),
                )
            })
            .collect();
        let reqs = mp().map(&batch);
        assert_eq!(test_support::ranges(&reqs), vec![0..2000, 2000..2001]);
        assert_eq!(mp().limits().max_events, 2000);
        assert_eq!(mp().limits().max_event_age, None);
    }

    fn answer(status: u16, body: Value, headers: &[(&str, &str)]) -> Response {
        Response {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: serde_json::to_vec(&body).unwrap(),
        }
    }

    fn rejected(o: &Outcome, want: &str) -> bool {
        matches!(o, Outcome::Rejected { class, .. } if class == want)
    }

    /// Mixpanel's documented answers, each to a request of three events.
    #[test]
    fn import_answers_are_classified_per_row() {
        let m = mp();
        let batch: Vec<Delivery> = (0..3)
            .map(|i| {
                delivery(
                    "Product Viewed",
                    json!({"event": "view_content", "event_id": format!("e{i}"), "value": null}),
                )
            })
            .collect();
        let req = &m.map(&batch)[0];
        type Check = fn(&[Outcome]) -> bool;
        let cases: Vec<(&str, Response, Check, bool)> = vec![
            (
                "success",
                answer(
                    200,
                    json!({"code": 200, "num_records_imported": 3, "status": "OK"}),
                    &[],
                ),
                |o| o.iter().all(|o| *o == Outcome::Delivered),
                false,
            ),
            (
                "partial: the docs' shape ($insert_id)",
                answer(
                    400,
                    json!({
                    "code": 400, "error": "some data points in the request failed validation",
                    "failed_records": [{"index": 1, "$insert_id": "x", "field": "properties.time",
                                        "message": "'properties.time' is invalid: must be specified as seconds since epoch"}],
                    "num_records_imported": 2, "status": "Bad Request"}),
                    &[],
                ),
                |o| {
                    o[0] == Outcome::Delivered
                        && rejected(&o[1], "mixpanel_invalid")
                        && o[2] == Outcome::Delivered
                },
                false,
            ),
            (
                "partial: the OpenAPI shape (insert_id)",
                answer(
                    400,
                    json!({
                    "code": 400, "num_records_imported": 1, "status": "Bad Request",
                    "failed_records": [{"index": 0, "insert_id": "a", "field": "properties.distinct_id", "message": "m"},
                                       {"index": 2, "insert_id": "b", "field": "event", "message": "m"}]}),
                    &[],
                ),
                |o| {
                    rejected(&o[0], "mixpanel_invalid")
                        && o[1] == Outcome::Delivered
                        && rejected(&o[2], "mixpanel_invalid")
                },
                false,
            ),
            (
                "400 without failed_records",
                answer(
                    400,
                    json!({"code": 400, "error": "unable to parse body", "status": "Bad Request"}),
                    &[],
                ),
                |o| o.iter().all(|o| rejected(o, "http_400")),
                false,
            ),
            (
                "401",
                answer(
                    401,
                    json!({"code": 401, "error": "Invalid credentials", "status": "Unauthorized"}),
                    &[],
                ),
                |o| o.iter().all(|o| rejected(o, "http_401")),
                false,
            ),
            (
                "403",
                answer(403, json!({"error": "forbidden", "status": "error"}), &[]),
                |o| o.iter().all(|o| rejected(o, "http_403")),
                false,
            ),
            (
                "413",
                answer(
                    413,
                    json!({"code": 413, "error": "request exceeds max limit of 2097152 bytes",
                                   "status": "Request Entity Too Large"}),
                    &[],
                ),
                |o| o.iter().all(|o| *o == Outcome::Split),
                false,
            ),
            (
                "429",
                answer(
                    429,
                    json!({"code": 429, "error": "Project exceeded rate limits. Please retry the request with exponential backoff.",
                                   "status": "Too Many Requests"}),
                    &[("retry-after", "7")],
                ),
                |o| {
                    o.iter().all(
                        |o| matches!(o, Outcome::Retry { after: Some(d), .. } if d.as_secs() == 7),
                    )
                },
                true,
            ),
            (
                "502",
                answer(502, json!("bad gateway"), &[]),
                |o| {
                    o.iter()
                        .all(|o| matches!(o, Outcome::Retry { after: None, .. }))
                },
                false,
            ),
        ];
        for (name, resp, check, throttle) in cases {
            let c = m.classify(req, &resp, &batch);
            assert_eq!(c.rows.len(), 3, "{name}");
            assert!(check(&c.rows), "{name}: {:?}", c.rows);
            assert_eq!(c.throttle, throttle, "{name}");
        }
    }

    #[test]
    fn engage_answers_reject_the_whole_request_or_none() {
        let m = mp();
        let batch = [identify(json!({"anonymous_id": null}))];
        let req = &m.map(&batch)[0];
        assert_eq!(req.endpoint, "profiles");
        for (resp, want_ok) in [
            (answer(200, json!({"status": 1, "error": null}), &[]), true),
            (answer(200, json!(1), &[]), true),
            (
                answer(200, json!({"status": 0, "error": "$token missing"}), &[]),
                false,
            ),
            (answer(200, json!(0), &[]), false),
        ] {
            let c = m.classify(req, &resp, &batch);
            assert_eq!(
                c.rows[0] == Outcome::Delivered,
                want_ok,
                "{:?}",
                String::from_utf8_lossy(&resp.body)
            );
            if !want_ok {
                assert!(rejected(&c.rows[0], "mixpanel_profile_invalid"));
            }
        }
        let c = m.classify(req, &answer(503, json!({}), &[]), &batch);
        assert!(matches!(c.rows[0], Outcome::Retry { .. }));
    }

    #[test]
    fn policy_is_analytics_with_a_yes_and_no_hashes() {
        use crate::settings::ConsentDefault;
        assert_eq!(SPEC.default_consent(), Some("analytics"));
        assert_eq!(SPEC.consent_default(), ConsentDefault::Deny);
        assert!(!SPEC.hashes_only(), "raw_contact = true is allowed");
    }

    #[test]
    fn uuid_v4_is_recognised() {
        assert!(is_uuid_v4("6f1c2a9e-3b4d-4c8e-9f10-2a3b4c5d6e7f"));
        assert!(!is_uuid_v4("6f1c2a9e-3b4d-1c8e-9f10-2a3b4c5d6e7f"));
        assert!(!is_uuid_v4("anon_c9f2e71b"));
    }
}
