//! What the sink runtime needs from a vendor: limits as data and two pure
//! functions, `map` (a batch's rows → HTTP requests) and `classify` (one
//! request's response → one outcome per row it carried). The runtime knows
//! nothing vendor-specific: it sends the requests (concurrently, one
//! person's in order), merges the outcomes of an event that travelled in
//! several requests, and retries, splits or dead-letters.

use std::time::Duration;

pub use reqwest::Method;

use crate::delivery::Delivery;
use crate::settings::OAuthSettings;

/// A vendor's hard limits; the sink never builds a batch above them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_events: usize,
    pub max_bytes: usize,
    /// Events older than this are refused by the vendor, so they are
    /// dead-lettered instead of sent.
    pub max_event_age: Option<Duration>,
}

/// One HTTP call for some of the batch's rows.
#[derive(Clone, PartialEq)]
pub struct Request {
    pub method: Method,
    /// Which of the vendor's APIs this call uses ("events", "profiles"…): a
    /// fixed word for logs, not the URL.
    pub endpoint: &'static str,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The rows of the batch given to `map` that this call carries, in the
    /// order the body holds them. A row may travel in several calls (a
    /// profile update and then its event).
    pub rows: Vec<usize>,
}

impl Request {
    /// A POST of `body` to `url` for `rows`.
    pub fn post(
        endpoint: &'static str,
        url: impl Into<String>,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        rows: impl IntoIterator<Item = usize>,
    ) -> Request {
        Request {
            method: Method::POST,
            endpoint,
            url: url.into(),
            headers,
            body,
            rows: rows.into_iter().collect(),
        }
    }

    /// The rows as one run of the batch, when they are one (vendors that
    /// pack runs of events).
    pub fn range(&self) -> Option<std::ops::Range<usize>> {
        let start = *self.rows.first()?;
        let range = start..start + self.rows.len();
        range.clone().eq(self.rows.iter().copied()).then_some(range)
    }

    /// The rows this call carries, as deliveries of `batch`.
    pub fn deliveries<'a>(&'a self, batch: &'a [Delivery]) -> impl Iterator<Item = &'a Delivery> {
        self.rows.iter().map(move |&i| &batch[i])
    }
}

/// Vendors take credentials in headers and query strings, and bodies hold
/// hashed contact data: a printed request shows none of them.
impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self.url.split(['?', '#']).next().unwrap_or_default();
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("endpoint", &self.endpoint)
            .field("url", &path)
            .field("headers", &names)
            .field("body_bytes", &self.body.len())
            .field("rows", &self.rows)
            .finish()
    }
}

/// A vendor's answer, as `classify` sees it (header names lower-case).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What became of one row after one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Try again; `after` is the vendor's own wait (Retry-After), if it gave one.
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// Never retried: the event goes to the dead-letter topic.
    Rejected {
        class: String,
        reason: String,
    },
    /// The request was too large for the vendor (413 or its own words): its
    /// rows go again at once in requests of half as many rows. Costs no
    /// attempt; a row refused as too large on its own is dead-lettered.
    Split,
    /// The vendor did not look at this row because another row of the
    /// request failed: it goes again at once without costing an attempt.
    Resend,
}

impl Outcome {
    /// How bad an outcome is when one event had several calls: the worst
    /// decides what happens to it.
    fn severity(&self) -> u8 {
        match self {
            Outcome::Delivered => 0,
            Outcome::Resend => 1,
            Outcome::Split => 2,
            Outcome::Retry { .. } => 3,
            Outcome::Rejected { .. } => 4,
        }
    }

    /// One event's outcome from two of its calls: the worse wins; two
    /// rejections keep both reasons, two retries the longer wait.
    pub fn merge(self, other: Outcome) -> Outcome {
        match (self, other) {
            (
                Outcome::Rejected { class, reason },
                Outcome::Rejected {
                    reason: other_reason,
                    ..
                },
            ) if reason != other_reason => Outcome::Rejected {
                class,
                reason: format!("{reason}; {other_reason}"),
            },
            (
                Outcome::Retry { after, reason },
                Outcome::Retry {
                    after: other_after, ..
                },
            ) => Outcome::Retry {
                after: after.max(other_after),
                reason,
            },
            (a, b) if b.severity() > a.severity() => b,
            (a, _) => a,
        }
    }
}

/// `classify`'s answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    /// One outcome per row of the request, in its `rows` order.
    pub rows: Vec<Outcome>,
    /// The vendor asks the sink to slow down (429 and vendor codes).
    pub throttle: bool,
}

impl Classified {
    /// `outcome` for each of `request`'s rows; a throttle when HTTP 429.
    pub fn all(request: &Request, response: &Response, outcome: Outcome) -> Classified {
        Classified {
            rows: vec![outcome; request.rows.len()],
            throttle: response.status == 429,
        }
    }

