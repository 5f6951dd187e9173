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

/// The value at `key`, as text, if there is one.
async fn value_at(store: &tenet::store::EtcdStore, key: &str) -> Option<String> {
    store
        .get(key)
        .await
        .unwrap()
        .map(|kv| String::from_utf8(kv.value).unwrap())
}

/// The value at `key`, which must exist.
async fn value_of(store: &tenet::store::EtcdStore, key: &str) -> String {
    value_at(store, key)
        .await
        .unwrap_or_else(|| panic!("{key} is missing"))
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
    // go-template: Go's field names over the list, range and if.
    let o = tenet(
        &ep,
        &[
            "get",
            "ippool",
            "-o",
            r#"go-template={{range .}}{{.Metadata.CIDR}}={{if .Spec.NatOutgoing}}nat{{else}}plain{{end}}{{"\n"}}{{end}}"#,
        ],
        None,
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "10.1.0.0/16=plain\n10.3.0.0/16=plain\n192.168.0.0/16=nat\n",
        "{}",
        text(&o)
    );
    let o = tenet(&ep, &["get", "ippool", "-o", "go-template"], None);
    assert_eq!(text(&o), "need to specify a template\n");
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

const POLICY_AND_PROFILE: &str = "\
apiVersion: v1
kind: policy
metadata:
  name: web
spec:
  order: 100
  selector: app == 'web'
  ingress:
  - action: allow
    protocol: tcp
    source:
      selector: role == 'frontend'
    destination:
      ports: [80, '8080:8090']
  egress:
  - action: allow
---
apiVersion: v1
kind: profile
metadata:
  name: k8s_ns.default
  tags: [default]
  labels:
    calico/k8s_ns: default
spec:
  ingress:
  - action: allow
  egress:
  - action: allow
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_and_profiles_the_calicoctl_way() {
    let etcd = EtcdServer::start().await.unwrap();
    let ep = etcd.endpoint();
    let store = etcd.store().await.unwrap();

    let o = tenet(&ep, &["create", "-f", "-"], Some(POLICY_AND_PROFILE));
    assert_eq!(text(&o), "Successfully created 2 resource(s)\n");
    // Calico's backend values (calico-data-model.md §7.2).
    let get = |k: &'static str| value_of(&store, k);
    assert_eq!(
        get("/calico/v1/policy/tier/default/policy/web").await,
        r#"{"order":100,"inbound_rules":[{"action":"allow","protocol":"tcp","src_selector":"role == 'frontend'","dst_ports":[80,"8080:8090"]}],"outbound_rules":[{"action":"allow"}],"selector":"app == 'web'","types":["ingress","egress"]}"#
    );
    assert_eq!(
        get("/calico/v1/policy/profile/k8s_ns.default/tags").await,
        r#"["default"]"#
    );
    assert_eq!(
        get("/calico/v1/policy/profile/k8s_ns.default/labels").await,
        r#"{"calico/k8s_ns":"default"}"#
    );
    assert_eq!(
        get("/calico/v1/policy/profile/k8s_ns.default/rules").await,
        r#"{"inbound_rules":[{"action":"allow"}],"outbound_rules":[{"action":"allow"}]}"#
    );

    let o = tenet(&ep, &["get", "pol", "-o", "wide"], None);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "NAME   ORDER   SELECTOR       \nweb    100     app == 'web'   \n\n"
    );
    let o = tenet(&ep, &["get", "profiles", "-o", "wide"], None);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "NAME             TAGS      \nk8s_ns.default   default   \n\n"
    );
    // The yaml of both kinds applies back unchanged (the keyspace is the same after).
    let before: Vec<_> = store
        .list("/calico/v1/policy/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect();
    for kind in ["policy", "profile"] {
        let yaml = tenet(&ep, &["get", kind, "-o", "yaml"], None);
        let o = tenet(
            &ep,
            &["apply", "-f", "-"],
            Some(&String::from_utf8_lossy(&yaml.stdout)),
        );
        assert!(o.status.success(), "{kind}: {}", text(&o));
    }
    let after: Vec<_> = store
        .list("/calico/v1/policy/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect();
    assert_eq!(before, after, "get -o yaml | apply is a no-op");

    // A bad rule writes nothing; the error names the field.
    let o = tenet(
        &ep,
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: policy\nmetadata: {name: web}\nspec: {ingress: [{action: allow, destination: {ports: [22]}}]}\n",
        ),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("Ingress[0].Rule"), "{}", text(&o));
    assert!(
        text(&o).contains("ports need protocol tcp or udp"),
        "{}",
        text(&o)
    );
    let unchanged: Vec<_> = store
        .list("/calico/v1/policy/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| (kv.key, kv.value))
        .collect();
    assert_eq!(before, unchanged);

    // §7.6: deleting a missing policy.
    let o = tenet(&ep, &["delete", "policy", "foo"], None);
    assert_eq!(
        text(&o),
        "Failed to delete 'policy' resource: resource does not exist: Policy(name=foo)\n"
    );
    let o = tenet(&ep, &["delete", "profile", "k8s_ns.default"], None);
    assert_eq!(text(&o), "Successfully deleted 1 'profile' resource(s)\n");
    assert!(
        store
            .list("/calico/v1/policy/profile/")
            .await
            .unwrap()
            .kvs
            .is_empty(),
        "the profile's three keys are gone"
    );
    let o = tenet(&ep, &["delete", "-f", "-"], Some(POLICY_AND_PROFILE));
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o),
        "Partial success: deleted the first 1 out of 2 resources:\nHit error: resource does not exist: Profile(name=k8s_ns.default)\n"
    );
    let o = tenet(&ep, &["get", "nodes"], None);
    assert_eq!(text(&o), "NAME   \n\n", "no node in this keyspace");
}

