//! The compute-node dataplane in real namespaces: a CN host and concentrator hosts on a lab
//! fabric, tunnels over the user-space GRE datapath, proven by pings.

use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnetwork::Ipv4Network;
use tenet::net::NewLink;
use tenet::net::alias::ALIAS_PREFIX;
use tenet::net::tunnel::{BackendChoice, TunnelSpec, UserspaceGre};
use tenet::testbed::{Fabric, Host, Netns, Workload};
use tenet::types::TunnelKey;
use tenet_cn::{
    CnConfig, CnError, ComputeNode, ContainerEvent, ContainerNetns, TunnelEventKind, VnicConfig,
    VnicRole,
};

const SUBNET: &str = "172.16.0.0/24";

async fn cn_on(host: &Host, tunnel: BackendChoice) -> Result<ComputeNode, CnError> {
    let mut config = CnConfig::new("cn-test");
    config.netns = Some(host.path());
    config.tunnel = tunnel;
    ComputeNode::init(config).await
}

fn vnic(id: &str, tenant: &str, conc: &str, conc_ip: Ipv4Addr, mac: &str) -> VnicConfig {
    VnicConfig::container(
        id,
        tenant,
        SUBNET.parse().unwrap(),
        conc,
        conc_ip,
        mac.parse().unwrap(),
    )
}

