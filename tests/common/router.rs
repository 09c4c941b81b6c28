//! A router deployment for integration tests: config, topics, processes.

use std::path::PathBuf;

use super::kafka::spawn_switchyard;

/// A router config on the test broker (prefix and topics of its own) with
/// three destinations: meta (ads consent), ga4 and hook (analytics).
pub struct Setup {
    pub brokers: String,
    pub prefix: String,
    pub canonical: String,
    pub config: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Setup {
    pub fn new(guarantee: &str, partitions: u32) -> Setup {
        let brokers = super::brokers();
        let prefix = super::unique("rt");
        let canonical = format!("{prefix}.canonical");
        let dir = tempfile::tempdir().unwrap();
        let config = super::write_config(
            dir.path(),
            &format!(
                r#"
[kafka]
brokers = "{brokers}"
guarantee = "{guarantee}"
# tansu 0.6.0 does not finish cooperative rebalances (a revoked partition is
# never handed to the new member), so the tests use an eager strategy there.
consumer_properties = {{ "partition.assignment.strategy" = "roundrobin" }}
[topics]
canonical = "{canonical}"
prefix = "{prefix}"
partitions = {partitions}
[metrics]
listen = "127.0.0.1:0"
[destinations.meta]
type = "meta_capi"
pixel_id = "1234"
access_token = "t"
[destinations.ga4]
type = "ga4"
measurement_id = "G-TEST1"
api_secret = "s"
[destinations.hook]
type = "webhook"
url = "http://127.0.0.1:9/"
secret = "0123456789abcdef"
consent = "analytics"
"#
            ),
        );
        super::run_ok(&["topics", "create"], &config);
        Setup {
            brokers,
            prefix,
            canonical,
            config,
            dir,
        }
    }

    pub fn deliver(&self, d: &str) -> String {
        format!("{}.deliver.{d}", self.prefix)
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    pub fn router(&self, instance: &str) -> std::process::Child {
        spawn_switchyard(
            &["--role", "router", "--instance-id", instance],
            &self.config,
            &self.log(instance),
        )
    }

    pub fn logs(&self, instance: &str) -> String {
        std::fs::read_to_string(self.log(instance)).unwrap_or_default()
    }
}

impl Setup {
    /// Stops `router` with SIGTERM and checks that it exited cleanly.
    pub fn stop(&self, router: &mut std::process::Child, instance: &str) {
        let status = super::kafka::sigterm(router, std::time::Duration::from_secs(30))
            .expect("router stops on SIGTERM");
        assert!(status.success(), "{}", self.logs(instance));
    }

    /// The router's Prometheus text, from the address its log names last
    /// (a restarted instance appends to the same log).
    pub async fn metrics(&self, instance: &str) -> String {
        let logs = self.logs(instance);
        let line = logs
            .lines()
            .rev()
            .find(|l| l.contains("metrics endpoint listening"))
            .unwrap_or_else(|| panic!("no metrics address in the log:\n{logs}"));
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("bound="))
            .unwrap_or_else(|| panic!("no bound= in {line:?}"));
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// The value of one sample `name{labels} value` in Prometheus text.
pub fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}
