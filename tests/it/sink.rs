//! Issue 16: `cstokenfs sink DIR`, real files on a real tmpfs, the emulator on loopback.

use crate::common;
use crate::sink_support;

use common::*;
use cstokenfs::emulator::Fault;
use sink_support::*;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

const VAULT: &str = "vault.azure.net";
const ARM: &str = "management.azure.com";
const VIEWS: [&str; 5] = ["", ".json/", ".header/", ".kubectl/", ".git-credential/"];

#[test]
fn layout_and_bytes_equal_a_mounts_for_the_same_resources() {
    need_fuse!();
    let emu = emulator();
    emu.set_caching(true); // both get the same token
    let fs = Tmpfs::new();
    let _sink = Sink::start(
        &emu.url(),
        &fs.path,
        &["--resource", VAULT, "--resource", ARM],
    );
    let m = Mounted::new(&emu.url(), &["--resource", VAULT, "--resource", ARM]);
    wait_file(&fs.path.join(ARM), Duration::from_secs(20));
    let mut want = tree(&m.path);
    want.insert(cstokenfs::LOCK_NAME.to_string());
    assert_eq!(
        tree(&fs.path),
        want,
        "the layout of the mount, and the lock"
    );
    for name in [VAULT, ARM] {
        for view in VIEWS {
            let rel = format!("{view}{name}");
            let (a, b) = (
                m.read(&rel).unwrap(),
                std::fs::read(fs.path.join(&rel)).unwrap(),
            );
            assert_same_token(&a, &b, &rel);
        }
    }
    let st = status(&fs.path);
    assert_eq!(st["sink"]["written"].as_array().unwrap().len(), 2);
    assert_eq!(st["dumpable"], false);
}

#[test]
fn short_lived_tokens_rotate_under_readers_never_expired_never_torn() {
    let emu = emulator();
    emu.set_ttl(6);
    let fs = Tmpfs::new();
    let _sink = Sink::start(
        &emu.url(),
        &fs.path,
        &["--resource", VAULT, "--refresh-margin", "3"],
    );
    let raw = fs.path.join(VAULT);
    let json = fs.path.join(".json").join(VAULT);
    wait_file(&raw, Duration::from_secs(20));
    // Each reader: every read is one whole token, never expired; per version (serial), the
    // raw file and `.json`'s access_token are the same bytes.
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (raw, json) = (raw.clone(), json.clone());
            std::thread::spawn(move || {
                let (mut by_serial, mut reads, mut missing) = (BTreeMap::new(), 0, 0);
                // Until this reader has seen four versions (about 10 s), at most 40 s.
                let versions = |m: &BTreeMap<(u64, u8), Vec<u8>>| {
                    m.keys().map(|k| k.0).collect::<BTreeSet<_>>().len()
                };
                let end = Instant::now() + Duration::from_secs(40);
                while Instant::now() < end && (versions(&by_serial) < 4 || reads <= 10) {
                    let (Ok(t), Ok(j)) = (std::fs::read(&raw), std::fs::read(&json)) else {
                        missing += 1;
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let c = claims(&t); // a whole token, or this panics
                    assert!(c["exp"].as_i64().unwrap() > now_secs(), "an expired token");
                    let doc: serde_json::Value = serde_json::from_slice(&j).expect("whole JSON");
                    let from_json = doc["access_token"].as_str().unwrap().as_bytes().to_vec();
                    assert!(
                        doc["expires_on"].as_i64().unwrap() > now_secs(),
                        "expired .json"
                    );
                    assert_eq!(doc["expires_on"], claims(&from_json)["exp"], "one version");
                    by_serial.insert((serial(&t), 0), t);
                    by_serial.insert((serial(&from_json), 1), from_json);
                    reads += 1;
                }
                (by_serial, reads, missing)
            })
        })
        .collect();
    let mut seen = BTreeMap::new();
    for r in readers {
        let (by_serial, reads, missing) = r.join().expect("a reader failed");
        assert_eq!(missing, 0, "a file was missing while the upstream was up");
        assert!(reads > 10, "{reads} reads");
        seen.extend(by_serial);
    }
    let serials: BTreeSet<u64> = seen.keys().map(|k| k.0).collect();
    assert!(serials.len() >= 4, "{} versions seen", serials.len());
    for s in serials {
        if let (Some(raw), Some(json)) = (seen.get(&(s, 0)), seen.get(&(s, 1))) {
            assert_same_token(raw, json, "raw and .json of one version");
        }
    }
}

