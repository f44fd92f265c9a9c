//! `sigil model`: sealed models. `register` and `seal` talk to the server's admin socket;
//! `open` runs as the workload: it gets its X.509-SVID from the Workload API, asks the server
//! for the model's data key over mTLS (released HPKE-sealed to the SVID's key), decrypts the
//! file into an anonymous in-memory file (`memfd_create`, sealed against any change) and
//! execs the model server on `/proc/self/fd/N`. Plaintext never touches a file system.
use std::io::{BufReader, BufWriter, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};
use sigil_seal::{DataKey, SignedHeader, SvidKeyWrap};

use crate::admin_client::AdminClient;
use crate::cmd::{AdminOpts, Output};

/// The placeholder in `open`'s command that becomes `/proc/self/fd/N`.
const MODEL_PLACEHOLDER: &str = "{model}";

#[derive(Debug, clap::Subcommand)]
pub enum ModelCmd {
    /// Register a model version: the server makes a random data key for it and keeps it
    /// wrapped under its key-encryption key (policy resource `Model::"<name>"`).
    Register {
        /// The model's name (`Model::"<name>"` in policy).
        #[arg(long)]
        name: String,
        /// The model version (from 1).
        #[arg(long)]
        version: i64,
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Seal a model file with its registered version's data key: writes a signed header and
    /// the content in authenticated chunks. A version seals exactly one file.
    Seal {
        /// The plaintext model file.
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: i64,
        /// Where to write the sealed file (default: `<file>.sealed`).
        #[arg(long, short = 'o')]
        out: Option<PathBuf>,
        /// Plaintext bytes per chunk (1 KiB to 16 MiB).
        #[arg(long, default_value_t = sigil_seal::DEFAULT_CHUNK_SIZE)]
        chunk_size: u32,
        /// Register the version first if it is not yet.
        #[arg(long)]
        register: bool,
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// List registered model versions.
    List {
        #[command(flatten)]
        opts: AdminOpts,
    },
    /// Print a sealed file's header (needs no key).
    Inspect {
        /// The sealed file.
        sealed: PathBuf,
    },
    /// Decrypt a sealed model into memory and exec a command on it: `{model}` in its
    /// arguments becomes `/proc/self/fd/N` (also in $SIGIL_MODEL_PATH, the fd number in
    /// $SIGIL_MODEL_FD).
    Open {
        /// The sealed file.
        sealed: PathBuf,
        /// The Workload API socket (the agent's).
        #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
        socket: String,
        /// The trust authority, `host:port` (its public mTLS listener).
        #[arg(long, env = "SIGIL_SERVER_ADDR")]
        server: String,
        /// Which of this process's SVIDs to ask with (default: the first).
        #[arg(long)]
        spiffe_id: Option<String>,
        /// The command to run, e.g. `-- python -m llama_cpp.server --model {model}`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

pub async fn run(cmd: ModelCmd) -> anyhow::Result<()> {
    match cmd {
        ModelCmd::Register {
            name,
            version,
            opts,
        } => {
            let v = AdminClient::new(&opts.socket)
                .call(
                    Method::POST,
                    "/v1/models",
                    Some(json!({"name": name, "version": version})),
                )
                .await?;
            print_value(&v, opts.output, || {
                format!(
                    "registered Model::{:?} version {} (key {})",
                    name,
                    version,
                    field(&v, "key_id").as_str().unwrap_or("?")
                )
            })
        }
        ModelCmd::List { opts } => {
            let v = AdminClient::new(&opts.socket)
                .call(Method::GET, "/v1/models", None)
                .await?;
            print_value(&v, opts.output, || {
                let mut s = String::new();
                for m in field(&v, "models").as_array().into_iter().flatten() {
                    s.push_str(&format!(
                        "{} v{} key {} {}\n",
                        field(m, "name").as_str().unwrap_or("?"),
                        field(m, "version"),
                        field(m, "key_id").as_str().unwrap_or("?"),
                        if *field(m, "sealed") == true {
                            "sealed"
                        } else {
                            "not sealed"
                        }
                    ));
                }
                s.trim_end().to_owned()
            })
        }
        ModelCmd::Seal {
            file,
            name,
            version,
            out,
            chunk_size,
            register,
            opts,
        } => seal(&file, &name, version, out, chunk_size, register, &opts).await,
        ModelCmd::Inspect { sealed } => {
            let mut r = BufReader::new(
                std::fs::File::open(&sealed)
                    .with_context(|| format!("opening {}", sealed.display()))?,
            );
            let h = SignedHeader::read_from(&mut r)?;
            println!("{}", serde_json::to_string_pretty(h.header())?);
            println!("header_sha256: {}", hex::encode(h.binding()));
            Ok(())
        }
        ModelCmd::Open {
            sealed,
            socket,
            server,
            spiffe_id,
            command,
        } => open(&sealed, &socket, &server, spiffe_id.as_deref(), command).await,
    }
}

fn print_value(v: &Value, output: Output, text: impl FnOnce() -> String) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Output::Text => println!("{}", text()),
    }
    Ok(())
}

async fn seal(
    file: &Path,
    name: &str,
    version: i64,
    out: Option<PathBuf>,
    chunk_size: u32,
    register: bool,
    opts: &AdminOpts,
) -> anyhow::Result<()> {
    let out = out.unwrap_or_else(|| {
        let mut p = file.as_os_str().to_owned();
        p.push(".sealed");
        PathBuf::from(p)
    });
    let open_in =
        || std::fs::File::open(file).with_context(|| format!("opening {}", file.display()));
    // First pass: length and SHA-256 for the header.
    let digest = {
        let f = open_in()?;
        tokio::task::spawn_blocking(move || sigil_seal::digest_reader(&mut BufReader::new(f)))
            .await??
    };
    let (header, key) = seal_request(
        &AdminClient::new(&opts.socket),
        name,
        version,
        chunk_size,
        &digest,
        register,
    )
    .await?;
    if header.header().plaintext_sha256 != digest.sha256 || header.header().name != name {
        bail!("the server signed a header for something else");
    }
    // Second pass: encrypt into a temporary file beside the output, renamed when complete.
    let f = open_in()?;
    let out2 = out.clone();
    let header2 = header.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let dir = out2
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let (tmp, mut w) = tempfile_in(dir)?;
        let written = (|| -> anyhow::Result<()> {
            let mut bw = BufWriter::with_capacity(1 << 20, &mut w);
            sigil_seal::seal(&mut BufReader::new(f), &mut bw, &header2, &key)?;
            bw.flush()?;
            drop(bw);
            w.sync_all()?;
            std::fs::rename(&tmp, &out2).with_context(|| format!("writing {}", out2.display()))?;
            Ok(())
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    })
    .await??;
    let h = header.header();
    match opts.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "sealed": out,
                "name": h.name,
                "version": h.version,
                "key_id": h.key_id,
                "header_sha256": hex::encode(header.binding()),
                "plaintext_sha256": h.plaintext_sha256,
                "chunks": h.chunk_count(),
            }))?
        ),
        Output::Text => println!(
            "sealed {} as Model::{:?} version {} ({} bytes, {} chunks, key {}) into {}",
            file.display(),
            h.name,
            h.version,
            h.plaintext_len,
            h.chunk_count(),
            h.key_id,
            out.display()
        ),
    }
    Ok(())
}

