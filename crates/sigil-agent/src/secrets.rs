//! sigil's Secrets API (`sigil.agent.v1.Secrets`) on the Workload API socket, and the
//! rendering of secrets into files for programs that cannot call it.
//!
//! The agent attests the caller as for the Workload API, picks the X.509-SVID of an entry
//! matching it, and asks the trust authority over mTLS *with that SVID*: the authority
//! decides on the workload's own identity and logs the read. The agent keeps no secret
//! value: it passes the answer on (or writes it to the workload's file) and drops it.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use sigil_core::{RegistrationEntry, Selector};
use sigil_proto::agent as ap;
use tonic::{Request, Response, Status};

use crate::cache::HeldSvid;
use crate::identity::{Identities, Snapshot};
use crate::peer::WorkloadAttestor;
use crate::workload_api::{attest_caller, matching, no_entry, serving};

/// Longest wait for the trust authority's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest answer read from the trust authority.
const MAX_ANSWER: usize = 256 * 1024;

/// Most kept-alive connections to the trust authority (one per server and SVID).
const MAX_KEPT: usize = 64;

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Kept-alive mTLS connections to the trust authority, by server address and SVID serial, so
/// a read costs a request, not a handshake. A connection is taken out while in use and put
/// back after; one that closed is dropped.
#[derive(Default)]
pub(crate) struct Connections(
    std::sync::Mutex<std::collections::HashMap<(String, String), Sender>>,
);

impl Connections {
    fn take(&self, key: &(String, String)) -> Option<Sender> {
        self.0.lock().ok()?.remove(key).filter(|s| !s.is_closed())
    }

    fn put_back(&self, key: (String, String), sender: Sender) {
        if let Ok(mut g) = self.0.lock() {
            g.retain(|_, s| !s.is_closed());
            if g.len() < MAX_KEPT {
                g.insert(key, sender);
            }
        }
    }
}

/// The Secrets service.
pub struct SecretsApi {
    identities: Arc<Identities>,
    attestor: Arc<WorkloadAttestor>,
    conns: Connections,
}

impl SecretsApi {
    pub fn new(identities: Arc<Identities>, attestor: Arc<WorkloadAttestor>) -> Self {
        Self {
            identities,
            attestor,
            conns: Connections::default(),
        }
    }

    /// The SVID the caller of `req` acts with (`spiffe_id`, or its first entry's by ID).
    async fn caller_svid<T>(&self, req: &Request<T>, spiffe_id: &str) -> Result<HeldSvid, Status> {
        let selectors = attest_caller(&self.attestor, req).await?;
        let snap = serving(&self.identities)?;
        svid_for(&snap, &selectors, spiffe_id)
    }
}

/// The SVID of an entry of `snap` matching `selectors`: the one for `spiffe_id` if given,
/// else the first by SPIFFE ID.
fn svid_for(snap: &Snapshot, selectors: &[Selector], spiffe_id: &str) -> Result<HeldSvid, Status> {
    let mut entries: Vec<&RegistrationEntry> = matching(snap, selectors);
    if entries.is_empty() {
        return Err(no_entry());
    }
    entries.sort_by(|a, b| a.spec.spiffe_id.as_str().cmp(b.spec.spiffe_id.as_str()));
    let entry = if spiffe_id.is_empty() {
        entries.first().copied().ok_or_else(no_entry)?
    } else {
        entries
            .into_iter()
            .find(|e| e.spec.spiffe_id.as_str() == spiffe_id)
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "no registration entry gives the caller {spiffe_id}"
                ))
            })?
    };
    if let Some(svid) = snap.svids.get(&entry.id) {
        return Ok(svid.clone());
    }
    // The agent drops an SVID as soon as it learns it is revoked: say so, rather than "not
    // yet" (a new one comes only if the entry still allows it, after the revocation).
    let id = entry.spec.spiffe_id.as_str();
    let revoked = snap
        .revocations
        .as_ref()
        .is_some_and(|l| l.revoked.iter().any(|r| r.spiffe_id == id));
    Err(if revoked {
        Status::permission_denied(format!("the X.509-SVID of {id} has been revoked"))
    } else {
        Status::unavailable("the caller's X.509-SVID is not signed yet; retry shortly")
    })
}

/// What the trust authority answered.
struct Answer {
    status: http::StatusCode,
    body: Value,
}

impl Answer {
    fn message(&self) -> String {
        self.body
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("no reason given")
            .to_owned()
    }

