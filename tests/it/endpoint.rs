//! `--serve-endpoint` through real mounts with raw loopback HTTP clients: the secret,
//! hostile requests, slow clients, a flood of idle connections from another user, one cache
//! with the files; `.claims`; `get --view`.

use crate::common;
use crate::flood;

use common::*;
use cstokenfs::emulator::EmulatorConfig;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

const ARM: &str = "/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fmanagement.azure.com";

/// One request (`head`: header lines); (status, parsed body, its token never shown).
fn get(addr: SocketAddr, target: &str, head: &str) -> (u16, cstokenfs::testing::Body) {
    cstokenfs::testing::http_get(addr, target, head)
}

/// A request for `api://aaa..`, `len` bytes long.
fn long_resource(len: usize) -> String {
    let resource = format!("api%3A%2F%2F{}", "a".repeat(len - "api://".len()));
    ARM.replace("https%3A%2F%2Fmanagement.azure.com", &resource)
}

#[test]
fn env_file_status_and_a_token_shared_with_cat() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::serving(&emu.url(), &[]);
    let (addr, secret) = m.endpoint();
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    assert_eq!(secret.len(), 64, "32 bytes in hex");
    let meta = std::fs::metadata(m.file(".env")).unwrap();
    let token_meta = std::fs::metadata(m.file("vault.azure.net")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode(), token_meta.permissions().mode());
    assert_eq!(
        meta.len(),
        m.read(".env").unwrap().len() as u64,
        "exact size"
    );
    let names: Vec<String> = std::fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.contains(&".env".to_string()) && names.contains(&".claims".to_string()));

    let head = format!("Host: {addr}\r\nX-IDENTITY-HEADER: {secret}\r\n");
    let (status, body) = get(addr, ARM, &head);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["resource"], "https://management.azure.com",
        "the request's spelling"
    );
    assert_eq!(body["token_type"], "Bearer");
    let file = m.read("management.azure.com").unwrap();
    let http = body["access_token"].as_str().unwrap().as_bytes().to_vec();
    assert_same_token(&http, &file, "HTTP and cat");
    assert_eq!(
        body["expires_on"].as_str().unwrap(),
        claims(&file)["exp"].to_string()
    );
    assert_eq!(emu.requests_for("https://management.azure.com/"), 1);
    assert_eq!(emu.requests_for("https://management.azure.com"), 0);
    let status = m.status();
    let ep = &status["serve_endpoint"];
    assert_eq!(ep["address"], addr.to_string());
    assert_eq!(ep["served"], 1);
    let text = status.to_string();
    assert!(!text.contains(&secret), ".status never shows the secret");
    assert!(
        !m.log_text().contains(&secret),
        "the log never shows the secret"
    );
    assert!(
        m.wait_log("over HTTP from 127.0.0.1:", Duration::from_secs(5))
            .is_some(),
        "audit line"
    );
}

