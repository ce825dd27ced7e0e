//! Issue 2, end to end: real mounts of the built binary through /dev/fuse, read by real
//! processes, against the in-process emulator on 127.0.0.1.

use crate::common;

use common::*;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn cat_of_each_name_form() {
    need_fuse!();
    let emu = emulator();
    emu.set_allow_any(true);
    let m = Mounted::new(&emu.url(), &[]);
    let cases = [
        ("management.azure.com", "https://management.azure.com/"),
        ("vault.azure.net", "https://vault.azure.net"),
        ("storage.azure.com", "https://storage.azure.com/"),
        ("database.windows.net", "https://database.windows.net"),
        (
            "management.usgovcloudapi.net",
            "https://management.usgovcloudapi.net/",
        ),
        ("myapp.example.com", "https://myapp.example.com"),
        ("https%3A%2F%2Fvault.azure.net", "https://vault.azure.net"),
        (
            "https%3A%2F%2Fgraph.microsoft.com%2F",
            "https://graph.microsoft.com/",
        ),
        (
            "https%3A%2F%2Fgraph.microsoft.com%2F.default",
            "https://graph.microsoft.com",
        ),
        (
            "499b84ac-1321-427f-aa17-267ca6975798",
            "499b84ac-1321-427f-aa17-267ca6975798",
        ),
    ];
    for (name, aud) in cases {
        let out = Command::new("cat").arg(m.file(name)).output().unwrap();
        assert!(
            out.status.success(),
            "cat {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(claims(&out.stdout)["aud"], aud, "{name}");
        assert_eq!(
            emu.requests_for(aud),
            1,
            "{name} asked once, as exactly {aud}"
        );
    }
    for bad in [
        "notaname",
        "https%3A%2F%2Fa%20b",
        "bad%FF",
        ".hidden",
        "x_y.example.com",
    ] {
        let err = expect_err(std::fs::read(m.file(bad)), bad);
        assert_eq!(errno(&err), libc::ENOENT, "{bad}");
    }
    let long = "a".repeat(300);
    assert!(std::fs::read(m.file(&long)).is_err());
    assert_eq!(
        emu.requests(),
        cases.len() as u64 - 1,
        "invalid names never reach the endpoint"
    );
}

#[test]
fn token_file_is_exactly_the_token_and_views_agree() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &[]);
    let raw = m.read("management.azure.com").unwrap();
    assert!(!raw.ends_with(b"\n"), "no trailing newline");
    assert_eq!(raw.iter().filter(|&&b| b == b'.').count(), 2, "JWT-shaped");
    let json: serde_json::Value =
        serde_json::from_slice(&m.read(".json/management.azure.com").unwrap()).unwrap();
    assert_same_token(
        json["access_token"].as_str().unwrap().as_bytes(),
        &raw,
        ".json access_token",
    );
    assert_eq!(json["token_type"], "Bearer");
    assert_eq!(json["resource"], "https://management.azure.com/");
    let exp = json["expires_on"]
        .as_i64()
        .expect("expires_on is an integer");
    assert_eq!(exp, claims(&raw)["exp"].as_i64().unwrap());
    assert!(m
        .read(".json/management.azure.com")
        .unwrap()
        .ends_with(b"}\n"));
    let header = m.read(".header/management.azure.com").unwrap();
    let mut want = b"Authorization: Bearer ".to_vec();
    want.extend_from_slice(&raw);
    want.push(b'\n');
    assert_same_token(&header, &want, ".header");
    let size = std::fs::metadata(m.file("management.azure.com"))
        .unwrap()
        .len();
    assert_eq!(size, raw.len() as u64, "st_size equals the bytes served");
    assert_eq!(emu.requests(), 1, "one token serves every view");
}

#[test]
fn many_reads_one_upstream_call() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &[]);
    let first = m.read("vault.azure.net").unwrap();
    for _ in 0..30 {
        assert_same_token(&m.read("vault.azure.net").unwrap(), &first, "cached read");
        let out = Command::new("cat")
            .arg(m.file("vault.azure.net"))
            .output()
            .unwrap();
        assert_same_token(&out.stdout, &first, "cat");
    }
    assert_eq!(emu.requests_for("https://vault.azure.net"), 1);
}

