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
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use parking_lot::{Condvar, Mutex};
use serde::Serialize;
use serde_json::{json, Value};

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
/// Arc challenge keys remembered (and their files kept) at most; older ones are forgotten.
const MAX_ARC_KEYS: usize = 64;
const ISSUER: &str = "https://cstokenfs-emulator.invalid/";
const NOTICE: &str = "cstokenfs emulator: unsigned test token, not valid in Azure";
const POLL: Duration = Duration::from_millis(20);
const IDLE_LIMIT: Duration = Duration::from_secs(120);
const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024;

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

    fn audience_allowed(&self, resource: &str) -> bool {
        fn norm(s: &str) -> &str {
            s.strip_suffix('/').unwrap_or(s)
        }
        self.allow_any.load(SeqCst)
            || KNOWN_AUDIENCES
                .iter()
                .copied()
                .chain(self.allow.iter().map(String::as_str))
                .any(|a| norm(a) == norm(resource))
    }

    /// Mints a token for `resource`, or returns the cached one when caching is on.
    fn issue(&self, resource: &str) -> Issued {
        let now = now_secs();
        let caching = self.caching.load(SeqCst);
        let mut cache = self.cache.lock();
        if let Some(hit) = cache
            .get(resource)
            .filter(|t| caching && t.expires_on > now)
        {
            return hit.clone();
        }
        let exp = now.saturating_add(self.ttl.load(SeqCst));
        let serial = self.serial.fetch_add(1, SeqCst) + 1;
        self.issued.fetch_add(1, SeqCst);
        let claims = json!({"iss": ISSUER, "aud": resource, "iat": now, "nbf": now, "exp": exp,
            "serial": serial, "emulator": NOTICE});
        let token = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let issued = Issued {
            token,
            expires_on: exp,
            not_before: now,
        };
        if caching {
            cache.insert(resource.to_owned(), issued.clone());
        }
        issued
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

fn accept_loop(listener: TcpListener, sh: Arc<Shared>) {
    while !sh.is_stopped() {
        match listener.accept() {
            Ok((stream, _)) => {
                let conn_sh = Arc::clone(&sh);
                match thread::Builder::new().spawn(move || serve_conn(stream, &conn_sh)) {
                    Ok(handle) => {
                        let mut conns = sh.conns.lock();
                        conns.retain(|h| !h.is_finished());
                        conns.push(handle);
                    }
                    Err(e) => log::warn!("emulator: cannot spawn connection thread: {e}"),
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                sh.wait_stopped(Some(Duration::from_millis(5)));
            }
            Err(e) => {
                log::debug!("emulator: accept failed: {e}");
                sh.wait_stopped(Some(POLL));
            }
        }
    }
    // The listener is dropped (the port closed) when this returns.
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

enum Action {
    Respond {
        status: u16,
        body: Vec<u8>,
        headers: Vec<(&'static str, String)>,
    },
    Huge(usize),
    Hang,
    Close,
}

fn serve_conn(mut stream: TcpStream, sh: &Shared) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(POLL)));
    if setup
        .and_then(|()| stream.set_write_timeout(Some(POLL)))
        .is_err()
    {
        return;
    }
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        let req = match read_request(&mut stream, &mut buf, sh) {
            Ok(Some(req)) => req,
            Ok(None) => break,
            Err((status, msg)) => {
                let body = match proto_err(sh.protocol, status, "BadRequest", msg) {
                    Action::Respond { body, .. } => body,
                    _ => Vec::new(),
                };
                let _ = respond(&mut stream, sh, status, &body, &[], true);
                break;
            }
        };
        let close = !req.keep_alive;
        let sent = match handle(sh, &req) {
            Action::Respond {
                status,
                body,
                headers,
            } => respond(&mut stream, sh, status, &body, &headers, close),
            Action::Huge(bytes) => send_huge(&mut stream, sh, bytes, close),
            Action::Hang => {
                sh.wait_stopped(None);
                Err(ErrorKind::Interrupted.into())
            }
            Action::Close => Err(ErrorKind::ConnectionAborted.into()),
        };
        if sent.is_err() || close {
            break;
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// Reads more bytes into `buf`; false on EOF, error, stop or idle timeout.
fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, sh: &Shared) -> bool {
    let mut chunk = [0u8; 8192];
    let start = Instant::now();
    while !sh.is_stopped() && start.elapsed() < IDLE_LIMIT {
        match stream.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return true;
            }
            Err(e) if retryable(&e) => {}
            Err(_) => return false,
        }
    }
    false
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// Reads one request; `Ok(None)` when the connection is done, `Err` for a malformed one.
fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    sh: &Shared,
) -> Result<Option<Request>, (u16, &'static str)> {
    let head_len = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err((431, "Request header too large"));
        }
        if !fill(stream, buf, sh) {
            return Ok(None);
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err((400, "Malformed request line"));
    };
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err((400, "Unsupported HTTP version"));
    }
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err((400, "Malformed header"));
        };
        headers.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let mut req = Request {
        method: method.into(),
        path: path.into(),
        headers,
        body: Vec::new(),
        keep_alive: false,
    };
    if req.header("Transfer-Encoding").is_some() {
        return Err((411, "Content-Length required"));
    }
    let len = match req.header("Content-Length").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(n)) if n <= MAX_BODY => n,
        Some(Ok(_)) => return Err((413, "Request body too large")),
        Some(Err(_)) => return Err((400, "Malformed Content-Length")),
    };
    let conn = req
        .header("Connection")
        .unwrap_or_default()
        .to_ascii_lowercase();
    req.keep_alive = version == "HTTP/1.1" && !conn.contains("close");
    let expect = req
        .header("Expect")
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expect
        && buf.len() < head_len + len
        && send(stream, b"HTTP/1.1 100 Continue\r\n\r\n", sh).is_err()
    {
        return Ok(None);
    }
    while buf.len() < head_len + len {
        if !fill(stream, buf, sh) {
            return Ok(None);
        }
    }
    req.body = buf[head_len..head_len + len].to_vec();
    buf.drain(..head_len + len);
    Ok(Some(req))
}

