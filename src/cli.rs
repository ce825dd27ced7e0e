//! The command line: `mount`, `get`, `emulator`.

use crate::cache::{Cache, SystemClock};
use crate::emulator::{Emulator, EmulatorConfig, Protocol};
use crate::mount::{self, MountRequest};
use crate::policy::Policy;
use crate::source::select::{self, Env, Kind, Plan, Wanted};
use crate::source::Identity;
use crate::token::View;
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "cstokenfs",
    version,
    // `-o uid=1000 --uid 1000` or `-f -o foreground`: the last one wins, as in mount(8).
    args_override_self = true,
    about = "A read-only FUSE filesystem where `cat MOUNT/<resource>` prints a fresh, cached Azure access token",
    after_help = "Names: management.azure.com, vault.azure.net, ... (well-known hosts), any DNS name \
                  (https://<name>), an app ID (GUID), or a percent-encoded URI. Views: MOUNT/<name>, \
                  MOUNT/.json/<name>, MOUNT/.header/<name>, MOUNT/.status."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount the token filesystem at MOUNTPOINT (detaches once the mount is live unless -f).
    Mount(MountArgs),
    /// Fetch one token with the same client and name rules, print it, no mount.
    Get(GetArgs),
    /// Serve a local stand-in for the Cloud Shell token endpoint (unsigned test tokens).
    Emulator(EmulatorArgs),
}

#[derive(Args, Debug, Clone)]
pub struct Upstream {
    /// Where tokens come from: auto, cloudshell, imds, appservice, arc, azure-cli
    /// [default: auto, detected from the environment; IMDS only when chosen].
    #[arg(long, value_name = "SOURCE", value_parser = parse_kind)]
    pub source: Option<Kind>,
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
    /// User-assigned identity by client ID (IMDS, App Service).
    #[arg(long, value_name = "ID")]
    pub client_id: Option<String>,
    /// User-assigned identity by object (principal) ID (IMDS, App Service).
    #[arg(long, value_name = "ID")]
    pub object_id: Option<String>,
    /// User-assigned identity by Azure resource ID (IMDS, App Service).
    #[arg(long, value_name = "ID")]
    pub msi_res_id: Option<String>,
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

fn parse_kind(s: &str) -> Result<Kind, String> {
    s.parse()
}

impl Upstream {
    pub fn wanted(&self) -> Wanted {
        Wanted {
            source: self.source,
            endpoint: self.endpoint.clone(),
            emulator: self.emulator,
            identity: Identity {
                client_id: self.client_id.clone(),
                object_id: self.object_id.clone(),
                msi_res_id: self.msi_res_id.clone(),
            },
        }
    }
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Where to mount (an existing directory).
    #[arg(value_name = "MOUNTPOINT")]
    pub mountpoint: PathBuf,
    #[command(flatten)]
    pub upstream: Upstream,
    /// Stay attached (logs to stderr); without it, return once the mount is live.
    #[arg(short, long)]
    pub foreground: bool,
    /// A resource the listing always shows (repeatable).
    #[arg(long = "resource", value_name = "NAME")]
    pub resources: Vec<String>,
    /// Refresh a token when this little lifetime is left, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=31_536_000))]
    pub refresh_margin: u64,
    /// How long a refused resource answers ENOENT without asking the endpoint, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=31_536_000))]
    pub negative_ttl: u64,
    /// The most tokens held; the least recently read undeclared one is evicted first.
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_resources: u64,
    /// Where logs go when detached (foreground: stderr); level from RUST_LOG (default info).
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
    /// Owner of the files [default: the user who ran mount].
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,
    /// Group of the files [default: the group of the user who ran mount].
    #[arg(long, value_name = "GID")]
    pub gid: Option<u32>,
    /// Permission bits of token files, octal; directories get the matching x bits.
    #[arg(long, value_name = "OCTAL", default_value = "0400", value_parser = crate::fuseopts::parse_mode)]
    pub mode: u16,
    /// Let users other than the one who mounted reach the mount (the modes then decide).
    #[arg(long)]
    pub allow_other: bool,
    /// Keep the daemon's memory (tokens included) out of swap.
    #[arg(long)]
    pub mlock: bool,
    /// FUSE-style options: every flag above as a key with `_` for `-`
    /// (allow_other,uid=1000,mode=0440,endpoint=URL,...).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// The name shown as the source in the mount table.
    #[arg(long, value_name = "NAME", default_value = "cstokenfs", hide = true)]
    pub fsname: String,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    #[command(flatten)]
    pub upstream: Upstream,
    /// Print the `.json` view's document instead of the bare token.
    #[arg(long)]
    pub json: bool,
    /// The resource name, as in the mount (management.azure.com, a GUID, a percent-encoded URI).
    #[arg(value_name = "NAME")]
    pub name: String,
}

#[derive(Args, Debug)]
pub struct EmulatorArgs {
    /// Address to listen on (loopback).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50342")]
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
    /// The protocol to serve: cloudshell, imds, appservice, arc.
    #[arg(long, value_name = "PROTOCOL", default_value = "cloudshell", value_parser = parse_protocol)]
    pub protocol: Protocol,
}

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    s.parse::<Protocol>().map_err(|e| e.to_string())
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Mount(args) => mount_command(args),
        Command::Get(args) => get_command(args),
        Command::Emulator(args) => emulator_command(args),
    }
}