/// Two writers that read the same revision of a policy: one replace wins, the other gets
/// calicoctl's update conflict and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_replaces_of_one_policy_conflict() {
    use std::sync::Arc;
    use tenet::calico::resource::{Resource, ResourceClient, ResourceError};
    let etcd = EtcdServer::start().await.unwrap();
    let store: Arc<dyn Datastore> = Arc::new(etcd.store().await.unwrap());
    let client = ResourceClient::new(store.clone());
    let policy = |order: u32| {
        Resource::from_value(
            serde_saphyr::from_str(&format!(
                "apiVersion: v1\nkind: policy\nmetadata: {{name: p1}}\nspec: {{order: {order}}}\n"
            ))
            .unwrap(),
        )
        .unwrap()
    };
    client.create(&policy(1)).await.unwrap();
    let seen = client.revision(&policy(1)).await.unwrap().unwrap();
    let (two, three) = (policy(2), policy(3));
    let (a, b) = tokio::join!(
        client.replace_at(&two, seen),
        client.replace_at(&three, seen)
    );
    let conflicts: Vec<&ResourceError> = [&a, &b]
        .into_iter()
        .filter_map(|r| r.as_ref().err())
        .collect();
    assert_eq!(conflicts.len(), 1, "{a:?} {b:?}");
    assert!(
        conflicts[0]
            .to_string()
            .starts_with("update conflict: '/calico/v1/policy/tier/default/policy/p1'"),
        "{}",
        conflicts[0]
    );
    let stored = client
        .list(tenet::calico::resource::ResourceKind::Policy, Some("p1"))
        .await
        .unwrap();
    let winner = if a.is_ok() { 2.0 } else { 3.0 };
    let Resource::Policy(p) = &stored[0] else {
        panic!()
    };
    assert_eq!(p.spec.order, Some(winner));
    // create of an existing one: calicoctl's text.
    assert_eq!(
        client.create(&policy(9)).await.unwrap_err().to_string(),
        "resource already exists: Policy(name=p1)"
    );
}

