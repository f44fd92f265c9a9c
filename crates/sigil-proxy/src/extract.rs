//! What is being called, read one way: the models an inference request names (its `model`
//! and every other field that can choose one, e.g. LiteLLM's `fallbacks`), each element of
//! an MCP JSON-RPC message or batch (tools, resources, prompts, completions), or else the
//! HTTP method and path. The route table says which paths are model calls (the inference
//! routes of OpenAI, llama.cpp, Ollama, vLLM and Anthropic-style servers by default); a body
//! that names a model is a model call whatever its path. The body has already been bounded.
use std::collections::HashSet;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::json::{self, JsonError, fold};
use crate::path::RequestPath;

/// Longest model, tool, prompt name or resource URI accepted.
const MAX_NAME: usize = 2048;
/// How deep a model-choosing field may nest (`fallbacks: [{"a": ["b"]}]` is 3).
const MAX_MODEL_DEPTH: usize = 8;

/// The inference routes of the common model servers (lower case, no trailing slash).
pub const DEFAULT_MODEL_ROUTES: &[&str] = &[
    // OpenAI and OpenAI-compatible servers (vLLM, llama.cpp, LiteLLM, LocalAI, ...).
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/audio/speech",
    // Anthropic-style.
    "/v1/messages",
    "/v1/messages/count_tokens",
    // llama.cpp's own routes and its unversioned aliases.
    "/completion",
    "/completions",
    "/chat/completions",
    "/embedding",
    "/embeddings",
    "/infill",
    "/rerank",
    "/reranking",
    "/v1/rerank",
    "/v1/reranking",
    // vLLM's pooling and scoring routes.
    "/pooling",
    "/classify",
    "/score",
    "/v1/score",
    "/v2/rerank",
    // Ollama.
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
];

/// The fields of a request body that can choose a model: `model` everywhere, LiteLLM's
/// `fallbacks` and `context_window_fallbacks`, OpenRouter-style `models`.
pub const DEFAULT_MODEL_FIELDS: &[&str] =
    &["model", "fallbacks", "context_window_fallbacks", "models"];

/// Model list routes whose answers are filtered to what the caller may invoke.
const MODEL_LIST_ROUTES: &[&str] = &["/v1/models", "/models", "/api/tags"];

/// How requests are classified: from the configuration, checked once.
#[derive(Debug, Clone)]
pub struct Routes {
    /// Model routes by route key.
    model: HashSet<String>,
    /// Folded names of the fields that choose a model.
    model_fields: Vec<String>,
    /// The model a model route's body may leave out (llama.cpp serves one model).
    default_model: Option<String>,
    /// The MCP endpoint's route key.
    mcp: String,
}

/// Why the route settings were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RoutesError {
    #[error("model route {0:?}: {1}")]
    ModelRoute(String, String),
    #[error("mcp_path {0:?}: {1}")]
    McpPath(String, String),
    #[error("mcp_path {0:?} is also a model route")]
    McpIsModelRoute(String),
    #[error("model_fields must name at least one non-empty field")]
    ModelFields,
    #[error("default_model {0:?} is not a valid name")]
    DefaultModel(String),
}

impl RoutesError {
    /// The configuration key at fault.
    pub fn key(&self) -> &'static str {
        match self {
            RoutesError::ModelRoute(..) => "model_routes",
            RoutesError::McpPath(..) | RoutesError::McpIsModelRoute(_) => "mcp_path",
            RoutesError::ModelFields => "model_fields",
            RoutesError::DefaultModel(_) => "default_model",
        }
    }
}

impl Routes {
    /// `extra_model_routes` are added to the defaults; `model_fields` replace them.
    pub fn new(
        extra_model_routes: &[String],
        model_fields: Option<&[String]>,
        default_model: Option<String>,
        mcp_path: &str,
    ) -> Result<Self, RoutesError> {
        let mut model: HashSet<String> = DEFAULT_MODEL_ROUTES
            .iter()
            .map(|r| (*r).to_owned())
            .collect();
        for r in extra_model_routes {
            let p = RequestPath::parse(r)
                .map_err(|e| RoutesError::ModelRoute(r.clone(), e.to_string()))?;
            model.insert(p.route().to_owned());
        }
        let mcp = RequestPath::parse(mcp_path)
            .map_err(|e| RoutesError::McpPath(mcp_path.to_owned(), e.to_string()))?
            .route()
            .to_owned();
        if model.contains(&mcp) {
            return Err(RoutesError::McpIsModelRoute(mcp_path.to_owned()));
        }
        let model_fields: Vec<String> = match model_fields {
            Some(f) => f.iter().map(|f| fold(f).into_owned()).collect(),
            None => DEFAULT_MODEL_FIELDS
                .iter()
                .map(|f| fold(f).into_owned())
                .collect(),
        };
        if model_fields.is_empty() || model_fields.iter().any(String::is_empty) {
            return Err(RoutesError::ModelFields);
        }
        if let Some(m) = &default_model {
            check_name(m).map_err(|_| RoutesError::DefaultModel(m.clone()))?;
        }
        Ok(Self {
            model,
            model_fields,
            default_model,
            mcp,
        })
    }

