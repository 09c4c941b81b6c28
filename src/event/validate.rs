//! Validation of canonical events against `schemas/canonical-event.v1.json`.
//!
//! The schema is the contract; this module is a hand-written walk over a
//! `serde_json::Value` that enforces exactly the same rules, because it runs
//! on every record of the stream and must be cheap: no regexes, no schema
//! interpretation, and no allocation unless something is wrong. The lists
//! that the schema owns (canonical event names, revenue events, currencies)
//! are read from the embedded schema once, so they exist in one place only.
//! `tests/event_contract.rs` checks both validators against a shared corpus.
//!
//! Identifiers are trimmed before they are judged. The identity hints
//! (email, phone, the two digests, external and click ids, the IP) only
//! improve matching, so one that is still malformed is not a violation but a
//! [`DroppedHint`]: [`check_value`] reports it beside the violations, and
//! [`parse_event`] leaves it out of the event and lists it there. The schema
//! accepts any string for a hint, which is why only the Rust side can say
//! what gets dropped.
//!
//! [`parse_event`] first tries a fast path (the `fast` module) that reads the
//! bytes straight into the typed event and checks that; only when it cannot
//! vouch for the record does it take the walk above, which is the reference
//! and the only source of error messages.

use std::fmt::{self, Write as _};
use std::io::{self, BufRead, Write};
use std::net::IpAddr;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use super::model::{CanonicalEvent, DroppedHint, is_custom_event_name, is_snake_key};

mod fast;

/// The contract, embedded so that the binary and the schema can never drift.
pub const SCHEMA_JSON: &str = include_str!("../../schemas/canonical-event.v1.json");

/// One broken rule, located by an RFC 6901 JSON pointer into the event.
///
/// A missing field is located where it should have been (`/event_id`,
/// `/items/0/id`), an unknown field where it is (`/evnt`); only a rule about
/// the event as a whole ("needs user_id or anonymous_id") points at the root
/// (`""`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub pointer: String,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pointer = if self.pointer.is_empty() {
            "/"
        } else {
            &self.pointer
        };
        write!(f, "{pointer}: {}", self.message)
    }
}

/// Why a record is not a canonical event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidEvent {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("not a JSON object (got {0})")]
    NotObject(&'static str),
    #[error("{} schema violation(s): {}", .0.len(), join_violations(.0))]
    Schema(Vec<Violation>),
}

impl InvalidEvent {
    /// Stable label for metrics and dead-letter headers.
    pub fn error_class(&self) -> &'static str {
        match self {
            InvalidEvent::Json(_) => "bad_json",
            InvalidEvent::NotObject(_) => "not_object",
            InvalidEvent::Schema(_) => "schema",
        }
    }

    /// The schema violations; empty for records that are not JSON objects.
    pub fn violations(&self) -> &[Violation] {
        match self {
            InvalidEvent::Schema(violations) => violations,
            InvalidEvent::Json(_) | InvalidEvent::NotObject(_) => &[],
        }
    }
}

fn join_violations(violations: &[Violation]) -> String {
    let mut out = String::new();
    for (i, violation) in violations.iter().enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        let _ = write!(out, "{violation}");
    }
    out
}

/// Decodes and validates one record.
pub fn parse_event(bytes: &[u8]) -> Result<CanonicalEvent, InvalidEvent> {
    match fast::parse(bytes) {
        Some(event) => Ok(event),
        // Invalid, or valid in a way the fast path does not vouch for (a
        // duplicated key): the reference walk decides and explains.
        None => parse_event_slow(bytes),
    }
}

/// [`parse_event`] without its fast path: JSON tree, contract walk, then the
/// typed model. The reference the fast path is tested against; not for
/// production use.
#[doc(hidden)]
pub fn parse_event_slow(bytes: &[u8]) -> Result<CanonicalEvent, InvalidEvent> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| InvalidEvent::Json(e.to_string()))?;
    if !value.is_object() {
        return Err(InvalidEvent::NotObject(json_type(&value)));
    }
    let (violations, dropped) = check_value(&value);
    if !violations.is_empty() {
        return Err(InvalidEvent::Schema(violations));
    }
    let mut value = value;
    if let Value::Object(event) = &mut value {
        normalize_identifiers(event);
    }
    // Validation enforces everything the typed model relies on, so this
    // cannot fail; if the two ever drift apart, the event is still refused
    // rather than half-read, and the message says where.
    let mut event: CanonicalEvent = serde_json::from_value(value).map_err(|e| {
        InvalidEvent::Schema(vec![Violation {
            pointer: String::new(),
            message: format!("passes the contract but not the typed model (a switchyard bug): {e}"),
        }])
    })?;
    event.dropped_hints = dropped;
    Ok(event)
}

/// Trims the ids, normalises the identity hints and removes the malformed
/// ones, deciding with the same [`Hint`] rules as the walk. Only for an
/// event the walk found valid, so every field has its type.
fn normalize_identifiers(event: &mut Map<String, Value>) {
    for key in ["event_id", "user_id", "anonymous_id"] {
        if let Some(Value::String(id)) = event.get_mut(key) {
            trim_in_place(id);
        }
    }
    let keep = |hint: Hint, value: &mut Value| match value {
        Value::String(s) if hint.problem(s).is_none() => {
            hint.normalize(s);
            true
        }
        Value::String(_) => false,
        _ => true,
    };
    for (key, hint) in [
        ("email", Hint::Email),
        ("phone", Hint::Phone),
        ("email_sha256", Hint::Sha256),
        ("phone_sha256", Hint::Sha256),
    ] {
        if let Some(value) = event.get_mut(key)
            && !keep(hint, value)
        {
            event.remove(key);
        }
    }
    if let Some(Value::Object(ids)) = event.get_mut("external_ids") {
        ids.retain(|_, id| keep(Hint::ExternalId, id));
    }
    if let Some(Value::Object(ids)) = event.get_mut("click_ids") {
        ids.retain(|_, id| keep(Hint::ClickId, id));
    }
    if let Some(Value::Object(context)) = event.get_mut("context")
        && let Some(ip) = context.get_mut("ip")
        && !keep(Hint::Ip, ip)
    {
        context.remove("ip");
    }
}

/// Every violation of the contract in `v`; empty means valid. Malformed
/// identity hints are not violations: see [`check_value`].
pub fn validate_value(v: &Value) -> Vec<Violation> {
    check_value(v).0
}

/// The violations of the contract in `v` (empty means valid), and the
/// identity hints that [`parse_event`] would drop from it as malformed, in
/// pointer order. Hints are reported whether or not the event is valid.
pub fn check_value(v: &Value) -> (Vec<Violation>, Vec<DroppedHint>) {
    let mut checker = Checker {
        out: Vec::new(),
        dropped: Vec::new(),
    };
    match v {
        Value::Object(event) => checker.event(event),
        other => checker.report(
            &[],
            format!("an event must be a JSON object, got {}", got(other)),
        ),
    }
    sort_hints(&mut checker.dropped);
    (checker.out, checker.dropped)
}

/// The one order both parse paths and the walk give dropped hints in, so
/// that they compare equal whatever order the keys came in.
pub(super) fn sort_hints(hints: &mut [DroppedHint]) {
    hints.sort_unstable_by(|a, b| a.pointer.cmp(&b.pointer));
}

/// Counts of `check_ndjson`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NdjsonSummary {
    /// Events that would be routed, `warned` included.
    pub valid: usize,
    pub invalid: usize,
    /// Valid events that lose at least one malformed identity hint (one
    /// warning line per hint).
    pub warned: usize,
}

impl NdjsonSummary {
    /// Whether the input passes: no invalid event and, when `strict`, no
    /// warning either.
    pub fn passes(&self, strict: bool) -> bool {
        self.invalid == 0 && !(strict && self.warned > 0)
    }

    /// The closing line of a report, e.g. `2 valid, 1 invalid`; `strict`
    /// counts events with warnings as invalid, and says so.
    pub fn line(&self, strict: bool) -> String {
        match (self.warned, strict) {
            (0, _) => format!("{} valid, {} invalid", self.valid, self.invalid),
            (warned, false) => format!(
                "{} valid, {} invalid ({warned} valid with dropped hints)",
                self.valid, self.invalid
            ),
            (warned, true) => format!(
                "{} valid, {} invalid ({warned} only for dropped hints, --strict)",
                self.valid - warned,
                self.invalid + warned
            ),
        }
    }
}

