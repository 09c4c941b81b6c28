//! The pure parts of one round of a batch: which rows are mapped together
//! (a split shrinks the requests of the rows it hit), which requests must go
//! one after another (they carry the same person), and what an event's
//! several answers add up to.

use std::collections::HashMap;

use super::destination::{Destination, Outcome, Request};
use crate::delivery::Delivery;

/// One request of the round and the round's rows it carries.
#[derive(Debug)]
pub struct Call {
    pub request: Request,
    /// The round's rows, parallel to `request.rows`.
    pub rows: Vec<usize>,
    /// Which group's deliveries `map` saw (see [`Planned::batch`]).
    group: usize,
}

/// The requests of a round, in the order one person's must be sent.
pub struct Planned {
    /// The deliveries each `map` call saw; `None` = the round's own rows.
    groups: Vec<Option<Vec<Delivery>>>,
    pub calls: Vec<Call>,
}

impl Planned {
    /// The batch `call`'s request was mapped from, which `classify` needs
    /// to read its `rows`.
    pub fn batch<'a>(&'a self, call: &Call, round: &'a [Delivery]) -> &'a [Delivery] {
        self.groups[call.group].as_deref().unwrap_or(round)
    }
}

/// Maps the round's rows into requests, leaving out the calls that already
/// delivered their rows (`done`: per row, the endpoints whose every call
/// delivered it in an earlier round). Rows without a cap or a done endpoint
/// are mapped in one call; the others are mapped with the rows next to them
/// in the same state, at most their cap at a time, so the vendor builds
/// smaller requests for them and every request of such a group is either
/// done for all its rows or for none. Requests come out ordered by their
/// first row, which keeps each person's requests in the order of their
/// events.
pub fn plan(
    vendor: &dyn Destination,
    round: &[Delivery],
    caps: &[Option<usize>],
    done: &[&[&'static str]],
) -> Planned {
    debug_assert_eq!(round.len(), caps.len());
    debug_assert_eq!(round.len(), done.len());
    let plain = |r: usize| caps[r].is_none() && done[r].is_empty();
    let mut groups: Vec<Option<Vec<Delivery>>> = Vec::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    if (0..round.len()).all(plain) {
        groups.push(None);
        members.push((0..round.len()).collect());
    } else {
        let free: Vec<usize> = (0..round.len()).filter(|&r| plain(r)).collect();
        if !free.is_empty() {
            members.push(free);
        }
        let mut chunk: Vec<usize> = Vec::new();
        for r in (0..round.len()).filter(|&r| !plain(r)) {
            let cap = caps[r].unwrap_or(usize::MAX).max(1);
            let same = chunk
                .last()
                .is_some_and(|&p| caps[p] == caps[r] && done[p] == done[r]);
            if !chunk.is_empty() && (!same || chunk.len() >= cap) {
                members.push(std::mem::take(&mut chunk));
            }
            chunk.push(r);
        }
        if !chunk.is_empty() {
            members.push(chunk);
        }
        groups = members
            .iter()
            .map(|m| Some(m.iter().map(|&r| round[r].clone()).collect()))
            .collect();
    }
    let mut calls = Vec::new();
    for (group, rows) in members.iter().enumerate() {
        let batch = groups[group].as_deref().unwrap_or(round);
        for request in vendor.map(batch) {
            let rows = request
                .rows
                .iter()
                .filter_map(|&i| rows.get(i).copied())
                .collect::<Vec<usize>>();
            // The group's rows share their done endpoints: all or none.
            if rows
                .first()
                .is_some_and(|&r| done[r].contains(&request.endpoint))
            {
                continue;
            }
            calls.push(Call {
                request,
                rows,
                group,
            });
        }
    }
    calls.sort_by_key(|c| c.rows.iter().min().copied().unwrap_or(usize::MAX));
    Planned { groups, calls }
}

/// Groups the calls into lanes: calls that carry a common person share a
/// lane and go one after another in their order; lanes run side by side.
pub fn lanes<'a>(calls: &[Call], person: impl Fn(usize) -> &'a str) -> Vec<Vec<usize>> {
    let mut parent: Vec<usize> = (0..calls.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (c, call) in calls.iter().enumerate() {
        for &r in &call.rows {
            match seen.get(person(r)) {
                Some(&other) => {
                    let (a, b) = (root(&mut parent, other), root(&mut parent, c));
                    parent[a.max(b)] = a.min(b);
                }
                None => {
                    seen.insert(person(r), c);
                }
            }
        }
    }
    let mut lanes: Vec<Vec<usize>> = Vec::new();
    let mut lane_of: HashMap<usize, usize> = HashMap::new();
    for c in 0..calls.len() {
        let r = root(&mut parent, c);
        let l = *lane_of.entry(r).or_insert_with(|| {
            lanes.push(Vec::new());
            lanes.len() - 1
        });
        lanes[l].push(c);
    }
    lanes
}

/// Adds to `done` the endpoints every call of which delivered the row this
/// round (`calls`: each call's endpoint and whether it delivered the row).
pub fn note_done(done: &mut Vec<&'static str>, calls: &[(&'static str, bool)]) {
    for &(endpoint, _) in calls {
        let all = calls
            .iter()
            .filter(|(e, _)| *e == endpoint)
            .all(|(_, ok)| *ok);
        if all && !done.contains(&endpoint) {
            done.push(endpoint);
        }
    }
    done.sort_unstable();
}