    /// Whether a body's `key` is a field that chooses a model (compared folded: the JSON
    /// reader refuses two keys of one object that fold alike).
    fn chooses_model(&self, key: &str) -> bool {
        let key = fold(key);
        self.model_fields.iter().any(|f| *f == *key)
    }

    /// Whether `path` is the MCP endpoint.
    pub fn is_mcp(&self, path: &RequestPath) -> bool {
        path.route() == self.mcp
    }

    /// Whether `path` is a model list (`GET`), whose answer is filtered.
    pub fn is_model_list(method: &str, path: &RequestPath) -> bool {
        method == "GET" && MODEL_LIST_ROUTES.contains(&path.route())
    }
}

/// One thing a request asks to do, as policy will see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Call {
    /// `invoke`, `list_models`, `call_tool`, `list_tools`, `read_resource`, `get_prompt`,
    /// `complete`, `mcp`, or `http`.
    pub action: &'static str,
    /// `Model`, `Tool`, `Resource`, `Prompt` or `Endpoint`.
    pub resource_type: &'static str,
    pub resource_id: String,
    /// MCP tool or prompt arguments, for policy on argument values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Value>,
}

/// Why a request cannot be understood (and so cannot be authorized).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ExtractError {
    #[error(transparent)]
    Json(#[from] JsonError),
    #[error("{0}")]
    Invalid(&'static str),
}

/// The request as extraction reads it.
pub struct Target<'a> {
    pub method: &'a str,
    pub path: &'a RequestPath,
    /// Whether the request declares a JSON body (`application/json`, `*+json`).
    pub json_declared: bool,
}

/// Extracts the calls of one HTTP request.
pub fn extract(routes: &Routes, t: &Target<'_>, body: &[u8]) -> Result<Vec<Call>, ExtractError> {
    let mcp = t.method == "POST" && routes.is_mcp(t.path);
    // An MCP message is read whole (its arguments go to policy); any other body only for
    // the fields that choose a model.
    let parsed = if mcp {
        read_body(t.json_declared, body, None)?
    } else {
        read_body(t.json_declared, body, Some(&|k| routes.chooses_model(k)))?
    };
    if mcp {
        let v = parsed.ok_or(ExtractError::Invalid("MCP request body must be JSON"))?;
        return match v {
            Value::Array(batch) if batch.is_empty() => {
                Err(ExtractError::Invalid("empty JSON-RPC batch"))
            }
            Value::Array(batch) => batch.iter().map(|m| mcp_call(m, t.path)).collect(),
            single => Ok(vec![mcp_call(&single, t.path)?]),
        };
    }
    if t.method == "POST" && routes.model.contains(t.path.route()) {
        let Some(Value::Object(obj)) = parsed else {
            return Err(ExtractError::Invalid(
                "a model call's body must be a JSON object",
            ));
        };
        let mut models = models_named(routes, &obj)?;
        if models.is_empty() {
            match &routes.default_model {
                Some(m) => models.push(m.clone()),
                None => {
                    return Err(ExtractError::Invalid(
                        "\"model\" must be a non-empty string",
                    ));
                }
            }
        }
        return Ok(models.into_iter().map(invoke).collect());
    }
    if Routes::is_model_list(t.method, t.path) {
        return Ok(vec![endpoint("list_models", t.path.route())]);
    }
    // Any other route: a body that names a model is a model call too.
    let mut calls = vec![endpoint("http", &format!("{} {}", t.method, t.path.raw()))];
    match &parsed {
        Some(Value::Object(obj)) => {
            calls.extend(models_named(routes, obj)?.into_iter().map(invoke))
        }
        Some(Value::Array(items)) => {
            for item in items {
                if let Value::Object(obj) = item {
                    calls.extend(models_named(routes, obj)?.into_iter().map(invoke));
                }
            }
        }
        _ => {}
    }
    Ok(calls)
}

