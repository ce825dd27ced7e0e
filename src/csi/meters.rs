//! The CSI driver's part of `--metrics`: publishes, republishes and unpublishes by result
//! (`ok`, or the gRPC code the kubelet got), and the volumes held now.

use super::driver::Driver;
use super::CsiError;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// An RPC that changes a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// A first `NodePublishVolume` of a volume.
    Publish,
    /// A repeated one (`requiresRepublish`): the next service-account token.
    Republish,
    /// `NodeUnpublishVolume`.
    Unpublish,
}

const OPERATIONS: [(Operation, &str); 3] = [
    (Operation::Publish, "publish"),
    (Operation::Republish, "republish"),
    (Operation::Unpublish, "unpublish"),
];

/// Each result an operation may have, as its label says it.
const RESULTS: [&str; 6] = [
    "ok",
    "invalid_argument",
    "permission_denied",
    "unavailable",
    "failed_precondition",
    "internal",
];

fn result_of(done: &Result<(), CsiError>) -> &'static str {
    match done {
        Ok(()) => "ok",
        Err(CsiError::InvalidArgument(_) | CsiError::Usage(_)) => "invalid_argument",
        Err(CsiError::PermissionDenied(_)) => "permission_denied",
        Err(CsiError::Unavailable(_)) => "unavailable",
        Err(CsiError::FailedPrecondition(_)) => "failed_precondition",
        Err(CsiError::Internal(_) | CsiError::Start(_)) => "internal",
    }
}

/// Operations by kind and result (atomics).
#[derive(Default)]
pub struct Operations {
    counts: [[AtomicU64; RESULTS.len()]; OPERATIONS.len()],
}

impl Operations {
    pub fn count(&self, op: Operation, done: &Result<(), CsiError>) {
        let o = OPERATIONS.iter().position(|(x, _)| *x == op).unwrap_or(0);
        let r = RESULTS
            .iter()
            .position(|x| *x == result_of(done))
            .unwrap_or(0);
        self.counts[o][r].fetch_add(1, Ordering::Relaxed);
    }
}

/// Reads the driver's counts and volumes at each scrape.
pub struct CsiCollector(pub Arc<Driver>);

impl fmt::Debug for CsiCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CsiCollector")
    }
}

impl Collector for CsiCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let mut family = encoder.encode_descriptor(
            "csi_operations",
            "CSI publishes, republishes and unpublishes, by result (ok, or the gRPC code the kubelet got)",
            None,
            MetricType::Counter,
        )?;
        let ops = &self.0.operations;
        for (o, (_, operation)) in OPERATIONS.iter().enumerate() {
            for (r, result) in RESULTS.iter().enumerate() {
                let n = ops.counts[o][r].load(Ordering::Relaxed);
                let labels = [("operation", *operation), ("result", *result)];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        let volumes = self.0.inner.lock().volumes.len();
        ConstGauge::new(volumes as i64).encode(encoder.encode_descriptor(
            "csi_volumes",
            "Volumes published on this node now",
            None,
            MetricType::Gauge,
        )?)
    }
}
