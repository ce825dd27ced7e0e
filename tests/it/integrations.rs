//! Issue 7: kubectl and git credentials from the mount, and mounts by ordinary users.

use crate::common;

use common::*;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const AKS: &str = "6dae42f8-4368-4678-94ff-3960e28e3630";
const DEVOPS: &str = "499b84ac-1321-427f-aa17-267ca6975798";

/// RFC 3339 `YYYY-MM-DDTHH:MM:SSZ` to epoch seconds, as client-go would read it.
fn parse_rfc3339(s: &str) -> i64 {
    let b = s.as_bytes();
    assert!(
        s.len() == 20 && b[4] == b'-' && b[10] == b'T' && b[19] == b'Z',
        "RFC 3339 UTC: {s}"
    );
    let n = |r: std::ops::Range<usize>| s[r].parse::<i64>().unwrap();
    let (y, m, d) = (n(0..4), n(5..7), n(8..10));
    let (yy, mm) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    days * 86_400 + n(11..13) * 3600 + n(14..16) * 60 + n(17..19)
}

#[test]
fn kubectl_view_is_an_exec_credential() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &[]);
    let token = m.read(AKS).unwrap();
    let out = Command::new("cat")
        .arg(m.file(&format!(".kubectl/{AKS}")))
        .output()
        .unwrap();
    assert!(out.status.success());
    let cred: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cred["apiVersion"], "client.authentication.k8s.io/v1");
    assert_eq!(cred["kind"], "ExecCredential");
    assert_same_token(
        cred["status"]["token"].as_str().unwrap().as_bytes(),
        &token,
        "status.token",
    );
    let ts = parse_rfc3339(cred["status"]["expirationTimestamp"].as_str().unwrap());
    assert_eq!(
        ts,
        claims(&token)["exp"].as_i64().unwrap(),
        "expirationTimestamp is the token's expiry"
    );
    let meta = std::fs::metadata(m.file(&format!(".kubectl/{AKS}"))).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o400,
        "same permissions as the other views"
    );
    assert_eq!(meta.len(), out.stdout.len() as u64);
    // The v1beta1 view beside it (kubeconfigs kubelogin converted): the same status.
    let beta = m.read(&format!(".kubectl-v1beta1/{AKS}")).unwrap();
    let beta: serde_json::Value = serde_json::from_slice(&beta).unwrap();
    assert_eq!(beta["apiVersion"], "client.authentication.k8s.io/v1beta1");
    assert_eq!(beta["kind"], "ExecCredential");
    assert_eq!(beta["status"], cred["status"]);
    assert_eq!(emu.requests(), 1, "same cache as the other views");
    // `get --view` prints either document.
    for (view, api) in [("kubectl", "v1"), ("kubectl-v1beta1", "v1beta1")] {
        let out = cli(["get", "--endpoint", &emu.url(), "--view", view, AKS])
            .output()
            .unwrap();
        assert!(out.status.success(), "{view}");
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let want = format!("client.authentication.k8s.io/{api}");
        assert_eq!(doc["apiVersion"], want.as_str());
        assert!(doc["status"]["token"].is_string(), "{view}");
        assert!(doc["status"]["expirationTimestamp"].is_string(), "{view}");
    }
}

