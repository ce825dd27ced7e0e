//! Routing and the per-protocol answers (Cloud Shell, IMDS, App Service, Arc): request
//! checks, fault application, the Arc challenge and the error bodies. Tokens are minted
//! by `Shared::issue` (mod.rs), success bodies are `bodies.rs`'s.

use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::SeqCst;

use serde_json::json;

use super::action::{common_fault, ok, Action};
use super::bodies::{success_body, token_body};
use super::form::{form_value, params_lossy, params_strict};
use super::{
    entra, faults, now_secs, random_hex, ArcKey, ExpiresOnForm, Fault, Issued, Kind, Shared, Who,
    APP_SERVICE_API_VERSION, ARC_API_VERSION, DEFAULT_CLIENT_ID, IMDS_API_VERSION,
};

use crate::httpserver::Request;

/// A request on the right path with the right method (counted), before latency and faults.
pub(super) struct Routed {
    resource: Result<Option<String>, ()>,
}

/// Arc challenge keys remembered (and their files kept) at most; older ones are forgotten.
const MAX_ARC_KEYS: usize = 64;
fn split_target(req: &Request) -> (&str, &str) {
    req.target.split_once('?').unwrap_or((&req.target, ""))
}

/// The parameters: the form body (Cloud Shell) or the query.
fn params_of(proto: Kind, req: &Request) -> &[u8] {
    match proto {
        Kind::CloudShell => req.body.as_slice(),
        _ => split_target(req).1.as_bytes(),
    }
}

/// Path and method checks, counting, `last_params`; `Err` is the answer to a request that
/// went no further.
pub(super) fn route(sh: &Shared, req: &Request) -> Result<Routed, Action> {
    let proto = sh.protocol;
    let (route, _) = split_target(req);
    if route != super::path(proto) {
        return Err(proto_err(proto, 404, "NotFound", "No such endpoint"));
    }
    let method = super::method(proto);
    if req.method != method {
        let msg = format!("Only {method} is supported");
        return Err(with_header(
            proto_err(proto, 405, "MethodNotAllowed", &msg),
            "Allow",
            method.into(),
        ));
    }
    sh.requests.fetch_add(1, SeqCst);
    let params = params_of(proto, req);
    let resource = form_value(params, "resource");
    if let Ok(Some(r)) = &resource {
        *sh.per_resource.lock().entry(r.clone()).or_insert(0) += 1;
    }
    *sh.last_params.lock() = Some(params_lossy(params));
    Ok(Routed { resource })
}

/// The answer to a routed request (after its latency): faults first, then the protocol's.
pub(super) fn answer(sh: &Shared, req: &Request, routed: Routed) -> Action {
    let shown = routed.resource.clone().ok().flatten().unwrap_or_default();
    let action = answer_inner(sh, req, routed.resource);
    let status = match &action {
        Action::Respond { status, .. } => status.to_string(),
        Action::Raw(_) => "raw fault".into(),
        Action::Hang => "hang".into(),
        Action::Close => "reset".into(),
    };
    let (route, _) = split_target(req);
    log::debug!(
        "emulator: {} {route} resource={shown:?} -> {status}",
        req.method
    );
    action
}