/// Workload endpoints with calicoctl's identifiers; and a file of 250 pools, created in
/// batched transactions, that stops at the first existing one exactly as calicoctl would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_and_batched_files() {
    let etcd = EtcdServer::start().await.unwrap();
    let ep = etcd.endpoint();
    let store = etcd.store().await.unwrap();
    let wep = "apiVersion: v1\nkind: workloadEndpoint\nmetadata:\n  name: eth0\n  workload: default.nginx-1\n  orchestrator: k8s\n  node: node1\n  labels: {app: nginx}\nspec:\n  ipNetworks: [192.168.12.1/32]\n  profiles: [k8s_ns.default]\n  interfaceName: cali7a8b9c0d1e2\n  mac: ee:ee:ee:ee:ee:ee\n";
    let o = tenet(&ep, &["create", "-f", "-"], Some(wep));
    assert_eq!(
        text(&o),
        "Successfully created 1 'workloadEndpoint' resource(s)\n"
    );
    assert!(
        store
            .get("/calico/v1/host/node1/workload/k8s/default.nginx-1/endpoint/eth0")
            .await
            .unwrap()
            .is_some()
    );
    let o = tenet(&ep, &["get", "weps", "--node", "node1", "-o", "wide"], None);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "NODE    ORCHESTRATOR   WORKLOAD          NAME   NETWORKS          NATS   INTERFACE         PROFILES         \nnode1   k8s            default.nginx-1   eth0   192.168.12.1/32          cali7a8b9c0d1e2   k8s_ns.default   \n\n"
    );
    let o = tenet(&ep, &["get", "wep", "--node", "other"], None);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "NODE   ORCHESTRATOR   WORKLOAD   NAME   \n\n"
    );
    let o = tenet(&ep, &["get", "wep", "-o", "custom-columns=NAME,MAC"], None);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("eth0   ee:ee:ee:ee:ee:ee"),
        "{}",
        text(&o)
    );
    let o = tenet(&ep, &["delete", "wep", "eth0"], None);
    assert_eq!(
        text(&o),
        "Failed to delete 'workloadEndpoint' resource: insufficient identifiers, missing 'node'\n"
    );
    let o = tenet(
        &ep,
        &[
            "delete",
            "wep",
            "eth0",
            "--node",
            "node1",
            "--orchestrator",
            "k8s",
            "--workload",
            "default.nginx-1",
        ],
        None,
    );
    assert_eq!(
        text(&o),
        "Successfully deleted 1 'workloadEndpoint' resource(s)\n"
    );

    // 250 pools, the 180th already there: 179 created (in batches), then calicoctl's
    // partial-success message; the rest not written.
    let pool = |i: usize| {
        format!(
            "- apiVersion: v1\n  kind: ipPool\n  metadata: {{cidr: 10.{}.{}.0/24}}\n",
            i / 256,
            i % 256
        )
    };
    let o = tenet(&ep, &["create", "-f", "-"], Some(&pool(179)));
    assert!(o.status.success(), "{}", text(&o));
    let file: String = (0..250).map(pool).collect();
    let o = tenet(&ep, &["create", "-f", "-"], Some(&file));
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        text(&o),
        "Partial success: created the first 179 out of 250 'ipPool' resources:\nHit error: resource already exists: IPPool(cidr=10.0.179.0/24)\n"
    );
    assert_eq!(
        store
            .list("/calico/v1/ipam/v4/pool/")
            .await
            .unwrap()
            .kvs
            .len(),
        180
    );
    let o = tenet(&ep, &["apply", "-f", "-"], Some(&file));
    assert_eq!(text(&o), "Successfully applied 250 'ipPool' resource(s)\n");
    assert_eq!(
        store
            .list("/calico/v1/ipam/v4/pool/")
            .await
            .unwrap()
            .kvs
            .len(),
        250
    );
}

