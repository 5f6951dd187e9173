//! How a concentrator is set up, and what a compute node asks of it (TenantAdded/Removed),
//! checked before anything is touched.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use tenet::net::firewall::IptablesVariant;
use tenet::net::tunnel::BackendChoice;
use tenet::types::TunnelKey;

use crate::error::CnciError;

/// Where a concentrator keeps its per-subnet files unless told otherwise. Several
/// concentrators on one host need one directory each.
pub const DEFAULT_RUN_DIR: &str = "/run/tenet/cnci";

/// Attaches and detaches at once by default. A burst of new subnets (a tenant's compute
/// nodes each announcing theirs) is CPU-bound — each is a bridge, a tunnel and a dnsmasq
/// started — and with every one of them under way at once, all of them finished late: 200
/// new subnets from a compute node at concurrency 10 (agents bench) had TenantAdded's p99
/// at 0.85 s with no limit and 0.62 s with 8 (0.71–0.82 s with 4, 1.0 s with 2).
pub const MAX_PARALLEL: usize = 8;

/// The workload endpoint label that names the tenant (tenants may overlap, so an address
/// alone does not say whose a workload is).
pub const TENANT_LABEL: &str = tenet::calico::vnic::TENANT_LABEL;

/// DHCP for the tenant's subnets.
#[derive(Debug, Clone)]
pub struct DhcpOptions {
    pub lease_time: Duration,
    /// ciao's compatibility binding: every address of the subnet pre-bound to the MAC
    /// `02:00:<ip bytes>`, in addition to the bindings from the workload endpoints.
    pub prebind_ciao_macs: bool,
    /// DNS servers dnsmasq forwards to; none (the default) answers only for the tenant's own
    /// names.
    pub upstream_dns: Vec<IpAddr>,
    /// DHCP option 26; by default the tenant MTU (compute link MTU − tunnel overhead).
    pub mtu: Option<u32>,
}

