//! File names <-> resource strings.
//!
//! The rules (see README "Resource names"): a well-known host maps to the exact spelling
//! Cloud Shell accepts; any other DNS-style name `N` maps to `https://N`; a name with `%` is
//! percent-decoded and used verbatim (a `/.default` scope becomes its resource); a GUID is an
//! app ID used verbatim. Names starting with `.` are reserved for views.
//!
//! A [`Resource`] is built here only: by [`resolve`] (a file name), [`resolve_arg`] (`get`,
//! `--resource`) and [`resolve_query`] (an SDK's `resource` parameter). A trailing
//! `/.default` is stripped in one place, [`without_default_scope`].

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// A resource string exactly as it is sent upstream, resolved by the name rules of this
/// module (nothing else can build one). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resource(Arc<str>);

impl Resource {
    /// Only the rules below call this.
    fn new(resource: impl Into<Arc<str>>) -> Resource {
        Resource(resource.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The string, shared (for audit events).
    pub fn shared(&self) -> Arc<str> {
        self.0.clone()
    }

    /// The key of a container registry's credentials (`.acr/REGISTRY`): `acr:` and the
    /// registry's host, lower case. No other rule of this module can produce it (it is
    /// neither a URI nor a GUID nor a host name), so no file name, `get` argument or SDK
    /// query reaches a registry's entry, and the top listing never shows one
    /// (`canonical_name` finds no name for it). Which hosts are registries is
    /// `crate::acr`'s rule; this only checks that `host` is a DNS name.
    pub fn registry(host: &str) -> Option<Resource> {
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        is_dns_name(&host).then(|| Resource::new(format!("{REGISTRY_PREFIX}{host}")))
    }

    /// The registry host of a registry's key ([`Resource::registry`]), else `None`.
    pub fn registry_host(&self) -> Option<&str> {
        self.0.strip_prefix(REGISTRY_PREFIX)
    }

    /// Any string as a resource, for unit tests that need no name rules.
    #[cfg(test)]
    pub(crate) fn for_test(resource: &str) -> Resource {
        Resource::new(resource)
    }
}

impl Deref for Resource {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Resource {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Resource strings are not secrets: shown as they are.
impl fmt::Debug for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl PartialEq<str> for Resource {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Resource {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Resource> for String {
    fn eq(&self, other: &Resource) -> bool {
        self.as_str() == other.as_str()
    }
}

impl From<Resource> for String {
    fn from(r: Resource) -> String {
        r.0.to_string()
    }
}

/// What starts a registry's key ([`Resource::registry`]).
const REGISTRY_PREFIX: &str = "acr:";

/// A scope names its resource: `resource` without every trailing `/.default`. The one
/// place a scope is stripped.
pub fn without_default_scope(mut resource: &str) -> &str {
    while let Some(r) = resource.strip_suffix("/.default") {
        resource = r;
    }
    resource
}

/// The longest resource given as a URI (a resource is a URI or a GUID, not a document).
pub const MAX_RESOURCE: usize = 2048;
/// Longest file name Linux allows in one path component.
pub const NAME_MAX: usize = 255;

/// The resources Cloud Shell's endpoint issues tokens for, spelled as it accepts them and
/// as the services expect in `aud` (a trailing slash exactly where the service wants one):
/// its allowlist (shared/reference/token-endpoints.md) plus the sovereign clouds' ARM hosts
/// and the app IDs users ask for. The name rules and the emulator share it.
pub const CLOUD_SHELL_ALLOWLIST: &[&str] = &[
    "https://management.core.windows.net/",
    "https://management.azure.com/",
    "https://graph.windows.net/",
    "https://vault.azure.net",
    "https://datalake.azure.net/",
    "https://outlook.office365.com/",
    "https://graph.microsoft.com/",
    "https://batch.core.windows.net/",
    "https://analysis.windows.net/powerbi/api",
    "https://storage.azure.com/",
    "https://rest.media.azure.net",
    "https://api.loganalytics.io",
    "https://ossrdbms-aad.database.windows.net",
    "https://www.yammer.com",
    "https://digitaltwins.azure.net",
    "https://dev.azuresynapse.net",
    "https://database.windows.net",
    "https://quantum.microsoft.com",
    "https://iothubs.azure.net",
    "https://azuredatabricks.net/",
    "https://azure-devices-provisioning.net",
    "2ff814a6-3304-4ab8-85cb-cd0e6f879c1d",
    "https://ai.azure.com",
    "https://appservice.azure.com",
    "https://management.usgovcloudapi.net/",
    "https://management.chinacloudapi.cn/",
    "499b84ac-1321-427f-aa17-267ca6975798", // Azure DevOps
    "6dae42f8-4368-4678-94ff-3960e28e3630", // AKS
];

/// Well-known short names (the host of each `https://` resource of the allowlist) and the
/// exact resource strings they stand for.
pub fn well_known() -> &'static [(&'static str, &'static str)] {
    static PAIRS: std::sync::OnceLock<Vec<(&'static str, &'static str)>> =
        std::sync::OnceLock::new();
    PAIRS.get_or_init(|| {
        CLOUD_SHELL_ALLOWLIST
            .iter()
            .filter_map(|r| {
                let host = r.strip_prefix("https://")?.split('/').next()?;
                Some((host, *r))
            })
            .collect()
    })
}

/// Why a file name does not name a resource. Every variant reads as ENOENT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    Empty,
    TooLong,
    Reserved,
    ControlCharacter,
    BadPercentEncoding,
    NotAResource,
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = match self {
            NameError::Empty => "the name is empty",
            NameError::TooLong => "the name is longer than 255 bytes",
            NameError::Reserved => "names starting with '.' are reserved for views",
            NameError::ControlCharacter => {
                "the name contains a control, bidi or other invisible character"
            }
            NameError::BadPercentEncoding => "the name's percent-encoding is not valid UTF-8",
            NameError::NotAResource => {
                "not a resource: use a host name (management.azure.com), an app ID (GUID) \
                 or a percent-encoded URI (https%3A%2F%2Fvault.azure.net)"
            }
        };
        f.write_str(msg)
    }
}

impl std::error::Error for NameError {}

/// Whether `c` prints nothing a reader can see, or changes how what follows is shown: a
/// control character, a bidi control (U+202E turns `exe.txt` into `txt.exe`), or another
/// invisible format character (zero-width spaces and joiners, the byte-order mark, soft
/// hyphen, line and paragraph separators, interlinear annotation). Refused in names, escaped
/// in logged text from outside.
pub fn is_unprintable(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00AD}' | '\u{061C}' | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}')
}

/// `text` with every unprintable character but tab written `\u{..}`: what a log line
/// shows of text from outside (an upstream's words, a reader's executable path), so it can
/// neither forge a line nor hide what follows.
pub fn escape_unprintable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if is_unprintable(c) && c != '\t' {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Maps a file name to the exact resource string to request.
pub fn resolve(name: &str) -> Result<Resource, NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > NAME_MAX {
        return Err(NameError::TooLong);
    }
    if name.starts_with('.') {
        return Err(NameError::Reserved);
    }
    if name.chars().any(is_unprintable) {
        return Err(NameError::ControlCharacter);
    }
    if name.contains('%') {
        let decoded = percent_decode_str(name)
            .decode_utf8()
            .map_err(|_| NameError::BadPercentEncoding)?;
        if decoded.chars().any(is_unprintable) {
            return Err(NameError::ControlCharacter);
        }
        // A scope names its resource; strip every `/.default` so no resource ends in one
        // (its listing name would otherwise resolve to a different resource).
        let resource = without_default_scope(&decoded);
        return if is_guid(resource) || is_uri(resource) {
            Ok(Resource::new(resource))
        } else {
            Err(NameError::NotAResource)
        };
    }
    if is_guid(name) {
        return Ok(Resource::new(name));
    }
    // Host names are case-insensitive and may end in the root's dot: `MANAGEMENT.AZURE.COM.`
    // is management.azure.com.
    let host = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if let Some((_, resource)) = well_known().iter().find(|(short, _)| *short == host) {
        return Ok(Resource::new(*resource));
    }
    if is_dns_name(&host) {
        return Ok(Resource::new(format!("https://{host}")));
    }
    Err(NameError::NotAResource)
}

/// What a user types on the command line (`get NAME`, `--resource NAME`): a file name as
/// [`resolve`] takes it, or a URI (`https://management.azure.com/`) or a scope
/// (`https://graph.microsoft.com/.default`). A URI whose whole path is empty or `/` on a
/// well-known host is that host's exact resource string (the spelling the service expects);
/// any other URI is used verbatim, its `/.default` stripped.
pub fn resolve_arg(arg: &str) -> Result<Resource, NameError> {
    if !arg.contains("://") {
        return resolve(arg);
    }
    if arg.chars().any(is_unprintable) {
        return Err(NameError::ControlCharacter);
    }
    if arg.len() > MAX_RESOURCE {
        return Err(NameError::TooLong);
    }
    let resource = without_default_scope(arg);
    if !is_uri(resource) {
        return Err(NameError::NotAResource);
    }
    Ok(well_known_spelling(resource).map_or_else(|| Resource::new(resource), Resource::new))
}

/// A resource as an SDK sends it (the endpoint's `resource` parameter): a URI or a GUID (a
/// trailing `/.default` stripped), resolved by the same rules as `get` and `--resource`
/// ([`resolve_arg`]): a well-known resource in either spelling is the spelling its file name
/// resolves to, so both share one cache entry and one upstream call. A bare host name is not
/// a resource here.
pub fn resolve_query(sent: &str) -> Result<Resource, NameError> {
    if sent.is_empty() {
        return Err(NameError::Empty);
    }
    let bare = without_default_scope(sent);
    if is_guid(bare) {
        return Ok(Resource::new(bare));
    }
    if !sent.contains("://") {
        return Err(NameError::NotAResource);
    }
    resolve_arg(sent)
}

/// The allowlist's spelling of a resource given in another: with or without the trailing
/// slash (`https://management.azure.com`, as the SDKs send a scope's resource), or as its
/// host alone in any case or with a trailing dot (`https://MANAGEMENT.AZURE.COM./`).
fn well_known_spelling(resource: &str) -> Option<&'static str> {
    let other = match resource.strip_suffix('/') {
        Some(without) => without.to_string(),
        None => format!("{resource}/"),
    };
    if let Some(known) = CLOUD_SHELL_ALLOWLIST
        .iter()
        .find(|k| **k == resource || **k == other)
    {
        return Some(known);
    }
    let (scheme, rest) = resource.split_once("://")?;
    let host = rest.strip_suffix('/').unwrap_or(rest);
    if !scheme.eq_ignore_ascii_case("https") || host.contains('/') {
        return None;
    }
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    well_known()
        .iter()
        .find(|(short, _)| *short == host)
        .map(|(_, known)| *known)
}

