//! scripts/package.sh: the .deb, the tarball and SHA256SUMS it writes, what each holds, and
//! the .deb installed with dpkg (the binary in /usr/bin, `man cstokenfs-mount`, the bash
//! completion, `systemd-analyze verify` of the installed unit), then removed with nothing
//! left. The install needs root and dpkg (skipped loudly otherwise; a failure when
//! `CI=true`); a guard removes the package whatever happens.
//!
//! The script builds a release binary unless CSTOKENFS_BIN names one: the test packages
//! target/release/cstokenfs when it is newer than every source, else the binary this test
//! run built (unoptimised, stripped by the script), so the suite never waits for a release
//! build. The .deb is compressed with gzip -1 here (DPKG_DEB_COMPRESSOR_TYPE/_LEVEL, read
//! by dpkg-deb) instead of xz, which takes half a minute on the unoptimised binary.

use crate::common::{have_tool, BIN};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the package installs (besides directories).
const INSTALLED: [&str; 15] = [
    "/usr/bin/cstokenfs",
    "/usr/share/man/man1/cstokenfs.1.gz",
    "/usr/share/man/man1/cstokenfs-mount.1.gz",
    "/usr/share/man/man1/cstokenfs-sink.1.gz",
    "/usr/share/man/man1/cstokenfs-get.1.gz",
    "/usr/share/man/man1/cstokenfs-csi.1.gz",
    "/usr/share/man/man1/cstokenfs-emulator.1.gz",
    "/usr/share/man/man1/cstokenfs-completions.1.gz",
    "/usr/share/man/man1/cstokenfs-man.1.gz",
    "/usr/share/man/man1/cstokenfs-credential-helper.1.gz",
    "/usr/share/bash-completion/completions/cstokenfs",
    "/usr/share/zsh/vendor-completions/_cstokenfs",
    "/usr/share/fish/vendor_completions.d/cstokenfs.fish",
    "/usr/lib/systemd/system/cstokenfs.service",
    "/usr/share/doc/cstokenfs/copyright",
];

fn ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The newest modification time of the files under `path`.
fn newest(path: &Path) -> SystemTime {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut t = meta.modified().unwrap();
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            t = t.max(newest(&entry.unwrap().path()));
        }
    }
    t
}

/// target/release/cstokenfs if it is newer than every source, else this run's binary.
fn binary() -> PathBuf {
    let release = Path::new(BIN)
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("release/cstokenfs"));
    let sources = ["src", "proto", "build.rs", "Cargo.toml", "Cargo.lock"]
        .iter()
        .map(|p| newest(&Path::new(ROOT).join(p)))
        .max()
        .unwrap();
    match release {
        Some(r) if r.exists() && newest(&r) > sources => r,
        _ => {
            eprintln!(
                "package: target/release/cstokenfs is missing or older than the sources: \
                 packaging the test build {BIN}"
            );
            PathBuf::from(BIN)
        }
    }
}

/// Removes the package when dropped, so a failed check never leaves it installed.
struct Installed;

impl Installed {
    fn purge() -> Output {
        Command::new("dpkg")
            .args(["--purge", "cstokenfs"])
            .output()
            .expect("dpkg --purge")
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Installed::purge();
    }
}

/// Whether this machine can take the package: root, dpkg, the dependencies installed and
/// no cstokenfs package of someone else's. Loudly not (a failure when `CI=true`) otherwise.
fn can_install() -> bool {
    let skip = |why: &str| {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the package cannot be installed in CI: {why}"
        );
        eprintln!("\n!!!!! SKIPPED installing the package: {why} !!!!!\n");
        false
    };
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return skip("not root");
    }
    if !have_tool(&["/usr/bin/dpkg"], "dpkg") {
        return false;
    }
    for dep in ["libc6", "libgcc-s1", "fuse3"] {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", dep])
            .output()
            .expect("dpkg-query");
        if !String::from_utf8_lossy(&out.stdout).contains("install ok installed") {
            return skip(&format!("{dep}, a dependency, is not installed"));
        }
    }
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "cstokenfs"])
        .output()
        .expect("dpkg-query");
    if String::from_utf8_lossy(&out.stdout).contains("installed") {
        return skip("a cstokenfs package is already installed here; not touching it");
    }
    true
}