/// The outcome a row gets from one call of `rows_in_call` rows: a split of a
/// request that held only this row cannot help, so the row is refused.
pub fn settle(outcome: Outcome, rows_in_call: usize, status: Option<u16>) -> Outcome {
    match outcome {
        Outcome::Split if rows_in_call <= 1 => Outcome::Rejected {
            class: "too_large".into(),
            reason: format!(
                "the vendor refused a request holding only this event as too large{}",
                status.map(|s| format!(" (HTTP {s})")).unwrap_or_default()
            ),
        },
        o => o,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destinations::test_support;
    use crate::sink::destination::{Classified, Limits, Response};

    const NONE_DONE: &[&str] = &[];

    fn delivery(person: &str, n: usize) -> Delivery {
        let event = serde_json::json!({
            "event": "purchase", "event_id": format!("e{n}"), "occurred_at": "2026-11-26T14:03:11Z",
            "user_id": person, "value": 10.0, "currency": "EUR"
        });
        test_support::delivery("d", "purchase", event, serde_json::json!({}))
    }

    type MapFn = Box<dyn Fn(&[Delivery]) -> Vec<Request> + Send + Sync>;

    /// A vendor that maps by `0` and takes everything.
    struct Mapped(MapFn);

    impl Destination for Mapped {
        fn limits(&self) -> Limits {
            Limits {
                max_events: 100,
                max_bytes: 1 << 20,
                max_event_age: None,
            }
        }
        fn vendor_dedup(&self) -> bool {
            true
        }
        fn map(&self, batch: &[Delivery]) -> Vec<Request> {
            (self.0)(batch)
        }
        fn classify(&self, request: &Request, _: &Response, _: &[Delivery]) -> Classified {
            Classified {
                rows: vec![Outcome::Delivered; request.rows.len()],
                throttle: false,
            }
        }
    }

    fn post(endpoint: &'static str, rows: std::ops::Range<usize>) -> Request {
        Request::post(
            endpoint,
            format!("http://v/{endpoint}"),
            vec![],
            vec![],
            rows,
        )
    }

    /// Every row in one request to `/profiles`, then each person's rows in
    /// their own request to `/events`.
    fn two_endpoints() -> Mapped {
        Mapped(Box::new(|batch| {
            let mut out = vec![post("profiles", 0..batch.len())];
            let mut start = 0;
            for i in 1..=batch.len() {
                if i == batch.len() || batch[i].key() != batch[start].key() {
                    out.push(post("events", start..i));
                    start = i;
                }
            }
            out
        }))
    }

    /// Rows packed into requests of at most `max`.
    fn packs(max: usize) -> Mapped {
        Mapped(Box::new(move |batch| {
            (0..batch.len())
                .step_by(max)
                .map(|s| post("events", s..(s + max).min(batch.len())))
                .collect()
        }))
    }

    #[test]
    fn a_batch_whose_rows_go_to_two_endpoints() {
        let round = vec![delivery("a", 0), delivery("a", 1), delivery("b", 2)];
        let planned = plan(&two_endpoints(), &round, &[None; 3], &[NONE_DONE; 3]);
        let shape: Vec<(&str, Vec<usize>)> = planned
            .calls
            .iter()
            .map(|c| (c.request.endpoint, c.rows.clone()))
            .collect();
        assert_eq!(
            shape,
            vec![
                ("profiles", vec![0, 1, 2]),
                ("events", vec![0, 1]),
                ("events", vec![2])
            ]
        );
        // The profile call carries both people: everything is one lane, in
        // map's order, so no event overtakes its person's profile.
        let l = lanes(&planned.calls, |r| round[r].key());
        assert_eq!(l, vec![vec![0, 1, 2]]);
        for c in &planned.calls {
            assert!(std::ptr::eq(planned.batch(c, &round), round.as_slice()));
        }
    }

    #[test]
    fn requests_of_different_people_run_side_by_side_and_one_persons_in_order() {
        let round: Vec<Delivery> = [("a", 0), ("b", 1), ("a", 2), ("c", 3), ("b", 4), ("d", 5)]
            .iter()
            .map(|&(p, n)| delivery(p, n))
            .collect();
        let planned = plan(&packs(1), &round, &[None; 6], &[NONE_DONE; 6]);
        let l = lanes(&planned.calls, |r| round[r].key());
        assert_eq!(l, vec![vec![0, 2], vec![1, 4], vec![3], vec![5]]);
        // A request that carries two people joins their lanes, keeping order.
        let planned = plan(&packs(2), &round, &[None; 6], &[NONE_DONE; 6]);
        let l = lanes(&planned.calls, |r| round[r].key());
        assert_eq!(l, vec![vec![0, 1, 2]]);
    }

    #[test]
    fn capped_rows_are_mapped_in_smaller_groups_and_keep_their_order() {
        let round: Vec<Delivery> = (0..7).map(|n| delivery(&format!("p{n}"), n)).collect();
        // Rows 1..5 were in a request of 4 that was too large: cap 2.
        let caps = [None, Some(2), Some(2), Some(2), Some(2), None, Some(1)];
        let planned = plan(&packs(100), &round, &caps, &[NONE_DONE; 7]);
        let rows: Vec<Vec<usize>> = planned.calls.iter().map(|c| c.rows.clone()).collect();
        assert_eq!(rows, vec![vec![0, 5], vec![1, 2], vec![3, 4], vec![6]]);
        // classify reads a capped call's rows from the deliveries map saw.
        let c = &planned.calls[2];
        let batch = planned.batch(c, &round);
        let ids: Vec<&str> = c
            .request
            .deliveries(batch)
            .map(|d| d.event.event_id.as_str())
            .collect();
        assert_eq!(ids, vec!["e3", "e4"]);
    }

    #[test]
    fn calls_that_already_delivered_their_rows_are_left_out() {
        let round = vec![delivery("a", 0), delivery("a", 1), delivery("b", 2)];
        // Rows 0 and 1 had their profile call delivered; row 2 had nothing.
        let done: [&[&'static str]; 3] = [&["profiles"], &["profiles"], &[]];
        let planned = plan(&two_endpoints(), &round, &[None; 3], &done);
        let shape: Vec<(&str, Vec<usize>)> = planned
            .calls
            .iter()
            .map(|c| (c.request.endpoint, c.rows.clone()))
            .collect();
        assert_eq!(
            shape,
            vec![
                ("events", vec![0, 1]),
                ("profiles", vec![2]),
                ("events", vec![2])
            ]
        );
    }

    #[test]
    fn an_endpoint_is_done_only_when_every_call_to_it_delivered() {
        let mut done = Vec::new();
        note_done(
            &mut done,
            &[("profiles", true), ("events", false), ("profiles", true)],
        );
        assert_eq!(done, vec!["profiles"]);
        note_done(&mut done, &[("events", true), ("events", false)]);
        assert_eq!(done, vec!["profiles"]);
        note_done(&mut done, &[("events", true)]);
        assert_eq!(done, vec!["events", "profiles"]);
    }

    #[test]
    fn a_split_of_a_single_row_is_a_refusal() {
        assert_eq!(settle(Outcome::Split, 4, Some(413)), Outcome::Split);
        let Outcome::Rejected { class, reason } = settle(Outcome::Split, 1, Some(413)) else {
            panic!("not refused")
        };
        assert_eq!(class, "too_large");
        assert!(reason.contains("HTTP 413"), "{reason}");
        assert_eq!(settle(Outcome::Delivered, 1, None), Outcome::Delivered);
    }
}
