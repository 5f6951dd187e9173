//! The edge verbs: port forwards and floating IPs (AssignPublicIP/ReleasePublicIP), kept in
//! etcd as desired state and applied as one firewall change each; and the firewall refresh
//! the other verbs call when the subnets change.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::{IpNetwork, Ipv4Network};
use tenet::keyspace::cnci::{self as keys, FloatingIp, PortForward, Protocol};
use tenet::net::firewall::Drift;
use tenet::net::garp;
use tenet::process::Command;
use tracing::{Instrument, info, info_span, warn};

use super::{Concentrator, Inner, SubnetState};
use crate::edge::{EdgeState, EdgeSubnet, FloatingNat, Uplink, ciao_ssh_port, render};
use crate::error::CnciError;

/// Gratuitous ARPs sent for a new floating IP.
const GARP_COUNT: usize = 3;

fn no_uplink() -> CnciError {
    CnciError::invalid(
        "uplink",
        "this concentrator has no uplink (configure uplink_nets or uplink_addr)",
    )
}

/// Applies the edge rules for `subnets` and `edge` (a diff after the first time).
pub(crate) async fn apply(
    inner: &Inner,
    subnets: &BTreeMap<Ipv4Network, SubnetState>,
    edge: &mut EdgeState,
) -> Result<Drift, CnciError> {
    let (Some(fw), Some(up)) = (&inner.firewall, &inner.uplink) else {
        return Ok(Drift::default());
    };
    crate::sysctls::ensure(inner)?;
    let uplink = Uplink {
        ifname: up.link.clone(),
        addr: up.addr.ip(),
    };
    let list: Vec<EdgeSubnet> = subnets
        .iter()
        .map(|(net, s)| EdgeSubnet {
            subnet: *net,
            bridge: s.bridge.clone(),
        })
        .collect();
    let drift = fw
        .apply(&render(&uplink, &list, edge, floating_nat(inner)))
        .await?;
    if let Some(map) = &inner.natmap {
        map.apply(&edge.floating_map()).await?;
    }
    Ok(drift)
}

fn floating_nat(inner: &Inner) -> FloatingNat {
    match inner.natmap {
        Some(_) => FloatingNat::NftMap,
        None => FloatingNat::Rules,
    }
}

/// After a restart: the edge's desired state from etcd, its floating addresses back on the
/// uplink, and the firewall reconciled (repairing rules changed behind its back).
pub(crate) async fn restore(
    inner: &Inner,
    subnets: &BTreeMap<Ipv4Network, SubnetState>,
) -> Result<Drift, CnciError> {
    let mut edge = inner.edge.lock().await;
    if let Some(store) = &inner.store {
        let listing = store.list(&keys::prefix(&inner.config.id)).await?;
        let mut state = EdgeState::default();
        for kv in &listing.kvs {
            match tenet::keyspace::decode(&kv.key, &kv.value) {
                Ok(tenet::keyspace::TenetValue::Cnci(keys::CnciValue::Forward(f))) => {
                    state.forwards.insert((f.protocol, f.external_port), f);
                }
                Ok(tenet::keyspace::TenetValue::Cnci(keys::CnciValue::Floating(f))) => {
                    state.floating.insert(f.public_ip, f);
                }
                Ok(_) => {}
                Err(e) => warn!(key = %kv.key, error = %e, "ignoring an unreadable edge key"),
            }
        }
        *edge = state;
        edge.forwards_changed();
    }
    if let Some(up) = &inner.uplink {
        for public in edge.floating.keys() {
            inner
                .netlink
                .add_address(up.index, host_addr(*public))
                .await?;
        }
    }
    let Some(fw) = &inner.firewall else {
        return Ok(Drift::default());
    };
    // A full reconciliation: forget what this process applied before.
    let up = inner.uplink.as_ref().expect("a firewall has an uplink");
    crate::sysctls::ensure(inner)?;
    let list: Vec<EdgeSubnet> = subnets
        .iter()
        .map(|(net, s)| EdgeSubnet {
            subnet: *net,
            bridge: s.bridge.clone(),
        })
        .collect();
    let uplink = Uplink {
        ifname: up.link.clone(),
        addr: up.addr.ip(),
    };
    let mut drift = fw
        .reconcile(&render(&uplink, &list, &mut edge, floating_nat(inner)))
        .await?;
    if let Some(map) = &inner.natmap {
        let found = map.reconcile(&edge.floating_map()).await?;
        drift.restored.extend(found.restored);
        drift.removed.extend(found.removed);
    }
    Ok(drift)
}

