//! Round trips of every example value in calico-data-model.md §7.2 (byte-exact against the
//! JSON Calico's Go code writes) and of the shapes in the original etcdStructure document
//! (legacy: read, then written back in Go's form).

use tenet::calico::{CalicoKey, CalicoValue, decode};

/// Removes the whitespace the reference adds for line wrapping (outside JSON strings),
/// giving the compact form Go's `json.Marshal` produces.
fn compact(text: &str) -> String {
    let mut out = String::new();
    let (mut in_str, mut escaped) = (false, false);
    for c in text.chars() {
        if in_str {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => {}
            }
        } else if !c.is_whitespace() {
            in_str = c == '"';
            out.push(c);
        }
    }
    out
}

fn decode_ok(path: &str, raw: &str) -> CalicoValue {
    let key = CalicoKey::parse(path).unwrap_or_else(|e| panic!("{e}"));
    decode(&key, raw.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

/// Decoding then encoding gives back exactly the stored bytes.
fn exact(path: &str, stored: &str) {
    let stored = if stored.starts_with('{') || stored.starts_with('[') {
        compact(stored)
    } else {
        stored.to_string()
    };
    let value = decode_ok(path, &stored);
    assert_eq!(String::from_utf8(value.encode()).unwrap(), stored, "{path}");
}

/// A legacy shape decodes and is written back in Go's form.
fn upgraded(path: &str, stored: &str, written: &str) {
    let value = decode_ok(path, stored);
    assert_eq!(
        String::from_utf8(value.encode()).unwrap(),
        compact(written),
        "{path}"
    );
    // Go's form is itself a fixed point.
    exact(path, written);
}

#[test]
fn reference_examples_round_trip_byte_for_byte() {
    exact("/calico/v1/Ready", "true");
    exact(
        "/calico/v1/config/ClusterGUID",
        "0c1e2f9a8b7d4c3e9f1a2b3c4d5e6f70",
    );
    exact("/calico/v1/config/IpInIpEnabled", "true");
    exact(
        "/calico/v1/host/node1/config/IpInIpTunnelAddr",
        "192.168.12.0",
    );
    exact("/calico/v1/host/node1/metadata", "{}");
    exact("/calico/v1/host/node1/bird_ip", "10.0.0.5");
    exact(
        "/calico/v1/host/node1/orchestrator_refs",
        r#"[{"orchestrator":"k8s","nodeName":"node1"}]"#,
    );
    exact(
        "/calico/v1/host/node1/workload/k8s/default.nginx-1/endpoint/eth0",
        r#"{"state":"active","name":"cali7a8b9c0d1e2","active_instance_id":"9f86d081884c",
   "mac":"ee:ee:ee:ee:ee:ee","profile_ids":["k8s_ns.default"],"ipv4_nets":["192.168.12.1/32"],"ipv6_nets":[],
   "labels":{"app":"nginx"}}"#,
    );
    exact(
        "/calico/v1/host/node1/workload/docker/a%2fb/endpoint/ep%252",
        r#"{"state":"active","name":"cali0","active_instance_id":"","mac":null,"profile_ids":[],
        "ipv4_nets":[],"ipv6_nets":["fd00::1/128"],"ipv6_nat":[{"int_ip":"fd00::1","ext_ip":"fd01::1"}],
        "ipv6_gateway":"fd00::fe"}"#,
    );
    exact(
        "/calico/v1/host/node1/endpoint/eth0-ep",
        r#"{"name":"eth0","expected_ipv4_addrs":["10.0.0.5"],"labels":{"role":"gw"}}"#,
    );
    exact("/calico/v1/policy/profile/k8s_ns.default/tags", "null");
    exact(
        "/calico/v1/policy/profile/k8s_ns.default/labels",
        r#"{"calico/k8s_ns":"default"}"#,
    );
    exact(
        "/calico/v1/policy/profile/k8s_ns.default/rules",
        r#"{"inbound_rules":[{"action":"allow"}],"outbound_rules":[{"action":"allow"}]}"#,
    );
    exact("/calico/v1/policy/profile/empty/rules", "{}");
    exact(
        "/calico/v1/policy/tier/default/policy/web",
        r#"{"order":100,"inbound_rules":[{"action":"allow","protocol":"tcp","src_selector":"role == 'frontend'",
   "dst_ports":[80,"8080:8090"]}],"outbound_rules":[{"action":"allow"}],"selector":"app == 'web'",
   "types":["ingress","egress"]}"#,
    );
    exact(
        "/calico/v1/ipam/v4/pool/192.168.0.0-16",
        r#"{"cidr":"192.168.0.0/16","ipip":"tunl0","ipip_mode":"always","masquerade":true,"ipam":true,"disabled":false}"#,
    );
    exact(
        "/calico/v1/ipam/v6/pool/fd80:24e2:f998:72d6::-64",
        r#"{"cidr":"fd80:24e2:f998:72d6::/64","ipip":"","ipip_mode":"","masquerade":false,"ipam":true,"disabled":false}"#,
    );
    exact(
        "/calico/ipam/v2/config",
        r#"{"strict_affinity":true,"auto_allocate_blocks":true}"#,
    );
    exact(
        "/calico/ipam/v2/host/node1/ipv4/block/192.168.12.0-26",
        "{}",
    );
    let block = format!(
        r#"{{"cidr":"192.168.12.0/26","affinity":"host:node1","strictAffinity":false,"allocations":[0,1{}],"unallocated":[{}],"attributes":[{{"handle_id":null,"secondary":null}},{{"handle_id":"9f86d081884c","secondary":null}}]}}"#,
        ",null".repeat(62),
        (2..64).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
    );
    exact(
        "/calico/ipam/v2/assignment/ipv4/block/192.168.12.0-26",
        &block,
    );
    exact(
        "/calico/ipam/v2/handle/9f86d081884c",
        r#"{"block":{"192.168.12.0/26":1}}"#,
    );
    exact("/calico/bgp/v1/global/as_num", "64512");
    exact("/calico/bgp/v1/global/node_mesh", r#"{"enabled":true}"#);
    exact(
        "/calico/bgp/v1/global/peer_v4/10.0.0.254",
        r#"{"ip":"10.0.0.254","as_num":"64567"}"#,
    );
    exact("/calico/bgp/v1/host/node1/ip_addr_v4", "10.0.0.5");
    exact("/calico/bgp/v1/host/node1/ip_addr_v6", "");
    exact("/calico/bgp/v1/host/node1/network_v4", "10.0.0.0/24");
    exact(
        "/calico/felix/v1/host/node1/status",
        r#"{"time":"2017-11-30T12:00:00Z","uptime":3600.5,"first_update":false}"#,
    );
    exact(
        "/calico/felix/v1/host/node1/workload/k8s/default.nginx-1/endpoint/eth0",
        r#"{"status":"up"}"#,
    );
}