/// Validates newline-delimited events, writing one verdict per event:
/// `line 3 ok purchase evt_123` or `line 4 INVALID evt_9: /currency: ...`,
/// with further violations on indented lines. A valid event's malformed
/// identity hints follow its verdict, one per line:
/// `    warning /email: not an email address (3 characters, no '@'); the hint
/// is dropped, the event is routed`. Blank lines are skipped but counted, so
/// line numbers match an editor's. Only I/O failures are errors; a line that
/// is not UTF-8 or not JSON is an invalid event.
pub fn check_ndjson<R: BufRead, W: Write>(mut input: R, mut out: W) -> io::Result<NdjsonSummary> {
    let mut summary = NdjsonSummary::default();
    let mut line = Vec::new();
    let mut number = 0usize;
    loop {
        line.clear();
        if input.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        number += 1;
        let record = line.trim_ascii();
        if record.is_empty() {
            continue;
        }
        let value: Value = match serde_json::from_slice(record) {
            Ok(value) => value,
            Err(e) => {
                summary.invalid += 1;
                writeln!(out, "line {number} INVALID: not valid JSON: {e}")?;
                continue;
            }
        };
        if !value.is_object() {
            summary.invalid += 1;
            writeln!(
                out,
                "line {number} INVALID: not a JSON object (got {})",
                json_type(&value)
            )?;
            continue;
        }
        let id = match value.get("event_id") {
            Some(Value::String(id)) if is_event_id(id.trim()) => id.trim(),
            _ => "(no valid event_id)",
        };
        let (violations, dropped) = check_value(&value);
        if violations.is_empty() {
            summary.valid += 1;
            summary.warned += usize::from(!dropped.is_empty());
            let name = value.get("event").and_then(Value::as_str).unwrap_or("");
            writeln!(out, "line {number} ok {name} {id}")?;
            for hint in &dropped {
                writeln!(
                    out,
                    "    warning {hint}; the hint is dropped, the event is routed"
                )?;
            }
        } else {
            summary.invalid += 1;
            for (i, violation) in violations.iter().enumerate() {
                if i == 0 {
                    writeln!(out, "line {number} INVALID {id}: {violation}")?;
                } else {
                    writeln!(out, "    {violation}")?;
                }
            }
        }
    }
    out.flush()?;
    Ok(summary)
}

/// The lists the schema owns, read from it once.
struct SchemaLists {
    canonical: Vec<String>,
    /// Events for which value and currency are required (the schema's `if`).
    revenue: Vec<String>,
    /// Sorted, for binary search.
    currencies: Vec<[u8; 3]>,
}

static LISTS: LazyLock<SchemaLists> = LazyLock::new(|| {
    // The schema is compiled into the binary and covered by unit tests, so a
    // failure here is a build defect, not bad input.
    let schema: Value = serde_json::from_str(SCHEMA_JSON).expect("embedded schema is JSON");
    let strings = |pointer: &str| -> Vec<String> {
        schema
            .pointer(pointer)
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("embedded schema has an array at {pointer}"))
            .iter()
            .map(|v| {
                v.as_str()
                    .unwrap_or_else(|| panic!("embedded schema: {pointer} holds only strings"))
                    .to_owned()
            })
            .collect()
    };
    let mut currencies: Vec<[u8; 3]> = strings("/$defs/currency/enum")
        .iter()
        .map(|code| {
            code.as_bytes()
                .try_into()
                .unwrap_or_else(|_| panic!("embedded schema: currency {code:?} has 3 letters"))
        })
        .collect();
    currencies.sort_unstable();
    SchemaLists {
        canonical: strings("/$defs/canonical_event_name/enum"),
        revenue: strings("/allOf/0/if/properties/event/enum"),
        currencies,
    }
});

