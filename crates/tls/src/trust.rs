//! The trust store of an `authenticate` setting and OpenSSL's rules for it.
//!
//! Loaded as OpenSSL loads `cafile` / `capath`: every certificate of a PEM file, or the
//! files of a directory named `<subject hash>.<n>` (the layout `openssl rehash` makes;
//! other files of the directory are never read by OpenSSL, so they are not here either).
//!
//! A peer's certificate is accepted when (as OpenSSL 3 with Python 3.11's default flags):
//! 1. it **is** a certificate of the store that is self-signed (subject equals issuer, its
//!    authority key id, if any, matches its subject key id, and its signature algorithm
//!    fits its key), is within its validity period and allows the purpose (extended key
//!    usage, key usage and Netscape cert type, if present: client or server SSL); the
//!    signature of such a trust anchor is not checked, by OpenSSL either; or
//! 2. it chains, by WebPKI path validation, to a self-signed certificate of the store,
//!    through certificates the peer sent or other certificates of the store, and every
//!    certificate of that chain passes OpenSSL's `X509_V_FLAG_X509_STRICT` checks (ZEO
//!    sets the flag; they apply to chains of more than one certificate): a CA's basic
//!    constraints critical, its key usage present and its subject key id present, an
//!    authority key id on every certificate but the anchor, no key id extension critical,
//!    no `keyCertSign` outside CAs, matching signature algorithms, non-empty names.
//!
//! Everything else is refused. (WebPKI is stricter than OpenSSL in corners: it has no
//! SHA-1 signatures in chains and refuses a CA certificate as the end of a chain; such a
//! certificate is accepted only the first way, by being in the store itself.)

use crate::TlsError;
use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use rustls::{CertificateError, DistinguishedName};
use rustls_pki_types::pem::PemObject;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use x509_parser::prelude::*;

/// What a peer's certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A client authenticating to a server.
    Client,
    /// A server authenticating to a client.
    Server,
}

/// The certificates of an `authenticate` file or directory (or the system's CAs).
#[derive(Debug)]
pub struct TrustStore {
    certs: Vec<CertificateDer<'static>>,
    /// The self-signed certificates, as trust anchors for path validation.
    anchors: Vec<TrustAnchor<'static>>,
    /// The certificate of each anchor (same order), for the strict checks.
    anchor_certs: Vec<CertificateDer<'static>>,
    /// The others: OpenSSL finds issuers in the store too.
    intermediates: Vec<CertificateDer<'static>>,
    subjects: Vec<DistinguishedName>,
}

