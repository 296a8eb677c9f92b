//! TLS for listeners (the `<ssl>` section of `zeo.conf`), with rustls.
//!
//! Like the Python server, TLS starts at the first byte (no STARTTLS), and when
//! `authenticate` names a CA file or directory, clients must present a certificate signed
//! by it (mutual TLS): that is how ZEO deployments restrict who may connect.

use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// PEM certificate chain of the server (may also hold the key).
    pub certificate: PathBuf,
    /// PEM private key; `None` when it is in the certificate file.
    pub key: Option<PathBuf>,
    /// PEM CA certificate(s) (a file, or a directory of `.pem`/`.crt` files) that client
    /// certificates must chain to. `None`: no client certificates required.
    pub authenticate: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("no certificate found in {0}")]
    NoCertificate(PathBuf),
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |e: rustls_pki_types::pem::Error| TlsError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let list = CertificateDer::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if list.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(list)
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    let files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)
            .map_err(|e| TlsError::Pem {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("pem" | "crt" | "cer")
                )
            })
            .collect()
    } else {
        vec![path.to_path_buf()]
    };
    for f in files {
        for cert in certs(&f)? {
            store
                .add(cert)
                .map_err(|e| TlsError::Config(format!("{}: {e}", f.display())))?;
        }
    }
    if store.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(store)
}

/// Builds the acceptor for a listener.
pub fn acceptor(settings: &TlsSettings) -> Result<TlsAcceptor, TlsError> {
    let chain = certs(&settings.certificate)?;
    let key_path = settings.key.as_deref().unwrap_or(&settings.certificate);
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| TlsError::Pem {
        path: key_path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &settings.authenticate {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider)
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
