//! The sink's directory: on tmpfs or ramfs only (`statfs`), and one sink per directory (a
//! lock file held with `flock`; a stale one left by a killed sink is taken over).

use super::SinkError;
use crate::writer::{euid, open_dir_at, same_file, unlink_if_held};
use rustix::fs::{self as rfs, AtFlags, FileType, FlockOperation, Mode, OFlags};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

/// `statfs` magic numbers of the filesystems that keep pages in memory only.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// The lock file, in DIR itself (a dot name: `ls DIR` shows what a mount shows).
pub const LOCK_NAME: &str = ".cstokenfs-sink.lock";

/// Opens DIR (`dir`, its symlinks already resolved; a symlink as its last component is
/// refused) and refuses a directory whose filesystem may write its pages to a disk.
pub fn open_in_memory(dir: &Path) -> Result<OwnedFd, SinkError> {
    let shown = dir.display();
    let fd = open_dir_at(rfs::CWD, dir).map_err(|e| SinkError::Dir(format!("{shown}: {e}")))?;
    let st = rfs::fstatfs(&fd)
        .map_err(|e| SinkError::Dir(format!("{shown}: statfs: {}", std::io::Error::from(e))))?;
    #[allow(clippy::useless_conversion)] // f_type's integer type differs between targets
    let magic = i64::from(st.f_type);
    if magic == TMPFS_MAGIC || magic == RAMFS_MAGIC {
        return Ok(fd);
    }
    Err(SinkError::NotInMemory {
        dir: dir.to_path_buf(),
        fstype: fs_type_name(fd.as_fd()).unwrap_or_else(|| format!("filesystem type {magic:#x}")),
    })
}

/// The type of the filesystem `fd` is on, per /proc/self/mountinfo (`ext4`, `overlay`, ...).
fn fs_type_name(fd: BorrowedFd<'_>) -> Option<String> {
    let dev = rfs::fstat(fd).ok()?.st_dev;
    let want = format!("{}:{}", rfs::major(dev), rfs::minor(dev));
    crate::mountinfo::mount_table()
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
}

