//! `--identity NAME=SELECTOR`: the identities a daemon serves besides its own. The grammar
//! of one flag ([`IdentityArg`]), the identities the flags add up to ([`gather`], one per
//! NAME, settings given by repeating the flag), and what each source accepts
//! ([`Declared::check_for`]). Pure: no file is read here.

use super::{Identity, Kind};
use std::fmt;
use std::path::PathBuf;

/// The longest NAME: a DNS label's.
pub const MAX_NAME: usize = 63;

/// One setting of a declared identity, as `KEY=VALUE` after `NAME=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    ClientId(String),
    ObjectId(String),
    ResourceId(String),
    TenantId(String),
    ClientSecretFile(PathBuf),
    ClientCertificate(PathBuf),
}

impl Setting {
    /// Its key as the flag spells it.
    pub fn key(&self) -> &'static str {
        match self {
            Setting::ClientId(_) => "client-id",
            Setting::ObjectId(_) => "object-id",
            Setting::ResourceId(_) => "resource-id",
            Setting::TenantId(_) => "tenant-id",
            Setting::ClientSecretFile(_) => "client-secret-file",
            Setting::ClientCertificate(_) => "client-certificate",
        }
    }
}

/// One `--identity NAME=KEY=VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityArg {
    pub name: String,
    pub setting: Setting,
}

/// The keys a SELECTOR may start with, for messages.
const KEYS: &str =
    "client-id=GUID, object-id=GUID, resource-id=/subscriptions/.../userAssignedIdentities/NAME, \
     tenant-id=GUID, client-secret-file=PATH, client-certificate=PATH";

/// Parses one `--identity` value; the error says what is wrong and how it is spelled.
pub fn parse_identity_arg(s: &str) -> Result<IdentityArg, String> {
    let Some((name, selector)) = s.split_once('=') else {
        return Err(format!(
            "{s:?} is not NAME=SELECTOR: write --identity NAME=client-id=GUID (or object-id=, resource-id=, ...)"
        ));
    };
    check_name(name)?;
    let Some((key, value)) = selector.split_once('=') else {
        return Err(format!(
            "identity {name}: {selector:?} is not KEY=VALUE: one of {KEYS}"
        ));
    };
    let bad = |what: &str| format!("identity {name}: {key}={value:?} {what}");
    let setting = match key {
        "client-id" => Setting::ClientId(guid(value).ok_or_else(|| bad(GUID_HINT))?),
        "object-id" => Setting::ObjectId(guid(value).ok_or_else(|| bad(GUID_HINT))?),
        "tenant-id" => Setting::TenantId(guid(value).ok_or_else(|| bad(GUID_HINT))?),
        "resource-id" => Setting::ResourceId(
            resource_id(value).ok_or_else(|| {
                bad("is not a user-assigned identity's resource ID: /subscriptions/SUB/resourceGroups/GROUP/providers/Microsoft.ManagedIdentity/userAssignedIdentities/NAME")
            })?,
        ),
        "client-secret-file" | "client-certificate" if value.is_empty() => {
            return Err(bad("needs a path"))
        }
        "client-secret-file" => Setting::ClientSecretFile(PathBuf::from(value)),
        "client-certificate" => Setting::ClientCertificate(PathBuf::from(value)),
        _ => {
            return Err(format!(
                "identity {name}: unknown key {key:?}: one of {KEYS}"
            ))
        }
    };
    Ok(IdentityArg {
        name: name.to_string(),
        setting,
    })
}

const GUID_HINT: &str = "is not a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)";

/// NAME: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    match ok {
        true => Ok(()),
        false => Err(format!(
            "identity name {name:?} is not valid: 1 to {MAX_NAME} of a-z, 0-9 and -, not starting with - (such as ci or app-2)"
        )),
    }
}

/// A GUID in its 8-4-4-4-12 hex form, as given (its case kept).
fn guid(s: &str) -> Option<String> {
    let groups: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip(lens)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| s.to_string())
}

/// `/subscriptions/S/resourceGroups/G/providers/Microsoft.ManagedIdentity/userAssignedIdentities/N`
/// (segment names case-insensitive, as Azure's).
fn resource_id(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.split('/').collect();
    let want = [
        "",
        "subscriptions",
        "*",
        "resourcegroups",
        "*",
        "providers",
        "microsoft.managedidentity",
        "userassignedidentities",
        "*",
    ];
    let ok = parts.len() == want.len()
        && parts.iter().zip(want).all(|(p, w)| match w {
            "*" => !p.is_empty() && p.bytes().all(|b| b.is_ascii_graphic() && b != b'?'),
            w => p.eq_ignore_ascii_case(w),
        });
    ok.then(|| s.to_string())
}

/// A selector's kind and value, as `.status` shows it and a request is matched against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    /// `client-id`, `object-id` or `resource-id`.
    pub kind: &'static str,
    pub value: String,
}