#[test]
fn fifty_concurrent_first_readers_cause_one_upstream_call() {
    need_fuse!();
    let emu = emulator();
    emu.set_latency(Duration::from_millis(500));
    let m = Mounted::new(&emu.url(), &[]);
    let path = m.file("storage.azure.com");
    let barrier = Arc::new(std::sync::Barrier::new(50));
    let readers: Vec<_> = (0..50)
        .map(|_| {
            let (path, barrier) = (path.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                std::fs::read(path)
            })
        })
        .collect();
    let tokens: Vec<Vec<u8>> = readers
        .into_iter()
        .map(|h| h.join().unwrap().expect("read"))
        .collect();
    assert_eq!(
        emu.requests(),
        1,
        "one upstream request for 50 concurrent readers"
    );
    for t in &tokens {
        assert_same_token(t, &tokens[0], "every reader gets the same token");
    }
}

/// Readers that use st_size differently all get the whole token.
#[test]
fn every_kind_of_reader_gets_the_whole_token() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &[]);
    let path = m.file("graph.microsoft.com");
    let p = path.to_str().unwrap();
    let token = m.read("graph.microsoft.com").unwrap();
    let n = token.len();

    // read() loop with a tiny buffer
    let mut f = std::fs::File::open(&path).unwrap();
    let (mut got, mut buf) = (Vec::new(), [0u8; 7]);
    loop {
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        got.extend_from_slice(&buf[..k]);
    }
    assert_same_token(&got, &token, "read() loop");

    let wc = Command::new("wc").args(["-c", p]).output().unwrap();
    let count: usize = String::from_utf8_lossy(&wc.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(count, n, "wc -c");

    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("cp");
    assert!(Command::new("cp")
        .arg(p)
        .arg(&copy)
        .status()
        .unwrap()
        .success());
    assert_same_token(&std::fs::read(&copy).unwrap(), &token, "cp");

    let py = format!(
        "import shutil,sys\nd=open('{p}').read()\nshutil.copyfile('{p}','{c}')\nc=open('{c}','rb').read()\nsys.exit(0 if len(d)=={n} and len(c)=={n} else 1)",
        c = dir.path().join("py").display()
    );
    assert!(
        Command::new("python3")
            .args(["-c", &py])
            .status()
            .unwrap()
            .success(),
        "python read + shutil.copyfile"
    );
    assert_same_token(
        &std::fs::read(dir.path().join("py")).unwrap(),
        &token,
        "shutil.copyfile",
    );

    match Command::new("node")
        .args([
            "-e",
            &format!("process.exit(require('fs').readFileSync('{p}').length==={n}?0:1)"),
        ])
        .status()
    {
        Ok(s) => assert!(s.success(), "node readFileSync"),
        Err(_) => eprintln!("node is not installed: readFileSync not checked"),
    }
}

#[test]
fn status_lists_state_without_token_bytes() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &[]);
    let token = m.read("management.azure.com").unwrap();
    let _ = m.read("newservice.azure.com");
    let text = String::from_utf8(m.read(".status").unwrap()).unwrap();
    assert_no_token(&text, &token, ".status");
    let status: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status["endpoint"], emu.url());
    let arm = resource_entry(&status, "https://management.azure.com/");
    assert_eq!(arm["name"], "management.azure.com");
    assert_eq!(arm["upstream_calls"], 1);
    assert_eq!(arm["expires_on"].as_i64(), claims(&token)["exp"].as_i64());
    assert!(arm["fetched_at"].as_i64().unwrap() <= now_secs());
    assert!(arm["last_error"].is_null());
    let refused = resource_entry(&status, "https://newservice.azure.com");
    assert!(refused["last_error"]
        .as_str()
        .unwrap()
        .contains("AudienceNotSupported"));
    assert_eq!(refused["state"], "refused");
}

#[test]
fn status_size_is_what_a_size_trusting_reader_reads() {
    use std::io::Read;
    need_fuse!();
    let emu = emulator();
    for flags in [&[][..], &["--no-open"]] {
        let m = Mounted::new(&emu.url(), flags);
        m.read("vault.azure.net").unwrap();
        // A reader that reads exactly st_size bytes (as some parsers do): fstat, then read.
        let mut file = std::fs::File::open(m.file(".status")).unwrap();
        let size = file.metadata().unwrap().len();
        assert!(size > 0, "{flags:?}");
        let mut buf = vec![0u8; size as usize];
        file.read_exact(&mut buf).unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert!(doc["resources"].is_array(), "{flags:?}");
        assert_eq!(
            file.read(&mut [0u8; 16]).unwrap(),
            0,
            "nothing past st_size"
        );
        drop(file);
        // And stat by name, then open and read st_size bytes.
        let script = "import json,os,sys; p=sys.argv[1]; n=os.stat(p).st_size; \
            d=json.loads(open(p,'rb').read(n)); sys.stdout.write(str(len(d['resources'])))";
        let text = Command::new("python3")
            .args(["-c", script])
            .arg(m.file(".status"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&text.stdout), "1", "{flags:?}");
    }
}

