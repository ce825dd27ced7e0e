//! The command line: `mount`, `sink`, `get`, `csi`, `emulator`, `completions`, `man`.

use crate::csi::{CsiError, CsiRequest};
use crate::emulator::entra::EntraCommandError;
use crate::emulator::{Emulator, EmulatorConfig};
use crate::get::{GetError, GetRequest};
use crate::mount::{self, MountError, MountRequest};
use crate::policy::Policy;
use crate::sink::{SinkError, SinkRequest};
use crate::source::declared::IdentityArg;
use crate::source::select::{Env, Wanted};
use crate::source::Identity;
use crate::source::Kind;
use crate::token::View;
use clap::{Args, Parser, Subcommand, ValueHint};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

mod completion;
mod manual;

/// Appended to the help of the program and of each subcommand: the views, the mount(8)
/// form, the signals and what detection reads.
pub const MORE_HELP: &str = "\
Names: a host (management.azure.com, vault.azure.net, any DNS name: https://<name>; case \
and a trailing dot do not matter), an app ID (GUID), or a percent-encoded URI; `get` and \
--resource also take a URI (https://management.azure.com/) or a scope \
(https://graph.microsoft.com/.default).

Views (mount; sink writes the same files; get --view): MOUNT/<name> (raw token, no \
newline), MOUNT/.json/<name>, MOUNT/.header/<name> (Authorization: Bearer ...), \
MOUNT/.kubectl/<name> (ExecCredential v1; .kubectl-v1beta1/ v1beta1), \
MOUNT/.git-credential/<name>, MOUNT/.claims/<name> (the JWT payload), MOUNT/.status (JSON: \
source, identity, errors, counters), MOUNT/.env (--serve-endpoint, --serve-imds); \
MOUNT/id/NAME/ the same tree for each --identity NAME=SELECTOR; MOUNT/.acr/REGISTRY \
(an Azure Container Registry's refresh token; REGISTRY.json: username, refresh_token, \
expires_on; for docker: credential-helper).

mount(8) and fstab: cstokenfs SOURCE MOUNTPOINT -o OPTIONS (SOURCE is the name in the \
mount table); every long flag of mount is an -o key with _ for - \
(allow_other,uid=1000,mode=0440,endpoint=URL,auto_unmount,debug,...). fstab: cstoken \
/run/cstoken fuse.cstokenfs allow_other 0 0

Signals (mount, sink): SIGTERM or SIGINT unmount (sink: remove its files) and exit 0; \
SIGUSR1 drops every held token so the next read fetches anew; SIGHUP reopens --log-file.

Environment: --source auto detects from MSI_ENDPOINT, MSI_SECRET, IDENTITY_ENDPOINT, \
IDENTITY_HEADER, IMDS_ENDPOINT and `az` on PATH (IMDS only with --source imds); RUST_LOG \
sets the log level (default info; RUST_LOG=info,cstokenfs::audit=warn quiets the open \
audit). Detached without --log-file, logs go to syslog (/dev/log).";

#[derive(Parser, Debug)]
#[command(
    name = "cstokenfs",
    version,
    // `-o uid=1000 --uid 1000` or `-f -o foreground`: the last one wins, as in mount(8).
    args_override_self = true,
    // Help wraps at the terminal's width, at 80 columns when not printed to a terminal.
    max_term_width = help_width(),
    about = "A read-only FUSE filesystem where `cat MOUNT/<resource>` prints a fresh, cached Azure access token",
    long_about = "A read-only FUSE filesystem where `cat MOUNT/<resource>` prints a fresh, cached \
Azure access token.

mount serves tokens as files through FUSE; sink keeps the same files on a tmpfs where FUSE \
is missing; get prints one token; csi gives each Kubernetes pod its own identity's tokens in \
a volume; emulator stands in for the token endpoints. Tokens come from Azure Cloud Shell, \
IMDS, App Service, Azure Arc, the Azure CLI or Microsoft Entra, chosen by --source or \
detected from the environment.",
    after_help = MORE_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount the token filesystem at MOUNTPOINT (detaches once the mount is live unless -f).
    ///
    /// Each file under MOUNTPOINT is a view of a token: `cat MOUNTPOINT/management.azure.com`
    /// prints one for https://management.azure.com/, fetched at the first read, cached,
    /// refreshed before it expires and never served expired. The daemon serves every
    /// process that may reach the mount until it is unmounted.
    #[command(after_help = MORE_HELP)]
    Mount(Box<MountArgs>),
    /// Without FUSE: keep the declared resources' tokens as files in DIR (tmpfs or ramfs),
    /// replaced atomically, removed before they expire (detaches once written unless -f).
    ///
    /// DIR gets the mount's views of each --resource as plain files, for containers without
    /// /dev/fuse; inotify readers see each replacement as a rename.
    #[command(after_help = MORE_HELP)]
    Sink(SinkArgs),
    /// Fetch one token with the same client and name rules, print it, no mount.
    ///
    /// The token (or the document of --view) and a newline on standard output; nothing is
    /// kept between runs.
    #[command(after_help = MORE_HELP)]
    Get(GetArgs),
    /// Kubernetes CSI node plugin: each pod's own workload identity's tokens as files in
    /// its ephemeral inline volume (gRPC on a unix socket; logs to stderr).
    ///
    /// Run by the DaemonSet under deploy/kubernetes/csi/; tokens come from Microsoft Entra
    /// with each pod's service-account token, never as the node.
    Csi(CsiArgs),
    /// Serve a local stand-in for the Cloud Shell token endpoint (unsigned test tokens).
    ///
    /// On loopback only; --protocol serves IMDS, App Service, Azure Arc or Entra instead,
    /// for trying the mount and the SDKs without Azure.
    #[command(after_help = MORE_HELP)]
    Emulator(EmulatorArgs),
    /// Docker credential helper: registry credentials from the mount's .acr/ files.
    ///
    /// Docker's credential-helper protocol (get, list, store, erase) over
    /// MOUNT/.acr/REGISTRY, so every docker, buildx, podman or skopeo process shares the
    /// daemon's cache; also run as `docker-credential-cstokenfs` (a symlink): name it in
    /// ~/.docker/config.json's credHelpers ("myregistry.azurecr.io": "cstokenfs").
    #[command(after_help = MORE_HELP)]
    CredentialHelper(CredentialHelperArgs),
    /// Print a shell completion script for bash, zsh or fish on stdout.
    Completions(CompletionsArgs),
    /// Print the main man page (roff) on stdout, or write every page into a directory.
    Man(ManArgs),
}

