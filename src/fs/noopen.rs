//! `--no-open`: the kernel answers opens itself. The daemon asks for `FUSE_NO_OPEN_SUPPORT`
//! and answers the mount's first OPEN with ENOSYS (the kernel then makes its own file,
//! `FOPEN_KEEP_CACHE`, and never sends OPEN or RELEASE again) and its first FLUSH with ENOSYS
//! (no FLUSH again): an open+read+close of a cached token is served from the page cache with
//! no round trip. What the daemon still sees, and how every freshness rule is kept:
//!
//! - LOOKUP: entries of token names live at most [`ENTRY_TTL`], so a steady reader looks the
//!   name up again once a second. That lookup is the read (refresh ahead, eviction order),
//!   the audit line ("lookup of ..."), and how a refresh reaches readers.
//! - READ of a page the kernel does not hold, with no handle (fh 0): served by inode. A
//!   version's inodes are immutable; versions the kernel knows are pinned (the inode table),
//!   so an fd opened before a refresh reads its version whole. Expired: EIO.
//! - Expiry: the expiry watch wakes at least every [`WATCH_MAX_PAUSE_MS`] and makes the kernel
//!   drop an expired version's pages (`inval_inode`); its names are invalidated too, on the
//!   invalidator thread.
//! - `.status`: attribute TTL 0, and a size and mtime (ns) that change with each snapshot, with
//!   `FUSE_AUTO_INVAL_DATA`: the kernel asks GETATTR before reading and drops its pages when
//!   they changed; READ serves the snapshot the last GETATTR described.
//! - SIGUSR1: after the cache drops every token, the names of every version the kernel knows
//!   are invalidated (`inval_entry`) on a thread of their own: `inval_entry` takes the
//!   directory's lock and waits behind lookups in flight (a hanging first fetch), so it never
//!   runs on a FUSE or fetch thread.

use super::{inode, Core, Entry, FsError, Node, Serving, MAX_TOKEN_TTL, META_TTL};
use crate::cache::Lease;
use fuser::INodeNo;
use log::{debug, info};
use parking_lot::Mutex;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest the kernel keeps a token's name before looking it up again.
pub const ENTRY_TTL: Duration = Duration::from_secs(1);
/// SIGUSR1 waits at most this long for the kernel to forget the token names.
const INVALIDATE_WAIT: Duration = Duration::from_secs(2);
/// The expiry watch never sleeps longer than this: an expired version's pages are dropped at
/// worst this late after its validity ends (on the wall clock, after a suspend included).
pub const WATCH_MAX_PAUSE_MS: i64 = 250;

/// (directory inode, name) pairs the kernel is to forget, and who waits until it did.
type Names = (Vec<(u64, String)>, Option<Sender<()>>);

/// What no-open mode adds to the core.
pub(super) struct NoOpen {
    /// The `.status` snapshot the last GETATTR (or LOOKUP) of `.status` described, and the
    /// mtime it was given (ns since the epoch, never the same twice).
    status: Mutex<(Arc<Vec<u8>>, u64)>,
    /// Batches of (directory inode, name) for the invalidator thread.
    invalidator: OnceLock<Sender<Names>>,
    /// OPEN, FLUSH and RELEASE requests received (`.status`), to show that none arrive
    /// after the first open and close.
    requests: RequestCounts,
}

impl NoOpen {
    pub(super) fn new() -> NoOpen {
        NoOpen {
            status: Mutex::new((Arc::new(Vec::new()), 0)),
            invalidator: OnceLock::new(),
            requests: RequestCounts::default(),
        }
    }

    /// `.status`'s `fuse_requests`.
    pub(super) fn request_counts(&self) -> serde_json::Value {
        let c = &self.requests;
        serde_json::json!({
            "open": c.open.load(Ordering::Relaxed),
            "flush": c.flush.load(Ordering::Relaxed),
            "release": c.release.load(Ordering::Relaxed),
        })
    }

    /// Starts the thread that sends `inval_entry`. Its only job: it may wait behind lookups
    /// in flight without holding anything else up.
    pub(super) fn start_invalidator(&self, notifier: fuser::Notifier) -> std::io::Result<()> {
        let (tx, rx) = channel::<Names>();
        std::thread::Builder::new()
            .name("invalidator".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                for (batch, done) in rx {
                    for (parent, name) in batch {
                        let dir = INodeNo(parent);
                        if let Err(e) = notifier.inval_entry(dir, std::ffi::OsStr::new(&name)) {
                            // ENOENT: the kernel no longer holds that name.
                            debug!("invalidating a name in directory {parent}: {e}");
                        }
                    }
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
            })?;
        let _ = self.invalidator.set(tx);
        Ok(())
    }
}

/// In no-open mode, how long the kernel may keep a version's attributes (its inodes are
/// immutable: until it stops being valid, current or not) and its name (at most
/// [`ENTRY_TTL`], and only while current).
pub(super) fn ttls(lease: &Lease) -> (Duration, Duration) {
    let attr = lease.valid_for.min(MAX_TOKEN_TTL);
    let name = match lease.current {
        true => attr.min(ENTRY_TTL),
        false => Duration::ZERO,
    };
    (attr, name)
}

/// The requests counted for `.status` (`fuse_requests`).
#[derive(Debug, Clone, Copy)]
pub enum FuseRequest {
    Open,
    Flush,
    Release,
}

