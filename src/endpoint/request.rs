//! What a request to the endpoint says, checked without any upstream call: its query
//! (parsed by `httpserver::query`, shared with IMDS; the identity it asks for is chosen by
//! `cache::Identities::select`, the resource it names is resolved by
//! `names::resolve_query`, the rule it shares with file names); its `Host`, target and
//! forwarding headers are checked by `httpserver::origin`, shared with IMDS.

use super::protocol::Protocol;
use crate::cache::NotDeclared;
use crate::httpserver::origin::Refusal;
use crate::httpserver::query::QueryError;
use std::fmt;

/// The only path served.
pub const PATH: &str = "/msi/token";
/// The App Service API version the SDKs send (`IDENTITY_ENDPOINT`); 2017-09-01 is served
/// too (`protocol`).
pub const API_VERSION: &str = super::protocol::V2019;

/// Why a request is refused with 400 before anything is fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadRequest {
    /// The query cannot be read, or its `resource` is too long or not valid.
    Query(QueryError),
    ApiVersion(Option<String>),
    /// The secret came in the other version's header (`X-IDENTITY-HEADER` for 2019-08-01,
    /// `secret` for 2017-09-01): the api-version asked for.
    SecretHeader(Protocol),
    /// A 2019-08-01 identity parameter in a 2017-09-01 request (which has `clientid`).
    NotIn2017(&'static str),
    NoResource,
    /// `client_id`, `principal_id`/`object_id` or `mi_res_id`/`msi_res_id` names no
    /// identity the daemon serves (`Identities::select`).
    NotDeclared(NotDeclared),
    /// Proxy headers, a target that is not a path, or a foreign `Host`.
    Origin(Refusal),
}

impl fmt::Display for BadRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadRequest::Query(e) => e.fmt(f),
            BadRequest::ApiVersion(None) => {
                write!(
                    f,
                    "the api-version parameter is missing (use {API_VERSION}, or {} with the secret in the secret header)",
                    super::protocol::V2017
                )
            }
            BadRequest::ApiVersion(Some(v)) => {
                write!(
                    f,
                    "api-version {v:?} is not supported (use {API_VERSION}, or {} with the secret in the secret header)",
                    super::protocol::V2017
                )
            }
            BadRequest::SecretHeader(p) => {
                let header = match p {
                    Protocol::V2019 => "X-IDENTITY-HEADER",
                    Protocol::V2017 => "secret",
                };
                write!(
                    f,
                    "api-version {} takes the secret in the {header} header",
                    p.api_version()
                )
            }
            BadRequest::NotIn2017(param) => write!(
                f,
                "api-version {} names a user-assigned identity with clientid, not {param}",
                super::protocol::V2017
            ),
            BadRequest::NoResource => f.write_str("the resource parameter is missing"),
            BadRequest::NotDeclared(e) => write!(
                f,
                "No Managed Identity found for specified ClientId/ResourceId/PrincipalId: {e}"
            ),
            BadRequest::Origin(r) => r.fmt(f),
        }
    }
}

impl From<QueryError> for BadRequest {
    fn from(e: QueryError) -> BadRequest {
        BadRequest::Query(e)
    }
}

impl From<Refusal> for BadRequest {
    fn from(r: Refusal) -> BadRequest {
        BadRequest::Origin(r)
    }
}
