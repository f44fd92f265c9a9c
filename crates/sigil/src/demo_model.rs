//! A small built-in OpenAI-compatible model server, for demos and tests of `sigil proxy`.
//!
//! It serves three fake models (`defect-detector`, `line-assistant`, `forecast`) on plain
//! HTTP: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions` (JSON or, with
//! `"stream": true`, Server-Sent Events flushed chunk by chunk), `POST /v1/completions` (same)
//! and `POST /v1/embeddings` (a small deterministic vector, as floats or base64). Answers are
//! deterministic and name the last user message and the `x-sigil-spiffe-id` header the server
//! received, so a caller can see who the proxy said it was. Errors use the OpenAI error shape.
//! Nothing here trusts its input: every field is checked, nothing panics.
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use futures::StreamExt;
use serde_json::{Value, json};

/// The models this server knows.
pub const MODELS: &[&str] = &["defect-detector", "line-assistant", "forecast"];

/// `created` of every model (fixed, so answers are deterministic).
const MODELS_CREATED: u64 = 1_735_689_600;

/// Who owns the models in `/v1/models`.
const OWNER: &str = "sigil-demo";

/// The pause between streamed content chunks.
const CHUNK_PAUSE: Duration = Duration::from_millis(20);

/// Longest part of the user's message quoted back.
const MAX_ECHO_CHARS: usize = 120;

/// Default and largest embedding dimension.
const DEFAULT_DIMENSIONS: u64 = 16;
const MAX_DIMENSIONS: u64 = 4096;

/// Most inputs one embeddings request may carry.
const MAX_EMBEDDING_INPUTS: usize = 2048;

/// The identity header `sigil proxy` sets on forwarded requests.
const SPIFFE_HEADER: &str = "x-sigil-spiffe-id";

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Serves the demo model API on `listener` until the task is dropped or the listener fails.
pub async fn serve(listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    axum::serve(listener, router()).await?;
    Ok(())
}

/// The demo model API as an axum router.
pub fn router() -> Router {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .fallback(not_found)
}

/// An error in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`.
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            param,
            message: message.into(),
        }
    }

    fn unknown_model(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: Some("model"),
            message: format!("The model `{model}` does not exist or you do not have access to it."),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        });
        json_response(self.status, &body)
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        code: Some("unknown_url"),
        param: None,
        message: "Unknown request URL. This server serves /v1/models, /v1/chat/completions, \
                  /v1/completions and /v1/embeddings."
            .into(),
    }
}

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": MODELS_CREATED, "owned_by": OWNER})
}

async fn list_models() -> Response {
    let data: Vec<Value> = MODELS.iter().map(|m| model_object(m)).collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

async fn get_model(Path(id): Path<String>) -> Response {
    if MODELS.contains(&id.as_str()) {
        json_response(StatusCode::OK, &model_object(&id))
    } else {
        ApiError::unknown_model(&id).into_response()
    }
}

/// Parses a request body as a JSON object.
fn parse_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(ApiError::invalid(
            None,
            "The request body must be a JSON object.",
        )),
        Err(e) => Err(ApiError::invalid(
            None,
            format!("We could not parse the JSON body of your request: {e}"),
        )),
    }
}

/// The `model` field, which must name one of [`MODELS`].
fn model_of(req: &serde_json::Map<String, Value>) -> Result<String, ApiError> {
    match req.get("model") {
        Some(Value::String(m)) if MODELS.contains(&m.as_str()) => Ok(m.clone()),
        Some(Value::String(m)) => Err(ApiError::unknown_model(m)),
        Some(_) => Err(ApiError::invalid(
            Some("model"),
            "`model` must be a string.",
        )),
        None => Err(ApiError::invalid(
            Some("model"),
            "You must provide a model parameter.",
        )),
    }
}

fn stream_flag(req: &serde_json::Map<String, Value>) -> Result<bool, ApiError> {
    match req.get("stream") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::invalid(
            Some("stream"),
            "`stream` must be a boolean.",
        )),
    }
}