/// A new file in `dir`, named at random (the caller renames it on success or removes it).
/// Asks the trust authority to seal a version (registering it first when `register`): the
/// signed header for `digest` and the version's data key.
async fn seal_request(
    admin: &AdminClient,
    name: &str,
    version: i64,
    chunk_size: u32,
    digest: &sigil_seal::Digest,
    register: bool,
) -> anyhow::Result<(SignedHeader, DataKey)> {
    let v = admin
        .call(
            Method::POST,
            "/v1/models/seal",
            Some(json!({
                "name": name,
                "version": version,
                "chunk_size": chunk_size,
                "plaintext_len": digest.len,
                "plaintext_sha256": digest.sha256,
                "register": register,
            })),
        )
        .await?;
    let b64 = |k: &str, what: &str| -> anyhow::Result<Vec<u8>> {
        Ok(B64.decode(
            field(&v, k)
                .as_str()
                .with_context(|| format!("no {what} in the answer"))?,
        )?)
    };
    let header = SignedHeader::from_bytes(&b64("header", "header")?)?;
    let key = DataKey::from_bytes(&b64("data_key", "data key")?)?;
    Ok((header, key))
}

fn tempfile_in(dir: &Path) -> anyhow::Result<(PathBuf, std::fs::File)> {
    let n: [u8; 8] = rand::random();
    let path = dir.join(format!(".sigil-seal-{}.tmp", hex::encode(n)));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    Ok((path, f))
}

/// The workload's SVID as the Workload API gave it.
struct Svid {
    spiffe_id: String,
    chain: Vec<Vec<u8>>,
    key_pkcs8: Vec<u8>,
    bundle: Vec<Vec<u8>>,
}

