//! Step 4 and 5: consent per destination, the event allowlist, the
//! canonical → vendor name, and PII shaped for the destination.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{Map, Value};

use super::identity::{HashedIds, Resolved};
use crate::config::DestinationConfig;
use crate::delivery::DELIVERY_VERSION;
use crate::event::normalize::{EmailRule, PhoneFormat, Sha256Digest};
use crate::event::{CanonicalEvent, ClickKind, ConsentState, Context, EventName, Item};
use crate::settings::ConsentDefault;

/// Why an event does not go to a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    NotInAllowlist,
    /// The vendor has no name for this event (e.g. a refund for Meta).
    NotMapped,
    ConsentDenied {
        category: String,
    },
    /// The event says nothing about the category and the destination defaults to deny.
    ConsentMissing {
        category: String,
    },
}

impl Skip {
    pub fn reason(&self) -> String {
        match self {
            Skip::NotInAllowlist => "not in allowlist".into(),
            Skip::NotMapped => "no vendor event name".into(),
            Skip::ConsentDenied { category } => format!("consent {category} denied"),
            Skip::ConsentMissing { category } => {
                format!("consent {category} missing (default deny)")
            }
        }
    }
}

/// The vendor name for `event` at `dest`, or why it is not sent there.
pub fn select<'a>(dest: &'a DestinationConfig, ev: &'a CanonicalEvent) -> Result<&'a str, Skip> {
    let listed = dest.events.contains(&ev.event);
    if !dest.events.is_empty() && !listed {
        return Err(Skip::NotInAllowlist);
    }
    let name = dest
        .event_names
        .get(ev.event.as_str())
        .map(String::as_str)
        .or_else(|| dest.vendor.preset_name(&ev.event))
        .or_else(|| match &ev.event {
            // A custom event listed explicitly goes out under its own name.
            EventName::Custom(n) if listed => Some(n.trim_start_matches("custom.")),
            _ => None,
        })
        .ok_or(Skip::NotMapped)?;
    let category = &dest.consent;
    match (ev.consent_for(category), dest.consent_default) {
        (Some(ConsentState::Granted), _) | (None, ConsentDefault::Grant) => Ok(name),
        (Some(ConsentState::Denied), _) => Err(Skip::ConsentDenied {
            category: category.clone(),
        }),
        (None, ConsentDefault::Deny) => Err(Skip::ConsentMissing {
            category: category.clone(),
        }),
    }
}

/// What a destination may see of the person behind an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exposure {
    /// Ad platforms and GA4: SHA-256 hashes only, no traits or metadata.
    HashesOnly,
    /// Hashes, traits without contact fields, metadata.
    NoRawContact,
    /// Everything the event carries (CRM, own webhooks, when configured).
    Raw,
}

/// Writes delivery records: a `Delivery` as JSON, shaped for one
/// destination, without building one per destination. The event's fields
/// that every destination sees alike are serialised once per event and
/// spliced into each destination's record next to the few that differ
/// (the identity hashes by vendor rule and the raw contact data). Serialising
/// a cloned, reshaped event per destination was a fifth of the router's CPU.
///
/// JSON field order is not part of the record's contract: the sink reads it
/// with serde into [`crate::delivery::Delivery`].
#[derive(Debug)]
pub struct DeliveryWriter {
    /// Per enabled destination, in config order.
    dests: Vec<DestPlan>,
    /// `"origin":{"topic":"<canonical>","partition":`, JSON-escaped once.
    origin_head: Vec<u8>,
    shared: Vec<u8>,
    /// The prepared event's properties hold contact data, so they are
    /// written per destination instead of among the shared fields.
    properties_per_destination: bool,
}

#[derive(Debug)]
struct DestPlan {
    /// `{"v":1,"destination":"<name>",`
    head: Vec<u8>,
    email: EmailRule,
    phone: PhoneFormat,
    exposure: Exposure,
}

