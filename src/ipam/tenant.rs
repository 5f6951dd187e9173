//! A tenant subnet's addresses (GRE/VXLAN overlays): Calico's block IPAM under the tenant's
//! own keys ([`super::IpamScope::Tenant`]), with the subnet as the pool. The subnet's
//! network, gateway (its first host address, which the concentrator holds) and broadcast
//! addresses are allocated once to a reserved handle, so they are never handed out and no
//! workload's release frees them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::{IpNetwork, Ipv4Network};

use super::{AutoAssignArgs, Ipam, IpamError, IpamResult, ThenWrite};
use crate::types::gateway_of;

/// How every reserved handle's name begins.
pub const RESERVED_HANDLE_PREFIX: &str = "tenet-reserved-";

/// The handle the subnet's own addresses are held by.
pub fn reserved_handle(subnet: &Ipv4Network) -> String {
    format!(
        "{RESERVED_HANDLE_PREFIX}{}-{}",
        subnet.network(),
        subnet.prefix()
    )
}

/// The addresses of `subnet` no workload may have.
pub fn reserved_addresses(subnet: &Ipv4Network) -> Vec<Ipv4Addr> {
    if subnet.prefix() > 30 {
        return Vec::new();
    }
    vec![subnet.network(), gateway_of(subnet), subnet.broadcast()]
}

/// The tenants that have an IPAM of their own (keys under `/tenet/v1/tenant/<t>/ipam/`).
pub async fn tenants_with_ipam(
    store: &dyn crate::store::Datastore,
) -> crate::store::StoreResult<Vec<String>> {
    let root = format!("{}tenant/", crate::keyspace::TENET_ROOT);
    let mut out = std::collections::BTreeSet::new();
    for kv in store.list(&root).await?.kvs {
        if let Some((tenant, rest)) = kv.key[root.len()..].split_once('/')
            && rest.starts_with("ipam/")
        {
            out.insert(crate::calico::unescape_name(tenant));
        }
    }
    Ok(out.into_iter().collect())
}

impl Ipam {
    /// One address of `subnet` for `handle` on `host`: `wanted` if given (it must be a
    /// workload address of the subnet, and free), else the next free one.
    pub async fn assign_in_subnet(
        &self,
        subnet: Ipv4Network,
        host: &str,
        handle: &str,
        wanted: Option<Ipv4Addr>,
        attributes: BTreeMap<String, String>,
    ) -> IpamResult<Ipv4Addr> {
        self.assign_in_subnet_then(subnet, host, handle, wanted, attributes, None)
            .await
    }

    /// [`Self::assign_in_subnet`], with `then`'s writes in the allocation's transaction when
    /// the address comes from a block of the host's (see [`ThenWrite`]).
    pub async fn assign_in_subnet_then(
        &self,
        subnet: Ipv4Network,
        host: &str,
        handle: &str,
        wanted: Option<Ipv4Addr>,
        attributes: BTreeMap<String, String>,
        then: Option<&ThenWrite>,
    ) -> IpamResult<Ipv4Addr> {
        let subnet = Ipv4Network::new(subnet.network(), subnet.prefix())
            .expect("the network of a valid subnet");
        // Blocks are /26: a smaller subnet would share a block with addresses outside it.
        let block = super::block::block_prefix(IpAddr::V4(subnet.ip()));
        if subnet.prefix() > block {
            return Err(IpamError::CidrTooSmall(IpNetwork::V4(subnet)));
        }
        self.reserve_edges(&subnet, host).await?;
        if let Some(ip) = wanted {
            if !subnet.contains(ip) {
                return Err(IpamError::NotInPool(IpAddr::V4(ip)));
            }
            if reserved_addresses(&subnet).contains(&ip) {
                return Err(IpamError::Reserved(IpAddr::V4(ip)));
            }
            self.assign_ip(IpAddr::V4(ip), Some(handle), attributes, host)
                .await?;
            return Ok(ip);
        }
        let args = AutoAssignArgs {
            num_v4: 1,
            handle: Some(handle.to_string()),
            attributes,
            host: host.to_string(),
            pools_v4: Some(vec![IpNetwork::V4(subnet)]),
            ..Default::default()
        };
        let (v4, _) = self.auto_assign_then(&args, then).await?;
        match v4.first() {
            Some(IpAddr::V4(ip)) => Ok(*ip),
            _ => Err(IpamError::NoFreeAddress(IpNetwork::V4(subnet))),
        }
    }

    async fn reserve_edges(&self, subnet: &Ipv4Network, host: &str) -> IpamResult<()> {
        let once = self
            .reserved
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(IpNetwork::V4(*subnet))
            .or_default()
            .clone();
        // A failed reservation leaves the cell empty: the next allocation tries again.
        once.get_or_try_init(|| self.reserve_edges_now(subnet, host))
            .await
            .map(|_| ())
    }

    /// Allocates the subnet's reserved addresses to its reserved handle (those already
    /// allocated stay as they are), in one transaction: the broadcast address is in another
    /// block than the network and gateway addresses unless the subnet is one block, and
    /// one transaction per block would have the two race for the handle they share.
    async fn reserve_edges_now(&self, subnet: &Ipv4Network, host: &str) -> IpamResult<()> {
        let handle = reserved_handle(subnet);
        let attributes = BTreeMap::from([("tenet.reserved".to_string(), subnet.to_string())]);
        let ips: Vec<IpAddr> = reserved_addresses(subnet)
            .into_iter()
            .map(IpAddr::V4)
            .collect();
        self.assign_if_free(&ips, &handle, attributes, host).await?;
        Ok(())
    }
}
