//! Issue 13: the Microsoft Entra sources (workload identity, service principal with a
//! secret or a certificate) end to end through real mounts against the Entra emulator on
//! 127.0.0.1, over plain http to loopback and over TLS with `--ca-file`. The default
//! authority is never dialled: every test points the authority at the emulator.

use crate::common;
use crate::entra_support;

use common::*;
use cstokenfs::emulator::decode_claims;
use cstokenfs::emulator::entra::EntraSettings;
use entra_support::*;

fn param(emu: &cstokenfs::emulator::Emulator, key: &str) -> String {
    emu.last_params()
        .and_then(|p| p.get(key).cloned())
        .unwrap_or_default()
}

#[test]
fn service_principal_with_a_secret_file() {
    need_fuse!();
    let dir = tempfile::tempdir().unwrap();
    let secret = "Zx8Q~correct-horse-battery-staple.1234";
    let emu = entra_emulator(
        EntraSettings {
            client_secret: Some(secret.into()),
            ..settings()
        },
        None,
    );
    let file = write(dir.path(), "secret", &format!("{secret}\n"));
    let mount = |file: &std::path::Path, env: &[(&str, &str)]| {
        entra_mount(
            "service-principal",
            ("--client-secret-file", file),
            &emu.url(),
            &[],
            env,
        )
    };
    // A dead proxy in the environment: a loopback authority never goes through it.
    let env = [
        ("RUST_LOG", "trace"),
        ("HTTPS_PROXY", "http://127.0.0.1:1"),
        ("HTTP_PROXY", "http://127.0.0.1:1"),
    ];
    let m = mount(&file, &env);
    let token = m.read("management.azure.com").expect("a token");
    assert_eq!(claims(&token)["aud"], "https://management.azure.com");
    assert_eq!(param(&emu, "grant_type"), "client_credentials");
    assert_eq!(param(&emu, "client_id"), CLIENT);
    assert_eq!(
        param(&emu, "scope"),
        "https://management.azure.com/.default"
    );
    assert!(
        param(&emu, "client_secret") == secret,
        "the secret arrives without its newline"
    );
    let token = m.read("vault.azure.net").expect("a token");
    assert_eq!(claims(&token)["aud"], "https://vault.azure.net");
    assert_eq!(param(&emu, "scope"), "https://vault.azure.net/.default");
    let s = m.status();
    assert_eq!(s["source"], "service-principal");
    assert!(s["source_reason"]
        .as_str()
        .unwrap()
        .contains("--source service-principal"));
    // An unknown resource: AADSTS500011, ENOENT, negative-cached.
    let unknown = m.read_err("newservice.example.com");
    assert_eq!(errno(&unknown), libc::ENOENT);
    let calls = emu.requests();
    assert_eq!(errno(&m.read_err("newservice.example.com")), libc::ENOENT);
    assert_eq!(emu.requests(), calls, "a refusal is remembered");
    assert!(m
        .last_error("https://newservice.example.com")
        .contains("AADSTS500011"));
    assert_absent(&m.leak_surface(), secret, "log and .status");
    drop(m);

    // A wrong secret: EACCES, AADSTS7000215 in .status, neither secret anywhere.
    let wrong = "Zx8Q~wrong-secret-value.98765";
    let file = write(dir.path(), "wrong", wrong);
    let m = mount(&file, &env);
    let denied = m.read_err("management.azure.com");
    assert_eq!(errno(&denied), libc::EACCES);
    let error = m.last_error("https://management.azure.com/");
    assert!(
        error.contains("AADSTS7000215") && error.contains("invalid_client"),
        "{error}"
    );
    assert!(m.log_text().contains("AADSTS7000215"));
    let surface = m.leak_surface();
    assert_absent(&surface, wrong, "log and .status");
    assert_absent(&surface, secret, "log and .status");
}