fn handle(sh: &Shared, req: &Request) -> Action {
    let proto = sh.protocol;
    let (route, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    if route != proto.path() {
        return proto_err(proto, 404, "NotFound", "No such endpoint");
    }
    let method = proto.method();
    if req.method != method {
        let msg = format!("Only {method} is supported");
        return with_header(
            proto_err(proto, 405, "MethodNotAllowed", &msg),
            "Allow",
            method.into(),
        );
    }
    sh.requests.fetch_add(1, SeqCst);
    let params = match proto {
        Protocol::CloudShell => req.body.as_slice(),
        _ => query.as_bytes(),
    };
    let resource = form_value(params, "resource");
    if let Ok(Some(r)) = &resource {
        *sh.per_resource.lock().entry(r.clone()).or_insert(0) += 1;
    }
    *sh.last_params.lock() = Some(params_lossy(params));
    let shown = resource.clone().ok().flatten().unwrap_or_default();
    let action = answer(sh, req, params, resource);
    let status = match &action {
        Action::Respond { status, .. } => status.to_string(),
        Action::Huge(_) => "200 (huge body)".into(),
        Action::Hang => "hang".into(),
        Action::Close => "reset".into(),
    };
    log::debug!("emulator: {method} {route} resource={shown:?} -> {status}");
    action
}

fn answer(
    sh: &Shared,
    req: &Request,
    params: &[u8],
    resource: Result<Option<String>, ()>,
) -> Action {
    if sh.wait_stopped(Some(Duration::from_nanos(sh.latency_ns.load(SeqCst)))) {
        return Action::Close;
    }
    let fault = sh
        .faults
        .lock()
        .pop_front()
        .or_else(|| sh.sticky.lock().clone());
    let proto = sh.protocol;
    let resource_or_empty = resource.clone().ok().flatten().unwrap_or_default();
    let client_id = form_value(params, "client_id")
        .ok()
        .flatten()
        .filter(|c| !c.is_empty());
    let client_id = client_id.as_deref().unwrap_or(DEFAULT_CLIENT_ID);
    let body = |issued: &Issued, token: Option<&str>, form| {
        ok(success_body(
            proto,
            issued,
            token,
            &resource_or_empty,
            form,
            client_id,
        ))
    };
    match fault {
        Some(Fault::Status {
            code,
            body,
            retry_after,
        }) => {
            let headers = retry_after.map(|v| ("Retry-After", v)).into_iter();
            return Action::Respond {
                status: code,
                body: body.into_bytes(),
                headers: headers.collect(),
            };
        }
        Some(Fault::Hang) => return Action::Hang,
        Some(Fault::Reset) => return Action::Close,
        Some(Fault::Garbage) => return ok(b"this is not json <html>".to_vec()),
        Some(Fault::HugeBody { bytes }) => return Action::Huge(bytes),
        Some(f @ (Fault::MissingAccessToken | Fault::EmptyAccessToken)) => {
            let now = now_secs();
            let expires_on = now.saturating_add(sh.ttl.load(SeqCst));
            let fake = Issued {
                token: String::new(),
                expires_on,
                not_before: now,
            };
            let token = (f == Fault::EmptyAccessToken).then_some("");
            return body(&fake, token, ExpiresOnForm::EpochString);
        }
        Some(Fault::ExpiresOn(form)) => {
            let issued = sh.issue(&resource_or_empty);
            return body(&issued, Some(&issued.token), form);
        }
        None => {}
    }
    match proto {
        Protocol::CloudShell => answer_cloud_shell(sh, req, resource),
        Protocol::Imds => answer_imds(sh, req, params, client_id),
        Protocol::AppService => answer_app_service(sh, req, params, client_id),
        Protocol::Arc => answer_arc(sh, req, params, client_id),
    }
}

fn answer_cloud_shell(sh: &Shared, req: &Request, resource: Result<Option<String>, ()>) -> Action {
    if req.header("Metadata") != Some("true") {
        return respond_err(400, "BadRequest", "Required metadata header not specified");
    }
    let resource = match resource {
        Err(()) => return respond_err(400, "BadRequest", "Malformed form body"),
        Ok(r) => r.unwrap_or_default(),
    };
    if resource.is_empty() {
        return respond_err(
            400,
            "BadRequest",
            "Required resource parameter not specified",
        );
    }
    if !sh.audience_allowed(&resource) {
        let msg = format!(
            "Audience {resource} is not a supported MSI token audience. (cstokenfs emulator)"
        );
        return respond_err(400, "AudienceNotSupported", &msg);
    }
    let issued = sh.issue(&resource);
    ok(token_body(
        &issued,
        Some(&issued.token),
        &resource,
        ExpiresOnForm::EpochString,
    ))
}

fn answer_imds(sh: &Shared, req: &Request, params: &[u8], client_id: &str) -> Action {
    let resource = match imds_checks(req, params, IMDS_API_VERSION) {
        Ok(r) => r,
        Err(a) => return a,
    };
    imds_token(sh, Protocol::Imds, &resource, client_id)
}

fn answer_arc(sh: &Shared, req: &Request, params: &[u8], client_id: &str) -> Action {
    let resource = match imds_checks(req, params, ARC_API_VERSION) {
        Ok(r) => r,
        Err(a) => return a,
    };
    let Some(auth) = req.header("Authorization") else {
        return arc_challenge(sh, "Authorization required: resend with Authorization: Basic <contents of the key file named in WWW-Authenticate>");
    };
    let secret = auth
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Basic"))
        .map_or("", |(_, rest)| rest.trim());
    let known = !secret.is_empty()
        && sh
            .arc_keys
            .lock()
            .iter()
            .any(|k| ct_eq(k.secret.as_bytes(), secret.as_bytes()));
    if !known {
        return arc_challenge(sh, "Invalid Authorization secret");
    }
    imds_token(sh, Protocol::Arc, &resource, client_id)
}

/// IMDS / Arc request checks in order: `Metadata: true`, decodable query, api-version,
/// non-empty resource. Returns the resource.
fn imds_checks(req: &Request, params: &[u8], api_version: &str) -> Result<String, Action> {
    let bad = |msg: &str| Err(flat_err(400, "invalid_request", msg));
    if req.header("Metadata") != Some("true") {
        return bad("Required metadata header not specified");
    }
    let Ok(query) = params_strict(params) else {
        return bad("Malformed query string");
    };
    match query.get("api-version").map(String::as_str) {
        None | Some("") => {
            return bad(&format!(
                "Required api-version parameter not specified (expected {api_version})"
            ))
        }
        Some(v) if v != api_version => {
            return bad(&format!(
                "Unsupported api-version {v} (expected {api_version})"
            ))
        }
        Some(_) => {}
    }
    match query.get("resource") {
        Some(r) if !r.is_empty() => Ok(r.clone()),
        _ => bad("Required resource parameter not specified"),
    }
}

/// Audience check and the IMDS-shaped token answer (IMDS and Arc).
fn imds_token(sh: &Shared, proto: Protocol, resource: &str, client_id: &str) -> Action {
    if !sh.audience_allowed(resource) {
        return flat_err(400, "invalid_resource", &aadsts500011(resource));
    }
    let issued = sh.issue(resource);
    ok(success_body(
        proto,
        &issued,
        Some(&issued.token),
        resource,
        ExpiresOnForm::EpochString,
        client_id,
    ))
}

fn answer_app_service(sh: &Shared, req: &Request, params: &[u8], client_id: &str) -> Action {
    match req.header("X-IDENTITY-HEADER") {
        None => return app_err(401, "X-IDENTITY-HEADER header not specified"),
        Some(h) if !ct_eq(h.as_bytes(), sh.identity_header.as_bytes()) => {
            return app_err(401, "Invalid X-IDENTITY-HEADER")
        }
        Some(_) => {}
    }
    let Ok(query) = params_strict(params) else {
        return app_err(400, "Malformed query string");
    };
    match query.get("api-version").map(String::as_str) {
        None | Some("") => {
            return app_err(
                400,
                &format!("api-version not specified (expected {APP_SERVICE_API_VERSION})"),
            )
        }
        Some(v) if v != APP_SERVICE_API_VERSION => {
            return app_err(
                400,
                &format!("Unsupported api-version {v} (expected {APP_SERVICE_API_VERSION})"),
            )
        }
        Some(_) => {}
    }
    let resource = match query.get("resource") {
        Some(r) if !r.is_empty() => r.as_str(),
        _ => return app_err(400, "Required resource parameter not specified"),
    };
    if !sh.audience_allowed(resource) {
        return app_err(400, &aadsts500011(resource));
    }
    let issued = sh.issue(resource);
    ok(success_body(
        Protocol::AppService,
        &issued,
        Some(&issued.token),
        resource,
        ExpiresOnForm::EpochString,
        client_id,
    ))
}

fn aadsts500011(resource: &str) -> String {
    format!(
        "AADSTS500011: The resource principal named {resource} was not found in the tenant. (cstokenfs emulator)"
    )
}

/// Writes a fresh key file and answers 401 naming it; 500 if the file cannot be written.
fn arc_challenge(sh: &Shared, message: &str) -> Action {
    let dir = sh.arc_key_dir.lock().clone();
    let (path, secret) = match write_arc_key(&dir) {
        Ok(k) => k,
        Err(e) => {
            log::warn!(
                "emulator: cannot write an Arc key file in {}: {e}",
                dir.display()
            );
            return flat_err(500, "server_error", "Cannot write the challenge key file");
        }
    };
    let realm = format!("Basic realm={}", path.display());
    {
        let mut keys = sh.arc_keys.lock();
        keys.push_back(ArcKey { secret, path });
        while keys.len() > MAX_ARC_KEYS {
            if let Some(old) = keys.pop_front() {
                let _ = std::fs::remove_file(&old.path);
            }
        }
    }
    with_header(
        flat_err(401, "unauthorized", message),
        "WWW-Authenticate",
        realm,
    )
}

/// `<dir>/<32 hex>.key` holding 64 hex digits (no newline), mode 0600; `dir` is created
/// (mode 0700) if missing.
fn write_arc_key(dir: &Path) -> io::Result<(PathBuf, String)> {
    if !dir.is_dir() {
        DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let secret = random_hex(32)?;
    let path = dir.join(format!("{}.key", random_hex(16)?));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(secret.as_bytes())?;
    Ok((path, secret))
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

/// Equality whose time does not depend on where the inputs differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn ok(body: Vec<u8>) -> Action {
    Action::Respond {
        status: 200,
        body,
        headers: Vec::new(),
    }
}

fn with_header(mut action: Action, name: &'static str, value: String) -> Action {
    if let Action::Respond { headers, .. } = &mut action {
        headers.push((name, value));
    }
    action
}

/// The success body in `proto`'s shape.
fn success_body(
    proto: Protocol,
    t: &Issued,
    access_token: Option<&str>,
    resource: &str,
    form: ExpiresOnForm,
    client_id: &str,
) -> Vec<u8> {
    let (expires_in, expires_on) = expiry_fields(t, form);
    let body = match proto {
        Protocol::CloudShell => return token_body(t, access_token, resource, form),
        Protocol::Imds | Protocol::Arc => serde_json::to_vec(&ImdsBody {
            access_token,
            client_id,
            expires_in,
            expires_on,
            ext_expires_in: t.expires_on.saturating_sub(now_secs()).to_string(),
            not_before: t.not_before.to_string(),
            resource,
            token_type: "Bearer",
        }),
        Protocol::AppService => {
            // App Service has no `expires_in`; only the forms that are about it add one.
            let expires_in = match form {
                ExpiresOnForm::OnlyExpiresIn | ExpiresOnForm::ExpiresInNumber => expires_in,
                _ => None,
            };
            serde_json::to_vec(&AppServiceBody {
                access_token,
                expires_in,
                expires_on,
                resource,
                token_type: "Bearer",
                client_id,
            })
        }
    };
    body.unwrap_or_default()
}

#[derive(Serialize)]
struct TokenBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    access_token: Option<&'a str>,
    refresh_token: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_on: Option<Value>,
    not_before: String,
    resource: &'a str,
    token_type: &'static str,
}

#[derive(Serialize)]
struct ImdsBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    access_token: Option<&'a str>,
    client_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_on: Option<Value>,
    ext_expires_in: String,
    not_before: String,
    resource: &'a str,
    token_type: &'static str,
}

