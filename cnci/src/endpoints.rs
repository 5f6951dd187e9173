//! The MAC → IP bindings dnsmasq hands out, taken from the tenant's workload endpoints in
//! etcd (`/calico/v1/host/<h>/workload/<o>/<w>/endpoint/<e>`).
//!
//! [`EndpointTable`] is pure: it takes the listing and the watch events and answers which
//! bindings fall in a subnet. An endpoint is this concentrator's when its `tenet.tenant` label
//! names the tenant (tenants may use the same addresses) and it has a MAC and an IPv4 address.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::{IpNetwork, Ipv4Network};
use tenet::calico::{CalicoKey, CalicoValue, WorkloadEndpoint, decode};
use tracing::debug;

use crate::config::TENANT_LABEL;
use crate::dnsmasq::{HostBinding, dns_label};

/// The tenant's endpoints with a binding, by etcd key.
#[derive(Debug, Clone)]
pub struct EndpointTable {
    tenant: String,
    bindings: BTreeMap<String, HostBinding>,
}

impl EndpointTable {
    pub fn new(tenant: &str) -> Self {
        EndpointTable {
            tenant: tenant.into(),
            bindings: BTreeMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.bindings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bindings.is_empty()
    }

    /// Replaces the table with a listing; returns the addresses whose binding changed.
    pub fn reset<'a>(&mut self, kvs: impl Iterator<Item = (&'a str, &'a [u8])>) -> Vec<Ipv4Addr> {
        let old = std::mem::take(&mut self.bindings);
        for (key, value) in kvs {
            if let Some(b) = self.binding_of(key, value) {
                self.bindings.insert(key.to_string(), b);
            }
        }
        let mut changed: Vec<Ipv4Addr> = old
            .iter()
            .filter(|(k, b)| self.bindings.get(*k) != Some(b))
            .map(|(_, b)| b.ip)
            .chain(
                self.bindings
                    .iter()
                    .filter(|(k, b)| old.get(*k) != Some(b))
                    .map(|(_, b)| b.ip),
            )
            .collect();
        changed.sort();
        changed.dedup();
        changed
    }

    /// A put of `key`; returns the addresses whose binding changed (the old and the new).
    pub fn put(&mut self, key: &str, value: &[u8]) -> Vec<Ipv4Addr> {
        let new = self.binding_of(key, value);
        let old = match &new {
            Some(b) => self.bindings.insert(key.to_string(), b.clone()),
            None => self.bindings.remove(key),
        };
        if old == new {
            return Vec::new();
        }
        old.into_iter().chain(new).map(|b| b.ip).collect()
    }

    /// A delete of `key`; returns the address whose binding went.
    pub fn delete(&mut self, key: &str) -> Vec<Ipv4Addr> {
        self.bindings
            .remove(key)
            .map(|b| b.ip)
            .into_iter()
            .collect()
    }

    /// The bindings inside `subnet`.
    pub fn bindings_in(&self, subnet: &Ipv4Network) -> Vec<HostBinding> {
        self.bindings
            .values()
            .filter(|b| subnet.contains(b.ip))
            .cloned()
            .collect()
    }

    fn binding_of(&self, key: &str, value: &[u8]) -> Option<HostBinding> {
        let parsed = CalicoKey::parse(key).ok()?;
        let CalicoKey::WorkloadEndpoint(id) = &parsed else {
            return None;
        };
        let endpoint: WorkloadEndpoint = match decode(&parsed, value) {
            Ok(CalicoValue::WorkloadEndpoint(e)) => e,
            Ok(_) => return None,
            Err(e) => {
                debug!(key, error = %e.reason, "ignoring an endpoint that does not decode");
                return None;
            }
        };
        if endpoint.labels.get(TENANT_LABEL) != Some(&self.tenant) {
            return None;
        }
        let ip = endpoint.ipv4_nets.iter().find_map(|n| match n {
            IpNetwork::V4(v4) => Some(v4.ip()),
            IpNetwork::V6(_) => None,
        })?;
        Some(HostBinding {
            ip,
            mac: endpoint.mac?,
            name: dns_label(&id.workload),
        })
    }
}