fn host_addr(ip: Ipv4Addr) -> IpNetwork {
    IpNetwork::V4(Ipv4Network::new(ip, 32).expect("/32"))
}

impl Concentrator {
    /// Forwards `external_port` on the uplink address to a workload (DNAT; hairpin from
    /// inside the tenant works). Idempotent; a port already forwarded elsewhere is an error.
    pub async fn add_port_forward(&self, fwd: &PortForward) -> Result<bool, CnciError> {
        Ok(self.add_port_forwards(std::slice::from_ref(fwd)).await? == 1)
    }

    /// Adds many port forwards as one change: every one is checked first (a bad one adds
    /// nothing), the new ones are kept in etcd (in transactions of 100), and the firewall
    /// gets one batch. Returns how many were new.
    pub async fn add_port_forwards(&self, forwards: &[PortForward]) -> Result<usize, CnciError> {
        let inner = &*self.inner;
        let span = info_span!("port_forwards", count = forwards.len());
        async {
            if inner.uplink.is_none() {
                return Err(no_uplink());
            }
            let subnets = inner.subnets.lock().await;
            let mut edge = inner.edge.lock().await;
            let mut new: BTreeMap<(Protocol, u16), PortForward> = BTreeMap::new();
            for fwd in forwards {
                if fwd.external_port == 0 || fwd.internal_port == 0 {
                    return Err(CnciError::invalid("port", "0 is not a port"));
                }
                check_private(&subnets, fwd.internal_ip, "internal_ip")?;
                let key = (fwd.protocol, fwd.external_port);
                let existing = edge.forwards.get(&key).or_else(|| new.get(&key));
                match existing {
                    Some(e) if e == fwd => {}
                    Some(e) => {
                        return Err(CnciError::invalid(
                            "external_port",
                            format!(
                                "{} {} already forwards to {}:{}",
                                fwd.protocol, fwd.external_port, e.internal_ip, e.internal_port
                            ),
                        ));
                    }
                    None => {
                        new.insert(key, fwd.clone());
                    }
                }
            }
            if new.is_empty() {
                return Ok(0);
            }
            let id = &inner.config.id;
            let entries: Vec<(String, Vec<u8>)> = new
                .values()
                .map(|f| {
                    let key = keys::forward_key(id, f.protocol, f.external_port);
                    (key, serde_json::to_vec(f).expect("edge values serialise"))
                })
                .collect();
            self.persist_many(&entries).await?;
            edge.forwards.extend(new.clone());
            edge.forwards_changed();
            if let Err(e) = apply(inner, &subnets, &mut edge).await {
                for key in new.keys() {
                    edge.forwards.remove(key);
                }
                edge.forwards_changed();
                for (key, _) in &entries {
                    self.unpersist(key).await;
                }
                return Err(e);
            }
            info!(added = new.len(), "port forwards added");
            Ok(new.len())
        }
        .instrument(span)
        .await
    }

    /// Removes a port forward; an unknown one is not an error.
    pub async fn remove_port_forward(
        &self,
        protocol: Protocol,
        port: u16,
    ) -> Result<bool, CnciError> {
        let inner = &*self.inner;
        let subnets = inner.subnets.lock().await;
        let mut edge = inner.edge.lock().await;
        let Some(old) = edge.forwards.remove(&(protocol, port)) else {
            return Ok(false);
        };
        edge.forwards_changed();
        if let Err(e) = apply(inner, &subnets, &mut edge).await {
            edge.forwards.insert((protocol, port), old);
            edge.forwards_changed();
            return Err(e);
        }
        self.unpersist(&keys::forward_key(&inner.config.id, protocol, port))
            .await;
        info!(%protocol, port, "port forward removed");
        Ok(true)
    }

