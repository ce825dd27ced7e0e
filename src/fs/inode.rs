//! Inode numbers and the table of token versions the kernel knows about.
//!
//! Fixed inodes for the root, the view directories and `.status`; every token version gets
//! its own block of inodes (one per view), so each version has its own page cache and a
//! refresh never changes the bytes behind an inode.

use crate::cache::{IdentityId, Key};
use crate::policy::{self, Schedule, Verdict};
use crate::token::{Version, View};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, Weak};

pub const ROOT: u64 = 1;
pub const JSON_DIR: u64 = 2;
pub const HEADER_DIR: u64 = 3;
pub const STATUS: u64 = 4;
/// Shown by `readdir` for a declared resource whose token is not held yet.
pub const UNRESOLVED: u64 = 5;
pub const KUBECTL_DIR: u64 = 6;
pub const GIT_CREDENTIAL_DIR: u64 = 7;
/// `MOUNT/.env` (only with `--serve-endpoint`).
pub const ENV: u64 = 8;
pub const CLAIMS_DIR: u64 = 9;
/// `MOUNT/id` (only with `--identity`).
pub const ID_DIR: u64 = 10;
pub const KUBECTL_V1BETA1_DIR: u64 = 11;
/// `MOUNT/.acr` (registry credentials; `MOUNT/id/NAME/.acr` is in each identity's block).
pub const ACR_DIR: u64 = 12;
/// The slot of `.acr` in an identity's block of directory inodes (after the views').
const ACR_SLOT: u64 = 7;
/// `MOUNT/id/NAME/` and its view directories: a block of inodes per declared identity, far
/// above any version's (a version id would need 2^59 fetches to reach them).
const IDENTITY_DIRS: u64 = 1 << 62;
const FIRST_VERSION_INO: u64 = 16;
/// Room for views added later.
const INOS_PER_VERSION: u64 = 8;

/// What an inode number stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    Root,
    ViewDir(View),
    Status,
    Env,
    Token {
        version: u64,
        view: View,
    },
    /// `MOUNT/id`.
    Ids,
    /// `MOUNT/id/NAME/` (`View::Raw`) or one of its view directories.
    IdentityDir {
        identity: IdentityId,
        view: View,
    },
    /// `MOUNT/.acr` or `MOUNT/id/NAME/.acr`: registry credentials.
    AcrDir {
        identity: IdentityId,
    },
}

pub fn node(ino: u64) -> Option<Node> {
    match ino {
        ROOT => Some(Node::Root),
        JSON_DIR => Some(Node::ViewDir(View::Json)),
        HEADER_DIR => Some(Node::ViewDir(View::Header)),
        KUBECTL_DIR => Some(Node::ViewDir(View::Kubectl)),
        GIT_CREDENTIAL_DIR => Some(Node::ViewDir(View::GitCredential)),
        CLAIMS_DIR => Some(Node::ViewDir(View::Claims)),
        KUBECTL_V1BETA1_DIR => Some(Node::ViewDir(View::KubectlV1beta1)),
        ENV => Some(Node::Env),
        STATUS => Some(Node::Status),
        ID_DIR => Some(Node::Ids),
        ACR_DIR => Some(Node::AcrDir {
            identity: IdentityId::DEFAULT,
        }),
        _ if ino >= IDENTITY_DIRS => {
            let rel = ino - IDENTITY_DIRS;
            let identity = IdentityId::at(usize::try_from(rel / INOS_PER_VERSION).ok()?);
            if identity.is_default() {
                return None;
            }
            if rel % INOS_PER_VERSION == ACR_SLOT {
                return Some(Node::AcrDir { identity });
            }
            let view = View::ALL.get((rel % INOS_PER_VERSION) as usize).copied()?;
            Some(Node::IdentityDir { identity, view })
        }
        _ if ino >= FIRST_VERSION_INO => {
            let rel = ino - FIRST_VERSION_INO;
            let view = View::ALL.get((rel % INOS_PER_VERSION) as usize).copied()?;
            Some(Node::Token {
                version: rel / INOS_PER_VERSION,
                view,
            })
        }
        _ => None,
    }
}

