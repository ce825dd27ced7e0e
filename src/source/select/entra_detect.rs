//! Detection and planning of the Microsoft Entra sources: a service principal (secret or
//! certificate), then workload identity, in the Azure SDKs' order; flags win over the
//! variables they stand for.

use super::{Env, Wanted};
use crate::source::assertion::ClientCertificate;
use crate::source::declared::Declared;
use crate::source::entra::{Credential, Settings};
use crate::source::{client_tls, ConfigError, Kind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zeroize::Zeroizing;

/// The variables the Entra sources read (besides the managed-identity ones).
pub const VARS: [&str; 6] = [
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
];

/// Tenant and client ID used with `--emulator` when none is given.
const EMULATED_TENANT: &str = "00000000-0000-0000-0000-00000000e111";
const EMULATED_CLIENT: &str = "00000000-0000-0000-0000-00000000c11e";

/// A credential flag without `--source` picks its source.
pub fn detect_flags(wanted: &Wanted) -> Option<(Kind, String)> {
    if wanted.client_secret_file.is_some() {
        return Some((
            Kind::ServicePrincipal,
            "--client-secret-file without --source".into(),
        ));
    }
    if wanted.client_certificate.is_some() {
        return Some((
            Kind::ServicePrincipal,
            "--client-certificate without --source".into(),
        ));
    }
    if wanted.federated_token_file.is_some() {
        return Some((
            Kind::WorkloadIdentity,
            "--federated-token-file without --source".into(),
        ));
    }
    None
}

/// The first flag given that only the Entra sources take.
pub fn entra_only_flag(wanted: &Wanted) -> Option<&'static str> {
    [
        (wanted.tenant_id.is_some(), "--tenant-id"),
        (wanted.authority_host.is_some(), "--authority-host"),
        (
            wanted.federated_token_file.is_some(),
            "--federated-token-file",
        ),
        (wanted.client_secret_file.is_some(), "--client-secret-file"),
        (wanted.client_certificate.is_some(), "--client-certificate"),
        (wanted.ca_file.is_some(), "--ca-file"),
    ]
    .into_iter()
    .find_map(|(given, flag)| given.then_some(flag))
}

/// The SDKs' EnvironmentCredential, then WorkloadIdentityCredential.
pub fn detect_env(env: &Env) -> Option<(Kind, String)> {
    let ids = env.has("AZURE_TENANT_ID") && env.has("AZURE_CLIENT_ID");
    if ids && env.has("AZURE_CLIENT_SECRET") {
        return Some((
            Kind::ServicePrincipal,
            "AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET are set".into(),
        ));
    }
    if ids && env.has("AZURE_CLIENT_CERTIFICATE_PATH") {
        return Some((
            Kind::ServicePrincipal,
            "AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_CERTIFICATE_PATH are set".into(),
        ));
    }
    if ids && env.has("AZURE_FEDERATED_TOKEN_FILE") {
        return Some((
            Kind::WorkloadIdentity,
            "AZURE_FEDERATED_TOKEN_FILE, AZURE_CLIENT_ID and AZURE_TENANT_ID are set".into(),
        ));
    }
    None
}

/// The authority (checked) and everything else the source needs; files are read now
/// (the secret, the certificate, `--ca-file`), except the federated token: it is read for
/// every request.
pub fn settings(kind: Kind, wanted: &Wanted, env: &Env) -> Result<(String, Settings), ConfigError> {
    let name = kind.name();
    if wanted.endpoint.is_some() {
        return Err(ConfigError::Choice(
            "--endpoint does not apply to the Entra sources: use --authority-host",
        ));
    }
    let emulated = wanted.emulator;
    let pick = |flag: &Option<String>, var: &str| {
        flag.clone()
            .filter(|v| !v.is_empty())
            .or_else(|| env.get(var).map(str::to_string))
    };
    let tenant = match pick(&wanted.tenant_id, "AZURE_TENANT_ID") {
        Some(t) => t,
        None if emulated => EMULATED_TENANT.into(),
        None => {
            return Err(ConfigError::Missing(format!(
                "--source {name} needs AZURE_TENANT_ID (or --tenant-id)"
            )))
        }
    };
    // The tenant and the authority are checked once, by `Plan::build` (`client_tls::token_url`).
    let client_id = match pick(&wanted.identity.client_id, "AZURE_CLIENT_ID") {
        Some(c) => c,
        None if emulated => EMULATED_CLIENT.into(),
        None => {
            return Err(ConfigError::Missing(format!(
                "--source {name} needs AZURE_CLIENT_ID (or --client-id)"
            )))
        }
    };
    let authority = wanted
        .authority_host
        .clone()
        .or_else(|| env.get("AZURE_AUTHORITY_HOST").map(str::to_string))
        .unwrap_or_else(|| client_tls::DEFAULT_AUTHORITY.to_string());
    let credential = match kind {
        Kind::WorkloadIdentity => workload_credential(wanted, env, emulated)?,
        _ => principal_credential(wanted, env, emulated)?,
    };
    let ca = match &wanted.ca_file {
        Some(path) => client_tls::ca_certificates(path)?,
        None => Vec::new(),
    };
    Ok((
        authority,
        Settings {
            tenant,
            client_id,
            credential,
            ca,
        },
    ))
}