async fn fetch_svid(socket: &str, want: Option<&str>) -> anyhow::Result<Svid> {
    use sigil_proto::workload as wl;
    let mut c = crate::cmd::workload::client(socket).await?;
    let mut stream = c
        .fetch_x509svid(crate::cmd::workload::request(wl::X509svidRequest {}))
        .await
        .context("fetching the X.509-SVID from the Workload API")?
        .into_inner();
    let resp = stream
        .message()
        .await?
        .context("the Workload API closed the stream without an SVID")?;
    let svid = match want {
        Some(id) => resp
            .svids
            .into_iter()
            .find(|s| s.spiffe_id == id)
            .with_context(|| format!("no SVID for {id}"))?,
        None => resp
            .svids
            .into_iter()
            .next()
            .context("no SVID in the response")?,
    };
    Ok(Svid {
        spiffe_id: svid.spiffe_id,
        chain: sigil_pki::split_der_certs(&svid.x509_svid)?,
        key_pkcs8: svid.x509_svid_key,
        bundle: sigil_pki::split_der_certs(&svid.bundle)?,
    })
}

/// Asks the server for the model's data key over mTLS with `svid`.
async fn release(
    server: &str,
    svid: &Svid,
    header: &SignedHeader,
) -> anyhow::Result<(DataKey, Vec<u8>)> {
    let id = sigil_core::SpiffeId::new(&svid.spiffe_id)?;
    let td = id.trust_domain();
    let server_id = td.id("/sigil/server")?;
    let bundle = sigil_pki::X509Bundle {
        trust_domain: td.clone(),
        authorities: svid.bundle.clone(),
    };
    let provider = sigil_tls::provider();
    let verifier = sigil_tls::SvidServerVerifier::new(
        Arc::new(arc_swap::ArcSwap::from_pointee(bundle)),
        server_id,
        provider.clone(),
    );
    let certs = svid
        .chain
        .iter()
        .map(|c| rustls_pki_types::CertificateDer::from(c.clone()))
        .collect();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(rustls_pki_types::PrivatePkcs8KeyDer::from(
        svid.key_pkcs8.clone(),
    ));
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(certs, key)?;
    let (host, port) = server
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .with_context(|| format!("--server {server:?} is not host:port"))?;
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .with_context(|| format!("connecting to the trust authority at {server}"))?;
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .with_context(|| format!("mTLS to {server}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let h = header.header();
    let body = json!({
        "name": h.name,
        "version": h.version,
        "header_sha256": hex::encode(header.binding()),
    });
    let req = http::Request::post("/models/v1/release")
        .header(http::header::HOST, host)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&body)?)))?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !status.is_success() {
        bail!(
            "the trust authority refused the key release ({status}): {}",
            field(&v, "message").as_str().unwrap_or("no reason given")
        );
    }
    if field(&v, "key_id").as_str() != Some(h.key_id.as_str()) {
        bail!("the released key is not the one the header names");
    }
    let field = |k: &str| -> anyhow::Result<Vec<u8>> {
        Ok(B64.decode(
            field(&v, k)
                .as_str()
                .with_context(|| format!("no {k} in the release"))?,
        )?)
    };
    let signer = field("signer_public_key")?;
    let wrap = SvidKeyWrap {
        enc: field("enc")?,
        ciphertext: field("ciphertext")?,
    };
    let info = sigil_seal::release_info(&h.name, h.version, &svid.spiffe_id, &header.binding());
    let key = sigil_seal::unwrap_with_svid_key(&wrap, &svid.key_pkcs8, &info)?;
    Ok((key, signer))
}

async fn open(
    sealed: &Path,
    socket: &str,
    server: &str,
    spiffe_id: Option<&str>,
    command: Vec<String>,
) -> anyhow::Result<()> {
    let file =
        std::fs::File::open(sealed).with_context(|| format!("opening {}", sealed.display()))?;
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let header = SignedHeader::read_from(&mut reader)
        .with_context(|| format!("reading {}", sealed.display()))?;
    let svid = fetch_svid(socket, spiffe_id).await?;
    let (key, signer) = release(server, &svid, &header).await?;
    drop(svid);
    header
        .verify(&signer)
        .context("the sealed file's header is not signed by this trust authority")?;
    let name = header.header().name.clone();
    let memfd =
        tokio::task::spawn_blocking(move || decrypt_to_memfd(reader, &header, key)).await??;
    exec_with_model(memfd, &name, command)
}

/// Decrypts into a new anonymous memory file, then seals it against writes, growth and
/// shrinking (and further seal changes). Working memory: one chunk and the reader's buffer.
fn decrypt_to_memfd(
    mut reader: impl std::io::Read,
    header: &SignedHeader,
    key: DataKey,
) -> anyhow::Result<std::os::fd::OwnedFd> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = rustix::fs::memfd_create(
        format!("sigil-model:{}", header.header().name),
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .context("memfd_create")?;
    let mut f = std::fs::File::from(fd);
    let opened = sigil_seal::open(&mut reader, &mut f, header, &key)?;
    drop(key);
    rustix::fs::fcntl_add_seals(
        &f,
        SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
    )
    .context("sealing the in-memory file")?;
    eprintln!(
        "sigil: opened Model::{:?} version {} in memory ({} bytes, {} chunks, sha256 {})",
        header.header().name,
        header.header().version,
        opened.plaintext_len,
        opened.chunks,
        opened.plaintext_sha256
    );
    Ok(f.into())
}

