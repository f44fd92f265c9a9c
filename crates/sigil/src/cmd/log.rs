//! `sigil log`: verify the server's transparency log from its C2SP checkpoint, tiles and entry
//! bundles (over HTTPS or from a directory holding the same paths), check inclusion of
//! certificates and consistency with an older checkpoint, and search it.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use sha2::{Digest, Sha256};
use sigil_log::tiles::{TileId, decode_entry_bundle, decode_hash_tile, tiles_for_size};
use sigil_log::{LogRecord, MemoryTree, VerifiedCheckpoint, leaf_hash, verify_checkpoint};
use tokio::net::TcpStream;

#[derive(Debug, clap::Args)]
pub struct SourceOpts {
    /// The server's base URL (`https://host:port`); the log is under `<url>/log/`.
    #[arg(long, conflicts_with = "dir")]
    server: Option<String>,
    /// PEM roots to verify the server's HTTPS certificate with (e.g. `sigil bundle show
    /// --format pem`).
    #[arg(long, requires = "server")]
    ca: Option<PathBuf>,
    /// Read `checkpoint` and `tile/...` from this directory instead of a server.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also write every file read to this directory (same layout as `--dir`).
    #[arg(long)]
    save_dir: Option<PathBuf>,
    /// Which of the server's logs: `issuance` (identities issued, under `/log/`) or `audit`
    /// (the proxies' decision records, under `/log/audit/`, key at `/log/audit/key`).
    #[arg(long, value_enum, default_value_t = LogName::Issuance)]
    log: LogName,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogName {
    Issuance,
    Audit,
}

impl LogName {
    /// The URL path prefix the log's files are under.
    fn prefix(self) -> &'static str {
        match self {
            Self::Issuance => "/log/",
            Self::Audit => "/log/audit/",
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum LogCmd {
    /// Verify the whole log: checkpoint signature, every entry against its leaf hash, every
    /// tile, and the root; optionally inclusion of certificates and consistency with an older
    /// checkpoint. Exits non-zero naming the first bad index.
    Verify {
        #[command(flatten)]
        source: SourceOpts,
        /// The log's public key (note vkey format, as served at /log/key), or a file holding it.
        #[arg(long)]
        key: String,
        /// Check that this certificate (PEM; its first certificate) is in the log.
        #[arg(long)]
        inclusion: Vec<PathBuf>,
        /// Check that the log extends this older signed checkpoint.
        #[arg(long)]
        since_checkpoint: Option<PathBuf>,
    },
    /// List the leaves issued to a SPIFFE ID (as JSON lines: index and record).
    Search {
        #[command(flatten)]
        source: SourceOpts,
        /// Verify the log with this key first.
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        spiffe_id: String,
        /// Only leaves issued at or after this Unix time.
        #[arg(long)]
        since: Option<i64>,
    },
}

pub async fn run(cmd: LogCmd) -> anyhow::Result<()> {
    match cmd {
        LogCmd::Verify {
            source,
            key,
            inclusion,
            since_checkpoint,
        } => {
            let src = Source::new(&source)?;
            let key = read_key(&key)?;
            let log = load_verified(&src, &key).await?;
            for cert in &inclusion {
                check_inclusion(&log, cert)?;
            }
            if let Some(old) = since_checkpoint {
                let note = std::fs::read(&old).with_context(|| format!("{}", old.display()))?;
                let old_cp = verify_checkpoint(&note, &key)
                    .map_err(|e| anyhow!("older checkpoint {}: {e}", old.display()))?;
                check_consistency(&log, &old_cp)?;
            }
            println!(
                "log {} verified: {} entries, root {}",
                log.checkpoint.origin,
                log.checkpoint.size,
                hex::encode(log.checkpoint.root.0)
            );
            Ok(())
        }
        LogCmd::Search {
            source,
            key,
            spiffe_id,
            since,
        } => {
            let src = Source::new(&source)?;
            let entries = match key {
                Some(k) => load_verified(&src, &read_key(&k)?).await?.entries,
                None => {
                    let note = src.get("checkpoint").await?.context("no checkpoint")?;
                    let size = unverified_size(&note)?;
                    fetch_entries(&src, size).await?
                }
            };
            let audit = source.log == LogName::Audit;
            for (i, e) in entries.iter().enumerate() {
                // Audit leaves are decision records: the caller and the time in ms.
                let (id, at) = if audit {
                    let Ok(v) = serde_json::from_slice::<serde_json::Value>(e) else {
                        continue;
                    };
                    let id = v.get("spiffe_id").and_then(|i| i.as_str());
                    let id = id.unwrap_or_default().to_owned();
                    let ms = v.get("time_ms").and_then(serde_json::Value::as_i64);
                    let secs = ms.unwrap_or_default() / 1000;
                    (id, secs)
                } else {
                    let Ok(rec) = LogRecord::from_bytes(e) else {
                        continue;
                    };
                    (rec.spiffe_id().to_owned(), rec.issued_at())
                };
                if id == spiffe_id && since.is_none_or(|s| at >= s) {
                    let v: serde_json::Value = serde_json::from_slice(e)?;
                    println!("{}", serde_json::json!({"index": i, "record": v}));
                }
            }
            Ok(())
        }
    }
}

fn read_key(k: &str) -> anyhow::Result<String> {
    let p = Path::new(k);
    if !k.contains('+') && p.exists() {
        return Ok(std::fs::read_to_string(p)?.trim().to_owned());
    }
    Ok(k.trim().to_owned())
}

fn unverified_size(note: &[u8]) -> anyhow::Result<u64> {
    let text = std::str::from_utf8(note)?;
    text.lines()
        .nth(1)
        .and_then(|l| l.parse().ok())
        .context("malformed checkpoint")
}

/// A log whose checkpoint signature, entries, tiles and root all verified.
struct VerifiedLog {
    checkpoint: VerifiedCheckpoint,
    entries: Vec<Vec<u8>>,
    tree: MemoryTree,
}

async fn fetch_entries(src: &Source, size: u64) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for t in tiles_for_size(size).into_iter().filter(|t| t.level == 0) {
        let bundle = src.get(&t.entries_path()).await?.ok_or_else(|| {
            anyhow!(
                "index {}: entry bundle {} missing",
                t.first(),
                t.entries_path()
            )
        })?;
        out.extend(decode_entry_bundle(&bundle).map_err(|e| anyhow!("index {}: {e}", t.first()))?);
    }
    Ok(out)
}

async fn load_verified(src: &Source, key: &str) -> anyhow::Result<VerifiedLog> {
    let note = src
        .get("checkpoint")
        .await?
        .context("the log has no checkpoint")?;
    let checkpoint = verify_checkpoint(&note, key).map_err(|e| anyhow!("checkpoint: {e}"))?;
    let size = checkpoint.size;
    let tiles = tiles_for_size(size);
    let mut tree = MemoryTree::new();
    let mut entries = Vec::new();
    for t in tiles.iter().filter(|t| t.level == 0) {
        let (start, end) = t.leaf_range();
        let bundle = src.get(&t.entries_path()).await?.ok_or_else(|| {
            anyhow!(
                "index {start}: entry bundle {} is missing",
                t.entries_path()
            )
        })?;
        let got = decode_entry_bundle(&bundle)
            .map_err(|e| anyhow!("index {start}: bad entry bundle {}: {e}", t.entries_path()))?;
        let hashes = fetch_tile(src, t).await?;
        for (i, (idx, want)) in (start..end).zip(hashes.iter()).enumerate() {
            let Some(entry) = got.get(i) else {
                bail!("index {idx}: entry missing (the log's checkpoint has {size} entries)");
            };
            if leaf_hash(entry) != *want {
                bail!(
                    "index {idx}: entry does not match its leaf hash in {}",
                    t.path()
                );
            }
            tree.push(entry);
            entries.push(entry.clone());
        }
        if got.len() > hashes.len() {
            bail!(
                "index {end}: unexpected extra entries in {}",
                t.entries_path()
            );
        }
    }
    // Every hash tile above level 0 must be what the entries produce.
    for t in tiles.iter().filter(|t| t.level > 0) {
        let hashes = fetch_tile(src, t).await?;
        for (k, (stored, got)) in t.hash_indexes().iter().zip(&hashes).enumerate() {
            if tree.stored_hash(*stored) != Some(*got) {
                let leaves_per = 1u64 << (8 * u32::from(t.level));
                let first = (t.first() + k as u64) * leaves_per;
                bail!(
                    "index {first}: tile {} disagrees with the entries from index {first}",
                    t.path()
                );
            }
        }
    }
    if tree.root() != checkpoint.root {
        bail!(
            "index 0: the {size} entries do not hash to the checkpoint's root (entries and tiles \
             agree with each other, so the first bad index cannot be located)"
        );
    }
    Ok(VerifiedLog {
        checkpoint,
        entries,
        tree,
    })
}

async fn fetch_tile(src: &Source, t: &TileId) -> anyhow::Result<Vec<sigil_log::Hash>> {
    let data = src
        .get(&t.path())
        .await?
        .ok_or_else(|| anyhow!("index {}: tile {} is missing", t.first(), t.path()))?;
    decode_hash_tile(&data, t.width).map_err(|e| anyhow!("index {}: {}: {e}", t.first(), t.path()))
}

fn check_inclusion(log: &VerifiedLog, cert: &Path) -> anyhow::Result<()> {
    let pem_text = std::fs::read(cert).with_context(|| format!("{}", cert.display()))?;
    let first = pem::parse_many(&pem_text)?
        .into_iter()
        .find(|p| p.tag() == "CERTIFICATE")
        .ok_or_else(|| anyhow!("{}: no certificate", cert.display()))?;
    let sha = hex::encode(Sha256::digest(first.contents()));
    let found = log.entries.iter().position(
        |e| matches!(LogRecord::from_bytes(e), Ok(LogRecord::X509Svid(r)) if r.cert_sha256 == sha),
    );
    let Some(index) = found else {
        bail!("{}: certificate {sha} is not in the log", cert.display());
    };
    let index = index as u64;
    let size = log.checkpoint.size;
    let leaf = log
        .entries
        .get(usize::try_from(index)?)
        .map(|e| leaf_hash(e))
        .context("entry")?;
    let proof = log.tree.inclusion_proof(index, size)?;
    sigil_log::verify_inclusion(leaf, index, size, &proof, log.checkpoint.root)
        .map_err(|e| anyhow!("index {index}: {e}"))?;
    println!(
        "{}: included at index {index} ({} proof hashes)",
        cert.display(),
        proof.len()
    );
    Ok(())
}

fn check_consistency(log: &VerifiedLog, old: &VerifiedCheckpoint) -> anyhow::Result<()> {
    let new = &log.checkpoint;
    if old.size > new.size {
        bail!(
            "index {}: the log has {} entries, fewer than the older checkpoint's {}",
            new.size,
            new.size,
            old.size
        );
    }
    let proof = log.tree.consistency_proof(old.size, new.size)?;
    sigil_log::verify_consistency(old.size, old.root, new.size, new.root, &proof).map_err(|e| {
        anyhow!(
            "the log is not consistent with the older checkpoint (size {}): {e}",
            old.size
        )
    })?;
    println!("consistent with the checkpoint of size {}", old.size);
    Ok(())
}

/// Where the log's files come from.
enum Source {
    Dir(PathBuf, Option<PathBuf>),
    Https {
        host: String,
        port: u16,
        tls: Arc<rustls::ClientConfig>,
        save: Option<PathBuf>,
        prefix: &'static str,
    },
}

impl Source {
    fn new(o: &SourceOpts) -> anyhow::Result<Self> {
        match (&o.server, &o.dir) {
            (Some(url), None) => {
                let rest = url
                    .strip_prefix("https://")
                    .context("--server must be an https:// URL")?
                    .trim_end_matches('/');
                let (host, port) = match rest.rsplit_once(':') {
                    Some((h, p)) => (h.to_owned(), p.parse().context("bad port")?),
                    None => (rest.to_owned(), 443),
                };
                let ca = o.ca.as_ref().context("--server needs --ca")?;
                let mut roots = rustls::RootCertStore::empty();
                for p in pem::parse_many(std::fs::read(ca)?)? {
                    roots.add(rustls_pki_types::CertificateDer::from(
                        p.contents().to_vec(),
                    ))?;
                }
                let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                let cfg = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Ok(Self::Https {
                    host,
                    port,
                    tls: Arc::new(cfg),
                    save: o.save_dir.clone(),
                    prefix: o.log.prefix(),
                })
            }
            (None, Some(d)) => Ok(Self::Dir(d.clone(), o.save_dir.clone())),
            _ => bail!("give --server URL --ca PEM, or --dir DIR"),
        }
    }

    /// The file at `path` (`checkpoint`, `tile/...`); `None` if absent.
    async fn get(&self, path: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let (data, save) = match self {
            Self::Dir(d, save) => match std::fs::read(d.join(path)) {
                Ok(b) => (Some(b), save),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, save),
                Err(e) => return Err(e).context(path.to_owned()),
            },
            Self::Https {
                host,
                port,
                tls,
                save,
                prefix,
            } => (
                https_get(host, *port, tls.clone(), &format!("{prefix}{path}")).await?,
                save,
            ),
        };
        if let (Some(dir), Some(b)) = (save, &data) {
            let p = dir.join(path);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&p, b)?;
        }
        Ok(data)
    }
}

async fn https_get(
    host: &str,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
) -> anyhow::Result<Option<Vec<u8>>> {
    let tcp = TcpStream::connect((host, port))
        .await
        .with_context(|| format!("connecting to {host}:{port}"))?;
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS to {host}:{port}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, host)
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    match status.as_u16() {
        200 => Ok(Some(body)),
        404 => Ok(None),
        s => bail!("GET {path}: HTTP {s}"),
    }
}
