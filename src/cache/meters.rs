//! What the cache counts for `--metrics`, as it happens: reads by front end, readers that
//! waited for a fetch (and how long), single-flight joins, negative-cache answers,
//! evictions, and every upstream request by identity, result and HTTP status with its
//! latency. What is *held* (expiry, next refresh, valid) is not counted here: it is read
//! from the entries at scrape time (`Cache::gauges`, in `gauges.rs`).
//!
//! The metric types are `prometheus-client`'s (atomics, and a histogram behind its own
//! lock); the per-identity request counts are a map behind `Meters::requests`, a leaf lock
//! held for one insert or one copy, so an identity removed at run time takes its series
//! with it (`forget_identity`). Nothing here holds a token or names a token's claim.

use super::IdentityId;
use crate::source::{Failure, SourceError};
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The front end a read came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrontEnd {
    /// A token file opened (or read) on the FUSE mount.
    File,
    /// A lookup answered in `--no-open` mode (the kernel then serves the read itself).
    NoOpenLookup,
    /// A request to `--serve-endpoint`.
    Endpoint,
    /// A request to `--serve-imds`.
    Imds,
    /// A token file written by the sink.
    SinkWrite,
    /// A token written into a CSI volume (publish or republish).
    CsiPublish,
}

impl FrontEnd {
    pub const ALL: [FrontEnd; 6] = [
        FrontEnd::File,
        FrontEnd::NoOpenLookup,
        FrontEnd::Endpoint,
        FrontEnd::Imds,
        FrontEnd::SinkWrite,
        FrontEnd::CsiPublish,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FrontEnd::File => "file",
            FrontEnd::NoOpenLookup => "no_open_lookup",
            FrontEnd::Endpoint => "endpoint",
            FrontEnd::Imds => "imds",
            FrontEnd::SinkWrite => "sink_write",
            FrontEnd::CsiPublish => "csi_publish",
        }
    }
}

/// How one upstream request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// A token.
    Ok,
    /// The upstream said no to the resource or the identity (4xx but 404, 408, 410, 429).
    Refused,
    /// The upstream asked us to slow down (429).
    Throttled,
    /// Anything else: no connection, 5xx, a broken or unusable answer.
    Error,
    /// No complete answer in the time allowed.
    Timeout,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Throttled => "throttled",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
        }
    }

    /// A request's outcome and its HTTP status (`None`: no HTTP answer, or a source that
    /// is not HTTP). `ok_status` is what a success answered (200 over HTTP).
    pub fn of<T>(
        result: &Result<T, SourceError>,
        ok_status: Option<u16>,
    ) -> (Outcome, Option<u16>) {
        let e = match result {
            Ok(_) => return (Outcome::Ok, ok_status),
            Err(e) => e,
        };
        let status = match e {
            SourceError::Status { status, .. } | SourceError::Entra { status, .. } => Some(*status),
            // A 2xx answer that is not a usable token: what a success answers.
            SourceError::BadResponse(_) => ok_status,
            _ => None,
        };
        let outcome = match e {
            SourceError::Timeout => Outcome::Timeout,
            _ if status == Some(429) => Outcome::Throttled,
            _ => match e.failure() {
                Failure::Refused | Failure::Denied => Outcome::Refused,
                Failure::Transient | Failure::Invalid => Outcome::Error,
            },
        };
        (outcome, status)
    }
}

/// Upstream requests of one identity, by outcome and HTTP status.
pub type RequestCounts = BTreeMap<(Outcome, Option<u16>), u64>;

/// The cache's counters (see the module's doc). Every method takes no lock but the
/// histograms' and `requests`' own.
pub struct Meters {
    /// Tokens served, by front end in `FrontEnd::ALL`'s order (counted by the front ends,
    /// which know which they are; atomics: an open pays one increment).
    reads: [AtomicU64; FrontEnd::ALL.len()],
    /// Seconds each reader that had to wait for a fetch waited (its count: such readers).
    pub read_wait: Histogram,
    /// Readers that joined a fetch already under way instead of starting one.
    pub single_flight_joins: Counter,
    /// Reads answered from the negative cache (a recent refusal).
    pub negative_answers: Counter,
    /// Tokens dropped to stay within `--max-resources`.
    pub evictions: Counter,
    /// Seconds each upstream request took.
    pub upstream_latency: Histogram,
    /// Upstream requests that were retries within one fetch.
    pub upstream_retries: Counter,
    /// Upstream requests by identity, outcome and status: a leaf lock.
    requests: Mutex<BTreeMap<IdentityId, RequestCounts>>,
    /// Registry exchanges (`.acr/`) by identity, outcome and status: a leaf lock.
    exchanges: Mutex<BTreeMap<IdentityId, RequestCounts>>,
}