#[test]
fn hostile_requests_get_nothing_and_cost_no_upstream_call() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::serving(&emu.url(), &[]);
    let (addr, secret) = m.endpoint();
    let host = format!("Host: {addr}\r\n");
    let good = format!("{host}X-IDENTITY-HEADER: {secret}\r\n");
    let cases: Vec<(String, String, u16, &str)> = vec![
        (ARM.into(), host.clone(), 401, "no secret"),
        (
            ARM.into(),
            format!("{host}X-IDENTITY-HEADER: {}\r\n", "f".repeat(64)),
            401,
            "wrong",
        ),
        (
            ARM.into(),
            format!("{host}X-IDENTITY-HEADER: \r\n"),
            401,
            "empty",
        ),
        (
            "/anything".into(),
            host.clone(),
            401,
            "any path without the secret",
        ),
        (
            ARM.into(),
            format!("Host: evil.example.com\r\nX-IDENTITY-HEADER: {secret}\r\n"),
            400,
            "rebinding",
        ),
        (
            ARM.into(),
            format!(
                "Host: evil.example.com:{}\r\nX-IDENTITY-HEADER: {secret}\r\n",
                addr.port()
            ),
            400,
            "rebinding with port",
        ),
        (
            ARM.into(),
            format!("{good}X-Forwarded-For: 127.0.0.1\r\n"),
            400,
            "proxied",
        ),
        (
            ARM.replace("https%3A%2F%2Fmanagement.azure.com", "not%20a%20resource"),
            good.clone(),
            400,
            "bad resource",
        ),
        (
            ARM.replace("https%3A%2F%2Fmanagement.azure.com", "https%3A%2F%2Fa%0Ab"),
            good.clone(),
            400,
            "control character",
        ),
        (
            format!("{ARM}&client_id=11111111-2222-3333-4444-555555555555"),
            good.clone(),
            400,
            "another identity",
        ),
        (
            ARM.replace("2019-08-01", "2017-09-01"),
            good.clone(),
            400,
            "api-version",
        ),
        (ARM.into(), format!("{good}{host}"), 400, "Host twice"),
        (
            ARM.into(),
            format!("{good}Host: evil.example.com\r\n"),
            400,
            "another Host after ours",
        ),
        (
            format!("http://evil.example.com{ARM}"),
            good.clone(),
            400,
            "absolute-form target",
        ),
        (
            ARM.into(),
            format!("{good}X-Forwarded-Host: evil.example.com\r\n"),
            400,
            "X-Forwarded-Host",
        ),
        (
            ARM.into(),
            format!("{good}X-Real-IP: 10.0.0.1\r\n"),
            400,
            "X-Real-IP",
        ),
        (long_resource(513), good.clone(), 400, "a 513-byte resource"),
    ];
    for (target, head, want, what) in &cases {
        let (status, body) = get(addr, target, head);
        assert_eq!(status, *want, "{what}: {body}");
        assert_eq!(body["statusCode"], *want, "{what}: App Service's shape");
        assert!(body.get("access_token").is_none());
        if *want == 401 {
            assert_eq!(
                *body,
                serde_json::json!({"statusCode": 401, "message": "Unauthorized"})
            );
        }
    }
    assert_eq!(emu.requests(), 0, "none of them reached the upstream");
    let (_, body) = get(addr, &long_resource(512), &good);
    assert!(
        !body.to_string().contains("bytes long"),
        "512 bytes: {body}"
    );
    assert_eq!(
        emu.requests(),
        1,
        "a 512-byte resource reaches the upstream"
    );
    // Allowed spellings of the Host.
    for h in [
        "localhost",
        &format!("localhost:{}", addr.port()),
        &format!("127.0.0.1:{}", addr.port()),
    ] {
        let (status, _) = get(
            addr,
            ARM,
            &format!("Host: {h}\r\nX-IDENTITY-HEADER: {secret}\r\n"),
        );
        assert_eq!(status, 200, "Host {h}");
    }
    // An oversized head is refused by the server itself.
    let big = format!("{good}X-Big: {}\r\n", "a".repeat(64 * 1024));
    let (status, _) = get(addr, ARM, &big);
    assert_ne!(status, 200);
    let ep = &m.status()["serve_endpoint"];
    assert_eq!(ep["unauthorized"], 4, "{ep}");
}

#[test]
fn slow_clients_do_not_hold_the_server_or_the_files() {
    need_fuse!();
    let emu = emulator_with(EmulatorConfig {
        latency: Duration::from_millis(300),
        ..EmulatorConfig::default()
    });
    let m = Mounted::serving(&emu.url(), &[]);
    let (addr, secret) = m.endpoint();
    // Half-sent heads, idle connections and a client that never reads its answer.
    let mut held = Vec::new();
    for i in 0..60 {
        let mut s = TcpStream::connect(addr).expect("connect");
        if i % 2 == 0 {
            s.write_all(b"GET /msi/token?api-version=2019-08-01 HTTP/1.1\r\nHost: 127.0")
                .unwrap();
        }
        held.push(s);
    }
    let mut greedy = TcpStream::connect(addr).unwrap();
    let req = format!("GET {ARM} HTTP/1.1\r\nHost: {addr}\r\nX-IDENTITY-HEADER: {secret}\r\n\r\n");
    for _ in 0..50 {
        let _ = greedy.write_all(req.as_bytes()); // pipelined, answers never read
    }
    let head = format!("Host: {addr}\r\nX-IDENTITY-HEADER: {secret}\r\n");
    let vault = ARM.replace("management.azure.com", "vault.azure.net");
    for _ in 0..5 {
        let (status, body) = get(addr, &vault, &head);
        assert_eq!(status, 200, "{body}");
        m.read("storage.azure.com")
            .expect("a file reader is not delayed");
    }
    drop(held);
    drop(greedy);
}

