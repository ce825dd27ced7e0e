//! In-process emulator of the Azure managed-identity token endpoints: Cloud Shell
//! (`POST /oauth2/token`, the default), IMDS and Azure Arc
//! (`GET /metadata/identity/oauth2/token`) and App Service (`GET /msi/token`); see
//! [`Protocol`].
//!
//! Used by tests (driven in-process through the knobs on [`Emulator`]) and by the binary
//! (`cstokenfs emulator`, `--emulator`). It binds only the address it is given (callers pass
//! loopback) and issues unsigned JWT-shaped test tokens that are not valid in Azure.
//!
//! The HTTP/1.1 server is a small hand-written one on `std::net` rather than tiny_http:
//! fault injection needs to close a keep-alive connection without answering (`Reset`,
//! `Hang` on stop) and `stop()` must close the listener before it returns, and tiny_http
//! 0.12 can do neither (dropping a request sends a 500; its accept thread cannot be joined).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use parking_lot::{Condvar, Mutex};
use serde_json::Value;

use self::http::accept_loop;

mod http;
mod protocol;
#[cfg(test)]
mod tests;

/// Audiences the real Cloud Shell endpoint accepts (trailing slash may be added or removed).
pub const KNOWN_AUDIENCES: &[&str] = &[
    "https://management.core.windows.net/",
    "https://management.azure.com/",
    "https://graph.windows.net/",
    "https://vault.azure.net",
    "https://datalake.azure.net/",
    "https://outlook.office365.com/",
    "https://graph.microsoft.com/",
    "https://batch.core.windows.net/",
    "https://analysis.windows.net/powerbi/api",
    "https://storage.azure.com/",
    "https://rest.media.azure.net",
    "https://api.loganalytics.io",
    "https://ossrdbms-aad.database.windows.net",
    "https://www.yammer.com",
    "https://digitaltwins.azure.net",
    "https://dev.azuresynapse.net",
    "https://database.windows.net",
    "https://quantum.microsoft.com",
    "https://iothubs.azure.net",
    "https://azuredatabricks.net/",
    "https://azure-devices-provisioning.net",
    "2ff814a6-3304-4ab8-85cb-cd0e6f879c1d",
    "https://ai.azure.com",
    "https://appservice.azure.com",
    "https://management.usgovcloudapi.net/",
    "https://management.chinacloudapi.cn/",
    "499b84ac-1321-427f-aa17-267ca6975798", // Azure DevOps
    "6dae42f8-4368-4678-94ff-3960e28e3630", // AKS
];

const TOKEN_PATH: &str = "/oauth2/token";
const IMDS_PATH: &str = "/metadata/identity/oauth2/token";
const APP_SERVICE_PATH: &str = "/msi/token";
const IMDS_API_VERSION: &str = "2018-02-01";
const APP_SERVICE_API_VERSION: &str = "2019-08-01";
const ARC_API_VERSION: &str = "2020-06-01";
/// Where the real Azure Arc agent writes its challenge key files.
pub const DEFAULT_ARC_KEY_DIR: &str = "/var/opt/azcmagent/tokens";
/// `client_id` in IMDS / App Service answers when the request names none.
pub const DEFAULT_CLIENT_ID: &str = "00000000-0000-0000-0000-00000000e111";

/// Start-up configuration; everything but `allow` can be changed later through knobs.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    pub ttl_secs: u64,
    pub latency: Duration,
    pub allow: Vec<String>,
    pub allow_any: bool,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            ttl_secs: 3600,
            latency: Duration::ZERO,
            allow: Vec::new(),
            allow_any: false,
        }
    }
}

