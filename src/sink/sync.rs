//! Keeps DIR in step with the cache: reads every declared resource once a pass (one
//! `Cache::read_now`, a use of the token, so it is refreshed ahead), writes its views when
//! the lease is of a new version valid for at least `UNLINK_LEAD`, removes them before the
//! version stops being valid (the lease's `valid_for`, the cache's judgement), waits for
//! what is missing, and rewrites `.status` on change. Files a sink before left (`left`)
//! stay until the first version replaces them, or go at their deadline.

use super::{Declared, HeldDir, SinkRequest};
use crate::cache::{Cache, Done, FrontEnd, Key, ReadError, Status, Use};
use crate::daemon::{self, Daemon, Handled, Ready, Signal};
use crate::names::Resource;
use crate::report::Report;
use crate::source::select::Plan;
use crate::token::{Version, View};
use log::{debug, error, info, warn};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::SinkError;
use crate::writer::{WriteError, STATUS};
use serde::Serialize;

/// The sink's part of `.status`.
#[derive(Clone, PartialEq, Serialize)]
struct SinkPart {
    sink: SinkDir,
}

#[derive(Clone, PartialEq, Serialize)]
struct SinkDir {
    dir: String,
    /// Names whose files are in DIR.
    written: Vec<String>,
    missing: Vec<Missing>,
}

/// A declared resource whose files are not in DIR, and why.
#[derive(Clone, PartialEq, Serialize)]
struct Missing {
    name: String,
    resource: String,
    reason: String,
}

/// A token's files go this long before the cache would stop serving it (`valid_until`, itself
/// 5 s or a tenth of the lifetime before expiry): more than a few passes of the loop, so
/// nothing in DIR is ever past it, and little enough that a refresh at the refresh point
/// (paced at most every 2 s) lands first even for tokens of a few seconds.
pub const UNLINK_LEAD: Duration = Duration::from_millis(500);
/// The loop looks at every resource at least this often.
const PASS: Duration = Duration::from_millis(100);
/// A resource whose files could not be written is tried again after this long.
const WRITE_AGAIN: Duration = Duration::from_secs(2);

/// A failure that repeats is logged once per change: one unlike the one before at WARN,
/// the same one again at debug (as the cache does for fetches).
#[derive(Default)]
struct Quiet(Option<String>);

impl Quiet {
    fn report(&mut self, message: String) {
        if self.is_news(&message) {
            warn!("{message}");
        } else {
            debug!("{message}");
        }
    }

    /// Whether `message` differs from the one before (which it now is).
    fn is_news(&mut self, message: &str) -> bool {
        let news = self.0.as_deref() != Some(message);
        self.0 = Some(message.to_string());
        news
    }

    fn clear(&mut self) {
        self.0 = None;
    }
}

enum Event {
    Signal(Signal),
    /// A read of the slot's resource that waited for a fetch ended (why, if it failed).
    Fetched(usize, Result<(), ReadError>),
}

/// One declared resource and what DIR holds of it.
struct Slot {
    /// The resource and the file name its views are written under.
    declared: Declared,
    /// The version whose views are in DIR.
    written: Option<Arc<Version>>,
    /// The files a sink before this one left (a valid token, kept until replaced), and
    /// when they must go if no new version replaced them.
    left_until: Option<Instant>,
    /// A read waits for a fetch (`read_now` answered later): its answer comes as
    /// `Event::Fetched`.
    pending: bool,
    /// Written or failed at least once (readiness).
    settled: bool,
    /// Reads in a row that ended in an error (0 after a token).
    failures: u32,
    /// The last read's error, shown in `.status` while nothing is written.
    last_error: Option<String>,
    /// After a failed read, the next read waits until then (backoff).
    retry_at: Instant,
    /// Why the last write of its files failed (until one succeeds).
    write_error: Option<String>,
    /// The next write after a failed one waits until then.
    write_again_at: Instant,
    /// Its write and removal failures, logged once per change.
    quiet: Quiet,
}

impl Slot {
    fn new(declared: Declared, now: Instant, left_until: Option<Instant>) -> Slot {
        Slot {
            declared,
            written: None,
            left_until,
            pending: false,
            settled: false,
            failures: 0,
            last_error: None,
            retry_at: now,
            write_error: None,
            write_again_at: now,
            quiet: Quiet::default(),
        }
    }

    /// Whether DIR holds its files (written by this sink, or left by one before).
    fn has_files(&self) -> bool {
        self.written.is_some() || self.left_until.is_some()
    }