#[test]
fn an_upstream_down_past_expiry_removes_the_files_before_expiry_and_they_return() {
    let emu = emulator();
    emu.set_ttl(5);
    let fs = Tmpfs::new();
    let _sink = Sink::start(
        &emu.url(),
        &fs.path,
        &[
            "--resource",
            VAULT,
            "--refresh-margin",
            "2",
            "--timeout",
            "1",
        ],
    );
    let raw = fs.path.join(VAULT);
    wait_file(&raw, Duration::from_secs(20));
    emu.set_fault(Some(Fault::Reset));
    let mut last_expiry = 0;
    let gone = eventually(Duration::from_secs(15), || {
        let files: Vec<_> = VIEWS
            .iter()
            .map(|v| fs.path.join(format!("{v}{VAULT}")))
            .collect();
        match std::fs::read(fs.path.join(".json").join(VAULT)) {
            Ok(j) => {
                let doc: serde_json::Value = serde_json::from_slice(&j).unwrap();
                last_expiry = doc["expires_on"].as_i64().unwrap();
                assert!(
                    now_secs() < last_expiry,
                    "a file outlived its token's expiry"
                );
                None
            }
            Err(_) => files.iter().all(|f| !f.exists()).then(|| {
                // When the sink removed them, not when this poll saw it (which a loaded
                // machine delays): the last change to `.json/` was the removal of its file.
                let at = std::fs::metadata(fs.path.join(".json")).and_then(|m| m.modified());
                at.expect("mtime of .json/")
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("after 1970")
                    .as_secs_f64()
            }),
        }
    })
    .expect("the files go once the token can no longer be refreshed");
    assert!(
        gone < last_expiry as f64,
        "removed at {gone}, expiry {last_expiry}"
    );
    // `.status` says it is missing and why (rewritten right after the removal).
    let missing = eventually(Duration::from_secs(5), || {
        let st = status(&fs.path);
        let m = st["sink"]["missing"][0].clone();
        (m["name"] == VAULT).then_some(m)
    })
    .expect(".status lists the removed resource as missing");
    let reason = missing["reason"].as_str().unwrap_or("");
    assert!(reason.contains("not refreshed in time"), "{reason}");
    emu.set_fault(None);
    let back = wait_file(&raw, Duration::from_secs(40));
    assert!(claims(&back)["exp"].as_i64().unwrap() > now_secs());
}

#[test]
fn a_dir_on_a_disk_filesystem_is_refused_with_one_line() {
    let disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let emu = emulator();
    let out = sink_cmd(&emu.url(), disk.path(), &["--resource", VAULT])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("not tmpfs or ramfs") && err.contains("mount -t tmpfs"),
        "{err}"
    );
    assert!(
        err.contains("ext4") || err.contains("overlay") || err.contains("xfs"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(disk.path()).unwrap().count(),
        0,
        "nothing written"
    );
    assert_eq!(emu.requests(), 0);
}

#[test]
fn sigterm_leaves_dir_as_it_was_and_only_what_it_wrote_goes() {
    let emu = emulator();
    let fs = Tmpfs::new();
    std::fs::write(fs.path.join("mine.txt"), b"keep").unwrap();
    std::fs::create_dir(fs.path.join("sub")).unwrap();
    let before = (tree(&fs.path), std::fs::metadata(&fs.path).unwrap());
    let mut sink = Sink::start(
        &emu.url(),
        &fs.path,
        &["--resource", VAULT, "--uid", "1000"],
    );
    wait_file(&fs.path.join(VAULT), Duration::from_secs(20));
    assert_eq!(sink.stop(libc::SIGTERM), Some(0));
    let after = std::fs::metadata(&fs.path).unwrap();
    assert_eq!(tree(&fs.path), before.0);
    assert_eq!(std::fs::read(fs.path.join("mine.txt")).unwrap(), b"keep");
    assert_eq!(
        (after.uid(), after.gid(), after.mode()),
        (before.1.uid(), before.1.gid(), before.1.mode())
    );
}

