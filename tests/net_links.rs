//! Every link primitive of `tenet::net` against the real kernel, inside throw-away namespaces.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsFd;

use ipnetwork::IpNetwork;
use tenet::net::tap::{TapOptions, open_tap_in};
use tenet::net::{GretapParams, MacvtapMode, NewLink, Route, VxlanParams};
use tenet::testbed::Netns;

fn details(ns: &Netns, name: &str) -> String {
    ns.run(&["ip", "-d", "link", "show", name]).unwrap()
}

#[tokio::test]
async fn bridge_veth_change_and_find() {
    let ns = Netns::create("prim").unwrap();
    let nl = ns.netlink().unwrap();

    let br = nl.create(&NewLink::bridge("tb0").up()).await.unwrap();
    assert_eq!(br.kind.as_deref(), Some("bridge"));
    assert!(br.up);
    let found = nl.link_by_name("tb0").await.unwrap().unwrap();
    assert_eq!(found.index, br.index);
    assert_eq!(
        nl.link_by_index(br.index).await.unwrap().unwrap().name,
        "tb0"
    );
    assert_eq!(nl.link_by_name("nope").await.unwrap(), None);

    let a = nl
        .create(
            &NewLink::veth("va", "vb")
                .controller(br.index)
                .mtu(1400)
                .up(),
        )
        .await
        .unwrap();
    assert_eq!(a.kind.as_deref(), Some("veth"));
    assert_eq!((a.controller, a.mtu, a.up), (Some(br.index), 1400, true));
    let b = nl.link_by_name("vb").await.unwrap().unwrap();
    assert_eq!(b.controller, None);

    nl.release(a.index).await.unwrap();
    assert_eq!(
        nl.link_by_index(a.index).await.unwrap().unwrap().controller,
        None
    );
    nl.enslave(a.index, br.index).await.unwrap();
    nl.set_mtu(a.index, 1300).await.unwrap();
    nl.set_mac(a.index, [0x02, 0, 0, 0, 0, 0x2a]).await.unwrap();
    nl.set_alias(a.index, "tenet:v1:vnic id=vm-1")
        .await
        .unwrap();
    nl.set_down(a.index).await.unwrap();
    let a2 = nl.link_by_index(a.index).await.unwrap().unwrap();
    assert_eq!(a2.controller, Some(br.index));
    assert_eq!(a2.mtu, 1300);
    assert_eq!(a2.mac, Some([0x02, 0, 0, 0, 0, 0x2a]));
    assert!(!a2.up);
    assert_eq!(
        nl.link_by_alias("tenet:v1:vnic id=vm-1")
            .await
            .unwrap()
            .unwrap()
            .index,
        a.index
    );
    let tenet_links = nl.links_with_alias_prefix("tenet:v1:").await.unwrap();
    assert_eq!(tenet_links.len(), 1);
    nl.set_up(a.index).await.unwrap();
    nl.rename(b.index, "vb-renamed").await.unwrap();
    assert!(nl.link_by_name("vb-renamed").await.unwrap().is_some());

    // The listing reports kind, alias, controller and state for every link.
    let all = nl.links().await.unwrap();
    let row = all.iter().find(|l| l.name == "va").unwrap();
    assert_eq!(row.alias.as_deref(), Some("tenet:v1:vnic id=vm-1"));
    assert_eq!(row.controller, Some(br.index));
    assert!(all.iter().any(|l| l.name == "lo" && l.kind.is_none()));

    // Move one end to another namespace, renamed on the way.
    let other = Netns::create("prim2").unwrap();
    nl.move_to_netns(b.index, other.open().unwrap().as_fd(), Some("eth7"))
        .await
        .unwrap();
    assert!(nl.link_by_name("vb-renamed").await.unwrap().is_none());
    let onl = other.netlink().unwrap();
    assert_eq!(
        onl.link_by_name("eth7")
            .await
            .unwrap()
            .unwrap()
            .kind
            .as_deref(),
        Some("veth")
    );

    nl.delete(a.index).await.unwrap();
    assert!(nl.link_by_name("va").await.unwrap().is_none());
    assert!(
        onl.link_by_name("eth7").await.unwrap().is_none(),
        "peer goes with it"
    );
}

