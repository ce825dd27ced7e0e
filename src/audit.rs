//! "Who read my token": each open of a token is logged (resource, view, pid, uid, gid and
//! executable path) at info, never the token. The FUSE thread only queues the event; a
//! thread of its own resolves the executable and writes the line, off the read path.

use log::{info, warn};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Logs each open; repeats of the same reader, resource and view within a second are
/// counted and summed up in one line, so a tight read loop cannot flood the log.
fn writer(rx: Receiver<OpenEvent>, dropped: Arc<AtomicU64>) {
    let mut window: HashMap<Key, u64> = HashMap::new();
    let mut window_start = Instant::now();
    loop {
        // Idle: sleep until the next open; otherwise until the window closes.
        let event = if window.is_empty() {
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        } else {
            rx.recv_timeout(WINDOW.saturating_sub(window_start.elapsed()))
        };
        if window_start.elapsed() >= WINDOW {
            for ((resource, view, pid, uid, gid), n) in window.drain().filter(|(_, n)| *n > 0) {
                info!("audit: {n} more open(s) of {resource} ({view}) by pid {pid} uid {uid} gid {gid}");
            }
            window_start = Instant::now();
        }
        let e = match event {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let key = (e.resource.clone(), e.view, e.pid, e.uid, e.gid);
        if window.is_empty() {
            window_start = Instant::now();
        }
        if let Some(n) = window.get_mut(&key) {
            *n += 1;
            continue;
        }
        window.insert(key, 0);
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

type Key = (Arc<str>, &'static str, u32, u32, u32);

const WINDOW: Duration = Duration::from_secs(1);
