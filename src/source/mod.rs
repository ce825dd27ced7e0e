//! Upstreams that issue tokens, behind one trait. One file per upstream; the shared
//! response parser is in `parse`.

pub mod appservice;
pub mod arc;
pub mod azure_cli;
pub mod cloudshell;
pub mod http;
pub mod imds;
pub mod parse;
pub mod redact;
pub mod select;

use crate::token::Token;
use std::fmt;
use std::time::Duration;

/// The most of a response body that is read; a longer body is an error.
pub const MAX_BODY: usize = 64 * 1024;

/// An upstream that issues tokens. `fetch_once` makes exactly one request; retries, timeouts
/// across retries and caching are the cache's business.
pub trait Source: Send + Sync {
    /// One request for `resource` (sent exactly as given), answering within `timeout`.
    fn fetch_once(&self, resource: &str, timeout: Duration) -> Result<Token, SourceError>;
    /// Where tokens come from, for logs and `.status` (never a secret).
    fn endpoint(&self) -> String;
    /// The kind of upstream (`cloudshell`, ...).
    fn kind(&self) -> &'static str;
}

/// What went wrong with one upstream request. Messages never carry token bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceError {
    /// No connection (refused, reset, DNS): the endpoint may not be up yet.
    Unreachable(String),
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
            | SourceError::Timeout
            | SourceError::Protocol(_)
            | SourceError::Throttled => Failure::Transient,
            SourceError::Status {
                status, message, ..
            } => match status {
                404 | 408 | 410 | 429 | 500..=599 => Failure::Transient,
                401 | 403 => Failure::Denied,
                400 if names_unknown_identity(message) => Failure::Denied,
                _ => Failure::Refused,
            },
            SourceError::BadResponse(_) | SourceError::Command(_) => Failure::Invalid,
        }
    }

    /// The connection itself failed (refused, reset, no answer in time): the upstream, not
    /// this resource, is in trouble.
    pub fn is_connection_level(&self) -> bool {
        matches!(self, SourceError::Unreachable(_) | SourceError::Timeout)
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SourceError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
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
            SourceError::Unreachable(why) => format!("endpoint unreachable: {why}"),
            SourceError::Timeout => "endpoint did not answer in time".into(),
            SourceError::Protocol(why) => format!("the endpoint broke HTTP: {why}"),
            SourceError::Throttled => {
                "held back by --max-upstream-rate until --timeout ran out".into()
            }
            SourceError::Status {
                status, message, ..
            } => format!("HTTP {status}: {message}"),
            SourceError::BadResponse(why) => format!("unusable answer: {why}"),
            SourceError::Command(why) => why.clone(),
        };
        f.write_str(&redact::redact(&text))
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