/// A step of a JSON pointer; pointers are only rendered when reporting.
#[derive(Clone, Copy)]
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn render_pointer(at: &[Seg<'_>]) -> String {
    let mut pointer = String::new();
    for seg in at {
        pointer.push('/');
        match seg {
            Seg::Key(key) => {
                for c in key.chars() {
                    match c {
                        '~' => pointer.push_str("~0"),
                        '/' => pointer.push_str("~1"),
                        c => pointer.push(c),
                    }
                }
            }
            Seg::Index(i) => {
                let _ = write!(pointer, "{i}");
            }
        }
    }
    pointer
}

struct Checker {
    out: Vec<Violation>,
    dropped: Vec<DroppedHint>,
}

const CLICK_ID_FIELDS: [&str; 7] = ["fbc", "fbp", "gclid", "gbraid", "wbraid", "ttclid", "ttp"];
const CONTEXT_FIELDS: [&str; 5] = ["ip", "user_agent", "page_url", "referrer", "locale"];
const ITEM_FIELDS: [&str; 7] = [
    "id", "name", "category", "brand", "variant", "quantity", "price",
];
const TOP_LEVEL_FIELDS: [&str; 21] = [
    "event",
    "event_id",
    "occurred_at",
    "source",
    "user_id",
    "anonymous_id",
    "email",
    "phone",
    "email_sha256",
    "phone_sha256",
    "external_ids",
    "click_ids",
    "context",
    "consent",
    "value",
    "currency",
    "order_id",
    "items",
    "properties",
    "traits",
    "metadata",
];
/// Fields of other event formats (Segment's spec mostly) that publishers
/// send by habit; they get a pointed hint instead of a bare "unknown field"
/// or a misleading "did you mean".
const FOREIGN_FIELDS: [(&str, &str); 5] = [
    ("timestamp", "use \"occurred_at\""),
    ("type", "use \"event\""),
    ("messageId", "use \"event_id\""),
    ("revenue", "use \"value\" with \"currency\""),
    ("products", "use \"items\""),
];
const FOREIGN_CLICK_IDS: [(&str, &str); 1] = [(
    "fbclid",
    "send the _fbc cookie as \"fbc\", or \"fb.1.<unix ms>.<fbclid>\" when there is none",
)];

impl Checker {
    fn report(&mut self, at: &[Seg<'_>], message: String) {
        self.out.push(Violation {
            pointer: render_pointer(at),
            message,
        });
    }

    fn event(&mut self, event: &Map<String, Value>) {
        let mut seen = Seen::default();
        for (key, value) in event {
            let at = [Seg::Key(key)];
            match key.as_str() {
                "event" => {
                    seen.event = Some(value);
                    self.event_name(value);
                }
                "event_id" => {
                    seen.event_id = true;
                    if !matches!(value, Value::String(s) if is_event_id(s.trim())) {
                        self.report(
                            &at,
                            format!(
                                "\"event_id\" must be 1 to 128 visible ASCII characters (no spaces inside; whitespace around it is trimmed), got {}",
                                got(value)
                            ),
                        );
                    }
                }
                "occurred_at" => {
                    seen.occurred_at = true;
                    self.timestamp(value);
                }
                "source" => self.text(&at, key, value, 1, 64),
                "user_id" => {
                    seen.user_id = true;
                    self.person_id(&at, key, value);
                }
                "anonymous_id" => {
                    seen.anonymous_id = true;
                    self.person_id(&at, key, value);
                }
                "email" => self.hint(&at, "email", Hint::Email, value),
                "phone" => self.hint(&at, "phone", Hint::Phone, value),
                "email_sha256" => {
                    self.hint(&at, "email_sha256", Hint::Sha256, value);
                }
                "phone_sha256" => {
                    self.hint(&at, "phone_sha256", Hint::Sha256, value);
                }
                "external_ids" => self.external_ids(value),
                "click_ids" => self.click_ids(value),
                "context" => self.context(value),
                "consent" => self.consent(value),
                "value" => {
                    seen.value = true;
                    self.amount(&at, key, value);
                }
                "currency" => {
                    seen.currency = true;
                    if !matches!(value, Value::String(s) if is_currency(s)) {
                        self.report(
                            &at,
                            format!(
                                "\"currency\" must be an ISO 4217 code like \"USD\", got {}",
                                got(value)
                            ),
                        );
                    }
                }
                "order_id" => self.text(&at, key, value, 1, 128),
                "items" => self.items(value),
                "properties" | "traits" | "metadata" => {
                    if !value.is_object() {
                        self.report(
                            &at,
                            format!("\"{key}\" must be an object, got {}", got(value)),
                        );
                    }
                }
                _ => self.unknown_field(&at, key, None, &TOP_LEVEL_FIELDS, &FOREIGN_FIELDS),
            }
        }
        self.event_level_rules(&seen);
    }

    /// Rules about which fields must appear together; each missing field is
    /// reported where it belongs.
    fn event_level_rules(&mut self, seen: &Seen<'_>) {
        if seen.event.is_none() {
            self.report(&[Seg::Key("event")], missing("event"));
        }
        if !seen.event_id {
            self.report(&[Seg::Key("event_id")], missing("event_id"));
        }
        if !seen.occurred_at {
            self.report(&[Seg::Key("occurred_at")], missing("occurred_at"));
        }
        if !seen.user_id && !seen.anonymous_id {
            self.report(
                &[],
                "missing \"user_id\" or \"anonymous_id\" (at least one is required)".to_owned(),
            );
        }
        let revenue_event = match seen.event {
            Some(Value::String(name)) if LISTS.revenue.iter().any(|r| r == name) => Some(name),
            _ => None,
        };
        match revenue_event {
            Some(name) => {
                for (field, present) in [("value", seen.value), ("currency", seen.currency)] {
                    if !present {
                        self.report(
                            &[Seg::Key(field)],
                            format!(
                                "{} (a {name} event needs \"value\" and \"currency\")",
                                missing(field)
                            ),
                        );
                    }
                }
            }
            None => {
                if seen.value && !seen.currency {
                    self.report(
                        &[Seg::Key("currency")],
                        "missing field \"currency\" (\"value\" needs \"currency\")".to_owned(),
                    );
                }
                if seen.currency && !seen.value {
                    self.report(
                        &[Seg::Key("value")],
                        "missing field \"value\" (\"currency\" needs \"value\")".to_owned(),
                    );
                }
            }
        }
    }

    fn event_name(&mut self, value: &Value) {
        let lists = &*LISTS;
        let name = match value {
            Value::String(name) => name.as_str(),
            other => {
                self.report(
                    &[Seg::Key("event")],
                    format!("\"event\" must be a string, got {}", got(other)),
                );
                return;
            }
        };
        if lists.canonical.iter().any(|c| c == name) || is_custom_event_name(name) {
            return;
        }
        let message = if name.starts_with("custom.") {
            format!(
                "custom event names are \"custom.\" followed by a lowercase letter and up to 62 lowercase letters, digits or '_' (e.g. \"custom.webinar_registered\"), got {}",
                got(value)
            )
        } else {
            let hint = closest(name, lists.canonical.iter().map(String::as_str))
                .map(|c| format!(" (did you mean \"{c}\"?)"))
                .unwrap_or_default();
            format!(
                "\"event\" must be one of {} or \"custom.<name>\", got {}{hint}",
                lists.canonical.join(", "),
                got(value)
            )
        };
        self.report(&[Seg::Key("event")], message);
    }

    fn timestamp(&mut self, value: &Value) {
        let problem = match value {
            Value::String(s) => match check_timestamp(s) {
                Ok(_) => return,
                Err(TimestampError::Shape) => {
                    "must be an RFC 3339 timestamp like \"2026-11-26T14:03:11Z\" or \"2026-11-26T15:03:11.250+01:00\" (years 1900-2099, also in UTC)"
                }
                Err(TimestampError::Impossible) => "is not a real date and time",
            },
            _ => "must be an RFC 3339 timestamp string",
        };
        self.report(
            &[Seg::Key("occurred_at")],
            format!("\"occurred_at\" {problem}, got {}", got(value)),
        );
    }

    /// A string whose length in characters (as JSON Schema counts) is in
    /// `min..=max`.
    fn text(&mut self, at: &[Seg<'_>], name: &str, value: &Value, min: usize, max: usize) {
        if matches!(value, Value::String(s) if len_within(s, min, max)) {
            return;
        }
        let bounds = if min == 0 {
            format!("at most {max} characters")
        } else {
            format!("{min} to {max} characters")
        };
        self.report(
            at,
            format!(
                "\"{name}\" must be a string of {bounds}, got {}",
                got(value)
            ),
        );
    }

    /// `user_id` and `anonymous_id`: trimmed, then 1 to 256 characters.
    /// They key everything about the person, so unlike a hint a bad one is
    /// an error.
    fn person_id(&mut self, at: &[Seg<'_>], name: &str, value: &Value) {
        if !matches!(value, Value::String(s) if len_within(s.trim(), 1, 256)) {
            self.report(
                at,
                format!(
                    "\"{name}\" must be a string of 1 to 256 characters (whitespace around it is trimmed), got {}",
                    got(value)
                ),
            );
        }
    }

    /// An identity hint: a string of any other type is a violation, a
    /// malformed string only a dropped hint.
    fn hint(&mut self, at: &[Seg<'_>], field: &'static str, hint: Hint, value: &Value) {
        match value {
            Value::String(s) => {
                if let Some(reason) = hint.problem(s) {
                    self.dropped.push(DroppedHint {
                        field,
                        pointer: render_pointer(at),
                        reason,
                    });
                }
            }
            other => {
                let key = match at.last() {
                    Some(Seg::Key(key)) => truncate(key),
                    _ => field,
                };
                let what = if hint == Hint::ExternalId {
                    format!("external id \"{key}\"")
                } else {
                    format!("\"{key}\"")
                };
                self.report(at, format!("{what} must be a string, got {}", got(other)));
            }
        }
    }

    /// A number ≥ 0.
    fn amount(&mut self, at: &[Seg<'_>], name: &str, value: &Value) {
        let message = match value {
            Value::Number(n) if is_non_negative(n) => return,
            Value::Number(_) if name == "value" => format!(
                "\"value\" must not be negative (a refund's value is the positive amount refunded), got {}",
                got(value)
            ),
            Value::Number(_) => format!("\"{name}\" must not be negative, got {}", got(value)),
            _ => format!("\"{name}\" must be a number, got {}", got(value)),
        };
        self.report(at, message);
    }

    fn external_ids(&mut self, value: &Value) {
        let Some(ids) = self.object(&[Seg::Key("external_ids")], "external_ids", value) else {
            return;
        };
        if ids.len() > 16 {
            self.report(
                &[Seg::Key("external_ids")],
                format!(
                    "\"external_ids\" may hold at most 16 ids, got {}",
                    ids.len()
                ),
            );
        }
        for (key, id) in ids {
            let at = [Seg::Key("external_ids"), Seg::Key(key)];
            if !is_snake_key(key, 32) {
                self.report(&at, bad_key("external_ids", key));
            }
            self.hint(&at, "external_ids", Hint::ExternalId, id);
        }
    }

    fn click_ids(&mut self, value: &Value) {
        let Some(ids) = self.object(&[Seg::Key("click_ids")], "click_ids", value) else {
            return;
        };
        for (key, id) in ids {
            let at = [Seg::Key("click_ids"), Seg::Key(key)];
            if CLICK_ID_FIELDS.contains(&key.as_str()) {
                self.hint(&at, "click_ids", Hint::ClickId, id);
            } else {
                self.unknown_field(
                    &at,
                    key,
                    Some("\"click_ids\""),
                    &CLICK_ID_FIELDS,
                    &FOREIGN_CLICK_IDS,
                );
            }
        }
    }

    fn context(&mut self, value: &Value) {
        let Some(context) = self.object(&[Seg::Key("context")], "context", value) else {
            return;
        };
        for (key, field) in context {
            let at = [Seg::Key("context"), Seg::Key(key)];
            match key.as_str() {
                "ip" => self.hint(&at, "ip", Hint::Ip, field),
                "user_agent" => self.text(&at, key, field, 0, 1024),
                "page_url" | "referrer" => {
                    if !matches!(field, Value::String(s) if is_url_field(s)) {
                        self.report(
                            &at,
                            format!(
                                "\"{key}\" must be an absolute URL of at most 2048 characters (RFC 3986: with a scheme, non-ASCII and spaces percent-encoded), got {}",
                                got(field)
                            ),
                        );
                    }
                }
                "locale" => {
                    if !matches!(field, Value::String(s) if is_locale(s)) {
                        self.report(
                            &at,
                            format!(
                                "\"locale\" must be a language tag like \"en-US\" or \"pt_BR\", got {}",
                                got(field)
                            ),
                        );
                    }
                }
                _ => self.unknown_field(&at, key, Some("\"context\""), &CONTEXT_FIELDS, &[]),
            }
        }
    }

    fn consent(&mut self, value: &Value) {
        let Some(consent) = self.object(&[Seg::Key("consent")], "consent", value) else {
            return;
        };
        for (category, state) in consent {
            let at = [Seg::Key("consent"), Seg::Key(category)];
            if !is_snake_key(category, 32) {
                self.report(&at, bad_key("consent", category));
            }
            if !matches!(state, Value::String(s) if s == "granted" || s == "denied") {
                self.report(
                    &at,
                    format!(
                        "consent for \"{category}\" must be \"granted\" or \"denied\", got {}",
                        got(state)
                    ),
                );
            }
        }
    }

    fn items(&mut self, value: &Value) {
        let Value::Array(items) = value else {
            self.report(
                &[Seg::Key("items")],
                format!("\"items\" must be an array, got {}", got(value)),
            );
            return;
        };
        if items.len() > 200 {
            self.report(
                &[Seg::Key("items")],
                format!("\"items\" may hold at most 200 items, got {}", items.len()),
            );
        }
        for (i, item) in items.iter().enumerate() {
            self.item(i, item);
        }
    }

    fn item(&mut self, index: usize, value: &Value) {
        let here = [Seg::Key("items"), Seg::Index(index)];
        let Value::Object(item) = value else {
            self.report(
                &here,
                format!("an item must be an object, got {}", got(value)),
            );
            return;
        };
        for (key, field) in item {
            let at = [Seg::Key("items"), Seg::Index(index), Seg::Key(key)];
            match key.as_str() {
                "id" => self.text(&at, key, field, 1, 128),
                "name" | "category" | "brand" | "variant" => self.text(&at, key, field, 0, 256),
                "quantity" => {
                    if !matches!(field, Value::Number(n) if is_quantity(n)) {
                        self.report(
                            &at,
                            format!(
                                "\"quantity\" must be a whole number from 1 to 1000000000, got {}",
                                got(field)
                            ),
                        );
                    }
                }
                "price" => self.amount(&at, key, field),
                _ => self.unknown_field(&at, key, Some("an item"), &ITEM_FIELDS, &[]),
            }
        }
        if !item.contains_key("id") {
            let at = [Seg::Key("items"), Seg::Index(index), Seg::Key("id")];
            self.report(&at, missing("id"));
        }
    }

    fn object<'v>(
        &mut self,
        at: &[Seg<'_>],
        name: &str,
        value: &'v Value,
    ) -> Option<&'v Map<String, Value>> {
        match value {
            Value::Object(map) => Some(map),
            other => {
                self.report(
                    at,
                    format!("\"{name}\" must be an object, got {}", got(other)),
                );
                None
            }
        }
    }

    /// `container` is `None` for the top level; `foreign` maps well-known
    /// wrong field names to advice.
    fn unknown_field(
        &mut self,
        at: &[Seg<'_>],
        key: &str,
        container: Option<&str>,
        known: &[&str],
        foreign: &[(&str, &str)],
    ) {
        let hint = match foreign.iter().find(|(f, _)| *f == key) {
            Some((_, advice)) => format!(" ({advice})"),
            None => closest(key, known.iter().copied())
                .map(|c| format!(" (did you mean \"{c}\"?)"))
                .unwrap_or_default(),
        };
        let message = match container {
            None => format!(
                "unknown field \"{}\" (not in the canonical event v1 contract){hint}",
                truncate(key)
            ),
            Some(container) => format!(
                "unknown field \"{}\" in {container}{hint}; known fields: {}",
                truncate(key),
                known.join(", ")
            ),
        };
        self.report(at, message);
    }
}

#[derive(Default)]
struct Seen<'a> {
    event: Option<&'a Value>,
    event_id: bool,
    occurred_at: bool,
    user_id: bool,
    anonymous_id: bool,
    value: bool,
    currency: bool,
}

fn missing(field: &str) -> String {
    format!("missing required field \"{field}\"")
}

fn bad_key(container: &str, key: &str) -> String {
    format!(
        "\"{container}\" keys must be lowercase snake_case (a letter, then letters, digits or '_'; at most 32 characters), got \"{}\"",
        truncate(key)
    )
}

/// How a value is quoted in messages: strings in JSON quotes (shortened),
/// numbers and literals as written, containers by kind.
/// The value a message quotes; a contact value in the wrong place (a phone
/// as a number, an email as an id) is not repeated into dead letters and logs.
fn got(value: &Value) -> String {
    match value {
        Value::String(s) => {
            let shown = truncate(s);
            let mut quoted = serde_json::to_string(shown).unwrap_or_default();
            if shown.len() < s.len() {
                quoted.insert(quoted.len() - 1, '…');
            }
            crate::redact::redacted(quoted)
        }
        Value::Number(n) => crate::redact::redacted(n.to_string()),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".to_owned(),
        Value::Array(_) => "an array".to_owned(),
        Value::Object(_) => "an object".to_owned(),
    }
}

/// At most 60 characters, so a megabyte-long field does not end up in every
/// log line and dead-letter header.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(60) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The closest candidate within two edits (ignoring case), for "did you
/// mean" hints. Only runs on the error path.
fn closest<'c>(input: &str, candidates: impl Iterator<Item = &'c str>) -> Option<&'c str> {
    if input.len() > 64 {
        return None;
    }
    let input = input.to_ascii_lowercase();
    candidates
        .map(|c| (edit_distance(&input, c), c))
        .filter(|&(d, _)| d <= 2)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Character count in `min..=max`, as JSON Schema counts (code points),
/// without counting when the byte length already decides.
fn len_within(s: &str, min: usize, max: usize) -> bool {
    if s.len() < min {
        return false;
    }
    if s.len() <= max && min <= 1 {
        return true;
    }
    (min..=max).contains(&s.chars().count())
}

/// `^[\x21-\x7E]{1,128}$`
fn is_event_id(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| (0x21..=0x7E).contains(&b))
}

fn is_currency(s: &str) -> bool {
    <[u8; 3]>::try_from(s.as_bytes())
        .is_ok_and(|code| LISTS.currencies.binary_search(&code).is_ok())
}

fn is_non_negative(n: &Number) -> bool {
    n.as_f64().is_some_and(non_negative)
}

/// `minimum: 0`, which `-0.0` meets.
fn non_negative(f: f64) -> bool {
    f >= 0.0
}

const MAX_QUANTITY: u32 = 1_000_000_000;

/// JSON Schema `integer` (which includes `3.0`) in 1..=1e9.
fn is_quantity(n: &Number) -> bool {
    match (n.as_u64(), n.as_f64()) {
        (Some(u), _) => (1..=u64::from(MAX_QUANTITY)).contains(&u),
        (None, Some(f)) => f.fract() == 0.0 && (1.0..=f64::from(MAX_QUANTITY)).contains(&f),
        (None, None) => false,
    }
}

/// `email`: at most 254 characters and [`is_email`].
fn is_email_field(s: &str) -> bool {
    len_within(s, 0, 254) && is_email(s)
}

/// `phone`: 6 to 32 bytes (the pattern admits ASCII only, so bytes are
/// characters) and [`is_phone`].
fn is_phone_field(s: &str) -> bool {
    (6..=32).contains(&s.len()) && is_phone(s)
}

/// `page_url` and `referrer`: at most 2048 characters and [`is_uri`].
fn is_url_field(s: &str) -> bool {
    len_within(s, 0, 2048) && is_uri(s)
}

/// `^[0-9a-f]{64}$`
fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `^[^@\x00-\x20\x7F]+@[^@\x00-\x20\x7F]+\.[^@\x00-\x20\x7F]+$`: one '@', no
/// whitespace or control characters, and a dot inside the domain.
pub(crate) fn is_email(s: &str) -> bool {
    if s.bytes().any(|b| b <= 0x20 || b == 0x7F) {
        return false;
    }
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain
            .bytes()
            .enumerate()
            .any(|(i, b)| b == b'.' && i > 0 && i + 1 < domain.len())
}

/// `^[+]?[(]?[0-9][0-9 .()-]*[0-9]$`
pub(crate) fn is_phone(s: &str) -> bool {
    let rest = s.strip_prefix('+').unwrap_or(s);
    let rest = rest.strip_prefix('(').unwrap_or(rest).as_bytes();
    rest.len() >= 2
        && rest[0].is_ascii_digit()
        && rest[rest.len() - 1].is_ascii_digit()
        && rest
            .iter()
            .all(|&b| b.is_ascii_digit() || matches!(b, b' ' | b'.' | b'(' | b')' | b'-'))
}

/// `^[a-z]{2,3}([-_][A-Za-z0-9]{2,8})*$`
fn is_locale(s: &str) -> bool {
    let mut parts = s.split(['-', '_']);
    let language = parts.next().unwrap_or_default();
    (2..=3).contains(&language.len())
        && language.bytes().all(|b| b.is_ascii_lowercase())
        && parts.all(|p| (2..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric()))
}

// ---- identifiers: trimming, case, and hints that are dropped -------------

/// Leading and trailing whitespace (Unicode `White_Space`, as `str::trim`)
/// removed in place, without allocating.
pub(crate) fn trim_in_place(s: &mut String) {
    let end = s.trim_end().len();
    s.truncate(end);
    let start = s.len() - s.trim_start().len();
    if start > 0 {
        s.drain(..start);
    }
}

/// `str::to_lowercase` in place; allocates only for non-ASCII text that
/// lowercasing changes.
fn lowercase_in_place(s: &mut String) {
    if s.is_ascii() {
        s.make_ascii_lowercase();
    } else if s.chars().any(|c| c.to_lowercase().ne(std::iter::once(c))) {
        *s = s.to_lowercase();
    }
}

/// The identity hints that are dropped, not refused, when malformed: each
/// only improves matching at the ad platforms, and losing a conversion over
/// a hint costs more than losing the hint.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Hint {
    /// Trimmed and lowercased, as every vendor hashes it.
    Email,
    /// Trimmed; formatting is the router's business (E.164 per vendor).
    Phone,
    /// Trimmed and lowercased: the digest is the same in either case.
    Sha256,
    /// Trimmed, case kept (ids are case-sensitive).
    ExternalId,
    /// Trimmed, case kept (gclid and fbc are case-sensitive).
    ClickId,
    /// Trimmed.
    Ip,
}

impl Hint {
    /// Why `raw` is no usable hint once normalised, in words that never
    /// quote it; `None` when it is fine. Allocates only for a bad hint (and
    /// for a non-ASCII email, whose lowercase may differ in length).
    pub(super) fn problem(self, raw: &str) -> Option<String> {
        let s = raw.trim();
        let ok = match self {
            // ASCII lowercasing changes neither the length nor the bytes
            // `is_email` looks at.
            Hint::Email if s.is_ascii() => is_email_field(s),
            Hint::Email => is_email_field(&s.to_lowercase()),
            Hint::Phone => is_phone_field(s),
            Hint::Sha256 => s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()),
            Hint::ExternalId => len_within(s, 1, 256),
            Hint::ClickId => len_within(s, 1, 512),
            Hint::Ip => s.parse::<IpAddr>().is_ok(),
        };
        (!ok).then(|| self.describe(s))
    }

    /// Makes a hint that has no [`Hint::problem`] canonical, in place.
    pub(super) fn normalize(self, s: &mut String) {
        trim_in_place(s);
        match self {
            Hint::Email => lowercase_in_place(s),
            Hint::Sha256 => s.make_ascii_lowercase(),
            Hint::Phone | Hint::ExternalId | Hint::ClickId | Hint::Ip => {}
        }
    }

    /// The shape of a trimmed value that failed, for people fixing the
    /// publisher. Counts and classes of characters only: the value may be
    /// personal data and this text goes to logs and dead-letter headers.
    fn describe(self, s: &str) -> String {
        let n = s.chars().count();
        let size = match n {
            0 => "empty after trimming".to_owned(),
            1 => "1 character".to_owned(),
            n => format!("{n} characters"),
        };
        match self {
            Hint::Email => {
                let (local, domain) = s.split_once('@').unwrap_or((s, ""));
                if n == 0 {
                    None
                } else if !s.contains('@') {
                    Some("no '@'")
                } else if domain.contains('@') {
                    Some("more than one '@'")
                } else if s.bytes().any(|b| b <= 0x20 || b == 0x7F) {
                    Some("contains spaces or control characters")
                } else if local.is_empty() {
                    Some("nothing before the '@'")
                } else if !domain
                    .bytes()
                    .enumerate()
                    .any(|(i, b)| b == b'.' && i > 0 && i + 1 < domain.len())
                {
                    Some("no '.' inside the domain")
                } else {
                    Some("longer than 254 characters once lowercased")
                }
                .map_or(format!("not an email address ({size})"), |why| {
                    format!("not an email address ({size}, {why})")
                })
            }
            Hint::Phone => {
                let allowed = |c: char| c.is_ascii_digit() || " .()-+".contains(c);
                let why = if n == 0 {
                    None
                } else if s.chars().any(char::is_alphabetic) {
                    Some("contains letters")
                } else if !s.chars().all(allowed) {
                    Some(
                        "contains characters other than digits, '+', spaces, dots, dashes and parentheses",
                    )
                } else if n < 6 {
                    Some("fewer than 6")
                } else if n > 32 {
                    Some("more than 32")
                } else {
                    Some(
                        "not shaped like \"+1 (650) 253-0000\": '+' only first, a digit first and last",
                    )
                };
                why.map_or(format!("not a phone number ({size})"), |why| {
                    format!("not a phone number ({size}, {why})")
                })
            }
            Hint::Sha256 if n > 0 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
                format!("not a SHA-256 digest ({n} hex digits, expected 64)")
            }
            Hint::Sha256 => format!("not a SHA-256 digest ({size}, expected 64 hex digits)"),
            Hint::ExternalId => format!("not an id of 1 to 256 characters ({size})"),
            Hint::ClickId => format!("not a click id of 1 to 512 characters ({size})"),
            Hint::Ip => {
                let why = if s.parse::<std::net::SocketAddr>().is_ok() {
                    ", an address with a port"
                } else if s.contains('%') {
                    ", an address with a zone index"
                } else {
                    ""
                };
                format!("not an IPv4 or IPv6 address ({size}{why})")
            }
        }
    }
}

