//! Reading a model call's body: `cargo bench -p sigil-proxy --bench read_body`.
//!
//! The proxy reads every body strictly (keys that collide after folding are refused at any
//! depth). `whole` builds the full `serde_json::Value`, as the MCP path does; `picking` is
//! what a model call does: the same checks everywhere, but only the fields that choose a
//! model are built. `extract` is the whole step (route, read, model names). Bodies: the
//! load test's 57-byte chat request, and a chat of 12 messages with a tool schema (2,640 bytes).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use sigil_proxy::bench::{ModelCalls, parse, parse_picking};

fn chat() -> Vec<u8> {
    let mut messages = vec![serde_json::json!({"role": "system",
        "content": "You are the line-3 inspection assistant. Answer briefly; cite the station."})];
    for i in 0..11 {
        messages.push(serde_json::json!({
            "role": if i % 2 == 0 { "user" } else { "assistant" },
            "content": format!("Station {i}: torque readings 41.{i} Nm, 40.{i} Nm, 42.{i} Nm; \
                camera reports a surface scratch near the left mounting hole, length {i}.4 mm. \
                Is this within tolerance for part \"A-{i}\"? \u{00e9}"),
        }));
    }
    serde_json::to_vec(&serde_json::json!({
        "model": "defect-detector",
        "messages": messages,
        "temperature": 0.2,
        "max_tokens": 256,
        "stream": true,
        "tools": [{"type": "function", "function": {"name": "lookup_tolerance",
            "parameters": {"type": "object", "properties": {"part": {"type": "string"}},
            "required": ["part"]}}}],
    }))
    .unwrap()
}

fn read_body(c: &mut Criterion) {
    let small =
        br#"{"model":"defect-detector","messages":[{"role":"user","content":"hi"}]}"#.to_vec();
    let large = chat();
    let keep = |k: &str| k.eq_ignore_ascii_case("model");
    let calls = ModelCalls::new("/v1/chat/completions").unwrap();
    assert!(large.len() > 2048, "{}", large.len());
    for (name, body) in [("57B", &small), ("chat-2.6KiB", &large)] {
        assert_eq!(
            calls.models(body).unwrap(),
            vec!["defect-detector".to_owned()]
        );
        c.bench_function(&format!("read_body/{name}/whole"), |b| {
            b.iter(|| parse(black_box(body)).unwrap())
        });
        c.bench_function(&format!("read_body/{name}/picking"), |b| {
            b.iter(|| parse_picking(black_box(body), &keep).unwrap())
        });
        c.bench_function(&format!("read_body/{name}/extract"), |b| {
            b.iter(|| calls.models(black_box(body)).unwrap())
        });
    }
}

criterion_group!(benches, read_body);
criterion_main!(benches);