    /// ciao's SSH forwards for a subnet: tcp 33000 + ip[2]·256 + ip[3] → ip:22 for every host
    /// address. Refused, with nothing added, if any address's port would overflow.
    pub async fn add_ciao_ssh_forwards(&self, subnet: &Ipv4Network) -> Result<usize, CnciError> {
        let first = u32::from(subnet.network()) + 2;
        let last = u32::from(subnet.broadcast()) - 1;
        let mut forwards = Vec::new();
        for ip in (first..=last).map(Ipv4Addr::from) {
            forwards.push(PortForward {
                protocol: Protocol::Tcp,
                external_port: ciao_ssh_port(ip)?,
                internal_ip: ip,
                internal_port: 22,
            });
        }
        self.add_port_forwards(&forwards).await
    }

    /// Maps `public` 1:1 to a workload's `private` address (ciao's AssignPublicIP): the
    /// address on the uplink, DNAT in, SNAT out, and gratuitous ARPs on the uplink so the
    /// upstream switch learns it at once. Idempotent; a public IP already bound to another
    /// private IP is an error.
    pub async fn assign_floating_ip(
        &self,
        public: Ipv4Addr,
        private: Ipv4Addr,
    ) -> Result<bool, CnciError> {
        let inner = &*self.inner;
        let span = info_span!("floating_ip", %public, %private);
        async {
            let up = inner.uplink.as_ref().ok_or_else(no_uplink)?;
            if public.is_unspecified()
                || public.is_broadcast()
                || public.is_multicast()
                || public.is_loopback()
            {
                return Err(CnciError::invalid(
                    "public_ip",
                    format!("{public} is not a unicast address"),
                ));
            }
            if public == up.addr.ip() {
                return Err(CnciError::invalid(
                    "public_ip",
                    format!("{public} is the uplink's own address"),
                ));
            }
            let subnets = inner.subnets.lock().await;
            check_private(&subnets, private, "private_ip")?;
            if subnets.keys().any(|n| n.contains(public)) {
                return Err(CnciError::invalid(
                    "public_ip",
                    format!("{public} is inside a tenant subnet"),
                ));
            }
            let mut edge = inner.edge.lock().await;
            match edge.floating.get(&public) {
                Some(f) if f.private_ip == private => return Ok(false),
                Some(f) => {
                    return Err(CnciError::invalid(
                        "public_ip",
                        format!("{public} is already bound to {}", f.private_ip),
                    ));
                }
                None => {}
            }
            if let Some(f) = edge.floating.values().find(|f| f.private_ip == private) {
                return Err(CnciError::invalid(
                    "private_ip",
                    format!("{private} already has public address {}", f.public_ip),
                ));
            }
            let fip = FloatingIp {
                public_ip: public,
                private_ip: private,
            };
            let store_key = keys::floating_key(&inner.config.id, public);
            edge.floating.insert(public, fip.clone());
            // The etcd write and the kernel work go together; the call succeeds only if both
            // do, and a failure undoes both.
            let kernel = async {
                inner
                    .netlink
                    .add_address(up.index, host_addr(public))
                    .await?;
                apply(inner, &subnets, &mut edge).await?;
                let mac = inner
                    .netlink
                    .link_by_index(up.index)
                    .await?
                    .and_then(|l| l.mac)
                    .unwrap_or([0; 6]);
                garp::announce(
                    inner.config.netns.as_deref(),
                    up.index,
                    mac,
                    public,
                    GARP_COUNT,
                )?;
                Ok::<_, CnciError>(())
            };
            let (persisted, made) = tokio::join!(self.persist(&store_key, &fip), kernel);
            if let Err(e) = persisted.and(made) {
                edge.floating.remove(&public);
                let mut left = tenet::net::Leftovers::new();
                left.note(inner.netlink.del_address(up.index, host_addr(public)).await);
                if let Err(undo) = apply(inner, &subnets, &mut edge).await {
                    warn!(error = %undo, "undoing a floating IP's rules");
                }
                self.unpersist(&store_key).await;
                return Err(e.with_leftovers(left));
            }
            info!("floating IP assigned");
            Ok(true)
        }
        .instrument(span)
        .await
    }

