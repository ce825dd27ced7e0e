//! `cstokenfs get NAME`: the one-shot front end. It builds the daemon core without a
//! background pass, fetches one token with the same client and name rules as the mount,
//! and prints one view of it on stdout.

use crate::cache::{IdentityId, Key, ReadError, Use};
use crate::daemon::{self, Daemon, DaemonError};
use crate::names::NameError;
use crate::policy::Policy;
use crate::source::select::Wanted;
use crate::token::View;
use std::fmt;
use std::io::{self, Write};
use std::time::Duration;

/// Everything `get` was asked for.
#[derive(Debug, Clone)]
pub struct GetRequest {
    /// Which upstream (`--source`, `--endpoint`, `--emulator`, identity flags).
    pub wanted: Wanted,
    /// `--timeout`: the most the fetch may take, retries included.
    pub timeout: Duration,
    /// NAME as given: a host, a URI, a scope or a GUID.
    pub name: String,
    /// The view to print (`Raw`: the token and a newline).
    pub view: View,
}

/// The upstream `get` asked, as its failure names it.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The source's name (`cloudshell`, `imds`, ...).
    pub kind: String,
    /// Where it was asked (`Source::endpoint`: never a secret).
    pub url: String,
    /// Why detection or the flags chose it.
    pub reason: String,
}

/// Why `get` printed no token.
#[derive(Debug)]
pub enum GetError {
    /// NAME is not a resource name.
    Name { given: String, error: NameError },
    /// The daemon core could not start.
    Daemon(DaemonError),
    /// No token could be had for `resource` from `source` (its kind, URL and why it was
    /// chosen).
    Fetch {
        resource: String,
        source: Box<Upstream>,
        error: ReadError,
    },
    /// Standard output refused the token.
    Write(io::Error),
    /// `--identity` names more than one identity: `get` prints one token.
    Identities,
}

impl GetError {
    /// Whether the command line (or the environment it reads) is what is wrong.
    pub fn is_usage(&self) -> bool {
        match self {
            GetError::Name { .. } | GetError::Identities => true,
            GetError::Daemon(e) => e.is_setup(),
            GetError::Fetch { .. } | GetError::Write(_) => false,
        }
    }
}

impl fmt::Display for GetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GetError::Name { given, error } => {
                write!(f, "{given:?} is not a resource name: {error}")
            }
            GetError::Daemon(e) => e.fmt(f),
            GetError::Fetch {
                resource,
                source,
                error,
            } => {
                let Upstream { kind, url, reason } = &**source;
                let (what, why) = match error {
                    ReadError::Unavailable(m) => ("no token from", m),
                    ReadError::Refused(m) => ("refused by", m),
                    ReadError::Denied(m) => ("access denied by", m),
                };
                write!(
                    f,
                    "{resource}: {what} {kind} at {url} (chosen because {reason}): {why}"
                )
            }
            GetError::Write(e) => write!(f, "cannot write the token: {e}"),
            GetError::Identities => {
                f.write_str("get prints one identity's token: give --identity for one NAME only")
            }
        }
    }
}

impl std::error::Error for GetError {}

impl From<DaemonError> for GetError {
    fn from(e: DaemonError) -> GetError {
        GetError::Daemon(e)
    }
}

/// Fetches the token `req` names and prints its view on stdout.
pub fn run(req: GetRequest) -> Result<(), GetError> {
    // The failure is `get`'s one line (`GetError::Fetch`): the cache's warning of the same
    // failure would only repeat it.
    crate::logging::init_stderr("warn,cstokenfs::cache=error");
    let resource = crate::names::resolve_arg(&req.name).map_err(|error| GetError::Name {
        given: req.name.clone(),
        error,
    })?;
    let plan = daemon::plan(&req.wanted)?;
    // `get --identity NAME=...`: that identity's token (one NAME at most).
    let named = match req.wanted.identities.as_slice() {
        [] => None,
        [one] => Some(one.name.clone()),
        _ => return Err(GetError::Identities),
    };
    let policy = Policy {
        timeout: req.timeout,
        ..Policy::default()
    };
    // The stand-in (with --emulator) is held alive until the token is printed.
    let mut plan = plan;
    let _stand_in = crate::stand_in::start(&mut plan)?;
    let daemon = Daemon::build(plan, policy, &[])?;
    let cache = daemon.cache();
    let identity = match &named {
        Some(name) => cache
            .identities()
            .by_name(name)
            .ok_or(GetError::Identities)?,
        None => IdentityId::DEFAULT,
    };
    let v = cache
        .read_blocking(&Key::new(identity, resource.clone()), Use::Look)
        .map(|lease| lease.version)
        .map_err(|error| {
            let source = cache.identities().source(identity);
            GetError::Fetch {
                resource: resource.to_string(),
                source: Box::new(Upstream {
                    kind: source.as_ref().map_or("?".into(), |s| s.kind().to_string()),
                    url: source.as_ref().map_or("?".into(), |s| s.endpoint()),
                    reason: daemon.source_reason().to_string(),
                }),
                error,
            }
        })?;
    let mut out = io::stdout().lock();
    let written = match req.view {
        View::Raw => out.write_all(v.token()).and_then(|()| out.write_all(b"\n")),
        view => out.write_all(v.bytes(view)),
    };
    written.and_then(|()| out.flush()).map_err(GetError::Write)
}
