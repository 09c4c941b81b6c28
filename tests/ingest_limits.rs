//! What unauthenticated or slow clients can cost the ingest gateway: no
//! broker is needed (nothing here is published), so the gateway's producer
//! points at a port where nobody listens.
//!
//! A test binary of its own because one test measures the process's peak
//! memory, which tests of other binaries must not share.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use switchyard::config::Config;
use switchyard::ingest;

const KEY: &str = "lim_0123456789abcdef";
const MIB: u64 = 1024 * 1024;

fn config(ingest: &str) -> Config {
    let text = format!(
        r#"
[kafka]
brokers = "127.0.0.1:9"
[topics]
canonical = "limits.canonical"
[ingest]
produce_timeout = "1s"
{ingest}
[[ingest.keys]]
key = "{KEY}"
source = "limits"
environment = "production"
"#
    );
    Config::parse(&text, Path::new("limits-test.toml"), &|_| None).expect("test config")
}

struct Gateway {
    addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The gateway on a listener whose accept queue holds 2,000 connections at
/// once (tokio's default of 1,024 would reset some of them before the
/// gateway sees them, which is not what is tested here).
async fn start(config: Config) -> Gateway {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(4096).unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move { ingest::serve(&config, "127.0.0.1:9", listener, token).await });
    Gateway { addr, shutdown }
}

/// Peak resident memory of this process so far (`VmHWM`), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kb * 1024
}

/// A gzip body that inflates to `size` bytes of zeros.
fn gzip_bomb(size: u64) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; MIB as usize];
    for _ in 0..size / MIB {
        e.write_all(&zeros).unwrap();
    }
    e.finish().unwrap()
}

/// Sends `head` (a request line and headers) and whatever `body` part, then
/// stalls, and returns the status line the gateway answers with, if any
/// within `limit` (a cap so that a gateway that never answers fails the
/// test instead of hanging it).
async fn stalled_request(addr: SocketAddr, head: &str, limit: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    };
    let _ = tokio::time::timeout(limit, read).await;
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

/// 2,000 gzip bombs at once, each inflating to 50 MiB, sent with a write key
/// the gateway does not know. With a body limit big enough to let a bomb
/// through, a gateway that inflated before it authenticated held over
/// 500 MiB more at its peak; one that authenticates first drops the bodies
/// as they arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn unauthenticated_gzip_bombs_are_refused_without_being_inflated() {
    let _watchdog = common::watchdog("gzip bombs", Duration::from_secs(300));
    const REQUESTS: usize = 2000;
    const BOUND: u64 = 200 * MIB;
    let gateway = start(config(
        "body_limit_bytes = 67108864\nmax_concurrent_requests = 4096",
    ))
    .await;
    let bomb = axum::body::Bytes::from(gzip_bomb(50 * MIB));
    let url = format!("http://{}/v1/batch", gateway.addr);
    let client = reqwest::Client::new();
    let before = peak_rss();
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let request = client
                .post(&url)
                .basic_auth("not_a_configured_write_key", Some(""))
                .header("Content-Type", "application/json")
                .header("Content-Encoding", "gzip")
                .body(bomb.clone());
            tokio::spawn(async move { request.send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for t in tasks {
        let status = match t.await.unwrap() {
            Ok(s) => s.to_string(),
            Err(e) => format!("error: {e}"),
        };
        *statuses.entry(status).or_default() += 1;
    }
    let growth = peak_rss().saturating_sub(before);
    assert_eq!(
        statuses,
        [("401".to_string(), REQUESTS)].into_iter().collect(),
        "peak RSS grew by {} MiB",
        growth / MIB
    );
    assert!(
        growth < BOUND,
        "peak RSS grew by {} MiB (bound {} MiB)",
        growth / MIB,
        BOUND / MIB
    );
}

/// A client that sends its headers and part of its body, then nothing, is
/// answered 408 once `body_read_timeout` passes, on a route that
/// authenticates from the header and on one whose credential is in the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_is_cut_off_by_the_body_read_timeout() {
    let _watchdog = common::watchdog("stalled body", Duration::from_secs(120));
    let gateway = start(config("body_read_timeout = \"1s\"")).await;
    for head in [
        format!(
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"event\":"
        ),
        "POST /mixpanel/track HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 1000\r\n\r\n[{\"event\":"
            .to_string(),
    ] {
        let status = stalled_request(gateway.addr, &head, Duration::from_secs(30)).await;
        assert!(
            status.starts_with("HTTP/1.1 408"),
            "{head:?} got {status:?}"
        );
    }
}

/// Past `max_concurrent_requests` in flight the gateway answers at once
/// with 503 and `Retry-After` instead of queueing; health checks still
/// answer; once the stalled requests are cut off, requests are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_concurrency_limit_requests_get_503_with_retry_after() {
    let _watchdog = common::watchdog("concurrency limit", Duration::from_secs(120));
    let gateway = start(config(
        "max_concurrent_requests = 2\nbody_read_timeout = \"3s\"",
    ))
    .await;
    let addr = gateway.addr;
    let stalled: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(async move {
                let head = format!(
                    "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
                     Content-Length: 1000\r\n\r\n{{"
                );
                stalled_request(addr, &head, Duration::from_secs(30)).await
            })
        })
        .collect();
    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    // The stalled requests hold both permits once the gateway has read
    // their headers; until then a request may still get through.
    let mut over = None;
    for _ in 0..100 {
        let r = client
            .post(format!("{base}/v1/events"))
            .bearer_auth(KEY)
            .body("{}")
            .send()
            .await
            .unwrap();
        if r.status() == 503 {
            over = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let over = over.expect("no 503 while two requests hold both permits");
    assert_eq!(
        over.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: serde_json::Value = over.json().await.unwrap();
    assert_eq!(body["error"], "overloaded");
    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    for s in stalled {
        let status = s.await.unwrap();
        assert!(status.starts_with("HTTP/1.1 408"), "{status:?}");
    }
    let after = client
        .post(format!("{base}/v1/events"))
        .bearer_auth(KEY)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 400);
}
