//! Test doubles for driving the cache and the filesystem core without FUSE or a network:
//! a wall clock that moves only when told, and a source whose answers a test steers. Used
//! by the unit tests and by `tests/fs.rs`; nothing in the daemon uses them. The types a test
//! needs to write a source of its own are re-exported here.

pub use crate::policy::{Clock, EpochMs};
pub use crate::source::{Kind, Source, SourceError};
pub use crate::token::Token;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// A clock that stands still until a test moves it.
pub struct FakeClock(AtomicI64);

impl FakeClock {
    pub fn new(start: EpochMs) -> Arc<FakeClock> {
        Arc::new(FakeClock(AtomicI64::new(start)))
    }

    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> EpochMs {
        self.0.load(Ordering::SeqCst)
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
