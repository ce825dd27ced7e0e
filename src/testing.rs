//! Test doubles for driving the cache and the filesystem core without FUSE or a network:
//! a wall clock that moves only when told, and a source whose answers a test steers. Used
//! by the unit tests and by `tests/it/fs.rs`; nothing in the daemon uses them. The types a test
//! needs to write a source of its own are re-exported here.

pub use crate::cache::{Identities, IdentityId, Key};
pub use crate::policy::{Clock, EpochMs};
pub use crate::source::{Kind, Source, SourceError};
pub use crate::token::Token;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// A wall clock that stands still until a test moves it. Its monotonic time runs with real
/// time plus every advance: moving the clock also brings the cache's deadlines (a queued
/// fetch's, a fetch's `--timeout`) that much closer.
pub struct FakeClock {
    now: AtomicI64,
    /// Milliseconds advanced so far (never below 0 on the monotonic side).
    advanced: AtomicI64,
}

impl FakeClock {
    pub fn new(start: EpochMs) -> Arc<FakeClock> {
        Arc::new(FakeClock {
            now: AtomicI64::new(start),
            advanced: AtomicI64::new(0),
        })
    }

    pub fn advance(&self, ms: i64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
        self.advanced.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> EpochMs {
        self.now.load(Ordering::SeqCst)
    }

    fn instant(&self) -> std::time::Instant {
        let ahead = self.advanced.load(Ordering::SeqCst).max(0) as u64;
        std::time::Instant::now() + Duration::from_millis(ahead)
    }
}

/// Issues opaque tokens `token-N` living `life_ms` from the fake clock's now; refuses the
/// resources it is told to (400 AudienceNotSupported), fails at the connection level while
/// down, and counts every call.
pub struct FakeSource {
    clock: Arc<FakeClock>,
    life_ms: AtomicI64,
    refresh_in_ms: Mutex<Option<i64>>,
    calls: AtomicU64,
    refused: Mutex<HashSet<String>>,
    down: AtomicBool,
}

impl FakeSource {
    pub fn new(clock: Arc<FakeClock>, life_ms: i64) -> Arc<FakeSource> {
        Arc::new(FakeSource {
            clock,
            life_ms: AtomicI64::new(life_ms),
            refresh_in_ms: Mutex::new(None),
            calls: AtomicU64::new(0),
            refused: Mutex::new(HashSet::new()),
            down: AtomicBool::new(false),
        })
    }

    /// Upstream calls so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Waits (real time, bounded) until at least `n` calls were made.
    pub fn wait_calls(&self, n: u64) -> bool {
        for _ in 0..1000 {
            if self.calls() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    pub fn refuse(&self, resource: &str) {
        self.refused.lock().insert(resource.to_string());
    }

    /// While down, every call fails as if the connection were refused.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// The lifetime of tokens issued from now on.
    pub fn set_life(&self, ms: i64) {
        self.life_ms.store(ms, Ordering::SeqCst);
    }

    /// The `refresh_in` of tokens issued from now on.
    pub fn set_refresh_in(&self, ms: Option<i64>) {
        *self.refresh_in_ms.lock() = ms;
    }
}

impl Source for FakeSource {
    fn fetch_once(&self, resource: &str, _timeout: Duration) -> Result<Token, SourceError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.down.load(Ordering::SeqCst) {
            return Err(SourceError::Unreachable("Connection refused".into()));
        }
        if self.refused.lock().contains(resource) {
            return Err(SourceError::Status {
                status: 400,
                message: "AudienceNotSupported: injected".into(),
                retry_after: None,
            });
        }
        Ok(Token {
            access_token: Zeroizing::new(format!("token-{n}")),
            token_type: "Bearer".into(),
            expires_on: self.clock.now() + self.life_ms.load(Ordering::SeqCst),
            refresh_in_ms: *self.refresh_in_ms.lock(),
            not_before: None,
        })
    }

    fn endpoint(&self) -> String {
        "fake".into()
    }

    fn kind(&self) -> Kind {
        Kind::CloudShell
    }
}

/// An HTTP answer's JSON body, for tests of the endpoints: it reads like the parsed JSON
/// (`body["statusCode"]`), but shown (`{body}` in a failure message) its `access_token` is
/// only a length.
pub struct Body(pub serde_json::Value);

impl std::ops::Deref for Body {
    type Target = serde_json::Value;
    fn deref(&self) -> &serde_json::Value {
        &self.0
    }
}

impl std::fmt::Display for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.0.clone();
        if let Some(token) = shown.get_mut("access_token") {
            let len = token.as_str().map_or(0, str::len);
            *token = format!("<{len} bytes, not shown>").into();
        }
        write!(f, "{shown}")
    }
}

/// One `GET target` with `head` (header lines, each ending in CRLF) on a new connection to
/// `addr`, closed after: the status and the parsed body (`Null` if not JSON).
pub fn http_get(addr: std::net::SocketAddr, target: &str, head: &str) -> (u16, Body) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, Body(serde_json::Value::Null));
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let req = format!("GET {target} HTTP/1.1\r\n{head}Connection: close\r\n\r\n");
    let _ = s.write_all(req.as_bytes());
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (status, Body(json))
}
