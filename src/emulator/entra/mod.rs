//! Microsoft Entra's v2 token endpoint, emulated: `POST /{tenant}/oauth2/v2.0/token` with
//! the client-credentials form; a client secret, a federated assertion (equal to the
//! federated token file's contents at request time, or matching one of the application's
//! federated identity credentials, [`Federated`]) or a certificate assertion (verified
//! against the client certificate) is accepted; answers and errors in Entra's shapes
//! (`{"token_type","expires_in","ext_expires_in","access_token"}`;
//! `{"error","error_description","error_codes",...}`).

use std::path::PathBuf;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use serde_json::json;

use super::action::{common_fault, ok, to_answer, Action};
use super::bodies::entra_body;
use super::faults;
use super::form::{params_lossy, params_strict};
use super::{decode_claims, now_secs, random_hex, Fault, Shared};
use crate::httpserver::{Answer, Request, Stop};
use crate::source::{assertion, entra::ASSERTION_TYPE};

mod command;
#[cfg(test)]
mod entra_tests;
pub use command::{command, EntraCommandError, EntraEmulatorArgs};

/// What the emulator accepts; `None` fields accept anything (any non-empty credential
/// when no credential is set).
#[derive(Clone, Default)]
pub struct EntraSettings {
    pub tenant: Option<String>,
    /// The applications accepted: one client ID, or several separated by commas (`None`:
    /// any).
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    /// Read at every request: an assertion must equal its contents, trimmed.
    pub federated_token_file: Option<PathBuf>,
    /// DER of the certificate whose key signs certificate assertions.
    pub client_certificate: Option<Vec<u8>>,
    /// Federated identity credentials, as an Entra application has them: an assertion
    /// presented for a client ID that has records must match one of them.
    pub federated: Vec<Federated>,
}

/// The audience Entra's federated identity credentials expect by default.
pub const FEDERATED_AUDIENCE: &str = "api://AzureADTokenExchange";

/// One federated identity credential of an application: an assertion presented for
/// `client_id` is accepted when its `iss` and `sub` are these, its `aud` (a string or an
/// array) holds `audience`, and its `exp` is still ahead. The assertion's signature is
/// NOT verified: the emulator cannot fetch the issuer's signing keys (a cluster's OIDC
/// discovery document and JWKS), so its claims are read as they are. A test tool only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Federated {
    pub client_id: String,
    pub issuer: String,
    pub subject: String,
    pub audience: String,
}

impl Federated {
    /// Whether unverified `claims` name this record's issuer, subject and audience.
    fn matches(&self, claims: &serde_json::Value) -> bool {
        let aud = &claims["aud"];
        let has_audience = match aud {
            serde_json::Value::String(a) => *a == self.audience,
            serde_json::Value::Array(all) => all.iter().any(|a| *a == *self.audience),
            _ => false,
        };
        claims["iss"] == *self.issuer && claims["sub"] == *self.subject && has_audience
    }
}

impl std::fmt::Debug for EntraSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EntraSettings")
            .field("tenant", &self.tenant)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<secret>"),
            )
            .field("federated_token_file", &self.federated_token_file)
            .field("client_certificate", &self.client_certificate.is_some())
            .field("federated", &self.federated)
            .finish()
    }
}

impl EntraSettings {
    fn any_credential(&self) -> bool {
        self.client_secret.is_none()
            && self.federated_token_file.is_none()
            && self.client_certificate.is_none()
            && self.federated.is_empty()
    }
}

/// An Entra error: `AADSTS<code>: <message>` and the trace lines, as Entra writes them.
pub(super) fn error(status: u16, error: &str, code: u32, message: &str) -> Action {
    let trace = random_hex(16).map(|h| h.to_string()).unwrap_or_default();
    let correlation = random_hex(16).map(|h| h.to_string()).unwrap_or_default();
    let timestamp = now_secs();
    let body = json!({
        "error": error,
        "error_description": format!(
            "AADSTS{code}: {message}\r\nTrace ID: {trace}\r\nCorrelation ID: {correlation}\r\nTimestamp: {timestamp}"
        ),
        "error_codes": [code],
        "timestamp": timestamp.to_string(),
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": format!("https://login.microsoftonline.invalid/error?code={code}"),
    });
    Action::Respond {
        status,
        body: body.to_string().into_bytes(),
        headers: Vec::new(),
    }
}