enum TimestampError {
    /// Not the RFC 3339 profile the contract allows.
    Shape,
    /// Right shape, but no such instant (Feb 30, 25:00, a misplaced leap second).
    Impossible,
}

/// The fields of a timestamp that passed [`check_timestamp`], as written
/// (local time, `second` may be 60).
struct Timestamp {
    year: u32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    nanosecond: u32,
    offset_minutes: i32,
}

/// The schema's `pattern` plus `format: date-time` (RFC 3339 section 5.6,
/// including its leap-second rule: `:60` only at 23:59 UTC).
fn check_timestamp(s: &str) -> Result<Timestamp, TimestampError> {
    use TimestampError::{Impossible, Shape};
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err(Shape);
    }
    let digits = |range: std::ops::Range<usize>| -> Result<u32, TimestampError> {
        b[range].iter().try_fold(0u32, |acc, &d| {
            if d.is_ascii_digit() {
                Ok(acc * 10 + u32::from(d - b'0'))
            } else {
                Err(Shape)
            }
        })
    };
    let year = digits(0..4)?;
    let month = digits(5..7)?;
    let day = digits(8..10)?;
    let hour = digits(11..13)?;
    let minute = digits(14..16)?;
    let second = digits(17..19)?;
    if !(1900..=2099).contains(&year)
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(Shape);
    }
    let mut i = 19;
    let mut nanosecond = 0;
    if b[i] == b'.' {
        let fraction = b[i + 1..].iter().take_while(|d| d.is_ascii_digit()).count();
        if !(1..=9).contains(&fraction) {
            return Err(Shape);
        }
        // At most nine digits, scaled to nine: below 10^9, so no overflow.
        nanosecond = digits(i + 1..i + 1 + fraction)? * 10u32.pow(9 - fraction as u32);
        i += 1 + fraction;
    }
    let offset_minutes: i32 = match &b[i..] {
        [b'Z'] => 0,
        // Such an offset would move the instant out of the year range once
        // converted to UTC, and switchyard re-serialises in UTC.
        [b'+', ..] if (year, month, day) == (1900, 1, 1) => return Err(Shape),
        [b'-', ..] if (year, month, day) == (2099, 12, 31) => return Err(Shape),
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let hours = digits(i + 1..i + 3)?;
            let minutes = digits(i + 4..i + 6)?;
            if hours > 23 || minutes > 59 {
                return Err(Impossible);
            }
            // Both ≤ 59 / 23, so the cast is exact.
            let total = (hours * 60 + minutes) as i32;
            if *sign == b'+' { total } else { -total }
        }
        _ => return Err(Shape),
    };
    let leap_year = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap_year => 29,
        2 => 28,
        _ => return Err(Impossible),
    };
    if day == 0 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
        return Err(Impossible);
    }
    if second == 60 {
        // Both ≤ 23 / 59, so the cast is exact.
        let local = (hour * 60 + minute) as i32;
        if (local - offset_minutes).rem_euclid(24 * 60) != 23 * 60 + 59 {
            return Err(Impossible);
        }
    }
    Ok(Timestamp {
        year,
        month,
        day,
        hour,
        minute,
        second,
        nanosecond,
        offset_minutes,
    })
}

