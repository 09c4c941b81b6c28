//! Retry decisions as pure functions: what an HTTP status means, how long a
//! vendor asked us to wait, and whether the next attempt waits in memory,
//! moves to the retry topic, or is out of budget.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};

use super::config::RetrySettings;
use super::destination::{Outcome, Response};

/// The outcome every vendor shares for a status: `None` for 2xx (the vendor
/// reads the body), split for 413, retry for 408/429/5xx (with Retry-After),
/// reject otherwise.
pub fn by_status(response: &Response, now: SystemTime) -> Option<Outcome> {
    let s = response.status;
    if (200..300).contains(&s) {
        return None;
    }
    // Too large: the same rows in smaller requests may well be taken.
    if s == 413 {
        return Some(Outcome::Split);
    }
    if s == 408 || s == 429 || s >= 500 {
        return Some(Outcome::Retry {
            after: response
                .header("retry-after")
                .and_then(|v| retry_after(v, now)),
            reason: format!("HTTP {s}: {}", excerpt(&response.body, 200)),
        });
    }
    Some(Outcome::Rejected {
        class: format!("http_{s}"),
        reason: format!("HTTP {s}: {}", excerpt(&response.body, 200)),
    })
}

/// `Retry-After` as delay-seconds or an HTTP date (RFC 9110 §10.2.3); a date
/// in the past means "now".
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// At most `max` bytes of a body as text, cut on a character boundary and
/// marked when cut (see [`cut`]).
pub fn excerpt(body: &[u8], max: usize) -> String {
    // Only the head is decoded (a body may be megabytes); the character it
    // may cut in two decodes as one replacement character, dropped here.
    let head = &body[..body.len().min(max)];
    let text = String::from_utf8_lossy(head);
    let text = if head.len() < body.len() {
        text.strip_suffix('\u{fffd}').unwrap_or(&text)
    } else {
        &text
    };
    cut_of(text, max, body.len()).into_owned()
}

/// `text` in at most `max` bytes: whole when it fits, else its head, cut on
/// a character boundary, and `…(cut, N bytes)` saying how long it was.
/// Vendors' texts go into record headers, logs and metric labels, and one of
/// any size must not make the record too large to write.
pub fn cut(text: &str, max: usize) -> Cow<'_, str> {
    cut_of(text, max, text.len())
}

/// [`cut`] for an owned text, which stays as it is when it fits.
pub fn cut_string(text: String, max: usize) -> String {
    if text.len() <= max {
        text
    } else {
        cut(&text, max).into_owned()
    }
}

/// [`cut`] of a `text` that is the head of one `total` bytes long.
fn cut_of(text: &str, max: usize, total: usize) -> Cow<'_, str> {
    if text.len() <= max && total == text.len() {
        return Cow::Borrowed(text);
    }
    let mut mark = format!("…(cut, {total} bytes)");
    if mark.len() > max {
        mark.clear();
    }
    let mut end = (max - mark.len()).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}{mark}", &text[..end]))
}

/// What to do with an event that has to be tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Wait this long in memory, then resend.
    Wait(Duration),
    /// The wait is long: move the event to the retry topic, due after this.
    Park(Duration),
    /// Out of attempts or time: dead-letter it.
    GiveUp,
}

/// The backoff ceiling before attempt `attempts + 1` (exponential from
/// `initial_backoff`, capped at `max_backoff`).
pub fn ceiling(policy: &RetrySettings, attempts: u32) -> Duration {
    ExponentialBuilder::default()
        .with_min_delay(policy.initial_backoff)
        .with_max_delay(policy.max_backoff)
        .with_factor(2.0)
        .without_max_times()
        .build()
        .nth(attempts.saturating_sub(1) as usize)
        .unwrap_or(policy.max_backoff)
}

