//! `--serve-imds` through real mounts on 127.0.0.1: IMDS's answer and error shapes with a
//! raw client, azure-identity (from the venv `endpoint_sdk` uses) pointed at the mount by
//! `AZURE_POD_IDENTITY_AUTHORITY_HOST` from `MOUNT/.env`, the uid rule (clients run as
//! other uids with setpriv), and the address rules. Nothing is ever sent to
//! 169.254.169.254: the link-local case is tested by its refusal (it is not configured here).

use crate::common;

use common::*;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

const TOKEN: &str = "/metadata/identity/oauth2/token";
const ARM: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fmanagement.azure.com";
const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/endpoint_sdk/client.py");

fn get(addr: SocketAddr, target: &str, head: &str) -> (u16, cstokenfs::testing::Body) {
    cstokenfs::testing::http_get(addr, target, head)
}

fn imds_mount(emu: &cstokenfs::emulator::Emulator, extra: &[&str]) -> Mounted {
    let mut args = vec!["--serve-imds", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Mounted::new(&emu.url(), &args)
}

#[test]
fn raw_answers_are_imds_shaped_and_share_the_files_cache() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(
        &emu.url(),
        &[
            "--serve-imds",
            "127.0.0.1:0",
            "--serve-endpoint",
            "127.0.0.1:0",
        ],
    );
    // Both front ends: App Service's pairs (2019-08-01, 2017-09-01) and the IMDS host,
    // never IMDS_ENDPOINT.
    let env = String::from_utf8(m.read(".env").unwrap()).unwrap();
    let keys: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        keys,
        [
            "IDENTITY_ENDPOINT",
            "IDENTITY_HEADER",
            "MSI_ENDPOINT",
            "MSI_SECRET",
            "AZURE_POD_IDENTITY_AUTHORITY_HOST"
        ]
    );
    assert_eq!(
        std::fs::metadata(m.file(".env")).unwrap().len(),
        env.len() as u64,
        "exact size"
    );
    let addr = m.imds();
    assert!(addr.ip().is_loopback() && addr.port() != 0);
    let host = format!("Host: {addr}\r\n");
    let good = format!("{host}Metadata: true\r\n");

    let (status, body) = get(addr, ARM, &good);
    assert_eq!(status, 200, "{body}");
    let fields: Vec<&String> = body.as_object().unwrap().keys().collect();
    for f in [
        "access_token",
        "expires_in",
        "expires_on",
        "ext_expires_in",
        "not_before",
        "resource",
        "token_type",
    ] {
        assert!(body[f].is_string(), "{f} is a string: {fields:?}");
    }
    assert_eq!(body["resource"], "https://management.azure.com");
    assert_eq!(body["token_type"], "Bearer");
    let file = m.read("management.azure.com").unwrap();
    let http = body["access_token"].as_str().unwrap().as_bytes().to_vec();
    assert_same_token(&http, &file, "IMDS and cat");
    let c = claims(&file);
    assert_eq!(body["expires_on"].as_str().unwrap(), c["exp"].to_string());
    assert_eq!(body["not_before"].as_str().unwrap(), c["nbf"].to_string());
    let expires_in: i64 = body["expires_in"].as_str().unwrap().parse().unwrap();
    let left = c["exp"].as_i64().unwrap() - now_secs();
    assert!((expires_in - left).abs() <= 2, "{expires_in} vs {left}");
    assert_eq!(body["ext_expires_in"], body["expires_in"]);
    assert_eq!(emu.requests(), 1, "one upstream call for IMDS and cat");

    // Refusals: IMDS's flat shape, no upstream call.
    let other = format!(
        "{TOKEN}?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net&client_id=00000000-0000-0000-0000-0000000000aa"
    );
    let cases: Vec<(String, String, u16, &str)> = vec![
        (
            ARM.into(),
            host.clone(),
            400,
            "Required metadata header not specified",
        ),
        (
            ARM.into(),
            format!("{host}Metadata: false\r\n"),
            400,
            "metadata header",
        ),
        (
            ARM.into(),
            format!("{good}X-Forwarded-For: 10.0.0.1\r\n"),
            400,
            "proxy",
        ),
        (
            ARM.into(),
            format!("{good}Forwarded: for=10.0.0.1\r\n"),
            400,
            "proxy",
        ),
        (
            ARM.into(),
            "Host: evil.example.com\r\nMetadata: true\r\n".into(),
            400,
            "Host",
        ),
        (ARM.into(), "Metadata: true\r\n".into(), 400, "Host"),
        (other, good.clone(), 400, "Identity not found"),
        (
            format!("{TOKEN}?resource=https%3A%2F%2Fvault.azure.net"),
            good.clone(),
            400,
            "api-version",
        ),
        (
            format!("{TOKEN}?api-version=2018-02-01"),
            good.clone(),
            400,
            "audience",
        ),
        (
            "/metadata/instance?api-version=2021-02-01".into(),
            good.clone(),
            404,
            "Not found",
        ),
        (
            "/msi/token?api-version=2019-08-01&resource=x".into(),
            good.clone(),
            404,
            "Not found",
        ),
    ];
    for (target, head, want, says) in &cases {
        let (status, body) = get(addr, target, head);
        assert_eq!(status, *want, "{says}: {body}");
        assert!(body["error"].is_string(), "{says}: {body}");
        let text = body["error_description"].as_str().unwrap_or_default();
        assert!(text.contains(says), "{says}: {body}");
    }
    let (status, body) = get(addr, TOKEN, &host);
    assert_eq!(status, 400);
    assert_eq!(
        body.0,
        serde_json::json!({"error":"invalid_request","error_description":"Required metadata header not specified"}),
        "the probe's answer, as IMDS gives it"
    );
    assert_eq!(emu.requests(), 1, "no refusal reached the upstream");

    let status = m.status();
    let s = &status["serve_imds"];
    assert_eq!(s["address"], addr.to_string());
    assert_eq!(s["served"], 1, "{s}");
    assert_eq!(s["not_found"], 2, "{s}");
    assert_eq!(s["bad_request"], cases.len() as u64 - 2 + 1, "{s}");
    assert!(status["serve_endpoint"]["address"].is_string());
    let audited = || {
        m.log_text()
            .contains("over IMDS from 127.0.0.1:")
            .then_some(())
    };
    assert!(
        eventually(Duration::from_secs(5), audited).is_some(),
        "audit line"
    );
    let log = m.log_text();
    assert!(log.contains("uid 0"), "the audit names the uid");
    assert_no_token(&log, &file, "the log");
}

