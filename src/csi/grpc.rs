//! The CSI Identity and Node services over a unix socket (tonic on a tokio runtime of its
//! own). The only place a [`CsiError`] becomes a gRPC status ([`status`]). The driver's
//! blocking calls ([`Node`]) run on tokio's blocking threads. RPCs not in
//! `proto/csi.proto` (NodeStageVolume, NodeGetVolumeStats, NodeExpandVolume, the
//! Controller service, ...) are answered UNIMPLEMENTED by tonic's router.
//!
//! Nothing here logs a request, its volume context or its secrets (CVE-2023-2878): each RPC
//! is logged at debug level with its volume ID only.

use super::proto::v1::identity_server::{Identity, IdentityServer};
use super::proto::v1::node_server::NodeServer;
use super::proto::v1::{
    node_service_capability, volume_capability, GetPluginCapabilitiesRequest,
    GetPluginCapabilitiesResponse, GetPluginInfoRequest, GetPluginInfoResponse,
    NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse, NodeGetInfoRequest,
    NodeGetInfoResponse, NodePublishVolumeRequest, NodePublishVolumeResponse,
    NodeServiceCapability, NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse, ProbeRequest,
    ProbeResponse, VolumeCapability,
};
use super::{Capability, CsiError, Node, Publish, PLUGIN_NAME};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

/// The socket's permission bits: only root (the kubelet, the registrar) connects.
pub const SOCKET_MODE: u32 = 0o600;

/// How long a stop waits for RPCs in flight and open connections.
pub const GRACE: Duration = Duration::from_secs(5);

/// The socket path of `--endpoint`: `unix:///csi/csi.sock`, `unix:/csi/csi.sock` or
/// `/csi/csi.sock`. Anything else (`tcp://...`, a relative path) is a usage error.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, CsiError> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if !path.starts_with('/') || path.len() < 2 || path.ends_with('/') {
        return Err(CsiError::Usage(format!(
            "--endpoint {endpoint:?}: the CSI socket is unix:///ABSOLUTE/PATH (such as \
             unix:///csi/csi.sock) or an absolute path"
        )));
    }
    Ok(PathBuf::from(path))
}

/// Serves the Identity and Node services on the unix socket `socket` until `stop` fires
/// (or its sender is dropped) and the calls in flight end (at most [`GRACE`] later), then
/// removes the socket. Blocking: builds its own tokio runtime. The socket is created with
/// mode 0600 in a private directory and renamed into place, so no other uid can connect
/// at any moment; a stale socket at `socket` is replaced, anything else there (a file, a
/// symlink, a live plugin's socket) is a [`CsiError::Start`], as is a missing parent
/// directory. `listening` is called once the socket is bound.
pub fn serve(
    socket: &Path,
    node: Arc<dyn Node>,
    node_id: String,
    stop: tokio::sync::oneshot::Receiver<()>,
    listening: impl FnOnce(),
) -> Result<(), CsiError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CsiError::Start(format!("cannot start the gRPC runtime: {e}")))?;
    let listener = bind(socket)?;
    let ours = std::fs::symlink_metadata(socket)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| start_error(socket, &e))?;
    log::info!("CSI plugin {PLUGIN_NAME} listening on {}", socket.display());
    listening();
    let stopping = Arc::new(tokio::sync::Notify::new());
    let served = runtime.block_on(async {
        let listener =
            tokio::net::UnixListener::from_std(listener).map_err(|e| start_error(socket, &e))?;
        let signal = {
            let stopping = stopping.clone();
            async move {
                let _ = stop.await;
                stopping.notify_one();
            }
        };
        let server = tonic::transport::Server::builder()
            .add_service(IdentityServer::new(IdentityService { node: node.clone() }))
            .add_service(NodeServer::new(NodeService { node, node_id }))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                signal,
            );
        // Stopping waits for the RPCs in flight and for clients to hang up, up to GRACE.
        let grace = async {
            stopping.notified().await;
            tokio::time::sleep(GRACE).await;
        };
        tokio::select! {
            served = server => served.map_err(|e| {
                CsiError::Start(format!("gRPC server on {}: {e}", socket.display()))
            }),
            () = grace => {
                log::info!("stopped with RPCs or connections still open after {GRACE:?}");
                Ok(())
            }
        }
    });
    // A publish still running on a blocking thread is not waited for any longer.
    runtime.shutdown_timeout(Duration::from_millis(100));
    // Remove the socket only if it is still the one bound here.
    if std::fs::symlink_metadata(socket).is_ok_and(|m| (m.dev(), m.ino()) == ours) {
        let _ = std::fs::remove_file(socket);
    }
    served
}

fn start_error(socket: &Path, e: &io::Error) -> CsiError {
    CsiError::Start(format!("CSI socket {}: {e}", socket.display()))
}

/// Binds `socket` with mode 0600: in a fresh 0700 directory beside it, then renamed over
/// it, after checking that what is there, if anything, is a stale socket (never following
/// a symlink).
fn bind(socket: &Path) -> Result<std::os::unix::net::UnixListener, CsiError> {
    let (Some(parent), Some(name)) = (socket.parent(), socket.file_name()) else {
        return Err(CsiError::Start(format!(
            "CSI socket {}: not a file path",
            socket.display()
        )));
    };
    match std::fs::symlink_metadata(parent) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(CsiError::Start(format!(
                "CSI socket {}: {} is not a directory",
                socket.display(),
                parent.display()
            )))
        }
        Err(e) => {
            return Err(CsiError::Start(format!(
                "CSI socket {}: its directory {}: {e}",
                socket.display(),
                parent.display()
            )))
        }
    }
    check_replaceable(socket)?;
    let private = parent.join(format!(
        ".{}.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    make_private_dir(&private).map_err(|e| {
        CsiError::Start(format!(
            "CSI socket: cannot create {}: {e}",
            private.display()
        ))
    })?;
    let staged = private.join("s");
    let bound = std::os::unix::net::UnixListener::bind(&staged)
        .and_then(|l| {
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(SOCKET_MODE))?;
            l.set_nonblocking(true)?;
            std::fs::rename(&staged, socket)?;
            Ok(l)
        })
        .map_err(|e| start_error(socket, &e));
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&private);
    bound
}

