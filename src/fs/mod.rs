//! The filesystem core: names, views, attributes, handles and errno. It never does HTTP:
//! whatever may fetch goes through the cache, which answers on its own thread. `fuse` is the
//! thin adapter to fuser. The top holds the mount's own identity's tokens; with
//! `--identity`, `id/NAME/` holds each declared identity's, the same tree (no `.status`,
//! `.env`), its directories' inodes apart (`inode::identity_dir_ino`). `.acr/` (at the top
//! and under `id/NAME/`) holds registry credentials: only names the registry rules allow
//! reach the cache (`Core::registry_key`), as keys of their own (`Resource::registry`).
//!
//! # Locks
//!
//! The core's locks are leaves, never nested: the inode table (`InodeTable`), `handles`,
//! `last_status`, the echo's two maps (`echo.rs`) and no-open's `.status` snapshot
//! (`noopen.rs`). Release each before asking the cache: read the inode table, let go of
//! it, then ask (`getattr`, `open`); build `.status` bytes before taking `last_status`.
//! Never call `Cache::read` while holding one of them: its `done` may run at once on this
//! thread and takes the inode table and the echo's maps. No lock is held while a reply is
//! written (a read clones its handle first).

mod echo;
pub mod fuse;
pub mod inode;
pub mod noopen;

pub use crate::access::Access;
use crate::audit::{Audit, OpenEvent};
use crate::cache::{Cache, FrontEnd, IdentityId, Key, Lease, ReadError, Use};
use crate::names;
use crate::report as status;
use crate::token::{Version, View};
use echo::KernelEcho;
use fuser::{Errno, FileAttr, FileType, INodeNo};
use inode::{InodeTable, Node};
use log::debug;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use zeroize::Zeroizing;

/// A function adding to `.status`.
pub type StatusPart = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What the mount shows beyond tokens, when asked for (see [`Core::with_extras`]).
#[derive(Default, Clone)]
pub struct Extras {
    /// `MOUNT/.env`'s bytes (`--serve-endpoint`, `--serve-imds`); `None`: there is no `.env`.
    pub env_file: Option<Arc<Zeroizing<Vec<u8>>>>,
    /// Keys of `.status` and the functions giving their values when `.status` is opened.
    pub status: Vec<(&'static str, StatusPart)>,
    /// `--no-open`: the kernel answers opens itself (see `noopen`).
    pub no_open: bool,
}

/// How long the kernel may keep directory and `.status` attributes.
pub(crate) const META_TTL: Duration = Duration::from_secs(1);
/// The longest a token's name or attributes are cached by the kernel (opens always reach the
/// daemon, which sends a reader of a superseded or expired version back to lookup).
pub(crate) const MAX_TOKEN_TTL: Duration = Duration::from_secs(60);

/// A `.status` this big is worth returning the heap's free memory after (`malloc_trim`).
const LARGE_SNAPSHOT: usize = 64 * 1024;

/// Returns free heap memory to the system (glibc keeps it in its arenas otherwise).
fn give_back_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A failure, as the errno the reader sees. The core returns these; `errno` is the one
/// place they become `fuser::Errno` (with the adapter, `fuse.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsError {
    /// No such name, or a resource the endpoint refused.
    NotFound,
    /// The endpoint refused the identity (401, 403, an unknown user-assigned identity).
    Denied,
    /// No token could be had.
    Io,
    /// The version behind this inode is superseded or expired: look the name up again.
    Stale,
    /// Nothing here can be changed.
    ReadOnly,
    NotDir,
    BadHandle,
    /// No-open mode: the kernel answers this request itself once told so (OPEN, FLUSH).
    LeftToKernel,
    /// An argument this file cannot take: a seek on a directory, a whence other than
    /// SEEK_DATA or SEEK_HOLE.
    Invalid,
    /// SEEK_DATA or SEEK_HOLE at or past the end of the file: neither is there.
    PastEnd,
}

impl FsError {
    pub fn errno(self) -> Errno {
        match self {
            FsError::NotFound => Errno::ENOENT,
            FsError::Denied => Errno::EACCES,
            FsError::Io => Errno::EIO,
            FsError::Stale => Errno::ESTALE,
            FsError::ReadOnly => Errno::EROFS,
            FsError::NotDir => Errno::ENOTDIR,
            FsError::BadHandle => Errno::EBADF,
            FsError::LeftToKernel => Errno::ENOSYS,
            FsError::Invalid => Errno::EINVAL,
            FsError::PastEnd => Errno::ENXIO,
        }
    }
}

