//! The loopback rules shared by the HTTP server (`httpserver`, which binds only loopback
//! addresses) and the upstream clients (`source`, which allow `http://` only to a loopback
//! host).

use std::io;
use std::net::{IpAddr, SocketAddr};

/// Whether `ip` is a loopback address (127.0.0.0/8, ::1, or ::ffff:127.x.y.z).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
    }
}

/// `InvalidInput` unless `addr` is loopback.
pub fn check_loopback(addr: SocketAddr) -> io::Result<()> {
    if is_loopback(addr.ip()) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "only loopback addresses are allowed (127.0.0.0/8, ::1), not {}",
                addr.ip()
            ),
        ))
    }
}
