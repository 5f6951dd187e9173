//! START, DELETE and reconciliation when the node runs in routed mode: the address comes from
//! Calico's pools (IPAM scope `calico`, handle = the VNIC id, the block affine to this host,
//! which BIRD announces), the VNIC is a routed veth or tap (`crate::routed`), the endpoint
//! says `tenet.mode: routed`; no concentrator, no tunnel, no TenantAdded. The START's subnet
//! names the Calico pool to allocate from; its concentrator fields (ciao's) are not used.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use ipnetwork::{IpNetwork, Ipv4Network};
use ssntp::payload::{DeleteFailureReason, StartFailureReason};
use tenet::bgp::{BgpSpeaker, BirdOptions};
use tenet::calico::vnic::{KIND_LABEL, TENANT_LABEL, tenant_profile};
use tenet::calico::{Asn, CalicoKey, WorkloadEndpoint};
use tenet::ipam::{AutoAssignArgs, Ipam, IpamError};
use tenet::store::StoreError;
use tenet::types::MacAddr;
use tracing::{error, info, warn};

use super::Agent;
use super::instance::{Refused, StartRequest, Started, refuse};
use crate::config::VnicRole;
use crate::routed::{RoutedNode, RoutedVnicConfig};

/// The endpoint label that marks a routed VNIC.
pub const MODE_LABEL: &str = "tenet.mode";

/// How often the routes on routed VNICs are checked (Felix: RouteRefreshInterval, 90 s).
pub const ROUTE_REFRESH: Duration = Duration::from_secs(30);

/// What `tenet-cn run --mode routed` adds to the agent's configuration.
#[derive(Debug, Clone)]
pub struct RoutedConfig {
    /// The BIRD 2 program.
    pub bird: String,
    /// BIRD's configuration, control socket, pid and log files.
    pub run_dir: PathBuf,
    /// This host's AS number (default: the global one, 64512 unless configured).
    pub as_num: Option<Asn>,
    /// This host's IPv6 underlay address, for IPv6 sessions and routes.
    pub ip_v6: Option<std::net::Ipv6Addr>,
    pub bird_options: BirdOptions,
}

impl RoutedConfig {
    pub fn new() -> Self {
        RoutedConfig {
            bird: "bird".into(),
            run_dir: PathBuf::from("/run/tenet/bird"),
            as_num: None,
            ip_v6: None,
            bird_options: BirdOptions::default(),
        }
    }
}

impl Default for RoutedConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// The routed mode's parts of a running agent.
pub(crate) struct RoutedParts {
    pub node: RoutedNode,
    /// Calico's IPAM (pools, blocks affine to hosts).
    pub ipam: Ipam,
    pub speaker: Mutex<Option<BgpSpeaker>>,
}

fn routed_endpoint(
    tenant: &str,
    kind: &str,
    ifname: &str,
    mac: MacAddr,
    ip: Ipv4Addr,
) -> WorkloadEndpoint {
    WorkloadEndpoint {
        state: "active".into(),
        name: ifname.to_string(),
        active_instance_id: String::new(),
        mac: Some(mac),
        profile_ids: vec![tenant_profile(tenant)],
        ipv4_nets: vec![IpNetwork::V4(Ipv4Network::new(ip, 32).expect("a /32"))],
        ipv6_nets: Vec::new(),
        ipv4_nat: Vec::new(),
        ipv6_nat: Vec::new(),
        labels: BTreeMap::from([
            (TENANT_LABEL.to_string(), tenant.to_string()),
            (KIND_LABEL.to_string(), kind.to_string()),
            (MODE_LABEL.to_string(), "routed".to_string()),
        ]),
        ipv4_gateway: None,
        ipv6_gateway: None,
    }
}

/// Whether an endpoint is a routed VNIC's.
pub(crate) fn is_routed(e: &WorkloadEndpoint) -> bool {
    e.labels.get(MODE_LABEL).map(String::as_str) == Some("routed")
}

