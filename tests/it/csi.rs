//! `cstokenfs csi`, driven as the kubelet drives it: a stand-in kubelet (`common::csi`)
//! calls the real gRPC socket of the built binary, which runs as root in a private mount
//! namespace and mounts for real; Entra is the emulator (`--protocol entra`) on 127.0.0.1,
//! trusting the test's service accounts through federated credentials.

use crate::common::csi::Kubelet;
use crate::common::{self, assert_no_token, claims, errno, eventually};
use crate::csi_support::*;
use cstokenfs::emulator::Fault;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::Code;

/// ARM as Entra's emulator names it (the token's `aud`, its request counts): the scope
/// without `/.default`.
const ARM_SCOPE: &str = "https://management.azure.com";

fn read(node: &Node, target: &Path, name: &str) -> Vec<u8> {
    std::fs::read(node.ns.path(target).join(name)).unwrap_or_default()
}

/// The files of a published volume as the pod sees them, read by a real process in the
/// namespace.
fn cat(node: &Node, path: &Path) -> Vec<u8> {
    let out = node.ns.command("cat").arg(path).output().expect("cat");
    assert!(
        out.status.success(),
        "cat {}: {:?}",
        path.display(),
        out.status
    );
    out.stdout
}

/// Starts the node's driver and publishes a volume `id` of pod shop/web-0 (service account
/// web, application A, ARM): the kubelet, the pod and its target path.
fn web_0_published(node: &mut Node, id: &str) -> (Kubelet, Pod, PathBuf) {
    let k = node.start();
    let pod = Pod::new("shop", "web-0", "web", APP_A, "management.azure.com");
    let target = node.target(&pod.uid);
    publish(&k, &pod, id, &target).expect("publish");
    (k, pod, target)
}

#[test]
fn a_pod_gets_its_own_identitys_tokens_read_only() {
    if !available() {
        return;
    }
    let mut node = Node::new(&[("shop", "web")]);
    let k = node.start();
    let pod = Pod::new(
        "shop",
        "web-0",
        "web",
        APP_A,
        "management.azure.com, vault.azure.net",
    );
    let target = node.target(&pod.uid);
    publish(&k, &pod, "csi-1", &target).expect("publish");
    let token = cat(&node, &target.join("management.azure.com"));
    assert!(!token.is_empty());
    assert_eq!(
        claims(&token)["appid"],
        APP_A,
        "acting as the pod's application"
    );
    assert_eq!(claims(&token)["aud"], ARM_SCOPE);
    for view in [".json/", ".header/", ".claims/", ""] {
        for name in ["management.azure.com", "vault.azure.net"] {
            let meta = std::fs::metadata(node.ns.path(&target).join(format!("{view}{name}")))
                .unwrap_or_else(|e| panic!("{view}{name}: {e}"));
            assert_eq!(meta.mode() & 0o7777, 0o444, "{view}{name}");
            assert_eq!(meta.uid(), 0);
        }
    }
    // The pod's view is read-only.
    let write = std::fs::write(node.ns.path(&target).join("x"), b"x");
    assert_eq!(errno(&write.expect_err("a write")), libc::EROFS);
    // Entra saw the pod's service-account token as the assertion for its application.
    let seen = node.emu.assertions_for(APP_A);
    assert_eq!(seen.len(), 2, "one request per resource");
    assert!(
        seen.iter().all(|d| *d == digest(&pod.token)),
        "the pod's token was the assertion"
    );
    // One audit line per publish, naming the pod, its account and the application.
    let log = node.log_text();
    assert!(
        log.contains(&format!(
            "publish volume csi-1: pod shop/web-0 serviceaccount web, client {APP_A}"
        )),
        "{log}"
    );
    assert_no_token(&log, pod.token.as_bytes(), "the driver's log");
    assert_no_token(&log, &token, "the driver's log");
    // Nor does its record.
    for record in std::fs::read_dir(node.state_dir()).unwrap() {
        let text = std::fs::read_to_string(record.unwrap().path()).unwrap();
        assert!(
            text.contains("system:serviceaccount:shop:web"),
            "a record names its key"
        );
        assert_no_token(&text, pod.token.as_bytes(), "a volume record");
        assert_no_token(&text, &token, "a volume record");
    }
}

