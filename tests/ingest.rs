//! The HTTP ingest gateway against a real broker (tansu): every endpoint's
//! happy path lands canonical events keyed by event_id, and every refusal
//! has the right status and body and publishes nothing.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::{Value, json};
use sha1::Sha1;

use switchyard::config::Config;
use switchyard::ingest::{self, Spawned};

const PROD_KEY: &str = "prod_0123456789abcdef";
const STAGING_KEY: &str = "stag_0123456789abcdef";
const CANONICAL_ONLY_KEY: &str = "only_0123456789abcdef";
const SEGMENT_SECRET: &str = "whsec_0123456789abcdef";
const PARTITIONS: i32 = 3;

struct Topics {
    canonical: String,
    staging: String,
}

async fn create_topics() -> Topics {
    let t = Topics {
        canonical: common::unique("ingest-canonical"),
        staging: common::unique("ingest-staging"),
    };
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .create()
        .expect("admin client");
    // The staging topic is left to the gateway, which creates it at start.
    let new = [NewTopic::new(
        &t.canonical,
        PARTITIONS,
        TopicReplication::Fixed(1),
    )];
    for r in admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .expect("create topics")
    {
        r.expect("topic created");
    }
    t
}

fn config(topics: &Topics, extra: &str) -> Config {
    let text = format!(
        r#"
[kafka]
brokers = "{brokers}"
guarantee = "at_least_once"
[topics]
canonical = "{canonical}"
[router]
max_record_bytes = 2048
[ingest]
body_limit_bytes = 8192
produce_timeout = "3s"
staging_topic = "{staging}"
{extra}
[[ingest.keys]]
key = "{PROD_KEY}"
source = "checkout-api"
environment = "production"
segment_shared_secret = "{SEGMENT_SECRET}"
[[ingest.keys]]
key = "{STAGING_KEY}"
source = "checkout-staging"
environment = "staging"
[[ingest.keys]]
key = "{CANONICAL_ONLY_KEY}"
source = "billing"
environment = "production"
routes = ["canonical"]
"#,
        brokers = common::brokers(),
        canonical = topics.canonical,
        staging = topics.staging,
    );
    Config::parse(&text, Path::new("ingest-test.toml"), &|_| None).expect("test config")
}

