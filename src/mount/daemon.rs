//! Detaching once the mount is live: the fork, the readiness pipe, the daemon's standard
//! descriptors and log file (shared with `sink`).

use super::*;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};

/// Detached without `--log-file`, logs go to syslog; where there is none, they are
/// discarded, and the caller is told once. Shared with `sink`.
pub(crate) fn say_if_logs_are_discarded() {
    if !crate::logging::syslog_available() {
        eprintln!(
            "cstokenfs: detached without --log-file and no syslog at {}: logs are discarded",
            crate::logging::SYSLOG_PATH
        );
    }
}

/// Who is told once the mount is live (or why it failed). Shared with `sink`.
pub(crate) enum Ready {
    Nobody,
    Pipe(File),
}

impl Ready {
    pub(super) fn tell(self, outcome: &Result<(), MountError>) {
        self.tell_line(outcome.as_ref().err().map(|e| e.to_string()).as_deref());
    }

    /// `OK`, or `ERR` and why: what the parent of a detached daemon waits for.
    pub(crate) fn tell_line(self, error: Option<&str>) {
        if let Ready::Pipe(mut pipe) = self {
            let msg = match error {
                None => "OK\n".to_string(),
                Some(e) => format!("ERR {e}\n"),
            };
            let _ = pipe.write_all(msg.as_bytes());
        }
    }
}

/// Forks; the child becomes the daemon and reports through a pipe once the mount is live.
/// No thread exists yet, so forking is safe.
pub(super) fn detach(
    req: &MountRequest,
    mountpoint: &Path,
    plan: Plan,
    log: Option<File>,
) -> Result<(), MountError> {
    daemonize(
        log,
        "the daemon exited before the mount was live (run with -f to see why)",
        |ready| serve(req, mountpoint, plan, ready),
    )
    .map_err(MountError::Daemon)
}

/// Forks; the child becomes a daemon (`become_daemon`), runs `child` with the pipe's
/// writing end and exits 1 if it fails; the parent returns once the child says `OK` (the
/// child's `ERR` line, or `early_exit` if it said nothing). Shared by `mount` and `sink`.
/// Call it while the process has a single thread: forking is safe only then.
pub(crate) fn daemonize<E>(
    log: Option<File>,
    early_exit: &str,
    child: impl FnOnce(Ready) -> Result<(), E>,
) -> Result<(), String> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned here only.
    let (read_end, write_end) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: the caller has a single thread here (nothing has spawned one yet).
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork: {}", std::io::Error::last_os_error())),
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
                    Ready::Pipe(write_end).tell_line(Some(&e.to_string()));
                    false
                }
            };
            std::process::exit(i32::from(!ok))
        }
        _ => {
            drop(write_end);
            let mut answer = String::new();
            let mut reader = read_end;
            let _ = reader.read_to_string(&mut answer);
            match answer.lines().next() {
                Some("OK") => Ok(()),
                Some(line) => Err(line.trim_start_matches("ERR ").to_string()),
                None => Err(early_exit.to_string()),
            }
        }
    }
}

/// New session; stdin from /dev/null, stdout and stderr to the log file or /dev/null, so a
/// caller capturing our output (`$(cstokenfs mount ...)`) is released.
pub(super) fn become_daemon(log: Option<File>, keep: i32) -> Result<(), MountError> {
    // SAFETY: setsid has no memory effects; it fails only if we lead a group, harmless.
    unsafe { libc::setsid() };
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| MountError::Daemon(format!("/dev/null: {e}")))?;
    let out = log.as_ref().unwrap_or(&null);
    for (from, to) in [(&null, 0), (out, 1), (out, 2)] {
        // SAFETY: dup2 onto the standard descriptors, which this process owns.
        if unsafe { libc::dup2(from.as_raw_fd(), to) } < 0 {
            return Err(MountError::Daemon(format!(
                "dup2: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    drop((null, log));
    let _ = std::env::set_current_dir("/");
    close_inherited_fds(keep);
    Ok(())
}

/// Closes every descriptor above stderr but `keep`: whatever the caller handed down (a pipe
/// it reads to EOF, say) must not stay open in the daemon.
pub(super) fn close_inherited_fds(keep: i32) {
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

/// Opens `--log-file` for appending (mount and sink, before detaching and on SIGHUP). The
/// daemon runs as root, often in shared directories: the last component is never followed
/// (`O_NOFOLLOW`: a planted link is refused, not written through), a new file is created
/// 0600, and an existing one must be a regular file owned by the daemon's uid, or
/// /dev/null; anything else is refused saying why.
pub(crate) fn open_log(path: &Path) -> Result<File, MountError> {
    use rustix::fs::{Mode, OFlags};
    let refuse = |why: String| {
        MountError::Setup(format!(
            "cannot open the log file: {}: {why}",
            path.display()
        ))
    };
    // Non-blocking: a FIFO without a reader fails the open rather than hanging it.
    let flags = OFlags::WRONLY
        | OFlags::APPEND
        | OFlags::CREATE
        | OFlags::NOFOLLOW
        | OFlags::CLOEXEC
        | OFlags::NOCTTY
        | OFlags::NONBLOCK;
    let fd = rustix::fs::open(path, flags, Mode::RUSR | Mode::WUSR).map_err(|e| match e {
        rustix::io::Errno::LOOP => {
            refuse("is a symbolic link: log files are never opened through one".into())
        }
        // A FIFO without a reader (or a device without its driver): open fails at once.
        rustix::io::Errno::NXIO => {
            refuse("is not a regular file (a FIFO no one reads, or a device with no driver)".into())
        }
        e => refuse(std::io::Error::from(e).to_string()),
    })?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| refuse(std::io::Error::from(e).to_string()))?;
    let dev_null = rustix::fs::FileType::from_raw_mode(stat.st_mode).is_char_device()
        && stat.st_rdev == rustix::fs::makedev(1, 3);
    if dev_null {
        return Ok(File::from(fd));
    }
    if let Some(kind) = crate::hardening::not_regular(&stat) {
        return Err(refuse(format!("is not a regular file ({kind})")));
    }
    // SAFETY: geteuid takes no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if stat.st_uid != euid {
        return Err(refuse(format!(
            "is owned by uid {}, not by the daemon's ({euid})",
            stat.st_uid
        )));
    }
    Ok(File::from(fd))
}

/// SIGHUP: reopens `--log-file` (after rotation) as `open_log` opens it; a file it refuses
/// is not used: logging goes on to the previous one, which says so.
pub(crate) fn reopen_log(path: Option<&Path>, foreground: bool) {
    let (Some(path), false) = (path, foreground) else {
        return;
    };
    match open_log(path) {
        Ok(file) => {
            // SAFETY: dup2 onto our own stdout/stderr.
            unsafe {
                libc::dup2(file.as_raw_fd(), 1);
                libc::dup2(file.as_raw_fd(), 2);
            }
            info!("log file reopened");
        }
        Err(e) => warn!("{e}; still logging to the previous log file"),
    }
}