/// A declared identity's settings: its client ID, and its tenant and credential where it
/// gives them, else the mount's (one federated token file serves every client ID federated
/// with it). Its files are read now.
pub fn declared_settings(mount: &Settings, d: &Declared) -> Result<Settings, ConfigError> {
    let credential = match (&d.client_secret_file, &d.client_certificate) {
        (Some(path), _) => secret_file(path)?,
        (None, Some(path)) => certificate(path)?,
        (None, None) => mount.credential.clone(),
    };
    Ok(Settings {
        tenant: d.tenant_id.clone().unwrap_or_else(|| mount.tenant.clone()),
        client_id: d
            .client_id
            .clone()
            .unwrap_or_else(|| mount.client_id.clone()),
        credential,
        ca: mount.ca.clone(),
    })
}

fn workload_credential(
    wanted: &Wanted,
    env: &Env,
    emulated: bool,
) -> Result<Credential, ConfigError> {
    if wanted.client_secret_file.is_some() || wanted.client_certificate.is_some() {
        return Err(ConfigError::Choice(
            "--source workload-identity takes --federated-token-file, not a secret or certificate",
        ));
    }
    let file = wanted
        .federated_token_file
        .clone()
        .or_else(|| env.get("AZURE_FEDERATED_TOKEN_FILE").map(PathBuf::from));
    match file {
        Some(path) => Ok(Credential::FederatedTokenFile(path)),
        None if emulated => Ok(emulated_secret()),
        None => Err(ConfigError::Missing(
            "--source workload-identity needs AZURE_FEDERATED_TOKEN_FILE (or --federated-token-file)"
                .into(),
        )),
    }
}

fn principal_credential(
    wanted: &Wanted,
    env: &Env,
    emulated: bool,
) -> Result<Credential, ConfigError> {
    if wanted.federated_token_file.is_some() {
        return Err(ConfigError::Choice(
            "--federated-token-file is for --source workload-identity",
        ));
    }
    match (&wanted.client_secret_file, &wanted.client_certificate) {
        (Some(_), Some(_)) => Err(ConfigError::Choice(
            "--client-secret-file and --client-certificate do not go together: pick one",
        )),
        (Some(path), None) => secret_file(path),
        (None, Some(path)) => certificate(path),
        (None, None) => {
            if let Some(secret) = env.get("AZURE_CLIENT_SECRET") {
                Ok(Credential::Secret(Arc::new(Zeroizing::new(
                    secret.to_string(),
                ))))
            } else if let Some(path) = env.get("AZURE_CLIENT_CERTIFICATE_PATH") {
                certificate(Path::new(path))
            } else if emulated {
                Ok(emulated_secret())
            } else {
                Err(ConfigError::Missing(
                    "--source service-principal needs AZURE_CLIENT_SECRET or AZURE_CLIENT_CERTIFICATE_PATH (or --client-secret-file, --client-certificate)"
                        .into(),
                ))
            }
        }
    }
}

fn emulated_secret() -> Credential {
    Credential::Secret(Arc::new(Zeroizing::new("cstokenfs-emulator".into())))
}

fn certificate(path: &Path) -> Result<Credential, ConfigError> {
    Ok(Credential::Certificate(Arc::new(ClientCertificate::load(
        path,
    )?)))
}

/// `--client-secret-file`: the contents without one trailing newline, non-empty.
fn secret_file(path: &Path) -> Result<Credential, ConfigError> {
    let bad = |problem: String| ConfigError::File {
        what: "--client-secret-file",
        path: path.display().to_string(),
        problem,
    };
    let secret = crate::hardening::read_secret_file(path).map_err(|e| bad(e.to_string()))?;
    Ok(Credential::Secret(Arc::new(secret)))
}

#[cfg(test)]
mod tests {
    use super::super::{detect, plan, Env, Wanted};
    use crate::source::Kind;

    fn env(vars: &[(&str, &str)]) -> Env {
        Env {
            vars: vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            az_on_path: true,
        }
    }

    const SP: [(&str, &str); 3] = [
        ("AZURE_TENANT_ID", "t"),
        ("AZURE_CLIENT_ID", "c"),
        ("AZURE_CLIENT_SECRET", "hunter2-secret"),
    ];

