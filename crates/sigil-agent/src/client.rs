//! The node API client: gRPC over rustls to the server, one connection per node identity.
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use sigil_proto::node::v1::node_client::NodeClient;
use tonic::transport::{Channel, Endpoint};

/// A node API client over `tls` to `address` (`host:port`).
pub async fn connect(
    address: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<NodeClient<Channel>, tonic::transport::Error> {
    let address = address.to_owned();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let tls = tls.clone();
        let address = address.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&address).await?;
            tcp.set_nodelay(true)?;
            // The name is not checked (the verifier checks the SPIFFE ID); it only feeds SNI.
            let name = ServerName::try_from("sigil-server")
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    let channel = Endpoint::from_static("http://sigil-server")
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect_with_connector(connector)
        .await?;
    Ok(NodeClient::new(channel))
}
