//! The global identity table: what is known about each person, keyed by
//! user_id and by anonymous_id, mirrored to the compacted identity topic and
//! tailed by every router instance.
//!
//! Raw contact data is normalised and hashed once, here, into every variant a
//! vendor asks for; the table and its topic hold hashes, never raw email or
//! phone numbers.

use std::borrow::Cow;
use std::fmt;

use hashbrown::HashMap;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use xxhash_rust::xxh3::xxh3_128;

use crate::event::normalize::{
    EmailRule, PhoneCountry, PhoneFormat, Sha256Digest, email_digests, identifier_digest,
    phone_digests,
};
use crate::event::{CanonicalEvent, ClickKind};

mod compact;
pub use compact::CompactMap;

/// Which of a person's contact hashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Contact {
    /// SHA-256 of the trimmed, lowercased email (Meta, TikTok, webhooks).
    Email,
    /// SHA-256 under Google's gmail dot rule; absent when equal to `Email`.
    EmailGoogle,
    /// SHA-256 of the E.164 number with '+' (Google, TikTok).
    PhoneE164,
    /// SHA-256 of the E.164 digits without '+' (Meta).
    PhoneDigits,
}

impl Contact {
    /// The contacts given, in this order, as a profile holds them.
    fn collect(
        [email, google, e164, digits]: [Option<Sha256Digest>; 4],
    ) -> CompactMap<Contact, Sha256Digest> {
        [
            (Contact::Email, email),
            (Contact::EmailGoogle, google),
            (Contact::PhoneE164, e164),
            (Contact::PhoneDigits, digits),
        ]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect()
    }
}

/// Hashed identifiers of one person (or one anonymous visitor).
///
/// Every router holds one per user and one per device, so it holds only
/// what is known: a device that never gave contact data pays for no hashes.
/// On the identity topic it is the flat JSON object [`WireProfile`] reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "WireProfile")]
pub struct Profile {
    /// For an anonymous visitor: the user they were identified as.
    pub user_id: Option<Box<str>>,
    contacts: CompactMap<Contact, Sha256Digest>,
    /// External ids, hashed.
    pub external_ids: CompactMap<Box<str>, Sha256Digest>,
    pub click_ids: CompactMap<ClickKind, Box<str>>,
    /// When the newest event this was learnt from occurred (unix seconds).
    /// What an older event says (a partition read late, a replayed backfill)
    /// only fills gaps: it never replaces what a newer one taught.
    pub as_of: i64,
}

/// A profile as the identity topic holds it.
#[derive(Deserialize)]
struct WireProfile {
    #[serde(default)]
    user_id: Option<Box<str>>,
    #[serde(default)]
    email_sha256: Option<Sha256Digest>,
    #[serde(default)]
    email_sha256_google: Option<Sha256Digest>,
    #[serde(default)]
    phone_sha256_e164: Option<Sha256Digest>,
    #[serde(default)]
    phone_sha256_digits: Option<Sha256Digest>,
    #[serde(default)]
    external_ids: CompactMap<Box<str>, Sha256Digest>,
    #[serde(default)]
    click_ids: CompactMap<ClickKind, Box<str>>,
    #[serde(default)]
    as_of: i64,
}

impl From<WireProfile> for Profile {
    fn from(w: WireProfile) -> Profile {
        Profile {
            user_id: w.user_id,
            contacts: Contact::collect([
                w.email_sha256,
                w.email_sha256_google,
                w.phone_sha256_e164,
                w.phone_sha256_digits,
            ]),
            external_ids: {
                let mut ids = w.external_ids;
                ids.truncate(MAX_EXTERNAL_IDS);
                ids
            },
            click_ids: w.click_ids,
            as_of: w.as_of,
        }
    }
}

impl Serialize for Profile {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        if let Some(u) = &self.user_id {
            m.serialize_entry("user_id", u)?;
        }
        for (k, v) in self.contacts.iter() {
            let name = match k {
                Contact::Email => "email_sha256",
                Contact::EmailGoogle => "email_sha256_google",
                Contact::PhoneE164 => "phone_sha256_e164",
                Contact::PhoneDigits => "phone_sha256_digits",
            };
            m.serialize_entry(name, v)?;
        }
        if !self.external_ids.is_empty() {
            m.serialize_entry("external_ids", &self.external_ids)?;
        }
        if !self.click_ids.is_empty() {
            m.serialize_entry("click_ids", &self.click_ids)?;
        }
        if self.as_of != 0 {
            m.serialize_entry("as_of", &self.as_of)?;
        }
        m.end()
    }
}