impl DeliveryWriter {
    pub fn new<'a>(
        canonical_topic: &str,
        destinations: impl Iterator<Item = &'a DestinationConfig>,
    ) -> DeliveryWriter {
        let dests = destinations
            .map(|d| {
                let mut head = format!("{{\"v\":{DELIVERY_VERSION},\"destination\":").into_bytes();
                json_into(&mut head, &d.name);
                head.push(b',');
                let spec = d.vendor.spec();
                let exposure = if spec.hashes_only() {
                    Exposure::HashesOnly
                } else if d.raw_contact {
                    Exposure::Raw
                } else {
                    Exposure::NoRawContact
                };
                DestPlan {
                    head,
                    email: spec.email,
                    phone: spec.phone,
                    exposure,
                }
            })
            .collect();
        let mut origin_head = b"\"origin\":{\"topic\":".to_vec();
        json_into(&mut origin_head, canonical_topic);
        origin_head.extend_from_slice(b",\"partition\":");
        DeliveryWriter {
            dests,
            origin_head,
            shared: Vec::new(),
            properties_per_destination: false,
        }
    }

    /// Serialises the fields of `ev` every destination shares; call once per
    /// event, before `write`. (`event` and `event_id` are never absent, so
    /// the shared object is never empty.)
    pub fn prepare(&mut self, ev: &CanonicalEvent, who: &Resolved<'_>) {
        // Publishers (and vendor SDKs) put contact data among properties;
        // only destinations with raw contact may see it, so such properties
        // cannot be shared. The common case stays serialised once.
        self.properties_per_destination = ev
            .properties
            .as_ref()
            .is_some_and(|p| p.keys().any(|k| is_contact_key(k)));
        let own = ev.click_ids.as_ref();
        let click = |kind| {
            // The event's own ids are the freshest.
            own.and_then(|c| c.get(kind)).or_else(|| who.click_id(kind))
        };
        let shared = Shared {
            event: &ev.event,
            event_id: &ev.event_id,
            occurred_at: &ev.occurred_at,
            source: ev.source.as_deref(),
            user_id: ev.user_id.as_deref().or(who.user_id),
            anonymous_id: ev.anonymous_id.as_deref(),
            click_ids: ClickRefs {
                fbc: click(ClickKind::Fbc),
                fbp: click(ClickKind::Fbp),
                gclid: click(ClickKind::Gclid),
                gbraid: click(ClickKind::Gbraid),
                wbraid: click(ClickKind::Wbraid),
                ttclid: click(ClickKind::Ttclid),
                ttp: click(ClickKind::Ttp),
            },
            context: ev.context.as_ref(),
            consent: &ev.consent,
            value: ev.value,
            currency: ev.currency.as_deref(),
            order_id: ev.order_id.as_deref(),
            items: &ev.items,
            properties: ev
                .properties
                .as_ref()
                .filter(|_| !self.properties_per_destination),
        };
        self.shared.clear();
        serde_json::to_writer(&mut self.shared, &shared).expect("serialising to memory");
    }

    /// Appends destination `index`'s delivery record of the prepared event to `out`.
    pub fn write(
        &mut self,
        out: &mut Vec<u8>,
        index: usize,
        name: &str,
        ev: &CanonicalEvent,
        who: &Resolved<'_>,
        stamp: Stamp<'_>,
    ) {
        let plan = &self.dests[index];
        let (email, phone, external_ids, traits, metadata) = match plan.exposure {
            Exposure::HashesOnly => (
                None,
                None,
                ExternalIds::Hashed(who.external_ids()),
                None,
                None,
            ),
            Exposure::NoRawContact => (
                None,
                None,
                ExternalIds::Raw(&ev.external_ids),
                ev.traits.as_ref().map(Fields::WithoutContact),
                ev.metadata.as_ref(),
            ),
            Exposure::Raw => (
                ev.email.as_deref(),
                ev.phone.as_deref(),
                ExternalIds::Raw(&ev.external_ids),
                ev.traits.as_ref().map(Fields::All),
                ev.metadata.as_ref(),
            ),
        };
        let properties = ev
            .properties
            .as_ref()
            .filter(|_| self.properties_per_destination)
            .map(|p| match plan.exposure {
                Exposure::Raw => Fields::All(p),
                Exposure::HashesOnly | Exposure::NoRawContact => Fields::WithoutContact(p),
            });
        let personal = Personal {
            email,
            phone,
            email_sha256: who.email_hash(plan.email),
            phone_sha256: who.phone_hash(plan.phone),
            external_ids,
            traits,
            metadata,
            properties,
        };
        out.extend_from_slice(&plan.head);
        out.extend_from_slice(b"\"name\":");
        json_into(out, name);
        out.extend_from_slice(b",\"event\":");
        // The shared members, then the personal ones serialised in place:
        // their object's opening brace becomes the separating comma.
        out.extend_from_slice(&self.shared[..self.shared.len() - 1]);
        let at = out.len();
        serde_json::to_writer(&mut *out, &personal).expect("serialising to memory");
        if out.len() - at == 2 {
            // `{}`: nothing personal.
            out.truncate(at);
            out.push(b'}');
        } else {
            out[at] = b',';
        }
        out.push(b',');
        out.extend_from_slice(&self.origin_head);
        let mut n = itoa::Buffer::new();
        out.extend_from_slice(n.format(stamp.partition).as_bytes());
        out.extend_from_slice(b",\"offset\":");
        out.extend_from_slice(n.format(stamp.offset).as_bytes());
        out.extend_from_slice(b"},\"routed_at\":");
        out.extend_from_slice(stamp.routed_at);
        out.push(b'}');
    }
}

