//! Every topic switchyard needs, with its settings, and an idempotent
//! `ensure` that creates what is missing and checks what exists.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use super::{ADMIN_TIMEOUT, Cluster, Error, client};
use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleanup {
    Delete,
    Compact,
}

impl Cleanup {
    pub fn as_str(self) -> &'static str {
        match self {
            Cleanup::Delete => "delete",
            Cleanup::Compact => "compact",
        }
    }
}

/// A record batch's header (61 bytes) and a record's framing, with margin.
const BATCH_OVERHEAD: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    /// What the topic is for, shown by `topics create` and `check`.
    pub purpose: String,
    pub partitions: i32,
    pub replication: i32,
    pub cleanup: Cleanup,
    pub retention: Option<Duration>,
    /// Dedup state must be co-partitioned with the input: partition p's keys
    /// live in state partition p, so the counts must be equal, not just close.
    pub copartitioned: bool,
    /// The largest record batch the topic takes (`max.message.bytes`): the
    /// largest record switchyard produces, with room for the batch header.
    pub max_message_bytes: usize,
}

/// The dedup topics for an input topic of some partition count.
///
/// An event_id's partition is `murmur2(event_id) % partitions`, so a change
/// of the input's partition count moves most event_ids to another partition,
/// away from the marks that remember them. Marks are therefore kept per
/// *layout*: the base topic (`switchyard.dedup`) serves the partition count
/// it was created with, and another count gets its own topic,
/// `switchyard.dedup.p<N>`. The topics of earlier layouts are read whole by
/// every router until their keys leave the window (`docs/decisions/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupTopics {
    /// Where the current layout's marks live.
    pub current: String,
    /// Existing dedup topics of other layouts, with their partition counts.
    pub past: Vec<(String, i32)>,
}

