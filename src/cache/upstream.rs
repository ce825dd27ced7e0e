//! The upstream as the cache uses it: the sources of every identity behind the mount-wide
//! request rate
//! (`--max-upstream-rate`, refreshes of held tokens first) and the known-down state (after
//! a connection-level failure, fetches make one attempt each until the upstream answers
//! again, so an endpoint that is down costs one `--timeout`, not one per name). One per
//! cache: every identity of a daemon asks the same upstream, so they share its rate limit
//! and its known-down state.
//!
//! # Locks
//!
//! `limiter` (with `limiter_cv`) and `reach` are never held together, nor while a request
//! is sent or the cache's locks are taken: a fetch worker takes the limiter to wait for
//! its turn, lets go, sends, then takes `reach` to record the outcome.

use super::meters::{Meters, Outcome};
use super::Key;
use crate::policy::{self, Bucket, Clock, EpochMs};
use crate::source::{Failure, Kind, Source, SourceError};
use crate::token::Token;
use log::{debug, info};
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A request that timed out after at least this long marks the upstream down.
const FAIR_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest a first fetch sleeps between looks at the rate limit while refreshes wait.
const YIELD_PAUSE: Duration = Duration::from_millis(10);

/// The rate limit's state, behind `Upstream::limiter`.
struct Limiter {
    /// `--max-upstream-rate`'s token bucket.
    bucket: Bucket,
    /// Refreshes waiting for the bucket: first fetches let them go first.
    refreshes_waiting: usize,
}

/// Whether the upstream answers at all (connection-level failures only).
#[derive(Default)]
struct Reach {
    /// Connection-level failures in a row.
    failures: u32,
    /// Until then, fetches make one attempt instead of the retry loop.
    down_until: EpochMs,
}

pub struct Upstream {
    /// The cache's wall clock.
    clock: Arc<dyn Clock>,
    /// The rate limit; fetch workers wait on it (`acquire`).
    limiter: Mutex<Limiter>,
    /// Wakes first fetches waiting behind refreshes, and waiters when the bucket refills.
    limiter_cv: Condvar,
    /// Whether the upstream answers: written after each fetch (`note`), read by `fetch`
    /// and `.status`, reset on SIGUSR1.
    reach: Mutex<Reach>,
    /// Requests that had to wait for the rate limit (`.status`).
    held_back: AtomicU64,
    /// Why the daemon's plan chose its source, for the first "down" line (set once at
    /// start; none for a daemon whose identities are added at run time).
    chosen: std::sync::OnceLock<String>,
}

impl Upstream {
    pub fn new(clock: Arc<dyn Clock>, rate: u32) -> Upstream {
        let now = clock.now();
        Upstream {
            clock,
            limiter: Mutex::new(Limiter {
                bucket: Bucket::new(rate, now),
                refreshes_waiting: 0,
            }),
            limiter_cv: Condvar::new(),
            reach: Mutex::new(Reach::default()),
            held_back: AtomicU64::new(0),
            chosen: std::sync::OnceLock::new(),
        }
    }

    /// Records why the plan chose the source (the first "down" line names it).
    pub fn set_chosen(&self, reason: &str) {
        let _ = self.chosen.set(reason.to_string());
    }

    pub fn held_back(&self) -> u64 {
        self.held_back.load(Ordering::Relaxed)
    }

    /// The upstream failed at the connection level recently (one attempt per fetch).
    pub fn known_down(&self) -> bool {
        self.clock.now() < self.reach.lock().down_until
    }

    /// Forgets that the upstream was down (SIGUSR1: everything starts afresh).
    pub fn reset(&self) {
        *self.reach.lock() = Reach::default();
    }

