//! The filesystem core driven directly, without FUSE or a network (the model:
//! mountpoint-s3's `tests/fs.rs`): lookups, opens, reads, attributes and listings against a
//! fake clock and a fake source. Runs anywhere, /dev/fuse or not.

use cstokenfs::inode::{self, Node};
use cstokenfs::testing::{FakeClock, FakeSource, Identities, IdentityId, Key};
use cstokenfs::Cache;
use cstokenfs::Policy;
use cstokenfs::{Access, Caller, Core, Entry, FsError};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

const ARM: &str = "management.azure.com";
const HOUR: i64 = 3_600_000;

struct Fixture {
    core: Arc<Core>,
    cache: Arc<Cache>,
    clock: Arc<FakeClock>,
    source: Arc<FakeSource>,
}

fn fixture_with(policy: Policy, declared: &[&str]) -> Fixture {
    let clock = FakeClock::new(1_700_000_000_000);
    let source = FakeSource::new(clock.clone(), HOUR);
    let declared: Vec<Key> = declared
        .iter()
        .map(|n| Key::new(IdentityId::DEFAULT, cstokenfs::rules::resolve(n).unwrap()))
        .collect();
    let cache = Cache::new(
        Identities::one(source.clone()),
        policy,
        &declared,
        clock.clone(),
    );
    let access = Access {
        uid: 1000,
        gid: 1000,
        file_mode: 0o400,
    };
    let core = Core::new(cache.clone(), access, None, "test");
    Fixture {
        core,
        cache,
        clock,
        source,
    }
}

fn fixture() -> Fixture {
    fixture_with(Policy::default(), &[])
}

const READER: Caller = Caller {
    pid: 1,
    uid: 1000,
    gid: 1000,
};

impl Fixture {
    /// A lookup as the kernel makes it; the answer may come from a fetch thread.
    fn lookup(&self, parent: u64, name: &str) -> Result<Entry, FsError> {
        let (tx, rx) = mpsc::channel();
        self.core
            .lookup(parent, name, READER, move |r| drop(tx.send(r)));
        rx.recv_timeout(Duration::from_secs(10))
            .expect("every lookup is answered")
    }

    fn ino(&self, name: &str) -> u64 {
        self.lookup(inode::ROOT, name).expect("lookup").attr.ino.0
    }

    /// open + read of the whole file + release.
    fn cat(&self, ino: u64) -> Result<Vec<u8>, FsError> {
        let (fh, _) = self.core.open(ino, READER)?;
        let bytes = self.core.read(ino, fh, 0, 1 << 20, <[u8]>::to_vec);
        self.core.release(fh);
        bytes
    }

    fn listing(&self, ino: u64) -> Vec<String> {
        let fh = self.core.opendir(ino).expect("opendir");
        let names = self
            .core
            .readdir(fh)
            .expect("readdir")
            .iter()
            .map(|(_, _, n)| n.clone())
            .collect();
        self.core.release(fh);
        names
    }
}

#[test]
fn a_lookup_fetches_once_and_the_file_reads_the_token_whole() {
    let f = fixture();
    let entry = f.lookup(inode::ROOT, ARM).unwrap();
    assert!(matches!(
        inode::node(entry.attr.ino.0),
        Some(Node::Token { .. })
    ));
    let token = f.cat(entry.attr.ino.0).unwrap();
    assert_eq!(token, b"token-1");
    assert_eq!(entry.attr.size, token.len() as u64, "st_size is exact");
    assert_eq!(f.core.getattr(entry.attr.ino.0).unwrap().attr.size, 7);
    assert!(entry.ttl > Duration::ZERO && entry.ttl <= Duration::from_secs(60));
    // Views of the same version.
    let json = f.lookup(inode::view_dir_ino(cstokenfs::View::Json), ARM);
    let json = f.cat(json.unwrap().attr.ino.0).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(doc["access_token"], "token-1");
    assert_eq!(f.source.calls(), 1, "one upstream call for every view");
}

#[test]
fn a_superseded_version_is_stale_for_new_opens_but_an_open_file_keeps_it() {
    let f = fixture();
    let old = f.ino(ARM);
    let (held, _) = f.core.open(old, READER).unwrap();
    // Past the refresh point: the next open starts a refresh in the background.
    f.clock.advance(HOUR - 300_000);
    f.core.release(f.core.open(old, READER).unwrap().0);
    assert!(f.cache.wait_until_settled(Duration::from_secs(10)));
    assert_eq!(f.source.calls(), 2);
    let new = f.ino(ARM);
    assert_ne!(new, old, "a new version");
    assert_eq!(f.core.open(old, READER).unwrap_err(), FsError::Stale);
    assert_eq!(f.cat(new).unwrap(), b"token-2");
    let kept = f.core.read(old, held, 0, 4096, <[u8]>::to_vec).unwrap();
    assert_eq!(kept, b"token-1", "an open file reads its version whole");
    assert_eq!(
        f.core.getattr(old).unwrap().ttl,
        Duration::ZERO,
        "the kernel must not keep a superseded name"
    );
}

