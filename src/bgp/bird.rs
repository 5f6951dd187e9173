//! BIRD 2 configuration rendered from a [`BgpModel`]: what calico/node's confd templates
//! produced for BIRD 1.x (§5), in BIRD 2's syntax — one daemon for both address families.
//!
//! Calico's behaviour kept: the node-to-node mesh from every host's `ip_addr_v4`/`ip_addr_v6`
//! (skipping this host), global and per-node peers, the protocol names `Mesh_`, `Global_` and
//! `Node_` that `node status` reads, this host's affine blocks announced as blackhole
//! aggregates with the addresses inside them suppressed, routes exported only inside the
//! pools, other hosts' routes imported into the kernel, `multihop` + `gateway recursive` so a
//! peer need not share a link.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use ipnetwork::IpNetwork;

use super::BgpError;
use super::model::BgpModel;
use crate::calico::{Asn, BgpPeer};

/// Choices that are the operator's, not the datastore's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BirdOptions {
    /// Interfaces BIRD's `direct` protocol must not read: the routed workload interfaces
    /// (their /32 routes reach BIRD through the kernel table instead, like Felix's routes).
    pub workload_prefix: String,
    /// BGP hold time: how long a silent peer keeps its routes. BIRD's default is 240 s.
    pub hold_time: Duration,
    pub keepalive_time: Duration,
    /// How long a peer's routes are kept after its session drops in a way that may be a
    /// restart (graceful restart); `None` turns graceful restart off.
    pub graceful_restart: Option<Duration>,
    /// How often BIRD rereads the kernel table and interfaces (Calico: 2 s).
    pub scan_time: Duration,
    /// How soon BIRD tries a failed or dropped session again (BIRD's default, 120 s, leaves
    /// a host that came back unreachable for two minutes; the error back-off doubles from
    /// here up to ten times it).
    pub connect_retry: Duration,
}

impl Default for BirdOptions {
    fn default() -> Self {
        BirdOptions {
            workload_prefix: "tvr".into(),
            hold_time: Duration::from_secs(90),
            keepalive_time: Duration::from_secs(30),
            graceful_restart: Some(Duration::from_secs(120)),
            scan_time: Duration::from_secs(2),
            connect_retry: Duration::from_secs(5),
        }
    }
}

/// The kind of a BGP session, by the name prefix Calico gives its protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerType {
    Mesh,
    Global,
    Node,
}

impl PeerType {
    pub fn prefix(self) -> &'static str {
        match self {
            PeerType::Mesh => "Mesh_",
            PeerType::Global => "Global_",
            PeerType::Node => "Node_",
        }
    }

    /// The words calicoctl prints in `node status`.
    pub fn describe(self) -> &'static str {
        match self {
            PeerType::Mesh => "node-to-node mesh",
            PeerType::Global => "global",
            PeerType::Node => "node specific",
        }
    }

    /// Splits a BIRD protocol name into its peer type and address, for the names this module
    /// writes; anything else is not a Calico peer.
    pub fn parse_protocol(name: &str) -> Option<(PeerType, IpAddr)> {
        [PeerType::Mesh, PeerType::Global, PeerType::Node]
            .into_iter()
            .find_map(|t| {
                let rest = name.strip_prefix(t.prefix())?;
                peer_address(rest).map(|ip| (t, ip))
            })
    }
}

/// `Mesh_10_0_0_2`, `Global_fd00__fe`: the protocol name of a session to `ip`.
pub fn protocol_name(kind: PeerType, ip: IpAddr) -> String {
    let text = ip.to_string().replace(['.', ':'], "_");
    format!("{}{text}", kind.prefix())
}

/// The address back from a protocol name's tail (`10_0_0_2`, `fd00__fe`).
fn peer_address(tail: &str) -> Option<IpAddr> {
    let dots = tail.replace('_', ".");
    if let Ok(ip @ IpAddr::V4(_)) = dots.parse() {
        return Some(ip);
    }
    tail.replace('_', ":").parse().ok()
}

