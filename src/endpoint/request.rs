//! What a request to the endpoint says, checked without any upstream call: its query (the
//! identity it asks for is chosen by `cache::Identities::select`, the resource it names is
//! resolved by `names::resolve_query`, the rule it shares with file names); its `Host`,
//! target and forwarding headers are checked by `httpserver::origin`, shared with IMDS.

use crate::cache::NotDeclared;
use crate::httpserver::origin::Refusal;
use crate::names::NameError;
use std::collections::BTreeMap;
use std::fmt;

/// The only path served.
pub const PATH: &str = "/msi/token";
/// The App Service API version the SDKs send (the only one served).
pub const API_VERSION: &str = "2019-08-01";
/// The longest `resource` served, in bytes as decoded (longer ones are 400).
pub const MAX_RESOURCE: usize = 512;
/// Why a request is refused with 400 before anything is fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadRequest {
    /// The query is not valid `application/x-www-form-urlencoded` UTF-8.
    Query,
    /// A parameter is given twice.
    Repeated(String),
    ApiVersion(Option<String>),
    NoResource,
    /// The resource is longer than [`MAX_RESOURCE`] (its length).
    ResourceTooLong(usize),
    Resource(String, NameError),
    /// `client_id`, `principal_id`/`object_id` or `mi_res_id`/`msi_res_id` names no
    /// identity the daemon serves (`Identities::select`).
    NotDeclared(NotDeclared),
    /// The `Host` header is missing, repeated or names another host.
    Host,
    /// A header of [`crate::httpserver::origin::PROXY_HEADERS`].
    Forwarded,
    /// The target is not a path (`GET http://host/path`, `CONNECT host:port`).
    Target,
}

impl fmt::Display for BadRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadRequest::Query => f.write_str("the query string is not valid URL-encoded UTF-8"),
            BadRequest::Repeated(p) => write!(f, "the parameter {p} is given more than once"),
            BadRequest::ApiVersion(None) => {
                write!(
                    f,
                    "the api-version parameter is missing (use {API_VERSION})"
                )
            }
            BadRequest::ApiVersion(Some(v)) => {
                write!(f, "api-version {v:?} is not supported (use {API_VERSION})")
            }
            BadRequest::NoResource => f.write_str("the resource parameter is missing"),
            BadRequest::ResourceTooLong(n) => write!(
                f,
                "the resource is {n} bytes long; at most {MAX_RESOURCE} are served"
            ),
            BadRequest::Resource(r, why) => write!(f, "resource {r:?} is not valid: {why}"),
            BadRequest::NotDeclared(e) => write!(
                f,
                "No Managed Identity found for specified ClientId/ResourceId/PrincipalId: {e}"
            ),
            BadRequest::Host => f.write_str(
                "one Host header, naming this endpoint's address, localhost, 127.0.0.1 or [::1], is required",
            ),
            BadRequest::Forwarded => f.write_str(
                "requests through a proxy (Forwarded, X-Forwarded-For, X-Forwarded-Host, X-Real-IP) are refused",
            ),
            BadRequest::Target => {
                f.write_str("the request target must be a path (/msi/token?..), not a URL")
            }
        }
    }
}

/// The query's parameters, decoded (`+` is a space); a repeated one is an error.
pub fn parse_query(target: &str) -> Result<BTreeMap<String, String>, BadRequest> {
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let mut out = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (decode(k)?, decode(v)?);
        if out.contains_key(&k) {
            return Err(BadRequest::Repeated(k));
        }
        out.insert(k, v);
    }
    Ok(out)
}

fn decode(s: &str) -> Result<String, BadRequest> {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| BadRequest::Query)
}

/// The path of a request target (without its query).
pub fn path(target: &str) -> &str {
    target.split_once('?').map_or(target, |(p, _)| p)
}

impl From<Refusal> for BadRequest {
    fn from(r: Refusal) -> BadRequest {
        match r {
            Refusal::Forwarded => BadRequest::Forwarded,
            Refusal::Target => BadRequest::Target,
            Refusal::Host => BadRequest::Host,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries() {
        let q = parse_query("/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fx&a+b=c+d")
            .unwrap();
        assert_eq!(q["api-version"], "2019-08-01");
        assert_eq!(q["resource"], "https://x");
        assert_eq!(q["a b"], "c d");
        assert_eq!(
            parse_query("/?resource=a&resource=b"),
            Err(BadRequest::Repeated("resource".into()))
        );
        assert_eq!(parse_query("/?resource=%FF"), Err(BadRequest::Query));
        assert!(parse_query("/msi/token").unwrap().is_empty());
        assert_eq!(path("/msi/token?x=1"), "/msi/token");
    }
}
