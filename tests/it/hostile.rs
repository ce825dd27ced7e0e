//! Issue 10: what a hostile upstream, a flood of names and a careless caller could do to the
//! mount, each injected through the emulator (or a stand-in `az`) into a real mount.

use crate::common;

use base64::Engine as _;
use common::*;
use cstokenfs::emulator::Fault;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// A 200 answer with exactly this body, for every request.
fn answer(body: String) -> Fault {
    Fault::Status {
        code: 200,
        body,
        retry_after: None,
    }
}

/// A JWT-shaped token with these claims (unsigned, like the emulator's).
fn jwt(claims: &serde_json::Value) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(&claims.to_string()))
}

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).map_or(0, |d| d.count())
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_token_with_a_line_break_is_eio_and_never_reaches_a_view() {
    need_fuse!();
    let emu = emulator();
    emu.set_fault(Some(answer(
        r#"{"access_token":"abc\r\nX-Injected: evil","expires_in":"3600"}"#.into(),
    )));
    let m = Mounted::new(&emu.url(), &[]);
    for view in ["", ".header/", ".git-credential/", ".json/"] {
        let e = m.read_err(&format!("{view}management.azure.com"));
        assert_eq!(errno(&e), libc::EIO, "{view}");
    }
    let log = m.log_text();
    assert!(log.contains("line break"), "the log names the byte class");
    assert!(!log.contains("X-Injected"), "never the bytes");
    let why = m.last_error("https://management.azure.com/");
    assert!(why.contains("printable ASCII"), "{why}");
    // A space, a control character and a non-ASCII byte are refused the same way.
    for bad in ["a b", "a\\u0007", "caf\\u00e9"] {
        emu.set_fault(Some(answer(format!(
            r#"{{"access_token":"{bad}","expires_in":"3600"}}"#
        ))));
        let name = format!("n{}.example.com", bad.len());
        emu.set_allow_any(true);
        assert_eq!(errno(&m.read_err(&name)), libc::EIO, "{bad}");
    }
}

#[test]
fn secrets_in_azs_stderr_never_reach_the_log_or_status() {
    need_fuse!();
    let dir = tempfile::tempdir().unwrap();
    let secret_jwt = jwt(&serde_json::json!({"aud": "leak", "secret": "s3cr3t-payload-value"}));
    let script = format!(
        "echo \"ERROR: AADSTS70043: token {secret_jwt} expired\" >&2\n\
         echo \"grant_type=refresh_token&refresh_token=0.AAAA-refresh-secret-value&x=1\" >&2\n\
         echo \"sent Authorization: Bearer opaque-bearer-secret\" >&2\n\
         echo '{{\"access_token\": \"json-secret-value\"}}' >&2\n\
         exit 1"
    );
    let az = dir.path().join("az");
    std::fs::write(&az, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&az, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:/usr/bin:/bin", dir.path().display());
    let m = Mounted::raw(
        &["--source", "azure-cli"],
        &[("PATH", &path), ("RUST_LOG", "trace")],
    );
    assert_eq!(errno(&m.read_err("management.azure.com")), libc::EIO);
    let status = String::from_utf8(m.read(".status").unwrap()).unwrap();
    let log = m.log_text();
    for (what, text) in [("log", &log), (".status", &status)] {
        assert_no_token(text, secret_jwt.as_bytes(), what);
        for secret in [
            "refresh-secret-value",
            "opaque-bearer-secret",
            "json-secret-value",
        ] {
            assert!(!text.contains(secret), "{what} holds a secret (not shown)");
        }
        assert!(text.contains("AADSTS70043"), "{what} keeps az's own words");
    }
}

#[test]
fn an_expiry_in_milliseconds_is_capped_by_the_jwt_or_refused() {
    need_fuse!();
    let emu = emulator();
    let now = now_secs();
    let exp = now + 1200;
    let token = jwt(&serde_json::json!({"aud": "https://management.azure.com/", "exp": exp}));
    // expires_on in milliseconds: tens of thousands of years away, taken as seconds.
    emu.set_fault(Some(answer(format!(
        r#"{{"access_token":"{token}","expires_on":"{}"}}"#,
        (now + 3600) * 1000
    ))));
    let m = Mounted::new(&emu.url(), &[]);
    let json: serde_json::Value =
        serde_json::from_slice(&m.read(".json/management.azure.com").unwrap()).unwrap();
    assert_eq!(json["expires_on"], exp, "the JWT's exp counts");
    let kubectl: serde_json::Value =
        serde_json::from_slice(&m.read(".kubectl/management.azure.com").unwrap()).unwrap();
    let stamp = kubectl["status"]["expirationTimestamp"].as_str().unwrap();
    assert_eq!(
        stamp.len(),
        "2026-12-01T10:00:00Z".len(),
        "RFC 3339: {stamp}"
    );
    let s = m.resource_status("https://management.azure.com/");
    assert_eq!(s["expires_on"], exp);
    assert!(s["next_refresh"].as_i64().unwrap() < exp, "{s}");
    // An opaque token with the same answer has nothing to cap it: refused, naming the field.
    emu.set_allow_any(true);
    emu.set_fault(Some(answer(format!(
        r#"{{"access_token":"opaque","expires_on":"{}"}}"#,
        (now + 3600) * 1000
    ))));
    assert_eq!(errno(&m.read_err("x.example.com")), libc::EIO);
    let why = m.last_error("https://x.example.com");
    assert!(
        why.contains("expires_on") && why.contains("7 days"),
        "{why}"
    );
}

#[test]
fn refresh_in_zero_or_an_ancient_not_before_cost_a_fetch_per_two_seconds_at_most() {
    need_fuse!();
    for fields in [r#"{"refresh_in":"0"}"#, r#"{"not_before":"1"}"#] {
        let emu = emulator();
        emu.set_fault(Some(Fault::Fields(fields.into())));
        let m = Mounted::new(&emu.url(), &[]);
        let run = Duration::from_secs(3);
        let end = Instant::now() + run;
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let path = m.file("management.azure.com");
                std::thread::spawn(move || {
                    let (mut reads, mut errors) = (0u32, 0u32);
                    while Instant::now() < end {
                        match std::fs::read(&path) {
                            Ok(_) => reads += 1,
                            Err(_) => errors += 1,
                        }
                    }
                    (reads, errors)
                })
            })
            .collect();
        let (mut reads, mut errors) = (0, 0);
        for r in readers {
            let (n, e) = r.join().unwrap();
            reads += n;
            errors += e;
        }
        assert_eq!(
            errors, 0,
            "{fields}: no reader ever fails (ESTALE) from this"
        );
        assert!(reads > 100, "{fields}: readers kept reading ({reads})");
        // One first fetch, then at most one per 2 s (plus one of slack for timing).
        assert!(
            emu.requests() <= 1 + 2 + 1,
            "{fields}: {} upstream requests in {run:?}",
            emu.requests()
        );
    }
}

