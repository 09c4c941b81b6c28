//! Text from outside switchyard (a vendor's error body, a client library's
//! message that quotes a URL) goes into logs, dead-letter headers and the
//! ledger. Before it does, it is cleaned of every secret this process knows
//! and of anything shaped like an email address or a phone number: vendors
//! quote the value they refuse, and GA4's URL carries its API secret.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::Regex;

use crate::settings::known_secrets;

/// An email address as vendors quote one, valid or not (`jo@example` is
/// refused for its missing domain, and still somebody's address).
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(\.[A-Za-z0-9\-]+)*").expect("a valid regex")
});

/// A phone number: E.164 or international with separators (`+1 415-555
/// 0123`), or a bare run of 10 or more digits. Dates, amounts and short
/// ids do not look like either.
static PHONE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\+[0-9][0-9 ().\-]{5,}[0-9]|[0-9]{10,}").expect("a valid regex"));

/// `text` without known secrets, email addresses or phone numbers.
pub fn redact(text: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(text);
    for secret in known_secrets().iter() {
        if out.contains(secret.as_str()) {
            out = Cow::Owned(out.replace(secret.as_str(), "[secret]"));
        }
    }
    if EMAIL.is_match(&out) {
        out = Cow::Owned(EMAIL.replace_all(&out, "[email]").into_owned());
    }
    if PHONE.is_match(&out) {
        out = Cow::Owned(PHONE.replace_all(&out, "[phone]").into_owned());
    }
    out
}

/// [`redact`] into an owned string, for the common case of a reason.
pub fn redacted(text: String) -> String {
    match redact(&text) {
        Cow::Borrowed(_) => text,
        Cow::Owned(clean) => clean,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Secret;

    #[test]
    fn emails_phones_and_known_secrets_are_replaced() {
        let _s = Secret::new("api-secret-REDACT-TEST");
        let text = "bad email 'jo.smith+x@mail.example.co.uk', phone +1 415-555-0123 or \
                    4155550123; url https://x/mp/collect?api_secret=api-secret-REDACT-TEST&id=1; \
                    'jane.doe@example' is not valid";
        assert_eq!(
            redact(text),
            "bad email '[email]', phone [phone] or [phone]; url \
             https://x/mp/collect?api_secret=[secret]&id=1; '[email]' is not valid"
        );
    }

    #[test]
    fn ordinary_error_text_is_kept() {
        for text in [
            "HTTP 400: event_time 2026-12-05T01:00:00Z is older than 7 days",
            "value 129.99 EUR; events[3].params missing (code 4012)",
            "Invalid parameter at index 12",
        ] {
            assert!(matches!(redact(text), Cow::Borrowed(_)), "{text}");
        }
    }

    #[test]
    fn short_secrets_are_not_looked_for() {
        let _s = Secret::new("key");
        assert_eq!(redact("a key was missing"), "a key was missing");
    }
}
