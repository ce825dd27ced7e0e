//! The Docker credential helper: `cstokenfs credential-helper get|list|store|erase`, also
//! run as `docker-credential-cstokenfs ACTION` (a symlink; [`docker_helper_args`]). It
//! speaks Docker's credential-helper protocol over the mount's `.acr/` files, so every
//! docker, buildx, podman or skopeo process shares the daemon's cache: `get` reads the
//! server URL on standard input and prints `{"ServerURL","Username","Secret"}`; a registry
//! the mount does not serve is `credentials not found in native keychain` (docker then
//! pulls anonymously); `list` prints `{"REGISTRY":"USERNAME"}` for the registries the mount
//! holds credentials of; `store` and `erase` read their input and change nothing. As the
//! protocol wants, a failure's message goes to standard output.

use crate::token::REGISTRY_USERNAME;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// What Docker's clients take for "no credentials here" (they fall back to anonymous).
pub const NOT_FOUND: &str = "credentials not found in native keychain";
/// Where the helper looks when neither `--mount` nor `$CSTOKENFS_MOUNT` says.
pub const DEFAULT_MOUNT: &str = "/run/cstoken";
/// The most of standard input read (a server URL, or `store`'s JSON).
const MAX_INPUT: u64 = 64 * 1024;
/// What a binary named `docker-credential-<name>` is run as by Docker.
const DOCKER_PREFIX: &str = "docker-credential-";

/// The protocol's actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Get,
    List,
    Store,
    Erase,
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Action, String> {
        match s {
            "get" => Ok(Action::Get),
            "list" => Ok(Action::List),
            "store" => Ok(Action::Store),
            "erase" => Ok(Action::Erase),
            _ => Err(format!("{s:?}: one of get, list, store, erase")),
        }
    }
}

/// One run of the helper.
#[derive(Debug, Clone)]
pub struct HelperRequest {
    pub action: Action,
    /// `--mount`, else `$CSTOKENFS_MOUNT`, else [`DEFAULT_MOUNT`].
    pub mount: Option<PathBuf>,
    /// `--identity NAME` (else `$CSTOKENFS_IDENTITY`): `MOUNT/id/NAME/.acr/`.
    pub identity: Option<String>,
}

/// Why the helper gives no credentials. Its message is what the client reads on standard
/// output (the `Display`); it never holds a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelperError {
    /// Not a registry the mount serves ([`NOT_FOUND`]).
    NotFound,
    /// Anything else, said in full.
    Failed(String),
}

impl std::fmt::Display for HelperError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HelperError::NotFound => f.write_str(NOT_FOUND),
            HelperError::Failed(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for HelperError {}

/// The arguments of a binary run as `docker-credential-NAME ACTION`: `credential-helper`
/// put before the action; anything else unchanged.
pub fn docker_helper_args(mut args: Vec<OsString>) -> Vec<OsString> {
    let invoked_as_helper = args.first().is_some_and(|a| {
        Path::new(a)
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(DOCKER_PREFIX))
    });
    if invoked_as_helper {
        args.insert(1, "credential-helper".into());
    }
    args
}

/// Runs one action, with standard input and output; the error's message is already on
/// standard output when it returns one.
pub fn run(req: &HelperRequest) -> Result<(), HelperError> {
    let mut input = Vec::new();
    // Every action but `list` is sent input: read all of it (a client writing to a helper
    // that never reads would block or get EPIPE). `list` is sent none and may inherit a
    // terminal: its standard input is left alone.
    let read = match req.action {
        Action::List => Ok(0),
        _ => std::io::stdin().take(MAX_INPUT).read_to_end(&mut input),
    };
    let outcome = read
        .map_err(|e| HelperError::Failed(format!("cannot read standard input: {e}")))
        .and_then(|_| answer(req, &String::from_utf8_lossy(&input)));
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(mut bytes) => {
            let written = out.write_all(&bytes).and_then(|()| out.flush());
            // The answer holds the secret: wipe it.
            zeroize::Zeroize::zeroize(&mut bytes);
            written
                .map_err(|e| HelperError::Failed(format!("cannot write to standard output: {e}")))
        }
        Err(e) => {
            let _ = out
                .write_all(format!("{e}\n").as_bytes())
                .and_then(|()| out.flush());
            Err(e)
        }
    }
}

/// The bytes to print for `req` given standard input `input`.
fn answer(req: &HelperRequest, input: &str) -> Result<Vec<u8>, HelperError> {
    let acr = acr_dir(req);
    match req.action {
        Action::Store | Action::Erase => Ok(Vec::new()),
        Action::Get => get(&acr, input.trim()),
        Action::List => list(&acr),
    }
}

/// `MOUNT/.acr` or `MOUNT/id/NAME/.acr`.
fn acr_dir(req: &HelperRequest) -> PathBuf {
    let mount = req
        .mount
        .clone()
        .or_else(|| std::env::var_os("CSTOKENFS_MOUNT").map(PathBuf::from))
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MOUNT));
    let identity = req
        .identity
        .clone()
        .or_else(|| std::env::var("CSTOKENFS_IDENTITY").ok())
        .filter(|i| !i.is_empty());
    match identity {
        Some(name) => mount.join("id").join(name).join(".acr"),
        None => mount.join(".acr"),
    }
}

