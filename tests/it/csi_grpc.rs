//! `cstokenfs csi`'s gRPC API on its unix socket, as the kubelet calls it: the Identity
//! service, node info and capabilities, UNIMPLEMENTED for the RPCs not served, the
//! socket's mode and life, and the command line (`--endpoint` is the socket, never a token
//! source). Publishing itself is the driver's suite.

use crate::common::csi::{
    publish_request, rfc3339, test_jwt, volume_context, Kubelet, Plugin, Pod, ServiceAccountToken,
    AUDIENCE, TOKENS_KEY,
};
use crate::common::{bin, stderr, wait_child};
use cstokenfs::csi_proto::v1 as pb;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::Code;

#[test]
fn identity_and_node_info_answer_as_a_node_only_plugin() {
    let plugin = Plugin::start(&[]);
    let kubelet = plugin.kubelet();
    let info = kubelet.plugin_info().unwrap();
    assert_eq!(info.name, "csi.cstokenfs.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    // No CONTROLLER_SERVICE: the kubelet then calls no controller RPC.
    assert!(kubelet
        .plugin_capabilities()
        .unwrap()
        .capabilities
        .is_empty());
    assert!(kubelet.probe().unwrap());
    let node = kubelet.node_info().unwrap();
    assert_eq!(
        (node.node_id.as_str(), node.max_volumes_per_node),
        ("node-1", 0)
    );
    assert!(node.accessible_topology.is_none());
    use pb::node_service_capability::{rpc, Type};
    let caps: Vec<_> = kubelet
        .node_capabilities()
        .unwrap()
        .capabilities
        .into_iter()
        .map(|c| match c.r#type {
            Some(Type::Rpc(r)) => r.r#type,
            other => panic!("not an RPC capability: {other:?}"),
        })
        .collect();
    assert_eq!(caps, vec![rpc::Type::VolumeMountGroup as i32]);
}

#[test]
fn rpcs_not_served_answer_unimplemented() {
    let plugin = Plugin::start(&[]);
    let kubelet = plugin.kubelet();
    for path in [
        "/csi.v1.Node/NodeStageVolume",
        "/csi.v1.Node/NodeUnstageVolume",
        "/csi.v1.Node/NodeGetVolumeStats",
        "/csi.v1.Node/NodeExpandVolume",
        "/csi.v1.Controller/CreateVolume",
        "/csi.v1.Controller/ControllerPublishVolume",
        "/csi.v1.SnapshotMetadata/GetMetadataAllocated",
    ] {
        assert_eq!(
            kubelet.call_unimplemented(path),
            Code::Unimplemented,
            "{path}"
        );
    }
}

#[test]
fn a_publish_or_unpublish_without_volume_id_or_target_is_invalid_argument() {
    let plugin = Plugin::start(&[]);
    let kubelet = plugin.kubelet();
    let target = plugin.dir.path().join("target");
    let pod = Pod::new("default", "app", "app-sa");
    let context = volume_context(&[], &pod, None);
    for (id, target) in [("", target.as_path()), ("vol-1", Path::new(""))] {
        let publish = kubelet.publish(publish_request(id, target, context.clone(), None));
        assert_eq!(publish.unwrap_err().code(), Code::InvalidArgument);
        let unpublish = kubelet.unpublish(id, target);
        assert_eq!(unpublish.unwrap_err().code(), Code::InvalidArgument);
    }
}

#[test]
fn the_socket_is_0600_and_removed_on_sigterm_with_exit_0() {
    let mut plugin = Plugin::start(&[]);
    let meta = std::fs::symlink_metadata(&plugin.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    let kubelet = plugin.kubelet();
    assert!(kubelet.probe().unwrap());
    drop(kubelet);
    let status = plugin.terminate();
    assert_eq!(status.code(), Some(0), "{}", plugin.log());
    assert!(!plugin.socket.exists(), "the socket is left behind");
}

#[test]
fn a_stale_socket_is_replaced_and_a_symlink_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let mut cmd = bin();
    cmd.args(["csi", "--node-id", "node-1", "--endpoint"])
        .arg(&socket);
    let plugin = Plugin::spawn(dir, socket, cmd, &[]);
    assert!(plugin.kubelet().probe().unwrap());

    let elsewhere = plugin.dir.path().join("elsewhere");
    std::fs::write(&elsewhere, "keep").unwrap();
    let link = plugin.dir.path().join("link.sock");
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    let mut second = bin();
    second
        .args(["csi", "--node-id", "n", "--endpoint"])
        .arg(&link)
        .arg("--state-dir")
        .arg(plugin.dir.path().join("state2"))
        .arg("--data-dir")
        .arg(plugin.dir.path().join("data2"));
    let out = second.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("link.sock"), "{}", stderr(&out));
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "keep");
}