#[test]
fn workload_identity_rereads_its_token_file() {
    need_fuse!();
    let dir = tempfile::tempdir().unwrap();
    let first = federated_token(now_secs() + 3600, "first");
    let file = write(dir.path(), "azure-identity-token", &format!("{first}\n"));
    let emu = entra_emulator(
        EntraSettings {
            federated_token_file: Some(file.clone()),
            ..settings()
        },
        None,
    );
    let url = emu.url();
    let path = file.display().to_string();
    // Detected from the variables the AKS webhook injects.
    let m = Mounted::raw(
        &[],
        &[
            ("AZURE_FEDERATED_TOKEN_FILE", &path),
            ("AZURE_CLIENT_ID", CLIENT),
            ("AZURE_TENANT_ID", TENANT),
            ("AZURE_AUTHORITY_HOST", &url),
            ("RUST_LOG", "trace"),
        ],
    );
    m.read("vault.azure.net").expect("a token");
    assert!(
        param(&emu, "client_assertion") == first,
        "the file's contents, trimmed"
    );
    assert_eq!(
        param(&emu, "client_assertion_type"),
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    assert_eq!(param(&emu, "client_id"), CLIENT);
    let s = m.status();
    assert_eq!(s["source"], "workload-identity");
    let reason = s["source_reason"].as_str().unwrap();
    assert!(reason.contains("AZURE_FEDERATED_TOKEN_FILE"), "{reason}");

    // The kubelet rotates the file: the next request sends the new contents.
    let second = federated_token(now_secs() + 3600, "second");
    std::fs::write(&file, &second).unwrap();
    m.read("storage.azure.com").expect("a token after rotation");
    assert!(
        param(&emu, "client_assertion") == second,
        "the rotated token is sent"
    );

    // An expired assertion: AADSTS700024, EACCES.
    let expired = federated_token(now_secs() - 60, "expired");
    std::fs::write(&file, &expired).unwrap();
    assert_eq!(errno(&m.read_err("graph.microsoft.com")), libc::EACCES);
    let error = m.last_error("https://graph.microsoft.com/");
    assert!(error.contains("AADSTS700024"), "{error}");

    // An empty file: EIO, an error naming the file.
    std::fs::write(&file, "\n").unwrap();
    assert_eq!(errno(&m.read_err("database.windows.net")), libc::EIO);
    let error = m.last_error("https://database.windows.net");
    assert!(
        error.contains("azure-identity-token") && error.contains("empty"),
        "{error}"
    );

    let surface = m.leak_surface();
    for (token, what) in [
        (&first, "first"),
        (&second, "second"),
        (&expired, "expired"),
    ] {
        assert_absent(&surface, token, what);
    }
}

#[test]
fn service_principal_with_a_certificate() {
    need_fuse!();
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, key_pem, cert_der) = client_certificate();
    let file = write(dir.path(), "principal.pem", &format!("{cert_pem}{key_pem}"));
    let emu = entra_emulator(
        EntraSettings {
            client_certificate: Some(cert_der),
            ..settings()
        },
        None,
    );
    let (url, path) = (emu.url(), file.display().to_string());
    let env = [
        ("AZURE_TENANT_ID", TENANT),
        ("AZURE_CLIENT_ID", CLIENT),
        ("AZURE_CLIENT_CERTIFICATE_PATH", path.as_str()),
        ("AZURE_AUTHORITY_HOST", url.as_str()),
        ("RUST_LOG", "trace"),
    ];
    let m = Mounted::raw(&[], &env);
    let token = m.read("management.azure.com").expect("a token");
    assert_eq!(claims(&token)["aud"], "https://management.azure.com");
    let assertion = param(&emu, "client_assertion");
    let header = decode_claims(&format!(
        "x.{}",
        assertion.split('.').next().unwrap_or_default()
    ))
    .expect("a JWT header");
    assert_eq!(header["alg"], "RS256");
    assert!(header["x5t"].is_string() && header["x5t#S256"].is_string());
    let c = decode_claims(&assertion).expect("JWT claims");
    assert_eq!(c["aud"], token_url(&emu).as_str());
    assert_eq!(
        (c["iss"].as_str(), c["sub"].as_str()),
        (Some(CLIENT), Some(CLIENT))
    );
    assert!(c["jti"].is_string());
    let (iat, exp) = (c["iat"].as_i64().unwrap(), c["exp"].as_i64().unwrap());
    assert!(exp > iat && exp - iat <= 600 && c["nbf"].as_i64() <= Some(iat));
    let s = m.status();
    assert_eq!(s["source"], "service-principal");
    let reason = s["source_reason"].as_str().unwrap();
    assert!(reason.contains("AZURE_CLIENT_CERTIFICATE_PATH"), "{reason}");
    let surface = m.leak_surface();
    assert_absent(&surface, &pem_body(&key_pem), "the key");
    assert_absent(&surface, &assertion, "the assertion");
    drop(m);

    // The emulator trusts another certificate: the signature fails, AADSTS700027, EACCES.
    let (_, _, other) = client_certificate();
    emu.set_entra(EntraSettings {
        client_certificate: Some(other),
        ..settings()
    });
    let m = Mounted::raw(&[], &env);
    assert_eq!(errno(&m.read_err("vault.azure.net")), libc::EACCES);
    assert!(m
        .last_error("https://vault.azure.net")
        .contains("AADSTS700027"));
}