#[test]
fn listing_shows_declared_and_held_resources_once() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(
        &emu.url(),
        &[
            "--resource",
            "vault.azure.net",
            "--resource",
            "https%3A%2F%2Fvault.azure.net",
        ],
    );
    let ls = |dir: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(m.file(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        ls(""),
        vec![
            ".claims",
            ".git-credential",
            ".header",
            ".json",
            ".kubectl",
            ".kubectl-v1beta1",
            ".status",
            "vault.azure.net"
        ]
    );
    assert_eq!(emu.requests(), 0, "listing never fetches");
    m.read("management.azure.com").unwrap();
    m.read("https%3A%2F%2Fmanagement.azure.com%2F").unwrap(); // another spelling, same resource
    m.read("499b84ac-1321-427f-aa17-267ca6975798").unwrap();
    m.read("https%3A%2F%2Fmanagement.azure.com").unwrap(); // a different resource string
    let _ = m.read("newservice.azure.com");
    assert_eq!(
        ls(""),
        vec![
            ".claims",
            ".git-credential",
            ".header",
            ".json",
            ".kubectl",
            ".kubectl-v1beta1",
            ".status",
            "499b84ac-1321-427f-aa17-267ca6975798",
            "https%3A%2F%2Fmanagement.azure.com",
            "management.azure.com",
            "vault.azure.net",
        ]
    );
    assert_eq!(
        ls(".json"),
        ls("")
            .into_iter()
            .filter(|n| !n.starts_with('.'))
            .collect::<Vec<_>>()
    );
    let ls_out = Command::new("ls").arg(m.file("")).output().unwrap();
    assert!(String::from_utf8_lossy(&ls_out.stdout)
        .lines()
        .any(|l| l == "management.azure.com"));
}

#[test]
fn files_are_read_only_0400_and_owned_by_the_mounter() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &[]);
    let f = m.file("management.azure.com");
    let token = m.read("management.azure.com").unwrap();
    let meta = std::fs::metadata(&f).unwrap();
    assert!(meta.is_file());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o400);
    assert_eq!(
        std::fs::metadata(&m.path).unwrap().permissions().mode() & 0o7777,
        0o500
    );
    assert_eq!(
        std::fs::metadata(m.file(".json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o500
    );
    use std::os::unix::fs::MetadataExt;
    // SAFETY: getuid cannot fail.
    assert_eq!(meta.uid(), unsafe { libc::getuid() });
    let refused = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert!(
            matches!(errno(&e), libc::EROFS | libc::EACCES | libc::EPERM),
            "{what}: {e}"
        );
    };
    refused(std::fs::write(&f, b"x"), "write");
    refused(
        std::fs::OpenOptions::new().append(true).open(&f).map(drop),
        "append",
    );
    refused(std::fs::write(m.file("new.example.com"), b"x"), "create");
    refused(std::fs::remove_file(&f), "unlink");
    refused(std::fs::rename(&f, m.file("other.example.com")), "rename");
    refused(
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)),
        "chmod",
    );
    refused(std::fs::create_dir(m.file("d")), "mkdir");
    refused(std::os::unix::fs::symlink("x", m.file("l")), "symlink");
    refused(
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&f)
            .map(drop),
        "truncate",
    );
    assert!(
        !Command::new("touch").arg(&f).status().unwrap().success(),
        "touch"
    );
    assert_same_token(
        &m.read("management.azure.com").unwrap(),
        &token,
        "nothing changed",
    );
    assert_eq!(
        std::fs::metadata(&f).unwrap().permissions().mode() & 0o7777,
        0o400
    );
}

