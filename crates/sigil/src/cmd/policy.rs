//! `sigil policy`: check Cedar policies against sigil's schema before they are deployed.
use std::path::PathBuf;

use anyhow::Context;

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCmd {
    /// Parse and validate every *.cedar file of a directory against sigil's schema.
    Validate {
        /// The policy directory.
        dir: PathBuf,
    },
    /// Run a JSON file of request → expected-decision cases against a policy directory.
    Test {
        /// The cases (a JSON array; see policy/demo.tests.json).
        cases: PathBuf,
        /// The policy directory.
        #[arg(long)]
        policies: PathBuf,
    },
    /// Print sigil's Cedar schema.
    Schema,
}

/// One case of `sigil policy test`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    principal: String,
    #[serde(default)]
    groups: Vec<String>,
    action: String,
    resource_type: String,
    resource_id: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default = "noon")]
    hour: i64,
    #[serde(default)]
    weekday: i64,
    /// MCP tool arguments (a JSON object), seen by policy as `context.arguments`.
    #[serde(default)]
    arguments: Option<serde_json::Value>,
    /// `allow` or `deny`.
    expect: String,
}

fn noon() -> i64 {
    12
}

fn load_dir(dir: &std::path::Path) -> anyhow::Result<(sigil_policy::PolicyEngine, usize)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
        .collect();
    paths.sort();
    let mut files = Vec::new();
    for p in &paths {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        files.push((p.display().to_string(), text));
    }
    Ok((sigil_policy::PolicyEngine::new(&files)?, paths.len()))
}

pub fn run(cmd: PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Schema => print!("{}", sigil_policy::SCHEMA),
        PolicyCmd::Validate { dir } => {
            let (engine, files) = load_dir(&dir)?;
            println!("{} policies in {files} files: valid", engine.len());
        }
        PolicyCmd::Test { cases, policies } => {
            let (engine, _) = load_dir(&policies)?;
            let text = std::fs::read_to_string(&cases)
                .with_context(|| format!("reading {}", cases.display()))?;
            let cases: Vec<Case> = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a JSON array of cases", cases.display()))?;
            let mut failed = 0;
            for c in &cases {
                anyhow::ensure!(
                    matches!(c.expect.as_str(), "allow" | "deny"),
                    "case {:?}: expect must be \"allow\" or \"deny\"",
                    c.name
                );
                let id = sigil_core::SpiffeId::new(&c.principal)
                    .with_context(|| format!("case {:?}: principal", c.name))?;
                // An error (e.g. refused arguments) is a deny, as in the proxy.
                let d = engine.decide(&sigil_policy::Query {
                    principal: sigil_policy::Principal {
                        spiffe_id: &c.principal,
                        trust_domain: id.trust_domain_name(),
                        groups: &c.groups,
                    },
                    action: &c.action,
                    resource_type: &c.resource_type,
                    resource_id: &c.resource_id,
                    scopes: &c.scopes,
                    hour: c.hour,
                    weekday: c.weekday,
                    arguments: c.arguments.as_ref(),
                });
                let (got, why) = match &d {
                    Ok(d) if d.allow => ("allow", d.policy_ids.join(", ")),
                    Ok(d) if d.errors.is_empty() => ("deny", d.policy_ids.join(", ")),
                    Ok(d) => (
                        "deny",
                        format!(
                            "{}; errors: {}",
                            d.policy_ids.join(", "),
                            d.errors.join("; ")
                        ),
                    ),
                    Err(e) => ("deny", format!("error: {e}")),
                };
                if got == c.expect {
                    println!("PASS  {}  ({got}; {why})", c.name);
                } else {
                    failed += 1;
                    println!("FAIL  {}  expected {}, got {got} ({why})", c.name, c.expect);
                }
            }
            println!("{} passed, {failed} failed", cases.len() - failed);
            anyhow::ensure!(failed == 0, "{failed} policy test case(s) failed");
        }
    }
    Ok(())
}
