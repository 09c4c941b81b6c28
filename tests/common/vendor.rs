//! A vendor fake spoken to the way the sink speaks to it, without Kafka:
//! send what `map` built, classify what comes back.

use switchyard::delivery::Delivery;
use switchyard::sink::destination::{Destination, Outcome, Request, Response};

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
        let got = dest.classify(&resp, &batch[req.events.clone()]);
        assert_eq!(got.len(), req.events.len(), "one outcome per event");
        for (slot, o) in out[req.events.clone()].iter_mut().zip(got) {
            *slot = Some(o);
        }
    }
    out.into_iter()
        .map(|o| o.expect("every event is in a request"))
        .collect()
}
