//! ACR's token exchange, one request: `POST https://REGISTRY/oauth2/exchange` with
//! `grant_type=access_token`, `service=REGISTRY`, `tenant` and the Entra `access_token`,
//! answered `{"refresh_token": "<JWT>"}`. The refresh token's expiry is its own `exp`.
//! Retries and caching are the cache's (`cache/acr.rs`).

use super::Registries;
use crate::policy::EpochMs;
use crate::source::http::{self, Answer};
use crate::source::{ConfigError, SourceError};
use crate::token::Token;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use reqwest::blocking::Client;
use std::collections::HashMap;
use std::time::Duration;
use zeroize::Zeroizing;

/// The HTTP clients of the registries: one for HTTPS to real registries (system roots,
/// proxies from the environment), one per loopback `--acr-endpoint` (no proxy). No client
/// follows a redirect (it would carry the Entra token elsewhere).
pub struct Exchanger {
    registries: Registries,
    remote: Client,
    local: HashMap<String, Client>,
}

impl Exchanger {
    pub fn new(registries: Registries) -> Result<Exchanger, ConfigError> {
        let any = reqwest::Url::parse("https://registry.azurecr.io/")
            .map_err(|e| ConfigError::Client(e.to_string()))?;
        let remote = http::client(&any, &[])?;
        let mut local = HashMap::new();
        for (host, url) in registries.endpoints() {
            local.insert(host.to_string(), http::client(url, &[])?);
        }
        Ok(Exchanger {
            registries,
            remote,
            local,
        })
    }

    pub fn registries(&self) -> &Registries {
        &self.registries
    }

    /// Where `host`'s exchange is sent, for logs (never a secret).
    pub fn shown(&self, host: &str) -> String {
        self.registries
            .base_url(host)
            .and_then(|u| u.join("oauth2/exchange").ok())
            .map_or_else(|| host.to_string(), |u| u.to_string())
    }

    /// One exchange of `entra_token` (of tenant `tenant`, if known) for `host`'s refresh
    /// token, answering within `timeout`.
    pub fn exchange(
        &self,
        host: &str,
        entra_token: &str,
        tenant: Option<&str>,
        timeout: Duration,
    ) -> Result<Token, SourceError> {
        if self.registries.host_of(host).is_none() {
            return Err(SourceError::Credential(format!(
                "{host} is not a registry an Entra token may be sent to"
            )));
        }
        let url = self
            .registries
            .base_url(host)
            .and_then(|u| u.join("oauth2/exchange").ok())
            .ok_or_else(|| SourceError::Credential(format!("{host}: no exchange URL")))?;
        let client = self.local.get(host).unwrap_or(&self.remote);
        let mut form = Zeroizing::new(String::with_capacity(entra_token.len() + 256));
        let mut add = |key: &str, value: &str| {
            if !form.is_empty() {
                form.push('&');
            }
            form.push_str(key);
            form.push('=');
            form.extend(utf8_percent_encode(value, NON_ALPHANUMERIC));
        };
        add("grant_type", "access_token");
        add("service", host);
        if let Some(tenant) = tenant {
            add("tenant", tenant);
        }
        add("access_token", entra_token);
        let request = client
            .post(url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(form.as_bytes().to_vec())
            .timeout(timeout);
        let requested_at = crate::policy::now_ms();
        let response = request.send().map_err(http::transport_error)?;
        let answer = http::read_answer(response)?;
        if !(200..300).contains(&answer.status) {
            return Err(registry_error(&answer));
        }
        refresh_token_of(&answer.body, requested_at)
    }
}

/// A registry's refusal: its status and its own words (`{"errors":[{"code","message"}]}`),
/// redacted here, while the Entra token sent is still registered for scrubbing (it may not
/// be held once the error is shown), and again when shown (`SourceError`'s `Display`).
fn registry_error(answer: &Answer) -> SourceError {
    let words = serde_json::from_slice::<serde_json::Value>(&answer.body)
        .ok()
        .and_then(|v| {
            let first = v.get("errors")?.get(0)?.clone();
            let code = first.get("code").and_then(|c| c.as_str()).unwrap_or("");
            let message = first.get("message").and_then(|m| m.as_str()).unwrap_or("");
            Some(
                format!("{code}: {message}")
                    .trim_matches([' ', ':'])
                    .to_string(),
            )
        })
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| crate::source::parse::error_message(&answer.body));
    SourceError::Status {
        status: answer.status,
        message: crate::source::redact::redact(&format!(
            "the registry refused the exchange: {words}"
        )),
        retry_after: answer.retry_after,
    }
}

