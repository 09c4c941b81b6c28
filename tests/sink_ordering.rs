//! `ordering = true`: the bookkeeping of parked people is bounded, and it
//! lives where it can be cleared, also with several sink instances.
//!
//! The two-instance test runs `switchyard run --role sink` processes in one
//! group with the tansu settings `tests/sink_handover.rs` explains (static
//! members, 10 s sessions, the eager `roundrobin` strategy the configuration
//! asks for).

mod common;

use std::collections::HashSet;
use std::process::Child;
use std::time::{Duration, Instant};

use common::fake_vendor::{FakeVendor, Reply};
use common::sink::*;

/// Kills the child however the test ends.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        common::kafka::sigkill(&mut self.0);
    }
}

/// The value of `series` (name and labels) in Prometheus text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// A child's Prometheus text, from the address its log names.
async fn child_metrics(log: &std::path::Path) -> String {
    let logs = std::fs::read_to_string(log).unwrap_or_default();
    let addr = logs
        .lines()
        .find(|l| l.contains("metrics endpoint listening"))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("bound=")))
        .unwrap_or_else(|| panic!("no metrics address in the log:\n{logs}"))
        .to_string();
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Deliveries keyed by their person with the murmur2 partitioner, as the
/// router writes them.
async fn produce_keyed(config: &switchyard::config::Config, events: &[(String, String)]) {
    let name = dest(config);
    let records: Vec<(Option<String>, Vec<u8>)> = events
        .iter()
        .map(|(id, user)| {
            (
                Some(user.clone()),
                serde_json::to_vec(&delivery(&name, id, user)).unwrap(),
            )
        })
        .collect();
    common::kafka::produce(&common::brokers(), &config.topics.deliver(&name), &records).await;
}

