//! Calico policy on a compute host, proven by traffic: real etcd, real iptables and ipset,
//! workloads as namespaces on a tenant bridge (GRE mode's bridged case: the rules police
//! bridge ports through br_netfilter). Each behaviour is a connection that must succeed and
//! one that must fail; each etcd change is applied by the running sync, without a restart.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tenet::calico::{CalicoKey, WorkloadEndpoint, WorkloadEndpointId};
use tenet::net::NewLink;
use tenet::policy::calc::CalcConfig;
use tenet::policy::render::WorkloadHook;
use tenet::policy::sync::{self, PolicyConfig, PolicyHandle};
use tenet::store::{Datastore, Revision};
use tenet::testbed::{EtcdServer, Fabric, Host, Workload};

const HOST: &str = "h1";

struct Bench {
    _etcd: EtcdServer,
    store: Arc<dyn Datastore>,
    host: Host,
    /// Another host on the underlay, to reach the host's own address from.
    peer: Host,
    policy: PolicyHandle,
    _fabric: Fabric,
}

impl Bench {
    async fn put(&self, key: &str, value: &str) -> Revision {
        self.store.put(key, value.as_bytes()).await.unwrap()
    }

    async fn delete(&self, key: &str) -> Revision {
        self.store.delete(key, None).await.unwrap()
    }

    /// Writes and waits until the kernel has it.
    async fn put_applied(&mut self, key: &str, value: &str) {
        let rev = self.put(key, value).await;
        self.policy.wait_applied(rev).await;
    }

    async fn profile(&mut self, name: &str, tags: &str, labels: &str, rules: &str) {
        let base = format!("/calico/v1/policy/profile/{name}");
        self.put(&format!("{base}/labels"), labels).await;
        self.put(&format!("{base}/rules"), rules).await;
        self.put_applied(&format!("{base}/tags"), tags).await;
    }

    async fn policy(&mut self, name: &str, json: &str) {
        self.put_applied(
            &format!("/calico/v1/policy/tier/default/policy/{name}"),
            json,
        )
        .await;
    }

    async fn endpoint(&mut self, w: &Wl, profiles: &[&str]) {
        let ep = WorkloadEndpoint {
            state: "active".into(),
            name: w.port.clone(),
            active_instance_id: String::new(),
            mac: None,
            profile_ids: profiles.iter().map(|p| p.to_string()).collect(),
            ipv4_nets: vec![format!("{}/32", w.ip).parse().unwrap()],
            ipv6_nets: vec![format!("{}/128", w.ip6).parse().unwrap()],
            ipv4_nat: vec![],
            ipv6_nat: vec![],
            labels: BTreeMap::from([("tenet.tenant".to_string(), w.tenant.clone())]),
            ipv4_gateway: None,
            ipv6_gateway: None,
        };
        let key = CalicoKey::WorkloadEndpoint(WorkloadEndpointId {
            host: HOST.into(),
            orchestrator: "ciao".into(),
            workload: format!("i-{}", w.port),
            endpoint: w.port.clone(),
        })
        .path();
        self.put_applied(&key, &serde_json::to_string(&ep).unwrap())
            .await;
    }
}

struct Wl {
    ns: Workload,
    port: String,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
    tenant: String,
}

impl Wl {
    /// Whether a TCP connection to `ip:port` is established (a DROP shows as a timeout).
    fn connects(&self, ip: impl Into<IpAddr>, port: u16) -> bool {
        let ip = ip.into();
        self.ns
            .enter(move || {
                let addr = SocketAddr::from((ip, port));
                Ok(TcpStream::connect_timeout(&addr, Duration::from_millis(1500)).is_ok())
            })
            .unwrap()
    }

    fn pings(&self, ip: Ipv4Addr) -> bool {
        self.ns.ping(ip, 1)
    }

    /// Accepts (and drops) connections on `port` until the namespace goes.
    fn listen(&self, port: u16) {
        let listener = self
            .ns
            // `[::]` takes IPv4 too (bindv6only is 0 in a new namespace).
            .enter(move || Ok(TcpListener::bind(("::", port))))
            .unwrap()
            .unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                drop(conn);
            }
        });
    }
}

/// Gives a workload `fd00::<last>/64` (no duplicate detection, so it is usable at once).
fn v6(w: &Workload, last: u8) -> Ipv6Addr {
    let ip: Ipv6Addr = format!("fd00::{last}").parse().unwrap();
    w.ns.run(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{ip}/64"),
        "dev",
        "eth0",
        "nodad",
    ])
    .unwrap();
    ip
}

