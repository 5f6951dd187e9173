//! The §7.4/§7.5 vectors and the layout rules.

use super::*;
use crate::policy::calc::convert;
use crate::policy::selector::Selector;

fn config(hook: WorkloadHook) -> RenderConfig {
    RenderConfig::from_felix(hook, &BTreeMap::new())
}

fn routed() -> RenderConfig {
    config(WorkloadHook::Routed {
        prefixes: vec!["cali".into()],
    })
}

fn lines(json: &str) -> Vec<String> {
    lines_in(json, IpFamily::V4)
}

fn lines_in(json: &str, family: IpFamily) -> Vec<String> {
    let rule: crate::calico::Rule = serde_json::from_str(json).unwrap();
    render_rule(&convert(&rule, None), &routed().with_family(family))
        .into_iter()
        .map(|a| a.join(" "))
        .collect()
}

#[test]
fn the_ipv6_table_gets_ipv6_rules_only() {
    let v6 = |json: &str| lines_in(json, IpFamily::V6);
    assert_eq!(
        v6(r#"{"protocol":"icmpv6","!icmp_type":128,"action":"deny"}"#),
        ["-p icmpv6 -m icmp6 ! --icmpv6-type 128 -j DROP"]
    );
    assert!(v6(r#"{"action":"allow","protocol":"icmp","icmp_type":8}"#).is_empty());
    assert!(v6(r#"{"action":"allow","src_net":"10.0.0.0/8"}"#).is_empty());
    let web = ipset_name_in(&Selector::tag("web").ip_set_id(), IpFamily::V6);
    assert_eq!(
        v6(r#"{"action":"deny","src_tag":"web","!dst_net":"fd00::/64"}"#),
        [format!(
            "-m set --match-set {web} src ! -d fd00::/64 -j DROP"
        )]
    );
    assert!(web.starts_with("cali6-s:"));
    // Bridged IPv6 lets neighbour discovery through before policy.
    let state = state_with_endpoint("tvn_0000000a", &[], &[]);
    let rs = render(
        &state,
        &config(WorkloadHook::Bridged {
            prefixes: vec!["tvn_".into()],
        })
        .with_family(IpFamily::V6),
    );
    let chain = chain_lines(&rs, "cali-tw-tvn_0000000a");
    assert!(chain.contains(&"-p ipv6-icmp -m icmp6 --icmpv6-type 135 -j ACCEPT".to_string()));
    assert!(
        !chain.iter().any(|l| l.contains("--dport 68")),
        "no DHCPv4 rule in IPv6"
    );
}

#[test]
fn marks_come_from_the_low_end_of_the_mask() {
    let m = Marks::default();
    assert_eq!(
        (m.accept, m.pass, m.scratch0, m.scratch1),
        (0x1000000, 0x2000000, 0x4000000, 0x8000000)
    );
    let m = Marks::from_mask(0xf0).unwrap();
    assert_eq!((m.accept, m.scratch1), (0x10, 0x80));
    assert_eq!(Marks::from_mask(0x7), None);
    let c = RenderConfig::from_felix(
        WorkloadHook::Routed { prefixes: vec![] },
        &[("iptablesmarkmask".to_string(), "0xf0".to_string())].into(),
    );
    assert_eq!(c.marks.accept, 0x10);
}

#[test]
fn names_match_the_reference_vectors() {
    assert_eq!(policy_chain("my-policy", true), "cali-pi-my-policy");
    assert_eq!(
        policy_chain("allow-frontend-to-backend-policy", true),
        "cali-pi-_ZD35jJX3Vhx7Eex8ee-"
    );
    assert_eq!(
        to_endpoint_chain("cali1234567890a"),
        "cali-tw-cali1234567890a"
    );
    assert_eq!(
        from_endpoint_chain("cali1234567890a"),
        "cali-fw-cali1234567890a"
    );
    assert_eq!(
        ipset_name(&Selector::tag("foo").ip_set_id()),
        "cali4-s:wPJ6EfQfi_2n9KILmXT70Gn"
    );
    assert_eq!(
        ipset_name(&Selector::parse("role == 'db'").unwrap().ip_set_id()),
        "cali4-s:rV61RKD1Q8wo61pyeB0j2rw"
    );
    assert!(ipset_temp_name_in("s:abc", IpFamily::V4).starts_with("cali4ts:"));
    assert_eq!(ipset_name_in("s:abc", IpFamily::V6), "cali6-s:abc");
    assert!(policy_chain(&"x".repeat(40), false).len() <= MAX_CHAIN);
}

#[test]
fn rules_render_as_the_reference_vectors() {
    let frontend = ipset_name(&Selector::parse("role == \"frontend\"").unwrap().ip_set_id());
    assert_eq!(
        lines(
            r#"{"action":"allow","protocol":"tcp","src_selector":"role == 'frontend'","dst_ports":[80,"8080:8090"]}"#
        ),
        [
            format!(
                "-p tcp -m set --match-set {frontend} src -m multiport --destination-ports 80,8080:8090 -j MARK --set-mark 0x1000000/0x1000000"
            ),
            "-m mark --mark 0x1000000/0x1000000 -j RETURN".to_string(),
        ]
    );
    assert_eq!(
        lines(r#"{"action":"deny","protocol":"udp","!src_net":"10.0.0.0/8"}"#),
        ["-p udp ! -s 10.0.0.0/8 -j DROP"]
    );
    assert_eq!(
        lines(r#"{"action":"allow","protocol":"icmp","icmp_type":8,"icmp_code":0}"#)[0],
        "-p icmp -m icmp --icmp-type 8/0 -j MARK --set-mark 0x1000000/0x1000000"
    );
    assert!(lines(r#"{"protocol":"icmpv6","!icmp_type":128,"action":"deny"}"#).is_empty());
    assert_eq!(
        lines(r#"{"action":"log"}"#),
        ["-j LOG --log-prefix calico-packet:  --log-level 5"]
    );
    let db = ipset_name(&Selector::tag("db").ip_set_id());
    assert_eq!(
        lines(r#"{"action":"next-tier","dst_tag":"db"}"#),
        [
            format!("-m set --match-set {db} dst -j MARK --set-mark 0x2000000/0x2000000"),
            "-m mark --mark 0x2000000/0x2000000 -j RETURN".to_string(),
        ]
    );
    assert!(lines(r#"{"protocol":47,"action":"allow"}"#)[0].starts_with("-p 47 "));
    assert_eq!(
        lines(r#"{"protocol":"tcp","!dst_ports":[22],"action":"deny"}"#),
        ["-p tcp -m multiport ! --destination-ports 22 -j DROP"]
    );
    assert_eq!(
        lines(r#"{"action":"allow","src_nets":["10.0.0.0/8","192.168.0.0/16"]}"#),
        [
            "-j MARK --set-mark 0x0/0xc000000",
            "-s 10.0.0.0/8 -j MARK --set-mark 0x4000000/0x4000000",
            "-s 192.168.0.0/16 -j MARK --set-mark 0x4000000/0x4000000",
            "-m mark --mark 0x4000000/0x4000000 -j MARK --set-mark 0x1000000/0x1000000",
            "-m mark --mark 0x1000000/0x1000000 -j RETURN",
        ]
    );
    let ports: Vec<u16> = (1..=16).collect();
    let many = lines(&format!(
        r#"{{"action":"allow","protocol":"tcp","dst_ports":{ports:?}}}"#
    ));
    assert_eq!(many.len(), 4, "15 ports + 1 port: two allow pairs");
    assert!(many[2].contains("--destination-ports 16 "));
    // A v6-only rule, and a rule whose nets are all IPv6, are absent from the v4 table.
    assert!(lines(r#"{"action":"allow","ip_version":6}"#).is_empty());
    assert!(lines(r#"{"action":"allow","src_net":"fd00::/8"}"#).is_empty());
}

fn state_with_endpoint(name: &str, ingress: &[&str], profiles: &[&str]) -> DataplaneState {
    let mut s = DataplaneState::default();
    for p in ingress {
        s.policies.insert(p.to_string(), proto::Policy::default());
    }
    for p in profiles {
        s.profiles.insert(p.to_string(), proto::Profile::default());
    }
    s.workloads.insert(
        ("k8s".into(), "w".into(), name.into()),
        proto::WorkloadEndpoint {
            state: "active".into(),
            name: name.into(),
            profile_ids: profiles.iter().map(|p| p.to_string()).collect(),
            tiers: vec![proto::TierInfo {
                name: "default".into(),
                ingress_policies: ingress.iter().map(|p| p.to_string()).collect(),
                egress_policies: vec![],
            }],
            ..Default::default()
        },
    );
    s
}

fn chain_lines(rs: &Ruleset, chain: &str) -> Vec<String> {
    rs.rules(Table::Filter, chain)
        .unwrap_or_else(|| panic!("no chain {chain}"))
        .iter()
        .map(|r| r.args.join(" "))
        .collect()
}

#[test]
fn endpoint_chains_have_felixs_layout() {
    let state = state_with_endpoint("cali12345", &["web"], &["k8s_ns.default"]);
    let rs = render(&state, &routed());
    assert_eq!(
        chain_lines(&rs, "cali-tw-cali12345"),
        [
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-m conntrack --ctstate INVALID -j DROP",
            "-j MARK --set-mark 0x0/0x1000000",
            "-j MARK --set-mark 0x0/0x2000000",
            "-m mark --mark 0x0/0x2000000 -j cali-pi-web",
            "-m mark --mark 0x1000000/0x1000000 -j RETURN",
            "-m mark --mark 0x0/0x2000000 -j DROP",
            "-j cali-pri-k8s_ns.default",
            "-m mark --mark 0x1000000/0x1000000 -j RETURN",
            "-j DROP",
        ]
    );
    // No egress policy: straight to the profile.
    assert_eq!(
        chain_lines(&rs, "cali-fw-cali12345")[3],
        "-j cali-pro-k8s_ns.default"
    );
    // No policy and no profile: default deny.
    let bare = render(&state_with_endpoint("cali9", &[], &[]), &routed());
    assert_eq!(
        chain_lines(&bare, "cali-tw-cali9").last().unwrap(),
        "-j DROP"
    );
    let mut down = state_with_endpoint("cali9", &[], &[]);
    down.workloads.values_mut().next().unwrap().state = "inactive".into();
    assert_eq!(
        chain_lines(&render(&down, &routed()), "cali-tw-cali9"),
        ["-j DROP"]
    );
}

#[test]
fn dispatch_groups_by_common_prefix() {
    let mut state = DataplaneState::default();
    for n in ["cali1a", "cali1b", "cali2"] {
        state.workloads.insert(
            ("o".into(), n.into(), "e".into()),
            proto::WorkloadEndpoint {
                state: "active".into(),
                name: n.into(),
                ..Default::default()
            },
        );
    }
    let rs = render(&state, &routed());
    assert_eq!(
        chain_lines(&rs, "cali-from-wl-dispatch"),
        [
            "-i cali1+ -g cali-from-wl-dispatch-1",
            "-i cali2 -g cali-fw-cali2",
            "-j DROP"
        ]
    );
    assert_eq!(
        chain_lines(&rs, "cali-from-wl-dispatch-1"),
        [
            "-i cali1a -g cali-fw-cali1a",
            "-i cali1b -g cali-fw-cali1b",
            "-j DROP"
        ]
    );
    assert_eq!(
        chain_lines(&rs, "cali-to-wl-dispatch")[1],
        "-o cali2 -g cali-tw-cali2"
    );
    assert_eq!(
        chain_lines(&rs, "cali-INPUT")[1],
        "-i cali+ -g cali-wl-to-host"
    );
}

#[test]
fn bridged_workloads_are_hooked_by_their_bridge_port() {
    let state = state_with_endpoint("tvn_0000000a", &[], &["p"]);
    let rs = render(
        &state,
        &config(WorkloadHook::Bridged {
            prefixes: vec!["tvn_".into()],
        }),
    );
    assert_eq!(
        chain_lines(&rs, "cali-FORWARD")[..2],
        [
            "-m physdev --physdev-in tvn_+ --physdev-is-bridged -j cali-from-wl-dispatch",
            "-m physdev --physdev-out tvn_+ --physdev-is-bridged -j cali-to-wl-dispatch",
        ]
    );
    assert_eq!(
        chain_lines(&rs, "cali-to-wl-dispatch")[0],
        "-m physdev --physdev-out tvn_0000000a --physdev-is-bridged -g cali-tw-tvn_0000000a"
    );
    assert!(
        chain_lines(&rs, "cali-fw-tvn_0000000a")
            .contains(&"-p udp --sport 68 --dport 67 -j ACCEPT".to_string())
    );
    assert!(
        !chain_lines(&rs, "cali-INPUT")
            .iter()
            .any(|l| l.contains("wl-to-host")),
        "bridge ports carry no host traffic"
    );
    assert_eq!(rs.jumps.len(), 3, "FORWARD, INPUT and OUTPUT");
}

#[test]
fn host_endpoints_have_failsafe_chains_and_unknown_interfaces_pass() {
    let mut state = DataplaneState::default();
    state
        .profiles
        .insert("hostprof".into(), proto::Profile::default());
    state.host_endpoints.insert(
        "eth0-ep".into(),
        proto::HostEndpoint {
            name: "eth0".into(),
            profile_ids: vec!["hostprof".into()],
            ..Default::default()
        },
    );
    let mut felix = BTreeMap::new();
    felix.insert(
        "FailsafeInboundHostPorts".to_string(),
        "tcp:22, udp:68, bogus".to_string(),
    );
    let cfg = RenderConfig::from_felix(
        WorkloadHook::Routed {
            prefixes: vec!["cali".into()],
        },
        &felix,
    );
    let rs = render(&state, &cfg);
    assert_eq!(
        chain_lines(&rs, "cali-fh-eth0"),
        [
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            "-m conntrack --ctstate INVALID -j DROP",
            "-j cali-failsafe-in",
            "-j MARK --set-mark 0x0/0x1000000",
            "-j cali-pri-hostprof",
            "-m mark --mark 0x1000000/0x1000000 -j RETURN",
            "-j DROP",
        ]
    );
    assert_eq!(chain_lines(&rs, "cali-th-eth0")[2], "-j cali-failsafe-out");
    assert_eq!(chain_lines(&rs, "cali-th-eth0")[4], "-j cali-pro-hostprof");
    assert_eq!(
        chain_lines(&rs, "cali-failsafe-in"),
        ["-p tcp --dport 22 -j ACCEPT", "-p udp --dport 68 -j ACCEPT"]
    );
    assert_eq!(
        chain_lines(&rs, "cali-failsafe-out")[0],
        "-p tcp --dport 2379 -j ACCEPT"
    );
    assert_eq!(
        chain_lines(&rs, "cali-from-host-endpoint"),
        ["-i eth0 -g cali-fh-eth0"],
        "no drop: interfaces without a host endpoint are not policed"
    );
    assert_eq!(
        chain_lines(&rs, "cali-to-host-endpoint"),
        ["-o eth0 -g cali-th-eth0"]
    );
    let output = chain_lines(&rs, "cali-OUTPUT");
    assert_eq!(
        output[1], "-o cali+ -j RETURN",
        "host → workload is not policed"
    );
}

#[test]
fn base_chains_are_the_listed_ones() {
    let mut state = DataplaneState::default();
    state.zones.insert("tbr_1".into(), 3);
    for hook in [
        WorkloadHook::Routed {
            prefixes: vec!["cali".into()],
        },
        WorkloadHook::Bridged {
            prefixes: vec!["tvn_".into()],
        },
    ] {
        for (_, chain) in base(&state, &config(hook)).chains.keys() {
            assert!(BASE_CHAINS.contains(&chain.as_str()), "{chain}");
        }
    }
}
