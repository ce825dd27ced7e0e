//! Upstreams that issue tokens, behind one trait. One file per upstream; the shared
//! response parser is in `parse`.

pub mod appservice;
pub mod arc;
pub mod assertion;
pub mod azure_cli;
pub mod client_tls;
pub mod cloudshell;
pub mod declared;
pub mod entra;
pub mod http;
pub mod imds;
pub mod parse;
pub mod redact;
pub mod select;

use crate::token::Token;
use std::fmt;
use std::time::Duration;

/// The upstreams, by the names `--source`, `--protocol` and `.status` use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Azure Cloud Shell's local endpoint.
    CloudShell,
    /// The Instance Metadata Service of a VM.
    Imds,
    /// App Service, Functions, Container Apps.
    AppService,
    /// An Azure Arc-connected server's agent.
    Arc,
    /// `az account get-access-token` after `az login`.
    AzureCli,
    /// Microsoft Entra with a federated token file (AKS workload identity).
    WorkloadIdentity,
    /// Microsoft Entra with a client secret or certificate.
    ServicePrincipal,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::CloudShell,
        Kind::Imds,
        Kind::AppService,
        Kind::Arc,
        Kind::AzureCli,
        Kind::WorkloadIdentity,
        Kind::ServicePrincipal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::CloudShell => "cloudshell",
            Kind::Imds => "imds",
            Kind::AppService => "appservice",
            Kind::Arc => "arc",
            Kind::AzureCli => "azure-cli",
            Kind::WorkloadIdentity => "workload-identity",
            Kind::ServicePrincipal => "service-principal",
        }
    }

    /// A Microsoft Entra upstream (the v2 token endpoint, over TLS).
    pub fn is_entra(self) -> bool {
        matches!(self, Kind::WorkloadIdentity | Kind::ServicePrincipal)
    }
}

/// A name that is not one of the sources' (`Kind::from_str`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKind(String);

impl fmt::Display for UnknownKind {
    /// Names the given text and lists the names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = Kind::ALL.iter().map(|k| k.name()).collect();
        write!(
            f,
            "unknown source {:?}: one of {}",
            self.0,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownKind {}

impl std::str::FromStr for Kind {
    type Err = UnknownKind;
    /// Case-insensitive.
    fn from_str(s: &str) -> Result<Kind, UnknownKind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownKind(s.to_string()))
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The most of a response body that is read; a longer body is an error.
pub const MAX_BODY: usize = 64 * 1024;

/// An upstream that issues tokens. `fetch_once` makes exactly one request; retries, timeouts
/// across retries and caching are the cache's business.
pub trait Source: Send + Sync {
    /// One request for `resource` (sent exactly as given), answering within `timeout`.
    fn fetch_once(&self, resource: &str, timeout: Duration) -> Result<Token, SourceError>;
    /// Where tokens come from, for logs and `.status` (never a secret).
    fn endpoint(&self) -> String;
    /// Which upstream this is.
    fn kind(&self) -> Kind;
}

/// What went wrong with one upstream request. Messages never carry token bytes: the
/// upstream's words are redacted wherever they are shown (`Display`, and `Debug` through it).
#[derive(Clone, PartialEq, Eq)]
pub enum SourceError {
    /// No connection (refused, reset, DNS): the endpoint may not be up yet.
    Unreachable(String),
    /// A loopback endpoint refused the connection: nothing listens on that port, and a
    /// retry within the same fetch would find the same (the fetch fails at once; later
    /// fetches try again, as after `Unreachable`).
    NothingListens(String),
    /// No complete answer within the time allowed.
    Timeout,
    /// The answer broke HTTP itself (a bad status line, HTTP/0.9, an oversized head, a bad
    /// Content-Length): retried once at most.
    Protocol(String),
    /// The mount-wide `--max-upstream-rate` held the request back until the time was up.
    Throttled,
    /// An HTTP error status, with the upstream's own message.
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    /// A 2xx answer that is not a usable token.
    BadResponse(String),
    /// A command (the Azure CLI) failed; its own words.
    Command(String),
    /// Microsoft Entra refused: its status, AADSTS code, `error` and `error_description`
    /// (never token material; classified by the code, see `entra::failure_of`).
    Entra {
        status: u16,
        code: Option<u32>,
        error: String,
        description: String,
        retry_after: Option<Duration>,
    },
    /// A local credential could not be used (the federated token file unreadable or
    /// empty, a certificate assertion that cannot be signed); names the file, never its
    /// contents.
    Credential(String),
}

impl From<parse::AnswerError> for SourceError {
    fn from(e: parse::AnswerError) -> SourceError {
        SourceError::BadResponse(e.to_string())
    }
}

/// Why an upstream cannot be set up, before any request: the command line or the
/// environment asks for something that cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// The endpoint URL is unusable; `problem` says how ("must start with http://", ...).
    Url { url: String, problem: String },
    /// No HTTP client could be built.
    Client(String),
    /// Flags or variables that do not go together, or one that is missing; says which.
    Choice(&'static str),
    /// A credential or CA file is unusable; names the file and the problem, never its
    /// contents.
    File {
        what: &'static str,
        path: String,
        problem: String,
    },
    /// A value that is missing or malformed (a tenant ID, a client ID); says which.
    Missing(String),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Url { url, problem } => {
                write!(f, "endpoint URL {:?} {problem}", without_credentials(url))
            }
            ConfigError::Client(why) => write!(f, "cannot build an HTTP client: {why}"),
            ConfigError::Choice(what) => f.write_str(what),
            ConfigError::File {
                what,
                path,
                problem,
            } => write!(f, "{what} {path}: {problem}"),
            ConfigError::Missing(what) => f.write_str(what),
        }
    }
}