fn answer_inner(sh: &Shared, req: &Request, resource: Result<Option<String>, ()>) -> Action {
    let queued = sh.faults.lock().pop_front();
    let from_queue = queued.is_some();
    let fault = queued.or_else(|| sh.sticky.lock().clone());
    let proto = sh.protocol;
    let params = params_of(proto, req);
    let resource_or_empty = resource.clone().ok().flatten().unwrap_or_default();
    let client_id = form_value(params, "client_id")
        .ok()
        .flatten()
        .filter(|c| !c.is_empty());
    let client_id = client_id.as_deref().unwrap_or(DEFAULT_CLIENT_ID);
    let body = |issued: &Issued, token: Option<&str>, form| {
        ok(success_body(
            proto,
            issued,
            token,
            &resource_or_empty,
            form,
            client_id,
        ))
    };
    if let Some(action) = fault.as_ref().and_then(common_fault) {
        return action;
    }
    match fault {
        Some(Fault::Fields(fields)) => {
            let action = answer_protocol(sh, req, params, resource, client_id);
            return match faults::merge_fields(action, &fields) {
                Ok(merged) => merged,
                Err(unchanged) => {
                    if from_queue {
                        sh.faults.lock().push_front(Fault::Fields(fields));
                    }
                    unchanged
                }
            };
        }
        Some(
            f @ (Fault::HugeBody { .. }
            | Fault::Http09
            | Fault::BadStatusLine
            | Fault::BadContentLength
            | Fault::OversizedHead
            | Fault::SlowBody { .. }
            | Fault::EndlessBody),
        ) => {
            let issued = sh.issue(&resource_or_empty);
            let body = success_body(
                proto,
                &issued,
                Some(&issued.token),
                &resource_or_empty,
                ExpiresOnForm::EpochString,
                client_id,
            );
            return Action::Raw(faults::raw(&f, body));
        }
        Some(f @ (Fault::MissingAccessToken | Fault::EmptyAccessToken)) => {
            let now = now_secs();
            let expires_on = now.saturating_add(sh.ttl.load(SeqCst));
            let fake = Issued {
                token: String::new(),
                expires_on,
                not_before: now,
            };
            let token = (f == Fault::EmptyAccessToken).then_some("");
            return body(&fake, token, ExpiresOnForm::EpochString);
        }
        Some(Fault::ExpiresOn(form)) => {
            let issued = sh.issue(&resource_or_empty);
            return body(&issued, Some(&issued.token), form);
        }
        Some(Fault::Echo { code, body }) => {
            return Action::Respond {
                status: code,
                body: faults::echo(&body, params, &params_lossy(params)).into_bytes(),
                headers: Vec::new(),
            };
        }
        // Answered by `common_fault` above.
        Some(Fault::Status { .. } | Fault::Hang | Fault::Reset | Fault::Garbage) | None => {}
    }
    answer_protocol(sh, req, params, resource, client_id)
}

fn answer_protocol(
    sh: &Shared,
    req: &Request,
    params: &[u8],
    resource: Result<Option<String>, ()>,
    client_id: &str,
) -> Action {
    match sh.protocol {
        // The Azure CLI is never served (`Emulator::start_with` refuses it).
        Kind::CloudShell | Kind::AzureCli => answer_cloud_shell(sh, req, resource),
        Kind::Imds => answer_imds(sh, req, params, client_id),
        Kind::AppService => answer_app_service(sh, req, params, client_id),
        Kind::Arc => answer_arc(sh, req, params, client_id),
        // Served by `entra::handle`, never routed here.
        Kind::WorkloadIdentity | Kind::ServicePrincipal => {
            proto_err(sh.protocol, 404, "not_found", "No such endpoint")
        }
    }
}

fn answer_cloud_shell(sh: &Shared, req: &Request, resource: Result<Option<String>, ()>) -> Action {
    if req.header("Metadata") != Some("true") {
        return respond_err(400, "BadRequest", "Required metadata header not specified");
    }
    let resource = match resource {
        Err(()) => return respond_err(400, "BadRequest", "Malformed form body"),
        Ok(r) => r.unwrap_or_default(),
    };
    if resource.is_empty() {
        return respond_err(
            400,
            "BadRequest",
            "Required resource parameter not specified",
        );
    }
    if !sh.audience_allowed(&resource) {
        let msg = format!(
            "Audience {resource} is not a supported MSI token audience. (cstokenfs emulator)"
        );
        return respond_err(400, "AudienceNotSupported", &msg);
    }
    let issued = sh.issue(&resource);
    ok(token_body(
        &issued,
        Some(&issued.token),
        &resource,
        ExpiresOnForm::EpochString,
    ))
}

fn answer_imds(sh: &Shared, req: &Request, params: &[u8], client_id: &str) -> Action {
    let resource = match imds_checks(req, params, IMDS_API_VERSION) {
        Ok(r) => r,
        Err(a) => return a,
    };
    let Some(who) = who(sh, params, client_id) else {
        return flat_err(400, "invalid_request", "Identity not found");
    };
    count(sh, &who, &resource);
    if !sh.audience_allowed(&resource) {
        return flat_err(400, "invalid_resource", &aadsts500011(&resource));
    }
    let issued = sh.issue_for(&resource, Some(&who));
    ok(success_body(
        Kind::Imds,
        &issued,
        Some(&issued.token),
        &resource,
        ExpiresOnForm::EpochString,
        &who.client_id,
    ))
}

