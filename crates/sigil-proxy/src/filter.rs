//! Response filtering: a caller sees only what it may use. `GET /v1/models` lists only the
//! models the caller may invoke; an MCP `tools/list` result lists only the tools it may call,
//! whether the server answers in JSON or as an SSE stream. Filtering fails closed: a response
//! that cannot be parsed is not passed through.
use serde_json::Value;

/// Why a response could not be filtered (the client gets a 502 instead).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FilterError {
    #[error("upstream response is not valid JSON: {0}")]
    BadJson(String),
    #[error("upstream response has an unexpected shape: {0}")]
    Shape(&'static str),
    #[error("upstream SSE event larger than {0} bytes")]
    EventTooLarge(usize),
    /// JSON a client may read otherwise than the proxy: keys that collide after case
    /// folding, a key holding U+0000, or (SSE) an event that is not UTF-8 or data that looks
    /// like JSON but is not.
    #[error("upstream response may be read more than one way: {0}")]
    Ambiguous(String),
}

/// Reads an upstream answer the one way the request path reads JSON ([`crate::json`]): an
/// object whose keys collide is refused, not read last-wins, so a list under a second
/// `result` (or a `Result`, for Go's case-insensitive decoder) cannot pass unfiltered.
fn read(body: &[u8]) -> Result<Value, FilterError> {
    crate::json::parse(body).map_err(|e| match e {
        crate::json::JsonError::Syntax(m) => FilterError::BadJson(m),
        crate::json::JsonError::CollidingKeys(k) => {
            FilterError::Ambiguous(format!("keys that collide ({k:?})"))
        }
        crate::json::JsonError::NulInKey => FilterError::Ambiguous("a key holding U+0000".into()),
    })
}

/// Keeps the entries of a model list that `allow` admits: OpenAI's
/// (`{"object":"list","data":[{"id":..},..]}`) or Ollama's (`{"models":[{"name":..,
/// "model":..},..]}`, both names admitted). Entries without a string name are dropped.
pub fn filter_models(body: &[u8], allow: impl Fn(&str) -> bool) -> Result<Vec<u8>, FilterError> {
    let mut v = read(body)?;
    if let Some(data) = v.get_mut("data").and_then(Value::as_array_mut) {
        data.retain(|m| m.get("id").and_then(Value::as_str).is_some_and(&allow));
    } else if let Some(models) = v.get_mut("models").and_then(Value::as_array_mut) {
        models.retain(|m| {
            m.get("name").and_then(Value::as_str).is_some_and(&allow)
                && m.get("model")
                    .is_none_or(|n| n.as_str().is_some_and(&allow))
        });
    } else {
        return Err(FilterError::Shape(
            "model list without a \"data\" or \"models\" array",
        ));
    }
    serde_json::to_vec(&v).map_err(|e| FilterError::BadJson(e.to_string()))
}

/// Whether the caller may use one listed MCP item: `(action, resource type, id)`.
pub type McpAllow = dyn Fn(&str, &str, &str) -> bool + Send + Sync;

/// The lists of an MCP result that are filtered: the result key, the action and resource
/// type policy decides on, and the field naming each item.
const MCP_LISTS: &[(&str, &str, &str, &str)] = &[
    ("tools", "call_tool", "Tool", "name"),
    ("prompts", "get_prompt", "Prompt", "name"),
    ("resources", "read_resource", "Resource", "uri"),
];

/// Filters one JSON-RPC message in place: any result holding a tool, prompt or resource
/// list keeps only what the caller may use, whatever the id it answers (ids are spelled
/// many ways: `1`, `1.0`, `-0`); whether it changed.
fn filter_message(m: &mut Value, allow: &dyn Fn(&str, &str, &str) -> bool) -> bool {
    let Some(result) = m.get_mut("result").and_then(Value::as_object_mut) else {
        return false;
    };
    let mut changed = false;
    for (key, action, kind, field) in MCP_LISTS {
        let Some(items) = result.get_mut(*key).and_then(Value::as_array_mut) else {
            continue;
        };
        let before = items.len();
        items.retain(|t| {
            t.get(*field)
                .and_then(Value::as_str)
                .is_some_and(|id| allow(action, kind, id))
        });
        changed |= items.len() != before;
    }
    changed
}

/// Filters a JSON MCP response body (one message or a batch); an answer with nothing to
/// filter is passed as the upstream wrote it.
pub fn filter_mcp_json(
    body: &[u8],
    allow: &dyn Fn(&str, &str, &str) -> bool,
) -> Result<Vec<u8>, FilterError> {
    let mut v = read(body)?;
    let changed = match &mut v {
        // Every message is filtered (no short circuit).
        Value::Array(batch) => batch
            .iter_mut()
            .fold(false, |changed, m| filter_message(m, allow) | changed),
        m => filter_message(m, allow),
    };
    if !changed {
        return Ok(body.to_vec());
    }
    serde_json::to_vec(&v).map_err(|e| FilterError::BadJson(e.to_string()))
}

