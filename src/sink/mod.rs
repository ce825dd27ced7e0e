//! `cstokenfs sink DIR`: the mount's layout as plain files on tmpfs, for containers that
//! cannot mount FUSE. The same cache, sources and freshness rules feed it; every file is
//! replaced atomically, and a token is removed before it stops being valid.
//!
//! `dir` checks DIR (in memory only) and holds its lock; `left` takes over what a sink
//! that is gone left there (keeping its still-valid files until replaced); `crate::writer`
//! writes the files; `sync` keeps them in step with the cache. The cache, detaching, the log file and
//! signals are the daemon core's (`crate::daemon`), as for every front end.

mod dir;
mod left;
mod sync;

use crate::access::Access;
use crate::cache::IdentityId;
use crate::daemon::{self, DaemonError, Detached, Handled, Ready};
use crate::policy::Policy;
use crate::source::select::{Plan, Wanted};
use crate::writer;
use std::collections::BTreeSet;
use std::fmt;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

pub use dir::LOCK_NAME;

/// Everything `sink` was asked for.
#[derive(Debug, Clone)]
pub struct SinkRequest {
    /// DIR, as given (made absolute before anything else).
    pub dir: PathBuf,
    /// Which upstream (`--source`, `--endpoint`, `--emulator`, identity flags).
    pub wanted: Wanted,
    /// Names as given (`--resource`, at least one).
    pub resources: Vec<String>,
    /// Freshness and timeouts: the cache's rules.
    pub policy: Policy,
    /// `-f`: stay attached, log to stderr.
    pub foreground: bool,
    /// `--log-file`: a detached sink's stdout and stderr (else syslog).
    pub log_file: Option<PathBuf>,
    /// Owner of the files (default: who runs `sink`).
    pub uid: Option<u32>,
    /// Group of the files (default: who runs `sink`).
    pub gid: Option<u32>,
    /// `--mode`, if given (only then, or with `--uid`/`--gid`, does DIR get an owner and mode).
    pub mode: Option<u16>,
    /// `--metrics`: serve Prometheus metrics, /healthz and /readyz here (any address).
    pub metrics: Option<std::net::SocketAddr>,
}

/// Why `sink` cannot run: one line, with the fix where there is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkError {
    /// A bad command line (a name that is not a resource, no resource).
    Usage(String),
    /// DIR is missing, not a directory, not ours to write, ...
    Dir(String),
    /// DIR is on a filesystem that may write to a disk.
    NotInMemory {
        dir: PathBuf,
        fstype: String,
    },
    /// Another sink holds DIR.
    Busy(String),
    Endpoint(String),
    LogFile(String),
    Daemon(String),
    /// The detached sink failed after it forked; its parent was told why and printed it.
    Reported,
}

impl fmt::Display for SinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SinkError::Usage(m)
            | SinkError::Dir(m)
            | SinkError::Busy(m)
            | SinkError::Endpoint(m)
            | SinkError::Daemon(m) => f.write_str(m),
            SinkError::NotInMemory { dir, fstype } => write!(
                f,
                "{0} is on {fstype}, not tmpfs or ramfs: tokens must never touch a disk; mount a \
                 tmpfs there first (mount -t tmpfs -o mode=0700,size=1m tmpfs {0}, or docker run \
                 --tmpfs {0}:mode=0700)",
                dir.display()
            ),
            // `daemon::open_log`'s message already says what failed.
            SinkError::LogFile(m) => f.write_str(m),
            SinkError::Reported => f.write_str("the sink failed after detaching"),
        }
    }
}

impl std::error::Error for SinkError {}

impl From<DaemonError> for SinkError {
    fn from(e: DaemonError) -> SinkError {
        match e {
            DaemonError::Source(e) => SinkError::Endpoint(e.to_string()),
            e @ DaemonError::LogFile { .. } => SinkError::LogFile(e.to_string()),
            e => SinkError::Daemon(e.to_string()),
        }
    }
}

/// One declared resource of one identity: what is sent, the name its files have, and the
/// directory they are under (`""`, or `id/NAME/` for a declared identity).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    pub resource: crate::names::Resource,
    pub name: String,
    pub identity: IdentityId,
    pub under: String,
}

