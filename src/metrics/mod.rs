//! `--metrics ADDR` (`mount`, `sink`, `csi`): an HTTP listener for operators.
//!
//! ```text
//! GET /metrics   Prometheus text 0.0.4, or OpenMetrics 1.0.0 when Accept names
//!                application/openmetrics-text (the body then ends in "# EOF")
//! GET /healthz   200 while the daemon runs
//! GET /readyz    200 once the front end serves (mounted; the sink's files written; the
//!                CSI socket serving) and every declared resource holds a valid token or
//!                its latest fetch succeeded; else 503 and why
//! ```
//!
//! The metrics hold no secret (never a token, a secret, an assertion or a claim of one:
//! identities are named by their `--identity` name, resources by the string sent
//! upstream), so ADDR may be any address: in Kubernetes the scraper is another pod. The
//! server is [`crate::httpserver`]'s (hyper), on a port and a thread of its own: a slow
//! scraper holds only its own connection, and a scrape takes the cache's lock as long as
//! `.status` does, never across a fetch.
//!
//! What is counted where: the cache counts reads, waits, fetches and upstream requests as
//! they happen (`cache::Meters`); a scrape reads what is held (`Cache::gauges`), the token
//! listeners' counters (`httpserver::tally`), the front end's own parts (the CSI driver's
//! operations and volumes) and `/proc/self` (`process`). The registry is built once, when
//! the listener starts; nothing here is locked but what those parts lock themselves.

mod collect;
#[cfg(test)]
mod metrics_tests;
mod process;

use crate::cache::Cache;
use crate::httpserver::tally::Counters;
use crate::httpserver::{query, Answer, Config, Handler, Reply, Request, Server, Stop};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The OpenMetrics content type a scraper asks for (`Accept`) and gets.
const OPENMETRICS: &str = "application/openmetrics-text";
const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a front end adds to the cache's metrics.
#[derive(Default)]
pub struct Parts {
    /// The token listeners running beside it (`endpoint`, `imds`) and their counters.
    pub listeners: Vec<(&'static str, Arc<Counters>)>,
    /// Its own collectors (the CSI driver's operations and volumes), each encoding metric
    /// families no other part encodes.
    pub own: Vec<Box<dyn Collector>>,
}

/// A running metrics listener; dropping it shuts it down.
pub struct Metrics {
    server: Server,
    /// Whether the front end serves (`/readyz`): set once by [`Metrics::serving`].
    serving: Arc<AtomicBool>,
}

impl Metrics {
    /// Binds `listen` (any address; port 0 picks one) and serves the metrics of `cache`
    /// and `parts` for `front_end` (`mount`, `sink`, `csi`), on a thread of its own.
    /// `/readyz` answers 503 until [`Metrics::serving`].
    pub fn start(
        listen: SocketAddr,
        front_end: &'static str,
        cache: Arc<Cache>,
        parts: Parts,
    ) -> io::Result<Metrics> {
        let serving = Arc::new(AtomicBool::new(false));
        let handler = MetricsHandler {
            registry: registry(front_end, cache.clone(), parts),
            cache,
            serving: serving.clone(),
            front_end,
        };
        let server = Server::start_anywhere(listen, config(), handler)?;
        log::info!(
            "metrics at http://{}/metrics (/healthz, /readyz)",
            server.addr()
        );
        Ok(Metrics { server, serving })
    }

    /// The front end serves now: mounted, the sink's first files written, the CSI socket
    /// serving.
    pub fn serving(&self) {
        self.serving.store(true, Ordering::SeqCst);
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `.status`'s `metrics`: the address.
    pub fn status_part(&self) -> impl Fn() -> serde_json::Value + Send + Sync + 'static {
        let addr = self.addr().to_string();
        move || serde_json::json!({ "address": addr })
    }