#[test]
fn pods_of_one_service_account_share_and_others_never_do() {
    if !available() {
        return;
    }
    let mut node = Node::new(&[("shop", "web"), ("shop", "api")]);
    let k = node.start();
    let web0 = Pod::new("shop", "web-0", "web", APP_A, "management.azure.com");
    let web1 = Pod::new("shop", "web-1", "web", APP_A, "management.azure.com");
    let api0 = Pod::new("shop", "api-0", "api", APP_A, "management.azure.com");
    let (t0, t1, t2) = (
        node.target(&web0.uid),
        node.target(&web1.uid),
        node.target(&api0.uid),
    );
    publish(&k, &web0, "v-web-0", &t0).expect("web-0");
    publish(&k, &web1, "v-web-1", &t1).expect("web-1");
    publish(&k, &api0, "v-api-0", &t2).expect("api-0");
    assert_eq!(
        node.emu.requests_by(APP_A, ARM_SCOPE),
        2,
        "one per service account"
    );
    let (a, b, c) = (
        read(&node, &t0, "management.azure.com"),
        read(&node, &t1, "management.azure.com"),
        read(&node, &t2, "management.azure.com"),
    );
    common::assert_same_token(&a, &b, "two pods of one account");
    assert_ne!(
        common::serial(&a),
        common::serial(&c),
        "another account's token"
    );
    // Another application for the same account is another key.
    let web2 = Pod::new("shop", "web-2", "web", APP_B, "management.azure.com");
    let t3 = node.target(&web2.uid);
    publish(&k, &web2, "v-web-2", &t3).expect("web-2 as APP_B");
    assert_eq!(node.emu.requests_by(APP_B, ARM_SCOPE), 1);
    assert_eq!(
        claims(&read(&node, &t3, "management.azure.com"))["appid"],
        APP_B
    );
}

#[test]
fn tokens_are_refreshed_and_a_republish_brings_the_next_assertion() {
    if !available() {
        return;
    }
    let mut node = Node::new(&[("shop", "web")]);
    node.emu.set_ttl(8);
    let (k, mut pod, target) = web_0_published(&mut node, "csi-r");
    let first = read(&node, &target, "management.azure.com");
    let refreshed = eventually(Duration::from_secs(30), || {
        let now = read(&node, &target, "management.azure.com");
        (!now.is_empty() && common::serial(&now) != common::serial(&first)).then_some(now)
    });
    assert!(
        refreshed.is_some(),
        "refreshed before expiry; log:\n{}",
        node.log_text()
    );
    let mounts_before = node.ns.mounts().matches(target.to_str().unwrap()).count();
    // The kubelet's next TokenRequest, handed over by a republish.
    pod.renew_token("second");
    publish(&k, &pod, "csi-r", &target).expect("republish");
    assert_eq!(
        node.ns.mounts().matches(target.to_str().unwrap()).count(),
        mounts_before,
        "a republish never remounts"
    );
    let carried = eventually(Duration::from_secs(30), || {
        (node.emu.assertions_for(APP_A).last() == Some(&digest(&pod.token))).then_some(())
    });
    assert!(
        carried.is_some(),
        "the next refresh presents the newer service-account token"
    );
    assert!(node
        .log_text()
        .contains("republish volume csi-r: pod shop/web-0"));
}

