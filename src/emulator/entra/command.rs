//! `cstokenfs emulator --protocol entra`: its options and the command.

use super::{EntraSettings, Federated, FEDERATED_AUDIENCE};
use crate::emulator::{Emulator, EmulatorConfig, Kind};
use clap::Args;
use std::fmt;
use std::io;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The Entra emulator's options (`--protocol entra`).
#[derive(Args, Debug, Clone, Default)]
pub struct EntraEmulatorArgs {
    /// Entra: accept only this tenant [default: any].
    #[arg(long, value_name = "ID")]
    pub tenant_id: Option<String>,
    /// Entra: accept only this client ID, or these (comma-separated: one application per
    /// declared identity) [default: any].
    #[arg(long, value_name = "ID")]
    pub client_id: Option<String>,
    /// Entra: the client secret is this file's contents (one trailing newline trimmed).
    #[arg(long, value_name = "PATH")]
    pub client_secret_file: Option<PathBuf>,
    /// Entra: accept a federated assertion equal to this file's contents at request time.
    #[arg(long, value_name = "PATH")]
    pub federated_token_file: Option<PathBuf>,
    /// Entra: accept certificate assertions whose signature verifies against this PEM
    /// certificate (a key in the file is ignored).
    #[arg(long, value_name = "PATH")]
    pub client_certificate: Option<PathBuf>,
    /// Entra: a federated identity credential of application CLIENT_ID: accept an
    /// assertion whose iss and sub are these and whose aud holds
    /// api://AzureADTokenExchange (claims read unverified). Repeatable.
    #[arg(long, value_name = "CLIENT_ID=ISSUER,SUBJECT", value_parser = federated)]
    pub federated: Vec<Federated>,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// Why `emulator --protocol entra` cannot run: an option's file (a usage error), or the
/// server (a failure at run time).
#[derive(Debug)]
pub enum EntraCommandError {
    /// A file given to `flag` cannot be read or used; `problem` says how (never its
    /// contents).
    File {
        flag: &'static str,
        path: PathBuf,
        problem: String,
    },
    /// `--tls-cert` and `--tls-key` do not make a TLS server configuration.
    Tls(io::Error),
    /// The address cannot be listened on.
    Listen(SocketAddr, io::Error),
    /// The signal handlers cannot be registered.
    Signals(io::Error),
}

impl EntraCommandError {
    /// Whether the command line is what is wrong (its options' files).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            EntraCommandError::File { .. } | EntraCommandError::Tls(_)
        )
    }

    fn file(flag: &'static str, path: &Path, problem: impl fmt::Display) -> EntraCommandError {
        EntraCommandError::File {
            flag,
            path: path.to_path_buf(),
            problem: problem.to_string(),
        }
    }
}

impl fmt::Display for EntraCommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntraCommandError::File {
                flag,
                path,
                problem,
            } => write!(f, "{flag} {}: {problem}", path.display()),
            EntraCommandError::Tls(e) => e.fmt(f),
            EntraCommandError::Listen(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            EntraCommandError::Signals(e) => write!(f, "cannot handle signals: {e}"),
        }
    }
}

impl std::error::Error for EntraCommandError {}

impl EntraEmulatorArgs {
    /// Whether any Entra option was given.
    pub fn is_given(&self) -> bool {
        self.tenant_id.is_some()
            || self.client_id.is_some()
            || self.client_secret_file.is_some()
            || self.federated_token_file.is_some()
            || self.client_certificate.is_some()
            || !self.federated.is_empty()
            || self.tls_cert.is_some()
    }

    /// The settings and the TLS configuration the options give; a file that cannot be
    /// read or used is an error naming its flag and the file (a usage error).
    pub fn resolve(
        &self,
    ) -> Result<(EntraSettings, Option<Arc<rustls::ServerConfig>>), EntraCommandError> {
        Ok((self.settings()?, self.tls()?))
    }