#[test]
fn a_flood_of_idle_connections_from_another_user_holds_back_no_request() {
    need_fuse!();
    if !flood::can_switch_user() {
        eprintln!("skipped: needs root to flood as another user");
        return;
    }
    let emu = emulator();
    let m = Mounted::serving(&emu.url(), &[]);
    let (addr, secret) = m.endpoint();
    let head = format!("Host: {addr}\r\nX-IDENTITY-HEADER: {secret}\r\n");
    // 2,000 connections, nearly eight times the endpoint's 256: every one the flood
    // re-opens evicts another, for as long as the flood runs.
    let flood = flood::Flood::start(addr, 2000).expect("start the flood");
    for i in 0..50 {
        let started = Instant::now();
        let (status, body) = get(addr, ARM, &head);
        let took = started.elapsed();
        assert_eq!(status, 200, "request {i}: {body}");
        // A bound, not a speed (scripts/bench.sh measures that: median under 1 ms in a
        // release build): before issue 19 such a flood held a request for 24 s; a debug
        // build beside the other suites on 2 cores needs a few seconds to accept and evict
        // the connections queued ahead of a new one.
        assert!(took < Duration::from_secs(10), "request {i} took {took:?}");
    }
    let reopened = flood.stop().expect("the flood's count");
    assert!(reopened > 0, "the flood's connections were closed");
    assert!(!m.log_text().contains(&secret));
}

#[test]
fn a_silent_connection_is_closed_after_two_seconds() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::serving(&emu.url(), &[]);
    let (addr, _) = m.endpoint();
    let started = Instant::now();
    let mut silent = TcpStream::connect(addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    assert_eq!(
        silent.read(&mut [0u8; 64]).unwrap_or(0),
        0,
        "closed, unanswered"
    );
    let took = started.elapsed();
    assert!(
        took > Duration::from_millis(1500) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
}

#[test]
fn no_env_without_serve_endpoint_and_loopback_only() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &[]);
    assert_eq!(errno(&m.read_err(".env")), libc::ENOENT);
    let names: Vec<String> = std::fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!names.contains(&".env".to_string()));
    assert!(m.status().get("serve_endpoint").is_none());
    for bad in ["0.0.0.0:0", "192.0.2.1:80", "localhost:80", "127.0.0.1"] {
        let (_dir, mnt) = scratch_mountpoint();
        let out = cli([
            "mount",
            "-f",
            "--endpoint",
            &emu.url(),
            "--serve-endpoint",
            bad,
        ])
        .arg(&mnt)
        .output()
        .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}: a usage error");
        let opt = format!("serve_endpoint={bad}");
        let out = cli(["mount", "-f", "--endpoint", &emu.url(), "-o", &opt])
            .arg(&mnt)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "-o {opt}: a usage error");
    }
}

#[test]
fn claims_of_a_known_emulator_token() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &["-o", "serve_endpoint=127.0.0.1:0"]);
    let text = String::from_utf8(m.read(".claims/management.azure.com").unwrap()).unwrap();
    let token = m.read("management.azure.com").unwrap();
    assert!(text.ends_with("}\n"), "pretty JSON and a newline");
    assert!(text.contains("\n  \"aud\": "), "pretty");
    let shown: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(shown, claims(&token));
    assert_eq!(shown["aud"], "https://management.azure.com/");
    assert_no_token(&text, &token, ".claims");
    let meta = std::fs::metadata(m.file(".claims/management.azure.com")).unwrap();
    assert_eq!(meta.len(), text.len() as u64);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o400);
    let audited = m.wait_log("(claims)", Duration::from_secs(5));
    assert!(audited.is_some(), "opens are audited");
}

