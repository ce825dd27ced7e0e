//! Who is on the other end of a loopback connection, for the token listeners (`--serve-imds`
//! decides on it, `--serve-endpoint` audits it): the uid that owns the connecting TCP
//! socket, asked of the kernel (sock_diag's inet_diag, one exact look-up by the
//! connection's four-tuple, answered within the request; nothing is parsed from /proc
//! tables), and, best effort, the process holding that socket (a scan of /proc/PID/fd).
//! Both block briefly, so callers run them off the server's thread.

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::Socket;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

/// The socket that connected to us, as the kernel knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Its owner (in the daemon's user namespace).
    pub uid: u32,
    /// Its inode (`socket:[N]` in a holder's /proc/PID/fd), for the audit.
    pub inode: u32,
}

/// The client socket of the TCP connection from `peer` to `local`; `None` when the kernel
/// knows no such socket here (a peer in another network namespace, or gone already).
pub fn owner(peer: SocketAddr, local: SocketAddr) -> io::Result<Option<Owner>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    set_receive_timeout(&socket)?;
    let (family, mut id) = match peer {
        SocketAddr::V4(_) => (AF_INET, SocketId::new_v4()),
        SocketAddr::V6(_) => (AF_INET6, SocketId::new_v6()),
    };
    // The client's socket: its source is the peer, its destination us.
    id.source_address = peer.ip();
    id.source_port = peer.port();
    id.destination_address = local.ip();
    id.destination_port = local.port();
    // All ones: no cookie to match.
    id.cookie = [0xff; 8];
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: id,
        })
        .into(),
    );
    packet.finalize();
    let mut out = vec![0; packet.buffer_len()];
    packet.serialize(&mut out[..]);
    socket.send(&out, 0)?;
    let mut buf = vec![0u8; 8192];
    let n = socket.recv(&mut &mut buf[..], 0)?;
    let reply = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[..n.min(buf.len())])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {e}")))?;
    match reply.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => Ok(Some(Owner {
            uid: r.header.uid,
            inode: r.header.inode,
        })),
        NetlinkPayload::Error(e) => match e.code.map(|c| c.get().unsigned_abs() as i32) {
            Some(libc::ENOENT) => Ok(None),
            Some(code) => Err(io::Error::from_raw_os_error(code)),
            None => Ok(None),
        },
        _ => Ok(None),
    }
}

/// The kernel answers within `send`; a bound keeps a surprise from holding a thread.
fn set_receive_timeout(socket: &Socket) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: a valid fd and a timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A process holding socket `inode` (`socket:[inode]` among its /proc/PID/fd), looking
/// only at processes of `uid` (and root's) when it is known (best effort: the holder may have
/// closed the socket, be in another pid namespace, or hide its fds).
pub fn holder_of_socket(inode: u32, uid: Option<u32>) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    if inode == 0 {
        return None;
    }
    let want = format!("socket:[{inode}]");
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    // Newest first: a client that just connected is likely among the latest processes.
    pids.sort_unstable_by(|a, b| b.cmp(a));
    pids.into_iter().find(|pid| {
        let dir = std::path::PathBuf::from(format!("/proc/{pid}"));
        // /proc/PID belongs to the process's uid, or to root when it is not dumpable.
        if uid
            .is_some_and(|u| std::fs::metadata(&dir).map_or(true, |m| m.uid() != u && m.uid() != 0))
        {
            return false;
        }
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
            return false;
        };
        fds.flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == want.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn the_kernel_names_our_own_uid_for_our_own_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, peer) = listener.accept().unwrap();
        let got = owner(peer, listener.local_addr().unwrap())
            .unwrap()
            .unwrap();
        // SAFETY: getuid cannot fail.
        assert_eq!(got.uid, unsafe { libc::getuid() });
        assert!(got.inode > 0);
        // SAFETY: getpid and getuid cannot fail.
        let (pid, uid) = unsafe { (libc::getpid() as u32, libc::getuid()) };
        assert_eq!(holder_of_socket(got.inode, Some(uid)), Some(pid));
        assert_eq!(holder_of_socket(got.inode, None), Some(pid));
        if uid != 0 {
            // Root's processes are looked at for any uid (non-dumpable ones are root's).
            assert_eq!(holder_of_socket(got.inode, Some(uid + 1)), None);
        }
        assert_eq!(holder_of_socket(0, None), None);
        drop(client);
        // A four-tuple nobody holds.
        let none: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(owner(none, listener.local_addr().unwrap()).unwrap(), None);
    }

    #[test]
    fn ipv6_loopback_too() {
        let Ok(listener) = TcpListener::bind("[::1]:0") else {
            return; // no IPv6 here
        };
        let _client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, peer) = listener.accept().unwrap();
        let got = owner(peer, listener.local_addr().unwrap()).unwrap();
        // SAFETY: getuid cannot fail.
        assert_eq!(got.map(|o| o.uid), Some(unsafe { libc::getuid() }));
    }
}
