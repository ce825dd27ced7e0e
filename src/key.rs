//! What the cache is keyed by: which identity asks for which resource (a leaf below
//! `cache` and `token`: a version carries its key). An identity owns its source (its own
//! credential and upstream client): the mount's own is `IdentityId::DEFAULT`, each
//! `--identity` follows, then any added at run time (the CSI driver's, one per pod's
//! workload identity); the cache, its single flight, negative cache, eviction and
//! `.status` are keyed by (identity, resource).

use crate::names::Resource;
use std::fmt;

/// An identity of the daemon: an index into its `Identities` (`cache/identities.rs`): the
/// fixed ones first, then those added at run time (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityId(u32);

impl IdentityId {
    /// The mount's own identity (the one `--source` and its flags describe); each
    /// `--identity` follows it.
    pub const DEFAULT: IdentityId = IdentityId(0);

    /// Its place among the daemon's identities.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The identity at `index` among the daemon's identities.
    pub fn at(index: usize) -> IdentityId {
        IdentityId(index as u32)
    }

    /// Whether this is the mount's own identity.
    pub fn is_default(self) -> bool {
        self == IdentityId::DEFAULT
    }
}

/// One cache entry's key: the resource as `identity` asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub identity: IdentityId,
    pub resource: Resource,
}

impl Key {
    pub fn new(identity: IdentityId, resource: Resource) -> Key {
        Key { identity, resource }
    }

    /// The key of each of `resources` for each of the first `identities` identities.
    pub fn all(identities: usize, resources: &[Resource]) -> Vec<Key> {
        (0..identities)
            .flat_map(|i| {
                resources
                    .iter()
                    .map(move |r| Key::new(IdentityId::at(i), r.clone()))
            })
            .collect()
    }
}

/// A key shown as its resource (`.status` lists resources per identity); log lines name a
/// declared identity's keys `id/NAME/<resource>` through `Cache::shown`.
impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.resource, f)
    }
}
