use super::*;

fn graph(scope: Option<&str>) -> CalcGraph {
    let mut g = CalcGraph::new(CalcConfig {
        hostname: "h1".into(),
        scope_label: scope.map(str::to_string),
    });
    g.apply(Input::InSync);
    g
}

fn wep(host: &str, name: &str, ip: &str, labels: &[(&str, &str)], profiles: &[&str]) -> Input {
    Input::WorkloadEndpoint {
        id: WorkloadEndpointId {
            host: host.into(),
            orchestrator: "ciao".into(),
            workload: format!("w-{name}"),
            endpoint: name.into(),
        },
        value: Some(WorkloadEndpoint {
            state: "active".into(),
            name: format!("tvn_{name}"),
            active_instance_id: String::new(),
            mac: None,
            profile_ids: profiles.iter().map(|p| p.to_string()).collect(),
            ipv4_nets: vec![format!("{ip}/32").parse().unwrap()],
            ipv6_nets: vec![],
            ipv4_nat: vec![],
            ipv6_nat: vec![],
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ipv4_gateway: None,
            ipv6_gateway: None,
        }),
    }
}

fn gone(host: &str, name: &str) -> Input {
    Input::WorkloadEndpoint {
        id: WorkloadEndpointId {
            host: host.into(),
            orchestrator: "ciao".into(),
            workload: format!("w-{name}"),
            endpoint: name.into(),
        },
        value: None,
    }
}

fn policy(name: &str, json: &str) -> Input {
    Input::Policy {
        tier: TIER.into(),
        name: name.into(),
        value: Some(serde_json::from_str(json).unwrap()),
    }
}

fn profile(g: &mut CalcGraph, name: &str, tags: &[&str], labels: &[(&str, &str)], rules: &str) {
    g.apply(Input::ProfileTags {
        profile: name.into(),
        tags: Some(tags.iter().map(|t| t.to_string()).collect()),
    });
    g.apply(Input::ProfileLabels {
        profile: name.into(),
        labels: Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
    });
    g.apply(Input::ProfileRules {
        profile: name.into(),
        rules: Some(serde_json::from_str(rules).unwrap()),
    });
}

fn kinds(msgs: &[Payload]) -> Vec<&'static str> {
    msgs.iter()
        .map(|m| match m {
            Payload::InSync(_) => "InSync",
            Payload::IpsetUpdate(_) => "IPSetUpdate",
            Payload::IpsetDeltaUpdate(_) => "IPSetDelta",
            Payload::IpsetRemove(_) => "IPSetRemove",
            Payload::ActiveProfileUpdate(_) => "ProfileUpdate",
            Payload::ActiveProfileRemove(_) => "ProfileRemove",
            Payload::ActivePolicyUpdate(_) => "PolicyUpdate",
            Payload::ActivePolicyRemove(_) => "PolicyRemove",
            Payload::HostEndpointUpdate(_) => "HEPUpdate",
            Payload::HostEndpointRemove(_) => "HEPRemove",
            Payload::WorkloadEndpointUpdate(_) => "WEPUpdate",
            Payload::WorkloadEndpointRemove(_) => "WEPRemove",
            Payload::ConfigUpdate(_) => "Config",
            Payload::HostMetadataUpdate(_) => "HostUpdate",
            Payload::HostMetadataRemove(_) => "HostRemove",
            Payload::IpamPoolUpdate(_) => "PoolUpdate",
            Payload::IpamPoolRemove(_) => "PoolRemove",
        })
        .collect()
}

fn endpoint_tiers(msgs: &[Payload], name: &str) -> Option<(Vec<String>, Vec<String>)> {
    msgs.iter().find_map(|m| match m {
        Payload::WorkloadEndpointUpdate(u) if u.endpoint.as_ref()?.name == name => {
            let t = u
                .endpoint
                .as_ref()?
                .tiers
                .first()
                .cloned()
                .unwrap_or_default();
            Some((t.ingress_policies, t.egress_policies))
        }
        _ => None,
    })
}

fn set_members(msgs: &[Payload], id: &str) -> Option<Vec<String>> {
    msgs.iter().find_map(|m| match m {
        Payload::IpsetUpdate(u) if u.id == id => Some(u.members.clone()),
        _ => None,
    })
}

