//! `--serve-endpoint` with the real Python SDK (azure-identity from PyPI, in the venv
//! scripts/test.sh makes and names in CSTOKENFS_PYVENV), in processes that source
//! `MOUNT/.env` as the README says. Loopback only: with IDENTITY_ENDPOINT and
//! IDENTITY_HEADER set, azure-identity uses App Service's protocol and never probes IMDS.

use crate::common;

use common::*;
use cstokenfs::emulator::EmulatorConfig;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const ARM_SCOPE: &str = "https://management.azure.com/.default";
const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/endpoint_sdk/client.py");

/// The venv's python, or None (loudly; a failure when `CI=true`) when the venv is absent.
fn python() -> Option<PathBuf> {
    let venv = std::env::var_os("CSTOKENFS_PYVENV").map(PathBuf::from);
    if let Some(py) = venv.map(|v| v.join("bin/python")).filter(|p| p.exists()) {
        return Some(py);
    }
    let msg = "AZURE-IDENTITY VENV UNAVAILABLE: CSTOKENFS_PYVENV is not a venv with python \
               (scripts/test.sh makes it); the SDK tests did not run";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true makes this a failure)");
    }
    eprintln!("\n!!!!! {msg} !!!!!\n");
    None
}

macro_rules! need_python {
    () => {
        match python() {
            Some(p) => p,
            None => return,
        }
    };
}

/// What one SDK process reported, and the token it got (if any).
struct Outcome {
    report: serde_json::Value,
    token: Option<Vec<u8>>,
}

/// `bash -c 'set -a; . MOUNT/.env; set +a; exec python client.py KIND SCOPE OUT'` in a
/// clean environment (no AZURE_*, no proxies), with `env` on top (after the sourcing).
fn sdk(py: &Path, m: &Mounted, kind: &str, scope: &str, env: &[(&str, &str)]) -> Sdk {
    let out = m.dir.path().join(format!("tok-{}", rand_name()));
    let mut script = String::from("set -a; . \"$1/.env\"; set +a; ");
    for (k, v) in env {
        script.push_str(&format!("export {k}='{v}'; "));
    }
    script.push_str("exec \"$2\" \"$3\" \"$4\" \"$5\" \"$6\"");
    let mut cmd = Command::new("bash");
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", m.dir.path())
        .env("NO_PROXY", "*")
        .args(["-c", &script, "sh"])
        .arg(&m.path)
        .arg(py)
        .args([CLIENT, kind, scope])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Sdk { cmd, out }
}

/// An SDK process to start, and the file it writes its token to.
struct Sdk {
    cmd: Command,
    out: PathBuf,
}

fn rand_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Waits for a started SDK process; its report and token.
fn finish(child: std::process::Child, token_file: &Path) -> Outcome {
    let out = child.wait_with_output().expect("wait for python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "python printed no report (status {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let token = std::fs::read(token_file).ok();
    Outcome { report, token }
}

fn run(mut sdk: Sdk) -> Outcome {
    let child = sdk.cmd.spawn().expect("spawn bash");
    finish(child, &sdk.out)
}

#[test]
fn twenty_sdk_processes_and_cat_share_one_token_and_one_upstream_call() {
    need_fuse!();
    let py = need_python!();
    let emu = emulator_with(EmulatorConfig {
        latency: Duration::from_millis(1500),
        ..EmulatorConfig::default()
    });
    let m = Mounted::serving(&emu.url(), &[]);
    let mut started = Vec::new();
    for i in 0..20 {
        let kind = if i % 2 == 0 { "mi" } else { "dac" };
        let mut s = sdk(&py, &m, kind, ARM_SCOPE, &[]);
        let child = s.cmd.spawn().expect("spawn bash");
        started.push((kind, s.out, child));
    }
    let file_token = m.read("management.azure.com").expect("cat the token");
    for (kind, out, child) in started {
        let o = finish(child, &out);
        assert_eq!(o.report["ok"], true, "{kind}: {}", o.report);
        let token = o.token.expect("the SDK's token");
        assert_same_token(&token, &file_token, kind);
        // MSAL keeps `now + (expires_on - now)` in whole seconds: a second boundary
        // between the two makes it one second later.
        let (sdk, exp) = (
            o.report["expires_on"].as_i64().unwrap_or(0),
            claims(&file_token)["exp"].as_i64().unwrap_or(-9),
        );
        assert!(
            (0..=1).contains(&(sdk - exp)),
            "{kind}: expires_on {sdk}, exp {exp}"
        );
    }
    assert_eq!(emu.requests(), 1, "one upstream call in all");
    let status = m.status();
    assert_eq!(
        status["serve_endpoint"]["served"], 20,
        "{}",
        status["serve_endpoint"]
    );
    assert_no_token(&status.to_string(), &file_token, ".status");
    assert_no_token(&m.log_text(), &file_token, "the log");
    assert!(
        m.wait_log("over HTTP from 127.0.0.1:", Duration::from_secs(5))
            .is_some(),
        "audit lines"
    );
}

#[test]
fn sdk_errors_wrong_secret_refused_audience_upstream_down() {
    need_fuse!();
    let py = need_python!();
    let emu = emulator();
    let m = Mounted::serving(&emu.url(), &[]);
    let wrong = "0".repeat(64);
    let o = run(sdk(
        &py,
        &m,
        "mi",
        ARM_SCOPE,
        &[("IDENTITY_HEADER", &wrong)],
    ));
    assert_eq!(o.report["ok"], false);
    assert!(
        o.report["message"].as_str().unwrap().contains("401"),
        "{}",
        o.report
    );
    let scope = "https://refused.example.com/.default";
    for kind in ["mi", "dac"] {
        let o = run(sdk(&py, &m, kind, scope, &[]));
        assert_eq!(o.report["ok"], false, "{kind}");
        let msg = o.report["message"].as_str().unwrap();
        assert!(msg.contains("https://refused.example.com"), "{kind}: {msg}");
    }
    assert_eq!(
        emu.requests(),
        1,
        "the refusal is remembered: one upstream call"
    );
    let log = m.log_text();
    assert!(!log.contains(&m.endpoint().1), "the secret is never logged");

    // The upstream down: 500 with its error; the SDK retries (bounded) then reports it.
    let down = format!("http://127.0.0.1:{}/oauth2/token", free_port());
    let m = Mounted::serving(&down, &["--timeout", "2"]);
    let o = run(sdk(&py, &m, "mi", ARM_SCOPE, &[]));
    assert_eq!(o.report["ok"], false);
    let msg = o.report["message"].as_str().unwrap();
    assert!(msg.contains("500"), "{msg}");
    assert!(o.token.is_none());
    assert!(
        m.status()["serve_endpoint"]["upstream_failed"]
            .as_u64()
            .unwrap()
            >= 1
    );
}
