//! Accepting ciao-made certificates (`--ciao-compat-certs`, off by default).
//!
//! ciao-cert puts the "any" extended key usage (plus the role OIDs) on every certificate, and
//! ciao's scheduler presents the CA certificate itself. webpki refuses both: a certificate
//! whose EKU list lacks serverAuth/clientAuth, and a CA certificate used as an end entity.
//! Under this opt-in a peer certificate is accepted when
//!
//! * it chains to the configured CA with valid signatures and every certificate in its
//!   validity period (webpki's own checks), its EKU holding serverAuth/clientAuth **or**
//!   anyExtendedKeyUsage; or
//! * it **is** one of the configured CA certificates (byte for byte) and within its validity
//!   period — ciao's scheduler.
//!
//! The handshake signatures are verified as usual. The server's name is not checked (ciao's
//! certificates do not name the scheduler's address reliably).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError};

/// anyExtendedKeyUsage, 2.5.29.37.0, as DER OID content.
const ANY_EKU: &[u8] = &[0x55, 0x1d, 0x25, 0x00];

#[derive(Debug)]
pub struct CiaoCompatVerifier {
    roots: Arc<rustls::RootCertStore>,
    /// The CA certificates themselves, for a peer that presents one.
    cas: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
}

impl CiaoCompatVerifier {
    pub fn new(
        roots: Arc<rustls::RootCertStore>,
        cas: Vec<CertificateDer<'static>>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        CiaoCompatVerifier {
            roots,
            cas,
            provider,
        }
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usual: webpki::KeyUsage,
    ) -> Result<(), Error> {
        if self.cas.iter().any(|ca| ca.as_ref() == end_entity.as_ref()) {
            return within_validity(end_entity, now);
        }
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let algs = self.provider.signature_verification_algorithms.all;
        let check = |usage: webpki::KeyUsage| {
            cert.verify_for_usage(
                algs,
                &self.roots.roots,
                intermediates,
                now,
                usage,
                None,
                None,
            )
            .map(|_| ())
        };
        check(usual)
            .or_else(|_| check(webpki::KeyUsage::required(ANY_EKU)))
            .map_err(webpki_error)
    }
}

/// The handshake signatures, checked as any rustls verifier does (both traits need them).
impl CiaoCompatVerifier {
    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let algs = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algs)
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        let algs = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algs)
    }

    fn schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn webpki_error(e: webpki::Error) -> Error {
    use webpki::Error as W;
    Error::InvalidCertificate(match e {
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    })
}

/// A CA certificate presented as a peer's: only its validity period is left to check (it is
/// trusted as the anchor itself).
fn within_validity(cert: &CertificateDer<'_>, now: UnixTime) -> Result<(), Error> {
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref())
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let now = now.as_secs() as i64;
    let validity = parsed.validity();
    if now < validity.not_before.timestamp() {
        return Err(Error::InvalidCertificate(CertificateError::NotValidYet));
    }
    if now > validity.not_after.timestamp() {
        return Err(Error::InvalidCertificate(CertificateError::Expired));
    }
    Ok(())
}

impl ServerCertVerifier for CiaoCompatVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )
        .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for CiaoCompatVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )
        .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.schemes()
    }
}