    /// The settings the options give; an unreadable file is an error naming it.
    fn settings(&self) -> Result<EntraSettings, EntraCommandError> {
        let client_secret = match &self.client_secret_file {
            Some(path) => Some(
                crate::hardening::read_secret_file(path)
                    .map_err(|e| EntraCommandError::file("--client-secret-file", path, e))?
                    .to_string(),
            ),
            None => None,
        };
        let client_certificate = match &self.client_certificate {
            Some(path) => Some(
                crate::source::assertion::first_certificate(&read_certificate(
                    "--client-certificate",
                    path,
                )?)
                .ok_or_else(|| {
                    EntraCommandError::file(
                        "--client-certificate",
                        path,
                        "holds no PEM certificate",
                    )
                })?,
            ),
            None => None,
        };
        Ok(EntraSettings {
            tenant: self.tenant_id.clone(),
            client_id: self.client_id.clone(),
            client_secret,
            federated_token_file: self.federated_token_file.clone(),
            client_certificate,
            federated: self.federated.clone(),
        })
    }

    fn tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>, EntraCommandError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        crate::httpserver::tls::server_config(
            &read_certificate("--tls-cert", cert)?,
            &read_certificate("--tls-key", key)?,
        )
        .map(Some)
        .map_err(EntraCommandError::Tls)
    }
}

/// Serves the Entra protocol with `settings` (and HTTPS with `tls`), from
/// [`EntraEmulatorArgs::resolve`], until SIGTERM or SIGINT; prints
/// `AZURE_AUTHORITY_HOST=<url>` on stdout once listening. An error when it cannot listen or
/// handle signals.
pub fn command(
    settings: EntraSettings,
    tls: Option<Arc<rustls::ServerConfig>>,
    listen: SocketAddr,
    ttl_secs: u64,
    allow: Vec<String>,
    allow_any: bool,
) -> Result<(), EntraCommandError> {
    let config = EmulatorConfig {
        ttl_secs,
        allow,
        allow_any,
        ..EmulatorConfig::default()
    };
    let emulator = Emulator::start_tls(listen, config, Kind::ServicePrincipal, tls)
        .map_err(|e| EntraCommandError::Listen(listen, e))?;
    emulator.set_entra(settings);
    log::info!("emulator serving the Entra protocol at {}", emulator.url());
    let mut out = std::io::stdout().lock();
    let line = format!("AZURE_AUTHORITY_HOST={}\n", emulator.url());
    if out
        .write_all(line.as_bytes())
        .and_then(|()| out.flush())
        .is_err()
    {
        log::warn!("cannot write the authority to stdout");
    }
    drop(out);
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT])
        .map_err(EntraCommandError::Signals)?;
    let _ = signals.forever().next();
    emulator.stop();
    Ok(())
}

/// `--federated CLIENT_ID=ISSUER,SUBJECT` (the subject after the last comma), with the
/// audience Entra expects by default.
pub(super) fn federated(text: &str) -> Result<Federated, String> {
    let parts = text
        .split_once('=')
        .and_then(|(client_id, rest)| Some((client_id, rest.rsplit_once(',')?)));
    match parts {
        Some((client_id, (issuer, subject)))
            if ![client_id, issuer, subject]
                .iter()
                .any(|p| p.trim().is_empty()) =>
        {
            Ok(Federated {
                client_id: client_id.trim().to_string(),
                issuer: issuer.trim().to_string(),
                subject: subject.trim().to_string(),
                audience: FEDERATED_AUDIENCE.to_string(),
            })
        }
        _ => Err("expected CLIENT_ID=ISSUER,SUBJECT".into()),
    }
}

/// A certificate or key file (`--client-certificate`, `--tls-cert`, `--tls-key`), read as
/// every credential file is; an error names the flag and the file.
fn read_certificate(
    flag: &'static str,
    path: &Path,
) -> Result<zeroize::Zeroizing<Vec<u8>>, EntraCommandError> {
    crate::hardening::read_credential_file(path, crate::hardening::MAX_CERTIFICATE_FILE)
        .map_err(|e| EntraCommandError::file(flag, path, e))
}
