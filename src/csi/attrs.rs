//! A `NodePublishVolume` as the driver reads it: the pod's volume attributes (`clientID`,
//! `tenantID`, `resources`, `fileMode`), what the kubelet adds (`csi.storage.k8s.io/...`:
//! the pod, its service account, the service-account tokens) and the checks that refuse a
//! request before anything is mounted. Pure: no I/O.
//!
//! Whose tokens a volume gets is decided by its service-account token alone, and only
//! where the kubelet's own keys say the token is the pod's: its `sub` must be
//! `system:serviceaccount:NAMESPACE:NAME` of the pod the kubelet names (`podInfoOnMount`),
//! so no pod can reach the cache entries of another service account by presenting a token
//! that claims to be it. Entra checks the token itself (issuer, subject, signature) when it
//! is used as the client assertion.

use super::{Capability, CsiError, Publish};
use crate::names::Resource;
use std::collections::BTreeMap;
use std::fmt;
use zeroize::Zeroizing;

/// What the kubelet adds to the volume context.
pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
pub const SERVICE_ACCOUNT: &str = "csi.storage.k8s.io/serviceAccount.name";
pub const TOKENS: &str = "csi.storage.k8s.io/serviceAccount.tokens";

/// The pod's own attributes (`volumeAttributes`).
const CLIENT_ID: &str = "clientID";
const TENANT_ID: &str = "tenantID";
const RESOURCES: &str = "resources";
const FILE_MODE: &str = "fileMode";
const KNOWN: [&str; 4] = [CLIENT_ID, TENANT_ID, RESOURCES, FILE_MODE];

/// The most resources one volume may name.
pub const MAX_RESOURCES: usize = 32;

/// The pod a volume is for, as the kubelet names it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
}

impl fmt::Display for Pod {
    /// `namespace/name (service account SA)`, as audit lines name a pod.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pod {}/{} serviceaccount {}",
            self.namespace, self.name, self.service_account
        )
    }
}

/// Whose tokens: one cache identity per key. Pods of one service account asking for the
/// same application in the same tenant share it; pods of different accounts never do.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct IdentityKey {
    /// Lower case.
    pub tenant: String,
    /// Lower case.
    pub client_id: String,
    /// The service-account token's `iss`.
    pub issuer: String,
    /// The service-account token's `sub`: `system:serviceaccount:NS:SA`.
    pub subject: String,
}

/// The pod's service-account token for the driver's audience. `Debug` shows its expiry
/// only.
pub struct SaToken {
    pub token: Zeroizing<String>,
    /// Its `exp`, in ms since the epoch.
    pub expires_at_ms: i64,
    pub issuer: String,
    pub subject: String,
}

impl fmt::Debug for SaToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaToken")
            .field("expires_at_ms", &self.expires_at_ms)
            .field("issuer", &self.issuer)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// One resource of a volume: what is sent upstream and the file name it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub resource: Resource,
    pub name: String,
}

/// A publish request, checked.
#[derive(Debug)]
pub struct Volume {
    pub volume_id: String,
    pub target_path: String,
    pub pod: Pod,
    pub client_id: String,
    pub tenant: String,
    /// As the pod gave them (kept in the volume's record).
    pub resources_given: String,
    pub resources: Vec<Wanted>,
    /// `fileMode`, if given.
    pub file_mode: Option<u16>,
    /// The pod's fsGroup (`volume_mount_group`).
    pub group: Option<u32>,
    pub token: SaToken,
}

impl Volume {
    pub fn key(&self) -> IdentityKey {
        IdentityKey {
            tenant: self.tenant.to_ascii_lowercase(),
            client_id: self.client_id.to_ascii_lowercase(),
            issuer: self.token.issuer.clone(),
            subject: self.token.subject.clone(),
        }
    }
}

fn invalid(m: impl Into<String>) -> CsiError {
    CsiError::InvalidArgument(m.into())
}

