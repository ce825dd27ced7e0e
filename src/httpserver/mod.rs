//! A small loopback-only HTTP/1.1 server on hyper 1.x, shared by the emulators (and meant
//! for later loopback endpoints): bind, an accept loop with a connection limit, per-request
//! idle limits, graceful shutdown, and a [`Handler`] that turns a parsed [`Request`] into an
//! [`Answer`].
//!
//! ```text
//! let server = Server::start(addr, Config::default(), handler)?;  // refuses non-loopback
//! server.addr();                                                  // the bound address
//! server.shutdown();                                              // listener closed, joined
//! ```
//!
//! Threads: one per server, running a current-thread tokio runtime that owns the listener
//! and every connection (no thread per connection, no polling). Accepting never waits: at
//! most [`Config::max_connections`] connections are open at once, and a new one beyond
//! that closes the oldest that has not completed a request (then the one idle the longest;
//! one with a request in its handler never: see `registry`), so silent clients cannot keep
//! others in the kernel's backlog. A new connection must deliver its first complete request
//! head within [`Config::first_head_timeout`]; every later head within
//! [`Config::header_read_timeout`], counted from the moment the server waits for it (so it
//! bounds keep-alive idleness and does not restart on every byte); a body within
//! [`Config::body_timeout`].
//!
//! Raw answers: hyper only writes well-formed HTTP, so [`Answer::Raw`] and
//! [`Answer::Close`] take the socket over. The connection's socket is shared (an
//! `Arc<TcpStream>`) between hyper and the connection task; for a takeover the service
//! stores what to do in a per-connection slot and fails the request, which makes hyper end
//! the connection without writing anything. The task then writes the raw bytes on the
//! socket it still holds, and closes it. This works on any request of a keep-alive
//! connection, unlike peeking at the first request before hyper sees it.
//!
//! Locks (each held for a few field reads or writes, never across an `.await`, never
//! while calling the handler, and never two at once, so no order between them):
//! - `Server::thread` (the serving thread's handle): taken by `shutdown` to join it once.
//! - `Registry::inner` (`registry.rs`: the open connections, in accept order, and what
//!   each is doing): taken on accept, at each request's start and end, and on close.
//! - each connection's takeover `Slot` (`conn.rs`): the service stores a raw answer in it,
//!   the connection task takes it out after hyper has let go of the request.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

mod conn;
#[cfg(test)]
mod flood;
pub mod origin;
pub mod peer;
pub mod query;
mod registry;
#[cfg(test)]
mod server_tests;
pub mod tally;
pub mod tls;

/// The listen backlog asked for.
const LISTEN_BACKLOG: u32 = 4096;
/// Threads for a handler's blocking calls (`tokio::task::spawn_blocking`), at most.
const MAX_BLOCKING_THREADS: usize = 4;
/// Their stack size (NSS look-ups run on them).
const BLOCKING_STACK: usize = 512 * 1024;

/// Limits of one server.
#[derive(Debug, Clone)]
pub struct Config {
    /// Connections open at once; a new one beyond them closes one (see the module's doc).
    pub max_connections: usize,
    /// The most a new connection may take to send its first complete request head (a TLS
    /// handshake included); then it is closed.
    pub first_head_timeout: Duration,
    /// The most a later request head may take, counted from when the server starts waiting
    /// for it (so also how long a keep-alive connection may idle); then it is closed.
    pub header_read_timeout: Duration,
    /// The most a request body may take once its head is in; then 408.
    pub body_timeout: Duration,
    /// Largest request head (hyper answers 431 beyond it); at least 8 KiB.
    pub max_head: usize,
    /// Largest request body; 413 beyond it.
    pub max_body: usize,
    /// A raw answer whose socket accepts no byte for this long is abandoned.
    pub write_stall: Duration,
    /// Name of the server thread.
    pub thread_name: String,
    /// Serve HTTPS with this configuration (see [`tls::server_config`]); raw answers
    /// ([`Answer::Raw`]) then close the connection instead.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_connections: 512,
            first_head_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            max_head: 16 * 1024,
            max_body: 64 * 1024,
            write_stall: Duration::from_secs(60),
            thread_name: "cstokenfs-http".into(),
            tls: None,
        }
    }
}

/// Connections open at once on a token listener (`--serve-endpoint`, `--serve-imds`); a
/// new one beyond them closes the oldest that has not completed a request (else the one
/// idle the longest), never one with a request in progress.
const TOKEN_MAX_CONNECTIONS: usize = 256;
/// The most a new connection to a token listener may take to send its first request head.
const TOKEN_FIRST_HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a keep-alive connection to a token listener may idle, and the most a later
/// request head may take.
const TOKEN_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head a token listener reads.
const TOKEN_MAX_HEAD: usize = 8 * 1024;