/// Hashes phone numbers in both vendor formats and remembers recent ones.
/// Reading a number against the numbering plan costs about 15 µs, far more
/// than everything else the router does with an event, and the same person's
/// number comes back with each of their events. Entries are keyed by a
/// 128-bit hash of the raw number, so the cache holds no raw phone numbers.
pub struct PhoneHasher {
    country: PhoneCountry,
    recent: quick_cache::unsync::Cache<u128, Option<(Sha256Digest, Sha256Digest)>>,
}

/// Numbers remembered, each as a 16-byte key and two inline 32-byte digests.
const RECENT_PHONES: usize = 16_384;

impl PhoneHasher {
    pub fn new(country: PhoneCountry) -> PhoneHasher {
        PhoneHasher {
            country,
            recent: quick_cache::unsync::Cache::new(RECENT_PHONES),
        }
    }

    /// (E.164 hash, digits-only hash), or `None` for a number that cannot exist.
    pub fn hash(&mut self, raw: &str) -> Option<(Sha256Digest, Sha256Digest)> {
        let key = xxh3_128(raw.trim().as_bytes());
        if let Some(known) = self.recent.get(&key) {
            return *known;
        }
        let hashed = phone_digests(raw, self.country);
        self.recent.insert(key, hashed);
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
fn take<T: Clone + PartialEq>(slot: &mut Option<T>, v: &Option<T>, older: bool) -> bool {
    match v {
        Some(x) if slot.as_ref() != Some(x) && !(older && slot.is_some()) => {
            slot.clone_from(v);
            true
        }
        _ => false,
    }
}

/// `take` for one entry of a map.
/// The most external ids one person keeps: twice what one event may carry.
pub const MAX_EXTERNAL_IDS: usize = 32;

fn take_entry<K: Ord + Clone, V: Clone + PartialEq>(
    map: &mut CompactMap<K, V>,
    key: &K,
    v: Option<&V>,
    older: bool,
) -> bool {
    let Some(v) = v else { return false };
    match map.get(key) {
        Some(known) if known == v || older => false,
        _ => {
            map.insert(key.clone(), v.clone());
            true
        }
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
        let (email, email_google) = match ev
            .email
            .as_deref()
            .or_else(|| trait_str("email"))
            .and_then(email_digests)
        {
            Some((plain, google)) => (Some(plain), google),
            None => (
                ev.email_sha256.as_deref().and_then(Sha256Digest::from_hex),
                None,
            ),
        };
        // A publisher's phone digest: we cannot know which format it hashed,
        // so every vendor gets it as given.
        let (e164, digits) = ev
            .phone
            .as_deref()
            .or_else(|| trait_str("phone"))
            .and_then(|raw| phones.hash(raw))
            .or_else(|| {
                let h = Sha256Digest::from_hex(ev.phone_sha256.as_deref()?)?;
                Some((h, h))
            })
            .unzip();
        Profile {
            user_id: None,
            contacts: Contact::collect([email, email_google, e164, digits]),
            external_ids: ev
                .external_ids
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().into(), identifier_digest(v)?)))
                .collect(),
            click_ids: ev.click_ids.as_ref().map_or_else(CompactMap::default, |c| {
                ClickKind::ALL
                    .into_iter()
                    .filter_map(|k| Some((k, c.get(k)?.into())))
                    .collect()
            }),
            as_of: ev.occurred_at.timestamp(),
        }
    }

    /// Whether it holds no fact at all (an event with no identity hints).
    pub fn teaches_nothing(&self) -> bool {
        self.user_id.is_none()
            && self.contacts.is_empty()
            && self.external_ids.is_empty()
            && self.click_ids.is_empty()
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
        let email = newer.contacts.get(&Contact::Email);
        if email.is_some() && !(older && self.contacts.get(&Contact::Email).is_some()) {
            changed |= take_entry(&mut self.contacts, &Contact::Email, email, false);
            // The google variant belongs to the email it came with.
            let google = newer.contacts.get(&Contact::EmailGoogle);
            if self.contacts.get(&Contact::EmailGoogle) != google {
                match google {
                    Some(g) => self.contacts.insert(Contact::EmailGoogle, *g),
                    None => self.contacts.remove(&Contact::EmailGoogle),
                }
                changed = true;
            }
        }
        for c in [Contact::PhoneE164, Contact::PhoneDigits] {
            changed |= take_entry(&mut self.contacts, &c, newer.contacts.get(&c), older);
        }
        for (k, v) in newer.external_ids.iter() {
            if self.external_ids.len() >= MAX_EXTERNAL_IDS && self.external_ids.get(k).is_none() {
                // A full set keeps the ids it has: what a person's record
                // (and so every delivery enriched from it) can hold is bounded.
                continue;
            }
            changed |= take_entry(&mut self.external_ids, k, Some(v), older);
        }
        for (k, v) in newer.click_ids.iter() {
            changed |= take_entry(&mut self.click_ids, k, Some(v), older);
        }
        changed
    }

    pub fn email_hash(&self, rule: EmailRule) -> Option<Sha256Digest> {
        let plain = self.contacts.get(&Contact::Email);
        match rule {
            EmailRule::Google => self.contacts.get(&Contact::EmailGoogle).or(plain),
            EmailRule::Plain => plain,
        }
        .copied()
    }

    pub fn phone_hash(&self, format: PhoneFormat) -> Option<Sha256Digest> {
        match format {
            PhoneFormat::E164 => self.contacts.get(&Contact::PhoneE164),
            PhoneFormat::DigitsOnly => self.contacts.get(&Contact::PhoneDigits),
        }
        .copied()
    }

    pub fn click_id(&self, kind: ClickKind) -> Option<&str> {
        self.click_ids.get(&kind).map(|c| &**c)
    }

    /// Its own size (it is boxed) and what it owns.
    fn heap_bytes(&self) -> usize {
        std::mem::size_of::<Profile>()
            + self.user_id.as_ref().map_or(0, |u| u.len())
            + self.contacts.heap_bytes()
            + self.external_ids.heap_bytes()
            + self
                .external_ids
                .iter()
                .map(|(k, _)| k.len())
                .sum::<usize>()
            + self.click_ids.heap_bytes()
            + self.click_ids.iter().map(|(_, v)| v.len()).sum::<usize>()
    }
}

