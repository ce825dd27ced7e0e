//! In-process emulator of the Azure managed-identity token endpoints: Cloud Shell
//! (`POST /oauth2/token`, the default), IMDS and Azure Arc
//! (`GET /metadata/identity/oauth2/token`) and App Service (`GET /msi/token`); see
//! [`path`].
//!
//! Used by tests (driven in-process through the knobs on [`Emulator`]) and by the binary
//! (`cstokenfs emulator`, `--emulator`). It binds loopback only (anything else is
//! `InvalidInput`) and issues unsigned JWT-shaped test tokens that are not valid in Azure.
//!
//! HTTP is [`crate::httpserver`] (hyper 1.x on one thread, bounded connections, per-request
//! idle limits); this module routes and answers (`protocol.rs`) and builds the faults hyper
//! cannot produce as raw bytes (`faults.rs`: no answer, HTTP/0.9, a bad status line or
//! Content-Length, an oversized head, a huge, slow or endless body). `acr.rs` serves Azure
//! Container Registry's side (`/oauth2/exchange`, `/oauth2/token` with a refresh token, the
//! `/v2/` challenge) beside every protocol. `action.rs` is the
//! leaf the others share: the `Action` a request gets and the answers common to
//! every protocol; imports between these files go one way only (no file imports one that
//! imports it back).
//!
//! # Locks
//!
//! The state requests and knobs share is `Shared`: atomics for numbers and switches, and a
//! `parking_lot::Mutex` of its own for each other mutable field (`faults`, `sticky`,
//! `cache`, `per_resource`, `stopped` with `stop_cv`, `arc_key_dir`, `arc_keys`,
//! `last_params`, `entra`, `identities`, `per_identity`, `assertions`, and the registry
//! side's list of audiences in `acr`, taken alone). Each lock is taken for a short step and
//! released: no guard lives across an `.await` (the handler's future is `Send`; the guards are not), and only
//! one pair is ever held together: `entra::handle` takes `sticky` while it holds `faults`
//! (in that order; nothing takes them the other way round). `cache` is held while a token
//! is minted (atomics only, no other lock); `arc_keys` while key files are removed. The
//! mutexes are not reentrant: code holding one must not call a `Shared` method or
//! `Emulator` knob that takes the same lock. `Emulator::shutdown` joins the server's
//! threads, whose requests take these locks: it must not be called with any of them held
//! (it takes `stopped` and `arc_keys` only after the join).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use parking_lot::{Condvar, Mutex};
use serde_json::Value;

use crate::hardening::random_hex;
use crate::httpserver::{self, Server};
pub use crate::source::Kind;
pub use claims::{TEST_TENANT_ID, TEST_USER_OBJECT_ID};
pub use faults::echo as echo_body;

mod acr;
mod action;
mod bodies;
mod claims;
#[cfg(test)]
mod emulator_tests;
pub mod entra;
mod faults;
mod form;
#[cfg(test)]
mod http_tests;
mod protocol;
mod routes;

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

/// `oid` of the system-assigned identity's tokens (a request that names no identity).
pub const DEFAULT_OBJECT_ID: &str = "00000000-0000-0000-0000-00000000a111";

/// A user-assigned identity the IMDS and App Service protocols know ([`Emulator::set_identities`]):
/// a request names it by any one of its ids, and its tokens carry them (`appid`, `azp`,
/// `oid`, `xms_mirid`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownIdentity {
    pub client_id: String,
    pub object_id: String,
    pub resource_id: String,
}

impl KnownIdentity {
    /// An identity whose ids are all made from `n` (client `...c000000000NN`, object
    /// `...a000000000NN`, resource `/subscriptions/.../userAssignedIdentities/idNN`).
    pub fn numbered(n: u8) -> KnownIdentity {
        KnownIdentity {
            client_id: format!("00000000-0000-0000-0000-c000000000{n:02x}"),
            object_id: format!("00000000-0000-0000-0000-a000000000{n:02x}"),
            resource_id: format!("/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id{n:02x}"),
        }
    }
}

