//! The concentrator's edge as firewall rules: NAT out of the uplink for every tenant subnet,
//! port forwards (with hairpin from inside the tenant), floating IPs (1:1 DNAT in, SNAT out)
//! and the forwarding between the uplink and the tenant bridges. Pure: state → `Ruleset`.
//!
//! Chains (owner `TENET-CNCI`), each entered by one jump: `nat TENET-CNCI-FLOATING` and
//! `nat TENET-CNCI-PORTS` (from PREROUTING: floating-IP DNAT, port-forward DNAT; apart, so
//! that a floating-IP change does not rewrite 65,536 forwards), `nat TENET-CNCI-SNAT` (from
//! POSTROUTING: floating SNAT before hairpin and NAT out), `filter TENET-CNCI-FORWARD` (from
//! FORWARD). With iptables-nft, floating IPs are nftables map elements instead
//! ([`FloatingNat::NftMap`]): an assign is then a 2 ms map change, not a 15 ms rule commit.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnetwork::Ipv4Network;
use tenet::keyspace::cnci::{FloatingIp, PortForward, Protocol};
use tenet::net::firewall::{Rule, Ruleset, Table};
use tenet::types::gateway_of;

use crate::error::CnciError;

pub const OWNER: &str = "TENET-CNCI";

/// ciao's SSH forward port for an address: 33000 + ip[2]·256 + ip[3], refused from 65535 up
/// (from 172.x.127.23 on; ciao returned garbage there).
pub fn ciao_ssh_port(ip: Ipv4Addr) -> Result<u16, CnciError> {
    let o = ip.octets();
    let port = 33000u32 + u32::from(o[2]) * 256 + u32::from(o[3]);
    // ciao refused 65535 too.
    u16::try_from(port)
        .ok()
        .filter(|p| *p < u16::MAX)
        .ok_or_else(|| {
            CnciError::invalid(
                "ssh_forward",
                format!(
                    "{ip} has no ciao SSH port: 33000 + {}·256 + {} = {port}, not below 65535",
                    o[2], o[3]
                ),
            )
        })
}

/// Everything the edge rules are made from.
#[derive(Debug, Clone, Default)]
pub struct EdgeState {
    pub forwards: BTreeMap<(Protocol, u16), PortForward>,
    /// By public address.
    pub floating: BTreeMap<Ipv4Addr, FloatingIp>,
    /// The port-forward rules as last rendered; `None` once the forwards change. Tens of
    /// thousands of forwards are then not rendered again for every floating-IP change.
    pub ports_rules: Option<Arc<Vec<Rule>>>,
}

impl EdgeState {
    /// The floating IPs as public → private.
    pub fn floating_map(&self) -> tenet::net::firewall::natmap::Mappings {
        self.floating
            .values()
            .map(|f| (f.public_ip, f.private_ip))
            .collect()
    }

    /// Call after changing `forwards`.
    pub fn forwards_changed(&mut self) {
        self.ports_rules = None;
    }
}

/// A tenant subnet as the edge sees it.
#[derive(Debug, Clone)]
pub struct EdgeSubnet {
    pub subnet: Ipv4Network,
    pub bridge: String,
}

/// The uplink as the edge sees it.
#[derive(Debug, Clone)]
pub struct Uplink {
    pub ifname: String,
    pub addr: Ipv4Addr,
}

/// The port-forward DNAT rules.
pub fn render_ports(
    uplink: &Uplink,
    forwards: &BTreeMap<(Protocol, u16), PortForward>,
) -> Vec<Rule> {
    forwards
        .values()
        .map(|f| {
            let proto = f.protocol.to_string();
            // Matching the uplink address (not the interface) serves hairpin traffic from
            // the tenant too.
            Rule::new(
                format!(
                    "forward {proto} {} -> {}:{}",
                    f.external_port, f.internal_ip, f.internal_port
                ),
                [
                    "-d".to_string(),
                    format!("{}/32", uplink.addr),
                    "-p".into(),
                    proto.clone(),
                    "-m".into(),
                    proto,
                    "--dport".into(),
                    f.external_port.to_string(),
                    "-j".into(),
                    "DNAT".into(),
                    "--to-destination".into(),
                    format!("{}:{}", f.internal_ip, f.internal_port),
                ],
            )
        })
        .collect()
}

/// Where floating IPs are translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatingNat {
    /// A DNAT and an SNAT rule each, in `TENET-CNCI-FLOATING` and `TENET-CNCI-SNAT`.
    Rules,
    /// Elements of nftables maps ([`tenet::net::firewall::NatMap`]); no rules here.
    NftMap,
}

