//! The accept loop, one task per connection (hyper's HTTP/1 state machine over a shared
//! socket, or over the TLS stream of `tls::handshake`: one generic `serve` for both),
//! request collection, and the raw-answer writer.

use std::fmt::Write as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::registry::{Registry, Ticket};
use super::{race, Answer, Config, Either, Handler, RawPart, Reply, Request, Stop};

pub(super) struct Shared<H> {
    pub(super) config: Config,
    pub(super) handler: H,
    /// The address the server listens on (the port, when it was 0, chosen).
    pub(super) local: std::net::SocketAddr,
}

/// Accepts as fast as connections come: never waits for a slot. A full server closes the
/// connection [`Registry`] picks, or the new one when every connection has a request in
/// its handler.
pub(super) async fn accept_loop<H: Handler>(listener: TcpListener, sh: Arc<Shared<H>>, stop: Stop) {
    let registry = Registry::new(sh.config.max_connections);
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (stream, peer) = match race(listener.accept(), stop.stopped()).await {
            Either::Left(Ok((stream, peer))) => (stream, peer),
            Either::Left(Err(e)) => {
                // EMFILE and friends: back off a little instead of spinning.
                log::debug!("http: accept failed: {e}");
                if !stop.sleep(Duration::from_millis(50)).await {
                    break;
                }
                continue;
            }
            Either::Right(()) => break,
        };
        let Some(ticket) = registry.admit() else {
            // Per connection, so trace: a flood must not flood the log too.
            log::trace!("http: every connection has a request in progress; closing a new one");
            continue;
        };
        let (sh, stop) = (Arc::clone(&sh), stop.clone());
        conns.spawn(async move {
            let ticket = Arc::new(ticket);
            let serve = serve_conn(stream, peer, &sh, stop, &ticket);
            if let Either::Right(why) =
                race(serve, ticket.closing(sh.config.first_head_timeout)).await
            {
                log::trace!("http: connection from {peer} closed: {why:?}");
            }
        });
        // Let the new connection read its head before the next accept can evict it.
        tokio::task::yield_now().await;
    }
    drop(listener);
    // Every connection task watches `stop` too and ends promptly.
    while conns.join_next().await.is_some() {}
}

/// What the connection task does once hyper has let go.
enum Takeover {
    Close,
    Raw(Vec<RawPart>),
}

/// The error a service returns to make hyper end the connection without writing.
#[derive(Debug)]
struct TakenOver;

impl std::fmt::Display for TakenOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection taken over for a raw answer")
    }
}

impl std::error::Error for TakenOver {}

type Slot = Arc<Mutex<Option<Takeover>>>;

/// One accepted connection: plain, or TLS once its handshake is done (within the stop).
async fn serve_conn<H: Handler>(
    stream: TcpStream,
    peer: std::net::SocketAddr,
    sh: &Arc<Shared<H>>,
    stop: Stop,
    ticket: &Arc<Ticket>,
) {
    let _ = stream.set_nodelay(true);
    match sh.config.tls.clone() {
        None => {
            let stream = Arc::new(stream);
            let io = SharedIo(Arc::clone(&stream));
            serve(io, Some(&stream), peer, sh, stop, ticket).await;
            // Dropping the last reference closes the socket.
        }
        Some(config) => {
            if let Either::Left(Some(tls)) =
                race(super::tls::handshake(stream, config), stop.stopped()).await
            {
                serve(TokioIo::new(tls), None, peer, sh, stop, ticket).await;
            }
        }
    }
}

/// Serves hyper over `io` until the connection ends or the server stops; then writes a raw
/// answer on `raw`, the socket under `io`, if there is one (over TLS there is none: a raw
/// answer closes the connection, as the caller drops `io`).
async fn serve<H: Handler, IO>(
    io: IO,
    raw: Option<&TcpStream>,
    peer: std::net::SocketAddr,
    sh: &Arc<Shared<H>>,
    stop: Stop,
    ticket: &Arc<Ticket>,
) where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let slot: Slot = Arc::new(Mutex::new(None));
    let builder = builder(&sh.config);
    let conn = builder.serve_connection(io, service(sh, peer, &slot, &stop, ticket));
    match race(conn, stop.stopped()).await {
        Either::Left(Ok(())) | Either::Right(()) => return,
        Either::Left(Err(e)) if slot.lock().is_none() => {
            let tls = if raw.is_none() { "TLS " } else { "" };
            log::debug!("http: {tls}connection ended: {e}");
            return;
        }
        Either::Left(Err(_)) => {}
    }
    let taken = slot.lock().take();
    if let (Some(Takeover::Raw(parts)), Some(stream)) = (taken, raw) {
        let written = race(
            write_raw(stream, parts, sh.config.write_stall),
            stop.stopped(),
        )
        .await;
        if let Either::Left(Err(e)) = written {
            log::debug!("http: raw answer cut short: {e}");
        }
    }
}

/// hyper's HTTP/1 connection settings from the server's `Config` (plain and TLS alike).
fn builder(config: &Config) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .title_case_headers(true)
        .max_buf_size(config.max_head.max(8192));
    builder
}