/// Where a delivery's event was read, and when it was routed.
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    pub partition: i32,
    pub offset: i64,
    /// A JSON string, quotes included.
    pub routed_at: &'a [u8],
}

/// Appends `s` as a JSON string.
fn json_into(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("serialising to memory");
}

/// The event's fields every destination sees alike, enriched. Every field
/// of `CanonicalEvent` is here or in [`Personal`], never in both.
#[derive(Serialize)]
struct Shared<'a> {
    event: &'a EventName,
    event_id: &'a str,
    #[serde(serialize_with = "rfc3339")]
    occurred_at: &'a DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    anonymous_id: Option<&'a str>,
    #[serde(skip_serializing_if = "ClickRefs::is_empty")]
    click_ids: ClickRefs<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    context: Option<&'a Context>,
    #[serde(skip_serializing_if = "no_entries")]
    consent: &'a BTreeMap<String, ConsentState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    currency: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    order_id: Option<&'a str>,
    #[serde(skip_serializing_if = "no_items")]
    items: &'a [Item],
    #[serde(skip_serializing_if = "Option::is_none")]
    properties: Option<&'a Map<String, Value>>,
}

/// As chrono's `Serialize` writes it, without going through `fmt` one
/// character at a time (that was a fifth of the delivery writer's time).
fn rfc3339<S: serde::Serializer>(t: &&DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// The event's fields that differ by destination.
#[derive(Serialize)]
struct Personal<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    phone: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email_sha256: Option<Sha256Digest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    phone_sha256: Option<Sha256Digest>,
    #[serde(skip_serializing_if = "ExternalIds::is_empty")]
    external_ids: ExternalIds<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    traits: Option<Fields<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a Map<String, Value>>,
    /// Only when they hold contact data; otherwise they are in [`Shared`].
    #[serde(skip_serializing_if = "Option::is_none")]
    properties: Option<Fields<'a>>,
}

fn no_entries<K, V>(m: &&BTreeMap<K, V>) -> bool {
    m.is_empty()
}

/// The event's own external ids, or the hashed ones the identity table knows.
#[derive(Clone, Copy)]
enum ExternalIds<'a> {
    Raw(&'a BTreeMap<String, String>),
    Hashed(HashedIds<'a>),
}

impl ExternalIds<'_> {
    fn is_empty(&self) -> bool {
        match self {
            ExternalIds::Raw(m) => m.is_empty(),
            ExternalIds::Hashed(h) => h.is_empty(),
        }
    }
}

