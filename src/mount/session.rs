//! A mount's life: start-up (the daemon core, the endpoint, the FUSE core and session),
//! readiness, the event loop (signals, an outside unmount) and the way out. Everything
//! start-up built is held in [`Started`], which undoes it on drop, whether start-up fails
//! half way or the mount ends.

use super::kernel::{mount_error, open_session, unmount};
use super::{Checked, MountError, MountRequest};
use crate::access::Access;
use crate::daemon::{self, Daemon, DaemonError, Handled, Ready, Signal};
use crate::endpoint::Endpoint;
use crate::fs::Core;
use crate::imds::Imds;
use crate::metrics::Metrics;
use log::{info, warn};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// What wakes the mount's event loop.
enum Event {
    Signal(Signal),
    /// The FUSE session ended: the mount is gone (an outside unmount).
    SessionEnded,
}

/// A live mount: what start-up built, undone by dropping it. `Drop::drop` ends the session,
/// shuts the endpoint down and stops the daemon core's background pass and pool, in that
/// order; then the fields drop: the stand-in goes, and our own mount(2), if still armed, is
/// undone.
struct Started {
    /// The FUSE session's threads, until `serve` hands them to the thread that waits for
    /// the session's end. Dropped first: fuser unmounts what it mounted itself.
    session: Option<fuser::BackgroundSession>,
    /// Tells the kernel to drop cached names and pages (expiry, SIGUSR1, stopping).
    notifier: fuser::Notifier,
    /// `--serve-endpoint`'s server: shut down on drop.
    endpoint: Option<Endpoint>,
    /// `--serve-imds`'s server: shut down on drop.
    imds: Option<Imds>,
    /// `--metrics`' server: told when the mount is live, shut down on drop.
    metrics: Option<Metrics>,
    /// The filesystem core the session serves.
    core: Arc<Core>,
    /// The cache and its background pass.
    daemon: Daemon,
    /// `--emulator`: the stand-in the daemon core's plan points at; it goes after the core
    /// has stopped.
    _stand_in: Option<crate::emulator::Emulator>,
    /// Where this process mounted with its own mount(2) (as root), while mounted: fuser
    /// does not undo such a mount when the session goes, so `drop` does. `None` once the
    /// mount is known gone (unmounted on a signal, or from outside).
    own_mount: OwnMount,
}

/// Our own mount(2), undone on drop unless disarmed.
struct OwnMount(Option<PathBuf>);

impl OwnMount {
    /// The mount is gone already: nothing to undo.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for OwnMount {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = unmount(&path);
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        // The session goes before our own mount(2) is undone (a field, dropped last).
        drop(self.session.take());
        // No more requests from the endpoint before the cache stops.
        if let Some(endpoint) = &self.endpoint {
            endpoint.shutdown();
        }
        if let Some(imds) = &self.imds {
            imds.shutdown();
        }
        if let Some(metrics) = &self.metrics {
            metrics.shutdown();
        }
        // Then the cache stops fetching: readers still waiting are told the mount stops.
        self.daemon.stop();
    }
}

/// Mounts, tells `ready`, then serves until a signal or an outside unmount.
pub(super) fn serve(req: &MountRequest, checked: Checked, ready: Ready) -> Result<(), MountError> {
    let mountpoint = checked.mountpoint.clone();
    match start(req, checked) {
        Ok((started, signals)) => run(req, &mountpoint, started, signals, ready),
        Err(e) => {
            ready.fail(&e);
            Err(e)
        }
    }
}