#[test]
fn unpublish_unmounts_forgets_and_is_idempotent() {
    if !available() {
        return;
    }
    let mut node = Node::new(&[("shop", "web")]);
    let (k, pod, target) = web_0_published(&mut node, "csi-u");
    assert!(node.ns.is_mounted(&target));
    assert_eq!(
        std::fs::read_dir(node.state_dir()).unwrap().count(),
        1,
        "one record"
    );
    k.unpublish("csi-u", &target).expect("unpublish");
    assert!(!node.ns.is_mounted(&target), "the pod's view is gone");
    let data = node.data_dir();
    assert!(
        !node.ns.mounts().contains(data.to_str().unwrap()),
        "the tmpfs is gone"
    );
    assert_eq!(
        std::fs::read_dir(node.state_dir()).unwrap().count(),
        0,
        "the record is gone"
    );
    k.unpublish("csi-u", &target).expect("again: success");
    k.unpublish("never-published", &target)
        .expect("unknown: success");
    assert!(node
        .log_text()
        .contains("unpublish volume csi-u: pod shop/web-0"));
    // Its tokens were forgotten with its key: a new volume fetches anew.
    publish(&k, &pod, "csi-u2", &target).expect("publish again");
    assert_eq!(node.emu.requests_by(APP_A, ARM_SCOPE), 2);
}

#[test]
fn a_restarted_driver_adopts_its_volumes_and_resumes_at_the_next_republish() {
    if !available() {
        return;
    }
    let mut node = Node::new(&[("shop", "web")]);
    node.emu.set_ttl(20);
    let (k, mut pod, target) = web_0_published(&mut node, "csi-a");
    let before = read(&node, &target, "management.azure.com");
    drop(k);
    node.stop();
    // Files stay readable while no driver runs.
    common::assert_same_token(
        &read(&node, &target, "management.azure.com"),
        &before,
        "meanwhile",
    );
    let k = node.start();
    assert!(
        node.log_text().contains(&format!(
            "adopted volume csi-a: pod shop/web-0 serviceaccount web, client {APP_A}, 1 valid token(s) kept"
        )),
        "{}",
        node.log_text()
    );
    common::assert_same_token(
        &read(&node, &target, "management.azure.com"),
        &before,
        "adopted",
    );
    let requests = node.emu.requests();
    pod.renew_token("after-restart");
    publish(&k, &pod, "csi-a", &target).expect("republish after the restart");
    common::assert_same_token(
        &read(&node, &target, "management.azure.com"),
        &before,
        "republished",
    );
    assert_eq!(
        node.emu.requests(),
        requests,
        "the adopted token is served, not fetched again"
    );
    let resumed = eventually(Duration::from_secs(40), || {
        let now = read(&node, &target, "management.azure.com");
        (!now.is_empty() && common::serial(&now) != common::serial(&before)).then_some(())
    });
    assert!(
        resumed.is_some(),
        "refreshing resumed; log:\n{}",
        node.log_text()
    );
    assert_eq!(
        node.emu.assertions_for(APP_A).last(),
        Some(&digest(&pod.token))
    );
    k.unpublish("csi-a", &target).expect("unpublish");
    assert!(!node.ns.is_mounted(&target));
}

