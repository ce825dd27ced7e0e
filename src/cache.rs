//! The token cache: one entry per resource, single-flight fetches on their own threads (a
//! reader never blocks a FUSE thread or another resource), a negative cache for refusals,
//! refresh ahead in the background, eviction. Decisions come from `policy`.

use crate::policy::{self, EntryView, Policy, ReadDecision, Schedule};
use crate::source::{Failure, Source, SourceError};
use crate::token::{EpochMs, Token, Version};
use log::{debug, info, warn};
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Wall clock, replaceable in tests.
pub trait Clock: Send + Sync {
    fn now(&self) -> EpochMs;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> EpochMs {
        crate::source::http::now_ms()
    }
}

/// Why a reader gets no token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The upstream refused this resource (ENOENT).
    Refused(String),
    /// No valid token could be had in time (EIO).
    Unavailable(String),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Refused(m) => write!(f, "refused by the endpoint: {m}"),
            ReadError::Unavailable(m) => write!(f, "no token: {m}"),
        }
    }
}

impl std::error::Error for ReadError {}

/// Pause between asking an upstream that keeps returning a token about to expire.
const EXPIRED_ON_ARRIVAL_PAUSE: Duration = Duration::from_millis(1_000);

/// Called once with the outcome of a read; may run on a fetch thread.
pub type Done = Box<dyn FnOnce(Result<Arc<Version>, ReadError>) + Send>;

/// Whether an open of a version may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenDecision {
    Serve,
    /// Superseded or expired: the reader must look the name up again.
    Stale,
}

#[derive(Default)]
struct Entry {
    declared: bool,
    current: Option<Arc<Version>>,
    schedule: Option<Schedule>,
    /// Some while a fetch runs: the readers waiting for it.
    waiters: Option<Vec<Done>>,
    read_since_fetch: bool,
    /// Opens by the readers whose lookups waited for this token: not later reads.
    opens_to_skip: usize,
    last_read: u64,
    next_attempt_at: EpochMs,
    refused_until: EpochMs,
    consecutive_failures: u32,
    last_error: Option<(String, EpochMs)>,
    upstream_calls: u64,
    fetched_at: Option<EpochMs>,
    unchanged_logged: bool,
}

impl Entry {
    fn view(&self) -> EntryView {
        EntryView {
            schedule: self.schedule,
            fetch_in_flight: self.waiters.is_some(),
            next_attempt_at: self.next_attempt_at,
            refused_until: self.refused_until,
        }
    }

    fn valid(&self, now: EpochMs) -> Option<&Arc<Version>> {
        match self.schedule {
            Some(s) if now < s.valid_until => self.current.as_ref(),
            _ => None,
        }
    }

    fn state(&self, now: EpochMs) -> &'static str {
        let valid = self.valid(now).is_some();
        match () {
            _ if self.waiters.is_some() => {
                if valid {
                    "refreshing"
                } else {
                    "fetching"
                }
            }
            _ if !valid && now < self.refused_until => "refused",
            _ if self.consecutive_failures > 0 => "failed",
            _ if !valid => "empty",
            _ if self.schedule.is_some_and(|s| now >= s.refresh_at) => "stale-but-valid",
            _ => "fresh",
        }
    }
}