#[tokio::test]
async fn addresses_routes_neighbours() {
    let ns = Netns::create("addr").unwrap();
    let nl = ns.netlink().unwrap();
    let br = nl.create(&NewLink::bridge("tb1").up()).await.unwrap();
    let addr: IpNetwork = "10.77.0.1/24".parse().unwrap();
    nl.add_address(br.index, addr).await.unwrap();
    nl.add_address(br.index, addr).await.unwrap(); // idempotent
    nl.add_address(br.index, "fd00::1/64".parse().unwrap())
        .await
        .unwrap();
    let have = nl.addresses(br.index).await.unwrap();
    assert!(have.contains(&addr), "{have:?}");
    assert!(have.contains(&"fd00::1/64".parse().unwrap()));
    assert_eq!(
        nl.link_of_address(IpAddr::V4(Ipv4Addr::new(10, 77, 0, 1)))
            .await
            .unwrap(),
        Some(br.index)
    );

    let route = Route {
        destination: "10.88.0.0/16".parse().unwrap(),
        gateway: Some(Ipv4Addr::new(10, 77, 0, 254)),
        dev: None,
        table: None,
    };
    nl.add_route(&route).await.unwrap();
    nl.add_route(&route).await.unwrap(); // replace, not an error
    let routes = nl.routes().await.unwrap();
    assert!(
        routes
            .iter()
            .any(|r| r.destination == route.destination && r.gateway == route.gateway),
        "{routes:?}"
    );
    assert!(
        ns.run(&["ip", "route"])
            .unwrap()
            .contains("10.88.0.0/16 via 10.77.0.254")
    );
    nl.del_route(&route).await.unwrap();
    nl.del_route(&route).await.unwrap(); // already gone: fine
    assert!(!ns.run(&["ip", "route"]).unwrap().contains("10.88.0.0/16"));

    let ip = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 9));
    let mac = [0x02, 0, 0x0a, 0x4d, 0, 9];
    nl.add_neighbour(br.index, ip, mac).await.unwrap();
    nl.add_neighbour(br.index, ip, mac).await.unwrap();
    let n = nl.neighbours(br.index).await.unwrap();
    let entry = n.iter().find(|e| e.ip == ip).unwrap();
    assert_eq!((entry.mac, entry.permanent), (Some(mac), true));
    assert!(
        ns.run(&["ip", "neigh"])
            .unwrap()
            .contains("10.77.0.9 dev tb1 lladdr 02:00:0a:4d:00:09 PERMANENT")
    );
    nl.del_neighbour(br.index, ip).await.unwrap();
    nl.del_neighbour(br.index, ip).await.unwrap();
    assert!(
        nl.neighbours(br.index)
            .await
            .unwrap()
            .iter()
            .all(|e| e.ip != ip)
    );

    nl.del_address(br.index, addr).await.unwrap();
    nl.del_address(br.index, addr).await.unwrap();
    assert!(!nl.addresses(br.index).await.unwrap().contains(&addr));
}

