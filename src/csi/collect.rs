//! The CSI driver's part of a `--metrics` scrape: its operations by result
//! (`meters.rs`) and the volumes published now.

use super::driver::Driver;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use std::fmt;
use std::sync::Arc;

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
        for (operation, result, n) in self.0.operations.each() {
            let labels = [("operation", operation), ("result", result)];
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        let volumes = self.0.operations.volumes();
        ConstGauge::new(volumes as i64).encode(encoder.encode_descriptor(
            "csi_volumes",
            "Volumes published on this node now",
            None,
            MetricType::Gauge,
        )?)
    }
}