#[test]
fn an_open_file_gets_eio_once_its_version_expires() {
    let f = fixture();
    let ino = f.ino(ARM);
    let (fh, _) = f.core.open(ino, READER).unwrap();
    f.clock.advance(HOUR - 5_000);
    assert_eq!(
        f.core.read(ino, fh, 0, 4096, <[u8]>::to_vec).unwrap_err(),
        FsError::Io
    );
    assert_eq!(f.core.open(ino, READER).unwrap_err(), FsError::Stale);
}

#[test]
fn the_kernels_retry_of_a_failed_revalidation_costs_no_second_fetch() {
    let policy = Policy {
        timeout: Duration::from_millis(300),
        ..Policy::default()
    };
    let f = fixture_with(policy, &[]);
    f.ino(ARM);
    f.clock.advance(2 * HOUR);
    f.source.set_down(true);
    assert_eq!(f.lookup(inode::ROOT, ARM).unwrap_err(), FsError::Io);
    let calls = f.source.calls();
    // The kernel looks the name up again at once, for the same read.
    assert_eq!(f.lookup(inode::ROOT, ARM).unwrap_err(), FsError::Io);
    assert_eq!(
        f.source.calls(),
        calls,
        "answered from the failed revalidation"
    );
}

#[test]
fn refusals_are_enoent_and_remembered() {
    let f = fixture();
    f.source.refuse("https://nope.example.com");
    assert_eq!(
        f.lookup(inode::ROOT, "nope.example.com").unwrap_err(),
        FsError::NotFound
    );
    assert_eq!(
        f.lookup(inode::ROOT, "nope.example.com").unwrap_err(),
        FsError::NotFound
    );
    assert_eq!(f.source.calls(), 1);
    // A name that is not a resource never reaches the source.
    for bad in ["localhost", "", ".hidden", "a\u{1}b"] {
        assert_eq!(
            f.lookup(inode::ROOT, bad).unwrap_err(),
            FsError::NotFound,
            "{bad:?}"
        );
    }
    assert_eq!(f.source.calls(), 1);
}

#[test]
fn listings_show_declared_and_held_names_and_eviction_keeps_the_bound() {
    let policy = Policy {
        max_resources: 3,
        max_upstream_rate: 0,
        ..Policy::default()
    };
    let f = fixture_with(policy, &["vault.azure.net"]);
    let root = f.listing(inode::ROOT);
    for name in [".", "..", ".json", ".header", ".status", "vault.azure.net"] {
        assert!(root.contains(&name.to_string()), "{name} in {root:?}");
    }
    for i in 0..5 {
        f.ino(&format!("r{i}.example.com"));
    }
    let names: Vec<String> = f
        .listing(inode::ROOT)
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names.contains(&"vault.azure.net".into()), "declared kept");
    assert!(names.contains(&"r4.example.com".into()), "recent kept");
    let json = f.listing(inode::view_dir_ino(cstokenfs::View::Json));
    assert!(json.contains(&"r4.example.com".into()));
}

#[test]
fn status_is_json_without_token_bytes() {
    let f = fixture();
    f.ino(ARM);
    let status = f.cat(inode::STATUS).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&status).unwrap();
    assert_eq!(doc["resources"][0]["state"], "fresh");
    assert_eq!(doc["source_reason"], "test");
    assert!(!String::from_utf8_lossy(&status).contains("token-1"));
}

#[test]
fn status_has_the_size_an_open_reads() {
    let f = fixture();
    f.ino(ARM);
    let attr = f.core.getattr(inode::STATUS).unwrap();
    assert_eq!(attr.ttl, Duration::ZERO, "asked again at every fstat");
    let (fh, _) = f.core.open(inode::STATUS, READER).unwrap();
    let read = |fh| f.core.read(inode::STATUS, fh, 0, 1 << 20, <[u8]>::to_vec);
    let bytes = read(fh).unwrap();
    assert_eq!(attr.attr.size, bytes.len() as u64, "stat before the open");
    // `.status` changes (another resource): the reader's fstat still gives its snapshot's size.
    f.ino("vault.azure.net");
    let size = |f: &Fixture| f.core.getattr(inode::STATUS).unwrap().attr.size;
    assert_eq!(size(&f), bytes.len() as u64, "fstat after the open");
    f.core.release(fh);
    // The next open reads the new bytes, and its fstat gives their size.
    let (fh, _) = f.core.open(inode::STATUS, READER).unwrap();
    let now = read(fh).unwrap();
    assert_ne!(now.len(), bytes.len());
    assert_eq!(size(&f), now.len() as u64);
    f.core.release(fh);
}

#[test]
fn directories_and_dot_names() {
    let f = fixture();
    assert_eq!(
        f.lookup(inode::STATUS, "x").unwrap_err(),
        FsError::NotDir,
        "nothing below a file"
    );
    assert_eq!(
        f.lookup(inode::ROOT, ".nothing").unwrap_err(),
        FsError::NotFound
    );
    let json = f.lookup(inode::ROOT, ".json").unwrap();
    assert_eq!(json.attr.perm, 0o500, "directories get the x bits");
    assert_eq!(f.source.calls(), 0);
}

