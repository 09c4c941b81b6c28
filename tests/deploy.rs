//! deploy/: the configs the Kubernetes manifests carry pass `switchyard
//! check`, and every metric that the alert rules, their unit tests and the
//! Grafana dashboard name is one that a running switchyard exports.
//!
//! The names are read out of the PromQL expressions (function names,
//! keywords, label names, strings and durations left out); a histogram's
//! `_bucket`, `_sum` and `_count` series belong to its family. The
//! running process is one `switchyard run --role all` fed events that make
//! every labelled family appear: through the ingest (one of them unmapped),
//! straight onto the canonical topic (invalid, misplaced), duplicates,
//! refused consent, a malformed hint, a refusal by the vendor, and a sink
//! that fails at start and is restarted.
//! The structural checks of deploy/ are in scripts/deploy-check.sh.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use common::fake_vendor::FakeVendor;
use common::sink::SECRET;

const KEY: &str = "prod_0123456789abcdef";
/// Series a query may name that Prometheus makes itself, not switchyard.
const PROMETHEUS_SERIES: &[&str] = &["up"];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ---- metric names in PromQL ----

/// Words that are PromQL syntax, not series: operators, modifiers, and the
/// aggregations (`sum by (x) (…)` puts a word between one and its `(`).
fn is_keyword(word: &str) -> bool {
    matches!(
        word.to_ascii_lowercase().as_str(),
        "sum"
            | "min"
            | "max"
            | "avg"
            | "group"
            | "stddev"
            | "stdvar"
            | "count"
            | "count_values"
            | "bottomk"
            | "topk"
            | "quantile"
            | "limitk"
            | "limit_ratio"
            | "and"
            | "or"
            | "unless"
            | "bool"
            | "offset"
            | "by"
            | "without"
            | "on"
            | "ignoring"
            | "group_left"
            | "group_right"
            | "inf"
            | "nan"
            | "atan2"
            | "start"
            | "end"
    )
}

/// The words after which a parenthesised list holds label names.
fn takes_label_list(word: &str) -> bool {
    matches!(
        word,
        "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
    )
}

