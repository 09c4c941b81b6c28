//! Google Ads `ConversionUploadService.UploadClickConversions` over REST.
//!
//! `POST /{version}/customers/{cid}:uploadClickConversions`. Checks, in
//! Google's order: path and version, OAuth bearer token, developer token,
//! login-customer-id, customer access, the JSON body (unknown fields and
//! bad enum values fail the whole request, as Google's JSON parser does),
//! the batch size, then every conversion on its own. Whole-request failures
//! answer `{"error":{"code","message","status","details":[GoogleAdsFailure]}}`;
//! row failures answer HTTP 200 with `partialFailureError` and an empty
//! `results[i]` (with `partialFailure: false`, any row error fails the
//! request instead, as Google's all-or-nothing mode does).
//!
//! Dedup: an `orderId` is used once per conversion action
//! (ORDER_ID_ALREADY_IN_USE); without one, the same click and
//! `conversionDateTime` twice is CLICK_CONVERSION_ALREADY_EXISTS. Within one
//! request repeated keys are DUPLICATE_ORDER_ID /
//! DUPLICATE_CLICK_CONVERSION_IN_REQUEST and none of them is taken.
//!
//! Stricter than Google in one place, on purpose: Google ignores the
//! customer id inside `conversionAction` and looks at the action id alone;
//! with `strict_action_customer` (default) an action of another customer is
//! refused, because sending one is always a mapping bug.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, FixedOffset, Utc};
use serde_json::{Map, Value, json};

use crate::{Accepted, Dedup, Incoming, Reply, Vendor, is_sha256_hex};

#[derive(Debug, Clone)]
pub struct Settings {
    /// The customer the credentials may upload to (digits).
    pub customer_id: String,
    /// Manager account the developer signs in through; when set, the
    /// `login-customer-id` header must carry it.
    pub login_customer_id: Option<String>,
    pub developer_token: String,
    pub access_token: String,
    /// API versions still served.
    pub api_versions: Vec<String>,
    /// Conversion action ids of the customer that accept uploads.
    pub conversion_actions: Vec<String>,
    pub strict_action_customer: bool,
    /// Most conversions per request.
    pub max_conversions: usize,
    /// Most user identifiers per conversion.
    pub max_user_identifiers: usize,
    /// Conversions with identifiers only (no click id) are accepted.
    pub enhanced_conversions_for_leads: bool,
    /// The customer accepted the customer data terms (needed for identifiers).
    pub customer_data_terms_accepted: bool,
    /// How long an order id / click stays "already in use".
    pub dedup_window: Duration,
    /// The OAuth client whose refresh token `POST /token` exchanges for
    /// access tokens (Google's token endpoint, served by this fake too).
    pub oauth: OAuthClient,
}

/// An OAuth 2 client as Google's token endpoint knows it.
#[derive(Debug, Clone)]
pub struct OAuthClient {
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    /// How long an issued access token is accepted.
    pub token_lifetime: Duration,
}

impl Default for OAuthClient {
    fn default() -> Self {
        OAuthClient {
            client_id: "demo-client.apps.googleusercontent.com".into(),
            client_secret: "demo-client-secret".into(),
            refresh_token: "demo-refresh-token".into(),
            token_lifetime: Duration::from_secs(3599),
        }
    }
}

impl OAuthClient {
    /// An access token valid until `expires` (unix seconds). Tokens carry
    /// their expiry and a MAC, so the fake checks them without a store.
    fn issue(&self, expires: i64) -> String {
        format!("ya29.{expires}.{}", self.mac(expires))
    }

    fn mac(&self, expires: i64) -> String {
        use sha2::{Digest, Sha256};
        let d = Sha256::digest(format!("{}:{expires}", self.client_secret).as_bytes());
        hex::encode(&d[..12])
    }

    /// Whether `token` was issued by this fake and is unexpired at `now`.
    fn accepts(&self, token: &str, now: DateTime<Utc>) -> bool {
        let Some((expires, mac)) = token
            .strip_prefix("ya29.")
            .and_then(|t| t.split_once('.'))
            .and_then(|(e, m)| Some((e.parse::<i64>().ok()?, m)))
        else {
            return false;
        };
        expires > now.timestamp() && mac == self.mac(expires)
    }

    /// `POST /token` with `grant_type=refresh_token`, answered the way
    /// Google's token endpoint answers.
    fn token(&self, req: &Incoming, now: DateTime<Utc>) -> Reply {
        let form: Vec<(String, String)> = crate::parse_form(&String::from_utf8_lossy(&req.body));
        let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let oauth_error = |status: u16, error: &str, description: &str| {
            Reply::json(
                status,
                json!({"error": error, "error_description": description}),
            )
        };
        if req.method != "POST" {
            return oauth_error(405, "invalid_request", "POST only");
        }
        if field("grant_type") != Some("refresh_token") {
            return oauth_error(400, "unsupported_grant_type", "Invalid grant_type: ");
        }
        if field("client_id") != Some(self.client_id.as_str())
            || field("client_secret") != Some(self.client_secret.as_str())
        {
            return oauth_error(401, "invalid_client", "The OAuth client was not found.");
        }
        if field("refresh_token") != Some(self.refresh_token.as_str()) {
            return oauth_error(400, "invalid_grant", "Token has been expired or revoked.");
        }
        let lifetime = self.token_lifetime.as_secs() as i64;
        Reply::json(
            200,
            json!({
                "access_token": self.issue(now.timestamp().saturating_add(lifetime)),
                "expires_in": lifetime,
                "scope": "https://www.googleapis.com/auth/adwords",
                "token_type": "Bearer"
            }),
        )
    }
}

