//! `cstokenfs csi`: a Kubernetes CSI node plugin (ephemeral inline volumes only) that
//! writes each pod's own workload identity's tokens as files into a tmpfs the pod sees
//! read-only at its volume's target path. One driver serves a node: one cache, keyed by
//! (tenant, client ID, service account's issuer and subject, resource).
//!
//! - `grpc`: the Identity and Node services over a unix socket (tonic); the only place a
//!   [`CsiError`] becomes a gRPC status. Every other RPC answers UNIMPLEMENTED.
//! - `proto`: the code generated from `proto/csi.proto` (the RPCs served, from the CSI spec).
//! - `attrs`: a publish request's volume attributes, pod info and service-account token.
//! - `driver`: publish, republish, unpublish and restart adoption over the daemon core's
//!   cache; `volume`: the tmpfs under `--data-dir` and the read-only bind at the target;
//!   `state`: the record per volume under `--state-dir`; `sync`: keeps each volume's files
//!   in step with the cache.

mod adopt;
mod attrs;
mod collect;
mod driver;
mod grpc;
mod meters;
pub mod proto;
mod state;
mod sync;
mod volume;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use zeroize::Zeroizing;

/// The plugin's name (`GetPluginInfo`, the CSIDriver object's name).
pub const PLUGIN_NAME: &str = "csi.cstokenfs.io";

/// The audience the CSIDriver's `tokenRequests` asks for: the service-account token sent
/// to Entra as the client assertion.
pub const DEFAULT_AUDIENCE: &str = "api://AzureADTokenExchange";

/// Everything `csi` was asked for on its command line.
#[derive(Debug, Clone)]
pub struct CsiRequest {
    /// The gRPC socket: `unix:///csi/csi.sock` or a plain path (`--endpoint`, `$CSI_ENDPOINT`).
    pub endpoint: String,
    /// `NodeGetInfo`'s node ID (`--node-id`, `$NODE_ID`).
    pub node_id: String,
    /// The tenant of volumes that name none (`--tenant-id`, `$AZURE_TENANT_ID`).
    pub tenant_id: Option<String>,
    /// Entra's authority (`--authority-host`, `$AZURE_AUTHORITY_HOST`, else
    /// `https://login.microsoftonline.com/`).
    pub authority_host: String,
    /// `--ca-file`: PEM certificates trusted besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Where each volume's tmpfs is mounted read-write (`--data-dir`).
    pub data_dir: PathBuf,
    /// Where each volume's record is kept (`--state-dir`).
    pub state_dir: PathBuf,
    /// The audience of the service-account token used as the assertion (`--audience`).
    pub audience: String,
    /// Freshness, timeouts, rate limit: the cache's rules.
    pub policy: crate::policy::Policy,
    /// `--metrics`: serve Prometheus metrics, /healthz and /readyz here (any address).
    pub metrics: Option<std::net::SocketAddr>,
}

/// What the kubelet asks of a `NodePublishVolume`, as the driver sees it. `Debug` by hand:
/// the secrets and the volume context hold the pod's service-account token.
pub struct Publish {
    pub volume_id: String,
    pub target_path: String,
    pub readonly: bool,
    pub capability: Capability,
    /// The pod's `volumeAttributes` plus what the kubelet adds (`csi.storage.k8s.io/...`).
    pub volume_context: BTreeMap<String, String>,
    /// Since Kubernetes 1.35, with `serviceAccountTokenInSecrets: true`, the
    /// service-account tokens come here instead of in the volume context.
    pub secrets: BTreeMap<String, Zeroizing<String>>,
}

impl fmt::Debug for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publish")
            .field("volume_id", &self.volume_id)
            .field("target_path", &self.target_path)
            .field("readonly", &self.readonly)
            .field("capability", &self.capability)
            .field("volume_context_keys", &self.volume_context.keys())
            .field("secrets_keys", &self.secrets.keys())
            .finish()
    }
}

/// The request's `volume_capability`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    /// None was sent.
    Missing,
    /// A raw block volume (refused: the volume is files).
    Block,
    /// A filesystem volume; `volume_mount_group` is the pod's fsGroup when the kubelet
    /// passes one (`fsGroupPolicy: File` and `VOLUME_MOUNT_GROUP`).
    Mount { volume_mount_group: Option<String> },
}

/// What the gRPC services ask of the driver. Blocking calls: `grpc` runs them off the
/// async threads.
pub trait Node: Send + Sync + 'static {
    /// `NodePublishVolume`: a first publish mounts the volume once its first tokens are
    /// written; a repeated one (republish) takes the newer service-account token.
    fn publish(&self, request: Publish) -> Result<(), CsiError>;
    /// `NodeUnpublishVolume`: unmounts and forgets; an unknown volume is success.
    fn unpublish(&self, volume_id: &str, target_path: &str) -> Result<(), CsiError>;
    /// `Probe`'s readiness.
    fn ready(&self) -> bool;
}