    /// A refusal as the gRPC status a workload gets.
    fn status(&self) -> Status {
        let m = self.message();
        match self.status.as_u16() {
            400 => Status::invalid_argument(m),
            401 => Status::unauthenticated(m),
            403 => Status::permission_denied(m),
            404 => Status::not_found(m),
            409 => Status::failed_precondition(m),
            _ => Status::unavailable(format!("the trust authority: {m}")),
        }
    }
}

/// A failed step of a call to the trust authority: logged with its cause, reported to the
/// workload without it.
fn unavailable(what: &str, e: &dyn std::fmt::Display) -> Status {
    tracing::warn!(error = %e, what, "secrets call to the trust authority failed");
    Status::unavailable(format!("the trust authority cannot be reached ({what})"))
}

/// POSTs `body` as JSON to the trust authority's `path`, over mTLS with `svid`.
async fn call(
    identities: &Identities,
    conns: &Connections,
    svid: &HeldSvid,
    path: &str,
    body: Value,
) -> Result<Answer, Status> {
    let server = identities.server_address();
    let host = server
        .rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
        .unwrap_or_else(|| server.clone());
    let key = (server.clone(), svid.serial.clone());
    let work = async {
        let kept = match conns.take(&key) {
            Some(mut s) => s.ready().await.is_ok().then_some(s),
            None => None,
        };
        let mut send = match kept {
            Some(s) => s,
            None => connect(identities, svid, &server, &host).await?,
        };
        let req = http::Request::post(path)
            .header(http::header::HOST, host.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| Status::internal(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| unavailable("request", &e))?;
        let status = resp.status();
        let bytes = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| unavailable("answer", &e))?
            .to_bytes();
        conns.put_back(key.clone(), send);
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Answer { status, body })
    };
    tokio::time::timeout(CALL_TIMEOUT, work)
        .await
        .map_err(|_| Status::unavailable("the trust authority did not answer in time"))?
}

/// A new mTLS connection to the trust authority at `server`, presenting `svid` and requiring
/// `spiffe://<td>/sigil/server`.
async fn connect(
    identities: &Identities,
    svid: &HeldSvid,
    server: &str,
    host: &str,
) -> Result<Sender, Status> {
    let bundle = identities
        .x509_bundle()
        .ok_or_else(|| Status::unavailable("no trust bundle yet"))?;
    let server_id = bundle
        .trust_domain
        .id("/sigil/server")
        .map_err(|e| Status::internal(e.to_string()))?;
    let cfg = crate::tls::client_config(
        Arc::new(arc_swap::ArcSwap::from_pointee(bundle)),
        server_id,
        Some((svid.chain.clone(), svid.key.clone())),
    )
    .map_err(|e| Status::internal(e.to_string()))?;
    let mut cfg = (*cfg).clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(server)
        .await
        .map_err(|e| unavailable("connect", &e))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| unavailable("server name", &e))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .map_err(|e| unavailable("mTLS", &e))?;
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(|e| unavailable("HTTP", &e))?;
    tokio::spawn(conn);
    Ok(send)
}

#[derive(Deserialize)]
struct ReadAnswer {
    path: String,
    #[serde(default)]
    version: i64,
    value_b64: String,
    #[serde(flatten)]
    lease: LeaseAnswer,
}

#[derive(Deserialize)]
struct LeaseAnswer {
    lease_id: String,
    lease_duration: i64,
    expires_at: i64,
    renewable: bool,
}

impl From<LeaseAnswer> for ap::Lease {
    fn from(l: LeaseAnswer) -> Self {
        Self {
            lease_id: l.lease_id,
            lease_duration: l.lease_duration,
            expires_at: l.expires_at,
            renewable: l.renewable,
        }
    }
}

fn parse<T: for<'de> Deserialize<'de>>(a: Answer) -> Result<T, Status> {
    if !a.status.is_success() {
        return Err(a.status());
    }
    serde_json::from_value(a.body)
        .map_err(|e| Status::unavailable(format!("the trust authority's answer is malformed: {e}")))
}

