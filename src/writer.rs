//! Token files under one directory held open (the sink's DIR, a CSI volume's tmpfs),
//! through directory descriptors only: the directory is opened once, the view directories
//! are made (or, after a restart, opened) and held open, and every create, chmod, chown,
//! rename and unlink is relative to one of those descriptors, never to a path below it.
//! Whoever else can write the directory may swap names for symlinks or other directories:
//! the writer still only touches its own directories. Each file is replaced atomically (a
//! temporary file in the same directory, then `renameat(2)`), owned and moded as asked;
//! the layout is the mount's.

use crate::access::Access;
use crate::token::View;
use rustix::fs::{self as rfs, AtFlags, FileType, Gid, Mode, OFlags, Stat, Uid};
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use zeroize::Zeroizing;

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

/// The directory of the declared identities (`DIR/id/NAME/`, as in the mount).
pub const IDS: &str = "id";

/// Every directory a sink makes, relative to DIR, parents first: the view directories,
/// then with declared identities (`identities`: their names) `id`, and for each
/// `id/NAME` and its view directories.
pub fn dirs(identities: &[String]) -> Vec<String> {
    let mut out: Vec<String> = view_dirs().into_iter().map(str::to_string).collect();
    if !identities.is_empty() {
        out.push(IDS.to_string());
    }
    for name in identities {
        out.push(format!("{IDS}/{name}"));
        out.extend(view_dirs().into_iter().map(|v| format!("{IDS}/{name}/{v}")));
    }
    out
}

/// Whether `rel` is a directory a sink's layout can have (a record from outside names it).
pub fn is_sink_dir(rel: &str) -> bool {
    let views = view_dirs();
    let parts: Vec<&str> = rel.split('/').collect();
    match parts.as_slice() {
        [v] => views.contains(v) || *v == IDS,
        [id, name] => *id == IDS && is_identity_name(name),
        [id, name, v] => *id == IDS && is_identity_name(name) && views.contains(v),
        _ => false,
    }
}

fn is_identity_name(name: &str) -> bool {
    crate::source::declared::check_name(name).is_ok()
}

/// The temporary file a write of `name` goes through: a dot name in the same directory.
fn temp_name(name: &str) -> String {
    format!(".{name}.cstokenfs-tmp")
}

/// Whether `rel` is a plain relative path of at most four components (`id/NAME/.json/x`;
/// a lock file's record comes from outside: nothing in it may reach outside DIR).
pub fn is_inside(rel: &str) -> bool {
    let p = Path::new(rel);
    let parts: Vec<Component> = p.components().collect();
    !parts.is_empty() && parts.len() <= 4 && parts.iter().all(|c| matches!(c, Component::Normal(_)))
}

/// Opens the directory `rel` below `at` one component at a time, never following a
/// symlink in any of them.
fn open_below(at: BorrowedFd<'_>, rel: &str) -> io::Result<OwnedFd> {
    let mut parts = rel.split('/');
    let first = parts.next().unwrap_or(rel);
    let mut fd = open_dir_at(at, first)?;
    for part in parts {
        fd = open_dir_at(fd.as_fd(), part)?;
    }
    Ok(fd)
}

/// Opens the directory `path` names, not following a symlink in its last component.
pub fn open_dir_at(at: BorrowedFd<'_>, path: impl rustix::path::Arg) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rfs::openat(at, path, flags, Mode::empty())?)
}

/// Whether two `stat`s are of the same file.
pub fn same_file(a: &Stat, b: &Stat) -> bool {
    a.st_dev == b.st_dev && a.st_ino == b.st_ino
}

/// The effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// Why a write did not happen.
#[derive(Debug)]
pub enum WriteError {
    /// DIR's path no longer leads to the directory held (unmounted, replaced): the sink
    /// must stop writing.
    DirGone(String),
    Io(io::Error),
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::DirGone(m) => f.write_str(m),
            WriteError::Io(e) => e.fmt(f),
        }
    }
}

impl From<io::Error> for WriteError {
    fn from(e: io::Error) -> Self {
        WriteError::Io(e)
    }
}