    fn missing_reason(&self) -> Option<String> {
        if self.has_files() {
            return None;
        }
        Some(
            match (
                self.write_error.as_ref().or(self.last_error.as_ref()),
                self.pending,
            ) {
                (Some(e), _) => e.clone(),
                (None, true) => "fetching".into(),
                (None, false) => "no valid token held (waiting for a fetch)".into(),
            },
        )
    }
}

/// DIR as a mirror of the cache: what is written there of each declared resource, and
/// what `.status` last said. Owned by the sink's loop (`run`) alone: no lock.
struct Mirror<'a> {
    /// The daemon core's cache, read once a pass per slot (`read_now`).
    cache: Arc<Cache>,
    /// DIR, held (its lock, its writer).
    held: &'a HeldDir,
    /// One per declared resource, in `--resource` order; an index is a fetch's address.
    slots: Vec<Slot>,
    /// Where a fetch's outcome goes back to the loop (`Event::Fetched`).
    tx: Sender<Event>,
    /// Why the plan chose this upstream (`.status`'s `source_reason`).
    source_reason: String,
    /// The last `.status` written (its clock zeroed), so an unchanged one is not rewritten.
    last_status: Option<(Status, SinkPart)>,
    /// Failures to write `.status`, logged once per change.
    status_quiet: Quiet,
}