/// Checks a publish request: only an ephemeral inline volume, read-only, with valid
/// attributes, the pod's info and its service-account token for `audience`.
pub fn check(
    p: &Publish,
    default_tenant: Option<&str>,
    audience: &str,
) -> Result<Volume, CsiError> {
    if p.volume_id.is_empty() {
        return Err(invalid("volume_id is empty"));
    }
    check_target(&p.target_path)?;
    let ctx = &p.volume_context;
    if ctx.get(EPHEMERAL).map(String::as_str) != Some("true") {
        return Err(invalid(format!(
            "{EPHEMERAL} is not \"true\": csi.cstokenfs.io serves ephemeral inline volumes only \
             (a csi volume in the pod's spec, not a PersistentVolume), and its CSIDriver must list \
             volumeLifecycleModes: [Ephemeral]"
        )));
    }
    if !p.readonly {
        return Err(invalid(
            "the volume is writable: set readOnly: true on the csi volume",
        ));
    }
    let group = match &p.capability {
        Capability::Mount { volume_mount_group } => group_of(volume_mount_group.as_deref())?,
        Capability::Block => {
            return Err(invalid(
                "a block volume was asked for: this driver's volumes are files (mount)",
            ))
        }
        Capability::Missing => return Err(invalid("volume_capability is missing")),
    };
    let unknown: Vec<&str> = ctx
        .keys()
        .map(String::as_str)
        .filter(|k| !k.starts_with("csi.storage.k8s.io/") && !KNOWN.contains(k))
        .collect();
    if !unknown.is_empty() {
        return Err(invalid(format!(
            "unknown volume attribute(s) {}: the attributes are {}",
            unknown.join(", "),
            KNOWN.join(", ")
        )));
    }
    let client_id = ctx.get(CLIENT_ID).map(|s| s.trim()).unwrap_or_default();
    if client_id.is_empty() {
        return Err(invalid(
            "volume attribute clientID is missing: the client ID (a GUID) of the Entra application or managed identity whose federated credential trusts this pod's service account",
        ));
    }
    if !crate::names::is_guid(client_id) {
        return Err(invalid(format!(
            "volume attribute clientID {client_id:?} is not a GUID"
        )));
    }
    let tenant = match ctx.get(TENANT_ID).map(|s| s.trim()).filter(|s| !s.is_empty()) {
        Some(t) => t.to_string(),
        None => default_tenant.map(str::to_string).ok_or_else(|| {
            invalid("volume attribute tenantID is missing and the driver has no --tenant-id (or $AZURE_TENANT_ID)")
        })?,
    };
    crate::source::client_tls::check_tenant(&tenant)
        .map_err(|e| invalid(format!("volume attribute tenantID: {e}")))?;
    let resources_given = ctx.get(RESOURCES).cloned().unwrap_or_default();
    let resources = resources_of(&resources_given)?;
    let file_mode = ctx.get(FILE_MODE).map(|m| mode_of(m)).transpose()?;
    let pod = pod_of(ctx)?;
    let token = token_of(&p.secrets, ctx, audience)?;
    let expected = format!(
        "system:serviceaccount:{}:{}",
        pod.namespace, pod.service_account
    );
    if token.subject != expected {
        return Err(CsiError::PermissionDenied(format!(
            "the service-account token is not of {pod}: its subject is not {expected}"
        )));
    }
    Ok(Volume {
        volume_id: p.volume_id.clone(),
        target_path: p.target_path.clone(),
        pod,
        client_id: client_id.to_string(),
        tenant,
        resources_given,
        resources,
        file_mode,
        group,
        token,
    })
}

/// The kubelet's target path of a CSI volume: absolute, no `.` or `..`, and
/// `.../volumes/kubernetes.io~csi/<volume>/mount`: the driver mounts nowhere else.
fn check_target(target: &str) -> Result<(), CsiError> {
    let parts: Vec<&str> = target.split('/').collect();
    let plain = target.starts_with('/')
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != "..");
    let n = parts.len();
    let kubelets = n >= 5
        && parts[n - 1] == "mount"
        && parts[n - 3] == "kubernetes.io~csi"
        && parts[n - 4] == "volumes";
    if plain && kubelets {
        return Ok(());
    }
    Err(invalid(format!(
        "target_path {target:?} is not a kubelet's CSI volume path          (/.../pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount)"
    )))
}

/// The pod a request names, for a log line (the kubelet's keys, as sent; never a token).
pub fn who(ctx: &BTreeMap<String, String>) -> String {
    let get = |k: &str| ctx.get(k).map_or("?", String::as_str);
    format!(
        "pod {}/{} serviceaccount {}, client {}",
        get(POD_NAMESPACE),
        get(POD_NAME),
        get(SERVICE_ACCOUNT),
        get(CLIENT_ID)
    )
}

/// The pod's fsGroup as the kubelet passes it (a decimal gid).
fn group_of(group: Option<&str>) -> Result<Option<u32>, CsiError> {
    match group.map(str::trim).filter(|g| !g.is_empty()) {
        None => Ok(None),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) if gid != u32::MAX => Ok(Some(gid)),
            _ => Err(invalid(format!(
                "volume_mount_group {g:?} is not a group id"
            ))),
        },
    }
}

