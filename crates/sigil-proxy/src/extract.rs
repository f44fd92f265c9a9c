//! What is being called: the model of an OpenAI-style request, the tool of an MCP
//! `tools/call` (every element of a JSON-RPC batch), or else the HTTP method and path. The
//! body has already been bounded by the caller; nothing here allocates beyond it.
use serde::Serialize;
use serde_json::Value;

/// The OpenAI endpoints whose body names the model being invoked.
const MODEL_PATHS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
];

/// Longest model or tool name accepted.
const MAX_NAME: usize = 256;

/// One thing a request asks to do, as policy will see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Call {
    /// `invoke`, `list_models`, `call_tool`, `list_tools`, `mcp`, or `http`.
    pub action: &'static str,
    /// `Model`, `Tool` or `Endpoint`.
    pub resource_type: &'static str,
    pub resource_id: String,
    /// MCP tool arguments, for policy on argument values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Value>,
}

/// Why a request cannot be understood (and so cannot be authorized).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ExtractError {
    #[error("request body is not valid JSON: {0}")]
    BadJson(String),
    #[error("{0}")]
    Invalid(&'static str),
}

fn name(v: Option<&Value>, what: &'static str) -> Result<String, ExtractError> {
    match v.and_then(Value::as_str) {
        Some(s) if !s.is_empty() && s.len() <= MAX_NAME => Ok(s.to_owned()),
        _ => Err(ExtractError::Invalid(what)),
    }
}

/// Extracts the calls of one HTTP request. `mcp_path` is where the MCP server is mounted.
pub fn extract(
    method: &str,
    path: &str,
    mcp_path: &str,
    body: &[u8],
) -> Result<Vec<Call>, ExtractError> {
    if method == "POST" && MODEL_PATHS.contains(&path) {
        let v: Value =
            serde_json::from_slice(body).map_err(|e| ExtractError::BadJson(e.to_string()))?;
        let model = name(v.get("model"), "\"model\" must be a non-empty string")?;
        return Ok(vec![Call {
            action: "invoke",
            resource_type: "Model",
            resource_id: model,
            arguments: None,
        }]);
    }
    if method == "GET" && path == "/v1/models" {
        return Ok(vec![endpoint("list_models", path)]);
    }
    if method == "POST" && path == mcp_path {
        let v: Value =
            serde_json::from_slice(body).map_err(|e| ExtractError::BadJson(e.to_string()))?;
        return match v {
            Value::Array(batch) if batch.is_empty() => {
                Err(ExtractError::Invalid("empty JSON-RPC batch"))
            }
            Value::Array(batch) => batch.iter().map(|m| mcp_call(m, path)).collect(),
            single => Ok(vec![mcp_call(&single, path)?]),
        };
    }
    Ok(vec![endpoint("http", &format!("{method} {path}"))])
}

fn endpoint(action: &'static str, id: &str) -> Call {
    Call {
        action,
        resource_type: "Endpoint",
        resource_id: id.to_owned(),
        arguments: None,
    }
}

fn mcp_call(m: &Value, path: &str) -> Result<Call, ExtractError> {
    let obj = m
        .as_object()
        .ok_or(ExtractError::Invalid("JSON-RPC message must be an object"))?;
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(ExtractError::Invalid(
            "JSON-RPC message must have \"jsonrpc\": \"2.0\"",
        ));
    }
    // Responses and notifications without a method (e.g. client replies) carry no call.
    let Some(method) = obj.get("method") else {
        return Ok(endpoint("mcp", &format!("{path} response")));
    };
    let method = method
        .as_str()
        .ok_or(ExtractError::Invalid("\"method\" must be a string"))?;
    match method {
        "tools/call" => {
            let params = obj.get("params");
            let tool = name(
                params.and_then(|p| p.get("name")),
                "tools/call needs params.name",
            )?;
            Ok(Call {
                action: "call_tool",
                resource_type: "Tool",
                resource_id: tool,
                arguments: Some(
                    params
                        .and_then(|p| p.get("arguments"))
                        .cloned()
                        .unwrap_or(Value::Null),
                ),
            })
        }
        "tools/list" => Ok(endpoint("list_tools", path)),
        other => Ok(endpoint("mcp", other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_model_calls() {
        let c = extract(
            "POST",
            "/v1/chat/completions",
            "/mcp",
            br#"{"model":"defect-detector","messages":[]}"#,
        )
        .unwrap();
        assert_eq!(
            c,
            vec![Call {
                action: "invoke",
                resource_type: "Model",
                resource_id: "defect-detector".into(),
                arguments: None
            }]
        );
        for bad in [
            &b"{}"[..],
            br#"{"model":""}"#,
            br#"{"model":42}"#,
            b"not json",
            b"[]",
        ] {
            assert!(
                extract("POST", "/v1/embeddings", "/mcp", bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let long = format!(r#"{{"model":"{}"}}"#, "m".repeat(MAX_NAME + 1));
        assert!(extract("POST", "/v1/completions", "/mcp", long.as_bytes()).is_err());
        assert_eq!(
            extract("GET", "/v1/models", "/mcp", b"").unwrap()[0].action,
            "list_models"
        );
        assert_eq!(
            extract("DELETE", "/v1/files/x", "/mcp", b"").unwrap()[0].resource_id,
            "DELETE /v1/files/x"
        );
    }

    #[test]
    fn mcp_calls_and_batches() {
        let one = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_sensor","arguments":{"line":3}}}"#;
        let c = extract("POST", "/mcp", "/mcp", one).unwrap();
        assert_eq!(c[0].action, "call_tool");
        assert_eq!(c[0].resource_id, "read_sensor");
        assert_eq!(c[0].arguments, Some(serde_json::json!({"line": 3})));
        // A batch: every element is a call; a forbidden tool cannot hide in it.
        let batch = br#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},
                         {"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"shutdown_line"}}]"#;
        let c = extract("POST", "/mcp", "/mcp", batch).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[1].action, c[1].resource_id.as_str()),
            ("call_tool", "shutdown_line")
        );
        for bad in [
            &b"[]"[..],
            br#"{"jsonrpc":"1.0","method":"tools/call"}"#,
            br#"{"jsonrpc":"2.0","method":"tools/call","params":{}}"#,
            br#"[{"jsonrpc":"2.0","method":"tools/call","params":{"name":"ok"}}, 5]"#,
            b"{",
        ] {
            assert!(
                extract("POST", "/mcp", "/mcp", bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
