//! The command line's contract: exit codes and one clear error line per problem.

mod common;

use std::io::Write;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

/// Runs a command, failing the test (instead of hanging it) after `limit`.
fn run_bounded(mut cmd: std::process::Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("command still running after {limit:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn error_lines(o: &Output) -> Vec<String> {
    stderr(o)
        .lines()
        .filter(|l| l.starts_with("error:"))
        .map(String::from)
        .collect()
}

fn no_panic(o: &Output) {
    assert!(!stderr(o).contains("panicked"), "panic:\n{}", stderr(o));
}

#[test]
fn malformed_config_is_one_clear_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::write_config(dir.path(), "[kafka\nbrokers = \"x:1\"\n");
    let mut cmd = common::switchyard();
    cmd.args(["check", "--config"]).arg(&cfg);
    let o = run_bounded(cmd, Duration::from_secs(30));
    no_panic(&o);
    assert_eq!(o.status.code(), Some(1));
    let lines = error_lines(&o);
    assert_eq!(lines.len(), 1, "{}", stderr(&o));
    assert!(
        lines[0].contains("switchyard.toml") && lines[0].contains("line 1"),
        "{}",
        lines[0]
    );
}

#[test]
fn check_lists_every_problem_with_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::write_config(
        dir.path(),
        r#"
[router]
dedup_window = "forever"
[destinations.meta]
type = "meta_capi"
pixel_id = "12345"
access_token = "${SWITCHYARD_TEST_UNSET_TOKEN}"
[destinations.ga]
type = "ga4"
measurement_id = "UA-1"
api_secret = "s"
"#,
    );
    let mut cmd = common::switchyard();
    cmd.args(["check", "--config"])
        .arg(&cfg)
        .env_remove("SWITCHYARD_TEST_UNSET_TOKEN");
    let o = run_bounded(cmd, Duration::from_secs(30));
    no_panic(&o);
    assert_eq!(o.status.code(), Some(1));
    let lines = error_lines(&o);
    assert_eq!(lines.len(), 3, "{}", stderr(&o));
    for (key, words) in [
        ("router.dedup_window", "forever"),
        (
            "destinations.meta.access_token",
            "SWITCHYARD_TEST_UNSET_TOKEN is not set",
        ),
        ("destinations.ga.measurement_id", "G-"),
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.contains("switchyard.toml") && l.contains(key) && l.contains(words)),
            "no line names {key}: {lines:#?}"
        );
    }
}

#[test]
fn check_rejects_unknown_librdkafka_properties() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::write_config(
        dir.path(),
        "[kafka.properties]\n\"socket.timeout.msec\" = 1000\n",
    );
    let mut cmd = common::switchyard();
    cmd.args(["check", "--config"]).arg(&cfg);
    let o = run_bounded(cmd, Duration::from_secs(30));
    no_panic(&o);
    assert_eq!(o.status.code(), Some(1));
    let lines = error_lines(&o);
    assert_eq!(lines.len(), 1, "{}", stderr(&o));
    assert!(lines[0].contains("socket.timeout.msec"), "{}", lines[0]);
}

#[test]
fn check_prints_a_summary_for_a_good_config() {
    let mut cmd = common::switchyard();
    cmd.args(["check", "--config"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/switchyard.example.toml"
        ))
        .env("META_ACCESS_TOKEN", "t")
        .env("TIKTOK_ACCESS_TOKEN", "t")
        .env("GOOGLE_ADS_DEVELOPER_TOKEN", "t")
        .env("GOOGLE_ADS_ACCESS_TOKEN", "t")
        .env("GA4_API_SECRET", "t")
        .env("MIXPANEL_SA_SECRET", "t")
        .env("POSTHOG_PROJECT_API_KEY", "phc_0123456789")
        .env("AMPLITUDE_API_KEY", "0123456789abcdef0123456789abcdef")
        .env("CUSTOMERIO_SITE_ID", "site-1")
        .env("CUSTOMERIO_TRACK_API_KEY", "t")
        .env("KLAVIYO_PRIVATE_API_KEY", "pk_0123456789")
        .env("WEBHOOK_SECRET", "0123456789abcdef0123")
        .env("INGEST_KEY_CHECKOUT", "ck_0123456789abcdef")
        .env("INGEST_KEY_STAGING", "st_0123456789abcdef")
        .env("SEGMENT_WEBHOOK_SECRET", "whsec_0123456789abcdef");
    let o = run_bounded(cmd, Duration::from_secs(30));
    no_panic(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}\n{out}", stderr(&o));
    for word in [
        "switchyard.dedup",
        "compact",
        "meta_capi",
        "ga4",
        "mixpanel",
        "posthog",
        "amplitude",
        "customerio",
        "klaviyo",
        "webhook",
    ] {
        assert!(out.contains(word), "summary lacks {word}:\n{out}");
    }
    assert!(
        !out.contains("0123456789abcdef0123"),
        "summary prints a secret"
    );
}

