//! The trust rules of `zeo_tls::trust` on certificates made with OpenSSL's `req -x509`
//! (self-signed, `CA:TRUE`, as ZEO's test certificates): in `tests/data`.

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls_pki_types::pem::PemObject;
use std::path::{Path, PathBuf};
use std::time::Duration;
use zeo_tls::trust::{matches_host, Purpose, TrustStore};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn cert(name: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(data(name)).unwrap()
}

fn now() -> UnixTime {
    UnixTime::now()
}

#[test]
fn a_self_signed_certificate_of_the_store_is_accepted_itself() {
    let store = TrustStore::load(&data("client.pem")).unwrap();
    store
        .verify(&cert("client.pem"), &[], now(), Purpose::Client)
        .unwrap();
    // Not any self-signed certificate, though.
    assert!(store
        .verify(&cert("stranger.pem"), &[], now(), Purpose::Client)
        .is_err());
}

#[test]
fn validity_and_purpose_of_such_a_certificate_still_count() {
    let store = TrustStore::load(&data("client.pem")).unwrap();
    let later = UnixTime::since_unix_epoch(Duration::from_secs(200 * 365 * 86400));
    let e = store
        .verify(&cert("client.pem"), &[], later, Purpose::Client)
        .unwrap_err();
    assert!(e.to_string().contains("Expired"), "{e}");
    let before = UnixTime::since_unix_epoch(Duration::from_secs(86400));
    assert!(store
        .verify(&cert("client.pem"), &[], before, Purpose::Client)
        .is_err());
    // A certificate for servers only is no client's.
    let store = TrustStore::load(&data("serveronly.pem")).unwrap();
    assert!(store
        .verify(&cert("serveronly.pem"), &[], now(), Purpose::Client)
        .is_err());
    store
        .verify(&cert("serveronly.pem"), &[], now(), Purpose::Server)
        .unwrap();
}

#[test]
fn a_directory_is_read_as_openssl_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(data("client.pem"), dir.path().join("client.pem")).unwrap();
    // Plain names are not looked at by OpenSSL: nothing to trust, said at once.
    let e = TrustStore::load(dir.path()).unwrap_err();
    assert!(e.to_string().contains("openssl rehash"), "{e}");
    std::fs::copy(data("client.pem"), dir.path().join("0a1b2c3d.0")).unwrap();
    let store = TrustStore::load(dir.path()).unwrap();
    store
        .verify(&cert("client.pem"), &[], now(), Purpose::Client)
        .unwrap();
}

#[test]
fn host_names_as_openssl_checks_them() {
    let san = cert("san.pem");
    assert!(matches_host(&san, "www.zodb.example"));
    assert!(!matches_host(&san, "zodb.example"));
    assert!(matches_host(&san, "127.0.0.1"));
    assert!(!matches_host(&san, "127.0.0.2"));
    // With a subjectAltName, the common name is not a name of the certificate.
    assert!(!matches_host(&san, "host.example"));
    // Without one, it is.
    assert!(matches_host(&cert("client.pem"), "zeo-client"));
    assert!(!matches_host(&cert("client.pem"), "other"));
}
