//! The global identity table: what is known about each person, keyed by
//! user_id and by anonymous_id, mirrored to the compacted identity topic and
//! tailed by every router instance.
//!
//! Raw contact data is normalised and hashed once, here, into every variant a
//! vendor asks for; the table and its topic hold hashes, never raw email or
//! phone numbers.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use hashbrown::HashMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use xxhash_rust::xxh3::xxh3_128;

use crate::event::normalize::{
    PhoneCountry, PhoneFormat, hash_email_variants, hash_identifier, hash_phone_variants,
};
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
    /// When the newest event this was learnt from occurred (unix seconds).
    /// What an older event says (a partition read late, a replayed backfill)
    /// only fills gaps: it never replaces what a newer one taught.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub as_of: i64,
}

fn is_zero(t: &i64) -> bool {
    *t == 0
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

/// Hashes phone numbers in both vendor formats and remembers recent ones.
/// Reading a number against the numbering plan costs about 15 µs, far more
/// than everything else the router does with an event, and the same person's
/// number comes back with each of their events. Entries are keyed by a
/// 128-bit hash of the raw number, so the cache holds no raw phone numbers.
pub struct PhoneHasher {
    country: PhoneCountry,
    recent: quick_cache::unsync::Cache<u128, Option<(String, String)>>,
}

/// Numbers remembered: about 3 MB.
const RECENT_PHONES: usize = 16_384;

impl PhoneHasher {
    pub fn new(country: PhoneCountry) -> PhoneHasher {
        PhoneHasher {
            country,
            recent: quick_cache::unsync::Cache::new(RECENT_PHONES),
        }
    }

    /// (E.164 hash, digits-only hash), or `None` for a number that cannot exist.
    pub fn hash(&mut self, raw: &str) -> Option<(String, String)> {
        let key = xxh3_128(raw.trim().as_bytes());
        if let Some(known) = self.recent.get(&key) {
            return known.clone();
        }
        let hashed = hash_phone_variants(raw, self.country);
        self.recent.insert(key, hashed.clone());
        hashed
    }
}

impl fmt::Debug for PhoneHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PhoneHasher")
            .field("country", &self.country)
            .field("remembered", &self.recent.len())
            .finish()
    }
}

/// Sets `slot` to `v` when `v` is known and different (and, for an `older`
/// fact, only when `slot` is empty); true if it changed.
fn take(slot: &mut Option<String>, v: &Option<String>, older: bool) -> bool {
    match v {
        Some(x) if slot.as_ref() != Some(x) && !(older && slot.is_some()) => {
            slot.clone_from(v);
            true
        }
        _ => false,
    }
}