/// The body as JSON when it is JSON (declared so, or looking like it), strictly read;
/// `None` for an empty or non-JSON body. A body that looks like JSON but is not strict JSON
/// is refused: a lenient upstream parser (NaN, a BOM, comments) could read a model in it.
///
/// With `pick`, only the top level's keys it accepts are built ([`json::parse_picking`]).
fn read_body(
    json_declared: bool,
    body: &[u8],
    pick: Option<&dyn Fn(&str) -> bool>,
) -> Result<Option<Value>, JsonError> {
    let first = body
        .strip_prefix(b"\xef\xbb\xbf")
        .unwrap_or(body)
        .iter()
        .find(|b| !b.is_ascii_whitespace());
    let looks_json = matches!(first, Some(b'{' | b'['));
    if body.is_empty() || !(json_declared || looks_json) {
        return Ok(None);
    }
    match pick {
        Some(keep) => json::parse_picking(body, keep).map(Some),
        None => json::parse(body).map(Some),
    }
}

fn invoke(model: String) -> Call {
    Call {
        action: "invoke",
        resource_type: "Model",
        resource_id: model,
        arguments: None,
    }
}

fn endpoint(action: &'static str, id: &str) -> Call {
    Call {
        action,
        resource_type: "Endpoint",
        resource_id: id.to_owned(),
        arguments: None,
    }
}

/// A name the proxy decides on: non-empty, bounded, no control characters.
fn check_name(s: &str) -> Result<(), ()> {
    if s.is_empty() || s.len() > MAX_NAME || s.chars().any(char::is_control) {
        Err(())
    } else {
        Ok(())
    }
}

fn name(v: Option<&Value>, what: &'static str) -> Result<String, ExtractError> {
    match v.and_then(Value::as_str) {
        Some(s) if check_name(s).is_ok() => Ok(s.to_owned()),
        _ => Err(ExtractError::Invalid(what)),
    }
}

/// Every model the top level of `obj` names, through any configured field (keys compared
/// folded: the JSON reader already refused two keys that fold alike), each once.
fn models_named(routes: &Routes, obj: &Map<String, Value>) -> Result<Vec<String>, ExtractError> {
    let mut out: Vec<String> = Vec::new();
    for (key, v) in obj {
        if routes.chooses_model(key) {
            collect_models(v, 0, &mut out)?;
        }
    }
    Ok(out)
}

/// A model-choosing value: a name; a list of them; `{"model": name, ...}` (a LiteLLM
/// fallback with overrides); or a map whose keys and values are names (`{"a": ["b"]}`).
/// Anything else is refused: an upstream might read a model there that the proxy did not.
fn collect_models(v: &Value, depth: usize, out: &mut Vec<String>) -> Result<(), ExtractError> {
    const BAD: ExtractError =
        ExtractError::Invalid("a field that chooses a model must name models as strings");
    if depth > MAX_MODEL_DEPTH {
        return Err(BAD);
    }
    match v {
        Value::String(_) => {
            let m = name(Some(v), "a model name must be a non-empty string")?;
            if !out.contains(&m) {
                out.push(m);
            }
        }
        Value::Null if depth > 0 => return Err(BAD),
        Value::Null => {}
        Value::Array(items) => {
            for i in items {
                collect_models(i, depth + 1, out)?;
            }
        }
        Value::Object(o) => {
            let named = o.iter().find(|(k, _)| fold(k) == "model");
            match named {
                Some((_, m)) => collect_models(m, depth + 1, out)?,
                None => {
                    for (k, v) in o {
                        collect_models(&Value::String(k.clone()), depth + 1, out)?;
                        collect_models(v, depth + 1, out)?;
                    }
                }
            }
        }
        _ => return Err(BAD),
    }
    Ok(())
}

/// A JSON-RPC id the proxy can compare as a value: a string or an integer.
fn check_id(obj: &Map<String, Value>) -> Result<(), ExtractError> {
    match obj.get("id") {
        None | Some(Value::String(_)) => Ok(()),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(()),
        Some(_) => Err(ExtractError::Invalid(
            "JSON-RPC id must be a string or an integer",
        )),
    }
}

