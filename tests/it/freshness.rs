//! Issue 3: freshness and faults, injected through the emulator into real mounts.

use crate::common;

use common::*;
use cstokenfs::emulator::{ExpiresOnForm, Fault};
use std::time::{Duration, Instant};

const ARM: &str = "https://management.azure.com/";

fn status_code(code: u16, retry_after: Option<&str>) -> Fault {
    Fault::Status {
        code,
        body: format!(r#"{{"error":{{"code":"Injected","message":"injected {code}"}}}}"#),
        retry_after: retry_after.map(str::to_string),
    }
}

/// Reads every 50 ms until `done(serials seen in order)` or `within` is up, returning (the
/// serials, the slowest read). Every read must succeed with a token that has not expired.
fn read_until(
    m: &Mounted,
    name: &str,
    within: Duration,
    mut done: impl FnMut(&[u64]) -> bool,
) -> (Vec<u64>, Duration) {
    let end = Instant::now() + within;
    let (mut serials, mut worst) = (Vec::new(), Duration::ZERO);
    while Instant::now() < end && !done(&serials) {
        let t0 = Instant::now();
        let token = m
            .read(name)
            .expect("a reader of a token in use always gets one");
        worst = worst.max(t0.elapsed());
        let c = claims(&token);
        assert!(
            c["exp"].as_i64().unwrap() > now_secs(),
            "an expired token was served"
        );
        let s = c["serial"].as_u64().unwrap();
        if serials.last() != Some(&s) {
            serials.push(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (serials, worst)
}

#[test]
fn slow_endpoint_across_rollovers_readers_never_wait() {
    need_fuse!();
    let emu = emulator();
    emu.set_ttl(12);
    let m = Mounted::new(&emu.url(), &["--refresh-margin", "6"]);
    m.read("management.azure.com").unwrap();
    // From now on every upstream answer takes 3 s; a reader that waited on one would take that long.
    emu.set_latency(Duration::from_millis(3000));
    // Refreshed 6 s before expiry, answered 3 s later, well before the old token stops
    // being valid (0.8 s before expiry), with room for a loaded machine. Two rollovers: a
    // token fetched in the background is itself refreshed in the background.
    let rollovers = |s: &[u64]| s.len() >= 3;
    let (serials, worst) = read_until(
        &m,
        "management.azure.com",
        Duration::from_secs(30),
        rollovers,
    );
    assert!(serials.len() >= 3, "at least two rollovers: {serials:?}");
    // A bound well under the upstream's 3 s (readers on a loaded machine take a while).
    assert!(
        worst < Duration::from_millis(2000),
        "a reader waited on the upstream: {worst:?}"
    );
}

#[test]
fn a_token_nobody_reads_is_not_refreshed_and_is_dropped_when_expired() {
    need_fuse!();
    let emu = emulator();
    emu.set_ttl(3);
    let m = Mounted::new(&emu.url(), &["--refresh-margin", "1"]);
    m.read("vault.azure.net").unwrap();
    // Dropped from the listing once expired, which is past the refresh point (2 s).
    let listed = || {
        std::fs::read_dir(&m.path)
            .unwrap()
            .any(|e| e.unwrap().file_name() == "vault.azure.net")
    };
    let dropped = eventually(Duration::from_secs(10), || (!listed()).then_some(()));
    assert!(dropped.is_some(), "expired token dropped from the listing");
    assert_eq!(
        emu.requests(),
        1,
        "no background refresh of an unread token"
    );
    let t = m.read("vault.azure.net").unwrap();
    assert_eq!(serial(&t), 2, "the next reader fetches a new one");
}

#[test]
fn caching_upstream_returns_the_same_token_without_spinning() {
    need_fuse!();
    let emu = emulator();
    emu.set_ttl(8);
    emu.set_caching(true);
    let m = Mounted::new(&emu.url(), &["--refresh-margin", "4", "--timeout", "5"]);
    // Read until the upstream's token expired and a new one came (about 8 s).
    let t0 = Instant::now();
    let renewed = |s: &[u64]| s.len() >= 2;
    let (serials, _) = read_until(&m, "management.azure.com", Duration::from_secs(30), renewed);
    assert!(
        serials.len() >= 2,
        "new tokens once the upstream's expired: {serials:?}"
    );
    let calls = emu.requests();
    // Of 8 s tokens: refresh point at 4 s, then retries tightening toward expiry, at most
    // one call every 2 s, plus a few while the upstream still holds the old one (a read
    // every 50 ms that spun would be a call per read).
    let took = t0.elapsed();
    assert!(calls <= 20, "{calls} upstream calls in {took:?}: spinning");
    assert!(
        m.log_text().contains("already held"),
        "the caching upstream is noticed in the log"
    );
}

#[test]
fn hang_costs_a_waiting_reader_the_timeout_and_blocks_nothing_else() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &["--timeout", "2"]);
    let held = m.read("management.azure.com").unwrap();
    emu.set_fault(Some(Fault::Hang));
    let t0 = Instant::now();
    let err = m.read_err("vault.azure.net");
    assert_eq!(errno(&err), libc::EIO);
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "bounded by --timeout: {:?}",
        t0.elapsed()
    );
    let before = emu.requests();
    let waiting = {
        let p = m.file("storage.azure.com");
        std::thread::spawn(move || std::fs::read(p))
    };
    let started = eventually(Duration::from_secs(5), || {
        (emu.requests() > before).then_some(())
    });
    assert!(
        started.is_some(),
        "the second fetch reached the hanging endpoint"
    );
    assert_same_token(
        &m.read("management.azure.com").unwrap(),
        &held,
        "a cached resource while another hangs",
    );
    m.status();
    std::fs::read_dir(&m.path).unwrap().for_each(drop);
    assert!(
        !waiting.is_finished(),
        ".status, ls and a cached read answered while a fetch hung"
    );
    assert_eq!(
        errno(&expect_err(waiting.join().unwrap(), "storage.azure.com")),
        libc::EIO
    );
    emu.set_fault(None);
    m.read("vault.azure.net")
        .expect("nothing negative-cached after a hang");
}

#[test]
fn server_errors_are_retried_within_one_fetch() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &[]);
    for code in [500, 503, 404, 408, 410] {
        emu.push_fault(status_code(code, None));
    }
    let token = m
        .read("management.azure.com")
        .expect("5xx, 404, 408, 410 then success");
    assert_eq!(claims(&token)["aud"], ARM);
    assert_eq!(emu.requests(), 6);
}

