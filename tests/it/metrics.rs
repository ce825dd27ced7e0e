//! `--metrics` scraped as Prometheus does, against real mounts, a sink and the emulator:
//! the values against what happened (one upstream request for many readers, refusals,
//! an outage), both formats parsed by `prometheus_client` (PyPI) and checked by
//! `promtool`, `/healthz` and `/readyz`, and no secret in any scrape.

use crate::common::*;
use crate::entra_support::{self, assert_absent, entra_emulator, entra_mount, write};
use cstokenfs::emulator::entra::EntraSettings;
use cstokenfs::emulator::Fault;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const ARM: &str = "/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fmanagement.azure.com";

/// A scrape in the Prometheus text format, parsed and (when promtool is at hand) checked.
fn scrape(venv: &Path, addr: SocketAddr) -> Samples {
    let got = http(addr, "/metrics", None);
    assert_eq!(got.status, 200);
    assert_eq!(got.content_type, TEXT);
    promtool_check(&got.body);
    Samples::parse(venv, &got.body, false)
}

/// `cat` of `name` in the mount by `n` processes at once; how many read a token.
fn cats(m: &Mounted, name: &str, n: usize) -> usize {
    let children: Vec<_> = (0..n)
        .map(|_| {
            std::process::Command::new("cat")
                .arg(m.file(name))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("cat")
        })
        .collect();
    children
        .into_iter()
        .filter(|_| true)
        .map(|mut c| c.wait().unwrap().success())
        .filter(|ok| *ok)
        .count()
}