async fn bench() -> (Bench, Vec<Wl>, Vec<Wl>) {
    let etcd = EtcdServer::start().await.unwrap();
    let store: Arc<dyn Datastore> = Arc::new(etcd.store().await.unwrap());
    let fabric = Fabric::new().await.unwrap();
    let host = fabric.add_host("pol").await.unwrap();
    let peer = fabric.add_host("peer").await.unwrap();
    let acme = host
        .netlink()
        .create_index(&NewLink::bridge("tbr_000000a1").up())
        .await
        .unwrap();
    let globex = host
        .netlink()
        .create_index(&NewLink::bridge("tbr_000000b1").up())
        .await
        .unwrap();
    let mut wls = Vec::new();
    for (i, last) in [(1u8, 11u8), (2, 12), (3, 13)] {
        let port = format!("tvn_0000000{i}");
        let ip = Ipv4Addr::new(172, 16, 0, last);
        let ns = host
            .add_workload(
                &format!("w{i}"),
                &port,
                acme,
                format!("{ip}/24").parse().unwrap(),
                1500,
            )
            .await
            .unwrap();
        let ip6 = v6(&ns, last);
        wls.push(Wl {
            ns,
            port,
            ip,
            ip6,
            tenant: "acme".into(),
        });
    }
    // Another tenant reusing w2's and w3's addresses, on its own bridge.
    let mut twins = Vec::new();
    for (i, last) in [(2u8, 12u8), (3, 13)] {
        let port = format!("tvn_000000b{i}");
        let ip = Ipv4Addr::new(172, 16, 0, last);
        let ns = host
            .add_workload(
                &format!("g{i}"),
                &port,
                globex,
                format!("{ip}/24").parse().unwrap(),
                1500,
            )
            .await
            .unwrap();
        let ip6 = v6(&ns, last);
        twins.push(Wl {
            ns,
            port,
            ip,
            ip6,
            tenant: "globex".into(),
        });
    }
    let policy = sync::spawn(
        store.clone(),
        PolicyConfig {
            calc: CalcConfig {
                hostname: HOST.into(),
                scope_label: Some("tenet.tenant".into()),
            },
            hook: WorkloadHook::Bridged {
                prefixes: vec!["tvn_".into()],
            },
            netns: Some(host.path()),
            iptables: None,
            resync: Duration::from_millis(500),
            report: Duration::from_secs(1),
            observe: None,
        },
    )
    .await
    .unwrap();
    (
        Bench {
            _etcd: etcd,
            store,
            host,
            peer,
            policy,
            _fabric: fabric,
        },
        wls,
        twins,
    )
}

