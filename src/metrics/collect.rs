//! The metrics read at scrape time: what the cache holds (per identity and resource:
//! expiry, next refresh, validity, failures in a row; the negative cache, the queue, the
//! upstream's state) and the upstream requests by identity, result and status; and the
//! token listeners' answers and refusals. Each metric family is encoded once per scrape.

use crate::cache::{Cache, IdentityId, KeyGauge, RequestCounts};
use crate::httpserver::tally::Counters;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;
use std::fmt;
use std::sync::Arc;

/// The cache's state, read at each scrape.
pub struct CacheCollector {
    cache: Arc<Cache>,
}

impl fmt::Debug for CacheCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CacheCollector")
    }
}

impl CacheCollector {
    pub fn new(cache: Arc<Cache>) -> CacheCollector {
        CacheCollector { cache }
    }

    /// The `identity` label: empty for the daemon's own identity (its files are at the top
    /// of the mount), else the identity's name; `None` for one removed meanwhile.
    fn identity(&self, id: IdentityId) -> Option<String> {
        if id == IdentityId::DEFAULT {
            return Some(String::new());
        }
        self.cache.identities().name(id).map(|n| n.into_owned())
    }
}

/// A gauge family, one sample per key that has a value.
fn per_key(
    encoder: &mut DescriptorEncoder,
    (name, help, unit): (&str, &str, Option<&Unit>),
    keys: &[(String, &KeyGauge)],
    value: impl Fn(&KeyGauge) -> Option<i64>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (identity, k) in keys {
        if let Some(v) = value(k) {
            let labels = [
                ("identity", identity.as_str()),
                ("resource", k.resource.as_str()),
            ];
            ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// A gauge without labels.
fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    ConstGauge::new(v).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let g = self.cache.gauges();
        let keys: Vec<(String, &KeyGauge)> = g
            .keys
            .iter()
            .filter_map(|k| Some((self.identity(k.identity)?, k)))
            .collect();
        let seconds = Some(&Unit::Seconds);
        per_key(
            &mut encoder,
            (
                "token_expiry_timestamp",
                "When the held token expires (Unix time); alert on cstokenfs_token_expiry_timestamp_seconds - time() < 600",
                seconds,
            ),
            &keys,
            |k| k.expires_on,
        )?;
        per_key(
            &mut encoder,
            (
                "token_next_refresh_timestamp",
                "When the held token is refreshed next (Unix time; a backoff moves it later)",
                seconds,
            ),
            &keys,
            |k| k.next_refresh,
        )?;
        per_key(
            &mut encoder,
            (
                "token_valid",
                "Whether a valid token is held (1) or not (0), per declared or held resource",
                None,
            ),
            &keys,
            |k| Some(i64::from(k.expires_on.is_some())),
        )?;
        per_key(
            &mut encoder,
            (
                "token_consecutive_failures",
                "Failed fetches in a row (0 after a success)",
                None,
            ),
            &keys,
            |k| Some(i64::from(k.consecutive_failures)),
        )?;
        gauge(
            &mut encoder,
            "negative_cache_entries",
            "Names the upstream refused recently, answered without asking again",
            g.refusals as i64,
        )?;
        gauge(
            &mut encoder,
            "fetches_queued",
            "Fetches waiting for a worker",
            g.fetches_queued as i64,
        )?;
        gauge(
            &mut encoder,
            "upstream_down",
            "Whether the upstream failed at the connection level recently (1: one attempt per fetch)",
            i64::from(g.upstream_down),
        )?;
        ConstCounter::new(g.upstream_held_back).encode(encoder.encode_descriptor(
            "upstream_held_back",
            "Upstream requests that waited for the --max-upstream-rate limit",
            None,
            MetricType::Counter,
        )?)?;
        let meters = self.cache.meters();
        let mut reads = encoder.encode_descriptor(
            "reads",
            "Tokens served, by front end (file opens, no-open lookups, endpoint and IMDS requests, sink writes, CSI publishes)",
            None,
            MetricType::Counter,
        )?;
        for (front_end, n) in meters.reads() {
            let labels = [("front_end", front_end.as_str())];
            ConstCounter::new(n).encode(reads.encode_family(&labels)?)?;
        }
        self.by_outcome(
            &mut encoder,
            "upstream_requests",
            "Upstream requests, by identity, result (ok, refused, throttled, error, timeout) and HTTP status",
            meters.requests(),
        )?;
        self.by_outcome(
            &mut encoder,
            "registry_exchanges",
            "Container registry exchanges (.acr/), by identity, result and HTTP status",
            meters.exchanges(),
        )
    }
}

impl CacheCollector {
    /// A counter family by identity, result and status.
    fn by_outcome(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        counts: Vec<(IdentityId, RequestCounts)>,
    ) -> fmt::Result {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (id, counts) in counts {
            let Some(identity) = self.identity(id) else {
                continue;
            };
            for ((outcome, status), n) in counts {
                let status = status.map_or_else(|| "none".to_string(), |s| s.to_string());
                let labels = [
                    ("identity", identity.as_str()),
                    ("result", outcome.as_str()),
                    ("status", status.as_str()),
                ];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The token listeners' counters (`--serve-endpoint`, `--serve-imds`), by listener.
pub struct Listeners(pub Vec<(&'static str, Arc<Counters>)>);

impl fmt::Debug for Listeners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Listeners")
    }
}

impl Collector for Listeners {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let mut responses = encoder.encode_descriptor(
            "listener_responses",
            "Answers of the token listeners (endpoint, imds), by HTTP status",
            None,
            MetricType::Counter,
        )?;
        for (listener, counters) in &self.0 {
            for (status, n) in counters.statuses() {
                let status = status.to_string();
                let labels = [("listener", *listener), ("status", status.as_str())];
                ConstCounter::new(n).encode(responses.encode_family(&labels)?)?;
            }
        }
        let mut refusals = encoder.encode_descriptor(
            "listener_refusals",
            "Callers the token listeners refused, by cause (secret, host, forwarded, target, uid)",
            None,
            MetricType::Counter,
        )?;
        for (listener, counters) in &self.0 {
            for (cause, n) in counters.causes() {
                let labels = [("listener", *listener), ("cause", cause.as_str())];
                ConstCounter::new(n).encode(refusals.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
