//! START and DELETE: an instance's VNIC, its address, its endpoint and its tunnel, each step
//! undone when a later one fails, so a failed START leaves nothing behind.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use ipnetwork::Ipv4Network;
use ssntp::payload::{DeleteFailureReason, StartCommand, StartFailureReason};
use tenet::calico::vnic::{self, VnicRecord};
use tenet::calico::{CalicoKey, WorkloadEndpoint, WorkloadEndpointId};
use tenet::ipam::{IpamError, ThenWrite};
use tenet::store::{StoreError, TxnOp};
use tenet::types::{MacAddr, TunnelKey, gateway_of};
use tracing::{info, warn};

use super::Agent;
use crate::config::{ContainerNetns, VnicConfig, VnicRole};
use crate::node::{CreatedVnic, TunnelEvent, TunnelEventKind};

/// Why an instance could not be started, in ciao's terms and in words.
#[derive(Debug)]
pub struct Refused<R> {
    pub reason: R,
    pub detail: String,
}

pub(super) fn refuse<R>(reason: R, detail: impl Into<String>) -> Refused<R> {
    Refused {
        reason,
        detail: detail.into(),
    }
}

/// What a START asks for, checked.
#[derive(Debug, Clone)]
pub struct StartRequest {
    pub instance: String,
    pub vnic: String,
    pub tenant: String,
    pub subnet: Ipv4Network,
    pub concentrator: String,
    pub concentrator_ip: Ipv4Addr,
    pub mac: Option<MacAddr>,
    pub ip: Option<Ipv4Addr>,
    pub container: bool,
    pub netns: Option<PathBuf>,
    /// The interface's name inside a container's namespace (CNI_IFNAME; `eth0` otherwise).
    pub ifname: String,
    /// Routed mode: also an IPv6 address from this Calico pool (dual stack).
    pub pool6: Option<ipnetwork::Ipv6Network>,
    /// A Docker endpoint: its address (`ip`) was assigned in the tenant's IPAM by Docker's
    /// IPAM driver, which also releases it; the agent neither assigns nor releases it.
    pub docker: bool,
    /// VM taps: how many queue descriptors to open (the local API hands them out).
    pub queues: usize,
}

/// The interface name a container gets unless its runtime names one.
pub const CONTAINER_IFNAME: &str = "eth0";

/// A START's address and VNIC, before its endpoint is written.
struct Made {
    ip: Ipv4Addr,
    config: VnicConfig,
    created: CreatedVnic,
}

/// What a START made.
#[derive(Debug)]
pub struct Started {
    /// TenantAdded to send when the subnet's tunnel is new.
    pub tunnel: Option<TunnelEvent>,
    pub vnic: crate::node::Vnic,
    pub ip: Ipv4Addr,
    /// Routed dual stack: its IPv6 address.
    pub ip6: Option<std::net::Ipv6Addr>,
    pub mac: MacAddr,
}