impl Agent {
    /// START in routed mode: address, routed VNIC, endpoint. A failure undoes what was done.
    pub(super) async fn start_routed(
        &self,
        routed: &RoutedParts,
        r: &StartRequest,
    ) -> Result<Started, Refused<StartFailureReason>> {
        let key = self.unstarted_endpoint(r).await?;
        let network = |e: String| refuse(StartFailureReason::NetworkFailure, e);
        let attributes: BTreeMap<String, String> = [
            ("instance".to_string(), r.instance.clone()),
            ("tenant".to_string(), r.tenant.clone()),
        ]
        .into();
        let ip = match r.ip {
            Some(ip) => routed
                .ipam
                .assign_ip(IpAddr::V4(ip), Some(&r.vnic), attributes, &self.host)
                .await
                .map(|()| Some(ip)),
            None => routed
                .ipam
                .auto_assign(&AutoAssignArgs {
                    num_v4: 1,
                    handle: Some(r.vnic.clone()),
                    attributes,
                    host: self.host.clone(),
                    pools_v4: Some(vec![IpNetwork::V4(r.subnet)]),
                    ..AutoAssignArgs::default()
                })
                .await
                .map(|(v4, _)| match v4.first() {
                    Some(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                }),
        }
        .map_err(|e| match e {
            IpamError::AlreadyAssigned(_) | IpamError::NotInPool(_) | IpamError::Reserved(_) => {
                refuse(StartFailureReason::InvalidData, e.to_string())
            }
            IpamError::PoolNotFound(_) => refuse(
                StartFailureReason::InvalidData,
                format!(
                    "routed mode allocates from the Calico pool the START names as its subnet; \
                     {} is not a pool (tenet ipam pool add {})",
                    r.subnet, r.subnet
                ),
            ),
            IpamError::NoFreeAddress(_) => refuse(StartFailureReason::FullCloud, e.to_string()),
            e => network(format!("allocating an address from pool {}: {e}", r.subnet)),
        })?
        .ok_or_else(|| {
            refuse(
                StartFailureReason::FullCloud,
                format!("pool {} has no free address", r.subnet),
            )
        })?;
        let ip6 = match r.pool6 {
            None => None,
            Some(pool6) => {
                let args = AutoAssignArgs {
                    num_v6: 1,
                    handle: Some(r.vnic.clone()),
                    attributes: [
                        ("instance".to_string(), r.instance.clone()),
                        ("tenant".to_string(), r.tenant.clone()),
                    ]
                    .into(),
                    host: self.host.clone(),
                    pools_v6: Some(vec![IpNetwork::V6(pool6)]),
                    ..AutoAssignArgs::default()
                };
                let got = routed.ipam.auto_assign(&args).await;
                match got.as_ref().map(|(_, v6)| v6.first()) {
                    Ok(Some(IpAddr::V6(ip6))) => Some(*ip6),
                    _ => {
                        self.release_routed(routed, &r.vnic).await;
                        return Err(match got {
                            Err(IpamError::PoolNotFound(_)) => refuse(
                                StartFailureReason::InvalidData,
                                format!(
                                    "{pool6} is not a Calico pool (tenet ipam pool add {pool6})"
                                ),
                            ),
                            Err(e) => {
                                network(format!("allocating an address from pool {pool6}: {e}"))
                            }
                            Ok(_) => refuse(
                                StartFailureReason::FullCloud,
                                format!("pool {pool6} has no free address"),
                            ),
                        });
                    }
                }
            }
        };
        let mac = r.mac.unwrap_or_else(|| super::instance::mac_for(&r.vnic));
        let config =
            RoutedVnicConfig {
                vnic_id: r.vnic.clone(),
                tenant_id: r.tenant.clone(),
                role: if r.container {
                    VnicRole::Container
                } else {
                    VnicRole::Vm
                },
                addresses: std::iter::once(IpNetwork::V4(Ipv4Network::new(ip, 32).expect("a /32")))
                    .chain(ip6.map(|a| {
                        IpNetwork::V6(ipnetwork::Ipv6Network::new(a, 128).expect("a /128"))
                    }))
                    .collect(),
                mac: Some(mac),
                netns: r.netns.clone(),
                ifname: r.ifname.clone(),
                mtu: None,
                queues: r.queues,
            };
        let (vnic, queues) = match routed.node.create_vnic(&config).await {
            Ok(v) => v,
            Err(e) => {
                self.release_routed(routed, &r.vnic).await;
                return Err(network(format!("creating the routed VNIC: {e}")));
            }
        };
        let kind = if r.container { "container" } else { "vm" };
        let mut endpoint = routed_endpoint(&r.tenant, kind, &vnic.ifname, vnic.mac, ip);
        endpoint.ipv6_nets = ip6
            .map(|a| IpNetwork::V6(ipnetwork::Ipv6Network::new(a, 128).expect("a /128")))
            .into_iter()
            .collect();
        let value = serde_json::to_vec(&endpoint).expect("endpoints serialise");
        let written = match self.ensure_tenant_profile(&r.tenant).await {
            Ok(()) => self.store.put(&key, &value).await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            if let Err(undo) = routed.node.destroy_vnic(&r.vnic).await {
                warn!(vnic = %r.vnic, error = %undo, "undoing a routed VNIC after its endpoint failed");
            }
            self.release_routed(routed, &r.vnic).await;
            return Err(network(format!("writing the endpoint: {e}")));
        }
        info!(instance = %r.instance, vnic = %r.vnic, %ip, ifname = %vnic.ifname, "instance started (routed)");
        Ok(Started {
            tunnel: None,
            vnic: crate::node::Vnic {
                id: vnic.vnic_id,
                role: vnic.role,
                ifname: vnic.ifname,
                index: vnic.index,
                peer: None,
                bridge: String::new(),
                mtu: 0,
                queues,
            },
            ip,
            ip6,
            mac: vnic.mac,
        })
    }

    /// DELETE of one routed VNIC: link, endpoint, address.
    pub(super) async fn delete_routed(
        &self,
        routed: &RoutedParts,
        instance: &str,
        vnic: &str,
        key: &str,
    ) -> Result<(), Refused<DeleteFailureReason>> {
        routed.node.destroy_vnic(vnic).await.map_err(|e| {
            refuse(
                DeleteFailureReason::InvalidData,
                format!("destroying routed VNIC {vnic}: {e}"),
            )
        })?;
        match self.store.delete(key, None).await {
            Ok(_) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => warn!(%key, error = %e, "could not delete the endpoint"),
        }
        self.release_routed(routed, vnic).await;
        info!(%instance, %vnic, "routed VNIC deleted");
        Ok(())
    }

    async fn release_routed(&self, routed: &RoutedParts, vnic: &str) {
        match routed.ipam.release_by_handle(vnic).await {
            Ok(_) | Err(IpamError::HandleNotFound(_)) => {}
            Err(e) => {
                warn!(%vnic, error = %e, "could not release the address (tenet ipam check finds it)")
            }
        }
    }

    /// After a restart: a routed VM endpoint whose tap is missing gets it back (a container's
    /// cannot: its namespace is the runtime's, so it is reported); a routed VNIC without an
    /// endpoint (a START cut short) goes, with its address.
    pub(super) async fn reconcile_routed(&self, routed: &RoutedParts) -> Result<(), StoreError> {
        let prefix = format!(
            "{}{}/workload/",
            tenet::calico::HOSTS,
            tenet::calico::escape_name(&self.host),
        );
        let present: HashSet<String> = routed.node.vnics().into_iter().map(|v| v.vnic_id).collect();
        let mut known = HashSet::new();
        let mut recreated = 0;
        for kv in self.store.list(&prefix).await?.kvs {
            let Ok(CalicoKey::WorkloadEndpoint(id)) = CalicoKey::parse(&kv.key) else {
                continue;
            };
            let Ok(endpoint) = serde_json::from_slice::<WorkloadEndpoint>(&kv.value) else {
                continue;
            };
            if !is_routed(&endpoint) {
                continue;
            }
            known.insert(id.endpoint.clone());
            if present.contains(&id.endpoint) {
                continue;
            }
            let kind = endpoint.labels.get(KIND_LABEL).map(String::as_str);
            let tenant = endpoint
                .labels
                .get(TENANT_LABEL)
                .cloned()
                .unwrap_or_default();
            if kind != Some("vm") {
                error!(instance = %id.workload, vnic = %id.endpoint, "a routed container's VNIC is gone; its runtime must create it again");
                continue;
            }
            let config = RoutedVnicConfig {
                vnic_id: id.endpoint.clone(),
                tenant_id: tenant,
                role: VnicRole::Vm,
                addresses: endpoint.ipv4_nets.clone(),
                mac: endpoint.mac,
                netns: None,
                ifname: "eth0".into(),
                mtu: None,
                queues: 1,
            };
            match routed.node.create_vnic(&config).await {
                Ok(_) => recreated += 1,
                Err(e) => {
                    error!(vnic = %id.endpoint, error = %e, "could not recreate a routed VNIC")
                }
            }
        }
        let mut orphans = 0;
        for v in routed.node.vnics() {
            if known.contains(&v.vnic_id) {
                continue;
            }
            warn!(vnic = %v.vnic_id, tenant = %v.tenant_id, "removing a routed VNIC without an endpoint (a START cut short)");
            if let Err(e) = routed.node.destroy_vnic(&v.vnic_id).await {
                error!(vnic = %v.vnic_id, error = %e, "could not remove a routed VNIC");
            }
            self.release_routed(routed, &v.vnic_id).await;
            orphans += 1;
        }
        info!(recreated, orphans, "routed VNICs reconciled with etcd");
        Ok(())
    }
}
