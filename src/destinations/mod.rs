//! Vendor destinations, one file each. A vendor's file owns everything about
//! it: its settings and their checks, its policy ([`Spec`]), its event-name
//! presets, and `limits`, `map` and `classify`. This file is the registry
//! that names them all once.

pub mod ga4;
pub mod google_ads;
pub mod meta_capi;
pub mod mixpanel;
mod shared;
#[cfg(test)]
pub(crate) mod test_support;
pub mod tiktok_events;
pub mod webhook;

use std::sync::Arc;

use crate::event::EventName;
use crate::event::normalize::{EmailRule, PhoneFormat};
use crate::settings::{ConsentDefault, Problem, deserialize_at};
use crate::sink::destination::Destination;

/// What a destination is. Its consent policy follows from this by an
/// exhaustive match, so a new kind cannot be added without deciding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    AdPlatform,
    Analytics,
    Crm,
    Webhook,
    Warehouse,
}

/// What a destination may receive of a person's email and phone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contact {
    /// SHA-256 hashes only, never the raw values, whatever the config says.
    HashesOnly,
    /// Hashes, and the raw values when the destination sets `raw_contact = true`.
    RawWhenConfigured,
    /// Nothing of them by default (the vendor has no use for hashes), the
    /// raw values when the destination sets `raw_contact = true`. The vendor
    /// keeps a profile of the person, so it needs their yes.
    NoneUnlessConfigured,
}

/// A vendor's policy, stated in its own file as `pub const SPEC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// The `type` a destination names the vendor by.
    pub type_name: &'static str,
    pub kind: Kind,
    pub contact: Contact,
    /// How the vendor wants an email normalised before it is hashed.
    pub email: EmailRule,
    /// How the vendor wants a phone number written before it is hashed.
    pub phone: PhoneFormat,
}

impl Spec {
    /// The consent category a destination needs when its config names none;
    /// `None` = the config must name it.
    pub fn default_consent(&self) -> Option<&'static str> {
        match self.kind {
            Kind::AdPlatform => Some("ads"),
            Kind::Analytics => Some("analytics"),
            Kind::Crm => Some("marketing"),
            // These can carry anything; their owner must say which consent they need.
            Kind::Webhook | Kind::Warehouse => None,
        }
    }

    /// Whoever receives a person's hashed email or phone needs their yes,
    /// not their silence; a destination that may get raw contact data has
    /// an owner who chose its category and may choose its default.
    pub fn consent_default(&self) -> ConsentDefault {
        match self.contact {
            Contact::HashesOnly | Contact::NoneUnlessConfigured => ConsentDefault::Deny,
            Contact::RawWhenConfigured => ConsentDefault::Grant,
        }
    }

    /// Must never see raw contact data, only SHA-256 hashes.
    pub fn hashes_only(&self) -> bool {
        match self.contact {
            Contact::HashesOnly => true,
            Contact::RawWhenConfigured | Contact::NoneUnlessConfigured => false,
        }
    }
}

/// A configured vendor: which one, with its settings.
#[derive(Debug, Clone)]
pub enum Vendor {
    Webhook(webhook::Settings),
    MetaCapi(meta_capi::Settings),
    TiktokEvents(tiktok_events::Settings),
    GoogleAds(google_ads::Settings),
    Ga4(ga4::Settings),
    Mixpanel(mixpanel::Settings),
}

type Parse = fn(toml::Value, &str) -> Result<Vendor, Problem>;

/// Every vendor, once: its spec and how its settings are read.
const VENDORS: &[(&Spec, Parse)] = &[
    (&webhook::SPEC, |v, key| {
        deserialize_at(v, key).map(Vendor::Webhook)
    }),
    (&meta_capi::SPEC, |v, key| {
        deserialize_at(v, key).map(Vendor::MetaCapi)
    }),
    (&tiktok_events::SPEC, |v, key| {
        deserialize_at(v, key).map(Vendor::TiktokEvents)
    }),
    (&google_ads::SPEC, |v, key| {
        deserialize_at(v, key).map(Vendor::GoogleAds)
    }),
    (&ga4::SPEC, |v, key| deserialize_at(v, key).map(Vendor::Ga4)),
    (&mixpanel::SPEC, |v, key| {
        deserialize_at(v, key).map(Vendor::Mixpanel)
    }),
];