/// Decides the next step after `attempts` failed attempts, the first of them
/// `elapsed` ago. `jitter` in [0, 1) draws the full-jitter wait
/// (uniform in [0, ceiling]); a vendor's `retry_after` replaces it, since
/// sending earlier only earns another 429.
pub fn next_step(
    policy: &RetrySettings,
    attempts: u32,
    elapsed: Duration,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Next {
    if attempts >= policy.max_attempts {
        return Next::GiveUp;
    }
    let wait = retry_after.unwrap_or_else(|| ceiling(policy, attempts).mul_f64(jitter));
    // A vendor's wait can be any number (`Retry-After: 18446744073709551615`):
    // one past the budget gives up instead of overflowing the sum.
    if elapsed.saturating_add(wait) > policy.max_elapsed {
        return Next::GiveUp;
    }
    if wait > policy.park_after {
        Next::Park(wait)
    } else {
        Next::Wait(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetrySettings {
        RetrySettings {
            max_attempts: 5,
            max_elapsed: Duration::from_secs(3600),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            park_after: Duration::from_secs(30),
        }
    }

    fn resp(status: u16, headers: &[(&str, &str)]) -> Response {
        Response {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: b"nope".to_vec(),
        }
    }

    #[test]
    fn vendor_text_is_cut_on_a_character_boundary_and_says_so() {
        assert_eq!(cut("short", 10), "short");
        let long = "é".repeat(1000);
        let c = cut(&long, 101);
        assert!(c.len() <= 101, "{}", c.len());
        assert!(c.ends_with("…(cut, 2000 bytes)"), "{c}");
        assert!(c.starts_with("éé"));
        // A body cut within a character, or not UTF-8 at all.
        let body = "ü".repeat(5000).into_bytes();
        let e = excerpt(&body, 1023);
        assert!(e.len() <= 1023 && e.ends_with("…(cut, 10000 bytes)"), "{e}");
        assert!(!e.contains('\u{fffd}'), "{e}");
        assert_eq!(excerpt(b"ok", 1024), "ok");
        assert!(excerpt(&[0xff; 4096], 100).len() <= 100);
        // Too small a room for the mark: only the head.
        assert_eq!(cut("abcdef", 3), "abc");
    }

    #[test]
    fn statuses_retry_or_reject() {
        let now = SystemTime::UNIX_EPOCH;
        assert_eq!(by_status(&resp(200, &[]), now), None);
        assert_eq!(by_status(&resp(204, &[]), now), None);
        for s in [408, 429, 500, 502, 503] {
            assert!(
                matches!(
                    by_status(&resp(s, &[]), now),
                    Some(Outcome::Retry { after: None, .. })
                ),
                "{s}"
            );
        }
        assert_eq!(by_status(&resp(413, &[]), now), Some(Outcome::Split));
        for s in [400, 401, 403, 404, 422] {
            match by_status(&resp(s, &[]), now) {
                Some(Outcome::Rejected { class, reason }) => {
                    assert_eq!(class, format!("http_{s}"));
                    assert!(reason.contains("nope"));
                }
                other => panic!("{s}: {other:?}"),
            }
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        // Wed, 21 Oct 2015 07:28:00 GMT is 1445412480 s after the epoch.
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", now), None);
        let r = resp(429, &[("Retry-After", "2")]);
        assert!(matches!(
            by_status(&r, now),
            Some(Outcome::Retry { after: Some(d), .. }) if d == Duration::from_secs(2)
        ));
    }

    #[test]
    fn ceilings_grow_and_cap() {
        let p = policy();
        assert_eq!(ceiling(&p, 1), Duration::from_secs(1));
        assert_eq!(ceiling(&p, 2), Duration::from_secs(2));
        assert_eq!(ceiling(&p, 4), Duration::from_secs(8));
        assert_eq!(ceiling(&p, 20), Duration::from_secs(60));
    }

    #[test]
    fn full_jitter_spans_zero_to_ceiling() {
        let p = policy();
        assert_eq!(
            next_step(&p, 3, Duration::ZERO, None, 0.0),
            Next::Wait(Duration::ZERO)
        );
        assert_eq!(
            next_step(&p, 3, Duration::ZERO, None, 0.5),
            Next::Wait(Duration::from_secs(2))
        );
    }

    #[test]
    fn a_vendor_wait_of_any_size_gives_up_instead_of_overflowing() {
        let p = policy();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        let huge = retry_after("18446744073709551615", now).unwrap();
        for wait in [huge, Duration::MAX] {
            assert_eq!(
                next_step(&p, 1, Duration::from_secs(5), Some(wait), 0.0),
                Next::GiveUp
            );
        }
        assert_eq!(
            next_step(&p, 1, Duration::MAX, None, 0.5),
            Next::GiveUp,
            "an elapsed time near the maximum too"
        );
    }

    #[test]
    fn retry_after_overrides_backoff_and_long_waits_park() {
        let p = policy();
        assert_eq!(
            next_step(&p, 1, Duration::ZERO, Some(Duration::from_secs(2)), 0.0),
            Next::Wait(Duration::from_secs(2))
        );
        assert_eq!(
            next_step(&p, 1, Duration::ZERO, Some(Duration::from_secs(31)), 0.0),
            Next::Park(Duration::from_secs(31))
        );
    }

    #[test]
    fn budget_is_attempts_and_elapsed() {
        let p = policy();
        assert_eq!(next_step(&p, 5, Duration::ZERO, None, 0.1), Next::GiveUp);
        assert_eq!(
            next_step(
                &p,
                2,
                Duration::from_secs(3599),
                Some(Duration::from_secs(2)),
                0.0
            ),
            Next::GiveUp
        );
        assert!(matches!(
            next_step(&p, 4, Duration::from_secs(10), None, 0.99),
            Next::Wait(_)
        ));
    }
}
