//! The endpoint as an [`httpserver::Handler`]: the secret first (401 and nothing else),
//! then proxies, an absolute-form target and `Host`, path and method, the query, the
//! identity and the resource (400 without any upstream call), then a read of the cache like
//! an open, answered in App Service's shapes.

use super::request::{self, BadRequest};
use super::{Category, Counters, Settings};
use crate::audit::{Audit, HttpEvent};
use crate::cache::{Cache, Key, Lease, Query, ReadError, Use};
use crate::hardening::ct_eq;
use crate::httpserver::query::{self, QueryError};
use crate::httpserver::tally::{self, json_reply};
use crate::httpserver::{self, race, Answer, Either, Reply, Request, Stop};
use crate::token::Version;
use log::debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// How much longer than `--timeout` a request waits for the cache (which answers within
/// `--timeout` itself) before giving up with 500.
const GRACE: Duration = Duration::from_secs(2);

pub(super) struct EndpointHandler(Arc<Inner>);

/// The endpoint's shared state, read by every request's task (on the server's thread);
/// nothing in it is locked: it is fixed at start but for the counters (atomics). A read's
/// `done` runs on a fetch thread and only sends on its request's oneshot channel.
struct Inner {
    /// Listen address, the mount's identity, `--timeout`. Fixed.
    settings: Settings,
    /// The daemon's token cache: one `read` per request.
    cache: Arc<Cache>,
    /// The audit log of served requests; `None` in tests.
    audit: Option<Audit>,
    /// The secret a request must carry (`X-IDENTITY-HEADER`), compared in constant time.
    secret: Arc<Zeroizing<String>>,
    /// Requests by category, shared with `Endpoint::status_part`.
    counters: Arc<Counters>,
}

impl EndpointHandler {
    pub(super) fn new(
        settings: Settings,
        cache: Arc<Cache>,
        audit: Option<Audit>,
        secret: Arc<Zeroizing<String>>,
        counters: Arc<Counters>,
    ) -> EndpointHandler {
        EndpointHandler(Arc::new(Inner {
            settings,
            cache,
            audit,
            secret,
            counters,
        }))
    }
}

/// An answer before it is a reply: a token body, or an error with its category (what
/// `.status` counts), status and message.
enum Outcome {
    Token(Vec<u8>),
    Error {
        category: Category,
        status: u16,
        message: String,
    },
}

fn error(category: Category, status: u16, message: impl Into<String>) -> Outcome {
    Outcome::Error {
        category,
        status,
        message: message.into(),
    }
}

impl Outcome {
    /// A read of resource `sent` that got no token: category and status by the read's
    /// error.
    fn of_read(e: ReadError, sent: &str, who: &str) -> Outcome {
        match e {
            ReadError::Refused(m) => error(
                Category::Refused,
                400,
                format!("the token endpoint refused resource {sent}: {m}"),
            ),
            ReadError::Denied(m) => error(
                Category::Denied,
                403,
                format!("the token endpoint refused {who} ({sent}): {m}"),
            ),
            ReadError::Unavailable(m) => error(
                Category::UpstreamFailed,
                500,
                format!("no token for {sent}: {m}"),
            ),
        }
    }
}

impl httpserver::Handler for EndpointHandler {
    fn handle(&self, req: Request, stop: Stop) -> impl Future<Output = Answer> + Send {
        let inner = Arc::clone(&self.0);
        async move {
            inner.counters.arrived();
            let (category, status, body) = match inner.answer(&req, &stop).await {
                Outcome::Token(body) => (Category::Served, 200, body),
                Outcome::Error {
                    category,
                    status,
                    message,
                } => (category, status, app_service_error(status, &message)),
            };
            tally::answer(&inner.counters, &stop, category, status, body)
        }
    }

    fn refuse(&self, status: u16, message: &str) -> Reply {
        self.0.counters.arrived();
        // 408 and 413: the server refused the request before the endpoint saw it.
        self.0.counters.count(Category::BadRequest);
        json_reply(status, app_service_error(status, message))
    }
}