#[test]
fn git_credential_fill_gets_the_token_for_azure_devops() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &[]);
    let home = tempfile::tempdir().unwrap();
    let helper = format!(
        "!f() {{ test \"$1\" = get && cat {}/.git-credential/{DEVOPS}; }}; f",
        m.path.display()
    );
    let git = |args: &[&str], input: Option<&str>| -> Output {
        let mut child = Command::new("git")
            .args(args)
            .env("HOME", home.path())
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("git");
        if let Some(input) = input {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    };
    // A global `store` helper, set before the recipe, as a user has it: without the reset
    // (`helper =` first) git would hand it the token after every successful request.
    assert!(
        git(&["config", "--global", "credential.helper", "store"], None)
            .status
            .success()
    );
    // The README's recipe: reset the helper list for the URL, then ours.
    assert!(git(
        &[
            "config",
            "--global",
            "credential.https://dev.azure.com.helper",
            ""
        ],
        None
    )
    .status
    .success());
    assert!(git(
        &[
            "config",
            "--global",
            "--add",
            "credential.https://dev.azure.com.helper",
            &helper
        ],
        None
    )
    .status
    .success());
    assert!(git(
        &[
            "config",
            "--global",
            "credential.https://dev.azure.com.useHttpPath",
            "false"
        ],
        None
    )
    .status
    .success());
    let out = git(
        &["credential", "fill"],
        Some("protocol=https\nhost=dev.azure.com\npath=org/project/_git/repo\n\n"),
    );
    assert!(
        out.status.success(),
        "git credential fill: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let password = text
        .lines()
        .find_map(|l| l.strip_prefix("password="))
        .expect("a password line");
    let token = m.read(DEVOPS).unwrap();
    assert_same_token(password.as_bytes(), &token, "git's password is the token");
    assert!(text.lines().any(|l| l.starts_with("username=")));
    assert_eq!(claims(&token)["aud"], DEVOPS);
    // What git does after the request succeeds (`git ls-remote`, a clone): approve the
    // credential to every helper in the list. The store helper is not in it.
    let out = git(&["credential", "approve"], Some(&text));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stored = home.path().join(".git-credentials");
    assert!(
        !stored.exists(),
        "~/.git-credentials was written: the token leaked into the store helper"
    );
    // Without the reset the same approve would have stored it: the check above can fail.
    assert!(git(
        &[
            "config",
            "--global",
            "--unset-all",
            "credential.https://dev.azure.com.helper",
            "^$"
        ],
        None
    )
    .status
    .success());
    let out = git(&["credential", "approve"], Some(&text));
    assert!(out.status.success());
    let leaked = std::fs::read_to_string(&stored).unwrap_or_default();
    assert!(
        leaked.contains("dev.azure.com"),
        "control: store writes without the reset"
    );
}

/// `program ARGS` run as `uid` (its own group, no others) to its end.
fn run_as(uid: u32, program: &str, args: &[&str]) -> Output {
    as_user(uid, uid, program).args(args).output().unwrap()
}

#[test]
fn an_ordinary_user_mounts_reads_and_unmounts() {
    need_fuse!();
    if !have_tool(
        &["/bin/fusermount3", "/usr/bin/fusermount3"],
        "fusermount3 (fuse3)",
    ) {
        return;
    }
    let _open = DevFuseOpen::new();
    let emu = emulator();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mnt = dir.path().join("cstoken");
    std::fs::create_dir(&mnt).unwrap();
    std::os::unix::fs::chown(&mnt, Some(1000), Some(1000)).unwrap();
    let m = mnt.to_str().unwrap();
    let cleanup = KillOnDrop(mnt.clone());

    let out = run_as(1000, BIN, &["mount", "--endpoint", &emu.url(), m]);
    assert!(
        out.status.success(),
        "mount as uid 1000: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = run_as(1000, "cat", &[&format!("{m}/management.azure.com")]);
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    assert_eq!(
        claims(&token.stdout)["aud"],
        "https://management.azure.com/"
    );
    // Without --allow-other only that user can read, root included.
    let err = expect_err(
        std::fs::read(mnt.join("management.azure.com")),
        "management.azure.com",
    );
    assert_eq!(errno(&err), libc::EACCES);
    // The user unmounts its own mount with plain umount (util-linux lets the mount's
    // user_id do it; fusermount3 -u works too), and the daemon goes away.
    let out = run_as(1000, "umount", &[m]);
    assert!(
        out.status.success(),
        "umount as the user who mounted: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(eventually(Duration::from_secs(5), || daemons(&mnt)
        .is_empty()
        .then_some(()))
    .is_some());

    // SIGTERM unmounts an ordinary user's mount too (through fusermount3).
    assert!(run_as(1000, BIN, &["mount", "--endpoint", &emu.url(), m])
        .status
        .success());
    for pid in running_daemons(&mnt) {
        // SAFETY: signalling the daemon we started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    assert!(
        eventually(Duration::from_secs(5), || (!is_mounted(&mnt)).then_some(())).is_some(),
        "SIGTERM unmounts"
    );

    // kill -9 leaves a dead mount; the user mounts again over it.
    assert!(run_as(1000, BIN, &["mount", "--endpoint", &emu.url(), m])
        .status
        .success());
    for pid in running_daemons(&mnt) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    // Seen as its owner: root is kept out of a user's mount whatever its state.
    let stale = eventually(Duration::from_secs(10), || {
        let out = run_as(1000, "stat", &[m]);
        String::from_utf8_lossy(&out.stderr)
            .contains("Transport endpoint is not connected")
            .then_some(())
    });
    assert!(stale.is_some(), "kill -9 leaves a dead mount");
    let out = run_as(1000, BIN, &["mount", "--endpoint", &emu.url(), m]);
    assert!(
        out.status.success(),
        "mount over a stale mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(run_as(1000, "cat", &[&format!("{m}/vault.azure.net")])
        .status
        .success());

    // --allow-other needs user_allow_other in /etc/fuse.conf.
    let conf = std::fs::read_to_string("/etc/fuse.conf").unwrap_or_default();
    if !conf.lines().any(|l| l.trim() == "user_allow_other") {
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::os::unix::fs::chown(&other, Some(1000), Some(1000)).unwrap();
        let out = run_as(
            1000,
            BIN,
            &[
                "mount",
                "--allow-other",
                "--endpoint",
                &emu.url(),
                other.to_str().unwrap(),
            ],
        );
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("user_allow_other"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(cleanup);
}

/// The mount's daemons once there is one (a loaded machine may show it a moment late).
fn running_daemons(mnt: &std::path::Path) -> Vec<i32> {
    eventually(Duration::from_secs(5), || {
        let pids = daemons(mnt);
        (!pids.is_empty()).then_some(pids)
    })
    .expect("the mount's daemon runs")
}
