//! One `switchyard run --role all` process: a sink that fails is restarted
//! on its own, with backoff, while ingest and the router carry on; health
//! and metrics name it.

mod common;

use std::process::Child;
use std::time::Duration;

use common::fake_vendor::FakeVendor;
use common::sink::{SECRET, wait_until};

const KEY: &str = "prod_0123456789abcdef";

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

/// The value of the series of `name` whose labels include all of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sink_restarts_on_its_own_while_ingest_and_the_router_carry_on() {
    let _watchdog = common::watchdog("role_isolation", Duration::from_secs(300));
    let fake = FakeVendor::start(SECRET).await;
    let brokers = common::brokers();
    let prefix = common::unique("iso");
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
canonical = "{prefix}.canonical"
prefix = "{prefix}"
partitions = 1
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
"#,
            url = fake.url()
        ),
    );
    // A sink that keeps order needs its retry topic partitioned like its
    // deliver topic; one made with another count fails it at every start.
    common::kafka::create_topic(&brokers, &format!("{prefix}.retry.hook"), 2).await;
    common::run_ok(&["topics", "create"], &config);
    let deliver = format!("{prefix}.deliver.hook");

    let log_path = dir.path().join("switchyard.log");
    let mut child = Proc(common::kafka::spawn_switchyard(
        &["--role", "all", "--instance-id", &prefix],
        &config,
        &log_path,
    ));
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let alive = |child: &mut Proc| {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("the process stopped ({status}):\n{}", log());
        }
    };
    let mut addrs = None;
    wait_until("ingest and metrics listen", Duration::from_secs(60), || {
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
    let get = async |path: &str| {
        let r = http
            .get(format!("http://{metrics}{path}"))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };

    // The sink fails, and is started again, more than once.
    let restarts = |text: &str| {
        sample(
            text,
            "switchyard_role_restarts_total",
            &[r#"role="sink""#, r#"destination="hook""#],
        )
        .unwrap_or(0.0)
    };
    for _ in 0..600 {
        alive(&mut child);
        if restarts(&get("/metrics").await.1) >= 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, text) = get("/metrics").await;
    assert!(restarts(&text) >= 2.0, "restarts: {text}");
    assert!(
        log().contains("need the same partition count"),
        "the failure is logged:\n{}",
        log()
    );

    // Ingest still takes events, and the router still routes them.
    let id = common::unique("still-routed");
    let event = serde_json::json!({
        "event": "purchase", "event_id": id, "occurred_at": chrono::Utc::now().to_rfc3339(),
        "user_id": "u-1", "value": 10.0, "currency": "EUR",
        "consent": {"analytics": "granted", "ads": "granted"}
    });
    let r = http
        .post(format!("http://{ingest}/v1/events"))
        .bearer_auth(KEY)
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let deliver_for = deliver.clone();
    let id_for = id.clone();
    let routed = tokio::task::spawn_blocking(move || {
        common::kafka::read_until(
            &common::brokers(),
            &deliver_for,
            Duration::from_secs(60),
            |rs| {
                rs.iter().any(|r| {
                    r.payload
                        .as_deref()
                        .is_some_and(|p| p.windows(id_for.len()).any(|w| w == id_for.as_bytes()))
                })
            },
        )
    })
    .await
    .unwrap();
    let has_id = |r: &common::kafka::Record| {
        r.payload
            .as_deref()
            .is_some_and(|p| p.windows(id.len()).any(|w| w == id.as_bytes()))
    };
    assert!(
        routed.iter().any(has_id),
        "the router routed the event to the deliver topic:\n{}",
        log()
    );
    alive(&mut child);

    // Liveness holds; readiness names the sink that is down.
    let (status, _) = get("/healthz").await;
    assert_eq!(status, 200);
    let (status, body) = get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    let sink = ready["roles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["role"] == "sink" && r["destination"] == "hook")
        .unwrap_or_else(|| panic!("{body}"));
    // Between its restarts a failing sink is `restarting` or `starting`,
    // never `running`: it never gets as far as subscribing.
    assert!(
        sink["state"] == "restarting" || sink["state"] == "starting",
        "{body}"
    );
    assert!(sink["restarts"].as_u64().unwrap() >= 2, "{body}");
    assert!(
        sink["error"]
            .as_str()
            .unwrap()
            .contains("need the same partition count"),
        "{body}"
    );
    let router = ready["roles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["role"] == "router")
        .unwrap_or_else(|| panic!("{body}"));
    assert_eq!(router["state"], "running", "{body}");

    let status = common::kafka::sigterm(&mut child.0, Duration::from_secs(40));
    assert!(status.is_some(), "stops on SIGTERM:\n{}", log());
}