/// The service of one connection: every request goes to `respond`.
fn service<H: Handler>(
    sh: &Arc<Shared<H>>,
    peer: std::net::SocketAddr,
    slot: &Slot,
    stop: &Stop,
    ticket: &Arc<Ticket>,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = Response<Full<Bytes>>,
    Error = TakenOver,
    Future: Send,
> {
    let (sh, slot, stop) = (Arc::clone(sh), Arc::clone(slot), stop.clone());
    let ticket = Arc::clone(ticket);
    hyper::service::service_fn(move |req| {
        ticket.head_in();
        let (sh, slot, stop) = (Arc::clone(&sh), Arc::clone(&slot), stop.clone());
        let ticket = Arc::clone(&ticket);
        async move { respond(&sh, req, peer, &slot, stop, &ticket).await }
    })
}

async fn respond<H: Handler>(
    sh: &Shared<H>,
    req: hyper::Request<Incoming>,
    peer: std::net::SocketAddr,
    slot: &Slot,
    stop: Stop,
    ticket: &Ticket,
) -> Result<Response<Full<Bytes>>, TakenOver> {
    let (parts, body) = req.into_parts();
    let limited = Limited::new(body, sh.config.max_body).collect();
    let body = match race(limited, tokio::time::sleep(sh.config.body_timeout)).await {
        Either::Left(Ok(collected)) => collected.to_bytes(),
        Either::Left(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return reply(sh.handler.refuse(413, "Request body too large"), slot)
        }
        Either::Left(Err(_)) => return take_over(slot, Takeover::Close),
        Either::Right(()) => return reply(sh.handler.refuse(408, "Request body too slow"), slot),
    };
    let request = Request {
        method: parts.method.as_str().to_owned(),
        target: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.to_string(), |pq| pq.as_str().to_owned()),
        authority: parts.uri.authority().map(|a| match parts.uri.scheme_str() {
            Some(scheme) => format!("{scheme}://{a}"),
            None => a.to_string(),
        }),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                let value = String::from_utf8_lossy(v.as_bytes()).into_owned();
                (k.as_str().to_owned(), value)
            })
            .collect(),
        body: body.to_vec(),
        peer: Some(peer),
        local: sh.local,
    };
    ticket.handling();
    let answer = sh.handler.handle(request, stop).await;
    ticket.answered();
    match answer {
        Answer::Reply(r) => reply(r, slot),
        Answer::Raw(parts) => take_over(slot, Takeover::Raw(parts)),
        Answer::Close => take_over(slot, Takeover::Close),
    }
}

fn take_over<T>(slot: &Slot, what: Takeover) -> Result<T, TakenOver> {
    *slot.lock() = Some(what);
    Err(TakenOver)
}

/// `r` through hyper, or raw when hyper cannot express its status.
fn reply(r: Reply, slot: &Slot) -> Result<Response<Full<Bytes>>, TakenOver> {
    let Ok(status) = StatusCode::from_u16(r.status) else {
        return take_over(slot, Takeover::Raw(vec![RawPart::Bytes(raw_reply(&r))]));
    };
    let mut resp = Response::new(Full::new(Bytes::from(r.body)));
    *resp.status_mut() = status;
    for (name, value) in &r.headers {
        let clean: String = value.chars().filter(|c| !c.is_control()).collect();
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&clean),
        ) {
            (Ok(n), Ok(v)) => {
                resp.headers_mut().append(n, v);
            }
            _ => log::debug!("http: dropping invalid header {name:?}"),
        }
    }
    Ok(resp)
}

/// A reply as bytes, for statuses hyper refuses.
fn raw_reply(r: &Reply) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {} Unknown\r\n", r.status);
    for (name, value) in &r.headers {
        let v: String = value.chars().filter(|c| !c.is_control()).collect();
        let _ = write!(head, "{name}: {v}\r\n");
    }
    let _ = write!(
        head,
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        r.body.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(&r.body);
    out
}

async fn write_raw(stream: &TcpStream, parts: Vec<RawPart>, stall: Duration) -> io::Result<()> {
    for part in parts {
        match part {
            RawPart::Bytes(data) => write_all(stream, &data, stall).await?,
            RawPart::Repeat { chunk, times } => {
                let mut done = 0u64;
                while times.is_none_or(|t| done < t) {
                    write_all(stream, &chunk, stall).await?;
                    done += 1;
                }
            }
            RawPart::Trickle {
                bytes_per_sec: 0, ..
            } => std::future::pending().await,
            RawPart::Trickle {
                data,
                bytes_per_sec,
            } => {
                let piece = usize::try_from(bytes_per_sec / 10).unwrap_or(1).max(1);
                let pause = Duration::from_secs_f64(piece as f64 / f64::from(bytes_per_sec));
                for bytes in data.chunks(piece) {
                    write_all(stream, bytes, stall).await?;
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
    Ok(())
}

async fn write_all(stream: &TcpStream, mut data: &[u8], stall: Duration) -> io::Result<()> {
    while !data.is_empty() {
        tokio::time::timeout(stall, stream.writable())
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        match stream.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// hyper's IO over a socket the connection task also holds (for raw answers).
struct SharedIo(Arc<TcpStream>);

impl hyper::rt::Read for SharedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let mut chunk = [0u8; 8192];
        let want = buf.remaining().min(chunk.len());
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read(&mut chunk[..want]) {
                Ok(n) => {
                    buf.put_slice(&chunk[..n]);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl hyper::rt::Write for SharedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// The socket is closed when the connection task drops it (after any raw answer).
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
