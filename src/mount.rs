//! Mounting: checks before mounting, detaching once the mount is live, the session, and
//! signals (SIGTERM/SIGINT unmount, SIGUSR1 drops tokens, SIGHUP reopens the log file).

use crate::cache::Cache;
use crate::emulator::{Emulator, EmulatorConfig};
use crate::fs::{fuse::FuseAdapter, Access, Core};
use crate::policy::{Policy, SystemClock};
use crate::source::select::{self, Env, Plan, Wanted};
use log::{debug, info, warn};
use std::ffi::CString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
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

/// Detached without `--log-file`, logs go to syslog; where there is none, they are
/// discarded, and the caller is told once. Shared with `sink`.
pub(crate) fn say_if_logs_are_discarded() {
    if !crate::logging::syslog_available() {
        eprintln!(
            "cstokenfs: detached without --log-file and no syslog at {}: logs are discarded",
            crate::logging::SYSLOG_PATH
        );
    }
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
            "/dev/fuse is not open to ordinary users: make it mode 0666 as udev does              (chmod 0666 /dev/fuse), or mount as root"
                .into(),
        ));
    }
    if std::fs::read_dir(&path).is_ok_and(|mut d| d.next().is_some()) {
        eprintln!("cstokenfs: warning: {shown} is not empty; its files are hidden while mounted");
    }
    Ok((path, plan))
}

/// Who is told once the mount is live (or why it failed). Shared with `sink`.
pub(crate) enum Ready {
    Nobody,
    Pipe(File),
}

impl Ready {
    fn tell(self, outcome: &Result<(), MountError>) {
        self.tell_line(outcome.as_ref().err().map(|e| e.to_string()).as_deref());
    }

    /// `OK`, or `ERR` and why: what the parent of a detached daemon waits for.
    pub(crate) fn tell_line(self, error: Option<&str>) {
        if let Ready::Pipe(mut pipe) = self {
            let msg = match error {
                None => "OK\n".to_string(),
                Some(e) => format!("ERR {e}\n"),
            };
            let _ = pipe.write_all(msg.as_bytes());
        }
    }
}

/// Forks; the child becomes the daemon and reports through a pipe once the mount is live.
/// No thread exists yet, so forking is safe.
fn detach(
    req: &MountRequest,
    mountpoint: &Path,
    plan: Plan,
    log: Option<File>,
) -> Result<(), MountError> {
    daemonize(
        log,
        "the daemon exited before the mount was live (run with -f to see why)",
        |ready| serve(req, mountpoint, plan, ready),
    )
    .map_err(MountError::Daemon)
}

/// Forks; the child becomes a daemon (`become_daemon`), runs `child` with the pipe's
/// writing end and exits 1 if it fails; the parent returns once the child says `OK` (the
/// child's `ERR` line, or `early_exit` if it said nothing). Shared by `mount` and `sink`.
/// Call it while the process has a single thread: forking is safe only then.
pub(crate) fn daemonize<E>(
    log: Option<File>,
    early_exit: &str,
    child: impl FnOnce(Ready) -> Result<(), E>,
) -> Result<(), String> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned here only.
    let (read_end, write_end) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: the caller has a single thread here (nothing has spawned one yet).
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork: {}", std::io::Error::last_os_error())),
        0 => {
            drop(read_end);
            let to_syslog = log.is_none();
            let ok = become_daemon(log, write_end.as_raw_fd()).is_ok() && {
                if !(to_syslog && crate::logging::init_syslog("info")) {
                    crate::logging::init_stderr("info");
                }
                child(Ready::Pipe(write_end)).is_ok()
            };
            std::process::exit(i32::from(!ok))
        }
        _ => {
            drop(write_end);
            let mut answer = String::new();
            let mut reader = read_end;
            let _ = reader.read_to_string(&mut answer);
            match answer.lines().next() {
                Some("OK") => Ok(()),
                Some(line) => Err(line.trim_start_matches("ERR ").to_string()),
                None => Err(early_exit.to_string()),
            }
        }
    }
}

