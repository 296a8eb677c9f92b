//! TLS as ZEO configures it (`<ssl>` in `<zeo>` for a server, in `<clientstorage>` /
//! `<zeoclient>` for a client), with rustls, accepting the certificates the stock server
//! and client accept: Python's `ssl` module, i.e. OpenSSL, with the `authenticate` file
//! or directory as its trust store.
//!
//! The one place that differs from rustls' own verifiers is what counts as trusted
//! ([`trust`]): OpenSSL accepts a peer certificate that is itself a self-signed
//! certificate of the trust store — which is how ZEO's own documentation and tests set up
//! client certificates (`authenticate` lists the clients' self-signed certificates) and
//! how a client names the server it trusts — where WebPKI path validation refuses a CA
//! certificate used as an end entity. Otherwise a certificate must chain, by WebPKI's
//! rules, to a self-signed certificate of the store, as OpenSSL without partial chains
//! requires.
//!
//! * [`server`]: the acceptor of a listener, requiring client certificates when
//!   `authenticate` is given.
//! * [`client`]: the connector of a client (the proxy's link to upstream), checking the
//!   server's certificate against `authenticate` (or the system's CAs) and, unless
//!   `check-hostname` is off, its name.

pub mod client;
pub mod server;
pub mod trust;

use std::path::PathBuf;

pub use client::{ClientTls, ClientTlsSettings};
pub use server::{acceptor, TlsSettings};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("no certificate found in {0}")]
    NoCertificate(PathBuf),
    #[error(
        "no certificate found in the directory {0}: as with OpenSSL, each file must be named \
         after its subject's hash (<hash>.0, as `openssl rehash` or c_rehash name them)"
    )]
    NoHashedCertificate(PathBuf),
    #[error("TLS configuration: {0}")]
    Config(String),
}
