//! The signals a daemon answers, whatever its front end: SIGTERM and SIGINT stop it,
//! SIGUSR1 drops every held token (the next read fetches anew), SIGHUP reopens the log
//! file. They arrive on a small thread of their own and go on to the front end's event
//! loop as a [`Signal`].

use super::DaemonError;
use signal_hook::iterator::{Handle, Signals};
use std::sync::mpsc::Sender;

/// What a caught signal asks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT (the number, for the log): stop and tidy up.
    Stop(i32),
    /// SIGUSR1: drop every held token.
    DropTokens,
    /// SIGHUP: reopen `--log-file` (after rotation).
    ReopenLog,
}

impl Signal {
    fn from_number(sig: i32) -> Signal {
        match sig {
            libc::SIGUSR1 => Signal::DropTokens,
            libc::SIGHUP => Signal::ReopenLog,
            other => Signal::Stop(other),
        }
    }
}

/// The daemon's signals, registered but not yet forwarded: register them before the front
/// end announces it is ready, so a SIGTERM right after counts.
pub struct Handled(Signals);

impl Handled {
    /// Registers SIGTERM, SIGINT, SIGHUP and SIGUSR1 at once.
    pub fn register() -> Result<Handled, DaemonError> {
        Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1])
            .map(Handled)
            .map_err(DaemonError::Signals)
    }

    /// Sends every signal caught into `tx` (as `event(signal)`) from a small thread of its
    /// own, until the receiver is gone or the returned handle is closed. `mlock`: whether
    /// `--mlock` is on (a thread that cannot start then says why).
    pub fn forward<E: Send + 'static>(
        self,
        tx: Sender<E>,
        event: fn(Signal) -> E,
        mlock: bool,
    ) -> Result<Handle, DaemonError> {
        let handle = self.0.handle();
        let mut signals = self.0;
        small_thread("signals")
            .spawn(move || {
                for sig in signals.forever() {
                    if tx.send(event(Signal::from_number(sig))).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| DaemonError::thread(e, mlock))?;
        Ok(handle)
    }
}

/// A thread that only waits (signals, a session's end): a small stack.
pub fn small_thread(name: &str) -> std::thread::Builder {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(128 * 1024)
}
