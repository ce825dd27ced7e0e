//! `--log-file`: opened before detaching (a detached daemon's stdout and stderr), reopened
//! on SIGHUP; and the one line saying logs are discarded when there is neither a log file
//! nor a syslog.

use super::DaemonError;
use log::{info, warn};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Detached without `--log-file`, logs go to syslog; where there is none, they are
/// discarded, and the caller is told once.
pub fn say_if_logs_are_discarded() {
    if !crate::logging::syslog_available() {
        eprintln!(
            "cstokenfs: detached without --log-file and no syslog at {}: logs are discarded",
            crate::logging::SYSLOG_PATH
        );
    }
}

/// Opens `--log-file` for appending (before detaching and on SIGHUP). The daemon runs as
/// root, often in shared directories: the last component is never followed (`O_NOFOLLOW`:
/// a planted link is refused, not written through), a new file is created 0600, and an
/// existing one must be a regular file owned by the daemon's uid, or /dev/null; anything
/// else is refused saying why.
pub fn open_log(path: &Path) -> Result<File, DaemonError> {
    use rustix::fs::{Mode, OFlags};
    let refuse = |why: String| DaemonError::LogFile {
        path: path.to_path_buf(),
        why,
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
/// is not used: logging goes on to the previous one, which says so. Nothing to do in the
/// foreground (logs go to stderr) or without a log file.
pub fn reopen_log(path: Option<&Path>, foreground: bool) {
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
