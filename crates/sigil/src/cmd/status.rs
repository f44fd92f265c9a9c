//! `sigil status --metrics-addr host:port`: asks a running server, agent or proxy whether it
//! is ready (`/readyz`) and summarizes its key metrics (`/metrics`) for a person, or prints
//! them all as JSON. Exits non-zero when the service is not ready or cannot be reached.
use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Output;

/// Flags of `sigil status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The service's metrics listener (its `--metrics-addr`), host:port.
    #[arg(long, env = "SIGIL_METRICS_ADDR")]
    pub metrics_addr: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// Largest answer read from the listener.
const MAX_ANSWER: u64 = 8 * 1024 * 1024;

/// One `GET` over plain HTTP/1.1: the status code and the body.
async fn get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let run = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        s.take(MAX_ANSWER).read_to_end(&mut raw).await?;
        parse_answer(&raw).with_context(|| format!("{path} from {addr}"))
    };
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .map_err(|_| anyhow::anyhow!("{addr}{path}: timed out"))?
}

/// Splits an HTTP/1.1 answer (Content-Length or until close; chunked decoded).
fn parse_answer(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP answer"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP status line"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            let Some((chunk, tail)) = tail.split_at_checked(n).filter(|_| n > 0) else {
                break;
            };
            out.push_str(chunk);
            rest = tail.strip_prefix("\r\n").unwrap_or(tail);
        }
        out
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// Samples of the text format: `name{labels}` → value (histogram buckets left out).
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if key.contains("_bucket{") || key.ends_with("_bucket") {
            continue;
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            out.insert(key.trim().to_owned(), v);
        }
    }
    out
}

