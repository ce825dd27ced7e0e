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
use super::meters::{Operation, Operations};
use super::state::{Record, StateDir};
use super::volume;
use super::{CsiError, CsiRequest, Node, Publish};
use crate::access::Access;
use crate::cache::{Cache, FrontEnd, IdentityId, Key, Lease, Meters, ReadError, Use};
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
    /// `--timeout`: the longest a republish waits for a token its volume lacks.
    timeout: std::time::Duration,
    pub(super) data_dir: PathBuf,
    pub(super) state: StateDir,
    /// Volumes and keys (see "State and locks").
    pub(super) inner: Mutex<Inner>,
    /// Set once the volumes of the driver before were adopted (`Probe`).
    ready: AtomicBool,
    /// Publishes, republishes and unpublishes by result (`--metrics`).
    pub(super) operations: Operations,
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
    /// The volumes (published or being published) of this key, each with the newest
    /// service-account token it brought (none yet: adopted, waiting for its republish).
    volumes: HashMap<String, Option<(Zeroizing<String>, i64)>>,
}

impl KeyState {
    /// The key's fetches present the newest service-account token (the latest `exp`) of
    /// a live volume; none when no live volume brought one.
    fn elect(&self) {
        let newest = self
            .volumes
            .values()
            .flatten()
            .max_by_key(|(_, exp)| *exp)
            .map(|(token, exp)| (token.clone(), *exp));
        self.supplied.set(newest);
    }
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