/// The `emulator` claim of every token it mints.
const NOTICE: &str = "cstokenfs emulator: unsigned test token, not valid in Azure";

/// Start-up configuration; everything but `allow` and `identity_header` can be changed
/// later through knobs.
#[derive(Clone)]
pub struct EmulatorConfig {
    pub ttl_secs: u64,
    pub latency: Duration,
    pub allow: Vec<String>,
    pub allow_any: bool,
    /// The App Service `X-IDENTITY-HEADER` secret; `None`: 32 random hex digits. Must be
    /// non-empty, without control characters or surrounding whitespace.
    pub identity_header: Option<String>,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            ttl_secs: 3600,
            latency: Duration::ZERO,
            allow: Vec::new(),
            allow_any: false,
            identity_header: None,
        }
    }
}

impl fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("ttl_secs", &self.ttl_secs)
            .field("latency", &self.latency)
            .field("allow", &self.allow)
            .field("allow_any", &self.allow_any)
            .field(
                "identity_header",
                &self.identity_header.as_ref().map(|_| "<secret>"),
            )
            .finish()
    }
}

/// The token endpoint path the emulator serves for an upstream (see the module docs and
/// `shared/reference/token-endpoints.md`): Cloud Shell `POST /oauth2/token` (form body
/// `resource=R`, `Metadata: true`); IMDS `GET /metadata/identity/oauth2/token`
/// (`api-version=2018-02-01`, `Metadata: true`, flat `{"error","error_description"}` errors);
/// Arc the same path with `api-version=2020-06-01` and the key-file challenge; App Service
/// `GET /msi/token` (`api-version=2019-08-01`, `X-IDENTITY-HEADER`, `{"statusCode","message"}`
/// errors). The Azure CLI is not an HTTP upstream: `Emulator::start_with` refuses it.
pub fn path(kind: Kind) -> &'static str {
    match kind {
        Kind::CloudShell | Kind::AzureCli => TOKEN_PATH,
        Kind::Imds | Kind::Arc => IMDS_PATH,
        Kind::AppService => APP_SERVICE_PATH,
        // The authority: `/{tenant}/oauth2/v2.0/token` is under it.
        Kind::WorkloadIdentity | Kind::ServicePrincipal => "/",
    }
}

fn method(kind: Kind) -> &'static str {
    match kind {
        Kind::CloudShell | Kind::AzureCli | Kind::WorkloadIdentity | Kind::ServicePrincipal => {
            "POST"
        }
        _ => "GET",
    }
}

/// The upstreams the emulator serves.
pub const SERVED: [Kind; 6] = [
    Kind::CloudShell,
    Kind::Imds,
    Kind::AppService,
    Kind::Arc,
    Kind::WorkloadIdentity,
    Kind::ServicePrincipal,
];

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
    /// A success body (a fresh token) with no status line or headers (HTTP/0.9), then close.
    Http09,
    /// `HTTP/1.1 abc Nope`, then headers and a success body, then close.
    BadStatusLine,
    /// `HTTP/1.1 200 OK` with `Content-Length: nonsense` and a success body, then close.
    BadContentLength,
    /// `HTTP/1.1 200 OK` whose head is over 1 MiB (1024 `X-Padding` lines of 1 KiB)
    /// before a valid success answer, then close.
    OversizedHead,
    /// A valid 200 head (with Content-Length) at once, then the success body at about
    /// `bytes_per_sec` (0: never), then close.
    SlowBody { bytes_per_sec: u32 },
    /// 200 without Content-Length (`Connection: close`), then spaces until the client goes
    /// or the emulator stops.
    EndlessBody,
    /// The normal answer, and when it is a success (a freshly minted token), the JSON object
    /// in the string merged over its top-level fields (`null` removes a field), e.g.
    /// `{"refresh_in":"0"}`. A queued one that meets a non-success answer (an Arc challenge,
    /// a refused audience) stays queued for the next request; a string that is not a JSON
    /// object gives 500.
    Fields(String),
    /// An upstream that echoes the credentials it was sent. That status and the body, in
    /// which `{NAME}` is the request's form (or query) field NAME (decoded), `{NAME:pct}` it
    /// percent-encoded, `{NAME:b64}` in base64, `{NAME:json}` JSON-escaped (no quotes),
    /// `{form}` the request body as sent and `{form:json}` its fields as a JSON object.
    Echo { code: u16, body: String },
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

