//! Issue 10 (hardening): shutdown with open files, `.status` memory, `--mlock`, the
//! `--timeout` bound, and the FUSE calls fuser would log as not implemented. Real mounts of
//! the built binary against the in-process emulator on 127.0.0.1. Issue 19: log files.

use crate::common;
use crate::sink_support;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

#[test]
fn timeout_above_sixty_seconds_is_a_usage_error_that_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().to_str().unwrap();
    let cases: [Vec<&str>; 4] = [
        vec!["mount", "--timeout", "90", mnt],
        vec!["mount", "-o", "timeout=90", mnt],
        vec![
            "get",
            "--emulator",
            "--timeout",
            "3600",
            "management.azure.com",
        ],
        vec!["src", mnt, "-o", "timeout=61"],
    ];
    for args in cases {
        let out = cli(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("at most 60 s")
                && err.contains("cannot be interrupted")
                && err.contains("120 s"),
            "{args:?}: {err}"
        );
        assert!(!is_mounted(dir.path()), "{args:?} mounted nothing");
    }
    let out = cli(["mount", "--timeout", "0", mnt]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "--timeout 0");
    // 60 is accepted.
    let out = cli([
        "get",
        "--emulator",
        "--timeout",
        "60",
        "management.azure.com",
    ])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "--timeout 60: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Python's `open()` sends TCGETS (isatty); fuser would log three WARN lines for each.
#[test]
fn python_opens_ioctl_lseek_and_fsync_are_answered_without_logging() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &[]);
    let token = m.file("management.azure.com");
    let size = std::fs::metadata(&token).unwrap().len();
    assert!(size > 0);
    let script = r#"
import os, sys
p = sys.argv[1]
total = 0
for _ in range(1000):
    with open(p) as f:
        os.isatty(f.fileno())
        total += len(f.read())
fd = os.open(p, os.O_RDONLY)
size = os.fstat(fd).st_size
assert os.lseek(fd, 0, os.SEEK_HOLE) == size, "SEEK_HOLE is the size"
assert os.lseek(fd, 3, os.SEEK_DATA) == 3, "SEEK_DATA at 3 is 3"
try:
    os.lseek(fd, size, os.SEEK_DATA)
    raise SystemExit("SEEK_DATA at the end must fail")
except OSError as e:
    assert e.errno == 6, e.errno  # ENXIO
os.fsync(fd)
os.close(fd)
dfd = os.open(os.path.dirname(p), os.O_RDONLY | os.O_DIRECTORY)
os.fsync(dfd)
os.close(dfd)
print(total // 1000)
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&token)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        size.to_string(),
        "every open read the whole token (length only)"
    );
    // statfs (df) is answered too.
    assert!(Command::new("stat")
        .args(["-f"])
        .arg(&m.path)
        .output()
        .unwrap()
        .status
        .success());
    let log = m.log_text();
    assert!(
        !log.contains("Not Implemented"),
        "fuser's not-implemented warnings: {} lines",
        log.lines()
            .filter(|l| l.contains("Not Implemented"))
            .count()
    );
    // The audit lines for one process are rate limited: a handful, not thousands.
    assert!(
        log.len() < 16 * 1024,
        "the log grew to {} bytes for 1,000 opens",
        log.len()
    );
}

/// A file held open across SIGTERM must not go on reading the token from the page cache once
/// the daemon is gone (the fault: `pread` of exactly `st_size` bytes after the exit).
#[test]
fn sigterm_drops_cached_pages_of_files_held_open() {
    need_fuse!();
    use std::os::unix::fs::FileExt;
    let emu = emulator();
    let mut m = Mounted::new(&emu.url(), &[]);
    let mut held = Vec::new();
    for rel in ["management.azure.com", ".json/vault.azure.net"] {
        let f = std::fs::File::open(m.file(rel)).unwrap();
        let size = f.metadata().unwrap().len() as usize;
        let mut first = vec![0u8; size];
        assert_eq!(f.read_at(&mut first, 0).unwrap(), size, "{rel}: first read");
        held.push((rel, f, first));
    }
    m.signal(libc::SIGTERM);
    assert_eq!(m.wait_exit(Duration::from_secs(10)), Some(0));
    for (rel, f, first) in &held {
        let mut again = vec![0u8; first.len()];
        match f.read_at(&mut again, 0) {
            Err(_) => {}
            Ok(n) => assert!(
                n == 0 || again[..n] != first[..n.min(first.len())],
                "{rel}: {n} of {} bytes read back from the page cache after the daemon exited \
                 (contents not shown)",
                first.len()
            ),
        }
    }
    assert!(
        m.log_text().contains("dropped the cached pages of"),
        "the daemon says it dropped the pages"
    );
}