/// Skips a quoted string starting at `i` (the quote); returns the index after it.
fn skip_string(s: &[char], mut i: usize) -> usize {
    let quote = s[i];
    i += 1;
    while i < s.len() && s[i] != quote {
        if s[i] == '\\' && quote != '`' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

/// Skips from an opening bracket at `i` to after its match, strings included.
fn skip_group(s: &[char], mut i: usize, open: char, close: char) -> usize {
    let mut depth = 0;
    while i < s.len() {
        match s[i] {
            '"' | '\'' | '`' => {
                i = skip_string(s, i);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    i
}

/// The series names a PromQL expression selects.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let s: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if c == '#' {
            // A comment runs to the end of the line.
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if matches!(c, '"' | '\'' | '`') {
            i = skip_string(&s, i);
        } else if c == '{' {
            i = skip_group(&s, i, '{', '}');
        } else if c == '[' {
            i = skip_group(&s, i, '[', ']');
        } else if c == '$' {
            // A Grafana variable: $name or ${name}.
            i += 1;
            if s.get(i) == Some(&'{') {
                i = skip_group(&s, i, '{', '}');
            } else {
                while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '_') {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit() || (c == '.' && s.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // A number (1e3, 0.95, 0x1f): never a name.
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '_' || s[i] == ':') {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            let mut j = i;
            while j < s.len() && s[j].is_whitespace() {
                j += 1;
            }
            let call = s.get(j) == Some(&'(');
            if takes_label_list(&word) {
                if call {
                    i = skip_group(&s, j, '(', ')');
                }
            } else if !call && !is_keyword(&word) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Names in a Grafana variable query: `label_values(SELECTOR, LABEL)` names
/// a label second; other queries are PromQL.
fn variable_query_names(query: &str) -> BTreeSet<String> {
    let q = query.trim();
    if let Some(args) = q
        .strip_prefix("label_values(")
        .and_then(|a| a.strip_suffix(')'))
    {
        return match args.rsplit_once(',') {
            Some((selector, _label)) => metric_names(selector),
            // label_values(LABEL) names no series.
            None => BTreeSet::new(),
        };
    }
    if q.starts_with("label_names(") {
        return BTreeSet::new();
    }
    metric_names(q)
}

/// Every `expr:` of a Prometheus rule file (one line, or a `|` block), with
/// the number of rules, so an expression the reader missed is noticed.
fn rule_exprs(text: &str) -> (Vec<String>, usize) {
    let lines: Vec<&str> = text.lines().collect();
    let rules = lines
        .iter()
        .filter(|l| {
            let t = l.trim_start();
            t.starts_with("- alert:") || t.starts_with("- record:")
        })
        .count();
    let mut exprs = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let indent = line.len() - trimmed.len();
            let block: Vec<&str> = lines[n + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .copied()
                .collect();
            exprs.push(block.join("\n"));
        } else {
            exprs.push(rest.trim_matches(|c| c == '\'' || c == '"').to_string());
        }
    }
    (exprs, rules)
}

/// The series of a promtool rule test file's `input_series`.
fn test_series(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix("- series:"))
        .map(|s| s.trim().trim_matches(|c| c == '\'' || c == '"').to_string())
        .collect()
}

/// Every query of a Grafana dashboard: panel targets' `expr`, and the
/// templating variables' `query` / `definition`.
fn dashboard_queries(dash: &serde_json::Value) -> (Vec<String>, Vec<String>) {
    fn walk(v: &serde_json::Value, exprs: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => exprs.push(e.clone()),
                        ("templating", _) => {}
                        _ => walk(v, exprs),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, exprs)),
            _ => {}
        }
    }
    let mut exprs = Vec::new();
    walk(dash, &mut exprs);
    let mut vars = Vec::new();
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        if var["type"] != "query" {
            continue;
        }
        for q in [&var["query"], &var["query"]["query"], &var["definition"]] {
            if let Some(q) = q.as_str() {
                vars.push(q.to_string());
            }
        }
    }
    (exprs, vars)
}

/// Each metric name deploy/ uses, with the files that use it.
fn names_used() -> BTreeMap<String, BTreeSet<&'static str>> {
    let mut used: BTreeMap<String, BTreeSet<&'static str>> = BTreeMap::new();
    let mut add = |file: &'static str, names: BTreeSet<String>| {
        for n in names {
            used.entry(n).or_default().insert(file);
        }
    };

    const ALERTS: &str = "deploy/prometheus/alerts.yml";
    let (exprs, rules) = rule_exprs(&read(ALERTS));
    assert_eq!(exprs.len(), rules, "{ALERTS}: one expr per rule");
    assert!(rules >= 10, "{ALERTS}: only {rules} rules read");
    for e in &exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "{ALERTS}: no metric in `{e}`");
        add(ALERTS, names);
    }

    const TESTS: &str = "deploy/prometheus/alerts.test.yml";
    let series = test_series(&read(TESTS));
    assert!(
        series.len() >= 5,
        "{TESTS}: only {} series read",
        series.len()
    );
    for s in &series {
        add(TESTS, metric_names(s));
    }

    const DASHBOARD: &str = "deploy/grafana/switchyard.json";
    let dash: serde_json::Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard JSON");
    let (exprs, vars) = dashboard_queries(&dash);
    assert!(
        exprs.len() >= 20,
        "{DASHBOARD}: only {} queries read",
        exprs.len()
    );
    for e in &exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "{DASHBOARD}: no metric in `{e}`");
        add(DASHBOARD, names);
    }
    for q in &vars {
        add(DASHBOARD, variable_query_names(q));
    }
    used
}

/// Metric families of a Prometheus text exposition, by name, with their type.
fn families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.trim().to_string()))
        .collect()
}

/// The names in `used` that no family of `exported` (or Prometheus itself) has.
fn unknown<'a>(
    used: impl IntoIterator<Item = &'a String>,
    exported: &BTreeMap<String, String>,
) -> Vec<String> {
    let known = |name: &str| {
        if exported.contains_key(name) || PROMETHEUS_SERIES.contains(&name) {
            return true;
        }
        [
            ("_bucket", &["histogram"][..]),
            ("_sum", &["histogram", "summary"][..]),
            ("_count", &["histogram", "summary"][..]),
        ]
        .iter()
        .any(|(suffix, kinds)| {
            name.strip_suffix(suffix)
                .and_then(|family| exported.get(family))
                .is_some_and(|kind| kinds.contains(&kind.as_str()))
        })
    };
    used.into_iter().filter(|n| !known(n)).cloned().collect()
}