    #[test]
    fn the_sdks_order_and_explicit_flags_win() {
        let d = |vars: &[(&str, &str)]| detect(None, false, false, &env(vars)).0;
        let wi = [
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/f"),
        ];
        assert_eq!(d(&SP), Kind::ServicePrincipal);
        assert_eq!(d(&wi), Kind::WorkloadIdentity);
        let mut both = SP.to_vec();
        both.extend(wi);
        both.push(("MSI_ENDPOINT", "http://127.0.0.1:1/"));
        assert_eq!(d(&both), Kind::ServicePrincipal);
        let cert = [
            ("AZURE_TENANT_ID", "t"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_CLIENT_CERTIFICATE_PATH", "/p"),
        ];
        assert_eq!(d(&cert), Kind::ServicePrincipal);
        assert_eq!(d(&SP[1..]), Kind::AzureCli, "no tenant: not a principal");
        assert_eq!(d(&wi[..2]), Kind::AzureCli);
        let e = env(&both);
        assert_eq!(detect(None, true, false, &e).0, Kind::CloudShell);
        assert_eq!(detect(None, false, true, &e).0, Kind::CloudShell);
        assert_eq!(detect(Some(Kind::Imds), false, false, &e).0, Kind::Imds);
        let (_, reason) = detect(None, false, false, &env(&wi));
        assert!(reason.contains("AZURE_FEDERATED_TOKEN_FILE"), "{reason}");
    }

    #[test]
    fn plans_name_what_is_missing_and_never_show_the_secret() {
        let w = |kind| Wanted {
            source: Some(kind),
            ..Wanted::default()
        };
        let err = |wanted: &Wanted, vars: &[(&str, &str)]| {
            plan(wanted, &env(vars)).unwrap_err().to_string()
        };
        assert!(err(&w(Kind::ServicePrincipal), &[]).contains("AZURE_TENANT_ID"));
        assert!(err(&w(Kind::ServicePrincipal), &SP[..1]).contains("AZURE_CLIENT_ID"));
        assert!(err(&w(Kind::ServicePrincipal), &SP[..2]).contains("AZURE_CLIENT_SECRET"));
        assert!(err(&w(Kind::WorkloadIdentity), &SP[..2]).contains("AZURE_FEDERATED_TOKEN_FILE"));
        let mut bad = SP.to_vec();
        bad.push(("AZURE_AUTHORITY_HOST", "http://login.example/"));
        assert!(err(&w(Kind::ServicePrincipal), &bad).contains("https://"));
        let endpoint = Wanted {
            endpoint: Some("http://127.0.0.1:1/".into()),
            ..w(Kind::ServicePrincipal)
        };
        assert!(err(&endpoint, &SP).contains("--authority-host"));
        let p = plan(&Wanted::default(), &env(&SP)).unwrap();
        assert_eq!(p.kind, Kind::ServicePrincipal);
        assert!(!format!("{p:?}").contains("hunter2"));
        let flagged = Wanted {
            federated_token_file: Some("/var/run/token".into()),
            ..Wanted::default()
        };
        let p = plan(&flagged, &env(&SP[..2])).unwrap();
        assert_eq!(
            p.kind,
            Kind::WorkloadIdentity,
            "a credential flag picks its source"
        );
        let emulated = Wanted {
            emulator: true,
            ..w(Kind::ServicePrincipal)
        };
        assert!(
            plan(&emulated, &env(&[])).is_ok(),
            "--emulator needs no variables"
        );
        let imds = Wanted {
            ca_file: Some("/ca.pem".into()),
            ..w(Kind::Imds)
        };
        assert!(err(&imds, &[]).contains("--ca-file is for"));
    }

    /// A declared identity's settings: its client ID; its tenant and credential where it
    /// gives them, else the mount's.
    #[test]
    fn a_declared_identity_takes_what_it_does_not_set_from_the_mount() {
        use super::super::super::declared::Declared;
        use super::{declared_settings, Credential, Settings};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "its-own\n").unwrap();
        let mount = Settings {
            tenant: "t".into(),
            client_id: "c".into(),
            credential: Credential::FederatedTokenFile("/var/run/token".into()),
            ca: Vec::new(),
        };
        let d = Declared {
            name: "x".into(),
            client_id: Some("c2".into()),
            ..Declared::default()
        };
        let got = declared_settings(&mount, &d).unwrap();
        assert_eq!((got.tenant.as_str(), got.client_id.as_str()), ("t", "c2"));
        assert!(
            matches!(got.credential, Credential::FederatedTokenFile(ref p) if p.to_str() == Some("/var/run/token"))
        );
        let d = Declared {
            tenant_id: Some("t2".into()),
            client_secret_file: Some(path),
            ..d
        };
        let got = declared_settings(&mount, &d).unwrap();
        assert_eq!(got.tenant, "t2");
        assert!(matches!(got.credential, Credential::Secret(ref s) if s.as_str() == "its-own"));
    }

    #[test]
    fn a_secret_file_loses_its_trailing_newline_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "abc\n").unwrap();
        match super::secret_file(&path).unwrap() {
            super::Credential::Secret(s) => assert_eq!(s.as_str(), "abc"),
            other => panic!("{other:?}"),
        }
        std::fs::write(&path, "\n").unwrap();
        assert!(super::secret_file(&path)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        std::fs::write(&path, "a\nb\n").unwrap();
        assert!(super::secret_file(&path).is_err());
    }
}