/// The fault: 200 handles held open on a `.status` listing 1,000 names (each snapshot some
/// 300 KiB); one snapshot per open cost 68 MiB here, and 19 MiB stayed after closing.
#[test]
fn status_handles_share_snapshots_and_give_memory_back() {
    need_fuse!();
    use std::io::Read;
    let emu = emulator();
    let names: Vec<String> = (0..1000).map(|i| format!("r{i:04}.example.com")).collect();
    let mut args = Vec::new();
    for n in &names {
        args.extend(["--resource", n.as_str()]);
    }
    let m = Mounted::new(&emu.url(), &args);
    let status = m.status();
    assert_eq!(status["resources"].as_array().map(Vec::len), Some(1000));
    let before = proc_kib(m.pid(), "VmRSS");
    let mut held = Vec::new();
    for _ in 0..200 {
        let mut f = std::fs::File::open(m.file(".status")).unwrap();
        let mut text = Vec::new();
        f.read_to_end(&mut text).unwrap();
        assert!(text.len() > 100_000, "a .status of 1,000 names");
        held.push(f);
    }
    let open = proc_kib(m.pid(), "VmRSS");
    let grown = open.saturating_sub(before);
    eprintln!("daemon RSS: {before} KiB before, {open} KiB with 200 .status handles open");
    assert!(
        grown < 48 * 1024,
        "200 open .status handles cost {grown} KiB (bound: 48 MiB)"
    );
    drop(held);
    // Released asynchronously by the kernel (RELEASE): wait until the daemon has them all.
    let settled = eventually(Duration::from_secs(10), || {
        let now = proc_kib(m.pid(), "VmRSS");
        (now.saturating_sub(before) < 16 * 1024).then_some(now)
    });
    assert!(
        settled.is_some(),
        "memory not given back after closing: {} KiB over the start",
        proc_kib(m.pid(), "VmRSS").saturating_sub(before)
    );
}

/// `VmLck` or `VmRSS` of a process, in KiB.
fn proc_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/PID/status"))
}

/// The fault: `--mlock` locked every thread's whole stack and every malloc arena up front
/// (54-60 MB resident at start instead of 5 MB).
#[test]
fn mlock_mount_starts_small_and_serves() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &["--mlock"]);
    let token = m
        .read("management.azure.com")
        .expect("a --mlock mount serves tokens");
    assert!(!token.is_empty());
    let rss = proc_kib(m.pid(), "VmRSS");
    let locked = proc_kib(m.pid(), "VmLck");
    eprintln!("--mlock daemon: VmRSS {rss} KiB, VmLck {locked} KiB");
    assert!(locked > 0, "memory is locked");
    // About 20 MiB unoptimised (the executable's pages touched at start, its relocated
    // data): the bound leaves room for the binary to grow, far below the fault's 54-60 MB.
    assert!(
        rss < 24 * 1024,
        "--mlock daemon resident at start: {rss} KiB"
    );
}

/// `--mlock` without CAP_IPC_LOCK (Docker's default) under a small RLIMIT_MEMLOCK: a clear
/// line naming the capability or the limit, not "cannot start a thread".
#[test]
fn mlock_without_the_capability_or_the_limit_says_which() {
    need_fuse!();
    let (_dir, mnt) = scratch_mountpoint();
    let _guard = KillOnDrop(mnt.clone());
    let url = format!("http://127.0.0.1:{}/oauth2/token", free_port());
    let attempt = |memlock: &str| {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--memlock={memlock}:{memlock}"))
            .args([
                "setpriv",
                "--bounding-set",
                "-ipc_lock",
                "--inh-caps",
                "-ipc_lock",
                BIN,
                "mount",
                "-f",
                "--mlock",
                "--endpoint",
                &url,
            ])
            .arg(&mnt);
        without_identity(&mut cmd)
            .output()
            .expect("prlimit and setpriv (util-linux)")
    };
    let cases = [
        ("0", vec!["needs CAP_IPC_LOCK", "--cap-add IPC_LOCK"]),
        (
            "65536",
            vec![
                "RLIMIT_MEMLOCK is 64 KiB",
                "ulimit -l",
                "LimitMEMLOCK=",
                "--ulimit memlock=-1",
            ],
        ),
    ];
    for (memlock, wanted) in cases {
        let out = attempt(memlock);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "memlock {memlock}: mounted anyway");
        for w in wanted {
            assert!(err.contains(w), "memlock {memlock}: {err}");
        }
        assert!(!err.contains("cannot start a thread"), "{err}");
        assert!(!is_mounted(&mnt));
    }
}

/// The same as an ordinary user (uid 1000, no capabilities) under a 64 KiB RLIMIT_MEMLOCK.
#[test]
fn mlock_as_an_ordinary_user_under_a_small_limit_says_so() {
    need_fuse!();
    use std::os::unix::fs::PermissionsExt;
    let _open = DevFuseOpen::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mnt = dir.path().join("cstoken");
    std::fs::create_dir(&mnt).unwrap();
    std::os::unix::fs::chown(&mnt, Some(1000), Some(1000)).unwrap();
    let _guard = KillOnDrop(mnt.clone());
    let url = format!("http://127.0.0.1:{}/oauth2/token", free_port());
    let mut cmd = Command::new("prlimit");
    cmd.arg("--memlock=65536:65536")
        .args(setpriv_args(1000, 1000))
        .args([BIN, "mount", "--mlock", "--endpoint", &url])
        .arg(&mnt);
    let out = without_identity(&mut cmd)
        .output()
        .expect("prlimit and setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mounted anyway");
    assert!(err.contains("RLIMIT_MEMLOCK is 64 KiB"), "{err}");
    assert!(!err.contains("cannot start a thread"), "{err}");
    assert!(!is_mounted(&mnt));
}