#[test]
fn get_prints_every_view() {
    let view_of = |view: &str| {
        let out = run(&["get", "--emulator", "--view", view, "management.azure.com"]);
        assert!(
            out.status.success(),
            "{view}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let raw = view_of("raw");
    assert!(raw.ends_with('\n') && raw.trim_end().split('.').count() == 3);
    let json: serde_json::Value = serde_json::from_str(&view_of("json")).unwrap();
    assert_eq!(json["resource"], "https://management.azure.com/");
    assert!(view_of("header").starts_with("Authorization: Bearer ey"));
    let k: serde_json::Value = serde_json::from_str(&view_of("kubectl")).unwrap();
    assert_eq!(k["kind"], "ExecCredential");
    let git = view_of("git-credential");
    assert!(git.starts_with("username=cstokenfs\npassword=ey"));
    let c = view_of("claims");
    let claims: serde_json::Value = serde_json::from_str(&c).unwrap();
    assert_eq!(claims["aud"], "https://management.azure.com/");
    assert!(!c.contains("access_token"));
    let out = cli([
        "get",
        "--emulator",
        "--view",
        "bogus",
        "management.azure.com",
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_2017_protocol_from_env_and_an_audit_line_naming_the_caller() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::serving(&emu.url(), &[]);
    let (addr, _) = m.endpoint();
    let env = String::from_utf8(m.read(".env").unwrap()).unwrap();
    let var = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("{k} in .env"))
            .to_string()
    };
    let path = var("MSI_ENDPOINT")
        .strip_prefix(&format!("http://{addr}"))
        .expect("MSI_ENDPOINT is the endpoint's URL")
        .to_string();
    let target = format!("{path}?api-version=2017-09-01&resource=https%3A%2F%2Fvault.azure.net");
    let head = format!("Host: {addr}\r\nsecret: {}\r\n", var("MSI_SECRET"));
    let (status, body) = get(addr, &target, &head);
    assert_eq!(status, 200, "{body}");
    let file = m.read("vault.azure.net").unwrap();
    let http = body["access_token"].as_str().unwrap().as_bytes().to_vec();
    assert_same_token(&http, &file, "2017-09-01 and cat");
    // expires_on as App Service 2017-09-01 spells it, in UTC: what date(1) says.
    let exp = claims(&file)["exp"].to_string();
    let date = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{exp}"), "+%m/%d/%Y %H:%M:%S +00:00"])
        .output()
        .unwrap();
    assert_eq!(
        body["expires_on"].as_str().unwrap(),
        String::from_utf8_lossy(&date.stdout).trim()
    );
    assert!(body.get("client_id").is_none(), "the 2017 shape");
    assert_eq!(emu.requests(), 1);

    // The audit line names the socket's uid, and the process holding it: this test.
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let exe = std::env::current_exe().unwrap();
    let who = format!("uid {uid} pid {} exe {}", std::process::id(), exe.display());
    let log = m
        .wait_log(&who, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("an audit line with {who:?}:\n{}", m.log_text()));
    let line = log.lines().find(|l| l.contains(&who)).unwrap_or_default();
    assert!(
        line.contains("audit: request of https://vault.azure.net over HTTP from 127.0.0.1:"),
        "{line}"
    );

    // Another user's curl: its uid, and curl as the executable.
    if !Path::new("/usr/bin/curl").exists() {
        eprintln!("no /usr/bin/curl: the other user's request is not tried");
        return;
    }
    let url = format!("http://{addr}{target}");
    let out = as_user(65534, 65534, "/usr/bin/curl")
        .args(["-sS", "--noproxy", "*", "-H"])
        .arg(format!("secret: {}", var("MSI_SECRET")))
        .arg(&url)
        .output()
        .unwrap();
    assert!(out.status.success(), "curl as 65534: {}", out.status);
    let log = m
        .wait_log("uid 65534 pid ", Duration::from_secs(5))
        .unwrap_or_else(|| panic!("an audit line for uid 65534:\n{}", m.log_text()));
    let line = log
        .lines()
        .find(|l| l.contains("uid 65534 pid "))
        .unwrap_or_default();
    assert!(line.trim_end().ends_with("curl"), "{line}");
    assert_eq!(emu.requests(), 1);
}
