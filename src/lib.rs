//! cstokenfs: a read-only FUSE filesystem where `cat MOUNT/<resource>` prints a fresh,
//! cached Azure access token.
//!
//! Layers, each knowing only the ones below it:
//! `cli` -> the front ends, side by side: `mount` (the FUSE session over `fs`: inodes,
//! views, errno; never does HTTP), `sink` (files on tmpfs), `get` (one token), `endpoint`
//! (`--serve-endpoint`), `imds` (`--serve-imds`), `csi` (the Kubernetes CSI node plugin:
//! a tmpfs per pod's volume) -> `daemon` (the core they share: the cache and its background
//! pass, signals, detaching, the log file) -> `cache` (single-flight fetches; decisions
//! from `policy`) -> `source` (one file per upstream) and `acr` (container registry
//! credentials: which names are registries, the exchange over `source`'s HTTP client, and
//! the Docker credential helper, a front end that only reads a mount's files) ; `emulator` is a stand-in upstream
//! for demos and tests, served by `httpserver` (hyper, loopback only), which a front end
//! starts with `--emulator` (`stand_in`) and hands to the core as a URL in the plan. `net`
//! holds the loopback rules that `httpserver` and `source` share; `access` (owner and
//! modes), `writer` (token files through directory descriptors: the sink's and the CSI
//! volumes'), `report` (`.status`) and `mountinfo` (the mount table) are small types and
//! readers the front ends share.

mod access;
mod acr;
mod audit;
mod cache;
mod civil;
mod claims;
mod cli;
mod csi;
mod daemon;
pub mod emulator;
mod endpoint;
mod fs;
mod fuseopts;
mod get;
mod hardening;
mod httpserver;
mod imds;
mod key;
mod known;
mod logging;
mod metrics;
mod mount;
mod mountinfo;
mod names;
mod net;
mod policy;
mod report;
mod sink;
mod source;
mod stand_in;
pub mod testing;
mod token;
mod writer;

// The public API: what the binary runs and what the test suites drive. Everything else is
// private to the crate. `emulator` (a test tool) and `testing` (fakes) are public modules.
pub use access::Access;
pub use acr::helper::docker_helper_args;
pub use cache::Cache;
pub use cli::{run, Cli, CliError};
/// The CSI messages and gRPC clients, for the tests' kubelet stand-in.
pub use csi::proto as csi_proto;
pub use fs::{inode, Caller, Core, Entry, FsError};
pub use fuseopts::rewrite;
pub use httpserver::tls::server_config;
pub use policy::Policy;
pub use sink::LOCK_NAME;
pub use source::Kind;
pub use token::View;

/// The name and answer rules, for the property tests.
pub mod rules {
    pub use crate::names::{canonical_name, is_guid, resolve, well_known, NAME_MAX};
    pub use crate::source::parse::{days_from_civil, error_message, legacy_date, token};
    pub use crate::source::redact::redact;
    pub use crate::token::rfc3339;
}
