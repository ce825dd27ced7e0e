//! Issue 5: every upstream against the emulator (or a stand-in `az`) on loopback, auto
//! detection end to end, a user-assigned identity's parameters reaching the endpoint.

use crate::common;

use common::*;
use cstokenfs::emulator::{Emulator, EmulatorConfig, Fault};
use cstokenfs::Kind;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

const ARM: &str = "https://management.azure.com/";

fn emulator_of(protocol: Kind) -> Emulator {
    Emulator::start_with(
        "127.0.0.1:0".parse().unwrap(),
        EmulatorConfig::default(),
        protocol,
    )
    .expect("emulator")
}

/// A PATH with only a stand-in `az` (plus the system's tools).
fn fake_az(dir: &Path, script: &str) -> String {
    let az = dir.join("az");
    std::fs::write(&az, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&az, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!("{}:/usr/bin:/bin", dir.display())
}

#[test]
fn imds_with_a_user_assigned_identity() {
    need_fuse!();
    let emu = emulator_of(Kind::Imds);
    let m = Mounted::raw(
        &[
            "--source",
            "imds",
            "--endpoint",
            &emu.url(),
            "--client-id",
            "11111111-2222-3333-4444-555555555555",
        ],
        &[],
    );
    let token = m.read("vault.azure.net").unwrap();
    assert_eq!(claims(&token)["aud"], "https://vault.azure.net");
    let params = emu.last_params().unwrap();
    assert_eq!(
        params.get("client_id").map(String::as_str),
        Some("11111111-2222-3333-4444-555555555555")
    );
    assert_eq!(
        params.get("api-version").map(String::as_str),
        Some("2018-02-01")
    );
    assert_eq!(
        params.get("resource").map(String::as_str),
        Some("https://vault.azure.net")
    );
    let s = m.status();
    assert_eq!(s["source"], "imds");
    assert!(s["source_reason"]
        .as_str()
        .unwrap()
        .contains("--source imds"));
    // Refusal in IMDS's flat error shape: ENOENT, its words in .status.
    assert_eq!(errno(&m.read_err("newservice.azure.com")), libc::ENOENT);
    let refused = s["resources"].as_array().map(|_| m.status()).unwrap();
    let text = refused.to_string();
    assert!(text.contains("invalid_resource"), "{text}");
}

#[test]
fn imds_object_id_and_resource_id_reach_the_endpoint() {
    need_fuse!();
    let emu = emulator_of(Kind::Imds);
    for (flag, key) in [("--object-id", "object_id"), ("--msi-res-id", "msi_res_id")] {
        let value = "/subscriptions/x/resourceGroups/y/providers/Microsoft.ManagedIdentity/userAssignedIdentities/z";
        let m = Mounted::raw(
            &["--source", "imds", "--endpoint", &emu.url(), flag, value],
            &[],
        );
        m.read("management.azure.com").unwrap();
        assert_eq!(
            emu.last_params().unwrap().get(key).map(String::as_str),
            Some(value),
            "{flag}"
        );
    }
}

#[test]
fn imds_retry_rules() {
    need_fuse!();
    let emu = emulator_of(Kind::Imds);
    let m = Mounted::raw(
        &[
            "--source",
            "imds",
            "--endpoint",
            &emu.url(),
            "--timeout",
            "5",
        ],
        &[],
    );
    let flat = |code: u16| Fault::Status {
        code,
        body: format!(r#"{{"error":"injected","error_description":"injected {code}"}}"#),
        retry_after: None,
    };
    for code in [410, 429, 500, 404] {
        emu.push_fault(flat(code));
    }
    m.read("management.azure.com")
        .expect("410, 429, 500, 404 are retried");
    assert_eq!(emu.requests(), 5);
    emu.push_fault(flat(403));
    assert_eq!(
        errno(&m.read_err("vault.azure.net")),
        libc::EACCES,
        "403 is not retried (and is EACCES)"
    );
    assert_eq!(emu.requests(), 6);
}

#[test]
fn app_service_detected_from_its_environment() {
    need_fuse!();
    let emu = emulator_of(Kind::AppService);
    let header = emu.identity_header();
    let env = [
        ("IDENTITY_ENDPOINT", emu.url()),
        ("IDENTITY_HEADER", header.clone()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let m = Mounted::raw(&["--client-id", "cid"], &env);
    let token = m.read("storage.azure.com").unwrap();
    assert_eq!(claims(&token)["aud"], "https://storage.azure.com/");
    let params = emu.last_params().unwrap();
    assert_eq!(
        params.get("api-version").map(String::as_str),
        Some("2019-08-01")
    );
    assert_eq!(params.get("client_id").map(String::as_str), Some("cid"));
    let s = m.status();
    assert_eq!(s["source"], "appservice");
    assert!(s["source_reason"]
        .as_str()
        .unwrap()
        .contains("IDENTITY_HEADER"));
    assert!(
        m.log_text().contains("source appservice"),
        "the startup log says which source"
    );
    assert!(
        !m.log_text().contains(&header),
        "the App Service secret is never logged"
    );
    assert!(!s.to_string().contains(&header), "nor in .status");
}

#[test]
fn app_service_with_a_wrong_secret_is_refused_with_its_message() {
    need_fuse!();
    let emu = emulator_of(Kind::AppService);
    let url = emu.url();
    let m = Mounted::raw(
        &[],
        &[("IDENTITY_ENDPOINT", &url), ("IDENTITY_HEADER", "wrong")],
    );
    // A refused identity, not a missing name.
    assert_eq!(errno(&m.read_err("management.azure.com")), libc::EACCES);
    assert!(
        m.last_error(ARM).contains("HTTP 401"),
        "{}",
        m.last_error(ARM)
    );
}

#[test]
fn arc_challenge_detected_from_its_environment() {
    need_fuse!();
    let emu = emulator_of(Kind::Arc);
    let url = emu.url();
    // IMDS_ENDPOINT only marks the environment as Arc; it is never contacted.
    let m = Mounted::raw(
        &[],
        &[
            ("IDENTITY_ENDPOINT", &url),
            ("IMDS_ENDPOINT", "http://127.0.0.1:9/"),
        ],
    );
    let token = m
        .read("management.azure.com")
        .expect("the 401 challenge round trip");
    assert_eq!(claims(&token)["aud"], ARM);
    assert_eq!(
        emu.requests(),
        2,
        "challenge, then the request with the key"
    );
    assert_eq!(m.status()["source"], "arc");
    assert_eq!(
        emu.last_params()
            .unwrap()
            .get("api-version")
            .map(String::as_str),
        Some("2020-06-01")
    );
}

#[test]
fn azure_cli_through_a_stand_in_az() {
    need_fuse!();
    let dir = tempfile::tempdir().unwrap();
    let exp = now_secs() + 3600;
    // The stand-in prints what `az account get-access-token -o json` prints.
    let script = format!(
        r#"[ "$1 $2 $3" = "account get-access-token --resource" ] || exit 9
printf '{{"accessToken":"eyJhbGciOiJub25lIn0.eyJhdWQiOiJ%s","expiresOn":"2030-01-01 00:00:00.000000","expires_on":{exp},"tokenType":"Bearer"}}' "$(printf %s "$4" | base64 -w0 | tr -d =)""#
    );
    let path = fake_az(dir.path(), &script);
    let m = Mounted::raw(&["--timeout", "3"], &[("PATH", &path)]);
    let json: serde_json::Value =
        serde_json::from_slice(&m.read(".json/management.azure.com").unwrap()).unwrap();
    assert_eq!(json["expires_on"], exp);
    let s = m.status();
    assert_eq!(s["source"], "azure-cli");
    assert!(s["source_reason"]
        .as_str()
        .unwrap()
        .contains("az is on PATH"));
}

#[test]
fn azure_cli_not_logged_in_and_slow() {
    need_fuse!();
    let dir = tempfile::tempdir().unwrap();
    let path = fake_az(
        dir.path(),
        "echo \"ERROR: Please run 'az login' to setup account.\" >&2; exit 1",
    );
    let m = Mounted::raw(&["--source", "azure-cli"], &[("PATH", &path)]);
    assert_eq!(errno(&m.read_err("management.azure.com")), libc::EIO);
    assert!(
        m.last_error(ARM).contains("az login"),
        "az's stderr is the error: {}",
        m.last_error(ARM)
    );

    let slow = tempfile::tempdir().unwrap();
    let path = fake_az(slow.path(), "sleep 30");
    let m = Mounted::raw(
        &["--source", "azure-cli", "--timeout", "1"],
        &[("PATH", &path)],
    );
    let t0 = Instant::now();
    assert_eq!(errno(&m.read_err("management.azure.com")), libc::EIO);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "a slow az is cut off at --timeout: {:?}",
        t0.elapsed()
    );
}

#[test]
fn cloud_shell_detected_from_msi_endpoint() {
    need_fuse!();
    let emu = emulator();
    let url = emu.url();
    let dir = tempfile::tempdir().unwrap();
    // az on PATH too: Cloud Shell's MSI_ENDPOINT wins.
    let path = fake_az(dir.path(), "exit 1");
    let m = Mounted::raw(&[], &[("MSI_ENDPOINT", &url), ("PATH", &path)]);
    m.read("management.azure.com").unwrap();
    let s = m.status();
    assert_eq!(s["source"], "cloudshell");
    assert!(s["source_reason"]
        .as_str()
        .unwrap()
        .contains("MSI_ENDPOINT"));
}

#[test]
fn each_protocol_served_by_the_built_in_emulator() {
    need_fuse!();
    for source in ["cloudshell", "imds", "appservice", "arc"] {
        let m = Mounted::raw(&["--emulator", "--source", source], &[]);
        let token = m
            .read("management.azure.com")
            .unwrap_or_else(|e| panic!("{source}: {e}: {}", m.log_text()));
        assert_eq!(claims(&token)["aud"], ARM, "{source}");
        assert_eq!(m.status()["source"], source);
    }
}

#[test]
fn get_uses_the_same_sources() {
    let emu = emulator_of(Kind::Imds);
    let out = cli([
        "get",
        "--source",
        "imds",
        "--endpoint",
        &emu.url(),
        "--object-id",
        "oid",
        "vault.azure.net",
    ])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        claims(out.stdout.trim_ascii_end())["aud"],
        "https://vault.azure.net"
    );
    assert_eq!(
        emu.last_params()
            .unwrap()
            .get("object_id")
            .map(String::as_str),
        Some("oid")
    );
    let out = cli(["get", "--source", "vm", "x.example.com"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
