//! `cstokenfs mount`: the FUSE front end. Checks before mounting (here), the session and
//! its life until a signal or an outside unmount (`session`), the kernel's side (`kernel`).
//! What every front end shares (the cache, the stand-in, signals, detaching, the log file)
//! is the daemon core's (`crate::daemon`).

mod kernel;
mod session;

use crate::daemon::{self, DaemonError, Detached, Ready};
use crate::mountinfo::is_fuse_mount;
use crate::names::Resource;
use crate::policy::Policy;
use crate::source::select::{Plan, Wanted};
use kernel::unmount;
use log::warn;
use std::fmt;
use std::path::{Path, PathBuf};

/// Everything `mount` was asked for.
#[derive(Debug, Clone)]
pub struct MountRequest {
    /// Where to mount, as given (an existing directory).
    pub mountpoint: PathBuf,
    /// Which upstream (`--source`, `--endpoint`, `--emulator`, identity flags).
    pub wanted: Wanted,
    /// `--resource` names as given (resolved once, by `preflight`).
    pub resources: Vec<String>,
    /// Freshness, timeouts, the negative cache, limits: the cache's rules.
    pub policy: Policy,
    /// `-f` (or `-d`): stay attached, log to stderr.
    pub foreground: bool,
    /// `-d`: foreground (set with it) and cstokenfs's own logs at debug level.
    pub debug: bool,
    /// `--log-file`: a detached daemon's stdout and stderr (else syslog).
    pub log_file: Option<PathBuf>,
    /// Owner of the files (default: who runs `mount`).
    pub uid: Option<u32>,
    /// Group of the files (default: who runs `mount`).
    pub gid: Option<u32>,
    /// Permission bits of token files (directories get the matching x bits).
    pub mode: u16,
    /// `allow_other`: every user may enter (the modes then decide).
    pub allow_other: bool,
    /// `allow_root`: root may enter too (implied by `auto_unmount` without `allow_other`).
    pub allow_root: bool,
    /// `auto_unmount`: fusermount3 detaches the mount when the daemon dies.
    pub auto_unmount: bool,
    /// `--mlock`: the daemon's memory stays out of swap.
    pub mlock: bool,
    /// `--no-open`: the kernel answers opens itself (see `fs::noopen`).
    pub no_open: bool,
    /// The source shown in the mount table.
    pub fsname: String,
    /// `--serve-endpoint`: also serve App Service's protocol here (loopback).
    pub serve_endpoint: Option<std::net::SocketAddr>,
    /// `--serve-imds`: also serve IMDS's protocol here (checked by `imds::check_address`).
    pub serve_imds: Option<std::net::SocketAddr>,
    /// `--metrics`: serve Prometheus metrics, /healthz and /readyz here (any address).
    pub metrics: Option<std::net::SocketAddr>,
    /// The registries `.acr/` serves (`--acr-audience`, `--acr-suffix`, `--acr-endpoint`).
    pub registries: crate::acr::Registries,
}

/// Why mounting failed: one line for the operator, naming the fix where there is one (a
/// failure at run time, exit 1); the variant says at which stage it arose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountError {
    /// Refused before anything was mounted: the mount point, the source, the resources,
    /// the log file, /dev/fuse.
    Setup(String),
    /// The kernel or fusermount3 refused the mount.
    Mount(String),
    /// The daemon could not start or keep running (fork, threads, signals, memory locking).
    Daemon(String),
    /// The detached daemon failed after it forked; its parent was told why and printed it.
    Reported,
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
}

impl fmt::Display for MountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MountError::Setup(m) | MountError::Daemon(m) => f.write_str(m),
            MountError::Mount(m) => write!(f, "mount failed: {m}"),
            MountError::Reported => f.write_str("the daemon failed after detaching"),
        }
    }
}

impl std::error::Error for MountError {}

impl From<DaemonError> for MountError {
    fn from(e: DaemonError) -> MountError {
        match e.is_setup() {
            true => MountError::Setup(e.to_string()),
            false => MountError::Daemon(e.to_string()),
        }
    }
}

/// What `preflight` found: where to mount, the upstream, the resolved `--resource` names.
struct Checked {
    /// The mount point, canonical.
    mountpoint: PathBuf,
    plan: Plan,
    /// `--resource` names resolved (what is sent upstream and held from the start).
    declared: Vec<Resource>,
}

/// Mounts as asked: in the foreground until a signal, or detached once live.
pub fn run(req: MountRequest) -> Result<(), MountError> {
    let checked = preflight(&req)?;
    if req.foreground {
        crate::logging::init_stderr(if req.debug {
            "info,cstokenfs=debug"
        } else {
            "info"
        });
        return session::serve(&req, checked, Ready::Nobody);
    }
    let log = match &req.log_file {
        Some(path) => Some(daemon::open_log(path)?),
        None => {
            daemon::say_if_logs_are_discarded();
            None
        }
    };
    // The child becomes the daemon and reports through a pipe once the mount is live. No
    // thread exists yet, so forking is safe.
    let detached = daemon::daemonize(
        log,
        "the daemon exited before the mount was live (run with -f to see why)",
        |ready| session::serve(&req, checked, ready),
    )?;
    match detached {
        Detached::Parent | Detached::Daemon { failed: false } => Ok(()),
        Detached::Daemon { failed: true } => Err(MountError::Reported),
    }
}

/// Checks that make a clear error before anything is mounted.
fn preflight(req: &MountRequest) -> Result<Checked, MountError> {
    let plan = daemon::plan(&req.wanted)?;
    let declared = req
        .resources
        .iter()
        .map(|name| {
            crate::names::resolve_arg(name)
                .map_err(|e| MountError::Setup(format!("--resource {name:?}: {e}")))
        })
        .collect::<Result<Vec<Resource>, MountError>>()?;
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
    Ok(Checked {
        mountpoint: path,
        plan,
        declared,
    })
}