/// DIR's owner and mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

impl Owner {
    pub fn of(st: &Stat) -> Owner {
        Owner {
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode & 0o7777,
        }
    }
}

/// Writes, replaces and removes files under one directory held open.
pub struct Writer {
    /// DIR, as opened at start.
    dir: OwnedFd,
    /// DIR's path as given (shown, and checked before each write).
    path: PathBuf,
    held: Stat,
    access: Access,
    dir_mode: u16,
    /// The view directories this writer made, held open.
    views: Vec<(String, OwnedFd)>,
    /// What this writer wrote and has not removed (relative paths): what an exit removes.
    written: RefCell<BTreeSet<String>>,
}

impl Writer {
    /// `dir` is DIR opened from `path` (as the user gave it, absolute); `dir_mode` is what the view directories get (the
    /// mount's, plus the owner's write bit when the sink needs it to replace files).
    pub fn new(dir: OwnedFd, path: PathBuf, access: Access, dir_mode: u16) -> io::Result<Writer> {
        let held = rfs::fstat(&dir)?;
        Ok(Writer {
            dir,
            path,
            held,
            access,
            dir_mode,
            views: Vec::new(),
            written: RefCell::default(),
        })
    }

    /// The files written and not removed since, relative to DIR.
    pub fn written(&self) -> Vec<String> {
        self.written.borrow().iter().cloned().collect()
    }

    /// DIR's path, as shown to people.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// DIR, held open.
    pub fn dir_fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// Whether DIR's path still leads to the directory held (the same `st_dev` and `st_ino`:
    /// a lazily unmounted tmpfs keeps both on the held descriptor, the path shows what is
    /// beneath).
    pub fn check_dir(&self) -> Result<(), WriteError> {
        let gone = |why: String| {
            WriteError::DirGone(format!(
                "{}: DIR is unusable: {why}; the sink stops writing",
                self.path.display()
            ))
        };
        match rfs::stat(&self.path) {
            Ok(now) if same_file(&now, &self.held) => Ok(()),
            Ok(_) => Err(gone(
                "the path no longer leads to the directory the sink started in (unmounted \
                 or replaced)"
                    .into(),
            )),
            Err(e) => Err(gone(io::Error::from(e).to_string())),
        }
    }

