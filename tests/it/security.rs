//! Issue 4: access control, secrets, and container lifecycle, on real mounts.

use crate::common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Runs `cat path` as another uid/gid (no supplementary groups).
fn cat_as(uid: u32, gid: u32, path: &Path) -> Output {
    as_user(uid, gid, "cat")
        .arg(path)
        .output()
        .expect("setpriv (util-linux)")
}

/// Lets other users walk to the mount point (tempdirs are 0700).
fn open_up(m: &Mounted) {
    std::fs::set_permissions(m.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn other_uids_are_denied_by_default() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &[]);
    open_up(&m);
    m.read("management.azure.com").unwrap();
    let out = cat_as(1000, 1000, &m.file("management.azure.com"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    assert!(out.stdout.is_empty());
}

#[test]
fn allow_other_with_uid_lets_that_user_read_and_no_one_else() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &["--allow-other", "--uid", "1000"]);
    open_up(&m);
    let root_copy = m
        .read("management.azure.com")
        .expect("root can always read");
    let out = cat_as(1000, 1000, &m.file("management.azure.com"));
    assert!(
        out.status.success(),
        "uid 1000: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_token(&out.stdout, &root_copy, "uid 1000 reads the token");
    let out = cat_as(1001, 1000, &m.file("management.azure.com"));
    assert!(!out.status.success(), "uid 1001 is denied");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(m.file("management.azure.com")).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (1000, 0o400));
}

#[test]
fn group_mode_with_gid() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(
        &emu.url(),
        &[
            "--allow-other",
            "--uid",
            "1000",
            "--gid",
            "2000",
            "--mode",
            "440",
        ],
    );
    open_up(&m);
    let f = m.file("vault.azure.net");
    assert!(
        cat_as(1001, 2000, &f).status.success(),
        "a member of gid 2000 reads"
    );
    assert!(
        !cat_as(1001, 3000, &f).status.success(),
        "another group does not"
    );
    assert_eq!(
        std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
        0o440
    );
    assert_eq!(
        std::fs::metadata(&m.path).unwrap().permissions().mode() & 0o777,
        0o550
    );
}

#[test]
fn dash_o_options_are_parsed() {
    need_fuse!();
    let emu = emulator();
    let opts = "foreground,allow_other,uid=1000,gid=1000,mode=0440,refresh_margin=120,negative_ttl=7,timeout=3";
    let m = Mounted::new(&emu.url(), &["-o", opts]);
    let meta = std::fs::metadata(m.file("management.azure.com")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o777),
        (1000, 1000, 0o440)
    );
    let status: serde_json::Value = serde_json::from_slice(&m.read(".status").unwrap()).unwrap();
    assert_eq!(
        (
            status["refresh_margin"].as_i64(),
            status["negative_ttl"].as_i64()
        ),
        (Some(120), Some(7))
    );
    assert_eq!(status["timeout"], 3);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.contains(m.path.to_str().unwrap()))
        .unwrap();
    for opt in [
        "ro",
        "nosuid",
        "nodev",
        "noexec",
        "allow_other",
        "default_permissions",
    ] {
        assert!(
            line.split([' ', ',']).any(|o| o == opt),
            "{opt} missing: {line}"
        );
    }
}

