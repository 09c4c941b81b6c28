mod common;
use common::kafka::{produce, read_all, sigterm, spawn_switchyard};
use std::time::{Duration, Instant};
#[tokio::test(flavor = "multi_thread")]
async fn probe() {
    let brokers = common::brokers();
    let prefix = common::unique("pr");
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::write_config(
        dir.path(),
        &format!(
            r#"
[kafka]
brokers = "{brokers}"
guarantee = "at_least_once"
properties = {{ "partition.assignment.strategy" = "roundrobin" }}
[topics]
canonical = "{prefix}.canonical"
prefix = "{prefix}"
partitions = 4
[metrics]
listen = "127.0.0.1:19465"
[destinations.hook]
type = "webhook"
url = "http://127.0.0.1:9/"
secret = "0123456789abcdef"
consent = "analytics"
"#
        ),
    );
    assert!(
        common::switchyard()
            .args(["topics", "create", "--config"])
            .arg(&cfg)
            .status()
            .unwrap()
            .success()
    );
    let recs: Vec<_> = (0..50_000).map(|i| { let id = format!("e{i}"); (Some(id.clone()), format!(r#"{{"event":"lead","event_id":"{id}","occurred_at":"2026-11-20T10:00:00Z","user_id":"u{}"}}"#, i % 1000).into_bytes()) }).collect();
    let t = Instant::now();
    produce(&brokers, &format!("{prefix}.canonical"), &recs).await;
    eprintln!("produced 50k in {:?}", t.elapsed());
    let mut child = spawn_switchyard(
        &["--role", "router", "--instance-id", "p"],
        &cfg,
        &dir.path().join("r.log"),
    );
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let n = read_all(&brokers, &format!("{prefix}.deliver.hook")).len();
        let m = reqwest_metrics();
        eprintln!("{:?}: delivered {n} {m}", t.elapsed());
        if n >= 50_000 {
            break;
        }
    }
    sigterm(&mut child, Duration::from_secs(30));
    eprintln!(
        "{}",
        std::fs::read_to_string(dir.path().join("r.log"))
            .unwrap()
            .lines()
            .filter(|l| !l.contains("CONFWARN"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
fn reqwest_metrics() -> String {
    let out = std::process::Command::new("curl")
        .args(["-s", "127.0.0.1:19465/metrics"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.starts_with("switchyard_router_batches")
                || l.starts_with("switchyard_router_records_consumed")
        })
        .collect::<Vec<_>>()
        .join(" | ")
}