fn mcp_call(m: &Value, path: &RequestPath) -> Result<Call, ExtractError> {
    let obj = m
        .as_object()
        .ok_or(ExtractError::Invalid("JSON-RPC message must be an object"))?;
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(ExtractError::Invalid(
            "JSON-RPC message must have \"jsonrpc\": \"2.0\"",
        ));
    }
    check_id(obj)?;
    // Responses and notifications without a method (e.g. client replies) carry no call.
    let Some(method) = obj.get("method") else {
        return Ok(endpoint("mcp", &format!("{} response", path.raw())));
    };
    let method = method
        .as_str()
        .ok_or(ExtractError::Invalid("\"method\" must be a string"))?;
    let params = obj.get("params");
    let param = |k: &str| params.and_then(|p| p.get(k));
    let call = |action, resource_type, resource_id, arguments| Call {
        action,
        resource_type,
        resource_id,
        arguments,
    };
    match method {
        "tools/call" => Ok(call(
            "call_tool",
            "Tool",
            name(param("name"), "tools/call needs params.name")?,
            Some(param("arguments").cloned().unwrap_or(Value::Null)),
        )),
        "tools/list" => Ok(endpoint("list_tools", path.raw())),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => Ok(call(
            "read_resource",
            "Resource",
            resource_uri(param("uri"))?,
            None,
        )),
        "prompts/get" => Ok(call(
            "get_prompt",
            "Prompt",
            name(param("name"), "prompts/get needs params.name")?,
            Some(param("arguments").cloned().unwrap_or(Value::Null)),
        )),
        "completion/complete" => {
            let r = param("ref");
            let argument = Some(param("argument").cloned().unwrap_or(Value::Null));
            match r.and_then(|r| r.get("type")).and_then(Value::as_str) {
                Some("ref/prompt") => Ok(call(
                    "complete",
                    "Prompt",
                    name(
                        r.and_then(|r| r.get("name")),
                        "completion/complete needs params.ref.name",
                    )?,
                    argument,
                )),
                Some("ref/resource") => Ok(call(
                    "complete",
                    "Resource",
                    resource_uri(r.and_then(|r| r.get("uri")))?,
                    argument,
                )),
                _ => Err(ExtractError::Invalid(
                    "completion/complete needs params.ref of type ref/prompt or ref/resource",
                )),
            }
        }
        other => Ok(endpoint("mcp", other)),
    }
}

