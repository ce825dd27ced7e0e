//! The token cache: one entry per key (identity, resource), single-flight fetches run by a
//! small pool (a reader never blocks a FUSE thread or another resource, a flood of names
//! never costs a thread each), a bounded negative cache of refusals apart from the tokens,
//! refresh ahead in the background, eviction. A reader asks once ([`Cache::read`]) and gets
//! a [`Lease`] decided under one lock. Decisions come from `policy`; the upstream's rate
//! limit and known-down state are in `upstream`.
//!
//! # Locks
//!
//! - `Cache::state` (entries and refusals) is held only to decide and to record: never
//!   while the upstream is asked, a job is queued (`Pool`'s lock), a `done` callback runs
//!   (it may read again, on this very thread), or the upstream's locks are taken. Never call
//!   a `done` callback while holding it.
//! - `Cache::stopped` is held by the background thread for the whole of each pass (so
//!   `stop_background` waits for a pass in progress); it is taken before `state` and the
//!   pool's lock, never while holding either.
//! - The pool's queue lock (`pool.rs`) and the upstream's `limiter` and `reach` locks
//!   (`upstream.rs`) are leaves: nothing else is locked while they are held. So is the
//!   lock of the identities added at run time (`identities.rs`): taken under `state` to
//!   name a key in a log line, and it takes nothing. So are the meters' (`meters.rs`: the
//!   histograms' and the per-identity request counts'), taken for one update or one copy.

mod acr;
mod entry;
mod gauges;
mod identities;
mod meters;
mod pool;
mod status;
mod upstream;

pub use crate::key::{IdentityId, Key};
use crate::names::Resource;
use crate::policy::Clock;
use crate::policy::{self, EpochMs, Policy, ReadDecision, Schedule, Verdict};
use crate::source::{Failure, Source, SourceError};
use crate::token::{Token, Version};
use entry::{shrink, Entry, Failures, Refusal, Refusals};
pub use gauges::KeyGauge;
pub use identities::{Identities, NotDeclared, Query, IMDS_PARAMS};
use log::{debug, info, warn};
pub use meters::{FrontEnd, Meters, RequestCounts};
use parking_lot::{Condvar, Mutex};
use pool::{Job, Pool, Pushed};
pub use status::Status;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use upstream::Upstream;

/// Why a reader gets no token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The upstream refused this resource (ENOENT).
    Refused(String),
    /// The upstream refused the identity: 401, 403, an unknown user-assigned identity (EACCES).
    Denied(String),
    /// No valid token could be had in time (EIO).
    Unavailable(String),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Refused(m) => write!(f, "refused by the endpoint: {m}"),
            ReadError::Denied(m) => write!(f, "access denied by the endpoint: {m}"),
            ReadError::Unavailable(m) => write!(f, "no token: {m}"),
        }
    }
}

impl std::error::Error for ReadError {}

/// How a failed fetch reads to a reader: by the failure's kind, with its (redacted) message.
impl From<&SourceError> for ReadError {
    fn from(e: &SourceError) -> ReadError {
        let message = e.to_string();
        match e.failure() {
            Failure::Refused => ReadError::Refused(message),
            Failure::Denied => ReadError::Denied(message),
            Failure::Transient | Failure::Invalid => ReadError::Unavailable(message),
        }
    }
}

/// Pause between asking an upstream that keeps returning a token about to expire.
const EXPIRED_ON_ARRIVAL_PAUSE: Duration = Duration::from_millis(1_000);
/// Stack of a fetch worker: a blocking HTTP call and a JSON parse (serde_json limits depth).
const WORKER_STACK: usize = 512 * 1024;

/// Called once with the outcome of a read; may run on a fetch thread.
pub type Done = Box<dyn FnOnce(Result<Lease, ReadError>) + Send>;

/// What a read tells the cache about the use of a token: use earns a refresh ahead of the
/// refresh point (a token read once must not be refreshed forever), and every read counts
/// for the eviction order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// The token is used: an open that is a later read, the endpoint, the sink.
    Read,
    /// Not a use by itself: a lookup whose open is the read, the open that echoes a lookup
    /// which waited for the fetch, the `get` command.
    Look,
    /// A use unless this very read waited for the fetch that made the version: a lookup in
    /// no-open mode (the only request of a read that the daemon sees).
    ReadUnlessFetched,
    /// `/readyz` asking for a declared key: not a use, and not a reader in the metrics (no
    /// wait, join or negative-cache answer is counted).
    Probe,
}

impl Use {
    /// Whether the read is a use of the token (it earns a refresh ahead).
    fn uses(self) -> bool {
        matches!(self, Use::Read | Use::ReadUnlessFetched)
    }
}

/// What a reader gets: a version and the cache's verdict on it when the read was decided.
#[derive(Clone)]
pub struct Lease {
    pub version: Arc<Version>,
    /// How long the version stays valid, counted from the decision (never zero: an expired
    /// version gets no lease).
    pub valid_for: Duration,
    /// No newer version of its resource existed: a new open may serve it.
    pub current: bool,
    /// This read waited for the fetch that made the version.
    pub fetched: bool,
}

