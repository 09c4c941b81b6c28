//! `switchyard topics create` against a real Kafka-protocol broker (tansu).

mod common;

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;

fn config_text(brokers: &str, canonical: &str, prefix: &str) -> String {
    format!(
        r#"
[kafka]
brokers = "{brokers}"
guarantee = "at_least_once"

[topics]
canonical = "{canonical}"
prefix = "{prefix}"
partitions = 3

[destinations.hook]
type = "webhook"
url = "http://127.0.0.1:9/hook"
secret = "0123456789abcdef"
consent = "analytics"
"#
    )
}

fn admin(brokers: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client")
}

fn partitions(admin: &AdminClient<DefaultClientContext>, topic: &str) -> usize {
    let md = admin
        .inner()
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    md.topics()[0].partitions().len()
}

async fn cleanup_policy(admin: &AdminClient<DefaultClientContext>, topic: &str) -> String {
    let res = admin
        .describe_configs(
            &[ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("describe configs");
    let resource = res.into_iter().next().unwrap().expect("topic configs");
    resource
        .get("cleanup.policy")
        .and_then(|e| e.value.clone())
        .unwrap_or_else(|| panic!("{topic} has no cleanup.policy: {:?}", resource.entries))
}

#[tokio::test]
async fn creates_every_topic_with_compacted_state_and_is_safe_to_rerun() {
    let brokers = common::brokers();
    let dir = tempfile::tempdir().unwrap();
    let canonical = common::unique("canonical");
    let prefix = common::unique("sy");
    let cfg = common::write_config(dir.path(), &config_text(&brokers, &canonical, &prefix));

    let first = common::switchyard()
        .args(["topics", "create", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "first run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let expected = [
        canonical.clone(),
        format!("{prefix}.dlq"),
        format!("{prefix}.dedup"),
        format!("{prefix}.identity"),
        format!("{prefix}.outcomes"),
        format!("{prefix}.deliver.hook"),
        format!("{prefix}.retry.hook"),
    ];
    for t in &expected {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(t.as_str()))
            .unwrap_or_else(|| panic!("{t} not reported:\n{stdout}"));
        assert!(line.starts_with("created"), "{line}");
    }

    let admin = admin(&brokers);
    for t in &expected {
        assert_eq!(partitions(&admin, t), 3, "{t} partition count");
    }
    for state in ["dedup", "identity", "outcomes"] {
        let t = format!("{prefix}.{state}");
        assert_eq!(cleanup_policy(&admin, &t).await, "compact", "{t}");
    }
    assert_eq!(
        cleanup_policy(&admin, &format!("{prefix}.dlq")).await,
        "delete"
    );

    let second = common::switchyard()
        .args(["topics", "create", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(
        second.status.success(),
        "second run failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("exists")).count(),
        expected.len(),
        "{stdout}"
    );
}

#[tokio::test]
async fn state_topics_follow_an_existing_input_topic() {
    let brokers = common::brokers();
    let canonical = common::unique("canonical");
    let prefix = common::unique("sy");
    let admin = admin(&brokers);
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let res = admin
        .create_topics(
            &[rdkafka::admin::NewTopic::new(
                &canonical,
                5,
                rdkafka::admin::TopicReplication::Fixed(1),
            )],
            &opts,
        )
        .await
        .unwrap();
    res[0].as_ref().expect("create input topic");

    let dir = tempfile::tempdir().unwrap();
    let cfg = common::write_config(dir.path(), &config_text(&brokers, &canonical, &prefix));
    common::run_ok(&["topics", "create"], &cfg);
    assert_eq!(partitions(&admin, &format!("{prefix}.dedup")), 5);
}

/// Creates `topics` (name, partitions; the dedup ones compacted).
async fn create_topics(admin: &AdminClient<DefaultClientContext>, topics: &[(&str, i32)]) {
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let new: Vec<rdkafka::admin::NewTopic<'_>> = topics
        .iter()
        .map(|(name, n)| {
            let t =
                rdkafka::admin::NewTopic::new(name, *n, rdkafka::admin::TopicReplication::Fixed(1));
            if name.contains(".dedup") {
                t.set("cleanup.policy", "compact")
            } else {
                t
            }
        })
        .collect();
    let res = admin.create_topics(&new, &opts).await.unwrap();
    assert!(res.iter().all(|r| r.is_ok()), "{res:?}");
}

#[tokio::test]
async fn a_dedup_topic_of_another_partition_count_is_kept_as_an_earlier_layout() {
    let brokers = common::brokers();
    let canonical = common::unique("canonical");
    let prefix = common::unique("sy");
    let admin = admin(&brokers);
    let dedup = format!("{prefix}.dedup");
    create_topics(&admin, &[(&canonical, 4), (&dedup, 2)]).await;

    let dir = tempfile::tempdir().unwrap();
    let cfg = common::write_config(dir.path(), &config_text(&brokers, &canonical, &prefix));
    let out = common::run_ok(&["topics", "create"], &cfg);
    assert_eq!(partitions(&admin, &format!("{dedup}.p4")), 4);
    assert_eq!(partitions(&admin, &dedup), 2, "left as it is");
    let line = out
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(dedup.as_str()))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.starts_with("exists") && line.contains("dedup state of the 2-partition input"),
        "{out}"
    );
}

#[tokio::test]
async fn a_layout_dedup_topic_with_the_wrong_partition_count_is_an_error() {
    let brokers = common::brokers();
    let canonical = common::unique("canonical");
    let prefix = common::unique("sy");
    let admin = admin(&brokers);
    let dedup = format!("{prefix}.dedup");
    let layout = format!("{dedup}.p4");
    // Not made by switchyard: the 4-partition layout's topic with 2.
    create_topics(&admin, &[(&canonical, 4), (&dedup, 3), (&layout, 2)]).await;

    let dir = tempfile::tempdir().unwrap();
    let cfg = common::write_config(dir.path(), &config_text(&brokers, &canonical, &prefix));
    let out = common::switchyard()
        .args(["topics", "create", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("{layout} has 2 partitions but {canonical} has 4")),
        "{stderr}"
    );
}
