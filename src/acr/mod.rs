//! Azure Container Registry credentials (`MOUNT/.acr/REGISTRY`): which names are registries
//! an Entra token may be sent to (the Azure registry suffixes and `--acr-suffix`), where
//! each is reached (HTTPS to its host, or a loopback `--acr-endpoint`), which Entra audience
//! is exchanged (`--acr-audience`), the exchange itself (`exchange`) and the Docker
//! credential helper that reads the mount (`helper`). The cache runs the exchange
//! (`cache/acr.rs`); this module knows nothing of the cache.

pub mod exchange;
pub mod helper;

use crate::names::Resource;
use std::collections::HashMap;
use std::fmt;

/// The Azure registry suffixes (the public cloud, Azure China, Azure US Government and the
/// retired Azure Germany): only hosts ending in one of these (or an `--acr-suffix`) are
/// sent an Entra token.
pub const SUFFIXES: [&str; 3] = [".azurecr.io", ".azurecr.cn", ".azurecr.us"];

/// The Entra audience of ACR's data plane.
pub const REGISTRY_AUDIENCE: &str = "https://containerregistry.azure.net/";

/// Which Entra token is exchanged at a registry (`--acr-audience`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Audience {
    /// `https://containerregistry.azure.net/`, falling back to ARM when the upstream refuses
    /// that audience (Cloud Shell's allowlist does).
    #[default]
    Registry,
    /// The ARM token of the registry's cloud (`https://management.azure.com/` for
    /// `.azurecr.io`).
    Management,
}

impl std::str::FromStr for Audience {
    type Err = String;
    fn from_str(s: &str) -> Result<Audience, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "registry" => Ok(Audience::Registry),
            "management" => Ok(Audience::Management),
            _ => Err(format!("{s:?}: one of registry, management")),
        }
    }
}

/// What the command line asks of registries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    pub audience: Audience,
    /// `--acr-suffix`: more registry suffixes, as given.
    pub suffixes: Vec<String>,
    /// `--acr-endpoint REGISTRY=URL`, as given.
    pub endpoints: Vec<String>,
}

/// Why the registry flags cannot be used (a usage error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError(String);

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SettingsError {}

/// The registries a daemon serves, checked: the suffixes, the endpoint of each registry
/// given one, the audience. Fixed at start.
#[derive(Debug, Clone)]
pub struct Registries {
    audience: Audience,
    /// Lower case, each starting with `.`.
    suffixes: Vec<String>,
    /// Registry host -> its loopback base URL (`--acr-endpoint`).
    endpoints: HashMap<String, reqwest::Url>,
}

impl Default for Registries {
    fn default() -> Registries {
        Registries {
            audience: Audience::Registry,
            suffixes: SUFFIXES.iter().map(|s| s.to_string()).collect(),
            endpoints: HashMap::new(),
        }
    }
}

impl Registries {
    /// Checks the flags: each suffix a DNS name, each endpoint `REGISTRY=http://LOOPBACK[:PORT]`
    /// for a registry name the suffixes allow.
    pub fn new(settings: &Settings) -> Result<Registries, SettingsError> {
        let mut registries = Registries {
            audience: settings.audience,
            ..Registries::default()
        };
        for given in &settings.suffixes {
            let bare = given.trim().trim_start_matches('.').trim_end_matches('.');
            // A DNS name whose last label is not all digits: no suffix makes an IP address
            // (`0.1` would make 127.0.0.1 a "registry").
            let numeric_tld = bare
                .rsplit('.')
                .next()
                .is_none_or(|tld| tld.bytes().all(|b| b.is_ascii_digit()));
            if Resource::registry(bare).is_none() || numeric_tld {
                return Err(SettingsError(format!(
                    "--acr-suffix {given:?}: not a DNS name of two labels or more (such as azurecr.example)"
                )));
            }
            let suffix = format!(".{}", bare.to_ascii_lowercase());
            if !registries.suffixes.contains(&suffix) {
                registries.suffixes.push(suffix);
            }
        }
        for given in &settings.endpoints {
            // Named by its registry only: the URL may carry credentials.
            let shown = given.split_once('=').map_or("REGISTRY", |(name, _)| name);
            let bad = |why: &str| SettingsError(format!("--acr-endpoint {shown}=...: {why}"));
            let (name, url) = given
                .split_once('=')
                .ok_or_else(|| bad("not REGISTRY=http://127.0.0.1:PORT"))?;
            let host = registries
                .host_of(name)
                .ok_or_else(|| bad("not a registry name (a host ending in an Azure registry suffix or an --acr-suffix)"))?;
            let url = reqwest::Url::parse(url.trim()).map_err(|e| bad(&format!("bad URL: {e}")))?;
            if url.scheme() != "http" && url.scheme() != "https" {
                return Err(bad("the URL must start with http:// or https://"));
            }
            // An IP literal, as the emulator's --listen: a name (even localhost) is resolved
            // through NSS, which an Entra token must not depend on.
            let host_ip = url.host_str().unwrap_or_default();
            let host_ip = host_ip.trim_start_matches('[').trim_end_matches(']');
            if !host_ip
                .parse::<std::net::IpAddr>()
                .is_ok_and(crate::net::is_loopback)
            {
                return Err(bad(
                    "only a loopback address (127.0.0.0/8 or [::1], not a name) may stand in for a registry",
                ));
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err(bad("the URL must not carry a user name or password"));
            }
            if !matches!(url.path(), "" | "/") || url.query().is_some() {
                return Err(bad(
                    "the URL must have no path or query (http://127.0.0.1:PORT)",
                ));
            }
            registries.endpoints.insert(host, url);
        }
        Ok(registries)
    }

