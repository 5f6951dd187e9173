//! What a caller asks of the compute node, checked before any kernel state is touched.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnetwork::Ipv4Network;
use tenet::types::{MacAddr, TunnelKey};

use crate::error::CnError;

/// Which kind of VNIC a workload gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VnicRole {
    /// A persistent multi-queue tap whose queue descriptors go to the VMM.
    Vm,
    /// A veth pair: the host side on the tenant bridge, the other side for the container.
    Container,
    /// A concentrator VM's macvtap on the compute link; not a tenant VNIC.
    Concentrator,
}

impl VnicRole {
    pub fn as_str(self) -> &'static str {
        match self {
            VnicRole::Vm => "vm",
            VnicRole::Container => "container",
            VnicRole::Concentrator => "concentrator",
        }
    }
}

/// Where the container side of a veth goes: the runtime's namespace, with the name, address
/// and default route the container should see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerNetns {
    pub path: PathBuf,
    pub ifname: String,
    pub address: Ipv4Network,
    pub gateway: Option<Ipv4Addr>,
}

/// One VNIC request (ciao's VnicConfig).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VnicConfig {
    pub role: VnicRole,
    pub vnic_id: String,
    pub instance_id: String,
    pub tenant_id: String,
    /// ciao sends the subnet CIDR text here; any id without spaces or `=` works.
    pub subnet_id: String,
    pub subnet: Ipv4Network,
    /// Must equal the subnet's tunnel key (its network address as a little-endian u32).
    pub subnet_key: u32,
    pub concentrator_id: String,
    pub concentrator_ip: Ipv4Addr,
    /// Unicast; required except for a VM, whose VMM sets it. For a container it goes on
    /// the container side; for a concentrator on the macvtap.
    pub mac: Option<MacAddr>,
    /// Tenant MTU; by default the underlay MTU minus the tunnel's overhead.
    pub mtu: Option<u32>,
    /// VM taps: how many queues (descriptors) to open. 0 is taken as 1.
    pub queues: usize,
    pub netns: Option<ContainerNetns>,
}

impl VnicConfig {
    /// A container VNIC request with the fields every VNIC needs; the rest default.
    pub fn container(
        vnic_id: &str,
        tenant_id: &str,
        subnet: Ipv4Network,
        concentrator_id: &str,
        concentrator_ip: Ipv4Addr,
        mac: MacAddr,
    ) -> Self {
        VnicConfig {
            role: VnicRole::Container,
            vnic_id: vnic_id.into(),
            instance_id: vnic_id.into(),
            tenant_id: tenant_id.into(),
            subnet_id: subnet.to_string(),
            subnet,
            subnet_key: TunnelKey::from_subnet(&subnet).map_or(0, |k| k.get()),
            concentrator_id: concentrator_id.into(),
            concentrator_ip,
            mac: Some(mac),
            mtu: None,
            queues: 1,
            netns: None,
        }
    }
}

/// Longest id accepted: the alias holds several ids and must fit IFALIASZ (256).
pub const MAX_ID: usize = 48;

fn check_id(field: &'static str, value: &str) -> Result<(), CnError> {
    let bad = |why: &str| Err(CnError::config(field, format!("{value:?} {why}")));
    if value.is_empty() {
        return bad("is empty");
    }
    if value.len() > MAX_ID {
        return bad(&format!("is longer than {MAX_ID} bytes"));
    }
    if value
        .chars()
        .any(|c| c.is_whitespace() || c == '=' || c.is_control())
    {
        return bad("contains whitespace, '=' or control characters");
    }
    Ok(())
}

/// What a validated request carries besides the config itself.
#[derive(Debug, Clone, Copy)]
pub struct Checked {
    pub key: TunnelKey,
    pub mac: Option<MacAddr>,
}