/// Starts the waiting threads, says the mount is live, then answers events until the
/// mount ends.
fn run(
    req: &MountRequest,
    mountpoint: &Path,
    mut started: Started,
    signals: Handled,
    ready: Ready,
) -> Result<(), MountError> {
    // The two waiting threads start before the caller hears the mount is live; if one
    // cannot (under --mlock, RLIMIT_MEMLOCK), `started` is dropped, which unmounts.
    let (tx, rx) = mpsc::channel();
    let waiting = signals
        .forward(tx.clone(), Event::Signal, req.mlock)
        .and_then(|handle| {
            let session = started.session.take();
            daemon::small_thread("session")
                .spawn(move || {
                    if let Some(Err(e)) = session.map(|s| s.join()) {
                        warn!("the FUSE session ended with an error: {e}");
                    }
                    let _ = tx.send(Event::SessionEnded);
                })
                .map_err(|e| DaemonError::thread(e, req.mlock))?;
            Ok(handle)
        });
    let signal_handle = match waiting {
        Ok(h) => h,
        Err(e) => {
            // Undone (our own mount(2) included) before the caller hears of the failure.
            drop(started);
            let e = MountError::from(e);
            ready.fail(&e);
            return Err(e);
        }
    };
    info!(
        "mounted {} (endpoint {}, refresh margin {} s, timeout {} s{})",
        mountpoint.display(),
        started.daemon.cache().source().endpoint(),
        req.policy.refresh_margin_ms / 1000,
        req.policy.timeout.as_secs(),
        if req.mlock { ", memory locked" } else { "" }
    );
    if req.no_open {
        // Before any reader: the kernel learns no-open and no-flush from this open and close.
        crate::fs::noopen::first_open_and_close(mountpoint, Duration::from_secs(2));
    }
    ready.ok();
    crate::hardening::notify_systemd("READY=1");
    if let Some(metrics) = &started.metrics {
        metrics.serving();
    }

    while let Ok(event) = rx.recv() {
        match event {
            Event::Signal(Signal::DropTokens) => started.core.drop_tokens(),
            Event::Signal(Signal::ReopenLog) => {
                daemon::reopen_log(req.log_file.as_deref(), req.foreground)
            }
            Event::Signal(Signal::Stop(sig)) => {
                info!("signal {sig}: unmounting {}", mountpoint.display());
                // A file held open across our exit would otherwise keep reading the token
                // from the page cache, past its expiry.
                let n = started.core.stop_serving(&started.notifier);
                info!("dropped the cached pages of {n} token version(s)");
                if let Err(e) = unmount(mountpoint) {
                    warn!("unmounting {} failed: {e}", mountpoint.display());
                }
                started.own_mount.disarm();
                // The session ends once the kernel lets go; files still open may delay it.
                let _ = rx.recv_timeout(Duration::from_secs(2));
                break;
            }
            Event::SessionEnded => {
                info!("{} was unmounted", mountpoint.display());
                started.own_mount.disarm();
                break;
            }
        }
    }
    signal_handle.close();
    Ok(())
}

/// Everything up to a live mount: the daemon core, the endpoint, the FUSE core, the
/// session. Signals are registered before the mount is live, so a SIGTERM right after
/// `mount` returns counts.
fn start(req: &MountRequest, checked: Checked) -> Result<(Started, Handled), MountError> {
    daemon::harden("daemon", req.mlock)?;
    let signals = Handled::register()?;
    let mut plan = checked.plan;
    let stand_in = crate::stand_in::start(&mut plan)?;
    let daemon = Daemon::start(plan, req.policy.clone(), &checked.declared, req.mlock)?;
    daemon
        .cache()
        .serve_registries(req.registries.clone())
        .map_err(|e| MountError::Setup(format!("registry credentials: {e}")))?;
    if let Some(emu) = &stand_in {
        info!("serving tokens from the built-in emulator at {}", emu.url());
    }
    let no_thread = |e: std::io::Error| MountError::from(DaemonError::thread(e, req.mlock));
    let access = Access::asked(req.uid, req.gid, Some(req.mode));
    let audit = crate::audit::Audit::start().map_err(no_thread)?;
    let (endpoint, mut extras) = start_endpoint(req, daemon.cache(), &audit)?;
    let imds = start_imds(req, daemon.cache(), &audit, access, &mut extras)?;
    let metrics = start_metrics(req, daemon.cache(), (&endpoint, &imds), &mut extras)?;
    extras.no_open = req.no_open;
    let reason = daemon.source_reason();
    let core = Core::with_extras(daemon.cache().clone(), access, Some(audit), reason, extras);
    let mountpoint = &checked.mountpoint;
    let (session, direct) = open_session(req, &core, mountpoint)?;
    // From here on, our own mount(2) is undone if starting fails.
    let own_mount = OwnMount(direct.then(|| mountpoint.clone()));
    let notifier = session.notifier();
    if let Err(e) = core.start_expiry_watch(notifier.clone()) {
        drop(session);
        return Err(no_thread(e));
    }
    let session = session.spawn().map_err(|e| match e.raw_os_error() {
        Some(libc::EAGAIN) if req.mlock => no_thread(e),
        _ => mount_error(&e, mountpoint),
    })?;
    let started = Started {
        session: Some(session),
        notifier,
        endpoint,
        imds,
        metrics,
        core,
        daemon,
        _stand_in: stand_in,
        own_mount,
    };
    Ok((started, signals))
}

