//! What the HTTP upstreams share: one `HttpEndpoint` (a checked URL and a client that
//! keeps proxies away from local endpoints and never follows a redirect), bounded reading of
//! answers, and error mapping.

use super::{parse, ConfigError, SourceError, MAX_BODY};
use crate::policy::{now_ms, EpochMs};
use crate::token::Token;
use reqwest::blocking::{Client, RequestBuilder, Response};
use std::io::Read;
use std::time::Duration;
use zeroize::Zeroizing;

/// Where an HTTP upstream is and the client that reaches it.
pub struct HttpEndpoint {
    url: reqwest::Url,
    client: Client,
}

impl HttpEndpoint {
    /// Checks the URL (`http://host[:port]/path`) and builds the client; no request is sent.
    pub fn new(endpoint: &str) -> Result<HttpEndpoint, ConfigError> {
        let url = check_url(endpoint)?;
        Ok(HttpEndpoint {
            client: client(&url, &[])?,
            url,
        })
    }

    /// An endpoint from a URL checked elsewhere and its client (the Entra upstreams).
    pub fn from_parts(url: reqwest::Url, client: Client) -> HttpEndpoint {
        HttpEndpoint { url, client }
    }

    /// `GET` of the endpoint with these query parameters.
    pub fn get(&self, params: &[(&str, &str)]) -> RequestBuilder {
        self.client.get(with_query(&self.url, params))
    }

    /// `POST` to the endpoint.
    pub fn post(&self) -> RequestBuilder {
        self.client.post(self.url.clone())
    }

    /// The URL, for logs and `.status` (never carries a secret).
    pub fn shown(&self) -> String {
        self.url.to_string()
    }
}

fn check_url(endpoint: &str) -> Result<reqwest::Url, ConfigError> {
    let bad = |problem: String| ConfigError::Url {
        url: endpoint.to_string(),
        problem,
    };
    let url = reqwest::Url::parse(endpoint).map_err(|e| bad(format!("is malformed: {e}")))?;
    if url.scheme() != "http" {
        // The local token endpoints (Cloud Shell, IMDS, App Service, Arc) are plain http;
        // only the Entra upstreams use TLS (`tls`).
        return Err(bad("must start with http://".into()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("has no host".into()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("must not carry a user name or password".into()));
    }
    Ok(url)
}

/// The client of one upstream, HTTP or TLS (verified against the system's roots and `ca`):
/// no redirect is ever followed (it would carry our headers, App Service's secret, Entra's
/// assertion, elsewhere), and proxies from the environment never capture a local endpoint.
pub(crate) fn client(
    url: &reqwest::Url,
    ca: &[reqwest::Certificate],
) -> Result<Client, ConfigError> {
    // reqwest's rustls needs a crypto provider for every client, plain http ones too.
    super::client_tls::ensure_provider();
    let mut builder = Client::builder()
        .pool_max_idle_per_host(4)
        .redirect(reqwest::redirect::Policy::none())
        .tls_certs_merge(ca.iter().cloned());
    if is_local(url) {
        builder = builder.no_proxy();
    }
    builder
        .build()
        .map_err(|e| ConfigError::Client(super::client_tls::error_chain(&e)))
}

/// Loopback (`localhost`, 127.0.0.0/8, ::1, mapped or not) or IPv4 link-local (IMDS).
fn is_local(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    super::client_tls::is_loopback(url)
        || bare
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_link_local())
}

/// The status, `Retry-After` and (bounded, wiped on drop) body of an answer.
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub www_authenticate: Option<String>,
    pub body: Zeroizing<Vec<u8>>,
}