fn mount_command(args: MountArgs) -> ExitCode {
    let policy = Policy {
        refresh_margin_ms: (args.refresh_margin as i64).saturating_mul(1000),
        negative_ttl_ms: (args.negative_ttl as i64).saturating_mul(1000),
        timeout: Duration::from_secs(args.upstream.timeout),
        max_resources: args.max_resources as usize,
    };
    let request = MountRequest {
        mountpoint: args.mountpoint,
        wanted: args.upstream.wanted(),
        resources: args.resources,
        policy,
        foreground: args.foreground,
        log_file: args.log_file,
        uid: args.uid,
        gid: args.gid,
        mode: args.mode,
        allow_other: args.allow_other,
        mlock: args.mlock,
        fsname: args.fsname,
    };
    match mount::run(request) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cstokenfs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn get_command(args: GetArgs) -> ExitCode {
    crate::logging::init_stderr("warn");
    let resource = match crate::names::resolve(&args.name) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cstokenfs: {:?} is not a resource name: {e}", args.name);
            return ExitCode::from(2);
        }
    };
    // Holds the emulator (if any) alive until the token is printed.
    let chosen = match select::plan(&args.upstream.wanted(), &Env::current()).and_then(Plan::build)
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cstokenfs: {e}");
            return ExitCode::from(2);
        }
    };
    let source = chosen.source.clone();
    let policy = Policy {
        timeout: Duration::from_secs(args.upstream.timeout),
        ..Policy::default()
    };
    let cache = Cache::new(source, policy, &[], Arc::new(SystemClock));
    match cache.get_blocking(&resource) {
        Ok(v) => {
            let mut out = std::io::stdout().lock();
            let written = if args.json {
                out.write_all(v.bytes(View::Json))
            } else {
                out.write_all(v.token()).and_then(|()| out.write_all(b"\n"))
            };
            match written.and_then(|()| out.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cstokenfs: cannot write the token: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("cstokenfs: {resource}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn emulator_command(args: EmulatorArgs) -> ExitCode {
    crate::logging::init_stderr("info");
    let config = EmulatorConfig {
        ttl_secs: args.ttl,
        latency: Duration::from_millis(args.latency_ms),
        allow: args.allow,
        allow_any: args.allow_any,
    };
    let emulator = match Emulator::start_with(args.listen, config, args.protocol) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cstokenfs: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    emulator.set_caching(args.caching);
    log::info!(
        "emulator serving the {:?} protocol at {}",
        args.protocol,
        emulator.url()
    );
    let stopper = match signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cstokenfs: cannot handle signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handle = stopper.handle();
    std::thread::spawn(move || {
        let mut stopper = stopper;
        if stopper.forever().next().is_some() {
            handle.close();
        }
    })
    .join()
    .ok();
    emulator.stop();
    ExitCode::SUCCESS
}
