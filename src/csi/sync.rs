//! Keeps every volume's files in step with the cache, as the sink keeps DIR: once a pass,
//! each key of a live volume is read once (a use of its token, so the cache refreshes it
//! ahead), a new version valid for longer than [`UNLINK_LEAD`] is written to every volume
//! of that key, and files whose token has no refreshed successor are removed before it
//! stops being valid.

use super::driver::{Driver, UNLINK_LEAD};
use crate::cache::{Key, Use};
use crate::token::Version;
use log::{debug, warn};
use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Every key is looked at this often.
const PASS: Duration = Duration::from_millis(100);

/// The sync thread while it runs; stopped and joined on drop.
pub struct Syncing {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Syncing {
    fn drop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the sync thread over `driver`.
pub fn start(driver: Arc<Driver>) -> std::io::Result<Syncing> {
    let stop = Arc::new((Mutex::new(false), Condvar::new()));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("csi-sync".into())
        .spawn(move || {
            let mut stopped = flag.0.lock();
            while !*stopped {
                parking_lot::MutexGuard::unlocked(&mut stopped, || pass(&driver));
                flag.1.wait_for(&mut stopped, PASS);
            }
        })?;
    Ok(Syncing {
        stop,
        thread: Some(thread),
    })
}

/// One pass over every volume.
pub fn pass(driver: &Driver) {
    let keys: BTreeSet<Key> = {
        let inner = driver.inner.lock();
        inner
            .volumes
            .values()
            .flat_map(|h| h.slots.iter().map(|s| h.key(s)))
            .collect()
    };
    let mut current: HashMap<Key, Arc<Version>> = HashMap::new();
    for key in keys {
        // A read that waits for a fetch answers nobody: the next pass reads again.
        if let Some(Ok(lease)) = driver.cache.read_now(&key, Use::Read, Box::new(drop)) {
            if lease.valid_for > UNLINK_LEAD {
                current.insert(key, lease.version);
            }
        }
    }
    let mut inner = driver.inner.lock();
    for held in inner.volumes.values_mut() {
        for i in 0..held.slots.len() {
            let key = held.key(&held.slots[i]);
            let written = held.slots[i].written.as_ref().map(|v| v.id);
            match current.get(&key) {
                Some(v) if written != Some(v.id) => {
                    if let Err(e) = held.write(i, v.clone(), driver.cache.meters()) {
                        warn!(
                            "volume {}: cannot write {}: {e}",
                            held.record.volume_id, held.slots[i].wanted.name
                        );
                        held.remove(i);
                    } else {
                        debug!(
                            "volume {}: {} written",
                            held.record.volume_id, held.slots[i].wanted.name
                        );
                    }
                }
                Some(_) => {}
                None if written.is_some() => {
                    held.remove(i);
                    warn!(
                        "volume {}: {}: no refreshed token in time: its files were removed",
                        held.record.volume_id, held.slots[i].wanted.name
                    );
                }
                None => {}
            }
        }
    }
}