#[derive(Serialize)]
struct AppServiceBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    access_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_on: Option<Value>,
    resource: &'a str,
    token_type: &'static str,
    client_id: &'a str,
}

fn token_body(
    t: &Issued,
    access_token: Option<&str>,
    resource: &str,
    form: ExpiresOnForm,
) -> Vec<u8> {
    let (expires_in, expires_on) = expiry_fields(t, form);
    let body = TokenBody {
        access_token,
        refresh_token: "",
        expires_in,
        expires_on,
        not_before: t.not_before.to_string(),
        resource,
        token_type: "Bearer",
    };
    serde_json::to_vec(&body).unwrap_or_default()
}

/// `(expires_in, expires_on)` in `form`.
fn expiry_fields(t: &Issued, form: ExpiresOnForm) -> (Option<Value>, Option<Value>) {
    let left = t.expires_on.saturating_sub(now_secs());
    let text = |n: u64| Some(Value::String(n.to_string()));
    match form {
        ExpiresOnForm::EpochString => (text(left), text(t.expires_on)),
        ExpiresOnForm::EpochNumber => (text(left), Some(json!(t.expires_on))),
        ExpiresOnForm::LegacyDateAmPm => (
            text(left),
            Some(Value::String(legacy_date(t.expires_on, true))),
        ),
        ExpiresOnForm::LegacyDate24h => (
            text(left),
            Some(Value::String(legacy_date(t.expires_on, false))),
        ),
        ExpiresOnForm::OnlyExpiresIn => (text(left), None),
        ExpiresOnForm::ExpiresInNumber => (Some(json!(left)), None),
        ExpiresOnForm::Nothing => (None, None),
        ExpiresOnForm::GarbageString => (None, Some(json!("soon"))),
    }
}

/// `M/D/YYYY h:mm:ss AM +00:00` (`am_pm`) or `MM/DD/YYYY HH:mm:ss +00:00`, in UTC.
fn legacy_date(epoch: u64, am_pm: bool) -> String {
    let (y, m, d) = crate::civil::civil_from_days(i64::try_from(epoch / 86_400).unwrap_or(0));
    let secs = epoch % 86_400;
    let (h, mi, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if am_pm {
        let h12 = if h % 12 == 0 { 12 } else { h % 12 };
        let half = if h < 12 { "AM" } else { "PM" };
        format!("{m}/{d}/{y} {h12}:{mi:02}:{s:02} {half} +00:00")
    } else {
        format!("{m:02}/{d:02}/{y} {h:02}:{mi:02}:{s:02} +00:00")
    }
}

/// Value of `key` in an `application/x-www-form-urlencoded` body; `Err` if undecodable.
fn form_value(body: &[u8], key: &str) -> Result<Option<String>, ()> {
    let text = std::str::from_utf8(body).map_err(|_| ())?;
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if decode_component(k, false)? == key {
            return decode_component(v, false).map(Some);
        }
    }
    Ok(None)
}

/// One form component: `+` is a space, then percent-decoding.
fn decode_component(s: &str, lossy: bool) -> Result<String, ()> {
    let s = s.replace('+', " ");
    let bytes = percent_encoding::percent_decode_str(&s);
    if lossy {
        Ok(bytes.decode_utf8_lossy().into_owned())
    } else {
        bytes.decode_utf8().map(|c| c.into_owned()).map_err(|_| ())
    }
}

/// Decodes a whole form / query string (first value of each key wins); `lossy` replaces
/// undecodable UTF-8 instead of failing.
fn params(text: &[u8], lossy: bool) -> Result<BTreeMap<String, String>, ()> {
    let text = if lossy {
        String::from_utf8_lossy(text)
    } else {
        std::borrow::Cow::Borrowed(std::str::from_utf8(text).map_err(|_| ())?)
    };
    let mut out = BTreeMap::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode_component(k, lossy)?;
        if let std::collections::btree_map::Entry::Vacant(slot) = out.entry(key) {
            slot.insert(decode_component(v, lossy)?);
        }
    }
    Ok(out)
}