#[test]
fn requests_it_cannot_serve_are_refused_with_nothing_mounted() {
    if !available() {
        return;
    }
    let mut node = Node::new(&[("shop", "web")]);
    node.flags = vec!["--timeout".into(), "3".into()];
    let k = node.start();
    let pod = Pod::new("shop", "web-0", "web", APP_A, "management.azure.com");
    let target = node.target(&pod.uid);
    let refused = |req, want: Code, words: &str| {
        let e = k.publish(req).expect_err(words);
        assert_eq!(e.code(), want, "{words}: {}", e.message());
        assert!(
            e.message().contains(words),
            "{:?} should say {words:?}",
            e.message()
        );
        assert!(!node.ns.is_mounted(&target), "{words}: nothing mounted");
    };
    let mut r = request(&pod, "v", &target);
    r.volume_context
        .insert("csi.storage.k8s.io/ephemeral".into(), "false".into());
    refused(r, Code::InvalidArgument, "csi.storage.k8s.io/ephemeral");
    let mut r = request(&pod, "v", &target);
    r.readonly = false;
    refused(
        r,
        Code::InvalidArgument,
        "set readOnly: true on the csi volume",
    );
    let mut r = request(&pod, "v", &target);
    r.volume_context.remove("clientID");
    refused(r, Code::InvalidArgument, "clientID");
    let mut r = request(&pod, "v", &target);
    r.volume_context
        .insert("clientID".into(), "not-a-guid".into());
    refused(r, Code::InvalidArgument, "not a GUID");
    let mut r = request(&pod, "v", &target);
    r.volume_context.remove("resources");
    refused(r, Code::InvalidArgument, "resources");
    let mut r = request(&pod, "v", &target);
    r.volume_context.insert("fileMode".into(), "rw".into());
    refused(r, Code::InvalidArgument, "fileMode");
    let mut r = request(&pod, "v", &target);
    r.volume_context
        .remove("csi.storage.k8s.io/serviceAccount.tokens");
    refused(r, Code::InvalidArgument, "tokenRequests");
    // A service account Entra does not trust for this application: its AADSTS code.
    let stranger = Pod::new("shop", "x-0", "intruder", APP_A, "management.azure.com");
    refused(
        request(&stranger, "v", &target),
        Code::PermissionDenied,
        "AADSTS70021",
    );
    // A target whose directory is missing; a missing target itself is made.
    let orphan = node
        .dir
        .path()
        .join("pods/none/volumes/kubernetes.io~csi/tokens/mount");
    let e = k
        .publish(request(&pod, "v2", &orphan))
        .expect_err("no parent");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    publish(&k, &pod, "v", &target).expect("a missing target is made");
    assert!(node.ns.is_mounted(&target));
    // Entra unreachable at a first publish: UNAVAILABLE, nothing mounted.
    node.emu.set_fault(Some(Fault::Reset));
    let other = Pod::new("shop", "web-9", "web", APP_B, "management.azure.com");
    let t9 = node.target(&other.uid);
    let e = k.publish(request(&other, "v9", &t9)).expect_err("outage");
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(!node.ns.is_mounted(&t9));
    assert_eq!(
        std::fs::read_dir(node.state_dir()).unwrap().count(),
        1,
        "only v's record"
    );
    // Each refusal is an audit line naming the pod, its account and the application.
    let log = node.log_text();
    assert!(
        log.contains(&format!(
            "publish volume v refused: pod shop/web-0 serviceaccount web, client {APP_A}: "
        )),
        "{log}"
    );
}

#[test]
fn a_republish_during_an_entra_outage_succeeds_keeps_the_files_and_they_go_before_expiry() {
    if !available() {
        return;
    }
    let mut node = Node::new(&[("shop", "web")]);
    node.flags = vec!["--timeout".into(), "2".into()];
    node.emu.set_ttl(12);
    let (k, mut pod, target) = web_0_published(&mut node, "csi-o");
    let before = read(&node, &target, "management.azure.com");
    let json: serde_json::Value =
        serde_json::from_slice(&read(&node, &target, ".json/management.azure.com")).unwrap();
    let expires_on = json["expires_on"].as_i64().unwrap();
    node.emu.set_fault(Some(Fault::Reset));
    pod.renew_token("during-outage");
    publish(&k, &pod, "csi-o", &target).expect("a republish never fails while a token is held");
    common::assert_same_token(
        &read(&node, &target, "management.azure.com"),
        &before,
        "kept",
    );
    // No refresh comes: the files go before the token expires, never after.
    let gone = eventually(Duration::from_secs(20), || {
        let path = node.ns.path(&target).join("management.azure.com");
        (!path.exists()).then(common::now_secs)
    });
    let gone = gone.expect("the files of a token nobody refreshed are removed");
    assert!(gone < expires_on, "removed at {gone}, expiry {expires_on}");
    assert!(node.log_text().contains("no refreshed token in time"));
    // Entra back: a republish of a volume holding nothing waits for its fetch.
    node.emu.set_fault(None);
    pod.renew_token("after-outage");
    publish(&k, &pod, "csi-o", &target).expect("a republish fetches what the volume lacks");
    let again = read(&node, &target, "management.azure.com");
    assert!(!again.is_empty(), "the files are back at once");
    // The fetch that brought them may have been the sync pass's, started with the token
    // before; the next one presents the newest.
    let newest = eventually(Duration::from_secs(20), || {
        node.emu
            .assertions_for(APP_A)
            .contains(&digest(&pod.token))
            .then_some(())
    });
    assert!(
        newest.is_some(),
        "the newest service-account token is presented"
    );
}