/// An incremental filter of an MCP SSE response stream: complete events are examined as they
/// arrive and passed on at once (so streaming is not delayed); an event that carries a tool,
/// prompt or resource list is re-emitted filtered. An event whose data is not JSON is
/// passed as it is (it carries no list a client would read as one).
pub struct SseFilter {
    buf: Vec<u8>,
    allow: Box<McpAllow>,
    max_event: usize,
}

impl SseFilter {
    pub fn new(allow: Box<McpAllow>, max_event: usize) -> Self {
        Self {
            buf: Vec::new(),
            allow,
            max_event,
        }
    }

    /// Takes the next chunk of the stream; returns the bytes to send on.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<u8>, FilterError> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = event_end(&self.buf) {
            let event: Vec<u8> = self.buf.drain(..end).collect();
            out.extend_from_slice(&self.event(&event)?);
        }
        if self.buf.len() > self.max_event {
            return Err(FilterError::EventTooLarge(self.max_event));
        }
        Ok(out)
    }

    /// The stream ended: whatever is left (an unterminated last event) is passed through
    /// filtered like a complete one.
    pub fn finish(&mut self) -> Result<Vec<u8>, FilterError> {
        let rest = std::mem::take(&mut self.buf);
        if rest.is_empty() {
            Ok(rest)
        } else {
            self.event(&rest)
        }
    }

    /// One raw event (including its terminating blank line). An event that is not UTF-8
    /// is refused: an SSE client decodes it with replacement characters and may find JSON
    /// in it.
    fn event(&self, raw: &[u8]) -> Result<Vec<u8>, FilterError> {
        let Ok(text) = std::str::from_utf8(raw) else {
            return Err(FilterError::Ambiguous(
                "an SSE event that is not UTF-8".into(),
            ));
        };
        let mut data = String::new();
        let mut others = Vec::new();
        let mut saw_data = false;
        for line in text.split_inclusive('\n') {
            let bare = line.trim_end_matches(['\n', '\r']);
            if bare.is_empty() {
                continue;
            }
            if let Some(d) = bare.strip_prefix("data:") {
                if saw_data {
                    data.push('\n');
                }
                data.push_str(d.strip_prefix(' ').unwrap_or(d));
                saw_data = true;
            } else {
                others.push(bare);
            }
        }
        if !saw_data {
            return Ok(raw.to_vec());
        }
        // Data that is not JSON carries no list, unless a lenient client parser (one that
        // takes lone surrogates, comments or trailing commas) reads it as JSON: data that
        // opens like JSON must be read strictly, or the stream is cut.
        let mut v = match read(data.as_bytes()) {
            Ok(v) => v,
            Err(FilterError::BadJson(_)) if !data.trim_start().starts_with(['{', '[']) => {
                return Ok(raw.to_vec());
            }
            Err(e) => return Err(e),
        };
        let changed = match &mut v {
            Value::Array(batch) => {
                // Every message is filtered (no short circuit).
                let mut changed = false;
                for m in batch.iter_mut() {
                    changed |= filter_message(m, &*self.allow);
                }
                changed
            }
            m => filter_message(m, &*self.allow),
        };
        if !changed {
            return Ok(raw.to_vec());
        }
        let mut out = String::new();
        for o in others {
            out.push_str(o);
            out.push('\n');
        }
        out.push_str("data: ");
        out.push_str(&v.to_string());
        out.push_str("\n\n");
        Ok(out.into_bytes())
    }
}

