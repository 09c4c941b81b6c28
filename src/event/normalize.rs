//! Normalisation and SHA-256 hashing of identity hints, the way ad platforms
//! match them: Meta, Google and TikTok all hash the *normalised* value, so a
//! different normalisation silently produces a hash that matches nobody.
//!
//! Every `hash_*` function passes a value that already is a SHA-256 hex
//! digest through (lowercased) instead of hashing it twice, because
//! publishers and identify traits mix raw and pre-hashed values.

use std::fmt;

use phonenumber::Mode;
use serde::de::Unexpected;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use super::validate::{is_email, is_phone};

/// Default country for phone numbers written without an international prefix.
pub type PhoneCountry = phonenumber::country::Id;

/// How an email is normalised before hashing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmailRule {
    Plain,
    /// Google's: dots dropped from gmail.com/googlemail.com local parts.
    Google,
}

/// How a normalised phone number is written before hashing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhoneFormat {
    /// `+15551234567` (Google Ads, TikTok, Klaviyo).
    E164,
    /// `15551234567`: E.164 without the '+' (Meta).
    DigitsOnly,
}

/// A SHA-256 digest, held as its 32 bytes: half its hex form, and inline
/// rather than a separate allocation, which matters in the identity table
/// every router keeps for millions of people. Shown and serialised as the
/// lowercase hex every vendor takes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sha256Digest([u8; 32]);

impl Sha256Digest {
    /// The digest of the UTF-8 bytes of `s`.
    pub fn of(s: &str) -> Sha256Digest {
        Sha256Digest(Sha256::digest(s.as_bytes()).into())
    }

    /// A digest written as 64 hex digits in either case.
    pub fn from_hex(s: &str) -> Option<Sha256Digest> {
        let mut bytes = [0; 32];
        (s.len() == 64 && hex::decode_to_slice(s, &mut bytes).is_ok())
            .then_some(Sha256Digest(bytes))
    }

    /// Its lowercase hex, on the stack.
    pub fn hex(&self) -> HexDigest {
        let mut out = [0; 64];
        hex::encode_to_slice(self.0, &mut out).expect("64 bytes hold 32 in hex");
        HexDigest(out)
    }
}

/// A digest's lowercase hex form.
pub struct HexDigest([u8; 64]);

impl HexDigest {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hex().as_str())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.hex().as_str())
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Sha256Digest, D::Error> {
        struct Hex;
        impl serde::de::Visitor<'_> for Hex {
            type Value = Sha256Digest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a SHA-256 digest in 64 hex digits")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Sha256Digest, E> {
                Sha256Digest::from_hex(v).ok_or_else(|| E::invalid_value(Unexpected::Str(v), &self))
            }
        }
        d.deserialize_str(Hex)
    }
}

/// Lowercase hex SHA-256 of the UTF-8 bytes of `s`.
pub fn sha256_hex(s: &str) -> String {
    Sha256Digest::of(s).to_string()
}

/// Trimmed and lowercased; with `gmail_dot_rule` (Google's enhanced
/// conversions rule) the dots of the local part are dropped for gmail.com
/// and googlemail.com, where they do not matter to delivery. `None` when the
/// value does not have the contract's email shape.
pub fn normalize_email(raw: &str, gmail_dot_rule: bool) -> Option<String> {
    let email = raw.trim().to_lowercase();
    if !is_email(&email) {
        return None;
    }
    if gmail_dot_rule {
        return gmail_without_dots(&email).unwrap_or(Some(email));
    }
    Some(email)
}

/// A normalised gmail.com/googlemail.com address with its local part's dots
/// dropped (`None` if nothing is left); the outer `None` when the rule does
/// not change `email`.
fn gmail_without_dots(email: &str) -> Option<Option<String>> {
    let (local, domain) = email.split_once('@')?;
    if !matches!(domain, "gmail.com" | "googlemail.com") || !local.contains('.') {
        return None;
    }
    let local = local.replace('.', "");
    Some((!local.is_empty()).then(|| format!("{local}@{domain}")))
}

/// Loads the phone-number metadata now (tens of milliseconds, once per
/// process) rather than inside the first batch that holds a phone number.
pub fn warm_up() {
    let _ = normalize_phone(
        "+1 650 253 0000",
        phonenumber::country::Id::US,
        PhoneFormat::E164,
    );
}