#[test]
fn unreachable_broker_is_one_clear_line_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    // Port 9 on loopback: nothing listens there.
    let cfg = common::write_config(dir.path(), "[kafka]\nbrokers = \"127.0.0.1:9\"\n");
    let mut cmd = common::switchyard();
    cmd.args(["topics", "create", "--config"]).arg(&cfg);
    let o = run_bounded(cmd, Duration::from_secs(60));
    no_panic(&o);
    assert_eq!(o.status.code(), Some(1));
    let lines = error_lines(&o);
    assert_eq!(lines.len(), 1, "{}", stderr(&o));
    assert!(
        lines[0].contains("cannot reach Kafka at 127.0.0.1:9"),
        "{}",
        lines[0]
    );
}

#[test]
fn missing_config_file_is_one_line() {
    let mut cmd = common::switchyard();
    cmd.args(["check", "--config", "/nonexistent/switchyard.toml"]);
    let o = run_bounded(cmd, Duration::from_secs(30));
    no_panic(&o);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(error_lines(&o).len(), 1, "{}", stderr(&o));
}

fn validate_stdin(input: &str) -> Output {
    validate_stdin_with(&[], input)
}

fn validate_stdin_with(flags: &[&str], input: &str) -> Output {
    let mut child = common::switchyard()
        .arg("validate")
        .args(flags)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn validate_exit_codes() {
    let ok =
        r#"{"event":"lead","event_id":"e1","occurred_at":"2026-11-20T10:00:00Z","user_id":"u1"}"#;
    let o = validate_stdin(&format!("{ok}\n\n{ok}\n"));
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );

    let bad = r#"{"event":"purchase","event_id":"e2","occurred_at":"2026-11-20T10:00:00Z","user_id":"u1","value":5}"#;
    let o = validate_stdin(&format!("{ok}\n{bad}\nnot json\n"));
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("line 2") && out.contains("line 3"), "{out}");
    assert!(out.contains("1 valid, 2 invalid"), "{out}");

    let mut cmd = common::switchyard();
    cmd.args(["validate", "/nonexistent/events.ndjson"]);
    let o = run_bounded(cmd, Duration::from_secs(30));
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn validate_trims_identifiers_and_warns_about_malformed_hints() {
    let padded = r#"{"event":"lead","event_id":" e1 ","occurred_at":"2026-11-20T10:00:00Z","user_id":"u1","email":"  Jane.Doe@Example.COM "}"#;
    let o = validate_stdin(&format!("{padded}\n"));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_eq!(out, "line 1 ok lead e1\n1 valid, 0 invalid\n");

    let n_a = r#"{"event":"lead","event_id":"e2","occurred_at":"2026-11-20T10:00:00Z","user_id":"u1","email":"n/a"}"#;
    let o = validate_stdin(&format!("{padded}\n{n_a}\n"));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_eq!(
        out,
        "line 1 ok lead e1\n\
         line 2 ok lead e2\n\
         \x20   warning /email: not an email address (3 characters, no '@'); the hint is dropped, the event is routed\n\
         2 valid, 0 invalid (1 valid with dropped hints)\n"
    );
    assert!(
        !out.contains("n/a"),
        "the value itself is never printed: {out}"
    );

    let o = validate_stdin_with(&["--strict"], &format!("{padded}\n{n_a}\n"));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("    warning /email: "), "{out}");
    assert!(
        out.ends_with("1 valid, 1 invalid (1 only for dropped hints, --strict)\n"),
        "{out}"
    );
    let o = validate_stdin_with(&["--strict"], &format!("{padded}\n"));
    assert_eq!(o.status.code(), Some(0));

    // A hint of the wrong type is still an error.
    let typed = r#"{"event":"lead","event_id":"e3","occurred_at":"2026-11-20T10:00:00Z","user_id":"u1","email":42}"#;
    let o = validate_stdin(&format!("{typed}\n"));
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.starts_with("line 1 INVALID e3: /email: \"email\" must be a string, got 42\n"),
        "{out}"
    );
}