pub fn token_ino(version: u64, view: View) -> u64 {
    FIRST_VERSION_INO + version * INOS_PER_VERSION + view as u64
}

pub fn view_dir_ino(view: View) -> u64 {
    match view {
        View::Raw => ROOT,
        View::Json => JSON_DIR,
        View::Header => HEADER_DIR,
        View::Kubectl => KUBECTL_DIR,
        View::GitCredential => GIT_CREDENTIAL_DIR,
        View::Claims => CLAIMS_DIR,
        View::KubectlV1beta1 => KUBECTL_V1BETA1_DIR,
    }
}

/// The directory of `view` for `identity`: the top's for the mount's own identity, else
/// under `MOUNT/id/NAME/`.
pub fn identity_dir_ino(identity: IdentityId, view: View) -> u64 {
    match identity.is_default() {
        true => view_dir_ino(view),
        false => IDENTITY_DIRS + identity.index() as u64 * INOS_PER_VERSION + view as u64,
    }
}

/// `.acr` of `identity`: the top's for the mount's own identity, else under `MOUNT/id/NAME/`.
pub fn acr_dir_ino(identity: IdentityId) -> u64 {
    match identity.is_default() {
        true => ACR_DIR,
        false => IDENTITY_DIRS + identity.index() as u64 * INOS_PER_VERSION + ACR_SLOT,
    }
}

/// Names a version keeps for `inval_entry` (`--no-open`); more aliases of one resource than
/// this are left to their entry timeout (at most a second).
const MAX_NAMES: usize = 8;

/// What the kernel may ask of a version after its token is gone: its sizes and times stay
/// answerable, its bytes do not (only open handles keep those alive, or the pin).
pub struct Known {
    pub version: Weak<Version>,
    /// `--no-open`: no handle keeps the bytes of a version an fd still reads, so the table
    /// does, until the kernel forgets the version or it expires.
    pin: Option<Arc<Version>>,
    /// `--no-open`: the (directory inode, name) pairs the kernel looked this version up by.
    names: Vec<(u64, String)>,
    pub key: Key,
    pub sizes: [u64; View::ALL.len()],
    pub mtime_ms: i64,
    /// The version's schedule (a copy: the version itself may be gone).
    pub schedule: Schedule,
    /// The kernel's lookups not yet forgotten (FORGET counts them down).
    lookups: u64,
    /// The kernel was told to drop its cached pages of this expired version.
    invalidated: bool,
}

impl Known {
    /// The version itself, while something holds its bytes (a handle, the cache, or in
    /// `--no-open` mode the table's pin).
    pub fn bytes(&self) -> Option<Arc<Version>> {
        self.pin.clone().or_else(|| self.version.upgrade())
    }
}

/// Versions the kernel holds lookups on, by version id; dropped when the kernel forgets.
#[derive(Default)]
pub struct InodeTable {
    /// The table's one lock, a leaf: let go of it before asking the cache.
    known: Mutex<HashMap<u64, Known>>,
}

impl InodeTable {
    /// Counts one kernel lookup of `v`.
    pub fn remember(&self, v: &Arc<Version>) {
        self.remember_as(v, None);
    }

    /// `remember`, and with `--no-open` (`pinned`: `Some((parent, name))`) pins the
    /// version and keeps the name it was looked up by.
    pub fn remember_as(&self, v: &Arc<Version>, pinned: Option<(u64, &str)>) {
        let mut known = self.known.lock();
        let k = known.entry(v.id).or_insert_with(|| Known {
            version: Arc::downgrade(v),
            pin: None,
            names: Vec::new(),
            key: v.key.clone(),
            sizes: View::ALL.map(|view| v.bytes(view).len() as u64),
            mtime_ms: v.fetched_at,
            schedule: v.schedule,
            lookups: 0,
            invalidated: false,
        });
        k.lookups += 1;
        if let Some((parent, name)) = pinned {
            if !k.invalidated && k.pin.is_none() {
                k.pin = Some(v.clone());
            }
            let known_name = k.names.iter().any(|(p, n)| *p == parent && n == name);
            if !known_name && k.names.len() < MAX_NAMES {
                k.names.push((parent, name.to_string()));
            }
        }
    }