/// The number in E.164 (or its digits), reading numbers without an
/// international prefix as numbers of `default_country`. `None` unless the
/// phone-number metadata says the number can exist.
pub fn normalize_phone(
    raw: &str,
    default_country: PhoneCountry,
    format: PhoneFormat,
) -> Option<String> {
    let e164 = phone_e164(raw, default_country)?;
    match format {
        PhoneFormat::E164 => Some(e164),
        PhoneFormat::DigitsOnly => Some(e164.trim_start_matches('+').to_owned()),
    }
}

fn phone_e164(raw: &str, default_country: PhoneCountry) -> Option<String> {
    let raw = raw.trim();
    // Only the contract's phone shape reaches the parser: trait values are
    // free-form, and the parser has panicked on odd input in the past.
    if !(6..=32).contains(&raw.len()) || !is_phone(raw) {
        return None;
    }
    let number = phonenumber::parse(Some(default_country), raw).ok()?;
    if !phonenumber::is_valid(&number) {
        return None;
    }
    Some(number.format().mode(Mode::E164).to_string())
}

/// An ISO 3166-1 alpha-2 code in any case, e.g. "us" or "GB".
pub fn parse_country(code: &str) -> Option<PhoneCountry> {
    let code = code.trim();
    if code.len() != 2 || !code.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    code.to_ascii_uppercase().parse().ok()
}

/// SHA-256 of the normalised email, or the given digest lowercased.
pub fn hash_email(raw: &str, gmail_dot_rule: bool) -> Option<String> {
    pre_hashed(raw)
        .or_else(|| normalize_email(raw, gmail_dot_rule).map(|e| Sha256Digest::of(&e)))
        .map(|d| d.to_string())
}

/// The email's SHA-256 for most vendors, and under Google's gmail dot rule
/// when that differs: one normalisation for both.
pub fn email_digests(raw: &str) -> Option<(Sha256Digest, Option<Sha256Digest>)> {
    if let Some(h) = pre_hashed(raw) {
        return Some((h, None));
    }
    let plain = normalize_email(raw, false)?;
    let google = gmail_without_dots(&plain)
        .flatten()
        .map(|g| Sha256Digest::of(&g));
    Some((Sha256Digest::of(&plain), google))
}

/// The phone number's SHA-256 in E.164 and as digits only, from one parse
/// (the parse is what costs); a given digest is passed through as both,
/// since nobody can tell which format was hashed.
pub fn phone_digests(
    raw: &str,
    default_country: PhoneCountry,
) -> Option<(Sha256Digest, Sha256Digest)> {
    if let Some(h) = pre_hashed(raw) {
        return Some((h, h));
    }
    let e164 = phone_e164(raw, default_country)?;
    Some((Sha256Digest::of(&e164), Sha256Digest::of(&e164[1..])))
}

/// SHA-256 of the normalised phone number, or the given digest lowercased.
pub fn hash_phone(raw: &str, default_country: PhoneCountry, format: PhoneFormat) -> Option<String> {
    let (e164, digits) = phone_digests(raw, default_country)?;
    Some(
        match format {
            PhoneFormat::E164 => e164,
            PhoneFormat::DigitsOnly => digits,
        }
        .to_string(),
    )
}

/// SHA-256 of a trimmed external id (case is kept: ids are case-sensitive),
/// or the given digest; `None` for a blank id.
pub fn identifier_digest(raw: &str) -> Option<Sha256Digest> {
    let id = raw.trim();
    if id.is_empty() {
        return None;
    }
    pre_hashed(id).or_else(|| Some(Sha256Digest::of(id)))
}

/// [`identifier_digest`] in lowercase hex.
pub fn hash_identifier(raw: &str) -> Option<String> {
    identifier_digest(raw).map(|d| d.to_string())
}