impl Default for DhcpOptions {
    fn default() -> Self {
        DhcpOptions {
            lease_time: Duration::from_secs(3600),
            prebind_ciao_macs: false,
            upstream_dns: Vec::new(),
            mtu: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CnciConfig {
    /// The concentrator's id (ciao's `concentrator_uuid`); written into its bridges' aliases.
    pub id: String,
    /// The one tenant this concentrator serves.
    pub tenant: String,
    /// CIDRs the compute link (where tunnels arrive) is in; empty = any, if unambiguous.
    pub compute_nets: Vec<Ipv4Network>,
    /// The tunnels' local address, chosen explicitly; wins over `compute_nets`.
    pub tunnel_local: Option<Ipv4Addr>,
    /// CIDRs the uplink (the external network) is in; empty = the one other physical
    /// address, if there is exactly one.
    pub uplink_nets: Vec<Ipv4Network>,
    /// The uplink address, chosen explicitly; wins over `uplink_nets`.
    pub uplink_addr: Option<Ipv4Addr>,
    pub tunnel: BackendChoice,
    /// Outer TTL of the tunnels (`None`: inherit the inner packet's).
    pub tunnel_ttl: Option<u8>,
    /// Which iptables the edge rules go to (`None`: the one the system's `iptables` is).
    /// With iptables-nft, floating IPs are nftables map elements instead of rules.
    pub iptables: Option<IptablesVariant>,
    /// Floating IPs as elements of an nftables map (table `tenet-cnci`) when the iptables is
    /// iptables-nft and `nft` is present (default); `false` keeps them as iptables rules.
    pub nft_floating: bool,
    /// The namespace to work in (`None`: the caller's).
    pub netns: Option<PathBuf>,
    /// Per-subnet dnsmasq files go to `<run_dir>/<subnet>/`.
    pub run_dir: PathBuf,
    pub dhcp: DhcpOptions,
    /// Refuse a subnet key other than ciao's rule (network address as a little-endian u32).
    pub strict_subnet_key: bool,
    /// Remove a subnet (bridge and dnsmasq) once it has had no tunnel this long; `None`
    /// keeps it until `remove_subnet`.
    pub idle_timeout: Option<Duration>,
    /// Attaches and detaches doing kernel work at once; the others wait their turn, first
    /// come first served.
    pub max_parallel: usize,
    /// Tests only: called at each [`crate::FaultPoint`] to simulate a crash there.
    #[cfg(feature = "fault-injection")]
    pub fault_hook: Option<crate::fault::FaultHook>,
}

impl CnciConfig {
    pub fn new(id: &str, tenant: &str) -> Self {
        CnciConfig {
            id: id.into(),
            tenant: tenant.into(),
            compute_nets: Vec::new(),
            tunnel_local: None,
            uplink_nets: Vec::new(),
            uplink_addr: None,
            tunnel: BackendChoice::Auto,
            tunnel_ttl: None,
            iptables: None,
            nft_floating: true,
            netns: None,
            run_dir: PathBuf::from(DEFAULT_RUN_DIR),
            dhcp: DhcpOptions::default(),
            strict_subnet_key: true,
            idle_timeout: None,
            max_parallel: MAX_PARALLEL,
            #[cfg(feature = "fault-injection")]
            fault_hook: None,
        }
    }

    pub(crate) fn check(&self) -> Result<(), CnciError> {
        check_id("id", &self.id)?;
        check_id("tenant", &self.tenant)?;
        if let Some(m) = self.dhcp.mtu
            && !(576..=9000).contains(&m)
        {
            return Err(CnciError::invalid(
                "dhcp.mtu",
                format!("{m} is outside 576..=9000"),
            ));
        }
        if self.dhcp.lease_time < Duration::from_secs(120) {
            return Err(CnciError::invalid(
                "dhcp.lease_time",
                "dnsmasq's minimum lease time is 2 minutes",
            ));
        }
        Ok(())
    }
}

/// A compute node's tunnel for a tenant subnet: the fields of ciao's TenantAdded and
/// TenantRemoved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSubnet {
    pub tenant: String,
    pub subnet: Ipv4Network,
    /// Must be ciao's key for `subnet` unless the concentrator is configured otherwise.
    pub subnet_key: u32,
    /// The compute node's id (its SSNTP UUID).
    pub cn_id: String,
    /// The compute node's tunnel address: the far end of this tunnel.
    pub cn_ip: Ipv4Addr,
}

/// Longest id accepted: aliases hold them and must fit IFALIASZ (256).
const MAX_ID: usize = 48;

fn check_id(field: &'static str, value: &str) -> Result<(), CnciError> {
    if value.is_empty() {
        return Err(CnciError::invalid(field, "is empty"));
    }
    if value.len() > MAX_ID {
        return Err(CnciError::invalid(
            field,
            format!("{value:?} is longer than {MAX_ID} bytes"),
        ));
    }
    if value
        .chars()
        .any(|c| c.is_whitespace() || c == '=' || c.is_control())
    {
        return Err(CnciError::invalid(
            field,
            format!("{value:?} contains whitespace, '=' or control characters"),
        ));
    }
    Ok(())
}

impl RemoteSubnet {
    /// Every check that needs no kernel state: the tenant is `tenant`, the subnet a usable
    /// network, the key ciao's (when `strict_key`), the compute node's address unicast.
    /// Returns the tunnel key.
    pub fn check(&self, tenant: &str, strict_key: bool) -> Result<TunnelKey, CnciError> {
        if self.tenant != tenant {
            return Err(CnciError::invalid(
                "tenant",
                format!(
                    "{:?} is not served here (this concentrator serves {tenant:?})",
                    self.tenant
                ),
            ));
        }
        check_id("cn_id", &self.cn_id)?;
        let prefix = self.subnet.prefix();
        if !(8..=30).contains(&prefix) {
            return Err(CnciError::invalid(
                "subnet",
                format!("{}: the prefix must be between /8 and /30", self.subnet),
            ));
        }
        if self.subnet.ip() != self.subnet.network() {
            return Err(CnciError::invalid(
                "subnet",
                format!(
                    "{} has host bits set (did you mean {}/{prefix}?)",
                    self.subnet,
                    self.subnet.network()
                ),
            ));
        }
        let rule =
            TunnelKey::from_subnet(&self.subnet).map_err(|e| CnciError::invalid("subnet", e))?;
        let key = if strict_key {
            if self.subnet_key != rule.get() {
                return Err(CnciError::invalid(
                    "subnet_key",
                    format!(
                        "{} does not match subnet {} (its key is {rule})",
                        self.subnet_key, self.subnet
                    ),
                ));
            }
            rule
        } else {
            TunnelKey::new(self.subnet_key)
                .ok_or_else(|| CnciError::invalid("subnet_key", "0 is not a valid key"))?
        };
        let ip = self.cn_ip;
        if ip.is_unspecified()
            || ip.is_broadcast()
            || ip.is_multicast()
            || ip.is_loopback()
            || ip.is_link_local()
        {
            return Err(CnciError::invalid(
                "cn_ip",
                format!("{ip} is not a unicast underlay address"),
            ));
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> RemoteSubnet {
        RemoteSubnet {
            tenant: "t1".into(),
            subnet: "172.16.0.0/24".parse().unwrap(),
            subnet_key: 4268,
            cn_id: "cn-1".into(),
            cn_ip: "10.254.0.2".parse().unwrap(),
        }
    }

    #[test]
    fn bad_fields_are_named() {
        assert_eq!(good().check("t1", true).unwrap().get(), 4268);
        type Mutation = Box<dyn Fn(&mut RemoteSubnet)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("tenant", Box::new(|r| r.tenant = "t2".into())),
            ("subnet_key", Box::new(|r| r.subnet_key = 4269)),
            (
                "subnet",
                Box::new(|r| r.subnet = "172.16.0.5/24".parse().unwrap()),
            ),
            (
                "subnet",
                Box::new(|r| r.subnet = "10.0.0.0/7".parse().unwrap()),
            ),
            (
                "subnet",
                Box::new(|r| r.subnet = "172.16.0.0/31".parse().unwrap()),
            ),
            (
                "cn_ip",
                Box::new(|r| r.cn_ip = "224.0.0.5".parse().unwrap()),
            ),
            ("cn_ip", Box::new(|r| r.cn_ip = "0.0.0.0".parse().unwrap())),
            (
                "cn_ip",
                Box::new(|r| r.cn_ip = "255.255.255.255".parse().unwrap()),
            ),
            ("cn_id", Box::new(|r| r.cn_id = "a b".into())),
        ];
        for (field, mutate) in cases {
            let mut r = good();
            mutate(&mut r);
            let e = r.check("t1", true).unwrap_err();
            assert!(
                matches!(&e, CnciError::Invalid { field: f, .. } if *f == field),
                "expected an error on {field}, got {e}"
            );
        }
        let mut loose = good();
        loose.subnet_key = 77;
        assert_eq!(loose.check("t1", false).unwrap().get(), 77);
    }
}
