//! cstokenfs: a read-only FUSE filesystem where `cat MOUNT/<resource>` prints a fresh,
//! cached Azure access token.
//!
//! Layers, each knowing only the ones below it:
//! `cli` -> `mount` (session, detach, signals) -> `fs` (inodes, views, errno; never does
//! HTTP) -> `cache` (single-flight fetches; decisions from `policy`) -> `source` (one file
//! per upstream) ; `emulator` is a stand-in upstream for demos and tests, served by
//! `httpserver` (hyper, loopback only).

pub mod audit;
pub mod cache;
pub mod civil;
pub mod claims;
pub mod cli;
pub mod emulator;
pub mod endpoint;
pub mod fs;
pub mod fuseopts;
pub mod hardening;
pub mod httpserver;
pub mod logging;
pub mod mount;
pub mod names;
pub mod policy;
pub mod sink;
pub mod source;
pub mod testing;
pub mod token;
