use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::{json, Value};

use super::form::legacy_date;
use super::*;

pub(super) const MGMT: &str = "https://management.azure.com/";

pub(super) fn emu() -> Emulator {
    Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default()).unwrap()
}

/// Sends one raw HTTP/1.1 request; returns (status, head, body). Status 0 = no response.
pub(super) fn raw(
    emu: &Emulator,
    method: &str,
    path: &str,
    extra: &str,
    body: &str,
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(emu.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let Some(split) = out.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (0, String::new(), out);
    };
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head, out[split + 4..].to_vec())
}

pub(super) fn post(emu: &Emulator, resource: &str) -> (u16, Value) {
    let body = format!(
        "resource={}",
        utf8_percent_encode(resource, NON_ALPHANUMERIC)
    );
    let (status, _, body) = raw(emu, "POST", TOKEN_PATH, "Metadata: true\r\n", &body);
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

pub(super) fn claims(v: &Value) -> Value {
    decode_claims(v["access_token"].as_str().unwrap()).unwrap()
}

const VAULT: &str = "https://vault.azure.net";
const EVIL: &str = "https://evil.example/x";
pub(super) const META: &str = "Metadata: true\r\n";

pub(super) fn emu_with(protocol: Kind) -> Emulator {
    let any = "127.0.0.1:0".parse().unwrap();
    Emulator::start_with(any, EmulatorConfig::default(), protocol).unwrap()
}

pub(super) fn enc(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

/// `api-version=API&resource=<enc R>` followed by `more` (starting with `&`).
pub(super) fn query(api: &str, resource: &str, more: &str) -> String {
    format!("api-version={api}&resource={}{more}", enc(resource))
}

/// GET of the emulator's token path with `query`; returns (status, head, JSON body).
pub(super) fn get(emu: &Emulator, query: &str, extra: &str) -> (u16, String, Value) {
    let path = format!("{}?{query}", super::path(emu.protocol()));
    let (status, head, body) = raw(emu, "GET", &path, extra, "");
    (
        status,
        head,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

fn keys(v: &Value) -> Vec<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn num(v: &Value, k: &str) -> u64 {
    v[k].as_str().unwrap().parse().unwrap()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn flat(error: &str, description: &str) -> Value {
    json!({"error": error, "error_description": description})
}

fn unique_dir(tag: &str) -> PathBuf {
    let id = random_hex(8).unwrap().to_string();
    std::env::temp_dir().join(format!("cstokenfs-emu-{tag}-{}-{id}", std::process::id()))
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn success_shape() {
    let emu = emu();
    let (status, v) = post(&emu, MGMT);
    assert_eq!(status, 200);
    let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
    let want = [
        "access_token",
        "expires_in",
        "expires_on",
        "not_before",
        "refresh_token",
        "resource",
        "token_type",
    ];
    assert_eq!(keys, want);
    assert!(v.as_object().unwrap().values().all(Value::is_string));
    assert_eq!(
        (v["token_type"].as_str(), v["refresh_token"].as_str()),
        (Some("Bearer"), Some(""))
    );
    let num = |k: &str| v[k].as_str().unwrap().parse::<u64>().unwrap();
    assert_eq!(num("expires_on") - num("not_before"), 3600);
    assert!((3599..=3600).contains(&num("expires_in")));
    let token = v["access_token"].as_str().unwrap();
    assert_eq!(token.matches('.').count(), 2);
    assert!(token.ends_with('.') && !token.contains('='));
    let header = URL_SAFE_NO_PAD
        .decode(token.split('.').next().unwrap())
        .unwrap();
    assert_eq!(header, br#"{"alg":"none","typ":"JWT"}"#);
    let c = claims(&v);
    assert_eq!(
        (c["aud"].as_str(), c["iss"].as_str(), c["serial"].as_u64()),
        (
            Some(MGMT),
            Some(format!("https://sts.windows.net/{TEST_TENANT_ID}/").as_str()),
            Some(1)
        )
    );
    assert_eq!(
        c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(),
        3600
    );
    assert_eq!(c["nbf"], c["iat"]);
    assert_eq!(c["emulator"], NOTICE);
}

#[test]
fn aud_is_resource_as_sent() {
    let emu = emu();
    for r in [
        MGMT,
        "https://management.azure.com",
        "https://vault.azure.net/",
        "6dae42f8-4368-4678-94ff-3960e28e3630",
    ] {
        let (status, v) = post(&emu, r);
        assert_eq!(status, 200, "{r}");
        assert_eq!(
            (v["resource"].as_str(), claims(&v)["aud"].as_str()),
            (Some(r), Some(r))
        );
    }
    let (status, _, body) = raw(
        &emu,
        "POST",
        TOKEN_PATH,
        "Metadata: true\r\n",
        "x=1&resource=https%3A%2F%2Fvault.azure.net",
    );
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains(r#""resource":"https://vault.azure.net""#));
}

#[test]
fn refused_and_allowed_audiences() {
    let config = EmulatorConfig {
        allow: vec!["api://custom/".into()],
        ..EmulatorConfig::default()
    };
    let emu = Emulator::start("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let (status, v) = post(&emu, "https://evil.example/x y");
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], "AudienceNotSupported");
    let msg = "Audience https://evil.example/x y is not a supported MSI token audience. (cstokenfs emulator)";
    assert_eq!(v["error"]["message"], msg);
    assert_eq!(post(&emu, "https://management.azure.com//").0, 400);
    assert_eq!(post(&emu, "api://custom").0, 200);
    emu.set_allow_any(true);
    let (status, v) = post(&emu, "https://evil.example/x y");
    assert_eq!(
        (status, claims(&v)["aud"].as_str()),
        (200, Some("https://evil.example/x y"))
    );
    let (status, _, body) = raw(
        &emu,
        "POST",
        TOKEN_PATH,
        "Metadata: true\r\n",
        "resource=a+b%2B",
    );
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains(r#""resource":"a b+""#));
}

#[test]
fn bad_requests() {
    let emu = emu();
    let bad = |status: u16, body: &[u8]| {
        assert_eq!(status, 400);
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["error"]["code"], "BadRequest");
        v["error"]["message"].as_str().unwrap().to_owned()
    };
    let form = "resource=https%3A%2F%2Fmanagement.azure.com%2F";
    let (s, _, b) = raw(&emu, "POST", TOKEN_PATH, "", form);
    assert_eq!(bad(s, &b), "Required metadata header not specified");
    let (s, _, b) = raw(&emu, "POST", TOKEN_PATH, "Metadata: false\r\n", form);
    assert_eq!(bad(s, &b), "Required metadata header not specified");
    for body in [
        "",
        "resource=",
        "other=1",
        "resource=%FF",
        "resource=%C3%28",
    ] {
        let (s, _, b) = raw(&emu, "POST", TOKEN_PATH, "Metadata: true\r\n", body);
        bad(s, &b);
    }
    assert_eq!(
        raw(&emu, "POST", "/other", "Metadata: true\r\n", form).0,
        404
    );
    let (s, head, _) = raw(&emu, "GET", TOKEN_PATH, "Metadata: true\r\n", "");
    assert!(s == 405 && head.contains("Allow: POST"));
    assert_eq!(emu.requests(), 7);
    assert_eq!(emu.tokens_issued(), 0);
}

#[test]
fn serial_counters_and_keep_alive() {
    let emu = emu();
    for want in 1..=3 {
        assert_eq!(claims(&post(&emu, MGMT).1)["serial"].as_u64(), Some(want));
    }
    post(&emu, "https://vault.azure.net");
    assert_eq!((emu.requests(), emu.tokens_issued()), (4, 4));
    assert_eq!(
        (
            emu.requests_for(MGMT),
            emu.requests_for("https://vault.azure.net")
        ),
        (3, 1)
    );
    emu.reset_counters();
    assert_eq!(
        (emu.requests(), emu.requests_for(MGMT), emu.tokens_issued()),
        (0, 0, 0)
    );
    // Two pipelined requests on one keep-alive connection; serial keeps counting.
    let mut s = TcpStream::connect(emu.addr()).unwrap();
    let one = "POST /oauth2/token HTTP/1.1\r\nMetadata: true\r\nContent-Length: 29\r\n\r\nresource=https://ai.azure.com";
    s.write_all(
        format!(
            "{one}{}",
            one.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n")
        )
        .as_bytes(),
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2);
    assert_eq!(
        (
            emu.requests_for("https://ai.azure.com"),
            emu.tokens_issued()
        ),
        (2, 2)
    );
    assert_eq!(claims(&post(&emu, MGMT).1)["serial"].as_u64(), Some(7));
}

#[test]
fn caching_returns_same_token() {
    let emu = emu();
    emu.set_caching(true);
    let (_, a) = post(&emu, MGMT);
    let (_, b) = post(&emu, MGMT);
    assert_eq!(
        (&a["access_token"], &a["expires_on"]),
        (&b["access_token"], &b["expires_on"])
    );
    let (_, c) = post(&emu, "https://management.azure.com");
    assert_ne!(a["access_token"], c["access_token"]);
    assert_eq!(emu.tokens_issued(), 2);
    emu.set_caching(false);
    assert_ne!(post(&emu, MGMT).1["access_token"], a["access_token"]);
    emu.set_caching(true);
    emu.set_ttl(0);
    let (_, d) = post(&emu, MGMT);
    assert_eq!(d["expires_in"], "0");
    assert_ne!(post(&emu, MGMT).1["access_token"], d["access_token"]);
}

#[test]
fn status_garbage_and_token_shape_faults() {
    let emu = emu();
    let retry = Some("7".to_owned());
    emu.push_fault(Fault::Status {
        code: 429,
        body: "{\"x\":1}".into(),
        retry_after: retry,
    });
    emu.push_fault(Fault::Garbage);
    emu.push_fault(Fault::MissingAccessToken);
    emu.push_fault(Fault::EmptyAccessToken);
    let form = "resource=https%3A%2F%2Fmanagement.azure.com%2F";
    let (s, head, body) = raw(&emu, "POST", TOKEN_PATH, "Metadata: true\r\n", form);
    assert!(s == 429 && head.contains("Retry-After: 7") && body == b"{\"x\":1}");
    assert_eq!(
        raw(&emu, "POST", TOKEN_PATH, "", form).2,
        b"this is not json <html>"
    );
    let (s, v) = post(&emu, MGMT);
    assert!(s == 200 && v.get("access_token").is_none() && v["expires_on"].is_string());
    assert_eq!(post(&emu, MGMT).1["access_token"], "");
    emu.set_fault(Some(Fault::Garbage));
    emu.push_fault(Fault::Status {
        code: 503,
        body: String::new(),
        retry_after: None,
    });
    assert_eq!(post(&emu, MGMT).0, 503);
    assert_eq!(post(&emu, MGMT).1, Value::Null);
    assert_eq!(post(&emu, MGMT).1, Value::Null);
    emu.set_fault(None);
    assert_eq!(post(&emu, MGMT).0, 200);
    assert_eq!((emu.requests(), emu.tokens_issued()), (8, 1));
}

#[test]
fn expires_on_forms() {
    let emu = emu();
    let on = |f| {
        emu.push_fault(Fault::ExpiresOn(f));
        let (s, v) = post(&emu, MGMT);
        assert!(s == 200 && claims(&v)["aud"] == MGMT);
        (
            v.get("expires_in").cloned(),
            v.get("expires_on").cloned(),
            claims(&v)["exp"].as_u64().unwrap(),
        )
    };
    let (i, o, exp) = on(ExpiresOnForm::EpochString);
    assert!(i.unwrap().is_string() && o == Some(json!(exp.to_string())));
    let (_, o, exp) = on(ExpiresOnForm::EpochNumber);
    assert_eq!(o, Some(json!(exp)));
    let (_, o, exp) = on(ExpiresOnForm::LegacyDateAmPm);
    assert_eq!(o, Some(json!(legacy_date(exp, true))));
    let (_, o, exp) = on(ExpiresOnForm::LegacyDate24h);
    assert_eq!(o, Some(json!(legacy_date(exp, false))));
    let (i, o, _) = on(ExpiresOnForm::OnlyExpiresIn);
    assert!(i.unwrap().is_string() && o.is_none());
    let (i, o, _) = on(ExpiresOnForm::ExpiresInNumber);
    assert!(i.unwrap().is_u64() && o.is_none());
    assert_eq!(on(ExpiresOnForm::Nothing).0, None);
    let (i, o, _) = on(ExpiresOnForm::GarbageString);
    assert!(i.is_none() && o == Some(json!("soon")));
    assert_eq!(emu.tokens_issued(), 8);
}

#[test]
fn protocol_names_urls_and_identity_header() {
    for p in Kind::ALL {
        assert_eq!(p.name().parse::<Kind>(), Ok(p));
        assert_eq!(p.to_string(), p.name());
    }
    assert_eq!("IMDS".parse::<Kind>(), Ok(Kind::Imds));
    let err = "cloud-shell".parse::<Kind>().unwrap_err().to_string();
    assert!(err.contains("cloudshell, imds, appservice, arc"), "{err}");
    let cs = emu();
    assert_eq!(cs.protocol(), Kind::CloudShell);
    assert_eq!(cs.last_params(), None);
    for (p, path) in [
        (Kind::CloudShell, "/oauth2/token"),
        (Kind::Imds, "/metadata/identity/oauth2/token"),
        (Kind::AppService, "/msi/token"),
        (Kind::Arc, "/metadata/identity/oauth2/token"),
    ] {
        let emu = emu_with(p);
        let port = emu.addr().port();
        assert_eq!(emu.url(), format!("http://127.0.0.1:{port}{path}"));
        assert_eq!(emu.protocol(), p);
    }
    let (a, b) = (cs.identity_header(), emu().identity_header());
    assert!(a.len() == 32 && a.bytes().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(a, b);
}

#[test]
fn last_params_cloud_shell() {
    let emu = emu();
    let form = "resource=https%3A%2F%2Fvault.azure.net&x=a+b&x=second&bad=%FF";
    assert_eq!(raw(&emu, "POST", TOKEN_PATH, META, form).0, 200);
    let want = map(&[("resource", VAULT), ("x", "a b"), ("bad", "\u{FFFD}")]);
    assert_eq!(emu.last_params(), Some(want.clone()));
    // Wrong path or method never reaches protocol handling.
    assert_eq!(raw(&emu, "POST", "/x", META, "resource=y").0, 404);
    assert_eq!(raw(&emu, "GET", TOKEN_PATH, META, "").0, 405);
    assert_eq!(emu.last_params(), Some(want));
    assert_eq!(raw(&emu, "POST", TOKEN_PATH, META, "").0, 400);
    assert_eq!(emu.last_params(), Some(BTreeMap::new()));
}

#[test]
fn imds_success_and_params() {
    let emu = emu_with(Kind::Imds);
    let q = query(IMDS_API_VERSION, VAULT, "&client_id=abc-123");
    let (status, _, v) = get(&emu, &q, META);
    assert_eq!(status, 200);
    let want = [
        "access_token",
        "client_id",
        "expires_in",
        "expires_on",
        "ext_expires_in",
        "not_before",
        "resource",
        "token_type",
    ];
    assert_eq!(keys(&v), want);
    assert!(v.as_object().unwrap().values().all(Value::is_string));
    assert_eq!(
        (v["client_id"].as_str(), v["resource"].as_str()),
        (Some("abc-123"), Some(VAULT))
    );
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(num(&v, "expires_on") - num(&v, "not_before"), 3600);
    assert!((3599..=3600).contains(&num(&v, "ext_expires_in")));
    let c = claims(&v);
    assert_eq!(
        (c["aud"].as_str(), c["exp"].as_u64()),
        (Some(VAULT), Some(num(&v, "expires_on")))
    );
    let params = [
        ("api-version", IMDS_API_VERSION),
        ("resource", VAULT),
        ("client_id", "abc-123"),
    ];
    assert_eq!(emu.last_params(), Some(map(&params)));
    let (status, _, v) = get(
        &emu,
        &query(IMDS_API_VERSION, VAULT, "&object_id=o-1"),
        META,
    );
    assert_eq!(
        (status, v["client_id"].as_str()),
        (200, Some(DEFAULT_CLIENT_ID))
    );
    let p = emu.last_params().unwrap();
    assert!(p["object_id"] == "o-1" && !p.contains_key("client_id"));
    let res_id = "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u i";
    let more = format!("&msi_res_id={}", enc(res_id));
    assert_eq!(
        get(&emu, &query(IMDS_API_VERSION, VAULT, &more), META).0,
        200
    );
    assert_eq!(emu.last_params().unwrap()["msi_res_id"], res_id);
    assert_eq!(
        (emu.requests(), emu.requests_for(VAULT), emu.tokens_issued()),
        (3, 3, 3)
    );
}

#[test]
fn imds_errors() {
    let emu = emu_with(Kind::Imds);
    let good = query(IMDS_API_VERSION, MGMT, "");
    let missing_meta = flat("invalid_request", "Required metadata header not specified");
    for extra in ["", "Metadata: false\r\n"] {
        let (status, _, v) = get(&emu, &good, extra);
        assert_eq!((status, v), (400, missing_meta.clone()));
    }
    for q in [
        format!("resource={}", enc(MGMT)),
        format!("api-version=&resource={}", enc(MGMT)),
        query("2019-08-01", MGMT, ""),
        format!("api-version={IMDS_API_VERSION}"),
        query(IMDS_API_VERSION, "", ""),
        format!("api-version={IMDS_API_VERSION}&resource=%FF"),
    ] {
        let (status, _, v) = get(&emu, &q, META);
        assert_eq!(
            (status, v["error"].as_str()),
            (400, Some("invalid_request")),
            "{q}"
        );
        assert!(v["error_description"].is_string() && keys(&v).len() == 2);
    }
    let (status, _, v) = get(&emu, &query(IMDS_API_VERSION, EVIL, ""), META);
    let msg = format!("AADSTS500011: The resource principal named {EVIL} was not found in the tenant. (cstokenfs emulator)");
    assert_eq!((status, v), (400, flat("invalid_resource", &msg)));
    let (status, head, body) = raw(&emu, "POST", IMDS_PATH, META, &good);
    assert!(status == 405 && head.contains("Allow: GET"), "{head}");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "method_not_allowed");
    let (status, _, body) = raw(&emu, "GET", &format!("{TOKEN_PATH}?{good}"), META, "");
    assert_eq!(status, 404);
    assert!(serde_json::from_slice::<Value>(&body).unwrap()["error"].is_string());
    emu.set_allow_any(true);
    let (status, _, v) = get(&emu, &query(IMDS_API_VERSION, EVIL, ""), META);
    assert_eq!((status, claims(&v)["aud"].as_str()), (200, Some(EVIL)));
    assert_eq!((emu.requests(), emu.tokens_issued()), (10, 1));
    assert_eq!((emu.requests_for(MGMT), emu.requests_for(EVIL)), (5, 2));
}

#[test]
fn app_service_success_and_params() {
    let emu = emu_with(Kind::AppService);
    let secret = format!("X-IDENTITY-HEADER: {}\r\n", emu.identity_header());
    let (status, _, v) = get(&emu, &query(APP_SERVICE_API_VERSION, VAULT, ""), &secret);
    assert_eq!(status, 200);
    let want = [
        "access_token",
        "client_id",
        "expires_on",
        "resource",
        "token_type",
    ];
    assert_eq!(keys(&v), want);
    assert!(v.as_object().unwrap().values().all(Value::is_string));
    assert_eq!(
        (
            v["client_id"].as_str(),
            v["resource"].as_str(),
            v["token_type"].as_str()
        ),
        (Some(DEFAULT_CLIENT_ID), Some(VAULT), Some("Bearer"))
    );
    let c = claims(&v);
    assert_eq!(
        (c["aud"].as_str(), c["exp"].as_u64()),
        (Some(VAULT), Some(num(&v, "expires_on")))
    );
    let lower = secret.to_ascii_lowercase().replace(
        &emu.identity_header().to_ascii_lowercase(),
        &emu.identity_header(),
    );
    let (status, _, v) = get(
        &emu,
        &query(APP_SERVICE_API_VERSION, VAULT, "&client_id=c-9"),
        &lower,
    );
    assert_eq!((status, v["client_id"].as_str()), (200, Some("c-9")));
    assert_eq!(emu.last_params().unwrap()["client_id"], "c-9");
    for (key, value) in [
        ("mi_res_id", "/subscriptions/s/x y"),
        ("principal_id", "p-1"),
    ] {
        let more = format!("&{key}={}", enc(value));
        let (status, _, v) = get(&emu, &query(APP_SERVICE_API_VERSION, VAULT, &more), &secret);
        assert_eq!(
            (status, v["client_id"].as_str()),
            (200, Some(DEFAULT_CLIENT_ID))
        );
        let params = [
            ("api-version", APP_SERVICE_API_VERSION),
            ("resource", VAULT),
            (key, value),
        ];
        assert_eq!(emu.last_params(), Some(map(&params)));
    }
    assert_eq!((emu.requests_for(VAULT), emu.tokens_issued()), (4, 4));
}

#[test]
fn app_service_errors() {
    let emu = emu_with(Kind::AppService);
    let secret = format!("X-IDENTITY-HEADER: {}\r\n", emu.identity_header());
    let good = query(APP_SERVICE_API_VERSION, MGMT, "");
    let wrong = format!("X-IDENTITY-HEADER: {}\r\n", "0".repeat(32));
    for extra in ["", META, &wrong, "X-IDENTITY-HEADER:\r\n"] {
        let (status, _, v) = get(&emu, &good, extra);
        assert_eq!(
            (status, v["statusCode"].as_u64()),
            (401, Some(401)),
            "{extra}"
        );
        assert!(v["message"].is_string() && keys(&v).len() == 2);
        assert!(!v.to_string().contains(&emu.identity_header()));
    }
    for q in [
        format!("resource={}", enc(MGMT)),
        query(IMDS_API_VERSION, MGMT, ""),
        format!("api-version={APP_SERVICE_API_VERSION}"),
        format!("api-version={APP_SERVICE_API_VERSION}&resource=%C3%28"),
    ] {
        let (status, _, v) = get(&emu, &q, &secret);
        assert_eq!((status, v["statusCode"].as_u64()), (400, Some(400)), "{q}");
        assert!(v["message"].is_string() && keys(&v).len() == 2);
    }
    let (status, _, v) = get(&emu, &query(APP_SERVICE_API_VERSION, EVIL, ""), &secret);
    let msg = format!("AADSTS500011: The resource principal named {EVIL} was not found in the tenant. (cstokenfs emulator)");
    assert_eq!(
        (status, v),
        (400, json!({"statusCode": 400, "message": msg}))
    );
    let (status, head, body) = raw(&emu, "POST", APP_SERVICE_PATH, &secret, &good);
    assert!(status == 405 && head.contains("Allow: GET"));
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["statusCode"],
        405
    );
    assert_eq!((emu.requests(), emu.tokens_issued()), (9, 0));
    assert_eq!(get(&emu, &good, &secret).0, 200);
}

#[test]
fn arc_challenge_round_trip() {
    let base = unique_dir("arc");
    let dir = base.join("tokens");
    let emu = emu_with(Kind::Arc);
    emu.set_arc_key_dir(dir.clone());
    let good = query(ARC_API_VERSION, MGMT, "");
    let (status, _, v) = get(&emu, &good, "");
    assert_eq!(
        (status, v),
        (
            400,
            flat("invalid_request", "Required metadata header not specified")
        )
    );
    let (status, _, v) = get(&emu, &query(IMDS_API_VERSION, MGMT, ""), META);
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid_request"))
    );
    assert!(!dir.exists());
    let challenge = |extra: &str| {
        let (status, head, v) = get(&emu, &good, &format!("{META}{extra}"));
        assert_eq!(status, 401, "{head}");
        assert!(v["error"].is_string() && v["error_description"].is_string());
        let realm = head
            .lines()
            // hyper writes header names title-cased (`Www-Authenticate`).
            .find_map(|l| {
                let prefix = "www-authenticate: basic realm=";
                l.to_ascii_lowercase()
                    .starts_with(prefix)
                    .then(|| l[prefix.len()..].to_owned())
            })
            .expect("WWW-Authenticate header");
        PathBuf::from(realm)
    };
    let first = challenge("");
    assert_eq!(first.parent(), Some(dir.as_path()));
    assert_eq!(first.extension().and_then(|e| e.to_str()), Some("key"));
    assert_eq!((mode(&dir), mode(&first)), (0o700, 0o600));
    let secret = std::fs::read_to_string(&first).unwrap();
    assert!(secret.len() == 64 && secret.bytes().all(|c| c.is_ascii_hexdigit()));
    let auth = format!("{META}Authorization: Basic {secret}\r\n");
    let (status, _, v) = get(&emu, &query(ARC_API_VERSION, VAULT, "&x=1"), &auth);
    assert_eq!(status, 200);
    assert_eq!(keys(&v)[..2], ["access_token", "client_id"]);
    assert!(v.as_object().unwrap().values().all(Value::is_string));
    assert_eq!(
        (v["client_id"].as_str(), claims(&v)["aud"].as_str()),
        (Some(DEFAULT_CLIENT_ID), Some(VAULT))
    );
    let params = [
        ("api-version", ARC_API_VERSION),
        ("resource", VAULT),
        ("x", "1"),
    ];
    assert_eq!(emu.last_params(), Some(map(&params)));
    let (status, _, v) = get(&emu, &query(ARC_API_VERSION, EVIL, ""), &auth);
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid_resource"))
    );
    let second = challenge(&format!("Authorization: Basic {}\r\n", "a".repeat(64)));
    let third = challenge(&format!("Authorization: Bearer {secret}\r\n"));
    assert!(first != second && second != third && second.exists() && third.exists());
    assert_eq!(
        (emu.requests(), emu.requests_for(MGMT), emu.tokens_issued()),
        (7, 5, 1)
    );
    emu.stop();
    assert!(!first.exists() && !second.exists() && !third.exists());
    std::fs::remove_dir_all(&base).unwrap();
}

#[test]
fn faults_counters_and_caching_under_other_protocols() {
    let emu = emu_with(Kind::Imds);
    let q = query(IMDS_API_VERSION, VAULT, "&client_id=c-1");
    emu.push_fault(Fault::Status {
        code: 429,
        body: "{}".into(),
        retry_after: Some("3".into()),
    });
    emu.push_fault(Fault::Garbage);
    emu.push_fault(Fault::MissingAccessToken);
    emu.push_fault(Fault::ExpiresOn(ExpiresOnForm::EpochNumber));
    // A fault replaces the answer before any protocol check (no Metadata here).
    let (status, head, _) = get(&emu, &q, "");
    assert!(status == 429 && head.contains("Retry-After: 3"));
    let path = format!("{IMDS_PATH}?{q}");
    assert_eq!(
        raw(&emu, "GET", &path, META, "").2,
        b"this is not json <html>"
    );
    let (status, _, v) = get(&emu, &q, META);
    assert!(status == 200 && v.get("access_token").is_none());
    assert_eq!(
        (v["client_id"].as_str(), v["ext_expires_in"].is_string()),
        (Some("c-1"), true)
    );
    let (status, _, v) = get(&emu, &q, META);
    assert_eq!(
        (status, v["expires_on"].as_u64()),
        (200, claims(&v)["exp"].as_u64())
    );
    emu.set_fault(Some(Fault::Reset));
    assert_eq!(get(&emu, &q, META).0, 0);
    emu.set_fault(None);
    emu.set_caching(true);
    emu.set_latency(Duration::from_millis(30));
    let started = Instant::now();
    let (a, b) = (get(&emu, &q, META).2, get(&emu, &q, META).2);
    assert!(started.elapsed() >= Duration::from_millis(60));
    assert_eq!(a["access_token"], b["access_token"]);
    assert_eq!(
        (emu.requests(), emu.requests_for(VAULT), emu.tokens_issued()),
        (7, 7, 2)
    );
    emu.reset_counters();
    assert_eq!(
        (emu.requests(), emu.requests_for(VAULT), emu.tokens_issued()),
        (0, 0, 0)
    );

    let emu = emu_with(Kind::AppService);
    emu.set_ttl(600);
    let q = query(APP_SERVICE_API_VERSION, MGMT, "");
    emu.push_fault(Fault::EmptyAccessToken);
    emu.push_fault(Fault::ExpiresOn(ExpiresOnForm::OnlyExpiresIn));
    emu.push_fault(Fault::ExpiresOn(ExpiresOnForm::LegacyDate24h));
    let (status, _, v) = get(&emu, &q, "");
    assert_eq!((status, v["access_token"].as_str()), (200, Some("")));
    assert_eq!(
        keys(&v),
        [
            "access_token",
            "client_id",
            "expires_on",
            "resource",
            "token_type"
        ]
    );
    let (_, _, v) = get(&emu, &q, "");
    assert!(v.get("expires_on").is_none() && (599..=600).contains(&num(&v, "expires_in")));
    let (_, _, v) = get(&emu, &q, "");
    let exp = claims(&v)["exp"].as_u64().unwrap();
    assert_eq!(v["expires_on"], legacy_date(exp, false));
    assert!(v.get("expires_in").is_none());
    assert_eq!((emu.requests_for(MGMT), emu.tokens_issued()), (3, 2));
}

#[test]
fn legacy_date_formats() {
    assert_eq!(
        legacy_date(1_579_152_252, true),
        "1/16/2020 5:24:12 AM +00:00"
    );
    assert_eq!(
        legacy_date(1_579_195_452, true),
        "1/16/2020 5:24:12 PM +00:00"
    );
    assert_eq!(
        legacy_date(1_560_999_478, false),
        "06/20/2019 02:57:58 +00:00"
    );
    assert_eq!(legacy_date(0, true), "1/1/1970 12:00:00 AM +00:00");
}

#[test]
fn reset_huge_body_and_hang() {
    let emu = emu();
    emu.push_fault(Fault::Reset);
    emu.push_fault(Fault::HugeBody { bytes: 8 << 20 });
    assert_eq!(post(&emu, MGMT).0, 0);
    let (s, _, body) = raw(&emu, "POST", TOKEN_PATH, "", "");
    assert!(s == 200 && body.len() == 8 << 20 && body.ends_with(b" {}"));
    emu.set_fault(Some(Fault::Hang));
    let addr = emu.addr();
    let client = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"POST /oauth2/token HTTP/1.1\r\nMetadata: true\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).map(|_| out)
    });
    while emu.requests() < 3 {
        thread::sleep(Duration::from_millis(5));
    }
    thread::sleep(Duration::from_millis(100));
    assert!(!client.is_finished());
    let started = Instant::now();
    emu.stop();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(client.join().unwrap().unwrap_or_default().is_empty());
}

#[test]
fn latency_is_concurrent() {
    let emu = Arc::new(emu());
    emu.set_latency(Duration::from_millis(400));
    let started = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let emu = Arc::clone(&emu);
            thread::spawn(move || post(&emu, MGMT).0)
        })
        .collect();
    assert!(clients.into_iter().all(|c| c.join().unwrap() == 200));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

#[test]
fn stop_closes_port_and_wait_returns() {
    let emu = Arc::new(emu());
    let addr = emu.addr();
    assert_eq!(
        emu.url(),
        format!("http://127.0.0.1:{}/oauth2/token", addr.port())
    );
    let idle = TcpStream::connect(addr).unwrap();
    emu.set_latency(Duration::from_secs(3600));
    let waiter = {
        let emu = Arc::clone(&emu);
        thread::spawn(move || emu.wait())
    };
    let sleeper = {
        let emu = Arc::clone(&emu);
        thread::spawn(move || post(&emu, MGMT).0)
    };
    while emu.requests() < 1 {
        thread::sleep(Duration::from_millis(5));
    }
    emu.shutdown();
    waiter.join().unwrap();
    assert_eq!(sleeper.join().unwrap(), 0);
    assert_eq!(
        TcpStream::connect(addr).unwrap_err().kind(),
        ErrorKind::ConnectionRefused
    );
    assert_eq!((&idle).read(&mut [0u8; 8]).unwrap(), 0);
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Emulator>();
}

/// With user-assigned identities set, IMDS and App Service answer the one a request names
/// by any of its ids (its ids in the token), the system-assigned one when none is named,
/// and refuse an unknown one as the real services do; `requests_by` counts per identity.
#[test]
fn known_identities_are_answered_and_others_refused() {
    let known = KnownIdentity::numbered(1);
    let header = |emu: &Emulator| format!("X-IDENTITY-HEADER: {}\r\n", emu.identity_header());
    for p in [Kind::Imds, Kind::AppService] {
        let emu = emu_with(p);
        emu.set_identities(vec![known.clone()]);
        let (api, extra) = match p {
            Kind::Imds => (IMDS_API_VERSION, META.to_string()),
            _ => (APP_SERVICE_API_VERSION, header(&emu)),
        };
        let rid = enc(&known.resource_id);
        for more in [
            format!("&client_id={}", known.client_id.to_uppercase()),
            format!("&object_id={}", known.object_id),
            format!("&principal_id={}", known.object_id),
            format!("&msi_res_id={rid}"),
            format!("&mi_res_id={rid}"),
        ] {
            let (status, _, v) = get(&emu, &query(api, VAULT, &more), &extra);
            assert_eq!(status, 200, "{p} {more}: {v}");
            assert_eq!(v["client_id"], known.client_id.as_str(), "{p} {more}");
            let c = claims(&v);
            assert_eq!(c["appid"], known.client_id.as_str());
            assert_eq!(c["azp"], known.client_id.as_str());
            assert_eq!(c["oid"], known.object_id.as_str());
            assert_eq!(c["xms_mirid"], known.resource_id.as_str());
        }
        let (status, _, v) = get(&emu, &query(api, VAULT, ""), &extra);
        assert_eq!(status, 200);
        assert_eq!(claims(&v)["oid"], DEFAULT_OBJECT_ID);
        assert_eq!(emu.requests_by(&known.client_id, VAULT), 5);
        assert_eq!(emu.requests_by(DEFAULT_CLIENT_ID, VAULT), 1);
        let unknown = "&client_id=99999999-9999-9999-9999-999999999999";
        let (status, _, v) = get(&emu, &query(api, VAULT, unknown), &extra);
        assert_eq!(status, 400, "{p}");
        match p {
            Kind::Imds => assert_eq!(
                v,
                json!({"error": "invalid_request", "error_description": "Identity not found"})
            ),
            _ => assert_eq!(
                v["message"],
                "No Managed Identity found for specified ClientId/ResourceId/PrincipalId."
            ),
        }
        // A client ID given as an object ID names no identity.
        let swapped = format!("&object_id={}", known.client_id);
        assert_eq!(get(&emu, &query(api, VAULT, &swapped), &extra).0, 400);
    }
}

/// The claims the Azure CLI reads after `az login --identity` / `az account
/// get-access-token` (`tid`, `oid`, `appid` or `xms_mirid`, `iss`), per principal.
#[test]
fn tokens_carry_the_claims_clients_read() {
    let iss = format!("https://sts.windows.net/{TEST_TENANT_ID}/");
    let common = |c: &Value, what: &str| {
        assert_eq!(c["tid"], TEST_TENANT_ID, "{what}");
        assert_eq!(c["iss"], iss.as_str(), "{what}");
        assert!(crate::names::is_guid(c["oid"].as_str().unwrap()), "{what}");
        assert_eq!(c["sub"], c["oid"], "{what}");
        assert_eq!(c["appid"], c["azp"], "{what}");
        assert!(
            crate::names::is_guid(c["appid"].as_str().unwrap()),
            "{what}"
        );
    };
    // Cloud Shell: the signed-in user.
    let (status, v) = post(&emu(), MGMT);
    assert_eq!(status, 200);
    let c = claims(&v);
    common(&c, "cloud shell");
    assert_eq!(
        (&c["idtyp"], &c["oid"], &c["appid"]),
        (
            &json!("user"),
            &json!(TEST_USER_OBJECT_ID),
            &json!("04b07795-8ddb-461a-bbee-02f9e1bf7b46")
        )
    );
    assert!(c["upn"].is_string() && c["name"].is_string());
    assert!(c.get("xms_mirid").is_none());
    // Managed identities: system-assigned, and user-assigned named by client ID only.
    for (p, provider) in [
        (Kind::Imds, "Microsoft.Compute/virtualMachines/"),
        (Kind::AppService, "Microsoft.Web/sites/"),
    ] {
        let emu = emu_with(p);
        let (api, extra) = match p {
            Kind::Imds => (IMDS_API_VERSION, META.to_string()),
            _ => (
                APP_SERVICE_API_VERSION,
                format!("X-IDENTITY-HEADER: {}\r\n", emu.identity_header()),
            ),
        };
        let (status, _, v) = get(&emu, &query(api, VAULT, ""), &extra);
        assert_eq!(status, 200, "{p}: {v}");
        let c = claims(&v);
        common(&c, "system-assigned");
        assert_eq!(c["idtyp"], "app");
        assert_eq!(c["appid"], DEFAULT_CLIENT_ID);
        assert_eq!(c["oid"], DEFAULT_OBJECT_ID);
        let mirid = c["xms_mirid"].as_str().unwrap();
        assert!(
            mirid.starts_with("/subscriptions/") && mirid.contains(provider),
            "{mirid}"
        );
        let client = "11111111-2222-3333-4444-555555555555";
        let (status, _, v) = get(
            &emu,
            &query(api, VAULT, &format!("&client_id={client}")),
            &extra,
        );
        assert_eq!(status, 200, "{p}: {v}");
        let c = claims(&v);
        common(&c, "user-assigned");
        assert_eq!(
            (c["idtyp"].as_str(), c["appid"].as_str()),
            (Some("app"), Some(client))
        );
        assert_ne!(c["oid"], c["appid"]);
        let mirid = c["xms_mirid"].as_str().unwrap();
        assert!(
            mirid.ends_with(&format!("/userAssignedIdentities/{client}")),
            "{mirid}"
        );
    }
}
