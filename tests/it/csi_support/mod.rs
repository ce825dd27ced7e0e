//! Plumbing for the CSI suite: a private mount namespace the driver lives in (kept by a
//! holder process, so a restarted driver finds its mounts again, and torn down with every
//! mount in it on drop), the driver process, service-account tokens the test makes, and
//! the volume context the kubelet sends. The kubelet's gRPC client is `common::csi`.
#![allow(dead_code)]

use crate::common::{self, csi::Kubelet};
use crate::entra_support::{entra_emulator, TENANT};
use cstokenfs::emulator::entra::{EntraSettings, Federated};
use cstokenfs::emulator::Emulator;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const ISSUER: &str = "https://oidc.example.invalid/cluster-1";
pub const AUDIENCE: &str = "api://AzureADTokenExchange";
pub const APP_A: &str = "aaaaaaaa-0000-4000-8000-00000000000a";
pub const APP_B: &str = "bbbbbbbb-0000-4000-8000-00000000000b";

/// Whether this test can run: root, `unshare` and `nsenter` (no cluster needed). Says so
/// loudly otherwise, and fails when `CI=true`.
pub fn available() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    let tools = common::have_tool(&["/usr/bin/unshare", "/bin/unshare"], "unshare")
        && common::have_tool(&["/usr/bin/nsenter", "/bin/nsenter"], "nsenter");
    if root && tools {
        return true;
    }
    let test = std::thread::current().name().unwrap_or("?").to_string();
    let msg = format!("SKIPPED {test}: the CSI tests need root, unshare and nsenter");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true makes this a failure)");
    }
    eprintln!("\n!!!!! {msg} !!!!!\n");
    false
}

/// A private mount namespace, held by a sleeping process; every mount made in it goes
/// when it is dropped.
pub struct Namespace {
    holder: Child,
}

impl Namespace {
    pub fn new() -> Namespace {
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sleep", "3600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare a mount namespace");
        let ns = Namespace { holder };
        // Entered once `sleep` runs in it (the namespace link differs from ours).
        let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        common::eventually(Duration::from_secs(10), || {
            let theirs = std::fs::read_link(ns.ns_path()).ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", ns.pid())).ok()?;
            (theirs != ours && comm.trim() == "sleep").then_some(())
        })
        .expect("the namespace holder runs");
        ns
    }

    pub fn pid(&self) -> u32 {
        self.holder.id()
    }

    fn ns_path(&self) -> String {
        format!("/proc/{}/ns/mnt", self.pid())
    }

