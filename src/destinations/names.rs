//! The two starting name mappings product-analytics and CRM users know,
//! chosen per destination with `preset = "retail" | "saas"` (default
//! `retail`). `event_names` in the config still overrides any one name, and
//! custom events (`custom.*`) keep their own name without the prefix.
//!
//! `retail` follows Segment's e-commerce spec ("Product Viewed", "Order
//! Completed"…), which Mixpanel, PostHog, Amplitude and Customer.io users
//! meet in their vendors' templates. `saas` names the subscription journey
//! the way Segment's B2B SaaS spec does ("Signed Up", "Trial Started") and
//! gives the shop events names that read right for a product with plans
//! rather than a cart.

use serde::Deserialize;

use crate::event::EventName;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NamePreset {
    #[default]
    Retail,
    Saas,
}

impl NamePreset {
    /// The event's name under this preset. `identify` is not an event to
    /// these vendors: each vendor names (or does not send) it itself.
    pub fn name(self, event: &EventName) -> Option<&str> {
        use EventName::*;
        let retail = self == NamePreset::Retail;
        Some(match event {
            ViewContent if retail => "Product Viewed",
            ViewContent => "Content Viewed",
            AddToCart if retail => "Product Added",
            AddToCart => "Plan Selected",
            BeginCheckout => "Checkout Started",
            Purchase if retail => "Order Completed",
            Purchase => "Payment Completed",
            Refund if retail => "Order Refunded",
            Refund => "Payment Refunded",
            Search if retail => "Products Searched",
            Search => "Searched",
            SignUp => "Signed Up",
            StartTrial => "Trial Started",
            Lead if retail => "Lead Submitted",
            Lead => "Demo Requested",
            Subscribe => "Subscription Started",
            Renewal => "Subscription Renewed",
            Identify => return None,
            Custom(name) => name.strip_prefix("custom.").unwrap_or(name),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_presets_name_every_canonical_event_and_pass_custom_events_through() {
        for preset in [NamePreset::Retail, NamePreset::Saas] {
            for e in [
                "view_content",
                "add_to_cart",
                "begin_checkout",
                "purchase",
                "refund",
                "search",
                "sign_up",
                "start_trial",
                "lead",
                "subscribe",
                "renewal",
            ] {
                let event = EventName::parse(e).unwrap();
                let name = preset.name(&event);
                assert!(name.is_some_and(|n| !n.is_empty()), "{preset:?} {e}");
            }
            let custom = EventName::parse("custom.webinar_registered").unwrap();
            assert_eq!(preset.name(&custom), Some("webinar_registered"));
            assert_eq!(preset.name(&EventName::Identify), None);
        }
        assert_eq!(
            NamePreset::Retail.name(&EventName::Purchase),
            Some("Order Completed")
        );
        assert_eq!(
            NamePreset::Saas.name(&EventName::Purchase),
            Some("Payment Completed")
        );
    }
}
