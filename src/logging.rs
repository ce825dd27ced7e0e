//! Logging through env_logger: level from RUST_LOG, default info. Never a token at any
//! level: token types redact themselves and no layer logs a response body.

use env_logger::{Builder, Env};
use log::LevelFilter;

/// Logs to standard error at RUST_LOG's level, else `default_level` (which a detached daemon points at its log file or /dev/null).
pub fn init_stderr(default_level: &str) {
    let _ = Builder::from_env(Env::default().default_filter_or(default_level))
        .format_timestamp_millis()
        // fuser warns that its own unmount failed after ours succeeded: noise, not news.
        .filter_module("fuser::mnt", LevelFilter::Error)
        .try_init();
}
