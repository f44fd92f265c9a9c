//! The command-line interface: one module per subcommand group.
pub(crate) mod admin;
mod agent;
mod audit;
mod bench;
mod bench_anomaly;
mod demo_model;
mod dev;
mod eval;
mod log;
mod model;
mod policy;
mod proxy;
mod secret;
mod server;
mod status;
mod tpm;
mod workload;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// The default data directory of `sigil server`.
pub const DEFAULT_SERVER_DIR: &str = "/var/lib/sigil/server";

/// sigil: zero-trust identity and authorization for local AI agents and model servers.
#[derive(Debug, Parser)]
#[command(name = "sigil", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the trust authority.
    Server(server::ServerArgs),
    /// Run the node agent (SPIFFE Workload API for local workloads).
    Agent(agent::AgentArgs),
    /// Run the sidecar enforcer in front of a model or tool server.
    Proxy(proxy::ProxyArgs),
    /// Validate Cedar policies against sigil's schema.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Read and verify a proxy's audit segment.
    #[command(subcommand)]
    Audit(audit::AuditCmd),
    /// Verify and search the server's transparency log.
    #[command(subcommand)]
    Log(log::LogCmd),
    /// Talk to the SPIFFE Workload API as a workload would.
    #[command(subcommand)]
    Workload(workload::WorkloadCmd),
    /// Ask a running server, agent or proxy (its --metrics-addr) whether it is ready.
    Status(status::StatusArgs),
    /// Run everything on loopback with embedded defaults, for a first look.
    Dev(dev::DevArgs),
    /// Run a small built-in OpenAI-compatible model server (plain HTTP), for demos.
    DemoModel(demo_model::DemoModelArgs),
    /// Measure the system on loopback (policy and revocation propagation).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Regenerate the reference paper's Table 1 on real processes: sigil against a static
    /// API-key baseline (nginx) and an Istio-style sidecar (Envoy).
    Eval(eval::EvalArgs),
    /// Manage registration entries.
    #[command(subcommand)]
    Entry(admin::EntryCmd),
    /// Manage join tokens for node attestation.
    #[command(subcommand)]
    Jointoken(admin::JoinTokenCmd),
    /// List and evict attested nodes.
    #[command(subcommand)]
    Node(admin::NodeCmd),
    /// Mint and revoke SVIDs.
    #[command(subcommand)]
    Svid(admin::SvidCmd),
    /// Inspect and rotate the signing keys.
    #[command(subcommand)]
    Ca(admin::CaCmd),
    /// Show the trust bundle.
    #[command(subcommand)]
    Bundle(admin::BundleCmd),
    /// Sealed models: register, seal, and open in memory for a model server.
    #[command(subcommand)]
    Model(model::ModelCmd),
    /// Read a device's TPM: the EK hash an administrator registers or pins.
    #[command(subcommand)]
    Tpm(tpm::TpmCmd),
    /// Secrets: write and manage them (admin), define dynamic database credential roles,
    /// and read them as a workload through the agent.
    #[command(subcommand)]
    Secret(secret::SecretCmd),
    /// Leases of dynamic credentials: list and revoke.
    #[command(subcommand)]
    Lease(secret::LeaseCmd),
}

/// How admin commands print results.
#[derive(Debug, Clone, Copy, Default, ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// For people.
    #[default]
    Text,
    /// For scripts.
    Json,
}

/// Options every admin command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminOpts {
    /// The server's admin socket.
    #[arg(long, env = "SIGIL_ADMIN_SOCKET", global = true, default_value_os_t = PathBuf::from(DEFAULT_SERVER_DIR).join("admin.sock"))]
    pub socket: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text, global = true)]
    pub output: Output,
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Server(a) => server::run(a).await,
        Command::Dev(a) => dev::run(a).await,
        Command::Status(a) => status::run(a).await,
        Command::DemoModel(a) => demo_model::run(a).await,
        Command::Bench(c) => bench::run(c).await,
        Command::Eval(a) => eval::run(a).await,
        Command::Agent(a) => agent::run(a).await,
        Command::Proxy(a) => proxy::run(a).await,
        Command::Policy(c) => policy::run(c),
        Command::Audit(c) => audit::run(c),
        Command::Log(c) => log::run(c).await,
        Command::Workload(c) => workload::run(c).await,
        Command::Entry(c) => admin::entry(c).await,
        Command::Jointoken(c) => admin::jointoken(c).await,
        Command::Node(c) => admin::node(c).await,
        Command::Svid(c) => admin::svid(c).await,
        Command::Ca(c) => admin::ca(c).await,
        Command::Bundle(c) => admin::bundle(c).await,
        Command::Model(c) => model::run(c).await,
        Command::Tpm(c) => tpm::run(c).await,
        Command::Secret(c) => secret::run(c).await,
        Command::Lease(c) => secret::lease(c).await,
    }
}

/// Why a duration given on the command line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// Not a whole number of seconds, minutes, hours or days.
    #[error("invalid duration {0:?}")]
    Invalid(String),
    /// A unit other than `s`, `m`, `h`, `d`.
    #[error("invalid duration unit in {0:?} (use s, m, h or d)")]
    Unit(String),
    /// More seconds than fit in 32 bits.
    #[error("duration {0:?} is too long")]
    TooLong(String),
}

/// Parses a duration: `90`, `90s`, `15m`, `1h`, `2d`.
pub fn parse_duration(s: &str) -> Result<u32, DurationError> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u32 = num
        .parse()
        .map_err(|_| DurationError::Invalid(s.to_owned()))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(DurationError::Unit(s.to_owned())),
    };
    n.checked_mul(mult)
        .ok_or_else(|| DurationError::TooLong(s.to_owned()))
}

/// Sets up `tracing` logs on stderr (`SIGIL_LOG` or `RUST_LOG` filter, default `info`).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SIGIL_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// `s` as a TOML string literal (quoted and escaped), for building configuration text.
pub(crate) fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("15m"), Ok(900));
        assert_eq!(parse_duration("1h"), Ok(3600));
        assert_eq!(parse_duration("2d"), Ok(172800));
        assert_eq!(parse_duration("1w"), Err(DurationError::Unit("1w".into())));
        assert_eq!(parse_duration(""), Err(DurationError::Invalid("".into())));
        assert_eq!(
            parse_duration("-5s"),
            Err(DurationError::Invalid("-5s".into()))
        );
        assert!(matches!(
            parse_duration("99999999999d"),
            Err(DurationError::Invalid(_))
        ));
        assert_eq!(
            parse_duration("99999d"),
            Err(DurationError::TooLong("99999d".into()))
        );
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