    /// Asks until the upstream answers, refuses, or `deadline` passes. Transient failures
    /// (connection trouble, 404, 408, 410, 429, 5xx) are retried after a short pause or the
    /// upstream's `Retry-After` when that fits; a broken HTTP answer once at most; nothing
    /// is retried while the upstream is known down, nor after a loopback endpoint refused
    /// the connection (nothing listens there: `SourceError::ends_the_fetch`). Returns the outcome and the calls made.
    /// Each request is counted in `meters` (outcome, status, latency; retries).
    pub fn fetch(
        &self,
        source: &dyn Source,
        key: &Key,
        deadline: Instant,
        refresh: bool,
        meters: &Meters,
    ) -> (Result<Token, SourceError>, u64) {
        let resource: &str = &key.resource;
        // What a success answered: 200 over HTTP, nothing for a command.
        let ok_status = (source.kind() != Kind::AzureCli).then_some(200);
        let single = self.known_down();
        let mut calls = 0u64;
        let mut protocol_errors = 0;
        // How long the last request was given: a timeout says the upstream is down only
        // when the request had a fair chance (not when the reader's deadline was all but
        // spent waiting for the rate limit or the pool).
        let mut budget = Duration::ZERO;
        let result = loop {
            if let Err(e) = self.acquire(refresh, deadline) {
                break Err(e);
            }
            let left = deadline.saturating_duration_since(self.clock.instant());
            if left.is_zero() {
                budget = Duration::ZERO;
                break Err(SourceError::Timeout);
            }
            budget = left;
            calls += 1;
            if calls > 1 {
                meters.upstream_retries.inc();
            }
            let sent = self.clock.instant();
            let answer = source.fetch_once(resource, left);
            let took = self.clock.instant().saturating_duration_since(sent);
            // A local credential that could not be used: nothing was sent.
            if !matches!(answer, Err(SourceError::Credential(_))) {
                meters.request(key.identity, Outcome::of(&answer, ok_status), took);
            }
            let err = match answer {
                Ok(t) => break Ok(t),
                Err(e) => e,
            };
            if err.failure() != Failure::Transient
                || (single && err.is_connection_level())
                || err.ends_the_fetch()
            {
                break Err(err);
            }
            if matches!(err, SourceError::Protocol(_)) {
                protocol_errors += 1;
                if protocol_errors > 1 {
                    break Err(err);
                }
            }
            let pause = err
                .retry_after()
                .unwrap_or_else(|| policy::in_fetch_pause(calls as u32 - 1));
            if pause >= deadline.saturating_duration_since(self.clock.instant()) {
                break Err(err);
            }
            debug!("{resource}: attempt {calls} failed ({err}); again in {pause:?}");
            std::thread::sleep(pause);
        };
        self.note(source, &result, budget);
        (result, calls)
    }

    /// Records whether the upstream answered at all (`budget`: the last request's time).
    fn note(&self, source: &dyn Source, result: &Result<Token, SourceError>, budget: Duration) {
        let mut reach = self.reach.lock();
        match result {
            // Ran out of time before or soon after sending: says nothing of the upstream.
            Err(SourceError::Timeout) if budget < FAIR_TIMEOUT => {}
            Err(e) if e.is_connection_level() => {
                reach.failures = reach.failures.saturating_add(1);
                let now = self.clock.now();
                reach.down_until =
                    now.saturating_add(policy::backoff_ms(reach.failures, None, 0.0));
                if reach.failures == 1 {
                    let chosen = self
                        .chosen
                        .get()
                        .map(|r| format!(", chosen because {r}"))
                        .unwrap_or_default();
                    info!(
                        "the endpoint ({} at {}{chosen}) is down ({e}): one attempt per fetch until it answers",
                        source.kind(),
                        source.endpoint()
                    );
                }
            }
            // Anything else was an answer: the upstream is up.
            Err(SourceError::Throttled) => {}
            _ => {
                if reach.failures > 0 {
                    info!("the endpoint answers again");
                }
                *reach = Reach::default();
            }
        }
    }

    /// Waits for the rate limit's permission to send one request, refreshes first; the
    /// error once `deadline` passes.
    fn acquire(&self, refresh: bool, deadline: Instant) -> Result<(), SourceError> {
        let mut l = self.limiter.lock();
        if refresh {
            l.refreshes_waiting += 1;
        }
        let mut counted = false;
        let outcome = loop {
            let wait = if !refresh && l.refreshes_waiting > 0 {
                Some(YIELD_PAUSE)
            } else {
                match l.bucket.take(self.clock.now()) {
                    Ok(()) => None,
                    Err(ms) => Some(Duration::from_millis(ms.clamp(1, 1_000) as u64)),
                }
            };
            let Some(wait) = wait else { break Ok(()) };
            if !counted {
                self.held_back.fetch_add(1, Ordering::Relaxed);
                counted = true;
            }
            // Deadlines are on the clock's monotonic time: wait for a duration, not until an
            // instant (a fake clock's instants run ahead of real ones).
            let left = deadline.saturating_duration_since(self.clock.instant());
            if left.is_zero() {
                break Err(SourceError::Throttled);
            }
            self.limiter_cv.wait_for(&mut l, wait.min(left));
        };
        if refresh {
            l.refreshes_waiting -= 1;
            self.limiter_cv.notify_all();
        }
        outcome
    }
}
