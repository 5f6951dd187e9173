//! `tenet cert`: the files it writes are what SSNTP nodes load, with the roles asked for.

use std::path::Path;
use std::process::{Command, Output};

use ssntp::{Identity, Role, TlsFiles};

fn tenet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tenet"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn ca_and_role_certificates_load_as_identities() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    ok(tenet(&["cert", "ca", "--out", d, "--name", "lab"]));
    let ca = dir.path().join("CAcert-lab.pem");
    let ca_key = dir.path().join("CAkey-lab.pem");
    assert_eq!(mode(&ca_key), 0o600);
    assert_eq!(mode(&ca), 0o644);

    let printed = ok(tenet(&[
        "cert",
        "issue",
        "--ca",
        ca_key.to_str().unwrap(),
        "--role",
        "agent,netagent",
        "--host",
        "cn1",
        "--ip",
        "10.254.0.1",
        "--out",
        d,
    ]));
    let cert = dir.path().join("cert-CNAgent-NetworkingAgent-cn1.pem");
    assert_eq!(printed.trim(), cert.to_str().unwrap());
    assert_eq!(mode(&cert), 0o600);
    let id = Identity::load(&TlsFiles {
        cert: cert.clone(),
        ca: ca.clone(),
    })
    .unwrap();
    assert_eq!(id.roles(), Role::AGENT | Role::NETAGENT);

    // No silent overwrite; --force replaces.
    let again = tenet(&[
        "cert",
        "issue",
        "--ca",
        ca_key.to_str().unwrap(),
        "--role",
        "agent,netagent",
        "--host",
        "cn1",
        "--out",
        d,
    ]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    ok(tenet(&[
        "cert",
        "issue",
        "--ca",
        ca_key.to_str().unwrap(),
        "--role",
        "agent,netagent",
        "--host",
        "cn1",
        "--out",
        d,
        "--force",
    ]));

    // Bad input is named.
    let bad = tenet(&[
        "cert",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--role",
        "agent",
        "--host",
        "x",
        "--out",
        d,
    ]);
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("no PRIVATE KEY or RSA PRIVATE KEY block")
    );
    let bad = tenet(&[
        "cert",
        "issue",
        "--ca",
        ca_key.to_str().unwrap(),
        "--role",
        "wizard",
        "--host",
        "x",
        "--out",
        d,
    ]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown role \"wizard\""));
}

/// ciao-cert's CA key is PKCS#1 RSA (`RSA PRIVATE KEY`): `tenet cert issue --ca` signs with
/// it, and the certificate verifies against that CA (checked by openssl) and carries its roles.
#[test]
fn a_ciao_style_pkcs1_rsa_ca_key_signs() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("ca.key");
    let crt = dir.path().join("ca.crt");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "genrsa",
        "-traditional",
        "-out",
        key.to_str().unwrap(),
        "2048",
    ]);
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        key.to_str().unwrap(),
        "-subj",
        "/CN=ciao CA",
        "-days",
        "2",
        "-out",
        crt.to_str().unwrap(),
    ]);
    let key_pem = std::fs::read_to_string(&key).unwrap();
    assert!(key_pem.contains("BEGIN RSA PRIVATE KEY"), "{key_pem}");
    let ca_file = dir.path().join("CAkey-ciao.pem");
    std::fs::write(&ca_file, std::fs::read_to_string(&crt).unwrap() + &key_pem).unwrap();
    let out_dir = dir.path().join("out");
    let issued = ok(tenet(&[
        "cert",
        "issue",
        "--ca",
        ca_file.to_str().unwrap(),
        "--role",
        "agent",
        "--host",
        "cn1",
        "--out",
        out_dir.to_str().unwrap(),
    ]));
    let cert = std::path::PathBuf::from(issued.trim());
    openssl(&[
        "verify",
        "-CAfile",
        crt.to_str().unwrap(),
        cert.to_str().unwrap(),
    ]);
    let id = Identity::load(&TlsFiles {
        cert: cert.clone(),
        ca: crt.clone(),
    })
    .unwrap();
    assert!(id.roles().contains(Role::AGENT));
}
