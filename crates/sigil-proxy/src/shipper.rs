//! Audit shipping: a background task reads the audit segment's records after the last
//! acknowledged position, posts them in batches to the server's audit log
//! (`POST /audit/v1/records`, mTLS with the proxy's own SVID, the server checked against the
//! trust bundle), and once the server answers with each record's tree index (after its commit)
//! records the acknowledged offset durably in `<audit_log>.acked`.
//!
//! Crash safety: the state file is replaced atomically (write a temporary file, fsync,
//! rename, fsync the directory), and only after an acknowledgement, so after a crash the
//! proxy re-sends at most the batches that were in flight; the server appends a
//! `(proxy, request_id)` once and answers a re-sent record with the index it already has.
//! A state file that does not name a record boundary of the segment (another segment, a
//! segment cut after a power loss) makes the shipper start again from the first record,
//! which the same idempotence makes safe.
//!
//! Failure: requests never wait for shipping; records stay durable in the segment and the
//! shipper retries with exponential backoff. Segments are not rotated yet: the segment
//! grows, and the acknowledged offset says how much of it the server holds.
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use arc_swap::ArcSwap;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::Credentials;
use crate::audit;

/// Most records per batch.
const MAX_BATCH_RECORDS: usize = 500;
/// Most record bytes per batch (the last record may cross it).
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// How often the end of the segment is looked at when everything is shipped.
const POLL: Duration = Duration::from_millis(100);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The state file's first line.
const STATE_MAGIC: &str = "sigil-audit-acked v1";

/// `host` and `port` of an `https://host[:port]` URL without a path.
pub fn parse_target(url: &str) -> Option<(String, u16)> {
    let rest = url.strip_prefix("https://")?.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        return None;
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (rest, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

/// The state file beside a segment.
pub fn acked_path(segment: &Path) -> PathBuf {
    let mut p = segment.as_os_str().to_owned();
    p.push(".acked");
    PathBuf::from(p)
}

/// What the server has acknowledged of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    /// The offset just after the last acknowledged record.
    pub offset: u64,
    /// That record's index in the server's audit log.
    pub index: u64,
}

/// Reads the state file; `None` if there is none yet.
pub fn read_acked(path: &Path) -> anyhow::Result<Option<Acked>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut lines = text.lines();
    let field = |line: Option<&str>, name: &str| -> anyhow::Result<u64> {
        line.and_then(|l| l.strip_prefix(name))
            .and_then(|v| v.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("{}: malformed (no {name} line)", path.display()))
    };
    if lines.next() != Some(STATE_MAGIC) {
        bail!("{}: not a sigil audit state file", path.display());
    }
    let offset = field(lines.next(), "offset")?;
    let index = field(lines.next(), "index")?;
    Ok(Some(Acked { offset, index }))
}

/// Replaces the state file atomically and durably: a temporary file beside it is written
/// and synced, renamed over it, and the directory synced.
pub fn write_acked(path: &Path, acked: &Acked) -> std::io::Result<()> {
    let text = format!(
        "{STATE_MAGIC}\noffset {}\nindex {}\n",
        acked.offset, acked.index
    );
    sigil_fs::write_private(path, text.as_bytes())
}

/// Where shipping resumes: the acknowledged offset if it is a record boundary of the
/// segment (or the segment's start), else the first record.
fn resume_offset(segment: &Path, state: &Path) -> anyhow::Result<u64> {
    let acked = match read_acked(state) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "audit shipping: unreadable state file; re-sending the segment");
            None
        }
    };
    let Some(acked) = acked else {
        return Ok(audit::FIRST_RECORD);
    };
    let file = File::open(segment).with_context(|| format!("{}", segment.display()))?;
    let scan = audit::scan(&file)?;
    if acked.offset == audit::FIRST_RECORD || audit::record_ends(&scan).contains(&acked.offset) {
        Ok(acked.offset)
    } else {
        tracing::warn!(
            offset = acked.offset,
            "audit shipping: the acknowledged offset is not a record boundary of the segment; \
             re-sending it from the start (the server keeps one copy of each record)"
        );
        Ok(audit::FIRST_RECORD)
    }
}

/// Starts the shipper task for `segment` (which must exist: open the [`audit::AuditLog`]
/// first).
pub fn spawn(
    target: &str,
    segment: PathBuf,
    creds: Arc<ArcSwap<Credentials>>,
    audit: audit::AuditLog,
    rotate_bytes: u64,
) -> anyhow::Result<JoinHandle<()>> {
    let (host, port) = parse_target(target).context("audit_ship_to: not an https:// URL")?;
    let state = acked_path(&segment);
    let from = resume_offset(&segment, &state)?;
    let last_index = read_acked(&state).ok().flatten().map_or(0, |a| a.index);
    let file = File::open(&segment).with_context(|| format!("{}", segment.display()))?;
    let shipper = Shipper {
        host,
        port,
        creds,
        file: Arc::new(file),
        state,
        conn: None,
        segment,
        audit,
        rotate_bytes,
        last_index,
    };
    Ok(tokio::spawn(shipper.run(from)))
}

