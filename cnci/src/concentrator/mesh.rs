//! The tenant mesh (ciao's RefreshCNCI): every concentrator of a tenant reaches the others'
//! subnets. Per peer: one tunnel (`tcm_…`, the configured backend; key from the pair of
//! underlay addresses, so both ends agree), this concentrator's mesh address on it as a /32,
//! a /32 route to the peer's mesh address and a route to each of the peer's subnets through
//! it. Point to point, no bridge: no loops in a full mesh. An update changes exactly the
//! difference from the last one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::{IpNetwork, Ipv4Network};
use tenet::keyspace::cnci::{self as keys, Mesh, MeshPeer};
use tenet::net::tunnel::TunnelSpec;
use tenet::net::{Leftovers, Route};
use tenet::types::TunnelKey;
use tracing::{Instrument, info, info_span};

use super::{Concentrator, Inner};
use crate::error::CnciError;
use crate::names::{self, OWNERSHIP};

/// A peer as this concentrator holds it.
#[derive(Debug, Clone)]
pub(crate) struct PeerLink {
    pub peer: MeshPeer,
    pub tunnel: String,
    pub index: u32,
}

/// The mesh in place: this concentrator's address and the links to its peers.
#[derive(Debug, Clone, Default)]
pub(crate) struct MeshState {
    pub me: Option<MeshPeer>,
    pub cidr: Option<Ipv4Network>,
    pub peers: BTreeMap<String, PeerLink>,
}

/// What an update did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshChange {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Peers whose subnets changed (routes replaced).
    pub rerouted: Vec<String>,
}

/// The tunnel key of a pair of concentrators: the same at both ends, 24 bits (it may be a
/// VNI), never 0.
pub fn pair_key(a: Ipv4Addr, b: Ipv4Addr) -> TunnelKey {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    let mut h: u32 = 0x811c_9dc5;
    for byte in lo.octets().into_iter().chain(hi.octets()) {
        h = (h ^ u32::from(byte)).wrapping_mul(0x0100_0193);
    }
    TunnelKey::new((h & 0x00ff_ffff).max(1)).expect("non-zero")
}

/// Checks a mesh list for this concentrator; returns its own entry.
fn check(inner: &Inner, mesh: &Mesh) -> Result<MeshPeer, CnciError> {
    let me = mesh
        .peers
        .iter()
        .find(|p| p.id == inner.config.id)
        .cloned()
        .ok_or_else(|| {
            CnciError::invalid(
                "peers",
                format!(
                    "this concentrator ({}) is not in the mesh list",
                    inner.config.id
                ),
            )
        })?;
    if me.underlay_ip != inner.tunnel_local() {
        return Err(CnciError::invalid(
            "peers",
            format!(
                "this concentrator's entry says {}, but its tunnels leave from {}",
                me.underlay_ip,
                inner.tunnel_local()
            ),
        ));
    }
    if mesh.cidr.prefix() > 30 || mesh.cidr.ip() != mesh.cidr.network() {
        return Err(CnciError::invalid(
            "cidr",
            format!(
                "{} is not a mesh network (a network address, /30 or wider)",
                mesh.cidr
            ),
        ));
    }
    let (mut ids, mut ips, mut underlays) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let mut all_subnets: Vec<(Ipv4Network, &str)> = Vec::new();
    for p in &mesh.peers {
        let bad = |why: String| Err(CnciError::invalid("peers", format!("{}: {why}", p.id)));
        if !ids.insert(p.id.as_str()) {
            return bad("listed twice".into());
        }
        if !mesh.cidr.contains(p.mesh_ip)
            || p.mesh_ip == mesh.cidr.network()
            || p.mesh_ip == mesh.cidr.broadcast()
        {
            return bad(format!(
                "mesh address {} is not a host of {}",
                p.mesh_ip, mesh.cidr
            ));
        }
        if !ips.insert(p.mesh_ip) {
            return bad(format!("mesh address {} is taken", p.mesh_ip));
        }
        if p.underlay_ip.is_unspecified()
            || p.underlay_ip.is_multicast()
            || !underlays.insert(p.underlay_ip)
        {
            return bad(format!(
                "underlay address {} is not a unique unicast address",
                p.underlay_ip
            ));
        }
        for s in &p.subnets {
            if let Some((other, owner)) = all_subnets.iter().find(|(o, _)| o.overlaps(*s)) {
                return bad(format!("subnet {s} overlaps {other} of {owner}"));
            }
            if s.overlaps(mesh.cidr) {
                return bad(format!("subnet {s} overlaps the mesh CIDR"));
            }
            all_subnets.push((*s, &p.id));
        }
    }
    Ok(me)
}