/// START → the request (pure): every field tenet uses is checked and named when wrong.
pub fn start_request(s: &StartCommand) -> Result<StartRequest, Refused<StartFailureReason>> {
    let bad = |what: String| refuse(StartFailureReason::InvalidData, what);
    let n = &s.networking;
    if s.instance_uuid.trim().is_empty() {
        return Err(bad("instance_uuid is empty".into()));
    }
    if s.tenant_uuid.trim().is_empty() {
        return Err(bad("tenant_uuid is empty".into()));
    }
    let subnet: Ipv4Network = n.subnet.trim().parse().map_err(|_| {
        bad(format!(
            "networking.subnet {:?} is not an IPv4 CIDR",
            n.subnet
        ))
    })?;
    if subnet.ip() != subnet.network() || TunnelKey::from_subnet(&subnet).is_err() {
        return Err(bad(format!(
            "networking.subnet {subnet} is not a network address with a tunnel key"
        )));
    }
    // A routed node needs no concentrator; a GRE node refuses a START without one.
    let concentrator_ip = match n.concentrator_ip.trim() {
        "" if n.concentrator_uuid.trim().is_empty() => Ipv4Addr::UNSPECIFIED,
        text => text.parse().map_err(|_| {
            bad(format!(
                "networking.concentrator_ip {:?} is not an IPv4 address",
                n.concentrator_ip
            ))
        })?,
    };
    let mac = match n.vnic_mac.trim() {
        "" => None,
        m => Some(
            m.parse::<MacAddr>()
                .map_err(|_| bad(format!("networking.vnic_mac {m:?} is not a MAC address")))?,
        ),
    };
    let ip = match n.private_ip.trim() {
        "" => None,
        a => Some(a.parse::<Ipv4Addr>().map_err(|_| {
            bad(format!(
                "networking.private_ip {a:?} is not an IPv4 address"
            ))
        })?),
    };
    if let Some(ip) = ip
        && !subnet.contains(ip)
    {
        return Err(bad(format!(
            "networking.private_ip {ip} is not in {subnet}"
        )));
    }
    let vnic = match n.vnic_uuid.trim() {
        "" => s.instance_uuid.trim().to_string(),
        v => v.to_string(),
    };
    let netns = match n.netns.trim() {
        "" => None,
        p => Some(PathBuf::from(p)),
    };
    Ok(StartRequest {
        instance: s.instance_uuid.trim().to_string(),
        vnic,
        tenant: s.tenant_uuid.trim().to_string(),
        subnet,
        concentrator: n.concentrator_uuid.trim().to_string(),
        concentrator_ip,
        mac,
        ip,
        container: netns.is_some() || s.vm_type == "docker",
        netns,
        ifname: CONTAINER_IFNAME.into(),
        pool6: None,
        docker: false,
        queues: 1,
    })
}

/// The checks a request from the local API needs (START's parser makes the same ones).
pub fn check_request(r: &StartRequest) -> Result<(), Refused<StartFailureReason>> {
    let bad = |what: String| refuse(StartFailureReason::InvalidData, what);
    for (field, value) in [
        ("instance", &r.instance),
        ("vnic", &r.vnic),
        ("tenant", &r.tenant),
    ] {
        if value.trim().is_empty() {
            return Err(bad(format!("{field} is empty")));
        }
    }
    if r.subnet.ip() != r.subnet.network() || TunnelKey::from_subnet(&r.subnet).is_err() {
        return Err(bad(format!(
            "subnet {} is not a network address with a tunnel key",
            r.subnet
        )));
    }
    if let Some(ip) = r.ip
        && !r.subnet.contains(ip)
    {
        return Err(bad(format!("ip {ip} is not in {}", r.subnet)));
    }
    if r.netns.is_some() && !r.container {
        return Err(bad("netns is for a container, not a VM".into()));
    }
    if let Err(why) = check_ifname(&r.ifname) {
        return Err(bad(format!("ifname {:?}: {why}", r.ifname)));
    }
    if r.queues > 64 {
        return Err(bad(format!("{} queues: at most 64", r.queues)));
    }
    Ok(())
}

/// The kernel's rules for an interface name (`dev_valid_name`).
fn check_ifname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 15 {
        return Err("an interface name has 1 to 15 bytes");
    }
    if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        return Err("an interface name has no '/', ':' or space and is not . or ..");
    }
    Ok(())
}

/// A locally administered unicast MAC derived from the VNIC id (stable across retries).
pub(super) fn mac_for(vnic: &str) -> MacAddr {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vnic.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    MacAddr([0x02, b[1], b[2], b[3], b[4], b[5]])
}

/// The endpoint record of a START's VNIC.
fn record_of(r: &StartRequest, ifname: &str, mac: MacAddr, ip: Ipv4Addr) -> VnicRecord {
    let kind = match (r.docker, r.container) {
        (true, _) => vnic::KIND_DOCKER,
        (false, true) => "container",
        (false, false) => "vm",
    };
    VnicRecord {
        tenant: r.tenant.clone(),
        subnet: r.subnet,
        concentrator: r.concentrator.clone(),
        concentrator_ip: r.concentrator_ip,
        kind: kind.into(),
        ifname: ifname.to_string(),
        mac,
        ip,
    }
}