struct Shipper {
    host: String,
    port: u16,
    creds: Arc<ArcSwap<Credentials>>,
    file: Arc<File>,
    state: PathBuf,
    conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
    segment: PathBuf,
    audit: audit::AuditLog,
    /// Replace a fully acknowledged segment once it holds this many bytes.
    rotate_bytes: u64,
    /// The server index of the last acknowledged record.
    last_index: u64,
}

impl Shipper {
    async fn run(mut self, mut offset: u64) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.ship_once(offset).await {
                Ok(Some(next)) => {
                    offset = next;
                    backoff = BACKOFF_MIN;
                }
                Ok(None) => {
                    // Caught up: a big enough segment whose every record the server holds
                    // is replaced by a new one (deleting a segment only after its
                    // acknowledgement).
                    if offset >= self.rotate_bytes {
                        match self.rotate(offset).await {
                            Ok(Some(fresh)) => offset = fresh,
                            Ok(None) => {}
                            Err(e) => tracing::warn!(
                                error = format!("{e:#}"),
                                "audit segment rotation failed"
                            ),
                        }
                    }
                    tokio::time::sleep(POLL).await
                }
                Err(e) => {
                    self.conn = None;
                    tracing::warn!(error = %e, retry_in = ?backoff, "audit shipping failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Asks the writer to replace the segment if it is still at `offset`; the offset to go on
    /// from in the new segment if it did. The state file is moved to the new segment's start
    /// first: a crash in between re-sends the old segment's records, which the server's
    /// deduplication (proxy, request id) makes harmless, rather than skip new ones.
    async fn rotate(&mut self, offset: u64) -> anyhow::Result<Option<u64>> {
        let start = Acked {
            offset: audit::FIRST_RECORD,
            index: self.last_index,
        };
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || write_acked(&state, &start)).await??;
        if self
            .audit
            .rotate_if_acked(offset, self.rotate_bytes)
            .await?
        {
            let file =
                File::open(&self.segment).with_context(|| format!("{}", self.segment.display()))?;
            self.file = Arc::new(file);
            return Ok(Some(audit::FIRST_RECORD));
        }
        // Records arrived meanwhile: keep the acknowledged offset where it was.
        let kept = Acked {
            offset,
            index: self.last_index,
        };
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || write_acked(&state, &kept)).await??;
        Ok(None)
    }

    /// Ships one batch from `offset`; the new acknowledged offset, or `None` if there was
    /// nothing to ship.
    async fn ship_once(&mut self, offset: u64) -> anyhow::Result<Option<u64>> {
        let file = self.file.clone();
        let batch = tokio::task::spawn_blocking(move || {
            audit::read_from(&file, offset, MAX_BATCH_RECORDS, MAX_BATCH_BYTES)
        })
        .await??;
        let Some(&(_, end)) = batch.last() else {
            return Ok(None);
        };
        let mut body = Vec::with_capacity(batch.iter().map(|(r, _)| r.len() + 1).sum());
        for (r, _) in &batch {
            body.extend_from_slice(r);
            body.push(b'\n');
        }
        let indexes = self.post(body).await?;
        if indexes.len() != batch.len() {
            bail!(
                "the server acknowledged {} of {} records",
                indexes.len(),
                batch.len()
            );
        }
        let acked = Acked {
            offset: end,
            index: indexes.last().copied().unwrap_or_default(),
        };
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || write_acked(&state, &acked))
            .await?
            .context("writing the acknowledged offset")?;
        self.last_index = acked.index;
        tracing::debug!(
            records = batch.len(),
            last_index = acked.index,
            "audit records shipped"
        );
        Ok(Some(end))
    }

