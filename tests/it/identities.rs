//! Issue 21, identities: `--identity NAME=SELECTOR` beside the mount's own, read through
//! files, `.json/`, the sink, `--serve-endpoint` and `--serve-imds` (raw HTTP and
//! azure-identity) and `get`, against the emulator's IMDS and App Service protocols that
//! know which identities exist (`Emulator::set_identities`) and put their ids in the
//! tokens (`appid`, `oid`).

use crate::common;
use crate::sink_support::{status as sink_status, wait_file, Sink, Tmpfs};

use common::*;
use cstokenfs::emulator::{Emulator, EmulatorConfig, KnownIdentity, DEFAULT_CLIENT_ID};
use cstokenfs::Kind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const ARM: &str = "https://management.azure.com/";
const ARM_Q: &str = "/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fmanagement.azure.com";
const SECRET: &str = "identities-test-secret";
/// A client ID no emulator identity has.
const UNKNOWN: &str = "99999999-9999-9999-9999-999999999999";

fn emulator_of(protocol: Kind, known: u8) -> Emulator {
    let config = EmulatorConfig {
        identity_header: Some(SECRET.into()),
        ..EmulatorConfig::default()
    };
    let emu =
        Emulator::start_with("127.0.0.1:0".parse().unwrap(), config, protocol).expect("emulator");
    emu.set_identities((1..=known).map(KnownIdentity::numbered).collect());
    emu
}

fn id(n: u8) -> KnownIdentity {
    KnownIdentity::numbered(n)
}

/// `--identity` flags: `a` by client ID, `b` by object ID, `c` by resource ID.
fn three() -> Vec<String> {
    vec![
        format!("a=client-id={}", id(1).client_id),
        format!("b=object-id={}", id(2).object_id),
        format!("c=resource-id={}", id(3).resource_id),
    ]
}

fn with_identities<'a>(base: &[&'a str], ids: &'a [String]) -> Vec<&'a str> {
    let mut args = base.to_vec();
    for i in ids {
        args.push("--identity");
        args.push(i);
    }
    args
}

fn appid(token: &[u8]) -> String {
    claims(token)["appid"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn get(addr: std::net::SocketAddr, target: &str, head: &str) -> (u16, cstokenfs::testing::Body) {
    cstokenfs::testing::http_get(addr, target, head)
}

/// The venv's python (scripts/test.sh makes it), or None (said loudly).
fn python() -> Option<PathBuf> {
    let venv = std::env::var_os("CSTOKENFS_PYVENV").map(PathBuf::from);
    if let Some(py) = venv.map(|v| v.join("bin/python")).filter(|p| p.exists()) {
        return Some(py);
    }
    let msg = "AZURE-IDENTITY VENV UNAVAILABLE: the identities SDK checks did not run";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true makes this a failure)");
    }
    eprintln!("\n!!!!! {msg} !!!!!\n");
    None
}

/// azure-identity (`mi`: ManagedIdentityCredential, `dac`: DefaultAzureCredential) in a
/// clean environment with `MOUNT/.env` sourced and `env` on top: its token.
fn sdk_token(py: &Path, m: &Mounted, kind: &str, env: &[(&str, &str)]) -> Vec<u8> {
    let out = m.dir.path().join(format!("sdk-{kind}-{}", env.len()));
    let _ = std::fs::remove_file(&out);
    let mut script = String::from("set -a; . \"$1/.env\"; set +a; ");
    for (k, v) in env {
        // An empty value unsets the variable (e.g. `.env`'s App Service pair, so that the
        // SDK speaks IMDS to `AZURE_POD_IDENTITY_AUTHORITY_HOST`).
        if v.is_empty() {
            script.push_str(&format!("unset {k}; "));
        } else {
            script.push_str(&format!("export {k}='{v}'; "));
        }
    }
    script.push_str("exec \"$2\" \"$3\" \"$4\" \"$5\" \"$6\"");
    let client = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/endpoint_sdk/client.py");
    let o = Command::new("bash")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", m.dir.path())
        .env("NO_PROXY", "*")
        .args(["-c", &script, "sh"])
        .arg(&m.path)
        .arg(py)
        .args([client, kind, "https://management.azure.com/.default"])
        .arg(&out)
        .stdin(Stdio::null())
        .output()
        .expect("run python");
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(report.contains("\"ok\": true"), "{kind} {env:?}: {report}");
    std::fs::read(&out).expect("the SDK's token")
}