/// Event ids of the records on the destination's retry topic.
fn on_retry_topic(config: &switchyard::config::Config) -> Vec<String> {
    common::kafka::read_all(&common::brokers(), &config.topics.retry(&dest(config)))
        .iter()
        .map(|r| r.json()["event"]["event_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_instances_a_persons_parked_events_clear_and_later_ones_go_straight_out() {
    let _watchdog = common::watchdog("parked_two_instances", Duration::from_secs(400));
    let fake = FakeVendor::start(SECRET).await;
    // Three partitions: `roundrobin` gives deliver partition k and retry
    // partition k to different members of two.
    let s = setup_with(
        &fake,
        "batch_max_events = 10\nlinger = \"20ms\"\nordering = true\n\
         [destinations.hook.delivery.retry]\ninitial_backoff = \"2s\"\nmax_backoff = \"2s\"\npark_after = \"100ms\"\n",
        3,
        r#"consumer_properties = { "partition.assignment.strategy" = "roundrobin", "session.timeout.ms" = "10000", "heartbeat.interval.ms" = "1000" }"#,
    );
    ensure_topics(&s.config).await;
    let name = dest(&s.config);
    let log = |who: &str| s.dir.path().join(format!("{who}.log"));
    let logs = |who: &str| std::fs::read_to_string(log(who)).unwrap_or_default();
    let spawn = |who: &str| {
        Proc(common::kafka::spawn_switchyard(
            &[
                "--role",
                "sink",
                "--destination",
                &name,
                "--instance-id",
                &format!("{who}-{}", std::process::id()),
            ],
            &s.path,
            &log(who),
        ))
    };
    let mut a = spawn("a");
    wait_until("A is assigned partitions", Duration::from_secs(60), || {
        logs("a").contains("partitions assigned")
    })
    .await;
    let mut b = spawn("b");
    // Eager rebalancing: A gives everything up and gets its share again.
    wait_until("both share the partitions", Duration::from_secs(60), || {
        logs("b").contains("partitions assigned")
            && logs("a").matches("partitions assigned").count() >= 2
    })
    .await;

    // Every person's first event is refused once as retryable; the backoff
    // is beyond park_after, so it waits on the retry topic.
    let tag = common::unique("two");
    let people: Vec<String> = (0..6).map(|i| format!("{tag}-person-{i}")).collect();
    let firsts: Vec<(String, String)> = people
        .iter()
        .map(|p| (format!("{p}-first"), p.clone()))
        .collect();
    for (id, _) in &firsts {
        fake.fail_times(id, 1);
    }
    produce_keyed(&s.config, &firsts).await;
    wait_until(
        "the first events delivered",
        Duration::from_secs(60),
        || fake.delivered().is_superset(&ids(&firsts)),
    )
    .await;
    let parked: HashSet<String> = on_retry_topic(&s.config).into_iter().collect();
    assert!(
        !parked.is_empty(),
        "some first events waited on the retry topic"
    );

    // Their people's next events have nothing to wait behind.
    let seconds: Vec<(String, String)> = people
        .iter()
        .map(|p| (format!("{p}-second"), p.clone()))
        .collect();
    produce_keyed(&s.config, &seconds).await;
    wait_until(
        "the second events delivered",
        Duration::from_secs(60),
        || fake.delivered().is_superset(&ids(&seconds)),
    )
    .await;
    let detoured: Vec<String> = on_retry_topic(&s.config)
        .into_iter()
        .filter(|id| id.ends_with("-second"))
        .collect();
    assert!(
        detoured.is_empty(),
        "later events went through the retry topic behind events already delivered: {detoured:?}\n==== a\n{}\n==== b\n{}",
        logs("a"),
        logs("b")
    );

    // Neither instance keeps anyone parked.
    let series = format!("switchyard_sink_parked_events{{destination=\"{name}\"}}");
    let t = Instant::now();
    loop {
        let (ma, mb) = (
            child_metrics(&log("a")).await,
            child_metrics(&log("b")).await,
        );
        let (pa, pb) = (sample(&ma, &series), sample(&mb, &series));
        if pa == Some(0.0) && pb == Some(0.0) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "parked events still tracked: A {pa:?}, B {pb:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for p in [&mut a, &mut b] {
        let status = common::kafka::sigterm(&mut p.0, Duration::from_secs(40));
        assert!(status.is_some_and(|s| s.success()), "stops cleanly");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_events_are_bounded_and_new_deliveries_wait_for_room() {
    let _watchdog = common::watchdog("parked_bound", Duration::from_secs(300));
    let fake = FakeVendor::start(SECRET).await;
    // The vendor is down: every request is answered 503, come back in 3 s.
    fake.script(std::iter::repeat_n(
        Reply::Unavailable { retry_after_s: 3 },
        1000,
    ));
    const MAX_PARKED: usize = 4;
    // One event a batch, one batch in flight: at most three buffered.
    let s = setup(
        &fake,
        &format!(
            "batch_max_events = 1\nlinger = \"1ms\"\nmax_in_flight = 1\nordering = true\nmax_parked = {MAX_PARKED}\n\
             [destinations.hook.delivery.retry]\npark_after = \"100ms\"\n"
        ),
    );
    let tag = common::unique("bound");
    // Twenty people with one event each.
    let evs = events(&tag, 20, 20);
    ensure_topics(&s.config).await;
    produce(&s.config, &evs).await;
    let sink = start(&s.config).await;

    let sent = || -> HashSet<String> {
        fake.received()
            .iter()
            .flat_map(|r| r.events.iter().map(|(id, _)| id.clone()))
            .collect()
    };
    // Wait for parked events to come back and fail again twice: meanwhile,
    // without a bound, every event would have been read and sent.
    wait_until(
        "parked events tried three times",
        Duration::from_secs(60),
        || {
            let r = fake.received();
            sent().iter().any(|id| {
                r.iter()
                    .filter(|q| q.events.iter().any(|(e, _)| e == id))
                    .count()
                    >= 3
            })
        },
    )
    .await;
    let name = dest(&s.config);
    let parked = prometheus::gather()
        .iter()
        .find(|f| f.name() == "switchyard_sink_parked_events")
        .and_then(|f| {
            f.get_metric()
                .iter()
                .find(|m| m.get_label().iter().any(|l| l.value() == name))
                .map(|m| m.get_gauge().get_value())
        });
    // The bound, and what was already buffered or in flight when it was hit.
    let slack = 1 + 3;
    let tried = sent();
    assert!(
        tried.len() <= MAX_PARKED + slack,
        "{} of {} events were sent while the vendor was down",
        tried.len(),
        evs.len()
    );
    assert!(
        parked.is_some_and(|p| (1.0..=(MAX_PARKED + slack) as f64).contains(&p)),
        "parked gauge {parked:?}"
    );
    assert!(committed_on_deliver(&s.config) < evs.len() as i64);

    // The vendor is back: everything goes out, and nobody stays parked.
    fake.clear_script();
    wait_until("every event delivered", Duration::from_secs(60), || {
        fake.delivered().is_superset(&ids(&evs))
    })
    .await;
    sink.stop().await;
}