#[test]
fn files_and_dirs_get_the_owner_and_mode_asked_for() {
    let emu = emulator();
    let fs = Tmpfs::new();
    let args = [
        "--resource",
        VAULT,
        "--uid",
        "1000",
        "--gid",
        "1000",
        "--mode",
        "0440",
    ];
    let _sink = Sink::start(&emu.url(), &fs.path, &args);
    wait_file(&fs.path.join(VAULT), Duration::from_secs(20));
    for rel in VIEWS
        .map(|v| format!("{v}{VAULT}"))
        .iter()
        .chain([&".status".into()])
    {
        let m = std::fs::metadata(fs.path.join(rel)).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            (1000, 1000, 0o440),
            "{rel}"
        );
    }
    for rel in ["", ".json", ".header", ".kubectl", ".git-credential"] {
        let m = std::fs::metadata(fs.path.join(rel)).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            (1000, 1000, 0o550),
            "{rel:?}"
        );
    }
}

#[test]
fn a_second_sink_is_refused_and_a_killed_ones_lock_is_taken_over() {
    let emu = emulator();
    let fs = Tmpfs::new();
    let mut first = Sink::start(
        &emu.url(),
        &fs.path,
        &["--resource", VAULT, "--resource", ARM],
    );
    wait_file(&fs.path.join(ARM), Duration::from_secs(20));
    let out = sink_cmd(&emu.url(), &fs.path, &["--resource", VAULT])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another cstokenfs sink"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(first.stop(libc::SIGKILL), None, "killed");
    assert!(fs.path.join(ARM).exists(), "a killed sink leaves its files");
    // The next one takes the lock over and tidies up after the killed one (ARM is not its).
    let status = sink_cmd(&emu.url(), &fs.path, &["--resource", VAULT])
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(0), "detached once written");
    assert!(fs.path.join(VAULT).exists() && !fs.path.join(ARM).exists());
    let lock: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fs.path.join(cstokenfs::LOCK_NAME)).unwrap())
            .unwrap();
    let pid = lock["pid"].as_i64().unwrap() as i32;
    // SAFETY: the detached sink started by this test.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let empty = eventually(Duration::from_secs(10), || {
        tree(&fs.path).is_empty().then_some(())
    });
    assert!(empty.is_some(), "left: {:?}", tree(&fs.path));
}

#[test]
fn an_inotify_watch_sees_one_moved_to_per_rotation() {
    let emu = emulator();
    emu.set_ttl(6);
    let fs = Tmpfs::new();
    // SAFETY: plain inotify calls on descriptors this test owns.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    assert!(fd >= 0);
    let c = CString::new(fs.path.as_os_str().as_bytes()).unwrap();
    // SAFETY: as above.
    // Issue 23: whatever a watcher asks for, a rotation gives the final name one event.
    let mask = libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE | libc::IN_CREATE | libc::IN_MODIFY;
    // SAFETY: as above.
    let top = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) };
    assert!(top >= 0);
    let _sink = Sink::start(
        &emu.url(),
        &fs.path,
        &["--resource", VAULT, "--refresh-margin", "3"],
    );
    let json_dir = CString::new(fs.path.join(".json").as_os_str().as_bytes()).unwrap();
    // SAFETY: as above.
    assert!(unsafe { libc::inotify_add_watch(fd, json_dir.as_ptr(), mask) } >= 0);
    let mut serials = Vec::new();
    // (watch, mask) of every event naming VAULT other than one IN_MOVED_TO.
    let mut others: Vec<(i32, u32)> = Vec::new();
    let mut json_moves = 0;
    // Until three versions were moved in (about 7 s; at most 40 s), then a moment more for
    // any event that would repeat the last one.
    let end = Instant::now() + Duration::from_secs(40);
    let mut grace: Option<Instant> = None;
    let mut buf = [0u8; 4096];
    while Instant::now() < end && grace.is_none_or(|g| Instant::now() < g) {
        if serials.len() >= 3 && grace.is_none() {
            grace = Some(Instant::now() + Duration::from_millis(300));
        }
        // SAFETY: reading into a buffer we own.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        let mut at = 0;
        while n > 0 && at < n as usize {
            let wd = i32::from_ne_bytes(buf[at..at + 4].try_into().unwrap());
            let ev = u32::from_ne_bytes(buf[at + 4..at + 8].try_into().unwrap());
            let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap()) as usize;
            let name = &buf[at + 16..at + 16 + len];
            let name = name.split(|b| *b == 0).next().unwrap_or(b"");
            if name == VAULT.as_bytes() {
                match (wd == top, ev) {
                    (true, libc::IN_MOVED_TO) => {
                        serials.push(serial(&std::fs::read(fs.path.join(VAULT)).unwrap()))
                    }
                    (false, libc::IN_MOVED_TO) => json_moves += 1,
                    other => others.push((other.0 as i32, other.1)),
                }
            }
            at += 16 + len;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: closing our descriptor.
    unsafe { libc::close(fd) };
    assert!(serials.len() >= 3, "rotations seen: {serials:?}");
    let consecutive = serials.windows(2).all(|w| w[1] == w[0] + 1);
    assert!(
        consecutive,
        "one moved_to per new token, none missed or doubled: {serials:?}"
    );
    assert_eq!(
        others,
        [],
        "(in DIR, mask) of events on the final names but moved_to"
    );
    assert!(json_moves >= serials.len() - 1, ".json: {json_moves} moves");
}

