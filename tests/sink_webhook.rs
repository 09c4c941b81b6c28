//! The sink against a real broker and a scripted fake webhook receiver.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::Message;
use switchyard::delivery::Delivery;
use switchyard::delivery::dead_letter::header;
use switchyard::sink::{self, dlq};

use common::fake_vendor::{FakeVendor, Reply};
use common::sink::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_through_failures_and_waits_out_retry_after() {
    let fake = FakeVendor::start(SECRET).await;
    fake.script([
        Reply::Status(500),
        Reply::TooMany { retry_after_s: 2 },
        Reply::Hang(Duration::from_secs(3)),
        Reply::Drop,
        Reply::Status(503),
        Reply::TooMany { retry_after_s: 2 },
    ]);
    // One batch in flight, so every request after a 429 was sent after it.
    let s = setup(
        &fake,
        "batch_max_events = 10\nlinger = \"20ms\"\nmax_in_flight = 1\nrequest_timeout = \"1s\"\n\
         [destinations.hook.delivery.retry]\ninitial_backoff = \"50ms\"\nmax_backoff = \"400ms\"\n",
    );
    let sink = start(&s.config).await;
    let evs = events(&common::unique("flaky"), 40, 5);
    produce(&s.config, &evs).await;
    let want = ids(&evs);
    wait_until("every event delivered", Duration::from_secs(90), || {
        fake.delivered().is_superset(&want)
    })
    .await;

    let received = fake.received();
    let statuses: Vec<u16> = received.iter().map(|r| r.status).collect();
    for s in [500, 429, 0, 503] {
        assert!(statuses.contains(&s), "script ran: {statuses:?}");
    }
    let mut throttles = 0;
    for (i, r) in received.iter().enumerate().filter(|(_, r)| r.status == 429) {
        let next = received[i + 1..]
            .iter()
            .map(|n| n.arrived)
            .min()
            .expect("a request follows every 429");
        let gap = next - r.answered.unwrap();
        assert!(gap >= Duration::from_secs(2), "gap after 429 was {gap:?}");
        throttles += 1;
    }
    assert_eq!(throttles, 2);
    assert_keys_are_event_ids(&fake);

    // Each outcome is in the ledger once the sink reports it delivered.
    let entries = ledger(&s.config).await;
    let delivered: HashSet<String> = entries
        .iter()
        .filter(|e| e["status"] == "delivered" && e["destination"] == dest(&s.config).as_str())
        .map(|e| e["event_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(delivered, want);
    sink.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_events_are_dead_lettered_and_redrive_delivers_them() {
    let fake = FakeVendor::start(SECRET).await;
    let tag = common::unique("refuse");
    let evs = events(&tag, 12, 3);
    let refused = [format!("{tag}-3"), format!("{tag}-7")];
    fake.refuse(&[&refused[0], &refused[1]]);
    let s = setup(&fake, "batch_max_events = 6\nlinger = \"20ms\"\n");
    let sink = start(&s.config).await;
    produce(&s.config, &evs).await;
    let rest: HashSet<String> = ids(&evs)
        .into_iter()
        .filter(|id| !refused.contains(id))
        .collect();
    wait_until("the others delivered", Duration::from_secs(60), || {
        fake.delivered().is_superset(&rest)
    })
    .await;

    let bootstrap = common::brokers();
    let mut letters = Vec::new();
    for _ in 0..100 {
        letters = dlq::read_all(&s.config, &bootstrap).await.unwrap();
        if letters.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        letters.len(),
        2,
        "exactly the refused events are dead-lettered"
    );
    let hdr = |l: &dlq::DeadLetter, k: &str| {
        l.headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_else(|| panic!("dead letter has header {k}"))
    };
    let mut dead: Vec<String> = Vec::new();
    for l in &letters {
        let d: Delivery = serde_json::from_slice(&l.payload).expect("whole payload kept");
        dead.push(d.event.event_id.clone());
        assert_eq!(l.destination, dest(&s.config));
        assert_eq!(l.stage, "sink");
        assert_eq!(l.error_class, "webhook_refused");
        assert!(hdr(l, header::REASON).contains("value must be positive"));
        assert!(hdr(l, header::RESPONSE).contains("value must be positive"));
        assert_eq!(hdr(l, header::HTTP_STATUS), "400");
        assert_eq!(hdr(l, header::ATTEMPTS), "1");
        assert_eq!(
            hdr(l, header::ORIGIN_TOPIC),
            s.config.topics.deliver(&dest(&s.config))
        );
        hdr(l, header::FIRST_ATTEMPT);
        hdr(l, header::LAST_ATTEMPT);
        hdr(l, header::ORIGIN_OFFSET);
    }
    dead.sort();
    assert_eq!(dead, refused.to_vec());
    assert!(
        fake.delivered()
            .is_disjoint(&refused.iter().cloned().collect())
    );

    // "Fix" the receiver, then redrive.
    fake.refuse(&[]);
    let name = dest(&s.config);
    let cli = |args: &[&str], path: &Path| {
        let path = path.to_path_buf();
        // "hook" stands for this test's destination name.
        let args: Vec<String> = args
            .iter()
            .map(|a| {
                if *a == "hook" {
                    name.clone()
                } else {
                    a.to_string()
                }
            })
            .collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = std::iter::once("dlq")
                .chain(args.iter().map(String::as_str))
                .collect();
            common::run_ok(&args, &path)
        })
    };
    let listed = cli(&["list"], &s.path).await.unwrap();
    assert!(listed.contains("webhook_refused"), "{listed}");
    assert!(listed.contains("2 dead letter(s)"), "{listed}");
    let dry = cli(
        &[
            "redrive",
            "--destination",
            "hook",
            "--error-class",
            "webhook_refused",
            "--dry-run",
        ],
        &s.path,
    )
    .await
    .unwrap();
    assert!(dry.contains("2 dead letter(s) would redrive"), "{dry}");
    let none = cli(
        &[
            "redrive",
            "--destination",
            "hook",
            "--error-class",
            "expired",
            "--dry-run",
        ],
        &s.path,
    )
    .await
    .unwrap();
    assert!(none.contains("0 dead letter(s)"), "{none}");
    let done = cli(
        &["redrive", "--destination", "hook", "--since", "1h"],
        &s.path,
    )
    .await
    .unwrap();
    assert!(done.contains("2 dead letter(s) redriven"), "{done}");
    let all = ids(&evs);
    wait_until("redriven events delivered", Duration::from_secs(60), || {
        fake.delivered().is_superset(&all)
    })
    .await;
    assert_keys_are_event_ids(&fake);
    sink.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrying_event_holds_back_the_same_persons_later_events() {
    let fake = FakeVendor::start(SECRET).await;
    let tag = common::unique("order");
    let first = format!("{tag}-u-first");
    let second = format!("{tag}-u-second");
    fake.fail_times(&first, 3);
    // Waits above park_after go through the retry topic, shorter ones stay
    // in memory: the jitter exercises both, and both must keep the order.
    let s = setup(
        &fake,
        "batch_max_events = 10\nlinger = \"20ms\"\nmax_in_flight = 2\nordering = true\n\
         [destinations.hook.delivery.retry]\ninitial_backoff = \"400ms\"\nmax_backoff = \"800ms\"\npark_after = \"250ms\"\n",
    );
    let sink = start(&s.config).await;
    let mut evs = vec![(first.clone(), "person-u".to_string())];
    evs.extend((0..4).map(|i| (format!("{tag}-v{i}"), format!("person-v{i}"))));
    evs.push((second.clone(), "person-u".to_string()));
    produce(&s.config, &evs).await;
    let all = ids(&evs);
    wait_until("every event delivered", Duration::from_secs(60), || {
        fake.delivered().is_superset(&all)
    })
    .await;

    let received = fake.received();
    let accepted_at = |id: &str| {
        received
            .iter()
            .filter(|r| r.accepted.iter().any(|a| a == id))
            .map(|r| r.answered.unwrap())
            .min()
            .unwrap()
    };
    let first_sent_at = |id: &str| {
        received
            .iter()
            .filter(|r| r.events.iter().any(|(e, _)| e == id))
            .map(|r| r.arrived)
            .min()
            .unwrap()
    };
    let attempts_first = received
        .iter()
        .filter(|r| r.events.iter().any(|(e, _)| *e == first))
        .count();
    assert_eq!(attempts_first, 4, "three refusals, then accepted");
    let t0 = received[0].arrived;
    let log: Vec<String> = received
        .iter()
        .map(|r| {
            format!(
                "{}ms {} accepted={:?} sent={:?}",
                (r.arrived - t0).as_millis(),
                r.status,
                r.accepted,
                r.events.iter().map(|(e, _)| e).collect::<Vec<_>>()
            )
        })
        .collect();
    assert!(
        first_sent_at(&second) > accepted_at(&first),
        "the person's second event was sent before the first was delivered:\n{}",
        log.join("\n")
    );
    for i in 0..4 {
        assert!(
            accepted_at(&format!("{tag}-v{i}")) < accepted_at(&first),
            "other people keep flowing while one retries"
        );
    }
    sink.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_batch_resends_only_the_batch_in_flight() {
    let fake = FakeVendor::start(SECRET).await;
    fake.set_delay(Duration::from_millis(300));
    let s = setup(
        &fake,
        "batch_max_events = 20\nlinger = \"20ms\"\nmax_in_flight = 1\n",
    );
    ensure_topics(&s.config).await;
    let evs = events(&common::unique("kill"), 200, 17);
    produce(&s.config, &evs).await;
    let instance = common::unique("killed");
    let mut child = spawn_sink(&s.path, &dest(&s.config), &instance);
    wait_until(
        "a batch in flight after a few were delivered",
        Duration::from_secs(60),
        || fake.received().len() >= 3 && !fake.holding().is_empty(),
    )
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = fake.received().len();
    let in_flight: HashSet<String> = fake
        .holding()
        .iter()
        .flat_map(|r| r.events.iter().map(|(id, _)| id.clone()))
        .collect();
    assert!(!in_flight.is_empty());

    let mut child = spawn_sink(&s.path, &dest(&s.config), &instance);
    let all = ids(&evs);
    wait_until(
        "every event delivered after the restart",
        Duration::from_secs(90),
        || fake.delivered().is_superset(&all),
    )
    .await;
    // SIGTERM: the sink finishes and exits cleanly.
    let term = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(term.success());
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "graceful shutdown exits 0: {status}");

    let received = fake.received();
    let sent = |rs: &[common::fake_vendor::Received]| -> HashSet<String> {
        rs.iter()
            .flat_map(|r| r.events.iter().map(|(id, _)| id.clone()))
            .collect()
    };
    let before_kill = sent(&received[..before]);
    let after_restart = sent(&received[before..]);
    let duplicates: HashSet<String> = before_kill.intersection(&after_restart).cloned().collect();
    assert!(
        duplicates.is_subset(&in_flight),
        "only the batch in flight is sent twice; extra: {:?}",
        duplicates.difference(&in_flight).collect::<Vec<_>>()
    );
    assert!(
        in_flight.is_subset(&after_restart),
        "the in-flight batch's outcome was never durable, so it is sent again"
    );
    assert_keys_are_event_ids(&fake);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_of_any_size_dead_letters_and_never_freezes_the_destination() {
    let fake = FakeVendor::start(SECRET).await;
    fake.script([Reply::TooMany {
        retry_after_s: u64::MAX,
    }]);
    let s = setup(
        &fake,
        "batch_max_events = 50\nlinger = \"300ms\"\nmax_in_flight = 1\n\
         [destinations.hook.delivery.retry]\ninitial_backoff = \"50ms\"\nmax_backoff = \"200ms\"\n",
    );
    let tag = common::unique("huge-wait");
    let first = events(&tag, 10, 2);
    ensure_topics(&s.config).await;
    produce(&s.config, &first).await;
    let sink = start(&s.config).await;

    // The events of the answered request are past any budget: dead letters.
    let bootstrap = common::brokers();
    let mut letters = Vec::new();
    for _ in 0..300 {
        letters = dlq::read_all(&s.config, &bootstrap).await.unwrap();
        if !letters.is_empty() && letters.len() + fake.delivered().len() >= first.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!letters.is_empty(), "the 429's events are dead-lettered");
    assert!(
        letters.iter().all(|l| l.error_class == "retries_exhausted"),
        "{:?}",
        letters.iter().map(|l| &l.error_class).collect::<Vec<_>>()
    );
    let mut outcomes: HashSet<String> = fake.delivered();
    for l in &letters {
        let d: Delivery = serde_json::from_slice(&l.payload).unwrap();
        outcomes.insert(d.event.event_id);
    }
    assert_eq!(outcomes, ids(&first), "every event has one outcome");

    // The destination paused for at most the backoff maximum, not forever.
    let later = events(&format!("{tag}-later"), 10, 2);
    produce(&s.config, &later).await;
    wait_until("later events delivered", Duration::from_secs(30), || {
        fake.delivered().is_superset(&ids(&later))
    })
    .await;
    sink.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vendors_error_text_of_any_size_is_cut_and_the_sink_keeps_delivering() {
    let fake = FakeVendor::start(SECRET).await;
    // The first request is refused with a body that never ends.
    fake.script([Reply::Endless(400)]);
    let tag = common::unique("huge-text");
    let refused = format!("{tag}-refused");
    // A 3 MB reason of two-byte characters, far beyond any Kafka record.
    fake.refuse_with(&[&refused], &"é".repeat(1_500_000));
    let s = setup(
        &fake,
        "batch_max_events = 50\nlinger = \"100ms\"\nmax_in_flight = 1\nrequest_timeout = \"3s\"\n\
         [destinations.hook.delivery.retry]\nmax_attempts = 2\ninitial_backoff = \"50ms\"\nmax_backoff = \"100ms\"\n",
    );
    let sink = start(&s.config).await;
    let endless = format!("{tag}-endless");
    produce(&s.config, &[(endless.clone(), "user-a".into())]).await;

    let bootstrap = common::brokers();
    let letter_of = async |id: &str| {
        for _ in 0..300 {
            let letters = dlq::read_all(&s.config, &bootstrap).await.unwrap();
            if let Some(l) = letters.into_iter().find(|l| {
                serde_json::from_slice::<Delivery>(&l.payload).is_ok_and(|d| d.event.event_id == id)
            }) {
                return l;
            }
            assert!(!sink.handle.is_finished(), "the sink stopped");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no dead letter for {id}");
    };
    let hdr = |l: &dlq::DeadLetter, k: &str| {
        let v = l
            .headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("dead letter has header {k}"));
        String::from_utf8(v).expect("cut on a character boundary")
    };

    // The endless body is read up to a cap, and the 400 counts.
    let l = letter_of(&endless).await;
    assert_eq!(l.error_class, "http_400");
    assert_eq!(hdr(&l, header::ATTEMPTS), "1");
    for k in [header::REASON, header::RESPONSE] {
        let v = hdr(&l, k);
        assert!(v.len() <= 4096, "{k} is {} bytes", v.len());
        assert!(v.contains("(cut, "), "{k} says it was cut: {v}");
    }

    let rest = events(&tag, 6, 2);
    let mut evs = vec![(refused.clone(), "user-b".to_string())];
    evs.extend(rest.iter().cloned());
    produce(&s.config, &evs).await;
    let l = letter_of(&refused).await;
    assert_eq!(l.error_class, "webhook_refused");
    let reason = hdr(&l, header::REASON);
    assert!(reason.len() <= 4096, "reason is {} bytes", reason.len());
    assert!(reason.contains("éé"), "{reason}");
    assert!(reason.contains("(cut, "), "{reason}");

    wait_until("the others delivered", Duration::from_secs(60), || {
        fake.delivered().is_superset(&ids(&rest))
    })
    .await;
    let later = events(&format!("{tag}-later"), 4, 2);
    produce(&s.config, &later).await;
    wait_until("later events delivered", Duration::from_secs(60), || {
        fake.delivered().is_superset(&ids(&later))
    })
    .await;
    sink.stop().await;
}

/// A deliver record no router wrote (too large for any producer to copy)
/// is dead-lettered cut, as the router cuts oversize input, instead of
/// failing the sink over and over; the events behind it are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deliver_record_too_large_to_copy_is_dead_lettered_cut_and_the_sink_carries_on() {
    let fake = FakeVendor::start(SECRET).await;
    let s = setup(&fake, "linger = \"20ms\"\n");
    let brokers = common::brokers();
    let tag = common::unique("foreign");
    // On Kafka, topics switchyard creates refuse such a record; one
    // made before (or by someone else) with the broker's defaults does not.
    let deliver = s.config.topics.deliver(&dest(&s.config));
    common::kafka::create_topic(&brokers, &deliver, 2).await;
    let huge_key = format!("{tag}-{}", "k".repeat(4000));
    common::kafka::produce(
        &brokers,
        &deliver,
        &[(Some(huge_key), vec![b'x'; 1_500_000])],
    )
    .await;
    let sink = start(&s.config).await;
    let after = events(&tag, 5, 2);
    produce(&s.config, &after).await;
    wait_until(
        "the events behind it delivered",
        Duration::from_secs(60),
        || fake.delivered().is_superset(&ids(&after)),
    )
    .await;
    let mut letter = None;
    for _ in 0..300 {
        let letters = dlq::read_all(&s.config, &brokers).await.unwrap();
        letter = letters.into_iter().find(|l| {
            l.headers
                .iter()
                .any(|(k, v)| k == header::ORIGIN_SIZE && v.starts_with(b"15"))
        });
        if letter.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let l = letter.expect("a dead letter for the oversize record");
    assert!(l.payload.len() <= 64 * 1024, "{} bytes", l.payload.len());
    assert!(
        l.headers
            .iter()
            .any(|(k, v)| k == header::TRUNCATED && v == b"true")
    );
    assert!(!sink.handle.is_finished(), "the sink stopped");
    sink.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_waits_park_on_the_retry_topic_and_exhausted_budgets_dead_letter() {
    let fake = FakeVendor::start(SECRET).await;
    fake.script([Reply::TooMany { retry_after_s: 6 }]);
    let tag = common::unique("park");
    let hopeless = format!("{tag}-hopeless");
    fake.fail_times(&hopeless, 1000);
    let s = setup(
        &fake,
        "batch_max_events = 50\nlinger = \"500ms\"\nmax_in_flight = 1\n\
         [destinations.hook.delivery.retry]\nmax_attempts = 3\ninitial_backoff = \"50ms\"\nmax_backoff = \"100ms\"\npark_after = \"1s\"\n",
    );
    let mut evs = events(&tag, 20, 4);
    evs.push((hopeless.clone(), "user-x".into()));
    ensure_topics(&s.config).await;
    produce(&s.config, &evs).await;
    let sink = start(&s.config).await;

    wait_until("the first request", Duration::from_secs(30), || {
        !fake.received().is_empty()
    })
    .await;
    // While the vendor asks for 6 s, the events wait on the retry topic and
    // the deliver topic's offsets commit.
    wait_until("deliver offsets committed", Duration::from_secs(5), || {
        committed_on_deliver(&s.config) == evs.len() as i64
    })
    .await;
    assert!(fake.delivered().is_empty(), "nothing is due yet");
    let retry_topic = s.config.topics.retry(&dest(&s.config));
    let kafka = s.config.kafka.clone();
    let parked = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        sink::scan::scan_topic(&kafka, &common::brokers(), &retry_topic, |m| {
            use rdkafka::message::Headers;
            let hs = m.headers().unwrap();
            let get = |k: &str| {
                hs.iter()
                    .find(|h| h.key == k)
                    .map(|h| String::from_utf8_lossy(h.value.unwrap()).into_owned())
            };
            out.push((
                get(header::DUE),
                get(header::ATTEMPTS),
                get(header::REQUEUED_AT).is_some(),
            ));
        })
        .unwrap();
        out
    })
    .await
    .unwrap();
    // Read back before they are due (6 s is beyond park_after), the records
    // are written back to the end of the partition, unchanged.
    let parked_first = parked.iter().filter(|(_, _, requeued)| !requeued).count();
    assert_eq!(parked_first, evs.len(), "the whole batch was parked");
    for (due, attempts, _) in &parked {
        assert!(due.is_some());
        assert_eq!(attempts.as_deref(), Some("1"));
    }

    let good: HashSet<String> = ids(&evs).into_iter().filter(|i| *i != hopeless).collect();
    wait_until("due events delivered", Duration::from_secs(30), || {
        fake.delivered().is_superset(&good)
    })
    .await;
    let first_ok = fake
        .received()
        .iter()
        .find(|r| r.status == 200)
        .map(|r| r.arrived)
        .unwrap();
    let throttled_at = fake.received()[0].answered.unwrap();
    assert!(first_ok - throttled_at >= Duration::from_secs(6));

    let bootstrap = common::brokers();
    let mut letters = Vec::new();
    for _ in 0..100 {
        letters = dlq::read_all(&s.config, &bootstrap).await.unwrap();
        if !letters.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].error_class, "retries_exhausted");
    let d: Delivery = serde_json::from_slice(&letters[0].payload).unwrap();
    assert_eq!(d.event.event_id, hopeless);

    // The sink runs in this process, so its metrics are in this registry.
    let name = dest(&s.config);
    let metric = |family: &str, labels: &[(&str, &str)]| -> Option<f64> {
        prometheus::gather()
            .iter()
            .find(|f| f.name() == family)?
            .get_metric()
            .iter()
            .find(|m| {
                labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                })
            })
            // A counter's gauge part is empty and vice versa.
            .map(|m| m.get_counter().get_value() + m.get_gauge().get_value())
    };
    let by_dest = [("destination", name.as_str())];
    assert_eq!(
        metric(
            "switchyard_sink_requests_total",
            &[("destination", name.as_str()), ("status_class", "4xx")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            "switchyard_sink_events_total",
            &[("destination", name.as_str()), ("outcome", "delivered")]
        ),
        Some(20.0)
    );
    assert_eq!(
        metric(
            "switchyard_dlq_writes_total",
            &[
                ("destination", name.as_str()),
                ("error_class", "retries_exhausted")
            ]
        ),
        Some(1.0)
    );
    assert!(metric("switchyard_sink_consumer_lag_records", &by_dest).is_some());
    sink.stop().await;
}

/// Request start times at the fake, in order, with each request's status and
/// when it was answered.
fn request_starts(fake: &FakeVendor) -> Vec<common::fake_vendor::Received> {
    let mut r = fake.received();
    r.sort_by_key(|r| r.arrived);
    r
}

fn mean_gap(starts: &[Instant]) -> Duration {
    (starts[starts.len() - 1] - starts[0]) / (starts.len() as u32 - 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_follow_the_configured_rate_and_slow_down_after_a_429() {
    let fake = FakeVendor::start(SECRET).await;
    let mut script = vec![Reply::Status(200); 30];
    script.push(Reply::TooMany { retry_after_s: 1 });
    fake.script(script);
    // One event per request, several in flight: only the pace spaces them.
    let s = setup(
        &fake,
        "batch_max_events = 1\nlinger = \"1ms\"\nmax_in_flight = 4\n\
         [destinations.hook.delivery.rate_limit]\nrequests_per_second = 10\n",
    );
    ensure_topics(&s.config).await;
    let evs = events(&common::unique("rate"), 70, 7);
    produce(&s.config, &evs).await;
    let sink = start(&s.config).await;
    let want = ids(&evs);
    wait_until("every event delivered", Duration::from_secs(60), || {
        fake.delivered().is_superset(&want)
    })
    .await;
    sink.stop().await;

    let r = request_starts(&fake);
    let starts: Vec<Instant> = r.iter().map(|r| r.arrived).collect();
    let interval = Duration::from_millis(100);
    // A second's worth of burst, then the configured rate. The rate is
    // measured over the ten requests before the 429: a pause in reading
    // the topic (the first fetch may return only some partitions) lets the
    // bucket save up a second burst, as it should, so the requests right
    // after the first burst do not show the steady rate.
    let burst = starts[9] - starts[0];
    let steady_rate = 9.0 / (starts[29] - starts[20]).as_secs_f64();
    let i429 = r.iter().position(|r| r.status == 429).unwrap();
    assert_eq!(i429, 30);
    let pause = starts[i429 + 1] - r[i429].answered.unwrap();
    let after = &starts[i429 + 1..];
    let gaps: Vec<u128> = after
        .windows(2)
        .take(12)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    let slowed = mean_gap(&after[..4]);
    let recovered = mean_gap(&after[12..after.len().min(30)]);
    println!(
        "rate figures: burst of 10 in {burst:?}; steady {steady_rate:.2} requests/s (configured 10); \
         after the 429: pause {pause:?}, gaps (ms) {gaps:?}, mean gap of the first 3 {slowed:?}, later {recovered:?}"
    );
    assert!(burst < Duration::from_millis(300), "{burst:?}");
    assert!(
        (8.5..=10.5).contains(&steady_rate),
        "requests/s {steady_rate:.2}"
    );
    assert!(pause >= Duration::from_secs(1), "Retry-After: {pause:?}");
    assert!(
        slowed >= interval * 3 / 2,
        "the pace drops after a 429: {gaps:?}"
    );
    assert!(
        recovered >= interval * 9 / 10 && recovered <= interval * 6 / 5,
        "and recovers to the configured rate: {recovered:?} ({gaps:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_per_second_caps_the_events_sent() {
    let fake = FakeVendor::start(SECRET).await;
    let s = setup(
        &fake,
        "batch_max_events = 10\nlinger = \"50ms\"\nmax_in_flight = 2\n\
         [destinations.hook.delivery.rate_limit]\nevents_per_second = 40\n",
    );
    ensure_topics(&s.config).await;
    let evs = events(&common::unique("eps"), 200, 20);
    produce(&s.config, &evs).await;
    let sink = start(&s.config).await;
    let want = ids(&evs);
    wait_until("every event delivered", Duration::from_secs(60), || {
        fake.delivered().is_superset(&want)
    })
    .await;
    sink.stop().await;

    let r = request_starts(&fake);
    // After the first second's worth (40 events), 40 events/s: measure from
    // the first request past the burst to the last.
    let mut sent = 0;
    let first = r
        .iter()
        .position(|x| {
            sent += x.events.len();
            sent > 40
        })
        .unwrap();
    let events_after: usize = r[first + 1..].iter().map(|x| x.events.len()).sum();
    let span = r.last().unwrap().arrived - r[first].arrived;
    let rate = events_after as f64 / span.as_secs_f64();
    println!(
        "events/s figures: {} requests, {events_after} events after the burst in {span:?}: {rate:.1} events/s (configured 40)",
        r.len()
    );
    assert!((34.0..=42.0).contains(&rate), "events/s {rate:.1}");
}

/// Writes deliveries straight onto the destination's retry topic (partition
/// 0, in order, together), each due at its time, as a sink parks them.
async fn park(
    config: &switchyard::config::Config,
    records: &[(String, chrono::DateTime<chrono::Utc>)],
) {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .create()
        .unwrap();
    let name = dest(config);
    let topic = config.topics.retry(&name);
    let mut acks = Vec::new();
    for (id, due) in records {
        let payload = serde_json::to_vec(&delivery(&name, id, "person-r")).unwrap();
        let first = (chrono::Utc::now() - chrono::Duration::seconds(30)).to_rfc3339();
        let due = due.to_rfc3339();
        fn h<'a>(key: &'a str, v: &'a str) -> Header<'a, &'a [u8]> {
            Header {
                key,
                value: Some(v.as_bytes()),
            }
        }
        let headers = OwnedHeaders::new()
            .insert(h(header::DUE, &due))
            .insert(h(header::ATTEMPTS, "1"))
            .insert(h(header::FIRST_ATTEMPT, &first))
            .insert(h(header::LAST_ATTEMPT, &first))
            .insert(h(header::REASON, "HTTP 503"));
        acks.push(
            producer
                .send_result(
                    FutureRecord::to(&topic)
                        .partition(0)
                        .key("person-r")
                        .payload(&payload)
                        .headers(headers),
                )
                .map_err(|(e, _)| e)
                .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_off_retry_does_not_hold_up_the_nearer_ones_behind_it() {
    let fake = FakeVendor::start(SECRET).await;
    let s = setup(
        &fake,
        "batch_max_events = 10\nlinger = \"20ms\"\n\
         [destinations.hook.delivery.retry]\npark_after = \"5s\"\n",
    );
    let sink = start(&s.config).await;
    // The sink is up once a first delivery went through.
    let tag = common::unique("retry-order");
    let probe = events(&format!("{tag}-probe"), 1, 1);
    produce(&s.config, &probe).await;
    let probe = ids(&probe);
    wait_until("the sink is up", Duration::from_secs(60), || {
        fake.delivered().is_superset(&probe)
    })
    .await;

    // One partition, in this order: one due in 25 s, three due in 3 s, three
    // already due. Read in order, the far one used to hold up the rest.
    let now = chrono::Utc::now();
    let at = |s: i64| now + chrono::Duration::seconds(s);
    let far = format!("{tag}-far");
    let near: Vec<String> = (0..3).map(|i| format!("{tag}-near{i}")).collect();
    let due: Vec<String> = (0..3).map(|i| format!("{tag}-due{i}")).collect();
    let mut records = vec![(far.clone(), at(25))];
    records.extend(near.iter().map(|id| (id.clone(), at(3))));
    records.extend(due.iter().map(|id| (id.clone(), at(-1))));
    let t0 = Instant::now();
    park(&s.config, &records).await;

    let sent_at = |id: &str| {
        fake.received()
            .iter()
            .filter(|r| r.events.iter().any(|(e, _)| e == id))
            .map(|r| r.arrived)
            .min()
    };
    wait_until("the due ones delivered", Duration::from_secs(5), || {
        fake.delivered().is_superset(&due.iter().cloned().collect())
    })
    .await;
    let due_after = t0.elapsed();
    wait_until("the near ones delivered", Duration::from_secs(10), || {
        fake.delivered()
            .is_superset(&near.iter().cloned().collect())
    })
    .await;
    let near_after = near.iter().filter_map(|id| sent_at(id)).min().unwrap() - t0;
    // The far record went back to the end of the partition, so the
    // partition's offsets commit past it long before it is due.
    let retry_topic = s.config.topics.retry(&dest(&s.config));
    wait_until("retry offsets committed", Duration::from_secs(5), || {
        committed(&s.config, &retry_topic)[0] >= records.len() as i64
    })
    .await;
    let committed_after = t0.elapsed();
    assert!(sent_at(&far).is_none(), "not sent before it is due");

    // A record parked behind the far one's copy while the partition waits
    // out a lap is read at most park_after (5 s) after it is due.
    let late = format!("{tag}-late");
    let late_due = Instant::now() + Duration::from_secs(1);
    park(
        &s.config,
        &[(
            late.clone(),
            chrono::Utc::now() + chrono::Duration::seconds(1),
        )],
    )
    .await;
    let late_set: HashSet<String> = [late.clone()].into();
    wait_until("the later one delivered", Duration::from_secs(10), || {
        fake.delivered().is_superset(&late_set)
    })
    .await;
    let late_by = sent_at(&late).unwrap().saturating_duration_since(late_due);

    let far_set: HashSet<String> = [far.clone()].into();
    wait_until("the far one delivered", Duration::from_secs(40), || {
        fake.delivered().is_superset(&far_set)
    })
    .await;
    let far_after = sent_at(&far).unwrap() - t0;
    sink.stop().await;
    let kafka = s.config.kafka.clone();
    let copies = tokio::task::spawn_blocking(move || {
        let mut n = 0;
        sink::scan::scan_topic(&kafka, &common::brokers(), &retry_topic, |m| {
            use rdkafka::message::Headers;
            n += usize::from(
                m.headers()
                    .is_some_and(|h| h.iter().any(|h| h.key == header::REQUEUED_AT)),
            );
        })
        .unwrap();
        n
    })
    .await
    .unwrap();
    println!(
        "retry order figures: due ones delivered after {due_after:?}, near ones (due at 3 s) sent at {near_after:?}, \
         retry offsets committed past the far one after {committed_after:?}, far one (due at 25 s) sent at {far_after:?}, \
         {copies} copies written back while it waited; a record parked during a lap was sent {late_by:?} after due"
    );
    assert!(late_by <= Duration::from_secs(6), "{late_by:?}");
    assert!(near_after >= Duration::from_millis(2900), "not before due");
    assert!(far_after >= Duration::from_secs(25) - Duration::from_millis(100));
    assert!(far_after <= Duration::from_secs(30), "{far_after:?}");
    // Written back when first read, then per lap (a pause of at most
    // park_after, 5 s) until it is within park_after of due: a lap writes
    // back every far record once, plus once more the one that ends it (here
    // the same record), so about 2 × 20 s / 5 s.
    assert!(
        (1..=12).contains(&copies),
        "written back once or twice per lap, not in a loop: {copies}"
    );
}
