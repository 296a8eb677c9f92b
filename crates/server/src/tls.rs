//! TLS for listeners (the `<ssl>` section of `zeo.conf`): the `zeo-tls` crate, which
//! checks client certificates against `authenticate` as the stock server (OpenSSL) does.

pub use zeo_tls::server::{acceptor, TlsSettings};
pub use zeo_tls::TlsError;
