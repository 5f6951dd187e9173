//! What the compute node hands back: VNICs as created, and the events the agent turns into
//! SSNTP messages (TunnelAdd/Del → TenantAdded/Removed) and container-runtime calls.

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;

use ipnetwork::Ipv4Network;
use tenet::net::alias::Alias;
use tenet::types::TunnelKey;

use crate::config::{VnicConfig, VnicRole};
use crate::names::BRIDGE_KIND;

/// A tenant subnet as this node reaches it: the tenant, the subnet and the concentrator
/// serving it. Each binding has one bridge and one tunnel on the node; its fields are what
/// the bridge's alias records.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubnetBinding {
    pub tenant: String,
    pub subnet_id: String,
    pub subnet: Ipv4Network,
    pub concentrator: String,
    pub concentrator_ip: Ipv4Addr,
}

impl SubnetBinding {
    pub(crate) fn of(c: &VnicConfig) -> Self {
        SubnetBinding {
            tenant: c.tenant_id.clone(),
            subnet_id: c.subnet_id.clone(),
            subnet: c.subnet,
            concentrator: c.concentrator_id.clone(),
            concentrator_ip: c.concentrator_ip,
        }
    }

    pub(crate) fn alias(&self) -> Alias {
        Alias::new(BRIDGE_KIND)
            .with("tenant", &self.tenant)
            .with("subnet_id", &self.subnet_id)
            .with("subnet", self.subnet)
            .with("conc", &self.concentrator)
            .with("conc_ip", self.concentrator_ip)
    }

    /// The binding a bridge alias records; `None` if any field is missing or malformed.
    pub(crate) fn from_alias(alias: &Alias) -> Option<Self> {
        if alias.kind != BRIDGE_KIND {
            return None;
        }
        let binding = SubnetBinding {
            tenant: alias.get("tenant")?.to_string(),
            subnet_id: alias.get("subnet_id")?.to_string(),
            subnet: alias.get("subnet")?.parse().ok()?,
            concentrator: alias.get("conc")?.to_string(),
            concentrator_ip: alias.get("conc_ip")?.parse().ok()?,
        };
        // Only a subnet tenet could have made: a valid tunnel key, no host bits.
        TunnelKey::from_subnet(&binding.subnet).ok()?;
        (binding.subnet.ip() == binding.subnet.network() && !binding.tenant.is_empty())
            .then_some(binding)
    }

    pub(crate) fn key(&self) -> TunnelKey {
        TunnelKey::from_subnet(&self.subnet).expect("checked when the subnet was admitted")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEventKind {
    Add,
    Del,
}

/// What the agent must tell the concentrator (TenantAdded / TenantRemoved).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelEvent {
    pub kind: TunnelEventKind,
    pub concentrator_id: String,
    pub concentrator_ip: Ipv4Addr,
    pub tenant_id: String,
    pub subnet_id: String,
    pub subnet: Ipv4Network,
    pub subnet_key: TunnelKey,
    pub cn_id: String,
    pub cn_ip: Ipv4Addr,
}

/// What a container runtime needs to know about the tenant network on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerEvent {
    /// The first container VNIC on this bridge: create the runtime's network.
    Add(ContainerNetwork),
    /// A later one: the network exists.
    Info(ContainerNetwork),
    /// The bridge is gone: remove the runtime's network named `bridge`.
    Del { bridge: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerNetwork {
    /// The bridge's interface name (ciao used it as the docker network name).
    pub bridge: String,
    pub subnet: Ipv4Network,
    /// The subnet's first host address, which the concentrator holds.
    pub gateway: Ipv4Addr,
}

/// A VNIC as created.
#[derive(Debug)]
pub struct Vnic {
    pub id: String,
    pub role: VnicRole,
    /// Host-side interface (tap, or the host end of the veth).
    pub ifname: String,
    pub index: u32,
    /// Container side: its name on the host, or in the container's namespace once moved.
    pub peer: Option<String>,
    pub bridge: String,
    pub mtu: u32,
    /// VM taps: one descriptor per queue, for the VMM. The caller owns them.
    pub queues: Vec<OwnedFd>,
}

/// What `create_vnic` returns: the VNIC and the events it caused.
#[derive(Debug)]
pub struct CreatedVnic {
    pub vnic: Vnic,
    /// TunnelAdd when this VNIC made its subnet's bridge and tunnel.
    pub tunnel: Option<TunnelEvent>,
    pub container: Option<ContainerEvent>,
    /// The VNIC was there already (booked by an earlier create): this call made nothing.
    pub existed: bool,
}

/// What destroying one VNIC caused.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DestroyedVnic {
    /// TunnelDel when this was the subnet's last VNIC.
    pub tunnel: Option<TunnelEvent>,
    pub container: Option<ContainerEvent>,
}
