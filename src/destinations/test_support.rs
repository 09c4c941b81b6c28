//! Builders the destinations' unit tests share.

use serde_json::Value;

use super::Vendor;
use crate::delivery::{DELIVERY_VERSION, Delivery, Origin};
use crate::settings::Problem;
use crate::sink::destination::{Destination, Outcome, Request, Response, classify_all};

/// `base` with `overrides` laid over it (a null removes the field), as the
/// router would hand it to `destination` under the vendor name `name`.
pub fn delivery(destination: &str, name: &str, mut base: Value, overrides: Value) -> Delivery {
    if let (Some(b), Value::Object(over)) = (base.as_object_mut(), overrides) {
        for (k, v) in over {
            if v.is_null() {
                b.remove(&k);
            } else {
                b.insert(k, v);
            }
        }
    }
    Delivery {
        v: DELIVERY_VERSION,
        destination: destination.into(),
        name: name.into(),
        event: serde_json::from_value(base).expect("a canonical event"),
        origin: Origin {
            topic: format!("switchyard.deliver.{destination}"),
            partition: 0,
            offset: 1,
        },
        routed_at: "2026-11-26T14:03:12Z".parse().expect("a time"),
    }
}

/// The vendor settings in `text` (a destination's keys but the common
/// ones), read and checked as `switchyard check` does, each problem named
/// under `key`.
pub fn vendor(type_name: &str, key: &str, text: &str) -> Result<Vendor, Vec<Problem>> {
    let table: toml::Table = toml::from_str(text).expect("TOML");
    let vendor = Vendor::parse(type_name, toml::Value::Table(table), key).map_err(|p| vec![p])?;
    let mut problems = Vec::new();
    vendor.check(key, &mut problems);
    if problems.is_empty() {
        Ok(vendor)
    } else {
        Err(problems)
    }
}

/// A request's JSON body.
pub fn body(r: &Request) -> Value {
    serde_json::from_slice(&r.body).expect("a JSON body")
}

/// A 200 answer with `body`.
pub fn ok(body: Value) -> Response {
    Response {
        status: 200,
        headers: vec![],
        body: serde_json::to_vec(&body).expect("serialising to memory"),
    }
}

/// What the runtime would make of `response` as the answer to every request
/// `vendor` maps `batch` into: one outcome per row of the batch.
pub fn classify(vendor: &dyn Destination, response: &Response, batch: &[Delivery]) -> Vec<Outcome> {
    classify_all(vendor, response, batch)
        .into_iter()
        .enumerate()
        .map(|(i, o)| o.unwrap_or_else(|| panic!("row {i} travelled in no request")))
        .collect()
}

/// Whether `vendor` reads `response` (to the first request of `batch`) as
/// a request to slow down.
pub fn throttle(vendor: &dyn Destination, response: &Response, batch: &[Delivery]) -> bool {
    let request = &vendor.map(batch)[0];
    vendor.classify(request, response, batch).throttle
}

/// The rows of each request as a range (a request whose rows are not one
/// run fails the test).
pub fn ranges(requests: &[Request]) -> Vec<std::ops::Range<usize>> {
    requests
        .iter()
        .map(|r| r.range().unwrap_or_else(|| panic!("{:?}", r.rows)))
        .collect()
}
