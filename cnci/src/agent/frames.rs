//! ciao's payloads → the concentrator's requests (pure). Every field the concentrator uses is
//! checked here, and a bad one is named, so that a malformed frame is an error with a reason,
//! never a panic or a half-applied change.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use ssntp::payload::{CnciRefreshCommand, PublicIpCommand, TenantSubnet};
use tenet::keyspace::cnci::{Mesh, MeshPeer, assign_mesh_addresses};

use crate::config::RemoteSubnet;

/// A payload field the concentrator cannot act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct BadField {
    pub field: &'static str,
    pub reason: String,
}

fn bad(field: &'static str, reason: impl Into<String>) -> BadField {
    BadField {
        field,
        reason: reason.into(),
    }
}

fn ipv4(field: &'static str, s: &str) -> Result<Ipv4Addr, BadField> {
    s.trim()
        .parse()
        .map_err(|_| bad(field, format!("{s:?} is not an IPv4 address")))
}

fn ipv4_net(field: &'static str, s: &str) -> Result<Ipv4Network, BadField> {
    s.trim()
        .parse()
        .map_err(|_| bad(field, format!("{s:?} is not an IPv4 CIDR")))
}

/// TenantAdded/TenantRemoved → the remote subnet to attach or detach.
pub fn remote_subnet(p: &TenantSubnet) -> Result<RemoteSubnet, BadField> {
    if p.agent_uuid.trim().is_empty() {
        return Err(bad("agent_uuid", "empty"));
    }
    Ok(RemoteSubnet {
        tenant: p.tenant_uuid.clone(),
        subnet: ipv4_net("tenant_subnet", &p.tenant_subnet)?,
        subnet_key: u32::try_from(p.subnet_key).map_err(|_| {
            bad(
                "subnet_key",
                format!("{} is outside 0..=4294967295", p.subnet_key),
            )
        })?,
        cn_id: p.agent_uuid.clone(),
        cn_ip: ipv4("agent_ip", &p.agent_ip)?,
    })
}

/// AssignPublicIP/ReleasePublicIP → (public, private). The private address is not needed
/// to release, so it may be empty there.
pub fn public_ip(
    p: &PublicIpCommand,
    need_private: bool,
) -> Result<(Ipv4Addr, Option<Ipv4Addr>), BadField> {
    let public = ipv4("public_ip", &p.public_ip)?;
    let private = if need_private || !p.private_ip.trim().is_empty() {
        Some(ipv4("private_ip", &p.private_ip)?)
    } else {
        None
    };
    Ok((public, private))
}

/// RefreshCNCI → the tenant mesh. ciao lists one entry per concentrator subnet (its
/// physical address, the subnet, its tunnel address); tenet groups them by concentrator
/// (identified by its physical address). A missing tunnel address is assigned from
/// `cidr`, the same on every concentrator because the list is the same.
pub fn mesh(
    cmd: &CnciRefreshCommand,
    cidr: Option<Ipv4Network>,
    own_underlay: Ipv4Addr,
) -> Result<Mesh, BadField> {
    let mut peers: BTreeMap<Ipv4Addr, (Option<Ipv4Addr>, Vec<Ipv4Network>)> = BTreeMap::new();
    for c in &cmd.cncis {
        let physical = ipv4("cncis.physical_ip", &c.physical_ip)?;
        let entry = peers.entry(physical).or_default();
        if !c.subnet.trim().is_empty() {
            let net = ipv4_net("cncis.subnet", &c.subnet)?;
            if !entry.1.contains(&net) {
                entry.1.push(net);
            }
        }
        if !c.tunnel_ip.trim().is_empty() {
            let ip = ipv4("cncis.tunnel_ip", &c.tunnel_ip)?;
            match entry.0 {
                Some(other) if other != ip => {
                    return Err(bad(
                        "cncis.tunnel_ip",
                        format!("{physical} is given two tunnel addresses, {other} and {ip}"),
                    ));
                }
                _ => entry.0 = Some(ip),
            }
        }
    }
    if !peers.contains_key(&own_underlay) {
        return Err(bad(
            "cncis",
            format!("this concentrator ({own_underlay}) is not in the list"),
        ));
    }
    let cidr = match cidr {
        Some(c) => c,
        None => {
            // Without a configured CIDR every tunnel address must be given; the smallest
            // network holding them all is the mesh CIDR.
            let given: Vec<Ipv4Addr> = peers.values().filter_map(|(ip, _)| *ip).collect();
            if given.len() != peers.len() {
                return Err(bad(
                    "cncis.tunnel_ip",
                    "missing, and this concentrator has no mesh CIDR to assign from (--mesh-cidr)",
                ));
            }
            covering(&given)
        }
    };
    let existing: BTreeMap<String, Ipv4Addr> = peers
        .iter()
        .filter_map(|(p, (ip, _))| ip.map(|ip| (p.to_string(), ip)))
        .collect();
    let ids: Vec<String> = peers.keys().map(|p| p.to_string()).collect();
    let addresses = assign_mesh_addresses(&cidr, &existing, &ids).map_err(|e| bad("cncis", e))?;
    Ok(Mesh {
        cidr,
        peers: peers
            .into_iter()
            .map(|(physical, (_, subnets))| MeshPeer {
                id: physical.to_string(),
                underlay_ip: physical,
                mesh_ip: addresses[&physical.to_string()],
                subnets,
            })
            .collect(),
    })
}

