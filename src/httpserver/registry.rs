//! The live connections of one server, for eviction: when a new connection would exceed
//! [`super::Config::max_connections`], one already open is told to close instead of the
//! accept loop waiting for a slot.
//!
//! Who goes, in this order:
//! 1. the oldest (first accepted) connection that has not completed a request and has none
//!    in its handler: a silent or slow client, or one whose head is in but whose body is not;
//! 2. else the connection idle the longest since it completed a request (keep-alive);
//! 3. else (every connection has a request in its handler) none: the new connection is
//!    closed at once.
//!
//! A connection with a request in its handler is never evicted, so a request that got that
//! far is answered whatever other clients do (the endpoint's handler answers a request
//! without the secret at once: only one with it stays there).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::{race, Either};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// No request completed yet, none in the handler (a head may be in, its body not).
    Fresh,
    /// A request in the handler.
    Busy,
    /// At least one request completed, none in the handler (a next head or body may be
    /// on the way).
    Idle,
}

struct Entry {
    state: State,
    /// When it entered its state (a sequence number; accept order for `Fresh`).
    since: u64,
    close: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    /// The id the next accepted connection gets.
    next: u64,
    /// By id, which is accept order.
    conns: BTreeMap<u64, Entry>,
}

/// The open connections of one server, shared by its accept loop and connection tasks.
pub(super) struct Registry {
    /// At most this many open at once (`Config::max_connections`).
    max: usize,
    /// The connections; held only for a lookup or update, never across an `.await`.
    inner: Mutex<Inner>,
}

/// Why a connection must close before hyper is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Closing {
    /// Evicted for a newer connection.
    Evicted,
    /// No complete request head within the first-head limit.
    NoFirstHead,
}

impl Registry {
    pub(super) fn new(max: usize) -> Arc<Registry> {
        Arc::new(Registry {
            max: max.max(1),
            inner: Mutex::new(Inner::default()),
        })
    }

    /// Registers a new connection, evicting one if the server is full; `None` when every
    /// connection has a request in its handler (the new one is to be closed).
    pub(super) fn admit(self: &Arc<Self>) -> Option<Ticket> {
        let mut inner = self.inner.lock();
        if inner.conns.len() >= self.max {
            let victim = Self::victim(&inner)?;
            if let Some(gone) = inner.conns.remove(&victim) {
                gone.close.notify_one();
            }
        }
        let id = inner.next;
        inner.next += 1;
        let close = Arc::new(Notify::new());
        inner.conns.insert(
            id,
            Entry {
                state: State::Fresh,
                since: id,
                close: Arc::clone(&close),
            },
        );
        Some(Ticket {
            registry: Arc::clone(self),
            id,
            close,
            started: AtomicBool::new(false),
        })
    }

    fn victim(inner: &Inner) -> Option<u64> {
        let oldest_fresh = inner
            .conns
            .iter()
            .find(|(_, e)| e.state == State::Fresh)
            .map(|(id, _)| *id);
        oldest_fresh.or_else(|| {
            inner
                .conns
                .iter()
                .filter(|(_, e)| e.state != State::Busy)
                .min_by_key(|(_, e)| e.since)
                .map(|(id, _)| *id)
        })
    }

    fn set(&self, id: u64, state: State) {
        let mut inner = self.inner.lock();
        let seq = inner.next;
        inner.next += 1;
        if let Some(e) = inner.conns.get_mut(&id) {
            e.state = state;
            e.since = seq;
        }
    }
}

/// One connection's place in the registry; dropping it frees the place.
pub(super) struct Ticket {
    registry: Arc<Registry>,
    id: u64,
    close: Arc<Notify>,
    /// Whether a complete request head came in.
    started: AtomicBool,
}

impl Ticket {
    /// A complete request head came in (its body may still be on the way).
    pub(super) fn head_in(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    /// The request is in the handler: the connection is not evicted.
    pub(super) fn handling(&self) {
        self.registry.set(self.id, State::Busy);
    }

    /// The handler answered.
    pub(super) fn answered(&self) {
        self.registry.set(self.id, State::Idle);
    }

    /// Completes when the connection must close: evicted, or no complete request head
    /// within `first_head` of the accept.
    pub(super) fn closing(&self, first_head: Duration) -> impl Future<Output = Closing> + '_ {
        let no_head = async move {
            tokio::time::sleep(first_head).await;
            if self.started.load(Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
        };
        async move {
            match race(self.close.notified(), no_head).await {
                Either::Left(()) => Closing::Evicted,
                Either::Right(()) => Closing::NoFirstHead,
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.registry.inner.lock().conns.remove(&self.id);
    }
}
