//! "Who read my token": each open of a token is logged (resource, view, pid, uid, gid and
//! executable path) at info, never the token. The FUSE thread names the executable while the
//! reader is still blocked in open (a `cat` is gone a moment later), once per process in a
//! row, and queues the event; a thread of its own writes the line.

use log::{info, warn};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Events waiting beyond this many are counted, not queued, so a flood of opens never
/// holds up a reader.
const QUEUE: usize = 4096;

pub struct OpenEvent {
    /// What the reader did: "open", or "lookup" with `--no-open` (opens never reach the daemon).
    pub kind: &'static str,
    pub resource: Arc<str>,
    pub view: &'static str,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub exe: Arc<str>,
}

/// A token served over HTTP (`--serve-endpoint`): the resource, the client's address and,
/// as far as the kernel could tell while the connection was open, who holds its socket.
pub struct HttpEvent {
    pub resource: Arc<str>,
    pub peer: Option<SocketAddr>,
    /// The uid owning the client's socket (`None`: not known).
    pub uid: Option<u32>,
    /// A process holding the client's socket and its executable (`None`: not found).
    pub process: Option<(u32, Arc<str>)>,
}

/// A token served over `--serve-imds`: the resource, the client's address and the uid that
/// owns its socket.
pub struct ImdsEvent {
    pub resource: Arc<str>,
    pub peer: Option<SocketAddr>,
    pub uid: u32,
}

/// A `--serve-imds` request refused (403) for its socket's uid. The writer thread looks for
/// the process holding socket `inode` in /proc (best effort, off the request's path).
pub struct RefusedEvent {
    pub peer: Option<SocketAddr>,
    /// `None` when the kernel could not say who owns the socket.
    pub uid: Option<u32>,
    pub inode: u32,
}

/// What the writer thread is handed.
enum Queued {
    Open(OpenEvent),
    Http(HttpEvent),
    Imds(ImdsEvent),
    Refused(RefusedEvent),
}

/// How an audit line names what was read: the resource, under `id/NAME/` for a declared
/// identity (the mount's own keeps the bare resource, as before).
pub fn label(identity: Option<&str>, resource: &crate::names::Resource) -> Arc<str> {
    match identity {
        None => resource.shared(),
        Some(name) => format!("id/{name}/{resource}").into(),
    }
}

thread_local! {
    /// The last process seen by this FUSE thread and its executable: a loop of opens by
    /// one process reads /proc once.
    static LAST_EXE: std::cell::RefCell<Option<(u32, Arc<str>)>> = const { std::cell::RefCell::new(None) };
}

/// The executable of `pid` (`?` when it cannot be read), its unprintable characters escaped
/// (any user names their own executables).
pub fn exe_of(pid: u32) -> Arc<str> {
    LAST_EXE.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((p, exe)) if *p == pid => exe.clone(),
            _ => {
                let exe: Arc<str> = std::fs::read_link(format!("/proc/{pid}/exe")).map_or_else(
                    |_| "?".into(),
                    |p| crate::names::escape_unprintable(&p.to_string_lossy()).into(),
                );
                *last = Some((pid, exe.clone()));
                exe
            }
        }
    })
}

#[derive(Clone)]
pub struct Audit {
    tx: SyncSender<Queued>,
    dropped: Arc<AtomicU64>,
}

impl Audit {
    pub fn start() -> std::io::Result<Audit> {
        let (tx, rx) = sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        std::thread::Builder::new()
            .name("audit".into())
            .stack_size(256 * 1024)
            .spawn(move || writer(rx, counter))?;
        Ok(Audit { tx, dropped })
    }

    /// Queues an event; never blocks.
    pub fn opened(&self, event: OpenEvent) {
        self.queue(Queued::Open(event));
    }

    /// Queues a token served over HTTP; never blocks.
    pub fn served(&self, event: HttpEvent) {
        self.queue(Queued::Http(event));
    }

    /// Queues a token served over `--serve-imds`; never blocks.
    pub fn served_imds(&self, event: ImdsEvent) {
        self.queue(Queued::Imds(event));
    }

    /// Queues a `--serve-imds` request refused for its uid; never blocks.
    pub fn refused_imds(&self, event: RefusedEvent) {
        self.queue(Queued::Refused(event));
    }

