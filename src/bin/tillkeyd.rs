//! `tillkeyd`: the key service daemon. Runs in the foreground; see `tillkeyd --help`.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

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