/// How a read without a token reads to a file reader.
impl From<&ReadError> for FsError {
    fn from(e: &ReadError) -> FsError {
        match e {
            ReadError::Refused(_) => FsError::NotFound,
            ReadError::Denied(_) => FsError::Denied,
            ReadError::Unavailable(_) => FsError::Io,
        }
    }
}

/// What an open file reads from: one version's view (immutable), or a `.status` snapshot.
#[derive(Clone)]
enum Handle {
    Token(Arc<Version>, View),
    Status(Arc<Vec<u8>>),
    /// Bytes fixed for the mount's life, wiped when the last handle goes (`.env`).
    Fixed(Arc<Zeroizing<Vec<u8>>>),
    /// A directory listing, taken at opendir so offsets stay meaningful across readdirs.
    Dir(Arc<Vec<DirEntry>>),
}

/// One directory entry: inode, kind, name.
pub type DirEntry = (u64, FileType, String);

/// A name that resolved: its attributes and how long the kernel may keep them.
#[derive(Debug, Clone)]
pub struct Entry {
    pub attr: FileAttr,
    /// How long the kernel may keep the attributes.
    pub ttl: Duration,
    /// How long the kernel may keep the name (the same but in no-open mode).
    pub entry_ttl: Duration,
}

/// Who opens a file (from the kernel's request header).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The filesystem's shared state: one per mount, behind an `Arc` held by the FUSE adapter,
/// the lookups' `done` callbacks (which may run on fetch threads), the expiry watch and the
/// daemon's signal handling.
pub struct Core {
    /// The daemon's token cache: every read of a token goes through it.
    cache: Arc<Cache>,
    /// Owner and permission bits of every file and directory. Fixed at mount.
    access: Access,
    /// The audit log of opens (lookups in no-open mode); `None` in tests.
    audit: Option<Audit>,
    /// Why this upstream was chosen, for `.status`.
    source_reason: String,
    /// Versions the kernel holds lookups on (its own lock): written by lookups and
    /// FORGET, read by getattr, open, no-open reads and the expiry watch.
    inodes: InodeTable,
    /// Open files by handle number: written by open, opendir and release; read (and
    /// cloned out) by read, seek and readdir.
    handles: Mutex<HashMap<u64, Handle>>,
    /// The next handle number (never 0: no-open reads come with fh 0).
    next_handle: AtomicU64,
    /// The kernel's lookup-then-open echo (see `echo`).
    echo: KernelEcho,
    /// When the mount started: the times of directories and `.status`.
    started: SystemTime,
    /// Set on SIGTERM/SIGINT: token bytes are no longer served (opens and reads answer EIO),
    /// so nothing lands in the page cache again once it is invalidated.
    stopping: AtomicBool,
    /// The last `.status` snapshot handed out, shared by every open that finds the same
    /// bytes (nothing changed, same second); gone once its last handle closes. With when it
    /// was handed out: a GETATTR soon after (a reader's `fstat`) reports its size.
    last_status: Mutex<(Weak<Vec<u8>>, Instant)>,
    /// `.env` and the front end's parts of `.status`. Fixed at mount.
    extras: Extras,
    /// How opens are served, with no-open mode's state.
    serving: Serving,
}

/// How the mount serves opens: matched once per operation that differs between the modes.
enum Serving {
    /// The default: every open reaches the daemon and gets a handle; the open is the read.
    Handles,
    /// `--no-open`: the kernel answers opens itself and reads by inode; the lookup is the
    /// read (see `noopen`).
    NoOpen(noopen::NoOpen),
}

/// What a lookup's answer does with the version it found, by mode.
enum Found {
    /// Counts the kernel's lookup; the open that follows is the read.
    Handles,
    /// Pins the version under the name looked up (for `inval_entry`); the lookup is the read
    /// and is audited.
    NoOpen { parent: u64, name: String },
}

/// How an open file is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Immutable bytes: the kernel may keep them in its page cache.
    Cached,
    /// Generated at open: every read comes to the daemon.
    Direct,
}

impl Core {
    pub fn new(
        cache: Arc<Cache>,
        access: Access,
        audit: Option<Audit>,
        source_reason: &str,
    ) -> Arc<Core> {
        Core::with_extras(cache, access, audit, source_reason, Extras::default())
    }