/// Picks the dedup topics for an input of `input_partitions` partitions
/// among the `existing` topics (name → partition count).
pub fn dedup_topics(
    base: &str,
    input_partitions: i32,
    existing: &HashMap<String, i32>,
) -> DedupTopics {
    let current = match existing.get(base) {
        Some(&n) if n != input_partitions => format!("{base}.p{input_partitions}"),
        _ => base.to_string(),
    };
    let suffix = |name: &str| -> bool {
        name.strip_prefix(base)
            .and_then(|rest| rest.strip_prefix(".p"))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    let mut past: Vec<(String, i32)> = existing
        .iter()
        .filter(|(name, _)| (name.as_str() == base || suffix(name)) && **name != current)
        .map(|(name, &n)| (name.clone(), n))
        .collect();
    past.sort();
    DedupTopics { current, past }
}

impl TopicSpec {
    fn configs(&self) -> Vec<(&'static str, String)> {
        let mut c = vec![
            ("cleanup.policy", self.cleanup.as_str().to_string()),
            ("max.message.bytes", self.max_message_bytes.to_string()),
        ];
        match self.cleanup {
            Cleanup::Compact => {
                // Small segments so the log cleaner can compact state soon after it changes;
                // tombstones stay a day so a restoring reader sees deletions.
                c.push(("segment.ms", "3600000".into()));
                c.push(("delete.retention.ms", "86400000".into()));
            }
            Cleanup::Delete => {
                if let Some(r) = self.retention {
                    c.push(("retention.ms", r.as_millis().to_string()));
                }
            }
        }
        c
    }
}

/// The topics for `config` when the input topic has `input_partitions`
/// partitions and the current layout's dedup marks go to `dedup`.
pub fn plan(config: &Config, input_partitions: i32, dedup: &str) -> Vec<TopicSpec> {
    let t = &config.topics;
    let rf = t.replication_factor;
    let spec = |name: String, purpose: &str, cleanup, retention, copartitioned| TopicSpec {
        name,
        purpose: purpose.to_string(),
        partitions: input_partitions,
        replication: rf,
        cleanup,
        retention,
        copartitioned,
        max_message_bytes: config.kafka.max_message_bytes + BATCH_OVERHEAD,
    };
    let week = Some(Duration::from_secs(7 * 86_400));
    let mut topics = vec![
        spec(
            t.canonical.clone(),
            "input: canonical events, key = event_id",
            Cleanup::Delete,
            week,
            false,
        ),
        spec(
            t.dlq(),
            "dead letters with their whole payload",
            Cleanup::Delete,
            Some(t.dlq_retention),
            false,
        ),
        spec(
            dedup.to_string(),
            "dedup state, co-partitioned with the input",
            Cleanup::Compact,
            None,
            true,
        ),
        spec(
            t.identity(),
            "identity table, read in full by every router",
            Cleanup::Compact,
            None,
            false,
        ),
        spec(
            t.outcomes(),
            "delivery ledger, key = event_id/destination",
            Cleanup::Compact,
            None,
            false,
        ),
    ];
    for d in config.enabled_destinations() {
        topics.push(spec(
            t.deliver(&d.name),
            &format!("deliveries for {} ({})", d.name, d.vendor.spec().type_name),
            Cleanup::Delete,
            week,
            false,
        ));
        topics.push(spec(
            t.retry(&d.name),
            &format!("delayed retries for {}", d.name),
            Cleanup::Delete,
            Some(t.retry_retention),
            false,
        ));
    }
    topics
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Created,
    Existed,
}

#[derive(Debug, Clone)]
pub struct TopicReport {
    pub spec: TopicSpec,
    /// The partition count the topic really has.
    pub partitions: i32,
    pub action: Action,
}

/// Creates every missing topic and checks the existing ones. Safe to run any
/// number of times; never changes an existing topic, reports mismatches instead.
pub async fn ensure(cluster: &Cluster, config: &Config) -> Result<Vec<TopicReport>, Error> {
    let admin: AdminClient<DefaultClientContext> = client::base(&config.kafka, cluster.bootstrap())
        .create()
        .map_err(Error::Client)?;
    let existing = existing_partitions(&admin, cluster.bootstrap())?;
    let input_partitions = existing
        .get(&config.topics.canonical)
        .copied()
        .unwrap_or(config.topics.partitions);
    let dedup = dedup_topics(&config.topics.dedup(), input_partitions, &existing);
    let specs = plan(config, input_partitions, &dedup.current);

    let mut reports = Vec::with_capacity(specs.len());
    let mut problems = Vec::new();
    let mut missing = Vec::new();
    for spec in specs {
        match existing.get(&spec.name) {
            Some(&n) => {
                if spec.copartitioned && n != input_partitions {
                    problems.push(format!(
                        "{} has {n} partitions but {} has {input_partitions}; it was not made by switchyard for this layout (delete it if it holds nothing you need, and rerun `switchyard topics create`)",
                        spec.name, config.topics.canonical
                    ));
                }
                reports.push(TopicReport {
                    partitions: n,
                    spec,
                    action: Action::Existed,
                });
            }
            None => missing.push(spec),
        }
    }

    for (name, n) in dedup.past {
        // Not a problem: the routers read it until its keys leave the window.
        reports.push(TopicReport {
            spec: TopicSpec {
                purpose: format!(
                    "dedup state of the {n}-partition input, read by every router until its keys leave the window (then it may be deleted)"
                ),
                name,
                partitions: n,
                replication: config.topics.replication_factor,
                cleanup: Cleanup::Compact,
                retention: None,
                copartitioned: false,
                max_message_bytes: config.kafka.max_message_bytes + BATCH_OVERHEAD,
            },
            partitions: n,
            action: Action::Existed,
        });
    }

    match cluster {
        Cluster::Embedded(broker) => {
            for spec in missing {
                broker.create_topic(&spec.name, spec.partitions)?;
                reports.push(created(spec));
            }
        }
        Cluster::External { .. } => {
            create(&admin, &missing).await?;
            reports.extend(missing.into_iter().map(created));
            problems.extend(check_cleanup(&admin, &reports).await?);
        }
    }
    if problems.is_empty() {
        Ok(reports)
    } else {
        Err(Error::Topics(problems))
    }
}

/// Creates the dedup topic of a new input layout (`dedup_topics`), with
/// the settings `ensure` gives the first one; one that appeared meanwhile
/// (another router was first) is fine.
pub async fn create_dedup(
    config: &Config,
    bootstrap: &str,
    name: &str,
    partitions: i32,
) -> Result<(), Error> {
    let admin: AdminClient<DefaultClientContext> = client::base(&config.kafka, bootstrap)
        .create()
        .map_err(Error::Client)?;
    let spec = plan(config, partitions, name)
        .into_iter()
        .find(|s| s.copartitioned)
        .expect("the plan has a dedup topic");
    create(&admin, &[spec]).await
}

fn created(spec: TopicSpec) -> TopicReport {
    TopicReport {
        partitions: spec.partitions,
        spec,
        action: Action::Created,
    }
}

/// Partition counts of the topics that exist; also the reachability check.
pub fn existing_partitions(
    admin: &AdminClient<DefaultClientContext>,
    bootstrap: &str,
) -> Result<HashMap<String, i32>, Error> {
    let md = admin
        .inner()
        .fetch_metadata(None, ADMIN_TIMEOUT)
        .map_err(|source| Error::Unreachable {
            bootstrap: bootstrap.to_string(),
            source,
        })?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect())
}