    /// The registry host `name` stands for (lower case, no trailing dot), if it may be sent
    /// an Entra token: a DNS name ending in an allowed suffix, with a label before it.
    pub fn host_of(&self, name: &str) -> Option<String> {
        let resource = Resource::registry(name.trim())?;
        let host = resource.registry_host()?;
        self.suffixes
            .iter()
            .any(|s| host.len() > s.len() && host.ends_with(s.as_str()))
            .then(|| host.to_string())
    }

    /// The cache key's resource of registry `name` ([`Registries::host_of`]).
    pub fn resource(&self, name: &str) -> Option<Resource> {
        Resource::registry(&self.host_of(name)?)
    }

    /// Whether `resource` is a registry's key this daemon may exchange for.
    pub fn serves(&self, resource: &Resource) -> bool {
        resource
            .registry_host()
            .is_some_and(|h| self.host_of(h).is_some())
    }

    /// Where `host`'s `/oauth2/exchange` is: its `--acr-endpoint`, else `https://HOST/`.
    pub fn base_url(&self, host: &str) -> Option<reqwest::Url> {
        match self.endpoints.get(host) {
            Some(url) => Some(url.clone()),
            None => reqwest::Url::parse(&format!("https://{host}/")).ok(),
        }
    }

    /// The loopback endpoints given (their clients skip proxies).
    pub fn endpoints(&self) -> impl Iterator<Item = (&str, &reqwest::Url)> {
        self.endpoints.iter().map(|(h, u)| (h.as_str(), u))
    }

    /// The Entra resources to ask for `host`'s exchange, in order: the registry audience
    /// then the ARM one of the registry's cloud (the fallback when the upstream refuses the
    /// first); only the ARM one with `--acr-audience management` or `registry_refused`.
    pub fn audiences(&self, host: &str, registry_refused: bool) -> Vec<Resource> {
        let arm = management_audience(host);
        let wanted = match (self.audience, registry_refused) {
            (Audience::Registry, false) => vec![REGISTRY_AUDIENCE, arm],
            _ => vec![arm],
        };
        wanted
            .into_iter()
            .filter_map(|r| crate::names::resolve_arg(r).ok())
            .collect()
    }
}

/// The ARM audience of a registry's cloud, by its suffix.
fn management_audience(host: &str) -> &'static str {
    if host.ends_with(".azurecr.cn") {
        "https://management.chinacloudapi.cn/"
    } else if host.ends_with(".azurecr.us") {
        "https://management.usgovcloudapi.net/"
    } else {
        "https://management.azure.com/"
    }
}