/// The end (exclusive) of the first complete event in `buf`: after a blank line.
fn event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < buf.len() {
        let rest = buf.get(i..)?;
        if rest.starts_with(b"\n\n") {
            return Some(i + 2);
        }
        if rest.starts_with(b"\r\n\r\n") {
            return Some(i + 4);
        }
        if rest.starts_with(b"\r\r") {
            return Some(i + 2);
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn model_lists_keep_only_allowed_models() {
        let body = json!({"object":"list","data":[
            {"id":"defect-detector","object":"model"},
            {"id":"forecast","object":"model"},
            {"object":"model"}
        ]});
        let out = filter_models(body.to_string().as_bytes(), |m| m == "defect-detector").unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["data"],
            json!([{"id":"defect-detector","object":"model"}])
        );
        assert_eq!(v["object"], "list");
        assert!(filter_models(b"not json", |_| true).is_err());
        assert!(filter_models(br#"{"data":{}}"#, |_| true).is_err());
    }

    fn tools_response(id: Value) -> Value {
        json!({"jsonrpc":"2.0","id":id,"result":{"tools":[
            {"name":"read_sensor"},{"name":"shutdown_line"},{"name":"read_file"}]}})
    }

    fn no_shutdown(action: &str, kind: &str, id: &str) -> bool {
        match (action, kind) {
            ("call_tool", "Tool") => id != "shutdown_line",
            ("get_prompt", "Prompt") => id == "ok",
            ("read_resource", "Resource") => id.starts_with("file:///data/"),
            _ => false,
        }
    }

    fn tool_names(v: &Value) -> Vec<&str> {
        v["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn mcp_lists_are_filtered_whatever_the_id_in_json_and_batches() {
        // Every spelling of an id, and ids no request used: filtered all the same.
        for id in ["7", "\"7\"", "-0", "1.0", "1e0", "null"] {
            let body = tools_response(serde_json::from_str(id).unwrap()).to_string();
            let out = filter_mcp_json(body.as_bytes(), &no_shutdown).unwrap();
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(tool_names(&v), ["read_sensor", "read_file"], "id {id}");
        }
        let batch = json!([tools_response(json!(7)), {"jsonrpc":"2.0","id":"x","result":{
            "prompts":[{"name":"ok"},{"name":"secret"}],
            "resources":[{"uri":"file:///data/a"},{"uri":"file:///etc/shadow"},{"name":"no uri"}]}}]);
        let out = filter_mcp_json(batch.to_string().as_bytes(), &no_shutdown).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v[0]["result"]["tools"].as_array().unwrap().len(), 2);
        assert_eq!(v[1]["result"]["prompts"], json!([{"name":"ok"}]));
        assert_eq!(
            v[1]["result"]["resources"],
            json!([{"uri":"file:///data/a"}])
        );
        assert!(filter_mcp_json(b"{", &no_shutdown).is_err());
    }

    #[test]
    fn sse_events_are_filtered_across_chunk_boundaries() {
        let mut f = SseFilter::new(
            Box::new(|_: &str, _: &str, t: &str| t == "read_sensor"),
            1 << 20,
        );
        let ping =
            "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\n";
        let list = format!(
            "event: message\r\nid: 9\r\ndata: {}\r\n\r\n",
            tools_response(json!(-0.0))
        );
        let stream = format!("{ping}{list}: comment\n\n");
        let mut out = Vec::new();
        // Byte by byte: events are emitted only when complete, unchanged ones verbatim.
        for b in stream.as_bytes().chunks(7) {
            out.extend(f.push(b).unwrap());
        }
        out.extend(f.finish().unwrap());
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(ping), "{text}");
        assert!(text.ends_with(": comment\n\n"), "{text}");
        assert!(text.contains("id: 9\n"));
        assert!(text.contains("read_sensor"));
        assert!(!text.contains("shutdown_line"), "{text}");
        assert!(!text.contains("read_file"), "{text}");
        // An event that never ends cannot grow without bound.
        let mut f = SseFilter::new(Box::new(|_: &str, _: &str, _: &str| true), 64);
        assert!(f.push(&[b'a'; 65]).is_err());
    }

    #[test]
    fn answers_a_client_may_read_otherwise_are_refused() {
        // A list the filter would not see (serde_json keeps the last `result`; a
        // first-wins parser, or Go's case-insensitive one, reads the other) is refused.
        for body in [
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"shutdown_line"}]},"result":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"Result":{"tools":[{"name":"shutdown_line"}]},"result":{}}"#,
            r#"[{"jsonrpc":"2.0","id":1,"result":{"tools":[],"tools":[{"name":"shutdown_line"}]}}]"#,
        ] {
            assert!(
                matches!(
                    filter_mcp_json(body.as_bytes(), &no_shutdown),
                    Err(FilterError::Ambiguous(_))
                ),
                "{body}"
            );
        }
        assert!(matches!(
            filter_models(br#"{"data":[{"id":"a"}],"Data":[{"id":"b"}]}"#, |m| m
                == "a"),
            Err(FilterError::Ambiguous(_))
        ));
        let sse = |event: &[u8]| {
            let mut f = SseFilter::new(Box::new(no_shutdown), 1 << 20);
            f.push(event)
        };
        // Data that opens like JSON but that serde refuses (a lone surrogate, which
        // JavaScript's JSON.parse takes), colliding keys, and an event that is not UTF-8.
        for event in [
            &b"data: {\"result\":{\"tools\":[{\"name\":\"shutdown_line\"}]},\"x\":\"\\ud800\"}\n\n"[..],
            b"data: {\"result\":{\"tools\":[{\"name\":\"shutdown_line\"}]},\"result\":{}}\n\n",
            b": \xff\ndata: {\"result\":{\"tools\":[{\"name\":\"shutdown_line\"}]},\"x\":\"\\ud800\"}\n\n",
        ] {
            assert!(
                matches!(sse(event), Err(FilterError::Ambiguous(_) | FilterError::BadJson(_))),
                "{}",
                String::from_utf8_lossy(event)
            );
        }
        // Data that is not JSON at all still passes as it is.
        assert_eq!(sse(b"data: ping\n\n").unwrap(), b"data: ping\n\n");
        // An unterminated last event is read the same way.
        let mut f = SseFilter::new(Box::new(no_shutdown), 1 << 20);
        assert!(
            f.push(b"data: {\"result\":{},\"result\":{}}")
                .unwrap()
                .is_empty()
        );
        assert!(f.finish().is_err());
    }
}