/// Help's width: 0 (the terminal's own) when standard output is a terminal, else 80.
fn help_width() -> usize {
    use std::io::IsTerminal;
    width_for(std::io::stdout().is_terminal())
}

fn width_for(terminal: bool) -> usize {
    match terminal {
        true => 0,
        false => 80,
    }
}

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Write cstokenfs.1 and a page per subcommand (cstokenfs-mount.1, ...) into DIR,
    /// made if missing, instead of printing the main page.
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CredentialHelperArgs {
    /// The protocol's action: get (server URL on stdin; prints the credentials), list,
    /// store or erase (both accepted, without effect).
    #[arg(value_name = "ACTION", value_parser = ["get", "list", "store", "erase"])]
    pub action: String,
    /// The cstokenfs mount to read [default: $CSTOKENFS_MOUNT, else /run/cstoken].
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub mount: Option<PathBuf>,
    /// Read MOUNT/id/NAME/.acr/ (a declared identity's) [default: $CSTOKENFS_IDENTITY,
    /// else the mount's own identity].
    #[arg(long, value_name = "NAME")]
    pub identity: Option<String>,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh or fish.
    #[arg(value_name = "SHELL", value_parser = ["bash", "zsh", "fish"])]
    pub shell: String,
}

/// Which upstream and identity: the flags every command that fetches takes (turned into a
/// `Wanted` for `source::select`; not to be confused with the cache's rate-limited
/// `cache::upstream::Upstream`).
#[derive(Args, Debug, Clone)]
pub struct UpstreamArgs {
    /// Where tokens come from: auto, cloudshell, imds, appservice, arc, azure-cli,
    /// workload-identity, service-principal [default: auto, detected from the environment;
    /// IMDS only when chosen].
    #[arg(long, value_name = "SOURCE", value_parser = completion::listed(parse_source, completion::source_values), hide_possible_values = true)]
    pub source: Option<SourceArg>,
    /// Token endpoint URL of any HTTP source [default: $MSI_ENDPOINT, else
    /// http://localhost:50342/oauth2/token for Cloud Shell; the source's own otherwise].
    #[arg(long, value_name = "URL", conflicts_with = "emulator")]
    pub endpoint: Option<String>,
    /// Serve tokens from the built-in emulator on an ephemeral loopback port.
    #[arg(long)]
    pub emulator: bool,
    /// The most one fetch may take, retries included, in seconds (1 to 60).
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = parse_timeout)]
    pub timeout: u64,
    /// The mount's own identity: a user-assigned identity by client ID (IMDS, App
    /// Service), the application's client ID (Entra) [default: $AZURE_CLIENT_ID, as the
    /// SDKs' DefaultAzureCredential takes it, for imds, appservice and Entra; none: the
    /// system-assigned identity]. `.status`'s `identity` says which is used and why.
    #[arg(long, value_name = "ID")]
    pub client_id: Option<String>,
    /// User-assigned identity by object (principal) ID (IMDS, App Service).
    #[arg(long, value_name = "ID")]
    pub object_id: Option<String>,
    /// User-assigned identity by Azure resource ID (IMDS, App Service).
    #[arg(long, value_name = "ID")]
    pub msi_res_id: Option<String>,
    /// Another identity served beside the mount's own, under MOUNT/id/NAME/ (repeatable).
    /// NAME: a-z, 0-9, - (up to 63). imds, appservice: one of client-id=GUID,
    /// object-id=GUID, resource-id=/subscriptions/.../userAssignedIdentities/N.
    /// workload-identity, service-principal: client-id=GUID, and tenant-id=GUID,
    /// client-secret-file=PATH or client-certificate=PATH by repeating the flag with the
    /// same NAME (what it does not set is the mount's). `get`: print this identity's token.
    #[arg(long = "identity", value_name = "NAME=SELECTOR", value_parser = crate::source::declared::parse_identity_arg)]
    pub identities: Vec<IdentityArg>,
    #[command(flatten)]
    pub entra: EntraArgs,
}

/// The Entra sources (workload identity, service principal).
#[derive(Args, Debug, Clone, Default)]
pub struct EntraArgs {
    /// Entra tenant ID or domain [default: $AZURE_TENANT_ID].
    #[arg(long, value_name = "ID")]
    pub tenant_id: Option<String>,
    /// Entra authority: https://, or http:// to a loopback host
    /// [default: $AZURE_AUTHORITY_HOST, else https://login.microsoftonline.com/].
    #[arg(long, value_name = "URL")]
    pub authority_host: Option<String>,
    /// Workload identity: the federated (service account) token file, read for every
    /// request [default: $AZURE_FEDERATED_TOKEN_FILE].
    #[arg(long, value_name = "PATH", value_hint = ValueHint::FilePath)]
    pub federated_token_file: Option<PathBuf>,
    /// Service principal: a file holding the client secret (one trailing newline is not
    /// part of it) [default: $AZURE_CLIENT_SECRET].
    #[arg(long, value_name = "PATH", value_hint = ValueHint::FilePath)]
    pub client_secret_file: Option<PathBuf>,
    /// Service principal: a PEM file with the certificate and its unencrypted RSA key
    /// [default: $AZURE_CLIENT_CERTIFICATE_PATH].
    #[arg(long, value_name = "PATH", value_hint = ValueHint::FilePath)]
    pub client_certificate: Option<PathBuf>,
    /// PEM CA certificates trusted besides the system's (Entra's TLS).
    #[arg(long, value_name = "PEM", value_hint = ValueHint::FilePath)]
    pub ca_file: Option<PathBuf>,
}