#[test]
fn sigusr1_refetches_every_declared_resource() {
    let emu = emulator();
    let fs = Tmpfs::new();
    let sink = Sink::start(&emu.url(), &fs.path, &["--resource", VAULT]);
    let first = serial(&wait_file(&fs.path.join(VAULT), Duration::from_secs(20)));
    sink.signal(libc::SIGUSR1);
    let newer = eventually(Duration::from_secs(10), || {
        let t = std::fs::read(fs.path.join(VAULT)).ok()?;
        (serial(&t) > first).then_some(())
    });
    assert!(
        newer.is_some(),
        "a new token after SIGUSR1: {}",
        sink.log_text()
    );
}

/// Issue 19: a Kubernetes emptyDir (root's tmpfs, 0777) and a sink running as another user
/// with no --uid/--gid/--mode: it works, and DIR keeps its owner and mode throughout.
#[test]
fn a_sink_of_another_user_in_an_empty_dir_leaves_dir_as_it_is() {
    use std::os::unix::process::CommandExt;
    let emu = emulator();
    let fs = Tmpfs::with_options("mode=0777,size=1m");
    let mut cmd = sink_cmd(&emu.url(), &fs.path, &["-f", "--resource", VAULT]);
    cmd.uid(NOBODY).gid(NOBODY);
    let mut sink = Sink::spawn(cmd, &fs.path);
    wait_file(&fs.path.join(VAULT), Duration::from_secs(20));
    let owner = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    assert_eq!(owner(&fs.path), (0, 0, 0o777), "DIR while the sink runs");
    assert_eq!(owner(&fs.path.join(VAULT)), (NOBODY, NOBODY, 0o400));
    assert_eq!(owner(&fs.path.join(".json")), (NOBODY, NOBODY, 0o700));
    assert_eq!(sink.stop(libc::SIGTERM), Some(0), "{}", sink.log_text());
    assert_eq!(owner(&fs.path), (0, 0, 0o777), "DIR after");
    assert!(tree(&fs.path).is_empty(), "left: {:?}", tree(&fs.path));
}

/// Issue 19: the tmpfs unmounted (lazily) under a running sink: it stops with exit 1 and
/// says why; nothing reaches the directory beneath, whose owner and mode stay.
#[test]
fn a_tmpfs_unmounted_under_the_sink_stops_it_and_nothing_is_written_beneath() {
    let emu = emulator();
    emu.set_ttl(6);
    let fs = Tmpfs::new();
    let mut sink = Sink::start(
        &emu.url(),
        &fs.path,
        &[
            "--resource",
            VAULT,
            "--uid",
            "1000",
            "--refresh-margin",
            "3",
        ],
    );
    wait_file(&fs.path.join(VAULT), Duration::from_secs(20));
    lazy_unmount(&fs.path);
    assert_eq!(sink.wait_exit(Duration::from_secs(10)), Some(1));
    let log = sink.log_text();
    assert!(
        log.contains("DIR is unusable") && log.contains("unmounted or replaced"),
        "{log}"
    );
    assert_eq!(tree(&fs.path), BTreeSet::new(), "written beneath");
    let m = std::fs::metadata(&fs.path).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode()), fs.beneath, "changed beneath");
}