impl Concentrator {
    /// Joins the tenant's mesh, or updates it (ciao's RefreshCNCI): `mesh` lists every
    /// concentrator of the tenant, this one included (its absence is an error, not a crash),
    /// with their mesh addresses and subnets. Only the difference from the last update is
    /// applied; the list is kept in etcd so that a restarted concentrator restores it.
    pub async fn update_mesh(&self, mesh: &Mesh) -> Result<MeshChange, CnciError> {
        let inner = &*self.inner;
        let span = info_span!("mesh", peers = mesh.peers.len());
        async {
            let me = check(inner, mesh)?;
            let mut state = inner.mesh.lock().await;
            let change = apply(inner, &mut state, mesh, &me).await?;
            if let Some(store) = &inner.store {
                let raw = serde_json::to_vec(mesh).expect("a mesh serialises");
                store.put(&keys::mesh_key(&inner.config.id), &raw).await?;
            }
            info!(
                added = change.added.len(),
                removed = change.removed.len(),
                rerouted = change.rerouted.len(),
                "mesh updated"
            );
            Ok(change)
        }
        .instrument(span)
        .await
    }

    /// The peers of the mesh in place: (id, mesh address, tunnel interface).
    pub async fn mesh_peers(&self) -> Vec<(String, Ipv4Addr, String)> {
        let state = self.inner.mesh.lock().await;
        state
            .peers
            .values()
            .map(|p| (p.peer.id.clone(), p.peer.mesh_ip, p.tunnel.clone()))
            .collect()
    }
}

/// Brings `state` to `mesh`.
pub(crate) async fn apply(
    inner: &Inner,
    state: &mut MeshState,
    mesh: &Mesh,
    me: &MeshPeer,
) -> Result<MeshChange, CnciError> {
    crate::sysctls::ensure(inner)?;
    let mut change = MeshChange::default();
    // A new own address or CIDR: every peer link is made again.
    let renumbered =
        state.me.as_ref().map(|m| m.mesh_ip) != Some(me.mesh_ip) || state.cidr != Some(mesh.cidr);
    let wanted: BTreeMap<&str, &MeshPeer> = mesh
        .peers
        .iter()
        .filter(|p| p.id != me.id)
        .map(|p| (p.id.as_str(), p))
        .collect();
    let doomed: Vec<String> = state
        .peers
        .iter()
        .filter(|(id, l)| {
            renumbered
                || wanted.get(id.as_str()).is_none_or(|p| {
                    p.underlay_ip != l.peer.underlay_ip || p.mesh_ip != l.peer.mesh_ip
                })
        })
        .map(|(id, _)| id.clone())
        .collect();
    for id in &doomed {
        let link = state.peers.remove(id).expect("listed");
        inner.tunnels.delete(&link.tunnel).await?;
        if !wanted.contains_key(id.as_str()) {
            change.removed.push(id.clone());
        }
    }
    state.me = Some(me.clone());
    state.cidr = Some(mesh.cidr);
    for (id, peer) in &wanted {
        match state.peers.get_mut(*id) {
            Some(link) => {
                if link.peer.subnets != peer.subnets {
                    reroute(inner, link, &peer.subnets).await?;
                    link.peer.subnets = peer.subnets.clone();
                    change.rerouted.push(id.to_string());
                }
            }
            None => {
                let link = connect(inner, me, peer).await?;
                if !doomed.iter().any(|d| d == id) {
                    change.added.push(id.to_string());
                }
                state.peers.insert(id.to_string(), link);
            }
        }
    }
    Ok(change)
}