impl TrustStore {
    /// Loads a PEM file or an OpenSSL hashed directory.
    pub fn load(path: &Path) -> Result<TrustStore, TlsError> {
        let certs = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| TlsError::Pem {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(is_hash_name)
                })
                .collect();
            files.sort();
            let mut certs = Vec::new();
            for f in &files {
                certs.extend(pem_certs(f)?);
            }
            if certs.is_empty() {
                return Err(TlsError::NoHashedCertificate(path.to_path_buf()));
            }
            certs
        } else {
            let certs = pem_certs(path)?;
            if certs.is_empty() {
                return Err(TlsError::NoCertificate(path.to_path_buf()));
            }
            certs
        };
        Ok(Self::from_certs(certs))
    }

    /// The system's certificate authorities (what a ZEO client without `authenticate`
    /// trusts: OpenSSL's default paths).
    pub fn system() -> Result<TrustStore, TlsError> {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(error = %e, "reading the system's certificate authorities");
        }
        if found.certs.is_empty() {
            return Err(TlsError::Config(
                "no system certificate authorities found; give `authenticate`".into(),
            ));
        }
        Ok(Self::from_certs(found.certs))
    }

    fn from_certs(certs: Vec<CertificateDer<'static>>) -> TrustStore {
        let mut anchors = Vec::new();
        let mut anchor_certs = Vec::new();
        let mut intermediates = Vec::new();
        let mut subjects = Vec::new();
        for c in &certs {
            let Ok((_, x)) = X509Certificate::from_der(c.as_ref()) else {
                tracing::warn!("a certificate of the trust store cannot be parsed; ignored");
                continue;
            };
            subjects.push(DistinguishedName::from(x.subject().as_raw().to_vec()));
            if self_signed(&x) {
                match webpki::anchor_from_trusted_cert(c) {
                    Ok(a) => {
                        anchors.push(a.to_owned());
                        anchor_certs.push(c.clone());
                    }
                    Err(e) => {
                        tracing::debug!(error = ?e, "a self-signed certificate of the store is no trust anchor for path validation")
                    }
                }
            } else {
                intermediates.push(c.clone());
            }
        }
        TrustStore {
            certs,
            anchors,
            anchor_certs,
            intermediates,
            subjects,
        }
    }

    /// The subjects of the store (the CA names a server sends with its request for a
    /// client certificate).
    pub fn subjects(&self) -> &[DistinguishedName] {
        &self.subjects
    }

    /// Checks a peer's certificate (and the chain it sent) as OpenSSL would with this
    /// store: see the module documentation.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        purpose: Purpose,
    ) -> Result<(), rustls::Error> {
        if self.certs.iter().any(|c| c.as_ref() == end_entity.as_ref()) {
            let (_, x) = X509Certificate::from_der(end_entity.as_ref())
                .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
            if self_signed(&x) {
                return anchor_usable(&x, now, purpose);
            }
        }
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        let mut chain: Vec<CertificateDer<'_>> = intermediates.to_vec();
        chain.extend(self.intermediates.iter().cloned());
        let usage = match purpose {
            Purpose::Client => webpki::KeyUsage::client_auth(),
            Purpose::Server => webpki::KeyUsage::server_auth(),
        };
        let path = cert
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &self.anchors,
                &chain,
                now,
                usage,
                None,
                None,
            )
            .map_err(pki_error)?;
        // The chain as OpenSSL sees it: leaf, intermediates, the anchor's certificate.
        let mut ders: Vec<CertificateDer<'_>> = vec![end_entity.clone()];
        ders.extend(path.intermediate_certificates().map(|c| c.der()));
        let anchor = path.anchor();
        if let Some(i) = self.anchors.iter().position(|a| {
            a.subject.as_ref() == anchor.subject.as_ref()
                && a.subject_public_key_info.as_ref() == anchor.subject_public_key_info.as_ref()
        }) {
            ders.push(self.anchor_certs[i].clone());
        }
        let num = ders.len();
        for (i, der) in ders.iter().enumerate() {
            let (_, x) = X509Certificate::from_der(der.as_ref())
                .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
            if let Err(why) = strict_check(&x, i + 1 < num) {
                tracing::debug!(depth = i, why, "certificate refused by the strict checks");
                return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    rustls::OtherError(Arc::new(StrictError(why))),
                )));
            }
        }
        Ok(())
    }
}

/// A certificate OpenSSL's strict mode refuses in a chain.
#[derive(Debug)]
struct StrictError(&'static str);

impl std::fmt::Display for StrictError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (OpenSSL's strict X.509 checks)", self.0)
    }
}

impl std::error::Error for StrictError {}

