//! The emulator's Azure Container Registry side, served beside whichever token protocol it
//! speaks (point `--acr-endpoint REGISTRY=http://ADDR` at it; the `service` form field names
//! the registry):
//!
//! - `POST /oauth2/exchange` (`grant_type=access_token`, `service`, `tenant`,
//!   `access_token`): checks the Entra token's `aud` (the registry audience or an ARM one),
//!   its expiry and that its `tid` is `tenant`, then answers `{"refresh_token"}`, an
//!   unsigned JWT whose `exp` is [`Emulator::set_acr_ttl`] away (3 hours by default);
//! - `POST /oauth2/token` with `grant_type=refresh_token` (`service`, `scope`,
//!   `refresh_token`): a refresh token this emulator issued for that service, to
//!   `{"access_token"}` scoped to the `scope`'s repository; or `GET /oauth2/token?service=
//!   &scope=` with that refresh token as Basic auth's password for the null GUID user (what
//!   docker sends with a credential helper's user name other than `<token>`); other
//!   `/oauth2/token` requests are the token protocol's;
//! - `GET /v2/`: 401 with `WWW-Authenticate: Bearer realm=...,service=...` (the registry it
//!   last issued a refresh token for, else its own address) without an access token it
//!   issued, `{}` with one.
//!
//! Faults come from the same queue as the token protocol's (a second emulator serving the
//! registry keeps them apart): a status, a hang, a reset, garbage, `Echo`, `Fields` and the
//! raw ones, answered with a fresh refresh token's body where one is needed.
//!
//! [`Emulator::set_acr_ttl`]: super::Emulator::set_acr_ttl

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::action::{common_fault, ok, Action};
use super::form::params_lossy;
use super::{decode_claims, faults, now_secs, Fault, Shared, NOTICE};
use crate::httpserver::Request;

/// Who issues the emulator's registry tokens (their `iss`).
const ISSUER: &str = "Azure Container Registry (cstokenfs emulator)";
/// Default refresh-token lifetime: ACR's (about 3 hours).
pub(super) const DEFAULT_TTL_SECS: u64 = 3 * 3600;
/// Lifetime of repository-scoped access tokens.
const ACCESS_TTL_SECS: u64 = 300;
/// The Entra audiences a registry accepts (with or without a trailing slash).
const ACCEPTED_AUDIENCES: [&str; 4] = [
    "https://containerregistry.azure.net",
    "https://management.azure.com",
    "https://management.chinacloudapi.cn",
    "https://management.usgovcloudapi.net",
];

/// What the registry side counts and remembers (atomics, and a lock of its own for the
/// audiences list, taken for one push or one copy).
pub(super) struct AcrState {
    /// Refresh-token lifetime, seconds.
    ttl: AtomicU64,
    /// `/oauth2/exchange` requests received.
    exchanges: AtomicU64,
    /// Refresh tokens issued.
    issued: AtomicU64,
    /// `/oauth2/token` refresh-token requests received.
    tokens: AtomicU64,
    /// The `aud` of each Entra token presented to `/oauth2/exchange`, in order.
    audiences: Mutex<Vec<String>>,
    /// The registry (`service`) of the last refresh token issued: what the `/v2/` challenge
    /// names, as the registry the client was sent to would.
    service: Mutex<Option<String>>,
}

impl Default for AcrState {
    fn default() -> AcrState {
        AcrState {
            ttl: AtomicU64::new(DEFAULT_TTL_SECS),
            exchanges: AtomicU64::new(0),
            issued: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            audiences: Mutex::new(Vec::new()),
            service: Mutex::new(None),
        }
    }
}

impl AcrState {
    pub(super) fn set_ttl(&self, secs: u64) {
        self.ttl.store(secs, SeqCst);
    }
    pub(super) fn exchanges(&self) -> u64 {
        self.exchanges.load(SeqCst)
    }
    pub(super) fn issued(&self) -> u64 {
        self.issued.load(SeqCst)
    }
    pub(super) fn tokens(&self) -> u64 {
        self.tokens.load(SeqCst)
    }
    pub(super) fn audiences(&self) -> Vec<String> {
        self.audiences.lock().clone()
    }
    pub(super) fn reset(&self) {
        self.exchanges.store(0, SeqCst);
        self.issued.store(0, SeqCst);
        self.tokens.store(0, SeqCst);
        self.audiences.lock().clear();
    }
}