fn endpoint_value(record: &VnicRecord) -> Vec<u8> {
    serde_json::to_vec(&record.to_endpoint()).expect("endpoints serialise")
}

/// What a START that went through made (logged).
fn started(r: &StartRequest, created: CreatedVnic, ip: Ipv4Addr, mac: MacAddr) -> Started {
    info!(instance = %r.instance, vnic = %r.vnic, %ip, ifname = %created.vnic.ifname, "instance started");
    Started {
        tunnel: created.tunnel.filter(|t| t.kind == TunnelEventKind::Add),
        vnic: created.vnic,
        ip,
        ip6: None,
        mac,
    }
}

/// The VNIC a START asks for; a container's namespace gets `ip` (which a VM's tap does not
/// need: the guest learns it by DHCP).
fn vnic_config(r: &StartRequest, mac: MacAddr, ip: Option<Ipv4Addr>) -> VnicConfig {
    let mut c = VnicConfig::container(
        &r.vnic,
        &r.tenant,
        r.subnet,
        &r.concentrator,
        r.concentrator_ip,
        mac,
    );
    c.instance_id = r.instance.clone();
    if !r.container {
        c.role = VnicRole::Vm;
        c.queues = r.queues.max(1);
    }
    c.netns = r.netns.as_ref().zip(ip).map(|(path, ip)| ContainerNetns {
        path: path.clone(),
        ifname: r.ifname.clone(),
        address: Ipv4Network::new(ip, r.subnet.prefix()).expect("the subnet's prefix"),
        gateway: Some(gateway_of(&r.subnet)),
    });
    c
}

/// A VNIC's config from its endpoint record (DELETE, and recreating after a restart).
pub(super) fn config_of(instance: &str, vnic: &str, r: &VnicRecord) -> VnicConfig {
    let mut c = VnicConfig::container(
        vnic,
        &r.tenant,
        r.subnet,
        &r.concentrator,
        r.concentrator_ip,
        r.mac,
    );
    c.instance_id = instance.to_string();
    if r.kind == "vm" {
        c.role = VnicRole::Vm;
    }
    c
}

impl Agent {
    pub(super) fn endpoint_id(&self, instance: &str, vnic: &str) -> WorkloadEndpointId {
        WorkloadEndpointId {
            host: self.host.clone(),
            orchestrator: self.orchestrator.clone(),
            workload: instance.to_string(),
            endpoint: vnic.to_string(),
        }
    }

    /// START: address, VNIC, endpoint, and TenantAdded when the subnet's tunnel is new.
    pub(super) async fn start(
        &self,
        r: &StartRequest,
    ) -> Result<Started, Refused<StartFailureReason>> {
        let outcome = self.start_counted(r).await;
        self.metrics.started(&outcome);
        outcome
    }

    async fn start_counted(
        &self,
        r: &StartRequest,
    ) -> Result<Started, Refused<StartFailureReason>> {
        if let Some(routed) = &self.routed {
            return self.start_routed(routed, r).await;
        }
        if r.concentrator.is_empty() {
            return Err(refuse(
                StartFailureReason::InvalidData,
                "networking.concentrator_uuid is empty: the subnet has no concentrator",
            ));
        }
        let mac = r.mac.unwrap_or_else(|| mac_for(&r.vnic));
        if !r.docker && r.ip.is_none() && r.netns.is_none() {
            return self.start_vm(r, mac).await;
        }
        // Whether the instance is new is asked of etcd while its address and VNIC are being
        // made: a repeated START (rare) then undoes exactly what it made, and every other
        // START saves a round trip to etcd.
        let (fresh, made) = tokio::join!(self.unstarted_endpoint(r), self.address_and_vnic(r, mac));
        let (
            key,
            Made {
                ip,
                config,
                created,
            },
        ) = match (fresh, made) {
            (Ok(key), Ok(made)) => (key, made),
            (Err(refused), Ok(made)) => {
                self.undo_made(r, &made).await;
                return Err(refused);
            }
            // A repeated START is told so, not that its address is taken (by the instance).
            (Err(refused), Err(_)) | (Ok(_), Err(refused)) => return Err(refused),
        };
        let network = |e: String| refuse(StartFailureReason::NetworkFailure, e);
        let value = endpoint_value(&record_of(r, &created.vnic.ifname, mac, ip));
        let written = match self.ensure_tenant_profile(&r.tenant).await {
            Ok(()) => self.store.put(&key, &value).await.map(|_| ()),
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            self.undo_made(
                r,
                &Made {
                    ip,
                    config,
                    created,
                },
            )
            .await;
            return Err(network(format!("writing the endpoint: {e}")));
        }
        Ok(started(r, created, ip, mac))
    }