/// OpenSSL's `X509_V_FLAG_X509_STRICT` checks of one certificate of a chain of more than
/// one (`check_extensions` in `x509_vfy.c`); `not_last`: a certificate below the top of
/// the chain, which must carry an authority key id.
fn strict_check(x: &X509Certificate<'_>, not_last: bool) -> Result<(), &'static str> {
    let mut bc = None;
    let mut ku = None;
    let mut san = None;
    let mut akid = None;
    let mut skid = None;
    for ext in x.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(b) => {
                bc = Some((b.ca, b.path_len_constraint, ext.critical))
            }
            ParsedExtension::KeyUsage(k) => ku = Some(*k),
            ParsedExtension::SubjectAlternativeName(a) => {
                san = Some((a.general_names.len(), ext.critical))
            }
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                akid = Some((a.key_identifier.is_some(), ext.critical))
            }
            ParsedExtension::SubjectKeyIdentifier(_) => skid = Some(ext.critical),
            _ => {}
        }
    }
    let v3 = x.version() == X509Version::V3;
    let ca = match bc {
        Some((ca, _, _)) => ca,
        // OpenSSL takes a self-signed version 1 certificate for a CA.
        None => !v3 && self_signed(x),
    };
    let cert_sign = ku.is_some_and(|k| k.key_cert_sign());
    if let Some((_, Some(_), _)) = bc {
        if !ca {
            return Err("path length constraint in a certificate that is not a CA");
        }
        if !cert_sign {
            return Err("path length constraint without keyCertSign");
        }
    }
    if ca && matches!(bc, Some((_, _, false))) {
        return Err("basic constraints of a CA certificate not marked critical");
    }
    if ca && ku.is_none() {
        return Err("CA certificate without a key usage extension");
    }
    if !ca && cert_sign {
        return Err("keyCertSign in a certificate that is not a CA");
    }
    if x.issuer().iter_attributes().next().is_none() {
        return Err("empty issuer name");
    }
    let subject_empty = x.subject().iter_attributes().next().is_none();
    if subject_empty && (ca || ku.is_some_and(|k| k.crl_sign()) || san.is_none()) {
        return Err("empty subject name");
    }
    if subject_empty && matches!(san, Some((_, false))) {
        return Err("empty subject and a subject alternative name not marked critical");
    }
    if matches!(san, Some((0, _))) {
        return Err("empty subject alternative name");
    }
    if x.signature_algorithm != x.tbs_certificate.signature {
        return Err("signature algorithm inconsistent with the one signed");
    }
    if matches!(akid, Some((_, true))) {
        return Err("authority key identifier marked critical");
    }
    if skid == Some(true) {
        return Err("subject key identifier marked critical");
    }
    if v3 {
        if not_last && !matches!(akid, Some((true, _))) {
            return Err("missing authority key identifier");
        }
        if ca && skid.is_none() {
            return Err("CA certificate without a subject key identifier");
        }
    } else if !x.extensions().is_empty() {
        return Err("extensions in a certificate older than X.509 version 3");
    }
    Ok(())
}

/// `<8 hex digits>.<digits>`: a certificate file of an OpenSSL hashed directory.
fn is_hash_name(name: &str) -> bool {
    match name.split_once('.') {
        Some((hash, n)) => {
            hash.len() == 8
                && hash
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
                && !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |e: rustls_pki_types::pem::Error| TlsError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    CertificateDer::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)
}

/// OpenSSL's "self-signed" (`EXFLAG_SS`): self-issued, the authority key id (if any)
/// matching the subject key id, and a signature algorithm that fits the key.
fn self_signed(x: &X509Certificate<'_>) -> bool {
    if x.subject().as_raw() != x.issuer().as_raw() {
        return false;
    }
    let mut akid = None;
    let mut skid = None;
    for ext in x.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                akid = a.key_identifier.as_ref().map(|k| k.0)
            }
            ParsedExtension::SubjectKeyIdentifier(k) => skid = Some(k.0),
            _ => {}
        }
    }
    if let (Some(a), Some(s)) = (akid, skid) {
        if a != s {
            return false;
        }
    }
    key_family(&x.public_key().algorithm.algorithm.to_id_string())
        == signature_family(&x.signature_algorithm.algorithm.to_id_string())
}

#[derive(PartialEq, Eq)]
enum Family {
    Rsa,
    Ec,
    Ed25519,
    Ed448,
    Other,
}

fn key_family(oid: &str) -> Family {
    match oid {
        "1.2.840.113549.1.1.1" | "1.2.840.113549.1.1.10" => Family::Rsa,
        "1.2.840.10045.2.1" => Family::Ec,
        "1.3.101.112" => Family::Ed25519,
        "1.3.101.113" => Family::Ed448,
        _ => Family::Other,
    }
}

