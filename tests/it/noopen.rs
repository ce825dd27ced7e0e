//! Issue 12: `--no-open`, where the kernel answers opens itself. Real mounts of the built
//! binary against the in-process emulator on 127.0.0.1; every freshness rule still holds.

use crate::common;

use common::*;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

const ARM: &str = "https://management.azure.com/";

fn mount(emu: &cstokenfs::emulator::Emulator, extra: &[&str]) -> Mounted {
    let mut args = vec!["--no-open"];
    args.extend_from_slice(extra);
    no_open_mount(&emu.url(), &args)
}

/// A no-open mount once the daemon's own first open and close is over (the mount table
/// shows the mount before it: a reader's open racing it would reach the daemon too).
fn no_open_mount(url: &str, args: &[&str]) -> Mounted {
    let m = Mounted::with_env(url, args, &[("RUST_LOG", "debug")]);
    m.wait_log("first open", Duration::from_secs(10))
        .expect("the daemon's first open and close");
    m
}

/// `.status`'s OPEN, FLUSH and RELEASE counts.
fn fuse_requests(m: &Mounted) -> (u64, u64, u64) {
    let r = &m.status()["fuse_requests"];
    let n = |k: &str| r[k].as_u64().expect("a count");
    (n("open"), n("flush"), n("release"))
}

/// Drops the kernel's cached pages of an open file, so its next read reaches the daemon.
fn drop_pages(f: &std::fs::File) {
    // SAFETY: posix_fadvise on a descriptor we own; it only drops clean cached pages.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
}

#[test]
fn many_rollovers_read_by_several_readers_never_serve_an_expired_token() {
    need_fuse!();
    let emu = emulator();
    emu.set_ttl(5);
    let m = mount(&emu, &["--refresh-margin", "2"]);
    let path = m.file("management.azure.com");
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                // Until this reader has seen three rollovers (about 10 s), at most 40 s.
                let end = Instant::now() + Duration::from_secs(40);
                let (mut reads, mut serials) = (0u64, Vec::new());
                while Instant::now() < end && (serials.len() < 4 || reads <= 100) {
                    let token = std::fs::read(&path).expect("a token in use is always served");
                    let c = claims(&token);
                    let exp = c["exp"].as_i64().expect("exp");
                    assert!(exp > now_secs(), "an expired token was served");
                    let s = c["serial"].as_u64().expect("serial");
                    if serials.last() != Some(&s) {
                        serials.push(s);
                    }
                    reads += 1;
                    std::thread::sleep(Duration::from_millis(3));
                }
                (reads, serials)
            })
        })
        .collect();
    for r in readers {
        let (reads, serials) = r.join().expect("a reader failed");
        assert!(reads > 100, "{reads} reads");
        assert!(
            serials.len() >= 4,
            "each reader saw at least three rollovers: {serials:?}"
        );
        assert!(
            serials.windows(2).all(|w| w[0] < w[1]),
            "never an older token after a newer one: {serials:?}"
        );
    }
}

#[test]
fn a_new_token_reaches_a_reader_after_the_refresh_point() {
    need_fuse!();
    let emu = emulator();
    emu.set_ttl(10);
    let m = mount(&emu, &["--refresh-margin", "5"]);
    let first = m.read("management.azure.com").unwrap();
    let exp = claims(&first)["exp"].as_i64().unwrap();
    // The refresh point is 5 s before expiry; the new token reaches readers within about a
    // second after it (bounded wait: well before the old one expires).
    let newer = eventually(Duration::from_secs(9), || {
        let t = m.read("management.azure.com").unwrap();
        (serial(&t) > serial(&first)).then_some(t)
    })
    .expect("a new token after the refresh point");
    assert!(claims(&newer)["exp"].as_i64().unwrap() > exp);
    assert!(
        now_secs() < exp,
        "the new token came before the old one expired"
    );
}

#[test]
fn sigusr1_then_a_read_gives_a_new_token() {
    need_fuse!();
    let emu = emulator();
    let m = mount(&emu, &[]);
    let a = m.read("management.azure.com").unwrap();
    let json_a = m.read(".json/management.azure.com").unwrap();
    assert_eq!(m.read("management.azure.com").unwrap(), a, "cached");
    m.signal(libc::SIGUSR1);
    // Handled once the tokens are dropped and the kernel has forgotten their names.
    m.wait_log(
        "the kernel forgot every token name it held",
        Duration::from_secs(5),
    )
    .expect("SIGUSR1 handled");
    let b = m.read("management.azure.com").unwrap();
    assert!(
        serial(&b) > serial(&a),
        "the read after SIGUSR1 got a new token"
    );
    let json_b = m.read(".json/management.azure.com").unwrap();
    assert_ne!(json_a, json_b, "every view follows");
    assert_eq!(emu.requests_for(ARM), 2);
}