/// Creates the 0700 directory the socket is bound in. One left by a process of the same
/// pid that was killed while binding (a container's pid 1 restarted) is removed first.
fn make_private_dir(private: &Path) -> io::Result<()> {
    let create = || std::fs::DirBuilder::new().mode(0o700).create(private);
    match create() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // A real directory only, never through a symlink.
            if std::fs::symlink_metadata(private)?.is_dir() {
                let _ = std::fs::remove_file(private.join("s"));
                std::fs::remove_dir(private)?;
            }
            create()
        }
        other => other,
    }
}

/// Whether `socket` may be bound over: nothing there, or a socket no one listens on.
fn check_replaceable(socket: &Path) -> Result<(), CsiError> {
    let meta = match std::fs::symlink_metadata(socket) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(start_error(socket, &e)),
    };
    if !meta.file_type().is_socket() {
        return Err(CsiError::Start(format!(
            "CSI socket {}: something other than a socket is there (not replaced)",
            socket.display()
        )));
    }
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        return Err(CsiError::Start(format!(
            "CSI socket {}: another process is listening on it",
            socket.display()
        )));
    }
    Ok(())
}

/// The one mapping of the driver's errors to gRPC codes. `Usage` and `Start` are the
/// command line's and never come from an RPC: INTERNAL if they do.
pub fn status(e: CsiError) -> Status {
    match e {
        CsiError::InvalidArgument(m) => Status::invalid_argument(m),
        CsiError::PermissionDenied(m) => Status::permission_denied(m),
        CsiError::Unavailable(m) => Status::unavailable(m),
        CsiError::FailedPrecondition(m) => Status::failed_precondition(m),
        CsiError::Internal(m) | CsiError::Usage(m) | CsiError::Start(m) => Status::internal(m),
    }
}

/// Runs a blocking driver call on tokio's blocking threads.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, CsiError> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(call).await {
        Ok(result) => result.map_err(status),
        Err(_) => Err(Status::internal(
            "the CSI driver failed while handling the call",
        )),
    }
}

struct IdentityService {
    node: Arc<dyn Node>,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        log::debug!("GetPluginInfo");
        Ok(Response::new(GetPluginInfoResponse {
            name: PLUGIN_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    /// A node-only plugin: no CONTROLLER_SERVICE, no topology constraints.
    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        log::debug!("GetPluginCapabilities");
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: Vec::new(),
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let node = self.node.clone();
        let ready = blocking(move || Ok(node.ready())).await?;
        log::debug!("Probe: ready {ready}");
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}

struct NodeService {
    node: Arc<dyn Node>,
    node_id: String,
}

#[tonic::async_trait]
impl super::proto::v1::node_server::Node for NodeService {
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let publish = publish_of(request.into_inner())?;
        log::debug!("NodePublishVolume {}", publish.volume_id);
        let node = self.node.clone();
        blocking(move || node.publish(publish)).await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let NodeUnpublishVolumeRequest {
            volume_id,
            target_path,
        } = request.into_inner();
        check_ids(&volume_id, &target_path)?;
        log::debug!("NodeUnpublishVolume {volume_id}");
        let node = self.node.clone();
        blocking(move || node.unpublish(&volume_id, &target_path)).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    /// VOLUME_MOUNT_GROUP only: the kubelet passes the pod's fsGroup (`fsGroupPolicy: File`).
    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use node_service_capability::{rpc, Rpc, Type};
        log::debug!("NodeGetCapabilities");
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: vec![NodeServiceCapability {
                r#type: Some(Type::Rpc(Rpc {
                    r#type: rpc::Type::VolumeMountGroup as i32,
                })),
            }],
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        log::debug!("NodeGetInfo");
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

/// The spec's INVALID_ARGUMENT for a request without a volume ID or target path.
fn check_ids(volume_id: &str, target_path: &str) -> Result<(), Status> {
    if volume_id.is_empty() {
        return Err(Status::invalid_argument("volume_id is missing"));
    }
    if target_path.is_empty() {
        return Err(Status::invalid_argument("target_path is missing"));
    }
    Ok(())
}

/// The request as the driver sees it; the secrets move into [`Zeroizing`] strings.
fn publish_of(r: NodePublishVolumeRequest) -> Result<Publish, Status> {
    check_ids(&r.volume_id, &r.target_path)?;
    Ok(Publish {
        capability: capability_of(r.volume_capability),
        volume_id: r.volume_id,
        target_path: r.target_path,
        readonly: r.readonly,
        volume_context: r.volume_context,
        secrets: r
            .secrets
            .into_iter()
            .map(|(k, v)| (k, Zeroizing::new(v)))
            .collect(),
    })
}

fn capability_of(c: Option<VolumeCapability>) -> Capability {
    match c.and_then(|c| c.access_type) {
        None => Capability::Missing,
        Some(volume_capability::AccessType::Block(_)) => Capability::Block,
        Some(volume_capability::AccessType::Mount(m)) => Capability::Mount {
            volume_mount_group: Some(m.volume_mount_group).filter(|g| !g.is_empty()),
        },
    }
}

#[cfg(test)]
#[path = "grpc_tests.rs"]
mod tests;