impl std::error::Error for ConfigError {}

/// `url` with any user name and password cut out of its authority (`http://<...>@host/`):
/// a URL is shown in errors, logs and `.status`, its credentials never are.
fn without_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://<redacted>@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// How the cache must treat a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Worth retrying: connection trouble, timeouts, 404, 408, 410, 429, 5xx.
    Transient,
    /// The upstream said no to this resource (other 4xx): negative-cached, never retried
    /// at once (ENOENT).
    Refused,
    /// The upstream said no to this identity (401, 403, an unknown user-assigned identity):
    /// negative-cached like a refusal, but EACCES.
    Denied,
    /// The upstream answered nonsense.
    Invalid,
}

impl SourceError {
    pub fn failure(&self) -> Failure {
        match self {
            SourceError::Unreachable(_)
            | SourceError::NothingListens(_)
            | SourceError::Timeout
            | SourceError::Protocol(_)
            | SourceError::Throttled => Failure::Transient,
            SourceError::Status {
                status, message, ..
            } => match status {
                400 if names_unknown_identity(message) => Failure::Denied,
                _ => status_failure(*status),
            },
            SourceError::BadResponse(_) | SourceError::Command(_) | SourceError::Credential(_) => {
                Failure::Invalid
            }
            SourceError::Entra {
                status,
                code,
                error,
                ..
            } => entra::failure_of(*status, *code, error),
        }
    }

    /// The connection itself failed (refused, reset, no answer in time): the upstream, not
    /// this resource, is in trouble.
    pub fn is_connection_level(&self) -> bool {
        matches!(
            self,
            SourceError::Unreachable(_) | SourceError::NothingListens(_) | SourceError::Timeout
        )
    }

    /// No retry within this fetch can help (a refused connection to a loopback endpoint).
    pub fn ends_the_fetch(&self) -> bool {
        matches!(self, SourceError::NothingListens(_))
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SourceError::Status { retry_after, .. } | SourceError::Entra { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }
}

/// How an HTTP error status is treated, whatever the upstream: 404, 408, 410, 429 and 5xx
/// are transient, 401 and 403 refuse the identity, any other status refuses the resource.
pub fn status_failure(status: u16) -> Failure {
    match status {
        404 | 408 | 410 | 429 | 500..=599 => Failure::Transient,
        401 | 403 => Failure::Denied,
        _ => Failure::Refused,
    }
}

/// IMDS (`Identity not found`) and App Service (`No Managed Identity found for specified
/// ClientId/...`) answer 400 for a user-assigned identity that does not exist.
fn names_unknown_identity(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("identity not found") || m.contains("no managed identity found")
}

/// Every message is redacted (`redact::redact`) as it is written, so no upstream's words
/// can carry a token, a refresh token or a bearer credential into a log or `.status`.
impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            SourceError::Unreachable(why) | SourceError::NothingListens(why) => {
                format!("endpoint unreachable: {why}")
            }
            SourceError::Timeout => "endpoint did not answer in time".into(),
            SourceError::Protocol(why) => format!("the endpoint broke HTTP: {why}"),
            SourceError::Throttled => {
                "held back by --max-upstream-rate until --timeout ran out".into()
            }
            SourceError::Status {
                status, message, ..
            } => format!("HTTP {status}: {message}"),
            SourceError::BadResponse(why) => format!("unusable answer: {why}"),
            SourceError::Command(why) | SourceError::Credential(why) => why.clone(),
            SourceError::Entra {
                status,
                code,
                error,
                description,
                ..
            } => match code {
                Some(code) if !description.contains(&format!("AADSTS{code}")) => {
                    format!("HTTP {status}: {error}: AADSTS{code}: {description}")
                }
                _ => format!("HTTP {status}: {error}: {description}"),
            },
        };
        f.write_str(&redact::redact(&text))
    }
}

impl fmt::Debug for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SourceError({self})")
    }
}

impl std::error::Error for SourceError {}

/// A user-assigned managed identity, by one of its ids (IMDS and App Service).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub client_id: Option<String>,
    pub object_id: Option<String>,
    pub msi_res_id: Option<String>,
}

impl Identity {
    /// The query parameters that name this identity, under the upstream's own names.
    pub fn params<'a>(
        &'a self,
        client: &'a str,
        object: &'a str,
        res: &'a str,
    ) -> Vec<(&'a str, &'a str)> {
        [
            (client, &self.client_id),
            (object, &self.object_id),
            (res, &self.msi_res_id),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect()
    }
}
