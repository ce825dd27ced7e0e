//! What `.status` says of the cache: the settings, the upstream's state and one record per
//! resource (held, being fetched, refused, failed). Never token bytes.

use serde::Serialize;

/// The cache's part of `.status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Status {
    /// Where tokens come from (never a secret).
    pub endpoint: String,
    /// The upstream's kind (`cloudshell`, ...).
    pub source: &'static str,
    /// `--refresh-margin`, seconds.
    pub refresh_margin: i64,
    /// `--negative-ttl`, seconds.
    pub negative_ttl: i64,
    /// `--timeout`, seconds.
    pub timeout: u64,
    /// `--max-upstream-rate`, requests per second (0: no bound).
    pub max_upstream_rate: u32,
    /// The upstream failed at the connection level recently (one attempt per fetch).
    pub upstream_down: bool,
    /// Upstream requests the rate limit made wait.
    pub upstream_held_back: u64,
    /// Fetches waiting for a worker of the pool.
    pub fetches_queued: usize,
    /// The wall clock, epoch seconds.
    pub now: i64,
    /// By resource string.
    pub resources: Vec<ResourceStatus>,
}

/// One resource in `.status`. Times are epoch seconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResourceStatus {
    /// Its file name (`None`: too long to be one).
    pub name: Option<String>,
    /// The resource string sent upstream.
    pub resource: String,
    /// fresh, stale-but-valid, refreshing, fetching, failed, refused, denied or empty.
    pub state: &'static str,
    /// Named with `--resource`.
    pub declared: bool,
    /// The held token's expiry, while it is valid.
    pub expires_on: Option<i64>,
    /// When the held token was fetched.
    pub fetched_at: Option<i64>,
    /// When the held token is refreshed next.
    pub next_refresh: Option<i64>,
    /// Upstream requests made for it (`None` for a name known only as refused).
    pub upstream_calls: Option<u64>,
    /// Failed fetches in a row.
    pub consecutive_failures: u32,
    /// The last failure's (redacted) message and when.
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
    /// `sink` only: whether its files are in DIR.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub written: Option<bool>,
}