/// The name a resource is listed under: the short name if the rules map it back to exactly
/// this resource, else the GUID, else the resource percent-encoded. `None` when even the
/// encoded form is too long to be a file name.
pub fn canonical_name(resource: &str) -> Option<String> {
    if let Some((short, _)) = well_known().iter().find(|(_, r)| *r == resource) {
        return Some((*short).to_string());
    }
    if let Some(host) = resource.strip_prefix("https://") {
        if resolve(host).is_ok_and(|r| r == resource) {
            return Some(host.to_string());
        }
    }
    if is_guid(resource) {
        return Some(resource.to_string());
    }
    let mut encoded = utf8_percent_encode(resource, NOT_UNRESERVED).to_string();
    if encoded.len() > NAME_MAX {
        // Too long fully encoded: escape only what a file name cannot hold, so any resource
        // that can be read through a name can also be listed.
        encoded = escape_minimal(resource);
    }
    (encoded.len() <= NAME_MAX && resolve(&encoded).is_ok_and(|r| r == resource)).then_some(encoded)
}

/// The name `.status` shows for a key's resource: its [`canonical_name`], or for a
/// registry's credentials their path under the identity's tree (`.acr/REGISTRY`).
pub fn file_name(resource: &Resource) -> Option<String> {
    match resource.registry_host() {
        Some(host) => Some(format!(".acr/{host}")),
        None => canonical_name(resource),
    }
}

