//! Issue 19: another user who can write DIR races the sink (symlinks and directories
//! swapped in while it starts, rotates, takes SIGUSR1/SIGHUP and exits, or is killed);
//! nothing outside DIR may be created, changed or removed.

use crate::common;
use crate::sink_support;

use common::*;
use sink_support::*;
use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const VAULT: &str = "vault.azure.net";

/// Runs as nobody until killed or its time is up: each round swaps one of the sink's names
/// (a view directory, a file, a temporary file, the lock, `.status`) for a symlink into the
/// victim directory or for a directory of its own, waits a moment, and mostly puts it back.
const ATTACKER: &str = r#"
import os, random, sys, time
d, victim, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.time() + secs
views = ['.json', '.header', '.kubectl', '.git-credential']
names = ['vault.azure.net', '.vault.azure.net.cstokenfs-tmp', '.status',
         '..status.cstokenfs-tmp', '.cstokenfs-sink.lock']
secret = os.path.join(victim, 'secret')
def q(f, *a):
    try:
        f(*a)
    except OSError:
        pass
def nap():
    time.sleep(random.random() * 0.004)
while time.time() < end:
    time.sleep(random.random() * 0.01)
    v = os.path.join(d, random.choice(views))
    n = os.path.join(random.choice([d, v]), random.choice(names))
    op = random.randrange(6)
    q(os.chmod, d, 0o777); q(os.chmod, v, 0o777)
    if op == 0:    # a view directory becomes a symlink to a root-only directory
        q(os.rename, v, v + '.away'); q(os.symlink, secret, v); nap()
        q(os.unlink, v); q(os.rename, v + '.away', v)
    elif op == 1:  # a view directory appears as a symlink before the sink makes it
        q(os.symlink, secret, v); nap(); q(os.unlink, v)
    elif op == 2:  # a file becomes a symlink to a root file
        target = os.path.join(secret, random.choice(names))
        q(os.rename, n, n + '.away'); q(os.symlink, target, n); nap()
        q(os.unlink, n); q(os.rename, n + '.away', n)
    elif op == 3:  # a view directory replaced by one of ours
        q(os.rename, v, v + '.away'); q(os.mkdir, v); nap()
        q(os.rmdir, v); q(os.rename, v + '.away', v)
    elif op == 4:  # a symlink to a root file left at a name
        q(os.symlink, os.path.join(victim, 'file'), n); nap(); q(os.unlink, n)
    else:          # a view directory moved away and back
        q(os.rename, v, v + '.away'); nap(); q(os.rename, v + '.away', v)
"#;

/// Every entry under `dir` (not following symlinks): owner, mode, size and a hash of the
/// bytes (never the bytes: they are compared, not shown).
fn snapshot(dir: &Path) -> BTreeMap<String, (u32, u32, u32, u64, u64)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let mut h = DefaultHasher::new();
        if m.is_file() {
            std::fs::read(&p).unwrap().hash(&mut h);
        } else if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        }
        let rel = p.strip_prefix(dir).unwrap().display().to_string();
        out.insert(rel, (m.uid(), m.gid(), m.mode(), m.len(), h.finish()));
    }
    out
}

/// Removes whatever the attacker left in `dir` (as root, never following a symlink).
fn clear(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let _ = if e.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
    }
}

#[test]
fn another_user_racing_inside_dir_never_reaches_outside_it() {
    let emu = emulator();
    emu.set_ttl(6);
    let fs = Tmpfs::with_options("mode=0777,size=1m");
    // Outside DIR, root's: a 0600 file and a root-only directory holding the sink's names.
    let victim = tempfile::tempdir().unwrap();
    std::fs::write(victim.path().join("file"), b"root's file").unwrap();
    let secret = victim.path().join("secret");
    std::fs::create_dir(&secret).unwrap();
    for name in [VAULT, ".vault.azure.net.cstokenfs-tmp", ".status"] {
        std::fs::write(secret.join(name), format!("root's {name}")).unwrap();
    }
    for p in [victim.path().join("file"), secret.join(VAULT)] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o700)).unwrap();
    let before = snapshot(victim.path());

    // The race runs 12 s, and on until at least 10 sinks ran and 3 served a token (the
    // attacker's script runs for the cap and is killed when done).
    let (total, cap) = (Duration::from_secs(12), Duration::from_secs(40));
    let mut attacker = Command::new("python3")
        .arg("-c")
        .arg(ATTACKER)
        .arg(&fs.path)
        .arg(victim.path())
        .arg(cap.as_secs().to_string())
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .spawn()
        .expect("python3");
    let start = Instant::now();
    let (mut runs, mut served) = (0u32, 0u32);
    let mut endings: BTreeMap<String, u32> = BTreeMap::new();
    while start.elapsed() < total || (runs < 10 || served < 3) && start.elapsed() < cap {
        runs += 1;
        let log = tempfile::NamedTempFile::new().unwrap();
        let args = [
            "-f",
            "--resource",
            VAULT,
            "--uid",
            "65534",
            "--refresh-margin",
            "3",
        ];
        let mut sink = sink_cmd(&emu.url(), &fs.path, &args)
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        // Signals at varying points of its life: while starting, writing, rotating.
        let step = Duration::from_millis(20 + 80 * u64::from(runs % 7));
        let last = if runs % 4 == 0 {
            libc::SIGKILL
        } else {
            libc::SIGTERM
        };
        let mut seen = false;
        for sig in [libc::SIGUSR1, libc::SIGHUP, libc::SIGUSR1, last] {
            let until = Instant::now() + step;
            while Instant::now() < until {
                seen |= fs.path.join(VAULT).exists();
                std::thread::sleep(Duration::from_millis(10));
            }
            // SAFETY: signalling our own child.
            unsafe { libc::kill(sink.id() as i32, sig) };
        }
        served += u32::from(seen);
        let exited = eventually(Duration::from_secs(10), || sink.try_wait().ok().flatten());
        if exited.is_none() {
            let _ = sink.kill();
            let _ = sink.wait();
            panic!("run {runs}: the sink did not exit");
        }
        // The sink's last line: why it stopped (no token bytes are ever logged).
        let text = std::fs::read_to_string(log.path()).unwrap_or_default();
        let last: String = text.lines().last().unwrap_or("").chars().skip(24).collect();
        *endings.entry(last).or_insert(0) += 1;
        // Now and then a clean DIR, so that sinks start and serve under attack, not only
        // refuse a DIR the attacker left names in.
        if runs % 2 == 0 {
            clear(&fs.path);
        }
    }
    let _ = attacker.kill();
    let _ = attacker.wait();
    let after = snapshot(victim.path());
    let changed: std::collections::BTreeSet<_> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .collect();
    assert!(changed.is_empty(), "changed outside DIR: {changed:?}");
    assert!(
        runs >= 10 && served >= 3,
        "{runs} runs, {served} served a token; the sinks' last lines: {endings:#?}"
    );
}
