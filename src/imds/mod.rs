//! `--serve-imds`: the mount's tokens in the Azure Instance Metadata Service's protocol,
//! for the tools that speak nothing else (Vault Agent, azcopy, blobfuse, Terraform, many Go
//! programs), answered from the mount's own cache beside `--serve-endpoint`.
//!
//! ```text
//! GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=R[&client_id=..]
//!     Metadata: true
//!   -> 200 {"access_token","client_id","expires_in","expires_on","ext_expires_in",
//!           "not_before","resource","token_type"}           (every number a string)
//!   -> 403 {"error","error_description"}  the socket's uid may not read the token files
//!   -> 400 {"error":"invalid_request",..}  no Metadata: true, proxied, foreign Host, bad
//!      query, an identity this mount does not serve ("Identity not found"); 400
//!      invalid_resource (a resource refused); 500 (no token); 404 / 405 (another path or
//!      method)
//! ```
//!
//! IMDS has no secret. Each request's connection is looked up in the kernel by its
//! four-tuple (`peer`): the uid owning the client's socket may ask if and only if it could
//! open the top-level token files (`authz`); any other gets 403 and nothing else, and an
//! audit line. The server is [`crate::httpserver`] with the token listeners' limits
//! ([`crate::httpserver::token_listener_config`]); a request is a read like an open
//! (`Cache::read`, `Use::Read`).
//!
//! ADDR is a loopback address, or IMDS's own `169.254.169.254:80` when that address is
//! already configured on an interface here ([`check_address`]); nothing is ever sent to it.

mod answer;
pub mod authz;
#[cfg(test)]
mod imds_tests;
pub mod peer;

use crate::access::Access;
use crate::audit::Audit;
use crate::cache::Cache;
pub(crate) use crate::httpserver::tally::{Category, Counters};
use crate::httpserver::{token_listener_config, Server};
use crate::source::Kind;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The only path served.
pub const PATH: &str = "/metadata/identity/oauth2/token";

/// What the IMDS listener is asked to serve.
#[derive(Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// `--timeout`.
    pub timeout: Duration,
    /// Owner and modes of the token files: who may ask.
    pub access: Access,
    pub reach: authz::Reach,
}

/// A running IMDS listener; dropping it shuts the server down.
pub struct Imds {
    server: Server,
    counters: Arc<Counters>,
}

impl fmt::Debug for Imds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Imds")
            .field("addr", &self.server.addr())
            .finish()
    }
}

impl Imds {
    /// Binds `settings.listen` (loopback, or the link-local address [`check_address`]
    /// allowed) and serves tokens from `cache` on a thread of its own.
    pub fn start(settings: Settings, cache: Arc<Cache>, audit: Option<Audit>) -> io::Result<Imds> {
        let counters = Arc::new(Counters::default());
        let listen = settings.listen;
        let handler = answer::ImdsHandler::new(settings, cache, audit, Arc::clone(&counters));
        let server = if listen == crate::net::IMDS_LINK_LOCAL {
            Server::start_imds_link_local(token_listener_config("imds"), handler)?
        } else {
            Server::start(listen, token_listener_config("imds"), handler)?
        };
        Ok(Imds { server, counters })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// `http://ADDR`: the base URL the Azure SDKs take from `AZURE_POD_IDENTITY_AUTHORITY_HOST`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// `MOUNT/.env`'s line for it. Never `IMDS_ENDPOINT`: beside `IDENTITY_ENDPOINT` that
    /// makes the SDKs speak Azure Arc's protocol.
    pub fn env_line(&self) -> String {
        format!("AZURE_POD_IDENTITY_AUTHORITY_HOST={}\n", self.base_url())
    }

    /// `.status`'s `serve_imds`: the address, the URL and the request counters.
    pub fn status_part(&self) -> impl Fn() -> serde_json::Value + Send + Sync + 'static {
        let (addr, counters) = (self.addr(), Arc::clone(&self.counters));
        move || {
            let mut v = counters.json("forbidden");
            v["address"] = addr.to_string().into();
            v["url"] = format!("http://{addr}{PATH}").into();
            v
        }
    }