/// RFC 3986 `URI` (absolute, fragment allowed), ASCII only: what JSON Schema
/// `format: uri` accepts.
fn is_uri(s: &str) -> bool {
    let b = s.as_bytes();
    let Some(colon) = b.iter().position(|&c| !is_scheme_char(c)) else {
        return false;
    };
    if b[colon] != b':' || colon == 0 || !b[0].is_ascii_alphabetic() {
        return false;
    }
    let rest = &b[colon + 1..];
    let (rest, fragment) = match rest.iter().position(|&c| c == b'#') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let (hier, query) = match rest.iter().position(|&c| c == b'?') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let path = match hier.strip_prefix(b"//") {
        Some(after) => {
            let end = after.iter().position(|&c| c == b'/').unwrap_or(after.len());
            if !is_authority(&after[..end]) {
                return false;
            }
            &after[end..]
        }
        None => hier,
    };
    let query_char = |c: u8| is_pchar(c) || c == b'/' || c == b'?';
    all_pct(path, |c| is_pchar(c) || c == b'/')
        && query.is_none_or(|q| all_pct(q, query_char))
        && fragment.is_none_or(|f| all_pct(f, query_char))
}

fn is_authority(a: &[u8]) -> bool {
    let host_port = match a.iter().position(|&c| c == b'@') {
        Some(at) => {
            let userinfo = &a[..at];
            if !all_pct(userinfo, |c| is_unreserved_or_sub_delim(c) || c == b':') {
                return false;
            }
            &a[at + 1..]
        }
        None => a,
    };
    let (host_ok, port) = if let Some(literal) = host_port.strip_prefix(b"[") {
        let Some(close) = literal.iter().position(|&c| c == b']') else {
            return false;
        };
        (is_ip_literal(&literal[..close]), &literal[close + 1..])
    } else {
        // A reg-name has no ':', so the first one starts the port and a
        // second one makes the port invalid.
        let end = host_port
            .iter()
            .position(|&c| c == b':')
            .unwrap_or(host_port.len());
        (
            all_pct(&host_port[..end], is_unreserved_or_sub_delim),
            &host_port[end..],
        )
    };
    host_ok
        && match port.split_first() {
            None => true,
            Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
            Some(_) => false,
        }
}

