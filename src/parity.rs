//! `switchyard parity`: for a time range of the canonical topic, per
//! destination and currency, the value of the events published against the
//! value delivered, and the events that explain the difference: skipped by
//! consent, not routed (allowlist, no vendor name), rejected (a dead letter
//! or a rejected outcome), or pending (routed, no final outcome yet). An
//! event the router's rules send to a destination that has no delivery
//! record, no dead letter and no outcome there is unexplained: lost, or not
//! routed yet by a router that is behind.
//!
//! The rules are applied as configured now; a consent or allowlist change
//! since the events were routed shows as a difference in that category.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use serde::Serialize;
use thiserror::Error;

use crate::config::{Config, DestinationConfig};
use crate::delivery::dead_letter::header;
use crate::event::{CanonicalEvent, parse_event};
use crate::kafka::partitioner::partition_for;
use crate::kafka::reader::{self, InRange, RangeRead, ReadError};
use crate::router::route::{self, Skip};
use crate::sink::records::latest_outcomes;

/// Outcomes are written after their event; one this much older than the
/// range's start cannot be about an event in it.
const LEDGER_MARGIN: chrono::Duration = chrono::Duration::hours(24);
/// Event ids listed per reason and row (the counts cover them all).
const LISTED: usize = 20;

/// Why an event's value did not reach a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Why {
    Consent,
    /// Not in the destination's allowlist, or no vendor name for it.
    NotRouted,
    Rejected,
    /// Routed; no final outcome yet (in a batch, retrying or parked).
    Pending,
    /// Routed by the rules, but no delivery record, dead letter or outcome.
    Unexplained,
}

impl Why {
    pub const ALL: [Why; 5] = [
        Why::Consent,
        Why::NotRouted,
        Why::Rejected,
        Why::Pending,
        Why::Unexplained,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Why::Consent => "consent",
            Why::NotRouted => "not routed",
            Why::Rejected => "rejected",
            Why::Pending => "pending",
            Why::Unexplained => "unexplained",
        }
    }
}

/// A number of events and their value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Sum {
    pub events: u64,
    pub value: f64,
}

impl Sum {
    fn add(&mut self, value: f64) {
        self.events += 1;
        self.value += value;
    }
}

/// One destination and currency.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Row {
    pub canonical: Sum,
    pub delivered: Sum,
    pub why: BTreeMap<Why, Sum>,
    /// Up to [`LISTED`] event ids per reason.
    pub examples: BTreeMap<Why, Vec<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// (destination, currency) → row.
    pub rows: BTreeMap<(String, String), Row>,
    /// Valid events in the range (each event_id once).
    pub events: u64,
    /// Of those, events that carry a value and a currency.
    pub with_value: u64,
}

impl Report {
    pub fn unexplained(&self) -> u64 {
        self.rows
            .values()
            .filter_map(|r| r.why.get(&Why::Unexplained))
            .map(|s| s.events)
            .sum()
    }
}

/// What the topics say about one event at one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    Delivered,
    /// A rejected outcome or a dead letter.
    Rejected,
    /// A delivery record, no outcome yet.
    Routed,
}

/// Accounts for `events` (each event_id once) at `destinations`, given what
/// the topics say about each (destination, event_id). Pure.
pub fn account(
    events: &[CanonicalEvent],
    destinations: &[&DestinationConfig],
    seen: &HashMap<(String, String), Seen>,
) -> Report {
    let mut report = Report::default();
    for ev in events {
        report.events += 1;
        let (Some(value), Some(currency)) = (ev.value, ev.currency.as_deref()) else {
            continue;
        };
        report.with_value += 1;
        for dest in destinations {
            let row = report
                .rows
                .entry((dest.name.clone(), currency.to_string()))
                .or_default();
            row.canonical.add(value);
            let said = seen.get(&(dest.name.clone(), ev.event_id.clone())).copied();
            let why = match (said, route::select(dest, ev)) {
                (Some(Seen::Delivered), _) => {
                    row.delivered.add(value);
                    continue;
                }
                (Some(Seen::Rejected), _) => Why::Rejected,
                (Some(Seen::Routed), _) => Why::Pending,
                (None, Err(Skip::ConsentDenied { .. } | Skip::ConsentMissing { .. })) => {
                    Why::Consent
                }
                (None, Err(Skip::NotInAllowlist | Skip::NotMapped)) => Why::NotRouted,
                (None, Ok(_)) => Why::Unexplained,
            };
            row.why.entry(why).or_default().add(value);
            let listed = row.examples.entry(why).or_default();
            if listed.len() < LISTED {
                listed.push(ev.event_id.clone());
            }
        }
    }
    report
}

