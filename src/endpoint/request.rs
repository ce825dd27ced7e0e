//! What a request to the endpoint says, checked without any upstream call: its query, the
//! identity it asks for, and its `Host` (the resource it names is resolved by
//! `names::resolve_query`, the rule it shares with file names).

use crate::httpserver::origin::Refusal;
use crate::names::NameError;
use crate::source::Identity;
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
    /// `client_id`, `principal_id` or `mi_res_id` names another identity than the mount's.
    OtherIdentity(&'static str),
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
            BadRequest::OtherIdentity(p) => write!(
                f,
                "{p} names another identity than this mount's: one mount serves one identity"
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

/// Refuses a request naming another identity than `mount`'s. Names it can be given by:
/// `client_id`; `principal_id` or `object_id` (the object ID); `mi_res_id` or `msi_res_id`.
/// Empty values count as absent; IDs compare case-insensitively. A mount without that
/// kind of ID (the system-assigned identity, Cloud Shell's user) refuses every such name.
pub fn check_identity(
    params: &BTreeMap<String, String>,
    mount: &Identity,
) -> Result<(), BadRequest> {
    let kinds: [(&'static str, &Option<String>); 5] = [
        ("client_id", &mount.client_id),
        ("principal_id", &mount.object_id),
        ("object_id", &mount.object_id),
        ("mi_res_id", &mount.msi_res_id),
        ("msi_res_id", &mount.msi_res_id),
    ];
    for (param, ours) in kinds {
        let Some(asked) = params.get(param).filter(|v| !v.is_empty()) else {
            continue;
        };
        if !ours.as_ref().is_some_and(|o| o.eq_ignore_ascii_case(asked)) {
            return Err(BadRequest::OtherIdentity(param));
        }
    }
    Ok(())
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

    #[test]
    fn identities() {
        let q = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        let system = Identity::default();
        assert_eq!(check_identity(&BTreeMap::new(), &system), Ok(()));
        assert_eq!(check_identity(&q("client_id", ""), &system), Ok(()));
        for p in ["client_id", "principal_id", "object_id", "mi_res_id"] {
            assert_eq!(
                check_identity(&q(p, "x"), &system),
                Err(BadRequest::OtherIdentity(match p {
                    "client_id" => "client_id",
                    "principal_id" => "principal_id",
                    "object_id" => "object_id",
                    _ => "mi_res_id",
                }))
            );
        }
        let ours = Identity {
            client_id: Some("AAAA-1".into()),
            ..Identity::default()
        };
        assert_eq!(check_identity(&q("client_id", "aaaa-1"), &ours), Ok(()));
        assert!(check_identity(&q("client_id", "bbbb"), &ours).is_err());
        assert!(check_identity(&q("principal_id", "aaaa-1"), &ours).is_err());
    }
}