#[test]
fn the_name_reader_finds_series_and_nothing_else() {
    let names = |e: &str| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le, destination) (rate(switchyard_sink_request_duration_seconds_bucket{namespace=~"$namespace", destination=~"a|b"}[$__rate_interval])))"#
        ),
        ["switchyard_sink_request_duration_seconds_bucket"]
    );
    assert_eq!(
        names(
            "sum(a_total) by (x) / on (x) group_left (y) b offset 5m > bool 1e3 unless c{l=\"d_total\"} # e_total"
        ),
        ["a_total", "b", "c"]
    );
    assert_eq!(
        names(r#"absent(up{job="switchyard", component="router"} == 1)"#),
        ["up"]
    );
    assert_eq!(
        names("sum by (namespace) (max by (namespace, partition) (deriv(lag[15m:1m]))) > 0"),
        ["lag"]
    );
    assert_eq!(
        variable_query_names(r#"label_values(switchyard_role_up{namespace=~"$ns"}, destination)"#)
            .into_iter()
            .collect::<Vec<_>>(),
        ["switchyard_role_up"]
    );
    let (exprs, rules) = rule_exprs(
        "rules:\n  - alert: A\n    expr: |\n      x_total\n      and\n      y\n    for: 5m\n  - record: r\n    expr: 'z > 1'\n",
    );
    assert_eq!(rules, 2);
    assert_eq!(exprs, ["      x_total\n      and\n      y", "z > 1"]);
}

#[test]
fn a_name_switchyard_does_not_export_is_caught() {
    let exported = families(
        "# HELP switchyard_sink_events_total x\n# TYPE switchyard_sink_events_total counter\n\
         # TYPE switchyard_sink_request_duration_seconds histogram\n\
         # TYPE switchyard_role_up gauge\n",
    );
    let used: BTreeSet<String> = [
        r#"sum by (destination) (rate(switchyard_sink_event_total{outcome="delivered"}[5m]))"#,
        "rate(switchyard_sink_events_total[5m])",
        "histogram_quantile(0.9, sum by (le) (rate(switchyard_sink_request_duration_seconds_bucket[5m])))",
        "rate(switchyard_sink_request_duration_seconds_sum[5m])",
        "rate(switchyard_sink_events_total_count[5m])",
        "up == 0 or switchyard_role_up == 0",
    ]
    .iter()
    .flat_map(|e| metric_names(e))
    .collect();
    assert_eq!(
        unknown(&used, &exported),
        [
            "switchyard_sink_event_total",
            "switchyard_sink_events_total_count"
        ]
    );
}

/// GitHub's anchor for a Markdown heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn every_runbook_names_a_section_of_operations_md() {
    let sections: BTreeSet<String> = read("docs/operations.md")
        .lines()
        .filter_map(|l| l.strip_prefix("### ").or_else(|| l.strip_prefix("## ")))
        .map(anchor)
        .collect();
    let alerts = read("deploy/prometheus/alerts.yml");
    let names: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    let runbooks: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook: "))
        .collect();
    assert_eq!(names.len(), runbooks.len(), "one runbook per alert");
    for (name, runbook) in names.iter().zip(&runbooks) {
        let section = runbook
            .strip_prefix("docs/operations.md#")
            .unwrap_or_else(|| {
                panic!("{name}: runbook {runbook} is not a section of docs/operations.md")
            });
        assert_eq!(
            section,
            anchor(name),
            "{name}: its runbook names another section"
        );
        assert!(
            sections.contains(section),
            "{name}: docs/operations.md has no section #{section}"
        );
    }
}