#[test]
fn the_open_that_echoes_a_waiting_lookup_is_not_a_later_read() {
    let clock = FakeClock::new(1_700_000_000_000);
    let source = FakeSource::new(clock.clone(), HOUR);
    let cache = Cache::new(
        Identities::one(source.clone()),
        Policy::default(),
        &[],
        clock.clone(),
    );
    let access = Access {
        uid: 0,
        gid: 0,
        file_mode: 0o400,
    };
    let f = Fixture {
        core: Core::new(cache.clone(), access, None, "test"),
        cache,
        clock,
        source,
    };
    // One `cat`: a lookup that waits for the fetch, then its open.
    let ino = f.ino(ARM);
    f.core.release(f.core.open(ino, READER).unwrap().0);
    // Shortly before the refresh point (the refresh-ahead window) nothing happens...
    // (the background pass runs here, on the fake clock, instead of on its thread).
    f.clock.advance(HOUR - 300_000 - 500);
    f.cache.pass_now();
    assert!(f.cache.wait_until_settled(Duration::from_secs(10)));
    assert_eq!(
        f.source.calls(),
        1,
        "a token read once is not refreshed ahead"
    );
    // ...until a later read marks it in use.
    f.core.release(f.core.open(ino, READER).unwrap().0);
    f.cache.pass_now();
    assert!(f.source.wait_calls(2), "a token in use is refreshed ahead");
}

// The freshness scenarios of the real-mount suite (tests/it/freshness.rs), on the fake
// clock: hours pass in a call, and the background pass runs when the test says so.

#[test]
fn on_the_fake_clock_a_token_nobody_reads_is_not_refreshed_and_goes_at_expiry() {
    let f = fixture();
    assert_eq!(f.cat(f.ino(ARM)).unwrap(), b"token-1");
    // Past the refresh point, unread since its fetch: no refresh.
    f.clock.advance(HOUR - 300_000);
    f.cache.pass_now();
    assert!(f.cache.wait_until_settled(Duration::from_secs(10)));
    assert_eq!(f.source.calls(), 1, "a token nobody reads is not refreshed");
    assert!(f.listing(inode::ROOT).contains(&ARM.to_string()));
    // Past its expiry: dropped, and gone from the listing.
    f.clock.advance(300_000);
    f.cache.pass_now();
    assert!(!f.listing(inode::ROOT).contains(&ARM.to_string()));
    assert_eq!(f.source.calls(), 1);
}

#[test]
fn on_the_fake_clock_a_failed_refresh_keeps_serving_the_valid_token_and_backs_off() {
    // A short --timeout: the failing refresh retries (in real time) only that long.
    let policy = Policy {
        timeout: Duration::from_millis(500),
        ..Policy::default()
    };
    let f = fixture_with(policy, &[]);
    let ino = f.ino(ARM);
    assert_eq!(f.cat(ino).unwrap(), b"token-1");
    f.clock.advance(HOUR - 300_000);
    f.source.set_down(true);
    // A read past the refresh point is served at once; the refresh fails behind it.
    assert_eq!(f.cat(ino).unwrap(), b"token-1");
    assert!(f.cache.wait_until_settled(Duration::from_secs(10)));
    let calls = f.source.calls();
    assert!(calls >= 2, "the refresh was tried");
    // Within the backoff, reads are served from the held token and ask nothing.
    for _ in 0..5 {
        assert_eq!(f.cat(ino).unwrap(), b"token-1");
    }
    f.cache.pass_now();
    assert!(f.cache.wait_until_settled(Duration::from_secs(10)));
    assert_eq!(
        f.source.calls(),
        calls,
        "no retry before the backoff is over"
    );
    // The upstream is back and the backoff is over: the next read refreshes.
    f.source.set_down(false);
    f.clock.advance(120_000);
    assert_eq!(f.cat(ino).unwrap(), b"token-1");
    assert!(f.cache.wait_until_settled(Duration::from_secs(10)));
    let new = f.ino(ARM);
    assert_ne!(new, ino, "a new version after the upstream came back");
    assert_ne!(f.cat(new).unwrap(), b"token-1");
}

#[test]
fn on_the_fake_clock_a_refusal_while_a_valid_token_is_held_keeps_serving_it() {
    let f = fixture();
    let ino = f.ino(ARM);
    assert_eq!(f.cat(ino).unwrap(), b"token-1");
    f.clock.advance(HOUR - 300_000);
    f.source.refuse("https://management.azure.com/");
    assert_eq!(f.cat(ino).unwrap(), b"token-1");
    assert!(f.cache.wait_until_settled(Duration::from_secs(10)));
    assert_eq!(f.source.calls(), 2, "the refresh was refused");
    // Still served, by the same name and inode, until it expires.
    assert_eq!(f.ino(ARM), ino);
    assert_eq!(f.cat(ino).unwrap(), b"token-1");
    f.clock.advance(300_000);
    assert_eq!(f.core.open(ino, READER).unwrap_err(), FsError::Stale);
}