/// `curl` as `uid`:`gid` (no supplementary groups): (status, body).
fn curl_as(uid: u32, gid: u32, addr: SocketAddr) -> (u16, cstokenfs::testing::Body) {
    let out = as_user(uid, gid, "curl")
        .args([
            "-s",
            "-m",
            "20",
            "-H",
            "Metadata: true",
            "-w",
            "\n%{http_code}",
        ])
        .arg(format!("http://{addr}{ARM}"))
        .stderr(Stdio::null())
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
    let body = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    // Shown in a failure message, its access_token is only a length.
    (
        code.trim().parse().unwrap_or(0),
        cstokenfs::testing::Body(body),
    )
}

#[test]
fn a_uid_that_may_not_read_the_files_gets_403_and_one_that_may_gets_the_token() {
    need_fuse!();
    if !have_tool(&["/usr/bin/curl", "/bin/curl"], "curl") {
        return;
    }
    let emu = emulator();
    // The default: files 0400, owned by root (who mounts), no --allow-other.
    let m = imds_mount(&emu, &["--metrics", "127.0.0.1:0"]);
    let addr = m.imds();
    let (status, body) = curl_as(65534, 65534, addr);
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "forbidden");
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .contains("uid 65534"));
    assert_eq!(body.as_object().unwrap().len(), 2, "nothing else: {body}");
    let line = m
        .wait_log("refused (403) an IMDS request", Duration::from_secs(10))
        .expect("audit line");
    let line = line
        .lines()
        .find(|l| l.contains("refused (403)"))
        .unwrap()
        .to_string();
    assert!(line.contains("uid 65534"), "{line}");
    assert!(line.contains(" pid "), "{line}");
    // Root may: it asks through the same listener.
    let (status, _) = get(addr, ARM, &format!("Host: {addr}\r\nMetadata: true\r\n"));
    assert_eq!(status, 200);
    assert_eq!(m.status()["serve_imds"]["forbidden"], 1);
    // --metrics counts the refusal by its cause, the answers by status.
    if let Some(venv) = parser_venv() {
        let scraped = http(metrics_addr(&m), "/metrics", None);
        let s = Samples::parse(&venv, &scraped.body, false);
        let imds = |name, label: (&str, &str)| s.get(name, &[("listener", "imds"), label]);
        let refusals = "cstokenfs_listener_refusals_total";
        let responses = "cstokenfs_listener_responses_total";
        assert_eq!(imds(refusals, ("cause", "uid")), Some(1.0));
        assert_eq!(imds(refusals, ("cause", "host")), Some(0.0));
        assert_eq!(imds(responses, ("status", "403")), Some(1.0));
        assert_eq!(imds(responses, ("status", "200")), Some(1.0));
        let reads = s.get("cstokenfs_reads_total", &[("front_end", "imds")]);
        assert_eq!(reads, Some(1.0), "the 403 read nothing");
    }
    drop(m);

    // The group bits with --allow-other: nobody's group (from its passwd entry) may, and it
    // gets the files' token; a uid without that group may not (the other bits are 0).
    let m = imds_mount(&emu, &["--allow-other", "--mode", "0440", "--gid", "65534"]);
    let (status, body) = curl_as(65534, 65534, m.imds());
    assert_eq!(status, 200, "{body}");
    let file = m.read("management.azure.com").unwrap();
    let got = body["access_token"]
        .as_str()
        .unwrap_or_default()
        .as_bytes()
        .to_vec();
    assert_same_token(&got, &file, "uid 65534 and cat");
    let (status, body) = curl_as(43210, 43210, m.imds());
    assert_eq!(status, 403, "{body}");
}

