//! Real mounts of the built binary: `Mounted` (a foreground `cstokenfs mount`, unmounted
//! when dropped, even when the test fails), guards for mounts made by hand, and the mount
//! table.

use super::eventually;
use super::run::{cli, wait_child};
use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// A foreground `cstokenfs mount` of the built binary, unmounted when dropped.
pub struct Mounted {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

impl Mounted {
    /// Mounts with `--endpoint url -f` plus `extra`, and waits until the mount is live.
    pub fn new(url: &str, extra: &[&str]) -> Mounted {
        Mounted::with_env(url, extra, &[])
    }

    /// `Mounted::new` with `--serve-endpoint 127.0.0.1:0` too (`endpoint()` reads where).
    pub fn serving(url: &str, extra: &[&str]) -> Mounted {
        let mut args = vec!["--serve-endpoint", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Mounted::new(url, &args)
    }

    pub fn with_env(url: &str, extra: &[&str], env: &[(&str, &str)]) -> Mounted {
        let mut args = vec!["--endpoint", url];
        args.extend_from_slice(extra);
        Mounted::raw(&args, env)
    }

    /// `mount -f ARGS MNT` with this machine's identity variables removed and `env` set.
    pub fn raw(args: &[&str], env: &[(&str, &str)]) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let log = dir.path().join("daemon.log");
        let mut cmd = cli(["mount", "-f"]);
        cmd.args(args).arg(&path);
        cmd.stdout(File::create(&log).unwrap())
            .stderr(File::create(&log).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn cstokenfs");
        let mut m = Mounted {
            dir,
            path,
            log,
            child: Some(child),
        };
        m.wait_live();
        m
    }

    fn wait_live(&mut self) {
        let live = eventually(Duration::from_secs(20), || {
            if is_mounted(&self.path) {
                return Some(Ok(()));
            }
            let exited = self.child.as_mut()?.try_wait().ok().flatten();
            exited.map(Err)
        });
        match live {
            Some(Ok(())) => {}
            Some(Err(status)) => panic!(
                "cstokenfs exited with {status} before mounting: {}",
                self.log_text()
            ),
            None => panic!("mount not live within 20 s: {}", self.log_text()),
        }
    }

    pub fn file(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    pub fn read(&self, rel: &str) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.file(rel))
    }

    /// A read that must fail: its error. A read that succeeds fails the test naming only
    /// the length of what it got (never the token).
    pub fn read_err(&self, rel: &str) -> std::io::Error {
        super::expect_err(self.read(rel), rel)
    }

    /// `--serve-endpoint`'s address and secret, from `MOUNT/.env` (exactly its four lines).
    pub fn endpoint(&self) -> (std::net::SocketAddr, String) {
        let env = String::from_utf8(self.read(".env").expect("read .env")).unwrap();
        let mut lines = env.lines();
        let url = lines
            .next()
            .and_then(|l| l.strip_prefix("IDENTITY_ENDPOINT=http://"))
            .expect("IDENTITY_ENDPOINT first");
        let addr = url
            .strip_suffix("/msi/token")
            .expect("/msi/token")
            .parse()
            .unwrap();
        let secret = lines
            .next()
            .and_then(|l| l.strip_prefix("IDENTITY_HEADER="))
            .expect("IDENTITY_HEADER second")
            .to_string();
        // 2017-09-01's names for the same URL and secret.
        let msi = format!("MSI_ENDPOINT=http://{url}");
        assert_eq!(lines.next(), Some(msi.as_str()), "MSI_ENDPOINT third");
        let msi_secret = format!("MSI_SECRET={secret}");
        assert!(
            lines.next() == Some(msi_secret.as_str()),
            "MSI_SECRET fourth"
        );
        assert_eq!(lines.next(), None, "four lines");
        (addr, secret)
    }

    /// `--serve-imds`'s address, from `MOUNT/.env`'s `AZURE_POD_IDENTITY_AUTHORITY_HOST`.
    pub fn imds(&self) -> std::net::SocketAddr {
        let env = String::from_utf8(self.read(".env").expect("read .env")).unwrap();
        env.lines()
            .find_map(|l| l.strip_prefix("AZURE_POD_IDENTITY_AUTHORITY_HOST=http://"))
            .expect("AZURE_POD_IDENTITY_AUTHORITY_HOST in .env")
            .parse()
            .expect("an IP:PORT")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the daemon's log holds `needle`: the log then (None if it did not
    /// within `within`).
    /// Everything a secret could leak into from the daemon: its log and `.status`.
    pub fn leak_surface(&self) -> String {
        format!(
            "{}\n{}",
            self.log_text(),
            String::from_utf8_lossy(&self.read(".status").unwrap_or_default())
        )
    }

    pub fn wait_log(&self, needle: &str, within: Duration) -> Option<String> {
        eventually(within, || {
            let log = self.log_text();
            log.contains(needle).then_some(log)
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill with a pid we spawned.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Waits for the daemon to exit; its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let status = wait_child(self.child.as_mut()?, within)?;
        self.child = None;
        status.code()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            if wait_child(&mut child, Duration::from_secs(5)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        lazy_unmount(&self.path);
    }
}

pub fn lazy_unmount(path: &Path) {
    if is_mounted(path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path; MNT_DETACH never blocks.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Whether `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let want = path.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Waits until `path` is a mount point; false if it is not within `within`.
pub fn wait_mounted(path: &Path, within: Duration) -> bool {
    eventually(within, || is_mounted(path).then_some(())).is_some()
}

/// Waits until `path` is no longer a mount point; false if it still is after `within`.
pub fn wait_unmounted(path: &Path, within: Duration) -> bool {
    eventually(within, || (!is_mounted(path)).then_some(())).is_some()
}

/// For mounts a test makes by hand (detached, fstab, ...): on drop, SIGTERM every daemon
/// serving `path`, then detach whatever is still mounted there.
pub struct KillOnDrop(pub PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-TERM", "-f", &format!("cstokenfs.*{}", self.0.display())])
            .status();
        // Give the daemon time to unmount itself; detach whatever is still there.
        wait_unmounted(&self.0, Duration::from_secs(5));
        lazy_unmount(&self.0);
    }
}

/// A temporary directory with an empty `mnt` directory in it, for mounts made by hand.
pub fn scratch_mountpoint() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    (dir, mnt)
}
