use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // A usage error is clap's message and exit code 2, whether from `-o` or the flags.
    let args = cstokenfs::rewrite(std::env::args_os().collect()).unwrap_or_else(|e| e.exit());
    cstokenfs::run(cstokenfs::Cli::parse_from(args))
}