/// Who a token is for: the identity a request named (its client ID, object ID and resource
/// ID as far as known).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Who {
    client_id: String,
    object_id: Option<String>,
    resource_id: Option<String>,
    principal: claims::Principal,
    /// The tenant the request named (Entra's path); `None`: the configured one.
    tenant: Option<String>,
}

impl Who {
    /// A managed identity (IMDS, App Service, Arc) with the ids a request named.
    fn managed(client_id: String, object_id: Option<String>, resource_id: Option<String>) -> Who {
        Who {
            client_id,
            object_id,
            resource_id,
            principal: claims::Principal::ManagedIdentity,
            tenant: None,
        }
    }
}

#[derive(Clone)]
struct Issued {
    token: String,
    expires_on: u64,
    not_before: u64,
}

/// The state the server's request handlers and the [`Emulator`] knobs share (one `Arc`).
/// Knobs write, handlers read, except for the counters and records, which handlers write.
struct Shared {
    /// Lifetime of newly minted tokens, in seconds. Written by `Emulator::set_ttl`; read by
    /// `issue` and the `Missing`/`EmptyAccessToken` faults.
    ttl: AtomicU64,
    /// Delay before each answer, in nanoseconds. Written by `Emulator::set_latency`; read
    /// by each request after routing (`routes`, `entra::handle`).
    latency_ns: AtomicU64,
    /// Every audience is allowed. Written by `Emulator::set_allow_any`; read by
    /// `audience_allowed`.
    allow_any: AtomicBool,
    /// Audiences allowed besides the Cloud Shell allowlist; fixed at start.
    allow: Vec<String>,
    /// Whether `issue` serves unexpired tokens from `cache`. Written by
    /// `Emulator::set_caching` while it holds `cache` (the clear and the switch are one
    /// step for `issue`); read by `issue` before it takes `cache`.
    caching: AtomicBool,
    /// One-shot faults, FIFO. Lock: its own. Pushed by `Emulator::push_fault`; popped by
    /// each request (`protocol::answer_inner`, `entra::handle`); a `Fault::Fields` that
    /// met no success is pushed back to the front by `answer_inner`.
    faults: Mutex<VecDeque<Fault>>,
    /// The fault for every request while no one-shot fault is queued. Lock: its own.
    /// Written by `Emulator::set_fault`; cloned by each request.
    sticky: Mutex<Option<Fault>>,
    /// Tokens issued while caching is on, by resource. Lock: its own, held by `issue` for
    /// the look-up, the minting and the insert (two requests for a resource get one
    /// token); cleared by `Emulator::set_caching`.
    cache: Mutex<HashMap<String, Issued>>,
    /// Token requests received (right path and method), counted on arrival by `route` and
    /// `entra::handle`; zeroed by `Emulator::reset_counters`.
    requests: AtomicU64,
    /// Requests per resource (Entra: the scope without `/.default`). Lock: its own.
    /// Incremented by `route` and `entra::handle`; cleared by `Emulator::reset_counters`.
    per_resource: Mutex<HashMap<String, u64>>,
    /// Tokens newly minted (by `issue`, under `cache`); zeroed by `reset_counters`.
    issued: AtomicU64,
    /// The last token serial (the `serial` claim); incremented by `issue` under `cache`,
    /// never reset.
    serial: AtomicU64,
    /// Whether the emulator is stopped. Lock: its own, with `stop_cv`. Set once by
    /// `Emulator::shutdown`; waited on by `wait_stopped` (`Emulator::wait`).
    stopped: Mutex<bool>,
    /// Signalled (all waiters) when `stopped` becomes true.
    stop_cv: Condvar,
    /// The protocol served; fixed at start.
    protocol: Kind,
    /// The App Service `X-IDENTITY-HEADER` secret; fixed at start.
    identity_header: String,
    /// Where Arc challenge key files are written. Lock: its own, only to copy or replace
    /// the path. Written by `Emulator::set_arc_key_dir`; copied by `arc_challenge`.
    arc_key_dir: Mutex<PathBuf>,
    /// The Arc challenges issued and not forgotten (at most `MAX_ARC_KEYS`). Lock: its own,
    /// held while forgotten keys' files are removed. Pushed and trimmed by `arc_challenge`;
    /// searched by `answer_arc`; emptied (files removed) by `Emulator::shutdown`.
    arc_keys: Mutex<VecDeque<ArcKey>>,
    /// The decoded parameters of the last routed request. Lock: its own. Written by
    /// `route` and `entra::handle`; read by `Emulator::last_params`.
    last_params: Mutex<Option<BTreeMap<String, String>>>,
    /// What the Entra protocol accepts. Lock: its own, only to copy or replace the
    /// settings. Written by `Emulator::set_entra`; cloned by each Entra request before
    /// its checks (the federated token file is read with no lock held).
    entra: Mutex<entra::EntraSettings>,
    /// The user-assigned identities the IMDS and App Service protocols know; `None`: any
    /// identity named is answered. Lock: its own, only to copy or replace. Written by
    /// `Emulator::set_identities`; read by `protocol::who`.
    identities: Mutex<Option<Vec<KnownIdentity>>>,
    /// Requests per (identity's client ID, resource) of the IMDS and App Service protocols
    /// that named a known identity (or none), and of the Entra protocol (by the form's
    /// `client_id`). Lock: its own. Incremented by `protocol` and `entra::handle`;
    /// cleared by `Emulator::reset_counters`.
    per_identity: Mutex<HashMap<(String, String), u64>>,
    /// The client assertions presented to the Entra protocol, per client ID (as sent), as
    /// SHA-256 hex digests in request order. Lock: its own. Pushed by `entra::handle`
    /// (`record_entra`); read by `Emulator::assertions_for`; cleared by
    /// `Emulator::reset_counters`.
    assertions: Mutex<HashMap<String, Vec<String>>>,
    /// The registry side's lifetime knob, counters and records (`acr.rs`: atomics and a
    /// lock of its own, taken alone).
    acr: acr::AcrState,
}