    /// The directory `rel` is in, held open, and its last component.
    fn parent_of<'a>(&self, rel: &'a str) -> io::Result<(BorrowedFd<'_>, &'a str)> {
        match rel.rsplit_once('/') {
            None => Ok((self.dir.as_fd(), rel)),
            Some((parent, name)) => self
                .views
                .iter()
                .find(|(made, _)| *made == parent)
                .map(|(_, fd)| (fd.as_fd(), name))
                .ok_or_else(|| {
                    io::Error::other(format!("{parent}: not a directory this sink made"))
                }),
        }
    }

    /// Replaces `rel` with `bytes` at once: a reader sees the whole old or the whole new file.
    pub fn write(&self, rel: &str, bytes: &[u8]) -> Result<(), WriteError> {
        self.check_dir()?;
        let (at, name) = self.parent_of(rel)?;
        let temp = temp_name(name);
        unlink_if_there(at, &temp)?;
        let written = (|| -> io::Result<()> {
            let flags =
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let fd = rfs::openat(at, &temp, flags, Mode::from_raw_mode(0o600))?;
            let mut file = std::fs::File::from(fd);
            file.write_all(bytes)?;
            rfs::fchown(&file, Some(self.uid()), Some(self.gid()))?;
            rfs::fchmod(&file, Mode::from_raw_mode(u32::from(self.access.file_mode)))?;
            // Closed before the rename: its IN_CLOSE_WRITE names the temporary file, and the
            // final name gets one IN_MOVED_TO and nothing else (a file closed after the
            // rename would add an IN_CLOSE_WRITE under the final name). tmpfs: no fsync,
            // the pages never reach a disk.
            drop(file);
            Ok(rfs::renameat(at, &temp, at, name)?)
        })();
        match written {
            Ok(()) => {
                self.written.borrow_mut().insert(rel.to_string());
                Ok(())
            }
            Err(e) => {
                let _ = rfs::unlinkat(at, &temp, AtFlags::empty());
                Err(e.into())
            }
        }
    }

    /// Removes `rel` (and a temporary file of it left by a crash); absent is fine.
    pub fn remove(&self, rel: &str) -> io::Result<()> {
        self.written.borrow_mut().remove(rel);
        let (at, name) = self.parent_of(rel)?;
        let _ = unlink_if_there(at, &temp_name(name));
        unlink_if_there(at, name)
    }

    /// Removes what a killed sink left: the regular file `rel` (and its temporary file) when
    /// its directory is DIR or a real directory in it (never through a symlink).
    pub fn remove_left(&self, rel: &str) -> io::Result<()> {
        let (opened, name) = match rel.rsplit_once('/') {
            None => (None, rel),
            Some((parent, name)) => match open_below(self.dir.as_fd(), parent) {
                Ok(fd) => (Some(fd), name),
                // Gone, or not a directory (a symlink): nothing of ours can be in it.
                Err(_) => return Ok(()),
            },
        };
        let at = opened.as_ref().map_or(self.dir.as_fd(), |fd| fd.as_fd());
        let _ = unlink_if_there(at, &temp_name(name));
        match rfs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {
                unlink_if_there(at, name)
            }
            _ => Ok(()),
        }
    }

    /// Counts `rel`, a file left by a writer before this one and kept, as written by this
    /// one: replaced by its next write, removed by `remove` and at exit.
    pub fn keep(&self, rel: &str) {
        self.written.borrow_mut().insert(rel.to_string());
    }

    /// The bytes of `rel` (at most `limit`) if it is a regular file in DIR or a directory
    /// this writer holds, with one link and exactly the owner and mode this writer gives its
    /// files: a file a writer before it wrote with the same settings. Opened without
    /// following a symlink and without blocking (a FIFO at the name is not waited on).
    pub fn read_as_written(&self, rel: &str, limit: usize) -> Option<Zeroizing<Vec<u8>>> {
        let (at, name) = self.parent_of(rel).ok()?;
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let file = std::fs::File::from(rfs::openat(at, name, flags, Mode::empty()).ok()?);
        let st = rfs::fstat(&file).ok()?;
        let as_written = FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
            && st.st_nlink == 1
            && st.st_uid == self.access.uid
            && st.st_gid == self.access.gid
            && st.st_mode & 0o7777 == u32::from(self.access.file_mode);
        let size = usize::try_from(st.st_size).ok()?;
        if !as_written || size > limit {
            return None;
        }
        let mut out = Zeroizing::new(Vec::with_capacity(size));
        std::io::Read::take(&file, limit as u64)
            .read_to_end(&mut out)
            .ok()?;
        Some(out)
    }

    /// Holds the directory `rel` a writer before this one made (a sink taking over from
    /// one that is gone) as `adopt_dir` does, and gives it the owner and mode `make_dir`
    /// gives, by descriptor.
    pub fn take_over_dir(&mut self, rel: &str) -> io::Result<()> {
        self.adopt_dir(rel)?;
        let set = match self.views.last() {
            Some((_, fd)) => rfs::fchown(fd, Some(self.uid()), Some(self.gid()))
                .and_then(|()| rfs::fchmod(fd, Mode::from_raw_mode(u32::from(self.dir_mode)))),
            None => Ok(()),
        };
        if let Err(e) = set {
            self.views.pop();
            return Err(e.into());
        }
        Ok(())
    }

    /// Whether `name` exists in DIR (not following a symlink).
    pub fn exists(&self, name: &str) -> bool {
        rfs::statat(&self.dir, name, AtFlags::SYMLINK_NOFOLLOW).is_ok()
    }

    /// Makes the view directory `name` in DIR, holds it open, and gives it the owner and
    /// mode asked for, by descriptor: what is opened must be the directory just made (a
    /// directory of ours on DIR's filesystem), not whatever another user put at that name.
    pub fn make_dir(&mut self, rel: &str) -> io::Result<()> {
        let (at, name) = self.parent_of(rel)?;
        rfs::mkdirat(at, name, Mode::from_raw_mode(0o700))?;
        let fd = open_dir_at(at, name)?;
        let st = rfs::fstat(&fd)?;
        let ours = FileType::from_raw_mode(st.st_mode) == FileType::Directory
            && st.st_uid == euid()
            && st.st_dev == self.held.st_dev;
        if !ours {
            return Err(io::Error::other(
                "replaced by another directory while it was being made",
            ));
        }
        let set = rfs::fchown(&fd, Some(self.uid()), Some(self.gid()))
            .and_then(|()| rfs::fchmod(&fd, Mode::from_raw_mode(u32::from(self.dir_mode))));
        if let Err(e) = set {
            // Not left behind half made (another owner than asked).
            unlink_if_held(at, name, fd.as_fd(), AtFlags::REMOVEDIR);
            return Err(e.into());
        }
        self.views.push((rel.to_string(), fd));
        Ok(())
    }

    /// Holds the view directory `rel` a writer of this process's predecessor made (a CSI
    /// volume adopted after a restart): opened without following a symlink, and only if it
    /// is a directory of ours on this writer's filesystem.
    pub fn adopt_dir(&mut self, rel: &str) -> io::Result<()> {
        let (at, name) = self.parent_of(rel)?;
        let fd = open_dir_at(at, name)?;
        let st = rfs::fstat(&fd)?;
        if st.st_uid != euid() || st.st_dev != self.held.st_dev {
            return Err(io::Error::other(
                "not a directory this writer's predecessor made",
            ));
        }
        self.views.push((rel.to_string(), fd));
        Ok(())
    }

    /// Removes the view directory `name` this writer made if it is still at that name and
    /// empty (anything else in it stays).
    pub fn remove_dir(&self, name: &str) {
        let Some((_, fd)) = self.views.iter().find(|(made, _)| made == name) else {
            return;
        };
        if let Ok((at, last)) = self.parent_of(name) {
            unlink_if_held(at, last, fd.as_fd(), AtFlags::REMOVEDIR);
        }
    }

    /// Removes the directory `name` a killed sink made, if it is empty and a directory.
    pub fn remove_left_dir(&self, name: &str) {
        match name.rsplit_once('/') {
            None => drop(rfs::unlinkat(&self.dir, name, AtFlags::REMOVEDIR)),
            Some((parent, last)) => {
                if let Ok(at) = open_below(self.dir.as_fd(), parent) {
                    let _ = rfs::unlinkat(&at, last, AtFlags::REMOVEDIR);
                }
            }
        }
    }

    /// DIR's owner and mode now (of the directory held).
    pub fn dir_owner(&self) -> io::Result<Owner> {
        Ok(Owner::of(&rfs::fstat(&self.dir)?))
    }

    /// Gives DIR (the directory held) `uid`, `gid` (each only if given) and `mode`.
    pub fn set_dir_owner(&self, uid: Option<u32>, gid: Option<u32>, mode: u32) -> io::Result<()> {
        if uid.is_some() || gid.is_some() {
            rfs::fchown(&self.dir, uid.map(Uid::from_raw), gid.map(Gid::from_raw))?;
        }
        Ok(rfs::fchmod(&self.dir, Mode::from_raw_mode(mode))?)
    }

    fn uid(&self) -> Uid {
        Uid::from_raw(self.access.uid)
    }

    fn gid(&self) -> Gid {
        Gid::from_raw(self.access.gid)
    }
}

