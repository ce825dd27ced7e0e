//! Plumbing for the Entra tests: an Entra emulator, test certificates (a CA and a leaf for
//! 127.0.0.1; a client certificate with a fresh RSA key) and secret-safe checks.
#![allow(dead_code)]

use cstokenfs::emulator::entra::EntraSettings;
use cstokenfs::emulator::{Emulator, EmulatorConfig, Kind};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
pub const CLIENT: &str = "8a0b5c4d-1111-2222-3333-444455556666";

/// An Entra emulator on 127.0.0.1 (HTTPS with `tls`) accepting `settings`.
pub fn entra_emulator(settings: EntraSettings, tls: Option<Arc<rustls::ServerConfig>>) -> Emulator {
    let emu = Emulator::start_tls(
        "127.0.0.1:0".parse().unwrap(),
        EmulatorConfig::default(),
        Kind::ServicePrincipal,
        tls,
    )
    .expect("start the Entra emulator");
    emu.set_entra(settings);
    emu
}

pub fn settings() -> EntraSettings {
    EntraSettings {
        tenant: Some(TENANT.into()),
        client_id: Some(CLIENT.into()),
        ..EntraSettings::default()
    }
}

/// The token URL of the emulator for `TENANT` (the `aud` of certificate assertions).
pub fn token_url(emu: &Emulator) -> String {
    format!("{}{TENANT}/oauth2/v2.0/token", emu.url())
}

pub fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

/// A JWT-shaped federated token (unsigned) with this `exp` and a marker making it unique.
pub fn federated_token(exp: i64, marker: &str) -> String {
    use base64::Engine as _;
    let b64 = |s: String| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.c2lnbmF0dXJlLW5vdC1jaGVja2Vk",
        b64(r#"{"alg":"RS256","typ":"JWT"}"#.into()),
        b64(format!(
            r#"{{"aud":["api://AzureADTokenExchange"],"exp":{exp},"iss":"https://oidc.example.invalid/","sub":"system:serviceaccount:default:{marker}"}}"#
        ))
    )
}

/// A client certificate: PEM of the self-signed certificate, PEM of its fresh RSA-2048
/// key (PKCS#8), and the certificate's DER.
pub fn client_certificate() -> (String, String, Vec<u8>) {
    use rsa::pkcs8::EncodePrivateKey;
    let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).expect("RSA key");
    let key_pem = key
        .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
        .expect("PKCS#8 PEM")
        .to_string();
    let pair = rcgen::KeyPair::from_pem(&key_pem).expect("rcgen takes the RSA key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "cstokenfs test principal");
    let cert = params.self_signed(&pair).expect("self-signed certificate");
    (cert.pem(), key_pem, cert.der().to_vec())
}

/// A CA and a leaf for 127.0.0.1 it signed: (CA PEM, leaf PEM, leaf key PEM).
pub fn ca_and_leaf() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "cstokenfs test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    (ca.pem(), leaf.pem(), leaf_key.serialize_pem())
}

/// Asserts `haystack` holds none of `secret` (nor a long piece of it), never printing it.
pub fn assert_absent(haystack: &str, secret: &str, what: &str) {
    assert!(!secret.is_empty());
    let pieces: Vec<&str> = if secret.len() > 48 {
        secret
            .as_bytes()
            .chunks(32)
            .filter(|c| c.len() == 32)
            .map(|c| std::str::from_utf8(c).unwrap_or(""))
            .filter(|c| !c.is_empty())
            .collect()
    } else {
        vec![secret]
    };
    for piece in pieces {
        assert!(
            !haystack.contains(piece),
            "{what} contains a piece of a credential ({} bytes; not shown)",
            secret.len()
        );
    }
}

/// The key material of a PEM key: its base64 lines, joined.
pub fn pem_body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect()
}

/// A mount of the Entra source `source` (`service-principal`, `workload-identity`) for
/// `TENANT`/`CLIENT` with its credential flag and file (`("--client-secret-file", path)`)
/// against `authority`, plus `extra` flags and `env`.
pub fn entra_mount(
    source: &str,
    credential: (&str, &Path),
    authority: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> crate::common::Mounted {
    let path = credential.1.display().to_string();
    let mut args = vec![
        "--source",
        source,
        credential.0,
        &path,
        "--tenant-id",
        TENANT,
        "--client-id",
        CLIENT,
        "--authority-host",
        authority,
    ];
    args.extend_from_slice(extra);
    crate::common::Mounted::raw(&args, env)
}

/// `cstokenfs get` with the secret-file service principal against `authority`.
pub fn get(authority: &str, secret_file: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let mut cmd = crate::common::bin();
    cmd.args(["get", "--source", "service-principal", "--timeout", "2"])
        .args(["--tenant-id", TENANT, "--client-id", CLIENT])
        .arg("--client-secret-file")
        .arg(secret_file)
        .args(["--authority-host", authority])
        .args(extra)
        .arg("management.azure.com");
    cmd.output().expect("run cstokenfs get")
}

/// What an attacker may plant where a credential file is expected.
#[derive(Debug, Clone, Copy)]
pub enum Hostile {
    /// A FIFO without a writer: a blocking open or read would hang for good.
    Fifo,
    /// A link to /dev/zero: a read that never ends.
    Zero,
    /// A link to /proc/self/environ: the reader's environment, sent upstream.
    Proc,
}

pub const HOSTILE: [Hostile; 3] = [Hostile::Fifo, Hostile::Zero, Hostile::Proc];

impl Hostile {
    /// Replaces whatever is at `path` with this; returns the reason an error must give.
    pub fn plant(self, path: &Path) -> &'static str {
        let _ = std::fs::remove_file(path);
        match self {
            Hostile::Fifo => {
                let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
                // SAFETY: mkfifo reads the NUL-terminated path we own.
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
                "is not a regular file (a FIFO)"
            }
            Hostile::Zero => {
                std::os::unix::fs::symlink("/dev/zero", path).unwrap();
                "is not a regular file (a character device)"
            }
            Hostile::Proc => {
                std::os::unix::fs::symlink("/proc/self/environ", path).unwrap();
                "is on procfs"
            }
        }
    }
}

/// A variable set in the environment of the processes the hostile-file tests start: a
/// /proc/self/environ read would carry it; it must show nowhere.
pub const ENVIRON_MARKER: (&str, &str) = ("CSTOKENFS_TEST_MARKER", "environ-marker-7f3a9c");

/// Runs `cmd` (identity variables removed, `ENVIRON_MARKER` set) to its end; a run longer
/// than `within` is killed and fails the test: a credential file must never hang it.
pub fn output_within(mut cmd: std::process::Command, within: Duration) -> std::process::Output {
    use std::process::Stdio;
    crate::common::without_identity(&mut cmd).env(ENVIRON_MARKER.0, ENVIRON_MARKER.1);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cstokenfs");
    if crate::common::wait_child(&mut child, within).is_none() {
        let _ = child.kill();
        let _ = child.wait();
        let args: Vec<_> = cmd.get_args().collect();
        panic!("{args:?} still running after {within:?}: it hung");
    }
    child.wait_with_output().expect("output")
}