/// One declared identity: its NAME and every setting its flags gave.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Declared {
    pub name: String,
    pub client_id: Option<String>,
    pub object_id: Option<String>,
    pub resource_id: Option<String>,
    pub tenant_id: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    pub client_certificate: Option<PathBuf>,
}

impl fmt::Debug for Declared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Paths are not secrets, but the name and selector say enough.
        write!(f, "Declared({}", self.name)?;
        if let Some(s) = self.selector() {
            write!(f, ", {}={}", s.kind, s.value)?;
        }
        f.write_str(")")
    }
}

impl Declared {
    /// The ids a managed-identity upstream is sent (IMDS, App Service).
    pub fn identity(&self) -> Identity {
        Identity {
            client_id: self.client_id.clone(),
            object_id: self.object_id.clone(),
            msi_res_id: self.resource_id.clone(),
        }
    }

    /// What names the identity: its client ID, else its object ID, else its resource ID.
    pub fn selector(&self) -> Option<Selector> {
        selector_of(&self.identity())
    }

    /// Whether `kind` can serve this identity; the error says why not (a usage error).
    pub fn check_for(&self, kind: Kind) -> Result<(), String> {
        let name = &self.name;
        match kind {
            Kind::CloudShell => Err(format!(
                "--identity {name}: the cloudshell source has one identity: Cloud Shell returns the signed-in user's token whatever identity is asked for, so a declared identity would be served another's token"
            )),
            Kind::Arc => Err(format!(
                "--identity {name}: the arc source has one identity (an Arc-connected server has only its system-assigned identity)"
            )),
            Kind::AzureCli => Err(format!(
                "--identity {name}: the azure-cli source has one identity (the signed-in account): use another source, or another mount per account"
            )),
            Kind::Imds | Kind::AppService => {
                let given = [
                    self.client_id.is_some(),
                    self.object_id.is_some(),
                    self.resource_id.is_some(),
                ];
                if given.iter().filter(|g| **g).count() != 1 {
                    return Err(format!(
                        "--identity {name}: the {kind} source needs exactly one of client-id=GUID, object-id=GUID, resource-id=/subscriptions/... for it"
                    ));
                }
                if let Some(key) = self.entra_only() {
                    return Err(format!(
                        "--identity {name}: {key}= is for the workload-identity and service-principal sources, not {kind}"
                    ));
                }
                Ok(())
            }
            Kind::WorkloadIdentity | Kind::ServicePrincipal => {
                if self.client_id.is_none() {
                    return Err(format!(
                        "--identity {name}: the {kind} source needs client-id=GUID for it"
                    ));
                }
                if self.object_id.is_some() || self.resource_id.is_some() {
                    return Err(format!(
                        "--identity {name}: the {kind} source names an application by client-id= only (object-id= and resource-id= are for imds and appservice)"
                    ));
                }
                if self.client_secret_file.is_some() && self.client_certificate.is_some() {
                    return Err(format!(
                        "--identity {name}: client-secret-file= and client-certificate= do not go together: pick one"
                    ));
                }
                Ok(())
            }
        }
    }

    fn entra_only(&self) -> Option<&'static str> {
        [
            (self.tenant_id.is_some(), "tenant-id"),
            (self.client_secret_file.is_some(), "client-secret-file"),
            (self.client_certificate.is_some(), "client-certificate"),
        ]
        .into_iter()
        .find_map(|(given, key)| given.then_some(key))
    }
}

/// What names `identity`: its client ID, else its object ID, else its resource ID.
pub fn selector_of(identity: &Identity) -> Option<Selector> {
    [
        ("client-id", &identity.client_id),
        ("object-id", &identity.object_id),
        ("resource-id", &identity.msi_res_id),
    ]
    .into_iter()
    .find_map(|(kind, v)| {
        v.as_ref().map(|v| Selector {
            kind,
            value: v.clone(),
        })
    })
}

