//! What the cache keeps per key (identity, resource): the entry (held version, fetch in flight, failures,
//! reads) and the negative cache of refusals, each field documented.

use super::status::ResourceState;
use super::{Key, ReadError, Waiter};
use crate::policy::{self, EntryView, EpochMs, Verdict};
use crate::token::Version;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Refusals remembered at most (each for `--negative-ttl`); the oldest go first.
pub const MAX_REFUSALS: usize = 10_000;

/// How the last fetches of a resource went.
#[derive(Default)]
pub(super) struct Failures {
    /// Failed fetches in a row (0 after a success).
    pub(super) consecutive: u32,
    /// Background refreshes wait until then (backoff, or an upstream that cached).
    pub(super) next_attempt_at: EpochMs,
    /// The last failure's (redacted) message and when it happened.
    pub(super) last_error: Option<(String, EpochMs)>,
    /// "The endpoint returned the token already held" was logged for the held version.
    pub(super) unchanged_logged: bool,
}

/// How the held version is read.
#[derive(Default)]
pub(super) struct Reads {
    /// Read since it was fetched (the filesystem tells which opens are reads): in use, so
    /// refreshed ahead of its refresh point.
    pub(super) since_fetch: bool,
    /// Sequence number of the last read: the least recently read entry is evicted first.
    pub(super) last: u64,
}

/// One resource that is declared, holds a token or is being fetched. Refusals live apart
/// (`Refusals`), so a flood of refused names never evicts a token.
#[derive(Default)]
pub(super) struct Entry {
    /// Named with `--resource`: always listed, never evicted.
    pub(super) declared: bool,
    /// The newest version (it may have expired; `valid` says).
    pub(super) held: Option<Arc<Version>>,
    /// Some while a fetch is queued or running: the readers waiting for it.
    pub(super) waiters: Option<Vec<Waiter>>,
    /// When the last fetch started (fetches of a held token are paced).
    pub(super) last_fetch_at: Option<EpochMs>,
    /// How the last fetches went (backoff, the last error).
    pub(super) failures: Failures,
    /// How the held version is read (in use, eviction order).
    pub(super) reads: Reads,
    /// Upstream requests made for this resource.
    pub(super) upstream_calls: u64,
    /// When the held version was fetched.
    pub(super) fetched_at: Option<EpochMs>,
}

impl Entry {
    pub(super) fn view(&self, refused_until: EpochMs) -> EntryView {
        EntryView {
            schedule: self.held.as_ref().map(|v| v.schedule),
            fetch_in_flight: self.waiters.is_some(),
            next_attempt_at: self.failures.next_attempt_at,
            refused_until,
            last_fetch_at: self.last_fetch_at,
        }
    }

    pub(super) fn valid(&self, now: EpochMs) -> Option<&Arc<Version>> {
        self.held
            .as_ref()
            .filter(|v| policy::verdict(now, &v.schedule, true) != Verdict::Expired)
    }

    pub(super) fn state(&self, now: EpochMs, refusal: Option<&Refusal>) -> ResourceState {
        let valid = self.valid(now).is_some();
        match () {
            _ if self.waiters.is_some() && valid => ResourceState::Refreshing,
            _ if self.waiters.is_some() => ResourceState::Fetching,
            _ if !valid && refusal.is_some() => {
                refusal.map_or(ResourceState::Refused, Refusal::state)
            }
            _ if self.failures.consecutive > 0 => ResourceState::Failed,
            _ if !valid => ResourceState::Empty,
            _ if self
                .held
                .as_ref()
                .is_some_and(|v| now >= v.schedule.refresh_at) =>
            {
                ResourceState::StaleButValid
            }
            _ => ResourceState::Fresh,
        }
    }
}

/// A resource the upstream said no to, answered without asking again until `until`.
#[derive(Clone)]
pub(super) struct Refusal {
    /// Answered from here until then (`--negative-ttl`).
    pub(super) until: EpochMs,
    /// What readers get meanwhile.
    pub(super) error: ReadError,
    /// When the upstream refused.
    pub(super) at: EpochMs,
    /// Upstream requests made for the key up to this refusal (its entry's count, which
    /// starts from the last refusal's when the name is asked again after it expires).
    pub(super) upstream_calls: u64,
}

impl Refusal {
    pub(super) fn state(&self) -> ResourceState {
        match self.error {
            ReadError::Denied(_) => ResourceState::Denied,
            _ => ResourceState::Refused,
        }
    }

    pub(super) fn message(&self) -> &str {
        match &self.error {
            ReadError::Refused(m) | ReadError::Denied(m) | ReadError::Unavailable(m) => m,
        }
    }
}

/// The negative cache: at most `MAX_REFUSALS`, the oldest dropped first.
#[derive(Default)]
pub(super) struct Refusals {
    /// The refusals, by key.
    pub(super) by_key: HashMap<Key, Refusal>,
    /// Insertion order, with the time of each insertion (stale pairs are skipped).
    pub(super) order: VecDeque<(Key, EpochMs)>,
}

impl Refusals {
    pub(super) fn active(&self, key: &Key, now: EpochMs) -> Option<&Refusal> {
        self.by_key.get(key).filter(|r| now < r.until)
    }

    pub(super) fn insert(&mut self, key: Key, refusal: Refusal) {
        while self.by_key.len() >= MAX_REFUSALS && !self.by_key.contains_key(&key) {
            let Some((old, at)) = self.order.pop_front() else {
                break;
            };
            if self.by_key.get(&old).is_some_and(|r| r.at == at) {
                self.by_key.remove(&old);
            }
        }
        self.order.push_back((key.clone(), refusal.at));
        self.by_key.insert(key, refusal);
    }

    pub(super) fn expire(&mut self, now: EpochMs) {
        self.by_key.retain(|_, r| now < r.until);
        let by_key = &self.by_key;
        self.order
            .retain(|(r, at)| by_key.get(r).is_some_and(|x| x.at == *at));
        shrink(&mut self.by_key);
        if self.order.capacity() > 4 * self.order.len().max(16) {
            self.order.shrink_to_fit();
        }
    }
}

/// Gives memory back once a map has emptied out (a flood of names must not pin it): the
/// map's own table, then the allocator's free pages.
pub(super) fn shrink<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 4 * map.len().max(16) {
        map.shrink_to_fit();
        release_free_memory();
    }
}

/// Returns the allocator's free pages to the system (glibc keeps them otherwise).
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