async fn create(
    admin: &AdminClient<DefaultClientContext>,
    specs: &[TopicSpec],
) -> Result<(), Error> {
    if specs.is_empty() {
        return Ok(());
    }
    let configs: Vec<Vec<(&'static str, String)>> = specs.iter().map(TopicSpec::configs).collect();
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .zip(&configs)
        .map(|(s, cfg)| {
            cfg.iter().fold(
                NewTopic::new(
                    &s.name,
                    s.partitions,
                    TopicReplication::Fixed(s.replication),
                ),
                |t, (k, v)| t.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
    let results = admin
        .create_topics(&new_topics, &opts)
        .await
        .map_err(|source| Error::Admin {
            topic: specs
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(","),
            source,
        })?;
    for r in results {
        match r {
            Ok(_) => {}
            // Another instance created it between our metadata read and now.
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::Admin {
                    topic,
                    source: rdkafka::error::KafkaError::AdminOp(code),
                });
            }
        }
    }
    Ok(())
}

/// A state topic that is not compacted silently loses dedup or identity state
/// at retention time, so that is an error, with the fix in the message.
async fn check_cleanup(
    admin: &AdminClient<DefaultClientContext>,
    reports: &[TopicReport],
) -> Result<Vec<String>, Error> {
    let compacted: Vec<&TopicReport> = reports
        .iter()
        .filter(|r| r.spec.cleanup == Cleanup::Compact)
        .collect();
    let resources: Vec<ResourceSpecifier<'_>> = compacted
        .iter()
        .map(|r| ResourceSpecifier::Topic(&r.spec.name))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT));
    let results = admin
        .describe_configs(&resources, &opts)
        .await
        .map_err(|source| Error::Admin {
            topic: "describe configs".into(),
            source,
        })?;
    let mut problems = Vec::new();
    for (report, result) in compacted.iter().zip(results) {
        let policy = match result {
            Ok(resource) => resource
                .get("cleanup.policy")
                .and_then(|e| e.value.clone())
                .unwrap_or_else(|| "delete".into()),
            Err(code) => {
                problems.push(format!(
                    "{}: cannot describe its configs ({code})",
                    report.spec.name
                ));
                continue;
            }
        };
        if !policy.split(',').any(|p| p.trim() == "compact") {
            problems.push(format!(
                "{} has cleanup.policy={policy} but holds state and must be compacted: run `kafka-configs --alter --entity-type topics --entity-name {} --add-config cleanup.policy=compact`",
                report.spec.name, report.spec.name
            ));
        }
    }
    Ok(problems)
}