    /// [`Core::new`] with `.env` and more of `.status`.
    pub fn with_extras(
        cache: Arc<Cache>,
        access: Access,
        audit: Option<Audit>,
        source_reason: &str,
        extras: Extras,
    ) -> Arc<Core> {
        Arc::new(Core {
            cache,
            access,
            audit,
            source_reason: source_reason.to_string(),
            inodes: InodeTable::default(),
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            echo: KernelEcho::default(),
            started: SystemTime::now(),
            stopping: AtomicBool::new(false),
            last_status: Mutex::new((Weak::new(), Instant::now())),
            serving: match extras.no_open {
                true => Serving::NoOpen(noopen::NoOpen::new()),
                false => Serving::Handles,
            },
            extras,
        })
    }

    /// `caller` looks `name` up in directory `parent`; `done` may run later, on a fetch
    /// thread.
    pub fn lookup(
        self: &Arc<Self>,
        parent: u64,
        name: &str,
        caller: Caller,
        done: impl FnOnce(Result<Entry, FsError>) + Send + 'static,
    ) {
        let node = inode::node(parent);
        let (key, view) = match (node, name) {
            (Some(Node::Root), ".status") => return done(Ok(self.status_entry())),
            (Some(Node::Root), ".env") if self.extras.env_file.is_some() => {
                if let Serving::NoOpen(_) = self.serving {
                    self.audit("lookup", ".env".into(), "endpoint secret", caller);
                }
                return done(self.getattr(inode::ENV));
            }
            (Some(Node::Root), IDS) if self.has_declared() => {
                return done(Ok(self.meta_entry(inode::ID_DIR)))
            }
            (Some(Node::Ids), _) => {
                return done(
                    self.cache
                        .identities()
                        .by_name(name)
                        .map(|i| self.meta_entry(inode::identity_dir_ino(i, View::Raw)))
                        .ok_or(FsError::NotFound),
                )
            }
            (Some(n), ACR) if self.cache.registries().is_some() && top_of(n).is_some() => {
                let identity = top_of(n).unwrap_or(IdentityId::DEFAULT);
                return done(Ok(self.meta_entry(inode::acr_dir_ino(identity))));
            }
            // A registry's credentials: only a name the registry rules allow is asked for;
            // anything else is ENOENT here, no request sent.
            (Some(Node::AcrDir { identity }), _) => match self.registry_key(identity, name) {
                Some(found) => found,
                None => {
                    debug!("lookup .acr/{name:?}: not a registry an Entra token may be sent to");
                    return done(Err(FsError::NotFound));
                }
            },
            (Some(n), dot) if dot.starts_with('.') && top_of(n).is_some() => {
                let identity = top_of(n).unwrap_or(IdentityId::DEFAULT);
                return done(
                    View::ALL
                        .into_iter()
                        .find(|v| v.dir_name() == Some(dot))
                        .map(|v| self.meta_entry(inode::identity_dir_ino(identity, v)))
                        .ok_or(FsError::NotFound),
                );
            }
            (Some(n), _) => match (dir_of(n), names::resolve(name)) {
                (Some((identity, view)), Ok(resource)) => (Key::new(identity, resource), view),
                (Some(_), Err(why)) => {
                    debug!("lookup {name:?}: {why}");
                    return done(Err(FsError::NotFound));
                }
                (None, _) => return done(Err(FsError::NotDir)),
            },
            (None, _) => return done(Err(FsError::NotFound)),
        };
        if let Some(err) = self.echo.retry_of_failed(&key, caller.pid) {
            return done(Err(err));
        }
        let core = self.clone();
        let read = key.clone();
        // In no-open mode the lookup is the read; else the open that follows is.
        let (found, usage) = match self.serving {
            Serving::Handles => (Found::Handles, Use::Look),
            Serving::NoOpen(_) => {
                let name = name.to_string();
                (Found::NoOpen { parent, name }, Use::ReadUnlessFetched)
            }
        };
        self.cache.read(
            &read,
            usage,
            Box::new(move |got| {
                done(match got {
                    Ok(lease) => {
                        let v = &lease.version;
                        match found {
                            Found::Handles => {
                                core.inodes.remember(v);
                                if lease.fetched {
                                    core.echo.waited_for(v.id);
                                }
                            }
                            Found::NoOpen { parent, name } => {
                                core.inodes.remember_as(v, Some((parent, &name)));
                                core.cache.meters().read(FrontEnd::NoOpenLookup);
                                let resource = core.label(&v.key);
                                core.audit("lookup", resource, view.label(), caller);
                            }
                        }
                        Ok(core.token_entry(&lease, view))
                    }
                    Err(e) => {
                        let err = FsError::from(&e);
                        // The kernel retries a failed revalidation at once, for the same read.
                        if matches!(e, ReadError::Unavailable(_)) && core.inodes.holds(&key) {
                            core.echo.revalidation_failed(key, caller.pid, err);
                        }
                        Err(err)
                    }
                })
            }),
        );
    }