impl Lease {
    /// The lease on `v` at `now`, `current` when no newer version exists; `None` once `v`
    /// has expired. The verdict is the policy's.
    fn of(now: EpochMs, v: &Arc<Version>, current: bool, fetched: bool) -> Option<Lease> {
        let (valid_for_ms, current) = match policy::verdict(now, &v.schedule, current) {
            Verdict::Current { valid_for_ms } => (valid_for_ms, true),
            Verdict::Superseded { valid_for_ms } => (valid_for_ms, false),
            Verdict::Expired => return None,
        };
        Some(Lease {
            version: v.clone(),
            valid_for: Duration::from_millis(valid_for_ms.max(0) as u64),
            current,
            fetched,
        })
    }
}

/// The version an open asked for is superseded or expired: the reader must look the name
/// up again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stale;

/// A token as it arrived, with its schedule (computed once, on arrival).
struct Arrival {
    token: Token,
    schedule: Schedule,
    /// When it arrived.
    at: EpochMs,
}

impl Arrival {
    /// Expired already on arrival (an upstream that caches, near expiry).
    fn expired(&self) -> bool {
        policy::verdict(self.at, &self.schedule, true) == Verdict::Expired
    }
}

/// A reader waiting for a fetch.
pub(crate) struct Waiter {
    done: Done,
    /// The read is a use of the token (`Use::Read`): the version it gets is marked in use.
    marks_use: bool,
    /// When it began to wait (the clock's monotonic time), for `Meters::read_wait`; `None`
    /// for a probe, which the metrics do not count as a reader.
    since: Option<std::time::Instant>,
}

impl Waiter {
    /// Answers the reader, counting how long it waited.
    fn answer(self, meters: &Meters, now: std::time::Instant, got: Result<Lease, ReadError>) {
        if let Some(since) = self.since {
            let waited = now.saturating_duration_since(since);
            meters.read_wait.observe(waited.as_secs_f64());
        }
        (self.done)(got);
    }
}

/// Everything behind the cache's one lock (`Cache::state`).
#[derive(Default)]
struct State {
    /// Keys that are declared, hold a token or are being fetched. Readers (`read`,
    /// `reopen`) and the fetch workers (`run`) change them; the background pass drops
    /// expired tokens and idle entries; `status`, `listed` and `judge` look.
    entries: HashMap<Key, Entry>,
    /// The negative cache: keys the upstream refused recently, apart from `entries` so a
    /// flood of refused names never evicts a token. Written by `run`, expired by the
    /// background pass, read by `read` and `status`.
    refusals: Refusals,
}

/// The shared cache: one per daemon, behind an `Arc` held by every front end (the mount's
/// core, the endpoint, the sink), the fetch workers (weakly) and the background thread.
pub struct Cache {
    /// Each identity's source: the fixed ones read by the fetch workers without a lock,
    /// those added at run time under its own lock (`identities.rs`, a leaf).
    identities: Identities,
    /// The upstream's rate limit and known-down state, shared by every identity's fetches
    /// (its own locks, see `upstream.rs`).
    upstream: Upstream,
    /// The knobs from the command line. Fixed at start.
    policy: Policy,
    /// The wall clock every decision is judged against (a fake one in tests).
    clock: Arc<dyn Clock>,
    /// Entries and refusals: the one lock every read decides under (see "Locks").
    state: Mutex<State>,
    /// The fetch jobs and their workers (its own lock, see `pool.rs`). Readers and the
    /// background pass queue jobs after releasing `state`.
    pool: Pool,
    /// The id the next version gets (versions' ids grow; inode numbers come from them).
    /// Taken by `accept` under `state`.
    next_version: AtomicU64,
    /// Read sequence numbers: the least recently read entry is evicted first. Taken under
    /// `state`.
    read_seq: AtomicU64,
    /// Wakes the background thread early (stop); paired with `stopped`.
    wake: Condvar,
    /// Notified (after `state` is released) when a fetch ends; paired with `state` by
    /// `wait_until_settled` (tests).
    settled: Condvar,
    /// Set by `stop_background`; the background thread holds it during each pass and waits
    /// on `wake` with it between passes.
    stopped: Mutex<bool>,
    /// Bumped when every token is dropped (SIGUSR1, under `state`); a fetch that was under
    /// way then starts over (read by the fetch workers without a lock).
    generation: AtomicU64,
    /// What `--metrics` counts as it happens (atomics and leaf locks of its own, see
    /// `meters.rs`): counted by readers, the fetch workers and the front ends.
    meters: Meters,
    /// The registries served (`.acr/`) and what was learnt of their exchanges
    /// (`acr.rs`; its own lock, a leaf).
    acr: acr::AcrSide,
}