/// Issue 19: files that do not fit (ENOSPC): one WARN, not one every pass; `.status` says
/// why the resource is missing.
#[test]
fn a_full_tmpfs_is_reported_once_and_shown_in_status() {
    let emu = emulator();
    // Three pages: the lock, `.status` and its replacement; a token's views do not fit.
    let fs = Tmpfs::with_options("mode=0700,size=12k");
    let mut cmd = sink_cmd(&emu.url(), &fs.path, &["-f", "--resource", VAULT]);
    cmd.env("RUST_LOG", "debug");
    let sink = Sink::spawn(cmd, &fs.path);
    let reason = eventually(Duration::from_secs(20), || {
        let st = status(&fs.path);
        let reason = st["sink"]["missing"][0]["reason"].as_str()?.to_string();
        reason.contains("cannot write").then_some(reason)
    });
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains("No space left on device")),
        "{reason:?}: {}",
        sink.log_text()
    );
    // The same failure twice more (retried every 2 s), each logged at debug only.
    let repeated = |l: &&str| l.contains("DEBUG") && l.contains("cannot write its files");
    let log = eventually(Duration::from_secs(20), || {
        let log = sink.log_text();
        (log.lines().filter(repeated).count() >= 2).then_some(log)
    })
    .expect("the write retried and failed again");
    let warned = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("cannot write"))
        .count();
    assert_eq!(warned, 1, "{log}");
    assert!(!fs.path.join(VAULT).exists());
}

/// Issue 23: a sink of another user in a Kubernetes emptyDir (root's tmpfs, 0777) asked for
/// an owner and mode: it starts and serves; DIR is not its to change (a warning, left as
/// it is); its files and directories get what the README says (directories: the owner's
/// write bit too, which a sink that is not root needs to replace files). An owner it may
/// not give is refused at start with one line, and nothing is left in DIR.
#[test]
fn a_sink_of_another_user_asked_for_an_owner_and_mode_in_an_empty_dir() {
    use std::os::unix::process::CommandExt;
    let emu = emulator();
    let fs = Tmpfs::with_options("mode=0777,size=1m");
    let owner = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    let nobody = NOBODY.to_string();
    let args = [
        "-f",
        "--resource",
        VAULT,
        "--uid",
        &nobody,
        "--gid",
        &nobody,
        "--mode",
        "0440",
    ];
    let mut cmd = sink_cmd(&emu.url(), &fs.path, &args);
    cmd.uid(NOBODY).gid(NOBODY);
    let mut sink = Sink::spawn(cmd, &fs.path);
    wait_file(&fs.path.join(VAULT), Duration::from_secs(20));
    assert_eq!(owner(&fs.path), (0, 0, 0o777), "DIR while the sink runs");
    for view in VIEWS {
        let rel = format!("{view}{VAULT}");
        assert_eq!(owner(&fs.path.join(&rel)), (NOBODY, NOBODY, 0o440), "{rel}");
    }
    for dir in [".json", ".header", ".kubectl", ".git-credential"] {
        let want = (NOBODY, NOBODY, 0o750);
        assert_eq!(owner(&fs.path.join(dir)), want, "{dir}");
    }
    let log = sink.log_text();
    assert!(
        log.contains("leaving its owner and mode as they are"),
        "{log}"
    );
    assert_eq!(sink.stop(libc::SIGTERM), Some(0), "{}", sink.log_text());
    assert_eq!(owner(&fs.path), (0, 0, 0o777), "DIR after");
    assert!(tree(&fs.path).is_empty(), "left: {:?}", tree(&fs.path));

    // Another owner than its own: refused before anything is served, nothing left.
    let mut cmd = sink_cmd(
        &emu.url(),
        &fs.path,
        &["-f", "--resource", VAULT, "--uid", "1000"],
    );
    cmd.uid(NOBODY).gid(NOBODY);
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot give the sink's files the owner asked for (--uid 1000)"),
        "{err}"
    );
    assert!(tree(&fs.path).is_empty(), "left: {:?}", tree(&fs.path));
    assert_eq!(owner(&fs.path), (0, 0, 0o777));

    // A directory of its own in there: its mode is the sink's to change, and given back.
    let sub = fs.path.join("mine");
    std::fs::create_dir(&sub).unwrap();
    std::os::unix::fs::chown(&sub, Some(NOBODY), Some(NOBODY)).unwrap();
    let mut cmd = sink_cmd(
        &emu.url(),
        &sub,
        &["-f", "--resource", VAULT, "--mode", "0440"],
    );
    cmd.uid(NOBODY).gid(NOBODY);
    let mut sink = Sink::spawn(cmd, &sub);
    wait_file(&sub.join(VAULT), Duration::from_secs(20));
    assert_eq!(
        owner(&sub),
        (NOBODY, NOBODY, 0o750),
        "DIR while the sink runs"
    );
    assert_eq!(sink.stop(libc::SIGTERM), Some(0), "{}", sink.log_text());
    assert_eq!(owner(&sub), (NOBODY, NOBODY, 0o755), "DIR after");
    assert!(!sink.log_text().contains("WARN"), "{}", sink.log_text());
}

