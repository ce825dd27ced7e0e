//! Generates the CSI messages (prost) and the Identity and Node services (tonic server and
//! client) from `proto/csi.proto`, parsed by protox: no protoc is needed.

use std::process::ExitCode;

const PROTO: &str = "proto/csi.proto";

fn main() -> ExitCode {
    println!("cargo:rerun-if-changed={PROTO}");
    println!("cargo:rerun-if-changed=build.rs");
    // `google/protobuf/wrappers.proto` (Probe's BoolValue) is built into protox.
    let fds = match protox::compile([PROTO], ["proto"]) {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("{PROTO}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let generated = tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // The client is generic over its transport; no `connect(url)` over TCP.
        .build_transport(false)
        // Its secrets and volume context hold the pod's service-account token
        // (CVE-2023-2878): `Debug` is written by hand in src/csi/proto.rs.
        .skip_debug([".csi.v1.NodePublishVolumeRequest"])
        // Maps as BTreeMap, as `csi::Publish` holds them.
        .btree_map(".")
        .compile_fds(fds);
    if let Err(e) = generated {
        eprintln!("{PROTO}: code generation failed: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