/// OPEN, FLUSH and RELEASE requests received in no-open mode (the default mode counts
/// nothing: its read path stays as it was).
#[derive(Default)]
struct RequestCounts {
    open: AtomicU64,
    flush: AtomicU64,
    release: AtomicU64,
}

impl Core {
    /// Whether the mount runs in no-open mode: what the adapter asks the kernel for at INIT.
    pub fn no_open(&self) -> bool {
        matches!(self.serving, Serving::NoOpen(_))
    }

    /// Counts one OPEN, FLUSH or RELEASE (for `.status`), in no-open mode.
    pub fn count(&self, request: FuseRequest) {
        let Serving::NoOpen(no) = &self.serving else {
            return;
        };
        let c = &no.requests;
        let n = match request {
            FuseRequest::Open => &c.open,
            FuseRequest::Flush => &c.flush,
            FuseRequest::Release => &c.release,
        };
        n.fetch_add(1, Ordering::Relaxed);
    }

    /// `.status`'s entry, described with attribute TTL 0 so the kernel asks again before
    /// every read and `fstat`: with handles, the size of what an open reads
    /// (`status_size`); in no-open mode a new snapshot when anything changed.
    pub(super) fn status_entry(&self) -> Entry {
        let mut entry = self.meta_entry(inode::STATUS);
        let Serving::NoOpen(no) = &self.serving else {
            entry.attr.size = self.status_size();
            entry.attr.blocks = entry.attr.size.div_ceil(512);
            entry.ttl = Duration::ZERO;
            return entry;
        };
        let bytes = self.status_bytes();
        let mut current = no.status.lock();
        if *current.0 != bytes {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            *current = (Arc::new(bytes), now.max(current.1 + 1));
        }
        entry.attr.size = current.0.len() as u64;
        entry.attr.blocks = entry.attr.size.div_ceil(512);
        let mtime = UNIX_EPOCH + Duration::from_nanos(current.1);
        (entry.attr.mtime, entry.attr.ctime) = (mtime, mtime);
        entry.ttl = Duration::ZERO;
        entry.entry_ttl = META_TTL;
        entry
    }

    /// A READ without a handle (no-open mode): up to `size` bytes at `offset` of inode `ino`.
    /// An expired version, or one whose bytes are gone, is EIO, never an empty read.
    pub(super) fn read_inode<T>(
        &self,
        no: &NoOpen,
        ino: u64,
        offset: u64,
        size: u32,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, FsError> {
        let (version, status, env);
        let bytes: &[u8] = match inode::node(ino).ok_or(FsError::NotFound)? {
            Node::Token { version: id, view } => {
                version = self.inodes.version(id).ok_or(FsError::Io)?;
                self.token_bytes(&version, view)?
            }
            Node::Status => {
                status = no.status.lock().0.clone();
                status.as_slice()
            }
            Node::Env => {
                env = self.extras.env_file.clone().ok_or(FsError::NotFound)?;
                env.as_slice()
            }
            Node::Root
            | Node::ViewDir(_)
            | Node::Ids
            | Node::IdentityDir { .. }
            | Node::AcrDir { .. } => return Err(FsError::BadHandle),
        };
        Ok(f(super::slice_at(bytes, offset, size)))
    }

    /// SIGUSR1: drops every held token; in no-open mode the kernel is also told to forget
    /// every name it holds of a version (off this thread), so the next read looks it up and
    /// fetches anew. Files already open keep reading the version they had.
    pub fn drop_tokens(&self) {
        self.cache.clear();
        let Serving::NoOpen(no) = &self.serving else {
            return;
        };
        let Some(tx) = no.invalidator.get() else {
            return;
        };
        // Waited for, but boundedly: `inval_entry` may wait behind a lookup in flight.
        let (done, finished) = channel();
        if tx.send((self.inodes.names(None), Some(done))).is_ok()
            && finished.recv_timeout(INVALIDATE_WAIT).is_ok()
        {
            info!("the kernel forgot every token name it held: the next read fetches anew");
        }
    }

    /// Queues `inval_entry` of the names of versions `ids`.
    pub(super) fn invalidate_names(&self, ids: &[u64]) {
        let Serving::NoOpen(no) = &self.serving else {
            return;
        };
        let Some(tx) = no.invalidator.get() else {
            return;
        };
        let names = self.inodes.names(Some(ids));
        if !names.is_empty() {
            let _ = tx.send((names, None));
        }
    }
}

/// The mount's first open and close, made by the daemon right after mounting (no-open mode):
/// the kernel learns no-open from that OPEN (answered ENOSYS) and stops sending FLUSH after
/// its FLUSH (answered ENOSYS), before any reader comes. Runs on a thread of its own (the
/// FUSE threads answer it) and waits at most `within`; a failure only means the first
/// reader's open teaches the kernel instead.
pub fn first_open_and_close(mountpoint: &Path, within: Duration) {
    let path = mountpoint.join(".status");
    let (tx, rx) = channel();
    let spawned = std::thread::Builder::new()
        .name("first-open".into())
        .stack_size(128 * 1024)
        .spawn(move || {
            let _ = tx.send(std::fs::File::open(&path).map(drop));
        });
    if spawned.is_err() {
        return debug!("no thread for the first open; the first reader's open teaches the kernel");
    }
    match rx.recv_timeout(within) {
        Ok(Ok(())) => debug!("first open and close made: the kernel answers opens itself"),
        Ok(Err(e)) => {
            debug!("the first open failed ({e}); the first reader's open teaches the kernel")
        }
        Err(_) => debug!("the first open did not finish in time"),
    }
}
