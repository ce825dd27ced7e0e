//! TLS for the Microsoft Entra upstreams: rustls (through reqwest) with ring as the crypto
//! provider, verifying against the system's trust store plus `--ca-file`; the authority's
//! URL rules and loopback test. The client itself is `http::client`, the same for every
//! upstream (proxies as reqwest reads them from the environment, never for a local host;
//! redirects never followed).

use super::ConfigError;
use reqwest::{Certificate, Url};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Once;

/// The authority when neither `--authority-host` nor `AZURE_AUTHORITY_HOST` says otherwise.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com/";

/// The most a `--ca-file` may hold: a bundle of CAs (the system's is about 200 KiB).
const MAX_CA_FILE: usize = 4 * 1024 * 1024;

/// Makes ring rustls' process-wide crypto provider, once; every reqwest client (plain
/// http ones too) needs one before it is built.
pub fn ensure_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err only when a provider is already installed: that one is used.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The CA certificates of a PEM file (`--ca-file`), added to the system's roots.
pub fn ca_certificates(path: &Path) -> Result<Vec<Certificate>, ConfigError> {
    let bad = |problem: String| ConfigError::File {
        what: "--ca-file",
        path: path.display().to_string(),
        problem,
    };
    let pem = crate::hardening::read_credential_file(path, MAX_CA_FILE)
        .map_err(|e| bad(e.to_string()))?;
    let certs = Certificate::from_pem_bundle(&pem)
        .map_err(|e| bad(format!("is not a PEM certificate bundle: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate (BEGIN CERTIFICATE)".into()));
    }
    Ok(certs)
}

/// `{authority}/{tenant}/oauth2/v2.0/token`. The authority must be `https://`, or
/// `http://` to a loopback host (tests, the emulator); a tenant is a GUID or a domain.
pub fn token_url(authority: &str, tenant: &str) -> Result<Url, ConfigError> {
    let bad = |problem: &str| ConfigError::Url {
        url: authority.to_string(),
        problem: problem.to_string(),
    };
    let base = Url::parse(authority).map_err(|e| bad(&format!("is malformed: {e}")))?;
    if base.host_str().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    match base.scheme() {
        "https" => {}
        "http" if is_loopback(&base) => {}
        "http" => return Err(bad("must be https:// (http:// only to a loopback host)")),
        _ => return Err(bad("must start with https://")),
    }
    if !base.username().is_empty() || base.password().is_some() {
        return Err(bad("must not carry a user name or password"));
    }
    if base.query().is_some() || base.fragment().is_some() {
        return Err(bad("must not have a query or fragment"));
    }
    check_tenant(tenant)?;
    let text = format!(
        "{}/{tenant}/oauth2/v2.0/token",
        base.as_str().trim_end_matches('/')
    );
    Url::parse(&text).map_err(|e| bad(&format!("is malformed with the tenant: {e}")))
}

/// A tenant ID (GUID) or domain name: letters, digits, `-`, `.`, `_`, at most 255.
pub fn check_tenant(tenant: &str) -> Result<(), ConfigError> {
    let ok = !tenant.is_empty()
        && tenant.len() <= 255
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Missing(format!(
            "tenant ID {tenant:?} is not a GUID or domain name (letters, digits, '-', '.', '_')"
        )))
    }
}

/// Whether the URL's host is loopback (127.0.0.0/8, ::1, `localhost`).
pub fn is_loopback(url: &Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) => crate::net::is_loopback(ip),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_rules() {
        let t = "72f988bf-86f1-41af-91ab-2d7cd011db47";
        assert_eq!(
            token_url(DEFAULT_AUTHORITY, t).unwrap().as_str(),
            format!("https://login.microsoftonline.com/{t}/oauth2/v2.0/token")
        );
        assert_eq!(
            token_url(
                "https://login.microsoftonline.us",
                "contoso.onmicrosoft.com"
            )
            .unwrap()
            .as_str(),
            "https://login.microsoftonline.us/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert!(token_url("http://127.0.0.1:8080/", t).is_ok());
        assert!(token_url("http://localhost:8080", t).is_ok());
        assert!(token_url("http://[::1]:8080", t).is_ok());
        for bad in [
            "http://login.microsoftonline.com/",
            "http://10.0.0.1/",
            "ftp://127.0.0.1/",
            "nonsense",
            "https://u:p@login.example/",
            "https://login.example/?x=1",
        ] {
            assert!(token_url(bad, t).is_err(), "{bad}");
        }
        for bad in ["", "a/b", "x?y", "t e"] {
            assert!(token_url(DEFAULT_AUTHORITY, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_ca_file_without_certificates_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let e = ca_certificates(&path).unwrap_err().to_string();
        assert!(e.contains("--ca-file") && e.contains("ca.pem"), "{e}");
        assert!(ca_certificates(&dir.path().join("missing.pem")).is_err());
    }
}
