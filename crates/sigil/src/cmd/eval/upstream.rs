//! Each node's model and tool server: the built-in demo model (OpenAI-compatible) plus a
//! small MCP tool endpoint, after an optional delay, recording the `x-eval-seq` of every
//! request that reaches it. That record is the ground truth of the evaluation: a request
//! was let through exactly when its number is in it.
//!
//! With a model URL, model calls (`/v1/...`) go on to that real OpenAI-compatible server
//! (e.g. llama.cpp serving SmolLM2) after being recorded; the tool endpoint stays local.
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;

/// The header carrying each request's number.
pub(super) const SEQ_HEADER: &str = "x-eval-seq";

/// Request numbers seen by any node's model server.
#[derive(Default)]
pub(super) struct Seen(Mutex<HashSet<u64>>);

impl Seen {
    pub(super) fn contains(&self, seq: u64) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&seq)
    }
    fn insert(&self, seq: u64) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(seq);
    }
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<Bytes>,
>;

#[derive(Clone)]
struct Ctx {
    seen: Arc<Seen>,
    delay: Duration,
}

/// A real model server that model calls are passed on to.
#[derive(Clone)]
pub(super) struct RealModel {
    /// `scheme://authority`, without a trailing slash.
    base: String,
    client: HttpClient,
}

impl RealModel {
    /// `url`: the server's base, e.g. `http://127.0.0.1:8000` (plain HTTP on loopback).
    pub(super) fn new(url: &str) -> anyhow::Result<Self> {
        let uri: http::Uri = url.parse()?;
        let (Some("http"), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            anyhow::bail!("--model-url must be an http:// URL with a host");
        };
        anyhow::ensure!(
            uri.path().trim_end_matches('/').is_empty(),
            "--model-url is the server's base (http://host:port), without a path"
        );
        let base = format!("http://{authority}");
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        Ok(Self { base, client })
    }

    async fn forward(self, req: Request) -> Response {
        match self.try_forward(req).await {
            Ok(r) => r,
            Err(e) => (StatusCode::BAD_GATEWAY, format!("model server: {e}")).into_response(),
        }
    }

    async fn try_forward(&self, req: Request) -> anyhow::Result<Response> {
        use http_body_util::BodyExt;
        let (parts, body) = req.into_parts();
        let body = body.collect().await?.to_bytes();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let uri: http::Uri = format!("{}{path}", self.base).parse()?;
        let mut out = http::Request::builder().method(parts.method).uri(uri);
        if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
            out = out.header(header::CONTENT_TYPE, ct);
        }
        let resp = self
            .client
            .request(out.body(http_body_util::Full::new(body))?)
            .await?;
        let (parts, body) = resp.into_parts();
        Ok(Response::from_parts(parts, axum::body::Body::new(body)))
    }
}

async fn record(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    if let Some(seq) = req
        .headers()
        .get(SEQ_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        ctx.seen.insert(seq);
    }
    if !ctx.delay.is_zero() {
        tokio::time::sleep(ctx.delay).await;
    }
    next.run(req).await
}

/// A JSON-RPC `tools/call` answered with a text result (the tool "ran").
async fn mcp(body: Bytes) -> Response {
    let id = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("id").cloned())
        .unwrap_or(serde_json::Value::Null);
    let answer = serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "result": {"content": [{"type": "text", "text": "ok"}], "isError": false},
    });
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        answer.to_string(),
    )
        .into_response()
}

/// Starts one node's server on a loopback port; returns the port.
pub(super) async fn start(
    seen: Arc<Seen>,
    delay: Duration,
    real: Option<RealModel>,
) -> anyhow::Result<u16> {
    let ctx = Ctx { seen, delay };
    let models = match real {
        None => crate::demo_model::router(),
        Some(m) => axum::Router::new().fallback(move |req: Request| m.clone().forward(req)),
    };
    let app = axum::Router::new()
        .route("/mcp", post(mcp))
        .merge(models)
        .layer(axum::middleware::from_fn_with_state(ctx, record));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "an evaluation model server stopped");
        }
    });
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_url_is_a_base_joined_without_a_double_slash() {
        for url in ["http://127.0.0.1:8000", "http://127.0.0.1:8000/"] {
            assert_eq!(
                RealModel::new(url).map(|m| m.base).ok().as_deref(),
                Some("http://127.0.0.1:8000")
            );
        }
        for bad in [
            "https://x:1",
            "127.0.0.1:8000",
            "http://x:1/v1",
            "unix:///run/m.sock",
        ] {
            assert!(RealModel::new(bad).is_err(), "{bad}");
        }
    }
}