/// The inside of `[...]`: an IPv6 address or `v<hex>.<chars>` (IPvFuture).
fn is_ip_literal(inner: &[u8]) -> bool {
    if let [b'v' | b'V', rest @ ..] = inner {
        let hex = rest.iter().take_while(|c| c.is_ascii_hexdigit()).count();
        return hex > 0
            && rest.get(hex) == Some(&b'.')
            && rest.len() > hex + 1
            && rest[hex + 1..]
                .iter()
                .all(|&c| is_unreserved_or_sub_delim(c) || c == b':');
    }
    std::str::from_utf8(inner).is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok())
}

/// Every byte allowed by `allowed`, or part of a `%XX` escape.
fn all_pct(s: &[u8], allowed: impl Fn(u8) -> bool) -> bool {
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            if !(s.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && s.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
            {
                return false;
            }
            i += 3;
        } else if allowed(s[i]) {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

fn is_scheme_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.')
}

fn is_unreserved_or_sub_delim(c: u8) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
        )
}

fn is_pchar(c: u8) -> bool {
    is_unreserved_or_sub_delim(c) || c == b':' || c == b'@'
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventName;
    use serde_json::json;

    /// A valid purchase; the fast path's tests start from it too.
    pub(super) fn base() -> Value {
        json!({
            "event": "purchase",
            "event_id": "evt_1",
            "occurred_at": "2026-11-26T10:00:00Z",
            "user_id": "u1",
            "value": 10,
            "currency": "USD"
        })
    }

    fn with(field: &str, value: Value) -> Value {
        let mut event = base();
        event[field] = value;
        event
    }

    fn pointers(v: &Value) -> Vec<String> {
        validate_value(v).into_iter().map(|v| v.pointer).collect()
    }

    #[test]
    fn schema_lists_are_read_from_the_embedded_schema() {
        let lists = &*LISTS;
        assert_eq!(lists.canonical.len(), 12);
        assert_eq!(
            lists.revenue,
            ["purchase", "subscribe", "renewal", "refund"]
        );
        assert!(lists.currencies.len() > 150);
        assert!(is_currency("USD") && is_currency("EUR") && is_currency("XCG"));
        assert!(!is_currency("usd") && !is_currency("ANG") && !is_currency("XXX"));
    }

    #[test]
    fn every_schema_event_name_is_an_enum_variant() {
        for name in &LISTS.canonical {
            let parsed = EventName::canonical(name).expect(name);
            assert!(!parsed.is_custom());
            assert_eq!(parsed.as_str(), name);
        }
        for name in &LISTS.revenue {
            assert!(LISTS.canonical.contains(name), "{name}");
        }
    }

    #[test]
    fn valid_event_has_no_violations() {
        assert_eq!(validate_value(&base()), []);
    }

    #[test]
    fn messages_read_well() {
        let v = validate_value(&with("currency", json!("usd")));
        assert_eq!(
            v[0].to_string(),
            "/currency: \"currency\" must be an ISO 4217 code like \"USD\", got \"usd\""
        );
        let mut event = base();
        event.as_object_mut().unwrap().remove("event_id");
        event["evnt"] = json!("x");
        let v = validate_value(&event);
        let text: Vec<String> = v.iter().map(ToString::to_string).collect();
        assert!(text.contains(&"/event_id: missing required field \"event_id\"".to_owned()));
        assert!(text.contains(
            &"/evnt: unknown field \"evnt\" (not in the canonical event v1 contract) (did you mean \"event\"?)"
                .to_owned()
        ));
        let v = validate_value(&with("event", json!("purchse")));
        assert!(
            v[0].message
                .ends_with("got \"purchse\" (did you mean \"purchase\"?)"),
            "{}",
            v[0]
        );
        let mut event = base();
        event.as_object_mut().unwrap().remove("value");
        let v = validate_value(&event);
        assert_eq!(
            v[0].to_string(),
            "/value: missing required field \"value\" (a purchase event needs \"value\" and \"currency\")"
        );
        let v = validate_value(&json!([1]));
        assert_eq!(
            v[0].to_string(),
            "/: an event must be a JSON object, got an array"
        );
    }

    #[test]
    fn pointers_escape_tilde_and_slash() {
        let event = with("consent", json!({"a/b~c": "granted"}));
        assert_eq!(pointers(&event), ["/consent/a~1b~0c"]);
    }

    #[test]
    fn long_values_are_shortened_in_messages() {
        let v = validate_value(&with("order_id", json!("x".repeat(500))));
        assert!(v[0].message.len() < 200, "{}", v[0].message);
        assert!(v[0].message.contains("x…\""));
    }

    #[test]
    fn timestamps() {
        for ok in [
            "2026-11-26T10:00:00Z",
            "2026-11-26T10:00:00.1Z",
            "2026-11-26T10:00:00.123456789+05:30",
            "2024-02-29T00:00:00-08:00",
            "2000-02-29T00:00:00Z",
            "2026-12-31T23:59:60Z",
            "2027-01-01T00:59:60+01:00",
            "1900-01-01T00:00:00Z",
            "1900-01-01T00:00:00-01:00",
            "2099-12-31T23:59:59Z",
            "2099-12-31T23:59:59+01:00",
        ] {
            assert!(check_timestamp(ok).is_ok(), "{ok}");
            let event = parse_event(with("occurred_at", json!(ok)).to_string().as_bytes())
                .unwrap_or_else(|e| panic!("{ok}: {e}"));
            let again = serde_json::to_value(&event).unwrap();
            assert_eq!(validate_value(&again), [], "{ok} -> {again}");
        }
        for bad in [
            "2026-11-26",
            "2026-11-26 10:00:00Z",
            "2026-11-26t10:00:00z",
            "2026-11-26T10:00:00",
            "2026-11-26T10:00Z",
            "2026-11-26T10:00:00.Z",
            "2026-11-26T10:00:00.1234567890Z",
            "2026-11-26T10:00:00+0100",
            "2026-11-26T10:00:00Z ",
            "0001-01-01T00:00:00Z",
            "2100-01-01T00:00:00Z",
            "1900-01-01T10:00:00+01:00",
            "2099-12-31T20:00:00-05:00",
            "2026-02-29T00:00:00Z",
            "1900-02-29T00:00:00Z",
            "2026-02-30T00:00:00Z",
            "2026-04-31T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-00-10T00:00:00Z",
            "2026-11-00T00:00:00Z",
            "2026-11-26T24:00:00Z",
            "2026-11-26T10:60:00Z",
            "2026-11-26T23:59:60+01:00",
            "2026-11-26T10:00:00+24:00",
            "2026-11-26T10:00:00+01:60",
            "２０２６-11-26T10:00:00Z",
        ] {
            assert!(check_timestamp(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn uris() {
        for ok in [
            "https://shop.example.com/p/sku-1?utm_source=meta&x=%20#reviews",
            "http://example.com",
            "https://user:pw@example.com:8443/a",
            "https://[2001:db8::1]:443/",
            "https://[v7.fe80::a+en1]/",
            "https://192.168.0.1/",
            "mailto:someone@example.com",
            "urn:isbn:0451450523",
            "android-app://com.example.app/https/example.com/p",
            "http://",
            "https://example.com:/",
        ] {
            assert!(is_uri(ok), "{ok}");
        }
        for bad in [
            "",
            "example.com/page",
            "/relative/path",
            "not a url",
            "https://example.com/a b",
            "https://exa mple.com/",
            "https://example.com/café",
            "https://example.com/%zz",
            "https://example.com/%2",
            "https://example.com:80:80/",
            "https://example.com:8o/",
            "https://[2001:db8::g]/",
            "https://[2001:db8::1/",
            "https://a@b@c/",
            "https://example.com/#a#b",
            "https://example.com/{x}",
            "1http://example.com",
            ":no-scheme",
        ] {
            assert!(!is_uri(bad), "{bad}");
        }
    }

    #[test]
    fn identity_hint_shapes() {
        for ok in [
            "a@b.co",
            "first.last+tag@example.co.uk",
            "δοκιμή@παράδειγμα.δοκιμή",
        ] {
            assert!(is_email(ok), "{ok}");
        }
        for bad in [
            "a@b", "a@.b", "a@b.", "@b.co", "a@b@c.co", " a@b.co", "a@b.co\n", "a b@c.co",
        ] {
            assert!(!is_email(bad), "{bad:?}");
        }
        for ok in [
            "+1 (650) 253-0000",
            "650.253.0000",
            "(650)2530000",
            "+442079460958",
        ] {
            assert!(is_phone(ok), "{ok}");
        }
        for bad in [
            "++1650253",
            "650-253-000-",
            "tel:+1650",
            "+(",
            "1",
            "650 253 0000 x1",
        ] {
            assert!(!is_phone(bad), "{bad}");
        }
        for ok in ["en", "en-US", "pt_BR", "zh-Hant-TW", "gsw"] {
            assert!(is_locale(ok), "{ok}");
        }
        for bad in ["EN", "e", "english", "en-", "en--US", "en-U", "en US"] {
            assert!(!is_locale(bad), "{bad}");
        }
    }

    #[test]
    fn invalid_event_accessors() {
        let err = parse_event(b"{").unwrap_err();
        assert_eq!(err.error_class(), "bad_json");
        assert!(err.violations().is_empty());
        let err = parse_event(b"[1,2]").unwrap_err();
        assert_eq!(err.error_class(), "not_object");
        assert_eq!(err.to_string(), "not a JSON object (got array)");
        let err = parse_event(b"{\"event\":\"lead\"}").unwrap_err();
        assert_eq!(err.error_class(), "schema");
        assert_eq!(err.violations().len(), 3);
        assert!(
            err.to_string()
                .starts_with("3 schema violation(s): /event_id: missing")
        );
    }

    #[test]
    fn parse_event_returns_the_typed_event() {
        let event = parse_event(base().to_string().as_bytes()).unwrap();
        assert_eq!(event.event, EventName::Purchase);
        assert_eq!(event.value, Some(10.0));
        assert_eq!(event.anchor(), "u1");
    }

    #[test]
    fn ndjson_report() {
        let input = format!(
            "{}\n\n{}\nnot json\n[]\n",
            base(),
            with("currency", json!("usd"))
        );
        let mut out = Vec::new();
        let summary = check_ndjson(input.as_bytes(), &mut out).unwrap();
        assert_eq!(
            summary,
            NdjsonSummary {
                valid: 1,
                invalid: 3,
                warned: 0,
            }
        );
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "line 1 ok purchase evt_1");
        assert!(lines[1].starts_with("line 3 INVALID evt_1: /currency: \"currency\" must be"));
        assert!(lines[2].starts_with("line 4 INVALID: not valid JSON: "));
        assert_eq!(lines[3], "line 5 INVALID: not a JSON object (got array)");
    }

    fn warnings(v: &Value) -> Vec<String> {
        check_value(v).1.into_iter().map(|h| h.pointer).collect()
    }

    #[test]
    fn malformed_hints_are_warnings_not_violations() {
        for (field, bad) in [
            ("email", json!("n/a")),
            ("phone", json!("+1 650 CALL NOW")),
            ("email_sha256", json!("abc")),
            ("phone_sha256", json!("z".repeat(64))),
        ] {
            let event = with(field, bad);
            assert_eq!(validate_value(&event), [], "{event}");
            assert_eq!(warnings(&event), [format!("/{field}")], "{event}");
        }
        let event = with("external_ids", json!({"crm": " ", "erp": "E-1"}));
        assert_eq!(pointers(&event), Vec::<String>::new());
        assert_eq!(warnings(&event), ["/external_ids/crm"]);
        let event = with("click_ids", json!({"gclid": "", "fbc": "fb.1.2.x"}));
        assert_eq!(warnings(&event), ["/click_ids/gclid"]);
        let event = with("context", json!({"ip": "203.0.113.42:443"}));
        assert_eq!(validate_value(&event), []);
        let (_, dropped) = check_value(&event);
        assert_eq!(
            dropped,
            [DroppedHint {
                field: "ip",
                pointer: "/context/ip".into(),
                reason: "not an IPv4 or IPv6 address (16 characters, an address with a port)"
                    .into(),
            }]
        );
        // A warning does not hide an error, nor an error a warning.
        let mut event = with("email", json!("n/a"));
        event["currency"] = json!("usd");
        assert_eq!(pointers(&event), ["/currency"]);
        assert_eq!(warnings(&event), ["/email"]);
    }

    #[test]
    fn hints_of_the_wrong_type_are_still_violations() {
        for (field, bad) in [
            ("email", json!(42)),
            ("phone", json!(6_502_530_000_u64)),
            ("email_sha256", json!(null)),
            ("phone_sha256", json!(["x"])),
        ] {
            let event = with(field, bad);
            assert_eq!(pointers(&event), [format!("/{field}")], "{event}");
            assert_eq!(warnings(&event), Vec::<String>::new());
        }
        let v = validate_value(&with("email", json!(42)));
        assert_eq!(
            v[0].to_string(),
            "/email: \"email\" must be a string, got 42"
        );
        let v = validate_value(&with("external_ids", json!({"crm": 1})));
        assert_eq!(
            v[0].to_string(),
            "/external_ids/crm: external id \"crm\" must be a string, got 1"
        );
        assert_eq!(
            pointers(&with("click_ids", json!({"gclid": true}))),
            ["/click_ids/gclid"]
        );
        assert_eq!(
            pointers(&with("context", json!({"ip": 2_130_706_433}))),
            ["/context/ip"]
        );
        // Structure around the hints stays an error.
        assert_eq!(
            pointers(&with("external_ids", json!({"CRM": "1"}))),
            ["/external_ids/CRM"]
        );
        assert_eq!(
            pointers(&with("click_ids", json!({"fbclid": "x"}))),
            ["/click_ids/fbclid"]
        );
    }

    #[test]
    fn ids_are_trimmed_but_still_required_to_be_valid() {
        assert_eq!(validate_value(&with("event_id", json!("  evt_1\t"))), []);
        assert_eq!(validate_value(&with("user_id", json!("\u{a0}u1 "))), []);
        for bad in ["", " ", "\t\u{3000}", "evt 1", " évt "] {
            assert_eq!(pointers(&with("event_id", json!(bad))), ["/event_id"]);
        }
        let padded = format!(" {} ", "e".repeat(128));
        assert_eq!(validate_value(&with("event_id", json!(padded))), []);
        let padded = format!(" {} ", "e".repeat(129));
        assert_eq!(pointers(&with("event_id", json!(padded))), ["/event_id"]);
        for id in ["user_id", "anonymous_id"] {
            assert_eq!(pointers(&with(id, json!("  "))), [format!("/{id}")]);
            let padded = format!("\n{}\n", "u".repeat(256));
            assert_eq!(validate_value(&with(id, json!(padded))), []);
            let padded = format!("\n{}\n", "u".repeat(257));
            assert_eq!(pointers(&with(id, json!(padded))), [format!("/{id}")]);
        }
        // Not whitespace, so not trimmed: a byte-order mark is part of the id.
        assert_eq!(
            pointers(&with("event_id", json!("\u{feff}evt"))),
            ["/event_id"]
        );
    }

    #[test]
    fn parse_event_normalises_identifiers_and_drops_bad_hints() {
        let mut event = with("email", json!("  Jane.Doe@Example.COM "));
        event["event_id"] = json!(" evt_1\n");
        event["user_id"] = json!(" U-1 ");
        event["phone"] = json!(" +1 (650) 555-1234 ");
        event["email_sha256"] = json!(format!(" {}", "AB".repeat(32)));
        event["external_ids"] = json!({"crm": " CRM-1 ", "erp": "  "});
        event["click_ids"] = json!({"gclid": " Cj0KCQ_Ab ", "fbc": ""});
        event["context"] = json!({"ip": " 203.0.113.7 "});
        let parsed = parse_event(event.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.event_id, "evt_1");
        assert_eq!(parsed.user_id.as_deref(), Some("U-1"));
        assert_eq!(parsed.email.as_deref(), Some("jane.doe@example.com"));
        assert_eq!(parsed.phone.as_deref(), Some("+1 (650) 555-1234"));
        assert_eq!(parsed.email_sha256, Some("ab".repeat(32)));
        assert_eq!(
            parsed.external_ids.into_iter().collect::<Vec<_>>(),
            [("crm".to_owned(), "CRM-1".to_owned())]
        );
        let clicks = parsed.click_ids.unwrap();
        assert_eq!(clicks.gclid.as_deref(), Some("Cj0KCQ_Ab"));
        assert_eq!(clicks.fbc, None);
        assert_eq!(
            parsed.context.unwrap().ip,
            Some("203.0.113.7".parse().unwrap())
        );
        let dropped: Vec<(&str, &str)> = parsed
            .dropped_hints
            .iter()
            .map(|h| (h.field, h.pointer.as_str()))
            .collect();
        assert_eq!(
            dropped,
            [
                ("click_ids", "/click_ids/fbc"),
                ("external_ids", "/external_ids/erp")
            ]
        );
        // The same through the reference path.
        let slow = parse_event_slow(event.to_string().as_bytes()).unwrap();
        assert_eq!(slow.dropped_hints, parsed.dropped_hints);
        assert_eq!(slow.email.as_deref(), Some("jane.doe@example.com"));
    }

    #[test]
    fn non_ascii_emails_are_lowercased_as_str_to_lowercase_does() {
        let parsed = parse_event(
            with("email", json!(" ÉLODIE@Exemple.FR "))
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(parsed.email.as_deref(), Some("élodie@exemple.fr"));
        let mut s = String::from("İx@Y.de");
        lowercase_in_place(&mut s);
        assert_eq!(s, "İx@Y.de".to_lowercase());
    }

    #[test]
    fn trimming_is_in_place() {
        for (raw, trimmed) in [
            ("abc", "abc"),
            ("  abc\t", "abc"),
            ("\u{3000}a b\u{a0}", "a b"),
            (" ", ""),
        ] {
            let mut s = String::from(raw);
            let (ptr, capacity) = (s.as_ptr(), s.capacity());
            trim_in_place(&mut s);
            assert_eq!(s, trimmed);
            assert_eq!((s.as_ptr(), s.capacity()), (ptr, capacity), "{raw:?}");
            assert_eq!(s, raw.trim());
        }
        let mut s = String::from("Jane@Example.com");
        let ptr = s.as_ptr();
        Hint::Email.normalize(&mut s);
        assert_eq!((s.as_str(), s.as_ptr()), ("jane@example.com", ptr));
    }

    #[test]
    fn reasons_describe_the_shape_never_the_value() {
        let cases = [
            (
                Hint::Email,
                "n/a",
                "not an email address (3 characters, no '@')",
            ),
            (
                Hint::Email,
                "   ",
                "not an email address (empty after trimming)",
            ),
            (
                Hint::Email,
                "jane@doe@example.com",
                "not an email address (20 characters, more than one '@')",
            ),
            (
                Hint::Email,
                "jane doe@example.com",
                "not an email address (20 characters, contains spaces or control characters)",
            ),
            (
                Hint::Email,
                "@example.com",
                "not an email address (12 characters, nothing before the '@')",
            ),
            (
                Hint::Email,
                "jane@localhost",
                "not an email address (14 characters, no '.' inside the domain)",
            ),
            (
                Hint::Phone,
                "+1 650 CALL NOW",
                "not a phone number (15 characters, contains letters)",
            ),
            (
                Hint::Phone,
                "650#253#0000",
                "not a phone number (12 characters, contains characters other than digits, '+', spaces, dots, dashes and parentheses)",
            ),
            (
                Hint::Phone,
                "12345",
                "not a phone number (5 characters, fewer than 6)",
            ),
            (
                Hint::Phone,
                "++16502530000",
                "not a phone number (13 characters, not shaped like \"+1 (650) 253-0000\": '+' only first, a digit first and last)",
            ),
            (
                Hint::Sha256,
                "abc123",
                "not a SHA-256 digest (6 hex digits, expected 64)",
            ),
            (
                Hint::Sha256,
                "sha256:abc",
                "not a SHA-256 digest (10 characters, expected 64 hex digits)",
            ),
            (
                Hint::ExternalId,
                " ",
                "not an id of 1 to 256 characters (empty after trimming)",
            ),
            (
                Hint::ClickId,
                &"g".repeat(513),
                "not a click id of 1 to 512 characters (513 characters)",
            ),
            (
                Hint::Ip,
                "localhost",
                "not an IPv4 or IPv6 address (9 characters)",
            ),
            (
                Hint::Ip,
                "fe80::1%eth0",
                "not an IPv4 or IPv6 address (12 characters, an address with a zone index)",
            ),
        ];
        for (hint, raw, expected) in cases {
            let reason = hint
                .problem(raw)
                .unwrap_or_else(|| panic!("{raw:?} is fine"));
            assert_eq!(reason, expected, "{hint:?} {raw:?}");
            let value = raw.trim();
            if value.len() > 3 {
                assert!(!reason.contains(value), "{reason} quotes {raw:?}");
            }
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert_eq!(
            Hint::Email.problem(&long).as_deref(),
            Some(
                "not an email address (262 characters, longer than 254 characters once lowercased)"
            )
        );
        for (hint, fine) in [
            (Hint::Email, " Jane@Example.com "),
            (Hint::Phone, " +1 (650) 253-0000 "),
            (Hint::Sha256, &"AbC1".repeat(16)),
            (Hint::ExternalId, " x "),
            (Hint::ClickId, "\tCj0\n"),
            (Hint::Ip, " ::1 "),
        ] {
            assert_eq!(hint.problem(fine), None, "{hint:?} {fine:?}");
        }
    }

    /// The schema spells "whitespace" as a character class (its regex
    /// dialects disagree on `\s`); it must be exactly what `str::trim`
    /// removes.
    #[test]
    fn the_schemas_whitespace_is_what_trim_removes() {
        let schema: Value = serde_json::from_str(SCHEMA_JSON).unwrap();
        let pattern = |field: &str| {
            let p = schema["properties"][field]["pattern"].as_str().unwrap();
            regex::Regex::new(p).unwrap()
        };
        let event_id = pattern("event_id");
        let user_id = pattern("user_id");
        assert_eq!(user_id.as_str(), pattern("anonymous_id").as_str());
        // Every White_Space character is below U+3001; a few beyond for luck.
        let chars = (0..=0x3100u32)
            .chain([0xfeff, 0xffff, 0x1_f600, 0x10_ffff])
            .filter_map(char::from_u32);
        for c in chars {
            let padded = format!("{c}id{c}");
            assert_eq!(
                event_id.is_match(&padded),
                c.is_whitespace() || c.is_ascii_graphic(),
                "event_id, U+{:04X}",
                u32::from(c)
            );
            assert!(user_id.is_match(&padded), "user_id, U+{:04X}", u32::from(c));
            assert_eq!(
                user_id.is_match(&c.to_string()),
                !c.is_whitespace(),
                "user_id alone, U+{:04X}",
                u32::from(c)
            );
        }
        let id = |n: usize| format!(" \u{3000}{}\u{a0}", "é".repeat(n));
        assert!(user_id.is_match(&id(256)) && !user_id.is_match(&id(257)));
        assert!(user_id.is_match(" a \n b "));
    }

    #[test]
    fn ndjson_report_warns_about_dropped_hints() {
        let mut padded = with("email", json!("  Jane.Doe@Example.COM "));
        padded["event_id"] = json!(" evt_2 ");
        let mut two = with("email", json!("n/a"));
        two["event_id"] = json!("evt_3");
        two["click_ids"] = json!({"gclid": ""});
        let input = format!("{padded}\n{}\n{two}\n", with("phone", json!(42)));
        let mut out = Vec::new();
        let summary = check_ndjson(input.as_bytes(), &mut out).unwrap();
        assert_eq!(
            summary,
            NdjsonSummary {
                valid: 2,
                invalid: 1,
                warned: 1,
            }
        );
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "line 1 ok purchase evt_2",
                "line 2 INVALID evt_1: /phone: \"phone\" must be a string, got 42",
                "line 3 ok purchase evt_3",
                "    warning /click_ids/gclid: not a click id of 1 to 512 characters (empty after trimming); the hint is dropped, the event is routed",
                "    warning /email: not an email address (3 characters, no '@'); the hint is dropped, the event is routed",
            ]
        );
        assert_eq!(
            summary.line(false),
            "2 valid, 1 invalid (1 valid with dropped hints)"
        );
        assert_eq!(
            summary.line(true),
            "1 valid, 2 invalid (1 only for dropped hints, --strict)"
        );
        assert!(!summary.passes(false) && !summary.passes(true));
        let clean = NdjsonSummary {
            valid: 3,
            invalid: 0,
            warned: 0,
        };
        assert_eq!(clean.line(true), "3 valid, 0 invalid");
        assert!(clean.passes(true));
        let warned = NdjsonSummary { warned: 1, ..clean };
        assert!(warned.passes(false) && !warned.passes(true));
    }
}