/// The identity a request of the IMDS or App Service protocol names (`client_id`;
/// `object_id` or `principal_id`; `msi_res_id` or `mi_res_id`), as the emulator knows it:
/// `None` when identities are set (`Emulator::set_identities`) and none of them has every
/// id named. Naming none is the system-assigned identity.
fn who(sh: &Shared, params: &[u8], client_id: &str) -> Option<Who> {
    let query = params_strict(params).unwrap_or_default();
    let get = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| query.get(*n).filter(|v| !v.is_empty()).cloned())
    };
    let (c, o, r) = (
        get(&["client_id"]),
        get(&["object_id", "principal_id"]),
        get(&["msi_res_id", "mi_res_id"]),
    );
    if c.is_none() && o.is_none() && r.is_none() {
        return Some(Who::managed(
            super::DEFAULT_CLIENT_ID.into(),
            Some(super::DEFAULT_OBJECT_ID.into()),
            None,
        ));
    }
    let known = sh.identities.lock().clone();
    let Some(known) = known else {
        return Some(Who::managed(client_id.to_string(), o, r));
    };
    let same = |given: &Option<String>, ours: &str| {
        given.as_ref().is_none_or(|g| g.eq_ignore_ascii_case(ours))
    };
    known
        .iter()
        .find(|k| same(&c, &k.client_id) && same(&o, &k.object_id) && same(&r, &k.resource_id))
        .map(|k| {
            Who::managed(
                k.client_id.clone(),
                Some(k.object_id.clone()),
                Some(k.resource_id.clone()),
            )
        })
}

/// Counts a request of `who` for `resource` (`Emulator::requests_by`).
fn count(sh: &Shared, who: &Who, resource: &str) {
    let key = (who.client_id.to_ascii_lowercase(), resource.to_string());
    *sh.per_identity.lock().entry(key).or_insert(0) += 1;
}

fn answer_arc(sh: &Shared, req: &Request, params: &[u8], client_id: &str) -> Action {
    let resource = match imds_checks(req, params, ARC_API_VERSION) {
        Ok(r) => r,
        Err(a) => return a,
    };
    let Some(auth) = req.header("Authorization") else {
        return arc_challenge(sh, "Authorization required: resend with Authorization: Basic <contents of the key file named in WWW-Authenticate>");
    };
    let secret = auth
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Basic"))
        .map_or("", |(_, rest)| rest.trim());
    let known = !secret.is_empty()
        && sh
            .arc_keys
            .lock()
            .iter()
            .any(|k| crate::hardening::ct_eq(k.secret.as_bytes(), secret.as_bytes()));
    if !known {
        return arc_challenge(sh, "Invalid Authorization secret");
    }
    imds_token(sh, Kind::Arc, &resource, client_id)
}

/// IMDS / Arc request checks in order: `Metadata: true`, decodable query, api-version,
/// non-empty resource. Returns the resource.
fn imds_checks(req: &Request, params: &[u8], api_version: &str) -> Result<String, Action> {
    let bad = |msg: &str| Err(flat_err(400, "invalid_request", msg));
    if req.header("Metadata") != Some("true") {
        return bad("Required metadata header not specified");
    }
    let Ok(query) = params_strict(params) else {
        return bad("Malformed query string");
    };
    match query.get("api-version").map(String::as_str) {
        None | Some("") => {
            return bad(&format!(
                "Required api-version parameter not specified (expected {api_version})"
            ))
        }
        Some(v) if v != api_version => {
            return bad(&format!(
                "Unsupported api-version {v} (expected {api_version})"
            ))
        }
        Some(_) => {}
    }
    match query.get("resource") {
        Some(r) if !r.is_empty() => Ok(r.clone()),
        _ => bad("Required resource parameter not specified"),
    }
}

/// Audience check and the IMDS-shaped token answer (IMDS and Arc).
fn imds_token(sh: &Shared, proto: Kind, resource: &str, client_id: &str) -> Action {
    if !sh.audience_allowed(resource) {
        return flat_err(400, "invalid_resource", &aadsts500011(resource));
    }
    let issued = sh.issue(resource);
    ok(success_body(
        proto,
        &issued,
        Some(&issued.token),
        resource,
        ExpiresOnForm::EpochString,
        client_id,
    ))
}

