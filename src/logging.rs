//! Logging: level from RUST_LOG (default info), to standard error (foreground, or a detached
//! daemon's `--log-file`, which stderr then is) or to syslog. Never a token at any level:
//! token types redact themselves and no layer logs a response body.
//!
//! Syslog is a few lines over a `UnixDatagram` to `/dev/log`, as libfuse daemons (sshfs) do
//! through syslog(3): one RFC 3164 datagram per record, `<PRI>Mmm dd hh:mm:ss
//! cstokenfs[PID]: target: message`, facility daemon. env_logger's filter decides what is
//! logged, so RUST_LOG means the same everywhere.

use env_logger::{Builder, Env};
use log::{Level, LevelFilter, Log, Metadata, Record};
use parking_lot::Mutex;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

/// Where syslog(3) sends.
pub const SYSLOG_PATH: &str = "/dev/log";

/// Logs to standard error at RUST_LOG's level, else `default_level` (which a detached
/// daemon points at its log file or /dev/null).
pub fn init_stderr(default_level: &str) {
    let _ = builder(default_level).format_timestamp_millis().try_init();
}

/// The filter everyone shares: RUST_LOG, else `default_level`. fuser logs each FUSE request
/// at debug: those lines only when RUST_LOG asks for trace, so `-d` stays readable.
fn builder(default_level: &str) -> Builder {
    let mut b = Builder::from_env(Env::default().default_filter_or(default_level));
    let wants_trace = std::env::var("RUST_LOG").is_ok_and(|v| v.contains("trace"));
    if !wants_trace {
        b.filter_module("fuser", LevelFilter::Info);
    }
    // fuser warns that its own unmount failed after ours succeeded: noise, not news.
    b.filter_module("fuser::mnt", LevelFilter::Error);
    b
}

/// Whether a syslog daemon listens at `/dev/log`.
pub fn syslog_available() -> bool {
    syslog_available_at(Path::new(SYSLOG_PATH))
}

fn syslog_available_at(path: &Path) -> bool {
    UnixDatagram::unbound().is_ok_and(|s| s.connect(path).is_ok())
}

/// Logs to syslog (`/dev/log`) with RUST_LOG's filter; false (nothing installed) if no
/// syslog daemon listens there.
pub fn init_syslog(default_level: &str) -> bool {
    let Some(logger) = Syslog::connect(Path::new(SYSLOG_PATH), builder(default_level).build())
    else {
        return false;
    };
    let max = logger.filter.filter();
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(max);
    }
    true
}

struct Syslog {
    filter: env_logger::Logger,
    path: std::path::PathBuf,
    socket: Mutex<Option<UnixDatagram>>,
    pid: u32,
}

impl Syslog {
    fn connect(path: &Path, filter: env_logger::Logger) -> Option<Syslog> {
        let socket = UnixDatagram::unbound().ok()?;
        socket.connect(path).ok()?;
        Some(Syslog {
            filter,
            path: path.to_owned(),
            socket: Mutex::new(Some(socket)),
            pid: std::process::id(),
        })
    }

    /// One datagram; on failure (syslogd restarted) one reconnect and one more try.
    fn send(&self, line: &[u8]) {
        let mut socket = self.socket.lock();
        if socket.as_ref().is_some_and(|s| s.send(line).is_ok()) {
            return;
        }
        *socket = UnixDatagram::unbound()
            .ok()
            .filter(|s| s.connect(&self.path).is_ok());
        if let Some(s) = socket.as_ref() {
            let _ = s.send(line);
        }
    }
}

impl Log for Syslog {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if self.filter.matches(record) {
            let line = format_record(record, self.pid, now_secs());
            self.send(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// Facility daemon (3) and the record's severity.
fn priority(level: Level) -> u8 {
    let severity = match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    };
    3 * 8 + severity
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `<PRI>Mmm dd hh:mm:ss cstokenfs[PID]: LEVEL target: message` (RFC 3164; UTC).
fn format_record(record: &Record, pid: u32, epoch_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = epoch_secs.div_euclid(86_400);
    let secs = epoch_secs.rem_euclid(86_400);
    let (_, month, day) = crate::civil::civil_from_days(days);
    let month = MONTHS[((month - 1).clamp(0, 11)) as usize];
    let message = record.args().to_string().replace('\n', " ");
    format!(
        "<{}>{month} {day:>2} {:02}:{:02}:{:02} cstokenfs[{pid}]: {} {}: {message}",
        priority(record.level()),
        secs / 3600,
        secs % 3600 / 60,
        secs % 60,
        record.level(),
        record.target(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_rfc3164_lines() {
        let line = format_record(
            &Record::builder()
                .level(Level::Warn)
                .target("cstokenfs::cache")
                .args(format_args!("a\nb"))
                .build(),
            42,
            // 2000-02-29 01:02:03 UTC
            951_786_123,
        );
        assert_eq!(
            line,
            "<28>Feb 29 01:02:03 cstokenfs[42]: WARN cstokenfs::cache: a b"
        );
        assert_eq!(priority(Level::Info), 30);
        assert_eq!(priority(Level::Error), 27);
    }

    #[test]
    fn a_datagram_reaches_a_bound_socket_and_a_missing_one_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        assert!(!syslog_available_at(&path));
        let server = UnixDatagram::bind(&path).unwrap();
        assert!(syslog_available_at(&path));
        let logger = Syslog::connect(
            &path,
            Builder::new().filter_level(LevelFilter::Info).build(),
        )
        .unwrap();
        logger.log(
            &Record::builder()
                .level(Level::Info)
                .target("t")
                .args(format_args!("hello"))
                .build(),
        );
        logger.log(
            &Record::builder()
                .level(Level::Debug)
                .target("t")
                .args(format_args!("filtered"))
                .build(),
        );
        let mut buf = [0u8; 512];
        let n = server.recv(&mut buf).unwrap();
        let got = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(got.starts_with("<30>"), "{got}");
        assert!(got.ends_with("INFO t: hello"), "{got}");
        server.set_nonblocking(true).unwrap();
        assert!(server.recv(&mut buf).is_err(), "debug is filtered out");
    }
}
