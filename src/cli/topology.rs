//! The live topology as Graphviz DOT (`tenet status -o dot`, `tenet lab --graph`): compute
//! hosts with their workloads and addresses, concentrators per tenant, the tunnels between
//! them with their subnets and keys, and the external network beyond the concentrators.
//! Built from what the agents publish in etcd (status keys, labelled endpoints), so the
//! picture is the running system's, not a plan's.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use tenet::calico::vnic::VnicRecord;
use tenet::calico::{CalicoKey, HOSTS, WorkloadEndpoint};
use tenet::keyspace::node::{self, NodeRole, NodeStatus};
use tenet::store::{Datastore, StoreError};
use tenet::types::TunnelKey;

/// A workload endpoint tenet made, with the host it is on.
#[derive(Clone, Debug)]
pub struct PlacedVnic {
    pub host: String,
    pub workload: String,
    pub vnic: VnicRecord,
}

/// Everything the picture needs, read from etcd.
pub struct Topology {
    pub nodes: Vec<NodeStatus>,
    pub vnics: Vec<PlacedVnic>,
}

impl Topology {
    pub async fn load(store: &dyn Datastore) -> Result<Topology, StoreError> {
        let mut nodes = Vec::new();
        for kv in store.list(&node::prefix()).await?.kvs {
            if let Ok(n) = node::decode(&kv.key, &kv.value) {
                nodes.push(n);
            }
        }
        let mut vnics = Vec::new();
        for kv in store.list(HOSTS).await?.kvs {
            let Ok(CalicoKey::WorkloadEndpoint(id)) = CalicoKey::parse(&kv.key) else {
                continue;
            };
            let Ok(ep) = serde_json::from_slice::<WorkloadEndpoint>(&kv.value) else {
                continue;
            };
            if let Ok(vnic) = VnicRecord::from_endpoint(&ep) {
                vnics.push(PlacedVnic {
                    host: id.host,
                    workload: id.workload,
                    vnic,
                });
            }
        }
        Ok(Topology { nodes, vnics })
    }

