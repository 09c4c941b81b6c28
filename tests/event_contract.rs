//! The canonical event contract, checked from both sides: the JSON Schema in
//! `schemas/canonical-event.v1.json` (through an independent JSON Schema
//! implementation, formats on) and switchyard's hand-written validator must
//! agree on every corpus case about validity and about where the problems
//! are. `parse_event`'s fast path must in turn give exactly what the
//! reference path (`parse_event_slow`) gives, on the same cases and more.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{Value, json};
use switchyard::event::validate::parse_event_slow;
use switchyard::event::{
    NdjsonSummary, SCHEMA_JSON, check_ndjson, check_value, parse_event, validate_value,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    valid: bool,
    pointers: Vec<String>,
    /// Identity hints the Rust side drops with a warning, in pointer order;
    /// the schema accepts them (any string), so only Rust can say.
    #[serde(default)]
    warnings: Vec<String>,
    event: Value,
}

fn repo_file(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// (line number, case) for every non-blank corpus line.
fn corpus() -> Vec<(usize, Case)> {
    let path = repo_file("tests/fixtures/events/corpus.ndjson");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let case: Case = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("corpus line {} is malformed: {e}", i + 1));
            (i + 1, case)
        })
        .collect()
}

fn schema() -> Value {
    serde_json::from_str(SCHEMA_JSON).expect("schema is JSON")
}

fn schema_validator() -> jsonschema::Validator {
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .should_validate_formats(true)
        .build(&schema())
        .expect("schema compiles")
}

/// `parent` is `child` or one of its ancestors (by whole pointer segments).
fn is_same_or_parent(parent: &str, child: &str) -> bool {
    child == parent
        || child
            .strip_prefix(parent)
            .is_some_and(|rest| rest.starts_with('/'))
}

#[test]
fn schema_is_a_valid_2020_12_schema_with_the_expected_id() {
    let schema = schema();
    if let Err(e) = jsonschema::draft202012::meta::validate(&schema) {
        panic!("schema does not satisfy the 2020-12 meta-schema: {e}");
    }
    assert_eq!(
        schema["$id"],
        "https://switchyard.dev/schemas/canonical-event.v1.json"
    );
    assert_eq!(schema["additionalProperties"], false);
}

#[test]
fn every_schema_property_has_a_description() {
    /// Walks subschemas by keyword, so that a field called "properties" is
    /// not mistaken for the keyword.
    fn walk(schema: &Value, path: &str, missing: &mut Vec<String>) {
        let Value::Object(map) = schema else { return };
        for (keyword, child) in map {
            let here = format!("{path}/{keyword}");
            match (keyword.as_str(), child) {
                ("properties" | "$defs", Value::Object(subschemas)) => {
                    for (name, subschema) in subschemas {
                        // The `if` clause's `properties` only selects events.
                        let selector = path.ends_with("/if");
                        if keyword == "properties"
                            && !selector
                            && subschema.get("description").is_none()
                        {
                            missing.push(format!("{here}/{name}"));
                        }
                        walk(subschema, &format!("{here}/{name}"), missing);
                    }
                }
                ("allOf" | "anyOf" | "oneOf", Value::Array(subschemas)) => {
                    for (i, subschema) in subschemas.iter().enumerate() {
                        walk(subschema, &format!("{here}/{i}"), missing);
                    }
                }
                (
                    "items"
                    | "additionalProperties"
                    | "propertyNames"
                    | "if"
                    | "then"
                    | "else"
                    | "not",
                    _,
                ) => {
                    walk(child, &here, missing);
                }
                _ => {}
            }
        }
    }
    let mut missing = Vec::new();
    walk(&schema(), "", &mut missing);
    assert!(
        missing.is_empty(),
        "properties without a description: {missing:#?}"
    );
}

#[test]
fn corpus_is_broad_and_well_formed() {
    let cases = corpus();
    assert!(cases.len() >= 40, "only {} corpus cases", cases.len());
    let mut names = BTreeSet::new();
    for (line, case) in &cases {
        assert!(
            names.insert(case.name.as_str()),
            "line {line}: duplicate name {}",
            case.name
        );
        assert_eq!(
            case.valid,
            case.pointers.is_empty(),
            "line {line} ({}): valid cases list no pointers, invalid cases at least one",
            case.name
        );
    }
    assert!(cases.iter().filter(|(_, c)| c.valid).count() >= 10);
}

