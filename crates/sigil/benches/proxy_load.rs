//! Whole-process benchmark of `sigil proxy`, compared in the same run with a direct call and
//! with nginx as a plain mTLS reverse proxy. Real processes: `sigil server` (mints the SVIDs
//! and the access token), an nginx upstream returning a fixed JSON body, nginx as the mTLS
//! proxy, `sigil proxy --enforce mtls-only` and `sigil proxy` with token + policy + audit.
//!
//! The load generator is this process: hyper HTTP/1.1 over tokio-rustls with the client's
//! X.509-SVID, keep-alive, on a current-thread runtime. Per target: latency (one connection,
//! sequential requests) and throughput (C connections for a fixed time). The process under
//! test runs on core 1 (`taskset -c 1`, one worker); this process, the upstream and the trust
//! authority run on core 0. Also: the full-path proxy's RSS idle and with 1,000 open mTLS
//! connections. Target (h) is the caller's side: plain HTTP to a `sigil proxy` with an
//! `[outbound]` route to (d) (two sidecars, mTLS between them; the outbound sidecar also on
//! core 1), with the mTLS handshakes it made per 1,000 calls from its
//! `sigil_proxy_outbound_connections` counter.
//!
//! Run: `scripts/bench-proxy` (installs nginx if missing), or
//! `cargo bench -p sigil --bench proxy_load`. Tunables: `SIGIL_BENCH_N` (latency requests,
//! default 20000), `SIGIL_BENCH_CONNS` (throughput connections, default 32),
//! `SIGIL_BENCH_SECS` (throughput seconds, default 5), `SIGIL_BENCH_HOLD` (connections held
//! for the RSS figure, default 1000), `SIGIL_BENCH_PERF=<dir>` (record each target's measured
//! throughput window with `perf record --call-graph dwarf` into `<dir>/<target>.data`, for `perf report`),
//! `SIGIL_BENCH_CALLGRIND=<dir>` (run each `sigil proxy` under valgrind's callgrind and
//! dump its instruction counts for the throughput window into `<dir>`, for
//! `callgrind_annotate`: exact counts where this machine has no hardware counters),
//! `SIGIL_BENCH_BIN=<path to a sigil binary>` (the proxies under test; default: the `sigil` this
//! bench was built with; `scripts/bench-proxy` sets it to the `dist` build),
//! `SIGIL_BENCH_WORKERS` (tokio worker threads of each `sigil proxy`, default 1; `default`
//! for tokio's own default, one per core), `SIGIL_BENCH_B=<path to a sigil binary>` (also
//! run the full path, model and tool call, with that build: an A/B in one run),
//! `SIGIL_BENCH_UPSTREAM_DELAY_US=<µs>` (the upstream answers after that delay: a hyper server
//! in this process instead of nginx), `SIGIL_BENCH_ONLY=<key>,<key>` (measure only these targets besides `direct`; keys as in
//! the JSON, e.g. `sigil_full,sigil_full_audit_tmpfs`; `sigil_full_tool_audit_tmpfs` is the tool
//! call with the audit log on tmpfs, which splits a tool call's cost into its sync and the rest).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Server, TD, free_port};
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const BODY: &[u8] = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
/// A tool call (MCP JSON-RPC): a call with side effects, its record durable before forward.
const TOOL_BODY: &[u8] = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_sensor","arguments":{"line":3}}}"#;
const UPSTREAM_BODY: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#;
const POLICY: &str = r#"
@id("bench-invoke")
permit (principal in Group::"factory-floor", action == Action::"invoke", resource == Model::"m")
when { context.scopes.contains("model:invoke") };

