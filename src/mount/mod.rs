//! Mounting: checks before mounting, detaching once the mount is live, the session, and
//! signals (SIGTERM/SIGINT unmount, SIGUSR1 drops tokens, SIGHUP reopens the log file).

mod daemon;
mod kernel;

use crate::cache::Cache;
use crate::emulator::{Emulator, EmulatorConfig};
use crate::fs::{Access, Core};
use crate::policy::{Policy, SystemClock};
use crate::source::select::{self, Env, Plan, Wanted};
use daemon::detach;
pub(crate) use daemon::{daemonize, open_log, reopen_log, say_if_logs_are_discarded, Ready};
pub(crate) use kernel::mount_table;
use kernel::{is_fuse_mount, mount_error, open_session, unmount};
use log::{debug, info, warn};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// Everything `mount` was asked for.
#[derive(Debug, Clone)]
pub struct MountRequest {
    pub mountpoint: PathBuf,
    /// Which upstream (`--source`, `--endpoint`, `--emulator`, identity flags).
    pub wanted: Wanted,
    pub resources: Vec<String>,
    pub policy: Policy,
    pub foreground: bool,
    /// `-d`: foreground (set with it) and cstokenfs's own logs at debug level.
    pub debug: bool,
    pub log_file: Option<PathBuf>,
    /// Owner and group of the files (default: who runs `mount`) and their mode.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: u16,
    pub allow_other: bool,
    /// `allow_root`: root may enter too (implied by `auto_unmount` without `allow_other`).
    pub allow_root: bool,
    /// `auto_unmount`: fusermount3 detaches the mount when the daemon dies.
    pub auto_unmount: bool,
    pub mlock: bool,
    /// `--no-open`: the kernel answers opens itself (see `fs::noopen`).
    pub no_open: bool,
    /// The source shown in the mount table.
    pub fsname: String,
    /// `--serve-endpoint`: also serve App Service's protocol here (loopback).
    pub serve_endpoint: Option<std::net::SocketAddr>,
}

/// Why mounting failed: one line for the operator, naming the fix where there is one. Its
/// callers show it and exit 1 (`exit_code`); the variant says at which stage it arose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountError {
    /// Refused before anything was mounted: the mount point, the source, the resources,
    /// the log file, /dev/fuse.
    Setup(String),
    /// The kernel or fusermount3 refused the mount.
    Mount(String),
    /// The daemon could not start or keep running (fork, threads, signals, memory locking).
    Daemon(String),
}

impl MountError {
    fn no_fuse() -> MountError {
        MountError::Setup(
            "/dev/fuse is missing: load the fuse module (modprobe fuse), or in Docker run the \
             container with --device /dev/fuse --cap-add SYS_ADMIN"
                .into(),
        )
    }

    fn already_mounted(p: &Path) -> MountError {
        MountError::Setup(format!(
            "{} is already a live FUSE mount: unmount it first (umount {0} or fusermount3 -u {0})",
            p.display()
        ))
    }

    /// The process's exit code for it (every stage: 1; usage errors are clap's, 2).
    pub fn exit_code(&self) -> u8 {
        1
    }
}

impl fmt::Display for MountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MountError::Setup(m) | MountError::Daemon(m) => f.write_str(m),
            MountError::Mount(m) => write!(f, "mount failed: {m}"),
        }
    }
}

impl std::error::Error for MountError {}

/// Mounts as asked: in the foreground until a signal, or detached once live.
pub fn run(req: MountRequest) -> Result<(), MountError> {
    let (mountpoint, plan) = preflight(&req)?;
    if req.foreground {
        crate::logging::init_stderr(if req.debug {
            "info,cstokenfs=debug"
        } else {
            "info"
        });
        return serve(&req, &mountpoint, plan, Ready::Nobody);
    }
    let log = match &req.log_file {
        Some(path) => Some(open_log(path)?),
        None => {
            say_if_logs_are_discarded();
            None
        }
    };
    detach(&req, &mountpoint, plan, log)
}