    /// Writes every view of `v` for slot `i`, the raw token last (counted in `meters`).
    pub(super) fn write(
        &mut self,
        i: usize,
        v: Arc<Version>,
        meters: &Meters,
    ) -> Result<(), writer::WriteError> {
        let mut views = View::ALL;
        views.rotate_left(1);
        let name = self.slots[i].wanted.name.clone();
        for view in views {
            self.writer
                .write(&writer::view_path(view, &name), v.bytes(view))?;
        }
        self.slots[i].written = Some(v);
        meters.read(FrontEnd::CsiPublish);
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

/// A token's files go this long before the cache would stop serving it (as the sink's):
/// a version valid for less is not written.
pub const UNLINK_LEAD: std::time::Duration = std::time::Duration::from_millis(500);

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
            timeout: req.policy.timeout,
            data_dir: req.data_dir.clone(),
            state,
            inner: Mutex::new(Inner::default()),
            ready: AtomicBool::new(false),
            operations: Operations::default(),
        };
        driver.adopt_all();
        driver.ready.store(true, Ordering::SeqCst);
        Ok(driver)
    }

    /// The key's state, made (with its cache identity) if new; `volume_id` is one of its
    /// volumes.
    pub(super) fn join_key(
        &self,
        inner: &mut Inner,
        key: &IdentityKey,
        pod: &Pod,
        volume_id: &str,
    ) -> Result<IdentityId, CsiError> {
        if let Some(k) = inner.keys.get_mut(key) {
            k.volumes.entry(volume_id.to_string()).or_insert(None);
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
        let name = self.key_name(key, pod);
        let identity = self.cache.identities().add(name, ids, Arc::new(source));
        inner.keys.insert(
            key.clone(),
            KeyState {
                identity,
                supplied,
                volumes: HashMap::from([(volume_id.to_string(), None)]),
            },
        );
        Ok(identity)
    }

    /// How log lines and metrics name a key: `NAMESPACE/SERVICEACCOUNT/CLIENT-ID` of the pod
    /// the kubelet named (never a claim of its token, though its subject was checked to be
    /// that account), with `@TENANT` when the tenant is not the driver's default one.
    fn key_name(&self, key: &IdentityKey, pod: &Pod) -> String {
        let name = format!(
            "{}/{}/{}",
            pod.namespace, pod.service_account, key.client_id
        );
        match &self.default_tenant {
            Some(t) if t.eq_ignore_ascii_case(&key.tenant) => name,
            _ => format!("{name}@{}", key.tenant),
        }
    }

    /// Forgets each of `keys` that no published volume holds (its entry, declaration and
    /// refusal).
    fn forget_unused(&self, inner: &Inner, keys: impl Iterator<Item = Key>) {
        for key in keys {
            let used = inner
                .volumes
                .values()
                .any(|h| h.slots.iter().any(|s| h.key(s) == key));
            if !used {
                self.cache.forget(&key);
            }
        }
    }

    /// `volume_id` is no longer a volume of `key` (its token no longer presented); the
    /// key's last volume forgets the key's identity and its tokens.
    pub(super) fn leave_key(&self, inner: &mut Inner, key: &IdentityKey, volume_id: &str) {
        let Some(k) = inner.keys.get_mut(key) else {
            return;
        };
        k.volumes.remove(volume_id);
        if !k.volumes.is_empty() {
            k.elect();
            return;
        }
        if let Some(k) = inner.keys.remove(key) {
            k.supplied.clear();
            self.cache.forget_identity(k.identity);
        }
    }

    /// Takes the service-account token volume `volume_id` of `key` brought: the key's
    /// fetches present the newest of its live volumes'.
    fn offer(&self, inner: &mut Inner, key: &IdentityKey, volume_id: &str, token: &attrs::SaToken) {
        if let Some(k) = inner.keys.get_mut(key) {
            let newer = (Zeroizing::new(token.token.to_string()), token.expires_at_ms);
            k.volumes.insert(volume_id.to_string(), Some(newer));
            k.elect();
        }
    }

    /// A first publish: tokens first, then the tmpfs, its files and the bind; on any error
    /// nothing stays mounted.
    fn first_publish(&self, p: &Publish, v: attrs::Volume) -> Result<(), CsiError> {
        let key = v.key();
        let identity = {
            let mut inner = self.inner.lock();
            // A kubelet's retry may come as an earlier publish of the volume just ended.
            if inner.volumes.contains_key(&v.volume_id) {
                drop(inner);
                return self.republish(p);
            }
            if !inner.busy.insert(v.volume_id.clone()) {
                return Err(CsiError::Unavailable(format!(
                    "a publish of volume {} is under way",
                    v.volume_id
                )));
            }
            let identity = self.join_key(&mut inner, &key, &v.pod, &v.volume_id);
            if identity.is_ok() {
                self.offer(&mut inner, &key, &v.volume_id, &v.token);
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
                self.operations.set_volumes(inner.volumes.len());
                Ok(())
            }
            Err(e) => {
                // Its resources declared for it (a refused one would keep the node unready)
                // go, unless another volume holds them.
                let keys = v
                    .resources
                    .iter()
                    .map(|w| Key::new(identity, w.resource.clone()));
                self.forget_unused(&inner, keys);
                self.leave_key(&mut inner, &key, &v.volume_id);
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
        let name = volume::data_name(&v.volume_id);
        if let Some(data) = self.still_mounted(v, &name, &target) {
            // Its mounts outlived a driver that could not adopt them: filled again in place
            // (a new bind would not reach the pod's running containers).
            let mut held = self.fill(v, identity, &name, &data, versions, true)?;
            held.record.resources = v.resources_given.clone();
            return Ok(held);
        }
        let made_target = volume::make_target(&target).map_err(CsiError::FailedPrecondition)?;
        let filled = volume::make_data(&self.data_dir, &name)
            .map_err(|e| internal("cannot mount the volume's tmpfs", e))
            .and_then(|data| {
                let held = self.fill(v, identity, &name, &data, versions, false)?;
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

    /// The volume's tmpfs, when it and its bind at `target` are still mounted for this
    /// very volume (its record says so).
    fn still_mounted(&self, v: &attrs::Volume, name: &str, target: &Path) -> Option<PathBuf> {
        let record = self.state.get(name)?;
        let data = self.data_dir.join(name);
        let ours = record.volume_id == v.volume_id && record.target_path == v.target_path;
        (ours
            && volume::mounted_at(&data).as_deref() == Some("tmpfs")
            && volume::mounted_at(target).is_some())
        .then_some(data)
    }

    /// Writes the volume's first files (`versions`, one per resource) in its tmpfs at
    /// `data` and its record.
    fn fill(
        &self,
        v: &attrs::Volume,
        identity: IdentityId,
        name: &str,
        data: &Path,
        versions: Vec<Arc<Version>>,
        adopt: bool,
    ) -> Result<Held, CsiError> {
        let record = Record {
            volume_id: v.volume_id.clone(),
            target_path: v.target_path.clone(),
            data: name.to_string(),
            pod: v.pod.clone(),
            key: v.key(),
            resources: v.resources_given.clone(),
            file_mode: v.file_mode,
            group: v.group,
        };
        let mut held = self.held(record, identity, &v.resources, data, adopt)?;
        for (i, version) in versions.into_iter().enumerate() {
            held.write(i, version, self.cache.meters())
                .map_err(|e| internal("cannot write the volume's files", e))?;
        }
        self.state
            .save(&held.record)
            .map_err(|e| internal("cannot write the volume's record", e))?;
        Ok(held)
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
            // One a release before this one did not make is made now.
            match adopt.then(|| w.adopt_dir(dir)) {
                Some(Ok(())) => {}
                Some(Err(e)) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
                _ => w.make_dir(dir).map_err(io)?,
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
    /// token (a failed republish makes the kubelet tear the mount down). When it holds none
    /// (an outage outlasted its tokens), it waits for a fetch as a first publish does.
    fn republish(&self, p: &Publish) -> Result<(), CsiError> {
        let checked = attrs::check(p, self.default_tenant.as_deref(), &self.audience);
        let gone = || CsiError::Unavailable("the volume was unpublished meanwhile".into());
        let (keys, pod, client) = {
            let mut inner = self.inner.lock();
            let held = inner.volumes.get(&p.volume_id).ok_or_else(gone)?;
            let key = held.record.key.clone();
            let keys: Vec<Key> = held.slots.iter().map(|s| held.key(s)).collect();
            let (pod, client) = (held.record.pod.clone(), key.client_id.clone());
            match &checked {
                Ok(v) if v.key() == key => self.offer(&mut inner, &key, &p.volume_id, &v.token),
                Ok(_) => warn!(
                    "republish volume {}: its attributes or service account changed; keeping those it was published with",
                    p.volume_id
                ),
                Err(e) => warn!("republish volume {}: {e}", p.volume_id),
            }
            (keys, pod, client)
        };
        let usable = |a: &Option<Result<Lease, ReadError>>| matches!(a, Some(Ok(lease)) if lease.valid_for > UNLINK_LEAD);
        let mut answers: Vec<_> = keys
            .iter()
            .map(|k| self.cache.read_now(k, Use::Read, Box::new(drop)))
            .collect();
        if checked.is_ok() && !answers.iter().any(usable) {
            // Nothing valid to keep the volume on: wait for the fetches (at most
            // --timeout), as a first publish does. A version about to expire is still
            // served while its refresh runs: the wait is for a usable one.
            let until = std::time::Instant::now() + self.timeout;
            for (answer, key) in answers.iter_mut().zip(&keys) {
                while !usable(answer) && std::time::Instant::now() < until {
                    *answer = Some(self.cache.read_blocking(key, Use::Read));
                    if !usable(answer) && !matches!(answer, Some(Err(_))) {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    } else {
                        break;
                    }
                }
            }
        }
        let mut inner = self.inner.lock();
        let held = inner.volumes.get_mut(&p.volume_id).ok_or_else(gone)?;
        let mut last_error = None;
        for (i, answer) in answers.into_iter().enumerate() {
            match answer {
                Some(Ok(lease)) if lease.valid_for > UNLINK_LEAD => {
                    let written = held.slots[i].written.as_ref().map(|w| w.id);
                    if written != Some(lease.version.id) {
                        if let Err(e) = held.write(i, lease.version, self.cache.meters()) {
                            warn!("volume {}: cannot write its files: {e}", p.volume_id);
                        }
                    }
                }
                Some(Err(e)) => last_error = Some(fetch_error(e, &pod, &client)),
                _ => {}
            }
        }
        let now = self.cache.now();
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
            (false, Err(e), _) | (false, Ok(_), Some(e)) => Err(e),
            (false, Ok(_), None) => Err(CsiError::Unavailable(format!(
                "no valid token held for {pod} yet: fetching"
            ))),
        }
    }

    /// Unmounts the pod's view and the volume's tmpfs, forgets the volume and its tokens
    /// (the key's tokens with its last volume; a resource's token with the key's last
    /// volume that names it). An unknown volume is success, once whatever of it a driver
    /// before left (its tmpfs, its record) is gone.
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
            return self.remove_unknown(volume_id, target);
        };
        self.operations.set_volumes(inner.volumes.len());
        let recorded = PathBuf::from(&held.record.target_path);
        for t in [target, recorded.as_path()] {
            if let Err(e) = volume::unmount(t) {
                inner.volumes.insert(volume_id.to_string(), held);
                self.operations.set_volumes(inner.volumes.len());
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
        let identity = held.identity;
        let keys = (held.slots.iter()).map(|slot| Key::new(identity, slot.wanted.resource.clone()));
        self.forget_unused(&inner, keys);
        self.leave_key(&mut inner, &held.record.key, volume_id);
        info!(
            "unpublish volume {volume_id}: {}, client {}",
            held.record.pod, held.record.key.client_id
        );
        Ok(())
    }

    /// An unpublish of a volume this driver does not hold: its tmpfs and record, if a
    /// driver before left them, go; the target is unmounted only where that tmpfs is bound.
    fn remove_unknown(&self, volume_id: &str, target: &Path) -> Result<(), CsiError> {
        let name = volume::data_name(volume_id);
        let data = self.data_dir.join(&name);
        if volume::same_mount(&data, target) {
            volume::unmount(target).map_err(|e| internal("cannot unmount the target path", e))?;
            volume::remove_target(target);
        }
        volume::remove_data(&data).map_err(|e| internal("cannot unmount its tmpfs", e))?;
        let _ = self.state.remove(&name);
        info!("unpublish volume {volume_id}: not published by this driver: nothing of it is left");
        Ok(())
    }
}

impl Node for Driver {
    fn publish(&self, p: Publish) -> Result<(), CsiError> {
        if self.inner.lock().volumes.contains_key(&p.volume_id) {
            let done = self.republish(&p);
            self.operations.count(Operation::Republish, &done);
            return done;
        }
        let done = match attrs::check(&p, self.default_tenant.as_deref(), &self.audience) {
            Ok(v) => self.first_publish(&p, v),
            Err(e) => {
                info!(
                    "publish volume {} refused: {}: {e}",
                    p.volume_id,
                    attrs::who(&p.volume_context)
                );
                Err(e)
            }
        };
        self.operations.count(Operation::Publish, &done);
        done
    }

    fn unpublish(&self, volume_id: &str, target_path: &str) -> Result<(), CsiError> {
        if volume_id.is_empty() || target_path.is_empty() {
            return Err(CsiError::InvalidArgument(
                "volume_id and target_path are required".into(),
            ));
        }
        let done = self.remove(volume_id, target_path);
        self.operations.count(Operation::Unpublish, &done);
        done
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}