#[test]
fn validate_passes_the_shipped_sample_except_its_deliberately_invalid_lines() {
    let mut cmd = common::switchyard();
    cmd.args([
        "validate",
        concat!(env!("CARGO_MANIFEST_DIR"), "/examples/events.ndjson"),
    ]);
    let o = run_bounded(cmd, Duration::from_secs(30));
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.trim_end().ends_with(", 3 invalid"), "{out}");
}

#[test]
fn demo_runs_on_the_embedded_broker_and_reports_every_event() {
    let mut cmd = common::switchyard();
    cmd.arg("demo").env_remove("RUST_LOG");
    let o = run_bounded(cmd, Duration::from_secs(120));
    no_panic(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}\n{out}", stderr(&o));
    // The terminal shows the report only; the log went to the file named
    // on the last line, at info.
    assert_eq!(stderr(&o), "", "log lines on the terminal");
    let log = out
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("Log of this run: "))
        .unwrap_or_else(|| panic!("no log path:\n{out}"));
    let logged = std::fs::read_to_string(log).unwrap();
    assert!(
        logged.contains("EMBEDDED"),
        "no embedded-broker warning in {log}"
    );
    assert!(logged.contains(" INFO "), "no info lines in {log}");
    let _ = std::fs::remove_file(log);
    let sample_lines = switchyard::demo::SAMPLE_EVENTS
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    let reported = out.lines().filter(|l| l.starts_with("line ")).count();
    assert_eq!(reported, sample_lines, "{out}");
    assert_eq!(
        out.lines().filter(|l| l.contains("INVALID")).count(),
        3,
        "{out}"
    );
    assert!(out.contains(&format!("{sample_lines} published")), "{out}");
    // The router ran: routes, duplicates, consent skips and dead letters.
    assert!(out.contains("duplicate of line 7: dropped"), "{out}");
    assert_eq!(out.matches("→ switchyard.dlq").count(), 3, "{out}");
    assert!(out.contains("meta (consent ads denied)"), "{out}");
    assert!(
        out.contains("→ amplitude, crm, customerio, ga4, google_ads, klaviyo, meta, mixpanel, posthog, tiktok"),
        "{out}"
    );
    // Then every sink delivered to its local vendor stand-in: per
    // destination, what the router routed was sent and accepted, except the
    // dead letters the table reports with their reasons.
    let table: Vec<Vec<&str>> = out
        .lines()
        .skip_while(|l| !l.starts_with("destination "))
        .skip(1)
        .take_while(|l| !l.starts_with("dead letter"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(table.len(), 10, "{out}");
    for row in &table {
        let n = |i: usize| row[i].parse::<usize>().unwrap();
        let (routed, sent, accepted, dead) = (n(2), n(3), n(4), n(5));
        assert!(routed > 0, "{out}");
        assert_eq!(accepted + dead, routed, "{out}");
        assert!(sent >= accepted, "{out}");
        let letters = out
            .lines()
            .filter(|l| l.starts_with(&format!("dead letter  {}: ", row[0])))
            .count();
        assert_eq!(letters, dead, "{out}");
    }
}

#[test]
fn run_without_brokers_refuses_the_embedded_broker_unless_asked() {
    let mut cmd = common::switchyard();
    cmd.args(["run", "--role", "router"]);
    let o = run_bounded(cmd, Duration::from_secs(60));
    no_panic(&o);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("kafka.brokers is not set") && err.contains("--embedded-broker"),
        "{err}"
    );

    // Asked for, it starts (and says loudly what it runs on).
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("embedded.toml");
    std::fs::write(&config, "[metrics]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let mut child = common::switchyard()
        .args(["run", "--role", "router", "--embedded-broker", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut seen = Vec::new();
        while let Ok(n) = std::io::Read::read(&mut err, &mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains("EMBEDDED") {
                return true;
            }
        }
        false
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(reader.join().unwrap(), "no embedded-broker warning");
    assert!(running, "it exited instead of running");
}