/// Which registry route a request is for.
pub(super) enum Route {
    Exchange,
    Token,
    Challenge,
}

/// The registry route of `req`, if it is one (before any latency or fault).
pub(super) fn route(req: &Request) -> Option<Route> {
    let path = req.target.split('?').next().unwrap_or_default();
    match (req.method.as_str(), path) {
        ("POST", "/oauth2/exchange") => Some(Route::Exchange),
        ("POST", "/oauth2/token") => {
            let form = params_lossy(&req.body);
            (form.get("grant_type").map(String::as_str) == Some("refresh_token"))
                .then_some(Route::Token)
        }
        // docker's way with a helper's user name other than `<token>`: the refresh token as
        // the password of Basic auth, `service` and `scope` in the query.
        ("GET", "/oauth2/token") => basic_refresh(req).is_some().then_some(Route::Token),
        ("GET" | "HEAD", "/v2" | "/v2/") => Some(Route::Challenge),
        _ => None,
    }
}

/// The answer to a registry request: faults first (every route, the challenge too), then the
/// registry's.
pub(super) fn answer(sh: &Shared, req: &Request, route: Route) -> Action {
    let mut form = params_lossy(&req.body);
    if let Some(refresh) = basic_refresh(req) {
        let query = req.target.split_once('?').map_or("", |(_, q)| q);
        form = params_lossy(query.as_bytes());
        form.insert("refresh_token".into(), refresh);
    }
    let action = match route {
        Route::Challenge => with_faults(sh, req, &form, &|| challenge(sh, req)),
        Route::Exchange => {
            sh.acr.exchanges.fetch_add(1, SeqCst);
            with_faults(sh, req, &form, &|| exchange(sh, &form))
        }
        Route::Token => {
            sh.acr.tokens.fetch_add(1, SeqCst);
            with_faults(sh, req, &form, &|| token(sh, &form))
        }
    };
    log::debug!(
        "emulator: registry {} {} service={:?} -> {}",
        req.method,
        req.target.split('?').next().unwrap_or_default(),
        form.get("service").map(String::as_str).unwrap_or_default(),
        match &action {
            Action::Respond { status, .. } => status.to_string(),
            Action::Raw(_) => "raw fault".into(),
            Action::Hang => "hang".into(),
            Action::Close => "reset".into(),
        }
    );
    action
}