/// `--source`: `auto` or an upstream.
#[derive(Debug, Clone, Copy)]
pub struct SourceArg(Option<Kind>);

fn parse_source(s: &str) -> Result<SourceArg, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(SourceArg(None));
    }
    s.parse::<Kind>()
        .map(|k| SourceArg(Some(k)))
        .map_err(|e| format!("{e} (or auto)"))
}

/// The longest `--timeout`: a reader waiting on a first fetch sits in the kernel's lookup,
/// uninterruptible (D state, even for SIGKILL), and the kernel's hung-task watchdog warns
/// after 120 s.
pub const MAX_TIMEOUT_SECS: u64 = 60;

fn parse_timeout(s: &str) -> Result<u64, String> {
    let secs: u64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number of seconds"))?;
    match secs {
        0 => Err("must be at least 1 second".into()),
        1..=MAX_TIMEOUT_SECS => Ok(secs),
        _ => Err(format!(
            "{secs} s is too long: at most {MAX_TIMEOUT_SECS} s, because readers waiting on a \
             first fetch cannot be interrupted (they sit in the kernel's lookup, in D state, \
             where not even kill -9 reaches them) and the kernel reports hung tasks after 120 s"
        )),
    }
}

impl UpstreamArgs {
    /// What the flags ask for; a usage error when the `--identity` flags do not add up,
    /// or name identities the source cannot serve.
    pub fn wanted(&self) -> Result<Wanted, CliError> {
        let identities =
            crate::source::declared::gather(&self.identities).map_err(CliError::Usage)?;
        let wanted = Wanted {
            source: self.source.and_then(|s| s.0),
            endpoint: self.endpoint.clone(),
            emulator: self.emulator,
            identity: Identity {
                client_id: self.client_id.clone(),
                object_id: self.object_id.clone(),
                msi_res_id: self.msi_res_id.clone(),
            },
            tenant_id: self.entra.tenant_id.clone(),
            authority_host: self.entra.authority_host.clone(),
            federated_token_file: self.entra.federated_token_file.clone(),
            client_secret_file: self.entra.client_secret_file.clone(),
            client_certificate: self.entra.client_certificate.clone(),
            ca_file: self.entra.ca_file.clone(),
            identities,
        };
        crate::source::select::check_identities(&wanted, &Env::current())
            .map_err(CliError::Usage)?;
        Ok(wanted)
    }
}

/// The flags of a long-running daemon (`mount`, `sink`) beyond the upstream: freshness,
/// logs, owner and mode.
#[derive(Args, Debug, Clone)]
pub struct DaemonArgs {
    /// Refresh a token when this little lifetime is left, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = refresh_margin_parser())]
    pub refresh_margin: u64,
    /// Where logs go when detached (foreground: stderr; without it: syslog); level from
    /// RUST_LOG (default info).
    #[arg(long, value_name = "PATH", value_hint = ValueHint::FilePath)]
    pub log_file: Option<PathBuf>,
    /// Owner of the files [default: the user who ran the command].
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,
    /// Group of the files [default: the group of the user who ran the command].
    #[arg(long, value_name = "GID")]
    pub gid: Option<u32>,
    /// Permission bits of token files, octal; directories get the matching x bits
    /// [default: 0400].
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    pub mode: Option<u16>,
}

/// `--metrics`, on every long-running front end (`mount`, `sink`, `csi`).
#[derive(Args, Debug, Clone)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics (GET /metrics), /healthz and /readyz on this address
    /// (IP:PORT, any address: they hold no secret; port 0: ephemeral).
    #[arg(long, value_name = "ADDR", value_parser = crate::metrics::parse_listen)]
    pub metrics: Option<SocketAddr>,
}

/// `--refresh-margin`: seconds, up to a year.
fn refresh_margin_parser() -> clap::builder::RangedI64ValueParser<u64> {
    clap::builder::RangedI64ValueParser::<u64>::new().range(0..=31_536_000)
}

/// `--max-upstream-rate`: requests per second, 0 for no bound.
fn max_upstream_rate_parser() -> clap::builder::RangedI64ValueParser<u32> {
    clap::builder::RangedI64ValueParser::<u32>::new().range(0..=100_000)
}