    /// Removes a floating IP (ciao's ReleasePublicIP): its address, its rules and the
    /// conntrack entries of that mapping. An unknown public IP is not an error.
    pub async fn release_floating_ip(&self, public: Ipv4Addr) -> Result<bool, CnciError> {
        let inner = &*self.inner;
        let up = inner.uplink.as_ref().ok_or_else(no_uplink)?;
        let subnets = inner.subnets.lock().await;
        let mut edge = inner.edge.lock().await;
        let Some(fip) = edge.floating.remove(&public) else {
            return Ok(false);
        };
        if let Err(e) = apply(inner, &subnets, &mut edge).await {
            edge.floating.insert(public, fip);
            return Err(e);
        }
        inner
            .netlink
            .del_address(up.index, host_addr(public))
            .await?;
        let store_key = keys::floating_key(&inner.config.id, public);
        tokio::join!(forget_connections(inner, &fip), self.unpersist(&store_key));
        info!(%public, private = %fip.private_ip, "floating IP released");
        Ok(true)
    }

    /// The port forwards and floating IPs in effect.
    pub async fn edge(&self) -> EdgeState {
        self.inner.edge.lock().await.clone()
    }

    pub(super) async fn persist(
        &self,
        key: &str,
        value: &impl serde::Serialize,
    ) -> Result<(), CnciError> {
        if let Some(store) = &self.inner.store {
            let raw = serde_json::to_vec(value).expect("edge values serialise");
            store.put(key, &raw).await?;
        }
        Ok(())
    }

    /// Puts many keys, 100 to a transaction, 8 transactions at a time.
    async fn persist_many(&self, entries: &[(String, Vec<u8>)]) -> Result<(), CnciError> {
        use futures::StreamExt;
        let Some(store) = &self.inner.store else {
            return Ok(());
        };
        let results: Vec<Result<_, _>> = futures::stream::iter(entries.chunks(100).map(|chunk| {
            let mut txn = tenet::store::Txn::new();
            for (k, v) in chunk {
                txn = txn.then(tenet::store::TxnOp::put(k.clone(), v.clone()));
            }
            async move { store.txn(txn).await }
        }))
        .buffer_unordered(8)
        .collect()
        .await;
        for r in results {
            r?;
        }
        Ok(())
    }

    pub(super) async fn unpersist(&self, key: &str) {
        if let Some(store) = &self.inner.store {
            match store.delete(key, None).await {
                Ok(_) | Err(tenet::store::StoreError::NotFound { .. }) => {}
                Err(e) => warn!(key, error = %e, "could not remove desired state from etcd"),
            }
        }
    }
}

/// `addr` must be a host of one of the concentrator's subnets.
fn check_private(
    subnets: &BTreeMap<Ipv4Network, SubnetState>,
    addr: Ipv4Addr,
    field: &'static str,
) -> Result<(), CnciError> {
    if subnets.keys().any(|n| n.contains(addr)) {
        Ok(())
    } else {
        Err(CnciError::invalid(
            field,
            format!("{addr} is in none of this concentrator's subnets"),
        ))
    }
}

/// Drops the conntrack entries of a released mapping, so no flow keeps using it.
async fn forget_connections(inner: &Inner, fip: &FloatingIp) {
    let netns = inner.config.netns.as_deref();
    let public = fip.public_ip.to_string();
    let flush = |direction: &'static str| {
        Command::new("conntrack")
            .args(["-D", direction, &public])
            .netns(netns)
    };
    let (orig, reply) = (flush("--orig-dst"), flush("--reply-dst"));
    let (a, b) = tokio::join!(orig.run(), reply.run());
    for result in [a, b] {
        match result {
            Ok(_) => {}
            // Exit status 1 with "0 flow entries": nothing to delete.
            Err(tenet::process::ProcessError::Failed { stderr, .. })
                if stderr.contains("0 flow entries") => {}
            Err(e) => warn!(error = %e, "flushing conntrack entries"),
        }
    }
}
