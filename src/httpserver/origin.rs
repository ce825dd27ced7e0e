//! Where a request comes from, as the loopback token servers (`--serve-endpoint`,
//! `--serve-imds`) check it before anything else: no proxy headers, a target in origin
//! form, and one `Host` naming the server. A process that can only make another local
//! program send requests (SSRF through a proxy or a web page) fails one of these.

use super::Request;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Headers a proxy adds: a request carrying any of them is refused.
pub const PROXY_HEADERS: [&str; 4] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-real-ip",
];

/// Why a request's origin is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A header of [`PROXY_HEADERS`].
    Forwarded,
    /// The target is not a path (`GET http://host/path`, `CONNECT host:port`).
    Target,
    /// The `Host` header is missing, repeated or names another host.
    Host,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Host => "one Host header, naming this endpoint's address, localhost, 127.0.0.1 or [::1], is required",
            Refusal::Forwarded => "requests through a proxy (Forwarded, X-Forwarded-For, X-Forwarded-Host, X-Real-IP) are refused",
            Refusal::Target => "the request target must be a path (/msi/token?..), not a URL",
        })
    }
}

/// Proxy headers first, then the target's form, then `Host` (see [`host_allowed`]).
pub fn check(req: &Request) -> Result<(), Refusal> {
    if PROXY_HEADERS.iter().any(|h| req.header(h).is_some()) {
        return Err(Refusal::Forwarded);
    }
    if req.authority.is_some() {
        return Err(Refusal::Target);
    }
    let mut hosts = req.all("host");
    let host = hosts.next();
    if hosts.next().is_some() || !host_allowed(host, req.local) {
        return Err(Refusal::Host);
    }
    Ok(())
}

/// Whether `host` (the `Host` header) names this server: the listen address's IP,
/// `localhost`, `127.0.0.1` or `[::1]`, with no port or the listen port.
pub fn host_allowed(host: Option<&str>, listen: SocketAddr) -> bool {
    let Some(host) = host.map(str::trim) else {
        return false;
    };
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return false;
        };
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(p) => Some(p),
                None => return false,
            },
        };
        (format!("[{inside}]"), port)
    } else {
        match host.split_once(':') {
            Some((n, p)) => (n.to_string(), Some(p)),
            None => (host.to_string(), None),
        }
    };
    if let Some(p) = port {
        if p.parse::<u16>().ok() != Some(listen.port()) {
            return false;
        }
    }
    let name = name.to_ascii_lowercase();
    let own = match listen.ip() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    name == "localhost" || name == "127.0.0.1" || name == "[::1]" || name == own
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let v4: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let v6: SocketAddr = "[::1]:4000".parse().unwrap();
        let other: SocketAddr = "127.0.0.2:4000".parse().unwrap();
        for h in [
            "127.0.0.1:4000",
            "localhost",
            "LocalHost:4000",
            "[::1]:4000",
            "[::1]",
        ] {
            assert!(host_allowed(Some(h), v4), "{h}");
            assert!(host_allowed(Some(h), v6), "{h}");
        }
        assert!(host_allowed(Some("127.0.0.2:4000"), other));
        for h in [
            "evil.example.com",
            "evil.example.com:4000",
            "127.0.0.1:4001",
            "localhost:x",
            "[::1]x",
            "127.0.0.2:4000",
            "",
            "localhost.evil.com",
        ] {
            assert!(!host_allowed(Some(h), v4), "{h}");
        }
        assert!(!host_allowed(None, v4));
    }
}
