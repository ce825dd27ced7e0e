//! The IMDS listener as an [`httpserver::Handler`]: the caller's uid first (403 and nothing
//! else), then proxies, the target and `Host`, path and method, `Metadata: true`, the query,
//! the identity and the resource (400 in IMDS's shape, no upstream call), then a read of
//! the cache like an open, answered as IMDS answers.

use super::authz::{self, Reach};
use super::peer::{self, Owner};
use super::{Category, Counters, Settings, PATH};
use crate::access::Access;
use crate::audit::{Audit, ImdsEvent, RefusedEvent};
use crate::cache::{Cache, FrontEnd, IdentityId, Key, Lease, Query, ReadError, IMDS_PARAMS};
use crate::httpserver::query::{self, QueryError};
use crate::httpserver::tally::{self, json_reply, Cause};
use crate::httpserver::{self, race, Answer, Either, Reply, Request, Stop};
use crate::token::Version;
use log::{debug, warn};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// How much longer than `--timeout` a request waits for the cache before giving up (500).
const GRACE: Duration = Duration::from_secs(2);

/// The API versions IMDS's identity endpoint takes (the SDKs send 2018-02-01).
pub(super) const API_VERSIONS: [&str; 3] = ["2018-02-01", "2019-08-01", "2019-11-01"];

/// A failed sock_diag look-up has been reported (once per process: the cause, a sandbox
/// without netlink, is the same for every request).
static LOOKUP_FAILED: AtomicBool = AtomicBool::new(false);

pub(super) struct ImdsHandler(Arc<Inner>);

/// Shared by every request's task; fixed at start but for the counters (atomics).
struct Inner {
    settings: Settings,
    cache: Arc<Cache>,
    /// `None` in tests.
    audit: Option<Audit>,
    counters: Arc<Counters>,
}

impl ImdsHandler {
    pub(super) fn new(
        settings: Settings,
        cache: Arc<Cache>,
        audit: Option<Audit>,
        counters: Arc<Counters>,
    ) -> ImdsHandler {
        ImdsHandler(Arc::new(Inner {
            settings,
            cache,
            audit,
            counters,
        }))
    }
}

/// An answer before it is a reply.
enum Outcome {
    Token(Vec<u8>),
    Error {
        category: Category,
        status: u16,
        /// IMDS's `error` code.
        code: &'static str,
        message: String,
    },
}

fn error(
    category: Category,
    status: u16,
    code: &'static str,
    message: impl Into<String>,
) -> Outcome {
    Outcome::Error {
        category,
        status,
        code,
        message: message.into(),
    }
}

fn invalid(message: impl Into<String>) -> Outcome {
    error(Category::BadRequest, 400, "invalid_request", message)
}

impl httpserver::Handler for ImdsHandler {
    fn handle(&self, req: Request, stop: Stop) -> impl Future<Output = Answer> + Send {
        let inner = Arc::clone(&self.0);
        async move {
            inner.counters.arrived();
            let (category, status, body) = match inner.answer(&req, &stop).await {
                Outcome::Token(body) => (Category::Served, 200, body),
                Outcome::Error {
                    category,
                    status,
                    code,
                    message,
                } => (category, status, imds_error(code, &message)),
            };
            tally::answer(&inner.counters, &stop, category, status, body)
        }
    }

    fn refuse(&self, status: u16, message: &str) -> Reply {
        self.0.counters.refused_by_server(status);
        json_reply(status, imds_error("invalid_request", message))
    }
}

/// What the kernel said about the caller's socket, and the groups when they matter.
struct Caller {
    owner: Option<Owner>,
    groups: Vec<u32>,
}