#[test]
fn client_errors_are_not_retried_and_are_negative_cached() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &["--negative-ttl", "60"]);
    // A refused audience is ENOENT; a refused identity (401, 403, or a 400 naming an
    // identity that does not exist, as IMDS and App Service send) is EACCES.
    let identity_not_found = Fault::Status {
        code: 400,
        body: r#"{"error":"invalid_request","error_description":"Identity not found"}"#.into(),
        retry_after: None,
    };
    let cases = [
        (status_code(400, None), libc::ENOENT, "management.azure.com"),
        (status_code(401, None), libc::EACCES, "vault.azure.net"),
        (status_code(403, None), libc::EACCES, "storage.azure.com"),
        (identity_not_found, libc::EACCES, "graph.microsoft.com"),
    ];
    for (i, (fault, want, name)) in cases.into_iter().enumerate() {
        let code = format!("{fault:?}");
        emu.push_fault(fault);
        assert_eq!(errno(&m.read_err(name)), want, "{code}");
        assert_eq!(errno(&m.read_err(name)), want, "{code} remembered");
        assert_eq!(
            emu.requests(),
            i as u64 + 1,
            "{code} is asked once, never retried"
        );
    }
}

#[test]
fn too_many_requests_honours_retry_after() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &["--timeout", "5"]);
    emu.push_fault(status_code(429, Some("2")));
    let t0 = Instant::now();
    m.read("management.azure.com").expect("429 then success");
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "waited Retry-After before asking again"
    );
    assert_eq!(emu.requests(), 2);
    // A Retry-After longer than the timeout: the waiting reader gets EIO at once.
    emu.push_fault(status_code(429, Some("30")));
    assert_eq!(errno(&m.read_err("vault.azure.net")), libc::EIO);
    assert_eq!(emu.requests(), 3);
}

