//! The gRPC layer against a fake driver: what each RPC answers, the UNIMPLEMENTED ones,
//! the error codes, and the socket's mode, replacement and refusals.

use super::*;
use crate::csi::proto::v1::identity_client::IdentityClient;
use crate::csi::proto::v1::node_client::NodeClient;
use crate::csi::proto::v1::{self as pb};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// What the fake driver saw of a publish (never a secret's value).
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    volume_id: String,
    target_path: String,
    readonly: bool,
    capability: Capability,
    context: BTreeMap<String, String>,
    secrets: BTreeMap<String, String>,
}

/// Records publishes; a volume ID `fail-N` fails with the Nth error of [`errors`].
#[derive(Default)]
struct Fake {
    published: Mutex<Vec<Seen>>,
    unpublished: Mutex<Vec<(String, String)>>,
    unready: AtomicBool,
}

fn errors() -> Vec<(CsiError, Code)> {
    vec![
        (
            CsiError::InvalidArgument("bad".into()),
            Code::InvalidArgument,
        ),
        (
            CsiError::PermissionDenied("AADSTS700016".into()),
            Code::PermissionDenied,
        ),
        (CsiError::Unavailable("down".into()), Code::Unavailable),
        (
            CsiError::FailedPrecondition("target".into()),
            Code::FailedPrecondition,
        ),
        (CsiError::Internal("oops".into()), Code::Internal),
        (CsiError::Usage("usage".into()), Code::Internal),
        (CsiError::Start("start".into()), Code::Internal),
    ]
}

fn outcome(volume_id: &str) -> Result<(), CsiError> {
    match volume_id.strip_prefix("fail-") {
        Some(n) => Err(errors()[n.parse::<usize>().unwrap()].0.clone()),
        None => Ok(()),
    }
}

impl Node for Fake {
    fn publish(&self, r: Publish) -> Result<(), CsiError> {
        self.published.lock().push(Seen {
            volume_id: r.volume_id.clone(),
            target_path: r.target_path.clone(),
            readonly: r.readonly,
            capability: r.capability.clone(),
            context: r.volume_context.clone(),
            secrets: r
                .secrets
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string()))
                .collect(),
        });
        outcome(&r.volume_id)
    }
    fn unpublish(&self, volume_id: &str, target_path: &str) -> Result<(), CsiError> {
        self.unpublished
            .lock()
            .push((volume_id.into(), target_path.into()));
        outcome(volume_id)
    }
    fn ready(&self) -> bool {
        !self.unready.load(Ordering::SeqCst)
    }
}

/// `serve` on a thread, on a socket in a temporary directory.
struct Server {
    dir: tempfile::TempDir,
    socket: PathBuf,
    fake: Arc<Fake>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), CsiError>>>,
}

impl Server {
    fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("csi.sock");
        Server::start_at(dir, socket).unwrap()
    }

    fn start_at(dir: tempfile::TempDir, socket: PathBuf) -> Result<Server, CsiError> {
        let fake = Arc::new(Fake::default());
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (node, path) = (fake.clone() as Arc<dyn Node>, socket.clone());
        let thread =
            std::thread::spawn(move || serve(&path, node, "node-1".into(), stopped, || ()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if thread.is_finished() {
                return Err(thread.join().unwrap().unwrap_err());
            }
            assert!(Instant::now() < deadline, "the socket never came up");
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Server {
            dir,
            socket,
            fake,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the server and returns what `serve` returned.
    fn stop(&mut self) -> Result<(), CsiError> {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap()
    }

    fn client(&self) -> Client {
        Client::connect(&self.socket)
    }
}

/// A gRPC client over the unix socket, with a runtime of its own.
struct Client {
    rt: tokio::runtime::Runtime,
    channel: Channel,
}

impl Client {
    fn connect(socket: &Path) -> Client {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let path = socket.to_owned();
        let channel = rt
            .block_on(
                Endpoint::from_static("http://csi.invalid").connect_with_connector(
                    tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }),
                ),
            )
            .unwrap();
        Client { rt, channel }
    }

    fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    fn publish(&self, r: pb::NodePublishVolumeRequest) -> Result<(), Status> {
        self.rt
            .block_on(self.node().node_publish_volume(r))
            .map(|_| ())
    }

    fn unpublish(&self, volume_id: &str, target_path: &str) -> Result<(), Status> {
        let r = pb::NodeUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            target_path: target_path.into(),
        };
        self.rt
            .block_on(self.node().node_unpublish_volume(r))
            .map(|_| ())
    }

    /// A unary call of an empty message to `path`: its status code.
    fn call(&self, path: &'static str) -> Code {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        self.rt.block_on(async {
            grpc.ready().await.unwrap();
            let codec = tonic_prost::ProstCodec::<(), ()>::default();
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
            match grpc.unary(Request::new(()), path, codec).await {
                Ok(_) => Code::Ok,
                Err(s) => s.code(),
            }
        })
    }
}