impl Default for Settings {
    /// The demo credentials of `examples/demo.toml` and Google's limits.
    fn default() -> Self {
        Settings {
            customer_id: "1234567890".into(),
            login_customer_id: None,
            developer_token: "demo-token".into(),
            access_token: "demo-token".into(),
            api_versions: ["v20", "v21", "v22"].map(String::from).to_vec(),
            conversion_actions: ["1001", "1002", "1003"].map(String::from).to_vec(),
            strict_action_customer: true,
            max_conversions: 2000,
            max_user_identifiers: 5,
            enhanced_conversions_for_leads: true,
            customer_data_terms_accepted: true,
            // Google keeps conversions far longer than any click window.
            dedup_window: Duration::from_secs(90 * 24 * 3600),
            oauth: OAuthClient::default(),
        }
    }
}

/// One `GoogleAdsError`.
#[derive(Clone)]
struct AdsError {
    kind: &'static str,
    code: &'static str,
    message: String,
    /// `conversions[index]` and the field below it, if any.
    at: Option<(usize, Option<&'static str>)>,
}

impl AdsError {
    fn new(kind: &'static str, code: &'static str, message: impl Into<String>) -> AdsError {
        AdsError {
            kind,
            code,
            message: message.into(),
            at: None,
        }
    }

    fn at(mut self, index: usize, field: Option<&'static str>) -> AdsError {
        self.at = Some((index, field));
        self
    }

    fn json(&self) -> Value {
        let mut e = json!({"errorCode": {self.kind: self.code}, "message": self.message});
        if let Some((i, field)) = self.at {
            let mut path = vec![json!({"fieldName": "conversions", "index": i})];
            if let Some(f) = field {
                path.push(json!({"fieldName": f}));
            }
            e["location"] = json!({"fieldPathElements": path});
        }
        e
    }
}

fn failure(version: &str, errors: &[AdsError]) -> Value {
    json!({
        "@type": format!("type.googleapis.com/google.ads.googleads.{version}.errors.GoogleAdsFailure"),
        "errors": errors.iter().map(AdsError::json).collect::<Vec<_>>(),
        "requestId": "fake-request-id"
    })
}

/// A whole-request error in Google's REST shape.
fn error(status: u16, grpc: &str, version: &str, errors: &[AdsError]) -> Reply {
    let message = errors
        .first()
        .map(|e| e.message.clone())
        .unwrap_or_else(|| grpc.to_string());
    let details = if errors.is_empty() {
        vec![]
    } else {
        vec![failure(version, errors)]
    };
    Reply::json(
        status,
        json!({"error": {"code": status, "message": message, "status": grpc, "details": details}}),
    )
}

/// The JSON parser's refusal (no GoogleAdsFailure: the request never
/// reached the Ads backend).
fn bad_json(field: &str, description: String) -> Reply {
    Reply::json(
        400,
        json!({"error": {
            "code": 400,
            "message": format!("Invalid JSON payload received. {description}"),
            "status": "INVALID_ARGUMENT",
            "details": [{
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": field, "description": description}]
            }]
        }}),
    )
}

const TOP_FIELDS: &[&str] = &[
    "customerId",
    "customer_id",
    "conversions",
    "partialFailure",
    "partial_failure",
    "validateOnly",
    "validate_only",
    "debugEnabled",
    "debug_enabled",
    "jobId",
    "job_id",
];

const CONVERSION_FIELDS: &[&str] = &[
    "gclid",
    "gbraid",
    "wbraid",
    "conversionAction",
    "conversion_action",
    "conversionDateTime",
    "conversion_date_time",
    "conversionValue",
    "conversion_value",
    "currencyCode",
    "currency_code",
    "orderId",
    "order_id",
    "externalAttributionData",
    "external_attribution_data",
    "customVariables",
    "custom_variables",
    "cartData",
    "cart_data",
    "userIdentifiers",
    "user_identifiers",
    "conversionEnvironment",
    "conversion_environment",
    "consent",
    "customerType",
    "customer_type",
    "userIpAddress",
    "user_ip_address",
    "sessionAttributesEncoded",
    "session_attributes_encoded",
    "sessionAttributesKeyValuePairs",
    "session_attributes_key_value_pairs",
];

const IDENTIFIER_FIELDS: &[&str] = &[
    "userIdentifierSource",
    "user_identifier_source",
    "hashedEmail",
    "hashed_email",
    "hashedPhoneNumber",
    "hashed_phone_number",
    "mobileId",
    "mobile_id",
    "thirdPartyUserId",
    "third_party_user_id",
    "addressInfo",
    "address_info",
];

const CONSENT_STATUS: &[&str] = &["UNSPECIFIED", "UNKNOWN", "GRANTED", "DENIED"];
const IDENTIFIER_SOURCES: &[&str] = &["UNSPECIFIED", "UNKNOWN", "FIRST_PARTY", "THIRD_PARTY"];

/// A field by its JSON (lowerCamel) or proto (snake_case) name; Google's
/// parser takes both.
fn field<'v>(m: &'v Map<String, Value>, camel: &str) -> Option<&'v Value> {
    m.get(camel).or_else(|| {
        let snake: String = camel
            .chars()
            .flat_map(|c| {
                if c.is_ascii_uppercase() {
                    vec!['_', c.to_ascii_lowercase()]
                } else {
                    vec![c]
                }
            })
            .collect();
        m.get(&snake)
    })
}

fn text<'v>(m: &'v Map<String, Value>, camel: &str) -> Option<&'v str> {
    field(m, camel)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// The JSON parser's checks: structure, known fields, value types, enums.
/// `v` as a list, or Google's message at `at`.
fn list<'v>(v: &'v Value, at: &str) -> Result<&'v Vec<Value>, (String, String)> {
    v.as_array().ok_or_else(|| {
        (
            at.to_string(),
            format!("Invalid value at '{at}': expected a list."),
        )
    })
}

