//! `--serve-endpoint`: a local managed-identity endpoint speaking App Service's protocol,
//! answered from the mount's own cache, for the SDKs that cannot read a file.
//!
//! ```text
//! GET /msi/token?api-version=2019-08-01&resource=R[&client_id=..]   X-IDENTITY-HEADER: <secret>
//!   -> 200 {"access_token","expires_on":"<epoch s>","resource":R,"token_type":"Bearer"[,"client_id"]}
//! GET /msi/token?api-version=2017-09-01&resource=R[&clientid=..]    secret: <secret>
//!   -> 200 {"access_token","expires_on":"MM/dd/yyyy HH:mm:ss +00:00","resource":R,"token_type":"Bearer"}
//!   -> 401 (wrong or missing secret, in either header: nothing else is looked at)
//!   -> 400 {"statusCode":400,"message":..} (proxied, foreign Host, bad query, resource, an
//!      identity not declared; a resource the upstream refused), 403 (the upstream refused the identity),
//!      500 (no token: the upstream's redacted error), 404 / 405 (another path or method)
//! ```
//!
//! The server is [`crate::httpserver`] (hyper, its own thread, bounded connections that a
//! flood of silent ones cannot hold, head size and idle time). A request is a read like an open: one [`crate::cache::Cache::read`]
//! (the same entry, single flight with file readers, negative cache, `--timeout`, counted as
//! a use for refresh ahead), then an audit line with the client's address and, for a
//! loopback peer, the uid owning its socket (the kernel's answer, as `--serve-imds` asks)
//! and the pid and executable holding it (best effort). The secret is
//! 32 random bytes in hex, new for each mount, compared in constant time, published only
//! in `MOUNT/.env`, never logged.

mod answer;
mod caller;
#[cfg(test)]
mod endpoint_tests;
pub mod protocol;
pub mod request;

use crate::audit::Audit;
use crate::cache::Cache;
pub(crate) use crate::httpserver::tally::{Category, Counters};
use crate::httpserver::{token_listener_config, Server};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// What the endpoint is asked to serve.
#[derive(Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// `--timeout`: the cache answers within it; the endpoint waits a little longer at most.
    pub timeout: Duration,
}

/// A running endpoint; dropping it shuts the server down. Held by the front end that started
/// it; nothing in it is locked (the counters are atomics).
pub struct Endpoint {
    /// The HTTP server answering on its own thread.
    server: Server,
    /// `http://ADDR/msi/token`, as `.env` publishes it.
    url: String,
    /// The secret requests must carry; published only in `.env`, never logged.
    secret: Arc<Zeroizing<String>>,
    /// The secret, registered for scrubbing from outside text while the endpoint runs.
    _known: crate::known::Known,
    /// Requests by category, shared with the handler (which counts) and `.status`.
    counters: Arc<Counters>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl Endpoint {
    /// Binds `settings.listen` (loopback only) and serves tokens from `cache` on a thread
    /// of its own.
    pub fn start(
        settings: Settings,
        cache: Arc<Cache>,
        audit: Option<Audit>,
    ) -> io::Result<Endpoint> {
        crate::net::check_loopback(settings.listen)?;
        let secret = Arc::new(crate::hardening::random_hex(32)?);
        let counters = Arc::new(Counters::default());
        let listen = settings.listen;
        let handler = answer::EndpointHandler::new(
            settings,
            cache,
            audit,
            Arc::clone(&secret),
            Arc::clone(&counters),
        );
        // Each request carries the address bound (the port chosen for port 0).
        let server = Server::start(listen, token_listener_config("endpoint"), handler)?;
        let url = format!("http://{}{}", server.addr(), request::PATH);
        Ok(Endpoint {
            server,
            url,
            _known: crate::known::remember(&secret),
            secret,
            counters,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://127.0.0.1:PORT/msi/token`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `MOUNT/.env`: `IDENTITY_ENDPOINT=<url>` and `IDENTITY_HEADER=<secret>` (2019-08-01),
    /// then `MSI_ENDPOINT=<url>` and `MSI_SECRET=<secret>` (2017-09-01, same URL and
    /// secret). SDKs that know both pick `IDENTITY_ENDPOINT`; with `MSI_SECRET` set none
    /// takes `MSI_ENDPOINT` for Cloud Shell's.
    pub fn env_file(&self) -> Zeroizing<Vec<u8>> {
        let lines: [(&[u8], &[u8]); 4] = [
            (b"IDENTITY_ENDPOINT=", self.url.as_bytes()),
            (b"IDENTITY_HEADER=", self.secret.as_bytes()),
            (b"MSI_ENDPOINT=", self.url.as_bytes()),
            (b"MSI_SECRET=", self.secret.as_bytes()),
        ];
        // Sized once, so no copy of the secret is left in a reallocated buffer.
        let len = lines.iter().map(|(k, v)| k.len() + v.len() + 1).sum();
        let mut out = Zeroizing::new(Vec::with_capacity(len));
        for (name, value) in lines {
            out.extend_from_slice(name);
            out.extend_from_slice(value);
            out.push(b'\n');
        }
        out
    }

    /// `.status`'s `serve_endpoint`: the address, the URL and the request counters (never
    /// the secret).
    pub fn status_part(&self) -> impl Fn() -> serde_json::Value + Send + Sync + 'static {
        let (addr, url, counters) = (self.addr(), self.url.clone(), Arc::clone(&self.counters));
        move || {
            let mut v = counters.json("unauthorized");
            v["address"] = addr.to_string().into();
            v["url"] = url.clone().into();
            v
        }
    }

    /// The request counters (`--metrics` reads them).
    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    /// Closes the listener and every connection; idempotent (also on drop).
    pub fn shutdown(&self) {
        self.server.shutdown();
    }
}

/// `--serve-endpoint`'s value: `IP:PORT` on loopback (127.0.0.0/8, `[::1]`); port 0 picks
/// an ephemeral one.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|e| format!("not an IP:PORT address (127.0.0.1:PORT or [::1]:PORT): {e}"))?;
    crate::net::check_loopback(addr).map_err(|e| e.to_string())?;
    Ok(addr)
}
