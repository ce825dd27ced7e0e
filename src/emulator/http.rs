//! The HTTP/1.1 side of the emulator: the accept loop, one thread per connection,
//! request parsing, response writing, and the stop / hang plumbing (every blocking read or
//! write polls `Shared::is_stopped`).

use std::fmt::Write as _;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::protocol::{handle, proto_err};
use super::Shared;

const POLL: Duration = Duration::from_millis(20);
const IDLE_LIMIT: Duration = Duration::from_secs(120);
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024;

pub(super) fn accept_loop(listener: TcpListener, sh: Arc<Shared>) {
    while !sh.is_stopped() {
        match listener.accept() {
            Ok((stream, _)) => {
                let conn_sh = Arc::clone(&sh);
                match thread::Builder::new().spawn(move || serve_conn(stream, &conn_sh)) {
                    Ok(handle) => {
                        let mut conns = sh.conns.lock();
                        conns.retain(|h| !h.is_finished());
                        conns.push(handle);
                    }
                    Err(e) => log::warn!("emulator: cannot spawn connection thread: {e}"),
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                sh.wait_stopped(Some(Duration::from_millis(5)));
            }
            Err(e) => {
                log::debug!("emulator: accept failed: {e}");
                sh.wait_stopped(Some(POLL));
            }
        }
    }
    // The listener is dropped (the port closed) when this returns.
}

/// One parsed request (the body already read in full).
pub(super) struct Request {
    pub(super) method: String,
    pub(super) path: String,
    headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
    keep_alive: bool,
}

impl Request {
    /// First header of that name (case-insensitive).
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the connection does with a routed request.
pub(super) enum Action {
    Respond {
        status: u16,
        body: Vec<u8>,
        headers: Vec<(&'static str, String)>,
    },
    Huge(usize),
    Hang,
    Close,
}

fn serve_conn(mut stream: TcpStream, sh: &Shared) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(POLL)));
    if setup
        .and_then(|()| stream.set_write_timeout(Some(POLL)))
        .is_err()
    {
        return;
    }
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let req = match read_request(&mut stream, &mut buf, sh) {
            Ok(Some(req)) => req,
            Ok(None) => break,
            Err((status, msg)) => {
                let body = match proto_err(sh.protocol, status, "BadRequest", msg) {
                    Action::Respond { body, .. } => body,
                    _ => Vec::new(),
                };
                let _ = respond(&mut stream, sh, status, &body, &[], true);
                break;
            }
        };
        let close = !req.keep_alive;
        let sent = match handle(sh, &req) {
            Action::Respond {
                status,
                body,
                headers,
            } => respond(&mut stream, sh, status, &body, &headers, close),
            Action::Huge(bytes) => send_huge(&mut stream, sh, bytes, close),
            Action::Hang => {
                sh.wait_stopped(None);
                Err(ErrorKind::Interrupted.into())
            }
            Action::Close => Err(ErrorKind::ConnectionAborted.into()),
        };
        if sent.is_err() || close {
            break;
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// Reads more bytes into `buf`; false on EOF, error, stop or idle timeout.
fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, sh: &Shared) -> bool {
    let mut chunk = [0u8; 8192];
    let start = Instant::now();
    while !sh.is_stopped() && start.elapsed() < IDLE_LIMIT {
        match stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return true;
            }
            Err(e) if retryable(&e) => {}
            Err(_) => return false,
        }
    }
    false
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// Reads one request; `Ok(None)` when the connection is done, `Err` for a malformed one.
fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    sh: &Shared,
) -> Result<Option<Request>, (u16, &'static str)> {
    let head_len = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err((431, "Request header too large"));
        }
        if !fill(stream, buf, sh) {
            return Ok(None);
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err((400, "Malformed request line"));
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err((400, "Unsupported HTTP version"));
    }
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err((400, "Malformed header"));
        };
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let mut req = Request {
        method: method.into(),
        path: path.into(),
        headers,
        body: Vec::new(),
        keep_alive: false,
    };
    if req.header("Transfer-Encoding").is_some() {
        return Err((411, "Content-Length required"));
    }
    let len = match req.header("Content-Length").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(n)) if n <= MAX_BODY => n,
        Some(Ok(_)) => return Err((413, "Request body too large")),
        Some(Err(_)) => return Err((400, "Malformed Content-Length")),
    };
    let conn = req
        .header("Connection")
        .unwrap_or_default()
        .to_ascii_lowercase();
    req.keep_alive = version == "HTTP/1.1" && !conn.contains("close");
    let expect = req
        .header("Expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expect
        && buf.len() < head_len + len
        && send(stream, b"HTTP/1.1 100 Continue\r\n\r\n", sh).is_err()
    {
        return Ok(None);
    }
    while buf.len() < head_len + len {
        if !fill(stream, buf, sh) {
            return Ok(None);
        }
    }
    req.body = buf[head_len..head_len + len].to_vec();
    buf.drain(..head_len + len);
    Ok(Some(req))
}

fn head(status: u16, len: usize, headers: &[(&str, String)], close: bool) -> String {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    };
    let mut h = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n"
    );
    for (name, value) in headers {
        let v: String = value.chars().filter(|c| !c.is_control()).collect();
        let _ = write!(h, "{name}: {v}\r\n");
    }
    h.push_str(if close {
        "Connection: close\r\n\r\n"
    } else {
        "\r\n"
    });
    h
}

fn respond(
    stream: &mut TcpStream,
    sh: &Shared,
    status: u16,
    body: &[u8],
    headers: &[(&str, String)],
    close: bool,
) -> io::Result<()> {
    let mut out = head(status, body.len(), headers, close).into_bytes();
    out.extend_from_slice(body);
    send(stream, &out, sh)
}

/// Streams `bytes` bytes (spaces then `{}`) without allocating them.
fn send_huge(stream: &mut TcpStream, sh: &Shared, bytes: usize, close: bool) -> io::Result<()> {
    send(stream, head(200, bytes, &[], close).as_bytes(), sh)?;
    let tail = &b"{}"[..bytes.min(2)];
    let spaces = [b' '; 16 * 1024];
    let mut left = bytes - tail.len();
    while left > 0 {
        let n = left.min(spaces.len());
        send(stream, &spaces[..n], sh)?;
        left -= n;
    }
    send(stream, tail, sh)
}

/// `write_all` that keeps retrying on write timeouts until the emulator stops.
fn send(stream: &mut TcpStream, mut data: &[u8], sh: &Shared) -> io::Result<()> {
    while !data.is_empty() {
        match stream.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if retryable(&e) && !sh.is_stopped() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