/// An octal permission mode, with or without a leading 0 (`0440`, `440`): permission bits
/// only (no setuid, setgid or sticky bit).
fn parse_mode(s: &str) -> Result<u16, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m as u16),
        Ok(m) if m <= 0o7777 && !digits.is_empty() => Err(format!(
            "{s} has setuid, setgid or sticky bits ({:04o}): only permission bits are allowed \
             (0000 to 0777, such as 0400 or 0440)",
            m & 0o7000
        )),
        Ok(_) => Err(format!(
            "{s} is out of range: only permission bits are allowed (0000 to 0777, such as 0400 or 0440)"
        )),
        Err(_) => Err(format!("{s:?} is not an octal mode such as 0400 or 440")),
    }
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Where to mount (an existing directory).
    #[arg(value_name = "MOUNTPOINT", value_hint = ValueHint::DirPath)]
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    /// Stay attached (logs to stderr); without it, return once the mount is live.
    #[arg(short, long)]
    pub foreground: bool,
    /// Debug: stay attached (as -f) and log at debug level; FUSE's per-request lines only
    /// with RUST_LOG=trace.
    #[arg(short, long)]
    pub debug: bool,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
    /// A resource the listing always shows (repeatable).
    #[arg(long = "resource", value_name = "NAME")]
    pub resources: Vec<String>,
    /// How long a refused resource answers ENOENT without asking the endpoint, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::builder::RangedI64ValueParser::<u64>::new().range(0..=31_536_000))]
    pub negative_ttl: u64,
    /// The most tokens held; the least recently read undeclared one is evicted first.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::builder::RangedI64ValueParser::<u64>::new().range(1..=1_000_000))]
    pub max_resources: u64,
    /// Upstream requests per second for the whole mount, after a burst of 100 (0: no bound).
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = max_upstream_rate_parser())]
    pub max_upstream_rate: u32,
    /// Let users other than the one who mounted reach the mount (the modes then decide).
    #[arg(long)]
    pub allow_other: bool,
    /// Let root reach the mount too, besides the user who mounted (an ordinary user needs
    /// `user_allow_other` in /etc/fuse.conf).
    #[arg(long)]
    pub allow_root: bool,
    /// Detach the mount as soon as the daemon dies (kill -9, a crash), through fuse3's
    /// fusermount3; implies --allow-root unless --allow-other.
    #[arg(long)]
    pub auto_unmount: bool,
    /// Keep the daemon's memory (tokens included) out of swap.
    #[arg(long)]
    pub mlock: bool,
    /// The kernel answers opens itself: a read costs what a tmpfs file's does. Expiry,
    /// refresh and SIGUSR1 still hold (a refresh reaches readers within about a second);
    /// the audit logs lookups (about one a second per reader and name), not opens.
    #[arg(long)]
    pub no_open: bool,
    /// Also serve App Service's managed-identity protocol from the mount's cache on this
    /// loopback address (127.0.0.1:PORT or [::1]:PORT; port 0: ephemeral); the URL and the
    /// secret are in MOUNT/.env.
    #[arg(long, value_name = "ADDR", value_parser = crate::endpoint::parse_listen)]
    pub serve_endpoint: Option<SocketAddr>,
    /// Also serve IMDS's protocol (GET /metadata/identity/oauth2/token, Metadata: true) on
    /// this loopback address, or on 169.254.169.254:80 once configured on an interface; only
    /// uids that could read the token files get tokens. MOUNT/.env names it for the SDKs.
    #[arg(long, value_name = "ADDR", value_parser = crate::imds::parse_listen)]
    pub serve_imds: Option<SocketAddr>,
    /// FUSE-style options: every flag above as a key with `_` for `-`
    /// (allow_other,uid=1000,mode=0440,endpoint=URL,...).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// The name shown as the source in the mount table (SOURCE in the mount(8) form).
    #[arg(long, value_name = "NAME", default_value = "cstokenfs")]
    pub fsname: String,
    /// The Entra token exchanged for MOUNT/.acr/REGISTRY: registry
    /// (https://containerregistry.azure.net/, the ARM token when the endpoint refuses it)
    /// or management (the ARM token).
    #[arg(long, value_name = "AUDIENCE", default_value = "registry", value_parser = ["registry", "management"])]
    pub acr_audience: String,
    /// One more registry host suffix an Entra token may be sent to, besides .azurecr.io,
    /// .azurecr.cn and .azurecr.us (repeatable).
    #[arg(long = "acr-suffix", value_name = "SUFFIX")]
    pub acr_suffixes: Vec<String>,
    /// Reach registry REGISTRY at this loopback URL instead of https://REGISTRY (tests, an
    /// emulator; repeatable).
    #[arg(long = "acr-endpoint", value_name = "REGISTRY=URL")]
    pub acr_endpoints: Vec<String>,
}

#[derive(Args, Debug)]
pub struct SinkArgs {
    /// Where the files go: a directory on tmpfs or ramfs.
    #[arg(value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub dir: PathBuf,
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    /// Stay attached (logs to stderr); without it, return once every declared resource was
    /// written or failed once.
    #[arg(short, long)]
    pub foreground: bool,
    /// A resource to keep as files (repeatable, at least one: only these exist in DIR).
    #[arg(long = "resource", value_name = "NAME", required = true)]
    pub resources: Vec<String>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    /// Print the `.json` view's document instead of the bare token (= --view json).
    #[arg(long, conflicts_with = "view")]
    pub json: bool,
    /// The view to print: raw (the token and a newline), json, header, kubectl,
    /// kubectl-v1beta1, git-credential, claims.
    #[arg(long, value_name = "VIEW", default_value = "raw", value_parser = completion::listed(parse_view, completion::view_values), hide_possible_values = true)]
    pub view: View,
    /// The resource: a host name as in the mount (management.azure.com), a URI
    /// (https://management.azure.com/), a scope (https://graph.microsoft.com/.default), a GUID.
    #[arg(value_name = "NAME")]
    pub name: String,
}