#[tokio::test]
async fn taps_macvtaps_and_vxlan() {
    let ns = Netns::create("tap").unwrap();
    let nl = ns.netlink().unwrap();
    let br = nl.create(&NewLink::bridge("tb2").up()).await.unwrap();

    // A persistent tap survives its descriptors and can be enslaved like any link.
    let fds = open_tap_in(Some(&ns.path()), "tap0", TapOptions::default()).unwrap();
    assert_eq!(fds.len(), 1);
    drop(fds);
    let tap = nl.link_by_name("tap0").await.unwrap().unwrap();
    assert_eq!(tap.kind.as_deref(), Some("tun"));
    nl.enslave(tap.index, br.index).await.unwrap();
    let d = details(&ns, "tap0");
    assert!(
        d.contains("tun type tap") && d.contains("persist on"),
        "{d}"
    );
    // Opening it again attaches to the same device.
    open_tap_in(Some(&ns.path()), "tap0", TapOptions::default()).unwrap();
    assert_eq!(
        nl.link_by_name("tap0").await.unwrap().unwrap().index,
        tap.index
    );

    // Multi-queue: one descriptor per queue, handed to the caller.
    let queues = open_tap_in(
        Some(&ns.path()),
        "tapmq",
        TapOptions {
            queues: 4,
            ..TapOptions::default()
        },
    )
    .unwrap();
    assert_eq!(queues.len(), 4);
    assert!(details(&ns, "tapmq").contains("multi_queue"));
    let err =
        open_tap_in(Some(&ns.path()), "tap-name-too-long", TapOptions::default()).unwrap_err();
    assert!(err.to_string().contains("tap-name-too-long"), "{err}");

    // macvtap in both modes, with its character device.
    let lower = nl.create(&NewLink::veth("lw0", "lw1").up()).await.unwrap();
    let mv = nl
        .create(&NewLink::macvtap("mvt0", lower.index, MacvtapMode::Bridge).up())
        .await
        .unwrap();
    assert_eq!(mv.kind.as_deref(), Some("macvtap"));
    assert!(details(&ns, "mvt0").contains("macvtap mode bridge"));
    let dev = mv.macvtap_device().unwrap();
    assert_eq!(
        dev,
        std::path::PathBuf::from(format!("/dev/tap{}", mv.index))
    );
    let vepa = nl
        .create(&NewLink::macvtap("mvt1", lower.index, MacvtapMode::Vepa))
        .await
        .unwrap();
    assert!(details(&ns, "mvt1").contains("macvtap mode vepa"));
    nl.delete(vepa.index).await.unwrap();

    let vx = nl
        .create(&NewLink::vxlan(
            "vx42",
            VxlanParams {
                vni: 42,
                local: Some(Ipv4Addr::new(10, 1, 1, 1)),
                remote: Some(Ipv4Addr::new(10, 1, 1, 2)),
                dev: None,
                port: 4789,
                learning: false,
            },
        ))
        .await
        .unwrap();
    assert_eq!(vx.kind.as_deref(), Some("vxlan"));
    let d = details(&ns, "vx42");
    assert!(
        d.contains("vxlan id 42 remote 10.1.1.2 local 10.1.1.1"),
        "{d}"
    );
    assert!(
        d.contains("dstport 4789") && d.contains("nolearning"),
        "{d}"
    );
    nl.delete(tap.index).await.unwrap();
    assert!(nl.link_by_name("tap0").await.unwrap().is_none());
}

#[tokio::test]
async fn errors_name_the_object_and_leave_nothing() {
    let ns = Netns::create("err").unwrap();
    let nl = ns.netlink().unwrap();
    let before = nl.links().await.unwrap().len();

    let e = nl
        .create(&NewLink::bridge("a-name-of-16-byt"))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "create bridge a-name-of-16-byt: interface name \"a-name-of-16-byt\" must be 1 to 15 bytes, not 16"
    );
    let e = nl
        .create(&NewLink::veth("ok", "bad/peer"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("bad/peer"), "{e}");

    nl.create(&NewLink::bridge("dup0")).await.unwrap();
    let e = nl.create(&NewLink::bridge("dup0")).await.unwrap_err();
    assert!(e.is_exists(), "{e}");
    assert!(e.to_string().starts_with("create bridge dup0: "), "{e}");

    let e = nl.set_mtu(999_999, 1400).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(e.to_string().contains("link #999999"), "{e}");
    let e = nl.enslave(999_999, 1).await.unwrap_err();
    assert!(e.to_string().starts_with("enslave link #999999"), "{e}");
    let e = nl.set_alias(1, &"x".repeat(300)).await.unwrap_err();
    assert!(e.to_string().contains("at most 255"), "{e}");

    // No GRE in this kernel: the gretap request is refused and nothing is left behind.
    let e = nl
        .create(&NewLink::gretap(
            "gt0",
            GretapParams {
                local: Ipv4Addr::new(10, 0, 0, 1),
                remote: Ipv4Addr::new(10, 0, 0, 2),
                key: 4268,
                ttl: 0,
            },
        ))
        .await
        .unwrap_err();
    assert!(e.is_unsupported(), "{e}");
    assert!(e.to_string().starts_with("create gretap gt0: "), "{e}");
    assert_eq!(
        nl.links().await.unwrap().len(),
        before + 1,
        "only dup0 was made"
    );
}