/// `tenet config`: calicoctl's settings, where Felix and confd read them (§4.7, §7.6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_the_calicoctl_way() {
    let etcd = EtcdServer::start().await.unwrap();
    let ep = etcd.endpoint();
    let store = etcd.store().await.unwrap();
    let out = |args: &[&str]| {
        let o = tenet(&ep, args, None);
        (o.status.code(), text(&o))
    };
    assert_eq!(
        out(&["config", "get", "nodeToNodeMesh"]),
        (Some(0), "on\n".into())
    );
    assert_eq!(
        out(&["config", "get", "logLevel", "--node", "n1"]),
        (Some(0), "info (inherited from global)\n".into())
    );
    assert_eq!(
        out(&["config", "get", "asNumber"]),
        (Some(0), "64512\n".into())
    );
    assert_eq!(out(&["config", "get", "ipip"]), (Some(0), "off\n".into()));

    assert_eq!(out(&["config", "set", "asNumber", "1.10"]).0, Some(0));
    let value = |k: &'static str| value_at(&store, k);
    assert_eq!(
        value("/calico/bgp/v1/global/as_num").await.as_deref(),
        Some("65546")
    );
    assert_eq!(out(&["config", "set", "nodeToNodeMesh", "off"]).0, Some(0));
    assert_eq!(
        value("/calico/bgp/v1/global/node_mesh").await.as_deref(),
        Some(r#"{"enabled":false}"#)
    );
    assert_eq!(
        out(&["config", "get", "nodetonodemesh"]),
        (Some(0), "off\n".into())
    );
    assert_eq!(out(&["config", "set", "ipip", "on"]).0, Some(0));
    assert_eq!(
        value("/calico/v1/config/IpInIpEnabled").await.as_deref(),
        Some("true")
    );
    // logLevel: Felix gets the level, BIRD its mapping (warning → none).
    assert_eq!(
        out(&["config", "set", "logLevel", "warning", "--node", "n1"]).0,
        Some(0)
    );
    assert_eq!(
        value("/calico/v1/host/n1/config/LogSeverityScreen")
            .await
            .as_deref(),
        Some("warning")
    );
    assert_eq!(
        value("/calico/bgp/v1/host/n1/loglevel").await.as_deref(),
        Some("none")
    );
    assert_eq!(
        out(&["config", "get", "logLevel", "--node", "n1"]),
        (Some(0), "warning\n".into())
    );
    assert_eq!(
        out(&["config", "unset", "logLevel", "--node", "n1"]).0,
        Some(0)
    );
    assert_eq!(value("/calico/bgp/v1/host/n1/loglevel").await, None);
    assert_eq!(out(&["config", "unset", "asNumber"]).0, Some(0));
    assert_eq!(
        out(&["config", "get", "asNumber"]),
        (Some(0), "64512\n".into())
    );
    // Raw keys.
    assert_eq!(
        out(&["config", "get", "Foo", "--raw", "felix"]),
        (Some(0), "(unset)\n".into())
    );
    assert_eq!(
        out(&["config", "set", "Foo", "bar", "--raw", "felix"]).0,
        Some(0)
    );
    assert_eq!(value("/calico/v1/config/Foo").await.as_deref(), Some("bar"));
    // Errors, with nothing written.
    let before = keyspace(&store).await;
    for (args, want) in [
        (
            vec!["config", "set", "colour", "blue"],
            "Error executing command: unrecognised config name 'colour'\n",
        ),
        (
            vec!["config", "set", "ipip", "maybe"],
            "Error executing command: invalid value 'maybe'\n",
        ),
        (
            vec!["config", "set", "logLevel", "loud"],
            "Error executing command: invalid value 'loud'\n",
        ),
        (
            vec!["config", "set", "asNumber", "1.99999"],
            "Error executing command: the supplied AS number is not valid\n",
        ),
        (
            vec!["config", "set", "asNumber", "1", "--node", "n1"],
            "Error executing command: --node should not be specified\n",
        ),
        (
            vec!["config", "get", "x", "--raw", "bird"],
            "Error executing command: unrecognised component 'bird'\n",
        ),
    ] {
        assert_eq!(out(&args), (Some(1), want.to_string()), "{args:?}");
    }
    assert_eq!(keyspace(&store).await, before);
}

