//! The evaluation report: per run and system, then means and standard deviations over
//! runs, beside the paper's figures; Markdown and JSON.
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::bench::{KindReport, percentile};
use super::traffic::{Attack, Counts};

/// One system in one run.
#[derive(Debug, Clone, Serialize)]
pub(super) struct SystemRun {
    pub(super) system: &'static str,
    pub(super) run: usize,
    pub(super) counts: Counts,
    pub(super) adversarial_sent: usize,
    pub(super) adversarial_blocked: usize,
    pub(super) blocked_fraction: f64,
    pub(super) benign_refused: usize,
    pub(super) benign_success_fraction: f64,
    pub(super) latency_ms: Latency,
    /// CPU seconds of the enforcement processes over the traffic phase.
    pub(super) enforcement_cpu_secs: f64,
    /// The same as a share of the machine (all cores) over the traffic phase.
    pub(super) enforcement_cpu_utilization: f64,
    /// CPU time per 1,000 requests, ms.
    pub(super) enforcement_cpu_ms_per_1000: f64,
    /// The whole machine's utilization over the traffic phase (load generator, model
    /// servers and everything else included).
    pub(super) machine_utilization: f64,
    pub(super) bytes_per_request: f64,
    pub(super) propagation: Option<KindReport>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct Latency {
    pub(super) mean: f64,
    pub(super) p50: f64,
    pub(super) p95: f64,
    pub(super) p99: f64,
}

impl SystemRun {
    pub(super) fn new(
        system: &'static str,
        run: usize,
        mut counts: Counts,
        cpu_secs: f64,
        machine_utilization: f64,
        cores: usize,
        propagation: Option<KindReport>,
    ) -> Self {
        let adversarial_sent: usize = counts.classes.values().map(|c| c.sent).sum();
        let adversarial_blocked: usize = counts.classes.values().map(|c| c.blocked).sum();
        let benign_refused = counts.benign_sent.saturating_sub(counts.benign_ok);
        counts.latencies_us.sort_by(f64::total_cmp);
        let ms: Vec<f64> = counts.latencies_us.iter().map(|u| u / 1000.0).collect();
        let latency_ms = Latency {
            mean: if ms.is_empty() {
                0.0
            } else {
                ms.iter().sum::<f64>() / ms.len() as f64
            },
            p50: percentile(&ms, 50.0),
            p95: percentile(&ms, 95.0),
            p99: percentile(&ms, 99.0),
        };
        let secs = counts.traffic_secs.max(1e-9);
        let requests = (counts.benign_sent + adversarial_sent).max(1) as f64;
        Self {
            system,
            run,
            adversarial_sent,
            adversarial_blocked,
            blocked_fraction: ratio(adversarial_blocked, adversarial_sent),
            benign_refused,
            benign_success_fraction: ratio(counts.benign_ok, counts.benign_sent),
            latency_ms,
            enforcement_cpu_secs: cpu_secs,
            enforcement_cpu_utilization: cpu_secs / (secs * cores.max(1) as f64),
            enforcement_cpu_ms_per_1000: cpu_secs * 1000.0 / requests * 1000.0,
            machine_utilization,
            bytes_per_request: counts.wire_bytes as f64 / counts.http_requests.max(1) as f64,
            propagation,
            counts,
        }
    }

