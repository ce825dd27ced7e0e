//! The endpoint over real loopback sockets, on a cache fed by the emulator (no FUSE).

use super::*;
use crate::emulator::{Emulator, EmulatorConfig};
use crate::policy::Policy;
use crate::policy::SystemClock;
use crate::source::cloudshell::CloudShell;
use crate::source::Identity;

struct Rig {
    emu: Emulator,
    cache: Arc<Cache>,
    ep: Endpoint,
}

fn rig(identity: Identity) -> Rig {
    let emu = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default()).unwrap();
    let source = Arc::new(CloudShell::new(&emu.url()).unwrap());
    let policy = Policy {
        timeout: Duration::from_secs(3),
        ..Policy::default()
    };
    let cache = Cache::new(
        crate::cache::Identities::new(source, identity, String::new(), Vec::new()),
        policy,
        &[],
        Arc::new(SystemClock),
    );
    let settings = Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        timeout: Duration::from_secs(3),
    };
    let ep = Endpoint::start(settings, cache.clone(), None).unwrap();
    Rig { emu, cache, ep }
}

fn secret_of(ep: &Endpoint) -> String {
    let env = String::from_utf8(ep.env_file().to_vec()).unwrap();
    env.lines()
        .find_map(|l| l.strip_prefix("IDENTITY_HEADER="))
        .unwrap()
        .to_string()
}

/// One request with `head` lines after the request line; (status, body).
fn send(ep: &Endpoint, target: &str, head: &str) -> (u16, crate::testing::Body) {
    crate::testing::http_get(ep.addr(), target, head)
}

const ARM: &str = "/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fmanagement.azure.com";

fn good_head(ep: &Endpoint) -> String {
    format!(
        "Host: {}\r\nX-IDENTITY-HEADER: {}\r\n",
        ep.addr(),
        secret_of(ep)
    )
}

#[test]
fn env_file_and_secret() {
    let r = rig(Identity::default());
    let env = String::from_utf8(r.ep.env_file().to_vec()).unwrap();
    let lines: Vec<&str> = env.lines().collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(
        lines[0],
        format!("IDENTITY_ENDPOINT=http://{}/msi/token", r.ep.addr())
    );
    let secret = secret_of(&r.ep);
    assert_eq!(lines[1], format!("IDENTITY_HEADER={secret}"));
    assert_eq!(
        lines[2],
        format!("MSI_ENDPOINT=http://{}/msi/token", r.ep.addr()),
        "2017-09-01 at the same URL"
    );
    assert_eq!(lines[3], format!("MSI_SECRET={secret}"), "and secret");
    assert_eq!(secret.len(), 64);
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_ne!(
        secret,
        secret_of(&rig(Identity::default()).ep),
        "new per mount"
    );
    assert!(!format!("{:?}", r.ep).contains(&secret));
    let status = (r.ep.status_part())().to_string();
    assert!(!status.contains(&secret));
    assert!(status.contains(&r.ep.addr().to_string()));
}

#[test]
fn serves_the_cache_entry_of_the_file_name_in_either_spelling() {
    let r = rig(Identity::default());
    let head = good_head(&r.ep);
    let (status, body) = send(&r.ep, ARM, &head);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["resource"], "https://management.azure.com");
    assert_eq!(body["token_type"], "Bearer");
    let expires: i64 = body["expires_on"].as_str().unwrap().parse().unwrap();
    let file = r
        .cache
        .peek(&crate::cache::Key::new(
            crate::cache::IdentityId::DEFAULT,
            crate::names::resolve("management.azure.com").unwrap(),
        ))
        .expect("one entry, under the file name's resource");
    assert_eq!(expires, file.expires_on / 1000);
    assert!(body["access_token"].as_str().unwrap().as_bytes() == file.token());
    let slash = ARM.replace("azure.com", "azure.com%2F");
    let (status, body2) = send(&r.ep, &slash, &head);
    assert_eq!(status, 200);
    assert_eq!(body2["resource"], "https://management.azure.com/");
    assert!(body2["access_token"] == body["access_token"]);
    assert_eq!(r.emu.requests(), 1, "one upstream call for both spellings");
}

