//! `tillkeyd`: the key service daemon. Runs in the foreground; see `tillkeyd --help`.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Every request allocates and frees a few dozen small buffers (TLS records, headers, JSON, the
/// log line, the audit entry) on two worker threads. In `perf`, glibc's malloc took ~13 % of the
/// workers' samples (a fifth of it consolidating free lists), mimalloc ~3.5 % (BENCHMARKS.md,
/// 2026-12-05). Only the daemon's Rust allocations move: the token's library and
/// the TPM stack keep the C library's allocator and its checks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hardware-backed key service for retail payments.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Override server.listen (e.g. 127.0.0.1:0 for an ephemeral port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Override server.admin_listen.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tillkey::daemon::main(
        &args.config,
        tillkey::config::Overrides {
            listen: args.listen,
            admin_listen: args.admin_listen,
            ..Default::default()
        },
    )
}