impl Declared {
    /// Where its `view` lives, relative to DIR.
    pub fn path(&self, view: crate::token::View) -> String {
        format!("{}{}", self.under, writer::view_path(view, &self.name))
    }
}

/// Runs the sink as asked: in the foreground until a signal, or detached once every
/// declared resource was written or failed once.
pub fn run(mut req: SinkRequest) -> Result<(), SinkError> {
    // DIR as given, made absolute before a daemon leaves the working directory: the path
    // checked before each write (`Writer::check_dir`).
    req.dir = std::path::absolute(&req.dir)
        .map_err(|e| SinkError::Dir(format!("{}: {e}", req.dir.display())))?;
    let (dir, plan, declared) = preflight(&req)?;
    if req.foreground {
        crate::logging::init_stderr("info");
        return serve(&req, &dir, plan, &declared, Ready::Nobody);
    }
    let log = match &req.log_file {
        Some(path) => Some(daemon::open_log(path)?),
        None => None,
    };
    let to_syslog = log.is_none();
    let detached = daemon::daemonize(
        log,
        "the sink exited before its files were written (run with -f to see why)",
        |ready| serve(&req, &dir, plan, &declared, ready),
    )?;
    match detached {
        Detached::Parent => {
            if to_syslog {
                daemon::say_if_logs_are_discarded();
            }
            Ok(())
        }
        Detached::Daemon { failed: false } => Ok(()),
        Detached::Daemon { failed: true } => Err(SinkError::Reported),
    }
}

/// Checks that make a clear error before anything is written (no thread is started here:
/// `daemonize` forks after it).
fn preflight(req: &SinkRequest) -> Result<(PathBuf, Plan, Vec<Declared>), SinkError> {
    if req.resources.is_empty() {
        return Err(SinkError::Usage(
            "sink needs at least one --resource NAME: only declared resources exist there".into(),
        ));
    }
    let mut declared: Vec<Declared> = Vec::new();
    for given in &req.resources {
        let resource = crate::names::resolve_arg(given)
            .map_err(|e| SinkError::Usage(format!("--resource {given:?}: {e}")))?;
        let name = crate::names::canonical_name(&resource).ok_or_else(|| {
            SinkError::Usage(format!("--resource {given:?}: too long for a file name"))
        })?;
        if !declared.iter().any(|d| d.resource == resource) {
            declared.push(Declared {
                resource,
                name,
                identity: IdentityId::DEFAULT,
                under: String::new(),
            });
        }
    }
    // Each declared identity's files under id/NAME/, in --identity order (its IdentityId).
    let own = declared.clone();
    for (i, identity) in req.wanted.identities.iter().enumerate() {
        declared.extend(own.iter().map(|d| Declared {
            identity: IdentityId::at(i + 1),
            under: format!("{}/{}/", writer::IDS, identity.name),
            ..d.clone()
        }));
    }
    for (flag, id) in [("--uid", req.uid), ("--gid", req.gid)] {
        if id == Some(u32::MAX) {
            return Err(SinkError::Usage(format!("{flag} {}: not an id", u32::MAX)));
        }
    }
    let plan = daemon::plan(&req.wanted)?;
    let shown = req.dir.display();
    let meta = std::fs::metadata(&req.dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SinkError::Dir(format!(
            "{shown} does not exist: create it and mount a tmpfs there (mkdir -p {shown} && mount -t tmpfs -o mode=0700,size=1m tmpfs {shown})"
        )),
        _ => SinkError::Dir(format!("{shown}: {e}")),
    })?;
    if !meta.is_dir() {
        return Err(SinkError::Dir(format!("{shown} is not a directory")));
    }
    let dir = req
        .dir
        .canonicalize()
        .map_err(|e| SinkError::Dir(format!("{shown}: {e}")))?;
    // Checked here for a clear error before detaching; `serve` opens it again (a daemon
    // keeps no descriptor from before) and checks again.
    dir::open_in_memory(&dir)?;
    Ok((dir, plan, declared))
}