/// Checks that make a clear error before anything is mounted.
fn preflight(req: &MountRequest) -> Result<(PathBuf, Plan), MountError> {
    let plan =
        select::plan(&req.wanted, &Env::current()).map_err(|e| MountError::Setup(e.to_string()))?;
    for name in &req.resources {
        crate::names::resolve_arg(name)
            .map_err(|e| MountError::Setup(format!("--resource {name:?}: {e}")))?;
    }
    let shown = req.mountpoint.display();
    let meta = match std::fs::metadata(&req.mountpoint) {
        Ok(m) => m,
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            warn!("{shown} is a dead FUSE mount (its daemon is gone): detaching it");
            eprintln!("cstokenfs: {shown} was a dead FUSE mount; detached it");
            unmount(&req.mountpoint).map_err(|e| {
                MountError::Setup(format!(
                    "{shown} is a dead FUSE mount and cannot be detached: {e}"
                ))
            })?;
            std::fs::metadata(&req.mountpoint)
                .map_err(|e| MountError::Setup(format!("mount point {shown}: {e}")))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(MountError::Setup(format!(
                "mount point {shown} does not exist: create it first (mkdir -p {shown})"
            )))
        }
        Err(e) => return Err(MountError::Setup(format!("mount point {shown}: {e}"))),
    };
    if !meta.is_dir() {
        return Err(MountError::Setup(format!(
            "mount point {shown} is not a directory"
        )));
    }
    let path = req
        .mountpoint
        .canonicalize()
        .map_err(|e| MountError::Setup(format!("mount point {shown}: {e}")))?;
    if is_fuse_mount(&path) {
        return Err(MountError::already_mounted(&path));
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(MountError::no_fuse());
    }
    // SAFETY: geteuid cannot fail; access() only reads the path.
    let usable = unsafe {
        libc::geteuid() == 0 || libc::access(c"/dev/fuse".as_ptr(), libc::R_OK | libc::W_OK) == 0
    };
    if !usable {
        return Err(MountError::Mount(
            "/dev/fuse is not open to ordinary users: make it mode 0666 as udev does \
             (chmod 0666 /dev/fuse), or mount as root"
                .into(),
        ));
    }
    if std::fs::read_dir(&path).is_ok_and(|mut d| d.next().is_some()) {
        eprintln!("cstokenfs: warning: {shown} is not empty; its files are hidden while mounted");
    }
    Ok((path, plan))
}

enum Event {
    Signal(i32),
    SessionEnded,
}