#[test]
fn every_rule_field_round_trips_in_go_order() {
    exact(
        "/calico/v1/policy/tier/default/policy/all-fields",
        r#"{"order":1.5,"inbound_rules":[{"action":"next-tier","ip_version":4,"protocol":6,"!protocol":"udp",
        "icmp_type":8,"icmp_code":0,"!icmp_type":3,"!icmp_code":1,
        "src_tag":"a","src_net":"10.0.0.0/8","src_nets":["10.1.0.0/16"],"src_selector":"x == 'y'","src_ports":[1,"2:3"],
        "dst_tag":"b","dst_selector":"has(z)","dst_net":"10.2.0.0/16","dst_nets":["10.3.0.0/16"],"dst_ports":[443],
        "!src_tag":"c","!src_net":"10.4.0.0/16","!src_nets":["10.5.0.0/16"],"!src_selector":"q == 'r'","!src_ports":[22],
        "!dst_tag":"d","!dst_selector":"all()","!dst_net":"10.6.0.0/16","!dst_nets":["10.7.0.0/16"],"!dst_ports":["100:200"],
        "log_prefix":"old"}],"selector":"","untracked":true,"annotations":{"k":"v"},"pre_dnat":true,"types":["ingress"]}"#,
    );
    exact(
        "/calico/v1/policy/profile/p/rules",
        r#"{"outbound_rules":[{"action":"deny","protocol":"icmpv6","icmp_type":128},{"action":"log"},{}]}"#,
    );
}

// ---- shapes from seeds/calico-etcd-structure.txt (the original document) ----

#[test]
fn seed_endpoint_with_single_profile_id() {
    upgraded(
        "/calico/v1/host/h1/workload/docker/c1/endpoint/e1",
        r#"{"state":"active","name":"cali12345","mac":"ee:ee:ee:ee:ee:ee","profile_id":"prof1",
            "ipv4_nets":["198.51.100.17/32"],"ipv6_nets":["2001:db8::19/128"],
            "ipv4_gateway":"198.51.100.1","ipv6_gateway":"2001:db8::1"}"#,
        r#"{"state":"active","name":"cali12345","active_instance_id":"","mac":"ee:ee:ee:ee:ee:ee",
            "profile_ids":["prof1"],"ipv4_nets":["198.51.100.17/32"],"ipv6_nets":["2001:db8::19/128"],
            "ipv4_gateway":"198.51.100.1","ipv6_gateway":"2001:db8::1"}"#,
    );
}