#[test]
fn refused_audience_is_enoent_and_negative_cached() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &["--negative-ttl", "2"]);
    let out = Command::new("cat")
        .arg(m.file("newservice.azure.com"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No such file"),
        "cat says ENOENT"
    );
    for _ in 0..10 {
        assert_eq!(errno(&m.read_err("newservice.azure.com")), libc::ENOENT);
    }
    assert_eq!(emu.requests(), 1, "refusal negative-cached");
    assert!(
        m.log_text().contains("AudienceNotSupported"),
        "the endpoint's message is logged"
    );
    let names: Vec<_> = std::fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        !names.iter().any(|n| n == "newservice.azure.com"),
        "a refused resource is never listed"
    );
    // After the negative TTL the endpoint is asked again.
    let asked = eventually(Duration::from_secs(10), || {
        let _ = m.read("newservice.azure.com");
        (emu.requests() >= 2).then_some(())
    });
    assert!(asked.is_some(), "asked again after --negative-ttl");
}

#[test]
fn default_negative_ttl_is_thirty_seconds() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &[]);
    let _ = m.read("newservice.azure.com");
    let status: serde_json::Value = serde_json::from_slice(&m.read(".status").unwrap()).unwrap();
    assert_eq!(status["negative_ttl"], 30);
    std::thread::sleep(Duration::from_secs(2));
    let _ = m.read("newservice.azure.com");
    assert_eq!(emu.requests(), 1);
}

#[test]
fn a_slow_fetch_does_not_delay_a_cached_read_of_another_resource() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &[]);
    let cached = m.read("management.azure.com").unwrap();
    emu.set_latency(Duration::from_secs(4));
    let slow_done = Arc::new(AtomicBool::new(false));
    let slow = {
        let (path, done) = (m.file("vault.azure.net"), slow_done.clone());
        std::thread::spawn(move || {
            let r = std::fs::read(path);
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || (emu.requests() == 2)
            .then_some(()))
        .is_some(),
        "slow fetch started"
    );
    for _ in 0..20 {
        assert_same_token(
            &m.read("management.azure.com").unwrap(),
            &cached,
            "cached read",
        );
        let status = m.read(".status").unwrap();
        assert!(!status.is_empty());
        std::fs::read_dir(&m.path).unwrap().for_each(drop);
    }
    assert!(
        !slow_done.load(Ordering::SeqCst),
        "cached reads, .status and ls finished while the slow fetch was still running"
    );
    assert!(slow.join().unwrap().is_ok(), "the slow read completes");
}

#[test]
fn endpoint_down_gives_eio_within_the_timeout() {
    need_fuse!();
    let url = format!("http://127.0.0.1:{}/oauth2/token", free_port());
    let m = Mounted::new(&url, &["--timeout", "2"]);
    let start = Instant::now();
    let err = m.read_err("management.azure.com");
    assert_eq!(errno(&err), libc::EIO, "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "answered within the timeout (plus slack): {:?}",
        start.elapsed()
    );
    let last = m.last_error("https://management.azure.com/");
    assert!(last.contains("unreachable"), "{last}");
}

#[test]
fn endpoint_started_after_the_mount_then_reads_work() {
    need_fuse!();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/oauth2/token");
    let m = Mounted::new(&url, &["--timeout", "1"]);
    assert_eq!(errno(&m.read_err("management.azure.com")), libc::EIO);
    let emu = emulator_with_addr(port);
    let token = m
        .read("management.azure.com")
        .expect("reads work once the endpoint answers");
    assert_eq!(claims(&token)["aud"], "https://management.azure.com/");
    drop(emu);
}

fn emulator_with_addr(port: u16) -> cstokenfs::emulator::Emulator {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    cstokenfs::emulator::Emulator::start(addr, Default::default())
        .expect("emulator on the chosen port")
}