fn mount_request(volume_id: &str, group: &str) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/tokens/mount".into(),
        volume_capability: Some(pb::VolumeCapability {
            access_type: Some(pb::volume_capability::AccessType::Mount(
                pb::volume_capability::MountVolume {
                    fs_type: String::new(),
                    mount_flags: Vec::new(),
                    volume_mount_group: group.into(),
                },
            )),
            access_mode: Some(pb::volume_capability::AccessMode {
                mode: pb::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }),
        readonly: true,
        volume_context: [("clientID".to_string(), "c".to_string())].into(),
        secrets: [("token".to_string(), "s3cr3t-value".to_string())].into(),
        ..Default::default()
    }
}

#[test]
fn identity_names_the_plugin_and_its_version_with_no_controller_and_probes_the_driver() {
    let mut server = Server::start();
    let client = server.client();
    let info = client
        .rt
        .block_on(
            client
                .identity()
                .get_plugin_info(pb::GetPluginInfoRequest {}),
        )
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.cstokenfs.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = client
        .rt
        .block_on(
            client
                .identity()
                .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {}),
        )
        .unwrap()
        .into_inner();
    assert!(caps.capabilities.is_empty(), "{caps:?}");
    let probe = |c: &Client| {
        c.rt.block_on(c.identity().probe(pb::ProbeRequest {}))
            .unwrap()
            .into_inner()
            .ready
    };
    assert_eq!(probe(&client), Some(true));
    server.fake.unready.store(true, Ordering::SeqCst);
    assert_eq!(probe(&client), Some(false));
    drop(client);
    server.stop().unwrap();
}

#[test]
fn node_info_and_capabilities_are_the_node_id_and_volume_mount_group_only() {
    let mut server = Server::start();
    let client = server.client();
    let info = client
        .rt
        .block_on(client.node().node_get_info(pb::NodeGetInfoRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "node-1");
    assert_eq!(info.max_volumes_per_node, 0);
    assert!(info.accessible_topology.is_none());
    let caps = client
        .rt
        .block_on(
            client
                .node()
                .node_get_capabilities(pb::NodeGetCapabilitiesRequest {}),
        )
        .unwrap()
        .into_inner();
    use pb::node_service_capability::{rpc, Rpc, Type};
    assert_eq!(
        caps.capabilities,
        vec![pb::NodeServiceCapability {
            r#type: Some(Type::Rpc(Rpc {
                r#type: rpc::Type::VolumeMountGroup as i32
            }))
        }]
    );
    drop(client);
    server.stop().unwrap();
}