#[test]
fn the_pods_fs_group_owns_the_files_unless_file_mode_says_otherwise() {
    if !available() {
        return;
    }
    let mut node = Node::new(&[("shop", "web")]);
    let k = node.start();
    let pod = Pod::new("shop", "web-0", "web", APP_A, "management.azure.com");
    let target = node.target(&pod.uid);
    let mut r = request(&pod, "csi-g", &target);
    if let Some(cap) = r.volume_capability.as_mut() {
        cap.access_type = Some(mount_with_group("2000"));
    }
    k.publish(r).expect("publish with an fsGroup");
    let seen = node.ns.path(&target);
    let file = std::fs::metadata(seen.join("management.azure.com")).unwrap();
    assert_eq!((file.gid(), file.mode() & 0o777), (2000, 0o440));
    let dir = std::fs::metadata(seen.join(".json")).unwrap();
    assert_eq!((dir.gid(), dir.mode() & 0o777), (2000, 0o550));
    let mut pod2 = Pod::new("shop", "web-1", "web", APP_A, "management.azure.com");
    pod2.attributes.insert("fileMode".into(), "0400".into());
    let t2 = node.target(&pod2.uid);
    let mut r = request(&pod2, "csi-g2", &t2);
    if let Some(cap) = r.volume_capability.as_mut() {
        cap.access_type = Some(mount_with_group("2000"));
    }
    k.publish(r).expect("publish with fileMode");
    let file = std::fs::metadata(node.ns.path(&t2).join("management.azure.com")).unwrap();
    assert_eq!(
        (file.gid(), file.mode() & 0o777),
        (2000, 0o400),
        "fileMode wins"
    );
}

fn mount_with_group(gid: &str) -> cstokenfs::csi_proto::v1::volume_capability::AccessType {
    use cstokenfs::csi_proto::v1::volume_capability::{AccessType, MountVolume};
    AccessType::Mount(MountVolume {
        volume_mount_group: gid.into(),
        ..MountVolume::default()
    })
}

#[test]
fn the_kubelets_secrets_come_before_the_volume_context() {
    if !available() {
        return;
    }
    let mut node = Node::new(&[("shop", "web"), ("kube-system", "admin")]);
    let k = node.start();
    let pod = Pod::new("shop", "web-0", "web", APP_A, "management.azure.com");
    let target = node.target(&pod.uid);
    // Kubernetes 1.35 with serviceAccountTokenInSecrets: the token is in the secrets.
    let mut r = request(&pod, "csi-s", &target);
    let key = "csi.storage.k8s.io/serviceAccount.tokens".to_string();
    r.volume_context.remove(&key);
    r.secrets.insert(key.clone(), tokens_json(&pod.token));
    // In both the secrets and the volume context, one is not the kubelet's (a pod's own
    // volumeAttributes or nodePublishSecretRef): refused.
    let forged = sa_token("kube-system", "admin", common::now_secs() + 3600, "forged");
    let mut both = r.clone();
    both.volume_context.insert(key, tokens_json(&forged));
    let e = k.publish(both).expect_err("a token in both");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    k.publish(r).expect("publish");
    assert_eq!(node.emu.assertions_for(APP_A), vec![digest(&pod.token)]);
    let log = node.log_text();
    assert_no_token(&log, pod.token.as_bytes(), "the driver's log");
    assert_no_token(&log, forged.as_bytes(), "the driver's log");
}