    /// The version's bytes, if anything still holds them (the pin, a handle, the cache).
    pub fn version(&self, version: u64) -> Option<Arc<Version>> {
        self.known.lock().get(&version).and_then(Known::bytes)
    }

    /// The names the kernel looked up versions `ids` by (every version when `None`).
    pub fn names(&self, ids: Option<&[u64]>) -> Vec<(u64, String)> {
        let known = self.known.lock();
        let mut out: Vec<(u64, String)> = match ids {
            None => known.values().flat_map(|k| k.names.clone()).collect(),
            Some(ids) => ids
                .iter()
                .filter_map(|id| known.get(id))
                .flat_map(|k| k.names.clone())
                .collect(),
        };
        out.sort();
        out.dedup();
        out
    }

    /// Whether the kernel holds a name for some version of `key`.
    pub fn holds(&self, key: &Key) -> bool {
        self.known.lock().values().any(|k| k.key == *key)
    }

    /// The kernel dropped `n` lookups of an inode of `version`; `true` when it holds none
    /// of that version any more.
    pub fn forget(&self, version: u64, n: u64) -> bool {
        let mut known = self.known.lock();
        let Some(k) = known.get_mut(&version) else {
            return true;
        };
        k.lookups = k.lookups.saturating_sub(n);
        if k.lookups == 0 {
            known.remove(&version);
            // A flood of versions must not pin the table's peak size.
            if known.capacity() > 4 * known.len().max(16) {
                known.shrink_to_fit();
            }
            return true;
        }
        false
    }

    pub fn with<T>(&self, version: u64, f: impl FnOnce(&Known) -> T) -> Option<T> {
        self.known.lock().get(&version).map(f)
    }

    /// Every version the kernel may hold inodes (and cached pages) of.
    pub fn ids(&self) -> Vec<u64> {
        self.known.lock().keys().copied().collect()
    }

    /// Versions expired by `now` whose pages the kernel may still cache; marks them done.
    /// Also returns the earliest expiry still ahead.
    pub fn newly_expired(&self, now: i64) -> (Vec<u64>, Option<i64>) {
        let mut known = self.known.lock();
        let mut expired = Vec::new();
        let mut next = None::<i64>;
        for (id, k) in known.iter_mut().filter(|(_, k)| !k.invalidated) {
            if policy::verdict(now, &k.schedule, true) == Verdict::Expired {
                k.invalidated = true;
                // Never served again: let the bytes go (and be wiped).
                k.pin = None;
                expired.push(*id);
            } else {
                let until = k.schedule.valid_until;
                next = Some(next.map_or(until, |n: i64| n.min(until)));
            }
        }
        (expired, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers_round_trip() {
        for id in [0, 1, 7, 1 << 58] {
            for view in View::ALL {
                assert_eq!(
                    node(token_ino(id, view)),
                    Some(Node::Token { version: id, view })
                );
            }
        }
        assert_eq!(node(ROOT), Some(Node::Root));
        assert_eq!(node(STATUS), Some(Node::Status));
        assert_eq!(node(UNRESOLVED), None);
        assert_eq!(node(token_ino(3, View::Raw) + 7), None);
        for view in View::ALL {
            assert!(node(view_dir_ino(view)).is_some());
            for i in [1, 2, 1000] {
                let identity = IdentityId::at(i);
                assert_eq!(
                    node(identity_dir_ino(identity, view)),
                    Some(Node::IdentityDir { identity, view })
                );
            }
            assert_eq!(
                identity_dir_ino(IdentityId::DEFAULT, view),
                view_dir_ino(view)
            );
        }
        assert_eq!(node(ID_DIR), Some(Node::Ids));
        for i in [0, 1, 2, 1000] {
            let identity = IdentityId::at(i);
            assert_eq!(node(acr_dir_ino(identity)), Some(Node::AcrDir { identity }));
        }
    }
}