/// Mounts, tells `ready`, then serves until a signal or an outside unmount.
fn serve(
    req: &MountRequest,
    mountpoint: &Path,
    plan: Plan,
    ready: Ready,
) -> Result<(), MountError> {
    let started = start(req, mountpoint, plan);
    let (session, cache, signals, _emulator, core, notifier, endpoint, direct) = match started {
        Ok(s) => s,
        Err(e) => {
            ready.tell(&Err(e.clone()));
            return Err(e);
        }
    };
    // The two waiting threads start before the caller hears the mount is live; if one
    // cannot (under --mlock, RLIMIT_MEMLOCK), the session is dropped, which unmounts.
    let (tx, rx) = mpsc::channel();
    let signal_handle = signals.handle();
    let waiting = forward_signals(signals, tx.clone(), Event::Signal).and_then(|_| {
        small_thread("session").spawn(move || {
            if let Err(e) = session.join() {
                warn!("the FUSE session ended with an error: {e}");
            }
            let _ = tx.send(Event::SessionEnded);
        })
    });
    if let Err(e) = waiting {
        if direct {
            let _ = unmount(mountpoint);
        }
        let e = thread_error(req.mlock, &e);
        ready.tell(&Err(e.clone()));
        return Err(e);
    }
    info!(
        "mounted {} (endpoint {}, refresh margin {} s, timeout {} s{})",
        mountpoint.display(),
        cache.source().endpoint(),
        req.policy.refresh_margin_ms / 1000,
        req.policy.timeout.as_secs(),
        if req.mlock { ", memory locked" } else { "" }
    );
    if req.no_open {
        // Before any reader: the kernel learns no-open and no-flush from this open and close.
        crate::fs::noopen::first_open_and_close(mountpoint, Duration::from_secs(2));
    }
    ready.tell(&Ok(()));
    crate::hardening::notify_systemd("READY=1");

    while let Ok(event) = rx.recv() {
        match event {
            Event::Signal(libc::SIGUSR1) => core.drop_tokens(),
            Event::Signal(libc::SIGHUP) => reopen_log(req.log_file.as_deref(), req.foreground),
            Event::Signal(sig) => {
                info!("signal {sig}: unmounting {}", mountpoint.display());
                // A file held open across our exit would otherwise keep reading the token
                // from the page cache, past its expiry.
                let n = core.stop_serving(&notifier);
                info!("dropped the cached pages of {n} token version(s)");
                if let Err(e) = unmount(mountpoint) {
                    warn!("unmounting {} failed: {e}", mountpoint.display());
                }
                // The session ends once the kernel lets go; files still open may delay it.
                let _ = rx.recv_timeout(Duration::from_secs(2));
                break;
            }
            Event::SessionEnded => {
                info!("{} was unmounted", mountpoint.display());
                break;
            }
        }
    }
    signal_handle.close();
    if let Some(endpoint) = endpoint {
        endpoint.shutdown();
    }
    cache.stop_background();
    Ok(())
}

type Started = (
    fuser::BackgroundSession,
    Arc<Cache>,
    signal_hook::iterator::Signals,
    Option<Emulator>,
    Arc<Core>,
    fuser::Notifier,
    Option<crate::endpoint::Endpoint>,
    bool,
);

/// A thread that only waits (signals, the session's end): a small stack.
fn small_thread(name: &str) -> std::thread::Builder {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(128 * 1024)
}

/// A thread that could not start. Under --mlock every new thread's stack counts against
/// RLIMIT_MEMLOCK (EAGAIN): say so, with the fix.
fn thread_error(mlock: bool, e: &std::io::Error) -> MountError {
    if mlock && e.raw_os_error() == Some(libc::EAGAIN) {
        MountError::Daemon(crate::hardening::mlock_error(e).to_string())
    } else {
        MountError::Daemon(format!("cannot start a thread: {e}"))
    }
}

fn start(req: &MountRequest, mountpoint: &Path, plan: Plan) -> Result<Started, MountError> {
    if let Err(e) = crate::hardening::set_not_dumpable() {
        warn!("cannot make the daemon non-dumpable: {e}");
    }
    if req.mlock {
        crate::hardening::lock_memory().map_err(|e| MountError::Daemon(e.to_string()))?;
    }
    let no_thread = |e: std::io::Error| thread_error(req.mlock, &e);
    // Registered before the mount is live, so a SIGTERM right after `mount` returns counts.
    let signals =
        handled_signals().map_err(|e| MountError::Daemon(format!("cannot handle signals: {e}")))?;
    let mut plan = plan;
    let emulator = start_stand_in(&mut plan)
        .map_err(|e| MountError::Daemon(format!("cannot start the emulator: {e}")))?;
    let source = plan.build().map_err(|e| MountError::Setup(e.to_string()))?;
    info!("source {}: {}", plan.kind, plan.reason);
    if let Some(emu) = &emulator {
        info!("serving tokens from the built-in emulator at {}", emu.url());
    }
    let declared: Vec<_> = req
        .resources
        .iter()
        .filter_map(|n| crate::names::resolve_arg(n).ok())
        .collect();
    let cache = Cache::new(
        crate::cache::Identities::one(source),
        req.policy.clone(),
        &crate::cache::Key::defaults(&declared),
        Arc::new(SystemClock),
    );
    cache.start_background().map_err(no_thread)?;
    let access = Access {
        // SAFETY: getuid/getgid cannot fail.
        uid: req.uid.unwrap_or_else(|| unsafe { libc::getuid() }),
        gid: req.gid.unwrap_or_else(|| unsafe { libc::getgid() }),
        file_mode: req.mode,
    };
    let audit = crate::audit::Audit::start().map_err(no_thread)?;
    let (endpoint, mut extras) = start_endpoint(req, &cache, &audit)?;
    extras.no_open = req.no_open;
    let core = Core::with_extras(cache.clone(), access, Some(audit), &plan.reason, extras);
    let (session, direct) = open_session(req, &core, mountpoint)?;
    // A mount of our own mount(2) is not undone by fuser when the session goes: undo it
    // here if starting fails.
    let undo = |e: MountError| {
        if direct {
            let _ = unmount(mountpoint);
        }
        e
    };
    let notifier = session.notifier();
    if let Err(e) = core.start_expiry_watch(notifier.clone()) {
        drop(session);
        return Err(undo(no_thread(e)));
    }
    let session = session
        .spawn()
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EAGAIN) if req.mlock => thread_error(true, &e),
            _ => mount_error(&e, mountpoint),
        })
        .map_err(undo)?;
    Ok((
        session, cache, signals, emulator, core, notifier, endpoint, direct,
    ))
}