async fn start(config: Config) -> (Spawned, String) {
    let g = ingest::spawn(
        Arc::new(config),
        common::brokers(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .expect("gateway starts");
    let base = format!("http://{}", g.addr);
    // /readyz turns 200 once the broker answers for the canonical topic.
    let client = reqwest::Client::new();
    for _ in 0..100 {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            return (g, base);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gateway never became ready");
}

/// Every record on `topic` (key, JSON payload), reading until `expected`
/// records arrived or `idle` passed without a new one.
fn consume(topic: &str, expected: usize, idle: Duration) -> Vec<(String, Value)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .set("group.id", common::unique("ingest-test"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut last = std::time::Instant::now();
    while out.len() < expected || expected == 0 {
        if last.elapsed() > idle {
            break;
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let key = String::from_utf8(m.key().expect("record has a key").to_vec()).unwrap();
                let value: Value = serde_json::from_slice(m.payload().expect("payload")).unwrap();
                out.push((key, value));
                last = std::time::Instant::now();
            }
            Some(Err(e)) => panic!("consume: {e}"),
            None => {}
        }
    }
    out
}

fn event(id: &str, name: &str) -> Value {
    let mut e = json!({
        "event": name,
        "event_id": id,
        "occurred_at": "2026-11-26T10:00:00Z",
        "user_id": "u-1",
    });
    if name == "purchase" {
        e["value"] = json!(10.5);
        e["currency"] = json!("EUR");
    }
    e
}

fn sign(body: &[u8], prefix: &str) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(SEGMENT_SECRET.as_bytes()).unwrap();
    mac.update(prefix.as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn gzip(body: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(body).unwrap();
    e.finish().unwrap()
}

async fn expect(resp: reqwest::Response, status: u16) -> Value {
    let got = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert_eq!(got, status, "{text}");
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not a JSON body: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_lands_canonical_events_keyed_by_event_id() {
    let topics = create_topics().await;
    let (gateway, base) = start(config(&topics, "")).await;
    let http = reqwest::Client::new();
    let run = common::unique("r");
    let id = |n: &str| format!("{run}-{n}");

    // Native: one event, then a batch.
    let single = expect(
        http.post(format!("{base}/v1/events"))
            .bearer_auth(PROD_KEY)
            .json(&event(&id("native-1"), "purchase"))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(single["accepted"], 1);
    let batch =
        json!({"batch": [event(&id("native-2"), "lead"), event(&id("native-3"), "sign_up")]});
    let b = expect(
        http.post(format!("{base}/v1/events"))
            .bearer_auth(PROD_KEY)
            .json(&batch)
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(
        b["results"][1],
        json!({"index": 1, "status": "accepted", "event_id": id("native-3")})
    );

    // Segment webhook, signed; one unmapped name is accepted, not published.
    let hook = serde_json::to_vec(&json!({"batch": [
        {"type": "track", "event": "Order Completed", "messageId": id("seg-hook"), "userId": "u-9",
         "timestamp": "2026-11-26T10:00:00Z", "properties": {"revenue": 20, "currency": "USD", "orderId": "o-1"}},
        {"type": "track", "event": "Coupon Applied", "messageId": id("seg-unmapped"), "userId": "u-9"}
    ]}))
    .unwrap();
    let h = expect(
        http.post(format!("{base}/segment/events"))
            .header("X-Signature", sign(&hook, ""))
            .header("Content-Type", "application/json")
            .body(hook)
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(
        (h["accepted"].as_u64(), h["unmapped"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(h["results"][1]["name"], "Coupon Applied");
    // With a signed timestamp.
    let hook_ts = serde_json::to_vec(&json!({"type": "identify", "messageId": id("seg-hook-ts"),
        "userId": "u-9", "traits": {"plan": "pro"}, "timestamp": "2026-11-26T10:00:00Z"}))
    .unwrap();
    let now = chrono::Utc::now().timestamp().to_string();
    expect(
        http.post(format!("{base}/segment/events"))
            .header("X-Signature", sign(&hook_ts, &format!("{now}.")))
            .header("X-Switchyard-Timestamp", &now)
            .body(hook_ts)
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;

    // Segment HTTP Tracking API, write key as Basic-auth user.
    for (path, body) in [
        (
            "/v1/track",
            json!({"event": "Product Added", "messageId": id("seg-track"), "anonymousId": "a-1",
                             "timestamp": "2026-11-26T10:00:00Z"}),
        ),
        (
            "/v1/identify",
            json!({"messageId": id("seg-identify"), "userId": "u-1", "traits": {"email": "a@b.example"},
                                "timestamp": "2026-11-26T10:00:00Z"}),
        ),
        (
            "/v1/page",
            json!({"messageId": id("seg-page"), "anonymousId": "a-1", "name": "Home",
                            "properties": {"url": "https://shop.example/"}, "timestamp": "2026-11-26T10:00:00Z"}),
        ),
        (
            "/v1/batch",
            json!({"batch": [{"type": "track", "event": "Signed Up", "messageId": id("seg-batch"),
                                        "userId": "u-2", "timestamp": "2026-11-26T10:00:00Z"}]}),
        ),
    ] {
        let r = expect(
            http.post(format!("{base}{path}"))
                .basic_auth(PROD_KEY, Some(""))
                .json(&body)
                .send()
                .await
                .unwrap(),
            200,
        )
        .await;
        assert_eq!(r["success"], true, "{path}");
    }

    // Mixpanel /track: JSON array, then the form with base64 data.
    let mp = |n: &str, name: &str| {
        json!({"event": name, "properties": {"token": PROD_KEY, "distinct_id": "u-3",
        "$insert_id": id(n), "time": 1_790_000_000, "$amount": 5, "$currency": "USD"}})
    };
    let m = expect(
        http.post(format!("{base}/mixpanel/track"))
            .json(&json!([mp("mp-json", "Purchase Completed")]))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(m["status"], 1);
    use base64::Engine as _;
    let data = base64::engine::general_purpose::STANDARD
        .encode(serde_json::to_vec(&mp("mp-form", "Checkout Started")).unwrap());
    expect(
        http.post(format!("{base}/mixpanel/track"))
            .form(&[("data", data)])
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;

    // PostHog: capture, then a gzip batch on the trailing-slash path.
    expect(
        http.post(format!("{base}/posthog/capture"))
            .json(
                &json!({"api_key": PROD_KEY, "event": "Product Viewed", "distinct_id": "u-4",
                          "uuid": id("ph-capture"), "timestamp": "2026-11-26T10:00:00Z",
                          "properties": {"$anon_id": "a-4"}}),
            )
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let ph = serde_json::to_vec(&json!({"api_key": PROD_KEY, "batch": [
        {"event": "$identify", "distinct_id": "u-5", "uuid": id("ph-batch"), "timestamp": "2026-11-26T10:00:00Z",
         "properties": {"$set": {"plan": "team"}}}]}))
    .unwrap();
    let p = expect(
        http.post(format!("{base}/posthog/batch/"))
            .header("Content-Encoding", "gzip")
            .body(gzip(&ph))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    assert_eq!(p["status"], 1);

    // A staging key lands on the staging topic only.
    expect(
        http.post(format!("{base}/v1/events"))
            .bearer_auth(STAGING_KEY)
            .json(&event(&id("staging"), "lead"))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;

    let expected = [
        ("native-1", "purchase"),
        ("native-2", "lead"),
        ("native-3", "sign_up"),
        ("seg-hook", "purchase"),
        ("seg-hook-ts", "identify"),
        ("seg-track", "add_to_cart"),
        ("seg-identify", "identify"),
        ("seg-page", "custom.page_viewed"),
        ("seg-batch", "sign_up"),
        ("mp-json", "purchase"),
        ("mp-form", "begin_checkout"),
        ("ph-capture", "view_content"),
        ("ph-batch", "identify"),
    ];
    let records = consume(&topics.canonical, expected.len(), Duration::from_secs(15));
    assert_eq!(records.len(), expected.len(), "{records:#?}");
    for (n, name) in expected {
        let (key, value) = records
            .iter()
            .find(|(k, _)| *k == id(n))
            .unwrap_or_else(|| panic!("{n} not on the topic: {records:#?}"));
        assert_eq!(value["event_id"], json!(key), "keyed by event_id");
        assert_eq!(value["event"], name, "{n}");
        assert_eq!(value["source"], "checkout-api", "{n}");
        assert!(
            switchyard::event::parse_event(&serde_json::to_vec(value).unwrap()).is_ok(),
            "{n} is not a valid canonical event: {value}"
        );
    }
    let seg = &records
        .iter()
        .find(|(k, _)| *k == id("seg-hook"))
        .unwrap()
        .1;
    assert_eq!(
        (seg["value"].as_f64(), seg["order_id"].as_str()),
        (Some(20.0), Some("o-1"))
    );
    let staged = consume(&topics.staging, 1, Duration::from_secs(10));
    assert_eq!(staged.len(), 1);
    assert_eq!(staged[0].0, id("staging"));
    assert_eq!(staged[0].1["source"], "checkout-staging");

    gateway.shutdown.cancel();
    gateway.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_have_the_right_status_and_body_and_publish_nothing() {
    let topics = create_topics().await;
    let (gateway, base) = start(config(&topics, "")).await;
    let http = reqwest::Client::new();
    let valid = event(&common::unique("never"), "lead");
    let valid_bytes = serde_json::to_vec(&valid).unwrap();

    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "no key",
            http.post(format!("{base}/v1/events")).json(&valid),
            401,
            "missing_key",
        ),
        (
            "wrong key",
            http.post(format!("{base}/v1/events"))
                .bearer_auth("wrong_0123456789abcdef")
                .json(&valid),
            401,
            "unknown_key",
        ),
        (
            "staging key sending to production",
            http.post(format!("{base}/v1/events"))
                .bearer_auth(STAGING_KEY)
                .header("X-Switchyard-Environment", "production")
                .json(&valid),
            403,
            "environment_mismatch",
        ),
        (
            "route not allowed",
            http.post(format!("{base}/v1/track"))
                .basic_auth(CANONICAL_ONLY_KEY, Some(""))
                .json(&json!({"event": "Signed Up", "messageId": "m", "userId": "u"})),
            403,
            "route_not_allowed",
        ),
        (
            "bad signature",
            http.post(format!("{base}/segment/events"))
                .header("X-Signature", sign(b"something else", ""))
                .body(valid_bytes.clone()),
            401,
            "bad_signature",
        ),
        (
            "missing signature",
            http.post(format!("{base}/segment/events"))
                .body(valid_bytes.clone()),
            401,
            "missing_signature",
        ),
        (
            "expired timestamp",
            {
                let old = (chrono::Utc::now().timestamp() - 3600).to_string();
                http.post(format!("{base}/segment/events"))
                    .header("X-Signature", sign(&valid_bytes, &format!("{old}.")))
                    .header("X-Switchyard-Timestamp", old)
                    .body(valid_bytes.clone())
            },
            401,
            "stale_timestamp",
        ),
        (
            "timestamp not covered by the signature",
            http.post(format!("{base}/segment/events"))
                .header("X-Signature", sign(&valid_bytes, ""))
                .header(
                    "X-Switchyard-Timestamp",
                    chrono::Utc::now().timestamp().to_string(),
                )
                .body(valid_bytes.clone()),
            401,
            "bad_signature",
        ),
        (
            "oversize body",
            http.post(format!("{base}/v1/events"))
                .bearer_auth(PROD_KEY)
                .body(vec![b' '; 9000]),
            413,
            "body_too_large",
        ),
        (
            "oversize after gzip",
            http.post(format!("{base}/posthog/batch"))
                .header("Content-Encoding", "gzip")
                .body(gzip(&vec![b' '; 20_000])),
            413,
            "body_too_large",
        ),
        (
            "mixpanel oversize after gzip",
            http.post(format!("{base}/mixpanel/track"))
                .header("Content-Encoding", "gzip")
                .body(gzip(&vec![b' '; 20_000])),
            413,
            "body_too_large",
        ),
        (
            "wrong write key, checked before the body is inflated",
            http.post(format!("{base}/v1/batch"))
                .basic_auth("wrong_0123456789abcdef", Some(""))
                .header("Content-Encoding", "gzip")
                .body(gzip(&vec![b' '; 20_000])),
            401,
            "unknown_key",
        ),
        (
            "unknown endpoint",
            http.post(format!("{base}/v2/events")).json(&valid),
            404,
            "not_found",
        ),
        (
            "wrong method",
            http.get(format!("{base}/v1/events")),
            405,
            "method_not_allowed",
        ),
        (
            "malformed JSON",
            http.post(format!("{base}/v1/events"))
                .bearer_auth(PROD_KEY)
                .body("{\"event\": "),
            400,
            "malformed_json",
        ),
        (
            "event larger than the router takes",
            http.post(format!("{base}/v1/events"))
                .bearer_auth(PROD_KEY)
                .json(&{
                    let mut e = valid.clone();
                    e["properties"] = json!({"blob": "x".repeat(3000)});
                    e
                }),
            413,
            "event_too_large",
        ),
        (
            "another source's event",
            http.post(format!("{base}/v1/events"))
                .bearer_auth(PROD_KEY)
                .json(&{
                    let mut e = valid.clone();
                    e["source"] = json!("someone-else");
                    e
                }),
            400,
            "invalid_event",
        ),
    ];
    for (what, req, status, code) in cases {
        let body = expect(req.send().await.unwrap(), status).await;
        assert_eq!(body["error"], code, "{what}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
    }

    // Schema violations: every one, by JSON pointer.
    let bad = expect(
        http.post(format!("{base}/v1/events"))
            .bearer_auth(PROD_KEY)
            .json(&json!({"event": "purchse", "event_id": "has space", "occurred_at": "yesterday"}))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    assert_eq!(bad["error"], "invalid_event");
    let pointers: Vec<&str> = bad["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["pointer"].as_str().unwrap())
        .collect();
    for p in ["/event", "/event_id", "/occurred_at", ""] {
        assert!(pointers.contains(&p), "{p} missing in {bad}");
    }
    // A batch with one bad item: per-item answer, nothing published.
    let batch = expect(
        http.post(format!("{base}/v1/events"))
            .bearer_auth(PROD_KEY)
            .json(&json!({"batch": [valid, {"event": "lead"}]}))
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    assert_eq!(batch["error"], "invalid_events");
    assert_eq!(batch["results"][0]["status"], "not_published");
    assert_eq!(batch["results"][1]["status"], "invalid");
    assert!(
        !batch["results"][1]["violations"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // Nothing above reached either topic: the only record is this marker.
    let marker = common::unique("marker");
    expect(
        http.post(format!("{base}/v1/events"))
            .bearer_auth(PROD_KEY)
            .json(&event(&marker, "lead"))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let records = consume(&topics.canonical, 0, Duration::from_secs(6));
    let keys: Vec<&str> = records.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, [marker.as_str()]);
    assert!(consume(&topics.staging, 0, Duration::from_secs(3)).is_empty());

    gateway.shutdown.cancel();
    gateway.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_gets_429_and_timestamps_can_be_required() {
    let topics = create_topics().await;
    let (gateway, base) = start(config(
        &topics,
        "rate_limit_per_second = 1\nrate_limit_burst = 3\nrequire_timestamp = true",
    ))
    .await;
    let http = reqwest::Client::new();
    // require_timestamp: a correctly signed webhook call without a timestamp is refused.
    let hook = b"{\"type\":\"track\",\"event\":\"Signed Up\",\"messageId\":\"m\",\"userId\":\"u\"}"
        .to_vec();
    let refused = expect(
        http.post(format!("{base}/segment/events"))
            .header("X-Signature", sign(&hook, ""))
            .body(hook)
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;
    assert_eq!(refused["error"], "missing_timestamp");
    let batch = |n: usize| json!({"batch": (0..n).map(|_| event(&common::unique("rl"), "lead")).collect::<Vec<_>>()});
    let too_big = http
        .post(format!("{base}/v1/events"))
        .bearer_auth(PROD_KEY)
        .json(&batch(4))
        .send()
        .await
        .unwrap();
    assert_eq!(too_big.headers()["retry-after"], "1");
    let body = expect(too_big, 429).await;
    assert_eq!(body["error"], "rate_limited");
    expect(
        http.post(format!("{base}/v1/events"))
            .bearer_auth(PROD_KEY)
            .json(&batch(3))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let over = expect(
        http.post(format!("{base}/v1/events"))
            .bearer_auth(PROD_KEY)
            .json(&batch(1))
            .send()
            .await
            .unwrap(),
        429,
    )
    .await;
    assert!(over["message"].as_str().unwrap().contains("rate"), "{over}");
    // Other keys have their own budget.
    expect(
        http.post(format!("{base}/v1/events"))
            .bearer_auth(CANONICAL_ONLY_KEY)
            .json(&batch(1))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;

    gateway.shutdown.cancel();
    gateway.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics() {
    let topics = create_topics().await;
    let (gateway, base) = start(config(&topics, "")).await;
    let http = reqwest::Client::new();
    expect(
        http.get(format!("{base}/healthz")).send().await.unwrap(),
        200,
    )
    .await;
    let ready = expect(
        http.get(format!("{base}/readyz")).send().await.unwrap(),
        200,
    )
    .await;
    assert_eq!(ready["ready"], true);
    expect(
        http.post(format!("{base}/posthog/capture"))
            .json(&json!({"api_key": PROD_KEY, "event": "Widget Spun", "distinct_id": "u", "uuid": "x"}))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let mut text = String::new();
    let encoder = prometheus::TextEncoder::new();
    encoder
        .encode_utf8(&prometheus::gather(), &mut text)
        .unwrap();
    assert!(
        text.contains(r#"switchyard_ingest_requests_total{route="posthog_capture",status="200"}"#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"switchyard_ingest_unmapped_events_total{name="Widget Spun",source="checkout-api"} 1"#
        ),
        "{text}"
    );
    assert!(text.contains("switchyard_ingest_events_total"), "{text}");

    // A broker that does not answer: not ready, and publishing answers 503.
    let mut down = config(&topics, "");
    down.ingest.produce_timeout = Duration::from_secs(1);
    down.kafka.brokers = Some("127.0.0.1:9".into());
    let g2 = ingest::spawn(
        Arc::new(down),
        "127.0.0.1:9".into(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let base2 = format!("http://{}", g2.addr);
    expect(
        http.get(format!("{base2}/readyz")).send().await.unwrap(),
        503,
    )
    .await;
    let resp = http
        .post(format!("{base2}/v1/events"))
        .bearer_auth(PROD_KEY)
        .json(&event("down-1", "lead"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["retry-after"], "5");
    let body = expect(resp, 503).await;
    assert_eq!(body["error"], "broker_unavailable");
    assert_eq!(body["results"][0]["status"], "not_acknowledged");

    g2.shutdown.cancel();
    gateway.shutdown.cancel();
    gateway.task.await.unwrap().unwrap();
}

#[test]
fn bench_prints_figures_and_ends_with_one_json_line() {
    let out = common::switchyard()
        .args([
            "bench",
            "ingest",
            "--seconds",
            "1",
            "--warmup-seconds",
            "0",
            "--batch",
            "10",
            "--concurrency",
            "2",
        ])
        .output()
        .expect("run switchyard bench ingest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("output");
    let summary: Value = serde_json::from_str(last).expect("last line is JSON");
    assert_eq!(summary["bench"], "ingest");
    assert_eq!(summary["batch"], 10);
    assert!(
        summary["events_per_s_per_core"].as_f64().unwrap() > 0.0,
        "{summary}"
    );
    assert!(summary["p99_ms"].as_f64().unwrap() > 0.0, "{summary}");
    assert_eq!(summary["runs"][0]["broker"], "embedded");
}

#[tokio::test]
async fn without_keys_the_role_idles_until_shutdown_without_binding() {
    let mut config = Config::default();
    // A port that is taken: binding it would fail the role.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    config.ingest.listen = taken.local_addr().unwrap();
    let ctx = switchyard::run::RoleContext {
        config: Arc::new(config),
        bootstrap: "127.0.0.1:9".into(),
        instance_id: "test".into(),
        shutdown: tokio_util::sync::CancellationToken::new(),
    };
    let shutdown = ctx.shutdown.clone();
    let role = tokio::spawn(ingest::run(ctx));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!role.is_finished(), "the role ended before shutdown");
    shutdown.cancel();
    role.await.unwrap().expect("idle role ends cleanly");
}

/// Contact data that vendor SDKs keep among properties and traits is moved
/// into the contact fields at ingest, and the router keeps whatever is left
/// (and what a publisher writes straight to Kafka) from every destination
/// without raw contact: no ad platform's or plain webhook's delivery record
/// holds an address or a phone number, in its value or its headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_raw_email_or_phone_reaches_an_ad_platform_or_a_webhook_without_raw_contact() {
    let _watchdog = common::watchdog("contact leak", Duration::from_secs(300));
    let s = common::router::Setup::new("at_least_once", 3);
    let gateway_config = Config::parse(
        &format!(
            r#"
[kafka]
brokers = "{brokers}"
guarantee = "at_least_once"
[topics]
canonical = "{canonical}"
prefix = "{prefix}"
[ingest]
produce_timeout = "3s"
[[ingest.keys]]
key = "{PROD_KEY}"
source = "web"
environment = "production"
"#,
            brokers = s.brokers,
            canonical = s.canonical,
            prefix = s.prefix,
        ),
        Path::new("leak-test.toml"),
        &|_| None,
    )
    .expect("gateway config");
    let (gateway, base) = start(gateway_config).await;
    let http = reqwest::Client::new();
    let now = chrono::Utc::now();
    let ts = now.to_rfc3339();
    let granted = json!({"consent": {"categoryPreferences": {"ads": true, "analytics": true}}});

    // Every address and number appears once, each under another spelling.
    let emails = [
        "Seg.Track@Example.com",
        "seg.second@example.com",
        "seg.identify@example.com",
        "mp.leak@example.com",
        "ph.leak@example.com",
        "ph.set@example.com",
        "direct.leak@example.com",
        "direct.trait@example.com",
    ];
    let phones = [
        ("+1 415 555 0111", "4155550111"),
        ("+1 415 555 0112", "4155550112"),
        ("+1 415 555 0122", "4155550122"),
        ("+1 415 555 0133", "4155550133"),
        ("+1 415 555 0144", "4155550144"),
    ];
    for (path, body) in [
        (
            "/v1/track",
            json!({"event": "Order Completed", "messageId": "seg-1", "userId": "u-seg",
                "timestamp": ts, "context": granted,
                "properties": {"email": emails[0], "E-Mail": emails[1], "phone": phones[0].0,
                    "revenue": 10, "currency": "USD", "plan": "pro"}}),
        ),
        (
            "/v1/identify",
            json!({"messageId": "seg-2", "userId": "u-seg", "timestamp": ts, "context": granted,
                "traits": {"email": emails[2], "Phone_Number": phones[1].0, "plan": "pro"}}),
        ),
    ] {
        expect(
            http.post(format!("{base}{path}"))
                .basic_auth(PROD_KEY, Some(""))
                .json(&body)
                .send()
                .await
                .unwrap(),
            200,
        )
        .await;
    }
    expect(
        http.post(format!("{base}/mixpanel/track"))
            .json(&json!([{"event": "Purchase Completed", "properties": {
                "token": PROD_KEY, "distinct_id": "u-mp", "$insert_id": "mp-1",
                "time": now.timestamp(), "$email": emails[3], "$phone": phones[2].0,
                "$amount": 5, "$currency": "USD"}}]))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    expect(
        http.post(format!("{base}/posthog/capture"))
            .body(gzip(
                &serde_json::to_vec(&json!({"api_key": PROD_KEY, "event": "Signed Up",
                    "distinct_id": "u-ph", "uuid": "ph-1", "timestamp": ts,
                    "properties": {"email": emails[4], "phone_number": phones[3].0,
                        "$set": {"email": emails[5]}}}))
                .unwrap(),
            ))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    // Straight to Kafka: the router is the last line.
    let direct = json!({"event": "purchase", "event_id": "direct-1", "occurred_at": ts,
        "user_id": "u-direct", "value": 1, "currency": "USD",
        "consent": {"ads": "granted", "analytics": "granted"},
        "properties": {"Email": emails[6], "$phone": phones[4].0, "plan": "pro"},
        "traits": {"e-mail": emails[7]}});
    common::kafka::produce(
        &s.brokers,
        &s.canonical,
        &[(
            Some("direct-1".into()),
            serde_json::to_vec(&direct).unwrap(),
        )],
    )
    .await;

    let mut router = s.router("r1");
    let wait = Duration::from_secs(90);
    // Mixpanel and PostHog events carry no consent: Meta and GA4 (default
    // deny: both receive hashed contact data) get the two that grant it;
    // the webhook (default grant) all five.
    let meta = common::kafka::read_until(&s.brokers, &s.deliver("meta"), wait, |r| r.len() >= 2);
    let ga4 = common::kafka::read_until(&s.brokers, &s.deliver("ga4"), wait, |r| r.len() >= 2);
    let hook = common::kafka::read_until(&s.brokers, &s.deliver("hook"), wait, |r| r.len() >= 5);
    s.stop(&mut router, "r1");
    gateway.shutdown.cancel();
    let _ = gateway.task.await;
    assert_eq!(
        (meta.len(), ga4.len(), hook.len()),
        (2, 2, 5),
        "{}",
        s.logs("r1")
    );

    let forbidden: Vec<String> = emails
        .iter()
        .map(|e| e.to_ascii_lowercase())
        .chain(
            phones
                .iter()
                .flat_map(|(raw, digits)| [raw.to_string(), digits.to_string()]),
        )
        .collect();
    for (topic, records) in [("meta", &meta), ("ga4", &ga4), ("hook", &hook)] {
        for r in records.iter() {
            let mut bytes = String::from_utf8_lossy(r.payload.as_deref().unwrap_or_default())
                .to_ascii_lowercase();
            for (k, v) in &r.headers {
                bytes.push_str(&format!("\n{k}: {v}").to_ascii_lowercase());
            }
            for raw in &forbidden {
                assert!(
                    !bytes.contains(raw.as_str()),
                    "{topic} carries {raw}: {bytes}"
                );
            }
        }
    }
    // The moved values went through the identifier rules: the hashes are
    // of the normalised address and number.
    let by_id: std::collections::HashMap<String, Value> = hook
        .iter()
        .map(|r| {
            let v = r.json();
            (v["event"]["event_id"].as_str().unwrap().to_string(), v)
        })
        .collect();
    let sha = |s: &str| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(s.as_bytes()));
    // (`phone_number` is not a spelling the mappings move, only one the
    // router keeps back.)
    for (id, email, phone) in [
        ("seg-1", "seg.track@example.com", Some("+14155550111")),
        ("mp-1", "mp.leak@example.com", Some("+14155550122")),
        ("ph-1", "ph.leak@example.com", None),
    ] {
        let e = &by_id[id]["event"];
        assert_eq!(e["email_sha256"], json!(sha(email)), "{id}: {e}");
        assert_eq!(e["phone_sha256"], json!(phone.map(sha)), "{id}: {e}");
    }
    assert_eq!(
        by_id["seg-1"]["event"]["properties"],
        json!({"plan": "pro"})
    );
    assert_eq!(
        by_id["direct-1"]["event"]["properties"],
        json!({"plan": "pro"})
    );
}

/// An event that cannot be one record (with the default limits) is the
/// client's problem, answered 413; it never reaches the producer, so it
/// cannot cost a 503 or the gateway's readiness. One just under the limit
/// is published.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_too_large_for_a_record_gets_413_and_readiness_holds() {
    let topics = create_topics().await;
    let text = format!(
        r#"
[kafka]
brokers = "{brokers}"
guarantee = "at_least_once"
[topics]
canonical = "{canonical}"
[ingest]
body_limit_bytes = 2000000
produce_timeout = "10s"
staging_topic = "{staging}"
[[ingest.keys]]
key = "{PROD_KEY}"
source = "checkout-api"
environment = "production"
"#,
        brokers = common::brokers(),
        canonical = topics.canonical,
        staging = topics.staging,
    );
    let config = Config::parse(&text, Path::new("big.toml"), &|_| None).unwrap();
    let limit = config.router.max_record_bytes;
    let (_gateway, base) = start(config).await;
    let http = reqwest::Client::new();
    let sized = |id: &str, size: usize| {
        let mut e = event(id, "lead");
        e["properties"] = json!({"pad": ""});
        let base = serde_json::to_vec(&e).unwrap().len() + r#","source":"checkout-api""#.len();
        e["properties"]["pad"] = json!("x".repeat(size - base));
        e
    };
    let big = common::unique("big");
    let r = expect(
        http.post(format!("{base}/v1/events"))
            .bearer_auth(PROD_KEY)
            .json(&sized(&big, 1_000_000 - 100))
            .send()
            .await
            .unwrap(),
        413,
    )
    .await;
    assert_eq!(r["error"], "event_too_large", "{r}");
    expect(
        http.get(format!("{base}/readyz")).send().await.unwrap(),
        200,
    )
    .await;
    let fits = common::unique("fits");
    expect(
        http.post(format!("{base}/v1/events"))
            .bearer_auth(PROD_KEY)
            .json(&sized(&fits, limit - 1000))
            .send()
            .await
            .unwrap(),
        200,
    )
    .await;
    let got = consume(&topics.canonical, 1, Duration::from_secs(10));
    let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, [fits.as_str()]);
}
