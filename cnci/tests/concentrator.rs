//! The concentrator in real namespaces: compute-node hosts running tenet-cn's `ComputeNode`,
//! concentrator hosts running `Concentrator`, user-space GRE tunnels between them, real etcd,
//! real dnsmasq and a real DHCP client (busybox udhcpc) in each workload. Proven by leases and
//! pings.

mod common;

use std::sync::Arc;

use common::*;
use tenet::net::NewLink;
use tenet::net::tunnel::BackendChoice;
use tenet::store::Datastore;
use tenet::testbed::{EtcdServer, Fabric};
use tenet::types::gateway_of;
use tenet_cnci::{CnciError, Concentrator, RemoteSubnet, Repair};

async fn etcd() -> (EtcdServer, Arc<dyn Datastore>) {
    let server = EtcdServer::start().await.unwrap();
    let store: Arc<dyn Datastore> = Arc::new(server.store().await.unwrap());
    (server, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_leases_its_endpoint_address_over_the_tunnel() {
    lease_over(BackendChoice::Userspace, 1458).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_leases_its_endpoint_address_over_vxlan() {
    lease_over(BackendChoice::Vxlan, 1450).await;
}

async fn lease_over(backend: BackendChoice, tunnel_mtu: u32) {
    let (_etcd, store) = etcd().await;
    let fabric = Fabric::new().await.unwrap();
    let cn_host = fabric.add_host("cn").await.unwrap();
    let conc_host = fabric.add_host("conc").await.unwrap();
    let run = tempfile::tempdir().unwrap();
    let mut config = cnci_config(&conc_host, "c1", "t1", run.path());
    config.tunnel = backend;
    let conc = conc_on(config, &store).await;
    let cn = cn_on(&cn_host, "cn-1", backend).await;
    let dhcp = DhcpClient::new();

    let w = workload(
        &cn,
        &cn_host,
        "v1",
        "t1",
        ("c1", conc_host.ip()),
        "02:00:00:00:00:05",
    )
    .await;
    let added = w
        .vnic
        .tunnel
        .clone()
        .expect("the first VNIC announces the subnet");
    let attached = conc.attach_remote_subnet(&remote(&added)).await.unwrap();
    assert!(attached.new_subnet && attached.new_tunnel);
    let pid = conc.subnets().await[0].dhcp_pid.expect("dnsmasq runs");
    // dnsmasq subscribes to every address and route change in the namespace; it is taken
    // off them (each subnet's would wake for every other's), and still serves (below).
    assert_eq!(
        tenet::process::netlink_groups::multicast_groups(pid).unwrap(),
        Vec::<u32>::new(),
        "dnsmasq still hears of address and route changes"
    );
    // The interfaces the concentrator made have no IPv6, so no IPv6 route of theirs wakes
    // the subnets' dnsmasqs (each listens to every route change in the namespace).
    let routes6 = conc_host
        .run(&["ip", "-6", "route", "show", "table", "all"])
        .unwrap();
    assert!(
        !routes6.lines().any(|l| l.contains(" dev tc")),
        "an IPv6 route on a concentrator's interface:\n{routes6}"
    );
    // (Before DHCP, whose client script flushes eth0.) The tenant's segment holds no IPv6 address of the compute node's or the concentrator's
    // (bridges and tunnels are L2 only): only the workload itself answers all-nodes.
    assert_eq!(
        ipv6_neighbours(&w.ns),
        [own_link_local(&w.ns)].into(),
        "nothing on the tenant's segment but the workload has an IPv6 address {:?} {:?}",
        cn_host.run(&["ip", "addr"]),
        conc_host.run(&["ip", "addr"])
    );

    // No endpoint yet: dnsmasq ignores the MAC.
    assert_eq!(dhcp.lease(&w.ns, 2), None, "an unknown MAC gets no lease");

    // The endpoint appears in etcd: the next attempt succeeds, dnsmasq not restarted.
    let ip = "172.16.0.5".parse().unwrap();
    let rev = put_endpoint(&store, "cn-1", "v1", "t1", w.mac, ip).await;
    synced(&conc, rev).await;
    let lease = dhcp
        .lease(&w.ns, 3)
        .expect("a lease once the endpoint exists");
    let gw = gateway_of(&subnet());
    assert_eq!(lease.ip, ip, "the address of its workload endpoint");
    assert_eq!(lease.router, gw);
    assert_eq!(
        lease.dns,
        gw.to_string(),
        "dnsmasq answers DNS at the gateway"
    );
    assert_eq!(lease.mtu, Some(tunnel_mtu), "option 26 = the tunnel MTU");
    assert_eq!(mtu_of(&w.ns), tunnel_mtu);
    assert!(ping(&w.ns, gw), "the workload reaches its gateway");
    assert_eq!(conc.subnets().await[0].dhcp_pid, Some(pid), "no restart");

    // An endpoint of another tenant with the same address range is not served here.
    let other = workload(
        &cn,
        &cn_host,
        "v2",
        "t1",
        ("c1", conc_host.ip()),
        "02:00:00:00:00:06",
    )
    .await;
    let rev = put_endpoint(
        &store,
        "cn-1",
        "v2",
        "t2",
        other.mac,
        "172.16.0.6".parse().unwrap(),
    )
    .await;
    synced(&conc, rev).await;
    assert_eq!(dhcp.lease(&other.ns, 2), None, "another tenant's endpoint");

    // A repeated TenantAdded changes nothing.
    let again = conc.attach_remote_subnet(&remote(&added)).await.unwrap();
    assert!(!again.new_subnet && !again.new_tunnel);
    assert_eq!(conc.subnets().await[0].tunnels.len(), 1);

    // A tenant starting instances one after another: their bindings all reach the hosts
    // file, and dnsmasq rereads it fewer times than there are instances.
    let subnet_dir = run.path().join(tenet_cnci::dnsmasq::dir_name(&subnet()));
    let hosts_file = subnet_dir.join("hosts");
    let dnsmasq_log = tenet_cnci::dnsmasq::daemon_spec(&subnet(), &subnet_dir, None).log_file();
    let reloads = || {
        std::fs::read_to_string(&dnsmasq_log)
            .unwrap()
            .lines()
            .filter(|l| l.contains(&format!("read {}", hosts_file.display())))
            .count()
    };
    let before = reloads();
    let burst = 30;
    let mut rev = 0;
    for i in 0..burst {
        let mac = format!("02:00:00:00:01:{i:02x}").parse().unwrap();
        let ip = std::net::Ipv4Addr::new(172, 16, 0, 100 + i);
        rev = put_endpoint(&store, "cn-1", &format!("b{i}"), "t1", mac, ip).await;
    }
    synced(&conc, rev).await;
    let hosts = std::fs::read_to_string(&hosts_file).unwrap();
    for i in 0..burst {
        assert!(
            hosts.contains(&format!(",172.16.0.{}", 100 + i)),
            "binding {i} missing:\n{hosts}"
        );
    }
    let reread = reloads() - before;
    assert!(
        (1..(burst as usize / 2)).contains(&reread),
        "{reread} rereads of the hosts file for {burst} new endpoints"
    );

    // A new concentrator process takes over: the tunnel (in VXLAN mode, the flood entry) and
    // dnsmasq are found again, and nothing needs repair.
    let config = conc.config().clone();
    drop(conc);
    let conc = Concentrator::init(config, Some(store.clone()))
        .await
        .unwrap();
    let report = conc.rebuild().await.unwrap();
    assert_eq!(
        (report.subnets, report.tunnels, report.dhcp_adopted),
        (1, 1, 1),
        "{report:?}"
    );
    assert!(report.repairs.is_empty(), "{:#?}", report.repairs);
    assert_eq!(dhcp.lease(&w.ns, 3).unwrap().ip, ip);

    let forwarding =
        || tenet::net::sysctl::read(Some(&conc_host.path()), "net.ipv4.ip_forward").unwrap();
    if backend == BackendChoice::Vxlan {
        assert_eq!(
            forwarding(),
            "1",
            "VXLAN subnets route between compute nodes"
        );
    }
    let ipv6_default = || {
        tenet::net::sysctl::read(
            Some(&conc_host.path()),
            "net.ipv6.conf.default.disable_ipv6",
        )
        .unwrap()
    };
    assert_eq!(ipv6_default(), "1", "new interfaces get no IPv6");
    conc.reset().await.unwrap();
    assert_eq!(forwarding(), "0", "reset restores forwarding");
    assert_eq!(
        ipv6_default(),
        "0",
        "reset restores IPv6 for new interfaces"
    );
    assert!(
        std::fs::read_dir(run.path()).unwrap().next().is_none(),
        "files removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_compute_nodes_share_a_subnet_and_one_can_leave() {
    two_compute_nodes(BackendChoice::Userspace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_compute_nodes_share_a_subnet_over_vxlan() {
    two_compute_nodes(BackendChoice::Vxlan).await;
}

async fn two_compute_nodes(backend: BackendChoice) {
    let (_etcd, store) = etcd().await;
    let fabric = Fabric::new().await.unwrap();
    let cn1_host = fabric.add_host("cn").await.unwrap();
    let cn2_host = fabric.add_host("cn").await.unwrap();
    let conc_host = fabric.add_host("conc").await.unwrap();
    let run = tempfile::tempdir().unwrap();
    let mut config = cnci_config(&conc_host, "c1", "t1", run.path());
    config.tunnel = backend;
    let conc = conc_on(config, &store).await;
    let cn1 = cn_on(&cn1_host, "cn-1", backend).await;
    let cn2 = cn_on(&cn2_host, "cn-2", backend).await;
    let dhcp = DhcpClient::new();
    let conc_at = ("c1", conc_host.ip());

    let w1 = workload(&cn1, &cn1_host, "v1", "t1", conc_at, "02:00:00:00:00:11").await;
    let w2 = workload(&cn2, &cn2_host, "v2", "t1", conc_at, "02:00:00:00:00:12").await;
    let (ip1, ip2) = (
        "172.16.0.11".parse().unwrap(),
        "172.16.0.12".parse().unwrap(),
    );
    put_endpoint(&store, "cn-1", "v1", "t1", w1.mac, ip1).await;
    let rev = put_endpoint(&store, "cn-2", "v2", "t1", w2.mac, ip2).await;
    let a1 = conc
        .attach_remote_subnet(&remote(w1.vnic.tunnel.as_ref().unwrap()))
        .await
        .unwrap();
    let a2 = conc
        .attach_remote_subnet(&remote(w2.vnic.tunnel.as_ref().unwrap()))
        .await
        .unwrap();
    assert!(a1.new_subnet && !a2.new_subnet && a2.new_tunnel);
    assert_eq!(a1.bridge, a2.bridge, "one bridge per subnet");
    synced(&conc, rev).await;

    assert_eq!(dhcp.lease(&w1.ns, 3).unwrap().ip, ip1);
    assert_eq!(dhcp.lease(&w2.ns, 3).unwrap().ip, ip2);
    assert!(
        ping(&w1.ns, ip2),
        "across compute nodes, through the concentrator's bridge"
    );
    assert!(ping(&w2.ns, ip1));

    // TenantRemoved for cn-1: its tunnel only.
    let gone = conc
        .detach_remote_subnet(&remote(w1.vnic.tunnel.as_ref().unwrap()))
        .await
        .unwrap();
    assert!(gone.removed);
    assert_eq!(gone.remaining, 1);
    let left = conc.subnets().await;
    assert_eq!(left[0].tunnels.len(), 1);
    assert_eq!(left[0].tunnels[0].0, cn2_host.ip());
    assert!(
        ping(&w2.ns, gateway_of(&subnet())),
        "cn-2's traffic still flows"
    );
    if backend == BackendChoice::Vxlan {
        // One device: cn-1's flood entry is gone. (A multipoint VXLAN device accepts any
        // sender and learns from it, so a frame cn-1 still sends can teach a MAC behind it
        // again; filtering senders is the firewall's.)
        let fdb = conc_host.run(&["bridge", "fdb", "show"]).unwrap();
        let flood = |ip: std::net::Ipv4Addr| {
            fdb.lines()
                .any(|l| l.starts_with("00:00:00:00:00:00 ") && l.contains(&format!("dst {ip} ")))
        };
        assert!(!flood(cn1_host.ip()), "{fdb}");
        assert!(flood(cn2_host.ip()), "{fdb}");
    } else {
        assert!(
            !ping(&w1.ns, gateway_of(&subnet())),
            "cn-1's tunnel is gone"
        );
    }
    // An unknown tunnel: success, nothing to do.
    let again = conc
        .detach_remote_subnet(&remote(w1.vnic.tunnel.as_ref().unwrap()))
        .await
        .unwrap();
    assert!(!again.removed);

    // The subnet goes only when asked.
    assert!(conc.remove_subnet(&subnet()).await.unwrap());
    assert!(conc.subnets().await.is_empty());
    assert!(!ping(&w2.ns, gateway_of(&subnet())));
    conc.reset().await.unwrap();
}

/// Attaches of different subnets run side by side (each waits for its own dnsmasq only),
/// while one subnet's attaches take turns and overlapping subnets are still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subnets_attach_side_by_side_and_overlaps_are_still_refused() {
    use futures::future::join_all;
    use tenet::types::TunnelKey;

    let (_etcd, store) = etcd().await;
    let fabric = Fabric::new().await.unwrap();
    let conc_host = fabric.add_host("conc").await.unwrap();
    let run = tempfile::tempdir().unwrap();
    let mut config = cnci_config(&conc_host, "c1", "t1", run.path());
    // Fewer slots than requests: the others wait for theirs, first come first served.
    config.max_parallel = 3;
    let conc = conc_on(config, &store).await;
    let req = |net: &str, cn: u8| {
        let subnet: ipnetwork::Ipv4Network = net.parse().unwrap();
        RemoteSubnet {
            tenant: "t1".into(),
            subnet,
            subnet_key: TunnelKey::from_subnet(&subnet).unwrap().get(),
            cn_id: format!("cn-{cn}"),
            cn_ip: std::net::Ipv4Addr::new(10, 254, 0, 100 + cn),
        }
    };
    // Eight new subnets, two compute nodes racing for a ninth, and two overlapping ones.
    let mut requests: Vec<RemoteSubnet> = (0..8)
        .map(|i| req(&format!("172.19.{i}.0/24"), 1))
        .collect();
    requests.push(req("172.18.0.0/24", 1));
    requests.push(req("172.18.0.0/24", 2));
    requests.push(req("172.20.0.0/16", 1));
    requests.push(req("172.20.1.0/24", 1));
    let results = join_all(requests.iter().map(|r| conc.attach_remote_subnet(r))).await;

    for (r, result) in requests.iter().zip(&results).take(8) {
        let a = result
            .as_ref()
            .unwrap_or_else(|e| panic!("{}: {e}", r.subnet));
        assert!(a.new_subnet && a.new_tunnel, "{}: {a:?}", r.subnet);
    }
    let (x, y) = (results[8].as_ref().unwrap(), results[9].as_ref().unwrap());
    assert!(
        x.new_tunnel && y.new_tunnel,
        "each compute node has its tunnel"
    );
    assert!(
        x.new_subnet != y.new_subnet,
        "exactly one of the two made 172.18.0.0/24: {x:?} {y:?}"
    );
    let overlapping: Vec<&Result<_, CnciError>> = results[10..].iter().collect();
    assert_eq!(
        overlapping.iter().filter(|r| r.is_ok()).count(),
        1,
        "one of two overlapping subnets: {overlapping:?}"
    );
    let refused = overlapping.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert!(refused.to_string().contains("overlaps"), "{refused}");

    let subnets = conc.subnets().await;
    assert_eq!(subnets.len(), 10, "{subnets:#?}");
    for s in &subnets {
        assert!(s.dhcp_pid.is_some(), "{}: dnsmasq runs", s.subnet);
        let gw = gateway_of(&s.subnet);
        let addrs = conc_host
            .run(&["ip", "-4", "-o", "addr", "show", "dev", &s.bridge])
            .unwrap();
        assert!(addrs.contains(&format!("{gw}/")), "{}: {addrs}", s.subnet);
        let tunnels = if s.subnet.to_string() == "172.18.0.0/24" {
            2
        } else {
            1
        };
        assert_eq!(s.tunnels.len(), tunnels, "{}", s.subnet);
    }
    conc.reset().await.unwrap();
    assert!(conc.subnets().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_with_the_same_subnet_stay_isolated() {
    let (_etcd, store) = etcd().await;
    let fabric = Fabric::new().await.unwrap();
    let cn_host = fabric.add_host("cn").await.unwrap();
    let c1_host = fabric.add_host("conc").await.unwrap();
    let c2_host = fabric.add_host("conc").await.unwrap();
    let (run1, run2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let c1 = conc_on(cnci_config(&c1_host, "c1", "t1", run1.path()), &store).await;
    let c2 = conc_on(cnci_config(&c2_host, "c2", "t2", run2.path()), &store).await;
    let cn = cn_on(&cn_host, "cn-1", BackendChoice::Userspace).await;
    let dhcp = DhcpClient::new();

    let a = workload(
        &cn,
        &cn_host,
        "va",
        "t1",
        ("c1", c1_host.ip()),
        "02:00:00:00:00:21",
    )
    .await;
    let b = workload(
        &cn,
        &cn_host,
        "vb",
        "t2",
        ("c2", c2_host.ip()),
        "02:00:00:00:00:22",
    )
    .await;
    let b2 = workload(
        &cn,
        &cn_host,
        "vb2",
        "t2",
        ("c2", c2_host.ip()),
        "02:00:00:00:00:23",
    )
    .await;
    let (ip_a, ip_b, ip_b2) = (
        "172.16.0.21".parse().unwrap(),
        "172.16.0.22".parse().unwrap(),
        "172.16.0.23".parse().unwrap(),
    );
    put_endpoint(&store, "cn-1", "va", "t1", a.mac, ip_a).await;
    put_endpoint(&store, "cn-1", "vb", "t2", b.mac, ip_b).await;
    let rev = put_endpoint(&store, "cn-1", "vb2", "t2", b2.mac, ip_b2).await;
    c1.attach_remote_subnet(&remote(a.vnic.tunnel.as_ref().unwrap()))
        .await
        .unwrap();
    c2.attach_remote_subnet(&remote(b.vnic.tunnel.as_ref().unwrap()))
        .await
        .unwrap();
    // Each concentrator refuses the other tenant.
    let wrong = c1
        .attach_remote_subnet(&remote(b.vnic.tunnel.as_ref().unwrap()))
        .await;
    assert!(
        matches!(
            wrong,
            Err(CnciError::Invalid {
                field: "tenant",
                ..
            })
        ),
        "{wrong:?}"
    );
    synced(&c1, rev).await;
    synced(&c2, rev).await;

    assert_eq!(dhcp.lease(&a.ns, 3).unwrap().ip, ip_a);
    assert_eq!(dhcp.lease(&b.ns, 3).unwrap().ip, ip_b);
    assert_eq!(dhcp.lease(&b2.ns, 3).unwrap().ip, ip_b2);
    assert!(ping(&b.ns, ip_b2), "within tenant t2");
    assert!(
        ping(&a.ns, gateway_of(&subnet())),
        "t1 reaches its own gateway"
    );
    assert!(!ping(&a.ns, ip_b), "t1 must not reach t2's workload");
    assert!(!ping(&b.ns, ip_a), "t2 must not reach t1's workload");
    // t1's gateway is c1's bridge: its neighbour entry is c1's bridge MAC.
    let c1_bridge = c1.subnets().await[0].bridge.clone();
    let c1_mac = c1_host
        .run(&["cat", &format!("/sys/class/net/{c1_bridge}/address")])
        .unwrap();
    let neigh = a.ns.run(&["ip", "neigh", "show", "172.16.0.1"]).unwrap();
    assert!(neigh.contains(c1_mac.trim()), "{neigh} vs {c1_mac}");
    c1.reset().await.unwrap();
    c2.reset().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_touch_nothing() {
    let (_etcd, store) = etcd().await;
    let fabric = Fabric::new().await.unwrap();
    let conc_host = fabric.add_host("conc").await.unwrap();
    let run = tempfile::tempdir().unwrap();
    let conc = conc_on(cnci_config(&conc_host, "c1", "t1", run.path()), &store).await;
    let good = RemoteSubnet {
        tenant: "t1".into(),
        subnet: subnet(),
        subnet_key: 4268,
        cn_id: "cn-1".into(),
        cn_ip: "10.254.0.77".parse().unwrap(),
    };
    let links_before = conc_host.netlink().links().await.unwrap().len();
    let cases: Vec<(&str, RemoteSubnet)> = vec![
        (
            "subnet_key",
            RemoteSubnet {
                subnet_key: 4269,
                ..good.clone()
            },
        ),
        (
            "tenant",
            RemoteSubnet {
                tenant: "t9".into(),
                ..good.clone()
            },
        ),
        (
            "subnet",
            RemoteSubnet {
                subnet: "172.16.0.0/31".parse().unwrap(),
                ..good.clone()
            },
        ),
        (
            "subnet",
            RemoteSubnet {
                subnet: "172.16.0.0/7".parse().unwrap(),
                subnet_key: 172,
                ..good.clone()
            },
        ),
        (
            "cn_ip",
            RemoteSubnet {
                cn_ip: "224.0.0.9".parse().unwrap(),
                ..good.clone()
            },
        ),
        (
            "cn_ip",
            RemoteSubnet {
                cn_ip: conc_host.ip(),
                ..good.clone()
            },
        ),
    ];
    for (field, req) in cases {
        match conc.attach_remote_subnet(&req).await {
            Err(CnciError::Invalid { field: f, why }) => assert_eq!(f, field, "{why}"),
            other => panic!("expected an error on {field}, got {other:?}"),
        }
    }
    assert_eq!(
        conc_host.netlink().links().await.unwrap().len(),
        links_before
    );

    // An overlapping subnet of this concentrator.
    conc.attach_remote_subnet(&good).await.unwrap();
    let wide = RemoteSubnet {
        subnet: "172.16.0.0/16".parse().unwrap(),
        ..good.clone()
    };
    let e = conc.attach_remote_subnet(&wide).await.unwrap_err();
    assert!(e.to_string().contains("overlaps"), "{e}");

    // Idle: a subnet goes once it has had no tunnel for the idle period, not before.
    assert!(
        conc.remove_idle_subnets(std::time::Duration::ZERO)
            .await
            .is_empty()
    );
    conc.detach_remote_subnet(&good).await.unwrap();
    assert!(
        conc.remove_idle_subnets(std::time::Duration::from_secs(3600))
            .await
            .is_empty()
    );
    assert_eq!(
        conc.remove_idle_subnets(std::time::Duration::ZERO).await,
        [subnet()]
    );
    assert!(
        !run.path().join("172.16.0.0-24").exists(),
        "its dnsmasq files went too"
    );
    conc.attach_remote_subnet(&good).await.unwrap();

    // A tunnel the kernel cannot make (no GRE here) rolls the new subnet back.
    let mut kernel = cnci_config(&conc_host, "c2", "t1", run.path());
    kernel.tunnel = BackendChoice::Kernel;
    let k = Concentrator::init(kernel, None).await.unwrap();
    let other = RemoteSubnet {
        subnet: "10.9.0.0/16".parse().unwrap(),
        subnet_key: 0x090a,
        ..good.clone()
    };
    if !tenet::net::tunnel::kernel_supports_gretap(conc_host.netlink())
        .await
        .unwrap()
    {
        let before = conc_host.netlink().links().await.unwrap().len();
        assert!(k.attach_remote_subnet(&other).await.is_err());
        assert_eq!(conc_host.netlink().links().await.unwrap().len(), before);
        assert!(
            !run.path().join("10.9.0.0-16").exists(),
            "no dnsmasq files left"
        );
    }
    conc.reset().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_adopts_dnsmasq_and_repairs_the_damage() {
    let (_etcd, store) = etcd().await;
    let fabric = Fabric::new().await.unwrap();
    let cn_host = fabric.add_host("cn").await.unwrap();
    let conc_host = fabric.add_host("conc").await.unwrap();
    let run = tempfile::tempdir().unwrap();
    let config = cnci_config(&conc_host, "c1", "t1", run.path());
    let conc = conc_on(config.clone(), &store).await;
    let cn = cn_on(&cn_host, "cn-1", BackendChoice::Userspace).await;
    let dhcp = DhcpClient::new();
    let w = workload(
        &cn,
        &cn_host,
        "v1",
        "t1",
        ("c1", conc_host.ip()),
        "02:00:00:00:00:31",
    )
    .await;
    let ip = "172.16.0.31".parse().unwrap();
    let rev = put_endpoint(&store, "cn-1", "v1", "t1", w.mac, ip).await;
    conc.attach_remote_subnet(&remote(w.vnic.tunnel.as_ref().unwrap()))
        .await
        .unwrap();
    synced(&conc, rev).await;
    assert_eq!(dhcp.lease(&w.ns, 3).unwrap().ip, ip);
    let before = conc.subnets().await;
    let pid = before[0].dhcp_pid.unwrap();

    // The agent dies (its links and dnsmasq stay); meanwhile an operator removes the gateway
    // address, a crashed attach left an unfinished bridge, and a stale subnet directory holds
    // a dnsmasq of a subnet that is gone.
    drop(conc);
    let nl = conc_host.netlink();
    let bridge = nl.link_by_name(&before[0].bridge).await.unwrap().unwrap();
    nl.del_address(bridge.index, "172.16.0.1/24".parse().unwrap())
        .await
        .unwrap();
    nl.create(&NewLink::bridge("tcb_0000abcd")).await.unwrap();
    std::fs::create_dir(run.path().join("10.99.0.0-24")).unwrap();

    let again = Concentrator::init(config.clone(), Some(store.clone()))
        .await
        .unwrap();
    let report = again.rebuild().await.unwrap();
    assert_eq!(
        (report.subnets, report.tunnels, report.dhcp_adopted),
        (1, 1, 1),
        "{report:?}"
    );
    assert!(report.repairs.contains(&Repair::RemovedUnfinished {
        ifname: "tcb_0000abcd".into()
    }));
    assert!(report.repairs.contains(&Repair::AddedGateway {
        subnet: subnet(),
        bridge: before[0].bridge.clone()
    }));
    assert!(report.repairs.iter().any(
        |r| matches!(r, Repair::RemovedOrphanDhcp { subnet, .. } if subnet == "10.99.0.0-24")
    ));
    assert_eq!(report.repairs.len(), 3, "{:#?}", report.repairs);
    assert_eq!(
        again.subnets().await[0].dhcp_pid,
        Some(pid),
        "dnsmasq adopted, not restarted"
    );
    assert_eq!(
        dhcp.lease(&w.ns, 3).unwrap().ip,
        ip,
        "leases still answered"
    );
    assert!(ping(&w.ns, gateway_of(&subnet())));

    // A second rebuild changes nothing.
    let second = again.rebuild().await.unwrap();
    assert!(second.repairs.is_empty(), "{:#?}", second.repairs);
    assert_eq!(second.dhcp_adopted, 1);

    // The compute node re-announces: a no-op.
    let re = again
        .attach_remote_subnet(&remote(w.vnic.tunnel.as_ref().unwrap()))
        .await
        .unwrap();
    assert!(!re.new_tunnel && !re.new_subnet);

    // dnsmasq killed: restarted by its supervisor, and leasing again.
    let mut status = again.subnets().await;
    let pid = status.remove(0).dhcp_pid.unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let restarted = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match again.subnets().await[0].dhcp_pid {
                Some(p) if p != pid => return p,
                _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("dnsmasq restarted");
    assert_ne!(restarted, pid);
    assert_eq!(
        dhcp.lease(&w.ns, 5).unwrap().ip,
        ip,
        "leasing again after the restart"
    );

    // reset: no link, process or file of this concentrator is left.
    again.reset().await.unwrap();
    let left: Vec<String> = nl
        .links()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .filter(|n| n.starts_with("tcb_") || n.starts_with("tct_"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(
        !std::path::Path::new(&format!("/proc/{restarted}")).exists(),
        "dnsmasq stopped"
    );
    assert!(std::fs::read_dir(run.path()).unwrap().next().is_none());

    // A replaced concentrator (nothing in its kernel or run directory) attaches again what
    // etcd records, and the workload leases again.
    let replaced = Concentrator::init(config.clone(), Some(store.clone()))
        .await
        .unwrap();
    let report = replaced.rebuild().await.unwrap();
    assert_eq!(
        report.repairs,
        [Repair::RestoredAttachment {
            subnet: subnet(),
            cn_ip: cn_host.ip()
        }]
    );
    assert_eq!((report.subnets, report.tunnels), (1, 1));
    assert_eq!(dhcp.lease(&w.ns, 5).unwrap().ip, ip);
    assert!(replaced.rebuild().await.unwrap().repairs.is_empty());
    // Removing the subnet forgets its attachments too.
    assert!(replaced.remove_subnet(&subnet()).await.unwrap());
    let again = Concentrator::init(config, Some(store.clone()))
        .await
        .unwrap();
    assert_eq!(again.rebuild().await.unwrap().subnets, 0);
    again.reset().await.unwrap();
}

#[tokio::test]
async fn the_rendered_dnsmasq_configuration_passes_dnsmasq_test() {
    use tenet_cnci::DhcpOptions;
    use tenet_cnci::dnsmasq::{DhcpSubnet, render_config};
    let dir = tempfile::tempdir().unwrap();
    for (net, options) in [
        ("172.16.0.0/24", DhcpOptions::default()),
        (
            "10.8.0.0/16",
            DhcpOptions {
                lease_time: std::time::Duration::from_secs(600),
                prebind_ciao_macs: true,
                upstream_dns: vec!["192.0.2.53".parse().unwrap()],
                mtu: Some(1400),
            },
        ),
    ] {
        let text = render_config(&DhcpSubnet {
            tenant: "t1",
            subnet: net.parse().unwrap(),
            bridge: "tcb_00000001",
            mtu: 1458,
            dir: dir.path(),
            options: &options,
        });
        let conf = dir.path().join("dnsmasq.conf");
        std::fs::write(&conf, &text).unwrap();
        let out = tenet::process::Command::new("dnsmasq")
            .args([
                "--test".to_string(),
                format!("--conf-file={}", conf.display()),
            ])
            .run()
            .await
            .unwrap_or_else(|e| panic!("{net}: {e}\n{text}"));
        assert!(
            format!("{}{}", out.stdout, out.stderr).contains("syntax check OK"),
            "{out:?}"
        );
    }
}
