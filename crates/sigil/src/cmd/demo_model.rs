//! `sigil demo-model`: a small built-in OpenAI-compatible model server (plain HTTP), to put
//! `sigil proxy` in front of for a demo or a test. Runs until SIGINT/SIGTERM.
use anyhow::Context;

/// Flags of `sigil demo-model`.
#[derive(Debug, clap::Args)]
pub struct DemoModelArgs {
    /// Address to listen on (plain HTTP: keep it on loopback, behind `sigil proxy`).
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: String,
}

pub async fn run(args: DemoModelArgs) -> anyhow::Result<()> {
    super::init_logging(false);
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, models = ?crate::demo_model::MODELS, "demo model server listening");
    println!("sigil demo-model listening on http://{addr}");
    tokio::select! {
        r = crate::demo_model::serve(listener) => r,
        _ = super::server::wait_for_signal() => Ok(()),
    }
}