/// One Arc challenge this emulator issued: the secret and the file holding it.
struct ArcKey {
    secret: String,
    path: PathBuf,
}

/// A running emulator. Dropping it stops the server (see [`Emulator::shutdown`]).
pub struct Emulator {
    shared: Arc<Shared>,
    server: Server,
}

impl Emulator {
    /// Binds `listen` (loopback only, port 0 = ephemeral) and starts serving the Cloud Shell
    /// protocol on a background thread; the same as `start_with(listen, config, Kind::CloudShell)`.
    pub fn start(listen: SocketAddr, config: EmulatorConfig) -> io::Result<Emulator> {
        Emulator::start_with(listen, config, Kind::CloudShell)
    }

    /// Binds `listen` (port 0 = ephemeral) and starts serving `protocol`. A non-loopback
    /// address or an invalid `identity_header` is `InvalidInput`.
    pub fn start_with(
        listen: SocketAddr,
        config: EmulatorConfig,
        protocol: Kind,
    ) -> io::Result<Emulator> {
        Emulator::start_tls(listen, config, protocol, None)
    }

    /// `start_with`, serving HTTPS with `tls` when given (`httpserver::tls::server_config`).
    pub fn start_tls(
        listen: SocketAddr,
        config: EmulatorConfig,
        protocol: Kind,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> io::Result<Emulator> {
        crate::net::check_loopback(listen)?;
        if !SERVED.contains(&protocol) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the emulator does not serve {protocol} (only cloudshell, imds, appservice, arc, entra)"),
            ));
        }
        let identity_header = match config.identity_header {
            Some(secret) => {
                check_secret(&secret)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                secret
            }
            None => random_hex(16)?.to_string(),
        };
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
            protocol,
            identity_header,
            arc_key_dir: Mutex::new(PathBuf::from(DEFAULT_ARC_KEY_DIR)),
            arc_keys: Mutex::new(VecDeque::new()),
            last_params: Mutex::new(None),
            entra: Mutex::new(entra::EntraSettings::default()),
            identities: Mutex::new(None),
            per_identity: Mutex::new(HashMap::new()),
            assertions: Mutex::new(HashMap::new()),
            acr: acr::AcrState::default(),
        });
        let config = httpserver::Config {
            // Longer than reqwest's 90 s pool idle timeout: a client's pooled connection is
            // closed by the client, never under it by us.
            first_head_timeout: Duration::from_secs(100),
            header_read_timeout: Duration::from_secs(100),
            thread_name: "cstokenfs-emulator".into(),
            tls,
            ..httpserver::Config::default()
        };
        let server = Server::start(listen, config, routes::EmuHandler(Arc::clone(&shared)))?;
        log::debug!("emulator ({protocol}) listening on {}", server.addr());
        Ok(Emulator { shared, server })
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    pub fn protocol(&self) -> Kind {
        self.shared.protocol
    }

    /// The token endpoint: `http://ADDR` + [`path`], e.g.
    /// `http://127.0.0.1:PORT/oauth2/token` for Cloud Shell,
    /// `.../metadata/identity/oauth2/token` for IMDS and Arc, `.../msi/token` for App Service.
    pub fn url(&self) -> String {
        let scheme = if self.server.is_tls() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}{}", self.addr(), path(self.shared.protocol))
    }

    /// What the Entra protocol accepts: the tenant, client ID and credentials (default:
    /// any tenant, client and non-empty credential).
    pub fn set_entra(&self, settings: entra::EntraSettings) {
        *self.shared.entra.lock() = settings;
    }

    /// The `X-IDENTITY-HEADER` value App Service requests must carry:
    /// [`EmulatorConfig::identity_header`], else 32 random hex digits new for each emulator
    /// (generated whatever the protocol).
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
        self.shared.per_identity.lock().clear();
        self.shared.assertions.lock().clear();
        self.shared.issued.store(0, SeqCst);
        self.shared.acr.reset();
    }

    /// The user-assigned identities the IMDS and App Service protocols know, besides the
    /// system-assigned one (a request naming none). Once set, a request naming another
    /// identity gets what the real services answer: IMDS 400 `invalid_request` "Identity
    /// not found", App Service 400 "No Managed Identity found for specified
    /// ClientId/ResourceId/PrincipalId.". Before: any identity named is answered.
    pub fn set_identities(&self, identities: Vec<KnownIdentity>) {
        *self.shared.identities.lock() = Some(identities);
    }

    /// Requests of the IMDS and App Service protocols for `resource` (as sent) by the
    /// identity whose client ID is `client_id` ([`DEFAULT_CLIENT_ID`]: the system-assigned
    /// one), however the request named it; requests naming an unknown identity are not
    /// counted here. Entra's: every request whose form carries `client_id` and a `scope`
    /// (`resource`: the scope without `/.default`), counted on arrival, accepted or not.
    pub fn requests_by(&self, client_id: &str, resource: &str) -> u64 {
        let key = (client_id.to_ascii_lowercase(), resource.to_string());
        self.shared
            .per_identity
            .lock()
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// The client assertions presented to the Entra protocol for `client_id` (as sent),
    /// in request order, each as the SHA-256 hex digest of the assertion: a test tells
    /// which service-account token was used without ever printing one.
    pub fn assertions_for(&self, client_id: &str) -> Vec<String> {
        self.shared
            .assertions
            .lock()
            .get(client_id)
            .cloned()
            .unwrap_or_default()
    }

    /// Lifetime of the registry refresh tokens `/oauth2/exchange` issues (default 3 hours).
    pub fn set_acr_ttl(&self, secs: u64) {
        self.shared.acr.set_ttl(secs);
    }

    /// `/oauth2/exchange` requests received (counted on arrival, refused or not).
    pub fn acr_exchanges(&self) -> u64 {
        self.shared.acr.exchanges()
    }

    /// Registry refresh tokens issued.
    pub fn acr_refresh_tokens_issued(&self) -> u64 {
        self.shared.acr.issued()
    }

    /// `/oauth2/token` refresh-token requests received (counted on arrival).
    pub fn acr_token_requests(&self) -> u64 {
        self.shared.acr.tokens()
    }

    /// The `aud` claim of each Entra token presented to `/oauth2/exchange`, in order.
    pub fn acr_exchanged_audiences(&self) -> Vec<String> {
        self.shared.acr.audiences()
    }

    /// Same as dropping the emulator.
    pub fn stop(self) {}

    /// Stops from a shared reference (idempotent): closes the listener before returning,
    /// releases hung and sleeping requests, closes connections and joins every thread.
    /// Arc challenge key files this emulator wrote are removed.
    pub fn shutdown(&self) {
        self.server.shutdown();
        *self.shared.stopped.lock() = true;
        self.shared.stop_cv.notify_all();
        for key in std::mem::take(&mut *self.shared.arc_keys.lock()) {
            let _ = std::fs::remove_file(&key.path);
        }
    }

    /// Blocks the calling thread until the emulator is stopped (by `shutdown` elsewhere).
    pub fn wait(&self) {
        self.shared.wait_stopped();
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

/// Assertion digests kept per client ID (the oldest go first): a long-running emulator
/// stays bounded.
const MAX_ASSERTIONS: usize = 4096;

/// The SHA-256 hex digest of `text` ([`Emulator::assertions_for`]).
pub fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Shared {
    /// Counts an Entra request by (client ID, resource) for `Emulator::requests_by` and
    /// records its client assertion's digest for `Emulator::assertions_for`.
    fn record_entra(&self, client_id: &str, params: &BTreeMap<String, String>) {
        if let Some(scope) = params.get("scope") {
            let resource = scope.strip_suffix("/.default").unwrap_or(scope).to_string();
            let key = (client_id.to_ascii_lowercase(), resource);
            *self.per_identity.lock().entry(key).or_insert(0) += 1;
        }
        if let Some(assertion) = params.get("client_assertion") {
            let digest = sha256_hex(assertion);
            let mut all = self.assertions.lock();
            let mine = all.entry(client_id.to_string()).or_default();
            if mine.len() >= MAX_ASSERTIONS {
                mine.remove(0);
            }
            mine.push(digest);
        }
    }

    /// Waits until stopped.
    fn wait_stopped(&self) {
        let mut stopped = self.stopped.lock();
        while !*stopped {
            self.stop_cv.wait(&mut stopped);
        }
    }

    /// Whether tokens for `resource` are issued: `allow_any`, or it is in the Cloud Shell
    /// allowlist or `allow` (a trailing `/` does not matter).
    fn audience_allowed(&self, resource: &str) -> bool {
        fn norm(s: &str) -> &str {
            s.strip_suffix('/').unwrap_or(s)
        }
        self.allow_any.load(SeqCst)
            || crate::names::CLOUD_SHELL_ALLOWLIST
                .iter()
                .copied()
                .chain(self.allow.iter().map(String::as_str))
                .any(|a| norm(a) == norm(resource))
    }

    /// Mints a token for `resource` for the protocol's default principal (Cloud Shell's
    /// user, the system-assigned identity), or returns the cached one when caching is on.
    fn issue(&self, resource: &str) -> Issued {
        let who = match self.protocol {
            Kind::CloudShell | Kind::AzureCli => Who {
                client_id: claims::AZURE_CLI_APP_ID.into(),
                object_id: Some(claims::TEST_USER_OBJECT_ID.into()),
                resource_id: None,
                principal: claims::Principal::User,
                tenant: None,
            },
            Kind::WorkloadIdentity | Kind::ServicePrincipal => Who {
                principal: claims::Principal::Application,
                ..Who::managed(DEFAULT_CLIENT_ID.into(), None, None)
            },
            Kind::Imds | Kind::Arc | Kind::AppService => Who::managed(
                DEFAULT_CLIENT_ID.into(),
                Some(DEFAULT_OBJECT_ID.into()),
                None,
            ),
        };
        self.issue_for(resource, Some(&who))
    }

    /// The tenant of tokens whose request named none: the Entra settings' tenant if it
    /// is a GUID, else [`TEST_TENANT_ID`].
    fn tenant(&self) -> String {
        self.entra
            .lock()
            .tenant
            .clone()
            .filter(|t| crate::names::is_guid(t))
            .unwrap_or_else(|| TEST_TENANT_ID.into())
    }

    /// Mints a token for `resource` as `who` asked for it (its ids in the claims), or
    /// returns the cached one when caching is on.
    fn issue_for(&self, resource: &str, who: Option<&Who>) -> Issued {
        let Some(who) = who else {
            return self.issue(resource);
        };
        let tenant = who.tenant.clone().unwrap_or_else(|| self.tenant());
        let now = now_secs();
        let caching = self.caching.load(SeqCst);
        let mut cache = self.cache.lock();
        let cache_key = format!("{tenant}\n{}\n{resource}", who.client_id);
        if let Some(hit) = cache
            .get(&cache_key)
            .filter(|t| caching && t.expires_on > now)
        {
            return hit.clone();
        }
        let exp = now.saturating_add(self.ttl.load(SeqCst));
        let serial = self.serial.fetch_add(1, SeqCst) + 1;
        self.issued.fetch_add(1, SeqCst);
        let subject = claims::Subject {
            principal: who.principal,
            client_id: &who.client_id,
            object_id: who.object_id.as_deref(),
            resource_id: who.resource_id.as_deref(),
            system_assigned: who.client_id == DEFAULT_CLIENT_ID,
            tenant: &tenant,
        };
        let times = claims::Times { now, exp, serial };
        let claims = claims::claims(self.protocol, resource, &subject, &times, NOTICE);
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
            cache.insert(cache_key, issued.clone());
        }
        issued
    }
}

/// Why a secret cannot be an `X-IDENTITY-HEADER` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadSecret {
    Empty,
    ControlCharacters,
    /// It starts or ends with whitespace (which HTTP would trim).
    Whitespace,
}

impl std::fmt::Display for BadSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BadSecret::Empty => "the identity header secret is empty",
            BadSecret::ControlCharacters => "the identity header secret has control characters",
            BadSecret::Whitespace => "the identity header secret starts or ends with whitespace",
        })
    }
}

impl std::error::Error for BadSecret {}

/// Why `secret` cannot be an `X-IDENTITY-HEADER` value, if it cannot.
pub fn check_secret(secret: &str) -> Result<(), BadSecret> {
    if secret.is_empty() {
        Err(BadSecret::Empty)
    } else if secret.chars().any(char::is_control) {
        Err(BadSecret::ControlCharacters)
    } else if secret.trim() != secret {
        Err(BadSecret::Whitespace)
    } else {
        Ok(())
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