/// One request, start to end (route, latency, faults, checks, answer).
pub(super) async fn handle(sh: &Shared, req: &Request, stop: Stop) -> Answer {
    let target = req
        .target
        .split_once('?')
        .map_or(req.target.as_str(), |t| t.0);
    let segments: Vec<&str> = target.trim_start_matches('/').split('/').collect();
    let tenant = match segments.as_slice() {
        [t, "oauth2", "v2.0", "token"] if !t.is_empty() => (*t).to_string(),
        _ => return to_answer(error(404, "invalid_request", 90002, "No such endpoint.")),
    };
    if req.method != "POST" {
        return to_answer(error(
            405,
            "invalid_request",
            900561,
            "The endpoint only accepts POST requests.",
        ));
    }
    sh.requests.fetch_add(1, SeqCst);
    let params = params_lossy(&req.body);
    if let Some(scope) = params.get("scope") {
        let resource = scope.strip_suffix("/.default").unwrap_or(scope).to_string();
        *sh.per_resource.lock().entry(resource).or_insert(0) += 1;
    }
    if let Some(client_id) = params.get("client_id") {
        sh.record_entra(client_id, &params);
    }
    *sh.last_params.lock() = Some(params);
    let latency = Duration::from_nanos(sh.latency_ns.load(SeqCst));
    if !stop.sleep(latency).await {
        return Answer::Close;
    }
    let fault = sh
        .faults
        .lock()
        .pop_front()
        .or_else(|| sh.sticky.lock().clone());
    let action = match fault.as_ref().map(|f| (f, common_fault(f))) {
        None => answer(sh, req, &tenant),
        Some((Fault::Echo { code, body }, _)) => Action::Respond {
            status: *code,
            body: faults::echo(body, &req.body, &params_lossy(&req.body)).into_bytes(),
            headers: Vec::new(),
        },
        Some((_, Some(action))) => action,
        // Never dropped silently: a test that queues one must not pass without it.
        Some((f, None)) => error(
            500,
            "server_error",
            0,
            &format!("the Entra emulator does not inject {f:?}"),
        ),
    };
    if let Action::Hang = action {
        stop.stopped().await;
    }
    log::debug!(
        "emulator: POST /{tenant}/oauth2/v2.0/token -> {}",
        status_of(&action)
    );
    to_answer(action)
}

fn status_of(action: &Action) -> String {
    match action {
        Action::Respond { status, .. } => status.to_string(),
        _ => "other".into(),
    }
}

fn missing(name: &str) -> Action {
    let message = format!("The request body must contain the following parameter: '{name}'.");
    error(400, "invalid_request", 900144, &message)
}

fn answer(sh: &Shared, req: &Request, tenant: &str) -> Action {
    let Ok(form) = params_strict(&req.body) else {
        return error(
            400,
            "invalid_request",
            90014,
            "The request body is not a valid form.",
        );
    };
    let settings = sh.entra.lock().clone();
    if settings.tenant.as_deref().is_some_and(|t| t != tenant) {
        let message = format!(
            "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID."
        );
        return error(400, "invalid_request", 90002, &message);
    }
    match form.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {}
        Some(_) => {
            return error(
                400,
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type.",
            )
        }
        None => return missing("grant_type"),
    }
    let Some(client_id) = form.get("client_id").filter(|c| !c.is_empty()) else {
        return missing("client_id");
    };
    // Several applications: client IDs separated by commas (one federated credential each).
    if settings
        .client_id
        .as_ref()
        .is_some_and(|c| !c.split(',').any(|one| one.trim() == client_id))
    {
        let message =
            format!("Application with identifier '{client_id}' was not found in the directory.");
        return error(400, "unauthorized_client", 700016, &message);
    }
    let Some(scope) = form.get("scope") else {
        return missing("scope");
    };
    if let Err(refusal) = check_credential(&settings, &form, req, tenant, client_id) {
        return refusal;
    }
    let Some(resource) = scope.strip_suffix("/.default").filter(|r| !r.is_empty()) else {
        let message = format!("The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid.");
        return error(400, "invalid_scope", 70011, &message);
    };
    if !sh.audience_allowed(resource) {
        let message = format!("The resource principal named {resource} was not found in the tenant named {tenant}. This can happen if the application has not been installed by the administrator of the tenant.");
        return error(400, "invalid_resource", 500011, &message);
    }
    // The token tells which application asked (`appid`, `azp`), in which tenant (`tid`:
    // the path's when it is a GUID, as Entra's tokens carry the tenant's ID, not its name).
    let who = super::Who {
        client_id: client_id.clone(),
        object_id: None,
        resource_id: None,
        principal: super::claims::Principal::Application,
        tenant: crate::names::is_guid(tenant).then(|| tenant.to_ascii_lowercase()),
    };
    let issued = sh.issue_for(resource, Some(&who));
    ok(entra_body(&issued, &issued.token))
}

