//! Certificate generation, the job of ciao-cert: a CA, and role certificates signed by it that
//! carry SSNTP roles as extended-key-usage OIDs.
//!
//! Two deliberate differences from ciao: keys are ECDSA P-256 (ring, which rustls uses, cannot
//! generate RSA keys; Go accepts both), and the CA is a certificate of its own rather than the
//! scheduler's role certificate, because rustls (webpki) refuses a CA certificate presented as
//! a peer's end-entity certificate. Role certificates also carry serverAuth and clientAuth,
//! which webpki requires where ciao relied on Go accepting "any".

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::types::Role;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("a role certificate needs at least one role")]
    NoRole,
    #[error("role bits {0:#x} name no SSNTP role")]
    UnknownRole(u32),
    #[error("a certificate needs at least one host name or IP address")]
    NoSubject,
    #[error("invalid DNS name {0:?}")]
    BadDnsName(String),
    #[error("the CA key: {0}")]
    BadKey(String),
}

/// What a generated certificate is for.
#[derive(Debug, Clone)]
pub struct CertRequest {
    pub roles: Role,
    /// DNS names, the first of which is also the common name.
    pub dns_names: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub organization: String,
    pub email: Option<String>,
    pub validity_days: u32,
}

impl CertRequest {
    pub fn new(roles: Role, dns_names: Vec<String>, ips: Vec<IpAddr>) -> Self {
        CertRequest {
            roles,
            dns_names,
            ips,
            organization: "tenet".into(),
            email: None,
            validity_days: 365,
        }
    }
}

/// A certificate and its private key, PEM encoded.
#[derive(Debug, Clone)]
pub struct GeneratedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl GeneratedCert {
    /// ciao's node file: the certificate followed by its key, in one PEM.
    pub fn bundle(&self) -> String {
        format!("{}{}", self.cert_pem, self.key_pem)
    }
}

fn base_params(
    common_name: &str,
    organization: &str,
    email: Option<&str>,
    days: u32,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, organization);
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    // A little back-dating so that peers with a slightly slow clock accept a fresh certificate.
    params.not_before = now - Duration::minutes(5);
    params.not_after = now + Duration::days(i64::from(days));
    params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
    if let Some(email) = email {
        params.subject_alt_names.push(SanType::Rfc822Name(
            email
                .to_string()
                .try_into()
                .expect("an email address is ASCII"),
        ));
    }
    params
}

/// The CA's key: PKCS#8 (`PRIVATE KEY`, as tenet writes it) or PKCS#1 RSA (`RSA PRIVATE
/// KEY`, as ciao-cert writes it), the latter wrapped into PKCS#8 for ring.
fn ca_key_pair(pem: &str) -> Result<KeyPair, CertError> {
    use rustls::pki_types::PrivatePkcs1KeyDer;
    use rustls::pki_types::pem::PemObject;
    if !pem.contains("-----BEGIN RSA PRIVATE KEY-----") {
        return Ok(KeyPair::from_pem(pem)?);
    }
    let pkcs1 = PrivatePkcs1KeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CertError::BadKey(format!("RSA PRIVATE KEY: {e}")))?;
    let pkcs8 = pkcs1_to_pkcs8(pkcs1.secret_pkcs1_der());
    Ok(KeyPair::from_pkcs8_der_and_sign_algo(
        &pkcs8.as_slice().into(),
        &rcgen::PKCS_RSA_SHA256,
    )?)
}

/// DER `tag length value`.
fn der(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(value);
    out
}

/// PrivateKeyInfo { version 0, rsaEncryption with NULL parameters, the PKCS#1 key }.
fn pkcs1_to_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    let algorithm = der(
        0x30,
        &[der(0x06, RSA_ENCRYPTION), vec![0x05, 0x00]].concat(),
    );
    der(
        0x30,
        &[der(0x02, &[0]), algorithm, der(0x04, pkcs1)].concat(),
    )
}

/// A new self-signed CA that signs role certificates.
pub fn generate_ca(
    common_name: &str,
    organization: &str,
    days: u32,
) -> Result<GeneratedCert, CertError> {
    let key = KeyPair::generate()?;
    let mut params = base_params(common_name, organization, None, days);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    Ok(GeneratedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A role certificate for `req`, signed by the CA whose certificate and key are given as PEM.
pub fn issue(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    req: &CertRequest,
) -> Result<GeneratedCert, CertError> {
    if req.roles.is_empty() {
        return Err(CertError::NoRole);
    }
    if req.roles.unknown_bits() != 0 {
        return Err(CertError::UnknownRole(req.roles.unknown_bits()));
    }
    let common_name = match (req.dns_names.first(), req.ips.first()) {
        (Some(name), _) => name.clone(),
        (None, Some(ip)) => ip.to_string(),
        (None, None) => return Err(CertError::NoSubject),
    };
    let ca_key = ca_key_pair(ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key)?;

    let key = KeyPair::generate()?;
    let mut params = base_params(
        &common_name,
        &req.organization,
        req.email.as_deref(),
        req.validity_days,
    );
    for name in &req.dns_names {
        let ia5 = name
            .clone()
            .try_into()
            .map_err(|_| CertError::BadDnsName(name.clone()))?;
        params.subject_alt_names.push(SanType::DnsName(ia5));
    }
    params
        .subject_alt_names
        .extend(req.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.extended_key_usages.extend(
        req.roles
            .oids()
            .into_iter()
            .map(ExtendedKeyUsagePurpose::Other),
    );
    let cert = params.signed_by(&key, &issuer)?;
    Ok(GeneratedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// ciao's file name for a role certificate: `cert-CNAgent-NetworkingAgent-<host>.pem`.
pub fn role_cert_file_name(roles: Role, host: &str) -> String {
    format!("cert-{}-{host}.pem", roles.file_words())
}

/// ciao's file name for the CA certificate that every node trusts.
pub fn ca_cert_file_name(name: &str) -> String {
    format!("CAcert-{name}.pem")
}

/// The CA's certificate and key, which only the operator who issues certificates keeps.
pub fn ca_key_file_name(name: &str) -> String {
    format!("CAkey-{name}.pem")
}
