//! `tillkey`: operator and client CLI; see `tillkey --help`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    tillkey::cli::main()
}
