use clap::{CommandFactory, Parser};
use cstokenfs::Cli;
use std::process::ExitCode;

fn main() -> ExitCode {
    // A usage error is clap's message and exit code 2, whether from `-o` or the flags.
    let args = cstokenfs::rewrite(&Cli::command(), std::env::args_os().collect())
        .unwrap_or_else(|e| e.exit());
    cstokenfs::run(Cli::parse_from(args))
}
