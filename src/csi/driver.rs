//! The driver: publish, republish and unpublish of volumes over the node's one cache.
//!
//! Each [`IdentityKey`] (tenant, client ID, service account's issuer and subject) is one
//! identity of the cache, added at its first volume and forgotten with its last: its
//! source is Entra's client-credentials exchange with the newest service-account token any
//! of its volumes brought (`Supplied`). Pods of one service account asking for the same
//! application share its tokens and its upstream requests; others never do.
//!
//! # State and locks
//!
//! `Driver::inner` (one lock) holds the volumes and the keys. It is never held while the
//! upstream is asked: a first publish waits for its tokens with the lock released, its
//! volume marked busy. It is held while a volume's files are written (the sync pass,
//! republish) and around reads that do not wait (`Cache::read_now`, whose callback takes
//! no lock of the driver's), and taken before the cache's lock, never inside it.

use super::attrs::{self, IdentityKey, Pod, Wanted};
use super::state::{Record, StateDir};
use super::volume;
use super::{CsiError, CsiRequest, Node, Publish};
use crate::access::Access;
use crate::cache::{Cache, IdentityId, Key, ReadError, Use};
use crate::source::entra::{Credential, Entra, Settings, Supplied};
use crate::source::{Identity, Kind};
use crate::token::{Version, View};
use crate::writer::{self, Writer};
use log::{info, warn};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use zeroize::Zeroizing;

/// The driver of one node.
pub struct Driver {
    /// The daemon core's cache (identities added per key).
    pub(super) cache: Arc<Cache>,
    /// Entra's authority, its extra CA certificates, the default tenant and the audience.
    authority: String,
    ca: Vec<reqwest::Certificate>,
    default_tenant: Option<String>,
    audience: String,
    pub(super) data_dir: PathBuf,
    pub(super) state: StateDir,
    /// Volumes and keys (see "State and locks").
    pub(super) inner: Mutex<Inner>,
    /// Set once the volumes of the driver before were adopted (`Probe`).
    ready: AtomicBool,
}

#[derive(Default)]
pub(super) struct Inner {
    /// Published volumes, by volume ID.
    pub(super) volumes: HashMap<String, Held>,
    /// The keys of published volumes and of first publishes under way.
    pub(super) keys: HashMap<IdentityKey, KeyState>,
    /// Volume IDs with a first publish under way.
    busy: HashSet<String>,
}

/// One key: its cache identity and the service-account token its fetches present.
pub(super) struct KeyState {
    identity: IdentityId,
    supplied: Arc<Supplied>,
    /// Volumes (published or being published) of this key.
    volumes: usize,
}

/// A published volume: its record, its writer and what its files hold.
pub(super) struct Held {
    pub(super) record: Record,
    pub(super) identity: IdentityId,
    pub(super) writer: Writer,
    pub(super) slots: Vec<Slot>,
}

/// One resource of a volume and the version whose files are in its tmpfs.
pub(super) struct Slot {
    pub(super) wanted: Wanted,
    pub(super) written: Option<Arc<Version>>,
}

impl Held {
    pub(super) fn key(&self, slot: &Slot) -> Key {
        Key::new(self.identity, slot.wanted.resource.clone())
    }

    /// Writes every view of `v` for slot `i`, the raw token last.
    pub(super) fn write(&mut self, i: usize, v: Arc<Version>) -> Result<(), writer::WriteError> {
        let mut views = View::ALL;
        views.rotate_left(1);
        let name = self.slots[i].wanted.name.clone();
        for view in views {
            self.writer
                .write(&writer::view_path(view, &name), v.bytes(view))?;
        }
        self.slots[i].written = Some(v);
        Ok(())
    }

    /// Removes slot `i`'s files.
    pub(super) fn remove(&mut self, i: usize) {
        self.slots[i].written = None;
        let name = self.slots[i].wanted.name.clone();
        for view in View::ALL {
            if let Err(e) = self.writer.remove(&writer::view_path(view, &name)) {
                warn!(
                    "volume {}: cannot remove {name}: {e}",
                    self.record.volume_id
                );
            }
        }
    }
}

