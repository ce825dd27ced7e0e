//! Which upstream to use: `--source`, or detected from the environment the way the Azure
//! SDKs do. Auto never probes the network: IMDS is used only when chosen. A plan is checked
//! before anything starts; `--emulator` plans are pointed at the stand-in by the caller
//! (the front end: `mount`, `sink`, `get`, through `stand_in`), which starts it: this layer
//! never starts a server.

use super::declared::Declared;
use super::{appservice, arc, azure_cli, cloudshell, imds, ConfigError, Identity, Kind, Source};
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use zeroize::Zeroizing;

mod entra_detect;

/// What detection looks at: environment variables and whether `az` is on PATH.
#[derive(Clone, Default)]
pub struct Env {
    pub vars: BTreeMap<String, String>,
    pub az_on_path: bool,
}

impl fmt::Debug for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: IDENTITY_HEADER is a secret.
        f.debug_struct("Env")
            .field("vars", &self.vars.keys().collect::<Vec<_>>())
            .field("az_on_path", &self.az_on_path)
            .finish()
    }
}

impl Env {
    pub fn current() -> Env {
        let keys = [
            "MSI_ENDPOINT",
            "MSI_SECRET",
            "IDENTITY_ENDPOINT",
            "IDENTITY_HEADER",
            "IMDS_ENDPOINT",
        ];
        let vars = keys
            .iter()
            .chain(entra_detect::VARS.iter())
            .filter_map(|k| {
                std::env::var(k)
                    .ok()
                    .filter(|v| !v.is_empty())
                    .map(|v| (k.to_string(), v))
            })
            .collect();
        let az_on_path = std::env::var_os("PATH").is_some_and(|p| azure_cli::on_path(&p));
        Env { vars, az_on_path }
    }

    fn has(&self, k: &str) -> bool {
        self.vars.contains_key(k)
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.vars.get(k).map(String::as_str)
    }
}

/// The upstream to use and why (for the log and `.status`). Pure. `asked` is `--source`
/// (`None`: auto).
pub fn detect(
    asked: Option<Kind>,
    endpoint_given: bool,
    emulator: bool,
    env: &Env,
) -> (Kind, String) {
    if let Some(asked) = asked {
        return (asked, format!("--source {asked}"));
    }
    if emulator {
        return (Kind::CloudShell, "--emulator without --source".into());
    }
    if endpoint_given {
        return (Kind::CloudShell, "--endpoint without --source".into());
    }
    if let Some(found) = entra_detect::detect_env(env) {
        return found;
    }
    if env.has("MSI_ENDPOINT") && !env.has("MSI_SECRET") && !env.has("IDENTITY_ENDPOINT") {
        return (
            Kind::CloudShell,
            "MSI_ENDPOINT is set without MSI_SECRET and IDENTITY_ENDPOINT".into(),
        );
    }
    if env.has("IDENTITY_ENDPOINT") && env.has("IDENTITY_HEADER") {
        return (
            Kind::AppService,
            "IDENTITY_ENDPOINT and IDENTITY_HEADER are set".into(),
        );
    }
    if env.has("IDENTITY_ENDPOINT") && env.has("IMDS_ENDPOINT") {
        return (
            Kind::Arc,
            "IDENTITY_ENDPOINT and IMDS_ENDPOINT are set".into(),
        );
    }
    if env.az_on_path {
        return (
            Kind::AzureCli,
            "az is on PATH and no managed identity endpoint is set".into(),
        );
    }
    (
        Kind::CloudShell,
        "nothing else detected: Cloud Shell's default endpoint".into(),
    )
}

/// Everything needed to build the upstream, checked before anything starts.
#[derive(Clone)]
pub struct Plan {
    pub kind: Kind,
    pub reason: String,
    /// The URL (HTTP sources); `None` until the stand-in's is given (`--emulator`).
    url: Option<String>,
    secret: Option<Zeroizing<String>>,
    identity: Identity,
    /// `--emulator`: the caller stands in for the upstream and calls `use_stand_in`.
    emulated: bool,
    /// The Entra sources' tenant, client and credential (`url` is the authority).
    entra: Option<crate::source::entra::Settings>,
    /// Where the mount's own identity came from (`.status`'s `identity.from`).
    identity_origin: String,
    /// `--identity`: the identities served besides the mount's own, each with the source
    /// settings it differs by (checked against `kind`).
    declared: Vec<(Declared, Option<crate::source::entra::Settings>)>,
}

