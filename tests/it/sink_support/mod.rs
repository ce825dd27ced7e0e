//! Plumbing of the sink tests: a real tmpfs (unmounted on drop), a foreground sink of the
//! built binary (stopped on drop), and small readers of DIR.
#![allow(dead_code)]

use crate::common::*;
use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// A tmpfs mounted on a fresh directory, unmounted when dropped.
pub struct Tmpfs {
    _parent: tempfile::TempDir,
    pub path: PathBuf,
    /// The owner and mode of the directory beneath the mount (uid, gid, mode).
    pub beneath: (u32, u32, u32),
}

impl Tmpfs {
    pub fn new() -> Tmpfs {
        Tmpfs::with_options("mode=0700,size=1m")
    }

    /// With these mount options; its parent is 0755 so that other users can reach it.
    pub fn with_options(options: &str) -> Tmpfs {
        let parent = tempfile::tempdir().unwrap();
        std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = parent.path().join("tokens");
        std::fs::create_dir(&path).unwrap();
        let m = std::fs::metadata(&path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "mount -t tmpfs (these tests run as root)");
        Tmpfs {
            _parent: parent,
            path,
            beneath: (m.uid(), m.gid(), m.mode()),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        lazy_unmount(&self.path);
    }
}

/// A `cstokenfs sink -f` of the built binary, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Sink {
    child: Option<Child>,
    log: tempfile::NamedTempFile,
}

pub fn sink_cmd(url: &str, dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = cli(["sink", "--endpoint", url]);
    cmd.args(extra).arg(dir);
    cmd
}

impl Sink {
    pub fn start(url: &str, dir: &Path, extra: &[&str]) -> Sink {
        Sink::spawn(sink_cmd(url, dir, &[&["-f"], extra].concat()), dir)
    }

    /// Starts `cmd` (a `sink_cmd` with `-f`) and waits for `dir/.status`.
    pub fn spawn(mut cmd: Command, dir: &Path) -> Sink {
        let log = tempfile::NamedTempFile::new().unwrap();
        cmd.stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap());
        let child = cmd.spawn().expect("spawn cstokenfs sink");
        let s = Sink {
            child: Some(child),
            log,
        };
        let up = eventually(Duration::from_secs(20), || {
            dir.join(".status").exists().then_some(())
        });
        assert!(up.is_some(), "no .status within 20 s: {}", s.log_text());
        s
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Sends `sig` and waits for the exit code.
    pub fn stop(&mut self, sig: i32) -> Option<i32> {
        self.signal(sig);
        self.wait_exit(Duration::from_secs(10))
    }

    /// Waits for the sink to exit on its own (killed after `within`): its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        if let Some(status) = wait_child(&mut child, within) {
            return status.code();
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop(libc::SIGTERM);
    }
}

/// Every name under `dir`, recursively, relative to it (`.json/x`, ...).
pub fn tree(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    // Tolerant of entries going away meanwhile (a sink removing its files).
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            for sub in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                out.insert(format!("{name}/{}", sub.file_name().to_string_lossy()));
            }
        }
        out.insert(name);
    }
    out
}

pub fn status(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join(".status")).unwrap()).unwrap()
}

pub fn wait_file(path: &Path, within: Duration) -> Vec<u8> {
    eventually(within, || std::fs::read(path).ok())
        .unwrap_or_else(|| panic!("{} did not appear", path.display()))
}

/// Another user (nobody): an attacker, or a sink that is not root.
pub const NOBODY: u32 = 65534;