    /// A VM's tap with an address chosen here (the common START). Three things at once: the
    /// tap, the check that the instance is new, the tenant's profile. Then the address and
    /// the endpoint naming it, in one transaction when the address comes from one of the
    /// node's blocks ([`ThenWrite`]): the endpoint appears with the tap ready, and a START
    /// costs etcd one write, not two.
    async fn start_vm(
        &self,
        r: &StartRequest,
        mac: MacAddr,
    ) -> Result<Started, Refused<StartFailureReason>> {
        let network = |e: String| refuse(StartFailureReason::NetworkFailure, e);
        let config = vnic_config(r, mac, None);
        let (fresh, created, profile) = tokio::join!(
            self.unstarted_endpoint(r),
            self.node.create_vnic(&config, None),
            self.ensure_tenant_profile(&r.tenant),
        );
        let (created, fresh) = match (created, fresh) {
            (Ok(created), fresh) => (created, fresh),
            (Err(e), Ok(_)) => return Err(network(format!("creating the VNIC: {e}"))),
            (Err(e), Err(refused)) => {
                warn!(vnic = %r.vnic, error = %e, "the VNIC failed too");
                return Err(refused);
            }
        };
        let key = match (fresh, profile) {
            (Ok(key), Ok(())) => key,
            (Err(refused), _) => {
                self.undo_vnic(&config, &created).await;
                return Err(refused);
            }
            (Ok(_), Err(e)) => {
                self.undo_vnic(&config, &created).await;
                return Err(network(format!("writing the tenant's profile: {e}")));
            }
        };
        let record = record_of(r, &created.vnic.ifname, mac, Ipv4Addr::UNSPECIFIED);
        let endpoint = move |ip: Ipv4Addr| {
            endpoint_value(&VnicRecord {
                ip,
                ..record.clone()
            })
        };
        let then = ThenWrite::new({
            let (key, endpoint) = (key.clone(), endpoint.clone());
            move |ips: &[IpAddr]| match ips {
                [IpAddr::V4(ip)] => vec![TxnOp::put(key.clone(), endpoint(*ip))],
                _ => Vec::new(),
            }
        });
        let ip = match self.assign(&self.ipam(&r.tenant), r, Some(&then)).await {
            Ok(ip) => ip,
            Err(refused) => {
                self.undo_vnic(&config, &created).await;
                return Err(refused);
            }
        };
        if !then.written()
            && let Err(e) = self.store.put(&key, &endpoint(ip)).await
        {
            self.undo_vnic(&config, &created).await;
            self.release_address(r, ip).await;
            return Err(network(format!("writing the endpoint: {e}")));
        }
        Ok(started(r, created, ip, mac))
    }

