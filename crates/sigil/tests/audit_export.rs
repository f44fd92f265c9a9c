//! SIEM export end to end: a real `sigil server`, a Python echo upstream and `sigil proxy
//! --audit-export <file>`; after N requests (allowed, denied by policy, refused for a missing
//! token) the export file holds N ECS JSON lines with the right outcomes, one per record of
//! the audit segment.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::proxy::{Client, register};
use common::upstream::Upstream;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, TD, free_port, run};

const POLICY: &str = r#"
@id("floor-invokes-m")
permit (principal in Group::"factory-floor", action == Action::"invoke", resource == Model::"m")
when { context.scopes.contains("model:invoke") };
"#;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(port: u16, what: &str, log: Option<&Path>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not start: {}",
            log.and_then(|l| std::fs::read_to_string(l).ok())
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn audit_records_are_exported_as_ecs_json_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let s = Server::start(&dir.join("srv"), &[]);

    // The client: in group factory-floor with scope model:invoke, SVID minted by the admin.
    let client_id = register(&s, "agent", "factory-floor");
    let cdir = dir.join("client");
    let c = Client::new(&s, &client_id, &cdir);
    let (cert, key, bundle, token) = (c.cert, c.key, c.bundle, c.token);

    let up = Upstream::start();
    let up_port = up.port;

    // The proxy, standalone from files, exporting to a file.
    let (pdir, proxy_bundle) = s.proxy_credentials(dir, &format!("spiffe://{TD}/proxy"));
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("test.cedar"), POLICY).unwrap();
    let audit = dir.join("audit.log");
    let export = dir.join("export.jsonl");
    let port = free_port();
    let log = dir.join("proxy.log");
    let _proxy = Kill(
        Command::new(common::sigil_bin())
            .args(["proxy", "--trust-domain", TD])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", &format!("http://127.0.0.1:{up_port}")])
            .args(["--audience", "model-gw", "--issuer", &s.url("")])
            .arg("--cert")
            .arg(pdir.join("svid.pem"))
            .arg("--key")
            .arg(pdir.join("key.pem"))
            .arg("--bundle")
            .arg(&proxy_bundle)
            .arg("--policy-dir")
            .arg(&policies)
            .arg("--audit-log")
            .arg(&audit)
            .arg("--audit-export")
            .arg(&export)
            // No OTLP export from the environment of whoever runs the tests.
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")
            .env("OTEL_SERVICE_NAME", "edge-gw")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_port(port, "proxy", Some(&log));

    let call = |model: &str, with_token: bool| -> u16 {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&bundle)
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .args(["-H", "content-type: application/json"])
            .args(["--data", &format!(r#"{{"model":"{model}","messages":[]}}"#)]);
        if with_token {
            cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        cmd.arg(format!("https://localhost:{port}/v1/chat/completions"));
        let (_, out, _) = run(&mut cmd);
        out.trim().parse().unwrap_or(0)
    };
    // (model, token?, expected status, expected outcome)
    let plan = [
        ("m", true, 200, "success"),
        ("other", true, 403, "failure"),
        ("m", true, 200, "success"),
        ("m", false, 401, "failure"),
        ("m", true, 200, "success"),
        ("other", true, 403, "failure"),
        ("m", true, 200, "success"),
    ];
    for (model, with_token, status, _) in plan {
        assert_eq!(call(model, with_token), status, "{model} {with_token}");
    }

    // Exported shortly after each batch is durable.
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines: Vec<serde_json::Value> = loop {
        let text = std::fs::read_to_string(&export).unwrap_or_default();
        if text.lines().count() >= plan.len() || Instant::now() > deadline {
            break text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(lines.len(), plan.len(), "{lines:#?}");
    let outcomes: Vec<&str> = lines
        .iter()
        .map(|l| l["event"]["outcome"].as_str().unwrap())
        .collect();
    let expected: Vec<&str> = plan.iter().map(|p| p.3).collect();
    assert_eq!(outcomes, expected);

    // One line per record of the segment, same request ids, in order.
    let records = sigil_proxy::read_records(&audit).unwrap();
    assert_eq!(records.len(), plan.len());
    for (line, rec) in lines.iter().zip(&records) {
        assert_eq!(line["event"]["id"], rec["request_id"]);
        assert_eq!(line["event"]["kind"], "event");
        assert_eq!(line["event"]["category"], serde_json::json!(["iam"]));
        assert_eq!(line["user"]["id"], client_id.as_str());
        assert_eq!(line["source"]["user"]["id"], client_id.as_str());
        assert_eq!(line["sigil"]["cert_thumbprint"], rec["cert_thumbprint"]);
        let hex = line["tls"]["client"]["hash"]["sha256"].as_str().unwrap();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex, hex.to_ascii_uppercase());
        assert_eq!(line["service"]["name"], "edge-gw");
        assert_eq!(line["url"]["path"], "/v1/chat/completions");
        assert_eq!(line["http"]["request"]["method"], "POST");
        assert!(line["@timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(line["event"]["reason"], rec["reason"]);
    }
    let allowed = &lines[0];
    assert_eq!(allowed["event"]["action"], "invoke");
    assert_eq!(allowed["sigil"]["resource"]["type"], "Model");
    assert_eq!(allowed["sigil"]["resource"]["id"], "m");
    assert_eq!(
        allowed["sigil"]["policy_ids"],
        serde_json::json!(["floor-invokes-m"])
    );
    assert!(allowed["sigil"]["token"]["jti"].is_string());
    assert_eq!(lines[1]["sigil"]["resource"]["id"], "other");
    // Refused before the token was read: no jti, no call.
    assert!(lines[3]["sigil"]["token"].is_null());
    assert_eq!(lines[3]["event"]["action"], "request");
    // The export file is private, like the segment.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&export).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}