/// The registry a Docker server URL names: `https://myregistry.azurecr.io/v2/` and
/// `myregistry.azurecr.io:443` are `myregistry.azurecr.io` (scheme, user, port, path,
/// case and a trailing dot dropped). `None` when no host is left.
pub fn server_host(server_url: &str) -> Option<String> {
    let s = server_url.trim();
    let s = s.split_once("://").map_or(s, |(_, rest)| rest);
    let authority = s.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match authority.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(suffixes: &[&str], endpoints: &[&str]) -> Result<Registries, SettingsError> {
        Registries::new(&Settings {
            audience: Audience::Registry,
            suffixes: suffixes.iter().map(|s| s.to_string()).collect(),
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
        })
    }

    #[test]
    fn only_hosts_under_a_registry_suffix_are_registries() {
        let r = Registries::default();
        for ok in [
            "myregistry.azurecr.io",
            "MyRegistry.AzureCR.io.",
            "reg.azurecr.cn",
            "reg.azurecr.us",
            "reg.eastus.data.azurecr.io",
        ] {
            assert!(r.host_of(ok).is_some(), "{ok}");
        }
        for refused in [
            "attacker.example",
            "azurecr.io",
            ".azurecr.io",
            "myregistry.azurecr.io.attacker.example",
            "myregistryazurecr.io",
            "127.0.0.1",
            "reg.azurecr.io:443",
            "reg.azurecr.io/x",
            "",
        ] {
            assert!(r.host_of(refused).is_none(), "{refused}");
        }
        let r = with(&[".Registry.Example."], &[]).unwrap();
        assert_eq!(
            r.host_of("a.registry.example").as_deref(),
            Some("a.registry.example")
        );
        assert!(with(&["example"], &[]).is_err());
        // No suffix turns an IP address into a registry name.
        assert!(with(&["0.1"], &[]).is_err());
        assert!(with(&[".1"], &[]).is_err());
        assert!(with(&["a b.example"], &[]).is_err());
    }

    #[test]
    fn endpoints_are_loopback_only_and_for_registries_only() {
        let r = with(&[], &["myregistry.azurecr.io=http://127.0.0.1:8080"]).unwrap();
        assert_eq!(
            r.base_url("myregistry.azurecr.io").unwrap().as_str(),
            "http://127.0.0.1:8080/"
        );
        assert_eq!(
            r.base_url("other.azurecr.io").unwrap().as_str(),
            "https://other.azurecr.io/"
        );
        for bad in [
            "myregistry.azurecr.io=http://10.0.0.1:8080",
            "myregistry.azurecr.io=http://example.com",
            "attacker.example=http://127.0.0.1:1",
            "myregistry.azurecr.io",
            "myregistry.azurecr.io=ftp://127.0.0.1",
            "myregistry.azurecr.io=http://u:p@127.0.0.1:1",
            "myregistry.azurecr.io=http://127.0.0.1:1/x",
            // A name, even localhost, is resolved through NSS: IP literals only.
            "myregistry.azurecr.io=http://localhost:9",
        ] {
            let e = with(&[], &[bad]).unwrap_err().to_string();
            assert!(e.starts_with("--acr-endpoint"), "{bad}: {e}");
            assert!(!e.contains("u:p"), "{e}");
        }
        assert!(with(&[], &["myregistry.azurecr.io=http://[::1]:9"]).is_ok());
    }

    #[test]
    fn the_registry_audience_falls_back_to_the_registrys_cloud_arm() {
        let r = Registries::default();
        let names = |v: Vec<Resource>| v.iter().map(|r| r.to_string()).collect::<Vec<_>>();
        assert_eq!(
            names(r.audiences("a.azurecr.io", false)),
            [REGISTRY_AUDIENCE, "https://management.azure.com/"]
        );
        assert_eq!(
            names(r.audiences("a.azurecr.io", true)),
            ["https://management.azure.com/"]
        );
        assert_eq!(
            names(r.audiences("a.azurecr.cn", true)),
            ["https://management.chinacloudapi.cn/"]
        );
        let m = Registries::new(&Settings {
            audience: Audience::Management,
            ..Settings::default()
        })
        .unwrap();
        assert_eq!(
            names(m.audiences("a.azurecr.us", false)),
            ["https://management.usgovcloudapi.net/"]
        );
    }

    #[test]
    fn docker_server_urls_name_their_host() {
        for (url, host) in [
            ("myregistry.azurecr.io", "myregistry.azurecr.io"),
            ("https://myregistry.azurecr.io", "myregistry.azurecr.io"),
            ("https://MyRegistry.azurecr.io/v2/", "myregistry.azurecr.io"),
            ("myregistry.azurecr.io:443\n", "myregistry.azurecr.io"),
            (
                "https://user@myregistry.azurecr.io./x?y",
                "myregistry.azurecr.io",
            ),
        ] {
            assert_eq!(server_host(url).as_deref(), Some(host), "{url}");
        }
        assert_eq!(server_host(""), None);
        assert_eq!(server_host("https:///v2"), None);
    }
}