#[test]
fn a_flood_of_hanging_names_costs_no_threads_and_never_delays_a_cached_read() {
    need_fuse!();
    let emu = emulator();
    emu.set_allow_any(true);
    let m = Mounted::new(&emu.url(), &["--timeout", "3"]);
    m.read("management.azure.com").unwrap();
    emu.set_fault(Some(Fault::Hang));
    let t0 = Instant::now();
    let readers: Vec<_> = (0..200)
        .map(|i| {
            let path = m.file(&format!("h{i}.example.com"));
            std::thread::spawn(move || std::fs::read(path).map(|_| ()))
        })
        .collect();
    // The flood is on once every fetch worker hangs on a request.
    let flooded = eventually(Duration::from_secs(10), || {
        (emu.requests() > 8).then_some(())
    });
    assert!(flooded.is_some(), "the flood reached the upstream");
    let pid = m.pid();
    let threads = count_dir(&format!("/proc/{pid}/task"));
    let fds = count_dir(&format!("/proc/{pid}/fd"));
    let t1 = Instant::now();
    m.read("management.azure.com")
        .expect("a cached read during the flood");
    let cached = t1.elapsed();
    for r in readers {
        assert_eq!(errno(&r.join().unwrap().unwrap_err()), libc::EIO);
    }
    let all = t0.elapsed();
    assert!(threads < 40, "{threads} daemon threads during the flood");
    assert!(fds < 64, "{fds} daemon descriptors during the flood");
    assert!(
        cached < Duration::from_secs(2),
        "cached read took {cached:?}"
    );
    assert!(
        all < Duration::from_secs(3 + 3),
        "every waiting reader answered within --timeout (and a sweep): {all:?}"
    );
}

