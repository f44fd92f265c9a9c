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
    /// Print sigil's Cedar schema.
    Schema,
}

pub fn run(cmd: PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Schema => print!("{}", sigil_policy::SCHEMA),
        PolicyCmd::Validate { dir } => {
            let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
                .collect();
            paths.sort();
            let mut files = Vec::new();
            for p in &paths {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                files.push((p.display().to_string(), text));
            }
            let engine = sigil_policy::PolicyEngine::new(&files)?;
            println!("{} policies in {} files: valid", engine.len(), paths.len());
        }
    }
    Ok(())
}