impl Inner {
    async fn answer(&self, req: &Request, stop: &Stop) -> Outcome {
        let peer = req.peer;
        let secret_ok = req
            .header("x-identity-header")
            .is_some_and(|h| ct_eq(h.as_bytes(), self.secret.as_bytes()));
        if !secret_ok {
            debug!("endpoint: 401 for {peer:?}: missing or wrong X-IDENTITY-HEADER");
            return error(Category::CallerRefused, 401, "Unauthorized");
        }
        if let Err(r) = crate::httpserver::origin::check(req) {
            return bad(r.into());
        }
        if query::path(&req.target) != request::PATH {
            return error(
                Category::NotFound,
                404,
                format!("Not found: only GET {} is served", request::PATH),
            );
        }
        if req.method != "GET" {
            return error(Category::NotFound, 405, "Method not allowed: use GET");
        }
        let params = match query::parse_query(&req.target) {
            Ok(p) => p,
            Err(e) => return bad(e.into()),
        };
        match params.get("api-version") {
            Some(v) if v == request::API_VERSION => {}
            other => return bad(BadRequest::ApiVersion(other.cloned())),
        }
        let identity = match self.cache.identities().select(&Query::from_params(&params)) {
            Ok(identity) => identity,
            Err(e) => return bad(BadRequest::NotDeclared(e)),
        };
        let Some(sent) = params.get("resource") else {
            return bad(BadRequest::NoResource);
        };
        if let Err(e) = query::check_resource_len(sent) {
            return bad(e.into());
        }
        let key = match crate::names::resolve_query(sent) {
            Ok(resource) => Key::new(identity, resource),
            Err(why) => return bad(QueryError::Resource(sent.clone(), why).into()),
        };
        match self.read(&key, stop).await {
            Ok(Lease { version: v, .. }) => {
                if let Some(audit) = &self.audit {
                    audit.served(HttpEvent {
                        resource: crate::audit::label(
                            self.cache.identities().name(identity).as_deref(),
                            &v.key.resource,
                        ),
                        peer,
                    });
                }
                Outcome::Token(self.token_body(&v, sent))
            }
            Err(e) => {
                let who = self.cache.identities().who(identity);
                Outcome::of_read(e, sent, &who)
            }
        }
    }

    /// A read like a file's lookup and open, in one call: the cache's current valid version
    /// (waiting for a fetch if need be, within `--timeout`), counted as a use (refresh
    /// ahead).
    async fn read(&self, key: &Key, stop: &Stop) -> Result<Lease, ReadError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.cache.read(
            key,
            Use::Read,
            Box::new(move |got| {
                let _ = tx.send(got);
            }),
        );
        let wait = tokio::time::timeout(self.settings.timeout + GRACE, rx);
        match race(wait, stop.stopped()).await {
            Either::Left(Ok(Ok(got))) => got,
            Either::Left(_) => Err(ReadError::Unavailable(
                "no answer from the cache in time".into(),
            )),
            Either::Right(()) => Err(ReadError::Unavailable("the mount is stopping".into())),
        }
    }

    /// `{"access_token","expires_on","resource","token_type"[,"client_id"]}`, `resource`
    /// as the request spelled it.
    fn token_body(&self, v: &Version, sent: &str) -> Vec<u8> {
        let token = String::from_utf8_lossy(v.token());
        let client_id = self
            .cache
            .identities()
            .ids(v.key.identity)
            .and_then(|ids| ids.client_id.as_ref());
        let extra = sent.len() + 128 + client_id.map_or(0, |c| c.len());
        let mut out = Zeroizing::new(Vec::with_capacity(6 * token.len() + 6 * extra));
        let buf: &mut Vec<u8> = &mut out;
        buf.extend_from_slice(b"{\"access_token\":");
        let _ = serde_json::to_writer(&mut *buf, &*token);
        buf.extend_from_slice(b",\"expires_on\":");
        let _ = serde_json::to_writer(&mut *buf, &v.expires_on.div_euclid(1000).to_string());
        buf.extend_from_slice(b",\"resource\":");
        let _ = serde_json::to_writer(&mut *buf, sent);
        buf.extend_from_slice(b",\"token_type\":\"Bearer\"");
        if let Some(id) = client_id {
            buf.extend_from_slice(b",\"client_id\":");
            let _ = serde_json::to_writer(&mut *buf, id);
        }
        buf.push(b'}');
        // Handed to hyper, which cannot wipe it: the token leaves the process here anyway.
        std::mem::take(&mut *out)
    }
}

fn bad(e: BadRequest) -> Outcome {
    error(Category::BadRequest, 400, e.to_string())
}

/// App Service's error shape: `{"statusCode":N,"message":".."}`.
fn app_service_error(status: u16, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"statusCode": status, "message": message}))
        .unwrap_or_default()
}