/// Who the files of a volume are for: root's, the pod's fsGroup's when it has one; mode
/// `fileMode`, else 0440 with a group and 0444 without.
pub(super) fn access_of(group: Option<u32>, file_mode: Option<u16>) -> Access {
    Access {
        uid: 0,
        gid: group.unwrap_or(0),
        file_mode: file_mode.unwrap_or(if group.is_some() { 0o440 } else { 0o444 }),
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> CsiError {
    CsiError::Internal(format!("{what}: {e}"))
}

/// A failed fetch as the kubelet shows it on the pod.
fn fetch_error(e: ReadError, pod: &Pod, client_id: &str) -> CsiError {
    match e {
        ReadError::Refused(m) | ReadError::Denied(m) => CsiError::PermissionDenied(format!(
            "Entra refused a token for {pod} as application {client_id}: {m}"
        )),
        ReadError::Unavailable(m) => CsiError::Unavailable(format!(
            "no token for {pod} as application {client_id}: {m}"
        )),
    }
}

impl Driver {
    /// The driver over `cache`, configured by `req`; adopts the volumes the driver before
    /// it published (`--state-dir`).
    pub fn start(cache: Arc<Cache>, req: &CsiRequest) -> Result<Driver, CsiError> {
        let start =
            |what: &Path, e: std::io::Error| CsiError::Start(format!("{}: {e}", what.display()));
        let ca = match &req.ca_file {
            Some(path) => crate::source::client_tls::ca_certificates(path)
                .map_err(|e| CsiError::Usage(format!("--ca-file: {e}")))?,
            None => Vec::new(),
        };
        // The authority is checked once, as a first volume's source would.
        crate::source::client_tls::token_url(&req.authority_host, "organizations")
            .map_err(|e| CsiError::Usage(format!("--authority-host: {e}")))?;
        volume::own_dir(&req.data_dir).map_err(|e| start(&req.data_dir, e))?;
        let state = StateDir::open(&req.state_dir).map_err(|e| start(&req.state_dir, e))?;
        let driver = Driver {
            cache,
            authority: req.authority_host.clone(),
            ca,
            default_tenant: req.tenant_id.clone(),
            audience: req.audience.clone(),
            data_dir: req.data_dir.clone(),
            state,
            inner: Mutex::new(Inner::default()),
            ready: AtomicBool::new(false),
        };
        driver.adopt_all();
        driver.ready.store(true, Ordering::SeqCst);
        Ok(driver)
    }

    /// The key's state, made (with its cache identity) if new; counts one more volume.
    pub(super) fn join_key(
        &self,
        inner: &mut Inner,
        key: &IdentityKey,
    ) -> Result<IdentityId, CsiError> {
        if let Some(k) = inner.keys.get_mut(key) {
            k.volumes += 1;
            return Ok(k.identity);
        }
        let supplied = Arc::new(Supplied::new());
        let settings = Settings {
            tenant: key.tenant.clone(),
            client_id: key.client_id.clone(),
            credential: Credential::Supplied(supplied.clone()),
            ca: self.ca.clone(),
        };
        let source = Entra::new(Kind::WorkloadIdentity, &self.authority, &settings)
            .map_err(|e| CsiError::InvalidArgument(e.to_string()))?;
        let ids = Identity {
            client_id: Some(key.client_id.clone()),
            ..Identity::default()
        };
        let name = format!("{}/{}", key.subject, key.client_id);
        let identity = self.cache.identities().add(name, ids, Arc::new(source));
        inner.keys.insert(
            key.clone(),
            KeyState {
                identity,
                supplied,
                volumes: 1,
            },
        );
        Ok(identity)
    }

    /// One volume of `key` fewer; the last forgets the key's identity and its tokens.
    pub(super) fn leave_key(&self, inner: &mut Inner, key: &IdentityKey) {
        let Some(k) = inner.keys.get_mut(key) else {
            return;
        };
        k.volumes = k.volumes.saturating_sub(1);
        if k.volumes == 0 {
            if let Some(k) = inner.keys.remove(key) {
                k.supplied.clear();
                self.cache.forget_identity(k.identity);
            }
        }
    }

    /// Hands the newest service-account token of a volume of `key` to its fetches.
    fn offer(&self, inner: &Inner, key: &IdentityKey, token: &attrs::SaToken) {
        if let Some(k) = inner.keys.get(key) {
            k.supplied
                .offer(Zeroizing::new(token.token.to_string()), token.expires_at_ms);
        }
    }

    /// A first publish: tokens first, then the tmpfs, its files and the bind; on any error
    /// nothing stays mounted.
    fn first_publish(&self, v: attrs::Volume) -> Result<(), CsiError> {
        let key = v.key();
        let identity = {
            let mut inner = self.inner.lock();
            if !inner.busy.insert(v.volume_id.clone()) {
                return Err(CsiError::Unavailable(format!(
                    "a publish of volume {} is under way",
                    v.volume_id
                )));
            }
            let identity = self.join_key(&mut inner, &key);
            if identity.is_ok() {
                self.offer(&inner, &key, &v.token);
            } else {
                inner.busy.remove(&v.volume_id);
            }
            identity?
        };
        let outcome = self.mount_new(&v, identity);
        let mut inner = self.inner.lock();
        inner.busy.remove(&v.volume_id);
        match outcome {
            Ok(held) => {
                info!(
                    "publish volume {}: {}, client {}, resources {}",
                    v.volume_id, v.pod, v.client_id, v.resources_given
                );
                inner.volumes.insert(v.volume_id.clone(), held);
                Ok(())
            }
            Err(e) => {
                self.leave_key(&mut inner, &key);
                info!(
                    "publish volume {} refused: {}, client {}: {e}",
                    v.volume_id, v.pod, v.client_id
                );
                Err(e)
            }
        }
    }

    /// Fetches the volume's tokens, then mounts and fills its tmpfs and binds it.
    fn mount_new(&self, v: &attrs::Volume, identity: IdentityId) -> Result<Held, CsiError> {
        let mut versions = Vec::new();
        for w in &v.resources {
            let key = Key::new(identity, w.resource.clone());
            self.cache.declare(&key);
            let lease = self
                .cache
                .read_blocking(&key, Use::Read)
                .map_err(|e| fetch_error(e, &v.pod, &v.client_id))?;
            versions.push(lease.version);
        }
        let target = PathBuf::from(&v.target_path);
        let made_target = volume::make_target(&target).map_err(CsiError::FailedPrecondition)?;
        let name = volume::data_name(&v.volume_id);
        let filled = volume::make_data(&self.data_dir, &name)
            .map_err(|e| internal("cannot mount the volume's tmpfs", e))
            .and_then(|data| {
                let record = Record {
                    volume_id: v.volume_id.clone(),
                    target_path: v.target_path.clone(),
                    data: name.clone(),
                    pod: v.pod.clone(),
                    key: v.key(),
                    resources: v.resources_given.clone(),
                    file_mode: v.file_mode,
                    group: v.group,
                };
                let mut held = self.held(record, identity, &v.resources, &data, false)?;
                for (i, version) in versions.into_iter().enumerate() {
                    held.write(i, version)
                        .map_err(|e| internal("cannot write the volume's files", e))?;
                }
                self.state
                    .save(&held.record)
                    .map_err(|e| internal("cannot write the volume's record", e))?;
                volume::bind_read_only(&data, &target)
                    .map_err(|e| internal("cannot bind the volume at its target path", e))?;
                Ok(held)
            });
        if filled.is_err() {
            let _ = self.state.remove(&name);
            let _ = volume::remove_data(&self.data_dir.join(&name));
            if made_target {
                volume::remove_target(&target);
            }
        }
        filled
    }

    /// A volume's writer over its tmpfs at `data` (its view directories made, or with
    /// `adopt` held as the driver before made them), given the volume's owner and mode.
    pub(super) fn held(
        &self,
        record: Record,
        identity: IdentityId,
        resources: &[Wanted],
        data: &Path,
        adopt: bool,
    ) -> Result<Held, CsiError> {
        let access = access_of(record.group, record.file_mode);
        let io = |e: std::io::Error| internal("the volume's tmpfs", e);
        let fd = writer::open_dir_at(rustix::fs::CWD, data).map_err(io)?;
        let mut w = Writer::new(fd, data.to_path_buf(), access, access.dir_mode()).map_err(io)?;
        for dir in writer::view_dirs() {
            if adopt {
                w.adopt_dir(dir).map_err(io)?;
            } else {
                w.make_dir(dir).map_err(io)?;
            }
        }
        w.set_dir_owner(Some(0), Some(access.gid), u32::from(access.dir_mode()))
            .map_err(io)?;
        Ok(Held {
            record,
            identity,
            writer: w,
            slots: resources
                .iter()
                .map(|w| Slot {
                    wanted: w.clone(),
                    written: None,
                })
                .collect(),
        })
    }

    /// A repeated publish of a published volume: takes the newer service-account token and
    /// checks the files; never remounts, and never fails while the volume holds a valid
    /// token (a failed republish makes the kubelet tear the mount down).
    fn republish(&self, p: &Publish) -> Result<(), CsiError> {
        let checked = attrs::check(p, self.default_tenant.as_deref(), &self.audience);
        let mut inner = self.inner.lock();
        let Some(held) = inner.volumes.get(&p.volume_id) else {
            return Err(CsiError::Unavailable(
                "the volume was unpublished meanwhile".into(),
            ));
        };
        let key = held.record.key.clone();
        let (pod, client) = (held.record.pod.clone(), key.client_id.clone());
        match &checked {
            Ok(v) if v.key() == key => self.offer(&inner, &key, &v.token),
            Ok(_) => warn!(
                "republish volume {}: its attributes or service account changed; keeping those it was published with",
                p.volume_id
            ),
            Err(e) => warn!("republish volume {}: {e}", p.volume_id),
        }
        let inner = &mut *inner;
        let Some(held) = inner.volumes.get_mut(&p.volume_id) else {
            return Err(CsiError::Unavailable(
                "the volume was unpublished meanwhile".into(),
            ));
        };
        let mut last_error = None;
        let now = self.cache.now();
        for i in 0..held.slots.len() {
            let key = held.key(&held.slots[i]);
            match self.cache.read_now(&key, Use::Read, Box::new(drop)) {
                Some(Ok(lease)) => {
                    let fresh = held.slots[i]
                        .written
                        .as_ref()
                        .is_none_or(|w| w.id != lease.version.id);
                    if fresh {
                        if let Err(e) = held.write(i, lease.version) {
                            warn!("volume {}: cannot write its files: {e}", p.volume_id);
                        }
                    }
                }
                Some(Err(e)) => last_error = Some(fetch_error(e, &pod, &client)),
                None => {}
            }
        }
        let valid = held
            .slots
            .iter()
            .any(|s| s.written.as_ref().is_some_and(|v| !v.expired(now)));
        info!(
            "republish volume {}: {pod}, client {client}{}",
            p.volume_id,
            if valid { "" } else { ": no valid token held" }
        );
        match (valid, checked, last_error) {
            (true, _, _) => Ok(()),
            (false, Err(e), _) => Err(e),
            (false, Ok(_), Some(e)) => Err(e),
            (false, Ok(_), None) => Err(CsiError::Unavailable(format!(
                "no valid token held for {pod} yet: fetching"
            ))),
        }
    }

    /// Unmounts the pod's view and the volume's tmpfs, forgets the volume and, with its
    /// key's last volume, the key's tokens. An unknown volume is success.
    fn remove(&self, volume_id: &str, target_path: &str) -> Result<(), CsiError> {
        let mut inner = self.inner.lock();
        if inner.busy.contains(volume_id) {
            return Err(CsiError::Unavailable(format!(
                "a publish of volume {volume_id} is under way"
            )));
        }
        let target = Path::new(target_path);
        let Some(held) = inner.volumes.remove(volume_id) else {
            drop(inner);
            // Unknown: a bind of one of our volumes may still be there (a record lost).
            if volume::mounted_at(target).as_deref() == Some("tmpfs") {
                volume::unmount(target).map_err(|e| internal("cannot unmount", e))?;
            }
            return Ok(());
        };
        let recorded = PathBuf::from(&held.record.target_path);
        for t in [target, recorded.as_path()] {
            if let Err(e) = volume::unmount(t) {
                inner.volumes.insert(volume_id.to_string(), held);
                return Err(internal("cannot unmount the target path", e));
            }
        }
        volume::remove_target(target);
        let data = self.data_dir.join(&held.record.data);
        drop(held.writer);
        if let Err(e) = volume::remove_data(&data) {
            warn!("volume {volume_id}: {}: {e}", data.display());
        }
        if let Err(e) = self.state.remove(&held.record.data) {
            warn!("volume {volume_id}: cannot remove its record: {e}");
        }
        self.leave_key(&mut inner, &held.record.key);
        info!(
            "unpublish volume {volume_id}: {}, client {}",
            held.record.pod, held.record.key.client_id
        );
        Ok(())
    }
}

impl Node for Driver {
    fn publish(&self, p: Publish) -> Result<(), CsiError> {
        if self.inner.lock().volumes.contains_key(&p.volume_id) {
            return self.republish(&p);
        }
        let v = attrs::check(&p, self.default_tenant.as_deref(), &self.audience)?;
        self.first_publish(v)
    }

    fn unpublish(&self, volume_id: &str, target_path: &str) -> Result<(), CsiError> {
        if volume_id.is_empty() || target_path.is_empty() {
            return Err(CsiError::InvalidArgument(
                "volume_id and target_path are required".into(),
            ));
        }
        self.remove(volume_id, target_path)
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}
