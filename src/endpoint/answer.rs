//! The endpoint as an [`httpserver::Handler`]: the secret first (401 and nothing else; in
//! either version's header, `protocol`), then proxies, an absolute-form target and `Host`,
//! path and method, the api-version, the query, the identity and the resource (400 without any upstream call), then a read of the cache like
//! an open, answered in App Service's shapes, and an audit line naming who holds the
//! client's socket (`caller`).

use super::caller;
use super::protocol::Protocol;
use super::request::{self, BadRequest};
use super::{Category, Counters, Settings};
use crate::audit::{Audit, HttpEvent};
use crate::cache::{Cache, FrontEnd, Key, Lease, ReadError};
use crate::hardening::ct_eq;
use crate::httpserver::query::{self, QueryError};
use crate::httpserver::tally::{self, json_reply, Cause};
use crate::httpserver::{self, Answer, Reply, Request, Stop};
use crate::token::Version;
use log::debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// How much longer than `--timeout` a request waits for the cache (which answers within
/// `--timeout` itself) before giving up with 500.
const GRACE: Duration = Duration::from_secs(2);

/// The most a served request waits for the audit's look-up of who holds the client's
/// socket (then the line says `?`); it takes about a millisecond, less on a kept-alive
/// connection.
const LOOKUP_LIMIT: Duration = Duration::from_millis(250);

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
    /// The last client socket the audit looked up, and who held it.
    last: Arc<caller::Last>,
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
            last: Arc::default(),
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
        // 408 and 413: the server refused the request before the endpoint saw it.
        self.0.counters.refused_by_server(status);
        json_reply(status, app_service_error(status, message))
    }
}

impl Inner {
    async fn answer(&self, req: &Request, stop: &Stop) -> Outcome {
        let peer = req.peer;
        if !self.secret_ok(req) {
            debug!("endpoint: 401 for {peer:?}: missing or wrong X-IDENTITY-HEADER or secret");
            self.counters.refused(Cause::Secret);
            return error(Category::CallerRefused, 401, "Unauthorized");
        }
        if let Err(r) = crate::httpserver::origin::check(req) {
            self.counters.refused(r.into());
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
        let protocol = match params.get("api-version").map(|v| Protocol::of(v)) {
            Some(Some(p)) => p,
            _ => return bad(BadRequest::ApiVersion(params.get("api-version").cloned())),
        };
        // The secret checked above came in the other version's header.
        if req.header(protocol.secret_header()).is_none() {
            return bad(BadRequest::SecretHeader(protocol));
        }
        let asked = match protocol.identity(&params) {
            Ok(asked) => asked,
            Err(param) => return bad(BadRequest::NotIn2017(param)),
        };
        let identity = match self.cache.identities().select(&asked) {
            Ok(identity) => identity,
            Err(mut e) => {
                if protocol == Protocol::V2017 {
                    e.param = "clientid";
                }
                return bad(BadRequest::NotDeclared(e));
            }
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
        // Who holds the client's socket, for the audit line: asked while the cache answers.
        let caller = match &self.audit {
            Some(_) => caller::start(peer, req.local, &self.last),
            None => None,
        };
        match self.read(&key, stop).await {
            Ok(Lease { version: v, .. }) => {
                if let Some(audit) = &self.audit {
                    let who = caller::finish(caller, LOOKUP_LIMIT, stop).await;
                    audit.served(HttpEvent {
                        resource: crate::audit::label(
                            self.cache.identities().name(identity).as_deref(),
                            &v.key.resource,
                        ),
                        peer,
                        uid: who.uid,
                        process: who.process,
                    });
                }
                Outcome::Token(self.token_body(&v, sent, protocol))
            }
            Err(e) => {
                if let Some(task) = caller {
                    task.abort();
                }
                let who = self.cache.identities().who(identity);
                Outcome::of_read(e, sent, &who)
            }
        }
    }

    /// A read like a file's lookup and open, in one call: the cache's current valid version
    /// (waiting for a fetch if need be, within `--timeout`), counted as a use (refresh
    /// ahead).
    async fn read(&self, key: &Key, stop: &Stop) -> Result<Lease, ReadError> {
        let limit = self.settings.timeout + GRACE;
        httpserver::read_token(&self.cache, key, FrontEnd::Endpoint, limit, stop).await
    }

    /// Whether the request carries the secret: at least one of `X-IDENTITY-HEADER`
    /// (2019-08-01) and `secret` (2017-09-01), and each one present equal to it (compared
    /// in constant time).
    fn secret_ok(&self, req: &Request) -> bool {
        let given = [Protocol::V2019, Protocol::V2017]
            .map(|p| req.header(p.secret_header()))
            .map(|h| h.map(|h| ct_eq(h.as_bytes(), self.secret.as_bytes())));
        given.iter().any(Option::is_some) && given.iter().all(|g| g.is_none_or(|ok| ok))
    }

    /// `{"access_token","expires_on","resource","token_type"[,"client_id"]}`, `resource`
    /// as the request spelled it, `expires_on` and `client_id` as `protocol` has them.
    fn token_body(&self, v: &Version, sent: &str, protocol: Protocol) -> Vec<u8> {
        let token = String::from_utf8_lossy(v.token());
        let client_id = self
            .cache
            .identities()
            .ids(v.key.identity)
            .and_then(|ids| ids.client_id.as_ref())
            .filter(|_| protocol.answers_client_id());
        let extra = sent.len() + 128 + client_id.map_or(0, |c| c.len());
        let mut out = Zeroizing::new(Vec::with_capacity(6 * token.len() + 6 * extra));
        let buf: &mut Vec<u8> = &mut out;
        buf.extend_from_slice(b"{\"access_token\":");
        let _ = serde_json::to_writer(&mut *buf, &*token);
        buf.extend_from_slice(b",\"expires_on\":");
        let _ = serde_json::to_writer(&mut *buf, &protocol.expires_on(v.expires_on));
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