#[tokio::test]
async fn batch_delete_by_group() {
    let ns = Netns::create("grp").unwrap();
    let nl = ns.netlink().unwrap();
    let br = nl.create(&NewLink::bridge("tb3").up()).await.unwrap();
    let links: Vec<NewLink> = (0..50)
        .map(|i| {
            NewLink::veth(format!("g{i}a"), format!("g{i}b"))
                .controller(br.index)
                .up()
        })
        .collect();
    nl.create_many(&links).await.unwrap();
    let made: Vec<u32> = nl
        .links()
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.name.starts_with('g'))
        .map(|l| l.index)
        .collect();
    assert_eq!(made.len(), 100);
    // Include an index that does not exist: it is skipped, not an error.
    let mut doomed: Vec<u32> = made.clone();
    doomed.push(999_999);
    nl.delete_many(&doomed).await.unwrap();
    let left: Vec<String> = nl
        .links()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(left, vec!["lo".to_string(), "tb3".to_string()]);
    assert!(
        nl.delete_group(0)
            .await
            .unwrap_err()
            .to_string()
            .contains("group 0")
    );
}

#[tokio::test]
async fn a_bridge_hands_its_traffic_to_iptables_when_asked() {
    let ns = Netns::create("nfcall").unwrap();
    let nl = ns.netlink().unwrap();
    let br = nl.create_index(&NewLink::bridge("tbr_nf")).await.unwrap();
    assert!(details(&ns, "tbr_nf").contains("nf_call_iptables 0"));
    nl.set_bridge_nf_call(br, true).await.unwrap();
    let d = details(&ns, "tbr_nf");
    assert!(
        d.contains("nf_call_iptables 1") && d.contains("nf_call_ip6tables 1"),
        "{d}"
    );
    nl.set_bridge_nf_call(br, false).await.unwrap();
    assert!(details(&ns, "tbr_nf").contains("nf_call_iptables 0"));
}

/// The kernel runs one dump at a time per netlink socket and answers a second with EBUSY
/// (`Device or resource busy`): a connection's concurrent dumps — links, addresses,
/// routes, neighbours, from tasks that share it — take turns instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_dumps_on_one_connection_take_turns() {
    let ns = Netns::create("dumps").unwrap();
    let nl = ns.netlink().unwrap();
    let br = nl.create(&NewLink::bridge("td1").up()).await.unwrap();
    nl.add_address(br.index, "10.78.0.1/24".parse().unwrap())
        .await
        .unwrap();
    for i in 0..50 {
        nl.create(&NewLink::bridge(format!("td-{i}")))
            .await
            .unwrap();
    }
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let nl = nl.clone();
            tokio::spawn(async move {
                match i % 4 {
                    0 => nl.links().await.map(|l| l.len()),
                    1 => nl
                        .link_of_address(IpAddr::V4(Ipv4Addr::new(10, 78, 0, 1)))
                        .await
                        .map(|i| i.map_or(0, |_| 1)),
                    2 => nl.routes().await.map(|r| r.len()),
                    _ => nl.neighbour_table().await.map(|n| n.len()),
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
}
