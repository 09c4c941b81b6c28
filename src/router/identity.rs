//! The global identity table: what is known about each person, keyed by
//! user_id and by anonymous_id, mirrored to the compacted identity topic and
//! tailed by every router instance.
//!
//! Raw contact data is normalised and hashed once, here, into every variant a
//! vendor asks for; the table and its topic hold hashes, never raw email or
//! phone numbers.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::normalize::{PhoneCountry, PhoneFormat, hash_email, hash_identifier, hash_phone};
use crate::event::{CanonicalEvent, ClickIds};

/// Hashed identifiers of one person (or one anonymous visitor).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// For an anonymous visitor: the user they were identified as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// SHA-256 of the trimmed, lowercased email (Meta, TikTok, webhooks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_sha256: Option<String>,
    /// SHA-256 under Google's gmail dot rule; absent when equal to `email_sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_sha256_google: Option<String>,
    /// SHA-256 of the E.164 number with '+' (Google, TikTok).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone_sha256_e164: Option<String>,
    /// SHA-256 of the E.164 digits without '+' (Meta).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone_sha256_digits: Option<String>,
    /// External ids, hashed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub external_ids: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "is_empty_click_ids")]
    pub click_ids: ClickIds,
}

fn is_empty_click_ids(c: &ClickIds) -> bool {
    *c == ClickIds::default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmailRule {
    Plain,
    /// Google's: dots dropped from gmail.com/googlemail.com local parts.
    Google,
}

impl Profile {
    /// The identity hints an event carries, hashed in every variant.
    pub fn from_event(ev: &CanonicalEvent, country: PhoneCountry) -> Profile {
        let trait_str = |k: &str| {
            ev.traits
                .as_ref()
                .and_then(|t| t.get(k))
                .and_then(Value::as_str)
        };
        let mut p = Profile::default();
        if let Some(raw) = ev.email.as_deref().or_else(|| trait_str("email")) {
            p.email_sha256 = hash_email(raw, false);
            let google = hash_email(raw, true);
            if google != p.email_sha256 {
                p.email_sha256_google = google;
            }
        }
        if p.email_sha256.is_none() {
            p.email_sha256 = ev.email_sha256.clone();
        }
        if let Some(raw) = ev.phone.as_deref().or_else(|| trait_str("phone")) {
            p.phone_sha256_e164 = hash_phone(raw, country, PhoneFormat::E164);
            p.phone_sha256_digits = hash_phone(raw, country, PhoneFormat::DigitsOnly);
        }
        if p.phone_sha256_e164.is_none()
            && let Some(h) = &ev.phone_sha256
        {
            // A publisher's digest: we cannot know which format it hashed, so
            // every vendor gets it as given.
            p.phone_sha256_e164 = Some(h.clone());
            p.phone_sha256_digits = Some(h.clone());
        }
        for (k, v) in &ev.external_ids {
            if let Some(h) = hash_identifier(v) {
                p.external_ids.insert(k.clone(), h);
            }
        }
        if let Some(c) = &ev.click_ids {
            p.click_ids = c.clone();
        }
        p
    }

    /// Overlays `newer` (its known fields win); true when anything changed.
    pub fn merge(&mut self, newer: &Profile) -> bool {
        let before = self.clone();
        fn take(slot: &mut Option<String>, v: &Option<String>) {
            if v.is_some() {
                slot.clone_from(v);
            }
        }
        take(&mut self.user_id, &newer.user_id);
        if newer.email_sha256.is_some() {
            // The google variant belongs to the email it came with.
            self.email_sha256.clone_from(&newer.email_sha256);
            self.email_sha256_google
                .clone_from(&newer.email_sha256_google);
        }
        take(&mut self.phone_sha256_e164, &newer.phone_sha256_e164);
        take(&mut self.phone_sha256_digits, &newer.phone_sha256_digits);
        for (k, v) in &newer.external_ids {
            self.external_ids.insert(k.clone(), v.clone());
        }
        let (c, n) = (&mut self.click_ids, &newer.click_ids);
        take(&mut c.fbc, &n.fbc);
        take(&mut c.fbp, &n.fbp);
        take(&mut c.gclid, &n.gclid);
        take(&mut c.gbraid, &n.gbraid);
        take(&mut c.wbraid, &n.wbraid);
        take(&mut c.ttclid, &n.ttclid);
        take(&mut c.ttp, &n.ttp);
        *self != before
    }

    pub fn email_hash(&self, rule: EmailRule) -> Option<&str> {
        match rule {
            EmailRule::Google => self
                .email_sha256_google
                .as_deref()
                .or(self.email_sha256.as_deref()),
            EmailRule::Plain => self.email_sha256.as_deref(),
        }
    }

    pub fn phone_hash(&self, format: PhoneFormat) -> Option<&str> {
        match format {
            PhoneFormat::E164 => self.phone_sha256_e164.as_deref(),
            PhoneFormat::DigitsOnly => self.phone_sha256_digits.as_deref(),
        }
    }
}

/// What the table knows about the person behind one event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resolved {
    pub user_id: Option<String>,
    pub profile: Profile,
}