/// A resource URI read one way: a lower-case scheme, and a hierarchical path with no
/// empty or dot segments and no needless escapes (`file:///etc/./shadow`,
/// `file:////etc/shadow` and `file:///%65tc/shadow` are refused, so a policy on
/// `file:///etc/shadow` cannot be spelled around).
fn resource_uri(v: Option<&Value>) -> Result<String, ExtractError> {
    const BAD: ExtractError = ExtractError::Invalid(
        "resource URI must be a canonical URI (lower-case scheme, no empty or dot segments, no needless escapes)",
    );
    let uri = name(v, "resource request needs params.uri")?;
    let (scheme, rest) = uri.split_once(':').ok_or(BAD)?;
    let mut sc = scheme.bytes();
    if !sc.next().is_some_and(|b| b.is_ascii_lowercase())
        || !sc.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
    {
        return Err(BAD);
    }
    if rest.contains('\\') || rest.contains(char::is_whitespace) {
        return Err(BAD);
    }
    let body = rest.split(['?', '#']).next().unwrap_or("");
    if let Some(hier) = body.strip_prefix("//") {
        let path = hier.find('/').map_or("", |i| hier.get(i..).unwrap_or(""));
        if !path.is_empty() {
            crate::path::check(path).map_err(|_| BAD)?;
        }
    } else if body.starts_with('/') {
        crate::path::check(body).map_err(|_| BAD)?;
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn routes() -> Routes {
        Routes::new(&[], None, None, "/mcp").unwrap()
    }

    fn ex(method: &str, path: &str, body: &[u8]) -> Result<Vec<Call>, ExtractError> {
        let p = RequestPath::parse(path).unwrap();
        extract(
            &routes(),
            &Target {
                method,
                path: &p,
                json_declared: false,
            },
            body,
        )
    }

    fn ids(calls: &[Call]) -> Vec<(&str, &str)> {
        calls
            .iter()
            .map(|c| (c.action, c.resource_id.as_str()))
            .collect()
    }

    #[test]
    fn openai_model_calls() {
        let c = ex(
            "POST",
            "/v1/chat/completions",
            br#"{"model":"defect-detector","messages":[]}"#,
        )
        .unwrap();
        assert_eq!(c, vec![invoke("defect-detector".into())]);
        for bad in [
            &b"{}"[..],
            br#"{"model":""}"#,
            br#"{"model":42}"#,
            br#"{"model":"a\nb"}"#,
            b"not json",
            b"[]",
        ] {
            assert!(
                ex("POST", "/v1/embeddings", bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_NAME + 1));
        assert!(ex("POST", "/v1/completions", long.as_bytes()).is_err());
        assert_eq!(
            ex("GET", "/v1/models", b"").unwrap()[0].action,
            "list_models"
        );
        assert_eq!(
            ex("GET", "/v1/models/", b"").unwrap()[0].action,
            "list_models"
        );
        assert_eq!(
            ex("DELETE", "/v1/files/x", b"").unwrap()[0].resource_id,
            "DELETE /v1/files/x"
        );
    }

    #[test]
    fn every_inference_route_and_spelling_is_a_model_call() {
        let body = br#"{"model":"forbidden","prompt":"x"}"#;
        for path in [
            "/v1/chat/completions/",
            "/V1/CHAT/COMPLETIONS",
            "/completion",
            "/chat/completions",
            "/embedding",
            "/api/chat",
            "/api/generate",
            "/api/embed",
            "/v1/messages",
            "/v1/score",
        ] {
            assert_eq!(
                ids(&ex("POST", path, body).unwrap()),
                [("invoke", "forbidden")],
                "{path}"
            );
        }
        // Elsewhere a body naming a model is a model call as well as an endpoint call.
        assert_eq!(
            ids(&ex("POST", "/health", body).unwrap()),
            [("http", "POST /health"), ("invoke", "forbidden")]
        );
        // A body that looks like JSON but is not strict JSON is refused everywhere.
        assert!(ex("POST", "/health", br#"{"model":"a","x":NaN}"#).is_err());
        assert!(ex("POST", "/health", b"\xef\xbb\xbf{\"model\":\"a\"}").is_err());
        assert!(ex("POST", "/health", br#"{"model":"a","Model":"b"}"#).is_err());
        // Not JSON, not declared JSON: an endpoint call.
        assert_eq!(
            ids(&ex("POST", "/upload", b"raw bytes").unwrap()),
            [("http", "POST /upload")]
        );
    }

    #[test]
    fn every_field_that_chooses_a_model_is_a_call() {
        let c = ex(
            "POST",
            "/v1/chat/completions",
            br#"{"model":"a","fallbacks":["b",{"model":"c","messages":[]}],
                 "context_window_fallbacks":[{"d":["e"]}],"models":["f","a"]}"#,
        )
        .unwrap();
        assert_eq!(
            ids(&c),
            [
                ("invoke", "a"),
                ("invoke", "b"),
                ("invoke", "c"),
                ("invoke", "d"),
                ("invoke", "e"),
                ("invoke", "f")
            ]
        );
        // Keys are matched folded (Go reads "Fallbacks" as fallbacks).
        let c = ex(
            "POST",
            "/v1/completions",
            br#"{"model":"a","Fallbacks":["b"]}"#,
        )
        .unwrap();
        assert_eq!(ids(&c), [("invoke", "a"), ("invoke", "b")]);
        for bad in [
            &br#"{"model":"a","fallbacks":[1]}"#[..],
            br#"{"model":"a","fallbacks":[null]}"#,
            br#"{"model":"a","models":[true]}"#,
            br#"{"model":"a","fallbacks":[[[[[[[[[["x"]]]]]]]]]]}"#,
        ] {
            assert!(
                ex("POST", "/v1/completions", bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // Configured fields replace the defaults; a default model fills a model route.
        let r = Routes::new(
            &["/generate".into()],
            Some(&["model".into(), "draft_model".into()]),
            Some("smol".into()),
            "/mcp",
        )
        .unwrap();
        let p = RequestPath::parse("/generate").unwrap();
        let t = Target {
            method: "POST",
            path: &p,
            json_declared: true,
        };
        assert_eq!(
            ids(&extract(&r, &t, br#"{"prompt":"x","draft_model":"d"}"#).unwrap()),
            [("invoke", "d")]
        );
        assert_eq!(
            ids(&extract(&r, &t, br#"{"prompt":"x"}"#).unwrap()),
            [("invoke", "smol")]
        );
        assert!(Routes::new(&[], None, None, "/v1/chat/completions").is_err());
        assert!(Routes::new(&["//x".into()], None, None, "/mcp").is_err());
    }

    #[test]
    fn mcp_calls_and_batches() {
        let one = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_sensor","arguments":{"line":3}}}"#;
        let c = ex("POST", "/mcp", one).unwrap();
        assert_eq!(c[0].action, "call_tool");
        assert_eq!(c[0].resource_id, "read_sensor");
        assert_eq!(c[0].arguments, Some(json!({"line": 3})));
        // A batch: every element is a call; a forbidden tool cannot hide in it.
        let batch = br#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},
                         {"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"shutdown_line"}}]"#;
        let c = ex("POST", "/mcp/", batch).unwrap();
        assert_eq!(
            ids(&c),
            [("list_tools", "/mcp/"), ("call_tool", "shutdown_line")]
        );
        for bad in [
            &b"[]"[..],
            br#"{"jsonrpc":"1.0","method":"tools/call"}"#,
            br#"{"jsonrpc":"2.0","method":"tools/call","params":{}}"#,
            br#"[{"jsonrpc":"2.0","method":"tools/call","params":{"name":"ok"}}, 5]"#,
            b"{",
            // Ids that are neither strings nor integers.
            br#"{"jsonrpc":"2.0","id":1.0,"method":"tools/list"}"#,
            br#"{"jsonrpc":"2.0","id":1e0,"method":"tools/list"}"#,
            br#"{"jsonrpc":"2.0","id":-0.0,"method":"tools/list"}"#,
            br#"{"jsonrpc":"2.0","id":null,"method":"tools/list"}"#,
            br#"{"jsonrpc":"2.0","id":[1],"method":"tools/list"}"#,
            // Colliding keys.
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","Name":"b"}}"#,
        ] {
            assert!(
                ex("POST", "/mcp", bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(
            ex(
                "POST",
                "/mcp",
                br#"{"jsonrpc":"2.0","id":"x","method":"ping"}"#
            )
            .is_ok()
        );
    }

    #[test]
    fn mcp_resources_prompts_and_completions_name_their_targets() {
        let msg = |method: &str, params: Value| {
            json!({"jsonrpc":"2.0","id":1,"method":method,"params":params}).to_string()
        };
        let one = |m: String| ex("POST", "/mcp", m.as_bytes()).map(|c| c[0].clone());
        let c = one(msg("resources/read", json!({"uri":"file:///etc/shadow"}))).unwrap();
        assert_eq!(
            (c.action, c.resource_type, c.resource_id.as_str()),
            ("read_resource", "Resource", "file:///etc/shadow")
        );
        let c = one(msg("resources/subscribe", json!({"uri":"sensor://line/3"}))).unwrap();
        assert_eq!(c.action, "read_resource");
        let c = one(msg(
            "prompts/get",
            json!({"name":"summarize","arguments":{"style":"short"}}),
        ))
        .unwrap();
        assert_eq!(
            (c.action, c.resource_type, c.resource_id.as_str()),
            ("get_prompt", "Prompt", "summarize")
        );
        assert_eq!(c.arguments, Some(json!({"style":"short"})));
        let c = one(msg(
            "completion/complete",
            json!({"ref":{"type":"ref/resource","uri":"file:///data/{name}"},"argument":{"name":"name","value":"a"}}),
        ))
        .unwrap();
        assert_eq!((c.action, c.resource_type), ("complete", "Resource"));
        for bad_uri in [
            "file:////etc/shadow",
            "file:///etc/./shadow",
            "file:///data/../etc/shadow",
            "file:///%65tc/shadow",
            "FILE:///etc/shadow",
            "file:///etc\\shadow",
            "no-scheme",
            "",
        ] {
            assert!(
                one(msg("resources/read", json!({"uri": bad_uri}))).is_err(),
                "{bad_uri}"
            );
        }
        assert!(one(msg("resources/read", json!({}))).is_err());
        assert!(one(msg("prompts/get", json!({}))).is_err());
        assert!(one(msg("completion/complete", json!({"ref":{"type":"ref/x"}}))).is_err());
    }
}