#[test]
fn tls_with_a_ca_file_and_refused_without_it() {
    need_fuse!();
    let dir = tempfile::tempdir().unwrap();
    let (ca, leaf, leaf_key) = ca_and_leaf();
    let tls = cstokenfs::server_config(leaf.as_bytes(), leaf_key.as_bytes()).expect("TLS config");
    let secret = "tls-secret-value-0123456789";
    let emu = entra_emulator(
        EntraSettings {
            client_secret: Some(secret.into()),
            ..settings()
        },
        Some(tls),
    );
    let url = emu.url();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let ca_file = write(dir.path(), "ca.pem", &ca);
    let secret_file = write(dir.path(), "secret", secret);
    let ca_path = ca_file.display().to_string();
    let m = entra_mount(
        "service-principal",
        ("--client-secret-file", &secret_file),
        &url,
        &["--ca-file", &ca_path],
        &[("RUST_LOG", "trace")],
    );
    let token = m
        .read("management.azure.com")
        .expect("a token over verified TLS");
    assert_eq!(claims(&token)["aud"], "https://management.azure.com");
    assert_absent(&m.leak_surface(), secret, "log and .status");

    // Without the CA the certificate is not trusted: no token, exit 1.
    let calls = emu.requests();
    let out = get(&url, &secret_file, &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    assert_eq!(emu.requests(), calls, "no request got through");
    let out = get(&url, &secret_file, &["--ca-file", &ca_path]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_authority_must_be_https_or_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = write(dir.path(), "secret", "s");
    for bad in [
        "http://login.example.invalid/",
        "ftp://127.0.0.1/",
        "not a url",
    ] {
        let out = get(bad, &secret_file, &[]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("https://") || stderr.contains("malformed"),
            "{stderr}"
        );
    }
    let (_d, mnt) = scratch_mountpoint();
    let out = cli(["mount", "-f", "--source", "workload-identity"])
        .args(["--tenant-id", TENANT, "--client-id", CLIENT])
        .args(["--federated-token-file", "/nonexistent/token"])
        .args(["--authority-host", "http://login.example.invalid/"])
        .arg(&mnt)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be https://"));
    assert!(!is_mounted(&mnt));
}

#[test]
fn a_service_principal_wins_over_workload_identity_and_cloud_shell() {
    need_fuse!();
    let dir = tempfile::tempdir().unwrap();
    let secret = "auto-detected-secret-42";
    let token_file = write(
        dir.path(),
        "token",
        &federated_token(now_secs() + 600, "auto"),
    );
    let emu = entra_emulator(
        EntraSettings {
            client_secret: Some(secret.into()),
            ..settings()
        },
        None,
    );
    let (url, path) = (emu.url(), token_file.display().to_string());
    let m = Mounted::raw(
        &[],
        &[
            ("AZURE_TENANT_ID", TENANT),
            ("AZURE_CLIENT_ID", CLIENT),
            ("AZURE_CLIENT_SECRET", secret),
            ("AZURE_FEDERATED_TOKEN_FILE", &path),
            ("AZURE_AUTHORITY_HOST", &url),
            ("MSI_ENDPOINT", "http://127.0.0.1:1/oauth2/token"),
            ("RUST_LOG", "trace"),
        ],
    );
    m.read("management.azure.com").expect("a token");
    let s = m.status();
    assert_eq!(s["source"], "service-principal");
    let reason = s["source_reason"].as_str().unwrap();
    assert!(reason.contains("AZURE_CLIENT_SECRET"), "{reason}");
    assert!(param(&emu, "client_secret") == secret);
    assert_absent(&m.leak_surface(), secret, "log and .status");
}

/// Issue 19: a FIFO, a link to /dev/zero or to /proc/self/environ, or a file that is not a
/// JWT as the federated token file: each read fails with EIO within --timeout, naming the
/// file and why, nothing reaches the authority, and the daemon stays responsive.
#[test]
fn hostile_federated_token_files_fail_reads_within_the_timeout() {
    need_fuse!();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("azure-identity-token");
    let good = federated_token(now_secs() + 3600, "good");
    let emu = entra_emulator(
        EntraSettings {
            federated_token_file: Some(file.clone()),
            ..settings()
        },
        None,
    );
    let (url, path) = (emu.url(), file.display().to_string());
    std::fs::write(&file, &good).unwrap();
    let env = [
        ("AZURE_FEDERATED_TOKEN_FILE", path.as_str()),
        ("AZURE_CLIENT_ID", CLIENT),
        ("AZURE_TENANT_ID", TENANT),
        ("AZURE_AUTHORITY_HOST", url.as_str()),
        ("RUST_LOG", "trace"),
        ENVIRON_MARKER,
    ];
    let m = std::sync::Arc::new(Mounted::raw(&["--timeout", "3"], &env));
    // A read on its own thread: a hang fails the test instead of hanging it.
    let read_within = |name: &'static str| {
        let (tx, rx) = std::sync::mpsc::channel();
        let mounted = m.clone();
        std::thread::spawn(move || tx.send(mounted.read(name)));
        rx.recv_timeout(std::time::Duration::from_secs(15))
            .unwrap_or_else(|_| panic!("a read of {name} hung"))
    };
    let cases = [
        (
            Some(Hostile::Fifo),
            "management.azure.com",
            "https://management.azure.com/",
        ),
        (
            Some(Hostile::Zero),
            "vault.azure.net",
            "https://vault.azure.net",
        ),
        (
            Some(Hostile::Proc),
            "storage.azure.com",
            "https://storage.azure.com/",
        ),
        (None, "graph.microsoft.com", "https://graph.microsoft.com/"),
    ];
    for (hostile, name, resource) in cases {
        let why = match hostile {
            Some(h) => h.plant(&file),
            None => {
                std::fs::remove_file(&file).unwrap();
                std::fs::write(&file, "not-a-jwt\n").unwrap();
                "is not a JWT"
            }
        };
        let e = expect_err(read_within(name), name);
        assert_eq!(errno(&e), libc::EIO, "{hostile:?}");
        let error = m.last_error(resource);
        assert!(error.contains(&path) && error.contains(why), "{error}");
    }
    assert_eq!(emu.requests(), 0, "nothing reached the authority");
    // Responsive: .status answers and, the file fixed, a read gets a token.
    std::fs::remove_file(&file).unwrap();
    std::fs::write(&file, &good).unwrap();
    read_within("database.windows.net").expect("a token once the file is a JWT again");
    let surface = m.leak_surface();
    assert_absent(&surface, ENVIRON_MARKER.1, "the daemon's environment");
    assert_absent(&surface, &good, "the federated token");
}

/// `get` and start-up with a hostile credential file (federated token, client secret,
/// certificate): an error naming the file and why, within a bound, never a hang.
#[test]
fn hostile_credential_files_fail_get_and_start_up_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credential");
    let emu = entra_emulator(settings(), None);
    let url = emu.url();
    let within = std::time::Duration::from_secs(15);
    let get = |source: &str, flag: &str| {
        let mut cmd = bin();
        cmd.args(["get", "--timeout", "3", "--source", source])
            .args(["--tenant-id", TENANT, "--client-id", CLIENT, flag])
            .arg(&file)
            .args(["--authority-host", &url, "management.azure.com"]);
        output_within(cmd, within)
    };
    let check = |out: std::process::Output, why: &str, what: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{what}: {err}");
        assert!(
            err.contains(&file.display().to_string()) && err.contains(why),
            "{what}: {err}"
        );
        assert_absent(&err, ENVIRON_MARKER.1, what);
    };
    for hostile in HOSTILE {
        let why = hostile.plant(&file);
        let what = format!("{hostile:?}");
        check(
            get("workload-identity", "--federated-token-file"),
            why,
            &what,
        );
        check(get("service-principal", "--client-secret-file"), why, &what);
        check(get("service-principal", "--client-certificate"), why, &what);
    }
    std::fs::remove_file(&file).unwrap();
    std::fs::write(&file, "not.a-jwt\n").unwrap();
    check(
        get("workload-identity", "--federated-token-file"),
        "is not a JWT",
        "not a JWT",
    );
    assert_eq!(emu.requests(), 0, "nothing reached the authority");

    // A mount whose secret file is a FIFO exits 1 saying why, foreground or not.
    need_fuse!();
    Hostile::Fifo.plant(&file);
    let (_d, mnt) = scratch_mountpoint();
    let _guard = KillOnDrop(mnt.clone());
    for foreground in [true, false] {
        let mut cmd = bin();
        cmd.arg("mount")
            .args(foreground.then_some("-f"))
            .args(["--source", "service-principal", "--tenant-id", TENANT])
            .args(["--client-id", CLIENT, "--client-secret-file"])
            .arg(&file)
            .args(["--authority-host", &url])
            .arg(&mnt);
        let out = output_within(cmd, within);
        assert_eq!(out.status.code(), Some(1), "foreground {foreground}");
        check(out, "(a FIFO)", "mount");
        assert!(!is_mounted(&mnt));
    }
}

