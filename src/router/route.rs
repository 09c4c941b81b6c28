//! Step 4 and 5: consent per destination, the event allowlist, the
//! canonical → vendor name, and PII shaped for the destination.

use serde_json::Value;

use super::identity::{EmailRule, Resolved};
use crate::config::{ConsentDefault, DestinationConfig, DestinationKind};
use crate::event::normalize::PhoneFormat;
use crate::event::{CanonicalEvent, ConsentState, EventName};

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

/// The vendor's event name presets (VENDOR-CONTRACTS.md); `None` = not sent.
pub fn preset_name(kind: &DestinationKind, event: &EventName) -> Option<String> {
    use EventName::*;
    let name = match kind {
        DestinationKind::MetaCapi(_) => match event {
            ViewContent => "ViewContent",
            AddToCart => "AddToCart",
            BeginCheckout => "InitiateCheckout",
            SignUp => "CompleteRegistration",
            StartTrial => "StartTrial",
            Lead => "Lead",
            Purchase => "Purchase",
            Subscribe => "Subscribe",
            Renewal => "Renewal",
            Search => "Search",
            Refund | Identify | Custom(_) => return None,
        },
        DestinationKind::TiktokEvents(_) => match event {
            ViewContent => "ViewContent",
            AddToCart => "AddToCart",
            BeginCheckout => "InitiateCheckout",
            SignUp => "CompleteRegistration",
            StartTrial | Subscribe => "Subscribe",
            Lead => "Lead",
            Purchase => "CompletePayment",
            Search => "Search",
            Renewal | Refund | Identify | Custom(_) => return None,
        },
        DestinationKind::Ga4(_) => match event {
            ViewContent => "view_item",
            AddToCart => "add_to_cart",
            BeginCheckout => "begin_checkout",
            SignUp => "sign_up",
            Lead => "generate_lead",
            Purchase => "purchase",
            Search => "search",
            Refund => "refund",
            StartTrial | Subscribe | Renewal | Identify | Custom(_) => return None,
        },
        // Google Ads sends only events that have a conversion action.
        DestinationKind::GoogleAds(g) => {
            return g
                .conversion_actions
                .contains_key(event.as_str())
                .then(|| event.as_str().to_string());
        }
        // A webhook receives the canonical name of everything.
        DestinationKind::Webhook(_) => return Some(event.as_str().to_string()),
    };
    Some(name.to_string())
}

