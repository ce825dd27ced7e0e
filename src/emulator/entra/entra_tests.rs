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

/// A service-account token shaped as the kubelet's (unsigned: the emulator reads the
/// claims unverified).
fn sa_token(iss: &str, sub: &str, aud: serde_json::Value, exp: u64) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let part = |v: serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let header = part(serde_json::json!({"alg": "RS256", "kid": "k"}));
    let claims = part(serde_json::json!({"iss": iss, "sub": sub, "aud": aud, "exp": exp}));
    format!("{header}.{claims}.c2lnbmF0dXJl")
}

fn assertion_form(client_id: &str, assertion: &str) -> String {
    format!("grant_type=client_credentials&client_id={client_id}&scope=https%3A%2F%2Fvault.azure.net%2F.default&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={assertion}")
}

const ISSUER: &str = "https://oidc.example/cluster";
const SUBJECT: &str = "system:serviceaccount:ns:sa";

fn record(client_id: &str) -> Federated {
    Federated {
        client_id: client_id.into(),
        issuer: ISSUER.into(),
        subject: SUBJECT.into(),
        audience: FEDERATED_AUDIENCE.into(),
    }
}

#[test]
fn a_federated_record_accepts_only_its_issuer_subject_and_audience() {
    let emu = start(EntraSettings {
        federated: vec![record("c1"), record("c2")],
        ..EntraSettings::default()
    });
    let later = crate::emulator::now_secs() + 3600;
    let aud = || serde_json::json!(FEDERATED_AUDIENCE);
    let code = |client_id: &str, assertion: &str| {
        let (status, body) = post(
            &emu,
            "t/oauth2/v2.0/token",
            &assertion_form(client_id, assertion),
        );
        let error = body["error"].as_str().unwrap_or_default().to_string();
        (status, error, body["error_codes"][0].as_u64().unwrap_or(0))
    };
    let good = sa_token(ISSUER, SUBJECT, aud(), later);
    assert_eq!(code("c1", &good), (200, String::new(), 0));
    let in_array = sa_token(
        ISSUER,
        SUBJECT,
        serde_json::json!(["x", FEDERATED_AUDIENCE]),
        later,
    );
    assert_eq!(code("c2", &in_array).0, 200);
    let no_record = (400, "invalid_client".to_string(), 70021);
    for bad in [
        sa_token(ISSUER, "system:serviceaccount:ns:other", aud(), later),
        sa_token("https://oidc.example/other", SUBJECT, aud(), later),
        sa_token(ISSUER, SUBJECT, serde_json::json!("api://other"), later),
        sa_token(ISSUER, SUBJECT, serde_json::json!(["api://other"]), later),
        "not.a.jwt".to_string(),
    ] {
        assert_eq!(code("c1", &bad), no_record);
    }
    // An application without records: none matches.
    assert_eq!(code("c3", &good), no_record);
    let expired = sa_token(ISSUER, SUBJECT, aud(), later - 7200);
    assert_eq!(
        code("c1", &expired),
        (400, "invalid_client".to_string(), 700024)
    );
    // Every assertion presented, per client ID, in order, as digests; counted per client.
    let digest = crate::emulator::sha256_hex;
    let c1 = emu.assertions_for("c1");
    assert_eq!(c1.len(), 7);
    assert_eq!(c1[0], digest(&good));
    assert_eq!(c1[6], digest(&expired));
    assert!(c1.iter().all(|d| d.len() == 64 && !d.contains("eyJ")));
    assert_eq!(emu.assertions_for("c2"), vec![digest(&in_array)]);
    assert_eq!(emu.requests_by("c1", "https://vault.azure.net"), 7);
    assert_eq!(emu.requests_by("C2", "https://vault.azure.net"), 1);
    assert_eq!(emu.requests_by("c1", "https://other.example"), 0);
    emu.reset_counters();
    assert!(emu.assertions_for("c1").is_empty());
    assert_eq!(emu.requests_by("c1", "https://vault.azure.net"), 0);
}

#[test]
fn the_entra_source_sends_the_newest_supplied_service_account_token() {
    use crate::source::entra::{Credential, Entra, Settings, Supplied};
    use crate::source::Source;
    use std::sync::Arc;
    let client_id = "00000000-0000-0000-0000-0000000000c1";
    let emu = start(EntraSettings {
        federated: vec![record(client_id)],
        ..EntraSettings::default()
    });
    let supplied = Arc::new(Supplied::new());
    let settings = Settings {
        tenant: "72f988bf-86f1-41af-91ab-2d7cd011db47".into(),
        client_id: client_id.into(),
        credential: Credential::Supplied(supplied.clone()),
        ca: Vec::new(),
    };
    let source = Entra::new(crate::source::Kind::WorkloadIdentity, &emu.url(), &settings).unwrap();
    let timeout = Duration::from_secs(5);
    let vault = "https://vault.azure.net";
    assert!(source.fetch_once(vault, timeout).is_err(), "none held");
    assert_eq!(emu.requests(), 0, "and no request sent");
    let now = crate::emulator::now_secs();
    let aud = serde_json::json!([FEDERATED_AUDIENCE]);
    let first = sa_token(ISSUER, SUBJECT, aud.clone(), now + 600);
    supplied.set(Some((first.clone().into(), (now as i64 + 600) * 1000)));
    assert!(source.fetch_once(vault, timeout).is_ok());
    let second = sa_token(ISSUER, SUBJECT, aud, now + 1200);
    supplied.set(Some((second.clone().into(), (now as i64 + 1200) * 1000)));
    assert!(source.fetch_once(vault, timeout).is_ok());
    let digest = crate::emulator::sha256_hex;
    assert_eq!(
        emu.assertions_for(client_id),
        vec![digest(&first), digest(&second)]
    );
    assert_eq!(emu.requests_by(client_id, vault), 2);
}

#[test]
fn the_federated_flag_names_a_client_issuer_and_subject() {
    assert_eq!(
        command::federated("c1=https://oidc.example/a,b,system:serviceaccount:ns:sa"),
        Ok(Federated {
            client_id: "c1".into(),
            issuer: "https://oidc.example/a,b".into(),
            subject: SUBJECT.into(),
            audience: "api://AzureADTokenExchange".into(),
        })
    );
    for bad in ["c1", "c1=iss", "=iss,sub", "c1=,sub", "c1=iss,"] {
        assert!(command::federated(bad).is_err(), "{bad}");
    }
}

#[test]
fn tokens_name_the_tenant_and_the_application() {
    let emu = start(EntraSettings::default());
    let tenant = "72F988BF-86F1-41AF-91AB-2D7CD011DB47";
    let tid = |path: &str| {
        let (status, body) = post(&emu, path, OK);
        assert_eq!(status, 200, "{body}");
        crate::emulator::decode_claims(body["access_token"].as_str().unwrap()).unwrap()
    };
    let c = tid(&format!("{tenant}/oauth2/v2.0/token"));
    let lower = tenant.to_ascii_lowercase();
    assert_eq!(c["tid"], lower.as_str());
    assert_eq!(c["iss"], format!("https://sts.windows.net/{lower}/"));
    assert_eq!(
        (c["idtyp"].as_str(), c["appid"].as_str()),
        (Some("app"), Some("c"))
    );
    assert!(c["oid"].is_string() && c.get("xms_mirid").is_none());
    // A tenant named by its domain: the test tenant's ID, as no GUID is known.
    let c = tid("contoso.onmicrosoft.com/oauth2/v2.0/token");
    assert_eq!(c["tid"], crate::emulator::TEST_TENANT_ID);
}