#[test]
fn the_endpoint_and_node_id_come_from_flags_or_csi_endpoint_and_node_id_never_msi_endpoint() {
    // $CSI_ENDPOINT and $NODE_ID.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("env.sock");
    let mut cmd = bin();
    cmd.arg("csi")
        .env("CSI_ENDPOINT", format!("unix:{}", socket.display()))
        .env("NODE_ID", "node-from-env");
    let plugin = Plugin::spawn(dir, socket, cmd, &[]);
    assert_eq!(
        plugin.kubelet().node_info().unwrap().node_id,
        "node-from-env"
    );

    // $MSI_ENDPOINT is a token source of the other commands, not this socket.
    let msi = plugin.dir.path().join("msi.sock");
    let out = bin()
        .args(["csi", "--node-id", "n"])
        .env("MSI_ENDPOINT", format!("unix://{}", msi.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--endpoint"), "{}", stderr(&out));
    assert!(!msi.exists());

    for bad in ["tcp://127.0.0.1:10000", "csi.sock", "unix://csi/csi.sock"] {
        let out = bin()
            .args(["csi", "--node-id", "n", "--endpoint", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
    }
    let out = bin()
        .args(["csi", "--endpoint", "unix:///nonexistent/csi.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--node-id"), "{}", stderr(&out));

    let help = bin().args(["csi", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    for flag in [
        "--endpoint",
        "CSI_ENDPOINT",
        "--node-id",
        "NODE_ID",
        "--tenant-id",
        "--authority-host",
        "--ca-file",
        "--data-dir",
        "/var/lib/cstokenfs-csi/data",
        "--state-dir",
        "/var/lib/cstokenfs-csi/state",
        "--audience",
        AUDIENCE,
        "--refresh-margin",
        "--timeout",
        "--max-upstream-rate",
    ] {
        assert!(help.contains(flag), "csi --help lacks {flag}");
    }
}

#[test]
fn a_missing_socket_directory_is_a_failure_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("missing/csi.sock");
    let mut child = bin()
        .args(["csi", "--node-id", "n", "--endpoint"])
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path())
        .arg("--data-dir")
        .arg(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = wait_child(&mut child, Duration::from_secs(20));
    if status.is_none() {
        let _ = child.kill();
    }
    assert_eq!(status.and_then(|s| s.code()), Some(1));
}

/// The kubelet stand-in's own pieces: the volume context and the service-account token.
#[test]
fn the_kubelet_stand_in_sends_the_pod_info_and_a_token_of_the_pods_service_account() {
    let pod = Pod::new("ns", "web-0", "web");
    let token =
        ServiceAccountToken::new("https://issuer.example/", &pod, Duration::from_secs(3600));
    let context = volume_context(&[("clientID", "c")], &pod, Some(&token));
    assert_eq!(context["csi.storage.k8s.io/ephemeral"], "true");
    assert_eq!(context["csi.storage.k8s.io/pod.name"], "web-0");
    assert_eq!(context["csi.storage.k8s.io/pod.namespace"], "ns");
    assert_eq!(context["csi.storage.k8s.io/serviceAccount.name"], "web");
    assert_eq!(context["clientID"], "c");
    let tokens: serde_json::Value = serde_json::from_str(&context[TOKENS_KEY]).unwrap();
    assert_eq!(tokens[AUDIENCE]["token"], token.jwt.as_str());
    let claims = crate::common::claims(token.jwt.as_bytes());
    assert_eq!(claims["sub"], "system:serviceaccount:ns:web");
    assert_eq!(claims["iss"], "https://issuer.example/");
    assert_eq!(claims["aud"][0], AUDIENCE);
    assert!(token.jwt.ends_with(".sig"));
    let at = |secs: u64| UNIX_EPOCH + Duration::from_secs(secs);
    assert_eq!(rfc3339(at(0)), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(at(951_782_400 + 3661)), "2000-02-29T01:01:01Z");
    assert_eq!(rfc3339(at(1_796_444_400)), "2026-12-05T04:20:00Z");
    let jwt = test_jwt("i", "s", "a", SystemTime::now());
    assert_eq!(jwt.split('.').count(), 3);
}

#[test]
fn the_kubelet_stand_in_reaches_a_plugin_that_starts_after_it_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("late.sock");
    let waiting = {
        let socket = socket.clone();
        std::thread::spawn(move || Kubelet::connect(&socket).probe().unwrap())
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut cmd = bin();
    cmd.args(["csi", "--node-id", "n", "--endpoint"])
        .arg(&socket);
    let _plugin = Plugin::spawn(dir, socket, cmd, &[]);
    assert!(waiting.join().unwrap());
}