/// What the table knows about the person behind one event: the user's
/// profile overlaid on the anonymous visitor's, read in place.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Resolved<'a> {
    pub user_id: Option<&'a str>,
    user: Option<&'a Profile>,
    anon: Option<&'a Profile>,
    /// The event's own identifiers, when they were not learnt into the
    /// table (an event of a public key): they come first.
    own: Option<&'a Profile>,
}

impl<'a> Resolved<'a> {
    pub fn email_hash(&self, rule: EmailRule) -> Option<Sha256Digest> {
        // The email and its google variant come as a pair, from one profile.
        let has_email = |p: &&Profile| p.contacts.get(&Contact::Email).is_some();
        self.own
            .filter(has_email)
            .or(self.user.filter(has_email))
            .or(self.anon)?
            .email_hash(rule)
    }

    pub fn phone_hash(&self, format: PhoneFormat) -> Option<Sha256Digest> {
        self.own
            .and_then(|o| o.phone_hash(format))
            .or_else(|| self.user?.phone_hash(format))
            .or_else(|| self.anon?.phone_hash(format))
    }

    /// One click id: the event's own, the user's, else the anonymous visitor's.
    pub fn click_id(&self, kind: ClickKind) -> Option<&'a str> {
        let of = |p: Option<&'a Profile>| p.and_then(|p| p.click_id(kind));
        of(self.own)
            .or_else(|| of(self.user))
            .or_else(|| of(self.anon))
    }

    /// Hashed external ids, the user's over the anonymous visitor's; an
    /// event's own ids (when not in the table) over the known person's.
    pub fn external_ids(&self) -> HashedIds<'a> {
        let ids = |p: Option<&'a Profile>| p.map_or(&[][..], |p| p.external_ids.as_slice());
        match ids(self.own) {
            [] => HashedIds {
                user: ids(self.user),
                anon: ids(self.anon),
            },
            own => HashedIds {
                user: own,
                anon: match ids(self.user) {
                    [] => ids(self.anon),
                    user => user,
                },
            },
        }
    }
}