impl Inner {
    async fn answer(&self, req: &Request, stop: &Stop) -> Outcome {
        let uid = match self.authorize(req, stop).await {
            Ok(uid) => uid,
            Err(outcome) => return outcome,
        };
        if let Err(r) = crate::httpserver::origin::check(req) {
            self.counters.refused(r.into());
            return invalid(r.to_string());
        }
        if query::path(&req.target) != PATH {
            return error(
                Category::NotFound,
                404,
                "not_found",
                format!("Not found: only GET {PATH} is served"),
            );
        }
        if req.method != "GET" {
            return error(
                Category::NotFound,
                405,
                "method_not_allowed",
                "Method not allowed: use GET",
            );
        }
        if !req
            .header("metadata")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        {
            return invalid("Required metadata header not specified");
        }
        let params = match query::parse_query(&req.target) {
            Ok(p) => p,
            Err(e) => return invalid(e.to_string()),
        };
        match params.get("api-version") {
            Some(v) if API_VERSIONS.contains(&v.as_str()) => {}
            Some(v) => {
                return invalid(format!(
                    "api-version {v:?} is not supported (use {})",
                    API_VERSIONS[0]
                ))
            }
            None => return invalid("Required query variable 'api-version' is missing"),
        }
        let identity = match self.select(&params) {
            Ok(id) => id,
            Err(outcome) => return outcome,
        };
        let Some(sent) = params.get("resource").filter(|r| !r.is_empty()) else {
            return invalid("Required audience variable not specified");
        };
        if let Err(e) = query::check_resource_len(sent) {
            return error(Category::BadRequest, 400, "invalid_resource", e.to_string());
        }
        let key = match crate::names::resolve_query(sent) {
            Ok(resource) => Key::new(identity, resource),
            Err(why) => {
                return error(
                    Category::BadRequest,
                    400,
                    "invalid_resource",
                    QueryError::Resource(sent.clone(), why).to_string(),
                )
            }
        };
        match self.read(&key, stop).await {
            Ok(Lease { version: v, .. }) => {
                if let Some(audit) = &self.audit {
                    audit.served_imds(ImdsEvent {
                        resource: crate::audit::label(
                            self.cache.identities().name(v.key.identity).as_deref(),
                            &v.key.resource,
                        ),
                        peer: req.peer,
                        uid,
                    });
                }
                let identities = self.cache.identities();
                let client_id = identities
                    .ids(v.key.identity)
                    .and_then(|ids| ids.client_id.as_deref());
                Outcome::Token(token_body(&v, sent, client_id))
            }
            Err(e) => {
                let who = self.cache.identities().who(key.identity);
                of_read(e, sent, &who)
            }
        }
    }

    /// The uid of the caller's socket, if it may ask; else the 403 (and its audit line).
    async fn authorize(&self, req: &Request, stop: &Stop) -> Result<u32, Outcome> {
        let forbidden = |uid: Option<u32>| {
            self.counters.refused(Cause::Uid);
            let who = uid.map_or_else(|| "this caller".to_string(), |u| format!("uid {u}"));
            error(
                Category::CallerRefused,
                403,
                "forbidden",
                format!("{who} may not read this mount's tokens"),
            )
        };
        let refuse = |peer: Option<SocketAddr>, uid: Option<u32>, inode: u32| {
            if let Some(audit) = &self.audit {
                audit.refused_imds(RefusedEvent { peer, uid, inode });
            }
            Err(forbidden(uid))
        };
        let Some(peer) = req.peer else {
            return refuse(None, None, 0);
        };
        let caller = match self.look_up(peer, req.local, stop).await {
            Some(c) => c,
            None => return refuse(Some(peer), None, 0),
        };
        let Some(owner) = caller.owner else {
            debug!("imds: no socket found for {peer}; refused");
            return refuse(Some(peer), None, 0);
        };
        if authz::may_ask(
            owner.uid,
            &caller.groups,
            &self.settings.access,
            self.settings.reach,
        ) {
            return Ok(owner.uid);
        }
        refuse(Some(peer), Some(owner.uid), owner.inode)
    }

    /// The caller's socket and, when the decision depends on them, its uid's groups: on a
    /// blocking thread (netlink, NSS), never the server's.
    async fn look_up(&self, peer: SocketAddr, local: SocketAddr, stop: &Stop) -> Option<Caller> {
        let (access, reach): (Access, Reach) = (self.settings.access, self.settings.reach);
        let task = tokio::task::spawn_blocking(move || {
            let owner = match peer::owner(peer, local) {
                Ok(o) => o,
                Err(e) => {
                    if !LOOKUP_FAILED.swap(true, Ordering::Relaxed) {
                        warn!(
                            "imds: cannot ask the kernel who owns a connecting socket \
                             (sock_diag: {e}): such requests are refused (403); allow \
                             AF_NETLINK sockets (systemd: RestrictAddressFamilies=)"
                        );
                    }
                    debug!("imds: sock_diag for {peer}: {e}");
                    None
                }
            };
            let groups = match owner {
                Some(o) if authz::needs_groups(o.uid, &access, reach) => peer::groups_of(o.uid),
                _ => Vec::new(),
            };
            Caller { owner, groups }
        });
        // Bounded: a name service that hangs (LDAP, sssd) must not hold a request longer
        // than a read may take; the caller is then refused, and a look-up still queued for
        // the blocking pool is cancelled (one already running ends on its own).
        let mut task = task;
        let bounded = tokio::time::timeout(self.settings.timeout, &mut task);
        let caller = match race(bounded, stop.stopped()).await {
            Either::Left(Ok(Ok(c))) => Some(c),
            Either::Left(Err(_)) => {
                debug!("imds: who owns {peer}'s socket took over --timeout; refused");
                None
            }
            _ => None,
        };
        if caller.is_none() {
            task.abort();
        }
        caller
    }