/// A detached mount logging to `log` (unmounted when the guard drops).
fn mount_logging_to(url: &str, log: &Path, mnt: &Path) -> Output {
    let (log, mnt) = (log.to_str().unwrap(), mnt.to_str().unwrap());
    run_bounded(&["mount", "--endpoint", url, "--log-file", log, mnt])
}

/// Should a sink start after all (detached, on DIR), it is stopped when this drops.
struct StopSinks<'a>(&'a Path);

impl Drop for StopSinks<'_> {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args([
                "-TERM",
                "-f",
                &format!("cstokenfs sink.*{}", self.0.display()),
            ])
            .status();
    }
}

/// A link planted where the log file goes, a log file someone else owns, a FIFO: mount and
/// sink exit 1 before detaching, saying why; nothing is created or written through the link.
#[test]
fn log_files_through_links_or_owned_by_others_are_refused() {
    need_fuse!();
    let emu = emulator();
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("root-only");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let target = private.join("created.log");
    let link = dir.path().join("planted.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let foreign = dir.path().join("foreign.log");
    std::fs::write(&foreign, "").unwrap();
    std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
    let fifo = dir.path().join("fifo.log");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let sink_dir = sink_support::Tmpfs::new();
    let _sink_guard = StopSinks(&sink_dir.path);
    let (_d, mnt) = scratch_mountpoint();
    let _guard = KillOnDrop(mnt.clone());
    for (log, why) in [
        (&link, "is a symbolic link"),
        (&foreign, "is owned by uid 65534"),
        (&fifo, "is not a regular file"),
    ] {
        let logged = log.to_str().unwrap();
        let mount = mount_logging_to(&emu.url(), log, &mnt);
        let sink = run_bounded(&[
            "sink",
            "--endpoint",
            &emu.url(),
            "--resource",
            "vault.azure.net",
            "--log-file",
            logged,
            sink_dir.path.to_str().unwrap(),
        ]);
        for (out, what) in [(mount, "mount"), (sink, "sink")] {
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{what}: {err}");
            assert!(err.contains(logged) && err.contains(why), "{what}: {err}");
        }
        assert!(!is_mounted(&mnt));
        assert!(!target.exists(), "nothing created through the link");
        assert_eq!(std::fs::metadata(&foreign).unwrap().len(), 0);
    }
    assert_eq!(
        std::fs::read_dir(&sink_dir.path).unwrap().count(),
        0,
        "the sink wrote nothing"
    );
}

/// A new log file is created 0600; /dev/null is accepted.
#[test]
fn a_new_log_file_is_private_and_dev_null_will_do() {
    need_fuse!();
    let emu = emulator();
    let (dir, mnt) = scratch_mountpoint();
    let log = dir.path().join("new.log");
    let _guard = KillOnDrop(mnt.clone());
    let out = mount_logging_to(&emu.url(), &log, &mnt);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta = std::fs::metadata(&log).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o600, "created 0600");
    drop(_guard);
    let (_d, mnt) = scratch_mountpoint();
    let _guard = KillOnDrop(mnt.clone());
    let out = mount_logging_to(&emu.url(), Path::new("/dev/null"), &mnt);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&mnt));
}

/// SIGHUP after the log file was swapped for a link to a root 0600 file: that file is left
/// alone, and the daemon keeps logging to the old file, saying so there.
#[test]
fn sighup_keeps_the_old_log_when_the_new_one_is_refused() {
    need_fuse!();
    let emu = emulator();
    let (dir, mnt) = scratch_mountpoint();
    let log = dir.path().join("daemon.log");
    let _guard = KillOnDrop(mnt.clone());
    let out = mount_logging_to(&emu.url(), &log, &mnt);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let old = dir.path().join("daemon.log.1");
    std::fs::rename(&log, &old).unwrap();
    std::os::unix::fs::symlink(&victim, &log).unwrap();
    let hup = Command::new("pkill")
        .args(["-HUP", "-f", &format!("cstokenfs.*{}", mnt.display())])
        .status()
        .unwrap();
    assert!(hup.success(), "the daemon got SIGHUP");
    let said = eventually(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&old).ok()?;
        text.contains("still logging to the previous log file")
            .then_some(text)
    });
    let text = said.expect("the old log says the new one was refused");
    assert!(text.contains("is a symbolic link"), "{text}");
    std::fs::read(mnt.join("management.azure.com")).expect("a token");
    let audited = eventually(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&old).ok()?;
        text.contains("audit:").then_some(())
    });
    assert!(audited.is_some(), "logging goes on in the old file");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert_eq!(std::fs::metadata(&victim).unwrap().mode() & 0o7777, 0o600);
}