/// With `--emulator`, starts the built-in emulator for the plan's upstream on an ephemeral
/// loopback port and points the plan at it; the emulator serves as long as it is kept.
pub fn start_stand_in(plan: &mut Plan) -> std::io::Result<Option<Emulator>> {
    let Some(kind) = plan.emulated() else {
        return Ok(None);
    };
    let emu = Emulator::start_with(([127, 0, 0, 1], 0).into(), EmulatorConfig::default(), kind)?;
    plan.use_stand_in(emu.url(), emu.identity_header());
    Ok(Some(emu))
}

/// Sends every signal `signals` catches into `tx` (as `event(signal)`) from a small thread
/// of its own, until the receiver is gone. Shared with `sink`.
pub(crate) fn forward_signals<E: Send + 'static>(
    signals: signal_hook::iterator::Signals,
    tx: mpsc::Sender<E>,
    event: fn(i32) -> E,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    small_thread("signals").spawn(move || {
        let mut signals = signals;
        for sig in signals.forever() {
            if tx.send(event(sig)).is_err() {
                break;
            }
        }
    })
}

/// The signals a daemon answers (SIGTERM/SIGINT stop, SIGUSR1 refetches, SIGHUP reopens the
/// log), registered at once. Shared with `sink`.
pub(crate) fn handled_signals() -> std::io::Result<signal_hook::iterator::Signals> {
    signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1])
}

/// `--serve-endpoint`: the server (its own thread) and what the mount shows of it.
fn start_endpoint(
    req: &MountRequest,
    cache: &Arc<Cache>,
    audit: &crate::audit::Audit,
) -> Result<(Option<crate::endpoint::Endpoint>, crate::fs::Extras), MountError> {
    let Some(listen) = req.serve_endpoint else {
        return Ok((None, crate::fs::Extras::default()));
    };
    let settings = crate::endpoint::Settings {
        listen,
        identity: req.wanted.identity.clone(),
        timeout: req.policy.timeout,
    };
    let endpoint = crate::endpoint::Endpoint::start(settings, cache.clone(), Some(audit.clone()))
        .map_err(|e| MountError::Daemon(format!("--serve-endpoint {listen}: {e}")))?;
    info!(
        "serving the App Service managed-identity protocol at {}",
        endpoint.url()
    );
    let extras = crate::fs::Extras {
        env_file: Some(Arc::new(endpoint.env_file())),
        status: Some(("serve_endpoint", Arc::new(endpoint.status_part()))),
        ..Default::default()
    };
    Ok((Some(endpoint), extras))
}
