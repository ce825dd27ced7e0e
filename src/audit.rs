//! "Who read my token": each open of a token is logged (resource, view, pid, uid, gid and
//! executable path) at info, never the token. The FUSE thread only queues the event; a
//! thread of its own resolves the executable and writes the line, off the read path.

use log::{info, warn};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

/// Events waiting beyond this many are counted, not queued, so a flood of opens never
/// holds up a reader.
const QUEUE: usize = 4096;

pub struct OpenEvent {
    pub resource: Arc<str>,
    pub view: &'static str,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

pub struct Audit {
    tx: SyncSender<OpenEvent>,
    dropped: Arc<AtomicU64>,
}

impl Audit {
    pub fn start() -> std::io::Result<Audit> {
        let (tx, rx) = sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || writer(rx, counter))?;
        Ok(Audit { tx, dropped })
    }

    /// Queues an event; never blocks.
    pub fn opened(&self, event: OpenEvent) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(event) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn writer(rx: Receiver<OpenEvent>, dropped: Arc<AtomicU64>) {
    for e in rx {
        let exe = std::fs::read_link(format!("/proc/{}/exe", e.pid))
            .map_or_else(|_| "?".to_string(), |p| p.display().to_string());
        info!(
            "audit: open of {} ({}) by pid {} uid {} gid {} exe {}",
            e.resource, e.view, e.pid, e.uid, e.gid, exe
        );
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            warn!("audit: {lost} open(s) not logged: too many at once");
        }
    }
}