/// Escapes only what a percent-encoded file name must: `%` itself, `/` and control
/// characters; everything else (non-ASCII included) stays as it is.
fn escape_minimal(resource: &str) -> String {
    let mut out = String::with_capacity(resource.len() + 8);
    for c in resource.chars() {
        if c == '%' || c == '/' || is_unprintable(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Everything but RFC 3986's unreserved characters gets percent-encoded (uppercase hex).
const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// 8-4-4-4-12 hexadecimal digits.
pub fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `scheme://rest`, scheme per RFC 3986, a non-empty rest without whitespace.
pub fn is_uri(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once("://") else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        && !rest.is_empty()
        && !rest.starts_with('/')
        && !rest.chars().any(|c| c.is_whitespace() || is_unprintable(c))
}

/// Two or more labels of letters, digits and inner hyphens, each at most 63 bytes.
fn is_dns_name(s: &str) -> bool {
    let labels: Vec<&str> = s.split('.').collect();
    labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_hosts_keep_their_exact_spelling() {
        assert_eq!(
            resolve("management.azure.com").unwrap(),
            "https://management.azure.com/"
        );
        assert_eq!(
            resolve("vault.azure.net").unwrap(),
            "https://vault.azure.net"
        );
        assert_eq!(
            resolve("storage.azure.com").unwrap(),
            "https://storage.azure.com/"
        );
        assert_eq!(
            resolve("graph.microsoft.com").unwrap(),
            "https://graph.microsoft.com/"
        );
        assert_eq!(
            resolve("database.windows.net").unwrap(),
            "https://database.windows.net"
        );
        assert_eq!(
            resolve("management.usgovcloudapi.net").unwrap(),
            "https://management.usgovcloudapi.net/"
        );
        assert_eq!(
            resolve("management.chinacloudapi.cn").unwrap(),
            "https://management.chinacloudapi.cn/"
        );
    }

    #[test]
    fn other_dns_names_become_https_urls() {
        assert_eq!(
            resolve("myapp.example.com").unwrap(),
            "https://myapp.example.com"
        );
        assert_eq!(resolve("localhost"), Err(NameError::NotAResource));
        assert_eq!(resolve("-bad.example.com"), Err(NameError::NotAResource));
        assert_eq!(resolve("a..b"), Err(NameError::NotAResource));
    }

    #[test]
    fn percent_names_are_decoded_verbatim_and_scopes_become_resources() {
        assert_eq!(
            resolve("https%3A%2F%2Fvault.azure.net").unwrap(),
            "https://vault.azure.net"
        );
        assert_eq!(
            resolve("https%3A%2F%2Fgraph.microsoft.com%2F").unwrap(),
            "https://graph.microsoft.com/"
        );
        assert_eq!(
            resolve("https%3A%2F%2Fgraph.microsoft.com%2F.default").unwrap(),
            "https://graph.microsoft.com"
        );
        assert_eq!(resolve("hello%20world"), Err(NameError::NotAResource));
        assert_eq!(resolve("%FF%FE"), Err(NameError::BadPercentEncoding));
        assert_eq!(
            resolve("https%3A%2F%2Fa%0Ab"),
            Err(NameError::ControlCharacter)
        );
    }

    #[test]
    fn host_names_are_case_insensitive_with_an_optional_trailing_dot() {
        for n in [
            "MANAGEMENT.AZURE.COM",
            "management.azure.com.",
            "Management.Azure.Com.",
        ] {
            assert_eq!(resolve(n).unwrap(), "https://management.azure.com/", "{n}");
        }
        assert_eq!(
            resolve("MyApp.Example.COM").unwrap(),
            "https://myapp.example.com"
        );
        assert_eq!(resolve("a..b."), Err(NameError::NotAResource));
    }

    #[test]
    fn command_line_names_take_uris_and_scopes() {
        for (arg, want) in [
            (
                "https://management.azure.com/",
                "https://management.azure.com/",
            ),
            (
                "https://management.azure.com",
                "https://management.azure.com/",
            ),
            (
                "https://MANAGEMENT.AZURE.COM/",
                "https://management.azure.com/",
            ),
            (
                "https://graph.microsoft.com/.default",
                "https://graph.microsoft.com/",
            ),
            (
                "https://vault.azure.net/.default",
                "https://vault.azure.net",
            ),
            ("https://myapp.example.com/", "https://myapp.example.com/"),
            (
                "api://6dae42f8-4368-4678-94ff-3960e28e3630",
                "api://6dae42f8-4368-4678-94ff-3960e28e3630",
            ),
            (
                "https://storage.azure.com/x/.default",
                "https://storage.azure.com/x",
            ),
            ("management.azure.com", "https://management.azure.com/"),
            (
                "499b84ac-1321-427f-aa17-267ca6975798",
                "499b84ac-1321-427f-aa17-267ca6975798",
            ),
        ] {
            assert_eq!(resolve_arg(arg).as_deref().ok(), Some(want), "{arg}");
        }
        assert_eq!(resolve_arg("https://"), Err(NameError::NotAResource));
        assert_eq!(
            resolve_arg("https://a\nb"),
            Err(NameError::ControlCharacter)
        );
    }

    #[test]
    fn registry_keys_are_out_of_reach_of_every_other_rule() {
        let r = Resource::registry("MyRegistry.AzureCR.io.").unwrap();
        assert_eq!(r.registry_host(), Some("myregistry.azurecr.io"));
        assert_eq!(canonical_name(&r), None);
        for text in [r.as_str(), "acr%3Amyregistry.azurecr.io"] {
            assert!(resolve(text).is_err(), "{text}");
            assert!(resolve_arg(text).is_err(), "{text}");
            assert!(resolve_query(text).is_err(), "{text}");
        }
        assert_eq!(
            resolve("myregistry.azurecr.io").unwrap().registry_host(),
            None
        );
        assert!(Resource::registry("not a host").is_none());
        assert!(Resource::registry("localhost").is_none());
    }

    #[test]
    fn guids_are_verbatim() {
        let g = "499b84ac-1321-427f-aa17-267ca6975798";
        assert_eq!(resolve(g).unwrap(), g);
        assert!(!is_guid("499b84ac-1321-427f-aa17-267ca697579"));
    }

    #[test]
    fn invalid_names() {
        assert_eq!(resolve(""), Err(NameError::Empty));
        assert_eq!(resolve(".json"), Err(NameError::Reserved));
        assert_eq!(resolve(&"a".repeat(256)), Err(NameError::TooLong));
        assert_eq!(resolve("bad\u{7}.com"), Err(NameError::ControlCharacter));
        for hidden in ["\u{202E}", "\u{2066}", "\u{200B}", "\u{FEFF}", "\u{2028}"] {
            let name = format!("evil{hidden}moc.example.com");
            assert_eq!(resolve(&name), Err(NameError::ControlCharacter), "{name:?}");
            let encoded = format!(
                "https%3A%2F%2Fa{}",
                utf8_percent_encode(hidden, NON_ALPHANUMERIC)
            );
            assert_eq!(resolve(&encoded), Err(NameError::ControlCharacter));
            let uri = format!("https://a{hidden}b.example.com/");
            assert_eq!(resolve_arg(&uri), Err(NameError::ControlCharacter));
        }
    }

    #[test]
    fn canonical_names_round_trip() {
        for (short, resource) in well_known() {
            assert_eq!(canonical_name(resource).as_deref(), Some(*short));
        }
        assert_eq!(
            canonical_name("https://myapp.example.com").unwrap(),
            "myapp.example.com"
        );
        let g = "6dae42f8-4368-4678-94ff-3960e28e3630";
        assert_eq!(canonical_name(g).unwrap(), g);
        // ARM without its slash is another resource string: listed percent-encoded.
        let n = canonical_name("https://management.azure.com").unwrap();
        assert_eq!(n, "https%3A%2F%2Fmanagement.azure.com");
        assert_eq!(resolve(&n).unwrap(), "https://management.azure.com");
        let n = canonical_name("api://x y").unwrap_or_default();
        assert!(
            n.is_empty(),
            "a resource the rules cannot produce is not listed"
        );
    }

    #[test]
    fn sdk_queries_share_their_file_names_resource_in_either_spelling() {
        let arm = resolve("management.azure.com").unwrap();
        for sent in [
            "https://management.azure.com",
            "https://management.azure.com/",
            "https://management.azure.com/.default",
            "https://management.azure.com//.default",
            // The same rules as `get` and `--resource`: host names in any case.
            "https://MANAGEMENT.AZURE.COM./.default",
        ] {
            assert_eq!(resolve_query(sent).unwrap(), arm, "{sent}");
        }
        let kv = resolve("vault.azure.net").unwrap();
        assert_eq!(resolve_query("https://vault.azure.net").unwrap(), kv);
        assert_eq!(resolve_query("https://vault.azure.net/").unwrap(), kv);
        let pbi = "https://analysis.windows.net/powerbi/api";
        assert_eq!(resolve_query(&format!("{pbi}/")).unwrap(), pbi);
    }

    #[test]
    fn other_sdk_resources_are_verbatim_like_a_file_name() {
        assert_eq!(
            resolve_query("https://myapp.example.com").unwrap(),
            resolve("myapp.example.com").unwrap()
        );
        assert_eq!(
            resolve_query("https://myapp.example.com/").unwrap(),
            "https://myapp.example.com/"
        );
        assert_eq!(resolve_query("api://my-app").unwrap(), "api://my-app");
        let g = "499b84ac-1321-427f-aa17-267ca6975798";
        assert_eq!(resolve_query(g).unwrap(), g);
        assert_eq!(resolve_query(&format!("{g}/.default")).unwrap(), g);
    }

    #[test]
    fn bad_sdk_resources() {
        assert_eq!(resolve_query(""), Err(NameError::Empty));
        assert_eq!(resolve_query("/.default"), Err(NameError::NotAResource));
        assert_eq!(
            resolve_query("management.azure.com"),
            Err(NameError::NotAResource)
        );
        assert_eq!(resolve_query("hello world"), Err(NameError::NotAResource));
        assert_eq!(resolve_query("https://a b"), Err(NameError::NotAResource));
        assert_eq!(
            resolve_query("https://a\nb"),
            Err(NameError::ControlCharacter)
        );
        let long = format!("https://{}", "a".repeat(MAX_RESOURCE));
        assert_eq!(resolve_query(&long), Err(NameError::TooLong));
    }
}