    fn queue(&self, event: Queued) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(event) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Logs each open; repeats of the same reader, resource and view within a second are
/// counted and summed up in one line, so a tight read loop cannot flood the log.
fn writer(rx: Receiver<Queued>, dropped: Arc<AtomicU64>) {
    let mut window: HashMap<Key, (u64, &'static str)> = HashMap::new();
    let mut window_start = Instant::now();
    loop {
        // Idle: sleep until the next open; otherwise until the window closes.
        let event = if window.is_empty() {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(WINDOW.saturating_sub(window_start.elapsed()))
        };
        if window_start.elapsed() >= WINDOW {
            for ((resource, view, who), (n, kind)) in window.drain().filter(|(_, (n, _))| *n > 0) {
                match who {
                    Who::Process { pid, uid, gid } => info!(
                        "audit: {n} more {kind}(s) of {resource} ({view}) by pid {pid} uid {uid} gid {gid}"
                    ),
                    Who::Peer { ip, uid } => info!(
                        "audit: {n} more request(s) of {resource} over HTTP from {} uid {}",
                        ip.map_or_else(|| "?".to_string(), |ip| ip.to_string()),
                        uid_shown(uid)
                    ),
                    Who::Socket { uid, ip } => info!(
                        "audit: {n} more {kind}(s) of {resource} over IMDS from {} uid {}",
                        ip.map_or_else(|| "?".to_string(), |ip| ip.to_string()),
                        uid_shown(uid)
                    ),
                }
            }
            window_start = Instant::now();
        }
        let e = match event {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let key = match &e {
            Queued::Open(e) => (
                e.resource.clone(),
                e.view,
                Who::Process {
                    pid: e.pid,
                    uid: e.uid,
                    gid: e.gid,
                },
            ),
            Queued::Http(e) => (
                e.resource.clone(),
                "endpoint",
                Who::Peer {
                    ip: e.peer.map(|p| p.ip()),
                    uid: e.uid,
                },
            ),
            Queued::Imds(e) => (
                e.resource.clone(),
                "imds",
                Who::Socket {
                    uid: Some(e.uid),
                    ip: e.peer.map(|p| p.ip()),
                },
            ),
            Queued::Refused(e) => (
                Arc::from("a token"),
                "imds-refused",
                Who::Socket {
                    uid: e.uid,
                    ip: e.peer.map(|p| p.ip()),
                },
            ),
        };
        if window.is_empty() {
            window_start = Instant::now();
        }
        if let Some((n, _)) = window.get_mut(&key) {
            *n += 1;
            continue;
        }
        let kind = match &e {
            Queued::Open(e) => e.kind,
            Queued::Http(_) | Queued::Imds(_) => "request",
            Queued::Refused(_) => "refused request",
        };
        window.insert(key, (0, kind));
        match e {
            Queued::Open(e) => info!(
                "audit: {} of {} ({}) by pid {} uid {} gid {} exe {}",
                e.kind, e.resource, e.view, e.pid, e.uid, e.gid, e.exe
            ),
            Queued::Http(e) => {
                let (pid, exe) = e.process.map_or_else(
                    || ("?".to_string(), Arc::from("?")),
                    |(p, x)| (p.to_string(), x),
                );
                info!(
                    "audit: request of {} over HTTP from {} uid {} pid {pid} exe {exe}",
                    e.resource,
                    e.peer.map_or_else(|| "?".to_string(), |p| p.to_string()),
                    uid_shown(e.uid)
                )
            }
            Queued::Imds(e) => info!(
                "audit: request of {} over IMDS from {} uid {}",
                e.resource,
                e.peer.map_or_else(|| "?".to_string(), |p| p.to_string()),
                e.uid
            ),
            Queued::Refused(e) => {
                let (pid, exe) = match crate::httpserver::peer::holder_of_socket(e.inode, e.uid) {
                    Some(pid) => (pid.to_string(), exe_of(pid)),
                    None => ("?".to_string(), Arc::from("?")),
                };
                warn!(
                    "audit: refused (403) an IMDS request from {} uid {} pid {pid} exe {exe}: \
                     that uid may not read this mount's token files",
                    e.peer.map_or_else(|| "?".to_string(), |p| p.to_string()),
                    uid_shown(e.uid)
                )
            }
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            warn!("audit: {lost} open(s) not logged: too many at once");
        }
    }
}

/// Who read: a process through the mount, an HTTP client (by address, any port, and its
/// socket's uid), or an IMDS client (by its socket's uid and address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Who {
    Process {
        pid: u32,
        uid: u32,
        gid: u32,
    },
    /// An endpoint caller: its address and the uid owning its socket (`None`: unknown).
    Peer {
        ip: Option<IpAddr>,
        uid: Option<u32>,
    },
    /// An IMDS caller: the uid owning its socket (`None`: unknown) and its address.
    Socket {
        uid: Option<u32>,
        ip: Option<IpAddr>,
    },
}

/// A uid for an audit line: `?` when it is not known.
fn uid_shown(uid: Option<u32>) -> String {
    uid.map_or_else(|| "?".to_string(), |u| u.to_string())
}

type Key = (Arc<str>, &'static str, Who);

const WINDOW: Duration = Duration::from_secs(1);
