//! The routed compute node in real namespaces: container and VM VNICs routed by /32 host
//! routes with proxy ARP, tenet's routes reconciled (unknown removed, missing restored), and
//! a restart that adopts finished VNICs and deletes a half-made one. Proven by pings.

use std::net::IpAddr;

use tenet::net::NewLink;
use tenet::testbed::{Fabric, Netns};
use tenet_cn::{RoutedNode, RoutedVnicConfig, VnicRole};

fn ping(ns: &Netns, dst: &str) -> bool {
    ns.command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "2", "-q", dst])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn container(id: &str, ip: &str, ns: &Netns) -> RoutedVnicConfig {
    RoutedVnicConfig {
        vnic_id: id.into(),
        tenant_id: "acme".into(),
        role: VnicRole::Container,
        addresses: vec![format!("{ip}/32").parse().unwrap()],
        mac: None,
        netns: Some(ns.path()),
        ifname: "eth0".into(),
        mtu: None,
        queues: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_vnics_are_reachable_reconciled_and_adopted() {
    let fabric = Fabric::new().await.unwrap();
    let host = fabric.add_host("rtcn").await.unwrap();
    let peer = fabric.add_host("rtpe").await.unwrap();
    // The host's default route (as any compute host has): proxy ARP needs a route to the
    // workloads' gateway. The peer routes the workloads' addresses to the host, as BGP would.
    host.run(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        &peer.ip().to_string(),
    ])
    .unwrap();
    peer.run(&[
        "ip",
        "route",
        "add",
        "10.65.0.0/26",
        "via",
        &host.ip().to_string(),
    ])
    .unwrap();

    let node = RoutedNode::init(host.netlink().clone(), Some(host.path()))
        .await
        .unwrap();
    let ws = Netns::create("rtw1").unwrap();
    let (v1, fds) = node
        .create_vnic(&container("v1", "10.65.0.3", &ws))
        .await
        .unwrap();
    assert!(fds.is_empty() && v1.ifname.starts_with("tvr_"));
    assert!(
        ping(&ws, &peer.ip().to_string()),
        "container → another host"
    );
    assert!(ping(peer.netns(), "10.65.0.3"), "another host → container");
    // The workload sees its /32 and a default route via the link-local gateway.
    let routes = ws.run(&["ip", "-4", "route"]).unwrap();
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    let addr = ws
        .run(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(addr.contains("10.65.0.3/32"), "{addr}");
    // The host side: no address, proxy ARP on, strict rp_filter.
    let host_addr = host
        .run(&["ip", "-4", "-o", "addr", "show", "dev", &v1.ifname])
        .unwrap();
    assert!(host_addr.trim().is_empty(), "{host_addr}");
    for (key, want) in [("proxy_arp", "1"), ("rp_filter", "1")] {
        let v = host
            .run(&[
                "sysctl",
                "-n",
                &format!("net.ipv4.conf.{}.{key}", v1.ifname),
            ])
            .unwrap();
        assert_eq!(v.trim(), want, "{key}");
    }

    // A repeat is the same VNIC; another VNIC id is another interface.
    let (again, _) = node
        .create_vnic(&container("v1", "10.65.0.3", &ws))
        .await
        .unwrap();
    assert_eq!(again, v1);

    // A VM's tap: its route and a permanent neighbour entry to the guest's MAC.
    let mut vm = container("v2", "10.65.0.4", &ws);
    vm.role = VnicRole::Vm;
    vm.netns = None;
    vm.mac = Some("02:00:0a:41:00:04".parse().unwrap());
    let (v2, queues) = node.create_vnic(&vm).await.unwrap();
    assert_eq!(queues.len(), 1);
    let neigh = host
        .run(&["ip", "neigh", "show", "dev", &v2.ifname])
        .unwrap();
    assert!(
        neigh.contains("10.65.0.4 lladdr 02:00:0a:41:00:04 PERMANENT"),
        "{neigh}"
    );
    drop(queues);

    // Bad input changes nothing.
    let before = host.netlink().links().await.unwrap().len();
    let mut bad = container("v3", "10.65.0.5", &ws);
    bad.addresses = vec!["10.65.0.0/26".parse().unwrap()];
    let e = node.create_vnic(&bad).await.unwrap_err();
    assert!(e.to_string().contains("single address"), "{e}");
    assert_eq!(host.netlink().links().await.unwrap().len(), before);

    // Reconcile: a stranger's route on tenet's interface goes; a deleted route comes back;
    // the kernel's own routes stay.
    host.run(&["ip", "route", "add", "10.99.0.0/24", "dev", &v1.ifname])
        .unwrap();
    host.run(&["ip", "route", "del", "10.65.0.4/32", "dev", &v2.ifname])
        .unwrap();
    host.run(&["ip", "neigh", "del", "10.65.0.3", "dev", &v1.ifname])
        .unwrap();
    let repair = node.reconcile().await.unwrap();
    assert_eq!(
        repair.removed,
        vec![format!("10.99.0.0/24 dev {}", v1.ifname)]
    );
    assert_eq!(
        repair.restored,
        vec![
            format!("neighbour 10.65.0.3 dev {}", v1.ifname),
            format!("route 10.65.0.4/32 dev {}", v2.ifname),
        ]
    );
    let routes = host.run(&["ip", "-4", "route"]).unwrap();
    assert!(
        !routes.contains("10.99.0.0/24") && routes.contains("10.65.0.4 dev"),
        "{routes}"
    );
    assert_eq!(
        node.reconcile().await.unwrap(),
        Default::default(),
        "a second pass finds nothing"
    );
    assert!(
        ping(peer.netns(), "10.65.0.3"),
        "still reachable after the repair"
    );

    // A restart: a new node adopts both VNICs from their aliases and deletes a link a
    // crashed create left without one.
    drop(node);
    host.netlink()
        .create(&NewLink::veth("tvr_0badf00d", "tvr_0badf00dp"))
        .await
        .unwrap();
    host.run(&["ip", "route", "del", "10.65.0.3/32", "dev", &v1.ifname])
        .unwrap();
    let node = RoutedNode::init(host.netlink().clone(), Some(host.path()))
        .await
        .unwrap();
    let mut ids: Vec<String> = node.vnics().into_iter().map(|v| v.vnic_id).collect();
    ids.sort();
    assert_eq!(ids, ["v1", "v2"]);
    assert!(
        host.netlink()
            .link_by_name("tvr_0badf00d")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        ping(peer.netns(), "10.65.0.3"),
        "the restart restored the missing route"
    );

    // Destroy: the link, its routes and neighbours go; a repeat succeeds.
    assert!(node.destroy_vnic("v1").await.unwrap().is_some());
    assert!(node.destroy_vnic("v1").await.unwrap().is_none());
    assert!(
        host.netlink()
            .link_by_name(&v1.ifname)
            .await
            .unwrap()
            .is_none()
    );
    let routes = host.run(&["ip", "-4", "route"]).unwrap();
    assert!(!routes.contains("10.65.0.3"), "{routes}");
    assert_eq!(
        node.addresses(),
        vec!["10.65.0.4".parse::<IpAddr>().unwrap()],
        "{:?}",
        node.vnics()
    );
    node.destroy_vnic("v2").await.unwrap();
}
