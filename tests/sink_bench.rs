//! `switchyard bench sink` prints its figures and ends with one JSON object.

mod common;

#[test]
fn bench_sink_ends_with_one_json_object() {
    let out = common::switchyard()
        .args(["bench", "sink", "--events", "3000"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap();
    let figures: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(figures["bench"], "sink");
    assert_eq!(figures["a_events"], 3000);
    assert!(figures["a_events_per_core_s"].as_f64().unwrap() > 0.0);
    // Mixpanel's pass ran into its stand-in, which answers an error to any
    // request it would refuse (and the pass then fails the command).
    assert!(figures["a_mixpanel_events_per_core_s"].as_f64().unwrap() > 0.0);
    // The stand-in's CPU is counted apart from the sink's, on its own thread.
    assert!(
        figures["a_mixpanel_stand_in_events_per_core_s"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(
        stdout.contains("(a) Mixpanel into its validating stand-in"),
        "{stdout}"
    );
    // Without kafka.brokers only the in-memory figure is measured.
    assert!(figures["b_events_per_s"].is_null());
    assert!(stdout.contains("(a) in memory"), "{stdout}");
    // (d) needs no broker: every event of the GA4-shaped batch was
    // delivered at both concurrencies (it fails the command otherwise).
    assert_eq!(figures["d_events"], 200);
    assert!(figures["d_events_per_s_concurrency_1"].as_f64().unwrap() > 0.0);
    assert!(figures["d_events_per_s_concurrency_16"].as_f64().unwrap() > 0.0);
    assert!(stdout.contains("(d) GA4-shaped"), "{stdout}");
}
