//! Partitions moving between sink instances: two `switchyard run --role sink`
//! processes with their own `--instance-id` in one consumer group on a
//! multi-partition deliver topic; the second joins mid-stream while the
//! first has batches stuck at the vendor, then the first stops with SIGTERM
//! and comes back (a rolling restart).
//!
//! tansu 0.6.0 quirks shape this: it does not complete cooperative
//! rebalances, so the group uses the eager `roundrobin` strategy (every
//! rebalance revokes everything); it never expires a killed dynamic member,
//! so the members are static; and when a static member's session expires
//! it does not hand that member's partitions to the others (the survivor
//! gets its old assignment back), so a member that stops is tested coming
//! back under its id rather than leaving for good. A session of 6 s makes
//! tansu rebalance a static group endlessly; 10 s is stable.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use common::fake_vendor::{FakeVendor, Reply};
use common::sink::*;

const PARTITIONS: i32 = 4;
const EVENTS: usize = 600;

/// Kills the child however the test ends.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        common::kafka::sigkill(&mut self.0);
    }
}

/// SIGTERM off the async workers (the fake vendor must keep answering).
async fn sigterm(mut p: Proc) -> Option<std::process::ExitStatus> {
    tokio::task::spawn_blocking(move || common::kafka::sigterm(&mut p.0, Duration::from_secs(40)))
        .await
        .unwrap()
}