fn include_usage(req: &serde_json::Map<String, Value>) -> bool {
    req.get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// Who the proxy says is calling.
fn caller(headers: &HeaderMap) -> String {
    headers
        .get(SPIFFE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| "an unidentified caller".into())
}

/// The text of a message's `content`: a string, or an array of `{"type":"text","text":...}`.
fn content_text(content: Option<&Value>) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = Vec::new();
            for p in parts {
                match p {
                    Value::String(s) => out.push(s.as_str()),
                    Value::Object(o) => {
                        if let Some(Value::String(t)) = o.get("text") {
                            out.push(t.as_str());
                        }
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            Some("messages"),
                            "Each content part must be an object.",
                        ));
                    }
                }
            }
            Ok(out.join(" "))
        }
        Some(_) => Err(ApiError::invalid(
            Some("messages"),
            "`content` must be a string or an array of content parts.",
        )),
    }
}

/// Rough token count: whitespace-separated words, at least one per non-empty text.
fn tokens(s: &str) -> u64 {
    u64::try_from(s.split_whitespace().count()).unwrap_or(u64::MAX)
}

/// Quotes at most [`MAX_ECHO_CHARS`] of `s`, on one line.
fn quote(s: &str) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut q: String = one_line.chars().take(MAX_ECHO_CHARS).collect();
    if one_line.chars().count() > MAX_ECHO_CHARS {
        q.push_str("...");
    }
    q
}

/// The deterministic answer of `model` to `prompt`, for `who`.
pub fn answer(model: &str, prompt: &str, who: &str) -> String {
    let q = quote(prompt);
    let lead = match model {
        "defect-detector" => "Inspection result: no defects detected.",
        "forecast" => "Forecast: output steady at 98% of plan for the next shift.",
        _ => "Line assistant here.",
    };
    format!("{lead} You said: \"{q}\". Answered for {who} by {model}.")
}

/// Splits `text` into streamable pieces (words with their following space).
fn pieces(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        cur.push(c);
        if c == ' ' {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn next_id(prefix: &str) -> String {
    format!(
        "{prefix}-demo{:08}",
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt.saturating_add(completion),
    })
}

/// One event of an SSE response, already framed.
#[derive(Debug, Clone)]
enum Event {
    /// Sent at once.
    Now(String),
    /// Sent after [`CHUNK_PAUSE`].
    Paused(String),
}

fn sse_data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

/// An SSE response that sends each event as its own chunk, pausing before `Paused` ones.
fn sse_response(events: Vec<Event>) -> Response {
    let stream = futures::stream::iter(events).then(|e| async move {
        let text = match e {
            Event::Now(t) => t,
            Event::Paused(t) => {
                tokio::time::sleep(CHUNK_PAUSE).await;
                t
            }
        };
        Ok::<Bytes, Infallible>(Bytes::from(text))
    });
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn chat_completions(headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let req = parse_object(&body)?;
    let model = model_of(&req)?;
    let stream = stream_flag(&req)?;
    let messages = match req.get("messages") {
        Some(Value::Array(m)) => m,
        Some(_) => {
            return Err(ApiError::invalid(
                Some("messages"),
                "`messages` must be an array.",
            ));
        }
        None => {
            return Err(ApiError::invalid(
                Some("messages"),
                "Missing required parameter: 'messages'.",
            ));
        }
    };
    let mut prompt_tokens = 0u64;
    let mut last_user = String::new();
    for m in messages {
        let Some(obj) = m.as_object() else {
            return Err(ApiError::invalid(
                Some("messages"),
                "Each message must be an object.",
            ));
        };
        let role = match obj.get("role") {
            Some(Value::String(r)) => r.as_str(),
            _ => {
                return Err(ApiError::invalid(
                    Some("messages"),
                    "Each message must have a string `role`.",
                ));
            }
        };
        let text = content_text(obj.get("content"))?;
        prompt_tokens = prompt_tokens.saturating_add(tokens(&text).max(1));
        if role == "user" {
            last_user = text;
        }
    }
    let text = answer(&model, &last_user, &caller(&headers));
    let completion_tokens = tokens(&text);
    let id = next_id("chatcmpl");
    let created = now_secs();
    if !stream {
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_sigil_demo",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": null,
                "finish_reason": "stop",
            }],
            "usage": usage(prompt_tokens, completion_tokens),
        });
        return Ok(json_response(StatusCode::OK, &body));
    }
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_sigil_demo",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    };
    let mut events = vec![Event::Now(sse_data(&chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )))];
    for p in pieces(&text) {
        events.push(Event::Paused(sse_data(&chunk(
            json!({"content": p}),
            Value::Null,
        ))));
    }
    events.push(Event::Paused(sse_data(&chunk(json!({}), json!("stop")))));
    if include_usage(&req) {
        events.push(Event::Now(sse_data(&json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_sigil_demo",
            "choices": [],
            "usage": usage(prompt_tokens, completion_tokens),
        }))));
    }
    events.push(Event::Now("data: [DONE]\n\n".into()));
    Ok(sse_response(events))
}

