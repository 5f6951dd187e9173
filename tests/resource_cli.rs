//! calicoctl-style resource commands against a real etcd: create / get / replace / apply /
//! delete of ipPools with calicoctl's messages, exit statuses, output formats (the §7.6
//! vectors), Calico's backend values, and nothing written for a bad file.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use tenet::store::Datastore;
use tenet::testbed::EtcdServer;

fn tenet(endpoint: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tenet"))
        .args(args)
        .env("ETCD_ENDPOINTS", endpoint)
        .env_remove("CALICO_ETCD_ENDPOINTS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

async fn keyspace(store: &tenet::store::EtcdStore) -> Vec<(String, Vec<u8>)> {
    store
        .list("/calico/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect()
}

const POOLS: &str = "\
- apiVersion: v1
  kind: ipPool
  metadata:
    cidr: 192.168.0.0/16
  spec:
    ipip:
      enabled: true
    nat-outgoing: true
- apiVersion: v1
  kind: ipPool
  metadata:
    cidr: 10.1.0.0/16
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_pools_the_calicoctl_way() {
    let etcd = EtcdServer::start().await.unwrap();
    let ep = etcd.endpoint();
    let store = etcd.store().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pools.yaml");
    std::fs::write(&file, POOLS).unwrap();
    let f = file.to_str().unwrap();

    let o = tenet(&ep, &["create", "-f", f], None);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(text(&o), "Successfully created 2 'ipPool' resource(s)\n");
    // Calico's backend values, and IPIP switched on globally as libcalico-go did.
    let pool = store
        .get("/calico/v1/ipam/v4/pool/192.168.0.0-16")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&pool.value),
        r#"{"cidr":"192.168.0.0/16","ipip":"tunl0","ipip_mode":"","masquerade":true,"ipam":true,"disabled":false}"#
    );
    let ipip = store
        .get("/calico/v1/config/IpInIpEnabled")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ipip.value, b"true");

    // §7.6: a file whose second pool exists → partial success, exit 1.
    let again = dir.path().join("again.yaml");
    std::fs::write(
        &again,
        "apiVersion: v1\nkind: ipPool\nmetadata: {cidr: 10.3.0.0/16}\n---\napiVersion: v1\nkind: ipPool\nmetadata: {cidr: 10.1.0.0/16}\n",
    )
    .unwrap();
    let o = tenet(&ep, &["create", "-f", again.to_str().unwrap()], None);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o),
        "Partial success: created the first 1 out of 2 'ipPool' resources:\nHit error: resource already exists: IPPool(cidr=10.1.0.0/16)\n"
    );
    let o = tenet(
        &ep,
        &["create", "--skip-exists", "-f", again.to_str().unwrap()],
        None,
    );
    assert!(o.status.success(), "{}", text(&o));

    // §7.6: `get ippool -o wide` (only 192.168.0.0/16 asked for by name).
    let o = tenet(
        &ep,
        &["get", "ippool", "192.168.0.0/16", "-o", "wide"],
        None,
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "CIDR             NAT    IPIP   \n192.168.0.0/16   true   true   \n\n"
    );
    let o = tenet(&ep, &["get", "POOLS"], None);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "CIDR             \n10.1.0.0/16      \n10.3.0.0/16      \n192.168.0.0/16   \n\n"
    );
    let o = tenet(&ep, &["get", "ipp", "10.99.0.0/16"], None);
    assert!(
        o.status.success(),
        "a missing named resource prints nothing"
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "CIDR   \n\n");

    // yaml and json are valid input again: `apply -f -` of the yaml, `replace` of the json.
    let yaml = tenet(&ep, &["get", "ippool", "-o", "yaml"], None);
    let yaml = String::from_utf8_lossy(&yaml.stdout).into_owned();
    assert!(yaml.contains("nat-outgoing: true"), "{yaml}");
    let before = keyspace(&store).await;
    let o = tenet(&ep, &["apply", "-f", "-"], Some(&yaml));
    assert_eq!(text(&o), "Successfully applied 3 'ipPool' resource(s)\n");
    assert_eq!(keyspace(&store).await.len(), before.len());
    let json = tenet(
        &ep,
        &["get", "ippool", "192.168.0.0/16", "-o", "json"],
        None,
    );
    let json = String::from_utf8_lossy(&json.stdout).into_owned();
    assert!(
        json.trim_start()
            .starts_with("[\n  {\n    \"kind\": \"ipPool\""),
        "{json}"
    );
    let edited = json.replace("\"nat-outgoing\": true", "\"nat-outgoing\": false");
    let o = tenet(&ep, &["replace", "-f", "-"], Some(&edited));
    assert_eq!(text(&o), "Successfully replaced 1 'ipPool' resource(s)\n");
    let o = tenet(
        &ep,
        &["get", "ippool", "-o", "custom-columns=CIDR,NAT"],
        None,
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("192.168.0.0/16   false   \n"),
        "{}",
        text(&o)
    );

    // A bad file writes nothing, and says what is wrong.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: ipPool\nmetadata: {cidr: 10.8.0.0/16}\n---\napiVersion: v1\nkind: ipPool\nmetadata: {cidr: 10.9.0.1/16}\n",
    )
    .unwrap();
    let before = keyspace(&store).await;
    let o = tenet(&ep, &["create", "-f", bad.to_str().unwrap()], None);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o),
        "Failed to execute command: error with field CIDR = '10.9.0.1/16' (IP pool CIDR is not strictly masked)\n"
    );
    assert_eq!(keyspace(&store).await, before, "nothing written");
    for (args, want) in [
        (
            vec!["get", "foo"],
            "Failed to execute command: Resource type 'foo' is not supported\n",
        ),
        (
            vec!["get", "ippool", "-o", "xml"],
            "unrecognized output format 'xml'\n",
        ),
        (
            vec!["replace", "-f", "/nonexistent.yaml"],
            "Failed to execute command: reading /nonexistent.yaml",
        ),
    ] {
        let o = tenet(&ep, &args, None);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(text(&o).starts_with(want), "{args:?}: {}", text(&o));
    }
    let o = tenet(&ep, &["create", "-f", "-"], Some("# nothing\n"));
    assert_eq!(text(&o), "No resources specified in file\n");
    let o = tenet(
        &ep,
        &["replace", "-f", "-"],
        Some("apiVersion: v1\nkind: ipPool\nmetadata: {cidr: 10.7.0.0/16}\n"),
    );
    assert_eq!(
        text(&o),
        "Failed to replace 'ipPool' resource: resource does not exist: IPPool(cidr=10.7.0.0/16)\n"
    );

    // delete: by name, by file, missing (with and without -s).
    let o = tenet(&ep, &["delete", "ippool", "10.3.0.0/16"], None);
    assert_eq!(text(&o), "Successfully deleted 1 'ipPool' resource(s)\n");
    let o = tenet(&ep, &["delete", "pool", "10.3.0.0/16"], None);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o),
        "Failed to delete 'ipPool' resource: resource does not exist: IPPool(cidr=10.3.0.0/16)\n"
    );
    let o = tenet(&ep, &["delete", "-s", "pool", "10.3.0.0/16"], None);
    assert!(o.status.success());
    let o = tenet(&ep, &["delete", "-f", f], None);
    assert_eq!(text(&o), "Successfully deleted 2 'ipPool' resource(s)\n");
    let o = tenet(&ep, &["get", "ippool", "-o", "yaml"], None);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "[]\n");
    // What was written reads back cleanly.
    let o = tenet(&ep, &["dump", "/calico"], None);
    assert!(o.status.success(), "{}", text(&o));
}
