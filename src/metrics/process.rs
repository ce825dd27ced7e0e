//! The usual `process_*` metrics, read from `/proc/self` at each scrape (through `procfs`):
//! CPU time, resident and virtual memory, open and allowed descriptors, threads, start
//! time. `prometheus-client` has no process collector; the names and meanings are those
//! of the Prometheus client libraries'. A value `/proc` cannot give is left out.

use procfs::process::{LimitValue, Process as Proc};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;
use std::fmt;

/// This process, as `/proc/self` shows it.
#[derive(Debug)]
pub struct Process;

/// What one scrape read.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Sample {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<i64>,
    pub virtual_bytes: Option<i64>,
    pub open_fds: Option<i64>,
    pub max_fds: Option<i64>,
    pub threads: Option<i64>,
    pub start_time: Option<i64>,
}

impl Sample {
    pub(super) fn now() -> Sample {
        let Ok(me) = Proc::myself() else {
            return Sample::default();
        };
        let mut s = Sample {
            open_fds: me.fd_count().ok().map(|n| n as i64),
            max_fds: me
                .limits()
                .ok()
                .and_then(|l| match l.max_open_files.soft_limit {
                    LimitValue::Value(v) => Some(v as i64),
                    LimitValue::Unlimited => None,
                }),
            ..Sample::default()
        };
        if let Ok(stat) = me.stat() {
            let ticks = procfs::ticks_per_second() as f64;
            if ticks > 0.0 {
                s.cpu_seconds = Some((stat.utime + stat.stime) as f64 / ticks);
                s.start_time = procfs::boot_time_secs()
                    .ok()
                    .map(|boot| boot as i64 + (stat.starttime as f64 / ticks) as i64);
            }
            s.resident_bytes = Some(stat.rss.saturating_mul(procfs::page_size()) as i64);
            s.virtual_bytes = Some(stat.vsize as i64);
            s.threads = Some(stat.num_threads);
        }
        s
    }
}

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let s = Sample::now();
        let bytes = Some(&Unit::Bytes);
        let seconds = Some(&Unit::Seconds);
        if let Some(v) = s.cpu_seconds {
            ConstCounter::new(v).encode(encoder.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent",
                seconds,
                MetricType::Counter,
            )?)?;
        }
        let gauges = [
            (
                "process_resident_memory",
                "Resident memory size",
                bytes,
                s.resident_bytes,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size",
                bytes,
                s.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Open file descriptors",
                None,
                s.open_fds,
            ),
            (
                "process_max_fds",
                "Most open file descriptors allowed",
                None,
                s.max_fds,
            ),
            ("process_threads", "Threads", None, s.threads),
            (
                "process_start_time",
                "Start time of the process since the Unix epoch",
                seconds,
                s.start_time,
            ),
        ];
        for (name, help, unit, value) in gauges {
            if let Some(v) = value {
                ConstGauge::new(v).encode(encoder.encode_descriptor(
                    name,
                    help,
                    unit,
                    MetricType::Gauge,
                )?)?;
            }
        }
        Ok(())
    }
}