/// `csi`: the flags of the CSI node plugin. Its `--endpoint` is the gRPC socket, never a
/// token source (no `$MSI_ENDPOINT` default); tokens come only from Entra, with each
/// pod's service-account token.
#[derive(Args, Debug)]
pub struct CsiArgs {
    /// The CSI gRPC socket: unix:///PATH or an absolute path, created with mode 0600; its
    /// directory must exist [default: $CSI_ENDPOINT].
    #[arg(long, value_name = "ENDPOINT")]
    pub endpoint: Option<String>,
    /// This node's ID, as NodeGetInfo answers [default: $NODE_ID].
    #[arg(long, value_name = "NODE")]
    pub node_id: Option<String>,
    /// Entra tenant ID of volumes whose attributes name none [default: $AZURE_TENANT_ID].
    #[arg(long, value_name = "ID")]
    pub tenant_id: Option<String>,
    /// Entra authority: https://, or http:// to a loopback host
    /// [default: $AZURE_AUTHORITY_HOST, else https://login.microsoftonline.com/].
    #[arg(long, value_name = "URL")]
    pub authority_host: Option<String>,
    /// PEM CA certificates trusted besides the system's (Entra's TLS).
    #[arg(long, value_name = "PEM", value_hint = ValueHint::FilePath)]
    pub ca_file: Option<PathBuf>,
    /// Where each volume's tmpfs is mounted read-write (a hostPath with Bidirectional
    /// mount propagation).
    #[arg(
        long,
        value_name = "DIR",
        value_hint = ValueHint::DirPath,
        default_value = "/var/lib/cstokenfs-csi/data"
    )]
    pub data_dir: PathBuf,
    /// Where the record of each published volume is kept (never a token).
    #[arg(
        long,
        value_name = "DIR",
        value_hint = ValueHint::DirPath,
        default_value = "/var/lib/cstokenfs-csi/state"
    )]
    pub state_dir: PathBuf,
    /// The audience of the service-account token sent to Entra as the client assertion
    /// (the CSIDriver's tokenRequests).
    #[arg(long, value_name = "AUDIENCE", default_value = crate::csi::DEFAULT_AUDIENCE)]
    pub audience: String,
    /// Refresh a token when this little lifetime is left, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = refresh_margin_parser())]
    pub refresh_margin: u64,
    /// The most one fetch may take, retries included, in seconds (1 to 60).
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = parse_timeout)]
    pub timeout: u64,
    /// Upstream requests per second for the whole node, after a burst of 100 (0: no bound).
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = max_upstream_rate_parser())]
    pub max_upstream_rate: u32,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

/// The flag's value, else the environment variable's (empty counts as unset).
fn flag_or_env(flag: Option<String>, var: &str) -> Option<String> {
    flag.or_else(|| std::env::var(var).ok())
        .filter(|v| !v.is_empty())
}

impl CsiArgs {
    /// The request `csi::run` serves; a usage error without an endpoint or node ID.
    pub fn request(self) -> Result<CsiRequest, CliError> {
        let endpoint = flag_or_env(self.endpoint, "CSI_ENDPOINT").ok_or_else(|| {
            CliError::Usage("csi needs --endpoint (or $CSI_ENDPOINT): the gRPC socket".into())
        })?;
        let node_id = flag_or_env(self.node_id, "NODE_ID").ok_or_else(|| {
            CliError::Usage("csi needs --node-id (or $NODE_ID): this node's name".into())
        })?;
        Ok(CsiRequest {
            endpoint,
            node_id,
            tenant_id: flag_or_env(self.tenant_id, "AZURE_TENANT_ID"),
            authority_host: flag_or_env(self.authority_host, "AZURE_AUTHORITY_HOST")
                .unwrap_or_else(|| crate::source::client_tls::DEFAULT_AUTHORITY.into()),
            ca_file: self.ca_file,
            data_dir: self.data_dir,
            state_dir: self.state_dir,
            audience: self.audience,
            metrics: self.metrics.metrics,
            policy: Policy {
                refresh_margin_ms: (self.refresh_margin as i64).saturating_mul(1000),
                timeout: Duration::from_secs(self.timeout),
                max_upstream_rate: self.max_upstream_rate,
                ..Policy::default()
            },
        })
    }
}

#[derive(Args, Debug)]
pub struct EmulatorArgs {
    /// Address to listen on; loopback only (127.0.0.0/8, ::1).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50342", value_parser = parse_loopback)]
    pub listen: SocketAddr,
    /// Lifetime of issued tokens, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub ttl: u64,
    /// Delay before each answer, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub latency_ms: u64,
    /// A further resource to accept (repeatable).
    #[arg(long = "allow", value_name = "RESOURCE")]
    pub allow: Vec<String>,
    /// Behave like the real endpoint's cache: hand out the same token until it expires.
    #[arg(long)]
    pub caching: bool,
    /// Accept every resource (for benchmarks and tests).
    #[arg(long)]
    pub allow_any: bool,
    /// The protocol to serve: cloudshell, imds, appservice, arc, entra.
    #[arg(long, value_name = "PROTOCOL", default_value = "cloudshell", value_parser = completion::listed(parse_protocol, completion::protocol_values), hide_possible_values = true)]
    pub protocol: Kind,
    /// App Service: the X-IDENTITY-HEADER secret is this file's contents (trailing newline
    /// trimmed); without it a random one is generated and printed on stdout.
    #[arg(long, value_name = "PATH", value_hint = ValueHint::FilePath)]
    pub secret_file: Option<PathBuf>,
    /// IMDS, App Service: know N user-assigned identities (client IDs
    /// 00000000-0000-0000-0000-c0000000000N, object IDs ...-a0000000000N, resource IDs
    /// .../userAssignedIdentities/id0N; logged at start) and refuse any other named, as the
    /// real services do [default: answer any identity named].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(0..=255))]
    pub user_assigned: Option<u8>,
    #[command(flatten)]
    pub entra: crate::emulator::entra::EntraEmulatorArgs,
}

fn parse_loopback(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|e| format!("not an IP:PORT address: {e}"))?;
    crate::net::check_loopback(addr).map_err(|e| e.to_string())?;
    Ok(addr)
}

