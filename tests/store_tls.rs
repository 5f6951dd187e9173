//! etcd over TLS with a real etcd (`--client-cert-auth`, `--trusted-ca-file`) and
//! certificates this test makes: the store's key cases work over TLS; a client without a
//! certificate, with one from another CA, or with an expired one is refused with an error
//! that says why; user/password authentication works on top of TLS.

use std::sync::Arc;

mod common;

use common::tls::TestCa;
use tenet::store::config::DatastoreConfig;
use tenet::store::{Compare, Datastore, EtcdOptions, EtcdStore, EtcdTls, StoreError, Txn, TxnOp};
use tenet::testbed::{EtcdServer, EtcdServerTls};

async fn connect(
    endpoint: &str,
    tls: Option<EtcdTls>,
    credentials: Option<(&str, &str)>,
) -> Result<EtcdStore, StoreError> {
    EtcdStore::connect(
        &[endpoint.to_string()],
        EtcdOptions {
            tls,
            credentials: credentials.map(|(u, p)| (u.to_string(), p.to_string())),
            ..EtcdOptions::default()
        },
    )
    .await
}

/// A store's first request: connecting is lazy, so this is where TLS fails.
async fn first_request(store: Result<EtcdStore, StoreError>) -> Result<(), StoreError> {
    store?.revision().await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = TestCa::new(d, "tenet-test-ca");
    let other_ca = TestCa::new(d, "another-ca");
    let (server_cert, server_key) = ca.issue(d, "etcd-server", false);
    let (client_cert, client_key) = ca.issue(d, "root", false);
    let (stranger_cert, stranger_key) = other_ca.issue(d, "stranger", false);
    let (old_cert, old_key) = ca.issue(d, "old", true);
    let client = EtcdTls {
        ca_file: ca.cert_file.clone(),
        identity: Some((client_cert.clone(), client_key.clone())),
    };
    let server = EtcdServer::start_tls(EtcdServerTls {
        ca_file: ca.cert_file.clone(),
        cert_file: server_cert,
        key_file: server_key,
        client_cert_auth: true,
        client: client.clone(),
    })
    .await
    .unwrap();
    let endpoint = server.endpoint();
    assert!(endpoint.starts_with("https://"));

    // The key cases of the contract, over TLS.
    let store: Arc<dyn Datastore> = Arc::new(server.store().await.unwrap());
    let r1 = store.create("/t/a", b"1").await.unwrap();
    assert!(matches!(
        store.create("/t/a", b"2").await,
        Err(StoreError::AlreadyExists { .. })
    ));
    let r2 = store.update("/t/a", b"2", r1).await.unwrap();
    assert!(matches!(
        store.update("/t/a", b"3", r1).await,
        Err(StoreError::Conflict { .. })
    ));
    let mut watch = store.watch("/t/", r2 + 1).await.unwrap();
    let txn = Txn::new()
        .when(Compare::revision("/t/a", r2))
        .then(TxnOp::put("/t/b", "x"))
        .then(TxnOp::delete("/t/a"));
    store.txn(txn).await.unwrap();
    let event = watch.next().await.unwrap().unwrap();
    assert_eq!(event.key, "/t/b");
    assert_eq!(store.list("/t/").await.unwrap().kvs.len(), 1);

    // calicoctl's configuration reaches it the same way.
    let config = DatastoreConfig::resolve(None, |k| match k {
        "ETCD_ENDPOINTS" => Some(endpoint.clone()),
        "ETCD_CA_CERT_FILE" => Some(ca.cert_file.display().to_string()),
        "ETCD_CERT_FILE" => Some(client_cert.display().to_string()),
        "ETCD_KEY_FILE" => Some(client_key.display().to_string()),
        _ => None,
    })
    .unwrap();
    assert!(
        config
            .connect()
            .await
            .unwrap()
            .get("/t/b")
            .await
            .unwrap()
            .is_some()
    );

    // Refused: no client certificate; a certificate from another CA; a server this client's
    // CA did not sign. Each error says what happened.
    let no_cert = first_request(
        connect(
            &endpoint,
            Some(EtcdTls {
                ca_file: ca.cert_file.clone(),
                identity: None,
            }),
            None,
        )
        .await,
    )
    .await
    .unwrap_err();
    assert!(no_cert.is_unavailable(), "{no_cert}");
    // TLS 1.3 sends the server's refusal after the client's handshake is done, so the client
    // sees either the alert or a closed connection.
    let text = no_cert.to_string();
    assert!(
        !text.contains("BadCertificate") || text.contains("refused this client's certificate"),
        "{text}"
    );
    let stranger = first_request(
        connect(
            &endpoint,
            Some(EtcdTls {
                ca_file: ca.cert_file.clone(),
                identity: Some((stranger_cert, stranger_key)),
            }),
            None,
        )
        .await,
    )
    .await
    .unwrap_err();
    assert!(stranger.is_unavailable(), "{stranger}");
    let text = stranger.to_string();
    assert!(
        !text.contains("BadCertificate") || text.contains("refused this client's certificate"),
        "{text}"
    );
    let wrong_ca = first_request(
        connect(
            &endpoint,
            Some(EtcdTls {
                ca_file: other_ca.cert_file.clone(),
                identity: Some((client_cert.clone(), client_key.clone())),
            }),
            None,
        )
        .await,
    )
    .await
    .unwrap_err();
    let text = wrong_ca.to_string();
    assert!(
        text.contains("not signed by the CA in etcdCACertFile"),
        "a server certificate from an unknown CA is named as such: {text}"
    );
    // An expired client certificate, a missing file, a file that is not PEM: refused before
    // any connection, naming the file.
    let expired = connect(
        &endpoint,
        Some(EtcdTls {
            ca_file: ca.cert_file.clone(),
            identity: Some((old_cert.clone(), old_key)),
        }),
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        expired.contains("expired") && expired.contains(&old_cert.display().to_string()),
        "{expired}"
    );
    let missing = connect(
        &endpoint,
        Some(EtcdTls {
            ca_file: d.join("nope.pem"),
            identity: None,
        }),
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        missing.contains("etcdCACertFile") && missing.contains("nope.pem"),
        "{missing}"
    );
    let not_pem = d.join("junk.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let junk = connect(
        &endpoint,
        Some(EtcdTls {
            ca_file: not_pem,
            identity: None,
        }),
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(junk.contains("no PEM CERTIFICATE"), "{junk}");
    // TLS settings with a plain endpoint are a configuration error, not a hang.
    let plain = connect(
        &endpoint.replace("https://", "http://"),
        Some(client.clone()),
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(plain.contains("https"), "{plain}");

    // User and password on top of TLS: with authentication on, a request without them is
    // refused; with them it works.
    let etcdctl = |args: &[&str]| {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &endpoint,
                "--cacert",
                &ca.cert_file.display().to_string(),
                "--cert",
                &client_cert.display().to_string(),
                "--key",
                &client_key.display().to_string(),
            ])
            .args(args)
            .output()
            .expect("etcdctl (Debian etcd-client)");
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    etcdctl(&["user", "add", "root:s3cret"]);
    etcdctl(&["user", "add", "tenet:pw"]);
    etcdctl(&["role", "add", "tenet-rw"]);
    etcdctl(&[
        "role",
        "grant-permission",
        "tenet-rw",
        "--prefix=true",
        "readwrite",
        "/t/",
    ]);
    etcdctl(&["user", "grant-role", "tenet", "tenet-rw"]);
    etcdctl(&["auth", "enable"]);
    // The client certificate's CN ("root") authenticates by itself (etcd's rule with
    // --client-cert-auth); a password user is checked on top of the same TLS session.
    let with_password = connect(&endpoint, Some(client.clone()), Some(("tenet", "pw")))
        .await
        .unwrap();
    with_password.put("/t/c", b"by tenet").await.unwrap();
    let wrong =
        first_request(connect(&endpoint, Some(client.clone()), Some(("tenet", "nope"))).await)
            .await
            .unwrap_err()
            .to_string();
    assert!(
        wrong.contains("authentication failed") || wrong.contains("invalid"),
        "{wrong}"
    );
    etcdctl(&["--user", "root:s3cret", "auth", "disable"]);
}