/// Renders the whole configuration file. Fails if this host has no IPv4 address registered:
/// BIRD needs it as its router id (Calico's nodes always had one).
pub fn render(model: &BgpModel, options: &BirdOptions) -> Result<String, BgpError> {
    let own = model.own();
    let router_id = own
        .and_then(|h| h.ip_v4)
        .ok_or_else(|| BgpError::NoRouterId {
            host: model.host.clone(),
        })?;
    let own_v6 = own.and_then(|h| h.ip_v6);
    let local_as = model.local_as();
    let debug = match model.log_level() {
        Some("debug") => "debug all;",
        Some("none") => "",
        _ => "debug { states };",
    };
    let scan = options.scan_time.as_secs().max(1);

    let mut out = String::new();
    let o = &mut out;
    let _ = writeln!(
        o,
        "# BIRD 2 configuration of host {host}, rendered by tenet from etcd (the confd role).\n\
         # Do not edit: tenet rewrites it whenever the BGP keys, the pools or this host's\n\
         # block affinities change.\n",
        host = model.host
    );
    let _ = writeln!(o, "router id {router_id};");
    let _ = writeln!(o, "log stderr all;");
    // One token, so that `show protocols` splits on whitespace.
    let _ = writeln!(o, "timeformat protocol \"%FT%T\";");
    if !debug.is_empty() {
        let _ = writeln!(
            o,
            "debug protocols {};",
            &debug["debug ".len()..debug.len() - 1]
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "protocol device {{ scan time {scan}; }}");
    let _ = writeln!(
        o,
        "# Connected routes of the underlay, so that peers' next hops resolve (gateway recursive).\n\
         protocol direct {{ ipv4; ipv6; interface -\"{}*\", \"*\"; }}",
        options.workload_prefix
    );
    let gr = if options.graceful_restart.is_some() {
        " graceful restart;"
    } else {
        ""
    };
    for (name, family) in [("kernel4", "ipv4"), ("kernel6", "ipv6")] {
        // `learn`: the workload routes tenet adds (proto boot) come in from the kernel.
        // Device routes are the kernel's own and never go back.
        let _ = writeln!(
            o,
            "protocol kernel {name} {{ learn; persist; scan time {scan};{gr} \
             {family} {{ import all; export where source != RTS_DEVICE; }}; }}"
        );
    }
    let _ = writeln!(o);

    for (v6, family) in [(false, "ipv4"), (true, "ipv6")] {
        let suffix = if v6 { "6" } else { "4" };
        let blocks: Vec<&IpNetwork> = model.blocks.iter().filter(|b| b.is_ipv6() == v6).collect();
        let pools: Vec<&IpNetwork> = model.pools.iter().filter(|p| p.is_ipv6() == v6).collect();
        let _ = writeln!(
            o,
            "# IPv{} blocks affine to this host.",
            if v6 { 6 } else { 4 }
        );
        if !blocks.is_empty() {
            let _ = writeln!(o, "protocol static aggregates{suffix} {{\n  {family};");
            for b in &blocks {
                let _ = writeln!(o, "  route {b} blackhole;");
            }
            let _ = writeln!(o, "}}");
        }
        let _ = writeln!(
            o,
            "# Announce each block as a whole; the addresses inside it stay local."
        );
        let _ = writeln!(o, "function calico_aggr{suffix}() {{");
        for b in &blocks {
            let _ = writeln!(o, "  if ( net = {b} ) then {{ accept; }}");
            let _ = writeln!(o, "  if ( net ~ {b} ) then {{ reject; }}");
        }
        let _ = writeln!(o, "}}");
        let _ = writeln!(
            o,
            "filter calico_pools{suffix} {{\n  calico_aggr{suffix}();"
        );
        for p in &pools {
            let _ = writeln!(o, "  if ( net ~ {p} ) then {{ accept; }}");
        }
        let _ = writeln!(o, "  reject;\n}}\n");
    }

    let retry = options.connect_retry.as_secs().max(1);
    let timers = format!(
        "hold time {}; keepalive time {};\n  connect retry time {retry}; error wait time {retry}, {};",
        options.hold_time.as_secs().max(3),
        options.keepalive_time.as_secs().max(1),
        retry * 10
    );
    let gr_line = match options.graceful_restart {
        Some(t) => format!("graceful restart; graceful restart time {};", t.as_secs()),
        None => "graceful restart off;".to_string(),
    };
    let templates: [(&str, Option<IpAddr>); 2] = [
        ("4", Some(IpAddr::V4(router_id))),
        ("6", own_v6.map(IpAddr::V6)),
    ];
    for (suffix, source) in templates {
        let Some(source) = source else {
            let _ = writeln!(o, "# No IPv6 address on this host: no IPv6 sessions.\n");
            continue;
        };
        let family = if suffix == "4" { "ipv4" } else { "ipv6" };
        let _ = writeln!(
            o,
            "template bgp bgp_template{suffix} {{\n  {debug}\n  description \"Connection to BGP peer\";\n  \
             local {source} as {local_as};\n  multihop;\n  {timers}\n  {gr_line}\n  \
             {family} {{ gateway recursive; import all; export filter calico_pools{suffix}; \
             next hop self; add paths on; }};\n}}\n"
        );
    }

    render_mesh(o, model, router_id.into(), own_v6.map(IpAddr::V6));
    render_peers(
        o,
        "global",
        PeerType::Global,
        &model.global_peers,
        own_v6.is_some(),
    );
    let none = Vec::new();
    let node_peers = own.map_or(&none, |h| &h.peers);
    render_peers(
        o,
        "node-specific",
        PeerType::Node,
        node_peers,
        own_v6.is_some(),
    );
    Ok(out)
}

fn render_mesh(o: &mut String, model: &BgpModel, own_v4: IpAddr, own_v6: Option<IpAddr>) {
    let _ = writeln!(o, "# ------------- Node-to-node mesh -------------");
    if !model.mesh {
        let _ = writeln!(o, "# Node-to-node mesh disabled\n");
        return;
    }
    for (v6, own) in [(false, Some(own_v4)), (true, own_v6)] {
        let Some(own) = own else { continue };
        for (host, values) in &model.hosts {
            let ip = if v6 {
                values.ip_v6.map(IpAddr::V6)
            } else {
                values.ip_v4.map(IpAddr::V4)
            };
            let field = if v6 { "ip_addr_v6" } else { "ip_addr_v4" };
            let _ = writeln!(o, "# For peer /host/{host}/{field}");
            match ip {
                Some(ip) if ip == own || *host == model.host => {
                    let _ = writeln!(o, "# Skipping ourselves ({ip})");
                }
                Some(ip) => {
                    let as_num = values.as_num.unwrap_or(model.global_as);
                    session(o, PeerType::Mesh, ip, as_num);
                }
                None => {}
            }
        }
    }
    let _ = writeln!(o);
}

fn render_peers(o: &mut String, what: &str, kind: PeerType, peers: &[BgpPeer], v6: bool) {
    let _ = writeln!(o, "# ------------- {what} peers -------------");
    let usable: Vec<&BgpPeer> = peers.iter().filter(|p| p.ip.is_ipv4() || v6).collect();
    if usable.is_empty() {
        let _ = writeln!(o, "# No {what} peers configured.\n");
        return;
    }
    for p in usable {
        session(o, kind, p.ip, p.as_num);
    }
    let _ = writeln!(o);
}

fn session(o: &mut String, kind: PeerType, ip: IpAddr, as_num: Asn) {
    let template = if ip.is_ipv4() { "4" } else { "6" };
    let _ = writeln!(
        o,
        "protocol bgp {} from bgp_template{template} {{ neighbor {ip} as {as_num}; }}",
        protocol_name(kind, ip)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp::model::HostBgp;

    fn model() -> BgpModel {
        let mut m = BgpModel::new("a");
        let host = |v4: &str, v6: Option<&str>| HostBgp {
            ip_v4: Some(v4.parse().unwrap()),
            ip_v6: v6.map(|s| s.parse().unwrap()),
            ..Default::default()
        };
        m.hosts
            .insert("a".into(), host("10.0.0.1", Some("fd00::1")));
        m.hosts
            .insert("b".into(), host("10.0.0.2", Some("fd00::2")));
        m.hosts.insert("c".into(), host("10.0.0.3", None));
        m.hosts.get_mut("c").unwrap().as_num = Some(Asn(64600));
        m.pools = vec![
            "10.65.0.0/16".parse().unwrap(),
            "fd10::/64".parse().unwrap(),
        ];
        m.blocks = vec![
            "10.65.1.0/26".parse().unwrap(),
            "fd10::40/122".parse().unwrap(),
        ];
        m
    }

    #[test]
    fn mesh_skips_ourselves_and_uses_each_peers_as() {
        let text = render(&model(), &BirdOptions::default()).unwrap();
        assert!(text.contains("router id 10.0.0.1;"));
        assert!(text.contains("# Skipping ourselves (10.0.0.1)"));
        assert!(text.contains(
            "protocol bgp Mesh_10_0_0_2 from bgp_template4 { neighbor 10.0.0.2 as 64512; }"
        ));
        assert!(text.contains(
            "protocol bgp Mesh_10_0_0_3 from bgp_template4 { neighbor 10.0.0.3 as 64600; }"
        ));
        assert!(text.contains(
            "protocol bgp Mesh_fd00__2 from bgp_template6 { neighbor fd00::2 as 64512; }"
        ));
        assert!(!text.contains("Mesh_10_0_0_1 "));
        assert!(text.contains("local 10.0.0.1 as 64512;"));
        assert!(text.contains("local fd00::1 as 64512;"));
        assert!(text.contains("# No global peers configured."));
    }

    #[test]
    fn blocks_are_aggregated_and_exports_stay_inside_pools() {
        let text = render(&model(), &BirdOptions::default()).unwrap();
        assert!(text.contains("route 10.65.1.0/26 blackhole;"));
        assert!(text.contains("  if ( net = 10.65.1.0/26 ) then { accept; }\n  if ( net ~ 10.65.1.0/26 ) then { reject; }"));
        assert!(text.contains("filter calico_pools4 {\n  calico_aggr4();\n  if ( net ~ 10.65.0.0/16 ) then { accept; }\n  reject;\n}"));
        assert!(text.contains("route fd10::40/122 blackhole;"));
        assert!(text.contains("if ( net ~ fd10::/64 ) then { accept; }"));
        assert!(text.contains("interface -\"tvr*\", \"*\";"));
    }

    #[test]
    fn mesh_off_peers_and_log_levels() {
        let mut m = model();
        m.mesh = false;
        m.global_peers.push(BgpPeer {
            ip: "10.0.0.254".parse().unwrap(),
            as_num: Asn(65000),
        });
        m.hosts.get_mut("a").unwrap().peers.push(BgpPeer {
            ip: "fd00::fe".parse().unwrap(),
            as_num: Asn(65001),
        });
        m.global_log_level = Some("none".into());
        let text = render(&m, &BirdOptions::default()).unwrap();
        assert!(text.contains("# Node-to-node mesh disabled"));
        assert!(!text.contains("Mesh_"));
        assert!(text.contains(
            "protocol bgp Global_10_0_0_254 from bgp_template4 { neighbor 10.0.0.254 as 65000; }"
        ));
        assert!(text.contains(
            "protocol bgp Node_fd00__fe from bgp_template6 { neighbor fd00::fe as 65001; }"
        ));
        assert!(!text.contains("debug"));
        m.hosts.get_mut("a").unwrap().log_level = Some("debug".into());
        let text = render(&m, &BirdOptions::default()).unwrap();
        assert!(text.contains("debug protocols all;"));
    }

    #[test]
    fn a_host_without_ipv4_cannot_render() {
        let mut m = model();
        m.hosts.get_mut("a").unwrap().ip_v4 = None;
        assert!(matches!(
            render(&m, &BirdOptions::default()),
            Err(BgpError::NoRouterId { .. })
        ));
    }

    #[test]
    fn protocol_names_round_trip() {
        for (kind, ip) in [
            (PeerType::Mesh, "10.0.0.2"),
            (PeerType::Global, "fd00::fe"),
            (PeerType::Node, "192.168.1.254"),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let name = protocol_name(kind, ip);
            assert_eq!(PeerType::parse_protocol(&name), Some((kind, ip)), "{name}");
        }
        assert_eq!(PeerType::parse_protocol("kernel4"), None);
        assert_eq!(PeerType::parse_protocol("Mesh_x"), None);
    }
}
