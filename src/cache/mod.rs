//! The token cache: one entry per resource, single-flight fetches run by a small pool (a
//! reader never blocks a FUSE thread or another resource, a flood of names never costs a
//! thread each), a bounded negative cache of refusals apart from the tokens, refresh ahead
//! in the background, eviction. Decisions come from `policy`; the upstream's rate limit and
//! known-down state are in `upstream`.

mod entry;
mod pool;
mod status;
mod upstream;

use crate::policy::Clock;
use crate::policy::{self, EpochMs, Policy, ReadDecision, Schedule, Verdict};
use crate::source::{Failure, Source, SourceError};
use crate::token::{Token, Version};
use entry::{shrink, Entry, Failures, Refusal, Refusals};
use log::{debug, info, warn};
use parking_lot::{Condvar, Mutex};
use pool::{Job, Pool, Pushed};
pub use status::Status;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
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

impl ReadError {
    fn of(e: &SourceError) -> ReadError {
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
pub type Done = Box<dyn FnOnce(Result<Arc<Version>, ReadError>) + Send>;

/// Whether an open of a version may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenDecision {
    Serve,
    /// Superseded or expired: the reader must look the name up again.
    Stale,
}

/// Everything behind the cache's one lock.
#[derive(Default)]
struct State {
    entries: HashMap<Arc<str>, Entry>,
    refusals: Refusals,
}

pub struct Cache {
    upstream: Upstream,
    policy: Policy,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    pool: Pool,
    next_version: AtomicU64,
    read_seq: AtomicU64,
    /// Wakes the background worker early (stop).
    wake: Condvar,
    stopped: Mutex<bool>,
    /// Bumped when every token is dropped; fetches started before it start over.
    generation: AtomicU64,
}

impl Drop for Cache {
    fn drop(&mut self) {
        for job in self.pool.stop() {
            self.abandon(&job.resource, STOPPING);
        }
    }
}

/// What a reader gets whose fetch can no longer run.
const STOPPING: &str = "the mount is stopping";

impl Cache {
    pub fn new(
        source: Arc<dyn Source>,
        policy: Policy,
        declared: &[String],
        clock: Arc<dyn Clock>,
    ) -> Arc<Cache> {
        let entries = declared
            .iter()
            .map(|r| {
                (
                    Arc::from(r.as_str()),
                    Entry {
                        declared: true,
                        ..Entry::default()
                    },
                )
            })
            .collect();
        Arc::new(Cache {
            upstream: Upstream::new(source, clock.clone(), policy.max_upstream_rate),
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
            stopped: Mutex::new(false),
            generation: AtomicU64::new(0),
        })
    }

    pub fn source(&self) -> &dyn Source {
        self.upstream.source()
    }

    pub fn now(&self) -> EpochMs {
        self.clock.now()
    }

    /// The token of `resource` for a reader: `done` runs at once when a valid token is held
    /// or the resource was refused recently, else when the fetch (started here or already
    /// under way) ends.
    pub fn get(self: &Arc<Self>, resource: &str, done: Done) {
        let now = self.clock.now();
        let mut guard = self.state.lock();
        let State { entries, refusals } = &mut *guard;
        let refusal = refusals.active(resource, now).cloned();
        let key = match entries.get_key_value(resource) {
            Some((k, _)) => k.clone(),
            None => {
                if let Some(r) = refusal {
                    drop(guard);
                    return done(Err(r.error));
                }
                let key: Arc<str> = Arc::from(resource);
                entries.insert(key.clone(), Entry::default());
                key
            }
        };
        let Some(entry) = entries.get_mut(&key) else {
            drop(guard);
            return done(Err(unreachable_state(&key)));
        };
        entry.reads.last = self.read_seq.fetch_add(1, Ordering::Relaxed);
        let refused_until = refusal.as_ref().map_or(0, |r| r.until);
        match policy::on_read(now, &entry.view(refused_until)) {
            ReadDecision::Serve => {
                let v = entry.valid(now).cloned();
                drop(guard);
                done(v.ok_or_else(|| unreachable_state(&key)))
            }
            ReadDecision::ServeAndRefresh => {
                let v = entry.valid(now).cloned();
                let job = self.start_fetch(entry, &key, now, true);
                drop(guard);
                self.enqueue(job);
                done(v.ok_or_else(|| unreachable_state(&key)))
            }
            ReadDecision::Refused => {
                drop(guard);
                done(Err(
                    refusal.map_or_else(|| unreachable_state(&key), |r| r.error)
                ))
            }
            ReadDecision::Wait => {
                if let Some(waiters) = &mut entry.waiters {
                    return waiters.push(done);
                }
                let job = self.start_fetch(entry, &key, now, false);
                entry.waiters = Some(vec![done]);
                drop(guard);
                self.enqueue(job);
            }
        }
    }

