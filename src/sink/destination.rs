//! What the sink runtime needs from a vendor: limits as data and two pure
//! functions, `map` (events → HTTP requests) and `classify` (response →
//! per-event outcome). The runtime knows nothing vendor-specific.

use std::ops::Range;
use std::time::Duration;

use crate::delivery::Delivery;
use crate::settings::OAuthSettings;

/// A vendor's hard limits; the sink never builds a request above them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_events: usize,
    pub max_bytes: usize,
    /// Events older than this are refused by the vendor, so they are
    /// dead-lettered instead of sent.
    pub max_event_age: Option<Duration>,
}

/// One HTTP request for a contiguous slice of the batch.
#[derive(Clone, PartialEq)]
pub struct Request {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Which of the mapped batch's events this request carries.
    pub events: Range<usize>,
}

/// Vendors take credentials in headers and query strings, and bodies hold
/// hashed contact data: a printed request shows none of them.
impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self.url.split(['?', '#']).next().unwrap_or_default();
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Request")
            .field("url", &path)
            .field("headers", &names)
            .field("body_bytes", &self.body.len())
            .field("events", &self.events)
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

/// What became of one event after one request.
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
    /// Requests for `batch`, whose events together respect `limits()`.
    fn map(&self, batch: &[Delivery]) -> Vec<Request>;
    /// One outcome per event of `batch` (the events of the request answered).
    fn classify(&self, response: &Response, batch: &[Delivery]) -> Vec<Outcome>;
    /// Whether the response asks the sink to slow down (429 and vendor codes).
    fn is_throttle(&self, response: &Response) -> bool {
        response.status == 429
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_printed_request_shows_no_secret() {
        let r = Request {
            url: "https://graph.example/v21.0/1/events?access_token=SECRET1".into(),
            headers: vec![("Access-Token".into(), "SECRET2".into())],
            body: br#"{"em":"SECRET3"}"#.to_vec(),
            events: 0..1,
        };
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
}