    /// The identity a request names: the one function that maps `client_id`, `object_id`
    /// and `msi_res_id` to an identity of this mount; any other is "Identity not found".
    fn select(&self, params: &BTreeMap<String, String>) -> Result<IdentityId, Outcome> {
        let named = IMDS_PARAMS
            .iter()
            .filter(|p| params.get(**p).is_some_and(|v| !v.is_empty()))
            .count();
        if named > 1 {
            return Err(invalid(
                "Only one of client_id, object_id and msi_res_id may be given",
            ));
        }
        match self.cache.identities().select(&Query::imds(params)) {
            Ok(identity) => Ok(identity),
            Err(_) => Err(invalid("Identity not found")),
        }
    }

    /// A read like a file's lookup and open, within `--timeout` (and a little more).
    async fn read(&self, key: &Key, stop: &Stop) -> Result<Lease, ReadError> {
        let limit = self.settings.timeout + GRACE;
        httpserver::read_token(&self.cache, key, FrontEnd::Imds, limit, stop).await
    }
}

/// A read of resource `sent` that got no token, in IMDS's shapes.
fn of_read(e: ReadError, sent: &str, who: &str) -> Outcome {
    match e {
        ReadError::Refused(m) => error(
            Category::Refused,
            400,
            "invalid_resource",
            format!("the token endpoint refused resource {sent}: {m}"),
        ),
        ReadError::Denied(m) => error(
            Category::Denied,
            400,
            "invalid_request",
            format!("the token endpoint refused {who} ({sent}): {m}"),
        ),
        ReadError::Unavailable(m) => error(
            Category::UpstreamFailed,
            500,
            "unknown_error",
            format!("no token for {sent}: {m}"),
        ),
    }
}

/// IMDS's answer, its fields in IMDS's order and every number a string: `expires_in` and
/// `ext_expires_in` count from now, `not_before` is the token's `nbf` (else when it was
/// fetched), `client_id` the mount's (else the token's `appid`/`azp`; left out if neither).
fn token_body(v: &Version, sent: &str, client_id: Option<&str>) -> Vec<u8> {
    let token = String::from_utf8_lossy(v.token());
    let claims = crate::claims::payload(&token).unwrap_or_default();
    let claim_str = |k: &str| claims.get(k).and_then(|c| c.as_str()).map(str::to_owned);
    let client_id = client_id
        .map(str::to_owned)
        .or_else(|| claim_str("appid"))
        .or_else(|| claim_str("azp"));
    let expires_on = v.expires_on.div_euclid(1000);
    let now = crate::policy::now_ms().div_euclid(1000);
    let expires_in = (expires_on - now).max(0);
    let not_before = claims
        .get("nbf")
        .and_then(|n| n.as_i64())
        .unwrap_or_else(|| v.fetched_at.div_euclid(1000));
    let mut out = Zeroizing::new(Vec::with_capacity(6 * token.len() + 6 * sent.len() + 512));
    let buf: &mut Vec<u8> = &mut out;
    buf.extend_from_slice(b"{\"access_token\":");
    let _ = serde_json::to_writer(&mut *buf, &*token);
    if let Some(id) = &client_id {
        buf.extend_from_slice(b",\"client_id\":");
        let _ = serde_json::to_writer(&mut *buf, id);
    }
    for (name, n) in [
        ("expires_in", expires_in),
        ("expires_on", expires_on),
        ("ext_expires_in", expires_in),
        ("not_before", not_before),
    ] {
        buf.extend_from_slice(format!(",\"{name}\":\"{n}\"").as_bytes());
    }
    buf.extend_from_slice(b",\"resource\":");
    let _ = serde_json::to_writer(&mut *buf, sent);
    buf.extend_from_slice(b",\"token_type\":\"Bearer\"}");
    // Handed to hyper, which cannot wipe it: the token leaves the process here anyway.
    std::mem::take(&mut *out)
}

/// IMDS's flat error shape: `{"error":CODE,"error_description":".."}`.
fn imds_error(code: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"error": code, "error_description": message}))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_flat() {
        let v: serde_json::Value =
            serde_json::from_slice(&imds_error("invalid_request", "Identity not found")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error":"invalid_request","error_description":"Identity not found"})
        );
    }
}
