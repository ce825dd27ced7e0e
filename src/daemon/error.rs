//! Why the daemon core could not start or keep running: one enum for every stage it owns
//! (the upstream, the stand-in, threads, signals, memory locking, the log file, detaching).
//! Each front end turns it into its own error with `From`.

use crate::hardening::MlockError;
use crate::source::ConfigError;
use std::fmt;
use std::io;
use std::path::PathBuf;

#[derive(Debug)]
pub enum DaemonError {
    /// The plan or its client cannot be made from the flags and the environment.
    Source(ConfigError),
    /// `--emulator`: the stand-in cannot listen.
    Emulator(io::Error),
    /// The signal handlers cannot be registered.
    Signals(io::Error),
    /// A thread cannot start. Under `--mlock` (`mlock`), EAGAIN means the thread's stack
    /// would pass RLIMIT_MEMLOCK: the message names that limit.
    Thread { error: io::Error, mlock: bool },
    /// `--mlock` was refused.
    Memory(MlockError),
    /// `--log-file` cannot be opened, or is refused (`why`).
    LogFile { path: PathBuf, why: String },
    /// Detaching failed at a system call (`call`: `pipe`, `fork`, `/dev/null`, `dup2`).
    Detach {
        call: &'static str,
        error: io::Error,
    },
    /// The detached daemon said why it failed, or exited without a word (then the front
    /// end's own sentence: run with -f to see why).
    Child(String),
}

impl DaemonError {
    /// A thread that could not start (`mlock`: whether `--mlock` is on).
    pub fn thread(error: io::Error, mlock: bool) -> DaemonError {
        DaemonError::Thread { error, mlock }
    }

    /// Whether the operator's configuration (flags, environment, files) is what is wrong,
    /// rather than the system: front ends report these as setup errors.
    pub fn is_setup(&self) -> bool {
        matches!(self, DaemonError::Source(_) | DaemonError::LogFile { .. })
    }
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DaemonError::Source(e) => e.fmt(f),
            DaemonError::Emulator(e) => write!(f, "cannot start the emulator: {e}"),
            DaemonError::Signals(e) => write!(f, "cannot handle signals: {e}"),
            DaemonError::Thread { error, mlock: true }
                if error.raw_os_error() == Some(libc::EAGAIN) =>
            {
                crate::hardening::mlock_error(error).fmt(f)
            }
            DaemonError::Thread { error, .. } => write!(f, "cannot start a thread: {error}"),
            DaemonError::Memory(e) => e.fmt(f),
            DaemonError::LogFile { path, why } => {
                write!(f, "cannot open the log file: {}: {why}", path.display())
            }
            DaemonError::Detach { call, error } => write!(f, "{call}: {error}"),
            DaemonError::Child(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for DaemonError {}

impl From<ConfigError> for DaemonError {
    fn from(e: ConfigError) -> DaemonError {
        DaemonError::Source(e)
    }
}

impl From<MlockError> for DaemonError {
    fn from(e: MlockError) -> DaemonError {
        DaemonError::Memory(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages are the contract: the same words as before the core was shared.
    #[test]
    fn messages_say_what_failed() {
        let gone = || io::Error::from_raw_os_error(libc::EMFILE);
        let emulator = DaemonError::Emulator(gone()).to_string();
        assert!(
            emulator.starts_with("cannot start the emulator: "),
            "{emulator}"
        );
        let signals = DaemonError::Signals(gone()).to_string();
        assert!(signals.starts_with("cannot handle signals: "), "{signals}");
        let thread = DaemonError::thread(gone(), true).to_string();
        assert!(thread.starts_with("cannot start a thread: "), "{thread}");
        let fork = DaemonError::Detach {
            call: "fork",
            error: gone(),
        };
        assert!(fork.to_string().starts_with("fork: "));
        let log = DaemonError::LogFile {
            path: "/var/log/x".into(),
            why: "is a symbolic link".into(),
        };
        assert_eq!(
            log.to_string(),
            "cannot open the log file: /var/log/x: is a symbolic link"
        );
        assert!(log.is_setup());
        assert!(!DaemonError::Child("ERR".into()).is_setup());
    }

    /// Under --mlock a thread refused with EAGAIN is RLIMIT_MEMLOCK's doing: said so.
    #[test]
    fn a_thread_refused_under_mlock_names_the_limit() {
        let again = || io::Error::from_raw_os_error(libc::EAGAIN);
        let plain = DaemonError::thread(again(), false).to_string();
        assert!(plain.starts_with("cannot start a thread: "), "{plain}");
        let locked = DaemonError::thread(again(), true).to_string();
        assert_eq!(locked, crate::hardening::mlock_error(&again()).to_string());
    }
}