#[test]
fn refusals_before_any_upstream_call() {
    let r = rig(Identity::default());
    let head = good_head(&r.ep);
    let host = format!("Host: {}\r\n", r.ep.addr());
    let secret = secret_of(&r.ep);
    let cases = [
        (ARM.to_string(), host.clone(), 401),
        (
            ARM.to_string(),
            format!("{host}X-IDENTITY-HEADER: {}0\r\n", secret),
            401,
        ),
        (
            ARM.to_string(),
            format!("{host}X-IDENTITY-HEADER: {}\r\n", &secret[1..]),
            401,
        ),
        ("/other".to_string(), host.clone(), 401),
        (
            ARM.to_string(),
            format!("{head}X-Forwarded-For: 10.0.0.1\r\n"),
            400,
        ),
        (
            ARM.to_string(),
            format!("Host: evil.example.com\r\nX-IDENTITY-HEADER: {secret}\r\n"),
            400,
        ),
        ("/other".to_string(), head.clone(), 404),
        (ARM.replace("2019-08-01", "2017-09-01"), head.clone(), 400),
        (
            "/msi/token?api-version=2019-08-01".into(),
            head.clone(),
            400,
        ),
        (ARM.replace("https%3A%2F%2F", ""), head.clone(), 400),
        (ARM.replace("management", "a%20b"), head.clone(), 400),
        (format!("{ARM}&client_id=abc"), head.clone(), 400),
        (format!("{ARM}&principal_id=abc"), head.clone(), 400),
        (format!("{ARM}&mi_res_id=abc"), head.clone(), 400),
        (format!("{ARM}&resource=x"), head.clone(), 400),
    ];
    for (target, head, want) in cases {
        let (status, body) = send(&r.ep, &target, &head);
        assert_eq!(status, want, "{target}: {body}");
        assert!(body["statusCode"] == want, "App Service shape: {body}");
    }
    let (status, body) = send(&r.ep, ARM, &host);
    assert_eq!(
        (status, body["message"].as_str()),
        (401, Some("Unauthorized"))
    );
    assert_eq!(r.emu.requests(), 0);
    let counters = (r.ep.status_part())();
    assert_eq!(counters["unauthorized"], 5);
    assert_eq!(counters["served"], 0);
}

#[test]
fn the_mounts_own_identity_is_served() {
    let r = rig(Identity {
        client_id: Some("11111111-2222-3333-4444-555555555555".into()),
        ..Identity::default()
    });
    let head = good_head(&r.ep);
    let (status, body) = send(
        &r.ep,
        &format!("{ARM}&client_id=11111111-2222-3333-4444-555555555555"),
        &head,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["client_id"], "11111111-2222-3333-4444-555555555555");
    let (status, _) = send(&r.ep, &format!("{ARM}&client_id=other"), &head);
    assert_eq!(status, 400);
}

#[test]
fn upstream_refusal_and_outage() {
    let r = rig(Identity::default());
    let head = good_head(&r.ep);
    let target = "/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fnot-allowed.example.com";
    let (status, body) = send(&r.ep, target, &head);
    assert_eq!(status, 400, "{body}");
    let msg = body["message"].as_str().unwrap();
    assert!(msg.contains("https://not-allowed.example.com"), "{msg}");
    assert_eq!((r.ep.status_part())()["refused"], 1);
    r.emu.shutdown();
    let vault = "/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fvault.azure.net";
    let (status, body) = send(&r.ep, vault, &head);
    assert_eq!(status, 500, "{body}");
    assert!(body.get("access_token").is_none());
}

#[test]
fn listen_addresses() {
    assert!(parse_listen("127.0.0.1:0").is_ok());
    assert!(parse_listen("[::1]:8080").is_ok());
    assert!(parse_listen("0.0.0.0:80").is_err());
    assert!(parse_listen("10.1.2.3:80").is_err());
    assert!(parse_listen("localhost:80").is_err());
    assert!(crate::hardening::ct_eq(b"abc", b"abc"));
    assert!(!crate::hardening::ct_eq(b"abc", b"abd"));
    assert!(!crate::hardening::ct_eq(b"abc", b"ab"));
}

