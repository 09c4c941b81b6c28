//! Shared helpers for integration tests: the test broker and unique names.
#![allow(dead_code)] // each test binary uses a different subset

pub mod fake_vendor;
pub mod vendor;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Bootstrap address of the tansu broker the tests run against.
///
/// `scripts/test.sh` starts it and exports `SWITCHYARD_TEST_BROKERS`; a plain
/// `cargo test` starts it through the same script, so no test silently skips.
pub fn brokers() -> String {
    static BROKERS: OnceLock<String> = OnceLock::new();
    BROKERS
        .get_or_init(|| {
            if let Ok(b) = std::env::var("SWITCHYARD_TEST_BROKERS") {
                return b;
            }
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka-dev.sh");
            let out = Command::new(&script)
                .arg("start")
                .output()
                .expect("run scripts/kafka-dev.sh start");
            assert!(
                out.status.success(),
                "scripts/kafka-dev.sh start failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
        .clone()
}

/// A name no other test (or earlier run against the same broker) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Ends the whole test process when a test outlives `limit`.
///
/// librdkafka waits without a timeout in places, and a test stuck in one
/// would hold CI until its own limit. A test that panics is given a little
/// longer, then ended too, because shutting its runtime down can block on
/// the same stuck thread. Dropping the guard otherwise disarms it.
pub struct Watchdog(std::sync::mpsc::Sender<bool>);

pub fn watchdog(test: &'static str, limit: std::time::Duration) -> Watchdog {
    use std::sync::mpsc::RecvTimeoutError;
    let (tx, rx) = std::sync::mpsc::channel::<bool>();
    std::thread::spawn(move || {
        let grace = std::time::Duration::from_secs(120);
        match rx.recv_timeout(limit) {
            Ok(true) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(false) => {
                std::thread::sleep(grace);
                eprintln!(
                    "{test}: failed and still not done {grace:?} later; ending the test process"
                );
            }
            Err(RecvTimeoutError::Timeout) => {
                eprintln!("{test}: still running after {limit:?}; ending the test process");
            }
        }
        std::process::exit(101);
    });
    Watchdog(tx)
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.0.send(!std::thread::panicking());
    }
}

/// The head of a pipeline config on the test broker: at least once (tansu's
/// transactions do not work with librdkafka), an eager assignor (tansu 0.6
/// never finishes a cooperative hand-over), `<prefix>.canonical`, metrics
/// on a free port. Destination blocks follow it.
pub fn pipeline_config(prefix: &str, partitions: u32) -> String {
    format!(
        r#"
[kafka]
brokers = "{brokers}"
guarantee = "at_least_once"
consumer_properties = {{ "partition.assignment.strategy" = "roundrobin" }}

[topics]
canonical = "{prefix}.canonical"
prefix = "{prefix}"
partitions = {partitions}

[metrics]
listen = "127.0.0.1:0"
"#,
        brokers = brokers()
    )
}

/// A webhook destination `name` (consent `analytics`, signed with
/// `secret`) sending to `url` with a short linger; `delivery` adds lines to
/// its `[destinations.NAME.delivery]` table.
pub fn webhook(name: &str, url: &str, secret: &str, delivery: &str) -> String {
    format!(
        r#"
[destinations.{name}]
type = "webhook"
url = "{url}"
secret = "{secret}"
consent = "analytics"

[destinations.{name}.delivery]
linger = "10ms"
{delivery}
"#
    )
}

/// Writes a config file into `dir` and returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("switchyard.toml");
    std::fs::write(&p, text).expect("write config");
    p
}

/// Runs `switchyard ARGS… --config CONFIG`, fails the test unless it exits 0,
/// and returns its stdout.
pub fn run_ok(args: &[&str], config: &Path) -> String {
    let out = switchyard()
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run switchyard");
    assert!(
        out.status.success(),
        "switchyard {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `switchyard` binary built for this test run.
pub fn switchyard() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    c.env("RUST_LOG", "warn");
    c
}

pub mod kafka;
pub mod router;
pub mod sink;