#[test]
fn schema_and_rust_validator_agree_on_every_corpus_case() {
    let validator = schema_validator();
    let mut disagreements = Vec::new();
    for (line, case) in corpus() {
        let schema_errors: Vec<(String, String)> = validator
            .iter_errors(&case.event)
            .map(|e| (e.instance_path.as_str().to_owned(), e.to_string()))
            .collect();
        let (rust, dropped) = check_value(&case.event);
        assert_eq!(rust, validate_value(&case.event), "line {line}");
        let rust_pointers: BTreeSet<&str> = rust.iter().map(|v| v.pointer.as_str()).collect();
        let expected: BTreeSet<&str> = case.pointers.iter().map(String::as_str).collect();
        let warnings: Vec<&str> = dropped.iter().map(|h| h.pointer.as_str()).collect();

        let mut problems = Vec::new();
        if schema_errors.is_empty() != case.valid {
            problems.push(format!(
                "JSON Schema says valid={}",
                schema_errors.is_empty()
            ));
        }
        if rust.is_empty() != case.valid {
            problems.push(format!("Rust validator says valid={}", rust.is_empty()));
        }
        if rust_pointers != expected {
            problems.push(format!(
                "Rust pointers {rust_pointers:?} != expected {expected:?}"
            ));
        }
        if warnings != case.warnings {
            problems.push(format!(
                "Rust warnings {warnings:?} != expected {:?}",
                case.warnings
            ));
        }
        for (pointer, _) in &schema_errors {
            if !rust_pointers.iter().any(|r| is_same_or_parent(pointer, r)) {
                problems.push(format!(
                    "JSON Schema reports {pointer:?}, which is not one of (or a parent of) the Rust pointers"
                ));
            }
        }
        if !problems.is_empty() {
            let schema_out: Vec<String> = schema_errors
                .iter()
                .map(|(p, m)| format!("      {p:?}: {m}"))
                .collect();
            let rust_out: Vec<String> = rust.iter().map(|v| format!("      {v}")).collect();
            disagreements.push(format!(
                "corpus line {line} ({}), expected valid={} pointers={:?}\n  - {}\n    JSON Schema:\n{}\n    Rust:\n{}",
                case.name,
                case.valid,
                case.pointers,
                problems.join("\n  - "),
                schema_out.join("\n"),
                rust_out.join("\n"),
            ));
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} corpus case(s) disagree:\n\n{}",
        disagreements.len(),
        disagreements.join("\n\n")
    );
}

#[test]
fn valid_corpus_events_round_trip_through_the_typed_model() {
    for (line, case) in corpus().into_iter().filter(|(_, c)| c.valid) {
        let bytes = serde_json::to_vec(&case.event).unwrap();
        let mut event = parse_event(&bytes)
            .unwrap_or_else(|e| panic!("line {line} ({}): parse_event failed: {e}", case.name));
        let dropped: Vec<&str> = event
            .dropped_hints
            .iter()
            .map(|h| h.pointer.as_str())
            .collect();
        assert_eq!(dropped, case.warnings, "line {line} ({})", case.name);
        // Never on the wire, and the hint itself is gone.
        let again = serde_json::to_value(&event).unwrap();
        for pointer in &case.warnings {
            assert_eq!(
                again.pointer(pointer),
                None,
                "line {line} ({}): {pointer} is still there",
                case.name
            );
        }
        assert!(
            check_value(&again).1.is_empty(),
            "line {line} ({}): normalised hints must not warn again",
            case.name
        );
        event.dropped_hints.clear();
        let violations = validate_value(&again);
        assert!(
            violations.is_empty(),
            "line {line} ({}): re-serialised event is invalid: {violations:?}\n{again}",
            case.name
        );
        let reparsed = parse_event(&serde_json::to_vec(&again).unwrap()).unwrap();
        assert_eq!(reparsed, event, "line {line} ({})", case.name);
    }
}

#[test]
fn invalid_corpus_events_are_refused_by_parse_event() {
    for (line, case) in corpus().into_iter().filter(|(_, c)| !c.valid) {
        let bytes = serde_json::to_vec(&case.event).unwrap();
        let err = parse_event(&bytes).expect_err(&format!("line {line} ({})", case.name));
        let expected_class = if case.event.is_object() {
            "schema"
        } else {
            "not_object"
        };
        assert_eq!(
            err.error_class(),
            expected_class,
            "line {line} ({})",
            case.name
        );
    }
}