/// New session; stdin from /dev/null, stdout and stderr to the log file or /dev/null, so a
/// caller capturing our output (`$(cstokenfs mount ...)`) is released.
fn become_daemon(log: Option<File>, keep: i32) -> Result<(), MountError> {
    // SAFETY: setsid has no memory effects; it fails only if we lead a group, harmless.
    unsafe { libc::setsid() };
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| MountError::Daemon(format!("/dev/null: {e}")))?;
    let out = log.as_ref().unwrap_or(&null);
    for (from, to) in [(&null, 0), (out, 1), (out, 2)] {
        // SAFETY: dup2 onto the standard descriptors, which this process owns.
        if unsafe { libc::dup2(from.as_raw_fd(), to) } < 0 {
            return Err(MountError::Daemon(format!(
                "dup2: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    drop((null, log));
    let _ = std::env::set_current_dir("/");
    close_inherited_fds(keep);
    Ok(())
}

/// Closes every descriptor above stderr but `keep`: whatever the caller handed down (a pipe
/// it reads to EOF, say) must not stay open in the daemon.
fn close_inherited_fds(keep: i32) {
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for fd in fds.into_iter().filter(|fd| *fd > 2 && *fd != keep) {
        // SAFETY: the process is single-threaded here and every descriptor it owns through a
        // Rust object (the pipe to the caller) is `keep`; the rest were inherited.
        unsafe { libc::close(fd) };
    }
}

pub(crate) fn open_log(path: &Path) -> Result<File, MountError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| {
            MountError::Setup(format!("cannot open the log file: {}: {e}", path.display()))
        })
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
    let sig_tx = tx.clone();
    let waiting = small_thread("signals")
        .spawn(move || {
            let mut signals = signals;
            for sig in signals.forever() {
                if sig_tx.send(Event::Signal(sig)).is_err() {
                    break;
                }
            }
        })
        .and_then(|_| {
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
    let declared: Vec<String> = req
        .resources
        .iter()
        .filter_map(|n| crate::names::resolve_arg(n).ok())
        .collect();
    let cache = Cache::new(source, req.policy.clone(), &declared, Arc::new(SystemClock));
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

/// The filesystem type in the mount table, whoever mounts.
pub const FS_TYPE: &str = "fuse.cstokenfs";

/// Mounts and opens the FUSE session, with type `fuse.cstokenfs` either way: as root, our
/// own mount(2) (fuser's own mount(2) hard-codes `fuse`), then `Session::from_fd`; as an
/// ordinary user, with `auto_unmount` (which only fusermount3 can do), or where root's
/// mount(2) is refused (a container without CAP_SYS_ADMIN), fuser and fuse3's setuid
/// fusermount3, which names the type from the subtype. True: our own mount(2).
fn open_session(
    req: &MountRequest,
    core: &Arc<Core>,
    mountpoint: &Path,
) -> Result<(fuser::Session<FuseAdapter>, bool), MountError> {
    let acl = if req.allow_other {
        fuser::SessionACL::All
    } else if req.allow_root || req.auto_unmount {
        fuser::SessionACL::RootAndOwner
    } else {
        fuser::SessionACL::Owner
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(req.fsname.clone()),
        fuser::MountOption::Subtype("cstokenfs".into()),
        fuser::MountOption::RO,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoExec,
        fuser::MountOption::DefaultPermissions,
    ];
    if req.auto_unmount {
        config.mount_options.push(fuser::MountOption::AutoUnmount);
    }
    config.n_threads = Some(2);
    config.acl = acl;
    debug!(
        "mounting {} as {FS_TYPE} (source {:?}, access {acl:?}, auto_unmount {})",
        mountpoint.display(),
        req.fsname,
        req.auto_unmount
    );
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 && !req.auto_unmount {
        match mount_direct(&req.fsname, mountpoint, acl != fuser::SessionACL::Owner) {
            Ok(fd) => {
                let adapter = FuseAdapter::new(core.clone());
                return match fuser::Session::from_fd(adapter, fd, acl, config) {
                    Ok(session) => Ok((session, true)),
                    Err(e) => {
                        let _ = unmount(mountpoint);
                        Err(mount_error(&e, mountpoint))
                    }
                };
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                info!("mount(2) refused (EPERM): mounting through fusermount3");
            }
            Err(e) => return Err(mount_error(&e, mountpoint)),
        }
    }
    if req.auto_unmount && !fusermount3_on_path() {
        return Err(MountError::Mount(
            "auto_unmount needs fuse3's fusermount3 (install the fuse3 package)".into(),
        ));
    }
    fuser::Session::new(FuseAdapter::new(core.clone()), mountpoint, &config)
        .map(|s| (s, false))
        .map_err(|e| mount_error(&e, mountpoint))
}

fn fusermount3_on_path() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("fusermount3").is_file()))
}

/// mount(2) of type `fuse.cstokenfs` on a new /dev/fuse descriptor: read-only, nosuid,
/// nodev, noexec, default_permissions; `allow_other` lets the kernel pass other users'
/// requests (fuser then enforces allow_root itself).
fn mount_direct(
    fsname: &str,
    mountpoint: &Path,
    allow_other: bool,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")?;
    let root_mode = std::fs::metadata(mountpoint)?.mode() & libc::S_IFMT;
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={},rootmode={root_mode:o},user_id={uid},group_id={gid},default_permissions",
        dev.as_raw_fd()
    );
    if allow_other {
        data.push_str(",allow_other");
    }
    let nul = |_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL byte in a name");
    let source = CString::new(fsname).map_err(nul)?;
    let target = CString::new(mountpoint.as_os_str().as_bytes()).map_err(nul)?;
    let fstype = CString::new(FS_TYPE).map_err(nul)?;
    let data = CString::new(data).map_err(nul)?;
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(dev.into())
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

fn mount_error(e: &std::io::Error, mountpoint: &Path) -> MountError {
    if e.to_string().contains("user_allow_other") {
        return MountError::Mount(
            "--allow-other, --allow-root or --auto-unmount (which implies allow_root) as an \
             ordinary user needs a line `user_allow_other` in /etc/fuse.conf"
                .into(),
        );
    }
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => MountError::Mount(format!(
            "not permitted to mount on {}: run as root, install fuse3 (fusermount3), or in Docker \
             add --device /dev/fuse --cap-add SYS_ADMIN",
            mountpoint.display()
        )),
        Some(libc::ENOENT) if !Path::new("/dev/fuse").exists() => MountError::no_fuse(),
        _ => MountError::Mount(format!("{}: {e}", mountpoint.display())),
    }
}

pub(crate) fn reopen_log(path: Option<&Path>, foreground: bool) {
    let (Some(path), false) = (path, foreground) else {
        return;
    };
    match open_log(path) {
        Ok(file) => {
            // SAFETY: dup2 onto our own stdout/stderr.
            unsafe {
                libc::dup2(file.as_raw_fd(), 1);
                libc::dup2(file.as_raw_fd(), 2);
            }
            info!("log file reopened");
        }
        Err(e) => warn!("{e}"),
    }
}

/// Unmounts `path`: `umount2` as root (lazily if busy), else fuse3's `fusermount3 -u`.
pub fn unmount(path: &Path) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // SAFETY: c is a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(err);
        }
        // SAFETY: as above.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            return Ok(());
        }
        return Err(std::io::Error::last_os_error());
    }
    for args in [["-u"].as_slice(), ["-u", "-z"].as_slice()] {
        let status = std::process::Command::new("fusermount3")
            .args(args)
            .arg(path)
            .status()?;
        if status.success() {
            return Ok(());
        }
    }
    Err(std::io::Error::other("fusermount3 -u failed"))
}

/// Whether `path` is itself a FUSE mount point (per /proc/self/mountinfo).
pub fn is_fuse_mount(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.as_os_str().as_bytes();
    info.lines().any(|line| {
        let mut fields = line.split(' ');
        let point = fields.nth(4).map(unescape);
        let fstype = line
            .split(" - ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next());
        point.as_deref() == Some(want)
            && fstype.is_some_and(|t| t == "fuse" || t.starts_with("fuse."))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (b[i], octal) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}
