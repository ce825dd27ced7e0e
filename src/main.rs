//! The binary: rewrites the mount(8) form, parses, runs, and turns the outcome into the
//! process's exit code. Exit codes are decided here and nowhere else: 0 done, 1 a failure
//! at run time, 2 a usage error (clap's own usage errors exit 2 through clap too).

use clap::{CommandFactory, Parser};
use cstokenfs::{Cli, CliError};
use std::process::ExitCode;

/// A failure at run time.
const EXIT_FAILURE: u8 = 1;
/// A usage error, as clap's.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    // A usage error is clap's message and exit code 2, whether from `-o` or the flags.
    // Run as `docker-credential-cstokenfs ACTION`: the credential helper.
    let args = cstokenfs::docker_helper_args(std::env::args_os().collect());
    let args = cstokenfs::rewrite(&Cli::command(), args).unwrap_or_else(|e| e.exit());
    match cstokenfs::run(Cli::parse_from(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The one place an error is printed.
            if let Some(message) = e.message() {
                eprintln!("cstokenfs: {message}");
            }
            ExitCode::from(match e {
                CliError::Usage(_) => EXIT_USAGE,
                CliError::Failure(_) | CliError::Reported => EXIT_FAILURE,
            })
        }
    }
}
