//! Shared test plumbing: the in-process emulator, real mounts (`mount`), `.status`
//! (`status`), running the binary and other uids (`run`), waits on conditions
//! (`eventually`) and token-safe assertions.
#![allow(dead_code)]

/// Returns early from a FUSE test where FUSE is absent (loudly; a failure when `CI=true`).
macro_rules! need_fuse {
    () => {
        if !crate::common::fuse_available() {
            return;
        }
    };
}

pub mod csi;
mod mount;
mod run;
mod scrape;
mod status;

pub use mount::*;
pub use run::*;
pub use scrape::*;
pub use status::*;

use cstokenfs::emulator::{Emulator, EmulatorConfig};
use std::path::Path;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_cstokenfs");

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

/// Waits until the wall clock has reached `epoch_secs` (a token's `exp`): a wait on the
/// clock itself, bounded by how far ahead it is.
pub fn wait_until_epoch(epoch_secs: i64) {
    let ahead = (epoch_secs - now_secs()).max(0) as u64;
    eventually(Duration::from_secs(ahead + 2), || {
        (now_secs() >= epoch_secs).then_some(())
    })
    .expect("the clock moves");
}

pub fn errno(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
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