#[test]
fn refusals_never_evict_tokens_and_are_remembered_apart() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(
        &emu.url(),
        &["--max-resources", "4", "--max-upstream-rate", "0"],
    );
    let held = [
        "management.azure.com",
        "vault.azure.net",
        "storage.azure.com",
        "graph.microsoft.com",
    ];
    for name in held {
        m.read(name).unwrap();
    }
    // The emulator refuses audiences it does not know (AudienceNotSupported).
    for i in 0..500 {
        let e = m.read_err(&format!("refused{i}.example.com"));
        assert_eq!(errno(&e), libc::ENOENT);
    }
    let before = emu.requests();
    for name in held {
        m.read(name).unwrap();
    }
    assert_eq!(emu.requests(), before, "no token was evicted by refusals");
    for i in 0..500 {
        let _ = m.read(&format!("refused{i}.example.com"));
    }
    assert_eq!(
        emu.requests(),
        before,
        "a second pass is answered from the negative cache"
    );
}

#[test]
fn the_upstream_rate_is_bounded_for_the_whole_mount() {
    need_fuse!();
    let emu = emulator();
    emu.set_allow_any(true);
    let m = Mounted::new(&emu.url(), &["--max-upstream-rate", "1", "--timeout", "2"]);
    // The burst: start-up reads of many resources are not slowed.
    for i in 0..100 {
        m.read(&format!("b{i}.example.com")).unwrap();
    }
    let after_burst = emu.requests();
    let readers: Vec<_> = (0..8)
        .map(|i| {
            let path = m.file(&format!("late{i}.example.com"));
            std::thread::spawn(move || std::fs::read(path).map(|_| ()))
        })
        .collect();
    let results: Vec<_> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let refused = results
        .iter()
        .filter(|r| r.as_ref().is_err_and(|e| errno(e) == libc::EIO))
        .count();
    assert!(
        refused >= 3,
        "held-back readers get EIO after --timeout ({refused} of 8)"
    );
    assert!(
        emu.requests() <= after_burst + 5,
        "{} requests after the burst at 1/s for 2 s",
        emu.requests() - after_burst
    );
    let s = m.status();
    assert!(s["upstream_held_back"].as_u64().unwrap() >= 3, "{s}");
    assert_eq!(s["max_upstream_rate"], 1);
}

#[test]
fn names_that_hold_nothing_do_not_pin_memory() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(
        &emu.url(),
        &["--max-upstream-rate", "0", "--negative-ttl", "1"],
    );
    m.read("management.azure.com").unwrap();
    let start = rss_kib(m.pid());
    // 8000 lookups of names the upstream refuses, from 4 threads at once.
    std::thread::scope(|scope| {
        for t in 0..4 {
            let m = &m;
            scope.spawn(move || {
                for i in (t..8000).step_by(4) {
                    let _ = std::fs::metadata(m.file(&format!("gone{i}.example.com")));
                }
            });
        }
    });
    // The refusals expire after --negative-ttl and the background pass lets them go
    // (waited out rather than polled: a .status of 8000 names is itself a big read).
    std::thread::sleep(Duration::from_secs(3));
    let end = rss_kib(m.pid());
    let left = m.status()["resources"].as_array().map_or(0, Vec::len);
    assert!(
        left <= 1,
        "{left} names still held after their refusals expired"
    );
    assert!(
        end < start + 4 * 1024,
        "8000 refused names left {} KiB behind",
        end.saturating_sub(start)
    );
}

#[test]
fn sigusr1_never_extends_a_readers_deadline() {
    need_fuse!();
    let emu = emulator();
    emu.set_latency(Duration::from_millis(1500));
    let m = Mounted::new(&emu.url(), &["--timeout", "3"]);
    let path = m.file("management.azure.com");
    let t0 = Instant::now();
    let reader = std::thread::spawn(move || std::fs::read(path).map(|_| ()));
    while !reader.is_finished() && t0.elapsed() < Duration::from_secs(20) {
        m.signal(libc::SIGUSR1);
        std::thread::sleep(Duration::from_millis(300));
    }
    let got = reader.join().unwrap();
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the reader waited {took:?} with --timeout 3"
    );
    assert_eq!(errno(&got.unwrap_err()), libc::EIO);
}

#[test]
fn a_broken_http_answer_is_retried_once_at_most() {
    need_fuse!();
    for fault in [
        Fault::BadStatusLine,
        Fault::Http09,
        Fault::BadContentLength,
        Fault::OversizedHead,
    ] {
        let emu = emulator();
        let what = format!("{fault:?}");
        emu.set_fault(Some(fault));
        let m = Mounted::new(&emu.url(), &["--timeout", "10"]);
        let t0 = Instant::now();
        assert_eq!(
            errno(&m.read_err("management.azure.com")),
            libc::EIO,
            "{what}"
        );
        assert!(emu.requests() <= 2, "{what}: {} requests", emu.requests());
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{what}: {:?}",
            t0.elapsed()
        );
    }
}