/// The limits of a loopback token listener (`--serve-endpoint`, `--serve-imds`): the
/// constants above, small bodies, and `thread_name`.
pub fn token_listener_config(thread_name: &str) -> Config {
    Config {
        max_connections: TOKEN_MAX_CONNECTIONS,
        first_head_timeout: TOKEN_FIRST_HEAD_TIMEOUT,
        header_read_timeout: TOKEN_IDLE_TIMEOUT,
        body_timeout: Duration::from_secs(5),
        max_head: TOKEN_MAX_HEAD,
        max_body: 1024,
        write_stall: Duration::from_secs(10),
        thread_name: thread_name.into(),
        tls: None,
    }
}

/// One request, its body read in full. Its `Debug` shows header names and the body's
/// length only: a header may carry a secret (`X-IDENTITY-HEADER`), a body a credential.
#[derive(Clone)]
pub struct Request {
    pub method: String,
    /// The request target's path and query (`/oauth2/token?x=1`).
    pub target: String,
    /// The scheme and authority of a target not in origin form (`http://host` of
    /// `GET http://host/path`; `host:443` of `CONNECT host:443`), which `target` leaves out.
    pub authority: Option<String>,
    /// Header names in lower case, values with undecodable bytes replaced.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The client's address (`None` if the socket could not tell).
    pub peer: Option<SocketAddr>,
    /// The address the server listens on (what a `Host` header should name).
    pub local: SocketAddr,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("path", &self.target.split('?').next().unwrap_or_default())
            .field("headers", &names)
            .field("body_len", &self.body.len())
            .field("peer", &self.peer)
            .field("local", &self.local)
            .finish()
    }
}

impl Request {
    /// First header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.all(name).next()
    }

    /// Every header of that name (case-insensitive), in order.
    pub fn all<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        self.headers
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A well-formed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Any status; one outside 100..=999 is written raw (`HTTP/1.1 <code> Unknown`).
    pub status: u16,
    /// Extra headers (Content-Length is added); invalid ones are dropped.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// One piece of a raw answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawPart {
    /// These bytes.
    Bytes(Vec<u8>),
    /// `chunk` that many times; `None`: until the client goes or the server stops.
    Repeat { chunk: Vec<u8>, times: Option<u64> },
    /// `data` at about `bytes_per_sec` (in pieces of a tenth of it, at least one byte);
    /// 0: nothing more is ever written (the connection stays until stop or client close).
    Trickle { data: Vec<u8>, bytes_per_sec: u32 },
}

/// What a request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Reply(Reply),
    /// These bytes as they are, then the connection is closed.
    Raw(Vec<RawPart>),
    /// The connection is closed without any answer.
    Close,
}

/// Turns requests into answers; runs on the server's runtime, so it must not block for
/// long (await [`Stop::sleep`] instead of sleeping).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request, stop: Stop) -> impl Future<Output = Answer> + Send;

    /// The answer to a request refused before it reached [`Handler::handle`]
    /// (413: body too large, 408: body too slow).
    fn refuse(&self, status: u16, message: &str) -> Reply {
        Reply {
            status,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            body: message.as_bytes().to_vec(),
        }
    }
}

/// Whether the server is stopping; cheap to clone.
#[derive(Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    pub fn is_stopped(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes once the server is stopping.
    pub async fn stopped(&self) {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Sleeps `d`; false if the server started stopping first.
    pub async fn sleep(&self, d: Duration) -> bool {
        if d.is_zero() {
            return !self.is_stopped();
        }
        matches!(
            race(tokio::time::sleep(d), self.stopped()).await,
            Either::Left(())
        )
    }
}

