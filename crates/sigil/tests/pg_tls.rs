//! PostgreSQL over TLS (issue 19): `sigil server` on a PostgreSQL that accepts only TLS on TCP
//! (`common::pg_tls`), with `sslmode=verify-full` and `sslrootcert`. The right CA and host
//! work end to end (an admin write read back, every connection of the server encrypted); an
//! unrelated CA, plaintext (`sslmode=disable`) and a host the certificate does not name each
//! stop the server at start with a non-zero exit and the reason on stderr. Skipped (not
//! failed) only when no PostgreSQL server binaries are installed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pg_tls::PgTls;
use common::{Server, TD};

/// A config file naming a fresh key-encryption key (required with PostgreSQL).
fn config_with_kek(dir: &Path) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt as _;
    let kek = dir.join("kek");
    let mut key = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut key).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&kek)
        .unwrap()
        .write_all(&key)
        .unwrap();
    let cfg = dir.join("sigil.toml");
    std::fs::write(
        &cfg,
        format!(
            "key_encryption_key_file = {:?}\n",
            kek.display().to_string()
        ),
    )
    .unwrap();
    cfg
}

/// Starts `sigil server` on `url`, which must fail: returns its stderr after checking that it
/// exits non-zero within 60 s (never hangs on a connection it cannot make).
fn server_refuses(dir: &Path, url: &str) -> String {
    let cfg = config_with_kek(dir);
    let mut child = Command::new(common::sigil_bin())
        .args(["server", "--trust-domain", TD, "--data-dir"])
        .arg(dir.join("srv"))
        .args(["--listen-addr", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .args(["--database-url", url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sigil server on {url} neither started nor failed within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        !status.success(),
        "sigil server on {url} exited with {status}"
    );
    // Not the panic of a crash: the error as main reports it.
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn server_on_postgres_with_verify_full_writes_and_reads_back() {
    let Some(pg) = PgTls::start("server_on_postgres_with_verify_full_writes_and_reads_back") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config_with_kek(tmp.path());
    let url = pg.verify_full_url();
    let server = Server::start(
        &tmp.path().join("srv"),
        &["--config", cfg.to_str().unwrap(), "--database-url", &url],
    );

    let node = format!("spiffe://{TD}/sigil/node/n1");
    let entry = server.sigil_json(&[
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://{TD}/app"),
        "--parent-id",
        &node,
        "--selector",
        "unix:uid:1000",
    ]);
    let id = entry["id"].as_str().unwrap();
    assert_eq!(server.sigil_json(&["entry", "show", id]), entry);
    // Written to this PostgreSQL, not somewhere else.
    assert_eq!(
        pg.psql(&format!("SELECT count(*) FROM entries WHERE id = '{id}'")),
        "1"
    );
    // Every TCP connection to it (the server's pool and its change listener) is TLS.
    let (tls, plain) = {
        let row = pg.psql(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.client_addr IS NOT NULL",
        );
        let (t, p) = row.split_once('|').unwrap();
        (t.parse::<u32>().unwrap(), p.parse::<u32>().unwrap())
    };
    assert!(tls >= 1, "no TLS connection from the server");
    assert_eq!(plain, 0, "a plaintext connection from the server");

    // The dynamic credentials engine connects to this PostgreSQL with verify-full too (a
    // role definition is stored only once its connection works) ...
    let create =
        "CREATE ROLE \"{{name}}\" LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';";
    let role = server.sigil_json(&[
        "secret",
        "db-role",
        "put",
        "app_ro",
        "--connection-url",
        &url,
        "--creation-sql",
        create,
    ]);
    assert_eq!(role["path"], "database/creds/app_ro");
    // ... and refuses a server certificate from another CA, storing nothing.
    let other = pg.url("localhost", "verify-full", Some(&pg.other_ca));
    let out = server.sigil(&[
        "secret",
        "db-role",
        "put",
        "other_ca",
        "--connection-url",
        &other,
        "--creation-sql",
        create,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("UnknownIssuer"),
        "{err}"
    );
    let roles = server.sigil_json(&["secret", "db-role", "list"]);
    assert_eq!(roles["roles"].as_array().unwrap().len(), 1, "{roles}");

    // Secrets in the PostgreSQL store are sealed: no table holds a value in clear.
    let marker = format!("plaintext-marker-{}", std::process::id());
    let mut put = std::process::Command::new(common::sigil_bin())
        .args(["secret", "put", "app/db", "--socket"])
        .arg(server.dir.join("admin.sock"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    put.stdin
        .take()
        .unwrap()
        .write_all(marker.as_bytes())
        .unwrap();
    assert!(put.wait().unwrap().success());
    let got = server.sigil(&["secret", "get", "app/db"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout), marker);
    let dump = pg.dump();
    assert!(
        dump.contains("secret_versions"),
        "the dump holds the secrets table"
    );
    assert!(
        !dump.contains(&marker),
        "a secret value in clear in PostgreSQL"
    );
    assert!(
        !dump.contains(&url),
        "a role's connection URL in clear in PostgreSQL"
    );
}

#[test]
fn server_refuses_an_unrelated_ca_plaintext_and_a_host_not_in_the_certificate() {
    let Some(pg) =
        PgTls::start("server_refuses_an_unrelated_ca_plaintext_and_a_host_not_in_the_certificate")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let case = |name: &str, url: &str| -> String {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        server_refuses(&dir, url)
    };

    // The certificate does not chain to the CA given.
    let err = case(
        "other-ca",
        &pg.url("localhost", "verify-full", Some(&pg.other_ca)),
    );
    assert!(err.contains("UnknownIssuer"), "{err}");

    // No TLS: pg_hba.conf has only `hostssl` lines, so the server itself refuses.
    let err = case("plaintext", &pg.url("localhost", "disable", None));
    assert!(err.contains("no encryption"), "{err}");

    // The right CA, but the certificate names `localhost` only, not 127.0.0.1.
    let err = case("by-ip", &pg.url("127.0.0.1", "verify-full", Some(&pg.ca)));
    assert!(err.contains("not valid for name \"127.0.0.1\""), "{err}");

    // Nothing was created by any of them.
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_tables WHERE tablename = 'entries'"),
        "0"
    );
}