fn pre_hashed(raw: &str) -> Option<Sha256Digest> {
    Sha256Digest::from_hex(raw.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected digests computed with `printf %s 'value' | sha256sum`.
    const TEST_EXAMPLE_COM: &str =
        "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b";
    const JOHNSMITH_GMAIL: &str =
        "3586de92bb3636d0885a12eff961429a32e4ebd764b96f50d85d016f9338d586";
    const JOHN_DOT_SMITH_GMAIL: &str =
        "d0c648bc36f12061bec770df216cea2ab95851b9350fd54b658de53b0407767a";
    const PLUS_442079460958: &str =
        "f0bf0228144d9fe2bdf1da2d8ca698f17bf1410ee688b075c27062e47b6f0b6d";
    const DIGITS_442079460958: &str =
        "35e206e5dec4c89b9e8b71b8c32724a5bb518483ac5a20c6617d738375b3b823";
    const PLUS_16502530000: &str =
        "3ad9f10d73829a714b1383221691d4dbf08484f3ceeae884f53053a1c7bb0a92";
    const DIGITS_16502530000: &str =
        "67d3cb9e9b1b64b913a5f2508beac167cfa7d3fb943f6a52e6767392d425a536";
    const CRM_123: &str = "e10df6b2067f84972609f0924b53f3cfdede67a8088805cd673c5808a8ed404b";
    const JANE_DOE_EXAMPLE_COM: &str =
        "86e0b9e56c17cc4d12387e1949b85053fbe73bc3ce5a1188713a9d300cc6133d";
    const PLUS_16505551234: &str =
        "a2996076d3ad4af5dc818b908b3d8e354f26ededf7df0e0aa6ac354143805ee0";
    const DIGITS_16505551234: &str =
        "6069d14bf122fdfd931dc7beb58e5dfbba395b1faf05bdcd42d12358d63d8599";

    fn us() -> PhoneCountry {
        parse_country("US").unwrap()
    }

    fn gb() -> PhoneCountry {
        parse_country("gb").unwrap()
    }

    #[test]
    fn sha256_known_vector() {
        assert_eq!(sha256_hex("test@example.com"), TEST_EXAMPLE_COM);
        let hashed = |s: &str| Sha256Digest::from_hex(s).is_some();
        assert!(hashed(TEST_EXAMPLE_COM));
        assert!(hashed(&TEST_EXAMPLE_COM.to_uppercase()));
        assert!(!hashed(&TEST_EXAMPLE_COM[1..]));
        assert!(!hashed(&format!("{}g", &TEST_EXAMPLE_COM[1..])));
    }

    #[test]
    fn email_is_trimmed_and_lowercased() {
        assert_eq!(
            normalize_email(" Test@Example.COM ", false).as_deref(),
            Some("test@example.com")
        );
        assert_eq!(
            hash_email(" Test@Example.COM ", false).as_deref(),
            Some(TEST_EXAMPLE_COM)
        );
        assert_eq!(
            hash_email(" Test@Example.COM ", true).as_deref(),
            Some(TEST_EXAMPLE_COM)
        );
    }

    /// What a form or CRM sends hashes exactly as the vendors' SDKs hash the
    /// trimmed, lowercased address: `printf %s jane.doe@example.com | sha256sum`.
    #[test]
    fn padded_mixed_case_email_hashes_like_the_vendor_sdks() {
        let raw = "  Jane.Doe@Example.COM ";
        assert_eq!(
            normalize_email(raw, false).as_deref(),
            Some("jane.doe@example.com")
        );
        assert_eq!(
            hash_email(raw, false).as_deref(),
            Some(JANE_DOE_EXAMPLE_COM)
        );
        // Not a Google domain, so the dot rule changes nothing.
        assert_eq!(hash_email(raw, true).as_deref(), Some(JANE_DOE_EXAMPLE_COM));
        let (plain, google) = email_digests(raw).unwrap();
        assert_eq!(plain.to_string(), JANE_DOE_EXAMPLE_COM);
        assert_eq!(google, None);
        // And what parse_event keeps of it hashes the same.
        let event = crate::event::parse_event(
            br#"{"event":"lead","event_id":"e","occurred_at":"2026-11-26T10:00:00Z","user_id":"u","email":"  Jane.Doe@Example.COM "}"#,
        )
        .unwrap();
        let kept = event.email.unwrap();
        assert_eq!(kept, "jane.doe@example.com");
        assert_eq!(sha256_hex(&kept), JANE_DOE_EXAMPLE_COM);
    }

    /// E.164 with '+' for Google and TikTok (`PhoneFormat::E164`, the first of
    /// `phone_digests`), digits only for Meta (`DigitsOnly`, the second).
    #[test]
    fn padded_phone_hashes_in_each_vendors_form() {
        let raw = " +1 (650) 555-1234 ";
        assert_eq!(
            normalize_phone(raw, us(), PhoneFormat::E164).as_deref(),
            Some("+16505551234")
        );
        assert_eq!(
            normalize_phone(raw, us(), PhoneFormat::DigitsOnly).as_deref(),
            Some("16505551234")
        );
        assert_eq!(
            hash_phone(raw, us(), PhoneFormat::E164).as_deref(),
            Some(PLUS_16505551234)
        );
        assert_eq!(
            hash_phone(raw, us(), PhoneFormat::DigitsOnly).as_deref(),
            Some(DIGITS_16505551234)
        );
        let (e164, digits) = phone_digests(raw, us()).unwrap();
        assert_eq!(
            (e164.to_string().as_str(), digits.to_string().as_str()),
            (PLUS_16505551234, DIGITS_16505551234)
        );
        // The default country does not matter once there is a '+'.
        assert_eq!(
            hash_phone(raw, gb(), PhoneFormat::E164).as_deref(),
            Some(PLUS_16505551234)
        );
    }

    #[test]
    fn gmail_dot_rule_only_for_google_domains_and_only_when_asked() {
        assert_eq!(
            normalize_email("John.Smith@Gmail.com", true).as_deref(),
            Some("johnsmith@gmail.com")
        );
        assert_eq!(
            normalize_email("john.smith@googlemail.com", true).as_deref(),
            Some("johnsmith@googlemail.com")
        );
        assert_eq!(
            hash_email("John.Smith@gmail.com", true).as_deref(),
            Some(JOHNSMITH_GMAIL)
        );
        assert_eq!(
            hash_email("John.Smith@gmail.com", false).as_deref(),
            Some(JOHN_DOT_SMITH_GMAIL)
        );
        assert_eq!(
            normalize_email("john.smith@example.com", true).as_deref(),
            Some("john.smith@example.com")
        );
        assert_eq!(normalize_email("...@gmail.com", true), None);
    }

    #[test]
    fn variants_equal_the_single_rule_hashes() {
        for raw in [
            "John.Smith@Gmail.com",
            " jane@example.com",
            "j.d@googlemail.com",
            "...@gmail.com",
            TEST_EXAMPLE_COM,
            "not an email",
        ] {
            let got = email_digests(raw).map(|(p, g)| (p.to_string(), g.map(|g| g.to_string())));
            let plain = hash_email(raw, false);
            let google = hash_email(raw, true);
            assert_eq!(got.as_ref().map(|v| &v.0), plain.as_ref(), "{raw}");
            let google_or_plain = got.and_then(|(p, g)| g.or(Some(p)));
            assert_eq!(google_or_plain, google.or(plain), "{raw}");
        }
        for raw in [
            "(650) 253-0000",
            "+44 20 7946 0958",
            PLUS_16502530000,
            "12",
            "+1 999",
        ] {
            let got = phone_digests(raw, us());
            let single = |f| {
                pre_hashed(raw)
                    .or_else(|| normalize_phone(raw, us(), f).map(|p| Sha256Digest::of(&p)))
            };
            assert_eq!(got.map(|v| v.0), single(PhoneFormat::E164), "{raw}");
            assert_eq!(got.map(|v| v.1), single(PhoneFormat::DigitsOnly), "{raw}");
        }
    }

    #[test]
    fn digests_read_either_case_and_write_lowercase_hex() {
        let d = Sha256Digest::from_hex(&TEST_EXAMPLE_COM.to_uppercase()).unwrap();
        assert_eq!(d, Sha256Digest::of("test@example.com"));
        assert_eq!(d.hex().as_str(), TEST_EXAMPLE_COM);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{TEST_EXAMPLE_COM}\""));
        assert_eq!(serde_json::from_str::<Sha256Digest>(&json).unwrap(), d);
        for bad in [
            "",
            "abc",
            &TEST_EXAMPLE_COM[1..],
            &format!("{}g", &TEST_EXAMPLE_COM[1..]),
        ] {
            assert_eq!(Sha256Digest::from_hex(bad), None, "{bad}");
            assert!(serde_json::from_str::<Sha256Digest>(&format!("\"{bad}\"")).is_err());
        }
    }

    #[test]
    fn invalid_emails_are_none() {
        for bad in [
            "",
            "   ",
            "plainaddress",
            "a@b",
            "a b@example.com",
            "a@@b.com",
            "@example.com",
        ] {
            assert_eq!(normalize_email(bad, true), None, "{bad:?}");
            assert_eq!(hash_email(bad, true), None, "{bad:?}");
        }
    }

    #[test]
    fn us_number_with_default_country() {
        assert_eq!(
            normalize_phone("(650) 253-0000", us(), PhoneFormat::E164).as_deref(),
            Some("+16502530000")
        );
        assert_eq!(
            normalize_phone("(650) 253-0000", us(), PhoneFormat::DigitsOnly).as_deref(),
            Some("16502530000")
        );
        assert_eq!(
            hash_phone("(650) 253-0000", us(), PhoneFormat::E164).as_deref(),
            Some(PLUS_16502530000)
        );
        assert_eq!(
            hash_phone("650.253.0000", us(), PhoneFormat::DigitsOnly).as_deref(),
            Some(DIGITS_16502530000)
        );
    }

    #[test]
    fn uk_number_with_default_country_and_international_forms() {
        for raw in [
            "020 7946 0958",
            "+44 20 7946 0958",
            "0044 20 7946 0958",
            " 02079460958 ",
        ] {
            assert_eq!(
                normalize_phone(raw, gb(), PhoneFormat::E164).as_deref(),
                Some("+442079460958"),
                "{raw:?}"
            );
        }
        assert_eq!(
            hash_phone("020 7946 0958", gb(), PhoneFormat::E164).as_deref(),
            Some(PLUS_442079460958)
        );
        assert_eq!(
            hash_phone("020 7946 0958", gb(), PhoneFormat::DigitsOnly).as_deref(),
            Some(DIGITS_442079460958)
        );
        // An explicit '+' wins over the default country.
        assert_eq!(
            normalize_phone("+44 20 7946 0958", us(), PhoneFormat::E164).as_deref(),
            Some("+442079460958")
        );
    }

    #[test]
    fn invalid_phones_are_none() {
        for bad in [
            "",
            "12345",
            "555-0000",
            "+1 (000) 000-0000",
            "call me",
            "+44 20 7946 0958 x12",
        ] {
            assert_eq!(
                normalize_phone(bad, us(), PhoneFormat::E164),
                None,
                "{bad:?}"
            );
            assert_eq!(hash_phone(bad, us(), PhoneFormat::E164), None, "{bad:?}");
        }
    }

    #[test]
    fn phone_parser_survives_odd_input_of_the_allowed_shape() {
        // A cheap deterministic fuzz over the characters the shape admits.
        const ALPHABET: &[u8] = b"0123456789 .()-+";
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..5_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = 6 + (state % 27) as usize;
            let raw: String = (0..len)
                .map(|i| char::from(ALPHABET[((state >> (i % 60)) as usize) % ALPHABET.len()]))
                .collect();
            let _ = normalize_phone(&raw, gb(), PhoneFormat::E164);
        }
    }

    #[test]
    fn pre_hashed_values_pass_through_lowercased() {
        let upper = PLUS_16502530000.to_uppercase();
        assert_eq!(hash_email(&upper, true).as_deref(), Some(PLUS_16502530000));
        assert_eq!(
            hash_phone(&format!(" {upper} "), us(), PhoneFormat::E164).as_deref(),
            Some(PLUS_16502530000)
        );
        assert_eq!(hash_identifier(&upper).as_deref(), Some(PLUS_16502530000));
    }

    #[test]
    fn identifiers_are_trimmed_not_lowercased() {
        assert_eq!(hash_identifier(" crm-123 ").as_deref(), Some(CRM_123));
        assert_ne!(hash_identifier("CRM-123").as_deref(), Some(CRM_123));
        assert_eq!(hash_identifier("   "), None);
    }

    #[test]
    fn countries() {
        assert_eq!(parse_country("us"), Some(PhoneCountry::US));
        assert_eq!(parse_country(" De "), Some(PhoneCountry::DE));
        for bad in ["", "U", "USA", "U1", "ZZ"] {
            assert_eq!(parse_country(bad), None, "{bad:?}");
        }
    }
}