pub fn read_answer(mut response: Response) -> Result<Answer, SourceError> {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let retry_after = header("retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let www_authenticate = header("www-authenticate");
    let status = response.status().as_u16();
    let body = read_limited(&mut response)?;
    Ok(Answer {
        status,
        retry_after,
        www_authenticate,
        body,
    })
}

impl Answer {
    /// A 2xx answer as a token; any other status as an error with the upstream's words.
    pub fn into_token(self, requested_at: EpochMs) -> Result<Token, SourceError> {
        self.into_token_or(requested_at, Answer::status_error)
    }

    /// A 2xx answer as a token; any other status as `error` makes it (an upstream with
    /// error bodies of its own, such as Entra's).
    pub fn into_token_or(
        self,
        requested_at: EpochMs,
        error: impl FnOnce(&Answer) -> SourceError,
    ) -> Result<Token, SourceError> {
        if !(200..300).contains(&self.status) {
            return Err(error(&self));
        }
        Ok(parse::token(&self.body, requested_at)?)
    }

    /// The error of a non-2xx answer, with the upstream's words.
    pub fn status_error(&self) -> SourceError {
        SourceError::Status {
            status: self.status,
            message: parse::error_message(&self.body),
            retry_after: self.retry_after,
        }
    }
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
    // The innermost cause says it best ("Connection refused (os error 111)"). An answer
    // that breaks HTTP (a bad status line, HTTP/0.9, an oversized head, a bad
    // Content-Length) is hyper's parse error somewhere in the chain.
    let mut cause: &dyn std::error::Error = &e;
    let mut broken_http = false;
    let mut refused = false;
    loop {
        broken_http |= cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse);
        refused |= cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
        match cause.source() {
            Some(next) => cause = next,
            None => break,
        }
    }
    // Nothing listens on a loopback port: no retry within this fetch will change that
    // (a remote address may refuse while a load balancer or the host restarts).
    let local = e.url().is_some_and(super::client_tls::is_loopback);
    if broken_http {
        SourceError::Protocol(cause.to_string())
    } else if refused && local {
        SourceError::NothingListens(cause.to_string())
    } else {
        SourceError::Unreachable(cause.to_string())
    }
}

/// Sends one token request and reads its answer as a token (what every HTTP upstream does
/// once it has built its request).
pub fn request_token(request: RequestBuilder, timeout: Duration) -> Result<Token, SourceError> {
    request_token_or(request, timeout, Answer::status_error)
}

/// [`request_token`] with the upstream's own error mapping for non-2xx answers.
pub fn request_token_or(
    request: RequestBuilder,
    timeout: Duration,
    error: impl FnOnce(&Answer) -> SourceError,
) -> Result<Token, SourceError> {
    let requested_at = now_ms();
    let response = request.timeout(timeout).send().map_err(transport_error)?;
    read_answer(response)?.into_token_or(requested_at, error)
}

/// `url` with query parameters appended.
fn with_query(url: &reqwest::Url, params: &[(&str, &str)]) -> reqwest::Url {
    let mut url = url.clone();
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in params {
            q.append_pair(k, v);
        }
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_loopback_connection_ends_the_fetch() {
        // A port just let go of: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        for host in ["127.0.0.1", "localhost"] {
            let ep = HttpEndpoint::new(&format!("http://{host}:{port}/oauth2/token")).unwrap();
            let err = request_token(ep.post(), Duration::from_secs(2)).unwrap_err();
            assert!(
                matches!(err, SourceError::NothingListens(_)),
                "{host}: {err}"
            );
            assert!(err.ends_the_fetch() && err.is_connection_level());
            assert!(err.to_string().starts_with("endpoint unreachable: "));
        }
    }

    #[test]
    fn endpoint_urls_are_http_with_a_host_and_no_credentials() {
        assert!(HttpEndpoint::new("http://127.0.0.1:1/oauth2/token").is_ok());
        let problem = |u: &str| match HttpEndpoint::new(u) {
            Err(ConfigError::Url { url, problem }) => (url, problem),
            _ => panic!("{u} accepted"),
        };
        assert!(problem("https://127.0.0.1/x").1.contains("http://"));
        assert!(problem("nonsense").1.contains("malformed"));
        assert!(problem("http://user:s3cr3t@127.0.0.1:1/x")
            .1
            .contains("user name or password"));
        // Whatever is wrong, the message never shows the credentials.
        for url in [
            "http://user:s3cr3t@127.0.0.1:1/x",
            "http://user:s3cr3t@127.0.0.1:99999/x",
            "https://user:s3cr3t@127.0.0.1/x",
        ] {
            let shown = HttpEndpoint::new(url).err().map(|e| e.to_string());
            assert!(shown.is_some_and(|m| !m.contains("s3cr3t") && !m.contains("user:")));
        }
    }
}
