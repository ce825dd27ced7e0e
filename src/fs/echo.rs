//! The kernel's lookup-then-open echo: one `open(2)` by a reader reaches the daemon as a
//! LOOKUP (or a revalidation of a cached name) and then an OPEN. Two consequences, kept
//! together here:
//!
//! - When the LOOKUP waited for a fetch, the OPEN that follows is the same read, not a later
//!   one: it must not count as use of the new version (use earns a refresh ahead of the
//!   refresh point; a token read once must not be refreshed forever).
//! - When a revalidation failed (no valid token within `--timeout`), the kernel looks the
//!   name up again at once, for the same read: that lookup must get the same error without
//!   waiting a second `--timeout`.
//!
//! Locks: `pending_opens` and `failed` are independent, never held together nor while the
//! cache is asked.

use super::FsError;
use crate::cache::Key;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How soon the kernel's retry of a failed revalidation arrives (microseconds, in practice).
const RETRY_WINDOW: Duration = Duration::from_millis(100);

/// What the echo remembers: the core holds one, FUSE threads and fetch threads (lookups'
/// answers) update it.
#[derive(Default)]
pub struct KernelEcho {
    /// Per version id: opens still to come from lookups that waited for its fetch. Dropped
    /// when the count reaches zero or the kernel forgets the version.
    pending_opens: Mutex<HashMap<u64, usize>>,
    /// Per key and reader (pid): a revalidation that failed just now, when, and its
    /// error. Only the same reader's retry gets it; another reader asks again.
    failed: Mutex<HashMap<(Key, u32), (Instant, FsError)>>,
}

impl KernelEcho {
    /// A lookup that waited for the fetch of version `id` was answered with it.
    pub fn waited_for(&self, id: u64) {
        *self.pending_opens.lock().entry(id).or_insert(0) += 1;
    }

    /// Whether an open of version `id` is a later read (not the echo of a waiting lookup).
    pub fn is_later_read(&self, id: u64) -> bool {
        let mut pending = self.pending_opens.lock();
        match pending.get_mut(&id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                pending.remove(&id);
                false
            }
            None => true,
        }
    }

    /// The kernel holds no name of version `id` any more: no open of it can follow.
    pub fn forget(&self, id: u64) {
        let mut pending = self.pending_opens.lock();
        pending.remove(&id);
        if pending.capacity() > 4 * pending.len().max(16) {
            pending.shrink_to_fit();
        }
    }

    /// A revalidation of `key` for reader `pid` failed with `err`.
    pub fn revalidation_failed(&self, key: Key, pid: u32, err: FsError) {
        self.failed.lock().insert((key, pid), (Instant::now(), err));
    }

    /// The error of a revalidation of `key` for reader `pid` that failed just now,
    /// once: this lookup is the kernel's own retry of the same read.
    pub fn retry_of_failed(&self, key: &Key, pid: u32) -> Option<FsError> {
        let mut failed = self.failed.lock();
        if failed.is_empty() {
            return None;
        }
        failed.retain(|_, (at, _)| at.elapsed() < RETRY_WINDOW);
        if failed.is_empty() && failed.capacity() > 16 {
            failed.shrink_to_fit();
        }
        failed.remove(&(key.clone(), pid)).map(|(_, err)| err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_waiting_lookup_excuses_one_open() {
        let echo = KernelEcho::default();
        echo.waited_for(7);
        echo.waited_for(7);
        assert!(!echo.is_later_read(7));
        assert!(!echo.is_later_read(7));
        assert!(echo.is_later_read(7), "the third open is a later read");
        echo.waited_for(8);
        echo.forget(8);
        assert!(echo.is_later_read(8));
    }

    #[test]
    fn a_failed_revalidation_answers_the_kernels_retry_once() {
        let echo = KernelEcho::default();
        let r = Key::new(
            crate::cache::IdentityId::DEFAULT,
            crate::names::Resource::for_test("r"),
        );
        echo.revalidation_failed(r.clone(), 7, FsError::Io);
        assert_eq!(
            echo.retry_of_failed(&r, 8),
            None,
            "another reader asks again"
        );
        assert_eq!(echo.retry_of_failed(&r, 7), Some(FsError::Io));
        assert_eq!(echo.retry_of_failed(&r, 7), None);
    }
}