/// Replaces this process with `command`, the memfd inherited as `/proc/self/fd/N`.
fn exec_with_model(
    memfd: std::os::fd::OwnedFd,
    name: &str,
    command: Vec<String>,
) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    // The child inherits the fd: clear close-on-exec on it (only on it).
    rustix::io::fcntl_setfd(&memfd, rustix::io::FdFlags::empty())
        .context("making the model fd inheritable")?;
    let n = memfd.as_raw_fd();
    let path = format!("/proc/self/fd/{n}");
    let mut args = command
        .into_iter()
        .map(|a| a.replace(MODEL_PLACEHOLDER, &path));
    let program = args.next().context("no command to run")?;
    let err = std::process::Command::new(&program)
        .args(args)
        .env("SIGIL_MODEL_FD", n.to_string())
        .env("SIGIL_MODEL_PATH", &path)
        .env("SIGIL_MODEL_NAME", name)
        .exec();
    // exec only returns on failure; the fd (and the plaintext) go with this process.
    drop(memfd);
    Err(anyhow::anyhow!("running {program}: {err}"))
}

/// The demo model's name in `sigil dev`.
pub(crate) const DEV_MODEL: &str = "defect-detector";

/// `sigil dev`'s sealed model: a small demo model file (1 MiB, made in memory, never written
/// in clear) sealed as `Model::"defect-detector"`, and a policy bundle permitting `decrypt` of
/// it to `workload` (the demo policy is pushed with it). Reuses the sealed file of an earlier
/// run. Returns the sealed file and the plaintext's SHA-256.
pub(crate) async fn dev_demo(
    admin: &AdminClient,
    data_dir: &Path,
    workload: &str,
    demo_policy: &str,
) -> anyhow::Result<(PathBuf, String)> {
    let release_policy = format!(
        "// sigil dev: the demo workload may decrypt the demo's sealed model.\n\
         @id(\"dev-decrypt-demo-model\")\n\
         permit (principal == Workload::{workload:?}, action == Action::\"decrypt\",\n        \
         resource == Model::\"{DEV_MODEL}\");\n"
    );
    admin
        .call(
            Method::POST,
            "/v1/policy/push",
            Some(json!({"policies": {
                "demo.cedar": demo_policy,
                "sealed-models.cedar": release_policy,
            }})),
        )
        .await
        .context("pushing the sealed-model policy bundle")?;
    let dir = data_dir.join("models");
    std::fs::create_dir_all(&dir)?;
    let sealed = dir.join(format!("{DEV_MODEL}.sealed"));
    if let Ok(f) = std::fs::File::open(&sealed)
        && let Ok(h) = SignedHeader::read_from(&mut BufReader::new(f))
    {
        return Ok((sealed, h.header().plaintext_sha256.clone()));
    }
    let plain = demo_model_bytes();
    let digest = sigil_seal::digest_reader(&mut &plain[..])?;
    let listed = admin.call(Method::GET, "/v1/models", None).await?;
    let version = field(&listed, "models")
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| *field(m, "name") == DEV_MODEL)
        .filter_map(|m| field(m, "version").as_i64())
        .max()
        .unwrap_or(0)
        + 1;
    let (header, key) = seal_request(
        admin,
        DEV_MODEL,
        version,
        sigil_seal::DEFAULT_CHUNK_SIZE,
        &digest,
        true,
    )
    .await?;
    let mut out = Vec::with_capacity(plain.len() + 4096);
    sigil_seal::seal(&mut &plain[..], &mut out, &header, &key)?;
    sigil_fs::write_with_mode(&sealed, &out, 0o644)
        .with_context(|| format!("writing {}", sealed.display()))?;
    Ok((sealed, digest.sha256))
}

/// 1 MiB standing in for a model's weights (the demo model server has none to load).
fn demo_model_bytes() -> Vec<u8> {
    let mut v = b"sigil demo model: defect-detector weights\n".to_vec();
    let mut x: u32 = 0x5167_11ed;
    while v.len() < 1 << 20 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// A JSON object's member, or null.
fn field<'a>(v: &'a Value, k: &str) -> &'a Value {
    v.get(k).unwrap_or(&Value::Null)
}
