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
    /// Detaching failed at a system call (`pipe`, `fork`, `/dev/null`, `dup2`).
    Detach(&'static str, io::Error),
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
            DaemonError::Detach(call, e) => write!(f, "{call}: {e}"),
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