    /// `path` as seen inside the namespace (through the holder's root).
    pub fn path(&self, path: &Path) -> PathBuf {
        let rel = path.strip_prefix("/").unwrap_or(path);
        PathBuf::from(format!("/proc/{}/root", self.pid())).join(rel)
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount={}", self.ns_path()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// The mount table inside the namespace.
    pub fn mounts(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/mountinfo", self.pid())).unwrap_or_default()
    }

    /// Whether something is mounted at `path` inside the namespace.
    pub fn is_mounted(&self, path: &Path) -> bool {
        let want = path.to_str().unwrap().replace(' ', "\\040");
        self.mounts()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A node: its namespace, directories, emulator and driver.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub ns: Namespace,
    pub emu: Emulator,
    pub driver: Option<Child>,
    pub socket: PathBuf,
    /// Every driver's stderr, appended.
    pub log: PathBuf,
    /// Extra driver flags (`--timeout 3`, ...).
    pub flags: Vec<String>,
}

impl Node {
    /// A node whose Entra emulator trusts `service accounts` (namespace, name) of APP_A's
    /// and APP_B's federated credentials.
    pub fn new(accounts: &[(&str, &str)]) -> Node {
        let mut federated = Vec::new();
        for client in [APP_A, APP_B] {
            for (ns, sa) in accounts {
                federated.push(Federated {
                    client_id: client.into(),
                    issuer: ISSUER.into(),
                    subject: format!("system:serviceaccount:{ns}:{sa}"),
                    audience: AUDIENCE.into(),
                });
            }
        }
        let settings = EntraSettings {
            tenant: Some(TENANT.into()),
            client_id: Some(format!("{APP_A},{APP_B}")),
            federated,
            ..EntraSettings::default()
        };
        let emu = entra_emulator(settings, None);
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("plugin/csi.sock");
        std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
        Node {
            log: dir.path().join("driver.log"),
            ns: Namespace::new(),
            dir,
            emu,
            driver: None,
            socket,
            flags: Vec::new(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts the driver in the namespace and waits for its socket to answer Probe.
    pub fn start(&mut self) -> Kubelet {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = self.ns.command(common::BIN);
        common::without_identity(&mut cmd);
        cmd.env("RUST_LOG", "debug")
            .args(["csi", "--endpoint"])
            .arg(format!("unix://{}", self.socket.display()))
            .args([
                "--node-id",
                "node-1",
                "--tenant-id",
                TENANT,
                "--authority-host",
            ])
            .arg(self.emu.url())
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(&self.flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.driver = Some(cmd.spawn().expect("start the driver"));
        let socket = self.socket.clone();
        let ready = common::eventually(Duration::from_secs(20), || {
            if !socket.exists() {
                return None;
            }
            let k = Kubelet::connect(&socket);
            k.probe().ok().filter(|ready| *ready).map(|_| k)
        });
        ready.unwrap_or_else(|| {
            panic!(
                "the driver never answered Probe; its log:\n{}",
                self.log_text()
            )
        })
    }

    /// Stops the driver (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.driver.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let ok = common::eventually(Duration::from_secs(15), || child.try_wait().ok()?);
            if ok.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A pod's target path (its parent made, as the kubelet makes it).
    pub fn target(&self, pod_uid: &str) -> PathBuf {
        let t = self.dir.path().join(format!(
            "pods/{pod_uid}/volumes/kubernetes.io~csi/tokens/mount"
        ));
        std::fs::create_dir_all(t.parent().unwrap()).unwrap();
        t
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.driver.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An unsigned service-account token as the kubelet's TokenRequest returns one (the
/// emulator checks claims, not signatures), unique by `marker`.
pub fn sa_token(namespace: &str, account: &str, exp: i64, marker: &str) -> String {
    use base64::Engine as _;
    let b64 = |s: String| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let claims = serde_json::json!({
        "aud": [AUDIENCE], "exp": exp, "iat": common::now_secs(), "iss": ISSUER,
        "sub": format!("system:serviceaccount:{namespace}:{account}"),
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": account}},
        "jti": marker,
    });
    format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(r#"{"alg":"RS256","kid":"k1"}"#.into()),
        b64(claims.to_string())
    )
}

/// SHA-256 of a token, hex (what the emulator records of each assertion).
pub fn digest(token: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// What the kubelet sends for a pod's csi volume.
#[derive(Clone)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub account: String,
    pub attributes: BTreeMap<String, String>,
    pub token: String,
}

impl Pod {
    pub fn new(namespace: &str, name: &str, account: &str, client: &str, resources: &str) -> Pod {
        let mut attributes = BTreeMap::new();
        attributes.insert("clientID".to_string(), client.to_string());
        attributes.insert("resources".to_string(), resources.to_string());
        Pod {
            namespace: namespace.into(),
            name: name.into(),
            uid: format!("uid-{namespace}-{name}"),
            account: account.into(),
            attributes,
            token: sa_token(namespace, account, common::now_secs() + 3600, name),
        }
    }

    /// A new service-account token (as the kubelet's next TokenRequest).
    pub fn renew_token(&mut self, marker: &str) {
        self.token = sa_token(
            &self.namespace,
            &self.account,
            common::now_secs() + 3600,
            marker,
        );
    }

    /// The volume context the kubelet sends (pod info, ephemeral, the tokens JSON).
    pub fn context(&self) -> BTreeMap<String, String> {
        let mut ctx = self.attributes.clone();
        for (k, v) in [
            ("csi.storage.k8s.io/pod.name", self.name.as_str()),
            ("csi.storage.k8s.io/pod.namespace", self.namespace.as_str()),
            ("csi.storage.k8s.io/pod.uid", self.uid.as_str()),
            (
                "csi.storage.k8s.io/serviceAccount.name",
                self.account.as_str(),
            ),
            ("csi.storage.k8s.io/ephemeral", "true"),
        ] {
            ctx.insert(k.into(), v.into());
        }
        ctx.insert(
            "csi.storage.k8s.io/serviceAccount.tokens".into(),
            tokens_json(&self.token),
        );
        ctx
    }
}

/// `{audience: {token, expirationTimestamp}}` as the kubelet writes it.
pub fn tokens_json(token: &str) -> String {
    serde_json::json!({AUDIENCE: {"token": token, "expirationTimestamp": "2099-01-01T00:00:00Z"}})
        .to_string()
}

/// The kubelet's NodePublishVolume for `pod`'s volume `id` at `target` (a mount volume,
/// read-only, SINGLE_NODE_WRITER as the kubelet sends for every inline volume).
pub fn request(pod: &Pod, id: &str, target: &Path) -> proto::NodePublishVolumeRequest {
    use proto::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    proto::NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.to_str().unwrap().into(),
        volume_capability: Some(proto::VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }),
        readonly: true,
        volume_context: pod.context().into_iter().collect(),
        ..Default::default()
    }
}

/// Publishes `pod`'s volume `id` at `target`.
pub fn publish(k: &Kubelet, pod: &Pod, id: &str, target: &Path) -> Result<(), tonic::Status> {
    k.publish(request(pod, id, target))
}

use cstokenfs::csi_proto::v1 as proto;