/// Three declared identities and the mount's own (system-assigned), App Service upstream:
/// each read through its file, `.json/`, `--serve-endpoint` (raw and azure-identity) gets
/// one token per (identity, resource), from one upstream request each; an undeclared
/// identity is 400 without an upstream request; the sink writes `DIR/id/NAME/` alike.
#[test]
fn three_identities_and_the_mounts_own_on_every_route() {
    need_fuse!();
    let emu = emulator_of(Kind::AppService, 3);
    emu.set_caching(true);
    let ids = three();
    let base = [
        "--source",
        "appservice",
        "--serve-endpoint",
        "127.0.0.1:0",
        "--resource",
        "vault.azure.net",
    ];
    let url = emu.url();
    let env = [
        ("IDENTITY_ENDPOINT", url.as_str()),
        ("IDENTITY_HEADER", SECRET),
    ];
    let m = Mounted::raw(&with_identities(&base, &ids), &env);

    // Layout: MOUNT/id lists the names; each holds the top's tree, same modes.
    let names: Vec<String> = {
        let mut n: Vec<String> = std::fs::read_dir(m.file("id"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names, ["a", "b", "c"]);
    let top_mode = std::fs::metadata(m.file(".json")).unwrap();
    for n in ["a", "b", "c"] {
        let listing: Vec<String> = std::fs::read_dir(m.file(&format!("id/{n}")))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        for want in [
            ".json",
            ".header",
            ".kubectl",
            ".kubectl-v1beta1",
            ".git-credential",
            ".claims",
            "vault.azure.net",
        ] {
            assert!(listing.iter().any(|l| l == want), "id/{n}: {listing:?}");
        }
        assert!(
            !listing.iter().any(|l| l == ".status" || l == "id"),
            "{listing:?}"
        );
        use std::os::unix::fs::MetadataExt;
        let dir = std::fs::metadata(m.file(&format!("id/{n}/.json"))).unwrap();
        assert_eq!(dir.mode(), top_mode.mode(), "id/{n}/.json");
    }
    assert!(m.read("id/zz/management.azure.com").is_err());

    // Files and .json/: each identity's token names it.
    let want = [
        ("", DEFAULT_CLIENT_ID.to_string()),
        ("id/a/", id(1).client_id),
        ("id/b/", id(2).client_id),
        ("id/c/", id(3).client_id),
    ];
    let mut tokens = Vec::new();
    for (dir, client) in &want {
        let token = m.read(&format!("{dir}management.azure.com")).unwrap();
        assert_eq!(appid(&token), *client, "{dir}");
        let json: serde_json::Value =
            serde_json::from_slice(&m.read(&format!("{dir}.json/management.azure.com")).unwrap())
                .unwrap();
        assert_same_token(
            json["access_token"].as_str().unwrap().as_bytes(),
            &token,
            dir,
        );
        tokens.push(token);
    }
    assert_eq!(claims(&tokens[2])["oid"], id(2).object_id.as_str());
    assert_eq!(claims(&tokens[3])["xms_mirid"], id(3).resource_id.as_str());

    // --serve-endpoint: selected by the declared selector of the same kind only.
    let (addr, secret) = m.endpoint();
    let head = format!("Host: {addr}\r\nX-IDENTITY-HEADER: {secret}\r\n");
    let routes = [
        (String::new(), 0),
        (format!("&client_id={}", id(1).client_id.to_uppercase()), 1),
        (format!("&principal_id={}", id(2).object_id), 2),
        (format!("&object_id={}", id(2).object_id), 2),
        (
            format!("&mi_res_id={}", id(3).resource_id.replace('/', "%2F")),
            3,
        ),
        (format!("&msi_res_id={}", id(3).resource_id), 3),
    ];
    for (query, n) in &routes {
        let (status, body) = get(addr, &format!("{ARM_Q}{query}"), &head);
        assert_eq!(status, 200, "{query}: {body}");
        let token = body["access_token"].as_str().unwrap().as_bytes().to_vec();
        assert_same_token(&token, &tokens[*n], query);
    }
    let (_, body) = get(
        addr,
        &format!("{ARM_Q}&client_id={}", id(1).client_id),
        &head,
    );
    assert_eq!(body["client_id"], id(1).client_id.as_str());

    // azure-identity: ManagedIdentityCredential(client_id=...) and DefaultAzureCredential
    // with AZURE_CLIENT_ID.
    if let Some(py) = python() {
        let a = &id(1).client_id;
        let t = sdk_token(&py, &m, "mi", &[("CSTOKENFS_MI_CLIENT_ID", a)]);
        assert_same_token(&t, &tokens[1], "ManagedIdentityCredential(client_id=a)");
        let t = sdk_token(&py, &m, "dac", &[("AZURE_CLIENT_ID", a)]);
        assert_same_token(&t, &tokens[1], "DefaultAzureCredential, AZURE_CLIENT_ID=a");
        let t = sdk_token(&py, &m, "mi", &[]);
        assert_same_token(&t, &tokens[0], "ManagedIdentityCredential()");
    }

    // One upstream request per (identity, resource) in all.
    for (_, client) in &want {
        assert_eq!(emu.requests_by(client, ARM), 1, "{client}");
    }
    let before = emu.requests();

    // Undeclared: 400 in App Service's shape, no upstream request. A client ID given as
    // an object ID (or the reverse) is not declared either.
    for query in [
        format!("&client_id={UNKNOWN}"),
        format!("&object_id={}", id(1).client_id),
        format!("&client_id={}", id(2).object_id),
        format!(
            "&client_id={}&object_id={}",
            id(1).client_id,
            id(2).object_id
        ),
    ] {
        let (status, body) = get(addr, &format!("{ARM_Q}{query}"), &head);
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["statusCode"], 400);
        let msg = body["message"].as_str().unwrap();
        assert!(msg.contains("No Managed Identity found"), "{msg}");
    }
    assert_eq!(
        emu.requests(),
        before,
        "no upstream request for an undeclared identity"
    );

    // .status: per identity, its selector and resources; the top stays the mount's own.
    let s = m.status();
    assert_eq!(
        s["identity"]["from"],
        "none given: the system-assigned identity"
    );
    let declared = s["identities"].as_array().unwrap();
    assert_eq!(declared.len(), 3);
    assert_eq!(declared[0]["name"], "a");
    assert_eq!(declared[0]["selector"], "client-id");
    assert_eq!(declared[1]["selector"], "object-id");
    assert_eq!(declared[2]["value"], id(3).resource_id.as_str());
    for d in declared {
        let rs: Vec<&str> = d["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["resource"].as_str().unwrap())
            .collect();
        assert!(
            rs.contains(&ARM) && rs.contains(&"https://vault.azure.net"),
            "{d}"
        );
    }
    let top: Vec<&str> = s["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["resource"].as_str().unwrap())
        .collect();
    assert_eq!(top.iter().filter(|r| **r == ARM).count(), 1, "{top:?}");
    assert!(
        m.wait_log(
            "of id/a/https://management.azure.com/ (",
            Duration::from_secs(5)
        )
        .is_some(),
        "the audit line names the identity"
    );

    // The sink: DIR/id/NAME/ alike (the emulator caches: the same tokens).
    let tmp = Tmpfs::new();
    let mut sargs = vec![
        "--source",
        "appservice",
        "--resource",
        "management.azure.com",
    ];
    for i in &ids {
        sargs.push("--identity");
        sargs.push(i);
    }
    let mut cmd = cli(["sink", "-f"]);
    cmd.args(&sargs).arg(&tmp.path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let sink = Sink::spawn(cmd, &tmp.path);
    for ((dir, _), token) in want.iter().zip(&tokens) {
        let file = wait_file(
            &tmp.path.join(format!("{dir}management.azure.com")),
            Duration::from_secs(10),
        );
        assert_same_token(&file, token, &format!("sink {dir}"));
        let json = wait_file(
            &tmp.path.join(format!("{dir}.json/management.azure.com")),
            Duration::from_secs(10),
        );
        assert!(!json.is_empty());
    }
    let st = sink_status(&tmp.path);
    assert_eq!(st["identities"].as_array().unwrap().len(), 3, "{st}");
    drop(sink);
    let left: Vec<_> = std::fs::read_dir(&tmp.path).unwrap().collect();
    assert!(left.is_empty(), "the sink removed what it made: {left:?}");
}

/// AZURE_CLIENT_ID selects the mount's own identity with the imds and appservice sources,
/// as DefaultAzureCredential takes it: the upstream request carries it, `.status` says so.
#[test]
fn azure_client_id_is_the_mounts_identity_for_imds_and_appservice() {
    need_fuse!();
    for kind in [Kind::Imds, Kind::AppService] {
        let emu = emulator_of(kind, 2);
        let url = emu.url();
        let client = id(2).client_id;
        let mut env = vec![("AZURE_CLIENT_ID", client.as_str())];
        let source = match kind {
            Kind::Imds => "imds",
            _ => {
                env.push(("IDENTITY_ENDPOINT", url.as_str()));
                env.push(("IDENTITY_HEADER", SECRET));
                "appservice"
            }
        };
        let m = Mounted::raw(&["--source", source, "--endpoint", &url], &env);
        let token = m.read("management.azure.com").unwrap();
        assert_eq!(appid(&token), client, "{source}");
        let params = emu.last_params().unwrap();
        assert_eq!(params.get("client_id"), Some(&client), "{source}");
        let s = m.status();
        assert_eq!(s["identity"]["from"], "AZURE_CLIENT_ID", "{source}");
        assert_eq!(s["identity"]["selector"], "client-id");
        assert_eq!(s["identity"]["value"], client.as_str());
        // A flag wins over the variable.
        let flag = id(1).object_id;
        let m = Mounted::raw(
            &["--source", source, "--endpoint", &url, "--object-id", &flag],
            &env,
        );
        let token = m.read("vault.azure.net").unwrap();
        assert_eq!(appid(&token), id(1).client_id, "{source}");
        assert_eq!(m.status()["identity"]["from"], "--object-id");
    }
}

/// An identity the upstream refuses is denied (EACCES, negative-cached); the others and
/// the mount's own are served as before.
#[test]
fn an_identity_the_upstream_refuses_does_not_disturb_the_others() {
    need_fuse!();
    let emu = emulator_of(Kind::Imds, 1);
    let ids = vec![
        format!("a=client-id={}", id(1).client_id),
        format!("gone=client-id={UNKNOWN}"),
    ];
    let url = emu.url();
    let m = Mounted::raw(
        &with_identities(&["--source", "imds", "--endpoint", &url], &ids),
        &[],
    );
    for _ in 0..3 {
        let e = m.read_err("id/gone/management.azure.com");
        assert_eq!(errno(&e), libc::EACCES, "{e}");
    }
    let refused = emu.requests();
    assert_eq!(refused, 1, "the refusal is negative-cached");
    let a = m.read("id/a/management.azure.com").unwrap();
    assert_eq!(appid(&a), id(1).client_id);
    let own = m.read("management.azure.com").unwrap();
    assert_eq!(appid(&own), DEFAULT_CLIENT_ID);
    let s = m.status();
    let gone = &s["identities"][1];
    assert_eq!(gone["name"], "gone");
    let r = &gone["resources"][0];
    assert_eq!(r["state"], "denied", "{gone}");
    assert!(r["last_error"]
        .as_str()
        .unwrap()
        .contains("Identity not found"));
    assert_eq!(s["resources"][0]["state"], "fresh");
}

/// `get --identity NAME=SELECTOR` prints that identity's token; with Entra, each declared
/// client ID is exchanged with the mount's own credential.
#[test]
fn get_prints_one_identitys_token() {
    let emu = emulator_of(Kind::Imds, 2);
    let url = emu.url();
    let flag = format!("x=client-id={}", id(2).client_id);
    let o = run(&[
        "get",
        "--source",
        "imds",
        "--endpoint",
        &url,
        "--identity",
        &flag,
        "management.azure.com",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(appid(stdout(&o).trim().as_bytes()), id(2).client_id);
    let g = "12345678-1234-1234-1234-123456789abc";
    let flag = format!("ci=client-id={g}");
    let o = run(&[
        "get",
        "--emulator",
        "--source",
        "workload-identity",
        "--identity",
        &flag,
        "management.azure.com",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(appid(stdout(&o).trim().as_bytes()), g);
    let two = format!("y=client-id={}", id(1).client_id);
    let flag = format!("x=client-id={}", id(2).client_id);
    let o = run(&[
        "get",
        "--source",
        "imds",
        "--endpoint",
        &url,
        "--identity",
        &flag,
        "--identity",
        &two,
        "management.azure.com",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("one NAME only"), "{}", stderr(&o));
}

/// Bad NAME or SELECTOR grammar and sources with one identity: usage errors (exit 2)
/// naming the fix, before anything is mounted; `-o identity=` takes the same grammar.
#[test]
fn grammar_and_sources_with_one_identity_are_usage_errors() {
    let g = "11111111-2222-3333-4444-555555555555";
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![format!("Bad=client-id={g}")],
            "identity name \"Bad\" is not valid",
        ),
        (vec![format!("a.b=client-id={g}")], "is not valid"),
        (vec!["a=client-id=nope".into()], "is not a GUID"),
        (vec![format!("a=app-id={g}")], "unknown key"),
        (vec!["a".into()], "NAME=SELECTOR"),
        (
            vec!["a=resource-id=/subscriptions/x".into()],
            "userAssignedIdentities",
        ),
        (
            vec![format!("a=client-id={g}"), format!("a=object-id={g}")],
            "exactly one of",
        ),
        (
            vec![format!("a=client-id={g}"), format!("a=client-id={g}")],
            "given twice",
        ),
        (
            vec![format!("a=client-id={g}"), format!("b=client-id={g}")],
            "name one identity",
        ),
        (
            vec![format!("a=client-id={g}"), format!("a=tenant-id={g}")],
            "tenant-id= is for",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().to_str().unwrap();
    for (flags, want) in &cases {
        let mut args = vec![
            "mount",
            "--source",
            "imds",
            "--endpoint",
            "http://127.0.0.1:9/x",
        ];
        for f in flags {
            args.push("--identity");
            args.push(f);
        }
        args.push(mnt);
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{flags:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{flags:?}: {}", stderr(&o));
    }
    let one = format!("a=client-id={g}");
    for (source, why) in [
        (
            "cloudshell",
            "signed-in user's token whatever identity is asked for",
        ),
        ("arc", "one identity"),
        ("azure-cli", "one identity"),
    ] {
        for cmd in ["mount", "sink", "get"] {
            let target = if cmd == "get" {
                "management.azure.com"
            } else {
                mnt
            };
            let mut args = vec![cmd, "--source", source, "--identity", &one];
            if cmd == "sink" {
                args.extend(["--resource", "management.azure.com"]);
            }
            args.push(target);
            let o = run(&args);
            assert_eq!(o.status.code(), Some(2), "{cmd} {source}: {}", stderr(&o));
            assert!(stderr(&o).contains(why), "{cmd} {source}: {}", stderr(&o));
        }
    }
    // The emulator knows user-assigned identities only where the protocol has them.
    for protocol in ["cloudshell", "arc", "entra"] {
        let o = run(&[
            "emulator",
            "--protocol",
            protocol,
            "--listen",
            "127.0.0.1:0",
            "--user-assigned",
            "2",
        ]);
        assert_eq!(o.status.code(), Some(2), "{protocol}: {}", stderr(&o));
        assert!(stderr(&o).contains("only for --protocol imds or appservice"));
    }
    // fstab form: the same grammar, the same errors.
    let opts = format!("source=cloudshell,identity={one}");
    let o = run(&["cstoken", mnt, "-o", &opts]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--identity a"), "{}", stderr(&o));
    let opts = "source=imds,identity=BAD=client-id=x".to_string();
    let o = run(&["cstoken", mnt, "-o", &opts]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("is not valid"), "{}", stderr(&o));
}

/// `--no-open` serves `MOUNT/id/NAME/` the same way; with workload identity one federated
/// token file serves every declared client ID (the emulator's Entra tokens name the
/// application asked for).
#[test]
fn no_open_mode_and_workload_identity_serve_declared_identities() {
    need_fuse!();
    let emu = emulator_of(Kind::Imds, 1);
    let ids = vec![format!("a=client-id={}", id(1).client_id)];
    let url = emu.url();
    let m = Mounted::raw(
        &with_identities(&["--source", "imds", "--endpoint", &url, "--no-open"], &ids),
        &[],
    );
    for _ in 0..3 {
        let a = m.read("id/a/management.azure.com").unwrap();
        assert_eq!(appid(&a), id(1).client_id);
    }
    assert_eq!(emu.requests_by(&id(1).client_id, ARM), 1);
    drop(m);

    let g1 = "12345678-1234-1234-1234-000000000001";
    let g2 = "12345678-1234-1234-1234-000000000002";
    let ids = vec![format!("one=client-id={g1}"), format!("two=client-id={g2}")];
    let m = Mounted::raw(
        &with_identities(&["--emulator", "--source", "workload-identity"], &ids),
        &[],
    );
    for (dir, want) in [("id/one/", g1), ("id/two/", g2)] {
        let t = m.read(&format!("{dir}vault.azure.net")).unwrap();
        assert_eq!(appid(&t), want, "{dir}");
    }
    let own = m.read("vault.azure.net").unwrap();
    assert!(
        appid(&own) != g1 && appid(&own) != g2,
        "the top is the mount's own identity"
    );
    let s = m.status();
    assert_eq!(s["identities"][1]["selector"], "client-id");
    assert_eq!(s["identities"][1]["value"], g2);
}

/// Workload identity against an Entra that knows two applications federated with one
/// service-account token: the mount's own and a declared one are served from the one token
/// file; a declared application Entra does not know is EACCES (negative-cached) and
/// disturbs neither.
#[test]
fn workload_identity_exchanges_one_token_file_for_each_declared_application() {
    use crate::entra_support::{entra_emulator, federated_token, settings, write, CLIENT, TENANT};
    use cstokenfs::emulator::entra::EntraSettings;
    need_fuse!();
    let dir = tempfile::tempdir().unwrap();
    let token = federated_token(now_secs() + 3600, "shared");
    let file = write(dir.path(), "azure-identity-token", &format!("{token}\n"));
    let other = "8a0b5c4d-1111-2222-3333-000000000002";
    let emu = entra_emulator(
        EntraSettings {
            federated_token_file: Some(file.clone()),
            client_id: Some(format!("{CLIENT},{other}")),
            ..settings()
        },
        None,
    );
    let url = emu.url();
    let path = file.display().to_string();
    let ids = vec![
        format!("two=client-id={other}"),
        format!("nope=client-id={UNKNOWN}"),
    ];
    let m = Mounted::raw(
        &with_identities(&["--source", "workload-identity"], &ids),
        &[
            ("AZURE_FEDERATED_TOKEN_FILE", &path),
            ("AZURE_CLIENT_ID", CLIENT),
            ("AZURE_TENANT_ID", TENANT),
            ("AZURE_AUTHORITY_HOST", &url),
        ],
    );
    let e = m.read_err("id/nope/vault.azure.net");
    assert_eq!(errno(&e), libc::EACCES, "{e}");
    let own = m.read("vault.azure.net").unwrap();
    assert_eq!(appid(&own), CLIENT);
    let two = m.read("id/two/vault.azure.net").unwrap();
    assert_eq!(appid(&two), other);
    let before = emu.requests();
    assert_eq!(errno(&m.read_err("id/nope/vault.azure.net")), libc::EACCES);
    assert_eq!(emu.requests(), before, "the refusal is remembered");
    let s = m.status();
    assert_eq!(s["identity"]["from"], "AZURE_CLIENT_ID");
    assert_eq!(s["identity"]["value"], CLIENT);
    assert_eq!(s["identities"][1]["resources"][0]["state"], "denied");
}

/// Issue 21's combined case: three declared identities and the mount's own (imds source,
/// the emulator's user-assigned identities), each read through its file, `.json/`,
/// `--serve-endpoint` and `--serve-imds` (raw HTTP with the parameter of each identity's
/// declared selector, and azure-identity pointed at the mount by `.env`'s
/// `AZURE_POD_IDENTITY_AUTHORITY_HOST`): the same token for the same (identity, resource)
/// on every route, one upstream request per (identity, resource) in all; IMDS answers the
/// selected identity's `client_id`, and an undeclared identity gets 400 "Identity not
/// found" without an upstream request.
#[test]
fn every_front_end_serves_each_identity_one_upstream_request() {
    need_fuse!();
    let emu = emulator_of(Kind::Imds, 4);
    emu.set_caching(true);
    let ids = three();
    let url = emu.url();
    let base = [
        "--source",
        "imds",
        "--endpoint",
        &url,
        "--serve-endpoint",
        "127.0.0.1:0",
        "--serve-imds",
        "127.0.0.1:0",
    ];
    let m = Mounted::raw(&with_identities(&base, &ids), &[]);
    let arm = "https%3A%2F%2Fmanagement.azure.com";
    // (directory, the token's appid, the endpoint's and IMDS's parameter, the SDK's variable)
    let res = |n: u8| id(n).resource_id;
    let cases = [
        ("", DEFAULT_CLIENT_ID.to_string(), String::new(), None),
        (
            "id/a/",
            id(1).client_id,
            format!("&client_id={}", id(1).client_id),
            Some(("CSTOKENFS_MI_CLIENT_ID", id(1).client_id)),
        ),
        (
            "id/b/",
            id(2).client_id,
            format!("&object_id={}", id(2).object_id),
            Some(("CSTOKENFS_MI_OBJECT_ID", id(2).object_id)),
        ),
        (
            "id/c/",
            id(3).client_id,
            format!("&msi_res_id={}", res(3).replace('/', "%2F")),
            Some(("CSTOKENFS_MI_RES_ID", res(3))),
        ),
    ];
    // `.env`: App Service's pair, then the IMDS host.
    let env = String::from_utf8(m.read(".env").unwrap()).unwrap();
    let var = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_default()
            .to_string()
    };
    let ep: std::net::SocketAddr = var("IDENTITY_ENDPOINT")
        .trim_start_matches("http://")
        .trim_end_matches("/msi/token")
        .parse()
        .unwrap();
    let secret = var("IDENTITY_HEADER");
    let ep_head = format!("Host: {ep}\r\nX-IDENTITY-HEADER: {secret}\r\n");
    let imds = m.imds();
    let imds_head = format!("Host: {imds}\r\nMetadata: true\r\n");
    let py = python();
    for (dir, client, param, sdk) in &cases {
        let file = m.read(&format!("{dir}management.azure.com")).unwrap();
        assert_eq!(appid(&file), *client, "{dir}");
        let json: serde_json::Value =
            serde_json::from_slice(&m.read(&format!("{dir}.json/management.azure.com")).unwrap())
                .unwrap();
        let got = json["access_token"].as_str().unwrap_or_default();
        assert_same_token(got.as_bytes(), &file, &format!("{dir}.json/"));

        let (status, body) = get(ep, &format!("{ARM_Q}{param}"), &ep_head);
        assert_eq!(status, 200, "endpoint {param}: {body}");
        let got = body["access_token"].as_str().unwrap_or_default();
        assert_same_token(got.as_bytes(), &file, &format!("endpoint {param}"));

        let target =
            format!("/metadata/identity/oauth2/token?api-version=2018-02-01&resource={arm}{param}");
        let (status, body) = get(imds, &target, &imds_head);
        assert_eq!(status, 200, "IMDS {param}: {body}");
        let got = body["access_token"].as_str().unwrap_or_default();
        assert_same_token(got.as_bytes(), &file, &format!("IMDS {param}"));
        assert_eq!(
            body["client_id"],
            client.as_str(),
            "IMDS {param}: client_id"
        );

        if let Some(py) = &py {
            // azure-identity over IMDS: `.env` names both front ends; without the App
            // Service pairs the SDK takes AZURE_POD_IDENTITY_AUTHORITY_HOST.
            let mut env = vec![
                ("IDENTITY_ENDPOINT", ""),
                ("IDENTITY_HEADER", ""),
                ("MSI_ENDPOINT", ""),
                ("MSI_SECRET", ""),
            ];
            if let Some((var, value)) = sdk {
                env.push((var, value.as_str()));
            }
            let t = sdk_token(py, &m, "mi", &env);
            assert_same_token(&t, &file, &format!("azure-identity over IMDS {param}"));
        }
    }
    if let Some(py) = &py {
        // And over the endpoint, ManagedIdentityCredential(client_id=a).
        let a = id(1).client_id;
        let t = sdk_token(py, &m, "mi", &[("CSTOKENFS_MI_CLIENT_ID", &a)]);
        let file = m.read("id/a/management.azure.com").unwrap();
        assert_same_token(&t, &file, "azure-identity over the endpoint, client_id=a");
    }

    // One upstream request per (identity, resource) in all, and none for the fourth
    // identity, which the emulator knows but the mount does not declare.
    for (dir, client, _, _) in &cases {
        assert_eq!(emu.requests_by(client, ARM), 1, "{dir}");
    }
    assert_eq!(emu.requests(), cases.len() as u64);

    let refused = m.status()["serve_imds"]["bad_request"]
        .as_u64()
        .unwrap_or_default();
    // Undeclared over IMDS: 400 "Identity not found", no upstream request; a known
    // identity's client ID asked as its object ID (or the reverse) is not declared either.
    for param in [
        format!("&client_id={}", id(4).client_id),
        format!("&client_id={UNKNOWN}"),
        format!("&object_id={}", id(4).object_id),
        format!("&msi_res_id={}", res(4)),
        format!("&object_id={}", id(1).client_id),
        format!("&client_id={}", id(2).object_id),
        format!("&client_id={}", id(2).client_id),
        format!("&msi_res_id={}", res(1)),
    ] {
        let target =
            format!("/metadata/identity/oauth2/token?api-version=2018-02-01&resource={arm}{param}");
        let (status, body) = get(imds, &target, &imds_head);
        assert_eq!(status, 400, "IMDS {param}: {body}");
        assert_eq!(body["error"], "invalid_request", "IMDS {param}: {body}");
        assert_eq!(
            body["error_description"], "Identity not found",
            "IMDS {param}"
        );
    }
    assert_eq!(
        emu.requests(),
        cases.len() as u64,
        "no upstream request for an undeclared identity"
    );
    let s = &m.status()["serve_imds"];
    assert_eq!(
        s["bad_request"].as_u64().unwrap_or_default() - refused,
        8,
        "{s}"
    );
}
