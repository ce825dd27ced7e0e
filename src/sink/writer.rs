//! Files of the sink: each replaced atomically (a temporary file in the same directory, then
//! `rename(2)`), owned and moded as asked; the layout is the mount's.

use crate::fs::Access;
use crate::token::View;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// The `.status` file, as in the mount.
pub const STATUS: &str = ".status";

/// Where `view` of the resource listed as `name` lives, relative to DIR.
pub fn view_path(view: View, name: &str) -> String {
    match view.dir_name() {
        Some(dir) => format!("{dir}/{name}"),
        None => name.to_string(),
    }
}

/// The view directories (`.json`, `.header`, ...), relative to DIR.
pub fn view_dirs() -> Vec<&'static str> {
    View::ALL.iter().filter_map(|v| v.dir_name()).collect()
}

/// The temporary file a write of `rel` goes through: a dot name in the same directory.
fn temp_path(rel: &str) -> String {
    match rel.rsplit_once('/') {
        Some((dir, name)) => format!("{dir}/.{name}.cstokenfs-tmp"),
        None => format!(".{rel}.cstokenfs-tmp"),
    }
}

/// Whether `rel` is a plain relative path of at most two components (a lock file's record
/// comes from outside: nothing in it may reach outside DIR).
pub fn is_inside(rel: &str) -> bool {
    let p = Path::new(rel);
    let parts: Vec<Component> = p.components().collect();
    !parts.is_empty() && parts.len() <= 2 && parts.iter().all(|c| matches!(c, Component::Normal(_)))
}

/// Writes, replaces and removes files under one directory.
pub struct Writer {
    dir: PathBuf,
    access: Access,
    dir_mode: u16,
    /// What this writer wrote and has not removed (relative paths): what an exit removes.
    written: RefCell<BTreeSet<String>>,
}

impl Writer {
    /// `dir_mode` is what the directories get (the mount's, plus the owner's write bit when
    /// the sink needs it to replace files).
    pub fn new(dir: PathBuf, access: Access, dir_mode: u16) -> Writer {
        Writer {
            dir,
            access,
            dir_mode,
            written: RefCell::default(),
        }
    }

    /// The files written and not removed since, relative to DIR.
    pub fn written(&self) -> Vec<String> {
        self.written.borrow().iter().cloned().collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Replaces `rel` with `bytes` at once: a reader sees the whole old or the whole new file.
    pub fn write(&self, rel: &str, bytes: &[u8]) -> std::io::Result<()> {
        let temp = self.path(&temp_path(rel));
        match std::fs::remove_file(&temp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let written = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&temp)?;
            file.write_all(bytes)?;
            std::os::unix::fs::fchown(&file, Some(self.access.uid), Some(self.access.gid))?;
            file.set_permissions(std::fs::Permissions::from_mode(u32::from(
                self.access.file_mode,
            )))?;
            // tmpfs: no fsync, the pages never reach a disk.
            std::fs::rename(&temp, self.path(rel))
        })();
        match written {
            Ok(()) => {
                self.written.borrow_mut().insert(rel.to_string());
            }
            Err(_) => {
                let _ = std::fs::remove_file(&temp);
            }
        }
        written
    }

    /// Removes `rel` (and a temporary file of it left by a crash); absent is fine.
    pub fn remove(&self, rel: &str) -> std::io::Result<()> {
        let _ = std::fs::remove_file(self.path(&temp_path(rel)));
        self.written.borrow_mut().remove(rel);
        match std::fs::remove_file(self.path(rel)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Makes the directory `rel` with the owner and mode asked for.
    pub fn make_dir(&self, rel: &str) -> std::io::Result<()> {
        let path = self.path(rel);
        std::fs::DirBuilder::new().mode(0o700).create(&path)?;
        self.own_dir(&path)
    }

    /// Gives a directory the owner and directory mode asked for.
    pub fn own_dir(&self, path: &Path) -> std::io::Result<()> {
        std::os::unix::fs::chown(path, Some(self.access.uid), Some(self.access.gid))?;
        std::fs::set_permissions(
            path,
            std::fs::Permissions::from_mode(u32::from(self.dir_mode)),
        )
    }

    /// Removes the directory `rel` if it is empty (anything else in it stays).
    pub fn remove_dir(&self, rel: &str) {
        let _ = std::fs::remove_dir(self.path(rel));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn writer(dir: &Path) -> Writer {
        let access = Access {
            // SAFETY: getuid/getgid cannot fail.
            uid: unsafe { libc::getuid() },
            gid: unsafe { libc::getgid() },
            file_mode: 0o440,
        };
        Writer::new(dir.to_path_buf(), access, 0o750)
    }

    #[test]
    fn paths_follow_the_mount_layout() {
        assert_eq!(view_path(View::Raw, "a"), "a");
        assert_eq!(view_path(View::Json, "a"), ".json/a");
        assert_eq!(view_path(View::GitCredential, "a"), ".git-credential/a");
        assert_eq!(temp_path(".json/a"), ".json/.a.cstokenfs-tmp");
        assert_eq!(temp_path("a"), ".a.cstokenfs-tmp");
        assert_eq!(
            view_dirs().len(),
            View::ALL.len() - 1,
            "every view but the raw token"
        );
    }

    #[test]
    fn only_plain_relative_paths_are_inside() {
        assert!(is_inside("a") && is_inside(".json/a"));
        for bad in ["", "/etc/passwd", "../x", ".json/../../x", "a/b/c", "./a"] {
            assert!(!is_inside(bad), "{bad}");
        }
    }

    #[test]
    fn a_write_replaces_the_file_with_the_mode_asked_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path());
        w.make_dir(".json").unwrap();
        w.write(".json/a", b"one").unwrap();
        w.write(".json/a", b"two").unwrap();
        assert_eq!(std::fs::read(dir.path().join(".json/a")).unwrap(), b"two");
        let m = std::fs::metadata(dir.path().join(".json/a")).unwrap();
        assert_eq!(m.mode() & 0o777, 0o440);
        let d = std::fs::metadata(dir.path().join(".json")).unwrap();
        assert_eq!(d.mode() & 0o777, 0o750);
        let names: Vec<_> = std::fs::read_dir(dir.path().join(".json"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a"]);
        w.remove(".json/a").unwrap();
        w.remove(".json/a").unwrap();
        w.remove_dir(".json");
        assert!(!dir.path().join(".json").exists());
    }
}