fn get(acr: &Path, server_url: &str) -> Result<Vec<u8>, HelperError> {
    if server_url.is_empty() {
        return Err(HelperError::Failed("no credentials server URL".into()));
    }
    // Only a host name reaches the mount: nothing like `..` or a path.
    let Some(host) =
        super::server_host(server_url).filter(|h| crate::names::Resource::registry(h).is_some())
    else {
        return Err(HelperError::NotFound);
    };
    let path = acr.join(&host);
    let secret = match std::fs::read(&path) {
        Ok(bytes) => zeroize::Zeroizing::new(bytes),
        Err(e) => return Err(read_error(acr, &host, &e)),
    };
    let secret = std::str::from_utf8(&secret)
        .map_err(|_| HelperError::Failed(format!("{}: not text", path.display())))?;
    let doc = serde_json::json!({
        "ServerURL": server_url,
        "Username": REGISTRY_USERNAME,
        "Secret": secret,
    });
    let mut out = serde_json::to_vec(&doc).unwrap_or_default();
    out.push(b'\n');
    // The `Value` holding a copy is dropped here; it cannot be wiped (serde_json's).
    drop(doc);
    Ok(out)
}

/// How a failed read of `ACR/host` reads to the client.
fn read_error(acr: &Path, host: &str, e: &std::io::Error) -> HelperError {
    match e.raw_os_error() {
        Some(libc::ENOENT) if acr.is_dir() => HelperError::NotFound,
        // No mount: an Azure registry's pull must say why it has no credentials; any other
        // registry (with `credsStore`, docker asks about every one) is simply not served.
        Some(libc::ENOENT) if !super::SUFFIXES.iter().any(|s| host.ends_with(s)) => {
            HelperError::NotFound
        }
        Some(libc::ENOENT) => HelperError::Failed(no_mount(acr)),
        Some(libc::EACCES) => HelperError::Failed(format!(
            "{host}: access denied (the registry or the token endpoint refused this identity, \
             or this user may not read {}; the daemon's log says which)",
            acr.display()
        )),
        Some(libc::EIO) => HelperError::Failed(format!(
            "{host}: no credentials could be had in time (the daemon's log and .status say why)"
        )),
        Some(libc::ENOTCONN) => HelperError::Failed(format!(
            "{}: the cstokenfs daemon behind this mount is gone (remount it)",
            acr.display()
        )),
        _ => HelperError::Failed(format!("{}/{host}: {e}", acr.display())),
    }
}

fn no_mount(acr: &Path) -> String {
    format!(
        "{} does not exist: no cstokenfs mount serves registry credentials there (mount one, \
         or name it with --mount or CSTOKENFS_MOUNT)",
        acr.display()
    )
}

fn list(acr: &Path) -> Result<Vec<u8>, HelperError> {
    let entries = std::fs::read_dir(acr).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => HelperError::Failed(no_mount(acr)),
        _ => HelperError::Failed(format!("{}: {e}", acr.display())),
    })?;
    let mut registries = serde_json::Map::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".json") {
            registries.insert(name, REGISTRY_USERNAME.into());
        }
    }
    let mut out = serde_json::to_vec(&registries).unwrap_or_default();
    out.push(b'\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_docker_credential_binary_runs_the_helper() {
        let args = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            docker_helper_args(args(&["/usr/bin/docker-credential-cstokenfs", "get"])),
            args(&[
                "/usr/bin/docker-credential-cstokenfs",
                "credential-helper",
                "get"
            ])
        );
        assert_eq!(
            docker_helper_args(args(&["cstokenfs", "get", "x"])),
            args(&["cstokenfs", "get", "x"])
        );
    }

    #[test]
    fn get_reads_the_mounts_file_and_refuses_what_is_not_a_host() {
        let dir = tempfile::tempdir().unwrap();
        let acr = dir.path().join(".acr");
        std::fs::create_dir(&acr).unwrap();
        std::fs::write(acr.join("r.azurecr.io"), "rt").unwrap();
        let out = get(&acr, "https://r.azurecr.io/v2/").unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(doc["Secret"], "rt");
        assert_eq!(doc["Username"], REGISTRY_USERNAME);
        assert_eq!(doc["ServerURL"], "https://r.azurecr.io/v2/");
        assert_eq!(get(&acr, "other.azurecr.io"), Err(HelperError::NotFound));
        for bad in ["..", "https://../x", "a b"] {
            assert_eq!(get(&acr, bad), Err(HelperError::NotFound), "{bad}");
        }
        assert!(matches!(get(&acr, ""), Err(HelperError::Failed(_))));
        let gone = dir.path().join("nothing/.acr");
        assert!(
            matches!(get(&gone, "r.azurecr.io"), Err(HelperError::Failed(m)) if m.contains("does not exist"))
        );
        // Without a mount, a registry no mount could serve is not found (docker goes on
        // anonymously), not an error.
        let hub = get(&gone, "https://index.docker.io/v1/");
        assert_eq!(hub, Err(HelperError::NotFound));
        let listed: serde_json::Value = serde_json::from_slice(&list(&acr).unwrap()).unwrap();
        assert_eq!(
            listed,
            serde_json::json!({"r.azurecr.io": REGISTRY_USERNAME})
        );
    }
}