/// The sum of every sample of `name` whose labels contain all of `labels` (`k="v"`).
fn sum(s: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for (k, v) in s {
        let (n, l) = k.split_once('{').unwrap_or((k.as_str(), ""));
        if n == name && labels.iter().all(|want| l.contains(want)) {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

fn duration(secs: f64) -> String {
    if secs <= 0.0 {
        return "expired".into();
    }
    let s = secs as u64;
    match s {
        0..=119 => format!("in {s}s"),
        120..=7199 => format!("in {}m", s / 60),
        7200..=172_799 => format!("in {}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("in {}d", s / 86400),
    }
}

/// The human summary of one service's metrics.
fn summary(s: &BTreeMap<String, f64>) -> Vec<String> {
    let mut lines = Vec::new();
    let n = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v}"));
    if sum(s, "sigil_proxy_requests_total", &[]).is_some() {
        lines.push("service: proxy".into());
        let allowed = sum(s, "sigil_proxy_requests_total", &["decision=\"allow\""]);
        let denied = sum(s, "sigil_proxy_requests_total", &["decision=\"deny\""]);
        lines.push(format!(
            "requests: {} allowed, {} denied",
            n(allowed),
            n(denied)
        ));
        for (k, v) in s {
            if k.starts_with("sigil_proxy_requests_total{decision=\"deny\"") && *v > 0.0 {
                let reason = k
                    .split("reason=\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("?");
                lines.push(format!("  denied ({reason}): {v}"));
            }
        }
        lines.push(format!(
            "open connections: {}",
            n(sum(s, "sigil_proxy_open_connections", &[]))
        ));
        if let Some(e) = sum(s, "sigil_proxy_svid_expiry_seconds", &[]) {
            lines.push(format!("serving SVID expires {}", duration(e)));
        }
        lines.push(format!(
            "policies: {}",
            n(sum(s, "sigil_proxy_policies", &[]))
        ));
    }
    if sum(s, "sigil_agent_sync_connected", &[]).is_some() {
        lines.push("service: agent".into());
        let connected = sum(s, "sigil_agent_sync_connected", &[]) == Some(1.0);
        lines.push(format!(
            "server sync: {}",
            if connected {
                "connected"
            } else {
                "disconnected (serving from cache)"
            }
        ));
        if let Some(e) = sum(s, "sigil_agent_node_svid_expiry_seconds", &[]) {
            lines.push(format!("node SVID expires {}", duration(e)));
        }
        let held = sum(s, "sigil_agent_workload_svids", &[]).unwrap_or(0.0);
        lines.push(format!("workload SVIDs: {held}"));
        if held > 0.0
            && let Some(e) = sum(s, "sigil_agent_workload_svid_expiry_seconds", &[])
        {
            lines.push(format!("earliest workload SVID expires {}", duration(e)));
        }
        lines.push(format!(
            "rotations: {}",
            n(sum(s, "sigil_agent_svid_rotations_total", &[]))
        ));
        lines.push(format!(
            "Workload API calls: {} ok, {} failed",
            n(sum(
                s,
                "sigil_agent_workload_api_requests_total",
                &["result=\"ok\""]
            )),
            n(sum(s, "sigil_agent_workload_api_requests_total", &[])
                .zip(sum(
                    s,
                    "sigil_agent_workload_api_requests_total",
                    &["result=\"ok\""]
                ))
                .map(|(a, b)| a - b))
        ));
    }
    if sum(s, "sigil_server_store_up", &[]).is_some() {
        lines.push("service: server".into());
        let up = sum(s, "sigil_server_store_up", &[]) == Some(1.0);
        lines.push(format!(
            "store: {}",
            if up { "reachable" } else { "UNREACHABLE" }
        ));
        lines.push(format!(
            "connected agents: {}",
            n(sum(s, "sigil_server_connected_agents", &[]))
        ));
        lines.push(format!(
            "issued identities: {}",
            n(sum(s, "sigil_server_issued_identities", &[]))
        ));
        lines.push(format!(
            "token requests: {} ok, {} refused",
            n(sum(
                s,
                "sigil_server_token_requests_total",
                &["result=\"ok\""]
            )),
            n(sum(s, "sigil_server_token_requests_total", &[])
                .zip(sum(
                    s,
                    "sigil_server_token_requests_total",
                    &["result=\"ok\""]
                ))
                .map(|(a, b)| a - b))
        ));
    }
    if lines.is_empty() {
        lines.push("no sigil metrics found".into());
    }
    lines
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let addr = args.metrics_addr.as_str();
    let (ready_status, ready_body) = get(addr, "/readyz").await?;
    let ready = ready_status == 200;
    let reason = ready_body
        .trim()
        .strip_prefix("not ready: ")
        .unwrap_or(ready_body.trim())
        .to_owned();
    let (metrics_status, metrics_body) = get(addr, "/metrics").await?;
    anyhow::ensure!(
        metrics_status == 200,
        "{addr}/metrics answered {metrics_status}"
    );
    let s = samples(&metrics_body);
    match args.output {
        Output::Json => {
            let v = serde_json::json!({
                "metrics_addr": addr,
                "ready": ready,
                "reason": if ready { None } else { Some(reason.clone()) },
                "metrics": s,
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Text => {
            if ready {
                println!("{addr}: ready");
            } else {
                println!("{addr}: NOT READY: {reason}");
            }
            for line in summary(&s) {
                println!("{line}");
            }
        }
    }
    anyhow::ensure!(ready, "not ready: {reason}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROXY: &str = "# HELP sigil_proxy_requests Requests.\n\
        # TYPE sigil_proxy_requests counter\n\
        sigil_proxy_requests_total{decision=\"allow\",reason=\"policy\"} 7\n\
        sigil_proxy_requests_total{decision=\"deny\",reason=\"policy\"} 3\n\
        sigil_proxy_requests_total{decision=\"deny\",reason=\"bad_token\"} 0\n\
        sigil_proxy_request_duration_seconds_bucket{le=\"0.001\"} 7\n\
        sigil_proxy_request_duration_seconds_count 7\n\
        sigil_proxy_open_connections 1\n\
        sigil_proxy_svid_expiry_seconds 3600\n\
        sigil_proxy_policies 2\n\
        # EOF\n";

    #[test]
    fn summarizes_proxy_metrics() {
        let s = samples(PROXY);
        assert!(!s.keys().any(|k| k.contains("_bucket")));
        let text = summary(&s).join("\n");
        assert!(text.contains("service: proxy"), "{text}");
        assert!(text.contains("requests: 7 allowed, 3 denied"), "{text}");
        assert!(text.contains("denied (policy): 3"), "{text}");
        assert!(!text.contains("bad_token"), "{text}");
        assert!(text.contains("serving SVID expires in 60m"), "{text}");
    }

    #[test]
    fn parses_plain_and_chunked_answers() {
        let (st, body) =
            parse_answer(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nnot ready")
                .unwrap();
        assert_eq!((st, body.as_str()), (503, "not ready"));
        let (st, body) = parse_answer(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((st, body.as_str()), (200, "abcde"));
        assert!(parse_answer(b"garbage").is_err());
    }
}
