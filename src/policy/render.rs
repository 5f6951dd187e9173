//! Dataplane state → Calico's iptables chains and IP-set names (reference §3.4, §3.5).
//! Pure: the result is a [`Ruleset`] of owner `cali` for `net::firewall` to apply.
//!
//! Chain names, mark bits, the endpoint chain layout, the dispatch tree and the rule
//! fragments are Felix's. Two hooks for workloads:
//! * [`WorkloadHook::Bridged`] (GRE/VXLAN mode): VNICs are ports of tenant bridges, so the
//!   endpoint chains are entered from FORWARD by `physdev` matches on the port
//!   (br_netfilter). Two workloads on one bridge are policed too. DHCP between a workload and
//!   its concentrator is always let through (tenet's counterpart of Felix's OpenStack DHCP
//!   allowance), or a workload with a strict policy could never get its address.
//! * [`WorkloadHook::Routed`]: the workload interfaces, as Felix does (`-i`/`-o`), with
//!   workload → host traffic through `cali-wl-to-host`.
//!
//! Each family is rendered on its own (`RenderConfig::family`): a rule for the other IP
//! version is skipped, CIDRs of the other family filtered out (a rule whose list empties is
//! skipped), sets are `cali4-`/`cali6-`, ICMP matches `icmp`/`icmp6`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use crate::net::firewall::{IpFamily, Rule, Ruleset, Table};
use crate::policy::proto;

/// ICMPv6 types that must pass for IPv6 to work at all (MLD 130–132, router and neighbour
/// discovery 133–136), as Felix lets them to the host.
pub const ICMPV6_ND: [&str; 7] = ["130", "131", "132", "133", "134", "135", "136"];

/// The owner of every chain rendered here (so chains are `cali-…`).
pub const OWNER: &str = "cali";
/// Longest chain name Felix makes.
pub const MAX_CHAIN: usize = 28;
/// Longest IP-set name the kernel takes.
pub const MAX_IPSET: usize = 31;

/// The mark bits, from the low end of `IptablesMarkMask`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Marks {
    pub accept: u32,
    pub pass: u32,
    pub scratch0: u32,
    pub scratch1: u32,
}

impl Marks {
    /// Felix's allocation from a mask; `None` if it has fewer than four bits.
    pub fn from_mask(mask: u32) -> Option<Marks> {
        let bits: Vec<u32> = (0..32)
            .map(|i| 1u32 << i)
            .filter(|b| mask & b != 0)
            .take(4)
            .collect();
        match bits[..] {
            [accept, pass, scratch0, scratch1] => Some(Marks {
                accept,
                pass,
                scratch0,
                scratch1,
            }),
            _ => None,
        }
    }
}

impl Default for Marks {
    fn default() -> Self {
        Marks::from_mask(0xff00_0000).expect("eight bits")
    }
}

/// Go's `%#x`.
fn hex(v: u32) -> String {
    format!("{v:#x}")
}

/// How workload traffic reaches the endpoint chains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkloadHook {
    /// Bridge ports whose names start with one of the prefixes (`tvn_`).
    Bridged { prefixes: Vec<String> },
    /// Routed interfaces whose names start with one of the prefixes (`cali`).
    Routed { prefixes: Vec<String> },
}

/// What the rendering depends on besides the dataplane state (Felix config, §1.11).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderConfig {
    pub hook: WorkloadHook,
    pub marks: Marks,
    pub log_prefix: String,
    /// `DROP`, `ACCEPT` or `RETURN`: workload → host traffic after egress policy.
    pub default_endpoint_to_host: String,
    /// The table family being rendered (Felix renders each ruleset once per family).
    pub family: IpFamily,
    /// `FailsafeInboundHostPorts` / `FailsafeOutboundHostPorts` when configured.
    pub failsafe: BTreeMap<String, String>,
}

impl RenderConfig {
    /// From Felix's merged configuration; names are case-insensitive, bad values fall back
    /// to Felix's defaults.
    pub fn from_felix(hook: WorkloadHook, config: &BTreeMap<String, String>) -> RenderConfig {
        let get = |name: &str| {
            config
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
        };
        let marks = get("IptablesMarkMask")
            .and_then(|m| {
                let m = m.trim_start_matches("0x");
                u32::from_str_radix(m, 16).ok()
            })
            .and_then(Marks::from_mask)
            .unwrap_or_default();
        let action = get("DefaultEndpointToHostAction")
            .map(|a| a.to_ascii_uppercase())
            .filter(|a| matches!(a.as_str(), "DROP" | "ACCEPT" | "RETURN"))
            .unwrap_or_else(|| "DROP".into());
        RenderConfig {
            hook,
            marks,
            log_prefix: get("LogPrefix").unwrap_or_else(|| "calico-packet".into()),
            default_endpoint_to_host: action,
            family: IpFamily::V4,
            failsafe: ["FailsafeInboundHostPorts", "FailsafeOutboundHostPorts"]
                .into_iter()
                .filter_map(|k| Some((k.to_string(), get(k)?)))
                .collect(),
        }
    }

    /// The same configuration for the other family's tables.
    pub fn with_family(mut self, family: IpFamily) -> RenderConfig {
        self.family = family;
        self
    }

    fn set_name(&self, id: &str) -> String {
        ipset_name_in(id, self.family)
    }
}