/// The subnets among `subnets` that hold one of `ips`.
pub fn affected<'a>(
    subnets: impl Iterator<Item = &'a Ipv4Network>,
    ips: &[Ipv4Addr],
) -> Vec<Ipv4Network> {
    subnets
        .filter(|s| ips.iter().any(|ip| s.contains(*ip)))
        .copied()
        .collect()
}

/// A workload endpoint value carrying a tenant label, as the agents write it (for tests and
/// tools): `ifname` is the VNIC's host-side interface.
pub fn endpoint_value(
    tenant: &str,
    ifname: &str,
    mac: tenet::types::MacAddr,
    ip: Ipv4Addr,
) -> Vec<u8> {
    let endpoint = WorkloadEndpoint {
        state: "active".into(),
        name: ifname.into(),
        active_instance_id: String::new(),
        mac: Some(mac),
        profile_ids: Vec::new(),
        ipv4_nets: vec![IpNetwork::V4(Ipv4Network::new(ip, 32).expect("/32"))],
        ipv6_nets: Vec::new(),
        ipv4_nat: Vec::new(),
        ipv6_nat: Vec::new(),
        labels: BTreeMap::from([(TENANT_LABEL.to_string(), tenant.to_string())]),
        ipv4_gateway: None::<IpAddr>,
        ipv6_gateway: None,
    };
    serde_json::to_vec(&endpoint).expect("endpoints serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "/calico/v1/host/cn1/workload/ciao/vm-1/endpoint/vnic-1";

    fn value(tenant: &str, mac: &str, ip: &str) -> Vec<u8> {
        endpoint_value(
            tenant,
            "tvn_00000001",
            mac.parse().unwrap(),
            ip.parse().unwrap(),
        )
    }

    #[test]
    fn only_the_tenants_endpoints_bind_and_changes_name_their_addresses() {
        let mut t = EndpointTable::new("t1");
        let net: Ipv4Network = "172.16.0.0/24".parse().unwrap();
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            t.put(KEY, &value("t1", "02:00:00:00:00:05", "172.16.0.5")),
            [ip("172.16.0.5")]
        );
        assert_eq!(
            t.put(KEY, &value("t1", "02:00:00:00:00:05", "172.16.0.5"))
                .len(),
            0
        );
        let other = "/calico/v1/host/cn1/workload/ciao/vm-2/endpoint/vnic-2";
        assert_eq!(
            t.put(other, &value("t2", "02:00:00:00:00:06", "172.16.0.6"))
                .len(),
            0
        );
        assert_eq!(t.put("/calico/v1/host/cn1/metadata", b"{}").len(), 0);
        assert_eq!(t.put(other, b"not json").len(), 0);
        let got = t.bindings_in(&net);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name.as_deref(), Some("vm-1"));
        // Moved to another address: both are affected.
        assert_eq!(
            t.put(KEY, &value("t1", "02:00:00:00:00:05", "172.16.0.7")),
            [ip("172.16.0.5"), ip("172.16.0.7")]
        );
        // Relabelled to another tenant: no longer ours.
        assert_eq!(
            t.put(KEY, &value("t2", "02:00:00:00:00:05", "172.16.0.7")),
            [ip("172.16.0.7")]
        );
        assert!(t.is_empty());
        t.put(KEY, &value("t1", "02:00:00:00:00:05", "172.16.0.7"));
        assert_eq!(t.delete(KEY), [ip("172.16.0.7")]);
        let changed = t.reset(
            [(
                KEY,
                value("t1", "02:00:00:00:00:05", "172.16.0.9").as_slice(),
            )]
            .into_iter(),
        );
        assert_eq!(changed, [ip("172.16.0.9")]);
        assert_eq!(
            affected([net, "10.0.0.0/8".parse().unwrap()].iter(), &changed),
            [net]
        );
    }
}
