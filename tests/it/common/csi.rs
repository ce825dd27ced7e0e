//! A stand-in for the kubelet's CSI client: calls the plugin's unix socket with the
//! generated gRPC clients (sync methods over a runtime of its own), and builds the volume
//! context and service-account token a kubelet sends with a publish.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use cstokenfs::csi_proto::v1 as pb;
use pb::identity_client::IdentityClient;
use pb::node_client::NodeClient;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// The key of the service-account tokens in the volume context (or, since Kubernetes 1.35
/// with `serviceAccountTokenInSecrets`, in the secrets).
pub const TOKENS_KEY: &str = "csi.storage.k8s.io/serviceAccount.tokens";
/// The audience the CSIDriver's `tokenRequests` asks for.
pub const AUDIENCE: &str = "api://AzureADTokenExchange";

/// A connection to the plugin's socket, as the kubelet holds one.
pub struct Kubelet {
    rt: tokio::runtime::Runtime,
    channel: Channel,
    pub socket: PathBuf,
}

impl Kubelet {
    /// Connects to `socket`, waiting up to 10 s for the plugin to listen.
    pub fn connect(socket: &Path) -> Kubelet {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let path = socket.to_owned();
            let connector = tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            });
            // The URI is not used: the connector dials the socket.
            let endpoint = Endpoint::from_static("http://csi.invalid");
            match rt.block_on(endpoint.connect_with_connector(connector)) {
                Ok(channel) => {
                    return Kubelet {
                        rt,
                        channel,
                        socket: socket.to_owned(),
                    }
                }
                Err(e) if Instant::now() > deadline => {
                    panic!("cannot connect to {}: {e}", socket.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    pub fn plugin_info(&self) -> Result<pb::GetPluginInfoResponse, Status> {
        let mut client = self.identity();
        let call = client.get_plugin_info(pb::GetPluginInfoRequest {});
        self.rt.block_on(call).map(|r| r.into_inner())
    }

    pub fn plugin_capabilities(&self) -> Result<pb::GetPluginCapabilitiesResponse, Status> {
        let mut client = self.identity();
        let call = client.get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {});
        self.rt.block_on(call).map(|r| r.into_inner())
    }

    /// `Probe`'s `ready` (unset counts as ready, as the spec says).
    pub fn probe(&self) -> Result<bool, Status> {
        let mut client = self.identity();
        let call = client.probe(pb::ProbeRequest {});
        self.rt
            .block_on(call)
            .map(|r| r.into_inner().ready.unwrap_or(true))
    }

    pub fn node_info(&self) -> Result<pb::NodeGetInfoResponse, Status> {
        let mut client = self.node();
        let call = client.node_get_info(pb::NodeGetInfoRequest {});
        self.rt.block_on(call).map(|r| r.into_inner())
    }

    pub fn node_capabilities(&self) -> Result<pb::NodeGetCapabilitiesResponse, Status> {
        let mut client = self.node();
        let call = client.node_get_capabilities(pb::NodeGetCapabilitiesRequest {});
        self.rt.block_on(call).map(|r| r.into_inner())
    }

    pub fn publish(&self, request: pb::NodePublishVolumeRequest) -> Result<(), Status> {
        let mut client = self.node();
        let call = client.node_publish_volume(request);
        self.rt.block_on(call).map(|_| ())
    }

    pub fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), Status> {
        let mut client = self.node();
        let call = client.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            target_path: target.to_string_lossy().into_owned(),
        });
        self.rt.block_on(call).map(|_| ())
    }

    /// A unary call of an empty message to `path` (such as
    /// `/csi.v1.Node/NodeStageVolume`): the status code it answers.
    pub fn call_unimplemented(&self, path: &'static str) -> Code {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        self.rt.block_on(async {
            if let Err(e) = grpc.ready().await {
                panic!("the channel is not ready: {e}");
            }
            let codec = tonic_prost::ProstCodec::<(), ()>::default();
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
            match grpc.unary(tonic::Request::new(()), path, codec).await {
                Ok(_) => Code::Ok,
                Err(s) => s.code(),
            }
        })
    }
}

/// The pod a volume belongs to, as the kubelet describes it (`podInfoOnMount`).
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub service_account: String,
}

impl Pod {
    pub fn new(namespace: &str, name: &str, service_account: &str) -> Pod {
        Pod {
            name: name.into(),
            namespace: namespace.into(),
            uid: format!("{namespace}-{name}-0000-0000-000000000000"),
            service_account: service_account.into(),
        }
    }

    /// `system:serviceaccount:NS:SA`, the service-account token's subject.
    pub fn subject(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

/// The volume context the kubelet sends for an ephemeral inline volume: the pod's
/// `volumeAttributes`, the pod info, `ephemeral: "true"` and, when `token` is given, the
/// service-account tokens (`{AUDIENCE: {token, expirationTimestamp}}`).
pub fn volume_context(
    attributes: &[(&str, &str)],
    pod: &Pod,
    token: Option<&ServiceAccountToken>,
) -> BTreeMap<String, String> {
    let mut context: BTreeMap<String, String> = attributes
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (k, v) in [
        ("csi.storage.k8s.io/pod.name", &pod.name),
        ("csi.storage.k8s.io/pod.namespace", &pod.namespace),
        ("csi.storage.k8s.io/pod.uid", &pod.uid),
        (
            "csi.storage.k8s.io/serviceAccount.name",
            &pod.service_account,
        ),
    ] {
        context.insert(k.into(), v.clone());
    }
    context.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    if let Some(token) = token {
        context.insert(TOKENS_KEY.into(), token.tokens_json());
    }
    context
}

/// A publish request for an inline volume at `target`: read-only, a mount capability with
/// the kubelet's SINGLE_NODE_WRITER, `group` as the volume mount group when given.
pub fn publish_request(
    volume_id: &str,
    target: &Path,
    context: BTreeMap<String, String>,
    group: Option<&str>,
) -> pb::NodePublishVolumeRequest {
    use pb::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    pb::NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.to_string_lossy().into_owned(),
        volume_capability: Some(pb::VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: String::new(),
                mount_flags: Vec::new(),
                volume_mount_group: group.unwrap_or_default().into(),
            })),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }),
        readonly: true,
        volume_context: context,
        ..Default::default()
    }
}

