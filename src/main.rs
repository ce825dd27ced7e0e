use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    cstokenfs::cli::run(cstokenfs::cli::Cli::parse())
}