/// Reads `path` as `svid`.
async fn read(
    identities: &Identities,
    conns: &Connections,
    svid: &HeldSvid,
    path: &str,
    ttl_secs: i64,
) -> Result<ap::SecretValue, Status> {
    let body = if ttl_secs > 0 {
        json!({ "path": path, "ttl_secs": ttl_secs })
    } else {
        json!({ "path": path })
    };
    let a: ReadAnswer = parse(call(identities, conns, svid, "/secrets/v1/read", body).await?)?;
    use base64::Engine as _;
    let value = base64::engine::general_purpose::STANDARD
        .decode(a.value_b64.as_bytes())
        .map_err(|_| Status::unavailable("the trust authority's answer is malformed"))?;
    Ok(ap::SecretValue {
        path: a.path,
        version: a.version,
        value,
        lease: Some(a.lease.into()),
        spiffe_id: svid.spiffe_id.to_string(),
    })
}

#[tonic::async_trait]
impl ap::secrets_server::Secrets for SecretsApi {
    async fn read(
        &self,
        req: Request<ap::ReadSecretRequest>,
    ) -> Result<Response<ap::SecretValue>, Status> {
        let svid = self.caller_svid(&req, &req.get_ref().spiffe_id).await?;
        let r = req.get_ref();
        read(&self.identities, &self.conns, &svid, &r.path, r.ttl_secs)
            .await
            .map(Response::new)
    }

    async fn renew(&self, req: Request<ap::LeaseRequest>) -> Result<Response<ap::Lease>, Status> {
        let svid = self.caller_svid(&req, &req.get_ref().spiffe_id).await?;
        let r = req.get_ref();
        let body = if r.increment_secs > 0 {
            json!({ "lease_id": r.lease_id, "increment_secs": r.increment_secs })
        } else {
            json!({ "lease_id": r.lease_id })
        };
        let a: LeaseAnswer = parse(
            call(
                &self.identities,
                &self.conns,
                &svid,
                "/secrets/v1/renew",
                body,
            )
            .await?,
        )?;
        Ok(Response::new(a.into()))
    }

    async fn revoke(&self, req: Request<ap::LeaseRequest>) -> Result<Response<ap::Lease>, Status> {
        let svid = self.caller_svid(&req, &req.get_ref().spiffe_id).await?;
        let body = json!({ "lease_id": req.get_ref().lease_id });
        let a = call(
            &self.identities,
            &self.conns,
            &svid,
            "/secrets/v1/revoke",
            body,
        )
        .await?;
        if !a.status.is_success() {
            return Err(a.status());
        }
        Ok(Response::new(ap::Lease {
            lease_id: req.get_ref().lease_id.clone(),
            ..ap::Lease::default()
        }))
    }
}

// ---------------------------------------------------------------------------------------
// Rendering into files
// ---------------------------------------------------------------------------------------

/// A secret the agent keeps written to a file for a workload (`[[secret_files]]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecretFile {
    /// The workload: the SPIFFE ID of one of this node's entries, which must select by
    /// `unix:uid:<n>` (the file's owner).
    pub spiffe_id: String,
    /// The secret's path.
    pub secret: String,
    /// The file name, under `<secrets_dir>/<uid>/`.
    pub file: String,
}

impl SecretFile {
    /// Whether the file name is one plain name.
    pub fn valid_file_name(&self) -> bool {
        !self.file.is_empty()
            && self.file.len() <= 255
            && self.file != "."
            && self.file != ".."
            && !self.file.starts_with('.')
            && self
                .file
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    }
}

/// The uid a file for `entry` belongs to: its one `unix:uid` selector.
fn entry_uid(entry: &RegistrationEntry) -> Option<u32> {
    let mut uids = entry
        .spec
        .selectors
        .iter()
        .filter(|s| s.kind() == sigil_core::SelectorKind::UnixUid)
        .filter_map(|s| s.value().parse::<u32>().ok());
    let uid = uids.next()?;
    uids.next().is_none().then_some(uid)
}

/// Writes `value` to `dir/<uid>/<name>` as the workload's: the directory 0500 and the file
/// 0400, both owned by `uid`; written to a temporary file and renamed over the old one, so
/// a reader never sees half a value.
fn write_secret_file(dir: &Path, uid: u32, name: &str, value: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
    // The top directory lets every uid through to its own directory, and list nothing.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
    let own = dir.join(uid.to_string());
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&own)?;
    std::os::unix::fs::chown(&own, Some(uid), None)?;
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o500))?;
    let n: [u8; 8] = rand::random();
    let tmp = own.join(format!(".{name}.{}.tmp", hex::encode(n)));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&tmp)?;
        f.write_all(value)?;
        f.sync_all()?;
        std::os::unix::fs::fchown(&f, Some(uid), None)?;
        std::fs::rename(&tmp, own.join(name))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn remove_secret_file(dir: &Path, uid: u32, name: &str) {
    let path = dir.join(uid.to_string()).join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            tracing::warn!(file = %path.display(), "removed a secret file the workload may no longer read")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "could not remove a secret file")
        }
    }
}