#[test]
fn refresh_after_the_margin_never_serves_an_expired_token() {
    need_fuse!();
    let emu = emulator();
    emu.set_ttl(6);
    let m = Mounted::new(&emu.url(), &["--refresh-margin", "3"]);
    let first = m.read("management.azure.com").unwrap();
    let first_serial = serial(&first);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut serials = vec![first_serial];
    while Instant::now() < deadline && serials.len() < 3 {
        let t = m.read("management.azure.com").unwrap();
        let c = claims(&t);
        assert!(
            c["exp"].as_i64().unwrap() > now_secs(),
            "never an expired token"
        );
        let s = c["serial"].as_u64().unwrap();
        if Some(&s) != serials.last() {
            serials.push(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        serials.len() >= 3,
        "refreshed at least twice in 15 s of 6 s tokens: {serials:?}"
    );
}

#[test]
fn detached_mount_returns_only_when_live() {
    need_fuse!();
    let emu = emulator();
    let (dir, mnt) = scratch_mountpoint();
    let log = dir.path().join("log");
    let out = cli([
        "mount",
        "--endpoint",
        &emu.url(),
        "--log-file",
        log.to_str().unwrap(),
    ])
    .arg(&mnt)
    .output()
    .unwrap();
    let _guard = KillOnDrop(mnt.clone());
    assert!(
        out.status.success(),
        "mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Right away: no waiting, no retry.
    let token = std::fs::read(mnt.join("management.azure.com"))
        .expect("a read right after mount returns works");
    assert_eq!(claims(&token)["aud"], "https://management.azure.com/");
    let pids = Command::new("pgrep")
        .args(["-f", &format!("cstokenfs.*{}", mnt.display())])
        .output()
        .unwrap();
    let pid: i32 = String::from_utf8_lossy(&pids.stdout)
        .lines()
        .next()
        .expect("daemon visible to pgrep -f")
        .parse()
        .unwrap();
    for fd in 0..3 {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert!(
            target == log || target.to_str() == Some("/dev/null"),
            "fd {fd} -> {}",
            target.display()
        );
    }
    // SAFETY: signalling the daemon we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(
        eventually(Duration::from_secs(5), || (!is_mounted(&mnt)).then_some(())).is_some(),
        "SIGTERM unmounts"
    );
    assert!(
        std::fs::read_to_string(&log).unwrap().contains("mounted"),
        "logs went to --log-file"
    );

    // Without --log-file: said once on stderr.
    let out = cli(["mount", "--endpoint", &emu.url()])
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("logs are discarded").count(), 1, "{stderr}");
    let out = cli(["mount", "--endpoint", &emu.url()])
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a second mount over a live one is an error"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sigterm_and_sigint_unmount_and_exit_zero() {
    need_fuse!();
    let emu = emulator();
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut m = Mounted::new(&emu.url(), &[]);
        m.read("management.azure.com").unwrap();
        m.signal(sig);
        assert_eq!(
            m.wait_exit(Duration::from_secs(10)),
            Some(0),
            "exit code after signal {sig}"
        );
        assert!(!is_mounted(&m.path), "unmounted after signal {sig}");
    }
}

#[test]
fn bad_mount_points_and_endpoints_give_one_clear_line() {
    need_fuse!();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let ok_dir = dir.path().join("d");
    std::fs::create_dir(&ok_dir).unwrap();
    let cases: [(&[&str], &std::path::Path, &str); 4] = [
        (
            &["--endpoint", "http://127.0.0.1:1/oauth2/token"],
            &dir.path().join("missing"),
            "does not exist",
        ),
        (
            &["--endpoint", "http://127.0.0.1:1/oauth2/token"],
            &file,
            "not a directory",
        ),
        (&["--endpoint", "not a url"], &ok_dir, "malformed"),
        (&["--endpoint", "ftp://127.0.0.1/x"], &ok_dir, "http"),
    ];
    for (args, mnt, want) in cases {
        for fg in [true, false] {
            let mut cmd = bin();
            cmd.arg("mount").args(args);
            if fg {
                cmd.arg("-f");
            }
            let out = cmd.arg(mnt).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} {}", mnt.display());
            assert!(stderr.contains(want), "{want}: {stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
            let lines: Vec<_> = stderr
                .lines()
                .filter(|l| !l.contains("logs are discarded"))
                .collect();
            assert_eq!(lines.len(), 1, "one line: {stderr}");
        }
    }
    assert!(!is_mounted(&ok_dir));
}

#[test]
fn no_token_in_trace_level_logs() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::with_env(&emu.url(), &[], &[("RUST_LOG", "trace")]);
    let mut tokens = Vec::new();
    for name in [
        "management.azure.com",
        ".json/vault.azure.net",
        ".header/storage.azure.com",
    ] {
        tokens.push(m.read(name).unwrap());
    }
    let _ = m.read(".status");
    // The audit line of the last open is the only one written by another thread.
    let log = m
        .wait_log(
            "audit: open of https://storage.azure.com/ (header)",
            Duration::from_secs(5),
        )
        .expect("the log is complete");
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace logging was on"
    );
    for t in &tokens {
        let text = String::from_utf8_lossy(t);
        let token = text
            .split('"')
            .find(|s| s.starts_with("eyJ"))
            .unwrap_or(&text);
        let token = token
            .trim_start_matches("Authorization: Bearer ")
            .trim_end();
        assert_no_token(&log, token.as_bytes(), "the trace log");
    }
}