/// The identities the flags declare, in the order their names first appear; a setting
/// given twice for one NAME is an error, as are two names with one selector.
pub fn gather(args: &[IdentityArg]) -> Result<Vec<Declared>, String> {
    let mut out: Vec<Declared> = Vec::new();
    for arg in args {
        let at = match out.iter().position(|d| d.name == arg.name) {
            Some(i) => i,
            None => {
                out.push(Declared {
                    name: arg.name.clone(),
                    ..Declared::default()
                });
                out.len() - 1
            }
        };
        let d = &mut out[at];
        let twice = || {
            format!(
                "--identity {}: {}= is given twice (one value per identity)",
                arg.name,
                arg.setting.key()
            )
        };
        fn set<T>(slot: &mut Option<T>, v: T, twice: impl Fn() -> String) -> Result<(), String> {
            match slot {
                Some(_) => Err(twice()),
                None => {
                    *slot = Some(v);
                    Ok(())
                }
            }
        }
        match arg.setting.clone() {
            Setting::ClientId(v) => set(&mut d.client_id, v, twice)?,
            Setting::ObjectId(v) => set(&mut d.object_id, v, twice)?,
            Setting::ResourceId(v) => set(&mut d.resource_id, v, twice)?,
            Setting::TenantId(v) => set(&mut d.tenant_id, v, twice)?,
            Setting::ClientSecretFile(v) => set(&mut d.client_secret_file, v, twice)?,
            Setting::ClientCertificate(v) => set(&mut d.client_certificate, v, twice)?,
        }
    }
    for (i, a) in out.iter().enumerate() {
        for b in &out[i + 1..] {
            if let (Some(x), Some(y)) = (a.selector(), b.selector()) {
                if x.kind == y.kind && x.value.eq_ignore_ascii_case(&y.value) {
                    return Err(format!(
                        "--identity {} and --identity {} name one identity ({}={}): declare it once",
                        a.name, b.name, x.kind, x.value
                    ));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: &str = "11111111-2222-3333-4444-555555555555";
    const RID: &str = "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/app";

    #[test]
    fn names_and_selectors_are_checked() {
        let ok = parse_identity_arg(&format!("ci=client-id={G}")).unwrap();
        assert_eq!(ok.name, "ci");
        assert_eq!(ok.setting, Setting::ClientId(G.into()));
        assert!(parse_identity_arg(&format!("a-2=resource-id={RID}")).is_ok());
        assert!(parse_identity_arg(&format!("x=object-id={}", G.to_uppercase())).is_ok());
        assert!(parse_identity_arg("x=client-secret-file=/etc/s").is_ok());
        for bad in [
            format!("Ci=client-id={G}"),
            format!("-ci=client-id={G}"),
            format!("=client-id={G}"),
            format!("{}=client-id={G}", "a".repeat(64)),
            format!("c_i=client-id={G}"),
        ] {
            let e = parse_identity_arg(&bad).unwrap_err();
            assert!(e.contains("identity name"), "{bad}: {e}");
        }
        assert!(parse_identity_arg("ci")
            .unwrap_err()
            .contains("NAME=SELECTOR"));
        assert!(parse_identity_arg("ci=client-id")
            .unwrap_err()
            .contains("KEY=VALUE"));
        assert!(parse_identity_arg("ci=client-id=nope")
            .unwrap_err()
            .contains("is not a GUID"));
        assert!(parse_identity_arg("ci=resource-id=/subscriptions/x")
            .unwrap_err()
            .contains("userAssignedIdentities"));
        assert!(parse_identity_arg(&format!("ci=app-id={G}"))
            .unwrap_err()
            .contains("unknown key"));
        assert_eq!(
            parse_identity_arg(&format!("{}=client-id={G}", "a".repeat(63))).map(|a| a.name.len()),
            Ok(63)
        );
    }

    #[test]
    fn repeated_flags_add_settings_and_sources_decide() {
        let args: Vec<IdentityArg> = [
            format!("ci=client-id={G}"),
            "ci=tenant-id=99999999-2222-3333-4444-555555555555".to_string(),
            format!("vm=resource-id={RID}"),
        ]
        .iter()
        .map(|s| parse_identity_arg(s).unwrap())
        .collect();
        let d = gather(&args).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].name, "ci");
        assert!(d[0].tenant_id.is_some());
        assert!(d[0].check_for(Kind::WorkloadIdentity).is_ok());
        assert!(d[0]
            .check_for(Kind::Imds)
            .unwrap_err()
            .contains("tenant-id="));
        assert!(d[1].check_for(Kind::Imds).is_ok());
        assert!(d[1].check_for(Kind::AppService).is_ok());
        assert!(d[1]
            .check_for(Kind::ServicePrincipal)
            .unwrap_err()
            .contains("needs client-id=GUID"));
        for k in [Kind::CloudShell, Kind::Arc, Kind::AzureCli] {
            assert!(
                d[1].check_for(k).unwrap_err().contains("one identity"),
                "{k}"
            );
        }
        let twice = [args[0].clone(), args[0].clone()];
        assert!(gather(&twice).unwrap_err().contains("given twice"));
        let same = [
            args[0].clone(),
            IdentityArg {
                name: "other".into(),
                setting: Setting::ClientId(G.to_uppercase()),
            },
        ];
        assert!(gather(&same).unwrap_err().contains("name one identity"));
        let both = [
            args[0].clone(),
            IdentityArg {
                name: "ci".into(),
                setting: Setting::ObjectId(G.into()),
            },
        ];
        let d = gather(&both).unwrap();
        assert!(d[0]
            .check_for(Kind::Imds)
            .unwrap_err()
            .contains("exactly one"));
    }
}