    async fn post(&mut self, body: Vec<u8>) -> anyhow::Result<Vec<u64>> {
        let send = match self.conn.take() {
            Some(c) if !c.is_closed() => c,
            _ => self.connect().await?,
        };
        let mut send = send;
        send.ready().await?;
        let req = http::Request::post("/audit/v1/records")
            .header(http::header::HOST, self.host.as_str())
            .header(http::header::CONTENT_TYPE, "application/x-ndjson")
            .body(Full::new(Bytes::from(body)))?;
        let resp = tokio::time::timeout(Duration::from_secs(30), send.send_request(req))
            .await
            .context("the server did not answer in 30 s")??;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!(
                "server answered HTTP {}: {}",
                status.as_u16(),
                String::from_utf8_lossy(&body).trim()
            );
        }
        #[derive(serde::Deserialize)]
        struct Ack {
            indexes: Vec<u64>,
        }
        let ack: Ack = serde_json::from_slice(&body).context("malformed acknowledgement")?;
        self.conn = Some(send);
        Ok(ack.indexes)
    }

    async fn connect(
        &self,
    ) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        // Built from the current credentials at each connection, so rotated SVIDs and
        // bundles are picked up.
        connect_authority(&self.creds.load(), &self.host, self.port).await
    }
}

/// An HTTP/1.1 connection over mTLS to the trust authority at `host:port`: the server is
/// checked against the bundle's authorities and its name, the client presents the proxy's
/// own SVID (`creds`).
pub(crate) async fn connect_authority(
    creds: &Credentials,
    host: &str,
    port: u16,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let tls = client_config(creds)?;
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect((host, port)))
        .await
        .context("connecting timed out")?
        .with_context(|| format!("connecting to {host}:{port}"))?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(host.to_owned())?;
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(tls).connect(name, tcp),
    )
    .await
    .context("TLS handshake timed out")?
    .with_context(|| format!("TLS to {host}:{port}"))?;
    let (send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(send)
}

/// A client configuration that trusts the bundle's X.509 authorities for the server and
/// presents the proxy's own SVID.
fn client_config(creds: &Credentials) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for der in &creds.x509.authorities {
        roots.add(CertificateDer::from(der.clone()))?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(sigil_tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(sigil_tls::PresentSvid(creds.serving.clone())));
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("https://localhost:8443"),
            Some(("localhost".into(), 8443))
        );
        assert_eq!(
            parse_target("https://a.example/"),
            Some(("a.example".into(), 443))
        );
        assert_eq!(parse_target("http://a:1"), None);
        assert_eq!(parse_target("https://a:1/x"), None);
        assert_eq!(parse_target("https://a:x"), None);
    }

    #[test]
    fn the_acked_offset_file_is_replaced_atomically_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let seg = dir.path().join("audit.log");
        let state = acked_path(&seg);
        assert_eq!(state, dir.path().join("audit.log.acked"));
        assert_eq!(read_acked(&state).unwrap(), None);
        let a = Acked {
            offset: 1234,
            index: 7,
        };
        write_acked(&state, &a).unwrap();
        assert_eq!(read_acked(&state).unwrap(), Some(a));
        let b = Acked {
            offset: 99_999,
            index: 12,
        };
        write_acked(&state, &b).unwrap();
        assert_eq!(read_acked(&state).unwrap(), Some(b));
        // No temporary file is left behind; the file is private.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("audit.log.acked")]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&state).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A damaged file is an error (the shipper then re-sends from the start).
        std::fs::write(&state, "sigil-audit-acked v1\noffset x\n").unwrap();
        assert!(read_acked(&state).is_err());
        std::fs::write(&state, "something else\n").unwrap();
        assert!(read_acked(&state).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resuming_needs_a_record_boundary_of_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let seg = dir.path().join("audit.log");
        let state = acked_path(&seg);
        let log = audit::AuditLog::open(&seg).unwrap();
        for i in 0..3 {
            let r = audit::DecisionRecord {
                time_ms: 1,
                request_id: &format!("r{i}"),
                spiffe_id: "spiffe://td/a",
                cert_thumbprint: "t",
                jti: None,
                method: "GET",
                path: "/",
                calls: Vec::new(),
                policy_ids: &[],
                decision: "allow",
                reason: &"x".repeat(i),
                direction: None,
                route: None,
                user: None,
                chain: None,
            };
            log.record(&r).await.unwrap();
        }
        let ends = audit::record_ends(&audit::scan(&File::open(&seg).unwrap()).unwrap());
        assert_eq!(resume_offset(&seg, &state).unwrap(), audit::FIRST_RECORD);
        write_acked(
            &state,
            &Acked {
                offset: ends[1],
                index: 1,
            },
        )
        .unwrap();
        assert_eq!(resume_offset(&seg, &state).unwrap(), ends[1]);
        // Not a boundary (e.g. the state of another segment): from the start.
        write_acked(
            &state,
            &Acked {
                offset: ends[1] + 3,
                index: 1,
            },
        )
        .unwrap();
        assert_eq!(resume_offset(&seg, &state).unwrap(), audit::FIRST_RECORD);
        std::fs::write(&state, "garbage").unwrap();
        assert_eq!(resume_offset(&seg, &state).unwrap(), audit::FIRST_RECORD);
    }
}
