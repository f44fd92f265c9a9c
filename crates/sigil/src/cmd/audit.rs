//! `sigil audit`: read a proxy's audit segment (verifying every record's length and CRC-32C).
use std::path::PathBuf;

#[derive(Debug, clap::Subcommand)]
pub enum AuditCmd {
    /// Print the decision records as JSON lines (for a SIEM or `jq`).
    Show {
        /// The proxy's audit segment (`audit_log`).
        file: PathBuf,
    },
    /// Check every record; exits non-zero on a corrupt segment.
    Verify {
        /// The proxy's audit segment (`audit_log`).
        file: PathBuf,
    },
}

pub fn run(cmd: AuditCmd) -> anyhow::Result<()> {
    match cmd {
        AuditCmd::Show { file } => {
            for r in sigil_proxy::read_records(&file)? {
                println!("{r}");
            }
        }
        AuditCmd::Verify { file } => {
            let f = std::fs::File::open(&file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let scan = sigil_proxy::scan_audit(&f)?;
            println!(
                "{}: {} records verify{}",
                file.display(),
                scan.records.len(),
                if scan.torn > 0 {
                    format!(
                        "; a torn last record ({} bytes) follows them, cut when the proxy opens it",
                        scan.torn
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(())
}