#[test]
fn a_failed_background_refresh_keeps_the_valid_token_and_backs_off() {
    need_fuse!();
    let emu = emulator();
    emu.set_ttl(12);
    let m = Mounted::new(&emu.url(), &["--refresh-margin", "6"]);
    let held = m.read("management.azure.com").unwrap();
    emu.set_fault(Some(status_code(503, Some("30"))));
    // Past the refresh point (6 s): readers keep the held token; refreshes fail.
    let failed = m
        .wait_status(Duration::from_secs(16), |s| {
            assert_same_token(
                &m.read("management.azure.com").unwrap(),
                &held,
                "held token served",
            );
            let r = resource_entry(s, ARM);
            (r["state"] == "failed").then_some(r)
        })
        .expect("state failed after the refresh fails");
    assert!(failed["last_error"].as_str().unwrap().contains("503"));
    assert!(failed["consecutive_failures"].as_u64().unwrap() >= 1);
    assert!(
        failed["next_refresh"].as_i64().unwrap() >= now_secs() + 20,
        "Retry-After 30 honoured: {failed}"
    );
    // Nothing to wait on: a retry that ignored Retry-After would come after the shortest
    // backoff (2 s); none may come in that time (the token is valid for 4 s more).
    let calls = emu.requests();
    std::thread::sleep(Duration::from_secs(2));
    m.read("management.azure.com").unwrap();
    assert_eq!(emu.requests(), calls, "no retry before the backoff is over");
    let warnings = m.log_text().matches("refresh failed").count();
    assert_eq!(warnings, 1, "the failure is logged once");
}

#[test]
fn a_refusal_while_a_valid_token_is_held_keeps_serving_it() {
    need_fuse!();
    let emu = emulator();
    emu.set_ttl(10);
    let m = Mounted::new(&emu.url(), &["--refresh-margin", "6"]);
    let held = m.read("management.azure.com").unwrap();
    emu.set_fault(Some(status_code(400, None)));
    let r = m
        .wait_status(Duration::from_secs(8), |s| {
            assert_same_token(
                &m.read("management.azure.com").unwrap(),
                &held,
                "held token served",
            );
            let r = resource_entry(s, ARM);
            (r["state"] == "failed").then_some(r)
        })
        .expect("an intermittent 400 while a token is held: state failed");
    assert_eq!(r["expires_on"].as_i64(), claims(&held)["exp"].as_i64());
    emu.set_fault(None);
    let recovered = eventually(Duration::from_secs(8), || {
        let t = m.read("management.azure.com").unwrap();
        (serial(&t) != serial(&held)).then_some(())
    });
    assert!(
        recovered.is_some(),
        "recovers when the endpoint answers again"
    );
    assert_eq!(m.resource_status(ARM)["state"], "fresh");
    assert!(
        m.log_text().contains("fetched again after"),
        "recovery logged"
    );
}

#[test]
fn garbage_and_missing_fields_are_eio_naming_what_was_wrong() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &["--timeout", "2"]);
    let cases = [
        (Fault::Garbage, "not JSON"),
        (Fault::MissingAccessToken, "no access_token"),
        (Fault::EmptyAccessToken, "empty"),
        (
            Fault::ExpiresOn(ExpiresOnForm::Nothing),
            "neither expires_on nor expires_in",
        ),
        (Fault::ExpiresOn(ExpiresOnForm::GarbageString), "expires_on"),
    ];
    for (fault, want) in cases {
        emu.push_fault(fault.clone());
        let before = emu.requests();
        assert_eq!(
            errno(&m.read_err("management.azure.com")),
            libc::EIO,
            "{fault:?}"
        );
        let last = m.resource_status(ARM)["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(last.contains(want), "{fault:?}: {last}");
        assert_eq!(emu.requests(), before + 1, "{fault:?} is not retried");
    }
    m.read("management.azure.com")
        .expect("nothing negative-cached");
}