/// The user's hashed external ids over the anonymous visitor's, serialised
/// as one map without building it.
#[derive(Debug, Clone, Copy)]
pub struct HashedIds<'a> {
    user: &'a [(Box<str>, Sha256Digest)],
    anon: &'a [(Box<str>, Sha256Digest)],
}

impl HashedIds<'_> {
    pub fn is_empty(&self) -> bool {
        self.user.is_empty() && self.anon.is_empty()
    }
}

impl Serialize for HashedIds<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use std::cmp::Ordering;
        let mut m = s.serialize_map(None)?;
        let (mut u, mut a) = (self.user.iter().peekable(), self.anon.iter().peekable());
        // Both are sorted by key: a merge, taking the user's of equal keys.
        loop {
            let next = match (u.peek(), a.peek()) {
                (Some(x), Some(y)) => match x.0.cmp(&y.0) {
                    Ordering::Less => u.next(),
                    Ordering::Greater => a.next(),
                    Ordering::Equal => {
                        a.next();
                        u.next()
                    }
                },
                (Some(_), None) => u.next(),
                (None, Some(_)) => a.next(),
                (None, None) => break,
            };
            if let Some((k, v)) = next {
                m.serialize_entry(k, v)?;
            }
        }
        m.end()
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

    /// Bytes the table's allocations hold: its two maps' slots, the keys,
    /// the boxed profiles and what they own (allocator rounding not counted).
    pub fn heap_bytes(&self) -> usize {
        let map = |m: &HashMap<String, Box<Profile>>| {
            let slot = std::mem::size_of::<(String, Box<Profile>)>() + 1;
            m.capacity().div_ceil(7).next_power_of_two() * 8 * slot
                + m.iter()
                    .map(|(k, p)| k.capacity() + p.heap_bytes())
                    .sum::<usize>()
        };
        map(&self.users) + map(&self.anons)
    }

    /// Keys whose profiles differ between the two tables, `as_of` aside
    /// (it is not written when it alone changes), with one example.
    pub fn differences(&self, other: &IdentityTable) -> (usize, Option<String>) {
        let same = |a: &Profile, b: Option<&Box<Profile>>| {
            b.is_some_and(|b| {
                Profile {
                    as_of: 0,
                    ..a.clone()
                } == Profile {
                    as_of: 0,
                    ..(**b).clone()
                }
            })
        };
        let mut example = None;
        let mut n = 0;
        for (prefix, mine, theirs) in [
            (USER, &self.users, &other.users),
            (ANON, &self.anons, &other.anons),
        ] {
            for (k, p) in mine {
                if !same(p, theirs.get(k)) {
                    n += 1;
                    example
                        .get_or_insert_with(|| format!("{prefix}{k}: {p:?} / {:?}", theirs.get(k)));
                }
            }
        }
        (n + other.len().saturating_sub(self.len()), example)
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
        // Entries are made only for what can be learnt (a hint, or the
        // device's link to a user): a visitor who never says anything about
        // themselves costs nothing, so the table grows with the people it
        // knows something about, not with every id it has seen.
        let learns = !hints.teaches_nothing() || ev.user_id.is_some();
        let mut anon: Option<&'a mut Profile> = aid.and_then(|aid| {
            if learns {
                Some(entry(anons, aid))
            } else {
                anons.get_mut(aid).map(|p| &mut **p)
            }
        });
        let linked_user: Option<Cow<'a, str>> = match &ev.user_id {
            Some(u) => Some(Cow::Borrowed(u)),
            None => anon
                .as_ref()
                .and_then(|a| a.user_id.as_deref())
                .map(|u| Cow::Owned(u.to_owned())),
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
                own: None,
            };
        };
        let links = anon.as_deref().is_some_and(|a| {
            a.user_id.as_deref() != Some(&*uid) && (a.user_id.is_none() || hints.as_of >= a.as_of)
        });
        if !links && hints.teaches_nothing() {
            let anon = anon.map(|a| &*a);
            return Resolved {
                user_id: ev
                    .user_id
                    .as_deref()
                    .or_else(|| anon.and_then(|a| a.user_id.as_deref())),
                user: users.get(&*uid).map(|p| &**p),
                anon,
                own: None,
            };
        }
        let user = entry(users, &uid);
        let mut changed = false;
        // A device that changed hands links to its newest user; an older
        // event does not take it back.
        if let (Some(a), Some(aid)) = (anon.as_deref_mut(), aid)
            && a.user_id.as_deref() != Some(&*uid)
            && (a.user_id.is_none() || hints.as_of >= a.as_of)
        {
            a.user_id = Some(uid.as_ref().into());
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
            own: None,
        }
    }

    /// What the table knows about the person behind `ev`, with the event's
    /// `own` identifiers first, without learning from it.
    pub fn resolve_with_own<'a>(
        &'a self,
        ev: &'a CanonicalEvent,
        own: &'a Profile,
    ) -> Resolved<'a> {
        Resolved {
            own: Some(own),
            ..self.resolve(ev)
        }
    }

    /// The strongest identifiers known for the person behind `ev`, without
    /// learning from it.
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
            own: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::normalize::parse_country;
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
            let fresh = phone_digests(raw, parse_country("US").unwrap());
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
            p.email_hash(EmailRule::Plain),
            Some(Sha256Digest::of("john.smith@gmail.com"))
        );
        assert_eq!(
            p.email_hash(EmailRule::Google),
            Some(Sha256Digest::of("johnsmith@gmail.com"))
        );
        assert_eq!(
            p.phone_hash(PhoneFormat::E164),
            Some(Sha256Digest::of("+16502530000"))
        );
        assert_eq!(
            p.phone_hash(PhoneFormat::DigitsOnly),
            Some(Sha256Digest::of("16502530000"))
        );
        assert_eq!(p.external_ids.get("crm"), Some(&Sha256Digest::of("C-9")));
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
            Some(Sha256Digest::of("jane@example.com"))
        );
        assert_eq!(r.click_id(ClickKind::Fbc), Some("fb.1.1.abc"));
        assert_eq!(r.click_id(ClickKind::Gclid), Some("G1"));
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
    fn the_identity_topic_format_is_unchanged() {
        // A record as earlier versions wrote it, every field set.
        let h = |s: &str| Sha256Digest::of(s).to_string();
        let old = format!(
            r#"{{"user_id":"u-1","email_sha256":"{}","email_sha256_google":"{}","phone_sha256_e164":"{}","phone_sha256_digits":"{}","external_ids":{{"crm":"{}","shop":"{}"}},"click_ids":{{"fbc":"fb.1.1.a","gclid":"G","ttp":"t"}},"as_of":1795132800}}"#,
            h("a.b@gmail.com"),
            h("ab@gmail.com"),
            h("+16502530000"),
            h("16502530000"),
            h("C-1"),
            h("S-1"),
        );
        let p: Profile = serde_json::from_str(&old).unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), old);
        assert_eq!(
            p.email_hash(EmailRule::Google),
            Some(Sha256Digest::of("ab@gmail.com"))
        );
        assert_eq!(p.click_id(ClickKind::Gclid), Some("G"));
        let empty: Profile = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, Profile::default());
        assert_eq!(serde_json::to_string(&empty).unwrap(), "{}");
        assert!(serde_json::from_str::<Profile>(r#"{"email_sha256":"x"}"#).is_err());
    }

    #[test]
    fn ids_that_bring_no_fact_take_no_memory() {
        let mut table = IdentityTable::default();
        let mut phones = us();
        for i in 0..1000 {
            let ev: CanonicalEvent = serde_json::from_value(serde_json::json!({
                "event": "view_content", "event_id": format!("e{i}"),
                "occurred_at": "2026-11-20T10:00:00Z",
                "anonymous_id": format!("visitor-{i}"),
            }))
            .unwrap();
            let hints = Profile::from_event(&ev, &mut phones);
            table.observe(&ev, &hints, |_, _| panic!("nothing to write"));
            let ev: CanonicalEvent = serde_json::from_value(serde_json::json!({
                "event": "purchase", "event_id": format!("p{i}"),
                "occurred_at": "2026-11-20T10:00:00Z", "user_id": format!("user-{i}"),
            }))
            .unwrap();
            let hints = Profile::from_event(&ev, &mut phones);
            table.observe(&ev, &hints, |_, _| panic!("nothing to write"));
        }
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn a_persons_external_ids_are_bounded_however_many_events_bring_new_ones() {
        let mut person = Profile::default();
        for i in 0..100 {
            let newer: Profile = serde_json::from_value(serde_json::json!({
                "external_ids": { format!("sys{i:03}"): Sha256Digest::of("x") },
                "as_of": i,
            }))
            .unwrap();
            person.merge(&newer);
        }
        assert_eq!(person.external_ids.len(), MAX_EXTERNAL_IDS);
        // A known id still changes.
        let update: Profile = serde_json::from_value(serde_json::json!({
            "external_ids": { "sys000": Sha256Digest::of("y") }, "as_of": 200,
        }))
        .unwrap();
        assert!(person.merge(&update));
        assert_eq!(
            person.external_ids.get("sys000"),
            Some(&Sha256Digest::of("y"))
        );
        // A record written before the bound is cut to it when read.
        let ids: serde_json::Map<String, serde_json::Value> = (0..100)
            .map(|i| (format!("k{i:03}"), serde_json::json!(Sha256Digest::of("z"))))
            .collect();
        let old: Profile =
            serde_json::from_value(serde_json::json!({ "external_ids": ids })).unwrap();
        assert_eq!(old.external_ids.len(), MAX_EXTERNAL_IDS);
    }

    #[test]
    fn external_ids_are_the_users_over_the_devices_in_key_order() {
        let h = |s: &str| Sha256Digest::of(s).to_string();
        let profile = |ids: serde_json::Value| -> Profile {
            serde_json::from_value(serde_json::json!({ "external_ids": ids })).unwrap()
        };
        let user = profile(serde_json::json!({"crm": h("U"), "shop": h("S")}));
        let anon = profile(serde_json::json!({"crm": h("A"), "web": h("W"), "app": h("P")}));
        let ids = |user, anon| {
            let r = Resolved {
                user_id: None,
                user,
                anon,
                own: None,
            };
            serde_json::to_value(r.external_ids()).unwrap()
        };
        assert_eq!(
            ids(Some(&user), Some(&anon)),
            serde_json::json!({"app": h("P"), "crm": h("U"), "shop": h("S"), "web": h("W")})
        );
        assert_eq!(ids(None, Some(&anon))["crm"], h("A"));
        let empty = Profile::default();
        assert_eq!(ids(Some(&user), None), ids(Some(&user), Some(&empty)));
        assert!(Resolved::default().external_ids().is_empty());
        assert_eq!(ids(None, None), serde_json::json!({}));
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
            u.email_hash(EmailRule::Plain),
            Some(Sha256Digest::of("old@example.com"))
        );
        assert_eq!(u.click_id(ClickKind::Fbc), Some("F0"));

        let newer = at(3, r#""user_id":"u1","email":"new@example.com""#);
        assert_eq!(keys(observe(&mut t, &newer)), ["u:u1"]);
        // Both ids again, nothing new: the stale anonymous email must not
        // come back, and nothing is rewritten.
        assert!(observe(&mut t, &link).is_empty());
        let u = t.resolve(&link).user.unwrap().clone();
        assert_eq!(
            u.email_hash(EmailRule::Plain),
            Some(Sha256Digest::of("new@example.com"))
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
            t.resolve(&again).user.unwrap().click_id(ClickKind::Fbc),
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
        assert_eq!(u.click_id(ClickKind::Fbc), Some("NEW"));
        assert_eq!(
            u.email_hash(EmailRule::Plain),
            Some(Sha256Digest::of("a@b.co"))
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
        assert_eq!(u.click_id(ClickKind::Fbc), Some("NEW"));
        assert!(u.email_hash(EmailRule::Plain).is_some());
    }
}