/// The refresh token of a 2xx answer, its expiry from its own `exp` claim (and its start
/// from `iat` or `nbf`).
pub fn refresh_token_of(body: &[u8], requested_at: EpochMs) -> Result<Token, SourceError> {
    #[derive(serde::Deserialize)]
    struct Exchanged {
        refresh_token: Option<String>,
    }
    let bad = |why: &str| SourceError::BadResponse(why.to_string());
    let answer: Exchanged = serde_json::from_slice(body)
        .map_err(|_| bad("the registry's answer is not a JSON object with refresh_token"))?;
    let refresh = Zeroizing::new(answer.refresh_token.unwrap_or_default());
    if refresh.is_empty() {
        return Err(bad("the registry's answer has no refresh_token"));
    }
    let claims = crate::claims::payload(&refresh)
        .ok_or_else(|| bad("the registry's refresh token is not a JWT"))?;
    let seconds = |name: &str| {
        claims
            .get(name)
            .and_then(|v| v.as_i64().or_else(|| v.as_f64().map(|f| f as i64)))
            .map(|s| s.saturating_mul(1000))
    };
    let expires_on =
        seconds("exp").ok_or_else(|| bad("the registry's refresh token has no exp"))?;
    if expires_on <= requested_at {
        return Err(bad(
            "the registry issued a refresh token that is already expired",
        ));
    }
    Ok(Token {
        access_token: refresh,
        token_type: "Bearer".into(),
        expires_on,
        refresh_in_ms: None,
        not_before: seconds("iat").or_else(|| seconds("nbf")),
    })
}

/// The `tid` claim of an Entra token, if it has one.
pub fn tenant_of(entra_token: &str) -> Option<String> {
    crate::claims::payload(entra_token)?
        .get("tid")?
        .as_str()
        .filter(|t| !t.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;

    fn jwt(claims: &str) -> String {
        format!(
            "{}.{}.sig",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(claims)
        )
    }

    #[test]
    fn the_refresh_tokens_expiry_is_its_own_exp() {
        let t = jwt(r#"{"exp":2000000000,"iat":1999989200}"#);
        let body = format!(r#"{{"refresh_token":"{t}"}}"#);
        let token = refresh_token_of(body.as_bytes(), 1_999_989_200_000).unwrap();
        assert_eq!(token.expires_on, 2_000_000_000_000);
        assert_eq!(token.not_before, Some(1_999_989_200_000));
        assert_eq!(token.access_token.as_str(), t);
        for bad in [
            "nonsense".to_string(),
            "{}".to_string(),
            r#"{"refresh_token":""}"#.to_string(),
            r#"{"refresh_token":"opaque"}"#.to_string(),
            format!(r#"{{"refresh_token":"{}"}}"#, jwt(r#"{"iat":1}"#)),
            format!(r#"{{"refresh_token":"{}"}}"#, jwt(r#"{"exp":1}"#)),
        ] {
            let e = refresh_token_of(bad.as_bytes(), 1_000_000).unwrap_err();
            assert!(matches!(e, SourceError::BadResponse(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn a_registrys_refusal_keeps_its_words_and_never_a_token() {
        let token = jwt(r#"{"exp":2000000000,"tid":"t"}"#);
        let body =
            format!(r#"{{"errors":[{{"code":"UNAUTHORIZED","message":"bad token {token}"}}]}}"#);
        let e = registry_error(&Answer {
            status: 401,
            retry_after: None,
            www_authenticate: None,
            body: Zeroizing::new(body.into_bytes()),
        });
        let shown = e.to_string();
        assert!(
            shown.contains("HTTP 401") && shown.contains("UNAUTHORIZED"),
            "{shown}"
        );
        assert!(!shown.contains(&token), "{shown}");
        assert_eq!(e.failure(), crate::source::Failure::Denied);
        assert_eq!(tenant_of(&token).as_deref(), Some("t"));
        assert_eq!(tenant_of("opaque"), None);
    }
}