/// The prompt of a legacy completion: a string or an array of strings (joined).
fn prompt_text(v: Option<&Value>) -> Result<String, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(a)) => {
            let mut out = Vec::new();
            for p in a {
                match p {
                    Value::String(s) => out.push(s.clone()),
                    Value::Number(n) => out.push(n.to_string()),
                    _ => {
                        return Err(ApiError::invalid(
                            Some("prompt"),
                            "`prompt` must be a string or an array of strings.",
                        ));
                    }
                }
            }
            Ok(out.join(" "))
        }
        Some(_) => Err(ApiError::invalid(
            Some("prompt"),
            "`prompt` must be a string or an array of strings.",
        )),
    }
}

async fn completions(headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let req = parse_object(&body)?;
    let model = model_of(&req)?;
    let stream = stream_flag(&req)?;
    let prompt = prompt_text(req.get("prompt"))?;
    let text = answer(&model, &prompt, &caller(&headers));
    let (prompt_tokens, completion_tokens) = (tokens(&prompt).max(1), tokens(&text));
    let id = next_id("cmpl");
    let created = now_secs();
    let body = |choices: Value| {
        json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_sigil_demo",
            "choices": choices,
        })
    };
    if !stream {
        let mut b = body(json!([{
            "text": text, "index": 0, "logprobs": null, "finish_reason": "stop",
        }]));
        if let Some(o) = b.as_object_mut() {
            o.insert("usage".into(), usage(prompt_tokens, completion_tokens));
        }
        return Ok(json_response(StatusCode::OK, &b));
    }
    let mut events = Vec::new();
    for (i, p) in pieces(&text).into_iter().enumerate() {
        let data = sse_data(&body(json!([{
            "text": p, "index": 0, "logprobs": null, "finish_reason": null,
        }])));
        events.push(if i == 0 {
            Event::Now(data)
        } else {
            Event::Paused(data)
        });
    }
    events.push(Event::Paused(sse_data(&body(json!([{
        "text": "", "index": 0, "logprobs": null, "finish_reason": "stop",
    }])))));
    if include_usage(&req) {
        let mut u = body(json!([]));
        if let Some(o) = u.as_object_mut() {
            o.insert("usage".into(), usage(prompt_tokens, completion_tokens));
        }
        events.push(Event::Now(sse_data(&u)));
    }
    events.push(Event::Now("data: [DONE]\n\n".into()));
    Ok(sse_response(events))
}

/// A deterministic unit vector of `dims` floats for `text` (FNV-1a seeded xorshift).
pub fn embedding(text: &str, dims: usize) -> Vec<f32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut state = h | 1;
    let mut v: Vec<f32> = (0..dims)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // The top 24 bits, mapped to [-1, 1).
            let top = u32::try_from(state >> 40).unwrap_or(0);
            (f64::from(top) / f64::from(1u32 << 23) - 1.0) as f32
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x /= norm;
        }
    }
    v
}