/// Which token endpoint the emulator speaks (see the module docs and
/// `shared/reference/token-endpoints.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `POST /oauth2/token`, form body `resource=R`, header `Metadata: true`.
    CloudShell,
    /// `GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=R`,
    /// header `Metadata: true`; flat `{"error","error_description"}` errors.
    Imds,
    /// `GET /msi/token?api-version=2019-08-01&resource=R`, header
    /// `X-IDENTITY-HEADER: <secret>`; `{"statusCode","message"}` errors.
    AppService,
    /// Like IMDS with `api-version=2020-06-01`, plus the key-file challenge (401 with
    /// `WWW-Authenticate: Basic realm=<key file>`, then `Authorization: Basic <contents>`).
    Arc,
}

impl Protocol {
    /// All protocols, in the order their names are listed.
    pub const ALL: [Protocol; 4] = [
        Protocol::CloudShell,
        Protocol::Imds,
        Protocol::AppService,
        Protocol::Arc,
    ];

    /// The name accepted by [`FromStr`]: `cloudshell`, `imds`, `appservice` or `arc`.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::CloudShell => "cloudshell",
            Protocol::Imds => "imds",
            Protocol::AppService => "appservice",
            Protocol::Arc => "arc",
        }
    }

    /// The token endpoint path this protocol serves.
    pub fn path(self) -> &'static str {
        match self {
            Protocol::CloudShell => TOKEN_PATH,
            Protocol::Imds | Protocol::Arc => IMDS_PATH,
            Protocol::AppService => APP_SERVICE_PATH,
        }
    }

    fn method(self) -> &'static str {
        match self {
            Protocol::CloudShell => "POST",
            _ => "GET",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Protocol {
    type Err = String;

    /// Case-insensitive; the error message lists the accepted names.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                let names: Vec<_> = Protocol::ALL.iter().map(|p| p.name()).collect();
                format!(
                    "unknown protocol {s:?} (expected one of: {})",
                    names.join(", ")
                )
            })
    }
}

/// What one request gets instead of the normal answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// That status and body (JSON content type), optional `Retry-After` header.
    Status {
        code: u16,
        body: String,
        retry_after: Option<String>,
    },
    /// Read the request, never answer; the connection is closed when the emulator stops.
    Hang,
    /// Close the connection without any response.
    Reset,
    /// 200 with body `this is not json <html>`.
    Garbage,
    /// 200, valid JSON shape but no `access_token` field.
    MissingAccessToken,
    /// 200, `access_token` is "".
    EmptyAccessToken,
    /// 200 success (a real token is issued) with the expiry fields in another form.
    ExpiresOn(ExpiresOnForm),
    /// 200, a body of that many bytes (spaces then `{}`), streamed.
    HugeBody { bytes: usize },
}

/// Forms of the expiry fields, see [`Fault::ExpiresOn`]. Fields not mentioned keep their
/// normal form (`expires_in` as a string, `not_before` as an epoch string).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiresOnForm {
    /// `expires_on: "1579152252"` (the normal form).
    EpochString,
    /// `expires_on: 1579152252`.
    EpochNumber,
    /// `expires_on: "1/16/2020 5:24:12 AM +00:00"` (UTC, the real expiry).
    LegacyDateAmPm,
    /// `expires_on: "06/20/2019 02:57:58 +00:00"` (UTC, the real expiry).
    LegacyDate24h,
    /// No `expires_on`; `expires_in` as a string.
    OnlyExpiresIn,
    /// No `expires_on`; `expires_in` as a JSON number.
    ExpiresInNumber,
    /// Neither `expires_on` nor `expires_in`.
    Nothing,
    /// `expires_on: "soon"` and no `expires_in`.
    GarbageString,
}

#[derive(Clone)]
struct Issued {
    token: String,
    expires_on: u64,
    not_before: u64,
}

