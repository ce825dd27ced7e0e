//! What the CSI driver counts for `--metrics`: publishes, republishes and unpublishes by
//! result (`ok`, or the gRPC code the kubelet got). `collect.rs` reads them at scrape time.

use super::CsiError;
use std::sync::atomic::{AtomicU64, Ordering};

/// An RPC that changes a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// A first `NodePublishVolume` of a volume.
    Publish,
    /// A repeated one (`requiresRepublish`): the next service-account token.
    Republish,
    /// `NodeUnpublishVolume`.
    Unpublish,
}

/// Each operation's label, in `Operation`'s declaration order.
const OPERATIONS: [&str; 3] = ["publish", "republish", "unpublish"];

/// Each result an operation may have, as its label says it.
const RESULTS: [&str; 6] = [
    "ok",
    "invalid_argument",
    "permission_denied",
    "unavailable",
    "failed_precondition",
    "internal",
];

/// `done`'s index in `RESULTS`.
fn result_of(done: &Result<(), CsiError>) -> usize {
    match done {
        Ok(()) => 0,
        Err(CsiError::InvalidArgument(_) | CsiError::Usage(_)) => 1,
        Err(CsiError::PermissionDenied(_)) => 2,
        Err(CsiError::Unavailable(_)) => 3,
        Err(CsiError::FailedPrecondition(_)) => 4,
        Err(CsiError::Internal(_) | CsiError::Start(_)) => 5,
    }
}

/// Operations by kind and result, and the volumes held (atomics: a scrape takes no lock of
/// the driver's, which unmounts under its lock).
#[derive(Default)]
pub struct Operations {
    counts: [[AtomicU64; RESULTS.len()]; OPERATIONS.len()],
    volumes: AtomicU64,
}

impl Operations {
    /// The volumes published now (set under the driver's lock whenever they change).
    pub fn set_volumes(&self, n: usize) {
        self.volumes.store(n as u64, Ordering::Relaxed);
    }

    pub fn volumes(&self) -> u64 {
        self.volumes.load(Ordering::Relaxed)
    }

    pub fn count(&self, op: Operation, done: &Result<(), CsiError>) {
        self.counts[op as usize][result_of(done)].fetch_add(1, Ordering::Relaxed);
    }

    /// Every (operation, result, count), zeros included.
    pub fn each(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
        OPERATIONS.iter().enumerate().flat_map(move |(o, op)| {
            RESULTS
                .iter()
                .enumerate()
                .map(move |(r, result)| (*op, *result, self.counts[o][r].load(Ordering::Relaxed)))
        })
    }
}
