//! Multi-host labs: each host is a namespace with an `eth0` on a shared underlay bridge that
//! lives in its own fabric namespace. Nothing in the lab has a route out of it.

use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};

use ipnetwork::{IpNetwork, Ipv4Network};

use super::{Netns, TestbedError, TestbedResult};
use crate::net::{NetResult, Netlink, NewLink, netns};

/// The underlay subnet; host n (from 1) gets .n.
const UNDERLAY: [u8; 3] = [10, 254, 0];
const UNDERLAY_PREFIX: u8 = 24;
const BRIDGE: &str = "fabric0";

/// The underlay switch. Dropping it deletes the fabric namespace (the hosts' cables with it).
pub struct Fabric {
    ns: Netns,
    netlink: Netlink,
    bridge: u32,
    mtu: u32,
    next: AtomicU8,
}

impl Fabric {
    /// A fabric with a 1500-byte underlay. Needs a tokio runtime.
    pub async fn new() -> TestbedResult<Self> {
        Self::with_mtu(1500).await
    }

    pub async fn with_mtu(mtu: u32) -> TestbedResult<Self> {
        let ns = Netns::create("fab")?;
        // The fabric stands in for a physical switch, which does not pass bridged frames
        // through iptables; br_netfilter would otherwise do so here.
        ns.run(&[
            "sh",
            "-c",
            "for t in iptables ip6tables arptables; do \
               f=/proc/sys/net/bridge/bridge-nf-call-$t; [ -e $f ] && echo 0 > $f; done; true",
        ])?;
        let netlink = ns.netlink()?;
        let bridge = netlink
            .create(&NewLink::bridge(BRIDGE).mtu(mtu).up())
            .await?
            .index;
        Ok(Fabric {
            ns,
            netlink,
            bridge,
            mtu,
            next: AtomicU8::new(1),
        })
    }

    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// Adds a host namespace cabled to the fabric: `eth0` with the next underlay address.
    pub async fn add_host(&self, label: &str) -> TestbedResult<Host> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        if n == 255 {
            return Err(TestbedError::Io {
                what: "add host".into(),
                source: std::io::Error::other("the fabric has room for 254 hosts"),
            });
        }
        let ns = Netns::create(label)?;
        let port = format!("p{n}");
        let cable = format!("c{n}");
        self.netlink
            .create(
                &NewLink::veth(&port, &cable)
                    .controller(self.bridge)
                    .mtu(self.mtu)
                    .up(),
            )
            .await?;
        let cable_index = self.netlink.index_of(&cable).await?;
        let target = ns.open()?;
        self.netlink
            .move_to_netns(cable_index, target.as_fd(), Some("eth0"))
            .await?;
        let netlink = ns.netlink()?;
        let eth0 = netlink.index_of("eth0").await?;
        let ip = Ipv4Addr::new(UNDERLAY[0], UNDERLAY[1], UNDERLAY[2], n);
        let net = Ipv4Network::new(ip, UNDERLAY_PREFIX).expect("valid prefix");
        netlink.add_address(eth0, IpNetwork::V4(net)).await?;
        netlink.set_mtu(eth0, self.mtu).await?;
        netlink.set_up(eth0).await?;
        Ok(Host {
            ns,
            netlink,
            ip,
            underlay: eth0,
        })
    }
}

/// A host of the lab.
pub struct Host {
    ns: Netns,
    netlink: Netlink,
    ip: Ipv4Addr,
    underlay: u32,
}

impl Host {
    pub fn name(&self) -> &str {
        self.ns.name()
    }
    pub fn netns(&self) -> &Netns {
        &self.ns
    }
    pub fn path(&self) -> PathBuf {
        self.ns.path()
    }
    /// The host's underlay address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }
    /// The underlay link (`eth0`).
    pub fn underlay(&self) -> u32 {
        self.underlay
    }
    /// A netlink connection inside the host.
    pub fn netlink(&self) -> &Netlink {
        &self.netlink
    }
    pub fn command(&self, program: &str) -> Command {
        self.ns.command(program)
    }
    pub fn run(&self, argv: &[&str]) -> TestbedResult<String> {
        self.ns.run(argv)
    }
    /// Runs `f` on a thread inside the host (to open sockets there).
    pub fn enter<T, F>(&self, f: F) -> NetResult<T>
    where
        T: Send + 'static,
        F: FnOnce() -> NetResult<T> + Send + 'static,
    {
        netns::run_in(Some(&self.path()), f)
    }

    /// A workload namespace (a container or VM stand-in) whose `eth0` is cabled by a veth to
    /// bridge `bridge` of this host, with address `addr` and MTU `mtu`.
    pub async fn add_workload(
        &self,
        label: &str,
        port: &str,
        bridge: u32,
        addr: Ipv4Network,
        mtu: u32,
    ) -> TestbedResult<Workload> {
        let ns = Netns::create(label)?;
        let peer = format!("{port}p");
        let peer = if peer.len() > crate::net::MAX_IFNAME {
            format!("{}p", &port[..crate::net::MAX_IFNAME - 1])
        } else {
            peer
        };
        self.netlink
            .create(&NewLink::veth(port, &peer).controller(bridge).mtu(mtu).up())
            .await?;
        let peer_index = self.netlink.index_of(&peer).await?;
        self.netlink
            .move_to_netns(peer_index, ns.open()?.as_fd(), Some("eth0"))
            .await?;
        let netlink = ns.netlink()?;
        let eth0 = netlink.index_of("eth0").await?;
        netlink.set_mtu(eth0, mtu).await?;
        netlink.add_address(eth0, IpNetwork::V4(addr)).await?;
        netlink.set_up(eth0).await?;
        Ok(Workload { ns, ip: addr.ip() })
    }
}

/// A workload namespace attached to a host bridge.
pub struct Workload {
    pub ns: Netns,
    pub ip: Ipv4Addr,
}

impl Workload {
    /// `ping -c count` to `dst`; true when every reply came back.
    pub fn ping(&self, dst: Ipv4Addr, count: u32) -> bool {
        self.ns
            .command("ping")
            .args(["-c", &count.to_string(), "-i", "0.2", "-W", "1", "-q"])
            .arg(dst.to_string())
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Runs `f` on a thread inside the workload namespace.
    pub fn enter<T, F>(&self, f: F) -> NetResult<T>
    where
        T: Send + 'static,
        F: FnOnce() -> NetResult<T> + Send + 'static,
    {
        netns::run_in(Some(&self.ns.path()), f)
    }
}
