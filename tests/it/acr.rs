//! Issue 25, Azure Container Registry: `MOUNT/.acr/REGISTRY` and its `.json` against the
//! emulator's registry side (a second emulator, reached through `--acr-endpoint`), the
//! Entra audience and its fallback, refresh ahead, refusals, the suffix allowlist, and the
//! credential helper, driven by hand and by docker's own credential-store client
//! (`docker.credentials`, from PyPI in the venv scripts/test.sh makes and names in
//! CSTOKENFS_DOCKER_VENV).

use crate::common;

use common::*;
use cstokenfs::emulator::{sha256_hex, Emulator, EmulatorConfig, Fault, KnownIdentity};
use cstokenfs::Kind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const REG: &str = "myregistry.azurecr.io";
const ARM: &str = "https://management.azure.com/";
const REGISTRY_AUDIENCE: &str = "https://containerregistry.azure.net/";
const USERNAME: &str = "00000000-0000-0000-0000-000000000000";

/// A token emulator (Cloud Shell) and a registry emulator, and a mount of the first whose
/// `REG` (and `extra_registries`) are reached at the second.
fn setup(extra: &[&str], registries: &[&str]) -> (Emulator, Emulator, Mounted) {
    let entra = emulator();
    let reg = emulator();
    let mut owned: Vec<String> = Vec::new();
    for r in std::iter::once(&REG).chain(registries) {
        owned.push("--acr-endpoint".into());
        owned.push(format!("{r}=http://{}", reg.addr()));
    }
    let mut args: Vec<&str> = owned.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    let m = Mounted::new(&entra.url(), &args);
    (entra, reg, m)
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

#[test]
fn one_exchange_per_lifetime_for_any_number_of_readers_and_the_arm_fallback() {
    need_fuse!();
    let (entra, reg, m) = setup(&["--metrics", "127.0.0.1:0"], &["other.azurecr.io"]);
    let file = format!(".acr/{REG}");
    let readers: Vec<_> = (0..16)
        .map(|i| {
            let path = match i % 2 {
                0 => m.file(&file),
                _ => m.file(&format!("{file}.json")),
            };
            std::thread::spawn(move || std::fs::read(path).expect("every reader gets it"))
        })
        .collect();
    let got: Vec<Vec<u8>> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let raw = m.read(&file).unwrap();
    for (i, g) in got.iter().enumerate() {
        if i % 2 == 0 {
            assert_same_token(g, &raw, "every reader of .acr/REGISTRY");
        } else {
            let doc: serde_json::Value = serde_json::from_slice(g).unwrap();
            assert_eq!(doc["username"], USERNAME);
            assert!(doc["refresh_token"].as_str() == std::str::from_utf8(&raw).ok());
        }
    }
    assert_eq!(reg.acr_exchanges(), 1, "one exchange for every reader");
    // The refresh token is the registry's, for that registry, its expiry its own `exp`.
    let c = claims(&raw);
    assert_eq!(c["aud"], REG, "service=REGISTRY");
    let doc: serde_json::Value =
        serde_json::from_slice(&m.read(&format!("{file}.json")).unwrap()).unwrap();
    assert_eq!(doc["expires_on"], c["exp"]);
    assert!(c["exp"].as_i64().unwrap() > now_secs() + 3 * 3600 - 60);
    // Cloud Shell refuses the registry audience: the ARM token was exchanged instead, and
    // the mount shares it (one upstream request for it, whoever reads it).
    assert_eq!(reg.acr_exchanged_audiences(), [ARM]);
    assert_eq!(entra.requests_for(REGISTRY_AUDIENCE), 1);
    assert_eq!(entra.requests_for(ARM), 1);
    let arm = m.read("management.azure.com").unwrap();
    assert_no_token(
        &m.leak_surface(),
        &arm,
        "the Entra token exchanged: log and .status",
    );
    // Another registry: the refused audience is not asked again, the ARM token reused.
    m.read(".acr/other.azurecr.io").unwrap();
    assert_eq!(reg.acr_exchanges(), 2);
    assert_eq!(entra.requests_for(REGISTRY_AUDIENCE), 1);
    assert_eq!(entra.requests_for(ARM), 1);
    // Listed under .acr only, never at the top.
    assert_eq!(
        names_in(&m.file(".acr")),
        [
            "myregistry.azurecr.io",
            "myregistry.azurecr.io.json",
            "other.azurecr.io",
            "other.azurecr.io.json"
        ]
    );
    let top = names_in(&m.path);
    assert!(top.contains(&".acr".to_string()), "{top:?}");
    assert!(
        !top.iter()
            .any(|n| n.contains("acr%3A") || n.contains("azurecr")),
        "{top:?}"
    );
    let entry = resource_entry(&m.status(), &format!("acr:{REG}"));
    assert_eq!(entry["name"], format!(".acr/{REG}"), "{entry}");
    assert_eq!(entry["expires_on"], c["exp"], "{entry}");
    assert_no_token(&m.leak_surface(), &raw, "log and .status");
    // --metrics: the exchanges by identity and result, the refresh token's expiry under
    // the registry's key; never the refresh token or the Entra token exchanged.
    let scraped = http(metrics_addr(&m), "/metrics", None).body;
    assert_no_token(&scraped, &raw, "a scrape");
    assert_no_token(
        &scraped,
        &m.read("management.azure.com").unwrap(),
        "a scrape",
    );
    if let Some(venv) = parser_venv() {
        let s = Samples::parse(&venv, &scraped, false);
        let ok = [("identity", ""), ("result", "ok"), ("status", "200")];
        assert_eq!(s.get("cstokenfs_registry_exchanges_total", &ok), Some(2.0));
        let key = format!("acr:{REG}");
        let expiry = s.get(
            "cstokenfs_token_expiry_timestamp_seconds",
            &[("identity", ""), ("resource", key.as_str())],
        );
        assert_eq!(expiry, c["exp"].as_f64());
        assert_documented(&s);
    }
}

#[test]
fn the_registry_audience_where_the_upstream_issues_it_and_management_on_request() {
    need_fuse!();
    let entra = emulator_with(EmulatorConfig {
        allow_any: true,
        ..EmulatorConfig::default()
    });
    let reg = emulator();
    let endpoint = format!("{REG}=http://{}", reg.addr());
    let m = Mounted::new(&entra.url(), &["--acr-endpoint", &endpoint]);
    m.read(&format!(".acr/{REG}")).unwrap();
    assert_eq!(reg.acr_exchanged_audiences(), [REGISTRY_AUDIENCE]);
    assert_eq!(entra.requests_for(ARM), 0);
    drop(m);

    let m = Mounted::new(
        &entra.url(),
        &["--acr-endpoint", &endpoint, "--acr-audience", "management"],
    );
    entra.reset_counters();
    m.read(&format!(".acr/{REG}")).unwrap();
    assert_eq!(reg.acr_exchanged_audiences(), [REGISTRY_AUDIENCE, ARM]);
    assert_eq!(entra.requests_for(REGISTRY_AUDIENCE), 0);
}

#[test]
fn refreshed_ahead_readers_never_wait_nor_get_an_expired_one() {
    need_fuse!();
    let (_entra, reg, m) = setup(&["--refresh-margin", "6"], &[]);
    reg.set_acr_ttl(12);
    let file = format!(".acr/{REG}");
    let first = m.read(&file).unwrap();
    // Every exchange takes 3 s from now on: a reader that waited on one would take that long.
    reg.set_latency(Duration::from_millis(3000));
    let end = Instant::now() + Duration::from_secs(30);
    let (mut serials, mut worst) = (
        vec![claims(&first)["serial"].as_u64().unwrap()],
        Duration::ZERO,
    );
    while Instant::now() < end && serials.len() < 3 {
        let t0 = Instant::now();
        let token = m
            .read(&file)
            .expect("a reader of credentials in use always gets them");
        worst = worst.max(t0.elapsed());
        let c = claims(&token);
        assert!(
            c["exp"].as_i64().unwrap() > now_secs(),
            "expired credentials were served"
        );
        let s = c["serial"].as_u64().unwrap();
        if serials.last() != Some(&s) {
            serials.push(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(serials.len() >= 3, "two refreshes ahead: {serials:?}");
    assert!(
        worst < Duration::from_millis(2000),
        "a reader waited: {worst:?}"
    );
    assert!(reg.acr_exchanges() >= 3);
}

#[test]
fn a_refused_exchange_is_eacces_negative_cached_and_shows_no_token() {
    need_fuse!();
    let (entra, reg, m) = setup(&[], &[]);
    // A registry that echoes what it was sent in its refusal.
    reg.set_fault(Some(Fault::Echo {
        code: 401,
        body: r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad token {access_token} for {service}"}]}"#.into(),
    }));
    let file = format!(".acr/{REG}");
    for _ in 0..3 {
        let e = m.read_err(&file);
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        let e = m.read_err(&format!("{file}.json"));
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
    }
    assert_eq!(reg.acr_exchanges(), 1, "refused once, then negative-cached");
    let log = m
        .wait_log(
            "the registry refused the exchange: UNAUTHORIZED",
            Duration::from_secs(5),
        )
        .expect("the registry's words in the log");
    assert!(log.contains(&format!("for {REG}")), "{log}");
    // The Entra token exchanged (the ARM one, held) appears nowhere.
    let arm = m.read("management.azure.com").unwrap();
    assert_eq!(
        entra.requests_for(ARM),
        1,
        "the exchanged token is the one held"
    );
    assert_no_token(&m.leak_surface(), &arm, "log and .status");
    let text = m.status().to_string();
    assert!(text.contains("UNAUTHORIZED"), "{text}");
}

#[test]
fn a_failing_registry_is_retried_and_nonsense_is_eio() {
    need_fuse!();
    let (_entra, reg, m) = setup(&["--no-open"], &["garbage.azurecr.io"]);
    // Transient: retried within the same read.
    reg.push_fault(Fault::Status {
        code: 503,
        body: "{}".into(),
        retry_after: None,
    });
    reg.push_fault(Fault::Reset);
    let raw = m
        .read(&format!(".acr/{REG}"))
        .expect("served after the retries");
    assert_eq!(reg.acr_exchanges(), 3);
    assert_eq!(claims(&raw)["aud"], REG);
    // Nonsense is not retried: EIO, and the next read asks again (no negative cache).
    reg.push_fault(Fault::Garbage);
    reg.push_fault(Fault::EmptyAccessToken);
    for _ in 0..2 {
        let e = m.read_err(".acr/garbage.azurecr.io");
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    }
    assert_eq!(reg.acr_exchanges(), 5);
    let log = m
        .wait_log("no refresh_token", Duration::from_secs(5))
        .expect("the reason in the log");
    assert_no_token(&log, &raw, "the log");
}

#[test]
fn a_name_that_is_no_azure_registry_is_enoent_with_no_request() {
    need_fuse!();
    let (entra, reg, m) = setup(
        &["--acr-suffix", "registry.example"],
        &["reg.registry.example"],
    );
    for name in [
        "attacker.example",
        "127.0.0.1",
        "localhost",
        "azurecr.io",
        "myregistry.azurecr.io.attacker.example",
        "MyRegistry.azurecr.io",
        "myregistry.azurecr.io.",
        "attacker.example.json",
        "management.azure.com",
    ] {
        let e = m.read_err(&format!(".acr/{name}"));
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{name}: {e}");
    }
    assert_eq!(entra.requests(), 0, "no token was asked for");
    assert_eq!(reg.acr_exchanges(), 0, "nothing was sent to a registry");
    // `--acr-suffix` adds one.
    m.read(".acr/reg.registry.example").unwrap();
    assert_eq!(reg.acr_exchanges(), 1);
    // An `--acr-endpoint` must be loopback, and for a registry name.
    for bad in [
        format!("{REG}=http://192.0.2.1:80"),
        "attacker.example=http://127.0.0.1:1".to_string(),
    ] {
        let out = run_bounded(&["mount", "--acr-endpoint", &bad, "/nonexistent"]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
        assert!(stderr(&out).contains("--acr-endpoint"), "{}", stderr(&out));
    }
}

#[test]
fn a_declared_identity_exchanges_its_own_token() {
    need_fuse!();
    let config = EmulatorConfig::default();
    let emu = Emulator::start_with("127.0.0.1:0".parse().unwrap(), config, Kind::Imds).unwrap();
    emu.set_identities(vec![KnownIdentity::numbered(1)]);
    emu.set_allow_any(true);
    let id = KnownIdentity::numbered(1);
    let identity = format!("app=client-id={}", id.client_id);
    // One emulator serves both the tokens and the registry.
    let endpoint = format!("{REG}=http://{}", emu.addr());
    let m = Mounted::raw(
        &[
            "--source",
            "imds",
            "--endpoint",
            &emu.url(),
            "--identity",
            &identity,
            "--acr-endpoint",
            &endpoint,
        ],
        &[],
    );
    let own = m.read(&format!(".acr/{REG}")).unwrap();
    let app = m.read(&format!("id/app/.acr/{REG}")).unwrap();
    assert_eq!(claims(&app)["sub"], id.object_id.as_str());
    assert_ne!(claims(&own)["sub"], id.object_id.as_str());
    assert_eq!(emu.acr_exchanges(), 2);
    // An upstream that issues the registry audience: no fallback.
    assert_eq!(
        emu.acr_exchanged_audiences(),
        [REGISTRY_AUDIENCE, REGISTRY_AUDIENCE]
    );
    assert_eq!(
        names_in(&m.file("id/app/.acr")),
        [REG.to_string(), format!("{REG}.json")]
    );
}

/// `cstokenfs credential-helper ACTION` (or `bin` as given) with `input` on stdin.
fn helper(
    program: &Path,
    args: &[&str],
    input: &str,
    env: &[(&str, &str)],
) -> (Option<i32>, String) {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_remove("CSTOKENFS_MOUNT")
        .env_remove("CSTOKENFS_IDENTITY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = fed(cmd, input);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A directory with `docker-credential-cstokenfs`, a symlink to the built binary.
fn helper_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("docker-credential-cstokenfs");
    std::os::unix::fs::symlink(BIN, &link).unwrap();
    (dir, link)
}

#[test]
fn the_credential_helper_speaks_dockers_protocol() {
    need_fuse!();
    let (_entra, reg, m) = setup(&[], &[]);
    let mount = m.path.to_str().unwrap();
    let (_dir, link) = helper_dir();
    let bin = PathBuf::from(BIN);
    let raw = m.read(&format!(".acr/{REG}")).unwrap();
    for (program, args) in [
        (&bin, vec!["credential-helper", "get", "--mount", mount]),
        (&link, vec!["get", "--mount", mount]),
    ] {
        let (code, out) = helper(program, &args, &format!("https://{REG}/v2/\n"), &[]);
        assert_eq!(code, Some(0), "{}", out.len());
        let doc: serde_json::Value = serde_json::from_str(&out).expect("JSON on stdout");
        assert_eq!(doc["ServerURL"], format!("https://{REG}/v2/"));
        assert_eq!(doc["Username"], USERNAME);
        assert!(
            doc["Secret"].as_str() == std::str::from_utf8(&raw).ok(),
            "the mount's file"
        );
    }
    // CSTOKENFS_MOUNT names the mount.
    let (code, out) = helper(&link, &["get"], REG, &[("CSTOKENFS_MOUNT", mount)]);
    assert_eq!(code, Some(0), "{}", out.len());
    // A registry it does not serve: docker's "not found", exit 1. (Never an allowed
    // registry without an --acr-endpoint here: the daemon would reach for the real one.)
    for other in [
        "https://index.docker.io/v1/",
        "ghcr.io",
        "unknown.example",
        "..",
    ] {
        let (code, out) = helper(&link, &["get", "--mount", mount], other, &[]);
        assert_eq!(code, Some(1), "{other}");
        assert_eq!(
            out.trim(),
            "credentials not found in native keychain",
            "{other}"
        );
    }
    let (code, out) = helper(&link, &["list", "--mount", mount], "", &[]);
    assert_eq!(code, Some(0));
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed, serde_json::json!({ REG: USERNAME }));
    for action in ["store", "erase"] {
        let input = format!(r#"{{"ServerURL":"{REG}","Username":"u","Secret":"s"}}"#);
        let (code, out) = helper(&link, &[action, "--mount", mount], &input, &[]);
        assert_eq!((code, out.as_str()), (Some(0), ""), "{action}");
    }
    // No mount there: said, exit 1 (not an anonymous pull).
    let (code, out) = helper(&link, &["get", "--mount", "/nonexistent"], REG, &[]);
    assert_eq!(code, Some(1));
    assert!(out.contains("no cstokenfs mount"), "{out}");
    assert_eq!(
        reg.acr_exchanges(),
        1,
        "every run shares the daemon's cache"
    );
}

/// The docker venv's python, or None (loudly; a failure when `CI=true`) when it is absent.
fn docker_python() -> Option<PathBuf> {
    let venv = std::env::var_os("CSTOKENFS_DOCKER_VENV").map(PathBuf::from);
    if let Some(python) = venv.map(|v| v.join("bin/python")).filter(|p| p.exists()) {
        return Some(python);
    }
    let msg = "DOCKER VENV UNAVAILABLE: CSTOKENFS_DOCKER_VENV is not a venv with python \
               (scripts/test.sh makes it from tests/acr/requirements.txt)";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true makes this a failure)");
    }
    eprintln!("\n!!!!! SKIPPED: {msg} !!!!!\n");
    None
}

/// docker's credential-store client runs `docker-credential-cstokenfs get`, gets the
/// emulator's refresh token, and exchanges it at the registry's `/oauth2/token` for a
/// repository-scoped token that opens `/v2/`, as docker would. Prints no token: digests.
const DOCKER_CLIENT: &str = r#"
import hashlib, json, sys
import requests
from docker.credentials import Store, errors

registry, base = sys.argv[1], sys.argv[2]
store = Store("cstokenfs")
got = store.get("https://" + registry)
out = {"user": got["Username"], "server": got["ServerURL"],
       "digest": hashlib.sha256(got["Secret"].encode()).hexdigest()}
try:
    store.get("https://index.docker.io/v1/")
    out["hub"] = "found"
except errors.CredentialsNotFound:
    out["hub"] = "not found"
out["list"] = store.list()
store.store("https://" + registry, "someone", "something")
store.erase("https://" + registry)
# Loopback only: no proxy from the environment.
http = requests.Session()
http.trust_env = False
challenge = http.get(base + "/v2/")
out["challenge"] = [challenge.status_code, challenge.headers.get("WWW-Authenticate", "")]
# As docker does with a helper's user name that is not <token>: the challenge's realm and
# service, the credentials as Basic auth.
params = dict(p.split("=", 1) for p in challenge.headers["WWW-Authenticate"][len("Bearer "):].split(","))
params = {k: v.strip('"') for k, v in params.items()}
out["service"] = params["service"]
token = http.get(params["realm"], params={"service": params["service"],
    "scope": "repository:samples/hello:pull"}, auth=(got["Username"], got["Secret"]))
out["token_status"] = token.status_code
access = token.json().get("access_token", "")
payload = access.split(".")[1]
out["access"] = json.loads(__import__("base64").urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["access"]
v2 = http.get(base + "/v2/", headers={"Authorization": "Bearer " + access})
out["v2"] = v2.status_code
print(json.dumps(out))
"#;

#[test]
fn dockers_credential_client_gets_the_refresh_token_and_pulls_with_it() {
    need_fuse!();
    let Some(python) = docker_python() else {
        return;
    };
    let (_entra, reg, m) = setup(&[], &[]);
    let (dir, _link) = helper_dir();
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(&python)
        .args(["-c", DOCKER_CLIENT, REG, &format!("http://{}", reg.addr())])
        .env("PATH", &path)
        .env("CSTOKENFS_MOUNT", &m.path)
        .env_remove("CSTOKENFS_IDENTITY")
        .env("NO_PROXY", "*")
        .env("no_proxy", "*")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the docker client failed: {}",
        stderr(&out)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let raw = m.read(&format!(".acr/{REG}")).unwrap();
    assert_eq!(
        got["digest"],
        sha256_hex(std::str::from_utf8(&raw).unwrap())
    );
    assert_eq!(got["user"], USERNAME);
    assert_eq!(got["server"], format!("https://{REG}"));
    assert_eq!(got["hub"], "not found");
    assert_eq!(got["list"], serde_json::json!({ REG: USERNAME }));
    assert_eq!(got["challenge"][0], 401);
    assert!(got["challenge"][1]
        .as_str()
        .unwrap()
        .starts_with("Bearer realm="));
    assert_eq!(got["service"], REG, "the challenge names the registry");
    assert_eq!(got["token_status"], 200);
    assert_eq!(
        got["access"],
        serde_json::json!([{"type": "repository", "name": "samples/hello", "actions": ["pull"]}])
    );
    assert_eq!(got["v2"], 200);
    assert_eq!(reg.acr_exchanges(), 1);
    assert_eq!(reg.acr_token_requests(), 1);
}