/// The smallest CIDR holding every address of `ips`, with room for a network and a
/// broadcast address.
fn covering(ips: &[Ipv4Addr]) -> Ipv4Network {
    let (lo, hi) = ips.iter().fold((u32::MAX, 0u32), |(lo, hi), ip| {
        (lo.min(u32::from(*ip)), hi.max(u32::from(*ip)))
    });
    let mut prefix = 30u8;
    loop {
        let net = Ipv4Network::new(Ipv4Addr::from(lo), prefix).expect("prefix ≤ 32");
        let net = Ipv4Network::new(net.network(), prefix).expect("prefix ≤ 32");
        if (net.contains(Ipv4Addr::from(hi))
            && u32::from(net.network()) < lo
            && u32::from(net.broadcast()) > hi)
            || prefix == 0
        {
            return net;
        }
        prefix -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssntp::payload::CnciPeer;

    fn subnet_payload() -> TenantSubnet {
        TenantSubnet {
            agent_uuid: "cn-1".into(),
            agent_ip: "10.254.0.1".into(),
            tenant_uuid: "t1".into(),
            tenant_subnet: "172.16.0.0/24".into(),
            concentrator_uuid: "c1".into(),
            concentrator_ip: "10.254.0.2".into(),
            subnet_key: 4268,
        }
    }

    #[test]
    fn tenant_added_becomes_a_remote_subnet_and_bad_fields_are_named() {
        let r = remote_subnet(&subnet_payload()).unwrap();
        assert_eq!(r.cn_ip, Ipv4Addr::new(10, 254, 0, 1));
        assert_eq!(r.subnet.to_string(), "172.16.0.0/24");
        let mut p = subnet_payload();
        p.agent_ip = "nope".into();
        assert_eq!(remote_subnet(&p).unwrap_err().field, "agent_ip");
        let mut p = subnet_payload();
        p.tenant_subnet = "172.16.0.0/33".into();
        assert_eq!(remote_subnet(&p).unwrap_err().field, "tenant_subnet");
        for key in [-1, 1 << 32] {
            let mut p = subnet_payload();
            p.subnet_key = key;
            let e = remote_subnet(&p).unwrap_err();
            assert_eq!(e.field, "subnet_key");
            assert!(e.reason.contains(&key.to_string()), "{e}");
        }
        let mut p = subnet_payload();
        p.agent_uuid = String::new();
        assert_eq!(remote_subnet(&p).unwrap_err().field, "agent_uuid");
    }

    #[test]
    fn public_ip_needs_a_private_address_only_to_assign() {
        let mut p = PublicIpCommand {
            public_ip: "192.0.2.50".into(),
            ..Default::default()
        };
        assert_eq!(
            public_ip(&p, false).unwrap(),
            ("192.0.2.50".parse().unwrap(), None)
        );
        assert_eq!(public_ip(&p, true).unwrap_err().field, "private_ip");
        p.private_ip = "172.16.0.5".into();
        assert_eq!(
            public_ip(&p, true).unwrap().1,
            Some("172.16.0.5".parse().unwrap())
        );
    }

    fn peer(physical: &str, subnet: &str, tunnel: &str) -> CnciPeer {
        CnciPeer {
            physical_ip: physical.into(),
            subnet: subnet.into(),
            tunnel_ip: tunnel.into(),
            tunnel_id: 0,
        }
    }

    #[test]
    fn refresh_groups_subnets_by_concentrator() {
        let cmd = CnciRefreshCommand {
            cnci_uuid: "c1".into(),
            cncis: vec![
                peer("10.254.0.2", "172.16.0.0/24", ""),
                peer("10.254.0.2", "172.16.1.0/24", ""),
                peer("10.254.0.3", "172.16.2.0/24", ""),
            ],
        };
        let own = "10.254.0.2".parse().unwrap();
        let m = mesh(&cmd, Some("192.168.128.0/29".parse().unwrap()), own).unwrap();
        assert_eq!(m.peers.len(), 2);
        assert_eq!(m.peers[0].subnets.len(), 2);
        assert_ne!(m.peers[0].mesh_ip, m.peers[1].mesh_ip);
        assert!(m.cidr.contains(m.peers[1].mesh_ip));
        // Without a CIDR, every tunnel address is needed.
        assert_eq!(mesh(&cmd, None, own).unwrap_err().field, "cncis.tunnel_ip");
        let given = CnciRefreshCommand {
            cnci_uuid: "c1".into(),
            cncis: vec![
                peer("10.254.0.2", "172.16.0.0/24", "192.168.128.1"),
                peer("10.254.0.3", "172.16.2.0/24", "192.168.128.2"),
            ],
        };
        let m = mesh(&given, None, own).unwrap();
        assert_eq!(
            m.peers[1].mesh_ip,
            "192.168.128.2".parse::<Ipv4Addr>().unwrap()
        );
        assert!(m.cidr.contains("192.168.128.1".parse().unwrap()));
        // Not in its own list: an error, not a crash.
        let other = "10.254.0.9".parse().unwrap();
        assert_eq!(
            mesh(&cmd, Some("192.168.128.0/29".parse().unwrap()), other)
                .unwrap_err()
                .field,
            "cncis"
        );
    }
}