    /// The DOT text; `names` may give workloads friendlier labels than their instance ids.
    pub fn dot(&self, names: &BTreeMap<String, String>) -> String {
        let mut out = String::from(
            "digraph tenet {\n  graph [rankdir=LR, fontname=\"Helvetica\", label=\"tenet: live topology\", labelloc=t];\n  node [fontname=\"Helvetica\", fontsize=10];\n  edge [fontname=\"Helvetica\", fontsize=9];\n",
        );
        let tenants: BTreeSet<&str> = self
            .nodes
            .iter()
            .filter_map(|n| n.tenant.as_deref())
            .chain(self.vnics.iter().map(|v| v.vnic.tenant.as_str()))
            .collect();
        let color = |tenant: &str| {
            const PALETTE: [&str; 6] = [
                "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
            ];
            let i = tenants.iter().position(|t| *t == tenant).unwrap_or(0);
            PALETTE[i % PALETTE.len()]
        };
        let id = |s: &str| format!("\"{}\"", s.replace('"', "'"));

        // Compute hosts, each a cluster holding its workloads.
        let mut by_host: BTreeMap<&str, Vec<&PlacedVnic>> = BTreeMap::new();
        for v in &self.vnics {
            by_host.entry(v.host.as_str()).or_default().push(v);
        }
        let compute: Vec<&NodeStatus> = self
            .nodes
            .iter()
            .filter(|n| n.role == NodeRole::ComputeNode)
            .collect();
        let mut hosts: BTreeSet<&str> = compute.iter().map(|n| n.name.as_str()).collect();
        hosts.extend(by_host.keys());
        for host in &hosts {
            let underlay = compute
                .iter()
                .find(|n| n.name == *host)
                .map(|n| n.underlay_ip.to_string())
                .unwrap_or_else(|| "agent down".into());
            out.push_str(&format!(
                "  subgraph {} {{\n    label=\"compute host {host}\\n{underlay}\"; style=rounded; color=gray;\n    {} [label=\"tenet-cn\\n{underlay}\", shape=box3d];\n",
                id(&format!("cluster_{host}")),
                id(&format!("cn:{host}"))
            ));
            for v in by_host.get(host).into_iter().flatten() {
                let name = names.get(&v.workload).unwrap_or(&v.workload);
                out.push_str(&format!(
                    "    {} [label=\"{name}\\n{}\\n{}\", shape=box, style=filled, fillcolor=\"{}33\", color=\"{}\"];\n    {} -> {} [dir=none, color=\"{}\"];\n",
                    id(&format!("wl:{}", v.workload)),
                    v.vnic.ip,
                    v.vnic.tenant,
                    color(&v.vnic.tenant),
                    color(&v.vnic.tenant),
                    id(&format!("wl:{}", v.workload)),
                    id(&format!("cn:{host}")),
                    color(&v.vnic.tenant),
                ));
            }
            out.push_str("  }\n");
        }

        // Concentrators, one per tenant, and the external network beyond them.
        let concentrators: Vec<&NodeStatus> = self
            .nodes
            .iter()
            .filter(|n| n.role == NodeRole::Concentrator)
            .collect();
        for c in &concentrators {
            let tenant = c.tenant.as_deref().unwrap_or("?");
            out.push_str(&format!(
                "  {} [label=\"tenet-cnci ({tenant})\\n{}\\ndnsmasq, NAT, floating IPs\", shape=box3d, style=filled, fillcolor=\"{}33\", color=\"{}\"];\n  {} -> \"external\" [dir=none, label=\"uplink\"];\n",
                id(&format!("cnci:{}", c.uuid)),
                c.underlay_ip,
                color(tenant),
                color(tenant),
                id(&format!("cnci:{}", c.uuid)),
            ));
        }
        if !concentrators.is_empty() {
            out.push_str(
                "  \"external\" [label=\"external network\", shape=ellipse, style=dashed];\n",
            );
        }

        // Tunnels: one per (compute host, tenant subnet, concentrator), from the endpoints.
        let mut tunnels: BTreeSet<(&str, &str, Ipv4Network, &str, Ipv4Addr)> = BTreeSet::new();
        for v in &self.vnics {
            tunnels.insert((
                v.host.as_str(),
                v.vnic.tenant.as_str(),
                v.vnic.subnet,
                v.vnic.concentrator.as_str(),
                v.vnic.concentrator_ip,
            ));
        }
        for (host, tenant, subnet, conc, conc_ip) in tunnels {
            let key = TunnelKey::from_subnet(&subnet)
                .map(|k| k.to_string())
                .unwrap_or_else(|_| "?".into());
            let target = if concentrators.iter().any(|c| c.uuid == conc) {
                id(&format!("cnci:{conc}"))
            } else {
                let missing = id(&format!("cnci:{conc}"));
                out.push_str(&format!(
                    "  {missing} [label=\"concentrator {conc_ip}\\n(not running)\", shape=box3d, style=dashed];\n"
                ));
                missing
            };
            out.push_str(&format!(
                "  {} -> {target} [label=\"{tenant} {subnet}\\nkey {key}\", color=\"{}\", style=bold];\n",
                id(&format!("cn:{host}")),
                color(tenant),
            ));
        }
        out.push_str("}\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vnic(tenant: &str, ip: &str, conc: &str) -> VnicRecord {
        VnicRecord {
            tenant: tenant.into(),
            subnet: "172.16.0.0/24".parse().unwrap(),
            concentrator: conc.into(),
            concentrator_ip: "10.254.0.3".parse().unwrap(),
            kind: "container".into(),
            ifname: "tvn_x".into(),
            mac: "02:00:00:00:00:01".parse().unwrap(),
            ip: ip.parse().unwrap(),
        }
    }

    #[test]
    fn the_picture_has_hosts_workloads_tunnels_and_concentrators() {
        let nodes = vec![
            NodeStatus {
                uuid: "u-cn".into(),
                role: NodeRole::ComputeNode,
                name: "cn-1".into(),
                tenant: None,
                underlay_ip: "10.254.0.1".parse().unwrap(),
                version: "0".into(),
                started: 0,
                subnets: vec![],
                tunnels: 1,
            },
            NodeStatus {
                uuid: "c-1".into(),
                role: NodeRole::Concentrator,
                name: "c-1".into(),
                tenant: Some("acme".into()),
                underlay_ip: "10.254.0.3".parse().unwrap(),
                version: "0".into(),
                started: 0,
                subnets: vec![],
                tunnels: 1,
            },
        ];
        let vnics = vec![
            PlacedVnic {
                host: "cn-1".into(),
                workload: "i-1".into(),
                vnic: vnic("acme", "172.16.0.2", "c-1"),
            },
            PlacedVnic {
                host: "cn-1".into(),
                workload: "i-2".into(),
                vnic: vnic("globex", "172.16.0.2", "c-gone"),
            },
        ];
        let names = BTreeMap::from([("i-1".to_string(), "acme-1".to_string())]);
        let dot = Topology { nodes, vnics }.dot(&names);
        assert!(dot.starts_with("digraph tenet {") && dot.ends_with("}\n"));
        assert!(dot.contains("\"cluster_cn-1\""), "{dot}");
        assert!(dot.contains("acme-1\\n172.16.0.2\\nacme"), "{dot}");
        assert!(
            dot.contains("\"cn:cn-1\" -> \"cnci:c-1\" [label=\"acme 172.16.0.0/24\\nkey 4268\""),
            "{dot}"
        );
        assert!(
            dot.contains("(not running)"),
            "a tunnel to a missing concentrator: {dot}"
        );
        assert!(dot.contains("external network"), "{dot}");
        // Braces balance (the output parses as one graph).
        assert_eq!(dot.matches('{').count(), dot.matches('}').count());
    }
}