#[test]
fn check_ndjson_counts_in_memory_input() {
    let input = concat!(
        r#"{"event":"lead","event_id":"e1","occurred_at":"2026-11-26T10:00:00Z","anonymous_id":"a1"}"#,
        "\n",
        "   \n",
        r#"{"event":"purchase","event_id":"e2","occurred_at":"2026-11-26T10:00:00Z","user_id":"u1","value":5}"#,
        "\r\n",
        "this is not json\n",
        "42\n",
        r#"{"event":"custom.webinar_registered","event_id":"e3","occurred_at":"2026-11-26T10:00:00Z","user_id":"u1"}"#,
    );
    let mut out = Vec::new();
    let summary = check_ndjson(input.as_bytes(), &mut out).unwrap();
    assert_eq!(
        summary,
        NdjsonSummary {
            valid: 2,
            invalid: 3,
            warned: 0,
        }
    );
    let out = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "line 1 ok lead e1");
    assert_eq!(
        lines[1],
        "line 3 INVALID e2: /currency: missing required field \"currency\" (a purchase event needs \"value\" and \"currency\")"
    );
    assert!(
        lines[2].starts_with("line 4 INVALID: not valid JSON"),
        "{}",
        lines[2]
    );
    assert_eq!(lines[3], "line 5 INVALID: not a JSON object (got number)");
    assert_eq!(lines[4], "line 6 ok custom.webinar_registered e3");
    assert_eq!(lines.len(), 5);
}

#[test]
fn check_ndjson_lists_every_violation_of_an_event() {
    let input = r#"{"event":"purchse","occurred_at":"2026-02-30T10:00:00Z","user_id":"u1"}"#;
    let mut out = Vec::new();
    let summary = check_ndjson(input.as_bytes(), &mut out).unwrap();
    assert_eq!(
        summary,
        NdjsonSummary {
            valid: 0,
            invalid: 1,
            warned: 0,
        }
    );
    let out = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("line 1 INVALID (no valid event_id): /"));
    assert!(lines[1..].iter().all(|l| l.starts_with("    /")), "{out}");
}

#[test]
fn check_ndjson_returns_io_errors() {
    struct Broken;
    impl std::io::Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk on fire"))
        }
    }
    let err = check_ndjson(std::io::BufReader::new(Broken), Vec::new()).unwrap_err();
    assert_eq!(err.to_string(), "disk on fire");
}