/// The edge's rules for `subnets` and `state` behind `uplink`. The port-forward rules are
/// rendered once and kept in `state` until the forwards change.
pub fn render(
    uplink: &Uplink,
    subnets: &[EdgeSubnet],
    state: &mut EdgeState,
    floating_nat: FloatingNat,
) -> Ruleset {
    let mut r = Ruleset::new(OWNER);
    let floating = r.chain(Table::Nat, "FLOATING", "PREROUTING");
    let ports = r.chain(Table::Nat, "PORTS", "PREROUTING");
    let post = r.chain(Table::Nat, "SNAT", "POSTROUTING");
    let fwd = r.chain(Table::Filter, "FORWARD", "FORWARD");
    let up = uplink.ifname.as_str();

    let floating_rules = match floating_nat {
        FloatingNat::Rules => state.floating.values().collect(),
        FloatingNat::NftMap => Vec::new(),
    };
    for f in floating_rules {
        let (public, private) = (f.public_ip, f.private_ip);
        r.push(
            Table::Nat,
            &floating,
            Rule::new(
                format!("floating {public} -> {private}"),
                [
                    "-d".to_string(),
                    format!("{public}/32"),
                    "-j".into(),
                    "DNAT".into(),
                    "--to-destination".into(),
                    private.to_string(),
                ],
            ),
        );
        r.push(
            Table::Nat,
            &post,
            Rule::new(
                format!("floating {private} -> {public}"),
                [
                    "-s".to_string(),
                    format!("{private}/32"),
                    "-o".into(),
                    up.into(),
                    "-j".into(),
                    "SNAT".into(),
                    "--to-source".into(),
                    public.to_string(),
                ],
            ),
        );
    }
    let ports_rules = state
        .ports_rules
        .get_or_insert_with(|| Arc::new(render_ports(uplink, &state.forwards)))
        .clone();
    r.set_rules(Table::Nat, &ports, ports_rules);
    for s in subnets {
        let net = s.subnet.to_string();
        let br = s.bridge.as_str();
        // Hairpin: a workload reaching another through the uplink address or a floating IP
        // is answered through the concentrator, so its source becomes the gateway.
        r.push(
            Table::Nat,
            &post,
            Rule::new(
                format!("hairpin {net}"),
                // By addresses, not `-o <bridge>`: with br_netfilter loaded, a routed packet
                // leaving through a bridge does not match its bridge as the out interface.
                [
                    "-s",
                    &net,
                    "-d",
                    &net,
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "DNAT",
                    "-j",
                    "SNAT",
                    "--to-source",
                    &gateway_of(&s.subnet).to_string(),
                ],
            ),
        );
        r.push(
            Table::Nat,
            &post,
            Rule::new(
                format!("nat out {net}"),
                ["-s", &net, "-o", up, "-j", "MASQUERADE"],
            ),
        );
        r.push(
            Table::Filter,
            &fwd,
            Rule::new(format!("out {net}"), ["-i", br, "-o", up, "-j", "ACCEPT"]),
        );
        r.push(
            Table::Filter,
            &fwd,
            Rule::new(
                format!("replies {net}"),
                [
                    "-i",
                    up,
                    "-o",
                    br,
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "RELATED,ESTABLISHED",
                    "-j",
                    "ACCEPT",
                ],
            ),
        );
        r.push(
            Table::Filter,
            &fwd,
            Rule::new(
                format!("forwarded in {net}"),
                [
                    "-i",
                    up,
                    "-o",
                    br,
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "DNAT",
                    "-j",
                    "ACCEPT",
                ],
            ),
        );
        r.push(
            Table::Filter,
            &fwd,
            Rule::new(
                format!("hairpin {net}"),
                ["-i", br, "-o", br, "-j", "ACCEPT"],
            ),
        );
        // Nothing else from outside reaches the tenant.
        r.push(
            Table::Filter,
            &fwd,
            Rule::new(format!("closed {net}"), ["-i", up, "-o", br, "-j", "DROP"]),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_ports_follow_ciao_and_refuse_overflow() {
        assert_eq!(ciao_ssh_port("172.16.0.2".parse().unwrap()).unwrap(), 33002);
        assert_eq!(
            ciao_ssh_port("172.16.127.22".parse().unwrap()).unwrap(),
            65534
        );
        let e = ciao_ssh_port("172.16.127.23".parse().unwrap()).unwrap_err();
        assert!(e.to_string().contains("65535"), "{e}");
    }

    #[test]
    fn the_edge_renders_nat_forwards_and_floating_ips() {
        let mut state = EdgeState::default();
        let fwd = PortForward {
            protocol: Protocol::Tcp,
            external_port: 2222,
            internal_ip: "172.16.0.5".parse().unwrap(),
            internal_port: 22,
        };
        state.forwards.insert((Protocol::Tcp, 2222), fwd);
        let fip = FloatingIp {
            public_ip: "192.0.2.50".parse().unwrap(),
            private_ip: "172.16.0.5".parse().unwrap(),
        };
        state.floating.insert(fip.public_ip, fip);
        let uplink = Uplink {
            ifname: "up0".into(),
            addr: "192.0.2.2".parse().unwrap(),
        };
        let subnets = [EdgeSubnet {
            subnet: "172.16.0.0/24".parse().unwrap(),
            bridge: "tcb_00000001".into(),
        }];
        let r = render(&uplink, &subnets, &mut state, FloatingNat::Rules);
        let lines: Vec<String> = r
            .chains
            .iter()
            .flat_map(|((_, c), rules)| rules.iter().map(|rule| r.rule_line(c, rule)))
            .collect();
        let has = |s: &str| lines.iter().any(|l| l.contains(s));
        assert!(has(
            "-d 192.0.2.50/32 -m comment --comment \"TENET-CNCI: floating 192.0.2.50 -> 172.16.0.5\" -j DNAT --to-destination 172.16.0.5"
        ));
        assert!(has(
            "-s 172.16.0.5/32 -o up0 -m comment --comment \"TENET-CNCI: floating 172.16.0.5 -> 192.0.2.50\" -j SNAT --to-source 192.0.2.50"
        ));
        assert!(has("-d 192.0.2.2/32 -p tcp -m tcp --dport 2222"));
        assert!(has(
            "-s 172.16.0.0/24 -o up0 -m comment --comment \"TENET-CNCI: nat out 172.16.0.0/24\" -j MASQUERADE"
        ));
        assert_eq!(r.jumps.len(), 4);
        // Floating SNAT comes before NAT out in POSTROUTING.
        let post = &r.chains[&(Table::Nat, "TENET-CNCI-SNAT".to_string())];
        assert!(post[0].object.starts_with("floating"));
    }
}