/// Whether dpkg is told to leave out man pages (minimised images).
fn man_pages_excluded() -> bool {
    let mut configs = vec![PathBuf::from("/etc/dpkg/dpkg.cfg")];
    if let Ok(dir) = std::fs::read_dir("/etc/dpkg/dpkg.cfg.d") {
        configs.extend(dir.flatten().map(|e| e.path()));
    }
    configs.iter().any(|c| {
        std::fs::read_to_string(c).is_ok_and(|text| {
            text.lines()
                .any(|l| l.trim_start().starts_with("path-exclude") && l.contains("/usr/share/man"))
        })
    })
}

#[test]
fn the_package_holds_everything_and_installs_and_removes_cleanly() {
    if !have_tool(&["/usr/bin/dpkg-deb"], "dpkg-deb (dpkg)")
        || !have_tool(&["/usr/bin/readelf"], "readelf (binutils)")
    {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    ok(Command::new(Path::new(ROOT).join("scripts/package.sh"))
        .arg(out.path())
        .env("CSTOKENFS_BIN", binary())
        .env("DPKG_DEB_COMPRESSOR_TYPE", "gzip")
        .env("DPKG_DEB_COMPRESSOR_LEVEL", "1"));
    let deb = format!("cstokenfs_{VERSION}_amd64.deb");
    let tarball = format!("cstokenfs-{VERSION}-x86_64-linux-gnu.tar.gz");
    let mut names: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["SHA256SUMS", &tarball, &deb]);

    // SHA256SUMS covers both and checks.
    let sums = std::fs::read_to_string(out.path().join("SHA256SUMS")).unwrap();
    assert_eq!(sums.lines().count(), 2, "{sums}");
    let checked = ok(Command::new("sha256sum")
        .args(["-c", "SHA256SUMS"])
        .current_dir(out.path()));
    assert_eq!(checked, format!("{deb}: OK\n{tarball}: OK\n"));

    // The control fields.
    let deb_path = out.path().join(&deb);
    let field = |name: &str| {
        ok(Command::new("dpkg-deb")
            .arg("--field")
            .arg(&deb_path)
            .arg(name))
        .trim()
        .to_string()
    };
    assert_eq!(field("Package"), "cstokenfs");
    assert_eq!(field("Version"), VERSION);
    assert_eq!(field("Architecture"), "amd64");
    let depends = field("Depends");
    assert!(
        depends.contains("libc6 (>= 2.34)") && depends.contains("fuse3"),
        "{depends}"
    );
    // No maintainer scripts (the unit ships disabled): --info lists the control members.
    let info = ok(Command::new("dpkg-deb").arg("--info").arg(&deb_path));
    for script in ["preinst", "postinst", "prerm", "postrm"] {
        assert!(!info.contains(script), "no {script}: {info}");
    }

    // The files, root's, where Debian puts them.
    let contents = ok(Command::new("dpkg-deb").arg("--contents").arg(&deb_path));
    for path in INSTALLED {
        let line = contents
            .lines()
            .find(|l| l.ends_with(&format!(".{path}")))
            .unwrap_or_else(|| panic!("the .deb lacks {path}:\n{contents}"));
        assert!(line.contains(" root/root "), "{line}");
    }
    // docker's name for the credential helper: a symlink to the binary.
    assert!(
        contents
            .lines()
            .any(|l| l.ends_with("./usr/bin/docker-credential-cstokenfs -> cstokenfs")),
        "the .deb lacks the docker-credential-cstokenfs symlink:\n{contents}"
    );
    let unpacked = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb_path)
        .arg(unpacked.path()));
    let unit = std::fs::read_to_string(
        unpacked
            .path()
            .join("usr/lib/systemd/system/cstokenfs.service"),
    )
    .unwrap();
    assert!(
        unit.contains("\nExecStart=/usr/bin/cstokenfs mount "),
        "{unit}"
    );
    assert!(!unit.contains("/usr/local/bin"), "{unit}");

    // The tarball: the binary, the man pages, the completions, the unit, README, LICENSE.
    let listing = ok(Command::new("tar")
        .arg("-tzf")
        .arg(out.path().join(&tarball)));
    let top = format!("cstokenfs-{VERSION}-x86_64-linux-gnu");
    for file in [
        "cstokenfs",
        "docker-credential-cstokenfs",
        "man/man1/cstokenfs.1",
        "man/man1/cstokenfs-mount.1",
        "completions/cstokenfs.bash",
        "completions/_cstokenfs",
        "completions/cstokenfs.fish",
        "cstokenfs.service",
        "README.md",
        "LICENSE",
    ] {
        assert!(
            listing.lines().any(|l| l == format!("{top}/{file}")),
            "the tarball lacks {file}:\n{listing}"
        );
    }

    if !can_install() {
        return;
    }
    let guard = Installed;
    ok(Command::new("dpkg").arg("-i").arg(&deb_path));
    let version = ok(Command::new("/usr/bin/cstokenfs").arg("--version"));
    assert_eq!(version, format!("cstokenfs {VERSION}\n"));
    // Run by that name, the binary is the credential helper (here: no mount to read).
    let helper = Command::new("/usr/bin/docker-credential-cstokenfs")
        .args(["list", "--mount", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(helper.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&helper.stdout).contains("no cstokenfs mount"));
    assert!(Path::new("/usr/share/bash-completion/completions/cstokenfs").exists());
    if man_pages_excluded() {
        eprintln!("\n!!!!! man pages are excluded by dpkg's path-exclude: man not checked !!!!!\n");
    } else if have_tool(&["/usr/bin/man"], "man (man-db)") {
        let found = ok(Command::new("man").args(["-w", "cstokenfs-mount"]));
        assert_eq!(found.trim(), "/usr/share/man/man1/cstokenfs-mount.1.gz");
        let page = ok(Command::new("man")
            .arg("cstokenfs-mount")
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80"));
        for section in [
            "SYNOPSIS",
            "OPTIONS",
            "EXIT STATUS",
            "ENVIRONMENT",
            "SIGNALS",
            "FILES",
            "EXAMPLES",
        ] {
            assert!(
                page.contains(&format!("\n{section}\n")),
                "man cstokenfs-mount lacks {section}"
            );
        }
        let words = page.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            words.contains("[--serve-endpoint ADDR]"),
            "values in the SYNOPSIS"
        );
    }
    if have_tool(&["/usr/bin/systemd-analyze"], "systemd-analyze (systemd)") {
        // --man=yes (the default): the unit's Documentation=man:cstokenfs(1) must be there.
        let out = Command::new("systemd-analyze")
            .args(["verify", "/usr/lib/systemd/system/cstokenfs.service"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "systemd-analyze verify: {err}");
        assert!(
            !err.contains("cstokenfs"),
            "systemd-analyze verify warns: {err}"
        );
    }

    let purged = Installed::purge();
    assert!(
        purged.status.success(),
        "dpkg --purge: {}",
        String::from_utf8_lossy(&purged.stderr)
    );
    drop(guard);
    for path in INSTALLED {
        assert!(
            !Path::new(path).exists(),
            "{path} is left after dpkg --purge"
        );
    }
    assert!(!Path::new("/usr/share/doc/cstokenfs").exists());
    assert!(std::fs::symlink_metadata("/usr/bin/docker-credential-cstokenfs").is_err());
}