/// The next fault (queued, else sticky) applied to what `normal` answers.
fn with_faults(
    sh: &Shared,
    req: &Request,
    form: &BTreeMap<String, String>,
    normal: &dyn Fn() -> Action,
) -> Action {
    let fault = sh
        .faults
        .lock()
        .pop_front()
        .or_else(|| sh.sticky.lock().clone());
    let Some(fault) = fault else {
        return normal();
    };
    if let Some(action) = common_fault(&fault) {
        return action;
    }
    match fault {
        Fault::Echo { code, body } => Action::Respond {
            status: code,
            body: faults::echo(&body, &req.body, form).into_bytes(),
            headers: Vec::new(),
        },
        Fault::Fields(fields) => {
            faults::merge_fields(normal(), &fields).unwrap_or_else(|action| action)
        }
        Fault::MissingAccessToken => ok(b"{}".to_vec()),
        Fault::EmptyAccessToken => ok(br#"{"refresh_token":""}"#.to_vec()),
        f @ (Fault::HugeBody { .. }
        | Fault::Http09
        | Fault::BadStatusLine
        | Fault::BadContentLength
        | Fault::OversizedHead
        | Fault::SlowBody { .. }
        | Fault::EndlessBody) => match normal() {
            Action::Respond { body, .. } => Action::Raw(faults::raw(&f, body)),
            other => other,
        },
        Fault::ExpiresOn(_)
        | Fault::Status { .. }
        | Fault::Hang
        | Fault::Reset
        | Fault::Garbage => normal(),
    }
}

/// The password of a GET's `Authorization: Basic` whose user is the null GUID ACR names a
/// refresh token's user by: the refresh token.
fn basic_refresh(req: &Request) -> Option<String> {
    use base64::engine::general_purpose::STANDARD;
    if req.method != "GET" {
        return None;
    }
    let basic = req.header("authorization")?.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(STANDARD.decode(basic.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    (user == crate::token::REGISTRY_USERNAME).then(|| password.to_string())
}

/// ACR's error shape: `{"errors":[{"code","message","detail":null}]}`.
fn refuse(status: u16, code: &str, message: &str) -> Action {
    let body = json!({"errors": [{"code": code, "message": message, "detail": null}]});
    Action::Respond {
        status,
        body: body.to_string().into_bytes(),
        headers: Vec::new(),
    }
}

fn field<'a>(form: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    form.get(name).map(String::as_str).filter(|v| !v.is_empty())
}

/// `/oauth2/exchange`: an Entra token for a refresh token.
fn exchange(sh: &Shared, form: &BTreeMap<String, String>) -> Action {
    if field(form, "grant_type") != Some("access_token") {
        return refuse(400, "UNSUPPORTED", "grant_type must be access_token");
    }
    let (Some(service), Some(access_token)) = (field(form, "service"), field(form, "access_token"))
    else {
        return refuse(400, "BAD_REQUEST", "service and access_token are required");
    };
    let Some(claims) = decode_claims(access_token) else {
        return refuse(401, "UNAUTHORIZED", "the access token is not a JWT");
    };
    let aud = claims
        .get("aud")
        .and_then(Value::as_str)
        .unwrap_or_default();
    sh.acr.audiences.lock().push(aud.to_string());
    let accepted = ACCEPTED_AUDIENCES
        .iter()
        .any(|a| aud.strip_suffix('/').unwrap_or(aud) == *a);
    if !accepted {
        return refuse(
            401,
            "UNAUTHORIZED",
            &format!("audience {aud} is not accepted"),
        );
    }
    let now = now_secs();
    if claims.get("exp").and_then(Value::as_u64).unwrap_or(0) <= now {
        return refuse(401, "UNAUTHORIZED", "the access token has expired");
    }
    let tid = claims
        .get("tid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match field(form, "tenant") {
        None => return refuse(400, "BAD_REQUEST", "tenant is required"),
        Some(tenant) if !tenant.eq_ignore_ascii_case(tid) => {
            return refuse(
                401,
                "UNAUTHORIZED",
                "the access token's tenant is not the one named",
            )
        }
        Some(_) => {}
    }
    let exp = now.saturating_add(sh.acr.ttl.load(SeqCst));
    let serial = sh.serial.fetch_add(1, SeqCst) + 1;
    sh.acr.issued.fetch_add(1, SeqCst);
    *sh.acr.service.lock() = Some(service.to_string());
    let refresh = unsigned_jwt(&json!({
        "jti": format!("acr-{serial}"),
        "sub": claims.get("oid").cloned().unwrap_or(Value::Null),
        "nbf": now,
        "iat": now,
        "exp": exp,
        "iss": ISSUER,
        "aud": service,
        "version": "1.0",
        "grant_type": "refresh_token",
        "tenant": tid,
        "permissions": {"actions": ["read", "write", "delete"]},
        "roles": [],
        "serial": serial,
        "emulator": NOTICE,
    }));
    ok(json!({ "refresh_token": refresh }).to_string().into_bytes())
}

/// `/oauth2/token`: a refresh token this emulator issued for a repository-scoped token.
fn token(_sh: &Shared, form: &BTreeMap<String, String>) -> Action {
    let (Some(service), Some(refresh)) = (field(form, "service"), field(form, "refresh_token"))
    else {
        return refuse(400, "BAD_REQUEST", "service and refresh_token are required");
    };
    let claims = decode_claims(refresh).unwrap_or_default();
    let issued_here = claims.get("iss").and_then(Value::as_str) == Some(ISSUER)
        && claims.get("grant_type").and_then(Value::as_str) == Some("refresh_token");
    if !issued_here {
        return refuse(401, "UNAUTHORIZED", "not a refresh token of this registry");
    }
    if claims.get("aud").and_then(Value::as_str) != Some(service) {
        return refuse(
            401,
            "UNAUTHORIZED",
            "the refresh token is for another registry",
        );
    }
    let now = now_secs();
    if claims.get("exp").and_then(Value::as_u64).unwrap_or(0) <= now {
        return refuse(401, "UNAUTHORIZED", "the refresh token has expired");
    }
    // `repository:NAME:pull,push` (several scopes separated by spaces).
    let access: Vec<Value> = field(form, "scope")
        .unwrap_or_default()
        .split(' ')
        .filter_map(|scope| {
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            let actions: Vec<&str> = actions.split(',').filter(|a| !a.is_empty()).collect();
            Some(json!({"type": kind, "name": name, "actions": actions}))
        })
        .collect();
    let token = unsigned_jwt(&json!({
        "jti": format!("acr-access-{now}"),
        "sub": claims.get("sub").cloned().unwrap_or(Value::Null),
        "nbf": now,
        "iat": now,
        "exp": now.saturating_add(ACCESS_TTL_SECS),
        "iss": ISSUER,
        "aud": service,
        "version": "1.0",
        "access": access,
        "emulator": NOTICE,
    }));
    ok(json!({ "access_token": token }).to_string().into_bytes())
}

/// `GET /v2/`: the Bearer challenge, or `{}` for an access token this emulator issued.
fn challenge(sh: &Shared, req: &Request) -> Action {
    let host = req
        .headers
        .iter()
        .find(|(k, _)| k == "host")
        .map_or_else(|| req.local.to_string(), |(_, v)| v.clone());
    // The registry this emulator stands in for, once it issued a refresh token for it.
    let service = sh
        .acr
        .service
        .lock()
        .clone()
        .unwrap_or_else(|| host.clone());
    let bearer = req
        .headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .and_then(|(_, v)| v.strip_prefix("Bearer "))
        .and_then(decode_claims);
    let valid = bearer.is_some_and(|c| {
        c.get("iss").and_then(Value::as_str) == Some(ISSUER)
            && c.get("access").is_some()
            && c.get("exp").and_then(Value::as_u64).unwrap_or(0) > now_secs()
    });
    if valid {
        return ok(b"{}".to_vec());
    }
    let mut action = refuse(
        401,
        "UNAUTHORIZED",
        "authentication required, visit https://aka.ms/acr/authorization for more information.",
    );
    if let Action::Respond { headers, .. } = &mut action {
        headers.push((
            "WWW-Authenticate",
            format!("Bearer realm=\"http://{host}/oauth2/token\",service=\"{service}\""),
        ));
    }
    action
}

/// An unsigned JWT (`alg: none`) with these claims.
fn unsigned_jwt(claims: &Value) -> String {
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::{Emulator, EmulatorConfig, TEST_TENANT_ID};

    fn post(emu: &Emulator, path: &str, form: &[(&str, &str)]) -> (u16, Value) {
        crate::source::client_tls::ensure_provider();
        let body: String = form
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
                )
            })
            .collect::<Vec<_>>()
            .join("&");
        let answer = reqwest::blocking::Client::new()
            .post(format!("http://{}{path}", emu.addr()))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .unwrap();
        let status = answer.status().as_u16();
        let body = answer.bytes().unwrap_or_default();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    fn entra(aud: &str, tid: &str, exp: u64) -> String {
        unsigned_jwt(&json!({"aud": aud, "tid": tid, "exp": exp, "oid": "o"}))
    }

    #[test]
    fn the_exchange_checks_audience_tenant_and_expiry_and_the_token_its_refresh_token() {
        let emu =
            Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default()).unwrap();
        emu.set_acr_ttl(600);
        let later = now_secs() + 600;
        let exchange = |token: &str, tenant: &str| {
            post(
                &emu,
                "/oauth2/exchange",
                &[
                    ("grant_type", "access_token"),
                    ("service", "r.azurecr.io"),
                    ("tenant", tenant),
                    ("access_token", token),
                ],
            )
        };
        let t = TEST_TENANT_ID;
        for (token, tenant, want) in [
            (entra("https://vault.azure.net", t, later), t, 401),
            (
                entra("https://management.azure.com/", "other", later),
                t,
                401,
            ),
            (entra("https://management.azure.com/", t, 1), t, 401),
            (entra("https://management.azure.com/", t, later), "", 400),
        ] {
            let (status, body) = exchange(&token, tenant);
            assert_eq!(status, want, "{body}");
            assert!(body["errors"][0]["code"].is_string(), "{body}");
        }
        let (status, body) = exchange(&entra("https://containerregistry.azure.net/", t, later), t);
        assert_eq!(status, 200, "{body}");
        let refresh = body["refresh_token"].as_str().unwrap().to_string();
        let claims = decode_claims(&refresh).unwrap();
        assert_eq!(claims["aud"], "r.azurecr.io");
        let exp = claims["exp"].as_u64().unwrap();
        assert!(
            (now_secs() + 590..=now_secs() + 600).contains(&exp),
            "{exp}"
        );
        assert_eq!(emu.acr_exchanges(), 5);
        assert_eq!(emu.acr_refresh_tokens_issued(), 1);

        let token = |service: &str, refresh: &str| {
            post(
                &emu,
                "/oauth2/token",
                &[
                    ("grant_type", "refresh_token"),
                    ("service", service),
                    ("scope", "repository:a/b:pull,push"),
                    ("refresh_token", refresh),
                ],
            )
        };
        let (status, body) = token("r.azurecr.io", &refresh);
        assert_eq!(status, 200, "{body}");
        let access = decode_claims(body["access_token"].as_str().unwrap()).unwrap();
        assert_eq!(
            access["access"],
            json!([{"type": "repository", "name": "a/b", "actions": ["pull", "push"]}])
        );
        assert_eq!(token("s.azurecr.io", &refresh).0, 401, "another registry's");
        let forged = entra("r.azurecr.io", t, later);
        assert_eq!(token("r.azurecr.io", &forged).0, 401, "not issued here");
        // A Cloud Shell request on the same path is still the token protocol's.
        let (status, body) = post(
            &emu,
            "/oauth2/token",
            &[("resource", "https://management.azure.com/")],
        );
        assert!(
            status == 400 || body["access_token"].is_string(),
            "{status} {body}"
        );
        assert_eq!(emu.acr_token_requests(), 3);
    }

    #[test]
    fn docker_asks_with_basic_auth_after_the_challenge_and_faults_reach_the_challenge() {
        use base64::engine::general_purpose::STANDARD;
        let emu =
            Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default()).unwrap();
        crate::source::client_tls::ensure_provider();
        let client = reqwest::blocking::Client::new();
        let challenge = || {
            let a = client
                .get(format!("http://{}/v2/", emu.addr()))
                .send()
                .unwrap();
            let header = a.headers().get("www-authenticate").cloned();
            (
                a.status().as_u16(),
                header.map(|h| h.to_str().unwrap().to_string()),
            )
        };
        let later = now_secs() + 3600;
        let (_, body) = post(
            &emu,
            "/oauth2/exchange",
            &[
                ("grant_type", "access_token"),
                ("service", "r.azurecr.io"),
                ("tenant", TEST_TENANT_ID),
                (
                    "access_token",
                    &entra("https://management.azure.com/", TEST_TENANT_ID, later),
                ),
            ],
        );
        let refresh = body["refresh_token"].as_str().unwrap().to_string();
        let (status, header) = challenge();
        assert_eq!(status, 401);
        assert!(header.unwrap().ends_with("service=\"r.azurecr.io\""));
        let basic = |user: &str| {
            let auth = STANDARD.encode(format!("{user}:{refresh}"));
            client
                .get(format!(
                    "http://{}/oauth2/token?service=r.azurecr.io&scope=repository:a/b:pull",
                    emu.addr()
                ))
                .header("Authorization", format!("Basic {auth}"))
                .send()
                .unwrap()
        };
        let got = basic(crate::token::REGISTRY_USERNAME);
        assert_eq!(got.status().as_u16(), 200);
        let body: Value = serde_json::from_slice(&got.bytes().unwrap()).unwrap();
        let access = decode_claims(body["access_token"].as_str().unwrap()).unwrap();
        assert_eq!(access["aud"], "r.azurecr.io");
        assert_ne!(
            basic("someone").status().as_u16(),
            200,
            "the null GUID user only"
        );
        emu.push_fault(Fault::Status {
            code: 503,
            body: "{}".into(),
            retry_after: None,
        });
        assert_eq!(challenge().0, 503, "the challenge takes faults too");
    }
}
