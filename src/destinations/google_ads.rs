//! Google Ads click conversions (`type = "google_ads"`).
//!
//! `POST {base_url}/{api_version}/customers/{cid}:uploadClickConversions`
//! with `Authorization: Bearer`, `developer-token` and, for a manager
//! account, `login-customer-id`. Body `{"conversions":[…],"partialFailure":true}`,
//! at most 2000 conversions. Only events with a conversion action
//! (`conversion_actions[canonical name]`) are routed here.
//!
//! One conversion per event: `conversionAction`, `conversionDateTime` (the
//! event's `occurred_at` written with the configured offset), exactly one
//! click id (the first of `click_id_priority` the event has), value and
//! currency, `orderId`, hashed email/phone as `userIdentifiers`, and
//! `consent`. Without a click id the conversion is an enhanced conversion
//! for leads (identifiers only), which Google accepts only when the account
//! has that feature on, so it is a setting.
//!
//! `orderId` is Google's dedup key (one conversion per order id and
//! conversion action): the publisher's `order_id` when there is one, so the
//! same order reported twice under two event ids still counts once, else the
//! `event_id`, so a resend of the same event is dropped by Google instead of
//! counted again. Two events with the same (action, orderId) never share a
//! request: Google would refuse both as DUPLICATE_ORDER_ID.
//!
//! Answers: HTTP 200 may carry `partialFailureError`, whose errors name the
//! failed rows (`location.fieldPathElements[0] = {fieldName: "conversions",
//! index: N}`); their `results[N]` is empty. "Already exists" errors mean the
//! conversion is at Google already (delivered); TOO_RECENT_* errors are
//! retried after the 6 hours Google asks for; other row errors reject the
//! row. Whole-request errors come as `{"error":{code,status,details}}`:
//! 429/RESOURCE_EXHAUSTED and 5xx retry (and slow the sink), 401/403 reject
//! as auth failures, other 4xx reject.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, FixedOffset, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::shared::{check_ad_consent, vendor_hash};
use super::{Contact, Kind, Spec};
use crate::delivery::Delivery;
use crate::event::normalize::{EmailRule, PhoneFormat};
use crate::event::{CanonicalEvent, ConsentState, EventName};
use crate::settings::{OAuthSettings, Problem, Secret, check_url, is_api_version, reporter};
use crate::sink::destination::{
    Classified, Destination, Limits, Outcome, Refusal, Request, Response,
};
use crate::sink::retry;

/// The click ids Google Ads accepts, in the default order of preference:
/// gclid identifies the click itself; gbraid/wbraid are the aggregated iOS
/// parameters Google offers where gclid is not available.
pub const CLICK_IDS: &[&str] = &["gclid", "gbraid", "wbraid"];

/// Most conversions in one upload (TOO_MANY_CONVERSIONS_IN_REQUEST above).
pub const MAX_CONVERSIONS: usize = 2000;

/// Google's longest click-through conversion window; older conversions can
/// only come back as EXPIRED_EVENT.
pub const MAX_EVENT_AGE: Duration = Duration::from_secs(90 * 24 * 3600);

/// Google asks to retry TOO_RECENT_* errors after this long.
const TOO_RECENT_WAIT: Duration = Duration::from_secs(6 * 3600);

/// Most user identifiers per conversion.
const MAX_USER_IDENTIFIERS: usize = 5;

/// "+hh:mm" / "-hh:mm" as seconds east of UTC (within ±14:00, as real zones are).
pub fn parse_utc_offset(s: &str) -> Option<i32> {
    let b = s.as_bytes();
    if b.len() != 6 || b[3] != b':' {
        return None;
    }
    let sign = match b[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let num = |t: &str| -> Option<i32> {
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().ok()
        } else {
            None
        }
    };
    let (h, m) = (num(&s[1..3])?, num(&s[4..6])?);
    (m < 60 && h * 60 + m <= 14 * 60).then_some(sign * (h * 3600 + m * 60))
}

/// `yyyy-mm-dd hh:mm:ss+hh:mm`, the only form `conversionDateTime` takes.
pub fn conversion_date_time(at: DateTime<Utc>, offset: FixedOffset) -> String {
    at.with_timezone(&offset)
        .format("%Y-%m-%d %H:%M:%S%:z")
        .to_string()
}