/// The venv's python (as `endpoint_sdk` finds it), or None where it is absent.
fn python() -> Option<PathBuf> {
    let venv = std::env::var_os("CSTOKENFS_PYVENV").map(PathBuf::from);
    if let Some(py) = venv.map(|v| v.join("bin/python")).filter(|p| p.exists()) {
        return Some(py);
    }
    let msg = "AZURE-IDENTITY VENV UNAVAILABLE: CSTOKENFS_PYVENV is not a venv with python \
               (scripts/test.sh makes it); the IMDS SDK test did not run";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true makes this a failure)");
    }
    eprintln!("\n!!!!! {msg} !!!!!\n");
    None
}

#[test]
fn azure_identity_speaks_imds_to_the_mount_and_gets_the_files_token() {
    need_fuse!();
    let Some(py) = python() else {
        return;
    };
    let emu = emulator();
    let m = imds_mount(&emu, &[]);
    let file = m.read("management.azure.com").expect("cat the token");
    for kind in ["mi", "dac"] {
        let out = m.dir.path().join(format!("tok-{kind}"));
        // `.env` sourced as the README says, in a clean environment (no IMDS is reachable
        // otherwise: the SDK would only ever talk to what .env names).
        let script = "set -a; . \"$1/.env\"; set +a; exec \"$2\" \"$3\" \"$4\" \"$5\" \"$6\"";
        let o = Command::new("bash")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", m.dir.path())
            .env("NO_PROXY", "*")
            .args(["-c", script, "sh"])
            .arg(&m.path)
            .arg(&py)
            .args([CLIENT, kind, "https://management.azure.com/.default"])
            .arg(&out)
            .stdin(Stdio::null())
            .output()
            .expect("run python");
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| {
            panic!("{kind}: no report: {}", String::from_utf8_lossy(&o.stderr))
        });
        assert_eq!(report["ok"], true, "{kind}: {report}");
        let token = std::fs::read(&out).expect("the SDK's token");
        assert_same_token(&token, &file, kind);
        // msal counts from expires_in: within a few seconds of the token's exp.
        let exp = claims(&file)["exp"].as_i64().unwrap();
        let got = report["expires_on"].as_i64().unwrap();
        assert!((got - exp).abs() <= 3, "{kind}: {got} vs {exp}");
    }
    assert_eq!(emu.requests(), 1, "one upstream call in all");
    assert_eq!(m.status()["serve_imds"]["served"], 2);
    assert_no_token(&m.log_text(), &file, "the log");
}

#[test]
fn addresses_other_than_loopback_are_refused_with_exit_2() {
    let (_dir, mnt) = scratch_mountpoint();
    let mnt = mnt.to_str().unwrap();
    let url = format!("http://127.0.0.1:{}/oauth2/token", free_port());
    let cases: [(&[&str], &str); 6] = [
        (
            &["--serve-imds", "169.254.169.254:80"],
            "ip addr add 169.254.169.254/32 dev lo",
        ),
        (
            &["--source", "imds", "--serve-imds", "169.254.169.254:80"],
            "would ask itself",
        ),
        (
            &["--serve-imds", "169.254.169.254:8080"],
            "neither a loopback",
        ),
        (&["--serve-imds", "192.0.2.2:80"], "neither a loopback"),
        (&["--serve-imds", "0.0.0.0:0"], "neither a loopback"),
        (&["-o", "serve_imds=10.1.2.3:80"], "neither a loopback"),
    ];
    for (flags, says) in cases {
        let mut args = vec!["mount", "-f", "--endpoint", &url];
        args.extend_from_slice(flags);
        args.push(mnt);
        let out = run_bounded(&args);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{flags:?}: {}", stderr(&out));
        assert!(!is_mounted(std::path::Path::new(mnt)));
    }
}
