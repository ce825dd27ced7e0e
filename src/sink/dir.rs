//! The sink's directory: on tmpfs or ramfs only (`statfs`), and one sink per directory (a
//! lock file held with `flock`; a stale one left by a killed sink is taken over).

use super::SinkError;
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// `statfs` magic numbers of the filesystems that keep pages in memory only.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// The lock file, in DIR itself (a dot name: `ls DIR` shows what a mount shows).
pub const LOCK_NAME: &str = ".cstokenfs-sink.lock";

/// Refuses a directory whose filesystem may write its pages to a disk.
pub fn check_in_memory(dir: &Path) -> Result<(), SinkError> {
    let shown = dir.display();
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| SinkError::Dir(format!("{shown}: the path contains a NUL byte")))?;
    // SAFETY: statfs only writes into the struct we own; all-zero is a valid statfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and st a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(SinkError::Dir(format!("{shown}: statfs: {e}")));
    }
    #[allow(clippy::useless_conversion)] // f_type's integer type differs between targets
    let magic = i64::from(st.f_type);
    if magic == TMPFS_MAGIC || magic == RAMFS_MAGIC {
        return Ok(());
    }
    Err(SinkError::NotInMemory {
        dir: dir.to_path_buf(),
        fstype: fs_type_name(dir).unwrap_or_else(|| format!("filesystem type {magic:#x}")),
    })
}

/// The type of the filesystem `path` is on, per /proc/self/mountinfo (`ext4`, `overlay`, ...).
fn fs_type_name(path: &Path) -> Option<String> {
    let dev = std::fs::metadata(path).ok()?.dev();
    let want = format!("{}:{}", libc::major(dev), libc::minor(dev));
    crate::mount::mount_table()
        .into_iter()
        .filter(|m| m.device == want)
        .map(|m| m.fstype)
        .next_back()
}

/// What a sink wrote down when it took the lock: enough for the next sink to tidy up after
/// it if it is killed (files it writes, directories it made, DIR's owner and mode before).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub pid: u32,
    pub dir_uid: u32,
    pub dir_gid: u32,
    pub dir_mode: u32,
    /// Paths relative to DIR.
    pub files: Vec<String>,
    pub dirs: Vec<String>,
}

/// The lock of one DIR, held until dropped (the kernel drops it when the process dies).
pub struct Lock {
    file: File,
    path: PathBuf,
}

impl Lock {
    /// Takes the lock of `dir`, with the record of a sink that died holding it (if any).
    pub fn acquire(dir: &Path) -> Result<(Lock, Option<Record>), SinkError> {
        let path = dir.join(LOCK_NAME);
        let shown = path.display();
        let io = |e: std::io::Error| SinkError::Dir(format!("lock file {shown}: {e}"));
        // A sink that exits unlinks its lock file: the file locked must still be at `path`.
        for _ in 0..10 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
                .map_err(io)?;
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                    return Err(io(e));
                }
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let pid = serde_json::from_str::<Record>(&text)
                    .map_or_else(|_| "unknown".to_string(), |r| r.pid.to_string());
                return Err(SinkError::Busy(format!(
                    "{} is in use by another cstokenfs sink (pid {pid}): stop it first",
                    dir.display()
                )));
            }
            let locked = file.metadata().map_err(io)?;
            let same = std::fs::symlink_metadata(&path)
                .is_ok_and(|m| m.ino() == locked.ino() && m.dev() == locked.dev());
            if !same {
                continue;
            }
            let mut text = String::new();
            file.read_to_string(&mut text).map_err(io)?;
            // Only a record a sink of ours wrote is trusted: anyone who can write DIR could
            // plant a lock file naming files to remove and an owner to give DIR.
            // SAFETY: geteuid cannot fail.
            let ours = locked.uid() == unsafe { libc::geteuid() } && locked.mode() & 0o777 == 0o600;
            let stale = serde_json::from_str::<Record>(&text).ok().filter(|_| ours);
            return Ok((Lock { file, path }, stale));
        }
        Err(SinkError::Dir(format!(
            "lock file {shown}: it keeps being replaced"
        )))
    }

    /// Writes this sink's record into the lock file.
    pub fn record(&mut self, r: &Record) -> std::io::Result<()> {
        let text = serde_json::to_vec(r).map_err(std::io::Error::other)?;
        self.file.set_len(0)?;
        std::os::unix::fs::FileExt::write_all_at(&self.file, &text, 0)?;
        self.file.flush()
    }

    /// Removes the lock file, then lets go of the lock.
    pub fn release(self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_record_round_trips() {
        let r = Record {
            pid: 7,
            dir_mode: 0o700,
            files: vec!["a".into(), ".json/a".into()],
            dirs: vec![".json".into()],
            ..Record::default()
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Record>(&text).unwrap(), r);
    }

    #[test]
    fn a_second_lock_of_the_same_dir_is_refused_and_a_released_one_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let (mut first, stale) = Lock::acquire(dir.path()).unwrap();
        assert!(stale.is_none());
        first
            .record(&Record {
                pid: 42,
                ..Record::default()
            })
            .unwrap();
        match Lock::acquire(dir.path()) {
            Err(SinkError::Busy(m)) => assert!(m.contains("pid 42"), "{m}"),
            other => panic!("expected Busy, got {:?}", other.map(|_| ())),
        }
        first.release();
        assert!(!dir.path().join(LOCK_NAME).exists());
        let (again, stale) = Lock::acquire(dir.path()).unwrap();
        assert!(stale.is_none());
        again.release();
    }

    #[test]
    fn a_lock_left_unlocked_is_taken_over_with_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let left = Record {
            pid: 99_999_999,
            files: vec!["x".into()],
            ..Record::default()
        };
        let path = dir.path().join(LOCK_NAME);
        std::fs::write(&path, serde_json::to_vec(&left).unwrap()).unwrap();
        // Written by someone else (another mode than a sink's 0600): not trusted.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (lock, stale) = Lock::acquire(dir.path()).unwrap();
        assert_eq!(stale, None, "a planted record is not followed");
        drop(lock);
        // A sink's own (0600, ours): taken over with its record.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (lock, stale) = Lock::acquire(dir.path()).unwrap();
        assert_eq!(stale, Some(left));
        lock.release();
    }
}