fn save(host: &Host) -> String {
    host.run(&["iptables-save"]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_policies_and_tiers_police_bridged_workloads() {
    let (mut b, w, twins) = bench().await;
    let (twin, g3) = (&twins[0], &twins[1]);
    let (w1, w2, w3) = (&w[0], &w[1], &w[2]);
    for port in [80, 8085, 8091] {
        w3.listen(port);
    }
    // Before any endpoint is known, a tenet port is an unknown interface: dropped.
    b.policy.wait_applied(1).await;
    assert!(!w1.connects(w3.ip, 80), "unknown interfaces are dropped");

    // A base profile: TCP 80 from tag `web`, TCP 8080-8090 from anyone, ICMP echo by type,
    // everything out.
    b.profile(
        "base",
        "[]",
        "{}",
        r#"{"inbound_rules":[
            {"action":"allow","protocol":"tcp","src_tag":"web","dst_ports":[80]},
            {"action":"allow","protocol":"tcp","dst_ports":["8080:8090"]},
            {"action":"allow","protocol":"icmp","icmp_type":8}],
           "outbound_rules":[{"action":"allow"}]}"#,
    )
    .await;
    b.profile("webtag", r#"["web"]"#, "{}", "{}").await;
    b.profile("backend", "[]", r#"{"tier":"backend"}"#, "{}")
        .await;
    b.endpoint(w1, &["base", "webtag"]).await;
    b.endpoint(w2, &["base"]).await;
    b.endpoint(w3, &["base", "backend"]).await;
    // The other tenant's twin of w2's address carries the `web` tag: scoping keeps it out of
    // acme's set, or w2 would get in.
    b.endpoint(twin, &["base", "webtag"]).await;
    b.endpoint(g3, &["base"]).await;
    g3.listen(8085);

    assert!(
        b.host
            .run(&["ip", "-d", "link", "show", "tbr_000000a1"])
            .unwrap()
            .contains("nf_call_iptables 1"),
        "the tenant bridge hands its traffic to iptables"
    );
    assert!(w1.connects(w3.ip, 80), "web-tagged source allowed");
    assert!(
        !w2.connects(w3.ip, 80),
        "untagged source denied (and the twin is not acme's)"
    );
    assert!(w2.connects(w3.ip, 8085), "inside the port range");
    assert!(!w2.connects(w3.ip, 8091), "outside the port range");
    assert!(w1.pings(w3.ip), "ICMP echo allowed by type");
    // The same over IPv6 (ip6tables, cali6 sets; neighbour discovery crosses the bridge).
    assert!(w1.connects(w3.ip6, 80), "IPv6: web-tagged source allowed");
    assert!(!w2.connects(w3.ip6, 80), "IPv6: untagged source denied");
    assert!(w2.connects(w3.ip6, 8085), "IPv6: inside the port range");

    // The same addresses in both tenants: each bridge tracks its connections in its own
    // conntrack zone, so one tenant's packet never matches the other's connection.
    assert!(w2.connects(w3.ip, 8085) && twin.connects(g3.ip, 8085));
    let table = b.host.run(&["cat", "/proc/net/nf_conntrack"]).unwrap();
    let zones: std::collections::BTreeSet<&str> = table
        .lines()
        .filter(|l| l.contains("src=172.16.0.12 dst=172.16.0.13") && l.contains("dport=8085"))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("zone=")))
        .collect();
    assert_eq!(zones.len(), 2, "one zone per tenant bridge:\n{table}");

    // Two policies on the backend (selected by a label inherited from a profile): deny TCP
    // from everyone but w2 at order 10, allow TCP at order 20.
    let w2net = format!("{}/32", w2.ip);
    b.policy(
        "deny-not-w2",
        &format!(
            r#"{{"order":10,"selector":"tier == 'backend'","inbound_rules":[{{"action":"deny","protocol":"tcp","!src_net":"{w2net}"}}],"types":["ingress"]}}"#
        ),
    )
    .await;
    b.policy(
        "allow-tcp",
        r#"{"order":20,"selector":"tier == 'backend'","inbound_rules":[{"action":"allow","protocol":"tcp"}],"types":["ingress"]}"#,
    )
    .await;
    assert!(
        !w1.connects(w3.ip, 8085),
        "denied by the first policy (negated net)"
    );
    assert!(
        w2.connects(w3.ip, 8091),
        "w2 passes the deny and is allowed by the second"
    );
    assert!(
        !w1.pings(w3.ip),
        "with policies in force, no policy matched ICMP: dropped"
    );
    // Reordered: the allow comes first.
    b.policy(
        "deny-not-w2",
        &format!(
            r#"{{"order":30,"selector":"tier == 'backend'","inbound_rules":[{{"action":"deny","protocol":"tcp","!src_net":"{w2net}"}}],"types":["ingress"]}}"#
        ),
    )
    .await;
    assert!(w1.connects(w3.ip, 8085), "the allow at order 20 now wins");

    // next-tier at order 1 for TCP 80: the policies are skipped and the profiles decide.
    b.policy(
        "pass-80",
        r#"{"order":1,"selector":"tier == 'backend'","inbound_rules":[{"action":"next-tier","protocol":"tcp","dst_ports":[80]}],"types":["ingress"]}"#,
    )
    .await;
    assert!(
        w1.connects(w3.ip, 80),
        "passed to the profile, which allows web"
    );
    assert!(
        !w2.connects(w3.ip, 80),
        "passed to the profile, which denies untagged"
    );
    assert!(
        w2.connects(w3.ip, 8091),
        "other ports still allowed by policy"
    );

    // Relabel w2 (give it the tag's profile): it gets in.
    b.endpoint(w2, &["base", "webtag"]).await;
    assert!(w2.connects(w3.ip, 80), "relabelled into the web set");
    // Delete the tag's profile: nobody is web any more.
    b.delete("/calico/v1/policy/profile/webtag/labels").await;
    b.delete("/calico/v1/policy/profile/webtag/rules").await;
    let rev = b.delete("/calico/v1/policy/profile/webtag/tags").await;
    b.policy.wait_applied(rev).await;
    assert!(!w1.connects(w3.ip, 80), "the tag went with its profile");
    assert!(!w2.connects(w3.ip, 80));

    // A rule deleted by hand is repaired by the next resync.
    let chain = tenet::policy::render::policy_chain("acme:allow-tcp", true);
    assert!(w1.connects(w3.ip, 8085));
    b.host.run(&["iptables", "-F", &chain]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !save(&b.host).contains(&format!("-A {chain} ")) {
        assert!(
            Instant::now() < deadline,
            "the flushed chain was not repaired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(w1.connects(w3.ip, 8085), "traffic back after the repair");

    // Felix's status keys: `status` on a lease, `last_reported_status` kept.
    let status = b
        .store
        .get(&format!("/calico/felix/v1/host/{HOST}/status"))
        .await
        .unwrap()
        .expect("the status key is written once in sync");
    assert!(status.lease.is_some(), "the status key lives on a lease");
    let last: tenet::calico::FelixStatus = serde_json::from_slice(
        &b.store
            .get(&format!(
                "/calico/felix/v1/host/{HOST}/last_reported_status"
            ))
            .await
            .unwrap()
            .unwrap()
            .value,
    )
    .unwrap();
    assert!(!last.first_update && last.uptime > 0.0 && last.time.ends_with('Z'));

    // Endpoint status keys, once EndpointReportingEnabled is on: up, then down when the
    // VNIC's port goes down.
    b.put_applied("/calico/v1/config/EndpointReportingEnabled", "true")
        .await;
    let status_key = format!(
        "/calico/felix/v1/host/{HOST}/workload/ciao/i-{0}/endpoint/{0}",
        w1.port
    );
    let status_of = |store: Arc<dyn Datastore>, key: String| async move {
        store
            .get(&key)
            .await
            .unwrap()
            .map(|kv| String::from_utf8(kv.value).unwrap())
    };
    assert_eq!(
        status_of(b.store.clone(), status_key.clone())
            .await
            .as_deref(),
        Some(r#"{"status":"up"}"#)
    );
    b.host
        .run(&["ip", "link", "set", &w1.port, "down"])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_of(b.store.clone(), status_key.clone())
        .await
        .as_deref()
        != Some(r#"{"status":"down"}"#)
    {
        assert!(Instant::now() < deadline, "the status never went down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.host.run(&["ip", "link", "set", &w1.port, "up"]).unwrap();

    // A host endpoint on the host's underlay interface: everything in is dropped but the
    // failsafe ports (SSH) and what its profile allows.
    let listen_on_host = |port: u16| {
        let l = b
            .host
            .enter(move || Ok(TcpListener::bind(("0.0.0.0", port))))
            .unwrap()
            .unwrap();
        std::thread::spawn(move || l.incoming().for_each(drop));
    };
    listen_on_host(22);
    listen_on_host(9999);
    let host_ip = b.host.ip();
    let peer_ns = b.peer.path();
    let from_peer = |port: u16| {
        tenet::net::netns::run_in(Some(&peer_ns), move || {
            let addr = SocketAddr::from((host_ip, port));
            Ok(TcpStream::connect_timeout(&addr, Duration::from_millis(1500)).is_ok())
        })
        .unwrap()
    };
    assert!(from_peer(9999), "no host endpoint yet: the host is open");
    b.profile("lockdown", "[]", "{}", "{}").await;
    b.put_applied(
        &format!("/calico/v1/host/{HOST}/endpoint/eth0-ep"),
        r#"{"name":"eth0","profile_ids":["lockdown"]}"#,
    )
    .await;
    assert!(
        !from_peer(9999),
        "the host endpoint drops what its profile does not allow"
    );
    assert!(from_peer(22), "failsafe: SSH still gets in");
    b.put_applied(
        "/calico/v1/policy/profile/lockdown/rules",
        r#"{"inbound_rules":[{"action":"allow","protocol":"tcp","dst_ports":[9999]}]}"#,
    )
    .await;
    assert!(from_peer(9999), "allowed by the host endpoint's profile");
    assert!(
        w1.connects(w3.ip, 8085),
        "workload traffic is not a host endpoint's business"
    );

    // Shutdown leaves nothing of Calico's.
    let Bench {
        policy,
        host,
        store,
        ..
    } = b;
    policy.stop().await.unwrap();
    assert!(
        store
            .get(&format!("/calico/felix/v1/host/{HOST}/status"))
            .await
            .unwrap()
            .is_none(),
        "a stopped agent's status goes at once"
    );
    let rules = save(&host) + &host.run(&["ip6tables-save"]).unwrap();
    assert!(!rules.contains("cali"), "left behind:\n{rules}");
    let sets = host.run(&["ipset", "list", "-n"]).unwrap();
    assert!(!sets.contains("cali"), "sets left behind: {sets}");
}