/// Unlinks `name` in `at` (with `flags`) if it is still the file `held` is open on: what
/// someone else put at the name since stays.
pub fn unlink_if_held(at: BorrowedFd<'_>, name: &str, held: BorrowedFd<'_>, flags: AtFlags) {
    let there = rfs::statat(at, name, AtFlags::SYMLINK_NOFOLLOW);
    if let (Ok(there), Ok(held)) = (there, rfs::fstat(held)) {
        if same_file(&there, &held) {
            let _ = rfs::unlinkat(at, name, flags);
        }
    }
}

/// Unlinks the non-directory `name` in `at`; absent is fine.
fn unlink_if_there(at: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    match rfs::unlinkat(at, name, AtFlags::empty()) {
        Err(rustix::io::Errno::NOENT) => Ok(()),
        other => Ok(other?),
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
        let fd = open_dir_at(rfs::CWD, dir).unwrap();
        Writer::new(fd, dir.to_path_buf(), access, 0o750).unwrap()
    }

    fn rename(from: &Path, to: &Path) {
        rfs::renameat(rfs::CWD, from, rfs::CWD, to).unwrap();
    }

    #[test]
    fn paths_follow_the_mount_layout() {
        assert_eq!(view_path(View::Raw, "a"), "a");
        assert_eq!(view_path(View::Json, "a"), ".json/a");
        assert_eq!(view_path(View::GitCredential, "a"), ".git-credential/a");
        assert_eq!(temp_name("a"), ".a.cstokenfs-tmp");
        assert_eq!(
            view_dirs().len(),
            View::ALL.len() - 1,
            "every view but the raw token"
        );
    }

    #[test]
    fn only_plain_relative_paths_are_inside() {
        assert!(is_inside("a") && is_inside(".json/a") && is_inside("id/ci/.json/a"));
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            ".json/../../x",
            "a/b/c/d/e",
            "./a",
        ] {
            assert!(!is_inside(bad), "{bad}");
        }
        for dir in [".json", "id", "id/ci", "id/ci/.claims"] {
            assert!(is_sink_dir(dir), "{dir}");
        }
        for bad in ["id/CI", "id/ci/x", "etc", "id/ci/.json/a", "x/ci"] {
            assert!(!is_sink_dir(bad), "{bad}");
        }
        assert_eq!(dirs(&[]), view_dirs());
        let two = dirs(&["a".into(), "b".into()]);
        assert_eq!(two.len(), view_dirs().len() * 3 + 3);
        assert!(two.iter().position(|d| d == "id") < two.iter().position(|d| d == "id/a"));
    }

    #[test]
    fn a_write_replaces_the_file_with_the_mode_asked_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
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

    /// Whatever a watcher asks for, a replacement gives the final name one event: the
    /// temporary file is written, given its owner and mode, and closed under its own name.
    #[test]
    fn a_write_gives_the_final_name_one_moved_to_and_nothing_else() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path());
        // SAFETY: plain inotify calls on a descriptor this test owns.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0);
        let path = std::ffi::CString::new(dir.path().as_os_str().as_bytes()).unwrap();
        // SAFETY: as above.
        assert!(unsafe { libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_ALL_EVENTS) } >= 0);
        w.write("a", b"one").unwrap();
        w.write("a", b"two").unwrap();
        let mut buf = [0u8; 4096];
        // SAFETY: reading into a buffer we own.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        // SAFETY: closing our descriptor.
        unsafe { libc::close(fd) };
        assert!(n > 0);
        let (mut at, mut on_a) = (0, Vec::new());
        while at < n as usize {
            let mask = u32::from_ne_bytes(buf[at + 4..at + 8].try_into().unwrap());
            let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
            let name = buf[at + 16..at + 16 + len]
                .split(|b| *b == 0)
                .next()
                .unwrap();
            if name == b"a" {
                on_a.push(mask);
            }
            at += 16 + len;
        }
        assert_eq!(on_a, [libc::IN_MOVED_TO, libc::IN_MOVED_TO]);
    }

    /// A view directory swapped for a symlink to another directory: the writer keeps
    /// writing into (and removing from) the directory it made; the other one is untouched.
    #[test]
    fn a_view_dir_swapped_for_a_symlink_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = tempfile::tempdir().unwrap();
        std::fs::write(victim.path().join("a"), b"victim").unwrap();
        let mut w = writer(dir.path());
        w.make_dir(".json").unwrap();
        rename(&dir.path().join(".json"), &dir.path().join("moved"));
        std::os::unix::fs::symlink(victim.path(), dir.path().join(".json")).unwrap();
        w.write(".json/a", b"token").unwrap();
        assert_eq!(std::fs::read(victim.path().join("a")).unwrap(), b"victim");
        assert_eq!(std::fs::read(dir.path().join("moved/a")).unwrap(), b"token");
        w.remove(".json/a").unwrap();
        w.remove_left(".json/a").unwrap();
        w.remove_dir(".json");
        w.remove_left_dir(".json");
        assert_eq!(std::fs::read(victim.path().join("a")).unwrap(), b"victim");
        assert!(dir.path().join(".json").symlink_metadata().is_ok());
    }

    /// A file swapped for a symlink: replaced by the new file (the link itself), the
    /// target untouched; a removal unlinks the link, not its target.
    #[test]
    fn a_file_swapped_for_a_symlink_replaces_the_link_not_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let victim = tempfile::tempdir().unwrap();
        let target = victim.path().join("t");
        std::fs::write(&target, b"victim").unwrap();
        let w = writer(dir.path());
        std::os::unix::fs::symlink(&target, dir.path().join(".a.cstokenfs-tmp")).unwrap();
        w.write("a", b"token").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("b")).unwrap();
        w.remove("b").unwrap();
        w.remove_left("a").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"victim");
        assert!(!dir.path().join("a").exists() && !dir.path().join("b").exists());
    }

    #[test]
    fn a_directory_moved_away_from_its_path_stops_the_writes() {
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("d");
        rfs::mkdir(&path, Mode::from_raw_mode(0o700)).unwrap();
        let w = writer(&path);
        w.write("a", b"one").unwrap();
        rename(&path, &parent.path().join("e"));
        rfs::mkdir(&path, Mode::from_raw_mode(0o700)).unwrap();
        match w.write("a", b"two") {
            Err(WriteError::DirGone(m)) => assert!(m.contains("DIR is unusable"), "{m}"),
            other => panic!("expected DirGone, got {other:?}"),
        }
        assert_eq!(std::fs::read_dir(&path).unwrap().count(), 0);
    }

    /// DIR given as a symlink: the path checked is the one given, so a symlink that now
    /// leads elsewhere stops the writes too.
    #[test]
    fn a_dir_given_through_a_symlink_that_now_leads_elsewhere_stops_the_writes() {
        let parent = tempfile::tempdir().unwrap();
        let (a, b, link) = (
            parent.path().join("a"),
            parent.path().join("b"),
            parent.path().join("link"),
        );
        for d in [&a, &b] {
            rfs::mkdir(d, Mode::from_raw_mode(0o700)).unwrap();
        }
        rfs::symlink(&a, &link).unwrap();
        let access = Access {
            uid: euid(),
            // SAFETY: getgid cannot fail.
            gid: unsafe { libc::getgid() },
            file_mode: 0o400,
        };
        let fd = open_dir_at(rfs::CWD, &a).unwrap();
        let w = Writer::new(fd, link.clone(), access, 0o500).unwrap();
        w.write("x", b"one").unwrap();
        rfs::unlink(&link).unwrap();
        rfs::symlink(&b, &link).unwrap();
        assert!(matches!(w.write("x", b"two"), Err(WriteError::DirGone(_))));
        assert_eq!(std::fs::read_dir(&b).unwrap().count(), 0);
    }

    /// A view directory removed by someone else: its writes fail (ENOENT) and nothing is
    /// made at its name again behind the sink's back.
    #[test]
    fn a_removed_view_dir_fails_its_writes_with_enoent() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        w.make_dir(".json").unwrap();
        rfs::unlinkat(rfs::CWD, dir.path().join(".json"), AtFlags::REMOVEDIR).unwrap();
        match w.write(".json/a", b"token") {
            Err(WriteError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::NotFound),
            other => panic!("expected ENOENT, got {other:?}"),
        }
        assert!(!dir.path().join(".json").exists());
    }
}