impl fmt::Debug for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plan")
            .field("kind", &self.kind)
            .field("reason", &self.reason)
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("identity", &self.identity)
            .field("emulated", &self.emulated)
            .field("entra", &self.entra)
            .field("identity_origin", &self.identity_origin)
            .field(
                "declared",
                &self.declared.iter().map(|d| &d.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// What `--source`, `--endpoint`, `--emulator` and the identity flags ask for.
#[derive(Debug, Clone, Default)]
pub struct Wanted {
    /// `None`: auto.
    pub source: Option<Kind>,
    pub endpoint: Option<String>,
    pub emulator: bool,
    pub identity: Identity,
    /// The Entra sources: `--tenant-id`, `--authority-host`, `--federated-token-file`,
    /// `--client-secret-file`, `--client-certificate`, `--ca-file` (the client ID is
    /// `identity.client_id`).
    pub tenant_id: Option<String>,
    pub authority_host: Option<String>,
    pub federated_token_file: Option<PathBuf>,
    pub client_secret_file: Option<PathBuf>,
    pub client_certificate: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// `--identity`: the identities served besides the mount's own.
    pub identities: Vec<Declared>,
}

pub fn plan(wanted: &Wanted, env: &Env) -> Result<Plan, ConfigError> {
    let (kind, reason) = source_kind(wanted, env);
    check_declared(kind, &wanted.identities)?;
    if kind.is_entra() {
        let (authority, settings) = entra_detect::settings(kind, wanted, env)?;
        let declared = wanted
            .identities
            .iter()
            .map(|d| {
                Ok((
                    d.clone(),
                    Some(entra_detect::declared_settings(&settings, d)?),
                ))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let identity_origin = match (&wanted.identity.client_id, env.get("AZURE_CLIENT_ID")) {
            (Some(_), _) => "--client-id",
            (None, Some(_)) => "AZURE_CLIENT_ID",
            (None, None) => "the emulator's default application",
        };
        let plan = Plan {
            kind,
            reason,
            url: (!wanted.emulator).then_some(authority),
            secret: None,
            identity: Identity {
                client_id: Some(settings.client_id.clone()),
                ..Identity::default()
            },
            emulated: wanted.emulator,
            entra: Some(settings),
            identity_origin: identity_origin.into(),
            declared,
        };
        if !plan.emulated {
            plan.build()?;
            plan.build_declared()?;
        }
        return Ok(plan);
    }
    if let Some(flag) = entra_detect::entra_only_flag(wanted) {
        return Err(ConfigError::Missing(format!(
            "{flag} is for --source workload-identity or service-principal, not {kind}"
        )));
    }
    let default_url = match kind {
        Kind::CloudShell => Some(
            env.get("MSI_ENDPOINT")
                .unwrap_or(cloudshell::DEFAULT_ENDPOINT)
                .to_string(),
        ),
        Kind::Imds => Some(imds::DEFAULT_ENDPOINT.to_string()),
        Kind::AppService => env.get("IDENTITY_ENDPOINT").map(str::to_string),
        Kind::Arc => Some(
            env.get("IDENTITY_ENDPOINT")
                .unwrap_or(arc::DEFAULT_ENDPOINT)
                .to_string(),
        ),
        Kind::AzureCli | Kind::WorkloadIdentity | Kind::ServicePrincipal => None,
    };
    let url = if wanted.emulator {
        None
    } else {
        wanted.endpoint.clone().or(default_url)
    };
    let refuse = |why: &'static str| Err(ConfigError::Choice(why));
    match kind {
        Kind::AzureCli if wanted.emulator => {
            return refuse("--emulator does not serve the azure-cli source")
        }
        Kind::AzureCli if wanted.endpoint.is_some() => {
            return refuse("--endpoint does not apply to --source azure-cli")
        }
        Kind::AzureCli if !env.az_on_path => {
            return refuse(
                "--source azure-cli: az is not on PATH (install the Azure CLI, or pick another --source)",
            )
        }
        Kind::AppService if url.is_none() && !wanted.emulator => {
            return refuse("--source appservice needs IDENTITY_ENDPOINT (or --endpoint)")
        }
        Kind::AppService if !wanted.emulator && env.get("IDENTITY_HEADER").is_none() => {
            return refuse("--source appservice needs IDENTITY_HEADER (the endpoint's secret)")
        }
        _ => {}
    }
    let (identity, identity_origin) = own_identity(kind, &wanted.identity, env);
    let plan = Plan {
        kind,
        reason,
        url,
        secret: env
            .get("IDENTITY_HEADER")
            .map(|s| Zeroizing::new(s.to_string())),
        identity,
        emulated: wanted.emulator,
        entra: None,
        identity_origin,
        declared: wanted
            .identities
            .iter()
            .map(|d| (d.clone(), None))
            .collect(),
    };
    if !plan.emulated {
        // Every URL and identity problem now, not when the first reader comes.
        plan.build()?;
        plan.build_declared()?;
    }
    Ok(plan)
}

/// The usage errors of `--identity`, before anything is planned: a source with one identity
/// (cloudshell, arc, azure-cli), or selectors the source cannot send.
pub fn check_identities(wanted: &Wanted, env: &Env) -> Result<(), String> {
    if wanted.identities.is_empty() {
        return Ok(());
    }
    let kind = source_kind(wanted, env).0;
    wanted
        .identities
        .iter()
        .try_for_each(|d| d.check_for(kind))?;
    // A declared identity that is the mount's own would be a second entry, and a second
    // upstream call, for one identity: its files are the top's.
    let (own, _) = own_identity(kind, &wanted.identity, env);
    for d in &wanted.identities {
        let same = |ours: &Option<String>, theirs: &Option<String>| matches!((ours, theirs), (Some(o), Some(t)) if o.eq_ignore_ascii_case(t));
        let ids = d.identity();
        let duplicate = same(&own.client_id, &ids.client_id) && d.tenant_id.is_none()
            || same(&own.object_id, &ids.object_id)
            || same(&own.msi_res_id, &ids.msi_res_id);
        if duplicate {
            return Err(format!(
                "--identity {}: names the mount's own identity (its files are the top's): leave it out",
                d.name
            ));
        }
    }
    Ok(())
}

/// Which upstream `wanted` means in `env`, and why.
fn source_kind(wanted: &Wanted, env: &Env) -> (Kind, String) {
    let flagged = if wanted.source.is_none() && !wanted.emulator && wanted.endpoint.is_none() {
        entra_detect::detect_flags(wanted)
    } else {
        None
    };
    flagged.unwrap_or_else(|| {
        detect(
            wanted.source,
            wanted.endpoint.is_some(),
            wanted.emulator,
            env,
        )
    })
}

/// Refuses `--identity` on a source that has one identity, and selectors a source cannot
/// send (the message is a usage error's).
fn check_declared(kind: Kind, declared: &[Declared]) -> Result<(), ConfigError> {
    for d in declared {
        d.check_for(kind).map_err(ConfigError::Missing)?;
    }
    Ok(())
}

/// The mount's own identity and where it came from: the flags, else (IMDS and App Service)
/// `AZURE_CLIENT_ID` as the SDKs' `DefaultAzureCredential` takes it, else the
/// system-assigned identity. Other sources send no identity.
pub fn own_identity(kind: Kind, flags: &Identity, env: &Env) -> (Identity, String) {
    if !matches!(kind, Kind::Imds | Kind::AppService) {
        // An Entra source's client ID is the application it asks for; Cloud Shell, Arc and
        // the CLI send no identity (Cloud Shell would answer with the signed-in user's
        // token whatever was named), so none is claimed for them and a request naming one
        // is refused as undeclared.
        // (An Entra mount's client ID is `--client-id`, else `AZURE_CLIENT_ID`.)
        let ids = if kind.is_entra() {
            Identity {
                client_id: flags
                    .client_id
                    .clone()
                    .or_else(|| env.get("AZURE_CLIENT_ID").map(str::to_string)),
                ..Identity::default()
            }
        } else {
            Identity::default()
        };
        return (ids, "the source's own (it has one identity)".into());
    }
    let given: Vec<&str> = [
        (flags.client_id.is_some(), "--client-id"),
        (flags.object_id.is_some(), "--object-id"),
        (flags.msi_res_id.is_some(), "--msi-res-id"),
    ]
    .into_iter()
    .filter_map(|(g, f)| g.then_some(f))
    .collect();
    if !given.is_empty() {
        return (flags.clone(), given.join(", "));
    }
    match env.get("AZURE_CLIENT_ID") {
        Some(id) => (
            Identity {
                client_id: Some(id.to_string()),
                ..Identity::default()
            },
            "AZURE_CLIENT_ID".into(),
        ),
        None => (
            Identity::default(),
            "none given: the system-assigned identity".into(),
        ),
    }
}

impl Plan {
    /// The mount's own identity: the ids sent upstream (an Entra source's client ID).
    pub fn own_identity(&self) -> &Identity {
        &self.identity
    }

    /// Where the mount's own identity came from (a flag, `AZURE_CLIENT_ID`, none).
    pub fn identity_origin(&self) -> &str {
        &self.identity_origin
    }

    /// The declared identities (`--identity`), in order.
    pub fn declared(&self) -> impl Iterator<Item = &Declared> {
        self.declared.iter().map(|(d, _)| d)
    }

    /// Builds the source of each declared identity, in order: the mount's upstream, sent
    /// that identity's ids (IMDS, App Service) or its client ID and credential (Entra).
    pub fn build_declared(&self) -> Result<Vec<Arc<dyn Source>>, ConfigError> {
        self.declared
            .iter()
            .map(|(d, entra)| {
                let mut one = self.clone();
                one.identity = d.identity();
                one.entra = entra.clone().or(one.entra);
                one.declared = Vec::new();
                one.build()
            })
            .collect()
    }

    /// With `--emulator`: the upstream the caller must stand in for (then `use_stand_in`).
    pub fn emulated(&self) -> Option<Kind> {
        self.emulated.then_some(self.kind)
    }

    /// Points the plan at a stand-in's URL and `X-IDENTITY-HEADER` secret.
    pub fn use_stand_in(&mut self, url: String, secret: String) {
        self.url = Some(url);
        self.secret = Some(Zeroizing::new(secret));
    }

    /// Builds the client (reqwest starts a thread: call it after any fork).
    pub fn build(&self) -> Result<Arc<dyn Source>, ConfigError> {
        let url = self.url.as_deref().unwrap_or_default();
        let id = self.identity.clone();
        let secret = self.secret.as_ref().map_or("", |s| s.as_str());
        Ok(match self.kind {
            Kind::Imds => Arc::new(imds::Imds::new(url, id)?),
            Kind::AppService => Arc::new(appservice::AppService::new(url, secret, id)?),
            Kind::Arc => Arc::new(arc::ArcAgent::new(url)?),
            Kind::AzureCli => Arc::new(azure_cli::AzureCli::new("az")),
            Kind::CloudShell => Arc::new(cloudshell::CloudShell::new(url)?),
            Kind::WorkloadIdentity | Kind::ServicePrincipal => match &self.entra {
                Some(settings) => Arc::new(super::entra::Entra::new(self.kind, url, settings)?),
                None => return Err(ConfigError::Choice("an Entra source without its settings")),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[&str], az: bool) -> Env {
        Env {
            vars: vars
                .iter()
                .map(|k| (k.to_string(), format!("http://127.0.0.1:1/{k}")))
                .collect(),
            az_on_path: az,
        }
    }

    #[test]
    fn auto_detection_for_each_environment() {
        let d = |vars: &[&str], az: bool| detect(None, false, false, &env(vars, az)).0;
        assert_eq!(
            d(&["MSI_ENDPOINT"], true),
            Kind::CloudShell,
            "Cloud Shell wins over az"
        );
        assert_eq!(
            d(&["MSI_ENDPOINT", "MSI_SECRET"], false),
            Kind::CloudShell,
            "default, not detected"
        );
        assert_eq!(
            d(
                &["MSI_ENDPOINT", "IDENTITY_ENDPOINT", "IDENTITY_HEADER"],
                false
            ),
            Kind::AppService
        );
        assert_eq!(
            d(&["IDENTITY_ENDPOINT", "IDENTITY_HEADER"], true),
            Kind::AppService
        );
        assert_eq!(d(&["IDENTITY_ENDPOINT", "IMDS_ENDPOINT"], true), Kind::Arc);
        assert_eq!(d(&["IDENTITY_ENDPOINT"], true), Kind::AzureCli);
        assert_eq!(d(&[], true), Kind::AzureCli);
        assert_eq!(d(&[], false), Kind::CloudShell);
        assert_eq!(d(&["MSI_ENDPOINT", "MSI_SECRET"], true), Kind::AzureCli);
    }

    #[test]
    fn explicit_choices_win_and_imds_is_never_detected() {
        let e = env(&["IDENTITY_ENDPOINT", "IDENTITY_HEADER"], true);
        assert_eq!(
            detect(None, true, false, &e).0,
            Kind::CloudShell,
            "--endpoint means Cloud Shell"
        );
        assert_eq!(
            detect(None, false, true, &e).0,
            Kind::CloudShell,
            "--emulator means Cloud Shell"
        );
        assert_eq!(
            detect(Some(Kind::Imds), true, false, &e),
            (Kind::Imds, "--source imds".into())
        );
        for vars in [
            &[][..],
            &["MSI_ENDPOINT"],
            &["IDENTITY_ENDPOINT", "IMDS_ENDPOINT"],
        ] {
            assert_ne!(detect(None, false, false, &env(vars, false)).0, Kind::Imds);
        }
    }

    /// The mount's own identity: the flags, else AZURE_CLIENT_ID for imds and appservice
    /// (as DefaultAzureCredential takes it), else the system-assigned one; other sources
    /// send no identity from the variable.
    #[test]
    fn azure_client_id_is_the_own_identity_of_imds_and_appservice() {
        let e = Env {
            vars: [("AZURE_CLIENT_ID".to_string(), "c-env".to_string())]
                .into_iter()
                .collect(),
            az_on_path: false,
        };
        for kind in [Kind::Imds, Kind::AppService] {
            let (id, from) = own_identity(kind, &Identity::default(), &e);
            assert_eq!(
                (id.client_id.as_deref(), from.as_str()),
                (Some("c-env"), "AZURE_CLIENT_ID")
            );
            let flag = Identity {
                object_id: Some("o".into()),
                ..Identity::default()
            };
            let (id, from) = own_identity(kind, &flag, &e);
            assert_eq!((id, from.as_str()), (flag.clone(), "--object-id"));
            let (id, from) = own_identity(kind, &Identity::default(), &Env::default());
            assert_eq!(id, Identity::default());
            assert!(from.contains("system-assigned"), "{from}");
        }
        let (id, _) = own_identity(Kind::CloudShell, &Identity::default(), &e);
        assert_eq!(id, Identity::default());
        // Cloud Shell, Arc and the CLI claim no identity even when one is flagged: they
        // would send it nowhere, and a request naming it must not get their one token.
        let flag = Identity {
            client_id: Some("c-flag".into()),
            ..Identity::default()
        };
        for kind in [Kind::CloudShell, Kind::Arc, Kind::AzureCli] {
            assert_eq!(
                own_identity(kind, &flag, &e).0,
                Identity::default(),
                "{kind}"
            );
        }
        assert_eq!(own_identity(Kind::ServicePrincipal, &flag, &e).0, flag);
        let p = plan(
            &Wanted {
                source: Some(Kind::Imds),
                ..Wanted::default()
            },
            &e,
        )
        .unwrap();
        assert_eq!(p.own_identity().client_id.as_deref(), Some("c-env"));
        assert_eq!(p.identity_origin(), "AZURE_CLIENT_ID");
    }

    #[test]
    fn debug_never_shows_the_app_service_secret() {
        let e = Env {
            vars: [
                ("IDENTITY_ENDPOINT".into(), "http://127.0.0.1:1/".into()),
                ("IDENTITY_HEADER".into(), "s3cr3t".into()),
            ]
            .into_iter()
            .collect(),
            az_on_path: false,
        };
        let p = plan(&Wanted::default(), &e).unwrap();
        assert!(!format!("{e:?}{p:?}").contains("s3cr3t"));
    }

    #[test]
    fn plans_check_what_each_source_needs() {
        let w = |source: Kind, endpoint: Option<&str>| Wanted {
            source: Some(source),
            endpoint: endpoint.map(str::to_string),
            ..Wanted::default()
        };
        assert!(plan(&w(Kind::AppService, None), &env(&[], false))
            .unwrap_err()
            .to_string()
            .contains("IDENTITY_ENDPOINT"));
        assert!(plan(
            &w(Kind::AppService, Some("http://127.0.0.1:1/x")),
            &env(&[], false)
        )
        .unwrap_err()
        .to_string()
        .contains("IDENTITY_HEADER"));
        assert!(plan(&w(Kind::AzureCli, Some("http://x/")), &env(&[], false)).is_err());
        assert!(plan(&w(Kind::Imds, Some("nonsense")), &env(&[], false))
            .unwrap_err()
            .to_string()
            .contains("malformed"));
        let p = plan(
            &w(Kind::Imds, Some("http://127.0.0.1:9/t")),
            &env(&[], false),
        )
        .unwrap();
        assert_eq!(
            p.url.as_deref(),
            Some("http://127.0.0.1:9/t"),
            "--endpoint overrides any HTTP source's URL"
        );
        let p = plan(&Wanted::default(), &env(&["MSI_ENDPOINT"], false)).unwrap();
        assert_eq!(p.url.as_deref(), Some("http://127.0.0.1:1/MSI_ENDPOINT"));
        assert_eq!("azure-cli".parse::<Kind>(), Ok(Kind::AzureCli));
        assert!("vm"
            .parse::<Kind>()
            .unwrap_err()
            .to_string()
            .contains("imds"));
    }

    /// A declared identity that is the mount's own (by the flag or AZURE_CLIENT_ID) is a
    /// usage error; another is fine.
    #[test]
    fn a_declared_identity_may_not_be_the_mounts_own() {
        use crate::source::declared::{gather, parse_identity_arg};
        let e = Env {
            vars: [(
                "AZURE_CLIENT_ID".to_string(),
                "AAAAAAAA-0000-0000-0000-000000000001".to_string(),
            )]
            .into_iter()
            .collect(),
            az_on_path: false,
        };
        let declare = |arg: &str| Wanted {
            source: Some(Kind::Imds),
            identities: gather(&[parse_identity_arg(arg).unwrap()]).unwrap(),
            ..Wanted::default()
        };
        let err = check_identities(
            &declare("x=client-id=aaaaaaaa-0000-0000-0000-000000000001"),
            &e,
        )
        .unwrap_err();
        assert!(err.contains("names the mount's own identity"), "{err}");
        assert!(check_identities(
            &declare("x=client-id=bbbbbbbb-0000-0000-0000-000000000001"),
            &e
        )
        .is_ok());
        assert!(check_identities(
            &declare("x=client-id=aaaaaaaa-0000-0000-0000-000000000001"),
            &Env::default()
        )
        .is_ok());
        // An Entra mount's client ID from AZURE_CLIENT_ID counts too.
        let entra = Wanted {
            source: Some(Kind::WorkloadIdentity),
            ..declare("x=client-id=aaaaaaaa-0000-0000-0000-000000000001")
        };
        assert!(check_identities(&entra, &e).is_err());
    }
}
