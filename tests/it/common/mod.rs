//! Shared test plumbing: the in-process emulator, a real mount of the built binary with a
//! guard that unmounts on drop (even when the test fails), and token-safe assertions.
#![allow(dead_code)]

/// Returns early from a FUSE test where FUSE is absent (loudly; a failure when `CI=true`).
macro_rules! need_fuse {
    () => {
        if !crate::common::fuse_available() {
            return;
        }
    };
}

use cstokenfs::emulator::{Emulator, EmulatorConfig};
use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_cstokenfs");

/// Variables that steer source detection; tests set them explicitly.
pub const IDENTITY_VARS: [&str; 14] = [
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IMDS_ENDPOINT",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
    "HTTPS_PROXY",
    "https_proxy",
];

/// FUSE tests need /dev/fuse. Without it they say so loudly, and fail when `CI=true`.
pub fn fuse_available() -> bool {
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    // The standard harness has no runtime skip: the test "passes", so it says loudly, by
    // name, that it was skipped.
    let test = std::thread::current().name().unwrap_or("?").to_string();
    let msg = format!("SKIPPED {test}: /dev/fuse is missing, this FUSE test did not run");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true makes this a failure)");
    }
    eprintln!("\n!!!!! {msg} !!!!!\n");
    false
}

pub fn emulator() -> Emulator {
    emulator_with(EmulatorConfig::default())
}

pub fn emulator_with(config: EmulatorConfig) -> Emulator {
    Emulator::start("127.0.0.1:0".parse().unwrap(), config).expect("start the emulator")
}

/// A loopback port where nothing listens (yet). Taken below the kernel's ephemeral range
/// (32768 and up), so no other test's `bind(0)` is handed it before this test binds it
/// itself; ports are spread by pid and a counter, and checked free.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    for _ in 0..2000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let spread = std::process::id().wrapping_mul(397).wrapping_add(n) % 12_000;
        let port = 20_000 + spread as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

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
        let mut cmd = Command::new(BIN);
        cmd.args(["mount", "-f"]).args(args).arg(&path);
        for k in IDENTITY_VARS {
            cmd.env_remove(k);
        }
        cmd.stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
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
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(&self.path) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "cstokenfs exited with {status} before mounting: {}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "mount not live within 20 s: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
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
        expect_err(self.read(rel), rel)
    }

    /// `.status`, parsed.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_slice(&self.read(".status").expect("read .status"))
            .expect(".status is JSON")
    }

    /// `.status`'s entry for one resource string (Null if none).
    pub fn resource_status(&self, resource: &str) -> serde_json::Value {
        self.status()["resources"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["resource"] == resource).cloned())
            .unwrap_or(serde_json::Value::Null)
    }

    /// `--serve-endpoint`'s address and secret, from `MOUNT/.env` (exactly its two lines).
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
        assert_eq!(lines.next(), None, "two lines");
        (addr, secret)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
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

/// The claims of a JWT-shaped token (the emulator's).
pub fn claims(token: &[u8]) -> serde_json::Value {
    let text = std::str::from_utf8(token).expect("token is UTF-8");
    cstokenfs::emulator::decode_claims(text).expect("token is JWT-shaped")
}

pub fn serial(token: &[u8]) -> u64 {
    claims(token)["serial"].as_u64().expect("serial claim")
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Compares two tokens without ever printing one.
pub fn assert_same_token(a: &[u8], b: &[u8], what: &str) {
    assert!(
        a == b,
        "{what}: tokens differ (lengths {} and {}; contents not shown)",
        a.len(),
        b.len()
    );
}

/// Asserts `haystack` does not contain `token` (nor its payload), without printing either.
pub fn assert_no_token(haystack: &str, token: &[u8], what: &str) {
    let t = String::from_utf8_lossy(token);
    let payload = t.split('.').nth(1).unwrap_or(&t);
    assert!(
        !haystack.contains(&*t),
        "{what} contains a token ({} bytes; not shown)",
        token.len()
    );
    assert!(
        payload.len() < 8 || !haystack.contains(payload),
        "{what} contains a token's payload (not shown)"
    );
}

/// Polls `f` until it returns Some, up to `within`.
pub fn eventually<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
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
        eventually(Duration::from_secs(5), || {
            (!is_mounted(&self.0)).then_some(())
        });
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

/// Whether a tool the test needs is installed at one of `paths`; where it is not, the test
/// says loudly that it is skipped, and fails when `CI=true` (CI installs every tool).
pub fn have_tool(paths: &[&str], what: &str) -> bool {
    if paths.iter().any(|p| Path::new(p).exists()) {
        return true;
    }
    let test = std::thread::current().name().unwrap_or("?").to_string();
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what} is missing in CI ({test})"
    );
    eprintln!("\n!!!!! SKIPPED {test}: {what} is missing !!!!!\n");
    false
}

/// Makes /dev/fuse usable by ordinary users (mode 0666, as udev sets it on every
/// distribution) while any guard of this process lives; the last one puts the mode back.
pub struct DevFuseOpen;

static DEV_FUSE_OPEN: parking_lot::Mutex<Option<(usize, u32)>> = parking_lot::Mutex::new(None);

impl DevFuseOpen {
    pub fn new() -> DevFuseOpen {
        use std::os::unix::fs::PermissionsExt;
        let mut held = DEV_FUSE_OPEN.lock();
        let (count, _) = held.get_or_insert_with(|| {
            let mode = std::fs::metadata("/dev/fuse").unwrap().permissions().mode();
            std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(mode | 0o666))
                .unwrap();
            (0, mode)
        });
        *count += 1;
        DevFuseOpen
    }
}

impl Drop for DevFuseOpen {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let mut held = DEV_FUSE_OPEN.lock();
        if let Some((count, mode)) = held.as_mut() {
            *count -= 1;
            if *count == 0 {
                let _ =
                    std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(*mode));
                *held = None;
            }
        }
    }
}

/// The error of a read that must fail; a success fails the test with the length of what
/// was read, never its bytes (a token).
pub fn expect_err(read: std::io::Result<Vec<u8>>, what: &str) -> std::io::Error {
    match read {
        Ok(bytes) => panic!(
            "{what}: the read succeeded ({} bytes; not shown)",
            bytes.len()
        ),
        Err(e) => e,
    }
}
