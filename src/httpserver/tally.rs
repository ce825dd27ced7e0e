//! What a token listener (`--serve-endpoint`, `--serve-imds`) counts for `.status` and
//! `--metrics` (requests by category and by status, callers refused by cause), and how a
//! counted outcome becomes its answer: shared by both listeners, which never import each
//! other. Each outcome's category is decided where the answer is made (a read's failure by
//! its `ReadError`), never worked back out of the HTTP status.

use super::origin::Refusal;
use super::{Answer, Reply, Stop};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// What kind of answer a request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    /// 200 with a token.
    Served,
    /// The caller may not ask: 401 without the endpoint's secret, 403 for an IMDS caller
    /// whose uid may not read the token files. Its connection is closed after the answer.
    CallerRefused,
    /// 400 (and 408, 413 from the server) for a request the listener will not serve.
    BadRequest,
    /// The upstream refused the resource.
    Refused,
    /// The upstream refused the identity.
    Denied,
    /// 500: no token could be had.
    UpstreamFailed,
    /// 404 (and 405): another path or method.
    NotFound,
}

/// Why a caller was refused before its request was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// `--serve-endpoint`: the secret header was missing or wrong (401).
    Secret,
    /// The `Host` header was missing, repeated or named another host.
    Host,
    /// A proxy header (`Forwarded`, `X-Forwarded-For`, ...).
    Forwarded,
    /// The target was a URL, not a path.
    Target,
    /// `--serve-imds`: the caller's uid may not read the mount's tokens (403).
    Uid,
}

impl Cause {
    pub const ALL: [Cause; 5] = [
        Cause::Secret,
        Cause::Host,
        Cause::Forwarded,
        Cause::Target,
        Cause::Uid,
    ];

    /// The metrics' label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Secret => "secret",
            Cause::Host => "host",
            Cause::Forwarded => "forwarded",
            Cause::Target => "target",
            Cause::Uid => "uid",
        }
    }
}

impl From<Refusal> for Cause {
    fn from(r: Refusal) -> Cause {
        match r {
            Refusal::Host => Cause::Host,
            Refusal::Forwarded => Cause::Forwarded,
            Refusal::Target => Cause::Target,
        }
    }
}

/// A listener's request counters (atomics, and one leaf lock for the statuses).
#[derive(Default)]
pub struct Counters {
    requests: AtomicU64,
    served: AtomicU64,
    caller_refused: AtomicU64,
    bad_request: AtomicU64,
    refused: AtomicU64,
    denied: AtomicU64,
    upstream_failed: AtomicU64,
    not_found: AtomicU64,
    /// Answers by HTTP status (a handful of statuses: a map behind a leaf lock).
    statuses: Mutex<BTreeMap<u16, u64>>,
    /// Callers refused, by `Cause` (its declaration order, which `Cause::ALL` follows).
    causes: [AtomicU64; Cause::ALL.len()],
}

impl Counters {
    /// A request arrived (counted before it is answered).
    pub fn arrived(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self, category: Category) {
        let c = match category {
            Category::Served => &self.served,
            Category::CallerRefused => &self.caller_refused,
            Category::BadRequest => &self.bad_request,
            Category::Refused => &self.refused,
            Category::Denied => &self.denied,
            Category::UpstreamFailed => &self.upstream_failed,
            Category::NotFound => &self.not_found,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A request the server refused before the listener saw it (408, 413): counted as
    /// arrived, a bad request, and by its status.
    pub fn refused_by_server(&self, status: u16) {
        self.arrived();
        self.count(Category::BadRequest);
        self.status(status);
    }

    /// An answer with this status was sent.
    pub fn status(&self, status: u16) {
        *self.statuses.lock().entry(status).or_default() += 1;
    }

    /// A caller refused for `cause` (counted besides its category).
    pub fn refused(&self, cause: Cause) {
        self.causes[cause as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Answers by status, in status order.
    pub fn statuses(&self) -> Vec<(u16, u64)> {
        self.statuses.lock().iter().map(|(s, n)| (*s, *n)).collect()
    }

    /// Callers refused, by cause (every cause, in `Cause::ALL`'s order).
    pub fn causes(&self) -> [(Cause, u64); 5] {
        Cause::ALL.map(|c| (c, self.causes[c as usize].load(Ordering::Relaxed)))
    }

    /// `.status`'s counters; `caller_refused` names that count as the listener's protocol
    /// says it (`unauthorized`, `forbidden`).
    pub fn json(&self, caller_refused: &str) -> serde_json::Value {
        let n = |c: &AtomicU64| serde_json::Value::from(c.load(Ordering::Relaxed));
        let mut m = serde_json::Map::new();
        m.insert("requests".into(), n(&self.requests));
        m.insert("served".into(), n(&self.served));
        m.insert(caller_refused.into(), n(&self.caller_refused));
        m.insert("bad_request".into(), n(&self.bad_request));
        m.insert("refused".into(), n(&self.refused));
        m.insert("denied".into(), n(&self.denied));
        m.insert("upstream_failed".into(), n(&self.upstream_failed));
        m.insert("not_found".into(), n(&self.not_found));
        serde_json::Value::Object(m)
    }
}

/// Counts an outcome and makes its answer: JSON, never cached; a refused caller keeps no
/// connection (idle connections that completed a request never hold places an allowed
/// caller needs); nothing is written once the server is stopping.
pub fn answer(
    counters: &Counters,
    stop: &Stop,
    category: Category,
    status: u16,
    body: Vec<u8>,
) -> Answer {
    counters.count(category);
    counters.status(status);
    if stop.is_stopped() {
        return Answer::Close;
    }
    let mut reply = json_reply(status, body);
    if category == Category::CallerRefused {
        reply.headers.push(("Connection".into(), "close".into()));
    }
    Answer::Reply(reply)
}

/// A JSON reply that no cache keeps.
pub fn json_reply(status: u16, body: Vec<u8>) -> Reply {
    Reply {
        status,
        headers: vec![
            (
                "Content-Type".into(),
                "application/json; charset=utf-8".into(),
            ),
            ("Cache-Control".into(), "no-store".into()),
        ],
        body,
    }
}