/// A running server; dropping it shuts it down.
pub struct Server {
    /// The bound address (port 0 resolved).
    addr: SocketAddr,
    /// Whether it serves HTTPS (its URL's scheme).
    tls: bool,
    /// Set to `true` to stop: the accept loop and every connection watch it.
    stop: watch::Sender<bool>,
    /// The serving thread, joined once by `shutdown` (then `None`).
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Server {
    /// Binds `listen` (loopback only; port 0 = ephemeral) and serves `handler` on a
    /// background thread.
    pub fn start<H: Handler>(listen: SocketAddr, config: Config, handler: H) -> io::Result<Server> {
        crate::net::check_loopback(listen)?;
        Server::bind(listen, config, handler)
    }

    /// Binds `listen`, any address: for `--metrics` alone, whose answers hold no secret
    /// (a scraper in another pod must reach it). Token listeners use [`Server::start`].
    pub fn start_anywhere<H: Handler>(
        listen: SocketAddr,
        config: Config,
        handler: H,
    ) -> io::Result<Server> {
        Server::bind(listen, config, handler)
    }

    /// Binds IMDS's link-local address ([`crate::net::IMDS_LINK_LOCAL`], for
    /// `--serve-imds`), which the caller found configured on an interface here; no other
    /// non-loopback address can be bound.
    pub fn start_imds_link_local<H: Handler>(config: Config, handler: H) -> io::Result<Server> {
        Server::bind(crate::net::IMDS_LINK_LOCAL, config, handler)
    }

    fn bind<H: Handler>(listen: SocketAddr, config: Config, handler: H) -> io::Result<Server> {
        // A handler's blocking calls (`--serve-imds`'s look-ups) share a few small threads
        // and queue beyond them, so a flood of requests cannot start a thread each.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(MAX_BLOCKING_THREADS)
            .thread_stack_size(BLOCKING_STACK)
            .thread_name(format!("{}-blocking", config.thread_name))
            .build()?;
        let listener = {
            let _context = runtime.enter();
            let socket = match listen {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.set_reuseaddr(true)?;
            socket.bind(listen)?;
            // Deep enough for a flood of connects to queue rather than drop a client's SYN
            // (the kernel caps it at net.core.somaxconn); the accept loop drains it fast.
            socket.listen(LISTEN_BACKLOG)?
        };
        let addr = listener.local_addr()?;
        let (tx, rx) = watch::channel(false);
        let stop = Stop(rx);
        let name = config.thread_name.clone();
        let tls = config.tls.is_some();
        let shared = Arc::new(conn::Shared {
            config,
            handler,
            local: addr,
        });
        let thread = thread::Builder::new()
            .name(name)
            .spawn(move || runtime.block_on(conn::accept_loop(listener, shared, stop)))?;
        Ok(Server {
            addr,
            tls,
            stop: tx,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether it serves HTTPS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Idempotent: closes the listener and every connection (requests in flight are
    /// dropped unanswered) and joins the server thread before returning.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
        if let Some(thread) = self.thread.lock().take() {
            if thread.join().is_err() {
                log::warn!("http server thread panicked");
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub(crate) enum Either<A, B> {
    Left(A),
    Right(B),
}

/// Polls both futures; the first to finish wins (`a` first when both are ready).
pub(crate) async fn race<A: Future, B: Future>(a: A, b: B) -> Either<A::Output, B::Output> {
    let mut a = std::pin::pin!(a);
    let mut b = std::pin::pin!(b);
    std::future::poll_fn(|cx| {
        if let std::task::Poll::Ready(v) = a.as_mut().poll(cx) {
            return std::task::Poll::Ready(Either::Left(v));
        }
        if let std::task::Poll::Ready(v) = b.as_mut().poll(cx) {
            return std::task::Poll::Ready(Either::Right(v));
        }
        std::task::Poll::Pending
    })
    .await
}

/// Why a request's wait ([`within`]) ended without its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    /// `limit` passed first.
    Late,
    /// The server began to stop first.
    Stopping,
}

impl Cut {
    /// As a reader is told it.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Cut::Late => "no answer from the cache in time",
            Cut::Stopping => "the mount is stopping",
        }
    }
}

/// A token listener's read of `key` (`--serve-endpoint`, `--serve-imds`): the cache's one
/// read, a use of the token, answered within `limit` unless the server stops first; counted
/// as a read through `front_end` when it serves a token.
pub(crate) async fn read_token(
    cache: &std::sync::Arc<crate::cache::Cache>,
    key: &crate::cache::Key,
    front_end: crate::cache::FrontEnd,
    limit: Duration,
    stop: &Stop,
) -> Result<crate::cache::Lease, crate::cache::ReadError> {
    use crate::cache::{ReadError, Use};
    let answer = cache.read_async(key, Use::Read);
    let got = within(answer, limit, stop)
        .await
        .unwrap_or_else(|cut| Err(ReadError::Unavailable(cut.reason().into())));
    if got.is_ok() {
        cache.meters().read(front_end);
    }
    got
}

/// `answer`'s output, unless `limit` passes or the server stops first.
pub(crate) async fn within<F: Future>(
    answer: F,
    limit: std::time::Duration,
    stop: &Stop,
) -> Result<F::Output, Cut> {
    match race(tokio::time::timeout(limit, answer), stop.stopped()).await {
        Either::Left(Ok(got)) => Ok(got),
        Either::Left(Err(_)) => Err(Cut::Late),
        Either::Right(()) => Err(Cut::Stopping),
    }
}