/// The vendor name for `event` at `dest`, or why it is not sent there.
pub fn select(dest: &DestinationConfig, ev: &CanonicalEvent) -> Result<String, Skip> {
    let listed = dest.events.contains(&ev.event);
    if !dest.events.is_empty() && !listed {
        return Err(Skip::NotInAllowlist);
    }
    let name = dest
        .event_names
        .get(ev.event.as_str())
        .cloned()
        .or_else(|| preset_name(&dest.kind, &ev.event))
        .or_else(|| match &ev.event {
            // A custom event listed explicitly goes out under its own name.
            EventName::Custom(n) if listed => Some(n.trim_start_matches("custom.").to_string()),
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

/// Each vendor's own normalisation before hashing.
fn hash_rules(kind: &DestinationKind) -> (EmailRule, PhoneFormat) {
    match kind {
        DestinationKind::MetaCapi(_) => (EmailRule::Plain, PhoneFormat::DigitsOnly),
        DestinationKind::GoogleAds(_) | DestinationKind::Ga4(_) => {
            (EmailRule::Google, PhoneFormat::E164)
        }
        DestinationKind::TiktokEvents(_) | DestinationKind::Webhook(_) => {
            (EmailRule::Plain, PhoneFormat::E164)
        }
    }
}

/// The event as `dest` may see it: enriched with the person's strongest
/// identifiers, hashed by the vendor's rules; for hash-only destinations no
/// raw email, phone, traits or metadata at all.
pub fn shape(dest: &DestinationConfig, ev: &CanonicalEvent, who: &Resolved) -> CanonicalEvent {
    let mut out = ev.clone();
    if out.user_id.is_none() {
        out.user_id.clone_from(&who.user_id);
    }
    let (email_rule, phone_format) = hash_rules(&dest.kind);
    let p = &who.profile;
    out.email_sha256 = p.email_hash(email_rule).map(str::to_string);
    out.phone_sha256 = p.phone_hash(phone_format).map(str::to_string);
    let mut clicks = p.click_ids.clone();
    if let Some(own) = &ev.click_ids {
        // The event's own ids are the freshest.
        let mut merged = own.clone();
        macro_rules! fill { ($($f:ident),*) => { $( if merged.$f.is_none() { merged.$f = clicks.$f.take(); } )* } }
        fill!(fbc, fbp, gclid, gbraid, wbraid, ttclid, ttp);
        clicks = merged;
    }
    out.click_ids = (clicks != Default::default()).then_some(clicks);

    if dest.kind.hashes_only() {
        out.email = None;
        out.phone = None;
        out.traits = None;
        out.metadata = None;
        out.external_ids = p.external_ids.clone();
    } else if !dest.raw_contact {
        out.email = None;
        out.phone = None;
        if let Some(t) = out.traits.as_mut() {
            t.retain(|k, v| !is_contact_trait(k, v));
        }
    }
    out
}

fn is_contact_trait(key: &str, _value: &Value) -> bool {
    matches!(key, "email" | "phone" | "phone_number" | "mobile")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::event::normalize::{parse_country, sha256_hex};
    use crate::event::parse_event;
    use crate::router::identity::{IdentityTable, Profile};

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
            .map(|d| (d.name.clone(), select(d, e)))
            .collect()
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
        // Ad platforms default to deny; GA4 and the hook default to grant; crm is configured deny.
        assert_eq!(
            routes(&c, &missing),
            vec![
                ("crm".into(), missing_("marketing")),
                ("ga4".into(), ok("purchase")),
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
            Ok("custom.webinar_registered".into())
        );
    }

    #[test]
    fn ad_platforms_get_vendor_hashes_and_never_raw_contact_data() {
        let c = config();
        let us = parse_country("US").unwrap();
        let e = ev(
            r#"{"event":"purchase","event_id":"e","occurred_at":"2026-11-20T10:00:00Z","user_id":"u",
                "email":"John.Smith@gmail.com","phone":"650-253-0000","value":1,"currency":"USD",
                "traits":{"email":"John.Smith@gmail.com","plan":"pro"},"metadata":{"session":"s1"},
                "external_ids":{"crm":"C-1"}}"#,
        );
        let mut t = IdentityTable::default();
        t.observe(&e, &Profile::from_event(&e, us));
        let who = t.resolve(&e);

        let meta = shape(&c.destinations["meta"], &e, &who);
        assert_eq!(meta.email_sha256, Some(sha256_hex("john.smith@gmail.com")));
        assert_eq!(meta.phone_sha256, Some(sha256_hex("16502530000")));
        assert_eq!(meta.external_ids["crm"], sha256_hex("C-1"));
        let gads = shape(&c.destinations["gads"], &e, &who);
        assert_eq!(gads.email_sha256, Some(sha256_hex("johnsmith@gmail.com")));
        assert_eq!(gads.phone_sha256, Some(sha256_hex("+16502530000")));
        for d in ["meta", "gads", "ga4"] {
            let out = serde_json::to_string(&shape(&c.destinations[d], &e, &who)).unwrap();
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
        let hook = shape(&c.destinations["hook"], &e, &who);
        assert!(hook.email.is_none() && hook.phone.is_none());
        assert_eq!(
            hook.traits.as_ref().unwrap().get("plan"),
            Some(&Value::from("pro"))
        );
        assert!(hook.traits.as_ref().unwrap().get("email").is_none());
        let crm = shape(&c.destinations["crm"], &e, &who);
        assert_eq!(crm.email.as_deref(), Some("John.Smith@gmail.com"));
    }
}