/// Keeps every `files` entry written under `dir`, reading it again at two thirds of its lease
/// (every 10 s while it cannot). A refusal (the workload may no longer read it, or its
/// identity was revoked) removes the file.
pub async fn render_forever(identities: Arc<Identities>, dir: PathBuf, files: Vec<SecretFile>) {
    let mut tasks = tokio::task::JoinSet::new();
    let conns = Arc::new(Connections::default());
    for f in files {
        tasks.spawn(render_one(
            identities.clone(),
            conns.clone(),
            dir.clone(),
            f,
        ));
    }
    while tasks.join_next().await.is_some() {}
}

async fn render_one(
    identities: Arc<Identities>,
    conns: Arc<Connections>,
    dir: PathBuf,
    f: SecretFile,
) {
    const RETRY: Duration = Duration::from_secs(10);
    let mut changes = identities.subscribe();
    loop {
        let wait = match render_once(&identities, &conns, &dir, &f).await {
            Ok(lease) => Duration::from_secs(u64::try_from(lease.max(3) * 2 / 3).unwrap_or(1)),
            Err(e) => {
                tracing::warn!(secret = %f.secret, spiffe_id = %f.spiffe_id, error = %e.message(), "rendering a secret file");
                RETRY
            }
        };
        // Also wake when the node's entries or SVIDs change (a first SVID, a rotation).
        let _ = tokio::time::timeout(wait, changes.changed()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One read and write; the lease's duration in seconds.
async fn render_once(
    identities: &Identities,
    conns: &Connections,
    dir: &Path,
    f: &SecretFile,
) -> Result<i64, Status> {
    let snap = serving(identities)?;
    let entry = snap
        .entries
        .iter()
        .find(|e| e.spec.spiffe_id.as_str() == f.spiffe_id)
        .ok_or_else(|| Status::not_found(format!("no entry of this node for {}", f.spiffe_id)))?;
    let uid = entry_uid(entry).ok_or_else(|| {
        Status::failed_precondition(format!(
            "the entry of {} must select exactly one unix:uid (the file's owner)",
            f.spiffe_id
        ))
    })?;
    let svid = snap
        .svids
        .get(&entry.id)
        .cloned()
        .ok_or_else(|| Status::unavailable("no X.509-SVID for the entry yet"))?;
    match read(identities, conns, &svid, &f.secret, 0).await {
        Ok(v) => {
            let lease = v.lease.map_or(0, |l| l.lease_duration);
            let (dir, name, value) = (dir.to_owned(), f.file.clone(), v.value);
            tokio::task::spawn_blocking(move || write_secret_file(&dir, uid, &name, &value))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(format!("writing the secret file: {e}")))?;
            Ok(lease)
        }
        Err(s) => {
            if matches!(
                s.code(),
                tonic::Code::PermissionDenied
                    | tonic::Code::NotFound
                    | tonic::Code::Unauthenticated
            ) {
                remove_secret_file(dir, uid, &f.file);
            }
            Err(s)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn file_names_are_one_plain_name() {
        let f = |name: &str| SecretFile {
            spiffe_id: "spiffe://t/a".into(),
            secret: "a".into(),
            file: name.into(),
        };
        assert!(f("db-password").valid_file_name());
        assert!(f("token.txt").valid_file_name());
        for bad in ["", ".", "..", ".hidden", "a/b", "../x", "a b", "a\0b"] {
            assert!(!f(bad).valid_file_name(), "{bad:?}");
        }
    }

    #[test]
    fn a_secret_file_is_the_workloads_alone() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let tmp = tempfile::tempdir().unwrap();
        let uid = unsafe_free_uid();
        write_secret_file(tmp.path(), uid, "pw", b"one").unwrap();
        write_secret_file(tmp.path(), uid, "pw", b"two").unwrap();
        let path = tmp.path().join(uid.to_string()).join("pw");
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o400);
        assert_eq!(m.uid(), uid);
        let d = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(d.permissions().mode() & 0o777, 0o500);
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        // No temporary file is left behind.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
        remove_secret_file(tmp.path(), uid, "pw");
        assert!(!path.exists());
    }

    /// This process's own uid (chown to it needs no privilege).
    fn unsafe_free_uid() -> u32 {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata("/proc/self").unwrap().uid()
    }
}