#[derive(Debug, Error)]
pub enum ParityError {
    #[error("--from ({0}) must be before --to ({1})")]
    EmptyRange(DateTime<Utc>, DateTime<Utc>),
    #[error(transparent)]
    NotEnabled(#[from] crate::config::NotEnabled),
    #[error("reading {topic}: {source}")]
    Read { topic: String, source: ReadError },
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("{0}")]
    Task(String),
}

/// Reads the range and what the topics say about its events, and accounts
/// for them at `destinations` (empty: every enabled one).
pub async fn run(
    config: Arc<Config>,
    bootstrap: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    destinations: Vec<String>,
) -> Result<Report, ParityError> {
    if from >= to {
        return Err(ParityError::EmptyRange(from, to));
    }
    let only = config.chosen_destinations(&destinations)?;
    let names: HashSet<String> = config
        .enabled_destinations()
        .zip(only)
        .filter(|(_, chosen)| *chosen)
        .map(|(d, _)| d.name.clone())
        .collect();
    let bootstrap = bootstrap.to_string();
    tokio::task::spawn_blocking(move || {
        let range = (from.timestamp_millis(), to.timestamp_millis());
        let events = canonical_events(&config, &bootstrap, range)?;
        let seen = seen(&config, &bootstrap, from, &names)?;
        let dests: Vec<&DestinationConfig> = config
            .enabled_destinations()
            .filter(|d| names.contains(&d.name))
            .collect();
        Ok(account(&events, &dests, &seen))
    })
    .await
    .map_err(|e| ParityError::Task(e.to_string()))?
}

fn read_error(topic: &str) -> impl FnOnce(ReadError) -> ParityError + '_ {
    move |source| ParityError::Read {
        topic: topic.to_string(),
        source,
    }
}

/// The valid events of the range, each event_id once, as the router sees
/// them: a copy on another partition than its event_id's was moved there.
fn canonical_events(
    config: &Config,
    bootstrap: &str,
    range: (i64, i64),
) -> Result<Vec<CanonicalEvent>, ParityError> {
    let topic = &config.topics.canonical;
    let (consumer, mut read) =
        RangeRead::open(&config.kafka, bootstrap, topic, range, &HashMap::new())
            .map_err(read_error(topic))?;
    let partitions = reader::topic_partitions(&consumer, topic).map_err(read_error(topic))?;
    let partitions = i32::try_from(partitions.len()).unwrap_or(i32::MAX);
    let mut ids = HashSet::new();
    let mut events = Vec::new();
    while let Some(found) = read.next(&consumer).map_err(read_error(topic))? {
        let InRange::Record(m) = found else {
            continue;
        };
        let Some(ev) = m.payload().and_then(|p| parse_event(p).ok()) else {
            continue;
        };
        if m.partition() == partition_for(ev.event_id.as_bytes(), partitions)
            && ids.insert(ev.event_id.clone())
        {
            events.push(ev);
        }
    }
    Ok(events)
}