#[test]
fn seed_rules_with_tags_nets_and_port_lists() {
    upgraded(
        "/calico/v1/policy/profile/prof1/rules",
        r#"{"inbound_rules":[{"protocol":"tcp","src_tag":"web","src_net":"10.0.0.0/8",
             "src_ports":[1234,"2048:4000"],"dst_tag":"db","dst_net":"10.1.0.0/16","dst_ports":["80"],
             "action":"allow"}],
            "outbound_rules":[{"protocol":"icmp","icmp_type":8,"action":"deny"}]}"#,
        r#"{"inbound_rules":[{"action":"allow","protocol":"tcp","src_tag":"web","src_net":"10.0.0.0/8",
             "src_ports":[1234,"2048:4000"],"dst_tag":"db","dst_net":"10.1.0.0/16","dst_ports":[80]}],
            "outbound_rules":[{"action":"deny","protocol":"icmp","icmp_type":8}]}"#,
    );
}

#[test]
fn seed_pool_without_ipip_mode_or_ipam() {
    upgraded(
        "/calico/v1/ipam/v4/pool/192.168.0.0-16",
        r#"{"cidr":"192.168.0.0/16","ipip":"tunl0","masquerade":true}"#,
        r#"{"cidr":"192.168.0.0/16","ipip":"tunl0","ipip_mode":"","masquerade":true,"ipam":true,"disabled":false}"#,
    );
    upgraded(
        "/calico/v1/ipam/v6/pool/fd80:24e2:f998:72d6::-64",
        r#"{"cidr":"fd80:24e2:f998:72d6::/64"}"#,
        r#"{"cidr":"fd80:24e2:f998:72d6::/64","ipip":"","ipip_mode":"","masquerade":false,"ipam":true,"disabled":false}"#,
    );
}

#[test]
fn seed_block_with_primary_attributes_and_no_unallocated() {
    let allocations = format!("[0,0,0,1,2,2{}]", ",null".repeat(58));
    let stored = format!(
        r#"{{"cidr":"192.168.0.0/26","affinity":"host:calico-host-01","allocations":{allocations},
        "attributes":[{{"primary":"0cd47986-24ad-4c00-b9d3-5db9e5c02028","secondary":{{"container-id":"ba11f1de","email":"a@example.org"}}}},
                      {{"primary":"3465987ac","secondary":{{"container-name":"sandy_sabin"}}}},
                      {{"primary":"adf4589","secondary":{{"rack":"01"}}}}]}}"#
    );
    let unallocated = (6..64).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let written = format!(
        r#"{{"cidr":"192.168.0.0/26","affinity":"host:calico-host-01","strictAffinity":false,"allocations":{allocations},
        "unallocated":[{unallocated}],
        "attributes":[{{"handle_id":"0cd47986-24ad-4c00-b9d3-5db9e5c02028","secondary":{{"container-id":"ba11f1de","email":"a@example.org"}}}},
                      {{"handle_id":"3465987ac","secondary":{{"container-name":"sandy_sabin"}}}},
                      {{"handle_id":"adf4589","secondary":{{"rack":"01"}}}}]}}"#
    );
    upgraded(
        "/calico/ipam/v2/assignment/ipv4/block/192.168.0.0-26",
        &stored,
        &written,
    );
}