#[test]
fn fuse_style_command_line_and_bad_options() {
    need_fuse!();
    let emu = emulator();
    let (dir, mnt) = scratch_mountpoint();
    let out = bin()
        .arg("mytokens")
        .arg(&mnt)
        .args([
            "-o",
            &format!(
                "rw,dev,suid,nofail,_netdev,x-systemd.automount,endpoint={}",
                emu.url()
            ),
        ])
        .output()
        .unwrap();
    let _guard = KillOnDrop(mnt.clone());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.contains(mnt.to_str().unwrap()))
        .unwrap()
        .to_string();
    assert!(
        line.contains(" mytokens "),
        "SOURCE is the name in the mount table: {line}"
    );
    assert!(
        line.contains("ro,") || line.contains(" ro "),
        "still read-only despite rw: {line}"
    );
    std::fs::read(mnt.join("management.azure.com")).unwrap();
    for bad in ["bogus=1", "uid", "mode=999"] {
        let out = bin()
            .arg("src")
            .arg(dir.path())
            .args(["-o", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
    }
}

#[test]
fn fstab_line_mounts_through_mount_fuse3_and_umount_unmounts() {
    need_fuse!();
    if !have_tool(
        &["/sbin/mount.fuse3", "/usr/sbin/mount.fuse3"],
        "mount.fuse3 (fuse3)",
    ) {
        return;
    }
    // mount.fuse3 runs `cstokenfs` with a bare PATH: link the built binary where it looks.
    let link = Path::new("/usr/local/bin/cstokenfs");
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(BIN, link).expect("link the binary into /usr/local/bin");
    let emu = emulator();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mnt = dir.path().join("cstoken");
    std::fs::create_dir(&mnt).unwrap();
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/fstab.example"
    ))
    .unwrap();
    let line = example
        .lines()
        .find(|l| !l.starts_with('#') && !l.trim().is_empty())
        .unwrap();
    let log = dir.path().join("cstokenfs.log");
    let line = line
        .replace("/var/log/cstokenfs.log", log.to_str().unwrap())
        .replace("/run/cstoken", mnt.to_str().unwrap())
        .replace(
            "allow_other,uid=1000",
            &format!("allow_other,uid=1000,endpoint={}", emu.url()),
        );
    let fstab = dir.path().join("fstab");
    std::fs::write(&fstab, format!("{line}\n")).unwrap();
    let _guard = KillOnDrop(mnt.clone());
    let out = Command::new("mount")
        .arg("-T")
        .arg(&fstab)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount -T: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&mnt));
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.contains(&format!(" {} ", mnt.display())))
        .unwrap();
    assert!(
        line.starts_with("cstoken ") && line.contains(" fuse.cstokenfs "),
        "SOURCE and the type fstab names: {line}"
    );
    let logged = eventually(Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("mounted "))
    });
    assert!(logged.is_some(), "fstab's log_file= gets the daemon's logs");
    let out = cat_as(1000, 1000, &mnt.join("management.azure.com"));
    assert!(
        out.status.success(),
        "uid 1000 reads: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(claims(&out.stdout)["aud"], "https://management.azure.com/");
    let out = Command::new("umount").arg(&mnt).output().unwrap();
    assert!(
        out.status.success(),
        "umount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&mnt));
    let gone = eventually(Duration::from_secs(5), || {
        let p = Command::new("pgrep")
            .args(["-f", &format!("cstokenfs.*{}", mnt.display())])
            .output()
            .ok()?;
        let live = String::from_utf8_lossy(&p.stdout)
            .lines()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
            .any(|stat| !stat.contains(") Z "));
        (!live).then_some(())
    });
    assert!(gone.is_some(), "the daemon exits after umount");
}

#[test]
fn kill_9_then_mount_again_over_the_stale_mount() {
    need_fuse!();
    let emu = emulator();
    let (_dir, mnt) = scratch_mountpoint();
    let _guard = KillOnDrop(mnt.clone());
    let mount = || {
        cli(["mount", "--endpoint", &emu.url()])
            .arg(&mnt)
            .output()
            .unwrap()
    };
    assert!(mount().status.success());
    let pid = Command::new("pgrep")
        .args(["-f", &format!("cstokenfs.*{}", mnt.display())])
        .output()
        .unwrap();
    let pid: i32 = String::from_utf8_lossy(&pid.stdout)
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // SAFETY: killing the daemon we started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let stale = eventually(Duration::from_secs(5), || {
        let e = std::fs::metadata(&mnt).err()?;
        (errno(&e) == libc::ENOTCONN).then_some(())
    });
    assert!(stale.is_some(), "a dead FUSE mount is left behind");
    let out = mount();
    assert!(
        out.status.success(),
        "mount over the stale mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(mnt.join("management.azure.com")).expect("the new mount serves tokens");
}

#[test]
fn sigterm_with_a_reader_holding_a_file_open() {
    need_fuse!();
    let emu = emulator();
    let mut m = Mounted::new(&emu.url(), &[]);
    let held = std::fs::File::open(m.file("management.azure.com")).unwrap();
    let dir = std::fs::read_dir(&m.path).unwrap();
    m.signal(libc::SIGTERM);
    assert_eq!(m.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        !is_mounted(&m.path),
        "lazily detached while a file was open"
    );
    drop((held, dir));
}

#[test]
fn status_reports_the_daemon_not_dumpable() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &[]);
    let status = m.status();
    // The daemon itself answers, from PR_GET_DUMPABLE.
    assert_eq!(status["pid"], m.pid());
    assert_eq!(status["dumpable"], false);
}

