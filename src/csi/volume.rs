//! A volume's mounts: its own tmpfs, mounted read-write and private under `--data-dir`
//! (where the driver writes, through `crate::writer`), and a read-only bind of it at the
//! pod's target path (what the pod sees). Both survive the driver: with the data dir a
//! hostPath of `Bidirectional` propagation, a restarted driver finds them again.
//!
//! `--data-dir` and the kubelet's pods directory belong to root alone; the target path is
//! still opened without following a symlink and bound through its descriptor.

use rustix::fs::{self as rfs, Mode, OFlags};
use rustix::mount::{self as rmount, MountFlags, MountPropagationFlags, UnmountFlags};
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The options of a volume's tmpfs: small (a few tokens and their views), root's until the
/// writer gives it the volume's owner and mode.
const TMPFS_OPTIONS: &CStr = c"mode=0700,size=4m,nr_inodes=1024";

/// The flags every mount of a volume has.
fn locked_down() -> MountFlags {
    MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC
}

/// The name of a volume's directory under `--data-dir` and of its record under
/// `--state-dir`: a digest of its volume ID (the kubelet's IDs are long and free-form).
pub fn data_name(volume_id: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, volume_id.as_bytes());
    digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Makes `dir` (and its parents) for root alone, or takes an existing one of root's that
/// no one else may write, and makes it root's alone (0700: the tokens in the volumes'
/// tmpfs below are for the pods' binds, not for other users of the node).
pub fn own_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rfs::open(dir, flags, Mode::empty())?;
    let st = rfs::fstat(&fd)?;
    if st.st_uid != 0 || st.st_mode & 0o022 != 0 {
        return Err(io::Error::other(
            "must be a directory of root's that no other user can write",
        ));
    }
    if st.st_mode & 0o077 != 0 {
        rfs::fchmod(&fd, Mode::from_raw_mode(0o700))?;
    }
    Ok(())
}

/// Mounts a fresh tmpfs at `data_dir/name` (made here), private: its writes never
/// propagate anywhere but to the binds made of it.
pub fn make_data(data_dir: &Path, name: &str) -> io::Result<PathBuf> {
    let path = data_dir.join(name);
    match rfs::mkdir(&path, Mode::from_raw_mode(0o700)) {
        Ok(()) => {}
        // Left by a publish that failed half-way: nothing may be mounted there still.
        Err(rustix::io::Errno::EXIST) => {
            unmount(&path)?;
        }
        Err(e) => return Err(e.into()),
    }
    rmount::mount("tmpfs", &path, "tmpfs", locked_down(), TMPFS_OPTIONS)?;
    if let Err(e) = rmount::mount_change(&path, MountPropagationFlags::PRIVATE) {
        let _ = unmount(&path);
        return Err(e.into());
    }
    Ok(path)
}

/// Unmounts and removes `data_dir/name` (nothing there is fine).
pub fn remove_data(path: &Path) -> io::Result<()> {
    unmount(path)?;
    match rfs::rmdir(path) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The target path, made if its parent exists (the CSI spec leaves it to the plugin); an
/// error naming what is wrong otherwise. Returns whether it was made here.
pub fn make_target(target: &Path) -> Result<bool, String> {
    match rfs::lstat(target) {
        Ok(st) if rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory => Ok(false),
        Ok(_) => Err(format!(
            "target path {} exists and is not a directory",
            target.display()
        )),
        Err(rustix::io::Errno::NOENT) => {
            let parent = target.parent().unwrap_or(Path::new("/"));
            if rfs::lstat(parent).is_err() {
                return Err(format!(
                    "the target path's directory {} does not exist",
                    parent.display()
                ));
            }
            rfs::mkdir(target, Mode::from_raw_mode(0o750))
                .map_err(|e| format!("cannot make target path {}: {e}", target.display()))?;
            Ok(true)
        }
        Err(e) => Err(format!("target path {}: {e}", target.display())),
    }
}

/// Binds `data` read-only at `target` (a directory, opened without following a symlink and
/// bound through its descriptor).
pub fn bind_read_only(data: &Path, target: &Path) -> io::Result<()> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd: OwnedFd = rfs::open(target, flags, Mode::empty())?;
    let through = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rmount::mount_bind(data, through.as_str())?;
    // A bind takes the flags of what it binds; read-only needs a remount of the bind itself.
    let read_only = MountFlags::BIND | MountFlags::RDONLY | locked_down();
    if let Err(e) = rmount::mount_remount(target, read_only, "") {
        let _ = unmount(target);
        return Err(e.into());
    }
    Ok(())
}

/// Unmounts `path` (lazily: a reader holding a file open keeps its file); `false` when
/// nothing was mounted there.
pub fn unmount(path: &Path) -> io::Result<bool> {
    match rmount::unmount(path, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Whether something is mounted at `path`, and its filesystem type (this process's mount
/// table).
pub fn mounted_at(path: &Path) -> Option<String> {
    let want = path.as_os_str().as_bytes();
    crate::mountinfo::mount_table()
        .into_iter()
        .filter(|m| m.point == want)
        .map(|m| m.fstype)
        .next_back()
}

/// Whether `target` is a mount of the same filesystem as `data` (a bind of a volume's
/// tmpfs), both mounted.
pub fn same_mount(data: &Path, target: &Path) -> bool {
    let dev = |p: &Path| rfs::stat(p).ok().map(|st| st.st_dev);
    mounted_at(data).as_deref() == Some("tmpfs")
        && mounted_at(target).is_some()
        && dev(data).is_some()
        && dev(data) == dev(target)
}

/// Removes every file in a volume's tmpfs at `data` and in its directories (best effort;
/// no symlink is followed: `remove_file` unlinks one).
pub fn empty(data: &Path) {
    let Ok(entries) = std::fs::read_dir(data) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => {
                if let Ok(inner) = std::fs::read_dir(&path) {
                    for file in inner.flatten() {
                        let _ = std::fs::remove_file(file.path());
                    }
                }
            }
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// Removes the target directory once nothing is mounted there (the kubelet removes it too;
/// gone already is fine).
pub fn remove_target(target: &Path) {
    match rfs::rmdir(target) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => log::debug!("target path {}: {e}", target.display()),
    }
}
