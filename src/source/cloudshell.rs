//! Azure Cloud Shell's local endpoint: `POST $MSI_ENDPOINT` with `Metadata: true` and the
//! form body `resource=<resource>`.

use super::http;
use super::{Source, SourceError};
use crate::token::Token;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::blocking::Client;
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
    url: reqwest::Url,
    client: Client,
}

impl CloudShell {
    /// Validates the endpoint URL; no request is sent.
    pub fn new(endpoint: &str) -> Result<CloudShell, String> {
        let url = http::check_url(endpoint)?;
        Ok(CloudShell {
            client: http::client(&url)?,
            url,
        })
    }
}

impl Source for CloudShell {
    fn fetch_once(&self, resource: &str, timeout: Duration) -> Result<Token, SourceError> {
        let body = format!("resource={}", utf8_percent_encode(resource, FORM));
        let request = self
            .client
            .post(self.url.clone())
            .header("Metadata", "true")
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body);
        http::request_token(request, timeout)
    }

    fn endpoint(&self) -> String {
        self.url.to_string()
    }

    fn kind(&self) -> &'static str {
        "cloudshell"
    }
}