/// After a restart: the mesh list from etcd, the peer tunnels left in the kernel adopted
/// (their address and routes made sure of), missing ones made, stale ones deleted.
pub(crate) async fn restore(inner: &Inner) -> Result<(), CnciError> {
    let mut state = inner.mesh.lock().await;
    *state = MeshState::default();
    let mesh = match &inner.store {
        Some(store) => match store.get(&keys::mesh_key(&inner.config.id)).await? {
            Some(kv) => match tenet::keyspace::decode(&kv.key, &kv.value) {
                Ok(tenet::keyspace::TenetValue::Cnci(keys::CnciValue::Mesh(m))) => Some(m),
                _ => None,
            },
            None => None,
        },
        None => None,
    };
    let mut found: Vec<(TunnelSpec, u32)> = Vec::new();
    for l in inner.netlink.links().await? {
        if names::is_mesh(&l.name)
            && let Some((_, spec)) = TunnelSpec::from_link(&l)
        {
            found.push((spec, l.index));
        }
    }
    let me = mesh.as_ref().and_then(|m| check(inner, m).ok());
    if let (Some(mesh), Some(me)) = (&mesh, &me) {
        for peer in mesh.peers.iter().filter(|p| p.id != me.id) {
            let key = pair_key(me.underlay_ip, peer.underlay_ip);
            if let Some(pos) = found
                .iter()
                .position(|(s, _)| s.remote == peer.underlay_ip && s.key == key)
            {
                let (spec, index) = found.remove(pos);
                let link = PeerLink {
                    peer: peer.clone(),
                    tunnel: spec.name,
                    index,
                };
                address_and_routes(inner, me, &link).await?;
                state.peers.insert(peer.id.clone(), link);
            }
        }
        state.me = Some(me.clone());
        state.cidr = Some(mesh.cidr);
    }
    for (spec, _) in found {
        inner.tunnels.delete(&spec.name).await?;
    }
    if let (Some(mesh), Some(me)) = (mesh, me) {
        apply(inner, &mut state, &mesh, &me).await?;
    }
    Ok(())
}

async fn address_and_routes(
    inner: &Inner,
    me: &MeshPeer,
    link: &PeerLink,
) -> Result<(), CnciError> {
    let host = |ip: Ipv4Addr| Ipv4Network::new(ip, 32).expect("/32");
    inner
        .netlink
        .add_address(link.index, IpNetwork::V4(host(me.mesh_ip)))
        .await?;
    inner
        .netlink
        .add_route(&Route {
            destination: host(link.peer.mesh_ip),
            gateway: None,
            dev: Some(link.index),
            table: None,
        })
        .await?;
    reroute(inner, link, &link.peer.subnets).await
}

/// One peer: its tunnel, our mesh address on it, routes to it and to its subnets.
async fn connect(inner: &Inner, me: &MeshPeer, peer: &MeshPeer) -> Result<PeerLink, CnciError> {
    let name = OWNERSHIP.fresh_name(&inner.netlink, names::MESH).await?;
    let spec = inner.tunnel_spec(
        &name,
        pair_key(me.underlay_ip, peer.underlay_ip),
        peer.underlay_ip,
    );
    let tunnel = inner.tunnels.create(&spec).await?;
    let link = PeerLink {
        peer: peer.clone(),
        tunnel: name.clone(),
        index: tunnel.index,
    };
    let made = address_and_routes(inner, me, &link).await;
    if let Err(e) = made {
        let mut left = Leftovers::new();
        left.note(inner.tunnels.delete(&name).await);
        return Err(e.with_leftovers(left));
    }
    Ok(link)
}

/// Routes to `subnets` through the peer (and none to subnets it no longer has).
async fn reroute(inner: &Inner, link: &PeerLink, subnets: &[Ipv4Network]) -> Result<(), CnciError> {
    for gone in link.peer.subnets.iter().filter(|s| !subnets.contains(s)) {
        inner
            .netlink
            .del_route(&Route {
                destination: *gone,
                gateway: Some(link.peer.mesh_ip),
                dev: Some(link.index),
                table: None,
            })
            .await?;
    }
    for s in subnets {
        inner
            .netlink
            .add_route(&Route {
                destination: *s,
                gateway: Some(link.peer.mesh_ip),
                dev: Some(link.index),
                table: None,
            })
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_ends_of_a_pair_agree_on_its_key() {
        let (a, b) = ("10.254.0.2".parse().unwrap(), "10.254.0.3".parse().unwrap());
        assert_eq!(pair_key(a, b), pair_key(b, a));
        assert!(pair_key(a, b).get() < 1 << 24);
        assert_ne!(pair_key(a, b), pair_key(a, "10.254.0.4".parse().unwrap()));
    }
}