#[test]
fn rpcs_not_served_answer_unimplemented() {
    let mut server = Server::start();
    let client = server.client();
    for path in [
        "/csi.v1.Node/NodeStageVolume",
        "/csi.v1.Node/NodeUnstageVolume",
        "/csi.v1.Node/NodeGetVolumeStats",
        "/csi.v1.Node/NodeExpandVolume",
        "/csi.v1.Controller/CreateVolume",
        "/csi.v1.Controller/ControllerGetCapabilities",
        "/csi.v1.GroupController/GroupControllerGetCapabilities",
    ] {
        assert_eq!(client.call(path), Code::Unimplemented, "{path}");
    }
    // The same raw call reaches a served RPC.
    assert_eq!(client.call("/csi.v1.Identity/Probe"), Code::Ok);
    drop(client);
    server.stop().unwrap();
}

#[test]
fn publish_hands_the_driver_the_request_with_its_capability_context_and_secrets() {
    let mut server = Server::start();
    let client = server.client();
    client.publish(mount_request("vol-1", "2000")).unwrap();
    let mut block = mount_request("vol-2", "");
    block.volume_capability = Some(pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Block(
            pb::volume_capability::BlockVolume {},
        )),
        access_mode: None,
    });
    block.readonly = false;
    client.publish(block).unwrap();
    let mut missing = mount_request("vol-3", "");
    missing.volume_capability = None;
    client.publish(missing).unwrap();
    client.publish(mount_request("vol-4", "")).unwrap();
    let seen = server.fake.published.lock().clone();
    let capabilities: Vec<_> = seen.iter().map(|s| s.capability.clone()).collect();
    assert_eq!(
        capabilities,
        vec![
            Capability::Mount {
                volume_mount_group: Some("2000".into())
            },
            Capability::Block,
            Capability::Missing,
            Capability::Mount {
                volume_mount_group: None
            },
        ]
    );
    assert_eq!(
        seen[0].target_path,
        "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/tokens/mount"
    );
    assert!(seen[0].readonly && !seen[1].readonly);
    assert_eq!(seen[0].context["clientID"], "c");
    assert_eq!(seen[0].secrets["token"], "s3cr3t-value");

    client.unpublish("vol-1", "/t").unwrap();
    assert_eq!(
        *server.fake.unpublished.lock(),
        vec![("vol-1".to_string(), "/t".to_string())]
    );
    drop(client);
    server.stop().unwrap();
}