fn answer_app_service(sh: &Shared, req: &Request, params: &[u8], client_id: &str) -> Action {
    match req.header("X-IDENTITY-HEADER") {
        None => return app_err(401, "X-IDENTITY-HEADER header not specified"),
        Some(h) if !crate::hardening::ct_eq(h.as_bytes(), sh.identity_header.as_bytes()) => {
            return app_err(401, "Invalid X-IDENTITY-HEADER")
        }
        Some(_) => {}
    }
    let Ok(query) = params_strict(params) else {
        return app_err(400, "Malformed query string");
    };
    match query.get("api-version").map(String::as_str) {
        None | Some("") => {
            return app_err(
                400,
                &format!("api-version not specified (expected {APP_SERVICE_API_VERSION})"),
            )
        }
        Some(v) if v != APP_SERVICE_API_VERSION => {
            return app_err(
                400,
                &format!("Unsupported api-version {v} (expected {APP_SERVICE_API_VERSION})"),
            )
        }
        Some(_) => {}
    }
    let resource = match query.get("resource") {
        Some(r) if !r.is_empty() => r.as_str(),
        _ => return app_err(400, "Required resource parameter not specified"),
    };
    let Some(who) = who(sh, params, client_id) else {
        return app_err(
            400,
            "No Managed Identity found for specified ClientId/ResourceId/PrincipalId.",
        );
    };
    count(sh, &who, resource);
    if !sh.audience_allowed(resource) {
        return app_err(400, &aadsts500011(resource));
    }
    let issued = sh.issue_for(resource, Some(&who));
    ok(success_body(
        Kind::AppService,
        &issued,
        Some(&issued.token),
        resource,
        ExpiresOnForm::EpochString,
        &who.client_id,
    ))
}

fn aadsts500011(resource: &str) -> String {
    format!(
        "AADSTS500011: The resource principal named {resource} was not found in the tenant. (cstokenfs emulator)"
    )
}

/// Writes a fresh key file and answers 401 naming it; 500 if the file cannot be written.
fn arc_challenge(sh: &Shared, message: &str) -> Action {
    let dir = sh.arc_key_dir.lock().clone();
    let (path, secret) = match write_arc_key(&dir) {
        Ok(k) => k,
        Err(e) => {
            log::warn!(
                "emulator: cannot write an Arc key file in {}: {e}",
                dir.display()
            );
            return flat_err(500, "server_error", "Cannot write the challenge key file");
        }
    };
    let realm = format!("Basic realm={}", path.display());
    {
        let mut keys = sh.arc_keys.lock();
        keys.push_back(ArcKey { secret, path });
        while keys.len() > MAX_ARC_KEYS {
            if let Some(old) = keys.pop_front() {
                let _ = std::fs::remove_file(&old.path);
            }
        }
    }
    with_header(
        flat_err(401, "unauthorized", message),
        "WWW-Authenticate",
        realm,
    )
}

/// `<dir>/<32 hex>.key` holding 64 hex digits (no newline), mode 0600; `dir` is created
/// (mode 0700) if missing.
fn write_arc_key(dir: &Path) -> io::Result<(PathBuf, String)> {
    if !dir.is_dir() {
        DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let secret = random_hex(32)?.to_string();
    let path = dir.join(format!("{}.key", *random_hex(16)?));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(secret.as_bytes())?;
    Ok((path, secret))
}

fn with_header(mut action: Action, name: &'static str, value: String) -> Action {
    if let Action::Respond { headers, .. } = &mut action {
        headers.push((name, value));
    }
    action
}

fn error_body(code: &str, message: &str) -> Vec<u8> {
    json!({"error": {"code": code, "message": message}})
        .to_string()
        .into_bytes()
}

/// Cloud Shell error: `{"error":{"code","message"}}`.
fn respond_err(status: u16, code: &str, message: &str) -> Action {
    Action::Respond {
        status,
        body: error_body(code, message),
        headers: Vec::new(),
    }
}

/// IMDS / Arc error: `{"error","error_description"}`.
fn flat_err(status: u16, error: &str, description: &str) -> Action {
    Action::Respond {
        status,
        body: json!({"error": error, "error_description": description})
            .to_string()
            .into_bytes(),
        headers: Vec::new(),
    }
}

/// App Service error: `{"statusCode","message"}`.
fn app_err(status: u16, message: &str) -> Action {
    Action::Respond {
        status,
        body: json!({"statusCode": status, "message": message})
            .to_string()
            .into_bytes(),
        headers: Vec::new(),
    }
}

/// An error in `proto`'s shape; `code` is the Cloud Shell code (the flat IMDS code is
/// derived from the status).
pub(super) fn proto_err(proto: Kind, status: u16, code: &str, message: &str) -> Action {
    match proto {
        Kind::CloudShell | Kind::AzureCli => respond_err(status, code, message),
        Kind::Imds | Kind::Arc => {
            let error = match status {
                401 => "unauthorized",
                404 => "not_found",
                405 => "method_not_allowed",
                s if s >= 500 => "server_error",
                _ => "invalid_request",
            };
            flat_err(status, error, message)
        }
        Kind::AppService => app_err(status, message),
        Kind::WorkloadIdentity | Kind::ServicePrincipal => {
            entra::error(status, "invalid_request", 900144, message)
        }
    }
}