/// An ad platform: hashed identifiers only, and nothing without a yes to `ads`.
pub const SPEC: Spec = Spec {
    type_name: "google_ads",
    kind: Kind::AdPlatform,
    contact: Contact::HashesOnly,
    email: EmailRule::Google,
    phone: PhoneFormat::E164,
    ordering: false,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Ten digits; dashes as shown in the Google Ads UI are accepted.
    pub customer_id: String,
    pub login_customer_id: Option<String>,
    pub developer_token: Secret,
    /// A fixed OAuth access token. Google's last about an hour, so this
    /// suits tests and short runs; long-running sinks set `oauth` instead.
    #[serde(default)]
    pub access_token: Option<Secret>,
    /// Refresh-token credentials: the sink fetches access tokens itself and
    /// renews them before they expire (and once more after a 401).
    #[serde(default)]
    pub oauth: Option<OAuthSettings>,
    /// Canonical event → conversion action id.
    pub conversion_actions: BTreeMap<String, String>,
    #[serde(default = "default_version")]
    pub api_version: String,
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Offset written into `conversionDateTime` ("+hh:mm" or "-hh:mm"); the
    /// instant is the same whatever the offset, so this only changes how the
    /// time reads in Google's reports.
    #[serde(default = "default_time_zone_offset")]
    pub time_zone_offset: String,
    /// Which click id wins when an event carries several (Google accepts one).
    #[serde(default = "default_click_id_priority")]
    pub click_id_priority: Vec<String>,
    /// Upload conversions that have no click id but a hashed email/phone
    /// (enhanced conversions for leads; must be turned on in the account).
    #[serde(default = "default_true")]
    pub enhanced_conversions_for_leads: bool,
    /// Send `userIdentifiers` at all (needs the customer data terms accepted).
    #[serde(default = "default_true")]
    pub send_user_identifiers: bool,
    /// Canonical consent category behind `consent.adUserData`; "" = never sent.
    #[serde(default = "crate::settings::default_consent_ad_user_data")]
    pub consent_ad_user_data: String,
    /// Canonical consent category behind `consent.adPersonalization`; "" = never sent.
    #[serde(default = "crate::settings::default_consent_ad_personalization")]
    pub consent_ad_personalization: String,
    /// `validateOnly`: Google checks the conversions and records nothing.
    #[serde(default)]
    pub validate_only: bool,
    /// `debugEnabled`: full checks for user-identifier uploads (CLICK_NOT_FOUND
    /// is reported instead of silently accepted).
    #[serde(default)]
    pub debug_enabled: bool,
}

fn default_version() -> String {
    "v21".into()
}
fn default_base_url() -> String {
    "https://googleads.googleapis.com".into()
}
fn default_time_zone_offset() -> String {
    "+00:00".into()
}
fn default_click_id_priority() -> Vec<String> {
    CLICK_IDS.iter().map(|s| s.to_string()).collect()
}
fn default_true() -> bool {
    true
}

impl Settings {
    /// What types cannot say; each problem is named under `key`.
    pub fn check(&self, key: &str, problems: &mut Vec<Problem>) {
        let mut bad = reporter(key, problems);
        let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
        let ten_digits = |s: &str| {
            let d: String = s.chars().filter(|c| *c != '-').collect();
            d.len() == 10 && digits(&d)
        };
        if !ten_digits(&self.customer_id) {
            bad(
                "customer_id",
                "must be a 10-digit customer id (dashes allowed)".into(),
            );
        }
        if let Some(l) = &self.login_customer_id
            && !ten_digits(l)
        {
            bad(
                "login_customer_id",
                "must be a 10-digit customer id (dashes allowed)".into(),
            );
        }
        match (&self.access_token, &self.oauth) {
            (Some(_), Some(_)) => bad(
                "access_token",
                "set either access_token or [oauth], not both".into(),
            ),
            (None, None) => bad(
                "oauth",
                "Google Ads needs credentials: [oauth] with client_id, client_secret and refresh_token (or a fixed access_token)".into(),
            ),
            (None, Some(o)) => {
                if let Err(why) = check_url(&o.token_url) {
                    bad("oauth.token_url", why);
                }
            }
            (Some(_), None) => {}
        }
        if self.conversion_actions.is_empty() {
            bad(
                "conversion_actions",
                "map at least one canonical event to a conversion action id, e.self. { purchase = \"123456789\" }".into(),
            );
        }
        for (event, id) in &self.conversion_actions {
            if EventName::parse(event).is_none() {
                bad(
                    &format!("conversion_actions.{event}"),
                    format!("`{event}` is neither a canonical event name nor custom.<name>"),
                );
            }
            if !digits(id) {
                bad(
                    &format!("conversion_actions.{event}"),
                    "conversion action ids are numeric".into(),
                );
            }
        }
        if !is_api_version(&self.api_version, false) {
            bad(
                "api_version",
                format!("`{}` is not like \"v21\"", self.api_version),
            );
        }
        if let Err(why) = check_url(&self.base_url) {
            bad("base_url", why);
        }
        if parse_utc_offset(&self.time_zone_offset).is_none() {
            bad(
                "time_zone_offset",
                format!(
                    "`{}` is not an offset like \"+00:00\" or \"-08:00\"",
                    self.time_zone_offset
                ),
            );
        }
        let mut seen = Vec::new();
        for id in &self.click_id_priority {
            if !CLICK_IDS.contains(&id.as_str()) || seen.contains(&id) {
                bad(
                    "click_id_priority",
                    format!(
                        "`{id}` is not one of {} (each at most once)",
                        CLICK_IDS.join(", ")
                    ),
                );
            }
            seen.push(id);
        }
        check_ad_consent(
            &self.consent_ad_user_data,
            &self.consent_ad_personalization,
            &mut bad,
        );
    }

    /// Only events that have a conversion action are sent, under their canonical name.
    pub fn preset_name<'a>(&self, event: &'a EventName) -> Option<&'a str> {
        self.conversion_actions
            .contains_key(event.as_str())
            .then(|| event.as_str())
    }
}

