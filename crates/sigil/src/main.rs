//! `sigil`: one binary for the trust authority, the dev stack and the admin commands.
#![forbid(unsafe_code)]

mod admin_client;
mod cmd;
mod config;
mod demo_model;

use std::process::ExitCode;

use clap::Parser;

use crate::cmd::Cli;
use crate::config::UsageError;

/// jemalloc, with background threads that purge freed pages on a timer, so a burst's memory
/// goes back to the system once it is over (glibc's malloc kept it: docs/performance.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// EX_USAGE from sysexits.h: bad configuration or arguments.
const EX_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Blocking work here is short (fsyncs of state files, reading /proc for peer
        // credentials): a few dozen threads keep a small device's disk queue busy, while
        // tokio's default of 512 lets a burst (1,000 in-process agents persisting one
        // change in `sigil bench propagation`) spawn hundreds of threads that mostly
        // contend for two cores.
        .max_blocking_threads(32)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sigil: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cmd::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(u) = e.downcast_ref::<UsageError>() {
                eprintln!("sigil: {u}");
                return ExitCode::from(EX_USAGE);
            }
            if let Some(c) = e.downcast_ref::<sigil_server::ConfigError>() {
                eprintln!("sigil: {c}");
                return ExitCode::from(EX_USAGE);
            }
            eprintln!("sigil: {e:#}");
            ExitCode::FAILURE
        }
    }
}