#[test]
fn nothing_is_sent_before_the_snapshot_is_in() {
    let mut g = CalcGraph::new(CalcConfig {
        hostname: "h1".into(),
        scope_label: None,
    });
    g.apply(wep("h1", "a", "10.0.0.1", &[], &[]));
    assert!(g.flush().is_empty());
    g.apply(Input::InSync);
    let out = g.flush();
    assert_eq!(kinds(&out), ["Config", "WEPUpdate", "InSync"]);
    assert!(g.flush().is_empty(), "nothing changed");
}

#[test]
fn labels_are_inherited_from_profiles_and_tags_are_labels() {
    let mut g = graph(None);
    profile(
        &mut g,
        "web-prof",
        &["web"],
        &[("tier", "frontend")],
        r#"{"inbound_rules":[{"action":"allow","protocol":"tcp","src_tag":"web","dst_ports":[80]}]}"#,
    );
    g.apply(policy(
        "fe",
        r#"{"selector":"tier == 'frontend'","order":10,"inbound_rules":[{"action":"deny"}]}"#,
    ));
    g.apply(wep(
        "h1",
        "a",
        "10.0.0.1",
        &[("tier", "own")],
        &["web-prof"],
    ));
    g.apply(wep("h2", "b", "10.0.0.2", &[], &["web-prof"]));
    let out = g.flush();
    // Own labels win over the profile's: a's tier is "own", so the policy does not match.
    assert_eq!(endpoint_tiers(&out, "tvn_a"), Some((vec![], vec![])));
    let web = Selector::tag("web").ip_set_id();
    assert_eq!(
        set_members(&out, &web).unwrap(),
        ["10.0.0.1", "10.0.0.2"],
        "members come from every host"
    );
    assert!(kinds(&out).contains(&"ProfileUpdate"));
    // Dropping a's own label lets the profile's label through.
    g.apply(wep("h1", "a", "10.0.0.1", &[], &["web-prof"]));
    let out = g.flush();
    assert_eq!(
        endpoint_tiers(&out, "tvn_a"),
        Some((vec!["fe".to_string()], vec!["fe".to_string()]))
    );
    assert!(kinds(&out).contains(&"PolicyUpdate"));
}