    /// `get` for callers that may block (the `get` command, tests).
    pub fn get_blocking(self: &Arc<Self>, resource: &str) -> Result<Arc<Version>, ReadError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.get(resource, Box::new(move |r| drop(tx.send(r))));
        rx.recv()
            .unwrap_or_else(|_| Err(ReadError::Unavailable("the fetch was abandoned".into())))
    }

    /// Has `v` expired? The read path's question: it needs no lock (an open file reads its
    /// version until it expires, superseded or not).
    pub fn expired(&self, v: &Version) -> bool {
        policy::verdict(self.clock.now(), &v.schedule, true) == Verdict::Expired
    }

    /// May `v` be served now? The filesystem's one question about a version.
    pub fn check(&self, v: &Version) -> Verdict {
        let now = self.clock.now();
        let guard = self.state.lock();
        let current = guard
            .entries
            .get(&*v.resource)
            .and_then(|e| e.held.as_ref())
            .is_some_and(|held| held.id == v.id);
        policy::verdict(now, &v.schedule, current)
    }

    /// The id of the newest version made so far: a lookup that gets a higher one waited
    /// for its fetch.
    pub fn last_version_id(&self) -> u64 {
        self.next_version.load(Ordering::Relaxed).saturating_sub(1)
    }

    /// An open of `v`: may it be served, or must the reader look the name up again? A
    /// served open that `counts_as_read` marks the version in use (refresh ahead) and may
    /// start a refresh past the refresh point; the filesystem says no for the open that
    /// echoes a lookup which waited for this very version.
    pub fn on_open(self: &Arc<Self>, v: &Version, counts_as_read: bool) -> OpenDecision {
        let now = self.clock.now();
        let mut guard = self.state.lock();
        let Some(entry) = guard.entries.get_mut(&*v.resource) else {
            return OpenDecision::Stale;
        };
        let current = entry.held.as_ref().is_some_and(|held| held.id == v.id);
        if !matches!(
            policy::verdict(now, &v.schedule, current),
            Verdict::Current { .. }
        ) {
            return OpenDecision::Stale;
        }
        if counts_as_read {
            entry.reads.since_fetch = true;
        }
        entry.reads.last = self.read_seq.fetch_add(1, Ordering::Relaxed);
        if policy::on_read(now, &entry.view(0)) == ReadDecision::ServeAndRefresh {
            let job = self.start_fetch(entry, &v.resource, now, true);
            drop(guard);
            self.enqueue(job);
        }
        OpenDecision::Serve
    }

    /// Marks a fetch as started (its waiters list exists, pacing counts from now).
    fn start_fetch(&self, entry: &mut Entry, key: &Arc<str>, now: EpochMs, refresh: bool) -> Job {
        entry.waiters = Some(Vec::new());
        entry.last_fetch_at = Some(now);
        Job {
            resource: key.clone(),
            deadline: Instant::now() + self.policy.timeout,
            refresh,
        }
    }

