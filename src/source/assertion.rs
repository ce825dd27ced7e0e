//! A service principal's certificate credential: the PEM file's certificate and RSA key,
//! and the client assertion MSAL sends with them (a JWT signed RS256 with the key, header
//! `x5t` and `x5t#S256`, claims `aud` = the token URL, `iss` = `sub` = the client ID,
//! `jti`, `nbf`, `iat`, `exp` ten minutes on). PEM and X.509 through rustls-pki-types and
//! webpki, signatures and digests through ring. The key is kept as DER in a buffer wiped
//! on drop; it never reaches a log, an error or `Debug`.
//!
//! `verify` is the other side (the emulator's check), kept here so both use one format.

use super::{ConfigError, SourceError};
use crate::hardening::MAX_CERTIFICATE_FILE;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use std::fmt;
use std::path::Path;
use zeroize::{Zeroize, Zeroizing};

/// An assertion is valid this long after it is made (MSAL's 10 minutes).
pub const LIFETIME_SECS: u64 = 600;

/// The certificate and key of `AZURE_CLIENT_CERTIFICATE_PATH` / `--client-certificate`.
pub struct ClientCertificate {
    /// PKCS#8 or PKCS#1 DER of the RSA key, wiped on drop.
    key: Zeroizing<Vec<u8>>,
    pkcs8: bool,
    /// base64url SHA-1 and SHA-256 of the certificate's DER.
    x5t: String,
    x5t_s256: String,
}

impl fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("x5t#S256", &self.x5t_s256)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The DER of the first certificate in PEM text (the leaf, as the SDKs take it).
pub fn first_certificate(pem: &[u8]) -> Option<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem)
        .find_map(Result::ok)
        .map(|c| c.as_ref().to_vec())
}

/// base64url (no padding) SHA-1 and SHA-256 thumbprints of a certificate's DER.
pub fn thumbprints(cert_der: &[u8]) -> (String, String) {
    let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, cert_der);
    let sha256 = ring::digest::digest(&ring::digest::SHA256, cert_der);
    (
        URL_SAFE_NO_PAD.encode(sha1.as_ref()),
        URL_SAFE_NO_PAD.encode(sha256.as_ref()),
    )
}

impl ClientCertificate {
    /// Reads a PEM file holding the certificate and its unencrypted RSA private key
    /// (PKCS#8 `BEGIN PRIVATE KEY` or PKCS#1 `BEGIN RSA PRIVATE KEY`), and checks that
    /// they belong together.
    pub fn load(path: &Path) -> Result<ClientCertificate, ConfigError> {
        let bad = |problem: &str| ConfigError::File {
            what: "client certificate",
            path: path.display().to_string(),
            problem: problem.to_string(),
        };
        let pem = crate::hardening::read_credential_file(path, MAX_CERTIFICATE_FILE)
            .map_err(|e| bad(&e.to_string()))?;
        ClientCertificate::from_pem(&pem).map_err(bad)
    }

    /// The same from PEM bytes; the error says what is wrong, never what is in them.
    pub fn from_pem(pem: &[u8]) -> Result<ClientCertificate, &'static str> {
        let cert = first_certificate(pem)
            .ok_or("holds no PEM certificate (BEGIN CERTIFICATE); PKCS#12 is not supported")?;
        if contains(pem, b"ENCRYPTED PRIVATE KEY") {
            return Err("holds an encrypted private key: not supported (AZURE_CLIENT_CERTIFICATE_PASSWORD is not read); store the key unencrypted");
        }
        let mut parsed = PrivateKeyDer::from_pem_slice(pem)
            .map_err(|_| "holds no PEM private key (BEGIN PRIVATE KEY or BEGIN RSA PRIVATE KEY)")?;
        let found = match &parsed {
            PrivateKeyDer::Pkcs8(k) => Ok((Zeroizing::new(k.secret_pkcs8_der().to_vec()), true)),
            PrivateKeyDer::Pkcs1(k) => Ok((Zeroizing::new(k.secret_pkcs1_der().to_vec()), false)),
            _ => Err("holds a key that is not RSA: only RSA keys are supported (RS256)"),
        };
        parsed.zeroize();
        let (key, pkcs8) = found?;
        let (x5t, x5t_s256) = thumbprints(&cert);
        let me = ClientCertificate {
            key,
            pkcs8,
            x5t,
            x5t_s256,
        };
        let probe = b"cstokenfs: does this key belong to the certificate?";
        let signature = me.sign(probe)?;
        let der = CertificateDer::from(cert.as_slice());
        let leaf = webpki::EndEntityCert::try_from(&der)
            .map_err(|_| "holds a certificate that cannot be parsed")?;
        leaf.verify_signature(webpki::ring::RSA_PKCS1_2048_8192_SHA256, probe, &signature)
            .map_err(|_| "holds a private key that does not belong to its certificate")?;
        Ok(me)
    }

    fn key_pair(&self) -> Result<RsaKeyPair, &'static str> {
        let parsed = if self.pkcs8 {
            RsaKeyPair::from_pkcs8(&self.key)
        } else {
            RsaKeyPair::from_der(&self.key)
        };
        parsed.map_err(|_| "holds an RSA key ring cannot use (at least 2048 bits are needed)")
    }

    /// An RS256 signature of `message`. ring's parsed key lives only for this call.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, &'static str> {
        let pair = self.key_pair()?;
        let mut signature = vec![0u8; pair.public().modulus_len()];
        pair.sign(
            &RSA_PKCS1_SHA256,
            &SystemRandom::new(),
            message,
            &mut signature,
        )
        .map_err(|_| "signing failed")?;
        Ok(signature)
    }

    /// A client assertion for `client_id` at the token URL `audience`, valid from now
    /// for [`LIFETIME_SECS`].
    pub fn assertion(
        &self,
        client_id: &str,
        audience: &str,
        now_secs: u64,
    ) -> Result<Zeroizing<String>, SourceError> {
        let fail = |why: &str| SourceError::Credential(format!("client certificate: {why}"));
        let mut jti = [0u8; 16];
        SystemRandom::new()
            .fill(&mut jti)
            .map_err(|_| fail("no random bytes for jti"))?;
        let header = json!({"alg": "RS256", "typ": "JWT", "x5t": self.x5t,
            "x5t#S256": self.x5t_s256});
        let claims = json!({"aud": audience, "iss": client_id, "sub": client_id,
            "jti": uuid(&jti), "nbf": now_secs, "iat": now_secs,
            "exp": now_secs + LIFETIME_SECS});
        let mut jwt = Zeroizing::new(format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        ));
        let signature = self.sign(jwt.as_bytes()).map_err(fail)?;
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(jwt)
    }
}