struct Shared {
    ttl: AtomicU64,
    latency_ns: AtomicU64,
    allow_any: AtomicBool,
    allow: Vec<String>,
    caching: AtomicBool,
    faults: Mutex<VecDeque<Fault>>,
    sticky: Mutex<Option<Fault>>,
    cache: Mutex<HashMap<String, Issued>>,
    requests: AtomicU64,
    per_resource: Mutex<HashMap<String, u64>>,
    issued: AtomicU64,
    serial: AtomicU64,
    stopped: Mutex<bool>,
    stop_cv: Condvar,
    conns: Mutex<Vec<JoinHandle<()>>>,
    protocol: Protocol,
    identity_header: String,
    arc_key_dir: Mutex<PathBuf>,
    arc_keys: Mutex<VecDeque<ArcKey>>,
    last_params: Mutex<Option<BTreeMap<String, String>>>,
}

/// One Arc challenge this emulator issued: the secret and the file holding it.
struct ArcKey {
    secret: String,
    path: PathBuf,
}

/// A running emulator. Dropping it stops the server (see [`Emulator::shutdown`]).
pub struct Emulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Emulator {
    /// Binds `listen` (port 0 = ephemeral) and starts serving the Cloud Shell protocol on a
    /// background thread; the same as `start_with(listen, config, Protocol::CloudShell)`.
    pub fn start(listen: SocketAddr, config: EmulatorConfig) -> io::Result<Emulator> {
        Emulator::start_with(listen, config, Protocol::CloudShell)
    }