/// hostEndpoint and bgpPeer: Calico's values (§7.2), identifiers and scopes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_endpoints_and_bgp_peers() {
    let etcd = EtcdServer::start().await.unwrap();
    let ep = etcd.endpoint();
    let store = etcd.store().await.unwrap();
    let file = "\
apiVersion: v1
kind: hostEndpoint
metadata: {name: eth0-ep, node: node1, labels: {role: gw}}
spec: {interfaceName: eth0, expectedIPs: [10.0.0.5]}
---
apiVersion: v1
kind: bgpPeer
metadata: {scope: global, peerIP: 10.0.0.254}
spec: {asNumber: 64567}
---
apiVersion: v1
kind: bgpPeer
metadata: {scope: node, node: node1, peerIP: 10.0.0.9}
spec: {asNumber: '1.10'}
";
    let o = tenet(&ep, &["apply", "-f", "-"], Some(file));
    assert_eq!(text(&o), "Successfully applied 3 resource(s)\n");
    let value = |k: &'static str| value_of(&store, k);
    assert_eq!(
        value("/calico/v1/host/node1/endpoint/eth0-ep").await,
        r#"{"name":"eth0","expected_ipv4_addrs":["10.0.0.5"],"labels":{"role":"gw"}}"#
    );
    assert_eq!(
        value("/calico/bgp/v1/global/peer_v4/10.0.0.254").await,
        r#"{"ip":"10.0.0.254","as_num":"64567"}"#
    );
    assert_eq!(
        value("/calico/bgp/v1/host/node1/peer_v4/10.0.0.9").await,
        r#"{"ip":"10.0.0.9","as_num":"65546"}"#
    );
    let o = tenet(&ep, &["get", "bgpPeers"], None);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "SCOPE    PEERIP       NODE    ASN     \nglobal   10.0.0.254           64567   \nnode     10.0.0.9     node1   65546   \n\n"
    );
    let o = tenet(&ep, &["get", "bp", "--node", "node1"], None);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "SCOPE   PEERIP     NODE    ASN     \nnode    10.0.0.9   node1   65546   \n\n"
    );
    let o = tenet(&ep, &["get", "heps", "-o", "wide"], None);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "NODE    NAME      INTERFACE   IPS        PROFILES   \nnode1   eth0-ep   eth0        10.0.0.5              \n\n"
    );
    for (args, want) in [
        (
            vec!["get", "bp", "--scope", "planet"],
            "Failed to execute command: Unrecognized scope 'planet', must be one of: global, node\n",
        ),
        (
            vec!["delete", "hep", "eth0-ep"],
            "Failed to delete 'hostEndpoint' resource: insufficient identifiers, missing 'node'\n",
        ),
        (
            vec!["delete", "bp", "10.0.0.9", "--scope", "node"],
            "Failed to delete 'bgpPeer' resource: insufficient identifiers, missing 'node'\n",
        ),
    ] {
        let o = tenet(&ep, &args, None);
        assert_eq!(
            (o.status.code(), text(&o)),
            (Some(1), want.to_string()),
            "{args:?}"
        );
    }
    let float = "apiVersion: v1\nkind: bgpPeer\nmetadata: {scope: global, peerIP: 10.0.0.7}\nspec: {asNumber: 1.10}\n";
    let o = tenet(&ep, &["create", "-f", "-"], Some(float));
    assert!(text(&o).contains("quoted string ('1.10')"), "{}", text(&o));
    let bad = "apiVersion: v1\nkind: bgpPeer\nmetadata: {scope: global, node: node1, peerIP: 10.0.0.1}\nspec: {asNumber: 1}\n";
    let o = tenet(&ep, &["create", "-f", "-"], Some(bad));
    assert!(
        text(&o).contains("node should not be specified for a global peer"),
        "{}",
        text(&o)
    );
    let hep_bad = "apiVersion: v1\nkind: hostEndpoint\nmetadata: {name: x, node: node1}\n";
    let o = tenet(&ep, &["create", "-f", "-"], Some(hep_bad));
    assert!(
        text(&o).contains("needs an interfaceName or expectedIPs"),
        "{}",
        text(&o)
    );
    let o = tenet(&ep, &["delete", "bp", "10.0.0.9", "--node", "node1"], None);
    assert_eq!(text(&o), "Successfully deleted 1 'bgpPeer' resource(s)\n");
    let o = tenet(&ep, &["delete", "hep", "eth0-ep", "--node", "node1"], None);
    assert_eq!(
        text(&o),
        "Successfully deleted 1 'hostEndpoint' resource(s)\n"
    );
    let o = tenet(&ep, &["delete", "bp", "10.0.0.254"], None);
    assert_eq!(text(&o), "Successfully deleted 1 'bgpPeer' resource(s)\n");
}

/// The composite node: its keys (§1.10), `(64512)` for an inherited AS number (§7.6), and
/// delete taking its endpoints' addresses back to IPAM and its whole host tree with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_the_calicoctl_way() {
    let etcd = EtcdServer::start().await.unwrap();
    let ep = etcd.endpoint();
    let store = etcd.store().await.unwrap();
    let file = "\
apiVersion: v1
kind: node
metadata: {name: node1}
spec:
  bgp: {ipv4Address: 10.0.0.5/24}
  orchRefs: [{nodeName: n1, orchestrator: k8s}]
---
apiVersion: v1
kind: node
metadata: {name: node2}
spec:
  bgp: {asNumber: 64600, ipv4Address: 10.0.0.6/24, ipv6Address: 'fd00::6/64'}