impl Vendor {
    /// Reads the vendor-specific keys of destination `key` (every key but
    /// the common ones) as the settings of vendor `type_name`.
    pub fn parse(type_name: &str, settings: toml::Value, key: &str) -> Result<Vendor, Problem> {
        let Some((_, parse)) = VENDORS.iter().find(|(s, _)| s.type_name == type_name) else {
            return Err(Problem {
                key: format!("{key}.type"),
                message: format!(
                    "unknown destination type `{type_name}`; expected one of {}",
                    VENDORS
                        .iter()
                        .map(|(s, _)| s.type_name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        };
        parse(settings, key)
    }

    pub fn spec(&self) -> &'static Spec {
        match self {
            Vendor::Webhook(_) => &webhook::SPEC,
            Vendor::MetaCapi(_) => &meta_capi::SPEC,
            Vendor::TiktokEvents(_) => &tiktok_events::SPEC,
            Vendor::GoogleAds(_) => &google_ads::SPEC,
            Vendor::Ga4(_) => &ga4::SPEC,
            Vendor::Mixpanel(_) => &mixpanel::SPEC,
        }
    }

    /// What types cannot say about the settings; problems are named under `key`.
    pub fn check(&self, key: &str, problems: &mut Vec<Problem>) {
        match self {
            Vendor::Webhook(s) => s.check(key, problems),
            Vendor::MetaCapi(s) => s.check(key, problems),
            Vendor::TiktokEvents(s) => s.check(key, problems),
            Vendor::GoogleAds(s) => s.check(key, problems),
            Vendor::Ga4(s) => s.check(key, problems),
            Vendor::Mixpanel(s) => s.check(key, problems),
        }
    }

    /// The vendor's name for `event` (docs/destinations/); `None` = not sent.
    pub fn preset_name<'a>(&self, event: &'a EventName) -> Option<&'a str> {
        match self {
            Vendor::Webhook(s) => s.preset_name(event),
            Vendor::MetaCapi(s) => s.preset_name(event),
            Vendor::TiktokEvents(s) => s.preset_name(event),
            Vendor::GoogleAds(s) => s.preset_name(event),
            Vendor::Ga4(s) => s.preset_name(event),
            Vendor::Mixpanel(s) => s.preset_name(event),
        }
    }

    /// The destination implementation for these settings.
    pub fn build(&self) -> Arc<dyn Destination> {
        match self {
            Vendor::Webhook(s) => Arc::new(webhook::Webhook::new(s.clone())),
            Vendor::MetaCapi(s) => Arc::new(meta_capi::MetaCapi::new(s.clone())),
            Vendor::TiktokEvents(s) => Arc::new(tiktok_events::TiktokEvents::new(s.clone())),
            Vendor::GoogleAds(s) => Arc::new(google_ads::GoogleAds::new(s.clone())),
            Vendor::Ga4(s) => Arc::new(ga4::Ga4::new(s.clone())),
            Vendor::Mixpanel(s) => Arc::new(mixpanel::Mixpanel::new(s.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_type_name_is_listed_once() {
        let mut names: Vec<&str> = VENDORS.iter().map(|(s, _)| s.type_name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), VENDORS.len());
    }

    #[test]
    fn ad_platforms_and_ga4_get_hashes_only_and_need_a_yes() {
        for (spec, _) in VENDORS {
            if spec.kind == Kind::AdPlatform || spec.type_name == "ga4" {
                assert_eq!(spec.contact, Contact::HashesOnly, "{}", spec.type_name);
                assert_eq!(spec.consent_default(), ConsentDefault::Deny);
            }
        }
    }

    #[test]
    fn an_unknown_type_lists_every_known_one() {
        let p = Vendor::parse(
            "fax",
            toml::Value::Table(toml::Table::new()),
            "destinations.x",
        )
        .unwrap_err();
        assert_eq!(p.key, "destinations.x.type");
        assert!(
            p.message.ends_with(
                "expected one of webhook, meta_capi, tiktok_events, google_ads, ga4, mixpanel"
            ),
            "{}",
            p.message
        );
    }
}