    /// Binds `listen` (port 0 = ephemeral) and starts serving `protocol`.
    pub fn start_with(
        listen: SocketAddr,
        config: EmulatorConfig,
        protocol: Protocol,
    ) -> io::Result<Emulator> {
        let identity_header = random_hex(16)?;
        let listener = TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            ttl: AtomicU64::new(config.ttl_secs),
            latency_ns: AtomicU64::new(nanos(config.latency)),
            allow_any: AtomicBool::new(config.allow_any),
            allow: config.allow,
            caching: AtomicBool::new(false),
            faults: Mutex::new(VecDeque::new()),
            sticky: Mutex::new(None),
            cache: Mutex::new(HashMap::new()),
            requests: AtomicU64::new(0),
            per_resource: Mutex::new(HashMap::new()),
            issued: AtomicU64::new(0),
            serial: AtomicU64::new(0),
            stopped: Mutex::new(false),
            stop_cv: Condvar::new(),
            conns: Mutex::new(Vec::new()),
            protocol,
            identity_header,
            arc_key_dir: Mutex::new(PathBuf::from(DEFAULT_ARC_KEY_DIR)),
            arc_keys: Mutex::new(VecDeque::new()),
            last_params: Mutex::new(None),
        });
        let sh = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name("cstokenfs-emulator".into())
            .spawn(move || accept_loop(listener, sh))?;
        log::debug!("emulator ({protocol}) listening on {addr}");
        Ok(Emulator {
            shared,
            addr,
            accept: Mutex::new(Some(accept)),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn protocol(&self) -> Protocol {
        self.shared.protocol
    }

    /// The token endpoint: `http://ADDR` + [`Protocol::path`], e.g.
    /// `http://127.0.0.1:PORT/oauth2/token` for Cloud Shell,
    /// `.../metadata/identity/oauth2/token` for IMDS and Arc, `.../msi/token` for App Service.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.shared.protocol.path())
    }

    /// The `X-IDENTITY-HEADER` value App Service requests must carry (32 random hex digits,
    /// new for each emulator; generated whatever the protocol).
    pub fn identity_header(&self) -> String {
        self.shared.identity_header.clone()
    }

    /// Folder for Arc challenge key files (default [`DEFAULT_ARC_KEY_DIR`]); created with
    /// mode 0700 on the first challenge if missing. Files already written stay where they are.
    pub fn set_arc_key_dir(&self, dir: PathBuf) {
        *self.shared.arc_key_dir.lock() = dir;
    }

    /// Decoded parameters (query for GET protocols, form body for Cloud Shell) of the last
    /// request that reached protocol handling (right path and method), first value of each
    /// key, undecodable UTF-8 replaced; `None` before the first one.
    pub fn last_params(&self) -> Option<BTreeMap<String, String>> {
        self.shared.last_params.lock().clone()
    }

    pub fn set_ttl(&self, secs: u64) {
        self.shared.ttl.store(secs, SeqCst);
    }

    /// Delay before each answer; concurrent requests sleep concurrently.
    pub fn set_latency(&self, d: Duration) {
        self.shared.latency_ns.store(nanos(d), SeqCst);
    }

    pub fn set_allow_any(&self, on: bool) {
        self.shared.allow_any.store(on, SeqCst);
    }

    /// Queues a one-shot fault; queued faults are consumed FIFO by the next requests.
    pub fn push_fault(&self, f: Fault) {
        self.shared.faults.lock().push_back(f);
    }

    /// Sticky fault for every request while set (queued one-shot faults take priority).
    pub fn set_fault(&self, f: Option<Fault>) {
        *self.shared.sticky.lock() = f;
    }

    /// While on, an unexpired token issued (while on) for a resource is returned again.
    /// Every call clears the cache.
    pub fn set_caching(&self, on: bool) {
        let mut cache = self.shared.cache.lock();
        cache.clear();
        self.shared.caching.store(on, SeqCst);
    }

    /// Total token requests received (right path and method; counted on arrival). An Arc
    /// fetch is two requests: the challenge and the authorized one.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(SeqCst)
    }

    /// Token requests for this resource string (as sent, form-decoded).
    pub fn requests_for(&self, resource: &str) -> u64 {
        self.shared
            .per_resource
            .lock()
            .get(resource)
            .copied()
            .unwrap_or(0)
    }

    /// Tokens newly minted (cache hits do not count).
    pub fn tokens_issued(&self) -> u64 {
        self.shared.issued.load(SeqCst)
    }

    /// Zeroes `requests`, `requests_for` and `tokens_issued` (not the token serial).
    pub fn reset_counters(&self) {
        self.shared.requests.store(0, SeqCst);
        self.shared.per_resource.lock().clear();
        self.shared.issued.store(0, SeqCst);
    }

    /// Same as dropping the emulator.
    pub fn stop(self) {}

    /// Stops from a shared reference (idempotent): closes the listener before returning,
    /// releases hung and sleeping requests, closes connections and joins every thread.
    /// Arc challenge key files this emulator wrote are removed.
    pub fn shutdown(&self) {
        *self.shared.stopped.lock() = true;
        self.shared.stop_cv.notify_all();
        if let Some(handle) = self.accept.lock().take() {
            let _ = handle.join();
        }
        let conns = std::mem::take(&mut *self.shared.conns.lock());
        for handle in conns {
            let _ = handle.join();
        }
        for key in std::mem::take(&mut *self.shared.arc_keys.lock()) {
            let _ = std::fs::remove_file(&key.path);
        }
    }

    /// Blocks the calling thread until the emulator is stopped (by `shutdown` elsewhere).
    pub fn wait(&self) {
        self.shared.wait_stopped(None);
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Decodes the payload of a JWT-shaped token (test helper).
pub fn decode_claims(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl Shared {
    /// Waits until stopped or until `timeout` passes; returns whether stopped.
    fn wait_stopped(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.and_then(|d| Instant::now().checked_add(d));
        let mut stopped = self.stopped.lock();
        while !*stopped {
            match deadline {
                Some(dl) if self.stop_cv.wait_until(&mut stopped, dl).timed_out() => break,
                Some(_) => {}
                None => self.stop_cv.wait(&mut stopped),
            }
        }
        *stopped
    }

    fn is_stopped(&self) -> bool {
        *self.stopped.lock()
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `2 * bytes` lowercase hex digits from the kernel's random source.
fn random_hex(bytes: usize) -> io::Result<String> {
    let mut raw = vec![0u8; bytes];
    File::open("/dev/urandom")?.read_exact(&mut raw)?;
    let mut out = String::with_capacity(bytes * 2);
    for b in raw {
        let _ = write!(out, "{b:02x}");
    }
    Ok(out)
}
