//! Success bodies in each protocol's shape and the expiry field forms.

use serde::Serialize;
use serde_json::{json, Value};

use super::form::legacy_date;
use super::{now_secs, ExpiresOnForm, Issued, Kind};

/// The success body in `proto`'s shape.
pub(super) fn success_body(
    proto: Kind,
    t: &Issued,
    access_token: Option<&str>,
    resource: &str,
    form: ExpiresOnForm,
    client_id: &str,
) -> Vec<u8> {
    let (expires_in, expires_on) = expiry_fields(t, form);
    let body = match proto {
        // The Azure CLI is never served (`Emulator::start_with` refuses it).
        Kind::CloudShell | Kind::AzureCli => return token_body(t, access_token, resource, form),
        // Entra's body; a fault body in its shape.
        Kind::WorkloadIdentity | Kind::ServicePrincipal => {
            return entra_body(t, access_token.unwrap_or_default())
        }
        Kind::Imds | Kind::Arc => serde_json::to_vec(&ImdsBody {
            access_token,
            client_id,
            expires_in,
            expires_on,
            ext_expires_in: t.expires_on.saturating_sub(now_secs()).to_string(),
            not_before: t.not_before.to_string(),
            resource,
            token_type: "Bearer",
        }),
        Kind::AppService => {
            // App Service has no `expires_in`; only the forms that are about it add one.
            let expires_in = match form {
                ExpiresOnForm::OnlyExpiresIn | ExpiresOnForm::ExpiresInNumber => expires_in,
                _ => None,
            };
            serde_json::to_vec(&AppServiceBody {
                access_token,
                expires_in,
                expires_on,
                resource,
                token_type: "Bearer",
                client_id,
            })
        }
    };
    body.unwrap_or_default()
}

/// Entra's success body: `expires_in` and `ext_expires_in` (integers), no `expires_on`.
pub(super) fn entra_body(t: &Issued, access_token: &str) -> Vec<u8> {
    let left = t.expires_on.saturating_sub(now_secs());
    json!({"token_type": "Bearer", "expires_in": left, "ext_expires_in": left,
        "access_token": access_token})
    .to_string()
    .into_bytes()
}

#[derive(Serialize)]
struct TokenBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    access_token: Option<&'a str>,
    refresh_token: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_on: Option<Value>,
    not_before: String,
    resource: &'a str,
    token_type: &'static str,
}

#[derive(Serialize)]
struct ImdsBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    access_token: Option<&'a str>,
    client_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_on: Option<Value>,
    ext_expires_in: String,
    not_before: String,
    resource: &'a str,
    token_type: &'static str,
}

#[derive(Serialize)]
struct AppServiceBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    access_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_on: Option<Value>,
    resource: &'a str,
    token_type: &'static str,
    client_id: &'a str,
}

pub(super) fn token_body(
    t: &Issued,
    access_token: Option<&str>,
    resource: &str,
    form: ExpiresOnForm,
) -> Vec<u8> {
    let (expires_in, expires_on) = expiry_fields(t, form);
    let body = TokenBody {
        access_token,
        refresh_token: "",
        expires_in,
        expires_on,
        not_before: t.not_before.to_string(),
        resource,
        token_type: "Bearer",
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

/// `(expires_in, expires_on)` in `form`.
fn expiry_fields(t: &Issued, form: ExpiresOnForm) -> (Option<Value>, Option<Value>) {
    let left = t.expires_on.saturating_sub(now_secs());
    let text = |n: u64| Some(Value::String(n.to_string()));
    match form {
        ExpiresOnForm::EpochString => (text(left), text(t.expires_on)),
        ExpiresOnForm::EpochNumber => (text(left), Some(json!(t.expires_on))),
        ExpiresOnForm::LegacyDateAmPm => (
            text(left),
            Some(Value::String(legacy_date(t.expires_on, true))),
        ),
        ExpiresOnForm::LegacyDate24h => (
            text(left),
            Some(Value::String(legacy_date(t.expires_on, false))),
        ),
        ExpiresOnForm::OnlyExpiresIn => (text(left), None),
        ExpiresOnForm::ExpiresInNumber => (Some(json!(left)), None),
        ExpiresOnForm::Nothing => (None, None),
        ExpiresOnForm::GarbageString => (None, Some(json!("soon"))),
    }
}
