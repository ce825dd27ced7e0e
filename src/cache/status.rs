//! What `.status` says of the cache: the settings, the upstream's state and one record per
//! key (held, being fetched, refused, failed), gathered under the cache's lock. Never token
//! bytes.

use super::{Cache, IdentityId, State};
use crate::policy::EpochMs;
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
    /// The mount's own identity's resources, by resource string.
    pub resources: Vec<ResourceStatus>,
    /// The mount's own identity: its selector and where it came from.
    pub identity: OwnIdentity,
    /// The declared identities (`--identity`), in order, each with its resources.
    pub identities: Vec<IdentityStatus>,
}

/// `.status`'s `identity`: which identity the top level serves, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OwnIdentity {
    /// `client-id`, `object-id`, `resource-id` (`None`: the source's own, such as the
    /// system-assigned identity).
    pub selector: Option<&'static str>,
    pub value: Option<String>,
    /// Where it came from: a flag, `AZURE_CLIENT_ID`, or none given.
    pub from: String,
}

/// One declared identity in `.status` (never a secret: its selector only).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdentityStatus {
    pub name: String,
    pub selector: Option<&'static str>,
    pub value: Option<String>,
    /// Its resources, as the top-level `resources`.
    pub resources: Vec<ResourceStatus>,
}

/// One resource in `.status`. Times are epoch seconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResourceStatus {
    /// Its file name (`None`: too long to be one).
    pub name: Option<String>,
    /// The resource string sent upstream.
    pub resource: String,
    pub state: ResourceState,
    /// Named with `--resource`.
    pub declared: bool,
    /// The held token's expiry, while it is valid.
    pub expires_on: Option<i64>,
    /// When the held token was fetched.
    pub fetched_at: Option<i64>,
    /// When the held token is refreshed next.
    pub next_refresh: Option<i64>,
    /// Upstream requests made for it (a name known only as refused: those made up to its
    /// refusal, counted on across refusals). Always a number; an `Option` for the shape.
    pub upstream_calls: Option<u64>,
    /// Failed fetches in a row.
    pub consecutive_failures: u32,
    /// The last failure's (redacted) message and when.
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
}

/// Where a resource stands, as `.status` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResourceState {
    /// A valid token, before its refresh point.
    Fresh,
    /// A valid token past its refresh point (a refresh is due, paced or backing off).
    StaleButValid,
    /// A valid token, and a fetch of its successor under way.
    Refreshing,
    /// No valid token, a fetch under way.
    Fetching,
    /// No valid token; the last fetch failed.
    Failed,
    /// The upstream refused the resource recently (negative cache).
    Refused,
    /// The upstream refused the identity recently (negative cache).
    Denied,
    /// Nothing held and nothing under way (a declared resource not read yet).
    Empty,
}

impl Cache {
    /// `.status`: per resource state and times, never token bytes.
    pub fn status(&self) -> Status {
        let now = self.clock.now();
        let secs = |ms: EpochMs| ms.div_euclid(1000);
        let guard = self.state.lock();
        let State { entries, refusals } = &*guard;
        let mut resources: Vec<(IdentityId, ResourceStatus)> = entries
            .iter()
            .map(|(k, e)| {
                (k.identity, {
                    let held = e.valid(now);
                    let refusal = refusals.active(k, now);
                    let last_error = e
                        .failures
                        .last_error
                        .as_ref()
                        .map(|(m, at)| (m.clone(), *at))
                        .or_else(|| refusal.map(|x| (x.message().to_string(), x.at)));
                    ResourceStatus {
                        name: crate::names::file_name(&k.resource),
                        resource: k.resource.to_string(),
                        state: e.state(now, refusal),
                        declared: e.declared,
                        expires_on: held.map(|v| secs(v.expires_on)),
                        fetched_at: e.fetched_at.map(secs),
                        next_refresh: held
                            .map(|v| secs(v.schedule.refresh_at.max(e.failures.next_attempt_at))),
                        upstream_calls: Some(e.upstream_calls),
                        consecutive_failures: e.failures.consecutive,
                        last_error_at: last_error.as_ref().map(|x| secs(x.1)),
                        last_error: last_error.map(|x| x.0),
                    }
                })
            })
            .collect();
        resources.extend(
            refusals
                .by_key
                .iter()
                .filter(|(k, x)| now < x.until && !entries.contains_key(*k))
                .map(|(k, x)| {
                    (
                        k.identity,
                        ResourceStatus {
                            name: crate::names::file_name(&k.resource),
                            resource: k.resource.to_string(),
                            state: x.state(),
                            declared: false,
                            expires_on: None,
                            fetched_at: None,
                            next_refresh: None,
                            upstream_calls: Some(x.upstream_calls),
                            consecutive_failures: 1,
                            last_error: Some(x.message().to_string()),
                            last_error_at: Some(secs(x.at)),
                        },
                    )
                }),
        );
        drop(guard);
        resources.sort_by(|a, b| (a.0, &a.1.resource).cmp(&(b.0, &b.1.resource)));
        let mut of = |id: IdentityId| -> Vec<ResourceStatus> {
            let (mine, rest) = std::mem::take(&mut resources)
                .into_iter()
                .partition(|(i, _)| *i == id);
            resources = rest;
            mine.into_iter().map(|(_, r)| r).collect()
        };
        let mut described = self.identities.describe().into_iter();
        let own = described.next();
        let own_resources = of(IdentityId::DEFAULT);
        let identities = described
            .map(|d| IdentityStatus {
                name: d.name.unwrap_or_default(),
                selector: d.selector.as_ref().map(|s| s.kind),
                value: d.selector.map(|s| s.value),
                resources: of(d.id),
            })
            .collect();
        let own_selector = own.and_then(|d| d.selector);
        Status {
            endpoint: self.source().endpoint(),
            source: self.source().kind().name(),
            refresh_margin: self.policy.refresh_margin_ms / 1000,
            negative_ttl: self.policy.negative_ttl_ms / 1000,
            timeout: self.policy.timeout.as_secs(),
            max_upstream_rate: self.policy.max_upstream_rate,
            upstream_down: self.upstream.known_down(),
            upstream_held_back: self.upstream.held_back(),
            fetches_queued: self.pool.queued(),
            now: secs(now),
            resources: own_resources,
            identity: OwnIdentity {
                selector: own_selector.as_ref().map(|s| s.kind),
                value: own_selector.map(|s| s.value),
                from: self.identities.origin().to_string(),
            },
            identities,
        }
    }
}