fn params_strict(text: &[u8]) -> Result<BTreeMap<String, String>, ()> {
    params(text, false)
}

fn params_lossy(text: &[u8]) -> BTreeMap<String, String> {
    params(text, true).unwrap_or_default()
}

fn error_body(code: &str, message: &str) -> Vec<u8> {
    json!({"error": {"code": code, "message": message}})
        .to_string()
        .into_bytes()
}

/// Cloud Shell error: `{"error":{"code","message"}}`.
fn respond_err(status: u16, code: &str, message: &str) -> Action {
    Action::Respond {
        status,
        body: error_body(code, message),
        headers: Vec::new(),
    }
}

/// IMDS / Arc error: `{"error","error_description"}`.
fn flat_err(status: u16, error: &str, description: &str) -> Action {
    Action::Respond {
        status,
        body: json!({"error": error, "error_description": description})
            .to_string()
            .into_bytes(),
        headers: Vec::new(),
    }
}

/// App Service error: `{"statusCode","message"}`.
fn app_err(status: u16, message: &str) -> Action {
    Action::Respond {
        status,
        body: json!({"statusCode": status, "message": message})
            .to_string()
            .into_bytes(),
        headers: Vec::new(),
    }
}

/// An error in `proto`'s shape; `code` is the Cloud Shell code (the flat IMDS code is
/// derived from the status).
fn proto_err(proto: Protocol, status: u16, code: &str, message: &str) -> Action {
    match proto {
        Protocol::CloudShell => respond_err(status, code, message),
        Protocol::Imds | Protocol::Arc => {
            let error = match status {
                401 => "unauthorized",
                404 => "not_found",
                405 => "method_not_allowed",
                s if s >= 500 => "server_error",
                _ => "invalid_request",
            };
            flat_err(status, error, message)
        }
        Protocol::AppService => app_err(status, message),
    }
}

fn head(status: u16, len: usize, headers: &[(&str, String)], close: bool) -> String {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    };
    let mut h = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n"
    );
    for (name, value) in headers {
        let v: String = value.chars().filter(|c| !c.is_control()).collect();
        let _ = write!(h, "{name}: {v}\r\n");
    }
    h.push_str(if close {
        "Connection: close\r\n\r\n"
    } else {
        "\r\n"
    });
    h
}

fn respond(
    stream: &mut TcpStream,
    sh: &Shared,
    status: u16,
    body: &[u8],
    headers: &[(&str, String)],
    close: bool,
) -> io::Result<()> {
    let mut out = head(status, body.len(), headers, close).into_bytes();
    out.extend_from_slice(body);
    send(stream, &out, sh)
}

/// Streams `bytes` bytes (spaces then `{}`) without allocating them.
fn send_huge(stream: &mut TcpStream, sh: &Shared, bytes: usize, close: bool) -> io::Result<()> {
    send(stream, head(200, bytes, &[], close).as_bytes(), sh)?;
    let tail = &b"{}"[..bytes.min(2)];
    let spaces = [b' '; 16 * 1024];
    let mut left = bytes - tail.len();
    while left > 0 {
        let n = left.min(spaces.len());
        send(stream, &spaces[..n], sh)?;
        left -= n;
    }
    send(stream, tail, sh)
}

