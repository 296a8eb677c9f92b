//! The client side: TLS to an upstream server (`<ssl>` inside `<zeoclient>`), with the
//! settings of ZEO's client `<ssl>` section.
//!
//! The server's certificate is checked against `authenticate` (a PEM file or an OpenSSL
//! hashed directory; without it, the system's certificate authorities, as ZEO's
//! `load_default_certs`), by the rules of [`crate::trust`]; with `check-hostname` (the
//! default), its name must match `server-hostname`, or the host of the address, as
//! OpenSSL matches names (subjectAltName, or the common name when there is none). The
//! client presents `certificate` / `key` when given.

use crate::trust::{matches_host, Purpose, TrustStore};
use crate::TlsError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// ZEO's client `<ssl>` keys.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsSettings {
    /// The client's PEM certificate (chain), presented when the server asks.
    pub certificate: Option<PathBuf>,
    /// Its PEM key, if not in the certificate file.
    pub key: Option<PathBuf>,
    /// Certificates the server's must be or chain to; `None`: the system's CAs.
    pub authenticate: Option<PathBuf>,
    /// Check the server's name (ZEO's default: true).
    pub check_hostname: bool,
    /// The name to send (SNI) and check, instead of the host of the address.
    pub server_hostname: Option<String>,
}

/// A configured TLS client: wraps each new connection.
#[derive(Clone)]
pub struct ClientTls {
    connector: TlsConnector,
    server_hostname: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_hostname", &self.server_hostname)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    pub fn new(settings: &ClientTlsSettings) -> Result<ClientTls, TlsError> {
        let trust = match &settings.authenticate {
            Some(path) => TrustStore::load(path)?,
            None => TrustStore::system()?,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(ServerVerifier {
            trust,
            check_hostname: settings.check_hostname,
            algorithms: provider.signature_verification_algorithms,
        });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match &settings.certificate {
            Some(cert) => {
                let (chain, key) = crate::server::identity(cert, settings.key.as_deref())?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::Config(e.to_string()))?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_hostname: settings.server_hostname.clone(),
        })
    }

    /// Runs the handshake over `stream`, a connection to `host` (the host part of the
    /// address: the name sent and checked unless `server-hostname` says otherwise).
    pub async fn connect<S>(&self, host: &str, stream: S) -> std::io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = self.server_hostname.as_deref().unwrap_or(host);
        let name = name.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(name.to_string()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{name:?} is not a host name to check a certificate against: {e}"),
            )
        })?;
        self.connector.connect(server_name, stream).await
    }
}

/// The server's certificate checked as OpenSSL checks it (with Python's
/// `check_hostname`).
#[derive(Debug)]
struct ServerVerifier {
    trust: TrustStore,
    check_hostname: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.trust
            .verify(end_entity, intermediates, now, Purpose::Server)?;
        if self.check_hostname {
            let host = match server_name {
                ServerName::DnsName(d) => d.as_ref().to_string(),
                ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
                _ => String::new(),
            };
            if !matches_host(end_entity, &host) {
                return Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName,
                ));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