#[derive(Debug, Default)]
pub struct IdentityTable {
    users: HashMap<String, Profile>,
    anons: HashMap<String, Profile>,
}

const USER: &str = "u:";
const ANON: &str = "a:";

impl IdentityTable {
    pub fn len(&self) -> usize {
        self.users.len() + self.anons.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies one record of the identity topic (ours or another instance's).
    pub fn apply(&mut self, key: &str, profile: &Profile) {
        if let Some(id) = key.strip_prefix(USER) {
            self.users.entry(id.to_string()).or_default().merge(profile);
        } else if let Some(id) = key.strip_prefix(ANON) {
            self.anons.entry(id.to_string()).or_default().merge(profile);
        }
    }

    /// Learns from an event's ids and hints; returns the table entries that
    /// changed, as (topic key, full profile) to write to the identity topic.
    pub fn observe(&mut self, ev: &CanonicalEvent, hints: &Profile) -> Vec<(String, Profile)> {
        let mut writes = Vec::new();
        let linked_user = ev.user_id.clone().or_else(|| {
            ev.anonymous_id
                .as_ref()
                .and_then(|a| self.anons.get(a))
                .and_then(|p| p.user_id.clone())
        });
        match (&linked_user, &ev.anonymous_id) {
            (Some(uid), anon) => {
                let mut update = hints.clone();
                if let Some(aid) = anon {
                    let a = self.anons.entry(aid.clone()).or_default();
                    if a.user_id.as_ref() != Some(uid) {
                        a.user_id = Some(uid.clone());
                        writes.push((format!("{ANON}{aid}"), a.clone()));
                    }
                    // Stitch: what was learnt while anonymous now belongs to the user,
                    // under this event's own hints.
                    let mut stitched = a.clone();
                    stitched.user_id = None;
                    stitched.merge(hints);
                    update = stitched;
                }
                let u = self.users.entry(uid.clone()).or_default();
                if u.merge(&update) {
                    writes.push((format!("{USER}{uid}"), u.clone()));
                }
            }
            (None, Some(aid)) => {
                let a = self.anons.entry(aid.clone()).or_default();
                if a.merge(hints) {
                    writes.push((format!("{ANON}{aid}"), a.clone()));
                }
            }
            (None, None) => {}
        }
        writes
    }

    /// The strongest identifiers known for the person behind `ev`.
    pub fn resolve(&self, ev: &CanonicalEvent) -> Resolved {
        let anon = ev.anonymous_id.as_ref().and_then(|a| self.anons.get(a));
        let user_id = ev
            .user_id
            .clone()
            .or_else(|| anon.and_then(|a| a.user_id.clone()));
        let mut profile = anon.cloned().unwrap_or_default();
        profile.user_id = None;
        if let Some(u) = user_id.as_ref().and_then(|u| self.users.get(u)) {
            profile.merge(u);
        }
        Resolved { user_id, profile }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::normalize::{parse_country, sha256_hex};
    use crate::event::parse_event;

    fn ev(json: &str) -> CanonicalEvent {
        parse_event(json.as_bytes()).unwrap()
    }

    fn us() -> PhoneCountry {
        parse_country("US").unwrap()
    }

    #[test]
    fn hints_are_hashed_in_every_vendor_variant() {
        let e = ev(
            r#"{"event":"sign_up","event_id":"e1","occurred_at":"2026-11-20T10:00:00Z","user_id":"u1",
                "email":"John.Smith@Gmail.com","phone":"(650) 253-0000","external_ids":{"crm":"C-9"}}"#,
        );
        let p = Profile::from_event(&e, us());
        assert_eq!(
            p.email_sha256.as_deref(),
            Some(sha256_hex("john.smith@gmail.com").as_str())
        );
        assert_eq!(
            p.email_hash(EmailRule::Google),
            Some(sha256_hex("johnsmith@gmail.com").as_str())
        );
        assert_eq!(
            p.phone_hash(PhoneFormat::E164),
            Some(sha256_hex("+16502530000").as_str())
        );
        assert_eq!(
            p.phone_hash(PhoneFormat::DigitsOnly),
            Some(sha256_hex("16502530000").as_str())
        );
        assert_eq!(p.external_ids["crm"], sha256_hex("C-9"));
        let json = serde_json::to_string(&p).unwrap();
        assert!(
            !json.contains("Gmail") && !json.contains("253"),
            "raw PII in {json}"
        );
    }

    #[test]
    fn anonymous_history_is_stitched_to_the_user_and_seen_by_later_events() {
        let mut t = IdentityTable::default();
        let browse = ev(
            r#"{"event":"view_content","event_id":"e1","occurred_at":"2026-11-20T10:00:00Z","anonymous_id":"anon-1",
                "click_ids":{"fbc":"fb.1.1.abc","gclid":"G1"}}"#,
        );
        let w = t.observe(&browse, &Profile::from_event(&browse, us()));
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].0, "a:anon-1");

