//! Kafka over TLS: librdkafka's security settings pass through
//! `[kafka.properties]` to every client switchyard makes. tansu 0.6.0 takes
//! `--cert`/`--key` but never uses them (its TLS acceptor is built and
//! dropped), so the broker here is tansu behind a TLS terminator made in the
//! test, with a self-signed certificate made at test time; tansu advertises
//! the terminator's address, so every connection a client opens is TLS.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use common::fake_vendor::FakeVendor;

const SECRET: &str = "0123456789abcdef";

/// A tansu broker of its own (stopped on drop), advertised at `front`.
struct Broker {
    dir: PathBuf,
    port: u16,
}

impl Broker {
    fn env(&self, c: &mut Command) {
        c.env("SWITCHYARD_KAFKA_PORT", self.port.to_string())
            .env("SWITCHYARD_KAFKA_DIR", &self.dir);
    }

    fn start(dir: &Path, front: u16) -> Broker {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let b = Broker {
            dir: dir.join("kafka"),
            port,
        };
        let mut c = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka-dev.sh"));
        c.arg("start")
            .env("SWITCHYARD_KAFKA_ADVERTISED", format!("127.0.0.1:{front}"))
            .stdout(Stdio::null());
        b.env(&mut c);
        assert!(c.status().unwrap().success(), "tansu did not start");
        b
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let mut c = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kafka-dev.sh"));
        c.arg("stop").stdout(Stdio::null()).stderr(Stdio::null());
        self.env(&mut c);
        let _ = c.status();
    }
}

/// Terminates TLS on `listener` and forwards each connection to `backend`.
fn terminate_tls(listener: TcpListener, backend: u16, cert: &rcgen::CertifiedKey<rcgen::KeyPair>) {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(cert.cert.der().to_vec())], key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that does not speak TLS fails the handshake here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut up) = TcpStream::connect(("127.0.0.1", backend)).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                }
            });
        }
    });
}

fn config_text(front: u16, prefix: &str, hook: &str, security: &str) -> String {
    format!(
        r#"
[kafka]
brokers = "127.0.0.1:{front}"
guarantee = "at_least_once"
properties = {{ {security} }}
consumer_properties = {{ "partition.assignment.strategy" = "roundrobin" }}

[topics]
canonical = "{prefix}.canonical"
prefix = "{prefix}"
partitions = 1

[metrics]
listen = "127.0.0.1:0"

[destinations.hook]
type = "webhook"
url = "{hook}"
secret = "{SECRET}"
consent = "analytics"

[destinations.hook.delivery]
linger = "10ms"
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_pipeline_runs_over_tls_and_refuses_a_broker_it_cannot_verify() {
    let _w = common::watchdog("kafka_tls", Duration::from_secs(300));
    let dir = tempfile::tempdir().unwrap();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front = listener.local_addr().unwrap().port();
    let broker = Broker::start(dir.path(), front);
    terminate_tls(listener, broker.port, &cert);

    let fake = FakeVendor::start(SECRET).await;
    let prefix = common::unique("tls");
    let tls = format!(
        r#""security.protocol" = "ssl", "ssl.ca.location" = "{}""#,
        ca.display()
    );
    let write = |name: &str, security: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, config_text(front, &prefix, &fake.url(), security)).unwrap();
        path
    };
    let good = write("tls.toml", &tls);

    // Without the CA the certificate cannot be verified; without TLS the
    // terminator refuses the connection: both fail, with librdkafka's reason.
    for (name, security) in [
        ("unverified.toml", r#""security.protocol" = "ssl""#),
        ("plain.toml", r#""client.id" = "plain""#),
    ] {
        let out = common::switchyard()
            .args(["topics", "create", "--config"])
            .arg(write(name, security))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{name} reached the broker");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cannot reach Kafka"), "{name}: {err}");
    }

    common::run_ok(&["topics", "create"], &good);
    let log = dir.path().join("all.log");
    let mut run =
        common::kafka::spawn_switchyard(&["--role", "all", "--instance-id", "tls"], &good, &log);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", format!("127.0.0.1:{front}"))
        .set("security.protocol", "ssl")
        .set("ssl.ca.location", ca.display().to_string())
        .create()
        .unwrap();
    for i in 0..5 {
        let id = format!("tls-{i}");
        let ev = serde_json::json!({
            "event": "purchase", "event_id": id, "occurred_at": chrono::Utc::now(),
            "user_id": "u-tls", "value": 9.5, "currency": "EUR",
            "consent": {"analytics": "granted"}
        });
        producer
            .send(
                FutureRecord::to(&format!("{prefix}.canonical"))
                    .key(&id)
                    .payload(&ev.to_string()),
                Timeout::After(Duration::from_secs(30)),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let t = Instant::now();
    while fake.delivered().len() < 5 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "not delivered over TLS:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    common::kafka::sigterm(&mut run, Duration::from_secs(30));
    drop(broker);
}
