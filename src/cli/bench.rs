//! bench
use clap::Args;
#[derive(Args)]
pub struct BenchArgs {}
pub fn run(_a: BenchArgs) -> Result<(), String> {
    Err("todo".into())
}