/// The state the dataplane driver keeps from the messages.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DataplaneState {
    pub ipsets: BTreeMap<String, BTreeSet<String>>,
    pub policies: BTreeMap<String, proto::Policy>,
    pub profiles: BTreeMap<String, proto::Profile>,
    /// By (orchestrator, workload, endpoint).
    pub workloads: BTreeMap<(String, String, String), proto::WorkloadEndpoint>,
    /// By endpoint id.
    pub host_endpoints: BTreeMap<String, proto::HostEndpoint>,
    pub config: BTreeMap<String, String>,
    /// Bridged mode: each tenant bridge holding a workload and its conntrack zone. Tenants
    /// may reuse addresses, so each bridge's connections are tracked apart; otherwise one
    /// tenant's packet could match another's connection and pass as established.
    pub zones: BTreeMap<String, u16>,
}

/// A chain name: `prefix + suffix`, or, when that is too long, `prefix + "_" +` as much of
/// base64url(SHA-256(suffix)) as fits in 28 characters (Felix's rule).
pub fn chain_name(prefix: &str, suffix: &str) -> String {
    let len = prefix.len() + suffix.len();
    if len < MAX_CHAIN || (len == MAX_CHAIN && !suffix.starts_with('_')) {
        return format!("{prefix}{suffix}");
    }
    let hash = URL_SAFE_NO_PAD.encode(Sha256::digest(suffix.as_bytes()));
    let room = MAX_CHAIN - 1 - prefix.len();
    format!("{prefix}_{}", &hash[..room])
}

/// The kernel name of an IP set (IPv4 family).
pub fn ipset_name(id: &str) -> String {
    ipset_name_in(id, IpFamily::V4)
}

fn family_digit(family: IpFamily) -> char {
    match family {
        IpFamily::V4 => '4',
        IpFamily::V6 => '6',
    }
}

/// The kernel name of an IP set of a family: `cali4-<id>` / `cali6-<id>`, cut to 31.
pub fn ipset_name_in(id: &str, family: IpFamily) -> String {
    let name = format!("cali{}-{id}", family_digit(family));
    name[..name.len().min(MAX_IPSET)].to_string()
}

/// The temporary name a set is built under before it is swapped in.
pub fn ipset_temp_name_in(id: &str, family: IpFamily) -> String {
    let name = format!("cali{}t{id}", family_digit(family));
    name[..name.len().min(MAX_IPSET)].to_string()
}

pub fn policy_chain(name: &str, inbound: bool) -> String {
    chain_name(if inbound { "cali-pi-" } else { "cali-po-" }, name)
}

pub fn profile_chain(name: &str, inbound: bool) -> String {
    chain_name(if inbound { "cali-pri-" } else { "cali-pro-" }, name)
}

pub fn to_endpoint_chain(iface: &str) -> String {
    chain_name("cali-tw-", iface)
}

pub fn from_endpoint_chain(iface: &str) -> String {
    chain_name("cali-fw-", iface)
}

fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

fn protocol_text(p: &proto::Protocol) -> Option<String> {
    match p.number_or_name.as_ref()? {
        proto::protocol::NumberOrName::Name(n) => Some(n.clone()),
        proto::protocol::NumberOrName::Number(n) => Some(n.to_string()),
    }
}

