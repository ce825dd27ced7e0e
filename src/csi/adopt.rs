//! Restart adoption: the volumes the driver before this one published (its records under
//! `--state-dir`) are taken over as they are. Their tmpfs and binds stayed mounted and
//! their files readable; each token in them goes back into the cache, so its files are
//! kept, and removed before it expires unless the volume's next republish brings a
//! service-account token for a refresh. A record whose mounts are gone is cleaned up.

use super::driver::Driver;
use super::state::Record;
use super::{attrs, volume};
use crate::cache::Key;
use crate::token::View;
use crate::writer;
use log::{error, info, warn};
use std::io::Read;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The most a token's `.json` view may weigh when read back.
const MAX_VIEW: u64 = 64 * 1024;

impl Driver {
    /// Adopts every volume the state directory records, then unmounts what under the data
    /// directory no record names (left by a driver that died before writing one).
    pub(super) fn adopt_all(&self) {
        let (records, bad) = match self.state.load() {
            Ok(found) => found,
            Err(e) => {
                warn!(
                    "{}: cannot read the volume records: {e}",
                    self.state.path().display()
                );
                return;
            }
        };
        for why in bad {
            warn!("{}: {why}: left as it is", self.state.path().display());
        }
        for record in records {
            let (id, data, target) = (
                record.volume_id.clone(),
                self.data_dir.join(&record.data),
                PathBuf::from(&record.target_path),
            );
            let Err(why) = self.adopt(record) else {
                continue;
            };
            if volume::same_mount(&data, &target) {
                // The pod's running containers still see this tmpfs: it must not keep tokens
                // nobody refreshes. Its mounts and record stay; its next publish fills it.
                volume::empty(&data);
                error!("volume {id}: not adopted: {why}; its token files were removed until its next publish");
            } else {
                warn!("volume {id}: not adopted: {why}; what is left of it is removed");
                let _ = volume::unmount(&target);
                let _ = volume::remove_data(&data);
                let _ = self.state.remove(&volume::data_name(&id));
            }
        }
        self.sweep();
    }

    /// Unmounts and removes every tmpfs under the data directory that no record names.
    fn sweep(&self) {
        let Ok(entries) = std::fs::read_dir(&self.data_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if self.state.get(&name).is_some() || volume::mounted_at(&path).is_none() {
                continue;
            }
            warn!("{}: no volume record names it: unmounted", path.display());
            let _ = volume::remove_data(&path);
        }
    }

    fn adopt(&self, record: Record) -> Result<(), String> {
        let data = self.data_dir.join(&record.data);
        if volume::mounted_at(&data).as_deref() != Some("tmpfs") {
            return Err(format!("its tmpfs {} is gone", data.display()));
        }
        if volume::mounted_at(Path::new(&record.target_path)).is_none() {
            return Err(format!("nothing is mounted at {}", record.target_path));
        }
        let resources = attrs::resources_of(&record.resources).map_err(|e| e.to_string())?;
        let key = record.key.clone();
        let volume_id = record.volume_id.clone();
        let mut inner = self.inner.lock();
        let identity = self
            .join_key(&mut inner, &key, &record.pod, &record.volume_id)
            .map_err(|e| e.to_string())?;
        let mut held = match self.held(record, identity, &resources, &data, true) {
            Ok(held) => held,
            Err(e) => {
                self.leave_key(&mut inner, &key, &volume_id);
                return Err(e.to_string());
            }
        };
        let mut kept = 0;
        for i in 0..held.slots.len() {
            let key = Key::new(identity, held.slots[i].wanted.resource.clone());
            self.cache.declare(&key);
            let json = writer::view_path(View::Json, &held.slots[i].wanted.name);
            let token = read_view(&data.join(json))
                .and_then(|bytes| crate::source::parse::token(&bytes, self.cache.now()).ok());
            match token.and_then(|t| self.cache.adopt(&key, t)) {
                Some(v) => {
                    held.slots[i].written = Some(v);
                    kept += 1;
                }
                // Unreadable or expired: its files go.
                None => held.remove(i),
            }
        }
        info!(
            "adopted volume {}: {}, client {}, {kept} valid token(s) kept until its next republish",
            held.record.volume_id, held.record.pod, held.record.key.client_id
        );
        inner.volumes.insert(held.record.volume_id.clone(), held);
        self.operations.set_volumes(inner.volumes.len());
        Ok(())
    }
}

/// A view file of an adopted volume (root's tmpfs), without following a symlink.
fn read_view(path: &Path) -> Option<Zeroizing<Vec<u8>>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let mut bytes = Zeroizing::new(Vec::new());
    file.take(MAX_VIEW).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}
