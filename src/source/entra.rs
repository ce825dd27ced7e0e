//! Microsoft Entra's v2 token endpoint: `POST {authority}/{tenant}/oauth2/v2.0/token`,
//! form `grant_type=client_credentials`, `client_id`, `scope=<resource>/.default` and one
//! credential: a client secret, a federated token file (AKS workload identity, read anew
//! for every request), a certificate assertion (`assertion`) or a service-account token
//! handed over at run time ([`Supplied`], the CSI driver's). Answers carry
//! `expires_in`; errors `{"error","error_description","error_codes"}`, classified by
//! their AADSTS code (`failure_of`).

use super::assertion::ClientCertificate;
use super::http::{self, HttpEndpoint};
use super::{client_tls, parse, redact, ConfigError, Failure, Kind, Source, SourceError};
use crate::policy::now_ms;
use crate::token::Token;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// application/x-www-form-urlencoded: everything but `*-._` and alphanumerics is escaped.
const FORM: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'*')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_');

/// AADSTS codes that refuse the resource, not the identity (ENOENT, negative-cached):
/// 500011 the resource principal is not in the tenant, 70011 an invalid scope.
const REFUSED: [u32; 2] = [500011, 70011];
/// AADSTS codes that refuse the identity (EACCES): a wrong or expired secret (7000215,
/// 7000222), an assertion outside its valid time (700024), a bad signature (700027), an
/// unknown application (700016), a bad assertion issuer or subject (700023, 70021, 700211,
/// 700212, 700213), no credential at all (7000216), a disabled application (7000112), an
/// unknown tenant (90002).
const DENIED: [u32; 13] = [
    7000215, 7000222, 700024, 700027, 700016, 700023, 70021, 700211, 700212, 700213, 7000216,
    7000112, 90002,
];

/// How the cache treats an Entra error: by its AADSTS code first, then by `error`
/// (`invalid_client`, `unauthorized_client`: the identity), then by status as for every
/// HTTP upstream. 408, 429 and 5xx are transient whatever the code.
pub fn failure_of(status: u16, code: Option<u32>, error: &str) -> Failure {
    match status {
        408 | 429 | 500..=599 => return Failure::Transient,
        _ => {}
    }
    match code {
        Some(c) if REFUSED.contains(&c) => return Failure::Refused,
        Some(c) if DENIED.contains(&c) => return Failure::Denied,
        _ => {}
    }
    if matches!(error, "invalid_client" | "unauthorized_client") {
        return Failure::Denied;
    }
    super::status_failure(status)
}

/// The scope for a resource: `<resource>/.default`, without doubling a trailing slash
/// (`https://management.azure.com/` asks for `https://management.azure.com/.default`).
pub fn scope(resource: &str) -> String {
    if resource.ends_with('/') {
        format!("{resource}.default")
    } else {
        format!("{resource}/.default")
    }
}

/// How the client proves who it is.
#[derive(Clone)]
pub enum Credential {
    /// `client_secret=`.
    Secret(Arc<Zeroizing<String>>),
    /// `client_assertion=` the file's contents, trimmed, read for every request.
    FederatedTokenFile(PathBuf),
    /// `client_assertion=` a JWT signed with the certificate's key.
    Certificate(Arc<ClientCertificate>),
    /// `client_assertion=` the newest service-account token handed over at run time (by
    /// the kubelet, to the CSI driver).
    Supplied(Arc<Supplied>),
}

/// The service-account token handed over for one identity at run time (the CSI driver
/// sets the newest of its live volumes' tokens, the kubelet's, at each
/// `NodePublishVolume`), registered for scrubbing (`known`) while held and sent as the
/// client assertion of each request. `Debug` never shows a token.
#[derive(Default)]
pub struct Supplied {
    held: parking_lot::Mutex<Option<Held>>,
}

/// A service-account token held by [`Supplied`].
struct Held {
    token: Arc<Zeroizing<String>>,
    /// When it expires (its `expirationTimestamp`), ms since the epoch.
    expires_at_ms: i64,
    /// Registered for scrubbing while held.
    _known: crate::known::Known,
}

/// What a fetch without a valid service-account token says (no request is sent).
const NO_SUPPLIED_TOKEN: &str = "no valid service-account token held: waiting for the kubelet's next NodePublishVolume of a volume of this identity";

