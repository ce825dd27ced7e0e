//! Detaching with readiness: the fork, the pipe the caller waits on until the daemon is
//! ready (or says why it failed), and the daemon's own session and standard descriptors.
//! Front ends call [`daemonize`] while the process has a single thread.

use super::DaemonError;
use std::fmt::Display;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};

/// Who is told once the daemon is ready (or why it failed): nobody in the foreground, the
/// waiting parent through a pipe when detached.
pub enum Ready {
    Nobody,
    Pipe(File),
}

impl Ready {
    /// Tells `OK`: the daemon is ready, the parent may return.
    pub fn ok(self) {
        self.tell("OK\n".into());
    }

    /// Tells `ERR` and why: the parent shows it and fails.
    pub fn fail(self, why: &dyn Display) {
        self.tell(format!("ERR {why}\n"));
    }

    fn tell(self, line: String) {
        if let Ready::Pipe(mut pipe) = self {
            let _ = pipe.write_all(line.as_bytes());
        }
    }
}

/// Which side of the fork [`daemonize`] returned in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detached {
    /// The caller's process: the daemon said it is ready.
    Parent,
    /// The daemon, once it stopped: `failed` if it did not stop as asked (its parent was
    /// told why, if it was still waiting).
    Daemon { failed: bool },
}

/// Forks; the child becomes a daemon (`become_daemon`, then logs to `log` or syslog), runs
/// `child` with the pipe's writing end and returns [`Detached::Daemon`] when it is done;
/// the parent returns [`Detached::Parent`] once the child says `OK`, or the child's `ERR`
/// line (`early_exit` if it said nothing) as [`DaemonError::Child`].
pub fn daemonize<E>(
    log: Option<File>,
    early_exit: &str,
    child: impl FnOnce(Ready) -> Result<(), E>,
) -> Result<Detached, DaemonError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(DaemonError::Detach {
            call: "pipe",
            error: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: both descriptors were just created and are owned here only.
    let (read_end, write_end) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: the caller has a single thread here (nothing has spawned one yet).
    match unsafe { libc::fork() } {
        -1 => Err(DaemonError::Detach {
            call: "fork",
            error: std::io::Error::last_os_error(),
        }),
        0 => {
            drop(read_end);
            let to_syslog = log.is_none();
            let ok = match become_daemon(log, write_end.as_raw_fd()) {
                Ok(()) => {
                    if !(to_syslog && crate::logging::init_syslog("info")) {
                        crate::logging::init_stderr("info");
                    }
                    child(Ready::Pipe(write_end)).is_ok()
                }
                // The caller shows why, rather than "exited before the mount was live".
                Err(e) => {
                    Ready::Pipe(write_end).fail(&e);
                    false
                }
            };
            Ok(Detached::Daemon { failed: !ok })
        }
        _ => {
            drop(write_end);
            let mut answer = String::new();
            let mut reader = read_end;
            let _ = reader.read_to_string(&mut answer);
            match answer.lines().next() {
                Some("OK") => Ok(Detached::Parent),
                Some(line) => Err(DaemonError::Child(
                    line.trim_start_matches("ERR ").to_string(),
                )),
                None => Err(DaemonError::Child(early_exit.to_string())),
            }
        }
    }
}

/// New session; stdin from /dev/null, stdout and stderr to the log file or /dev/null, so a
/// caller capturing our output (`$(cstokenfs mount ...)`) is released.
fn become_daemon(log: Option<File>, keep: i32) -> Result<(), DaemonError> {
    // SAFETY: setsid has no memory effects; it fails only if we lead a group, harmless.
    unsafe { libc::setsid() };
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|error| DaemonError::Detach {
            call: "/dev/null",
            error,
        })?;
    let out = log.as_ref().unwrap_or(&null);
    for (from, to) in [(&null, 0), (out, 1), (out, 2)] {
        // SAFETY: dup2 onto the standard descriptors, which this process owns.
        if unsafe { libc::dup2(from.as_raw_fd(), to) } < 0 {
            return Err(DaemonError::Detach {
                call: "dup2",
                error: std::io::Error::last_os_error(),
            });
        }
    }
    drop((null, log));
    let _ = std::env::set_current_dir("/");
    close_inherited_fds(keep);
    Ok(())
}

/// Closes every descriptor above stderr but `keep`: whatever the caller handed down (a pipe
/// it reads to EOF, say) must not stay open in the daemon.
fn close_inherited_fds(keep: i32) {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in fds.into_iter().filter(|fd| *fd > 2 && *fd != keep) {
        // SAFETY: the process is single-threaded here and every descriptor it owns through a
        // Rust object (the pipe to the caller) is `keep`; the rest were inherited.
        unsafe { libc::close(fd) };
    }
}