/// 16 random bytes as a version-4 UUID.
fn uuid(b: &[u8; 16]) -> String {
    let mut b = *b;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Why a certificate assertion does not verify against `cert_der`, if it does not:
/// `Err((AADSTS code, message))` in Entra's terms; `Ok` with its claims.
pub fn verify(cert_der: &[u8], jwt: &str) -> Result<Value, (u32, &'static str)> {
    const SIGNATURE: (u32, &str) = (700027, "Client assertion failed signature validation.");
    let mut parts = jwt.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err((50027, "JWT token is invalid or malformed."));
    };
    let decode = |part: &str| -> Option<Value> {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
    };
    let (Some(header), Some(claims)) = (decode(h), decode(c)) else {
        return Err((50027, "JWT token is invalid or malformed."));
    };
    if header["alg"] != "RS256" {
        return Err(SIGNATURE);
    }
    let (x5t, x5t_s256) = thumbprints(cert_der);
    if header["x5t"] != x5t.as_str() && header["x5t#S256"] != x5t_s256.as_str() {
        return Err((
            700027,
            "Client assertion contains an invalid signature. The key was not found.",
        ));
    }
    let signature = URL_SAFE_NO_PAD.decode(s).map_err(|_| SIGNATURE)?;
    let der = CertificateDer::from(cert_der);
    let leaf = webpki::EndEntityCert::try_from(&der).map_err(|_| SIGNATURE)?;
    let signed = &jwt[..h.len() + 1 + c.len()];
    leaf.verify_signature(
        webpki::ring::RSA_PKCS1_2048_8192_SHA256,
        signed.as_bytes(),
        &signature,
    )
    .map_err(|_| SIGNATURE)?;
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (certificate PEM, PKCS#8 key PEM, certificate DER) with a fresh RSA-2048 key.
    fn fresh() -> (String, String, Vec<u8>) {
        use rsa::pkcs8::EncodePrivateKey;
        let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).unwrap();
        let pem = key
            .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
            .unwrap()
            .to_string();
        let pair = rcgen::KeyPair::from_pem(&pem).unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&pair)
            .unwrap();
        (cert.pem(), pem, cert.der().to_vec())
    }

    #[test]
    fn an_assertion_verifies_against_its_certificate_only() {
        let (cert, key, der) = fresh();
        let c = ClientCertificate::from_pem(format!("{key}{cert}").as_bytes()).unwrap();
        assert!(
            !format!("{c:?}").contains(&key[40..80]),
            "Debug shows no key"
        );
        let aud = "https://login.example/t/oauth2/v2.0/token";
        let jwt = c.assertion("client", aud, 1_700_000_000).unwrap();
        let claims = verify(&der, &jwt).unwrap();
        assert_eq!(claims["aud"], aud);
        assert_eq!(claims["iss"], "client");
        assert_eq!(claims["sub"], "client");
        assert_eq!(claims["exp"], 1_700_000_000 + LIFETIME_SECS);
        let (x5t, x5t_s256) = thumbprints(&der);
        assert_eq!(x5t.len(), 27, "base64url of 20 bytes");
        assert_eq!(x5t_s256.len(), 43, "base64url of 32 bytes");
        let (_, _, other) = fresh();
        assert_eq!(verify(&other, &jwt).unwrap_err().0, 700027);
        let mut tampered = jwt.to_string();
        tampered.insert(tampered.find('.').unwrap() + 2, 'x');
        assert!(verify(&der, &tampered).is_err());
        assert_eq!(verify(&der, "a.b").unwrap_err().0, 50027);
    }

    #[test]
    fn files_that_cannot_work_say_why() {
        let (cert, key, _) = fresh();
        let (other_cert, _, _) = fresh();
        let err = |pem: String| ClientCertificate::from_pem(pem.as_bytes()).unwrap_err();
        assert!(err(cert.clone()).contains("no PEM private key"));
        assert!(err(key.clone()).contains("no PEM certificate"));
        assert!(err(format!("{other_cert}{key}")).contains("does not belong"));
        let encrypted =
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n";
        assert!(err(format!("{cert}{encrypted}")).contains("AZURE_CLIENT_CERTIFICATE_PASSWORD"));
        let ec = rcgen::KeyPair::generate().unwrap();
        let ec_cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&ec)
            .unwrap();
        let e = err(format!("{}{}", ec_cert.pem(), ec.serialize_pem()));
        assert!(e.contains("RSA") || e.contains("does not belong"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let missing = ClientCertificate::load(&dir.path().join("nope.pem")).unwrap_err();
        assert!(missing.to_string().contains("nope.pem"));
    }
}