#[test]
fn every_expiry_format_is_understood() {
    need_fuse!();
    let emu = emulator();
    emu.set_allow_any(true);
    let m = Mounted::new(&emu.url(), &[]);
    let forms = [
        ExpiresOnForm::EpochString,
        ExpiresOnForm::EpochNumber,
        ExpiresOnForm::LegacyDateAmPm,
        ExpiresOnForm::LegacyDate24h,
        ExpiresOnForm::OnlyExpiresIn,
        ExpiresOnForm::ExpiresInNumber,
    ];
    for (i, form) in forms.into_iter().enumerate() {
        emu.push_fault(Fault::ExpiresOn(form));
        let name = format!("r{i}.example.com");
        let json: serde_json::Value =
            serde_json::from_slice(&m.read(&format!(".json/{name}")).expect("read")).unwrap();
        let exp = json["expires_on"].as_i64().unwrap();
        let want = claims(json["access_token"].as_str().unwrap().as_bytes())["exp"]
            .as_i64()
            .unwrap();
        assert!(
            (exp - want).abs() <= 1,
            "{form:?}: expires_on {exp}, token exp {want}"
        );
    }
}

#[test]
fn a_huge_body_is_an_error_and_memory_stays_bounded() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &["--timeout", "5"]);
    emu.push_fault(Fault::HugeBody { bytes: 64 << 20 });
    assert_eq!(errno(&m.read_err("management.azure.com")), libc::EIO);
    let last = m.resource_status(ARM)["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(last.contains("larger than 64 KiB"), "{last}");
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", m.pid())).unwrap();
    let hwm_kib: u64 = proc_status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(
        hwm_kib < 48 * 1024,
        "peak RSS {hwm_kib} KiB after a 64 MiB answer"
    );
    m.read("management.azure.com").expect("works again");
}

#[test]
fn endpoint_killed_and_back() {
    need_fuse!();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let start =
        || cstokenfs::emulator::Emulator::start(addr, Default::default()).expect("emulator");
    let emu = start();
    // Long enough that the reads below end (the refresh failed, ~6 s in) with seconds to
    // spare before the token's end, on a loaded machine too.
    emu.set_ttl(14);
    let m = Mounted::new(&emu.url(), &["--refresh-margin", "8", "--timeout", "1"]);
    let held = m.read("management.azure.com").unwrap();
    drop(emu);
    // A valid token cached: still served, even past the refresh point (6 s), once the
    // refresh has failed.
    let failed = |s: &[u64]| !s.is_empty() && m.resource_status(ARM)["state"] == "failed";
    let (serials, _) = read_until(&m, "management.azure.com", Duration::from_secs(9), failed);
    assert_eq!(serials, vec![serial(&held)]);
    assert_eq!(m.resource_status(ARM)["state"], "failed");
    // None cached: EIO.
    assert_eq!(errno(&m.read_err("vault.azure.net")), libc::EIO);
    // Back again: both work, the held one refreshed before it expires.
    let emu = start();
    m.read("vault.azure.net")
        .expect("works once the endpoint is back");
    let refreshed = eventually(Duration::from_secs(5), || {
        let t = m.read("management.azure.com").unwrap();
        (claims(&t)["serial"] != claims(&held)["serial"]).then_some(())
    });
    assert!(
        refreshed.is_some(),
        "refreshed after the endpoint came back"
    );
    drop(emu);
}

#[test]
fn a_thousand_resources_with_eviction() {
    need_fuse!();
    let emu = emulator();
    emu.set_allow_any(true);
    let m = Mounted::new(
        &emu.url(),
        &[
            "--max-resources",
            "100",
            "--resource",
            "vault.azure.net",
            // A thousand names in a row is a flood the default rate would slow.
            "--max-upstream-rate",
            "0",
        ],
    );
    m.read("vault.azure.net").unwrap();
    for i in 0..1000 {
        m.read(&format!("r{i}.example.com")).unwrap();
    }
    let s = m.status();
    let resources = s["resources"].as_array().unwrap();
    assert!(resources.len() <= 100, "{} entries held", resources.len());
    assert!(
        resources
            .iter()
            .any(|r| r["resource"] == "https://vault.azure.net"),
        "declared resources are kept"
    );
    assert!(
        resources
            .iter()
            .any(|r| r["resource"] == "https://r999.example.com"),
        "recent ones are kept"
    );
    let before = emu.requests();
    m.read("r0.example.com").unwrap();
    assert_eq!(
        emu.requests(),
        before + 1,
        "the least recently read was evicted"
    );
    m.read("vault.azure.net").unwrap();
    assert_eq!(emu.requests(), before + 1, "the declared one was not");
}