/// `--serve-endpoint`: the server (its own thread) and what the mount shows of it.
fn start_endpoint(
    req: &MountRequest,
    cache: &Arc<crate::cache::Cache>,
    audit: &crate::audit::Audit,
) -> Result<(Option<Endpoint>, crate::fs::Extras), MountError> {
    let Some(listen) = req.serve_endpoint else {
        return Ok((None, crate::fs::Extras::default()));
    };
    let settings = crate::endpoint::Settings {
        listen,
        timeout: req.policy.timeout,
    };
    let endpoint = Endpoint::start(settings, cache.clone(), Some(audit.clone()))
        .map_err(|e| MountError::Daemon(format!("--serve-endpoint {listen}: {e}")))?;
    info!(
        "serving the App Service managed-identity protocol at {}",
        endpoint.url()
    );
    let extras = crate::fs::Extras {
        env_file: Some(Arc::new(endpoint.env_file())),
        status: vec![("serve_endpoint", Arc::new(endpoint.status_part()))],
        ..Default::default()
    };
    Ok((Some(endpoint), extras))
}

/// `--metrics`: the server (its own thread) over the cache and the token listeners, and
/// its address in `.status`.
fn start_metrics(
    req: &MountRequest,
    cache: &Arc<crate::cache::Cache>,
    (endpoint, imds): (&Option<Endpoint>, &Option<Imds>),
    extras: &mut crate::fs::Extras,
) -> Result<Option<Metrics>, MountError> {
    let Some(listen) = req.metrics else {
        return Ok(None);
    };
    let mut parts = crate::metrics::Parts::default();
    if let Some(e) = endpoint {
        parts.listeners.push(("endpoint", e.counters()));
    }
    if let Some(i) = imds {
        parts.listeners.push(("imds", i.counters()));
    }
    let metrics = Metrics::start(listen, "mount", cache.clone(), parts)
        .map_err(|e| MountError::Daemon(format!("--metrics {listen}: {e}")))?;
    extras
        .status
        .push(("metrics", Arc::new(metrics.status_part())));
    Ok(Some(metrics))
}

/// `--serve-imds`: the server (its own thread), its line in `.env` (after the endpoint's,
/// if any) and its part of `.status`.
fn start_imds(
    req: &MountRequest,
    cache: &Arc<crate::cache::Cache>,
    audit: &crate::audit::Audit,
    access: Access,
    extras: &mut crate::fs::Extras,
) -> Result<Option<Imds>, MountError> {
    let Some(listen) = req.serve_imds else {
        return Ok(None);
    };
    let settings = crate::imds::Settings {
        listen,
        timeout: req.policy.timeout,
        access,
        reach: crate::imds::authz::Reach {
            // SAFETY: getuid cannot fail.
            mounter: unsafe { libc::getuid() },
            allow_other: req.allow_other,
        },
    };
    let imds = Imds::start(settings, cache.clone(), Some(audit.clone()))
        .map_err(|e| MountError::Daemon(format!("--serve-imds {listen}: {e}")))?;
    info!(
        "serving the IMDS managed-identity protocol at {}{}",
        imds.base_url(),
        crate::imds::PATH
    );
    // Sized once, so the copy of the endpoint's lines (its secret) is never reallocated
    // and left unwiped.
    let line = imds.env_line();
    let old = extras.env_file.as_ref().map_or(&[][..], |e| &e[..]);
    let mut env = zeroize::Zeroizing::new(Vec::with_capacity(old.len() + line.len()));
    env.extend_from_slice(old);
    env.extend_from_slice(line.as_bytes());
    extras.env_file = Some(Arc::new(env));
    extras
        .status
        .push(("serve_imds", Arc::new(imds.status_part())));
    Ok(Some(imds))
}