#[test]
fn a_scrape_under_load_says_what_happened() {
    need_fuse!();
    let Some(venv) = parser_venv() else { return };
    let emu = emulator();
    // Slow enough that the readers of both front ends meet one fetch.
    emu.set_latency(Duration::from_millis(600));
    // The one token fetched says to refresh it 8 s on (the outage below meets that refresh).
    emu.push_fault(Fault::Fields(r#"{"refresh_in":"8"}"#.into()));
    let m = Mounted::serving(&emu.url(), &["--metrics", "127.0.0.1:0", "--timeout", "3"]);
    let addr = metrics_addr(&m);
    let (endpoint, secret) = m.endpoint();
    let head = format!("Host: {endpoint}\r\nX-IDENTITY-HEADER: {secret}\r\n");
    // Eight HTTP clients and eight cat processes at once: one upstream request.
    let http_clients: Vec<_> = (0..8)
        .map(|_| {
            let head = head.clone();
            std::thread::spawn(move || cstokenfs::testing::http_get(endpoint, ARM, &head).0)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(cats(&m, "management.azure.com", 8), 8);
    for c in http_clients {
        assert_eq!(c.join().unwrap(), 200);
    }
    assert_eq!(emu.requests_for("https://management.azure.com/"), 1);
    let s = scrape(&venv, addr);
    let ok = [("identity", ""), ("result", "ok"), ("status", "200")];
    assert_eq!(s.get("cstokenfs_upstream_requests_total", &ok), Some(1.0));
    assert_eq!(
        s.get("cstokenfs_reads_total", &[("front_end", "file")]),
        Some(8.0)
    );
    assert_eq!(
        s.get("cstokenfs_reads_total", &[("front_end", "endpoint")]),
        Some(8.0)
    );
    let waited = s.get("cstokenfs_read_wait_seconds_count", &[]).unwrap();
    let joins = s.get("cstokenfs_single_flight_joins_total", &[]).unwrap();
    assert!(waited >= 2.0, "readers waited for the fetch: {waited}");
    assert!(joins >= 1.0 && joins < waited, "{joins} joined of {waited}");
    assert!(s.get("cstokenfs_read_wait_seconds_sum", &[]).unwrap() >= 0.5);
    assert_eq!(
        s.get("cstokenfs_upstream_request_duration_seconds_count", &[]),
        Some(1.0)
    );
    let json: serde_json::Value =
        serde_json::from_slice(&m.read(".json/management.azure.com").unwrap()).unwrap();
    let expires_on = json["expires_on"]
        .as_f64()
        .expect("expires_on, epoch seconds");
    let arm = [
        ("identity", ""),
        ("resource", "https://management.azure.com/"),
    ];
    assert_eq!(
        s.get("cstokenfs_token_expiry_timestamp_seconds", &arm),
        Some(expires_on)
    );
    assert_eq!(s.get("cstokenfs_token_valid", &arm), Some(1.0));
    let next = s
        .get("cstokenfs_token_next_refresh_timestamp_seconds", &arm)
        .unwrap();
    assert!(
        next < expires_on - 3000.0,
        "refresh_in 8 s: {next} vs {expires_on}"
    );
    assert_eq!(
        s.get(
            "cstokenfs_listener_responses_total",
            &[("listener", "endpoint"), ("status", "200")]
        ),
        Some(8.0)
    );

    // Refused names: one upstream request each, then the negative cache answers.
    emu.set_latency(Duration::ZERO);
    for name in ["refused-1.example.com", "refused-2.example.com"] {
        let err = m.read_err(name);
        assert_eq!(errno(&err), libc::ENOENT);
    }
    let refused = ARM.replace("management.azure.com", "refused-1.example.com");
    assert_eq!(
        cstokenfs::testing::http_get(endpoint, &refused, &head).0,
        400
    );
    let s = scrape(&venv, addr);
    let refused = [("identity", ""), ("result", "refused"), ("status", "400")];
    assert_eq!(
        s.get("cstokenfs_upstream_requests_total", &refused),
        Some(2.0)
    );
    assert_eq!(s.get("cstokenfs_negative_cache_entries", &[]), Some(2.0));
    assert_eq!(
        s.get("cstokenfs_negative_cache_answers_total", &[]),
        Some(1.0),
        "the endpoint's request for a name refused a moment before"
    );
    // Reads count tokens served: the refused names' are not reads (files: the eight cats
    // and the test's read of the .json view).
    for (front_end, n) in [("file", 9.0), ("endpoint", 8.0)] {
        let reads = s.get("cstokenfs_reads_total", &[("front_end", front_end)]);
        assert_eq!(reads, Some(n), "{front_end}");
    }
    assert_eq!(
        s.get("cstokenfs_reads_total", &[("front_end", "csi_publish")]),
        Some(0.0),
        "every front end's series from the start"
    );
    // Refused names are counted, never listed: no series of their own.
    assert!(s.0.iter().all(|x| !x
        .labels
        .get("resource")
        .is_some_and(|r| r.contains("refused"))));

    // An outage: the refresh of the held token (due 8 s after its fetch) fails; the
    // expiry of the token still held is there to alert on.
    emu.set_fault(Some(Fault::Status {
        code: 500,
        body: r#"{"error":"outage"}"#.into(),
        retry_after: None,
    }));
    m.read("management.azure.com")
        .expect("a use: refreshed ahead");
    let s = eventually(Duration::from_secs(30), || {
        let s = scrape(&venv, addr);
        (s.get("cstokenfs_token_consecutive_failures", &arm)? >= 1.0).then_some(s)
    })
    .expect("the failed refresh shows");
    let errors = [("identity", ""), ("result", "error"), ("status", "500")];
    assert!(s.get("cstokenfs_upstream_requests_total", &errors).unwrap() >= 1.0);
    assert!(s.get("cstokenfs_upstream_retries_total", &[]).unwrap() >= 1.0);
    assert_eq!(s.get("cstokenfs_token_valid", &arm), Some(1.0));
    assert_eq!(
        s.get("cstokenfs_token_expiry_timestamp_seconds", &arm),
        Some(expires_on),
        "the held token's expiry, to alert on"
    );
    assert_documented(&s);
    // Every request the emulator saw is counted once.
    let counted = s.sum("cstokenfs_upstream_requests_total", &[]);
    assert_eq!(counted as u64, emu.requests());

    // OpenMetrics when asked for, parsed by its own parser, ending in # EOF.
    let om = http(
        addr,
        "/metrics",
        Some("application/openmetrics-text; version=1.0.0"),
    );
    assert_eq!(om.status, 200);
    assert_eq!(om.content_type, OPENMETRICS);
    assert!(om.body.ends_with("# EOF\n"));
    let parsed = Samples::parse(&venv, &om.body, true);
    assert_eq!(parsed.get("cstokenfs_token_valid", &arm), Some(1.0));
    assert!(parsed.get("process_resident_memory_bytes", &[]).unwrap() > 1e6);
    assert!(parsed.get("process_open_fds", &[]).unwrap() >= 3.0);
    assert!(parsed.get("process_threads", &[]).unwrap() >= 2.0);
    let started = parsed.get("process_start_time_seconds", &[]).unwrap();
    assert!((started - now_secs() as f64).abs() < 600.0, "{started}");
}

#[test]
fn health_and_readiness() {
    need_fuse!();
    // Nothing listens where the mount's endpoint is, yet.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/oauth2/token");
    let m = Mounted::serving(
        &url,
        &[
            "--metrics",
            "127.0.0.1:0",
            "--resource",
            "management.azure.com",
        ],
    );
    let addr = metrics_addr(&m);
    assert_eq!(http(addr, "/healthz", None).status, 200);
    let not = http(addr, "/readyz", None);
    assert_eq!(not.status, 503);
    assert!(
        not.body
            .contains("https://management.azure.com/ holds no valid token"),
        "{}",
        not.body
    );
    assert_eq!(http(addr, "/nothing", None).status, 404);
    // The endpoint comes up: the probe's own fetch (after its backoff) makes it ready.
    let emu = cstokenfs::emulator::Emulator::start(
        format!("127.0.0.1:{port}").parse().unwrap(),
        Default::default(),
    )
    .expect("the emulator on the mount's port");
    eventually(Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(200));
        (http(addr, "/readyz", None).status == 200).then_some(())
    })
    .expect("ready once a valid token is held");
    assert_eq!(emu.requests_for("https://management.azure.com/"), 1);
    assert_eq!(http(addr, "/healthz", None).status, 200);
    // SIGUSR1 drops every token: not ready until the probe's fetch brings one back.
    m.signal(libc::SIGUSR1);
    eventually(Duration::from_secs(10), || {
        (http(addr, "/readyz", None).status == 503).then_some(())
    })
    .expect("not ready once the tokens are dropped");
    eventually(Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(200));
        (http(addr, "/readyz", None).status == 200).then_some(())
    })
    .expect("ready again");
    assert_eq!(emu.requests_for("https://management.azure.com/"), 2);

    // The endpoint's refusals, by cause and status.
    let Some(venv) = parser_venv() else { return };
    // The probes' reads are not readers'.
    let s = scrape(&venv, addr);
    assert_eq!(s.get("cstokenfs_read_wait_seconds_count", &[]), Some(0.0));
    assert_eq!(s.get("cstokenfs_single_flight_joins_total", &[]), Some(0.0));
    let (endpoint, secret) = m.endpoint();
    let good = format!("Host: {endpoint}\r\nX-IDENTITY-HEADER: {secret}\r\n");
    let wrong = format!(
        "Host: {endpoint}\r\nX-IDENTITY-HEADER: {}\r\n",
        "0".repeat(64)
    );
    let proxied = format!("{good}X-Forwarded-For: 10.0.0.1\r\n");
    let foreign = format!("Host: evil.example\r\nX-IDENTITY-HEADER: {secret}\r\n");
    let get = |head: &str| cstokenfs::testing::http_get(endpoint, ARM, head).0;
    assert_eq!(get(&wrong), 401);
    assert_eq!(get(&proxied), 400);
    assert_eq!(get(&foreign), 400);
    assert_eq!(get(&good), 200);
    let s = scrape(&venv, addr);
    let cause = |c| {
        s.get(
            "cstokenfs_listener_refusals_total",
            &[("listener", "endpoint"), ("cause", c)],
        )
    };
    assert_eq!(cause("secret"), Some(1.0));
    assert_eq!(cause("forwarded"), Some(1.0));
    assert_eq!(cause("host"), Some(1.0));
    let status = |c| {
        s.get(
            "cstokenfs_listener_responses_total",
            &[("listener", "endpoint"), ("status", c)],
        )
    };
    assert_eq!(status("401"), Some(1.0));
    assert_eq!(status("400"), Some(2.0));
    assert_eq!(status("200"), Some(1.0));
}