fn port_list(ports: &[proto::PortRange]) -> String {
    ports
        .iter()
        .map(|p| {
            if p.first == p.last {
                p.first.to_string()
            } else {
                format!("{}:{}", p.first, p.last)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Splits a port list into chunks of at most 15 multiport slots (a range takes two).
fn port_chunks(ports: &[proto::PortRange]) -> Vec<Vec<proto::PortRange>> {
    let mut out: Vec<Vec<proto::PortRange>> = Vec::new();
    let mut slots = 0;
    for p in ports {
        let need = if p.first == p.last { 1 } else { 2 };
        if out.is_empty() || slots + need > 15 {
            out.push(Vec::new());
            slots = 0;
        }
        out.last_mut().expect("pushed").push(*p);
        slots += need;
    }
    out
}

fn is_v4(net: &str) -> bool {
    !net.contains(':')
}

/// One rule's iptables lines (each a list of arguments), for the IPv4 table; empty if the
/// rule does not apply to IPv4. `object` says what the lines are for (their comment).
pub fn render_rule(rule: &proto::Rule, config: &RenderConfig) -> Vec<Vec<String>> {
    let other = match config.family {
        IpFamily::V4 => proto::IpVersion::Ipv6,
        IpFamily::V6 => proto::IpVersion::Ipv4,
    };
    if rule.ip_version == other as i32 {
        return Vec::new();
    }
    let want_v4 = config.family == IpFamily::V4;
    let v4 = |nets: &[String]| -> Option<Vec<String>> {
        let kept: Vec<String> = nets
            .iter()
            .filter(|n| is_v4(n) == want_v4)
            .cloned()
            .collect();
        // A list emptied by the filtering makes the rule impossible in this family.
        (nets.is_empty() || !kept.is_empty()).then_some(kept)
    };
    let (Some(src), Some(dst), Some(not_src), Some(not_dst)) = (
        v4(&rule.src_net),
        v4(&rule.dst_net),
        v4(&rule.not_src_net),
        v4(&rule.not_dst_net),
    ) else {
        return Vec::new();
    };
    let m = config.marks;
    let mut prefix_rules: Vec<Vec<String>> = Vec::new();
    let mut match_src: Option<&String> = src.first();
    let mut match_dst: Option<&String> = dst.first();
    let mut negated_src = not_src.clone();
    let mut negated_dst = not_dst.clone();
    let mut scratch_test = false;
    let src_over = src.len() + not_src.len() > 1;
    let dst_over = dst.len() + not_dst.len() > 1;
    if src_over || dst_over {
        // Felix's scratch-mark block: ORs of positive CIDRs into scratch bits, negatives
        // clearing them, then the rule itself tests the bit.
        let positive_multi: Vec<(&str, &Vec<String>)> = [("-s", &src), ("-d", &dst)]
            .into_iter()
            .filter(|(_, l)| l.len() > 1)
            .collect();
        let start = if positive_multi.is_empty() {
            m.scratch0
        } else {
            0
        };
        prefix_rules.push(args(&[
            "-j",
            "MARK",
            "--set-mark",
            &format!("{}/{}", hex(start), hex(m.scratch0 | m.scratch1)),
        ]));
        for (i, (flag, list)) in positive_multi.iter().enumerate() {
            let bit = if i == 0 { m.scratch0 } else { m.scratch1 };
            for net in list.iter() {
                prefix_rules.push(args(&[
                    flag,
                    net,
                    "-j",
                    "MARK",
                    "--set-mark",
                    &format!("{}/{}", hex(bit), hex(bit)),
                ]));
            }
            if i > 0 {
                prefix_rules.push(args(&[
                    "-m",
                    "mark",
                    "--mark",
                    &format!("0x0/{}", hex(m.scratch1)),
                    "-j",
                    "MARK",
                    "--set-mark",
                    &format!("0x0/{}", hex(m.scratch0)),
                ]));
            }
        }
        for (flag, list, over) in [("-s", &not_src, src_over), ("-d", &not_dst, dst_over)] {
            if over {
                for net in list.iter() {
                    prefix_rules.push(args(&[
                        flag,
                        net,
                        "-j",
                        "MARK",
                        "--set-mark",
                        &format!("0x0/{}", hex(m.scratch0)),
                    ]));
                }
            }
        }
        if src_over {
            match_src = None;
            negated_src.clear();
        }
        if dst_over {
            match_dst = None;
            negated_dst.clear();
        }
        scratch_test = true;
    }

    let src_chunks = if rule.src_ports.is_empty() {
        vec![Vec::new()]
    } else {
        port_chunks(&rule.src_ports)
    };
    let dst_chunks = if rule.dst_ports.is_empty() {
        vec![Vec::new()]
    } else {
        port_chunks(&rule.dst_ports)
    };
    let mut out = prefix_rules;
    for sp in &src_chunks {
        for dp in &dst_chunks {
            let mut a: Vec<String> = Vec::new();
            if let Some(p) = rule.protocol.as_ref().and_then(protocol_text) {
                a.extend(args(&["-p", &p]));
            }
            if let Some(s) = match_src {
                a.extend(args(&["-s", s]));
            }
            for id in &rule.src_ip_set_ids {
                a.extend(args(&[
                    "-m",
                    "set",
                    "--match-set",
                    &config.set_name(id),
                    "src",
                ]));
            }
            if !sp.is_empty() {
                a.extend(args(&["-m", "multiport", "--source-ports", &port_list(sp)]));
            }
            if let Some(d) = match_dst {
                a.extend(args(&["-d", d]));
            }
            for id in &rule.dst_ip_set_ids {
                a.extend(args(&[
                    "-m",
                    "set",
                    "--match-set",
                    &config.set_name(id),
                    "dst",
                ]));
            }
            if !dp.is_empty() {
                a.extend(args(&[
                    "-m",
                    "multiport",
                    "--destination-ports",
                    &port_list(dp),
                ]));
            }
            let (icmp_module, icmp_flag) = match config.family {
                IpFamily::V4 => ("icmp", "--icmp-type"),
                IpFamily::V6 => ("icmp6", "--icmpv6-type"),
            };
            match &rule.icmp {
                Some(proto::rule::Icmp::IcmpType(t)) => {
                    a.extend(args(&["-m", icmp_module, icmp_flag, &t.to_string()]))
                }
                Some(proto::rule::Icmp::IcmpTypeCode(tc)) => a.extend(args(&[
                    "-m",
                    icmp_module,
                    icmp_flag,
                    &format!("{}/{}", tc.r#type, tc.code),
                ])),
                None => {}
            }
            if let Some(p) = rule.not_protocol.as_ref().and_then(protocol_text) {
                a.extend(args(&["!", "-p", &p]));
            }
            for s in &negated_src {
                a.extend(args(&["!", "-s", s]));
            }
            for id in &rule.not_src_ip_set_ids {
                a.extend(args(&[
                    "-m",
                    "set",
                    "!",
                    "--match-set",
                    &config.set_name(id),
                    "src",
                ]));
            }
            for chunk in port_chunks(&rule.not_src_ports) {
                a.extend(args(&[
                    "-m",
                    "multiport",
                    "!",
                    "--source-ports",
                    &port_list(&chunk),
                ]));
            }
            for d in &negated_dst {
                a.extend(args(&["!", "-d", d]));
            }
            for id in &rule.not_dst_ip_set_ids {
                a.extend(args(&[
                    "-m",
                    "set",
                    "!",
                    "--match-set",
                    &config.set_name(id),
                    "dst",
                ]));
            }
            for chunk in port_chunks(&rule.not_dst_ports) {
                a.extend(args(&[
                    "-m",
                    "multiport",
                    "!",
                    "--destination-ports",
                    &port_list(&chunk),
                ]));
            }
            match &rule.not_icmp {
                Some(proto::rule::NotIcmp::NotIcmpType(t)) => {
                    a.extend(args(&["-m", icmp_module, "!", icmp_flag, &t.to_string()]))
                }
                Some(proto::rule::NotIcmp::NotIcmpTypeCode(tc)) => a.extend(args(&[
                    "-m",
                    icmp_module,
                    "!",
                    icmp_flag,
                    &format!("{}/{}", tc.r#type, tc.code),
                ])),
                None => {}
            }
            if scratch_test {
                a.extend(args(&[
                    "-m",
                    "mark",
                    "--mark",
                    &format!("{}/{}", hex(m.scratch0), hex(m.scratch0)),
                ]));
            }
            out.extend(action_lines(&rule.action, a, config));
        }
    }
    out
}

/// The lines of an action after the match `a`.
fn action_lines(action: &str, a: Vec<String>, config: &RenderConfig) -> Vec<Vec<String>> {
    let m = config.marks;
    let mark_and_return = |bit: u32| {
        let mut set = a.clone();
        set.extend(args(&[
            "-j",
            "MARK",
            "--set-mark",
            &format!("{}/{}", hex(bit), hex(bit)),
        ]));
        vec![
            set,
            args(&[
                "-m",
                "mark",
                "--mark",
                &format!("{}/{}", hex(bit), hex(bit)),
                "-j",
                "RETURN",
            ]),
        ]
    };
    match action {
        "deny" => {
            let mut d = a;
            d.extend(args(&["-j", "DROP"]));
            vec![d]
        }
        "log" => {
            let mut l = a;
            l.extend(args(&[
                "-j",
                "LOG",
                "--log-prefix",
                &format!("{}: ", config.log_prefix),
                "--log-level",
                "5",
            ]));
            vec![l]
        }
        "next-tier" | "pass" => mark_and_return(m.pass),
        // "allow", "" — and anything unknown is refused earlier by validation.
        _ => mark_and_return(m.accept),
    }
}

fn rules_of(object: &str, lines: Vec<Vec<String>>) -> Vec<Rule> {
    lines.into_iter().map(|a| Rule::new(object, a)).collect()
}

fn rendered_rules(rules: &[proto::Rule], object: &str, config: &RenderConfig) -> Vec<Rule> {
    rules
        .iter()
        .flat_map(|r| {
            let what = if r.rule_id.is_empty() {
                object.to_string()
            } else {
                format!("{object} rule {}", r.rule_id)
            };
            rules_of(&what, render_rule(r, config))
        })
        .collect()
}

/// Which way an endpoint chain polices.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Traffic to the workload: ingress policies, inbound profile rules.
    To,
    From,
}

/// One workload endpoint's chain in one direction (Felix's layout, §3.4).
fn endpoint_chain(
    ep: &proto::WorkloadEndpoint,
    dir: Direction,
    state: &DataplaneState,
    config: &RenderConfig,
) -> Vec<Rule> {
    let m = config.marks;
    let mut r = Vec::new();
    let rule = |obj: &str, a: &[&str]| Rule::new(obj, args(a));
    if ep.state != "active" {
        r.push(rule("Endpoint admin disabled", &["-j", "DROP"]));
        return r;
    }
    r.push(rule(
        "established",
        &[
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
            "-j",
            "ACCEPT",
        ],
    ));
    r.push(rule(
        "invalid",
        &["-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"],
    ));
    match (&config.hook, config.family) {
        (WorkloadHook::Bridged { .. }, IpFamily::V4) => {
            let (sport, dport) = match dir {
                Direction::From => ("68", "67"),
                Direction::To => ("67", "68"),
            };
            r.push(rule(
                "DHCP with the concentrator",
                &[
                    "-p", "udp", "--sport", sport, "--dport", dport, "-j", "ACCEPT",
                ],
            ));
        }
        // Bridged IPv6 needs neighbour discovery and MLD between the ports, whatever the
        // policy says (routed workloads talk ND to the host, which is not policed).
        (WorkloadHook::Bridged { .. }, IpFamily::V6) => {
            for t in ICMPV6_ND {
                r.push(rule(
                    "ICMPv6 neighbour discovery",
                    &[
                        "-p",
                        "ipv6-icmp",
                        "-m",
                        "icmp6",
                        "--icmpv6-type",
                        t,
                        "-j",
                        "ACCEPT",
                    ],
                ));
            }
        }
        (WorkloadHook::Routed { .. }, _) => {}
    }
    r.push(rule(
        "clear accept",
        &[
            "-j",
            "MARK",
            "--set-mark",
            &format!("0x0/{}", hex(m.accept)),
        ],
    ));
    let policies: Vec<&String> = ep
        .tiers
        .iter()
        .flat_map(|t| match dir {
            Direction::To => &t.ingress_policies,
            Direction::From => &t.egress_policies,
        })
        .collect();
    policies_and_profiles(
        &mut r,
        &policies,
        &ep.profile_ids,
        dir == Direction::To,
        state,
        config,
    );
    r
}

/// The tail every endpoint chain shares: the policies with pass semantics (drop if none
/// passed the packet), then the profiles, then the final drop. `inbound` picks the `pi`/`pri`
/// chains, else `po`/`pro`. Only chains the state holds are jumped to.
fn policies_and_profiles(
    r: &mut Vec<Rule>,
    policies: &[&String],
    profiles: &[String],
    inbound: bool,
    state: &DataplaneState,
    config: &RenderConfig,
) {
    let m = config.marks;
    let rule = |obj: &str, a: &[&str]| Rule::new(obj, args(a));
    let accepted = format!("{}/{}", hex(m.accept), hex(m.accept));
    let pass_clear = format!("0x0/{}", hex(m.pass));
    if !policies.is_empty() {
        r.push(rule(
            "Start of policies",
            &["-j", "MARK", "--set-mark", &pass_clear],
        ));
        for p in policies {
            if !state.policies.contains_key(p.as_str()) {
                continue;
            }
            let chain = policy_chain(p, inbound);
            r.push(rule(
                &format!("policy {p}"),
                &["-m", "mark", "--mark", &pass_clear, "-j", &chain],
            ));
            r.push(rule(
                "Return if policy accepted",
                &["-m", "mark", "--mark", &accepted, "-j", "RETURN"],
            ));
        }
        r.push(rule(
            "Drop if no policies passed packet",
            &["-m", "mark", "--mark", &pass_clear, "-j", "DROP"],
        ));
    }
    for p in profiles {
        if !state.profiles.contains_key(p.as_str()) {
            continue;
        }
        let chain = profile_chain(p, inbound);
        r.push(rule(&format!("profile {p}"), &["-j", &chain]));
        r.push(rule(
            "Return if profile accepted",
            &["-m", "mark", "--mark", &accepted, "-j", "RETURN"],
        ));
    }
    r.push(rule("Drop if no profiles matched", &["-j", "DROP"]));
}

/// A host endpoint's chain for one direction (§3.4): `From` is traffic arriving on the
/// interface (`cali-fh-`: ingress policies, failsafe in), `To` traffic leaving by it
/// (`cali-th-`: egress policies, failsafe out).
fn host_endpoint_chain(
    ep: &proto::HostEndpoint,
    dir: Direction,
    state: &DataplaneState,
    config: &RenderConfig,
) -> Vec<Rule> {
    let mut r = vec![
        Rule::new(
            "established",
            args(&[
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                "-j",
                "ACCEPT",
            ]),
        ),
        Rule::new(
            "invalid",
            args(&["-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]),
        ),
        Rule::new(
            "failsafe",
            args(&[
                "-j",
                match dir {
                    Direction::From => "cali-failsafe-in",
                    Direction::To => "cali-failsafe-out",
                },
            ]),
        ),
        Rule::new(
            "clear accept",
            args(&[
                "-j",
                "MARK",
                "--set-mark",
                &format!("0x0/{}", hex(config.marks.accept)),
            ]),
        ),
    ];
    let policies: Vec<&String> = ep
        .tiers
        .iter()
        .flat_map(|t| match dir {
            Direction::From => &t.ingress_policies,
            Direction::To => &t.egress_policies,
        })
        .collect();
    policies_and_profiles(
        &mut r,
        &policies,
        &ep.profile_ids,
        dir == Direction::From,
        state,
        config,
    );
    r
}

pub fn to_host_endpoint_chain(iface: &str) -> String {
    chain_name("cali-th-", iface)
}

pub fn from_host_endpoint_chain(iface: &str) -> String {
    chain_name("cali-fh-", iface)
}

/// A host endpoint's two chains.
pub fn host_endpoint_chains(
    ep: &proto::HostEndpoint,
    state: &DataplaneState,
    config: &RenderConfig,
) -> [Chain; 2] {
    [
        (
            from_host_endpoint_chain(&ep.name),
            host_endpoint_chain(ep, Direction::From, state, config),
        ),
        (
            to_host_endpoint_chain(&ep.name),
            host_endpoint_chain(ep, Direction::To, state, config),
        ),
    ]
}

/// Host endpoints with an interface, by interface (the first id of a name wins). Host
/// endpoints known only by their expected addresses are not rendered (they still count in
/// IP sets).
pub fn host_interfaces(state: &DataplaneState) -> BTreeMap<&str, &proto::HostEndpoint> {
    let mut out = BTreeMap::new();
    for ep in state.host_endpoints.values().filter(|e| !e.name.is_empty()) {
        out.entry(ep.name.as_str()).or_insert(ep);
    }
    out
}

/// Everything host endpoints need: their chains, their dispatch chains (which let unknown
/// interfaces through) and the failsafe chains. Rendered as one piece: hosts have few.
pub fn host_endpoint_part(
    state: &DataplaneState,
    config: &RenderConfig,
) -> BTreeMap<String, Vec<Rule>> {
    let mut chains = BTreeMap::new();
    let ifaces = host_interfaces(state);
    for ep in ifaces.values() {
        for (name, rules) in host_endpoint_chains(ep, state, config) {
            chains.insert(name, rules);
        }
    }
    let names: Vec<String> = ifaces.keys().map(|n| n.to_string()).collect();
    dispatch_tree(
        &names,
        DispatchKind::FromHost,
        "cali-from-host-endpoint",
        config,
        &mut chains,
    );
    dispatch_tree(
        &names,
        DispatchKind::ToHost,
        "cali-to-host-endpoint",
        config,
        &mut chains,
    );
    for (chain, key, dport_dir) in [
        (
            "cali-failsafe-in",
            "FailsafeInboundHostPorts",
            "tcp:22,udp:68",
        ),
        (
            "cali-failsafe-out",
            "FailsafeOutboundHostPorts",
            "tcp:2379,tcp:2380,tcp:4001,tcp:7001,udp:53,udp:67",
        ),
    ] {
        let ports = config
            .failsafe
            .get(key)
            .map(String::as_str)
            .unwrap_or(dport_dir);
        let mut rules: Vec<Rule> = failsafe_ports(ports)
            .into_iter()
            .map(|(proto, port)| {
                Rule::new(
                    format!("failsafe {proto}:{port}"),
                    args(&["-p", proto, "--dport", &port.to_string(), "-j", "ACCEPT"]),
                )
            })
            .collect();
        if matches!(config.hook, WorkloadHook::Bridged { .. }) {
            // The tenant overlay itself: GRE and VXLAN between compute nodes and
            // concentrators must survive any host endpoint policy.
            rules.push(Rule::new(
                "tenant tunnels (GRE)",
                args(&["-p", "47", "-j", "ACCEPT"]),
            ));
            rules.push(Rule::new(
                "tenant tunnels (VXLAN)",
                args(&["-p", "udp", "--dport", "4789", "-j", "ACCEPT"]),
            ));
        }
        chains.insert(chain.to_string(), rules);
    }
    chains
}

/// Felix's failsafe list (`tcp:22,udp:68`); entries that do not parse are skipped.
pub fn failsafe_ports(list: &str) -> Vec<(&'static str, u16)> {
    list.split(',')
        .filter_map(|e| {
            let (proto, port) = e.trim().split_once(':')?;
            let proto = match proto.trim().to_ascii_lowercase().as_str() {
                "tcp" => "tcp",
                "udp" => "udp",
                _ => return None,
            };
            Some((proto, port.trim().parse().ok()?))
        })
        .collect()
}

/// Matches a packet's workload interface (`name` ends in `+` for a prefix).
fn iface_match(hook: &WorkloadHook, dir: Direction, name: &str) -> Vec<String> {
    match (hook, dir) {
        (WorkloadHook::Bridged { .. }, Direction::From) => args(&[
            "-m",
            "physdev",
            "--physdev-in",
            name,
            "--physdev-is-bridged",
        ]),
        (WorkloadHook::Bridged { .. }, Direction::To) => args(&[
            "-m",
            "physdev",
            "--physdev-out",
            name,
            "--physdev-is-bridged",
        ]),
        (WorkloadHook::Routed { .. }, Direction::From) => args(&["-i", name]),
        (WorkloadHook::Routed { .. }, Direction::To) => args(&["-o", name]),
    }
}

/// The dispatch tree for sorted, unique interface names: root chain `base`, a child chain
/// per group of names sharing the common prefix plus one more character (§3.4).
#[derive(Clone, Copy, PartialEq, Eq)]
enum DispatchKind {
    FromWorkload,
    ToWorkload,
    FromHost,
    ToHost,
}

fn dispatch_tree(
    names: &[String],
    kind: DispatchKind,
    base: &str,
    config: &RenderConfig,
    chains: &mut BTreeMap<String, Vec<Rule>>,
) {
    let target = |n: &str| match kind {
        DispatchKind::FromWorkload => from_endpoint_chain(n),
        DispatchKind::ToWorkload => to_endpoint_chain(n),
        DispatchKind::FromHost => from_host_endpoint_chain(n),
        DispatchKind::ToHost => to_host_endpoint_chain(n),
    };
    let matcher = |name: &str| match kind {
        DispatchKind::FromWorkload => iface_match(&config.hook, Direction::From, name),
        DispatchKind::ToWorkload => iface_match(&config.hook, Direction::To, name),
        DispatchKind::FromHost => args(&["-i", name]),
        DispatchKind::ToHost => args(&["-o", name]),
    };
    // Workload dispatch drops unknown interfaces; host dispatch lets them through.
    let workload = matches!(kind, DispatchKind::FromWorkload | DispatchKind::ToWorkload);
    let common = names
        .first()
        .map(|first| {
            let mut len = first.len();
            for n in names {
                len = len.min(
                    first
                        .bytes()
                        .zip(n.bytes())
                        .take_while(|(a, b)| a == b)
                        .count(),
                );
            }
            first[..len].to_string()
        })
        .unwrap_or_default();
    let mut groups: BTreeMap<String, Vec<&String>> = BTreeMap::new();
    for n in names {
        let key = n[..(common.len() + 1).min(n.len())].to_string();
        groups.entry(key).or_default().push(n);
    }
    let unknown = Rule::new("Unknown interface", args(&["-j", "DROP"]));
    let mut root = Vec::new();
    for (key, members) in &groups {
        if members.len() == 1 {
            let mut a = matcher(members[0]);
            a.extend(args(&["-g", &target(members[0])]));
            root.push(Rule::new(format!("endpoint {}", members[0]), a));
        } else {
            let next = &key[common.len()..];
            let child = format!("{base}-{next}");
            let mut a = matcher(&format!("{key}+"));
            a.extend(args(&["-g", &child]));
            root.push(Rule::new(format!("endpoints {key}+"), a));
            let mut rules: Vec<Rule> = members
                .iter()
                .map(|n| {
                    let mut a = matcher(n);
                    a.extend(args(&["-g", &target(n)]));
                    Rule::new(format!("endpoint {n}"), a)
                })
                .collect();
            if workload {
                rules.push(unknown.clone());
            }
            chains.insert(child, rules);
        }
    }
    if workload {
        root.push(unknown);
    }
    chains.insert(base.to_string(), root);
}

/// A chain and its rules.
pub type Chain = (String, Vec<Rule>);

/// A policy's two chains (`cali-pi-`, `cali-po-`).
pub fn policy_chains(name: &str, p: &proto::Policy, config: &RenderConfig) -> [Chain; 2] {
    let obj = format!("policy {name}");
    [
        (
            policy_chain(name, true),
            rendered_rules(&p.inbound_rules, &obj, config),
        ),
        (
            policy_chain(name, false),
            rendered_rules(&p.outbound_rules, &obj, config),
        ),
    ]
}

/// A profile's two chains (`cali-pri-`, `cali-pro-`).
pub fn profile_chains(name: &str, p: &proto::Profile, config: &RenderConfig) -> [Chain; 2] {
    let obj = format!("profile {name}");
    [
        (
            profile_chain(name, true),
            rendered_rules(&p.inbound_rules, &obj, config),
        ),
        (
            profile_chain(name, false),
            rendered_rules(&p.outbound_rules, &obj, config),
        ),
    ]
}

/// A workload endpoint's two chains (`cali-tw-`, `cali-fw-`). They jump only to policy and
/// profile chains the state holds.
pub fn endpoint_chains(
    ep: &proto::WorkloadEndpoint,
    state: &DataplaneState,
    config: &RenderConfig,
) -> [Chain; 2] {
    [
        (
            to_endpoint_chain(&ep.name),
            endpoint_chain(ep, Direction::To, state, config),
        ),
        (
            from_endpoint_chain(&ep.name),
            endpoint_chain(ep, Direction::From, state, config),
        ),
    ]
}

/// The interfaces with an endpoint chain: the first endpoint of a name wins, as in Felix.
pub fn interfaces(state: &DataplaneState) -> BTreeMap<&str, &proto::WorkloadEndpoint> {
    let mut ifaces: BTreeMap<&str, &proto::WorkloadEndpoint> = BTreeMap::new();
    for ep in state.workloads.values() {
        ifaces.entry(ep.name.as_str()).or_insert(ep);
    }
    ifaces
}

/// The chains [`base`] may render (its part depends on the hook and the zones only).
pub const BASE_CHAINS: [&str; 5] = [
    "cali-FORWARD",
    "cali-INPUT",
    "cali-OUTPUT",
    "cali-wl-to-host",
    "cali-PREROUTING",
];

/// Whether a chain belongs to the host-endpoint part ([`host_endpoint_part`]).
pub fn is_host_endpoint_chain(name: &str) -> bool {
    [
        "cali-fh-",
        "cali-th-",
        "cali-from-host-endpoint",
        "cali-to-host-endpoint",
        "cali-failsafe-",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

/// Whether a chain is part of the dispatch trees.
pub fn is_dispatch_chain(name: &str) -> bool {
    name.starts_with("cali-from-wl-dispatch") || name.starts_with("cali-to-wl-dispatch")
}

/// Both dispatch trees for these (sorted, unique) interface names.
pub fn dispatch_chains(names: &[String], config: &RenderConfig) -> BTreeMap<String, Vec<Rule>> {
    let mut chains = BTreeMap::new();
    dispatch_tree(
        names,
        DispatchKind::FromWorkload,
        "cali-from-wl-dispatch",
        config,
        &mut chains,
    );
    dispatch_tree(
        names,
        DispatchKind::ToWorkload,
        "cali-to-wl-dispatch",
        config,
        &mut chains,
    );
    chains
}

/// The static part: `cali-FORWARD` (and in routed mode `cali-INPUT`, `cali-wl-to-host`)
/// with their jumps from the built-in chains, and the bridges' conntrack zones.
pub fn base(state: &DataplaneState, config: &RenderConfig) -> Ruleset {
    let mut rs = Ruleset::new(OWNER);
    let forward = rs.chain(Table::Filter, "FORWARD", "FORWARD");
    let prefixes = match &config.hook {
        WorkloadHook::Bridged { prefixes } | WorkloadHook::Routed { prefixes } => prefixes,
    };
    let mut fwd = Vec::new();
    for p in prefixes {
        let any = format!("{p}+");
        let mut a = iface_match(&config.hook, Direction::From, &any);
        a.extend(args(&["-j", "cali-from-wl-dispatch"]));
        fwd.push(Rule::new("from workloads", a));
        let mut a = iface_match(&config.hook, Direction::To, &any);
        a.extend(args(&["-j", "cali-to-wl-dispatch"]));
        fwd.push(Rule::new("to workloads", a));
    }
    for p in prefixes {
        let any = format!("{p}+");
        for dir in [Direction::From, Direction::To] {
            let mut a = iface_match(&config.hook, dir, &any);
            a.extend(args(&["-j", "ACCEPT"]));
            fwd.push(Rule::new("workload traffic allowed by policy", a));
        }
    }
    // Host endpoints: traffic forwarded between host interfaces (Felix's order: clear every
    // mark but accept, ingress unless accepted already, egress, accept if marked).
    let m = config.marks;
    let all_marks = m.accept | m.pass | m.scratch0 | m.scratch1;
    let accepted = format!("{}/{}", hex(m.accept), hex(m.accept));
    let accept_marked = || {
        Rule::new(
            "accept if marked",
            args(&["-m", "mark", "--mark", &accepted, "-j", "ACCEPT"]),
        )
    };
    fwd.push(Rule::new(
        "clear marks but accept",
        args(&[
            "-j",
            "MARK",
            "--set-mark",
            &format!("0x0/{}", hex(all_marks & !m.accept)),
        ]),
    ));
    fwd.push(Rule::new(
        "from host endpoints",
        args(&[
            "-m",
            "mark",
            "--mark",
            &format!("0x0/{}", hex(m.accept)),
            "-j",
            "cali-from-host-endpoint",
        ]),
    ));
    fwd.push(Rule::new(
        "to host endpoints",
        args(&["-j", "cali-to-host-endpoint"]),
    ));
    fwd.push(accept_marked());
    rs.set_rules(Table::Filter, &forward, Arc::new(fwd));
    let clear_marks = || {
        Rule::new(
            "clear marks",
            args(&[
                "-j",
                "MARK",
                "--set-mark",
                &format!("0x0/{}", hex(all_marks)),
            ]),
        )
    };
    let input = rs.chain(Table::Filter, "INPUT", "INPUT");
    let mut input_rules = vec![accept_marked()];
    if let WorkloadHook::Routed { prefixes } = &config.hook {
        input_rules.extend(prefixes.iter().map(|p| {
            Rule::new(
                "from workloads",
                args(&["-i", &format!("{p}+"), "-g", "cali-wl-to-host"]),
            )
        }));
    }
    input_rules.extend([
        clear_marks(),
        Rule::new("host endpoints", args(&["-j", "cali-from-host-endpoint"])),
        accept_marked(),
    ]);
    rs.set_rules(Table::Filter, &input, Arc::new(input_rules));
    let output = rs.chain(Table::Filter, "OUTPUT", "OUTPUT");
    let mut output_rules = vec![accept_marked()];
    if let WorkloadHook::Routed { prefixes } = &config.hook {
        // Host → workload traffic is not policed.
        output_rules.extend(prefixes.iter().map(|p| {
            Rule::new(
                "to workloads",
                args(&["-o", &format!("{p}+"), "-j", "RETURN"]),
            )
        }));
    }
    output_rules.extend([
        clear_marks(),
        Rule::new("host endpoints", args(&["-j", "cali-to-host-endpoint"])),
        accept_marked(),
    ]);
    rs.set_rules(Table::Filter, &output, Arc::new(output_rules));
    if let WorkloadHook::Routed { .. } = &config.hook {
        rs.set_rules(
            Table::Filter,
            "cali-wl-to-host",
            Arc::new(
                (config.family == IpFamily::V6)
                    .then_some(ICMPV6_ND)
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        Rule::new(
                            "ICMPv6 to the host",
                            args(&[
                                "-p",
                                "ipv6-icmp",
                                "-m",
                                "icmp6",
                                "--icmpv6-type",
                                t,
                                "-j",
                                "ACCEPT",
                            ]),
                        )
                    })
                    .chain([
                        Rule::new("egress policy", args(&["-j", "cali-from-wl-dispatch"])),
                        Rule::new(
                            "DefaultEndpointToHostAction",
                            args(&["-j", &config.default_endpoint_to_host]),
                        ),
                    ])
                    .collect(),
            ),
        );
    }
    if matches!(config.hook, WorkloadHook::Bridged { .. }) && !state.zones.is_empty() {
        let raw = rs.chain(Table::Raw, "PREROUTING", "PREROUTING");
        let rules = state
            .zones
            .iter()
            .map(|(bridge, zone)| {
                Rule::new(
                    format!("conntrack zone of bridge {bridge}"),
                    args(&["-i", bridge, "-j", "CT", "--zone", &zone.to_string()]),
                )
            })
            .collect();
        rs.set_rules(Table::Raw, &raw, Arc::new(rules));
    }
    rs
}

/// Everything the dataplane state asks for, as one ruleset of owner [`OWNER`].
pub fn render(state: &DataplaneState, config: &RenderConfig) -> Ruleset {
    let mut rs = base(state, config);
    let mut put = |(name, rules): Chain| rs.set_rules(Table::Filter, &name, Arc::new(rules));
    for (name, p) in &state.policies {
        policy_chains(name, p, config)
            .into_iter()
            .for_each(&mut put);
    }
    for (name, p) in &state.profiles {
        profile_chains(name, p, config)
            .into_iter()
            .for_each(&mut put);
    }
    let ifaces = interfaces(state);
    for ep in ifaces.values() {
        endpoint_chains(ep, state, config)
            .into_iter()
            .for_each(&mut put);
    }
    let names: Vec<String> = ifaces.keys().map(|n| n.to_string()).collect();
    dispatch_chains(&names, config)
        .into_iter()
        .for_each(&mut put);
    host_endpoint_part(state, config)
        .into_iter()
        .for_each(&mut put);
    rs
}

#[cfg(test)]
mod tests;
