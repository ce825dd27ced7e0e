//! Azure Cloud Shell's local endpoint: `POST $MSI_ENDPOINT` with `Metadata: true` and the
//! form body `resource=<resource>`.

use super::http::{self, HttpEndpoint};
use super::{ConfigError, Kind, Source, SourceError};
use crate::token::Token;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::time::Duration;

/// Cloud Shell's endpoint when `MSI_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "http://localhost:50342/oauth2/token";

/// application/x-www-form-urlencoded: everything but `*-._` and alphanumerics is escaped.
const FORM: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'*')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_');

pub struct CloudShell {
    endpoint: HttpEndpoint,
}

impl CloudShell {
    /// Validates the endpoint URL; no request is sent.
    pub fn new(endpoint: &str) -> Result<CloudShell, ConfigError> {
        Ok(CloudShell {
            endpoint: HttpEndpoint::new(endpoint)?,
        })
    }
}

impl Source for CloudShell {
    fn fetch_once(&self, resource: &str, timeout: Duration) -> Result<Token, SourceError> {
        let body = format!("resource={}", utf8_percent_encode(resource, FORM));
        let request = self
            .endpoint
            .post()
            .header("Metadata", "true")
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body);
        http::request_token(request, timeout)
    }

    fn endpoint(&self) -> String {
        self.endpoint.shown()
    }

    fn kind(&self) -> Kind {
        Kind::CloudShell
    }
}
