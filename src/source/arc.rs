//! Azure Arc-connected servers: `GET $IDENTITY_ENDPOINT?api-version=2020-06-01&resource=R`
//! with `Metadata: true` is answered 401 with `WWW-Authenticate: Basic realm=<key file>`; the
//! key file is read (only from the agent's token directory, only `*.key`, at most 4096
//! bytes) and the request sent again with `Authorization: Basic <key>`.

use super::http::{self, HttpEndpoint};
use super::{ConfigError, Kind, Source, SourceError};
use crate::policy::now_ms;
use crate::token::Token;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

pub const DEFAULT_ENDPOINT: &str = "http://localhost:40342/metadata/identity/oauth2/token";
/// The only directory key files are read from.
pub const KEY_DIR: &str = "/var/opt/azcmagent/tokens";
const MAX_KEY: u64 = 4096;

/// The Arc agent's identity endpoint.
pub struct ArcAgent {
    endpoint: HttpEndpoint,
}

impl ArcAgent {
    pub fn new(endpoint: &str) -> Result<ArcAgent, ConfigError> {
        Ok(ArcAgent {
            endpoint: HttpEndpoint::new(endpoint)?,
        })
    }

    fn get(
        &self,
        resource: &str,
        key: Option<&str>,
        timeout: Duration,
    ) -> Result<http::Answer, SourceError> {
        let params = [("api-version", "2020-06-01"), ("resource", resource)];
        let mut request = self
            .endpoint
            .get(&params)
            .header("Metadata", "true")
            .timeout(timeout);
        if let Some(key) = key {
            request = request.header("Authorization", format!("Basic {key}"));
        }
        http::read_answer(request.send().map_err(http::transport_error)?)
    }
}

impl Source for ArcAgent {
    fn fetch_once(&self, resource: &str, timeout: Duration) -> Result<Token, SourceError> {
        let deadline = Instant::now() + timeout;
        // `expires_in` counts from when the request was sent, not from its answer.
        let requested_at = now_ms();
        let challenge = self.get(resource, None, timeout)?;
        if challenge.status != 401 {
            return challenge.into_token(requested_at);
        }
        let realm = challenge
            .www_authenticate
            .as_deref()
            .and_then(|h| h.split_once("realm="))
            .map(|(_, p)| p.trim().trim_matches('"').to_string())
            .ok_or_else(|| {
                SourceError::BadResponse("401 without a Basic realm naming the key file".into())
            })?;
        let key = read_key(Path::new(&realm), Path::new(KEY_DIR))
            .map_err(|e| SourceError::BadResponse(e.to_string()))?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SourceError::Timeout);
        }
        let requested_at = now_ms();
        self.get(resource, Some(key.trim()), left)?
            .into_token(requested_at)
    }

    fn endpoint(&self) -> String {
        self.endpoint.shown()
    }

    fn kind(&self) -> Kind {
        Kind::Arc
    }
}

/// Why a challenge's key file is not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFileError {
    /// It cannot be resolved or read (the OS's words).
    Unreadable { path: PathBuf, why: String },
    /// It is not directly inside the agent's token directory.
    Outside { path: PathBuf, dir: PathBuf },
    /// Its name does not end in `.key`.
    NotKey(PathBuf),
    /// It is not a regular file of at most 4096 bytes.
    TooLarge(PathBuf),
    /// It is not UTF-8.
    NotText(PathBuf),
}

impl fmt::Display for KeyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyFileError::Unreadable { path, why } => {
                write!(f, "key file {}: {why}", path.display())
            }
            KeyFileError::Outside { path, dir } => write!(
                f,
                "key file {} is outside {}",
                path.display(),
                dir.display()
            ),
            KeyFileError::NotKey(p) => write!(f, "key file {} does not end in .key", p.display()),
            KeyFileError::TooLarge(p) => write!(
                f,
                "key file {} is not a file of at most {MAX_KEY} bytes",
                p.display()
            ),
            KeyFileError::NotText(p) => write!(f, "key file {} is not text", p.display()),
        }
    }
}

impl std::error::Error for KeyFileError {}

/// Reads a challenge key file, refusing anything outside `dir`, not `*.key`, or too long.
pub fn read_key(path: &Path, dir: &Path) -> Result<Zeroizing<String>, KeyFileError> {
    let unreadable = |p: &Path, e: std::io::Error| KeyFileError::Unreadable {
        path: p.to_path_buf(),
        why: e.to_string(),
    };
    let real: PathBuf = path.canonicalize().map_err(|e| unreadable(path, e))?;
    let allowed = dir.canonicalize().map_err(|e| unreadable(dir, e))?;
    if real.parent() != Some(allowed.as_path()) {
        return Err(KeyFileError::Outside {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
        });
    }
    if real.extension().and_then(|e| e.to_str()) != Some("key") {
        return Err(KeyFileError::NotKey(path.to_path_buf()));
    }
    let meta = std::fs::metadata(&real).map_err(|e| unreadable(path, e))?;
    if !meta.is_file() || meta.len() > MAX_KEY {
        return Err(KeyFileError::TooLarge(path.to_path_buf()));
    }
    let bytes = Zeroizing::new(std::fs::read(&real).map_err(|e| unreadable(path, e))?);
    if bytes.len() as u64 > MAX_KEY {
        return Err(KeyFileError::TooLarge(path.to_path_buf()));
    }
    std::str::from_utf8(&bytes)
        .map(|s| Zeroizing::new(s.to_string()))
        .map_err(|_| KeyFileError::NotText(path.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_only_from_the_allowed_directory() {
        let base = std::env::temp_dir().join(format!("cstokenfs-arc-{}", std::process::id()));
        let dir = base.join("tokens");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.key"), "secret").unwrap();
        std::fs::write(dir.join("a.txt"), "secret").unwrap();
        std::fs::write(dir.join("big.key"), "x".repeat(4097)).unwrap();
        std::fs::write(base.join("out.key"), "secret").unwrap();
        assert_eq!(
            read_key(&dir.join("a.key"), &dir).unwrap().as_str(),
            "secret"
        );
        assert!(matches!(
            read_key(&dir.join("a.txt"), &dir),
            Err(KeyFileError::NotKey(_))
        ));
        assert!(read_key(&dir.join("big.key"), &dir)
            .unwrap_err()
            .to_string()
            .contains("4096"));
        assert!(matches!(
            read_key(&base.join("out.key"), &dir),
            Err(KeyFileError::Outside { .. })
        ));
        assert!(matches!(
            read_key(&dir.join("../out.key"), &dir),
            Err(KeyFileError::Outside { .. })
        ));
        assert!(read_key(&dir.join("none.key"), &dir).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