    /// These outcomes; a throttle when HTTP 429.
    pub fn rows(response: &Response, rows: Vec<Outcome>) -> Classified {
        Classified {
            rows,
            throttle: response.status == 429,
        }
    }
}

/// Adds `classified` (the answer to `request`) to each row's outcome so
/// far, as the sink merges an event's answers. `outcomes` has one slot per
/// row of the batch `request` was mapped from.
pub fn merge_rows(outcomes: &mut [Option<Outcome>], request: &Request, classified: Classified) {
    for (&row, o) in request.rows.iter().zip(classified.rows) {
        if let Some(slot) = outcomes.get_mut(row) {
            *slot = Some(match slot.take() {
                Some(before) => before.merge(o),
                None => o,
            });
        }
    }
}

/// Each row's outcome if `response` answered every request `vendor` maps
/// `batch` into (`None`: the row travelled in no request). Vendor tests
/// read a recorded response with it.
pub fn classify_all(
    vendor: &dyn Destination,
    response: &Response,
    batch: &[Delivery],
) -> Vec<Option<Outcome>> {
    let mut out = vec![None; batch.len()];
    for request in vendor.map(batch) {
        let classified = vendor.classify(&request, response, batch);
        merge_rows(&mut out, &request, classified);
    }
    out
}

/// Why the vendor would refuse one event whatever else the request holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub class: &'static str,
    pub reason: String,
}

pub trait Destination: Send + Sync {
    fn limits(&self) -> Limits;
    /// Checked before an event joins a request: some vendors (Meta) fail a
    /// whole request for one invalid event, so an event the vendor is sure to
    /// refuse (a required field missing, say) is dead-lettered on its own
    /// with the reason instead. `None` = send it.
    fn refuse(&self, _delivery: &Delivery) -> Option<Refusal> {
        None
    }
    /// Refresh-token credentials when the vendor authenticates with
    /// short-lived OAuth access tokens: the sink keeps one fresh and sends
    /// it as `Authorization: Bearer`, since `map` is pure and cannot.
    fn oauth(&self) -> Option<&OAuthSettings> {
        None
    }
    /// Whether the vendor itself drops a resent event with the same key; when
    /// not, the sink consults the delivery ledger before sending.
    fn vendor_dedup(&self) -> bool;
    /// Requests for `batch` (events that passed `refuse`, within `limits()`).
    /// Every row should travel in at least one request; one that travels in
    /// none is retried. Requests that carry the same person are sent in the
    /// order given here.
    fn map(&self, batch: &[Delivery]) -> Vec<Request>;
    /// What became of each row of `request` (built by `map` from `batch`).
    fn classify(&self, request: &Request, response: &Response, batch: &[Delivery]) -> Classified;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_printed_request_shows_no_secret() {
        let r = Request::post(
            "events",
            "https://graph.example/v21.0/1/events?access_token=SECRET1",
            vec![("Access-Token".into(), "SECRET2".into())],
            br#"{"em":"SECRET3"}"#.to_vec(),
            [0],
        );
        let shown = format!("{r:?}");
        for s in ["SECRET1", "SECRET2", "SECRET3"] {
            assert!(!shown.contains(s), "{shown}");
        }
        assert!(
            shown.contains("https://graph.example/v21.0/1/events"),
            "{shown}"
        );
        assert!(shown.contains("Access-Token"), "{shown}");
    }

    fn retry(after: u64, reason: &str) -> Outcome {
        Outcome::Retry {
            after: Some(Duration::from_secs(after)),
            reason: reason.into(),
        }
    }

    fn rejected(class: &str, reason: &str) -> Outcome {
        Outcome::Rejected {
            class: class.into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn the_worse_of_two_calls_decides_an_events_outcome() {
        use Outcome::{Delivered, Resend, Split};
        assert_eq!(Delivered.merge(Delivered), Delivered);
        assert_eq!(Delivered.merge(Resend), Resend);
        assert_eq!(Split.merge(Resend), Split);
        assert_eq!(Split.merge(retry(1, "a")), retry(1, "a"));
        assert_eq!(retry(1, "a").merge(Delivered), retry(1, "a"));
        // Delivered by one call, refused by the other: refused.
        assert_eq!(
            Delivered.merge(rejected("bad_email", "no")),
            rejected("bad_email", "no")
        );
        assert_eq!(rejected("x", "a").merge(retry(5, "b")), rejected("x", "a"));
        // Both refusals are told; the same one once.
        assert_eq!(
            rejected("profile_invalid", "bad phone").merge(rejected("event_invalid", "no name")),
            rejected("profile_invalid", "bad phone; no name")
        );
        assert_eq!(
            rejected("x", "same").merge(rejected("x", "same")),
            rejected("x", "same")
        );
        // Two waits: the longer one.
        assert_eq!(retry(1, "a").merge(retry(30, "b")), retry(30, "a"));
    }
}