/// `KEY: "value"` pairs of a Secret manifest's `stringData`.
fn secret_env(path: &str) -> Vec<(String, String)> {
    read(path)
        .lines()
        .skip_while(|l| !l.starts_with("stringData:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.trim().split_once(": "))
        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
        .collect()
}

#[test]
fn the_kubernetes_configs_pass_switchyard_check() {
    let mut env = secret_env("deploy/kubernetes/base/secret.yaml");
    assert!(env.len() >= 2, "base secret: {env:?}");
    check_config("deploy/kubernetes/base/switchyard.toml", &env);
    env.extend(secret_env(
        "deploy/kubernetes/overlays/example/secret-meta.yaml",
    ));
    check_config("deploy/kubernetes/overlays/example/switchyard.toml", &env);
}

fn check_config(config: &str, env: &[(String, String)]) {
    let out = common::switchyard()
        .args(["check", "--config"])
        .arg(repo(config))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run switchyard check");
    assert!(
        out.status.success(),
        "switchyard check --config {config}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- against a running switchyard ----

/// Kills the child however the test ends.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        common::kafka::sigkill(&mut self.0);
    }
}

/// The address a log line names in `field=`.
fn logged_addr(log: &str, line: &str, field: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains(line))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix(field))
        .map(|a| a.trim_matches('"').to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_deploy_uses_is_one_switchyard_exports() {
    let _watchdog = common::watchdog("deploy", Duration::from_secs(300));
    let used = names_used();
    let fake = FakeVendor::start(SECRET).await;
    let brokers = common::brokers();
    let prefix = common::unique("deploy");
    let canonical = format!("{prefix}.canonical");
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(
        dir.path(),
        &format!(
            r#"
[kafka]
brokers = "{brokers}"
guarantee = "at_least_once"
consumer_properties = {{ "partition.assignment.strategy" = "roundrobin" }}
[topics]
canonical = "{canonical}"
prefix = "{prefix}"
partitions = 2
[metrics]
listen = "127.0.0.1:0"
[ingest]
listen = "127.0.0.1:0"
[[ingest.keys]]
key = "{KEY}"
source = "checkout-api"
environment = "production"
[destinations.hook]
type = "webhook"
url = "{url}"
secret = "{SECRET}"
consent = "analytics"
[destinations.hook.delivery]
linger = "20ms"
ordering = true
# Its retry topic is made with the wrong partition count below, so this
# sink fails at every start and is restarted (the restart metrics).
[destinations.broken]
type = "webhook"
url = "{url}"
secret = "{SECRET}"
consent = "analytics"
[destinations.broken.delivery]
ordering = true
"#,
            url = fake.url()
        ),
    );
    common::kafka::create_topic(&brokers, &format!("{prefix}.retry.broken"), 3).await;
    common::run_ok(&["topics", "create"], &config);

    let log_path = dir.path().join("switchyard.log");
    let mut child = Proc(common::kafka::spawn_switchyard(
        &["--role", "all", "--instance-id", &prefix],
        &config,
        &log_path,
    ));
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut addrs = None;
    common::sink::wait_until("ingest and metrics listen", Duration::from_secs(60), || {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("switchyard stopped ({status}):\n{}", log());
        }
        let l = log();
        addrs = logged_addr(&l, "ingest gateway listening", "addr=").zip(logged_addr(
            &l,
            "metrics endpoint listening",
            "bound=",
        ));
        addrs.is_some()
    })
    .await;
    let (ingest, metrics) = addrs.unwrap();
    let http = reqwest::Client::new();

    // Through the ingest: delivered, refused by the vendor, consent refused,
    // a malformed hint, a duplicate; and a PostHog event with no mapping.
    let now = chrono::Utc::now().to_rfc3339();
    let id = |tag: &str| format!("{prefix}-{tag}");
    fake.refuse(&[&id("refused")]);
    let granted = serde_json::json!({"analytics": "granted"});
    let event = |tag: &str, extra: serde_json::Value| {
        let mut e = serde_json::json!({
            "event": "purchase", "event_id": id(tag), "occurred_at": now,
            "user_id": format!("u-{tag}"), "value": 10.0, "currency": "EUR",
            "consent": granted,
        });
        e.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        e
    };
    let batch = serde_json::json!({"batch": [
        event("delivered", serde_json::json!({})),
        event("refused", serde_json::json!({})),
        event("no-consent", serde_json::json!({"consent": {"analytics": "denied"}})),
        event("bad-hint", serde_json::json!({"email": "n/a"})),
    ]});
    // The same event again, for the router's dedup.
    for body in [batch, event("delivered", serde_json::json!({}))] {
        let r = http
            .post(format!("http://{ingest}/v1/events"))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    let r = http
        .post(format!("http://{ingest}/posthog/capture/"))
        .json(&serde_json::json!({
            "api_key": KEY, "event": "Coupon Applied", "distinct_id": "u-1",
            "uuid": id("unmapped"),
        }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());

    // Straight onto the canonical topic: not JSON, and an event under
    // another key than its event_id.
    let misplaced = serde_json::to_vec(&event("misplaced", serde_json::json!({}))).unwrap();
    common::kafka::produce(
        &brokers,
        &canonical,
        &[
            (Some(id("garbage")), b"not json".to_vec()),
            (Some("some-other-key".into()), misplaced),
        ],
    )
    .await;

    // Wait for every name deploy/ uses (the lag gauges come with the
    // clients' statistics, every 5 s).
    let mut exported = BTreeMap::new();
    let mut missing = Vec::new();
    for _ in 0..120 {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("switchyard stopped ({status}):\n{}", log());
        }
        let text = http
            .get(format!("http://{metrics}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        exported = families(&text);
        missing = unknown(used.keys(), &exported);
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let report: Vec<String> = missing
        .iter()
        .map(|n| {
            format!(
                "  {n} (in {})",
                used[n].iter().copied().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    assert!(
        missing.is_empty(),
        "deploy/ names metrics switchyard does not export (misspelt, renamed, or a family this test's events do not make):\n{}\nexported: {:?}",
        report.join("\n"),
        exported.keys().collect::<Vec<_>>()
    );
    assert!(
        fake.delivered().contains(&id("delivered")),
        "the events reached the vendor"
    );
    let unused: Vec<&String> = exported
        .keys()
        .filter(|n| n.starts_with("switchyard_") && !used.contains_key(*n))
        .collect();
    if !unused.is_empty() {
        eprintln!("exported but used by no alert or panel: {unused:?}");
    }

    let status = common::kafka::sigterm(&mut child.0, Duration::from_secs(40));
    assert!(status.is_some(), "stops on SIGTERM:\n{}", log());
}
