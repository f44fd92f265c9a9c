//! The node's posture: what the agent observes of its device (OS, kernel, package updates,
//! running executables with their hashes, listening sockets, its own binary, boot state),
//! scored by the local ruleset (`posture_rules`, TOML; `sigil_risk::DEFAULT_RULESET_TOML`
//! when unset) and reported to the trust authority at start and whenever the score, its
//! reasons or the observed posture change (and every [`HEARTBEAT`] regardless).
//!
//! Executables are hashed through `/proc/<pid>/exe`, so the hash is of what is running (also
//! when the file on disk was replaced or deleted), and cached by (device, inode, size, mtime)
//! of that file, so a steady node hashes nothing new per round.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use sigil_risk::{Assessment, Posture, Ruleset};

use crate::identity::Identities;

/// A report is sent at least this often even when nothing changed (the server's view of
/// "when assessed" stays fresh).
const HEARTBEAT: Duration = Duration::from_secs(300);

/// The largest executable hashed (bigger ones are reported with an empty hash).
const MAX_HASH_BYTES: u64 = 512 << 20;

/// Collects posture; keeps the hash cache between rounds.
#[derive(Default)]
pub struct Collector {
    hashes: HashMap<(u64, u64, u64, i64), String>,
    /// `/proc` to read (tests point it elsewhere).
    proc_root: Option<std::path::PathBuf>,
}

impl Collector {
    pub fn new() -> Self {
        Self::default()
    }

    fn proc(&self) -> &Path {
        self.proc_root.as_deref().unwrap_or(Path::new("/proc"))
    }

    /// One observation at `now`. Never fails: what cannot be read is left out (an executable
    /// whose file cannot be read is listed with an empty hash, so a path rule still sees it).
    pub fn collect(&mut self, now: i64, boot: Option<sigil_risk::BootState>) -> Posture {
        Posture {
            os_release: os_release(Path::new("/etc/os-release")),
            kernel: read_trim(&self.proc().join("sys/kernel/osrelease")),
            last_package_update: last_package_update(),
            executables: self.executables(),
            listening: listening(self.proc()),
            sigil_sha256: self
                .hash_exe(&self.proc().join("self/exe"))
                .unwrap_or_default(),
            boot,
            collected_at: now,
        }
    }

    fn executables(&mut self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Ok(dir) = std::fs::read_dir(self.proc()) else {
            return out;
        };
        let pids: Vec<_> = dir
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            })
            .map(|e| e.path())
            .collect();
        for pid in pids {
            let exe = pid.join("exe");
            // Kernel threads have none; processes gone since the listing neither.
            let Ok(target) = std::fs::read_link(&exe) else {
                continue;
            };
            let path = target.to_string_lossy().into_owned();
            if out.contains_key(&path) {
                continue;
            }
            let hash = self.hash_exe(&exe).unwrap_or_default();
            out.insert(path, hash);
        }
        out
    }

    /// SHA-256 (hex) of the file behind `exe`, cached by its identity.
    fn hash_exe(&mut self, exe: &Path) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let mut f = std::fs::File::open(exe).ok()?;
        let m = f.metadata().ok()?;
        let key = (m.dev(), m.ino(), m.size(), m.mtime());
        if let Some(h) = self.hashes.get(&key) {
            return Some(h.clone());
        }
        if m.size() > MAX_HASH_BYTES {
            return None;
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = f.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            hasher.update(buf.get(..n)?);
        }
        let h = hex::encode(hasher.finalize());
        if self.hashes.len() > 4096 {
            self.hashes.clear();
        }
        self.hashes.insert(key, h.clone());
        Some(h)
    }
}

fn read_trim(p: &Path) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// `PRETTY_NAME` of an os-release file (quotes removed).
fn os_release(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .unwrap_or_default()
}