impl Lock {
    /// Takes the lock of DIR (`dir`, held open; `shown` is its path), with the record of a
    /// sink that died holding it (if any).
    pub fn acquire(dir: BorrowedFd<'_>, shown: &Path) -> Result<(Lock, Option<Record>), SinkError> {
        let shown_lock = shown.join(LOCK_NAME);
        let io =
            |e: std::io::Error| SinkError::Dir(format!("lock file {}: {e}", shown_lock.display()));
        // A sink that exits unlinks its lock file: the file locked must still be at its name.
        for _ in 0..10 {
            // Non-blocking: a FIFO put at the name must not hold the sink up.
            let flags = OFlags::RDWR
                | OFlags::CREATE
                | OFlags::NOFOLLOW
                | OFlags::NONBLOCK
                | OFlags::CLOEXEC;
            let fd = rfs::openat(dir, LOCK_NAME, flags, Mode::from_raw_mode(0o600))
                .map_err(|e| io(e.into()))?;
            let mut file = File::from(fd);
            let locked = rfs::fstat(&file).map_err(|e| io(e.into()))?;
            if FileType::from_raw_mode(locked.st_mode) != FileType::RegularFile {
                return Err(io(std::io::Error::other("not a regular file")));
            }
            match rfs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    let pid = serde_json::from_str::<Record>(&text)
                        .map_or_else(|_| "unknown".to_string(), |r| r.pid.to_string());
                    return Err(SinkError::Busy(format!(
                        "{} is in use by another cstokenfs sink (pid {pid}): stop it first",
                        shown.display()
                    )));
                }
                Err(e) => return Err(io(e.into())),
            }
            let same = rfs::statat(dir, LOCK_NAME, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|m| same_file(&m, &locked));
            if !same {
                continue;
            }
            let mut text = String::new();
            file.read_to_string(&mut text).map_err(io)?;
            // Only a record a sink of ours wrote is trusted: anyone who can write DIR could
            // plant a lock file naming files to remove and an owner to give DIR.
            let ours = locked.st_uid == euid() && locked.st_mode & 0o777 == 0o600;
            let stale = serde_json::from_str::<Record>(&text).ok().filter(|_| ours);
            return Ok((Lock { file }, stale));
        }
        Err(SinkError::Dir(format!(
            "lock file {}: it keeps being replaced",
            shown_lock.display()
        )))
    }

    /// Writes this sink's record into the lock file.
    pub fn record(&mut self, r: &Record) -> std::io::Result<()> {
        let text = serde_json::to_vec(r).map_err(std::io::Error::other)?;
        self.file.set_len(0)?;
        std::os::unix::fs::FileExt::write_all_at(&self.file, &text, 0)?;
        self.file.flush()
    }

    /// Removes the lock file from DIR (`dir`, held open) if it is still ours, then lets go
    /// of the lock.
    pub fn release(self, dir: BorrowedFd<'_>) {
        unlink_if_held(dir, LOCK_NAME, self.file.as_fd(), AtFlags::empty());
        drop(self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acquire(dir: &Path) -> Result<(Lock, Option<Record>), SinkError> {
        let fd = open_dir_at(rfs::CWD, dir).unwrap();
        Lock::acquire(fd.as_fd(), dir)
    }

    fn release(lock: Lock, dir: &Path) {
        lock.release(open_dir_at(rfs::CWD, dir).unwrap().as_fd());
    }

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
        let (mut first, stale) = acquire(dir.path()).unwrap();
        assert!(stale.is_none());
        first
            .record(&Record {
                pid: 42,
                ..Record::default()
            })
            .unwrap();
        match acquire(dir.path()) {
            Err(SinkError::Busy(m)) => assert!(m.contains("pid 42"), "{m}"),
            other => panic!("expected Busy, got {:?}", other.map(|_| ())),
        }
        release(first, dir.path());
        assert!(!dir.path().join(LOCK_NAME).exists());
        let (again, stale) = acquire(dir.path()).unwrap();
        assert!(stale.is_none());
        release(again, dir.path());
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
        rfs::chmod(&path, Mode::from_raw_mode(0o644)).unwrap();
        let (lock, stale) = acquire(dir.path()).unwrap();
        assert_eq!(stale, None, "a planted record is not followed");
        drop(lock);
        // A sink's own (0600, ours): taken over with its record.
        rfs::chmod(&path, Mode::from_raw_mode(0o600)).unwrap();
        let (lock, stale) = acquire(dir.path()).unwrap();
        assert_eq!(stale, Some(left));
        release(lock, dir.path());
    }

    /// The lock's name as a symlink out of DIR is refused; a lock file replaced while the
    /// sink ran is not removed at release (only ours is).
    #[test]
    fn the_lock_never_follows_a_symlink_and_removes_only_its_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let victim = tempfile::tempdir().unwrap();
        let target = victim.path().join("v");
        std::fs::write(&target, b"victim").unwrap();
        let path = dir.path().join(LOCK_NAME);
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(matches!(acquire(dir.path()), Err(SinkError::Dir(_))));
        rfs::unlink(&path).unwrap();
        let (lock, _) = acquire(dir.path()).unwrap();
        rfs::unlink(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        release(lock, dir.path());
        assert!(path.symlink_metadata().is_ok(), "not ours: left");
        assert_eq!(std::fs::read(&target).unwrap(), b"victim");
    }

    #[test]
    fn a_lock_name_that_is_not_a_regular_file_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOCK_NAME);
        rfs::mknodat(
            rfs::CWD,
            &path,
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        match acquire(dir.path()) {
            Err(SinkError::Dir(m)) => assert!(m.contains("not a regular file"), "{m}"),
            other => panic!("expected Dir, got {:?}", other.map(|_| ())),
        }
    }
}