impl VnicConfig {
    /// Every check that can be made without the kernel. `allowed` are the roles the call
    /// accepts (tenant VNIC calls refuse Concentrator and vice versa).
    pub fn check(&self, allowed: &[VnicRole]) -> Result<Checked, CnError> {
        if !allowed.contains(&self.role) {
            return Err(CnError::config(
                "role",
                format!("{} is not allowed here", self.role.as_str()),
            ));
        }
        check_id("vnic_id", &self.vnic_id)?;
        check_id("tenant_id", &self.tenant_id)?;
        let mac = match (self.role, self.mac) {
            (_, Some(mac)) => Some(
                mac.check_unicast()
                    .map_err(|why| CnError::config("mac", why))?,
            ),
            // A VM's MAC is set by its VMM.
            (VnicRole::Vm, None) => None,
            (_, None) => return Err(CnError::config("mac", "is required for this role")),
        };
        if self.role == VnicRole::Concentrator {
            return Ok(Checked {
                key: TunnelKey::new(1).expect("non-zero"),
                mac,
            });
        }
        check_id("subnet_id", &self.subnet_id)?;
        check_id("concentrator_id", &self.concentrator_id)?;
        if self.subnet.prefix() > 30 {
            return Err(CnError::config(
                "subnet",
                format!("{} leaves no room for hosts", self.subnet),
            ));
        }
        if self.subnet.ip() != self.subnet.network() {
            return Err(CnError::config(
                "subnet",
                format!(
                    "{} has host bits set (did you mean {}/{}?)",
                    self.subnet,
                    self.subnet.network(),
                    self.subnet.prefix()
                ),
            ));
        }
        let key = TunnelKey::from_subnet(&self.subnet).map_err(|e| CnError::config("subnet", e))?;
        if self.subnet_key != key.get() {
            return Err(CnError::config(
                "subnet_key",
                format!(
                    "{} does not match subnet {} (its key is {key})",
                    self.subnet_key, self.subnet
                ),
            ));
        }
        if self.concentrator_ip.is_unspecified() || self.concentrator_ip.is_broadcast() {
            return Err(CnError::config(
                "concentrator_ip",
                format!("{} is not a unicast address", self.concentrator_ip),
            ));
        }
        if let Some(m) = self.mtu
            && !(576..=9000).contains(&m)
        {
            return Err(CnError::config("mtu", format!("{m} is outside 576..=9000")));
        }
        if self.queues > 16 {
            return Err(CnError::config(
                "queues",
                format!("{} is more than 16", self.queues),
            ));
        }
        if let Some(ns) = &self.netns {
            if self.role != VnicRole::Container {
                return Err(CnError::config(
                    "netns",
                    "only container VNICs move into a namespace",
                ));
            }
            if ns.ifname.is_empty() || ns.ifname.len() > 15 || ns.ifname.contains(['/', ' ', ':']) {
                return Err(CnError::config(
                    "netns.ifname",
                    format!("{:?} is not an interface name", ns.ifname),
                ));
            }
            if !self.subnet.contains(ns.address.ip()) {
                return Err(CnError::config(
                    "netns.address",
                    format!("{} is outside subnet {}", ns.address, self.subnet),
                ));
            }
        }
        Ok(Checked { key, mac })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> VnicConfig {
        VnicConfig::container(
            "v1",
            "t1",
            "172.16.0.0/24".parse().unwrap(),
            "c1",
            "10.254.0.9".parse().unwrap(),
            "02:00:ac:10:00:02".parse().unwrap(),
        )
    }

    #[test]
    fn good_config_passes_and_bad_fields_are_named() {
        assert_eq!(
            base().check(&[VnicRole::Container]).unwrap().key.get(),
            4268
        );
        type Mutation = Box<dyn Fn(&mut VnicConfig)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("tenant_id", Box::new(|c| c.tenant_id.clear())),
            ("vnic_id", Box::new(|c| c.vnic_id = "a b".into())),
            ("concentrator_id", Box::new(|c| c.concentrator_id.clear())),
            ("subnet_key", Box::new(|c| c.subnet_key = 0)),
            ("subnet_key", Box::new(|c| c.subnet_key = 4269)),
            // A malformed MAC is refused where it is parsed (`tenet::types::MacAddr`).
            ("mac", Box::new(|c| c.mac = None)),
            (
                "mac",
                Box::new(|c| c.mac = Some("01:00:5e:00:00:01".parse().unwrap())),
            ),
            (
                "subnet",
                Box::new(|c| c.subnet = "172.16.0.5/24".parse().unwrap()),
            ),
            (
                "subnet",
                Box::new(|c| {
                    c.subnet = "0.0.0.0/24".parse().unwrap();
                }),
            ),
            ("role", Box::new(|c| c.role = VnicRole::Concentrator)),
            ("mtu", Box::new(|c| c.mtu = Some(100))),
        ];
        for (field, mutate) in cases {
            let mut c = base();
            mutate(&mut c);
            let e = c.check(&[VnicRole::Container, VnicRole::Vm]).unwrap_err();
            assert!(
                matches!(&e, CnError::Config { field: f, .. } if *f == field),
                "expected an error on {field}, got {e}"
            );
        }
    }
}
