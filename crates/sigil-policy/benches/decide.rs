//! Decision latency: `cargo bench -p sigil-policy --bench decide`.
//!
//! 1,000+ policies of realistic shape (one per group/model pair, a few generic ones, tool
//! calls with argument conditions) and the demo set; an allowed and a denied request each.
//! Calls without arguments from a caller seen before reuse its request parts and, for the same
//! action and resource, its decision (see `PolicyEngine::decide`): the `invoke` cases measure
//! that recall. `1k/invoke-evaluated` is a known caller on a model not asked for lately (an
//! evaluation on cached parts); `1k/invoke-allowed-new-caller` a new caller every time (parts
//! built, then evaluated). Tool calls with arguments are evaluated every time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};
use sigil_policy::{PolicyEngine, Principal, Query};

fn many() -> String {
    let mut text = String::new();
    for i in 0..1000 {
        text.push_str(&format!(
            "@id(\"g{i}-m{i}\") permit(principal in Group::\"g{i}\", action == Action::\"invoke\", \
             resource == Model::\"m{i}\") when {{ context.scopes.contains(\"model:invoke\") }};\n"
        ));
    }
    text.push_str(
        r#"
        @id("list-models") permit(principal, action == Action::"list_models", resource);
        @id("ops-anything") permit(principal in Group::"ops", action, resource)
            when { context.scopes.contains("ops") };
        @id("office-hours") forbid(principal, action == Action::"invoke", resource)
            unless { context.hour >= 6 && context.hour < 22 };
        @id("other-domain") forbid(principal, action, resource)
            unless { principal.trust_domain == "factory.example" };
        @id("sensors") permit(principal in Group::"g1", action == Action::"call_tool", resource == Tool::"read_sensor");
        @id("read-file") permit(principal in Group::"g1", action == Action::"call_tool", resource == Tool::"read_file");
        @id("no-etc") forbid(principal, action == Action::"call_tool", resource == Tool::"read_file")
            when { context.arguments.hasTag("path") && context.arguments.getTag("path") like "/etc/*" };
        @id("no-force") forbid(principal, action == Action::"call_tool", resource)
            when { context.arguments.hasTag("options.force") && context.arguments.getTag("options.force") == "true" };
        "#,
    );
    text
}

fn query<'a>(
    groups: &'a [String],
    scopes: &'a [String],
    action: &'a str,
    rt: &'a str,
    rid: &'a str,
    arguments: Option<&'a Value>,
) -> Query<'a> {
    Query {
        principal: Principal {
            spiffe_id: "spiffe://factory.example/vision/camera-3",
            trust_domain: "factory.example",
            groups,
        },
        action,
        resource_type: rt,
        resource_id: rid,
        scopes,
        hour: 10,
        weekday: 2,
        arguments,
        delegation: None,
        risk: None,
    }
}

fn bench(c: &mut Criterion) {
    let big = PolicyEngine::new(&[("many.cedar".into(), many())]).unwrap();
    let demo = PolicyEngine::new(&[(
        "demo.cedar".into(),
        include_str!("../../../policy/demo.cedar").into(),
    )])
    .unwrap();
    let g500 = vec!["g500".to_string(), "line-2".to_string()];
    let g1 = vec!["g1".to_string()];
    let ff = vec!["factory-floor".to_string()];
    let scopes = vec!["model:invoke".to_string(), "tools".to_string()];
    let safe = json!({"path": "/data/line-2/calibration.json", "options": {"force": false}});
    let etc = json!({"path": "/etc/shadow"});

    let cases: Vec<(&str, &PolicyEngine, Query<'_>, bool)> = vec![
        (
            "1k/invoke-allowed",
            &big,
            query(&g500, &scopes, "invoke", "Model", "m500", None),
            true,
        ),
        (
            "1k/invoke-denied",
            &big,
            query(&g500, &scopes, "invoke", "Model", "m501", None),
            false,
        ),
        (
            "1k/call_tool-allowed",
            &big,
            query(&g1, &scopes, "call_tool", "Tool", "read_file", Some(&safe)),
            true,
        ),
        (
            "1k/call_tool-denied",
            &big,
            query(&g1, &scopes, "call_tool", "Tool", "read_file", Some(&etc)),
            false,
        ),
        (
            "demo/invoke-allowed",
            &demo,
            query(&ff, &scopes, "invoke", "Model", "defect-detector", None),
            true,
        ),
        (
            "demo/invoke-denied",
            &demo,
            query(&ff, &[], "invoke", "Model", "defect-detector", None),
            false,
        ),
        (
            "demo/call_tool-denied",
            &demo,
            query(&ff, &scopes, "call_tool", "Tool", "read_file", Some(&etc)),
            false,
        ),
    ];
    let mut g = c.benchmark_group("decide");
    g.warm_up_time(std::time::Duration::from_secs(1));
    g.measurement_time(std::time::Duration::from_secs(3));
    for (name, engine, q, allow) in &cases {
        assert_eq!(engine.decide(q).unwrap().allow, *allow, "{name}");
        assert_eq!(
            engine.decide(q).unwrap(),
            engine.decide_reference(q).unwrap()
        );
        g.bench_function(*name, |b| b.iter(|| engine.decide(black_box(q))));
    }
    // A known caller, each time on a model it has not asked for lately (more models than the
    // decisions remembered per caller): the decision is evaluated, on the caller's cached parts.
    let models: Vec<String> = (0..1000).map(|i| format!("m{i}")).collect();
    let mut model = models.iter().cycle();
    g.bench_function("1k/invoke-evaluated", |b| {
        b.iter(|| {
            let rid = model.next().map_or("", String::as_str);
            big.decide(black_box(&query(
                &g500, &scopes, "invoke", "Model", rid, None,
            )))
        })
    });
    // Every request from a caller not seen lately (twice as many callers as the engine keeps
    // request parts for): what a first request costs.
    let callers: Vec<String> = (0..8192)
        .map(|i| format!("spiffe://factory.example/vision/camera-{i}"))
        .collect();
    let mut next = callers.iter().cycle();
    g.bench_function("1k/invoke-allowed-new-caller", |b| {
        b.iter(|| {
            let mut q = query(&g500, &scopes, "invoke", "Model", "m500", None);
            q.principal.spiffe_id = next.next().map_or("", String::as_str);
            big.decide(black_box(&q))
        })
    });
    g.finish();

    // For comparison: every policy, with schema-checked entities and request.
    let mut g = c.benchmark_group("reference");
    g.warm_up_time(std::time::Duration::from_secs(1));
    g.measurement_time(std::time::Duration::from_secs(3));
    g.sample_size(20);
    for (name, engine, q, _) in cases.iter().take(2).chain(cases.iter().skip(4).take(1)) {
        g.bench_function(*name, |b| b.iter(|| engine.decide_reference(black_box(q))));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
