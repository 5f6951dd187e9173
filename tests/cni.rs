//! `tenet-cni` driven by CNI's own reference client, `cnitool`, against a running `tenet lab`
//! (its etcd, scheduler, concentrators and tenet-cn): a container added to a tenant's network
//! gets its address and reaches its gateway and its tenant over the tunnel; CHECK passes,
//! then fails once the address is removed by hand; DEL twice succeeds and leaves no endpoint
//! and no address; bad input gets CNI's error codes and leaves nothing behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::lab::*;
use serde_json::{Value, json};
use tenet::store::Datastore;
use tenet::testbed::Netns;

/// The directory of the workspace's binaries (tenet-cni is cn's, built next to tenet).
fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_tenet"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A network configuration list directory with one network per `(name, plugin config)`.
fn net_dir(dir: &Path, nets: &[(&str, Value)]) -> PathBuf {
    let d = dir.join("net.d");
    std::fs::create_dir_all(&d).unwrap();
    for (name, plugin) in nets {
        let list = json!({"cniVersion": "1.0.0", "name": name, "plugins": [plugin]});
        std::fs::write(d.join(format!("{name}.conflist")), list.to_string()).unwrap();
    }
    d
}

fn cnitool(nets: &Path, op: &str, net: &str, ns: &Netns, env: &[(&str, &str)]) -> Output {
    Command::new("cnitool")
        .args([op, net])
        .arg(ns.path())
        .env("NETCONFPATH", nets)
        .env("CNI_PATH", format!("{}:/usr/lib/cni", bin_dir().display()))
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("cnitool (scripts/setup.sh builds it)")
}