#[test]
fn metrics_count_publishes_and_name_no_token() {
    if !available() {
        return;
    }
    let Some(venv) = common::parser_venv() else {
        return;
    };
    let mut node = Node::new(&[("shop", "web")]);
    let port = common::free_port();
    node.flags = vec!["--metrics".into(), format!("127.0.0.1:{port}")];
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (k, pod, target) = web_0_published(&mut node, "csi-m1");
    assert_eq!(common::http(addr, "/healthz", None).status, 200);
    let ready = common::http(addr, "/readyz", None);
    assert_eq!(ready.status, 200, "{}", ready.body);
    // A republish, a refused publish, a second volume and its unpublish.
    publish(&k, &pod, "csi-m1", &target).expect("republish");
    let mut bad = request(&pod, "csi-bad", &target);
    bad.volume_context.remove("clientID");
    k.publish(bad).expect_err("no clientID");
    let other = node.target("uid-m2");
    publish(&k, &pod, "csi-m2", &other).expect("publish");
    k.unpublish("csi-m2", &other).expect("unpublish");
    // A volume of the same key naming a resource Entra refuses: refused, and the node
    // stays ready (the refused resource is not left declared).
    let mut refused_pod = Pod::new("shop", "web-0", "web", APP_A, "newservice.example.com");
    refused_pod.token = pod.token.clone();
    let third = node.target("uid-m3");
    let e = publish(&k, &refused_pod, "csi-m3", &third).expect_err("refused by Entra");
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    let ready = common::http(addr, "/readyz", None);
    assert_eq!(ready.status, 200, "{}", ready.body);
    let scraped = common::http(addr, "/metrics", None);
    common::promtool_check(&scraped.body);
    let s = common::Samples::parse(&venv, &scraped.body, false);
    common::assert_documented(&s);
    let op = |operation, result| {
        s.get(
            "cstokenfs_csi_operations_total",
            &[("operation", operation), ("result", result)],
        )
    };
    assert_eq!(op("publish", "ok"), Some(2.0));
    assert_eq!(op("publish", "invalid_argument"), Some(1.0));
    assert_eq!(op("publish", "permission_denied"), Some(1.0));
    assert_eq!(op("republish", "ok"), Some(1.0));
    assert_eq!(op("unpublish", "ok"), Some(1.0));
    assert_eq!(s.get("cstokenfs_csi_volumes", &[]), Some(1.0));
    assert!(
        s.get("cstokenfs_reads_total", &[("front_end", "csi_publish")])
            .unwrap()
            >= 2.0
    );
    // The pod's key, named by its namespace, account and application; its token's expiry.
    let identity = format!("shop/web/{APP_A}");
    let arm = [
        ("identity", identity.as_str()),
        ("resource", "https://management.azure.com/"),
    ];
    let token = cat(&node, &target.join("management.azure.com"));
    let exp = claims(&token)["exp"].as_f64().unwrap();
    let expiry = s
        .get("cstokenfs_token_expiry_timestamp_seconds", &arm)
        .unwrap_or_else(|| {
            let keys: Vec<_> = s
                .matching("cstokenfs_token_expiry_timestamp_seconds", &[])
                .map(|x| &x.labels)
                .collect();
            panic!("no expiry for {identity}: {keys:?}")
        });
    assert!((expiry - exp).abs() <= 1.0, "{expiry} vs {exp}");
    assert_eq!(
        s.get(
            "cstokenfs_upstream_requests_total",
            &[("identity", identity.as_str()), ("result", "ok")]
        ),
        Some(1.0)
    );
    // Never the service-account token, nor its subject as the token spells it.
    assert_no_token(&scraped.body, pod.token.as_bytes(), "a scrape");
    assert_no_token(&scraped.body, &token, "a scrape");
    assert!(!scraped.body.contains("system:serviceaccount"));
}