/// What `switchyard check` prints for a valid config: brokers, topics, destinations.
pub fn summary(config: &Config) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let k = &config.kafka;
    let _ = match &k.brokers {
        Some(b) => writeln!(
            s,
            "kafka: {b} ({}, {} pass-through properties)",
            k.guarantee.as_str(),
            k.properties.len()
        ),
        None => writeln!(
            s,
            "kafka: embedded in-process broker (not durable), {}",
            k.guarantee.as_str()
        ),
    };
    let _ = writeln!(
        s,
        "router: dedup window {}, max record {} bytes",
        humantime::format_duration(config.router.dedup_window),
        config.router.max_record_bytes
    );
    let _ = writeln!(
        s,
        "topics (partition counts follow {}; {} when switchyard creates it):",
        config.topics.canonical, config.topics.partitions
    );
    for t in plan(config, config.topics.partitions, &config.topics.dedup()) {
        let _ = writeln!(
            s,
            "  {:<40} cleanup.policy={:<8} {}",
            t.name,
            t.cleanup.as_str(),
            t.purpose
        );
    }
    let _ = writeln!(s, "destinations ({}):", config.destinations.len());
    for d in config.destinations.values() {
        let events = if d.events.is_empty() {
            "every mapped event".to_string()
        } else {
            d.events
                .iter()
                .map(|e| e.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            s,
            "  {:<20} type={:<14} consent={} (missing: {}){}  events: {events}",
            d.name,
            d.vendor.spec().type_name,
            d.consent,
            match d.consent_default {
                crate::settings::ConsentDefault::Deny => "deny",
                crate::settings::ConsentDefault::Grant => "grant",
            },
            if d.enabled { "" } else { "  DISABLED" },
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_copartitions_state_with_the_input_and_compacts_it() {
        let cfg = Config::parse(
            "[destinations.hook]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:1/\"\nsecret = \"0123456789abcdef\"\nconsent = \"analytics\"\n",
            std::path::Path::new("t.toml"),
            &|_| None,
        )
        .unwrap();
        let p = plan(&cfg, 12, "switchyard.dedup");
        let names: Vec<&str> = p.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "events.canonical",
                "switchyard.dlq",
                "switchyard.dedup",
                "switchyard.identity",
                "switchyard.outcomes",
                "switchyard.deliver.hook",
                "switchyard.retry.hook",
            ]
        );
        assert!(p.iter().all(|s| s.partitions == 12));
        let dedup = &p[2];
        assert!(dedup.copartitioned);
        assert_eq!(
            dedup.configs()[0],
            ("cleanup.policy", "compact".to_string())
        );
        let dlq = &p[1];
        assert!(
            dlq.configs()
                .contains(&("retention.ms", (30u64 * 86_400_000).to_string()))
        );
    }

    #[test]
    fn dedup_marks_get_a_topic_per_input_layout() {
        let existing = |pairs: &[(&str, i32)]| -> HashMap<String, i32> {
            pairs.iter().map(|(n, p)| (n.to_string(), *p)).collect()
        };
        let base = "switchyard.dedup";
        // A new deployment, and one whose input never changed.
        for e in [
            existing(&[]),
            existing(&[(base, 6), ("switchyard.dedupe", 3)]),
        ] {
            assert_eq!(
                dedup_topics(base, 6, &e),
                DedupTopics {
                    current: base.into(),
                    past: vec![]
                }
            );
        }
        // The input grew from 6 to 12, then to 24.
        let grown = existing(&[(base, 6), ("switchyard.dedup.p12", 12), ("x.dedup.p3", 3)]);
        assert_eq!(
            dedup_topics(base, 12, &grown),
            DedupTopics {
                current: "switchyard.dedup.p12".into(),
                past: vec![(base.into(), 6)]
            }
        );
        assert_eq!(
            dedup_topics(base, 24, &grown),
            DedupTopics {
                current: "switchyard.dedup.p24".into(),
                past: vec![(base.into(), 6), ("switchyard.dedup.p12".into(), 12)]
            }
        );
        // Back to the base topic's own count (a recreated input).
        assert_eq!(
            dedup_topics(base, 6, &grown),
            DedupTopics {
                current: base.into(),
                past: vec![("switchyard.dedup.p12".into(), 12)]
            }
        );
        // Names that only look alike are not dedup topics.
        let odd = existing(&[
            (base, 6),
            ("switchyard.dedup.px", 2),
            ("switchyard.dedup.p", 2),
        ]);
        assert!(dedup_topics(base, 6, &odd).past.is_empty());
    }
}