    /// The kernel dropped `n` lookups of `ino`.
    pub fn forget(&self, ino: u64, n: u64) {
        if let Some(Node::Token { version, .. }) = inode::node(ino) {
            if self.inodes.forget(version, n) {
                self.echo.forget(version);
            }
        }
    }

    pub fn getattr(&self, ino: u64) -> Result<Entry, FsError> {
        match inode::node(ino).ok_or(FsError::NotFound)? {
            Node::Token { version, view } => {
                // Read the table, then let go of it before asking the cache.
                let (size, mtime, v) = self
                    .inodes
                    .with(version, |k| (k.sizes[view as usize], k.mtime_ms, k.bytes()))
                    .ok_or(FsError::Stale)?;
                let lease = v.and_then(|v| self.cache.judge(&v));
                let (ttl, _) = self.serving.ttls(lease.as_ref());
                Ok(Entry {
                    attr: self.attr(ino, FileType::RegularFile, size, mtime),
                    ttl,
                    entry_ttl: ttl,
                })
            }
            Node::Status => Ok(self.status_entry()),
            Node::Env => {
                let size = self
                    .extras
                    .env_file
                    .as_ref()
                    .ok_or(FsError::NotFound)?
                    .len();
                let mut entry = self.meta_entry(inode::ENV);
                entry.attr.kind = FileType::RegularFile;
                entry.attr.perm = self.access.file_mode;
                entry.attr.nlink = 1;
                entry.attr.size = size as u64;
                entry.attr.blocks = entry.attr.size.div_ceil(512);
                Ok(entry)
            }
            Node::IdentityDir { identity, .. }
                if self.cache.identities().name(identity).is_none() =>
            {
                Err(FsError::NotFound)
            }
            Node::AcrDir { identity }
                if self.cache.registries().is_none()
                    || (!identity.is_default()
                        && self.cache.identities().name(identity).is_none()) =>
            {
                Err(FsError::NotFound)
            }
            _ => Ok(self.meta_entry(ino)),
        }
    }

