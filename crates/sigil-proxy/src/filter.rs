//! Response filtering: a caller sees only what it may use. `GET /v1/models` lists only the
//! models the caller may invoke; an MCP `tools/list` result lists only the tools it may call,
//! whether the server answers in JSON or as an SSE stream. Filtering fails closed: a response
//! that cannot be parsed is not passed through.
use std::collections::HashSet;

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
}

/// Keeps the entries of an OpenAI model list (`{"object":"list","data":[{"id":..},..]}`)
/// that `allow` admits; entries without a string `id` are dropped.
pub fn filter_models(body: &[u8], allow: impl Fn(&str) -> bool) -> Result<Vec<u8>, FilterError> {
    let mut v: Value =
        serde_json::from_slice(body).map_err(|e| FilterError::BadJson(e.to_string()))?;
    let data = v
        .get_mut("data")
        .and_then(Value::as_array_mut)
        .ok_or(FilterError::Shape("model list without a \"data\" array"))?;
    data.retain(|m| m.get("id").and_then(Value::as_str).is_some_and(&allow));
    serde_json::to_vec(&v).map_err(|e| FilterError::BadJson(e.to_string()))
}

/// The ids of the `tools/list` requests of an MCP request body (one message or a batch).
pub fn tools_list_ids(body: &[u8]) -> HashSet<String> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return HashSet::new();
    };
    let one = |m: &Value| {
        (m.get("method").and_then(Value::as_str) == Some("tools/list"))
            .then(|| m.get("id").map(Value::to_string))
            .flatten()
    };
    match &v {
        Value::Array(batch) => batch.iter().filter_map(one).collect(),
        m => one(m).into_iter().collect(),
    }
}

/// Filters one JSON-RPC message in place if it answers one of `ids`; whether it changed.
fn filter_message(m: &mut Value, ids: &HashSet<String>, allow: &dyn Fn(&str) -> bool) -> bool {
    let answers = m.get("id").is_some_and(|id| ids.contains(&id.to_string()));
    if !answers {
        return false;
    }
    let Some(tools) = m
        .get_mut("result")
        .and_then(|r| r.get_mut("tools"))
        .and_then(Value::as_array_mut)
    else {
        return false;
    };
    let before = tools.len();
    tools.retain(|t| t.get("name").and_then(Value::as_str).is_some_and(allow));
    tools.len() != before
}

/// Filters a JSON MCP response body (one message or a batch).
pub fn filter_tools_json(
    body: &[u8],
    ids: &HashSet<String>,
    allow: &dyn Fn(&str) -> bool,
) -> Result<Vec<u8>, FilterError> {
    let mut v: Value =
        serde_json::from_slice(body).map_err(|e| FilterError::BadJson(e.to_string()))?;
    match &mut v {
        Value::Array(batch) => {
            for m in batch.iter_mut() {
                filter_message(m, ids, allow);
            }
        }
        m => {
            filter_message(m, ids, allow);
        }
    }
    serde_json::to_vec(&v).map_err(|e| FilterError::BadJson(e.to_string()))
}

/// An incremental filter of an MCP SSE response stream: complete events are examined as they
/// arrive and passed on at once (so streaming is not delayed); an event that carries the answer
/// to a `tools/list` request is re-emitted with the tools filtered.
pub struct SseFilter<F> {
    buf: Vec<u8>,
    ids: HashSet<String>,
    allow: F,
    max_event: usize,
}

impl<F: Fn(&str) -> bool> SseFilter<F> {
    pub fn new(ids: HashSet<String>, allow: F, max_event: usize) -> Self {
        Self {
            buf: Vec::new(),
            ids,
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
            out.extend_from_slice(&self.event(&event));
        }
        if self.buf.len() > self.max_event {
            return Err(FilterError::EventTooLarge(self.max_event));
        }
        Ok(out)
    }

    /// The stream ended: whatever is left (an unterminated last event) is passed through
    /// filtered like a complete one.
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = std::mem::take(&mut self.buf);
        if rest.is_empty() {
            rest
        } else {
            self.event(&rest)
        }
    }

    /// One raw event (including its terminating blank line).
    fn event(&self, raw: &[u8]) -> Vec<u8> {
        let Ok(text) = std::str::from_utf8(raw) else {
            return raw.to_vec();
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
            return raw.to_vec();
        }
        let Ok(mut v) = serde_json::from_str::<Value>(&data) else {
            return raw.to_vec();
        };
        let changed = match &mut v {
            Value::Array(batch) => {
                // Every message is filtered (no short circuit).
                let mut changed = false;
                for m in batch.iter_mut() {
                    changed |= filter_message(m, &self.ids, &self.allow);
                }
                changed
            }
            m => filter_message(m, &self.ids, &self.allow),
        };
        if !changed {
            return raw.to_vec();
        }
        let mut out = String::new();
        for o in others {
            out.push_str(o);
            out.push('\n');
        }
        out.push_str("data: ");
        out.push_str(&v.to_string());
        out.push_str("\n\n");
        out.into_bytes()
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

    #[test]
    fn tools_list_results_are_filtered_in_json_and_batches() {
        let ids = tools_list_ids(
            br#"[{"jsonrpc":"2.0","id":7,"method":"tools/list"},{"jsonrpc":"2.0","id":"x","method":"ping"}]"#,
        );
        assert_eq!(ids, HashSet::from(["7".to_owned()]));
        let allow = |t: &str| t != "shutdown_line";
        let out = filter_tools_json(
            tools_response(json!(7)).to_string().as_bytes(),
            &ids,
            &allow,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        let names: Vec<&str> = v["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["read_sensor", "read_file"]);
        // A response to another id (a "7" string is not the number 7) is left alone.
        let other = tools_response(json!("7")).to_string();
        let out = filter_tools_json(other.as_bytes(), &ids, &allow).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["result"]["tools"].as_array().unwrap().len(), 3);
        let batch = json!([tools_response(json!(7)), {"jsonrpc":"2.0","id":"x","result":{}}]);
        let out = filter_tools_json(batch.to_string().as_bytes(), &ids, &allow).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v[0]["result"]["tools"].as_array().unwrap().len(), 2);
        assert!(filter_tools_json(b"{", &ids, &allow).is_err());
    }

    #[test]
    fn sse_events_are_filtered_across_chunk_boundaries() {
        let ids = HashSet::from(["1".to_owned()]);
        let mut f = SseFilter::new(ids, |t: &str| t == "read_sensor", 1 << 20);
        let ping =
            "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\n";
        let list = format!(
            "event: message\r\nid: 9\r\ndata: {}\r\n\r\n",
            tools_response(json!(1))
        );
        let stream = format!("{ping}{list}: comment\n\n");
        let mut out = Vec::new();
        // Byte by byte: events are emitted only when complete, unchanged ones verbatim.
        for b in stream.as_bytes().chunks(7) {
            out.extend(f.push(b).unwrap());
        }
        out.extend(f.finish());
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(ping), "{text}");
        assert!(text.ends_with(": comment\n\n"), "{text}");
        assert!(text.contains("id: 9\n"));
        assert!(text.contains("read_sensor"));
        assert!(!text.contains("shutdown_line"), "{text}");
        assert!(!text.contains("read_file"), "{text}");
        // An event that never ends cannot grow without bound.
        let mut f = SseFilter::new(HashSet::new(), |_: &str| true, 64);
        assert!(f.push(&[b'a'; 65]).is_err());
    }
}
