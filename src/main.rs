use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = match cstokenfs::fuseopts::rewrite(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("cstokenfs: {e}");
            return ExitCode::from(2);
        }
    };
    cstokenfs::cli::run(cstokenfs::cli::Cli::parse_from(args))
}
