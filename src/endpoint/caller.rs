//! Who holds the client's socket, for the endpoint's audit line: the uid the kernel names
//! for the connection (sock_diag, the look-up `--serve-imds` decides on,
//! [`crate::httpserver::peer`]) and, best effort, the process holding the socket and its
//! executable. Asked on the server's blocking pool while the request is answered (the
//! client still holds its socket then), and bounded in time. A keep-alive connection's
//! process is found once: the last socket's answer is kept.

use crate::httpserver::peer;
use crate::httpserver::{race, Either, Stop};
use log::debug;
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// What the audit line says of the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// The uid owning the client's socket.
    pub uid: Option<u32>,
    /// A process holding it, and that process's executable.
    pub process: Option<(u32, Arc<str>)>,
}

/// The last socket looked up (its inode) and what was found: requests on one keep-alive
/// connection scan /proc once. Locked only to copy in or out.
#[derive(Default)]
pub struct Last(Mutex<Option<(u32, Caller)>>);

/// Starts the look-up of `peer`'s socket (a connection to `local`) on the blocking pool;
/// `None` for a peer not on loopback (the kernel's answer would be another host's socket
/// or nothing). Await [`finish`] for the answer.
pub fn start(
    peer: Option<SocketAddr>,
    local: SocketAddr,
    last: &Arc<Last>,
) -> Option<tokio::task::JoinHandle<Caller>> {
    let peer = peer.filter(|p| p.ip().is_loopback())?;
    let last = Arc::clone(last);
    Some(tokio::task::spawn_blocking(move || {
        look_up(peer, local, &last)
    }))
}

/// The look-up's answer within `limit`; an empty one when it failed, took longer, or the
/// server is stopping (the task is then cancelled if it has not started).
pub async fn finish(
    task: Option<tokio::task::JoinHandle<Caller>>,
    limit: Duration,
    stop: &Stop,
) -> Caller {
    let Some(mut task) = task else {
        return Caller::default();
    };
    let bounded = tokio::time::timeout(limit, &mut task);
    match race(bounded, stop.stopped()).await {
        Either::Left(Ok(Ok(caller))) => caller,
        _ => {
            task.abort();
            Caller::default()
        }
    }
}

fn look_up(peer: SocketAddr, local: SocketAddr, last: &Last) -> Caller {
    let owner = match peer::owner(peer, local) {
        Ok(Some(owner)) => owner,
        Ok(None) => return Caller::default(),
        Err(e) => {
            debug!("endpoint: who owns {peer}'s socket (sock_diag): {e}");
            return Caller::default();
        }
    };
    if let Some((inode, caller)) = &*last.0.lock() {
        if *inode == owner.inode && caller.uid == Some(owner.uid) {
            return caller.clone();
        }
    }
    let process = peer::holder_of_socket(owner.inode, Some(owner.uid))
        .map(|pid| (pid, crate::audit::exe_of(pid)));
    let caller = Caller {
        uid: Some(owner.uid),
        process,
    };
    *last.0.lock() = Some((owner.inode, caller.clone()));
    caller
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn names_our_uid_pid_and_exe_and_remembers_the_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let _client = TcpStream::connect(local).unwrap();
        let (_server, peer) = listener.accept().unwrap();
        let last = Last::default();
        let got = look_up(peer, local, &last);
        // SAFETY: getuid and getpid cannot fail.
        let (uid, pid) = unsafe { (libc::getuid(), libc::getpid() as u32) };
        assert_eq!(got.uid, Some(uid));
        let (found, exe) = got
            .process
            .clone()
            .expect("our own process holds the socket");
        assert_eq!(found, pid);
        let me = std::env::current_exe().unwrap();
        assert_eq!(&*exe, me.to_string_lossy());
        assert!(last.0.lock().as_ref().is_some_and(|(_, c)| *c == got));
        assert_eq!(look_up(peer, local, &last), got, "the same socket again");
        // A four-tuple nobody holds: nothing known.
        let nobody: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(look_up(nobody, local, &last), Caller::default());
    }
}
