//! Issue 15: the command line behaves as FUSE filesystems and Rust CLIs do (exit codes and
//! messages), the mount's type is `fuse.cstokenfs`, `auto_unmount` after kill -9, syslog,
//! `-d`, warnings that do not stop a mount, completions and the man page, and a changed
//! failure logged at WARN.

use crate::common;

use common::*;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The line of /proc/self/mounts for `mnt`.
fn mount_line(mnt: &Path) -> Option<String> {
    let want = format!(" {} ", mnt.display());
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains(&want))
        .map(str::to_owned)
}

#[test]
fn a_mistyped_subcommand_is_clap_error_with_a_suggestion_not_a_mount() {
    let (_dir, mnt) = scratch_mountpoint();
    let out = run(&["mout", "--emulator", mnt.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("unrecognized subcommand 'mout'"), "{err}");
    assert!(err.contains("'mount'"), "a suggestion: {err}");
    assert!(!is_mounted(&mnt));
    let out = run(&["gett", "management.azure.com"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("unrecognized subcommand 'gett'"), "{err}");
    assert!(err.contains("a similar subcommand exists: 'get'"), "{err}");
    assert!(!err.contains("mount point"), "{err}");
}

#[test]
fn dash_o_values_get_clap_messages_and_suggestions() {
    let (_dir, mnt) = scratch_mountpoint();
    let m = mnt.to_str().unwrap();
    let out = run(&["src", m, "-o", "allow_otehr"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("a similar argument exists: '--allow-other'"),
        "{err}"
    );
    let out = run(&["src", m, "-o", "refresh_margin=-5"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("invalid value '-5' for '--refresh-margin <SECS>': -5 is not in 0..=31536000"),
        "{err}"
    );
    // The same words as the long flag.
    let long = run(&["mount", "--refresh-margin=-5", m]);
    assert_eq!(long.status.code(), Some(2));
    assert_eq!(
        stderr(&long).lines().next(),
        err.lines().next(),
        "-o and the long flag say the same"
    );
    for (opts, words) in [
        ("uid", "a value is required for '--uid <UID>'"),
        ("allow_other=1", "unexpected value '1' for '--allow-other'"),
        ("mode=4755", "only permission bits are allowed"),
    ] {
        let out = run(&["src", m, "-o", opts]);
        assert_eq!(out.status.code(), Some(2), "{opts}");
        assert!(stderr(&out).contains(words), "{opts}: {}", stderr(&out));
    }
    let out = run(&["mount", "--mode", "4755", m]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("only permission bits are allowed"),
        "{}",
        stderr(&out)
    );
    let out = run(&["a", "b", "c", "-o", "ro"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("SOURCE MOUNTPOINT"),
        "{}",
        stderr(&out)
    );
    assert!(!is_mounted(&mnt));
}

#[test]
fn invoked_as_a_mount_helper_the_mount_form_needs_no_o() {
    let dir = tempfile::tempdir().unwrap();
    let helper = dir.path().join("mount.cstokenfs");
    std::os::unix::fs::symlink(BIN, &helper).unwrap();
    let missing = dir.path().join("missing");
    let out = Command::new(&helper)
        .arg("src")
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("does not exist"),
        "taken as SOURCE MOUNTPOINT: {}",
        stderr(&out)
    );
}

#[test]
fn version_and_help_of_each_subcommand() {
    let out = run(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        stdout(&out).trim(),
        format!("cstokenfs {}", env!("CARGO_PKG_VERSION"))
    );
    for sub in ["mount", "sink", "get", "emulator"] {
        let out = run(&[sub, "--help"]);
        assert!(out.status.success(), "{sub}");
        let help = stdout(&out);
        for word in [
            "MOUNT/<name>",
            ".json/",
            ".header/",
            ".kubectl/",
            ".git-credential/",
            ".claims/",
            ".status",
            ".env",
            "SOURCE MOUNTPOINT -o",
            "SIGTERM",
            "SIGINT",
            "SIGUSR1",
            "SIGHUP",
            "MSI_ENDPOINT",
            "MSI_SECRET",
            "IDENTITY_ENDPOINT",
            "IDENTITY_HEADER",
            "IMDS_ENDPOINT",
            "RUST_LOG",
        ] {
            assert!(help.contains(word), "{sub} --help lacks {word}");
        }
    }
    let help = stdout(&run(&["mount", "--help"]));
    for flag in [
        "--debug",
        "--allow-root",
        "--auto-unmount",
        "--fsname",
        "-o <OPTIONS>",
    ] {
        assert!(help.contains(flag), "mount --help lacks {flag}");
    }
}

#[test]
fn completions_and_the_man_page_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", stderr(&out));
        let script = stdout(&out);
        assert!(
            script.contains("cstokenfs") && script.contains("auto-unmount"),
            "{shell}"
        );
    }
    let out = run(&["completions", "powershell"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["man"]);
    assert!(out.status.success());
    let page = stdout(&out);
    assert!(
        page.contains(".TH cstokenfs 1"),
        "{}",
        &page[..200.min(page.len())]
    );
    assert!(page.contains("CSTOKENFS\\-MOUNT") || page.contains("cstokenfs\\-mount"));
    assert!(page.contains("auto\\-unmount"));
}

#[test]
fn get_takes_host_names_uris_scopes_and_guids() {
    for (name, aud) in [
        ("management.azure.com", "https://management.azure.com/"),
        ("MANAGEMENT.AZURE.COM.", "https://management.azure.com/"),
        (
            "https://management.azure.com/",
            "https://management.azure.com/",
        ),
        (
            "https://graph.microsoft.com/.default",
            "https://graph.microsoft.com/",
        ),
        (
            "499b84ac-1321-427f-aa17-267ca6975798",
            "499b84ac-1321-427f-aa17-267ca6975798",
        ),
    ] {
        // The claims view: the test never holds a printed token.
        let out = run(&["get", "--emulator", "--view", "claims", name]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(claims["aud"], aud, "{name}");
    }
    let out = run(&["get", "--emulator", "https://"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_fs_type_is_fuse_cstokenfs_and_fsname_is_the_source() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &["-o", "fsname=mytokens"]);
    let line = mount_line(&m.path).expect("in /proc/self/mounts");
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(fields[0], "mytokens", "{line}");
    assert_eq!(fields[2], "fuse.cstokenfs", "{line}");
    for opt in ["ro", "nosuid", "nodev", "noexec", "default_permissions"] {
        assert!(fields[3].split(',').any(|o| o == opt), "{opt}: {line}");
    }
    // Upper case and a trailing dot name the same resource.
    let a = m.read("MANAGEMENT.AZURE.COM.").unwrap();
    let b = m.read("management.azure.com").unwrap();
    assert_same_token(&a, &b, "case-insensitive host names");
}

#[test]
fn allow_root_lets_root_in_and_keeps_other_users_out() {
    need_fuse!();
    let emu = emulator();
    // Mounted by root for uid 1000's files: allow_root passes root only (the owner being
    // root here), so uid 1000 is kept out even though the file is theirs.
    let m = Mounted::new(&emu.url(), &["-o", "allow_root,uid=1000"]);
    let line = mount_line(&m.path).unwrap();
    assert!(line.contains("allow_other"), "the kernel's side: {line}");
    std::fs::read(m.file("management.azure.com")).expect("root reads");
    let out = as_user(1000, 1000, "cat")
        .arg(m.file("management.azure.com"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "uid 1000 is not let in");
    assert!(
        stderr(&out).contains("Permission denied"),
        "{}",
        stderr(&out)
    );
}

/// The pids of cstokenfs daemons for `mnt` (not fusermount3's auto_unmount helper).
#[test]
fn auto_unmount_leaves_no_dead_mount_after_kill_9() {
    need_fuse!();
    if !have_tool(&["/usr/bin/fusermount3", "/bin/fusermount3"], "fusermount3") {
        return;
    }
    let emu = emulator();
    let (_dir, mnt) = scratch_mountpoint();
    let _guard = KillOnDrop(mnt.clone());
    let url = emu.url();
    let out = run(&[
        "src",
        mnt.to_str().unwrap(),
        "-o",
        &format!("auto_unmount,endpoint={url},log_file=/dev/null"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line = mount_line(&mnt).expect("mounted");
    assert!(line.contains(" fuse.cstokenfs "), "{line}");
    // auto_unmount implies allow_root, which the kernel knows as allow_other.
    assert!(line.contains("allow_other"), "{line}");
    std::fs::read(mnt.join("vault.azure.net")).expect("root reads");
    // One daemon (once the detaching process is gone).
    let one = eventually(Duration::from_secs(5), || {
        let pids = daemons(&mnt);
        (pids.len() == 1).then_some(pids)
    });
    let pids = one.unwrap_or_else(|| panic!("one daemon: {:?}", daemons(&mnt)));
    // SAFETY: killing the daemon this test started.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    // fusermount3's helper unmounts once it sees the daemon gone: a fraction of a second
    // alone, but once more than 30 s with the whole suite on 2 cores, so the bound is
    // generous.
    let gone = eventually(Duration::from_secs(90), || {
        (!is_mounted(&mnt)).then_some(())
    });
    assert!(gone.is_some(), "the mount went with the daemon");
    assert!(std::fs::read_dir(&mnt).is_ok(), "no dead mount left");
}

#[test]
fn debug_stays_in_the_foreground_at_debug_level_without_fuse_request_lines() {
    need_fuse!();
    let emu = emulator();
    for (env, requests_logged) in [(None, false), (Some("trace"), true)] {
        let (dir, mnt) = scratch_mountpoint();
        let log = dir.path().join("log");
        let mut cmd = bin();
        cmd.arg("src")
            .arg(&mnt)
            .args(["-o", &format!("debug,endpoint={}", emu.url())])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if let Some(v) = env {
            cmd.env("RUST_LOG", v);
        }
        let mut child = cmd.spawn().unwrap();
        let _guard = KillOnDrop(mnt.clone());
        let live = eventually(Duration::from_secs(20), || is_mounted(&mnt).then_some(()));
        assert!(live.is_some(), "{}", std::fs::read_to_string(&log).unwrap());
        assert!(
            child.try_wait().unwrap().is_none(),
            "-o debug stays in the foreground"
        );
        std::fs::read(mnt.join("management.azure.com")).unwrap();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains(" DEBUG cstokenfs"), "debug level: {text}");
        assert_eq!(
            text.contains("FUSE("),
            requests_logged,
            "fuser's per-request lines only at trace (RUST_LOG={env:?})"
        );
    }
}

#[test]
fn options_that_cannot_do_what_was_asked_warn_and_mount() {
    need_fuse!();
    let emu = emulator();
    let (dir, mnt) = scratch_mountpoint();
    let _guard = KillOnDrop(mnt.clone());
    let log = dir.path().join("daemon.log");
    let out = run(&[
        "mount",
        "--endpoint",
        &emu.url(),
        "--uid",
        "4321",
        "--gid",
        "4321",
        "--log-file",
        log.to_str().unwrap(),
        mnt.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("warning: --uid 4321 without --allow-other")
            && err.contains("uid 4321 will be denied"),
        "{err}"
    );
    assert!(
        err.contains("warning: --gid 4321 without --allow-other"),
        "{err}"
    );
    assert!(is_mounted(&mnt));
    drop(_guard);

    let (dir, mnt) = scratch_mountpoint();
    let log = dir.path().join("unused.log");
    let mut child = cli(["mount", "-f", "--endpoint", &emu.url(), "--log-file"])
        .arg(&log)
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(mnt.clone());
    let live = eventually(Duration::from_secs(20), || is_mounted(&mnt).then_some(()));
    assert!(live.is_some());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let err = std::fs::read_to_string(dir.path().join("stderr")).unwrap();
    assert!(
        err.contains("warning: --log-file") && err.contains("logs go to stderr"),
        "{err}"
    );
}

/// Runs `script` with sh in a private mount namespace whose /dev is a tmpfs holding
/// symlinks to the real null and fuse devices, plus `/dev/log` -> `log` when given.
fn in_private_dev(dir: &Path, log: Option<&Path>, script: &str) -> Output {
    let link_log = log.map_or("true".into(), |p| format!("ln -s {} /dev/log", p.display()));
    let setup = format!(
        "set -e; mkdir -p {d}/olddev; mount --bind /dev {d}/olddev; mount -t tmpfs tmpfs /dev; \
         ln -s {d}/olddev/null /dev/null; ln -s {d}/olddev/fuse /dev/fuse; {link_log}; {script}",
        d = dir.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", &setup]);
    without_identity(&mut cmd).env_remove("RUST_LOG");
    cmd.stdin(Stdio::null()).output().expect("unshare")
}

#[test]
fn detached_without_log_file_logs_go_to_syslog_else_are_discarded_once() {
    need_fuse!();
    if !have_tool(
        &["/usr/bin/unshare", "/bin/unshare"],
        "unshare (util-linux)",
    ) {
        return;
    }
    let emu = emulator();
    let (dir, mnt) = scratch_mountpoint();
    let sock = dir.path().join("syslog.sock");
    let server = UnixDatagram::bind(&sock).unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let _guard = KillOnDrop(mnt.clone());
    let out = in_private_dev(
        dir.path(),
        Some(&sock),
        &format!(
            "exec {BIN} mount --endpoint {} {}",
            emu.url(),
            mnt.display()
        ),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("discarded"),
        "syslog is there: {}",
        stderr(&out)
    );
    let mut lines = Vec::new();
    let mut buf = vec![0u8; 8192];
    let mounted = loop {
        let Ok(n) = server.recv(&mut buf) else {
            break None;
        };
        let line = String::from_utf8_lossy(&buf[..n]).into_owned();
        lines.push(line.clone());
        if line.contains("mounted ") {
            break Some(line);
        }
    };
    let line = mounted.unwrap_or_else(|| panic!("no 'mounted' line in syslog: {lines:?}"));
    // RFC 3164: facility daemon, severity info; the program and its pid.
    assert!(line.starts_with("<30>"), "{line}");
    assert!(line.contains(" cstokenfs["), "{line}");
    drop(_guard);

    let (dir, mnt) = scratch_mountpoint();
    let _guard = KillOnDrop(mnt.clone());
    let out = in_private_dev(
        dir.path(),
        None,
        &format!(
            "exec {BIN} mount --endpoint {} {}",
            emu.url(),
            mnt.display()
        ),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stderr(&out)
            .matches("no syslog at /dev/log: logs are discarded")
            .count(),
        1,
        "{}",
        stderr(&out)
    );
}

mod failures {
    //! The cache driven directly with a source that fails as told, and a logger that keeps
    //! what is logged: a failure unlike the one before is a WARN, a recovery an INFO.
    use cstokenfs::testing::{Clock, FakeClock, Kind, Source, SourceError, Token};
    use cstokenfs::Cache;
    use cstokenfs::Policy;
    use log::Level;
    use parking_lot::Mutex;
    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::time::Duration;

    static LOGGED: Mutex<Vec<(Level, String)>> = Mutex::new(Vec::new());

    struct Keep;
    impl log::Log for Keep {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, r: &log::Record) {
            LOGGED.lock().push((r.level(), r.args().to_string()));
        }
        fn flush(&self) {}
    }

    struct Scripted {
        clock: Arc<FakeClock>,
        answers: Mutex<VecDeque<Option<&'static str>>>,
    }

    impl Source for Scripted {
        fn fetch_once(&self, _: &str, _: Duration) -> Result<Token, SourceError> {
            match self.answers.lock().pop_front().flatten() {
                Some(message) => Err(SourceError::Status {
                    status: 400,
                    message: message.into(),
                    retry_after: None,
                }),
                None => Ok(Token {
                    access_token: zeroize::Zeroizing::new("t".into()),
                    token_type: "Bearer".into(),
                    expires_on: Clock::now(&*self.clock) + 3_600_000,
                    refresh_in_ms: None,
                    not_before: None,
                }),
            }
        }
        fn endpoint(&self) -> String {
            "scripted".into()
        }
        fn kind(&self) -> Kind {
            Kind::CloudShell
        }
    }

    #[test]
    fn a_changed_failure_is_a_warning_and_a_recovery_is_info() {
        let _ = log::set_logger(&Keep);
        log::set_max_level(log::LevelFilter::Trace);
        let clock = FakeClock::new(1_700_000_000_000);
        let answers = [Some("first"), Some("first"), Some("second"), None];
        let source = Arc::new(Scripted {
            clock: clock.clone(),
            answers: Mutex::new(answers.into_iter().collect()),
        });
        let policy = Policy {
            negative_ttl_ms: 0,
            ..Policy::default()
        };
        let cache = Cache::new(
            cstokenfs::testing::Identities::one(source),
            policy,
            &[],
            clock.clone(),
        );
        let resource = "https://changed-failure.example.com";
        for _ in 0..4 {
            let _ = cache
                .get_blocking(&cstokenfs::rules::resolve("changed-failure.example.com").unwrap());
            // Past any backoff.
            clock.advance(3_600_000);
        }
        let logged: Vec<(Level, String)> = LOGGED
            .lock()
            .iter()
            .filter(|(_, m)| m.contains(resource))
            .cloned()
            .collect();
        let at = |level: Level, words: &str| {
            logged
                .iter()
                .filter(|(l, m)| *l == level && m.contains(words))
                .count()
        };
        assert_eq!(at(Level::Warn, "first"), 1, "the first failure: {logged:?}");
        assert_eq!(at(Level::Debug, "first"), 1, "the same again: {logged:?}");
        assert_eq!(at(Level::Warn, "second"), 1, "a different one: {logged:?}");
        assert_eq!(at(Level::Info, "fetched again"), 1, "recovery: {logged:?}");
    }
}

mod packaging {
    //! The files that ship with the tool say what the README says they say.
    use std::path::Path;
    use std::process::Command;

    fn read(rel: &str) -> String {
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
            .unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    #[test]
    fn the_systemd_unit_orders_after_the_network_and_keeps_the_host_mount_namespace() {
        let unit = read("scripts/cstokenfs.service");
        let active: Vec<&str> = unit
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        for want in [
            "After=network-online.target",
            "Wants=network-online.target",
            "Type=notify",
            "NoNewPrivileges=yes",
        ] {
            assert!(active.contains(&want), "{want} missing");
        }
        for key in [
            "CapabilityBoundingSet=",
            "SystemCallFilter=",
            "RestrictAddressFamilies=",
        ] {
            assert!(active.iter().any(|l| l.starts_with(key)), "{key} missing");
        }
        // Each of these gives the service a mount namespace of its own, hiding the mount.
        for key in [
            "ProtectSystem=",
            "ProtectHome=",
            "PrivateTmp=",
            "PrivateDevices=",
            "PrivateMounts=",
            "ProtectKernelTunables=",
            "ProtectKernelModules=",
            "ProtectKernelLogs=",
            "ProtectControlGroups=",
            "ReadOnlyPaths=",
            "InaccessiblePaths=",
            "TemporaryFileSystem=",
            "BindPaths=",
            "MountFlags=",
        ] {
            assert!(!active.iter().any(|l| l.starts_with(key)), "{key} present");
        }
        let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
            eprintln!("!!!!! systemd-analyze missing: the unit is not verified !!!!!");
            return;
        };
        assert!(out.status.success());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cstokenfs.service");
        std::fs::write(
            &path,
            unit.replace("/usr/local/bin/cstokenfs", crate::common::BIN),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "systemd-analyze verify: {err}");
        assert!(
            !err.contains("cstokenfs.service"),
            "systemd-analyze verify warns: {err}"
        );
    }

    #[test]
    fn license_changelog_dockerfile_fstab_and_demo() {
        let cargo = read("Cargo.toml");
        assert!(cargo.contains("license = \"MIT\""));
        assert!(read("LICENSE").starts_with("MIT License"));
        assert!(read("CHANGELOG.md").contains("## [Unreleased]"));
        let docker = read("scripts/Dockerfile");
        let froms = docker.lines().filter(|l| l.starts_with("FROM ")).count();
        assert!(froms >= 2, "multi-stage");
        for want in [
            " AS build",
            "cargo build --release --locked",
            "COPY --from=build",
            "fuse3",
            "ENTRYPOINT [\"/usr/local/bin/cstokenfs-entrypoint.sh\"]",
        ] {
            assert!(docker.contains(want), "Dockerfile lacks {want}");
        }
        let fstab = read("scripts/fstab.example");
        let line = fstab
            .lines()
            .find(|l| !l.starts_with('#') && !l.trim().is_empty())
            .unwrap();
        assert!(line.contains(" fuse.cstokenfs ") && line.contains("log_file="));
        let demo = read("scripts/demo.sh");
        assert!(
            demo.contains("cargo build --release --locked\n"),
            "the demo's build shows cargo's progress (no -q)"
        );
        let rust = cargo
            .lines()
            .find_map(|l| l.strip_prefix("rust-version = "))
            .unwrap()
            .trim_matches('"');
        assert!(
            read("README.md").contains(&format!("Rust {rust} or newer")),
            "the README states rust-version {rust}"
        );
    }

    #[test]
    fn the_readme_layout_matches_the_tree() {
        let readme = read("README.md");
        let layout = &readme[readme.find("## Layout").unwrap()..];
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for line in layout
            .lines()
            .filter(|l| l.starts_with("    ") && !l.starts_with("     "))
        {
            let first = line
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches(',');
            assert!(
                root.join(first).exists(),
                "the layout names {first}, not in the tree"
            );
        }
        for dir in ["src", "scripts"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let entry = entry.unwrap();
                let name = entry.file_name().to_string_lossy().into_owned();
                let shown = if entry.path().is_dir() {
                    format!("{dir}/{name}/")
                } else {
                    format!("{dir}/{name}")
                };
                let mentioned =
                    layout.contains(&shown) || (dir == "scripts" && layout.contains(name.as_str()));
                assert!(mentioned, "{shown} is not in the README's layout");
            }
        }
        for dir in ["tests", "tests/it"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let name = entry.unwrap().file_name().to_string_lossy().into_owned();
                let stem = name.trim_end_matches(".rs");
                assert!(
                    layout.contains(stem),
                    "{dir}/{name} is not in the README's layout"
                );
            }
        }
    }
}