    /// Closes the listener and its connections; idempotent (also on drop).
    pub fn shutdown(&self) {
        self.server.shutdown();
    }
}

/// The metrics listener's limits: a few scrapers, small requests.
fn config() -> Config {
    Config {
        max_connections: 32,
        first_head_timeout: Duration::from_secs(10),
        header_read_timeout: Duration::from_secs(60),
        body_timeout: Duration::from_secs(5),
        max_head: 8 * 1024,
        max_body: 1024,
        write_stall: Duration::from_secs(30),
        thread_name: "metrics".into(),
        tls: None,
    }
}

/// Every metric: `process_*` at the top, the rest under `cstokenfs_`.
fn registry(front_end: &'static str, cache: Arc<Cache>, parts: Parts) -> Registry {
    let mut root = Registry::default();
    root.register_collector(Box::new(process::Process));
    let ours = root.sub_registry_with_prefix("cstokenfs");
    ours.register(
        "build",
        "The running cstokenfs: its version and front end",
        Info::new(vec![
            ("version", env!("CARGO_PKG_VERSION")),
            ("front_end", front_end),
        ]),
    );
    let m = cache.meters();
    ours.register_with_unit(
        "read_wait",
        "How long readers that had to wait for a fetch waited",
        Unit::Seconds,
        m.read_wait.clone(),
    );
    ours.register(
        "single_flight_joins",
        "Readers that joined a fetch already under way instead of starting one",
        m.single_flight_joins.clone(),
    );
    ours.register(
        "negative_cache_answers",
        "Reads answered from the negative cache (a recent refusal)",
        m.negative_answers.clone(),
    );
    ours.register(
        "evictions",
        "Tokens dropped to stay within --max-resources",
        m.evictions.clone(),
    );
    ours.register_with_unit(
        "upstream_request_duration",
        "How long each upstream request took",
        Unit::Seconds,
        m.upstream_latency.clone(),
    );
    ours.register(
        "upstream_retries",
        "Upstream requests that retried a failed one within the same fetch",
        m.upstream_retries.clone(),
    );
    ours.register_collector(Box::new(collect::CacheCollector::new(cache)));
    if !parts.listeners.is_empty() {
        ours.register_collector(Box::new(collect::Listeners(parts.listeners)));
    }
    for own in parts.own {
        ours.register_collector(own);
    }
    root
}

/// Answers `/metrics`, `/healthz` and `/readyz`.
struct MetricsHandler {
    registry: Registry,
    cache: Arc<Cache>,
    serving: Arc<AtomicBool>,
    /// `mount`, `sink` or `csi`: names what `/readyz` waits for.
    front_end: &'static str,
}

impl Handler for MetricsHandler {
    async fn handle(&self, req: Request, _stop: Stop) -> Answer {
        Answer::Reply(self.answer(&req))
    }
}

impl MetricsHandler {
    fn answer(&self, req: &Request) -> Reply {
        let path = query::path(&req.target);
        if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
            return plain(404, "not found: GET /metrics, /healthz or /readyz\n".into());
        }
        if req.method != "GET" {
            let mut reply = plain(405, "method not allowed: use GET\n".into());
            reply.headers.push(("Allow".into(), "GET".into()));
            return reply;
        }
        match path {
            "/metrics" => self.metrics(req),
            "/healthz" => plain(200, "ok\n".into()),
            _ => match self.unready() {
                None => plain(200, "ready\n".into()),
                Some(why) => plain(503, format!("not ready: {why}\n")),
            },
        }
    }

    /// Why `/readyz` says no, if it does.
    fn unready(&self) -> Option<String> {
        if !self.serving.load(Ordering::SeqCst) {
            return Some(match self.front_end {
                "mount" => "not mounted yet".into(),
                "sink" => "the first files are not written yet".into(),
                "csi" => "the CSI socket is not serving yet".into(),
                other => format!("{other} is not serving yet"),
            });
        }
        self.cache.unready()
    }

    fn metrics(&self, req: &Request) -> Reply {
        let openmetrics = req
            .all("accept")
            .any(|a| a.to_ascii_lowercase().contains(OPENMETRICS));
        let mut body = String::new();
        let (encoded, content_type) = if openmetrics {
            (
                text::encode(&mut body, &self.registry),
                OPENMETRICS_CONTENT_TYPE,
            )
        } else {
            (
                prometheus_text::encode(&mut body, &self.registry),
                prometheus_text::CONTENT_TYPE,
            )
        };
        if encoded.is_err() {
            return plain(500, "the metrics could not be encoded\n".into());
        }
        Reply {
            status: 200,
            headers: vec![
                ("Content-Type".into(), content_type.into()),
                ("Cache-Control".into(), "no-store".into()),
            ],
            body: body.into_bytes(),
        }
    }
}

fn plain(status: u16, body: String) -> Reply {
    Reply {
        status,
        headers: vec![
            ("Content-Type".into(), "text/plain; charset=utf-8".into()),
            ("Cache-Control".into(), "no-store".into()),
        ],
        body: body.into_bytes(),
    }
}

/// `--metrics`'s value: `IP:PORT` (any address; port 0 picks one).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|e| {
        format!("not an IP:PORT address (such as 127.0.0.1:9464 or 0.0.0.0:9464): {e}")
    })
}
