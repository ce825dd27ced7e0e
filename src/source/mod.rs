//! Upstreams that issue tokens, behind one trait. One file per upstream; the shared
//! response parser is in `parse`.

pub mod appservice;
pub mod arc;
pub mod azure_cli;
pub mod cloudshell;
pub mod http;
pub mod imds;
pub mod parse;
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
    /// The upstream said no (other 4xx): negative-cached, never retried at once.
    Refused,
    /// The upstream answered nonsense.
    Invalid,
}

impl SourceError {
    pub fn failure(&self) -> Failure {
        match self {
            SourceError::Unreachable(_) | SourceError::Timeout => Failure::Transient,
            SourceError::Status { status, .. } => match status {
                404 | 408 | 410 | 429 | 500..=599 => Failure::Transient,
                _ => Failure::Refused,
            },
            SourceError::BadResponse(_) | SourceError::Command(_) => Failure::Invalid,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SourceError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceError::Unreachable(why) => write!(f, "endpoint unreachable: {why}"),
            SourceError::Timeout => f.write_str("endpoint did not answer in time"),
            SourceError::Status {
                status, message, ..
            } => write!(f, "HTTP {status}: {message}"),
            SourceError::BadResponse(why) => write!(f, "unusable answer: {why}"),
            SourceError::Command(why) => f.write_str(why),
        }
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