#[test]
fn example_stream_has_the_expected_valid_and_invalid_lines() {
    let path = repo_file("examples/events.ndjson");
    let file = std::fs::File::open(&path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let mut out = Vec::new();
    let summary = check_ndjson(std::io::BufReader::new(file), &mut out).unwrap();
    let report = String::from_utf8_lossy(&out);
    assert_eq!(
        summary,
        NdjsonSummary {
            valid: 17,
            invalid: 3,
            warned: 0,
        },
        "{report}"
    );
}

/// Tiny deterministic PRNG (xorshift64) so the generated cases are the same
/// on every run.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Edge cases per field, for the generated-variant comparison: boundaries of
/// every format and pattern where two implementations are most likely to
/// differ.
fn edge_values() -> Vec<(&'static str, Vec<Value>)> {
    let strings = |xs: &[&str]| xs.iter().map(|s| json!(s)).collect::<Vec<_>>();
    vec![
        ("event", {
            let mut names = strings(&[
                "purchase",
                "lead",
                "refund",
                "identify",
                "custom.x_1",
                "custom.",
                "Purchase",
                "custom.a-b",
                " lead",
                "custom.1x",
            ]);
            names.push(json!(1));
            names
        }),
        (
            "event_id",
            strings(&[
                "e1",
                "e 1",
                "",
                "~!@#$%^&*()",
                "é",
                "e\u{7f}",
                " e1\t",
                "\u{3000}e1\u{85}",
                "\u{feff}e1",
                " ",
            ]),
        ),
        (
            "occurred_at",
            strings(&[
                "2026-11-26T10:00:00Z",
                "2026-11-26T10:00:00.5+05:30",
                "2026-02-29T00:00:00Z",
                "2028-02-29T00:00:00Z",
                "1900-02-29T00:00:00Z",
                "2000-02-29T00:00:00Z",
                "2026-12-31T23:59:60Z",
                "2026-12-31T23:59:60+00:00",
                "2027-01-01T00:59:60+01:00",
                "2026-12-31T22:59:60-01:00",
                "2026-12-31T22:59:60+01:00",
                "1899-12-31T23:59:59Z",
                "2099-12-31T23:59:59-12:00",
                "1900-01-01T00:00:00+00:00",
                "2026-11-26T10:00:00-00:00",
                "2026-11-26T10:00:00+23:59",
                "2026-11-26T10:00:00.Z",
                "2026-11-26T10:00:00.123456789Z",
                "2026-1-26T10:00:00Z",
                "2026-11-26T10:00:00ZZ",
                "2026-11-26T10:00:00+01:00\n",
                "2026-06-31T10:00:00Z",
                "2026-11-26T10:00:00+24:00",
            ]),
        ),
        (
            "user_id",
            strings(&["u1", "", " U1 ", "\u{a0}", "\u{2028}u\u{200b}"]),
        ),
        ("anonymous_id", strings(&["a1", "", "\n a1", "\u{2003}"])),
        (
            "email",
            strings(&[
                "a@b.co",
                "a@b",
                "a@b.",
                "a@.b",
                "a.@b.c",
                "a@b.c.",
                "x@y@z.c",
                "a\u{a0}b@c.de",
                "é@ü.de",
                "a@b..c",
                "a\u{7f}@b.co",
                "a\t@b.co",
                "  A.B@C.DE ",
                "n/a",
                "",
            ]),
        ),
        (
            "phone",
            strings(&[
                "+1 650 253 0000",
                "(650) 253-0000",
                "+(1)23456",
                "123456",
                "12345",
                "+123456-",
                "-123456",
                "1.2.3.4",
                "+ 123456",
                "((123456",
                "123456))",
                "１２３４５６",
                " +1 (650) 555-1234 ",
                "call me",
            ]),
        ),
        (
            "email_sha256",
            strings(&[
                "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b",
                "973DFE463EC85785F5F95AF5BA3906EEDB2D931C24E69824A89EA65DBA4E813B",
                "x",
                " 973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b\n",
            ]),
        ),
        (
            "value",
            vec![
                json!(0),
                json!(-0.0),
                json!(1.5),
                json!(-1),
                json!("1"),
                json!(1e300),
                json!(null),
            ],
        ),
        (
            "currency",
            strings(&["USD", "usd", "XXX", "XCG", "BGN", "US", "EUR "]),
        ),
        ("context", {
            let mut contexts: Vec<Value> = [
                "::1",
                "1.2.3.04",
                "::ffff:1.2.3.4",
                "fe80::1%eth0",
                " 1.2.3.4",
                "1.2.3",
                "\t::1 ",
                "unknown",
            ]
            .iter()
            .map(|ip| json!({ "ip": ip }))
            .collect();
            contexts.extend(
                [
                    "https://a.b/c?d#e",
                    "https://a.b/c?d#e#f",
                    "http://[::1]:8080/",
                    "http://[::1]x/",
                    "http://u@[v1.x]/",
                    "http://a:b@c:d/",
                    "http://a:1:2/",
                    "x:",
                    "http://%41/",
                    "http://a%4/",
                    "http://a/%4g",
                    "h+t.t-p://a",
                    "http://a b/",
                    "http://a/b\\c",
                    "http://a/b|c",
                    "http://a/?q=[]",
                    "http://a/#[]",
                    "http://a@b@c/",
                    "http://[1:2:3:4:5:6:7:8:9]/",
                    "http://[::1.2.3.4]/",
                    "http://[::01.2.3.4]/",
                    "http://[1::2::3]/",
                    "http://[]/",
                    "http://[v.x]/",
                    "urn:a:b",
                    "a:/b",
                    "a://b:c",
                    "a:b:c",
                    "http://é.com/",
                    "http:///a",
                    "",
                ]
                .iter()
                .map(|url| json!({ "page_url": url })),
            );
            contexts.extend([
                json!({"locale": "en-us"}),
                json!({"locale": "en_"}),
                json!({"locale": "en-abcdefghi"}),
                json!({"user_agent": ""}),
                json!({"referrer": "android-app://x"}),
            ]);
            contexts
        }),
        (
            "consent",
            vec![
                json!({"a": "granted"}),
                json!({"a_b_9": "denied"}),
                json!({"9a": "granted"}),
                json!({"a": "GRANTED"}),
                json!({"": "granted"}),
                json!({"abcdefghijklmnopqrstuvwxyzabcdef": "granted"}),
                json!({"abcdefghijklmnopqrstuvwxyzabcdefg": "granted"}),
            ],
        ),
        (
            "items",
            vec![
                json!([{"id": "a", "quantity": 1e9}]),
                json!([{"id": "a", "quantity": 1_000_000_001}]),
                json!([{"id": "a", "quantity": -0.0}]),
                json!([{"id": "a", "quantity": 1.000_000_000_1}]),
                json!([{"id": "a", "price": 0.0}]),
                json!([{"id": "", "name": ""}]),
                json!([null]),
            ],
        ),
        (
            "external_ids",
            vec![
                json!({"a": "1"}),
                json!({"a": 1}),
                json!({"a~b": "1"}),
                json!({"a": " A-1 ", "b": " "}),
            ],
        ),
    ]
}

#[test]
fn schema_and_rust_validator_agree_on_generated_variants() {
    let validator = schema_validator();
    let fields = edge_values();
    let base = json!({
        "event": "lead",
        "event_id": "e",
        "occurred_at": "2026-11-26T10:00:00Z",
        "user_id": "u"
    });
    let mut random = XorShift(0x1234_5678_9abc_def0);
    let mut disagreements = Vec::new();
    let mut valid = 0;
    const ROUNDS: usize = 4000;
    for _ in 0..ROUNDS {
        let mut event = base.clone();
        for _ in 0..=random.below(3) {
            let (name, values) = &fields[random.below(fields.len())];
            if random.below(9) == 0 {
                event.as_object_mut().unwrap().remove(*name);
            } else {
                event[*name] = values[random.below(values.len())].clone();
            }
        }
        let schema_pointers: Vec<String> = validator
            .iter_errors(&event)
            .map(|e| e.instance_path.as_str().to_owned())
            .collect();
        let rust = validate_value(&event);
        let agree = schema_pointers.is_empty() == rust.is_empty()
            && schema_pointers
                .iter()
                .all(|p| rust.iter().any(|r| is_same_or_parent(p, &r.pointer)));
        if !agree {
            disagreements.push(format!(
                "{event}\n    JSON Schema: {schema_pointers:?}\n    Rust: {:?}",
                rust.iter().map(ToString::to_string).collect::<Vec<_>>()
            ));
        }
        if rust.is_empty() {
            valid += 1;
            let parsed = parse_event(event.to_string().as_bytes())
                .unwrap_or_else(|e| panic!("valid event refused by parse_event: {e}\n{event}"));
            let again = serde_json::to_value(&parsed).unwrap();
            assert_eq!(
                validate_value(&again),
                [],
                "re-serialised {event} as {again}"
            );
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} generated event(s) disagree:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
    // Both outcomes must be well represented for the comparison to mean much.
    assert!(
        (ROUNDS / 10..ROUNDS * 9 / 10).contains(&valid),
        "{valid} valid of {ROUNDS}"
    );
}

/// Values that trap a typed decoder rather than a schema validator: `null`
/// where a field is optional, arrays where an object is expected, a
/// consent state written as an enum map, non-string values in free-form
/// objects, lengths that differ in bytes and characters.
fn fast_path_edge_values() -> Vec<(&'static str, Vec<Value>)> {
    let null_and_shapes = |object: bool| {
        let mut values = vec![Value::Null, json!([]), json!(true), json!(0)];
        if object {
            values.push(json!(["x"]));
        }
        values
    };
    let mut fields: Vec<(&'static str, Vec<Value>)> = [
        "source",
        "user_id",
        "anonymous_id",
        "email",
        "phone",
        "email_sha256",
        "phone_sha256",
        "currency",
        "order_id",
        "value",
        "event",
        "event_id",
        "occurred_at",
    ]
    .into_iter()
    .map(|field| (field, null_and_shapes(false)))
    .collect();
    for field in [
        "external_ids",
        "click_ids",
        "context",
        "consent",
        "items",
        "properties",
        "traits",
        "metadata",
    ] {
        fields.push((field, null_and_shapes(true)));
    }
    fields.extend([
        (
            "source",
            vec![json!("é".repeat(64)), json!("é".repeat(65)), json!("")],
        ),
        (
            "occurred_at",
            vec![
                json!("2026-11-26t10:00:00z"),
                json!("2026-11-26 10:00:00Z"),
                json!("2100-01-01T00:00:00Z"),
                json!("2026-11-26T10:59:60Z"),
                json!("2026-11-26T10:00:00.1234567890Z"),
            ],
        ),
        (
            "consent",
            vec![
                json!({"ads": {"granted": null}}),
                json!({"ads": null}),
                json!({"ads": ["granted"]}),
                json!({}),
            ],
        ),
        (
            "click_ids",
            vec![
                json!({"fbc": null}),
                json!({"fbc": "f".repeat(512)}),
                json!({"fbc": "f".repeat(513)}),
                json!({"fbc": ""}),
                json!({"fbc": " Fb.1.x ", "gclid": "\u{a0}"}),
                json!({"fbclid": "x"}),
                json!({}),
            ],
        ),
        (
            "context",
            vec![
                json!({"ip": null}),
                json!({"locale": null}),
                json!({"user_agent": "é".repeat(1024)}),
                json!({"user_agent": "é".repeat(1025)}),
                json!(["203.0.113.7"]),
                json!({}),
            ],
        ),
        (
            "items",
            vec![
                json!([{"id": "a", "quantity": 2.0}]),
                json!([{"id": "a", "quantity": 0}]),
                json!([{"id": "a", "quantity": null}]),
                json!([{"id": "a", "quantity": 4_294_967_296_u64}]),
                json!([{"id": "a", "price": null}]),
                json!([{"id": "a", "price": -0.0}]),
                json!([{"id": "a", "name": null}]),
                json!([["a"]]),
                json!([{"id": "é".repeat(128)}]),
                json!([{"id": "é".repeat(129)}]),
                json!([]),
            ],
        ),
        (
            "external_ids",
            vec![json!({"crm": null}), json!({"crm": ""}), json!({})],
        ),
        (
            "properties",
            vec![
                json!({"a": null, "b": [1, "x", {"c": null}], "d": 1.5e300}),
                json!({}),
            ],
        ),
        ("traits", vec![json!({"email": " Jane@Example.com "})]),
        ("metadata", vec![json!({"trace": {"id": [null]}})]),
        ("value", vec![json!(-0.0), json!(0.1), json!(1u64 << 63)]),
    ]);
    fields
}

/// `parse_event` (fast path, falling back to the reference path) and the
/// reference path alone agree on `bytes`: equal events that also serialise
/// identically, or the same error.
fn paths_disagree(bytes: &[u8]) -> Option<String> {
    match (parse_event(bytes), parse_event_slow(bytes)) {
        (Ok(fast), Ok(slow)) => {
            let (fast_json, slow_json) = (
                serde_json::to_string(&fast).unwrap(),
                serde_json::to_string(&slow).unwrap(),
            );
            (fast != slow || fast_json != slow_json)
                .then(|| format!("different events:\n  {fast_json}\n  {slow_json}"))
        }
        (Err(fast), Err(slow)) => {
            (fast != slow).then(|| format!("different errors:\n  {fast}\n  {slow}"))
        }
        (fast, slow) => Some(format!(
            "parse_event says {:?}, the reference path {:?}",
            fast.map(|_| "ok"),
            slow.map(|_| "ok")
        )),
    }
}

#[test]
fn fast_path_agrees_with_the_reference_path() {
    let mut disagreements = Vec::new();
    let mut outcomes = [0usize; 2];
    let mut check = |bytes: &[u8]| {
        outcomes[usize::from(parse_event_slow(bytes).is_ok())] += 1;
        if let Some(problem) = paths_disagree(bytes) {
            disagreements.push(format!("{}\n  {problem}", String::from_utf8_lossy(bytes)));
        }
    };

    let cases = corpus();
    for (_, case) in &cases {
        check(&serde_json::to_vec(&case.event).unwrap());
    }

    // Every edge value alone, on a small and a full event of each kind.
    let everything = cases
        .iter()
        .find(|(_, case)| case.name == "everything_set")
        .map(|(_, case)| case.event.clone())
        .expect("corpus has everything_set");
    let bases = [
        json!({"event": "lead", "event_id": "e", "occurred_at": "2026-11-26T10:00:00Z", "user_id": "u"}),
        json!({"event": "purchase", "event_id": "e", "occurred_at": "2026-11-26T10:00:00Z",
               "anonymous_id": "a", "value": 1, "currency": "USD"}),
        everything,
    ];
    let mut fields = edge_values();
    fields.extend(fast_path_edge_values());
    for base in &bases {
        for (name, values) in &fields {
            let mut without = base.clone();
            without.as_object_mut().unwrap().remove(*name);
            check(without.to_string().as_bytes());
            for value in values {
                let mut event = base.clone();
                event[*name] = value.clone();
                check(event.to_string().as_bytes());
            }
        }
    }

    // Combinations, for the rules between fields (value and currency,
    // user_id or anonymous_id).
    let mut random = XorShift(0x0fed_cba9_8765_4321);
    for _ in 0..4000 {
        let mut event = bases[random.below(bases.len())].clone();
        for _ in 0..=random.below(2) {
            let (name, values) = &fields[random.below(fields.len())];
            if random.below(6) == 0 {
                event.as_object_mut().unwrap().remove(*name);
            } else {
                event[*name] = values[random.below(values.len())].clone();
            }
        }
        check(event.to_string().as_bytes());
    }

    // What a `Value` cannot hold or re-prints differently: repeated keys,
    // escapes, number spellings, framing, bytes that are not UTF-8.
    let head = r#""event":"lead","event_id":"e","occurred_at":"2026-11-26T10:00:00Z""#;
    let lead = format!(r#"{{{head},"user_id":"u"}}"#);
    let (open, close) = lead.as_bytes().split_at(lead.len() - 2);
    for not_utf8 in [
        [open, b"\xff", close].concat(),
        [open, b"\",\"properties\":{\"a\":\"\xc3\"}}"].concat(),
        [lead.as_bytes(), b" \xff"].concat(),
    ] {
        assert!(std::str::from_utf8(&not_utf8).is_err());
        check(&not_utf8);
    }
    for raw in [
        format!(r#"{{{head},"user_id":"u","user_id":"v"}}"#),
        format!(r#"{{{head},"user_id":1,"user_id":"v"}}"#),
        format!(r#"{{{head},"user_id":"v","user_id":1}}"#),
        format!(r#"{{{head},"user_id":"u","event":"purchase"}}"#),
        format!(r#"{{{head},"user_id":"u","consent":{{"ads":"granted","ads":"denied"}}}}"#),
        format!(r#"{{{head},"user_id":"u","consent":{{"ads":"nope","ads":"denied"}}}}"#),
        format!(r#"{{{head},"user_id":"u","context":{{"ip":"x","ip":"::1"}}}}"#),
        format!(r#"{{{head},"user_id":"u","items":[{{"id":"a","id":"b"}}]}}"#),
        format!(r#"{{{head},"user_id":"u","properties":{{"a":1,"a":null}}}}"#),
        format!(r#"{{{head},"user_id":"\u0075\u00e9"}}"#),
        format!(r#"{{{head},"user_id":"\ud800"}}"#),
        format!(r#"{{{head},"user_id":"u","value":-0,"currency":"USD"}}"#),
        format!(r#"{{{head},"user_id":"u","value":1E2,"currency":"USD"}}"#),
        format!(r#"{{{head},"user_id":"u","value":1e400,"currency":"USD"}}"#),
        format!(r#"{{{head},"user_id":"u","items":[{{"id":"a","quantity":3e0}}]}}"#),
        format!(r#" {{{head},"user_id":"u"}} "#),
        format!(r#"{{{head},"user_id":"u"}}x"#),
        format!(r#"{{{head},"user_id":"u""#),
        r#"["lead","e","2026-11-26T10:00:00Z","web","u"]"#.to_owned(),
        "null".to_owned(),
        String::new(),
    ] {
        check(raw.as_bytes());
    }

    assert!(
        disagreements.is_empty(),
        "{} input(s) where the paths disagree:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
    let [invalid, valid] = outcomes;
    assert!(
        valid > 1000 && invalid > 1000,
        "{valid} valid and {invalid} invalid inputs: not a meaningful comparison"
    );
}