#[test]
fn limits_against_a_flood() {
    let c = crate::httpserver::token_listener_config("endpoint");
    assert_eq!(c.max_connections, 256);
    assert_eq!(c.first_head_timeout, Duration::from_secs(2));
    assert_eq!(
        c.header_read_timeout,
        Duration::from_secs(10),
        "keep-alive idle"
    );
}

#[test]
fn ambiguous_proxied_or_absolute_requests_are_400() {
    let r = rig(Identity::default());
    let head = good_head(&r.ep);
    let addr = r.ep.addr();
    let cases = [
        (ARM.to_string(), format!("{head}Host: {addr}\r\n"), "Host"),
        (
            ARM.to_string(),
            format!("{head}Host: evil.example\r\n"),
            "Host",
        ),
        (
            format!("http://evil.example{ARM}"),
            head.clone(),
            "not a URL",
        ),
        (format!("http://{addr}{ARM}"), head.clone(), "not a URL"),
        (
            ARM.to_string(),
            format!("{head}X-Forwarded-Host: evil.example\r\n"),
            "proxy",
        ),
        (
            ARM.to_string(),
            format!("{head}X-Real-IP: 10.0.0.1\r\n"),
            "proxy",
        ),
    ];
    for (target, head, says) in cases {
        let (status, body) = send(&r.ep, &target, &head);
        assert_eq!(status, 400, "{says}: {body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{says}: {body}");
    }
    assert_eq!(r.emu.requests(), 0);
}

#[test]
fn resources_longer_than_512_bytes_are_400() {
    let r = rig(Identity::default());
    let head = good_head(&r.ep);
    let target = |len: usize| {
        let resource = format!("api://{}", "a".repeat(len - "api://".len()));
        format!("/msi/token?api-version=2019-08-01&resource={resource}")
    };
    let (status, body) = send(&r.ep, &target(513), &head);
    assert_eq!(status, 400, "{body}");
    assert!(body["message"]
        .as_str()
        .is_some_and(|m| m.contains("513 bytes")));
    assert_eq!(r.emu.requests(), 0);
    let (_, body) = send(&r.ep, &target(512), &head);
    assert!(!body.to_string().contains("bytes long"), "{body}");
    assert_eq!(r.emu.requests(), 1, "512 bytes reach the upstream");
}

#[test]
fn a_caller_without_the_secret_keeps_no_connection() {
    use std::io::{Read, Write};
    let r = rig(Identity::default());
    let mut conn = std::net::TcpStream::connect(r.ep.addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let head = format!("GET {ARM} HTTP/1.1\r\nHost: {}\r\n\r\n", r.ep.addr());
    conn.write_all(head.as_bytes()).unwrap();
    let mut answer = Vec::new();
    // Read to the end: the server closes after the 401 (a kept-alive connection would
    // time the read out instead).
    conn.read_to_end(&mut answer).unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert_eq!(r.emu.requests(), 0);
}

const ARM_2017: &str =
    "/msi/token?api-version=2017-09-01&resource=https%3A%2F%2Fmanagement.azure.com";

#[test]
fn the_2017_protocol_takes_the_secret_header_and_answers_a_utc_date() {
    let r = rig(Identity::default());
    let secret = secret_of(&r.ep);
    let head = format!("Host: {}\r\nsecret: {secret}\r\n", r.ep.addr());
    let (status, body) = send(&r.ep, ARM_2017, &head);
    assert_eq!(status, 200, "{body}");
    let fields: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(
        fields,
        ["access_token", "expires_on", "resource", "token_type"],
        "the 2017 shape"
    );
    assert_eq!(body["resource"], "https://management.azure.com");
    let file = r
        .cache
        .peek(&crate::cache::Key::new(
            crate::cache::IdentityId::DEFAULT,
            crate::names::resolve("management.azure.com").unwrap(),
        ))
        .expect("the file name's entry");
    assert!(body["access_token"].as_str().unwrap().as_bytes() == file.token());
    assert_eq!(
        body["expires_on"],
        super::protocol::legacy_date(file.expires_on.div_euclid(1000))
    );
    let date = body["expires_on"].as_str().unwrap();
    assert_eq!(date.len(), "06/20/2026 02:57:58 +00:00".len(), "{date}");
    assert!(date.ends_with(" +00:00"), "{date}");
    // The resource unencoded, as curl sends it.
    let plain = "/msi/token?api-version=2017-09-01&resource=https://management.azure.com";
    let (status, body) = send(&r.ep, plain, &head);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["resource"], "https://management.azure.com");
    // The same entry as 2019-08-01's: one upstream call.
    let (status, _) = send(&r.ep, ARM, &good_head(&r.ep));
    assert_eq!(status, 200);
    assert_eq!(r.emu.requests(), 1);
    assert_eq!((r.ep.status_part())()["served"], 3);
}