#[test]
fn no_secret_in_any_scrape() {
    need_fuse!();
    let Some(venv) = parser_venv() else { return };
    let dir = tempfile::tempdir().unwrap();
    // A service principal's secret and the endpoint's secret.
    let client_secret = "Zx8Q~metrics-never-show-this.5678";
    let emu = entra_emulator(
        EntraSettings {
            client_secret: Some(client_secret.into()),
            ..entra_support::settings()
        },
        None,
    );
    let file = write(dir.path(), "secret", client_secret);
    let sp = entra_mount(
        "service-principal",
        ("--client-secret-file", &file),
        &emu.url(),
        &[
            "--metrics",
            "127.0.0.1:0",
            "--serve-endpoint",
            "127.0.0.1:0",
        ],
        &[],
    );
    // A workload identity's assertion (its subject names a marker account).
    let assertion = entra_support::federated_token(now_secs() + 3600, "metrics-marker-acct");
    let token_file = write(dir.path(), "federated", &assertion);
    let wi_emu = entra_emulator(
        EntraSettings {
            federated_token_file: Some(token_file.clone()),
            ..entra_support::settings()
        },
        None,
    );
    let wi = entra_mount(
        "workload-identity",
        ("--federated-token-file", &token_file),
        &wi_emu.url(),
        &["--metrics", "127.0.0.1:0"],
        &[],
    );
    for (m, secrets) in [
        (&sp, vec![client_secret.to_string(), sp.endpoint().1]),
        (&wi, vec![assertion.clone(), "metrics-marker-acct".into()]),
    ] {
        let mut tokens = Vec::new();
        for name in ["management.azure.com", "vault.azure.net"] {
            tokens.push(String::from_utf8(m.read(name).expect("a token")).unwrap());
        }
        let _ = m.read_err("refused.example.com");
        let addr = metrics_addr(m);
        let text = http(addr, "/metrics", None).body;
        let om = http(addr, "/metrics", Some("application/openmetrics-text")).body;
        let ready = http(addr, "/readyz", None).body;
        Samples::parse(&venv, &text, false);
        for scraped in [&text, &om, &ready] {
            for t in &tokens {
                assert_absent(scraped, t.trim(), "a scrape");
            }
            for s in &secrets {
                assert_absent(scraped, s, "a scrape");
            }
        }
    }
}

