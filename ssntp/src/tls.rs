//! Mutual TLS for SSNTP with rustls and the ring provider only: a node's identity is its
//! certificate (and key) plus the CA every node trusts, and its roles are the role OIDs in its
//! certificate's extended key usage.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::types::Role;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: no certificate in the PEM")]
    NoCertificate { what: String },
    #[error("{what}: no private key in the PEM (a node's file holds its certificate and key)")]
    NoKey { what: String },
    #[error("{what}: bad PEM: {message}")]
    Pem { what: String, message: String },
    #[error("{what}: certificate is not valid X.509: {message}")]
    X509 { what: String, message: String },
    #[error("{what}: the certificate carries no SSNTP role (OIDs 1.3.6.1.4.1.343.8.1-6)")]
    NoRole { what: String },
    #[error("CA {what}: {source}")]
    BadCa { what: String, source: rustls::Error },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{0:?} is not a valid server name or IP address")]
    ServerName(String),
}

/// Where a node's certificate (+ key, one PEM) and the CA certificate are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub ca: PathBuf,
}

/// A node's TLS identity.
#[derive(Debug, Clone)]
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    roots: Arc<RootCertStore>,
    /// The CA certificates as read (for `--ciao-compat-certs`).
    cas: Vec<CertificateDer<'static>>,
    roles: Role,
    ciao_compat: bool,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: what.to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what: what.to_string(),
        });
    }
    Ok(certs)
}

/// The roles a certificate carries (OR of the role OIDs in its extended key usage).
pub fn roles_of(cert: &CertificateDer<'_>) -> Result<Role, x509_parser::error::X509Error> {
    use x509_parser::prelude::FromDer;
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref()).map_err(
        |e| match e {
            x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
            x509_parser::nom::Err::Incomplete(_) => {
                x509_parser::error::X509Error::InvalidCertificate
            }
        },
    )?;
    let mut roles = Role::NONE;
    if let Some(eku) = parsed.extended_key_usage()? {
        for oid in &eku.value.other {
            if let Some(arcs) = oid.iter() {
                let arcs: Vec<u64> = arcs.collect();
                if let Some(r) = Role::from_oid(&arcs) {
                    roles |= r;
                }
            }
        }
    }
    Ok(roles)
}

impl Identity {
    /// Reads a node's certificate + key file and the CA file.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let cert = read(&files.cert)?;
        let ca = read(&files.ca)?;
        Self::from_pem(
            &cert,
            &ca,
            &files.cert.display().to_string(),
            &files.ca.display().to_string(),
        )
    }

    /// Builds an identity from PEM bytes; `cert_name` and `ca_name` name them in errors.
    pub fn from_pem(
        cert_and_key: &[u8],
        ca: &[u8],
        cert_name: &str,
        ca_name: &str,
    ) -> Result<Self, TlsError> {
        let chain = certificates(cert_and_key, cert_name)?;
        let key = PrivateKeyDer::from_pem_slice(cert_and_key).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
                what: cert_name.to_string(),
            },
            e => TlsError::Pem {
                what: cert_name.to_string(),
                message: e.to_string(),
            },
        })?;
        let roles = roles_of(&chain[0]).map_err(|e| TlsError::X509 {
            what: cert_name.to_string(),
            message: e.to_string(),
        })?;
        if roles.is_empty() {
            return Err(TlsError::NoRole {
                what: cert_name.to_string(),
            });
        }
        let mut roots = RootCertStore::empty();
        let cas = certificates(ca, ca_name)?;
        for c in &cas {
            roots.add(c.clone()).map_err(|source| TlsError::BadCa {
                what: ca_name.to_string(),
                source,
            })?;
        }
        Ok(Identity {
            chain,
            key: Arc::new(key),
            roles,
            roots: Arc::new(roots),
            cas,
            ciao_compat: false,
        })
    }

    /// The roles this node's certificate gives it.
    pub fn roles(&self) -> Role {
        self.roles
    }

    /// Accept ciao-made peer certificates (see [`crate::compat`]); off by default.
    pub fn with_ciao_compat(mut self, on: bool) -> Self {
        self.ciao_compat = on;
        self
    }

    fn compat_verifier(&self) -> Arc<crate::compat::CiaoCompatVerifier> {
        Arc::new(crate::compat::CiaoCompatVerifier::new(
            self.roots.clone(),
            self.cas.clone(),
            provider(),
        ))
    }

    /// A server that requires a client certificate from the same CA.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = provider();
        let verifier: Arc<dyn rustls::server::danger::ClientCertVerifier> = if self.ciao_compat {
            self.compat_verifier()
        } else {
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()?
        };
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }

    /// A client that verifies the server against the CA and presents this certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = if self.ciao_compat {
            builder
                .dangerous()
                .with_custom_certificate_verifier(self.compat_verifier())
        } else {
            builder.with_root_certificates(self.roots.clone())
        };
        let config = builder.with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(config))
    }
}

/// The name a client checks the server certificate against: the host part of `host:port`.
pub fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let host = match addr.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => h,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::ServerName(addr.to_string()))
}

/// The roles in the certificate a peer presented; `NONE` when it presented none.
pub fn peer_roles(certs: Option<&[CertificateDer<'static>]>) -> Role {
    certs
        .and_then(|c| c.first())
        .and_then(|c| roles_of(c).ok())
        .unwrap_or(Role::NONE)
}

/// Why a TLS handshake failed, when the reason is a certificate that retrying cannot fix
/// (one side does not trust, or cannot use, the other's certificate): the text says which
/// side and why. `None` for failures that may pass on a retry (network, timeouts).
pub fn certificate_problem(e: &std::io::Error) -> Option<String> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    match tls {
        rustls::Error::InvalidCertificate(why) => {
            Some(format!("the peer's certificate is not acceptable: {why:?}"))
        }
        rustls::Error::NoCertificatesPresented => Some("the peer presented no certificate".into()),
        rustls::Error::AlertReceived(alert) => {
            use rustls::AlertDescription as A;
            matches!(
                alert,
                A::BadCertificate
                    | A::UnsupportedCertificate
                    | A::CertificateRevoked
                    | A::CertificateExpired
                    | A::CertificateUnknown
                    | A::UnknownCA
                    | A::CertificateRequired
                    // A certificate signed by another CA of the same name fails its
                    // signature check, which rustls reports as this alert.
                    | A::DecryptError
            )
            .then(|| format!("the peer refused this node's certificate ({alert:?})"))
        }
        _ => None,
    }
}