impl Profile {
    /// The identity hints an event carries, hashed in every variant.
    pub fn from_event(ev: &CanonicalEvent, phones: &mut PhoneHasher) -> Profile {
        let trait_str = |k: &str| {
            ev.traits
                .as_ref()
                .and_then(|t| t.get(k))
                .and_then(Value::as_str)
        };
        let mut p = Profile {
            as_of: ev.occurred_at.timestamp(),
            ..Profile::default()
        };
        if let Some((plain, google)) = ev
            .email
            .as_deref()
            .or_else(|| trait_str("email"))
            .and_then(hash_email_variants)
        {
            p.email_sha256 = Some(plain);
            p.email_sha256_google = google;
        }
        if p.email_sha256.is_none() {
            p.email_sha256 = ev.email_sha256.clone();
        }
        if let Some((e164, digits)) = ev
            .phone
            .as_deref()
            .or_else(|| trait_str("phone"))
            .and_then(|raw| phones.hash(raw))
        {
            p.phone_sha256_e164 = Some(e164);
            p.phone_sha256_digits = Some(digits);
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
        take(&mut self.user_id, &newer.user_id, newer.as_of < self.as_of) | self.overlay(newer)
    }

    /// `merge` without the user link: what a person's events say about them.
    /// A newer `as_of` alone is not a change: writing the profile for it
    /// would rewrite every returning person's record at every event.
    fn overlay(&mut self, newer: &Profile) -> bool {
        let older = newer.as_of < self.as_of;
        self.as_of = self.as_of.max(newer.as_of);
        let mut changed = false;
        if newer.email_sha256.is_some() && !(older && self.email_sha256.is_some()) {
            // The google variant belongs to the email it came with.
            changed |= take(&mut self.email_sha256, &newer.email_sha256, older);
            if self.email_sha256_google != newer.email_sha256_google {
                self.email_sha256_google
                    .clone_from(&newer.email_sha256_google);
                changed = true;
            }
        }
        changed |= take(&mut self.phone_sha256_e164, &newer.phone_sha256_e164, older);
        changed |= take(
            &mut self.phone_sha256_digits,
            &newer.phone_sha256_digits,
            older,
        );
        for (k, v) in &newer.external_ids {
            let known = self.external_ids.get(k);
            if known != Some(v) && !(older && known.is_some()) {
                self.external_ids.insert(k.clone(), v.clone());
                changed = true;
            }
        }
        let (c, n) = (&mut self.click_ids, &newer.click_ids);
        changed |= take(&mut c.fbc, &n.fbc, older);
        changed |= take(&mut c.fbp, &n.fbp, older);
        changed |= take(&mut c.gclid, &n.gclid, older);
        changed |= take(&mut c.gbraid, &n.gbraid, older);
        changed |= take(&mut c.wbraid, &n.wbraid, older);
        changed |= take(&mut c.ttclid, &n.ttclid, older);
        changed |= take(&mut c.ttp, &n.ttp, older);
        changed
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

/// What the table knows about the person behind one event: the user's
/// profile overlaid on the anonymous visitor's, read in place.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Resolved<'a> {
    pub user_id: Option<&'a str>,
    user: Option<&'a Profile>,
    anon: Option<&'a Profile>,
}

impl<'a> Resolved<'a> {
    pub fn email_hash(&self, rule: EmailRule) -> Option<&'a str> {
        // The email and its google variant come as a pair, from one profile.
        self.user
            .filter(|u| u.email_sha256.is_some())
            .or(self.anon)?
            .email_hash(rule)
    }

    pub fn phone_hash(&self, format: PhoneFormat) -> Option<&'a str> {
        self.user
            .and_then(|u| u.phone_hash(format))
            .or_else(|| self.anon?.phone_hash(format))
    }

    /// One click id: the user's, else the anonymous visitor's.
    pub fn click_id(&self, field: fn(&ClickIds) -> &Option<String>) -> Option<&'a str> {
        let of = |p: Option<&'a Profile>| p.and_then(|p| field(&p.click_ids).as_deref());
        of(self.user).or_else(|| of(self.anon))
    }

    /// Hashed external ids, the user's over the anonymous visitor's.
    pub fn external_ids(&self) -> Cow<'a, BTreeMap<String, String>> {
        match (self.user, self.anon) {
            (Some(u), Some(a)) if !a.external_ids.is_empty() => {
                if u.external_ids.is_empty() {
                    return Cow::Borrowed(&a.external_ids);
                }
                let mut all = a.external_ids.clone();
                all.extend(u.external_ids.iter().map(|(k, v)| (k.clone(), v.clone())));
                Cow::Owned(all)
            }
            (Some(p), _) | (None, Some(p)) => Cow::Borrowed(&p.external_ids),
            (None, None) => Cow::Owned(BTreeMap::new()),
        }
    }
}

/// The identity topic's key of one table entry: `u:<user_id>` or `a:<anonymous_id>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdKey<'a> {
    pub prefix: &'static str,
    pub id: &'a str,
}

impl fmt::Display for IdKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.prefix, self.id)
    }
}

/// Profiles are boxed: a table of millions grows by rehashing, and moving
/// 32-byte slots instead of 300-byte profiles made growth cheap.
#[derive(Debug, Default)]
pub struct IdentityTable {
    users: HashMap<String, Box<Profile>>,
    anons: HashMap<String, Box<Profile>>,
}

const USER: &str = "u:";
const ANON: &str = "a:";