#[test]
fn the_2017_protocol_refuses_like_2019() {
    let r = rig(Identity::default());
    let secret = secret_of(&r.ep);
    let host = format!("Host: {}\r\n", r.ep.addr());
    let head = format!("{host}secret: {secret}\r\n");
    let cases = [
        (ARM_2017.to_string(), host.clone(), 401, "Unauthorized"),
        (
            ARM_2017.to_string(),
            format!("{host}secret: {}0\r\n", secret),
            401,
            "Unauthorized",
        ),
        (
            ARM_2017.to_string(),
            format!("{host}secret: {}\r\n", &secret[1..]),
            401,
            "Unauthorized",
        ),
        // Right in one header, wrong in the other.
        (
            ARM_2017.to_string(),
            format!("{head}X-IDENTITY-HEADER: x\r\n"),
            401,
            "Unauthorized",
        ),
        // The other version's header.
        (
            ARM.to_string(),
            head.clone(),
            400,
            "X-IDENTITY-HEADER header",
        ),
        (
            ARM_2017.to_string(),
            format!("{host}X-IDENTITY-HEADER: {secret}\r\n"),
            400,
            "secret header",
        ),
        (
            format!("{ARM_2017}&clientid=abc"),
            head.clone(),
            400,
            "clientid names no identity",
        ),
        (
            format!("{ARM_2017}&client_id=abc"),
            head.clone(),
            400,
            "with clientid, not client_id",
        ),
        (
            "/msi/token?api-version=2017-09-01".into(),
            head.clone(),
            400,
            "resource",
        ),
        (
            ARM_2017.replace("2017-09-01", "2017-09-02"),
            head.clone(),
            400,
            "2017-09-01 with the secret in the secret header",
        ),
    ];
    for (target, head, want, says) in cases {
        let (status, body) = send(&r.ep, &target, &head);
        assert_eq!(status, want, "{target}: {body}");
        assert!(body["statusCode"] == want, "App Service shape: {body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{says}: {body}");
        assert!(!message.contains(&secret));
    }
    assert_eq!(r.emu.requests(), 0);
    assert_eq!((r.ep.status_part())()["unauthorized"], 4);
}

#[test]
fn the_2017_protocol_serves_a_user_assigned_identity_by_clientid() {
    let r = rig(Identity {
        client_id: Some("11111111-2222-3333-4444-555555555555".into()),
        ..Identity::default()
    });
    let head = format!("Host: {}\r\nsecret: {}\r\n", r.ep.addr(), secret_of(&r.ep));
    let (status, body) = send(
        &r.ep,
        &format!("{ARM_2017}&clientid=11111111-2222-3333-4444-555555555555"),
        &head,
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.get("client_id").is_none(), "not in the 2017 shape");
    let (status, body) = send(&r.ep, &format!("{ARM_2017}&clientid=other"), &head);
    assert_eq!(status, 400, "{body}");
    assert_eq!(r.emu.requests(), 1);
}
