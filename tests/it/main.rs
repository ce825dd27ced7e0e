//! The integration suites, one test binary (one compile and link, every suite's tests run
//! side by side): real mounts of the built binary against the emulator on 127.0.0.1, the
//! filesystem core without FUSE (`fs`), property tests (`props`). `common` mounts, polls
//! `.status`, runs the binary and other uids; `sink_support` and `entra_support` add what
//! their suites share.

#[macro_use]
mod common;
mod csi_support;
mod entra_support;
mod sink_support;
// The endpoint flood helper is compiled from the crate's own source (it is also a bench).
#[path = "../../src/httpserver/flood.rs"]
mod flood;

mod acr;
mod basics;
mod conventions;
mod csi;
mod csi_bench;
mod csi_grpc;
mod echo;
mod emulator_cli;
mod endpoint;
mod endpoint_sdk;
mod entra;
mod freshness;
mod fs;
mod hardening;
mod hostile;
mod identities;
mod imds;
mod integrations;
mod manifests;
mod metrics;
mod noopen;
mod package;
mod props;
mod security;
mod sink;
mod sink_race;
mod sources;