fn signature_family(oid: &str) -> Family {
    if oid.starts_with("1.2.840.113549.1.1.") {
        Family::Rsa
    } else if oid.starts_with("1.2.840.10045.4.") {
        Family::Ec
    } else {
        key_family(oid)
    }
}

/// A self-signed certificate of the store used as the peer's own: OpenSSL still checks
/// its validity period and its purpose.
fn anchor_usable(
    x: &X509Certificate<'_>,
    now: UnixTime,
    purpose: Purpose,
) -> Result<(), rustls::Error> {
    let t = ASN1Time::from_timestamp(now.as_secs() as i64)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let validity = x.validity();
    if t < validity.not_before {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet,
        ));
    }
    if t > validity.not_after {
        return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
    }
    for ext in x.extensions() {
        let ok = match (ext.parsed_extension(), purpose) {
            (ParsedExtension::ExtendedKeyUsage(eku), Purpose::Client) => eku.client_auth,
            (ParsedExtension::ExtendedKeyUsage(eku), Purpose::Server) => eku.server_auth,
            (ParsedExtension::KeyUsage(ku), Purpose::Client) => {
                ku.digital_signature() || ku.key_agreement()
            }
            (ParsedExtension::KeyUsage(ku), Purpose::Server) => {
                ku.digital_signature() || ku.key_encipherment() || ku.key_agreement()
            }
            (ParsedExtension::NSCertType(t), Purpose::Client) => t.ssl_client(),
            (ParsedExtension::NSCertType(t), Purpose::Server) => t.ssl_server(),
            _ => true,
        };
        if !ok {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose,
            ));
        }
    }
    Ok(())
}

/// The names a certificate is valid for, as OpenSSL's host check sees them: the DNS
/// names of its subjectAltName, or when it has none its subject's common names.
pub fn matches_host(cert: &CertificateDer<'_>, host: &str) -> bool {
    let Ok((_, x)) = X509Certificate::from_der(cert.as_ref()) else {
        return false;
    };
    let san = x.subject_alternative_name().ok().flatten();
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        let want: Vec<u8> = match ip {
            std::net::IpAddr::V4(a) => a.octets().to_vec(),
            std::net::IpAddr::V6(a) => a.octets().to_vec(),
        };
        return san.is_some_and(|s| {
            s.value
                .general_names
                .iter()
                .any(|n| matches!(n, GeneralName::IPAddress(b) if *b == want.as_slice()))
        });
    }
    let dns: Vec<&str> = san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(*d),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if !dns.is_empty() {
        return dns.iter().any(|p| name_matches(p, host));
    }
    let found = x
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .any(|cn| name_matches(cn, host));
    found
}

/// One certificate name against a host name: case-insensitive, a trailing dot ignored,
/// and a wildcard only as a whole leftmost label of a name with at least two more labels
/// (`*.example.com` matches `www.example.com`, not `example.com` nor `a.b.example.com`).
fn name_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.trim_end_matches('.').to_ascii_lowercase();
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(rest) if rest.contains('.') && !rest.contains('*') => match host.split_once('.') {
            Some((first, host_rest)) => !first.is_empty() && host_rest == rest,
            None => false,
        },
        _ => pattern == host,
    }
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    rustls::Error::InvalidCertificate(match e {
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        assert!(name_matches("zodb.org", "ZODB.org"));
        assert!(name_matches("zodb.org.", "zodb.org"));
        assert!(!name_matches("zodb.org", "example.org"));
        assert!(name_matches("*.example.com", "www.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.com", "example.com"));
        assert!(!name_matches("w*.example.com", "www.example.com"));
    }

    #[test]
    fn hashed_directory_names() {
        assert!(is_hash_name("9d66eef0.0"));
        assert!(is_hash_name("9d66eef0.12"));
        assert!(!is_hash_name("client.pem"));
        assert!(!is_hash_name("9D66EEF0.0"));
        assert!(!is_hash_name("9d66eef0.r0"));
        assert!(!is_hash_name("9d66eef0"));
    }
}