pub struct Cache {
    source: Arc<dyn Source>,
    policy: Policy,
    clock: Arc<dyn Clock>,
    entries: Mutex<HashMap<Arc<str>, Entry>>,
    next_version: AtomicU64,
    read_seq: AtomicU64,
    wake: Condvar,
    stopped: Mutex<bool>,
    /// Bumped when every token is dropped; fetches started before it start over.
    generation: AtomicU64,
}

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
            source,
            policy,
            clock,
            entries: Mutex::new(entries),
            next_version: AtomicU64::new(1),
            read_seq: AtomicU64::new(1),
            wake: Condvar::new(),
            stopped: Mutex::new(false),
            generation: AtomicU64::new(0),
        })
    }

    pub fn source(&self) -> &dyn Source {
        &*self.source
    }

    pub fn now(&self) -> EpochMs {
        self.clock.now()
    }

    /// The token of `resource` for a reader: `done` runs at once when a valid token is held,
    /// else when the fetch (started here or already under way) ends.
    pub fn get(self: &Arc<Self>, resource: &str, done: Done) {
        let now = self.clock.now();
        let mut entries = self.entries.lock();
        if !entries.contains_key(resource) {
            self.evict_for_one_more(&mut entries);
            entries.insert(Arc::from(resource), Entry::default());
        }
        let Some(key) = entries.get_key_value(resource).map(|(k, _)| k.clone()) else {
            return;
        };
        let Some(entry) = entries.get_mut(&key) else {
            return;
        };
        entry.last_read = self.read_seq.fetch_add(1, Ordering::Relaxed);
        match policy::on_read(now, &entry.view()) {
            ReadDecision::Serve => {
                let v = entry.valid(now).cloned();
                drop(entries);
                done(v.ok_or_else(|| unreachable_state(&key)))
            }
            ReadDecision::ServeAndRefresh => {
                let v = entry.valid(now).cloned();
                entry.waiters = Some(Vec::new());
                drop(entries);
                self.spawn_fetch(key.clone());
                done(v.ok_or_else(|| unreachable_state(&key)))
            }
            ReadDecision::Refused => {
                let why = entry
                    .last_error
                    .as_ref()
                    .map_or_else(String::new, |e| e.0.clone());
                drop(entries);
                done(Err(ReadError::Refused(why)))
            }
            ReadDecision::Wait => match &mut entry.waiters {
                Some(waiters) => waiters.push(done),
                None => {
                    entry.waiters = Some(vec![done]);
                    drop(entries);
                    self.spawn_fetch(key);
                }
            },
        }
    }

    /// `get` for callers that may block (the `get` command, tests).
    pub fn get_blocking(self: &Arc<Self>, resource: &str) -> Result<Arc<Version>, ReadError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.get(resource, Box::new(move |r| drop(tx.send(r))));
        rx.recv()
            .unwrap_or_else(|_| Err(ReadError::Unavailable("the fetch was abandoned".into())))
    }

    /// An open of `v`: may it be served, or must the reader look the name up again?
    pub fn on_open(self: &Arc<Self>, v: &Version) -> OpenDecision {
        let now = self.clock.now();
        let mut entries = self.entries.lock();
        let Some(entry) = entries.get_mut(&*v.resource) else {
            return OpenDecision::Stale;
        };
        if entry.valid(now).is_none_or(|cur| cur.id != v.id) {
            return OpenDecision::Stale;
        }
        if entry.opens_to_skip > 0 {
            entry.opens_to_skip -= 1;
        } else {
            entry.read_since_fetch = true;
        }
        entry.last_read = self.read_seq.fetch_add(1, Ordering::Relaxed);
        if policy::on_read(now, &entry.view()) == ReadDecision::ServeAndRefresh {
            entry.waiters = Some(Vec::new());
            drop(entries);
            self.spawn_fetch(v.resource.clone());
        }
        OpenDecision::Serve
    }

    /// Every resource to list: the declared ones and those whose token is held.
    pub fn listed(&self) -> Vec<(Arc<str>, Option<Arc<Version>>)> {
        let now = self.clock.now();
        let entries = self.entries.lock();
        entries
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
        self.entries
            .lock()
            .get(resource)
            .and_then(|e| e.valid(now).cloned())
    }

    /// `.status`: per resource state and times, never token bytes.
    pub fn status(&self) -> serde_json::Value {
        let now = self.clock.now();
        let secs = |ms: EpochMs| ms.div_euclid(1000);
        let entries = self.entries.lock();
        let mut resources: Vec<serde_json::Value> = entries
            .iter()
            .map(|(r, e)| {
                let held = e.valid(now);
                serde_json::json!({
                    "name": crate::names::canonical_name(r),
                    "resource": &**r,
                    "state": e.state(now),
                    "declared": e.declared,
                    "expires_on": held.map(|v| secs(v.expires_on)),
                    "fetched_at": e.fetched_at.map(secs),
                    "next_refresh": match (held, e.schedule) {
                        (Some(_), Some(s)) => Some(secs(s.refresh_at.max(e.next_attempt_at))),
                        _ => None,
                    },
                    "upstream_calls": e.upstream_calls,
                    "consecutive_failures": e.consecutive_failures,
                    "last_error": e.last_error.as_ref().map(|x| &x.0),
                    "last_error_at": e.last_error.as_ref().map(|x| secs(x.1)),
                })
            })
            .collect();
        resources.sort_by(|a, b| a["resource"].as_str().cmp(&b["resource"].as_str()));
        serde_json::json!({
            "endpoint": self.source.endpoint(),
            "source": self.source.kind(),
            "refresh_margin": self.policy.refresh_margin_ms / 1000,
            "negative_ttl": self.policy.negative_ttl_ms / 1000,
            "timeout": self.policy.timeout.as_secs(),
            "now": secs(now),
            "resources": resources,
        })
    }

    /// Drops every held token (wiped once no open file holds it) and every refusal.
    pub fn clear(&self) {
        let mut entries = self.entries.lock();
        self.generation.fetch_add(1, Ordering::SeqCst);
        entries.retain(|_, e| e.declared || e.waiters.is_some());
        for e in entries.values_mut() {
            e.current = None;
            e.schedule = None;
            e.refused_until = 0;
            e.next_attempt_at = 0;
            e.consecutive_failures = 0;
        }
        info!("dropped every held token; the next read of each fetches anew");
    }

    /// Starts the background worker: refresh ahead of tokens in use, drop expired ones.
    pub fn start_background(self: &Arc<Self>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let cache = self.clone();
        std::thread::Builder::new()
            .name("refresher".into())
            .spawn(move || cache.background())
    }

    pub fn stop_background(&self) {
        *self.stopped.lock() = true;
        self.wake.notify_all();
    }

    fn background(self: Arc<Self>) {
        let mut stopped = self.stopped.lock();
        while !*stopped {
            let pause = self.background_pass();
            self.wake.wait_for(&mut stopped, pause);
        }
    }

    /// One pass: starts due refreshes, drops expired tokens; returns when to look again.
    fn background_pass(self: &Arc<Self>) -> Duration {
        let now = self.clock.now();
        let mut due = Vec::new();
        let mut next = now + 1_000;
        {
            let mut entries = self.entries.lock();
            for (r, e) in entries.iter_mut() {
                if e.current.is_some() && e.valid(now).is_none() && e.waiters.is_none() {
                    debug!("token of {r} expired: dropped");
                    e.current = None;
                }
                if e.read_since_fetch && policy::refresh_ahead_due(now, &e.view()) {
                    e.waiters = Some(Vec::new());
                    due.push(r.clone());
                } else if let (Some(s), true) = (e.schedule, e.read_since_fetch) {
                    let at = s.refresh_ahead_at.max(e.next_attempt_at);
                    if at > now {
                        next = next.min(at);
                    }
                }
            }
            entries.retain(|_, e| {
                e.declared || e.current.is_some() || e.waiters.is_some() || now < e.refused_until
            });
        }
        for r in due {
            self.spawn_fetch(r);
        }
        Duration::from_millis((next - now).clamp(10, 1_000) as u64)
    }

    fn evict_for_one_more(&self, entries: &mut HashMap<Arc<str>, Entry>) {
        while entries.len() >= self.policy.max_resources {
            let victim = entries
                .iter()
                .filter(|(_, e)| !e.declared && e.waiters.is_none())
                .min_by_key(|(_, e)| e.last_read)
                .map(|(r, _)| r.clone());
            match victim {
                Some(r) => {
                    debug!("evicting {r} (least recently read)");
                    entries.remove(&r);
                }
                None => break,
            }
        }
    }

    fn spawn_fetch(self: &Arc<Self>, resource: Arc<str>) {
        let cache = self.clone();
        let r = resource.clone();
        let spawned = std::thread::Builder::new()
            .name("fetch".into())
            .spawn(move || {
                // If the fetch panics, nobody is left waiting.
                let guard = AbandonOnDrop {
                    cache: &cache,
                    resource: &r,
                };
                cache.fetch(&r);
                std::mem::forget(guard);
            });
        if let Err(e) = spawned {
            warn!("cannot start a fetch thread: {e}");
            self.abandon(&resource, &format!("cannot start a fetch thread: {e}"));
        }
    }

    /// Answers whoever still waits on `resource` with an error and ends the fetch state.
    fn abandon(&self, resource: &str, why: &str) {
        let waiters = self
            .entries
            .lock()
            .get_mut(resource)
            .and_then(|e| e.waiters.take());
        for done in waiters.unwrap_or_default() {
            done(Err(ReadError::Unavailable(why.to_string())));
        }
    }

    /// Runs on its own thread: asks the upstream (retrying transient failures within the
    /// timeout), records the outcome, then answers every waiter. A fetch that was under way
    /// when the tokens were dropped (SIGUSR1) starts over: its answer may be of the old login.
    fn fetch(self: &Arc<Self>, resource: &Arc<str>) {
        let (result, calls) = loop {
            let generation = self.generation.load(Ordering::SeqCst);
            let outcome = self.ask(resource);
            if generation == self.generation.load(Ordering::SeqCst) {
                break outcome;
            }
            debug!("{resource}: tokens were dropped during the fetch; fetching again");
        };
        let now = self.clock.now();
        let mut entries = self.entries.lock();
        let Some(entry) = entries.get_mut(resource) else {
            return;
        };
        entry.upstream_calls += calls;
        let held = entry.current.as_ref().map(|v| v.id);
        let outcome = match result {
            Ok(token) => self.accept(resource, entry, token, now),
            Err(e) => Err(self.record_failure(resource, entry, &e, now)),
        };
        let waiters = entry.waiters.take().unwrap_or_default();
        // The waiters' own opens of a new version are not later reads of it.
        if outcome.as_ref().is_ok_and(|v| Some(v.id) != held) {
            entry.opens_to_skip = waiters.len();
        }
        drop(entries);
        for done in waiters {
            done(outcome.clone());
        }
    }

    /// The upstream's answer within the timeout, and how many calls it took.
    fn ask(&self, resource: &str) -> (Result<Token, SourceError>, u64) {
        let deadline = Instant::now() + self.policy.timeout;
        let mut calls = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (result, n) = fetch_with_retries(&*self.source, resource, left);
            calls += n;
            // An upstream that caches hands out its old token until it has expired; near
            // expiry that token is already too old for us. Ask again, calmly, until the
            // upstream issues a new one or the time is up.
            let stale = result.as_ref().is_ok_and(|t| self.expired_on_arrival(t));
            if stale && Instant::now() + EXPIRED_ON_ARRIVAL_PAUSE < deadline {
                debug!("{resource}: the endpoint returned a token that is about to expire; asking again");
                std::thread::sleep(EXPIRED_ON_ARRIVAL_PAUSE);
                continue;
            }
            return (result, calls);
        }
    }

    fn expired_on_arrival(&self, t: &Token) -> bool {
        let now = self.clock.now();
        now >= policy::valid_until(t.issued_at(now), t.expires_on)
    }

    fn accept(
        &self,
        resource: &Arc<str>,
        entry: &mut Entry,
        token: Token,
        now: EpochMs,
    ) -> Result<Arc<Version>, ReadError> {
        let schedule = policy::schedule(
            token.issued_at(now),
            token.expires_on,
            token.refresh_in_ms,
            self.policy.refresh_margin_ms,
        );
        if let (Some(held), Some(old)) = (entry.valid(now).cloned(), entry.schedule) {
            if held.expires_on == token.expires_on && held.token() == token.access_token.as_bytes()
            {
                // An upstream that caches handed back what we hold: keep it, ask again later.
                entry.next_attempt_at = policy::unchanged_retry_at(now, &old);
                entry.consecutive_failures = 0;
                if !entry.unchanged_logged {
                    info!("{resource}: the endpoint returned the token already held (it caches); retrying closer to expiry");
                    entry.unchanged_logged = true;
                }
                return Ok(held);
            }
        }
        if now >= schedule.valid_until {
            let e = SourceError::BadResponse(
                "the endpoint issued a token that is already expired".into(),
            );
            return Err(self.record_failure(resource, entry, &e, now));
        }
        let id = self.next_version.fetch_add(1, Ordering::Relaxed);
        let version = Arc::new(Version::new(id, resource.clone(), &token, now));
        if entry.consecutive_failures > 0 {
            info!(
                "{resource}: token fetched again after {} failure(s)",
                entry.consecutive_failures
            );
        }
        info!(
            "{resource}: new token, expires in {} s, refresh in {} s",
            (token.expires_on - now) / 1000,
            (schedule.refresh_at - now) / 1000
        );
        entry.current = Some(version.clone());
        entry.schedule = Some(schedule);
        entry.fetched_at = Some(now);
        entry.read_since_fetch = false;
        entry.next_attempt_at = 0;
        entry.refused_until = 0;
        entry.consecutive_failures = 0;
        entry.unchanged_logged = false;
        Ok(version)
    }

    /// Records a failed fetch; the held token (if valid) stays. Returns what waiters get.
    fn record_failure(
        &self,
        resource: &str,
        entry: &mut Entry,
        e: &SourceError,
        now: EpochMs,
    ) -> ReadError {
        let message = e.to_string();
        entry.consecutive_failures += 1;
        entry.last_error = Some((message.clone(), now));
        let jitter = (now.rem_euclid(1000)) as f64 / 1000.0;
        entry.next_attempt_at = now.saturating_add(policy::backoff_ms(
            entry.consecutive_failures,
            e.retry_after(),
            jitter,
        ));
        let held = entry.valid(now).is_some();
        let refused = e.failure() == Failure::Refused;
        if refused && !held {
            entry.refused_until = now.saturating_add(self.policy.negative_ttl_ms);
        }
        if entry.consecutive_failures == 1 {
            if held {
                warn!("{resource}: refresh failed, still serving the held token: {message}");
            } else {
                warn!("{resource}: fetch failed: {message}");
            }
        } else {
            debug!(
                "{resource}: failure {} in a row: {message}",
                entry.consecutive_failures
            );
        }
        if refused {
            ReadError::Refused(message)
        } else {
            ReadError::Unavailable(message)
        }
    }
}

