//! End-to-end tests of the agent's Enforcer API (`sigil.agent.v1.Enforcer`, on the Workload
//! API socket): a real `sigil server` and `sigil agent`, a tonic client over the unix socket,
//! revocations made with the admin CLI.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Agent, Server, TD, my_uid, with_header};
use sigil_proto::enforcer as ep;
use sigil_proto::enforcer::enforcer_client::EnforcerClient;
use tonic::transport::{Channel, Endpoint};

/// Set (to the agent socket) when this binary is re-run as another user to make one call.
const CHILD_ENV: &str = "SIGIL_ENFORCER_TEST_CHILD_SOCKET";

fn id(name: &str) -> String {
    format!("spiffe://{TD}/{name}")
}

async fn enforcer_client(socket: &Path) -> EnforcerClient<Channel> {
    let path = socket.to_owned();
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .unwrap();
    EnforcerClient::new(channel)
}

/// A server, an enforcer entry for this test process's uid, and an attested agent.
fn stack(tmp: &Path) -> (Server, Agent) {
    let (s, a, _) = stack_with(tmp, true);
    (s, a)
}

/// A server, an entry for this test process's uid (marked as an enforcer or not), and an
/// attested agent; also the entry's ID.
fn stack_with(tmp: &Path, enforcer: bool) -> (Server, Agent, String) {
    let s = Server::start(&tmp.join("srv"), &[]);
    let jt = s.sigil_json(&["jointoken", "create"]);
    let node = jt["node_id"].as_str().unwrap().to_owned();
    let proxy = id("proxy");
    let uid = format!("unix:uid:{}", my_uid());
    let mut args = vec![
        "entry",
        "create",
        "--spiffe-id",
        &proxy,
        "--parent-id",
        &node,
        "--selector",
        &uid,
    ];
    if enforcer {
        args.push("--enforcer");
    }
    let entry = s.sigil_json(&args);
    assert_eq!(
        entry["enforcer"].as_bool().unwrap_or(false),
        enforcer,
        "{entry}"
    );
    let a = Agent::start(&s, &tmp.join("agent"), jt["token"].as_str());
    (s, a, entry["id"].as_str().unwrap().to_owned())
}