/// Issue 23: a sink killed (-9) and started again on the same DIR (a container restart):
/// the files it left that hold a valid token stay until the new sink replaces them, so
/// readers never miss a file; those of an expired token go at once.
#[test]
fn a_restarted_sink_keeps_valid_files_until_replaced_and_removes_expired_ones() {
    use std::os::unix::process::CommandExt;
    let emu = emulator();
    // As in a pod: an emptyDir (root's, 0777) and a sink that is not root.
    let fs = Tmpfs::with_options("mode=0777,size=1m");
    let start = || {
        let args = ["-f", "--resource", VAULT, "--resource", ARM];
        let mut cmd = sink_cmd(&emu.url(), &fs.path, &args);
        cmd.uid(NOBODY).gid(NOBODY);
        Sink::spawn(cmd, &fs.path)
    };
    let mut first = start();
    let raw = fs.path.join(VAULT);
    let before = serial(&wait_file(&raw, Duration::from_secs(20)));
    wait_file(&fs.path.join(ARM), Duration::from_secs(20));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (raw, stop) = (raw.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut reads, mut failed) = (0u64, 0u64);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match std::fs::read(&raw) {
                        Ok(t) if !t.is_empty() => reads += 1,
                        _ => failed += 1,
                    }
                    // Often enough to catch a gap of a millisecond, without starving the
                    // tests running beside this one.
                    std::thread::sleep(Duration::from_micros(200));
                }
                (reads, failed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(first.stop(libc::SIGKILL), None, "killed");
    // ARM's token, as left, says it expired a minute ago: not kept.
    let arm_json = fs.path.join(".json").join(ARM);
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&arm_json).unwrap()).unwrap();
    doc["expires_on"] = (now_secs() - 60).into();
    std::fs::write(&arm_json, format!("{doc}\n")).unwrap();
    // The new sink's first tokens come 3 s late: what is in DIR meanwhile is what it kept.
    emu.set_latency(Duration::from_secs(3));
    let second = start();
    let arm_gone = eventually(Duration::from_secs(2), || {
        VIEWS
            .iter()
            .all(|v| !fs.path.join(format!("{v}{ARM}")).exists())
            .then_some(())
    });
    assert!(
        arm_gone.is_some(),
        "expired files left: {:?}",
        tree(&fs.path)
    );
    let now = std::fs::read(&raw).ok().map(|t| serial(&t));
    assert_eq!(now, Some(before), "kept, not yet replaced");
    let replaced = eventually(Duration::from_secs(20), || {
        let t = std::fs::read(&raw).ok()?;
        (serial(&t) > before).then_some(())
    });
    assert!(replaced.is_some(), "not replaced: {}", second.log_text());
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        let (reads, failed) = r.join().expect("a reader panicked");
        assert_eq!(failed, 0, "failed reads across the restart ({reads} good)");
        assert!(reads > 100, "{reads} reads");
    }
    wait_file(&fs.path.join(ARM), Duration::from_secs(10));
    let log = second.log_text();
    assert!(
        log.contains("taking over the lock of a sink that is gone"),
        "{log}"
    );
    let mut second = second;
    assert_eq!(second.stop(libc::SIGTERM), Some(0), "{}", second.log_text());
    assert!(tree(&fs.path).is_empty(), "left: {:?}", tree(&fs.path));
}