/// `write_all` that keeps retrying on write timeouts until the emulator stops.
fn send(stream: &mut TcpStream, mut data: &[u8], sh: &Shared) -> io::Result<()> {
    while !data.is_empty() {
        match stream.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if retryable(&e) && !sh.is_stopped() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

    const MGMT: &str = "https://management.azure.com/";

    fn emu() -> Emulator {
        Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default()).unwrap()
    }

    /// Sends one raw HTTP/1.1 request; returns (status, head, body). Status 0 = no response.
    fn raw(
        emu: &Emulator,
        method: &str,
        path: &str,
        extra: &str,
        body: &str,
    ) -> (u16, String, Vec<u8>) {
        let mut s = TcpStream::connect(emu.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let Some(split) = out.windows(4).position(|w| w == b"\r\n\r\n") else {
            return (0, String::new(), out);
        };
        let head = String::from_utf8_lossy(&out[..split]).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, head, out[split + 4..].to_vec())
    }

    fn post(emu: &Emulator, resource: &str) -> (u16, Value) {
        let body = format!(
            "resource={}",
            utf8_percent_encode(resource, NON_ALPHANUMERIC)
        );
        let (status, _, body) = raw(emu, "POST", TOKEN_PATH, "Metadata: true\r\n", &body);
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    fn claims(v: &Value) -> Value {
        decode_claims(v["access_token"].as_str().unwrap()).unwrap()
    }

    const VAULT: &str = "https://vault.azure.net";
    const EVIL: &str = "https://evil.example/x";
    const META: &str = "Metadata: true\r\n";

    fn emu_with(protocol: Protocol) -> Emulator {
        let any = "127.0.0.1:0".parse().unwrap();
        Emulator::start_with(any, EmulatorConfig::default(), protocol).unwrap()
    }

    fn enc(s: &str) -> String {
        utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
    }

    /// `api-version=API&resource=<enc R>` followed by `more` (starting with `&`).
    fn query(api: &str, resource: &str, more: &str) -> String {
        format!("api-version={api}&resource={}{more}", enc(resource))
    }

    /// GET of the emulator's token path with `query`; returns (status, head, JSON body).
    fn get(emu: &Emulator, query: &str, extra: &str) -> (u16, String, Value) {
        let path = format!("{}?{query}", emu.protocol().path());
        let (status, head, body) = raw(emu, "GET", &path, extra, "");
        (
            status,
            head,
            serde_json::from_slice(&body).unwrap_or(Value::Null),
        )
    }

    fn keys(v: &Value) -> Vec<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    fn num(v: &Value, k: &str) -> u64 {
        v[k].as_str().unwrap().parse().unwrap()
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn flat(error: &str, description: &str) -> Value {
        json!({"error": error, "error_description": description})
    }

    fn unique_dir(tag: &str) -> PathBuf {
        let id = random_hex(8).unwrap();
        std::env::temp_dir().join(format!("cstokenfs-emu-{tag}-{}-{id}", std::process::id()))
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn success_shape() {
        let emu = emu();
        let (status, v) = post(&emu, MGMT);
        assert_eq!(status, 200);
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        let want = [
            "access_token",
            "expires_in",
            "expires_on",
            "not_before",
            "refresh_token",
            "resource",
            "token_type",
        ];
        assert_eq!(keys, want);
        assert!(v.as_object().unwrap().values().all(Value::is_string));
        assert_eq!(
            (v["token_type"].as_str(), v["refresh_token"].as_str()),
            (Some("Bearer"), Some(""))
        );
        let num = |k: &str| v[k].as_str().unwrap().parse::<u64>().unwrap();
        assert_eq!(num("expires_on") - num("not_before"), 3600);
        assert!((3599..=3600).contains(&num("expires_in")));
        let token = v["access_token"].as_str().unwrap();
        assert_eq!(token.matches('.').count(), 2);
        assert!(token.ends_with('.') && !token.contains('='));
        let header = URL_SAFE_NO_PAD
            .decode(token.split('.').next().unwrap())
            .unwrap();
        assert_eq!(header, br#"{"alg":"none","typ":"JWT"}"#);
        let c = claims(&v);
        assert_eq!(
            (c["aud"].as_str(), c["iss"].as_str(), c["serial"].as_u64()),
            (Some(MGMT), Some(ISSUER), Some(1))
        );
        assert_eq!(
            c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(),
            3600
        );
        assert_eq!(c["nbf"], c["iat"]);
        assert_eq!(c["emulator"], NOTICE);
    }

    #[test]
    fn aud_is_resource_as_sent() {
        let emu = emu();
        for r in [
            MGMT,
            "https://management.azure.com",
            "https://vault.azure.net/",
            "6dae42f8-4368-4678-94ff-3960e28e3630",
        ] {
            let (status, v) = post(&emu, r);
            assert_eq!(status, 200, "{r}");
            assert_eq!(
                (v["resource"].as_str(), claims(&v)["aud"].as_str()),
                (Some(r), Some(r))
            );
        }
        let (status, _, body) = raw(
            &emu,
            "POST",
            TOKEN_PATH,
            "Metadata: true\r\n",
            "x=1&resource=https%3A%2F%2Fvault.azure.net",
        );
        assert_eq!(status, 200);
        assert!(String::from_utf8_lossy(&body).contains(r#""resource":"https://vault.azure.net""#));
    }

    #[test]
    fn refused_and_allowed_audiences() {
        let config = EmulatorConfig {
            allow: vec!["api://custom/".into()],
            ..EmulatorConfig::default()
        };
        let emu = Emulator::start("127.0.0.1:0".parse().unwrap(), config).unwrap();
        let (status, v) = post(&emu, "https://evil.example/x y");
        assert_eq!(status, 400);
        assert_eq!(v["error"]["code"], "AudienceNotSupported");
        let msg = "Audience https://evil.example/x y is not a supported MSI token audience. (cstokenfs emulator)";
        assert_eq!(v["error"]["message"], msg);
        assert_eq!(post(&emu, "https://management.azure.com//").0, 400);
        assert_eq!(post(&emu, "api://custom").0, 200);
        emu.set_allow_any(true);
        let (status, v) = post(&emu, "https://evil.example/x y");
        assert_eq!(
            (status, claims(&v)["aud"].as_str()),
            (200, Some("https://evil.example/x y"))
        );
        let (status, _, body) = raw(
            &emu,
            "POST",
            TOKEN_PATH,
            "Metadata: true\r\n",
            "resource=a+b%2B",
        );
        assert_eq!(status, 200);
        assert!(String::from_utf8_lossy(&body).contains(r#""resource":"a b+""#));
    }

    #[test]
    fn bad_requests() {
        let emu = emu();
        let bad = |status: u16, body: &[u8]| {
            assert_eq!(status, 400);
            let v: Value = serde_json::from_slice(body).unwrap();
            assert_eq!(v["error"]["code"], "BadRequest");
            v["error"]["message"].as_str().unwrap().to_owned()
        };
        let form = "resource=https%3A%2F%2Fmanagement.azure.com%2F";
        let (s, _, b) = raw(&emu, "POST", TOKEN_PATH, "", form);
        assert_eq!(bad(s, &b), "Required metadata header not specified");
        let (s, _, b) = raw(&emu, "POST", TOKEN_PATH, "Metadata: false\r\n", form);
        assert_eq!(bad(s, &b), "Required metadata header not specified");
        for body in [
            "",
            "resource=",
            "other=1",
            "resource=%FF",
            "resource=%C3%28",
        ] {
            let (s, _, b) = raw(&emu, "POST", TOKEN_PATH, "Metadata: true\r\n", body);
            bad(s, &b);
        }
        assert_eq!(
            raw(&emu, "POST", "/other", "Metadata: true\r\n", form).0,
            404
        );
        let (s, head, _) = raw(&emu, "GET", TOKEN_PATH, "Metadata: true\r\n", "");
        assert!(s == 405 && head.contains("Allow: POST"));
        assert_eq!(emu.requests(), 7);
        assert_eq!(emu.tokens_issued(), 0);
    }

    #[test]
    fn serial_counters_and_keep_alive() {
        let emu = emu();
        for want in 1..=3 {
            assert_eq!(claims(&post(&emu, MGMT).1)["serial"].as_u64(), Some(want));
        }
        post(&emu, "https://vault.azure.net");
        assert_eq!((emu.requests(), emu.tokens_issued()), (4, 4));
        assert_eq!(
            (
                emu.requests_for(MGMT),
                emu.requests_for("https://vault.azure.net")
            ),
            (3, 1)
        );
        emu.reset_counters();
        assert_eq!(
            (emu.requests(), emu.requests_for(MGMT), emu.tokens_issued()),
            (0, 0, 0)
        );
        // Two pipelined requests on one keep-alive connection; serial keeps counting.
        let mut s = TcpStream::connect(emu.addr()).unwrap();
        let one = "POST /oauth2/token HTTP/1.1\r\nMetadata: true\r\nContent-Length: 29\r\n\r\nresource=https://ai.azure.com";
        s.write_all(
            format!(
                "{one}{}",
                one.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n")
            )
            .as_bytes(),
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2);
        assert_eq!(
            (
                emu.requests_for("https://ai.azure.com"),
                emu.tokens_issued()
            ),
            (2, 2)
        );
        assert_eq!(claims(&post(&emu, MGMT).1)["serial"].as_u64(), Some(7));
    }

    #[test]
    fn caching_returns_same_token() {
        let emu = emu();
        emu.set_caching(true);
        let (_, a) = post(&emu, MGMT);
        let (_, b) = post(&emu, MGMT);
        assert_eq!(
            (&a["access_token"], &a["expires_on"]),
            (&b["access_token"], &b["expires_on"])
        );
        let (_, c) = post(&emu, "https://management.azure.com");
        assert_ne!(a["access_token"], c["access_token"]);
        assert_eq!(emu.tokens_issued(), 2);
        emu.set_caching(false);
        assert_ne!(post(&emu, MGMT).1["access_token"], a["access_token"]);
        emu.set_caching(true);
        emu.set_ttl(0);
        let (_, d) = post(&emu, MGMT);
        assert_eq!(d["expires_in"], "0");
        assert_ne!(post(&emu, MGMT).1["access_token"], d["access_token"]);
    }

    #[test]
    fn status_garbage_and_token_shape_faults() {
        let emu = emu();
        let retry = Some("7".to_owned());
        emu.push_fault(Fault::Status {
            code: 429,
            body: "{\"x\":1}".into(),
            retry_after: retry,
        });
        emu.push_fault(Fault::Garbage);
        emu.push_fault(Fault::MissingAccessToken);
        emu.push_fault(Fault::EmptyAccessToken);
        let form = "resource=https%3A%2F%2Fmanagement.azure.com%2F";
        let (s, head, body) = raw(&emu, "POST", TOKEN_PATH, "Metadata: true\r\n", form);
        assert!(s == 429 && head.contains("Retry-After: 7") && body == b"{\"x\":1}");
        assert_eq!(
            raw(&emu, "POST", TOKEN_PATH, "", form).2,
            b"this is not json <html>"
        );
        let (s, v) = post(&emu, MGMT);
        assert!(s == 200 && v.get("access_token").is_none() && v["expires_on"].is_string());
        assert_eq!(post(&emu, MGMT).1["access_token"], "");
        emu.set_fault(Some(Fault::Garbage));
        emu.push_fault(Fault::Status {
            code: 503,
            body: String::new(),
            retry_after: None,
        });
        assert_eq!(post(&emu, MGMT).0, 503);
        assert_eq!(post(&emu, MGMT).1, Value::Null);
        assert_eq!(post(&emu, MGMT).1, Value::Null);
        emu.set_fault(None);
        assert_eq!(post(&emu, MGMT).0, 200);
        assert_eq!((emu.requests(), emu.tokens_issued()), (8, 1));
    }

    #[test]
    fn expires_on_forms() {
        let emu = emu();
        let on = |f| {
            emu.push_fault(Fault::ExpiresOn(f));
            let (s, v) = post(&emu, MGMT);
            assert!(s == 200 && claims(&v)["aud"] == MGMT);
            (
                v.get("expires_in").cloned(),
                v.get("expires_on").cloned(),
                claims(&v)["exp"].as_u64().unwrap(),
            )
        };
        let (i, o, exp) = on(ExpiresOnForm::EpochString);
        assert!(i.unwrap().is_string() && o == Some(json!(exp.to_string())));
        let (_, o, exp) = on(ExpiresOnForm::EpochNumber);
        assert_eq!(o, Some(json!(exp)));
        let (_, o, exp) = on(ExpiresOnForm::LegacyDateAmPm);
        assert_eq!(o, Some(json!(legacy_date(exp, true))));
        let (_, o, exp) = on(ExpiresOnForm::LegacyDate24h);
        assert_eq!(o, Some(json!(legacy_date(exp, false))));
        let (i, o, _) = on(ExpiresOnForm::OnlyExpiresIn);
        assert!(i.unwrap().is_string() && o.is_none());
        let (i, o, _) = on(ExpiresOnForm::ExpiresInNumber);
        assert!(i.unwrap().is_u64() && o.is_none());
        assert_eq!(on(ExpiresOnForm::Nothing).0, None);
        let (i, o, _) = on(ExpiresOnForm::GarbageString);
        assert!(i.is_none() && o == Some(json!("soon")));
        assert_eq!(emu.tokens_issued(), 8);
    }

    #[test]
    fn protocol_names_urls_and_identity_header() {
        for p in Protocol::ALL {
            assert_eq!(p.name().parse::<Protocol>(), Ok(p));
            assert_eq!(p.to_string(), p.name());
        }
        assert_eq!("IMDS".parse::<Protocol>(), Ok(Protocol::Imds));
        let err = "cloud-shell".parse::<Protocol>().unwrap_err();
        assert!(err.contains("cloudshell, imds, appservice, arc"), "{err}");
        let cs = emu();
        assert_eq!(cs.protocol(), Protocol::CloudShell);
        assert_eq!(cs.last_params(), None);
        for (p, path) in [
            (Protocol::CloudShell, "/oauth2/token"),
            (Protocol::Imds, "/metadata/identity/oauth2/token"),
            (Protocol::AppService, "/msi/token"),
            (Protocol::Arc, "/metadata/identity/oauth2/token"),
        ] {
            let emu = emu_with(p);
            let port = emu.addr().port();
            assert_eq!(emu.url(), format!("http://127.0.0.1:{port}{path}"));
            assert_eq!(emu.protocol(), p);
        }
        let (a, b) = (cs.identity_header(), emu().identity_header());
        assert!(a.len() == 32 && a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn last_params_cloud_shell() {
        let emu = emu();
        let form = "resource=https%3A%2F%2Fvault.azure.net&x=a+b&x=second&bad=%FF";
        assert_eq!(raw(&emu, "POST", TOKEN_PATH, META, form).0, 200);
        let want = map(&[("resource", VAULT), ("x", "a b"), ("bad", "\u{FFFD}")]);
        assert_eq!(emu.last_params(), Some(want.clone()));
        // Wrong path or method never reaches protocol handling.
        assert_eq!(raw(&emu, "POST", "/x", META, "resource=y").0, 404);
        assert_eq!(raw(&emu, "GET", TOKEN_PATH, META, "").0, 405);
        assert_eq!(emu.last_params(), Some(want));
        assert_eq!(raw(&emu, "POST", TOKEN_PATH, META, "").0, 400);
        assert_eq!(emu.last_params(), Some(BTreeMap::new()));
    }

    #[test]
    fn imds_success_and_params() {
        let emu = emu_with(Protocol::Imds);
        let q = query(IMDS_API_VERSION, VAULT, "&client_id=abc-123");
        let (status, _, v) = get(&emu, &q, META);
        assert_eq!(status, 200);
        let want = [
            "access_token",
            "client_id",
            "expires_in",
            "expires_on",
            "ext_expires_in",
            "not_before",
            "resource",
            "token_type",
        ];
        assert_eq!(keys(&v), want);
        assert!(v.as_object().unwrap().values().all(Value::is_string));
        assert_eq!(
            (v["client_id"].as_str(), v["resource"].as_str()),
            (Some("abc-123"), Some(VAULT))
        );
        assert_eq!(v["token_type"], "Bearer");
        assert_eq!(num(&v, "expires_on") - num(&v, "not_before"), 3600);
        assert!((3599..=3600).contains(&num(&v, "ext_expires_in")));
        let c = claims(&v);
        assert_eq!(
            (c["aud"].as_str(), c["exp"].as_u64()),
            (Some(VAULT), Some(num(&v, "expires_on")))
        );
        let params = [
            ("api-version", IMDS_API_VERSION),
            ("resource", VAULT),
            ("client_id", "abc-123"),
        ];
        assert_eq!(emu.last_params(), Some(map(&params)));
        let (status, _, v) = get(
            &emu,
            &query(IMDS_API_VERSION, VAULT, "&object_id=o-1"),
            META,
        );
        assert_eq!(
            (status, v["client_id"].as_str()),
            (200, Some(DEFAULT_CLIENT_ID))
        );
        let p = emu.last_params().unwrap();
        assert!(p["object_id"] == "o-1" && !p.contains_key("client_id"));
        let res_id = "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/u i";
        let more = format!("&msi_res_id={}", enc(res_id));
        assert_eq!(
            get(&emu, &query(IMDS_API_VERSION, VAULT, &more), META).0,
            200
        );
        assert_eq!(emu.last_params().unwrap()["msi_res_id"], res_id);
        assert_eq!(
            (emu.requests(), emu.requests_for(VAULT), emu.tokens_issued()),
            (3, 3, 3)
        );
    }

    #[test]
    fn imds_errors() {
        let emu = emu_with(Protocol::Imds);
        let good = query(IMDS_API_VERSION, MGMT, "");
        let missing_meta = flat("invalid_request", "Required metadata header not specified");
        for extra in ["", "Metadata: false\r\n"] {
            let (status, _, v) = get(&emu, &good, extra);
            assert_eq!((status, v), (400, missing_meta.clone()));
        }
        for q in [
            format!("resource={}", enc(MGMT)),
            format!("api-version=&resource={}", enc(MGMT)),
            query("2019-08-01", MGMT, ""),
            format!("api-version={IMDS_API_VERSION}"),
            query(IMDS_API_VERSION, "", ""),
            format!("api-version={IMDS_API_VERSION}&resource=%FF"),
        ] {
            let (status, _, v) = get(&emu, &q, META);
            assert_eq!(
                (status, v["error"].as_str()),
                (400, Some("invalid_request")),
                "{q}"
            );
            assert!(v["error_description"].is_string() && keys(&v).len() == 2);
        }
        let (status, _, v) = get(&emu, &query(IMDS_API_VERSION, EVIL, ""), META);
        let msg = format!("AADSTS500011: The resource principal named {EVIL} was not found in the tenant. (cstokenfs emulator)");
        assert_eq!((status, v), (400, flat("invalid_resource", &msg)));
        let (status, head, body) = raw(&emu, "POST", IMDS_PATH, META, &good);
        assert!(status == 405 && head.contains("Allow: GET"), "{head}");
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "method_not_allowed");
        let (status, _, body) = raw(&emu, "GET", &format!("{TOKEN_PATH}?{good}"), META, "");
        assert_eq!(status, 404);
        assert!(serde_json::from_slice::<Value>(&body).unwrap()["error"].is_string());
        emu.set_allow_any(true);
        let (status, _, v) = get(&emu, &query(IMDS_API_VERSION, EVIL, ""), META);
        assert_eq!((status, claims(&v)["aud"].as_str()), (200, Some(EVIL)));
        assert_eq!((emu.requests(), emu.tokens_issued()), (10, 1));
        assert_eq!((emu.requests_for(MGMT), emu.requests_for(EVIL)), (5, 2));
    }

    #[test]
    fn app_service_success_and_params() {
        let emu = emu_with(Protocol::AppService);
        let secret = format!("X-IDENTITY-HEADER: {}\r\n", emu.identity_header());
        let (status, _, v) = get(&emu, &query(APP_SERVICE_API_VERSION, VAULT, ""), &secret);
        assert_eq!(status, 200);
        let want = [
            "access_token",
            "client_id",
            "expires_on",
            "resource",
            "token_type",
        ];
        assert_eq!(keys(&v), want);
        assert!(v.as_object().unwrap().values().all(Value::is_string));
        assert_eq!(
            (
                v["client_id"].as_str(),
                v["resource"].as_str(),
                v["token_type"].as_str()
            ),
            (Some(DEFAULT_CLIENT_ID), Some(VAULT), Some("Bearer"))
        );
        let c = claims(&v);
        assert_eq!(
            (c["aud"].as_str(), c["exp"].as_u64()),
            (Some(VAULT), Some(num(&v, "expires_on")))
        );
        let lower = secret.to_ascii_lowercase().replace(
            &emu.identity_header().to_ascii_lowercase(),
            &emu.identity_header(),
        );
        let (status, _, v) = get(
            &emu,
            &query(APP_SERVICE_API_VERSION, VAULT, "&client_id=c-9"),
            &lower,
        );
        assert_eq!((status, v["client_id"].as_str()), (200, Some("c-9")));
        assert_eq!(emu.last_params().unwrap()["client_id"], "c-9");
        for (key, value) in [
            ("mi_res_id", "/subscriptions/s/x y"),
            ("principal_id", "p-1"),
        ] {
            let more = format!("&{key}={}", enc(value));
            let (status, _, v) = get(&emu, &query(APP_SERVICE_API_VERSION, VAULT, &more), &secret);
            assert_eq!(
                (status, v["client_id"].as_str()),
                (200, Some(DEFAULT_CLIENT_ID))
            );
            let params = [
                ("api-version", APP_SERVICE_API_VERSION),
                ("resource", VAULT),
                (key, value),
            ];
            assert_eq!(emu.last_params(), Some(map(&params)));
        }
        assert_eq!((emu.requests_for(VAULT), emu.tokens_issued()), (4, 4));
    }

    #[test]
    fn app_service_errors() {
        let emu = emu_with(Protocol::AppService);
        let secret = format!("X-IDENTITY-HEADER: {}\r\n", emu.identity_header());
        let good = query(APP_SERVICE_API_VERSION, MGMT, "");
        let wrong = format!("X-IDENTITY-HEADER: {}\r\n", "0".repeat(32));
        for extra in ["", META, &wrong, "X-IDENTITY-HEADER:\r\n"] {
            let (status, _, v) = get(&emu, &good, extra);
            assert_eq!(
                (status, v["statusCode"].as_u64()),
                (401, Some(401)),
                "{extra}"
            );
            assert!(v["message"].is_string() && keys(&v).len() == 2);
            assert!(!v.to_string().contains(&emu.identity_header()));
        }
        for q in [
            format!("resource={}", enc(MGMT)),
            query(IMDS_API_VERSION, MGMT, ""),
            format!("api-version={APP_SERVICE_API_VERSION}"),
            format!("api-version={APP_SERVICE_API_VERSION}&resource=%C3%28"),
        ] {
            let (status, _, v) = get(&emu, &q, &secret);
            assert_eq!((status, v["statusCode"].as_u64()), (400, Some(400)), "{q}");
            assert!(v["message"].is_string() && keys(&v).len() == 2);
        }
        let (status, _, v) = get(&emu, &query(APP_SERVICE_API_VERSION, EVIL, ""), &secret);
        let msg = format!("AADSTS500011: The resource principal named {EVIL} was not found in the tenant. (cstokenfs emulator)");
        assert_eq!(
            (status, v),
            (400, json!({"statusCode": 400, "message": msg}))
        );
        let (status, head, body) = raw(&emu, "POST", APP_SERVICE_PATH, &secret, &good);
        assert!(status == 405 && head.contains("Allow: GET"));
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap()["statusCode"],
            405
        );
        assert_eq!((emu.requests(), emu.tokens_issued()), (9, 0));
        assert_eq!(get(&emu, &good, &secret).0, 200);
    }

    #[test]
    fn arc_challenge_round_trip() {
        let base = unique_dir("arc");
        let dir = base.join("tokens");
        let emu = emu_with(Protocol::Arc);
        emu.set_arc_key_dir(dir.clone());
        let good = query(ARC_API_VERSION, MGMT, "");
        let (status, _, v) = get(&emu, &good, "");
        assert_eq!(
            (status, v),
            (
                400,
                flat("invalid_request", "Required metadata header not specified")
            )
        );
        let (status, _, v) = get(&emu, &query(IMDS_API_VERSION, MGMT, ""), META);
        assert_eq!(
            (status, v["error"].as_str()),
            (400, Some("invalid_request"))
        );
        assert!(!dir.exists());
        let challenge = |extra: &str| {
            let (status, head, v) = get(&emu, &good, &format!("{META}{extra}"));
            assert_eq!(status, 401, "{head}");
            assert!(v["error"].is_string() && v["error_description"].is_string());
            let realm = head
                .lines()
                .find_map(|l| l.strip_prefix("WWW-Authenticate: Basic realm="))
                .expect("WWW-Authenticate header");
            PathBuf::from(realm)
        };
        let first = challenge("");
        assert_eq!(first.parent(), Some(dir.as_path()));
        assert_eq!(first.extension().and_then(|e| e.to_str()), Some("key"));
        assert_eq!((mode(&dir), mode(&first)), (0o700, 0o600));
        let secret = std::fs::read_to_string(&first).unwrap();
        assert!(secret.len() == 64 && secret.bytes().all(|c| c.is_ascii_hexdigit()));
        let auth = format!("{META}Authorization: Basic {secret}\r\n");
        let (status, _, v) = get(&emu, &query(ARC_API_VERSION, VAULT, "&x=1"), &auth);
        assert_eq!(status, 200);
        assert_eq!(keys(&v)[..2], ["access_token", "client_id"]);
        assert!(v.as_object().unwrap().values().all(Value::is_string));
        assert_eq!(
            (v["client_id"].as_str(), claims(&v)["aud"].as_str()),
            (Some(DEFAULT_CLIENT_ID), Some(VAULT))
        );
        let params = [
            ("api-version", ARC_API_VERSION),
            ("resource", VAULT),
            ("x", "1"),
        ];
        assert_eq!(emu.last_params(), Some(map(&params)));
        let (status, _, v) = get(&emu, &query(ARC_API_VERSION, EVIL, ""), &auth);
        assert_eq!(
            (status, v["error"].as_str()),
            (400, Some("invalid_resource"))
        );
        let second = challenge(&format!("Authorization: Basic {}\r\n", "a".repeat(64)));
        let third = challenge(&format!("Authorization: Bearer {secret}\r\n"));
        assert!(first != second && second != third && second.exists() && third.exists());
        assert_eq!(
            (emu.requests(), emu.requests_for(MGMT), emu.tokens_issued()),
            (7, 5, 1)
        );
        emu.stop();
        assert!(!first.exists() && !second.exists() && !third.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn faults_counters_and_caching_under_other_protocols() {
        let emu = emu_with(Protocol::Imds);
        let q = query(IMDS_API_VERSION, VAULT, "&client_id=c-1");
        emu.push_fault(Fault::Status {
            code: 429,
            body: "{}".into(),
            retry_after: Some("3".into()),
        });
        emu.push_fault(Fault::Garbage);
        emu.push_fault(Fault::MissingAccessToken);
        emu.push_fault(Fault::ExpiresOn(ExpiresOnForm::EpochNumber));
        // A fault replaces the answer before any protocol check (no Metadata here).
        let (status, head, _) = get(&emu, &q, "");
        assert!(status == 429 && head.contains("Retry-After: 3"));
        let path = format!("{IMDS_PATH}?{q}");
        assert_eq!(
            raw(&emu, "GET", &path, META, "").2,
            b"this is not json <html>"
        );
        let (status, _, v) = get(&emu, &q, META);
        assert!(status == 200 && v.get("access_token").is_none());
        assert_eq!(
            (v["client_id"].as_str(), v["ext_expires_in"].is_string()),
            (Some("c-1"), true)
        );
        let (status, _, v) = get(&emu, &q, META);
        assert_eq!(
            (status, v["expires_on"].as_u64()),
            (200, claims(&v)["exp"].as_u64())
        );
        emu.set_fault(Some(Fault::Reset));
        assert_eq!(get(&emu, &q, META).0, 0);
        emu.set_fault(None);
        emu.set_caching(true);
        emu.set_latency(Duration::from_millis(30));
        let started = Instant::now();
        let (a, b) = (get(&emu, &q, META).2, get(&emu, &q, META).2);
        assert!(started.elapsed() >= Duration::from_millis(60));
        assert_eq!(a["access_token"], b["access_token"]);
        assert_eq!(
            (emu.requests(), emu.requests_for(VAULT), emu.tokens_issued()),
            (7, 7, 2)
        );
        emu.reset_counters();
        assert_eq!(
            (emu.requests(), emu.requests_for(VAULT), emu.tokens_issued()),
            (0, 0, 0)
        );

        let emu = emu_with(Protocol::AppService);
        emu.set_ttl(600);
        let q = query(APP_SERVICE_API_VERSION, MGMT, "");
        emu.push_fault(Fault::EmptyAccessToken);
        emu.push_fault(Fault::ExpiresOn(ExpiresOnForm::OnlyExpiresIn));
        emu.push_fault(Fault::ExpiresOn(ExpiresOnForm::LegacyDate24h));
        let (status, _, v) = get(&emu, &q, "");
        assert_eq!((status, v["access_token"].as_str()), (200, Some("")));
        assert_eq!(
            keys(&v),
            [
                "access_token",
                "client_id",
                "expires_on",
                "resource",
                "token_type"
            ]
        );
        let (_, _, v) = get(&emu, &q, "");
        assert!(v.get("expires_on").is_none() && (599..=600).contains(&num(&v, "expires_in")));
        let (_, _, v) = get(&emu, &q, "");
        let exp = claims(&v)["exp"].as_u64().unwrap();
        assert_eq!(v["expires_on"], legacy_date(exp, false));
        assert!(v.get("expires_in").is_none());
        assert_eq!((emu.requests_for(MGMT), emu.tokens_issued()), (3, 2));
    }

    #[test]
    fn legacy_date_formats() {
        assert_eq!(
            legacy_date(1_579_152_252, true),
            "1/16/2020 5:24:12 AM +00:00"
        );
        assert_eq!(
            legacy_date(1_579_195_452, true),
            "1/16/2020 5:24:12 PM +00:00"
        );
        assert_eq!(
            legacy_date(1_560_999_478, false),
            "06/20/2019 02:57:58 +00:00"
        );
        assert_eq!(legacy_date(0, true), "1/1/1970 12:00:00 AM +00:00");
    }

    #[test]
    fn reset_huge_body_and_hang() {
        let emu = emu();
        emu.push_fault(Fault::Reset);
        emu.push_fault(Fault::HugeBody { bytes: 8 << 20 });
        assert_eq!(post(&emu, MGMT).0, 0);
        let (s, _, body) = raw(&emu, "POST", TOKEN_PATH, "", "");
        assert!(s == 200 && body.len() == 8 << 20 && body.ends_with(b" {}"));
        emu.set_fault(Some(Fault::Hang));
        let addr = emu.addr();
        let client = thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(
                b"POST /oauth2/token HTTP/1.1\r\nMetadata: true\r\nContent-Length: 0\r\n\r\n",
            )
            .unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).map(|_| out)
        });
        while emu.requests() < 3 {
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(100));
        assert!(!client.is_finished());
        let started = Instant::now();
        emu.stop();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(client.join().unwrap().unwrap_or_default().is_empty());
    }

    #[test]
    fn latency_is_concurrent() {
        let emu = Arc::new(emu());
        emu.set_latency(Duration::from_millis(400));
        let started = Instant::now();
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let emu = Arc::clone(&emu);
                thread::spawn(move || post(&emu, MGMT).0)
            })
            .collect();
        assert!(clients.into_iter().all(|c| c.join().unwrap() == 200));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_millis(1500),
            "{took:?}"
        );
    }

    #[test]
    fn stop_closes_port_and_wait_returns() {
        let emu = Arc::new(emu());
        let addr = emu.addr();
        assert_eq!(
            emu.url(),
            format!("http://127.0.0.1:{}/oauth2/token", addr.port())
        );
        let idle = TcpStream::connect(addr).unwrap();
        emu.set_latency(Duration::from_secs(3600));
        let waiter = {
            let emu = Arc::clone(&emu);
            thread::spawn(move || emu.wait())
        };
        let sleeper = {
            let emu = Arc::clone(&emu);
            thread::spawn(move || post(&emu, MGMT).0)
        };
        while emu.requests() < 1 {
            thread::sleep(Duration::from_millis(5));
        }
        emu.shutdown();
        waiter.join().unwrap();
        assert_eq!(sleeper.join().unwrap(), 0);
        assert_eq!(
            TcpStream::connect(addr).unwrap_err().kind(),
            ErrorKind::ConnectionRefused
        );
        assert_eq!((&idle).read(&mut [0u8; 8]).unwrap(), 0);
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Emulator>();
    }
}
