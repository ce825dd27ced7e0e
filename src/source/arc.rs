//! Azure Arc-connected servers: `GET $IDENTITY_ENDPOINT?api-version=2020-06-01&resource=R`
//! with `Metadata: true` is answered 401 with `WWW-Authenticate: Basic realm=<key file>`; the
//! key file is read (only from the agent's token directory, only `*.key`, at most 4096
//! bytes) and the request sent again with `Authorization: Basic <key>`.

use super::http::{self, now_ms};
use super::{Source, SourceError};
use crate::token::Token;
use reqwest::blocking::Client;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

pub const DEFAULT_ENDPOINT: &str = "http://localhost:40342/metadata/identity/oauth2/token";
/// The only directory key files are read from.
pub const KEY_DIR: &str = "/var/opt/azcmagent/tokens";
const MAX_KEY: u64 = 4096;

pub struct Arc {
    url: reqwest::Url,
    client: Client,
}

impl Arc {
    pub fn new(endpoint: &str) -> Result<Arc, String> {
        let url = http::check_url(endpoint)?;
        Ok(Arc {
            client: http::client(&url)?,
            url,
        })
    }

    fn get(
        &self,
        url: &reqwest::Url,
        key: Option<&str>,
        timeout: Duration,
    ) -> Result<http::Answer, SourceError> {
        let mut request = self
            .client
            .get(url.clone())
            .header("Metadata", "true")
            .timeout(timeout);
        if let Some(key) = key {
            request = request.header("Authorization", format!("Basic {key}"));
        }
        http::read_answer(request.send().map_err(http::transport_error)?)
    }
}

impl Source for Arc {
    fn fetch_once(&self, resource: &str, timeout: Duration) -> Result<Token, SourceError> {
        let deadline = Instant::now() + timeout;
        let url = http::with_query(
            &self.url,
            &[("api-version", "2020-06-01"), ("resource", resource)],
        );
        let challenge = self.get(&url, None, timeout)?;
        if challenge.status != 401 {
            return challenge.into_token(now_ms());
        }
        let realm = challenge
            .www_authenticate
            .as_deref()
            .and_then(|h| h.split_once("realm="))
            .map(|(_, p)| p.trim().trim_matches('"').to_string())
            .ok_or_else(|| {
                SourceError::BadResponse("401 without a Basic realm naming the key file".into())
            })?;
        let key =
            read_key(Path::new(&realm), Path::new(KEY_DIR)).map_err(SourceError::BadResponse)?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SourceError::Timeout);
        }
        let requested_at = now_ms();
        self.get(&url, Some(key.trim()), left)?
            .into_token(requested_at)
    }

    fn endpoint(&self) -> String {
        self.url.to_string()
    }

    fn kind(&self) -> &'static str {
        "arc"
    }
}

/// Reads a challenge key file, refusing anything outside `dir`, not `*.key`, or too long.
pub fn read_key(path: &Path, dir: &Path) -> Result<Zeroizing<String>, String> {
    let shown = path.display();
    let real: PathBuf = path
        .canonicalize()
        .map_err(|e| format!("key file {shown}: {e}"))?;
    let allowed = dir
        .canonicalize()
        .map_err(|e| format!("key directory {}: {e}", dir.display()))?;
    if real.parent() != Some(allowed.as_path()) {
        return Err(format!("key file {shown} is outside {}", dir.display()));
    }
    if real.extension().and_then(|e| e.to_str()) != Some("key") {
        return Err(format!("key file {shown} does not end in .key"));
    }
    let meta = std::fs::metadata(&real).map_err(|e| format!("key file {shown}: {e}"))?;
    if !meta.is_file() || meta.len() > MAX_KEY {
        return Err(format!(
            "key file {shown} is not a file of at most {MAX_KEY} bytes"
        ));
    }
    let bytes = Zeroizing::new(std::fs::read(&real).map_err(|e| format!("key file {shown}: {e}"))?);
    if bytes.len() as u64 > MAX_KEY {
        return Err(format!("key file {shown} is larger than {MAX_KEY} bytes"));
    }
    std::str::from_utf8(&bytes)
        .map(|s| Zeroizing::new(s.to_string()))
        .map_err(|_| format!("key file {shown} is not text"))
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
        assert!(read_key(&dir.join("a.txt"), &dir)
            .unwrap_err()
            .contains(".key"));
        assert!(read_key(&dir.join("big.key"), &dir)
            .unwrap_err()
            .contains("4096"));
        assert!(read_key(&base.join("out.key"), &dir)
            .unwrap_err()
            .contains("outside"));
        assert!(read_key(&dir.join("../out.key"), &dir)
            .unwrap_err()
            .contains("outside"));
        assert!(read_key(&dir.join("none.key"), &dir).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