    /// The START's address and VNIC; on failure, what was made of them is undone.
    async fn address_and_vnic(
        &self,
        r: &StartRequest,
        mac: MacAddr,
    ) -> Result<Made, Refused<StartFailureReason>> {
        let network = |e: String| refuse(StartFailureReason::NetworkFailure, e);
        let ipam = self.ipam(&r.tenant);
        match (r.docker, r.ip, &r.netns) {
            (true, None, _) => Err(refuse(
                StartFailureReason::InvalidData,
                "a Docker endpoint comes with the address Docker's IPAM driver gave it",
            )),
            // A VM's tap does not depend on its address: allocate and create at once, the
            // one in etcd, the other in the kernel.
            (false, _, None) => {
                let config = vnic_config(r, mac, None);
                let (ip, created) = tokio::join!(
                    self.assign(&ipam, r, None),
                    self.node.create_vnic(&config, None)
                );
                match (ip, created) {
                    (Ok(ip), Ok(created)) => Ok(Made {
                        ip,
                        config,
                        created,
                    }),
                    (Err(refused), Ok(created)) => {
                        self.undo_vnic(&config, &created).await;
                        Err(refused)
                    }
                    (Ok(ip), Err(e)) => {
                        self.release_address(r, ip).await;
                        Err(network(format!("creating the VNIC: {e}")))
                    }
                    (Err(refused), Err(e)) => {
                        warn!(vnic = %r.vnic, error = %e, "the VNIC failed too");
                        Err(refused)
                    }
                }
            }
            (docker, given, _) => {
                let ip = match (docker, given) {
                    (true, Some(ip)) => ip,
                    _ => self.assign(&ipam, r, None).await?,
                };
                let config = vnic_config(r, mac, Some(ip));
                match self.node.create_vnic(&config, None).await {
                    Ok(created) => Ok(Made {
                        ip,
                        config,
                        created,
                    }),
                    Err(e) => {
                        self.release_address(r, ip).await;
                        Err(network(format!("creating the VNIC: {e}")))
                    }
                }
            }
        }
    }

    /// Undoes a START's address and VNIC after a later step failed.
    async fn undo_made(&self, r: &StartRequest, made: &Made) {
        self.undo_vnic(&made.config, &made.created).await;
        self.release_address(r, made.ip).await;
    }

    /// Releases the one address this START assigned — not its handle's others: when the
    /// START repeats an instance's, the handle also holds the instance's own address. A
    /// Docker endpoint's address is Docker's IPAM driver's to release.
    async fn release_address(&self, r: &StartRequest, ip: Ipv4Addr) {
        if r.docker {
            return;
        }
        match self.ipam(&r.tenant).release_ips(&[ip.into()]).await {
            Ok(_) => {}
            Err(e) => {
                warn!(vnic = %r.vnic, %ip, error = %e, "could not release the address (tenet ipam check finds it)")
            }
        }
    }

    /// Removes the VNIC of a START that failed after making it. When that START made the
    /// subnet's tunnel and another VNIC arrived on the subnet meanwhile (its create found
    /// the tunnel, so announced nothing), the tunnel stays: its TenantAdded is queued for
    /// [`Agent::take_orphaned`], or the concentrator would never hear of it.
    async fn undo_vnic(&self, config: &VnicConfig, created: &CreatedVnic) {
        if created.existed {
            return; // not this START's: an earlier one's, or the instance's own
        }
        let made_tunnel = created
            .tunnel
            .as_ref()
            .filter(|t| t.kind == TunnelEventKind::Add);
        let tunnel_gone = match self.node.destroy_vnic(config, None).await {
            Ok(destroyed) => destroyed.tunnel.is_some(),
            Err(e) => {
                warn!(vnic = %config.vnic_id, error = %e, "undoing the VNIC of a failed START");
                false
            }
        };
        if let Some(tunnel) = made_tunnel.filter(|_| !tunnel_gone) {
            info!(subnet = %tunnel.subnet, "a failed START's tunnel stays for other VNICs");
            self.orphaned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(tunnel.clone());
        }
    }

