//! `sigil workload`: a small SPIFFE Workload API client, to see what a process gets.
use std::path::PathBuf;

use anyhow::Context;
use sigil_proto::workload as wl;
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, clap::Subcommand)]
pub enum WorkloadCmd {
    /// Fetch this process's X.509-SVIDs and write svid.pem, key.pem, bundle.pem.
    FetchX509 {
        /// Workload API socket (default: $SPIFFE_ENDPOINT_SOCKET).
        #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
        socket: String,
        /// Where to write the files.
        #[arg(long)]
        out_dir: PathBuf,
        /// Which SVID to write when the process gets several (default: the first).
        #[arg(long)]
        spiffe_id: Option<String>,
    },
    /// Fetch a JWT-SVID for an audience and print it.
    FetchJwt {
        #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
        socket: String,
        #[arg(long, required = true)]
        audience: Vec<String>,
    },
}

pub(crate) async fn client(socket: &str) -> anyhow::Result<SpiffeWorkloadApiClient<Channel>> {
    Ok(SpiffeWorkloadApiClient::new(channel(socket).await?))
}

/// A gRPC channel to the agent's socket (`unix:` prefix optional).
pub(crate) async fn channel(socket: &str) -> anyhow::Result<Channel> {
    let raw = socket
        .strip_prefix("unix://")
        .or_else(|| socket.strip_prefix("unix:"))
        .unwrap_or(socket);
    let path = PathBuf::from(raw);
    let channel = Endpoint::from_static("http://workload-api")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .context("connecting to the Workload API")?;
    Ok(channel)
}

pub(crate) fn request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    r
}

fn pem_all(tag: &str, der_concat: &[u8]) -> anyhow::Result<String> {
    Ok(split_der(der_concat)?
        .into_iter()
        .map(|one| pem::encode(&pem::Pem::new(tag, one)))
        .collect())
}

/// Splits the Workload API's concatenated DER certificates (self-delimiting; split with
/// x509 parsing).
pub(crate) fn split_der(der_concat: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut rest = der_concat;
    while !rest.is_empty() {
        let (tail, _) = x509_parser::parse_x509_certificate(rest)
            .map_err(|e| anyhow::anyhow!("bad certificate from the Workload API: {e}"))?;
        let len = rest.len() - tail.len();
        let (one, tail) = rest.split_at(len);
        out.push(one.to_vec());
        rest = tail;
    }
    Ok(out)
}

pub async fn run(cmd: WorkloadCmd) -> anyhow::Result<()> {
    match cmd {
        WorkloadCmd::FetchX509 {
            socket,
            out_dir,
            spiffe_id,
        } => {
            let mut c = client(&socket).await?;
            let mut stream = c
                .fetch_x509svid(request(wl::X509svidRequest {}))
                .await?
                .into_inner();
            let resp = stream
                .message()
                .await?
                .context("the Workload API closed the stream without an SVID")?;
            let svid = match &spiffe_id {
                Some(id) => resp
                    .svids
                    .iter()
                    .find(|s| &s.spiffe_id == id)
                    .with_context(|| {
                        format!("no SVID for {id} (this process is not registered as it)")
                    })?,
                None => resp.svids.first().context("no SVID in the response")?,
            };
            std::fs::create_dir_all(&out_dir)?;
            crate::cmd::admin::write_file(
                &out_dir.join("svid.pem"),
                pem_all("CERTIFICATE", &svid.x509_svid)?.as_bytes(),
                0o644,
            )?;
            crate::cmd::admin::write_file(
                &out_dir.join("key.pem"),
                pem::encode(&pem::Pem::new("PRIVATE KEY", svid.x509_svid_key.clone())).as_bytes(),
                0o600,
            )?;
            crate::cmd::admin::write_file(
                &out_dir.join("bundle.pem"),
                pem_all("CERTIFICATE", &svid.bundle)?.as_bytes(),
                0o644,
            )?;
            println!(
                "{}\nWritten {}/{{svid,key,bundle}}.pem",
                svid.spiffe_id,
                out_dir.display()
            );
        }
        WorkloadCmd::FetchJwt { socket, audience } => {
            let mut c = client(&socket).await?;
            let resp = c
                .fetch_jwtsvid(request(wl::JwtsvidRequest {
                    audience,
                    spiffe_id: String::new(),
                }))
                .await?
                .into_inner();
            for s in resp.svids {
                println!("{} {}", s.spiffe_id, s.svid);
            }
        }
    }
    Ok(())
}
