//! A vendor fake spoken to the way the sink speaks to it, without Kafka:
//! send what `map` built, classify what comes back.

use std::sync::Arc;

use switchyard::config::Config;
use switchyard::delivery::Delivery;
use switchyard::router::dedup::PartitionDedup;
use switchyard::router::pipeline::{Batch, InRecord, Pipeline};
use switchyard::sink::destination::{
    Destination, Outcome, Request, Response, classify_all, merge_rows,
};

/// `raw` as destination `dest` receives it, routed by the router's own step
/// chain. A fresh pipeline: the event's own identity hints are all it knows.
pub fn routed(config: &Config, dest: &str, raw: &serde_json::Value) -> Delivery {
    let mut pipeline = Pipeline::new(Arc::new(config.clone()));
    // One input partition, so every event_id's home is the record's own.
    pipeline.set_layout(1, &config.topics.dedup());
    pipeline.install(0, PartitionDedup::default());
    let payload = raw.to_string();
    let rec = InRecord {
        partition: 0,
        offset: 0,
        key: raw["event_id"].as_str().map(str::as_bytes),
        payload: Some(payload.as_bytes()),
        timestamp_ms: None,
    };
    let mut batch = Batch::default();
    pipeline.process(&rec, 1_700_000_000, &mut batch);
    let topic = config.topics.deliver(dest);
    let out = batch
        .records()
        .find(|o| o.topic == topic)
        .unwrap_or_else(|| panic!("not routed to {dest}: {raw}"));
    serde_json::from_slice(out.payload.expect("a delivery has a payload")).expect("a delivery")
}

/// POSTs `body` and returns the answer as `classify` sees it.
pub async fn send_raw(
    http: &reqwest::Client,
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> Response {
    let mut rb = http.post(url).body(body);
    for (k, v) in headers {
        rb = rb.header(k, v);
    }
    let resp = rb.send().await.expect("the fake answers");
    Response {
        status: resp.status().as_u16(),
        headers: resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    v.to_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
        body: resp.bytes().await.expect("body").to_vec(),
    }
}

pub async fn send(http: &reqwest::Client, req: &Request) -> Response {
    send_raw(http, &req.url, &req.headers, req.body.clone()).await
}

/// Maps `batch`, sends every request and classifies; one outcome per event.
pub async fn deliver(
    dest: &dyn Destination,
    http: &reqwest::Client,
    batch: &[Delivery],
) -> Vec<Outcome> {
    deliver_tampered(dest, http, batch, &|_| {}).await
}

/// As [`deliver`], with `tamper` breaking each request before it goes.
pub async fn deliver_tampered(
    dest: &dyn Destination,
    http: &reqwest::Client,
    batch: &[Delivery],
    tamper: &dyn Fn(&mut Request),
) -> Vec<Outcome> {
    let mut out: Vec<Option<Outcome>> = vec![None; batch.len()];
    for mut req in dest.map(batch) {
        tamper(&mut req);
        let resp = send(http, &req).await;
        let got = dest.classify(&req, &resp, batch);
        assert_eq!(got.rows.len(), req.rows.len(), "one outcome per row");
        merge_rows(&mut out, &req, got);
    }
    out.into_iter()
        .map(|o| o.expect("every event is in a request"))
        .collect()
}

/// What the sink would make of `resp` as the answer to every request `dest`
/// maps `batch` into: one outcome per row of the batch.
pub fn classify(dest: &dyn Destination, resp: &Response, batch: &[Delivery]) -> Vec<Outcome> {
    classify_all(dest, resp, batch)
        .into_iter()
        .map(|o| o.expect("every event is in a request"))
        .collect()
}

/// Whether `dest` reads `resp` (to the first request of `batch`) as a
/// request to slow down.
pub fn throttle(dest: &dyn Destination, resp: &Response, batch: &[Delivery]) -> bool {
    let req = &dest.map(batch)[0];
    dest.classify(req, resp, batch).throttle
}

/// The rows of each request as a range (a request whose rows are not one
/// run fails the test).
pub fn ranges(reqs: &[Request]) -> Vec<std::ops::Range<usize>> {
    reqs.iter()
        .map(|r| r.range().unwrap_or_else(|| panic!("{:?}", r.rows)))
        .collect()
}
