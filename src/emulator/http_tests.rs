//! The server side of the emulator: loopback only, the configured secret, idle connections
//! on one thread, and the raw faults as a raw client sees them.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::emulator_tests::{claims, emu, emu_with, get, post, query, raw, META, MGMT};
use super::*;

const REQUEST: &str =
    "POST /oauth2/token HTTP/1.1\r\nMetadata: true\r\nContent-Length: 29\r\n\r\nresource=https://ai.azure.com";

/// Sends one Cloud Shell request on a fresh connection; returns everything read until the
/// emulator closes it (or `limit` bytes).
fn exchange(emu: &Emulator, limit: usize) -> Vec<u8> {
    let mut s = TcpStream::connect(emu.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(REQUEST.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.take(limit as u64).read_to_end(&mut out);
    out
}

fn split_head(out: &[u8]) -> (String, &[u8]) {
    let at = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    (
        String::from_utf8_lossy(&out[..at]).into_owned(),
        &out[at + 4..],
    )
}

fn token_of(body: &[u8]) -> Value {
    let v: Value = serde_json::from_slice(body).expect("a JSON body");
    assert!(v["access_token"].as_str().is_some_and(|t| !t.is_empty()));
    v
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn non_loopback_is_refused() {
    for addr in ["0.0.0.0:0", "[::]:0", "192.0.2.7:0"] {
        let err = Emulator::start(addr.parse().unwrap(), EmulatorConfig::default()).err();
        let err = err.expect("refused");
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{addr}");
        assert!(err.to_string().contains("only loopback"), "{err}");
    }
}

#[test]
fn configured_identity_header() {
    let config = EmulatorConfig {
        identity_header: Some("s3cret-value".into()),
        ..EmulatorConfig::default()
    };
    let any = "127.0.0.1:0".parse().unwrap();
    let emu = Emulator::start_with(any, config, Kind::AppService).unwrap();
    assert_eq!(emu.identity_header(), "s3cret-value");
    let q = query(APP_SERVICE_API_VERSION, MGMT, "");
    assert_eq!(get(&emu, &q, "X-IDENTITY-HEADER: s3cret-value\r\n").0, 200);
    assert_eq!(get(&emu, &q, "X-IDENTITY-HEADER: other\r\n").0, 401);
    for bad in ["", " x", "a\nb"] {
        let config = EmulatorConfig {
            identity_header: Some(bad.into()),
            ..EmulatorConfig::default()
        };
        let err = Emulator::start_with(any, config, Kind::AppService).err();
        assert_eq!(
            err.map(|e| e.kind()),
            Some(ErrorKind::InvalidInput),
            "{bad:?}"
        );
    }
    // The secret never shows in Debug.
    let config = EmulatorConfig {
        identity_header: Some("s3cret-value".into()),
        ..EmulatorConfig::default()
    };
    assert!(!format!("{config:?}").contains("s3cret"));
}

#[test]
fn idle_connections_cost_no_threads() {
    let emu = emu();
    let before = threads();
    let idle: Vec<_> = (0..300)
        .map(|_| TcpStream::connect(emu.addr()).unwrap())
        .collect();
    // Half of them start a request head and stop.
    for s in idle.iter().step_by(2) {
        (&*s).write_all(b"POST /oauth2/token HTTP/1.1\r\n").unwrap();
    }
    assert_eq!(post(&emu, MGMT).0, 200);
    let after = threads();
    // Other tests run alongside and start threads too; a thread per connection is +300.
    assert!(after < before + 40, "threads {before} -> {after}");
    drop(idle);
    assert_eq!(post(&emu, MGMT).0, 200);
}

#[test]
fn http09_bad_status_line_and_bad_content_length() {
    let emu = emu();
    emu.push_fault(Fault::Http09);
    let out = exchange(&emu, 1 << 20);
    assert!(out.starts_with(b"{"), "{}", String::from_utf8_lossy(&out));
    assert_eq!(claims(&token_of(&out))["aud"], "https://ai.azure.com");

    emu.push_fault(Fault::BadStatusLine);
    let out = exchange(&emu, 1 << 20);
    let (head, body) = split_head(&out);
    assert!(head.starts_with("HTTP/1.1 abc Nope\r\n"), "{head}");
    token_of(body);

    emu.push_fault(Fault::BadContentLength);
    let out = exchange(&emu, 1 << 20);
    let (head, body) = split_head(&out);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("\r\nContent-Length: nonsense"), "{head}");
    token_of(body);
    assert_eq!(emu.tokens_issued(), 3);
}

#[test]
fn oversized_head() {
    let emu = emu();
    emu.push_fault(Fault::OversizedHead);
    let out = exchange(&emu, 4 << 20);
    let (head, body) = split_head(&out);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"));
    assert!(head.len() > 1 << 20, "{}", head.len());
    token_of(body);
}

#[test]
fn slow_body() {
    let emu = emu();
    emu.push_fault(Fault::SlowBody {
        bytes_per_sec: 2000,
    });
    let mut s = TcpStream::connect(emu.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(REQUEST.as_bytes()).unwrap();
    let started = Instant::now();
    let mut first = [0u8; 16];
    s.read_exact(&mut first).unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200 OK"));
    let head_at = started.elapsed();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let all = [&first[..], &rest].concat();
    let (head, body) = split_head(&all);
    assert!(head.contains(&format!("Content-Length: {}", body.len())));
    token_of(body);
    // About 700 bytes at 2000 bytes a second: the body takes a while, the head does not.
    let took = started.elapsed();
    assert!(head_at < Duration::from_millis(200), "{head_at:?}");
    assert!(took >= Duration::from_millis(200), "{took:?}");
}

#[test]
fn endless_body_until_the_client_goes() {
    let emu = emu();
    emu.push_fault(Fault::EndlessBody);
    let out = exchange(&emu, 4 << 20);
    assert_eq!(out.len(), 4 << 20);
    let (head, body) = split_head(&out);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && !head.contains("Content-Length"));
    assert!(body.iter().all(|b| *b == b' '));
    // The endless writer ends when the client goes; the emulator keeps serving.
    assert_eq!(post(&emu, MGMT).0, 200);
    let mut stuck = TcpStream::connect(emu.addr()).unwrap();
    emu.push_fault(Fault::EndlessBody);
    stuck.write_all(REQUEST.as_bytes()).unwrap();
    let started = Instant::now();
    emu.shutdown();
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn fields_merge_over_fresh_tokens() {
    let emu = emu();
    emu.set_fault(Some(Fault::Fields(
        r#"{"refresh_in":"0","not_before":null,"expires_on":"1795498573000"}"#.into(),
    )));
    let (status, a) = post(&emu, MGMT);
    let (_, b) = post(&emu, MGMT);
    assert_eq!(status, 200);
    for v in [&a, &b] {
        assert_eq!(v["refresh_in"], "0");
        assert_eq!(v["expires_on"], "1795498573000");
        assert!(v.get("not_before").is_none() && v["token_type"] == "Bearer");
    }
    assert_ne!(a["access_token"], b["access_token"]);
    emu.set_fault(None);
    // A queued one waits for a success: a refused request leaves it queued.
    emu.push_fault(Fault::Fields(r#"{"x":1}"#.into()));
    assert_eq!(raw(&emu, "POST", TOKEN_PATH, "", "resource=x").0, 400);
    let (_, c) = post(&emu, MGMT);
    assert_eq!(c["x"], 1);
    assert!(post(&emu, MGMT).1.get("x").is_none());
    emu.push_fault(Fault::Fields("[1]".into()));
    assert_eq!(post(&emu, MGMT).0, 500);
}

#[test]
fn raw_fault_on_a_keep_alive_connection() {
    let emu = emu();
    // Any request of a connection can be taken over, not only the first.
    let mut s = TcpStream::connect(emu.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(REQUEST.as_bytes()).unwrap();
    let mut first = vec![0u8; 4096];
    let n = s.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200 OK"));
    emu.push_fault(Fault::BadStatusLine);
    s.write_all(REQUEST.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 abc Nope\r\n"), "{out}");
    assert_eq!(emu.requests(), 2);
    let _ = META;
    let _ = emu_with;
}
