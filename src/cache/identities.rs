//! The daemon's identities: each owns the source (credential and upstream client) its
//! tokens come from.

use crate::key::IdentityId;
use crate::source::Source;
use std::sync::Arc;

/// The daemon's identities, each with the source it fetches its tokens from. The cache's
/// background pass and fetch pool serve every identity (no thread per identity); the
/// upstream rate limit and known-down state stay per upstream (`upstream.rs`: one per cache
/// today, as every identity of a daemon asks the same endpoint).
pub struct Identities {
    /// By `IdentityId`: index 0 is the default identity.
    sources: Vec<Arc<dyn Source>>,
}

impl Identities {
    /// One identity, the default, fetching from `source`.
    pub fn one(source: Arc<dyn Source>) -> Identities {
        Identities {
            sources: vec![source],
        }
    }

    /// The source of `identity` (`None`: not an identity of this daemon).
    pub fn source(&self, identity: IdentityId) -> Option<&Arc<dyn Source>> {
        self.sources.get(identity.index())
    }

    /// The default identity's source (what `.status` describes).
    pub fn default_source(&self) -> &dyn Source {
        &*self.sources[0]
    }
}
