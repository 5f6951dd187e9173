//! The `tenet` binary against a real etcd: dump output, exit statuses, configuration.

use std::process::{Command, Output};

use tenet::calico::CalicoKey;
use tenet::store::Datastore;
use tenet::testbed::EtcdServer;

fn tenet(args: &[&str], endpoint: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tenet"));
    cmd.args(args)
        .env_remove("ETCD_ENDPOINTS")
        .env_remove("CALICO_ETCD_ENDPOINTS")
        .env_remove("RUST_LOG");
    if let Some(e) = endpoint {
        cmd.env("ETCD_ENDPOINTS", e);
    }
    cmd.output().expect("run tenet")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_lists_kinds_and_flags_invalid_values() {
    let etcd = EtcdServer::start().await.unwrap();
    let store = etcd.store().await.unwrap();
    tenet::calico::ensure_initialized(&store).await.unwrap();
    store
        .put(
            "/calico/v1/ipam/v4/pool/10.10.0.0-16",
            br#"{"cidr":"10.10.0.0/16","ipip":"","ipip_mode":"","masquerade":true,"ipam":true,"disabled":false}"#,
        )
        .await
        .unwrap();
    store
        .put("/calico/bgp/v1/global/as_num", b"not-a-number")
        .await
        .unwrap();
    store.put("/calico/v1/unknown/thing", b"x").await.unwrap();
    let subnet = tenet::keyspace::TenantSubnet {
        tenant: "acme".into(),
        subnet: "172.16.0.0/24".parse().unwrap(),
        concentrator_id: "cnci-1".into(),
        concentrator_ip: "10.99.0.2".parse().unwrap(),
        subnet_key: 4268,
        mode: tenet::keyspace::NetworkMode::Gre,
    };
    store
        .put(&subnet.key().path(), &serde_json::to_vec(&subnet).unwrap())
        .await
        .unwrap();

    let ep = etcd.endpoint();
    let out = tenet(&["dump"], Some(&ep));
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "invalid values → exit 1\n{text}"
    );
    assert!(
        text.contains(&format!("{}  ", CalicoKey::Ready.path())),
        "{text}"
    );
    assert!(text.lines().any(|l| l.starts_with("/calico/v1/ipam/v4/pool/10.10.0.0-16") && l.ends_with("IPPool")), "{text}");
    assert!(
        text.contains("BGPGlobalASNumber INVALID: 'not-a-number' is not an AS number"),
        "{text}"
    );
    assert!(
        text.contains("/calico/v1/unknown/thing") && text.contains("Unknown INVALID"),
        "{text}"
    );
    assert!(
        stderr(&out).contains("2 of 5 keys under /calico do not decode"),
        "{}",
        stderr(&out)
    );

    let out = tenet(&["dump", "/tenet", "-o", "json"], Some(&ep));
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["kind"], "TenantSubnet");
    assert_eq!(json[0]["value"]["subnet_key"], 4268);

    let out = tenet(&["dump", "/calico/v1/ipam", "-o", "json"], Some(&ep));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["value"]["masquerade"], true);
    assert_eq!(out.status.code(), Some(0));

    // The same datastore found through a calicoctl config file.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("calicoctl.cfg");
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: v1\nkind: calicoApiConfig\nmetadata:\nspec:\n  etcdEndpoints: \"{ep}\"\n"
        ),
    )
    .unwrap();
    let out = tenet(&["--config", cfg.to_str().unwrap(), "dump", "/tenet"], None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("TenantSubnet"));
}

#[test]
fn unreachable_etcd_is_one_line_and_status_2() {
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let out = tenet(&["dump"], Some(&endpoint));
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with(&format!(
            "tenet: cannot reach etcd at {endpoint} (ETCD_ENDPOINTS)"
        )),
        "{err}"
    );
    assert!(!err.contains("panicked") && !err.contains("backtrace"));
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let out = tenet(&["--config", "/nonexistent/calicoctl.cfg", "dump"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("Error reading config file: /nonexistent/calicoctl.cfg"));
    let out = tenet(&["dump"], Some("etcd.example:2379"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("invalid ETCD_ENDPOINTS"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn version_prints_the_client_version() {
    let out = tenet(&["version"], None);
    assert!(out.status.success());
    assert!(stdout(&out).contains(env!("CARGO_PKG_VERSION")));
}
