//! Certificates made by the tests: a CA that issues PEM files, and a TLS-only etcd.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tenet::store::EtcdTls;
use tenet::testbed::{EtcdServer, EtcdServerTls};

/// A CA that writes its certificate and issues leaf certificates as PEM files.
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    pub cert_file: PathBuf,
}

impl TestCa {
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        let cert_file = dir.join(format!("{name}.pem"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        TestCa {
            params,
            key,
            cert_file,
        }
    }

    /// A certificate for 127.0.0.1 (server and client use), valid now unless `expired`.
    pub fn issue(&self, dir: &Path, name: &str, expired: bool) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (cert_file, key_file) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }
}

/// A TLS-only etcd that requires client certificates, with its PKI in `dir`; returns the
/// server and the client settings that reach it.
pub async fn tls_etcd(dir: &Path) -> (EtcdServer, EtcdTls) {
    let ca = TestCa::new(dir, "etcd-ca");
    let (cert_file, key_file) = ca.issue(dir, "etcd-server", false);
    let (client_cert, client_key) = ca.issue(dir, "root", false);
    let client = EtcdTls {
        ca_file: ca.cert_file.clone(),
        identity: Some((client_cert, client_key)),
    };
    let server = EtcdServer::start_tls(EtcdServerTls {
        ca_file: ca.cert_file.clone(),
        cert_file,
        key_file,
        client_cert_auth: true,
        client: client.clone(),
    })
    .await
    .expect("start etcd with TLS");
    (server, client)
}