/// Bounds of the latency histograms, seconds: from a cached answer to `--timeout`.
const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Default for Meters {
    fn default() -> Meters {
        Meters {
            reads: Default::default(),
            read_wait: Histogram::new(LATENCY_BUCKETS),
            single_flight_joins: Counter::default(),
            negative_answers: Counter::default(),
            evictions: Counter::default(),
            upstream_latency: Histogram::new(LATENCY_BUCKETS),
            upstream_retries: Counter::default(),
            requests: Mutex::new(BTreeMap::new()),
            exchanges: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Meters {
    /// A read through `front_end`.
    pub fn read(&self, front_end: FrontEnd) {
        self.reads[front_end as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Tokens served by each front end (every one, 0 where it does not apply).
    pub fn reads(&self) -> [(FrontEnd, u64); FrontEnd::ALL.len()] {
        FrontEnd::ALL.map(|f| (f, self.reads[f as usize].load(Ordering::Relaxed)))
    }

    /// One upstream request of `identity` that ended as `outcome` after `took`.
    pub(super) fn request(
        &self,
        identity: IdentityId,
        (outcome, status): (Outcome, Option<u16>),
        took: Duration,
    ) {
        self.upstream_latency.observe(took.as_secs_f64());
        count(&self.requests, identity, (outcome, status));
    }

    /// One registry exchange of `identity` (`.acr/`) that ended as `outcome`.
    pub(super) fn exchange(&self, identity: IdentityId, outcome: (Outcome, Option<u16>)) {
        count(&self.exchanges, identity, outcome);
    }

    /// Every identity's upstream request counts (a copy).
    pub fn requests(&self) -> Vec<(IdentityId, RequestCounts)> {
        copy(&self.requests)
    }

    /// Every identity's registry exchange counts (a copy).
    pub fn exchanges(&self) -> Vec<(IdentityId, RequestCounts)> {
        copy(&self.exchanges)
    }

    /// Keeps the series of the identities `keep` says exist (a fetch under way when its
    /// identity was removed may count after `forget_identity`).
    pub(super) fn retain_identities(&self, keep: impl Fn(IdentityId) -> bool) {
        self.requests.lock().retain(|id, _| keep(*id));
        self.exchanges.lock().retain(|id, _| keep(*id));
    }

    /// An identity removed at run time: its series go with it.
    pub(super) fn forget_identity(&self, identity: IdentityId) {
        self.requests.lock().remove(&identity);
        self.exchanges.lock().remove(&identity);
    }
}

type ByIdentity = Mutex<BTreeMap<IdentityId, RequestCounts>>;

fn count(map: &ByIdentity, identity: IdentityId, outcome: (Outcome, Option<u16>)) {
    *map.lock()
        .entry(identity)
        .or_default()
        .entry(outcome)
        .or_default() += 1;
}

fn copy(map: &ByIdentity) -> Vec<(IdentityId, RequestCounts)> {
    let map = map.lock();
    map.iter().map(|(id, c)| (*id, c.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_follow_the_failure_kinds() {
        let status = |status| SourceError::Status {
            status,
            message: String::new(),
            retry_after: None,
        };
        let of = |e: SourceError| Outcome::of::<()>(&Err(e), Some(200));
        assert_eq!(Outcome::of(&Ok(()), Some(200)), (Outcome::Ok, Some(200)));
        assert_eq!(of(status(400)), (Outcome::Refused, Some(400)));
        assert_eq!(of(status(403)), (Outcome::Refused, Some(403)));
        assert_eq!(of(status(429)), (Outcome::Throttled, Some(429)));
        assert_eq!(of(status(503)), (Outcome::Error, Some(503)));
        assert_eq!(of(SourceError::Timeout), (Outcome::Timeout, None));
        assert_eq!(
            of(SourceError::BadResponse("no access_token".into())),
            (Outcome::Error, Some(200))
        );
        assert_eq!(
            of(SourceError::Unreachable("refused".into())),
            (Outcome::Error, None)
        );
    }
}