/// When the package database last changed: the newest mtime of the package managers'
/// databases present (dpkg, rpm, apk).
fn last_package_update() -> Option<i64> {
    [
        "/var/lib/dpkg/status",
        "/var/lib/rpm/rpmdb.sqlite",
        "/var/lib/rpm/Packages",
        "/lib/apk/db/installed",
    ]
    .iter()
    .filter_map(|p| std::fs::metadata(p).ok()?.modified().ok())
    .filter_map(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
    .filter_map(|d| i64::try_from(d.as_secs()).ok())
    .max()
}

/// Listening TCP sockets from `/proc/net/tcp` and `tcp6` (state 0A), as `addr:port`.
fn listening(proc_root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (file, v6) in [("net/tcp", false), ("net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(proc_root.join(file)) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let mut cols = line.split_whitespace();
            let (Some(_), Some(local), Some(_), Some(state)) =
                (cols.next(), cols.next(), cols.next(), cols.next())
            else {
                continue;
            };
            if state != "0A" {
                continue;
            }
            if let Some(a) = parse_proc_addr(local, v6) {
                out.insert(a);
            }
        }
    }
    out
}

/// `0100007F:1F90` → `127.0.0.1:8080`; the v6 form is four little-endian 32-bit words.
fn parse_proc_addr(s: &str, v6: bool) -> Option<String> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    if v6 {
        if addr.len() != 32 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (i, word) in bytes.chunks_mut(4).enumerate() {
            let w = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
            word.copy_from_slice(&w.to_le_bytes());
        }
        Some(format!("[{}]:{port}", std::net::Ipv6Addr::from(bytes)))
    } else {
        let w = u32::from_str_radix(addr, 16).ok()?;
        Some(format!(
            "{}:{port}",
            std::net::Ipv4Addr::from(w.to_le_bytes())
        ))
    }
}

/// The ruleset in force: `path`'s, or the default.
pub fn load_ruleset(path: Option<&Path>) -> anyhow::Result<Ruleset> {
    match path {
        None => Ok(Ruleset::default()),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("posture_rules {}: {e}", p.display()))?;
            Ruleset::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
        }
    }
}

/// What the last report said, to know when to send another.
#[derive(PartialEq)]
struct Reported {
    assessment: Assessment,
    posture: Posture,
}

/// Observes every `interval`, reports when something changed (or at the heartbeat), while
/// the agent holds a node identity and a connection. Runs until aborted.
pub async fn report_forever(
    identities: Arc<Identities>,
    ruleset: Ruleset,
    interval: Duration,
    broker: Option<String>,
) {
    let collector = Arc::new(std::sync::Mutex::new(Collector::new()));
    let mut telemetry = broker.and_then(|b| match NodeTelemetry::start(&b) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!(error = %e, "node telemetry off: cannot start the publisher");
            None
        }
    });
    let window_secs = u32::try_from(interval.as_secs()).unwrap_or(u32::MAX).max(1);
    let mut last: Option<(Reported, std::time::Instant)> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = identities.now();
        let boot = identities.boot_state();
        let c = collector.clone();
        let Ok(posture) = tokio::task::spawn_blocking(move || {
            c.lock()
                .map(|mut c| c.collect(now, boot))
                .unwrap_or_default()
        })
        .await
        else {
            continue;
        };
        let assessment = ruleset.assess(&posture, now);
        if let Some(t) = telemetry.as_mut() {
            t.publish(&identities, &posture, assessment.score, now, window_secs);
        }
        let current = Reported {
            assessment,
            posture: Posture {
                collected_at: 0,
                ..posture.clone()
            },
        };
        let due = match &last {
            None => true,
            Some((r, at)) => *r != current || at.elapsed() >= HEARTBEAT,
        };
        if !due {
            continue;
        }
        let Some(client) = identities.client.load_full() else {
            continue;
        };
        let Ok(posture_json) = serde_json::to_string(&posture) else {
            continue;
        };
        let req = sigil_proto::node::v1::PostureReport {
            posture_json,
            score: u32::from(current.assessment.score),
            reasons: current.assessment.reasons.clone(),
        };
        match (*client).clone().report_posture(req).await {
            Ok(ack) => {
                let risk = ack.into_inner().risk.unwrap_or_default();
                tracing::info!(
                    score = current.assessment.score,
                    level = current.assessment.level.as_str(),
                    node_level = %risk.level,
                    node_score = risk.score,
                    "posture reported"
                );
                last = Some((current, std::time::Instant::now()));
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "posture report failed; retrying next round");
            }
        }
    }
}

/// The node's behaviour telemetry: executables not seen in any earlier round.
struct NodeTelemetry {
    publisher: sigil_telemetry::Publisher,
    seen: BTreeSet<(String, String)>,
    first: bool,
    seq: u64,
    window_start: Option<i64>,
}

