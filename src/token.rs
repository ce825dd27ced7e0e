//! Token types. Their bytes are wiped when dropped and never appear in `Debug` output.

use std::fmt;
use zeroize::Zeroizing;

use crate::key::Key;
pub use crate::policy::EpochMs;
use crate::policy::Schedule;

/// A token as an upstream issued it.
pub struct Token {
    pub access_token: Zeroizing<String>,
    pub token_type: String,
    /// Expiry, wall clock.
    pub expires_on: EpochMs,
    /// The upstream's advice on when to refresh, as a lifetime offset (`refresh_in`).
    pub refresh_in_ms: Option<i64>,
    /// When the token was issued (`not_before`), if the upstream says.
    pub not_before: Option<EpochMs>,
}

impl Token {
    /// When the token's lifetime began: `not_before` if plausible (not after the fetch,
    /// before expiry, and a lifetime of at most a week), else when we fetched it.
    pub fn issued_at(&self, fetched_at: EpochMs) -> EpochMs {
        self.not_before
            .filter(|nb| {
                *nb <= fetched_at
                    && *nb < self.expires_on
                    && self.expires_on.saturating_sub(*nb) <= crate::policy::MAX_LIFETIME_MS
            })
            .unwrap_or(fetched_at)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field(
                "access_token",
                &format_args!("<redacted, {} bytes>", self.access_token.len()),
            )
            .field("token_type", &self.token_type)
            .field("expires_on", &self.expires_on)
            .field("refresh_in_ms", &self.refresh_in_ms)
            .field("not_before", &self.not_before)
            .finish()
    }
}

/// The ways the mount shows one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum View {
    /// The token's bytes, no newline.
    Raw = 0,
    /// `{"access_token","token_type","expires_on","resource"}` and a newline.
    Json = 1,
    /// `Authorization: Bearer <token>` and a newline.
    Header = 2,
    /// A client-go `ExecCredential` (kubeconfig `exec` with `command: cat`).
    Kubectl = 3,
    /// git's credential helper format: `username=` and `password=<token>` lines.
    GitCredential = 4,
    /// The decoded JWT payload as pretty JSON (never the token): `crate::claims`.
    Claims = 5,
    /// The `Kubectl` view with `apiVersion: client.authentication.k8s.io/v1beta1`, for
    /// kubeconfigs whose `exec` section asks for that version (what kubelogin writes).
    KubectlV1beta1 = 6,
}

impl View {
    pub const ALL: [View; 7] = [
        View::Raw,
        View::Json,
        View::Header,
        View::Kubectl,
        View::GitCredential,
        View::Claims,
        View::KubectlV1beta1,
    ];

    /// Its name in logs.
    pub fn label(self) -> &'static str {
        match self {
            View::Raw => "token",
            View::Json => "json",
            View::Header => "header",
            View::Kubectl => "kubectl",
            View::GitCredential => "git-credential",
            View::Claims => "claims",
            View::KubectlV1beta1 => "kubectl-v1beta1",
        }
    }

    /// The directory a view lives in (`None`: the mount's root).
    pub fn dir_name(self) -> Option<&'static str> {
        match self {
            View::Raw => None,
            View::Json => Some(".json"),
            View::Header => Some(".header"),
            View::Kubectl => Some(".kubectl"),
            View::GitCredential => Some(".git-credential"),
            View::Claims => Some(".claims"),
            View::KubectlV1beta1 => Some(".kubectl-v1beta1"),
        }
    }
}

/// One fetched token of one resource, with every view rendered once. Immutable: a refresh
/// makes a new version (with its own id, hence its own inodes and page cache).
pub struct Version {
    pub id: u64,
    /// Whose token of which resource it is.
    pub key: Key,
    pub fetched_at: EpochMs,
    pub expires_on: EpochMs,
    /// When it is refreshed and until when it may be served, computed once by the policy.
    pub schedule: Schedule,
    views: [Zeroizing<Vec<u8>>; View::ALL.len()],
    /// The token, registered for scrubbing from outside text while this version is held.
    _known: crate::known::Known,
}