/// An unsigned service-account token as the kubelet hands it over: a JWT with `iss`, `sub`,
/// `aud` and `exp`, and when it expires.
#[derive(Debug, Clone)]
pub struct ServiceAccountToken {
    pub jwt: String,
    pub expires: SystemTime,
}

impl ServiceAccountToken {
    /// A token of `pod`'s service account from `issuer`, for [`AUDIENCE`], valid `ttl`.
    pub fn new(issuer: &str, pod: &Pod, ttl: Duration) -> ServiceAccountToken {
        let expires = SystemTime::now() + ttl;
        ServiceAccountToken {
            jwt: test_jwt(issuer, &pod.subject(), AUDIENCE, expires),
            expires,
        }
    }

    /// The JSON of the service-account tokens key: `{AUDIENCE: {token, expirationTimestamp}}`.
    pub fn tokens_json(&self) -> String {
        serde_json::json!({
            AUDIENCE: {
                "token": self.jwt,
                "expirationTimestamp": rfc3339(self.expires),
            }
        })
        .to_string()
    }
}

/// An unsigned JWT (`alg: none` header, base64url JSON, signature part `sig`).
pub fn test_jwt(issuer: &str, subject: &str, audience: &str, expires: SystemTime) -> String {
    let exp = expires
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": "test"});
    let claims = serde_json::json!({
        "iss": issuer, "sub": subject, "aud": [audience], "exp": exp, "iat": iat, "nbf": iat,
    });
    format!(
        "{}.{}.sig",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// `2026-12-05T06:40:00Z`, as Kubernetes writes `expirationTimestamp` (the crate's own
/// formatter, which the `.kubectl` view uses).
pub fn rfc3339(t: SystemTime) -> String {
    let ms = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as i64;
    cstokenfs::rules::rfc3339(ms)
}

/// `cstokenfs csi` running on a socket in a temporary directory, with its data and state
/// directories beside it; stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Plugin {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub child: std::process::Child,
    stderr: PathBuf,
}

impl Plugin {
    /// Starts `cstokenfs csi --endpoint unix://DIR/csi.sock --node-id node-1` with `extra`
    /// arguments and waits for the socket.
    pub fn start(extra: &[&str]) -> Plugin {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let socket = dir.path().join("csi.sock");
        let endpoint = format!("unix://{}", socket.display());
        let mut cmd = super::bin();
        cmd.args(["csi", "--endpoint", &endpoint, "--node-id", "node-1"]);
        Plugin::spawn(dir, socket, cmd, extra)
    }

    /// Starts `cmd` (a `csi` command line whose socket is `socket`) with the data and state
    /// directories in `dir`, a tenant, an Entra authority where nothing listens, then
    /// `extra` (a flag repeated there wins: `--authority-host EMULATOR_URL`).
    pub fn spawn(
        dir: tempfile::TempDir,
        socket: PathBuf,
        mut cmd: std::process::Command,
        extra: &[&str],
    ) -> Plugin {
        let (data, state) = (dir.path().join("data"), dir.path().join("state"));
        for d in [&data, &state] {
            std::fs::create_dir(d).expect("create a directory");
        }
        let stderr = dir.path().join("stderr");
        let log = std::fs::File::create(&stderr).expect("create the log");
        let authority = format!("http://127.0.0.1:{}/", super::free_port());
        cmd.arg("--data-dir")
            .arg(&data)
            .arg("--state-dir")
            .arg(&state)
            .args(["--tenant-id", "00000000-0000-0000-0000-00000000000a"])
            .args(["--authority-host", &authority])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(log);
        let child = cmd.spawn().expect("start cstokenfs csi");
        let mut plugin = Plugin {
            dir,
            socket,
            child,
            stderr,
        };
        let up = super::eventually(Duration::from_secs(10), || {
            if let Ok(Some(status)) = plugin.child.try_wait() {
                panic!("csi exited with {status}: {}", plugin.log());
            }
            std::os::unix::net::UnixStream::connect(&plugin.socket)
                .ok()
                .map(|_| ())
        });
        assert!(up.is_some(), "csi never listened: {}", plugin.log());
        plugin
    }

    pub fn kubelet(&self) -> Kubelet {
        Kubelet::connect(&self.socket)
    }

    /// What the plugin logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGTERM, then its exit status (SIGKILL after 20 s).
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        match super::wait_child(&mut self.child, Duration::from_secs(20)) {
            Some(status) => status,
            None => {
                let _ = self.child.kill();
                panic!("csi did not stop on SIGTERM: {}", self.log());
            }
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            if super::wait_child(&mut self.child, Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}