";
    let o = tenet(&ep, &["create", "-f", "-"], Some(file));
    assert_eq!(text(&o), "Successfully created 2 'node' resource(s)\n");
    let value = |k: &'static str| value_at(&store, k);
    assert_eq!(
        value("/calico/v1/host/node1/metadata").await.as_deref(),
        Some("{}")
    );
    assert_eq!(
        value("/calico/bgp/v1/host/node1/ip_addr_v4")
            .await
            .as_deref(),
        Some("10.0.0.5")
    );
    assert_eq!(
        value("/calico/bgp/v1/host/node1/ip_addr_v6")
            .await
            .as_deref(),
        Some("")
    );
    assert_eq!(
        value("/calico/bgp/v1/host/node1/network_v4")
            .await
            .as_deref(),
        Some("10.0.0.0/24")
    );
    assert_eq!(
        value("/calico/v1/host/node1/bird_ip").await.as_deref(),
        Some("10.0.0.5")
    );
    assert_eq!(value("/calico/bgp/v1/host/node1/as_num").await, None);
    assert_eq!(
        value("/calico/v1/host/node1/orchestrator_refs")
            .await
            .as_deref(),
        Some(r#"[{"orchestrator":"k8s","nodeName":"n1"}]"#)
    );
    let o = tenet(&ep, &["get", "nodes", "-o", "wide"], None);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "NAME    ASN       IPV4          IPV6         \nnode1   (64512)   10.0.0.5/24                \nnode2   64600     10.0.0.6/24   fd00::6/64   \n\n"
    );
    // Replacing node2 without IPv6 removes its IPv6 keys' values.
    let o = tenet(
        &ep,
        &["replace", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: node\nmetadata: {name: node2}\nspec: {bgp: {ipv4Address: 10.0.0.6/24}}\n",
        ),
    );
    assert_eq!(text(&o), "Successfully replaced 1 'node' resource(s)\n");
    assert_eq!(value("/calico/bgp/v1/host/node2/network_v6").await, None);
    assert_eq!(value("/calico/bgp/v1/host/node2/as_num").await, None);

    // A workload endpoint on node1 with an address from Calico IPAM: deleting the node
    // releases the address and removes the host tree.
    let o = tenet(&ep, &["ipam", "pool", "add", "10.60.0.0/24"], None);
    assert!(o.status.success(), "{}", text(&o));
    let o = tenet(
        &ep,
        &["ipam", "assign", "--host", "node1", "--handle", "w1"],
        None,
    );
    let ip = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let wep = format!(
        "apiVersion: v1\nkind: workloadEndpoint\nmetadata: {{name: eth0, workload: w1, orchestrator: k8s, node: node1}}\nspec: {{ipNetworks: ['{ip}/32'], interfaceName: cali1}}\n"
    );
    let o = tenet(&ep, &["create", "-f", "-"], Some(&wep));
    assert!(o.status.success(), "{}", text(&o));
    let o = tenet(&ep, &["delete", "node", "node1"], None);
    assert_eq!(text(&o), "Successfully deleted 1 'node' resource(s)\n");
    assert!(
        store
            .list("/calico/v1/host/node1/")
            .await
            .unwrap()
            .kvs
            .is_empty()
    );
    assert!(
        store
            .list("/calico/bgp/v1/host/node1/")
            .await
            .unwrap()
            .kvs
            .is_empty()
    );
    let o = tenet(&ep, &["ipam", "show", "--ip", &ip], None);
    assert!(!text(&o).contains("map["), "{ip} released: {}", text(&o));
    let o = tenet(&ep, &["delete", "node", "node1"], None);
    assert_eq!(
        text(&o),
        "Failed to delete 'node' resource: resource does not exist: Node(name=node1)\n"
    );
}

/// Every example of the calicoctl notes (seeds) and the reference (§4.3), in one file:
/// created, dumped without an invalid key, read back in every output format, applied again
/// from its yaml and replaced from its json without a change, and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_resource_round_trips() {
    let etcd = EtcdServer::start().await.unwrap();
    let ep = etcd.endpoint();
    let store = etcd.store().await.unwrap();
    let examples = "\
apiVersion: v1
kind: node
metadata: {name: node-hostname}
spec:
  bgp: {asNumber: 64512, ipv4Address: 10.244.0.1, ipv6Address: '2001:db8:85a3::8a2e:370:7334'}
---
apiVersion: v1
kind: node
metadata: {name: node1}
spec:
  bgp: {asNumber: 64512, ipv4Address: 10.0.0.5/24, ipv6Address: 'fd00::5/64'}
  orchRefs: [{nodeName: n1, orchestrator: k8s}]