impl Drop for Cache {
    fn drop(&mut self) {
        for job in self.pool.stop() {
            self.abandon(&job.key, STOPPING);
        }
    }
}

/// What a reader gets whose fetch can no longer run.
const STOPPING: &str = "the mount is stopping";
/// What a reader gets whose answer was dropped unsent.
const ABANDONED: &str = "the fetch was abandoned";
/// What a reader gets whose identity was forgotten while it waited.
const FORGOTTEN: &str = "the identity was forgotten (its volumes are gone)";

impl Cache {
    pub fn new(
        identities: Identities,
        policy: Policy,
        declared: &[Key],
        clock: Arc<dyn Clock>,
    ) -> Arc<Cache> {
        let entries = declared
            .iter()
            .map(|k| {
                (
                    k.clone(),
                    Entry {
                        declared: true,
                        ..Entry::default()
                    },
                )
            })
            .collect();
        Arc::new(Cache {
            identities,
            upstream: Upstream::new(clock.clone(), policy.max_upstream_rate),
            policy,
            clock,
            state: Mutex::new(State {
                entries,
                refusals: Refusals::default(),
            }),
            pool: Pool::default(),
            next_version: AtomicU64::new(1),
            read_seq: AtomicU64::new(1),
            wake: Condvar::new(),
            settled: Condvar::new(),
            stopped: Mutex::new(false),
            generation: AtomicU64::new(0),
            meters: Meters::default(),
            acr: acr::AcrSide::default(),
        })
    }

    /// Records why the daemon's plan chose its source: the first line saying the endpoint
    /// is down names it.
    pub fn set_source_reason(&self, reason: &str) {
        self.upstream.set_chosen(reason);
    }

    /// What `--metrics` counts (the front ends count their reads here).
    pub fn meters(&self) -> &Meters {
        &self.meters
    }

    /// The daemon's identities (names, selectors, sources).
    pub fn identities(&self) -> &Identities {
        &self.identities
    }

    /// `key` as the logs name it: `id/NAME/<resource>` for a declared identity, the
    /// resource alone for the mount's own (its lines are as they were with one identity).
    fn shown<'a>(&'a self, key: &'a Key) -> Shown<'a> {
        Shown {
            name: self.identities.name(key.identity),
            key,
        }
    }

    /// The default identity's source.
    pub fn source(&self) -> &dyn Source {
        self.identities.default_source()
    }

    pub fn now(&self) -> EpochMs {
        self.clock.now()
    }

    /// The one read: the current valid version of `resource` for a reader, decided under
    /// the cache's lock. `done` runs at once when a valid token is held or the resource was
    /// refused recently, else when the fetch (started here or already under way) ends.
    /// `usage` says whether the read is a use of the token (refresh ahead).
    pub fn read(self: &Arc<Self>, key: &Key, usage: Use, done: Done) {
        if let Some((answer, done)) = self.begin(key, usage, done) {
            done(answer);
        }
    }

    /// [`Cache::read`] for a caller that handles an answer at hand itself: returns it (and
    /// drops `later`) when the cache answers at once, else `None`, and `later` gets the
    /// answer when the fetch ends.
    pub fn read_now(
        self: &Arc<Self>,
        key: &Key,
        usage: Use,
        later: Done,
    ) -> Option<Result<Lease, ReadError>> {
        self.begin(key, usage, later).map(|(answer, _later)| answer)
    }

    /// Decides a read under the lock: the answer and `done` back when it is at hand, else
    /// `None` (`done` waits for the fetch).
    fn begin(
        self: &Arc<Self>,
        key: &Key,
        usage: Use,
        done: Done,
    ) -> Option<(Result<Lease, ReadError>, Done)> {
        let now = self.clock.now();
        let mut guard = self.state.lock();
        let State { entries, refusals } = &mut *guard;
        let refusal = refusals.active(key, now).cloned();
        let entry = match entries.get_mut(key) {
            Some(entry) => entry,
            // A refused name holds nothing: its refusal answers (the negative cache).
            None if refusal.is_some() => {
                if usage != Use::Probe {
                    self.meters.negative_answers.inc();
                }
                return refusal.map(|r| (Err(r.error), done));
            }
            // Asked again after its refusal expired: the count goes on from the refusal's.
            None => {
                let entry = entries.entry(key.clone()).or_default();
                entry.upstream_calls = refusals.by_key.get(key).map_or(0, |r| r.upstream_calls);
                entry
            }
        };
        entry.reads.last = self.read_seq.fetch_add(1, Ordering::Relaxed);
        let refused_until = refusal.as_ref().map_or(0, |r| r.until);
        let decision = policy::on_read(now, &entry.view(refused_until));
        match decision {
            ReadDecision::Serve | ReadDecision::ServeAndRefresh => {
                // Served what is held: this read waited for nothing.
                if usage.uses() {
                    entry.reads.since_fetch = true;
                }
                let lease = entry
                    .valid(now)
                    .and_then(|v| Lease::of(now, v, true, false))
                    .ok_or_else(|| unreachable_state(key));
                let job = (decision == ReadDecision::ServeAndRefresh)
                    .then(|| self.start_fetch(entry, key, now, true));
                drop(guard);
                if let Some(job) = job {
                    self.enqueue(job);
                }
                Some((lease, done))
            }
            ReadDecision::Refused => Some((
                {
                    if usage != Use::Probe {
                        self.meters.negative_answers.inc();
                    }
                    Err(refusal.map_or_else(|| unreachable_state(key), |r| r.error))
                },
                done,
            )),
            ReadDecision::Wait => {
                let waiter = Waiter {
                    done,
                    marks_use: usage == Use::Read,
                    since: (usage != Use::Probe).then(|| self.clock.instant()),
                };
                if let Some(waiters) = &mut entry.waiters {
                    if usage != Use::Probe {
                        self.meters.single_flight_joins.inc();
                    }
                    waiters.push(waiter);
                    return None;
                }
                let job = self.start_fetch(entry, key, now, false);
                entry.waiters = Some(vec![waiter]);
                drop(guard);
                self.enqueue(job);
                None
            }
        }
    }