#[test]
fn policies_are_ordered_by_order_then_name_and_split_by_type() {
    let mut g = graph(None);
    g.apply(policy(
        "zeta",
        r#"{"selector":"","order":5,"types":["ingress"]}"#,
    ));
    g.apply(policy("alpha", r#"{"selector":"all()"}"#));
    g.apply(policy("beta", r#"{"selector":"","order":5}"#));
    g.apply(policy(
        "gamma",
        r#"{"selector":"","order":1.5,"types":["egress"]}"#,
    ));
    g.apply(policy("other", r#"{"selector":"has(nope)","order":0}"#));
    g.apply(wep("h1", "a", "10.0.0.1", &[], &[]));
    let out = g.flush();
    let (ingress, egress) = endpoint_tiers(&out, "tvn_a").unwrap();
    assert_eq!(ingress, ["beta", "zeta", "alpha"]);
    assert_eq!(egress, ["gamma", "beta", "alpha"]);
    // Only policies matching a local endpoint are active.
    let active: Vec<String> = out
        .iter()
        .filter_map(|m| match m {
            Payload::ActivePolicyUpdate(u) => Some(u.id.as_ref()?.name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(active.len(), 4);
    assert!(!active.contains(&"other".to_string()));
}

#[test]
fn a_remote_endpoint_is_a_delta_and_nothing_else() {
    let mut g = graph(None);
    g.apply(policy(
        "p",
        r#"{"selector":"","inbound_rules":[{"src_selector":"role == 'db'"}]}"#,
    ));
    g.apply(wep("h1", "a", "10.0.0.1", &[], &[]));
    g.flush();
    let id = Selector::parse("role == 'db'").unwrap().ip_set_id();
    g.apply(wep("h2", "db1", "10.0.1.1", &[("role", "db")], &[]));
    let out = g.flush();
    assert_eq!(
        out,
        [Payload::IpsetDeltaUpdate(proto::IpSetDeltaUpdate {
            id: id.clone(),
            added_members: vec!["10.0.1.1".into()],
            removed_members: vec![],
        })]
    );
    // Relabelled away, then back within one flush: no message at all.
    g.apply(wep("h2", "db1", "10.0.1.1", &[("role", "web")], &[]));
    g.apply(wep("h2", "db1", "10.0.1.1", &[("role", "db")], &[]));
    assert!(g.flush().is_empty());
    g.apply(gone("h2", "db1"));
    let out = g.flush();
    assert_eq!(kinds(&out), ["IPSetDelta"]);
    // An endpoint of no interest to any set changes nothing.
    g.apply(wep("h2", "x", "10.0.1.9", &[("role", "web")], &[]));
    assert!(g.flush().is_empty());
}

#[test]
fn flush_order_is_felixs() {
    let mut g = graph(None);
    g.apply(policy(
        "p",
        r#"{"selector":"","inbound_rules":[{"src_tag":"t"}]}"#,
    ));
    profile(
        &mut g,
        "prof",
        &[],
        &[],
        r#"{"outbound_rules":[{"dst_tag":"u"}]}"#,
    );
    g.apply(wep("h1", "a", "10.0.0.1", &[("t", "")], &["prof"]));
    let out = g.flush();
    assert_eq!(
        kinds(&out),
        [
            "Config",
            "IPSetUpdate",
            "IPSetUpdate",
            "PolicyUpdate",
            "ProfileUpdate",
            "WEPUpdate",
            "InSync"
        ]
    );
    g.apply(gone("h1", "a"));
    let out = g.flush();
    assert_eq!(
        kinds(&out),
        [
            "WEPRemove",
            "ProfileRemove",
            "PolicyRemove",
            "IPSetRemove",
            "IPSetRemove"
        ]
    );
}

#[test]
fn policy_changes_follow_without_recomputing_everything() {
    let mut g = graph(None);
    g.apply(wep("h1", "a", "10.0.0.1", &[("app", "web")], &[]));
    g.apply(wep("h1", "b", "10.0.0.2", &[("app", "db")], &[]));
    g.flush();
    g.apply(policy(
        "p",
        r#"{"selector":"app == 'web'","inbound_rules":[{"action":"deny"}]}"#,
    ));
    let out = g.flush();
    assert_eq!(kinds(&out), ["PolicyUpdate", "WEPUpdate"]);
    assert_eq!(endpoint_tiers(&out, "tvn_a").unwrap().0, ["p"]);
    // The selector moves to b.
    g.apply(policy(
        "p",
        r#"{"selector":"app == 'db'","inbound_rules":[{"action":"deny"}]}"#,
    ));
    let out = g.flush();
    assert_eq!(kinds(&out), ["WEPUpdate", "WEPUpdate"]);
    // A rule change is a policy update only.
    g.apply(policy(
        "p",
        r#"{"selector":"app == 'db'","inbound_rules":[{"action":"allow"}]}"#,
    ));
    assert_eq!(kinds(&g.flush()), ["PolicyUpdate"]);
    // An invalid value is a deletion.
    g.apply(
        Input::from_kv(
            "/calico/v1/policy/tier/default/policy/p",
            Some(b"{\"selector\":\"(\"}"),
        )
        .unwrap(),
    );
    assert_eq!(kinds(&g.flush()), ["WEPUpdate", "PolicyRemove"]);
}

#[test]
fn profile_label_changes_move_members() {
    let mut g = graph(None);
    g.apply(policy(
        "p",
        r#"{"selector":"","inbound_rules":[{"src_selector":"env == 'prod'"}]}"#,
    ));
    g.apply(wep("h1", "a", "10.0.0.1", &[], &[]));
    g.apply(wep("h2", "b", "10.0.0.2", &[], &["envp"]));
    profile(&mut g, "envp", &[], &[("env", "dev")], "{}");
    g.flush();
    g.apply(Input::ProfileLabels {
        profile: "envp".into(),
        labels: Some([("env".to_string(), "prod".to_string())].into()),
    });
    let out = g.flush();
    assert!(matches!(&out[..], [Payload::IpsetDeltaUpdate(d)] if d.added_members == ["10.0.0.2"]));
}

#[test]
fn tenants_are_scoped_apart() {
    let mut g = graph(Some("tenet.tenant"));
    g.apply(policy(
        "web",
        r#"{"selector":"has(web)","inbound_rules":[{"src_tag":"client"}]}"#,
    ));
    // Both tenants use 172.16.0.0/24.
    g.apply(wep(
        "h1",
        "a1",
        "172.16.0.2",
        &[("tenet.tenant", "acme"), ("web", "")],
        &[],
    ));
    g.apply(wep(
        "h1",
        "g1",
        "172.16.0.2",
        &[("tenet.tenant", "globex"), ("web", "")],
        &[],
    ));
    g.apply(wep(
        "h2",
        "a2",
        "172.16.0.3",
        &[("tenet.tenant", "acme"), ("client", "")],
        &[],
    ));
    g.apply(wep(
        "h2",
        "g2",
        "172.16.0.4",
        &[("tenet.tenant", "globex"), ("client", "")],
        &[],
    ));
    let out = g.flush();
    let acme = Selector::parse("has(client) && tenet.tenant == 'acme'")
        .unwrap()
        .ip_set_id();
    let globex = Selector::parse("has(client) && tenet.tenant == 'globex'")
        .unwrap()
        .ip_set_id();
    assert_eq!(set_members(&out, &acme).unwrap(), ["172.16.0.3"]);
    assert_eq!(set_members(&out, &globex).unwrap(), ["172.16.0.4"]);
    assert_eq!(endpoint_tiers(&out, "tvn_a1").unwrap().0, ["acme:web"]);
    assert_eq!(endpoint_tiers(&out, "tvn_g1").unwrap().0, ["globex:web"]);
    let rules: BTreeMap<String, Vec<String>> = out
        .iter()
        .filter_map(|m| match m {
            Payload::ActivePolicyUpdate(u) => Some((
                u.id.as_ref()?.name.clone(),
                u.policy.as_ref()?.inbound_rules[0].src_ip_set_ids.clone(),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(rules["acme:web"], [acme]);
    assert_eq!(rules["globex:web"], [globex]);
    assert_eq!(g.stats().active_policies, 2);
}

#[test]
fn a_missing_profile_is_active_with_no_rules() {
    let mut g = graph(None);
    g.apply(wep("h1", "a", "10.0.0.1", &[], &["nope"]));
    let out = g.flush();
    assert!(out.iter().any(|m| matches!(m,
        Payload::ActiveProfileUpdate(u) if u.profile.as_ref().unwrap().inbound_rules.is_empty())));
    profile(
        &mut g,
        "nope",
        &[],
        &[],
        r#"{"inbound_rules":[{"action":"allow"}]}"#,
    );
    assert_eq!(kinds(&g.flush()), ["ProfileUpdate"]);
}

#[test]
fn config_pools_and_host_ips_are_passed_on() {
    let mut g = graph(None);
    g.apply(Input::Config {
        host: None,
        name: "LogPrefix".into(),
        value: Some("a".into()),
    });
    g.apply(Input::Config {
        host: Some("h1".into()),
        name: "LogPrefix".into(),
        value: Some("b".into()),
    });
    g.apply(Input::Config {
        host: Some("h9".into()),
        name: "LogPrefix".into(),
        value: Some("c".into()),
    });
    g.apply(Input::HostIp {
        host: "h2".into(),
        ip: Some("10.9.0.2".parse().unwrap()),
    });
    g.apply(Input::Pool {
        cidr: "10.1.0.0/16".parse().unwrap(),
        value: Some(serde_json::from_str(r#"{"cidr":"10.1.0.0/16","masquerade":true}"#).unwrap()),
    });
    let out = g.flush();
    assert!(matches!(&out[0], Payload::ConfigUpdate(c) if c.config["LogPrefix"] == "b"));
    assert!(
        out.iter()
            .any(|m| matches!(m, Payload::IpamPoolUpdate(p) if p.id == "10.1.0.0-16"))
    );
    assert!(
        out.iter()
            .any(|m| matches!(m, Payload::HostMetadataUpdate(h) if h.ipv4_addr == "10.9.0.2"))
    );
}