pub struct GoogleAds {
    settings: Settings,
    customer_id: String,
    login_customer_id: Option<String>,
    offset: FixedOffset,
    url: String,
}

impl GoogleAds {
    pub fn new(settings: Settings) -> Self {
        let digits = |s: &str| s.chars().filter(char::is_ascii_digit).collect::<String>();
        let customer_id = digits(&settings.customer_id);
        let login_customer_id = settings.login_customer_id.as_deref().map(digits);
        // Validated at load time; UTC for a hand-built settings value.
        let offset = parse_utc_offset(&settings.time_zone_offset)
            .and_then(FixedOffset::east_opt)
            .unwrap_or_else(|| FixedOffset::east_opt(0).expect("0 is a valid offset"));
        let url = format!(
            "{}/{}/customers/{}:uploadClickConversions",
            settings.base_url.trim_end_matches('/'),
            settings.api_version,
            customer_id
        );
        GoogleAds {
            settings,
            customer_id,
            login_customer_id,
            offset,
            url,
        }
    }

    fn action(&self, ev: &CanonicalEvent) -> Option<String> {
        self.settings
            .conversion_actions
            .get(ev.event.as_str())
            .map(|id| format!("customers/{}/conversionActions/{id}", self.customer_id))
    }

    /// The click id to send: the first of `click_id_priority` the event has.
    fn click_id<'e>(&self, ev: &'e CanonicalEvent) -> Option<(&'static str, &'e str)> {
        let ids = ev.click_ids.as_ref()?;
        self.settings.click_id_priority.iter().find_map(|name| {
            let (key, v) = match name.as_str() {
                "gclid" => ("gclid", &ids.gclid),
                "gbraid" => ("gbraid", &ids.gbraid),
                "wbraid" => ("wbraid", &ids.wbraid),
                _ => return None,
            };
            v.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| (key, s))
        })
    }

    fn identifiers(&self, ev: &CanonicalEvent) -> Vec<UserIdentifier> {
        if !self.settings.send_user_identifiers {
            return Vec::new();
        }
        let mut out = Vec::new();
        if let Some(h) = ev.email_sha256.as_deref().and_then(vendor_hash) {
            out.push(UserIdentifier {
                user_identifier_source: "FIRST_PARTY",
                hashed_email: Some(h),
                hashed_phone_number: None,
            });
        }
        if let Some(h) = ev.phone_sha256.as_deref().and_then(vendor_hash) {
            out.push(UserIdentifier {
                user_identifier_source: "FIRST_PARTY",
                hashed_email: None,
                hashed_phone_number: Some(h),
            });
        }
        out.truncate(MAX_USER_IDENTIFIERS);
        out
    }

    fn consent(&self, ev: &CanonicalEvent) -> Option<Consent> {
        let status = |category: &str| -> Option<&'static str> {
            if category.is_empty() {
                return None;
            }
            // An unmentioned category is left out: Google reads an absent
            // status as UNSPECIFIED, and saying nothing is more honest than
            // guessing.
            ev.consent_for(category).map(|c| match c {
                ConsentState::Granted => "GRANTED",
                ConsentState::Denied => "DENIED",
            })
        };
        let c = Consent {
            ad_user_data: status(&self.settings.consent_ad_user_data),
            ad_personalization: status(&self.settings.consent_ad_personalization),
        };
        (c.ad_user_data.is_some() || c.ad_personalization.is_some()).then_some(c)
    }

    /// The conversion for one event, or why Google would refuse it.
    fn conversion<'e>(&self, ev: &'e CanonicalEvent) -> Result<ClickConversion<'e>, Refusal> {
        let action = self.action(ev).ok_or_else(|| Refusal {
            class: "unmapped",
            reason: format!(
                "no conversion action for `{}` in conversion_actions",
                ev.event
            ),
        })?;
        let click = self.click_id(ev);
        let user_identifiers = self.identifiers(ev);
        if click.is_none() {
            let why = if user_identifiers.is_empty() {
                Some("it has no gclid, gbraid or wbraid and no hashed email or phone")
            } else if !self.settings.enhanced_conversions_for_leads {
                Some("it has no gclid, gbraid or wbraid, and enhanced_conversions_for_leads is off")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(Refusal {
                    class: "no_click_id",
                    reason: format!("Google Ads cannot attribute this conversion: {why}"),
                });
            }
        }
        let pick = |k: &str| click.filter(|(name, _)| *name == k).map(|(_, v)| v);
        Ok(ClickConversion {
            conversion_action: action,
            conversion_date_time: conversion_date_time(ev.occurred_at, self.offset),
            gclid: pick("gclid"),
            gbraid: pick("gbraid"),
            wbraid: pick("wbraid"),
            conversion_value: ev.value,
            currency_code: ev.currency.as_deref(),
            order_id: order_id(ev),
            user_identifiers,
            consent: self.consent(ev),
        })
    }

    fn headers(&self) -> Vec<(String, String)> {
        let mut h = vec![
            ("Content-Type".into(), "application/json".into()),
            (
                "developer-token".into(),
                self.settings.developer_token.expose().to_string(),
            ),
        ];
        // With [oauth] the sink adds the Authorization header itself, from
        // the access token it keeps fresh.
        if let Some(t) = &self.settings.access_token {
            h.push(("Authorization".into(), format!("Bearer {}", t.expose())));
        }
        if let Some(l) = &self.login_customer_id {
            h.push(("login-customer-id".into(), l.clone()));
        }
        h
    }

    fn request(&self, conversions: Vec<ClickConversion<'_>>, rows: Vec<usize>) -> Request {
        let body = UploadRequest {
            conversions,
            partial_failure: true,
            validate_only: self.settings.validate_only,
            debug_enabled: self.settings.debug_enabled,
        };
        let body = serde_json::to_vec(&body).expect("conversions serialise to JSON");
        Request::post("conversions", &self.url, self.headers(), body, rows)
    }
}