    /// TenantAdded owed for tunnels that failed STARTs made and left to other VNICs.
    pub(super) fn take_orphaned(&self) -> Vec<TunnelEvent> {
        std::mem::take(&mut *self.orphaned.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The START's address from the tenant's IPAM (the one it names, or any free one).
    async fn assign(
        &self,
        ipam: &tenet::ipam::Ipam,
        r: &StartRequest,
        then: Option<&ThenWrite>,
    ) -> Result<Ipv4Addr, Refused<StartFailureReason>> {
        let network = |e: String| refuse(StartFailureReason::NetworkFailure, e);
        let attributes = [
            ("instance".to_string(), r.instance.clone()),
            ("host".to_string(), self.host.clone()),
        ]
        .into();
        ipam.assign_in_subnet_then(r.subnet, &self.host, &r.vnic, r.ip, attributes, then)
            .await
            .map_err(|e| match e {
                IpamError::AlreadyAssigned(_)
                | IpamError::Reserved(_)
                | IpamError::CidrTooSmall(_)
                | IpamError::NotInPool(_) => refuse(StartFailureReason::InvalidData, e.to_string()),
                IpamError::NoFreeAddress(_) => refuse(StartFailureReason::FullCloud, e.to_string()),
                e => network(format!("allocating an address in {}: {e}", r.subnet)),
            })
    }

    /// The key the START's endpoint will have; refused if it exists (a repeated START must
    /// not allocate a second address).
    pub(super) async fn unstarted_endpoint(
        &self,
        r: &StartRequest,
    ) -> Result<String, Refused<StartFailureReason>> {
        let key = CalicoKey::WorkloadEndpoint(self.endpoint_id(&r.instance, &r.vnic)).path();
        let existing = self
            .store
            .get(&key)
            .await
            .map_err(|e| refuse(StartFailureReason::NetworkFailure, e.to_string()))?;
        if existing.is_some() {
            return Err(refuse(
                StartFailureReason::InstanceExists,
                format!("instance {} already has VNIC {}", r.instance, r.vnic),
            ));
        }
        Ok(key)
    }

    /// Creates the tenant's default profile (allow all) unless it exists; once per tenant
    /// and process.
    pub(super) async fn ensure_tenant_profile(&self, tenant: &str) -> Result<(), StoreError> {
        if self
            .profiles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(tenant)
        {
            return Ok(());
        }
        match self.store.txn(vnic::tenant_profile_txn(tenant)).await {
            Ok(_) => {
                info!(%tenant, profile = %vnic::tenant_profile(tenant), "tenant profile created")
            }
            // It exists already (someone's tightened version, maybe): leave it.
            Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
        self.profiles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.to_string());
        Ok(())
    }

    /// DELETE: every VNIC of the instance (from its endpoints), the endpoints, the addresses;
    /// returns the TenantRemoved events for tunnels that went.
    pub(super) async fn delete(
        &self,
        instance: &str,
        only: Option<&str>,
    ) -> Result<Vec<TunnelEvent>, Refused<DeleteFailureReason>> {
        let outcome = self.delete_counted(instance, only).await;
        self.metrics.deleted(&outcome);
        outcome
    }

    async fn delete_counted(
        &self,
        instance: &str,
        only: Option<&str>,
    ) -> Result<Vec<TunnelEvent>, Refused<DeleteFailureReason>> {
        let prefix = format!(
            "{}/",
            CalicoKey::WorkloadEndpoint(self.endpoint_id(instance, "x"))
                .path()
                .rsplit_once('/')
                .expect("an endpoint path")
                .0
        );
        let listing = self.store.list(&prefix).await.map_err(|e| {
            refuse(
                DeleteFailureReason::InvalidData,
                format!("reading endpoints: {e}"),
            )
        })?;
        let chosen: Vec<_> = listing
            .kvs
            .iter()
            .map(|kv| (tenet::calico::unescape_name(&kv.key[prefix.len()..]), kv))
            .filter(|(vnic, _)| only.is_none_or(|o| o == vnic))
            .collect();
        if chosen.is_empty() {
            let what = only.map_or(String::new(), |v| format!(" named {v}"));
            return Err(refuse(
                DeleteFailureReason::NoInstance,
                format!("no VNIC{what} of instance {instance} on {}", self.host),
            ));
        }
        let mut events = Vec::new();
        for (vnic, kv) in chosen {
            let endpoint = serde_json::from_slice::<WorkloadEndpoint>(&kv.value);
            if let (Ok(e), Some(routed)) = (&endpoint, &self.routed)
                && super::routed::is_routed(e)
            {
                self.delete_routed(routed, instance, &vnic, &kv.key).await?;
                continue;
            }
            let record = endpoint
                .map_err(|e| e.to_string())
                .and_then(|e| VnicRecord::from_endpoint(&e));
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    warn!(key = %kv.key, error = %e, "an endpoint tenet did not write; left alone");
                    continue;
                }
            };
            let config = config_of(instance, &vnic, &record);
            // The kernel's link deletion waits for an RCU grace period (tens of ms); the
            // endpoint and the address go meanwhile. The node forgets the VNIC before its
            // kernel work, so if the kernel refuses, the link is left to the next rebuild
            // (a VNIC without an endpoint is removed) whatever the order here.
            let forget = async {
                match self.store.delete(&kv.key, None).await {
                    Ok(_) | Err(StoreError::NotFound { .. }) => {}
                    Err(e) => warn!(key = %kv.key, error = %e, "could not delete the endpoint"),
                }
                if record.kind != vnic::KIND_DOCKER {
                    self.release(&record.tenant, &vnic).await;
                }
            };
            let (destroyed, ()) = tokio::join!(self.node.destroy_vnic(&config, None), forget);
            match destroyed {
                Ok(d) => events.extend(d.tunnel.filter(|t| t.kind == TunnelEventKind::Del)),
                Err(e) => {
                    return Err(refuse(
                        DeleteFailureReason::InvalidData,
                        format!("destroying VNIC {vnic}: {e}"),
                    ));
                }
            }
            info!(%instance, %vnic, ip = %record.ip, "VNIC deleted");
        }
        Ok(events)
    }