impl Supplied {
    /// Nothing held yet.
    pub fn new() -> Supplied {
        Supplied::default()
    }

    /// Holds `token` (expiring at that ms since the epoch), whatever was held before, or
    /// nothing: the CSI driver decides which of its live volumes' tokens is the newest.
    pub fn set(&self, token: Option<(Zeroizing<String>, i64)>) {
        *self.held.lock() = token.map(|(token, expires_at_ms)| Held {
            _known: crate::known::remember(&token),
            token: Arc::new(token),
            expires_at_ms,
        });
    }

    /// Drops the token held (wiped, and no longer scrubbed once no request holds it).
    pub fn clear(&self) {
        *self.held.lock() = None;
    }

    /// When the token held expires (ms since the epoch); `None`: none held.
    pub fn expires_at_ms(&self) -> Option<i64> {
        self.held.lock().as_ref().map(|h| h.expires_at_ms)
    }

    /// The token held, while it is valid at `now` (ms since the epoch); else the error a
    /// fetch fails with, before any request.
    fn current(&self, now: i64) -> Result<Arc<Zeroizing<String>>, SourceError> {
        match &*self.held.lock() {
            Some(h) if now < h.expires_at_ms => Ok(h.token.clone()),
            Some(h) => Err(SourceError::Credential(format!(
                "{NO_SUPPLIED_TOKEN} (the newest expired {} s ago)",
                (now - h.expires_at_ms) / 1000
            ))),
            None => Err(SourceError::Credential(format!(
                "{NO_SUPPLIED_TOKEN} (none was handed over)"
            ))),
        }
    }
}

impl fmt::Debug for Supplied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.expires_at_ms() {
            Some(at) => write!(f, "Supplied(<redacted>, expires at {at} ms)"),
            None => f.write_str("Supplied(none held)"),
        }
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Secret(_) => f.write_str("Secret(<redacted>)"),
            Credential::FederatedTokenFile(p) => write!(f, "FederatedTokenFile({p:?})"),
            Credential::Certificate(c) => write!(f, "Certificate({c:?})"),
            Credential::Supplied(s) => write!(f, "{s:?}"),
        }
    }
}

/// Everything an Entra upstream needs besides its authority.
#[derive(Debug, Clone)]
pub struct Settings {
    pub tenant: String,
    pub client_id: String,
    pub credential: Credential,
    /// `--ca-file`'s certificates, added to the system's roots.
    pub ca: Vec<reqwest::Certificate>,
}

pub struct Entra {
    kind: Kind,
    endpoint: HttpEndpoint,
    /// The token URL: also the `aud` of certificate assertions.
    token_url: String,
    client_id: String,
    credential: Credential,
    /// The client secret, registered for scrubbing while this source exists.
    _known: Option<crate::known::Known>,
}

impl Entra {
    /// Checks the authority and builds the client; no request is sent.
    pub fn new(kind: Kind, authority: &str, settings: &Settings) -> Result<Entra, ConfigError> {
        let url = client_tls::token_url(authority, &settings.tenant)?;
        if settings.client_id.trim().is_empty() {
            return Err(ConfigError::Missing("the client ID is empty".into()));
        }
        let client = http::client(&url, &settings.ca)?;
        Ok(Entra {
            kind,
            token_url: url.to_string(),
            endpoint: HttpEndpoint::from_parts(url, client),
            client_id: settings.client_id.clone(),
            credential: settings.credential.clone(),
            _known: match &settings.credential {
                Credential::Secret(secret) => Some(crate::known::remember(secret)),
                _ => None,
            },
        })
    }

    /// The request body (wiped on drop: it holds the credential), and the assertion it
    /// carries registered for scrubbing (kept until the answer is read).
    fn form(
        &self,
        resource: &str,
        timeout: Duration,
    ) -> Result<(Zeroizing<String>, Option<crate::known::Known>), SourceError> {
        let enc = |s: &str| utf8_percent_encode(s, FORM).to_string();
        let mut body = Zeroizing::new(format!(
            "grant_type=client_credentials&client_id={}&scope={}",
            enc(&self.client_id),
            enc(&scope(resource))
        ));
        match &self.credential {
            Credential::Secret(secret) => {
                body.push_str("&client_secret=");
                body.push_str(&Zeroizing::new(enc(secret)));
                Ok((body, None))
            }
            Credential::FederatedTokenFile(path) => {
                let token = read_token_file(path, timeout)?;
                push_assertion(&mut body, &token);
                Ok((body, Some(crate::known::remember(&token))))
            }
            Credential::Certificate(cert) => {
                let now = u64::try_from(now_ms() / 1000).unwrap_or(0);
                let jwt = cert.assertion(&self.client_id, &self.token_url, now)?;
                push_assertion(&mut body, &jwt);
                Ok((body, Some(crate::known::remember(&jwt))))
            }
            Credential::Supplied(supplied) => {
                // Registered again for this request: a clear() meanwhile must not unmask
                // it in the answer's text.
                let token = supplied.current(now_ms())?;
                push_assertion(&mut body, &token);
                Ok((body, Some(crate::known::remember(&token))))
            }
        }
    }
}