/// `v` as an object holding only `known` fields, or Google's message at `at`.
fn known_object<'v>(
    v: &'v Value,
    at: &str,
    known: &[&str],
) -> Result<&'v Map<String, Value>, (String, String)> {
    let o = v.as_object().ok_or_else(|| {
        (
            at.to_string(),
            format!("Invalid value at '{at}': expected an object."),
        )
    })?;
    match o.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err((
            at.to_string(),
            format!("Unknown name \"{k}\" at '{at}': Cannot find field."),
        )),
        None => Ok(o),
    }
}

fn parse_body(body: &Value) -> Result<(), (String, String)> {
    let top = body.as_object().ok_or_else(|| {
        (
            String::new(),
            "The request body is not a JSON object.".to_string(),
        )
    })?;
    for k in top.keys() {
        if !TOP_FIELDS.contains(&k.as_str()) {
            return Err((
                k.clone(),
                format!("Unknown name \"{k}\": Cannot find field."),
            ));
        }
    }
    let Some(conversions) = field(top, "conversions") else {
        return Ok(());
    };
    for (i, c) in list(conversions, "conversions")?.iter().enumerate() {
        let at = format!("conversions[{i}]");
        let c = known_object(c, &at, CONVERSION_FIELDS)?;
        for k in [
            "gclid",
            "gbraid",
            "wbraid",
            "conversionAction",
            "conversionDateTime",
            "currencyCode",
            "orderId",
        ] {
            if let Some(v) = field(c, k)
                && !v.is_string()
            {
                return Err((
                    format!("{at}.{k}"),
                    format!("Invalid value at '{at}.{k}' (TYPE_STRING), {v}"),
                ));
            }
        }
        if let Some(v) = field(c, "conversionValue") {
            let numeric = v.is_number() || v.as_str().is_some_and(|s| s.parse::<f64>().is_ok());
            if !numeric {
                return Err((
                    format!("{at}.conversion_value"),
                    format!("Invalid value at '{at}.conversion_value' (TYPE_DOUBLE), {v}"),
                ));
            }
        }
        if let Some(consent) = field(c, "consent") {
            let consent = consent.as_object().ok_or_else(|| {
                (
                    format!("{at}.consent"),
                    format!("Invalid value at '{at}.consent': expected an object."),
                )
            })?;
            for (k, v) in consent {
                if !matches!(
                    k.as_str(),
                    "adUserData" | "ad_user_data" | "adPersonalization" | "ad_personalization"
                ) {
                    return Err((
                        format!("{at}.consent"),
                        format!("Unknown name \"{k}\" at '{at}.consent': Cannot find field."),
                    ));
                }
                if !v.as_str().is_some_and(|s| CONSENT_STATUS.contains(&s)) {
                    return Err((
                        format!("{at}.consent.{k}"),
                        format!(
                            "Invalid value at '{at}.consent.{k}' (type.googleapis.com/google.ads.googleads.ConsentStatus), {v}"
                        ),
                    ));
                }
            }
        }
        if let Some(ids) = field(c, "userIdentifiers") {
            let ids = list(ids, &format!("{at}.user_identifiers"))?;
            for (j, id) in ids.iter().enumerate() {
                let here = format!("{at}.user_identifiers[{j}]");
                let id = known_object(id, &here, IDENTIFIER_FIELDS)?;
                if let Some(v) = field(id, "userIdentifierSource")
                    && !v.as_str().is_some_and(|s| IDENTIFIER_SOURCES.contains(&s))
                {
                    return Err((
                        format!("{here}.user_identifier_source"),
                        format!("Invalid value at '{here}.user_identifier_source', {v}"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// `yyyy-mm-dd hh:mm:ss+|-hh:mm` (seconds may carry a fraction).
fn parse_date_time(s: &str) -> Option<DateTime<FixedOffset>> {
    let b = s.as_bytes();
    // The offset must be spelt out; "Z" and "T" are not Google's format.
    if b.len() < 25 || b[10] != b' ' || !matches!(b[b.len() - 6], b'+' | b'-') {
        return None;
    }
    DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%:z").ok()
}

/// One conversion's errors (none when it is good) and its dedup key.
struct Checked {
    errors: Vec<AdsError>,
    dedup_key: Option<String>,
    order_id: Option<String>,
}

impl Settings {
    fn check(&self, i: usize, c: &Map<String, Value>, now: DateTime<Utc>) -> Checked {
        let mut errors = Vec::new();
        let mut action_id = String::new();
        match text(c, "conversionAction") {
            None => errors.push(
                AdsError::new(
                    "fieldError",
                    "REQUIRED",
                    "The conversion action is required.",
                )
                .at(i, Some("conversion_action")),
            ),
            Some(a) => {
                let parts: Vec<&str> = a.split('/').collect();
                let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
                match parts.as_slice() {
                    ["customers", cid, "conversionActions", id] if digits(cid) && digits(id) => {
                        action_id = (*id).to_string();
                        let foreign = self.strict_action_customer && *cid != self.customer_id;
                        if foreign || !self.conversion_actions.iter().any(|k| k == id) {
                            errors.push(
                                AdsError::new(
                                    "conversionUploadError",
                                    "NO_CONVERSION_ACTION_FOUND",
                                    format!(
                                        "The conversion action {a} cannot be found in customer {}.",
                                        self.customer_id
                                    ),
                                )
                                .at(i, Some("conversion_action")),
                            );
                        }
                    }
                    _ => errors.push(
                        AdsError::new(
                            "requestError",
                            "RESOURCE_NAME_MALFORMED",
                            format!("Malformed resource name '{a}'."),
                        )
                        .at(i, Some("conversion_action")),
                    ),
                }
            }
        }
        let date_time = text(c, "conversionDateTime");
        match date_time.map(|s| (s, parse_date_time(s))) {
            None => errors.push(
                AdsError::new("fieldError", "REQUIRED", "The conversion date time is required.")
                    .at(i, Some("conversion_date_time")),
            ),
            Some((s, None)) => errors.push(
                AdsError::new(
                    "dateError",
                    "INVALID_STRING_DATE_TIME_SECONDS_WITH_OFFSET",
                    format!("The string date time's format should be yyyy-mm-dd hh:mm:ss+|-hh:mm, got '{s}'."),
                )
                .at(i, Some("conversion_date_time")),
            ),
            Some((_, Some(t))) if t.with_timezone(&Utc) > now => errors.push(
                AdsError::new("dateError", "LATER_THAN_MAXIMUM_DATE", "Date is after allowed maximum.")
                    .at(i, Some("conversion_date_time")),
            ),
            Some(_) => {}
        }
        let clicks: Vec<(&'static str, &str)> = [
            ("gclid", "gclid"),
            ("gbraid", "gbraid"),
            ("wbraid", "wbraid"),
        ]
        .into_iter()
        .filter_map(|(name, key)| text(c, key).map(|v| (name, v)))
        .collect();
        let ids: Vec<&Map<String, Value>> = field(c, "userIdentifiers")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_object).collect())
            .unwrap_or_default();
        match clicks.as_slice() {
            [] if ids.is_empty() => errors.push(
                AdsError::new(
                    "fieldError",
                    "REQUIRED",
                    "A click id (gclid, gbraid or wbraid) or user identifiers are required.",
                )
                .at(i, Some("gclid")),
            ),
            [] if !self.enhanced_conversions_for_leads => errors.push(
                AdsError::new(
                    "conversionUploadError",
                    "CUSTOMER_NOT_ENABLED_ENHANCED_CONVERSIONS_FOR_LEADS",
                    "Enhanced conversions for leads is not enabled for this customer.",
                )
                .at(i, None),
            ),
            [_] | [] => {}
            many if many.iter().any(|(n, _)| *n == "gbraid")
                && many.iter().any(|(n, _)| *n == "wbraid") =>
            {
                errors.push(
                    AdsError::new(
                        "conversionUploadError",
                        "GBRAID_WBRAID_BOTH_SET",
                        "Can't use both gbraid and wbraid parameters.",
                    )
                    .at(i, Some("wbraid")),
                )
            }
            many => errors.push(
                AdsError::new(
                    "fieldError",
                    "VALUE_MUST_BE_UNSET",
                    "Only one of gclid, gbraid and wbraid may be set.",
                )
                .at(
                    i,
                    Some(if many.iter().any(|(n, _)| *n == "gbraid") {
                        "gbraid"
                    } else {
                        "wbraid"
                    }),
                ),
            ),
        }
        if !ids.is_empty() && !self.customer_data_terms_accepted {
            errors.push(
                AdsError::new(
                    "conversionUploadError",
                    "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS",
                    "The customer has not accepted the customer data terms.",
                )
                .at(i, Some("user_identifiers")),
            );
        }
        if ids.len() > self.max_user_identifiers {
            errors.push(
                AdsError::new(
                    "collectionSizeError",
                    "TOO_MANY",
                    "Too many user identifiers.",
                )
                .at(i, Some("user_identifiers")),
            );
        }
        for id in &ids {
            let email = text(id, "hashedEmail");
            let phone = text(id, "hashedPhoneNumber");
            let other = ["mobileId", "thirdPartyUserId", "addressInfo"]
                .iter()
                .any(|k| field(id, k).is_some());
            let set =
                usize::from(email.is_some()) + usize::from(phone.is_some()) + usize::from(other);
            if other || set != 1 {
                errors.push(
                    AdsError::new(
                        "conversionUploadError",
                        "UNSUPPORTED_USER_IDENTIFIER",
                        "Use only hashed email or phone number, one per identifier.",
                    )
                    .at(i, Some("user_identifiers")),
                );
            } else if !email.or(phone).is_some_and(is_sha256_hex) {
                errors.push(
                    AdsError::new(
                        "conversionUploadError",
                        "INVALID_USER_IDENTIFIER",
                        "Make sure you hash user provided data using SHA-256 and normalize it.",
                    )
                    .at(i, Some("user_identifiers")),
                );
            }
        }
        if let Some(cur) = field(c, "currencyCode") {
            let ok = cur
                .as_str()
                .is_some_and(|s| s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase()));
            if !ok {
                errors.push(
                    AdsError::new(
                        "currencyCodeError",
                        "UNSUPPORTED",
                        "The currency code is not supported.",
                    )
                    .at(i, Some("currency_code")),
                );
            }
        }
        if let Some(v) = field(c, "conversionValue")
            .and_then(|v| v.as_f64().or_else(|| v.as_str()?.parse().ok()))
            && (v < 0.0 || !v.is_finite())
        {
            errors.push(
                AdsError::new(
                    "fieldError",
                    "INVALID_VALUE",
                    "The conversion value must not be negative.",
                )
                .at(i, Some("conversion_value")),
            );
        }
        let order_id = text(c, "orderId").map(str::to_string);
        let dedup_key = match (&order_id, clicks.first(), date_time) {
            (Some(o), _, _) => Some(format!("order:{action_id}:{o}")),
            (None, Some((n, v)), Some(t)) => Some(format!("click:{action_id}:{n}:{v}:{t}")),
            _ => None,
        };
        Checked {
            errors,
            dedup_key,
            order_id,
        }
    }
}

impl Vendor for Settings {
    fn dedup_window(&self) -> Duration {
        self.dedup_window
    }

    fn handle(&self, req: &Incoming, dedup: &mut Dedup, now: DateTime<Utc>) -> Reply {
        if req.path == "/token" {
            return self.oauth.token(req, now);
        }
        // /{version}/customers/{cid}:uploadClickConversions
        let route = req
            .path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .and_then(|(v, rest)| {
                let cid = rest
                    .strip_prefix("customers/")?
                    .strip_suffix(":uploadClickConversions")?;
                Some((v.to_string(), cid.to_string()))
            });
        let Some((version, cid)) = route.filter(|(v, _)| self.api_versions.contains(v)) else {
            return Reply::json(
                404,
                json!({"error": {"code": 404, "message": format!("Method not found: {}", req.path), "status": "NOT_FOUND"}}),
            );
        };
        let v = version.as_str();
        if req.method != "POST" {
            return Reply::json(
                405,
                json!({"error": {"code": 405, "message": "Only POST is supported.", "status": "METHOD_NOT_ALLOWED"}}),
            );
        }
        match req
            .header("authorization")
            .and_then(|h| h.strip_prefix("Bearer "))
        {
            None => {
                return error(
                    401,
                    "UNAUTHENTICATED",
                    v,
                    &[AdsError::new(
                        "authenticationError",
                        "OAUTH_TOKEN_HEADER_INVALID",
                        "Request is missing required authentication credential. Expected OAuth 2 access token.",
                    )],
                );
            }
            Some(t) if t != self.access_token && !self.oauth.accepts(t, now) => {
                return error(
                    401,
                    "UNAUTHENTICATED",
                    v,
                    &[AdsError::new(
                        "authenticationError",
                        "OAUTH_TOKEN_INVALID",
                        "Request had invalid authentication credentials.",
                    )],
                );
            }
            Some(_) => {}
        }
        match req.header("developer-token") {
            None | Some("") => {
                return error(
                    400,
                    "INVALID_ARGUMENT",
                    v,
                    &[AdsError::new(
                        "requestError",
                        "DEVELOPER_TOKEN_PARAMETER_MISSING",
                        "The developer-token parameter is required for all requests.",
                    )],
                );
            }
            Some(t) if t != self.developer_token => {
                return error(
                    401,
                    "UNAUTHENTICATED",
                    v,
                    &[AdsError::new(
                        "authenticationError",
                        "DEVELOPER_TOKEN_INVALID",
                        "The developer token is not valid.",
                    )],
                );
            }
            Some(_) => {}
        }
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(&cid) {
            return error(
                401,
                "UNAUTHENTICATED",
                v,
                &[AdsError::new(
                    "authenticationError",
                    "CLIENT_CUSTOMER_ID_INVALID",
                    format!("Client customer ID '{cid}' is not a number (no dashes)."),
                )],
            );
        }
        let login = req.header("login-customer-id");
        if let Some(l) = login
            && !digits(l)
        {
            return error(
                400,
                "INVALID_ARGUMENT",
                v,
                &[AdsError::new(
                    "headerError",
                    "INVALID_LOGIN_CUSTOMER_ID",
                    "The login customer ID could not be validated.",
                )],
            );
        }
        let allowed_login = match (&self.login_customer_id, login) {
            (Some(manager), Some(l)) => l == manager,
            (Some(_), None) => false,
            (None, Some(l)) => l == self.customer_id,
            (None, None) => true,
        };
        if cid != self.customer_id || !allowed_login {
            return error(
                403,
                "PERMISSION_DENIED",
                v,
                &[AdsError::new(
                    "authorizationError",
                    "USER_PERMISSION_DENIED",
                    "User doesn't have permission to access customer. If accessing a client customer, the manager's customer id must be set in the 'login-customer-id' header.",
                )],
            );
        }
        let Some(body) = req.json() else {
            return bad_json("", "Unexpected token: the body is not JSON.".into());
        };
        if let Err((f, why)) = parse_body(&body) {
            return bad_json(&f, why);
        }
        let get = |k: &str| body.as_object().and_then(|m| field(m, k));
        let flag = |k: &str| get(k).and_then(Value::as_bool).unwrap_or(false);
        let partial = flag("partialFailure");
        let validate_only = flag("validateOnly");
        let conversions: Vec<&Map<String, Value>> = get("conversions")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_object).collect())
            .unwrap_or_default();
        if conversions.is_empty() {
            return error(
                400,
                "INVALID_ARGUMENT",
                v,
                &[AdsError::new(
                    "requestError",
                    "REQUIRED_FIELD_MISSING",
                    "The conversions field is required and must not be empty.",
                )],
            );
        }
        if conversions.len() > self.max_conversions {
            return error(
                400,
                "INVALID_ARGUMENT",
                v,
                &[AdsError::new(
                    "conversionUploadError",
                    "TOO_MANY_CONVERSIONS_IN_REQUEST",
                    format!(
                        "Upload fewer than {} events in a single request.",
                        self.max_conversions + 1
                    ),
                )],
            );
        }

        let mut checked: Vec<Checked> = conversions
            .iter()
            .enumerate()
            .map(|(i, c)| self.check(i, c, now))
            .collect();
        // Keys repeated inside this request: none of those rows is taken.
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for c in &checked {
            if let Some(k) = &c.dedup_key {
                *counts.entry(k.as_str()).or_default() += 1;
            }
        }
        let repeated: HashSet<String> = counts
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(k, _)| k.to_string())
            .collect();
        for (i, c) in checked.iter_mut().enumerate() {
            let Some(key) = c.dedup_key.clone() else {
                continue;
            };
            let by_order = c.order_id.is_some();
            if repeated.contains(&key) {
                c.errors.push(if by_order {
                    AdsError::new(
                        "conversionUploadError",
                        "DUPLICATE_ORDER_ID",
                        "Imported events include multiple conversions with the same order ID and were not processed.",
                    )
                    .at(i, Some("order_id"))
                } else {
                    AdsError::new(
                        "conversionUploadError",
                        "DUPLICATE_CLICK_CONVERSION_IN_REQUEST",
                        "Multiple events have the same click and conversion_date_time.",
                    )
                    .at(i, Some("conversion_date_time"))
                });
            } else if c.errors.is_empty() && dedup.contains(&key, now) {
                c.errors.push(if by_order {
                    AdsError::new(
                        "conversionUploadError",
                        "ORDER_ID_ALREADY_IN_USE",
                        "The imported event includes an order ID that was previously recorded.",
                    )
                    .at(i, Some("order_id"))
                } else {
                    AdsError::new(
                        "conversionUploadError",
                        "CLICK_CONVERSION_ALREADY_EXISTS",
                        "The imported event has the same click and conversion_date_time as an existing conversion.",
                    )
                    .at(i, Some("gclid"))
                });
            }
        }
        let all_errors: Vec<&AdsError> = checked.iter().flat_map(|c| &c.errors).collect();
        if !partial && !all_errors.is_empty() {
            // All-or-nothing mode: nothing is taken.
            let owned: Vec<AdsError> = all_errors.iter().map(|e| (*e).clone()).collect();
            return error(400, "INVALID_ARGUMENT", v, &owned);
        }

        let mut results = Vec::with_capacity(conversions.len());
        let mut accepted = Vec::new();
        for (c, chk) in conversions.iter().zip(&checked) {
            if !chk.errors.is_empty() {
                results.push(json!({}));
                continue;
            }
            let mut r = Map::new();
            for k in [
                "gclid",
                "gbraid",
                "wbraid",
                "conversionAction",
                "conversionDateTime",
                "userIdentifiers",
            ] {
                if let Some(v) = field(c, k) {
                    r.insert(k.to_string(), v.clone());
                }
            }
            results.push(Value::Object(r));
            if validate_only {
                continue;
            }
            if let Some(k) = &chk.dedup_key {
                dedup.first(k, now);
            }
            accepted.push(Accepted {
                key: chk.order_id.clone(),
                name: text(c, "conversionAction").unwrap_or_default().to_string(),
                value: field(c, "conversionValue")
                    .and_then(|v| v.as_f64().or_else(|| v.as_str()?.parse().ok())),
                currency: text(c, "currencyCode").map(str::to_string),
                payload: Value::Object((*c).clone()),
            });
        }
        let mut out = json!({"jobId": "1"});
        if !validate_only {
            out["results"] = Value::Array(results);
        }
        if !all_errors.is_empty() {
            let first = all_errors[0];
            let where_ = first
                .at
                .map(|(i, f)| match f {
                    Some(f) => format!(", at conversions[{i}].{f}"),
                    None => format!(", at conversions[{i}]"),
                })
                .unwrap_or_default();
            let owned: Vec<AdsError> = all_errors.iter().map(|e| (*e).clone()).collect();
            out["partialFailureError"] = json!({
                "code": 3,
                "message": format!("{}{where_}", first.message),
                "details": [failure(v, &owned)]
            });
        }
        Reply {
            status: 200,
            headers: Vec::new(),
            body: out,
            accepted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b";

    fn req(path: &str, headers: &[(&str, &str)], body: Value) -> Incoming {
        Incoming {
            method: "POST".into(),
            path: path.into(),
            query: vec![],
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: serde_json::to_vec(&body).unwrap(),
        }
    }

    const PATH: &str = "/v21/customers/1234567890:uploadClickConversions";
    const AUTH: &[(&str, &str)] = &[
        ("authorization", "Bearer demo-token"),
        ("developer-token", "demo-token"),
    ];

    fn conv(order: &str) -> Value {
        json!({
            "conversionAction": "customers/1234567890/conversionActions/1001",
            "conversionDateTime": "2026-01-02 03:04:05+00:00",
            "gclid": "Cj0-test",
            "conversionValue": 10.5,
            "currencyCode": "EUR",
            "orderId": order,
            "userIdentifiers": [{"userIdentifierSource": "FIRST_PARTY", "hashedEmail": HASH}],
            "consent": {"adUserData": "GRANTED"}
        })
    }

    fn now() -> DateTime<Utc> {
        "2026-02-01T00:00:00Z".parse().unwrap()
    }

    fn send(s: &Settings, d: &mut Dedup, body: Value) -> Reply {
        s.handle(&req(PATH, AUTH, body), d, now())
    }

    fn codes(r: &Reply) -> Vec<(u64, String)> {
        r.body["partialFailureError"]["details"][0]["errors"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        (
                            e["location"]["fieldPathElements"][0]["index"]
                                .as_u64()
                                .unwrap(),
                            e["errorCode"]
                                .as_object()
                                .unwrap()
                                .values()
                                .next()
                                .unwrap()
                                .as_str()
                                .unwrap()
                                .to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn whole(r: &Reply) -> (u16, String, String) {
        let e = &r.body["error"];
        let code = e["details"][0]["errors"][0]["errorCode"]
            .as_object()
            .and_then(|m| m.values().next())
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        (r.status, e["status"].as_str().unwrap().to_string(), code)
    }

    #[test]
    fn accepts_records_and_dedups_by_order_id() {
        let s = Settings::default();
        let mut d = Dedup::new(s.dedup_window);
        let r = send(
            &s,
            &mut d,
            json!({"conversions": [conv("o1"), conv("o2")], "partialFailure": true}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.body.get("partialFailureError").is_none());
        assert_eq!(r.body["results"].as_array().unwrap().len(), 2);
        assert_eq!(r.accepted.len(), 2);
        assert_eq!(r.accepted[0].key.as_deref(), Some("o1"));
        assert_eq!(
            r.accepted[0].name,
            "customers/1234567890/conversionActions/1001"
        );
        assert_eq!(r.accepted[0].value, Some(10.5));
        let again = send(
            &s,
            &mut d,
            json!({"conversions": [conv("o1"), conv("o3")], "partialFailure": true}),
        );
        assert_eq!(
            codes(&again),
            vec![(0, "ORDER_ID_ALREADY_IN_USE".to_string())]
        );
        assert_eq!(again.body["results"][0], json!({}));
        assert_eq!(again.accepted.len(), 1);
        // Without an order id, the click and time are the key.
        let mut c = conv("x");
        c.as_object_mut().unwrap().remove("orderId");
        send(
            &s,
            &mut d,
            json!({"conversions": [c.clone()], "partialFailure": true}),
        );
        let r = send(
            &s,
            &mut d,
            json!({"conversions": [c], "partialFailure": true}),
        );
        assert_eq!(
            codes(&r),
            vec![(0, "CLICK_CONVERSION_ALREADY_EXISTS".to_string())]
        );
    }

    #[test]
    fn auth_and_route_failures_are_whole_request_errors() {
        let s = Settings::default();
        let mut d = Dedup::new(s.dedup_window);
        let body = json!({"conversions": [conv("o1")], "partialFailure": true});
        let cases: Vec<(Incoming, (u16, &str, &str))> = vec![
            (
                req(PATH, &[("developer-token", "demo-token")], body.clone()),
                (401, "UNAUTHENTICATED", "OAUTH_TOKEN_HEADER_INVALID"),
            ),
            (
                req(
                    PATH,
                    &[
                        ("authorization", "Bearer nope"),
                        ("developer-token", "demo-token"),
                    ],
                    body.clone(),
                ),
                (401, "UNAUTHENTICATED", "OAUTH_TOKEN_INVALID"),
            ),
            (
                req(
                    PATH,
                    &[("authorization", "Bearer demo-token")],
                    body.clone(),
                ),
                (400, "INVALID_ARGUMENT", "DEVELOPER_TOKEN_PARAMETER_MISSING"),
            ),
            (
                req(
                    PATH,
                    &[
                        ("authorization", "Bearer demo-token"),
                        ("developer-token", "x"),
                    ],
                    body.clone(),
                ),
                (401, "UNAUTHENTICATED", "DEVELOPER_TOKEN_INVALID"),
            ),
            (
                req(
                    "/v21/customers/123-456-7890:uploadClickConversions",
                    AUTH,
                    body.clone(),
                ),
                (401, "UNAUTHENTICATED", "CLIENT_CUSTOMER_ID_INVALID"),
            ),
            (
                req(
                    "/v21/customers/9999999999:uploadClickConversions",
                    AUTH,
                    body.clone(),
                ),
                (403, "PERMISSION_DENIED", "USER_PERMISSION_DENIED"),
            ),
        ];
        for (r, (status, grpc, code)) in cases {
            let reply = s.handle(&r, &mut d, now());
            assert_eq!(whole(&reply), (status, grpc.to_string(), code.to_string()));
            assert!(reply.accepted.is_empty());
        }
        assert_eq!(
            s.handle(
                &req(
                    "/v9/customers/1234567890:uploadClickConversions",
                    AUTH,
                    body
                ),
                &mut d,
                now()
            )
            .status,
            404
        );
    }

    #[test]
    fn login_customer_id_must_name_the_manager() {
        let s = Settings {
            login_customer_id: Some("5555555555".into()),
            ..Settings::default()
        };
        let mut d = Dedup::new(s.dedup_window);
        let body = json!({"conversions": [conv("o1")], "partialFailure": true});
        assert_eq!(
            s.handle(&req(PATH, AUTH, body.clone()), &mut d, now())
                .status,
            403
        );
        let mut h = AUTH.to_vec();
        h.push(("login-customer-id", "5555555555"));
        assert_eq!(s.handle(&req(PATH, &h, body), &mut d, now()).status, 200);
    }

    #[test]
    fn json_problems_fail_the_request() {
        let s = Settings::default();
        let mut d = Dedup::new(s.dedup_window);
        let mut c = conv("o1");
        c["hashedEmail"] = json!(HASH);
        let r = send(
            &s,
            &mut d,
            json!({"conversions": [c], "partialFailure": true}),
        );
        assert_eq!(r.status, 400);
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Unknown name \"hashedEmail\"")
        );
        let mut c = conv("o1");
        c["consent"] = json!({"adUserData": "YES"});
        assert_eq!(
            send(
                &s,
                &mut d,
                json!({"conversions": [c], "partialFailure": true})
            )
            .status,
            400
        );
        let too_many: Vec<Value> = (0..2001).map(|i| conv(&format!("o{i}"))).collect();
        let r = send(
            &s,
            &mut d,
            json!({"conversions": too_many, "partialFailure": true}),
        );
        assert_eq!(whole(&r).2, "TOO_MANY_CONVERSIONS_IN_REQUEST");
    }

    #[test]
    fn row_checks() {
        let s = Settings::default();
        let mut d = Dedup::new(s.dedup_window);
        let set = |k: &str, v: Value, o: &str| {
            let mut c = conv(o);
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v;
            }
            c
        };
        let mut ids_only = conv("r8");
        ids_only.as_object_mut().unwrap().remove("gclid");
        let rows = vec![
            set(
                "userIdentifiers",
                json!([{"hashedEmail": "person@example.com"}]),
                "r0",
            ),
            set("gbraid", json!("g"), "r1"),
            set("conversionDateTime", json!("2026-01-02T03:04:05Z"), "r2"),
            set(
                "conversionDateTime",
                json!("2027-01-02 03:04:05+00:00"),
                "r3",
            ),
            set(
                "conversionAction",
                json!("customers/1234567890/conversionActions/4242"),
                "r4",
            ),
            set(
                "conversionAction",
                json!("customers/1111111111/conversionActions/1001"),
                "r5",
            ),
            set("currencyCode", json!("eur"), "r6"),
            conv("dup"),
            ids_only,
            conv("dup"),
        ];
        let r = send(
            &s,
            &mut d,
            json!({"conversions": rows, "partialFailure": true}),
        );
        assert_eq!(r.status, 200);
        let got = codes(&r);
        let want: Vec<(u64, &str)> = vec![
            (0, "INVALID_USER_IDENTIFIER"),
            (1, "VALUE_MUST_BE_UNSET"),
            (2, "INVALID_STRING_DATE_TIME_SECONDS_WITH_OFFSET"),
            (3, "LATER_THAN_MAXIMUM_DATE"),
            (4, "NO_CONVERSION_ACTION_FOUND"),
            (5, "NO_CONVERSION_ACTION_FOUND"),
            (6, "UNSUPPORTED"),
            (7, "DUPLICATE_ORDER_ID"),
            (9, "DUPLICATE_ORDER_ID"),
        ];
        assert_eq!(
            got,
            want.into_iter()
                .map(|(i, c)| (i, c.to_string()))
                .collect::<Vec<_>>()
        );
        assert_eq!(r.accepted.len(), 1);
        assert_eq!(r.accepted[0].key.as_deref(), Some("r8"));
        assert_eq!(
            r.body["results"][8]["conversionAction"],
            "customers/1234567890/conversionActions/1001"
        );
        assert_eq!(r.body["results"][0], json!({}));
        let braids = set("gclid", Value::Null, "b");
        let mut braids = braids;
        braids["gbraid"] = json!("g");
        braids["wbraid"] = json!("w");
        let r = send(
            &s,
            &mut d,
            json!({"conversions": [braids], "partialFailure": true}),
        );
        assert_eq!(codes(&r), vec![(0, "GBRAID_WBRAID_BOTH_SET".to_string())]);
    }

    #[test]
    fn without_partial_failure_any_row_error_fails_everything() {
        let s = Settings::default();
        let mut d = Dedup::new(s.dedup_window);
        let mut bad = conv("b");
        bad["currencyCode"] = json!("euro");
        let r = send(&s, &mut d, json!({"conversions": [conv("a"), bad]}));
        assert_eq!(
            whole(&r),
            (400, "INVALID_ARGUMENT".into(), "UNSUPPORTED".into())
        );
        assert!(r.accepted.is_empty());
    }

    #[test]
    fn validate_only_checks_and_records_nothing() {
        let s = Settings::default();
        let mut d = Dedup::new(s.dedup_window);
        let r = send(
            &s,
            &mut d,
            json!({"conversions": [conv("a")], "partialFailure": true, "validateOnly": true}),
        );
        assert_eq!(r.status, 200);
        assert!(r.accepted.is_empty() && r.body.get("results").is_none());
        assert_eq!(
            send(
                &s,
                &mut d,
                json!({"conversions": [conv("a")], "partialFailure": true})
            )
            .accepted
            .len(),
            1
        );
    }

    #[test]
    fn leads_without_click_need_the_feature() {
        let s = Settings {
            enhanced_conversions_for_leads: false,
            ..Settings::default()
        };
        let mut d = Dedup::new(s.dedup_window);
        let mut c = conv("l");
        c.as_object_mut().unwrap().remove("gclid");
        let r = send(
            &s,
            &mut d,
            json!({"conversions": [c], "partialFailure": true}),
        );
        assert_eq!(
            codes(&r),
            vec![(
                0,
                "CUSTOMER_NOT_ENABLED_ENHANCED_CONVERSIONS_FOR_LEADS".to_string()
            )]
        );
    }

    #[test]
    fn date_times_need_the_offset() {
        assert!(parse_date_time("2026-01-02 03:04:05+00:00").is_some());
        assert!(parse_date_time("2026-01-02 03:04:05.123-08:00").is_some());
        for bad in [
            "2026-01-02 03:04:05",
            "2026-01-02T03:04:05+00:00",
            "2026-01-02 03:04:05Z",
            "2026-13-02 03:04:05+00:00",
        ] {
            assert!(parse_date_time(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn refresh_tokens_buy_access_tokens_that_expire() {
        let s = Settings {
            oauth: OAuthClient {
                token_lifetime: Duration::from_secs(60),
                ..OAuthClient::default()
            },
            ..Settings::default()
        };
        let mut d = Dedup::new(s.dedup_window);
        let token_req = |form: &str| Incoming {
            method: "POST".into(),
            path: "/token".into(),
            query: vec![],
            headers: vec![],
            body: form.as_bytes().to_vec(),
        };
        let good = "grant_type=refresh_token&client_id=demo-client.apps.googleusercontent.com\
                    &client_secret=demo-client-secret&refresh_token=demo-refresh-token";
        let r = s.handle(&token_req(good), &mut d, now());
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.body["expires_in"], 60);
        let token = r.body["access_token"].as_str().unwrap().to_string();
        let bearer = format!("Bearer {token}");
        let auth = [
            ("authorization", bearer.as_str()),
            ("developer-token", "demo-token"),
        ];
        let upload = |at: DateTime<Utc>, d: &mut Dedup| {
            s.handle(
                &req(
                    PATH,
                    &auth,
                    json!({"conversions": [conv("o-1")], "partialFailure": true}),
                ),
                d,
                at,
            )
        };
        assert_eq!(upload(now(), &mut d).status, 200);
        let expired = upload(now() + chrono::Duration::seconds(61), &mut d);
        assert_eq!(expired.status, 401);

        let revoked = s.handle(
            &token_req(&good.replace("demo-refresh-token", "old")),
            &mut d,
            now(),
        );
        assert_eq!(
            (revoked.status, revoked.body["error"].as_str()),
            (400, Some("invalid_grant"))
        );
        let stranger = s.handle(
            &token_req(&good.replace("demo-client-secret", "x")),
            &mut d,
            now(),
        );
        assert_eq!(
            (stranger.status, stranger.body["error"].as_str()),
            (401, Some("invalid_client"))
        );
        let forged = format!("Bearer ya29.{}.000000", now().timestamp() + 30);
        let r = s.handle(
            &req(
                PATH,
                &[
                    ("authorization", forged.as_str()),
                    ("developer-token", "demo-token"),
                ],
                json!({"conversions": [conv("o-2")]}),
            ),
            &mut d,
            now(),
        );
        assert_eq!(r.status, 401);
    }
}