impl Serialize for ExternalIds<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ExternalIds::Raw(m) => m.serialize(serializer),
            ExternalIds::Hashed(h) => h.serialize(serializer),
        }
    }
}

fn no_items(items: &&[Item]) -> bool {
    items.is_empty()
}

#[derive(Serialize)]
struct ClickRefs<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    fbc: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fbp: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gclid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gbraid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wbraid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttclid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttp: Option<&'a str>,
}

impl ClickRefs<'_> {
    fn is_empty(&self) -> bool {
        [
            self.fbc,
            self.fbp,
            self.gclid,
            self.gbraid,
            self.wbraid,
            self.ttclid,
            self.ttp,
        ]
        .iter()
        .all(Option::is_none)
    }
}

/// Traits or properties as a destination may see them.
#[derive(Clone, Copy)]
enum Fields<'a> {
    All(&'a Map<String, Value>),
    /// Without the raw contact fields.
    WithoutContact(&'a Map<String, Value>),
}

impl Serialize for Fields<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match *self {
            Fields::All(t) => t.serialize(serializer),
            Fields::WithoutContact(t) => {
                serializer.collect_map(t.iter().filter(|(k, _)| !is_contact_key(k)))
            }
        }
    }
}

/// A top-level key of properties or traits that by its name holds an email
/// address or a phone number, in the spellings vendor SDKs and publishers
/// use (`email`, `$email`, `E-Mail`, `email_address`, `phone_number`,
/// `$phone`, `Mobile`, ...). Case, a leading `$` and separators do not count.
pub fn is_contact_key(key: &str) -> bool {
    const NAMES: &[&str] = &[
        "email",
        "emailaddress",
        "mail",
        "phone",
        "phonenumber",
        "mobile",
        "mobilephone",
        "mobilenumber",
        "cellphone",
        "telephone",
        "tel",
    ];
    let key = key.trim().trim_start_matches('$');
    if key.len() > 32 {
        return false;
    }
    let mut folded = [0u8; 32];
    let mut n = 0;
    for b in key
        .bytes()
        .filter(|b| !matches!(b, b'_' | b'-' | b' ' | b'.'))
    {
        folded[n] = b.to_ascii_lowercase();
        n += 1;
    }
    NAMES.iter().any(|name| name.as_bytes() == &folded[..n])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::delivery::Delivery;
    use crate::event::normalize::{parse_country, sha256_hex};
    use crate::event::parse_event;
    use crate::router::identity::{IdentityTable, PhoneHasher, Profile};

    const CONFIG: &str = r#"
[destinations.meta]
type = "meta_capi"
pixel_id = "1"
access_token = "t"
[destinations.ga4]
type = "ga4"
measurement_id = "G-TEST1"
api_secret = "s"
[destinations.gads]
type = "google_ads"
customer_id = "1234567890"
developer_token = "d"
access_token = "t"
conversion_actions = { purchase = "11" }
[destinations.hook]
type = "webhook"
url = "http://127.0.0.1:1/"
secret = "0123456789abcdef"
consent = "analytics"
events = ["purchase", "custom.webinar_registered"]
[destinations.crm]
type = "webhook"
url = "http://127.0.0.1:1/"
secret = "0123456789abcdef"
consent = "marketing"
consent_default = "deny"
raw_contact = true
"#;

    fn config() -> Config {
        Config::parse(CONFIG, std::path::Path::new("t.toml"), &|_| None).unwrap()
    }

    fn ev(json: &str) -> CanonicalEvent {
        parse_event(json.as_bytes()).unwrap()
    }

    fn routes(c: &Config, e: &CanonicalEvent) -> Vec<(String, Result<String, Skip>)> {
        c.destinations
            .values()
            .map(|d| (d.name.clone(), select(d, e).map(str::to_string)))
            .collect()
    }

    /// The event as destination `name` receives it, read back the way a sink reads it.
    fn shaped(c: &Config, name: &str, e: &CanonicalEvent, who: &Resolved<'_>) -> CanonicalEvent {
        let mut w = DeliveryWriter::new("events.canonical", c.enabled_destinations());
        let i = c
            .enabled_destinations()
            .position(|d| d.name == name)
            .unwrap();
        w.prepare(e, who);
        let mut out = b"leading bytes stay".to_vec();
        w.write(
            &mut out,
            i,
            "Nm\"x",
            e,
            who,
            Stamp {
                partition: 3,
                offset: 7,
                routed_at: b"\"2026-11-20T10:00:01Z\"",
            },
        );
        assert!(out.starts_with(b"leading bytes stay"));
        let d: Delivery = serde_json::from_slice(&out[18..]).unwrap();
        assert_eq!(
            (d.v, d.destination.as_str(), d.name.as_str()),
            (1, name, "Nm\"x")
        );
        assert_eq!(
            (d.origin.topic.as_str(), d.origin.partition, d.origin.offset),
            ("events.canonical", 3, 7)
        );
        assert_eq!(d.routed_at.to_rfc3339(), "2026-11-20T10:00:01+00:00");
        d.event
    }

    fn resolve_after_observing(t: &mut IdentityTable, e: &CanonicalEvent) {
        let mut phones = PhoneHasher::new(parse_country("US").unwrap());
        t.observe(e, &Profile::from_event(e, &mut phones), |_, _| {});
    }

    #[test]
    fn consent_matrix_granted_denied_missing() {
        let c = config();
        let base = r#""event":"purchase","event_id":"e","occurred_at":"2026-11-20T10:00:00Z","user_id":"u","value":1,"currency":"USD""#;
        let granted = ev(&format!(
            r#"{{{base},"consent":{{"ads":"granted","analytics":"granted","marketing":"granted"}}}}"#
        ));
        let denied = ev(&format!(
            r#"{{{base},"consent":{{"ads":"denied","analytics":"denied","marketing":"denied"}}}}"#
        ));
        let missing = ev(&format!("{{{base}}}"));
        let ok = |n: &str| Ok::<String, Skip>(n.to_string());
        let denied_ = |c: &str| Err(Skip::ConsentDenied { category: c.into() });
        let missing_ = |c: &str| Err(Skip::ConsentMissing { category: c.into() });
        assert_eq!(
            routes(&c, &granted),
            vec![
                ("crm".into(), ok("purchase")),
                ("ga4".into(), ok("purchase")),
                ("gads".into(), ok("purchase")),
                ("hook".into(), ok("purchase")),
                ("meta".into(), ok("Purchase")),
            ]
        );
        assert_eq!(
            routes(&c, &denied),
            vec![
                ("crm".into(), denied_("marketing")),
                ("ga4".into(), denied_("analytics")),
                ("gads".into(), denied_("ads")),
                ("hook".into(), denied_("analytics")),
                ("meta".into(), denied_("ads")),
            ]
        );
        // Ad platforms and GA4 (hashed contact data) default to deny; the
        // hook defaults to grant; crm is configured deny.
        assert_eq!(
            routes(&c, &missing),
            vec![
                ("crm".into(), missing_("marketing")),
                ("ga4".into(), missing_("analytics")),
                ("gads".into(), missing_("ads")),
                ("hook".into(), ok("purchase")),
                ("meta".into(), missing_("ads")),
            ]
        );
    }

    #[test]
    fn allowlist_presets_and_unmapped_events() {
        let c = config();
        let refund = ev(
            r#"{"event":"refund","event_id":"e","occurred_at":"2026-11-20T10:00:00Z","user_id":"u","value":1,"currency":"USD","consent":{"ads":"granted","analytics":"granted","marketing":"granted"}}"#,
        );
        let r = routes(&c, &refund);
        assert_eq!(r[1], ("ga4".into(), Ok("refund".into())));
        assert_eq!(r[2], ("gads".into(), Err(Skip::NotMapped)));
        assert_eq!(r[3], ("hook".into(), Err(Skip::NotInAllowlist)));
        assert_eq!(r[4], ("meta".into(), Err(Skip::NotMapped)));
        let custom = ev(
            r#"{"event":"custom.webinar_registered","event_id":"e","occurred_at":"2026-11-20T10:00:00Z","user_id":"u"}"#,
        );
        assert_eq!(
            select(&c.destinations["hook"], &custom),
            Ok("custom.webinar_registered")
        );
    }

    #[test]
    fn ad_platforms_get_vendor_hashes_and_never_raw_contact_data() {
        let c = config();
        let e = ev(
            r#"{"event":"purchase","event_id":"e","occurred_at":"2026-11-20T10:00:00Z","user_id":"u",
                "email":"John.Smith@gmail.com","phone":"650-253-0000","value":1,"currency":"USD",
                "traits":{"email":"John.Smith@gmail.com","plan":"pro"},"metadata":{"session":"s1"},
                "external_ids":{"crm":"C-1"}}"#,
        );
        let mut t = IdentityTable::default();
        resolve_after_observing(&mut t, &e);
        let who = t.resolve(&e);

        let meta = shaped(&c, "meta", &e, &who);
        assert_eq!(meta.email_sha256, Some(sha256_hex("john.smith@gmail.com")));
        assert_eq!(meta.phone_sha256, Some(sha256_hex("16502530000")));
        assert_eq!(meta.external_ids["crm"], sha256_hex("C-1"));
        let gads = shaped(&c, "gads", &e, &who);
        assert_eq!(gads.email_sha256, Some(sha256_hex("johnsmith@gmail.com")));
        assert_eq!(gads.phone_sha256, Some(sha256_hex("+16502530000")));
        for d in ["meta", "gads", "ga4"] {
            let out = serde_json::to_string(&shaped(&c, d, &e, &who)).unwrap();
            for raw in [
                "John.Smith",
                "john.smith@",
                "650-253",
                "6502530000\"",
                "session",
                "C-1\"",
            ] {
                assert!(!out.contains(raw), "{d} got raw {raw}: {out}");
            }
        }
        let hook = shaped(&c, "hook", &e, &who);
        assert!(hook.email.is_none() && hook.phone.is_none());
        assert_eq!(
            hook.traits.as_ref().unwrap().get("plan"),
            Some(&Value::from("pro"))
        );
        assert!(hook.traits.as_ref().unwrap().get("email").is_none());
        let crm = shaped(&c, "crm", &e, &who);
        // Trimmed and lowercased once, at parse time, for every destination.
        assert_eq!(crm.email.as_deref(), Some("john.smith@gmail.com"));
    }

    #[test]
    fn contact_keys_in_properties_and_traits_reach_only_raw_contact_destinations() {
        let c = config();
        let e = ev(
            r#"{"event":"purchase","event_id":"e","occurred_at":"2026-11-20T10:00:00Z","user_id":"u",
                "value":1,"currency":"USD",
                "properties":{"email":"Prop.Mail@Example.com","$Email":"dollar@example.com",
                    "E-Mail":"dash@example.com","email_address":"addr@example.com",
                    "PHONE":"+1 415 555 0101","$phone":"+1 415 555 0102",
                    "phone_number":"+1 415 555 0103","Mobile":"+1 415 555 0104","plan":"pro"},
                "traits":{"$email":"trait@example.com","PhoneNumber":"+1 415 555 0105","tier":"gold"}}"#,
        );
        let t = IdentityTable::default();
        let who = t.resolve(&e);
        for d in ["meta", "gads", "ga4", "hook"] {
            let shaped = shaped(&c, d, &e, &who);
            let out = serde_json::to_string(&shaped).unwrap().to_ascii_lowercase();
            for raw in ["@example.com", "415 555"] {
                assert!(!out.contains(raw), "{d} got raw {raw}: {out}");
            }
            let props = shaped.properties.as_ref().unwrap();
            assert_eq!(props.get("plan"), Some(&Value::from("pro")), "{d}");
        }
        let hook = shaped(&c, "hook", &e, &who);
        assert_eq!(hook.traits.unwrap().get("tier"), Some(&Value::from("gold")));
        let crm = shaped(&c, "crm", &e, &who);
        assert_eq!(crm.properties, e.properties);
        assert_eq!(crm.traits, e.traits);
    }

    #[test]
    fn times_are_written_as_chrono_writes_them() {
        for t in [
            "2026-11-20T10:00:00Z",
            "2026-11-20T10:00:00.5+01:00",
            "2026-11-20T10:00:00.123456Z",
            "1999-01-02T03:04:05.123456789Z",
        ] {
            let t: DateTime<Utc> = DateTime::parse_from_rfc3339(t).unwrap().into();
            let mut ours = Vec::new();
            rfc3339(&&t, &mut serde_json::Serializer::new(&mut ours)).unwrap();
            assert_eq!(ours, serde_json::to_vec(&t).unwrap());
        }
    }

    #[test]
    fn an_event_with_nothing_personal_is_still_well_formed() {
        let c = config();
        let e = ev(
            r#"{"event":"lead","event_id":"e","occurred_at":"2026-11-20T10:00:00Z","anonymous_id":"a","consent":{"ads":"granted"}}"#,
        );
        let t = IdentityTable::default();
        assert_eq!(shaped(&c, "meta", &e, &t.resolve(&e)), e);
    }

    #[test]
    fn every_field_reaches_a_destination_that_may_see_it() {
        let c = config();
        let e = ev(
            r#"{"event":"purchase","event_id":"e","occurred_at":"2026-11-20T10:00:00Z","source":"web",
                "user_id":"u","anonymous_id":"a","email":"x@example.com","phone":"+1 650 253 0000",
                "external_ids":{"crm":"C-1"},"click_ids":{"fbc":"fb.1.1.a","fbp":"fb.1.1.b","gclid":"G",
                "gbraid":"GB","wbraid":"WB","ttclid":"T","ttp":"TP"},
                "context":{"ip":"203.0.113.7","user_agent":"UA","page_url":"https://x.example/p",
                "referrer":"https://r.example/","locale":"en-US"},
                "consent":{"marketing":"granted"},"value":5.5,"currency":"USD","order_id":"o",
                "items":[{"id":"sku","name":"n","category":"c","brand":"b","variant":"v","quantity":2,"price":2.75}],
                "properties":{"p":1},"traits":{"email":"x@example.com","plan":"pro"},"metadata":{"m":true}}"#,
        );
        let mut t = IdentityTable::default();
        resolve_after_observing(&mut t, &e);
        let who = t.resolve(&e);
        // crm may see everything: what it gets is the event plus the hashes.
        let mut expected = e.clone();
        expected.email_sha256 = Some(sha256_hex("x@example.com"));
        expected.phone_sha256 = Some(sha256_hex("+16502530000"));
        assert_eq!(shaped(&c, "crm", &e, &who), expected);
    }

    #[test]
    fn enrichment_comes_from_the_table_and_the_events_own_ids_win() {
        let c = config();
        let signup = ev(
            r#"{"event":"sign_up","event_id":"s","occurred_at":"2026-11-20T10:00:00Z","user_id":"u",
                "anonymous_id":"a","email":"x@example.com","click_ids":{"fbc":"old","gclid":"G"}}"#,
        );
        let later = ev(
            r#"{"event":"purchase","event_id":"p","occurred_at":"2026-11-20T11:00:00Z","anonymous_id":"a",
                "value":1,"currency":"USD","click_ids":{"fbc":"new"}}"#,
        );
        let mut t = IdentityTable::default();
        resolve_after_observing(&mut t, &signup);
        let who = t.resolve(&later);
        let meta = shaped(&c, "meta", &later, &who);
        assert_eq!(meta.user_id.as_deref(), Some("u"));
        assert_eq!(meta.email_sha256, Some(sha256_hex("x@example.com")));
        let clicks = meta.click_ids.unwrap();
        assert_eq!(
            (clicks.fbc.as_deref(), clicks.gclid.as_deref()),
            (Some("new"), Some("G"))
        );
    }
}