/// Samples the group's committed offsets until stopped; returns every
/// partition's changes in order, with when they were seen (since `t0`).
fn watch_commits(
    config: &switchyard::config::Config,
    stop: Arc<AtomicBool>,
    t0: Instant,
) -> std::thread::JoinHandle<HashMap<i32, Vec<(Duration, i64)>>> {
    let name = dest(config);
    let topic = config.topics.deliver(&name);
    let group = switchyard::sink::group_id(config, &name);
    std::thread::spawn(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", common::brokers())
            .set("group.id", &group)
            .create()
            .unwrap();
        let mut seen: HashMap<i32, Vec<(Duration, i64)>> = HashMap::new();
        while !stop.load(Ordering::Relaxed) {
            let mut tpl = rdkafka::TopicPartitionList::new();
            for p in 0..PARTITIONS {
                tpl.add_partition(&topic, p);
            }
            if let Ok(c) = consumer.committed_offsets(tpl, Duration::from_secs(5)) {
                for e in c.elements() {
                    if let Some(o) = e.offset().to_raw().filter(|o| *o >= 0) {
                        let v = seen.entry(e.partition()).or_default();
                        if v.last().map(|(_, last)| *last) != Some(o) {
                            v.push((t0.elapsed(), o));
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        seen
    })
}

/// [`wait_until`] that shows the sinks' logs when it times out.
async fn wait_or_show(
    what: &str,
    limit: Duration,
    logs: &[std::path::PathBuf],
    mut done: impl FnMut() -> bool,
) {
    let t = Instant::now();
    while !done() {
        if t.elapsed() > limit {
            for l in logs {
                eprintln!(
                    "==== {}\n{}",
                    l.display(),
                    std::fs::read_to_string(l).unwrap_or_default()
                );
            }
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn high_watermarks(topic: &str) -> Vec<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .create()
        .unwrap();
    (0..PARTITIONS)
        .map(|p| {
            c.fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_move_between_instances_without_loss_or_rewinds() {
    let fake = FakeVendor::start(SECRET).await;
    fake.set_delay(Duration::from_millis(100));
    let s = setup_with(
        &fake,
        "batch_max_events = 10\nlinger = \"20ms\"\nmax_in_flight = 2\nhandover_timeout = \"1s\"\n",
        PARTITIONS,
        r#"consumer_properties = { "partition.assignment.strategy" = "roundrobin", "session.timeout.ms" = "10000", "heartbeat.interval.ms" = "1000" }"#,
    );
    ensure_topics(&s.config).await;
    let name = dest(&s.config);
    let all = events(&common::unique("handover"), EVENTS, 60);
    let want = ids(&all);
    let t0 = Instant::now();
    let stop_watch = Arc::new(AtomicBool::new(false));
    let watcher = watch_commits(&s.config, stop_watch.clone(), t0);

    // A steady stream: 20 events every 300 ms, about 10 s in all (faster than
    // A drains while its batches are held, so it is paused at the handover).
    let feeder = {
        let config = s.config.clone();
        let all = all.clone();
        tokio::spawn(async move {
            for chunk in all.chunks(20) {
                produce(&config, chunk).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let log = |who: &str| s.dir.path().join(format!("{who}.log"));
    let spawn = |who: &str| {
        Proc(common::kafka::spawn_switchyard(
            &[
                "--role",
                "sink",
                "--destination",
                &name,
                "--instance-id",
                &format!("{}-{}", &who[..1], std::process::id()),
            ],
            &s.path,
            &log(who),
        ))
    };

    let a = spawn("a");
    let ok = tokio::time::timeout(Duration::from_secs(60), async {
        while fake.delivered().len() < 60 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        ok.is_ok(),
        "A delivered {} events; its log:\n{}",
        fake.delivered().len(),
        std::fs::read_to_string(log("a")).unwrap_or_default()
    );
    // A's next two batches (all it may have in flight) hang at the vendor
    // for longer than the handover waits: they are in flight at the handover.
    let before_slow = fake.received().len();
    fake.script([
        Reply::Slow(Duration::from_secs(5)),
        Reply::Slow(Duration::from_secs(5)),
    ]);
    let held = tokio::time::timeout(Duration::from_secs(30), async {
        while fake.received()[before_slow..]
            .iter()
            .filter(|r| r.answered.is_none())
            .count()
            < 2
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if held.is_err() {
        let statuses: Vec<(u16, usize, bool)> = fake.received()[before_slow..]
            .iter()
            .map(|r| (r.status, r.events.len(), r.answered.is_some()))
            .collect();
        panic!(
            "two batches were not held; since: {statuses:?}\nA's log:\n{}",
            std::fs::read_to_string(log("a")).unwrap_or_default()
        );
    }
    let slow: HashSet<String> = fake.received()[before_slow..]
        .iter()
        .filter(|r| r.answered.is_none())
        .flat_map(|r| r.events.iter().map(|(id, _)| id.clone()))
        .collect();
    let joined_at = t0.elapsed();
    let b = spawn("b");
    let logs = [log("a"), log("b")];
    wait_or_show(
        "B is assigned partitions",
        Duration::from_secs(60),
        &logs,
        || std::fs::read_to_string(log("b")).is_ok_and(|l| l.contains("partitions assigned")),
    )
    .await;
    let shared_at = t0.elapsed();
    // Both work side by side for a while, the stream still coming.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let left_at = t0.elapsed();
    let a_status = sigterm(a).await;
    // Back under its id, as after a deploy: static membership gives it its
    // partitions back (meanwhile they wait: they belong to nobody else).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a2 = spawn("a2");
    let logs = [log("a"), log("b"), log("a2")];
    wait_or_show(
        "every event delivered",
        Duration::from_secs(90),
        &logs,
        || fake.delivered().is_superset(&want),
    )
    .await;
    feeder.await.unwrap();
    let done_at = t0.elapsed();
    let b_status = sigterm(b).await;
    let a2_status = sigterm(a2).await;
    stop_watch.store(true, Ordering::Relaxed);
    let commits = watcher.join().unwrap();

    let a_log = std::fs::read_to_string(log("a")).unwrap();
    let b_log = std::fs::read_to_string(log("b")).unwrap();
    assert!(
        a_status.is_some_and(|s| s.success()),
        "A stops cleanly on SIGTERM: {a_status:?}\n{a_log}"
    );
    assert!(
        b_status.is_some_and(|s| s.success()),
        "B stops cleanly: {b_status:?}\n{b_log}"
    );
    assert!(a2_status.is_some_and(|s| s.success()));

    // Sends per event: more than one only for what was in flight at a handover.
    let received = fake.received();
    let mut sends: HashMap<&str, usize> = HashMap::new();
    for r in &received {
        for (id, _) in &r.events {
            *sends.entry(id.as_str()).or_default() += 1;
        }
    }
    let duplicates: HashSet<String> = sends
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| id.to_string())
        .collect();
    println!(
        "handover figures: {} events, {} requests, B started at {:.1}s and was assigned at {:.1}s, A stopped at {:.1}s (back 2 s later), all delivered at {:.1}s; \
         {} events in the 2 batches held over the handover, {} events sent twice; commit samples per partition: {:?}",
        EVENTS,
        received.len(),
        joined_at.as_secs_f64(),
        shared_at.as_secs_f64(),
        left_at.as_secs_f64(),
        done_at.as_secs_f64(),
        slow.len(),
        duplicates.len(),
        commits
            .iter()
            .map(|(p, v)| (*p, v.len()))
            .collect::<Vec<_>>()
    );
    assert!(
        duplicates.is_subset(&slow),
        "only events in flight at the handover are sent twice; others: {:?}",
        duplicates.difference(&slow).collect::<Vec<_>>()
    );
    assert_keys_are_event_ids(&fake);

    // A handed its partitions over when B joined, letting go of the held batches.
    assert!(a_log.contains("partitions handed over"), "{a_log}");
    assert!(
        a_log.contains("handover deadline passed"),
        "the held batches were let go uncommitted:\n{a_log}"
    );

    // No commit ever went back (a late commit by a former owner would), and
    // in the end everything read is committed.
    for (p, samples) in &commits {
        assert!(
            samples.windows(2).all(|w| w[0].1 <= w[1].1),
            "partition {p}'s committed offset went back: {samples:?}"
        );
    }
    // While both were assigned, both worked: every partition's commits
    // moved (none was left paused or unread after the handover).
    for p in 0..PARTITIONS {
        let moved = commits.get(&p).is_some_and(|s| {
            s.iter()
                .any(|(at, _)| *at > shared_at + Duration::from_secs(1) && *at < left_at)
        });
        assert!(
            moved,
            "partition {p} made no progress between the handover and A's stop: {:?}\n{a_log}",
            commits.get(&p)
        );
    }
    let ends = high_watermarks(&s.config.topics.deliver(&name));
    let last = committed(&s.config, &s.config.topics.deliver(&name));
    assert_eq!(last, ends, "everything is committed once delivered");
}
