//! The server side: a listener's acceptor (`<ssl>` in `<zeo>`, `--tls-*`).
//!
//! Like the Python server, TLS starts at the first byte (no STARTTLS). With
//! `authenticate`, every client must present a certificate the trust store accepts
//! ([`crate::trust`]); without it no client certificate is asked for, and any client that
//! can reach the server may connect (the caller warns about that at start).

use crate::trust::{Purpose, TrustStore};
use crate::TlsError;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// PEM certificate chain of the server (may also hold the key).
    pub certificate: PathBuf,
    /// PEM private key; `None` when it is in the certificate file.
    pub key: Option<PathBuf>,
    /// A PEM file of certificates, or an OpenSSL hashed directory of them, that client
    /// certificates must be or chain to. `None`: no client certificates required.
    pub authenticate: Option<PathBuf>,
}

/// Loads the certificate chain and key of one side.
pub(crate) fn identity(
    certificate: &Path,
    key: Option<&Path>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let pem_err = |path: &Path, e: rustls_pki_types::pem::Error| TlsError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let chain = CertificateDer::pem_file_iter(certificate)
        .map_err(|e| pem_err(certificate, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(certificate, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(certificate.to_path_buf()));
    }
    let key_path = key.unwrap_or(certificate);
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| pem_err(key_path, e))?;
    Ok((chain, key))
}

/// Builds the acceptor for a listener.
pub fn acceptor(settings: &TlsSettings) -> Result<TlsAcceptor, TlsError> {
    let (chain, key) = identity(&settings.certificate, settings.key.as_deref())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &settings.authenticate {
        Some(path) => builder.with_client_cert_verifier(Arc::new(ClientVerifier {
            trust: TrustStore::load(path)?,
            algorithms: provider.signature_verification_algorithms,
        })),
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Client certificates checked as OpenSSL checks them against `authenticate`.
#[derive(Debug)]
struct ClientVerifier {
    trust: TrustStore,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.trust.subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.trust
            .verify(end_entity, intermediates, now, Purpose::Client)?;
        Ok(ClientCertVerified::assertion())
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
