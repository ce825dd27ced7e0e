//! Issue 19: an upstream that echoes every credential the daemon holds (the client secret,
//! the federated assertion, a certificate's assertion, a token held, the endpoint's secret)
//! in its error answers, in the 15 shapes an adversarial run leaked: none of them reaches
//! the log (at trace level), `.status`, the endpoint's replies or `get`'s stderr, in any of
//! its forms (as is, percent-encoded, JSON-escaped, base64).

use crate::common;
use crate::entra_support;

use common::*;
use cstokenfs::emulator::entra::EntraSettings;
use cstokenfs::emulator::{echo_body, Emulator, Fault};
use entra_support::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

/// (status, body) with `{F}` where the credential goes, `{F:json}` it JSON-escaped,
/// `{F:pct}` percent-encoded, `{F:b64}` in base64, `{form}` the whole form as sent and
/// `{form:json}` the form's fields as JSON.
const SHAPES: [(u16, &str); 15] = [
    (400, r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided: {F:json}","error_codes":[7000215]}"#),
    (400, r#"{"error":"invalid_client","error_description":"AADSTS7000215: the value '{F:json}' is wrong","error_codes":[7000215]}"#),
    (400, r#"{"error":"invalid_client","error_description":"AADSTS7000215: wrong value ({F:json}).","error_codes":[7000215]}"#),
    (400, r#"{"error":"invalid_client","error_description":"AADSTS7000215: value : {F:json}","error_codes":[7000215]}"#),
    (400, r#"{"error":"invalid_request","error_description":"AADSTS90014: could not read {form}","error_codes":[90014]}"#),
    (400, r#"{"error":"invalid_request","error_description":"AADSTS90014: raw form F={F:json}&scope=x","error_codes":[90014]}"#),
    (400, r#"{form:json}"#),
    (400, r#"{"error":"invalid_client","error_description":"AADSTS7000215: encoded {F:b64}","error_codes":[7000215]}"#),
    (400, r#"{"error":"invalid_client","error_description":"AADSTS7000215: value:\t{F:json}","error_codes":[7000215]}"#),
    (400, r#"{"error":"invalid_client","error_description":"AADSTS7000215: Password={F:json}","error_codes":[7000215]}"#),
    (400, "{\"error\":\"invalid_client\",\"error_description\":\"AADSTS7000215: client_secret\u{a0}=\u{a0}{F:json}\",\"error_codes\":[7000215]}"),
    (400, "{\"error\":\"invalid_client\",\"error_description\":\"AADSTS7000215: client_secret\u{ff1a}{F:json}\",\"error_codes\":[7000215]}"),
    (400, "invalid client: {F} was not accepted"),
    (400, r#"{"error":"{F:json}","error_description":"AADSTS7000215: bad","error_codes":[7000215]}"#),
    (500, r#"{"error":"server_error","error_description":"AADSTS50000: failed for {F:json}","error_codes":[50000]}"#),
];

/// The forms a credential could be found in.
fn forms(value: &str) -> Vec<String> {
    use base64::Engine as _;
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    vec![
        value.to_string(),
        utf8_percent_encode(value, NON_ALPHANUMERIC).to_string(),
        serde_json::to_string(value)
            .unwrap()
            .trim_matches('"')
            .to_string(),
        base64::engine::general_purpose::STANDARD.encode(value),
    ]
}

fn assert_none_of(surface: &str, values: &[String], what: &str) {
    for v in values {
        for (i, form) in forms(v).iter().enumerate() {
            assert_absent(surface, form, &format!("{what} (form #{i})"));
        }
    }
}

fn head(addr: SocketAddr, secret: &str) -> String {
    format!("Host: {addr}\r\nX-IDENTITY-HEADER: {secret}\r\n")
}

/// Asks for a resource nobody issues through the endpoint and as a file with each shape
/// queued (the 500 one sticky, so every retry meets it); returns the endpoint's replies and
/// the field's value as last sent with each shape. `field`: the form field echoed;
/// `planted`: a value the test plants itself instead.
fn drive_shapes(
    m: &Mounted,
    emu: &Emulator,
    field: &str,
    planted: Option<&str>,
    tag: &str,
) -> (String, Vec<String>) {
    let (addr, secret) = m.endpoint();
    let mut replies = String::new();
    let mut sent = Vec::new();
    for (i, (code, template)) in SHAPES.iter().enumerate() {
        let template = template.replace("{F", &format!("{{{field}"));
        let fault = match planted {
            None => Fault::Echo {
                code: *code,
                body: template,
            },
            Some(value) => {
                use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
                let form = BTreeMap::from([(field.to_string(), value.to_string())]);
                let sent = format!("{field}={}", utf8_percent_encode(value, NON_ALPHANUMERIC));
                Fault::Status {
                    code: *code,
                    body: echo_body(&template, sent.as_bytes(), &form),
                    retry_after: None,
                }
            }
        };
        let sticky = *code >= 500;
        if sticky {
            emu.set_fault(Some(fault));
        } else {
            emu.push_fault(fault);
        }
        let resource = format!("https%3A%2F%2F{tag}{i}.example.com");
        let target = format!("/msi/token?api-version=2019-08-01&resource={resource}");
        let before = emu.requests();
        let (status, body) = cstokenfs::testing::http_get(addr, &target, &head(addr, &secret));
        assert!(status >= 400, "shape #{i}: the endpoint answered {status}");
        // (On a loaded machine the endpoint may answer at --timeout before the fetch
        // reached the upstream: it still gets there.)
        let reached = eventually(Duration::from_secs(10), || {
            (emu.requests() > before).then_some(())
        });
        assert!(reached.is_some(), "shape #{i} reached the upstream");
        replies.push_str(&body.0.to_string());
        replies.push('\n');
        if sticky {
            // The same failure through a file, then no more faults.
            let _ = m.read_err(&format!("{tag}{i}b.example.com"));
            emu.set_fault(None);
        }
        sent.extend(emu.last_params().and_then(|p| p.get(field).cloned()));
    }
    (replies, sent)
}

/// A mount of the Entra source `source` (with its credential flag) against `emu`, serving
/// the endpoint too, logging at trace level.
fn mount(emu: &Emulator, source: &str, credential: (&str, &std::path::Path)) -> Mounted {
    let extra = ["--serve-endpoint", "127.0.0.1:0", "--timeout", "2"];
    entra_mount(
        source,
        credential,
        &emu.url(),
        &extra,
        &[("RUST_LOG", "trace")],
    )
}

#[test]
fn a_client_secret_echoed_in_every_shape_never_leaves() {
    need_fuse!();
    let dir = tempfile::tempdir().unwrap();
    let secret = "Zx8Q~correct/horse+battery=staple.1234";
    let emu = entra_emulator(
        EntraSettings {
            client_secret: Some(secret.into()),
            ..settings()
        },
        None,
    );
    let file = write(dir.path(), "secret", secret);
    let m = mount(&emu, "service-principal", ("--client-secret-file", &file));
    let (mut replies, _) = drive_shapes(&m, &emu, "client_secret", None, "s");
    // A token held and the endpoint's secret, planted by the test in the same shapes.
    let token = String::from_utf8(m.read("management.azure.com").expect("a token")).unwrap();
    let (_, endpoint_secret) = m.endpoint();
    for (value, tag) in [(&token, "t"), (&endpoint_secret, "e")] {
        replies += &drive_shapes(&m, &emu, "v", Some(value), tag).0;
    }
    let all = format!("{}\n{replies}", m.leak_surface());
    assert!(all.contains("<redacted>"), "the shapes reached the surface");
    assert_none_of(&all, &[secret.to_string()], "the client secret");
    assert_none_of(&all, &[token], "a token held");
    assert_none_of(&all, &[endpoint_secret], "the endpoint's secret");

    // `get` (the same source, one fetch) says why on stderr, without the secret.
    for (code, template) in [SHAPES[0], SHAPES[7], SHAPES[12]] {
        emu.push_fault(Fault::Echo {
            code,
            body: template.replace("{F", "{client_secret"),
        });
        let out = get(&emu.url(), &file, &[]);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("<redacted>"), "get says why");
        assert_none_of(&stderr, &[secret.to_string()], "get's stderr");
    }
}

#[test]
fn a_federated_assertion_echoed_in_every_shape_never_leaves() {
    need_fuse!();
    let dir = tempfile::tempdir().unwrap();
    let assertion = federated_token(now_secs() + 3600, "echo");
    let file = write(dir.path(), "token", &assertion);
    let emu = entra_emulator(
        EntraSettings {
            federated_token_file: Some(file.clone()),
            ..settings()
        },
        None,
    );
    let m = mount(&emu, "workload-identity", ("--federated-token-file", &file));
    let (replies, sent) = drive_shapes(&m, &emu, "client_assertion", None, "f");
    assert!(
        sent.iter().all(|s| *s == assertion),
        "the file's token was sent"
    );
    let all = format!("{}\n{replies}", m.leak_surface());
    assert_none_of(&all, &[assertion], "the federated assertion");
}

#[test]
fn a_certificate_assertion_echoed_in_every_shape_never_leaves() {
    need_fuse!();
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, key_pem, cert_der) = client_certificate();
    let file = write(dir.path(), "principal.pem", &format!("{cert_pem}{key_pem}"));
    let emu = entra_emulator(
        EntraSettings {
            client_certificate: Some(cert_der),
            ..settings()
        },
        None,
    );
    let m = mount(&emu, "service-principal", ("--client-certificate", &file));
    // Each fetch signs a new assertion: the emulator shows the one it was sent.
    let (replies, sent) = drive_shapes(&m, &emu, "client_assertion", None, "c");
    assert_eq!(sent.len(), SHAPES.len(), "an assertion per shape");
    let all = format!("{}\n{replies}", m.leak_surface());
    assert!(all.contains("<redacted>"), "the shapes reached the surface");
    assert_none_of(&all, &sent, "a certificate assertion");
}