#[test]
fn legacy_host_affinity_becomes_affinity() {
    let stored = format!(
        r#"{{"cidr":"10.0.0.0/26","hostAffinity":"n1","allocations":[null{}],"attributes":[]}}"#,
        ",null".repeat(63)
    );
    let CalicoValue::IpamBlock(block) =
        decode_ok("/calico/ipam/v2/assignment/ipv4/block/10.0.0.0-26", &stored)
    else {
        panic!("not a block")
    };
    assert_eq!(block.affine_host(), Some("n1"));
    assert_eq!(block.unallocated, (0..64).collect::<Vec<_>>());
    let text = String::from_utf8(CalicoValue::IpamBlock(block).encode()).unwrap();
    assert!(text.contains(r#""affinity":"host:n1""#) && !text.contains("hostAffinity"));
}

#[test]
fn seed_handle_with_id_and_peer_and_mesh() {
    upgraded(
        "/calico/ipam/v2/handle/h1",
        r#"{"id":"h1","block":{"192.168.10.0/24":4,"2001:abcd:def0::/120":3}}"#,
        r#"{"block":{"192.168.10.0/24":4,"2001:abcd:def0::/120":3}}"#,
    );
    upgraded(
        "/calico/bgp/v1/global/node_mesh",
        r#"{"enabled": false}"#,
        r#"{"enabled":false}"#,
    );
    upgraded(
        "/calico/bgp/v1/host/h1/peer_v6/2001:db8::1",
        r#"{"ip":"2001:db8::1","as_num":64567}"#,
        r#"{"ip":"2001:db8::1","as_num":"64567"}"#,
    );
    upgraded("/calico/ipam/v2/host/h1/ipv4/block/10.0.0.0-26", "", "{}");
}

#[test]
fn invalid_values_name_the_reason() {
    let cases = [
        ("/calico/v1/Ready", "yes", "true or false"),
        (
            "/calico/v1/host/n/bird_ip",
            "fd00::1",
            "not an IPv4 address",
        ),
        (
            "/calico/v1/host/n/workload/o/w/endpoint/e",
            "{",
            "invalid JSON",
        ),
        (
            "/calico/v1/host/n/workload/o/w/endpoint/e",
            r#"{"state":"active","ipv4_nets":[]}"#,
            "missing interface name",
        ),
        (
            "/calico/v1/host/n/workload/o/w/endpoint/e",
            r#"{"state":"active","name":"c","mac":"zz"}"#,
            "not a MAC",
        ),
        (
            "/calico/v1/host/n/endpoint/e",
            "{}",
            "neither an interface name",
        ),
        (
            "/calico/v1/ipam/v4/pool/10.0.0.0-8",
            r#"{"cidr":"10.0.0.0/16"}"#,
            "does not match",
        ),
        (
            "/calico/v1/ipam/v4/pool/10.0.0.0-8",
            r#"{"cidr":"10.0.0.0/8","ipip_mode":"sometimes"}"#,
            "ipip_mode",
        ),
        (
            "/calico/ipam/v2/assignment/ipv4/block/10.0.0.0-26",
            r#"{"cidr":"10.0.0.0/26","allocations":[null]}"#,
            "allocation entries",
        ),
        (
            "/calico/ipam/v2/assignment/ipv4/block/10.0.0.0-30",
            r#"{"cidr":"10.0.0.0/30","allocations":[0,null,null,null],"attributes":[]}"#,
            "points at attribute",
        ),
        (
            "/calico/ipam/v2/assignment/ipv4/block/10.0.0.0-30",
            r#"{"cidr":"10.0.0.0/30","allocations":[null,null,null,null],"unallocated":[0,1,2],"attributes":[]}"#,
            "neither allocated nor free",
        ),
        (
            "/calico/v1/policy/tier/default/policy/p",
            r#"{"inbound_rules":[{"dst_ports":[80]}],"selector":""}"#,
            "ports need protocol",
        ),
        (
            "/calico/v1/policy/tier/default/policy/p",
            r#"{"inbound_rules":[{"src_nets":["10.0.0.0/8","fd00::/8"]}],"selector":""}"#,
            "mixes IPv4 and IPv6",
        ),
        (
            "/calico/v1/policy/tier/default/policy/p",
            r#"{"inbound_rules":[{"action":"accept"}],"selector":""}"#,
            "unknown rule action",
        ),
        (
            "/calico/bgp/v1/global/as_num",
            "64512.5.1",
            "not an AS number",
        ),
        ("/calico/bgp/v1/global/loglevel", "verbose", "log level"),
        (
            "/calico/bgp/v1/global/peer_v4/10.0.0.1",
            r#"{"ip":"10.0.0.2","as_num":"1"}"#,
            "does not match",
        ),
        (
            "/calico/bgp/v1/host/n/ip_addr_v4",
            "fd00::1",
            "wrong address family",
        ),
        (
            "/calico/felix/v1/host/n/endpoint/e",
            r#"{"status":"sideways"}"#,
            "invalid JSON",
        ),
    ];
    for (path, raw, want) in cases {
        let key = CalicoKey::parse(path).unwrap();
        let err = decode(&key, raw.as_bytes()).expect_err(path);
        assert!(err.reason.contains(want), "{path}: {err}");
        assert_eq!(err.key, path);
    }
}
