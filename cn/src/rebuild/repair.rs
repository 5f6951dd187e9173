//! What `rebuild` reports: each [`Repair`] it made, and the subnets present and removed.

use std::fmt;

use crate::node::{SubnetBinding, TunnelEvent};

/// One thing `rebuild` found wrong, and what it did about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// A link a crashed call had started (a generated name, no alias yet): deleted.
    RemovedUnfinished { ifname: String },
    /// A compute-node alias that cannot be read: the link is deleted.
    RemovedUnreadable { ifname: String, alias: String },
    /// A VNIC on no tenet bridge: deleted. Its subnet is unknown, so the controller must
    /// create it again.
    RemovedVnicWithoutBridge { vnic_id: String, ifname: String },
    /// A second link with the same VNIC id: deleted.
    RemovedDuplicateVnic {
        vnic_id: String,
        ifname: String,
        kept: String,
    },
    /// A compute-node tunnel on no tenet bridge: deleted.
    RemovedTunnelWithoutBridge { ifname: String },
    /// A tunnel on a subnet bridge that is not the one the subnet needs (another backend, key
    /// or peer), or a second one: deleted.
    RemovedStrayTunnel { ifname: String, bridge: String },
    /// A subnet bridge with no VNIC: deleted with its tunnel (a TunnelDel is reported).
    RemovedEmptyBridge {
        subnet: SubnetBinding,
        bridge: String,
    },
    /// A second bridge for one subnet: its VNICs moved to `kept`; it and its tunnel deleted.
    MergedDuplicateBridge {
        subnet: SubnetBinding,
        removed: String,
        kept: String,
    },
    /// A subnet bridge without its tunnel: the tunnel was made.
    AddedTunnel {
        subnet: SubnetBinding,
        bridge: String,
        tunnel: String,
    },
    /// A repair that did not work; what it concerns is left as it was.
    Failed { what: String, error: String },
}

impl fmt::Display for Repair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Repair::RemovedUnfinished { ifname } => {
                write!(
                    f,
                    "removed {ifname}, left unfinished by an interrupted call"
                )
            }
            Repair::RemovedUnreadable { ifname, alias } => {
                write!(f, "removed {ifname}, whose alias {alias:?} cannot be read")
            }
            Repair::RemovedVnicWithoutBridge { vnic_id, ifname } => {
                write!(f, "removed VNIC {vnic_id} ({ifname}): its bridge is gone")
            }
            Repair::RemovedDuplicateVnic {
                vnic_id,
                ifname,
                kept,
            } => write!(
                f,
                "removed {ifname}, a second link for VNIC {vnic_id} (kept {kept})"
            ),
            Repair::RemovedTunnelWithoutBridge { ifname } => {
                write!(f, "removed tunnel {ifname}: it is on no subnet bridge")
            }
            Repair::RemovedStrayTunnel { ifname, bridge } => {
                write!(
                    f,
                    "removed tunnel {ifname} from {bridge}: not the subnet's tunnel"
                )
            }
            Repair::RemovedEmptyBridge { subnet, bridge } => write!(
                f,
                "removed bridge {bridge} of tenant {} subnet {}: it had no VNIC",
                subnet.tenant, subnet.subnet
            ),
            Repair::MergedDuplicateBridge {
                subnet,
                removed,
                kept,
            } => write!(
                f,
                "merged bridge {removed} into {kept}: both were tenant {} subnet {}",
                subnet.tenant, subnet.subnet
            ),
            Repair::AddedTunnel {
                subnet,
                bridge,
                tunnel,
            } => write!(
                f,
                "made tunnel {tunnel} for bridge {bridge} (tenant {} subnet {})",
                subnet.tenant, subnet.subnet
            ),
            Repair::Failed { what, error } => write!(f, "could not repair {what}: {error}"),
        }
    }
}

/// What `rebuild` found and did.
#[derive(Debug, Default)]
pub struct RebuildReport {
    pub subnets: usize,
    pub vnics: usize,
    pub cnci_vnics: usize,
    /// A TunnelAdd for every subnet present. A crash can fall between making a subnet and
    /// reporting it, so the agent announces them all again; a concentrator takes a repeat as a
    /// no-op.
    pub present: Vec<TunnelEvent>,
    /// A TunnelDel for every subnet removed because it had no VNIC.
    pub removed: Vec<TunnelEvent>,
    pub repairs: Vec<Repair>,
}