fn push_assertion(body: &mut String, assertion: &str) {
    body.push_str("&client_assertion_type=");
    body.push_str(&utf8_percent_encode(ASSERTION_TYPE, FORM).to_string());
    body.push_str("&client_assertion=");
    body.push_str(&Zeroizing::new(
        utf8_percent_encode(assertion, FORM).to_string(),
    ));
}

/// The federated token: the file's contents without surrounding white space, read as
/// every credential file is (`hardening::read_credential_file`: a regular file, not on
/// procfs or sysfs, at most 64 KiB). Unreadable, empty, not text or not a JWT is an error
/// naming the file, never its contents; so is a file whose filesystem does not answer
/// `within`.
pub fn read_token_file(
    path: &std::path::Path,
    within: Duration,
) -> Result<Zeroizing<String>, SourceError> {
    let fail = |why: String| {
        SourceError::Credential(format!("federated token file {}: {why}", path.display()))
    };
    let cap = crate::hardening::MAX_SECRET_FILE;
    let raw = crate::hardening::read_credential_file_within(path, cap, within)
        .map_err(|e| fail(e.to_string()))?;
    let text = std::str::from_utf8(&raw).map_err(|_| fail("is not UTF-8 text".into()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(fail("is empty".into()));
    }
    if !is_jwt(token) {
        return Err(fail(
            "is not a JWT (three base64url parts separated by dots)".into(),
        ));
    }
    Ok(Zeroizing::new(token.to_string()))
}

/// Three non-empty base64url parts (no padding) separated by dots: a compact JWS.
fn is_jwt(text: &str) -> bool {
    let base64url = |part: &str| {
        !part.is_empty()
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let parts: Vec<&str> = text.split('.').collect();
    parts.len() == 3 && parts.into_iter().all(base64url)
}

impl Source for Entra {
    fn fetch_once(&self, resource: &str, timeout: Duration) -> Result<Token, SourceError> {
        // The assertion stays registered until its answer, echoes included, is parsed.
        let (form, _assertion) = self.form(resource, timeout)?;
        let request = self
            .endpoint
            .post()
            .header("Content-Type", "application/x-www-form-urlencoded")
            .header("Accept", "application/json")
            .body(form.as_bytes().to_vec());
        http::request_token_or(request, timeout, |a| {
            error_of(a.status, &a.body, a.retry_after)
        })
    }

    fn endpoint(&self) -> String {
        self.token_url.clone()
    }

    fn kind(&self) -> Kind {
        self.kind
    }
}

/// An Entra error body as a typed error; a body that is not Entra's shape falls back to
/// the generic HTTP status error.
pub fn error_of(status: u16, body: &[u8], retry_after: Option<Duration>) -> SourceError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let error = parsed
        .as_ref()
        .and_then(|v| v.get("error"))
        .and_then(Value::as_str);
    let Some(error) = error else {
        return SourceError::Status {
            status,
            message: parse::error_message(body),
            retry_after,
        };
    };
    let description = parsed
        .as_ref()
        .and_then(|v| v.get("error_description"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let code = parsed
        .as_ref()
        .and_then(|v| v.get("error_codes"))
        .and_then(Value::as_array)
        .and_then(|codes| codes.first())
        .and_then(Value::as_u64)
        .and_then(|c| u32::try_from(c).ok())
        .or_else(|| code_in(description));
    // Redacted whole, before they are cut short: a cut never keeps part of a credential.
    let description: String = redact::redact(description)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(1000)
        .collect();
    SourceError::Entra {
        status,
        code,
        error: redact::redact(error)
            .chars()
            .filter(|c| !c.is_control())
            .take(100)
            .collect(),
        description: description.trim().to_string(),
        retry_after,
    }
}

/// The number after the first `AADSTS` in a description.
fn code_in(text: &str) -> Option<u32> {
    let at = text.find("AADSTS")? + "AADSTS".len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_do_not_double_a_trailing_slash() {
        assert_eq!(
            scope("https://management.azure.com/"),
            "https://management.azure.com/.default"
        );
        assert_eq!(
            scope("https://vault.azure.net"),
            "https://vault.azure.net/.default"
        );
        assert_eq!(
            scope("499b84ac-1321-427f-aa17-267ca6975798"),
            "499b84ac-1321-427f-aa17-267ca6975798/.default"
        );
    }

    #[test]
    fn errors_are_classified_by_their_aadsts_code() {
        let body = |error: &str, code: u32| {
            format!(
                r#"{{"error":"{error}","error_description":"AADSTS{code}: words.\r\nTrace ID: x","error_codes":[{code}],"timestamp":"t"}}"#
            )
        };
        let class = |status, error, code| error_of(status, body(error, code).as_bytes(), None);
        assert_eq!(
            class(400, "invalid_resource", 500011).failure(),
            Failure::Refused
        );
        assert_eq!(
            class(400, "invalid_scope", 70011).failure(),
            Failure::Refused
        );
        for (status, error, code) in [
            (401, "invalid_client", 7000215),
            (400, "invalid_client", 700024),
            (401, "invalid_client", 700027),
            (400, "unauthorized_client", 700016),
            (400, "invalid_request", 90002),
            (400, "invalid_client", 7000299),
        ] {
            assert_eq!(
                class(status, error, code).failure(),
                Failure::Denied,
                "{code}"
            );
        }
        assert_eq!(
            class(400, "invalid_request", 900144).failure(),
            Failure::Refused
        );
        assert_eq!(
            class(503, "temporarily_unavailable", 0).failure(),
            Failure::Transient
        );
        assert_eq!(
            class(429, "invalid_client", 7000215).failure(),
            Failure::Transient
        );
        let e = class(401, "invalid_client", 7000215);
        let text = e.to_string();
        assert!(text.contains("AADSTS7000215") && text.contains("invalid_client"));
        assert!(!text.contains('\r') && !text.contains('\n'), "{text}");
        // Code only in the description; a body that is not Entra's.
        let e = error_of(
            401,
            br#"{"error":"invalid_client","error_description":"AADSTS700027: sig"}"#,
            None,
        );
        assert!(matches!(
            e,
            SourceError::Entra {
                code: Some(700027),
                ..
            }
        ));
        assert!(matches!(
            error_of(502, b"<html>", None),
            SourceError::Status { status: 502, .. }
        ));
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn token_file_errors_name_the_path_never_the_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("azure-identity-token");
        let e = read_token_file(&path, SECOND).unwrap_err().to_string();
        assert!(e.contains("azure-identity-token"), "{e}");
        std::fs::write(&path, " \n").unwrap();
        assert!(read_token_file(&path, SECOND)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        std::fs::write(&path, "abc.def.ghi\n").unwrap();
        assert_eq!(
            read_token_file(&path, SECOND).unwrap().as_str(),
            "abc.def.ghi"
        );
        // A file refused for what it holds: the message never shows it.
        for bad in [
            b"assertion-bytes\xff".to_vec(),
            [b"assertion-bytes".as_slice(), &[b'x'; 70 * 1024]].concat(),
            b"assertion-bytes".to_vec(),
            b"assertion.bytes.x.y".to_vec(),
            b"assertion.bytes.".to_vec(),
            b"assertion.by+es.sig".to_vec(),
            b"assertion.bytes.sig==".to_vec(),
        ] {
            std::fs::write(&path, &bad).unwrap();
            let e = read_token_file(&path, SECOND).unwrap_err().to_string();
            assert!(e.contains("azure-identity-token"), "names the path");
            assert!(!e.contains("assertion"), "never the contents");
        }
        std::fs::write(&path, "a.b").unwrap();
        let e = read_token_file(&path, SECOND).unwrap_err().to_string();
        assert!(e.ends_with("is not a JWT (three base64url parts separated by dots)"));
        // Read as every credential file is: a link to procfs is refused, not sent.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/proc/self/environ", &path).unwrap();
        let e = read_token_file(&path, SECOND).unwrap_err().to_string();
        assert!(
            e.ends_with(
                "azure-identity-token: is on procfs, a kernel interface: not a credential file"
            ),
            "{e}"
        );
    }

    /// A JWT-shaped service-account token for the tests (never a real one).
    fn sa_token(n: u32) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzYS17bn0ifQ.c2lnbmF0dXJl{n}"
        ))
    }

    /// An Entra source with a supplied credential, at a loopback port nothing listens on:
    /// a request would fail as unreachable, so a credential error means none was sent.
    fn supplied_source(supplied: &Arc<Supplied>) -> Entra {
        let settings = Settings {
            tenant: "72f988bf-86f1-41af-91ab-2d7cd011db47".into(),
            client_id: "00000000-0000-0000-0000-0000000000c1".into(),
            credential: Credential::Supplied(supplied.clone()),
            ca: Vec::new(),
        };
        Entra::new(Kind::WorkloadIdentity, "http://127.0.0.1:9/", &settings).unwrap()
    }

    /// The form's `client_assertion`, decoded.
    fn assertion_of(form: &str) -> String {
        let (_, value) = form
            .split('&')
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| *k == "client_assertion")
            .unwrap_or(("", ""));
        percent_encoding::percent_decode_str(value)
            .decode_utf8_lossy()
            .into_owned()
    }

    #[test]
    fn a_supplied_credential_sends_the_service_account_token_set() {
        let supplied = Arc::new(Supplied::new());
        let source = supplied_source(&supplied);
        let far = now_ms() + 3_600_000;
        supplied.set(Some((sa_token(1), far)));
        let (form, _known) = source.form("https://vault.azure.net", SECOND).unwrap();
        assert_eq!(assertion_of(&form), *sa_token(1));
        assert!(form.contains(&format!(
            "client_assertion_type={}",
            utf8_percent_encode(ASSERTION_TYPE, FORM)
        )));
        // The one set last is sent (the driver decides which is the newest).
        supplied.set(Some((sa_token(4), far + 1_000)));
        assert_eq!(supplied.expires_at_ms(), Some(far + 1_000));
        let (form, _known) = source.form("https://vault.azure.net", SECOND).unwrap();
        assert_eq!(assertion_of(&form), *sa_token(4));
        // Held: scrubbed from any text from outside; never in Debug.
        let text = format!("echo: {}", sa_token(4).as_str());
        assert!(!crate::known::scrub(&text).contains(sa_token(4).as_str()));
        let shown = format!("{:?}", Credential::Supplied(supplied.clone()));
        assert!(
            !shown.contains("eyJ") && shown.contains("redacted"),
            "{shown}"
        );
    }

    #[test]
    fn without_a_valid_service_account_token_no_request_is_sent() {
        let supplied = Arc::new(Supplied::new());
        let source = supplied_source(&supplied);
        let no_token = |e: SourceError| {
            assert_eq!(e.failure(), Failure::Invalid, "{e}");
            let text = e.to_string();
            assert!(
                text.starts_with("no valid service-account token held: waiting for the kubelet's next NodePublishVolume"),
                "{text}"
            );
            text
        };
        let e = source
            .fetch_once("https://vault.azure.net", SECOND)
            .unwrap_err();
        assert!(no_token(e).ends_with("(none was handed over)"));
        assert_eq!(format!("{supplied:?}"), "Supplied(none held)");
        // Expired by the wall clock: refused the same way.
        supplied.set(Some((sa_token(5), now_ms() - 61_000)));
        let e = source
            .fetch_once("https://vault.azure.net", SECOND)
            .unwrap_err();
        assert!(no_token(e).ends_with("(the newest expired 61 s ago)"));
        // A valid one is sent (to nowhere here: unreachable, so it was a request).
        supplied.set(Some((sa_token(6), now_ms() + 600_000)));
        let e = source
            .fetch_once("https://vault.azure.net", SECOND)
            .unwrap_err();
        assert!(e.is_connection_level(), "{e}");
        // Cleared: none held, no longer scrubbed.
        supplied.clear();
        assert_eq!(supplied.expires_at_ms(), None);
        let e = source
            .fetch_once("https://vault.azure.net", SECOND)
            .unwrap_err();
        no_token(e);
        let text = format!("echo: {}", sa_token(6).as_str());
        assert_eq!(crate::known::scrub(&text), text);
    }
}
