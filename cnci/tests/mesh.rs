//! The tenant mesh between concentrators (ciao's RefreshCNCI), in namespaces: tenant A has
//! 172.16.0.0/24 on concentrator 1 and 172.17.0.0/24 on concentrator 2; tenant B has its own
//! concentrator with 172.16.0.0/24, overlapping A's. A's subnets reach each other through the
//! mesh; B reaches neither.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;

use common::*;
use ipnetwork::Ipv4Network;
use tenet::keyspace::cnci::{Mesh, MeshPeer};
use tenet::net::tunnel::BackendChoice;
use tenet::store::Datastore;
use tenet::testbed::{EtcdServer, Fabric};
use tenet_cnci::{CnciError, Concentrator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_concentrators_route_between_its_subnets_only() {
    let etcd = EtcdServer::start().await.unwrap();
    let store: Arc<dyn Datastore> = Arc::new(etcd.store().await.unwrap());
    let fabric = Fabric::new().await.unwrap();
    let cn_host = fabric.add_host("cn").await.unwrap();
    let h1 = fabric.add_host("conc").await.unwrap();
    let h2 = fabric.add_host("conc").await.unwrap();
    let h3 = fabric.add_host("conc").await.unwrap();
    let (r1, r2, r3) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let c1 = conc_on(cnci_config(&h1, "a1", "A", r1.path()), &store).await;
    let c2 = conc_on(cnci_config(&h2, "a2", "A", r2.path()), &store).await;
    let c3 = conc_on(cnci_config(&h3, "b1", "B", r3.path()), &store).await;
    let cn = cn_on(&cn_host, "cn-1", BackendChoice::Userspace).await;
    let dhcp = DhcpClient::new();

    let net_a1: Ipv4Network = "172.16.0.0/24".parse().unwrap();
    let net_a2: Ipv4Network = "172.17.0.0/24".parse().unwrap();
    // A workload in A's first subnet, one in A's second (served by a2), one of B.
    let a1 = workload(
        &cn,
        &cn_host,
        "wa1",
        "A",
        ("a1", h1.ip()),
        "02:00:00:00:00:a1",
    )
    .await;
    let a2 = workload_in(
        &cn,
        &cn_host,
        "wa2",
        "A",
        net_a2,
        ("a2", h2.ip()),
        "02:00:00:00:00:a2",
    )
    .await;
    let b = workload(
        &cn,
        &cn_host,
        "wb",
        "B",
        ("b1", h3.ip()),
        "02:00:00:00:00:b1",
    )
    .await;
    let (ip_a1, ip_a2, ip_b): (Ipv4Addr, Ipv4Addr, Ipv4Addr) = (
        "172.16.0.5".parse().unwrap(),
        "172.17.0.5".parse().unwrap(),
        "172.16.0.6".parse().unwrap(),
    );
    put_endpoint(&store, "cn-1", "wa1", "A", a1.mac, ip_a1).await;
    put_endpoint(&store, "cn-1", "wa2", "A", a2.mac, ip_a2).await;
    let rev = put_endpoint(&store, "cn-1", "wb", "B", b.mac, ip_b).await;
    c1.attach_remote_subnet(&remote(a1.vnic.tunnel.as_ref().unwrap()))
        .await
        .unwrap();
    c2.attach_remote_subnet(&remote(a2.vnic.tunnel.as_ref().unwrap()))
        .await
        .unwrap();
    c3.attach_remote_subnet(&remote(b.vnic.tunnel.as_ref().unwrap()))
        .await
        .unwrap();
    for c in [&c1, &c2, &c3] {
        synced(c, rev).await;
    }
    assert_eq!(dhcp.lease(&a1.ns, 3).unwrap().ip, ip_a1);
    assert_eq!(dhcp.lease(&a2.ns, 3).unwrap().ip, ip_a2);
    assert_eq!(dhcp.lease(&b.ns, 3).unwrap().ip, ip_b);
    assert!(!ping(&a1.ns, ip_a2), "no mesh yet");

    let mesh = Mesh {
        cidr: "10.99.0.0/29".parse().unwrap(),
        peers: vec![
            MeshPeer {
                id: "a1".into(),
                underlay_ip: h1.ip(),
                mesh_ip: "10.99.0.1".parse().unwrap(),
                subnets: vec![net_a1],
            },
            MeshPeer {
                id: "a2".into(),
                underlay_ip: h2.ip(),
                mesh_ip: "10.99.0.2".parse().unwrap(),
                subnets: vec![net_a2],
            },
        ],
    };
    let change = c1.update_mesh(&mesh).await.unwrap();
    assert_eq!(change.added, ["a2"]);
    c2.update_mesh(&mesh).await.unwrap();
    assert!(
        ping(&a1.ns, ip_a2),
        "A's subnets reach each other through the mesh"
    );
    assert!(ping(&a2.ns, ip_a1));
    assert!(!ping(&b.ns, ip_a2), "B must not reach A's other subnet");
    assert!(
        !ping(&b.ns, ip_a1),
        "nor A's workload with B's own address range"
    );

    // The same list again changes nothing; a list without this concentrator is refused.
    assert_eq!(c1.update_mesh(&mesh).await.unwrap(), Default::default());
    let without_me = Mesh {
        peers: vec![mesh.peers[1].clone()],
        ..mesh.clone()
    };
    let e = c1.update_mesh(&without_me).await.unwrap_err();
    assert!(
        matches!(&e, CnciError::Invalid { field: "peers", .. }),
        "{e}"
    );
    assert!(ping(&a1.ns, ip_a2), "a refused update changes nothing");

    // A restarted concentrator restores its mesh from etcd, adopting the tunnel.
    let tunnels_before = c1.mesh_peers().await;
    let config = c1.config().clone();
    drop(c1);
    let c1 = Concentrator::init(config, Some(store.clone()))
        .await
        .unwrap();
    c1.rebuild().await.unwrap();
    assert_eq!(c1.mesh_peers().await, tunnels_before, "adopted, not remade");
    assert!(ping(&a1.ns, ip_a2));

    // a2 leaves the mesh: exactly its link goes.
    let alone = Mesh {
        peers: vec![mesh.peers[0].clone()],
        ..mesh.clone()
    };
    let change = c1.update_mesh(&alone).await.unwrap();
    assert_eq!(change.removed, ["a2"]);
    assert!(!ping(&a1.ns, ip_a2));

    for c in [&c1, &c2, &c3] {
        c.reset().await.unwrap();
    }
    let left = h1.run(&["ip", "-o", "link"]).unwrap();
    assert!(!left.contains("tcm_"), "{left}");
}