#[test]
fn a_short_token_with_a_margin_longer_than_its_life() {
    need_fuse!();
    let emu = emulator();
    emu.set_ttl(4);
    let m = Mounted::new(&emu.url(), &[]); // margin 300 s > 4 s
    let twice = |s: &[u64]| s.len() >= 3;
    let (serials, _) = read_until(&m, "management.azure.com", Duration::from_secs(20), twice);
    assert!(serials.len() >= 3, "refreshed at half-life: {serials:?}");
    // 4 s tokens (issued on whole seconds) refreshed 2 s before expiry: about one call a
    // second, against a read every 50 ms.
    assert!(
        emu.requests() <= 14,
        "{} calls: not every read",
        emu.requests()
    );
}

#[test]
fn sigusr1_drops_every_token() {
    need_fuse!();
    let emu = emulator();
    let m = Mounted::new(&emu.url(), &[]);
    let a = m.read("management.azure.com").unwrap();
    m.read("vault.azure.net").unwrap();
    m.signal(libc::SIGUSR1);
    let b = eventually(Duration::from_secs(5), || {
        let t = m.read("management.azure.com").unwrap();
        (serial(&t) != serial(&a)).then_some(t)
    })
    .expect("a new token after SIGUSR1");
    assert!(serial(&b) > serial(&a));
    assert_eq!(emu.requests_for(ARM), 2);
    assert!(m.log_text().contains("dropped every held token"));
}

#[test]
fn an_open_file_keeps_its_token_across_a_refresh() {
    need_fuse!();
    use std::io::{Read, Seek};
    let emu = emulator();
    emu.set_ttl(6);
    let m = Mounted::new(&emu.url(), &["--refresh-margin", "3"]);
    let mut f = std::fs::File::open(m.file("management.azure.com")).unwrap();
    let mut first = vec![0u8; 10];
    f.read_exact(&mut first).unwrap();
    let newer = eventually(Duration::from_secs(6), || {
        let t = m.read("management.azure.com").unwrap();
        (serial(&t) > 1).then_some(t)
    })
    .expect("a refresh happened");
    let mut rest = Vec::new();
    f.read_to_end(&mut rest).unwrap();
    first.extend_from_slice(&rest);
    assert_eq!(
        serial(&first),
        1,
        "one open sees one token, first byte to last"
    );
    f.rewind().unwrap();
    assert!(serial(&newer) > 1);
}

#[test]
fn an_expired_token_with_the_endpoint_down_is_eio_within_the_timeout() {
    need_fuse!();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let emu = cstokenfs::emulator::Emulator::start(addr, Default::default()).expect("emulator");
    emu.set_ttl(3);
    let m = Mounted::new(&emu.url(), &["--timeout", "2"]);
    let exp = claims(&m.read("management.azure.com").unwrap())["exp"]
        .as_i64()
        .unwrap();
    drop(emu);
    // The kernel still holds the name; the token expires; the endpoint is gone. A second
    // past `exp`, the background refresh that started at half-life (and had no endpoint
    // to ask) is over: the read below starts its own fetch.
    wait_until_epoch(exp + 1);
    let t0 = Instant::now();
    assert_eq!(errno(&m.read_err("management.azure.com")), libc::EIO);
    let waited = t0.elapsed();
    // The kernel looks a cached name up twice when it fails to revalidate; the second
    // lookup must not start a second fetch.
    assert!(
        waited < Duration::from_millis(2_500),
        "one --timeout, not two: {waited:?}"
    );
    assert!(
        m.read("management.azure.com").is_err(),
        "a new read asks again (and fails)"
    );
}