/// `--secret-file` cannot be used: unreadable, empty, or not a usable secret.
#[derive(Debug)]
pub struct SecretFileError {
    path: PathBuf,
    /// What is wrong with it (never the contents).
    problem: String,
}

impl std::fmt::Display for SecretFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "--secret-file {}: {}", self.path.display(), self.problem)
    }
}

impl std::error::Error for SecretFileError {}

/// The secret in `path`: its contents without one trailing newline; empty or unreadable
/// is an error naming the file.
pub fn read_secret_file(path: &std::path::Path) -> Result<String, SecretFileError> {
    let bad = |problem: &dyn std::fmt::Display| SecretFileError {
        path: path.to_owned(),
        problem: problem.to_string(),
    };
    let secret = crate::hardening::read_secret_file(path).map_err(|e| bad(&e))?;
    crate::emulator::check_secret(&secret).map_err(|e| bad(&e))?;
    Ok(secret.to_string())
}

fn parse_view(s: &str) -> Result<View, String> {
    View::ALL
        .into_iter()
        .find(|v| match v {
            View::Raw => s == "raw",
            _ => v.label() == s,
        })
        .ok_or_else(|| {
            format!("unknown view {s:?}: raw, json, header, kubectl, kubectl-v1beta1, git-credential or claims")
        })
}

fn parse_protocol(s: &str) -> Result<Kind, String> {
    if s.eq_ignore_ascii_case("entra") {
        return Ok(Kind::ServicePrincipal);
    }
    let kind = s.parse::<Kind>().map_err(|e| e.to_string())?;
    if !crate::emulator::SERVED.contains(&kind) {
        return Err(format!(
            "the emulator does not serve {kind}: one of cloudshell, imds, appservice, arc, entra"
        ));
    }
    Ok(kind)
}

/// Runs the command: `Ok` is exit 0; `main` prints the error and maps it to the exit code.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Mount(args) => mount_command(*args),
        Command::Sink(args) => sink_command(args),
        Command::Get(args) => get_command(args),
        Command::Csi(args) => csi_command(args),
        Command::Emulator(args) => emulator_command(args),
        Command::CredentialHelper(args) => credential_helper_command(args),
        Command::Completions(args) => completion::command(&args.shell),
        Command::Man(args) => manual::command(args.dir.as_deref()),
    }
}

/// Why a command failed: the one error every command returns. `main` prints it (once)
/// and decides the exit code from the variant (usage or failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliError {
    /// A bad command line, or flags and environment that ask for something that cannot
    /// work: the message.
    Usage(String),
    /// A failure at run time: the message.
    Failure(String),
    /// A detached daemon failed after its parent printed why: nothing more to say.
    Reported,
}

impl CliError {
    /// What to print after `cstokenfs: `, if anything.
    pub fn message(&self) -> Option<&str> {
        match self {
            CliError::Usage(m) | CliError::Failure(m) => Some(m),
            CliError::Reported => None,
        }
    }

    fn failure(e: impl std::fmt::Display) -> CliError {
        CliError::Failure(e.to_string())
    }

    fn usage(e: impl std::fmt::Display) -> CliError {
        CliError::Usage(e.to_string())
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            self.message()
                .unwrap_or("the daemon failed after detaching"),
        )
    }
}

impl std::error::Error for CliError {}

impl From<MountError> for CliError {
    fn from(e: MountError) -> CliError {
        match e {
            MountError::Reported => CliError::Reported,
            e => CliError::failure(e),
        }
    }
}

impl From<CsiError> for CliError {
    fn from(e: CsiError) -> CliError {
        match e {
            CsiError::Usage(m) => CliError::Usage(m),
            e => CliError::failure(e),
        }
    }
}

impl From<SinkError> for CliError {
    fn from(e: SinkError) -> CliError {
        match e {
            SinkError::Usage(m) => CliError::Usage(m),
            SinkError::Reported => CliError::Reported,
            e => CliError::failure(e),
        }
    }
}

impl From<GetError> for CliError {
    fn from(e: GetError) -> CliError {
        match e.is_usage() {
            true => CliError::usage(e),
            false => CliError::failure(e),
        }
    }
}

impl From<EntraCommandError> for CliError {
    fn from(e: EntraCommandError) -> CliError {
        match e.is_usage() {
            true => CliError::usage(e),
            false => CliError::failure(e),
        }
    }
}

impl From<SecretFileError> for CliError {
    fn from(e: SecretFileError) -> CliError {
        CliError::failure(e)
    }
}

fn write_stdout(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(|e| CliError::Failure(format!("cannot write to stdout: {e}")))
}

/// Warnings for options that cannot do what was asked; the mount goes on (fstab lines must
/// keep working). Returned, not printed, so they can be tested.
pub fn mount_warnings(args: &MountArgs, uid: u32, gid: u32) -> Vec<String> {
    let mut warnings = Vec::new();
    let reach = if args.allow_root || args.auto_unmount {
        "the user who mounts and root"
    } else {
        "the user who mounts"
    };
    if !args.allow_other {
        if let Some(u) = args
            .daemon
            .uid
            .filter(|u| *u != uid && !(*u == 0 && reach.ends_with("root")))
        {
            warnings.push(format!(
                "--uid {u} without --allow-other: only {reach} can reach the mount, so uid {u} \
                 will be denied (add --allow-other)"
            ));
        }
        if let Some(g) = args.daemon.gid.filter(|g| *g != gid) {
            warnings.push(format!(
                "--gid {g} without --allow-other: only {reach} can reach the mount, so other \
                 members of group {g} will be denied (add --allow-other)"
            ));
        }
    }
    warnings.extend(args.daemon.log_file_warning(args.foreground || args.debug));
    warnings
}