/// `resources`: comma-separated names, by the mount's name rules, at least one.
pub fn resources_of(given: &str) -> Result<Vec<Wanted>, CsiError> {
    let mut out: Vec<Wanted> = Vec::new();
    for name in given.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let resource = crate::names::resolve_arg(name)
            .map_err(|e| invalid(format!("volume attribute resources: {name:?}: {e}")))?;
        let file = crate::names::canonical_name(&resource).ok_or_else(|| {
            invalid(format!(
                "volume attribute resources: {name:?} is too long for a file name"
            ))
        })?;
        if !out.iter().any(|w| w.resource == resource) {
            out.push(Wanted {
                resource,
                name: file,
            });
        }
    }
    if out.is_empty() {
        return Err(invalid(
            "volume attribute resources is missing: comma-separated resources such as \"management.azure.com,vault.azure.net\"",
        ));
    }
    if out.len() > MAX_RESOURCES {
        return Err(invalid(format!(
            "volume attribute resources names {} resources: at most {MAX_RESOURCES}",
            out.len()
        )));
    }
    Ok(out)
}

/// `fileMode`: octal permission bits (`0440`, `440`), nothing beyond 0777.
fn mode_of(given: &str) -> Result<u16, CsiError> {
    let digits = given.trim();
    let digits = digits.strip_prefix("0o").unwrap_or(digits);
    match u16::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(invalid(format!(
            "volume attribute fileMode {given:?} is not an octal mode from 0000 to 0777 (such as 0440)"
        ))),
    }
}

fn pod_of(ctx: &BTreeMap<String, String>) -> Result<Pod, CsiError> {
    let get = |k: &str| ctx.get(k).cloned().filter(|v| !v.is_empty());
    match (get(POD_NAMESPACE), get(SERVICE_ACCOUNT)) {
        (Some(namespace), Some(service_account)) => Ok(Pod {
            namespace,
            name: get(POD_NAME).unwrap_or_default(),
            uid: get(POD_UID).unwrap_or_default(),
            service_account,
        }),
        _ => Err(invalid(format!(
            "the kubelet sent no pod information ({POD_NAMESPACE}, {SERVICE_ACCOUNT}): the \
             CSIDriver must set podInfoOnMount: true"
        ))),
    }
}

/// The service-account token for `audience`: from the request's secrets first (Kubernetes
/// 1.35's `serviceAccountTokenInSecrets`), else from the volume context.
fn token_of(
    secrets: &BTreeMap<String, Zeroizing<String>>,
    ctx: &BTreeMap<String, String>,
    audience: &str,
) -> Result<SaToken, CsiError> {
    let json: Zeroizing<String> = match (secrets.get(TOKENS), ctx.get(TOKENS)) {
        // The kubelet puts it in one of them; in both, one is not the kubelet's (a pod's
        // nodePublishSecretRef, or its own volumeAttributes).
        (Some(_), Some(_)) => {
            return Err(invalid(format!(
                "{TOKENS} is both in the request's secrets and in its volume context: only the \
                 kubelet may send it, in one of them"
            )))
        }
        (Some(s), None) => s.clone(),
        (None, Some(c)) => Zeroizing::new(c.clone()),
        (None, None) => return Err(no_token(audience)),
    };
    let doc: serde_json::Value =
        serde_json::from_str(&json).map_err(|_| invalid(format!("{TOKENS} is not JSON")))?;
    let token = doc
        .get(audience)
        .and_then(|t| t.get("token"))
        .and_then(serde_json::Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| no_token(audience))?;
    let token = Zeroizing::new(token.to_string());
    let claims = crate::claims::payload(&token).ok_or_else(|| {
        invalid(format!(
            "the service-account token for {audience} is not a JWT"
        ))
    })?;
    let text = |k: &str| {
        claims
            .get(k)
            .and_then(serde_json::Value::as_str)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    let (Some(issuer), Some(subject)) = (text("iss"), text("sub")) else {
        return Err(invalid("the service-account token has no iss or sub claim"));
    };
    let exp = claims
        .get("exp")
        .and_then(serde_json::Value::as_i64)
        .ok_or_else(|| invalid("the service-account token has no exp claim"))?;
    let expires_at_ms = exp.saturating_mul(1000);
    if expires_at_ms <= crate::policy::now_ms() {
        return Err(invalid(
            "the service-account token has expired: the kubelet sends a fresh one with its next call",
        ));
    }
    Ok(SaToken {
        token,
        expires_at_ms,
        issuer,
        subject,
    })
}

fn no_token(audience: &str) -> CsiError {
    invalid(format!(
        "no service-account token for audience {audience} in the request: the CSIDriver \
         csi.cstokenfs.io must ask for it (spec.tokenRequests: [{{audience: {audience}}}])"
    ))
}

#[cfg(test)]
#[path = "attrs_tests.rs"]
mod tests;