/// The inputs of an embeddings request: a string, an array of strings, or token arrays.
fn embedding_inputs(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::invalid(
            Some("input"),
            "`input` must be a string, an array of strings, or an array of token arrays.",
        )
    };
    let inputs = match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.is_empty() => return Err(bad()),
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => {
            vec![Value::Array(a.clone()).to_string()]
        }
        Some(Value::Array(a)) => {
            let mut out = Vec::new();
            for x in a {
                match x {
                    Value::String(s) => out.push(s.clone()),
                    Value::Array(t) if t.iter().all(Value::is_number) => out.push(x.to_string()),
                    _ => return Err(bad()),
                }
            }
            out
        }
        None => {
            return Err(ApiError::invalid(
                Some("input"),
                "Missing required parameter: 'input'.",
            ));
        }
        Some(_) => return Err(bad()),
    };
    if inputs.len() > MAX_EMBEDDING_INPUTS {
        return Err(ApiError::invalid(
            Some("input"),
            format!("At most {MAX_EMBEDDING_INPUTS} inputs per request."),
        ));
    }
    Ok(inputs)
}

async fn embeddings(body: Bytes) -> Result<Response, ApiError> {
    let req = parse_object(&body)?;
    let model = model_of(&req)?;
    let inputs = embedding_inputs(req.get("input"))?;
    let dims = match req.get("dimensions") {
        None | Some(Value::Null) => DEFAULT_DIMENSIONS,
        Some(v) => match v.as_u64() {
            Some(d) if (1..=MAX_DIMENSIONS).contains(&d) => d,
            _ => {
                return Err(ApiError::invalid(
                    Some("dimensions"),
                    format!("`dimensions` must be an integer from 1 to {MAX_DIMENSIONS}."),
                ));
            }
        },
    };
    let dims = usize::try_from(dims).unwrap_or(16);
    let base64 = match req.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(_) => {
            return Err(ApiError::invalid(
                Some("encoding_format"),
                "`encoding_format` must be \"float\" or \"base64\".",
            ));
        }
    };
    let mut prompt_tokens = 0u64;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            prompt_tokens = prompt_tokens.saturating_add(tokens(text).max(1));
            let v = embedding(text, dims);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let body = json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    });
    Ok(json_response(StatusCode::OK, &body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use std::net::SocketAddr;
    use std::time::Instant;

    type TestClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

    async fn start() -> (SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, tokio::spawn(serve(listener)))
    }

    fn client() -> TestClient {
        Client::builder(TokioExecutor::new()).build_http()
    }

    fn request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: &str,
    ) -> http::Request<Full<Bytes>> {
        http::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header("content-type", "application/json")
            .header(SPIFFE_HEADER, "spiffe://interop.test/floor/camera")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap()
    }

    async fn call(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
        let r = client()
            .request(request(addr, method, path, body))
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_eq!(r.headers()["content-type"], "application/json");
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn lists_and_shows_models() {
        let (addr, task) = start().await;
        let (code, v) = call(addr, "GET", "/v1/models", "").await;
        assert_eq!(code, 200);
        assert_eq!(v["object"], "list");
        let ids: Vec<&str> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, MODELS);
        assert!(
            v["data"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["object"] == "model" && m["owned_by"] == OWNER && m["created"].is_u64())
        );
        let (code, v) = call(addr, "GET", "/v1/models/forecast", "").await;
        assert_eq!((code, v["id"].as_str()), (200, Some("forecast")));
        let (code, v) = call(addr, "GET", "/v1/models/gpt-9", "").await;
        assert_eq!(code, 404);
        assert_eq!(v["error"]["code"], "model_not_found");
        let (code, v) = call(addr, "GET", "/nowhere", "").await;
        assert_eq!(code, 404);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        task.abort();
    }

    #[tokio::test]
    async fn chat_completion_echoes_message_and_caller() {
        let (addr, task) = start().await;
        let (code, v) = call(
            addr,
            "POST",
            "/v1/chat/completions",
            r#"{"model":"defect-detector","messages":[
                {"role":"system","content":"be brief"},
                {"role":"user","content":"first"},
                {"role":"assistant","content":"ok"},
                {"role":"user","content":[{"type":"text","text":"inspect frame 7"}]}]}"#,
        )
        .await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "defect-detector");
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(choice["message"]["role"], "assistant");
        let text = choice["message"]["content"].as_str().unwrap();
        assert_eq!(
            text,
            answer(
                "defect-detector",
                "inspect frame 7",
                "spiffe://interop.test/floor/camera"
            )
        );
        assert!(text.contains("inspect frame 7"), "{text}");
        assert!(
            text.contains("spiffe://interop.test/floor/camera"),
            "{text}"
        );
        let u = &v["usage"];
        assert_eq!(u["prompt_tokens"], 7);
        assert_eq!(
            u["total_tokens"].as_u64().unwrap(),
            u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
        );
        task.abort();
    }

    #[tokio::test]
    async fn chat_completion_streams_chunks_as_produced() {
        let (addr, task) = start().await;
        let started = Instant::now();
        let r = client()
            .request(request(
                addr,
                "POST",
                "/v1/chat/completions",
                r#"{"model":"line-assistant","stream":true,"stream_options":{"include_usage":true},
                    "messages":[{"role":"user","content":"status of line 3?"}]}"#,
            ))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let mut body = r.into_body();
        let mut frames = Vec::new();
        let mut first_at = None;
        while let Some(f) = body.frame().await {
            if let Ok(data) = f.unwrap().into_data() {
                first_at.get_or_insert_with(|| started.elapsed());
                frames.push(String::from_utf8(data.to_vec()).unwrap());
            }
        }
        let total = started.elapsed();
        let text = frames.concat();
        let events: Vec<&str> = text
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").unwrap())
            .collect();
        assert_eq!(events.last(), Some(&"[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk")
        );
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let content: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        let expected = answer(
            "line-assistant",
            "status of line 3?",
            "spiffe://interop.test/floor/camera",
        );
        assert_eq!(content, expected);
        let finish: Vec<&Value> = chunks
            .iter()
            .map(|c| &c["choices"][0]["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish, [&json!("stop")]);
        let last = &chunks[chunks.len() - 1];
        assert_eq!(last["choices"], json!([]));
        assert!(last["usage"]["total_tokens"].as_u64().unwrap() > 0);
        // Sent as produced: one frame per event, the first long before the last.
        let n_content = pieces(&expected).len();
        assert!(frames.len() >= n_content + 3, "{frames:?}");
        let first_at = first_at.unwrap();
        let min_total = CHUNK_PAUSE * u32::try_from(n_content).unwrap();
        assert!(total >= min_total, "{total:?} < {min_total:?}");
        assert!(
            first_at + min_total / 2 < total,
            "first chunk at {first_at:?}, all at {total:?}"
        );
        task.abort();
    }

    #[tokio::test]
    async fn completions_json_and_stream() {
        let (addr, task) = start().await;
        let (code, v) = call(
            addr,
            "POST",
            "/v1/completions",
            r#"{"model":"forecast","prompt":"next shift"}"#,
        )
        .await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["object"], "text_completion");
        let expected = answer(
            "forecast",
            "next shift",
            "spiffe://interop.test/floor/camera",
        );
        assert_eq!(v["choices"][0]["text"], expected.as_str());
        assert_eq!(v["usage"]["prompt_tokens"], 2);
        let r = client()
            .request(request(
                addr,
                "POST",
                "/v1/completions",
                r#"{"model":"forecast","prompt":["next","shift"],"stream":true}"#,
            ))
            .await
            .unwrap();
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let mut out = String::new();
        let mut done = false;
        for e in text.split("\n\n").filter(|e| !e.is_empty()) {
            let d = e.strip_prefix("data: ").unwrap();
            if d == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(d).unwrap();
            out.push_str(v["choices"][0]["text"].as_str().unwrap());
        }
        assert!(done);
        assert_eq!(out, expected);
        task.abort();
    }

    #[tokio::test]
    async fn embeddings_are_deterministic_floats_or_base64() {
        let (addr, task) = start().await;
        let (code, v) = call(
            addr,
            "POST",
            "/v1/embeddings",
            r#"{"model":"line-assistant","input":["bolt","nut"]}"#,
        )
        .await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["object"], "list");
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), 2);
        let first: Vec<f32> = serde_json::from_value(data[0]["embedding"].clone()).unwrap();
        assert_eq!(first.len(), DEFAULT_DIMENSIONS as usize);
        assert_eq!(first, embedding("bolt", 16));
        let norm: f32 = first.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        assert_ne!(first, embedding("nut", 16));
        assert_eq!(data[1]["index"], 1);
        let (_, v) = call(
            addr,
            "POST",
            "/v1/embeddings",
            r#"{"model":"line-assistant","input":"bolt","encoding_format":"base64","dimensions":4}"#,
        )
        .await;
        let b64 = v["data"][0]["embedding"].as_str().unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let floats: Vec<f32> = raw
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(floats, embedding("bolt", 4));
        for bad in [
            r#"{"model":"line-assistant","input":[]}"#,
            r#"{"model":"line-assistant"}"#,
            r#"{"model":"line-assistant","input":"x","dimensions":0}"#,
            r#"{"model":"line-assistant","input":"x","encoding_format":"hex"}"#,
        ] {
            let (code, v) = call(addr, "POST", "/v1/embeddings", bad).await;
            assert_eq!(code, 400, "{bad}: {v}");
        }
        task.abort();
    }

    #[tokio::test]
    async fn errors_use_the_openai_shape() {
        let (addr, task) = start().await;
        for path in ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"] {
            let (code, v) = call(addr, "POST", path, r#"{"model":"gpt-9","messages":[]}"#).await;
            assert_eq!(code, 404, "{path}: {v}");
            assert_eq!(v["error"]["code"], "model_not_found");
            assert_eq!(v["error"]["param"], "model");
            assert!(v["error"]["message"].as_str().unwrap().contains("gpt-9"));
            let (code, v) = call(addr, "POST", path, "{not json").await;
            assert_eq!(code, 400, "{path}");
            assert_eq!(v["error"]["type"], "invalid_request_error");
            assert!(v["error"]["message"].is_string());
            let (code, _) = call(addr, "POST", path, "[1,2]").await;
            assert_eq!(code, 400);
        }
        for bad in [
            r#"{"messages":[]}"#,
            r#"{"model":7,"messages":[]}"#,
            r#"{"model":"forecast"}"#,
            r#"{"model":"forecast","messages":{}}"#,
            r#"{"model":"forecast","messages":[5]}"#,
            r#"{"model":"forecast","messages":[{"content":"x"}]}"#,
            r#"{"model":"forecast","messages":[{"role":"user","content":7}]}"#,
            r#"{"model":"forecast","messages":[],"stream":"yes"}"#,
        ] {
            let (code, v) = call(addr, "POST", "/v1/chat/completions", bad).await;
            assert_eq!(code, 400, "{bad}: {v}");
            assert_eq!(v["error"]["type"], "invalid_request_error");
        }
        // No caller header: still answers, and says so.
        let r = client()
            .request(
                http::Request::builder()
                    .method("POST")
                    .uri(format!("http://{addr}/v1/chat/completions"))
                    .body(Full::new(Bytes::from_static(
                        br#"{"model":"forecast","messages":[{"role":"user","content":"hi"}]}"#,
                    )))
                    .unwrap(),
            )
            .await
            .unwrap();
        let v: Value =
            serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert!(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .contains("an unidentified caller")
        );
        task.abort();
    }

    #[test]
    fn pieces_rejoin_to_the_text() {
        let t = "a bc  déf ";
        assert_eq!(pieces(t).concat(), t);
        assert_eq!(pieces(""), Vec::<String>::new());
        assert_eq!(quote(&"x".repeat(500)).chars().count(), MAX_ECHO_CHARS + 3);
    }
}