/// Google's dedup key for the event (see the module comment for why).
pub fn order_id(ev: &CanonicalEvent) -> &str {
    ev.order_id
        .as_deref()
        .filter(|o| !o.trim().is_empty())
        .unwrap_or(&ev.event_id)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UploadRequest<'a> {
    conversions: Vec<ClickConversion<'a>>,
    partial_failure: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    validate_only: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    debug_enabled: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ClickConversion<'a> {
    conversion_action: String,
    conversion_date_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    gclid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gbraid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wbraid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    conversion_value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    currency_code: Option<&'a str>,
    order_id: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    user_identifiers: Vec<UserIdentifier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    consent: Option<Consent>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct UserIdentifier {
    user_identifier_source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    hashed_email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hashed_phone_number: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Consent {
    #[serde(skip_serializing_if = "Option::is_none")]
    ad_user_data: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ad_personalization: Option<&'static str>,
}

/// The parts of an upload answer `classify` reads.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct UploadResponse {
    partial_failure_error: Option<Status>,
}

/// `google.rpc.Status` as JSON: the partial failure, or the `error` of a
/// whole-request failure.
#[derive(Deserialize, Default, Debug)]
#[serde(default)]
struct Status {
    code: i64,
    message: String,
    status: String,
    details: Vec<Value>,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: Status,
}

/// One `GoogleAdsError`, reduced to what decides the outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct AdsError {
    /// The `errorCode` oneof's name, e.g. `conversionUploadError`.
    pub kind: String,
    /// Its value, e.g. `CLICK_CONVERSION_ALREADY_EXISTS`.
    pub code: String,
    pub message: String,
    /// The `conversions` index the error is about, when it names one.
    pub row: Option<usize>,
    /// `quotaErrorDetails.retryDelay`, when Google gave one.
    pub retry_delay: Option<Duration>,
}

impl Status {
    /// The `GoogleAdsFailure` errors in `details`.
    fn errors(&self) -> Vec<AdsError> {
        self.details
            .iter()
            .filter_map(|d| d.get("errors").and_then(Value::as_array))
            .flatten()
            .map(|e| {
                let (kind, code) = e
                    .get("errorCode")
                    .and_then(Value::as_object)
                    .and_then(|m| m.iter().next())
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .unwrap_or_default();
                let row = e
                    .pointer("/location/fieldPathElements")
                    .and_then(Value::as_array)
                    .and_then(|p| {
                        p.iter().find(|el| {
                            el.get("fieldName").and_then(Value::as_str) == Some("conversions")
                        })
                    })
                    .and_then(|el| el.get("index"))
                    .and_then(|i| i.as_u64().or_else(|| i.as_str()?.parse().ok()))
                    .and_then(|i| usize::try_from(i).ok());
                let retry_delay = e
                    .pointer("/details/quotaErrorDetails/retryDelay")
                    .and_then(Value::as_str)
                    .and_then(parse_proto_duration);
                AdsError {
                    kind,
                    code,
                    message: e
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    row,
                    retry_delay,
                }
            })
            .collect()
    }
}