/// The entry for `id`, created empty if new; allocates only then.
fn entry<'m>(map: &'m mut HashMap<String, Box<Profile>>, id: &str) -> &'m mut Profile {
    map.entry_ref(id).or_default()
}

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
            entry(&mut self.users, id).merge(profile);
        } else if let Some(id) = key.strip_prefix(ANON) {
            entry(&mut self.anons, id).merge(profile);
        }
    }

    /// Learns from an event's ids and hints; hands every entry that changed
    /// to `write`, as (topic key, full profile), for the identity topic; and
    /// returns the strongest identifiers now known for the person. One lookup
    /// per table: the entries it learns into are the ones it resolves from.
    pub fn observe<'a>(
        &'a mut self,
        ev: &'a CanonicalEvent,
        hints: &Profile,
        mut write: impl FnMut(IdKey<'_>, &Profile),
    ) -> Resolved<'a> {
        let IdentityTable { users, anons } = self;
        let aid = ev.anonymous_id.as_deref();
        let mut anon: Option<&'a mut Profile> = aid.map(|aid| entry(anons, aid));
        let linked_user: Option<Cow<'a, str>> = match &ev.user_id {
            Some(u) => Some(Cow::Borrowed(u)),
            None => anon
                .as_ref()
                .and_then(|a| a.user_id.clone())
                .map(Cow::Owned),
        };
        let Some(uid) = linked_user else {
            if let (Some(a), Some(aid)) = (anon.as_deref_mut(), aid)
                && a.overlay(hints)
            {
                write(
                    IdKey {
                        prefix: ANON,
                        id: aid,
                    },
                    a,
                );
            }
            return Resolved {
                user_id: None,
                user: None,
                anon: anon.map(|a| &*a),
            };
        };
        let user = entry(users, &uid);
        let mut changed = false;
        // A device that changed hands links to its newest user; an older
        // event does not take it back.
        if let (Some(a), Some(aid)) = (anon.as_deref_mut(), aid)
            && a.user_id.as_deref() != Some(&*uid)
            && (a.user_id.is_none() || hints.as_of >= a.as_of)
        {
            a.user_id = Some(uid.to_string());
            a.as_of = a.as_of.max(hints.as_of);
            write(
                IdKey {
                    prefix: ANON,
                    id: aid,
                },
                a,
            );
            // Stitch, once, when the link is made: what was learnt while
            // anonymous now belongs to the user. Not at every later event:
            // the anonymous profile stops learning once linked, so its
            // old email or click would undo what the user's own events
            // taught since (and rewrite the profile for nothing).
            changed |= user.overlay(a);
        }
        changed |= user.overlay(hints);
        if changed {
            write(
                IdKey {
                    prefix: USER,
                    id: &uid,
                },
                user,
            );
        }
        let anon = anon.map(|a| &*a);
        Resolved {
            user_id: ev
                .user_id
                .as_deref()
                .or_else(|| anon.and_then(|a| a.user_id.as_deref())),
            user: Some(user),
            anon,
        }
    }

    /// The strongest identifiers known for the person behind `ev`, without
    /// learning from it.
    #[cfg(test)]
    pub fn resolve<'a>(&'a self, ev: &'a CanonicalEvent) -> Resolved<'a> {
        let anon = ev
            .anonymous_id
            .as_ref()
            .and_then(|a| self.anons.get(a))
            .map(|p| &**p);
        let user_id = ev
            .user_id
            .as_deref()
            .or_else(|| anon.and_then(|a| a.user_id.as_deref()));
        Resolved {
            user_id,
            user: user_id.and_then(|u| self.users.get(u)).map(|p| &**p),
            anon,
        }
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

    fn us() -> PhoneHasher {
        PhoneHasher::new(parse_country("US").unwrap())
    }

    /// The writes `observe` hands out, as (key, profile).
    fn observe(t: &mut IdentityTable, e: &CanonicalEvent) -> Vec<(String, Profile)> {
        let mut w = Vec::new();
        t.observe(e, &Profile::from_event(e, &mut us()), |k, p| {
            w.push((k.to_string(), p.clone()))
        });
        w
    }

    #[test]
    fn remembered_phone_numbers_hash_as_fresh_ones_do() {
        let mut phones = us();
        for raw in [
            "(650) 253-0000",
            " (650) 253-0000 ",
            "+44 20 7946 0958",
            "12345678",
        ] {
            let fresh = hash_phone_variants(raw, parse_country("US").unwrap());
            assert_eq!(phones.hash(raw), fresh, "{raw}");
            assert_eq!(phones.hash(raw), fresh, "{raw}, remembered");
        }
        assert_eq!(phones.hash("12345678"), None);
        assert_eq!(phones.recent.len(), 3, "trimmed forms share an entry");
    }

    #[test]
    fn hints_are_hashed_in_every_vendor_variant() {
        let e = ev(
            r#"{"event":"sign_up","event_id":"e1","occurred_at":"2026-11-20T10:00:00Z","user_id":"u1",
                "email":"John.Smith@Gmail.com","phone":"(650) 253-0000","external_ids":{"crm":"C-9"}}"#,
        );
        let p = Profile::from_event(&e, &mut us());
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
        let w = observe(&mut t, &browse);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].0, "a:anon-1");

        let signup = ev(
            r#"{"event":"identify","event_id":"e2","occurred_at":"2026-11-20T10:05:00Z","anonymous_id":"anon-1",
                "user_id":"u-1","traits":{"email":"jane@example.com"}}"#,
        );
        let w = observe(&mut t, &signup);
        let keys: Vec<&str> = w.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, vec!["a:anon-1", "u:u-1"]);

        // A later anonymous-only server event of the same visitor.
        let later = ev(
            r#"{"event":"purchase","event_id":"e3","occurred_at":"2026-11-20T11:00:00Z","anonymous_id":"anon-1",
                "value":10,"currency":"USD"}"#,
        );
        let r = t.resolve(&later);
        assert_eq!(r.user_id, Some("u-1"));
        assert_eq!(
            r.email_hash(EmailRule::Plain),
            Some(sha256_hex("jane@example.com").as_str())
        );
        assert_eq!(r.click_id(|c| &c.fbc), Some("fb.1.1.abc"));
        assert_eq!(r.click_id(|c| &c.gclid), Some("G1"));
    }

    #[test]
    fn observe_resolves_as_a_later_lookup_would() {
        let mut t = IdentityTable::default();
        let events = [
            r#"{"event":"view_content","event_id":"1","occurred_at":"2026-11-20T10:00:00Z","anonymous_id":"a1","click_ids":{"gclid":"G"}}"#,
            r#"{"event":"sign_up","event_id":"2","occurred_at":"2026-11-20T10:01:00Z","anonymous_id":"a1","user_id":"u1","email":"x@example.com"}"#,
            r#"{"event":"lead","event_id":"3","occurred_at":"2026-11-20T10:02:00Z","anonymous_id":"a1"}"#,
            r#"{"event":"lead","event_id":"4","occurred_at":"2026-11-20T10:03:00Z","user_id":"u1","phone":"+1 650 253 0000"}"#,
            r#"{"event":"lead","event_id":"5","occurred_at":"2026-11-20T10:04:00Z","anonymous_id":"a2","user_id":"u1"}"#,
            r#"{"event":"lead","event_id":"6","occurred_at":"2026-11-20T10:05:00Z","anonymous_id":"a3"}"#,
        ];
        for json in events {
            let e = ev(json);
            let hints = Profile::from_event(&e, &mut us());
            let observed = format!("{:?}", t.observe(&e, &hints, |_, _| {}));
            assert_eq!(observed, format!("{:?}", t.resolve(&e)), "{json}");
        }
        assert_eq!(t.resolve(&ev(events[2])).user_id, Some("u1"));
    }

    #[test]
    fn another_instance_learns_the_same_through_the_topic_records() {
        let mut a = IdentityTable::default();
        let mut b = IdentityTable::default();
        let signup = ev(
            r#"{"event":"identify","event_id":"e2","occurred_at":"2026-11-20T10:05:00Z","anonymous_id":"anon-2",
                "user_id":"u-2","phone":"+44 20 7946 0958"}"#,
        );
        for (k, p) in observe(&mut a, &signup) {
            let wire: Profile = serde_json::from_slice(&serde_json::to_vec(&p).unwrap()).unwrap();
            b.apply(&k, &wire);
        }
        let later = ev(
            r#"{"event":"lead","event_id":"e9","occurred_at":"2026-11-20T12:00:00Z","anonymous_id":"anon-2"}"#,
        );
        assert_eq!(a.resolve(&later), b.resolve(&later));
        assert_eq!(b.resolve(&later).user_id, Some("u-2"));
    }

    #[test]
    fn unchanged_hints_write_nothing() {
        let mut t = IdentityTable::default();
        let e = ev(
            r#"{"event":"lead","event_id":"e1","occurred_at":"2026-11-20T10:00:00Z","user_id":"u1","email":"a@b.co"}"#,
        );
        assert_eq!(observe(&mut t, &e).len(), 1);
        assert!(observe(&mut t, &e).is_empty());
    }

    #[test]
    fn what_was_learnt_while_anonymous_is_stitched_once_and_never_undoes_newer_facts() {
        let mut t = IdentityTable::default();
        let at = |n: u32, rest: &str| {
            ev(&format!(
                r#"{{"event":"lead","event_id":"e{n}","occurred_at":"2026-11-20T10:0{n}:00Z",{rest}}}"#
            ))
        };
        let keys = |w: Vec<(String, Profile)>| w.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        let anon = at(
            1,
            r#""anonymous_id":"a1","email":"old@example.com","click_ids":{"fbc":"F0"}"#,
        );
        assert_eq!(keys(observe(&mut t, &anon)), ["a:a1"]);
        let link = at(2, r#""anonymous_id":"a1","user_id":"u1""#);
        assert_eq!(keys(observe(&mut t, &link)), ["a:a1", "u:u1"]);
        let u = t.resolve(&link).user.unwrap().clone();
        assert_eq!(
            u.email_sha256.as_deref(),
            Some(sha256_hex("old@example.com").as_str())
        );
        assert_eq!(u.click_ids.fbc.as_deref(), Some("F0"));

        let newer = at(3, r#""user_id":"u1","email":"new@example.com""#);
        assert_eq!(keys(observe(&mut t, &newer)), ["u:u1"]);
        // Both ids again, nothing new: the stale anonymous email must not
        // come back, and nothing is rewritten.
        assert!(observe(&mut t, &link).is_empty());
        let u = t.resolve(&link).user.unwrap().clone();
        assert_eq!(
            u.email_sha256.as_deref(),
            Some(sha256_hex("new@example.com").as_str())
        );

        // A linked visitor's new click belongs to the user.
        let click = at(4, r#""anonymous_id":"a1","click_ids":{"fbc":"F1"}"#);
        assert_eq!(keys(observe(&mut t, &click)), ["u:u1"]);
        let again = at(
            5,
            r#""anonymous_id":"a1","user_id":"u1","click_ids":{"fbc":"F1"}"#,
        );
        assert!(observe(&mut t, &again).is_empty());
        assert_eq!(
            t.resolve(&again).user.unwrap().click_ids.fbc.as_deref(),
            Some("F1")
        );
    }

    #[test]
    fn an_older_event_fills_gaps_but_never_replaces_what_a_newer_one_taught() {
        let mut t = IdentityTable::default();
        let at = |time: &str, rest: &str| {
            ev(&format!(
                r#"{{"event":"lead","event_id":"e","occurred_at":"2026-11-20T{time}Z",{rest}}}"#
            ))
        };
        let newer = at(
            "12:00:00",
            r#""user_id":"u1","anonymous_id":"a1","click_ids":{"fbc":"NEW"}"#,
        );
        assert_eq!(observe(&mut t, &newer).len(), 2);
        // A partition read late, or a replayed backfill: its click is stale,
        // its email is news, and its other user does not take the device.
        let older = at(
            "09:00:00",
            r#""user_id":"u1","email":"a@b.co","click_ids":{"fbc":"OLD"}"#,
        );
        let w = observe(&mut t, &older);
        assert_eq!(w.len(), 1, "the email is a gap filled");
        let u = &w[0].1;
        assert_eq!(u.click_ids.fbc.as_deref(), Some("NEW"));
        assert_eq!(
            u.email_sha256.as_deref(),
            Some(sha256_hex("a@b.co").as_str())
        );
        assert_eq!(u.as_of, newer.occurred_at.timestamp());
        assert!(observe(&mut t, &older).is_empty());
        let other = at("10:00:00", r#""user_id":"u2","anonymous_id":"a1""#);
        observe(&mut t, &other);
        let later = at("13:00:00", r#""anonymous_id":"a1""#);
        assert_eq!(t.resolve(&later).user_id, Some("u1"));

        // The same rule for records read from the topic.
        let mut b = IdentityTable::default();
        for (k, p) in observe(&mut IdentityTable::default(), &newer) {
            b.apply(&k, &p);
        }
        for (k, p) in observe(&mut IdentityTable::default(), &older) {
            b.apply(&k, &p);
        }
        let u = b.resolve(&later).user.unwrap();
        assert_eq!(u.click_ids.fbc.as_deref(), Some("NEW"));
        assert!(u.email_sha256.is_some());
    }
}