#[test]
fn a_sink_is_ready_once_its_files_are_written() {
    let Some(venv) = parser_venv() else { return };
    let emu = emulator();
    emu.set_latency(Duration::from_millis(1500));
    let dir = crate::sink_support::Tmpfs::new();
    let sink = crate::sink_support::Sink::start(
        &emu.url(),
        &dir.path,
        &[
            "--resource",
            "management.azure.com",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let addr = eventually(Duration::from_secs(10), || {
        let log = sink.log_text();
        let at = log.split("metrics at http://").nth(1)?;
        at.split('/').next()?.parse::<SocketAddr>().ok()
    })
    .expect("the sink logs its metrics address");
    let first = http(addr, "/readyz", None);
    assert_eq!(first.status, 503, "{}", first.body);
    assert!(first.body.contains("not written yet"), "{}", first.body);
    eventually(Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(100));
        (http(addr, "/readyz", None).status == 200).then_some(())
    })
    .expect("ready once the files are written");
    let s = scrape(&venv, addr);
    assert!(
        s.get("cstokenfs_reads_total", &[("front_end", "sink_write")])
            .unwrap()
            >= 1.0
    );
    assert_eq!(
        s.get("cstokenfs_build_info", &[("front_end", "sink")]),
        Some(1.0)
    );
}

#[test]
fn the_readmes_alert_rules_check() {
    let rules = readme_rules();
    assert!(rules.starts_with("groups:\n"), "{rules}");
    assert!(rules.contains("cstokenfs_token_expiry_timestamp_seconds - time() < 600"));
    let Some(promtool) = std::env::var_os("CSTOKENFS_PROMTOOL") else {
        eprintln!("note: CSTOKENFS_PROMTOOL unset: promtool check rules skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cstokenfs.rules.yml");
    std::fs::write(&file, rules).unwrap();
    let out = std::process::Command::new(promtool)
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("SUCCESS: 3 rules found"));
}

#[test]
fn silent_scrapers_hold_back_neither_readers_nor_a_scrape() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &["--metrics", "127.0.0.1:0"]);
    let addr = metrics_addr(&m);
    // More connections than the listener keeps, each with half a request, never finished.
    let silent: Vec<_> = (0..48)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            use std::io::Write;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    let started = std::time::Instant::now();
    m.read("management.azure.com").expect("a reader is served");
    assert!(started.elapsed() < Duration::from_secs(5));
    let got = http(addr, "/metrics", None);
    assert_eq!(
        got.status, 200,
        "a scrape gets through: the oldest silent one goes"
    );
    drop(silent);
}