/// Answers the waiters of a fetch thread that unwinds without doing so (a panic); forgotten
/// when the fetch ends normally (a later fetch's waiters are not ours).
struct AbandonOnDrop<'a> {
    cache: &'a Cache,
    resource: &'a str,
}

impl Drop for AbandonOnDrop<'_> {
    fn drop(&mut self) {
        self.cache.abandon(
            self.resource,
            "internal error: the fetch ended unexpectedly",
        );
    }
}

fn unreachable_state(resource: &str) -> ReadError {
    ReadError::Unavailable(format!(
        "{resource}: internal error: no valid token to serve"
    ))
}

/// Asks the upstream until it answers, refuses, or the time is up. Transient failures
/// (connection trouble, timeouts, 404, 408, 410, 429, 5xx) are retried after a short pause
/// or the upstream's `Retry-After` when that fits. Returns the outcome and the number of calls.
pub fn fetch_with_retries(
    source: &dyn Source,
    resource: &str,
    timeout: Duration,
) -> (Result<Token, SourceError>, u64) {
    let deadline = Instant::now() + timeout;
    let mut calls = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (Err(SourceError::Timeout), calls);
        }
        calls += 1;
        let err = match source.fetch_once(resource, left) {
            Ok(t) => return (Ok(t), calls),
            Err(e) => e,
        };
        if err.failure() != Failure::Transient {
            return (Err(err), calls);
        }
        let pause = err
            .retry_after()
            .unwrap_or_else(|| policy::in_fetch_pause(calls as u32 - 1));
        let left = deadline.saturating_duration_since(Instant::now());
        if pause >= left {
            return (Err(err), calls);
        }
        debug!("{resource}: attempt {calls} failed ({err}); again in {pause:?}");
        std::thread::sleep(pause);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicI64;
    use zeroize::Zeroizing;

    struct FakeClock(AtomicI64);

    impl Clock for FakeClock {
        fn now(&self) -> EpochMs {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// Issues tokens living `life` ms from the fake clock's now; counts calls.
    struct FakeSource {
        clock: Arc<FakeClock>,
        life: i64,
        calls: AtomicU64,
    }

    impl Source for FakeSource {
        fn fetch_once(&self, _r: &str, _t: Duration) -> Result<Token, SourceError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Token {
                access_token: Zeroizing::new(format!("token-{n}")),
                token_type: "Bearer".into(),
                expires_on: self.clock.now() + self.life,
                refresh_in_ms: None,
                not_before: None,
            })
        }
        fn endpoint(&self) -> String {
            "fake".into()
        }
        fn kind(&self) -> &'static str {
            "fake"
        }
    }

    fn setup(life: i64) -> (Arc<Cache>, Arc<FakeClock>, Arc<FakeSource>) {
        let clock = Arc::new(FakeClock(AtomicI64::new(1_000_000)));
        let source = Arc::new(FakeSource {
            clock: clock.clone(),
            life,
            calls: AtomicU64::new(0),
        });
        let policy = Policy {
            refresh_margin_ms: 300_000,
            ..Policy::default()
        };
        let cache = Cache::new(source.clone(), policy, &[], clock.clone());
        (cache, clock, source)
    }

    fn wait_calls(source: &FakeSource, n: u64) {
        for _ in 0..500 {
            if source.calls.load(Ordering::SeqCst) >= n {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("expected {n} upstream calls");
    }

    #[test]
    fn serves_until_the_refresh_point_then_refreshes_in_the_background() {
        let (cache, clock, source) = setup(3_600_000);
        let first = cache.get_blocking("r").unwrap();
        clock.0.fetch_add(3_300_000 - 1_000, Ordering::SeqCst); // a second before the refresh point
        assert_eq!(cache.get_blocking("r").unwrap().id, first.id);
        assert_eq!(source.calls.load(Ordering::SeqCst), 1);
        clock.0.fetch_add(1_000, Ordering::SeqCst); // exactly at the refresh point
        let served = cache.get_blocking("r").unwrap();
        assert_eq!(
            served.id, first.id,
            "the held token, while a refresh starts"
        );
        wait_calls(&source, 2);
        let mut newer = cache.get_blocking("r").unwrap();
        for _ in 0..500 {
            if newer.id != first.id {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
            newer = cache.get_blocking("r").unwrap();
        }
        assert_ne!(newer.id, first.id);
    }

    struct PanickingSource;

    impl Source for PanickingSource {
        fn fetch_once(&self, _r: &str, _t: Duration) -> Result<Token, SourceError> {
            panic!("a source bug");
        }
        fn endpoint(&self) -> String {
            "panics".into()
        }
        fn kind(&self) -> &'static str {
            "fake"
        }
    }

    #[test]
    fn a_panicking_fetch_leaves_nobody_waiting() {
        let clock = Arc::new(FakeClock(AtomicI64::new(0)));
        let cache = Cache::new(Arc::new(PanickingSource), Policy::default(), &[], clock);
        let (tx, rx) = std::sync::mpsc::channel();
        let c = cache.clone();
        std::thread::spawn(move || drop(tx.send(c.get_blocking("r"))));
        let got = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the reader is answered");
        assert!(matches!(got, Err(ReadError::Unavailable(_))));
        // And the resource is not stuck "fetching": the next reader starts a fetch again.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || drop(tx.send(cache.get_blocking("r"))));
        assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok());
    }

    #[test]
    fn a_clock_jump_past_expiry_never_serves_the_old_token() {
        let (cache, clock, source) = setup(3_600_000);
        let first = cache.get_blocking("r").unwrap();
        // A laptop suspended for two hours: the wall clock jumps.
        clock.0.fetch_add(7_200_000, Ordering::SeqCst);
        let after = cache.get_blocking("r").unwrap();
        assert_ne!(after.id, first.id, "the reader waited for a new token");
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        assert_eq!(cache.on_open(&first), OpenDecision::Stale);
        assert_eq!(cache.on_open(&after), OpenDecision::Serve);
    }

    #[test]
    fn within_the_skew_before_expiry_a_token_is_not_served() {
        let (cache, clock, source) = setup(3_600_000);
        let first = cache.get_blocking("r").unwrap();
        clock.0.fetch_add(3_600_000 - 5_000, Ordering::SeqCst); // 5 s before expiry
        assert_eq!(cache.on_open(&first), OpenDecision::Stale);
        assert_ne!(cache.get_blocking("r").unwrap().id, first.id);
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
    }
}
