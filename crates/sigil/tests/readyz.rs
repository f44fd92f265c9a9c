//! Readiness end to end: a proxy beside its agent is ready while its serving SVID is valid;
//! with the trust authority down the agent cannot renew it, so when it expires `/readyz`
//! turns not-ready; when the authority is back the agent renews it and the proxy is ready
//! again, without a restart. Real processes: `sigil server`, `sigil agent`, `sigil proxy`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::upstream::Upstream;
use common::{Agent, Server, TD, free_port, my_uid, run};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `/readyz` of the metrics listener: (status, body); (0, "") if it does not answer.
fn readyz(addr: &str) -> (u16, String) {
    let (_, out, _) = run(Command::new("curl").args([
        "-s",
        "-m",
        "2",
        "-w",
        "\n%{http_code}",
        &format!("http://{addr}/readyz"),
    ]));
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn wait_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn proxy_readiness_follows_its_svid_through_an_authority_outage() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Server::start(&tmp.path().join("srv"), &[]);
    let jt = s.sigil_json(&["jointoken", "create"]);
    let node = jt["node_id"].as_str().unwrap().to_owned();
    let proxy_id = format!("spiffe://{TD}/proxy");
    // The shortest TTL an entry may have, so the outage outlives the SVID.
    s.sigil_json(&[
        "entry",
        "create",
        "--spiffe-id",
        &proxy_id,
        "--parent-id",
        &node,
        "--selector",
        &format!("unix:uid:{}", my_uid()),
        "--dns",
        "localhost",
        "--x509-ttl",
        "60",
        "--enforcer",
    ]);
    let agent = Agent::start(&s, &tmp.path().join("agent"), jt["token"].as_str());
    let up = Upstream::start();
    let policies = tmp.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("p.cedar"),
        "permit(principal, action == Action::\"http\", resource);",
    )
    .unwrap();
    let port = free_port();
    let metrics = format!("127.0.0.1:{}", free_port());
    let log = tmp.path().join("proxy.log");
    let _proxy = Killed(
        Command::new(common::sigil_bin())
            .args(["proxy", "--trust-domain", TD])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--upstream", &format!("http://127.0.0.1:{}", up.port)])
            .args(["--audience", "model-gw", "--issuer", &s.url("")])
            .arg("--workload-api-socket")
            .arg(format!("unix://{}", agent.socket.display()))
            .args(["--spiffe-id", &proxy_id, "--metrics-addr", &metrics])
            .arg("--policy-dir")
            .arg(&policies)
            .arg("--audit-log")
            .arg(tmp.path().join("audit.log"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let proxy_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the proxy to be ready", Duration::from_secs(30), || {
        readyz(&metrics).0 == 200
    });

    // The authority goes away: nothing changes until the serving SVID expires...
    s.stop();
    assert_eq!(readyz(&metrics).0, 200, "{}", proxy_log());
    // ...then the proxy says it is not ready, and why (TTL 60 s, renewal impossible).
    wait_for("not ready after expiry", Duration::from_secs(120), || {
        readyz(&metrics).0 == 503
    });
    let (_, why) = readyz(&metrics);
    assert!(why.contains("expired"), "{why}");

    // The authority is back: the agent renews, the proxy takes the new SVID, ready again.
    s.restart();
    wait_for(
        "ready again after the authority is back",
        Duration::from_secs(60),
        || readyz(&metrics).0 == 200,
    );
    let (_, body) = readyz(&metrics);
    assert!(!body.contains("expired"), "{body}");
    drop(agent);
}