    /// Every resource to list: the declared ones and those whose token is held.
    pub fn listed(&self) -> Vec<(Arc<str>, Option<Arc<Version>>)> {
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

    /// The current valid version of a resource, without counting a read.
    pub fn peek(&self, resource: &str) -> Option<Arc<Version>> {
        let now = self.clock.now();
        self.state
            .lock()
            .entries
            .get(resource)
            .and_then(|e| e.valid(now).cloned())
    }

    /// The current version of a resource if it stays valid for at least `lead` more, without
    /// counting a read: what `sink` keeps as files (it must remove a token before the
    /// moment it stops being valid, not at it).
    pub fn peek_valid_for(&self, resource: &str, lead: Duration) -> Option<Arc<Version>> {
        let lead_ms = i64::try_from(lead.as_millis()).unwrap_or(i64::MAX);
        let at = self.clock.now().saturating_add(lead_ms);
        self.state
            .lock()
            .entries
            .get(resource)
            .and_then(|e| e.valid(at).cloned())
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
            self.abandon(&job.resource, STOPPING);
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
                    debug!("token of {r} expired: dropped");
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
            guard
                .entries
                .retain(|_, e| e.declared || e.held.is_some() || e.waiters.is_some());
            shrink(&mut guard.entries);
            guard.refusals.expire(now);
        }
        for job in due {
            self.enqueue(job);
        }
        for job in self.pool.take_overdue(Instant::now()) {
            self.abandon(
                &job.resource,
                "no fetch could start within --timeout (too many fetches at once)",
            );
        }
        let pause = Duration::from_millis((next - now).clamp(10, 1_000) as u64);
        // Wake for the earliest queued deadline: its readers are answered on time.
        match self.pool.next_deadline() {
            Some(d) => pause.min(
                d.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(10)),
            ),
            None => pause,
        }
    }

    /// Keeps the tokens held (declared resources count) within `--max-resources`: the
    /// least recently read undeclared one goes, never `keep` (just fetched) nor one being
    /// fetched. Names that hold nothing (refused, failed, in flight) never evict a token.
    fn evict_beyond_limit(&self, entries: &mut HashMap<Arc<str>, Entry>, keep: &str) {
        let held = entries
            .values()
            .filter(|e| e.declared || e.held.is_some())
            .count();
        for _ in self.policy.max_resources..held {
            let victim = entries
                .iter()
                .filter(|(r, e)| {
                    !e.declared && e.held.is_some() && e.waiters.is_none() && &***r != keep
                })
                .min_by_key(|(_, e)| e.reads.last)
                .map(|(r, _)| r.clone());
            let Some(r) = victim else { break };
            debug!("evicting {r} (least recently read)");
            entries.remove(&r);
        }
    }

    /// Hands a job to the pool, starting a worker when it asks for one.
    fn enqueue(self: &Arc<Self>, job: Job) {
        match self.pool.push(job) {
            Pushed::Queued => return,
            Pushed::Stopped(job) => return self.abandon(&job.resource, STOPPING),
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
                    let resource = job.resource.clone();
                    // A fetch that panics leaves nobody waiting, and the worker goes on.
                    let run = std::panic::AssertUnwindSafe(|| cache.run(&job));
                    if std::panic::catch_unwind(run).is_err() {
                        cache.abandon(&resource, "internal error: the fetch ended unexpectedly");
                    }
                }
            });
        if let Err(e) = spawned {
            warn!("cannot start a fetch thread: {e}");
            for job in self.pool.not_started() {
                self.abandon(&job.resource, &format!("cannot start a fetch thread: {e}"));
            }
        }
    }

    /// Answers whoever still waits on `resource` with an error and ends the fetch state.
    fn abandon(&self, resource: &str, why: &str) {
        let waiters = self
            .state
            .lock()
            .entries
            .get_mut(resource)
            .and_then(|e| e.waiters.take());
        for done in waiters.unwrap_or_default() {
            done(Err(ReadError::Unavailable(why.to_string())));
        }
    }

    /// Runs on a pool worker: asks the upstream (retrying transient failures until the
    /// job's deadline), records the outcome, then answers every waiter. A fetch that was
    /// under way when the tokens were dropped (SIGUSR1) starts over, within the same
    /// deadline: its answer may be of the old login.
    fn run(self: &Arc<Self>, job: &Job) {
        let resource = &job.resource;
        let (result, calls) = loop {
            let generation = self.generation.load(Ordering::SeqCst);
            let outcome = self.ask(job);
            if generation == self.generation.load(Ordering::SeqCst) {
                break outcome;
            }
            debug!("{resource}: tokens were dropped during the fetch; fetching again");
        };
        let now = self.clock.now();
        let mut guard = self.state.lock();
        let State { entries, refusals } = &mut *guard;
        let Some(entry) = entries.get_mut(resource) else {
            return;
        };
        entry.upstream_calls += calls;
        let held = entry.valid(now).map(|v| v.id);
        let outcome = match result.and_then(|token| self.accept(resource, entry, token, now)) {
            Ok(v) => Ok(v),
            Err(e) => Err(self.record_failure(resource, entry, refusals, &e, now)),
        };
        let waiters = entry.waiters.take().unwrap_or_default();
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
        drop(guard);
        for done in waiters {
            done(outcome.clone());
        }
    }

    /// The upstream's answer before the job's deadline, and how many calls it took.
    fn ask(&self, job: &Job) -> (Result<Token, SourceError>, u64) {
        let mut calls = 0;
        loop {
            let (result, n) = self
                .upstream
                .fetch(&job.resource, job.deadline, job.refresh);
            calls += n;
            // An upstream that caches hands out its old token until it has expired; near
            // expiry that token is already too old for us. Ask again, calmly, until the
            // upstream issues a new one or the time is up.
            let stale = result.as_ref().is_ok_and(|t| self.expired_on_arrival(t));
            if stale && Instant::now() + EXPIRED_ON_ARRIVAL_PAUSE < job.deadline {
                debug!(
                    "{}: the endpoint returned a token that is about to expire; asking again",
                    job.resource
                );
                std::thread::sleep(EXPIRED_ON_ARRIVAL_PAUSE);
                continue;
            }
            return (result, calls);
        }
    }

    /// The schedule of a token fetched at `now`, computed once per answer by the policy.
    fn schedule_of(&self, token: &Token, now: EpochMs) -> Schedule {
        policy::schedule(
            token.issued_at(now),
            token.expires_on,
            token.refresh_in_ms,
            self.policy.refresh_margin_ms,
        )
    }

    fn expired_on_arrival(&self, t: &Token) -> bool {
        let now = self.clock.now();
        policy::verdict(now, &self.schedule_of(t, now), true) == Verdict::Expired
    }

    fn accept(
        &self,
        resource: &Arc<str>,
        entry: &mut Entry,
        token: Token,
        now: EpochMs,
    ) -> Result<Arc<Version>, SourceError> {
        if let Some(held) = entry.valid(now).cloned() {
            if held.expires_on == token.expires_on && held.token() == token.access_token.as_bytes()
            {
                // An upstream that caches handed back what we hold: keep it, ask again later.
                entry.failures.next_attempt_at = policy::unchanged_retry_at(now, &held.schedule);
                entry.failures.consecutive = 0;
                if !entry.failures.unchanged_logged {
                    info!("{resource}: the endpoint returned the token already held (it caches); retrying closer to expiry");
                    entry.failures.unchanged_logged = true;
                }
                return Ok(held);
            }
        }
        let schedule = self.schedule_of(&token, now);
        if policy::verdict(now, &schedule, true) == Verdict::Expired {
            return Err(SourceError::BadResponse(
                "the endpoint issued a token that is already expired".into(),
            ));
        }
        let id = self.next_version.fetch_add(1, Ordering::Relaxed);
        let version = Arc::new(Version::new(id, resource.clone(), &token, now, schedule));
        if entry.failures.consecutive > 0 {
            info!(
                "{resource}: token fetched again after {} failure(s)",
                entry.failures.consecutive
            );
        }
        info!(
            "{resource}: new token, expires in {} s, refresh in {} s",
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
        resource: &Arc<str>,
        entry: &mut Entry,
        refusals: &mut Refusals,
        e: &SourceError,
        now: EpochMs,
    ) -> ReadError {
        let error = ReadError::of(e);
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
            };
            refusals.insert(resource.clone(), refusal);
        }
        if entry.failures.consecutive == 1 {
            if held {
                warn!("{resource}: refresh failed, still serving the held token: {message}");
            } else {
                warn!("{resource}: fetch failed: {message}");
            }
        } else if changed {
            warn!(
                "{resource}: failure {} in a row, now: {message}",
                entry.failures.consecutive
            );
        } else {
            debug!(
                "{resource}: failure {} in a row: {message}",
                entry.failures.consecutive
            );
        }
        error
    }
}

fn unreachable_state(resource: &str) -> ReadError {
    ReadError::Unavailable(format!(
        "{resource}: internal error: no valid token to serve"
    ))
}

#[cfg(test)]
mod cache_tests;