/// Why an RPC fails, or why `csi` cannot start. Each maps to one gRPC code (in `grpc`) or
/// one exit code (in `cli`). Messages never carry a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CsiError {
    /// Bad attributes, a non-ephemeral or writable request, a missing token (INVALID_ARGUMENT).
    InvalidArgument(String),
    /// Entra refused the pod's identity or resource (PERMISSION_DENIED, with the AADSTS code).
    PermissionDenied(String),
    /// The authority cannot be reached or did not answer in time (UNAVAILABLE).
    Unavailable(String),
    /// The target path cannot be used (FAILED_PRECONDITION).
    FailedPrecondition(String),
    /// Anything else that went wrong on the node (INTERNAL).
    Internal(String),
    /// A bad command line (exit 2).
    Usage(String),
    /// The driver cannot start (socket, directories) (exit 1).
    Start(String),
}

impl fmt::Display for CsiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CsiError::InvalidArgument(m)
            | CsiError::PermissionDenied(m)
            | CsiError::Unavailable(m)
            | CsiError::FailedPrecondition(m)
            | CsiError::Internal(m)
            | CsiError::Usage(m)
            | CsiError::Start(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for CsiError {}

/// Runs the driver until SIGTERM or SIGINT: adopts the volumes published before, serves
/// the gRPC socket, keeps every volume's files fresh. Volumes stay mounted when it exits
/// (a restarted driver adopts them).
pub fn run(req: CsiRequest) -> Result<(), CsiError> {
    crate::logging::init_stderr("info");
    let socket = grpc::socket_path(&req.endpoint)?;
    let start = |e: crate::daemon::DaemonError| CsiError::Start(e.to_string());
    crate::daemon::harden("CSI driver", false).map_err(start)?;
    raise_open_files();
    let signals = crate::daemon::Handled::register().map_err(start)?;
    let mut policy = req.policy.clone();
    // Volumes published in the same second must not refresh in the same second.
    policy.refresh_spread_pct = REFRESH_SPREAD_PCT;
    let daemon = crate::daemon::Daemon::with_added_identities(
        policy,
        "the CSI driver fetches as each volume's pod only, never as the node",
    )
    .map_err(start)?;
    let driver = Arc::new(driver::Driver::start(daemon.cache().clone(), &req)?);
    log::info!(
        "CSI driver {PLUGIN_NAME} {} on node {}: socket {}, authority {}, data {}, state {}",
        env!("CARGO_PKG_VERSION"),
        req.node_id,
        socket.display(),
        req.authority_host,
        req.data_dir.display(),
        req.state_dir.display()
    );
    let syncing = sync::start(driver.clone()).map_err(|e| CsiError::Start(e.to_string()))?;
    let metrics = match req.metrics {
        Some(listen) => {
            let parts = crate::metrics::Parts {
                own: vec![Box::new(collect::CsiCollector(driver.clone()))],
                ..Default::default()
            };
            let m = crate::metrics::Metrics::start(listen, "csi", daemon.cache().clone(), parts)
                .map_err(|e| CsiError::Start(format!("--metrics {listen}: {e}")))?;
            Some(m)
        }
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = signals.forward(tx, |s| s, false).map_err(start)?;
    crate::daemon::small_thread("csi-signals")
        .spawn(move || {
            use crate::daemon::Signal;
            for signal in rx {
                match signal {
                    Signal::Stop(sig) => {
                        log::info!("signal {sig}: stopping; the volumes stay mounted");
                        let _ = stop_tx.send(());
                        return;
                    }
                    // The mount's "drop every token" is for a user's new login; here it
                    // would empty every pod's volume until its next fetch, or republish.
                    Signal::DropTokens => {
                        log::info!("SIGUSR1 ignored: the CSI driver's tokens are its pods'");
                    }
                    Signal::ReopenLog => {}
                }
            }
        })
        .map_err(|e| CsiError::Start(e.to_string()))?;
    let listening = || {
        if let Some(m) = &metrics {
            m.serving();
        }
    };
    let served = grpc::serve(&socket, driver, req.node_id.clone(), stop_rx, listening);
    handle.close();
    drop(syncing);
    drop(daemon);
    served
}

/// How far (percent of the time to its refresh point) a token's refresh may come early.
const REFRESH_SPREAD_PCT: u8 = 10;

/// Every volume holds a few directories open: the soft limit of open files goes up to the
/// hard one.
fn raise_open_files() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            log::warn!("cannot raise the open files limit: {e}");
        }
    }
}
