//! What a scrape reads of the cache's state (`--metrics`): per key that is declared, holds
//! a valid token, or held one and now fails to fetch another (so about `--max-resources` of
//! them: refused names and names that never held a token are counted, never listed), its
//! expiry, next refresh and failures; and whether the
//! cache is ready (`/readyz`). Gathered under the cache's lock, like `.status`, and never
//! token bytes.

use super::{Cache, IdentityId, Key, State, Use};
use crate::policy::EpochMs;
use std::sync::Arc;

/// One key as a scrape sees it. Times are epoch seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyGauge {
    pub identity: IdentityId,
    /// The resource string sent upstream.
    pub resource: String,
    /// Named with `--resource` (or declared by a front end).
    pub declared: bool,
    /// The held token's expiry, while it is valid.
    pub expires_on: Option<i64>,
    /// When the held token is refreshed next in the background (a backoff or the pacing
    /// move it later); `None` for a token not in use, which is left to expire.
    pub next_refresh: Option<i64>,
    /// Failed fetches in a row.
    pub consecutive_failures: u32,
}

/// The cache's state at one scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct Gauges {
    /// Keys declared or holding a valid token, by (identity, resource).
    pub keys: Vec<KeyGauge>,
    /// Names in the negative cache now.
    pub refusals: usize,
    /// Fetches waiting for a worker of the pool.
    pub fetches_queued: usize,
    /// The upstream failed at the connection level recently.
    pub upstream_down: bool,
    /// Upstream requests the rate limit made wait, since start.
    pub upstream_held_back: u64,
}

/// When the background pass refreshes an entry in use whose token refreshes ahead at
/// `ahead`: not before a backoff nor the pacing of fetches allows (as `background_pass`).
fn refresh_due(ahead: EpochMs, e: &super::entry::Entry) -> EpochMs {
    let paced = e
        .last_fetch_at
        .map_or(0, |t| t + crate::policy::MIN_FETCH_INTERVAL_MS);
    ahead.max(e.failures.next_attempt_at).max(paced)
}

impl Cache {
    /// The cache's state for a scrape.
    pub fn gauges(&self) -> Gauges {
        let now = self.clock.now();
        let secs = |ms: EpochMs| ms.div_euclid(1000);
        let guard = self.state.lock();
        let State { entries, refusals } = &*guard;
        let mut keys: Vec<KeyGauge> = entries
            .iter()
            .filter_map(|(k, e)| {
                let held = e.valid(now);
                let lost = e.fetched_at.is_some() && e.failures.consecutive > 0;
                (e.declared || held.is_some() || lost).then(|| KeyGauge {
                    identity: k.identity,
                    resource: k.resource.to_string(),
                    declared: e.declared,
                    expires_on: held.map(|v| secs(v.expires_on)),
                    next_refresh: held
                        .filter(|_| e.reads.since_fetch)
                        .map(|v| secs(refresh_due(v.schedule.refresh_ahead_at, e))),
                    consecutive_failures: e.failures.consecutive,
                })
            })
            .collect();
        let refusals = refusals.by_key.values().filter(|r| now < r.until).count();
        drop(guard);
        keys.sort_by(|a, b| (a.identity, &a.resource).cmp(&(b.identity, &b.resource)));
        Gauges {
            keys,
            refusals,
            fetches_queued: self.pool.queued(),
            upstream_down: self.upstream.known_down(),
            upstream_held_back: self.upstream.held_back(),
        }
    }

    /// Why the cache is not ready (`/readyz`), if it is not: the first declared key that
    /// holds no valid token and whose latest fetch did not succeed (its name, never more).
    /// Such a key is fetched now (a look, not a use, not waited for) unless a fetch is under
    /// way or its backoff after a failure has not passed: the probe is what gets a mount
    /// whose resources nobody has read ready, and a flood of probes costs at most what the
    /// backoff allows.
    pub fn unready(self: &Arc<Self>) -> Option<String> {
        let now = self.clock.now();
        let guard = self.state.lock();
        let mut waiting: Vec<(Key, bool)> = guard
            .entries
            .iter()
            .filter(|(_, e)| {
                e.declared
                    && e.valid(now).is_none()
                    && (e.fetched_at.is_none() || e.failures.consecutive > 0)
            })
            .map(|(k, e)| {
                let due = e.waiters.is_none() && now >= e.failures.next_attempt_at;
                (k.clone(), due)
            })
            .collect();
        drop(guard);
        waiting.sort();
        for (key, _) in waiting.iter().filter(|(_, due)| *due) {
            self.read(key, Use::Probe, Box::new(drop));
        }
        let (first, _) = waiting.first()?;
        Some(format!(
            "{} holds no valid token{}",
            self.shown(first),
            match waiting.len() {
                1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            }
        ))
    }
}