impl Version {
    pub fn new(
        id: u64,
        key: Key,
        token: &Token,
        fetched_at: EpochMs,
        schedule: Schedule,
    ) -> Version {
        let raw = Zeroizing::new(token.access_token.as_bytes().to_vec());
        // A registry's credentials (`.acr/REGISTRY.json`) have docker's shape instead.
        let json = match key.resource.registry_host() {
            Some(_) => render_registry_json(token),
            None => render_json(token, &key.resource),
        };
        let header = wrap(b"Authorization: Bearer ", &raw, b"\n");
        let kubectl = render_exec_credential(EXEC_V1, &token.access_token, token.expires_on);
        let kubectl_v1beta1 =
            render_exec_credential(EXEC_V1BETA1, &token.access_token, token.expires_on);
        let git = wrap(b"username=cstokenfs\npassword=", &raw, b"\n");
        let claims = crate::claims::render(&token.access_token, token.expires_on);
        Version {
            _known: crate::known::remember(&token.access_token),
            id,
            key,
            fetched_at,
            expires_on: token.expires_on,
            schedule,
            views: [raw, json, header, kubectl, git, claims, kubectl_v1beta1],
        }
    }

    pub fn bytes(&self, view: View) -> &[u8] {
        &self.views[view as usize]
    }

    /// The token itself.
    pub fn token(&self) -> &[u8] {
        self.bytes(View::Raw)
    }

    /// Whether it has expired at `now` (the policy's verdict): the read path's question,
    /// which needs no lock (an open file reads its version until it expires, superseded or
    /// not).
    pub fn expired(&self, now: EpochMs) -> bool {
        crate::policy::verdict(now, &self.schedule, true) == crate::policy::Verdict::Expired
    }
}

/// `before` + `token` + `after` in a wiped buffer of exactly that size.
fn wrap(before: &[u8], token: &[u8], after: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(before.len() + token.len() + after.len()));
    out.extend_from_slice(before);
    out.extend_from_slice(token);
    out.extend_from_slice(after);
    out
}

/// The exec credential API version of the `.kubectl` view.
const EXEC_V1: &str = "client.authentication.k8s.io/v1";
/// The exec credential API version of the `.kubectl-v1beta1` view.
const EXEC_V1BETA1: &str = "client.authentication.k8s.io/v1beta1";

/// The `.kubectl` views: what client-go expects from an exec credential plugin of
/// `api_version` (both versions have the same `status` fields).
fn render_exec_credential(
    api_version: &str,
    token: &str,
    expires_on: EpochMs,
) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(6 * token.len() + 256));
    let buf: &mut Vec<u8> = &mut out;
    buf.extend_from_slice(b"{\"apiVersion\":\"");
    buf.extend_from_slice(api_version.as_bytes());
    buf.extend_from_slice(b"\",\"kind\":\"ExecCredential\",\"status\":{\"token\":");
    let _ = serde_json::to_writer(&mut *buf, token);
    buf.extend_from_slice(
        format!(",\"expirationTimestamp\":\"{}\"}}}}\n", rfc3339(expires_on)).as_bytes(),
    );
    out
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC) of an epoch time.
pub fn rfc3339(ms: EpochMs) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = crate::civil::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The `.json` view, written straight into a wiped buffer sized so it never reallocates
/// (a reallocation would leave an unwiped copy of the token behind).
fn render_json(token: &Token, resource: &str) -> Zeroizing<Vec<u8>> {
    let worst = 6 * (token.access_token.len() + token.token_type.len() + resource.len()) + 128;
    let mut out = Zeroizing::new(Vec::with_capacity(worst));
    let buf: &mut Vec<u8> = &mut out;
    buf.extend_from_slice(b"{\"access_token\":");
    // Writing JSON strings into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, token.access_token.as_str());
    buf.extend_from_slice(b",\"token_type\":");
    let _ = serde_json::to_writer(&mut *buf, &token.token_type);
    buf.extend_from_slice(
        format!(
            ",\"expires_on\":{},\"resource\":",
            token.expires_on.div_euclid(1000)
        )
        .as_bytes(),
    );
    let _ = serde_json::to_writer(&mut *buf, resource);
    buf.extend_from_slice(b"}\n");
    out
}