    pub(super) fn one_line(&self) -> String {
        format!(
            "  run {} {:<6}: blocked {}/{} adversarial, {} benign refused of {}, p50 {:.2} ms, \
             p99 {:.2} ms, enforcement CPU {:.1}% of the machine, {:.0} B/request{}",
            self.run,
            self.system,
            self.adversarial_blocked,
            self.adversarial_sent,
            self.benign_refused,
            self.counts.benign_sent,
            self.latency_ms.p50,
            self.latency_ms.p99,
            self.enforcement_cpu_utilization * 100.0,
            self.bytes_per_request,
            self.propagation
                .as_ref()
                .map(|p| format!(
                    ", propagation p50 {:.1} ms p99 {:.1} ms, {}/{} delivered",
                    p.p50_ms, p.p99_ms, p.delivered, p.changes
                ))
                .unwrap_or_default()
        )
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// Mean and (sample) standard deviation.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(super) struct Stat {
    pub(super) mean: f64,
    pub(super) sd: f64,
}

fn stat(v: &[f64]) -> Stat {
    if v.is_empty() {
        return Stat::default();
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 {
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    Stat { mean, sd }
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct ClassSummary {
    pub(super) class: &'static str,
    pub(super) attack_model: &'static str,
    /// system → (blocked, sent), summed over runs.
    pub(super) by_system: BTreeMap<&'static str, (usize, usize)>,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct SystemSummary {
    pub(super) system: &'static str,
    pub(super) blocked_pct: Stat,
    pub(super) benign_refused: Stat,
    pub(super) benign_success_pct: Stat,
    pub(super) latency_mean_ms: Stat,
    pub(super) latency_p50_ms: Stat,
    pub(super) latency_p95_ms: Stat,
    pub(super) latency_p99_ms: Stat,
    pub(super) enforcement_cpu_pct: Stat,
    pub(super) enforcement_cpu_ms_per_1000: Stat,
    pub(super) machine_cpu_pct: Stat,
    pub(super) bytes_per_request: Stat,
    pub(super) propagation_p50_ms: Option<Stat>,
    pub(super) propagation_p99_ms: Option<Stat>,
    pub(super) propagation_max_ms: Option<f64>,
    pub(super) changes_delivered: Option<(usize, usize)>,
}

pub(super) struct Params {
    pub(super) command: String,
    pub(super) nodes: usize,
    pub(super) requests: usize,
    pub(super) adversarial: f64,
    pub(super) runs_n: usize,
    pub(super) rate: f64,
    /// Which model server ran.
    pub(super) model: String,
    pub(super) link_failures: f64,
    pub(super) policy_changes: usize,
    pub(super) systems: Vec<&'static str>,
    pub(super) setup_secs: f64,
    pub(super) fleet_setup_secs: f64,
    pub(super) total_secs: f64,
    pub(super) runs: Vec<SystemRun>,
}

#[derive(Debug, Serialize)]
pub(super) struct Report {
    pub(super) command: String,
    pub(super) machine: Machine,
    pub(super) nodes: usize,
    pub(super) requests_per_run: usize,
    pub(super) adversarial_share: f64,
    pub(super) runs: usize,
    pub(super) offered_rate_per_sec: f64,
    pub(super) model: String,
    pub(super) link_failures_per_agent_per_minute: f64,
    pub(super) policy_changes_per_run: usize,
    pub(super) setup_secs: f64,
    pub(super) fleet_setup_secs: f64,
    pub(super) total_secs: f64,
    pub(super) summary: Vec<SystemSummary>,
    pub(super) classes: Vec<ClassSummary>,
    pub(super) per_run: Vec<SystemRun>,
}

#[derive(Debug, Serialize)]
pub(super) struct Machine {
    pub(super) cpu: String,
    pub(super) cores: usize,
    pub(super) memory_gib: f64,
    pub(super) kernel: String,
    pub(super) sigil_build: &'static str,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib: mem_kib / 1024.0 / 1024.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        sigil_build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    }
}

impl Report {
    pub(super) fn new(p: Params) -> Self {
        let mut summary = Vec::new();
        for &system in &p.systems {
            let mine: Vec<&SystemRun> = p.runs.iter().filter(|r| r.system == system).collect();
            let f = |g: &dyn Fn(&SystemRun) -> f64| {
                stat(&mine.iter().map(|r| g(r)).collect::<Vec<_>>())
            };
            let props: Vec<&KindReport> =
                mine.iter().filter_map(|r| r.propagation.as_ref()).collect();
            summary.push(SystemSummary {
                system,
                blocked_pct: f(&|r| r.blocked_fraction * 100.0),
                benign_refused: f(&|r| r.benign_refused as f64),
                benign_success_pct: f(&|r| r.benign_success_fraction * 100.0),
                latency_mean_ms: f(&|r| r.latency_ms.mean),
                latency_p50_ms: f(&|r| r.latency_ms.p50),
                latency_p95_ms: f(&|r| r.latency_ms.p95),
                latency_p99_ms: f(&|r| r.latency_ms.p99),
                enforcement_cpu_pct: f(&|r| r.enforcement_cpu_utilization * 100.0),
                enforcement_cpu_ms_per_1000: f(&|r| r.enforcement_cpu_ms_per_1000),
                machine_cpu_pct: f(&|r| r.machine_utilization * 100.0),
                bytes_per_request: f(&|r| r.bytes_per_request),
                propagation_p50_ms: (!props.is_empty())
                    .then(|| stat(&props.iter().map(|k| k.p50_ms).collect::<Vec<_>>())),
                propagation_p99_ms: (!props.is_empty())
                    .then(|| stat(&props.iter().map(|k| k.p99_ms).collect::<Vec<_>>())),
                propagation_max_ms: props.iter().map(|k| k.max_ms).reduce(f64::max),
                changes_delivered: (!props.is_empty()).then(|| {
                    (
                        props.iter().map(|k| k.delivered).sum(),
                        props.iter().map(|k| k.changes).sum(),
                    )
                }),
            });
        }
        let classes = Attack::ALL
            .iter()
            .map(|a| {
                let mut by_system = BTreeMap::new();
                for r in &p.runs {
                    let c = r.counts.classes.get(a.name());
                    let e = by_system.entry(r.system).or_insert((0usize, 0usize));
                    e.0 += c.map_or(0, |c| c.blocked);
                    e.1 += c.map_or(0, |c| c.sent);
                }
                ClassSummary {
                    class: a.name(),
                    attack_model: a.model(),
                    by_system,
                }
            })
            .collect();
        Report {
            command: p.command,
            machine: machine(),
            nodes: p.nodes,
            requests_per_run: p.requests,
            adversarial_share: p.adversarial,
            runs: p.runs_n,
            offered_rate_per_sec: p.rate,
            model: format!(
                "{} behind a recording server per node, with an MCP tool endpoint",
                p.model
            ),
            link_failures_per_agent_per_minute: p.link_failures,
            policy_changes_per_run: p.policy_changes,
            setup_secs: p.setup_secs,
            fleet_setup_secs: p.fleet_setup_secs,
            total_secs: p.total_secs,
            summary,
            classes,
            per_run: p.runs,
        }
    }

    fn sys(&self, name: &str) -> Option<&SystemSummary> {
        self.summary.iter().find(|s| s.system == name)
    }

    pub(super) fn markdown(&self) -> String {
        let mut o = String::new();
        let m = &self.machine;
        let _ = writeln!(o, "# Evaluation: the paper's Table 1 on real processes\n");
        let _ = writeln!(
            o,
            "Generated by `sigil eval`; do not edit by hand. Reproduce with:\n\n```\n{}\n```\n",
            self.command
        );
        let _ = writeln!(
            o,
            "{} nodes; {} requests per run and system, {:.0}% adversarial; {} runs (mean ± \
             standard deviation over runs); offered load {:.0} requests/s (open loop); model: {}; \
             agent uplink failures: {}. Machine: {} ({} cores, {:.1} GiB, Linux {}), sigil {} \
             build, unpinned, default threads, data on the local disk. Setup {:.1} s (fleet \
             {:.1} s), whole evaluation {:.1} s.\n",
            self.nodes,
            self.requests_per_run,
            self.adversarial_share * 100.0,
            self.runs,
            self.offered_rate_per_sec,
            self.model,
            if self.link_failures_per_agent_per_minute > 0.0 {
                format!(
                    "{} per agent per minute, 5 s each",
                    self.link_failures_per_agent_per_minute
                )
            } else {
                "none".into()
            },
            m.cpu,
            m.cores,
            m.memory_gib,
            m.kernel,
            m.sigil_build,
            self.setup_secs,
            self.fleet_setup_secs,
            self.total_secs,
        );
        let names: Vec<&str> = self.summary.iter().map(|s| s.system).collect();
        let _ = write!(o, "| metric | paper: baseline | paper: zero trust |");
        for n in &names {
            let _ = write!(o, " {} |", label(n));
        }
        let _ = write!(o, "\n| --- | --- | --- |");
        for _ in &names {
            let _ = write!(o, " --- |");
        }
        o.push('\n');
        let row = |o: &mut String,
                   metric: &str,
                   base: &str,
                   zt: &str,
                   f: &dyn Fn(&SystemSummary) -> String| {
            let _ = write!(o, "| {metric} | {base} | {zt} |");
            for s in &self.summary {
                let _ = write!(o, " {} |", f(s));
            }
            o.push('\n');
        };
        row(&mut o, "unauthorized access blocked", "32%", "98%", &|s| {
            pct(s.blocked_pct)
        });
        row(
            &mut o,
            "benign requests refused (per run)",
            "n/a",
            "n/a",
            &|s| {
                format!(
                    "{:.1} ({:.2}% served)",
                    s.benign_refused.mean, s.benign_success_pct.mean
                )
            },
        );
        row(
            &mut o,
            "inference latency, mean",
            "45.2 ms",
            "52.7 ms",
            &|s| ms(s.latency_mean_ms),
        );
        row(&mut o, "latency p50", "", "", &|s| ms(s.latency_p50_ms));
        row(&mut o, "latency p95", "", "", &|s| ms(s.latency_p95_ms));
        row(&mut o, "latency p99", "", "", &|s| ms(s.latency_p99_ms));
        row(
            &mut o,
            "CPU of the enforcement processes (share of the machine)",
            "60.3%",
            "68.9%",
            &|s| {
                format!(
                    "{} ({:.1} ms per 1,000 requests)",
                    pct(s.enforcement_cpu_pct),
                    s.enforcement_cpu_ms_per_1000.mean
                )
            },
        );
        row(&mut o, "CPU of the whole machine", "", "", &|s| {
            pct(s.machine_cpu_pct)
        });
        row(
            &mut o,
            "bytes on the wire per request",
            "1.2 kB",
            "1.5 kB",
            &|s| {
                format!(
                    "{:.0} B ± {:.0}",
                    s.bytes_per_request.mean, s.bytes_per_request.sd
                )
            },
        );
        row(
            &mut o,
            "policy propagation to every node, p50 / p99 / max",
            "n/a",
            "120 ms (50 nodes), 180 ms (200)",
            &|s| match (
                s.propagation_p50_ms,
                s.propagation_p99_ms,
                s.propagation_max_ms,
            ) {
                (Some(a), Some(b), Some(c)) => {
                    format!("{:.1} / {:.1} / {:.1} ms", a.mean, b.mean, c)
                }
                _ => "n/a (static configuration)".into(),
            },
        );
        row(
            &mut o,
            "policy changes delivered",
            "n/a",
            "97%",
            &|s| match s.changes_delivered {
                Some((d, n)) => format!("{d}/{n} ({:.1}%)", ratio(d, n) * 100.0),
                None => "n/a".into(),
            },
        );
        if let (Some(s), Some(b)) = (self.sys("sigil"), self.sys("static")) {
            let _ = writeln!(
                o,
                "\nAdded latency of sigil over the static baseline: {:+.3} ms p50, {:+.3} ms mean \
                 (paper: +7.5 ms mean).",
                s.latency_p50_ms.mean - b.latency_p50_ms.mean,
                s.latency_mean_ms.mean - b.latency_mean_ms.mean
            );
            if let Some(e) = self.sys("envoy") {
                let _ = writeln!(
                    o,
                    "Envoy over the static baseline: {:+.3} ms p50; sigil over Envoy: {:+.3} ms p50.",
                    e.latency_p50_ms.mean - b.latency_p50_ms.mean,
                    s.latency_p50_ms.mean - e.latency_p50_ms.mean
                );
            }
        }
        let _ = writeln!(o, "\n## Blocked per attack class (all runs)\n");
        let _ = write!(o, "| class | attack model |");
        for n in &names {
            let _ = write!(o, " {} |", label(n));
        }
        let _ = write!(o, "\n| --- | --- |");
        for _ in &names {
            let _ = write!(o, " --- |");
        }
        o.push('\n');
        for c in &self.classes {
            let _ = write!(o, "| {} | {} |", c.class, c.attack_model);
            for n in &names {
                let (b, s) = c.by_system.get(n).copied().unwrap_or((0, 0));
                let _ = write!(o, " {b}/{s} ({:.0}%) |", ratio(b, s) * 100.0);
            }
            o.push('\n');
        }
        let _ = writeln!(o, "\n## Per run\n");
        for r in &self.per_run {
            let _ = writeln!(
                o,
                "-{}",
                r.one_line()
                    .trim_start_matches(' ')
                    .replacen("run", " run", 1)
            );
        }
        o.push_str(METHOD);
        o
    }
}

fn label(system: &str) -> &'static str {
    match system {
        "static" => "static keys + IP allow-list (nginx)",
        "envoy" => "Istio-style sidecar (Envoy: mTLS, jwt_authn, RBAC)",
        _ => "sigil",
    }
}

fn pct(s: Stat) -> String {
    format!("{:.1}% ± {:.1}", s.mean, s.sd)
}

fn ms(s: Stat) -> String {
    format!("{:.3} ms ± {:.3}", s.mean, s.sd)
}

const METHOD: &str = r#"
## How it is measured

- **Fleet.** One process hosts a real trust authority (embedded SQLite), N node agents (each
  joined with its own join token, its own data directory and Workload API socket) and N
  `sigil proxy` sidecars (each taking its SVID, signed policy bundles and revocations from
  its node's agent), on their own runtime; N model servers (the built-in demo model and an
  MCP tool endpoint) and the load generator run beside them. Node i is in group
  `factory-floor`, `maintenance` or `planning` (i mod 3); each group may invoke one model,
  and only `factory-floor` may call the tool `read_sensor`. Workload i calls the sidecar of
  node i or i+1 with its own X.509-SVID over mTLS and a certificate-bound access token
  from the authority (OAuth2 client credentials).
- **Baselines, same model servers, same plan.** *Static*: nginx on each node's port, one
  fleet-wide API key checked on every request, an IP allow-list of loopback (where every
  caller is), no TLS identity. *Envoy* (what a team would deploy today): one Envoy process
  with a listener per node: mTLS requiring a client SVID of the trust domain (same
  authority), `jwt_authn` on the authority's access tokens (signature, issuer, audience,
  expiry, from its JWKS), RBAC allowing the fleet's workload principals on `/v1/` and
  `/mcp`. Its configuration is static: it cannot see revocations, risk, or the model or tool
  named inside a JSON body, and it does not check a token's certificate binding.
- **Attack classes** (each adversarial request must not reach a model server):
  token-replay (a token captured from a workload of another group, sent with the attacker's
  own valid certificate, to that group's model); revoked-credential (a workload whose SVID
  was revoked before the run, with the token it held); expired-token (correctly signed,
  bound, expired); forged-token (groups altered under the original signature, or signed by
  a key the authority never published; static: a guessed key); lateral-model and
  lateral-tool (a valid workload calling a model or tool its policy does not allow);
  no-identity (no certificate, no token or key); spoofed-headers (`x-sigil-spiffe-id`,
  `X-Forwarded-Client-Cert`, `X-Forwarded-For` claiming another group's workload);
  stale-policy and tampered-policy (sigil: an older signed bundle, and a bundle altered to
  allow everything under the original signature, offered to a node's agent: blocked when
  refused and the agent still enforces what it had; baselines: whether the server accepts
  an altered configuration file, checked with `nginx -t` and `envoy --mode validate`:
  neither configuration carries a signature); risk-revoked (at the midpoint one workload's
  node risk rises: sigil quarantines it, and its later requests must fail; the baselines
  have no such signal). With the static key, every attack that holds the key (replay,
  revoked, expired, lateral, spoofed, risk) is let through by construction: that is the
  baseline's point.
- **Ground truth.** Every request carries a number; each model server records the numbers
  that reach it. An adversarial request is blocked exactly when its number never arrived; a
  benign request succeeded when it was answered 2xx and arrived.
- **Latency**: benign requests, from the load generator's send to the whole answer read,
  keep-alive connections per caller and node. **CPU**: the enforcement processes' CPU time
  over the traffic phase (sigil: the threads of the authority, agents and sidecars;
  nginx: master and workers; Envoy: its process) as a share of all cores, and the whole
  machine's from /proc/stat. **Bytes**: counted at the load generator's sockets, both
  directions, TLS handshakes included, divided by the HTTP requests sent (tokens are
  fetched once per run and workload, not counted). **Propagation**: after each sigil run,
  policy changes are pushed one at a time through the admin API; the time is from the
  push call's start to the last of the N proxies enforcing the new revision (polled every
  millisecond), a change counts as delivered when every proxy has it within 30 s. The
  fleet shares one process: each agent and proxy verifies the bundle and flushes its own
  state, while compiling the policy text (a pure function of it) is done once per process
  and shared, as N separate devices would compile side by side.
- **Link failures** (`--link-failures R`): each agent reaches the authority through a TCP
  relay; every second each relay is cut with probability R/60 for 5 s (open connections
  closed, new ones refused), through the traffic and the propagation phases. Agents serve
  from their caches meanwhile and reconnect with backoff; a quarantine or policy change
  that has not reached a proxy when its requests arrive counts against sigil.
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_mean_and_sample_deviation() {
        let s = stat(&[1.0, 2.0, 3.0]);
        assert!((s.mean - 2.0).abs() < 1e-9 && (s.sd - 1.0).abs() < 1e-9);
        assert_eq!(stat(&[]).mean, 0.0);
        assert_eq!(stat(&[5.0]).sd, 0.0);
    }
}