type Form = std::collections::BTreeMap<String, String>;

fn check_credential(
    settings: &EntraSettings,
    form: &Form,
    req: &Request,
    tenant: &str,
    client_id: &str,
) -> Result<(), Action> {
    let bad_secret = || {
        error(401, "invalid_client", 7000215, "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.")
    };
    if let Some(secret) = form.get("client_secret") {
        return match &settings.client_secret {
            Some(want) if crate::hardening::ct_eq(want.as_bytes(), secret.as_bytes()) => Ok(()),
            None if settings.any_credential() && !secret.is_empty() => Ok(()),
            _ => Err(bad_secret()),
        };
    }
    let Some(assertion) = form.get("client_assertion") else {
        return Err(error(401, "invalid_client", 7000216, "'client_assertion', 'client_secret' or 'request' is required for the 'client_credentials' grant type."));
    };
    if form.get("client_assertion_type").map(String::as_str) != Some(ASSERTION_TYPE) {
        return Err(error(
            400,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'client_assertion_type'.",
        ));
    }
    if settings.any_credential() && !assertion.is_empty() {
        return Ok(());
    }
    let now = now_secs();
    let no_record = || {
        error(
            400,
            "invalid_client",
            70021,
            "No matching federated identity record found for presented assertion.",
        )
    };
    let records: Vec<&Federated> = settings
        .federated
        .iter()
        .filter(|f| f.client_id == client_id)
        .collect();
    if !records.is_empty() {
        // Unverified: see `Federated`.
        let claims = decode_claims(assertion).ok_or_else(no_record)?;
        if !records.iter().any(|f| f.matches(&claims)) {
            return Err(no_record());
        }
        return match claims["exp"].as_u64() {
            Some(exp) if exp > now => Ok(()),
            exp => Err(expired(now, exp.unwrap_or(0))),
        };
    }
    if settings.federated_token_file.is_none() && settings.client_certificate.is_none() {
        // Only other applications have federated records.
        return Err(no_record());
    }
    if let Some(path) = &settings.federated_token_file {
        // Read as the daemon reads it: a FIFO there cannot hang the emulator either.
        let current =
            crate::hardening::read_credential_file(path, crate::hardening::MAX_SECRET_FILE)
                .unwrap_or_default();
        if crate::hardening::ct_eq(current.trim_ascii(), assertion.as_bytes()) {
            return match decode_claims(assertion).and_then(|c| c["exp"].as_u64()) {
                Some(exp) if exp <= now => Err(expired(now, exp)),
                _ => Ok(()),
            };
        }
        if settings.client_certificate.is_none() {
            return Err(error(
                400,
                "invalid_client",
                70021,
                "No matching federated identity record found for presented assertion.",
            ));
        }
    }
    let Some(cert) = &settings.client_certificate else {
        return Err(error(
            401,
            "invalid_client",
            700027,
            "Client assertion failed signature validation.",
        ));
    };
    let claims = assertion::verify(cert, assertion)
        .map_err(|(code, message)| error(401, "invalid_client", code, message))?;
    let host = req.header("host").unwrap_or_default();
    let aud = claims["aud"].as_str().unwrap_or_default();
    let path = format!("{host}/{tenant}/oauth2/v2.0/token");
    let aud_ok = aud == format!("https://{path}") || aud == format!("http://{path}");
    if !aud_ok {
        return Err(error(
            400,
            "invalid_client",
            700212,
            "The audience claim of the client assertion is not the token endpoint.",
        ));
    }
    if claims["iss"] != client_id || claims["sub"] != client_id {
        return Err(error(
            400,
            "invalid_client",
            700021,
            "Client assertion application identifier doesn't match 'client_id' parameter.",
        ));
    }
    let (nbf, exp) = (claims["nbf"].as_u64(), claims["exp"].as_u64());
    let iat = claims["iat"].as_u64().or(nbf);
    match (nbf, iat, exp) {
        (Some(nbf), Some(iat), Some(exp))
            if nbf <= now + 300
                && exp > now
                && exp.saturating_sub(iat) <= assertion::LIFETIME_SECS
                && claims["jti"].is_string() =>
        {
            Ok(())
        }
        (_, _, Some(exp)) => Err(expired(now, exp)),
        _ => Err(expired(now, 0)),
    }
}

fn expired(now: u64, exp: u64) -> Action {
    let message = format!("Client assertion is not within its valid time range. Current time: {now}, expiry time of assertion {exp}.");
    error(400, "invalid_client", 700024, &message)
}
