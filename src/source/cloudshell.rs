//! Azure Cloud Shell's local endpoint: `POST $MSI_ENDPOINT` with `Metadata: true` and the
//! form body `resource=<resource>`.

use super::{parse, Source, SourceError, MAX_BODY};
use crate::token::{EpochMs, Token};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::blocking::{Client, Response};
use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use zeroize::Zeroizing;

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
        let url = check_url(endpoint)?;
        Ok(CloudShell {
            client: http_client(&url)?,
            url,
        })
    }
}

/// An `http(s)://host[:port]/path` URL, or a message saying what is wrong with it.
pub fn check_url(endpoint: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(endpoint)
        .map_err(|e| format!("endpoint URL {endpoint:?} is malformed: {e}"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!(
            "endpoint URL {endpoint:?} must start with http:// or https://"
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("endpoint URL {endpoint:?} has no host"));
    }
    Ok(url)
}

/// A client for one endpoint. Proxies from the environment never capture a local endpoint.
pub fn http_client(url: &reqwest::Url) -> Result<Client, String> {
    let mut builder = Client::builder().pool_max_idle_per_host(4);
    if is_local(url) {
        builder = builder.no_proxy();
    }
    builder
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))
}

fn is_local(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => ip.is_loopback() || ip.is_link_local(),
        Ok(std::net::IpAddr::V6(ip)) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

impl Source for CloudShell {
    fn fetch_once(&self, resource: &str, timeout: Duration) -> Result<Token, SourceError> {
        let body = format!("resource={}", utf8_percent_encode(resource, FORM));
        let requested_at = now_ms();
        let response = self
            .client
            .post(self.url.clone())
            .header("Metadata", "true")
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
            .timeout(timeout)
            .send()
            .map_err(transport_error)?;
        answer(response, requested_at)
    }

    fn endpoint(&self) -> String {
        self.url.to_string()
    }

    fn kind(&self) -> &'static str {
        "cloudshell"
    }
}

/// Turns an HTTP answer into a token or an error (shared by the HTTP upstreams).
pub fn answer(mut response: Response, requested_at: EpochMs) -> Result<Token, SourceError> {
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = read_limited(&mut response)?;
    if !(200..300).contains(&status) {
        let message = parse::error_message(&body);
        return Err(SourceError::Status {
            status,
            message,
            retry_after,
        });
    }
    parse::token(&body, requested_at).map_err(SourceError::BadResponse)
}

/// Reads at most `MAX_BODY` bytes into a buffer that is wiped when dropped.
fn read_limited(response: &mut Response) -> Result<Zeroizing<Vec<u8>>, SourceError> {
    let mut body = Zeroizing::new(Vec::with_capacity(MAX_BODY + 1));
    let read = response.take(MAX_BODY as u64 + 1).read_to_end(&mut body);
    match read {
        Ok(_) if body.len() > MAX_BODY => Err(SourceError::BadResponse(format!(
            "the answer is larger than {} KiB",
            MAX_BODY / 1024
        ))),
        Ok(_) => Ok(body),
        Err(e) if is_timeout(&e) => Err(SourceError::Timeout),
        Err(e) => Err(SourceError::Unreachable(format!(
            "reading the answer failed: {e}"
        ))),
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::TimedOut
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<reqwest::Error>())
            .is_some_and(reqwest::Error::is_timeout)
}

pub fn transport_error(e: reqwest::Error) -> SourceError {
    if e.is_timeout() {
        return SourceError::Timeout;
    }
    // The innermost cause says it best ("Connection refused (os error 111)").
    let mut cause: &dyn std::error::Error = &e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    SourceError::Unreachable(cause.to_string())
}

pub fn now_ms() -> EpochMs {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as EpochMs)
}
