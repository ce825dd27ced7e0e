//! Issue 10 (hardening): shutdown with open files, `.status` memory, `--mlock`, the
//! `--timeout` bound, and the FUSE calls fuser would log as not implemented. Real mounts of
//! the built binary against the in-process emulator on 127.0.0.1.

#[macro_use]
mod common;

use common::*;
use std::process::Command;

#[test]
fn timeout_above_sixty_seconds_is_a_usage_error_that_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().to_str().unwrap();
    let cases: [Vec<&str>; 4] = [
        vec!["mount", "--timeout", "90", mnt],
        vec!["mount", "-o", "timeout=90", mnt],
        vec![
            "get",
            "--emulator",
            "--timeout",
            "3600",
            "management.azure.com",
        ],
        vec!["src", mnt, "-o", "timeout=61"],
    ];
    for args in cases {
        let out = Command::new(BIN).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("at most 60 s")
                && err.contains("cannot be interrupted")
                && err.contains("120 s"),
            "{args:?}: {err}"
        );
        assert!(!is_mounted(dir.path()), "{args:?} mounted nothing");
    }
    let out = Command::new(BIN)
        .args(["mount", "--timeout", "0", mnt])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "--timeout 0");
    // 60 is accepted.
    let out = Command::new(BIN)
        .args([
            "get",
            "--emulator",
            "--timeout",
            "60",
            "management.azure.com",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "--timeout 60: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