    /// Closes the listener and every connection; idempotent (also on drop).
    /// The request counters (`--metrics` reads them).
    pub fn counters(&self) -> Arc<Counters> {
        Arc::clone(&self.counters)
    }

    pub fn shutdown(&self) {
        self.server.shutdown();
    }
}

/// `--serve-imds`'s value: `IP:PORT` on loopback (port 0: ephemeral), or exactly
/// `169.254.169.254:80` (checked further at start by [`check_address`]).
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.parse().map_err(|e| {
        format!("not an IP:PORT address (127.0.0.1:PORT, [::1]:PORT or 169.254.169.254:80): {e}")
    })?;
    if addr == crate::net::IMDS_LINK_LOCAL || crate::net::is_loopback(addr.ip()) {
        return Ok(addr);
    }
    Err(format!(
        "{addr} is neither a loopback address (127.0.0.0/8, [::1]) nor IMDS's 169.254.169.254:80"
    ))
}

/// Why `--serve-imds ADDR` cannot be served (a usage error: exit 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressError {
    /// The link-local address with `--source imds`: the daemon would ask itself.
    OwnUpstream,
    /// The link-local address is not configured on any interface here.
    NotConfigured,
    /// Interfaces could not be listed.
    Interfaces(String),
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressError::OwnUpstream => f.write_str(
                "--serve-imds 169.254.169.254:80 with --source imds: the daemon would ask \
                 itself for tokens; serve IMDS on a loopback address, or use another source",
            ),
            AddressError::NotConfigured => f.write_str(
                "--serve-imds 169.254.169.254:80: that address is not configured on any \
                 interface here; add it first (ip addr add 169.254.169.254/32 dev lo, which \
                 needs CAP_NET_ADMIN, e.g. in an init container), or serve on a loopback \
                 address such as 127.0.0.1:PORT",
            ),
            AddressError::Interfaces(e) => write!(
                f,
                "--serve-imds 169.254.169.254:80: cannot list this namespace's addresses: {e}"
            ),
        }
    }
}

impl std::error::Error for AddressError {}

/// Start-time checks of ADDR: the link-local address only with another source than imds,
/// and only when it is already configured here (a local look-up: nothing is sent).
pub fn check_address(addr: SocketAddr, source: Option<Kind>) -> Result<(), AddressError> {
    if addr != crate::net::IMDS_LINK_LOCAL {
        return Ok(());
    }
    if source == Some(Kind::Imds) {
        return Err(AddressError::OwnUpstream);
    }
    match crate::net::is_local_address(addr.ip()) {
        Ok(true) => Ok(()),
        Ok(false) => Err(AddressError::NotConfigured),
        Err(e) => Err(AddressError::Interfaces(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert!(parse_listen("127.0.0.1:0").is_ok());
        assert!(parse_listen("[::1]:8080").is_ok());
        assert!(parse_listen("169.254.169.254:80").is_ok());
        for bad in [
            "169.254.169.254:81",
            "0.0.0.0:80",
            "10.0.0.1:80",
            "localhost:80",
            "",
        ] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
        let ll = crate::net::IMDS_LINK_LOCAL;
        assert_eq!(
            check_address(ll, Some(Kind::Imds)),
            Err(AddressError::OwnUpstream)
        );
        // Not configured on this machine (the tests never configure it).
        assert_eq!(check_address(ll, None), Err(AddressError::NotConfigured));
        assert!(check_address("127.0.0.1:0".parse().unwrap(), Some(Kind::Imds)).is_ok());
        assert!(AddressError::NotConfigured
            .to_string()
            .contains("ip addr add 169.254.169.254/32 dev lo"));
    }
}