    /// Opens a file for reading: a token version only while it is current and valid. In
    /// no-open mode the kernel answers opens itself once told so (`LeftToKernel`).
    pub fn open(&self, ino: u64, caller: Caller) -> Result<(u64, OpenMode), FsError> {
        if let Serving::NoOpen(_) = self.serving {
            // The kernel makes its own file (FOPEN_KEEP_CACHE) and sends no OPEN again.
            return Err(FsError::LeftToKernel);
        }
        let (handle, mode) = match inode::node(ino).ok_or(FsError::NotFound)? {
            Node::Token { version, view } => {
                self.serving_allowed()?;
                let v = self
                    .inodes
                    .with(version, |k| k.version.upgrade())
                    .flatten()
                    .ok_or(FsError::Stale)?;
                let usage = match self.echo.is_later_read(v.id) {
                    true => Use::Read,
                    false => Use::Look,
                };
                self.cache.reopen(&v, usage).map_err(|_| FsError::Stale)?;
                self.cache.meters().read(FrontEnd::File);
                self.audit("open", self.label(&v.key), view.label(), caller);
                (Handle::Token(v, view), OpenMode::Cached)
            }
            Node::Status => (Handle::Status(self.status_snapshot()), OpenMode::Direct),
            Node::Env => {
                let bytes = self.extras.env_file.clone().ok_or(FsError::NotFound)?;
                self.audit("open", ".env".into(), "endpoint secret", caller);
                (Handle::Fixed(bytes), OpenMode::Cached)
            }
            Node::Root
            | Node::ViewDir(_)
            | Node::Ids
            | Node::IdentityDir { .. }
            | Node::AcrDir { .. } => return Err(FsError::NotFound),
        };
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, handle);
        Ok((fh, mode))
    }

    /// The key and view of `.acr/NAME` for `identity`: `NAME` (the refresh token) or
    /// `NAME.json`, where `NAME` is a registry the registry rules allow; else `None`.
    fn registry_key(&self, identity: IdentityId, name: &str) -> Option<(Key, View)> {
        let registries = self.cache.registries()?;
        let (host, view) = match name.strip_suffix(".json") {
            Some(host) => (host, View::Json),
            None => (name, View::Raw),
        };
        // The canonical spelling only (lower case, no trailing dot): one name per file.
        let resource = registries.resource(host)?;
        (resource.registry_host() == Some(host)).then(|| (Key::new(identity, resource), view))
    }

    /// `.acr`'s listing: each registry whose credentials `identity` holds, and its `.json`.
    fn list_acr(&self, ino: u64, identity: IdentityId) -> Vec<DirEntry> {
        let mut out = vec![
            (ino, FileType::Directory, ".".to_string()),
            (
                inode::identity_dir_ino(identity, View::Raw),
                FileType::Directory,
                "..".to_string(),
            ),
        ];
        let mut held: Vec<(String, u64)> = self
            .cache
            .listed()
            .into_iter()
            .filter(|(key, _)| key.identity == identity)
            .filter_map(|(key, v)| Some((key.resource.registry_host()?.to_string(), v?.id)))
            .collect();
        held.sort();
        for (host, id) in held {
            let raw = inode::token_ino(id, View::Raw);
            let json = inode::token_ino(id, View::Json);
            out.push((json, FileType::RegularFile, format!("{host}.json")));
            out.push((raw, FileType::RegularFile, host));
        }
        out
    }

    /// Whether identities are declared (`MOUNT/id` exists).
    fn has_declared(&self) -> bool {
        self.cache.identities().declared().next().is_some()
    }

    /// How the audit names `key`: its resource, under `id/NAME/` for a declared identity.
    fn label(&self, key: &Key) -> Arc<str> {
        crate::audit::label(
            self.cache.identities().name(key.identity).as_deref(),
            &key.resource,
        )
    }

    /// Queues the audit line of an open (or, in no-open mode, a lookup) by `caller`.
    fn audit(&self, kind: &'static str, resource: Arc<str>, view: &'static str, caller: Caller) {
        if let Some(audit) = &self.audit {
            audit.opened(OpenEvent {
                kind,
                resource,
                view,
                pid: caller.pid,
                uid: caller.uid,
                gid: caller.gid,
                exe: crate::audit::exe_of(caller.pid),
            });
        }
    }

    /// Up to `size` bytes at `offset` of inode `ino` opened as handle `fh`: by the handle,
    /// or in no-open mode (no handles) by the inode.
    pub fn read<T>(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, FsError> {
        let no = match &self.serving {
            Serving::Handles => return self.read_handle(fh, offset, size, f),
            Serving::NoOpen(no) => no,
        };
        self.read_inode(no, ino, offset, size, f)
    }

    /// The bytes of `v`'s `view`, if they may be served now: never once the daemon is
    /// stopping (its pages are being dropped from the page cache) nor once `v` has expired
    /// (an open file reads its version until then, superseded or not). Both modes ask this.
    fn token_bytes<'a>(&self, v: &'a Version, view: View) -> Result<&'a [u8], FsError> {
        self.serving_allowed()?;
        if v.expired(self.cache.now()) {
            return Err(FsError::Io);
        }
        Ok(v.bytes(view))
    }

    /// Token bytes are served at all: not once SIGTERM/SIGINT stopped serving (EIO).
    fn serving_allowed(&self) -> Result<(), FsError> {
        match self.stopping.load(Ordering::SeqCst) {
            true => Err(FsError::Io),
            false => Ok(()),
        }
    }

    /// Up to `size` bytes at `offset` of open file `fh`.
    fn read_handle<T>(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, FsError> {
        // The handle is cloned (an Arc) so no lock is held while the reply is written.
        let handle = self
            .handles
            .lock()
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        let bytes = match &handle {
            Handle::Token(v, view) => self.token_bytes(v, *view)?,
            Handle::Status(b) => b.as_slice(),
            Handle::Fixed(b) => b.as_slice(),
            Handle::Dir(_) => return Err(FsError::BadHandle),
        };
        Ok(f(slice_at(bytes, offset, size)))
    }

    /// `lseek` with SEEK_DATA or SEEK_HOLE on inode `ino` opened as `fh` (in no-open mode:
    /// by the inode's size): a file is one run of data, no holes; at or past its end there
    /// is neither (ENXIO). The kernel does every other whence itself.
    pub fn seek(&self, ino: u64, fh: u64, offset: i64, whence: i32) -> Result<i64, FsError> {
        if let Serving::NoOpen(_) = self.serving {
            let size = self.getattr(ino)?.attr.size as i64;
            return seek_in(size, offset, whence);
        }
        let size = match self.handles.lock().get(&fh) {
            Some(Handle::Token(v, view)) => v.bytes(*view).len(),
            Some(Handle::Status(b)) => b.len(),
            Some(Handle::Fixed(b)) => b.len(),
            Some(Handle::Dir(_)) => return Err(FsError::Invalid),
            None => return Err(FsError::BadHandle),
        } as i64;
        seek_in(size, offset, whence)
    }

    /// FLUSH: nothing to write back; in no-open mode the kernel is told to stop sending it
    /// (FOPEN_NOFLUSH needs an OPEN reply).
    pub fn flush(&self) -> Result<(), FsError> {
        match self.serving {
            Serving::Handles => Ok(()),
            Serving::NoOpen(_) => Err(FsError::LeftToKernel),
        }
    }

    pub fn release(&self, fh: u64) {
        let handle = self.handles.lock().remove(&fh);
        if let Some(Handle::Status(snapshot)) = handle {
            // The last handle on a large snapshot: hand the freed memory back to the system
            // (measured: 200 handles on a 1,000-name `.status` left 5 MiB behind without).
            if Arc::strong_count(&snapshot) == 1 && snapshot.len() >= LARGE_SNAPSHOT {
                drop(snapshot);
                give_back_memory();
            }
        }
    }

    /// Opens a directory: its listing is taken now and served by `readdir`.
    pub fn opendir(&self, ino: u64) -> Result<u64, FsError> {
        let entries = Arc::new(self.list(ino)?);
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Handle::Dir(entries));
        Ok(fh)
    }

    /// The listing taken when the directory was opened.
    pub fn readdir(&self, fh: u64) -> Result<Arc<Vec<DirEntry>>, FsError> {
        match self.handles.lock().get(&fh) {
            Some(Handle::Dir(entries)) => Ok(entries.clone()),
            _ => Err(FsError::BadHandle),
        }
    }

    /// The entries of a directory: (inode, kind, name), `.` and `..` first.
    fn list(&self, ino: u64) -> Result<Vec<DirEntry>, FsError> {
        let node = inode::node(ino).ok_or(FsError::NotFound)?;
        if node == Node::Ids {
            let mut out = vec![
                (ino, FileType::Directory, ".".to_string()),
                (inode::ROOT, FileType::Directory, "..".to_string()),
            ];
            out.extend(self.cache.identities().declared().map(|(i, name)| {
                let dir = inode::identity_dir_ino(i, View::Raw);
                (dir, FileType::Directory, name.to_string())
            }));
            return Ok(out);
        }
        if let Node::AcrDir { identity } = node {
            return Ok(self.list_acr(ino, identity));
        }
        let (identity, view) = dir_of(node).ok_or(FsError::NotDir)?;
        let parent = match (identity.is_default(), view) {
            (true, _) => inode::ROOT,
            (false, View::Raw) => inode::ID_DIR,
            (false, _) => inode::identity_dir_ino(identity, View::Raw),
        };
        let mut out = vec![
            (ino, FileType::Directory, ".".to_string()),
            (parent, FileType::Directory, "..".to_string()),
        ];
        let listed = self.cache.listed();
        // `.acr` is listed once it holds something (a lookup finds it always): a mount
        // nobody reads registry credentials from lists what it always did.
        let holds_registry = listed.iter().any(|(key, v)| {
            key.identity == identity && v.is_some() && key.resource.registry_host().is_some()
        });
        if view == View::Raw && holds_registry && self.cache.registries().is_some() {
            let dir = inode::acr_dir_ino(identity);
            out.push((dir, FileType::Directory, ACR.into()));
        }
        if view == View::Raw {
            for v in View::ALL {
                if let Some(dir) = v.dir_name() {
                    let dir_ino = inode::identity_dir_ino(identity, v);
                    out.push((dir_ino, FileType::Directory, dir.into()));
                }
            }
        }
        if view == View::Raw && identity.is_default() {
            out.push((inode::STATUS, FileType::RegularFile, ".status".into()));
            if self.extras.env_file.is_some() {
                out.push((inode::ENV, FileType::RegularFile, ".env".into()));
            }
            if self.has_declared() {
                out.push((inode::ID_DIR, FileType::Directory, IDS.into()));
            }
        }
        let mut names: Vec<(u64, String)> = listed
            .into_iter()
            .filter(|(key, _)| key.identity == identity)
            .filter_map(|(key, v)| {
                let ino = v.map_or(inode::UNRESOLVED, |v| inode::token_ino(v.id, view));
                names::canonical_name(&key.resource).map(|n| (ino, n))
            })
            .collect();
        names.sort_by(|a, b| a.1.cmp(&b.1));
        names.dedup_by(|a, b| a.1 == b.1);
        out.extend(
            names
                .into_iter()
                .map(|(i, n)| (i, FileType::RegularFile, n)),
        );
        Ok(out)
    }

    /// Before unmounting on SIGTERM/SIGINT: stops serving token bytes, then makes the kernel
    /// drop every cached page of every version it knows, so a file held open across the
    /// daemon's exit cannot go on reading a token from the page cache (its next read goes to
    /// the daemon, which answers EIO, or to a dead connection, ENOTCONN). Returns how many
    /// versions were invalidated. Call it off the FUSE threads: the kernel may wait for a
    /// read in flight, which a FUSE thread answers.
    pub fn stop_serving(&self, notifier: &fuser::Notifier) -> usize {
        self.stopping.store(true, Ordering::SeqCst);
        let ids = self.inodes.ids();
        for &id in &ids {
            for view in View::ALL {
                let ino = INodeNo(inode::token_ino(id, view));
                if let Err(e) = notifier.inval_inode(ino, 0, 0) {
                    // ENOENT: the kernel no longer has that inode (or never had that view).
                    debug!("invalidating inode {}: {e}", ino.0);
                }
            }
        }
        ids.len()
    }

    /// Watches for versions that expire and makes the kernel drop their cached pages
    /// (`inval_inode`), so no path, the page cache included, serves an expired token. Runs on
    /// a thread of its own (never a FUSE thread) until the session ends. Names need no
    /// notification: an open of a superseded version answers ESTALE and the kernel looks the
    /// name up again (an `inval_entry` would take the directory lock and queue every lookup
    /// behind a slow first fetch).
    ///
    /// In no-open mode it wakes at least every `noopen::WATCH_MAX_PAUSE_MS`, also has the
    /// names of expired versions invalidated, and starts the invalidator thread.
    pub fn start_expiry_watch(self: &Arc<Self>, notifier: fuser::Notifier) -> std::io::Result<()> {
        let max_pause = match &self.serving {
            Serving::Handles => 1_000,
            Serving::NoOpen(no) => {
                no.start_invalidator(notifier.clone())?;
                noopen::WATCH_MAX_PAUSE_MS
            }
        };
        let core = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("expiry".into())
            .stack_size(256 * 1024)
            .spawn(move || loop {
                let Some(core) = core.upgrade() else { return };
                let now = core.cache.now();
                let (expired, next) = core.inodes.newly_expired(now);
                if !expired.is_empty() {
                    core.invalidate_names(&expired);
                }
                for id in expired {
                    for view in View::ALL {
                        let ino = INodeNo(inode::token_ino(id, view));
                        if let Err(e) = notifier.inval_inode(ino, 0, 0) {
                            debug!("invalidating inode {}: {e}", ino.0);
                        }
                    }
                }
                let pause = next.map_or(max_pause, |n| n.saturating_sub(now).clamp(10, max_pause));
                drop(core);
                std::thread::sleep(Duration::from_millis(pause as u64));
            })?;
        Ok(())
    }

    /// `.status` as of now, shared with the handles already open on identical bytes: with
    /// 1,000 names a snapshot is some 300 KiB, so one per open would cost 60 MiB for 200
    /// handles. The status has 1 s resolution (`now`), so opens within a second while
    /// nothing changes share one; any change (a fetch, a failure) makes a new one.
    fn status_snapshot(&self) -> Arc<Vec<u8>> {
        let mut fresh = self.status_bytes();
        let mut last = self.last_status.lock();
        if let Some(prev) = last.0.upgrade() {
            if *prev == fresh {
                last.1 = Instant::now();
                return prev;
            }
        }
        fresh.shrink_to_fit();
        let snapshot = Arc::new(fresh);
        *last = (Arc::downgrade(&snapshot), Instant::now());
        snapshot
    }

    /// `.status`'s size as a reader that opened it sees it: the length of the snapshot the
    /// last open got, while a handle holds it and for [`META_TTL`] after that open (a
    /// reader's `fstat` follows its open); else the length of the bytes an open would get
    /// now. Two readers opening a changed `.status` within that second may see one size
    /// for the other's snapshot; a reader of the whole file (to EOF) reads it all anyway.
    fn status_size(&self) -> u64 {
        {
            let last = self.last_status.lock();
            if let Some(prev) = last.0.upgrade().filter(|_| last.1.elapsed() < META_TTL) {
                return prev.len() as u64;
            }
        }
        self.status_bytes().len() as u64
    }

    fn status_bytes(&self) -> Vec<u8> {
        let status = self.cache.status();
        let mut extra: std::collections::BTreeMap<&str, serde_json::Value> = self
            .extras
            .status
            .iter()
            .map(|(k, part)| (*k, part()))
            .collect();
        match &self.serving {
            Serving::Handles => {
                extra.insert("no_open", false.into());
            }
            Serving::NoOpen(no) => {
                extra.insert("no_open", true.into());
                // Counted in no-open mode only, where they stop changing after the first open.
                extra.insert("fuse_requests", no.request_counts());
            }
        }
        status::Report::new(&status, &self.source_reason, extra).to_bytes()
    }

    fn token_entry(&self, lease: &Lease, view: View) -> Entry {
        let (ttl, entry_ttl) = self.serving.ttls(Some(lease));
        let v = &lease.version;
        Entry {
            attr: self.attr(
                inode::token_ino(v.id, view),
                FileType::RegularFile,
                v.bytes(view).len() as u64,
                v.fetched_at,
            ),
            ttl,
            entry_ttl,
        }
    }

    fn meta_entry(&self, ino: u64) -> Entry {
        let kind = if ino == inode::STATUS {
            FileType::RegularFile
        } else {
            FileType::Directory
        };
        let mtime = self
            .started
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Entry {
            attr: self.attr(ino, kind, 0, mtime),
            ttl: META_TTL,
            entry_ttl: META_TTL,
        }
    }

    fn attr(&self, ino: u64, kind: FileType, size: u64, mtime_ms: i64) -> FileAttr {
        let time = UNIX_EPOCH + Duration::from_millis(mtime_ms.max(0) as u64);
        let (perm, nlink) = match kind {
            FileType::Directory => (self.access.dir_mode(), 2),
            _ => (self.access.file_mode, 1),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            crtime: time,
            kind,
            perm,
            nlink,
            uid: self.access.uid,
            gid: self.access.gid,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }
}