#[test]
fn a_second_open_after_a_refresh_sees_the_new_version_and_an_older_fd_its_own_whole() {
    need_fuse!();
    let emu = emulator();
    emu.set_ttl(8);
    let m = mount(&emu, &["--refresh-margin", "4"]);
    let mut old = std::fs::File::open(m.file("management.azure.com")).unwrap();
    let mut head = vec![0u8; 10];
    old.read_exact(&mut head).unwrap();
    let newer = eventually(Duration::from_secs(8), || {
        let t = m.read("management.azure.com").unwrap();
        (serial(&t) > 1).then_some(t)
    })
    .expect("a refresh happened");
    // The old fd's pages dropped: the rest comes from the daemon, by inode, from the
    // version the fd was opened on (pinned), not from the new one.
    drop_pages(&old);
    let mut rest = Vec::new();
    old.read_to_end(&mut rest).unwrap();
    head.extend_from_slice(&rest);
    assert_eq!(
        serial(&head),
        1,
        "one open sees one token, first byte to last"
    );
    let mut again = Vec::new();
    std::fs::File::open(m.file("management.azure.com"))
        .unwrap()
        .read_to_end(&mut again)
        .unwrap();
    assert_same_token(&again, &newer, "a second open after the refresh");
}

#[test]
fn status_lists_a_resource_read_after_it_was_last_opened() {
    need_fuse!();
    let emu = emulator();
    emu.set_allow_any(true);
    let m = mount(&emu, &["--max-upstream-rate", "0"]);
    let names = |m: &Mounted| -> Vec<String> {
        m.status()["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["resource"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(names(&m).is_empty());
    // A file held open across the changes does not keep the kernel from seeing them.
    let held = std::fs::File::open(m.file(".status")).unwrap();
    for i in 0..20 {
        let name = format!("r{i}.example.com");
        m.read(&name).unwrap();
        let listed = names(&m);
        assert!(
            listed.contains(&format!("https://{name}")),
            "{name} read after .status was last opened: {listed:?}"
        );
        assert_eq!(listed.len(), i + 1);
    }
    let mut text = String::new();
    let mut f = std::fs::File::open(m.file(".status")).unwrap();
    f.read_to_string(&mut text).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).expect("whole JSON");
    drop(held);
}

#[test]
fn after_the_first_open_and_close_no_open_flush_or_release_reaches_the_daemon() {
    need_fuse!();
    let emu = emulator();
    // The `-o` form of the flag.
    let m = no_open_mount(&emu.url(), &["-o", "no_open"]);
    assert_eq!(m.status()["no_open"], true);
    let first = fuse_requests(&m);
    assert_eq!(first, (1, 1, 0), "the daemon's own first open and close");
    for _ in 0..50 {
        m.read("management.azure.com").unwrap();
        m.read(".header/management.azure.com").unwrap();
        m.read(".claims/management.azure.com").unwrap();
        m.status();
    }
    let f = std::fs::File::open(m.file("vault.azure.net")).unwrap();
    let mut buf = [0u8; 16];
    f.read_at(&mut buf, 4).unwrap();
    drop(f);
    std::fs::read_dir(&m.path).unwrap().for_each(drop);
    assert_eq!(
        fuse_requests(&m),
        first,
        "no OPEN, FLUSH or RELEASE after the first"
    );

    let plain = Mounted::new(&emu.url(), &[]);
    let status = plain.status();
    assert_eq!(status["no_open"], false);
    assert!(
        status.get("fuse_requests").is_none(),
        "counts only with --no-open"
    );
}

#[test]
fn the_audit_names_the_reader_on_lookup() {
    need_fuse!();
    let emu = emulator();
    let m = mount(&emu, &[]);
    let out = std::process::Command::new("cat")
        .arg(m.file(".header/vault.azure.net"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let line = eventually(Duration::from_secs(5), || {
        m.log_text()
            .lines()
            .find(|l| l.contains("audit: lookup of https://vault.azure.net (header)"))
            .map(str::to_string)
    })
    .expect("an audit line for the lookup");
    assert!(line.contains("exe ") && line.contains("cat"), "{line}");
    assert!(line.contains("uid 0"), "{line}");
    assert!(
        !m.log_text().contains("audit: open of"),
        "no opens reach the daemon"
    );
    assert_no_token(&m.log_text(), &out.stdout, "the log");
}

#[test]
fn an_fd_held_past_expiry_gets_eio_never_an_empty_read() {
    need_fuse!();
    let emu = emulator();
    emu.set_ttl(4);
    let m = mount(&emu, &[]);
    let f = std::fs::File::open(m.file("management.azure.com")).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = f.read_at(&mut buf, 0).unwrap();
    let exp = claims(&buf[..n])["exp"].as_i64().unwrap();
    // Nobody else reads: no refresh; the version expires (validity ends 0.4 s before exp).
    wait_until_epoch(exp);
    for _ in 0..3 {
        let err = f
            .read_at(&mut buf, 0)
            .expect_err("an expired token was read");
        assert_eq!(errno(&err), libc::EIO, "{err}");
    }
    let fresh = m.read("management.azure.com").unwrap();
    assert!(
        claims(&fresh)["exp"].as_i64().unwrap() > now_secs(),
        "a new open gets a new one"
    );
}