/// tenet's links on the host: (name, alias).
async fn tenet_links(host: &Host) -> Vec<(String, String)> {
    let mut v: Vec<_> = host
        .netlink()
        .links_with_alias_prefix(ALIAS_PREFIX)
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.name, l.alias.unwrap_or_default()))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_the_rules_one_by_one() {
    let fabric = Fabric::new().await.unwrap();
    let host = fabric.add_host("cnev").await.unwrap();
    let cn = cn_on(&host, BackendChoice::Userspace).await.unwrap();
    let conc_ip: Ipv4Addr = "10.254.0.200".parse().unwrap();

    // First VNIC of the subnet: bridge + tunnel + TunnelAdd with what the CNCI needs.
    let v1 = vnic("v1", "t1", "c1", conc_ip, "02:00:ac:10:00:02");
    let a = cn.create_vnic(&v1, None).await.unwrap();
    let ev = a.tunnel.expect("TunnelAdd on the first VNIC");
    assert_eq!(ev.kind, TunnelEventKind::Add);
    assert_eq!(
        (ev.concentrator_id.as_str(), ev.concentrator_ip),
        ("c1", conc_ip)
    );
    assert_eq!(
        (ev.tenant_id.as_str(), ev.subnet_id.as_str()),
        ("t1", SUBNET)
    );
    assert_eq!(ev.subnet_key, TunnelKey::new(4268).unwrap());
    assert_eq!((ev.cn_id.as_str(), ev.cn_ip), ("cn-test", host.ip()));
    let Some(ContainerEvent::Add(net)) = &a.container else {
        panic!("{:?}", a.container)
    };
    assert_eq!(net.gateway, "172.16.0.1".parse::<Ipv4Addr>().unwrap());
    assert_eq!(net.bridge, a.vnic.bridge);
    // MTU = fabric 1500 - GRE 42, on the host end and on the container end.
    assert_eq!(a.vnic.mtu, 1458);
    let peer = host
        .netlink()
        .link_by_name(a.vnic.peer.as_ref().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(peer.mtu, 1458);
    assert_eq!(peer.mac, Some([2, 0, 0xac, 0x10, 0, 2]));

    // Second VNIC of the subnet: no tunnel event, container Info.
    let v2 = vnic("v2", "t1", "c1", conc_ip, "02:00:ac:10:00:03");
    let b = cn.create_vnic(&v2, None).await.unwrap();
    assert!(b.tunnel.is_none());
    assert!(matches!(b.container, Some(ContainerEvent::Info(_))));
    assert_eq!(b.vnic.bridge, a.vnic.bridge);

    // A repeated create returns the same VNIC and no tunnel event.
    let again = cn.create_vnic(&v1, None).await.unwrap();
    assert_eq!(again.vnic.ifname, a.vnic.ifname);
    assert_eq!(again.vnic.index, a.vnic.index);
    assert!(again.tunnel.is_none());

    // A VM VNIC in the same subnet: a multi-queue tap, N descriptors, no events.
    let mut v3 = vnic("v3", "t1", "c1", conc_ip, "02:00:00:00:00:03");
    v3.role = VnicRole::Vm;
    // Its VMM sets the MAC.
    v3.mac = None;
    v3.queues = 4;
    let c = cn.create_vnic(&v3, None).await.unwrap();
    assert_eq!(c.vnic.queues.len(), 4);
    assert!(c.tunnel.is_none() && c.container.is_none());
    let tap = host
        .netlink()
        .link_by_name(&c.vnic.ifname)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(tap.kind.as_deref(), Some("tun"));
    assert_eq!(
        tap.controller,
        Some(host.netlink().index_of(&a.vnic.bridge).await.unwrap())
    );
    drop(c);

    // bridge + tunnel + 3 VNICs carry tenet aliases.
    assert_eq!(tenet_links(&host).await.len(), 5);

    // Destroys: unknown → nothing; not the last → nothing; the last → TunnelDel + Del.
    let unknown = vnic("nope", "t1", "c1", conc_ip, "02:00:ac:10:00:09");
    assert_eq!(
        cn.destroy_vnic(&unknown, None).await.unwrap(),
        Default::default()
    );
    assert_eq!(
        cn.destroy_vnic(&v2, None).await.unwrap(),
        Default::default()
    );
    assert_eq!(
        cn.destroy_vnic(&v3, None).await.unwrap(),
        Default::default()
    );
    let last = cn.destroy_vnic(&v1, None).await.unwrap();
    let del = last.tunnel.expect("TunnelDel on the last VNIC");
    assert_eq!(del.kind, TunnelEventKind::Del);
    assert_eq!(del.subnet_key.get(), 4268);
    assert_eq!(
        last.container,
        Some(ContainerEvent::Del {
            bridge: a.vnic.bridge.clone()
        })
    );
    assert_eq!(
        cn.destroy_vnic(&v1, None).await.unwrap(),
        Default::default()
    );
    assert!(
        tenet_links(&host).await.is_empty(),
        "{:?}",
        tenet_links(&host).await
    );

    // Concentrator VNIC: macvtap on the compute link with its MAC, idempotent both ways.
    let mut cv = vnic("cnci1", "t1", "c1", conc_ip, "02:ff:00:00:00:01");
    cv.role = VnicRole::Concentrator;
    let m = cn.create_cnci_vnic(&cv).await.unwrap();
    assert_eq!(m.kind.as_deref(), Some("macvtap"));
    assert_eq!(m.mac, Some([2, 0xff, 0, 0, 0, 1]));
    assert_eq!(cn.create_cnci_vnic(&cv).await.unwrap().index, m.index);
    assert!(
        cn.create_vnic(&cv, None).await.is_err(),
        "a concentrator role is not a tenant VNIC"
    );
    cn.destroy_cnci_vnic(&cv).await.unwrap();
    cn.destroy_cnci_vnic(&cv).await.unwrap();
    assert!(tenet_links(&host).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_and_half_way_failures_leave_nothing() {
    let fabric = Fabric::new().await.unwrap();
    let host = fabric.add_host("cnbad").await.unwrap();
    let before = host.netlink().links().await.unwrap().len();
    let conc_ip: Ipv4Addr = "10.254.0.200".parse().unwrap();

    let cn = cn_on(&host, BackendChoice::Userspace).await.unwrap();
    let mut bad = vnic("v1", "t1", "c1", conc_ip, "02:00:ac:10:00:02");
    bad.subnet_key = 1;
    let e = cn.create_vnic(&bad, None).await.unwrap_err();
    assert!(e.to_string().contains("subnet_key"), "{e}");
    let mut bad = vnic("v1", "", "c1", conc_ip, "02:00:ac:10:00:02");
    assert!(
        cn.create_vnic(&bad, None)
            .await
            .unwrap_err()
            .to_string()
            .contains("tenant_id")
    );
    bad.tenant_id = "t1".into();
    bad.mac = Some("01:00:5e:00:00:01".parse().unwrap());
    assert!(
        cn.create_vnic(&bad, None)
            .await
            .unwrap_err()
            .to_string()
            .contains("mac")
    );
    // A namespace that does not exist: fails after the bridge, tunnel and veth were made,
    // and every one of them is removed again.
    let mut bad = vnic("v1", "t1", "c1", conc_ip, "02:00:ac:10:00:02");
    bad.netns = Some(ContainerNetns {
        path: "/run/netns/does-not-exist".into(),
        ifname: "eth0".into(),
        address: "172.16.0.2/24".parse().unwrap(),
        gateway: None,
    });
    let e = cn.create_vnic(&bad, None).await.unwrap_err();
    assert!(e.to_string().contains("does-not-exist"), "{e}");
    assert!(
        tenet_links(&host).await.is_empty(),
        "{:?}",
        tenet_links(&host).await
    );
    assert!(cn.subnets().is_empty());
    drop(cn);

    // The tunnel cannot be made (no kernel GRE here): the bridge made first is rolled back.
    let kernel = cn_on(&host, BackendChoice::Kernel).await.unwrap();
    let ok = vnic("v1", "t1", "c1", conc_ip, "02:00:ac:10:00:02");
    let e = kernel.create_vnic(&ok, None).await.unwrap_err();
    assert!(
        matches!(e, CnError::Net(ref n) if n.is_unsupported()),
        "{e}"
    );
    assert!(kernel.subnets().is_empty());
    assert_eq!(host.netlink().links().await.unwrap().len(), before);
}

/// The concentrator's side of one tenant subnet: bridge, tunnel back to the CN, and a
/// workload standing in for the gateway / other instances.
async fn concentrator_end(
    conc: &Host,
    gre: &UserspaceGre,
    cn_ip: Ipv4Addr,
    tag: &str,
    workload: &str,
) -> Workload {
    use tenet::net::tunnel::TunnelBackend;
    let nl = conc.netlink();
    let bridge = nl
        .create(&NewLink::bridge(format!("br-{tag}")).up())
        .await
        .unwrap();
    let spec = TunnelSpec::new(
        format!("gt-{tag}"),
        TunnelKey::new(4268).unwrap(),
        conc.ip(),
        cn_ip,
    );
    let tunnel = gre.create(&spec).await.unwrap();
    nl.enslave(tunnel.index, bridge.index).await.unwrap();
    let addr: Ipv4Network = format!("{workload}/24").parse().unwrap();
    conc.add_workload(
        &format!("gw{tag}"),
        &format!("w-{tag}"),
        bridge.index,
        addr,
        tunnel.mtu,
    )
    .await
    .unwrap()
}

fn container(label: &str, addr: &str) -> (Netns, ContainerNetns) {
    let ns = Netns::create(label).unwrap();
    let cfg = ContainerNetns {
        path: ns.path(),
        ifname: "eth0".into(),
        address: format!("{addr}/24").parse().unwrap(),
        gateway: Some("172.16.0.1".parse().unwrap()),
    };
    (ns, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_reach_the_concentrator_and_tenants_stay_isolated() {
    let fabric = Fabric::new().await.unwrap();
    let cn_host = fabric.add_host("cnping").await.unwrap();
    let conc_a = fabric.add_host("cca").await.unwrap();
    let conc_b = fabric.add_host("ccb").await.unwrap();
    let gre_a = UserspaceGre::start(conc_a.netlink().clone(), Some(conc_a.path()))
        .await
        .unwrap();
    let gre_b = UserspaceGre::start(conc_b.netlink().clone(), Some(conc_b.path()))
        .await
        .unwrap();
    // Both tenants use 172.16.0.0/24 (same tunnel key); each has its own concentrator.
    let gw_a = concentrator_end(&conc_a, &gre_a, cn_host.ip(), "a", "172.16.0.10").await;
    let gw_b = concentrator_end(&conc_b, &gre_b, cn_host.ip(), "b", "172.16.0.20").await;

    let cn = Arc::new(cn_on(&cn_host, BackendChoice::Userspace).await.unwrap());
    let mut containers = Vec::new();
    for (i, (tenant, conc, conc_ip)) in [
        ("t1", "ca", conc_a.ip()),
        ("t1", "ca", conc_a.ip()),
        ("t2", "cb", conc_b.ip()),
    ]
    .into_iter()
    .enumerate()
    {
        let ip = format!("172.16.0.{}", 2 + i);
        let (ns, netns) = container(&format!("ct{i}"), &ip);
        let mut cfg = vnic(
            &format!("v{i}"),
            tenant,
            conc,
            conc_ip,
            &format!("02:00:ac:10:00:0{}", 2 + i),
        );
        cfg.netns = Some(netns);
        let created = cn.create_vnic(&cfg, None).await.unwrap();
        assert_eq!(created.vnic.peer.as_deref(), Some("eth0"));
        containers.push(Workload {
            ns,
            ip: ip.parse().unwrap(),
        });
    }
    let (c0, c1, c2) = (&containers[0], &containers[1], &containers[2]);
    // Tenant 1's two containers reach tenant 1's concentrator side and each other.
    assert!(c0.ping(gw_a.ip, 3), "t1 container 0 → concentrator A");
    assert!(c1.ping(gw_a.ip, 3), "t1 container 1 → concentrator A");
    assert!(c0.ping(c1.ip, 2), "t1 containers to each other");
    assert!(gw_a.ping(c1.ip, 2), "concentrator A → t1 container");
    // Tenant 2 reaches only its own concentrator.
    assert!(c2.ping(gw_b.ip, 3), "t2 container → concentrator B");
    assert!(
        !c2.ping(gw_a.ip, 2),
        "t2 must not reach tenant 1's concentrator"
    );
    assert!(
        !c0.ping(gw_b.ip, 2),
        "t1 must not reach tenant 2's concentrator"
    );
    assert!(
        !c2.ping(c0.ip, 2),
        "t2 must not reach a t1 container on the same node"
    );
    // Two bridges, two tunnels on the CN.
    assert_eq!(cn.subnets().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_make_one_bridge_and_one_tunnel() {
    let fabric = Fabric::new().await.unwrap();
    let host = fabric.add_host("cnconc").await.unwrap();
    let cn = Arc::new(cn_on(&host, BackendChoice::Userspace).await.unwrap());
    let conc_ip: Ipv4Addr = "10.254.0.200".parse().unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let cn = cn.clone();
        tasks.push(tokio::spawn(async move {
            let cfg = vnic(
                &format!("v{i}"),
                "t1",
                "c1",
                conc_ip,
                &format!("02:00:ac:10:00:{:02x}", i + 2),
            );
            cn.create_vnic(&cfg, None).await.unwrap()
        }));
    }
    let mut adds = 0;
    let mut bridges = std::collections::HashSet::new();
    for t in tasks {
        let c = t.await.unwrap();
        adds += usize::from(c.tunnel.is_some());
        bridges.insert(c.vnic.bridge.clone());
    }
    assert_eq!(adds, 1, "exactly one TunnelAdd");
    assert_eq!(bridges.len(), 1, "one bridge");
    let links = tenet_links(&host).await;
    let tunnels = links
        .iter()
        .filter(|(_, a)| a.starts_with("tenet:v1:tunnel"))
        .count();
    let bridge_links = links
        .iter()
        .filter(|(_, a)| a.starts_with("tenet:v1:cn-bridge"))
        .count();
    assert_eq!((tunnels, bridge_links, links.len()), (1, 1, 18));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_repairs_a_damaged_node_and_traffic_flows_again() {
    let fabric = Fabric::new().await.unwrap();
    let cn_host = fabric.add_host("cnrep").await.unwrap();
    let conc = fabric.add_host("ccrep").await.unwrap();
    let gre = UserspaceGre::start(conc.netlink().clone(), Some(conc.path()))
        .await
        .unwrap();
    let gw = concentrator_end(&conc, &gre, cn_host.ip(), "r", "172.16.0.10").await;

    let cn = cn_on(&cn_host, BackendChoice::Userspace).await.unwrap();
    let (ns, netns) = container("ctrep", "172.16.0.2");
    let mut cfg = vnic("v0", "t1", "cr", conc.ip(), "02:00:ac:10:00:02");
    cfg.netns = Some(netns);
    let made = cn.create_vnic(&cfg, None).await.unwrap();
    let ct = Workload {
        ns,
        ip: "172.16.0.2".parse().unwrap(),
    };
    assert!(ct.ping(gw.ip, 3), "before the damage");
    let tunnel = made.tunnel.unwrap();

    // The agent goes away; meanwhile the subnet's tunnel is deleted by hand and a VNIC is
    // left on no bridge.
    drop(cn);
    let nl = cn_host.netlink();
    let links = nl.links().await.unwrap();
    let tgt = links.iter().find(|l| l.name.starts_with("tgt_")).unwrap();
    nl.delete(tgt.index).await.unwrap();
    let orphan = nl
        .create(&NewLink::veth("tvn_0000beef", "tvp_0000beef"))
        .await
        .unwrap();
    nl.set_alias(
        orphan.index,
        "tenet:v1:cn-vnic id=lost role=container instance=lost",
    )
    .await
    .unwrap();
    assert!(!ct.ping(gw.ip, 1), "no tunnel, no traffic");

    let cn = cn_on(&cn_host, BackendChoice::Userspace).await.unwrap();
    let report = cn.rebuild().await.unwrap();
    assert_eq!((report.subnets, report.vnics), (1, 1));
    assert!(
        report
            .repairs
            .iter()
            .any(|r| matches!(r, tenet_cn::Repair::AddedTunnel { .. })),
        "{:?}",
        report.repairs
    );
    assert!(
        report
            .repairs
            .contains(&tenet_cn::Repair::RemovedVnicWithoutBridge {
                vnic_id: "lost".into(),
                ifname: "tvn_0000beef".into()
            })
    );
    assert_eq!(report.present.len(), 1);
    assert_eq!(report.present[0].subnet_key, tunnel.subnet_key);
    assert!(nl.link_by_name("tvn_0000beef").await.unwrap().is_none());
    assert!(ct.ping(gw.ip, 3), "the new tunnel carries the subnet again");
    assert!(cn.rebuild().await.unwrap().repairs.is_empty());

    // The rebuilt node knows the VNIC: a repeated create returns it, the destroy ends it all.
    let again = cn.create_vnic(&cfg, None).await.unwrap();
    assert_eq!(again.vnic.index, made.vnic.index);
    assert!(again.tunnel.is_none());
    let gone = cn.destroy_vnic(&cfg, None).await.unwrap();
    assert_eq!(gone.tunnel.map(|t| t.kind), Some(TunnelEventKind::Del));
    assert!(tenet_links(&cn_host).await.is_empty());
}
