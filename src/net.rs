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

/// The address IMDS answers on, link-local: `--serve-imds` may take it (port 80) only when it
/// is already configured on an interface here. Nothing is ever sent to it.
pub const IMDS_LINK_LOCAL: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 169, 254)), 80);

/// Whether `ip` is configured on an interface of this network namespace (getifaddrs: a local
/// look-up, nothing is sent).
pub fn is_local_address(ip: IpAddr) -> io::Result<bool> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = false;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        // SAFETY: a non-null ifa_addr points to a sockaddr of the family it names, at least
        // as large as sockaddr_in / sockaddr_in6 for those families.
        if let Some(addr) = unsafe { ifa.ifa_addr.as_ref() } {
            let here = match i32::from(addr.sa_family) {
                libc::AF_INET => {
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    Some(IpAddr::from(
                        u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                    ))
                }
                libc::AF_INET6 => {
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                }
                _ => None,
            };
            found |= here == Some(ip);
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_configured_and_a_documentation_address_is_not() {
        assert!(is_local_address("127.0.0.1".parse().unwrap()).unwrap());
        assert!(!is_local_address("192.0.2.77".parse().unwrap()).unwrap());
        assert!(!is_loopback(IMDS_LINK_LOCAL.ip()));
    }
}
