//! Software TPMs for tests: `swtpm_setup` manufactures one (EK certificate signed by a test
//! CA of `swtpm_localca`), `swtpm` serves it on TCP for the `swtpm:` TCTI.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A test CA of `swtpm_localca` (created by the first `swtpm_setup` that uses it).
pub struct TestCa {
    pub dir: PathBuf,
}

impl TestCa {
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join("ca")).unwrap();
        let conf = format!(
            "statedir = {d}/ca\nsigningkey = {d}/ca/signkey.pem\nissuercert = {d}/ca/issuercert.pem\ncertserial = {d}/ca/certserial\n",
            d = dir.display()
        );
        std::fs::write(dir.join("localca.conf"), conf).unwrap();
        std::fs::write(
            dir.join("localca.options"),
            "--platform-manufacturer sigil-test\n--platform-version 2.1\n--platform-model swtpm\n",
        )
        .unwrap();
        let setup = format!(
            "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {d}/localca.conf\ncreate_certs_tool_options = {d}/localca.options\nactive_pcr_banks = sha256\n",
            d = dir.display()
        );
        std::fs::write(dir.join("setup.conf"), setup).unwrap();
        Self {
            dir: dir.to_owned(),
        }
    }

    /// The CA certificates (root and issuer) in PEM: the EK roots to trust.
    pub fn roots_pem(&self) -> String {
        let root =
            std::fs::read_to_string(self.dir.join("ca/swtpm-localca-rootca-cert.pem")).unwrap();
        let issuer = std::fs::read_to_string(self.dir.join("ca/issuercert.pem")).unwrap();
        format!("{root}{issuer}")
    }

    /// Manufactures a TPM's state in `state` with an EK certificate from this CA.
    pub fn manufacture(&self, state: &Path) {
        self.setup(state, &["--create-ek-cert"]);
    }

    /// Manufactures a TPM's state in `state` without an EK certificate (many TPMs ship
    /// none): the EK is still the TCG default one, created from its template.
    pub fn manufacture_without_ek_cert(&self, state: &Path) {
        self.setup(state, &[]);
    }

    fn setup(&self, state: &Path, extra: &[&str]) {
        std::fs::create_dir_all(state).unwrap();
        let out = Command::new("swtpm_setup")
            .arg("--tpm2")
            .args(extra)
            .args(["--overwrite", "--tpmstate"])
            .arg(state)
            .arg("--config")
            .arg(self.dir.join("setup.conf"))
            .output()
            .expect("swtpm_setup (apt-get install swtpm swtpm-tools)");
        assert!(
            out.status.success(),
            "swtpm_setup failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A running swtpm process; killed on drop.
pub struct SwTpm {
    child: Child,
    pub port: u16,
}

/// Two consecutive free TCP ports (command, control).
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < 65535 && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair");
}

impl SwTpm {
    /// Serves the TPM state in `state`.
    pub fn start(state: &Path) -> Self {
        let port = free_port_pair();
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
            .arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("swtpm");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "swtpm did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port }
    }

    /// The TCTI string for this TPM.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

impl Drop for SwTpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