    /// A read for callers that may block (the `get` command, tests): not a use of the token.
    /// The default identity's token.
    pub fn get_blocking(self: &Arc<Self>, resource: &Resource) -> Result<Arc<Version>, ReadError> {
        let key = Key::new(IdentityId::DEFAULT, resource.clone());
        self.read_blocking(&key, Use::Look)
            .map(|lease| lease.version)
    }

    /// [`Cache::read`] for async callers (the HTTP listeners): the answer as a future
    /// (an abandoned fetch answers `Unavailable`).
    pub fn read_async(
        self: &Arc<Self>,
        key: &Key,
        usage: Use,
    ) -> impl std::future::Future<Output = Result<Lease, ReadError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.read(key, usage, Box::new(move |got| drop(tx.send(got))));
        async move {
            rx.await
                .unwrap_or_else(|_| Err(ReadError::Unavailable(ABANDONED.into())))
        }
    }

    /// [`Cache::read`], waiting for the answer.
    pub fn read_blocking(self: &Arc<Self>, key: &Key, usage: Use) -> Result<Lease, ReadError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.read(key, usage, Box::new(move |r| drop(tx.send(r))));
        rx.recv()
            .unwrap_or_else(|_| Err(ReadError::Unavailable(ABANDONED.into())))
    }

    /// The cache's verdict on `v` now, without counting a read (attributes): `None` once it
    /// has expired.
    pub fn judge(&self, v: &Arc<Version>) -> Option<Lease> {
        let now = self.clock.now();
        let guard = self.state.lock();
        let current = guard
            .entries
            .get(&v.key)
            .and_then(|e| e.held.as_ref())
            .is_some_and(|held| held.id == v.id);
        drop(guard);
        Lease::of(now, v, current, false)
    }

    /// An open of `v`, a version a lookup already found: served while it is current and
    /// valid, else `Stale` (the reader must look the name up again). A served open counts
    /// as a read (eviction order, and a use when `usage` says so) and may start a refresh
    /// past the refresh point.
    pub fn reopen(self: &Arc<Self>, v: &Version, usage: Use) -> Result<(), Stale> {
        let now = self.clock.now();
        let mut guard = self.state.lock();
        let entry = guard.entries.get_mut(&v.key).ok_or(Stale)?;
        let current = entry.held.as_ref().is_some_and(|held| held.id == v.id);
        if !matches!(
            policy::verdict(now, &v.schedule, current),
            Verdict::Current { .. }
        ) {
            return Err(Stale);
        }
        if usage.uses() {
            entry.reads.since_fetch = true;
        }
        entry.reads.last = self.read_seq.fetch_add(1, Ordering::Relaxed);
        if policy::on_read(now, &entry.view(0)) == ReadDecision::ServeAndRefresh {
            let job = self.start_fetch(entry, &v.key, now, true);
            drop(guard);
            self.enqueue(job);
        }
        Ok(())
    }

    /// Marks a fetch as started (its waiters list exists, pacing counts from now).
    fn start_fetch(&self, entry: &mut Entry, key: &Key, now: EpochMs, refresh: bool) -> Job {
        entry.waiters = Some(Vec::new());
        entry.last_fetch_at = Some(now);
        Job {
            key: key.clone(),
            deadline: self.clock.instant() + self.policy.timeout,
            refresh,
        }
    }

    /// Every resource to list: the declared ones and those whose token is held.
    pub fn listed(&self) -> Vec<(Key, Option<Arc<Version>>)> {
        let now = self.clock.now();
        let guard = self.state.lock();
        guard
            .entries
            .iter()
            .filter_map(|(r, e)| {
                let v = e.valid(now).cloned();
                (e.declared || v.is_some()).then(|| (r.clone(), v))
            })
            .collect()
    }

    /// The current valid version of a resource, without counting a read (tests, and the
    /// registry exchange's look for an Entra token it may use).
    pub(crate) fn peek(&self, key: &Key) -> Option<Arc<Version>> {
        let now = self.clock.now();
        self.state
            .lock()
            .entries
            .get(key)
            .and_then(|e| e.valid(now).cloned())
    }

    /// Declares `key` (as `Cache::new`'s `declared` do): its entry is kept while idle and
    /// never evicted by `--max-resources`, but counts toward it. It is refreshed ahead by
    /// the same rule as any key: when read with `Use::Read` since its last fetch. No fetch
    /// starts here.
    pub fn declare(&self, key: &Key) {
        let mut guard = self.state.lock();
        guard.entries.entry(key.clone()).or_default().declared = true;
    }

    /// Undoes [`Cache::declare`]: the entry stays while it holds a token, and may be
    /// evicted and dropped when idle like any read key.
    pub fn undeclare(&self, key: &Key) {
        if let Some(e) = self.state.lock().entries.get_mut(key) {
            e.declared = false;
        }
    }

    /// Holds `token` for `key` as if it had just been fetched: a token an earlier run of the
    /// daemon wrote where a front end keeps its files (a CSI volume adopted after a
    /// restart). Nothing changes when the entry holds a valid token already (that one is
    /// returned) or `token` is no longer valid (`None`). Its schedule is the policy's, counted
    /// from now (its issue time is not known).
    pub fn adopt(&self, key: &Key, token: Token) -> Option<Arc<Version>> {
        let now = self.clock.now();
        let schedule = self.schedule_of(&token, now);
        if policy::verdict(now, &schedule, true) == Verdict::Expired {
            return None;
        }
        let mut guard = self.state.lock();
        let entry = guard.entries.entry(key.clone()).or_default();
        if let Some(held) = entry.valid(now) {
            return Some(held.clone());
        }
        let id = self.next_version.fetch_add(1, Ordering::Relaxed);
        let version = Arc::new(Version::new(id, key.clone(), &token, now, schedule));
        entry.held = Some(version.clone());
        entry.fetched_at = Some(now);
        debug!(
            "{}: token adopted, expires in {} s",
            self.shown(key),
            (token.expires_on - now) / 1000
        );
        Some(version)
    }

    /// Forgets `key`: its entry (a held token is wiped once no reader holds it) and its
    /// refusal go; a fetch under way still answers its readers, then records nothing.
    pub fn forget(&self, key: &Key) {
        let mut guard = self.state.lock();
        let State { entries, refusals } = &mut *guard;
        match entries.get_mut(key) {
            Some(e) if e.waiters.is_some() => {
                e.declared = false;
                e.held = None;
            }
            Some(_) => drop(entries.remove(key)),
            None => {}
        }
        refusals.by_key.remove(key);
        refusals.order.retain(|(k, _)| k != key);
    }

    /// Drops every entry and refusal of identity `id` (its tokens are wiped once no reader
    /// holds them) and removes it from the identities (`Identities::remove`: a fixed one
    /// stays). Readers waiting for one of its fetches are answered `ReadError::Unavailable`
    /// at once; a fetch under way ends without recording anything. A later read of one of
    /// its keys fails: its identity is gone.
    pub fn forget_identity(&self, id: IdentityId) {
        let mut waiters = Vec::new();
        let mut guard = self.state.lock();
        guard.entries.retain(|key, e| {
            if key.identity != id {
                return true;
            }
            waiters.extend(e.waiters.take().unwrap_or_default());
            false
        });
        shrink(&mut guard.entries);
        let refusals = &mut guard.refusals;
        refusals.by_key.retain(|key, _| key.identity != id);
        refusals.order.retain(|(key, _)| key.identity != id);
        shrink(&mut refusals.by_key);
        drop(guard);
        self.identities.remove(id);
        self.meters.forget_identity(id);
        self.settled.notify_all();
        let now = self.clock.instant();
        for waiter in waiters {
            waiter.answer(
                &self.meters,
                now,
                Err(ReadError::Unavailable(FORGOTTEN.into())),
            );
        }
    }

    /// Drops every held token (wiped once no open file holds it), every refusal and the
    /// pacing and backoff of every resource: the next read of each fetches anew.
    pub fn clear(&self) {
        let mut guard = self.state.lock();
        self.generation.fetch_add(1, Ordering::SeqCst);
        guard
            .entries
            .retain(|_, e| e.declared || e.waiters.is_some());
        for e in guard.entries.values_mut() {
            e.held = None;
            e.fetched_at = None;
            e.last_fetch_at = None;
            e.failures = Failures::default();
        }
        guard.refusals = Refusals::default();
        drop(guard);
        self.upstream.reset();
        info!("dropped every held token; the next read of each fetches anew");
    }

    /// Starts the background worker: refresh ahead of tokens in use, drop expired ones,
    /// answer readers whose fetch could not start within `--timeout`.
    pub fn start_background(self: &Arc<Self>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let cache = self.clone();
        std::thread::Builder::new()
            .name("refresher".into())
            .stack_size(WORKER_STACK)
            .spawn(move || cache.background())
    }

    pub fn stop_background(&self) {
        *self.stopped.lock() = true;
        self.wake.notify_all();
        for job in self.pool.stop() {
            self.abandon(&job.key, STOPPING);
        }
    }

    /// One background pass now, on the caller's thread: what the background thread does
    /// when it wakes. Tests on the fake clock run it instead of waiting for the thread.
    pub fn pass_now(self: &Arc<Self>) {
        self.background_pass();
    }

    /// Waits, at most `within` (real time), until no fetch is queued or running; `false`
    /// if one still is. Tests on the fake clock wait with it for a refresh to land.
    pub fn wait_until_settled(&self, within: Duration) -> bool {
        let until = std::time::Instant::now() + within;
        let mut guard = self.state.lock();
        loop {
            if guard.entries.values().all(|e| e.waiters.is_none()) {
                return true;
            }
            if self.settled.wait_until(&mut guard, until).timed_out() {
                return guard.entries.values().all(|e| e.waiters.is_none());
            }
        }
    }

    fn background(self: Arc<Self>) {
        let mut stopped = self.stopped.lock();
        while !*stopped {
            let pause = self.background_pass();
            self.wake.wait_for(&mut stopped, pause);
        }
    }

    /// One pass: starts due refreshes, drops expired tokens and refusals; returns when to
    /// look again.
    fn background_pass(self: &Arc<Self>) -> Duration {
        let now = self.clock.now();
        let mut due = Vec::new();
        let mut next = now + 1_000;
        {
            let mut guard = self.state.lock();
            for (r, e) in guard.entries.iter_mut() {
                if e.held.is_some() && e.valid(now).is_none() && e.waiters.is_none() {
                    debug!("token of {} expired: dropped", self.shown(r));
                    e.held = None;
                }
                let view = e.view(0);
                if e.reads.since_fetch && policy::refresh_ahead_due(now, &view) {
                    due.push(self.start_fetch(e, r, now, true));
                } else if let (Some(v), true) = (&e.held, e.reads.since_fetch) {
                    let paced = e
                        .last_fetch_at
                        .map_or(0, |t| t + policy::MIN_FETCH_INTERVAL_MS);
                    let at = v
                        .schedule
                        .refresh_ahead_at
                        .max(e.failures.next_attempt_at)
                        .max(paced);
                    if at > now {
                        next = next.min(at);
                    }
                }
            }
            // A name whose last fetch failed stays (with its error, for `.status`) for as
            // long as a refusal would: a reader who got EIO can still read why.
            let recent = now.saturating_sub(self.policy.negative_ttl_ms);
            guard.entries.retain(|_, e| {
                e.declared
                    || e.held.is_some()
                    || e.waiters.is_some()
                    || e.failures
                        .last_error
                        .as_ref()
                        .is_some_and(|(_, at)| *at > recent)
            });
            shrink(&mut guard.entries);
            guard.refusals.expire(now);
        }
        self.meters
            .retain_identities(|id| self.identities.contains(id));
        for job in due {
            self.enqueue(job);
        }
        for job in self.pool.take_overdue(self.clock.instant()) {
            self.abandon(
                &job.key,
                "no fetch could start within --timeout (too many fetches at once)",
            );
        }
        let pause = Duration::from_millis((next - now).clamp(10, 1_000) as u64);
        // Wake for the earliest queued deadline: its readers are answered on time.
        match self.pool.next_deadline() {
            Some(d) => pause.min(
                d.saturating_duration_since(self.clock.instant())
                    .max(Duration::from_millis(10)),
            ),
            None => pause,
        }
    }

    /// Keeps the tokens held (declared resources count) within `--max-resources`: the
    /// least recently read undeclared one goes, never `keep` (just fetched) nor one being
    /// fetched. Names that hold nothing (refused, failed, in flight) never evict a token.
    fn evict_beyond_limit(&self, entries: &mut HashMap<Key, Entry>, keep: &Key) {
        let held = entries
            .values()
            .filter(|e| e.declared || e.held.is_some())
            .count();
        for _ in self.policy.max_resources..held {
            let victim = entries
                .iter()
                .filter(|(r, e)| {
                    !e.declared && e.held.is_some() && e.waiters.is_none() && *r != keep
                })
                .min_by_key(|(_, e)| e.reads.last)
                .map(|(r, _)| r.clone());
            let Some(r) = victim else { break };
            debug!("evicting {} (least recently read)", self.shown(&r));
            entries.remove(&r);
            self.meters.evictions.inc();
        }
    }

    /// Hands a job to the pool, starting a worker when it asks for one.
    fn enqueue(self: &Arc<Self>, job: Job) {
        match self.pool.push(job) {
            Pushed::Queued => return,
            Pushed::Stopped(job) => return self.abandon(&job.key, STOPPING),
            Pushed::StartWorker => {}
        }
        let cache = Arc::downgrade(self);
        let pool = self.pool.clone();
        let spawned = std::thread::Builder::new()
            .name("fetch".into())
            .stack_size(WORKER_STACK)
            .spawn(move || {
                while let Some(job) = pool.next() {
                    let Some(cache) = cache.upgrade() else { return };
                    let key = job.key.clone();
                    // A fetch that panics leaves nobody waiting, and the worker goes on.
                    let run = std::panic::AssertUnwindSafe(|| cache.run(&job));
                    if std::panic::catch_unwind(run).is_err() {
                        cache.abandon(&key, "internal error: the fetch ended unexpectedly");
                    }
                    cache.settled.notify_all();
                }
            });
        if let Err(e) = spawned {
            warn!("cannot start a fetch thread: {e}");
            for job in self.pool.not_started() {
                self.abandon(&job.key, &format!("cannot start a fetch thread: {e}"));
            }
        }
    }

    /// Answers whoever still waits on `resource` with an error and ends the fetch state.
    fn abandon(&self, key: &Key, why: &str) {
        let waiters = self
            .state
            .lock()
            .entries
            .get_mut(key)
            .and_then(|e| e.waiters.take());
        self.settled.notify_all();
        let now = self.clock.instant();
        for waiter in waiters.unwrap_or_default() {
            waiter.answer(
                &self.meters,
                now,
                Err(ReadError::Unavailable(why.to_string())),
            );
        }
    }

    /// Runs on a pool worker: asks the upstream (retrying transient failures until the
    /// job's deadline), records the outcome, then answers every waiter. A fetch that was
    /// under way when the tokens were dropped (SIGUSR1) starts over, within the same
    /// deadline: its answer may be of the old login.
    fn run(self: &Arc<Self>, job: &Job) {
        let resource = &job.key;
        let (result, calls) = loop {
            let generation = self.generation.load(Ordering::SeqCst);
            let outcome = self.ask(job);
            if generation == self.generation.load(Ordering::SeqCst) {
                break outcome;
            }
            debug!(
                "{}: tokens were dropped during the fetch; fetching again",
                self.shown(resource)
            );
        };
        let now = self.clock.now();
        let mut guard = self.state.lock();
        let State { entries, refusals } = &mut *guard;
        let Some(entry) = entries.get_mut(resource) else {
            return;
        };
        entry.upstream_calls += calls;
        let held = entry.valid(now).map(|v| v.id);
        let outcome = match result.and_then(|arrival| self.accept(resource, entry, arrival, now)) {
            Ok(v) => Lease::of(now, &v, true, true).ok_or_else(|| unreachable_state(resource)),
            Err(e) => Err(self.record_failure(resource, entry, refusals, &e, now)),
        };
        let waiters = entry.waiters.take().unwrap_or_default();
        // A waiter whose read is a use marks the version it gets in use.
        if outcome.is_ok() && waiters.iter().any(|w| w.marks_use) {
            entry.reads.since_fetch = true;
        }
        if held.is_none() && outcome.is_ok() {
            self.evict_beyond_limit(entries, resource);
        }
        // A refused name holds nothing here: its refusal is in the negative cache.
        let holds_nothing = entries
            .get(resource)
            .is_some_and(|e| !e.declared && e.held.is_none());
        if holds_nothing && refusals.active(resource, now).is_some() {
            entries.remove(resource);
        }
        // Never call a `done` while holding the lock: it may read again.
        drop(guard);
        let now = self.clock.instant();
        for waiter in waiters {
            waiter.answer(&self.meters, now, outcome.clone());
        }
    }

    /// The upstream's answer before the job's deadline, and how many calls it took.
    fn ask(&self, job: &Job) -> (Result<Arrival, SourceError>, u64) {
        let mut calls = 0;
        loop {
            let registry = self.fetch_registry(job);
            let (result, n) = match (registry, self.identities.source(job.key.identity)) {
                // A registry's key: exchanged, not asked of the source (`acr.rs`).
                (Some(fetched), _) => fetched,
                (None, Some(source)) => {
                    self.upstream
                        .fetch(&*source, &job.key, job.deadline, job.refresh, &self.meters)
                }
                (None, None) => (
                    Err(SourceError::Credential(format!(
                        "{}: not an identity of this daemon",
                        job.key
                    ))),
                    0,
                ),
            };
            calls += n;
            // The token's schedule, computed once, when it arrives.
            let result = result.map(|token| {
                let at = self.clock.now();
                let schedule = self.schedule_of(&token, at);
                Arrival {
                    token,
                    schedule,
                    at,
                }
            });
            // An upstream that caches hands out its old token until it has expired; near
            // expiry that token is already too old for us. Ask again, calmly, until the
            // upstream issues a new one or the time is up.
            let stale = result.as_ref().is_ok_and(Arrival::expired);
            if stale && self.clock.instant() + EXPIRED_ON_ARRIVAL_PAUSE < job.deadline {
                debug!(
                    "{}: the endpoint returned a token that is about to expire; asking again",
                    self.shown(&job.key)
                );
                std::thread::sleep(EXPIRED_ON_ARRIVAL_PAUSE);
                continue;
            }
            return (result, calls);
        }
    }

    /// The schedule of a token fetched at `now`, computed once per answer by the policy;
    /// with `refresh_spread_pct`, its refresh point moved earlier by a random share.
    fn schedule_of(&self, token: &Token, now: EpochMs) -> Schedule {
        let issued_at = token.issued_at(now);
        let exact = policy::schedule(
            issued_at,
            token.expires_on,
            token.refresh_in_ms,
            self.policy.refresh_margin_ms,
        );
        match self.policy.refresh_spread_pct {
            0 => exact,
            pct => policy::spread(exact, issued_at, pct, crate::hardening::jitter()),
        }
    }

    fn accept(
        &self,
        resource: &Key,
        entry: &mut Entry,
        arrival: Arrival,
        now: EpochMs,
    ) -> Result<Arc<Version>, SourceError> {
        let shown = self.shown(resource);
        let Arrival {
            token, schedule, ..
        } = arrival;
        if let Some(held) = entry.valid(now).cloned() {
            if held.expires_on == token.expires_on && held.token() == token.access_token.as_bytes()
            {
                // An upstream that caches handed back what we hold: keep it, ask again later.
                entry.failures.next_attempt_at = policy::unchanged_retry_at(now, &held.schedule);
                entry.failures.consecutive = 0;
                if !entry.failures.unchanged_logged {
                    info!("{shown}: the endpoint returned the token already held (it caches); retrying closer to expiry");
                    entry.failures.unchanged_logged = true;
                }
                return Ok(held);
            }
        }
        if policy::verdict(now, &schedule, true) == Verdict::Expired {
            return Err(SourceError::BadResponse(
                "the endpoint issued a token that is already expired".into(),
            ));
        }
        let id = self.next_version.fetch_add(1, Ordering::Relaxed);
        let version = Arc::new(Version::new(id, resource.clone(), &token, now, schedule));
        if entry.failures.consecutive > 0 {
            info!(
                "{shown}: token fetched again after {} failure(s)",
                entry.failures.consecutive
            );
        }
        info!(
            "{shown}: new token, expires in {} s, refresh in {} s",
            (token.expires_on - now) / 1000,
            (schedule.refresh_at - now) / 1000
        );
        entry.held = Some(version.clone());
        entry.fetched_at = Some(now);
        entry.reads.since_fetch = false;
        entry.failures = Failures::default();
        Ok(version)
    }

    /// Records a failed fetch; the held token (if valid) stays. A refusal with nothing
    /// valid held goes to the negative cache. Returns what waiters get.
    fn record_failure(
        &self,
        resource: &Key,
        entry: &mut Entry,
        refusals: &mut Refusals,
        e: &SourceError,
        now: EpochMs,
    ) -> ReadError {
        let shown = self.shown(resource);
        let error = ReadError::from(e);
        let message = e.to_string();
        let f = &mut entry.failures;
        f.consecutive += 1;
        // A failure unlike the one before it is news (WARN); the same one again is not.
        let changed = f
            .last_error
            .as_ref()
            .is_none_or(|(last, _)| *last != message);
        f.last_error = Some((message.clone(), now));
        let jitter = crate::hardening::jitter();
        f.next_attempt_at =
            now.saturating_add(policy::backoff_ms(f.consecutive, e.retry_after(), jitter));
        let held = entry.valid(now).is_some();
        if !held && matches!(error, ReadError::Refused(_) | ReadError::Denied(_)) {
            let until = now.saturating_add(self.policy.negative_ttl_ms);
            let refusal = Refusal {
                until,
                error: error.clone(),
                at: now,
                upstream_calls: entry.upstream_calls,
            };
            refusals.insert(resource.clone(), refusal);
        }
        if entry.failures.consecutive == 1 {
            if held {
                warn!("{shown}: refresh failed, still serving the held token: {message}");
            } else {
                warn!("{shown}: fetch failed: {message}");
            }
        } else if changed {
            warn!(
                "{shown}: failure {} in a row, now: {message}",
                entry.failures.consecutive
            );
        } else {
            debug!(
                "{shown}: failure {} in a row: {message}",
                entry.failures.consecutive
            );
        }
        error
    }
}

/// A key named for a log line (`Cache::shown`).
struct Shown<'a> {
    name: Option<std::borrow::Cow<'a, str>>,
    key: &'a Key,
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name {
            Some(ref name) => write!(f, "id/{name}/{}", self.key),
            None => write!(f, "{}", self.key),
        }
    }
}

fn unreachable_state(resource: &Key) -> ReadError {
    ReadError::Unavailable(format!(
        "{resource}: internal error: no valid token to serve"
    ))
}

#[cfg(test)]
mod cache_tests;