#[test]
fn audit_line_names_the_reader() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &["--allow-other"]);
    open_up(&m);
    let child = Command::new("cat")
        .arg(m.file("vault.azure.net"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let line = eventually(Duration::from_secs(5), || {
        m.log_text()
            .lines()
            .find(|l| l.contains("audit:") && l.contains(&format!("pid {pid} ")))
            .map(str::to_string)
    })
    .expect("an audit line for the reader");
    assert!(
        line.contains("https://vault.azure.net") && line.contains("uid 0 gid 0"),
        "{line}"
    );
    assert!(line.contains("exe /"), "{line}");
    assert!(!line.contains("eyJ"), "no token in the audit line");
}

#[test]
fn systemd_readiness_is_sent_once_live() {
    need_fuse!();
    let emu = emulator();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let m = Mounted::with_env(
        &emu.url(),
        &[],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("a notification");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(is_mounted(&m.path));
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/cstokenfs.service"
    ))
    .unwrap();
    assert!(
        unit.contains("Type=notify") && unit.contains("cstokenfs mount -f"),
        "the unit waits for READY=1"
    );
}

#[test]
fn sighup_reopens_the_log_file() {
    need_fuse!();
    let emu = emulator();
    let (dir, mnt) = scratch_mountpoint();
    let log = dir.path().join("cstokenfs.log");
    let _guard = KillOnDrop(mnt.clone());
    let out = cli([
        "mount",
        "--endpoint",
        &emu.url(),
        "--log-file",
        log.to_str().unwrap(),
    ])
    .arg(&mnt)
    .output()
    .unwrap();
    assert!(out.status.success());
    std::fs::rename(&log, dir.path().join("cstokenfs.log.1")).unwrap();
    let _ = Command::new("pkill")
        .args(["-HUP", "-f", &format!("cstokenfs.*{}", mnt.display())])
        .status();
    let reopened = eventually(Duration::from_secs(5), || log.exists().then_some(()));
    assert!(reopened.is_some(), "SIGHUP created the log file anew");
    std::fs::read(mnt.join("management.azure.com")).unwrap();
    let text = eventually(Duration::from_secs(5), || {
        let t = std::fs::read_to_string(&log).ok()?;
        t.contains("audit:").then_some(t)
    });
    assert!(text.is_some(), "logging continues in the new file");
}

#[test]
fn mount_errors_name_the_fix() {
    need_fuse!();
    // /dev/fuse missing: a private mount namespace with an empty /dev.
    let (_dir, mnt) = scratch_mountpoint();
    let script = format!(
        "mount -t tmpfs none /dev && exec {BIN} mount -f --endpoint http://127.0.0.1:1/x {}",
        mnt.display()
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("/dev/fuse") && err.contains("--device /dev/fuse --cap-add SYS_ADMIN"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // Not empty: a warning, not an error.
    std::fs::write(mnt.join("hidden"), b"x").unwrap();
    let emu = emulator();
    let out = cli(["mount", "--endpoint", &emu.url()])
        .arg(&mnt)
        .output()
        .unwrap();
    let _guard = KillOnDrop(mnt.clone());
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
}

#[test]
fn entrypoint_snippet_mounts_for_the_target_user_and_execs() {
    need_fuse!();
    let link = Path::new("/usr/local/bin/cstokenfs");
    if !link.exists() {
        let _ = std::os::unix::fs::symlink(BIN, link);
    }
    let emu = emulator();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mnt = dir.path().join("run-cstoken");
    let _guard = KillOnDrop(mnt.clone());
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/cstokenfs-entrypoint.sh"
    ))
    .env(
        "PATH",
        format!(
            "{}:/usr/bin:/bin",
            Path::new(BIN).parent().unwrap().display()
        ),
    )
    .env("CSTOKEN_MOUNT", &mnt)
    .env("CSTOKEN_UID", "1000")
    .env("CSTOKEN_GID", "1000")
    .env("CSTOKEN_LOG", dir.path().join("log"))
    .env("CSTOKEN_ARGS", format!("--endpoint {}", emu.url()))
    .args(setpriv_args(1000, 1000))
    .arg("cat")
    .arg(mnt.join("management.azure.com"))
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(claims(&out.stdout)["aud"], "https://management.azure.com/");
}
