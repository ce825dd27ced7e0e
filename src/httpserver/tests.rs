use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::*;

struct Echo;

/// Requests to `/hang` that reached the handler (a test waits on it, not on a sleep).
static HUNG: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Handler for Echo {
    async fn handle(&self, req: Request, stop: Stop) -> Answer {
        if req.target == "/hang" {
            HUNG.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            stop.stopped().await;
            return Answer::Close;
        }
        if req.target == "/peer" {
            let peer = req.peer.map_or_else(String::new, |p| p.to_string());
            return Answer::Reply(Reply {
                status: 200,
                headers: vec![("X-Peer".into(), peer)],
                body: Vec::new(),
            });
        }
        Answer::Reply(Reply {
            status: 200,
            headers: vec![("X-Seen".into(), req.target.clone())],
            body: req.body,
        })
    }
}

fn get(addr: SocketAddr, target: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let req = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn refuses_non_loopback() {
    for addr in ["0.0.0.0:0", "[::]:0", "192.0.2.1:0"] {
        let err = Server::start(addr.parse().unwrap(), Config::default(), Echo).err();
        let err = err.expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{addr}");
        assert!(err.to_string().contains("only loopback"), "{err}");
    }
    assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
    assert!(is_loopback("127.1.2.3".parse().unwrap()));
}

#[test]
fn connection_limit_makes_new_ones_wait() {
    let config = Config {
        max_connections: 2,
        ..Config::default()
    };
    let server = Server::start("127.0.0.1:0".parse().unwrap(), config, Echo).unwrap();
    let addr = server.addr();
    let idle: Vec<_> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let waiting = std::thread::spawn(move || get(addr, "/third"));
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiting.is_finished(), "the third connection was served");
    drop(idle);
    assert!(waiting.join().unwrap().contains("X-Seen: /third"));
}

#[test]
fn header_read_timeout_closes_idle_and_slow_heads() {
    let config = Config {
        header_read_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let server = Server::start("127.0.0.1:0".parse().unwrap(), config, Echo).unwrap();
    let started = Instant::now();
    let mut idle = TcpStream::connect(server.addr()).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(idle.read(&mut [0u8; 64]).unwrap_or(0), 0);
    // A head trickled a byte at a time does not restart the limit.
    let mut slow = TcpStream::connect(server.addr()).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for b in b"GET / HTTP/1.1\r\n" {
        if slow.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(40));
    }
    let mut out = Vec::new();
    let _ = slow.read_to_end(&mut out);
    assert!(!String::from_utf8_lossy(&out).contains("200 OK"));
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[test]
fn shutdown_releases_hung_requests_and_closes_the_port() {
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Config::default(), Echo).unwrap();
    let addr = server.addr();
    assert!(get(addr, "/x").contains("HTTP/1.1 200 OK"));
    let before = HUNG.load(std::sync::atomic::Ordering::SeqCst);
    let hung = std::thread::spawn(move || get(addr, "/hang"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while HUNG.load(std::sync::atomic::Ordering::SeqCst) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the hung request reached the handler"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    server.shutdown();
    assert_eq!(hung.join().unwrap(), "");
    assert!(TcpStream::connect(addr).is_err());
}

#[test]
fn requests_know_the_clients_address() {
    let server = Server::start("127.0.0.1:0".parse().unwrap(), Config::default(), Echo).unwrap();
    let mut s = TcpStream::connect(server.addr()).unwrap();
    let local = s.local_addr().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.contains(&format!("X-Peer: {local}")), "{out}");
}
