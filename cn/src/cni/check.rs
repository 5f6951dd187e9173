//! CHECK: the container's interface, its addresses and its routes against what ADD returned.

use std::path::Path;

use tenet::net::Netlink;

use super::error::{CniError, code};
use super::result::CniResult;

fn mismatch(netns: &Path, msg: String) -> CniError {
    CniError::new(code::CHECK_FAILED, msg, format!("in {}", netns.display()))
}

/// Every difference between the namespace and `prev` is an error naming it.
pub async fn container_matches(
    prev: &CniResult,
    netns: &Path,
    ifname: &str,
) -> Result<(), CniError> {
    if !netns.exists() {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            format!(
                "the container's namespace {} does not exist",
                netns.display()
            ),
            "",
        ));
    }
    let (index, expected) = prev
        .sandbox_interface()
        .filter(|(_, i)| i.name == ifname)
        .ok_or_else(|| {
            CniError::config(
                format!("prevResult has no interface {ifname} inside the container"),
                "CHECK compares the container with the result of ADD",
            )
        })?;
    let netlink = Netlink::connect_in(netns).map_err(|e| {
        CniError::new(
            code::IO_FAILURE,
            "entering the container's namespace",
            e.to_string(),
        )
    })?;
    let io = |e: tenet::net::NetError| {
        CniError::new(
            code::IO_FAILURE,
            "reading the container's network",
            e.to_string(),
        )
    };
    let link = netlink
        .link_by_name(ifname)
        .await
        .map_err(io)?
        .ok_or_else(|| mismatch(netns, format!("interface {ifname} is missing")))?;
    if !link.up {
        return Err(mismatch(netns, format!("interface {ifname} is down")));
    }
    if let (Some(want), Some(mac)) = (&expected.mac, link.mac) {
        let have = tenet::types::MacAddr(mac).to_string();
        if !want.eq_ignore_ascii_case(&have) {
            return Err(mismatch(
                netns,
                format!("interface {ifname} has MAC {have}, not {want}"),
            ));
        }
    }
    let addresses = netlink.addresses(link.index).await.map_err(io)?;
    for ip in prev
        .ips
        .iter()
        .filter(|i| i.interface.is_none_or(|n| n == index))
    {
        if !addresses.contains(&ip.address) {
            return Err(mismatch(
                netns,
                format!("interface {ifname} lacks its address {}", ip.address),
            ));
        }
    }
    let routes = netlink.gateway_routes().await.map_err(io)?;
    for want in &prev.routes {
        // Without `gw`, the spec's default: the gateway of the interface's address of the
        // route's family.
        let gateway = want.gw.or_else(|| {
            prev.ips
                .iter()
                .filter_map(|i| i.gateway)
                .find(|g| g.is_ipv4() == want.dst.is_ipv4())
        });
        let Some(gateway) = gateway else {
            return Err(mismatch(
                netns,
                format!("route {} has no gateway to check", want.dst),
            ));
        };
        let present = routes.iter().any(|(dst, gw, dev)| {
            *dst == want.dst && *gw == gateway && dev.is_none_or(|d| d == link.index)
        });
        if !present {
            return Err(mismatch(
                netns,
                format!("route {} via {gateway} dev {ifname} is missing", want.dst),
            ));
        }
    }
    Ok(())
}
