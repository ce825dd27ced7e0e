//! Which upstream to use: `--source`, or detected from the environment the way the Azure
//! SDKs do. Auto never probes the network: IMDS is used only when chosen.

use super::{appservice, arc, azure_cli, cloudshell, imds, Identity, Source};
use crate::emulator::{Emulator, EmulatorConfig, Protocol};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Auto,
    CloudShell,
    Imds,
    AppService,
    Arc,
    AzureCli,
}

impl Kind {
    pub const NAMES: &'static str = "auto, cloudshell, imds, appservice, arc, azure-cli";

    pub fn name(self) -> &'static str {
        match self {
            Kind::Auto => "auto",
            Kind::CloudShell => "cloudshell",
            Kind::Imds => "imds",
            Kind::AppService => "appservice",
            Kind::Arc => "arc",
            Kind::AzureCli => "azure-cli",
        }
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Kind, String> {
        [
            Kind::Auto,
            Kind::CloudShell,
            Kind::Imds,
            Kind::AppService,
            Kind::Arc,
            Kind::AzureCli,
        ]
        .into_iter()
        .find(|k| k.name() == s)
        .ok_or_else(|| format!("unknown source {s:?}: one of {}", Kind::NAMES))
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

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

/// The upstream to use and why (for the log and `.status`). Pure.
pub fn detect(asked: Kind, endpoint_given: bool, emulator: bool, env: &Env) -> (Kind, String) {
    if asked != Kind::Auto {
        return (asked, format!("--source {asked}"));
    }
    if emulator {
        return (Kind::CloudShell, "--emulator without --source".into());
    }
    if endpoint_given {
        return (Kind::CloudShell, "--endpoint without --source".into());
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
    /// The URL (HTTP sources); `None` with the emulator, which picks its own port.
    url: Option<String>,
    secret: Option<String>,
    identity: Identity,
    emulator: bool,
}

impl fmt::Debug for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plan")
            .field("kind", &self.kind)
            .field("reason", &self.reason)
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("identity", &self.identity)
            .field("emulator", &self.emulator)
            .finish()
    }
}

/// What `--source`, `--endpoint`, `--emulator` and the identity flags ask for.
#[derive(Debug, Clone, Default)]
pub struct Wanted {
    pub source: Option<Kind>,
    pub endpoint: Option<String>,
    pub emulator: bool,
    pub identity: Identity,
}

pub fn plan(wanted: &Wanted, env: &Env) -> Result<Plan, String> {
    let asked = wanted.source.unwrap_or(Kind::Auto);
    let (kind, reason) = detect(asked, wanted.endpoint.is_some(), wanted.emulator, env);
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
        Kind::AzureCli | Kind::Auto => None,
    };
    let url = if wanted.emulator {
        None
    } else {
        wanted.endpoint.clone().or(default_url)
    };
    match kind {
        Kind::AzureCli if wanted.emulator => {
            return Err("--emulator does not serve the azure-cli source".into())
        }
        Kind::AzureCli if wanted.endpoint.is_some() => {
            return Err("--endpoint does not apply to --source azure-cli".into())
        }
        Kind::AzureCli if !env.az_on_path => {
            return Err(
                "--source azure-cli: az is not on PATH (install the Azure CLI, or pick another --source)"
                    .into(),
            )
        }
        Kind::AppService if url.is_none() && !wanted.emulator => {
            return Err("--source appservice needs IDENTITY_ENDPOINT (or --endpoint)".into())
        }
        Kind::AppService if !wanted.emulator && env.get("IDENTITY_HEADER").is_none() => {
            return Err("--source appservice needs IDENTITY_HEADER (the endpoint's secret)".into())
        }
        _ => {}
    }
    if let Some(u) = &url {
        super::http::check_url(u)?;
    }
    Ok(Plan {
        kind,
        reason,
        url,
        secret: env.get("IDENTITY_HEADER").map(str::to_string),
        identity: wanted.identity.clone(),
        emulator: wanted.emulator,
    })
}

/// The upstream, built; holds the emulator (if any) alive.
pub struct Chosen {
    pub source: Arc<dyn Source>,
    pub kind: Kind,
    pub reason: String,
    pub emulator: Option<Emulator>,
}

impl Plan {
    /// Builds the client (this starts threads: call it after any fork).
    pub fn build(self) -> Result<Chosen, String> {
        let mut emulator = None;
        let (url, secret) = if self.emulator {
            let protocol = match self.kind {
                Kind::Imds => Protocol::Imds,
                Kind::AppService => Protocol::AppService,
                Kind::Arc => Protocol::Arc,
                _ => Protocol::CloudShell,
            };
            let emu = Emulator::start_with(
                ([127, 0, 0, 1], 0).into(),
                EmulatorConfig::default(),
                protocol,
            )
            .map_err(|e| format!("cannot start the emulator: {e}"))?;
            let pair = (emu.url(), Some(emu.identity_header()));
            emulator = Some(emu);
            pair
        } else {
            (self.url.clone().unwrap_or_default(), self.secret.clone())
        };
        let id = self.identity.clone();
        let source: Arc<dyn Source> = match self.kind {
            Kind::Imds => Arc::new(imds::Imds::new(&url, id)?),
            Kind::AppService => Arc::new(appservice::AppService::new(
                &url,
                secret.as_deref().unwrap_or(""),
                id,
            )?),
            Kind::Arc => Arc::new(arc::Arc::new(&url)?),
            Kind::AzureCli => Arc::new(azure_cli::AzureCli::new("az")),
            Kind::CloudShell | Kind::Auto => Arc::new(cloudshell::CloudShell::new(&url)?),
        };
        Ok(Chosen {
            source,
            kind: self.kind,
            reason: self.reason,
            emulator,
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
        let d = |vars: &[&str], az: bool| detect(Kind::Auto, false, false, &env(vars, az)).0;
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
            detect(Kind::Auto, true, false, &e).0,
            Kind::CloudShell,
            "--endpoint means Cloud Shell"
        );
        assert_eq!(
            detect(Kind::Auto, false, true, &e).0,
            Kind::CloudShell,
            "--emulator means Cloud Shell"
        );
        assert_eq!(
            detect(Kind::Imds, true, false, &e),
            (Kind::Imds, "--source imds".into())
        );
        for vars in [
            &[][..],
            &["MSI_ENDPOINT"],
            &["IDENTITY_ENDPOINT", "IMDS_ENDPOINT"],
        ] {
            assert_ne!(
                detect(Kind::Auto, false, false, &env(vars, false)).0,
                Kind::Imds
            );
        }
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
            .contains("IDENTITY_ENDPOINT"));
        assert!(plan(
            &w(Kind::AppService, Some("http://127.0.0.1:1/x")),
            &env(&[], false)
        )
        .unwrap_err()
        .contains("IDENTITY_HEADER"));
        assert!(plan(&w(Kind::AzureCli, Some("http://x/")), &env(&[], false)).is_err());
        assert!(plan(&w(Kind::Imds, Some("nonsense")), &env(&[], false))
            .unwrap_err()
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
        assert!("vm".parse::<Kind>().unwrap_err().contains("imds"));
    }
}