/// A federated token file on a filesystem that does not answer (here a cstokenfs mount whose
/// own upstream hangs, a stand-in for a dead NFS server): the read is given up at the
/// fetch's deadline, the reader gets EIO within `--timeout`, and the daemon stays responsive.
#[test]
fn a_federated_token_file_on_a_hung_filesystem_fails_within_the_timeout() {
    need_fuse!();
    let hanging = emulator();
    hanging.set_fault(Some(cstokenfs::emulator::Fault::Hang));
    let stuck = Mounted::new(&hanging.url(), &["--timeout", "8"]);
    let file = stuck.file("management.azure.com");
    let emu = entra_emulator(settings(), None);
    let (url, path) = (emu.url(), file.display().to_string());
    let env = [
        ("AZURE_FEDERATED_TOKEN_FILE", path.as_str()),
        ("AZURE_CLIENT_ID", CLIENT),
        ("AZURE_TENANT_ID", TENANT),
        ("AZURE_AUTHORITY_HOST", url.as_str()),
    ];
    // Declared, so its entry (and last_error) stays in .status after the failure: an
    // undeclared name that holds nothing is dropped by the next background pass.
    let m = Mounted::raw(&["--timeout", "2", "--resource", "vault.azure.net"], &env);
    let started = std::time::Instant::now();
    let e = expect_err(m.read("vault.azure.net"), "a read through a hung file");
    assert_eq!(errno(&e), libc::EIO);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(6),
        "given up at the deadline, not when the filesystem answered"
    );
    let error = m.last_error("https://vault.azure.net");
    assert!(error.contains("does not answer"), "{error}");
    assert_eq!(emu.requests(), 0, "nothing reached the authority");
    m.read(".status").expect("the daemon stays responsive");
}