#[test]
fn an_endpoint_that_is_down_costs_one_timeout_not_one_per_name() {
    need_fuse!();
    let emu = emulator();
    emu.set_fault(Some(Fault::Reset));
    let declared = [
        "management.azure.com",
        "vault.azure.net",
        "storage.azure.com",
        "graph.microsoft.com",
    ];
    let mut args = vec!["--timeout", "3"];
    for d in declared {
        args.extend(["--resource", d]);
    }
    let m = Mounted::new(&emu.url(), &args);
    let t0 = Instant::now();
    let ls = std::process::Command::new("ls")
        .arg("-l")
        .arg(&m.path)
        .output()
        .unwrap();
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(3 + 2),
        "ls -l of 4 declared names with the endpoint down took {took:?}"
    );
    let _ = ls;
    let after_ls = emu.requests();
    let t1 = Instant::now();
    assert_eq!(errno(&m.read_err("management.azure.com")), libc::EIO);
    assert!(
        t1.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t1.elapsed()
    );
    assert_eq!(emu.requests(), after_ls + 1, "one attempt while known down");
    assert_eq!(m.status()["upstream_down"], true);
    // Back up: the next read finds it so.
    emu.set_fault(None);
    m.read("management.azure.com")
        .expect("the endpoint is back");
    assert_eq!(m.status()["upstream_down"], false);
}

#[test]
fn azure_cli_without_az_on_path_is_a_mount_time_error() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let out = bin()
        .args(["mount", "--source", "azure-cli"])
        .arg(&mnt)
        .env("PATH", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("az is not on PATH"), "{err}");
    assert!(!is_mounted(Path::new(&mnt)));
}

#[test]
fn a_jwt_whose_exp_is_not_one_number_is_eio() {
    need_fuse!();
    let emu = emulator();
    emu.set_allow_any(true);
    let m = Mounted::new(&emu.url(), &[]);
    let later = now_secs() + 1200;
    for (i, claims) in [
        format!(r#"{{"exp":"{later}"}}"#),
        format!(r#"{{"exp":{later},"exp":1}}"#),
    ]
    .iter()
    .enumerate()
    {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(claims));
        emu.set_fault(Some(answer(format!(
            r#"{{"access_token":"{token}","expires_in":"3600"}}"#
        ))));
        let name = format!("exp{i}.example.com");
        assert_eq!(errno(&m.read_err(&name)), libc::EIO, "claims #{i}");
        let why = m.last_error(&format!("https://{name}"));
        assert!(why.contains("exp claim"), "{why}");
    }
}

#[test]
fn outside_text_that_could_forge_log_lines_is_escaped() {
    need_fuse!();
    let emu = emulator();
    emu.set_allow_any(true);
    let m = Mounted::with_env(&emu.url(), &[], &[("RUST_LOG", "debug")]);
    // An upstream's words with a line break and a bidi override.
    emu.push_fault(Fault::Status {
        code: 400,
        body: r#"{"error":"invalid_resource","error_description":"no\nERROR forged line \u202Eexe.txt"}"#
            .into(),
        retry_after: None,
    });
    assert_eq!(errno(&m.read_err("forge.example.com")), libc::ENOENT);
    // A name with a bidi override is refused locally: no upstream call.
    let calls = emu.requests();
    assert_eq!(
        errno(&m.read_err("evil\u{202E}moc.example.com")),
        libc::ENOENT
    );
    assert_eq!(emu.requests(), calls, "refused without asking");
    // A reader whose executable's name holds a line break: the audit line is escaped.
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("cat\nINFO forged audit");
    std::fs::copy("/bin/cat", &exe).unwrap();
    let out = std::process::Command::new(&exe)
        .arg(m.file("management.azure.com"))
        .output()
        .unwrap();
    assert!(out.status.success() && !out.stdout.is_empty());
    let log = m
        .wait_log("forged audit", Duration::from_secs(5))
        .expect("the audit line");
    for line in log.lines() {
        assert!(
            !line.starts_with("ERROR forged") && !line.starts_with("INFO forged"),
            "a forged line: {line}"
        );
    }
    assert!(!log.contains('\u{202E}'), "no raw bidi override");
    assert!(log.contains("\\u{a}ERROR forged") && log.contains("\\u{202e}exe.txt"));
    assert!(log.contains("cat\\u{a}INFO forged audit"));
}