/// Opens WatchRevocations once the agent has attested and synced (until then it answers
/// Unavailable or PermissionDenied), and returns the stream with its first message.
async fn watch(a: &Agent) -> (tonic::Streaming<ep::Revocations>, ep::Revocations) {
    let mut c = enforcer_client(&a.socket).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match c
            .watch_revocations(with_header(ep::WatchRevocationsRequest {}))
            .await
        {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                let first = tokio::time::timeout(Duration::from_secs(5), stream.message())
                    .await
                    .expect("no first revocation list")
                    .unwrap()
                    .unwrap();
                return (stream, first);
            }
            Err(status) => assert!(
                Instant::now() < deadline,
                "WatchRevocations still refused: {status:?}\n{}",
                a.log_text()
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads the stream until a list satisfies `want` (within 5 s).
async fn until(
    stream: &mut tonic::Streaming<ep::Revocations>,
    want: impl Fn(&ep::Revocations) -> bool,
) -> ep::Revocations {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let msg = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("the revocation did not arrive on the open stream within 5 s")
            .unwrap()
            .expect("stream ended");
        if want(&msg) {
            return msg;
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_reach_an_open_stream_and_survive_an_agent_restart_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut s, mut a) = tokio::task::block_in_place(|| stack(tmp.path()));

    // Without the security header: InvalidArgument.
    let mut c = enforcer_client(&a.socket).await;
    let err = c
        .watch_revocations(tonic::Request::new(ep::WatchRevocationsRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    let (mut stream, first) = watch(&a).await;
    assert!(first.revoked.is_empty(), "{first:?}");

    // Revoked by SPIFFE ID: arrives on the open stream, with the server's semantics.
    let before = now();
    tokio::task::block_in_place(|| s.sigil_json(&["svid", "revoke", &id("victim")]));
    let by_id = until(&mut stream, |m| {
        m.revoked.iter().any(|r| r.spiffe_id == id("victim"))
    })
    .await;
    assert!(by_id.revision > first.revision, "{by_id:?}");
    let r = by_id
        .revoked
        .iter()
        .find(|r| r.spiffe_id == id("victim"))
        .unwrap();
    assert_eq!(r.serial, "");
    assert!(r.revoked_at >= before && r.revoked_at <= now(), "{r:?}");
    assert!(r.expires_at > now(), "{r:?}");

    // Revoked by serial: the full list is re-sent, the serial in lowercase hex.
    let minted = tokio::task::block_in_place(|| s.mint(&id("other"), &tmp.path().join("minted")));
    let serial = minted["serial"].as_str().unwrap().to_owned();
    tokio::task::block_in_place(|| s.sigil_json(&["svid", "revoke", &serial.to_ascii_uppercase()]));
    let by_serial = until(&mut stream, |m| {
        m.revoked.iter().any(|r| r.serial == serial)
    })
    .await;
    assert!(by_serial.revision > by_id.revision);
    assert_eq!(by_serial.revoked.len(), 2, "{by_serial:?}");
    let r = by_serial
        .revoked
        .iter()
        .find(|r| r.serial == serial)
        .unwrap();
    assert_eq!(r.spiffe_id, "");
    assert_eq!(serial, serial.to_ascii_lowercase());

    // The server goes away and the agent restarts: the cached list is served at once.
    drop(stream);
    tokio::task::block_in_place(|| {
        s.stop();
        a.restart();
    });
    let (_stream, cached) = watch(&a).await;
    assert_eq!(cached.revision, by_serial.revision);
    let mut got: Vec<(String, String)> = cached
        .revoked
        .iter()
        .map(|r| (r.serial.clone(), r.spiffe_id.clone()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [(String::new(), id("victim")), (serial, String::new())]
    );
}

/// Calls `f` until it fails with a PermissionDenied that names the enforcer flag (the agent
/// may still be attesting or syncing: Unavailable, or no entry yet) — within 20 s.
async fn until_not_an_enforcer<F, Fut, T>(a: &Agent, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match f().await {
            Err(e)
                if e.code() == tonic::Code::PermissionDenied
                    && e.message()
                        .contains("no registration entry marks this workload as an enforcer") =>
            {
                return;
            }
            other => assert!(
                Instant::now() < deadline,
                "{what}: still not refused as a non-enforcer: {:?}\n{}",
                other.err(),
                a.log_text()
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads `stream` until it ends with an error (within 10 s), and returns it.
async fn ended<T>(stream: &mut tonic::Streaming<T>) -> tonic::Status {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("the stream did not end within 10 s")
        {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => return status,
        }
    }
}

/// The enforcer flag, end to end (admin CLI, store, node API, agent): a workload whose entry
/// is not marked is refused both streams; marked (`entry update --enforcer`), it is served;
/// unmarked again (`--no-enforcer`), its open streams end with PermissionDenied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_workloads_of_enforcer_entries_may_watch() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, a, entry) = tokio::task::block_in_place(|| stack_with(tmp.path(), false));
    let mut c = enforcer_client(&a.socket).await;
    until_not_an_enforcer(&a, "WatchRevocations", || {
        let mut c = c.clone();
        async move {
            c.watch_revocations(with_header(ep::WatchRevocationsRequest {}))
                .await
        }
    })
    .await;
    until_not_an_enforcer(&a, "WatchPolicy", || {
        let mut c = c.clone();
        async move { c.watch_policy(with_header(ep::WatchPolicyRequest {})).await }
    })
    .await;

    let shown =
        tokio::task::block_in_place(|| s.sigil_json(&["entry", "update", &entry, "--enforcer"]));
    assert_eq!(shown["enforcer"], true, "{shown}");
    let (mut revocations, _) = watch(&a).await;
    let mut policy = c
        .watch_policy(with_header(ep::WatchPolicyRequest {}))
        .await
        .unwrap()
        .into_inner();

    // Another update keeps the flag unless told otherwise.
    let shown = tokio::task::block_in_place(|| {
        s.sigil_json(&["entry", "update", &entry, "--dns", "localhost"])
    });
    assert_eq!(shown["enforcer"], true, "{shown}");

    let shown =
        tokio::task::block_in_place(|| s.sigil_json(&["entry", "update", &entry, "--no-enforcer"]));
    assert!(shown.get("enforcer").is_none(), "{shown}");
    for (what, err) in [
        ("WatchRevocations", ended(&mut revocations).await),
        ("WatchPolicy", ended(&mut policy).await),
    ] {
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{what}: {err:?}");
        assert!(err.message().contains("as an enforcer"), "{what}: {err:?}");
    }
    let err = c
        .watch_revocations(with_header(ep::WatchRevocationsRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
}

/// A caller no entry of the node matches (this test binary, re-run as `nobody`) is refused
/// with PermissionDenied, while this process (matched by uid) is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_no_entry_matches_is_denied() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return; // the re-run below, as `nobody`: see child_call
    }
    if my_uid() != 0 {
        eprintln!("SKIPPED: needs root to run a child as nobody");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (_s, a) = tokio::task::block_in_place(|| stack(tmp.path()));
    let _ = watch(&a).await; // served to us: the setup can succeed

    // A copy of this test binary that `nobody` can execute.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin_dir = tmp.path().join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::fs::set_permissions(&bin_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = bin_dir.join("enforcer_api");
    std::fs::copy(std::env::current_exe().unwrap(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = tokio::task::block_in_place(|| {
        Command::new(&bin)
            .args([
                "child_call",
                "--exact",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, &a.socket)
            .uid(65534)
            .gid(65534)
            .current_dir("/")
            .output()
            .unwrap()
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("CHILD_RESULT=PermissionDenied"),
        "child as nobody: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Only does something when run by `a_caller_no_entry_matches_is_denied` as another user:
/// one WatchRevocations call, its outcome printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_call() {
    let Some(socket) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let mut c = enforcer_client(Path::new(&socket)).await;
    let result = c
        .watch_revocations(with_header(ep::WatchRevocationsRequest {}))
        .await;
    match result {
        Ok(_) => println!("CHILD_RESULT=Ok"),
        Err(s) => println!("CHILD_RESULT={:?} {}", s.code(), s.message()),
    }
}