impl Serving {
    /// How long the kernel may keep a token's attributes and its name, given the cache's
    /// lease on its version (`None`: expired). Default mode: both until it stops being
    /// valid while it is the current one, at most `MAX_TOKEN_TTL`, nothing once superseded.
    /// No-open mode: see `noopen::ttls`.
    fn ttls(&self, lease: Option<&Lease>) -> (Duration, Duration) {
        match (self, lease) {
            (_, None) => (Duration::ZERO, Duration::ZERO),
            (Serving::Handles, Some(l)) => {
                let ttl = match l.current {
                    true => l.valid_for.min(MAX_TOKEN_TTL),
                    false => Duration::ZERO,
                };
                (ttl, ttl)
            }
            (Serving::NoOpen(_), Some(l)) => noopen::ttls(l),
        }
    }
}

/// `MOUNT/id`: the declared identities' directories.
const IDS: &str = "id";
/// `MOUNT/.acr` (and `MOUNT/id/NAME/.acr`): registry credentials.
const ACR: &str = ".acr";

/// The identity and view of a directory of tokens (the top, a view directory, and theirs
/// under `MOUNT/id/NAME/`); `None` for anything else.
fn dir_of(node: Node) -> Option<(IdentityId, View)> {
    match node {
        Node::Root => Some((IdentityId::DEFAULT, View::Raw)),
        Node::ViewDir(view) => Some((IdentityId::DEFAULT, view)),
        Node::IdentityDir { identity, view } => Some((identity, view)),
        _ => None,
    }
}

/// The identity whose top directory `node` is (the mount's, or `MOUNT/id/NAME/`).
fn top_of(node: Node) -> Option<IdentityId> {
    match dir_of(node)? {
        (identity, View::Raw) => Some(identity),
        _ => None,
    }
}

/// SEEK_DATA / SEEK_HOLE in a file of `size` bytes: one run of data, no holes; at or past
/// its end there is neither (ENXIO). The kernel does every other whence itself.
fn seek_in(size: i64, offset: i64, whence: i32) -> Result<i64, FsError> {
    if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
        return Err(FsError::Invalid);
    }
    if offset < 0 || offset >= size {
        return Err(FsError::PastEnd);
    }
    Ok(if whence == libc::SEEK_DATA {
        offset
    } else {
        size
    })
}

/// Up to `size` bytes of `bytes` from `offset` (none past the end).
fn slice_at(bytes: &[u8], offset: u64, size: u32) -> &[u8] {
    let start = offset.min(bytes.len() as u64) as usize;
    let end = start.saturating_add(size as usize).min(bytes.len());
    &bytes[start..end]
}
