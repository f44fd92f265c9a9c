//! A throwaway PostgreSQL that only accepts TLS over TCP: `initdb` in a temp dir, a CA of its
//! own and a server certificate for the DNS name `localhost` only (no IP address, so
//! `verify-full` to `127.0.0.1` must fail), a second unrelated CA, `pg_hba.conf` with `local`
//! and `hostssl` lines only (plaintext TCP is refused), listening on 127.0.0.1 and a socket in
//! the temp dir. Stopped (`pg_ctl -m immediate stop`) on drop.
//!
//! Self-contained (no other `common` module), so other crates' tests can include it with
//! `#[path]`. When the tests run as root, PostgreSQL runs as the `postgres` OS user
//! (`initdb` and `pg_ctl` refuse root).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A running PostgreSQL with TLS on; see the module doc.
pub struct PgTls {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// `Some("postgres")` when PostgreSQL runs as that user (the tests run as root).
    run_as: Option<String>,
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    /// The CA that issued the server certificate (PEM).
    pub ca: PathBuf,
    /// A CA unrelated to the server certificate (PEM).
    pub other_ca: PathBuf,
}

impl PgTls {
    /// Starts one, or prints why not and returns `None` when no PostgreSQL server binaries
    /// are installed (no `initdb` under /usr/lib/postgresql/*/bin nor on the PATH). Any other
    /// failure panics.
    pub fn start(test: &str) -> Option<Self> {
        let Some(bin) = find_bin_dir() else {
            let _ = writeln!(
                std::io::stderr(),
                "{test} skipped: no PostgreSQL server binaries (initdb) installed"
            );
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let root = root.as_path();
        let run_as = if std::fs::metadata(root).unwrap().uid() == 0 {
            Some("postgres".to_owned())
        } else {
            None
        };
        let owner = run_as.as_deref().map(|user| {
            let id = |flag: &str| -> u32 {
                let out = Command::new("id").args([flag, user]).output().unwrap();
                assert!(out.status.success(), "running as root needs a {user} user");
                String::from_utf8(out.stdout)
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap()
            };
            (id("-u"), id("-g"))
        });
        let give = |p: &Path| {
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
            }
        };
        give(root);

        // Certificates: the server's for `localhost` only, issued by `ca`; `other_ca` unrelated.
        let (ca_pem, ca) = make_ca("sigil test PostgreSQL CA");
        let (other_ca_pem, _) = make_ca("sigil test unrelated CA");
        let server_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = params.signed_by(&server_key, &ca).unwrap();
        let write = |name: &str, text: &str, mode: u32| -> PathBuf {
            let p = root.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            give(&p);
            p
        };
        let ca_path = write("ca.pem", &ca_pem, 0o644);
        let other_ca = write("other-ca.pem", &other_ca_pem, 0o644);
        let cert_path = write("server.crt", &server_cert.pem(), 0o644);
        let key_path = write("server.key", &server_key.serialize_pem(), 0o600);

        let pg = Self {
            dir,
            bin,
            run_as,
            port: free_port(),
            ca: ca_path,
            other_ca,
        };
        let data = pg.data_dir();
        pg.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-A".as_ref(),
                "trust".as_ref(),
                "--no-sync".as_ref(),
                "--no-instructions".as_ref(),
            ],
        );
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        write!(
            conf,
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n",
            pg.port,
            root.display(),
            cert_path.display(),
            key_path.display(),
        )
        .unwrap();
        drop(conf);
        let log = root.join("postgres.log");
        pg.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "start".as_ref(),
            ],
        );
        Some(pg)
    }

    /// `postgres://postgres@<host>:<port>/postgres?sslmode=<sslmode>[&sslrootcert=<root>]`.
    pub fn url(&self, host: &str, sslmode: &str, rootcert: Option<&Path>) -> String {
        let mut url = format!(
            "postgres://postgres@{host}:{}/postgres?sslmode={sslmode}",
            self.port
        );
        if let Some(root) = rootcert {
            let root = root.to_str().unwrap();
            assert!(
                root.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b)),
                "{root} would need percent-encoding"
            );
            url.push_str("&sslrootcert=");
            url.push_str(root);
        }
        url
    }

    /// The URL a deployment should use: `verify-full` to `localhost`, trusting [`Self::ca`].
    pub fn verify_full_url(&self) -> String {
        self.url("localhost", "verify-full", Some(&self.ca))
    }

    /// Runs `psql -c sql` over the Unix socket (no TLS there); returns its trimmed output.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    /// `pg_dump` of the `postgres` database (every table's rows, as SQL text).
    pub fn dump(&self) -> String {
        let out = Command::new(self.bin.join("pg_dump"))
            .arg("-h")
            .arg(self.dir.path())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    fn run(&self, tool: &str, args: &[&std::ffi::OsStr]) {
        let out = self
            .command(tool)
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }
}

impl Drop for PgTls {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"])
            .current_dir(self.dir.path())
            .output();
    }
}

/// A self-signed CA: its certificate as PEM, and the issuer to sign with.
fn make_ca(name: &str) -> (String, rcgen::CertifiedIssuer<'static, rcgen::KeyPair>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let issuer = rcgen::CertifiedIssuer::self_signed(params, key).unwrap();
    (issuer.pem(), issuer)
}

/// The directory holding `initdb`, `pg_ctl` and `psql`: the newest
/// /usr/lib/postgresql/<version>/bin, else the directory of `initdb` on the PATH.
fn find_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
    })
}

/// A free loopback port (bound and released; fine for tests on one machine).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
