//! The Entra protocol's checks and answer shapes, over loopback http.

use super::*;
use crate::emulator::{Emulator, EmulatorConfig, Kind};

fn start(settings: EntraSettings) -> Emulator {
    crate::source::client_tls::ensure_provider();
    let emu = Emulator::start_with(
        "127.0.0.1:0".parse().unwrap(),
        EmulatorConfig::default(),
        Kind::WorkloadIdentity,
    )
    .unwrap();
    emu.set_entra(settings);
    emu
}

fn post(emu: &Emulator, path: &str, form: &str) -> (u16, serde_json::Value) {
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap();
    let r = client
        .post(format!("{}{path}", emu.url()))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form.to_string())
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (
        status,
        serde_json::from_str(&r.text().unwrap()).unwrap_or_default(),
    )
}

const OK: &str = "grant_type=client_credentials&client_id=c&scope=https%3A%2F%2Fvault.azure.net%2F.default&client_secret=s";

#[test]
fn answers_as_entra_does() {
    let emu = start(EntraSettings {
        tenant: Some("t".into()),
        client_id: Some("c".into()),
        client_secret: Some("s".into()),
        ..EntraSettings::default()
    });
    assert!(emu.url().starts_with("http://127.0.0.1:") && emu.url().ends_with('/'));
    let (status, body) = post(&emu, "t/oauth2/v2.0/token", OK);
    assert_eq!(status, 200, "{body}");
    assert!(body["expires_in"].is_u64() && body["ext_expires_in"].is_u64());
    assert!(body.get("expires_on").is_none());
    assert_eq!(body["token_type"], "Bearer");
    let claims = crate::emulator::decode_claims(body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(claims["aud"], "https://vault.azure.net");
    let code = |path: &str, form: &str| {
        let (status, body) = post(&emu, path, form);
        (
            status,
            body["error"].as_str().unwrap_or_default().to_string(),
            body["error_codes"][0].as_u64().unwrap_or(0),
        )
    };
    let cases = [
        (
            "x/oauth2/v2.0/token",
            OK.to_string(),
            400,
            "invalid_request",
            90002,
        ),
        (
            "t/oauth2/token",
            OK.to_string(),
            404,
            "invalid_request",
            90002,
        ),
        (
            "t/oauth2/v2.0/token",
            OK.replace("client_credentials", "password"),
            400,
            "unsupported_grant_type",
            70003,
        ),
        (
            "t/oauth2/v2.0/token",
            OK.replace("client_id=c", "client_id=d"),
            400,
            "unauthorized_client",
            700016,
        ),
        (
            "t/oauth2/v2.0/token",
            OK.replace("client_secret=s", "client_secret=x"),
            401,
            "invalid_client",
            7000215,
        ),
        (
            "t/oauth2/v2.0/token",
            OK.replace("&client_secret=s", ""),
            401,
            "invalid_client",
            7000216,
        ),
        (
            "t/oauth2/v2.0/token",
            OK.replace("%2F.default", ""),
            400,
            "invalid_scope",
            70011,
        ),
        (
            "t/oauth2/v2.0/token",
            OK.replace("vault.azure.net", "nothing.example"),
            400,
            "invalid_resource",
            500011,
        ),
        (
            "t/oauth2/v2.0/token",
            OK.replace("client_id=c&", ""),
            400,
            "invalid_request",
            900144,
        ),
    ];
    for (path, form, status, error, aadsts) in cases {
        assert_eq!(
            code(path, &form),
            (status, error.to_string(), aadsts),
            "{path} {form}"
        );
    }
    let (_, body) = post(&emu, "x/oauth2/v2.0/token", OK);
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .starts_with("AADSTS90002: "));
}

#[test]
fn a_federated_assertion_must_match_the_file_now() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "first.token.value\n").unwrap();
    let emu = start(EntraSettings {
        federated_token_file: Some(file.clone()),
        ..EntraSettings::default()
    });
    let form = |assertion: &str| {
        format!("grant_type=client_credentials&client_id=c&scope=https%3A%2F%2Fvault.azure.net%2F.default&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={assertion}")
    };
    assert_eq!(
        post(&emu, "t/oauth2/v2.0/token", &form("first.token.value")).0,
        200
    );
    std::fs::write(&file, "second.token.value").unwrap();
    let (status, body) = post(&emu, "t/oauth2/v2.0/token", &form("first.token.value"));
    assert_eq!(
        (status, body["error_codes"][0].as_u64()),
        (400, Some(70021))
    );
    assert_eq!(
        post(&emu, "t/oauth2/v2.0/token", &form("second.token.value")).0,
        200
    );
    assert_eq!(emu.requests(), 3);
    assert_eq!(emu.requests_for("https://vault.azure.net"), 3);
}