@id("bench-tool")
permit (principal in Group::"factory-floor", action == Action::"call_tool", resource == Tool::"read_sensor");
"#;
/// The core the process under test runs on; everything else runs on core 0.
const TARGET_CORE: &str = "1";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn proc_status(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss_mib(pid: u32) -> f64 {
    proc_status(pid, "VmRSS:") as f64 / 1024.0
}

/// User + system CPU time of a process (`/proc/<pid>/stat`, clock ticks of 10 ms).
fn cpu_time(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// Thread names of a process with their counts, e.g. `tokio-runtime-w×1`.
fn threads(pid: u32) -> String {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
                .map(|s| s.trim().to_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < names.len() {
        let n = names[i..].iter().take_while(|x| **x == names[i]).count();
        out.push(format!("{}×{n}", names[i]));
        i += n;
    }
    out.join(", ")
}

fn affinity(pid: u32) -> String {
    let out = Command::new("taskset")
        .args(["-c", "-p", &pid.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .rsplit(':')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// A child process killed on drop.
struct Proc {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `port` accepts, failing with the log if the process exits first.
    fn wait_port(mut self, port: u16) -> Self {
        let secs = if std::env::var_os("SIGIL_BENCH_CALLGRIND").is_some() {
            120
        } else {
            20
        };
        let deadline = Instant::now() + Duration::from_secs(secs);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!(
                    "{} exited with {st}:\n{}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "{} did not start", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
        self
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether processes are pinned to cores (`SIGIL_BENCH_PIN=0` lets the scheduler place
/// everything, as on a device; throughput is then not "one core").
fn pinned() -> bool {
    static PIN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PIN.get_or_init(|| std::env::var("SIGIL_BENCH_PIN").map_or(true, |v| v != "0"))
}

/// Starts `cmd` (already carrying its args), optionally pinned to `core`, stderr to `log`.
fn spawn(
    name: &'static str,
    core: Option<&str>,
    program: &str,
    args: &[String],
    log: &Path,
) -> Proc {
    // Instruction counts on request: each `sigil proxy` runs under callgrind, and
    // `throughput` keeps only its measured window (zeroed at its start, dumped at its end).
    let callgrind = std::env::var_os("SIGIL_BENCH_CALLGRIND")
        .filter(|_| args.first().is_some_and(|a| a == "proxy"))
        .map(|dir| {
            let file: String = name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let out = Path::new(&dir).join(format!("{file}.out"));
            vec![
                "valgrind".to_owned(),
                "--tool=callgrind".to_owned(),
                format!("--callgrind-out-file={}", out.display()),
                program.to_owned(),
            ]
        });
    let argv = callgrind.unwrap_or_else(|| vec![program.to_owned()]);
    let mut cmd = match core.filter(|_| pinned()) {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.args(["-c", c]).args(&argv);
            cmd
        }
        None => {
            let mut cmd = Command::new(&argv[0]);
            cmd.args(&argv[1..]);
            cmd
        }
    };
    cmd.args(args);
    // One tokio worker for `sigil proxy` (its runtime is tokio's default multi-thread
    // builder, which reads this variable; nginx ignores it), unless SIGIL_BENCH_WORKERS says
    // otherwise (`default`: tokio's default, one per core).
    match std::env::var("SIGIL_BENCH_WORKERS").as_deref() {
        Ok("default") => {}
        Ok(n) => {
            cmd.env("TOKIO_WORKER_THREADS", n);
        }
        Err(_) => {
            cmd.env("TOKIO_WORKER_THREADS", "1");
        }
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name} ({program}): {e}"));
    Proc {
        child,
        name,
        log: log.to_owned(),
    }
}

fn nginx_conf(dir: &Path, http_block: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\n\
         error_log {d}/error.log warn;\npid {d}/nginx.pid;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         keepalive_requests 100000000;\n  keepalive_timeout 600s;\n{http_block}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    path
}

fn nginx(name: &'static str, dir: &Path, core: Option<&str>, port: u16, http_block: &str) -> Proc {
    let conf = nginx_conf(dir, http_block);
    let args = [
        "-p".to_string(),
        dir.display().to_string(),
        "-e".into(),
        dir.join("error.log").display().to_string(),
        "-c".into(),
        conf.display().to_string(),
    ];
    spawn(name, core, "nginx", &args, &dir.join("stderr.log")).wait_port(port)
}

/// How the load generator reaches a target.
#[derive(Clone)]
struct Target {
    key: &'static str,
    label: &'static str,
    port: u16,
    tls: Option<TlsConnector>,
    /// The process whose CPU time is charged to the target.
    pid: u32,
    /// The upstream nginx (its CPU is reported too).
    upstream_pid: u32,
    /// Send MCP tool calls instead of chat completions.
    tool: bool,
}

async fn connect(t: &Target) -> SendRequest<Full<Bytes>> {
    let tcp = TcpStream::connect(("127.0.0.1", t.port)).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    match &t.tls {
        Some(c) => {
            let name = ServerName::try_from("localhost").unwrap();
            let tls = c.connect(name, tcp).await.unwrap();
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            send
        }
        None => {
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            send
        }
    }
}

fn request(auth: &HeaderValue, tool: bool) -> Request<Full<Bytes>> {
    let (path, body) = if tool {
        ("/mcp", TOOL_BODY)
    } else {
        ("/v1/chat/completions", BODY)
    };
    let mut req = Request::post(path)
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    let h = req.headers_mut();
    h.insert(HOST, HeaderValue::from_static("localhost"));
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(AUTHORIZATION, auth.clone());
    req
}

/// One request on a kept connection; the response must be the upstream's 200.
async fn call(send: &mut SendRequest<Full<Bytes>>, auth: &HeaderValue, tool: bool) {
    send.ready().await.unwrap();
    let resp = send.send_request(request(auth, tool)).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    if status != StatusCode::OK || body.len() != UPSTREAM_BODY.len() {
        panic!(
            "unexpected response {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
}

#[derive(Default, Clone, serde::Serialize)]
struct Figures {
    target: String,
    label: String,
    n: usize,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    max_us: f64,
    conns: usize,
    secs: f64,
    req_per_s: f64,
    loaded_p50_us: f64,
    loaded_p99_us: f64,
    /// CPU of the process under test per request during the throughput run.
    target_cpu_us_per_req: f64,
    target_cpu_pct: f64,
    loadgen_cpu_pct: f64,
    upstream_cpu_pct: f64,
}

/// Latency on one kept connection per target, in `ROUNDS` interleaved rounds so that
/// background noise on the shared machine falls on every target alike.
async fn latency(targets: &[Target], auth: &HeaderValue, n: usize, all: &mut [Figures]) {
    const ROUNDS: usize = 10;
    let mut conns = Vec::new();
    for t in targets {
        let mut send = connect(t).await;
        for _ in 0..(n / 10).max(500) {
            call(&mut send, auth, t.tool).await;
        }
        conns.push(send);
    }
    let mut lat = vec![Vec::with_capacity(n); targets.len()];
    for r in 0..ROUNDS {
        let count = n / ROUNDS + usize::from(r < n % ROUNDS);
        for ((send, lat), t) in conns.iter_mut().zip(lat.iter_mut()).zip(targets) {
            for _ in 0..count {
                let s = Instant::now();
                call(send, auth, t.tool).await;
                lat.push(s.elapsed());
            }
        }
    }
    for (lat, f) in lat.iter_mut().zip(all.iter_mut()) {
        lat.sort();
        f.n = lat.len();
        f.p50_us = us(percentile(lat, 0.5));
        f.p90_us = us(percentile(lat, 0.9));
        f.p99_us = us(percentile(lat, 0.99));
        f.max_us = us(lat.last().copied().unwrap_or_default());
    }
}

async fn throughput(t: &Target, auth: &HeaderValue, conns: usize, secs: f64, f: &mut Figures) {
    let mut senders = Vec::with_capacity(conns);
    for _ in 0..conns {
        senders.push(connect(t).await);
    }
    // Warm-up of one second, then the measured window; every connection stays busy.
    let warm_end = Instant::now() + Duration::from_secs(1);
    let end = warm_end + Duration::from_secs_f64(secs);
    let pid = t.pid.to_string();
    let up = t.upstream_pid.to_string();
    let mut tasks = Vec::new();
    for mut send in senders {
        let auth = auth.clone();
        let tool = t.tool;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let s = Instant::now();
                if s >= end {
                    break;
                }
                call(&mut send, &auth, tool).await;
                if s >= warm_end {
                    lat.push(s.elapsed());
                }
            }
            lat
        }));
    }
    tokio::time::sleep_until(warm_end.into()).await;
    // Profiling on request: perf follows the process under test for the measured window.
    let perf = std::env::var_os("SIGIL_BENCH_PERF").map(|dir| {
        let out = Path::new(&dir).join(format!("{}.data", t.key));
        Command::new("perf")
            .args(["record", "-q", "-F", "499", "--call-graph", "dwarf,32768"])
            .args(["-p", &pid, "-o"])
            .arg(&out)
            .args(["--", "sleep", &format!("{secs}")])
            .stdout(Stdio::null())
            .spawn()
            .expect("SIGIL_BENCH_PERF is set but `perf` cannot be started")
    });
    let callgrind = std::env::var_os("SIGIL_BENCH_CALLGRIND").is_some();
    if callgrind {
        callgrind_control(&["-z", &pid]);
    }
    let (cpu0, self0, up0, t0) = (
        cpu_time(&pid),
        cpu_time("self"),
        cpu_time(&up),
        Instant::now(),
    );
    tokio::time::sleep_until(end.into()).await;
    let (cpu1, self1, up1, wall) = (
        cpu_time(&pid),
        cpu_time("self"),
        cpu_time(&up),
        t0.elapsed(),
    );
    let mut lat = Vec::new();
    for task in tasks {
        lat.extend(task.await.unwrap());
    }
    if let Some(mut p) = perf {
        let _ = p.wait();
    }
    if callgrind {
        callgrind_control(&[&format!("--dump=window-{}", t.key), &pid]);
    }
    lat.sort();
    let done = lat.len() as f64;
    f.conns = conns;
    f.secs = secs;
    f.req_per_s = done / wall.as_secs_f64();
    f.loaded_p50_us = us(percentile(&lat, 0.5));
    f.loaded_p99_us = us(percentile(&lat, 0.99));
    f.target_cpu_us_per_req = us(cpu1.saturating_sub(cpu0)) / done.max(1.0);
    f.target_cpu_pct = 100.0 * (cpu1.saturating_sub(cpu0)).as_secs_f64() / wall.as_secs_f64();
    f.loadgen_cpu_pct = 100.0 * (self1.saturating_sub(self0)).as_secs_f64() / wall.as_secs_f64();
    f.upstream_cpu_pct = 100.0 * (up1.saturating_sub(up0)).as_secs_f64() / wall.as_secs_f64();
}

/// Runs `callgrind_control` (zero or dump the counts of a process under callgrind).
fn callgrind_control(args: &[&str]) {
    let ok = Command::new("callgrind_control")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "callgrind_control {args:?} failed");
}

/// Opens `n` mTLS connections with one request each, holds them, reads the RSS of `pid`.
/// RSS (MiB) of `pid` with `n` open connections to `t`, then 2 s and (with `late`) 12 s
/// after they all closed (an allocator may give memory back on a timer).
async fn rss_with_connections(
    t: &Target,
    auth: &HeaderValue,
    n: usize,
    pid: u32,
    late: bool,
) -> (f64, f64, f64) {
    let mut held = Vec::with_capacity(n);
    let per = 16;
    let mut tasks = Vec::new();
    for i in 0..per {
        let t = t.clone();
        let auth = auth.clone();
        let count = n / per + usize::from(i < n % per);
        tasks.push(tokio::spawn(async move {
            let mut v = Vec::with_capacity(count);
            for _ in 0..count {
                let mut s = connect(&t).await;
                call(&mut s, &auth, t.tool).await;
                v.push(s);
            }
            v
        }));
    }
    for task in tasks {
        held.extend(task.await.unwrap());
    }
    assert_eq!(held.len(), n);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Every connection is still open: one more request on each of a sample.
    for s in held.iter_mut().step_by(97) {
        call(s, auth, t.tool).await;
    }
    let rss = rss_mib(pid);
    drop(held);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let closed = rss_mib(pid);
    let later = if late {
        tokio::time::sleep(Duration::from_secs(10)).await;
        rss_mib(pid)
    } else {
        closed
    };
    (rss, closed, later)
}

/// The sum of a Prometheus counter's samples at `addr`'s `/metrics` (0 when absent).
fn scrape_counter(addr: &str, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    write!(tcp, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    tcp.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A proxy's counters (the outbound sidecar's, or (f)'s), or what they moved by in a phase
/// of the run.
struct Counters {
    /// mTLS handshakes to the callee's sidecar.
    handshakes: f64,
    /// Calls made (one audit record each).
    calls: usize,
    /// Syncs of its audit log.
    syncs: f64,
}

impl Counters {
    fn since(&self, start: &Self) -> Self {
        Self {
            handshakes: self.handshakes - start.handshakes,
            calls: self.calls.saturating_sub(start.calls),
            syncs: self.syncs - start.syncs,
        }
    }

    fn per_1000(&self) -> f64 {
        1000.0 * self.handshakes / (self.calls.max(1) as f64)
    }

    /// Records per sync: the group commit's batch size.
    fn per_sync(&self) -> f64 {
        self.calls as f64 / self.syncs.max(1.0)
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"handshakes": self.handshakes, "calls": self.calls,
            "per_1000": self.per_1000(), "audit_syncs": self.syncs})
    }
}

/// An upstream that answers every request after `delay` (a model that takes a moment):
/// hyper on its own thread of this process; its port.
fn delayed_upstream(delay: Duration) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    continue;
                };
                tcp.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| async move {
                        tokio::time::sleep(delay).await;
                        let mut resp = hyper::Response::new(Full::new(Bytes::from_static(
                            UPSTREAM_BODY.as_bytes(),
                        )));
                        resp.headers_mut()
                            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                        Ok::<_, std::convert::Infallible>(resp)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
    });
    port
}

/// POST /oauth2/token over mTLS with our own client: the certificate-bound access token.
async fn fetch_token(port: u16, tls: &TlsConnector) -> String {
    let t = Target {
        key: "token",
        label: "",
        port,
        tls: Some(tls.clone()),
        pid: 0,
        upstream_pid: 0,
        tool: false,
    };
    let mut send = connect(&t).await;
    let req = Request::post("/oauth2/token")
        .header(HOST, "localhost")
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Full::new(Bytes::from_static(
            b"grant_type=client_credentials&resource=model-gw",
        )))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    v["access_token"].as_str().unwrap().to_owned()
}

/// One flush on the disk `dir` is on: a record-sized append then `fdatasync`, `n` times,
/// with the device left idle for `gap` before each (zero: back to back; the latency test's
/// cadence: each request's flush follows one upstream call, and an idle device and core take
/// longer to answer than a hot one); p50 and p99 in µs.
fn flush_cost(dir: &Path, n: usize, gap: Duration) -> (f64, f64) {
    use std::io::Write as _;
    let path = dir.join("flush-probe.log");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap();
    let line = [b'x'; 300];
    let mut us: Vec<f64> = (0..n)
        .map(|_| {
            if !gap.is_zero() {
                std::thread::sleep(gap);
            }
            let t = Instant::now();
            f.write_all(&line).unwrap();
            f.sync_data().unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    let _ = std::fs::remove_file(&path);
    us.sort_by(f64::total_cmp);
    (us[n / 2], us[n * 99 / 100])
}

fn main() {
    // `cargo test --benches` runs bench targets with --list-ish args; only run when benching.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: usize = env_or("SIGIL_BENCH_N", 20_000);
    let conns: usize = env_or("SIGIL_BENCH_CONNS", 32);
    let secs: f64 = env_or("SIGIL_BENCH_SECS", 5.0);
    let hold: usize = env_or("SIGIL_BENCH_HOLD", 1000);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cores >= 2,
        "this benchmark pins to cores 0 and 1; {cores} available"
    );
    assert!(
        Command::new("nginx").arg("-v").output().is_ok(),
        "nginx is needed (Debian package `nginx`; scripts/bench-proxy installs it)"
    );
    // This process (the load generator) and every child not pinned elsewhere: core 0.
    let me = std::process::id();
    if pinned() {
        let ok = Command::new("taskset")
            .args(["-a", "-c", "-p", "0", &me.to_string()])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "taskset failed");
    } else {
        println!("SIGIL_BENCH_PIN=0: nothing is pinned; the scheduler places every process");
    }
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let s = Server::start(&dir.join("srv"), &[]);
    let client_id = format!("spiffe://{TD}/bench-client");
    s.sigil_json(&[
        "entry",
        "create",
        "--spiffe-id",
        &client_id,
        "--parent-id",
        &format!("spiffe://{TD}/sigil/node/bench"),
        "--selector",
        "unix:uid:1",
        "--scope",
        "model:invoke",
        "--group",
        "factory-floor",
    ]);
    let cdir = dir.join("client");
    s.mint(&client_id, &cdir);
    let (pdir, bundle_json) = s.proxy_credentials(dir, &format!("spiffe://{TD}/proxy"));
    let bundle_pem = cdir.join("bundle.pem");
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("bench.cedar"), POLICY).unwrap();

    let client_cfg = {
        let pem = std::fs::read_to_string(&bundle_pem).unwrap();
        let cfg = common::client_tls(&pem, Some((&cdir.join("svid.pem"), &cdir.join("key.pem"))));
        let mut cfg = (*cfg).clone();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    };
    let tls = TlsConnector::from(client_cfg);

    // Upstream: nginx answering every path with a fixed JSON body (core 0).
    let nginx_up_port = free_port();
    let upstream = nginx(
        "upstream nginx",
        &dir.join("nginx-upstream"),
        None,
        nginx_up_port,
        &format!(
            "  server {{\n    listen 127.0.0.1:{nginx_up_port};\n    location / {{\n      \
             default_type application/json;\n      return 200 '{UPSTREAM_BODY}';\n    }}\n  }}"
        ),
    );
    // With SIGIL_BENCH_UPSTREAM_DELAY_US: every proxy and the direct call go to an upstream
    // that answers after that delay (the fastest a real model answers is ~1 ms).
    let delay_us: u64 = env_or("SIGIL_BENCH_UPSTREAM_DELAY_US", 0);
    let up_port = if delay_us > 0 {
        delayed_upstream(Duration::from_micros(delay_us))
    } else {
        nginx_up_port
    };
    // Diagnostic: the same upstream on core 1, so a direct call crosses cores as proxied
    // calls do (the difference to (a) is the cross-core wake-up cost of this machine).
    let far_port = free_port();
    let far_upstream = nginx(
        "upstream nginx on core 1",
        &dir.join("nginx-upstream-far"),
        Some(TARGET_CORE),
        far_port,
        &format!(
            "  server {{\n    listen 127.0.0.1:{far_port};\n    location / {{\n      \
             default_type application/json;\n      return 200 '{UPSTREAM_BODY}';\n    }}\n  }}"
        ),
    );
    // nginx as a plain mTLS reverse proxy (core 1): client certificate required and chained
    // to the bundle, Authorization removed, keep-alive to the upstream.
    let ngx_port = free_port();
    let nginx_proxy = nginx(
        "nginx mTLS proxy",
        &dir.join("nginx-proxy"),
        Some(TARGET_CORE),
        ngx_port,
        &format!(
            "  upstream up {{ server 127.0.0.1:{up_port}; keepalive 64; keepalive_requests 100000000; }}\n  \
             server {{\n    listen 127.0.0.1:{ngx_port} ssl;\n    \
             ssl_certificate {pd}/svid.pem;\n    ssl_certificate_key {pd}/key.pem;\n    \
             ssl_client_certificate {b};\n    ssl_verify_client on;\n    ssl_verify_depth 3;\n    \
             ssl_protocols TLSv1.2 TLSv1.3;\n    \
             location / {{\n      proxy_pass http://up;\n      proxy_http_version 1.1;\n      \
             proxy_set_header Connection \"\";\n      proxy_set_header Authorization \"\";\n      \
             proxy_set_header X-Sigil-Spiffe-Id $ssl_client_s_dn;\n    }}\n  }}",
            pd = pdir.display(),
            b = bundle_pem.display(),
        ),
    );

    // (h-n) Two nginx hops, the floor of any two-proxy path on this machine: plain HTTP ->
    // nginx (core 1) with the client's certificate -> pooled mTLS -> (b) -> the upstream.
    // The caller side does not check (b)'s name (its certificate carries only a SPIFFE URI).
    let ngx2_port = free_port();
    let nginx_two = nginx(
        "nginx caller-side proxy",
        &dir.join("nginx-two"),
        Some(TARGET_CORE),
        ngx2_port,
        &format!(
            "  upstream next {{ server 127.0.0.1:{ngx_port}; keepalive 64; keepalive_requests 100000000; }}\n  \
             server {{\n    listen 127.0.0.1:{ngx2_port};\n    \
             location / {{\n      proxy_pass https://next;\n      proxy_http_version 1.1;\n      \
             proxy_set_header Connection \"\";\n      \
             proxy_ssl_certificate {cd}/svid.pem;\n      proxy_ssl_certificate_key {cd}/key.pem;\n      \
             proxy_ssl_trusted_certificate {b};\n      proxy_ssl_session_reuse on;\n    }}\n  }}",
            cd = cdir.display(),
            b = bundle_pem.display(),
        ),
    );

    let proxy_args = |port: u16, audit: &Path, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "proxy",
            "--trust-domain",
            TD,
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--upstream",
            &format!("http://127.0.0.1:{up_port}"),
            "--audience",
            "model-gw",
            "--issuer",
            &s.url(""),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        for (flag, p) in [
            ("--cert", pdir.join("svid.pem")),
            ("--key", pdir.join("key.pem")),
            ("--bundle", bundle_json.clone()),
            ("--policy-dir", policies.clone()),
            ("--audit-log", audit.to_owned()),
        ] {
            a.push(flag.into());
            a.push(p.display().to_string());
        }
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    // The proxies under test: this build's `sigil`, or the binary `SIGIL_BENCH_BIN` names
    // (`scripts/bench-proxy` sets it to the `dist` build, the one we ship).
    let sigil_under_test = std::env::var("SIGIL_BENCH_BIN").ok();
    let sigil = sigil_under_test.as_deref().unwrap_or(common::sigil_bin());
    println!("sigil proxy under test: {sigil}");
    let help = Command::new(sigil)
        .args(["proxy", "--help"])
        .output()
        .unwrap();
    let has_enforce = String::from_utf8_lossy(&help.stdout).contains("--enforce");
    let mtls_port = free_port();
    let mtls_proxy = has_enforce.then(|| {
        spawn(
            "sigil proxy (mtls-only)",
            Some(TARGET_CORE),
            sigil,
            &proxy_args(
                mtls_port,
                &dir.join("audit-mtls.log"),
                &["--enforce", "mtls-only"],
            ),
            &dir.join("proxy-mtls.log"),
        )
        .wait_port(mtls_port)
    });
    let full_port = free_port();
    let audit = dir.join("audit-full.log");
    let full_proxy = spawn(
        "sigil proxy (full)",
        Some(TARGET_CORE),
        sigil,
        &proxy_args(full_port, &audit, &[]),
        &dir.join("proxy-full.log"),
    )
    .wait_port(full_port);
    // Diagnostic: the full path with its audit log on tmpfs, where fdatasync costs nothing —
    // the difference to (d) is what making each decision durable on this disk costs.
    let shm = Path::new("/dev/shm");
    let shm_dir = shm
        .is_dir()
        .then(|| tempfile::tempdir_in(shm).ok())
        .flatten();
    let shm_port = free_port();
    let shm_proxy = shm_dir.as_ref().map(|d| {
        spawn(
            "sigil proxy (full, audit on tmpfs)",
            Some(TARGET_CORE),
            sigil,
            &proxy_args(shm_port, &d.path().join("audit.log"), &[]),
            &dir.join("proxy-shm.log"),
        )
        .wait_port(shm_port)
    });

    // (d-b) = (d) run by a second build (`SIGIL_BENCH_B=<path to sigil>`): an A/B of two
    // builds in the same run, interleaved, so this machine's drift falls on both alike.
    let b_port = free_port();
    let b_proxy = std::env::var_os("SIGIL_BENCH_B").map(|bin| {
        let bin = bin.to_string_lossy().into_owned();
        println!("SIGIL_BENCH_B: (d-b) and (g-b) are run by {bin}");
        spawn(
            "sigil proxy (full, build B)",
            Some(TARGET_CORE),
            &bin,
            &proxy_args(b_port, &dir.join("audit-full-b.log"), &[]),
            &dir.join("proxy-full-b.log"),
        )
        .wait_port(b_port)
    });

    // (f) = (d) with Prometheus metrics served (issue: observability; budget ≤ 5 µs p50).
    let has_metrics = String::from_utf8_lossy(&help.stdout).contains("--metrics-addr");
    let metrics_port = free_port();
    let metrics_listen = format!("127.0.0.1:{}", free_port());
    let metrics_proxy = has_metrics.then(|| {
        spawn(
            "sigil proxy (full, metrics on)",
            Some(TARGET_CORE),
            sigil,
            &proxy_args(
                metrics_port,
                &dir.join("audit-metrics.log"),
                &["--metrics-addr", &metrics_listen],
            ),
            &dir.join("proxy-metrics.log"),
        )
        .wait_port(metrics_port)
    });

    // (h) Two sidecars: this process speaks plain HTTP to a caller-side `sigil proxy`
    // ([outbound], the load generator's own uid), which adds the client's identity (its
    // SVID, an access token it fetches itself) and calls (d) over pooled mTLS, requiring
    // (d)'s exact SPIFFE ID; (d) decides as for any caller. Both sidecars audit the call.
    let out_port = free_port();
    let out_metrics = format!("127.0.0.1:{}", free_port());
    let out_dir = dir.join("outbound");
    let out_policies = out_dir.join("policies");
    std::fs::create_dir_all(&out_policies).unwrap();
    std::fs::write(
        out_policies.join("egress.cedar"),
        format!(
            "{POLICY}\n@id(\"bench-egress\")\npermit (principal in Group::\"factory-floor\", \
             action == Action::\"egress\", resource == Route::\"model\");\n"
        ),
    )
    .unwrap();
    let out_cfg = out_dir.join("outbound.toml");
    std::fs::write(
        &out_cfg,
        format!(
            "trust_domain = \"{TD}\"\nissuer = \"{issuer}\"\n\
             cert = \"{c}/svid.pem\"\nkey = \"{c}/key.pem\"\nbundle = \"{b}\"\n\
             policy_dir = \"{p}\"\naudit_log = \"{a}\"\nmetrics_addr = \"{out_metrics}\"\n\
             [outbound]\nlisten_addr = \"127.0.0.1:{out_port}\"\n\
             [[outbound.routes]]\nname = \"model\"\naddress = \"127.0.0.1:{full_port}\"\n\
             spiffe_id = \"spiffe://{TD}/proxy\"\naudience = \"model-gw\"\n\
             scope = \"model:invoke\"\ndefault = true\n",
            issuer = s.url(""),
            c = cdir.display(),
            b = bundle_json.display(),
            p = out_policies.display(),
            a = out_dir.join("audit.log").display(),
        ),
    )
    .unwrap();
    let out_proxy = spawn(
        "sigil proxy (outbound)",
        Some(TARGET_CORE),
        sigil,
        &[
            "proxy".into(),
            "--config".into(),
            out_cfg.display().to_string(),
        ],
        &dir.join("proxy-outbound.log"),
    )
    .wait_port(out_port);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_idle = rss_mib(full_proxy.pid());
        let rss_idle_mtls = mtls_proxy.as_ref().map(|p| rss_mib(p.pid()));
        let rss_idle_nginx = rss_mib(nginx_proxy.pid());
        let token = fetch_token(s.port, &tls).await;
        let auth = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();

        let target = |key, label, port, pid| Target {
            key,
            label,
            port,
            tls: Some(tls.clone()),
            pid,
            upstream_pid: upstream.pid(),
            tool: false,
        };
        let mut targets = vec![Target {
            tls: None,
            ..target(
                "direct",
                "(a) direct to the upstream (plain HTTP)",
                up_port,
                upstream.pid(),
            )
        }];
        targets.push(Target {
            tls: None,
            ..target(
                "direct_cross_core",
                "(a2) direct, upstream on core 1 (diagnostic)",
                far_port,
                far_upstream.pid(),
            )
        });
        targets.push(target(
            "nginx_mtls",
            "(b) nginx mTLS reverse proxy",
            ngx_port,
            nginx_proxy.pid(),
        ));
        if let Some(p) = &mtls_proxy {
            targets.push(target(
                "sigil_mtls_only",
                "(c) sigil proxy, mTLS only",
                mtls_port,
                p.pid(),
            ));
        }
        let full_t = target(
            "sigil_full",
            "(d) sigil proxy, token + policy + audit",
            full_port,
            full_proxy.pid(),
        );
        targets.push(full_t.clone());
        targets.push(Target {
            key: "sigil_full_tool",
            label: "(g) = (d), MCP tools/call (durable first)",
            tool: true,
            ..full_t.clone()
        });
        if let Some(p) = &b_proxy {
            let b = target(
                "sigil_full_b",
                "(d-b) = (d), run by build B",
                b_port,
                p.pid(),
            );
            targets.push(b.clone());
            targets.push(Target {
                key: "sigil_full_tool_b",
                label: "(g-b) = (g), run by build B",
                tool: true,
                ..b
            });
        }
        if let Some(p) = &shm_proxy {
            let shm = target(
                "sigil_full_audit_tmpfs",
                "(e) = (d), audit log on tmpfs (diagnostic)",
                shm_port,
                p.pid(),
            );
            targets.push(shm.clone());
            targets.push(Target {
                key: "sigil_full_tool_audit_tmpfs",
                label: "(e-g) = (g), audit log on tmpfs (diagnostic)",
                tool: true,
                ..shm
            });
        }

        if let Some(p) = &metrics_proxy {
            targets.push(target(
                "sigil_full_metrics",
                "(f) = (d), Prometheus metrics on",
                metrics_port,
                p.pid(),
            ));
        }

        targets.push(Target {
            tls: None,
            ..target(
                "two_nginx",
                "(h-n) plain HTTP -> nginx -> mTLS -> (b): two nginx hops",
                ngx2_port,
                nginx_two.pid(),
            )
        });
        targets.push(Target {
            tls: None,
            ..target(
                "two_sidecars",
                "(h) plain HTTP -> outbound sidecar -> (d)",
                out_port,
                out_proxy.pid(),
            )
        });

        if let Ok(only) = std::env::var("SIGIL_BENCH_ONLY") {
            let keep: Vec<&str> = only.split(',').map(str::trim).collect();
            targets.retain(|t| t.key == "direct" || keep.contains(&t.key));
            println!("SIGIL_BENCH_ONLY: measuring only direct and {only}");
        }
        println!("proxy_load: N={n} sequential requests on 1 keep-alive connection per target, in 10 rounds interleaved across targets (after a warm-up of {}),", (n / 10).max(500));
        println!("  then {conns} keep-alive connections for {secs} s (after 1 s of warm-up); POST /v1/chat/completions, {} B body, Bearer token always sent", BODY.len());
        println!(
            "  cores: load generator (this process, pid {me}, affinity {}) + upstream nginx (affinity {}) + sigil server on core 0;",
            affinity(me),
            affinity(upstream.pid())
        );
        println!(
            "  under test on core {TARGET_CORE}: nginx proxy (affinity {}, 1 process), sigil proxy full (affinity {}, threads: {})",
            affinity(nginx_proxy.pid()),
            affinity(full_proxy.pid()),
            threads(full_proxy.pid())
        );
        for (name, p) in [
            ("mtls-only", &mtls_proxy),
            ("audit on tmpfs", &shm_proxy),
            ("metrics on", &metrics_proxy),
        ] {
            if let Some(p) = p {
                println!(
                    "  under test on core {TARGET_CORE}: sigil proxy {name} (affinity {}, threads: {})",
                    affinity(p.pid()),
                    threads(p.pid())
                );
            }
        }
        if mtls_proxy.is_none() {
            println!("  (c) skipped: this sigil has no `proxy --enforce` flag yet");
        }
        println!("  load average at start: {}", loadavg.trim());
        // One flush on the audit log's disk, measured in this run: what the tool-call budget
        // (mTLS-only + one flush + 40 µs) allows for making the record durable first.
        let (flush_p50, flush_p99) = flush_cost(dir, 2000, Duration::ZERO);
        println!(
            "  one flush on the audit log's disk (300 B append + fdatasync, n=2000): p50 {flush_p50:.0} µs, p99 {flush_p99:.0} µs"
        );

        let mut all: Vec<Figures> = targets
            .iter()
            .map(|t| Figures {
                target: t.key.into(),
                label: t.label.into(),
                ..Default::default()
            })
            .collect();
        // The outbound sidecar's handshakes to (d), the calls it made (its audit records), and
        // its audit syncs (records / syncs is the group commit's batch size).
        let counters_at = |addr: &str| Counters {
            handshakes: scrape_counter(addr, "sigil_proxy_outbound_connections"),
            calls: scrape_counter(addr, "sigil_proxy_audit_records_total") as usize,
            syncs: scrape_counter(addr, "sigil_proxy_audit_syncs_total"),
        };
        let counters = || counters_at(&out_metrics);
        let at_start = counters();
        latency(&targets, &auth, n, &mut all).await;
        eprintln!("  done: latency");
        let after_latency = counters();
        for (t, f) in targets.iter().zip(all.iter_mut()) {
            // (f) serves /metrics: its audit records and syncs in the window give the group
            // commit's batch size under this load (the same proxy as (d) otherwise).
            let before =
                (t.key == "sigil_full_metrics").then(|| counters_at(&metrics_listen));
            throughput(t, &auth, conns, secs, f).await;
            if let Some(before) = before {
                let d = counters_at(&metrics_listen).since(&before);
                println!(
                    "  (f) audit at {conns} connections: {:.0} syncs for {} records ({:.1} per sync, warm-up included)",
                    d.syncs,
                    d.calls,
                    d.per_sync()
                );
            }
            eprintln!(
                "  done: {:<44} p50 {:.0} µs, {:.0} req/s",
                t.label, f.p50_us, f.req_per_s
            );
        }
        // What the outbound sidecar did in each phase, and on how many client connections.
        let phases = [
            ("1 client connection".to_owned(), after_latency.since(&at_start)),
            (
                format!("{conns} client connections"),
                counters().since(&after_latency),
            ),
        ];
        let [(_, lat), (_, thr)] = &phases;
        let mut outbound = serde_json::json!({
            "latency_phase": lat.json(),
            "throughput_phase": thr.json(),
        });
        outbound["throughput_phase"]["connections"] = conns.into();
        let rss_after = rss_mib(full_proxy.pid());
        let (rss_hold, rss_closed, rss_closed_late) =
            rss_with_connections(&full_t, &auth, hold, full_proxy.pid(), true).await;
        let hwm = proc_status(full_proxy.pid(), "VmHWM:") as f64 / 1024.0;
        let rss_hold_nginx = match targets.iter().find(|t| t.key == "nginx_mtls") {
            Some(t) => rss_with_connections(t, &auth, hold, nginx_proxy.pid(), false)
                    .await
                    .0,
            None => 0.0,
        };
        let audit_lines = std::fs::read_to_string(&audit)
            .map(|t| t.lines().count())
            .unwrap_or(0);

        let direct = all[0].clone();
        // One flush again, after as long an idle time as each request of the latency test
        // leaves between its flushes (the direct call's p50: one upstream call).
        let gap = Duration::from_secs_f64(direct.p50_us / 1e6);
        let (paced_p50, paced_p99) = flush_cost(dir, 1000, gap);
        println!(
            "one flush at the latency test's cadence (after {:.0} µs idle, n=1000): p50 {paced_p50:.0} µs, p99 {paced_p99:.0} µs",
            direct.p50_us
        );
        println!();
        println!(
            "{:<44} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>7} {:>10} {:>6} {:>6} {:>6}",
            "target (latency: 1 conn; throughput: C conns)",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "max µs",
            "+p50",
            "+p99",
            "req/s",
            "ld p50",
            "ld p99",
            "cpu µs/req",
            "core%",
            "gen%",
            "up%"
        );
        for f in &all {
            println!(
                "{:<44} {:>7.0} {:>7.0} {:>7.0} {:>7.0} {:>7.0} {:>7.0} {:>8.0} {:>7.0} {:>7.0} {:>10.1} {:>6.0} {:>6.0} {:>6.0}",
                f.label,
                f.p50_us,
                f.p90_us,
                f.p99_us,
                f.max_us,
                f.p50_us - direct.p50_us,
                f.p99_us - direct.p99_us,
                f.req_per_s,
                f.loaded_p50_us,
                f.loaded_p99_us,
                f.target_cpu_us_per_req,
                f.target_cpu_pct,
                f.loadgen_cpu_pct,
                f.upstream_cpu_pct
            );
        }
        println!(
            "(+p50/+p99: added over (a); req/s with C={conns}; ld p50/p99: latency under that load; \
             cpu µs/req and core%: CPU of the process under test during the throughput window \
             (for (a): the upstream); gen%, up%: this load generator's and the upstream's CPU, both on core 0)"
        );
        println!();
        let rss_mtls = rss_idle_mtls.map_or("n/a".into(), |r| format!("{r:.1} MiB"));
        println!(
            "RSS: sigil proxy (full) idle {rss_idle:.1} MiB, after the load {rss_after:.1} MiB, \
             with {hold} open mTLS connections {rss_hold:.1} MiB (peak {hwm:.1} MiB), \
             2 s after they closed {rss_closed:.1} MiB, 12 s after {rss_closed_late:.1} MiB; \
             sigil proxy (mtls-only) idle {rss_mtls}; nginx proxy idle {rss_idle_nginx:.1} MiB, \
             with {hold} connections {rss_hold_nginx:.1} MiB"
        );
        println!("audit records written by the full-path proxy: {audit_lines}");
        let each = |line: fn(&str, &Counters) -> String| {
            phases
                .iter()
                .map(|(on, p)| line(on, p))
                .collect::<Vec<_>>()
                .join("; ")
        };
        println!(
            "outbound sidecar -> (d) mTLS handshakes: {}",
            each(|on, p| format!(
                "{:.0} for {} calls on {on} ({:.2} per 1,000)",
                p.handshakes,
                p.calls,
                p.per_1000()
            ))
        );
        println!(
            "outbound sidecar audit: {}",
            each(|on, p| format!(
                "{:.0} syncs for {} records on {on} ({:.1} per sync)",
                p.syncs,
                p.calls,
                p.per_sync()
            ))
        );
        let find = |k: &str| all.iter().find(|f| f.target == k);
        let met = |ok: bool| if ok { "met" } else { "MISSED" };
        if let (Some(two), Some(full)) = (find("two_sidecars"), find("sigil_full")) {
            let (d50, d99) = (two.p50_us - direct.p50_us, two.p99_us - direct.p99_us);
            println!(
                "budgets: two sidecars add p50 {d50:.0} µs (≤ 300: {}), p99 {d99:.0} µs (≤ 1500: {}); \
                 the outbound hop alone (h - d): p50 {:.0} µs, p99 {:.0} µs",
                met(d50 <= 300.0),
                met(d99 <= 1500.0),
                two.p50_us - full.p50_us,
                two.p99_us - full.p99_us,
            );
        }
        // The proxy round-2 budgets, over mTLS-only in the same run.
        if let Some(mtls) = find("sigil_mtls_only") {
            let mut parts = Vec::new();
            if let Some(d) = find("sigil_full") {
                let over = d.p50_us - mtls.p50_us;
                parts.push(format!(
                    "model call (d) - (c) p50 {over:.0} µs (≤ 40: {})",
                    met(over <= 40.0)
                ));
            }
            if let Some(g) = find("sigil_full_tool") {
                let over = g.p50_us - mtls.p50_us;
                parts.push(format!(
                    "tool call (g) - (c) p50 {over:.0} µs (≤ one flush + 40 = {:.0} at the \
                     test's cadence: {}; {:.0} back to back: {})",
                    paced_p50 + 40.0,
                    met(over <= paced_p50 + 40.0),
                    flush_p50 + 40.0,
                    met(over <= flush_p50 + 40.0),
                ));
            }
            if let (Some(d), Some(b)) = (find("sigil_full"), find("nginx_mtls")) {
                let share = d.req_per_s / b.req_per_s * 100.0;
                parts.push(format!(
                    "(d) throughput {share:.0} % of nginx mTLS (≥ 75: {})",
                    met(share >= 75.0)
                ));
            }
            println!("budgets: {}", parts.join("; "));
        }
        if let Some(full) = find("sigil_full") {
            let (d50, d99) = (full.p50_us - direct.p50_us, full.p99_us - direct.p99_us);
            println!(
                "budgets: full path adds p50 {d50:.0} µs (≤ 150: {}), p99 {d99:.0} µs (≤ 1000: {}); \
                 {:.0} authorized req/s on one core (≥ 15000: {}); idle RSS {rss_idle:.1} MiB (≤ 20: {})",
                met(d50 <= 150.0),
                met(d99 <= 1000.0),
                full.req_per_s,
                met(full.req_per_s >= 15_000.0),
                met(rss_idle <= 20.0),
            );
        }
        let json = serde_json::json!({
            "n": n, "conns": conns, "secs": secs, "loadavg_at_start": loadavg.trim(),
            "targets": all,
            "rss_mib": {
                "sigil_full_idle": rss_idle, "sigil_full_after_load": rss_after,
                "sigil_full_with_connections": rss_hold, "sigil_full_peak": hwm,
                "sigil_full_after_close": rss_closed,
                "sigil_full_12s_after_close": rss_closed_late,
                "sigil_mtls_only_idle": rss_idle_mtls, "nginx_idle": rss_idle_nginx,
                "nginx_with_connections": rss_hold_nginx, "connections": hold,
            },
            "audit_records": audit_lines,
            "outbound_handshakes": outbound,
            "flush_us": {"p50": flush_p50, "p99": flush_p99},
            "flush_paced_us": {"p50": paced_p50, "p99": paced_p99, "gap_us": direct.p50_us},
        });
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("proxy_load.json");
        std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
        println!("JSON: {}", path.display());
    });
    drop(out_proxy);
    drop(full_proxy);
    drop(shm_proxy);
    drop(shm_dir);
    drop(mtls_proxy);
    drop(nginx_proxy);
    drop(far_upstream);
    drop(upstream);
}
