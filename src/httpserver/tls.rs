//! The server's HTTPS option: a rustls configuration from PEM (ring as the provider) and
//! the handshake that turns an accepted socket into a TLS stream (`conn` serves it like a
//! plain one, except that a raw answer closes the connection: it cannot be written under
//! hyper there).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// A handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS server configuration from a PEM certificate chain and its private key.
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> io::Result<Arc<rustls::ServerConfig>> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(format!("the TLS certificate is not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(invalid(
            "the TLS certificate file holds no certificate".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|_| invalid("the TLS key file holds no PEM private key".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| invalid(format!("the TLS certificate and key do not fit: {e}")))?;
    Ok(Arc::new(config))
}

/// The TLS handshake of an accepted connection, within [`HANDSHAKE_TIMEOUT`]; `None` if it
/// fails (logged) or times out.
pub(super) async fn handshake(
    stream: TcpStream,
    config: Arc<rustls::ServerConfig>,
) -> Option<TlsStream<TcpStream>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            log::debug!("http: TLS handshake failed: {e}");
            None
        }
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Answer, Config, Handler, Reply, Request, Server, Stop};
    use super::*;

    struct Hello;

    impl Handler for Hello {
        async fn handle(&self, req: Request, _stop: Stop) -> Answer {
            if req.target == "/close" {
                return Answer::Close;
            }
            Answer::Reply(Reply {
                status: 200,
                headers: Vec::new(),
                body: b"hello over tls".to_vec(),
            })
        }
    }

    /// (CA PEM, leaf PEM, leaf key PEM) for 127.0.0.1.
    fn certs() -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (ca_cert.pem(), leaf.pem(), key.serialize_pem())
    }

    #[test]
    fn serves_https_to_a_client_that_trusts_the_ca_only() {
        crate::source::client_tls::ensure_provider();
        let (ca, leaf, key) = certs();
        let config = Config {
            tls: Some(server_config(leaf.as_bytes(), key.as_bytes()).unwrap()),
            ..Config::default()
        };
        let server = Server::start("127.0.0.1:0".parse().unwrap(), config, Hello).unwrap();
        assert!(server.is_tls());
        let url = format!("https://{}/", server.addr());
        let trusting = reqwest::blocking::Client::builder()
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca.as_bytes()).unwrap())
            .no_proxy()
            .build()
            .unwrap();
        let body = trusting.get(&url).send().unwrap().text().unwrap();
        assert_eq!(body, "hello over tls");
        assert!(
            trusting.get(format!("{url}close")).send().is_err(),
            "closed"
        );
        let other = reqwest::blocking::Client::builder()
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(certs().0.as_bytes()).unwrap())
            .no_proxy()
            .build()
            .unwrap();
        assert!(other.get(&url).send().is_err(), "an untrusted certificate");
        // Plain http to the TLS port gets no answer.
        let plain = reqwest::blocking::Client::builder()
            .no_proxy()
            .build()
            .unwrap();
        assert!(plain
            .get(format!("http://{}/", server.addr()))
            .timeout(Duration::from_secs(5))
            .send()
            .is_err());
        server.shutdown();
    }

    #[test]
    fn bad_pem_is_refused() {
        let (_, leaf, key) = certs();
        assert!(server_config(b"nonsense", key.as_bytes()).is_err());
        assert!(server_config(leaf.as_bytes(), b"nonsense").is_err());
        let (_, _, other_key) = certs();
        assert!(server_config(leaf.as_bytes(), other_key.as_bytes()).is_err());
    }
}
