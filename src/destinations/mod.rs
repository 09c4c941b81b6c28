//! Vendor destinations, one file each. A vendor's file owns everything about
//! it: its settings and their checks, its policy ([`Spec`]), its event-name
//! presets, and `limits`, `map` and `classify`. This file is the registry
//! that names them all once.

pub mod amplitude;
pub mod customerio;
pub mod ga4;
pub mod google_ads;
pub mod klaviyo;
pub mod meta_capi;
pub mod mixpanel;
pub mod names;
pub mod posthog;
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
    /// `delivery.ordering` when the destination does not set it: whether a
    /// person's later events wait while an earlier one retries (a CRM
    /// applies profile updates in arrival order; an ad platform does not care).
    pub ordering: bool,
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

    /// Silence is no yes to ads, analytics or marketing, nor to receiving a
    /// person's hashed email or phone; a webhook or warehouse has an owner
    /// who chose its category and may choose its default.
    pub fn consent_default(&self) -> ConsentDefault {
        match (self.kind, self.contact) {
            (Kind::AdPlatform | Kind::Analytics | Kind::Crm, _) => ConsentDefault::Deny,
            (_, Contact::HashesOnly | Contact::NoneUnlessConfigured) => ConsentDefault::Deny,
            (Kind::Webhook | Kind::Warehouse, Contact::RawWhenConfigured) => ConsentDefault::Grant,
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

type Parse = fn(toml::Value, &str) -> Result<Vendor, Problem>;

/// The registry: `Variant => module::Implementation` per vendor. Each module
/// has `Settings` (with `check` and `preset_name`), `SPEC` and
/// `Implementation::new(Settings)`; from this one list come [`Vendor`], the
/// type names `parse` knows, and every dispatch below.
macro_rules! registry {
    ($($variant:ident => $module:ident :: $implementation:ident),* $(,)?) => {
        /// A configured vendor: which one, with its settings.
        #[derive(Debug, Clone)]
        pub enum Vendor {
            $($variant($module::Settings),)*
        }

        /// Every vendor, once: its spec and how its settings are read.
        const VENDORS: &[(&Spec, Parse)] = &[
            $((&$module::SPEC, |v, key| deserialize_at(v, key).map(Vendor::$variant)),)*
        ];

        impl Vendor {
            pub fn spec(&self) -> &'static Spec {
                match self {
                    $(Vendor::$variant(_) => &$module::SPEC,)*
                }
            }

            /// What types cannot say about the settings; problems are named under `key`.
            pub fn check(&self, key: &str, problems: &mut Vec<Problem>) {
                match self {
                    $(Vendor::$variant(s) => s.check(key, problems),)*
                }
            }

            /// The vendor's name for `event` (docs/destinations/); `None` = not sent.
            pub fn preset_name<'a>(&self, event: &'a EventName) -> Option<&'a str> {
                match self {
                    $(Vendor::$variant(s) => s.preset_name(event),)*
                }
            }

            /// The destination implementation for these settings.
            pub fn build(&self) -> Arc<dyn Destination> {
                match self {
                    $(Vendor::$variant(s) => Arc::new($module::$implementation::new(s.clone())),)*
                }
            }
        }
    };
}

registry! {
    Webhook => webhook::Webhook,
    MetaCapi => meta_capi::MetaCapi,
    TiktokEvents => tiktok_events::TiktokEvents,
    GoogleAds => google_ads::GoogleAds,
    Ga4 => ga4::Ga4,
    Mixpanel => mixpanel::Mixpanel,
    Posthog => posthog::Posthog,
    Amplitude => amplitude::Amplitude,
    Customerio => customerio::Customerio,
    Klaviyo => klaviyo::Klaviyo,
}

impl Vendor {
    /// The vendor setting whose value sends raw contact data, when it does:
    /// without `raw_contact = true` that is a config error naming it.
    pub fn needs_raw_contact(&self) -> Option<&'static str> {
        match self {
            Vendor::Customerio(s) => s.needs_raw_contact(),
            _ => None,
        }
    }

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
                "expected one of webhook, meta_capi, tiktok_events, google_ads, ga4, mixpanel, posthog, amplitude, customerio, klaviyo"
            ),
            "{}",
            p.message
        );
    }
}
