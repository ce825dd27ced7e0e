//! `cstokenfs emulator` as a user runs it: loopback only, the App Service secret printed
//! on stdout (or taken from `--secret-file`) that requests then carry, and usage errors
//! (the Entra options' too) exiting 2.

use crate::common::{cli, run};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::Duration;

/// Kills the emulator it holds when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(extra: &[&str]) -> (Running, Vec<String>) {
    let mut child = cli([
        "emulator",
        "--protocol",
        "appservice",
        "--listen",
        "127.0.0.1:0",
    ])
    .args(extra)
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .expect("run cstokenfs emulator");
    let stdout = child.stdout.take().expect("stdout");
    let running = Running(child);
    let mut lines = Vec::new();
    let mut reader = BufReader::new(stdout);
    let want = if extra.is_empty() { 2 } else { 1 };
    while lines.len() < want {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        lines.push(line.trim_end().to_owned());
    }
    (running, lines)
}

fn value<'a>(lines: &'a [String], key: &str) -> Option<&'a str> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// GET `endpoint?api-version=...&resource=...` with that secret; the status.
fn fetch(endpoint: &str, secret: &str) -> u16 {
    let rest = endpoint.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_once('/').expect("a path");
    let mut s = TcpStream::connect(host).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "GET /{path}?api-version=2019-08-01&resource=https%3A%2F%2Fvault.azure.net HTTP/1.1\r\n\
         Host: {host}\r\nX-IDENTITY-HEADER: {secret}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn printed_secret_is_accepted() {
    let (_emu, lines) = start(&[]);
    let endpoint = value(&lines, "IDENTITY_ENDPOINT").expect("IDENTITY_ENDPOINT line");
    let secret = value(&lines, "IDENTITY_HEADER").expect("IDENTITY_HEADER line");
    assert!(endpoint.starts_with("http://127.0.0.1:") && endpoint.ends_with("/msi/token"));
    assert_eq!(secret.len(), 32);
    assert_eq!(fetch(endpoint, secret), 200);
    assert_eq!(fetch(endpoint, "wrong"), 401);
}

#[test]
fn secret_file_is_used_and_not_printed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, "my-test-secret\n").unwrap();
    let path = file.to_str().unwrap();
    let (_emu, lines) = start(&["--secret-file", path]);
    let endpoint = value(&lines, "IDENTITY_ENDPOINT").expect("IDENTITY_ENDPOINT line");
    assert!(value(&lines, "IDENTITY_HEADER").is_none());
    assert_eq!(fetch(endpoint, "my-test-secret"), 200);

    std::fs::write(&file, "\n").unwrap();
    let out = run(&[
        "emulator",
        "--protocol",
        "appservice",
        "--listen",
        "127.0.0.1:0",
        "--secret-file",
        path,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("empty"));
    let missing = dir.path().join("missing");
    let out = run(&[
        "emulator",
        "--protocol",
        "appservice",
        "--secret-file",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--secret-file"));
    let out = run(&["emulator", "--protocol", "imds", "--secret-file", path]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn non_loopback_listen_is_a_usage_error() {
    for addr in ["0.0.0.0:50342", "[::]:0", "10.1.2.3:80"] {
        let out = run(&["emulator", "--listen", addr]);
        assert_eq!(out.status.code(), Some(2), "{addr}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("only loopback"), "{err}");
    }
}

#[test]
fn a_bad_entra_option_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let cases = [
        ("--client-certificate", &missing, "--client-certificate"),
        ("--client-certificate", &not_pem, "holds no PEM certificate"),
        ("--client-secret-file", &missing, "--client-secret-file"),
    ];
    for (flag, path, says) in cases {
        let out = run(&[
            "emulator",
            "--protocol",
            "entra",
            "--listen",
            "127.0.0.1:0",
            flag,
            path.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{flag} {}: {err}",
            path.display()
        );
        assert!(err.contains(says), "{err}");
    }
    let out = run(&["emulator", "--protocol", "imds", "--tenant-id", "t"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only for --protocol entra"));
}