/// A protobuf JSON duration ("30s", "1.5s").
fn parse_proto_duration(s: &str) -> Option<Duration> {
    let secs: f64 = s.strip_suffix('s')?.parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

fn is_quota(kind: &str, code: &str) -> bool {
    kind == "quotaError" || code == "RESOURCE_EXHAUSTED" || code == "RESOURCE_TEMPORARILY_EXHAUSTED"
}

/// What one failed row's error means for its event.
pub fn row_outcome(e: &AdsError) -> Outcome {
    let reason = format!("Google Ads {}={}: {}", e.kind, e.code, e.message);
    match e.code.as_str() {
        // The conversion is at Google already: a resend, or the same order
        // reported again. Either way there is nothing left to deliver.
        "CLICK_CONVERSION_ALREADY_EXISTS"
        | "ORDER_ID_ALREADY_IN_USE"
        | "CALL_CONVERSION_ALREADY_EXISTS" => Outcome::Delivered,
        "TOO_RECENT_EVENT" | "TOO_RECENT_CONVERSION_ACTION" | "TOO_RECENT_CALL" => Outcome::Retry {
            after: Some(TOO_RECENT_WAIT),
            reason,
        },
        // Two rows of one request collided; `map` keeps such rows in separate
        // requests, so sending again sorts it out (the second one then comes
        // back as already in use).
        "DUPLICATE_ORDER_ID" | "DUPLICATE_CLICK_CONVERSION_IN_REQUEST" => Outcome::Retry {
            after: Some(Duration::ZERO),
            reason,
        },
        code if is_quota(&e.kind, code) || e.kind == "internalError" => Outcome::Retry {
            after: e.retry_delay,
            reason,
        },
        code => Outcome::Rejected {
            class: error_class(code),
            reason,
        },
    }
}

fn error_class(code: &str) -> String {
    if code.is_empty() {
        "google_ads_error".into()
    } else {
        format!("google_ads_{}", code.to_ascii_lowercase())
    }
}

/// Several errors on one row: a conversion Google already has is delivered
/// whatever else it says; a permanent error beats a transient one, since
/// retrying cannot fix it.
fn combine(outcomes: impl Iterator<Item = Outcome>) -> Option<Outcome> {
    let rank = |o: &Outcome| match o {
        Outcome::Delivered => 0,
        Outcome::Rejected { .. } => 1,
        Outcome::Retry { .. } | Outcome::Split | Outcome::Resend => 2,
    };
    outcomes.min_by_key(rank)
}

/// The outcome for every event of a request Google refused as a whole.
fn whole_request(response: &Response) -> Outcome {
    let status = serde_json::from_slice::<ErrorEnvelope>(&response.body)
        .map(|e| e.error)
        .unwrap_or_default();
    let errors = status.errors();
    let first = errors.first();
    let code = first.map(|e| e.code.as_str()).unwrap_or_default();
    let kind = first.map(|e| e.kind.as_str()).unwrap_or_default();
    let summary = {
        let mut s = format!("HTTP {}", response.status);
        if !status.status.is_empty() {
            s.push_str(&format!(" {}", status.status));
        }
        if !code.is_empty() {
            s.push_str(&format!(" {kind}={code}"));
        }
        let message = first
            .map(|e| e.message.as_str())
            .filter(|m| !m.is_empty())
            .unwrap_or(status.message.as_str());
        if message.is_empty() {
            format!("{s}: {}", retry::excerpt(&response.body, 200))
        } else {
            format!("{s}: {message}")
        }
    };
    let throttled = response.status == 429
        || status.status == "RESOURCE_EXHAUSTED"
        || errors.iter().any(|e| is_quota(&e.kind, &e.code));
    if throttled || response.status == 408 || response.status >= 500 {
        let after = response
            .header("retry-after")
            .and_then(|v| retry::retry_after(v, SystemTime::now()))
            .or_else(|| errors.iter().find_map(|e| e.retry_delay));
        return Outcome::Retry {
            after,
            reason: summary,
        };
    }
    let class = match response.status {
        401 | 403 => "google_ads_auth".to_string(),
        s if code.is_empty() => format!("http_{s}"),
        _ => error_class(code),
    };
    Outcome::Rejected {
        class,
        reason: summary,
    }
}

impl Destination for GoogleAds {
    fn oauth(&self) -> Option<&OAuthSettings> {
        self.settings.oauth.as_ref()
    }

    fn limits(&self) -> Limits {
        Limits {
            max_events: MAX_CONVERSIONS,
            max_bytes: 8 * 1024 * 1024,
            max_event_age: Some(MAX_EVENT_AGE),
        }
    }

    fn refuse(&self, delivery: &Delivery) -> Option<Refusal> {
        self.conversion(&delivery.event).err()
    }

    fn vendor_dedup(&self) -> bool {
        true
    }

    fn map(&self, batch: &[Delivery]) -> Vec<Request> {
        let mut requests = Vec::new();
        let mut conversions = Vec::new();
        let mut rows = Vec::new();
        let mut keys: HashSet<(String, &str)> = HashSet::new();
        for (i, d) in batch.iter().enumerate() {
            // The runtime refuses such events before they reach `map`.
            let Ok(c) = self.conversion(&d.event) else {
                continue;
            };
            let key = (c.conversion_action.clone(), c.order_id);
            if conversions.len() == MAX_CONVERSIONS || keys.contains(&key) {
                requests.push(
                    self.request(std::mem::take(&mut conversions), std::mem::take(&mut rows)),
                );
                keys.clear();
            }
            keys.insert(key);
            conversions.push(c);
            rows.push(i);
        }
        if !conversions.is_empty() {
            requests.push(self.request(conversions, rows));
        }
        requests
    }

    fn classify(&self, request: &Request, response: &Response, _: &[Delivery]) -> Classified {
        let throttle = is_throttle(response);
        if !(200..300).contains(&response.status) {
            return Classified {
                throttle,
                ..Classified::all(request, response, whole_request(response))
            };
        }
        let errors = serde_json::from_slice::<UploadResponse>(&response.body)
            .ok()
            .and_then(|r| r.partial_failure_error)
            .map(|s| s.errors())
            .unwrap_or_default();
        // Errors that name no row concern every row.
        let general: Vec<&AdsError> = errors.iter().filter(|e| e.row.is_none()).collect();
        // Google's row numbers are the body's conversions: the request's rows.
        let rows = (0..request.rows.len())
            .map(|this| {
                let mine = errors
                    .iter()
                    .filter(|e| e.row == Some(this))
                    .chain(general.iter().copied())
                    .map(row_outcome);
                combine(mine).unwrap_or(Outcome::Delivered)
            })
            .collect();
        Classified { rows, throttle }
    }
}

/// Whether Google asks for less traffic: 429, or quota exhausted.
fn is_throttle(response: &Response) -> bool {
    response.status == 429
        || (response.status >= 400
            && memchr::memmem::find(&response.body, b"RESOURCE_EXHAUSTED").is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::test_support::{self, body, ok};
    use serde_json::json;

    const EMAIL_HASH: &str = "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b";
    const PHONE_HASH: &str = "3ad9f10d73829a714b1383221691d4dbf08484f3ceeae884f53053a1c7bb0a92";

    fn settings() -> Settings {
        Settings {
            customer_id: "123-456-7890".into(),
            login_customer_id: None,
            developer_token: Secret::new("dev-token"),
            access_token: Some(Secret::new("access")),
            oauth: None,
            conversion_actions: [("purchase", "1001"), ("lead", "1002")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            api_version: "v21".into(),
            base_url: "https://googleads.googleapis.com/".into(),
            time_zone_offset: "+00:00".into(),
            click_id_priority: CLICK_IDS.iter().map(|s| s.to_string()).collect(),
            enhanced_conversions_for_leads: true,
            send_user_identifiers: true,
            consent_ad_user_data: "ads".into(),
            consent_ad_personalization: "ad_personalization".into(),
            validate_only: false,
            debug_enabled: false,
        }
    }

    fn ads() -> GoogleAds {
        GoogleAds::new(settings())
    }

    fn delivery(extra: Value) -> Delivery {
        let ev = json!({
            "event": "purchase", "event_id": "e1", "occurred_at": "2026-11-26T14:03:11Z",
            "user_id": "u_1", "value": 49.5, "currency": "EUR", "order_id": "o-1",
            "email_sha256": EMAIL_HASH, "phone_sha256": PHONE_HASH,
            "click_ids": {"gclid": "Cj0KCQ-test"},
            "consent": {"ads": "granted"}
        });
        let name = extra
            .get("event")
            .unwrap_or(&ev["event"])
            .as_str()
            .unwrap()
            .to_string();
        test_support::delivery("gads", &name, ev, extra)
    }

    fn header<'a>(r: &'a Request, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn offsets_and_date_times() {
        assert_eq!(parse_utc_offset("+00:00"), Some(0));
        assert_eq!(parse_utc_offset("-08:00"), Some(-8 * 3600));
        assert_eq!(parse_utc_offset("+05:45"), Some(5 * 3600 + 45 * 60));
        assert_eq!(parse_utc_offset("+14:00"), Some(14 * 3600));
        for bad in ["", "00:00", "+0:00", "+15:00", "+01:60", "+1a:00", "UTC"] {
            assert_eq!(parse_utc_offset(bad), None, "{bad}");
        }
        let at: DateTime<Utc> = "2026-11-26T14:03:11Z".parse().unwrap();
        assert_eq!(
            conversion_date_time(at, FixedOffset::east_opt(0).unwrap()),
            "2026-11-26 14:03:11+00:00"
        );
        assert_eq!(
            conversion_date_time(at, FixedOffset::west_opt(8 * 3600).unwrap()),
            "2026-11-26 06:03:11-08:00"
        );
    }

    #[test]
    fn request_carries_url_headers_and_conversion() {
        let mut s = settings();
        s.login_customer_id = Some("999-000-1111".into());
        s.time_zone_offset = "+01:00".into();
        let g = GoogleAds::new(s);
        let reqs = g.map(&[delivery(json!({}))]);
        assert_eq!(reqs.len(), 1);
        let r = &reqs[0];
        assert_eq!(
            r.url,
            "https://googleads.googleapis.com/v21/customers/1234567890:uploadClickConversions"
        );
        assert_eq!(header(r, "authorization"), Some("Bearer access"));
        assert_eq!(header(r, "developer-token"), Some("dev-token"));
        assert_eq!(header(r, "login-customer-id"), Some("9990001111"));
        assert_eq!(
            body(r),
            json!({
                "conversions": [{
                    "conversionAction": "customers/1234567890/conversionActions/1001",
                    "conversionDateTime": "2026-11-26 15:03:11+01:00",
                    "gclid": "Cj0KCQ-test",
                    "conversionValue": 49.5,
                    "currencyCode": "EUR",
                    "orderId": "o-1",
                    "userIdentifiers": [
                        {"userIdentifierSource": "FIRST_PARTY", "hashedEmail": EMAIL_HASH},
                        {"userIdentifierSource": "FIRST_PARTY", "hashedPhoneNumber": PHONE_HASH}
                    ],
                    "consent": {"adUserData": "GRANTED"}
                }],
                "partialFailure": true
            })
        );
        assert!(header(&ads().map(&[delivery(json!({}))])[0], "login-customer-id").is_none());
    }

    #[test]
    fn one_click_id_by_priority_and_order_id_falls_back_to_event_id() {
        let d = delivery(
            json!({"click_ids": {"wbraid": "w", "gbraid": "g", "gclid": "c"}, "order_id": null}),
        );
        let c = &body(&ads().map(std::slice::from_ref(&d))[0])["conversions"][0];
        assert_eq!(c["gclid"], "c");
        assert!(c.get("gbraid").is_none() && c.get("wbraid").is_none());
        assert_eq!(c["orderId"], "e1");
        let mut s = settings();
        s.click_id_priority = vec!["wbraid".into(), "gclid".into()];
        let c = &body(&GoogleAds::new(s).map(&[d])[0])["conversions"][0];
        assert_eq!(c["wbraid"], "w");
        assert!(c.get("gclid").is_none());
    }

    #[test]
    fn leads_without_click_id_follow_the_setting() {
        let lead = delivery(json!({"event": "lead", "click_ids": null}));
        assert_eq!(ads().refuse(&lead), None);
        let c = &body(&ads().map(std::slice::from_ref(&lead))[0])["conversions"][0];
        assert!(c.get("gclid").is_none());
        assert_eq!(c["userIdentifiers"].as_array().unwrap().len(), 2);
        let mut s = settings();
        s.enhanced_conversions_for_leads = false;
        let r = GoogleAds::new(s).refuse(&lead).unwrap();
        assert_eq!(r.class, "no_click_id");
        assert!(r.reason.contains("enhanced_conversions_for_leads"));
        let bare = delivery(json!({"click_ids": null, "email_sha256": null, "phone_sha256": null}));
        assert_eq!(ads().refuse(&bare).unwrap().class, "no_click_id");
        let unmapped = delivery(json!({"event": "sign_up"}));
        assert_eq!(ads().refuse(&unmapped).unwrap().class, "unmapped");
    }

    #[test]
    fn only_digests_are_sent_as_identifiers() {
        let d = delivery(json!({
            "email_sha256": EMAIL_HASH.to_uppercase(),
            "phone_sha256": "+15551234567"
        }));
        let c = &body(&ads().map(&[d])[0])["conversions"][0];
        assert_eq!(
            c["userIdentifiers"],
            json!([{"userIdentifierSource": "FIRST_PARTY", "hashedEmail": EMAIL_HASH}])
        );
        let mut s = settings();
        s.send_user_identifiers = false;
        let c = &body(&GoogleAds::new(s).map(&[delivery(json!({}))])[0])["conversions"][0];
        assert!(c.get("userIdentifiers").is_none());
    }

    #[test]
    fn consent_maps_configured_categories() {
        let d = delivery(json!({"consent": {"ads": "granted", "ad_personalization": "denied"}}));
        let c = &body(&ads().map(&[d])[0])["conversions"][0];
        assert_eq!(
            c["consent"],
            json!({"adUserData": "GRANTED", "adPersonalization": "DENIED"})
        );
        let mut s = settings();
        s.consent_ad_user_data = String::new();
        s.consent_ad_personalization = String::new();
        let c = &body(&GoogleAds::new(s).map(&[delivery(json!({}))])[0])["conversions"][0];
        assert!(c.get("consent").is_none());
    }

    #[test]
    fn batches_split_at_the_limit_and_on_repeated_orders() {
        let batch: Vec<Delivery> = (0..MAX_CONVERSIONS + 5)
            .map(|i| delivery(json!({"event_id": format!("e{i}"), "order_id": format!("o{i}")})))
            .collect();
        let reqs = ads().map(&batch);
        assert_eq!(
            test_support::ranges(&reqs),
            vec![0..MAX_CONVERSIONS, MAX_CONVERSIONS..MAX_CONVERSIONS + 5]
        );
        // The same order twice for one action: separate requests; for another action: together.
        let batch = [
            delivery(json!({"event_id": "a"})),
            delivery(json!({"event_id": "b", "event": "lead"})),
            delivery(json!({"event_id": "c"})),
        ];
        let reqs = ads().map(&batch);
        assert_eq!(test_support::ranges(&reqs), vec![0..2, 2..3]);
    }

    fn partial(errors: Value) -> Value {
        json!({
            "results": [],
            "partialFailureError": {
                "code": 3, "message": "failed",
                "details": [{
                    "@type": "type.googleapis.com/google.ads.googleads.v21.errors.GoogleAdsFailure",
                    "errors": errors
                }]
            }
        })
    }

    fn row_error(kind: &str, code: &str, index: u64) -> Value {
        json!({
            "errorCode": {kind: code},
            "message": "m",
            "location": {"fieldPathElements": [{"fieldName": "conversions", "index": index}, {"fieldName": "gclid"}]}
        })
    }

    #[test]
    fn partial_failures_decide_per_row() {
        let batch: Vec<Delivery> = (0..5)
            .map(|i| delivery(json!({"event_id": format!("e{i}"), "order_id": format!("o{i}")})))
            .collect();
        let resp = ok(partial(json!([
            row_error(
                "conversionUploadError",
                "CLICK_CONVERSION_ALREADY_EXISTS",
                1
            ),
            row_error("conversionUploadError", "INVALID_USER_IDENTIFIER", 2),
            row_error("conversionUploadError", "TOO_RECENT_EVENT", 3),
            row_error("conversionUploadError", "ORDER_ID_ALREADY_IN_USE", 4),
        ])));
        let o = test_support::classify(&ads(), &resp, &batch);
        assert_eq!(o[0], Outcome::Delivered);
        assert_eq!(o[1], Outcome::Delivered);
        assert!(
            matches!(&o[2], Outcome::Rejected { class, reason } if class == "google_ads_invalid_user_identifier" && reason.contains("conversionUploadError"))
        );
        assert!(matches!(&o[3], Outcome::Retry { after: Some(d), .. } if *d == TOO_RECENT_WAIT));
        assert_eq!(o[4], Outcome::Delivered);
        assert_eq!(
            test_support::classify(&ads(), &ok(json!({"results": [{}, {}]})), &batch[..2]),
            vec![Outcome::Delivered; 2]
        );
    }

    #[test]
    fn rows_of_refused_events_are_skipped_when_counting() {
        let batch = [
            delivery(json!({"event": "sign_up", "event_id": "x"})),
            delivery(json!({"event_id": "y"})),
        ];
        let reqs = ads().map(&batch);
        assert_eq!(reqs[0].rows, vec![1]);
        assert_eq!(body(&reqs[0])["conversions"].as_array().unwrap().len(), 1);
        // The refused event travels in no request (the runtime dead-letters
        // it first): Google's row 0 is the batch's row 1.
        assert!(ads().refuse(&batch[0]).is_some());
        let o = ads().classify(
            &reqs[0],
            &ok(partial(json!([row_error(
                "dateError",
                "LATER_THAN_MAXIMUM_DATE",
                0
            )]))),
            &batch,
        );
        assert!(
            matches!(&o.rows[..], [Outcome::Rejected { class, .. }] if class == "google_ads_later_than_maximum_date")
        );
    }

    fn failure(status: u16, grpc: &str, kind: &str, code: &str) -> Response {
        Response {
            status,
            headers: vec![],
            body: serde_json::to_vec(&json!({"error": {
                "code": status, "message": "top", "status": grpc,
                "details": [{
                    "@type": "type.googleapis.com/google.ads.googleads.v21.errors.GoogleAdsFailure",
                    "errors": [{"errorCode": {kind: code}, "message": "detail"}]
                }]
            }}))
            .unwrap(),
        }
    }

    #[test]
    fn whole_request_errors() {
        let batch = [delivery(json!({}))];
        let o = test_support::classify(
            &ads(),
            &failure(
                401,
                "UNAUTHENTICATED",
                "authenticationError",
                "OAUTH_TOKEN_INVALID",
            ),
            &batch,
        );
        assert!(
            matches!(&o[0], Outcome::Rejected { class, reason } if class == "google_ads_auth" && reason.contains("OAUTH_TOKEN_INVALID"))
        );
        let o = test_support::classify(
            &ads(),
            &failure(
                400,
                "INVALID_ARGUMENT",
                "requestError",
                "DEVELOPER_TOKEN_PARAMETER_MISSING",
            ),
            &batch,
        );
        assert!(
            matches!(&o[0], Outcome::Rejected { class, .. } if class == "google_ads_developer_token_parameter_missing")
        );
        let mut throttled = failure(
            429,
            "RESOURCE_EXHAUSTED",
            "quotaError",
            "RESOURCE_EXHAUSTED",
        );
        assert!(is_throttle(&throttled));
        assert!(matches!(
            test_support::classify(&ads(), &throttled, &batch)[0],
            Outcome::Retry { after: None, .. }
        ));
        throttled.headers.push(("retry-after".into(), "7".into()));
        assert!(matches!(
            test_support::classify(&ads(), &throttled, &batch)[0],
            Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(7)
        ));
        let unavailable = Response {
            status: 503,
            headers: vec![],
            body: b"<html>".to_vec(),
        };
        assert!(!is_throttle(&unavailable));
        assert!(matches!(
            test_support::classify(&ads(), &unavailable, &batch)[0],
            Outcome::Retry { .. }
        ));
        let not_found = Response {
            status: 404,
            headers: vec![],
            body: vec![],
        };
        assert!(
            matches!(&test_support::classify(&ads(), &not_found, &batch)[0], Outcome::Rejected { class, .. } if class == "http_404")
        );
    }

    #[test]
    fn quota_retry_delay_is_read() {
        let e = json!({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [{"errors": [{
            "errorCode": {"quotaError": "RESOURCE_EXHAUSTED"},
            "details": {"quotaErrorDetails": {"retryDelay": "30s"}}
        }]}]}});
        let r = Response {
            status: 429,
            headers: vec![],
            body: serde_json::to_vec(&e).unwrap(),
        };
        assert!(matches!(
            test_support::classify(&ads(), &r, &[delivery(json!({}))])[0],
            Outcome::Retry { after: Some(d), .. } if d == Duration::from_secs(30)
        ));
    }

    #[test]
    fn flags_reach_the_body() {
        let mut s = settings();
        s.validate_only = true;
        s.debug_enabled = true;
        let b = body(&GoogleAds::new(s).map(&[delivery(json!({}))])[0]);
        assert_eq!(b["validateOnly"], true);
        assert_eq!(b["debugEnabled"], true);
        assert_eq!(b["partialFailure"], true);
    }
}