/// Starts the daemon core and keeps DIR in step until SIGTERM or SIGINT.
pub fn run(
    req: &SinkRequest,
    plan: Plan,
    declared: &[Declared],
    held: &HeldDir,
    signals: Handled,
    ready: Ready,
) -> Result<(), SinkError> {
    let resources: Vec<Resource> = declared.iter().map(|d| d.resource.clone()).collect();
    // The stand-in (with --emulator) outlives the daemon core (declared first, dropped
    // last); the core (the cache, its background pass) serves as long as the sink runs.
    let mut plan = plan;
    let _stand_in = match crate::stand_in::start(&mut plan) {
        Ok(s) => s,
        Err(e) => {
            let e = SinkError::from(e);
            ready.fail(&e);
            return Err(e);
        }
    };
    let daemon = match Daemon::start(plan, req.policy.clone(), &resources, false) {
        Ok(d) => d,
        Err(e) => {
            let e = SinkError::from(e);
            ready.fail(&e);
            return Err(e);
        }
    };
    let cache = daemon.cache().clone();
    let metrics = match req.metrics.map(|listen| {
        crate::metrics::Metrics::start(listen, "sink", cache.clone(), Default::default())
            .map_err(|e| SinkError::Daemon(format!("--metrics {listen}: {e}")))
    }) {
        Some(Err(e)) => {
            ready.fail(&e);
            return Err(e);
        }
        Some(Ok(m)) => Some(m),
        None => None,
    };
    info!(
        "sink {} (endpoint {}, refresh margin {} s, timeout {} s)",
        held.writer.dir().display(),
        cache.source().endpoint(),
        req.policy.refresh_margin_ms / 1000,
        req.policy.timeout.as_secs()
    );
    let (tx, rx) = mpsc::channel();
    let signal_handle = match signals.forward(tx.clone(), Event::Signal, false) {
        Ok(h) => h,
        Err(e) => {
            let e = SinkError::from(e);
            ready.fail(&e);
            return Err(e);
        }
    };
    let now = Instant::now();
    let mut sync = Mirror {
        cache,
        held,
        slots: declared
            .iter()
            .enumerate()
            .map(|(i, d)| Slot::new(d.clone(), now, held.kept_until.get(i).copied().flatten()))
            .collect(),
        tx,
        source_reason: daemon.source_reason().to_string(),
        last_status: None,
        status_quiet: Quiet::default(),
    };
    let mut ready = Some(ready);
    let mut outcome = Ok(());
    loop {
        if let Err(e) = sync.pass() {
            // DIR is no longer where its path leads: nothing more is written there.
            error!("{e}");
            if let Some(r) = ready.take() {
                r.fail(&e);
            }
            outcome = Err(e);
            break;
        }
        if ready.is_some() && sync.slots.iter().all(|s| s.settled) {
            if let Some(r) = ready.take() {
                info!("every declared resource was written or failed once");
                r.ok();
                crate::hardening::notify_systemd("READY=1");
                if let Some(m) = &metrics {
                    m.serving();
                }
            }
        }
        match rx.recv_timeout(PASS) {
            Ok(Event::Signal(Signal::DropTokens)) => sync.refetch_all(),
            Ok(Event::Signal(Signal::ReopenLog)) => {
                daemon::reopen_log(req.log_file.as_deref(), req.foreground)
            }
            Ok(Event::Signal(Signal::Stop(sig))) => {
                info!(
                    "signal {sig}: removing the files of {}",
                    held.writer.dir().display()
                );
                break;
            }
            Ok(Event::Fetched(i, outcome)) => sync.fetched(i, outcome),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    signal_handle.close();
    // Dropping the daemon core stops the background pass and the pool.
    drop(daemon);
    outcome
}

impl Mirror<'_> {
    /// One look at every resource, then `.status` if anything in it changed; an error if
    /// DIR's path no longer leads to the directory held.
    fn pass(&mut self) -> Result<(), SinkError> {
        let dir = self.held.writer.check_dir();
        dir.map_err(|e| SinkError::Dir(e.to_string()))?;
        for i in 0..self.slots.len() {
            self.sync_slot(i)?;
        }
        self.write_status()
    }

    /// One read of slot `i`'s resource: writes a new version valid for at least
    /// `UNLINK_LEAD`, removes the files of one that is not; a read that waits for a fetch
    /// answers later (`fetched`). Nothing is read while a read is under way, nor during the
    /// backoff after a failed one.
    fn sync_slot(&mut self, i: usize) -> Result<(), SinkError> {
        let slot = &self.slots[i];
        if slot.left_until.is_some_and(|t| Instant::now() >= t) {
            self.remove_views(i);
            let d = &self.slots[i].declared;
            warn!(
                "{}{}: the files a sink before left were not replaced in time: removed",
                d.under, d.resource
            );
        }
        let slot = &self.slots[i];
        if slot.pending || (slot.failures > 0 && Instant::now() < slot.retry_at) {
            return Ok(());
        }
        let resource = slot.declared.resource.clone();
        let key = Key::new(slot.declared.identity, resource.clone());
        let tx = self.tx.clone();
        let later: Done = Box::new(move |r| {
            let _ = tx.send(Event::Fetched(i, r.map(drop)));
        });
        // Every declared resource counts as read: the cache refreshes it ahead.
        match self.cache.read_now(&key, Use::Read, later) {
            Some(Ok(lease)) if lease.valid_for > UNLINK_LEAD => {
                let slot = &self.slots[i];
                let fresh = slot
                    .written
                    .as_ref()
                    .is_none_or(|w| w.id != lease.version.id);
                if fresh && Instant::now() >= slot.write_again_at {
                    self.write_views(i, lease.version)?;
                }
            }
            answer => {
                // Left by a sink before: they stay until `left_until` (checked above).
                if self.slots[i].written.is_some() {
                    self.remove_views(i);
                    // Named as the cache names it: `id/NAME/<resource>` for a declared identity.
                    let under = &self.slots[i].declared.under;
                    warn!("{under}{resource}: no refreshed token in time: its files were removed");
                }
                match answer {
                    None => self.slots[i].pending = true,
                    // A token too close to the end of its validity to be written, or an
                    // error at hand (a recent refusal).
                    Some(r) => self.fetched(i, r.map(drop)),
                }
            }
        }
        Ok(())
    }

    /// Writes every view of `v`, the raw token last; on a failure none stays.
    fn write_views(&mut self, i: usize, v: Arc<Version>) -> Result<(), SinkError> {
        let declared = self.slots[i].declared.clone();
        let mut views = View::ALL;
        views.rotate_left(1);
        let written = views.iter().try_for_each(|view| {
            self.held
                .writer
                .write(&declared.path(*view), v.bytes(*view))
        });
        let slot = &mut self.slots[i];
        slot.settled = true;
        match written {
            Ok(()) => {
                self.cache.meters().read(FrontEnd::SinkWrite);
                slot.written = Some(v);
                slot.left_until = None;
                slot.write_error = None;
                slot.quiet.clear();
            }
            Err(WriteError::DirGone(m)) => return Err(SinkError::Dir(m)),
            Err(WriteError::Io(e)) => {
                let why = format!("cannot write its files: {e}");
                slot.quiet
                    .report(format!("{}: {why}", slot.declared.resource));
                slot.write_error = Some(why);
                slot.write_again_at = Instant::now() + WRITE_AGAIN;
                self.remove_views(i);
            }
        }
        Ok(())
    }

    fn remove_views(&mut self, i: usize) {
        let slot = &mut self.slots[i];
        slot.written = None;
        slot.left_until = None;
        for view in View::ALL {
            let rel = slot.declared.path(view);
            if let Err(e) = self.held.writer.remove(&rel) {
                let shown = self.held.writer.path(&rel);
                slot.quiet
                    .report(format!("cannot remove {}: {e}", shown.display()));
            }
        }
    }

    fn fetched(&mut self, i: usize, outcome: Result<(), ReadError>) {
        let Some(slot) = self.slots.get_mut(i) else {
            return;
        };
        slot.pending = false;
        slot.settled = true;
        match outcome {
            Ok(()) => {
                slot.failures = 0;
                slot.last_error = None;
            }
            Err(e) => {
                slot.failures = slot.failures.saturating_add(1);
                let jitter = crate::hardening::jitter();
                let pause = crate::policy::backoff_ms(slot.failures, None, jitter);
                slot.retry_at = Instant::now() + Duration::from_millis(pause.max(0) as u64);
                slot.last_error = Some(e.to_string());
            }
        }
    }

    /// SIGUSR1: every token is dropped (their files removed) and fetched anew at once.
    fn refetch_all(&mut self) {
        self.cache.clear();
        for i in 0..self.slots.len() {
            if self.slots[i].left_until.is_some() {
                self.remove_views(i);
            }
        }
        for slot in &mut self.slots {
            slot.failures = 0;
            slot.retry_at = Instant::now();
            slot.write_again_at = Instant::now();
        }
    }

    /// `.status`: the mount's (`Cache::status` and the daemon's fields) plus which resources
    /// are written and which are missing and why; rewritten only when something changed.
    fn write_status(&mut self) -> Result<(), SinkError> {
        let status = self.cache.status();
        let missing: Vec<Missing> = self
            .slots
            .iter()
            .filter_map(|s| {
                let cache_error = status
                    .resources
                    .iter()
                    .find(|r| r.resource == s.declared.resource)
                    .and_then(|r| r.last_error.clone());
                let reason = match (s.missing_reason()?, cache_error) {
                    (_, Some(e)) if s.last_error.is_none() && s.write_error.is_none() => {
                        format!("not refreshed in time: {e}")
                    }
                    (why, _) => why,
                };
                Some(Missing {
                    name: format!("{}{}", s.declared.under, s.declared.name),
                    resource: s.declared.resource.to_string(),
                    reason,
                })
            })
            .collect();
        let sink = SinkPart {
            sink: SinkDir {
                dir: self.held.writer.dir().display().to_string(),
                written: self
                    .slots
                    .iter()
                    .filter(|s| s.has_files())
                    .map(|s| s.declared.name.clone())
                    .collect(),
                missing,
            },
        };
        // Rewritten only when something but the clock changed.
        let mut compared = status.clone();
        compared.now = 0;
        if self.last_status.as_ref() == Some(&(compared.clone(), sink.clone())) {
            return Ok(());
        }
        let bytes = Report::new(&status, &self.source_reason, &sink).to_bytes();
        match self.held.writer.write(STATUS, &bytes) {
            Ok(()) => {
                self.last_status = Some((compared, sink));
                self.status_quiet.clear();
            }
            Err(WriteError::DirGone(m)) => return Err(SinkError::Dir(m)),
            Err(WriteError::Io(e)) => self
                .status_quiet
                .report(format!("cannot write {STATUS}: {e}")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_news_once_until_another_comes_or_it_clears() {
        let mut q = Quiet::default();
        assert!(q.is_news("ENOSPC"));
        assert!(!q.is_news("ENOSPC"), "the same again: not news");
        assert!(q.is_news("ENOENT"));
        assert!(q.is_news("ENOSPC"));
        q.clear();
        assert!(q.is_news("ENOSPC"));
    }

    /// A resource whose files cannot be written says so in `.status`, whatever its fetches
    /// do meanwhile (not "fetching").
    #[test]
    fn a_write_failure_is_the_missing_reason_until_a_write_succeeds() {
        let declared = Declared {
            resource: crate::names::resolve("vault.azure.net").unwrap(),
            name: "vault.azure.net".into(),
            identity: crate::cache::IdentityId::DEFAULT,
            under: String::new(),
        };
        let mut slot = Slot::new(declared, Instant::now(), None);
        slot.pending = true;
        assert_eq!(slot.missing_reason().as_deref(), Some("fetching"));
        slot.write_error = Some("cannot write its files: No space left on device".into());
        assert_eq!(
            slot.missing_reason().as_deref(),
            Some("cannot write its files: No space left on device")
        );
        slot.last_error = Some("a fetch failed".into());
        assert!(slot
            .missing_reason()
            .is_some_and(|r| r.contains("No space left")));
    }
}