---
apiVersion: v1
kind: bgpPeer
metadata: {scope: node, node: rack1-host1, peerIP: 192.168.1.1}
spec: {asNumber: 63400}
---
apiVersion: v1
kind: bgpPeer
metadata: {scope: global, peerIP: 10.0.0.254}
spec: {asNumber: 64567}
---
apiVersion: v1
kind: hostEndpoint
metadata: {name: eth0, node: node1, labels: {type: production}}
spec: {interfaceName: eth0, expectedIPs: [192.168.0.1, 192.168.0.2], profiles: [profile1, profile2]}
---
apiVersion: v1
kind: workloadEndpoint
metadata: {name: eth0, workload: wl1, orchestrator: k8s, node: node1, activeInstanceID: abc123, labels: {app: web}}
spec:
  ipNetworks: [10.0.0.1/32]
  ipNATs: [{internalIP: 10.0.0.1, externalIP: 172.16.0.1}]
  ipv4Gateway: 10.0.0.254
  profiles: [p1]
  interfaceName: cali1234
  mac: 'ee:ee:ee:ee:ee:ee'
---
apiVersion: v1
kind: ipPool
metadata: {cidr: 10.1.0.0/16}
spec: {ipip: {enabled: false}, nat-outgoing: true, disabled: false}
---
apiVersion: v1
kind: ipPool
metadata: {cidr: 192.168.0.0/16}
spec: {ipip: {enabled: true, mode: always}, nat-outgoing: true}
---
apiVersion: v1
kind: policy
metadata: {name: p1, annotations: {owner: ops}}
spec:
  order: 100
  selector: role == 'db'
  ingress:
  - action: allow
    protocol: tcp
    source: {selector: role == 'frontend', notNets: [10.9.0.0/16]}
    destination: {ports: [5432]}
  - action: deny
    protocol: icmp
    icmp: {type: 8, code: 0}
  egress: [{action: pass}]
  types: [ingress, egress]
---
apiVersion: v1
kind: profile
metadata: {name: prof1, tags: [a, b], labels: {k: v}}
spec:
  ingress: [{action: allow, source: {tag: a}}]
  egress: [{action: allow}]
";
    let o = tenet(&ep, &["create", "-f", "-"], Some(examples));
    assert_eq!(text(&o), "Successfully created 10 resource(s)\n");
    let o = tenet(&ep, &["dump", "/calico"], None);
    assert!(o.status.success(), "every value decodes: {}", text(&o));
    let snapshot = || async {
        store
            .list("/calico/")
            .await
            .unwrap()
            .kvs
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect::<Vec<_>>()
    };
    let before = snapshot().await;
    for (kind, count) in [
        ("node", 2),
        ("bgppeer", 2),
        ("hep", 1),
        ("wep", 1),
        ("ippool", 2),
        ("policy", 1),
        ("profile", 1),
    ] {
        for format in ["ps", "wide"] {
            let o = tenet(&ep, &["get", kind, "-o", format], None);
            let lines = String::from_utf8_lossy(&o.stdout).lines().count();
            assert_eq!(lines, count + 2, "{kind} -o {format}: {}", text(&o));
        }
        let yaml = tenet(&ep, &["get", kind, "-o", "yaml"], None);
        let o = tenet(
            &ep,
            &["apply", "-f", "-"],
            Some(&String::from_utf8_lossy(&yaml.stdout)),
        );
        assert!(o.status.success(), "{kind} yaml applies: {}", text(&o));
        let json = tenet(&ep, &["get", kind, "-o", "json"], None);
        let o = tenet(
            &ep,
            &["replace", "-f", "-"],
            Some(&String::from_utf8_lossy(&json.stdout)),
        );
        assert!(o.status.success(), "{kind} json replaces: {}", text(&o));
    }
    assert_eq!(
        snapshot().await,
        before,
        "reading back and writing again changes nothing"
    );
    // Deleting a node takes its host tree (its endpoints) with it, as in Calico; -s lets
    // the file's later endpoints be gone already.
    let o = tenet(&ep, &["delete", "-s", "-f", "-"], Some(examples));
    assert_eq!(text(&o), "Successfully deleted 10 resource(s)\n");
    for prefix in [
        "/calico/v1/host/",
        "/calico/v1/policy/",
        "/calico/v1/ipam/",
        "/calico/bgp/v1/host/",
        "/calico/bgp/v1/global/peer_v4/",
    ] {
        let left = store.list(prefix).await.unwrap().kvs;
        assert!(
            left.is_empty(),
            "{prefix}: {:?}",
            left.iter().map(|kv| &kv.key).collect::<Vec<_>>()
        );
    }
}