impl DaemonArgs {
    /// The freshness policy these flags and `--timeout` ask for (the rest: defaults).
    fn policy(&self, upstream: &UpstreamArgs) -> Policy {
        Policy {
            refresh_margin_ms: (self.refresh_margin as i64).saturating_mul(1000),
            timeout: Duration::from_secs(upstream.timeout),
            ..Policy::default()
        }
    }

    /// `--log-file` in the foreground does nothing: say so.
    fn log_file_warning(&self, foreground: bool) -> Option<String> {
        let path = self.log_file.as_ref().filter(|_| foreground)?;
        Some(format!(
            "--log-file {} is not used in the foreground (-f, -d): logs go to stderr",
            path.display()
        ))
    }
}

fn warn_all(warnings: &[String]) {
    for w in warnings {
        eprintln!("cstokenfs: warning: {w}");
    }
}

fn mount_command(args: MountArgs) -> Result<(), CliError> {
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    warn_all(&mount_warnings(&args, uid, gid));
    let registries = crate::acr::Registries::new(&crate::acr::Settings {
        audience: args.acr_audience.parse().map_err(CliError::usage)?,
        suffixes: args.acr_suffixes.clone(),
        endpoints: args.acr_endpoints.clone(),
    })
    .map_err(CliError::usage)?;
    let wanted = args.upstream.wanted()?;
    if let Some(addr) = args.serve_imds {
        crate::imds::check_address(addr, wanted.source).map_err(CliError::usage)?;
    }
    let policy = Policy {
        negative_ttl_ms: (args.negative_ttl as i64).saturating_mul(1000),
        max_resources: args.max_resources as usize,
        max_upstream_rate: args.max_upstream_rate,
        ..args.daemon.policy(&args.upstream)
    };
    let request = MountRequest {
        mountpoint: args.mountpoint,
        wanted,
        resources: args.resources,
        policy,
        foreground: args.foreground || args.debug,
        debug: args.debug,
        log_file: args.daemon.log_file,
        uid: args.daemon.uid,
        gid: args.daemon.gid,
        mode: args.daemon.mode.unwrap_or(crate::access::DEFAULT_FILE_MODE),
        allow_other: args.allow_other,
        allow_root: args.allow_root,
        auto_unmount: args.auto_unmount,
        mlock: args.mlock,
        no_open: args.no_open,
        fsname: args.fsname,
        serve_endpoint: args.serve_endpoint,
        serve_imds: args.serve_imds,
        metrics: args.metrics.metrics,
        registries,
    };
    Ok(mount::run(request)?)
}

/// `credential-helper`: its message is on standard output already when it fails (the
/// protocol's), so the failure is `Reported` (exit 1, nothing more printed).
fn credential_helper_command(args: CredentialHelperArgs) -> Result<(), CliError> {
    let request = crate::acr::helper::HelperRequest {
        action: args.action.parse().map_err(CliError::usage)?,
        mount: args.mount,
        identity: args.identity,
    };
    crate::acr::helper::run(&request).map_err(|_| CliError::Reported)
}

fn sink_command(args: SinkArgs) -> Result<(), CliError> {
    warn_all(
        &args
            .daemon
            .log_file_warning(args.foreground)
            .into_iter()
            .collect::<Vec<_>>(),
    );
    let policy = args.daemon.policy(&args.upstream);
    let request = SinkRequest {
        dir: args.dir,
        wanted: args.upstream.wanted()?,
        resources: args.resources,
        policy,
        foreground: args.foreground,
        log_file: args.daemon.log_file,
        uid: args.daemon.uid,
        gid: args.daemon.gid,
        mode: args.daemon.mode,
        metrics: args.metrics.metrics,
    };
    Ok(crate::sink::run(request)?)
}

/// `csi` runs in the foreground (a DaemonSet's container): logs go to stderr.
fn csi_command(args: CsiArgs) -> Result<(), CliError> {
    let request = args.request()?;
    crate::logging::init_stderr("info");
    Ok(crate::csi::run(request)?)
}

fn get_command(args: GetArgs) -> Result<(), CliError> {
    let request = GetRequest {
        wanted: args.upstream.wanted()?,
        timeout: Duration::from_secs(args.upstream.timeout),
        name: args.name,
        view: if args.json { View::Json } else { args.view },
    };
    Ok(crate::get::run(request)?)
}