#[test]
fn get_prints_the_token_or_fails_with_the_right_code() {
    let emu = emulator();
    let out = cli(["get", "--endpoint", &emu.url(), "vault.azure.net"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.ends_with(b"\n"));
    assert_eq!(
        claims(out.stdout.trim_ascii_end())["aud"],
        "https://vault.azure.net"
    );
    assert!(out.stderr.is_empty(), "get is quiet on success");

    let out = cli([
        "get",
        "--endpoint",
        &emu.url(),
        "--json",
        "management.azure.com",
    ])
    .output()
    .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["resource"], "https://management.azure.com/");
    assert!(json["expires_on"].is_i64());

    let out = cli(["get", "--endpoint", &emu.url(), "newservice.azure.com"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("AudienceNotSupported"));
    let url = format!("http://127.0.0.1:{}/oauth2/token", free_port());
    let out = cli([
        "get",
        "--timeout",
        "1",
        "--endpoint",
        &url,
        "vault.azure.net",
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));

    let out = cli(["get", "--emulator", "graph.microsoft.com"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        claims(out.stdout.trim_ascii_end())["aud"],
        "https://graph.microsoft.com/"
    );

    for usage in [
        &["get"][..],
        &["get", "--bogus", "x"],
        &["get", "--emulator", "--endpoint", "http://x", "n"],
        &["get", "--emulator", "not_a_name"],
    ] {
        let out = cli(usage).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{usage:?}");
    }
}

#[test]
fn get_from_a_port_nobody_listens_on_fails_at_once_naming_source_and_url() {
    let url = format!("http://127.0.0.1:{}/oauth2/token", free_port());
    let start = Instant::now();
    let out = cli(["get", "--endpoint", &url, "management.azure.com"])
        .output()
        .unwrap();
    let took = start.elapsed();
    assert_eq!(out.status.code(), Some(1));
    assert!(took < Duration::from_secs(2), "no retries: {took:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.lines().count(),
        1,
        "one line, no WARN repeating it: {err}"
    );
    for part in [
        url.as_str(),
        "no token from cloudshell at",
        "chosen because --endpoint without --source",
        "Connection refused",
    ] {
        assert!(err.contains(part), "{part:?} in {err}");
    }
}

#[test]
fn a_mounts_first_connection_failure_names_the_source_its_url_and_why() {
    need_fuse!();
    let url = format!("http://127.0.0.1:{}/oauth2/token", free_port());
    let m = Mounted::new(&url, &[]);
    assert!(m.read("management.azure.com").is_err(), "nothing listens");
    let said = m.wait_log(
        "chosen because --endpoint without --source",
        Duration::from_secs(10),
    );
    let log = said.unwrap_or_else(|| panic!("the first failure names why: {}", m.log_text()));
    assert!(log.contains(&format!("cloudshell at {url}")), "{log}");
}

#[test]
fn help_on_every_subcommand() {
    for sub in [
        &["--help"][..],
        &["mount", "--help"],
        &["get", "--help"],
        &["emulator", "--help"],
    ] {
        let out = cli(sub).output().unwrap();
        assert!(out.status.success(), "{sub:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage"), "{sub:?}");
    }
    let out = cli(["mount", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--endpoint",
        "--foreground",
        "--emulator",
        "--resource",
        "--refresh-margin",
        "--timeout",
        "--log-file",
    ] {
        assert!(text.contains(flag), "mount --help lists {flag}");
    }
}

#[test]
fn emulator_subcommand_serves_the_recipe() {
    use std::io::BufRead;
    // An ephemeral port: the emulator says its URL once it listens.
    let mut child = cli([
        "emulator",
        "--listen",
        "127.0.0.1:0",
        "--ttl",
        "120",
        "--allow",
        "https://x.example.com",
    ])
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let url = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.split(" at ").nth(1).map(str::to_string))
        .expect("the emulator says where it listens");
    // Keep reading its log so it never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let out = cli(["get", "--json", "--endpoint", &url, "x.example.com"])
        .output()
        .unwrap();
    assert!(out.status.success(), "the emulator answers");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let life = json["expires_on"].as_i64().unwrap() - now_secs();
    assert!((100..=121).contains(&life), "--ttl 120: {life}");
    // SAFETY: signalling our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}
