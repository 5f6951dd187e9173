//! A tenant VNIC as a Calico workload endpoint. The endpoint is the VNIC's record: besides
//! Calico's fields (interface name, MAC, address), labels say which tenant it belongs to
//! (so concentrators and policy tell overlapping tenants apart) and what the compute node
//! needs to destroy or recreate it after a restart (subnet, concentrator, kind).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::{IpNetwork, Ipv4Network};

use super::WorkloadEndpoint;
use crate::types::MacAddr;

/// The workload's tenant.
pub const TENANT_LABEL: &str = "tenet.tenant";
/// The tenant subnet, as `<network>-<prefix>` (label values cannot hold `/`).
pub const SUBNET_LABEL: &str = "tenet.subnet";
/// The concentrator's id and tunnel address.
pub const CONCENTRATOR_LABEL: &str = "tenet.concentrator";
pub const CONCENTRATOR_IP_LABEL: &str = "tenet.concentrator-ip";
/// `vm` or `container`.
pub const KIND_LABEL: &str = "tenet.kind";

/// The kind of a Docker endpoint's VNIC: a container whose address belongs to Docker's IPAM
/// driver (assigned and released through it, not by the agent).
pub const KIND_DOCKER: &str = "docker";

/// The Calico profile every VNIC of a tenant carries: its default security group. The
/// compute node creates it allowing everything (tenants are already isolated by their
/// bridges and tunnels); operators tighten it (`tenet replace profile`) or add policies.
pub fn tenant_profile(tenant: &str) -> String {
    format!("tenant.{tenant}")
}

/// The transaction that creates a tenant's default profile unless it exists (its `tags` key
/// defines existence, so it is the compare). Labels and rules go in the same transaction.
pub fn tenant_profile_txn(tenant: &str) -> crate::store::Txn {
    use super::CalicoKey;
    use crate::store::{Compare, Txn, TxnOp};
    let profile = tenant_profile(tenant);
    let tags = CalicoKey::ProfileTags {
        profile: profile.clone(),
    }
    .path();
    Txn::new()
        .when(Compare::absent(tags.clone()))
        .then(TxnOp::put(
            CalicoKey::ProfileLabels {
                profile: profile.clone(),
            }
            .path(),
            "{}",
        ))
        .then(TxnOp::put(
            CalicoKey::ProfileRules { profile }.path(),
            r#"{"inbound_rules":[{"action":"allow"}],"outbound_rules":[{"action":"allow"}]}"#,
        ))
        .then(TxnOp::put(tags, "[]"))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VnicRecord {
    pub tenant: String,
    pub subnet: Ipv4Network,
    pub concentrator: String,
    pub concentrator_ip: Ipv4Addr,
    pub kind: String,
    /// The host-side interface.
    pub ifname: String,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
}

impl VnicRecord {
    pub fn to_endpoint(&self) -> WorkloadEndpoint {
        let labels = BTreeMap::from([
            (TENANT_LABEL.to_string(), self.tenant.clone()),
            (
                SUBNET_LABEL.to_string(),
                format!("{}-{}", self.subnet.network(), self.subnet.prefix()),
            ),
            (CONCENTRATOR_LABEL.to_string(), self.concentrator.clone()),
            (
                CONCENTRATOR_IP_LABEL.to_string(),
                self.concentrator_ip.to_string(),
            ),
            (KIND_LABEL.to_string(), self.kind.clone()),
        ]);
        WorkloadEndpoint {
            state: "active".into(),
            name: self.ifname.clone(),
            active_instance_id: String::new(),
            mac: Some(self.mac),
            profile_ids: vec![tenant_profile(&self.tenant)],
            ipv4_nets: vec![IpNetwork::V4(Ipv4Network::new(self.ip, 32).expect("a /32"))],
            ipv6_nets: Vec::new(),
            ipv4_nat: Vec::new(),
            ipv6_nat: Vec::new(),
            labels,
            ipv4_gateway: None::<IpAddr>,
            ipv6_gateway: None,
        }
    }

    /// The record an endpoint written by [`VnicRecord::to_endpoint`] holds; an error names
    /// what is missing (an endpoint of someone else's, or edited by hand).
    pub fn from_endpoint(e: &WorkloadEndpoint) -> Result<Self, String> {
        let label = |k: &str| {
            e.labels
                .get(k)
                .cloned()
                .ok_or_else(|| format!("no {k} label"))
        };
        let subnet = label(SUBNET_LABEL)?;
        let subnet: Ipv4Network = subnet
            .rsplit_once('-')
            .and_then(|(n, p)| Ipv4Network::new(n.parse().ok()?, p.parse().ok()?).ok())
            .ok_or_else(|| format!("{SUBNET_LABEL} {subnet:?} is not <network>-<prefix>"))?;
        let ip = e
            .ipv4_nets
            .iter()
            .find_map(|n| match n {
                IpNetwork::V4(n) => Some(n.ip()),
                _ => None,
            })
            .ok_or("no IPv4 address")?;
        Ok(VnicRecord {
            tenant: label(TENANT_LABEL)?,
            subnet,
            concentrator: label(CONCENTRATOR_LABEL)?,
            concentrator_ip: label(CONCENTRATOR_IP_LABEL)?
                .parse()
                .map_err(|_| format!("{CONCENTRATOR_IP_LABEL} is not an IPv4 address"))?,
            kind: label(KIND_LABEL)?,
            ifname: e.name.clone(),
            mac: e.mac.ok_or("no MAC")?,
            ip,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_survives_the_endpoint() {
        let r = VnicRecord {
            tenant: "acme".into(),
            subnet: "172.16.0.0/24".parse().unwrap(),
            concentrator: "c1".into(),
            concentrator_ip: "10.254.0.2".parse().unwrap(),
            kind: "container".into(),
            ifname: "tvn_abc".into(),
            mac: "02:00:00:00:00:05".parse().unwrap(),
            ip: "172.16.0.5".parse().unwrap(),
        };
        let e = r.to_endpoint();
        assert_eq!(e.labels[SUBNET_LABEL], "172.16.0.0-24");
        let json = serde_json::to_vec(&e).unwrap();
        let back: WorkloadEndpoint = serde_json::from_slice(&json).unwrap();
        assert_eq!(VnicRecord::from_endpoint(&back).unwrap(), r);
        let mut bare = e.clone();
        bare.labels.remove(CONCENTRATOR_LABEL);
        assert!(
            VnicRecord::from_endpoint(&bare)
                .unwrap_err()
                .contains("tenet.concentrator")
        );
    }
}