/// The user name a registry's refresh token goes with (ACR's documented one for tokens
/// from its `/oauth2/exchange`).
pub const REGISTRY_USERNAME: &str = "00000000-0000-0000-0000-000000000000";

/// `.acr/REGISTRY.json`: `{"username","refresh_token","expires_on"}` and a newline.
fn render_registry_json(token: &Token) -> Zeroizing<Vec<u8>> {
    let worst = 6 * token.access_token.len() + 128;
    let mut out = Zeroizing::new(Vec::with_capacity(worst));
    let buf: &mut Vec<u8> = &mut out;
    buf.extend_from_slice(
        format!("{{\"username\":\"{REGISTRY_USERNAME}\",\"refresh_token\":").as_bytes(),
    );
    // Writing JSON strings into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, token.access_token.as_str());
    buf.extend_from_slice(
        format!(",\"expires_on\":{}}}\n", token.expires_on.div_euclid(1000)).as_bytes(),
    );
    out
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Version")
            .field("id", &self.id)
            .field("resource", &self.key.resource)
            .field("fetched_at", &self.fetched_at)
            .field("expires_on", &self.expires_on)
            .field(
                "token",
                &format_args!("<redacted, {} bytes>", self.token().len()),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        Token {
            access_token: Zeroizing::new("aaa.bbb.ccc".into()),
            token_type: "Bearer".into(),
            expires_on: 1_700_000_000_000,
            refresh_in_ms: None,
            not_before: None,
        }
    }

    fn key(resource: &str) -> Key {
        Key::new(
            crate::cache::IdentityId::DEFAULT,
            crate::names::Resource::for_test(resource),
        )
    }

    fn schedule() -> Schedule {
        crate::policy::schedule(0, 1_700_000_000_000, None, 300_000)
    }

    #[test]
    fn views_render_once() {
        let v = Version::new(7, key("https://vault.azure.net"), &token(), 0, schedule());
        assert_eq!(v.bytes(View::Raw), b"aaa.bbb.ccc");
        assert_eq!(
            v.bytes(View::Header),
            b"Authorization: Bearer aaa.bbb.ccc\n"
        );
        let json: serde_json::Value = serde_json::from_slice(v.bytes(View::Json)).unwrap();
        assert_eq!(json["expires_on"], 1_700_000_000);
        assert_eq!(json["resource"], "https://vault.azure.net");
        assert_eq!(json["token_type"], "Bearer");
        assert!(v.bytes(View::Json).ends_with(b"\n"));
    }

    #[test]
    fn kubectl_and_git_views() {
        let v = Version::new(7, key("r"), &token(), 0, schedule());
        let k: serde_json::Value = serde_json::from_slice(v.bytes(View::Kubectl)).unwrap();
        assert_eq!(k["apiVersion"], "client.authentication.k8s.io/v1");
        assert_eq!(k["kind"], "ExecCredential");
        assert_eq!(k["status"]["token"], "aaa.bbb.ccc");
        assert_eq!(k["status"]["expirationTimestamp"], "2023-11-14T22:13:20Z");
        let b: serde_json::Value = serde_json::from_slice(v.bytes(View::KubectlV1beta1)).unwrap();
        assert_eq!(b["apiVersion"], "client.authentication.k8s.io/v1beta1");
        assert_eq!((&b["kind"], &b["status"]), (&k["kind"], &k["status"]));
        assert!(v.bytes(View::KubectlV1beta1).ends_with(b"}\n"));
        assert_eq!(View::KubectlV1beta1.dir_name(), Some(".kubectl-v1beta1"));
        assert_eq!(
            v.bytes(View::GitCredential),
            b"username=cstokenfs\npassword=aaa.bbb.ccc\n"
        );
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn debug_never_shows_the_token() {
        let t = token();
        assert!(!format!("{t:?}").contains("bbb"));
        let v = Version::new(1, key("r"), &t, 0, schedule());
        assert!(!format!("{v:?}").contains("bbb"));
    }
}
