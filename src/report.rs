//! `.status`, as every front end writes it (the mount's file, the sink's): the cache's
//! part, the daemon's own fields and whatever else the front end adds, serialized from
//! types (never token bytes).

use crate::cache::Status;
use serde::Serialize;

/// One `.status` document.
#[derive(Serialize)]
pub struct Report<'a, E: Serialize> {
    #[serde(flatten)]
    pub cache: &'a Status,
    /// Whether the daemon is dumpable (false: no core files, no ptrace by the same uid).
    pub dumpable: bool,
    pub pid: u32,
    /// Why this upstream was chosen.
    pub source_reason: &'a str,
    /// More top-level fields (the local endpoint, the sink's files).
    #[serde(flatten)]
    pub extra: E,
}

impl<'a, E: Serialize> Report<'a, E> {
    pub fn new(cache: &'a Status, source_reason: &'a str, extra: E) -> Report<'a, E> {
        Report {
            cache,
            dumpable: crate::hardening::is_dumpable(),
            pid: std::process::id(),
            source_reason,
            extra,
        }
    }

    /// Pretty JSON and a newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing these types (strings, numbers, maps with string keys) cannot fail.
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }
}