/// Takes DIR, then keeps its files until a signal; tells `ready` once every resource was
/// written or failed once, or why the sink could not start.
fn serve(
    req: &SinkRequest,
    dir: &Path,
    plan: Plan,
    declared: &[Declared],
    ready: Ready,
) -> Result<(), SinkError> {
    let started = daemon::harden("sink", false)
        .and_then(|()| Handled::register())
        .map_err(SinkError::from)
        .and_then(|signals| Ok((signals, take_dir(req, dir, declared)?)));
    let (signals, held) = match started {
        Ok(s) => s,
        Err(e) => {
            ready.fail(&e);
            return Err(e);
        }
    };
    let outcome = sync::run(req, plan, declared, &held, signals, ready);
    held.give_back();
    outcome
}

/// Why the sink cannot give its files the owner asked for (`--uid`, `--gid`): only root
/// (or CAP_CHOWN) gives a file another owner, and a group only to one of its own groups.
fn owner_refused(shown: &str, req: &SinkRequest, e: &std::io::Error) -> SinkError {
    let asked: Vec<String> = [("--uid", req.uid), ("--gid", req.gid)]
        .into_iter()
        .filter_map(|(flag, id)| id.map(|id| format!("{flag} {id}")))
        .collect();
    SinkError::Dir(format!(
        "{shown}: cannot give the sink's files the owner asked for ({}): {e}; without root \
         (or CAP_CHOWN) --uid must be the sink's own uid ({}) and --gid one of its groups",
        asked.join(" "),
        writer::euid()
    ))
}

/// DIR while this sink holds it: the lock, the writer, what to restore on exit.
pub(crate) struct HeldDir {
    /// The lock file, held with `flock` while the sink runs.
    lock: dir::Lock,
    /// What the lock file says: our pid, DIR's owner and mode before, our files and
    /// directories (for the next sink, should this one be killed).
    record: dir::Record,
    /// Writes and removes the files, through DIR's descriptor only.
    writer: writer::Writer,
    /// DIR's owner and mode to give back at exit, if this sink (or the killed one whose lock
    /// it took over) changed them.
    restore: Option<writer::Owner>,
    /// For each declared resource (in order), until when the files a sink before this one
    /// left of it may stay (they hold a valid token) if no new version replaces them.
    kept_until: Vec<Option<std::time::Instant>>,
}

/// The names of the declared identities (`--identity`), in order.
fn identity_names(req: &SinkRequest) -> Vec<String> {
    req.wanted
        .identities
        .iter()
        .map(|d| d.name.clone())
        .collect()
}

/// Every file a sink writes for `declared`, relative to DIR.
fn files_of(declared: &[Declared]) -> Vec<String> {
    let mut files: Vec<String> = declared
        .iter()
        .flat_map(|d| crate::token::View::ALL.map(|v| d.path(v)))
        .collect();
    files.push(writer::STATUS.to_string());
    files
}

/// Opens and locks DIR, tidies up after a killed sink, checks nothing of ours is there
/// already, then makes the view directories and gives DIR the owner and mode asked for.
fn take_dir(req: &SinkRequest, dir: &Path, declared: &[Declared]) -> Result<HeldDir, SinkError> {
    let fd = dir::open_in_memory(dir)?;
    let (lock, stale) = dir::Lock::acquire(fd.as_fd(), dir)?;
    let access = Access::asked(req.uid, req.gid, req.mode);
    let root = writer::euid() == 0;
    // Without root's override the sink needs the owner's write bit to replace its files.
    let dir_mode = access.dir_mode() | if root { 0 } else { 0o200 };
    let io = |e: std::io::Error| SinkError::Dir(format!("{}: {e}", dir.display()));
    let mut writer = writer::Writer::new(fd, req.dir.clone(), access, dir_mode).map_err(io)?;
    let now = writer.dir_owner().map_err(io)?;
    let mut taken = left::TakenOver::default();
    let before = match stale {
        Some(old) => {
            log::warn!(
                "{}: taking over the lock of a sink that is gone (pid {}); keeping its files \
                 that hold a valid token until they are replaced, removing the others",
                dir.display(),
                old.pid
            );
            let layout = writer::dirs(&identity_names(req));
            let now_ms = crate::policy::now_ms();
            taken = left::take_over(&mut writer, &old, declared, &layout, now_ms)
                .map_err(SinkError::Dir)?;
            writer::Owner {
                uid: old.dir_uid,
                gid: old.dir_gid,
                mode: old.dir_mode,
            }
        }
        None => now,
    };
    let mut held = HeldDir {
        record: dir::Record {
            pid: std::process::id(),
            dir_uid: before.uid,
            dir_gid: before.gid,
            dir_mode: before.mode,
            files: files_of(declared),
            dirs: writer::dirs(&identity_names(req)),
        },
        lock,
        writer,
        restore: (before != now).then_some(before),
        kept_until: taken.until,
    };
    let asked = req.uid.is_some() || req.gid.is_some() || req.mode.is_some();
    match held.lay_out(req, &taken.dirs, asked.then_some(u32::from(dir_mode))) {
        Ok(()) => Ok(held),
        Err(e) => {
            held.give_back();
            Err(e)
        }
    }
}