fn emulator_command(args: EmulatorArgs) -> Result<(), CliError> {
    crate::logging::init_stderr("info");
    if args.user_assigned.is_some() && !matches!(args.protocol, Kind::Imds | Kind::AppService) {
        return Err(CliError::usage(
            "--user-assigned is only for --protocol imds or appservice",
        ));
    }
    if args.protocol.is_entra() {
        let (settings, tls) = args.entra.resolve().map_err(CliError::usage)?;
        return Ok(crate::emulator::entra::command(
            settings,
            tls,
            args.listen,
            args.ttl,
            args.allow,
            args.allow_any,
        )?);
    }
    if args.entra.is_given() {
        return Err(CliError::usage(
            "the Entra options are only for --protocol entra",
        ));
    }
    let identity_header = match (&args.secret_file, args.protocol) {
        (None, _) => None,
        (Some(path), Kind::AppService) => Some(read_secret_file(path)?),
        (Some(_), _) => {
            return Err(CliError::usage(
                "--secret-file is only for --protocol appservice",
            ))
        }
    };
    let generated = identity_header.is_none();
    let config = EmulatorConfig {
        ttl_secs: args.ttl,
        latency: Duration::from_millis(args.latency_ms),
        allow: args.allow,
        allow_any: args.allow_any,
        identity_header,
    };
    let emulator = Emulator::start_with(args.listen, config, args.protocol)
        .map_err(|e| CliError::Failure(format!("cannot listen on {}: {e}", args.listen)))?;
    emulator.set_caching(args.caching);
    if let Some(n) = args.user_assigned {
        let known: Vec<_> = (1..=n)
            .map(crate::emulator::KnownIdentity::numbered)
            .collect();
        for k in &known {
            log::info!(
                "user-assigned identity: client_id {} object_id {} msi_res_id {}",
                k.client_id,
                k.object_id,
                k.resource_id
            );
        }
        emulator.set_identities(known);
    }
    log::info!(
        "emulator serving the {:?} protocol at {}",
        args.protocol,
        emulator.url()
    );
    if args.protocol == Kind::AppService {
        // The one place a secret is printed: a test secret of a test tool, on stdout (never
        // the log), for the user to paste.
        let mut lines = format!("IDENTITY_ENDPOINT={}\n", emulator.url());
        if generated {
            lines.push_str(&format!("IDENTITY_HEADER={}\n", emulator.identity_header()));
        }
        let mut out = std::io::stdout().lock();
        if out
            .write_all(lines.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            log::warn!("cannot write the endpoint and secret to stdout");
        }
    }
    let mut stopper = signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT])
        .map_err(|e| CliError::Failure(format!("cannot handle signals: {e}")))?;
    let _ = stopper.forever().next();
    emulator.stop();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuseopts::{option_keys, subcommands};
    use clap::CommandFactory;

    #[test]
    fn modes_are_octal_permission_bits() {
        assert_eq!(parse_mode("0440"), Ok(0o440));
        assert_eq!(parse_mode("440"), Ok(0o440));
        assert_eq!(parse_mode("0400"), Ok(0o400));
        assert!(parse_mode("0888").is_err());
        assert!(parse_mode("4755")
            .unwrap_err()
            .contains("only permission bits are allowed"));
        assert!(parse_mode("17777").is_err());
        assert!(parse_mode("").is_err());
    }

    /// fuseopts reads the `-o` keys and the subcommands from this definition.
    #[test]
    fn every_long_flag_of_mount_is_a_key() {
        let cli = Cli::command();
        let keys = option_keys(&cli);
        for (key, value) in [
            ("allow_other", false),
            ("allow_root", false),
            ("auto_unmount", false),
            ("debug", false),
            ("fsname", true),
            ("uid", true),
            ("log_file", true),
            ("endpoint", true),
            ("serve_endpoint", true),
            ("serve_imds", true),
            ("metrics", true),
        ] {
            assert!(keys.contains(&(key.to_string(), value)), "{key}: {keys:?}");
        }
        let subs = subcommands(&cli);
        for s in [
            "mount",
            "sink",
            "get",
            "emulator",
            "completions",
            "man",
            "help",
        ] {
            assert!(subs.iter().any(|x| x == s), "{s}");
        }
    }
    /// Help wraps at 80 columns when standard output is not a terminal.
    #[test]
    fn help_wraps_at_80_columns_off_a_terminal() {
        assert_eq!(width_for(true), 0, "a terminal: its own width");
        // As the binary's is when its output is not a terminal, whatever the test's is.
        let mut cli = Cli::command().max_term_width(width_for(false));
        cli.build();
        let mut helps = vec![cli.render_long_help().to_string()];
        for sub in cli.get_subcommands_mut() {
            helps.push(sub.render_long_help().to_string());
        }
        for help in helps {
            for line in help.lines() {
                assert!(line.chars().count() <= 80, "{} columns: {line}", line.len());
            }
        }
    }

    #[test]
    fn a_bad_secret_file_is_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "\n").unwrap();
        let e = read_secret_file(&path).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("--secret-file {}: is empty", path.display())
        );
        std::fs::write(&path, " padded \n").unwrap();
        let e = read_secret_file(&path).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "--secret-file {}: the identity header secret starts or ends with whitespace",
                path.display()
            )
        );
        std::fs::write(&path, "s3cret\n").unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), "s3cret");
    }

    /// Each layer's error reaches main as usage (exit 2) or failure (exit 1), its message
    /// unchanged; a failure a detached daemon's parent already printed is not printed again.
    #[test]
    fn errors_become_usage_or_failure_with_their_message() {
        let usage = CliError::from(SinkError::Usage(
            "sink needs at least one --resource".into(),
        ));
        assert_eq!(
            usage,
            CliError::Usage("sink needs at least one --resource".into())
        );
        let failure = CliError::from(SinkError::Busy("held".into()));
        assert_eq!(failure, CliError::Failure("held".into()));
        let mount = CliError::from(MountError::Mount("/mnt: EPERM".into()));
        assert_eq!(mount, CliError::Failure("mount failed: /mnt: EPERM".into()));
        assert_eq!(CliError::from(MountError::Reported), CliError::Reported);
        assert_eq!(CliError::from(SinkError::Reported), CliError::Reported);
        assert_eq!(CliError::Reported.message(), None);
        assert_eq!(
            CliError::from(CsiError::Usage("--endpoint".into())),
            CliError::Usage("--endpoint".into())
        );
        for e in [
            CsiError::Start("socket".into()),
            CsiError::Internal("oops".into()),
        ] {
            assert_eq!(CliError::from(e.clone()), CliError::Failure(e.to_string()));
        }
        let name = crate::names::resolve_arg("https://").unwrap_err();
        let get = CliError::from(GetError::Name {
            given: "https://".into(),
            error: name,
        });
        assert!(
            matches!(&get, CliError::Usage(m) if m.starts_with("\"https://\" is not a resource name: "))
        );
        let write = CliError::from(GetError::Write(std::io::Error::from_raw_os_error(
            libc::EPIPE,
        )));
        assert!(
            matches!(&write, CliError::Failure(m) if m.starts_with("cannot write the token: "))
        );
    }
}
