//! The claims of the tokens the emulator mints, shaped as Entra's v1 access tokens are, so
//! clients that read them (the Azure CLI's `az login --identity` reads `tid`, `oid`,
//! `appid`, `xms_mirid`) get what they look for: the tenant (`tid`, and `iss` =
//! `https://sts.windows.net/<tid>/`), who the token is for (`oid`, `sub`), the application
//! (`appid`, `azp`), the kind of principal (`idtyp`: `app` for managed identities and
//! applications, `user` for Cloud Shell's signed-in user) and, for a managed identity, its
//! resource ID (`xms_mirid`). Every value is a made-up test value.

use serde_json::{json, Value};

use crate::source::Kind;

/// `tid` of every token when no tenant is configured (`Emulator::set_entra` with a tenant
/// GUID) or asked for (Entra's `/{tenant}/...` path with a GUID).
pub const TEST_TENANT_ID: &str = "00000000-0000-0000-0000-000000007e57";
/// `oid` of Cloud Shell's signed-in test user.
pub const TEST_USER_OBJECT_ID: &str = "00000000-0000-0000-0000-00000000b0b0";
/// `upn` of Cloud Shell's signed-in test user.
pub const TEST_USER_UPN: &str = "test.user@cstokenfs-emulator.invalid";
/// `appid` of Cloud Shell tokens: the Azure CLI's application, which Cloud Shell's
/// token endpoint signs in as.
pub const AZURE_CLI_APP_ID: &str = "04b07795-8ddb-461a-bbee-02f9e1bf7b46";
/// The subscription of the made-up resource IDs.
const SUBSCRIPTION: &str = "00000000-0000-0000-0000-000000000001";

/// What kind of principal a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Principal {
    /// A managed identity (IMDS, App Service, Arc): `idtyp` `app`, with `xms_mirid`.
    ManagedIdentity,
    /// An application (Entra: a service principal or workload identity): `idtyp` `app`.
    Application,
    /// A signed-in user (Cloud Shell): `idtyp` `user`, with `upn` and `name`.
    User,
}

/// Who a token is for, as far as the request said.
pub(super) struct Subject<'a> {
    pub principal: Principal,
    pub client_id: &'a str,
    pub object_id: Option<&'a str>,
    pub resource_id: Option<&'a str>,
    /// A managed identity with no resource ID named: the system-assigned one (else a
    /// user-assigned one named by its client or object ID).
    pub system_assigned: bool,
    pub tenant: &'a str,
}

/// The time and serial claims of one token.
pub(super) struct Times {
    pub now: u64,
    pub exp: u64,
    pub serial: u64,
}

/// The claims of a token for `resource` as `who` (served by `protocol`).
pub(super) fn claims(
    protocol: Kind,
    resource: &str,
    who: &Subject<'_>,
    t: &Times,
    notice: &str,
) -> Value {
    let mut c = json!({
        "aud": resource,
        "iss": format!("https://sts.windows.net/{}/", who.tenant),
        "iat": t.now, "nbf": t.now, "exp": t.exp,
        "tid": who.tenant,
        "ver": "1.0",
        "serial": t.serial,
        "emulator": notice,
    });
    let oid = who
        .object_id
        .map_or_else(|| object_id_of(who.client_id), str::to_string);
    c["appid"] = who.client_id.into();
    c["azp"] = who.client_id.into();
    c["oid"] = oid.clone().into();
    c["sub"] = oid.into();
    match who.principal {
        Principal::ManagedIdentity => {
            c["idtyp"] = "app".into();
            c["appidacr"] = "2".into();
            let mirid = match (who.resource_id, who.system_assigned) {
                (Some(id), _) => id.to_string(),
                (None, true) => system_assigned_id(protocol),
                (None, false) => format!(
                    "/subscriptions/{SUBSCRIPTION}/resourcegroups/rg/providers/\
                     Microsoft.ManagedIdentity/userAssignedIdentities/{}",
                    who.client_id
                ),
            };
            c["xms_mirid"] = mirid.into();
        }
        Principal::Application => {
            c["idtyp"] = "app".into();
            c["appidacr"] = "1".into();
        }
        Principal::User => {
            c["idtyp"] = "user".into();
            c["appidacr"] = "0".into();
            c["upn"] = TEST_USER_UPN.into();
            c["unique_name"] = TEST_USER_UPN.into();
            c["name"] = "cstokenfs test user".into();
            c["scp"] = "user_impersonation".into();
        }
    }
    c
}

/// The resource ID of the system-assigned identity of the machine or app `protocol` runs
/// on (a made-up one).
fn system_assigned_id(protocol: Kind) -> String {
    let provider = match protocol {
        Kind::AppService => "Microsoft.Web/sites/app",
        Kind::Arc => "Microsoft.HybridCompute/machines/arc",
        _ => "Microsoft.Compute/virtualMachines/vm",
    };
    format!("/subscriptions/{SUBSCRIPTION}/resourcegroups/rg/providers/{provider}")
}

/// A stable made-up object ID for a client ID that comes without one (an application's
/// service principal, a user-assigned identity named by its client ID only).
fn object_id_of(client_id: &str) -> String {
    // FNV-1a: stable across runs and builds, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in client_id.to_ascii_lowercase().bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!(
        "00000000-0000-0000-{:04x}-{:012x}",
        h >> 48,
        h & 0xffff_ffff_ffff
    )
}