        let signup = ev(
            r#"{"event":"identify","event_id":"e2","occurred_at":"2026-11-20T10:05:00Z","anonymous_id":"anon-1",
                "user_id":"u-1","traits":{"email":"jane@example.com"}}"#,
        );
        let w = t.observe(&signup, &Profile::from_event(&signup, us()));
        let keys: Vec<&str> = w.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, vec!["a:anon-1", "u:u-1"]);

        // A later anonymous-only server event of the same visitor.
        let later = ev(
            r#"{"event":"purchase","event_id":"e3","occurred_at":"2026-11-20T11:00:00Z","anonymous_id":"anon-1",
                "value":10,"currency":"USD"}"#,
        );
        let r = t.resolve(&later);
        assert_eq!(r.user_id.as_deref(), Some("u-1"));
        assert_eq!(
            r.profile.email_sha256.as_deref(),
            Some(sha256_hex("jane@example.com").as_str())
        );
        assert_eq!(r.profile.click_ids.fbc.as_deref(), Some("fb.1.1.abc"));
    }

    #[test]
    fn another_instance_learns_the_same_through_the_topic_records() {
        let mut a = IdentityTable::default();
        let mut b = IdentityTable::default();
        let signup = ev(
            r#"{"event":"identify","event_id":"e2","occurred_at":"2026-11-20T10:05:00Z","anonymous_id":"anon-2",
                "user_id":"u-2","phone":"+44 20 7946 0958"}"#,
        );
        for (k, p) in a.observe(&signup, &Profile::from_event(&signup, us())) {
            let wire: Profile = serde_json::from_slice(&serde_json::to_vec(&p).unwrap()).unwrap();
            b.apply(&k, &wire);
        }
        let later = ev(
            r#"{"event":"lead","event_id":"e9","occurred_at":"2026-11-20T12:00:00Z","anonymous_id":"anon-2"}"#,
        );
        assert_eq!(a.resolve(&later), b.resolve(&later));
        assert_eq!(b.resolve(&later).user_id.as_deref(), Some("u-2"));
    }

    #[test]
    fn unchanged_hints_write_nothing() {
        let mut t = IdentityTable::default();
        let e = ev(
            r#"{"event":"lead","event_id":"e1","occurred_at":"2026-11-20T10:00:00Z","user_id":"u1","email":"a@b.co"}"#,
        );
        let h = Profile::from_event(&e, us());
        assert_eq!(t.observe(&e, &h).len(), 1);
        assert!(t.observe(&e, &h).is_empty());
    }
}