/// Per (destination, event_id) of `destinations`: the latest outcome, else
/// a dead letter, else a delivery record, written since `from`.
fn seen(
    config: &Config,
    bootstrap: &str,
    from: DateTime<Utc>,
    destinations: &HashSet<String>,
) -> Result<HashMap<(String, String), Seen>, ParityError> {
    let mut seen = HashMap::new();
    let since = from.timestamp_millis();
    let now = (Utc::now() + chrono::Duration::minutes(1)).timestamp_millis();
    for dest in destinations {
        let topic = config.topics.deliver(dest);
        let (consumer, mut read) = RangeRead::open(
            &config.kafka,
            bootstrap,
            &topic,
            (since, now),
            &HashMap::new(),
        )
        .map_err(read_error(&topic))?;
        while let Some(found) = read.next(&consumer).map_err(read_error(&topic))? {
            if let InRange::Record(m) = found
                && let Some(id) = crate::delivery::event_id_in(m.payload())
            {
                seen.insert((dest.clone(), id), Seen::Routed);
            }
        }
    }
    let dlq = config.topics.dlq();
    reader::scan(&config.kafka, bootstrap, &dlq, Some(since), |m| {
        let destination = m.headers().and_then(|hs| {
            hs.iter()
                .find(|h| h.key == header::DESTINATION)
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        if let (Some(d), Some(id)) = (destination, crate::delivery::event_id_in(m.payload()))
            && destinations.contains(&d)
        {
            seen.insert((d, id), Seen::Rejected);
        }
    })
    .map_err(read_error(&dlq))?;
    let outcomes = config.topics.outcomes();
    let ledger_since = (from - LEDGER_MARGIN).timestamp_millis();
    let latest = latest_outcomes(
        &config.kafka,
        bootstrap,
        &outcomes,
        ledger_since,
        destinations,
    )
    .map_err(read_error(&outcomes))?;
    seen.extend(latest.into_iter().map(|(k, delivered)| {
        let said = if delivered {
            Seen::Delivered
        } else {
            Seen::Rejected
        };
        (k, said)
    }));
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let text = r#"
[destinations.hook]
type = "webhook"
url = "http://127.0.0.1:9/hook"
secret = "0123456789abcdef"
consent = "analytics"
events = ["purchase"]
"#;
        Config::parse(text, std::path::Path::new("t.toml"), &|_| None).unwrap()
    }

    fn event(id: &str, name: &str, value: f64, currency: &str, analytics: &str) -> CanonicalEvent {
        let json = serde_json::json!({
            "event": name, "event_id": id, "occurred_at": "2026-12-05T01:00:00Z",
            "user_id": "u", "value": value, "currency": currency,
            "consent": {"analytics": analytics}
        });
        parse_event(json.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn each_event_is_delivered_or_explained_or_unexplained() {
        let config = config();
        let events = vec![
            event("d", "purchase", 10.0, "EUR", "granted"),
            event("c", "purchase", 1.5, "EUR", "denied"),
            event("n", "refund", 2.0, "EUR", "granted"),
            event("r", "purchase", 3.0, "USD", "granted"),
            event("p", "purchase", 4.0, "USD", "granted"),
            event("u", "purchase", 5.0, "USD", "granted"),
        ];
        let key = |id: &str| ("hook".to_string(), id.to_string());
        let seen = HashMap::from([
            (key("d"), Seen::Delivered),
            (key("r"), Seen::Rejected),
            (key("p"), Seen::Routed),
        ]);
        let r = account(
            &events,
            &config.enabled_destinations().collect::<Vec<_>>(),
            &seen,
        );
        assert_eq!((r.events, r.with_value), (6, 6));
        let eur = &r.rows[&("hook".into(), "EUR".into())];
        assert_eq!(
            eur.canonical,
            Sum {
                events: 3,
                value: 13.5
            }
        );
        assert_eq!(
            eur.delivered,
            Sum {
                events: 1,
                value: 10.0
            }
        );
        assert_eq!(
            eur.why[&Why::Consent],
            Sum {
                events: 1,
                value: 1.5
            }
        );
        assert_eq!(
            eur.why[&Why::NotRouted],
            Sum {
                events: 1,
                value: 2.0
            }
        );
        let usd = &r.rows[&("hook".into(), "USD".into())];
        assert_eq!(usd.delivered, Sum::default());
        assert_eq!(usd.why[&Why::Rejected].events, 1);
        assert_eq!(usd.why[&Why::Pending].events, 1);
        assert_eq!(usd.examples[&Why::Unexplained], ["u"]);
        assert_eq!(r.unexplained(), 1);
    }

    #[test]
    fn an_outcome_wins_over_the_rules_as_configured_now() {
        // Delivered before consent was withdrawn in the config: delivered.
        let config = config();
        let events = vec![event("d", "purchase", 10.0, "EUR", "denied")];
        let seen = HashMap::from([(("hook".to_string(), "d".to_string()), Seen::Delivered)]);
        let r = account(
            &events,
            &config.enabled_destinations().collect::<Vec<_>>(),
            &seen,
        );
        let eur = &r.rows[&("hook".into(), "EUR".into())];
        assert_eq!(eur.delivered.events, 1);
        assert!(eur.why.is_empty());
    }

    #[test]
    fn events_without_a_value_are_counted_but_not_summed() {
        let config = config();
        let mut ev = event("s", "purchase", 1.0, "EUR", "granted");
        ev.value = None;
        let r = account(
            &[ev],
            &config.enabled_destinations().collect::<Vec<_>>(),
            &HashMap::new(),
        );
        assert_eq!((r.events, r.with_value), (1, 0));
        assert!(r.rows.is_empty());
    }
}