#[test]
fn a_request_without_volume_id_or_target_path_is_invalid_and_never_reaches_the_driver() {
    let mut server = Server::start();
    let client = server.client();
    let mut no_id = mount_request("", "");
    no_id.volume_id.clear();
    let mut no_target = mount_request("vol-1", "");
    no_target.target_path.clear();
    for r in [no_id, no_target] {
        let status = client.publish(r).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    for (id, target) in [("", "/t"), ("vol-1", "")] {
        let status = client.unpublish(id, target).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{id:?} {target:?}");
    }
    assert!(server.fake.published.lock().is_empty());
    assert!(server.fake.unpublished.lock().is_empty());
    drop(client);
    server.stop().unwrap();
}

#[test]
fn each_driver_error_has_its_grpc_code_and_message() {
    let mut server = Server::start();
    let client = server.client();
    for (n, (error, code)) in errors().into_iter().enumerate() {
        let want = error.to_string();
        assert_eq!(status(error.clone()).code(), code, "{error:?}");
        let id = format!("fail-{n}");
        let published = client.publish(mount_request(&id, "")).unwrap_err();
        assert_eq!((published.code(), published.message()), (code, &*want));
        let unpublished = client.unpublish(&id, "/t").unwrap_err();
        assert_eq!((unpublished.code(), unpublished.message()), (code, &*want));
    }
    drop(client);
    server.stop().unwrap();
}

#[test]
fn the_request_debug_shows_no_secret_or_context_value() {
    let mut r = mount_request("vol-1", "");
    r.volume_context.insert(
        "csi.storage.k8s.io/serviceAccount.tokens".into(),
        "jwt-value".into(),
    );
    let shown = format!("{r:?}");
    assert!(
        shown.contains("vol-1") && shown.contains("secrets_keys"),
        "{shown}"
    );
    for value in ["s3cr3t-value", "jwt-value"] {
        assert!(!shown.contains(value), "Debug shows {value}");
    }
}

#[test]
fn the_socket_is_0600_and_removed_at_stop() {
    let mut server = Server::start();
    let socket = server.socket.clone();
    let meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    // No private directory is left beside it.
    let entries: Vec<_> = std::fs::read_dir(server.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, vec![std::ffi::OsString::from("csi.sock")]);
    server.stop().unwrap();
    assert!(server.dir.path().is_dir());
    assert!(!socket.exists(), "the socket is left behind");
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(
        std::fs::symlink_metadata(&socket).is_ok(),
        "a stale socket is there"
    );
    let mut server = Server::start_at(dir, socket.clone()).unwrap();
    server.client().call("/csi.v1.Identity/Probe");

    let (stop, stopped) = tokio::sync::oneshot::channel();
    let second = serve(&socket, server.fake.clone(), "n".into(), stopped, || ());
    drop(stop);
    assert!(
        matches!(&second, Err(CsiError::Start(m)) if m.contains("another process")),
        "{second:?}"
    );
    // The first server still serves.
    assert_eq!(server.client().call("/csi.v1.Identity/Probe"), Code::Ok);
    server.stop().unwrap();
}

#[test]
fn a_symlink_a_file_or_a_missing_directory_at_the_socket_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = dir.path().join("elsewhere");
    std::fs::write(&elsewhere, "keep").unwrap();
    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    let file = dir.path().join("file.sock");
    std::fs::write(&file, "keep").unwrap();
    let dangling = dir.path().join("dangling.sock");
    std::os::unix::fs::symlink(dir.path().join("nothing"), &dangling).unwrap();
    let missing = dir.path().join("no-such-dir/csi.sock");
    for path in [&link, &file, &dangling, &missing] {
        let (_stop, stopped) = tokio::sync::oneshot::channel();
        let result = serve(path, Arc::new(Fake::default()), "n".into(), stopped, || ());
        assert!(
            matches!(&result, Err(CsiError::Start(_))),
            "{path:?}: {result:?}"
        );
    }
    assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "keep");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    assert!(std::fs::symlink_metadata(&dangling).unwrap().is_symlink());
    assert!(!dir.path().join("nothing").exists());
}

#[test]
fn endpoints_are_unix_urls_or_absolute_paths() {
    for (endpoint, path) in [
        ("unix:///csi/csi.sock", "/csi/csi.sock"),
        ("unix:/csi/csi.sock", "/csi/csi.sock"),
        ("/csi/csi.sock", "/csi/csi.sock"),
    ] {
        assert_eq!(socket_path(endpoint), Ok(PathBuf::from(path)), "{endpoint}");
    }
    for bad in [
        "tcp://127.0.0.1:10000",
        "unix://csi/csi.sock",
        "csi.sock",
        "unix:csi.sock",
        "",
        "unix://",
        "/",
        "/csi/",
    ] {
        assert!(
            matches!(socket_path(bad), Err(CsiError::Usage(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn a_stop_ends_within_the_grace_even_with_a_client_that_never_hangs_up() {
    let mut server = Server::start();
    let client = server.client();
    assert_eq!(client.call("/csi.v1.Identity/Probe"), Code::Ok);
    // The client's runtime is idle: it never answers the server's GOAWAY.
    let started = Instant::now();
    server.stop().unwrap();
    assert!(started.elapsed() < GRACE + Duration::from_secs(3));
    assert!(!server.socket.exists());
    drop(client);
}

#[test]
fn a_private_directory_left_by_a_killed_start_of_the_same_pid_is_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let left = dir.path().join(format!(".csi.sock.{}", std::process::id()));
    std::fs::create_dir(&left).unwrap();
    drop(std::os::unix::net::UnixListener::bind(left.join("s")).unwrap());
    let mut server = Server::start_at(dir, socket).unwrap();
    assert!(!left.exists());
    server.stop().unwrap();
}