impl HeldDir {
    /// Refuses a DIR where one of our names exists already, makes the view directories,
    /// writes the record down and gives DIR the owner and `mode` asked for (if asked).
    fn lay_out(
        &mut self,
        req: &SinkRequest,
        held_dirs: &BTreeSet<String>,
        mode: Option<u32>,
    ) -> Result<(), SinkError> {
        let shown = |w: &writer::Writer, rel: &str| w.path(rel).display().to_string();
        let kept: BTreeSet<String> = self.writer.written().into_iter().collect();
        // A file in a view directory can only be there if the directory is; what was taken
        // over from a sink before is ours.
        let top = self.record.files.iter().chain(&self.record.dirs);
        let top = top.filter(|r| !r.contains('/') && !kept.contains(*r) && !held_dirs.contains(*r));
        for rel in top {
            if self.writer.exists(rel) {
                return Err(SinkError::Dir(format!(
                    "{} already exists and was not written by a cstokenfs sink: remove it or \
                     use an empty directory",
                    shown(&self.writer, rel)
                )));
            }
        }
        for rel in writer::dirs(&identity_names(req)) {
            if held_dirs.contains(&rel) {
                continue;
            }
            self.writer.make_dir(&rel).map_err(|e| {
                let shown = shown(&self.writer, &rel);
                // EPERM from the chown (a directory it cannot make is EACCES).
                let chown = e.raw_os_error() == Some(libc::EPERM);
                if chown && (req.uid.is_some() || req.gid.is_some()) {
                    owner_refused(&shown, req, &e)
                } else {
                    SinkError::Dir(format!("{shown}: {e}"))
                }
            })?;
        }
        self.lock
            .record(&self.record)
            .map_err(|e| SinkError::Dir(format!("{}: {e}", shown(&self.writer, LOCK_NAME))))?;
        let Some(mode) = mode else {
            return Ok(());
        };
        let io = |e: std::io::Error| {
            SinkError::Dir(format!(
                "{}: cannot give it the owner and mode asked for: {e}",
                self.writer.dir().display()
            ))
        };
        let before = self.writer.dir_owner().map_err(io)?;
        let set = self.writer.set_dir_owner(req.uid, req.gid, mode);
        let after = self.writer.dir_owner().map_err(io)?;
        if self.restore.is_none() && after != before {
            self.restore = Some(before);
        }
        match set {
            // Not ours to change (a Kubernetes emptyDir is root's, 0777): left as it is.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                log::warn!(
                    "{}: leaving its owner and mode as they are: {e}",
                    self.writer.dir().display()
                );
                Ok(())
            }
            other => other.map_err(io),
        }
    }

    /// Removes everything this sink wrote and made, gives DIR (the directory held, whatever
    /// is at its path now) its owner and mode back if they were changed, and lets go of the
    /// lock: DIR is as it was before.
    fn give_back(self) {
        for rel in self.writer.written() {
            if let Err(e) = self.writer.remove(&rel) {
                log::warn!("cannot remove {}: {e}", self.writer.path(&rel).display());
            }
        }
        for rel in self.record.dirs.iter().rev() {
            self.writer.remove_dir(rel);
        }
        if let Some(r) = self.restore {
            if let Err(e) = self.writer.set_dir_owner(Some(r.uid), Some(r.gid), r.mode) {
                log::warn!(
                    "{}: cannot give it its owner and mode back: {e}",
                    self.writer.dir().display()
                );
            }
        }
        self.lock.release(self.writer.dir_fd());
    }
}