fn printed(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs tenet-cni itself with `env` and `stdin`: its exit status and the JSON it printed.
fn plugin(env: &[(&str, &str)], stdin: &str) -> (bool, Value) {
    use std::io::Write;
    let mut child = Command::new(bin_dir().join("tenet-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let value = match text.trim() {
        "" => Value::Null,
        t => serde_json::from_str(t).unwrap_or_else(|e| panic!("{t:?}: {e}")),
    };
    (out.status.success(), value)
}

/// The container's interface addresses (`ip -4 -o addr`).
fn addresses(ns: &Netns, ifname: &str) -> String {
    ns.run(&["ip", "-4", "-o", "addr", "show", "dev", ifname])
        .unwrap_or_default()
}

/// Endpoint keys in etcd whose workload is `container`.
async fn endpoints_of(store: &tenet::store::EtcdStore, container: &str) -> Vec<String> {
    store
        .list(tenet::calico::HOSTS)
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .filter(|k| k.contains(&format!("/workload/ciao/{container}/")))
        .collect()
}

/// cnitool's container id for a namespace: `cnitool-` and the first 10 bytes of the
/// SHA-512 of its path, in hex (computed by `sha512sum`, not a crate pulled in for one test).
fn cnitool_container_id(ns: &Netns) -> String {
    use std::io::Write;
    let mut child = Command::new("sha512sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(ns.path().to_str().unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    format!("cnitool-{}", &String::from_utf8_lossy(&out.stdout)[..20])
}

#[test]
fn cnitool_adds_checks_and_deletes_a_container_on_a_tenant_network() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut lab, facts, _) = RunningLab::up(dir.path(), &["--cns", "1", "--workloads", "1"]);
    let host = &facts["compute_hosts"][0];
    let socket = str_of(host, "api_socket").to_string();
    let acme = concentrator(&facts, "acme").clone();
    let subnet = str_of(&acme, "subnet").to_string();
    let acme_workload = facts["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["tenant"] == "acme")
        .unwrap()
        .clone();
    let (etcd, store) = lab_store(&rt, &facts);
    // The concentrator's address is left out: tenet-cn finds it from its status in etcd.
    let acme_net = json!({"type": "tenet-cni", "tenant": "acme", "subnet": subnet,
        "concentrator": str_of(&acme, "uuid"), "socket": socket});
    let small = json!({"type": "tenet-cni", "tenant": "acme", "subnet": "172.16.9.0/26",
        "concentrator": str_of(&acme, "uuid"), "socket": socket});
    let stranger = json!({"type": "tenet-cni", "tenant": "initech", "subnet": subnet,
        "concentrator": str_of(&acme, "uuid"), "socket": socket});
    let nets = net_dir(
        dir.path(),
        &[
            ("acme", acme_net.clone()),
            ("small", small),
            ("stranger", stranger),
        ],
    );

    // ADD: the address, the gateway over the tunnel, the tenant's other workload.
    let c1 = Netns::create("cni").unwrap();
    let added = cnitool(&nets, "add", "acme", &c1, &[]);
    assert!(
        added.status.success(),
        "{}\n{}",
        printed(&added),
        lab.printed()
    );
    let result: Value = serde_json::from_slice(&added.stdout).unwrap();
    assert_eq!(result["cniVersion"], "1.0.0");
    let address = result["ips"][0]["address"].as_str().unwrap().to_string();
    let gateway = result["ips"][0]["gateway"].as_str().unwrap().to_string();
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(
        result["interfaces"][1]["sandbox"],
        c1.path().to_str().unwrap()
    );
    assert_eq!(result["routes"][0]["dst"], "0.0.0.0/0");
    assert!(addresses(&c1, "eth0").contains(&address), "{address}");
    assert!(
        ping(c1.name(), &gateway),
        "the container reaches its gateway {gateway}"
    );
    assert!(
        ping(c1.name(), str_of(&acme_workload, "ip")),
        "the container reaches acme's workload over the tunnel"
    );
    let id = cnitool_container_id(&c1);
    assert_eq!(rt.block_on(endpoints_of(&store, &id)).len(), 1);

    // An explicit address (CNI_ARGS IP=) is given exactly.
    let c2 = Netns::create("cni").unwrap();
    let wanted = {
        let net: ipnetwork::Ipv4Network = subnet.parse().unwrap();
        net.nth(77).unwrap().to_string()
    };
    let ip_arg = format!("IP={wanted}");
    let fixed = cnitool(&nets, "add", "acme", &c2, &[("CNI_ARGS", &ip_arg)]);
    assert!(fixed.status.success(), "{}", printed(&fixed));
    assert!(addresses(&c2, "eth0").contains(&format!("{wanted}/")));
    // The same address again is refused as invalid configuration; nothing is left of it.
    let c3 = Netns::create("cni").unwrap();
    let taken = cnitool(&nets, "add", "acme", &c3, &[("CNI_ARGS", &ip_arg)]);
    assert!(!taken.status.success());
    assert!(
        printed(&taken).contains("already assigned"),
        "{}",
        printed(&taken)
    );
    assert!(addresses(&c3, "eth0").is_empty());
    assert!(
        rt.block_on(endpoints_of(&store, &cnitool_container_id(&c3)))
            .is_empty()
    );

    // CHECK passes; with the address removed by hand it fails and says what is wrong.
    let checked = cnitool(&nets, "check", "acme", &c1, &[]);
    assert!(checked.status.success(), "{}", printed(&checked));
    c1.run(&["ip", "addr", "del", &address, "dev", "eth0"])
        .unwrap();
    let broken = cnitool(&nets, "check", "acme", &c1, &[]);
    assert!(!broken.status.success());
    assert!(
        printed(&broken).contains(&format!("lacks its address {address}")),
        "{}",
        printed(&broken)
    );

    // DEL twice: both succeed; the endpoint and the address are gone.
    for round in 1..=2 {
        let del = cnitool(&nets, "del", "acme", &c1, &[]);
        assert!(del.status.success(), "DEL {round}: {}", printed(&del));
    }
    assert!(rt.block_on(endpoints_of(&store, &id)).is_empty());
    assert!(c1.run(&["ip", "link", "show", "eth0"]).is_err());
    // The address is free again: a new container may ask for it.
    let c4 = Netns::create("cni").unwrap();
    let bare = address.split('/').next().unwrap();
    let again = cnitool(
        &nets,
        "add",
        "acme",
        &c4,
        &[("CNI_ARGS", &format!("IP={bare}"))],
    );
    assert!(again.status.success(), "{}", printed(&again));
    // DEL of a namespace that is already gone, and of a container never added.
    let c4_path = c4.path();
    drop(c4);
    let gone = Command::new("cnitool")
        .args(["del", "acme"])
        .arg(&c4_path)
        .env("NETCONFPATH", &nets)
        .env("CNI_PATH", format!("{}:/usr/lib/cni", bin_dir().display()))
        .output()
        .unwrap();
    assert!(gone.status.success(), "{}", printed(&gone));
    let never = Netns::create("cni").unwrap();
    let del = cnitool(&nets, "del", "acme", &never, &[]);
    assert!(del.status.success(), "{}", printed(&del));

    // A tenant the concentrator does not serve: refused as invalid configuration.
    let c5 = Netns::create("cni").unwrap();
    let unknown = cnitool(&nets, "add", "stranger", &c5, &[]);
    assert!(!unknown.status.success());
    assert!(
        printed(&unknown).contains("serves tenant acme, not initech"),
        "{}",
        printed(&unknown)
    );
    assert!(addresses(&c5, "eth0").is_empty());
    // A subnet whose every address is taken (by another host, through the library): the
    // container finds none, and nothing is left of the attempt.
    let small: ipnetwork::Ipv4Network = "172.16.9.0/26".parse().unwrap();
    let acme_ipam = tenet::ipam::Ipam::for_tenant(std::sync::Arc::new(store.clone()), "acme");
    let mut fillers = Vec::new();
    rt.block_on(async {
        loop {
            let handle = format!("filler-{}", fillers.len());
            match acme_ipam
                .assign_in_subnet(small, "elsewhere", &handle, None, Default::default())
                .await
            {
                Ok(_) => fillers.push(handle),
                Err(tenet::ipam::IpamError::NoFreeAddress(_)) => break,
                Err(e) => panic!("filling {small}: {e}"),
            }
        }
    });
    let c6 = Netns::create("cni").unwrap();
    assert_eq!(
        fillers.len(),
        61,
        "a /26 less its network, gateway and broadcast"
    );
    let full = cnitool(&nets, "add", "small", &c6, &[]);
    assert!(!full.status.success());
    assert!(
        printed(&full).contains("no free address"),
        "{}",
        printed(&full)
    );
    assert!(
        rt.block_on(endpoints_of(&store, &cnitool_container_id(&c6)))
            .is_empty()
    );
    rt.block_on(async {
        for handle in &fillers {
            acme_ipam.release_by_handle(handle).await.unwrap();
        }
    });
    let del = cnitool(&nets, "del", "acme", &c2, &[]);
    assert!(del.status.success(), "{}", printed(&del));

    // The plugin's own answers: VERSION, a malformed configuration, tenet-cn unreachable.
    let (ok, version) = plugin(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
    assert!(ok);
    assert!(
        version["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("0.4.0"))
    );
    let c6_path = c6.path();
    let env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c-bad"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", c6_path.to_str().unwrap()),
    ];
    let (ok, error) = plugin(
        &env,
        r#"{"cniVersion":"1.0.0","name":"x","type":"tenet-cni","tenant":"acme","subnet":"nope","concentrator":"c"}"#,
    );
    assert!(!ok);
    assert_eq!(error["code"], 7, "{error}");
    assert!(
        error["details"]
            .as_str()
            .unwrap()
            .contains(r#"subnet "nope" is not an IPv4 network"#),
        "{error}"
    );
    let unreachable = json!({"cniVersion": "0.4.0", "name": "x", "type": "tenet-cni",
        "tenant": "acme", "subnet": subnet, "concentrator": "c",
        "socket": dir.path().join("nobody.sock")});
    let (ok, error) = plugin(&env, &unreachable.to_string());
    assert!(!ok);
    assert_eq!(error["code"], 11, "{error}");
    assert_eq!(error["cniVersion"], "0.4.0");

    // Nothing of the test's containers is left in etcd, and IPAM agrees with the endpoints.
    for ns in [&c2, &c3, &c5, &c6] {
        assert!(
            rt.block_on(endpoints_of(&store, &cnitool_container_id(ns)))
                .is_empty()
        );
    }
    let check = Command::new(env!("CARGO_BIN_EXE_tenet"))
        .args(["ipam", "check"])
        .env("ETCD_ENDPOINTS", &etcd)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", printed(&check));
    let status = lab.terminate();
    assert!(status.success(), "{status}\n{}", lab.printed());
}

/// Routed mode: the container gets a /32 from the Calico pool with 169.254.1.1 as its
/// gateway (answered by proxy ARP), and reaches its tenant's workloads through it, across
/// hosts, by the routes BIRD spreads.
#[test]
fn cnitool_adds_a_routed_container() {
    let dir = tempfile::tempdir().unwrap();
    let (mut lab, facts, _) = RunningLab::up(
        dir.path(),
        &["--mode", "routed", "--cns", "2", "--workloads", "2"],
    );
    let host = &facts["compute_hosts"][0];
    // Dual stack: an IPv6 Calico pool next to the lab's IPv4 one.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_, store) = lab_store(&rt, &facts);
    rt.block_on(
        tenet::ipam::Ipam::new(std::sync::Arc::new(store))
            .create_pool("fd00:65::/48".parse().unwrap(), false),
    )
    .unwrap();
    let net = json!({"type": "tenet-cni", "tenant": "acme", "mode": "routed",
        "pool": "10.65.0.0/16", "pool6": "fd00:65::/48", "socket": str_of(host, "api_socket")});
    let nets = net_dir(dir.path(), &[("routed", net)]);
    let c = Netns::create("cni").unwrap();
    let added = cnitool(&nets, "add", "routed", &c, &[]);
    assert!(
        added.status.success(),
        "{}\n{}",
        printed(&added),
        lab.printed()
    );
    let result: Value = serde_json::from_slice(&added.stdout).unwrap();
    let address = result["ips"][0]["address"].as_str().unwrap();
    assert!(
        address.starts_with("10.65.") && address.ends_with("/32"),
        "{result}"
    );
    assert_eq!(result["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(result["routes"][0]["gw"], "169.254.1.1");
    let address6 = result["ips"][1]["address"].as_str().unwrap().to_string();
    assert!(
        address6.starts_with("fd00:65:") && address6.ends_with("/128"),
        "{result}"
    );
    assert_eq!(result["ips"][1]["gateway"], "fe80::1");
    assert_eq!(result["routes"][1], json!({"dst": "::/0", "gw": "fe80::1"}));
    // A second dual-stack container on the host: IPv6 between the two, routed by the host.
    let c2 = Netns::create("cni").unwrap();
    let added2 = cnitool(&nets, "add", "routed", &c2, &[]);
    assert!(added2.status.success(), "{}", printed(&added2));
    let result2: Value = serde_json::from_slice(&added2.stdout).unwrap();
    let peer6 = result2["ips"][1]["address"].as_str().unwrap();
    let peer6 = peer6.split('/').next().unwrap();
    assert!(
        ping(c.name(), peer6),
        "IPv6 from one routed container to the other ({peer6})"
    );
    for w in facts["workloads"].as_array().unwrap() {
        if w["tenant"] == "acme" {
            assert!(
                ping(c.name(), str_of(w, "ip")),
                "the routed container reaches {} on {}",
                str_of(w, "name"),
                str_of(w, "host")
            );
        }
    }
    let checked = cnitool(&nets, "check", "routed", &c, &[]);
    assert!(checked.status.success(), "{}", printed(&checked));
    // A gre network on a routed node is refused, naming the node's mode.
    let gre = json!({"type": "tenet-cni", "tenant": "acme", "subnet": "172.16.0.0/24",
        "concentrator": "c", "concentratorIP": "10.254.0.99", "socket": str_of(host, "api_socket")});
    let nets = net_dir(dir.path(), &[("gre", gre)]);
    let other = Netns::create("cni").unwrap();
    let refused = cnitool(&nets, "add", "gre", &other, &[]);
    assert!(!refused.status.success());
    assert!(
        printed(&refused).contains("this node runs in routed mode"),
        "{}",
        printed(&refused)
    );
    for round in 1..=2 {
        let del = cnitool(&nets, "del", "routed", &c, &[]);
        assert!(del.status.success(), "DEL {round}: {}", printed(&del));
    }
    let del = cnitool(&nets, "del", "routed", &c2, &[]);
    assert!(del.status.success(), "{}", printed(&del));
    assert!(c.run(&["ip", "link", "show", "eth0"]).is_err());
    let status = lab.terminate();
    assert!(status.success(), "{status}\n{}", lab.printed());
}