    pub(super) async fn release(&self, tenant: &str, vnic: &str) {
        match self.ipam(tenant).release_by_handle(vnic).await {
            Ok(_) | Err(IpamError::HandleNotFound(_)) => {}
            Err(e) => {
                warn!(%vnic, error = %e, "could not release the address (tenet ipam check finds it)")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssntp::payload::VnicNetworking;

    fn start() -> StartCommand {
        StartCommand {
            instance_uuid: "i-1".into(),
            tenant_uuid: "t1".into(),
            vm_type: "qemu".into(),
            networking: VnicNetworking {
                vnic_uuid: "v-1".into(),
                concentrator_uuid: "c1".into(),
                concentrator_ip: "10.254.0.2".into(),
                subnet: "172.16.0.0/24".into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_start_becomes_a_request_and_bad_fields_are_named() {
        let r = start_request(&start()).unwrap();
        assert!(!r.container && r.ip.is_none() && r.mac.is_none());
        let mut s = start();
        s.networking.netns = "/run/netns/w1".into();
        assert!(start_request(&s).unwrap().container);
        // Routed nodes take STARTs without a concentrator (GRE nodes refuse them later).
        let mut s = start();
        s.networking.concentrator_uuid.clear();
        s.networking.concentrator_ip.clear();
        let r = start_request(&s).unwrap();
        assert!(r.concentrator.is_empty() && r.concentrator_ip.is_unspecified());
        for (edit, words) in [
            (
                Box::new(|s: &mut StartCommand| s.networking.subnet = "172.16.0.1/24".into())
                    as Box<dyn Fn(&mut StartCommand)>,
                "network address",
            ),
            (
                Box::new(|s: &mut StartCommand| s.networking.concentrator_ip = "x".into()),
                "concentrator_ip",
            ),
            (
                Box::new(|s: &mut StartCommand| s.networking.private_ip = "10.0.0.1".into()),
                "not in 172.16.0.0/24",
            ),
            (
                Box::new(|s: &mut StartCommand| s.networking.vnic_mac = "zz".into()),
                "vnic_mac",
            ),
            (
                Box::new(|s: &mut StartCommand| s.tenant_uuid.clear()),
                "tenant_uuid",
            ),
        ] {
            let mut s = start();
            edit(&mut s);
            let e = start_request(&s).unwrap_err();
            assert_eq!(e.reason, StartFailureReason::InvalidData);
            assert!(e.detail.contains(words), "{}", e.detail);
        }
    }

    #[test]
    fn derived_macs_are_stable_local_unicast() {
        let m = mac_for("v-1");
        assert_eq!(m, mac_for("v-1"));
        assert_ne!(m, mac_for("v-2"));
        assert_eq!(m.0[0], 0x02);
    }
}