impl NodeTelemetry {
    fn start(broker: &str) -> Result<Self, sigil_telemetry::TelemetryError> {
        let b =
            sigil_telemetry::BrokerConfig::new(broker, sigil_telemetry::DEFAULT_KEEP_ALIVE_SECS)?;
        let id = format!("sigil-agent-{}", uuid::Uuid::new_v4().simple());
        Ok(Self {
            publisher: sigil_telemetry::Publisher::start(&b, &id)?,
            seen: BTreeSet::new(),
            first: true,
            seq: 0,
            window_start: None,
        })
    }

    /// One node window: what runs now that never ran before in this agent's life (the first
    /// round is the baseline: it reports nothing new), and the posture score.
    fn publish(
        &mut self,
        identities: &Identities,
        posture: &Posture,
        score: u8,
        now: i64,
        window_secs: u32,
    ) {
        let mut new_executables = BTreeMap::new();
        for (path, hash) in &posture.executables {
            if self.seen.insert((path.clone(), hash.clone())) && !self.first {
                new_executables.insert(path.clone(), hash.clone());
            }
        }
        self.first = false;
        if self.seen.len() > 100_000 {
            self.seen.clear();
            self.first = true;
        }
        let start = self.window_start.replace(now).unwrap_or(now);
        let Some((node, key)) = identities.node_signing() else {
            return;
        };
        let Ok(topic) = sigil_telemetry::topic_for(&node, sigil_telemetry::Kind::Agent) else {
            return;
        };
        self.seq += 1;
        let msg = sigil_risk::TelemetryMessage {
            source: node.to_string(),
            node: node.to_string(),
            window_start: start,
            window_secs,
            seq: self.seq,
            identities: Vec::new(),
            node_window: Some(sigil_risk::NodeWindow {
                new_executables,
                posture_score: score,
            }),
        };
        match sigil_telemetry::seal(&topic, &msg, &key) {
            Ok(bytes) => self.publisher.publish(topic, bytes),
            Err(e) => tracing::warn!(error = %e, "node telemetry: sealing failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn proc_addresses_parse_both_families() {
        assert_eq!(
            parse_proc_addr("0100007F:1F90", false).unwrap(),
            "127.0.0.1:8080"
        );
        assert_eq!(
            parse_proc_addr("00000000:0016", false).unwrap(),
            "0.0.0.0:22"
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000000000000:01BB", true).unwrap(),
            "[::]:443"
        );
        assert_eq!(
            parse_proc_addr("00000000000000000000000001000000:1F90", true).unwrap(),
            "[::1]:8080"
        );
        assert!(parse_proc_addr("zz:1", false).is_none());
        assert!(parse_proc_addr("0100007F", false).is_none());
        assert!(parse_proc_addr("00:01BB", true).is_none());
    }

    #[test]
    fn os_release_reads_pretty_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("os-release");
        std::fs::write(
            &p,
            "NAME=x\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n",
        )
        .unwrap();
        assert_eq!(os_release(&p), "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(os_release(&dir.path().join("missing")), "");
    }

    /// A real collection on this machine sees this test process, hashed, and its own binary.
    #[test]
    fn collects_this_process_and_hashes_it() {
        let mut c = Collector::new();
        let p = c.collect(1, None);
        let me = std::fs::read_link("/proc/self/exe").unwrap();
        let me = me.to_string_lossy().into_owned();
        let bytes = std::fs::read(&me).unwrap();
        let want = hex::encode(Sha256::digest(&bytes));
        assert_eq!(p.executables.get(&me), Some(&want));
        assert_eq!(p.sigil_sha256, want);
        assert!(!p.kernel.is_empty());
        // The second round is served from the cache and says the same.
        assert_eq!(c.collect(1, None).executables.get(&me), Some(&want));
    }

    /// A process started from an unknown place shows up, and the default ruleset scores it.
    #[test]
    fn an_unknown_executable_is_seen_and_scored() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("miner");
        std::fs::copy("/bin/sleep", &exe).unwrap();
        let mut child = std::process::Command::new(&exe).arg("30").spawn().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let mut c = Collector::new();
        let p = c.collect(1, None);
        let _ = child.kill();
        let _ = child.wait();
        let path = exe.to_string_lossy().into_owned();
        assert!(
            p.executables.contains_key(&path),
            "{:?}",
            p.executables.keys()
        );
        let a = Ruleset::default().assess(&p, 1);
        assert!(
            a.reasons.iter().any(|r| r.contains(&path)),
            "{:?}",
            a.reasons
        );
    }
}
